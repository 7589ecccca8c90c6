"""metrics.jsonl and summary.json: strictly standard JSON, torn lines repaired on open, atomic summary writes."""

import json
import math
import os

import numpy as np
import pytest
import torch

from deca_ds.metrics import (NONFINITE_KEY, JsonlWriter, read_jsonl, repair_jsonl, restore_nonfinite, strict_json,
                             truncate_jsonl_after, write_json_atomic)


def _strict_loads(text):
    """Python's parser with the non-standard tokens (NaN, Infinity, -Infinity) turned into errors."""
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(text, parse_constant=refuse)


RECORD = {"step": 3, "client": 1, "loss": float("nan"), "lr": np.float32(1e-3), "bytes_sent": np.int64(7),
          "tokens": torch.tensor(5), "grad_norm": torch.tensor(float("inf")),
          "eval": {"loss": float("-inf"), "per_label_accuracy": {"sci/tech": float("nan"), "world": 0.5},
                   "curve": [1.0, float("inf")]}}


def test_nonfinite_numbers_are_null_plus_a_flag_and_can_be_restored():
    text = strict_json(RECORD)
    rec = _strict_loads(text)
    json.dumps(rec, allow_nan=False)  # what was parsed is itself standard JSON
    assert rec["loss"] is None and rec["grad_norm"] is None and rec["eval"]["loss"] is None
    assert rec["eval"]["per_label_accuracy"] == {"sci/tech": None, "world": 0.5}
    assert rec["eval"]["curve"] == [1.0, None]
    assert rec[NONFINITE_KEY] == {"/loss": "nan", "/grad_norm": "inf", "/eval/loss": "-inf",
                                  "/eval/per_label_accuracy/sci~1tech": "nan", "/eval/curve/1": "inf"}
    assert rec["lr"] == float(np.float32(1e-3)) and rec["bytes_sent"] == 7 and rec["tokens"] == 5
    back = restore_nonfinite(rec)
    assert NONFINITE_KEY not in back
    assert math.isnan(back["loss"]) and back["grad_norm"] == math.inf and back["eval"]["loss"] == -math.inf
    assert math.isnan(back["eval"]["per_label_accuracy"]["sci/tech"]) and back["eval"]["curve"][1] == math.inf
    finite = {"step": 1, "loss": 2.5}
    assert json.loads(strict_json(finite)) == finite  # no flag when there is nothing to flag
    with pytest.raises(TypeError, match="JSON object"):
        strict_json([float("nan")])
    with pytest.raises(TypeError, match="/x"):
        strict_json({"x": object()})


def test_writer_output_is_standard_json(tmp_path):
    path = tmp_path / "metrics.jsonl"
    w = JsonlWriter(path)
    w.write(RECORD)
    w.write({"step": 4, "loss": 1.25})
    w.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    for line in lines:
        _strict_loads(line)
    recs = read_jsonl(path)
    assert math.isnan(recs[0]["loss"]) and recs[1] == {"step": 4, "loss": 1.25}


@pytest.mark.parametrize("tail", [b'{"step": 2, "lo', b'{"step": 2, "loss": 1.0', b"\x00\x00\x00\n", b'{"st\n'])
def test_a_torn_last_line_is_repaired_when_a_writer_opens(tmp_path, tail):
    path = tmp_path / "metrics.jsonl"
    good = b'{"step": 0, "loss": 3.0}\n{"step": 1, "loss": 2.0}\n'
    path.write_bytes(good + tail)
    w = JsonlWriter(path)
    assert w.repaired_bytes == len(tail)
    w.write({"step": 2, "loss": 1.5})
    w.close()
    assert path.read_bytes() == good + b'{"step": 2, "loss": 1.5}\n'


def test_a_whole_last_record_missing_only_its_newline_is_kept(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 0, "loss": 3.0}\n{"step": 1, "loss": 2.0}')
    w = JsonlWriter(path)
    assert w.repaired_bytes == 0
    w.write({"step": 2})
    w.close()
    assert [r["step"] for r in read_jsonl(path)] == [0, 1, 2]


def test_repair_leaves_a_whole_file_alone_and_handles_big_files(tmp_path):
    path = tmp_path / "metrics.jsonl"
    body = "".join(json.dumps({"step": i, "pad": "x" * 100}) + "\n" for i in range(2000)).encode()  # > 64 KiB
    path.write_bytes(body)
    assert repair_jsonl(path) == 0 and path.read_bytes() == body
    path.write_bytes(body + b'{"step": 2000, "pa')
    assert repair_jsonl(path) == len(b'{"step": 2000, "pa') and path.read_bytes() == body
    path.write_bytes(b'{"step": 0')  # nothing complete at all
    assert repair_jsonl(path) == 10 and path.read_bytes() == b""
    assert repair_jsonl(tmp_path / "missing.jsonl") == 0 and not (tmp_path / "missing.jsonl").exists()


def test_truncate_after_a_resume_point_makes_old_files_strict(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "loss": NaN}\n{"step": 1, "loss": 1.0}\n{"step": 2, "loss": Infinity}\n{"ste')
    truncate_jsonl_after(path, 2)
    lines = path.read_text().splitlines()
    assert [_strict_loads(x)["step"] for x in lines] == [0, 1]
    assert _strict_loads(lines[0]) == {"step": 0, "loss": None, NONFINITE_KEY: {"/loss": "nan"}}
    assert lines[1] == '{"step": 1, "loss": 1.0}'  # standard lines are kept byte for byte


def test_write_json_atomic_is_strict_and_never_half_written(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    write_json_atomic(path, {"steps": 4, "consensus": {"loss": float("nan"), "accuracy": np.float64(0.25)}})
    data = _strict_loads(path.read_text())
    assert data == {"steps": 4, "consensus": {"loss": None, "accuracy": 0.25},
                    NONFINITE_KEY: {"/consensus/loss": "nan"}}
    before = path.read_bytes()
    # Unwritable content is refused before the file is touched.
    with pytest.raises(TypeError):
        write_json_atomic(path, {"model": torch.nn.Linear(2, 2)})
    assert path.read_bytes() == before
    # A crash at the rename leaves the old file and no temporary file.
    def crash(src, dst):
        raise OSError("disk gone")
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        write_json_atomic(path, {"steps": 8})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_plot_run_draws_each_clients_loss_and_consensus_distance(tmp_path):
    from matplotlib import image

    from deca_ds.metrics import plot_run

    assert plot_run(tmp_path) is None  # no metrics.jsonl: nothing to draw, nothing written
    writer = JsonlWriter(tmp_path / "metrics.jsonl")
    for step in range(20):
        for c in range(3):
            writer.write({"step": step, "client": c, "loss": 5.0 / (step + 1) + c, "block": step // 4, "lr": 1e-3,
                          "consensus_distance": 0.01 * (c + 1), "bytes_sent": 10, "nonfinite": False, "time": step})
    writer.write({"step": 19, "client": 0, "eval": {"loss": 1.0}})  # evaluation records are not steps
    writer.write({"step": 20, "client": 1, "loss": float("nan"), "block": 5, "lr": 1e-3, "consensus_distance": 0.0,
                  "bytes_sent": 10, "nonfinite": True, "time": 20})
    writer.close()
    path = plot_run(tmp_path)
    assert path == tmp_path / "training.png"
    pixels = image.imread(path)
    assert pixels.shape[0] > 300 and pixels.shape[1] > 400
    assert len({tuple(p) for p in pixels.reshape(-1, pixels.shape[-1])[::97].tolist()}) > 3  # lines, not a blank


def test_progress_bar_shows_the_time_left():
    import io
    import time

    from rich.console import Console
    from rich.progress import TimeRemainingColumn

    from deca_ds.metrics import make_progress

    out = io.StringIO()
    progress = make_progress(Console(file=out, width=200, force_terminal=False))
    assert any(isinstance(col, TimeRemainingColumn) for col in progress.columns)
    progress.start()
    task = progress.add_task("train", total=10, round=0, block=0, loss=1.0, tps=0.0)
    for k in range(1, 4):
        time.sleep(0.02)
        progress.update(task, completed=k)
    assert progress.tasks[0].time_remaining is not None and progress.tasks[0].time_remaining > 0
    progress.stop()
    assert "ETA 0:00:0" in out.getvalue()  # the estimated time left is printed


def test_summary_table_shows_a_peak_only_where_one_was_measured():
    from rich.console import Console

    from deca_ds.metrics import summary_table

    console = Console(width=200, record=True)
    console.print(summary_table([{"client": 0, "final_loss": 1.0, "bytes_sent": 2**20, "peak_memory_bytes": 3 * 2**20},
                                 {"client": 1, "final_loss": 1.0, "bytes_sent": 2**20}], None))
    rows = [ln for ln in console.export_text().splitlines() if ln.startswith("│")]
    assert rows[0].split("│")[-2].strip() == "3" and rows[1].split("│")[-2].strip() == "-"

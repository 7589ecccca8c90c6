"""recipes/gpu_check.py's CPU-side logic: it explains and exits 0 without CUDA, its parts fit the 8-minute budget,
its model is >= 1B parameters, and the planner-vs-measured verdict and summary say what happened."""

import argparse
import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "recipes" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def _args(**kw):
    base = dict(out="runs/x", model=gpu_check.DEFAULT_MODEL, seq_len=512, micro_batch=4)
    return argparse.Namespace(**dict(base, **kw))


def test_without_cuda_it_explains_and_runs_nothing(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_check, "run_part", lambda part: (_ for _ in ()).throw(AssertionError("ran")))
    assert gpu_check.main(["--out", "/nonexistent/never-written"]) == 0
    assert "no CUDA device" in capsys.readouterr().out
    assert not Path("/nonexistent/never-written").exists()


def test_parts_cover_gpu_tests_benchmark_and_peak_memory_within_8_minutes():
    parts = gpu_check.parts(_args())
    names = [p["name"] for p in parts]
    assert names == ["gpu_tests", "benchmark", "peak_memory"]
    assert sum(p["limit"] for p in parts) < 8 * 60 - 10  # start-up and summary to spare
    tests = parts[0]["cmd"]
    assert tests[tests.index("-m", 2) + 1] == "gpu"
    # Only the files holding gpu tests are collected (another module's missing optional dependency cannot fail the
    # collection on the GPU machine), and every one of them is.
    files = gpu_check.gpu_test_files()
    assert {"tests/unit/test_block_adam.py", "tests/unit/test_simulate.py",
            "tests/unit/test_lean_step.py"} <= set(files)  # decorators, and marks on parameters (test_lean_step)
    assert "tests/unit/test_gpu_check.py" not in files  # holds no gpu test
    assert tests[3:3 + len(files)] == files
    bench = parts[1]["cmd"]
    assert "--reps" in bench and int(bench[bench.index("--reps") + 1]) >= 3 and "adamw_fused" in " ".join(bench)
    from deca_ds.models import build_meta_model

    model = build_meta_model(str(ROOT / gpu_check.DEFAULT_MODEL))
    assert sum(p.numel() for p in model.parameters()) >= 1e9


def test_gpu_marked_tests_exist_to_run():
    assert gpu_check.gpu_test_files()  # pytest -m gpu would otherwise select nothing and "pass"


def test_compare_peak_and_summary():
    ok = gpu_check.compare_peak({"model_states": 6 * 2**30, "activations": 2 * 2**30}, 7 * 2**30)
    assert ok["ok"] and ok["planned_bytes"] == 8 * 2**30 and ok["measured_over_planned"] == 7 / 8
    low = gpu_check.compare_peak({"model_states": 6 * 2**30, "activations": 2 * 2**30}, 9 * 2**30)
    assert not low["ok"]
    results = [{"name": "gpu_tests", "status": "pass", "seconds": 3.0, "tail": ["2 passed"]},
               {"name": "peak_memory", "status": "fail", "seconds": 9.0, "tail": ["boom"]}]
    pm = dict(low, model="m", params=1.5e9, planned_model_states=6 * 2**30, planned_activations=2 * 2**30)
    text = gpu_check.summarize(results, {"peak_memory": pm})
    assert "gpu_tests    PASS" in text and "peak_memory  FAIL" in text and "PLAN TOO LOW" in text
    assert "FAILURES" in text and "2 passed" in text and "boom" in text
    # Both peak-memory cases get their own verdict line.
    fused = dict(ok, planned_model_states=5 * 2**30, planned_activations=2 * 2**30)
    text = gpu_check.summarize(results, {"peak_memory": dict(pm, cases={"plain": pm, "fused_int8": fused})})
    assert "peak memory plain" in text and "PLAN TOO LOW" in text
    assert "peak memory fused_int8" in text and "-> OK" in text
    assert [name for name, _, _ in gpu_check.PEAK_CASES] == ["plain", "fused_int8"]


def test_a_part_past_its_limit_is_killed_with_its_children(tmp_path):
    """The benchmark's workers are grandchildren of the part: at the limit the whole process group goes, so no
    worker keeps the GPU into the next part; the output so far is kept in the part's log."""
    import sys
    import time

    pid_file = tmp_path / "child.pid"
    code = ("import subprocess, sys, time; "
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(pid_file)!r}, 'w').write(str(c.pid)); print('started', flush=True); time.sleep(60)")
    part = {"name": "slow", "limit": 3, "cmd": [sys.executable, "-c", code], "log": str(tmp_path / "slow.log")}
    t0 = time.perf_counter()
    res = gpu_check.run_part(part)
    assert res["status"] == "timeout" and time.perf_counter() - t0 < 30
    assert res["tail"] == ["started"] and (tmp_path / "slow.log").read_text().strip() == "started"
    child = int(pid_file.read_text())
    for _ in range(50):  # the kill is asynchronous; a zombie has no /proc/<pid>/cmdline content either
        if not Path(f"/proc/{child}/cmdline").exists() or not Path(f"/proc/{child}/cmdline").read_bytes():
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the part's child {child} outlived the part")


def test_paths_are_made_absolute_so_parts_and_summary_agree(tmp_path, monkeypatch):
    """The parts run in the checkout, the summary is written from the caller's directory: run from elsewhere, a
    relative --out once split the outputs over two places and the summary lost the peak-memory figures."""
    monkeypatch.chdir(tmp_path)
    args = _args(out="runs/x")
    gpu_check.resolve_paths(args)
    assert args.out == str(tmp_path / "runs" / "x")
    assert args.model == str(ROOT / gpu_check.DEFAULT_MODEL)  # the default lives in the checkout
    args = _args(model="my_model")
    gpu_check.resolve_paths(args)
    assert args.model == str(tmp_path / "my_model")  # a user's relative path is theirs
    parts = gpu_check.parts(args)
    assert all(p["log"].startswith(str(tmp_path)) for p in parts)
    bench = parts[1]["cmd"]
    assert bench[bench.index("--out") + 1] == str(tmp_path / "runs" / "x" / "benchmark")

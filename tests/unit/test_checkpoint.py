"""Checkpoint files: atomic per-client writes, `latest` moves last, pruning, the output_dir guard."""

import pytest
import torch

from deca_ds import checkpoint as ckpt
from deca_ds.config import ConfigError


def _save(out, step, clients=(0, 1), keep=2):
    for c in clients:
        ckpt.write_client_state(out, step, c, {"w": torch.full((3,), float(step + c))})
    for c in clients:
        ckpt.publish_checkpoint(out, step, c, keep)


def test_latest_points_to_newest_complete_and_old_ones_are_pruned(tmp_path):
    assert ckpt.latest_checkpoint(tmp_path) is None
    for step in (2, 4, 6):
        _save(tmp_path, step)
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "step_00000006"
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_00000004", "step_00000006"]
    assert torch.equal(ckpt.read_client_state(latest, 1)["w"], torch.full((3,), 7.0))


def test_unpublished_write_does_not_move_latest_and_leftovers_are_cleaned(tmp_path):
    _save(tmp_path, 2)
    # A kill after client 0 wrote step 4 but before `latest` moved: resume still sees step 2.
    ckpt.write_client_state(tmp_path, 4, 0, {"w": torch.zeros(1)})
    (tmp_path / "checkpoints" / "step_00000004" / "client_1.tmp").mkdir()
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000002"
    # The resumed run saves step 3: the dead step-4 leftovers go, step 2 stays.
    _save(tmp_path, 3)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert names == ["step_00000002", "step_00000003"]


def test_missing_client_is_a_clear_error(tmp_path):
    _save(tmp_path, 2, clients=(0,))
    with pytest.raises(ConfigError, match="client 1"):
        ckpt.read_client_state(ckpt.latest_checkpoint(tmp_path), 1)


def test_output_dir_guard_never_overwrites(tmp_path):
    ckpt.prepare_output_dir(tmp_path / "new", resume=False)  # fresh: fine
    ckpt.prepare_output_dir(tmp_path / "new", resume=True)  # resume of nothing yet: starts fresh
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="resume=true"):
        ckpt.prepare_output_dir(run, resume=False)
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        ckpt.prepare_output_dir(run, resume=True)
    assert (run / "metrics.jsonl").read_text() == before
    _save(run, 1)
    ckpt.prepare_output_dir(run, resume=True)


def test_all_finite():
    assert ckpt.all_finite([torch.ones(2), torch.arange(3)])
    assert not ckpt.all_finite([torch.tensor([1.0, float("nan")])])
    assert not ckpt.all_finite([torch.tensor([float("inf")])])

"""Faults after start-up end a run with one line naming the cause and the fix, not a traceback; bugs keep theirs."""

import errno
import importlib.util

import pytest
import torch.distributed as dist

from deca_ds.errors import EXIT_FAULT, NeighbourError, describe_fault
from launch import RECIPE


def _recipe():
    spec = importlib.util.spec_from_file_location("finetune_recipe", RECIPE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("err, words", [
    (OSError(errno.ENOSPC, "No space left on device", "/out/checkpoints/step_8/client_0/state.pt"),
     ["disk error writing /out/checkpoints/step_8/client_0/state.pt", "No space left on device", "free disk space"]),
    (PermissionError(errno.EACCES, "Permission denied", "/out/metrics.jsonl"), ["make output_dir writable"]),
    (NeighbourError("gossip: neighbour client 2 (rank 2) did not answer within 5 s"), ["neighbour client 2"]),
    (dist.DistBackendError("Connection closed by peer [127.0.0.1]:1234\nmore"),
     ["a collective with the other ranks failed (Connection closed by peer [127.0.0.1]:1234)", "peer process"]),
    (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), ["collective", "Connection reset by peer"]),
    (RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                  "[127.0.0.1]:27788. This is typically caused by a remote worker crashing."),
     ["a collective with the other ranks failed", "Connection closed by peer"]),
])
def test_faults_are_one_line_with_cause_and_fix(err, words):
    line = describe_fault(err)
    assert line is not None and "\n" not in line
    for w in words:
        assert w in line, line
    assert "resume=auto" in line


@pytest.mark.parametrize("err", [ValueError("bug"), KeyError("x"), RuntimeError("plain bug"), AssertionError()])
def test_bugs_are_not_faults(err):
    assert describe_fault(err) is None


def test_recipe_prints_one_line_and_exits_nonzero(monkeypatch, capsys, tmp_path):
    import deca_ds.trainer

    def full_disk(cfg, ds_config_path=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "state.pt"))

    monkeypatch.setattr(deca_ds.trainer, "run", full_disk)
    assert _recipe().main([f"output_dir={tmp_path / 'run'}", "backend=launcher"]) == EXIT_FAULT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deca_ds: error: disk error writing") and "Traceback" not in err[0]

    def bug(cfg, ds_config_path=None):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(deca_ds.trainer, "run", bug)
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        _recipe().main([f"output_dir={tmp_path / 'run2'}", "backend=launcher"])

"""Checkpoint bookkeeping across legs: a leftover of a killed save never displaces a complete checkpoint, and a leg
that resumes from an older checkpoint moves ``latest`` back to it."""

import threading

import torch

from deca_ds import checkpoint as ckpt


def _save_all(out, step, clients=(0, 1), keep=2):
    """Every client's writer rank saves ``step`` at once (threads, a real barrier), as a launch does."""
    barrier = threading.Barrier(len(clients))
    errors = []

    def rank(c):
        try:
            ckpt.save_checkpoint(out, step, c, True, lambda: {"w": torch.full((3,), float(step + c))}, keep=keep,
                                 barrier=lambda: barrier.wait(timeout=30))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def _names(out):
    return sorted(p.name for p in (out / "checkpoints").glob("step_*"))


def test_a_leftover_of_a_killed_save_never_displaces_a_complete_checkpoint(tmp_path):
    _save_all(tmp_path, 4)
    # kill -9 while saving step 6 (e.g. the checkpoint of a SIGTERM stop): client 0 finished, client 1 did not.
    ckpt.write_client_state(tmp_path, 6, 0, {"w": torch.zeros(3)})
    (tmp_path / "checkpoints" / "step_00000006" / "client_1.tmp").mkdir()
    assert ckpt.find_resume_checkpoint(tmp_path, client_ids=range(2)).name == "step_00000004"
    # The resumed leg's next checkpoint, keep_checkpoints=2: the two complete ones stay, the dead step 6 goes.
    _save_all(tmp_path, 8, keep=2)
    assert _names(tmp_path) == ["step_00000004", "step_00000008"]
    for name in _names(tmp_path):
        assert ckpt.checkpoint_problem(tmp_path / "checkpoints" / name, range(2)) is None
    # keep_checkpoints=1 keeps only the new one.
    _save_all(tmp_path, 10, keep=1)
    assert _names(tmp_path) == ["step_00000010"]


def test_publish_without_a_readable_pointer_deletes_nothing_below_the_step(tmp_path):
    _save_all(tmp_path, 2, keep=3)
    _save_all(tmp_path, 4, keep=3)
    (tmp_path / "checkpoints" / "latest").unlink()  # removed by hand: no way to tell leftovers from checkpoints
    _save_all(tmp_path, 6, keep=3)
    assert _names(tmp_path) == ["step_00000002", "step_00000004", "step_00000006"]


def test_resuming_from_an_older_checkpoint_moves_latest_back(tmp_path):
    for step in (4, 8, 12):
        _save_all(tmp_path, step, keep=3)
    step4 = tmp_path / "checkpoints" / "step_00000004"
    # resume=step_4: the leg continues from step 4; until its first checkpoint a crash must come back there, not
    # to the abandoned step 12 (resume=true, or resume=auto on an elastic restart).
    assert ckpt.rewind_latest(tmp_path, step4) is True
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000004"
    assert ckpt.prepare_output_dir(tmp_path, "auto", num_clients=2).name == "step_00000004"
    assert ckpt.prepare_output_dir(tmp_path, True, num_clients=2).name == "step_00000004"
    # The abandoned checkpoints are still on disk (resume=step_N names them) until the leg's first checkpoint.
    assert ckpt.prepare_output_dir(tmp_path, "step_12", num_clients=2).name == "step_00000012"
    assert ckpt.rewind_latest(tmp_path, step4) is False  # already there; a newer pointer is never moved forward
    # The leg re-saves step 8 with other values: a kill after client 0 renamed its directory into place must not
    # offer a step 8 that mixes the two legs.
    ckpt.write_client_state(tmp_path, 8, 0, {"w": torch.full((3,), -1.0)})
    assert ckpt.find_resume_checkpoint(tmp_path, client_ids=range(2)).name == "step_00000004"
    _save_all(tmp_path, 6, keep=3)  # the leg's first checkpoint: the abandoned ones go
    assert _names(tmp_path) == ["step_00000004", "step_00000006"]


def test_rewind_latest_sets_a_missing_pointer_and_never_moves_it_forward(tmp_path):
    _save_all(tmp_path, 4)
    _save_all(tmp_path, 8)
    (tmp_path / "checkpoints" / "latest").unlink()
    assert ckpt.rewind_latest(tmp_path, tmp_path / "checkpoints" / "step_00000004") is True
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000004"
    assert ckpt.rewind_latest(tmp_path, tmp_path / "checkpoints" / "step_00000008") is False
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000004"



def test_started_elsewhere_tells_another_launch_from_a_restart_of_this_one():
    from deca_ds.supervise import started_elsewhere

    me = {"host": "node0", "launcher": [4242, 1000]}
    assert not started_elsewhere({"launch": {"host": "node0", "launcher": [4242, 1000]}}, me)  # a restart of this one
    assert started_elsewhere({"launch": {"host": "node0", "launcher": [4242, 999]}}, me)  # same pid, another process
    assert started_elsewhere({"launch": {"host": "node0", "launcher": [17, 1000]}}, me)
    assert started_elsewhere({"launch": None}, me)  # a run started without a launcher
    assert not started_elsewhere({"launch": {"host": "node1", "launcher": [17, 1000]}}, me)  # another machine's
    assert not started_elsewhere({"config": {}}, me)  # written by an older version: cannot tell
    assert not started_elsewhere(None, me)

"""Checkpoints across legs of a real run: one ``recipes/finetune.py`` process (backend=launcher, one client), so
each launch costs a few seconds."""

import json
import subprocess
import sys

import pytest
from launch import FAST, RECIPE, ROOT, launch_env, torchrun_command

from deca_ds import checkpoint as ckpt

pytestmark = pytest.mark.integration


def _run(out, *args, timeout=300):
    return subprocess.run([sys.executable, RECIPE, "backend=launcher", f"output_dir={out}", *FAST, *args], cwd=ROOT,
                          env=launch_env(), capture_output=True, text=True, timeout=timeout)


def test_a_leg_resumed_from_an_older_checkpoint_is_what_a_crash_comes_back_to(tmp_path):
    """resume=step_4 in a run whose latest is step 8, then the leg dies before its first checkpoint (here: a learning
    rate that diverges, nan_policy=stop). The next resume=true/auto continues from step 4, where the leg went back
    to (and where metrics.jsonl was cut), not from the abandoned step 8."""
    out = tmp_path / "run"
    first = _run(out, "max_steps=8", "checkpoint_every=2", "keep_checkpoints=5")
    assert first.returncode == 0, first.stderr[-4000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    leg = _run(out, "resume=step_4", "max_steps=400", "checkpoint_every=0", "keep_checkpoints=5", "optim.lr=1e20")
    assert leg.returncode == 3 and "non-finite" in leg.stderr, leg.stderr[-4000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    for resume in ("auto", True):
        assert ckpt.prepare_output_dir(out, resume).name == "step_00000004"
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) < 8  # what metrics.jsonl holds agrees with the checkpoint a resume now continues


def _torchrun(out, *args, restarts=1):
    cmd = torchrun_command(RECIPE, "backend=launcher", f"output_dir={out}", *FAST, *args, nproc=1,
                           launcher_args=["--max-restarts", str(restarts)])
    return subprocess.Popen(cmd, cwd=ROOT, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _snapshot(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_an_elastic_restart_of_a_refused_launch_does_not_continue_the_run_already_there(tmp_path):
    """A new run (resume=false) under torchrun --max-restarts into an output_dir holding another run: the first
    start is refused (nothing changed) and so is the restart, instead of continuing that run with resume=auto and
    overwriting its summary.json, consensus model and run.json."""
    out = tmp_path / "run"
    first = _run(out, "max_steps=4")
    assert first.returncode == 0, first.stderr[-4000:]
    before = _snapshot(out)
    proc = _torchrun(out, "max_steps=8")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0, err[-4000:]
    assert err.count("already holds a run") == 2, err[-4000:]  # the first start and the restart
    assert "elastic restart 1: continuing" not in err
    assert _snapshot(out) == before


def test_an_elastic_restart_still_continues_its_own_run(tmp_path):
    """The worker of a torchrun --max-restarts 1 launch is killed after its first checkpoint: the restart continues
    the launch's own run from its checkpoint (run.json records both legs, the second resumed)."""
    import os
    import signal
    import time

    import psutil

    out = tmp_path / "run"
    proc = _torchrun(out, "max_steps=200", "checkpoint_every=2")
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoints" / "latest").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-4000:]
            time.sleep(0.05)
        workers = [c for c in psutil.Process(proc.pid).children(recursive=True)
                   if any(a.endswith("finetune.py") for a in c.cmdline())]
        assert workers
        for w in workers:
            os.kill(w.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err[-4000:]
    assert "elastic restart 1: continuing the run (resume=auto)" in err
    legs = ckpt.read_run_legs(out)
    assert len(legs) == 2 and legs[0]["resumed_from"] is None and legs[1]["resumed_from"] is not None
    assert legs[0]["launch"] == legs[1]["launch"] is not None


def test_resuming_a_finished_run_exits_0_and_changes_nothing(tmp_path):
    """A job rerun with resume=true after its run had finished (a scheduler cannot tell whether the kill came before
    the end) once trained nothing and rewrote summary.json with every client's final_loss null; then (3f89ea8) it
    exited 2, failing such a job. It succeeds without touching a file, saying so in one line."""
    from launch import torchrun

    out = tmp_path / "out"
    args = [f"output_dir={out}", "max_steps=4", "checkpoint_every=2", *FAST]
    torchrun(RECIPE, *args)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert json.loads((out / "summary.json").read_text())["clients"][0]["final_loss"] is not None
    res = torchrun(RECIPE, *args, "resume=true")  # exit 0 (checked)
    assert res.stderr.count("already finished") == 1 and "nothing left to do" in res.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

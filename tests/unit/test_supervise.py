"""deca_ds.supervise: which processes count as launchers, and telling when one is gone (killed, reaped or not)."""

import signal
import subprocess
import sys
import time

import pytest

from deca_ds import supervise


@pytest.mark.parametrize("argv, expected", [
    (["/venv/bin/python3", "/venv/bin/deepspeed", "--num_gpus", "2", "train.py"], True),      # deepspeed runner
    (["/venv/bin/python3", "-u", "-m", "deepspeed.launcher.launch", "--world_info=x"], True),  # its per-node launch
    (["/usr/bin/python", "-m", "torch.distributed.run", "--nproc_per_node", "4"], True),
    (["/venv/bin/python", "/venv/bin/torchrun", "--nproc_per_node", "4"], True),
    (["/venv/bin/python", "-u", "recipes/finetune.py", "max_steps=3"], False),                 # a worker
    (["bash", "-c", "torchrun is mentioned in a string but not run"], False),
    (["/venv/bin/python", "-u", "recipes/finetune.py", "--deepspeed", "ds.json"], False),     # flag, not launcher
])
def test_launchers_are_recognised_by_what_they_run(argv, expected):
    assert supervise._is_launcher(argv) is expected


def test_a_killed_launcher_is_gone_even_before_it_is_reaped():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stat = supervise._stat(child.pid)
        assert stat is not None
        watch = supervise.LauncherWatch([(child.pid, stat[1])])
        assert watch.gone() is None
        child.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while watch.gone() is None and time.monotonic() < deadline:  # a zombie until waited for
            time.sleep(0.01)
        assert watch.gone() == child.pid
    finally:
        child.kill()
        child.wait()
    assert supervise.LauncherWatch([(child.pid, stat[1])]).gone() == child.pid  # reaped: no such process


def test_a_reused_pid_is_not_the_launcher():
    me = supervise._stat(supervise.os.getpid())
    # Same pid, another start time: a later process that happens to get the launcher's pid.
    assert supervise.LauncherWatch([(supervise.os.getpid(), me[1] + 1)]).gone() == supervise.os.getpid()


def test_elastic_restart_count(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    assert supervise.elastic_restart_count() == 0
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    assert supervise.elastic_restart_count() == 2

"""A worker and the launcher above it: no worker outlives its launcher, and elastic restarts resume by themselves.

Why this exists: the ``deepspeed`` runner has no SIGTERM handler on a single machine, so ``kill <runner>`` ends it at
once while ``deepspeed.launcher.launch`` and every worker, orphaned, keep training and writing. torchrun forwards
SIGTERM to its workers, but a torchrun that is killed with SIGKILL leaves them running too. A worker therefore
records the launcher processes above it when it starts (:class:`LauncherWatch`) and, once any of them is gone,
stops the way SIGTERM stops it: the step finishes on every client, a checkpoint is written, the process exits.

Under ``torchrun --max-restarts=N`` the elastic agent restarts every worker when one dies; a restarted worker
continues the run from its newest complete checkpoint (:func:`elastic_restart_count`, used by the trainer to turn
``resume=false`` into ``resume=auto`` on restarts only, so that a fresh run never silently continues an old one).
Each leg of a run records the launch that started it (:func:`launch_identity`), so that the restart of a launch that
was refused because ``output_dir`` holds another run is refused again rather than continuing that run
(:func:`started_elsewhere`).

Linux only (``/proc``); elsewhere nothing is watched.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

__all__ = ["LauncherWatch", "launcher_ancestors", "elastic_restart_count", "launch_identity",
           "started_elsewhere"]

# Processes that launch deca_ds workers, recognised by their command line.
_LAUNCHER_MODULES = ("torch.distributed.run", "torch.distributed.launch", "deepspeed.launcher.launch",
                     "deepspeed.launcher.runner")
_LAUNCHER_SCRIPTS = ("torchrun", "deepspeed", "ds")


def _stat(pid: int) -> tuple[int, int] | None:
    """``(ppid, start time in clock ticks)`` of ``pid`` from /proc, or None when it does not run (no such process,
    or a zombie: a launcher that was killed stays a zombie until whoever started it reaps it)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after its closing parenthesis.
    fields = raw[raw.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), int(fields[19])


def _cmdline(pid: int) -> list[str]:
    try:
        return [a for a in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0") if a]
    except OSError:
        return []


def _is_launcher(argv: list[str]) -> bool:
    head = argv[:4]  # interpreter, maybe -u/-m, the module or script (not the program's own arguments)
    return any(a in _LAUNCHER_MODULES for a in head) or any(os.path.basename(a) in _LAUNCHER_SCRIPTS for a in head)


def launcher_ancestors(pid: int | None = None) -> list[tuple[int, int]]:
    """The launcher processes above ``pid`` (default: this process), nearest first, as ``(pid, start time)``.

    A process counts as a launcher when its command runs ``torchrun``/``torch.distributed.run``, the ``deepspeed``
    runner or ``deepspeed.launcher.launch``. The start time tells a launcher from a later process given its pid.
    """
    found = []
    stat = _stat(os.getpid() if pid is None else pid)
    seen = set()
    while stat is not None and stat[0] > 1 and stat[0] not in seen:
        parent = stat[0]
        seen.add(parent)
        stat = _stat(parent)
        if stat is not None and _is_launcher(_cmdline(parent)):
            found.append((parent, stat[1]))
    return found


class LauncherWatch:
    """Whether a launcher this worker started under has gone (killed, crashed, or exited early)."""

    def __init__(self, ancestors: list[tuple[int, int]] | None = None):
        """Args:
            ancestors: ``(pid, start time)`` of the launchers to watch (default: :func:`launcher_ancestors`).
        """
        self.ancestors = launcher_ancestors() if ancestors is None else list(ancestors)

    def gone(self) -> int | None:
        """The pid of a watched launcher that no longer runs, or None while all of them do (cheap: one /proc
        read per launcher)."""
        for pid, start in self.ancestors:
            stat = _stat(pid)
            if stat is None or stat[1] != start:
                return pid
        return None


def elastic_restart_count() -> int:
    """How many times torchrun's elastic agent has restarted this run's workers (0 on the first start and
    outside torchrun)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def launch_identity() -> dict[str, Any] | None:
    """This worker's launch: the host and the nearest launcher above it as ``(pid, start time)``, the same for
    every restart of one ``torchrun`` (its agent restarts the workers) and different for another launch. None
    outside a launcher (or without /proc)."""
    ancestors = launcher_ancestors()
    if not ancestors:
        return None
    return {"host": socket.gethostname(), "launcher": list(ancestors[0])}


def started_elsewhere(leg: dict[str, Any] | None, identity: dict[str, Any] | None = None) -> bool:
    """Whether ``leg`` (a ``run.json`` record) was provably started by another launch on this host.

    True for a leg started under another launcher on this host, or without any launcher (``launch`` is null). False
    when it cannot tell: no leg, a leg that does not record its launch (older versions), one recorded on another
    host (the other machines of a multi-machine launch), or no launcher above this worker.

    Args:
        leg: the run's last leg, or None.
        identity: this worker's launch (default: :func:`launch_identity`).
    """
    identity = launch_identity() if identity is None else identity
    if identity is None or not leg or "launch" not in leg:
        return False
    launch = leg["launch"]
    if launch is None:
        return True
    if not isinstance(launch, dict) or launch.get("host") != identity["host"]:
        return False
    return launch.get("launcher") != identity["launcher"]

"""Crash-safe per-client checkpoints and the output-directory guard.

Layout under ``output_dir/checkpoints``::

    step_00000096/client_0/state.pt     one directory per client, written by the client's first rank
    step_00000096/client_1/state.pt
    latest                              text file naming the newest complete step directory; changed last

Each client writes into ``client_<c>.tmp``, fsyncs, and renames it to ``client_<c>`` (atomic). Only after every
client has finished (a barrier) does ``latest`` move, through a temporary file and ``os.replace``. A run killed at
any moment therefore leaves ``latest`` on a complete checkpoint; half-written ``.tmp`` directories are ignored and
cleaned up by the next save. Clients never read each other's directories, so the layout also works when each
machine has its own disk (each then holds its own clients' directories).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from deca_ds.config import ConfigError

RUN_MARKER = "run.json"


def prepare_output_dir(output_dir: str | os.PathLike, resume: bool) -> None:
    """Refuse to start over an existing run unless resuming; never deletes anything.

    Raises:
        ConfigError: ``output_dir`` holds a run (finished or running) and ``resume`` is false, or ``resume`` is
            true and there is no complete checkpoint to resume from.
    """
    out = Path(output_dir)
    has_run = any((out / name).exists() for name in (RUN_MARKER, "checkpoints", "summary.json", "metrics.jsonl"))
    if has_run and not resume:
        raise ConfigError(f"output_dir={str(out)!r} already holds a run: pass resume=true to continue it, or choose "
                          "another output_dir (nothing there was changed)")
    if resume and has_run and latest_checkpoint(out) is None:
        raise ConfigError(f"resume=true but output_dir={str(out)!r} has no complete checkpoint: start a new run "
                          "in another output_dir")


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint directory, or None."""
    ckpt = Path(output_dir) / "checkpoints"
    pointer = ckpt / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = ckpt / name
    return path if path.is_dir() else None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def step_dir_name(step: int) -> str:
    """Directory name of the checkpoint taken after ``step`` optimizer steps."""
    return f"step_{step:08d}"


def write_client_state(output_dir: str | os.PathLike, step: int, client_id: int, state: dict[str, Any]) -> Path:
    """Write one client's state atomically (temporary directory, fsync, rename).

    Args:
        output_dir: run directory.
        step: optimizer steps completed.
        client_id: the writing client.
        state: anything ``torch.save`` accepts.

    Returns:
        The final client directory.
    """
    step_dir = Path(output_dir) / "checkpoints" / step_dir_name(step)
    step_dir.mkdir(parents=True, exist_ok=True)
    final = step_dir / f"client_{client_id}"
    tmp = step_dir / f"client_{client_id}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    with open(tmp / "state.pt", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():  # a re-save of the same step (e.g. final save right after a periodic one)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(step_dir)
    return final


def publish_checkpoint(output_dir: str | os.PathLike, step: int, client_id: int, keep: int) -> None:
    """Point ``latest`` at ``step`` and prune this client's older checkpoints, keeping ``keep`` complete ones.

    Call only after every client has written ``step`` (a barrier). Safe to call from several writers: the pointer
    is replaced atomically with identical content, and each client deletes only its own directories.
    """
    ckpt = Path(output_dir) / "checkpoints"
    _atomic_write_text(ckpt / "latest", step_dir_name(step) + "\n")
    current = step_dir_name(step)
    steps = sorted(p for p in ckpt.glob("step_*") if p.is_dir() and p.name <= current)
    # Directories past this step are leftovers of a run killed mid-save before a resume: never complete.
    newer = [p for p in ckpt.glob("step_*") if p.is_dir() and p.name > current]
    for old in steps[:-keep] + newer:
        for child in (old / f"client_{client_id}", old / f"client_{client_id}.tmp"):
            if child.exists():
                shutil.rmtree(child, ignore_errors=True)
        try:
            old.rmdir()  # only once every client has removed its part
        except OSError:
            pass
    for stale in ckpt.glob(f"step_*/client_{client_id}.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def read_client_state(checkpoint: Path, client_id: int) -> dict[str, Any]:
    """Load one client's state from a complete checkpoint directory.

    Raises:
        ConfigError: the checkpoint lacks this client (e.g. resumed with a different number of clients).
    """
    path = Path(checkpoint) / f"client_{client_id}" / "state.pt"
    if not path.is_file():
        raise ConfigError(f"resume=true: {str(checkpoint)!r} has no state for client {client_id}: resume with the "
                          "same number of clients and ranks_per_client as the original run")
    return torch.load(path, map_location="cpu", weights_only=False)


def all_finite(tensors) -> bool:
    """True when every tensor holds only finite values (checked before anything is written)."""
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def save_checkpoint(output_dir, step: int, client_id: int, is_writer: bool, state_fn: Callable[[], dict],
                    keep: int, barrier: Callable[[], None]) -> None:
    """Collective: every rank calls it; the client's writer rank writes, then ``latest`` moves after a barrier."""
    if is_writer:
        write_client_state(output_dir, step, client_id, state_fn())
    barrier()
    if is_writer:
        publish_checkpoint(output_dir, step, client_id, keep)
    barrier()

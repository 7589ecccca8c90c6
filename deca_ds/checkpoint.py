"""Crash-safe per-client checkpoints, the output-directory guard, resume selection and the run's record of legs.

Layout under ``output_dir/checkpoints``::

    step_00000096/client_0/state.pt     one directory per client, written by the client's first rank
    step_00000096/client_1/state.pt
    latest                              text file naming the newest complete step directory; changed last

Each client writes into ``client_<c>.tmp``, fsyncs, and renames it to ``client_<c>`` (atomic). Only after every
client has finished (a barrier) does ``latest`` move, through a temporary file and ``os.replace``. A run killed at
any moment therefore leaves ``latest`` on a complete checkpoint; half-written ``.tmp`` directories are ignored and
cleaned up by the next save. Clients never read each other's directories, so the layout also works when each
machine has its own disk (each then holds its own clients' directories).

Loading never unpickles arbitrary objects: ``torch.load(weights_only=True)``. Every checkpoint deca_ds writes holds
only tensors and plain Python values (dicts, lists, tuples, str, int, float, bool, None), which torch's weights-only
unpickler accepts by default, so no type is added to its allow-list (``torch.serialization.add_safe_globals``):
measured with ``torch.serialization.get_unsafe_globals_in_checkpoint`` on the ``state.pt`` of every engine (stage 0
with reset, and with int8 offload, random order and a DeepSpeed LR scheduler; centralized AdamW; ZeRO-2; ZeRO-3 with
int8 offload), all empty. A file holding anything else is refused, naming it.

Resuming continues the same run: :func:`compare_run_settings` says which settings may change between legs and which
define the run, and ``run.json`` keeps one record per leg (:func:`append_run_leg`), never overwritten. Within one
launch the machines must share those settings too (:func:`compare_machine_settings`, checked at start-up).
"""

from __future__ import annotations

import datetime
import json
import os
import pickle
import re
import shutil
import sys
import threading
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from deca_ds.config import ConfigError, RunConfig

RUN_MARKER = "run.json"
RUN_FORMAT = "deca_ds.run/2"
_STEP_DIR = re.compile(r"step_(\d{8})")
_CLIENT_DIR = re.compile(r"client_(\d+)")


class CheckpointError(ConfigError):
    """A checkpoint or run record is missing, incomplete or unreadable; the message names the file and the fix.

    A :class:`ConfigError` so that the recipe reports it like any other refusal (one line, exit code 2).
    """


def _warn(message: str) -> None:
    """One line on stderr, from rank 0 only (every rank resolves the same checkpoint)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"deca_ds: warning: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Output directory


def _check_writable(out: Path) -> None:
    """``out`` is a writable directory, or can be created as one."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir={str(out)!r} is a file, not a directory: choose another output_dir")
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"output_dir={str(out)!r} cannot be created: {str(probe)!r} is a file; choose another "
                          "output_dir")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "is not writable" if probe == out else f"cannot be created: {str(probe)!r} is not writable"
        raise ConfigError(f"output_dir={str(out)!r} {what}; choose a directory you can write to")


def _resume_select(resume: bool | str) -> str | None:
    """``False`` -> None, ``True`` -> ``"latest"``; ``"auto"`` and ``"step_N"`` as given."""
    if resume is False or resume is None:
        return None
    return "latest" if resume is True else str(resume)


def prepare_output_dir(output_dir: str | os.PathLike, resume: bool | str,
                       num_clients: int | None = None, warn: Callable[[str], None] | None = None) -> Path | None:
    """Check ``output_dir`` before anything starts; never writes or deletes anything.

    Args:
        output_dir: the run directory.
        resume: ``False`` (a new run), ``True`` (the newest complete checkpoint), ``"auto"`` (that, or a new run
            when no checkpoint was ever published) or ``"step_N"`` (exactly that checkpoint).
        num_clients: clients of the run, to check that a checkpoint holds every client's state; None: the number
            ``run.json`` records (see :func:`find_resume_checkpoint`).
        warn: receives one line per damaged checkpoint skipped (default: silent, since the training loop resolves
            the checkpoint again and warns then).

    Returns:
        The checkpoint directory to resume from, or None for a run from step 0.

    Raises:
        ConfigError: ``output_dir`` is a file or not writable; it holds a run and ``resume`` is false; ``resume``
            is true or ``step_N`` and there is nothing to resume (the message says so).
        CheckpointError: checkpoints exist but none is complete, or ``step_N`` is missing or incomplete.
    """
    out = Path(output_dir)
    _check_writable(out)
    has_run = out.is_dir() and any((out / name).exists()
                                   for name in (RUN_MARKER, "checkpoints", "summary.json", "metrics.jsonl"))
    select = _resume_select(resume)
    # A simulator run never writes a checkpoint: "pass resume=true" would only lead to a second, misleading refusal.
    simulated = has_run and _simulated_run(out)
    if select is None:
        if simulated:
            raise ConfigError(f"output_dir={str(out)!r} already holds a run (backend=simulate, which writes no "
                              "checkpoint to resume): choose another output_dir (nothing there was changed)")
        if has_run:
            raise ConfigError(f"output_dir={str(out)!r} already holds a run: pass resume=true to continue it, or "
                              "choose another output_dir (nothing there was changed)")
        return None
    shown = str(resume).lower() if isinstance(resume, bool) else resume
    if not has_run:
        if select == "auto":
            return None
        raise ConfigError(f"resume={shown} but output_dir={str(out)!r} holds no run to resume: drop resume={shown} to "
                          "start a new run there")
    client_ids = range(num_clients) if num_clients is not None else None
    found = find_resume_checkpoint(out, "latest" if select == "auto" else select, client_ids=client_ids, warn=warn)
    if found is None and select != "auto":
        if simulated:
            raise ConfigError(f"resume={shown} but output_dir={str(out)!r} holds a backend=simulate run, which writes "
                              "no checkpoints: start a new run in another output_dir")
        raise ConfigError(f"resume={shown} but output_dir={str(out)!r} has no complete checkpoint (the run stopped "
                          "before its first one): start a new run in another output_dir")
    return found


def _simulated_run(out: Path) -> bool:
    """Whether ``out`` holds a ``backend=simulate`` run (its last ``run.json`` leg says so, no checkpoints)."""
    if (out / "checkpoints").exists():
        return False
    try:
        legs = read_run_legs(out)
    except CheckpointError:  # a damaged run.json: the generic refusal (and later the resume check) names it
        return False
    return bool(legs) and legs[-1].get("backend") == "simulate"


# ---------------------------------------------------------------------------------------------------------------
# Finding a checkpoint to resume from


def step_dir_name(step: int) -> str:
    """Directory name of the checkpoint taken after ``step`` optimizer steps."""
    return f"step_{step:08d}"


def _pointer(ckpt: Path) -> str | None:
    """The step directory name ``latest`` holds, or None when it is missing or not a step name."""
    try:
        name = (ckpt / "latest").read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if _STEP_DIR.fullmatch(name) else None


def latest_checkpoint(output_dir: str | os.PathLike, warn: Callable[[str], None] | None = _warn) -> Path | None:
    """The newest complete checkpoint: :func:`find_resume_checkpoint` with ``select="latest"`` for the clients
    ``run.json`` records; None when no checkpoint was ever published.

    Raises:
        CheckpointError: ``latest`` exists but no checkpoint is complete.
    """
    return find_resume_checkpoint(output_dir, "latest", warn=warn)


def _step_dirs(ckpt: Path) -> list[Path]:
    return sorted((p for p in ckpt.glob("step_*") if p.is_dir() and _STEP_DIR.fullmatch(p.name)), reverse=True)


def _clients_in(step_dir: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in step_dir.iterdir() if p.is_dir() and (m := _CLIENT_DIR.fullmatch(p.name)))


def _select_step(select: str) -> str:
    m = re.fullmatch(r"step_(\d+)", select)
    if m is None:
        raise ValueError(f"select={select!r}: use 'latest' or 'step_N'")
    return step_dir_name(int(m.group(1)))


def _recorded_clients(out: Path) -> list[int] | None:
    """``range`` of the clients the last leg in ``run.json`` records, or None when unreadable or not recorded."""
    try:
        legs = read_run_legs(out)
    except CheckpointError:
        return None
    n = _num_clients(legs[-1]) if legs else None
    return list(range(n)) if isinstance(n, int) and n > 0 else None


def resume_candidates(output_dir: str | os.PathLike, select: str = "latest") -> list[Path]:
    """Step directories to try, newest first: for ``"latest"`` the one ``latest`` names and every older one (all of
    them when ``latest`` is missing); for ``"step_N"`` that one alone (when it exists)."""
    ckpt = Path(output_dir) / "checkpoints"
    if not ckpt.is_dir():
        return []
    if select != "latest":
        path = ckpt / _select_step(select)
        return [path] if path.is_dir() else []
    pointer = _pointer(ckpt)
    return [p for p in _step_dirs(ckpt) if pointer is None or p.name <= pointer]


def _archive_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete ``torch.save`` archive, or None. Reads the zip directory, not the tensors."""
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        return f"{path} is truncated or corrupt (not a complete torch.save archive: {str(e).splitlines()[0][:80]})"
    if not any(i.filename.endswith("data.pkl") for i in infos):
        return f"{path} is not a torch.save archive (no data.pkl)"
    for info in infos:
        if info.header_offset + len(info.filename) + 30 + info.compress_size > size:
            return f"{path} is truncated (member {info.filename} runs past the end of the file)"
    return None


def checkpoint_problem(step_dir: str | os.PathLike, client_ids: Iterable[int]) -> str | None:
    """Why ``step_dir`` cannot be resumed by ``client_ids``, or None when every one has a complete ``state.pt``.

    Cheap: it reads each file's zip directory (a file cut short loses it), not the tensors; damage inside the
    tensor data is found when the state is loaded (:func:`read_client_state`).
    """
    step_dir = Path(step_dir)
    for c in client_ids:
        client = step_dir / f"client_{c}"
        if not client.is_dir():
            return f"{client} is missing"
        state = client / "state.pt"
        if not state.is_file():
            return f"{state} is missing"
        problem = _archive_problem(state)
        if problem:
            return problem
    return None


def find_resume_checkpoint(output_dir: str | os.PathLike, select: str = "latest",
                           client_ids: Iterable[int] | None = None,
                           warn: Callable[[str], None] | None = _warn) -> Path | None:
    """The checkpoint to resume from: the newest complete one, or the one ``select`` names.

    ``"latest"``: the step ``checkpoints/latest`` names when it is complete for every client, else the newest older
    complete one, with a warning naming each damaged checkpoint skipped. ``"step_N"``: exactly that checkpoint.

    Args:
        output_dir: the run directory.
        select: ``"latest"`` or ``"step_N"`` (e.g. ``"step_96"``: the checkpoint taken after step 96).
        client_ids: clients whose state must be there, normally ``range(num_clients)`` (with one disk per machine:
            the clients on this machine, agreeing with the other machines through a collective). None: the number
            of clients the last leg in ``run.json`` records, else the clients found in the checkpoint ``latest``
            names.
        warn: receives one line per checkpoint skipped (None: silent).

    Returns:
        The step directory, or None when no checkpoint was ever published (``latest`` missing and, when
        ``client_ids`` is given, no complete step directory).

    Raises:
        CheckpointError: ``select="step_N"`` is missing or incomplete; or ``latest`` exists but no checkpoint is
            complete. The message names the damaged file and the fix.
    """
    out = Path(output_dir)
    ckpt = out / "checkpoints"
    pointer = _pointer(ckpt) if ckpt.is_dir() else None
    ids = None if client_ids is None else list(client_ids)
    if select != "latest":
        name = _select_step(select)
        path = ckpt / name
        if not path.is_dir():
            have = ", ".join(p.name for p in _step_dirs(ckpt)) if ckpt.is_dir() else ""
            if not have:  # "or resume=true" would only be refused in turn: there is nothing to resume
                raise CheckpointError(f"resume={select}: {path} does not exist and output_dir holds no checkpoint: "
                                      "start a new run in another output_dir")
            raise CheckpointError(f"resume={select}: {path} does not exist: use one of {have} or resume=true")
        problem = checkpoint_problem(path, ids if ids is not None else _clients_in(path))
        if problem:
            raise CheckpointError(f"resume={select}: checkpoint {name} is incomplete ({problem}): choose another "
                                  "step_N, or resume=true for the newest complete one")
        return path
    if ids is None:
        ids = _recorded_clients(out)
    if ids is None:
        if pointer is None or not (ckpt / pointer).is_dir():
            return None  # without the pointer nobody can tell how many clients a checkpoint must hold
        ids = _clients_in(ckpt / pointer)
    skipped = []
    if pointer is not None and not (ckpt / pointer).is_dir():
        skipped.append((pointer, f"{ckpt / pointer}, which checkpoints/latest names, is missing"))
    for path in resume_candidates(out, "latest"):
        problem = checkpoint_problem(path, ids) if ids else f"{path} holds no client state"
        if problem is None:
            if warn is not None:
                for name, why in skipped:
                    warn(f"checkpoint {name} is incomplete ({why}); resuming from the older complete {path.name}")
            return path
        skipped.append((path.name, problem))
    if pointer is None:
        return None
    why = "; ".join(f"{name}: {problem}" for name, problem in skipped) or f"{ckpt / pointer} is missing"
    raise CheckpointError(f"resume: no complete checkpoint in {ckpt} ({why}): resume with the number of clients the "
                          "run had, or start a new run in another output_dir")


# ---------------------------------------------------------------------------------------------------------------
# Writing and reading client states


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
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")  # unique per writer
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_client_state(output_dir: str | os.PathLike, step: int, client_id: int, state: dict[str, Any]) -> Path:
    """Write one client's state atomically (temporary directory, fsync, rename).

    If writing fails (a full disk, an object ``torch.save`` refuses), the temporary directory is removed and the
    error propagates: nothing is renamed into place.

    Args:
        output_dir: run directory.
        step: optimizer steps completed.
        client_id: the writing client.
        state: tensors and plain Python values (what :func:`read_client_state` can load back).

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
    try:
        with open(tmp / "state.pt", "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        # torch.save reports a full disk as "RuntimeError: [enforce fail at inline_container.cc] unexpected pos"
        # with the OSError only in the context: surface the OSError, naming the file, so the run ends with the
        # disk's one-line error (deca_ds.errors.describe_fault) rather than a traceback.
        cause = err.__context__
        if not isinstance(err, OSError) and isinstance(cause, OSError):
            raise OSError(cause.errno, cause.strerror, str(final / "state.pt")) from err
        raise
    if final.exists():  # a re-save of the same step (e.g. final save right after a periodic one)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(step_dir)
    return final


def read_latest_pointer(output_dir: str | os.PathLike) -> str | None:
    """The step directory name ``checkpoints/latest`` names now (None: no pointer yet), as
    :func:`publish_checkpoint` needs it from before the save's barrier."""
    return _pointer(Path(output_dir) / "checkpoints")


def publish_checkpoint(output_dir: str | os.PathLike, step: int, client_id: int, keep: int, *,
                       previous: str | None) -> None:
    """Point ``latest`` at ``step`` and prune this client's older checkpoints, keeping ``keep`` complete ones.

    Call only after every client has written ``step`` (a barrier). Safe to call from several writers: the pointer
    is replaced atomically with identical content, and each client deletes only its own directories.

    Step directories that were never published are not checkpoints: those past ``step`` and those between the
    step ``latest`` named before this save and ``step`` (leftovers of a run killed mid-save before a resume). They
    are deleted and never count towards ``keep``, so a leftover never displaces a complete checkpoint.

    Args:
        output_dir: run directory.
        step: the step every client has just written.
        client_id: the publishing client (only its own directories are deleted).
        keep: complete checkpoints to keep (this one included).
        previous: the step directory name ``latest`` held before this save began (None: no pointer), read with
            :func:`read_latest_pointer` before the barrier, as :func:`save_checkpoint` does. Required: read here,
            after another client had published, it would already name ``step``, and leftovers of a killed save
            would then count as checkpoints and displace a complete one (this client's part of it deleted).
    """
    ckpt = Path(output_dir) / "checkpoints"
    _atomic_write_text(ckpt / "latest", step_dir_name(step) + "\n")
    current = step_dir_name(step)
    dirs = [p for p in ckpt.glob("step_*") if p.is_dir() and _STEP_DIR.fullmatch(p.name)]
    # Directories past this step, or past the previous pointer, are leftovers of a run killed mid-save before a
    # resume: never published, so never counted as checkpoints (an unknown pointer deletes nothing below step).
    leftovers = [p for p in dirs if p.name > current or (previous is not None and previous < p.name < current)]
    steps = sorted(p for p in dirs if p.name <= current and p not in leftovers)
    for old in steps[:-keep] + leftovers:
        for child in (old / f"client_{client_id}", old / f"client_{client_id}.tmp"):
            if child.exists():
                shutil.rmtree(child, ignore_errors=True)
        try:
            old.rmdir()  # only once every client has removed its part
        except OSError:
            pass
    for stale in ckpt.glob(f"step_*/client_{client_id}.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def rewind_latest(output_dir: str | os.PathLike, checkpoint: str | os.PathLike) -> bool:
    """Point ``latest`` back at ``checkpoint`` when it names a newer step (or is missing or unreadable): the run
    continues from ``checkpoint``.

    A leg that resumes from a checkpoint older than the one ``latest`` names (``resume=step_N``, or a damaged newest
    checkpoint skipped) abandons the newer ones. Left as they were, ``latest`` would still name them until the leg's
    first checkpoint, so a crash before it (then ``resume=true``, or an elastic restart's ``resume=auto``) would
    continue the abandoned steps, and the leg's re-save of such a step would, once its first client renamed its
    directory into place, offer a checkpoint mixing the two legs. The newer directories stay on disk (still
    loadable with ``resume=step_N``) until the leg's first checkpoint deletes them (:func:`publish_checkpoint`).
    Safe to call from every client's writer rank (the same content is written atomically).

    Args:
        output_dir: run directory.
        checkpoint: the step directory the leg resumed from.

    Returns:
        Whether ``latest`` was moved.
    """
    ckpt = Path(output_dir) / "checkpoints"
    name = Path(checkpoint).name
    pointer = _pointer(ckpt)
    if not _STEP_DIR.fullmatch(name) or (pointer is not None and pointer <= name):
        return False  # a missing or unreadable pointer would make every step directory a candidate: set it
    _atomic_write_text(ckpt / "latest", name + "\n")
    return True


def read_client_state(checkpoint: Path, client_id: int) -> dict[str, Any]:
    """Load one client's state from a checkpoint directory, with torch's weights-only unpickler.

    Raises:
        CheckpointError: the client's directory or ``state.pt`` is missing (e.g. resumed with a different number of
            clients), the file is truncated or corrupt, or it holds an object weights-only loading refuses. The
            message names the file.
    """
    client = Path(checkpoint) / f"client_{client_id}"
    path = client / "state.pt"
    if not path.is_file():
        missing = client if not client.is_dir() else path
        raise CheckpointError(f"resume: {missing} is missing (no state for client {client_id}): resume with the same "
                              "number of clients and ranks_per_client as the original run")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as e:
        text = " ".join(str(e).split())
        weights_only = "Weights only load failed" in text
        # torch names the refused type "Unsupported global: GLOBAL x.y" or "unsupported GLOBAL x.y whose module ..."
        unsafe = re.search(r"GLOBAL ([\w.]+)", text) if weights_only else None
        cause = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", text) if weights_only else None
        text = cause.group(1) if cause else text  # e.g. "Unsupported operand 255" for bytes that are not a pickle
        if unsafe:
            raise CheckpointError(f"resume: {path} holds a Python object weights-only loading refuses "
                                  f"({unsafe.group(1)}): deca_ds checkpoints hold only tensors and plain values; never "
                                  f"load a file you did not write (delete {Path(checkpoint)} and resume=true falls "
                                  "back to the newest complete checkpoint)") from None
        raise CheckpointError(f"resume: {path} is truncated or corrupt ({text[:160] or type(e).__name__}): delete "
                              f"{Path(checkpoint)} and resume=true falls back to the newest complete checkpoint") \
            from None


def all_finite(tensors) -> bool:
    """True when every tensor holds only finite values (checked before anything is written)."""
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def save_checkpoint(output_dir, step: int, client_id: int, is_writer: bool, state_fn: Callable[[], dict],
                    keep: int, barrier: Callable[[], None]) -> None:
    """Collective: every rank calls it; the client's writer rank writes, then ``latest`` moves after a barrier."""
    # Read before the barrier: after it, another client may already have moved ``latest`` to this step.
    previous = read_latest_pointer(output_dir) if is_writer else None
    if is_writer:
        write_client_state(output_dir, step, client_id, state_fn())
    barrier()
    if is_writer:
        publish_checkpoint(output_dir, step, client_id, keep, previous=previous)
    barrier()


# ---------------------------------------------------------------------------------------------------------------
# The run's record: one leg per start, and what may change between legs

# Settings a resumed leg may change; they are applied from the resumed step on and recorded in its leg. Everything
# else defines the run (clients, ranks, blocks, method, DECA, topology, data split, model, seeds, optimizer
# hyperparameters, DeepSpeed batch/precision/ZeRO settings) and must match, or the resume is refused.
CHANGEABLE_SETTINGS = frozenset({
    "max_steps", "checkpoint_every", "keep_checkpoints", "comm_timeout", "log_every", "eval_every", "output_dir",
    "resume", "nan_policy", "ds_config",  # ds_config is the path; its contents are compared key by key
    "data.eval_examples", "model.save_client_models", "model.gradient_checkpointing", "gossip.chunk_mb",
    "simulate.device", "simulate.park_replicas", "optim.lr", "optim.fused_backward",
})
"""Dotted settings that may differ between legs. ``optim.lr`` may change (e.g. continuing at a lower rate) unless a
ds_config ``scheduler`` owns the learning rate; the resumed leg must then use the new value, not the checkpoint's.
``model.gradient_checkpointing``, ``gossip.chunk_mb`` and ``optim.fused_backward`` (bit-identical steps) change memory,
not results."""
CHANGEABLE_DS_KEYS = frozenset({
    "steps_per_print", "wall_clock_breakdown", "memory_breakdown", "dump_state", "tensorboard", "csv_monitor", "wandb",
    "comet", "monitor_config", "flops_profiler", "comms_logger", "activation_checkpointing",
})
"""ds_config keys that only log or save memory; every other ds_config key must match between legs."""


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def _num_clients(record: dict[str, Any]) -> int | None:
    if record.get("num_clients") is not None:
        return record["num_clients"]
    config = record.get("config", {})
    if record.get("world_size") is not None:
        return record["world_size"] // ((config.get("clients") or {}).get("ranks_per_client") or 1)
    return config.get("num_clients")


def run_record(cfg: RunConfig, ds_config: dict[str, Any] | None, world_size: int | None,
               num_clients: int | None, **extra: Any) -> dict[str, Any]:
    """The record of one leg of a run, as :func:`append_run_leg` stores it and :func:`compare_run_settings` reads it.

    Args:
        cfg: the leg's settings.
        ds_config: the DeepSpeed config dict in use (after filling), or None.
        world_size: ranks launched (None in the simulator).
        num_clients: clients of the run.
        **extra: more fields, e.g. ``backend="simulate"``, ``resumed_from="step_00000096"``.
    """
    return {"config": cfg.to_dict(), "ds_config": ds_config, "world_size": world_size, "num_clients": num_clients,
            **extra}


def _filled_batch(record: dict[str, Any]) -> dict[str, Any]:
    """The record's ds_config with DeepSpeed's derived batch keys filled (older run.json files lack some)."""
    from deca_ds.ds_config import check_batch_sizes

    ds = dict(record.get("ds_config") or {})
    config = record.get("config") or {}
    group = (config.get("clients") or {}).get("ranks_per_client") or 1
    if config.get("method") == "centralized":
        group = record.get("world_size") or ((_num_clients(record) or 0) * group) or None
    if group:
        try:
            check_batch_sizes(ds, int(group))
        except (ConfigError, ValueError):
            pass  # compared as written
    return ds


def compare_run_settings(stored: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Which differences between a stored leg and a new one refuse the resume, and which are allowed changes.

    Args:
        stored: the run's last leg (:func:`read_run_legs`; an old single-object ``run.json`` works too).
        new: the leg about to start (:func:`run_record`).

    Returns:
        ``(refused, changed)``: each a sorted list of ``"setting: old -> new"``. ``refused`` names every setting
        that defines the run and differs (number of clients, world size, any setting outside
        :data:`CHANGEABLE_SETTINGS`, any ds_config key outside :data:`CHANGEABLE_DS_KEYS`, and ``optim.lr`` when a
        ds_config ``scheduler`` sets the rate); ``changed`` the allowed differences. A setting the stored leg does
        not record (written by an older version) counts as its current default.
    """
    refused, changed = [], []
    for key in ("num_clients", "world_size"):
        old, now = (_num_clients(stored), _num_clients(new)) if key == "num_clients" else (
            stored.get(key), new.get(key))
        if old is not None and now is not None and old != now:
            refused.append(f"{key}: {old!r} -> {now!r}")
    defaults = _flatten(RunConfig().to_dict())
    old_cfg, new_cfg = _flatten(stored.get("config") or {}), _flatten(new.get("config") or {})
    for cfg in (old_cfg, new_cfg):
        # topology.p is the Erdos-Renyi edge probability only. Versions before it could be left unset recorded
        # 0.5 for every graph; for another graph that value was never used, so it is not a difference.
        if cfg.get("topology.name", defaults.get("topology.name")) != "erdos_renyi":
            cfg["topology.p"] = None
    scheduled = any("scheduler" in (r.get("ds_config") or {}) for r in (stored, new))
    for key in sorted(set(old_cfg) | set(new_cfg)):
        if key == "num_clients":  # compared above as the run's count; the setting may be unset in one leg
            continue
        old, now = old_cfg.get(key, defaults.get(key)), new_cfg.get(key, defaults.get(key))
        if old == now:
            continue
        line = f"{key}: {old!r} -> {now!r}"
        if key in CHANGEABLE_SETTINGS and not (key == "optim.lr" and scheduled):
            changed.append(line)
        else:
            refused.append(line + (" (the ds_config scheduler sets the learning rate)" if key == "optim.lr" else ""))
    old_ds, new_ds = _filled_batch(stored), _filled_batch(new)
    for key in sorted(set(old_ds) | set(new_ds)):
        old, now = old_ds.get(key), new_ds.get(key)
        if old == now:
            continue
        line = f"ds_config.{key}: {json.dumps(old)} -> {json.dumps(now)}"
        (changed if key in CHANGEABLE_DS_KEYS else refused).append(line)
    return sorted(refused), sorted(changed)


def check_run_settings(stored: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """:func:`compare_run_settings`, raising when the resume must be refused; returns the allowed changes.

    Raises:
        ConfigError: one line naming every setting that defines the run and differs, and the fix.
    """
    refused, changed = compare_run_settings(stored, new)
    if refused:
        raise ConfigError(f"resume refused: settings that define the run differ from the run in output_dir "
                          f"({'; '.join(refused)}): resume with the stored values (see run.json), or start a new run "
                          "in another output_dir")
    return changed


MACHINE_SETTINGS = frozenset({
    "output_dir", "data.path", "model.path", "ds_config", "topology.path", "comm_timeout", "resume",
})
"""Dotted settings each machine of one launch may set for itself (paths on its own disk, its patience, whether it
resumes: the ranks agree on the checkpoint separately); every other setting, the model's architecture, the client
graph and every ds_config key outside :data:`CHANGEABLE_DS_KEYS` must be equal on every machine
(:func:`compare_machine_settings`)."""
_UNSET = "(unset)"


def machine_settings(cfg: RunConfig, ds_config: dict[str, Any] | None, world_size: int | None,
                     num_clients: int | None, architecture: dict[str, Any] | None = None,
                     graph: str | None = None) -> dict[str, Any]:
    """The settings of one rank that every rank of a launch must share, flat (``"optim.lr": 0.01``).

    The run's record (:func:`run_record`) without :data:`MACHINE_SETTINGS` and without the ds_config keys that only
    log (:data:`CHANGEABLE_DS_KEYS`), plus the model's architecture and the client graph.

    Args:
        cfg: this machine's settings.
        ds_config: the DeepSpeed config dict in use (after filling), or None.
        world_size: ranks launched.
        num_clients: clients of the run.
        architecture: the model's ``config.json`` content (or the embedded default's), compared key by key as
            ``model.architecture.<key>``.
        graph: a digest of the client graph's mixing matrices (None: the method does not gossip).

    Returns:
        Dotted setting -> value (plain JSON-serializable values).
    """
    record = run_record(cfg, ds_config, world_size, num_clients)
    flat = {k: v for k, v in _flatten(record["config"]).items() if k not in MACHINE_SETTINGS}
    flat.update(world_size=world_size, num_clients=num_clients)
    ds = {k: v for k, v in (record["ds_config"] or {}).items() if k not in CHANGEABLE_DS_KEYS}
    flat.update(_flatten(ds, "ds_config."))
    if architecture is not None:
        flat.update(_flatten(architecture, "model.architecture."))
    flat["topology.graph"] = graph
    return flat


def settings_digest(settings: dict[str, Any]) -> int:
    """A 56-bit digest of :func:`machine_settings` (equal settings give equal digests on every machine)."""
    import hashlib

    text = json.dumps(settings, sort_keys=True, default=repr)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "big")


def _rank_list(ranks: list[int]) -> str:
    """``rank 3``, ``ranks 1-3, 5``."""
    spans: list[list[int]] = []
    for r in ranks:
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
    return f"rank{'s' if len(ranks) > 1 else ''} {text}"


def _shown(value: Any) -> str:
    text = value if value is _UNSET else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def compare_machine_settings(settings: list[dict[str, Any]]) -> list[str]:
    """The settings on which some rank differs from rank 0.

    Args:
        settings: every rank's :func:`machine_settings`, indexed by rank.

    Returns:
        One ``"setting: rank 0 has A, ranks 2-3 have B"`` per differing setting (sorted; ranks with the same value
        grouped); [] when every rank agrees.
    """
    first = settings[0]
    lines = []
    for key in sorted(set().union(*settings)):
        value = first.get(key, _UNSET)
        others: dict[str, list[int]] = {}
        for rank, own in enumerate(settings[1:], start=1):
            mine = own.get(key, _UNSET)
            if mine != value:
                others.setdefault(_shown(mine), []).append(rank)
        if others:
            parts = [f"rank 0 has {_shown(value)}"] + [
                f"{_rank_list(ranks)} {'have' if len(ranks) > 1 else 'has'} {shown}" for shown, ranks in others.items()]
            lines.append(f"{key}: {', '.join(parts)}")
    return lines


def check_machine_settings(settings: list[dict[str, Any]], shown: int = 8) -> None:
    """:func:`compare_machine_settings`, raising when any rank differs from rank 0.

    Args:
        settings: every rank's :func:`machine_settings`, indexed by rank.
        shown: differing settings named in the message at most (the rest are counted).

    Raises:
        ConfigError: one line naming every differing setting (up to ``shown``) with rank 0's and the other ranks'
            values, and the fix.
    """
    lines = compare_machine_settings(settings)
    if not lines:
        return
    more = f"; and {len(lines) - shown} more" if len(lines) > shown else ""
    own = ", ".join(sorted(MACHINE_SETTINGS))
    raise ConfigError(f"the machines of this launch were started with different settings ({'; '.join(lines[:shown])}"
                      f"{more}): start every machine with the same settings (the same config file, overrides and "
                      f"ds_config contents; only {own} may differ, the paths as strings: a ds_config's, a custom "
                      "graph's and the model's config.json contents must agree)")


def read_run_legs(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every leg recorded in ``run.json`` (oldest first); [] when there is none.

    ``run.json`` of older versions, a single object, is read as one leg.

    Raises:
        CheckpointError: ``run.json`` is not valid JSON or not a run record.
    """
    path = Path(output_dir) / RUN_MARKER
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({str(e).splitlines()[0][:80]}): restore it from a backup, "
                              "or start a new run in another output_dir") from None
    if isinstance(data, dict) and isinstance(data.get("legs"), list):
        return data["legs"]
    if isinstance(data, dict) and "config" in data:
        return [data]
    raise CheckpointError(f"{path} is not a deca_ds run record: start a new run in another output_dir")


def append_run_leg(output_dir: str | os.PathLike, record: dict[str, Any]) -> int:
    """Add one leg to ``run.json`` (atomically; earlier legs are kept as they were); returns its index (0 first).

    ``leg`` and ``started`` (UTC, ISO 8601) are added to the record unless present. An older single-object
    ``run.json`` becomes leg 0.

    Raises:
        CheckpointError: the existing ``run.json`` cannot be read (nothing is written then).
    """
    from deca_ds.metrics import write_json_atomic

    out = Path(output_dir)
    legs = read_run_legs(out)
    leg = {"leg": len(legs),
           "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **record}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / RUN_MARKER, {"format": RUN_FORMAT, "legs": legs + [leg]})
    return leg["leg"]

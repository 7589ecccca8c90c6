"""What a run reports: ``metrics.jsonl`` records, the progress bar, the final table and ``summary.json``.

Only rank 0 writes (it receives every client's figures through one small all-gather per step), so a run spread over
machines still yields one ``metrics.jsonl``. The all-gather carries monitoring numbers only, never parameters: the
training itself stays decentralized.
"""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path
from typing import Any, Iterable

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


NONFINITE_KEY = "nonfinite_fields"
"""Key added to a record holding non-finite numbers: ``{"/loss": "nan", "/eval/perplexity": "inf"}`` (JSON Pointer,
RFC 6901, of each value -> ``"nan"``, ``"inf"`` or ``"-inf"``); the values themselves are written as ``null``."""


def _pointer(path: str, key: Any) -> str:
    return f"{path}/{str(key).replace('~', '~0').replace('/', '~1')}"


def _nonfinite_name(x: float) -> str:
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def _plain(obj: Any, path: str, found: dict[str, str]) -> Any:
    """``obj`` with numpy/torch scalars made Python numbers and non-finite floats replaced by None (noted)."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        found[path] = _nonfinite_name(obj)
        return None
    if isinstance(obj, dict):
        return {str(k): _plain(v, _pointer(path, k), found) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, _pointer(path, i), found) for i, v in enumerate(obj)]
    item = getattr(obj, "item", None)  # numpy scalars, 0-d arrays and one-element tensors
    if callable(item):
        try:
            return _plain(item(), path, found)
        except (ValueError, RuntimeError):
            pass
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    try:
        return _plain(float(obj), path, found)
    except (TypeError, ValueError):
        raise TypeError(f"{path or '/'} of type {type(obj).__name__} cannot be written as JSON") from None


def strict_json(obj: Any, **dumps_kwargs) -> str:
    """Standard JSON text of ``obj``: never ``NaN``/``Infinity`` tokens (which ``json.dumps`` writes by default and
    strict parsers such as JavaScript's or ``jq`` reject).

    Non-finite floats become ``null`` and a mapping is given the key ``nonfinite_fields`` naming them (JSON Pointer
    -> ``"nan"``/``"inf"``/``"-inf"``; see :func:`restore_nonfinite`). numpy and torch scalars are written as numbers.

    Args:
        obj: a dict (or, when it holds no non-finite number, any JSON-like value).
        **dumps_kwargs: passed to ``json.dumps`` (e.g. ``indent=2``); ``allow_nan`` is always False.

    Raises:
        TypeError: a value that is not JSON-like, or non-finite numbers in something other than a dict.
    """
    found: dict[str, str] = {}
    clean = _plain(obj, "", found)
    if found:
        if not isinstance(clean, dict):
            raise TypeError(f"non-finite values at {sorted(found)} need a JSON object to carry {NONFINITE_KEY!r}")
        clean[NONFINITE_KEY] = found
    return json.dumps(clean, allow_nan=False, **dumps_kwargs)


def restore_nonfinite(record: dict[str, Any]) -> dict[str, Any]:
    """Put the non-finite numbers named by ``nonfinite_fields`` back (in place) and drop the key; returns ``record``.

    For readers that want ``float("nan")`` where :func:`strict_json` wrote ``null``.
    """
    for pointer, name in (record.pop(NONFINITE_KEY, None) or {}).items():
        node = record
        parts = [p.replace("~1", "/").replace("~0", "~") for p in pointer.split("/")[1:]]
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node[part]
        last = parts[-1]
        value = float(name)
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return record


def read_jsonl(path: str | os.PathLike, restore: bool = True) -> list[dict[str, Any]]:
    """Every complete record of a ``metrics.jsonl`` (a torn last line is skipped, not an error).

    Args:
        path: the file.
        restore: put non-finite numbers back as floats (:func:`restore_nonfinite`).
    """
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        records.append(restore_nonfinite(rec) if restore and isinstance(rec, dict) else rec)
    return records


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as strict JSON (:func:`strict_json`) so that a reader never sees a half-written file.

    Written to a temporary file in the same directory, fsynced, then renamed over ``path`` (``os.replace`` is atomic
    on POSIX and Windows): a kill at any moment leaves the old file or the new one, never a mixture.

    Args:
        path: destination, e.g. ``output_dir/summary.json``.
        obj: the data (a dict when it may hold non-finite numbers).
        indent: ``json.dumps`` indentation.

    Returns:
        The path written.

    Raises:
        TypeError: ``obj`` holds a value that cannot be written (checked before anything is written).
    """
    path = Path(path)
    text = strict_json(obj, indent=indent) + "\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")  # unique per writer
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return path
    try:
        os.fsync(fd)  # the rename itself survives a power loss
    except OSError:
        pass
    finally:
        os.close(fd)
    return path


def repair_jsonl(path: str | os.PathLike) -> int:
    """Cut a torn tail off a JSON-lines file (a run killed mid-write); returns the number of bytes removed.

    Everything after the last complete record (a partial line, or lines that do not parse, e.g. zeros left by a crash
    of the file system) is truncated in place; a last object that is whole but lacks only its newline gets the
    newline instead. Lines before the tail are never touched. A missing file is left missing.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - 65536))
        tail = f.read()
    if not tail or (tail.endswith(b"\n") and _parses(tail.rstrip(b"\n").rsplit(b"\n", 1)[-1])):
        return 0  # the usual case, decided from the last 64 KiB
    data = path.read_bytes()
    last = data[data.rfind(b"\n") + 1:]
    if last and _parses(last) and last.strip().startswith(b"{"):
        # Cut after its closing brace: the record is whole, only its newline is missing.
        with open(path, "ab") as f:
            f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())
        return 0
    end = len(data)
    while end > 0:
        cut = data.rfind(b"\n", 0, end)  # data[:cut + 1] are whole lines; the last of them may still be garbage
        if cut < 0:
            end = 0
            break
        start = data.rfind(b"\n", 0, cut) + 1
        if _parses(data[start:cut]):
            end = cut + 1
            break
        end = start
    if end != len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    return len(data) - end


def _parses(line: bytes) -> bool:
    if not line.strip():
        return True  # an empty line is harmless
    try:
        json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return True


class JsonlWriter:
    """Appends one strict-JSON object per line and flushes, so a killed run keeps every record written so far.

    Opening the file first cuts off a torn last line left by a run killed mid-write (:func:`repair_jsonl`), so that
    the next record starts on a line of its own.
    """

    def __init__(self, path: str | os.PathLike):
        """Args:
            path: file to append to (created with its directory when missing; a torn tail is repaired).
        """
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.repaired_bytes = repair_jsonl(self.path)
        self._f = open(self.path, "a")

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one line (non-finite numbers as ``null`` plus ``nonfinite_fields``)."""
        self._f.write(strict_json(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        """Close the file."""
        self._f.close()


def truncate_jsonl_after(path: str | os.PathLike, step: int) -> None:
    """Drop records with ``step >= step`` (a resumed run re-logs the steps after its checkpoint).

    Kept records are re-encoded only when they held ``NaN``/``Infinity`` tokens (files of older versions), so the
    file is strict JSON afterwards; a torn line is dropped.
    """
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        nonstandard = []
        try:
            rec = json.loads(line, parse_constant=lambda name: nonstandard.append(name) or float(name))
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if rec.get("step", -1) < step:
            kept.append(strict_json(rec) if nonstandard else line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(x + "\n" for x in kept))
    os.replace(tmp, path)


def make_progress(console: Console | None = None) -> Progress:
    """Rank 0's progress bar: step, round, active block, loss, tokens/s, elapsed time and the estimated time left
    (rich's speed estimate over the recent steps)."""
    return Progress(
        TextColumn("[bold]step {task.completed}/{task.total}"),
        BarColumn(),
        TextColumn("round {task.fields[round]} block {task.fields[block]}"),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[tps]:.0f} tok/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


PLOT_NAME = "training.png"
"""The figure every run writes next to ``metrics.jsonl`` (:func:`plot_run`)."""


def plot_run(output_dir: str | os.PathLike, path: str | os.PathLike | None = None) -> Path | None:
    """Draw each client's training loss and consensus distance over steps from ``output_dir/metrics.jsonl``.

    Two panels sharing the step axis: the loss per client (log scale) and the consensus distance per client (RMS
    distance of the trained block from the clients' average; 0 at agreement, absent for a single client or a method
    without gossip). Evaluation records and non-finite values are left out.

    Args:
        output_dir: the run's directory.
        path: the PNG to write (default ``output_dir/training.png``).

    Returns:
        The PNG's path, or None when ``metrics.jsonl`` holds no step record.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    src = output_dir / "metrics.jsonl"
    records = [r for r in read_jsonl(src) if "loss" in r] if src.is_file() else []
    if not records:
        return None
    clients = sorted({r["client"] for r in records})
    fig, (ax_loss, ax_dist) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for c in clients:
        mine = sorted((r for r in records if r["client"] == c), key=lambda r: r["step"])
        steps = [r["step"] + 1 for r in mine]
        loss = [r["loss"] if r["loss"] is not None and math.isfinite(r["loss"]) else float("nan") for r in mine]
        dist = [r.get("consensus_distance") or 0.0 for r in mine]
        ax_loss.plot(steps, loss, lw=1, label=f"client {c}")
        ax_dist.plot(steps, dist, lw=1, label=f"client {c}")
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_title(f"{len(clients)} client(s): loss and consensus distance per step")
    ax_dist.set_ylabel("consensus distance (RMS)")
    ax_dist.set_xlabel("optimizer step")
    if len(clients) <= 10:
        ax_loss.legend(fontsize=7, ncol=2)
    for ax in (ax_loss, ax_dist):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(path) if path is not None else output_dir / PLOT_NAME
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def summary_table(clients: Iterable[dict[str, Any]], consensus: dict[str, Any] | None) -> Table:
    """The final table: one row per client plus the consensus model."""
    table = Table(title="deca_ds run summary")
    for col in ("client", "final loss", "test loss", "test acc", "MiB sent", "peak MiB"):
        table.add_column(col, justify="right")

    def fmt(x, spec=".4f"):
        return "-" if x is None else format(x, spec)

    for c in clients:
        table.add_row(str(c["client"]), fmt(c.get("final_loss")), fmt(c.get("test_loss")),
                      fmt(c.get("test_accuracy"), ".3f"), fmt(c.get("bytes_sent", 0) / 2**20, ".1f"),
                      # The simulator has no per-client peak (every client shares one process): "-", not 0.
                      fmt(c["peak_memory_bytes"] / 2**20, ".0f") if "peak_memory_bytes" in c else "-")
    if consensus is not None:
        table.add_row("consensus", "-", fmt(consensus.get("loss")), fmt(consensus.get("accuracy"), ".3f"), "-", "-")
    return table

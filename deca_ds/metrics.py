"""What a run reports: ``metrics.jsonl`` records, the progress bar, the final table and ``summary.json``.

Only rank 0 writes (it receives every client's figures through one small all-gather per step), so a run spread over
machines still yields one ``metrics.jsonl``. The all-gather carries monitoring numbers only, never parameters: the
training itself stays decentralized.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


class JsonlWriter:
    """Appends one JSON object per line and flushes, so a killed run keeps every record written so far."""

    def __init__(self, path: str | os.PathLike):
        """Args:
            path: file to append to (created with its directory when missing).
        """
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a")

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one line."""
        self._f.write(json.dumps(record, default=float) + "\n")
        self._f.flush()

    def close(self) -> None:
        """Close the file."""
        self._f.close()


def truncate_jsonl_after(path: str | os.PathLike, step: int) -> None:
    """Drop records with ``step >= step`` (a resumed run re-logs the steps after its checkpoint)."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if rec.get("step", -1) < step:
            kept.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(x + "\n" for x in kept))
    os.replace(tmp, path)


def make_progress(console: Console | None = None) -> Progress:
    """Rank 0's progress bar: step, round, active block, loss, tokens/s."""
    return Progress(
        TextColumn("[bold]step {task.completed}/{task.total}"),
        BarColumn(),
        TextColumn("round {task.fields[round]} block {task.fields[block]}"),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[tps]:.0f} tok/s"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


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
                      fmt(c.get("peak_memory_bytes", 0) / 2**20, ".0f"))
    if consensus is not None:
        table.add_row("consensus", "-", fmt(consensus.get("loss")), fmt(consensus.get("accuracy"), ".3f"), "-", "-")
    return table

"""The partition summary written at the start of a run: who holds which labels.

Non-IID-ness is the experimental variable of every DECA run, so each run records it: a rich table (client × label
counts, per-client label entropy) on the console, ``partition.json`` and a ``partition.png`` heatmap in
``output_dir``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

from deca_ds.data.partition import label_entropy

__all__ = ["merge_client_counts", "write_partition_summary"]


def merge_client_counts(rows: Sequence[tuple[Sequence[str], Sequence[int]]]) -> tuple[np.ndarray, list[str]]:
    """One client × group table from each client's own row (per-client files: no client sees the others' data).

    Each client's groups are those its own file and the shared test file hold, which differ between clients (each
    site has its own labels), so every row is placed under the union of the names, in the order first seen from
    client 0 on.

    Args:
        rows: per client, ``(count_names, counts_row)``: its column names and its training rows per column.

    Returns:
        ``(counts, names)``: ``[len(rows), len(names)]`` training rows per client per group, and the names.
    """
    names: list[str] = []
    for client_names, _ in rows:
        names += [str(n) for n in client_names if str(n) not in names]
    column = {n: k for k, n in enumerate(names)}
    out = np.zeros((len(rows), len(names)), dtype=np.int64)
    for c, (client_names, row) in enumerate(rows):
        for n, v in zip(client_names, row):
            out[c, column[str(n)]] = int(v)
    return out, names


def write_partition_summary(counts: np.ndarray, label_names: Sequence[str] | None, output_dir: str | os.PathLike,
                            console=None) -> dict[str, Any]:
    """Write ``partition.json`` and ``partition.png`` and print the client × label table.

    Args:
        counts: ``[num_clients, num_labels]`` training rows per client per label (``ClientData.counts``).
        label_names: column names (pass ``ClientData.count_names``, which also names task families); ``None`` or a
            wrong length gives ``label 0``, ``label 1``, ...
        output_dir: directory (created if missing).
        console: a ``rich.console.Console``; ``None`` prints to a new stderr console.

    Returns:
        The JSON document written (counts, label names, per-client totals and label entropy in nats).
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on training nodes
    import matplotlib.pyplot as plt
    from rich.console import Console
    from rich.table import Table

    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 2:
        raise ValueError(f"counts must be [num_clients, num_labels], got shape {counts.shape}")
    names = list(label_names) if label_names is not None and len(label_names) == counts.shape[1] else [
        f"label {k}" for k in range(counts.shape[1])
    ]
    entropy = label_entropy(counts)
    doc = {
        "label_names": names,
        "counts": counts.tolist(),
        "client_totals": counts.sum(axis=1).tolist(),
        "label_totals": counts.sum(axis=0).tolist(),
        "label_entropy": [round(float(e), 6) for e in entropy],
        "max_entropy": float(np.log(counts.shape[1])) if counts.shape[1] > 1 else 0.0,
    }
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "partition.json"), "w") as f:
        json.dump(doc, f, indent=2)

    table = Table(title="training rows per client and label")
    table.add_column("client", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    table.add_column("total", justify="right", style="bold")
    table.add_column("entropy", justify="right")
    for i, row in enumerate(counts):
        table.add_row(str(i), *(str(int(c)) for c in row), str(int(row.sum())), f"{entropy[i]:.2f}")
    (console or Console(stderr=True)).print(table)

    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(names), 1.0 + 0.45 * counts.shape[0]))
    im = ax.imshow(counts, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(counts.shape[0]), [f"client {i}" for i in range(counts.shape[0])])
    for (i, k), c in np.ndenumerate(counts):
        ax.text(k, i, str(int(c)), ha="center", va="center", color="white" if c < counts.max() / 2 else "black",
                fontsize=8)
    fig.colorbar(im, ax=ax, label="rows")
    ax.set_title("partition")
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, "partition.png"), dpi=100)
    plt.close(fig)
    return doc

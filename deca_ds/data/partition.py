"""Partitioners: how one shared dataset is split over clients, IID or non-IID.

Clients' data are non-IID, which is the reason DECA exists; researchers create that setting by splitting one dataset
with a Dirichlet draw over labels (the paper: α = 0.25) or by giving each client a few labels ("pathological"
shards). The interface copies flwr-datasets' ``Partitioner`` (the reference users know): assign ``.dataset``, then
``load_partition(i)`` returns client ``i``'s rows as a ``datasets.Dataset``. Every partitioner assigns every row to
exactly one client and is a pure function of its seed, so all clients compute the same split independently without
communicating.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "Partitioner",
    "IidPartitioner",
    "DirichletPartitioner",
    "ShardPartitioner",
    "NaturalPartitioner",
    "label_entropy",
]


class Partitioner:
    """Shared bookkeeping of the partitioners: the dataset, lazily computed index lists, ``load_partition``.

    Subclasses implement ``_compute() -> list[np.ndarray]`` (row indices per partition). This is a small base class
    in the sense of flwr's ABC, not a hierarchy to extend.
    """

    def __init__(self, num_partitions: int) -> None:
        if int(num_partitions) < 1:
            raise ValueError(f"num_partitions={num_partitions!r} must be >= 1")
        self._num_partitions = int(num_partitions)
        self._dataset = None
        self._indices: list[np.ndarray] | None = None

    @property
    def num_partitions(self) -> int:
        """Number of partitions (clients)."""
        return self._num_partitions

    @property
    def dataset(self):
        """The dataset to split (a ``datasets.Dataset``); assigning it resets the computed split."""
        if self._dataset is None:
            raise AttributeError("assign partitioner.dataset before loading partitions")
        return self._dataset

    @dataset.setter
    def dataset(self, value) -> None:
        self._dataset = value
        self._indices = None

    def partition_indices(self) -> list[np.ndarray]:
        """Row indices (int64, sorted) of every partition; computed once per dataset."""
        if self._indices is None:
            self._indices = [np.sort(np.asarray(ix, dtype=np.int64)) for ix in self._compute()]
        return self._indices

    def load_partition(self, partition_id: int):
        """Rows of one partition.

        Args:
            partition_id: in ``[0, num_partitions)``.

        Returns:
            A ``datasets.Dataset`` with the partition's rows in their original order.
        """
        if not 0 <= partition_id < self._num_partitions:
            raise ValueError(f"partition_id={partition_id} is out of range [0, {self._num_partitions})")
        return self.dataset.select(self.partition_indices()[partition_id].tolist())

    def _compute(self) -> list[np.ndarray]:  # pragma: no cover - implemented by each partitioner
        raise NotImplementedError

    def _column(self, name: str) -> np.ndarray:
        if name not in self.dataset.column_names:
            columns = ", ".join(self.dataset.column_names)
            raise ValueError(f"partition_by={name!r} is not a column of the dataset (columns: {columns})")
        return np.asarray(self.dataset[name], dtype=object)


class IidPartitioner(Partitioner):
    """Uniformly random, equal-size partitions (sizes differ by at most one row).

    Args:
        num_partitions: number of clients.
        seed: seed of the row permutation.
    """

    def __init__(self, num_partitions: int, seed: int = 42) -> None:
        super().__init__(num_partitions)
        self.seed = seed

    def _compute(self) -> list[np.ndarray]:
        perm = np.random.default_rng(self.seed).permutation(len(self.dataset))
        return np.array_split(perm, self.num_partitions)


def _codes(values: np.ndarray) -> tuple[np.ndarray, list[Any]]:
    """Map column values to integer codes in sorted order of the distinct values."""
    uniques = sorted(set(values.tolist()), key=lambda v: (str(type(v)), v))
    lookup = {v: i for i, v in enumerate(uniques)}
    return np.array([lookup[v] for v in values.tolist()], dtype=np.int64), uniques


class DirichletPartitioner(Partitioner):
    """Label-skewed partitions: for every label, client proportions are drawn from Dir(α, ..., α).

    Semantics of flwr-datasets' ``DirichletPartitioner`` (without self-balancing): the rows of each label are
    shuffled and cut at the cumulative proportions; the whole draw is repeated until every partition holds at least
    ``min_partition_size`` rows. Small α gives each client few labels; large α (e.g. 1000) is nearly IID.

    Args:
        num_partitions: number of clients.
        partition_by: column holding the label.
        alpha: concentration, > 0 (a scalar, or one value per partition).
        min_partition_size: minimum rows per partition.
        seed: seed of all draws.
        max_attempts: draws tried before giving up with ``ValueError``.

    Raises:
        ValueError: ``alpha <= 0``, fewer than ``num_partitions * min_partition_size`` rows, or no draw within
            ``max_attempts`` satisfies ``min_partition_size`` (never a too-small draw).
    """

    def __init__(
        self,
        num_partitions: int,
        partition_by: str,
        alpha: float | list[float],
        min_partition_size: int = 10,
        seed: int = 42,
        max_attempts: int = 100,
    ) -> None:
        super().__init__(num_partitions)
        alpha_arr = np.broadcast_to(np.asarray(alpha, dtype=np.float64), (self.num_partitions,)).copy()
        if not np.all(alpha_arr > 0) or not np.all(np.isfinite(alpha_arr)):
            raise ValueError(f"alpha={alpha!r} must be finite and > 0 (small = more skewed; 1000 is nearly IID)")
        self.partition_by = partition_by
        self.alpha = alpha_arr
        self.min_partition_size = int(min_partition_size)
        self.seed = seed
        self.max_attempts = int(max_attempts)
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts={max_attempts!r} must be >= 1")

    def _compute(self) -> list[np.ndarray]:
        codes, uniques = _codes(self._column(self.partition_by))
        n = len(codes)
        if n < self.min_partition_size * self.num_partitions:
            raise ValueError(
                f"{n} rows cannot give {self.num_partitions} partitions of at least {self.min_partition_size} rows: "
                "lower data.min_partition_size or use more data"
            )
        rng = np.random.default_rng(self.seed)
        for _ in range(self.max_attempts):
            parts: list[list[np.ndarray]] = [[] for _ in range(self.num_partitions)]
            for k in range(len(uniques)):
                rows = rng.permutation(np.flatnonzero(codes == k))
                props = rng.dirichlet(self.alpha)
                cuts = (np.cumsum(props)[:-1] * len(rows)).astype(np.int64)
                for i, chunk in enumerate(np.split(rows, cuts)):
                    parts[i].append(chunk)
            out = [np.concatenate(p) if p else np.zeros(0, np.int64) for p in parts]
            if min(len(p) for p in out) >= self.min_partition_size:
                return out
        # Never fall back to the last draw: a client with fewer rows than promised would train on a repeated handful.
        raise ValueError(
            f"no Dirichlet draw (alpha={self.alpha[0]:g}) gave every one of {self.num_partitions} partitions at least "
            f"{self.min_partition_size} rows in {self.max_attempts} attempts (smallest: {min(len(p) for p in out)} "
            f"rows): lower data.min_partition_size, raise data.alpha (less skew), or use more data"
        )


class ShardPartitioner(Partitioner):
    """Pathological label skew: rows sorted by label, cut into equal shards, ``shards_per_partition`` per client.

    The classic split of McMahan et al.: with ``num_partitions * shards_per_partition`` shards over sorted labels,
    each client holds about ``shards_per_partition`` labels. Shard sizes differ by at most one row; every row is
    assigned once.

    Args:
        num_partitions: number of clients.
        partition_by: column holding the label.
        shards_per_partition: shards (≈ labels) per client.
        seed: seed of the within-label shuffle and of the shard assignment.
    """

    def __init__(self, num_partitions: int, partition_by: str, shards_per_partition: int = 2, seed: int = 42) -> None:
        super().__init__(num_partitions)
        if int(shards_per_partition) < 1:
            raise ValueError(f"shards_per_partition={shards_per_partition!r} must be >= 1")
        self.partition_by = partition_by
        self.shards_per_partition = int(shards_per_partition)
        self.seed = seed

    def _compute(self) -> list[np.ndarray]:
        codes, _ = _codes(self._column(self.partition_by))
        rng = np.random.default_rng(self.seed)
        shuffled = rng.permutation(len(codes))
        order = shuffled[np.argsort(codes[shuffled], kind="stable")]
        num_shards = self.num_partitions * self.shards_per_partition
        if len(order) < num_shards:
            raise ValueError(f"{len(order)} rows cannot be cut into {num_shards} non-empty shards")
        shards = np.array_split(order, num_shards)
        assignment = rng.permutation(num_shards).reshape(self.num_partitions, self.shards_per_partition)
        return [np.concatenate([shards[s] for s in row]) for row in assignment]


class NaturalPartitioner(Partitioner):
    """Partitions given by the data: a column names each row's client (e.g. the organisation that owns it).

    Distinct values of ``partition_by`` are sorted; the i-th value is partition ``i``.

    Args:
        partition_by: column naming the client.
        num_partitions: expected number of distinct values (checked when the split is computed), or ``None``.
    """

    def __init__(self, partition_by: str, num_partitions: int | None = None) -> None:
        super().__init__(num_partitions or 1)
        self._expected = num_partitions
        self.partition_by = partition_by

    @property
    def num_partitions(self) -> int:
        """Number of distinct values of ``partition_by`` (once a dataset is set), else the expected number."""
        if self._dataset is not None:
            return len(self.partition_indices())
        return self._num_partitions

    def _compute(self) -> list[np.ndarray]:
        codes, uniques = _codes(self._column(self.partition_by))
        if self._expected is not None and len(uniques) != self._expected:
            raise ValueError(
                f"column {self.partition_by!r} names {len(uniques)} clients but there are {self._expected}: launch "
                f"{len(uniques)} clients (one per value of {self.partition_by!r}), or set data.partition_by to the "
                "field that names each row's client"
            )
        self._num_partitions = len(uniques)
        self.values = uniques
        return [np.flatnonzero(codes == k) for k in range(len(uniques))]

    def load_partition(self, partition_id: int):
        """Rows whose ``partition_by`` value is the ``partition_id``-th distinct value (sorted)."""
        self.partition_indices()
        return super().load_partition(partition_id)


def label_entropy(counts: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each row of a client × label count matrix; empty rows give 0.

    Args:
        counts: array ``[num_clients, num_labels]`` of non-negative counts.

    Returns:
        Array ``[num_clients]``; ``log(num_labels)`` for a uniform row.
    """
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    p = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(p), 0.0)
    return terms.sum(axis=1)

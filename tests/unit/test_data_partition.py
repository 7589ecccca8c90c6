"""Partitioners: skew, exact-once assignment, reproducibility, minimum size (flwr-datasets semantics)."""

import datasets
import numpy as np
import pytest

from deca_ds.data import (
    DirichletPartitioner,
    IidPartitioner,
    NaturalPartitioner,
    ShardPartitioner,
    label_entropy,
    make_classification_rows,
)


@pytest.fixture(scope="module")
def labelled():
    cols, names = make_classification_rows(4000, 4, seed=0)
    return datasets.Dataset.from_dict(cols), names


def _counts(ds, parts, k):
    labels = np.asarray(ds["label"])
    return np.stack([np.bincount(labels[ix], minlength=k) for ix in parts])


def test_label_entropy_closed_form():
    e = label_entropy(np.array([[5, 5, 5, 5], [7, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]))
    np.testing.assert_allclose(e, [np.log(4), 0.0, np.log(2), 0.0])


def test_dirichlet_skew_is_measurable(labelled):
    ds, _ = labelled
    ent = {}
    for alpha in (0.1, 1000.0):
        p = DirichletPartitioner(8, "label", alpha, min_partition_size=0, seed=1)
        p.dataset = ds
        ent[alpha] = label_entropy(_counts(ds, p.partition_indices(), 4)).mean()
    assert ent[1000.0] > 0.97 * np.log(4)
    assert ent[0.1] < 0.5 * np.log(4)


@pytest.mark.parametrize(
    "make",
    [
        lambda: IidPartitioner(5, seed=3),
        lambda: DirichletPartitioner(5, "label", 0.25, min_partition_size=10, seed=3),
        lambda: ShardPartitioner(5, "label", 2, seed=3),
        lambda: NaturalPartitioner("label", 4),
    ],
    ids=["iid", "dirichlet", "shards", "natural"],
)
def test_every_row_assigned_exactly_once_and_reproducible(labelled, make):
    ds, _ = labelled
    p = make()
    p.dataset = ds
    parts = p.partition_indices()
    assert len(parts) == p.num_partitions
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(ds)))
    q = make()
    q.dataset = ds
    for a, b in zip(parts, q.partition_indices()):
        np.testing.assert_array_equal(a, b)
    part = p.load_partition(1)
    assert isinstance(part, datasets.Dataset)
    assert part["input"] == [ds[int(i)]["input"] for i in parts[1]]


def test_seed_changes_dirichlet_split(labelled):
    ds, _ = labelled
    a, b = DirichletPartitioner(4, "label", 0.5, seed=0), DirichletPartitioner(4, "label", 0.5, seed=1)
    a.dataset = b.dataset = ds
    assert any(len(x) != len(y) for x, y in zip(a.partition_indices(), b.partition_indices()))


def test_dirichlet_min_partition_size_and_errors(labelled):
    ds, _ = labelled
    p = DirichletPartitioner(8, "label", 0.3, min_partition_size=150, seed=0)
    p.dataset = ds
    assert min(len(ix) for ix in p.partition_indices()) >= 150
    with pytest.raises(ValueError, match="alpha"):
        DirichletPartitioner(4, "label", 0.0)
    with pytest.raises(ValueError, match="alpha"):
        DirichletPartitioner(4, "label", -1.0)
    impossible = DirichletPartitioner(8, "label", 0.3, min_partition_size=600)
    impossible.dataset = ds
    with pytest.raises(ValueError, match="4000 rows cannot give 8 partitions of at least 600"):
        impossible.partition_indices()
    with pytest.raises(ValueError, match="alpha"):
        DirichletPartitioner(4, "label", float("inf"))
    missing = DirichletPartitioner(4, "topic", 0.3)
    missing.dataset = ds
    with pytest.raises(ValueError, match="topic"):
        missing.partition_indices()


def test_shards_give_each_client_at_most_its_labels():
    # 4 labels x 100 rows, 4 clients x 2 shards = 8 shards of 50 rows: each shard is one label.
    ds = datasets.Dataset.from_dict({"label": [k for k in range(4) for _ in range(100)]})
    p = ShardPartitioner(4, "label", 2, seed=5)
    p.dataset = ds
    counts = _counts(ds, p.partition_indices(), 4)
    assert (counts.sum(axis=1) == 100).all()
    assert ((counts > 0).sum(axis=1) <= 2).all()
    assert set(np.unique(counts)) <= {0, 50, 100}


def test_natural_partition_follows_the_field():
    ds = datasets.Dataset.from_dict({"org": ["b", "a", "c", "a", "b"], "x": [0, 1, 2, 3, 4]})
    p = NaturalPartitioner("org")
    p.dataset = ds
    assert p.num_partitions == 3
    assert p.load_partition(0)["x"] == [1, 3]
    assert p.load_partition(1)["x"] == [0, 4]
    wrong = NaturalPartitioner("org", num_partitions=2)
    wrong.dataset = ds
    with pytest.raises(ValueError, match="3 clients"):
        wrong.partition_indices()


def test_dirichlet_raises_once_its_attempts_run_out_never_returns_a_small_draw(labelled):
    """Enough rows in total (8 x 400 <= 4000, past the row-count check), but alpha = 0.05 concentrates each label
    on about one client, so no draw gives all 8 clients 400 rows: the attempts run out and it must raise."""
    ds, _ = labelled
    p = DirichletPartitioner(8, "label", 0.05, min_partition_size=400, seed=0, max_attempts=20)
    p.dataset = ds
    assert len(ds) >= 8 * 400
    draws = []
    real_default_rng = np.random.default_rng

    class CountingRng:  # numpy's Generator cannot be patched; wrap it to count Dirichlet draws
        def __init__(self, seed):
            self._rng = real_default_rng(seed)

        def permutation(self, x):
            return self._rng.permutation(x)

        def dirichlet(self, alpha):
            draws.append(1)
            return self._rng.dirichlet(alpha)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(np.random, "default_rng", CountingRng)
        with pytest.raises(ValueError) as e:
            p.partition_indices()
    msg = str(e.value)
    assert "in 20 attempts" in msg and "data.min_partition_size" in msg and "data.alpha" in msg and "\n" not in msg
    assert len(draws) == 20 * 4  # every attempt drew once per label: the branch after the loop was reached

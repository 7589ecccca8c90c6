"""Graphs as a user gives them: custom files and options that must be refused in one line before anything runs."""

import re

import numpy as np
import pytest

from deca_ds.build import build_topology
from deca_ds.config import ConfigError, load_config
from deca_ds.topology import check_mixing_matrix, make_topology


def _custom(path):
    return load_config(None, ["topology.name=custom", f"topology.path={path}"])


def test_a_weight_without_its_mirror_is_refused(tmp_path):
    """W[0, 2] = 5e-7 but W[2, 0] = 0 is within the symmetry tolerance, but client 0 would then wait for client 2,
    which never sends to it: a launch hung until comm_timeout and blamed client 2. Refused up front instead."""
    w = [[0.5, 0.5, 5e-7], [0.5, 0.0, 0.5], [0.0, 0.5, 0.5]]
    with pytest.raises(ValueError, match=r"not symmetric: W\[0, 2\] = 5e-07 but W\[2, 0\] = 0"):
        check_mixing_matrix(w)
    path = tmp_path / "one_sided.txt"
    path.write_text("# format: matrix\n" + "\n".join(" ".join(map(str, row)) for row in w) + "\n")
    with pytest.raises(ConfigError, match=r"topology.name='custom'.*not symmetric.*make both zero or both non-zero"):
        build_topology(_custom(path), 3)
    # the same values on both sides are used as given
    w[2][0] = 5e-7
    w[2][2] -= 5e-7
    topo = make_topology("custom", 3, path=_write(tmp_path / "mutual.txt", w))
    assert [topo.neighbors(i) for i in range(3)] == [[1, 2], [0, 2], [0, 1]]


def _write(path, w):
    path.write_text("# format: matrix\n" + "\n".join(" ".join(repr(v) for v in row) for row in w) + "\n")
    return path


@pytest.mark.parametrize("bad", ["inf", "nan", "-inf"])
def test_a_non_finite_edge_index_is_one_line(tmp_path, bad):
    path = tmp_path / "edges.txt"
    path.write_text(f"# format: edges\n0 1\n1 {bad}\n")
    with pytest.raises(ConfigError, match="one 'i j' pair of integer client indices per line"):
        build_topology(_custom(path), 3)


def test_an_unreadable_npy_is_one_line(tmp_path):
    empty = tmp_path / "empty.npy"
    empty.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"empty.npy is not a readable .npy array.*numpy.save"):
        build_topology(_custom(empty), 2)
    garbage = tmp_path / "garbage.npy"
    garbage.write_text("0.5 0.5\n0.5 0.5\n")
    with pytest.raises(ConfigError, match=r"garbage.npy is not a readable .npy array") as err:
        build_topology(_custom(garbage), 2)
    assert "allow_pickle" not in str(err.value)  # never advise loading a pickle


def test_a_complex_npy_matrix_is_refused_not_truncated(tmp_path):
    path = tmp_path / "complex.npy"
    np.save(path, np.full((2, 2), 0.5 + 0.25j))  # imaginary parts were silently dropped
    with pytest.raises(ConfigError, match="complex128 array, not real numbers"):
        build_topology(_custom(path), 2)


def test_a_binary_file_names_the_format_fix(tmp_path):
    path = tmp_path / "graph.txt"
    path.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(ConfigError, match=r"not a text file.*# format: edges"):
        build_topology(_custom(path), 2)


def test_a_custom_file_is_read_for_one_client_too(tmp_path):
    """One client used to skip the file: a missing file, or one for 2 clients, was accepted silently."""
    with pytest.raises(ValueError, match="does not exist"):
        make_topology("custom", 1, path=tmp_path / "missing.txt")
    with pytest.raises(ValueError, match=r"shape \(2, 2\), expected \(1, 1\)"):
        make_topology("custom", 1, path=_write(tmp_path / "two.txt", [[0.5, 0.5], [0.5, 0.5]]))
    edges = tmp_path / "edges.txt"
    edges.write_text("# format: edges\n0 1\n")
    with pytest.raises(ValueError, match=r"outside \[0, 1\)"):
        make_topology("custom", 1, path=edges)
    edges.write_text("# format: edges\n")
    for path in (edges, _write(tmp_path / "one.txt", [[1.0]])):
        topo = make_topology("custom", 1, path=path)
        assert topo.weights.tolist() == [[1.0]] and topo.neighbors(0) == [] and topo.rounds_to_shrink() == 0


@pytest.mark.parametrize("options", [{"rows": 0}, {"cols": 0}, {"rows": 2.5}, {"cols": -3}])
def test_bad_torus_shape_is_a_value_error(options):
    with pytest.raises(ValueError, match="must be a positive integer"):
        make_topology("torus", 6, **options)


@pytest.mark.parametrize("center", [1.5, -1, 4, True])
def test_bad_star_center_is_a_value_error(center):
    with pytest.raises(ValueError, match="is not a client index"):
        make_topology("star", 4, center=center)


def test_torus_shape_and_star_center_are_settings():
    """README offered a torus's rows/cols and a star's centre, but no setting reached them (Python API only)."""
    def graph(*overrides, n=8):
        return build_topology(load_config(None, list(overrides)), n)

    # a 1 x 8 torus is the ring (closed form: i -> i +- 1 mod 8), the default torus 2 x 4 has degree 3
    ring = graph("topology.name=torus", "topology.rows=1")
    assert all(ring.neighbors(i) == sorted({(i - 1) % 8, (i + 1) % 8}) for i in range(8))
    assert np.array_equal(ring.weights_at(0), graph("topology.name=ring").weights_at(0))
    assert all(len(graph("topology.name=torus").neighbors(i)) == 3 for i in range(8))
    assert np.array_equal(graph("topology.name=torus", "topology.cols=8").weights_at(0), ring.weights_at(0))
    hub = graph("topology.name=star", "topology.center=3")
    assert hub.neighbors(3) == [0, 1, 2, 4, 5, 6, 7] and all(hub.neighbors(i) == [3] for i in range(8) if i != 3)


@pytest.mark.parametrize("overrides, words", [
    (["topology.rows=2"], "topology.rows is set but topology.name=ring: it shapes a torus only"),
    (["topology.name=torus", "topology.cols=0"], "topology.cols=0 is out of range: use an integer >= 1"),
    (["topology.name=star", "topology.center=-1"], "topology.center=-1 is out of range: use an integer >= 0"),
    (["topology.name=erdos_renyi", "topology.center=1"], "it shapes a star only"),
])
def test_shape_settings_for_another_graph_or_out_of_range_are_refused(overrides, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        load_config(None, overrides)


def test_a_torus_shape_that_does_not_fit_the_clients_is_one_line():
    with pytest.raises(ConfigError, match=r"^topology.name='torus': .*rows=3") as err:
        build_topology(load_config(None, ["topology.name=torus", "topology.rows=3"]), 8)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="center"):
        build_topology(load_config(None, ["topology.name=star", "topology.center=8"]), 8)

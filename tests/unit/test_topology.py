"""Topologies and mixing matrices: validity, weights, spectral figures and refusals, checked without processes."""

import math

import numpy as np
import pytest
import torch

from deca_ds.gossip import ClientLayout, mix_stacked_
from deca_ds.topology import TOPOLOGY_NAMES, check_mixing_matrix, custom_file_format, make_topology

BUILT_IN = [n for n in TOPOLOGY_NAMES if n != "custom"]


def _second_eigenvalue(w):
    eig = np.sort(np.abs(np.linalg.eigvals(w)))[::-1]
    return eig[1]


@pytest.mark.parametrize("name", BUILT_IN)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 8, 9])
@pytest.mark.parametrize("weights", ["metropolis", "uniform"])
def test_every_topology_is_symmetric_doubly_stochastic_and_connected(name, n, weights):
    topo = make_topology(name, n, weights=weights)
    assert topo.num_clients == n and topo.weights.shape == (n, n)
    union = np.zeros((n, n))
    for step in range(topo.period):
        w = topo.weights_at(step)
        np.testing.assert_allclose(w, w.T, atol=1e-12)
        np.testing.assert_allclose(w.sum(0), 1, atol=1e-12)
        np.testing.assert_allclose(w.sum(1), 1, atol=1e-12)
        assert (w >= 0).all()
        union += w
        for i in range(n):
            assert topo.neighbors(i, step) == sorted(j for j in range(n) if j != i and w[i, j] > 0)
    # connected: (I + A)^(n-1) of the union has no zero entry
    reach = np.linalg.matrix_power((union > 0).astype(float), max(n - 1, 1))
    assert (reach > 0).all()
    if n == 1:
        assert topo.weights.tolist() == [[1.0]] and topo.rounds_to_shrink() == 0


def test_metropolis_ring_is_one_third_and_uniform_differs_on_star():
    ring = make_topology("ring", 6)
    for i in range(6):
        assert ring.neighbors(i) == sorted({(i - 1) % 6, (i + 1) % 6})
        np.testing.assert_allclose(ring.weights[i, [i, (i + 1) % 6, (i - 1) % 6]], 1 / 3)
    assert ring.degree.tolist() == [2] * 6
    star = make_topology("star", 5)
    assert star.degree.tolist() == [4, 1, 1, 1, 1]
    np.testing.assert_allclose(star.weights[0, 1:], 1 / 5)  # 1/(1+max(4,1))
    np.testing.assert_allclose(star.weights[1, 1], 4 / 5)
    uniform = make_topology("ring", 4, weights="uniform")
    np.testing.assert_allclose(uniform.weights[0], [1 / 3, 1 / 3, 0, 1 / 3])


def test_small_and_shaped_graphs():
    two = make_topology("ring", 2)
    np.testing.assert_allclose(two.weights, [[0.5, 0.5], [0.5, 0.5]])
    np.testing.assert_allclose(make_topology("torus", 2).weights, two.weights)
    torus = make_topology("torus", 12)  # 3 x 4 grid with wrap-around: 4 distinct neighbours
    assert torus.degree.tolist() == [4] * 12 and torus.neighbors(0) == [1, 3, 4, 8]
    assert make_topology("torus", 8, rows=2).degree.tolist() == [3] * 8  # 2 rows: up == down
    assert make_topology("exponential", 8).neighbors(0) == [1, 2, 4, 6, 7]
    assert make_topology("bipartite", 6).neighbors(0) == [3, 4, 5]
    er = make_topology("erdos_renyi", 8, seed=3, p=0.3)
    assert er.weights.tolist() == make_topology("erdos_renyi", 8, seed=3, p=0.3).weights.tolist()
    assert er.weights.tolist() != make_topology("erdos_renyi", 8, seed=4, p=0.3).weights.tolist()


def test_spectral_gap_matches_numpy_and_predicts_shrinkage():
    for name in BUILT_IN:
        topo = make_topology(name, 8, seed=1)
        if topo.time_varying:
            continue
        lam2 = _second_eigenvalue(topo.weights)
        # Two backward-stable routes to one number (SVD of W - J/n vs eigh of W): by Weyl each is exact for a
        # matrix within c * n * eps * ||W||_2 of the true one (||W||_2 = 1, doubly stochastic and symmetric; forming
        # W - J/n adds <= n * eps); c = 64 is a generous LAPACK constant for n = 8.
        assert topo.spectral_gap == pytest.approx(1 - lam2, abs=64 * 8 * np.finfo(np.float64).eps)
        rounds = topo.rounds_to_shrink(10)
        assert rounds == (1 if lam2 < 1e-12 else math.ceil(math.log(0.1) / math.log(lam2) - 1e-9))
    # the worst-case initial disagreement (the lambda_2 eigenvector) shrinks 10x in exactly that many rounds
    ring = make_topology("ring", 8)
    vals, vecs = np.linalg.eigh(ring.weights)
    x = vecs[:, np.argsort(np.abs(vals))[-2]]
    k = ring.rounds_to_shrink(10)
    norm = lambda v: np.linalg.norm(v - v.mean())  # noqa: E731
    assert norm(np.linalg.matrix_power(ring.weights, k) @ x) <= norm(x) / 10
    assert norm(np.linalg.matrix_power(ring.weights, k - 1) @ x) > norm(x) / 10


def test_one_peer_exponential_averages_exactly_in_log2_n_steps():
    for n in (2, 4, 8, 16):
        topo = make_topology("one_peer_exponential", n)
        assert topo.time_varying == (n > 2) and topo.period == int(math.log2(n))
        assert all(topo.degree == 1)
        x = torch.randn(n, 3, dtype=torch.float64)
        for step in range(topo.period):
            mix_stacked_(x, topo.weights_at(step))
        torch.testing.assert_close(x, x.mean(0, keepdim=True).expand_as(x), atol=1e-12, rtol=0)
        assert topo.spectral_gap == pytest.approx(1.0) and topo.rounds_to_shrink() == topo.period
    six = make_topology("one_peer_exponential", 6)
    assert six.period == 3 and 0 < six.spectral_gap < 1


def test_mix_stacked_equals_matrix_product_in_fp32():
    topo = make_topology("erdos_renyi", 6, seed=2)
    x = torch.randn(6, 4, 5)
    expected = (torch.from_numpy(topo.weights) @ x.double().reshape(6, -1)).reshape(6, 4, 5)
    out = mix_stacked_(x, topo.weights)
    assert out is x
    torch.testing.assert_close(x.double(), expected, atol=1e-6, rtol=0)
    xb = torch.randn(6, 8).bfloat16()
    ref = torch.from_numpy(topo.weights).float() @ xb.float()
    torch.testing.assert_close(mix_stacked_(xb, topo.weights).float(), ref, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("matrix, prop", [
    ([[0.5, 0.5, 0], [0.4, 0.2, 0.4], [0.1, 0.3, 0.6]], "symmetric"),
    ([[0.5, 0.5, 0], [0.5, 0.6, 0], [0, 0, 1]], "doubly stochastic"),
    ([[1.5, -0.5, 0], [-0.5, 1.5, 0], [0, 0, 1]], "doubly stochastic"),
    ([[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 1]], "connected"),
    ([[0, 1], [1, 0]], "mixing"),  # eigenvalues 1 and -1: the two clients swap values forever
    ([[0.5, 0.5], [0.5, 0.5], [0, 0]], "square"),
])
def test_bad_matrices_are_refused_naming_the_property(matrix, prop, tmp_path):
    with pytest.raises(ValueError, match=f"not {prop}"):
        check_mixing_matrix(matrix)
    if np.asarray(matrix).shape == (3, 3):
        path = tmp_path / "w.npy"
        np.save(path, np.asarray(matrix))
        with pytest.raises(ValueError, match=f"topology custom.*not {prop}"):
            make_topology("custom", 3, path=path)


def test_custom_files(tmp_path):
    edges = tmp_path / "edges.txt"
    edges.write_text("# format: edges\n# a path 0-1-2-3\n0 1\n1 2\n2 3\n")
    path_graph = make_topology("custom", 4, path=edges)
    assert path_graph.degree.tolist() == [1, 2, 2, 1]
    np.testing.assert_allclose(path_graph.weights[0, 1], 1 / 3)  # 1/(1+max(1,2))
    w = make_topology("ring", 5).weights
    np.savetxt(tmp_path / "w.csv", w, delimiter=",", header="format: matrix")
    np.savetxt(tmp_path / "w.txt", w, header="Format: Matrix")
    np.save(tmp_path / "w.npy", w)
    for name in ("w.csv", "w.txt", "w.npy"):
        np.testing.assert_allclose(make_topology("custom", 5, path=tmp_path / name).weights, w)
    with pytest.raises(ValueError, match="shape"):
        make_topology("custom", 4, path=tmp_path / "w.npy")
    (tmp_path / "bad.txt").write_text("# format: edges\n0 7\n")
    with pytest.raises(ValueError, match="outside"):
        make_topology("custom", 4, path=tmp_path / "bad.txt")
    (tmp_path / "split.txt").write_text("# format: edges\n0 1\n2 3\n")
    with pytest.raises(ValueError, match="not connected"):
        make_topology("custom", 4, path=tmp_path / "split.txt")
    (tmp_path / "ragged.txt").write_text("# format: matrix\n0.5 0.5\n0.5\n")
    with pytest.raises(ValueError, match="not square"):
        make_topology("custom", 2, path=tmp_path / "ragged.txt")
    (tmp_path / "float_edges.txt").write_text("# format: edges\n0 1.5\n")
    with pytest.raises(ValueError, match="integer client indices"):
        make_topology("custom", 2, path=tmp_path / "float_edges.txt")


def test_custom_file_format_is_declared_never_guessed(tmp_path):
    """The same values mean different graphs; only the file's declaration decides, and an undeclared file is
    refused with the fix (it used to be guessed: a small integer matrix was read as an edge list)."""
    values = "0 1\n1 0\n"
    as_matrix, as_edges = tmp_path / "m.txt", tmp_path / "e.txt"
    as_matrix.write_text("# format: matrix\n" + values)
    as_edges.write_text("\n# format: edges\n" + values)  # blank lines before the declaration are fine
    # As a matrix these values are the 2-client swap, which never mixes (eigenvalues 1 and -1): refused as that
    # matrix, with its |lambda_2|. As an edge list they are the edge 0-1 with Metropolis weights.
    assert sorted(np.linalg.eigvals([[0.0, 1.0], [1.0, 0.0]]).real) == [-1.0, 1.0]
    with pytest.raises(ValueError, match=r"m.txt\): mixing matrix is not mixing: \|lambda_2\| = 1 "):
        make_topology("custom", 2, path=as_matrix)
    np.testing.assert_array_equal(make_topology("custom", 2, path=as_edges).weights, [[0.5, 0.5], [0.5, 0.5]])
    # A valid matrix is read as declared, and the same values declared as edges are not read as a matrix instead.
    lazy = "0.75 0.25\n0.25 0.75\n"
    as_matrix.write_text("# format: matrix\n" + lazy)
    as_edges.write_text("# format: edges\n" + lazy)
    np.testing.assert_array_equal(make_topology("custom", 2, path=as_matrix).weights, [[0.75, 0.25], [0.25, 0.75]])
    with pytest.raises(ValueError, match="integer client indices"):
        make_topology("custom", 2, path=as_edges)
    # An identity matrix (no mixing at all) must be refused as disconnected, not become full averaging.
    identity = tmp_path / "identity.txt"
    identity.write_text("# format: matrix\n1 0 0\n0 1 0\n0 0 1\n")
    with pytest.raises(ValueError, match="not connected"):
        make_topology("custom", 3, path=identity)
    for text in (values, "1 0 0\n0 1 0\n0 0 1\n", "# a comment first\n# format: edges\n0 1\n"):
        undeclared = tmp_path / "undeclared.txt"
        undeclared.write_text(text)
        with pytest.raises(ValueError) as e:
            make_topology("custom", 2, path=undeclared)
        assert "does not declare its format" in str(e.value) and "'# format: edges'" in str(e.value)
        assert "\n" not in str(e.value)
    (tmp_path / "odd.txt").write_text("# format: adjacency\n0 1\n")
    with pytest.raises(ValueError, match="unknown format 'adjacency'"):
        make_topology("custom", 2, path=tmp_path / "odd.txt")
    assert custom_file_format(tmp_path / "m.txt") == "matrix"
    with pytest.raises(ValueError, match="does not exist"):
        custom_file_format(tmp_path / "missing.txt")


def test_refusals():
    with pytest.raises(ValueError, match="unknown topology 'hypercube'.*ring, torus"):
        make_topology("hypercube", 4)
    with pytest.raises(ValueError, match="unknown mixing weights"):
        make_topology("ring", 4, weights="max_degree")
    with pytest.raises(ValueError, match="unknown option"):
        make_topology("ring", 4, p=0.2)
    with pytest.raises(ValueError, match="rows=3"):
        make_topology("torus", 8, rows=3)
    with pytest.raises(ValueError, match="no connected graph"):
        make_topology("erdos_renyi", 8, p=0.01, max_tries=5)


def test_render_and_draw(tmp_path):
    from rich.console import Console

    console = Console(record=True, width=120)
    make_topology("one_peer_exponential", 4).render(console)
    text = console.export_text()
    assert "spectral gap 1.0000" in text and "neighbours" in text
    png = make_topology("torus", 9).draw(tmp_path / "torus.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_client_layout():
    layout = ClientLayout(8, 5, ranks_per_client=2)
    assert (layout.num_clients, layout.client_id, layout.local_rank) == (4, 2, 1)
    assert layout.client_ranks(3) == [6, 7] and layout.peer_rank(1, 1) == 3
    layout.check_topology(make_topology("ring", 4))
    with pytest.raises(ValueError, match="topology.name=ring has 8 clients.*4 clients"):
        layout.check_topology(make_topology("ring", 8))
    with pytest.raises(ValueError, match="clients.ranks_per_client=3"):
        ClientLayout(8, 0, ranks_per_client=3)

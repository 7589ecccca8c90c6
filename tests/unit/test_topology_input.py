"""Topology input that used to be accepted although it cannot work: refused in one line before anything runs.

Each refusal is checked against an independent reference (numpy's eigenvalues, exact matrix powers), never against
the code under test.
"""

import math
from pathlib import Path

import numpy as np
import pytest

from deca_ds.build import build_topology
from deca_ds.config import ConfigError, load_config
from deca_ds.topology import TOPOLOGY_NAMES, check_mixing_matrix, make_topology

BUILT_IN = [n for n in TOPOLOGY_NAMES if n != "custom"]
EPS = np.finfo(np.float64).eps
ROOT = Path(__file__).resolve().parents[2]



def _spectral_tol(n: int) -> float:
    """How far two backward-stable computations of one eigen/singular value of a symmetric doubly-stochastic n x n
    matrix may differ: each is exact for a matrix within c * n * eps * ||W||_2 of W (Weyl; ||W||_2 = 1), forming
    W - J/n adds at most n * eps; c = 64 is a generous LAPACK constant."""
    return 64 * n * float(np.finfo(np.float64).eps)

def _custom(path):
    return load_config(None, ["topology.name=custom", f"topology.path={path}"])


def _write_matrix(path, w):
    path.write_text("# format: matrix\n" + "\n".join(" ".join(repr(float(v)) for v in row) for row in w) + "\n")
    return path


def _cycle(n, self_weight=0.0):
    """The n-cycle with weight (1 - self_weight) / 2 on each edge: eigenvalues self_weight + (1 - self_weight) *
    cos(2 pi k / n), k = 0..n-1 (a circulant matrix)."""
    w = np.zeros((n, n))
    for i in range(n):
        w[i, (i + 1) % n] = w[i, (i - 1) % n] = (1 - self_weight) / 2
        w[i, i] = self_weight
    return w


# ---------------------------------------------------------------------------------------------------------------
# 1. A mixing matrix with spectral gap 0 (an eigenvalue of modulus 1 besides consensus) never reaches consensus


# Periodic matrices: symmetric, doubly stochastic, connected, every entry a dyadic fraction (so every product below
# is exact in float64), and bipartite without self-weights, so W s = -s for the +-1 vector s of the two sides.
PERIODIC = {
    "swap_2": (np.array([[0.0, 1.0], [1.0, 0.0]]), [1, -1]),
    "complete_bipartite_2_2": (np.array([[0, 0, .5, .5], [0, 0, .5, .5], [.5, .5, 0, 0], [.5, .5, 0, 0]]),
                               [1, 1, -1, -1]),
    "cycle_4": (_cycle(4), [1, -1, 1, -1]),
    "cycle_6": (_cycle(6), [1, -1, 1, -1, 1, -1]),
}


@pytest.mark.parametrize("name", sorted(PERIODIC))
def test_a_periodic_custom_matrix_is_refused_with_its_lambda_2(name, tmp_path):
    w, s = PERIODIC[name]
    n = len(s)
    s = np.array(s, dtype=np.float64)
    # Reference: the disagreement s (orthogonal to the consensus vector) flips sign forever, exactly: no consensus.
    for k in range(1, 65):
        assert np.array_equal(np.linalg.matrix_power(w, k) @ s, (-1) ** k * s)
    # Reference: numpy finds an eigenvalue -1 besides the consensus eigenvalue 1, so |lambda_2| = 1.
    eig = np.sort(np.linalg.eigvals(w).real)
    # These matrices are normal (Bauer-Fike with condition 1), so eigvals' error is _spectral_tol's too.
    assert eig[0] == pytest.approx(-1.0, abs=_spectral_tol(n)) and eig[-1] == pytest.approx(1.0, abs=_spectral_tol(n))
    with pytest.raises(ValueError, match=r"not mixing: \|lambda_2\| = 1 ") as err:
        check_mixing_matrix(w)
    assert "\n" not in str(err.value)
    for path in (_write_matrix(tmp_path / "w.txt", w), tmp_path / "w.npy"):
        np.save(tmp_path / "w.npy", w)
        with pytest.raises(ConfigError) as err:
            build_topology(_custom(path), n)
        text = str(err.value)
        assert text.startswith("topology.name='custom': topology custom (") and str(path) in text
        assert "|lambda_2| = 1 " in text and "self-weight" in text and "(I + W)/2" in text and "\n" not in text


@pytest.mark.parametrize("name", sorted(PERIODIC))
def test_the_lazy_fix_named_in_the_refusal_is_accepted_and_reaches_consensus(name, tmp_path):
    w, _ = PERIODIC[name]
    n = len(w)
    lazy = (np.eye(n) + w) / 2
    topo = make_topology("custom", n, path=_write_matrix(tmp_path / "lazy.txt", lazy))
    np.testing.assert_array_equal(topo.weights, lazy)
    # Reference: numpy's eigenvalues of the lazy matrix are (1 + lambda) / 2: the -1 became 0.
    moduli = np.sort(np.abs(np.linalg.eigvals(lazy)))[::-1]
    assert moduli[1] < 1 and topo.spectral_gap == pytest.approx(1 - moduli[1], abs=_spectral_tol(n))
    x = np.arange(n, dtype=np.float64)
    # A symmetric W contracts the disagreement by |lambda_2| per round: after k rounds it is at most |lambda_2|^k.
    spread = np.linalg.norm(np.linalg.matrix_power(lazy, 40) @ x - x.mean())
    # Float slack: matrix_power(., 40) is <= 8 products (repeated squaring), each row a convex combination, so each
    # adds <= n * eps of ||x|| per entry; 64 n eps per product, 8 products, over sqrt(n) <= n entries' norm.
    slack = 8 * _spectral_tol(n) * n * np.linalg.norm(x)
    assert spread <= moduli[1] ** 40 * np.linalg.norm(x - x.mean()) + slack


def test_a_periodic_matrix_written_with_rounded_weights_is_still_refused(tmp_path):
    """Rows summing to 1 - 5e-7 pass the doubly-stochastic check (tol 1e-6); the consensus eigenvalue is then
    0.9999995, not 1, and so is |lambda_2|: the matrix is as periodic as the exact swap. Comparing |lambda_2| with 1
    instead of with the consensus eigenvalue would see a gap of 5e-7 and accept it."""
    b = 0.9999995
    w = np.array([[0.0, b], [b, 0.0]])
    x = np.array([2.0, 0.0])
    for k in range(1, 65):  # reference: the spread relative to the mean stays exactly 2 (x_k = (2 b^k, 0) or swapped)
        xk = np.linalg.matrix_power(w, k) @ x
        assert (xk.max() - xk.min()) / xk.mean() == 2.0
    with pytest.raises(ConfigError, match=r"not mixing: \|lambda_2\| = 0.9999995 .*consensus eigenvalue 0.9999995"):
        build_topology(_custom(_write_matrix(tmp_path / "rounded.txt", w)), 2)


@pytest.mark.parametrize("eps", [2.0 ** -30, 2.0 ** -12, 0.25])
def test_a_small_but_positive_gap_is_accepted(eps, tmp_path):
    """The refusal is for gap 0 up to float64 rounding, not for slow graphs: (1 - eps) * swap + eps * I has
    eigenvalues 1 and -(1 - 2 eps), gap 2 eps, and converges (slowly). 2 eps = 2^-29 is below the 1e-6 tolerance
    of the doubly-stochastic check: a margin of that size would refuse a matrix that mixes."""
    w = np.array([[eps, 1 - eps], [1 - eps, eps]])  # exact in float64 for these eps
    topo = make_topology("custom", 2, path=_write_matrix(tmp_path / "slow.txt", w))
    assert topo.spectral_gap == pytest.approx(2 * eps, abs=_spectral_tol(2))  # 2.8e-14, far below 2 eps
    x = np.array([1.0, -1.0])  # the lambda_2 eigenvector: after k rounds exactly (-(1 - 2 eps))^k x
    # For eps = 0.25 and 2^-12 every value here is a dyadic of <= 39 bits: exact. For 2^-30: nonnegative entries,
    # w^3 within ~4u of exact (u = eps/2), the final subtraction no cancellation (|w^3_00| ~ 3 * 2^-30) + u, the
    # closed form's cube 2u: <= 8u, inside 16 eps = 32u.
    np.testing.assert_allclose(np.linalg.matrix_power(w, 3) @ x, -((1 - 2 * eps) ** 3) * x,
                               rtol=16 * np.finfo(np.float64).eps)


def test_zero_self_weights_alone_are_not_refused(tmp_path):
    """An odd cycle without self-weights is not bipartite: its eigenvalues cos(2 pi k / 5) stay inside (-1, 1)
    besides the consensus one, and it reaches consensus. The refusal is about the spectrum, not the diagonal."""
    w = _cycle(5)
    lam2 = math.cos(math.pi / 5)  # |cos(4 pi / 5)|, the largest modulus for k = 1..4
    assert np.sort(np.abs(np.linalg.eigvals(w)))[-2] == pytest.approx(lam2, abs=_spectral_tol(5))
    topo = make_topology("custom", 5, path=_write_matrix(tmp_path / "c5.txt", w))
    assert topo.spectral_gap == pytest.approx(1 - lam2, abs=_spectral_tol(5))


def test_a_time_varying_graph_is_judged_on_its_period():
    """Only the product over one period has to mix: a step that swaps is fine when another step averages, and a
    period whose average is periodic (every step bipartite on the same sides) is refused."""
    from deca_ds.topology import Topology

    swap, half = np.array([[0.0, 1.0], [1.0, 0.0]]), np.full((2, 2), 0.5)
    topo = Topology("swap_then_average", [swap, half])
    assert np.array_equal(half @ swap, half) and topo.spectral_gap == 1.0  # reference: the product is J/2
    s = np.array([1.0, -1.0])
    assert np.array_equal(swap @ swap @ s, s)  # reference: the product of [swap, swap] keeps the disagreement
    with pytest.raises(ValueError, match="not mixing"):
        Topology("swap_twice", [swap, swap])


def test_a_time_varying_graph_whose_product_only_permutes_is_refused():
    """Each step a swap of two clients, the average connected with self-weights (gap > 0), yet the period's product
    is a 3-cycle, a permutation: the clients' values rotate forever and never agree. The average is no test of a
    period (it was accepted); the product is."""
    from deca_ds.topology import Topology

    swap_01 = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    swap_12 = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    # Reference, exact in float64 (0/1 entries): the product of one period is the 3-cycle; three periods give I
    # back, so any x that is not constant never reaches its mean.
    product = swap_12 @ swap_01
    assert np.array_equal(product, [[0, 1, 0], [0, 0, 1], [1, 0, 0]])
    x = np.array([1.0, 2.0, 3.0])
    assert np.array_equal(np.linalg.matrix_power(product, 3) @ x, x)
    # ... while the average of the two steps is connected, has self-weights and mixes by itself
    average = (swap_01 + swap_12) / 2
    assert 1 - np.sort(np.abs(np.linalg.eigvalsh(average)))[-2] > 0.1
    with pytest.raises(ValueError, match=r"does not mix over its period") as err:
        Topology("rotate", [swap_01, swap_12])
    text = str(err.value)
    assert "|lambda_2| = 1 " in text and "self-weight" in text and "\n" not in text


def test_a_time_varying_graph_that_mixes_only_as_a_product_is_accepted():
    """A swap then a pair average (client 0 without a self-weight at either step): the period mixes although the
    swap alone does not, and although ||P - J/n||_2 = 1 (P keeps the norm of (1, -2, 1) for one period)."""
    from deca_ds.topology import Topology

    swap_01 = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    pair_12 = np.array([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.0, 0.5, 0.5]])
    product = pair_12 @ swap_01
    # Reference, in integers (exact): M = 6 (P - J/3) satisfies M^3 = -3 M^2, i.e. (P - J/3)^k = (-1/2)^(k-2)
    # (P - J/3)^2 for k >= 2, and P^k = J/3 + (P - J/3)^k since P J = J P = J: the disagreement halves per period.
    m = np.rint(6 * product).astype(np.int64) - 2
    assert np.array_equal(m @ m @ m, -3 * (m @ m)) and np.any(m @ m)
    v = np.array([1.0, -2.0, 1.0])
    assert np.linalg.norm(product @ v) == np.linalg.norm(v)  # reference: the one-period norm bound says "never"
    Topology("swap_then_pair", [swap_01, pair_12])  # not refused


def _static_or_product(topo):
    product = np.eye(topo.num_clients)
    for step in range(topo.period):
        product = topo.weights_at(step) @ product
    return product


@pytest.mark.parametrize("weights", ["metropolis", "uniform"])
@pytest.mark.parametrize("name", BUILT_IN)
def test_no_built_in_graph_has_gap_0_or_is_refused(name, weights):
    """Every built-in graph gives each client a positive self-weight (mixing_weights), so for a connected graph
    (or, time-varying, a connected union over one period) no eigenvalue besides consensus has modulus 1. Checked
    with numpy for every n in 1..32, every torus shape and star centre, and several Erdos-Renyi draws."""
    variants = [{}]
    for n in range(1, 33):
        if name == "torus":
            variants = [{}] + [{"rows": r} for r in range(1, n + 1) if n % r == 0]
        elif name == "star":
            variants = [{"center": c} for c in range(n)]
        elif name == "erdos_renyi":
            variants = [{"p": p} for p in (0.3, 0.5, 1.0)]
        for options in variants:
            for seed in ((0, 1, 2) if name == "erdos_renyi" else (0,)):
                topo = make_topology(name, n, seed=seed, weights=weights, **options)  # not refused
                if n == 1:
                    continue
                p = _static_or_product(topo)
                # Reference: numpy's eigenvalues of the (period's product of) matrices: 1 is simple and every
                # other eigenvalue lies strictly inside the unit circle, far from the float64 rounding margin.
                moduli = np.sort(np.abs(np.linalg.eigvals(p)))[::-1]
                assert moduli[0] == pytest.approx(1.0, abs=1e-12)
                # ... and above the refusal's float64 rounding margin, 4 n eps (see check_mixing_matrix)
                assert 1 - moduli[1] > 4 * n * EPS, (name, n, options, seed, moduli[1])


# ---------------------------------------------------------------------------------------------------------------
# 2. A self-loop 'i i' in an edge list was dropped silently


def test_a_self_loop_in_an_edge_list_is_refused_naming_the_line(tmp_path):
    path = tmp_path / "edges.txt"
    # line 1 the declaration, 2 blank, 3 a comment, 4 an edge, 5 the self-loop (with a trailing comment)
    path.write_text("# format: edges\n\n# a path 0-1-2\n0 1\n1 1  # loop\n1 2\n")
    with pytest.raises(ValueError) as err:
        make_topology("custom", 3, path=path)
    text = str(err.value)
    assert f"{path} line 5" in text and "'1 1'" in text and "self-loop" in text and "remove the line" in text
    assert "keeps its own weight" in text and "\n" not in text
    with pytest.raises(ConfigError, match=r"^topology.name='custom': .* line 5: '1 1' is a self-loop"):
        build_topology(_custom(path), 3)
    # Reference: without the line the file is the path graph 0-1-2, accepted with its Metropolis weights
    path.write_text("# format: edges\n0 1\n1 2\n")
    assert make_topology("custom", 3, path=path).neighbors(1) == [0, 2]


def test_a_self_loop_is_refused_for_one_client_too(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("# format: edges\n0 0\n")
    with pytest.raises(ValueError, match=r"line 2: '0 0' is a self-loop"):
        make_topology("custom", 1, path=path)


# ---------------------------------------------------------------------------------------------------------------
# 3. topology.p is the Erdos-Renyi edge probability: set for another graph it was ignored silently


@pytest.mark.parametrize("name", [n for n in TOPOLOGY_NAMES if n != "erdos_renyi"])
@pytest.mark.parametrize("p", ["0.2", "0.5"])  # 0.5, the Erdos-Renyi default, could not be told from unset
def test_topology_p_with_another_graph_is_refused(name, p, tmp_path):
    overrides = [f"topology.name={name}", f"topology.p={p}"]
    if name == "custom":
        edges = tmp_path / "edges.txt"
        edges.write_text("# format: edges\n0 1\n")
        overrides.append(f"topology.path={edges}")
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    text = str(err.value)
    assert text == (f"topology.p is set but topology.name={name}: it is the edge probability of erdos_renyi only; "
                    "set topology.name=erdos_renyi or remove topology.p (topology.p=null unsets one a config file "
                    "sets)")


def test_a_recipe_with_erdos_renyi_p_switched_to_a_ring_names_the_fix_that_works(tmp_path):
    """A recipe file that sets topology.p with erdos_renyi, switched to a ring on the command line: the p it keeps
    from the file is refused, and the message must name a fix the command line can apply (the file may be shipped
    or shared). The shipped gpu_bf16.yaml leaves p at its default, so it switches to a ring as it is."""
    recipe = tmp_path / "er.yaml"
    recipe.write_text("topology:\n  name: erdos_renyi\n  p: 0.5\n")
    assert load_config(recipe).topology.p == 0.5
    with pytest.raises(ConfigError, match=r"topology.p=null unsets one a config file sets"):
        load_config(recipe, ["topology.name=ring"])
    fixed = load_config(recipe, ["topology.name=ring", "topology.p=null"])
    assert fixed.topology.name == "ring" and fixed.topology.p is None
    shipped = ROOT / "recipes" / "configs" / "gpu_bf16.yaml"
    assert load_config(shipped).topology.p == 0.5  # the erdos_renyi default, filled in
    assert load_config(shipped, ["topology.name=ring"]).topology.p is None


def test_topology_p_in_a_yaml_file_with_a_ring_is_refused(tmp_path):
    path = tmp_path / "ring.yaml"
    path.write_text("topology:\n  name: ring\n  p: 0.5\n")
    with pytest.raises(ConfigError, match="topology.p is set but topology.name=ring"):
        load_config(path)
    path.write_text("topology:\n  name: ring\n  p: null\n")  # null is unset
    assert load_config(path).topology.p is None


def test_unset_topology_p_is_unset_for_other_graphs_and_0_5_for_erdos_renyi():
    from deca_ds import config, topology

    assert config.ERDOS_RENYI_P == topology.ERDOS_RENYI_P == 0.5  # the settings' default is make_topology's
    ring = load_config(None, [])
    assert ring.topology.name == "ring" and ring.topology.p is None
    assert build_topology(ring, 4).weights.tolist() == make_topology("ring", 4).weights.tolist()
    er = load_config(None, ["topology.name=erdos_renyi", "topology.seed=3"])
    # the run record shows the value in use, as it did when p defaulted to 0.5 for every graph
    assert er.topology.p == 0.5 and er.to_dict()["topology"]["p"] == 0.5
    # Reference: the same graph as make_topology's Erdos-Renyi default and as an explicit p=0.5
    default = make_topology("erdos_renyi", 8, seed=3).weights
    assert build_topology(er, 8).weights.tolist() == default.tolist()
    assert default.tolist() == make_topology("erdos_renyi", 8, seed=3, p=0.5).weights.tolist()
    explicit = load_config(None, ["topology.name=erdos_renyi", "topology.seed=3", "topology.p=0.3"])
    reference = make_topology("erdos_renyi", 8, seed=3, p=0.3).weights
    assert build_topology(explicit, 8).weights.tolist() == reference.tolist()
    assert explicit.validate().topology.p == 0.3  # validating twice changes nothing


@pytest.mark.parametrize("p", ["0", "1.5", "-0.1"])
def test_topology_p_out_of_range_is_still_refused(p):
    with pytest.raises(ConfigError, match=rf"topology.p={float(p)!r} is out of range: use an edge probability"):
        load_config(None, ["topology.name=erdos_renyi", f"topology.p={p}"])

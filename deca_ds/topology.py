"""Communication graphs between clients and their mixing matrices.

DECA has no server: after every step a client replaces its active block by a weighted average of its own copy and
its graph neighbours' copies, ``x_i <- sum_j W[i, j] x_j``. How fast the clients agree depends only on ``W``: it must be
symmetric and doubly stochastic (the network average is preserved) and its graph connected (every client is
eventually reached), and the disagreement shrinks per round by ``|lambda_2(W)|``. This module builds the graphs
(:func:`make_topology`), checks any matrix a user brings (:func:`check_mixing_matrix`) and reports the figures that
predict consensus speed (:attr:`Topology.spectral_gap`, :meth:`Topology.rounds_to_shrink`). It is pure numpy: no
process group is needed, so the engine, the single-process simulator and the tests share it.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable

import numpy as np

TOPOLOGY_NAMES = (
    "ring", "torus", "exponential", "one_peer_exponential", "erdos_renyi", "bipartite", "complete", "star", "custom",
)
WEIGHT_SCHEMES = ("metropolis", "uniform")
ERDOS_RENYI_P = 0.5
"""Edge probability of ``erdos_renyi`` when ``p`` is not given (or ``None``)."""


# ---------------------------------------------------------------------------------------------------------------
# Checks and weights
# ---------------------------------------------------------------------------------------------------------------


def _is_connected(adjacency: np.ndarray) -> bool:
    """Breadth-first search from client 0 over the non-zero off-diagonal entries."""
    n = adjacency.shape[0]
    seen = np.zeros(n, dtype=bool)
    seen[0] = True
    frontier = [0]
    while frontier:
        nxt = []
        for i in frontier:
            for j in np.flatnonzero(adjacency[i]):
                if not seen[j]:
                    seen[j] = True
                    nxt.append(int(j))
        frontier = nxt
    return bool(seen.all())


def check_mixing_matrix(weights, tol: float = 1e-6) -> np.ndarray:
    """Check that a matrix is a valid gossip mixing matrix.

    Args:
        weights: an ``n x n`` array-like.
        tol: absolute tolerance for symmetry and for row/column sums equal to 1 (entries may be ``-tol``).

    Returns:
        The matrix as a float64 numpy array.

    Raises:
        ValueError: one line naming the first failing property: ``square``, ``finite``, ``symmetric`` (within
            ``tol``, and ``W[i, j]`` non-zero exactly where ``W[j, i]`` is: gossip exchanges between ``i`` and ``j``
            only when both are), ``non-negative``, ``doubly stochastic`` (rows or columns not summing to 1),
            ``connected`` or ``mixing`` (spectral gap 0: an eigenvalue besides the consensus one has the same
            modulus, e.g. the 2-client swap ``[[0, 1], [1, 0]]`` or any bipartite matrix without self-weights; the
            clients' values then oscillate and never agree; see :func:`second_eigenvalue`).
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 2 or w.shape[0] != w.shape[1] or w.shape[0] == 0:
        raise ValueError(f"mixing matrix is not square: shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError("mixing matrix is not finite: it contains NaN or inf")
    asym = float(np.abs(w - w.T).max())
    if asym > tol:
        raise ValueError(f"mixing matrix is not symmetric: max |W - W.T| = {asym:.3g} > tol {tol:g}")
    one_sided = np.argwhere((w != 0) & (w.T == 0))
    if len(one_sided):  # client i would wait for a message from j, which never sends to i
        i, j = (int(k) for k in one_sided[0])
        raise ValueError(f"mixing matrix is not symmetric: W[{i}, {j}] = {w[i, j]:.3g} but W[{j}, {i}] = 0 (client "
                         f"{i} would wait for client {j}, which never sends to it): make both zero or both non-zero")
    if float(w.min()) < -tol:
        raise ValueError(f"mixing matrix is not doubly stochastic: negative entry {float(w.min()):.3g}")
    rows, cols = np.abs(w.sum(axis=1) - 1).max(), np.abs(w.sum(axis=0) - 1).max()
    if max(rows, cols) > tol:
        raise ValueError(
            f"mixing matrix is not doubly stochastic: max |row sum - 1| = {rows:.3g}, "
            f"max |column sum - 1| = {cols:.3g} (tol {tol:g})"
        )
    off = np.abs(w) > tol
    np.fill_diagonal(off, False)
    if not _is_connected(off):
        raise ValueError("mixing matrix is not connected: some clients can never exchange values")
    lam1, lam2, margin = second_eigenvalue(w)
    if lam1 - lam2 <= margin:
        raise ValueError(
            f"mixing matrix is not mixing: |lambda_2| = {lam2:.9g} equals the consensus eigenvalue {lam1:.9g} "
            f"(spectral gap 0 up to float64 rounding {margin:.2g}), so the clients' disagreement never shrinks: "
            "their values oscillate (a permutation, or a bipartite graph without self-weights): give every client "
            "a self-weight, e.g. use the lazy matrix (I + W)/2"
        )
    return w


def second_eigenvalue(weights) -> tuple[float, float, float]:
    """The consensus eigenvalue, ``|lambda_2|`` and the float64 rounding margin of a mixing matrix.

    Gossip ``x <- W x`` reaches consensus exactly when every eigenvalue of ``W`` other than the consensus one
    (``lambda_1``, eigenvector all ones) has a smaller modulus. A matrix has spectral gap 0 (and its clients
    oscillate forever) when ``|lambda_2| = lambda_1``; :func:`check_mixing_matrix` refuses it when
    ``lambda_1 - |lambda_2| <= margin``.

    Why these numbers:

    * ``|lambda_2|`` is compared with the measured ``lambda_1``, not with 1. :func:`check_mixing_matrix` accepts
      rows and columns that sum to ``1 +- tol`` (tol 1e-6), so ``lambda_1`` itself may lie anywhere in
      ``[1 - tol, 1 + tol]``. A bipartite matrix without self-weights has ``-lambda_1`` as an eigenvalue whatever
      its weights (its spectrum is symmetric), so the 2-client swap written as ``0.9999995`` has
      ``|lambda_2| = lambda_1 = 0.9999995``: exactly as periodic as the swap, yet ``1 - |lambda_2| = 5e-7``.
      Nor is ``tol`` a margin: a gap smaller than ``tol`` is slow but real (``(1 - e) * swap + e * I`` has gap
      ``2 e`` and converges); only a gap hidden by rounding is 0.
    * The margin is float64 rounding, ``4 n eps ||S||_2`` (``eps`` = 2^-52, ``S`` as below, ``||S||_2`` its largest
      eigenvalue modulus). LAPACK's symmetric eigensolver (``numpy.linalg.eigvalsh``) is backward stable: each
      computed eigenvalue is within ``p(n) u ||S||_2`` of the exact one (Weyl), ``u = eps / 2`` and ``p(n)`` a
      modestly growing function of ``n`` (the LAPACK Users' Guide's error bounds take ``p(n) = 1``; ``p(n) <= 2n``
      is assumed here), so ``lambda_1 - |lambda_2|`` errs by at most ``2 n eps ||S||_2``; forming ``S`` rounds
      each entry once (at most ``u ||S||_2`` for a non-negative ``S``, twice that on the difference). ``4 n eps``
      covers both with room: 7e-15 for 8 clients, while the slowest built-in graph, the ring, has gap
      ``~13 / n^2``. A true gap 0 thus always measures ``<= margin``, and a measured gap above it is a real one.

    Args:
        weights: an ``n x n`` array-like, symmetric within the tolerance of :func:`check_mixing_matrix`.

    Returns:
        ``(lambda_1, |lambda_2|, margin)``: the largest eigenvalue of ``S = (W + W.T) / 2`` (the consensus one for
        a non-negative connected matrix, Perron-Frobenius), the largest modulus among the other ``n - 1``, and
        the rounding margin above; ``|lambda_2| = 0`` for one client.
    """
    w = np.asarray(weights, dtype=np.float64)
    n = w.shape[0]
    # eigvalsh reads one triangle only: symmetrise first so a W accepted within tol is measured as a whole.
    values = np.linalg.eigvalsh((w + w.T) / 2)  # ascending
    lam1 = float(values[-1])
    lam2 = float(np.abs(values[:-1]).max()) if n > 1 else 0.0
    margin = 4 * n * float(np.finfo(np.float64).eps) * max(lam1, abs(float(values[0])))
    return lam1, lam2, margin


def _period_product(mats: list[np.ndarray]) -> np.ndarray:
    """``P = W_T ... W_1``: what one period of gossip applies to the clients' values (``mats`` in step order)."""
    product = np.eye(mats[0].shape[0])
    for w in mats:
        product = w @ product
    return product


def _check_period_mixes(mats: list[np.ndarray]) -> None:
    """Raise ``ValueError`` when the product ``P`` of one period's matrices (whose union is connected) never mixes.

    Gossip over a period applies ``P = W_T ... W_1``; the clients reach consensus exactly when every eigenvalue of
    ``P`` but the consensus one has a smaller modulus. ``||P - J/n||_2 < 1`` is sufficient but not necessary (a swap
    then a pair average mixes with norm 1), so the eigenvalues themselves are compared.

    * When every step gives every client a positive self-weight (every built-in graph does), ``P`` mixes and nothing
      is computed: ``P_ij >= W_t[i, i'] ... > 0`` wherever any step has an edge ``i-j`` (the other factors' positive
      diagonals carry it), so ``P`` is irreducible on the connected union, and with a positive diagonal it is
      primitive: by Perron-Frobenius its consensus eigenvalue is simple and strictly larger than every other modulus.
    * Otherwise ``|lambda_2(P)|`` is measured (``numpy.linalg.eigvals``) and refused when it equals the consensus
      eigenvalue up to float64 rounding, ``4 n T eps`` times a bound on ``||P||_2``. Derivation: each of the ``T - 1``
      products of non-negative matrices rounds within ``n u |A||B| = n u AB`` entrywise, so ``P`` is formed within
      ``(T - 1) n u ||P||_2``; the Hessenberg QR eigensolver is backward stable, ``p(n) u ||P||_2`` with
      ``p(n) <= 2n`` assumed as in :func:`second_eigenvalue`; an eigenvalue of modulus 1 of a product of symmetric
      contractions has the same left and right eigenvectors (condition number 1), so it moves by at most the sum,
      ``(T + 1) n u ||P||_2`` per modulus, twice that on the difference of two: ``(T + 1) n eps <= 4 n T eps``.
    """
    n, steps = mats[0].shape[0], len(mats)
    if all(np.all(np.diag(w) > 0) for w in mats):
        return
    product = _period_product(mats)
    moduli = np.sort(np.abs(np.linalg.eigvals(product)))[::-1]
    absolute = np.abs(product)
    # ||P||_2 <= sqrt(||P||_1 ||P||_inf): a bound on the norm, which only widens the margin (no SVD needed).
    norm_bound = float(np.sqrt(absolute.sum(axis=0).max() * absolute.sum(axis=1).max()))
    margin = 4 * n * steps * float(np.finfo(np.float64).eps) * norm_bound
    lam1, lam2 = float(moduli[0]), float(moduli[1]) if n > 1 else 0.0
    if lam1 - lam2 <= margin:
        raise ValueError(
            f"time-varying mixing sequence does not mix over its period: the product of its {steps} matrices has "
            f"|lambda_2| = {lam2:.9g} equal to the consensus eigenvalue {lam1:.9g} (spectral gap 0 up to float64 "
            f"rounding {margin:.2g}), so the clients' disagreement never shrinks (e.g. steps that only permute "
            "clients): give every client a self-weight at every step, e.g. use the lazy matrices (I + W_t)/2"
        )


def mixing_weights(adjacency: np.ndarray, scheme: str = "metropolis") -> np.ndarray:
    """Symmetric doubly-stochastic weights for an undirected graph.

    Args:
        adjacency: boolean ``n x n`` symmetric adjacency (the diagonal is ignored).
        scheme: ``metropolis``: Metropolis-Hastings ``w_ij = 1/(1 + max(d_i, d_j))`` on edges; ``uniform``: every edge
            gets ``1/(1 + d_max)`` (``d_max`` the largest degree). In both, ``w_ii = 1 - sum_{j != i} w_ij >= 0``.

    Returns:
        float64 ``n x n`` mixing matrix.
    """
    if scheme not in WEIGHT_SCHEMES:
        raise ValueError(f"unknown mixing weights {scheme!r}: use one of {', '.join(WEIGHT_SCHEMES)}")
    adj = np.asarray(adjacency, dtype=bool).copy()
    np.fill_diagonal(adj, False)
    deg = adj.sum(axis=1)
    if scheme == "metropolis":
        w = np.where(adj, 1.0 / (1.0 + np.maximum.outer(deg, deg)), 0.0)
    else:
        w = np.where(adj, 1.0 / (1.0 + deg.max(initial=0)), 0.0)
    np.fill_diagonal(w, 1.0 - w.sum(axis=1))
    return w


# ---------------------------------------------------------------------------------------------------------------
# Topology
# ---------------------------------------------------------------------------------------------------------------


class Topology:
    """A communication graph with its mixing matrix (or a periodic sequence of them for time-varying graphs).

    Attributes:
        name: the builder name (``ring``, ``torus`` ...).
        num_clients: number of clients ``n``.
        time_varying: whether ``weights_at(step)`` changes with the step (period ``period``).
        period: number of distinct matrices; ``weights_at(step) = sequence[step % period]``.
    """

    def __init__(self, name: str, weights_sequence: list[np.ndarray], tol: float = 1e-6):
        """Build from one or more matrices; each one is checked to be symmetric and doubly stochastic.

        Args:
            name: topology name shown in messages and renderings.
            weights_sequence: the matrices of one period. A static graph passes one matrix, which must be connected
                and mixing (spectral gap above 0, see :func:`second_eigenvalue`); for a time-varying graph only the
                union over the period must be connected, and the product of the period's matrices must mix (a step
                may be disconnected or not mix by itself).
            tol: tolerance of :func:`check_mixing_matrix`.
        """
        if not weights_sequence:
            raise ValueError(f"topology {name!r} has no mixing matrix")
        self.name = name
        mats = [np.asarray(w, dtype=np.float64) for w in weights_sequence]
        if len(mats) == 1:
            check_mixing_matrix(mats[0], tol)
        else:
            for w in mats:
                try:
                    check_mixing_matrix(w, tol)
                except ValueError as err:
                    # One step of a time-varying graph may be disconnected, or not mix by itself: only the period
                    # counts.
                    if "not connected" not in str(err) and "not mixing" not in str(err):
                        raise
            # The union over one period must be connected. The average's gap is 0 only when the union is bipartite
            # without self-weights; then every step maps the +-1 vector of the two sides to its negative, so the
            # period's product never mixes either: this refuses no sequence that would mix.
            check_mixing_matrix(sum(mats) / len(mats), tol)
            # The converse fails: steps that only permute clients (swap 0-1, then 1-2) have a connected average with
            # self-weights, yet their product is a permutation (a 3-cycle) and never mixes. The period's product is
            # what the clients apply, so it is judged itself.
            _check_period_mixes(mats)
        self._weights = mats
        self.num_clients = mats[0].shape[0]
        self.time_varying = len(mats) > 1
        self.period = len(mats)

    # -- matrices and neighbours ------------------------------------------------------------------------------

    @property
    def weights(self) -> np.ndarray:
        """The mixing matrix of step 0 (the only one for a static graph)."""
        return self._weights[0]

    def weights_at(self, step: int) -> np.ndarray:
        """The mixing matrix used at optimizer step ``step`` (periodic for time-varying graphs)."""
        return self._weights[step % self.period]

    def neighbors(self, i: int, step: int = 0) -> list[int]:
        """Clients that client ``i`` exchanges with at ``step``: non-zero off-diagonal entries of its row, sorted."""
        row = self.weights_at(step)[i]
        return [int(j) for j in np.flatnonzero(row) if j != i]

    @property
    def degree(self) -> np.ndarray:
        """Number of neighbours of every client at step 0 (int array of length ``num_clients``)."""
        return np.array([len(self.neighbors(i)) for i in range(self.num_clients)], dtype=np.int64)

    # -- consensus speed -------------------------------------------------------------------------------------

    def _contraction(self) -> float:
        """Per-period contraction ``||P - J/n||_2`` of disagreement, ``P`` the product of one period's matrices."""
        n = self.num_clients
        product = _period_product(self._weights)
        return float(np.linalg.norm(product - np.full((n, n), 1.0 / n), ord=2))

    @property
    def spectral_gap(self) -> float:
        """``1 - |lambda_2|`` of the mixing matrix.

        For a static symmetric ``W`` this is ``1 - |lambda_2(W)|`` (second largest eigenvalue in magnitude). For a
        time-varying graph it is ``1 - ||P - J/n||_2`` with ``P`` the product of the matrices of one period (which
        equals ``1 - |lambda_2(P)|`` whenever ``P`` is symmetric): disagreement shrinks at least by that factor per
        period. A single client has gap 1.
        """
        return 1.0 - self._contraction()

    def rounds_to_shrink(self, factor: float = 10.0) -> float:
        """Mixing steps after which the disagreement ``||X - mean||`` is at most ``1/factor`` of what it was.

        ``ceil(log(1/factor) / log|lambda_2|)`` rounds (times the period for time-varying graphs, where the bound is
        per period); 0 for a single client; ``inf`` when the gap is 0 (the graph never mixes).
        """
        if self.num_clients == 1:
            return 0
        rho = self._contraction()
        if rho >= 1.0 - 1e-12:
            return math.inf
        periods = 1 if rho <= 1e-12 else max(1, math.ceil(math.log(1.0 / factor) / math.log(rho) - 1e-9))
        return periods * self.period

    # -- display ---------------------------------------------------------------------------------------------

    def render(self, console=None):
        """Print a rich table (client, neighbours, degree) and the spectral gap; return the table.

        Args:
            console: a ``rich.console.Console``; a new one writing to stdout when ``None``.
        """
        from rich.console import Console
        from rich.table import Table

        console = console or Console()
        steps = range(self.period) if self.time_varying else [0]
        table = Table(title=f"topology {self.name}: {self.num_clients} clients")
        table.add_column("client", justify="right")
        for s in steps:
            table.add_column("neighbours" + (f" (step % {self.period} = {s})" if self.time_varying else ""))
        table.add_column("degree", justify="right")
        for i in range(self.num_clients):
            cells = [" ".join(map(str, self.neighbors(i, s))) or "-" for s in steps]
            table.add_row(str(i), *cells, str(int(self.degree[i])))
        console.print(table)
        rounds = self.rounds_to_shrink()
        console.print(
            f"spectral gap {self.spectral_gap:.4f}" + (" (of the product over one period)" if self.time_varying else "")
            + f"; {rounds} mixing steps shrink disagreement 10x"
        )
        return table

    def draw(self, path) -> Path:
        """Save a PNG drawing of the graph (clients on a circle; edge width ~ weight; union over one period).

        Args:
            path: output file.

        Returns:
            The path written.
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = self.num_clients
        angle = 2 * np.pi * np.arange(n) / n
        xy = np.stack([np.cos(angle), np.sin(angle)], axis=1)
        fig, ax = plt.subplots(figsize=(4, 4))
        colors = plt.get_cmap("tab10")
        for s in range(self.period):
            w = self._weights[s]
            for i in range(n):
                for j in range(i + 1, n):
                    if w[i, j] > 0:
                        ax.plot(*xy[[i, j]].T, color=colors(s % 10), lw=0.5 + 4 * w[i, j], alpha=0.7, zorder=1)
        ax.scatter(*xy.T, s=300, color="white", edgecolors="black", zorder=2)
        for i in range(n):
            ax.annotate(str(i), xy[i], ha="center", va="center", zorder=3)
        ax.set_title(f"{self.name} (n={n}, gap {self.spectral_gap:.3f})")
        ax.set_aspect("equal")
        ax.axis("off")
        path = Path(path)
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        return path

    def __repr__(self) -> str:
        return (
            f"Topology(name={self.name!r}, num_clients={self.num_clients}, time_varying={self.time_varying}, "
            f"spectral_gap={self.spectral_gap:.4f})"
        )


# ---------------------------------------------------------------------------------------------------------------
# Graph builders (adjacency matrices)
# ---------------------------------------------------------------------------------------------------------------


def _empty(n: int) -> np.ndarray:
    return np.zeros((n, n), dtype=bool)


def _connect(adj: np.ndarray, i: int, j: int) -> None:
    if i != j:
        adj[i, j] = adj[j, i] = True


def _ring(n: int) -> np.ndarray:
    adj = _empty(n)
    for i in range(n):
        _connect(adj, i, (i + 1) % n)
    return adj


def _square_factors(n: int) -> tuple[int, int]:
    rows = int(math.isqrt(n))
    while n % rows:
        rows -= 1
    return rows, n // rows


def _torus(n: int, rows: int | None = None, cols: int | None = None) -> np.ndarray:
    for key, value in (("rows", rows), ("cols", cols)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
            raise ValueError(f"topology torus: {key}={value!r} must be a positive integer dividing num_clients={n}")
    if rows is None and cols is None:
        rows, cols = _square_factors(n)
    elif rows is None:
        rows = n // cols
    elif cols is None:
        cols = n // rows
    if rows * cols != n or rows < 1 or cols < 1:
        raise ValueError(f"topology torus: rows={rows} x cols={cols} does not equal num_clients={n}")
    adj = _empty(n)
    for r in range(rows):
        for c in range(cols):
            i = r * cols + c
            _connect(adj, i, r * cols + (c + 1) % cols)  # duplicates (2 columns/rows) collapse to one edge
            _connect(adj, i, ((r + 1) % rows) * cols + c)
    return adj


def _exponential(n: int) -> np.ndarray:
    adj = _empty(n)
    hop = 1
    while hop < n:
        for i in range(n):
            _connect(adj, i, (i + hop) % n)
        hop *= 2
    return adj


def _one_peer_exponential(n: int) -> list[np.ndarray]:
    # Symmetric one-peer variant: at step t client i pairs with its hypercube partner i XOR 2^(t mod tau). For n a
    # power of two, the product over tau = log2(n) steps of (I + P_t)/2 is exactly J/n. For other n, a client whose
    # partner index is >= n sits that step out; clearing bits from the top always stays below n, so the union is
    # connected.
    tau = max(1, math.ceil(math.log2(n)))
    steps = []
    for t in range(tau):
        adj = _empty(n)
        for i in range(n):
            j = i ^ (1 << t)
            if j < n:
                _connect(adj, i, j)
        steps.append(adj)
    return steps


def _erdos_renyi(n: int, seed: int = 0, p: float | None = None, max_tries: int = 1000) -> np.ndarray:
    if p is None:  # the settings' unset topology.p
        p = ERDOS_RENYI_P
    if not 0.0 < p <= 1.0:
        raise ValueError(f"topology erdos_renyi: p={p} is out of range: use an edge probability in (0, 1]")
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        upper = np.triu(rng.random((n, n)) < p, k=1)
        adj = upper | upper.T
        if _is_connected(adj):
            return adj
    raise ValueError(
        f"topology erdos_renyi: no connected graph in {max_tries} draws with n={n}, p={p}, seed={seed}; raise p"
    )


def _bipartite(n: int) -> np.ndarray:
    adj = _empty(n)
    half = n // 2
    for i in range(half):
        for j in range(half, n):
            _connect(adj, i, j)
    return adj


def _complete(n: int) -> np.ndarray:
    adj = np.ones((n, n), dtype=bool)
    np.fill_diagonal(adj, False)
    return adj


def _star(n: int, center: int = 0) -> np.ndarray:
    if isinstance(center, bool) or not isinstance(center, (int, np.integer)) or not 0 <= center < n:
        raise ValueError(f"topology star: center={center} is not a client index in [0, {n})")
    adj = _empty(n)
    for i in range(n):
        _connect(adj, center, i)
    return adj


CUSTOM_FORMATS = ("edges", "matrix")
_FORMAT_LINE = re.compile(r"#\s*format\s*:\s*(\S+)\s*", re.IGNORECASE)


def custom_file_format(path) -> str:
    """The format a custom topology file declares: ``"matrix"`` or ``"edges"``. Never guessed from the values.

    A ``.npy`` file holds a weight matrix. Any text file (``.txt``, ``.csv``, ...) must say what it holds on its
    first non-blank line: ``# format: edges`` or ``# format: matrix``. (The values cannot tell: ``0 1`` / ``1 0``
    is both a 2-client edge list and a 2x2 permutation matrix, and a 0/1 identity matrix is both "no mixing" and a
    list of edges.)

    Args:
        path: the file.

    Returns:
        ``"matrix"`` or ``"edges"``.

    Raises:
        ValueError: the file is missing, or a text file does not declare one of the two formats.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"topology custom: file {str(path)!r} does not exist")
    if path.suffix == ".npy":
        return "matrix"
    how = ("make the file's first line '# format: edges' (then one 'i j' pair of client indices per line) or "
           "'# format: matrix' (then n rows of n weights)")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ValueError(f"topology custom: {path} is not a text file (nor a .npy array): {how}") from None
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    match = _FORMAT_LINE.fullmatch(first)
    if match is None:
        raise ValueError(f"topology custom: {path} does not declare its format: {how}")
    kind = match.group(1).lower()
    if kind not in CUSTOM_FORMATS:
        raise ValueError(f"topology custom: {path} declares an unknown format {kind!r}: {how}")
    return kind


def _read_custom(path, n: int):
    """Read a custom graph file; returns ``("matrix", W)`` or ``("edges", adjacency)``.

    The format is the one the file declares (:func:`custom_file_format`). ``matrix``: ``n`` rows of ``n`` weights
    separated by spaces or commas (or a ``.npy`` array). ``edges``: one ``i j`` pair of client indices per line,
    ``i != j`` (a self-loop ``i i`` is refused naming its line: every client keeps a self-weight anyway).
    ``#`` starts a comment in text files.
    """
    if path is None:
        raise ValueError("topology custom needs the option path: an edge-list or weight-matrix file")
    kind = custom_file_format(path)
    path = Path(path)
    if path.suffix == ".npy":
        try:
            data = np.load(path, allow_pickle=False)
        except (ValueError, EOFError) as err:  # not a .npy file, truncated, or an object array
            why = "it holds pickled objects" if "pickle" in str(err) else str(err).strip() or type(err).__name__
            raise ValueError(f"topology custom: {path} is not a readable .npy array of numbers ({why}): write the "
                             "matrix with numpy.save(path, W) for a float array W") from None
        if data.dtype.kind not in "biuf":  # complex, strings, dates ...: no real weights
            raise ValueError(f"topology custom: {path} holds a {data.dtype} array, not real numbers: write the "
                             "matrix with numpy.save(path, W) for a float array W")
        return kind, data
    rows, line_numbers, texts = [], [], []
    for number, raw in enumerate(path.read_text().splitlines(), start=1):  # numbered as an editor shows them
        line = raw.split("#", 1)[0].strip()
        if line:
            rows.append(line.replace(",", " ").split())
            line_numbers.append(number)
            texts.append(line)
    try:
        values = [[float(v) for v in row] for row in rows]
    except ValueError as err:
        raise ValueError(f"topology custom: {path} ({kind}) has an entry that is not a number: {err}") from None
    if kind == "matrix":
        if not values or any(len(r) != len(values) for r in values):
            raise ValueError(f"topology custom: matrix in {path} is not square: {len(values)} rows of "
                             f"{sorted({len(r) for r in values})} values; expected {n} rows of {n}")
        return kind, np.array(values)
    if not all(len(r) == 2 for r in values) or not all(math.isfinite(v) and v == int(v) for r in values for v in r):
        raise ValueError(f"topology custom: edge list {path} must hold one 'i j' pair of integer client indices "
                         "per line")
    adj = _empty(n)
    for (i, j), number, text in zip(values, line_numbers, texts):
        i, j = int(i), int(j)
        if not (0 <= i < n and 0 <= j < n):
            raise ValueError(f"topology custom: edge ({i}, {j}) in {path} names a client outside [0, {n})")
        if i == j:  # _connect drops it; refused so that a typo ('1 1' for '1 2') cannot change the graph silently
            raise ValueError(f"topology custom: edge list {path} line {number}: {text!r} is a self-loop (client {i} "
                             "with itself): a client always keeps its own weight in the mixing, so the line says "
                             "nothing; remove the line")
        _connect(adj, i, j)
    return kind, adj


_STATIC: dict[str, Callable[..., np.ndarray]] = {
    "ring": _ring, "torus": _torus, "exponential": _exponential, "erdos_renyi": _erdos_renyi,
    "bipartite": _bipartite, "complete": _complete, "star": _star,
}


def make_topology(name: str, num_clients: int, seed: int = 0, weights: str = "metropolis", **options) -> Topology:
    """Build a named communication graph and its mixing matrix.

    Args:
        name: one of ``ring``, ``torus`` (2-D grid with wrap-around; options ``rows``/``cols``, default the most square
            factorisation), ``exponential`` (static, neighbours at distance ``2^k`` both ways),
            ``one_peer_exponential`` (time-varying: at step ``t`` client ``i`` pairs with ``i XOR 2^(t mod ceil(log2
            n))``; averages exactly in ``log2 n`` steps for ``n`` a power of two), ``erdos_renyi`` (option ``p``,
            default (or ``None``) :data:`ERDOS_RENYI_P` = 0.5, and ``max_tries``; resampled with ``seed`` until
            connected), ``bipartite`` (complete bipartite between clients ``[0, n//2)`` and ``[n//2, n)``),
            ``complete``, ``star`` (option ``center``, default 0),
            ``custom`` (option ``path``: an edge list, whose edges get ``weights``, or a weight matrix, which is
            validated and used as is; the file declares which, see :func:`custom_file_format`).
        num_clients: number of clients; 1 gives the trivial ``[[1]]`` matrix for every name (``custom`` still reads
            its file, which must then be the matrix ``[[1]]`` or an edge list without edges).
        seed: seed of random graphs.
        weights: ``metropolis`` (Metropolis-Hastings) or ``uniform``; see :func:`mixing_weights`.
        **options: per-topology options listed above.

    Returns:
        The :class:`Topology`.

    Raises:
        ValueError: unknown name, bad option, a custom matrix that fails :func:`check_mixing_matrix` (including one
            with spectral gap 0) or a custom edge list with a bad line (e.g. a self-loop ``i i``, named by its line
            number).
    """
    if name not in TOPOLOGY_NAMES:
        raise ValueError(f"unknown topology {name!r}: use one of {', '.join(TOPOLOGY_NAMES)}")
    if weights not in WEIGHT_SCHEMES:
        raise ValueError(f"unknown mixing weights {weights!r}: use one of {', '.join(WEIGHT_SCHEMES)}")
    if int(num_clients) != num_clients or num_clients < 1:
        raise ValueError(f"topology {name}: num_clients={num_clients} must be a positive integer")
    allowed = {"torus": {"rows", "cols"}, "erdos_renyi": {"p", "max_tries"}, "star": {"center"}, "custom": {"path"}}
    unknown = set(options) - allowed.get(name, set())
    if unknown:
        raise ValueError(
            f"topology {name}: unknown option(s) {', '.join(sorted(unknown))}; "
            f"accepted: {', '.join(sorted(allowed.get(name, set()))) or 'none'}"
        )
    if num_clients == 1 and name != "custom":  # a custom file is still read: it must describe one client
        return Topology(name, [np.ones((1, 1))])
    if name == "one_peer_exponential":
        return Topology(name, [mixing_weights(adj, weights) for adj in _one_peer_exponential(num_clients)])
    if name == "custom":
        kind, data = _read_custom(options.get("path"), num_clients)
        if kind == "matrix":
            if data.shape != (num_clients, num_clients):
                raise ValueError(
                    f"topology custom: matrix in {options['path']} has shape {data.shape}, "
                    f"expected ({num_clients}, {num_clients})"
                )
            try:
                return Topology(name, [check_mixing_matrix(data)])
            except ValueError as err:
                raise ValueError(f"topology custom ({options['path']}): {err}") from None
        adjacency = data
    elif name == "erdos_renyi":
        adjacency = _erdos_renyi(num_clients, seed=seed, **options)
    else:
        adjacency = _STATIC[name](num_clients, **options)
    if not _is_connected(adjacency):
        raise ValueError(f"topology {name}: the graph is not connected")
    return Topology(name, [mixing_weights(adjacency, weights)])

"""Everything that crosses between clients: which ranks form a client, their process groups, and neighbour mixing.

DECA clients never meet at a server. After each step a client's active block becomes ``sum_j W[i, j] x_j`` over its
graph neighbours and itself; data, gradients and moments stay home. This module turns launcher ranks into clients
(:class:`ClientLayout`), creates the process groups DeepSpeed needs to keep gradient averaging inside a client
(:class:`ClientGroups`, whose ``mpu`` DeepSpeed reads), and performs the exchange (:class:`Mixer`) with plain
``torch.distributed`` point-to-point calls, so it runs on NCCL and gloo alike (no deepspeed import here).

Hazards handled here, in one place:
- communication order: every rank creates every group in the same order; every exchange starts with a small header
  (block index, step, sender client, block size) so that a neighbour on another block or step is an error, never
  silently averaged; a neighbour that never answers is an error after ``timeout`` seconds, not a hang;
- memory: blocks are streamed in chunks, so receive buffers are ``chunk_bytes`` per neighbour, not block x degree;
- dtype: the wire may be bf16, the arithmetic is always fp32, and a client's own contribution is never rounded.
"""

from __future__ import annotations

import datetime
import math
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist

from deca_ds.errors import NeighbourError, first_line as _first_line

__all__ = [
    "ClientLayout", "ClientGroups", "ClientMPU", "Mixer", "MixStats", "accumulate_mix_", "mix_stacked_",
    "consensus_distance",
]

HEADER_FIELDS = ("block", "step", "client", "numel")


# ---------------------------------------------------------------------------------------------------------------
# Layout: ranks -> clients (pure)
# ---------------------------------------------------------------------------------------------------------------


class ClientLayout:
    """How world ranks form clients: ``ranks_per_client`` contiguous ranks per client.

    Client ``c`` owns ranks ``[c * ranks_per_client, (c + 1) * ranks_per_client)``; inside it a rank has
    ``local_rank = rank % ranks_per_client``. Pure arithmetic: no process group is needed.

    Attributes:
        world_size: number of ranks.
        rank: this process's global rank.
        ranks_per_client: ranks per client.
        num_clients: ``world_size // ranks_per_client``.
        client_id: the client this rank belongs to.
        local_rank: this rank's index inside its client.
    """

    def __init__(self, world_size: int, rank: int, ranks_per_client: int = 1):
        """Args:
            world_size: number of ranks (>= 1).
            rank: this process's rank in ``[0, world_size)``.
            ranks_per_client: ranks per client; must divide ``world_size``.

        Raises:
            ValueError: bad sizes; the message names ``clients.ranks_per_client`` when it does not divide the world.
        """
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        if ranks_per_client < 1 or world_size % ranks_per_client:
            raise ValueError(
                f"clients.ranks_per_client={ranks_per_client} does not divide the world size {world_size}: "
                f"use a divisor of {world_size}"
            )
        self.world_size = world_size
        self.rank = rank
        self.ranks_per_client = ranks_per_client
        self.num_clients = world_size // ranks_per_client
        self.client_id = rank // ranks_per_client
        self.local_rank = rank % ranks_per_client

    @classmethod
    def from_dist(cls, ranks_per_client: int = 1) -> "ClientLayout":
        """The layout of the initialized default process group."""
        return cls(dist.get_world_size(), dist.get_rank(), ranks_per_client)

    def client_ranks(self, client: int) -> list[int]:
        """Global ranks of ``client``, in local-rank order."""
        if not 0 <= client < self.num_clients:
            raise ValueError(f"client {client} is not in [0, {self.num_clients})")
        return list(range(client * self.ranks_per_client, (client + 1) * self.ranks_per_client))

    def peer_rank(self, client: int, local_rank: int) -> int:
        """Global rank of ``local_rank`` inside ``client``."""
        if not 0 <= local_rank < self.ranks_per_client:
            raise ValueError(f"local rank {local_rank} is not in [0, {self.ranks_per_client})")
        return self.client_ranks(client)[local_rank]

    def check_topology(self, topology) -> None:
        """Raise a one-line ``ValueError`` unless ``topology`` has exactly one node per client."""
        if topology.num_clients != self.num_clients:
            raise ValueError(
                f"topology.name={topology.name} has {topology.num_clients} clients but the launch has "
                f"{self.num_clients} clients (world size {self.world_size} / clients.ranks_per_client="
                f"{self.ranks_per_client})"
            )

    def __repr__(self) -> str:
        return (
            f"ClientLayout(world_size={self.world_size}, rank={self.rank}, ranks_per_client={self.ranks_per_client})"
        )


# ---------------------------------------------------------------------------------------------------------------
# Process groups and the DeepSpeed mpu
# ---------------------------------------------------------------------------------------------------------------


class ClientMPU:
    """Megatron-style ``mpu`` that makes DeepSpeed treat one client as its whole data-parallel world.

    DeepSpeed 0.19.8 reads these methods (``deepspeed/utils/groups.py``, ``bwc.py``, ``runtime/engine.py``,
    ``runtime/config.py``, ZeRO stages). Model, tensor, pipeline and sequence parallelism are all of size 1 (a
    singleton group); the data-parallel group is the client's ranks, so gradients are averaged inside a client and
    never across clients. ``initialize_sequence_parallel`` is deliberately absent: DeepSpeed takes its presence as
    "Ulysses SP" and would then ignore the data-parallel group.
    """

    def __init__(self, rank: int, dp_group, dp_ranks: Sequence[int], singleton_group):
        """Args:
            rank: this process's global rank.
            dp_group: the client's process group.
            dp_ranks: the client's global ranks.
            singleton_group: a group holding only this rank (model/tensor/pipeline/sequence parallel group).
        """
        self._rank = rank
        self._dp_group = dp_group
        self._dp_ranks = list(dp_ranks)
        self._single = singleton_group

    # data parallel = the client
    def get_data_parallel_group(self):
        """The client's process group."""
        return self._dp_group

    def get_data_parallel_world_size(self) -> int:
        """Ranks per client."""
        return len(self._dp_ranks)

    def get_data_parallel_rank(self) -> int:
        """This rank's index inside its client."""
        return self._dp_ranks.index(self._rank)

    def get_data_parallel_group_ranks(self) -> list[int]:
        """Global ranks of the client."""
        return list(self._dp_ranks)

    # model / tensor / slice parallel: size 1
    def get_model_parallel_group(self):
        """A group of this rank alone."""
        return self._single

    def get_model_parallel_world_size(self) -> int:
        """Always 1."""
        return 1

    def get_model_parallel_rank(self) -> int:
        """Always 0."""
        return 0

    def get_tensor_model_parallel_src_rank(self) -> int:
        """Global rank that broadcasts inside the (singleton) tensor-parallel group: this rank."""
        return self._rank

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_slice_parallel_group = get_model_parallel_group
    get_slice_parallel_world_size = get_model_parallel_world_size
    get_slice_parallel_rank = get_model_parallel_rank
    # pipeline and sequence parallel: size 1
    get_pipeline_model_parallel_group = get_model_parallel_group
    get_pipeline_model_parallel_world_size = get_model_parallel_world_size
    get_pipeline_model_parallel_rank = get_model_parallel_rank
    get_pipe_parallel_group = get_model_parallel_group
    get_pipe_parallel_world_size = get_model_parallel_world_size
    get_pipe_parallel_rank = get_model_parallel_rank
    get_sequence_parallel_group = get_model_parallel_group
    get_sequence_parallel_world_size = get_model_parallel_world_size
    get_sequence_parallel_rank = get_model_parallel_rank
    # sequence x data parallel = data parallel
    get_sequence_data_parallel_group = get_data_parallel_group
    get_sequence_data_parallel_world_size = get_data_parallel_world_size
    get_sequence_data_parallel_rank = get_data_parallel_rank


class ClientGroups:
    """The process groups of one rank: its client's data-parallel group, its singleton group and its peer group.

    Attributes:
        layout: the :class:`ClientLayout`.
        client_group: the client's data-parallel group (pass as ``Mixer(dp_group=...)``).
        singleton_group: a group of this rank alone (model-parallel group of the mpu).
        peer_group: the ranks with this rank's local rank in every client (one rank per client; ``WORLD`` when
            ``ranks_per_client == 1``); use it for :func:`consensus_distance`.
        mpu: the :class:`ClientMPU` to pass to ``deepspeed.initialize(mpu=...)``.
    """

    def __init__(self, layout: ClientLayout, client_group, singleton_group, peer_group):
        """Prefer :meth:`create`, which builds the groups collectively."""
        self.layout = layout
        self.client_group = client_group
        self.singleton_group = singleton_group
        self.peer_group = peer_group
        self.mpu = ClientMPU(layout.rank, client_group, layout.client_ranks(layout.client_id), singleton_group)

    @classmethod
    def create(cls, layout: ClientLayout, backend_timeout=None) -> "ClientGroups":
        """Create every group, collectively: call it on every rank, before ``deepspeed.initialize``.

        Order (identical on every rank, as ``new_group`` requires): one group per client (skipped when
        ``ranks_per_client == 1``: the singleton groups are the clients then), one singleton group per rank, one peer
        group per local rank (only when ``ranks_per_client > 1``).

        Args:
            layout: the client layout; must match the initialized default group.
            backend_timeout: timeout of the new groups' collectives (seconds or ``timedelta``); default: the
                default group's.

        Raises:
            RuntimeError: torch.distributed is not initialized or its size/rank differ from ``layout``.
        """
        if not dist.is_initialized():
            raise RuntimeError("ClientGroups.create needs an initialized torch.distributed default group")
        if (dist.get_world_size(), dist.get_rank()) != (layout.world_size, layout.rank):
            raise RuntimeError(
                f"{layout!r} does not match torch.distributed (world size {dist.get_world_size()}, "
                f"rank {dist.get_rank()})"
            )
        kwargs = {}
        if backend_timeout is not None:
            if not isinstance(backend_timeout, datetime.timedelta):
                backend_timeout = datetime.timedelta(seconds=float(backend_timeout))
            kwargs["timeout"] = backend_timeout
        rpc = layout.ranks_per_client
        client_group = None
        if rpc > 1:
            for c in range(layout.num_clients):
                g = dist.new_group(layout.client_ranks(c), **kwargs)
                if c == layout.client_id:
                    client_group = g
        singleton = None
        for r in range(layout.world_size):
            g = dist.new_group([r], **kwargs)
            if r == layout.rank:
                singleton = g
        if rpc == 1:
            client_group, peer_group = singleton, dist.group.WORLD
        else:
            peer_group = None
            for local in range(rpc):
                g = dist.new_group([layout.peer_rank(c, local) for c in range(layout.num_clients)], **kwargs)
                if local == layout.local_rank:
                    peer_group = g
        return cls(layout, client_group, singleton, peer_group)


# ---------------------------------------------------------------------------------------------------------------
# Mixing
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class MixStats:
    """What one :meth:`Mixer.mix_` call moved between clients (this rank only).

    Attributes:
        bytes_sent: bytes this rank sent to other clients (header plus payload; intra-client all-gather excluded).
        bytes_received: bytes this rank received from other clients (same accounting).
        seconds: wall-clock time of the call.
    """

    bytes_sent: int
    bytes_received: int
    seconds: float


class _FlatView:
    """The tensors of a block seen as one flat vector, read and written by element range without concatenating."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        self.flats = [t.view(-1) for t in tensors]
        self.offsets = np.cumsum([0] + [f.numel() for f in self.flats]).tolist()
        self.numel = self.offsets[-1]

    def _pieces(self, a: int, b: int):
        """Yield (flat tensor, start, end inside it, start inside the range) covering ``[a, b)``."""
        for k, flat in enumerate(self.flats):
            lo, hi = self.offsets[k], self.offsets[k + 1]
            s, e = max(a, lo), min(b, hi)
            if s < e:
                yield flat, s - lo, e - lo, s - a

    def read(self, a: int, b: int, out: torch.Tensor) -> torch.Tensor:
        """Copy elements ``[a, b)`` into ``out[: b - a]`` (casting to ``out``'s dtype); return that slice."""
        for flat, s, e, o in self._pieces(a, b):
            out[o:o + e - s].copy_(flat[s:e])
        return out[: b - a]

    def direct(self, a: int, b: int):
        """The fp32 tensor slice holding elements ``[a, b)`` if they lie in one fp32 tensor, else ``None``."""
        pieces = list(self._pieces(a, b))
        if len(pieces) == 1 and pieces[0][0].dtype == torch.float32:
            flat, s, e, _ = pieces[0]
            return flat[s:e]
        return None

    def write(self, a: int, b: int, src: torch.Tensor) -> None:
        """Copy ``src[: b - a]`` into elements ``[a, b)`` (casting to each tensor's dtype)."""
        for flat, s, e, o in self._pieces(a, b):
            flat[s:e].copy_(src[o:o + e - s])


class Mixer:
    """Neighbour averaging of a block over the client graph: ``x_i <- sum_j W[i, j] x_j``, in place.

    Transport is ``dist.batch_isend_irecv`` between this rank and the same local rank of each neighbouring client.
    With ``ranks_per_client > 1`` each local rank mixes only its ``1/ranks_per_client`` shard of the block (flattened
    across tensors) and the client then all-gathers the shards in its data-parallel group, so every rank of a client
    ends with identical tensors and each rank moves ``1/ranks_per_client`` of the block across the network.

    Attributes:
        total_bytes_sent: cumulative :attr:`MixStats.bytes_sent` over all calls.
        total_bytes_received: cumulative :attr:`MixStats.bytes_received`.
    """

    def __init__(self, layout: ClientLayout, topology, chunk_bytes: int = 64 << 20,
                 comm_dtype: torch.dtype = torch.float32, timeout: float = 300.0, dp_group=None):
        """Args:
            layout: the client layout (must match ``topology``'s size).
            topology: a :class:`deca_ds.topology.Topology`.
            chunk_bytes: wire bytes per neighbour per exchange round; receive buffers never exceed this per
                neighbour (the fp32 working buffers are ``chunk_bytes / wire itemsize * 4`` bytes, and the
                intra-client all-gather ``ranks_per_client`` times that).
            comm_dtype: wire dtype, ``torch.float32`` or ``torch.bfloat16`` (or ``float16``); arithmetic is fp32.
            timeout: seconds to wait for a neighbour before raising an error naming it.
            dp_group: the client's data-parallel group (``ClientGroups.client_group``); required when
                ``ranks_per_client > 1``.

        Raises:
            ValueError: sizes do not match or an argument is out of range.
        """
        layout.check_topology(topology)
        if comm_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"gossip comm_dtype {comm_dtype} is not supported: use torch.float32 or torch.bfloat16")
        if chunk_bytes <= 0:
            raise ValueError(f"gossip chunk_bytes={chunk_bytes} must be positive")
        if timeout <= 0:
            raise ValueError(f"gossip timeout={timeout} must be positive (seconds)")
        if layout.ranks_per_client > 1 and dp_group is None:
            raise ValueError(
                f"Mixer with clients.ranks_per_client={layout.ranks_per_client} needs dp_group "
                f"(ClientGroups.client_group) to all-gather the mixed shards inside the client"
            )
        self.layout = layout
        self.topology = topology
        self.comm_dtype = comm_dtype
        self.timeout = float(timeout)
        self.dp_group = dp_group
        self.chunk_numel = max(1, int(chunk_bytes) // torch.tensor([], dtype=comm_dtype).element_size())
        self.total_bytes_sent = 0
        self.total_bytes_received = 0

    # -- public -------------------------------------------------------------------------------------------------

    def shard_range(self, numel: int) -> tuple[int, int]:
        """Element range ``[start, end)`` of a ``numel``-element block that this rank exchanges."""
        shard = math.ceil(numel / self.layout.ranks_per_client)
        start = min(self.layout.local_rank * shard, numel)
        return start, min(start + shard, numel)

    def state_dict(self) -> dict[str, int]:
        """The cumulative byte counters, for checkpoints (``{"sent", "received"}``)."""
        return {"sent": self.total_bytes_sent, "received": self.total_bytes_received}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore :meth:`state_dict` output."""
        self.total_bytes_sent = state["sent"]
        self.total_bytes_received = state["received"]

    def mix_(self, tensors: Sequence[torch.Tensor], step: int, block_idx: int, presharded: bool = False) -> MixStats:
        """Replace this client's ``tensors`` by the ``topology.weights_at(step)``-weighted average with neighbours.

        Every rank of every client must call it with the same ``step`` and ``block_idx`` and tensors of the same
        total size (all ranks of a client with identical values). Single client, or no neighbour at this step: a
        no-op that moves zero bytes.

        Args:
            tensors: the active block's tensors (contiguous, floating point, one device); modified in place.
            step: optimizer step (selects the mixing matrix of time-varying graphs; checked against neighbours).
            block_idx: index of the active block (checked against neighbours).
            presharded: the tensors are this rank's own shard of the block (e.g. ZeRO-3 local partitions, identically
                shaped at the same local rank of every client): exchange them whole with the same local rank of
                neighbour clients and skip the intra-client all-gather. Ranks of a client then hold different values.

        Returns:
            :class:`MixStats` of this call.

        Raises:
            NeighbourError: a neighbour is on another block/step/block size, or did not answer within ``timeout``
                seconds; the message names the neighbour client and rank.
        """
        t0 = time.perf_counter()
        tensors = list(tensors)
        self._check_tensors(tensors)
        me = self.layout.client_id
        neighbors = self.topology.neighbors(me, step) if self.layout.num_clients > 1 else []
        if not neighbors:
            return MixStats(0, 0, time.perf_counter() - t0)
        device = tensors[0].device if tensors else torch.device("cpu")
        view = _FlatView(tensors)
        w = self.topology.weights_at(step)
        peers = [self.layout.peer_rank(c, self.layout.local_rank) for c in neighbors]

        # 1) header: refuse to average with a neighbour that is somewhere else in the schedule.
        header = torch.tensor([block_idx, step, me, view.numel], dtype=torch.int64, device=device)
        theirs = [torch.empty_like(header) for _ in peers]
        self._exchange(header, theirs, neighbors, peers, block_idx, step, "header")
        for c, p, h in zip(neighbors, peers, theirs):
            hb, hs, hc, hn = h.tolist()
            if (hb, hs, hc, hn) != (block_idx, step, c, view.numel):
                raise NeighbourError(
                    f"gossip mismatch with neighbour client {c} (rank {p}): it is on block {hb}, step {hs} with "
                    f"{hn} elements (sender client {hc}); we (client {me}, rank {self.layout.rank}) are on block "
                    f"{block_idx}, step {step} with {view.numel} elements"
                )

        # 2) payload, streamed in chunks: buffers are chunk-sized whatever the block size.
        start, end = (0, view.numel) if presharded else self.shard_range(view.numel)
        n = min(self.chunk_numel, max(end - start, 1))
        own = torch.empty(n, dtype=torch.float32, device=device)
        wire = own if self.comm_dtype == torch.float32 else torch.empty(n, dtype=self.comm_dtype, device=device)
        recv = [torch.empty(n, dtype=self.comm_dtype, device=device) for _ in peers]
        for a in range(start, end, self.chunk_numel):
            b = min(a + self.chunk_numel, end)
            # Zero-copy when the chunk is a slice of one fp32 tensor: send from it and accumulate into it.
            direct = view.direct(a, b)
            mine = direct if direct is not None else view.read(a, b, own)
            send = mine if self.comm_dtype == torch.float32 else wire[: b - a].copy_(mine)  # bf16: rounded here only
            got = [r[: b - a] for r in recv]
            self._exchange(send, got, neighbors, peers, block_idx, step, f"elements [{a}, {b})")
            # All sends completed above, so `mine` (which may be the send buffer) can be overwritten now.
            accumulate_mix_(mine, w[me, me], got, [w[me, c] for c in neighbors])
            if direct is None:
                view.write(a, b, mine)

        # 3) multi-rank clients: every rank of the client gets every mixed shard.
        if self.layout.ranks_per_client > 1 and not presharded:
            self._gather_shards(view, device)

        wire_bytes = (end - start) * wire.element_size() + header.numel() * header.element_size()
        sent = received = wire_bytes * len(peers)
        self.total_bytes_sent += sent
        self.total_bytes_received += received
        return MixStats(sent, received, time.perf_counter() - t0)

    # -- internals ----------------------------------------------------------------------------------------------

    @staticmethod
    def _check_tensors(tensors):
        for t in tensors:
            if not torch.is_floating_point(t):
                raise ValueError(f"gossip mixes floating-point tensors only, got {t.dtype}")
            if not t.is_contiguous():
                raise ValueError("gossip mixes contiguous tensors only (it writes through flat views)")
        if len({t.device for t in tensors}) > 1:
            raise ValueError(f"gossip tensors are on several devices: {sorted({str(t.device) for t in tensors})}")

    def _exchange(self, send, recvs, neighbors, peers, block_idx, step, what):
        """Send ``send`` to every peer and receive one tensor from each; errors name the neighbour."""
        ops = []
        for p, r in zip(peers, recvs):
            ops.append(dist.P2POp(dist.irecv, r, p))
            ops.append(dist.P2POp(dist.isend, send, p))
        try:
            works = dist.batch_isend_irecv(ops)
        except RuntimeError as err:  # gloo refuses to post to a peer whose connection is already closed
            raise NeighbourError(
                f"gossip: neighbour clients {', '.join(map(str, neighbors))} (ranks {', '.join(map(str, peers))}) "
                f"could not be reached ({what} of block {block_idx}, step {step}; we are client "
                f"{self.layout.client_id}, rank {self.layout.rank}): {_first_line(err)}") from err
        if len(works) != len(ops):  # coalescing backends (NCCL) return one work for the whole batch
            names, ranks = ", ".join(map(str, neighbors)), ", ".join(map(str, peers))
            for work in works:
                self._wait(work, names, ranks, block_idx, step, what)
            return
        deadline = time.monotonic() + self.timeout
        # Receives first: a silent neighbour shows up as a receive that never completes.
        for k in list(range(0, len(works), 2)) + list(range(1, len(works), 2)):
            c, p = neighbors[k // 2], peers[k // 2]
            self._wait(works[k], c, p, block_idx, step, what, max(deadline - time.monotonic(), 0.001))

    def _wait(self, work, client, rank, block_idx, step, what, seconds=None):
        seconds = self.timeout if seconds is None else seconds
        try:
            work.wait(datetime.timedelta(seconds=seconds))
        except Exception as err:  # noqa: BLE001 - re-raised with the neighbour's name
            reason = _first_line(err)
            raise NeighbourError(
                f"gossip: neighbour client {client} (rank {rank}) did not answer within {self.timeout:g} s "
                f"({what} of block {block_idx}, step {step}; we are client {self.layout.client_id}, rank "
                f"{self.layout.rank}): {reason}"
            ) from err

    def _gather_shards(self, view: _FlatView, device) -> None:
        """All-gather the mixed shards inside the client, chunk by chunk (same loop count on every rank)."""
        rpc = self.layout.ranks_per_client
        shard = math.ceil(view.numel / rpc)
        if shard == 0:
            return
        mine_start, mine_end = self.shard_range(view.numel)
        n = min(self.chunk_numel, shard)
        inp = torch.zeros(n, dtype=torch.float32, device=device)
        outs = [torch.empty(n, dtype=torch.float32, device=device) for _ in range(rpc)]
        for o in range(0, shard, self.chunk_numel):
            length = min(self.chunk_numel, shard - o)
            a, b = min(mine_start + o, mine_end), min(mine_start + o + length, mine_end)
            # fp32 copies of the already-written (possibly bf16-rounded) values: every rank writes identical bits.
            view.read(a, b, inp)
            work = dist.all_gather([t[:length] for t in outs], inp[:length], group=self.dp_group, async_op=True)
            try:
                work.wait(datetime.timedelta(seconds=self.timeout))
            except Exception as err:  # noqa: BLE001
                raise NeighbourError(
                    f"gossip: all-gather of mixed shards inside client {self.layout.client_id} did not complete "
                    f"within {self.timeout:g} s: {err}"
                ) from err
            for r in range(rpc):
                if r == self.layout.local_rank:
                    continue
                rs = min(r * shard + o, view.numel)
                re_ = min(r * shard + o + length, (r + 1) * shard, view.numel)
                if rs < re_:
                    view.write(rs, re_, outs[r])


def accumulate_mix_(mine: torch.Tensor, own_weight: float, received: Sequence[torch.Tensor],
                    weights: Sequence[float]) -> torch.Tensor:
    """One client's mixing arithmetic, in place: ``mine <- own_weight * mine + sum_k weights[k] * received[k]``.

    The one place this arithmetic is written: :meth:`Mixer.mix_` applies it to every chunk it exchanges, and the
    simulator to every tensor of the block, in the same order (own term first, then neighbours in
    ``Topology.neighbors`` order) with the same operations, so both round identically (each element is computed
    on its own, so how a block is cut into chunks does not change the result).

    Args:
        mine: this client's values (fp32), overwritten with the mixture.
        own_weight: ``W[i, i]``; this client's own contribution keeps full precision.
        received: the neighbours' values as they came over the wire (fp32, or bf16: promoted, accumulated in fp32).
        weights: ``W[i, j]`` of each neighbour, in ``received`` order.

    Returns:
        ``mine``.
    """
    mine.mul_(float(own_weight))
    for r, w in zip(received, weights):
        mine.add_(r, alpha=float(w))
    return mine


def mix_stacked_(stacked: torch.Tensor, weights) -> torch.Tensor:
    """Single-process mixing: ``stacked[i] <- sum_j W[i, j] stacked[j]`` for all clients at once, in place.

    Args:
        stacked: tensor of shape ``(num_clients, ...)``, one slice per client (any floating dtype).
        weights: ``num_clients x num_clients`` mixing matrix (numpy or tensor).

    Returns:
        ``stacked`` (mixed with fp32 arithmetic, then cast back to its dtype).
    """
    n = stacked.shape[0]
    w = torch.as_tensor(np.asarray(weights), dtype=torch.float32, device=stacked.device)
    if tuple(w.shape) != (n, n):
        raise ValueError(f"mix_stacked_: weights of shape {tuple(w.shape)} for {n} stacked clients")
    flat = stacked.reshape(n, -1).to(torch.float32)
    stacked.copy_((w @ flat).view(stacked.shape))
    return stacked


def consensus_distance(tensors: Sequence[torch.Tensor], group=None, chunk_numel: int = 16 << 20) -> float:
    """Root-mean-square deviation of the clients' copies of a block from their network average.

    ``sqrt( 1/(n P) * sum_i ||x_i - xbar||^2 )`` with ``n`` clients, ``P`` elements per block and ``xbar`` the
    average over clients: the typical per-element disagreement, in the parameters' units (0 at consensus).

    Collective over ``group``: pass ``ClientGroups.peer_group`` (one rank per client), or ``WORLD`` (default): as
    every client holds its block identically on all its ranks and all clients have the same number of ranks, counting
    each client ``ranks_per_client`` times leaves the value unchanged. Two passes (network average, then deviations),
    chunked; the average is reduced in fp32, so deviations below ~1e-7 x |x| are not resolved.

    Args:
        tensors: this client's tensors of the block.
        group: process group with one (or every) rank per client.
        chunk_numel: elements per all-reduce round (bounds the extra memory).

    Returns:
        The distance (same value on every rank of ``group``).
    """
    tensors = list(tensors)
    view = _FlatView(tensors)
    n = dist.get_world_size(group)
    device = tensors[0].device if tensors else torch.device("cpu")
    buf = torch.empty(max(1, min(chunk_numel, view.numel)), dtype=torch.float32, device=device)
    mine = torch.empty_like(buf)
    sq = torch.zeros((), dtype=torch.float64, device=device)
    for a in range(0, view.numel, chunk_numel):
        b = min(a + chunk_numel, view.numel)
        total = view.read(a, b, buf)
        own = view.read(a, b, mine)
        dist.all_reduce(total, group=group)
        total.div_(n)
        sq += (own - total).double().square().sum()
    dist.all_reduce(sq, group=group)
    return math.sqrt(sq.item() / (n * max(view.numel, 1)))

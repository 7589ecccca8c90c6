"""Everything that crosses between clients: which ranks form a client, their process groups, and neighbour mixing.

DECA clients never meet at a server. After each step a client's active block becomes ``sum_j W[i, j] x_j`` over its
graph neighbours and itself; data, gradients and moments stay home. This module turns launcher ranks into clients
(:class:`ClientLayout`), creates the process groups DeepSpeed needs to keep gradient averaging inside a client
(:class:`ClientGroups`, whose ``mpu`` DeepSpeed reads), and performs the exchange (:class:`Mixer`) with plain
``torch.distributed`` point-to-point calls, so it runs on NCCL and gloo alike (no deepspeed import here).

Hazards handled here, in one place:
- communication order: every rank creates every group in the same order; every exchange sends a small header
  (block index, step, sender client, block size) ahead of its first piece, checked before anything is mixed, so a
  neighbour on another block or step is an error, never silently averaged; a neighbour that never answers is an
  error naming it after ``timeout`` seconds, not a hang;
- memory: blocks travel in pieces, a few in flight at once, so receive buffers are ``chunk_bytes`` per neighbour,
  not block x degree; fp32 tensors are sent from and mixed into their own memory;
- dtype: the wire may be bf16 or compressed (:mod:`deca_ds.compression`, with error feedback), the arithmetic is
  always fp32, and a client's own contribution is never rounded.
"""

from __future__ import annotations

import datetime
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist

from deca_ds.errors import NeighbourError, first_line as _first_line
from deca_ds.compression import COMPRESSIONS, FIRST_EXCHANGE_CODEC, ErrorFeedback

__all__ = [
    "ClientLayout", "ClientGroups", "ClientMPU", "Mixer", "MixStats", "accumulate_mix_", "mix_stacked_",
    "consensus_distance", "client_distance", "plan_pieces", "pack_pieces", "PIECES_PER_CHUNK", "PACK_BYTES", "HEADER_BYTES",
]

HEADER_FIELDS = ("block", "step", "client", "numel")
HEADER_BYTES = 8 * len(HEADER_FIELDS)
"""Bytes of the int64 header sent to each neighbour once per exchange (counted in :class:`MixStats`)."""


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

    def write(self, a: int, b: int, src: torch.Tensor) -> None:
        """Copy ``src[: b - a]`` into elements ``[a, b)`` (casting to each tensor's dtype)."""
        for flat, s, e, o in self._pieces(a, b):
            flat[s:e].copy_(src[o:o + e - s])


PIECES_PER_CHUNK = 8
"""A piece of a block carries at most ``chunk_bytes / PIECES_PER_CHUNK`` bytes, so several are in flight at once."""
PACK_BYTES = 1 << 20
"""Uncompressed, whole tensors of at most this many wire bytes travel packed together in one message (a copy of
each into a send buffer, up to one piece in all) instead of one message each: below a few hundred KB a message
costs more than the copy."""
_ALIGN = 64  # bytes: every region of the arenas starts here, so any wire dtype can view it
_VECTOR_ALIGN = 64
"""Pieces start at multiples of this many elements of a tensor (unless a piece is smaller): torch's CPU kernels run
SIMD loops from a tensor's first element and finish the tail in scalar code, which may round differently (fused
multiply-add), so a piece must begin on the same SIMD lane grid as its whole tensor for both to round alike."""


def plan_pieces(numels: Sequence[int], start: int, end: int, max_numel: int) -> list[tuple[int, int, int, int]]:
    """Cut elements ``[start, end)`` of tensors laid end to end into the pieces one exchange sends.

    A piece lies inside one tensor (so it is sent straight from the tensor's memory) and holds at most ``max_numel``
    elements; a tensor's part of the range is cut at multiples of ``max_numel`` from its first element in the range
    (so when ``max_numel`` is a multiple of the quantization group size, a tensor's groups are the same whether it
    is sent whole or in pieces).

    Args:
        numels: element counts of the tensors, in order.
        start, end: the range to cover (a rank's shard, or everything).
        max_numel: the largest piece (>= 1).

    Returns:
        ``(tensor index, first element, end element, offset)`` per piece, in range order; element positions are
        inside the tensor, ``offset`` is the piece's position inside ``[start, end)``.
    """
    pieces, base = [], 0
    for k, n in enumerate(numels):
        lo, hi = max(start - base, 0), min(end - base, n)
        for a in range(lo, hi, max_numel):
            b = min(a + max_numel, hi)
            pieces.append((k, a, b, base + a - start))
        base += n
    return pieces


def pack_pieces(numels: Sequence[int], pieces: Sequence[tuple[int, int, int, int]], pack_numel: int,
                max_numel: int) -> list[list[tuple[int, int, int, int]]]:
    """Group consecutive pieces of small whole tensors into one message each; every other piece travels alone.

    A piece joins a group when it starts at its tensor's first element (so each member is mixed on its tensor's
    own SIMD grid, like the simulator's whole tensor) and holds at most ``pack_numel`` elements, and the group
    stays within ``max_numel`` elements.

    Args:
        numels: element counts of the tensors (as for :func:`plan_pieces`).
        pieces: :func:`plan_pieces` output.
        pack_numel: largest member (0: no packing).
        max_numel: largest group.

    Returns:
        The pieces in order, as groups (lists of one or more pieces).
    """
    groups: list[list[tuple[int, int, int, int]]] = []
    run: list[tuple[int, int, int, int]] = []
    for piece in pieces:
        _, lo, hi, _ = piece
        if pack_numel > 0 and lo == 0 and hi - lo <= pack_numel:
            if run and sum(p[2] - p[1] for p in run) + hi - lo > max_numel:
                groups.append(run)
                run = []
            run.append(piece)
            continue
        if run:
            groups.append(run)
            run = []
        groups.append([piece])
    if run:
        groups.append(run)
    return groups


class Mixer:
    """Neighbour averaging of a block over the client graph: ``x_i <- sum_j W[i, j] x_j``, in place.

    Transport is ``dist.batch_isend_irecv`` between this rank and the same local rank of each neighbouring client.
    With ``ranks_per_client > 1`` each local rank mixes only its ``1/ranks_per_client`` shard of the block (flattened
    across tensors) and the client then all-gathers the shards in its data-parallel group, so every rank of a client
    ends with identical tensors and each rank moves ``1/ranks_per_client`` of the block across the network.

    One exchange is pipelined: the block is cut into pieces (:func:`plan_pieces`, each inside one tensor, at most
    ``chunk_bytes / PIECES_PER_CHUNK`` bytes), every piece is posted as soon as its receive buffers are free (a block
    that fits in ``chunk_bytes`` is posted whole at once), and each piece is mixed as soon as it arrived while the
    next ones travel. Receive buffers are one arena per neighbour, used as a ring, at most ``chunk_bytes``. fp32
    tensors are sent from their own memory and mixed in place (no staging copy), except runs of small whole
    tensors (:data:`PACK_BYTES`, uncompressed), copied together into one message (:func:`pack_pieces`). The header
    (block, step, client, size) travels ahead of the first piece in the same round, not in a round-trip of its own,
    and is checked before any piece is mixed. Arithmetic is :func:`accumulate_mix_` (or
    :meth:`deca_ds.compression.ErrorFeedback.mix_`) per piece, own term first, then neighbours in
    ``Topology.neighbors`` order, whatever order the pieces arrive in: the result does not depend on the pipelining.

    Hazard (gloo): a message longer than the receive posted for it aborts the receiving process from gloo's own
    thread, before any header could be checked. On gloo every receive is therefore posted with room for the longest
    piece a neighbour can send (the arena keeps that much slack), so a neighbour with a different block size is
    reported by the header check instead; its longer messages may only scribble over pieces that are then never
    mixed. NCCL needs equal send and receive counts, so there receives are exact.

    Attributes:
        total_bytes_sent: cumulative :attr:`MixStats.bytes_sent` over all calls.
        total_bytes_received: cumulative :attr:`MixStats.bytes_received`.
        compression: ``gossip.compression`` (``none``, ``bf16``, ``int8``, ``int4``).
        piece_numel: largest piece, in elements.
    """

    def __init__(self, layout: ClientLayout, topology, chunk_bytes: int = 64 << 20,
                 comm_dtype: torch.dtype = torch.float32, timeout: float = 300.0, dp_group=None,
                 compression: str = "none"):
        """Args:
            layout: the client layout (must match ``topology``'s size).
            topology: a :class:`deca_ds.topology.Topology`.
            chunk_bytes: receive buffers per neighbour never exceed this (nor one piece: with compression at least
                one 256-value group); a block smaller than it travels whole at once. Staging buffers (bf16 or
                compressed wire, fp32 copies of non-fp32 tensors) are as large again, and the intra-client
                all-gather uses ``ranks_per_client`` times ``chunk_bytes`` of fp32.
            comm_dtype: wire dtype without compression, ``torch.float32`` or ``torch.bfloat16`` (or ``float16``);
                arithmetic is fp32.
            timeout: seconds to wait for a neighbour before raising an error naming it.
            dp_group: the client's data-parallel group (``ClientGroups.client_group``); required when
                ``ranks_per_client > 1``.
            compression: ``none``, or ``bf16``/``int8``/``int4`` with error feedback
                (:mod:`deca_ds.compression`; needs ``comm_dtype`` fp32 and a static graph).

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
        if compression not in COMPRESSIONS:
            raise ValueError(f"gossip.compression={compression!r} is not one of {', '.join(COMPRESSIONS)}")
        self.compression = compression
        self._feedback = None
        if compression != "none":
            if comm_dtype != torch.float32:
                raise ValueError(f"gossip.compression={compression} sets the wire format itself: leave the wire "
                                 f"dtype fp32 (gossip.dtype), not {comm_dtype}")
            if topology.time_varying:
                raise ValueError(f"gossip.compression={compression} keeps a running sum of fixed neighbours' "
                                 f"values; topology.name={topology.name} changes neighbours every step: use a "
                                 "static graph or gossip.compression=none")
            self._feedback = ErrorFeedback(compression)
            # Pieces are cut at multiples of the group size; sized for the larger of the two formats of a visit
            # (its first exchange is bf16, 2 bytes a value).
            group = self._feedback.codec.group_size
            self.piece_numel = max(group, int(chunk_bytes) // PIECES_PER_CHUNK // 2 // group * group)
            self._max_message = max(FIRST_EXCHANGE_CODEC.packet_bytes(self.piece_numel),
                                    self._feedback.codec.packet_bytes(self.piece_numel))
        else:
            itemsize = _itemsize(comm_dtype)
            numel = int(chunk_bytes) // PIECES_PER_CHUNK // itemsize
            self.piece_numel = numel // _VECTOR_ALIGN * _VECTOR_ALIGN or max(1, numel)
            self._max_message = self.piece_numel * itemsize
        # Packing copies: not with compression, whose quantization groups must start at each tensor (simulator).
        self.pack_numel = PACK_BYTES // _itemsize(comm_dtype) if compression == "none" else 0
        self.chunk_bytes = int(chunk_bytes)
        self.layout = layout
        self.topology = topology
        self.comm_dtype = comm_dtype
        self.timeout = float(timeout)
        self.dp_group = dp_group
        self.chunk_numel = max(1, int(chunk_bytes) // _itemsize(comm_dtype))
        self.total_bytes_sent = 0
        self.total_bytes_received = 0
        self._buffers: dict[tuple, torch.Tensor] = {}

    # -- public -------------------------------------------------------------------------------------------------

    def shard_range(self, numel: int) -> tuple[int, int]:
        """Element range ``[start, end)`` of a ``numel``-element block that this rank exchanges."""
        shard = math.ceil(numel / self.layout.ranks_per_client)
        start = min(self.layout.local_rank * shard, numel)
        return start, min(start + shard, numel)

    def state_dict(self) -> dict[str, Any]:
        """Cumulative byte counters (``sent``, ``received``) and, with compression, the error-feedback state
        (``feedback``): everything a resumed run needs to send the same bytes."""
        state: dict[str, Any] = {"sent": self.total_bytes_sent, "received": self.total_bytes_received}
        if self._feedback is not None:
            state["feedback"] = self._feedback.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output.

        Raises:
            ValueError: compression is on and ``state`` has no error-feedback state (it was written without
                compression), or it was written with another compression.
        """
        self.total_bytes_sent = state["sent"]
        self.total_bytes_received = state["received"]
        if self._feedback is not None:
            if "feedback" not in state:
                raise ValueError(f"this checkpoint has no gossip error-feedback state (written with "
                                 f"gossip.compression=none); it cannot resume with "
                                 f"gossip.compression={self.compression}")
            self._feedback.load_state_dict(state["feedback"])

    def mix_(self, tensors: Sequence[torch.Tensor], step: int, block_idx: int, presharded: bool = False) -> MixStats:
        """Replace this client's ``tensors`` by the ``topology.weights_at(step)``-weighted average with neighbours.

        Every rank of every client must call it with the same ``step`` and ``block_idx`` and tensors of the same
        shapes (all ranks of a client with identical values). Single client, or no neighbour at this step: a
        no-op that moves zero bytes. If it raises, the exchange is abandoned half-way (messages may still be in
        flight): stop the run.

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
        numels = [t.numel() for t in tensors]
        numel = sum(numels)
        start, end = (0, numel) if presharded else self.shard_range(numel)
        groups = pack_pieces(numels, plan_pieces(numels, start, end, self.piece_numel), self.pack_numel,
                             self.piece_numel)
        codec = self._feedback.begin(block_idx, end - start, device) if self._feedback is not None else None
        w = self.topology.weights_at(step)
        exchange = _Exchange(self, neighbors, block_idx, step, numel, device)
        flats = [t.view(-1) for t in tensors]
        sizes = [self._piece_sizes([flats[ti].dtype for ti, _, _, _ in g], sum(hi - lo for _, lo, hi, _ in g),
                                   codec) for g in groups]
        # Receive arenas: the whole range at once when it fits in chunk_bytes, else a ring of chunk_bytes; on gloo,
        # with one longest message of slack after any piece (see the class docstring).
        slack = _align(self._max_message) if exchange.tolerant else 0
        arena = max([max(r, slack) for _, r in sizes] + [min(sum(r for _, r in sizes) + slack, self.chunk_bytes)])
        ring = _Ring(arena)
        in_flight = exchange.in_flight
        for group, (count, reserve) in zip(groups, sizes):
            receive = max(reserve, slack)  # gloo: room for the longest piece a neighbour may send
            region = ring.place(reserve, receive)
            while in_flight and any(p.overlaps(region, reserve) for p in in_flight):
                self._finish(exchange, in_flight[0], w, codec)
                in_flight.popleft()
            receive_bytes = receive if slack else None
            if len(group) == 1:
                ti, lo, hi, offset = group[0]
                piece = self._start(exchange, arena, region, reserve, count, receive_bytes, flats[ti][lo:hi], offset,
                                    codec)
            else:
                piece = self._start_packed(exchange, arena, region, reserve, count, receive_bytes,
                                           [(flats[ti][lo:hi], offset) for ti, lo, hi, offset in group])
            in_flight.append(piece)
        while in_flight:
            self._finish(exchange, in_flight[0], w, codec)
            in_flight.popleft()
        exchange.check_headers()  # no-op unless there was no piece (an empty shard)
        exchange.wait_header_sends()
        if self._feedback is not None:
            self._feedback.end()

        # multi-rank clients: every rank of the client gets every mixed shard.
        if self.layout.ranks_per_client > 1 and not presharded:
            self._gather_shards(_FlatView(tensors), device)

        sent = received = (exchange.payload_bytes + HEADER_BYTES) * len(neighbors)
        self.total_bytes_sent += sent
        self.total_bytes_received += received
        return MixStats(sent, received, time.perf_counter() - t0)

    # -- internals ----------------------------------------------------------------------------------------------

    def _buffer(self, key: tuple, numel: int, dtype: torch.dtype, device) -> torch.Tensor:
        """A persistent work buffer of at least ``numel`` elements (reallocated only to grow or move)."""
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != torch.device(device):
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[key] = buf
        return buf

    def _piece_sizes(self, dtypes: Sequence[torch.dtype], n: int, codec) -> tuple[int, int]:
        """``(wire elements, bytes it takes in the arenas)`` of a piece of ``n`` values of tensors of ``dtypes``."""
        if codec is not None:
            count, itemsize = codec.packet_bytes(n), 1
        else:
            count, itemsize = n, _itemsize(self.comm_dtype)
        # fp32 copies of non-fp32 tensors live at the same place
        staged = 4 * n if any(d != torch.float32 for d in dtypes) else 0
        return count, _align(max(count * itemsize, staged))

    def _start(self, exchange: "_Exchange", arena: int, region: int, reserve: int, count: int,
               receive_bytes: int | None, flat: torch.Tensor, offset: int, codec) -> "_Piece":
        """Post one piece: its send to every neighbour and a receive from each, at ``region`` of the arenas.

        ``receive_bytes``: the capacity of each receive (gloo), or None for exactly ``count`` wire elements.
        """
        n, device = flat.numel(), flat.device
        if flat.dtype == torch.float32:
            values, target = flat, None  # sent from and mixed into the tensor itself
        else:
            own = self._buffer(("own",), arena, torch.uint8, device)
            values, target = own[region:region + 4 * n].view(torch.float32).copy_(flat), flat
        if codec is not None:
            scratch = self._buffer(("scratch",), 4 * self.piece_numel, torch.uint8, device).view(torch.float32)
            out = self._buffer(("send",), arena, torch.uint8, device)[region:]
            send = self._feedback.encode(codec, values, offset, out=out, scratch=scratch)
            wire = torch.uint8
        elif self.comm_dtype == torch.float32:
            send, wire = values, torch.float32
        else:  # bf16 wire: rounded here only, the own term stays fp32
            size = n * _itemsize(self.comm_dtype)
            staging = self._buffer(("send",), arena, torch.uint8, device)[region:region + size]
            send, wire = staging.view(self.comm_dtype).copy_(values), self.comm_dtype
        nbytes = receive_bytes if receive_bytes is not None else count * send.element_size()
        recvs = [self._buffer(("recv", k), arena, torch.uint8, device)[region:region + nbytes].view(wire)
                 for k in range(len(exchange.peers))]
        works = exchange.post(send, recvs)
        exchange.payload_bytes += send.numel() * send.element_size()
        return _Piece(values, target, offset, region, reserve, send, [r[:count] for r in recvs], works,
                      f"elements [{offset}, {offset + n}) of this rank's range")

    def _start_packed(self, exchange: "_Exchange", arena: int, region: int, reserve: int, count: int,
                      receive_bytes: int | None, members: Sequence[tuple[torch.Tensor, int]]) -> "_Piece":
        """Post several small whole tensors as one message (uncompressed): copied one after the other into the send
        buffer at ``region``; each is later mixed on its own, from its first element, into its own memory."""
        device = members[0][0].device
        wire = self.comm_dtype
        size = count * _itemsize(wire)
        send = self._buffer(("send",), arena, torch.uint8, device)[region:region + size].view(wire)
        parts, pos = [], 0
        for flat, _ in members:
            n = flat.numel()
            if flat.dtype == torch.float32:
                values, target = flat, None
            else:
                own = self._buffer(("own",), arena, torch.uint8, device)
                values, target = own[region + 4 * pos:region + 4 * (pos + n)].view(torch.float32).copy_(flat), flat
            send[pos:pos + n].copy_(values)  # rounded to the wire dtype here only
            parts.append((values, target, pos, n))
            pos += n
        nbytes = receive_bytes if receive_bytes is not None else size
        recvs = [self._buffer(("recv", k), arena, torch.uint8, device)[region:region + nbytes].view(wire)
                 for k in range(len(exchange.peers))]
        works = exchange.post(send, recvs)
        exchange.payload_bytes += size
        first, last = members[0][1], members[-1][1] + members[-1][0].numel()
        return _Piece(None, None, first, region, reserve, send, [r[:count] for r in recvs], works,
                      f"elements [{first}, {last}) of this rank's range ({len(members)} tensors packed)", parts)

    def _finish(self, exchange: "_Exchange", piece: "_Piece", w, codec) -> None:
        """Wait for one piece's messages, then mix it (own term first, neighbours in order) and write it back."""
        exchange.check_headers()
        exchange.wait(piece.works, piece.what)
        me, neighbors = self.layout.client_id, exchange.neighbors
        weights = [w[me, c] for c in neighbors]
        if piece.members is not None:  # packed small tensors: each mixed on its own grid, in its own memory
            for values, target, pos, n in piece.members:
                accumulate_mix_(values, w[me, me], [r[pos:pos + n] for r in piece.received], weights)
                if target is not None:
                    target.copy_(values)
            return
        if codec is not None:
            scratch = self._buffer(("scratch",), 4 * self.piece_numel, torch.uint8, piece.values.device)
            self._feedback.mix_(codec, piece.values, piece.offset, w[me, me], piece.received, weights,
                                scratch.view(torch.float32))
        else:
            accumulate_mix_(piece.values, w[me, me], piece.received, weights)
        if piece.target is not None:
            piece.target.copy_(piece.values)

    @staticmethod
    def _check_tensors(tensors):
        for t in tensors:
            if not torch.is_floating_point(t):
                raise ValueError(f"gossip mixes floating-point tensors only, got {t.dtype}")
            if not t.is_contiguous():
                raise ValueError("gossip mixes contiguous tensors only (it writes through flat views)")
        if len({t.device for t in tensors}) > 1:
            raise ValueError(f"gossip tensors are on several devices: {sorted({str(t.device) for t in tensors})}")

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


@dataclass
class _Piece:
    """One piece in flight: where its mixed values go, what was posted, and the works to wait for."""

    values: torch.Tensor | None  # fp32 values mixed in place (the tensor slice itself, or a copy); None if packed
    target: torch.Tensor | None  # the non-fp32 tensor slice to write the mixed values back to
    offset: int
    region: int  # its place in the arenas: bytes [region, region + reserve)
    reserve: int
    send: torch.Tensor  # kept alive until the send completed
    received: list[torch.Tensor]
    works: list
    what: str
    members: list | None = None  # packed pieces: (values, target, wire position, numel) per tensor

    def overlaps(self, start: int, size: int) -> bool:
        """Whether bytes ``[start, start + size)`` of the arenas meet this piece's place."""
        return start < self.region + self.reserve and self.region < start + size


def _align(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class _Ring:
    """Places of the pieces in the arenas, one after the other, starting over at 0 when the next would not fit."""

    def __init__(self, size: int):
        self.size, self.cursor = size, 0

    def place(self, reserve: int, extent: int) -> int:
        """Start of the next place: ``reserve`` bytes are used, ``extent`` (>= reserve) must lie inside."""
        start = self.cursor if self.cursor + extent <= self.size else 0
        self.cursor = start + reserve
        return start


class _Exchange:
    """One ``mix_`` call's messages: the header sent ahead of the pieces, its check, and waits that name neighbours."""

    def __init__(self, mixer: Mixer, neighbors: list[int], block_idx: int, step: int, numel: int, device):
        layout = mixer.layout
        self.mixer, self.neighbors, self.block_idx, self.step, self.numel = mixer, neighbors, block_idx, step, numel
        self.peers = [layout.peer_rank(c, layout.local_rank) for c in neighbors]
        # gloo aborts on a message longer than its receive: receive whole pieces' capacity there (see Mixer).
        self.tolerant = dist.get_backend() == "gloo"
        self.payload_bytes = 0
        self.header = torch.tensor([block_idx, step, layout.client_id, numel], dtype=torch.int64, device=device)
        self.theirs = [torch.empty_like(self.header) for _ in self.peers]
        self.header_works = self.post(self.header, self.theirs)
        self.in_flight: deque[_Piece] = deque()
        self.checked = False

    def post(self, send: torch.Tensor, recvs: Sequence[torch.Tensor]) -> list:
        """Send ``send`` to every peer and post one receive from each (receive first, per peer)."""
        ops = []
        for p, r in zip(self.peers, recvs):
            ops.append(dist.P2POp(dist.irecv, r, p))
            ops.append(dist.P2POp(dist.isend, send, p))
        try:
            return dist.batch_isend_irecv(ops)
        except RuntimeError as err:  # gloo refuses to post to a peer whose connection is already closed
            layout = self.mixer.layout
            raise NeighbourError(
                f"gossip: neighbour clients {', '.join(map(str, self.neighbors))} (ranks "
                f"{', '.join(map(str, self.peers))}) could not be reached (block {self.block_idx}, step {self.step}; "
                f"we are client {layout.client_id}, rank {layout.rank}): {_first_line(err)}") from err

    def check_headers(self) -> None:
        """Wait for the neighbours' headers (once) and refuse to mix with one somewhere else in the schedule."""
        if self.checked:
            return
        self.wait(self.header_works, "header", receives_only=True)
        me, rank = self.mixer.layout.client_id, self.mixer.layout.rank
        headers = [h.tolist() for h in self.theirs]
        for c, p, (hb, hs, hc, hn) in zip(self.neighbors, self.peers, headers):
            if (hb, hs, hc, hn) != (self.block_idx, self.step, c, self.numel):
                self._drain([h[3] == self.numel for h in headers])
                raise NeighbourError(
                    f"gossip mismatch with neighbour client {c} (rank {p}): it is on block {hb}, step {hs} with "
                    f"{hn} elements (sender client {hc}); we (client {me}, rank {rank}) are on block "
                    f"{self.block_idx}, step {self.step} with {self.numel} elements"
                )
        self.checked = True

    def _drain(self, same_size: list[bool]) -> None:
        """Before raising a mismatch: complete what was posted to neighbours with our block size.

        Each side posts the header and the same first pieces before it checks a header, so with an equal block size
        every message has its receive; letting them complete leaves no stray message on the connection for a later
        exchange to pick up. Best effort, bounded by the timeout; messages of a neighbour of another size are left.
        """
        if len(self.header_works) != 2 * len(self.peers):
            return  # coalesced (NCCL): nothing can be waited for per neighbour
        deadline = time.monotonic() + self.mixer.timeout
        works = []  # none of these was waited for yet: the header check comes before any piece's wait
        for k in range(len(self.peers)):
            if same_size[k]:
                works.append(self.header_works[2 * k + 1])  # our header's send to it
                for piece in self.in_flight:
                    works += piece.works[2 * k:2 * k + 2]  # the piece's receive from it and send to it
        for work in works:
            try:
                work.wait(datetime.timedelta(seconds=max(deadline - time.monotonic(), 0.001)))
            except Exception:  # noqa: BLE001 - the mismatch error that follows is the one to report
                return

    def wait_header_sends(self) -> None:
        """Wait for the header sends (they completed long ago unless something is wrong)."""
        if len(self.header_works) == 2 * len(self.peers):  # a coalesced batch was waited for whole already
            self.wait(self.header_works, "header", sends_only=True)

    def wait(self, works: list, what: str, receives_only: bool = False, sends_only: bool = False) -> None:
        """Wait for ``works`` (from :meth:`post`): receives first, in neighbour order, each error naming its peer.

        Hazard: a gloo receive work must be waited for once only (a second wait waits for another message).
        """
        if len(works) != 2 * len(self.peers):  # coalescing backends (NCCL) return one work for the whole batch
            names, ranks = ", ".join(map(str, self.neighbors)), ", ".join(map(str, self.peers))
            for work in works:
                self._wait(work, names, ranks, what)
            return
        # A silent neighbour shows up as a receive that never completes.
        receives, sends = list(range(0, len(works), 2)), list(range(1, len(works), 2))
        order = sends if sends_only else receives if receives_only else receives + sends
        for k in order:
            self._wait(works[k], self.neighbors[k // 2], self.peers[k // 2], what)

    def _wait(self, work, client, rank, what) -> None:
        mixer = self.mixer
        try:
            work.wait(datetime.timedelta(seconds=mixer.timeout))
        except Exception as err:  # noqa: BLE001 - re-raised with the neighbour's name
            reason = _first_line(err)
            raise NeighbourError(
                f"gossip: neighbour client {client} (rank {rank}) did not answer within {mixer.timeout:g} s "
                f"({what} of block {self.block_idx}, step {self.step}; we are client {mixer.layout.client_id}, "
                f"rank {mixer.layout.rank}): {reason}"
            ) from err


def accumulate_mix_(mine: torch.Tensor, own_weight: float, received: Sequence[torch.Tensor],
                    weights: Sequence[float]) -> torch.Tensor:
    """One client's mixing arithmetic, in place: ``mine <- own_weight * mine + sum_k weights[k] * received[k]``.

    The one place this arithmetic is written: :meth:`Mixer.mix_` applies it to every piece it exchanges, and the
    simulator to every tensor of the block, in the same order (own term first, then neighbours in
    ``Topology.neighbors`` order) with the same operations, so both round identically (each element is computed
    on its own; pieces start at multiples of :data:`_VECTOR_ALIGN` elements of a tensor, so SIMD and scalar code
    paths meet the same elements whether a tensor is mixed whole or in pieces).

    One pass over memory per neighbour: the sum is a chain of linear interpolations,
    ``mine <- lerp(mine, r_k, w_k / S_k)`` with ``S_k = own_weight + w_1 + ... + w_k``, which leaves
    ``(own_weight * mine + sum_{m<=k} w_m r_m) / S_k`` after neighbour ``k``; a mixing matrix's rows sum to 1, so
    the chain ends at the mixture (otherwise one more pass multiplies by the row sum). The usual form (scale, then
    one add per neighbour) makes one more pass over the block, which is a third of the exchange's arithmetic on a
    ring. A neighbour's values in another dtype than ``mine`` (a bf16 wire) take that usual form, the promotion to
    fp32 done inside the add.

    Args:
        mine: this client's values (fp32), overwritten with the mixture.
        own_weight: ``W[i, i]``; this client's own contribution keeps full precision.
        received: the neighbours' values as they came over the wire (fp32, or bf16: promoted, accumulated in fp32).
        weights: ``W[i, j]`` of each neighbour, in ``received`` order.

    Returns:
        ``mine``.
    """
    if any(r.dtype != mine.dtype for r in received):
        mine.mul_(float(own_weight))
        for r, w in zip(received, weights):
            mine.add_(r, alpha=float(w))
        return mine
    total = float(own_weight)
    for r, w in zip(received, weights):
        total += float(w)
        if total > 0.0:  # else every weight so far is 0 and so is the mixture's part that is built
            mine.lerp_(r, float(w) / total)
    if abs(total - 1.0) > 1e-12:  # below fp32's resolution otherwise: a row of a mixing matrix sums to 1
        mine.mul_(total)
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


def client_distance(tensors: list[torch.Tensor]) -> float:
    """RMS distance of this rank's block from the network average: ||x_i - mean_j x_j|| / sqrt(numel).

    One all-reduce per tensor over all ranks (every rank of a client holds the same values, and every client has
    the same number of ranks, so the world mean is the mean over clients). Monitoring only, at log steps; the
    launcher and ``deca_ds.hf`` both report it (collective: every rank calls it with its block).

    Args:
        tensors: this rank's copy of the block's tensors.

    Returns:
        The RMS distance over every element of the block.
    """
    world = dist.get_world_size()
    sq, numel = 0.0, 0
    for x in tensors:
        mean = x.detach().float().clone()
        dist.all_reduce(mean)
        mean.div_(world)
        sq += float((x.detach().float() - mean).pow(2).sum())
        numel += x.numel()
    return math.sqrt(sq / max(numel, 1))

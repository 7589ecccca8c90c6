"""Compressed gossip with error feedback: what travels between clients when ``gossip.compression`` is set.

Why it exists: every step each client sends its whole active block to every neighbour. Between sites (a WAN) that
traffic is the bottleneck decentralized training exists to relieve, so the block can travel in 8 or 4 bits per
value instead of 32. Rounding a block that hard and averaging it as is would move every weight by the rounding
error each step; instead, each client sends the *change* of its block since what it sent before, and keeps what it
could not send for next time (error feedback), as in CHOCO-gossip (Koloskova, Stich & Jaggi, ICML 2019) with
consensus step 1. Client ``i`` keeps, for the range of the active block it exchanges:

- ``public``, ``x̂_i``: the sum of everything it has sent (its neighbours rebuild exactly this value);
- ``neighbour_sum``, ``s_i = Σ_{j≠i} W_ij x̂_j``: its neighbours' public copies, rebuilt from what it received.

One exchange, ``Q`` the codec and ``D`` its decoder::

    q_i = Q(x_i - x̂_i)                  # the change since last time plus the residual not sent before
    x̂_i += D(q_i)                       # the residual x_i - x̂_i is what stays home
    s_i += Σ_j W_ij D(q_j)              # in Topology.neighbors order
    x_i += s_i - (1 - W_ii) x̂_i         # = x_i + Σ_j W_ij (x̂_j - x̂_i)

So the sum over time of what was sent is ``x̂_i``, which equals the sum of what should have been sent (every change
of ``x_i``) minus the current residual, itself at most half a quantization step of the last exchange: nothing is
lost, it is only late. The mixing term ``Σ_j W_ij (x̂_j - x̂_i)`` sums to zero over clients for a symmetric ``W``,
so the network average is preserved exactly as by uncompressed gossip, and without compression
(``D(Q(v)) = v``) the update is ``W_ii x_i + Σ_j W_ij x_j``.

Choices:
- The first exchange of each visit of a block (the state is kept for the active block only, and reset when another
  block becomes active) has ``x̂ = 0``: it sends the block itself, which int8/int4 would round too coarsely, so that
  exchange travels in bf16 (2 bytes a value) whatever the codec; its rounding error is fed back like any other.
- int8/int4 are symmetric, with one bf16 scale (absmax / 127 or / 7, round to nearest) per group of
  :data:`GROUP_SIZE` consecutive values of a tensor; codes are round-half-to-even of ``v / scale``, clamped.
  Groups start at each tensor's (or piece's) first element, so cutting a tensor at multiples of ``GROUP_SIZE``
  encodes every value identically: the launcher's Mixer (pieces) and the simulator (whole tensors) agree bit for
  bit.
- The neighbour sum ``s_i`` needs a fixed ``W``: time-varying graphs (``one_peer_exponential``) are refused.
- Memory: two fp32 copies of the exchanged range of the active block (8 bytes per value), next to BlockAdam's 12.

Pure tensor code: no processes. :class:`ErrorFeedback` is one client's state; the Mixer drives it piece by piece,
and the simulator can drive one instance per client with whole tensors (same calls, same bits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from deca_ds.config import COMPRESSIONS

__all__ = ["COMPRESSIONS", "GROUP_SIZE", "Codec", "make_codec", "ErrorFeedback", "FIRST_EXCHANGE_CODEC",
           "ClientsExchange"]

GROUP_SIZE = 256
"""Values per quantization scale (int8/int4). Each group costs a 2-byte bf16 scale: 1/128 byte per value."""

_QMAX = {8: 127, 4: 7}


@dataclass(frozen=True)
class Codec:
    """How a vector of fp32 values becomes the bytes of one message, and back.

    A packet (a 1-D ``uint8`` tensor) is, for ``bf16``, the values rounded to bf16; for ``int8``/``int4``, the
    groups' bf16 scales followed by the codes (one signed byte per value, or two 4-bit codes ``code + 8`` per byte,
    low nibble first; an odd last value pads its byte with code 0).

    Attributes:
        name: ``bf16``, ``int8`` or ``int4``.
        bits: bits per value on the wire, scales not counted (16, 8, 4).
        group_size: values per scale (int8/int4).
    """

    name: str
    bits: int
    group_size: int = GROUP_SIZE

    @property
    def quantized(self) -> bool:
        """True for the integer codecs (int8/int4)."""
        return self.bits in _QMAX

    def packet_bytes(self, numel: int) -> int:
        """Bytes of the packet of ``numel`` values (scales included)."""
        if not self.quantized:
            return 2 * numel
        codes = numel if self.bits == 8 else (numel + 1) // 2
        return 2 * math.ceil(numel / self.group_size) + codes

    def encode(self, values: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Encode ``values`` (1-D fp32, contiguous) into a packet.

        Args:
            values: the values to send (not modified).
            out: a ``uint8`` buffer of at least :meth:`packet_bytes` bytes, 2-byte aligned; default: a new one.

        Returns:
            The packet: ``out[:packet_bytes(n)]``.
        """
        n = values.numel()
        nbytes = self.packet_bytes(n)
        if out is None:
            out = torch.empty(nbytes, dtype=torch.uint8, device=values.device)
        packet = out[:nbytes]
        if not self.quantized:
            packet.view(torch.bfloat16).copy_(values)
            return packet
        groups = math.ceil(n / self.group_size)
        scales = packet[: 2 * groups].view(torch.bfloat16)
        if n == 0:
            return packet
        qmax = _QMAX[self.bits]
        full, rest = _split_groups(values, self.group_size)
        absmax = torch.empty(groups, dtype=torch.float32, device=values.device)
        if full is not None:
            torch.amax(full.abs(), dim=1, out=absmax[: full.shape[0]])
        if rest is not None:
            absmax[-1] = rest.abs().amax()
        scales.copy_(absmax.div_(qmax))  # rounded to bf16 here: the scale both ends use
        s = scales.float()
        codes = torch.empty(n, dtype=torch.float32, device=values.device)
        cfull, crest = _split_groups(codes, self.group_size)
        # A zero scale (an all-zero group) sends code 0: its 0 / 0 quotients are overwritten.
        if full is not None:
            sf = s[: full.shape[0], None]
            torch.div(full, sf, out=cfull).masked_fill_(sf == 0, 0.0)
        if rest is not None:
            torch.div(rest, s[-1], out=crest).masked_fill_(s[-1] == 0, 0.0)
        codes.round_().clamp_(-qmax, qmax)
        body = packet[2 * groups:]
        if self.bits == 8:
            body.view(torch.int8).copy_(codes)
        else:
            nibbles = codes.add_(8).to(torch.uint8)
            pairs = n // 2
            torch.bitwise_or(nibbles[0:2 * pairs:2], nibbles[1:2 * pairs:2] << 4, out=body[:pairs])
            if n % 2:
                body[pairs] = nibbles[n - 1] | (8 << 4)
        return packet

    def decode(self, packet: torch.Tensor, numel: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Decode a packet of ``numel`` values into fp32.

        Args:
            packet: the bytes :meth:`encode` produced (at least :meth:`packet_bytes` of them; extra bytes ignored).
            numel: number of values.
            out: fp32 buffer of at least ``numel`` values; default: a new one.

        Returns:
            ``out[:numel]``: ``code * scale`` (int8/int4), or the bf16 values widened (bf16).
        """
        if out is None:
            out = torch.empty(numel, dtype=torch.float32, device=packet.device)
        values = out[:numel]
        if not self.quantized:
            values.copy_(packet[: 2 * numel].view(torch.bfloat16))
            return values
        if numel == 0:
            return values
        groups = math.ceil(numel / self.group_size)
        s = packet[: 2 * groups].view(torch.bfloat16).float()
        body = packet[2 * groups: self.packet_bytes(numel)]
        if self.bits == 8:
            values.copy_(body.view(torch.int8))
        else:
            pairs = numel // 2
            values[0:2 * pairs:2].copy_(body[:pairs] & 15)
            values[1:2 * pairs:2].copy_(body[:pairs] >> 4)
            if numel % 2:
                values[numel - 1] = body[pairs] & 15
            values.sub_(8)
        full, rest = _split_groups(values, self.group_size)
        if full is not None:
            full.mul_(s[: full.shape[0], None])
        if rest is not None:
            rest.mul_(s[-1])
        return values


def _split_groups(flat: torch.Tensor, group_size: int):
    """``(full groups as an (k, group_size) view or None, the last partial group or None)`` of a 1-D tensor."""
    n = flat.numel()
    k = n // group_size
    full = flat[: k * group_size].view(k, group_size) if k else None
    rest = flat[k * group_size:] if n > k * group_size else None
    return full, rest


_CODECS = {"bf16": Codec("bf16", 16), "int8": Codec("int8", 8), "int4": Codec("int4", 4)}

FIRST_EXCHANGE_CODEC = _CODECS["bf16"]
"""The codec of the first exchange of a block visit (it sends the block itself, not a change)."""


def make_codec(compression: str) -> Codec:
    """The :class:`Codec` of a ``gossip.compression`` value other than ``none``.

    Raises:
        ValueError: unknown name (``none`` has no codec: the exchange is uncompressed).
    """
    if compression not in _CODECS:
        raise ValueError(f"gossip.compression={compression!r} has no codec: use one of bf16, int8, int4 "
                         "(none is the uncompressed exchange)")
    return _CODECS[compression]


class ErrorFeedback:
    """One client's error-feedback state for the range of its active block that it exchanges.

    One exchange, for every client, is::

        codec = fb.begin(block_idx, numel, device)
        for every piece (offset, values) of the range, in any order:   # a piece: a tensor, or a slice of one
            packet = fb.encode(codec, values, offset)                      # send it to every neighbour
        for every piece, once the neighbours' packets of it arrived:
            fb.mix_(codec, values, offset, W_ii, [their packets], [W_ij])  # neighbours in Topology.neighbors order
        fb.end()

    ``values`` are fp32 views of the client's block (``mix_`` writes the mixed values into them); ``offset`` is the
    piece's first element inside the exchanged range. Pieces must cut tensors at multiples of ``codec.group_size``
    (any cut for ``bf16``) for two drivers to agree bit for bit.

    Attributes:
        compression: ``bf16``, ``int8`` or ``int4``.
        codec: the codec after the first exchange of a visit.
        block: index of the block the state belongs to (None before the first exchange).
        numel: values in the exchanged range.
        exchanges: completed exchanges of this block visit.
        public: ``x̂``, fp32, ``numel`` values (the sum of everything sent in this visit).
        neighbour_sum: ``Σ_j W_ij x̂_j``, fp32, ``numel`` values.
    """

    def __init__(self, compression: str):
        """Args:
            compression: ``bf16``, ``int8`` or ``int4``.

        Raises:
            ValueError: unknown compression.
        """
        self.codec = make_codec(compression)
        self.compression = compression
        self.block: int | None = None
        self.numel = 0
        self.exchanges = 0
        self.public = torch.zeros(0)
        self.neighbour_sum = torch.zeros(0)

    def begin(self, block_idx: int, numel: int, device: torch.device | str | None = None) -> Codec:
        """Start an exchange of ``block_idx`` (``numel`` values); reset the state when another block is active.

        Args:
            block_idx: the active block (a new one starts a new visit: zero state, bf16 first exchange).
            numel: values in the exchanged range.
            device: where the state lives (moved there if it is elsewhere, e.g. after loading a checkpoint).

        Returns:
            The codec of this exchange: :data:`FIRST_EXCHANGE_CODEC` on the first exchange of a visit, else
            :attr:`codec`.
        """
        device = torch.device(device) if device is not None else self.public.device
        if (block_idx, numel) != (self.block, self.numel):
            self.block, self.numel, self.exchanges = int(block_idx), int(numel), 0
            self.public = torch.zeros(numel, dtype=torch.float32, device=device)
            self.neighbour_sum = torch.zeros(numel, dtype=torch.float32, device=device)
        elif self.public.device != device:
            self.public, self.neighbour_sum = self.public.to(device), self.neighbour_sum.to(device)
        return FIRST_EXCHANGE_CODEC if self.exchanges == 0 else self.codec

    def encode(self, codec: Codec, values: torch.Tensor, offset: int, out: torch.Tensor | None = None,
               scratch: torch.Tensor | None = None) -> torch.Tensor:
        """The packet of one piece, ``codec(values - x̂)``; adds what it carries to ``x̂``.

        Args:
            codec: the codec :meth:`begin` returned.
            values: fp32, 1-D, contiguous: the client's current values of the piece (not modified).
            offset: the piece's first element inside the exchanged range.
            out: ``uint8`` buffer for the packet (see :meth:`Codec.encode`); default: a new one.
            scratch: fp32 work buffer of at least ``values.numel()``; default: a new one.

        Returns:
            The packet to send to every neighbour.
        """
        n = values.numel()
        public = self.public[offset:offset + n]
        change = torch.sub(values, public, out=scratch[:n] if scratch is not None else None)
        packet = codec.encode(change, out)
        public.add_(codec.decode(packet, n, out=change))
        return packet

    def mix_(self, codec: Codec, values: torch.Tensor, offset: int, own_weight: float,
             packets: Sequence[torch.Tensor], weights: Sequence[float],
             scratch: torch.Tensor | None = None) -> torch.Tensor:
        """Absorb the neighbours' packets of one piece and mix it in place: ``x += s - (1 - W_ii) x̂``.

        Call after :meth:`encode` of the same piece.

        Args:
            codec: the codec :meth:`begin` returned.
            values: the piece (fp32, 1-D, contiguous), overwritten with the mixed values.
            offset: the piece's first element inside the exchanged range.
            own_weight: ``W_ii``.
            packets: the neighbours' packets of this piece, in ``Topology.neighbors`` order.
            weights: ``W_ij`` of each neighbour, same order.
            scratch: fp32 work buffer of at least ``values.numel()``; default: a new one.

        Returns:
            ``values``.
        """
        n = values.numel()
        work = scratch[:n] if scratch is not None else torch.empty(n, dtype=torch.float32, device=values.device)
        neighbour_sum = self.neighbour_sum[offset:offset + n]
        for packet, w in zip(packets, weights):
            neighbour_sum.add_(codec.decode(packet, n, out=work), alpha=float(w))
        # s - (1 - W_ii) x̂ first: two nearly equal terms, their small difference is then added to x.
        torch.add(neighbour_sum, self.public[offset:offset + n], alpha=-(1.0 - float(own_weight)), out=work)
        return values.add_(work)

    def end(self) -> None:
        """Close an exchange (the next one of this visit uses :attr:`codec`)."""
        self.exchanges += 1

    def state_dict(self) -> dict[str, Any]:
        """The state, for checkpoints (CPU tensors, ints and a string: loadable with ``weights_only=True``)."""
        return {"compression": self.compression, "block": -1 if self.block is None else self.block,
                "numel": self.numel, "exchanges": self.exchanges,
                "public": self.public.detach().cpu().clone(),
                "neighbour_sum": self.neighbour_sum.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (tensors stay on the CPU until the next :meth:`begin`).

        Raises:
            ValueError: the state was written with another compression.
        """
        if state["compression"] != self.compression:
            raise ValueError(f"error-feedback state written with gossip.compression={state['compression']} cannot "
                             f"be loaded with gossip.compression={self.compression}")
        self.block = None if state["block"] < 0 else int(state["block"])
        self.numel, self.exchanges = int(state["numel"]), int(state["exchanges"])
        self.public = state["public"].to(torch.float32).clone()
        self.neighbour_sum = state["neighbour_sum"].to(torch.float32).clone()


class ClientsExchange:
    """Compressed gossip of one block for every client held in one process (the simulators), tensor by tensor.

    Construction opens the exchange (every client's :meth:`ErrorFeedback.begin`), :meth:`mix_` mixes the block's
    tensors in block order, :meth:`end` closes it. Per tensor every client encodes its row before any client mixes (a
    packet is the sender's change, never its mixed value), then each absorbs its neighbours' packets in
    ``neighbors[c]`` order: the calls each client's :class:`deca_ds.gossip.Mixer` makes for the pieces of this
    tensor, hence the same bits.

    Args:
        states: each client's error-feedback state.
        block_idx: the exchanged block.
        numel: values in the block (its tensors laid end to end).
        device: where the exchange computes.
        weights: the mixing matrix ``W`` (indexable as ``weights[c, j]``).
        neighbors: each client's neighbours, in ``Topology.neighbors`` order.
    """

    def __init__(self, states: Sequence[ErrorFeedback], block_idx: int, numel: int,
                 device: torch.device | str | None, weights, neighbors: Sequence[Sequence[int]]):
        self.states, self.weights, self.neighbors = states, weights, neighbors
        self.codecs = [s.begin(block_idx, numel, device) for s in states]
        self.offset = 0  # the next tensor's first element inside the exchanged range
        self.payload = 0  # bytes of one client's message to one neighbour so far (equal for every client)

    def mix_(self, rows: torch.Tensor) -> torch.Tensor:
        """Mix the block's next tensor for every client, in place.

        Args:
            rows: ``(num_clients, numel)`` fp32, row ``c`` client ``c``'s copy, each row contiguous (e.g.
                ``stacked.view(n, -1)``); overwritten with the mixed values.

        Returns:
            ``rows``.
        """
        n, states, codecs, w = rows.shape[0], self.states, self.codecs, self.weights
        packets = [states[c].encode(codecs[c], rows[c], self.offset) for c in range(n)]
        for c in range(n):
            states[c].mix_(codecs[c], rows[c], self.offset, w[c, c], [packets[j] for j in self.neighbors[c]],
                           [w[c, j] for j in self.neighbors[c]])
        self.offset += rows.shape[1]
        self.payload += packets[0].numel()
        return rows

    def end(self) -> int:
        """Close the exchange for every client.

        Returns:
            Bytes of one client's message to one neighbour (packets and scales, header excluded).
        """
        for s in self.states:
            s.end()
        return self.payload

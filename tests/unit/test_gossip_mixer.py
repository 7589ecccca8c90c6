"""The Mixer's exchange and arithmetic without processes: N clients as N threads over an in-process transport.

The fake transport stands in for ``torch.distributed``'s point-to-point calls as gloo behaves: sends are buffered,
a receive matches the next message from its peer in posting order (one gloo slot), and a message longer than the
receive posted for it is a failure (gloo aborts the receiving process). References are independent: the closed form
``W_t @ X`` per step (products of the per-step matrices for time-varying graphs), and for compressed gossip the same
clients mixed in one process by :class:`deca_ds.compression.ErrorFeedback` over whole tensors (what the simulator
does), which must agree bit for bit.
"""

from __future__ import annotations

import datetime
import math
import threading

import pytest
import torch

from deca_ds import gossip
from deca_ds.compression import GROUP_SIZE, ErrorFeedback
from deca_ds.gossip import HEADER_BYTES, ClientLayout, Mixer, accumulate_mix_, pack_pieces, plan_pieces
from deca_ds.topology import make_topology

SHAPES = [(3, 5), (7,), (2, 2, 2), (1,)]  # 31 elements
NUMEL = sum(math.prod(s) for s in SHAPES)


class _Done:
    def wait(self, timeout=None):
        return True


class _Recv:
    def __init__(self, transport, src, dst, seq, tensor):
        self.transport, self.key, self.seq, self.tensor = transport, (src, dst), seq, tensor

    def wait(self, timeout=None):
        t = self.transport
        seconds = timeout.total_seconds() if isinstance(timeout, datetime.timedelta) else 60.0
        with t.cond:
            if not t.cond.wait_for(lambda: self.seq in t.sent[self.key], timeout=seconds):
                raise RuntimeError(f"Timed out waiting {seconds * 1000:.0f}ms for recv operation to complete")
            msg = t.sent[self.key].pop(self.seq)
        dst = self.tensor.view(-1).view(torch.uint8)
        if msg.numel() > dst.numel():
            t.overflows.append((self.key, msg.numel(), dst.numel()))
            raise AssertionError(f"message of {msg.numel()} bytes into a receive of {dst.numel()}: gloo aborts")
        dst[: msg.numel()].copy_(msg)
        return True


class FakeDist:
    """The slice of ``torch.distributed`` the Mixer uses, for ranks that are threads of one process."""

    def __init__(self, world_size: int):
        self.cond = threading.Condition()
        self.sent = {(s, d): {} for s in range(world_size) for d in range(world_size)}
        self.sends = {k: 0 for k in self.sent}
        self.recvs = {k: 0 for k in self.sent}
        self.local = threading.local()
        self.posted = {k: {} for k in self.sent}  # receive capacities in bytes, by message sequence number
        self.overflows = []

    @staticmethod
    def isend(*args):
        raise AssertionError("the Mixer posts through batch_isend_irecv")

    @staticmethod
    def irecv(*args):
        raise AssertionError("the Mixer posts through batch_isend_irecv")

    def P2POp(self, op, tensor, peer):  # noqa: N802 - torch's name
        return op, tensor, peer

    def batch_isend_irecv(self, ops):
        me, works = self.local.rank, []
        for op, tensor, peer in ops:
            nbytes = tensor.numel() * tensor.element_size()
            with self.cond:
                if op is self.isend:
                    key = (me, peer)
                    seq = self.sends[key]
                    self.sent[key][seq] = tensor.detach().reshape(-1).view(torch.uint8).clone()
                    self.sends[key] += 1
                    self.cond.notify_all()
                    works.append(_Done())
                else:
                    key = (peer, me)
                    seq = self.recvs[key]
                    self.posted[key][seq] = nbytes
                    self.recvs[key] += 1
                    works.append(_Recv(self, peer, me, seq, tensor))
                # gloo checks a message against its receive when both exist, whether or not anyone waits
                msg, capacity = self.sent[key].get(seq), self.posted[key].get(seq)
                if msg is not None and capacity is not None and msg.numel() > capacity:
                    self.overflows.append((key, seq, msg.numel(), capacity))
        return works

    @staticmethod
    def get_backend(group=None):
        return "gloo"

    def run(self, fn, world_size: int) -> list:
        """``fn(rank)`` on one thread per rank; returns the results (an exception is returned, not raised)."""
        results = [None] * world_size

        def body(rank):
            self.local.rank = rank
            try:
                results[rank] = fn(rank)
            except Exception as err:  # noqa: BLE001 - inspected by the test
                results[rank] = err

        threads = [threading.Thread(target=body, args=(r,)) for r in range(world_size)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        return results


@pytest.fixture
def transport(monkeypatch):
    def make(world_size):
        fake = FakeDist(world_size)
        monkeypatch.setattr(gossip, "dist", fake)
        return fake

    return make


def _block(client, shapes=SHAPES, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1000 + client)
    return [torch.randn(s, generator=gen).to(dtype) for s in shapes]


def _flat(tensors):
    return torch.cat([t.reshape(-1).double() for t in tensors])


def test_plan_pieces_cuts_inside_tensors_at_piece_multiples():
    assert plan_pieces([15, 7, 8, 1], 0, 31, 4) == [
        (0, 0, 4, 0), (0, 4, 8, 4), (0, 8, 12, 8), (0, 12, 15, 12), (1, 0, 4, 15), (1, 4, 7, 19),
        (2, 0, 4, 22), (2, 4, 8, 26), (3, 0, 1, 30)]
    # a shard starting inside a tensor: cuts counted from the shard's first element of that tensor
    assert plan_pieces([15, 7, 8, 1], 16, 31, 4) == [
        (1, 1, 5, 0), (1, 5, 7, 4), (2, 0, 4, 6), (2, 4, 8, 10), (3, 0, 1, 14)]
    assert plan_pieces([5], 5, 5, 4) == []


@pytest.mark.parametrize("name", ["one_peer_exponential", "ring", "exponential", "star"])
def test_every_step_applies_that_steps_matrix(transport, name):
    """Several steps of a (possibly time-varying) graph, 8 clients, pieces of at most 8 elements through receive
    arenas of 256 bytes (smaller than the block: used as a ring): after steps 0..T-1 the clients hold
    (W_{T-1} ... W_1 W_0) X, the closed form, to float32 rounding."""
    n, steps = 8, 5
    fake = transport(n)
    topo = make_topology(name, n)

    def client(rank):
        mixer = Mixer(ClientLayout(n, rank), topo, chunk_bytes=256, timeout=30)
        assert mixer.piece_numel == 8
        tensors, bytes_sent = _block(rank), []
        for step in range(steps):
            bytes_sent.append(mixer.mix_(tensors, step=step, block_idx=7).bytes_sent)
        arenas = [b.numel() for key, b in mixer._buffers.items() if key[0] == "recv"]
        assert arenas and max(arenas) <= 256  # receive buffers: chunk_bytes per neighbour
        return _flat(tensors), bytes_sent

    results = fake.run(client, n)
    x = x0 = torch.stack([_flat(_block(c)) for c in range(n)])
    for step in range(steps):
        x = torch.from_numpy(topo.weights_at(step)) @ x
    assert topo.time_varying == (name == "one_peer_exponential")
    for rank, res in enumerate(results):
        assert not isinstance(res, Exception), res
        mixed, bytes_sent = res
        # each step adds at most (degree + 1) <= n float32 roundings of values <= max|X_0| (mixing is a convex
        # combination, so no value grows and earlier errors do not grow either)
        bound = steps * n * 2**-24 * float(x0.abs().max())
        assert float((mixed - x[rank]).abs().max()) <= bound, (rank, float((mixed - x[rank]).abs().max()))
        assert bytes_sent == [len(topo.neighbors(rank, s)) * (NUMEL * 4 + HEADER_BYTES) for s in range(steps)]
    if name == "one_peer_exponential":  # log2(8) = 3 steps average exactly: the second period keeps the mean
        assert torch.allclose(x, x0.mean(0).expand_as(x), rtol=0, atol=1e-12)
        assert max(float((r[0] - x0.mean(0)).abs().max()) for r in results) <= bound
    assert not fake.overflows


def test_the_arithmetic_is_the_simulators_bit_for_bit(transport):
    """Pieces (cut inside tensors, arriving in any order) mix to the same bits as accumulate_mix_ applied to whole
    tensors, own term first and neighbours in Topology.neighbors order: what the simulator computes."""
    n = 4
    fake = transport(n)
    topo = make_topology("complete", n)  # 3 neighbours: the accumulation order matters
    shapes = [(5, 9), (13,), (64,)]

    def client(rank):
        tensors = _block(rank, shapes)
        Mixer(ClientLayout(n, rank), topo, chunk_bytes=7 * 4, comm_dtype=torch.bfloat16).mix_(tensors, 0, 0)
        return tensors

    results = fake.run(client, n)
    w = topo.weights
    for c in range(n):
        nb = topo.neighbors(c)
        for k in range(len(shapes)):
            ref = _block(c, shapes)[k].clone()
            accumulate_mix_(ref, w[c, c], [_block(j, shapes)[k].to(torch.bfloat16) for j in nb], [w[c, j] for j in nb])
            assert torch.equal(results[c][k], ref), (c, k)


@pytest.mark.parametrize("compression", ["bf16", "int8", "int4"])
def test_compressed_mixer_equals_error_feedback_over_whole_tensors(transport, compression):
    """The Mixer (pieces of 256 values, cut inside tensors, through a ring of receive buffers) and ErrorFeedback
    driven with whole tensors per client, as the simulator drives it: same weights, same bytes, bit for bit, over a
    first (bf16) exchange, steady exchanges, a checkpoint/restore of the Mixer and a switch to another block."""
    n = 4
    fake = transport(n)
    topo = make_topology("ring", n)
    shapes = [(3, GROUP_SIZE + 5), (2 * GROUP_SIZE + 1,), (7,)]
    schedule = [(0, 1), (1, 1), (2, 1), (3, 1), (4, 0), (5, 0)]  # (step, block): blocks 1 then 0
    updates = {step: [torch.randn(s, generator=torch.Generator().manual_seed(step)) * 1e-3 for s in shapes]
               for step, _ in schedule}

    def client(rank):
        layout = ClientLayout(n, rank)
        make = lambda: Mixer(layout, topo, chunk_bytes=2048, compression=compression)  # noqa: E731
        mixer = make()
        assert mixer.piece_numel == GROUP_SIZE
        blocks = {b: _block(10 * rank + b, shapes) for b in (0, 1)}
        sent = []
        for step, block in schedule:
            for t, u in zip(blocks[block], updates[step]):
                t.add_(u)  # a local step
            sent.append(mixer.mix_(blocks[block], step=step, block_idx=block).bytes_sent)
            if step == 1:  # resume from a checkpoint: a new Mixer loads the state
                state = mixer.state_dict()
                mixer = make()
                mixer.load_state_dict(state)
        return blocks, sent

    results = fake.run(client, n)
    for res in results:
        assert not isinstance(res, Exception), res

    # reference: ErrorFeedback per client, whole tensors, the simulator's order
    w = topo.weights
    blocks = [{b: _block(10 * c + b, shapes) for b in (0, 1)} for c in range(n)]
    fbs = [ErrorFeedback(compression) for _ in range(n)]
    expected_bytes = []
    for step, block in schedule:
        numel = sum(math.prod(s) for s in shapes)
        codecs = [fb.begin(block, numel) for fb in fbs]
        for c in range(n):
            for t, u in zip(blocks[c][block], updates[step]):
                t.add_(u)
        offset, packets = 0, [[] for _ in range(n)]
        for k, s in enumerate(shapes):
            for c in range(n):
                packets[c].append(fbs[c].encode(codecs[c], blocks[c][block][k].view(-1), offset))
            for c in range(n):
                nb = topo.neighbors(c)
                fbs[c].mix_(codecs[c], blocks[c][block][k].view(-1), offset, w[c, c],
                            [packets[j][k] for j in nb], [w[c, j] for j in nb])
            offset += math.prod(s)
        for fb in fbs:
            fb.end()
        expected_bytes.append(2 * (HEADER_BYTES + sum(p.numel() for p in packets[0])))
    for c in range(n):
        got_blocks, sent = results[c]
        for b in (0, 1):
            for k in range(len(shapes)):
                assert torch.equal(got_blocks[b][k], blocks[c][b][k]), (c, b, k)
        assert sent == expected_bytes
    # bytes: the first exchange of a visit is bf16 (2 B a value); then 1 or 1/2 B a value plus a 2-byte scale per
    # 256 values of each tensor
    groups = sum(math.ceil(math.prod(s) / GROUP_SIZE) for s in shapes)
    per_value = {"bf16": None, "int8": 1, "int4": 0.5}[compression]
    assert expected_bytes[0] == expected_bytes[4] == 2 * (HEADER_BYTES + 2 * numel)
    if per_value is not None:
        codes = sum(math.prod(s) if per_value == 1 else (math.prod(s) + 1) // 2 for s in shapes)
        assert expected_bytes[1] == 2 * (HEADER_BYTES + 2 * groups + codes)
    assert not fake.overflows


def test_header_mismatch_names_the_neighbour_and_a_longer_block_never_overflows(transport):
    """A neighbour on another block, or with more elements (longer messages), is refused by the header check,
    naming it; on gloo no message is ever longer than the receive posted for it (that would abort the process)."""
    n = 3
    fake = transport(n)
    topo = make_topology("complete", n)

    def client(rank):
        shapes = [(40,)] + SHAPES if rank == 2 else SHAPES  # client 2: a longer block, a longer first piece
        Mixer(ClientLayout(n, rank), topo, chunk_bytes=4096, timeout=5).mix_(
            _block(rank, shapes), step=3, block_idx=5 if rank == 1 else 4)

    errors = [str(e) for e in fake.run(client, n)]
    assert "neighbour client 1 (rank 1): it is on block 5, step 3 with 31 elements" in errors[0]
    assert "neighbour client 0 (rank 0): it is on block 4, step 3 with 31 elements" in errors[1]
    assert "neighbour client 0 (rank 0): it is on block 4, step 3 with 31 elements" in errors[2]
    assert "we (client 2, rank 2) are on block 4, step 3 with 71 elements" in errors[2]
    assert not fake.overflows


def test_a_silent_neighbour_is_named_after_the_timeout(transport):
    n = 3
    fake = transport(n)
    topo = make_topology("ring", n)

    def client(rank):
        if rank == 2:
            return "silent"
        Mixer(ClientLayout(n, rank), topo, timeout=0.5).mix_(_block(rank), step=0, block_idx=0)

    errors = fake.run(client, n)
    for rank in (0, 1):
        assert "gossip: neighbour client 2 (rank 2) did not answer within 0.5 s (header of block 0" in str(errors[rank])


def test_compression_refuses_what_it_cannot_do():
    layout = ClientLayout(4, 0)
    with pytest.raises(ValueError, match="one_peer_exponential changes neighbours every step"):
        Mixer(layout, make_topology("one_peer_exponential", 4), compression="int8")
    with pytest.raises(ValueError, match="sets the wire format itself"):
        Mixer(layout, make_topology("ring", 4), compression="int4", comm_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="gossip.compression='int2' is not one of none, bf16, int8, int4"):
        Mixer(layout, make_topology("ring", 4), compression="int2")
    mixer = Mixer(layout, make_topology("ring", 4), compression="int8")
    with pytest.raises(ValueError, match="no gossip error-feedback state"):
        mixer.load_state_dict({"sent": 0, "received": 0})
    # a piece is at most an eighth of chunk_bytes (at least one value, with compression one group)
    for chunk in (4 << 20, 64 << 20, 1000):
        assert Mixer(layout, make_topology("ring", 4), chunk_bytes=chunk).piece_numel * 4 <= max(chunk // 8, 4)
        c = Mixer(layout, make_topology("ring", 4), chunk_bytes=chunk, compression="int8")
        assert c.piece_numel % GROUP_SIZE == 0 and 2 * c.piece_numel <= max(chunk // 8, 2 * GROUP_SIZE)
    assert Mixer(layout, make_topology("ring", 4)).piece_numel == (64 << 20) // 8 // 4


@pytest.mark.parametrize("weights", [
    [0.5, 0.5], [1 / 3, 1 / 3, 1 / 3], [0.25, 0.25, 0.25, 0.25], [0.0, 1.0], [0.6, 0.0, 0.4],
    [0.3, 0.3, 0.3],  # a row that does not sum to 1 (no Topology has one): the chain is rescaled
])
def test_accumulate_mix_is_the_weighted_sum(weights):
    """One lerp per neighbour equals own*W_ii + Σ_j W_ij r_j computed in float64: each lerp rounds three times, each
    by at most 2^-24 of max(|its ends|) <= m, the largest magnitude of all terms, so k neighbours stay within
    (3k + 1) * 2^-24 * m (the +1: the rescale of a row that does not sum to 1)."""
    gen = torch.Generator().manual_seed(len(weights))
    n = 1000 + 37  # a SIMD tail too
    mine, *received = [torch.randn(n, generator=gen) for _ in weights]
    want = weights[0] * mine.double() + sum(w * r.double() for w, r in zip(weights[1:], received))
    got = accumulate_mix_(mine.clone(), weights[0], received, weights[1:]).double()
    m = max(float(mine.abs().max()), max(float(r.abs().max()) for r in received))
    k = len(received)
    assert float((got - want).abs().max()) <= (3 * k + 1) * 2.0**-24 * m
    if weights == [0.0, 1.0]:
        assert torch.equal(got.float(), received[0])  # lerp with weight 1 is the end itself


def test_pieces_start_on_the_simd_grid():
    """Uncompressed pieces are whole multiples of 64 elements, whatever chunk_bytes (no tensor's piece begins at an
    element a whole tensor would finish in scalar code)."""
    layout, topo = ClientLayout(2, 0), make_topology("ring", 2)
    for chunk in (8 * 4 * 100, 8 * 4 * 1000 + 12, 64 << 20):
        assert Mixer(layout, topo, chunk_bytes=chunk).piece_numel % 64 == 0
    assert Mixer(layout, topo, chunk_bytes=8 * 4 * 10).piece_numel == 10  # smaller than the grid: as is


def test_pack_pieces_groups_runs_of_small_whole_tensors():
    numels = [300, 45, 13, 64, 1000, 2]
    pieces = plan_pieces(numels, 0, sum(numels), 256)
    groups = pack_pieces(numels, pieces, pack_numel=256, max_numel=256)
    assert [[(p[0], p[1], p[2]) for p in g] for g in groups] == [
        [(0, 0, 256)],  # not packed with what follows: its next piece starts inside the tensor
        [(0, 256, 300)],  # starts inside its tensor: never packed
        [(1, 0, 45), (2, 0, 13), (3, 0, 64)],
        [(4, 0, 256)], [(4, 256, 512)], [(4, 512, 768)], [(4, 768, 1000)],
        [(5, 0, 2)]]
    assert sum(len(g) for g in groups) == len(pieces)  # every piece once, in order
    assert [p for g in groups for p in g] == pieces
    assert pack_pieces(numels, pieces, pack_numel=0, max_numel=256) == [[p] for p in pieces]
    assert pack_pieces([3, 3, 3], plan_pieces([3, 3, 3], 0, 9, 6), 6, 6) == [
        [(0, 0, 3, 0), (1, 0, 3, 3)], [(2, 0, 3, 6)]]


@pytest.mark.parametrize("wire,dtypes", [
    (torch.float32, [torch.float32, torch.float32, torch.bfloat16, torch.float32, torch.float32]),
    (torch.bfloat16, [torch.float32] * 5),
])
def test_packed_small_tensors_mix_bit_for_bit_in_fewer_messages(transport, wire, dtypes):
    """Small whole tensors travel packed in one message (copied), large ones piece by piece from their memory;
    every tensor still equals accumulate_mix_ applied to it whole (a bf16 tensor: mixed in fp32, rounded back),
    and each neighbour gets 8 messages (header + 7) instead of one per piece (10)."""
    n = 4
    fake = transport(n)
    topo = make_topology("complete", n)  # 3 neighbours: the accumulation order matters
    shapes = [(300,), (5, 9), (13,), (64,), (1000,)]

    def client(rank):
        tensors = [t.to(d) for t, d in zip(_block(rank, shapes), dtypes)]
        mixer = Mixer(ClientLayout(n, rank), topo, chunk_bytes=256 * 8 * _itemsize(wire), comm_dtype=wire)
        assert mixer.piece_numel == 256
        stats = mixer.mix_(tensors, 0, 0)
        return tensors, stats.bytes_sent

    results = fake.run(client, n)
    w = topo.weights
    numel = sum(math.prod(s) for s in shapes)
    for c in range(n):
        assert not isinstance(results[c], Exception), results[c]
        tensors, sent = results[c]
        assert sent == 3 * (numel * _itemsize(wire) + HEADER_BYTES)
        nb = topo.neighbors(c)
        for k, d in enumerate(dtypes):
            ref = _block(c, shapes)[k].to(d).float()
            theirs = [_block(j, shapes)[k].to(d).float().to(wire) for j in nb]
            accumulate_mix_(ref, w[c, c], theirs, [w[c, j] for j in nb])
            assert torch.equal(tensors[k], ref.to(d)), (c, k)
        assert all(fake.sends[(c, j)] == 8 for j in nb)
    assert not fake.overflows


def _itemsize(dtype):
    return torch.empty((), dtype=dtype).element_size()

"""Neighbour mixing over real gloo process groups, checked against ``W @ X`` computed in one process.

Process start-up dominates the cost, so each launch runs many checks and returns what it measured; the asserts run
in the parent. Every client's block is regenerated from the client's seed in every process, so each rank can build
the reference ``W @ X`` itself.
"""

import importlib.util
import math
import re
import time
from pathlib import Path

import pytest
import torch

from dist import run_distributed

SHAPES = [(3, 5), (7,), (2, 2, 2), (1,)]  # 31 elements: uneven shards for 2 ranks per client
NUMEL = sum(math.prod(s) for s in SHAPES)
BIG_SHAPES = [(3, 300), (517,), (2, 2, 2)]  # 1425 elements: several 256-value quantization groups per shard
COMPRESSED_STEPS = 3
HEADER_BYTES = 4 * 8
BUILT_IN = ["ring", "torus", "exponential", "one_peer_exponential", "erdos_renyi", "bipartite", "complete", "star"]


def _block(client, dtype=torch.float32, shapes=SHAPES):
    gen = torch.Generator().manual_seed(1000 + client)
    return [torch.randn(s, generator=gen).to(dtype) for s in shapes]


def _flat(tensors):
    return torch.cat([t.reshape(-1).double() for t in tensors])


def _reference(topology, step, dtype=torch.float32):
    x = torch.stack([_flat(_block(c, dtype)) for c in range(topology.num_clients)])
    return torch.from_numpy(topology.weights_at(step)) @ x


def _mix_every_topology(rank, world_size, ranks_per_client, chunk_bytes):
    """Return {name: (max error vs W@X, bytes sent, bytes received, neighbour count, result bits)} for this rank."""
    from deca_ds.gossip import ClientGroups, ClientLayout, Mixer
    from deca_ds.topology import make_topology

    layout = ClientLayout(world_size, rank, ranks_per_client)
    groups = ClientGroups.create(layout)
    out = {}
    for name in BUILT_IN:
        topo = make_topology(name, layout.num_clients, seed=5)
        mixer = Mixer(layout, topo, chunk_bytes=chunk_bytes, dp_group=groups.client_group, timeout=30)
        step = 1  # odd: the second matrix of time-varying graphs
        tensors = _block(layout.client_id)
        stats = mixer.mix_(tensors, step=step, block_idx=2)
        err = float((_flat(tensors) - _reference(topo, step)[layout.client_id]).abs().max())
        out[name] = (err, stats.bytes_sent, stats.bytes_received, len(topo.neighbors(layout.client_id, step)),
                     _flat(tensors).tolist())
    return layout, groups, out


def _single_rank_clients(rank, world_size):
    from deca_ds.gossip import Mixer, consensus_distance
    from deca_ds.topology import make_topology

    layout, groups, out = _mix_every_topology(rank, world_size, 1, chunk_bytes=7 * 4)
    me = layout.client_id

    n = layout.num_clients
    # bf16 on the wire: within bf16 rounding of the neighbours' values, and really rounded.
    ring = make_topology("ring", n)
    tensors = _block(me)
    mixer = Mixer(layout, ring, chunk_bytes=64, comm_dtype=torch.bfloat16)
    stats = mixer.mix_(tensors, step=0, block_idx=0)
    out["bf16_err"] = float((_flat(tensors) - _reference(ring, 0)[me]).abs().max())
    out["bf16_bytes"] = stats.bytes_sent

    # Repeated mixing: disagreement contracts at least by |lambda_2| per step, mean preserved.
    mixer = Mixer(layout, ring, chunk_bytes=1 << 20)
    tensors = _block(me)
    x0 = torch.stack([_flat(_block(c)) for c in range(n)])
    closed_form = float(((x0 - x0.mean(0)) ** 2).mean().sqrt())
    out["distance0"] = (consensus_distance(tensors, groups.peer_group), closed_form)
    distances = [out["distance0"][0]]
    for step in range(ring.rounds_to_shrink(10)):
        mixer.mix_(tensors, step=step, block_idx=0)
        distances.append(consensus_distance(tensors))
    out["distances"] = distances
    out["mean_after"] = _flat(tensors).tolist()
    out["counters"] = (mixer.total_bytes_sent, mixer.total_bytes_received)

    # A neighbour on another block is refused (complete graph: every client sees client 0's header).
    try:
        Mixer(layout, make_topology("complete", n), timeout=10).mix_(_block(me), step=3, block_idx=9 if me == 0 else 4)
    except RuntimeError as err:
        out["mismatch"] = str(err)

    # A neighbour that never calls mix_: an error naming it after the timeout, no hang.
    start = time.monotonic()
    if me == n - 1:
        time.sleep(3.0)
    else:
        try:
            Mixer(layout, ring, timeout=1.5).mix_(_block(me), step=4, block_idx=0)
            out["timeout"] = "completed"
        except RuntimeError as err:
            out["timeout"] = str(err)
    out["timeout_s"] = time.monotonic() - start
    return out


def _two_ranks_per_client(rank, world_size, num_clients):
    import torch.distributed as dist

    from deca_ds.gossip import Mixer, consensus_distance
    from deca_ds.topology import make_topology

    layout, groups, out = _mix_every_topology(rank, world_size, world_size // num_clients, chunk_bytes=5 * 4)
    mpu = groups.mpu
    out["mpu"] = (mpu.get_data_parallel_world_size(), mpu.get_data_parallel_rank(),
                  mpu.get_data_parallel_group_ranks(), dist.get_world_size(mpu.get_data_parallel_group()),
                  mpu.get_model_parallel_world_size(), dist.get_world_size(mpu.get_model_parallel_group()),
                  dist.get_world_size(groups.peer_group))
    # bf16 tensors and a bf16 wire: every rank of a client must still end bit-identical.
    topo = make_topology("exponential", layout.num_clients)
    tensors = _block(layout.client_id, torch.bfloat16)
    Mixer(layout, topo, chunk_bytes=6, comm_dtype=torch.bfloat16, dp_group=groups.client_group).mix_(
        tensors, step=0, block_idx=0)
    out["bf16"] = (_flat(tensors).tolist(), float((_flat(tensors) - _reference(topo, 0, torch.bfloat16)[
        layout.client_id]).abs().max()))
    # one_peer_exponential averages exactly in log2(4) = 2 steps (over shards, then gathered).
    ope = make_topology("one_peer_exponential", layout.num_clients)
    tensors = _block(layout.client_id)
    mixer = Mixer(layout, ope, chunk_bytes=3 * 4, dp_group=groups.client_group)
    for step in range(ope.period):
        mixer.mix_(tensors, step=step, block_idx=1)
    x0 = torch.stack([_flat(_block(c)) for c in range(layout.num_clients)])
    out["one_peer_err"] = float((_flat(tensors) - x0.mean(0)).abs().max())
    # A 1-element block: the second rank of each client has an empty shard.
    one = [torch.full((1,), float(layout.client_id))]
    Mixer(layout, make_topology("complete", layout.num_clients), dp_group=groups.client_group).mix_(one, 0, 0)
    out["tiny"] = one[0].item()
    # Consensus distance over the peer group equals the one over WORLD (each client counted twice).
    fresh = _block(layout.client_id)
    out["distance"] = (consensus_distance(fresh, groups.peer_group), consensus_distance(fresh))
    # int8 compression over shards: a bf16 first exchange, then int8 ones, after a "local step" each time.
    mixer = Mixer(layout, make_topology("ring", layout.num_clients), chunk_bytes=2048, dp_group=groups.client_group,
                  compression="int8")
    tensors, sent = _block(layout.client_id, shapes=BIG_SHAPES), []
    for step in range(COMPRESSED_STEPS):
        for t in tensors:
            t.add_(1e-3 * (step + 1))
        sent.append(mixer.mix_(tensors, step=step, block_idx=0).bytes_sent)
    out["int8"] = (_flat(tensors).tolist(), sent, mixer.piece_numel)
    # Last (it leaves messages of another size on the connections): client 0's block is 3 elements longer, so its
    # pieces are longer than the others expect; on gloo that must be a named mismatch, not an aborted process.
    block = _block(layout.client_id) + ([torch.zeros(3)] if layout.client_id == 0 else [])
    try:
        Mixer(layout, make_topology("complete", layout.num_clients), timeout=10,
              dp_group=groups.client_group).mix_(block, step=0, block_idx=0)
        out["size_mismatch"] = "completed"
    except RuntimeError as err:
        out["size_mismatch"] = str(err)
    return out


def _compressed_reference(num_clients, ranks_per_client, piece_numel):
    """The int8 run of _two_ranks_per_client in one process: ErrorFeedback per (client, shard) over the Mixer's
    pieces (plan_pieces), the shards then put side by side. Returns (flat blocks, bytes sent per shard and step)."""
    from deca_ds.compression import ErrorFeedback
    from deca_ds.gossip import HEADER_BYTES, plan_pieces
    from deca_ds.topology import make_topology

    topo = make_topology("ring", num_clients)
    w = topo.weights
    numels = [math.prod(s) for s in BIG_SHAPES]
    numel = sum(numels)
    shard = math.ceil(numel / ranks_per_client)
    ranges = [(min(r * shard, numel), min(r * shard + shard, numel)) for r in range(ranks_per_client)]
    flats = [torch.cat([t.reshape(-1) for t in _block(c, shapes=BIG_SHAPES)]) for c in range(num_clients)]
    feedback = [[ErrorFeedback("int8") for _ in ranges] for _ in range(num_clients)]
    sent = [[] for _ in ranges]
    bases = [sum(numels[:k]) for k in range(len(numels))]
    for step in range(COMPRESSED_STEPS):
        for f in flats:
            for k, n in enumerate(numels):
                f[bases[k]:bases[k] + n].add_(1e-3 * (step + 1))  # tensor by tensor, as the ranks do
        for r, (start, end) in enumerate(ranges):
            pieces = plan_pieces(numels, start, end, piece_numel)
            codecs = [feedback[c][r].begin(0, end - start) for c in range(num_clients)]
            packets = [[feedback[c][r].encode(codecs[c], flats[c][bases[k] + lo:bases[k] + hi], off)
                        for k, lo, hi, off in pieces] for c in range(num_clients)]
            for c in range(num_clients):
                nb = topo.neighbors(c)
                for p, (k, lo, hi, off) in enumerate(pieces):
                    feedback[c][r].mix_(codecs[c], flats[c][bases[k] + lo:bases[k] + hi], off, w[c, c],
                                        [packets[j][p] for j in nb], [w[c, j] for j in nb])
                feedback[c][r].end()
            sent[r].append(2 * (HEADER_BYTES + sum(p.numel() for p in packets[0])))
    return flats, sent


def _check_topologies(results, ranks_per_client):
    from deca_ds.topology import make_topology

    num_clients = len(results) // ranks_per_client
    for name in BUILT_IN:
        neighbours = [len(make_topology(name, num_clients, seed=5).neighbors(c, 1)) for c in range(num_clients)]
        for rank, res in enumerate(results):
            err, sent, received, degree, _ = res[name]
            client, local = divmod(rank, ranks_per_client)
            shard = math.ceil(NUMEL / ranks_per_client)
            mine = max(0, min(shard, NUMEL - local * shard))
            assert err <= 1e-6, (name, rank, err)
            assert degree == neighbours[client]
            expected = degree * (mine * 4 + HEADER_BYTES)
            assert sent == received == expected, (name, rank, sent, expected)
        for c in range(num_clients):  # all ranks of a client end bit-identical
            bits = {tuple(results[c * ranks_per_client + r][name][4]) for r in range(ranks_per_client)}
            assert len(bits) == 1, (name, c)


@pytest.mark.integration
def test_six_single_rank_clients():
    from deca_ds.topology import make_topology

    n = 6
    results = run_distributed(_single_rank_clients, n, timeout=240)
    _check_topologies(results, 1)
    ring = make_topology("ring", n)
    lam2 = 1 - ring.spectral_gap
    x0 = torch.stack([_flat(_block(c)) for c in range(n)])
    for rank, res in enumerate(results):
        assert 1e-6 < res["bf16_err"] <= 2 ** -8 * float(x0.abs().max()), res["bf16_err"]
        assert res["bf16_bytes"] == 2 * (NUMEL * 2 + HEADER_BYTES)
        got, closed_form = res["distance0"]
        assert got == pytest.approx(closed_form, rel=1e-5)
        d = res["distances"]
        assert all(b <= lam2 * a * (1 + 1e-5) + 1e-7 for a, b in zip(d, d[1:])), d
        assert d[-1] <= d[0] / 10
        rounds = ring.rounds_to_shrink(10)
        assert res["counters"] == (rounds * 2 * (NUMEL * 4 + HEADER_BYTES),) * 2
    # the network average is preserved by mixing
    mixed = torch.tensor([res["mean_after"] for res in results], dtype=torch.float64)
    torch.testing.assert_close(mixed.mean(0), x0.mean(0), atol=1e-6, rtol=0)
    # mismatch: client 0 names a neighbour and both block indices; the others name client 0
    assert re.search(r"neighbour client [1-5] .*block 4.*client 0.*block 9", results[0]["mismatch"])
    for res in results[1:]:
        assert re.search(r"neighbour client 0 \(rank 0\): it is on block 9", res["mismatch"])
    # timeout: the ring neighbours of the silent client name it, after about the timeout, not a hang
    for rank in (0, n - 2):
        assert f"neighbour client {n - 1} (rank {n - 1}) did not answer within 1.5 s" in results[rank]["timeout"]
        assert results[rank]["timeout_s"] < 2.5
    # Client 1's neighbours 0 and 2 are alive; 0 sent its header and pieces ahead of waiting for the silent client,
    # so 1 completes, or names 0 if 0 gave up before its messages went out.
    assert results[1]["timeout"] == "completed" or "neighbour client 0 (rank 0) did not answer" in results[1]["timeout"]


@pytest.mark.integration
def test_multi_rank_clients():
    world_size, num_clients = 8, 4
    results = run_distributed(_two_ranks_per_client, world_size, num_clients, timeout=240)
    _check_topologies(results, 2)
    for rank, res in enumerate(results):
        client = rank // 2
        assert res["mpu"] == (2, rank % 2, [2 * client, 2 * client + 1], 2, 1, 1, num_clients)
        assert res["bf16"][0] == results[rank ^ 1]["bf16"][0]
        assert res["bf16"][1] <= 2 ** -7 * 4
        assert res["tiny"] == pytest.approx((num_clients - 1) / 2)  # complete graph, Metropolis: the mean
        assert res["one_peer_err"] <= 1e-6
        assert res["distance"][0] == pytest.approx(res["distance"][1], rel=1e-6)
    x0 = torch.stack([_flat(_block(c)) for c in range(num_clients)])
    assert results[0]["distance"][0] == pytest.approx(float(((x0 - x0.mean(0)) ** 2).mean().sqrt()), rel=1e-5)
    # compressed gossip over shards equals ErrorFeedback per shard in one process, bit for bit, bytes included
    flats, sent = _compressed_reference(num_clients, 2, results[0]["int8"][2])
    for rank, res in enumerate(results):
        client, local = divmod(rank, 2)
        assert res["int8"][0] == flats[client].double().tolist(), rank
        assert res["int8"][1] == sent[local], (rank, res["int8"][1], sent[local])
    bf16_first, int8_next = sent[0][0], sent[0][1]
    assert int8_next < bf16_first / 1.9  # 1 byte + 1/128 per value against 2
    # size mismatch: client 0 names a neighbour with fewer elements; the others name client 0
    for rank, res in enumerate(results):
        if rank // 2 == 0:
            assert re.search(r"neighbour client [123] \(rank \d\): it is on block 0, step 0 with 31 elements",
                             res["size_mismatch"]), res["size_mismatch"]
        else:
            assert f"neighbour client 0 (rank {rank % 2}): it is on block 0, step 0 with 34 elements" in \
                res["size_mismatch"], res["size_mismatch"]


def test_mpu_answers_every_method_deepspeed_calls():
    """Scan the installed DeepSpeed for ``mpu.get_*`` calls; the client mpu must answer each of them."""
    deepspeed_dir = Path(importlib.util.find_spec("deepspeed").origin).parent
    called = set()
    for path in deepspeed_dir.rglob("*.py"):
        called |= set(re.findall(r"mpu\.(get_[a-z_]+)\(", path.read_text(errors="ignore")))
    from deca_ds.gossip import ClientMPU

    mpu = ClientMPU(rank=5, dp_group="dp", dp_ranks=[4, 5], singleton_group="single")
    assert "get_data_parallel_group" in called and len(called) > 15
    missing = sorted(m for m in called if not hasattr(mpu, m))
    assert not missing
    assert not hasattr(mpu, "initialize_sequence_parallel")  # would make DeepSpeed ignore the client DP group
    assert (mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()) == (1, 2)
    assert mpu.get_sequence_data_parallel_group() == "dp" and mpu.get_pipe_parallel_group() == "single"
    assert mpu.get_tensor_model_parallel_src_rank() == 5

"""Time and bytes of one neighbour mix of a real multi-tensor block against an all-reduce of the same block.

Run (about 3 minutes on 2 CPU cores):

    OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu python recipes/gossip_benchmark.py --world-sizes 2 4 --repeats 5

Blocks are the tensors of real decoder layers, shapes read from the model configurations on the meta device:
``embedded`` (one layer of the shipped tiny Llama, 9 tensors), ``bench`` (one layer of the benchmark's 33.5M
Llama, ``deca_ds.bench.benchmark.DEFAULT_SHAPE``), ``bench2`` (two of its layers, 18 tensors); ``--sizes`` adds
single fp32 tensors. Per world size one set of gloo processes runs every case: a warm-up of each operation, then
``--repeats`` rounds, each timing every operation once in turn (alternated, so load changes hit all of them alike).
The time of a call is the slowest rank's (all-reduce MAX); the table shows the median, the spread (min-max) and
the ratio to ``all_reduce`` of the same block as one flat fp32 buffer (what DeepSpeed's buckets do; the one to
beat). ``all_reduce xN`` all-reduces the block tensor by tensor. Mix bytes are the Mixer's counters (per rank, sent,
header and scales included; a compressed mix is timed after its first, bf16 exchange); all-reduce bytes are the
textbook ring figure ``2 (n-1)/n x size`` per rank, since gloo does not report its traffic.

Runs against any checkout: ``PYTHONPATH=<checkout>`` picks the Mixer measured (``--compression`` needs one that
has it); ``--baseline DIR`` also times the Mixer of another checkout's ``deca_ds/gossip.py`` in the same rounds
(``mix ring (baseline)``), for before/after figures measured side by side.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
import time

BLOCKS = ("embedded", "bench", "bench2")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def block_shapes(name: str) -> list[tuple[int, ...]]:
    """Parameter shapes of a named block (``embedded``, ``bench``, ``bench2``), or of one tensor of ``name`` elements.

    Shapes come from the models' own modules built on the meta device (no memory), in ``named_parameters`` order.
    """
    if name not in BLOCKS:
        return [(int(float(name)),)]
    import torch

    if name == "embedded":
        from deca_ds.models import embedded_model_config

        config, layers = embedded_model_config(), 1
    else:
        from transformers import LlamaConfig

        from deca_ds.bench.benchmark import DEFAULT_SHAPE as s

        config = LlamaConfig(hidden_size=s["hidden"], intermediate_size=s["intermediate"], num_hidden_layers=2,
                             num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], vocab_size=s["vocab"])
        layers = 2 if name == "bench2" else 1
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    with torch.device("meta"):
        modules = [LlamaDecoderLayer(config, layer_idx=k) for k in range(layers)]
    return [tuple(p.shape) for m in modules for p in m.parameters()]


def _worker(rank: int, world_size: int, args, cases, port: int, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    import torch
    import torch.distributed as dist

    from deca_ds.gossip import ClientLayout, Mixer
    from deca_ds.topology import make_topology

    baseline = None
    if args.baseline:  # another checkout's Mixer, loaded under its own module name
        import importlib.util

        spec = importlib.util.spec_from_file_location(
            "baseline_gossip", os.path.join(args.baseline, "deca_ds", "gossip.py"))
        baseline = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
        spec.loader.exec_module(baseline)

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(minutes=10))
    layout = ClientLayout(world_size, rank)
    chunk = int(args.chunk_mb * (1 << 20))
    rows = []

    def timed(fn) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        return elapsed.item()

    for block, shapes in cases:
        gen = torch.Generator().manual_seed(rank)
        tensors = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
        numel = sum(t.numel() for t in tensors)
        flat = torch.cat([t.reshape(-1) for t in tensors])
        ring_bytes = int(2 * (world_size - 1) / world_size * numel * 4)
        # op -> (call, list of MixStats or None, neighbours)
        ops = {"all_reduce": (lambda: dist.all_reduce(flat), None, world_size - 1),
               f"all_reduce x{len(tensors)}": (lambda: [dist.all_reduce(t) for t in tensors], None, world_size - 1)}
        for name in args.topologies:
            topo = make_topology(name, world_size)
            for comp in args.compression:
                kwargs = {} if comp == "none" else {"compression": comp}
                mixer = Mixer(layout, topo, chunk_bytes=chunk, **kwargs)
                stats = []
                label = f"mix {name}" + ("" if comp == "none" else f" {comp}")
                ops[label] = ((lambda m=mixer, st=stats: st.append(m.mix_(tensors, step=0, block_idx=0))), stats,
                              len(topo.neighbors(layout.client_id)))
            if baseline is not None:
                mixer = baseline.Mixer(baseline.ClientLayout(world_size, rank), topo, chunk_bytes=chunk)
                stats = []
                ops[f"mix {name} (baseline)"] = (
                    (lambda m=mixer, st=stats: st.append(m.mix_(tensors, step=0, block_idx=0))), stats,
                    len(topo.neighbors(layout.client_id)))
        for fn, _, _ in ops.values():  # warm-up: connections, allocator, a compressed mix's bf16 first exchange
            fn()
        times = {op: [] for op in ops}
        for _ in range(args.repeats):
            for op, (fn, _, _) in ops.items():
                times[op].append(timed(fn))
        for op, (_, stats, degree) in ops.items():
            sent = stats[-1].bytes_sent if stats is not None else ring_bytes
            rows.append(dict(world_size=world_size, block=block, tensors=len(tensors), numel=numel, op=op,
                             degree=degree, seconds=times[op], bytes_sent=sent))
        del tensors, flat, ops
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def main(argv=None) -> list[dict]:
    """Run the benchmark, print a table per world size and return its rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--blocks", nargs="+", default=list(BLOCKS),
                        help=f"named blocks ({', '.join(BLOCKS)}) or element counts of single fp32 tensors")
    parser.add_argument("--topologies", nargs="+", default=["ring"])
    parser.add_argument("--compression", nargs="+", default=["none"],
                        help="gossip.compression values to time (none, bf16, int8, int4)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk-mb", type=float, default=64.0)
    parser.add_argument("--baseline", help="a checkout whose deca_ds/gossip.py Mixer is timed alongside")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    if args.repeats < 3:
        parser.error("--repeats must be at least 3 (the table shows a median and a spread)")

    import torch.multiprocessing as mp
    from rich.console import Console
    from rich.table import Table

    cases = [(b, block_shapes(b)) for b in args.blocks]
    rows = []
    for world_size in args.world_sizes:
        load_before = os.getloadavg()[0]
        with tempfile.TemporaryDirectory() as tmp:
            out_path = os.path.join(tmp, "rows.json")
            mp.spawn(_worker, args=(world_size, args, cases, _free_port(), out_path), nprocs=world_size, join=True)
            with open(out_path) as f:
                these = json.load(f)
        load = f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after"
        table = Table(title=f"{world_size} gloo processes, chunk {args.chunk_mb:g} MiB, {args.repeats} alternated "
                            f"rounds; {load}")
        for col in ("block", "op", "nbrs", "ms median", "ms min-max", "× all_reduce", "MB sent / rank"):
            table.add_column(col, justify="left" if col in ("block", "op") else "right")
        base = {}
        for r in these:
            r["median_s"] = statistics.median(r["seconds"])
            r["load_average"] = load
            if r["op"] == "all_reduce":
                base[r["block"]] = r["median_s"]
        for r in these:
            r["ratio_to_all_reduce"] = r["median_s"] / base[r["block"]]
            table.add_row(f"{r['block']} ({r['numel'] / 1e6:.3g}M, {r['tensors']} t)", r["op"], str(r["degree"]),
                          f"{r['median_s'] * 1e3:.1f}",
                          f"{min(r['seconds']) * 1e3:.1f}-{max(r['seconds']) * 1e3:.1f}",
                          f"{r['ratio_to_all_reduce']:.2f}", f"{r['bytes_sent'] / 1e6:.3f}")
        Console(width=150).print(table)
        rows += these
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()

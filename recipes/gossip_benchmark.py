"""Time and bytes of one neighbour mix against an all-reduce of the same tensor, on local gloo processes.

Run (about 2 minutes on 2 CPU cores):

    OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu python recipes/gossip_benchmark.py --world-size 4 --sizes 10e6 100e6

For each block size and topology it spawns nothing new: one set of ``--world-size`` processes runs every case. A
case is one warm-up call then ``--repeats`` timed calls; the time of a call is the slowest rank's (all-reduce MAX),
and the table shows the median. Mix bytes are the Mixer's counters (per rank, sent); all-reduce bytes are the
textbook ring figure ``2 (n-1)/n x size`` per rank, since gloo does not report its traffic.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import tempfile
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, args, port: int, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(args.world_size))
    import torch
    import torch.distributed as dist

    from deca_ds.gossip import ClientLayout, Mixer
    from deca_ds.topology import make_topology

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=args.world_size, timeout=datetime.timedelta(minutes=10))
    layout = ClientLayout(args.world_size, rank)
    comm_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    rows = []

    def timed(fn) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        return elapsed.item()

    for size in args.sizes:
        numel = int(float(size))
        x = torch.randn(numel, generator=torch.Generator().manual_seed(rank))
        for name in args.topologies:
            topo = make_topology(name, args.world_size)
            mixer = Mixer(layout, topo, chunk_bytes=int(args.chunk_mb * (1 << 20)), comm_dtype=comm_dtype)
            stats = []
            mixer.mix_([x], step=0, block_idx=0)  # warm-up: connections, allocator
            times = [timed(lambda: stats.append(mixer.mix_([x], step=0, block_idx=0))) for _ in range(args.repeats)]
            rows.append(dict(op=f"mix {name}", numel=numel, degree=int(topo.degree[0]), seconds=times,
                             bytes_sent=stats[-1].bytes_sent))
        dist.all_reduce(x)  # warm-up
        times = [timed(lambda: dist.all_reduce(x)) for _ in range(args.repeats)]
        rows.append(dict(op="all_reduce", numel=numel, degree=args.world_size - 1, seconds=times,
                         bytes_sent=int(2 * (args.world_size - 1) / args.world_size * numel * 4)))
        del x
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def main(argv=None) -> list[dict]:
    """Run the benchmark, print a table and return its rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--sizes", nargs="+", default=["10e6", "100e6"], help="fp32 elements per block")
    parser.add_argument("--topologies", nargs="+", default=["ring", "exponential"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-mb", type=float, default=64.0)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="wire dtype of the mix")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)

    import torch.multiprocessing as mp
    from rich.console import Console
    from rich.table import Table

    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "rows.json")
        mp.spawn(_worker, args=(args, _free_port(), out_path), nprocs=args.world_size, join=True)
        with open(out_path) as f:
            rows = json.load(f)
    table = Table(title=f"one mix vs all_reduce, {args.world_size} gloo processes, wire {args.dtype}, "
                        f"chunk {args.chunk_mb:g} MiB, median of {args.repeats}")
    for col in ("params", "op", "neighbours", "ms (median)", "MB sent / rank", "GB/s sent / rank"):
        table.add_column(col, justify="left" if col == "op" else "right")
    for r in rows:
        med = statistics.median(r["seconds"])
        r["median_s"] = med
        table.add_row(f"{r['numel'] / 1e6:g}M", r["op"], str(r["degree"]), f"{med * 1e3:.0f}",
                      f"{r['bytes_sent'] / 1e6:.0f}", f"{r['bytes_sent'] / med / 1e9:.2f}")
    Console().print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()

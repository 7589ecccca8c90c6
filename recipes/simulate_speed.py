"""Step time of the stacked simulator against the per-client simulator, measured alternately in one process.

    OMP_NUM_THREADS=2 python recipes/simulate_speed.py                      # 8 clients, every method group
    OMP_NUM_THREADS=2 python recipes/simulate_speed.py --clients 32 --rounds 1

Both simulators are built with the same settings (the embedded model, Erdős–Rényi graph, DECA with the
gradient-unit signal, 2 layers per block) and stepped in turn: ``--steps`` steps of one, then of the other,
``--rounds`` times, so that whatever else loads the machine loads both alike. The block changes every
``--switch`` steps so that the timed steps cover every block (the embeddings block needs the longest backward).
Prints the median seconds per step of each path, the ratio, and the load averages before and after.

With ``--flops`` it also counts each path's floating-point operations per step (``torch.utils.flop_counter``:
matmuls and attention, forward and backward, over the first ``--steps`` steps after the warm-up, the same blocks for
both paths) and times a 1024 x 1024 fp32 matmul on the simulators' device between the slices, and prints each path's
achieved rate and the ceiling the matmul rate sets: the per-client time divided by the stacked path's FLOPs at the
matmul rate bounds any speed-up a batched formulation of the same computation can reach on this machine.

On a machine with CUDA both simulators run on the GPU (``simulate.device=auto``); add ``simulate.device=cpu`` to
time the CPU there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4, help="steps per timed slice")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two paths")
    parser.add_argument("--switch", type=int, default=1, help="blocks.switch_every (1: every slice sees all blocks)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--method", default="deca")
    parser.add_argument("--skip-per-client", action="store_true", help="time the stacked path only")
    parser.add_argument("--flops", action="store_true", help="count FLOPs per step and print the matmul ceiling")
    parser.add_argument("overrides", nargs="*", help="extra recipe settings, e.g. data.num_examples=2000")
    args = parser.parse_args(argv)

    import torch

    from deca_ds.config import load_config
    from deca_ds.simulate import Simulation
    from deca_ds.stacked import StackedSimulation

    torch.set_num_threads(args.threads)
    settings = [f"num_clients={args.clients}", "topology.name=erdos_renyi", f"method={args.method}",
                "deca.signal=qgm_grad", "blocks.layers_per_block=2", f"blocks.switch_every={args.switch}",
                "output_dir=/tmp/deca_ds_speed", *args.overrides]
    if args.clients > 8:
        settings.append(f"data.num_examples={max(6000, 200 * args.clients)}")
    cfg = load_config(None, settings)
    paths = {"stacked": StackedSimulation(cfg)}
    if not args.skip_per_client:
        paths["per-client"] = Simulation(cfg)
    for sim in paths.values():
        sim.step(measure_distance=False)  # warm-up (allocations, first block)
    flops: dict[str, float] = {}
    if args.flops:
        from torch.utils.flop_counter import FlopCounterMode

        for name, sim in paths.items():
            with FlopCounterMode(display=False) as counter:
                for _ in range(args.steps):
                    sim.step(measure_distance=False)
            flops[name] = counter.get_total_flops() / args.steps
    device = paths["stacked"].device  # both simulators run on simulate.device
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {k: [] for k in paths}
    gemm: list[float] = []
    for _ in range(args.rounds):
        for name, sim in paths.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                sim.step(measure_distance=False)
            times[name].append((time.perf_counter() - t0) / args.steps)
        if args.flops:
            gemm.append(_matmul_rate(torch, device))
    load_after = os.getloadavg()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{args.threads} CPU thread(s)"
    print(f"{args.clients} clients, method={args.method}, {where}, torch {torch.__version__}, "
          f"{args.rounds} x {args.steps} steps per path, alternated")
    for name, ts in times.items():
        print(f"  {name:>10}: {statistics.median(ts):.3f} s/step (slices: {', '.join(f'{t:.3f}' for t in ts)})")
    if "per-client" in times:
        ratio = statistics.median(times["per-client"]) / statistics.median(times["stacked"])
        print(f"  speed-up of the stacked path: {ratio:.2f}x")
    if flops:
        rate = statistics.median(gemm)
        print(f"  1024^3 fp32 matmul: {rate / 1e9:.1f} GFLOP/s (slices: {', '.join(f'{g / 1e9:.1f}' for g in gemm)})")
        for name, f in flops.items():
            t = statistics.median(times[name])
            print(f"  {name:>10}: {f / 1e9:.3f} GFLOP/step, {f / t / 1e9:.1f} GFLOP/s = {f / t / rate:.0%} of the "
                  f"matmul rate; at that rate {f / rate:.3f} s/step")
        if "per-client" in times:
            bound = statistics.median(times["per-client"]) / (flops["stacked"] / rate)
            print(f"  ceiling: per-client time / stacked FLOPs at the matmul rate = {bound:.2f}x")
    print(f"  load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
          f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    return 0


def _matmul_rate(torch, device) -> float:
    """FLOP/s of a 1024 x 1024 fp32 matmul on ``device`` (the simulators' device; on the CPU this process's threads),
    best of 5 after one warm-up."""
    a, b = torch.randn(1024, 1024, device=device), torch.randn(1024, 1024, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * 1024 ** 3 / best


if __name__ == "__main__":
    sys.exit(main())

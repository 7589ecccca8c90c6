"""Step time of the stacked simulator against the per-client simulator, measured alternately in one process.

    OMP_NUM_THREADS=2 python recipes/simulate_speed.py                      # 8 clients, every method group
    OMP_NUM_THREADS=2 python recipes/simulate_speed.py --clients 32 --rounds 1

Both simulators are built with the same settings (the embedded model, Erdős–Rényi graph, DECA with the
gradient-unit signal, 2 layers per block) and stepped in turn: ``--steps`` steps of one, then of the other,
``--rounds`` times, so that whatever else loads the machine loads both alike. The block changes every
``--switch`` steps so that the timed steps cover every block (the embeddings block needs the longest backward).
Prints the median seconds per step of each path, the ratio, and the load averages before and after.
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
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(args.rounds):
        for name, sim in paths.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                sim.step(measure_distance=False)
            times[name].append((time.perf_counter() - t0) / args.steps)
    load_after = os.getloadavg()
    print(f"{args.clients} clients, method={args.method}, {args.threads} thread(s), torch {torch.__version__}, "
          f"{args.rounds} x {args.steps} steps per path, alternated")
    for name, ts in times.items():
        print(f"  {name:>10}: {statistics.median(ts):.3f} s/step (slices: {', '.join(f'{t:.3f}' for t in ts)})")
    if "per-client" in times:
        ratio = statistics.median(times["per-client"]) / statistics.median(times["stacked"])
        print(f"  speed-up of the stacked path: {ratio:.2f}x")
    print(f"  load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
          f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

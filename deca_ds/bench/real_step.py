"""The real launcher step, measured: N one-rank clients on a ring, gossip + consensus + the launcher's per-step work,
against the same local step without gossip, alternated in one run.

What a training run pays per step beyond the local step (issue 15 items 2 and 6): the gossip mix of the active block
with the neighbours, the consensus signal and moment fold, and the launcher's per-step work
(:class:`deca_ds.trainer.LauncherDriver`: the monitoring all-gather, the consensus distance at log steps). This
module starts ``clients`` processes (gloo, CPU or one GPU each), builds in each two DeepSpeed stage-0 engines on the
same model shape and batches -- ``method=deca`` driven through the launcher's driver, and ``method=local`` (the same
BlockAdam step, no gossip, no consensus) -- and times them alternately, one whole round of blocks at a time (every
block position, so both variants see the same mix of forward/backward depths), ``reps`` times. Reported per variant:
the median seconds per step over the rounds (mean over ranks) and its spread (min, max); ``ratio`` = real / local.

Beside the wall time, each rank's CPU time (``time.process_time``: every thread of the process, gloo's included) is
taken over the same rounds (``cpu``), and ``cores_busy`` = clients x CPU seconds per step / wall seconds per step.
They split an overhead into work and waiting: a rank blocked on a neighbour's message burns no CPU, so extra CPU
seconds are work the step adds (exchange, mixing, consensus), while a wall-time ratio above the CPU-time ratio with
fewer cores busy is time the cores stood idle at the synchronisation gossip implies (one neighbour behind the others).
On a machine with fewer cores than clients that idle time is the test bed's, not the step's.

    python -m deca_ds.bench.real_step --clients 4 --reps 5        # prints one JSON record
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import torch

from deca_ds.bench.benchmark import REAL_STEP_METHOD

__all__ = ["VARIANTS", "measure_real_step", "summarize_rounds", "summarize_real_step", "main"]

VARIANTS = ("real", "deca_train_step", "local")
"""``real``: the launcher driver's whole step (engine step with gossip + consensus, watch, all-gather, distance at
log steps); ``deca_train_step``: the deca engine's ``train_step`` alone; ``local``: ``method=local``'s
``train_step`` (the local step without gossip)."""


def summarize_rounds(per_rank: list[dict[str, list[float]]]) -> dict[str, Any]:
    """Median and spread of seconds per step for each variant, over rounds, averaged over ranks.

    Args:
        per_rank: for each rank, ``{variant: [seconds per step of each round]}``.

    Returns:
        ``{variant: {"median_s", "min_s", "max_s", "rounds"}}`` plus ``ratio_real_vs_local`` and
        ``ratio_deca_train_step_vs_local`` (medians divided).
    """
    out: dict[str, Any] = {}
    for v in per_rank[0]:
        rounds = [statistics.fmean(r[v][k] for r in per_rank) for k in range(len(per_rank[0][v]))]
        out[v] = {"median_s": statistics.median(rounds), "min_s": min(rounds), "max_s": max(rounds),
                  "rounds": rounds}
    if "local" in out:
        for v in ("real", "deca_train_step"):
            if v in out:
                out[f"ratio_{v}_vs_local"] = out[v]["median_s"] / out["local"]["median_s"]
    return out


def summarize_real_step(per_rank: list[dict[str, dict[str, list[float]]]]) -> dict[str, Any]:
    """The record's figures from every rank's rounds: wall time, CPU time and the cores they kept busy.

    Args:
        per_rank: for each rank, ``{"wall": {variant: [s/step of each round]}, "cpu": {variant: [CPU s/step]}}``.

    Returns:
        :func:`summarize_rounds` of the wall times (at top level, as before), ``cpu``: the same of the CPU times,
        and ``cores_busy``: per variant, ranks x CPU median / wall median (how many cores the clients kept busy).
    """
    out = summarize_rounds([r["wall"] for r in per_rank])
    out["cpu"] = summarize_rounds([r["cpu"] for r in per_rank])
    out["cores_busy"] = {v: len(per_rank) * out["cpu"][v]["median_s"] / out[v]["median_s"]
                         for v in per_rank[0]["wall"]}
    return out


def _cfg(spec: dict[str, Any], method: str):
    from deca_ds.config import load_config

    # deca.signal and betas stay the product's defaults (the gradient-unit reading reads Adam's denominators too).
    return load_config(None, [f"method={method}", f"blocks.layers_per_block={spec['layers_per_block']}",
                              f"blocks.switch_every={spec['switch_every']}", f"optim.lr={spec['lr']}",
                              f"log_every={spec['log_every']}"])


def _rank_main(rank: int, world: int, port: int, spec: dict[str, Any], results) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), LOCAL_WORLD_SIZE="1")
    torch.set_num_threads(spec["threads"])
    try:
        times, close = _measure_rank(rank, world, spec)
    except BaseException as e:  # the parent reports it; a hung peer times out there
        import traceback

        results.put((rank, {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}))
        return
    # Hazard: the figures leave before the teardown -- gloo's threads occasionally abort a process while the group
    # is torn down (see deca_ds.trainer.run), which must not lose a finished measurement.
    results.put((rank, times))
    close()


def _measure_rank(rank: int, world: int, spec: dict[str, Any]):
    import torch.distributed as dist

    from deca_ds.bench.worker import build_model, make_batches
    from deca_ds.engine import build_engine, setup_distributed
    from deca_ds.gossip import ClientGroups, ClientLayout, Mixer
    from deca_ds.topology import make_topology
    from deca_ds.trainer import LauncherDriver

    setup_distributed(300)
    layout = ClientLayout(world, rank, 1)
    groups = ClientGroups.create(layout)
    topo = make_topology(spec["topology"], world)
    mixer = Mixer(layout, topo, chunk_bytes=int(spec["gossip_chunk_mb"] * 2**20), timeout=300,
                  dp_group=groups.client_group)
    ds = {"train_micro_batch_size_per_gpu": spec["micro_batch"], "gradient_accumulation_steps": 1,
          "gradient_clipping": spec["gradient_clipping"], "steps_per_print": 10**9}
    deca = build_engine(_cfg(spec, "deca"), build_model(spec), ds, groups, mixer=mixer)
    local = build_engine(_cfg(spec, "local"), build_model(spec), ds, groups)
    batches = make_batches(dict(spec, seed=spec["seed"] + 7 * rank), build_model_vocab(spec), 4)

    class _Driver(LauncherDriver):  # the launcher's per-step work with synthetic batches
        def _micro_batches(self, step):
            return [{"input_ids": batches[step % len(batches)], "labels": batches[step % len(batches)]}]

    cfg = _cfg(spec, "deca")
    driver = _Driver(cfg, deca, None, None, layout, out=None)
    steps_per_round = deca.schedule.num_blocks * spec["switch_every"]
    counters = {"real": 0, "deca_train_step": 0, "local": 0}

    def one(variant: str) -> None:
        k = counters[variant]
        mb = [{"input_ids": batches[k % len(batches)], "labels": batches[k % len(batches)]}]
        if variant == "real":
            driver.step(deca.global_step, measure_distance=(deca.global_step + 1) % cfg.log_every == 0,
                        stop_requested=False)
        elif variant == "deca_train_step":
            deca.train_step(mb)
        else:
            local.train_step(mb)
        counters[variant] += 1

    for v in VARIANTS:  # warm-up: one round each (allocator, first-touch, gloo connections)
        for _ in range(steps_per_round * spec["warmup_rounds"]):
            one(v)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for rep in range(spec["reps"]):
        order = VARIANTS[rep % 3:] + VARIANTS[:rep % 3]  # rotate which variant goes first
        for v in order:
            dist.barrier()  # every client starts the round together: no rank waits on another's other variant
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps_per_round):
                one(v)
            times[v].append((time.perf_counter() - t0) / steps_per_round)
            cpu[v].append((time.process_time() - c0) / steps_per_round)

    def close() -> None:
        deca.close()
        local.close()
        dist.destroy_process_group()

    return {"wall": times, "cpu": cpu}, close


def build_model_vocab(spec: dict[str, Any]) -> int:
    """Vocabulary size of the benchmark model ``spec`` describes."""
    if spec.get("model"):
        with open(os.path.join(spec["model"], "config.json")) as f:
            return int(json.load(f)["vocab_size"])
    return int(spec["shape"]["vocab"])


def measure_real_step(spec: dict[str, Any], timeout: float = 1800.0) -> dict[str, Any]:
    """Start ``spec["clients"]`` processes and measure the three :data:`VARIANTS` alternately.

    Args:
        spec: the benchmark worker spec (``shape``/``model``, ``dtype``, ``device``, ``micro_batch``, ``seq_len``,
            ``seed``, ``lr``, ``threads``) plus ``clients``, ``topology``, ``layers_per_block``, ``switch_every``,
            ``reps``, ``warmup_rounds``, ``log_every``, ``gradient_clipping``, ``gossip_chunk_mb``.
        timeout: seconds before the measurement is abandoned.

    Returns:
        A record: ``method`` :data:`~deca_ds.bench.benchmark.REAL_STEP_METHOD`, the settings, :func:`summarize_rounds`'s
        figures of wall seconds per step, ``cpu`` (the same of CPU seconds per step and rank, ratios included) and
        ``cores_busy`` (per variant: clients x CPU median / wall median); or ``failed``/``reason``.
    """
    import queue as queue_module

    import torch.multiprocessing as mp

    from deca_ds.topology import make_topology

    world = int(spec["clients"])
    topo = make_topology(spec["topology"], world)
    degree = len(topo.neighbors(0, 0))
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if spec["device"] == "cpu" else "cuda")
    from socket import socket

    with socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, spec, results), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    per_rank: dict[int, Any] = {}
    deadline = time.time() + timeout
    record: dict[str, Any] = {"method": REAL_STEP_METHOD, "clients": world, "topology": spec["topology"],
                              "neighbours": degree, "layers_per_block": spec["layers_per_block"],
                              "switch_every": spec["switch_every"], "reps": spec["reps"],
                              "model_dtype": spec["dtype"], "device": spec["device"]}
    try:
        while len(per_rank) < world:
            if time.time() > deadline:
                return dict(record, failed=True, reason=f"timed out after {timeout:.0f} s")
            try:
                rank, res = results.get(timeout=5.0)
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs) if r not in per_rank and p.exitcode not in (None, 0)]
                if dead:
                    return dict(record, failed=True, reason=f"rank {dead[0]} died (exit {procs[dead[0]].exitcode}) "
                                                            "without a result")
                continue
            if "error" in res:
                return dict(record, failed=True, reason=f"rank {rank}: {res['error']}")
            per_rank[rank] = res
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    record.update(summarize_real_step([per_rank[r] for r in range(world)]))
    return record


def main(argv: list[str] | None = None) -> int:
    """``python -m deca_ds.bench.real_step``: print one record as JSON."""
    from deca_ds.bench.benchmark import DEFAULT_SHAPE

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--topology", default="ring")
    p.add_argument("--shape", default=None, help="JSON merged into the benchmark's default shape")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--layers-per-block", type=int, default=1)
    p.add_argument("--switch-every", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--log-every", type=int, default=1,
                   help="the launcher's log_every: monitoring figures are all-gathered at log steps only")
    p.add_argument("--warmup-rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per client process")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="also write the record to this JSON file")
    a = p.parse_args(argv)
    spec = {"shape": dict(DEFAULT_SHAPE, **(json.loads(a.shape) if a.shape else {})), "model": None,
            "dtype": "fp32" if a.device == "cpu" else "bf16", "device": a.device, "micro_batch": a.micro_batch,
            "seq_len": a.seq_len, "seed": 0, "lr": 1e-5, "threads": a.threads, "clients": a.clients,
            "topology": a.topology, "layers_per_block": a.layers_per_block, "switch_every": a.switch_every,
            "reps": a.reps, "warmup_rounds": a.warmup_rounds, "log_every": a.log_every, "gradient_clipping": 1.0,
            "gossip_chunk_mb": 64.0}
    rec = measure_real_step(spec)
    print(json.dumps({k: v for k, v in rec.items()}, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rec, f, indent=1)
    return 1 if rec.get("failed") else 0


if __name__ == "__main__":
    raise SystemExit(main())

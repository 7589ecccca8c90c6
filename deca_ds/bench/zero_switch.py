"""The cost of a block switch inside a multi-rank ZeRO client, at two model sizes, with and without the whole-model
re-broadcast that ``deepspeed.initialize`` does (issue 15 item 5).

    python -m deca_ds.bench.zero_switch --layers 4,16 --stages 1,2 --switches 6

One client of 2 ranks (gloo; CPU or GPU), ``method=local``, one layer per block, a switch after every step. Before each
step the engine's ``rebroadcast_on_switch`` alternates, so the two ways of switching are measured in turn on the same
processes; ``ZeroBlockEngine.switch_seconds`` gives each switch's wall time (teardown + initialize + state restore).
Prints one JSON record per (layers, stage): median switch seconds with and without the re-broadcast, the median step
time, and the parameter counts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import torch

__all__ = ["measure_switch", "main"]


def _rank_main(rank: int, world: int, port: int, spec: dict[str, Any], results) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        results.put((rank, _measure(rank, world, spec)))
    except BaseException as e:
        import traceback

        results.put((rank, {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}))


def _measure(rank: int, world: int, spec: dict[str, Any]) -> dict[str, Any]:
    import torch.distributed as dist

    from deca_ds.bench.worker import build_model, make_batches
    from deca_ds.config import load_config
    from deca_ds.engine import build_engine, setup_distributed
    from deca_ds.gossip import ClientGroups, ClientLayout

    setup_distributed(300)
    layout = ClientLayout(world, rank, world)
    groups = ClientGroups.create(layout)
    cfg = load_config(None, ["method=local", "blocks.layers_per_block=1", "blocks.switch_every=1",
                             f"clients.ranks_per_client={world}"])
    ds = {"train_micro_batch_size_per_gpu": spec["micro_batch"], "gradient_accumulation_steps": 1,
          "steps_per_print": 10**9, "zero_optimization": {"stage": spec["stage"]}}
    model = build_model(spec)
    params = sum(p.numel() for p in model.parameters())
    eng = build_engine(cfg, model, ds, groups)
    batches = make_batches(spec, spec["shape"]["vocab"], 2)
    flags, steps = [], []
    for k in range(spec["switches"] + 1):
        eng.rebroadcast_on_switch = bool(k % 2)
        flags.append(eng.rebroadcast_on_switch)
        t0 = time.perf_counter()
        eng.train_step([{"input_ids": batches[k % 2], "labels": batches[k % 2]}])
        steps.append(time.perf_counter() - t0)
    block = sum(p.numel() for p in eng.active_params())
    eng.close()
    dist.destroy_process_group()
    # switch_seconds[i] is the switch after step i (every step switches with switch_every=1)
    return {"switch_s": list(eng.switch_seconds), "rebroadcast": flags[:len(eng.switch_seconds)], "step_s": steps,
            "params": params, "block_params": block}


def measure_switch(spec: dict[str, Any], timeout: float = 1200.0) -> dict[str, Any]:
    """One 2-rank client for ``spec`` (``shape``, ``stage``, ``switches``, ...); returns the record."""
    import queue as queue_module
    from socket import socket

    import torch.multiprocessing as mp

    world = 2
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if spec["device"] == "cpu" else "cuda")
    with socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, spec, results), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    got: dict[int, Any] = {}
    try:
        while len(got) < world:
            try:
                rank, res = results.get(timeout=timeout)
            except queue_module.Empty:
                return {"failed": True, "reason": f"timed out after {timeout:.0f} s"}
            if "error" in res:
                return {"failed": True, "reason": f"rank {rank}: {res['error']}"}
            got[rank] = res
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    r0 = got[0]
    # a switch costs what its slowest rank took
    per_switch = [max(got[r]["switch_s"][i] for r in got) for i in range(len(r0["switch_s"]))]
    with_b = [t for t, f in zip(per_switch, r0["rebroadcast"]) if f]
    without = [t for t, f in zip(per_switch, r0["rebroadcast"]) if not f]
    steps = r0["step_s"][1:]
    return {"layers": spec["shape"]["layers"], "stage": spec["stage"], "params": r0["params"],
            "block_params": r0["block_params"], "frozen_params": r0["params"] - r0["block_params"],
            "switch_s_with_rebroadcast": statistics.median(with_b) if with_b else None,
            "switch_s_without_rebroadcast": statistics.median(without) if without else None,
            "switch_s_all": per_switch, "rebroadcast": r0["rebroadcast"],
            "step_s_median": statistics.median(steps)}


def main(argv: list[str] | None = None) -> int:
    """``python -m deca_ds.bench.zero_switch``: one JSON line per (layers, stage)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", default="4,16")
    p.add_argument("--stages", default="1,2")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--switches", type=int, default=6)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    failed = False
    for layers in [int(x) for x in a.layers.split(",")]:
        for stage in [int(x) for x in a.stages.split(",")]:
            shape = {"hidden": a.hidden, "intermediate": int(a.hidden * 2.6875), "layers": layers, "heads": 4,
                     "kv_heads": 4, "vocab": a.vocab}
            spec = {"shape": shape, "model": None, "dtype": "fp32" if a.device == "cpu" else "bf16",
                    "device": a.device, "micro_batch": a.micro_batch, "seq_len": a.seq_len, "seed": 0,
                    "stage": stage, "switches": a.switches}
            rec = measure_switch(spec)
            failed |= bool(rec.get("failed"))
            print(json.dumps(rec), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

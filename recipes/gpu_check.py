"""Everything that needs a GPU, in one call of under 8 minutes, with one printed summary.

    python recipes/gpu_check.py [--out runs/gpu_check] [--budget-s 470]

1. every ``gpu``-marked test (``pytest -m gpu`` over the files that hold one, :func:`gpu_test_files`);
2. the benchmark (``deca_ds.bench.benchmark``: AdamW = DeepSpeed FusedAdam, torch fused AdamW, deca, BAdam;
   alternated rounds, medians with spread, FLOP ceiling) on a >= 1B model built from its config (no download);
3. planner vs measured peak memory for that >= 1B model (default ``recipes/models/qwen2-1.5b``, 1.54B parameters):
   BlockAdam trains the blocks with the largest activations (the lowest block) and the largest block (embeddings /
   LM head), and ``torch.cuda.max_memory_allocated`` is compared with ``deca-ds plan``'s model states + activations,
   for the plain step and for the leanest one (``optim.fused_backward`` + ``optim.moment_dtype=int8``).

Each part runs in its own process session under its own time limit (the limits add up to less than
``--budget-s``), so one part that hangs costs only its share; each part's whole output goes to ``OUT/<part>.log``.
Run on one H200 (4 Dec 2026): all passed in 320 s (docs/benchmark.md, Goal 7). Without CUDA it prints why nothing
ran and exits 0. Exit status: 1 if any part failed. ``OUT/summary.json`` keeps the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = "recipes/models/qwen2-1.5b"
# Seconds per part; their sum stays under the 8-minute budget with start-up to spare. The benchmark's share includes
# building DeepSpeed's FusedAdam kernel once (a JIT compile, 47 s on a fresh H200 machine) before any timed worker;
# on that machine the parts took 23 s, 285 s (12 worker processes of 14-27 s each, mostly start-up) and ~20 s.
LIMITS = {"gpu_tests": 50, "benchmark": 335, "peak_memory": 70}


def gpu_test_files(root: Path = ROOT) -> list[str]:
    """The test files that hold a ``gpu``-marked test, relative to ``root``. Only these are collected: ``pytest
    tests -m gpu`` would import every test module, and one whose optional dependency is missing on the GPU machine
    (TRL, datasets) would fail the collection before any GPU test ran."""
    import re

    marked = re.compile(r"(^\s*@|marks=\[?)pytest\.mark\.gpu\b", re.M)  # a decorator, or a parameter's mark
    return sorted(str(p.relative_to(root)) for p in (root / "tests").rglob("test_*.py")
                  if marked.search(p.read_text()))


def parts(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The commands to run, in order, each with its time limit (seconds)."""
    py = sys.executable
    bench_out = str(Path(args.out) / "benchmark")
    todo = [
        {"name": "gpu_tests", "limit": LIMITS["gpu_tests"],
         "cmd": [py, "-m", "pytest", *gpu_test_files(), "-m", "gpu", "-q", "-p", "no:cacheprovider", "-n", "0"]},
        {"name": "benchmark", "limit": LIMITS["benchmark"],
         "cmd": [py, "-m", "deca_ds.cli", "bench", "--out", bench_out, "--model", args.model,
                 "--methods", "adamw,adamw_fused,deca,badam", "--layers-per-block", "1", "--state-policies",
                 "reset", "--reps", "3", "--steps", "6", "--warmup", "2", "--micro-batch", str(args.micro_batch),
                 "--seq-len", str(args.seq_len), "--timeout", "60", "--compare"]},
        {"name": "peak_memory", "limit": LIMITS["peak_memory"],
         "cmd": [py, str(Path(__file__).resolve()), "--peak-memory-only", "--model", args.model,
                 "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch),
                 "--json-out", str(Path(args.out) / "peak_memory.json")]},
    ]
    for part in todo:
        part["log"] = str(Path(args.out) / f"{part['name']}.log")
    return todo


def compare_peak(planned: dict[str, int], measured_peak: int) -> dict[str, Any]:
    """Planner vs measured: the plan (model states + activations, no overhead reserve) must bound the measured peak.

    Args:
        planned: ``model_states`` and ``activations`` bytes from the planner.
        measured_peak: ``torch.cuda.max_memory_allocated`` over the steps.

    Returns:
        ``planned_bytes``, ``measured_bytes``, ``measured_over_planned`` and ``ok`` (measured <= planned).
    """
    total = int(planned["model_states"]) + int(planned["activations"])
    return {"planned_bytes": total, "measured_bytes": int(measured_peak),
            "measured_over_planned": measured_peak / total, "ok": measured_peak <= total}


PEAK_CASES = (("plain", False, "fp32"), ("fused_int8", True, "int8"))
"""The peak-memory cases: ``(name, optim.fused_backward, optim.moment_dtype)`` -- the unfused fp32-moment step and
the leanest one (step fused into backward, 8-bit active-block moments), each checked against its own plan."""


def peak_memory_check(model_dir: str, seq_len: int, micro_batch: int) -> dict[str, Any]:
    """Train the lowest block, the largest block and the next one of ``model_dir`` (random init, bf16, one GPU)
    with BlockAdam, once per :data:`PEAK_CASES` case on the same model, and compare each case's peak with
    :func:`deca_ds.bench.planner.plan_from_model_dir` for the same settings.

    Returns:
        The ``plain`` case's figures at the top level (:func:`compare_peak`'s keys plus the model's), every case's
        under ``cases`` by name, and ``ok`` only when every case's measured peak is within its plan.
    """
    import gc

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from deca_ds.bench.planner import GIB, PlanRequest, plan_from_model_dir
    from deca_ds.build import partition_for
    from deca_ds.config import BlocksConfig
    from deca_ds.optim import BlockAdam

    config = AutoConfig.from_pretrained(model_dir)
    config.use_cache = False
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.train()
    part = partition_for(model, BlocksConfig())
    sizes = part.block_sizes(model)
    largest = max(range(len(sizes)), key=sizes.__getitem__)
    order = [0, largest, 1 if largest != 1 else 2]
    cases = {}
    for name, fused, moments in PEAK_CASES:
        plan = plan_from_model_dir(model_dir, PlanRequest(gpu_memory=1024 * GIB, seq_len=seq_len,
                                                          micro_batch=micro_batch, clients=1, state_policy="reset",
                                                          dtype="bf16", layers_per_block=1, include_embeddings=True,
                                                          include_lm_head=True, fused_backward=fused,
                                                          moment_dtype=moments))
        opt = BlockAdam(model, part, lr=1e-5, switch_every=1, order="fixed", fixed_order=order,
                        fused_backward=fused, moment_dtype=moments)
        g = torch.Generator().manual_seed(1)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in order:
            ids = torch.randint(0, config.vocab_size, (micro_batch, seq_len), generator=g).cuda()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
        torch.cuda.synchronize()
        case = compare_peak({"model_states": plan.deca["model_states"], "activations": plan.activation_bytes},
                            torch.cuda.max_memory_allocated())
        cases[name] = dict(case, fused_backward=fused, moment_dtype=moments,
                           planned_model_states=plan.deca["model_states"], planned_activations=plan.activation_bytes,
                           seconds=time.perf_counter() - t0)
        # The next case starts from the same weights with nothing of this optimizer alive (state, grads). The fused
        # case comes last: its backward hooks stay on the parameters it leaves behind.
        model.zero_grad(set_to_none=True)
        del opt
        gc.collect()
        torch.cuda.empty_cache()
    out = dict(cases["plain"], model=model_dir, params=sum(p.numel() for p in model.parameters()),
               blocks_visited=order, largest_block_params=sizes[largest], cases=cases)
    out["ok"] = all(c["ok"] for c in cases.values())
    return out


def run_part(part: dict[str, Any]) -> dict[str, Any]:
    """Run one part under its limit; returns status (``pass``/``fail``/``timeout``), seconds and the output tail.

    The part runs in a session of its own and the whole session is killed at the limit: the benchmark's workers
    are grandchildren, and killing only the direct child would leave them holding the GPU into the next part.
    With ``part["log"]`` the whole output is also written there.
    """
    import signal

    t0 = time.perf_counter()
    # The checkout first, then whatever PYTHONPATH already holds (packages installed with pip --target).
    path = os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH", "")) if x)
    proc = subprocess.Popen(part["cmd"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONPATH=path), start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=part["limit"])
        status = "pass" if proc.returncode == 0 else "fail"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        status = "timeout"
    if part.get("log"):
        Path(part["log"]).parent.mkdir(parents=True, exist_ok=True)
        Path(part["log"]).write_text(out or "")
    tail = (out or "").strip().splitlines()[-25:]
    return {"name": part["name"], "status": status, "seconds": time.perf_counter() - t0, "tail": tail}


def summarize(results: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> str:
    """The one printed summary: a line per part, then the figures (peak memory) and each part's output tail."""
    lines = ["== gpu_check summary =="]
    for r in results:
        lines.append(f"{r['name']:12s} {r['status'].upper():8s} {r['seconds']:7.1f} s")
    if extra:
        pm = extra.get("peak_memory")
        for name, c in (pm.get("cases") or {"plain": pm}).items() if pm else ():
            lines.append(f"peak memory {name} ({pm['model']}, {pm['params'] / 1e9:.2f}B params): measured "
                         f"{c['measured_bytes'] / 2**30:.2f} GiB vs planned {c['planned_bytes'] / 2**30:.2f} GiB "
                         f"(model states {c['planned_model_states'] / 2**30:.2f} + activations "
                         f"{c['planned_activations'] / 2**30:.2f}); measured/planned "
                         f"{c['measured_over_planned']:.3f} -> {'OK' if c['ok'] else 'PLAN TOO LOW'}")
    for r in results:
        lines.append(f"-- {r['name']} (last lines) --")
        lines.extend(r["tail"])
    total = sum(r["seconds"] for r in results)
    lines.append(f"total {total:.0f} s; {'ALL PASSED' if all(r['status'] == 'pass' for r in results) else 'FAILURES'}")
    return "\n".join(lines)


def resolve_paths(args: argparse.Namespace) -> None:
    """Make ``--out`` and ``--model`` absolute, in place: the parts run in the checkout (``cwd=ROOT``) while the
    summary is written from the caller's directory, so a relative path would name two places when the script is run
    from elsewhere. A relative ``--model`` is the caller's, except the default, which lives in the checkout."""
    args.out = str(Path(args.out).resolve())
    model = ROOT / DEFAULT_MODEL if args.model == DEFAULT_MODEL else Path(args.model)
    args.model = str(model.resolve())


def main(argv: list[str] | None = None) -> int:
    """Run the parts (or, with ``--peak-memory-only``, the peak-memory check itself)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/gpu_check")
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF config directory of a >= 1B model (random init)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--budget-s", type=float, default=470.0, help="the parts' limits must add up to less than this")
    p.add_argument("--peak-memory-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    resolve_paths(args)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False): nothing ran. Run it on a machine "
              "with one GPU; the CPU test suite covers everything else.")
        return 0
    if args.peak_memory_only:
        res = peak_memory_check(args.model, args.seq_len, args.micro_batch)
        print(json.dumps(res))
        if args.json_out:
            Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json_out).write_text(json.dumps(res))
        return 0 if res["ok"] else 1
    todo = parts(args)
    if sum(x["limit"] for x in todo) >= args.budget_s:
        raise SystemExit(f"--budget-s={args.budget_s}: the parts need {sum(x['limit'] for x in todo)} s")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    results = [run_part(x) for x in todo]
    extra = {}
    pm_file = Path(args.out) / "peak_memory.json"
    if pm_file.exists():
        extra["peak_memory"] = json.loads(pm_file.read_text())
    print(summarize(results, extra))
    (Path(args.out) / "summary.json").write_text(json.dumps({"parts": results, **extra}, indent=1))
    return 0 if all(r["status"] == "pass" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

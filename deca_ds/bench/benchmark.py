"""Benchmark deca_ds against full Adam (and BAdam) on the user's own hardware, in one invocation.

Every method and setting runs in a fresh process (:mod:`deca_ds.bench.worker`) on the same model, micro-batch and
sequence length, so that neither peak memory nor throughput is polluted by another method. The methods are
alternated: ``--reps`` rounds, each running every method once (the order rotated each round), so machine load that
drifts over the run lands on every method alike; each record carries the median over the rounds and the spread
(``tokens_per_s_min``/``_max``, every round's figure in ``tokens_per_s_reps``). ``deca (real step)`` runs the real
launcher step (:mod:`deca_ds.bench.real_step`: clients on a ring, gossip with 2 neighbours, consensus, the launcher's
per-step work) against the same local step in one launch. Beside each ratio to AdamW the matmul-FLOP ceiling of that
ratio is printed (:func:`flop_ceiling`): what the ratio would be if every method ran at the same FLOP rate.
Outputs, in ``OUT``: ``benchmark.json`` (``{"records": [...]}``, one record per method/setting), ``benchmark.md``
(a table) and ``benchmark.png`` (a bar chart of tokens/s and model-state bytes). ``--compare`` prints ratios to
``adamw``.

Record fields: ``method``, ``blocks``, ``state_policy``, ``params``, ``largest_block_params``, ``model_dtype``,
``model_state_bytes`` (weights + gradients + master + moments held on the training device, counted from tensors),
``gossip_buffer_bytes``, ``peak_device_bytes`` (GPU) or ``peak_rss_bytes`` (CPU, fresh process, VmHWM after the
model is built and ``clear_refs`` reset it), ``tokens_per_s``, ``time_{forward,backward,optimizer,gossip,
block_switch}_s`` (per measured step), ``bytes_sent_per_step`` (computed, see ``bytes_sent_note``), and the targets
checked (``target_*``); ``deca_fused_int8`` also ``moment_scratch_bytes`` (the fp32 copy of one tensor's moments its
step dequantizes, a temporary buffer outside the model states).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from deca_ds.bench.planner import MIB, ring_degree

DEFAULT_SHAPE = {"hidden": 512, "intermediate": 1376, "layers": 8, "heads": 8, "kv_heads": 8, "vocab": 8000}
"""CPU default: an 8-layer Llama of 33.5M parameters (untied embeddings), big enough for ratios to mean something."""
DECA_METHODS = ("deca", "deca_fused", "deca_fused_int8")
"""The records of one client's BlockAdam step (unfused, fused into backward, fused with 8-bit moments)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the benchmark's options to ``p`` (shared by ``deca-ds bench`` and ``recipes/benchmark.py``)."""
    p.add_argument("--out", default="runs/benchmark", help="output directory (default runs/benchmark)")
    p.add_argument("--methods", default="adamw,adamw_fused,zero_offload,deca,badam,deca_real",
                   help="comma list of adamw (torch default), adamw_fused (torch fused=True), zero_offload, deca, "
                        "deca_fused (optimizer step inside backward), deca_fused_int8 (and 8-bit active-block "
                        "moments), badam, deca_real (the real launcher step; several processes)")
    p.add_argument("--reps", type=int, default=3, help="rounds over all methods (median and spread); >= 3 advised")
    p.add_argument("--real-clients", type=int, default=4, help="deca_real: clients on the ring (2 neighbours each)")
    p.add_argument("--real-reps", type=int, default=5, help="deca_real: alternated rounds of real vs local steps")
    p.add_argument("--model", default=None, help="HF config directory (random init); default: the CPU Llama")
    p.add_argument("--shape", default=None,
                   help="default-model shape as JSON, e.g. '{\"hidden\": 64, \"layers\": 2}' (merged into "
                        f"{json.dumps(DEFAULT_SHAPE)})")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="weights (default fp32 CPU, bf16 GPU)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=16, help="measured steps per method")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--layers-per-block", default="1,2,4", help="deca/badam settings; B = layers / this")
    p.add_argument("--state-policies", default="reset,offload")
    p.add_argument("--offload-dtype", choices=("fp32", "int8"), default="fp32")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--clients", type=int, default=8, help="clients of the ring used for bytes_sent_per_step")
    p.add_argument("--topology", default="ring")
    p.add_argument("--gossip-chunk-mb", type=float, default=64.0)
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: all cores)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per method before it is recorded failed")
    p.add_argument("--compare", action="store_true", help="print ratios to adamw")


METHODS = ("adamw", "adamw_fused", "zero_offload") + DECA_METHODS + ("badam", "deca_real")
"""Every ``--methods`` name."""


def _check_out_dir(out: str) -> None:
    """``--out`` is a writable directory or can be created as one (checked when the first worker's partial results
    were written: a FileExistsError traceback after minutes of benchmarking)."""
    probe = os.path.abspath(out)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        where = "is a file" if probe == os.path.abspath(out) else f"cannot be created: {probe} is a file"
        raise ValueError(f"--out {out} {where}: give a directory for benchmark.json, benchmark.md and benchmark.png")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {probe} is not writable: give a directory you can write to")


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse bad benchmark arguments before any worker starts (each worker would otherwise fail on its own, or a
    zero count would be quietly raised to one).

    Raises:
        ValueError: the first bad argument, as one line naming the flag and the fix.
    """
    import math

    from deca_ds.config import STATE_POLICIES

    for flag, value, low in (("--reps", args.reps, 1), ("--steps", args.steps, 1), ("--warmup", args.warmup, 0),
                             ("--micro-batch", args.micro_batch, 1), ("--seq-len", args.seq_len, 1),
                             ("--clients", args.clients, 1), ("--real-clients", args.real_clients, 2),
                             ("--real-reps", args.real_reps, 1)):
        if value < low:
            raise ValueError(f"{flag} {value} is out of range: use an integer >= {low}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads {args.threads} is out of range: use an integer >= 1, or leave it out (all cores)")
    for flag, value in (("--gossip-chunk-mb", args.gossip_chunk_mb), ("--timeout", args.timeout),
                        ("--lr", args.lr)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag} {value} is out of range: use a number > 0")
    _check_out_dir(args.out)
    methods = [m.strip() for m in str(args.methods).split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if not methods or bad:
        raise ValueError(f"--methods {args.methods!r}: {'unknown ' + ', '.join(bad) if bad else 'empty'}: use a comma "
                         f"list of {', '.join(METHODS)}")
    try:
        lpbs = [int(x) for x in str(args.layers_per_block).split(",") if x.strip()]
    except ValueError:
        lpbs = []
    if not lpbs or min(lpbs) < 1:
        raise ValueError(f"--layers-per-block {args.layers_per_block!r} is not a comma list of integers >= 1: "
                         "e.g. 1,2,4")
    policies = [x for x in str(args.state_policies).split(",") if x]
    if not policies or set(policies) - set(STATE_POLICIES):
        raise ValueError(f"--state-policies {args.state_policies!r}: use a comma list of {', '.join(STATE_POLICIES)}")
    if args.device not in (None, "cpu", "cuda"):
        raise ValueError(f"--device {args.device!r} is not supported: use cpu or cuda")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda but no CUDA device is visible: use --device cpu or run on a GPU machine")
    if args.shape is not None:
        try:
            shape = json.loads(args.shape)
        except json.JSONDecodeError as e:
            raise ValueError(f"--shape is not JSON ({e}): e.g. '{{\"hidden\": 64, \"layers\": 2}}'") from None
        unknown = set(shape) - set(DEFAULT_SHAPE) if isinstance(shape, dict) else set()
        if not isinstance(shape, dict) or unknown or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape.values()):
            raise ValueError(f"--shape {args.shape}: give a JSON object of positive integers with keys from "
                             f"{', '.join(DEFAULT_SHAPE)}" + (f" (unknown: {', '.join(sorted(unknown))})"
                                                              if unknown else ""))
    if args.model is not None and not os.path.isfile(os.path.join(args.model, "config.json")):
        raise ValueError(f"--model {args.model}: no config.json there: give a Hugging Face model directory (its "
                         "config is enough; weights are initialised at random)")


def build_specs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One worker spec per method and setting, all sharing model, batch and sequence length.

    deca and BAdam run a whole round of blocks inside the measured steps (``switch_every = steps // blocks``) so
    that every block position, and every switch, is in the average.
    """
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    shape = dict(DEFAULT_SHAPE, **(json.loads(args.shape) if args.shape else {}))
    n_layers = _num_layers(args.model) if args.model else shape["layers"]
    common = {"device": device, "dtype": dtype, "model": args.model, "shape": shape, "seed": 0,
              "micro_batch": args.micro_batch, "seq_len": args.seq_len, "steps": args.steps, "warmup": args.warmup,
              "lr": args.lr, "threads": args.threads or os.cpu_count(), "offload_dtype": args.offload_dtype,
              "gradient_checkpointing": args.gradient_checkpointing, "layers_per_block": None,
              "state_policy": None, "switch_every": None}
    specs = []
    lpbs = [int(x) for x in str(args.layers_per_block).split(",") if x]
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        if method in ("adamw", "adamw_fused"):
            specs.append(dict(common, method=method))
        elif method == "zero_offload":
            specs.append(dict(common, method="zero_offload"))
        elif method in DECA_METHODS + ("badam",):
            policies = [s for s in args.state_policies.split(",") if s] if method != "badam" else ["reset"]
            for lpb in lpbs:
                blocks = -(-n_layers // lpb)
                for policy in policies:
                    specs.append(dict(common, method=method, layers_per_block=lpb, state_policy=policy,
                                      switch_every=max(1, args.steps // blocks)))
        elif method == "deca_real":
            lpb = lpbs[0]
            specs.append(dict(common, method="deca_real", layers_per_block=lpb, state_policy="reset",
                              switch_every=1, clients=args.real_clients, topology="ring", reps=args.real_reps,
                              warmup_rounds=1, log_every=1, gradient_clipping=1.0,
                              gossip_chunk_mb=args.gossip_chunk_mb, threads=1))
        else:
            raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    return specs


def _num_layers(model_dir: str) -> int:
    with open(os.path.join(model_dir, "config.json")) as f:
        return int(json.load(f)["num_hidden_layers"])


def run_spec(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one spec in a fresh ``python -m deca_ds.bench.worker`` process and return its record.

    ``zero_offload`` on CPU is recorded as not applicable without starting a process: DeepSpeed's CPU offload moves
    optimizer state from the GPU to host memory, and on the CPU accelerator device and host are the same memory.
    """
    if spec["method"] == "zero_offload" and spec["device"] != "cuda":
        return {"method": "zero_offload", "not_applicable": True, "model_dtype": spec["dtype"],
                "reason": "ZeRO-Offload moves optimizer state from GPU to CPU memory; on a CPU-only run device and "
                          "host memory are the same, so there is nothing to measure"}
    if spec["method"] == "deca_real":
        from deca_ds.bench.real_step import measure_real_step

        return measure_real_step(spec, timeout=timeout)
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out_path = f.name
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if spec["device"] == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
        # The worker sets torch threads itself; OMP/MKL follow torch.set_num_threads.
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    cmd = [sys.executable, "-m", "deca_ds.bench.worker", "--spec", json.dumps(spec), "--out", out_path]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return _failed(spec, f"timed out after {timeout:.0f} s")
    finally:
        wall = time.perf_counter() - t0
    try:
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return _failed(spec, f"worker exited {proc.returncode}: {tail[0]}")
        with open(out_path) as f:
            record = json.load(f)
    finally:
        os.unlink(out_path)
    record["process_wall_s"] = wall
    return record


def _failed(spec: dict[str, Any], reason: str) -> dict[str, Any]:
    return {"method": spec["method"], "blocks": None, "state_policy": spec.get("state_policy"),
            "layers_per_block": spec.get("layers_per_block"), "failed": True, "reason": reason}


def spec_key(spec: dict[str, Any]) -> tuple:
    """What identifies one method/setting across rounds."""
    return (spec.get("method"), spec.get("layers_per_block"), spec.get("state_policy"))


REAL_STEP_METHOD = "deca (real step)"
"""The ``method`` of the record a ``deca_real`` spec yields (:func:`deca_ds.bench.real_step.measure_real_step`,
failed or not); the spec's own name ``deca_real`` never appears on a record."""


def _is_real(r: dict[str, Any]) -> bool:
    return r.get("method") == REAL_STEP_METHOD


def merge_reps(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """One record from the same spec's records of every round: timings are the median over the rounds, with the
    spread kept (``tokens_per_s_min``/``_max``/``_reps``, ``step_time_s_reps``); memory figures are the median too
    (they are counted from tensors and agree across rounds, peak RSS moves a little).

    A spec that failed or was skipped in any round is reported as the first such round's record.
    """
    bad = [r for r in reps if r.get("failed") or r.get("skipped") or r.get("not_applicable")]
    if bad:
        return bad[0]
    # A real-step record comes from one launch that alternates its variants inside (--real-reps rounds) and
    # already carries its medians and spread; it has no tokens/s of its own to merge.
    if _is_real(reps[0]):
        return reps[0]
    import statistics

    out = dict(reps[0])
    numeric = [k for k, v in reps[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)
               and (k.startswith("time_") or k.endswith("_bytes") or k in ("tokens_per_s", "step_time_s"))]
    for k in numeric:
        vals = [r[k] for r in reps if isinstance(r.get(k), (int, float))]
        out[k] = statistics.median(vals)
    for k in ("tokens_per_s", "step_time_s"):
        vals = [r[k] for r in reps]
        out[f"{k}_reps"] = vals
        out[f"{k}_min"], out[f"{k}_max"] = min(vals), max(vals)
    out["reps"] = len(reps)
    return out


def step_flops(shape: dict[str, int], tokens: int, seq_len: int, active_layers: tuple[int, int] | None) -> float:
    """Matmul FLOPs of one training step of the benchmark's Llama (forward + backward; optimizer left out).

    Per decoder layer: projections ``2 P T`` forward (P: its linear weights, T tokens), the attention core
    ``4 T S h`` forward (scores and weighted sum, every position counted); the LM head ``2 V h T``. Backward: the
    gradient with respect to activations costs what the forward does, the weight gradient as much again, and only
    where needed: full AdamW needs both everywhere (the embedding's weight gradient is a scatter, ~0 FLOPs). A block
    of layers ``active_layers = (a, b)`` with everything else frozen needs activation gradients from the LM head
    down to layer ``a`` and weight gradients in ``a..b`` only; layer ``a``'s input needs none (its q/k/v input
    gradients are skipped).

    Args:
        shape: ``hidden``, ``intermediate``, ``layers``, ``heads``, ``kv_heads``, ``vocab``.
        tokens: tokens per step (micro-batch x sequence length).
        seq_len: sequence length S.
        active_layers: the trained block's first and last layer, or None for full-parameter training.
    """
    h, f, n, v = shape["hidden"], shape["intermediate"], shape["layers"], shape["vocab"]
    kv = h * shape["kv_heads"] // shape["heads"]
    qkv = h * (h + 2 * kv)
    layer = qkv + h * h + 3 * h * f
    attn = 4 * tokens * seq_len * h
    fwd_layer = 2 * layer * tokens + attn
    head = 2 * v * h * tokens
    forward = n * fwd_layer + head
    if active_layers is None:
        return forward + n * (2 * fwd_layer) + 2 * head
    a, b = active_layers
    act = 2 * layer * tokens + 2 * attn  # activation gradients through one layer (attention backward ~2x forward)
    backward = head  # the frozen head still passes the gradient down
    backward += (n - 1 - b) * act  # layers above the block
    backward += (b - a + 1) * (act + 2 * layer * tokens) - 2 * qkv * tokens  # the block, minus layer a's input grads
    return forward + backward


def flop_ceiling(shape: dict[str, int], micro_batch: int, seq_len: int, layers_per_block: int) -> float:
    """The speed-up over full AdamW that block-wise training reaches if both ran at the same FLOP rate: AdamW's
    step FLOPs over the mean, over block positions, of a layer block's (:func:`step_flops`)."""
    tokens = micro_batch * seq_len
    n = shape["layers"]
    blocks = [(a, min(a + layers_per_block, n) - 1) for a in range(0, n, layers_per_block)]
    block_mean = sum(step_flops(shape, tokens, seq_len, blk) for blk in blocks) / len(blocks)
    return step_flops(shape, tokens, seq_len, None) / block_mean


def annotate(records: list[dict[str, Any]], clients: int, topology: str = "ring",
             gossip_chunk_mb: float = 64.0, shape: dict[str, int] | None = None) -> None:
    """Add computed communication figures and the issue's targets to each record, in place.

    Gossip needs neighbours, so a one-process run measures none: ``time_gossip_s`` stays 0 and
    ``bytes_sent_per_step`` is computed for a client of the configured graph (block size × 4 bytes × degree;
    ``adamw`` as D-Adam would gossip the whole model). With ``shape`` (the model's dimensions), block-wise records
    get ``flop_ceiling_vs_adamw`` (:func:`flop_ceiling`).
    """
    degree = ring_degree(clients, topology)
    chunk = int(gossip_chunk_mb * MIB)
    base = next((r for r in records if r.get("method") == "adamw" and r.get("tokens_per_s")), None)
    fused = next((r for r in records if r.get("method") == "adamw_fused" and r.get("tokens_per_s")), None)
    local = {r.get("layers_per_block"): r for r in records
             if r.get("method") == "deca" and r.get("state_policy") == "reset" and r.get("tokens_per_s")}
    for r in records:
        if _is_real(r) and not r.get("failed") and "ratio_real_vs_local" in r:
            # Derived, and labelled so: the single-process deca record's throughput slowed by the real step's
            # measured overhead (real / local, both measured in the same launch).
            d = local.get(r.get("layers_per_block"))
            if d and base:
                r["derived_speedup_vs_adamw"] = d["tokens_per_s"] / base["tokens_per_s"] / r["ratio_real_vs_local"]
            if d and fused:
                r["derived_speedup_vs_adamw_fused"] = (d["tokens_per_s"] / fused["tokens_per_s"]
                                                       / r["ratio_real_vs_local"])
    badam = {r.get("layers_per_block"): r for r in records if r.get("method") == "badam" and r.get("tokens_per_s")}
    for r in records:
        if r.get("not_applicable") or r.get("failed") or r.get("skipped") or _is_real(r):
            continue
        wire = 4  # fp32 on the wire (gossip.dtype default)
        if r["method"] in DECA_METHODS:
            r["bytes_sent_per_step"] = r["largest_block_params"] * wire * degree
            r["gossip_buffer_bytes"] = degree * min(r["largest_block_params"] * wire, chunk)
            r["bytes_sent_note"] = f"computed: largest block x {wire} B x degree {degree} ({topology}, {clients} clients)"
        elif r["method"] in ("adamw", "adamw_fused"):
            r["bytes_sent_per_step"] = r["params"] * wire * degree
            r["gossip_buffer_bytes"] = 0
            r["bytes_sent_note"] = f"computed: whole model x {wire} B x degree {degree}, as D-Adam would gossip"
        else:
            r["bytes_sent_per_step"] = 0
            r["gossip_buffer_bytes"] = 0
            r["bytes_sent_note"] = "single-client method: no communication"
        if r["method"] in DECA_METHODS:
            w = {"fp32": 4, "bf16": 2, "fp16": 2}[r["model_dtype"]]
            per_block = 12 if w == 4 else 14
            if r["method"] == "deca_fused_int8":  # issue 15 goal 4: 4Ψ + 4L, or 2Ψ + 8L keeping the fp32 master
                per_block = 4 if w == 4 else 8
            bound = w * r["params"] + per_block * r["largest_block_params"]
            r["target_model_state_bound_bytes"] = bound
            r["target_model_state_ok"] = r["model_state_bytes"] <= bound
            if shape and r.get("layers_per_block"):
                r["flop_ceiling_vs_adamw"] = flop_ceiling(shape, r["micro_batch"], r["seq_len"], r["layers_per_block"])
            if fused:
                r["speedup_vs_adamw_fused"] = r["tokens_per_s"] / fused["tokens_per_s"]
            if base:
                r["speedup_vs_adamw"] = r["tokens_per_s"] / base["tokens_per_s"]
                if r["blocks"] >= 8:
                    r["target_speedup_1_8x_ok"] = r["speedup_vs_adamw"] >= 1.8
                b = badam.get(r.get("layers_per_block"))
                if b:
                    r["target_at_least_badam_ok"] = r["tokens_per_s"] >= b["tokens_per_s"]
            step = r.get("step_time_s") or 0.0
            if r.get("state_policy") == "offload" and step > 0:
                r["switch_overhead_fraction"] = r["time_block_switch_s"] / step
                r["target_switch_overhead_ok"] = r["switch_overhead_fraction"] <= 0.02
        elif base and r.get("tokens_per_s"):
            r["speedup_vs_adamw"] = r["tokens_per_s"] / base["tokens_per_s"]
            if shape and r.get("layers_per_block"):
                r["flop_ceiling_vs_adamw"] = flop_ceiling(shape, r["micro_batch"], r["seq_len"], r["layers_per_block"])
            if fused:
                r["speedup_vs_adamw_fused"] = r["tokens_per_s"] / fused["tokens_per_s"]


def _label(r: dict[str, Any]) -> str:
    if _is_real(r):
        return f"{REAL_STEP_METHOD} {r.get('clients')} clients"
    if r.get("method") in DECA_METHODS + ("badam",) and r.get("layers_per_block"):
        extra = f" {r['state_policy']}" if r["method"] != "badam" else ""
        return f"{r['method']} B={r.get('blocks') or '?'}{extra}"
    return str(r.get("method"))


def _mb(n: Any) -> str:
    return f"{n / MIB:.1f}" if isinstance(n, (int, float)) else "–"


def _spread(r: dict[str, Any]) -> str:
    if "tokens_per_s_min" not in r:
        return "–"
    return f"{r['tokens_per_s_min']:.0f}–{r['tokens_per_s_max']:.0f}"


def format_table(records: list[dict[str, Any]]) -> str:
    """Markdown table of the records (one row each; not-applicable and skipped rows say why), then the real-step
    record's figures."""
    head = ("| method | params | largest block | model states MiB | peak MiB | tokens/s (median) | spread | × adamw "
            "| × adamw fused | FLOP ceiling | fwd s | bwd s | opt s | switch s | sent/step MiB |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = [head]
    real = []
    for r in records:
        if _is_real(r):
            real.append(r)
            continue
        if r.get("not_applicable") or r.get("failed") or r.get("skipped"):
            why = "not applicable" if r.get("not_applicable") else ("failed" if r.get("failed") else "skipped")
            rows.append(f"| {_label(r)} | {why}: {r.get('reason', '')} |" + " |" * 13)
            continue
        peak = r.get("peak_device_bytes", r.get("peak_rss_bytes"))
        speed, fused, ceil = r.get("speedup_vs_adamw"), r.get("speedup_vs_adamw_fused"), r.get("flop_ceiling_vs_adamw")
        rows.append(
            f"| {_label(r)} | {r['params'] / 1e6:.1f}M | {r['largest_block_params'] / 1e6:.2f}M "
            f"| {_mb(r['model_state_bytes'])} | {_mb(peak)} | {r['tokens_per_s']:.0f} | {_spread(r)} "
            f"| {f'{speed:.2f}' if speed else '–'} | {f'{fused:.2f}' if fused else '–'} "
            f"| {f'{ceil:.2f}' if ceil else '–'} | {r.get('time_forward_s', 0):.3f} "
            f"| {r.get('time_backward_s', 0):.3f} | {r.get('time_optimizer_s', 0):.3f} "
            f"| {r.get('time_block_switch_s', 0):.4f} | {_mb(r.get('bytes_sent_per_step'))} |")
    for r in real:
        rows.append("")
        rows.append(format_real_step(r))
    return "\n".join(rows)


def format_real_step(r: dict[str, Any]) -> str:
    """One paragraph for the ``deca (real step)`` record: seconds per step, median (min–max) over rounds."""
    if r.get("failed"):
        return f"{_label(r)}: failed: {r.get('reason')}"

    def fig(v: str) -> str:
        x = r[v]
        return f"{x['median_s']:.3f} s ({x['min_s']:.3f}–{x['max_s']:.3f})"

    text = (f"{_label(r)}, ring ({r['neighbours']} neighbours), B from {r['layers_per_block']} layer(s) per block, "
            f"{r['reps']} alternated rounds, s/step median (min–max): real launcher step {fig('real')}; deca "
            f"train_step alone {fig('deca_train_step')}; local step without gossip {fig('local')}; "
            f"real / local = {r['ratio_real_vs_local']:.3f} (goal <= 1.05)")
    if "cpu" in r and "cores_busy" in r:  # the work / waiting split (records before it have no CPU figures)
        text += (f"; CPU s/step per client real {r['cpu']['real']['median_s']:.3f}, local "
                 f"{r['cpu']['local']['median_s']:.3f}: CPU real / local = {r['cpu']['ratio_real_vs_local']:.3f}; "
                 f"cores busy real {r['cores_busy']['real']:.2f}, local {r['cores_busy']['local']:.2f}")
    if "derived_speedup_vs_adamw" in r:
        text += (f"; derived × adamw {r['derived_speedup_vs_adamw']:.2f}"
                 + (f", × adamw fused {r['derived_speedup_vs_adamw_fused']:.2f}"
                    if "derived_speedup_vs_adamw_fused" in r else "")
                 + " (single-process deca throughput / real-over-local ratio)")
    return text


def format_compare(records: list[dict[str, Any]]) -> str:
    """Ratios to ``adamw`` (and ``adamw_fused``): tokens/s beside its FLOP ceiling, model-state bytes, peak."""
    base = next((r for r in records if r.get("method") == "adamw" and r.get("tokens_per_s")), None)
    if base is None:
        return "no adamw record to compare with"
    peak_key = "peak_device_bytes" if "peak_device_bytes" in base else "peak_rss_bytes"
    lines = [f"{'method':28s} {'tokens/s':>9s} {'ceiling':>8s} {'/fused':>7s} {'states':>8s} {'peak':>8s}   "
             "(ratio to adamw; ceiling = matmul-FLOP bound)"]
    for r in records:
        if not r.get("tokens_per_s"):
            continue
        ceil = r.get("flop_ceiling_vs_adamw")
        fused = r.get("speedup_vs_adamw_fused")
        lines.append(f"{_label(r):28s} {r['tokens_per_s'] / base['tokens_per_s']:9.2f} "
                     f"{f'{ceil:.2f}' if ceil else '–':>8s} {f'{fused:.2f}' if fused else '–':>7s} "
                     f"{r['model_state_bytes'] / base['model_state_bytes']:8.3f} "
                     f"{(r.get(peak_key) or 0) / max(base.get(peak_key) or 1, 1):8.3f}")
    return "\n".join(lines)


def plot(records: list[dict[str, Any]], path: str) -> None:
    """Bar chart: tokens/s and model-state MiB per method/setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.get("tokens_per_s")]
    labels = [_label(r) for r in ok]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.1 * len(ok) + 4), 4.5))
    axes[0].bar(labels, [r["tokens_per_s"] for r in ok], color="tab:blue")
    axes[0].set_ylabel("tokens/s")
    axes[0].set_title("throughput")
    axes[1].bar(labels, [r["model_state_bytes"] / MIB for r in ok], color="tab:orange")
    axes[1].set_ylabel("MiB")
    axes[1].set_title("model states on the training device")
    for ax in axes:
        ax.tick_params(axis="x", rotation=60)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(records: list[dict[str, Any]], out_dir: str, command: str = "") -> None:
    """Write ``benchmark.json``, ``benchmark.md`` and ``benchmark.png`` into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "benchmark.json"), "w") as f:
        json.dump({"records": records, "command": command}, f, indent=2)
    with open(os.path.join(out_dir, "benchmark.md"), "w") as f:
        f.write(f"Command: `{command}`\n\n" if command else "")
        f.write(format_table(records) + "\n")
    plot(records, os.path.join(out_dir, "benchmark.png"))


def model_shape(args: argparse.Namespace) -> dict[str, int]:
    """The benchmark model's dimensions (``--model``'s config.json, else the default shape with ``--shape``)."""
    if args.model:
        with open(os.path.join(args.model, "config.json")) as f:
            c = json.load(f)
        return {"hidden": c["hidden_size"], "intermediate": c["intermediate_size"], "layers": c["num_hidden_layers"],
                "heads": c["num_attention_heads"], "kv_heads": c.get("num_key_value_heads") or c["num_attention_heads"],
                "vocab": c["vocab_size"]}
    return dict(DEFAULT_SHAPE, **(json.loads(args.shape) if args.shape else {}))


DEEPSPEED_OPS = {"adamw": "FusedAdamBuilder", "zero_offload": "CPUAdamBuilder"}
"""The DeepSpeed kernel each GPU baseline needs (the ``op_builder`` class that builds it)."""


def build_deepspeed_ops(specs: list[dict[str, Any]], timeout: float) -> dict[str, str]:
    """Build, once and untimed, the DeepSpeed kernels the GPU baselines need, before any timed worker starts.

    Without a prebuilt DeepSpeed (``DS_BUILD_OPS=0``, the usual pip install) FusedAdam and DeepSpeedCPUAdam are
    compiled just in time by the first process that needs them (about a minute). Inside a worker that compile would
    count against ``--timeout``, and a worker killed mid-compile leaves torch's extension lock behind, on which every
    later worker waits. Each kernel is built in a process of its own (a compiler crash cannot take the benchmark
    down); the built kernel is cached by torch for the workers.

    Args:
        specs: the benchmark's worker specs; only ``cuda`` specs of :data:`DEEPSPEED_OPS` methods need a kernel.
        timeout: seconds allowed per kernel.

    Returns:
        ``{method: reason}`` for each method whose kernel could not be built (empty when all were).
    """
    failed = {}
    for method, builder in DEEPSPEED_OPS.items():
        if not any(s["method"] == method and s["device"] == "cuda" for s in specs):
            continue
        code = f"from deepspeed.ops.op_builder import {builder}; {builder}().load()"
        t0 = time.perf_counter()
        print(f"[bench] building DeepSpeed's {builder} kernel for {method} (once, untimed) ...", file=sys.stderr,
              flush=True)
        try:
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
            ok, why = proc.returncode == 0, ((proc.stderr or proc.stdout).strip().splitlines() or ["no output"])[-1]
        except subprocess.TimeoutExpired:
            ok, why = False, f"timed out after {timeout:.0f} s"
        print(f"[bench] {builder}: {'built' if ok else 'FAILED: ' + why} in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr, flush=True)
        if not ok:
            failed[method] = f"DeepSpeed's {builder} kernel could not be built: {why}"
    return failed


def main_from_args(args: argparse.Namespace) -> int:
    """Run every spec ``--reps`` times, alternated (one fresh process each), merge the rounds, write the outputs;
    prints the table (and ratios).

    Raises:
        ValueError: a bad argument (:func:`check_arguments`), before any worker starts or anything is written.
    """
    check_arguments(args)
    specs = build_specs(args)
    rounds: dict[tuple, list[dict[str, Any]]] = {spec_key(s): [] for s in specs}
    unbuilt = build_deepspeed_ops(specs, max(args.timeout, 600.0))
    reps = int(args.reps)
    for rep in range(reps):
        k = rep % len(specs)
        for spec in specs[k:] + specs[:k]:  # rotate the order each round
            if spec["method"] == "deca_real" and rep > 0:
                continue  # one launch: it alternates real and local steps inside, --real-reps rounds
            tag = spec["method"] + (f" lpb={spec['layers_per_block']} {spec['state_policy']}"
                                    if spec.get("layers_per_block") else "")
            print(f"[bench] round {rep + 1}/{reps}: {tag} ...", file=sys.stderr, flush=True)
            if spec["method"] in unbuilt:
                rec = _failed(spec, unbuilt[spec["method"]])
            else:
                rec = run_spec(spec, args.timeout)
            if rec.get("failed") or rec.get("skipped"):
                print(f"[bench] {tag}: {rec.get('reason')}", file=sys.stderr, flush=True)
            rounds[spec_key(spec)].append(rec)
            # Partial results survive an interrupted run (a long benchmark on a busy machine).
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "benchmark.partial.json"), "w") as f:
                json.dump({"rounds": list(rounds.values())}, f)
    records = [merge_reps(rounds[spec_key(s)]) for s in specs]
    annotate(records, args.clients, args.topology, args.gossip_chunk_mb, shape=model_shape(args))
    write_outputs(records, args.out, command=" ".join(sys.argv))
    print(format_table(records))
    if args.compare:
        print()
        print(format_compare(records))
    return 1 if any(r.get("failed") for r in records) else 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (``recipes/benchmark.py``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        check_arguments(args)
    except ValueError as e:  # one line, as deca-ds bench prints it
        print(f"benchmark: {e}", file=sys.stderr)
        return 2
    return main_from_args(args)

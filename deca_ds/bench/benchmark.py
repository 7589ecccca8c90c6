"""Benchmark deca_ds against full Adam (and BAdam) on the user's own hardware, in one invocation.

Every method and setting runs in a fresh process (:mod:`deca_ds.bench.worker`) on the same model, micro-batch and
sequence length, one after the other, so that neither peak memory nor throughput is polluted by another method.
Outputs, in ``OUT``: ``benchmark.json`` (``{"records": [...]}``, one record per method/setting), ``benchmark.md``
(a table) and ``benchmark.png`` (a bar chart of tokens/s and model-state bytes). ``--compare`` prints ratios to
``adamw``.

Record fields: ``method``, ``blocks``, ``state_policy``, ``params``, ``largest_block_params``, ``model_dtype``,
``model_state_bytes`` (weights + gradients + master + moments held on the training device, counted from tensors),
``gossip_buffer_bytes``, ``peak_device_bytes`` (GPU) or ``peak_rss_bytes`` (CPU, fresh process, VmHWM after the
model is built and ``clear_refs`` reset it), ``tokens_per_s``, ``time_{forward,backward,optimizer,gossip,
block_switch}_s`` (per measured step), ``bytes_sent_per_step`` (computed, see ``bytes_sent_note``), and the targets
checked (``target_*``).
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the benchmark's options to ``p`` (shared by ``deca-ds bench`` and ``recipes/benchmark.py``)."""
    p.add_argument("--out", default="runs/benchmark", help="output directory (default runs/benchmark)")
    p.add_argument("--methods", default="adamw,zero_offload,deca,badam",
                   help="comma list of adamw, zero_offload, deca, badam")
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
        if method == "adamw":
            specs.append(dict(common, method="adamw"))
        elif method == "zero_offload":
            specs.append(dict(common, method="zero_offload"))
        elif method in ("deca", "badam"):
            policies = [s for s in args.state_policies.split(",") if s] if method == "deca" else ["reset"]
            for lpb in lpbs:
                blocks = -(-n_layers // lpb)
                for policy in policies:
                    specs.append(dict(common, method=method, layers_per_block=lpb, state_policy=policy,
                                      switch_every=max(1, args.steps // blocks)))
        else:
            raise ValueError(f"unknown method {method!r}: use adamw, zero_offload, deca or badam")
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


def annotate(records: list[dict[str, Any]], clients: int, topology: str = "ring",
             gossip_chunk_mb: float = 64.0) -> None:
    """Add computed communication figures and the issue's targets to each record, in place.

    Gossip needs neighbours, so a one-process run measures none: ``time_gossip_s`` stays 0 and
    ``bytes_sent_per_step`` is computed for a client of the configured graph (block size × 4 bytes × degree;
    ``adamw`` as D-Adam would gossip the whole model).
    """
    degree = ring_degree(clients, topology)
    chunk = int(gossip_chunk_mb * MIB)
    base = next((r for r in records if r.get("method") == "adamw" and r.get("tokens_per_s")), None)
    badam = {r.get("layers_per_block"): r for r in records if r.get("method") == "badam" and r.get("tokens_per_s")}
    for r in records:
        if r.get("not_applicable") or r.get("failed") or r.get("skipped"):
            continue
        wire = 4  # fp32 on the wire (gossip.dtype default)
        if r["method"] == "deca":
            r["bytes_sent_per_step"] = r["largest_block_params"] * wire * degree
            r["gossip_buffer_bytes"] = degree * min(r["largest_block_params"] * wire, chunk)
            r["bytes_sent_note"] = f"computed: largest block x {wire} B x degree {degree} ({topology}, {clients} clients)"
        elif r["method"] == "adamw":
            r["bytes_sent_per_step"] = r["params"] * wire * degree
            r["gossip_buffer_bytes"] = 0
            r["bytes_sent_note"] = f"computed: whole model x {wire} B x degree {degree}, as D-Adam would gossip"
        else:
            r["bytes_sent_per_step"] = 0
            r["gossip_buffer_bytes"] = 0
            r["bytes_sent_note"] = "single-client method: no communication"
        if r["method"] == "deca":
            w = {"fp32": 4, "bf16": 2, "fp16": 2}[r["model_dtype"]]
            per_block = 12 if w == 4 else 14
            bound = w * r["params"] + per_block * r["largest_block_params"]
            r["target_model_state_bound_bytes"] = bound
            r["target_model_state_ok"] = r["model_state_bytes"] <= bound
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


def _label(r: dict[str, Any]) -> str:
    if r.get("method") in ("deca", "badam") and r.get("layers_per_block"):
        extra = f" {r['state_policy']}" if r["method"] == "deca" else ""
        return f"{r['method']} B={r.get('blocks') or '?'}{extra}"
    return str(r.get("method"))


def _mb(n: Any) -> str:
    return f"{n / MIB:.1f}" if isinstance(n, (int, float)) else "–"


def format_table(records: list[dict[str, Any]]) -> str:
    """Markdown table of the records (one row each; not-applicable and skipped rows say why)."""
    head = ("| method | params | largest block | model states MiB | peak MiB | tokens/s | × adamw | fwd s | bwd s "
            "| opt s | switch s | sent/step MiB |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = [head]
    for r in records:
        if r.get("not_applicable") or r.get("failed") or r.get("skipped"):
            why = "not applicable" if r.get("not_applicable") else ("failed" if r.get("failed") else "skipped")
            rows.append(f"| {_label(r)} | {why}: {r.get('reason', '')} |" + " |" * 10)
            continue
        peak = r.get("peak_device_bytes", r.get("peak_rss_bytes"))
        speed = r.get("speedup_vs_adamw")
        rows.append(
            f"| {_label(r)} | {r['params'] / 1e6:.1f}M | {r['largest_block_params'] / 1e6:.2f}M "
            f"| {_mb(r['model_state_bytes'])} | {_mb(peak)} | {r['tokens_per_s']:.0f} "
            f"| {f'{speed:.2f}' if speed else '–'} | {r.get('time_forward_s', 0):.3f} "
            f"| {r.get('time_backward_s', 0):.3f} | {r.get('time_optimizer_s', 0):.3f} "
            f"| {r.get('time_block_switch_s', 0):.4f} | {_mb(r.get('bytes_sent_per_step'))} |")
    return "\n".join(rows)


def format_compare(records: list[dict[str, Any]]) -> str:
    """Ratios to ``adamw``: tokens/s, model-state bytes and peak memory."""
    base = next((r for r in records if r.get("method") == "adamw" and r.get("tokens_per_s")), None)
    if base is None:
        return "no adamw record to compare with"
    peak_key = "peak_device_bytes" if "peak_device_bytes" in base else "peak_rss_bytes"
    lines = [f"{'method':24s} {'tokens/s':>9s} {'states':>8s} {'peak':>8s}   (ratio to adamw)"]
    for r in records:
        if not r.get("tokens_per_s"):
            continue
        lines.append(f"{_label(r):24s} {r['tokens_per_s'] / base['tokens_per_s']:9.2f} "
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


def main_from_args(args: argparse.Namespace) -> int:
    """Run every spec, one fresh process each, then write the outputs; prints the table (and ratios)."""
    specs = build_specs(args)
    records = []
    for spec in specs:
        tag = spec["method"] + (f" lpb={spec['layers_per_block']} {spec['state_policy']}"
                                if spec.get("layers_per_block") else "")
        print(f"[bench] {tag} ...", file=sys.stderr, flush=True)
        rec = run_spec(spec, args.timeout)
        if rec.get("failed") or rec.get("skipped"):
            print(f"[bench] {tag}: {rec.get('reason')}", file=sys.stderr, flush=True)
        records.append(rec)
        # Partial results survive an interrupted run (a long benchmark on a busy machine).
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "benchmark.partial.json"), "w") as f:
            json.dump({"records": records}, f)
    annotate(records, args.clients, args.topology, args.gossip_chunk_mb)
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
    return main_from_args(p.parse_args(argv))

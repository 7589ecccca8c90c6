"""One benchmark measurement in a fresh process: ``python -m deca_ds.bench.worker --spec JSON --out FILE``.

Peak memory is only comparable between methods when each starts from a clean process (allocator caches, imports
and earlier runs dominate otherwise; docs/design.md §3), so :mod:`deca_ds.bench.benchmark` starts this
module once per method and setting. It builds the model, runs warm-up then measured steps with every phase timed,
counts model-state bytes from the tensors actually held, and writes one JSON record.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Iterable

import torch

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------------------------
# Memory accounting.


def tensor_bytes(tensors: Iterable[torch.Tensor], device_type: str | None = None) -> int:
    """Bytes of distinct storages among ``tensors`` (views and aliases counted once).

    Args:
        tensors: Any tensors (``None`` entries are skipped).
        device_type: Count only tensors on this device type (``cpu``, ``cuda``); ``None`` counts all.

    Returns:
        Sum of ``untyped_storage().nbytes()`` over distinct storages.
    """
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        if device_type is not None and t.device.type != device_type:
            continue
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _state_tensors(state: Any) -> list[torch.Tensor]:
    """Every tensor inside a (nested) optimizer state; step counters included (they are state too)."""
    out: list[torch.Tensor] = []
    stack = [state]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            out.append(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return out


def rss_reset() -> int:
    """Reset the process's peak RSS (VmHWM) to the current RSS; returns the current RSS in bytes (0 if unknown)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _proc_status("VmRSS")


def rss_peak() -> int:
    """Peak RSS (VmHWM) of this process in bytes since the last :func:`rss_reset` (0 where /proc is missing)."""
    return _proc_status("VmHWM")


def _proc_status(key: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Model and data.


def build_model(spec: dict[str, Any]) -> torch.nn.Module:
    """The benchmark model: ``spec["model"]`` (a HF config directory, random init) or a Llama from ``spec["shape"]``.

    Args:
        spec: Worker spec with ``seed``, ``dtype`` and either ``model`` or ``shape`` (hidden, intermediate, layers,
            heads, kv_heads, vocab).

    Returns:
        The model in ``spec["dtype"]``, in train mode, on the benchmark device.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(spec["seed"])
    if spec.get("model"):
        config = AutoConfig.from_pretrained(spec["model"])
    else:
        s = spec["shape"]
        config = LlamaConfig(hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                             num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                             num_key_value_heads=s["kv_heads"], vocab_size=s["vocab"],
                             max_position_embeddings=max(spec["seq_len"], 128), tie_word_embeddings=False)
    config.use_cache = False
    device = torch.device(spec["device"])
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=_DTYPES[spec["dtype"]])
    if spec.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def make_batches(spec: dict[str, Any], vocab: int, n: int) -> list[torch.Tensor]:
    """``n`` random token batches ``[micro_batch, seq_len]`` (the content does not change the cost)."""
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    return [torch.randint(0, vocab, (spec["micro_batch"], spec["seq_len"]), generator=g).to(spec["device"])
            for _ in range(n)]


# ---------------------------------------------------------------------------------------------------------------
# Methods. Each returns an object with optimizer_step(), switch() -> bool, zero_grad(), states() and extras.


class _Plain:
    """Forward and backward of a plain ``nn.Module`` (every method but the DeepSpeed engines)."""

    model: torch.nn.Module

    def forward(self, x):
        return self.model(input_ids=x, labels=x).loss

    def backward(self, loss):
        loss.backward()


class _TorchAdamW(_Plain):
    """Full-parameter torch AdamW: what users run on CPU; ``fused=True`` is torch's fused kernel (``adamw_fused``),
    else torch's default implementation for the device (the for-loop on CPU)."""

    def __init__(self, model, spec, fused: bool = False):
        self.model = model
        self.opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=0.0,
                                     **({"fused": True} if fused else {}))
        self.largest_block_params = sum(p.numel() for p in model.parameters())
        self.blocks = 1

    def optimizer_step(self):
        self.opt.step()

    def switch(self):
        return False

    def zero_grad(self):
        self.opt.zero_grad(set_to_none=True)

    def states(self) -> dict[str, list[torch.Tensor]]:
        return {"optimizer": _state_tensors(self.opt.state)}


class _BAdam(_Plain):
    """The released BAdam (PyPI ``badam``): BlockOptimizer over torch AdamW, same blocks as deca."""

    def __init__(self, model, spec):
        self.model = model
        try:
            from badam import BlockOptimizer
        except ImportError as e:  # recorded as skipped by the caller
            raise _Skip(f"badam is not installed ({e}); pip install 'deca_ds[bench]' or badam==1.4") from None
        lpb = spec["layers_per_block"]
        n_layers = model.config.num_hidden_layers
        prefixes = [[f"model.layers.{j}." for j in range(i, min(i + lpb, n_layers))]
                    for i in range(0, n_layers, lpb)]
        self.blocks = len(prefixes)
        named = dict(model.named_parameters())
        self.largest_block_params = max(sum(p.numel() for n, p in named.items() if any(n.startswith(x) for x in b))
                                        for b in prefixes)
        base = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=0.0)
        self.opt = BlockOptimizer(base_optimizer=base, named_parameters_list=list(model.named_parameters()),
                                  block_prefix_list=prefixes, switch_block_every=spec["switch_every"],
                                  switch_mode="ascending", verbose=0)

    def optimizer_step(self):
        self.opt.step()  # BAdam switches inside step(); its switch time is part of the optimizer time

    def switch(self):
        return False

    def zero_grad(self):
        self.opt.zero_grad(set_to_none=True)

    def states(self):
        hp = list(getattr(self.opt, "param_idx2hp", {}).values())
        return {"master": hp, "hp_grads": [p.grad for p in hp],
                "optimizer": _state_tensors(self.opt.base_optimizer.state)}


class _DecaBlockAdam(_Plain):
    """deca_ds's BlockAdam, one client (gossip needs neighbours: its time is 0 here and its bytes are computed)."""

    def __init__(self, model, spec):
        import deca_ds
        from deca_ds.blocks import partition_blocks

        self.model = model
        part = partition_blocks(model, layers_per_block=spec["layers_per_block"])
        self.blocks = len(part.blocks)
        self.largest_block_params = max(part.block_sizes(model))
        # auto_switch off: the switch is timed on its own, where the engine's gossip hook would also run.
        self.opt = deca_ds.BlockAdam(model, part, lr=spec["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                     switch_every=spec["switch_every"], order="ascending",
                                     state_policy=spec["state_policy"], offload_dtype=spec.get("offload_dtype", "fp32"),
                                     auto_switch=False, fused_backward=spec["method"] in FUSED_METHODS,
                                     moment_dtype="int8" if spec["method"] == "deca_fused_int8" else "fp32")
        self.memory_report = deca_ds.memory_report

    def optimizer_step(self):
        self.opt.step()

    def switch(self):
        return self.opt.switch_if_due()

    def zero_grad(self):
        self.opt.zero_grad(set_to_none=True)

    def states(self):
        return {"optimizer": _state_tensors(self.opt.state)}


class _DeepSpeedAdam:
    """Full-parameter Adam as users run it on a GPU: a DeepSpeed engine with bf16 and FusedAdam (``adamw``), or
    ZeRO-2 with the optimizer offloaded to DeepSpeedCPUAdam (``zero_offload``). One rank, no launcher needed."""

    def __init__(self, model, spec, offload: bool):
        if spec["device"] != "cuda":
            raise _Skip("the DeepSpeed full-Adam baselines run on a GPU; on CPU adamw is torch AdamW")
        from deca_ds.engine.full_adam import build_full_adam_engine

        self.engine, self.opt = build_full_adam_engine(model, spec["micro_batch"], spec["lr"], offload)
        self.model = model
        self.blocks = 1
        self.largest_block_params = sum(p.numel() for p in model.parameters())
        self.optimizer_impl = type(getattr(self.opt, "optimizer", self.opt)).__name__

    def forward(self, x):
        return self.engine(input_ids=x, labels=x).loss

    def backward(self, loss):
        self.engine.backward(loss)

    def optimizer_step(self):
        self.engine.step()

    def switch(self):
        return False

    def zero_grad(self):
        pass  # the engine clears gradients in step()

    def states(self):
        # DeepSpeed's flat fp32 partitions are not reachable as optimizer.state tensors in a stable way; on a GPU
        # the model states are read from the allocator after the step instead (see _count_states).
        return {}


class _Skip(Exception):
    """The method cannot run here; the record says why."""


def _adamw(model, spec):
    return _DeepSpeedAdam(model, spec, offload=False) if spec["device"] == "cuda" else _TorchAdamW(model, spec)


METHODS = {
    "adamw": _adamw,
    "adamw_fused": lambda model, spec: _TorchAdamW(model, spec, fused=True),
    "zero_offload": lambda model, spec: _DeepSpeedAdam(model, spec, offload=True),
    "badam": _BAdam,
    "deca": _DecaBlockAdam,
    "deca_fused": _DecaBlockAdam,  # BlockAdam(fused_backward=True): each parameter stepped inside backward
    "deca_fused_int8": _DecaBlockAdam,  # ... and the active block's moments in 8 bits (moment_dtype="int8")
}
FUSED_METHODS = ("deca_fused", "deca_fused_int8")


# ---------------------------------------------------------------------------------------------------------------
# The measurement.


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Build, warm up, run the measured steps and return the record (see :mod:`deca_ds.bench.benchmark`)."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    record: dict[str, Any] = {k: spec.get(k) for k in ("method", "state_policy", "layers_per_block",
                                                         "micro_batch", "seq_len", "switch_every")}
    record.update(model_dtype=spec["dtype"], device=device.type, warmup_steps=spec["warmup"],
                  measured_steps=spec["steps"], threads=torch.get_num_threads())
    model = build_model(spec)
    params = list({id(p): p for p in model.parameters()}.values())
    record["params"] = sum(p.numel() for p in params)
    try:
        method = METHODS[spec["method"]](model, spec)
    except _Skip as e:
        record.update(skipped=True, reason=str(e))
        return record
    record["blocks"] = method.blocks
    record["largest_block_params"] = method.largest_block_params
    batches = make_batches(spec, model.config.vocab_size, spec["warmup"] + spec["steps"])

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    baseline_rss = rss_reset()
    times = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0, "gossip": 0.0, "block_switch": 0.0}
    state_bytes: dict[str, int] = {}
    losses = []
    switches = 0
    for i, x in enumerate(batches):
        measured = i >= spec["warmup"]
        _sync(device)
        t0 = time.perf_counter()
        loss = method.forward(x)
        _sync(device)
        t1 = time.perf_counter()
        method.backward(loss)
        _sync(device)
        t2 = time.perf_counter()
        last = i == len(batches) - 1
        if last:
            # Gradients are counted right after backward (BlockAdam frees them inside step()), optimizer state
            # right after the step: together the model states held at the step's peak.
            grad_bytes = tensor_bytes([p.grad for p in params], device.type)
            if spec["method"] in FUSED_METHODS:
                # Each gradient is freed by its own hook right after it is accumulated, before the next one exists:
                # at most one is alive, so the largest active tensor's gradient bounds them (none is left now).
                assert grad_bytes == 0, "fused_backward left gradients behind"
                grad_bytes = max(p.numel() * p.element_size() for p in method.opt.active_params())
        method.optimizer_step()
        _sync(device)
        t3 = time.perf_counter()
        if last:
            state_bytes = _count_states(params, method, device, grad_bytes)
            if spec["method"] == "deca_fused_int8":
                # Not a model state but reported: the step dequantizes one tensor's m and v to fp32 at a time (a
                # chunk no larger than the block's largest tensor), a temporary buffer like the fp32 step's own
                # denominators, which no record counts.
                state_bytes["moment_scratch_bytes"] = 8 * max(p.numel() for p in method.opt.active_params())
        switched = method.switch()
        _sync(device)
        t4 = time.perf_counter()
        method.zero_grad()
        losses.append(float(loss.detach()))
        if measured:
            times["forward"] += t1 - t0
            times["backward"] += t2 - t1
            times["optimizer"] += t3 - t2
            times["block_switch"] += t4 - t3
            switches += int(bool(switched))
    total = sum(times.values())
    record.update(state_bytes)
    record.update({f"time_{k}_s": v / spec["steps"] for k, v in times.items()})
    record["switches"] = switches
    record["step_time_s"] = total / spec["steps"]
    record["tokens_per_s"] = spec["steps"] * spec["micro_batch"] * spec["seq_len"] / total
    if device.type == "cuda":
        record["peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
    else:
        record["peak_rss_bytes"] = rss_peak()
        record["baseline_rss_bytes"] = baseline_rss
        record["peak_rss_delta_bytes"] = record["peak_rss_bytes"] - baseline_rss
    record["final_loss"] = losses[-1]
    record["finite"] = all(math.isfinite(v) for v in losses)
    return record


def _count_states(params, method, device, grad_bytes: int) -> dict[str, int]:
    """Model-state bytes by category, counted from tensors held on the training device.

    Scalar step counters are bookkeeping, not model states, and are left out (as in ``deca_ds.memory_report``).
    Offloaded block state (``memory_report``'s ``offloaded``) is reported apart: on a GPU it lives in host memory;
    on a CPU run it shares the device's memory but is not part of the per-device budget the planner sizes.
    """
    dev = device.type
    counted = {p.untyped_storage().data_ptr() for p in params}
    opt_tensors = [t for ts in method.states().values() for t in ts
                   if t is not None and t.dim() > 0 and t.untyped_storage().data_ptr() not in counted]
    out = {"weight_bytes": tensor_bytes(params, dev), "grad_bytes": grad_bytes,
           "optimizer_state_bytes": tensor_bytes(opt_tensors, dev), "offloaded_state_bytes": 0}
    if hasattr(method, "memory_report"):
        out["offloaded_state_bytes"] = int(method.memory_report(method.opt)["offloaded"])
    out["model_state_bytes"] = out["weight_bytes"] + out["grad_bytes"] + out["optimizer_state_bytes"]
    if isinstance(method, _DeepSpeedAdam):
        # Activations are freed after step(): what the allocator holds now is the engine's model states
        # (bf16 weights, fp32 master and moments, gradient buffers). Labelled in "model_state_source".
        out["model_state_bytes"] = torch.cuda.memory_allocated(device)
        out["model_state_source"] = "torch.cuda.memory_allocated after step"
        out["optimizer_impl"] = method.optimizer_impl
    return out


def main(argv: list[str] | None = None) -> int:
    """Run one spec and write its record to ``--out`` (JSON)."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--spec", required=True, help="JSON object (see deca_ds.bench.benchmark.build_specs)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    spec = json.loads(args.spec)
    record = measure(spec)
    with open(args.out, "w") as f:
        json.dump(record, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())

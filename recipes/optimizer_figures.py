"""Print the README figures of BlockAdam: optimizer-held bytes vs B, and step time vs torch.optim.AdamW.

    OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu python recipes/optimizer_figures.py [--steps 20]

Model: an 8-layer tiny Llama (hidden 256, ~10M parameters, fp32, CPU), batch 4 x 64 tokens; BlockAdam trains the 8
decoder layers (embeddings and head frozen), so the fair reference is AdamW on the same layers. Optimizer state
(master + moments + offloaded) is counted from the tensors (``deca_ds.optim.memory_report``) right after each step,
maximum over the run (every block is visited); times are the median of ``--steps`` full steps (forward, backward,
optimizer step, block switch; the byte counting excluded) after 3 warm-up steps.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers as T

from deca_ds.blocks import partition_blocks
from deca_ds.optim import BlockAdam, memory_report


def build(seed: int = 0):
    torch.manual_seed(seed)
    cfg = T.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=4,
                        num_key_value_heads=4, vocab_size=8192, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    return T.AutoModelForCausalLM.from_config(cfg)


def timed_steps(model, opt, steps: int, warmup: int = 3) -> tuple[float, dict]:
    """Median seconds per full step, and the peak optimizer-held bytes seen after a step."""
    g = torch.Generator().manual_seed(0)
    times, peak = [], {"held": 0, "gradients": 0}
    for i in range(warmup + steps):
        ids = torch.randint(0, 8192, (4, 64), generator=g)
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        t_backward = time.perf_counter() - t0
        grads = memory_report(opt, model)["gradients"]  # not timed; before the step frees them
        t0 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t_step = time.perf_counter() - t0
        r = memory_report(opt, model)  # not timed; before a switch drops (reset) or parks (offload) the state
        t0 = time.perf_counter()
        if isinstance(opt, BlockAdam):
            opt.switch_if_due()
        if i >= warmup:
            times.append(t_backward + t_step + time.perf_counter() - t0)
        peak["held"] = max(peak["held"], r["master"] + r["moments"] + r["offloaded"])
        peak["gradients"] = max(peak["gradients"], grads)
    return statistics.median(times), peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    mib = 2**20
    rows = []
    model = build()
    n_all = sum(p.numel() for p in model.parameters())
    n_layers = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n)
    t, peak = timed_steps(model, torch.optim.AdamW(model.parameters(), lr=1e-4), args.steps)
    rows.append(("torch AdamW, all params", n_all, peak, t))
    model = build()
    layer_params = [p for n, p in model.named_parameters() if ".layers." in n]
    for p in model.parameters():
        p.requires_grad_(p in set(layer_params))
    t, peak = timed_steps(model, torch.optim.AdamW(layer_params, lr=1e-4), args.steps)
    rows.append(("torch AdamW, 8 layers only", n_layers, peak, t))
    for num_blocks in (1, 2, 4, 8):
        model = build()
        part = partition_blocks(model, layers_per_block=8 // num_blocks)
        # switch every step so one round (and the peak over blocks) fits in the timed steps
        opt = BlockAdam(model, part, lr=1e-4, switch_every=1, auto_switch=False)
        t, peak = timed_steps(model, opt, args.steps)
        rows.append((f"BlockAdam B={num_blocks} (reset)", n_layers, peak, t))
    model = build()
    opt = BlockAdam(model, partition_blocks(model), lr=1e-4, switch_every=1, state_policy="offload",
                    offload_dtype="int8", auto_switch=False)
    t, peak = timed_steps(model, opt, args.steps)
    rows.append(("BlockAdam B=8 offload int8", n_layers, peak, t))

    ref = rows[1][2]["held"]
    print(f"tiny Llama: {n_all / 1e6:.2f}M params ({n_layers / 1e6:.2f}M in 8 layers), fp32, CPU "
          f"{torch.get_num_threads()} thread(s), batch 4x64, median of {args.steps} steps")
    print("| optimizer | trained params | optimizer state MiB (peak) | vs AdamW (layers) | gradients MiB (peak) "
          "| step ms (median) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, n, peak, t in rows:
        print(f"| {name} | {n / 1e6:.2f}M | {peak['held'] / mib:.2f} | {peak['held'] / ref:.3f} | "
              f"{peak['gradients'] / mib:.2f} | {t * 1e3:.1f} |")


if __name__ == "__main__":
    main()

"""A probe, not product code: how much faster could the stacked simulator's forward/backward be without vmap?

    OMP_NUM_THREADS=2 python docs/results/stacked_forward_probe.py [--threads 2] [--compile]

Builds the stacked simulator on the embedded model (8 clients, DECA qgm_grad, ER, 2 layers per block), takes the
first micro-batch of every client, and times one forward + backward of all clients with every trained parameter
requiring a gradient, alternated between: the simulator's own path (``torch.func.vmap`` over
``functional_call`` of the Hugging Face Llama), and the same Llama written by hand over the stacked parameters
(``bmm`` per linear layer, clients x rows as the attention batch), once with SDPA attention and once with the eager
softmax the vmapped path uses (its logits equal the vmapped ones bit for bit on this model); with ``--compile`` also
the hand-written eager version under ``torch.compile`` (static shapes: one width, one graph). Prints the median
seconds of each over ``--rounds`` alternations. docs/results.md ("Simulator speed") records what it printed.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

parser = argparse.ArgumentParser()
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--rounds", type=int, default=5)
parser.add_argument("--reps", type=int, default=10)
parser.add_argument("--compile", action="store_true")
args = parser.parse_args()
torch.set_num_threads(args.threads)

from deca_ds.config import load_config  # noqa: E402
from deca_ds.stacked import StackedSimulation, stacked_losses  # noqa: E402

cfg = load_config(None, ["num_clients=8", "topology.name=erdos_renyi", "method=deca", "deca.signal=qgm_grad",
                         "blocks.layers_per_block=2", "blocks.switch_every=1", "output_dir=/tmp/deca_ds_probe"])
sim = StackedSimulation(cfg)
ids, labels, _ = sim._stack_micro_batch([sim._batches(c, 0)[0] for c in range(sim.num_clients)])
P = {k: v.clone().requires_grad_(True) for k, v in sim.params.items()}
c = sim.template.config
H, nh, nkv, hd, eps = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rms_norm_eps
theta = c.rope_parameters["rope_theta"]


def rms(x, w):  # LlamaRMSNorm's operations, in its order
    xf = x.float()
    return w[:, None, :] * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def lin(x, w):  # x (N, T, in), w (N, out, in): every client its own weight
    return torch.bmm(x, w.transpose(1, 2))


def rot(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), -1)


def forward(P, ids, sdpa):
    N, B, W = ids.shape
    x = P["model.embed_tokens.weight"][torch.arange(N)[:, None, None], ids].reshape(N, B * W, H)
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    fr = torch.arange(W).float()[:, None] * inv[None, :]
    cos, sin = torch.cat((fr, fr), -1).cos(), torch.cat((fr, fr), -1).sin()
    causal = torch.full((W, W), float("-inf")).triu(1)
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        h = rms(x, P[p + "input_layernorm.weight"])
        q = lin(h, P[p + "self_attn.q_proj.weight"]).view(N * B, W, nh, hd).transpose(1, 2)
        k = lin(h, P[p + "self_attn.k_proj.weight"]).view(N * B, W, nkv, hd).transpose(1, 2)
        v = lin(h, P[p + "self_attn.v_proj.weight"]).view(N * B, W, nkv, hd).transpose(1, 2)
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        if sdpa:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
            a = torch.matmul(torch.softmax(torch.matmul(q, k.transpose(2, 3)) * hd ** -0.5 + causal, -1), v)
        x = x + lin(a.transpose(1, 2).reshape(N, B * W, nh * hd), P[p + "self_attn.o_proj.weight"])
        h = rms(x, P[p + "post_attention_layernorm.weight"])
        x = x + lin(F.silu(lin(h, P[p + "mlp.gate_proj.weight"])) * lin(h, P[p + "mlp.up_proj.weight"]),
                    P[p + "mlp.down_proj.weight"])
    return lin(rms(x, P["model.norm.weight"]), P["lm_head.weight"]).view(N, B, W, -1)


with torch.no_grad():
    ref = sim._forward(sim.params, ids)
    for sdpa in (False, True):
        d = (forward(sim.params, ids, sdpa) - ref).abs().max().item()
        print(f"hand-written {'sdpa' if sdpa else 'eager'}: max |logits - vmapped logits| = {d:.3g}")


def timed(loss_of):
    def run():
        loss_of().sum().backward()
        for v in P.values():
            v.grad = None
    return run


paths = {"vmap (simulator)": timed(lambda: stacked_losses(sim._forward(P, ids), labels)),
         "hand eager": timed(lambda: stacked_losses(forward(P, ids, False), labels)),
         "hand sdpa": timed(lambda: stacked_losses(forward(P, ids, True), labels))}
if args.compile:
    compiled = torch.compile(lambda P, ids: forward(P, ids, False), dynamic=False)
    t0 = time.perf_counter()
    stacked_losses(compiled(P, ids), labels).sum().backward()
    print(f"compile (first forward + backward): {time.perf_counter() - t0:.1f} s")
    paths["hand eager, compiled"] = timed(lambda: stacked_losses(compiled(P, ids), labels))
times = {k: [] for k in paths}
for run in paths.values():
    run()
for _ in range(args.rounds):
    for name, run in paths.items():
        t0 = time.perf_counter()
        for _ in range(args.reps):
            run()
        times[name].append((time.perf_counter() - t0) / args.reps)
base = statistics.median(times["vmap (simulator)"])
print(f"8 clients, ids {tuple(ids.shape)}, {args.threads} thread(s), forward + backward (all parameters), median of "
      f"{args.rounds} alternations of {args.reps}:")
for name, ts in times.items():
    m = statistics.median(ts)
    print(f"  {name:22s} {m:.4f} s (range {min(ts):.4f}-{max(ts):.4f})  {base / m:.2f}x the vmapped path")

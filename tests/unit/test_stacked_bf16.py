"""The stacked simulator with bf16 weights (`model.dtype=bf16`, the setting of every GPU recipe).

Its AdamW step received the bf16 gradients as they came out of backward and folded them into fp32 moments, which
torch refuses (`lerp_`: "expected dtype float for `end`"): a bf16 stacked run stopped at its first step. BlockAdam,
the per-client reference, steps a low-precision gradient in fp32 against its fp32 master; the stacked step now
does the same.
"""

import json

import torch

from deca_ds.config import load_config
from deca_ds.simulate import run_simulation


def test_stacked_bf16_run_trains_and_keeps_bf16_weights(tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "bf16"
    run_simulation(load_config(None, [f"output_dir={out}", "backend=simulate", "num_clients=2", "model.dtype=bf16",
                                      "method=local",
                                      "simulate.stacked=true", "max_steps=4", "blocks.switch_every=2",
                                      "blocks.include_embeddings=false", "data.num_examples=200",
                                      "data.eval_examples=4", "data.min_partition_size=4",
                                      "model.save_client_models=true"]), quiet=True)
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted((r["step"], r["client"]) for r in recs) == [(s, c) for s in range(4) for c in range(2)]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    weights = load_file(str(out / "clients" / "client_0" / "model.safetensors"))
    assert all(w.dtype == torch.bfloat16 for w in weights.values())
    # the two clients trained on their own data (method=local: with 2 clients any gossip would average them
    # exactly): their first trained block (layer 0) differs
    other = load_file(str(out / "clients" / "client_1" / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(weights[name], other[name])

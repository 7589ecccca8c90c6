"""Engine pieces that need no process group: ds_config checks, and gradient checkpointing with frozen blocks."""

import pytest
import torch

from deca_ds.config import ConfigError, load_config
from deca_ds.ds_config import check_ds_config, load_ds_config
from deca_ds.models import load_model_and_tokenizer


def test_ds_config_checks_name_the_fix(tmp_path):
    cfg = load_config()
    check_ds_config(load_ds_config(None), cfg)
    for ds, words in [
        ({"bf16": {"enabled": True}}, "model.dtype=bf16"),
        ({"fp16": {"enabled": True}}, "model.dtype=fp16"),
        ({"zero_optimization": {"stage": 4}}, "stage=4"),
        ({"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}}, "fp16 with ZeRO"),
        ({"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}, "model.dtype=fp32"),
        ({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}, "offload_param"),
        ({"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}}, "offload_optimizer needs ZeRO"),
        ({"optimizer": {"type": "Adam"}}, "optim.lr"),
    ]:
        with pytest.raises(ConfigError, match=words):
            check_ds_config(ds, cfg)
    bad = tmp_path / "bad.json"
    bad.write_text("{ nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_ds_config(bad)
    for stage in (1, 2, 3):  # ZeRO inside a client is accepted (ZeroBlockEngine)
        check_ds_config({"zero_optimization": {"stage": stage}}, cfg)
    filled = load_ds_config(None)
    assert filled["train_micro_batch_size_per_gpu"] > 0 and filled["gradient_accumulation_steps"] == 1


def test_gradient_checkpointing_trains_a_middle_block_with_frozen_embeddings():
    """Non-reentrant checkpointing: with everything below the active block frozen, backward still reaches it
    (reentrant checkpointing silently skips it: BAdam issue #2)."""
    from deca_ds.blocks import partition_blocks
    from deca_ds.data import make_byte_tokenizer
    from deca_ds.optim import BlockAdam

    cfg = load_config(None, ["model.gradient_checkpointing=true"])
    model, _ = load_model_and_tokenizer(cfg.model, seed=0)
    ref, _ = load_model_and_tokenizer(load_config().model, seed=0)
    assert model.is_gradient_checkpointing
    part = partition_blocks(model, include_embeddings=True, include_lm_head=True)
    layer2 = next(b.index for b in part.blocks if b.name == "layers.2")
    tok = make_byte_tokenizer()
    ids = torch.tensor([list(b"hello world, block two")])
    grads = {}
    for m in (model, ref):
        opt = BlockAdam(m, partition_blocks(m, include_embeddings=True, include_lm_head=True), lr=1e-2,
                        order="fixed", fixed_order=[layer2], switch_every=10)
        m.train()
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        grads[id(m)] = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        opt.step()
    g_ckpt, g_ref = grads[id(model)], grads[id(ref)]
    assert g_ckpt and set(g_ckpt) == set(g_ref)
    assert all(n.startswith("model.layers.2.") for n in g_ckpt)
    for n in g_ref:
        assert torch.allclose(g_ckpt[n], g_ref[n], atol=1e-6), n
    assert tok.pad_token_id is not None

"""Engine pieces that need no process group: gradient checkpointing with frozen blocks (ds_config: test_ds_config)."""

import torch

from deca_ds.config import load_config
from deca_ds.models import load_model_and_tokenizer


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

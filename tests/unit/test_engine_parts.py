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


class _FakeZeroEngine:
    """The part of ZeroBlockEngine a ZeroBlockView touches, with DeepSpeed's state as plain tensors and every read
    counted (at ZeRO stages 1/2 a read of optimizer state is a collective gathering the full tensor)."""

    def __init__(self):
        from types import SimpleNamespace

        self.params = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3, 2))]
        self.state = {id(p): {"exp_avg": torch.randn_like(p), "exp_avg_sq": torch.rand_like(p)} for p in self.params}
        self.reads: list[str] = []
        self.global_step = 7
        self.optimizer = SimpleNamespace(param_groups=[{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}])

    def active_params(self):
        return self.params

    def _flat_step(self):
        return self.global_step

    def _read(self, p, key=None):
        self.reads.append(key)
        return self.state[id(p)][key].clone()

    def _write(self, p, value, key=None):
        self.state[id(p)][key] = value.clone()


def test_zero_view_reads_exp_avg_sq_once_per_step_and_folds_into_the_current_v():
    """adam_denominators' read of v is reused by the same step's fold (one collective, not two), and a v read
    before an optimizer step is never folded into: the fold then reads v again. Reference: fold_moments_ on
    copies of the engine's state (m ← β1·m + (1−β1)·h, v ← β2·v + (1−β2)·h²)."""
    from deca_ds.blocks import Block, BlockSchedule
    from deca_ds.consensus import fold_moments_
    from deca_ds.engine.zero import ZeroBlockView

    e = _FakeZeroEngine()
    view = ZeroBlockView(e, [Block(index=0, name="b0", param_names=("a", "b"))], BlockSchedule(1, 4), "reset", "fp32")
    betas = (0.9, 0.99)
    h = [torch.randn_like(p) for p in e.params]

    def expected():
        out = []
        for p, s in zip(e.params, h):
            m, v = e.state[id(p)]["exp_avg"].clone(), e.state[id(p)]["exp_avg_sq"].clone()
            fold_moments_(m, v, s, betas)
            out.append((m, v))
        return out

    denoms = view.adam_denominators()
    bc2 = (1 - 0.999 ** 7) ** 0.5
    for d, p in zip(denoms, e.params):
        torch.testing.assert_close(d, e.state[id(p)]["exp_avg_sq"].sqrt() / bc2 + 1e-8, rtol=0, atol=0)
    want = expected()
    e.reads.clear()
    view.apply_consensus_(h, betas)
    assert e.reads == ["exp_avg", "exp_avg"]  # v came from adam_denominators' read
    for p, (m, v) in zip(e.params, want):
        assert torch.equal(e.state[id(p)]["exp_avg"], m) and torch.equal(e.state[id(p)]["exp_avg_sq"], v)

    # A read followed by an optimizer step (v changes) must not be folded into: v is read again.
    view.adam_denominators()
    e.global_step += 1
    for p in e.params:
        e.state[id(p)]["exp_avg_sq"] = torch.rand_like(p)
    want = expected()
    e.reads.clear()
    view.apply_consensus_(h, betas)
    assert e.reads == ["exp_avg", "exp_avg_sq", "exp_avg", "exp_avg_sq"]
    for p, (m, v) in zip(e.params, want):
        assert torch.equal(e.state[id(p)]["exp_avg_sq"], v)
    # ... and a second fold at the same step reads v again too (the cached read was consumed).
    e.reads.clear()
    view.apply_consensus_(h, betas)
    assert e.reads.count("exp_avg_sq") == 2

"""BlockAdam's per-parameter weight decay (``no_decay``) against torch.optim.AdamW with two parameter groups.

The reference is what ``transformers.Trainer.create_optimizer`` builds: torch's AdamW with the decayed parameters in
a group with ``weight_decay=wd`` and the others (here the RMSNorm weights, the parameters HF's rule leaves out of a
Llama without biases) in a group with ``weight_decay=0``. BlockAdam does torch's single-tensor AdamW arithmetic,
operation for operation, and on the CPU a ``_foreach`` op is the single-tensor op per list entry, so fp32 weights
are compared with ``torch.equal``: any tolerance would hide the very difference tested.
"""

import copy

import pytest
import torch

from deca_ds.blocks import partition_blocks
from deca_ds.optim import BlockAdam, adamw_foreach_step_, adamw_step_
from tiny import batches, reload_through_checkpoint, tiny_llama

WD = 0.5  # lr * WD = 5e-3 of a weight per step: far above rounding, so a wrongly decayed norm weight shows at once
HP = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8)


def loss_of(model, ids):
    return model(input_ids=ids, labels=ids).loss


def no_decay_names(model):
    """The parameters HF's rule does not decay in a Llama without biases: the norm weights."""
    return [n for n, _ in model.named_parameters() if "norm" in n]


def two_group_adamw(model, names):
    """torch AdamW with the Trainer's two groups over ``names`` (decayed first, as Trainer.create_optimizer)."""
    named = dict(model.named_parameters())
    skip = set(no_decay_names(model))
    groups = [{"params": [named[n] for n in names if n not in skip], "weight_decay": WD},
              {"params": [named[n] for n in names if n in skip], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, foreach=False, **HP)


@pytest.mark.parametrize("fused_backward", [False, True], ids=["step", "fused_backward"])
def test_no_decay_equals_torch_adamw_with_two_groups_across_blocks(fused_backward):
    """One round over four blocks (each visited once, so its fresh moments are torch's first-step moments), with a
    decayed parameter missing its gradient in one step (torch skips it, decay included)."""
    R = 2
    model = tiny_llama()
    ref = copy.deepcopy(model)
    part = partition_blocks(model)
    opt = BlockAdam(model, part, switch_every=R, weight_decay=WD, no_decay=no_decay_names(model),
                    fused_backward=fused_backward, **HP)
    assert opt.param_groups[0]["weight_decay"] == WD and len(opt.param_groups) == 1
    ref_opt = two_group_adamw(ref, part.param_names())
    ref_named = dict(ref.named_parameters())
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    dropped = "model.layers.1.self_attn.q_proj.weight"
    for t, ids in enumerate(batches(R * len(part))):
        active = set(opt.active_block.param_names)
        for n, p in ref_named.items():  # the reference trains the same block: others get no gradient
            p.requires_grad_(n in active)
        drop = dropped if t == R else None  # block 1's first step
        if drop is not None and fused_backward:
            model.get_parameter(drop).requires_grad_(False)  # no gradient at all (the hook cannot run)
        loss_of(model, ids).backward()
        if drop is not None and not fused_backward:
            model.get_parameter(drop).grad = None
        opt.step()
        model.get_parameter(dropped).requires_grad_(opt.active_block.index == 1)
        loss_of(ref, ids).backward()
        if drop is not None:
            ref_named[drop].grad = None
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        for n, p in model.named_parameters():
            assert torch.equal(p, ref_named[n]), (t, n)
    norms = no_decay_names(model)
    # Not vacuous: the norm weights of the trained blocks moved (updated, but not decayed).
    assert all(not torch.equal(model.get_parameter(n), start[n]) for n in norms if n in part.param_names())
    assert any(n in part.param_names() for n in norms)


def test_no_decay_bf16_masters_equal_torch_adamw_on_fp32_copies():
    """bf16 weights: the decay acts on BlockAdam's fp32 masters. Reference: torch AdamW (two groups) on fp32 copies of
    the initial weights, stepped on the fp32 gradients BlockAdam got; the masters must be equal and the weights
    their bf16 rounding."""
    model = tiny_llama(torch.bfloat16)
    names = [n for n, _ in model.named_parameters() if n.startswith("model.layers.0.")]
    opt = BlockAdam(model, [names], switch_every=100, weight_decay=WD, no_decay=no_decay_names(model), **HP)
    masters = {n: model.get_parameter(n).detach().float().clone().requires_grad_(True) for n in names}

    class Copies(torch.nn.Module):  # named like the model, so two_group_adamw picks the same groups
        def named_parameters(self, *a, **k):
            return iter(masters.items())

    ref_opt = two_group_adamw(Copies(), names)
    for ids in batches(4):
        loss_of(model, ids).backward()
        for n in names:
            masters[n].grad = model.get_parameter(n).grad.float()
        opt.step()
        ref_opt.step()
        for n in names:
            p = model.get_parameter(n)
            assert torch.equal(opt.state[p]["master"], masters[n].detach()), n
            assert torch.equal(p.detach(), masters[n].detach().to(torch.bfloat16)), n


def test_skipped_step_decays_nothing():
    model = tiny_llama()
    opt = BlockAdam(model, partition_blocks(model), weight_decay=WD, no_decay=no_decay_names(model), **HP)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_of(model, batches(1)[0]).backward()
    opt.skip_next_step = True  # nan_policy=skip
    opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_foreach_step_with_per_tensor_decay_equals_adamw_step():
    """The multi-tensor kernel with one decay per tensor equals the single-tensor step with that tensor's decay."""
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (7,), (2, 2, 2)]
    xs, gs = [torch.randn(s, generator=g) for s in shapes], [torch.randn(s, generator=g) for s in shapes]
    ms, vs = [torch.randn(s, generator=g) for s in shapes], [torch.rand(s, generator=g) for s in shapes]
    decays, steps = [0.3, 0.0, 0.1], [1, 4, 9]
    ref = [t.clone() for t in xs + ms + vs]
    for i in range(3):
        adamw_step_(ref[i], gs[i], ref[3 + i], ref[6 + i], steps[i], 0.1, 0.9, 0.99, 1e-8, decays[i])
    adamw_foreach_step_(xs, gs, ms, vs, steps, 0.1, 0.9, 0.99, 1e-8, decays)
    for got, want in zip(xs + ms + vs, ref):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="2 weight decays for 3 tensors"):
        adamw_foreach_step_(xs, gs, ms, vs, steps, 0.1, 0.9, 0.99, 1e-8, [0.1, 0.2])


def train(model, opt, data) -> None:
    """One BlockAdam step per batch of ``data``."""
    for ids in data:
        loss_of(model, ids).backward()
        opt.step()


@pytest.mark.parametrize("policy", ["reset", "offload"])
def test_state_dict_round_trips_no_decay_bit_identical(policy):
    """The rule is saved: a fresh optimizer built without it continues bit-identically after loading."""
    data = batches(10)
    kw = dict(switch_every=3, state_policy=policy, weight_decay=WD, **HP)

    def build(with_rule=True):
        m = tiny_llama()
        return m, BlockAdam(m, partition_blocks(m), no_decay=no_decay_names(m) if with_rule else (), **kw)

    model, opt = build()
    train(model, opt, data)
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    model, opt = build()
    train(model, opt, data[:4])
    model2, opt2, ckpt = reload_through_checkpoint(model, opt, lambda: build(with_rule=False))
    assert ckpt["opt"]["no_decay"] == sorted(no_decay_names(model))
    assert opt2.no_decay == frozenset(no_decay_names(model))
    train(model2, opt2, data[4:])
    for n, p in model2.named_parameters():
        assert torch.equal(p, expected[n]), n


@pytest.mark.parametrize("with_rule", [True, False], ids=["built_with_rule", "built_without"])
def test_old_state_dict_without_no_decay_loads_and_keeps_the_built_rule(with_rule):
    """A checkpoint from before ``no_decay`` (no such key) loads; the optimizer keeps the rule it was built with:
    the Trainer's rule for the Hugging Face integration (which applied it outside BlockAdam then), none otherwise
    (every parameter decayed, as every BlockAdam did then)."""
    data = batches(6)

    def build():
        m = tiny_llama()
        return m, BlockAdam(m, partition_blocks(m), switch_every=4, weight_decay=WD,
                            no_decay=no_decay_names(m) if with_rule else (), **HP)

    model, opt = build()
    train(model, opt, data)
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    model, opt = build()
    train(model, opt, data[:2])
    old = opt.state_dict()
    del old["no_decay"]
    model2, opt2 = build()
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(old)
    assert opt2.no_decay == (frozenset(no_decay_names(model)) if with_rule else frozenset())
    train(model2, opt2, data[2:])
    for n, p in model2.named_parameters():
        assert torch.equal(p, expected[n]), n


def test_bad_no_decay():
    model = tiny_llama()
    part = partition_blocks(model)
    with pytest.raises(ValueError, match=r"exact names, not patterns.*'bias'"):
        BlockAdam(model, part, no_decay=["bias"])
    with pytest.raises(ValueError, match="collection of parameter names"):
        BlockAdam(model, part, no_decay="model.norm.weight")
    # Parameters outside every block are allowed (the complement of the Trainer's rule names them too).
    opt = BlockAdam(model, part, no_decay=["model.norm.weight"])
    sd = opt.state_dict()
    sd["no_decay"] = ["model.missing.weight"]
    with pytest.raises(ValueError, match="model.missing.weight"):
        opt.load_state_dict(sd)
    assert opt.no_decay == frozenset(["model.norm.weight"])

"""deca_ds.hf._decoupled_weight_decay_: the Trainer's per-parameter weight decay on top of BlockAdam's one group.

The end-to-end check against the plain Trainer's AdamW is tests/integration/test_hf_weight_decay.py (fp32). Here, in
one process, the part that check cannot reach: bf16 weights (the decay must act on BlockAdam's fp32 masters, created
from the weights as the step would create them), a skipped step and a parameter without a gradient.

Reference: BlockAdam itself, which decays every parameter inside its step. Each parameter's update depends only on
its own weight, gradient and moments, so a parameter the Trainer decays must end bit-equal to a BlockAdam with
``weight_decay=wd`` and one it does not decay bit-equal to a BlockAdam with ``weight_decay=0``, stepped on the same
gradients: the same operations in the same order (the decay is the step's first operation on the master), hence
``torch.equal``.
"""

import copy

import pytest
import torch
from tiny import batches, tiny_llama

from deca_ds.hf import _decoupled_weight_decay_
from deca_ds.optim import BlockAdam

WD = 0.3
HP = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8)


def _opt(model, wd):
    names = [n for n, _ in model.named_parameters() if n.startswith("model.layers.0.")]
    return BlockAdam(model, [names], switch_every=100, weight_decay=wd, **HP)


def _step(model, opt, ids, decayed=None, drop=()):
    model(input_ids=ids, labels=ids).loss.backward()
    for name in drop:  # a parameter of the active block that got no gradient this step
        model.get_parameter(name).grad = None
    if decayed is None:
        opt.step()
        return None
    held = _decoupled_weight_decay_(opt, decayed)
    assert opt.param_groups[0]["weight_decay"] == 0.0  # the step itself decays nothing
    opt.step()
    opt.param_groups[0]["weight_decay"] = held
    return held


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_only_the_named_parameters_are_decayed_bit_equal_to_blockadam(dtype):
    model = tiny_llama(dtype)
    decayed_names = {n for n, _ in model.named_parameters() if n.startswith("model.layers.0.") and "norm" not in n}
    with_wd, without_wd = copy.deepcopy(model), copy.deepcopy(model)
    opt, ref_wd, ref_0 = _opt(model, WD), _opt(with_wd, WD), _opt(without_wd, 0.0)
    decayed = {p for n, p in model.named_parameters() if n in decayed_names}
    for ids in batches(4):
        assert _step(model, opt, ids, decayed) == WD
        assert opt.param_groups[0]["weight_decay"] == WD
        _step(with_wd, ref_wd, ids)
        _step(without_wd, ref_0, ids)
        # Keep the three models on the same weights, so that the next gradients are the same: each parameter is
        # compared after every step, then all three take the Trainer-rule result.
        for n, p in model.named_parameters():
            if not n.startswith("model.layers.0."):
                continue
            ref = (with_wd if n in decayed_names else without_wd).get_parameter(n)
            assert torch.equal(p, ref), n
            for other, other_opt in ((with_wd, ref_wd), (without_wd, ref_0)):
                q = other.get_parameter(n)
                q.data.copy_(p.data)
                st, mine = other_opt.state[q], opt.state[p]
                for key in mine:  # moments, step and (bf16) the fp32 master
                    st[key].copy_(mine[key])
    assert {n for n in decayed_names if "proj" in n} and any("norm" in n for n, _ in model.named_parameters())


def test_a_skipped_step_and_a_parameter_without_gradient_are_not_decayed():
    model = tiny_llama()
    opt = _opt(model, WD)
    decayed = {p for n, p in model.named_parameters() if n.startswith("model.layers.0.")}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(input_ids=batches(1)[0], labels=batches(1)[0]).loss.backward()
    opt.skip_next_step = True  # what the pre-hook sets for a non-finite loss or gradient
    assert _decoupled_weight_decay_(opt, decayed) == WD and opt.param_groups[0]["weight_decay"] == 0.0
    opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    opt.param_groups[0]["weight_decay"] = WD
    name = "model.layers.0.self_attn.q_proj.weight"
    _step(model, opt, batches(1)[0], decayed, drop=[name])
    assert torch.equal(model.get_parameter(name), before[name])
    assert not torch.equal(model.get_parameter("model.layers.0.self_attn.k_proj.weight"),
                           before["model.layers.0.self_attn.k_proj.weight"])

"""BlockAdam against independent references: torch.optim.AdamW, per-visit fresh AdamW, closed-form moment updates."""

import copy

import pytest
import torch
from torch import nn

from deca_ds.blocks import partition_blocks
from deca_ds.optim import BlockAdam, memory_report, quantization_bound
from deca_ds.optim.state_store import QUANT_BLOCKSIZE
from tiny import batches, reload_through_checkpoint, tiny_llama

HP = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)




def loss_of(model, ids):
    return model(input_ids=ids, labels=ids).loss


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_one_block_equals_torch_adamw():
    model = tiny_llama()
    ref = copy.deepcopy(model)
    all_names = [n for n, _ in model.named_parameters()]
    opt = BlockAdam(model, [all_names], switch_every=100, **HP)
    ref_opt = torch.optim.AdamW(ref.parameters(), foreach=False, **HP)
    for ids in batches(10):
        loss_of(model, ids).backward()
        opt.step()
        opt.zero_grad()
        loss_of(ref, ids).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    moved = 0.0
    # Bit-equal, not close: for fp32 weights BlockAdam must do torch's single-tensor AdamW arithmetic, operation for
    # operation (same gradients, same order of rounding), so any difference is a bug.
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), n
        moved = max(moved, float((q.detach() - tiny_llama().get_parameter(n).detach()).abs().max()))
    assert moved > 1e-2  # the comparison is not vacuous
    # torch's state keys, keyed by the model's own parameters
    p0 = next(model.parameters())
    assert set(opt.state[p0]) == {"step", "exp_avg", "exp_avg_sq"} and float(opt.state[p0]["step"]) == 10
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(opt.state[p0][key], ref_opt.state[next(ref.parameters())][key]), key


def test_reset_blocks_equal_fresh_adamw_per_visit():
    R, steps = 2, 20  # 4 blocks x 2 steps: 2.5 rounds, every block visited twice or more
    model = tiny_llama()
    ref = copy.deepcopy(model)
    part = partition_blocks(model)
    opt = BlockAdam(model, part, switch_every=R, state_policy="reset", **HP)
    ref_named = dict(ref.named_parameters())
    ref_opt = None
    data = batches(steps)
    for t, ids in enumerate(data):
        visit, inner = divmod(t, R)
        block = part[visit % len(part)]
        assert opt.active_block_idx == block.index and opt.inner_step == inner
        # Only the active block trains: requires_grad, param_groups and optimizer state say so.
        assert [n for n, p in model.named_parameters() if p.requires_grad] == list(block.param_names)
        assert [opt.param_name(p) for p in opt.param_groups[0]["params"]] == list(block.param_names)
        before = params_of(model)
        loss_of(model, ids).backward()
        opt.step()
        assert all(p.grad is None for p in model.parameters())
        held = {opt.param_name(p) for p, st in opt.state.items() if st}
        assert held <= set(block.param_names)
        for n, p in model.named_parameters():
            if n not in block.param_names:
                assert torch.equal(p, before[n]), f"inactive {n} changed"
        # Reference: a fresh AdamW on the active block at the start of each visit.
        if inner == 0:
            ref_opt = torch.optim.AdamW([ref_named[n] for n in block.param_names], foreach=False, **HP)
        for p in ref.parameters():
            p.grad = None
        loss_of(ref, ids).backward()
        ref_opt.step()
        for n, p in model.named_parameters():  # bit-equal: same arithmetic as torch's AdamW (see above)
            assert torch.equal(p, ref_named[n]), (t, n)
    assert opt.global_step == steps


def test_offload_fp32_restores_exact_state_and_continues_step():
    model = tiny_llama()
    part = partition_blocks(model)
    opt = BlockAdam(model, part, switch_every=2, state_policy="offload", auto_switch=False, **HP)
    data = iter(batches(20))
    for _ in range(2):
        loss_of(model, next(data)).backward()
        opt.step()
    # Block 0's state just before it leaves (snapshot, independent of the store).
    before = {opt.param_name(p): {k: v.clone() for k, v in st.items()} for p, st in opt.state.items()}
    assert opt.switch_if_due() and opt.active_block_idx == 1
    opt.auto_switch = True
    assert opt.state_store.blocks() == [0]
    assert not any(opt.param_name(p) in before for p, st in opt.state.items() if st)  # nothing left on device
    for _ in range(2 * (len(part) - 1)):
        loss_of(model, next(data)).backward()
        opt.step()
    assert opt.active_block_idx == 0 and 0 not in opt.state_store
    assert set(before) == set(part[0].param_names)
    for p in opt.active_params():
        st = opt.state[p]
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(st[k], before[opt.param_name(p)][k]), k
        assert float(st["step"]) == 2  # the block's counter continues (next step is t=3)
    report = memory_report(opt)
    assert report["moments"] == sum(2 * 4 * p.numel() for p in opt.active_params())
    assert report["offloaded"] == sum(2 * 4 * p.numel() + 4 for b in part if b.index != 0
                                      for p in map(model.get_parameter, b.param_names))


def test_offload_int8_within_documented_bound():
    model = tiny_llama()
    part = partition_blocks(model)
    opt = BlockAdam(model, part, switch_every=3, state_policy="offload", offload_dtype="int8", **HP)
    data = iter(batches(20))
    for _ in range(2):
        loss_of(model, next(data)).backward()
        opt.step()
    before = {opt.param_name(p): {k: v.clone() for k, v in st.items()} for p, st in opt.state.items()}
    opt.switch_to(1)
    opt.switch_to(0)
    signed, unsigned = quantization_bound()
    assert signed < 0.0142 and unsigned < 0.0071
    worst = 0.0
    for p in opt.active_params():
        name = opt.param_name(p)
        m, v = before[name]["exp_avg"].flatten(), before[name]["exp_avg_sq"].flatten()
        m2, v2 = opt.state[p]["exp_avg"].flatten(), opt.state[p]["exp_avg_sq"].flatten()
        pad = (-m.numel()) % QUANT_BLOCKSIZE
        amax_m = torch.nn.functional.pad(m.abs(), (0, pad)).view(-1, QUANT_BLOCKSIZE).amax(1)
        amax_s = torch.nn.functional.pad(v.sqrt(), (0, pad)).view(-1, QUANT_BLOCKSIZE).amax(1)
        bound_m = (signed * amax_m).repeat_interleave(QUANT_BLOCKSIZE)[: m.numel()] * (1 + 1e-5)
        e = (unsigned * amax_s).repeat_interleave(QUANT_BLOCKSIZE)[: m.numel()] * (1 + 1e-5)
        bound_v = e * (2 * v.sqrt() + e) + 1e-12
        assert torch.all((m2 - m).abs() <= bound_m), name
        assert torch.all((v2 - v).abs() <= bound_v), name
        assert torch.all(v2 >= 0)
        worst = max(worst, float(((m2 - m).abs() / bound_m).max()))
        assert float(opt.state[p]["step"]) == 2
    assert 0.1 < worst < 0.51  # quantization did happen, and rounds (nearly) to the nearest code


def test_bf16_master_and_rounded_weights():
    model = tiny_llama(torch.bfloat16)
    part = partition_blocks(model, layers_per_block=2)
    opt = BlockAdam(model, part, switch_every=4, **HP)
    start = params_of(model)
    for ids in batches(3):
        loss_of(model, ids).backward()
        opt.step()
    for p, master in zip(opt.active_params(), opt.master_params()):
        st = opt.state[p]
        assert p.dtype == torch.bfloat16
        assert master is st["master"] and master.dtype == torch.float32
        assert st["exp_avg"].dtype == torch.float32 and st["exp_avg_sq"].dtype == torch.float32
        assert torch.equal(p.detach(), master.to(torch.bfloat16))
    assert any(not torch.equal(m, m.to(torch.bfloat16).float()) for m in opt.master_params())  # master is finer
    assert any(not torch.equal(p, start[opt.param_name(p)]) for p in opt.active_params())
    # A write to the masters (as gossip does) reaches the model after sync_params_from_master_.
    for m in opt.master_params():
        m.add_(1.0)
    opt.sync_params_from_master_()
    for p, m in zip(opt.active_params(), opt.master_params()):
        assert torch.equal(p.detach(), m.to(torch.bfloat16))
    # fp32 models: master_params are the weights themselves.
    m32 = tiny_llama()
    o32 = BlockAdam(m32, partition_blocks(m32), **HP)
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(o32.master_params(), o32.active_params()))


def test_apply_consensus_formulas():
    model = tiny_llama()
    opt = BlockAdam(model, partition_blocks(model), **HP)
    loss_of(model, batches(1)[0]).backward()
    opt.step()
    g = torch.Generator().manual_seed(3)
    signals = [torch.randn(p.shape, generator=g) for p in opt.active_params()]
    before = [(opt.state[p]["exp_avg"].double(), opt.state[p]["exp_avg_sq"].double()) for p in opt.active_params()]
    b1, b2 = 0.7, 0.95
    opt.apply_consensus_(signals, betas=(b1, b2))
    for p, h, (m, v) in zip(opt.active_params(), signals, before):
        h = h.double()
        # The reference is float64 maths; BlockAdam rounds each of its ~3 fp32 operations to 2^-24 relative, so the
        # two differ by a few fp32 ulps: rtol 1e-6 (~8 ulps), atol for entries that cancel to ~0.
        assert torch.allclose(opt.state[p]["exp_avg"].double(), b1 * m + (1 - b1) * h, rtol=1e-6, atol=1e-9)
        assert torch.allclose(opt.state[p]["exp_avg_sq"].double(), b2 * v + (1 - b2) * h * h, rtol=1e-6, atol=1e-9)
    snap = [opt.state[p]["exp_avg"].clone() for p in opt.active_params()]
    opt.apply_consensus_(signals, betas=(1.0, 1.0))  # "w/o BMA": unchanged
    assert all(torch.equal(opt.state[p]["exp_avg"], s) for p, s in zip(opt.active_params(), snap))
    with pytest.raises(ValueError, match="signals"):
        opt.apply_consensus_(signals[:-1])


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(3, 2, bias=False), nn.Linear(2, 1, bias=False)])


def test_local_moments_false_step_by_hand():
    model = TwoLayer()
    lr, (a1, a2), eps = 0.1, (0.9, 0.99), 1e-8
    opt = BlockAdam(model, [["layers.0.weight"], ["layers.1.weight"]], lr=lr, betas=(a1, a2), eps=eps,
                    local_moments=False, switch_every=10)
    w = model.layers[0].weight
    x0 = w.detach().double().clone()
    m0, v0 = torch.full((2, 3), 0.5), torch.full((2, 3), 0.25)
    opt.apply_consensus_([torch.zeros(2, 3)], betas=(0.0, 0.0))  # creates the state; m = v = 0
    opt.apply_consensus_([m0], betas=(0.0, 0.0))  # m = m0, v = m0² = 0.25
    g = torch.arange(6.0).view(2, 3) - 2.5
    w.grad = g.clone()
    opt.step()
    st = opt.state[w]
    assert torch.equal(st["exp_avg"], m0) and torch.equal(st["exp_avg_sq"], v0)  # stored moments untouched
    mp = a1 * m0.double() + (1 - a1) * g.double()
    vp = a2 * v0.double() + (1 - a2) * g.double() ** 2
    expected = x0 - lr * (mp / (1 - a1)) / ((vp / (1 - a2)).sqrt() + eps)
    # float64 closed form vs BlockAdam's fp32 step: |w| < 1 and |update| <= lr * ~1, so a handful of fp32 roundings
    # (2^-24 ~ 6e-8 each) stay far below 1e-6; a wrong formula misses by >= 1e-3.
    assert torch.allclose(w.detach().double(), expected, atol=1e-6, rtol=0)


def test_skip_next_step_and_zero_grad():
    model = TwoLayer()
    opt = BlockAdam(model, [["layers.0.weight"], ["layers.1.weight"]], switch_every=1, lr=0.1)
    w0 = model.layers[0].weight.detach().clone()
    model.layers[0].weight.grad = torch.ones(2, 3)
    opt.skip_next_step = True
    opt.step()
    assert torch.equal(model.layers[0].weight, w0) and model.layers[0].weight.grad is None
    assert not opt.skip_next_step and opt.global_step == 1 and opt.active_block_idx == 1
    model.layers[1].weight.grad = torch.ones(1, 2)
    opt.zero_grad(set_to_none=True)
    assert model.layers[1].weight.grad is None


def test_lr_scheduler_and_group_identity():
    model = TwoLayer()
    opt = BlockAdam(model, [["layers.0.weight"], ["layers.1.weight"]], switch_every=1, lr=1.0)
    group = opt.param_groups[0]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    for _ in range(3):
        for p in opt.active_params():
            p.grad = torch.ones_like(p)
        opt.step()
        sched.step()
    assert opt.param_groups[0] is group and len(opt.param_groups) == 1
    assert group["lr"] == 0.125


@pytest.mark.parametrize("policy,dtype", [("reset", "fp32"), ("offload", "fp32"), ("offload", "int8")])
def test_state_dict_round_trip_mid_block_bit_identical(policy, dtype):
    data = batches(12)
    kw = dict(switch_every=3, state_policy=policy, offload_dtype=dtype, order="random", seed=5, **HP)

    def build():
        m = tiny_llama()
        return m, BlockAdam(m, partition_blocks(m), **kw)

    model, opt = build()
    for ids in data:
        loss_of(model, ids).backward()
        opt.step()
    expected = params_of(model)

    model, opt = build()
    for ids in data[:7]:
        loss_of(model, ids).backward()
        opt.step()
    assert opt.inner_step == 1  # mid-block
    model2, opt2, _ = reload_through_checkpoint(model, opt, build)
    assert opt2.global_step == 7 and opt2.active_block_idx == opt.active_block_idx
    assert [n for n, p in model2.named_parameters() if p.requires_grad] == list(opt2.active_block.param_names)
    for ids in data[7:]:
        loss_of(model2, ids).backward()
        opt2.step()
    for n, p in model2.named_parameters():
        assert torch.equal(p, expected[n]), n


def test_memory_report_scales_with_blocks():
    model = tiny_llama()
    numel = sum(p.numel() for p in model.parameters())
    full = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    full.step()
    r_full = memory_report(full, model)
    assert r_full["moments"] == 2 * 4 * numel and r_full["weights"] == 4 * numel
    assert r_full["gradients"] == 4 * numel and r_full["by_device"]["cpu"]["moments"] == r_full["moments"]
    model.zero_grad(set_to_none=True)
    part = partition_blocks(model)
    opt = BlockAdam(model, part, **HP)
    loss_of(model, batches(1)[0]).backward()
    active = sum(p.numel() for p in opt.active_params())
    assert memory_report(opt)["gradients"] == 4 * active
    opt.step()
    r = memory_report(opt)
    assert r["moments"] == 2 * 4 * active and r["master"] == 0 and r["offloaded"] == 0 and r["gradients"] == 0
    assert r["weights"] == 4 * numel


def test_bad_arguments():
    model = TwoLayer()
    blocks = [["layers.0.weight"], ["layers.1.weight"]]
    with pytest.raises(ValueError, match="state_policy"):
        BlockAdam(model, blocks, state_policy="keep")
    with pytest.raises(ValueError, match="offload_dtype"):
        BlockAdam(model, blocks, state_policy="offload", offload_dtype="int4")
    with pytest.raises(ValueError, match="layers.2.weight"):
        BlockAdam(model, [["layers.2.weight"]])
    with pytest.raises(ValueError, match="more than one block"):
        BlockAdam(model, [["layers.0.weight"], ["layers.0.weight"]])


@pytest.mark.gpu
def test_offload_prefetch_on_accelerator():
    model = tiny_llama().cuda().to(torch.bfloat16)
    part = partition_blocks(model)
    opt = BlockAdam(model, part, switch_every=1, state_policy="offload", **HP)
    ids = batches(1)[0].cuda()
    for _ in range(len(part)):  # one step on every block: all parked on the host
        loss_of(model, ids).backward()
        opt.step()
    # The store's own host copies are pinned (peek() returns unpinned clones); "step" scalars stay plain CPU tensors.
    held = [t for e in opt.state_store._blocks[1].values() for k, t in e.items() if k != "step"]
    assert held and all(t.is_pinned() for t in held)
    parked = opt.state_store.peek(1)
    loss_of(model, ids).backward()
    opt.step()  # block 0 -> block 1 (restored from the prefetch started when block 0 became active)
    for p in opt.active_params():
        for k, v in parked[opt.param_name(p)].items():
            assert torch.equal(opt.state[p][k].cpu(), v), k
    torch.cuda.synchronize()

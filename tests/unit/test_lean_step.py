"""The lean step (issue 15 item 2) against the step it replaced: per-tensor AdamW, per-tensor fold, per-tensor finite
checks. The references below are the previous implementations, restated; every comparison is bit for bit on the CPU
(a ``_foreach`` op there is the single-tensor op applied to each entry, so any difference is a bug)."""

import copy

import pytest
import torch

from deca_ds import consensus
from deca_ds.blocks import partition_blocks
from deca_ds.optim import BlockAdam, adamw_foreach_step_, adamw_step_, memory_report
from deca_ds.step import all_finite, grads_finite
from lean_reference import PerTensorBlockAdam  # tests/ is on sys.path
from tiny import tiny_llama

HP = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("local_moments", [True, False])
def test_foreach_block_adam_with_consensus_equals_per_tensor_bit_for_bit(dtype, local_moments):
    lean_model = tiny_llama(dtype)
    ref_model = copy.deepcopy(lean_model)
    kw = dict(switch_every=2, auto_switch=False, local_moments=local_moments, **HP)
    lean = BlockAdam(lean_model, partition_blocks(lean_model), **kw)
    ref = PerTensorBlockAdam(ref_model, partition_blocks(ref_model), **kw)
    g = torch.Generator().manual_seed(3)
    moved = 0.0
    for step in range(7):  # crosses switches, so fresh state and step counters are covered too
        ids = torch.randint(0, 128, (2, 8), generator=g)
        losses = []
        for model, opt in ((lean_model, lean), (ref_model, ref)):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            losses.append(loss.detach())
            opt.step()
            # a consensus signal per active parameter: any deterministic tensor of the right shape
            signals = [torch.sin(x.float() * (step + 1)) for x in opt.master_params()]
            opt.apply_consensus_(signals, betas=(0.9, 0.99))
            opt.sync_params_from_master_()
            opt.switch_if_due()
        assert torch.equal(losses[0], losses[1]), step
    for (n, p), q in zip(lean_model.named_parameters(), ref_model.parameters()):
        assert torch.equal(p, q), n
        start = tiny_llama(dtype).get_parameter(n).detach()
        moved = max(moved, float((p.detach().float() - start.float()).abs().max()))
    for p, q in zip(lean_model.parameters(), ref_model.parameters()):
        for k, v in ref.state.get(q, {}).items():
            assert torch.equal(lean.state[p][k], v), k
    assert moved > 1e-3  # both trained: the comparison is not vacuous


def test_foreach_step_matches_single_tensor_with_different_step_counts():
    torch.manual_seed(0)
    shapes = [(5, 3), (7,), (2, 2, 2)]
    xs, gs, ms, vs = ([torch.randn(s) for s in shapes] for _ in range(4))
    vs = [v.abs() for v in vs]
    steps = [1, 4, 9]
    ref = [t.clone() for t in xs + ms + vs]
    for i in range(3):
        adamw_step_(ref[i], gs[i], ref[3 + i], ref[6 + i], steps[i], 0.1, 0.9, 0.99, 1e-8, 0.01)
    adamw_foreach_step_(xs, gs, ms, vs, steps, 0.1, 0.9, 0.99, 1e-8, 0.01)
    for a, b in zip(xs + ms + vs, ref):
        assert torch.equal(a, b)


def test_fold_of_a_list_equals_fold_tensor_by_tensor():
    torch.manual_seed(1)
    ms, vs, hs = ([torch.randn(4, 3) for _ in range(3)] for _ in range(3))
    vs = [v.abs() for v in vs]
    ref_m, ref_v = [m.clone() for m in ms], [v.clone() for v in vs]
    for m, v, h in zip(ref_m, ref_v, hs):
        consensus.fold_moments_(m, v, h.to(torch.bfloat16), (0.9, 0.99))
    consensus.fold_moments_(ms, vs, [h.to(torch.bfloat16) for h in hs], (0.9, 0.99))
    for a, b in zip(ms + vs, ref_m + ref_v):
        assert torch.equal(a, b)
    # against the closed form in float64: each fold is 2 fp32 roundings of an O(1) value per moment
    m64 = ms[0].double()  # after the fold; recompute it from the saved pre-fold values
    torch.manual_seed(1)
    m_pre = [torch.randn(4, 3) for _ in range(3)][0].double()
    h = hs[0].to(torch.bfloat16).double()
    assert torch.allclose(m64, 0.9 * m_pre + 0.1 * h, rtol=0, atol=4 * 2**-24 * (m_pre.abs() + h.abs()).max().item())


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("route", ["fused", "generic"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_finite_check_agrees_with_isfinite_and_leaves_tensors_unchanged(dtype, device, route, monkeypatch):
    """Both routes of deca_ds.step.accumulate_nonfinite_ (torch's fused kernel where it implements the dtype on
    the device, else isfinite per tensor; "generic" forces the latter) find every NaN and infinity, call the
    dtype's largest finite value finite, and leave the tensors bit for bit unchanged. On CUDA, bf16 takes the
    generic route: the fused kernel raised NotImplementedError for it (an H200, torch 2.11)."""
    from deca_ds import step

    if route == "generic":
        monkeypatch.setattr(step, "_FUSED_CHECK", {})
    torch.manual_seed(2)
    big = torch.finfo(dtype).max
    ts = [(torch.randn(6, 5) * 1e3).to(dtype), torch.randn(3).to(dtype), torch.tensor(2.0, dtype=dtype),
          torch.tensor([big, -big], dtype=dtype)]
    ts = [t.to(device) for t in ts]
    before = [t.clone() for t in ts]
    assert all_finite(ts) and all_finite([])
    for bad in (float("nan"), float("inf"), float("-inf")):
        ts[1][2] = bad
        assert not all_finite(ts)
        assert not all_finite([ts[1]]) and all_finite([ts[0], ts[2], ts[3]])
        ts[1][2] = before[1][2]
    for a, b in zip(ts, before):  # the fused check multiplies by exactly 1.0: bit-unchanged
        assert torch.equal(a.view(torch.uint8) if a.dim() else a, b.view(torch.uint8) if b.dim() else b)
    assert all_finite([torch.arange(3, device=device)])
    assert not all_finite([torch.tensor([1.0, float("nan")], dtype=torch.float64, device=device)])
    lin = torch.nn.Linear(3, 2).to(device)
    assert grads_finite(lin.parameters())  # no gradients yet
    lin.weight.grad = torch.full((2, 3), float("nan"), device=device)
    assert not grads_finite(lin.parameters())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_backward_step_equals_unfused_step_and_frees_gradients(dtype, device):
    fused_model = tiny_llama(dtype).to(device)
    ref_model = copy.deepcopy(fused_model)
    kw = dict(switch_every=2, **HP)
    fused = BlockAdam(fused_model, partition_blocks(fused_model), fused_backward=True, **kw)
    ref = BlockAdam(ref_model, partition_blocks(ref_model), **kw)
    g = torch.Generator().manual_seed(5)
    for step in range(6):  # three blocks, each for two steps: hooks move with the switches
        ids = torch.randint(0, 128, (2, 8), generator=g).to(device)
        fl = fused_model(input_ids=ids, labels=ids).loss
        fl.backward()
        # every active gradient was consumed inside backward: none is alive once backward returns
        assert all(p.grad is None for p in fused_model.parameters())
        assert memory_report(fused)["gradients"] == 0
        fused.step()
        rl = ref_model(input_ids=ids, labels=ids).loss
        rl.backward()
        assert memory_report(ref)["gradients"] > 0
        ref.step()
        assert torch.equal(fl.detach(), rl.detach()), step
        assert not fused.nonfinite_in_backward()
    for (n, p), q in zip(fused_model.named_parameters(), ref_model.parameters()):
        assert torch.equal(p, q), n
    for p, q in zip(fused_model.parameters(), ref_model.parameters()):
        for k, v in ref.state.get(q, {}).items():
            assert torch.equal(fused.state[p][k], v), k


def test_fused_backward_refuses_accumulation_and_late_skips_and_flags_nonfinite():
    model = tiny_llama()
    opt = BlockAdam(model, partition_blocks(model), fused_backward=True, switch_every=10, **HP)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(RuntimeError, match="gradient accumulation is not supported"):
        model(input_ids=ids, labels=ids).loss.backward()
    opt.skip_next_step = True
    with pytest.raises(RuntimeError, match="cannot be skipped"):
        opt.step()
    # a non-finite gradient is reported by the device-side flag
    fresh = tiny_llama()
    opt = BlockAdam(fresh, partition_blocks(fresh), fused_backward=True, switch_every=10, **HP)
    (fresh(input_ids=ids, labels=ids).loss * float("inf")).backward()
    assert opt.nonfinite_in_backward() and not opt.nonfinite_in_backward()  # and the flag resets

"""DECA's between-steps hook: signal formulas (closed forms) and the order gossip -> signal -> BMA -> switch."""

import pytest
import torch

from deca_ds.consensus import ConsensusStep, consensus_signal, method_spec


def test_signals_match_their_closed_forms():
    x = torch.tensor([1.0, 2.0])
    half = torch.tensor([0.5, 2.5])
    new = torch.tensor([0.75, 2.0])
    lr = 0.25
    assert torch.allclose(consensus_signal("qgm", x, half, new, lr), (x - new) / lr)
    assert torch.allclose(consensus_signal("discrepancy", x, half, new, lr), (half - new) / lr)
    assert torch.allclose(consensus_signal("raw", x, half, new, lr), new - x)
    with pytest.raises(ValueError, match="deca.signal"):
        consensus_signal("nope", x, half, new, lr)


def test_method_table():
    assert method_spec("deca").consensus and method_spec("deca").gossip
    assert not method_spec("badam_gossip").consensus
    assert not method_spec("trivial_bma").local_moments
    assert method_spec("dadam").single_block and not method_spec("dadam").consensus
    assert not method_spec("local").gossip
    assert method_spec("centralized").world_data_parallel
    with pytest.raises(ValueError, match="method"):
        method_spec("fedavg")


class FakeOptimizer:
    """Records what the hook does; holds one fp32 tensor as the active block."""

    def __init__(self, x):
        self.x = x
        self.param_groups = [{"lr": 0.5}]
        self.active_block_idx = 3
        self.calls = []

    def master_params(self):
        return [self.x]

    def sync_params_from_master_(self):
        self.calls.append("sync")

    def apply_consensus_(self, signals, betas):
        self.calls.append(("consensus", [s.clone() for s in signals], betas))

    def switch_if_due(self):
        self.calls.append("switch")
        return True


@pytest.mark.parametrize("signal", ["qgm", "discrepancy", "raw"])
def test_hook_mixes_then_corrects_then_switches(signal):
    x_prev = torch.tensor([1.0, -1.0])
    x_half = torch.tensor([0.8, -0.6])
    x_new = torch.tensor([0.5, 0.0])
    opt = FakeOptimizer(x_prev.clone())
    seen = {}

    def mix(tensors, step, block_idx):
        seen.update(step=step, block=block_idx, before=tensors[0].clone())
        opt.calls.append("mix")
        tensors[0].copy_(x_new)
        return "stats"

    hook = ConsensusStep(opt, "deca", mix=mix, signal=signal, betas=(0.5, 0.75))
    hook.before_step()
    opt.x.copy_(x_half)  # the optimizer's local half step
    assert hook.after_step(step=7) is True
    assert seen["step"] == 7 and seen["block"] == 3 and torch.equal(seen["before"], x_half)
    assert [c if isinstance(c, str) else c[0] for c in opt.calls] == ["mix", "sync", "consensus", "switch"]
    _, signals, betas = opt.calls[2]
    assert betas == (0.5, 0.75)
    assert torch.allclose(signals[0], consensus_signal(signal, x_prev, x_half, x_new, 0.5))
    assert hook.last_mix_stats == "stats"


def test_methods_without_consensus_or_gossip():
    opt = FakeOptimizer(torch.zeros(2))
    hook = ConsensusStep(opt, "badam_gossip", mix=lambda t, s, b: opt.calls.append("mix"))
    hook.before_step()
    hook.after_step(0)
    assert opt.calls == ["mix", "sync", "switch"]
    opt2 = FakeOptimizer(torch.zeros(2))
    ConsensusStep(opt2, "local").after_step(0)
    assert opt2.calls == ["switch"]
    with pytest.raises(ValueError, match="mix"):
        ConsensusStep(opt2, "deca")


class FakeAdamOptimizer(FakeOptimizer):
    """A FakeOptimizer with an Adam denominator sqrt(v_hat) + eps of 2 everywhere (the gradient-unit readings)."""

    def adam_denominators(self):
        return [torch.full_like(self.x, 2.0)]


@pytest.mark.parametrize("signal, folds", [("qgm", False), ("discrepancy", False), ("raw", True),
                                           ("qgm_grad", False), ("discrepancy_grad", False)])
def test_a_warmup_step_at_lr_zero_folds_no_per_lr_signal(signal, folds):
    """optim.schedule warms up from lr 0: (x - x_new)/0 is not a signal, so such a step mixes and switches only."""
    opt = FakeAdamOptimizer(torch.tensor([1.0, -1.0]))
    opt.param_groups[0]["lr"] = 0.0

    def mix(tensors, step, block_idx):
        opt.calls.append("mix")
        tensors[0].mul_(0.5)

    hook = ConsensusStep(opt, "deca", mix=mix, signal=signal)
    hook.before_step()
    hook.after_step(0)
    names = [c if isinstance(c, str) else c[0] for c in opt.calls]
    assert names == (["mix", "sync", "consensus", "switch"] if folds else ["mix", "sync", "switch"])
    assert (hook.last_signal_sq is not None) == folds  # the diagnostics count no signal for a step that folds none


@pytest.mark.parametrize("signal", ["qgm_grad", "discrepancy_grad"])
def test_gradient_unit_signal_is_the_normalised_displacement_times_the_denominator(signal):
    """h = (x_base - x_new) / lr * (sqrt(v_hat) + eps), x_base = x_prev (qgm_grad) or x_half (discrepancy_grad)."""
    x_prev, x_half, x_new = torch.tensor([1.0, -1.0]), torch.tensor([0.8, -0.6]), torch.tensor([0.5, 0.0])
    opt = FakeAdamOptimizer(x_prev.clone())

    def mix(tensors, step, block_idx):
        tensors[0].copy_(x_new)

    hook = ConsensusStep(opt, "deca", mix=mix, signal=signal)
    hook.before_step()
    opt.x.copy_(x_half)  # the local step
    hook.after_step(0)
    base = x_prev if signal == "qgm_grad" else x_half
    (h,) = next(c for c in opt.calls if isinstance(c, tuple))[1]
    torch.testing.assert_close(h, (base - x_new) / 0.5 * 2.0, rtol=0, atol=0)

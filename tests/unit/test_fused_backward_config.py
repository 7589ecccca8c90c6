"""``optim.fused_backward``: every setting it cannot honour is refused up front, and the per-client simulator with it
equals the simulator without it bit for bit (issue 15 item 4).

The unfused simulator is the reference: it is itself checked against torch AdamW (tests/unit/test_simulate.py) and
a real launch (tests/integration/test_simulate_parity.py). The fused step changes the weights during backward, so
the pre-step snapshot of ``deca.signal=qgm`` must be taken before backward: a snapshot taken after it changes the
consensus signal, hence the moments and every later loss (the deca case below would then fail from its third step).
"""

import json

import pytest
import torch

from deca_ds.config import ConfigError, load_config
from deca_ds.ds_config import check_ds_config

FUSED = ["optim.fused_backward=true"]
NO_CLIP = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0}


@pytest.mark.parametrize("overrides, ds, words", [
    (["nan_policy=skip"], NO_CLIP, "nan_policy=skip"),
    (["method=centralized"], NO_CLIP, "method=centralized"),
    (["method=centralized", "centralized_optimizer=adamw"], NO_CLIP, "method=centralized"),
    (["clients.ranks_per_client=2"], NO_CLIP, "clients.ranks_per_client=1"),
    (["backend=simulate", "num_clients=2"], NO_CLIP, "simulate.stacked=false"),
    ([], {**NO_CLIP, "gradient_clipping": 1.0}, "gradient_clipping=1.0"),
    ([], {**NO_CLIP, "gradient_accumulation_steps": 2}, "gradient_accumulation_steps=2"),
    # train_batch_size = 2 x micro-batch on a one-rank client: DeepSpeed derives two micro-batches per step.
    ([], {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0}, "accumulation_steps=2"),
    ([], {**NO_CLIP, "zero_optimization": {"stage": 1}}, "zero_optimization.stage=1"),
    ([], {**NO_CLIP, "zero_optimization": {"stage": 3}}, "zero_optimization.stage=3"),
    ([], {**NO_CLIP, "amp": {"enabled": True}}, "enables amp"),
    ([], {**NO_CLIP, "torch_autocast": {"enabled": True, "dtype": "torch.float16"}}, "torch_autocast"),
])
def test_fused_backward_refuses_what_needs_every_gradient_before_the_update(overrides, ds, words):
    with pytest.raises(ConfigError) as e:
        cfg = load_config(None, FUSED + overrides)
        check_ds_config(json.loads(json.dumps(ds)), cfg, world_size=2)
    msg = str(e.value)
    assert words in msg and "\n" not in msg
    assert "fused_backward" in msg  # names the setting that conflicts, and the way out
    # Without the fused step every one of these settings is accepted: the refusal is the fused step's.
    check_ds_config(json.loads(json.dumps(ds)), load_config(None, overrides), world_size=2)


def test_fused_backward_is_accepted_where_it_works_and_reaches_blockadam():
    from deca_ds.build import build_consensus_step, build_optimizer
    from deca_ds.models import load_model_and_tokenizer

    cfg = load_config(None, FUSED + ["backend=simulate", "simulate.stacked=false", "num_clients=2"])
    check_ds_config(dict(NO_CLIP), cfg)
    check_ds_config({**NO_CLIP, "torch_autocast": {"enabled": True, "dtype": "bf16"}}, cfg)  # no loss scaling
    model, _ = load_model_and_tokenizer(cfg.model, seed=0)
    opt = build_optimizer(cfg, model)
    assert opt.fused_backward
    build_consensus_step(cfg, opt, lambda *a: None, fused_backward_ok=True)
    # The Hugging Face Trainer integration snapshots, clips and checks gradients after backward: it builds its
    # consensus step without saying it supports the fused step, and is refused there, before its first step.
    with pytest.raises(ConfigError, match="Hugging Face Trainer"):
        build_consensus_step(cfg, opt, lambda *a: None)
    assert not build_optimizer(load_config(), model).fused_backward  # off by default


def test_stacked_simulator_refuses_fused_backward_whatever_the_backend():
    from deca_ds.stacked import StackedSimulation

    cfg = load_config(None, FUSED + ["num_clients=2"])  # backend=launcher: the settings alone pass
    with pytest.raises(ConfigError, match="simulate.stacked=false"):
        StackedSimulation(cfg)


SMALL = ["backend=simulate", "simulate.stacked=false", "simulate.device=cpu", "num_clients=2",
         "data.num_examples=120", "data.eval_examples=2", "data.min_partition_size=4", "data.max_length=32",
         "optim.lr=1e-2", "topology.name=ring"]


def _run(tmp_path, extra, fused):
    from deca_ds.simulate import Simulation

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({**NO_CLIP, "train_micro_batch_size_per_gpu": 4}))
    cfg = load_config(None, SMALL + [f"ds_config={ds}", f"optim.fused_backward={str(fused).lower()}"] + extra)
    sim = Simulation(cfg)
    assert all(opt.fused_backward == fused for opt in sim.optimizers)
    records = [sim.step() for _ in range(cfg.max_steps)]
    weights = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in sim.models]
    return [r.losses for r in records], [r.block for r in records], weights


@pytest.mark.parametrize("extra, blocks", [
    # qgm needs the pre-step snapshot; offload parks block 0's state at the switch and restores it at step 2.
    (["method=deca", "deca.signal=qgm", "optim.state_policy=offload", "blocks.switch_every=1", "blocks.order=fixed",
      "blocks.fixed_order=[0,1]", "max_steps=4"], [0, 1, 0, 1]),
    (["method=badam_gossip", "blocks.switch_every=2", "max_steps=3"], [0, 0, 1]),
])
def test_fused_backward_simulator_equals_unfused_bit_for_bit(tmp_path, extra, blocks):
    fused_losses, fused_blocks, fused_w = _run(tmp_path, extra, True)
    ref_losses, ref_blocks, ref_w = _run(tmp_path, extra, False)
    assert fused_blocks == ref_blocks == blocks  # crosses block switches
    assert fused_losses == ref_losses  # floats: bit-equal, every client, every step
    assert len({tuple(x) for x in ref_losses}) == len(ref_losses)  # the steps really trained
    for fw, rw in zip(fused_w, ref_w):
        for k in rw:
            assert torch.equal(fw[k], rw[k]), k
    assert any(not torch.equal(fused_w[0][k], fused_w[1][k]) for k in fused_w[0])  # clients differ


@pytest.mark.parametrize("fused", [False, True])
def test_a_non_finite_gradient_is_reported_with_and_without_the_fused_step(tmp_path, fused):
    """A NaN gradient under a finite loss (a tensor hook poisons it before it is accumulated) is caught: by the
    fused finite check after backward, or by BlockAdam's device-side flag while it steps inside backward."""
    from deca_ds.simulate import Simulation

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(NO_CLIP))
    cfg = load_config(None, SMALL + [f"ds_config={ds}", f"optim.fused_backward={str(fused).lower()}",
                                     "method=badam_gossip", "max_steps=1"])
    sim = Simulation(cfg)
    p = sim.optimizers[0].active_params()[0]
    p.register_hook(lambda g: torch.full_like(g, float("nan")))
    rec = sim.step()
    assert rec.nonfinite == [True, False] and all(torch.isfinite(torch.tensor(x)) for x in rec.losses)
    # nan_policy=stop ends the run here; unfused, the update was skipped; fused, it was already applied.
    assert torch.isfinite(p).all() != fused


def test_hf_settings_refuse_fused_backward_before_the_trainer_is_built():
    from deca_ds.hf import DecaSettings

    with pytest.raises(ConfigError, match="optim.fused_backward=false") as e:
        DecaSettings(overrides=["optim.fused_backward=true"])
    assert "\n" not in str(e.value)


def test_a_resume_may_switch_the_fused_step_on_or_off():
    # Bit-identical steps (above): changing it between legs changes memory, not results, so a resume allows it.
    from deca_ds.checkpoint import CHANGEABLE_SETTINGS

    assert "optim.fused_backward" in CHANGEABLE_SETTINGS

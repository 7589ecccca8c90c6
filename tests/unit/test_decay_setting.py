"""``optim.decay_norms_and_biases``: the Trainer's no-decay rule on the launcher's paths, or a one-line refusal.

The rule's reference is transformers itself (``Trainer.get_decay_parameter_names`` on a constructed Trainer), and for
the arithmetic torch's AdamW with the Trainer's two groups. BlockAdam's own per-parameter decay is tested in
tests/unit/test_block_adam_no_decay.py; here: the setting, and that every path built from it gets the rule.
"""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from deca_ds.build import build_optimizer, no_decay_names
from deca_ds.config import ConfigError, load_config
from deca_ds.optim import BlockAdam

OFF = ["optim.decay_norms_and_biases=false"]


def llama_with_biases():
    """A 2-layer Llama with attention and MLP biases: biases and RMSNorm weights for the rule to leave out."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=False,
                      attention_bias=True, mlp_bias=True)
    return LlamaForCausalLM(cfg)


def trainers_no_decay(model, tmp_path):
    """The complement of a real Trainer's ``get_decay_parameter_names`` (the no-decay group it builds)."""
    from transformers import Trainer, TrainingArguments

    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True))
    decayed = set(trainer.get_decay_parameter_names(model))
    return [n for n, _ in model.named_parameters() if n not in decayed]


def test_setting_default_and_values():
    assert load_config(None, []).optim.decay_norms_and_biases is True  # today's behaviour: everything decayed
    assert load_config(None, OFF).optim.decay_norms_and_biases is False
    with pytest.raises(ConfigError) as e:
        load_config(None, ["optim.decay_norms_and_biases=sometimes"])
    assert "optim.decay_norms_and_biases" in str(e.value) and "\n" not in str(e.value)


def test_the_rule_is_the_trainers(tmp_path):
    model = llama_with_biases()
    assert no_decay_names(load_config(None, []), model) == []
    names = no_decay_names(load_config(None, OFF), model)
    assert names == trainers_no_decay(model, tmp_path)
    # What transformers' rule means for a Llama: every bias and every norm weight, nothing else.
    assert names == [n for n, _ in model.named_parameters() if n.endswith(".bias") or "norm" in n]
    assert any(n.endswith(".bias") for n in names) and "model.norm.weight" in names


def test_block_adam_gets_the_rule():
    model = llama_with_biases()
    opt = build_optimizer(load_config(None, OFF + ["blocks.prefixes=[model.layers.0,model.layers.1]"]), model)
    assert isinstance(opt, BlockAdam)
    assert opt.no_decay == frozenset(no_decay_names(load_config(None, OFF), model))
    default = build_optimizer(load_config(None, ["blocks.prefixes=[model.layers.0,model.layers.1]"]),
                              llama_with_biases())
    assert default.no_decay == frozenset()


def test_torch_adamw_baseline_gets_the_trainers_two_groups():
    baseline = ["method=centralized", "centralized_optimizer=adamw", "optim.weight_decay=0.1"]
    model = llama_with_biases()
    opt = build_optimizer(load_config(None, baseline), model)
    assert len(opt.param_groups) == 1  # as before the setting: its checkpoints keep loading
    opt = build_optimizer(load_config(None, baseline + OFF), model)
    names = {p: n for n, p in model.named_parameters()}
    skip = set(no_decay_names(load_config(None, OFF), model))
    decay, zero = opt.param_groups
    assert decay["weight_decay"] == 0.1 and zero["weight_decay"] == 0.0
    assert [names[p] for p in decay["params"]] == [n for n in names.values() if n not in skip]
    assert [names[p] for p in zero["params"]] == [n for n in names.values() if n in skip]
    with pytest.raises(ValueError, match="model.missing.bias"):
        build_optimizer(load_config(None, baseline), model, no_decay=["model.missing.bias"])


def test_zero_stages_refuse_it_in_one_line():
    from deca_ds.ds_config import check_ds_config
    from deca_ds.engine.zero import ZeroBlockEngine

    cfg = load_config(None, OFF)
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1}
    check_ds_config(dict(ds), cfg, world_size=2)  # stage 0: BlockAdam
    for stage in (1, 2, 3):
        with pytest.raises(ConfigError, match=f"ZeRO stage {stage}.*optim.decay_norms_and_biases=true or "
                                              "zero_optimization.stage=0") as e:
            check_ds_config({**ds, "zero_optimization": {"stage": stage}}, cfg, world_size=2)
        assert "\n" not in str(e.value)
    check_ds_config({**ds, "zero_optimization": {"stage": 2}}, load_config(None, []), world_size=2)
    # The engine itself refuses too, before it touches the model (built directly, without check_ds_config).
    with pytest.raises(ConfigError, match="optim.decay_norms_and_biases=true"):
        ZeroBlockEngine(cfg, None, {**ds, "zero_optimization": {"stage": 2}}, groups=None)


def test_stacked_adam_no_decay_equals_torch_adamw_two_groups_per_client():
    from deca_ds.stacked import StackedBlockAdam

    g = torch.Generator().manual_seed(1)
    w0, n0 = torch.randn(2, 3, 4, generator=g), 1 + torch.randn(2, 4, generator=g)
    params = {"layers.0.w": w0.clone(), "layers.0.norm.weight": n0.clone()}
    opt = StackedBlockAdam(params, [list(params)], lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.5,
                           switch_every=100, order="ascending", fixed_order=None, seed=0, state_policy="reset",
                           offload_dtype="fp32", local_moments=True, no_decay=["layers.0.norm.weight"])
    refs = [(torch.nn.Parameter(w0[c].clone()), torch.nn.Parameter(n0[c].clone())) for c in range(2)]
    ref_opts = [torch.optim.AdamW([{"params": [w], "weight_decay": 0.5}, {"params": [n], "weight_decay": 0.0}],
                                  lr=0.1, betas=(0.9, 0.999), eps=1e-8) for w, n in refs]
    for _ in range(3):
        grads = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
        opt.step({k: v.clone() for k, v in grads.items()}, [False, False])
        for c, (w, n) in enumerate(refs):
            w.grad, n.grad = grads["layers.0.w"][c].clone(), grads["layers.0.norm.weight"][c].clone()
            ref_opts[c].step()
    for c, (w, n) in enumerate(refs):
        torch.testing.assert_close(params["layers.0.w"][c], w.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(params["layers.0.norm.weight"][c], n.detach(), rtol=1e-6, atol=1e-7)
    # Not vacuous: a decayed norm weight would be 3 * lr * wd = 15 % smaller, far outside the tolerance.


@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "per_client"])
def test_simulators_get_the_rule(stacked):
    from deca_ds.simulate import Simulation
    from deca_ds.stacked import StackedSimulation

    cfg = load_config(None, OFF + ["backend=simulate", "num_clients=2", "data.num_examples=40",
                                   "data.min_partition_size=4", f"simulate.stacked={str(stacked).lower()}"])
    sim = StackedSimulation(cfg) if stacked else Simulation(cfg)
    opts = [sim.optimizer] if stacked else sim.optimizers
    for opt in opts:
        assert opt.no_decay and all("norm" in n for n in opt.no_decay)

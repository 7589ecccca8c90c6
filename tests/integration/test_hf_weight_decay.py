"""deca_ds.hf: TrainingArguments.weight_decay reaches the parameters the Trainer itself would decay, and only those.

``transformers.Trainer.create_optimizer`` puts the parameters named by ``Trainer.get_decay_parameter_names(model)``
in an AdamW group with ``args.weight_decay`` and all others (biases, LayerNorm/RMSNorm weights) in a group with
weight decay 0. A DecaTrainer user moving from a plain Trainer must get the same update.

The reference is independent of deca_ds: the optimizer a plain ``Trainer(model, args).create_optimizer()`` builds
(torch AdamW with HF's two groups) on a copy of the initial model, stepped on the gradients the DecaTrainer's BlockAdam
received at each step (recorded by a step pre-hook registered after DecaTrainer's own, i.e. the gradients after the
Trainer's clipping, exactly what BlockAdam steps on). One client, ``method=local`` (no gossip), three steps inside one
block (no switch, so BlockAdam's moments live as long as AdamW's): parameters outside the active block get no gradient,
and torch's AdamW skips a parameter without a gradient (no decay either), as BlockAdam does.

``optim="adamw_torch"``: the Trainer's default ``adamw_torch_fused`` gives the reference torch's fused CPU kernel,
which rounds differently from the single-tensor AdamW (measured: a few 1e-9 on these weights, with equal gradients);
without ``fused`` torch runs the single-tensor AdamW on CPU tensors.

Compared with ``torch.equal``: BlockAdam's AdamW arithmetic is torch's, operation for operation
(``deca_ds.optim.block_adam.adamw_step_``), and the decoupled decay ``x *= 1 - lr * wd`` is its first operation in
both, so the same fp32 operations run in the same order on one thread; any tolerance would hide the very difference
tested (a decay of ``lr * wd = 5e-3`` of a norm weight is far above rounding, but a bit-exact check needs no bound).
"""

import pytest
from dist import run_distributed

pytestmark = pytest.mark.integration

WD, LR, STEPS = 0.5, 1e-2, 3
# Block 0 is decoder layer 0: q/k/v/o and MLP biases and the two RMSNorm weights (not decayed by HF's rule) next to
# the projection weights (decayed). switch_every > STEPS keeps it active for the whole run.
PREFIXES = ["model.layers.0", "model.layers.1", "model.embed_tokens", "model.norm", "lm_head"]
NOT_DECAYED = ["model.layers.0.self_attn.q_proj.bias", "model.layers.0.mlp.down_proj.bias",
               "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"]
DECAYED = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"]


def _tiny_llama_with_biases():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                      tie_word_embeddings=False, attention_bias=True, mlp_bias=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def _args(out, **kw):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=out, max_steps=STEPS, learning_rate=LR, weight_decay=WD,
                             lr_scheduler_type="constant", per_device_train_batch_size=2, max_grad_norm=1.0,
                             save_strategy="no", report_to="none", use_cpu=True, seed=0, logging_steps=1,
                             remove_unused_columns=False, optim="adamw_torch", **kw)


def _train_and_replay(rank, world, tmp, override_all):
    """Train one DecaTrainer client, then replay its gradients through the plain Trainer's AdamW.

    Returns ``{name: (equal, trained, decay_group)}`` for every parameter, the AdamW groups' weight decays, and
    BlockAdam's ``no_decay`` names and group ``weight_decay`` after training.
    """
    import copy

    import torch
    from transformers import Trainer

    from deca_ds.hf import DataCollator, DecaSettings, DecaTrainer

    class Recording(DecaTrainer):
        """DecaTrainer that records, at each BlockAdam step, the rate and the gradients it steps on."""

        seen: list = []

        def create_optimizer(self, model=None):
            opt = super().create_optimizer(model)
            if not self.seen:  # registered after DecaTrainer's own pre-hook: the gradients BlockAdam gets
                names = {p: n for n, p in self.model.named_parameters()}
                opt.register_step_pre_hook(lambda o, a, k: self.seen.append(
                    (o.param_groups[0]["lr"], {names[p]: p.grad.detach().clone() for p in o.active_params()
                                               if p.grad is not None})))
            return opt

        if override_all:  # a user's override of the Trainer's rule is respected
            def get_decay_parameter_names(self, model):
                return [n for n, _ in model.named_parameters()]

    model = _tiny_llama_with_biases()
    ref_model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    rows = [{"input_ids": ids, "labels": ids, "attention_mask": [1] * len(ids)}
            for ids in torch.randint(1, 64, (16, 12), generator=g).tolist()]
    deca = DecaSettings(method="local", blocks={"prefixes": PREFIXES, "switch_every": 10})
    trainer = Recording(model=model, args=_args(f"{tmp}/deca"), train_dataset=rows, data_collator=DataCollator(0),
                        deca=deca)
    trainer.train()
    assert len(Recording.seen) == STEPS

    class Reference(Trainer):
        if override_all:
            def get_decay_parameter_names(self, model):
                return [n for n, _ in model.named_parameters()]

    ref = Reference(model=ref_model, args=_args(f"{tmp}/ref"))
    opt = ref.create_optimizer()
    assert type(opt) is torch.optim.AdamW
    decay_of = {p: group["weight_decay"] for group in opt.param_groups for p in group["params"]}
    named = dict(ref_model.named_parameters())
    for lr, grads in Recording.seen:
        for group in opt.param_groups:
            group["lr"] = lr
        for n, p in named.items():
            p.grad = grads.get(n)
        opt.step()
    start = dict(_tiny_llama_with_biases().named_parameters())
    out = {}
    for n, p in model.named_parameters():
        out[n] = (torch.equal(p.detach(), named[n].detach()), not torch.equal(p.detach(), start[n]),
                  decay_of[named[n]])
    block_adam = trainer.block_optimizer
    return (out, sorted({g["weight_decay"] for g in opt.param_groups if g["params"]}),
            (sorted(block_adam.no_decay), block_adam.param_groups[0]["weight_decay"]))


@pytest.mark.parametrize("override_all", [False, True], ids=["trainer_rule", "user_override"])
def test_weight_decay_follows_the_trainers_decay_parameter_names(tmp_path, override_all):
    """Before: BlockAdam decayed every parameter of the active block, biases and norm weights included, so a
    DecaTrainer client's update differed from the plain Trainer's (and a user's get_decay_parameter_names was
    ignored)."""
    (out, group_decays, (no_decay, group_wd)), = run_distributed(_train_and_replay, 1, str(tmp_path), override_all,
                                                               init=False, timeout=600)
    # HF's two groups (the no-decay one is empty when everything decays).
    assert group_decays == ([WD] if override_all else [0.0, WD])
    for name in NOT_DECAYED + DECAYED:
        equal, trained, decay = out[name]
        assert trained, f"{name} should have been trained (block 0 is active)"
        assert decay == (WD if override_all or name in DECAYED else 0.0), (name, decay)
    # The rule is BlockAdam's own (no_decay = the Trainer's zero-decay group), in one group holding args.weight_decay.
    assert no_decay == sorted(n for n, (_, _, decay) in out.items() if decay == 0.0) and group_wd == WD
    unequal = sorted(n for n, (equal, _, _) in out.items() if not equal)
    assert not unequal, f"parameters whose DecaTrainer update differs from the Trainer's AdamW: {unequal}"

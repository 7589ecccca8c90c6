"""deca_ds.BlockOptimizer against its references: the released BAdam 1.4 (step for step), BAdam's switching rule in
closed form, persistent per-block torch AdamW (offload policy), and a Hugging Face Trainer run.

Equality with badam is asserted bit for bit: both apply the same float32 operations (torch AdamW's single-tensor
kernel on CPU, ``adamw_step_`` written with the same operations) in the same order to identical weights, gradients and
hyperparameters, so IEEE arithmetic gives identical results; any difference is a behaviour difference.
"""

import copy
import importlib.metadata
import io

import pytest
import torch
import transformers as T

from deca_ds import BlockOptimizer
from deca_ds.blocks import partition_blocks
from deca_ds.config import ConfigError
from deca_ds.optim import memory_report
from deca_ds.optim.badam import infer_block_prefixes

LAYERS = 4
HP = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


def tiny_llama(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    cfg = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=128, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    return T.AutoModelForCausalLM.from_config(cfg).to(dtype)


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (2, 8), generator=g) for _ in range(n)]


def trainable(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


def base_adamw(model, kind="adamw", groups=False):
    """The base optimizer as users build it; ``groups``: LLaMA-Factory's decay / no-decay groups."""
    params = model.parameters()
    if groups:
        decay = [p for n, p in model.named_parameters() if "norm" not in n]
        nodecay = [p for n, p in model.named_parameters() if "norm" in n]
        params = [dict(params=nodecay, weight_decay=0.0), dict(params=decay, weight_decay=0.3)]
    if kind == "adam":  # torch.optim.Adam: L2 weight decay added to the gradient
        return torch.optim.Adam(params, **HP)
    return torch.optim.AdamW(params, **HP)


def run(cls, dtype, steps, kind="adamw", groups=False, scheduler=False, **kwargs):
    """Train a fresh tiny Llama for ``steps`` steps; per step: every weight and the trainable names."""
    torch.manual_seed(123)  # random order draws from the global generator: same stream for both optimizers
    model = tiny_llama(dtype)
    opt = cls(base_adamw(model, kind, groups), list(model.named_parameters()), verbose=0, **kwargs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s)) if scheduler else None
    out = []
    for ids in batches(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        if sched:
            sched.step()
        out.append(({n: p.detach().clone() for n, p in model.named_parameters()}, trainable(model)))
    return out


CASES = {
    "defaults": dict(switch_block_every=3),  # descending from the last layer, as BAdam's defaults
    "ascending_embed_head": dict(switch_block_every=3, switch_mode="ascending", include_embedding=True,
                                 include_lm_head=True),
    "random_head_two_rounds": dict(switch_block_every=2, switch_mode="random", include_lm_head=True),
    "fixed": dict(switch_block_every=3, switch_mode="fixed", start_block=2),
    "start_block_active_modules": dict(switch_block_every=4, switch_mode="ascending", start_block=2,
                                       active_modules=["model.norm"]),
    "every_step_groups_scheduler": dict(switch_block_every=1, groups=True, scheduler=True),
    "torch_adam_l2": dict(switch_block_every=3, kind="adam", include_lm_head=True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_equals_badam_1_4_step_for_step(case, dtype, recwarn):
    badam = pytest.importorskip("badam", reason="badam==1.4 is not installed (pip install -e '.[test]')")
    if importlib.metadata.version("badam") != "1.4":
        pytest.skip(f"badam {importlib.metadata.version('badam')} is installed; this parity test is for 1.4")
    steps = 16
    ref = run(badam.BlockOptimizer, dtype, steps, **CASES[case])
    ours = run(BlockOptimizer, dtype, steps, **CASES[case])
    start = {n: p.detach() for n, p in tiny_llama(dtype).named_parameters()}
    blocks_seen = set()
    for t, ((w_ref, tr_ref), (w, tr)) in enumerate(zip(ref, ours)):
        assert tr == tr_ref, f"step {t}: trainable parameters differ"
        for n in w_ref:
            assert torch.equal(w[n], w_ref[n]), f"step {t}: {n} differs from badam"
        blocks_seen.add(tuple(tr))
    # Not vacuous: weights moved and the blocks switched.
    assert any(not torch.equal(ours[-1][0][n], start[n]) for n in start)
    if case != "fixed":
        assert len(blocks_seen) >= 3


def active_sequence(opt, model, steps):
    seq = []
    for ids in batches(steps):
        seq.append(opt.active_block_idx)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    return seq


@pytest.mark.parametrize("mode,start,R", [("descending", None, 3), ("ascending", 1, 3), ("descending", 0, 1),
                                          ("fixed", 2, 2)])
def test_switch_rule_closed_form(mode, start, R):
    """BAdam's rule: first visit R-1 steps (R=1: one), then R each, moving by one block in the switch direction."""
    model = tiny_llama()
    opt = BlockOptimizer(torch.optim.AdamW(model.parameters(), **HP), list(model.named_parameters()),
                         switch_block_every=R, switch_mode=mode, start_block=start, verbose=0)
    B = opt.block_num
    assert B == LAYERS and opt.block_prefix_list == [[f"model.layers.{i}."] for i in range(B)]
    first = start if start is not None else B - 1
    step_dir = {"ascending": 1, "descending": -1, "fixed": 0}[mode]
    expected = []
    for t in range(14):
        visit = (t + 1) // R if R > 1 else t
        expected.append((first + step_dir * visit) % B)
    assert active_sequence(opt, model, 14) == expected


def test_infer_block_prefixes_as_badam():
    names = ["model.embed_tokens.weight", "model.layers.0.a.weight", "model.layers.0.b.weight",
             "model.layers.1.a.weight", "model.norm.weight", "lm_head.weight"]
    assert infer_block_prefixes(names) == [["model.layers.0."], ["model.layers.1."]]
    assert infer_block_prefixes(names, True, True) == [["model.embed_tokens."], ["model.layers.0."],
                                                       ["model.layers.1."], ["model.norm.weight", "lm_head.weight"]]
    # BAdam's quirk, kept: without the embedding block the "lm_head and others" block holds the embeddings.
    assert infer_block_prefixes(names, False, True)[-1] == ["model.embed_tokens.weight", "model.norm.weight",
                                                            "lm_head.weight"]


def test_offload_equals_persistent_adamw_per_block():
    """offload (fp32): each block continues its own AdamW across visits, i.e. one torch AdamW per block."""
    model = tiny_llama()
    ref = copy.deepcopy(model)
    opt = BlockOptimizer(torch.optim.AdamW(model.parameters(), **HP), list(model.named_parameters()),
                         switch_block_every=2, switch_mode="ascending", include_embedding=True, include_lm_head=True,
                         state_policy="offload", verbose=0)
    ref_named = dict(ref.named_parameters())
    ref_opts = {}
    visits = {}
    for t, ids in enumerate(batches(3 * 2 * opt.block_num)):
        b = opt.active_block_idx
        visits[b] = visits.get(b, 0) + (t == 0 or b != prev)
        prev = b
        names = opt.blocks[b].param_names
        if b not in ref_opts:
            ref_opts[b] = torch.optim.AdamW([ref_named[n] for n in names], foreach=False, **HP)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        for p in ref.parameters():
            p.grad = None
        ref(input_ids=ids, labels=ids).loss.backward()
        ref_opts[b].step()
        for n, p in model.named_parameters():
            assert torch.equal(p, ref_named[n]), (t, n)
    assert min(visits.values()) >= 2  # every block came back at least once: its state was restored
    # Inactive blocks' state is parked in host memory, nothing of theirs in opt.state.
    assert set(opt.state_store.blocks()) == set(range(opt.block_num)) - {opt.active_block_idx}
    assert {opt.param_name(p) for p, st in opt.state.items() if st} <= set(opt.active_block.param_names)


def test_offload_int8_quarter_of_fp32_bytes():
    sizes = {}
    for dtype in ("fp32", "int8"):
        model = tiny_llama()
        opt = BlockOptimizer(torch.optim.AdamW(model.parameters(), **HP), list(model.named_parameters()),
                             switch_block_every=1, state_policy="offload", offload_dtype=dtype, verbose=0)
        for ids in batches(opt.block_num):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
        assert torch.isfinite(loss)
        sizes[dtype] = memory_report(opt)["offloaded"]
        assert opt.active_block_idx == LAYERS - 1 and opt.state_store.blocks() == list(range(LAYERS - 1))
    # Per parked tensor: fp32 exp_avg + exp_avg_sq (8 B/value) + the 4-byte step; int8 1 B/value each plus one fp32
    # absmax per 256 values (state_store.QUANT_BLOCKSIZE) each, + the step.
    parked = [p.numel() for n, p in tiny_llama().named_parameters()
              if any(n.startswith(f"model.layers.{i}.") for i in range(LAYERS - 1))]
    assert sizes["fp32"] == sum(8 * n + 4 for n in parked)
    assert sizes["int8"] == sum(2 * n + 2 * 4 * -(-n // 256) + 4 for n in parked)


@pytest.mark.parametrize("kw", [dict(switch_mode="random", state_policy="reset", include_lm_head=True),
                                dict(switch_mode="descending", state_policy="offload", include_embedding=True),
                                dict(switch_mode="random", seed=7, state_policy="offload", offload_dtype="int8")])
def test_state_dict_resumes_bit_identically(kw):
    def build(dtype=torch.bfloat16):
        model = tiny_llama(dtype)
        opt = BlockOptimizer(torch.optim.AdamW(model.parameters(), **HP), list(model.named_parameters()),
                             switch_block_every=3, verbose=0, **kw)
        return model, opt

    def train(model, opt, data):
        for ids in data:
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()

    data = batches(20)
    torch.manual_seed(5)
    model, opt = build()
    train(model, opt, data)
    straight = {n: p.detach().clone() for n, p in model.named_parameters()}

    torch.manual_seed(5)
    model, opt = build()
    train(model, opt, data[:11])
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "model": model.state_dict(), "rng": torch.get_rng_state()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)  # what Hugging Face Trainer does
    model2, opt2 = build()
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    torch.set_rng_state(ckpt["rng"])
    assert opt2.global_step == 11 and opt2.active_block_idx == opt.active_block_idx
    assert trainable(model2) == trainable(model)
    train(model2, opt2, data[11:])
    for n, p in model2.named_parameters():
        assert torch.equal(p, straight[n]), n


def test_partition_blocks_input_for_models_badam_cannot_infer():
    cfg = T.GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=128, n_positions=64)
    model = T.GPT2LMHeadModel(cfg)
    named = list(model.named_parameters())
    with pytest.raises(ConfigError, match="partition_blocks"):
        BlockOptimizer(torch.optim.AdamW(model.parameters()), named, verbose=0)
    part = partition_blocks(model, include_embeddings=True, include_lm_head=True)
    opt = BlockOptimizer(torch.optim.AdamW(model.parameters()), named, block_prefix_list=part, verbose=0)
    assert opt.block_num == len(part) and opt.active_block.param_names == part[-1].param_names  # descending
    assert trainable(model) == list(part[-1].param_names)


def test_refusals_are_one_line_config_errors(monkeypatch):
    model = tiny_llama()
    named = list(model.named_parameters())

    def make(base=None, named=named, **kw):
        return BlockOptimizer(base or torch.optim.AdamW(model.parameters()), named, verbose=0, **kw)

    cases = [
        (dict(ds_zero3_enabled=True), "ZeRO-3 path"),
        (dict(base=torch.optim.SGD(model.parameters(), lr=0.1)), "torch.optim.AdamW or torch.optim.Adam"),
        (dict(base=torch.optim.AdamW(model.parameters(), amsgrad=True)), "amsgrad"),
        (dict(switch_mode="cyclic"), "switch_mode='cyclic'"),
        (dict(switch_mode="fixed"), "start_block"),
        (dict(switch_mode="random", start_block=1), "start_block"),
        (dict(start_block=LAYERS), "start_block=4 is out of range"),
        (dict(block_prefix_list=[["model.layers.0."], ["model.layers.0.mlp"]]), "more than one block"),
        (dict(block_prefix_list=[["model.layers.0."], ["nothing"]]), "holds no parameters"),
        (dict(named=[("base_model.layers.0.q_proj.lora_A.weight", named[1][1])]), "LoRA"),
    ]
    for kw, match in cases:
        with pytest.raises(ConfigError, match=match) as e:
            make(**kw)
        assert "\n" not in str(e.value)
    # Several processes: DDP would average the first block only.
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    with pytest.raises(ConfigError, match="2 processes"):
        make()


def test_refuses_zero_and_deepspeed_mixed_precision_from_hf_config():
    """ZeRO or DeepSpeed's bf16 optimizer, announced through transformers' DeepSpeed config (Trainer --deepspeed)."""
    pytest.importorskip("accelerate", reason="transformers' HfDeepSpeedConfig needs accelerate (pip install -e "
                        "'.[test]')")
    from transformers.integrations import HfDeepSpeedConfig

    model = tiny_llama()
    for ds, match in [({"zero_optimization": {"stage": 3}}, "stage=3"), ({"zero_optimization": {"stage": 2}},
                                                                         "stage=2"),
                      ({"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}}, "bf16.enabled")]:
        keep = HfDeepSpeedConfig(ds)  # noqa: F841 (transformers holds a weak reference to it)
        with pytest.raises(ConfigError, match=match):
            BlockOptimizer(torch.optim.AdamW(model.parameters()), list(model.named_parameters()), verbose=0)
        del keep
    # The config is gone: accepted again.
    BlockOptimizer(torch.optim.AdamW(model.parameters()), list(model.named_parameters()), verbose=0)


def test_refuses_when_deepspeed_replaced_the_parameters():
    model = tiny_llama()
    opt = BlockOptimizer(torch.optim.AdamW(model.parameters()), list(model.named_parameters()), verbose=0)
    # What DeepSpeed's ZeRO / bf16 optimizers do at initialize: the groups get flat fp32 partitions.
    for g in opt.param_groups:
        g["params"] = [torch.zeros(sum(p.numel() for p in g["params"]), requires_grad=True)]
    ids = batches(1)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(ConfigError, match="DeepSpeed"):
        opt.step()


def test_warns_that_group_weight_decay_is_not_honoured():
    model = tiny_llama()
    with pytest.warns(UserWarning, match=r"weight_decay in \['0.0', '0.3'\].*weight_decay=0.1"):
        BlockOptimizer(base_adamw(model, groups=True), list(model.named_parameters()), verbose=0)


def test_messages_go_to_log_fn():
    model = tiny_llama()
    lines = []
    opt = BlockOptimizer(torch.optim.AdamW(model.parameters()), list(model.named_parameters()),
                         switch_block_every=2, log_fn=lines.append)
    last = [p.numel() for n, p in model.named_parameters() if n.startswith(f"model.layers.{LAYERS - 1}.")]
    assert lines == [f"deca_ds.BlockOptimizer: step 0: training block {LAYERS - 1} (model.layers.{LAYERS - 1}; "
                     f"{len(last)} tensors, {sum(last):,} params)"]
    active_sequence(opt, model, 1)
    assert len(lines) == 2 and "step 1: training block 2" in lines[1]


# ------------------------------------------------------------------------------------------------ HF Trainer


class TokenRows(torch.utils.data.Dataset):
    def __init__(self, n):
        self.rows = [ids[0] for ids in batches(n, seed=3)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


class RecordBlocks(T.TrainerCallback):
    """Per optimizer step: the block active before it and the parameter names whose weights changed."""

    def __init__(self, model, opt):
        self.model, self.opt, self.steps, self.lrs = model, opt, [], []

    def on_step_begin(self, args, state, control, **kw):
        self.block = self.opt.active_block_idx
        self.lrs.append(self.opt.param_groups[0]["lr"])
        self.before = {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def on_step_end(self, args, state, control, **kw):
        changed = [n for n, p in self.model.named_parameters() if not torch.equal(p, self.before[n])]
        self.steps.append((self.block, changed))


def test_hf_trainer_single_client_llama_factory_style(tmp_path):
    """LLaMA-Factory's use_badam path: Trainer + BlockOptimizer(base AdamW, named params, switch every R)."""
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (pip install -e '.[test]')")
    R, steps = 3, 9
    model = tiny_llama()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = BlockOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0),
                         list(model.named_parameters()), switch_block_every=R, switch_mode="descending", verbose=0)
    args = T.TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=2,
                               learning_rate=1e-2, lr_scheduler_type="linear", use_cpu=True, report_to=[],
                               save_strategy="no", logging_strategy="no", seed=0, dataloader_num_workers=0)
    rec = RecordBlocks(model, opt)
    trainer = T.Trainer(model=model, args=args, train_dataset=TokenRows(2 * steps), optimizers=(opt, None),
                        callbacks=[rec])
    trainer.train()
    blocks = [b for b, _ in rec.steps]
    assert blocks == [3, 3, 2, 2, 2, 1, 1, 1, 0]  # BAdam's counting: the first visit is R-1 steps
    for t, (b, changed) in enumerate(rec.steps):
        assert changed and set(changed) <= set(opt.blocks[b].param_names), (t, b, changed)
    untouched = [n for n, p in model.named_parameters() if torch.equal(p, start[n])]
    assert "model.embed_tokens.weight" in untouched and "lm_head.weight" in untouched  # not blocks (BAdam default)
    # The Trainer's linear schedule (no warmup) drove the learning rate through param_groups[0].
    assert rec.lrs == pytest.approx([1e-2 * (steps - t) / steps for t in range(steps)], rel=1e-12)


def test_hf_trainer_checkpoint_resume_is_exact(tmp_path):
    """Trainer saves optimizer.state_dict() and reloads it with weights_only=True; offloaded blocks come back."""
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (pip install -e '.[test]')")
    steps = 12  # visits (R=2): block 3 x1, 2, 1, 0, 3, 2, 1 x1: blocks 3 and 2 return after the checkpoint at 5

    def train(out, save_steps=None, resume=None):
        model = tiny_llama()
        opt = BlockOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0),
                             list(model.named_parameters()), switch_block_every=2, state_policy="offload", verbose=0)
        args = T.TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=2,
                                   learning_rate=1e-2, use_cpu=True, report_to=[], logging_strategy="no", seed=0,
                                   save_strategy="steps" if save_steps else "no", save_steps=save_steps or steps)
        trainer = T.Trainer(model=model, args=args, train_dataset=TokenRows(2 * steps), optimizers=(opt, None))
        trainer.train(resume_from_checkpoint=resume)
        return {n: p.detach().clone() for n, p in model.named_parameters()}, opt

    straight, _ = train(tmp_path / "a")
    train(tmp_path / "b", save_steps=5)
    resumed, opt = train(tmp_path / "b", save_steps=5, resume=str(tmp_path / "b" / "checkpoint-5"))
    assert opt.global_step == steps and opt.state_store.blocks() == [0, 2, 3]
    for n in straight:
        assert torch.equal(resumed[n], straight[n]), n

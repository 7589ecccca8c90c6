"""deca_ds.hf without processes: settings, the batch sampler against the launcher's batches, the DeepSpeed checks
and the per-client arguments. The Trainer runs themselves are in tests/integration/test_hf_trainer.py."""

import io
import pickle
import types

import pytest
import torch

from deca_ds.config import ConfigError
from deca_ds.gossip import ClientLayout
from deca_ds.hf import (ClientBatchSampler, DataCollator, DecaSettings, _check_trainer_ds_config, _client_args,
                        schedule_arguments)


def training_args(**kw):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=kw.pop("output_dir", "unused"), report_to="none", use_cpu=True, **kw)


def test_settings_map_onto_the_recipe_keys():
    deca = DecaSettings(method="badam_gossip", blocks={"layers_per_block": 2, "switch_every": 48},
                        topology={"name": "erdos_renyi", "p": 0.3}, clients=2, overrides=["gossip.dtype=bf16"])
    c = deca.config
    assert (c.method, c.blocks.layers_per_block, c.blocks.switch_every) == ("badam_gossip", 2, 48)
    assert (c.topology.name, c.topology.p, c.clients.ranks_per_client, c.gossip.dtype) == ("erdos_renyi", 0.3, 2,
                                                                                           "bf16")
    assert DecaSettings(topology="exponential").config.topology.name == "exponential"
    with pytest.raises(ConfigError, match="blocks.switch_evry"):
        DecaSettings(blocks={"switch_evry": 4})
    with pytest.raises(ConfigError, match="method=centralized is the plain Trainer"):
        DecaSettings(method="centralized")


def test_training_arguments_own_the_optimizer_and_the_run():
    args = training_args(output_dir="runs/x", learning_rate=2e-5, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6,
                         weight_decay=0.1, seed=7, max_steps=30)
    cfg = DecaSettings().resolve(args)
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.eps, cfg.optim.weight_decay) == (2e-5, [0.8, 0.95], 1e-6, 0.1)
    assert (cfg.seed, cfg.max_steps, cfg.output_dir) == (7, 30, "runs/x")


def test_from_argv_splits_deca_settings_from_trainer_flags(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: local\n")
    deca, rest = DecaSettings.from_argv(["--output_dir", "o", "topology.name=star", "--deca_config", str(recipe),
                                         "--learning_rate=1e-4"])
    assert rest == ["--output_dir", "o", "--learning_rate=1e-4"]
    assert (deca.config.method, deca.config.topology.name) == ("local", "star")


@pytest.mark.parametrize("rpc,local_rank,gas", [(1, 0, 1), (2, 1, 3), (3, 2, 2)])
def test_sampler_draws_the_launchers_batches(rpc, local_rank, gas):
    """The launcher cuts micro-batch m of step s as batch_for_step(train, (s*gas + m)*rpc + local_rank, ...)
    (deca_ds.trainer.LauncherDriver._micro_batches); the sampler must give the same rows, across Trainer epochs."""
    from deca_ds.data import batch_for_step

    n, mbs, seed, client = 37, 4, 42, 1
    layout = ClientLayout(world_size=rpc * 3, rank=client * rpc + local_rank, ranks_per_client=rpc)
    rows = {"input_ids": [[i + 1] for i in range(n)], "labels": [[i + 1] for i in range(n)],
            "attention_mask": [[1] for _ in range(n)]}
    sampler = ClientBatchSampler(n, mbs, gas, seed, layout)
    assert len(sampler) % gas == 0
    drawn = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        drawn += list(sampler)
    for k, idx in enumerate(drawn):
        step, micro = divmod(k, gas)
        ref = batch_for_step(rows, (step * gas + micro) * rpc + layout.local_rank, mbs, seed, client, pad_id=0)
        assert ref["input_ids"][:, 0].tolist() == [i + 1 for i in idx], (k, step, micro)


def test_collator_pads_as_the_recipe():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "attention_mask": [1, 1, 1]},
            {"input_ids": [8], "labels": [8], "attention_mask": [1]}]
    batch = DataCollator(pad_token_id=0)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


@pytest.mark.parametrize("ds,match", [
    ({"zero_optimization": {"stage": 2}}, "ZeRO stage 0.*recipes/finetune.py"),
    ({"bf16": {"enabled": True}}, "load the model in bf16"),
    ({"optimizer": {"type": "AdamW"}}, "optimizer"),
    ({"zero_optimization": {"stage": 0, "offload_param": {"device": "cpu"}}}, "offload_param"),
])
def test_deepspeed_settings_the_trainer_path_cannot_honour_are_refused(ds, match):
    with pytest.raises(ConfigError, match=match):
        _check_trainer_ds_config(ds, DecaSettings().config, world_size=4, micro=8, gas=1)


@pytest.mark.parametrize("ds,match", [
    # Refused by deepspeed.initialize inside trainer.train(), as a pydantic/assertion traceback on every rank.
    ({"zero_optimization": {"stage": 0, "stgae": 0}}, "zero_optimization.stgae is refused by DeepSpeed"),
    ({"scheduler": {"type": "WarmupLRR", "params": {}}}, "did you mean 'WarmupLR'"),
])
def test_deepspeed_settings_deepspeed_refuses_are_refused_at_construction(ds, match):
    with pytest.raises(ConfigError, match=match):
        _check_trainer_ds_config(ds, DecaSettings().config, world_size=4, micro=8, gas=1)


def test_hf_auto_config_passes_deepspeeds_reading_inside_a_process_group(monkeypatch):
    """The Trainer path checks after init_distributed: DeepSpeedConfig must not read the batch keys against the
    launch's world size (once: 'train_batch_size is not equal to ... 8 != 8 * 1 * 2' for every 2-rank launch)."""
    import json

    import deepspeed.comm

    from deca_ds.ds_config import REPO_DS_CONFIGS

    monkeypatch.setattr(deepspeed.comm, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(deepspeed.comm, "get_world_size", lambda *a, **k: 4)
    ds = json.loads((REPO_DS_CONFIGS / "hf_auto.json").read_text())
    _check_trainer_ds_config(ds, DecaSettings().config, world_size=4, micro=8, gas=2)


def test_hf_auto_config_passes_the_checks():
    import json

    from deca_ds.ds_config import REPO_DS_CONFIGS

    ds = json.loads((REPO_DS_CONFIGS / "hf_auto.json").read_text())
    _check_trainer_ds_config(ds, DecaSettings().config, world_size=4, micro=8, gas=2)


def test_every_client_saves_its_own_checkpoints_and_the_args_pickle_plainly():
    from transformers import TrainingArguments

    writer = _client_args(training_args(output_dir="runs/x"), True, "runs/x/client_1")
    other = _client_args(training_args(output_dir="runs/x"), False, "runs/x/client_1")
    assert writer.should_save is True and other.should_save is False  # not "world rank 0 only"
    assert writer.output_dir == "runs/x/client_1"
    buf = io.BytesIO()
    torch.save(writer, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded) is TrainingArguments and loaded.output_dir == "runs/x/client_1"
    assert "_deca_writer" not in vars(pickle.loads(pickle.dumps(writer)))


# --- the learning-rate schedule: the Trainer's scheduler owns it, deca_ds's settings must agree ----------------------


@pytest.mark.parametrize("overrides", [
    [],
    ["optim.warmup_steps=4"],                          # HF: constant_with_warmup (HF's "constant" ignores warm-up)
    ["optim.schedule=linear", "optim.warmup_ratio=0.25"],
    ["optim.schedule=cosine", "optim.warmup_steps=3"],
    ["optim.schedule=cosine"],
])
def test_schedule_arguments_give_the_trainer_the_recipes_rates(overrides):
    """The Trainer's own scheduler, built from schedule_arguments(cfg) as Trainer.create_scheduler builds it, gives
    BlockAdam the rate deca_ds.lr_schedule.lr_at gives the recipe at every step. Both evaluate the same float
    expression (base rate times the same factor), so they are compared with ==."""
    from transformers import get_scheduler

    from deca_ds.config import load_config
    from deca_ds.lr_schedule import lr_at

    cfg = load_config(None, overrides + ["max_steps=17", "optim.lr=2e-3"])
    kwargs = schedule_arguments(cfg)
    args = training_args(learning_rate=cfg.optim.lr, **kwargs)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=cfg.optim.lr)
    sched = get_scheduler(args.lr_scheduler_type, opt, num_warmup_steps=args.get_warmup_steps(args.max_steps),
                          num_training_steps=args.max_steps)
    seen = []
    for _ in range(cfg.max_steps):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == [lr_at(cfg, s) for s in range(cfg.max_steps)]
    # ... and the settings the Trainer reads back are the recipe's (nothing is changed or applied twice).
    resolved = DecaSettings(overrides=overrides).resolve(args).optim
    assert (resolved.schedule, resolved.warmup_steps, resolved.warmup_ratio) == (
        cfg.optim.schedule, cfg.optim.warmup_steps, cfg.optim.warmup_ratio)


def test_the_trainers_schedule_and_epochs_are_taken_into_the_settings():
    cfg = DecaSettings().resolve(training_args(lr_scheduler_type="cosine", warmup_steps=5, max_steps=40))
    assert (cfg.optim.schedule, cfg.optim.warmup_steps, cfg.epochs, cfg.max_steps) == ("cosine", 5, None, 40)
    cfg = DecaSettings().resolve(training_args(lr_scheduler_type="constant", warmup_steps=5, max_steps=40))
    assert (cfg.optim.schedule, cfg.optim.warmup_steps) == ("constant", 0)  # what HF's constant schedule does
    cfg = DecaSettings().resolve(training_args(num_train_epochs=2.5))  # HF's defaults: linear, epochs
    assert (cfg.optim.schedule, cfg.epochs) == ("linear", 2.5)
    # A schedule deca_ds has no name for stays the Trainer's; the settings keep their (unused) constant.
    cfg = DecaSettings().resolve(training_args(lr_scheduler_type="inverse_sqrt", max_steps=10))
    assert cfg.optim.schedule == "constant"


@pytest.mark.parametrize("overrides,kw,match", [
    (["optim.schedule=cosine"], {"lr_scheduler_type": "linear", "max_steps": 10},
     "optim.schedule=cosine.*disagrees with TrainingArguments lr_scheduler_type=linear.*--lr_scheduler_type cosine"),
    (["optim.warmup_steps=4"], {"lr_scheduler_type": "constant", "max_steps": 10},
     "--lr_scheduler_type constant_with_warmup --warmup_steps 4"),
    (["optim.schedule=linear", "optim.warmup_steps=4"], {"lr_scheduler_type": "linear", "warmup_steps": 2,
                                                         "max_steps": 10}, "warmup_steps 2"),
    (["epochs=2"], {"lr_scheduler_type": "constant", "max_steps": 10},
     "epochs=2 disagrees.*--num_train_epochs 2 --max_steps -1"),
    (["epochs=2"], {"lr_scheduler_type": "constant", "num_train_epochs": 3}, "epochs=2 disagrees"),
])
def test_a_deca_schedule_the_trainer_does_not_run_is_refused(overrides, kw, match):
    with pytest.raises(ConfigError, match=match):
        DecaSettings(overrides=overrides).resolve(training_args(**kw))


def test_an_agreeing_deca_schedule_is_accepted():
    cfg = DecaSettings(overrides=["optim.schedule=cosine", "optim.warmup_steps=3", "epochs=2"]).resolve(
        training_args(lr_scheduler_type="cosine", warmup_steps=3, num_train_epochs=2))
    assert (cfg.optim.schedule, cfg.optim.warmup_steps, cfg.epochs) == ("cosine", 3, 2.0)


def test_trainer_path_gathers_figures_only_at_log_steps_and_keeps_a_nonfinite_step(tmp_path, monkeypatch):
    """With log_every=4, 8 steps: two all-gathers (steps 3 and 7), and a non-finite step 5 is reported at step 7."""
    import json
    import types

    import deca_ds.hf as hf
    from deca_ds.config import load_config

    gathers = []

    def all_gather(rows, t):
        gathers.append(t.clone())
        rows[0].copy_(t)

    monkeypatch.setattr(hf.dist, "all_gather", all_gather)
    monkeypatch.setattr(hf.dist, "get_world_size", lambda: 1)
    monkeypatch.setattr(hf.dist, "get_rank", lambda: 0)
    fake = types.SimpleNamespace(deca_config=load_config(None, ["log_every=4"]), layout=ClientLayout(1, 0, 1),
                                 run_dir=tmp_path, _writer=None, _t0=0.0, _micro_losses=[],
                                 _nonfinite_since_log=False)
    for step in range(8):
        fake._micro_losses = [torch.tensor(float(step))]
        fake._step_figures = {"block": 0, "nonfinite": step == 5, "bytes_sent": 10 * step}
        hf.DecaTrainerMixin._record_step(fake, step, lr=1e-3)
    fake._writer.close()
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(gathers) == 2 and [r["step"] for r in recs] == [3, 7]
    assert [r["nonfinite"] for r in recs] == [False, True]
    assert [r["loss"] for r in recs] == [3.0, 7.0] and [r["bytes_sent"] for r in recs] == [30, 70]


# --- Trainer inputs DecaTrainer would ignore or mis-handle: refused at construction, before any process group -------


@pytest.mark.parametrize("kw,match", [
    ({"args_kw": {"optim": "sgd"}}, "optim=sgd.*use --optim adamw_torch"),
    ({"args_kw": {"optim": "adafactor"}}, "optim=adafactor"),
    ({"args_kw": {"optim_args": "momentum=0.9"}}, "optim_args='momentum=0.9' would be ignored.*drop --optim_args"),
    ({"args_kw": {"fp16": True}}, "fp16=True is not supported.*use --bf16"),
    ({"optimizer": True}, "optimizers=/optimizer_cls_and_kwargs= cannot be used.*learning_rate"),
    ({"optimizer_positional": True}, "optimizers=/optimizer_cls_and_kwargs= cannot be used"),
    ({"trainer_kw": {"optimizer_cls_and_kwargs": (torch.optim.SGD, {"lr": 0.1})}}, "optimizer_cls_and_kwargs"),
])
def test_optimizer_and_precision_inputs_the_trainer_would_ignore_are_refused(kw, match, monkeypatch):
    """Before this check: optim/optim_args/optimizer_cls_and_kwargs were silently replaced by BlockAdam, a user
    optimizer crashed at the first clipping (AttributeError: no block_optimizer), and fp16 clipped the loss-scaled
    gradients (BlockAdam got them 1/scale too small) and let the scaler skip one client's gossip."""
    import deca_ds.hf as hf

    def no_process_group(*a, **k):
        raise AssertionError("the refusal must come before the process group is started")

    monkeypatch.setattr(hf, "init_distributed", no_process_group)
    model = torch.nn.Linear(2, 2)
    args = training_args(max_steps=4, **kw.get("args_kw", {}))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match=match):
        if kw.get("optimizer_positional"):  # Trainer(model, args, collator, train, eval, processing_class, model_init,
            hf.DecaTrainer(model, args, None, None, None, None, None, None, None, None, (opt, None))  # ... optimizers)
        else:
            hf.DecaTrainer(model=model, args=args, optimizers=(opt, None) if kw.get("optimizer") else (None, None),
                           **kw.get("trainer_kw", {}))


def test_adamw_optim_names_and_bf16_are_accepted():
    from deca_ds.hf import _check_trainer_arguments

    for optim in ("adamw_torch", "adamw_torch_fused"):
        _check_trainer_arguments(training_args(optim=optim, max_steps=4), {"optimizers": (None, None)})
    _check_trainer_arguments(training_args(bf16=True, max_steps=4), {})


def test_a_new_run_in_an_output_dir_holding_a_run_is_refused_and_nothing_is_changed(tmp_path, monkeypatch):
    """Before this check a second run without resume_from_checkpoint rewrote metrics.jsonl and same-numbered
    checkpoints and left the first run's later checkpoints, which resume_from_checkpoint=True then picked up."""
    import deca_ds.hf as hf

    reduced = []
    monkeypatch.setattr(hf.dist, "all_reduce", lambda t, op=None: reduced.append(op))

    class Base:
        def train(self, *args, **kwargs):
            return "trained"

    trainer = object.__new__(type("FakeDecaTrainer", (hf.DecaTrainerMixin, Base), {}))
    trainer.run_dir, trainer.args = tmp_path, training_args(max_steps=4)
    trainer._agree_on_evaluation = lambda: None  # the evaluation settings' collective (tests/unit/test_hf_evaluate.py)
    trainer.accelerator = types.SimpleNamespace()  # train() shadows its gather (the client's ranks)
    assert trainer.train() == "trained" and reduced == [hf.dist.ReduceOp.MAX]  # an empty output_dir: a new run
    ck = tmp_path / "client_1" / "checkpoint-20"
    ck.mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"already holds a DecaTrainer run \(client_1/checkpoint-20\): pass "
                                          "resume_from_checkpoint=True"):
        trainer.train()
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "client": 0, "loss": 1.0}\n')
    with pytest.raises(ConfigError, match=r"\(metrics.jsonl, client_1/checkpoint-20\)"):
        trainer.train(resume_from_checkpoint=None)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 0, "client": 0, "loss": 1.0}\n' and ck.is_dir()
    trainer._common_checkpoint = lambda: str(ck)  # the collective choice of a step (tested below)
    assert trainer.train(resume_from_checkpoint=True) == "trained" and trainer.train(str(ck)) == "trained"
    # A path that is not there: the Trainer's bare "Can't find a valid checkpoint" ValueError on every rank, after
    # the process group, model and data were built.
    for missing in (str(tmp_path / "client_0" / "checkpoint-99"), str(tmp_path / "metrics.jsonl")):
        with pytest.raises(ConfigError, match="is not a checkpoint directory: give .*client_<c>/checkpoint-<N>"):
            trainer.train(resume_from_checkpoint=missing)


def test_resume_true_takes_the_latest_step_every_client_has_complete(tmp_path, monkeypatch):
    """Before, each rank took its own latest checkpoint directory (the Trainer's get_last_checkpoint): after a kill
    during a save the clients resumed at different steps, and a client without any raised alone while the others
    waited in the first gossip exchange until the timeout."""
    import deca_ds.hf as hf
    from deca_ds.gossip import ClientLayout

    others: list[list[int]] = []  # the steps the other ranks report (world ranks 1..)

    def gather(out, obj):
        out[:] = [obj] + others

    monkeypatch.setattr(hf.dist, "all_gather_object", gather)
    monkeypatch.setattr(hf.dist, "get_world_size", lambda: 1 + len(others))

    class Base:
        def train(self, *args, **kwargs):
            return args, kwargs

    trainer = object.__new__(type("FakeDecaTrainer", (hf.DecaTrainerMixin, Base), {}))
    trainer._agree_on_evaluation = lambda: None  # the evaluation settings' collective (tests/unit/test_hf_evaluate.py)
    trainer.accelerator = types.SimpleNamespace()  # train() shadows its gather (the client's ranks)
    client = tmp_path / "client_0"
    trainer.run_dir, trainer.args = tmp_path, training_args(max_steps=40, output_dir=str(client))
    for n in (10, 20, 30):
        (client / f"checkpoint-{n}").mkdir(parents=True)
        (client / f"checkpoint-{n}" / "trainer_state.json").write_text("{}")
        (client / f"checkpoint-{n}" / hf.DECA_STATE_NAME).write_bytes(b"x")
    (client / "checkpoint-30" / "trainer_state.json").unlink()  # a save killed before the Trainer's last file
    (client / "checkpoint-x").mkdir()
    others[:] = [[10, 20], [10, 20, 30], [10]]
    trainer.layout = ClientLayout(4, 0, ranks_per_client=2)  # ranks 0,1 = client 0; ranks 2,3 = client 1
    assert trainer.train(resume_from_checkpoint=True) == ((), {"resume_from_checkpoint": str(client / "checkpoint-10")})
    others[:] = [[10, 20], [10, 20, 30], [20, 30]]
    assert trainer.train(True) == ((), {"resume_from_checkpoint": str(client / "checkpoint-20")})
    others[:] = [[10, 20], [], [20]]
    with pytest.raises(ConfigError, match=r"resume_from_checkpoint=True: client\(s\) \[1\] have no complete "
                                          r"checkpoint .*start a new run in another output_dir"):
        trainer.train(resume_from_checkpoint=True)
    others[:] = [[10, 20], [30], [30]]
    with pytest.raises(ConfigError, match=r"share no checkpoint step \(latest per client: \{0: 20, 1: 30\}\)"):
        trainer.train(resume_from_checkpoint=True)
    # A path is the user's choice and passes through unchanged; no collective is needed for it.
    monkeypatch.setattr(hf.dist, "all_gather_object", None)
    assert trainer.train(str(client / "checkpoint-30")) == ((str(client / "checkpoint-30"),), {})
    assert sorted(p.name for p in client.iterdir()) == ["checkpoint-10", "checkpoint-20", "checkpoint-30",
                                                        "checkpoint-x"]


def test_compute_loss_func_items_are_counted_over_the_clients_ranks_only(monkeypatch):
    """Before, the Trainer gathered the item count over the whole world (average_tokens_across_devices): each
    client's compute_loss_func loss was divided by every client's tokens, through a world collective each step."""
    import types

    import deca_ds.hf as hf

    args = _client_args_of(training_args(max_steps=4))
    assert args.average_tokens_across_devices is False

    reduced = []

    def all_reduce(t, group=None):
        reduced.append(group)
        t.add_(torch.tensor(30.0))  # the client's other rank counted 30 items

    monkeypatch.setattr(hf.dist, "all_reduce", all_reduce)

    class Base:
        def _get_num_items_in_batch(self, batch_samples, device):
            return sum(b["labels"][..., 1:].ne(-100).sum() for b in batch_samples) if batch_samples else None

    trainer = object.__new__(type("FakeDecaTrainer", (hf.DecaTrainerMixin, Base), {}))
    labels = torch.tensor([[5, 6, 7, -100], [5, 6, -100, -100]])  # 2 + 1 items after the shift
    trainer.layout, trainer.groups = ClientLayout(2, 0, 1), types.SimpleNamespace(client_group="client")
    assert int(trainer._get_num_items_in_batch([{"labels": labels}], "cpu")) == 3 and reduced == []
    trainer.layout = ClientLayout(4, 1, 2)  # 2 ranks per client: the mean count over the client's ranks
    n = trainer._get_num_items_in_batch([{"labels": labels}], "cpu")
    assert reduced == ["client"] and n.dtype == torch.float32 and float(n) == (3 + 30) / 2
    assert trainer._get_num_items_in_batch([], "cpu") is None


def test_items_are_counted_over_the_clients_ranks_on_transformers_4(monkeypatch):
    """transformers 4.x (4.56, 4.57) counts the items in ``get_batch_samples`` and has no ``_get_num_items_in_batch``:
    the count must still be the client's (before, 4.x divided a rank's summed loss by that rank's own count)."""
    import types

    import deca_ds.hf as hf

    reduced = []

    def all_reduce(t, group=None):
        reduced.append(group)
        t.add_(torch.tensor(30.0))  # the client's other rank counted 30 items

    monkeypatch.setattr(hf.dist, "all_reduce", all_reduce)

    class Trainer4:  # the 4.x shape: the count comes back with the batches
        def get_batch_samples(self, epoch_iterator, num_batches, device):
            batches = [next(epoch_iterator) for _ in range(num_batches)]
            return batches, sum(b["labels"][..., 1:].ne(-100).sum() for b in batches)

    trainer = object.__new__(type("FakeDecaTrainer", (hf.DecaTrainerMixin, Trainer4), {}))
    trainer.layout, trainer.groups = ClientLayout(4, 1, 2), types.SimpleNamespace(client_group="client")
    labels = torch.tensor([[5, 6, 7, -100], [5, 6, -100, -100]])  # 2 + 1 items after the shift
    batches, n = trainer.get_batch_samples(iter([{"labels": labels}]), 1, "cpu")
    assert len(batches) == 1 and reduced == ["client"] and float(n) == (3 + 30) / 2


@pytest.mark.parametrize("clips_itself", [False, True])
def test_the_trainers_clipping_is_the_clients_on_transformers_4_and_5(clips_itself):
    """transformers 5.x clips through ``Trainer._clip_grad_norm`` (overridden: the client's average, then
    DeepSpeed's arithmetic); 4.x calls ``accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)`` in its
    loop, which clipped each rank's own gradients before the client's average (ranks_per_client 2 under torchrun
    left recipes/finetune.py from the second step). Without DeepSpeed that call now reaches ``_clip_grad_norm``."""
    import types

    import deca_ds.hf as hf

    def world_clip(parameters, max_norm, norm_type=2):
        raise AssertionError("clipped each rank's own gradients")

    base = type("Base", (), {"_clip_grad_norm": lambda self, model: None} if clips_itself else {})
    trainer = object.__new__(type("FakeDecaTrainer", (hf.DecaTrainerMixin, base), {}))
    trainer.accelerator = types.SimpleNamespace(prepare_model=lambda *a, **k: None, clip_grad_norm_=world_clip)
    calls = []
    trainer._clip_grad_norm = lambda model: calls.append(model) or 0.5
    trainer._no_world_ddp()
    if clips_itself:  # 5.x: nothing calls the accelerator's clipping without DeepSpeed; left as it was
        assert trainer.accelerator.clip_grad_norm_ is world_clip
    else:
        assert trainer.accelerator.clip_grad_norm_([torch.zeros(1)], 1.0) == 0.5 and calls == [None]


def _client_args_of(args):
    from deca_ds.hf import _client_args

    return _client_args(args, True, "unused")

"""deca_ds.hf evaluation without processes: the agreed best-model metric, the evaluation-settings check and the
one-process gather. The 2-client run is tests/integration/test_hf_best_model.py."""

import math
import types

import pytest
import torch

import deca_ds.hf as hf
from deca_ds.config import ConfigError
from deca_ds.gossip import ClientLayout


def training_args(**kw):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir="unused", report_to="none", use_cpu=True, max_steps=8, **kw)


def fake_trainer(layout, **args_kw):
    trainer = object.__new__(hf.DecaTrainer)
    trainer.layout, trainer.args = layout, training_args(**args_kw)
    return trainer


def all_gather_of(rows_by_rank, calls):
    """A dist.all_gather whose other ranks contributed ``rows_by_rank[r]`` (None: this rank's own tensor)."""

    def all_gather(out, t):
        calls.append(t.clone())
        for r, row in enumerate(rows_by_rank):
            out[r].copy_(t if row is None else torch.tensor(row, dtype=t.dtype))

    return all_gather


def test_the_metric_is_the_mean_over_one_rank_per_client(monkeypatch):
    # 2 clients x 2 ranks; this is rank 0 (client 0). Rank 1's value (client 0's second rank) is not counted.
    calls = []
    monkeypatch.setattr(hf.dist, "get_world_size", lambda: 4)
    monkeypatch.setattr(hf.dist, "all_gather", all_gather_of([None, [1.0, 100.0], [1.0, 0.25], [1.0, 100.0]], calls))
    trainer = fake_trainer(ClientLayout(4, 0, 2), metric_for_best_model="loss")
    metrics = {"eval_loss": 1.5, "eval_accuracy": 0.5}
    trainer._agree_on_best_metric(metrics)
    assert metrics == {"eval_loss": (1.5 + 0.25) / 2, "eval_loss_client": 1.5, "eval_accuracy": 0.5}
    assert len(calls) == 1 and calls[0].tolist() == [1.0, 1.5]


def test_no_collective_without_the_metric_or_with_one_client(monkeypatch):
    monkeypatch.setattr(hf.dist, "all_gather", None)  # would raise if called
    metrics = {"eval_loss": 1.5}
    fake_trainer(ClientLayout(2, 0, 1))._agree_on_best_metric(metrics)  # metric_for_best_model unset
    fake_trainer(ClientLayout(1, 0, 1), metric_for_best_model="loss")._agree_on_best_metric(metrics)
    assert metrics == {"eval_loss": 1.5}


def test_a_metric_missing_everywhere_is_left_alone_and_missing_somewhere_is_refused(monkeypatch):
    monkeypatch.setattr(hf.dist, "get_world_size", lambda: 2)
    trainer = fake_trainer(ClientLayout(2, 0, 1), metric_for_best_model="eval_score")
    monkeypatch.setattr(hf.dist, "all_gather", all_gather_of([None, [0.0, 0.0]], []))
    metrics = {"eval_data1_loss": 2.0}  # e.g. one of several eval datasets: no client has eval_score there
    trainer._agree_on_best_metric(metrics)
    assert metrics == {"eval_data1_loss": 2.0}
    monkeypatch.setattr(hf.dist, "all_gather", all_gather_of([None, [1.0, 3.0]], []))  # client 1 has it
    for mine in ({"eval_loss": 1.0}, {"eval_score": "n/a"}):  # raised on every rank, not only where it is missing
        with pytest.raises(ConfigError, match=r"metric_for_best_model=eval_score: eval_score is missing or not a "
                                              r"number in the evaluation of client\(s\) \[0\] but not of the others"):
            trainer._agree_on_best_metric(mine)


def test_evaluation_settings_must_agree_and_epochs_must_have_one_length(monkeypatch):
    def gather_with(others):
        def all_gather_object(out, obj):
            out[:] = [obj] + [dict(obj, **o) for o in others]
        return all_gather_object

    monkeypatch.setattr(hf.dist, "get_world_size", lambda: 2)
    trainer = fake_trainer(ClientLayout(2, 0, 1), metric_for_best_model="loss", eval_strategy="epoch",
                           load_best_model_at_end=True, save_strategy="epoch")
    trainer.callback_handler = types.SimpleNamespace(callbacks=[])
    trainer.deca_config = hf.DecaSettings().config
    trainer.train_dataset = list(range(100))
    monkeypatch.setattr(hf.dist, "all_gather_object", gather_with([{}]))
    trainer._agree_on_evaluation()  # every client has the same settings (and epoch length)
    monkeypatch.setattr(hf.dist, "all_gather_object", gather_with([{"steps_per_epoch": 40}]))
    with pytest.raises(ConfigError, match=r"eval_strategy=epoch with metric_for_best_model=loss: the clients' epochs "
                                          r"end at different steps \(steps per epoch by client: \{0: 13, 1: 40\}\).*"
                                          r"use eval_strategy=steps"):
        trainer._agree_on_evaluation()
    monkeypatch.setattr(hf.dist, "all_gather_object", gather_with([{"EarlyStoppingCallback": [(3, 0.0)]}]))
    with pytest.raises(ConfigError, match=r"EarlyStoppingCallback differs between clients \(\{0: \[\], 1: \[\(3, "):
        trainer._agree_on_evaluation()
    monkeypatch.setattr(hf.dist, "all_gather_object", None)  # one client: nothing to agree on
    fake_trainer(ClientLayout(1, 0, 1))._agree_on_evaluation()


def test_the_one_process_gather_cuts_the_last_batch_to_its_rows():
    trainer = object.__new__(hf.DecaTrainer)
    state = types.SimpleNamespace(end_of_dataloader=False, remainder=3)
    trainer.accelerator = types.SimpleNamespace(gradient_state=state)
    batch = {"logits": torch.arange(8.0), "labels": torch.arange(8)}
    assert trainer._gather_one_process(batch) is batch  # not the last batch: nothing gathered, nothing cut
    state.end_of_dataloader = True
    out = trainer._gather_one_process(batch)
    assert out["logits"].tolist() == [0.0, 1.0, 2.0] and out["labels"].tolist() == [0, 1, 2]
    assert trainer._gather_one_process(["a", "b", "c", "d"]) == ["a", "b", "c"]
    state.remainder = 0  # the data fill the last batch
    assert trainer._gather_one_process(batch) is batch


def test_a_shadowed_method_is_restored_exactly():
    class Acc:
        def prepare(self):
            return "class"

    acc = Acc()
    with hf._shadowed(acc, "prepare", lambda: "shadow"):
        assert acc.prepare() == "shadow"
    assert acc.prepare() == "class" and "prepare" not in vars(acc)
    acc.prepare = lambda: "someone else's"
    with hf._shadowed(acc, "prepare", lambda: "shadow"):
        assert acc.prepare() == "shadow"
    assert acc.prepare() == "someone else's"


def test_the_logged_training_loss_is_this_clients_mean_over_its_ranks(monkeypatch):
    """The Trainer logs ``loss`` as the mean of ``tr_loss`` over every process it sees (``nested_gather``, an
    all-gather over the world): inside a DecaTrainer that mixed every client's model into each client's log. It is now
    this client's mean over its own ranks (what the Trainer logs under DDP over the client's ranks), as evaluate() and
    metrics.jsonl report the client's own."""
    import transformers.trainer as hf_trainer
    from transformers.trainer_callback import TrainerControl, TrainerState

    # 2 clients x 2 ranks; this is rank 2 (client 1's first rank). tr_loss is the sum of the 2 steps since the last log.
    trainer = fake_trainer(ClientLayout(4, 2, 2), logging_steps=2)
    trainer.groups = types.SimpleNamespace(client_group="client 1's group")
    world = torch.tensor([18.0, 18.0, 2.0, 6.0])
    if hasattr(hf_trainer, "nested_gather"):  # transformers 5.x logs through the module function
        monkeypatch.setattr(hf_trainer, "nested_gather", lambda t, mode, name=None: world.clone())
        gather_again = lambda: hf_trainer.nested_gather(torch.tensor(1.0), None)  # noqa: E731
    else:  # 4.x: through the method self._nested_gather
        monkeypatch.setattr(hf.Trainer, "_nested_gather", lambda self, t, name=None: world.clone())
        gather_again = lambda: trainer._nested_gather(torch.tensor(1.0))  # noqa: E731
    groups = []

    def all_gather(out, t, group=None):  # the client's other rank (rank 3) holds 6.0
        groups.append(group)
        out[0].copy_(t)
        out[1].fill_(6.0)

    monkeypatch.setattr(hf.dist, "all_gather", all_gather)
    trainer.control, trainer.state = TrainerControl(should_log=True), TrainerState(global_step=2)
    trainer._globalstep_last_logged, trainer._total_loss_scalar = 0, 0.0
    trainer.store_flos = lambda: None
    logs = []
    trainer.log = lambda entry, start_time=None: logs.append(entry)
    tr_loss = torch.tensor(2.0)
    trainer._maybe_log_save_evaluate(tr_loss, None, None, None, 0.0, None, 0.0, learning_rate=0.1)
    # (2 + 6) / 2 ranks / 2 steps; the world's mean would be (18 + 18 + 2 + 6) / 4 / 2 = 5.5. Exact in float32.
    assert [entry["loss"] for entry in logs] == [2.0] and groups == ["client 1's group"]
    assert float(tr_loss) == 0.0 and trainer._total_loss_scalar == 4.0
    assert gather_again().tolist() == [18.0, 18.0, 2.0, 6.0] and "_nested_gather" not in vars(trainer)  # put back


def _accelerate_gather_base(seen):
    """A base Trainer whose loss and loop call Accelerate's gather_for_metrics themselves (as TRL's SFTTrainer's
    compute_loss does for its entropy, token accuracy and token count)."""

    class Base:
        def evaluation_loop(self, dataloader, description, *args, **kwargs):
            seen.append(self.accelerator.gather_for_metrics(torch.tensor(3.0)))
            seen.append(self.gather_function(torch.arange(4.0)))
            return types.SimpleNamespace(metrics={})

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            seen.append(self.accelerator.gather_for_metrics(torch.tensor(2.0)))
            return torch.tensor(1.0)

    return type("FakeDecaTrainer", (hf.DecaTrainerMixin, Base), {})


def test_accelerates_own_gathers_stay_inside_the_process_in_evaluation_and_the_client_in_training(monkeypatch):
    """Before: TRL's compute_loss gathered over the world in evaluate(), so the clients' eval metrics were mixed and
    clients with eval sets of different sizes ran different numbers of gathers (launched: the run crashed)."""
    seen = []

    def world_gather(data, use_gather_object=False):
        raise AssertionError("a gather over the world")

    trainer = object.__new__(_accelerate_gather_base(seen))
    trainer.layout = ClientLayout(4, 2, 2)
    trainer.args = training_args()
    trainer.groups = types.SimpleNamespace(client_group="client 1's group")
    trainer._micro_losses = []
    state = types.SimpleNamespace(end_of_dataloader=True, remainder=3)
    trainer.accelerator = types.SimpleNamespace(gather_for_metrics=world_gather, gradient_state=state,
                                                pad_across_processes=None)
    trainer.evaluation_loop(None, "Prediction")
    # One process: nothing gathered; the last batch cut to its rows; a 0-d tensor, which cannot be cut, as it is
    # (Accelerate's one-process gather_for_metrics does the same).
    assert seen[0].tolist() == 3.0 and seen[1].tolist() == [0.0, 1.0, 2.0]
    assert trainer.accelerator.gather_for_metrics is world_gather and trainer.gather_function is world_gather
    groups = []

    def all_gather(out, t, group=None):  # the client's other rank holds 5.0
        groups.append(group)
        out[0].copy_(t)
        out[1].fill_(5.0)

    monkeypatch.setattr(hf.dist, "all_gather", all_gather)
    seen.clear()
    trainer.compute_loss(torch.nn.Linear(1, 1).train(), {})
    assert seen[0].tolist() == [2.0, 5.0] and groups == ["client 1's group"]  # the client's ranks, as DDP over them
    assert trainer.accelerator.gather_for_metrics is world_gather


def test_the_logged_training_loss_is_the_clients_own_on_transformers_4(monkeypatch):
    """transformers 4.x (>= 4.56 is supported) logs through the method ``self._nested_gather(tr_loss)``, not the
    module function of 5.x: the client-only gather must reach that one too (without it, looking up the 5.x function
    failed with AttributeError at the first log step)."""
    import transformers.trainer as hf_trainer

    class Trainer4:  # the 4.x shape of the logging path
        def _nested_gather(self, tensors, name=None):
            return torch.tensor([18.0, 18.0, 2.0, 6.0])  # the world's gather

        def _maybe_log_save_evaluate(self, tr_loss, *args, **kwargs):
            return self._nested_gather(tr_loss).mean().item(), self._nested_gather(torch.tensor(0.0)).tolist()

    monkeypatch.delattr(hf_trainer, "nested_gather", raising=False)
    trainer = object.__new__(hf.deca_trainer_class(Trainer4))
    trainer.layout = ClientLayout(4, 2, 2)
    trainer.groups = types.SimpleNamespace(client_group="client 1's group")

    def all_gather(out, t, group=None):  # the client's other rank holds 6.0
        out[0].copy_(t)
        out[1].fill_(6.0)

    monkeypatch.setattr(hf.dist, "all_gather", all_gather)
    logged, other = trainer._maybe_log_save_evaluate(torch.tensor(2.0))
    assert logged == 4.0 and other == [18.0, 18.0, 2.0, 6.0]  # tr_loss over the client; anything else as before
    assert "_nested_gather" not in vars(trainer)  # put back


def test_the_trainers_counts_sum_over_the_clients_ranks_only(monkeypatch):
    """2 clients x 2 ranks, this is rank 2 (client 1). The base Trainer multiplies the batch by the world (4 ranks)
    and sums total_flos over the world (an all-gather); here the batch is 8 rows x 3 accumulation steps x 2 ranks and
    the FLOPs are summed over the client's group only. The 2-client launch is
    tests/integration/test_hf_best_model.py::test_the_trainers_counts_are_the_clients_own."""
    trainer = fake_trainer(ClientLayout(4, 2, 2), gradient_accumulation_steps=3)
    trainer._train_batch_size = 8
    assert trainer.get_total_train_batch_size(trainer.args) == 8 * 3 * 2
    trainer.groups = types.SimpleNamespace(client_group="client 1's group")
    trainer.state = types.SimpleNamespace(total_flos=100.0)
    trainer.current_flos = 7.0
    groups = []

    def all_reduce(t, group=None):  # the client's other rank counted 5
        groups.append(group)
        t += 5.0

    monkeypatch.setattr(hf.dist, "all_reduce", all_reduce)
    trainer.store_flos()
    assert (trainer.state.total_flos, trainer.current_flos, groups) == (112.0, 0, ["client 1's group"])
    monkeypatch.setattr(hf.dist, "all_reduce", None)  # one rank per client: no collective
    trainer = fake_trainer(ClientLayout(2, 1, 1))
    trainer.state, trainer.current_flos = types.SimpleNamespace(total_flos=0.0), 9.0
    trainer.store_flos()
    assert trainer.state.total_flos == 9.0


def test_evaluation_speed_counts_the_steps_of_one_process(monkeypatch):
    """Each rank evaluates all of its client's rows, so its steps are rows / eval batch, not rows / (batch x world)."""
    import transformers.trainer as hf_trainer

    trainer = fake_trainer(ClientLayout(4, 2, 2), per_device_eval_batch_size=8)
    seen = []
    monkeypatch.setattr(hf_trainer, "speed_metrics", lambda split, start, num_samples=None, num_steps=None,
                        num_tokens=None: seen.append((split, num_samples, num_steps)) or {})
    with trainer._one_process_speed():
        hf_trainer.speed_metrics("eval", 0.0, num_samples=36, num_steps=math.ceil(36 / (8 * 4)))
        hf_trainer.speed_metrics("eval", 0.0, num_samples=36)  # no step count: left alone
    assert seen == [("eval", 36, 5), ("eval", 36, None)]
    hf_trainer.speed_metrics("eval", 0.0, num_samples=36, num_steps=2)  # restored afterwards
    assert seen[-1] == ("eval", 36, 2)

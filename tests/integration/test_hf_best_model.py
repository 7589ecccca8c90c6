"""deca_ds.hf: trainer.evaluate() per client, and load_best_model_at_end, metric_for_best_model and
EarlyStoppingCallback agreed across clients.

Inside a DecaTrainer the Trainer sees the whole world (measured with transformers 5.24 / accelerate 1.16 under
torchrun: ``args.world_size`` 2 and ``accelerator.num_processes`` 2 with 2 clients). Left alone, ``evaluate()``
shards each client's ``eval_dataset`` over every rank of every client and gathers losses and predictions over the
world: each client gets a mixture of all clients' models on parts of their eval sets, and when the clients' eval sets
differ in size (non-IID clients) the ranks run different numbers of gathers and the run aborts at the first
evaluation. With DecaTrainer each client evaluates its own model on its whole ``eval_dataset`` (no collective), and
the metric named by ``metric_for_best_model`` is agreed: its value is the mean over clients of each client's own
value (one rank per client), so every client picks the same best step and stops at the same step; each client's own
value is logged as ``<metric>_client``.

The run: 2 clients of the 600-row task (eval sets of 18 and 36 rows), evaluation and checkpoint every 2 steps,
``load_best_model_at_end``, ``EarlyStoppingCallback(patience 2)``. The per-client metric is a ``compute_metrics``
returning a fixed score sequence per client, so the steps are decided by the scores alone:

    evaluation (step)  1 (2)  2 (4)  3 (6)  4 (8)  5 (10)  6 (12)  7 (final evaluate())
    client 0            1      2      3      4      5       6       7      improves at every evaluation
    client 1            4      3      3     10      1       1       1
    mean                2.5    2.5    3      7      3       3.5     4

greater_is_better: alone, client 1 would stop at step 6 (no improvement on 4 at evaluations 2 and 3) with its best at
step 2, and client 0 would run to step 20 with its best there; on the mean both take their best at step 8 (7.0) and
stop at step 12. The means are sums of two small integers halved: exact in float64, so they are compared with ==.
"""

import json
import math

import pytest
from launch import torchrun

pytestmark = pytest.mark.integration
# The timeout only catches a hang: a 2-core machine shared with other jobs has taken over 400 s for one launch.
TIMEOUT = 1200

SCRIPT = '''
import json, sys
import torch
from safetensors.torch import load_file
from transformers import EarlyStoppingCallback, TrainingArguments
from deca_ds.hf import DataCollator, DecaSettings, DecaTrainer, init_distributed
from deca_ds.models import load_model_and_tokenizer

out, max_steps, early, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "early", sys.argv[4]
deca = DecaSettings(overrides=["data.num_examples=600", "blocks.layers_per_block=1", "blocks.switch_every=4",
                               f"comm_timeout={timeout}"])
init_distributed(deca.config.comm_timeout)
SCORES = {0: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 1: [4, 3, 3, 10, 1, 1, 1, 1, 1, 1]}
client, calls = deca.client_id, []


def compute_metrics(prediction):
    calls.append(1)
    return {"score": float(SCORES[client][len(calls) - 1])}


args = TrainingArguments(output_dir=out, max_steps=max_steps, seed=0, learning_rate=1e-2, lr_scheduler_type="constant",
                         per_device_train_batch_size=8, per_device_eval_batch_size=8, max_grad_norm=1.0,
                         eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                         load_best_model_at_end=True, metric_for_best_model="score", greater_is_better=True,
                         logging_steps=2, report_to="none", use_cpu=True, include_num_input_tokens_seen=True)
model, tok = load_model_and_tokenizer(deca.config.model, seed=0)
data = deca.client_data(tok)
trainer = DecaTrainer(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval, processing_class=tok,
                      data_collator=DataCollator(tok.pad_token_id), deca=deca, compute_metrics=compute_metrics,
                      callbacks=[EarlyStoppingCallback(early_stopping_patience=2)] if early else None)
# This rank's own FLOP estimates and input tokens, counted as the Trainer counts them, to compare with its totals.
own = {"flos": 0, "tokens": 0}
trainer_flops = trainer.floating_point_ops


def floating_point_ops(inputs):
    n = trainer_flops(inputs)
    own["flos"] += n
    own["tokens"] += inputs["input_ids"].numel()
    return n


trainer.floating_point_ops = floating_point_ops
train_metrics = trainer.train().metrics
state = trainer.state
best = load_file(f"{state.best_model_checkpoint}/model.safetensors")
loaded = all(torch.equal(p.detach(), best[n]) for n, p in trainer.model.named_parameters() if n in best)
evals = [{k: v for k, v in e.items() if k.startswith("eval_score") or k in ("step", "eval_loss")}
         for e in state.log_history if "eval_score" in e]
final = trainer.evaluate()  # collective with metric_for_best_model and several clients: every rank calls it
# This client's eval loss as the Trainer computes it in one process, on the best model it loaded: each batch's
# mean loss repeated over the batch's rows (float32), the mean of those (numpy).
import numpy as np
collate, size, losses = DataCollator(tok.pad_token_id), args.per_device_eval_batch_size, []
trainer.model.eval()
with torch.no_grad():
    for i in range(0, len(data.eval), size):
        rows = [data.eval[j] for j in range(i, min(i + size, len(data.eval)))]
        loss = trainer.model(**collate(rows)).loss.detach().float()
        losses.append(loss.repeat(len(rows)).numpy())
own_loss = np.concatenate(losses).mean().item()
with open(f"{out}/result_{client}.json", "w") as f:
    json.dump({"global_step": state.global_step, "best_global_step": state.best_global_step,
               "best_metric": state.best_metric, "best_model_checkpoint": state.best_model_checkpoint,
               "loaded_best": loaded, "evals": evals, "eval_rows": len(data.eval), "own_loss": own_loss,
               "final": {k: final[k] for k in ("eval_loss", "eval_score", "eval_score_client", "eval_runtime",
                                               "eval_samples_per_second", "eval_steps_per_second")},
               "train_metrics": train_metrics, "own": own, "tokens_seen": state.num_input_tokens_seen,
               "train_logs": [[e["step"], e["loss"]] for e in state.log_history if "loss" in e]}, f)
'''


def _as_logged(loss: float) -> float:
    """A training loss as the installed Trainer logs it: transformers 4.x rounds the logged ``loss`` to 4 decimals
    (``round(tr_loss_scalar / steps, 4)`` in ``_maybe_log_save_evaluate``), 5.x logs the value itself. Rounding the
    expected value the same way keeps the comparison exact."""
    import inspect

    from transformers import Trainer

    rounds = "round(tr_loss_scalar" in inspect.getsource(Trainer._maybe_log_save_evaluate)
    return round(loss, 4) if rounds else loss


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One 2-client launch shared by the tests below: ``[client 0's result, client 1's result]``."""
    tmp = tmp_path_factory.mktemp("hf_best_model")
    script = tmp / "best.py"
    script.write_text(SCRIPT)
    out = tmp / "run"
    torchrun(script, str(out), "20", "early", "120", timeout=TIMEOUT)
    return out, [json.loads((out / f"result_{c}.json").read_text()) for c in range(2)]


def test_evaluate_reports_each_clients_own_model_on_its_own_eval_set(run):
    """Before: the first evaluation aborted the run (gloo: "Received data size doesn't match expected size": the
    clients' eval sets of 18 and 36 rows gave their ranks 3 and 5 sharded batches); with eval sets of equal size
    every client reported the same eval_loss, a mixture of both clients' models on half of each eval set."""
    _, results = run
    assert [r["eval_rows"] for r in results] == [18, 36]
    for r in results:
        # The same float32 losses averaged by the same numpy call: equal, not close.
        assert r["final"]["eval_loss"] == r["own_loss"], r
    for a, b in zip(results[0]["evals"], results[1]["evals"]):
        assert a["eval_loss"] != b["eval_loss"], (a, b)  # each client's own model on its own rows


def test_best_model_and_early_stopping_agree_across_clients(run):
    """Before (eval sets of equal size, so that evaluation itself ran): client 1 stopped at step 6 on its own
    metric, and client 0 went on and failed in the step-6 gossip exchange after comm_timeout (NeighbourError:
    "neighbour client 1 did not answer"); without early stopping the clients kept their own best checkpoints
    (steps 20 and 8)."""
    out, results = run
    for c, r in enumerate(results):
        assert (r["global_step"], r["best_global_step"], r["best_metric"]) == (12, 8, 7.0), (c, r)
        assert r["best_model_checkpoint"] == str(out / f"client_{c}" / "checkpoint-8") and r["loaded_best"], (c, r)
        # The agreed mean under the metric's own name, this client's value next to it.
        own = [[1, 2, 3, 4, 5, 6], [4, 3, 3, 10, 1, 1]][c]
        assert [e["step"] for e in r["evals"]] == [2, 4, 6, 8, 10, 12]
        assert [e["eval_score"] for e in r["evals"]] == [2.5, 2.5, 3.0, 7.0, 3.0, 3.5]
        assert [e["eval_score_client"] for e in r["evals"]] == own
        assert (r["final"]["eval_score"], r["final"]["eval_score_client"]) == (4.0, [7, 1][c])


def test_the_logged_training_loss_is_the_clients_own(run):
    """Before: the Trainer's logged ``loss`` was the mean over the world (its ``nested_gather``), the same mixture of
    both clients on both clients. Now each client's log holds its own loss: with one rank per client, no gradient
    accumulation and a log every 2 steps, the Trainer's float32 sum of the two steps' losses halved, from the
    losses metrics.jsonl records for the client (bit for bit)."""
    import numpy as np

    out, results = run
    jsonl = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    loss = {(r["client"], r["step"]): r["loss"] for r in jsonl}
    for c, r in enumerate(results):
        assert [s for s, _ in r["train_logs"]] == [2, 4, 6, 8, 10, 12], r["train_logs"]
        for step, logged in r["train_logs"]:
            two = np.float32(loss[c, step - 2]) + np.float32(loss[c, step - 1])
            assert logged == _as_logged(float(two) / 2), (c, step, logged)
    assert results[0]["train_logs"] != results[1]["train_logs"]



def _count_from_rate(rate: float, runtime: float) -> tuple[float, float]:
    """The count behind a ``speed_metrics`` rate, and how far the rounding can move it: the Trainer logs the
    runtime rounded to 4 decimals and the rate (count / runtime) to 3, so ``rate * runtime`` is within
    ``0.0005 * runtime + (rate + 0.0005) * 0.00005`` of the count."""
    return rate * runtime, 0.0005 * runtime + (rate + 0.0005) * 0.00005


def _trained_rows(steps_run: int, max_steps: int, rows_per_step: int) -> int:
    """The rows the installed Trainer's ``train_samples_per_second`` counts: transformers 5.x the steps run
    (``num_train_samples * num_steps_trained / max_steps`` in ``_finalize_training``), 4.x the whole schedule
    (``num_train_samples``), whatever an early stop cut."""
    from transformers import Trainer

    return (steps_run if hasattr(Trainer, "_finalize_training") else max_steps) * rows_per_step


def test_the_trainers_counts_are_the_clients_own(run):
    """Before: the Trainer counted the world it sees. ``train_samples_per_second`` was computed from 2 clients' rows
    (192 for 12 steps of 8 rows), ``total_flos`` and ``num_input_tokens_seen`` summed both clients' batches (the
    same value on both clients), and ``eval_steps_per_second`` divided each client's rows by a batch of 8 x 2 ranks
    (2 and 3 steps) although each rank evaluated its whole eval set (3 and 5 steps). Now each is this client's:
    its rows, its FLOP estimates and input tokens as the Trainer's own ``floating_point_ops`` counted them on this
    rank (exact integer sums below 2**53, compared with ==), its steps."""
    _, results = run
    for c, r in enumerate(results):
        m = r["train_metrics"]
        assert m["total_flos"] == float(r["own"]["flos"]) and r["tokens_seen"] == r["own"]["tokens"], (c, r["own"])
        rows, slack = _count_from_rate(m["train_samples_per_second"], m["train_runtime"])
        assert abs(rows - _trained_rows(12, 20, 8)) <= slack, (c, m)
        final = r["final"]
        steps, slack = _count_from_rate(final["eval_steps_per_second"], final["eval_runtime"])
        assert abs(steps - math.ceil(r["eval_rows"] / 8)) <= slack, (c, final)
    assert results[0]["tokens_seen"] != results[1]["tokens_seen"]  # the clients' own batches, not one world sum


TRL_SCRIPT = '''
import json, sys
from trl import SFTConfig, SFTTrainer
from deca_ds.hf import DataCollator, DecaSettings, deca_trainer_class, init_distributed
from deca_ds.models import load_model_and_tokenizer

out = sys.argv[1]
deca = DecaSettings(overrides=["data.num_examples=600", "blocks.layers_per_block=1", "blocks.switch_every=4",
                               "comm_timeout=60"])
init_distributed(deca.config.comm_timeout)
# use_cpu: the Trainer then sees the launched world (args.world_size 2), as on GPUs.
args = SFTConfig(output_dir=out, max_steps=2, seed=0, learning_rate=1e-2, per_device_train_batch_size=8,
                 per_device_eval_batch_size=8, lr_scheduler_type="constant", max_grad_norm=1.0, save_strategy="no",
                 report_to="none", use_cpu=True, bf16=False, logging_steps=1,
                 dataset_kwargs={"skip_prepare_dataset": True})
model, tok = load_model_and_tokenizer(deca.config.model, seed=0)
data = deca.client_data(tok)
trainer = deca_trainer_class(SFTTrainer)(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                                         processing_class=tok, data_collator=DataCollator(tok.pad_token_id), deca=deca)
trainer.train()
metrics = trainer.evaluate()
with open(f"{out}/result_{deca.client_id}.json", "w") as f:
    json.dump({"world_size": trainer.args.world_size, "eval_rows": len(data.eval), "eval": metrics,
               "train_logs": [[e["step"], e["loss"]] for e in trainer.state.log_history if "loss" in e]}, f)
'''


# The SCRIPT's trainer, then evaluate() on client 0 only; client 1 goes on to other work (a minute of it).
ALONE_SCRIPT = SCRIPT[:SCRIPT.index("# This rank's own FLOP")] + '''
import time
if client == 0:
    trainer.evaluate()
else:
    time.sleep(60)
'''


def test_evaluate_on_one_rank_only_says_to_call_it_on_every_rank(tmp_path):
    """With metric_for_best_model and several clients evaluate() is a collective (the clients agree on the metric's
    mean). Called on one rank only, that rank waited for the others until the backend's timeout and failed with the
    backend's words; now it fails after comm_timeout with a line that says what to do."""
    script = tmp_path / "alone.py"
    script.write_text(ALONE_SCRIPT)
    res = torchrun(script, str(tmp_path / "run"), "20", "no", "5", timeout=TIMEOUT, check=False)
    assert res.returncode != 0
    assert ("evaluate() with metric_for_best_model=score and 2 clients is a collective" in res.stderr
            and "call it on every rank" in res.stderr and "comm_timeout=5 s (rank 0)" in res.stderr), res.stderr[-4000:]


def test_trl_evaluate_with_eval_sets_of_different_sizes(tmp_path):
    """TRL's SFTTrainer gathers its entropy, token accuracy and token count with Accelerate's gather_for_metrics in
    compute_loss. Before: in evaluate() those gathers went over the world, so with eval sets of 18 and 36 rows client
    0 finished after 3 batches and client 1 failed in its 4th gather ("Connection closed by peer"); the clients' eval
    metrics were mixed. Now both clients evaluate their own model on their own rows, and the logged training loss is
    each client's own (logged every step: the metrics.jsonl loss itself)."""
    pytest.importorskip("trl")
    script = tmp_path / "sft_eval.py"
    script.write_text(TRL_SCRIPT)
    out = tmp_path / "run"
    torchrun(script, str(out), timeout=TIMEOUT)
    results = [json.loads((out / f"result_{c}.json").read_text()) for c in range(2)]
    jsonl = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["world_size"] for r in results] == [2, 2] and [r["eval_rows"] for r in results] == [18, 36]
    for c, r in enumerate(results):
        assert r["train_logs"] == [[row["step"] + 1, _as_logged(row["loss"])] for row in jsonl if row["client"] == c], (
            c, r)
    a, b = (r["eval"] for r in results)
    assert a["eval_mean_token_accuracy"] != b["eval_mean_token_accuracy"] and a["eval_loss"] != b["eval_loss"]

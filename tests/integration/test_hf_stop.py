"""deca_ds.hf: a callback that stops training on one client stops every client at the same step.

Any ``TrainerCallback`` may set ``control.should_training_stop`` on its own rank. Before, the client that stopped
left the training loop while its neighbour took the next step and waited in that step's gossip exchange until
``comm_timeout`` (``NeighbourError: neighbour client 1 did not answer``), and the run failed. Now the ranks agree
after every optimizer step: if any rank stops, every rank stops at that step, and rank 0 names the clients that
asked. A stop asked at an epoch end (``on_epoch_end``), whose step depends on the client's number of rows, is
carried to the next step's agreement: that client trains one step more, and everyone stops there.

The run: 2 clients of the 600-row task (non-IID: different row counts, so their epochs end at different steps),
micro-batch 32, ``max_steps`` 40, ``comm_timeout`` 30 s.
"""

import json

import pytest
from launch import torchrun

pytestmark = pytest.mark.integration

SCRIPT = '''
import json, sys
from transformers import TrainerCallback, TrainingArguments
from deca_ds.hf import (ClientBatchSampler, DataCollator, DecaSettings, DecaTrainer, finish_distributed,
                        init_distributed)
from deca_ds.models import load_model_and_tokenizer

out, mode = sys.argv[1], sys.argv[2]
deca = DecaSettings(overrides=["data.num_examples=600", "blocks.layers_per_block=1", "blocks.switch_every=4",
                               "comm_timeout=30"])
init_distributed(deca.config.comm_timeout)
client = deca.client_id


class Stopper(TrainerCallback):
    """mode "step": client 1 stops at the end of step 3; mode "epoch": client 0 stops at its first epoch end."""

    epoch_ends = []

    def on_step_end(self, args, state, control, **kwargs):
        if mode == "step" and client == 1 and state.global_step == 3:
            control.should_training_stop = True

    def on_epoch_end(self, args, state, control, **kwargs):
        self.epoch_ends.append(state.global_step)
        if mode == "epoch" and client == 0:
            control.should_training_stop = True


args = TrainingArguments(output_dir=out, max_steps=40, seed=0, learning_rate=1e-2, lr_scheduler_type="constant",
                         per_device_train_batch_size=32, max_grad_norm=1.0, save_strategy="no", logging_steps=1,
                         report_to="none", use_cpu=True)
model, tok = load_model_and_tokenizer(deca.config.model, seed=0)
data = deca.client_data(tok)
trainer = DecaTrainer(model=model, args=args, train_dataset=data.train, processing_class=tok,
                      data_collator=DataCollator(tok.pad_token_id), deca=deca, callbacks=[Stopper()])
trainer.train()
epoch = ClientBatchSampler(len(data.train), 32, 1, deca.config.data.seed, deca.layout()).length
with open(f"{out}/result_{client}.json", "w") as f:
    json.dump({"global_step": trainer.state.global_step, "epoch_steps": epoch, "epoch_ends": Stopper.epoch_ends}, f)
# As recipes/finetune.py ends (and torch asks of every script): leave the process group before the interpreter exits.
# Without it, one CI run saw rank 1 abort in teardown ("terminate called without an active exception", exit -6)
# after both ranks had finished training and written their results.
finish_distributed()
import torch.distributed as dist
assert not dist.is_initialized(), "finish_distributed left the process group up"
finish_distributed()  # idempotent: no group any more, nothing to do
'''


def _launch(tmp_path, mode):
    script = tmp_path / "stop.py"
    script.write_text(SCRIPT)
    out = tmp_path / "run"
    res = torchrun(script, str(out), mode, timeout=600)
    return res, out, [json.loads((out / f"result_{c}.json").read_text()) for c in range(2)]


def test_a_callback_stopping_one_client_stops_every_client_at_that_step(tmp_path):
    """Client 1's callback stops at step 3: both clients end at step 3, and the launch says that client 1 asked.
    Before: client 0 failed in step 4's exchange after comm_timeout."""
    res, out, results = _launch(tmp_path, "step")
    assert [r["global_step"] for r in results] == [3, 3], results
    assert "deca_ds: client(s) [1] stopped training at step 3" in res.stdout + res.stderr
    steps = {(r["client"], r["step"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "loss" in r}
    assert steps == {(c, s) for c in range(2) for s in range(3)}


def test_a_stop_at_one_clients_epoch_end_is_taken_by_every_client_one_step_later(tmp_path):
    """Client 0 stops at its first epoch end (step e0, its own row count's): both clients end at e0 + 1. The two
    clients' epochs differ in length (otherwise the test would not exercise the carried stop)."""
    res, _, results = _launch(tmp_path, "epoch")
    e0, e1 = results[0]["epoch_steps"], results[1]["epoch_steps"]
    assert e0 != e1 and e0 + 1 < 40, (e0, e1)
    assert results[0]["epoch_ends"][0] == e0
    assert [r["global_step"] for r in results] == [e0 + 1, e0 + 1], results
    assert f"deca_ds: client(s) [0] stopped training at step {e0 + 1}" in res.stdout + res.stderr

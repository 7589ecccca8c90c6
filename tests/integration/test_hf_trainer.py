"""A Hugging Face Trainer script (recipes/hf_trainer.py, deca_ds.hf.DecaTrainer) equals recipes/finetune.py.

Same seed, data and settings (the recipe's defaults: 20 steps, micro-batch 8, lr 1e-2 constant, clipping 1.0, ring):
per-client losses, blocks, bytes sent and consensus distances are compared with ``==``, no tolerance. Why bit
equality is the right bar, derived rather than observed: both paths run the same float operations in the same order
on one thread per process — the same model built from the same seed, the same rows in the same micro-batches
(ClientBatchSampler draws the launcher's batch_indices positions), the model's own mean loss divided by the
accumulation steps (the Trainer's token-count normalisation is off), DeepSpeed's stage-0 clipping (under DeepSpeed
it is DeepSpeed's own; under torchrun deca_ds.step restates its arithmetic), BlockAdam, the same Mixer and the same
ConsensusStep. Any tolerance would hide a real difference: Adam turns a rounding difference on a near-zero gradient
into an lr-sized step, so "close" runs cannot be told from different ones.

2 ranks run through ``deepspeed --deepspeed ds_configs/hf_auto.json`` (HF "auto" values, the ClientGroups mpu), 4 ranks
through plain ``torchrun`` (Accelerate without DDP, the trainer's own client all-reduce and clipping). The DeepSpeed
run also checkpoints at step 10, and a run stopped there and resumed with ``--resume_from_checkpoint True`` ends
equal to the uninterrupted one. A third test runs a cosine schedule with warm-up over ``epochs``: the Trainer's own
scheduler (from the recipe's settings) gives BlockAdam the rates ``recipes/finetune.py`` sets, every client takes
the same number of steps although they hold different amounts of data, and a resume restores the schedule.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from launch import ROOT, deepspeed_command, run_launch, torchrun_command

pytestmark = pytest.mark.integration

HF_RECIPE = str(ROOT / "recipes" / "hf_trainer.py")
FT_RECIPE = str(ROOT / "recipes" / "finetune.py")
HF_AUTO = str(ROOT / "ds_configs" / "hf_auto.json")
# The library's schedule pinned: recipes/finetune.py without --config gives the embedded model its own
# (deca_ds.cli.EMBEDDED_SCHEDULE), DecaSettings does not.
DATA = ["data.num_examples=600", "blocks.layers_per_block=1", "blocks.switch_every=4"]
STEPS = 20
# The timeout only catches a hang: a 2-core machine shared with other jobs has taken over 400 s for one launch.
TIMEOUT = 1200


def torchrun(nproc: int, recipe: str, *args: str) -> None:
    run_launch(torchrun_command(recipe, *args, nproc=nproc), timeout=TIMEOUT)


def deepspeed(nproc: int, recipe: str, *args: str) -> None:
    run_launch(deepspeed_command(recipe, *args, nproc=nproc), timeout=TIMEOUT)


def figures(out: Path) -> dict[tuple[int, int], tuple]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {(r["step"], r["client"]): (r["loss"], r["block"], r["bytes_sent"], r["consensus_distance"], r["lr"])
            for r in recs if "loss" in r}


def assert_equal_runs(a: dict, b: dict, clients: int, steps: int = STEPS) -> None:
    assert sorted(a) == sorted(b) == [(s, c) for s in range(steps) for c in range(clients)]
    for key in a:
        assert a[key] == b[key], (key, a[key], b[key])
    assert len({v[1] for v in a.values()}) >= 4, "the run should visit several blocks"
    assert all(v[2] > 0 for v in a.values()), "every client gossips every step"


def test_torchrun_trainer_four_clients_equal_finetune(tmp_path):
    ft, hf = tmp_path / "finetune", tmp_path / "hf"
    torchrun(4, FT_RECIPE, f"output_dir={ft}", f"max_steps={STEPS}", *DATA)
    torchrun(4, HF_RECIPE, "--output_dir", str(hf), "--max_steps", str(STEPS), "--save_strategy", "steps",
             "--save_steps", str(STEPS), *DATA)
    assert_equal_runs(figures(ft), figures(hf), 4)
    losses = {c: [figures(hf)[(s, c)][0] for s in range(STEPS)] for c in range(4)}
    assert len({tuple(v) for v in losses.values()}) == 4, "clients train on their own data"

    # Without DeepSpeed the Trainer's own checkpoint files, per client: BlockAdam's state in optimizer.pt.
    from safetensors.torch import load_file

    ck = [hf / f"client_{c}" / f"checkpoint-{STEPS}" for c in range(4)]
    opt = torch.load(ck[3] / "optimizer.pt", weights_only=True)
    assert opt["format"] == "deca_ds.BlockAdam/1" and opt["global_step"] == STEPS
    assert torch.load(ck[3] / "deca_state.pt", weights_only=True)["mixer"]["sent"] > 0
    # The consensus model is the average of the clients' final models (on a 4-ring they differ).
    clients = [load_file(str(d / "model.safetensors")) for d in ck]
    consensus = load_file(str(hf / "consensus" / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight"
    assert not torch.equal(clients[0][name], clients[1][name])
    avg = sum(c[name] for c in clients) / 4
    # fp32: the all-reduce may add the 4 terms in another order than this sum; 4 additions and a division by 4
    # (exact) differ by at most a few ulps of the largest partial sum.
    assert torch.allclose(consensus[name], avg, atol=4 * torch.finfo(torch.float32).eps * float(
        sum(c[name].abs() for c in clients).max()), rtol=0)


RPC2 = ["data.num_examples=600", "blocks.layers_per_block=1", "blocks.switch_every=2", "clients.ranks_per_client=2"]
RPC2_STEPS = 8


def test_torchrun_trainer_two_clients_of_two_ranks_equal_finetune(tmp_path):
    """2 clients x 2 ranks under plain torchrun: the trainer averages the active block's gradients over the client's
    ranks, then clips the average (DeepSpeed's stage-0 arithmetic), as recipes/finetune.py. Before, on transformers
    4.x (whose loop clips through accelerator.clip_grad_norm_, not Trainer._clip_grad_norm) each rank's own gradients
    were clipped before the average: the losses left the recipe's from the second step."""
    ft, hf = tmp_path / "finetune", tmp_path / "hf"
    torchrun(4, FT_RECIPE, f"output_dir={ft}", f"max_steps={RPC2_STEPS}", *RPC2)
    torchrun(4, HF_RECIPE, "--output_dir", str(hf), "--max_steps", str(RPC2_STEPS), *RPC2)
    assert_equal_runs(figures(ft), figures(hf), 2, steps=RPC2_STEPS)


TRL_SCRIPT = '''
import sys
from trl import SFTConfig, SFTTrainer
from deca_ds.hf import DataCollator, DecaSettings, deca_trainer_class, finish_distributed, init_distributed
from deca_ds.models import load_model_and_tokenizer

out, steps = sys.argv[1], int(sys.argv[2])
deca = DecaSettings(overrides=["data.num_examples=600", "blocks.layers_per_block=1", "blocks.switch_every=4"])
init_distributed()
args = SFTConfig(output_dir=out, max_steps=steps, seed=0, learning_rate=1e-2, per_device_train_batch_size=8,
                 lr_scheduler_type="constant", max_grad_norm=1.0, save_strategy="no", report_to="none", bf16=False,
                 logging_steps=10, dataset_kwargs={"skip_prepare_dataset": True})
model, tok = load_model_and_tokenizer(deca.config.model, seed=0)
trainer = deca_trainer_class(SFTTrainer)(model=model, args=args, train_dataset=deca.client_data(tok).train,
                                         processing_class=tok, data_collator=DataCollator(tok.pad_token_id), deca=deca)
trainer.train()
finish_distributed()  # as the README's scripts end: a gloo group left to exit can abort a rank
'''


def test_trl_sft_trainer_two_clients_equal_finetune(tmp_path):
    pytest.importorskip("trl")
    ft, sft = tmp_path / "finetune", tmp_path / "sft"
    script = tmp_path / "sft.py"
    script.write_text(TRL_SCRIPT)
    torchrun(2, FT_RECIPE, f"output_dir={ft}", f"max_steps={STEPS}", *DATA)
    torchrun(2, str(script), str(sft), str(STEPS))
    # TRL's compute_loss reduces the token losses in another order than the recipe (measured: the first step's
    # losses equal, later ones 1 fp32 ulp apart and growing to ~2e-6 relative by step 20), and Adam with eps 1e-8
    # turns last-bit gradient differences into lr-sized ones (tests/unit/test_stacked.py's docstring): no bound on
    # later losses follows from the float format. Compared exactly: what rounding cannot change (the schedule of
    # blocks, the bytes sent, the rate of every step) and the first step's losses (same weights, same batch).
    a, b = figures(ft), figures(sft)
    assert sorted(a) == sorted(b) == [(s, c) for s in range(STEPS) for c in range(2)]
    for key in a:
        assert (a[key][1], a[key][2], a[key][4]) == (b[key][1], b[key][2], b[key][4]), (key, a[key], b[key])
    assert [a[(0, c)][0] for c in range(2)] == [b[(0, c)][0] for c in range(2)]
    assert len({v[1] for v in a.values()}) >= 4 and all(v[2] > 0 for v in b.values())


LOSS_FUNC_SCRIPT = '''
import sys
import torch.nn.functional as F
from transformers import HfArgumentParser, TrainingArguments
sys.path.insert(0, "recipes")
from hf_trainer import recipe_defaults
from deca_ds.hf import DataCollator, DecaSettings, DecaTrainer, finish_distributed, init_distributed
from deca_ds.models import load_model_and_tokenizer


def token_mean(outputs, labels, num_items_in_batch):
    # The model's own causal-LM loss (transformers' ForCausalLMLoss: pad, shift, fp32 logits), summed and divided
    # by the Trainer's item count instead of averaged.
    labels = F.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1)
    logits = outputs.logits.float().reshape(labels.numel(), -1)
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum") / num_items_in_batch


deca, rest = DecaSettings.from_argv(sys.argv[1:])
init_distributed()
(args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(recipe_defaults(deca.config) + rest)
model, tok = load_model_and_tokenizer(deca.config.model, seed=args.seed)
trainer = DecaTrainer(model=model, args=args, train_dataset=deca.client_data(tok).train, processing_class=tok,
                      data_collator=DataCollator(tok.pad_token_id), deca=deca, compute_loss_func=token_mean)
trainer.train()
finish_distributed()  # as the README's scripts end: a gloo group left to exit can abort a rank
'''
LOSS_FUNC_STEPS = 6


def test_compute_loss_func_normalises_by_the_clients_own_items(tmp_path):
    """A compute_loss_func that divides the summed token losses by num_items_in_batch gives each client its own
    token mean, as the model's own loss does in recipes/finetune.py: the first step's losses (same weights, same
    batch, the same terms summed by the same kernel and divided by the same count) are equal. Before, the Trainer
    counted the items over the whole world (average_tokens_across_devices), so a client's loss was its token sum
    over the mean client's count: off by n_client / n_mean, which non-IID clients do not share. Later steps are
    compared on what rounding cannot change, as for TRL above (reduction="sum" / count and the model's mean may
    round differently)."""
    ft, hf = tmp_path / "finetune", tmp_path / "hf"
    script = tmp_path / "loss_func.py"
    script.write_text(LOSS_FUNC_SCRIPT)
    torchrun(2, FT_RECIPE, f"output_dir={ft}", f"max_steps={LOSS_FUNC_STEPS}", *DATA)
    torchrun(2, str(script), "--output_dir", str(hf), "--max_steps", str(LOSS_FUNC_STEPS), *DATA)
    a, b = figures(ft), figures(hf)
    assert sorted(a) == sorted(b) == [(s, c) for s in range(LOSS_FUNC_STEPS) for c in range(2)]
    for key in a:
        assert (a[key][1], a[key][2], a[key][4]) == (b[key][1], b[key][2], b[key][4]), (key, a[key], b[key])
    assert [a[(0, c)][0] for c in range(2)] == [b[(0, c)][0] for c in range(2)]


# 2 clients of the 600-row task hold 166 and 320 training rows: alone, the Trainer would give them ceil(0.6 * 21) = 13
# and ceil(0.6 * 40) = 24 steps; the recipe's rule (mean client) gives ceil(0.6 * 243 / 8) = 19 to both.
SCHEDULE = ["optim.schedule=cosine", "optim.warmup_steps=3", "epochs=0.6"]
SCHEDULE_STEPS = 19


def test_deepspeed_trainer_two_clients_schedule_and_epochs_equal_finetune_and_resume(tmp_path):
    """The Trainer launched by `deepspeed` with the Trainer's DeepSpeed integration (hf_auto.json), a cosine schedule
    with warm-up and a run length in epochs: every step equals recipes/finetune.py's; its checkpoints are the
    Trainer's layout with BlockAdam inside DeepSpeed's files; a resume with the Trainer's own flag is the same run."""
    from deca_ds.config import load_config
    from deca_ds.lr_schedule import lr_at

    ft, hf, resumed = tmp_path / "finetune", tmp_path / "hf", tmp_path / "hf_resumed"
    torchrun(2, FT_RECIPE, f"output_dir={ft}", *SCHEDULE, *DATA)
    hf_args = ["--deepspeed", HF_AUTO, "--save_strategy", "steps", "--save_steps", "10", *SCHEDULE, *DATA]
    deepspeed(2, HF_RECIPE, "--output_dir", str(hf), *hf_args)
    a, b = figures(ft), figures(hf)
    assert_equal_runs(a, b, 2, steps=SCHEDULE_STEPS)  # losses, blocks, bytes, distances and the rate of every step
    # The rate each step used is the closed form (one rate, not the Trainer's and deca_ds's schedules applied twice).
    cfg = load_config(None, [*SCHEDULE, f"max_steps={SCHEDULE_STEPS}"])
    assert [b[(s, 0)][4] for s in range(SCHEDULE_STEPS)] == [lr_at(cfg, s) for s in range(SCHEDULE_STEPS)]
    assert b[(0, 0)][4] == 0.0 and max(b[(s, 0)][4] for s in range(SCHEDULE_STEPS)) == cfg.optim.lr

    # The Trainer's checkpoint layout, per client (DeepSpeed's files, BlockAdam's state inside them).
    for c in range(2):
        ck = hf / f"client_{c}" / "checkpoint-10"
        for name in ("model.safetensors", "trainer_state.json", "scheduler.pt", "latest", "deca_state.pt"):
            assert (ck / name).is_file(), ck / name
        ds_state = torch.load(ck / "global_step10" / "mp_rank_00_model_states.pt", weights_only=False)
        assert ds_state["optimizer"]["format"] == "deca_ds.BlockAdam/1"
        assert ds_state["optimizer"]["global_step"] == 10

    # Resume from checkpoint-10 with the Trainer's own flag (its scheduler.pt and BlockAdam's rate restored): the
    # same run, and the Mixer's byte counters survive.
    shutil.copytree(hf, resumed)
    for c in range(2):
        shutil.rmtree(resumed / f"client_{c}" / f"checkpoint-{SCHEDULE_STEPS}")
    deepspeed(2, HF_RECIPE, "--output_dir", str(resumed), "--resume_from_checkpoint", "True", *hf_args)
    assert_equal_runs(b, figures(resumed), 2, steps=SCHEDULE_STEPS)
    for c in range(2):
        x = torch.load(hf / f"client_{c}" / f"checkpoint-{SCHEDULE_STEPS}" / "deca_state.pt", weights_only=True)
        y = torch.load(resumed / f"client_{c}" / f"checkpoint-{SCHEDULE_STEPS}" / "deca_state.pt", weights_only=True)
        assert x == y and x["mixer"]["sent"] > 0

    assert (hf / "training.png").stat().st_size > 0

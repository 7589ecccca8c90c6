"""``deca-ds run`` / ``recipes/finetune.py`` arguments: shipped configs by name, ``--deepspeed``, Hugging Face "auto"
values resolved as the HF Trainer resolves them, ``--print-config`` sources, and when the first run simulates clients.
No training here (the packaged run is in tests/integration/test_packaging.py)."""

import copy
import json

import pytest

from deca_ds import cli
from deca_ds.config import ConfigError, load_config
from deca_ds.ds_config import REPO_DS_CONFIGS, check_ds_config, load_ds_config, resolve_auto, shipped_path


def parse(argv):
    import argparse

    p = argparse.ArgumentParser()
    cli.add_run_args(p)
    return p.parse_args(argv)


@pytest.mark.parametrize("flag", ["--deepspeed", "--deepspeed_config", "--deepspeed-config"])
def test_deepspeed_flag_spellings_name_the_ds_config(flag):
    args = parse([flag, "ds.json", "optim.lr=1e-4"])
    assert args.deepspeed_config == "ds.json" and args.overrides == ["optim.lr=1e-4"]


def test_config_names_resolve_to_the_shipped_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the repository: names still resolve
    assert cli.resolve_config_arg("default").endswith("recipes/configs/default.yaml")
    assert cli.resolve_config_arg("gpu_bf16.yaml").endswith("recipes/configs/gpu_bf16.yaml")
    own = tmp_path / "mine.yaml"
    own.write_text("max_steps: 3\n")
    assert cli.resolve_config_arg(str(own)) == str(own)
    with pytest.raises(ConfigError, match="neither a file nor a shipped config.*default.*gpu_bf16"):
        cli.resolve_config_arg("defualt")
    # A shipped recipe's relative ds_config path works from any directory.
    assert shipped_path("ds_configs/gpu_bf16.json") == REPO_DS_CONFIGS / "gpu_bf16.json"


def hf_resolution(ds: dict, cfg, max_steps: int) -> dict:
    """The same JSON as the HF Trainer resolves it, from TrainingArguments holding the recipe's values."""
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    from deca_ds.models import load_model_and_tokenizer

    args = TrainingArguments(output_dir="unused", per_device_train_batch_size=8, gradient_accumulation_steps=1,
                             max_grad_norm=1.0, learning_rate=cfg.optim.lr, adam_beta1=cfg.optim.betas[0],
                             adam_beta2=cfg.optim.betas[1], adam_epsilon=cfg.optim.eps,
                             weight_decay=cfg.optim.weight_decay, bf16=False, report_to="none", use_cpu=True)
    hf = HfTrainerDeepSpeedConfig(copy.deepcopy(ds))
    hf.trainer_config_process(args)
    model, _ = load_model_and_tokenizer(cfg.model)
    hf.trainer_config_finalize(args, model, num_training_steps=max_steps)
    return hf.config


def test_auto_values_resolve_as_the_hf_trainer_resolves_them():
    cfg = load_config(None, ["optim.lr=2e-3", "optim.betas=[0.8,0.99]", "optim.weight_decay=0.1", "max_steps=50"])
    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "train_batch_size": "auto", "gradient_clipping": "auto", "fp16": {"enabled": "auto"},
          "bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto",
                                                              "stage3_prefetch_bucket_size": "auto",
                                                              "stage3_param_persistence_threshold": "auto"},
          "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                    "weight_decay": "auto"}},
          "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                            "warmup_num_steps": "auto", "total_num_steps": "auto"}}}
    ours = copy.deepcopy(ds)
    resolved = resolve_auto(ours, cfg, data_parallel=1)
    reference = hf_resolution(ds, cfg, max_steps=50)
    if reference["scheduler"]["params"]["warmup_num_steps"] == 0:
        # transformers 4.x (4.56, 4.57) fills warmup_num_steps with the warm-up steps themselves, 0 here, which
        # DeepSpeed >= 0.19.6 refuses; 5.x fills max(1, warm-up steps), as deca_ds does. Compared with 5.x's value.
        reference["scheduler"]["params"]["warmup_num_steps"] = 1
    assert ours == reference  # one data-parallel rank: HF's world size and deca_ds's client size agree
    assert set(resolved) >= {"train_batch_size", "optimizer.params.betas", "scheduler.params.total_num_steps"}
    assert ours["optimizer"]["params"]["betas"] == [0.8, 0.99] and ours["scheduler"]["params"]["total_num_steps"] == 50


def test_auto_batch_counts_one_client_and_bf16_follows_the_model_dtype():
    ds = json.loads((REPO_DS_CONFIGS / "hf_auto.json").read_text())
    cfg = load_config(None, ["clients.ranks_per_client=2"])
    out = copy.deepcopy(ds)
    check_ds_config(out, cfg, world_size=8)  # 4 clients of 2 ranks: DeepSpeed's data-parallel group is one client
    assert out["train_batch_size"] == 8 * 1 * 2
    assert out["bf16"] == {"enabled": False} and out["fp16"] == {"enabled": False}
    zero2 = {"train_micro_batch_size_per_gpu": 4, "bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 2}}
    check_ds_config(zero2, load_config(None, ["model.dtype=bf16"]), world_size=1)
    assert zero2["bf16"] == {"enabled": True}  # under ZeRO the bf16 section is DeepSpeed's; at stage 0 it stays off
    with pytest.raises(ConfigError, match='ds_config wall_clock_breakdown="auto".*give a value'):
        check_ds_config({"train_micro_batch_size_per_gpu": 8, "wall_clock_breakdown": "auto"}, load_config(), 1)


def test_print_config_names_every_setting_and_its_source(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    yaml_path = tmp_path / "r.yaml"
    yaml_path.write_text("max_steps: 7\noptim:\n  lr: 1.0e-3\n")
    assert cli.run_main(["--config", str(yaml_path), "optim.lr=5e-4", "--deepspeed",
                         str(REPO_DS_CONFIGS / "hf_auto.json"), "--print-config"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert rows["max_steps"][1:] == ["7", "yaml"]
    assert rows["optim.lr"][1:] == ["0.0005", "override"]
    assert rows["data.num_examples"][1:] == ["6000", "default"]
    settings = [k for k in rows if not k.startswith("deepspeed:")]
    assert sorted(settings) == sorted(cli._flatten(load_config().to_dict()))  # every setting, once
    assert rows["ds_config"][1:] == [json.dumps(str(REPO_DS_CONFIGS / "hf_auto.json")), "--deepspeed"]
    assert rows["deepspeed:train_micro_batch_size_per_gpu"][1:] == ["8", "auto"]
    assert rows["deepspeed:gradient_clipping"][1:] == ["1.0", "auto"]
    assert rows["deepspeed:zero_optimization.stage"][1:] == ["0", "file"]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("overrides,world,device,expected", [
    ([], 1, "cpu", True),
    (["backend=launcher"], 1, "cpu", False),      # asked for one launcher client
    (["num_clients=2", "backend=simulate"], 1, "cpu", False),
    ([], 4, "cpu", False),                        # several ranks: one client each
    ([], 1, "cuda", False),                       # a GPU: one client per GPU, as launched
    (["resume=true"], 1, "cpu", False),           # the simulator writes no checkpoints
    (["checkpoint_every=10"], 1, "cpu", False),
    (["model.path=/models/x"], 1, "cpu", False),  # a real model: not N replicas in one CPU process
])
def test_first_run_simulates_clients_only_when_nothing_else_was_asked(overrides, world, device, expected):
    cfg = load_config(None, overrides)
    assert cli.first_run_mode(cfg, cli.setting_sources(None, overrides), world, device) is expected


def test_first_run_uses_its_schedule_unless_told_otherwise(capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")

    def shown(argv):
        assert cli.run_main(argv + ["--print-config"]) == 0
        return {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines() if line.strip()}

    rows = shown([])
    assert rows["backend"] == ['"simulate"', "first-run"] and rows["num_clients"] == ["4", "first-run"]
    for key, value in cli.EMBEDDED_SCHEDULE.items():
        assert rows[key] == [json.dumps(value), "embedded"]
    rows = shown(["blocks.switch_every=8"])
    assert rows["blocks.switch_every"] == ["8", "override"] and rows["max_steps"] == ["288", "embedded"]
    rows = shown(["--config", "default"])  # a YAML's schedule is kept (the shipped one writes the same out)
    assert rows["blocks.switch_every"] == ["24", "yaml"] and rows["num_clients"] == ["4", "first-run"]
    # a launch (not the first run) of the embedded model gets the same schedule: the one it learns the task with
    rows = shown(["backend=launcher"])
    assert rows["backend"] == ['"launcher"', "override"] and rows["max_steps"] == ["288", "embedded"]
    monkeypatch.setenv("WORLD_SIZE", "4")
    rows = shown([])
    assert rows["backend"] == ['"launcher"', "default"] and rows["blocks.layers_per_block"] == ["2", "embedded"]
    monkeypatch.delenv("WORLD_SIZE")
    # epochs replaces max_steps: the schedule leaves it alone
    rows = shown(["epochs=1"])
    assert rows["max_steps"] == ["derived", "epochs"] and rows["blocks.switch_every"] == ["24", "embedded"]


def test_print_config_shows_the_schedule_and_epochs_with_their_sources(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    yaml_path = tmp_path / "r.yaml"
    yaml_path.write_text("optim:\n  schedule: cosine\n  warmup_ratio: 0.1\n")
    assert cli.run_main(["--config", str(yaml_path), "epochs=3", "backend=launcher", "--print-config"]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert rows["optim.schedule"] == ['"cosine"', "yaml"]
    assert rows["optim.warmup_ratio"] == ["0.1", "yaml"]
    assert rows["optim.warmup_steps"] == ["0", "default"]
    assert rows["epochs"] == ["3", "override"] or rows["epochs"] == ["3.0", "override"]
    assert rows["max_steps"] == ["derived", "epochs"]  # the step count comes from the data, at start


@pytest.mark.parametrize("launcher_flags", [["--local_rank=1"], ["--local_rank", "1"], ["--local-rank=0"]])
def test_deepspeed_module_launch_puts_local_rank_before_the_subcommand(launcher_flags, tmp_path, capsys,
                                                                       monkeypatch):
    """``deepspeed --module deca_ds run ...`` starts ``python -m deca_ds --local_rank=N run ...``: accepted."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    yaml_path = tmp_path / "r.yaml"
    yaml_path.write_text("max_steps: 7\n")
    assert cli.main(launcher_flags + ["run", "--config", str(yaml_path), "optim.lr=5e-4", "--print-config"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert rows["max_steps"][1:] == ["7", "yaml"]
    assert rows["optim.lr"][1:] == ["0.0005", "override"]
    assert cli.launcher_args_after_command(["run", "--local_rank=2", "x=1"]) == ["run", "--local_rank=2", "x=1"]
    assert cli.launcher_args_after_command(["--local_rank=2"]) == ["--local_rank=2"]


def test_first_run_announces_epochs_not_the_unused_max_steps(capsys):
    """With ``epochs=0.05`` the first run said "192 steps" (the unused library ``max_steps``) and then ran 1 step."""
    cli._announce_first_run(load_config(None, ["backend=simulate", "num_clients=4", "epochs=0.05"]))
    err = capsys.readouterr().err
    assert "0.05 epoch(s)" in err and "192 steps" not in err
    cli._announce_first_run(load_config(None, ["backend=simulate", "num_clients=4", "max_steps=288"]))
    assert "method deca, 288 steps, one block" in capsys.readouterr().err

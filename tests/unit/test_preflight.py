"""Bad input fails before any process group, model load or output: one line naming the setting and the fix."""

import json

import pytest

from deca_ds.config import ConfigError, load_config
from deca_ds.trainer import preflight


def _cfg(tmp_path, *overrides):
    return load_config(None, [f"output_dir={tmp_path / 'out'}", "data.num_examples=300", *overrides])


@pytest.mark.parametrize("overrides, world, words", [
    (["clients.ranks_per_client=3"], 4, "clients.ranks_per_client=3"),
    # Once silently ignored: a 1-rank launch trained 1 client, not 8.
    (["num_clients=8"], 1, "num_clients=8 but this launch has 1 client(s) (1 ranks, 1 per client): launch 8 ranks"),
    (["num_clients=2", "clients.ranks_per_client=2"], 2, "num_clients=2 but this launch has 1 client(s)"),
    (["blocks.prefixes=[model.layers.0, nothing.here]"], 2,
     "blocks.prefixes: prefixes match no parameter: ['nothing.here']: give one prefix or regex of the model's"),
    (["blocks.prefixes=[model.layers, model.layers.0]"], 2, "make the prefixes disjoint"),
    (["blocks.order=fixed", "blocks.fixed_order=[0, 9]"], 2, "blocks.fixed_order"),
    (["model.path=/no/such/model"], 2, "model.path"),
    (["ds_config=/no/such.json"], 2, "ds_config"),
    (["data.path=/no/such.jsonl"], 2, "data.path"),
    (["data.alpha=0.001", "data.min_partition_size=200"], 2, "data"),
    # Once "data.num_labels=4: Maximum allowed size exceeded" (the wrong setting), or a MemoryError traceback.
    (["data.num_examples=1e20"], 2, "data.num_examples=100000000000000000000 synthetic rows cannot be generated"),
    (["data.num_examples=1e13"], 2, "data.num_examples=10000000000000 synthetic rows cannot be generated"),
    (["data.num_labels=9"], 2, "data.num_labels=9: the classification task supports 2 to 8 labels"),
    # A natural split of the synthetic labels over the wrong number of clients once named no fix.
    (["data.partition=natural"], 2, "column 'label' names 4 clients but there are 2: launch 4 clients"),
    # Once refused only after the process group, the model and the data were built (prepare_model).
    (["method=dec_lora", "lora.target_modules=[nothing]"], 2,
     "lora.target_modules=['nothing']: Target modules {'nothing'} not found in the base model"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, overrides, world, words):
    cfg = _cfg(tmp_path, *overrides)
    with pytest.raises(ConfigError) as e:
        preflight(cfg, world, None)
    assert words in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_custom_topology_of_the_wrong_size(tmp_path):
    edges = tmp_path / "edges.txt"
    edges.write_text("# format: edges\n0 1\n1 2\n2 0\n")
    cfg = _cfg(tmp_path, "topology.name=custom", f"topology.path={edges}")
    with pytest.raises(ConfigError, match="topology"):
        preflight(cfg, 4, None)
    preflight(_cfg(tmp_path, "topology.name=custom", f"topology.path={edges}"), 3, None)


def test_ds_config_refusals_come_before_anything(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True}}))
    with pytest.raises(ConfigError, match="model.dtype=bf16"):
        preflight(_cfg(tmp_path, f"ds_config={ds}"), 2, None)


def test_good_input_passes(tmp_path):
    ds = preflight(_cfg(tmp_path), 2, None).ds_config
    assert ds["train_micro_batch_size_per_gpu"] > 0
    assert preflight(_cfg(tmp_path, "num_clients=2"), 2, None).layout.num_clients == 2  # agrees with the launch


def _fake_run(tmp_path, num_clients: int, *overrides) -> None:
    """A run directory as a finished launch leaves it: run.json (one leg) and a complete checkpoint at step 4."""
    import torch

    from deca_ds import checkpoint as ckpt
    from deca_ds.ds_config import check_ds_config, load_ds_config

    cfg = _cfg(tmp_path, *overrides)
    ds = load_ds_config(None, device_type="cpu")
    check_ds_config(ds, cfg, world_size=num_clients)
    out = tmp_path / "out"
    ckpt.append_run_leg(out, ckpt.run_record(cfg, ds, num_clients, num_clients))
    for c in range(num_clients):
        ckpt.write_client_state(out, 4, c, {"global_step": torch.tensor(4)})
    ckpt.publish_checkpoint(out, 4, 0, keep=2, previous=ckpt.read_latest_pointer(out))


def test_resume_refuses_a_changed_run_and_accepts_allowed_changes(tmp_path):
    _fake_run(tmp_path, 2)
    with pytest.raises(ConfigError) as e:  # other clients and another block schedule: both named, one line
        preflight(_cfg(tmp_path, "resume=true", "blocks.switch_every=3"), 3, None)
    assert "num_clients: 2 -> 3" in str(e.value) and "blocks.switch_every: 4 -> 3" in str(e.value)
    assert "\n" not in str(e.value)
    pre = preflight(_cfg(tmp_path, "resume=true", "optim.lr=1e-3", "max_steps=300"), 2, None)
    assert pre.resume_from.name == "step_00000004"
    assert sorted(c.split(":")[0] for c in pre.changed) == ["max_steps", "optim.lr", "resume"]


def test_resume_of_nothing_says_so(tmp_path):
    with pytest.raises(ConfigError, match="holds no run to resume"):
        preflight(_cfg(tmp_path, "resume=true"), 2, None)
    assert preflight(_cfg(tmp_path, "resume=auto"), 2, None).resume_from is None


@pytest.mark.parametrize("ds, words", [
    # Each of these reached deepspeed.initialize, after the process group, model and data, as a pydantic, assertion
    # or TypeError traceback on every rank (or, the top-level typo, trained silently without ZeRO).
    ({"zero_optimization": {"stgae": 2}}, "ds_config zero_optimization.stgae is refused by DeepSpeed: Extra inputs"),
    ({"zero_optimisation": {"stage": 2}}, "ds_config key 'zero_optimisation' is not a DeepSpeed setting (DeepSpeed "
                                          "would ignore it): did you mean 'zero_optimization'?"),
    ({"communication_data_type": "fp8"}, "ds_config is refused by DeepSpeed (ValueError: Invalid communication_data"),
    ({"amp": {"enabled": True}}, "NVIDIA Apex AMP integration has been removed"),
    ({"zero_optimization": None}, "ds_config is refused by DeepSpeed (TypeError"),
    ({"scheduler": {"type": "NoSuchLR", "params": {}}}, 'scheduler.type="NoSuchLR" is not an LR scheduler'),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": "x"}}},
     "scheduler WarmupLR refuses its params (ValueError: warmup_num_steps must be a positive integer, got x)"),
    ({"scheduler": {"type": "WarmupLR"}}, 'scheduler.params=null must be a JSON object'),
    ({"scheduler": {"params": {"warmup_num_steps": 10}}}, "scheduler.type=null is missing"),
])
def test_a_ds_config_deepspeed_refuses_is_refused_before_anything(tmp_path, ds, words):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, **ds}))
    with pytest.raises(ConfigError) as e:
        preflight(_cfg(tmp_path, f"ds_config={path}"), 2, None)
    assert words in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_a_ds_config_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "ds.json"
    path.write_bytes(b'\xff\xfe{"train_micro_batch_size_per_gpu": 2}')  # e.g. saved as UTF-16 on Windows
    with pytest.raises(ConfigError, match="is not UTF-8 text"):  # was a UnicodeDecodeError traceback
        preflight(_cfg(tmp_path, f"ds_config={path}"), 2, None)


@pytest.mark.parametrize("name", ["cpu_fp32", "cpu_fp32_act_ckpt", "cpu_fp32_zero2", "cpu_fp32_zero3", "hf_auto"])
def test_deepspeeds_reading_accepts_the_shipped_configs_and_a_valid_scheduler(tmp_path, name):
    from deca_ds.ds_config import shipped_path

    preflight(_cfg(tmp_path, f"ds_config={shipped_path(f'ds_configs/{name}.json')}"), 2, None)
    path = tmp_path / "sched.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "comms_logger": {"enabled": False},
                                "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 2}}}))
    preflight(_cfg(tmp_path, f"ds_config={path}"), 2, None)


def test_resuming_a_finished_run_is_refused_and_changes_nothing(tmp_path):
    """Resumed at max_steps, a launch trained nothing and rewrote summary.json with every final_loss null."""
    from deca_ds.trainer import RunFinished, check_resume_step

    _fake_run(tmp_path, 2)
    out = tmp_path / "out"
    (out / "summary.json").write_text(json.dumps({"method": "deca", "steps": 4, "clients": [{"final_loss": 1.5}]}))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for resume in ("true", "auto"):
        with pytest.raises(RunFinished) as e:
            preflight(_cfg(tmp_path, f"resume={resume}", "max_steps=4"), 2, None)
        assert "already finished" in str(e.value) and "raise max_steps" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="max_steps=3 is below step 4 of the checkpoint to resume"):
        preflight(_cfg(tmp_path, "resume=true", "max_steps=3"), 2, None)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert preflight(_cfg(tmp_path, "resume=true", "max_steps=8"), 2, None).resume_from.name == "step_00000004"
    # epochs: max_steps is derived at start; the run calls the same check then
    with pytest.raises(RunFinished):
        check_resume_step(_cfg(tmp_path, "resume=true", "max_steps=4"), 4, out / "checkpoints" / "step_00000004")
    (out / "summary.json").unlink()  # stopped after its last checkpoint, before its summary: it may still finish
    assert preflight(_cfg(tmp_path, "resume=true", "max_steps=4"), 2, None).resume_from.name == "step_00000004"


def test_the_simulator_refuses_lora_targets_naming_no_module_before_anything(tmp_path, monkeypatch):
    """The simulator's set-up runs the same meta-device wrap as the launcher's preflight (check_lora_targets), before
    any data is built (once it failed in prepare_model, after every client's data and model)."""
    import deca_ds.data
    from deca_ds.simulate import run_simulation

    def built(*a, **k):
        raise AssertionError("client data built before the LoRA settings were checked")

    monkeypatch.setattr(deca_ds.data, "check_data_config", built)  # the set-up's step after the LoRA check
    cfg = _cfg(tmp_path, "backend=simulate", "num_clients=2", "method=dec_lora", "lora.target_modules=[nothing]")
    with pytest.raises(ConfigError, match="lora.target_modules=\\['nothing'\\]: Target modules") as e:
        run_simulation(cfg, quiet=True)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()

"""DeepSpeed JSON checks: every section type-checked, batch arithmetic exactly DeepSpeed's, one-line fixes."""

import itertools
import json

import pytest

from deca_ds.config import ConfigError, load_config
from deca_ds.ds_config import (OBJECT_SECTIONS, check_batch_sizes, check_ds_config, data_parallel_size,
                               load_ds_config, zero_stage)


def test_ds_config_checks_name_the_fix(tmp_path):
    cfg = load_config()
    check_ds_config(load_ds_config(None), cfg)
    for ds, words in [
        ({"bf16": {"enabled": True}}, "model.dtype=bf16"),
        ({"bfloat16": {"enabled": True}}, "model.dtype=bf16"),  # DeepSpeed's old name of the bf16 section
        ({"fp16": {"enabled": True}}, "model.dtype=fp16"),
        ({"zero_optimization": {"stage": 4}}, "stage=4"),
        ({"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}}, "fp16 with ZeRO"),
        ({"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}, "model.dtype=fp32"),
        ({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}, "offload_param"),
        ({"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}}, "offload_optimizer needs ZeRO"),
        ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "gpu"}}}, "device=\"gpu\" is not known"),
        ({"optimizer": {"type": "Adam"}}, "optim.lr"),
        # Stages 1-2 took nvme for CPU memory without a word; stage 3 without nvme_path has nowhere to write.
        ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme"}}}, "stages 1-2 offload to CPU"),
        ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}}, "needs nvme_path"),
        ({"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "nvme"}}}, "offload_optimizer needs ZeRO"),
    ]:
        with pytest.raises(ConfigError, match=words):
            check_ds_config({"train_micro_batch_size_per_gpu": 2, **ds}, cfg)
    bad = tmp_path / "bad.json"
    bad.write_text("{ nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_ds_config(bad)
    # A key given twice: JSON keeps the last, so the first (here the ZeRO stage the user meant) was silently lost.
    twice = tmp_path / "twice.json"
    twice.write_text('{"train_micro_batch_size_per_gpu": 2,\n "zero_optimization": {"stage": 2, "stage": 0}}')
    with pytest.raises(ConfigError, match="gives the key 'stage' twice in one object") as e:
        load_ds_config(twice)
    assert "\n" not in str(e.value)
    twice.write_text('{"a": {"stage": 2}, "b": {"stage": 0}}')  # the same key in two objects is not a repeat
    ds = load_ds_config(twice)
    assert ds["a"] == {"stage": 2} and ds["b"] == {"stage": 0}
    for stage in (1, 2, 3):  # ZeRO inside a client is accepted (ZeroBlockEngine)
        check_ds_config({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage}}, cfg)
    filled = load_ds_config(None)
    assert filled["train_micro_batch_size_per_gpu"] > 0 and filled["gradient_accumulation_steps"] == 1


@pytest.mark.parametrize("key, value, example", [
    ("fp16", True, '"fp16": {"enabled": true}'),
    ("bf16", False, '"bf16": {"enabled": true}'),
    ("zero_optimization", 2, '"zero_optimization": {"stage": 2}'),
    ("zero_optimization", True, '"zero_optimization": {"stage": 2}'),
    ("scheduler", "WarmupLR", '"scheduler": {...}'),
    ("activation_checkpointing", [], '"activation_checkpointing": {...}'),
    ("tensorboard", 1, '"tensorboard": {...}'),
])
def test_a_bare_value_where_a_section_belongs_is_one_line(key, value, example):
    with pytest.raises(ConfigError) as e:
        check_ds_config({"train_micro_batch_size_per_gpu": 2, key: value}, load_config())
    msg = str(e.value)
    assert "\n" not in msg and f"{key}={json.dumps(value)} must be a JSON object" in msg and example in msg


@pytest.mark.parametrize("ds, words", [
    ({"zero_optimization": {"offload_optimizer": "cpu", "stage": 2}}, "offload_optimizer=\"cpu\" must be a JSON"),
    ({"zero_optimization": {"stage": "2"}}, "stage=\"2\" is not a ZeRO stage"),
    ({"zero_optimization": {"stage": True}}, "stage=true is not a ZeRO stage"),
    ({"fp16": {"enabled": "false"}}, "fp16.enabled=\"false\" must be true or false"),
    ({"gradient_clipping": "1.0"}, "gradient_clipping=\"1.0\" must be a finite number"),
    ({"gradient_clipping": -1}, "gradient_clipping=-1"),
    ({"gradient_clipping": float("inf")}, "gradient_clipping=Infinity"),
    # "auto" is resolved as the HF Trainer resolves it (tests/unit/test_cli_run.py); only where HF fills nothing either
    # it is refused.
    ({"train_micro_batch_size_per_gpu": 8, "steps_per_print": "auto"}, "steps_per_print=\"auto\": neither"),
    ({"train_micro_batch_size_per_gpu": 0}, "train_micro_batch_size_per_gpu=0 must be a positive integer"),
    ({"train_micro_batch_size_per_gpu": 2.0}, "train_micro_batch_size_per_gpu=2.0 must be a positive integer"),
    ({"train_micro_batch_size_per_gpu": True}, "train_micro_batch_size_per_gpu=true must be a positive integer"),
    ({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": -1}, "gradient_accumulation_steps=-1"),
    ({"gradient_accumulation_steps": 2}, "neither train_micro_batch_size_per_gpu nor train_batch_size"),
])
def test_wrong_types_and_values_are_refused_by_name(ds, words):
    with pytest.raises(ConfigError) as e:
        check_ds_config(dict(ds), load_config())
    assert words in str(e.value) and "\n" not in str(e.value)


def test_zero_stage_reads_the_section():
    assert zero_stage({}) == 0 and zero_stage({"zero_optimization": {"stage": 3}}) == 3
    with pytest.raises(ConfigError, match="must be a JSON object"):
        zero_stage({"zero_optimization": 1})
    assert "bf16" in OBJECT_SECTIONS and "zero_optimization" in OBJECT_SECTIONS


def _deepspeed_batch(train, micro, gas, world):
    """DeepSpeed 0.19.8's own fill + assertion (runtime/config.py), run on a bare DeepSpeedConfig object."""
    from deepspeed.runtime.config import DeepSpeedConfig

    c = object.__new__(DeepSpeedConfig)
    c.train_batch_size, c.train_micro_batch_size_per_gpu, c.gradient_accumulation_steps = train, micro, gas
    c.world_size = world
    c._configure_train_batch_size()
    return {"train_batch_size": c.train_batch_size, "train_micro_batch_size_per_gpu": c.train_micro_batch_size_per_gpu,
            "gradient_accumulation_steps": c.gradient_accumulation_steps}


def test_batch_arithmetic_is_deepspeeds():
    """Every combination of given/missing keys and small values: accepted (with the same filled values) exactly
    when DeepSpeed accepts it, refused exactly when DeepSpeed's assertion fires."""
    values = (None, 1, 2, 3, 4, 6, 8, 12, 16)
    checked = refused = 0
    for train, micro, gas, world in itertools.product(values, values, (None, 1, 2, 3, 4), (1, 2, 3, 4)):
        if train is None and micro is None:
            continue  # DeepSpeed: 'Either train_batch_size or train_micro_batch_size_per_gpu needs to be provided'
        ds = {k: v for k, v in zip(("train_batch_size", "train_micro_batch_size_per_gpu",
                                    "gradient_accumulation_steps"), (train, micro, gas)) if v is not None}
        try:
            expected = _deepspeed_batch(train, micro, gas, world)
        except AssertionError:
            expected = None
        if expected is None:
            with pytest.raises(ConfigError, match="batch sizes do not add up"):
                check_batch_sizes(dict(ds), world)
            refused += 1
        else:
            assert check_batch_sizes(ds, world) == expected, (ds, world)
            assert {k: ds[k] for k in expected} == expected  # filled in place
        checked += 1
    assert checked > 1000 and refused > 100  # both branches are exercised


def test_data_parallel_group_is_one_client_except_centralized(tmp_path):
    ds = {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}
    # 2 ranks per client: 4 x 2 x 2 = 16 whatever the number of clients (the world size is not the group).
    cfg = load_config(None, ["clients.ranks_per_client=2"])
    check_ds_config(dict(ds), cfg, world_size=8)
    with pytest.raises(ConfigError) as e:
        check_ds_config(dict(ds), load_config(), world_size=2)
    assert "16 must equal train_micro_batch_size_per_gpu=4 x gradient_accumulation_steps=2 x 1" in str(e.value)
    assert "clients.ranks_per_client" in str(e.value)
    central = load_config(None, ["method=centralized"])
    assert data_parallel_size(central, 2) == 2 and data_parallel_size(cfg, 8) == 2
    check_ds_config(dict(ds), central, world_size=2)
    with pytest.raises(ConfigError, match="method=centralized"):
        check_ds_config(dict(ds), central, world_size=4)
    # The simulator knows num_clients instead of a world size.
    assert data_parallel_size(load_config(None, ["method=centralized", "num_clients=4"]), None) == 4
    # Unknown world size for centralized: types are still checked, nothing is filled.
    unknown = {"train_micro_batch_size_per_gpu": 4}
    check_ds_config(unknown, central)
    assert "train_batch_size" not in unknown
    with pytest.raises(ConfigError, match="positive integer"):
        check_ds_config({"train_micro_batch_size_per_gpu": 0}, central)


def test_load_fills_like_deepspeed(tmp_path):
    """load_ds_config must not pin gradient_accumulation_steps=1 next to train_batch_size: DeepSpeed derives it."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4}))
    ds = load_ds_config(path)
    assert "gradient_accumulation_steps" not in ds
    check_ds_config(ds, load_config(None, ["clients.ranks_per_client=2"]))
    assert ds["gradient_accumulation_steps"] == 2 == _deepspeed_batch(16, 4, None, 2)["gradient_accumulation_steps"]
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4}))
    assert load_ds_config(path)["gradient_accumulation_steps"] == 1

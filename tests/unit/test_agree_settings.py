"""Every machine of a launch passes its own command line: the settings that define the run must agree on all of them.

The comparison is pure (``deca_ds.checkpoint.machine_settings`` / ``compare_machine_settings``); the collective that
feeds it every rank's settings is launched in ``tests/integration/test_agree_settings.py``.
"""

import json
import shutil

import pytest

from deca_ds import checkpoint as ckpt
from deca_ds.config import ConfigError, load_config
from deca_ds.ds_config import load_ds_config

ARCH = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 4}


def _settings(*overrides, ds=None, arch=ARCH, graph="2 clients, 1 matrix(es), sha256 0123456789ab"):
    cfg = load_config(None, list(overrides))
    ds = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "train_batch_size": 16} \
        if ds is None else ds
    return ckpt.machine_settings(cfg, ds, 2, 2, architecture=arch, graph=graph)


def test_equal_settings_agree():
    assert ckpt.compare_machine_settings([{"optim.lr": 0.01, "seed": 0}, {"optim.lr": 0.01, "seed": 0}]) == []
    ckpt.check_machine_settings([{"a": 1}, {"a": 1}, {"a": 1}])  # no raise


def test_a_differing_setting_names_rank_0s_value_and_the_other_ranks():
    lines = ckpt.compare_machine_settings([{"optim.lr": 1e-3, "seed": 0}, {"optim.lr": 2e-3, "seed": 0}])
    assert lines == ["optim.lr: rank 0 has 0.001, rank 1 has 0.002"]


def test_ranks_with_the_same_value_are_grouped_and_a_missing_key_is_unset():
    rows = [{"method": "deca"}, {"method": "deca"}, {"method": "local"}, {"method": "local"}, {"method": "dadam"},
            {}]
    assert ckpt.compare_machine_settings(rows) == [
        "method: rank 0 has 'deca', ranks 2-3 have 'local', rank 4 has 'dadam', rank 5 has (unset)"]


def test_the_refusal_is_one_line_naming_every_difference_and_the_fix():
    a, b = _settings("optim.lr=1e-3"), _settings("optim.lr=2e-3", "topology.name=complete",
                                                 graph="2 clients, 1 matrix(es), sha256 ba9876543210")
    with pytest.raises(ConfigError) as e:
        ckpt.check_machine_settings([a, b])
    msg = str(e.value)
    assert "\n" not in msg
    for words in ("optim.lr: rank 0 has 0.001, rank 1 has 0.002", "topology.name: rank 0 has 'ring', rank 1 has "
                  "'complete'", "topology.graph", "start every machine with the same settings"):
        assert words in msg, msg


def test_many_differences_are_counted_not_all_listed():
    rows = [{f"k{i}": 0 for i in range(12)}, {f"k{i}": 1 for i in range(12)}]
    with pytest.raises(ConfigError, match="and 4 more"):
        ckpt.check_machine_settings(rows, shown=8)


def test_per_machine_settings_may_differ():
    """Paths on each machine's own disk, its patience and its resume choice: not refused (a custom graph's file is
    compared by content, ``topology.graph``)."""
    a = _settings("output_dir=/site_a/run", "data.path=/site_a/data.jsonl", "model.path=/site_a/model",
                  "ds_config=/site_a/ds.json", "comm_timeout=300", "resume=auto", "topology.name=custom",
                  "topology.path=/site_a/t.txt")
    b = _settings("output_dir=/mnt/b/out", "data.path=/mnt/b/copy.jsonl", "model.path=/mnt/b/model",
                  "ds_config=/mnt/b/ds.json", "comm_timeout=900", "resume=false", "topology.name=custom",
                  "topology.path=/mnt/b/t.txt")
    assert ckpt.compare_machine_settings([a, b]) == []
    assert ckpt.settings_digest(a) == ckpt.settings_digest(b)
    assert not any(key in a for key in ckpt.MACHINE_SETTINGS)


@pytest.mark.parametrize("overrides, key", [
    (["method=badam_gossip"], "method"),
    (["optim.lr=5e-3"], "optim.lr"),
    (["seed=1"], "seed"),
    (["max_steps=10"], "max_steps"),
    (["blocks.layers_per_block=2"], "blocks.layers_per_block"),
    (["deca.signal=raw"], "deca.signal"),
    (["topology.name=complete"], "topology.name"),
    (["data.seed=7"], "data.seed"),
    (["log_every=5"], "log_every"),  # gather steps are collectives: every rank must compute the same ones
])
def test_run_defining_settings_are_refused(overrides, key):
    lines = ckpt.compare_machine_settings([_settings(), _settings(*overrides)])
    assert [line.split(":")[0] for line in lines] == [key]
    assert ckpt.settings_digest(_settings()) != ckpt.settings_digest(_settings(*overrides))


def test_ds_config_batch_and_zero_settings_must_agree_but_logging_may_differ():
    base = load_ds_config(None, device_type="cpu")
    logged = dict(base, steps_per_print=1, wall_clock_breakdown=True, tensorboard={"enabled": True,
                                                                                  "output_path": "/site_b/tb"})
    assert ckpt.compare_machine_settings([_settings(ds=base), _settings(ds=logged)]) == []
    other = dict(base, train_micro_batch_size_per_gpu=base["train_micro_batch_size_per_gpu"] * 2,
                 zero_optimization={"stage": 2})
    lines = ckpt.compare_machine_settings([_settings(ds=base), _settings(ds=other)])
    keys = [line.split(":")[0] for line in lines]
    assert "ds_config.train_micro_batch_size_per_gpu" in keys and "ds_config.zero_optimization.stage" in keys


def test_the_model_architecture_must_agree():
    deeper = dict(ARCH, num_hidden_layers=8)
    lines = ckpt.compare_machine_settings([_settings(), _settings(arch=deeper)])
    assert lines == ["model.architecture.num_hidden_layers: rank 0 has 4, rank 1 has 8"]


def test_architecture_is_read_from_config_json_not_the_path(tmp_path):
    from deca_ds.trainer import _model_architecture

    a = tmp_path / "site_a" / "model"
    a.mkdir(parents=True)
    (a / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 32,
                                               "_name_or_path": str(a), "transformers_version": "5.0.0"}))
    b = tmp_path / "site_b" / "copy"
    shutil.copytree(a, b)
    data = json.loads((b / "config.json").read_text())
    (b / "config.json").write_text(json.dumps(dict(data, _name_or_path=str(b), transformers_version="5.1.0")))
    arch_a = _model_architecture(load_config(None, [f"model.path={a}"]))
    arch_b = _model_architecture(load_config(None, [f"model.path={b}"]))
    assert arch_a == arch_b == {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 32}
    embedded = _model_architecture(load_config(None, []))
    assert embedded["num_hidden_layers"] == 4 and "transformers_version" not in embedded

"""Bad input fails before any process group, model load or output: one line naming the setting and the fix."""

import json

import pytest

from deca_ds.config import ConfigError, load_config
from deca_ds.trainer import preflight


def _cfg(tmp_path, *overrides):
    return load_config(None, [f"output_dir={tmp_path / 'out'}", "data.num_examples=300", *overrides])


@pytest.mark.parametrize("overrides, world, words", [
    (["clients.ranks_per_client=3"], 4, "clients.ranks_per_client=3"),
    (["blocks.prefixes=[model.layers.0, nothing.here]"], 2, "blocks.prefixes"),
    (["blocks.order=fixed", "blocks.fixed_order=[0, 9]"], 2, "blocks.fixed_order"),
    (["model.path=/no/such/model"], 2, "model.path"),
    (["ds_config=/no/such.json"], 2, "ds_config"),
    (["data.path=/no/such.jsonl"], 2, "data.path"),
    (["data.alpha=0.001", "data.min_partition_size=200"], 2, "data"),
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

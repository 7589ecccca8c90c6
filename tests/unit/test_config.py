"""Recipe config: every shipped YAML loads; bad settings give one-line errors naming the setting."""

from pathlib import Path

import pytest

from deca_ds.config import ConfigError, RunConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "recipes" / "configs").glob("*.yaml"))


def test_there_are_shipped_configs():
    assert len(SHIPPED) >= 3


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_starts_with_its_command(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "recipes/finetune.py" in first and path.name in first


def test_defaults_are_the_embedded_default():
    cfg = load_config()
    assert cfg.model.path is None and cfg.data.path is None and cfg.method == "deca"


def test_overrides_are_typed_and_applied_in_order():
    cfg = load_config(None, ["optim.lr=1e-4", "deca.betas=[0.5,1.0]", "blocks.order=random", "optim.lr=2e-4",
                             "resume=true", "blocks.switch_every=3"])
    assert cfg.optim.lr == pytest.approx(2e-4)
    assert cfg.deca.betas == [0.5, 1.0]
    assert cfg.blocks.order == "random" and cfg.resume is True and cfg.blocks.switch_every == 3


@pytest.mark.parametrize("override, words", [
    (["optim.lrr=1"], ["optim.lrr", "did you mean optim.lr"]),
    (["methd=deca"], ["methd", "did you mean method"]),
    (["method=decca"], ["method='decca'", "did you mean 'deca'"]),
    (["optim.lr=0"], ["optim.lr", "> 0"]),
    (["optim.lr=fast"], ["optim.lr", "number"]),
    (["blocks.layers_per_block=0"], ["blocks.layers_per_block"]),
    (["data.alpha=0"], ["data.alpha", "> 0"]),
    (["topology.name=rnig"], ["topology.name", "did you mean 'ring'"]),
    (["blocks.order=fixed"], ["blocks.fixed_order"]),
    (["optim.state_policy=keep"], ["optim.state_policy"]),
    (["deca.signal=foo"], ["deca.signal"]),
    (["deca.betas=[0.9]"], ["deca.betas", "two numbers"]),
    (["optim.betas=[0.9,1.0]"], ["optim.betas"]),
    (["resume=maybe"], ["resume", "true or false"]),
    (["max_steps=2.5"], ["max_steps", "integer"]),
    (["clients.ranks_per_client=0"], ["clients.ranks_per_client"]),
    (["lr"], ["not key=value"]),
])
def test_bad_settings_name_the_setting_in_one_line(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)
    nested = tmp_path / "nested.yaml"
    nested.write_text("optim: 3\n")
    with pytest.raises(ConfigError, match="optim must be a mapping"):
        load_config(nested)

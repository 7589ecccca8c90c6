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
    (["resume=maybe"], ["resume='maybe'", "true, false, auto or step_N"]),
    (["resume=1"], ["resume=1", "true or false or a string"]),
    (["resume=step_"], ["resume='step_'", "step_N"]),
    (["optim.lr=inf"], ["optim.lr=inf", "finite"]),
    (["optim.lr=.nan"], ["optim.lr=nan", "finite"]),
    (["optim.lr=1" + "0" * 400], ["optim.lr=", "finite"]),
    (["optim.eps=.inf"], ["optim.eps", "finite"]),
    (["optim.weight_decay=inf"], ["optim.weight_decay", "finite"]),
    (["data.alpha=inf"], ["data.alpha", "finite"]),
    (["topology.p=nan"], ["topology.p", "finite"]),
    (["comm_timeout=inf"], ["comm_timeout", "finite"]),
    (["comm_timeout=1e12"], ["comm_timeout", "1e+09"]),
    (["comm_timeout=1e-6"], ["comm_timeout", "0.001"]),
    (["gossip.chunk_mb=inf"], ["gossip.chunk_mb", "finite"]),
    (["gossip.chunk_mb=1e-9"], ["gossip.chunk_mb", "4 bytes"]),
    (["gossip.dtype=bf16", "gossip.chunk_mb=1e-6"], ["gossip.chunk_mb", "2 bytes"]),
    (["deca.betas=[0.9,.inf]"], ["deca.betas", "finite"]),
    (["seed=-1"], ["seed=-1", "[0, 2**64)"]),
    (["data.seed=-1"], ["data.seed=-1", "[0, 2**64)"]),
    (["topology.seed=-5"], ["topology.seed=-5", "[0, 2**64)"]),
    (["seed=18446744073709551616"], ["seed=18446744073709551616", "[0, 2**64)"]),
    (["output_dir=' '"], ["output_dir=''", "empty"]),
    (["model.path=''"], ["model.path=''", "empty"]),
    (["data.path=' '"], ["data.path=''", "empty"]),
    (["ds_config=''"], ["ds_config=''", "empty"]),
    (["data.partition_by=''"], ["data.partition_by=''", "empty"]),
    (["blocks.fixed_order=[1, 0]"], ["blocks.fixed_order is set", "blocks.order=fixed"]),
    (["blocks.order=fixed", "blocks.fixed_order=[0, -1]"], ["blocks.fixed_order", "negative"]),
    (["blocks.prefixes=[]"], ["blocks.prefixes", "non-empty"]),
    (["topology.path=graph.txt"], ["topology.path is set", "topology.name=custom"]),
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
    folder = tmp_path / "configs"
    folder.mkdir()
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(folder)


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path):
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("output_dir: runs/caf\xe9\n".encode("latin-1"))  # saved by an editor in Latin-1
    with pytest.raises(ConfigError, match="not UTF-8 text") as e:  # was a bare UnicodeDecodeError traceback
        load_config(latin)
    assert "\n" not in str(e.value) and "latin1.yaml" in str(e.value)


@pytest.mark.parametrize("override", ["optim=0", "model=false", "data=[]", "topology=ring"])
def test_a_section_given_a_plain_value_is_refused(override):
    """Once silently read as an empty section: every setting of it (and a YAML file's) fell back to its default."""
    section = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"^{section} must be a mapping of settings.*{section}.KEY=VALUE"):
        load_config(None, [override])


def test_an_empty_section_is_its_defaults(tmp_path):
    empty = tmp_path / "empty_section.yaml"
    empty.write_text("optim:\n# nothing set yet\nmax_steps: 8\n")
    cfg = load_config(empty)
    assert cfg.optim.lr == RunConfig().optim.lr and cfg.max_steps == 8


def test_resume_values_and_extremes_that_are_accepted():
    assert load_config(None, ["resume=true"]).resume is True
    for value in ("auto", "step_96"):
        assert load_config(None, [f"resume={value}"]).resume == value
    cfg = load_config(None, ["seed=0", "data.seed=18446744073709551615", "gossip.chunk_mb=4e-6", "comm_timeout=1e9"])
    assert cfg.data.seed == 2**64 - 1 and int(cfg.gossip.chunk_mb * 2**20) == 4


@pytest.mark.parametrize("dotted, value", [
    ("optim.lr", float("inf")), ("optim.betas", [0.9, float("nan")]), ("data.test_size", float("nan")),
    ("gossip.chunk_mb", float("inf")), ("seed", -1), ("topology.seed", -2),
])
def test_validate_checks_values_set_in_code(dotted, value):
    """Dataclasses built in code (not through load_config) get the same checks from validate()."""
    cfg = RunConfig()
    section, _, name = dotted.rpartition(".")
    setattr(cfg if not section else getattr(cfg, section), name, value)
    with pytest.raises(ConfigError, match=dotted.replace(".", r"\.")):
        cfg.validate()


def test_a_yaml_number_with_an_exponent_is_a_number(tmp_path):
    """YAML 1.1 reads 1e-4 (no dot) as a string: the file's lr was refused as "the wrong type: expected a number",
    while the same override (optim.lr=1e-4) was accepted."""
    sci = tmp_path / "sci.yaml"
    sci.write_text("optim:\n  lr: 1e-4\n  eps: 1E-8\nmax_steps: 2e2\ndeca:\n  betas: [0.9, 1.0e+0]\n")
    cfg = load_config(sci)
    assert (cfg.optim.lr, cfg.optim.eps, cfg.max_steps, cfg.deca.betas) == (1e-4, 1e-8, 200, [0.9, 1.0])
    quoted = tmp_path / "quoted.yaml"
    quoted.write_text("optim:\n  lr: '1e-4'\n")  # quoted on purpose: still a string
    with pytest.raises(ConfigError, match="optim.lr='1e-4' has the wrong type"):
        load_config(quoted)


@pytest.mark.parametrize("text, words", [
    ("optim:\n  lr: 0.001\nmax_steps: 4\noptim:\n  betas: [0.9, 0.99]\n",
     "key 'optim' on line 4 repeats the one on line 1"),
    ("optim:\n  lr: 0.001\n  lr: 0.1\n", "key 'lr' on line 3 repeats the one on line 2"),
])
def test_a_key_given_twice_in_a_yaml_file_is_refused(tmp_path, text, words):
    """Once the last won silently: with two optim sections the first one's lr fell back to the default."""
    dup = tmp_path / "dup.yaml"
    dup.write_text(text)
    with pytest.raises(ConfigError, match="not valid YAML") as e:
        load_config(dup)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_key_overriding_a_yaml_merge_is_not_a_duplicate(tmp_path):
    base = tmp_path / "anchors.yaml"
    base.write_text("optim:\n  <<: {lr: 0.001, eps: 1.0e-6}\n  lr: 0.1\n")
    cfg = load_config(base)
    assert (cfg.optim.lr, cfg.optim.eps) == (0.1, 1e-6)


def test_a_section_override_adds_to_the_recipes_section_and_an_empty_one_is_refused(tmp_path):
    """``optim=`` (or ``optim=null``) silently dropped every optim setting of the recipe file (lr back to its
    default); ``optim={betas: ...}`` replaced the section, dropping the file's lr the same way."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  lr: 0.05\n  weight_decay: 0.1\n")
    for item in ("optim=", "optim=null"):
        with pytest.raises(ConfigError, match="gives the section optim no settings, which would silently drop") as e:
            load_config(recipe, [item])
        assert "\n" not in str(e.value)
    cfg = load_config(recipe, ["optim={betas: [0.9, 0.99]}"])
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas) == (0.05, 0.1, [0.9, 0.99])
    assert load_config(recipe, ["optim={lr: 0.2}"]).optim.lr == 0.2  # the override wins where both set a key
    assert load_config(None, ["optim="]).optim.lr == load_config(None).optim.lr  # no section given: nothing lost

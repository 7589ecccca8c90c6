"""Dependency ranges: the DeepSpeed check, setup.cfg agreeing with it, the transformers API the code relies on, and
the error when int8 offload lacks bitsandbytes."""

import configparser
import importlib.abc
import importlib.metadata
import sys
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from deca_ds._versions import (BITSANDBYTES_MIN, DEEPSPEED_RANGE, TRANSFORMERS_MIN, VersionError,
                               check_deepspeed_version)
from deca_ds.config import ConfigError
from deca_ds.optim.state_store import BlockStateStore, check_int8_support, check_offload_support

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("version", ["0.17.0", "0.18.9", "0.19.8", "0.19.9rc1", "0.19.9+g1a2b3c"])
def test_deepspeed_inside_the_tested_range_passes(version):
    check_deepspeed_version(version)


@pytest.mark.parametrize("version", ["0.16.9", "0.17.0rc1", "0.20.0", "0.20.0.dev0", "1.0.0", "not-a-version"])
def test_deepspeed_outside_the_tested_range_is_refused_in_one_line(version):
    with pytest.raises(VersionError) as err:
        check_deepspeed_version(version)
    msg = str(err.value)
    assert isinstance(err.value, ConfigError) and "\n" not in msg
    assert version in msg and f"pip install 'deepspeed{DEEPSPEED_RANGE}'" in msg


def test_the_suite_runs_inside_the_range_it_declares():
    check_deepspeed_version(importlib.metadata.version("deepspeed"))
    assert Version(importlib.metadata.version("transformers")) >= Version(TRANSFORMERS_MIN)
    assert Version(importlib.metadata.version("bitsandbytes")) >= Version(BITSANDBYTES_MIN)


def _requirements(text):
    return {r.name: r.specifier for r in (Requirement(line) for line in text.split("\n") if line.strip())}


def test_setup_cfg_declares_the_same_ranges():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    required = _requirements(cfg["options"]["install_requires"])
    extras = {name: _requirements(text) for name, text in cfg["options.extras_require"].items()}
    assert required["deepspeed"] == SpecifierSet(DEEPSPEED_RANGE)
    assert required["transformers"] == SpecifierSet(f">={TRANSFORMERS_MIN}")
    assert "bitsandbytes" not in required  # only int8 offload needs it
    for extra in ("int8", "test"):  # the tests exercise int8 offload, so `pip install .[test]` must bring it
        assert extras[extra]["bitsandbytes"] == SpecifierSet(f">={BITSANDBYTES_MIN}")


def test_from_pretrained_takes_dtype(tmp_path):
    # models.load_model_and_tokenizer passes dtype= (not torch_dtype=): transformers before 4.56 ignore it and load
    # fp32 first, which is what TRANSFORMERS_MIN prevents. The weights must arrive in the requested dtype.
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).parameters()} == {
        torch.bfloat16}


def _hide_bitsandbytes(monkeypatch):
    for name in list(sys.modules):
        if name == "bitsandbytes" or name.startswith("bitsandbytes."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError


def test_int8_offload_without_bitsandbytes_says_how_to_get_it(monkeypatch):
    _hide_bitsandbytes(monkeypatch)
    for attempt in (lambda: check_offload_support("int8"), lambda: BlockStateStore("int8")):
        with pytest.raises(ConfigError) as err:
            attempt()
        msg = str(err.value)
        assert "\n" not in msg and "optim.offload_dtype=int8" in msg and "deca_ds[int8]" in msg
        assert "not installed" in msg and "optim.offload_dtype=fp32" in msg
    check_offload_support("fp32")  # fp32 offload never needs it
    store = BlockStateStore("fp32")
    store.put(0, {"w": {"step": torch.tensor(1.0), "exp_avg": torch.ones(3), "exp_avg_sq": torch.ones(3)}})
    assert torch.equal(store.take(0, torch.device("cpu"))["w"]["exp_avg"], torch.ones(3))
    # The run's preflight names whichever 8-bit setting needs it; offload_dtype counts only when state is offloaded.
    from deca_ds.config import load_config

    with pytest.raises(ConfigError, match="optim.moment_dtype=int8 needs bitsandbytes"):
        check_int8_support(load_config(None, ["optim.moment_dtype=int8"]).optim)
    with pytest.raises(ConfigError, match="optim.offload_dtype=int8 needs bitsandbytes"):
        check_int8_support(load_config(None, ["optim.state_policy=offload", "optim.offload_dtype=int8"]).optim)
    check_int8_support(load_config(None, ["optim.offload_dtype=int8"]).optim)  # reset policy: nothing offloaded


class _BrokenFinder(importlib.abc.MetaPathFinder):
    """Makes ``import bitsandbytes`` fail the way a broken native library does (not an ImportError)."""

    def find_spec(self, name, path=None, target=None):
        if name == "bitsandbytes":
            raise OSError("libbitsandbytes_cuda.so: cannot open shared object file")
        return None


def test_int8_offload_with_a_broken_bitsandbytes_names_the_cause(monkeypatch):
    _hide_bitsandbytes(monkeypatch)
    monkeypatch.delitem(sys.modules, "bitsandbytes")
    monkeypatch.setattr(sys, "meta_path", [_BrokenFinder(), *sys.meta_path])
    with pytest.raises(ConfigError, match=r"fails to import \(OSError: libbitsandbytes_cuda.so.*reinstall it"):
        check_offload_support("int8")

"""A protocol grid on a pretrained base (``pretrain`` in the grid YAML), end to end with the real simulator: the
pretraining run saves a Hugging Face model directory with its tokenizer, and a fine-tuning run pointed at it by
``model.path`` starts from exactly those weights."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "recipes"))
import sweep  # noqa: E402

pytestmark = pytest.mark.integration

TINY = {"num_clients": 2, "max_steps": 2, "log_every": 1, "data": {"num_examples": 64, "eval_examples": 8,
                                                                    "client_eval_examples": 4, "eval_generate": False}}


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def test_fine_tuning_starts_from_the_pretrained_base(tmp_path):
    from deca_ds.config import load_config
    from deca_ds.simulate import Simulation, run_simulation

    pre = {**TINY, "method": "centralized", "centralized_optimizer": "adamw", "seed": 7,
           "data": {**TINY["data"], "task": "generation"}}
    base = sweep.ensure_pretrained("tiny", {"pretrain": pre}, str(tmp_path / "runs"))
    assert (base / "config.json").exists() and (base / "tokenizer.json").exists()
    settings = sweep._flatten({**TINY, "method": "badam_gossip", "topology": {"name": "ring"}, "seed": 3})

    cfg = load_config(None, sweep._overrides({**settings, "optim.lr": 1e-2, "model.path": str(base),
                                              "output_dir": str(tmp_path / "ft"), "backend": "simulate"}))
    start = _weights(base)
    # Every client's replica starts as the base, bit for bit (not the embedded model's random initialisation).
    sim = Simulation(cfg)
    for c in range(cfg.num_clients):
        state = sim.model_of(c).state_dict()
        assert all(torch.equal(state[k], start[k]) for k in start), c
    del sim
    run_simulation(cfg, save_models=True, quiet=True)  # and fine-tuning moves it
    moved = _weights(tmp_path / "ft" / "consensus")
    assert moved.keys() == start.keys() and any(not torch.equal(moved[k], start[k]) for k in start)

"""method=dec_lora launched for real (torchrun, 2 gloo clients) against the per-client simulator of the same settings.

The launch trains LoRA adapters on a frozen base and gossips them every step; the simulator is bit-equal to a launch
for every other method (tests/integration/test_simulate_parity.py), so equal losses here mean the launcher's
dec_lora path (trainer: check + prepare_model, BlockAdam on the adapter block, Mixer on the adapters) is the same
computation as the simulator's.
"""

import json

import pytest
from launch import FAST, RECIPE, torchrun

pytestmark = pytest.mark.integration


def test_dec_lora_launch_equals_the_per_client_simulator(tmp_path):
    pytest.importorskip("peft")
    settings = ["method=dec_lora", "max_steps=6", "optim.lr=1e-2", "topology.name=ring", *FAST]
    out = tmp_path / "launch"
    torchrun(RECIPE, f"output_dir={out}", *settings, timeout=400)
    launched = {(r["step"], r["client"]): r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text()
                                                                .splitlines()) if "loss" in r}
    # In this process, as test_simulate_parity.py runs its simulator (one thread, set before torch was imported).
    from deca_ds.config import load_config
    from deca_ds.simulate import Simulation

    cfg = load_config(None, ["num_clients=2", "simulate.stacked=false", f"output_dir={tmp_path / 'sim'}", *settings])
    sim = Simulation(cfg)
    losses = [sim.step().losses for _ in range(cfg.max_steps)]
    for step, row in enumerate(losses):
        for client, loss in enumerate(row):
            assert launched[(step, client)] == loss, (step, client)
    # Only the adapters moved and travelled: a step sends far fewer bytes than the model holds.
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "dec_lora"
    # consensus/ is a plain model (the averaged adapters merged), loadable as every other method's, and it is the
    # simulator's consensus merged the same way (2 clients: (a + b) / 2 both ways, then the same merge).
    import torch
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(out / "consensus", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    expected = sim.consensus_model().merge_and_unload().state_dict()
    got = model.state_dict()
    assert got.keys() == expected.keys()
    for k in got:
        assert torch.equal(got[k], expected[k]), k

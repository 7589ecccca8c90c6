"""The product's main job, launched for real on CPU: `deepspeed` and `torchrun` with 2 and 4 gloo processes.

Few launches, many checks per launch (each launch costs ~10-25 s of Python start-up on 2 cores).
"""

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from launch import FAST, RECIPE, ROOT, deepspeed_command, run_launch, torchrun_command

pytestmark = pytest.mark.integration


def torchrun(nproc: int, *args: str, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_launch(torchrun_command(RECIPE, *args, nproc=nproc), timeout=timeout, check=check)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def final_state(out: Path, client: int) -> dict:
    latest = (out / "checkpoints" / "latest").read_text().strip()
    return torch.load(out / "checkpoints" / latest / f"client_{client}" / "state.pt", weights_only=False)


def test_deepspeed_launcher_four_clients_learn_and_hand_back_a_hf_model(tmp_path):
    out = tmp_path / "run"
    # method=deca (the default); DeepSpeed monitors configured in the ds_config keep working.
    ds = json.loads((ROOT / "ds_configs" / "cpu_fp32.json").read_text())
    ds["csv_monitor"] = {"enabled": True, "output_path": str(tmp_path / "monitor"), "job_name": "deca"}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    run_launch(deepspeed_command(RECIPE, f"output_dir={out}", "max_steps=40", "model.save_client_models=true",
                                 f"ds_config={tmp_path / 'ds.json'}", *FAST, nproc=4), timeout=400)
    rows = (tmp_path / "monitor" / "deca" / "Train_Samples_client_1_loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss" and len(rows) == 41
    recs = records(out)
    assert {r["client"] for r in recs} == {0, 1, 2, 3}
    for key in ("step", "client", "loss", "block", "lr", "consensus_distance", "bytes_sent"):
        assert key in recs[0]
    for c in range(4):
        losses = [r["loss"] for r in recs if r["client"] == c]
        assert len(losses) == 40
        assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, f"client {c} did not learn: {losses}"
        assert all(r["bytes_sent"] > 0 for r in recs if r["client"] == c)  # ring: every client sends
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_clients"] == 4 and len(summary["clients"]) == 4
    assert summary["consensus"]["loss"] > 0
    assert (out / "partition.json").is_file()
    # The consensus model is a Hugging Face model directory that loads and generates.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "consensus")
    tok = AutoTokenizer.from_pretrained(out / "consensus")
    ids = tok("Classify the topic", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] > ids.shape[1]
    # It is the average of the clients' final weights.
    states = [final_state(out, c)["model"] for c in range(4)]
    name = "model.layers.0.self_attn.q_proj.weight"
    avg = sum(s[name] for s in states) / 4
    assert torch.allclose(model.state_dict()[name], avg, atol=1e-6)
    # Every client's own model is saved by its own rank (transformers' save_pretrained would skip ranks > 0).
    for c in range(4):
        client = AutoModelForCausalLM.from_pretrained(out / "clients" / f"client_{c}").state_dict()
        assert torch.equal(client[name], states[c][name]), c
    # Starting again in the same output_dir without resume=true refuses and changes nothing.
    before = (out / "metrics.jsonl").read_text()
    res = torchrun(2, f"output_dir={out}", "max_steps=4", check=False)
    assert res.returncode != 0 and "deca_ds: error: output_dir=" in res.stderr and "ConfigError" not in res.stderr
    assert (out / "metrics.jsonl").read_text() == before


def test_two_ranks_per_client_stay_identical_and_clients_differ(tmp_path):
    out = tmp_path / "rpc2"
    # method=local: with 2 clients any mixing matrix averages them exactly, which would hide a difference.
    torchrun(4, f"output_dir={out}", "max_steps=6", "clients.ranks_per_client=2", "method=local", *FAST)
    summary = json.loads((out / "summary.json").read_text())
    fp = [c["rank_fingerprints"] for c in summary["clients"]]
    assert len(fp) == 2 and all(len(f) == 2 for f in fp)
    assert fp[0][0] == fp[0][1] and fp[1][0] == fp[1][1]
    assert fp[0][0] != fp[1][0]
    recs = records(out)  # method=local: nothing is sent and the clients drift apart
    assert len(recs) == 12 and sum(r["bytes_sent"] for r in recs) == 0
    assert [r for r in recs if r["step"] == 5][0]["consensus_distance"] > 0


# deca runs in the four-client test above, local in the two-ranks-per-client test; dec_lora in test_dec_lora.py
# (under ZeRO 1-3: test_dec_lora_zero.py).
@pytest.mark.parametrize("method", ["badam_gossip", "trivial_bma", "dadam", "centralized"])
def test_every_method_runs(tmp_path, method):
    out = tmp_path / method
    torchrun(2, f"output_dir={out}", f"method={method}", "max_steps=6", *FAST)
    recs = records(out)
    assert len(recs) == 12
    last = [r for r in recs if r["step"] == 5]
    sent = sum(r["bytes_sent"] for r in recs)
    if method == "centralized":
        assert sent == 0
    else:
        assert sent > 0
    if method == "centralized":  # one data-parallel group: both ranks hold the same weights
        assert last[0]["consensus_distance"] == pytest.approx(0.0, abs=1e-7)


def test_zero_clients_of_two_ranks_match_stage0_end_to_end(tmp_path):
    """The recipe with ZeRO inside each client: checkpoints, evaluation and the consensus model work, ranks of a
    client agree, and ZeRO-3 fp32 equals the stage-0 run BIT FOR BIT while only the top block (final norm and LM
    head) has trained: the per-client losses of steps 0-3 and every weight of the step-3 checkpoint.

    No tolerance: both fp32 runs use ``gradient_clipping: 0`` (with clipping, ZeRO computes the global norm over
    flat partitions in another order and the clip coefficient may differ in its last bit),
    ``blocks.order=descending`` and ``blocks.switch_every=3``, so the first 3 steps train the top block, where
    ZeRO-3 computes every gradient in stage 0's order (no gradient-carrying tensor with more than one reader outside
    one module; the reduction over a client's 2 ranks is a sum of two halved, exact; DeepSpeed steps with torch's
    AdamW, which BlockAdam reproduces). The losses of steps 0-3 (step 3's is computed from the weights after those
    three steps, gossip included) are therefore compared with ``==``, and so is each client's step-3 checkpoint
    (``checkpoint_every=3``), tensor by tensor: a loss is a rounded scalar that a last-bit change in one weight need
    not move, the checkpoint is not. From step 3 on ZeRO-3 trains decoder layers, whose gradients its module hooks
    sum in another association (tests/integration/test_zero.py, module docstring), and no bound for later losses or
    the consensus loss can be derived from the float format (the next gradient depends on the weights through the
    loss's Hessian): those are not compared with stage 0 (only that they exist and are finite). The ZeRO-2 bf16 run
    with the optimizer offloaded to the CPU computes in another format than the fp32 reference; no bound on its
    losses after several steps can be derived either, so it is checked to train (same records, finite losses, each
    client's last loss below its first, bf16 checkpoint), not compared numerically."""
    common = ["max_steps=6", "clients.ranks_per_client=2", "checkpoint_every=3", *FAST, "blocks.order=descending",
              "blocks.switch_every=3"]  # after FAST: overrides its switch_every
    exact_steps = 4  # losses of steps 0..3: from weights after the top block's 3 steps (docstring)
    unclipped = {}
    for name in ("cpu_fp32_zero3", "cpu_fp32"):
        ds = json.loads((ROOT / "ds_configs" / f"{name}.json").read_text())
        ds["gradient_clipping"] = 0.0  # the clip coefficient may differ in its last bit (docstring)
        unclipped[name] = tmp_path / f"{name}_noclip.json"
        unclipped[name].write_text(json.dumps(ds))
    z3, z0 = tmp_path / "z3", tmp_path / "z0"
    torchrun(4, f"output_dir={z3}", f"ds_config={unclipped['cpu_fp32_zero3']}", *common)
    torchrun(4, f"output_dir={z0}", f"ds_config={unclipped['cpu_fp32']}", *common)
    a = {(r["step"], r["client"]): r["loss"] for r in records(z3)}
    b = {(r["step"], r["client"]): r["loss"] for r in records(z0)}
    assert sorted(a) == sorted(b)
    assert all(math.isfinite(v) for v in a.values())
    compared = [k for k in a if k[0] < exact_steps]
    assert len(compared) == 2 * exact_steps
    for k in compared:
        assert a[k] == b[k], (k, a[k], b[k])  # exact (docstring): a last-bit difference is a defect
    for client in (0, 1):
        w3, w0 = (torch.load(out / "checkpoints" / "step_00000003" / f"client_{client}" / "state.pt",
                             weights_only=False)["model"] for out in (z3, z0))
        assert sorted(w3) == sorted(w0)
        for name in w0:
            assert torch.equal(w3[name], w0[name]), (client, name, (w3[name] - w0[name]).abs().max().item())
    summary = json.loads((z3 / "summary.json").read_text())
    assert all(len(set(c["rank_fingerprints"])) == 1 for c in summary["clients"])
    assert math.isfinite(summary["consensus"]["loss"])
    assert final_state(z3, 1)["global_step"] == 6
    # bf16 weights at ZeRO-2 with the optimizer offloaded to the CPU: the run trains and saves bf16 weights.
    ds = json.loads((ROOT / "ds_configs" / "cpu_fp32_zero2.json").read_text())
    ds.update(bf16={"enabled": True})
    ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    (tmp_path / "z2bf16.json").write_text(json.dumps(ds))
    zb = tmp_path / "z2bf16"
    torchrun(4, f"output_dir={zb}", f"ds_config={tmp_path / 'z2bf16.json'}", "model.dtype=bf16", *common)
    c = {(r["step"], r["client"]): r["loss"] for r in records(zb)}
    assert sorted(c) == sorted(b)
    assert all(math.isfinite(v) for v in c.values())
    assert all(c[(5, k)] < c[(0, k)] for k in (0, 1)), c  # it trains (measured: 5.69 -> 4.03 nats for client 0)
    assert final_state(zb, 0)["model"]["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16


class _Evil:
    """Unpickling it would run a shell command: weights-only loading must refuse it."""

    def __reduce__(self):
        import os

        return (os.system, ("true",))


def test_resume_legs_apply_a_changed_lr_and_refuse_a_changed_run(tmp_path):
    """run.json gains one leg per start and is never overwritten; a resumed leg's new optim.lr is the one it trains
    with (not the checkpoint's); a resume that changes the number of clients is refused before anything is written."""
    out = tmp_path / "run"
    torchrun(2, f"output_dir={out}", "max_steps=4", *FAST)
    before = (out / "run.json").read_bytes()
    refused = torchrun(3, f"output_dir={out}", "max_steps=6", "resume=true", *FAST, check=False)
    assert refused.returncode != 0 and "num_clients: 2 -> 3" in refused.stderr
    assert (out / "run.json").read_bytes() == before  # a refused resume writes nothing
    # One client's state carries a Python object: every rank refuses (rank 1 names rank 0), none waits for it.
    evil = tmp_path / "evil"
    shutil.copytree(out, evil)
    torch.save({"x": _Evil()}, evil / "checkpoints" / "step_00000004" / "client_0" / "state.pt")
    refused = torchrun(2, f"output_dir={evil}", "max_steps=6", "resume=true", *FAST, check=False)
    assert refused.returncode != 0 and "holds a Python object" in refused.stderr, refused.stderr[-4000:]
    assert "rank 0 cannot load its state" in refused.stderr and "neighbour" not in refused.stderr
    assert (evil / "run.json").read_bytes() == before
    torchrun(2, f"output_dir={out}", "max_steps=6", "resume=true", "optim.lr=1e-3", *FAST)
    legs = json.loads((out / "run.json").read_text())["legs"]
    assert [leg["leg"] for leg in legs] == [0, 1] and legs[1]["resumed_from"] == "step_00000004"
    assert any(c.startswith("optim.lr: 0.01 -> 0.001") for c in legs[1]["changed"]), legs[1]["changed"]
    lrs = {r["step"]: r["lr"] for r in records(out) if "lr" in r}
    assert [lrs[s] for s in range(6)] == [1e-2] * 4 + [1e-3] * 2

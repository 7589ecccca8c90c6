"""The simulator is the launcher path in one process: same config -> the same per-client losses, blocks, bytes,
consensus distances and weights, bit for bit.

One ``torchrun --nproc_per_node 2 recipes/finetune.py`` launch (2 clients, gloo on CPU) and one ``run_simulation``
of the same settings. No tolerance: both paths do the same float operations in the same order (forward/backward of
the same model on the same batches, one thread per process; DeepSpeed's loss / accumulation steps and its clipping
arithmetic, restated in deca_ds.step; BlockAdam; the Mixer's own mixing function, own term first then neighbours in
Topology.neighbors order; the launcher's consensus-distance arithmetic, whose all-reduce of 2 values is one exact
commutative addition). A tolerance here would be wrong: Adam turns any rounding difference on a near-zero gradient
into an lr-sized step, so "close" runs cannot be told from subtly different ones (the old 2e-4 bound failed on
clean runs).
"""

import json
from pathlib import Path

import pytest
import torch
from launch import RECIPE, torchrun

from deca_ds.config import load_config
from deca_ds.simulate import run_simulation
SETTINGS = ["method=deca", "deca.signal=qgm", "max_steps=6", "blocks.switch_every=2", "optim.lr=1e-2",
            "topology.name=ring", "data.num_examples=400", "data.eval_examples=4", "data.min_partition_size=4",
            "log_every=1", "blocks.include_embeddings=false", "blocks.include_lm_head=false", "optim.schedule=cosine",
            "optim.warmup_steps=2", "blocks.layers_per_block=1"]


def _records(path: Path) -> dict[tuple[int, int], dict]:
    return {(r["step"], r["client"]): r for r in map(json.loads, path.read_text().splitlines())}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.integration
def test_simulator_matches_two_process_launch(tmp_path):
    launched, simulated = tmp_path / "launched", tmp_path / "simulated"
    torchrun(RECIPE, f"output_dir={launched}", *SETTINGS, timeout=300)

    summary = run_simulation(load_config(None, [f"output_dir={simulated}", "num_clients=2", "backend=simulate",
                                                "simulate.stacked=false",
                                                *SETTINGS]), quiet=True)

    a, b = _records(launched / "metrics.jsonl"), _records(simulated / "metrics.jsonl")
    assert sorted(a) == sorted(b) == [(s, c) for s in range(6) for c in range(2)]
    blocks = set()
    for key in a:
        ra, rb = a[key], b[key]
        assert rb["loss"] == ra["loss"], key
        assert rb["block"] == ra["block"] and rb["lr"] == ra["lr"], key
        assert rb["bytes_sent"] == ra["bytes_sent"] > 0, key
        assert rb["consensus_distance"] == ra["consensus_distance"], key
        blocks.add(ra["block"])
    assert len(blocks) == 3  # three blocks visited: the switches happened at the same steps in both
    # the two clients really trained differently (non-IID), so equal losses per client are not a coincidence: their
    # losses differ at every step (different batches; how much depends on the settings, so no size is asserted)
    assert all(a[(s, 0)]["loss"] != a[(s, 1)]["loss"] for s in range(6))

    wa, wb = _weights(launched / "consensus"), _weights(simulated / "consensus")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wb[k], wa[k]), (k, float((wb[k] - wa[k]).abs().max()))
    launched_summary = json.loads((launched / "summary.json").read_text())
    for ca, cb in zip(launched_summary["clients"], summary["clients"]):
        assert cb["bytes_sent"] == ca["bytes_sent"]
        assert cb["final_loss"] == ca["final_loss"]


@pytest.mark.integration
def test_three_clients_bf16_wire_every_client_model_bit_equal(tmp_path):
    """Three clients on a ring (two neighbours each: the accumulation order matters), bf16 on the wire,
    the discrepancy signal: every loss and every client's final model are bit-equal to a 3-process launch.

    The consensus model (average of the clients) is compared within the rounding of a 3-term fp32 sum taken in
    another order (gloo's all-reduce vs the simulator's stacked mean) and divided by 3: at most two additions, each
    off by <= u = 2**-24 of a partial sum bounded by sum_c |x_c|, and one division off by <= u/2 of the mean, so
    |delta| <= 2.5 * u * sum_c |x_c| elementwise, with x_c the (bit-equal) client weights.
    """
    settings = ["method=deca", "deca.signal=discrepancy", "gossip.dtype=bf16", "max_steps=6",
                "blocks.switch_every=2", "optim.lr=1e-2", "topology.name=ring", "data.num_examples=400",
                "data.eval_examples=4", "data.min_partition_size=4", "log_every=1", "model.save_client_models=true",
                "blocks.layers_per_block=1"]
    launched, simulated = tmp_path / "launched", tmp_path / "simulated"
    torchrun(RECIPE, f"output_dir={launched}", *settings, nproc=3, timeout=300)
    run_simulation(load_config(None, [f"output_dir={simulated}", "num_clients=3", "backend=simulate",
                                   "simulate.stacked=false", *settings]),
                   quiet=True)

    a, b = _records(launched / "metrics.jsonl"), _records(simulated / "metrics.jsonl")
    assert sorted(a) == sorted(b) == [(s, c) for s in range(6) for c in range(3)]
    for key in a:
        assert b[key]["loss"] == a[key]["loss"] and b[key]["bytes_sent"] == a[key]["bytes_sent"] > 0, key
    clients = []
    for c in range(3):
        wa, wb = _weights(launched / "clients" / f"client_{c}"), _weights(simulated / "clients" / f"client_{c}")
        for k in wa:
            assert torch.equal(wb[k], wa[k]), (c, k)
        clients.append(wa)
    ca, cb = _weights(launched / "consensus"), _weights(simulated / "consensus")
    for k in ca:
        bound = 2.5 * 2.0**-24 * sum(w[k].abs() for w in clients)
        assert bool(((ca[k] - cb[k]).abs() <= bound).all()), k


@pytest.mark.integration
def test_three_clients_int8_compressed_gossip_every_client_model_bit_equal(tmp_path):
    """gossip.compression=int8 with error feedback: a 3-process launch (each Mixer sends pieces of 512 values, cut
    inside tensors, through a ring of small receive buffers) and the simulator (whole tensors) give the same losses,
    bytes and client models bit for bit, over two block visits (each: a bf16 first exchange, then int8)."""
    settings = ["method=deca", "deca.signal=qgm", "gossip.compression=int8", "gossip.chunk_mb=0.01", "max_steps=6",
                "blocks.switch_every=3", "optim.lr=1e-2", "topology.name=ring", "data.num_examples=400",
                "data.eval_examples=4", "data.min_partition_size=4", "log_every=1", "model.save_client_models=true",
                "blocks.layers_per_block=1"]
    launched, simulated = tmp_path / "launched", tmp_path / "simulated"
    torchrun(RECIPE, f"output_dir={launched}", *settings, nproc=3, timeout=300)
    run_simulation(load_config(None, [f"output_dir={simulated}", "num_clients=3", "backend=simulate",
                                   "simulate.stacked=false", *settings]),
                   quiet=True)

    a, b = _records(launched / "metrics.jsonl"), _records(simulated / "metrics.jsonl")
    assert sorted(a) == sorted(b) == [(s, c) for s in range(6) for c in range(3)]
    for key in a:
        assert b[key]["loss"] == a[key]["loss"] and b[key]["bytes_sent"] == a[key]["bytes_sent"] > 0, key
    # (consensus distances are not compared: gloo sums 3 clients' terms in another order than the simulator)
    # an int8 step (1 byte a value + a 2-byte scale per 256) sends about half the bf16 first exchange (2 bytes)
    assert a[(1, 0)]["bytes_sent"] < a[(0, 0)]["bytes_sent"] / 1.9
    for c in range(3):
        wa, wb = _weights(launched / "clients" / f"client_{c}"), _weights(simulated / "clients" / f"client_{c}")
        for k in wa:
            assert torch.equal(wb[k], wa[k]), (c, k)

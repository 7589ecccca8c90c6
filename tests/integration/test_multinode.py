"""Two machines, emulated on localhost: the README's multi-node launches give the run a single-machine launch gives.

`deepspeed --hostfile` with two hosts normally reaches the second over ssh (pdsh); DeepSpeed's `--no_ssh` instead
starts the same runner on every node with its `--node_rank`, which is what this test does on one machine: two
runners, a hostfile naming two hosts of 2 slots, the same master address and port. `torchrun --nnodes 2
--node_rank k` is the other documented way. Either way a process's global RANK (2 * node + local) differs from
its LOCAL_RANK on the second node, so a client id, a data shard, a seed or a neighbour taken from the wrong one
shows up as a different loss.

The reference is the simulator with one client per rank (`simulate.stacked=false`), bit for bit: it is equal to a
single-machine launch by `test_simulate_parity.py` (no tolerance: the same float operations in the same order; the
consensus distance is not compared, gloo sums 4 clients' terms in another order than the simulator).
"""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from launch import ROOT, launch_env, two_machine_commands

from deca_ds.config import load_config
from deca_ds.simulate import run_simulation

pytestmark = pytest.mark.integration

SETTINGS = ["method=deca", "max_steps=4", "blocks.switch_every=2", "blocks.layers_per_block=1", "optim.lr=1e-2",
            "topology.name=ring",
            "data.num_examples=400", "data.eval_examples=4", "data.min_partition_size=4", "log_every=1",
            "model.save_client_models=true"]


def _records(path: Path) -> dict[tuple[int, int], dict]:
    return {(r["step"], r["client"]): r for r in map(json.loads, path.read_text().splitlines())}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _two_nodes(launcher: str, tmp_path: Path, out: Path) -> None:
    """Start both "machines" of a 2 x 2-process launch at once and wait for both."""
    cmds = two_machine_commands(launcher, tmp_path, 2, [[f"output_dir={out}", *SETTINGS]] * 2)
    procs = [subprocess.Popen(c, cwd=ROOT, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for c in cmds]
    try:
        logs = [p.communicate(timeout=400)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for k, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"node {k} exit {p.returncode}\n{log[-6000:]}"


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    out = tmp_path_factory.mktemp("multinode") / "simulated"
    run_simulation(load_config(None, [f"output_dir={out}", "num_clients=4", "backend=simulate",
                                      "simulate.stacked=false", *SETTINGS]), quiet=True)
    return out


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_two_node_launch_equals_the_simulator_bit_for_bit(launcher, simulated, tmp_path):
    out = tmp_path / "launched"
    _two_nodes(launcher, tmp_path, out)
    a, b = _records(out / "metrics.jsonl"), _records(simulated / "metrics.jsonl")
    assert sorted(a) == sorted(b) == [(s, c) for s in range(4) for c in range(4)]
    for key in a:
        assert a[key]["loss"] == b[key]["loss"], key
        assert a[key]["block"] == b[key]["block"] and a[key]["bytes_sent"] == b[key]["bytes_sent"] > 0, key
    # the clients trained on different shards (non-IID): equal losses per client are not a coincidence
    assert len({a[(0, c)]["loss"] for c in range(4)}) == 4
    for c in range(4):
        wa, wb = _weights(out / "clients" / f"client_{c}"), _weights(simulated / "clients" / f"client_{c}")
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (c, k)
    assert json.loads((out / "summary.json").read_text())["num_clients"] == 4
    assert (out / "consensus" / "model.safetensors").is_file()

"""Two machines started with different settings stop at start-up, both naming the difference; per-machine paths do not.

Each site starts its own machine with its own command line (``torchrun --nnodes 2 --node_rank k`` or ``deepspeed
--hostfile ... --no_ssh --node_rank k``, emulated here on localhost as in ``test_multinode.py``). Before this check a
different ``optim.lr`` trained silently wrong and a different graph or block layout hung until ``comm_timeout``.
"""

import json
import re
import subprocess
import sys
from importlib import resources

import pytest
from launch import FAST, ROOT, free_port, launch_env, two_machine_commands

from deca_ds.errors import EXIT_CONFIG

pytestmark = pytest.mark.integration

SETTINGS = [*FAST, "max_steps=2", "log_every=1", "data.num_examples=200", "data.min_partition_size=4",
            "comm_timeout=60"]


def _both(cmds: list[list[str]], envs: list[dict] | None = None,
          timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Start both "machines" at once (``envs``: extra environment of each) and wait for both (killed, by handle, if
    they outlive ``timeout``)."""
    envs = envs or [{} for _ in cmds]
    procs = [subprocess.Popen(c, cwd=ROOT, env=dict(launch_env(), **e), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c, e in zip(cmds, envs)]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [subprocess.CompletedProcess(c, p.returncode, o, e) for c, p, (o, e) in zip(cmds, procs, outs)]


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_machines_started_with_another_learning_rate_are_refused_on_both(launcher, tmp_path):
    out = tmp_path / "run"
    cmds = two_machine_commands(launcher, tmp_path, 1,
                                [[f"output_dir={out}", *SETTINGS, f"optim.lr={lr}"] for lr in ("1e-3", "2e-3")])
    for k, res in enumerate(_both(cmds)):
        log = res.stdout + res.stderr
        if launcher == "deepspeed":  # the runner passes its worker's exit code on
            assert res.returncode == EXIT_CONFIG, f"machine {k} exit {res.returncode}\n{log[-6000:]}"
        else:  # torchrun exits 1 itself and names the worker's exit code
            assert res.returncode != 0, f"machine {k}\n{log[-6000:]}"
            assert re.search(rf"exitcode\s*:\s*{EXIT_CONFIG}\b", log), f"machine {k}\n{log[-6000:]}"
        lines = [line for line in log.splitlines() if line.startswith("deca_ds: error:")]
        assert lines, f"machine {k}\n{log[-6000:]}"
        assert "optim.lr: rank 0 has 0.001, rank 1 has 0.002" in lines[0], lines[0]
        assert "start every machine with the same settings" in lines[0], lines[0]
    # Refused before anything was written: no run record, no metrics, not even the directory.
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())


_AGREE = """
import sys
from deca_ds.config import load_config
from deca_ds.engine import setup_distributed
from deca_ds.trainer import _agree_on_settings, preflight

cfg = load_config(None, sys.argv[1:])
pre = preflight(cfg, 2, None)
setup_distributed(cfg.comm_timeout)
_agree_on_settings(cfg, pre.ds_config, pre.layout, pre.topology)
print("agreed", flush=True)
"""


def test_per_machine_paths_and_patience_are_not_refused(tmp_path):
    """The same run with each machine's own output_dir, data file (two copies of one file), model directory (two
    copies of one config.json) and comm_timeout passes the start-up check on both machines."""
    rows = [{"instruction": f"Say {w}", "input": "", "output": w} for w in ("yes", "no", "maybe", "never") * 10]
    tiny = json.loads(resources.files("deca_ds").joinpath("assets/tiny_llama.json").read_text())
    port = str(free_port())
    cmds, envs = [], []
    for k in (0, 1):
        site = tmp_path / f"site_{k}"
        (site / "model").mkdir(parents=True)
        (site / f"data_{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (site / "model" / "config.json").write_text(json.dumps(dict(tiny, _name_or_path=str(site / "model"))))
        envs.append({"RANK": str(k), "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1",
                     "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
        cmds.append([sys.executable, "-c", _AGREE, f"output_dir={site / 'out'}", *SETTINGS,
                     f"data.path={site / f'data_{k}.jsonl'}", f"model.path={site / 'model'}", "data.partition=iid",
                     "data.eval_examples=4", f"comm_timeout={60 + 30 * k}"])
    for k, res in enumerate(_both(cmds, envs)):
        assert res.returncode == 0 and "agreed" in res.stdout, \
            f"machine {k} exit {res.returncode}\n{res.stderr[-4000:]}"
    assert not any((tmp_path / f"site_{k}" / "out").exists() for k in (0, 1))

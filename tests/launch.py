"""Shared pieces of the tests that launch ``recipes/finetune.py`` or another script for real (torchrun, deepspeed)."""

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from dist import free_port  # noqa: F401  (re-exported: one port picker for every launching test)

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "finetune.py")
# Small but real: a few switches per block, enough rows that every client has data.
# One layer per block, as the library default (recipes/finetune.py without --config gives the embedded model its own
# schedule, deca_ds.cli.EMBEDDED_SCHEDULE, 2 layers per block, which a test comparing a launch with load_config(None)
# would otherwise not share).
FAST = ["data.num_examples=600", "data.eval_examples=16", "blocks.switch_every=2", "blocks.layers_per_block=1"]


def launch_env() -> dict:
    """The environment of a launched run: CPU accelerator, one thread per rank, nothing from the network."""
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")


def torchrun_command(script, *args, nproc: int = 2, launcher_args: Sequence[str] = (),
                     port: int | None = None) -> list[str]:
    """The command line of a ``torchrun`` launch (``python -m torch.distributed.run``, this interpreter's torch), for
    :func:`run_launch` or ``subprocess.Popen``.

    Args:
        script: the script every worker runs (a path).
        *args: the script's own arguments.
        nproc: workers on this machine (``--nproc_per_node``).
        launcher_args: more torchrun options, e.g. ``["--max-restarts", "1"]`` or a node's ``--nnodes``/``--node_rank``.
        port: the master port; a free one when None (machines of one multi-node run must share it).
    """
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *launcher_args,
            "--master_port", str(free_port() if port is None else port), str(script), *args]


def deepspeed_command(script, *args, nproc: int | None = 2, launcher_args: Sequence[str] = (),
                      port: int | None = None) -> list[str]:
    """The command line of a ``deepspeed`` launcher run (the venv's ``deepspeed`` script), for :func:`run_launch` or
    ``subprocess.Popen``.

    Args:
        script: the script every worker runs (a path).
        *args: the script's own arguments.
        nproc: workers (``--num_gpus``); None leaves the count to ``launcher_args`` (a hostfile's slots).
        launcher_args: more launcher options, e.g. a node's ``--hostfile``, ``--no_ssh`` and ``--node_rank``.
        port: the master port; a free one when None (machines of one multi-node run must share it).
    """
    # Not on PATH when the venv is used without being activated: its bin/ sits next to the interpreter.
    exe = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    count = [] if nproc is None else ["--num_gpus", str(nproc)]
    return [exe, *count, *launcher_args, "--master_port", str(free_port() if port is None else port), str(script),
            *args]


def two_machine_commands(launcher: str, folder: Path, nproc: int, machine_args: Sequence[Sequence[str]]
                         ) -> list[list[str]]:
    """The commands of a two-machine launch of ``recipes/finetune.py`` emulated on localhost, one per machine, to
    start at once: ``deepspeed`` with a hostfile (``--no_ssh``, ``--node_rank k``) or ``torchrun --nnodes 2``, both
    machines on one master port.

    Args:
        launcher: ``deepspeed`` or ``torchrun``.
        folder: where the hostfile is written (deepspeed).
        nproc: workers per machine.
        machine_args: the recipe's arguments on machine 0 and on machine 1.
    """
    port = free_port()
    if launcher == "deepspeed":
        hostfile = folder / "hostfile"
        hostfile.write_text(f"node-a slots={nproc}\nnode-b slots={nproc}\n")
        return [deepspeed_command(RECIPE, *args, nproc=None, port=port,
                                  launcher_args=["--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(k),
                                                 "--master_addr", "127.0.0.1"])
                for k, args in enumerate(machine_args)]
    return [torchrun_command(RECIPE, *args, nproc=nproc, port=port,
                             launcher_args=["--nnodes", "2", "--node_rank", str(k), "--master_addr", "127.0.0.1"])
            for k, args in enumerate(machine_args)]


def run_launch(cmd: list[str], *, timeout: float, check: bool = True) -> subprocess.CompletedProcess:
    """Run a launch command to its end from the repository root, in :func:`launch_env`, its output captured.

    Args:
        cmd: the command (:func:`torchrun_command`, :func:`deepspeed_command`).
        timeout: seconds before ``subprocess.TimeoutExpired``; only there to catch a hang.
        check: fail the test when the launch exits non-zero.

    Returns:
        The finished process (``returncode``, ``stdout``, ``stderr`` as text).

    Raises:
        AssertionError: ``check`` and a non-zero exit: the exit code, the command and the ends of both outputs.
    """
    res = subprocess.run(cmd, cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"exit {res.returncode}: {' '.join(map(str, cmd))}\n{res.stdout[-3000:]}\n"
                             f"{res.stderr[-6000:]}")
    return res


def torchrun(script, *args, nproc: int = 2, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """The finished torchrun launch of ``script`` on ``nproc`` local workers (:func:`run_launch`).

    Args:
        script: the script every worker runs (a path).
        *args: the script's own arguments.
        nproc: workers (``--nproc_per_node``).
        timeout: seconds before ``subprocess.TimeoutExpired``.
        check: fail the test when the launch exits non-zero.
    """
    return run_launch(torchrun_command(script, *args, nproc=nproc), timeout=timeout, check=check)

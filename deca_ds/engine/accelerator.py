"""Process start and device for the DeepSpeed launcher path: the torch.distributed group, this rank's device,
barriers and peak memory, all through DeepSpeed's accelerator abstraction (no hard ``cuda``)."""

from __future__ import annotations

import importlib
import os
import socket
from datetime import timedelta

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

__all__ = ["setup_distributed", "device", "barrier", "peak_memory_bytes"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(comm_timeout: float) -> None:
    """Start torch.distributed the way DeepSpeed expects, under the deepspeed launcher, torchrun or plain python.

    A plain ``python recipe.py`` becomes a one-rank world (DeepSpeed would otherwise try MPI discovery). On the CPU
    accelerator the unused shared-memory all-reduce op is not built (saves ~45 s and 66 MB of /dev/shm per rank).
    """
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    if get_accelerator().device_name() == "cpu":
        # NB: `import deepspeed.comm.torch as m` would bind the real torch module (name clash): go through importlib.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    if dist.is_initialized():
        return
    backend = get_accelerator().communication_backend_name()
    timeout = timedelta(seconds=comm_timeout)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # Hazard (measured with torch 2.13, gloo): after torchrun's elastic agent restarts the workers, it hands
        # them the same agent-hosted TCPStore, still holding the previous round's process-group keys (torch's
        # rendezvous assumes a new store per round and adds no prefix), so the restarted workers read their dead
        # predecessors' addresses and connectFullMesh fails with "Connection refused". A prefix per restart
        # round keeps every round's keys apart; DeepSpeed then adopts the initialized group.
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                              int(os.environ["WORLD_SIZE"]), is_master=False, timeout=timeout)
        round_ = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend, store=dist.PrefixStore(f"/deca_ds/restart_{round_}", store),
                                rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                                timeout=timeout)
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout, verbose=False)


def device() -> torch.device:
    """This rank's training device."""
    return torch.device(get_accelerator().current_device_name())


def barrier() -> None:
    """World barrier (no-op without a process group)."""
    if dist.is_initialized():
        dist.barrier()


def peak_memory_bytes() -> int:
    """Peak accelerator memory allocated (GPU) or peak resident set size of this process (CPU)."""
    acc = get_accelerator()
    if acc.device_name() != "cpu":
        return int(acc.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

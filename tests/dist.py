"""Run one function on N local processes, the way a launcher would, and bring back every rank's result.

Multi-process tests need real process groups (gloo on localhost) but must stay inside pytest: failures have to show
the child's traceback, a hung rank must not hang the suite, and several checks should share one launch because
process start-up (importing torch) dominates the cost. DeepSpeed's own tests use the same pattern
(``tests/unit/common.py::DistributedTest``).

Usage (the function must be importable, i.e. defined at module level, because children are spawned)::

    from dist import run_distributed   # tests/ is on sys.path (pytest puts conftest.py's folder there)

    def _body(rank, world_size, scale):
        t = torch.full((2,), float(rank)) * scale
        dist.all_reduce(t)
        return t.tolist()

    results = run_distributed(_body, 4, 2.0)   # [[12.0, 12.0]] * 4, indexed by rank

Each child gets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR=127.0.0.1`` and a free ``MASTER_PORT`` (plus
``OMP_NUM_THREADS=1`` and ``DS_ACCELERATOR=cpu`` unless already set), and by default an initialized default process
group (``init=False`` leaves that to the function, e.g. for ``deepspeed.init_distributed``). The group is destroyed
after the function returns. Return values must be picklable; keep them small (lists, floats, numpy arrays).
"""

from __future__ import annotations

import datetime
import os
import queue as queue_module
import socket
import time
import traceback

import torch.multiprocessing as mp

__all__ = ["run_distributed", "free_port", "ring_of_clients", "tiny_llama", "token_batch"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank, world_size, port, backend, init, pg_timeout_s, env, results, args, kwargs):
    os.environ.update({
        "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
    })
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(env)
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        if init:
            dist.init_process_group(
                backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=pg_timeout_s)
            )
        try:
            out = fn(rank, world_size, *args, **kwargs)
        finally:
            if init and dist.is_initialized():
                dist.destroy_process_group()
        results.put((rank, True, out))
    except BaseException:  # noqa: BLE001 - the parent re-raises it with the traceback
        results.put((rank, False, traceback.format_exc()))


def run_distributed(fn, world_size: int, *args, backend: str = "gloo", init: bool = True, timeout: float = 180.0,
                    pg_timeout: float = 60.0, env: dict | None = None, **kwargs) -> list:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` spawned processes and return their results.

    Args:
        fn: a module-level (picklable) function.
        world_size: number of processes.
        *args: extra positional arguments passed to every rank (picklable).
        backend: torch.distributed backend of the default group (``gloo`` on CPU).
        init: initialize (and afterwards destroy) the default process group in each child.
        timeout: seconds the whole run may take; then the children are killed and ``TimeoutError`` raised.
        pg_timeout: timeout of the default process group's collectives, in seconds.
        env: extra environment variables for the children.
        **kwargs: extra keyword arguments passed to every rank (picklable).

    Returns:
        ``[result_of_rank_0, ..., result_of_rank_{world_size-1}]``.

    Raises:
        RuntimeError: a rank raised (the message holds its traceback; the lowest failing rank is reported, with the
            others' first lines) or died without reporting (exit code given).
        TimeoutError: the run exceeded ``timeout``.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_child,
            args=(fn, rank, world_size, port, backend, init, pg_timeout, dict(env or {}), results, args, kwargs),
            daemon=False,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    outcome: dict[int, tuple[bool, object]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outcome) < world_size:
            try:
                rank, ok, value = results.get(timeout=0.2)
                outcome[rank] = (ok, value)
                continue
            except queue_module.Empty:
                pass
            dead = [r for r, p in enumerate(procs) if r not in outcome and p.exitcode is not None]
            if dead:
                time.sleep(0.5)  # a result put just before exit may still be in the pipe
                while not results.empty():
                    rank, ok, value = results.get()
                    outcome[rank] = (ok, value)
                dead = [r for r in dead if r not in outcome]
                if dead:
                    raise RuntimeError(
                        f"rank {dead[0]} of {world_size} exited with code {procs[dead[0]].exitcode} without a result"
                        + _failures(outcome)
                    )
            if time.monotonic() > deadline:
                missing = sorted(set(range(world_size)) - set(outcome))
                raise TimeoutError(
                    f"{fn.__name__} on {world_size} ranks exceeded {timeout:.0f} s; ranks {missing} did not finish"
                    + _failures(outcome)
                )
    finally:
        for p in procs:
            p.join(timeout=10 if len(outcome) == world_size else 1)
        for p in procs:
            if p.is_alive():  # only our own children, by handle
                p.kill()
                p.join(timeout=5)
        results.close()
    failed = sorted(r for r, (ok, _) in outcome.items() if not ok)
    if failed:
        raise RuntimeError(f"rank {failed[0]} of {world_size} failed:\n{outcome[failed[0]][1]}" + _failures(outcome))
    return [outcome[r][1] for r in range(world_size)]


def _failures(outcome: dict) -> str:
    lines = [f"  rank {r}: {str(v).strip().splitlines()[-1]}" for r, (ok, v) in sorted(outcome.items()) if not ok]
    return ("\nfailures:\n" + "\n".join(lines)) if lines else ""


def ring_of_clients(world, rank):
    """Inside a :func:`run_distributed` child: the process group and one-rank clients on a ring.

    Returns:
        This rank's ``(layout, topology, groups)``: :class:`deca_ds.gossip.ClientLayout`, the ring, and
        :class:`deca_ds.gossip.ClientGroups` (created in the same order on every rank).
    """
    import deca_ds.engine as E
    from deca_ds.gossip import ClientGroups, ClientLayout
    from deca_ds.topology import make_topology

    E.setup_distributed(120)
    layout = ClientLayout(world, rank, 1)
    return layout, make_topology("ring", layout.num_clients), ClientGroups.create(layout)


def tiny_llama():
    """A 2-layer Llama of 64 tokens, the same weights on every call and in every process (seed 0, RNG untouched)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                      tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg)


def token_batch(client, step):
    """One micro-batch (2 rows of 12 random tokens of ``tiny_llama``'s vocabulary), a pure function of (client, step)."""
    import torch

    g = torch.Generator().manual_seed(1000 * client + step)
    ids = torch.randint(0, 64, (2, 12), generator=g)
    return [{"input_ids": ids, "labels": ids}]


def once_per_session(request, tmp_path_factory, name: str, fn):
    """``fn()``'s result, computed once for the whole test session, also under pytest-xdist.

    Without xdist a session fixture already runs once. Under xdist each worker has its own session, and the tests that
    share a launch may be drawn by different workers: the first worker to get here runs ``fn`` under a file lock in
    the directory every worker's temporary directory lives in, and stores the result; the others wait for the lock
    and read it (pytest-xdist's documented recipe). A failed ``fn`` stores nothing: the next worker runs it again and
    fails on its own.

    Args:
        request: the requesting fixture's ``request`` (its config tells whether this is an xdist worker).
        tmp_path_factory: pytest's session ``tmp_path_factory``.
        name: the file name the result is kept under (one per launch).
        fn: what to run; its result must pickle.
    """
    if getattr(request.config, "workerinput", None) is None:  # not an xdist worker
        return fn()
    import pickle

    from filelock import FileLock  # a dependency of transformers and huggingface_hub

    root = tmp_path_factory.getbasetemp().parent
    path = root / f"{name}.pickle"
    with FileLock(str(path) + ".lock"):
        if path.is_file():
            return pickle.loads(path.read_bytes())
        result = fn()
        path.write_bytes(pickle.dumps(result))
        return result

"""The decentralized fine-tuning run behind ``recipes/finetune.py``: checks, build, loop, checkpoints, outputs.

Order of a run (every rank, same order — collectives must match):
  1. every check that needs no process (config, ds_config, model/data paths, output_dir) -> one-line errors;
  2. process group, client layout, topology, all communication groups (before DeepSpeed, same order everywhere);
  3. model and tokenizer, this client's data, the DeepSpeed engine; resume from ``checkpoints/latest``;
  4. the loop: one step on every client -> one small all-gather of monitoring figures -> log, checkpoint, stop?;
  5. final checkpoint, evaluation of every client, the consensus model (average of all clients) saved and evaluated.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from deca_ds import checkpoint as ckpt
from deca_ds.config import ConfigError, RunConfig
from deca_ds.metrics import JsonlWriter, make_progress, truncate_jsonl_after
from deca_ds.summary import evaluate_clients, finish

# Per-rank monitoring row, all-gathered every step (float64 for exact byte counts), in this order:
# loss, nonfinite, stop requested, bytes sent, tokens, consensus distance.


class NonFiniteError(RuntimeError):
    """A client produced a non-finite loss or gradient and ``nan_policy=stop``."""


class _StopFlag:
    """SIGTERM/SIGINT request a clean stop: finish the step on every client, checkpoint, exit."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def preflight(cfg: RunConfig, world_size: int, ds_config_path: str | None):
    """All checks that need no process group. Returns the DeepSpeed config dict.

    Raises:
        ConfigError: the first problem found, as one line naming the setting and the fix.
    """
    from deca_ds.data import check_data_config
    from deca_ds.ds_config import check_ds_config, load_ds_config
    from deca_ds.gossip import ClientLayout
    from deca_ds.models import check_model_config
    from deca_ds.topology import make_topology

    if world_size % cfg.clients.ranks_per_client:
        raise ConfigError(f"clients.ranks_per_client={cfg.clients.ranks_per_client} does not divide the "
                          f"{world_size} launched ranks: launch a multiple of it or change it")
    num_clients = world_size // cfg.clients.ranks_per_client
    ds = load_ds_config(ds_config_path or cfg.ds_config)
    check_ds_config(ds, cfg)
    check_model_config(cfg.model)
    _check_blocks(cfg)
    if cfg.method != "local" and cfg.method != "centralized":
        try:
            topo = make_topology(cfg.topology.name, num_clients, seed=cfg.topology.seed, weights=cfg.topology.weights,
                                 **_topology_options(cfg))
        except (ValueError, OSError) as e:
            raise ConfigError(f"topology.name={cfg.topology.name!r}: {str(e).splitlines()[0]}") from None
        ClientLayout(world_size, 0, cfg.clients.ranks_per_client).check_topology(topo)
    # Only this rank's client's data: on a real deployment a site holds only its own file.
    rank = int(os.environ.get("RANK", "0"))
    check_data_config(cfg, num_clients, client_id=rank // cfg.clients.ranks_per_client)
    ckpt.prepare_output_dir(cfg.output_dir, cfg.resume)
    return ds


def _check_blocks(cfg: RunConfig) -> None:
    """Partition the model on the meta device as training will, so bad block settings fail before anything runs."""
    from deca_ds.blocks import partition_blocks
    from deca_ds.models import build_meta_model

    try:
        model = build_meta_model(cfg.model.path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.path={cfg.model.path!r}: its config.json cannot be read ({str(e).splitlines()[0][:160]})"
                          ": give a Hugging Face model directory") from None
    b = cfg.blocks
    try:
        part = partition_blocks(model, layers_per_block=b.layers_per_block, include_embeddings=b.include_embeddings,
                                include_lm_head=b.include_lm_head, prefixes=b.prefixes)
    except ValueError as e:
        key = "blocks.prefixes" if b.prefixes else "blocks"
        raise ConfigError(f"{key}: {' '.join(str(e).split())}") from None
    if b.fixed_order is not None:
        bad = [i for i in b.fixed_order if not 0 <= i < len(part)]
        if bad:
            raise ConfigError(f"blocks.fixed_order={b.fixed_order} names block(s) {bad} but the model has "
                              f"{len(part)} blocks: use indices 0..{len(part) - 1}")


def _topology_options(cfg: RunConfig) -> dict[str, Any]:
    t = cfg.topology
    if t.name == "erdos_renyi":
        return {"p": t.p}
    if t.name == "custom":
        return {"path": t.path}
    return {}


def _gather_rows(row: list[float]) -> torch.Tensor:
    """All ranks' monitoring rows, shape [world, 6] (gloo and NCCL alike: done on the row's device)."""
    from deca_ds.engine import device

    t = torch.tensor(row, dtype=torch.float64, device=device())
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return torch.stack(out).cpu()


def _consensus_distance(tensors: list[torch.Tensor]) -> float:
    """RMS distance of this rank's active block from the network average: ||x_i - mean_j x_j|| / sqrt(numel).

    One all-reduce of the block over all ranks (every rank of a client holds the same values, and every client has
    the same number of ranks, so the world mean is the mean over clients). Monitoring only, at log steps.
    """
    world = dist.get_world_size()
    sq, numel = 0.0, 0
    for x in tensors:
        mean = x.detach().float().clone()
        dist.all_reduce(mean)
        mean.div_(world)
        sq += float((x.detach().float() - mean).pow(2).sum())
        numel += x.numel()
    return math.sqrt(sq / max(numel, 1))


def _gather_counts(counts, layout):
    """Each client's own row of the partition summary, gathered (per-client files: nobody sees all data)."""
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, counts[0].tolist())
    import numpy as np

    return np.array([rows[layout.client_ranks(c)[0]] for c in range(layout.num_clients)])


def _micro_batches(data, engine, cfg: RunConfig, step: int, layout, pad_id: int) -> list[dict[str, torch.Tensor]]:
    from deca_ds.data import batch_for_step

    gas, mbs, rpc = engine.gradient_accumulation_steps, engine.micro_batch_size, cfg.clients.ranks_per_client
    return [batch_for_step(data.train, (step * gas + m) * rpc + layout.local_rank, mbs, cfg.data.seed,
                           layout.client_id, pad_id) for m in range(gas)]


def run(cfg: RunConfig, ds_config_path: str | None = None) -> dict[str, Any] | None:
    """Run one decentralized fine-tune on this rank. Returns the summary on rank 0, None elsewhere.

    Raises:
        ConfigError: bad settings (raised before anything is written).
        NonFiniteError: ``nan_policy=stop`` and some client produced a non-finite value.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    ds = preflight(cfg, world_size, ds_config_path)

    from deca_ds.data import build_client_data, write_partition_summary
    from deca_ds.ds_config import uses_activation_checkpointing
    from deca_ds.engine import barrier, build_engine, setup_distributed
    from deca_ds.gossip import ClientGroups, ClientLayout, Mixer
    from deca_ds.models import load_model_and_tokenizer
    from deca_ds.topology import make_topology

    setup_distributed(cfg.comm_timeout)
    rank = dist.get_rank()
    layout = ClientLayout(dist.get_world_size(), rank, cfg.clients.ranks_per_client)
    topo = make_topology(cfg.topology.name, layout.num_clients, seed=cfg.topology.seed,
                         weights=cfg.topology.weights, **_topology_options(cfg))
    groups = ClientGroups.create(layout)
    out = Path(cfg.output_dir)
    barrier()  # every rank has checked output_dir before rank 0 writes into it
    is_writer = layout.local_rank == 0
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / ckpt.RUN_MARKER).write_text(json.dumps({"config": cfg.to_dict(), "ds_config": ds,
                                                        "world_size": layout.world_size}, indent=2))
    from rich.console import Console

    console = Console(stderr=True)
    if cfg.model.gradient_checkpointing is False and uses_activation_checkpointing(ds):
        cfg.model.gradient_checkpointing = True
    model, tokenizer = load_model_and_tokenizer(cfg.model, seed=cfg.seed)
    data = build_client_data(cfg, tokenizer, layout.client_id, layout.num_clients)
    counts = data.counts
    if data.counts_local_only:  # per-client files: only this client's row is known locally
        counts = _gather_counts(counts, layout)
    if rank == 0:
        write_partition_summary(counts, data.count_names, out, console=console)
        if layout.num_clients > 1 and cfg.method not in ("local", "centralized"):
            topo.render(console=console)
    mixer = Mixer(layout, topo, chunk_bytes=int(cfg.gossip.chunk_mb * 2**20),
                  comm_dtype=torch.bfloat16 if cfg.gossip.dtype == "bf16" else torch.float32,
                  timeout=cfg.comm_timeout, dp_group=groups.client_group)
    engine = build_engine(cfg, model, ds, groups, mixer=mixer)
    start_step = 0
    latest = ckpt.latest_checkpoint(out) if cfg.resume else None
    if latest is not None:
        engine.load_state_dict(ckpt.read_client_state(latest, layout.client_id))
        start_step = engine.global_step
        if rank == 0:
            truncate_jsonl_after(out / "metrics.jsonl", start_step)
            console.print(f"resumed from {latest} at step {start_step}")
    if engine.block_optimizer is not None and rank == 0:
        engine.block_optimizer.schedule.warn_if_incomplete(cfg.max_steps)
    writer = JsonlWriter(out / "metrics.jsonl") if rank == 0 else None
    last_loss = {}
    step = start_step

    def save(at_step: int) -> None:
        def state_fn():
            state = engine.state_dict()
            if not ckpt.all_finite(state["model"].values()):
                raise NonFiniteError(f"client {layout.client_id}: non-finite weights at step {at_step}; "
                                     "the checkpoint was not written")
            return state
        if getattr(engine, "collective_state_dict", False):  # ZeRO: every rank of the client takes part
            state = state_fn()
            ckpt.save_checkpoint(out, at_step, layout.client_id, is_writer, lambda: state, cfg.keep_checkpoints,
                                 barrier)
        else:
            ckpt.save_checkpoint(out, at_step, layout.client_id, is_writer, state_fn, cfg.keep_checkpoints, barrier)

    t0, tokens_total = time.perf_counter(), 0
    progress = make_progress(console) if rank == 0 else None
    stopped_early = False
    try:
        with _StopFlag() as stop_flag:
            if progress is not None:
                progress.start()
                task = progress.add_task("train", total=cfg.max_steps, completed=start_step, round=0, block=0,
                                         loss=float("nan"), tps=0.0)
            while step < cfg.max_steps:
                res = engine.train_step(_micro_batches(data, engine, cfg, step, layout, tokenizer.pad_token_id))
                log_now = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps
                cdist = _consensus_distance(engine.block_tensors(res["block"])) if (
                    log_now and layout.num_clients > 1) else 0.0
                rows = _gather_rows([res["loss"], float(res["nonfinite"]), float(stop_flag.requested),
                                     float(res["bytes_sent"]), float(res["tokens"]), cdist])
                step += 1
                tokens_total += int(rows[:, 4].sum())
                bad = [int(r) // layout.ranks_per_client for r in torch.nonzero(rows[:, 1]).flatten().tolist()]
                if bad and cfg.nan_policy == "stop":
                    raise NonFiniteError(f"client {bad[0]} produced a non-finite loss or gradient at step {step - 1} "
                                         "(nan_policy=stop); the last complete checkpoint is kept")
                if rank == 0:
                    events = []
                    for c in range(layout.num_clients):
                        r = layout.client_ranks(c)
                        loss = float(rows[r, 0].mean())
                        last_loss[c] = loss
                        events += [(f"Train/Samples/client_{c}/loss", loss, step),
                                   (f"Train/Samples/client_{c}/consensus_distance", float(rows[r[0], 5]), step)]
                        if log_now:
                            writer.write({"step": step - 1, "client": c, "loss": loss, "block": res["block"],
                                          "lr": engine.lr(), "consensus_distance": float(rows[r[0], 5]),
                                          "bytes_sent": int(rows[r, 3].sum()), "nonfinite": bool(rows[r, 1].any()),
                                          "time": time.perf_counter() - t0})
                    if log_now and engine.engine.monitor.enabled:  # ds_config tensorboard/csv/wandb monitors
                        engine.engine.monitor.write_events(events)
                    pos = (engine.block_optimizer.schedule.position(step - 1)
                           if engine.block_optimizer is not None else None)
                    progress.update(task, completed=step, loss=float(rows[:, 0].mean()),
                                    round=pos.round if pos else 0, block=res["block"],
                                    tps=tokens_total / max(time.perf_counter() - t0, 1e-9))
                if bool(rows[:, 2].any()):
                    stopped_early = True
                    break
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
                    evaluate_clients(engine, tokenizer, data, cfg, layout, step, writer)
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
                    save(step)
            save(step)
    finally:
        if progress is not None:
            progress.stop()
        if writer is not None:
            writer.close()
    if stopped_early:
        if rank == 0:
            console.print(f"stopped by signal after step {step}; checkpoint saved — continue with resume=true")
        engine.close()
        dist.destroy_process_group()
        return None
    summary = finish(cfg, engine, data, tokenizer, layout, out, last_loss, console)
    engine.close()
    # Tear the process group down explicitly: left to interpreter exit, gloo's threads occasionally abort the
    # process ("terminate called without an active exception") after the run has finished.
    dist.destroy_process_group()
    return summary



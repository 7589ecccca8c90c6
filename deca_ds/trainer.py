"""The decentralized fine-tuning run behind ``recipes/finetune.py``: checks, build, loop, checkpoints, outputs.

Order of a run (every rank, same order — collectives must match):
  1. every check that needs no process (config, ds_config, model/data paths, blocks, graph, output_dir) -> one-line
     errors (:func:`preflight`);
  2. process group; every machine's run-defining settings agree (one collective, :func:`_agree_on_settings`); all
     communication groups (before DeepSpeed, same order everywhere);
  3. model and tokenizer, this client's data, the DeepSpeed engine (:func:`deca_ds.engine.build_engine`); resume
     from ``checkpoints/latest``;
  4. the loop (:func:`deca_ds.loop.run_loop`) over :class:`LauncherDriver`: one step on every client -> at gather
     steps (log, last, before an evaluation or a checkpoint) one small all-gather of monitoring figures -> log,
     checkpoint, stop?;
  5. final checkpoint, evaluation of every client, the consensus model (average of all clients) saved and evaluated
     (:mod:`deca_ds.summary`).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from deca_ds import checkpoint as ckpt
from deca_ds.build import build_topology, check_blocks, check_lora_targets, prepare_model
from deca_ds.config import ConfigError, RunConfig
from deca_ds.consensus import method_spec
from deca_ds.gossip import ClientLayout, client_distance
from deca_ds.loop import NonFiniteError, StepRecord, gather_step, nonfinite_error, run_loop
from deca_ds.step import Engine
from deca_ds.supervise import LauncherWatch, elastic_restart_count, launch_identity, started_elsewhere

__all__ = ["preflight", "check_resume_step", "RunFinished", "Preflight", "LauncherDriver", "run", "NonFiniteError"]


class Preflight(NamedTuple):
    """What :func:`preflight` established before any process group exists.

    Attributes:
        ds_config: the checked DeepSpeed config dict (batch keys filled as DeepSpeed fills them).
        layout: this rank's :class:`deca_ds.gossip.ClientLayout`.
        topology: the client graph (None when the method does not gossip).
        resume_from: the checkpoint directory to resume from (None: a run from step 0).
        changed: settings this leg changes with respect to the run's last leg (``"setting: old -> new"``).
    """

    ds_config: dict[str, Any]
    layout: ClientLayout
    topology: Any
    resume_from: Path | None = None
    changed: tuple[str, ...] = ()


def _node_clients(layout: ClientLayout) -> list[int]:
    """Clients with a rank on this machine (the launchers number a machine's ranks contiguously); with one disk per
    machine these are the clients whose checkpoints this machine holds."""
    local_rank, local_world = os.environ.get("LOCAL_RANK"), os.environ.get("LOCAL_WORLD_SIZE")
    if local_rank is None or local_world is None:
        return list(range(layout.num_clients))
    first = layout.rank - int(local_rank)
    ranks = range(max(first, 0), min(first + int(local_world), layout.world_size))
    return sorted({r // layout.ranks_per_client for r in ranks})


def preflight(cfg: RunConfig, world_size: int, ds_config_path: str | None, rank: int | None = None) -> Preflight:
    """All checks that need no process group.

    Args:
        cfg: the run's settings.
        world_size: launched ranks.
        ds_config_path: ``--deepspeed_config`` (overrides ``cfg.ds_config``).
        rank: this rank (default: ``RANK`` from the environment, 0 without it).

    Raises:
        ConfigError: the first problem found, as one line naming the setting and the fix.
    """
    from importlib.metadata import version

    from deca_ds._versions import check_deepspeed_version
    from deca_ds.data import check_data_config
    from deca_ds.devices import accelerator_type
    from deca_ds.ds_config import check_ds_config, load_ds_config
    from deca_ds.engine.ds_check import check_with_deepspeed
    from deca_ds.lr_schedule import uses_schedule, warmup_steps
    from deca_ds.models import check_model_config
    from deca_ds.optim.state_store import check_int8_support

    if world_size % cfg.clients.ranks_per_client:
        raise ConfigError(f"clients.ranks_per_client={cfg.clients.ranks_per_client} does not divide the "
                          f"{world_size} launched ranks: launch a multiple of it or change it")
    launched = world_size // cfg.clients.ranks_per_client
    if cfg.num_clients is not None and cfg.num_clients != launched:
        # The launcher's clients are its ranks: an explicit num_clients that disagrees was silently ignored.
        rpc = cfg.clients.ranks_per_client
        raise ConfigError(f"num_clients={cfg.num_clients} but this launch has {launched} client(s) ({world_size} "
                          f"ranks, {rpc} per client): launch {cfg.num_clients * rpc} ranks, set backend=simulate to "
                          f"run {cfg.num_clients} clients in one process, or remove num_clients")
    check_deepspeed_version(version("deepspeed"))
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    layout = ClientLayout(world_size, rank, cfg.clients.ranks_per_client)
    ds = load_ds_config(ds_config_path or cfg.ds_config, device_type=accelerator_type())
    check_ds_config(ds, cfg, world_size=world_size)
    check_with_deepspeed(ds, cfg)  # what deepspeed.initialize would refuse, after the model and data were built
    check_model_config(cfg.model)
    check_blocks(cfg)
    check_lora_targets(cfg)
    check_int8_support(cfg.optim)
    if uses_schedule(cfg) and "scheduler" in ds:
        raise ConfigError(f"optim.schedule={cfg.optim.schedule} (with warm-up {warmup_steps(cfg)}) and the ds_config "
                          "'scheduler' section both set the learning rate: remove one of them")
    topology = None
    if method_spec(cfg.method).gossip:
        topology = build_topology(cfg, layout.num_clients)
        layout.check_topology(topology)
    # Only this rank's client's data: on a real deployment a site holds only its own file.
    check_data_config(cfg, layout.num_clients, client_id=layout.client_id)
    found = ckpt.prepare_output_dir(cfg.output_dir, cfg.resume, num_clients=None)
    changed: list[str] = []
    legs = ckpt.read_run_legs(cfg.output_dir) if cfg.resume is not False else []
    if legs:  # a resumed leg (or a restart before the first checkpoint) must be the same run
        changed = ckpt.check_run_settings(legs[-1], ckpt.run_record(cfg, ds, world_size, layout.num_clients))
    if found is not None:  # the newest checkpoint complete for the clients this machine holds
        found = ckpt.find_resume_checkpoint(cfg.output_dir, found.name if cfg.resume not in (True, "auto")
                                            else "latest", client_ids=_node_clients(layout))
    if found is not None and cfg.epochs is None:  # with epochs, max_steps is known once the data is (the run checks)
        check_resume_step(cfg, int(found.name.split("_")[1]), found)
    return Preflight(ds, layout, topology, found, tuple(changed))


class RunFinished(ConfigError):
    """The run to resume already finished: its last checkpoint is at ``max_steps`` and its summary is written."""


def check_resume_step(cfg: RunConfig, step: int, found: Path) -> None:
    """Refuse to resume a checkpoint with no step left to train.

    Resumed at or past ``max_steps`` the loop trains nothing, and the end of the run rewrote ``summary.json`` with
    every client's ``final_loss`` null (the finished run's figures lost) and appended a leg to ``run.json``.

    Args:
        cfg: the run's settings (``max_steps`` final: derived from ``epochs`` already when that is set).
        step: the optimizer steps the checkpoint holds.
        found: the checkpoint directory (for the message).

    Raises:
        ConfigError: ``step`` > ``max_steps``, or ``step`` == ``max_steps`` and ``summary.json`` records that
            many steps (the run finished there; :class:`RunFinished`); a run stopped after its last checkpoint and
            before its summary still finishes.
    """
    out = Path(cfg.output_dir)
    shown = str(cfg.resume).lower() if isinstance(cfg.resume, bool) else cfg.resume
    if step > cfg.max_steps:
        raise ConfigError(f"max_steps={cfg.max_steps} is below step {step} of the checkpoint to resume ({found}): set "
                          f"max_steps above {step} to train further, or resume=step_N from an earlier checkpoint "
                          "(nothing in output_dir was changed)")
    try:
        finished = json.loads((out / "summary.json").read_text()).get("steps") == step
    except (OSError, ValueError, AttributeError):  # no summary (stopped before it), or not one deca_ds wrote
        finished = False
    if step == cfg.max_steps and finished:
        raise RunFinished(f"resume={shown}: the run in output_dir={str(out)!r} already finished (its checkpoint is at "
                          f"max_steps={cfg.max_steps} and summary.json is written): raise max_steps to train further, "
                          "or choose another output_dir (nothing there was changed)")


def _model_architecture(cfg: RunConfig) -> dict[str, Any]:
    """The model's architecture as every machine must share it: its ``config.json`` (the embedded default's for
    ``model.path`` unset) without the fields that name a file or a library version, not where it is stored."""
    from deca_ds.models import embedded_model_config

    path = cfg.model.path
    local = None if path is None else Path(os.path.expanduser(path)) / "config.json"
    try:
        if path is None:
            data = embedded_model_config().to_dict()
        elif local.is_file():
            data = json.loads(local.read_text())
        else:  # a hub name (preflight has read its config already)
            from transformers import AutoConfig

            data = AutoConfig.from_pretrained(path).to_dict()
    except (OSError, ValueError) as e:  # compared like any value: never one rank raising alone before a collective
        return {"unreadable": str(e).splitlines()[0][:120] if str(e).strip() else type(e).__name__}
    return {k: v for k, v in data.items() if not k.startswith("_") and k != "transformers_version"}


def _graph_digest(topology) -> str | None:
    """A short digest of the client graph's mixing matrices (None without a graph)."""
    if topology is None:
        return None
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    for i in range(topology.period):
        h.update(np.ascontiguousarray(topology.weights_at(i), dtype=np.float64).tobytes())
    return f"{topology.num_clients} clients, {topology.period} matrix(es), sha256 {h.hexdigest()[:12]}"


def _low_high_over_ranks(value: int) -> tuple[int, int]:
    """The least and the greatest of ``value`` over all ranks: one all-reduce of ``[value, -value]`` with MIN
    (collective; every rank gets both)."""
    from deca_ds.engine import device

    t = torch.tensor([value, -value], dtype=torch.int64, device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t[0]), -int(t[1])


def _agree_on_settings(cfg: RunConfig, ds: dict[str, Any], layout: ClientLayout, topology) -> None:
    """Every machine of the launch was started with the same run-defining settings (collective, at start-up).

    Each machine passes its own command line and YAML: a different method, learning rate, graph or block layout on
    one of them would train silently wrong or hang at the first gossip. One all-reduce of a digest of
    :func:`deca_ds.checkpoint.machine_settings` (model architecture and client graph included); only when the
    digests differ, one all-gather of the settings themselves, so every rank names the same differences.

    Raises:
        ConfigError: on every rank alike, naming each differing setting, rank 0's value and the other ranks'.
    """
    if layout.world_size == 1:
        return
    own = ckpt.machine_settings(cfg, ds, layout.world_size, layout.num_clients,
                                architecture=_model_architecture(cfg), graph=_graph_digest(topology))
    low, high = _low_high_over_ranks(ckpt.settings_digest(own))
    if low == high:
        return
    every: list[Any] = [None] * layout.world_size
    dist.all_gather_object(every, own)
    ckpt.check_machine_settings(every)


def _agree_on_checkpoint(found: Path | None, out: Path, layout: ClientLayout) -> Path | None:
    """Every rank resumes from the same checkpoint (collective). Machines with their own disks may each have found
    another newest complete checkpoint: all take the oldest of them, which each must hold complete.

    Raises:
        ConfigError: the ranks disagree on whether to resume, or the agreed checkpoint is incomplete here.
    """
    step = -1 if found is None else int(found.name.split("_")[1])
    low, high = _low_high_over_ranks(step)
    if low == high:
        return found
    if low < 0:
        raise ConfigError(f"resume: some ranks found no checkpoint in {out} while others found step {high}: give "
                          "every machine the run's checkpoints, or start a new run in another output_dir")
    chosen = out / "checkpoints" / ckpt.step_dir_name(low)
    problem = ckpt.checkpoint_problem(chosen, _node_clients(layout))
    if problem:
        raise ConfigError(f"resume: the machines' newest complete checkpoints differ (steps {low} to {high}) and "
                          f"{chosen.name} is incomplete here ({problem}): resume=step_N with a step every machine "
                          "holds")
    return chosen


def _read_state_everywhere(found: Path, layout: ClientLayout) -> dict[str, Any]:
    """This client's state from ``found``, or the same refusal on every rank when any rank cannot load its own
    (collective): a rank that stopped alone would leave its neighbours waiting for it until ``comm_timeout``.

    Raises:
        ConfigError: this rank's state is damaged or unsafe (its own message), or another rank's is (naming it).
    """
    from deca_ds.engine import device

    state, problem = None, None
    try:
        state = ckpt.read_client_state(found, layout.client_id)
    except ConfigError as err:
        problem = err
    first_bad = torch.tensor([layout.rank if problem is not None else layout.world_size], dtype=torch.int64,
                             device=device())
    dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
    if problem is not None:
        raise problem
    if int(first_bad) < layout.world_size:
        raise ConfigError(f"resume: rank {int(first_bad)} cannot load its state from {found} (its error names the "
                          "file and the fix); nothing was changed")
    return state


def _gather_counts(counts, count_names, layout):
    """Each client's own row of the partition summary, gathered (per-client files: nobody sees all data).

    A client's row is ``counts[client_id]`` (the other rows are zero) under its own column names; the rows are
    merged by :func:`deca_ds.data.merge_client_counts`.

    Returns:
        ``(counts, names)``: ``[num_clients, len(names)]`` training rows per client per group, and the names.
    """
    from deca_ds.data import merge_client_counts

    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, (list(count_names), counts[layout.client_id].tolist()))
    return merge_client_counts([rows[layout.client_ranks(c)[0]] for c in range(layout.num_clients)])


def _resolve_epochs(cfg: RunConfig, engine: Engine, data, layout: ClientLayout, console) -> None:
    """``max_steps`` from ``epochs``: the mean client's training rows (one all-reduce; every rank of a client holds
    the client's rows, and every client has the same number of ranks) over the rows a client takes per step."""
    from deca_ds.engine import device
    from deca_ds.lr_schedule import steps_for_epochs

    rows = torch.tensor([float(len(data.train))], dtype=torch.float64, device=device())
    dist.all_reduce(rows)
    mean_rows = float(rows) / layout.world_size
    mbs, gas = engine.batch_shape
    cfg.max_steps = steps_for_epochs(cfg.epochs, mean_rows, mbs * gas * layout.ranks_per_client)
    if console is not None:
        console.print(f"epochs={cfg.epochs:g}: {cfg.max_steps} steps (mean client {mean_rows:.0f} training rows, "
                      f"{mbs * gas * layout.ranks_per_client} rows per step; max_steps is derived)")


class LauncherDriver:
    """This rank's client as :func:`deca_ds.loop.run_loop` drives it (one process per rank; every rank runs it).

    Each step: this client's engine step and its own non-finite check (``nan_policy=stop`` raises here, on the ranks
    of the client that produced it). Only at gather steps (:func:`deca_ds.loop.gather_step`, which every rank
    computes alike from the step and the settings): the consensus distance at log steps, then one all-gather of a
    small monitoring row per rank (loss, non-finite steps since the last gather, stop request, bytes sent this
    step, tokens since the last gather, distance; float64 for exact byte counts), from which every rank knows every
    client's figures. Between gather steps nothing goes to ranks outside the client but the gossip itself: no
    world-wide barrier per step.
    """

    checkpoints = True

    def __init__(self, cfg: RunConfig, engine: Engine, data, tokenizer, layout: ClientLayout, out: Path,
                 console=None):
        """Args:
            cfg: the run's settings.
            engine: this rank's engine.
            data: this client's :class:`deca_ds.data.ClientData`.
            tokenizer: the run's tokenizer.
            layout: the client layout.
            out: the run's output directory.
            console: rank 0's console (evaluation progress).
        """
        self.cfg, self.engine, self.data, self.tokenizer, self.layout, self.out = cfg, engine, data, tokenizer, \
            layout, out
        self.console = console
        self.watch = LauncherWatch()
        self.launcher_gone: int | None = None
        self.num_clients = layout.num_clients
        # Figures of the steps since the last gather, reported at the next one (every checkpoint and the end of
        # the loop follow a gather step, so nothing pending is ever lost with a checkpoint).
        self._pending_nonfinite, self._pending_tokens, self._pending_stop = 0, 0, False

    def _micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        from deca_ds.data import batch_for_step

        rpc = self.cfg.clients.ranks_per_client
        mbs, gas = self.engine.batch_shape
        return [batch_for_step(self.data.train, (step * gas + m) * rpc + self.layout.local_rank, mbs,
                               self.cfg.data.seed, self.layout.client_id, self.tokenizer.pad_token_id)
                for m in range(gas)]

    def _gather_rows(self, row: list[float]) -> torch.Tensor:
        """All ranks' monitoring rows, shape [world, len(row)] (gloo and NCCL alike: on the comm device)."""
        from deca_ds.engine import device

        t = torch.tensor(row, dtype=torch.float64, device=device())
        out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(out, t)
        return torch.stack(out).cpu()

    def step(self, step: int, measure_distance: bool, stop_requested: bool) -> StepRecord:
        """This client's step; at gather steps every rank's figures too (collective there, local elsewhere).

        A launcher above this rank that is gone counts as a stop request (no worker outlives its launcher); like a
        signal, it is agreed at the next gather step.

        Args:
            step: the 0-based optimizer step (the loop's).
            measure_distance: compute the consensus distance (a collective over all ranks, so only honoured at
                gather steps; the loop asks at log steps, all of which are gather steps).
            stop_requested: this process received SIGTERM/SIGINT.

        Returns:
            The :class:`StepRecord`: gathered at gather steps, ``gathered=False`` elsewhere.

        Raises:
            NonFiniteError: ``nan_policy=stop`` and this client's loss or gradient was not finite at a step that is
                not a gather step (at a gather step the loop raises it on every rank, naming the first such client).
        """
        res = self.engine.train_step(self._micro_batches(step))
        if self.launcher_gone is None:
            self.launcher_gone = self.watch.gone()
        self._pending_stop = self._pending_stop or stop_requested or self.launcher_gone is not None
        self._pending_nonfinite += int(res.nonfinite)
        self._pending_tokens += res.tokens
        schedule = self.engine.schedule
        round_ = schedule.position(step).round if schedule is not None else 0
        if not gather_step(self.cfg, step):
            if res.nonfinite and self.cfg.nan_policy == "stop":
                # The ranks of this client agree (gradients are reduced within the client, and ZeRO agrees on the
                # loss), so they raise alike; the launcher ends the other clients' ranks.
                raise nonfinite_error(self.layout.client_id, step, self.checkpoints)
            return StepRecord(block=res.block, round=round_, lr=self.engine.lr(), losses=None, nonfinite=None,
                              bytes_sent=None, consensus_distance=None, gathered=False)
        cdist = client_distance(self.engine.block_tensors(res.block)) if (
            measure_distance and self.layout.num_clients > 1) else 0.0
        rows = self._gather_rows([res.loss, float(self._pending_nonfinite), float(self._pending_stop),
                                  float(res.bytes_sent), float(self._pending_tokens), cdist])
        self._pending_nonfinite, self._pending_tokens, self._pending_stop = 0, 0, False
        clients = [self.layout.client_ranks(c) for c in range(self.num_clients)]
        return StepRecord(block=res.block, round=round_, lr=self.engine.lr(),
                          losses=[float(rows[r, 0].mean()) for r in clients],
                          nonfinite=[bool(rows[r, 1].any()) for r in clients],
                          bytes_sent=[int(rows[r, 3].sum()) for r in clients],
                          consensus_distance=[float(rows[r[0], 5]) for r in clients],
                          tokens=int(rows[:, 4].sum()), stop_requested=bool(rows[:, 2].any()),
                          nonfinite_steps=[int(rows[r, 1].max()) for r in clients])

    def evaluate(self, step: int) -> list[dict] | None:
        """Every client's evaluation (collective; the list on rank 0)."""
        from deca_ds.summary import evaluate_clients

        return evaluate_clients(self.engine, self.tokenizer, self.data, self.cfg, self.layout, self.console)

    def save_checkpoint(self, step: int) -> None:
        """A complete checkpoint of every client after ``step`` steps (collective)."""
        from deca_ds.engine import barrier

        engine, layout, cfg = self.engine, self.layout, self.cfg

        def state_fn():
            state = engine.state_dict()
            if not ckpt.all_finite(state["model"].values()):
                raise NonFiniteError(f"client {layout.client_id}: non-finite weights at step {step}; "
                                     "the checkpoint was not written")
            return state

        if engine.collective_state_dict:  # ZeRO: every rank of the client takes part, writer or not
            state = state_fn()
            state_fn = lambda: state  # noqa: E731
        ckpt.save_checkpoint(self.out, step, layout.client_id, layout.local_rank == 0, state_fn,
                             cfg.keep_checkpoints, barrier)

    def write_monitor_events(self, events: list[tuple[str, float, int]]) -> None:
        """Rank 0's events to the ds_config's monitors."""
        self.engine.write_monitor_events(events)

    def set_lr(self, lr: float) -> None:
        """This client's learning rate from the next step on."""
        self.engine.set_lr(lr)


def _started_elsewhere(output_dir: str) -> bool:
    """Whether the run in ``output_dir`` was started by another launch on this host (:func:`started_elsewhere`):
    then an elastic restart of this launch, whose first start was refused because ``output_dir`` holds that run,
    must be refused again, not continue it. A damaged ``run.json`` counts as not (preflight names it)."""
    try:
        legs = ckpt.read_run_legs(output_dir)
    except ConfigError:
        return False
    return started_elsewhere(legs[-1] if legs else None)


def run(cfg: RunConfig, ds_config_path: str | None = None) -> dict[str, Any] | None:
    """Run one decentralized fine-tune on this rank. Returns the summary on rank 0, None elsewhere.

    Raises:
        ConfigError: bad settings (raised before anything is written).
        NonFiniteError: ``nan_policy=stop`` and some client produced a non-finite value.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    restarts = elastic_restart_count()
    if restarts and cfg.resume is False and not _started_elsewhere(cfg.output_dir):
        cfg.resume = "auto"  # torchrun --max-restarts restarted us: continue, never start over
    try:
        ds, layout, topo, found, changed = preflight(cfg, world_size, ds_config_path)
    except RunFinished as e:
        # Nothing to train, nothing changed: a success, as the HF Trainer's resume of a finished run is, so that a
        # job rerun with resume=true/auto (a scheduler that cannot tell whether the run finished before it was
        # killed) or an elastic restart after the end does not fail.
        _say_finished(e, restarts)
        return None

    from deca_ds.engine import setup_distributed

    setup_distributed(cfg.comm_timeout)
    try:
        return _run_launched(cfg, ds, layout, topo, found, changed, restarts)
    except RunFinished as e:  # with epochs, found once max_steps is derived, after the group exists
        if dist.is_initialized():
            dist.destroy_process_group()
        _say_finished(e, restarts)
        return None
    except ConfigError:
        # A refusal made together by every rank (settings or checkpoints that differ between machines, a state that
        # cannot be loaded): tear the group down before exiting, as at the end of a run - left to interpreter exit,
        # gloo's threads abort a process whose peer has already gone ("terminate called without an active
        # exception", SIGABRT instead of the refusal's exit code 2).
        if dist.is_initialized():
            dist.destroy_process_group()
        raise


def _say_finished(e: RunFinished, restarts: int) -> None:
    """Rank 0's one line for a resumed run that had already finished (see :class:`RunFinished`)."""
    if int(os.environ.get("RANK", "0")) == 0:
        where = f"elastic restart {restarts}: " if restarts else ""
        print(f"deca_ds: {where}{e}; nothing left to do", file=sys.stderr, flush=True)


def _run_launched(cfg: RunConfig, ds: dict[str, Any], layout: ClientLayout, topo, found: Path | None,
                  changed: tuple[str, ...], restarts: int) -> dict[str, Any] | None:
    """:func:`run` once the process group exists: agreement, model, data, engine, the loop and the end of the run."""
    from rich.console import Console

    from deca_ds.data import build_client_data, write_partition_summary
    from deca_ds.ds_config import uses_activation_checkpointing
    from deca_ds.engine import build_engine
    from deca_ds.gossip import ClientGroups, Mixer
    from deca_ds.metrics import JsonlWriter, plot_run, truncate_jsonl_after
    from deca_ds.models import load_model_and_tokenizer
    from deca_ds.summary import finish

    rank = dist.get_rank()
    if (dist.get_world_size(), rank) != (layout.world_size, layout.rank):
        raise RuntimeError(f"{layout!r} does not match torch.distributed (world size {dist.get_world_size()}, "
                           f"rank {rank})")
    _agree_on_settings(cfg, ds, layout, topo)  # before any output: machines started with other settings stop here
    groups = ClientGroups.create(layout)
    out = Path(cfg.output_dir)
    found = _agree_on_checkpoint(found, out, layout)
    console = Console(stderr=True)
    if cfg.model.gradient_checkpointing is False and uses_activation_checkpointing(ds):
        cfg.model.gradient_checkpointing = True
    model, tokenizer = load_model_and_tokenizer(cfg.model, seed=cfg.seed)
    model = prepare_model(cfg, model)  # dec_lora: the base wrapped with LoRA adapters (peft)
    data = build_client_data(cfg, tokenizer, layout.client_id, layout.num_clients)
    counts, count_names = data.counts, data.count_names
    if data.counts_local_only:  # per-client files: only this client's row is known locally
        counts, count_names = _gather_counts(counts, count_names, layout)
    mixer = None
    if topo is not None:
        mixer = Mixer(layout, topo, chunk_bytes=int(cfg.gossip.chunk_mb * 2**20),
                      comm_dtype=torch.bfloat16 if cfg.gossip.dtype == "bf16" else torch.float32,
                      timeout=cfg.comm_timeout, dp_group=groups.client_group, compression=cfg.gossip.compression)
    engine = build_engine(cfg, model, ds, groups, mixer=mixer)
    if cfg.epochs is not None:
        _resolve_epochs(cfg, engine, data, layout, console if rank == 0 else None)
    start_step = 0
    if found is not None:
        engine.load_state_dict(_read_state_everywhere(found, layout))
        if "scheduler" not in ds:  # a changed optim.lr applies from the resumed step on (recorded in run.json)
            engine.set_lr(cfg.optim.lr)
        start_step = engine.global_step
        if cfg.epochs is not None:  # max_steps known only now (preflight checks the others)
            check_resume_step(cfg, start_step, found)
    # Outputs only once the engine stands: a start that fails leaves nothing behind.
    if found is not None and layout.local_rank == 0:  # every client's writer (one disk per machine: each its own)
        ckpt.rewind_latest(out, found)  # resumed from an older checkpoint: the newer ones are abandoned
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.append_run_leg(out, ckpt.run_record(cfg, ds, layout.world_size, layout.num_clients,
                                                 resumed_from=found.name if found is not None else None,
                                                 changed=list(changed), launch=launch_identity()))
        write_partition_summary(counts, count_names, out, console=console)
        if layout.num_clients > 1 and topo is not None:
            topo.render(console=console)
        # Records past the resumed step (or every record of a run restarted before its first checkpoint) go.
        truncate_jsonl_after(out / "metrics.jsonl", start_step)
        if restarts:
            console.print(f"elastic restart {restarts}: continuing the run (resume={cfg.resume})")
        if found is not None:
            console.print(f"resumed from {found} at step {start_step}"
                          + (f" (changed: {'; '.join(changed)})" if changed else ""))
    if engine.schedule is not None and rank == 0:
        engine.schedule.warn_if_incomplete(cfg.max_steps)
    writer = JsonlWriter(out / "metrics.jsonl") if rank == 0 else None
    driver = LauncherDriver(cfg, engine, data, tokenizer, layout, out, console)
    try:
        outcome = run_loop(driver, cfg, start_step, writer, console, show_progress=rank == 0)
    finally:
        if writer is not None:
            writer.close()
    if outcome.stopped_early:
        if driver.launcher_gone is not None:
            console.print(f"rank {rank}: the launcher above this worker (pid {driver.launcher_gone}) is gone")
        if rank == 0:
            console.print(f"stopped by signal after step {outcome.step}; checkpoint saved — continue with "
                          "resume=true")
        engine.close()
        dist.destroy_process_group()
        return None
    summary = finish(cfg, engine, data, tokenizer, layout, out, outcome.last_loss, console)
    if rank == 0:
        plot_run(out)  # training.png: every client's loss and consensus distance over steps
    engine.close()
    # Tear the process group down explicitly: left to interpreter exit, gloo's threads occasionally abort the
    # process ("terminate called without an active exception") after the run has finished.
    dist.destroy_process_group()
    return summary

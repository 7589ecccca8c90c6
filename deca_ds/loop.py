"""Around the step: the run loop shared by the launcher and the simulator.

One loop drives both ways of running clients: the launcher (one process per rank, ``deca_ds.trainer``) and the
single-process simulator (every client in one process, ``deca_ds.simulate``). Each provides a :class:`Driver` that
takes one optimizer step on every client and reports every client's figures as a :class:`StepRecord`; the loop owns
what happens around it, in this order per step:

    set_lr (optim.schedule) -> driver.step -> nan policy -> metrics.jsonl record + monitors (log steps) -> progress -> stop on SIGTERM/SIGINT
        -> periodic evaluation -> periodic checkpoint;  after the last step (or a stop): final checkpoint

Every client's figures are brought together only at *gather steps* (:func:`gather_step`: log steps, the last step,
and steps followed by an evaluation or a checkpoint), which every process computes alike from the step index and
the settings. The launcher's driver returns a record with ``gathered=False`` on the other steps (no world-wide
collective there); it still checks its own client's loss and gradients every step and raises
:class:`NonFiniteError` itself under ``nan_policy=stop``. A stop request is agreed at the next gather step.

``summary.json`` is written by :func:`write_summary` for both.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from pathlib import Path
from typing import Any, Protocol

from deca_ds.config import RunConfig
from deca_ds.metrics import JsonlWriter, make_progress, summary_table, write_json_atomic

__all__ = ["NonFiniteError", "nonfinite_error", "StopFlag", "StepRecord", "Driver", "LoopOutcome", "gather_step",
           "run_loop", "write_summary"]


class NonFiniteError(RuntimeError):
    """A client produced a non-finite loss or gradient and ``nan_policy=stop``."""


def nonfinite_error(client: int, step: int, checkpoints: bool) -> NonFiniteError:
    """The error that stops a run under ``nan_policy=stop`` (one wording wherever it is detected).

    Args:
        client: the client whose loss or gradient was not finite.
        step: the 0-based optimizer step.
        checkpoints: the run writes checkpoints (the message then says the last complete one is kept).

    Returns:
        The :class:`NonFiniteError` to raise.
    """
    kept = "; the last complete checkpoint is kept" if checkpoints else ""
    return NonFiniteError(f"client {client} produced a non-finite loss or gradient at step {step} "
                          f"(nan_policy=stop){kept}")


def gather_step(cfg: RunConfig, step: int) -> bool:
    """Whether step ``step`` (0-based) brings every client's figures together.

    True at log steps (``(step + 1) % log_every == 0``), at the last step (``step + 1 == max_steps``) and at steps
    followed by an evaluation (``eval_every``) or a checkpoint (``checkpoint_every``). A pure function of the step
    and the settings, so every process of a launch decides alike without communicating.

    Args:
        cfg: the run's settings.
        step: the 0-based optimizer step.

    Returns:
        Whether the step's :class:`StepRecord` must be gathered.
    """
    done = step + 1
    if done % cfg.log_every == 0 or done == cfg.max_steps:
        return True
    return any(every and done % every == 0 for every in (cfg.eval_every, cfg.checkpoint_every))


class StopFlag:
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


@dataclasses.dataclass
class StepRecord:
    """Every client's figures for one optimizer step, as the process that logs sees them.

    A driver whose clients all live in this process (the simulators) returns a gathered record every step. The
    launcher's returns ``gathered=False`` on steps that are not gather steps (:func:`gather_step`): then only
    ``block``, ``round`` and ``lr`` (the same on every client) are set and the per-client lists are None.

    Attributes:
        block: index of the block trained this step (the same on every client).
        round: the schedule's round of this step.
        lr: learning rate after the step.
        losses: training loss per client.
        nonfinite: per client, whether a loss or gradient was not finite at this step or at any step since the
            previous gathered record (``nan_policy=skip``; under ``stop`` such a step raised already).
        bytes_sent: per client, gossip bytes sent this step.
        consensus_distance: per client, RMS distance of the trained block from the clients' average (0 when not
            measured this step).
        tokens: non-padding tokens processed by all clients this step and the ungathered steps since the previous
            gathered record.
        stop_requested: some process received SIGTERM/SIGINT (or lost its launcher) at or before this step.
        gathered: the per-client figures are present (False: not brought together this step).
        nonfinite_steps: per client, how many steps since the previous gathered record (this one included) had a
            non-finite loss or gradient (None: only this step is covered, as ``nonfinite`` says).
    """

    block: int
    round: int
    lr: float
    losses: list[float] | None
    nonfinite: list[bool] | None
    bytes_sent: list[int] | None
    consensus_distance: list[float] | None
    tokens: int = 0
    stop_requested: bool = False
    gathered: bool = True
    nonfinite_steps: list[int] | None = None


class Driver(Protocol):
    """What :func:`run_loop` drives: every client's step, evaluation, checkpoints and monitors."""

    num_clients: int
    checkpoints: bool
    """Whether :meth:`save_checkpoint` writes checkpoints (the simulator writes none)."""

    def step(self, step: int, measure_distance: bool, stop_requested: bool) -> StepRecord:
        """Optimizer step ``step`` (0-based) on every client; consensus distances only when ``measure_distance``.

        May return ``gathered=False`` only where :func:`gather_step` is False for ``step``; it must then have raised
        :class:`NonFiniteError` itself for a non-finite client under ``nan_policy=stop``.
        """

    def evaluate(self, step: int) -> list[dict[str, Any]] | None:
        """Each client's evaluation on the test split after ``step`` steps (None on processes that do not log)."""

    def save_checkpoint(self, step: int) -> None:
        """A complete checkpoint after ``step`` steps (no-op where checkpoints are not supported)."""

    def write_monitor_events(self, events: list[tuple[str, float, int]]) -> None:
        """``(tag, value, step)`` events for the ds_config's monitors."""

    def set_lr(self, lr: float) -> None:
        """The learning rate of every client's next step (``optim.schedule``)."""


@dataclasses.dataclass
class LoopOutcome:
    """How the loop ended.

    Attributes:
        step: optimizer steps completed.
        stopped_early: a signal stopped the run before ``max_steps``.
        last_loss: the last training loss of each client.
        train_seconds: wall time of the loop.
    """

    step: int
    stopped_early: bool
    last_loss: dict[int, float]
    train_seconds: float


def _write_step(writer: JsonlWriter, driver: Driver, rec: StepRecord, step: int, log_now: bool, t0: float) -> None:
    """The step's metrics.jsonl records (log steps) and monitor events, one per client."""
    events = []
    for c in range(driver.num_clients):
        events += [(f"Train/Samples/client_{c}/loss", rec.losses[c], step + 1),
                   (f"Train/Samples/client_{c}/consensus_distance", rec.consensus_distance[c], step + 1)]
        if log_now:
            writer.write({"step": step, "client": c, "loss": rec.losses[c], "block": rec.block, "lr": rec.lr,
                          "consensus_distance": rec.consensus_distance[c], "bytes_sent": rec.bytes_sent[c],
                          "nonfinite": rec.nonfinite[c], "time": time.perf_counter() - t0})
    if log_now:
        driver.write_monitor_events(events)


def run_loop(driver: Driver, cfg: RunConfig, start_step: int = 0, writer: JsonlWriter | None = None,
             console=None, show_progress: bool = False) -> LoopOutcome:
    """Run steps ``start_step .. cfg.max_steps - 1`` and the final checkpoint.

    Collective in the launcher: every rank calls it (the driver's step, evaluation and checkpoints communicate).

    Args:
        driver: the launcher's or the simulator's :class:`Driver`.
        cfg: the run's settings (``max_steps``, ``log_every``, ``eval_every``, ``checkpoint_every``, ``nan_policy``).
        start_step: steps already taken (a resumed run).
        writer: ``metrics.jsonl`` writer on the process that logs, None elsewhere.
        console: rich console of the progress bar.
        show_progress: show a progress bar (the process that logs).

    Returns:
        The :class:`LoopOutcome`.

    Raises:
        NonFiniteError: ``nan_policy=stop`` and some client produced a non-finite loss or gradient.
    """
    from deca_ds.lr_schedule import lr_at, uses_schedule

    scheduled = uses_schedule(cfg)
    step, last_loss, tokens_total, stopped = start_step, {}, 0, False
    t0 = time.perf_counter()
    progress = make_progress(console) if show_progress else None
    try:
        with StopFlag() as stop_flag:
            if progress is not None:
                progress.start()
                task = progress.add_task("train", total=cfg.max_steps, completed=start_step, round=0, block=0,
                                         loss=float("nan"), tps=0.0)
            while step < cfg.max_steps:
                log_now = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps
                if scheduled:  # a pure function of the step: the same rate on every path, nothing to checkpoint
                    driver.set_lr(lr_at(cfg, step))
                rec = driver.step(step, measure_distance=log_now, stop_requested=stop_flag.requested)
                if not rec.gathered:
                    # Hazard: the evaluation, checkpoint and stop below need figures every process agrees on; a
                    # driver that skipped the gather at a gather step would let processes part ways.
                    if gather_step(cfg, step):
                        raise RuntimeError(f"the driver did not gather step {step}, a gather step (log, last, "
                                           "evaluation or checkpoint step)")
                    step += 1
                    if progress is not None:
                        progress.update(task, completed=step, round=rec.round, block=rec.block)
                    continue
                tokens_total += rec.tokens
                bad = [c for c, x in enumerate(rec.nonfinite) if x]
                if bad and cfg.nan_policy == "stop":
                    raise nonfinite_error(bad[0], step, driver.checkpoints)
                last_loss.update(enumerate(rec.losses))
                if writer is not None:
                    _write_step(writer, driver, rec, step, log_now, t0)
                step += 1
                if progress is not None:
                    progress.update(task, completed=step, loss=sum(rec.losses) / len(rec.losses), round=rec.round,
                                    block=rec.block, tps=tokens_total / max(time.perf_counter() - t0, 1e-9))
                if rec.stop_requested:
                    stopped = True
                    break
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
                    evals = driver.evaluate(step)
                    if writer is not None and evals is not None:
                        for c, ev in enumerate(evals):
                            writer.write({"step": step - 1, "client": c, "eval": ev})
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
                    driver.save_checkpoint(step)
            driver.save_checkpoint(step)
    finally:
        if progress is not None:
            progress.stop()
    return LoopOutcome(step, stopped, last_loss, time.perf_counter() - t0)


def write_summary(output_dir: str | os.PathLike, summary: dict[str, Any], console=None) -> None:
    """Write ``summary.json`` atomically and as strict JSON (:func:`deca_ds.metrics.write_json_atomic`) and print
    the final table.

    Args:
        output_dir: the run's directory.
        summary: the summary; ``clients`` (per-client rows) and ``consensus`` (the average model's evaluation).
        console: rich console for the table (None: no table).
    """
    write_json_atomic(Path(output_dir) / "summary.json", summary)
    if console is not None:
        console.print(summary_table(summary["clients"], summary["consensus"]))

"""The learning rate of every optimizer step: warm-up then constant, linear or cosine decay, as in Hugging Face.

One pure function decides the rate of step ``t`` from the settings alone, so every path applies the same rate: the
run loop sets it before each step (launcher engines at ZeRO 0-3 and the simulator alike; ZeRO's per-switch AdamW
included), a resumed run needs no scheduler state, and the values equal what ``transformers`` schedulers give a
Hugging Face Trainer (``get_{constant,linear,cosine}_schedule_with_warmup``: step ``t`` uses ``lr * factor(t)``, so
the first warm-up step runs at rate 0, as there).
"""

from __future__ import annotations

import math

from deca_ds.config import ConfigError, RunConfig

__all__ = ["warmup_steps", "lr_factor", "lr_at", "uses_schedule", "steps_for_epochs"]


def warmup_steps(cfg: RunConfig) -> int:
    """Warm-up steps of the run: ``optim.warmup_steps``, else ``ceil(warmup_ratio x max_steps)`` (as HF)."""
    o = cfg.optim
    return o.warmup_steps if o.warmup_steps > 0 else math.ceil(o.warmup_ratio * cfg.max_steps)


def lr_factor(step: int, schedule: str, warmup: int, total: int) -> float:
    """The multiplier of the base rate for optimizer step ``step`` (0-based).

    Args:
        step: the step about to be taken.
        schedule: ``constant``, ``linear`` or ``cosine``.
        warmup: warm-up steps (linear from 0).
        total: steps of the run.
    """
    if step < warmup:
        return float(step) / float(max(1, warmup))
    if schedule == "constant":
        return 1.0
    progress = float(step - warmup) / float(max(1, total - warmup))
    if schedule == "linear":
        return max(0.0, float(total - step) / float(max(1, total - warmup)))
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))
    raise ConfigError(f"optim.schedule={schedule!r} is not known: use constant, linear or cosine")


def lr_at(cfg: RunConfig, step: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of the run ``cfg`` describes."""
    return cfg.optim.lr * lr_factor(step, cfg.optim.schedule, warmup_steps(cfg), cfg.max_steps)


def uses_schedule(cfg: RunConfig) -> bool:
    """Whether the rate changes over the run (a schedule other than constant, or a warm-up)."""
    return cfg.optim.schedule != "constant" or warmup_steps(cfg) > 0


def steps_for_epochs(epochs: float, mean_rows: float, rows_per_step: int) -> int:
    """Optimizer steps for ``epochs`` passes over a client's data of ``mean_rows`` rows (at least 1).

    Args:
        epochs: passes over the data.
        mean_rows: training rows of the mean client.
        rows_per_step: rows one client consumes per optimizer step (micro-batch x accumulation x ranks).
    """
    return max(1, math.ceil(epochs * mean_rows / rows_per_step))

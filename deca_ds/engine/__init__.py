"""DeepSpeed integration: the only package that imports deepspeed.

- :mod:`~deca_ds.engine.accelerator`: process start, this rank's device, barriers, peak memory;
- :mod:`~deca_ds.engine.stage0`: :class:`DecaEngine`, ZeRO stage 0 around BlockAdam;
- :mod:`~deca_ds.engine.zero`: :class:`ZeroBlockEngine`, ZeRO stages 1-3 (block switch by re-initialization);
- :mod:`~deca_ds.engine.full_adam`: DeepSpeed's own full-parameter Adam, the benchmark's GPU baseline;
- :mod:`~deca_ds.engine.ds_check`: DeepSpeed's own reading of a ds_config, run by the launcher's preflight.

Both training engines implement :class:`deca_ds.step.Engine` and run DECA's between-steps sequence through the same
:class:`deca_ds.consensus.ConsensusStep`. ds_config loading and checks live in :mod:`deca_ds.ds_config` (no
DeepSpeed import), so they run before any process exists.
"""

from __future__ import annotations

from typing import Any

import torch

from deca_ds.config import RunConfig
from deca_ds.ds_config import zero_stage
from deca_ds.engine.accelerator import barrier, device, peak_memory_bytes, setup_distributed
from deca_ds.engine.stage0 import DecaEngine
from deca_ds.engine.zero import ZeroBlockEngine, ZeroBlockView

__all__ = ["build_engine", "DecaEngine", "ZeroBlockEngine", "ZeroBlockView", "setup_distributed", "device",
           "barrier", "peak_memory_bytes"]


def build_engine(cfg: RunConfig, model: torch.nn.Module, ds_config: dict[str, Any], groups, mixer=None):
    """The engine for ``ds_config``'s ZeRO stage: :class:`DecaEngine` at stage 0, else :class:`ZeroBlockEngine`.

    Args:
        cfg: the run's settings.
        model: the model in its training dtype.
        ds_config: checked DeepSpeed config dict.
        groups: :class:`deca_ds.gossip.ClientGroups`.
        mixer: :class:`deca_ds.gossip.Mixer` for gossiping methods.

    Returns:
        A :class:`deca_ds.step.Engine`.
    """
    if zero_stage(ds_config) == 0:
        return DecaEngine(cfg, model, ds_config, groups, mixer=mixer)
    return ZeroBlockEngine(cfg, model, ds_config, groups, mixer=mixer)

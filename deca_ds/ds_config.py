"""DeepSpeed JSON configs: loading, defaults and the checks that keep block-wise training correct.

Why this is its own module: the checks run before any process group exists (``trainer.preflight``), in the
single-process simulator and in the planner, none of which should import DeepSpeed (only ``deca_ds.engine`` does).

Why the DeepSpeed config is restricted (measured, docs/design.md §3): at stage 0 DeepSpeed hands our optimizer the
model's own parameters only when its ``bf16``/``fp16`` sections are off (otherwise it wraps it with fp32 copies of
every parameter and block switching breaks), and ZeRO 1-3 freeze the trainable set at ``initialize``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from deca_ds.config import ConfigError, RunConfig

REPO_DS_CONFIGS = Path(__file__).resolve().parents[1] / "ds_configs"
DEFAULT_MICRO_BATCH = 8

__all__ = ["REPO_DS_CONFIGS", "DEFAULT_MICRO_BATCH", "default_ds_config_path", "load_ds_config", "check_ds_config",
           "zero_stage", "uses_activation_checkpointing"]


def default_ds_config_path(device_type: str | None = None) -> Path:
    """``ds_configs/cpu_fp32.json`` on the CPU, else ``ds_configs/gpu_bf16.json``.

    Args:
        device_type: the accelerator type (default: :func:`deca_ds.devices.accelerator_type`).
    """
    if device_type is None:
        from deca_ds.devices import accelerator_type

        device_type = accelerator_type()
    return REPO_DS_CONFIGS / ("cpu_fp32.json" if device_type == "cpu" else "gpu_bf16.json")


def load_ds_config(path: str | os.PathLike | None, device_type: str | None = None) -> dict[str, Any]:
    """Read a DeepSpeed JSON (the default one when ``path`` is None) and fill batch keys it leaves out.

    Args:
        path: the JSON file, or None for :func:`default_ds_config_path`.
        device_type: accelerator type that picks the default file (see :func:`default_ds_config_path`).

    Raises:
        ConfigError: missing or malformed file.
    """
    if path is None:
        path = default_ds_config_path(device_type)
        if not Path(path).is_file():  # installed without the repository: same settings as cpu_fp32.json
            return {"train_micro_batch_size_per_gpu": DEFAULT_MICRO_BATCH, "gradient_accumulation_steps": 1,
                    "steps_per_print": 1000000, "wall_clock_breakdown": False}
    if not Path(path).is_file():
        raise ConfigError(f"ds_config={str(path)!r} does not exist: give the path of a DeepSpeed JSON "
                          "(see ds_configs/)")
    try:
        with open(path) as f:
            ds = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"ds_config={str(path)!r} is not valid JSON (line {e.lineno}: {e.msg}): fix the file") \
            from None
    if not isinstance(ds, dict):
        raise ConfigError(f"ds_config={str(path)!r} must hold a JSON object")
    if "train_micro_batch_size_per_gpu" not in ds and "train_batch_size" not in ds:
        ds["train_micro_batch_size_per_gpu"] = DEFAULT_MICRO_BATCH
    ds.setdefault("gradient_accumulation_steps", 1)
    ds.setdefault("steps_per_print", 1000000)
    return ds


def zero_stage(ds: dict[str, Any]) -> int:
    """The ZeRO stage of a DeepSpeed config dict (0 when absent)."""
    return int((ds.get("zero_optimization") or {}).get("stage", 0) or 0)


def check_ds_config(ds: dict[str, Any], cfg: RunConfig) -> None:
    """Refuse DeepSpeed settings that silently break block-wise training, with the fix in one line.

    Stage 0 (``deca_ds.engine.DecaEngine``): no bf16/fp16 section (BlockAdam keeps the fp32 master itself) and no
    offload. Stages 1-3 (``deca_ds.engine.ZeroBlockEngine``): a ``bf16`` section only with ``model.dtype=bf16``, no
    fp16, optimizer offload to the CPU allowed, parameter offload refused.

    Raises:
        ConfigError: the first setting deca_ds cannot honour.
    """
    adamw_baseline = cfg.method == "centralized" and cfg.centralized_optimizer == "adamw"
    zero = ds.get("zero_optimization") or {}
    stage = zero.get("stage", 0) or 0
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"ds_config zero_optimization.stage={stage} is not a ZeRO stage: use 0, 1, 2 or 3")
    for key in ("bf16", "fp16"):
        if not (ds.get(key) or {}).get("enabled", False):
            continue
        if stage == 0 and not adamw_baseline:
            raise ConfigError(f"ds_config enables {key}: deca_ds keeps {key} weights with an fp32 master of the "
                              f"active block itself; remove the {key} section and set model.dtype="
                              f"{key} in the recipe")
        if stage >= 1 and key == "fp16":
            raise ConfigError("ds_config enables fp16 with ZeRO: fp16 loss scaling skips steps behind deca_ds's "
                              "back and is not supported; use a bf16 section with model.dtype=bf16")
        if stage >= 1 and cfg.model.dtype != "bf16":
            raise ConfigError(f"ds_config enables bf16 with ZeRO stage {stage} but model.dtype={cfg.model.dtype}: "
                              "set model.dtype=bf16 (or remove the bf16 section)")
    if stage == 0 and (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None):
        raise ConfigError("ds_config offload_optimizer needs ZeRO: set zero_optimization.stage to 1, 2 or 3, or use "
                          "optim.state_policy=offload to park inactive blocks' state in host memory")
    if (zero.get("offload_param") or {}).get("device", "none") not in ("none", None):
        raise ConfigError("ds_config offload_param is not supported with block switching: remove it (use "
                          "offload_optimizer and optim.state_policy=offload)")
    if "optimizer" in ds:
        raise ConfigError("ds_config has an 'optimizer' section: deca_ds supplies BlockAdam; remove the section "
                          "and set optim.lr/optim.betas/optim.weight_decay in the recipe")
    if "train_batch_size" in ds and "train_micro_batch_size_per_gpu" not in ds:
        raise ConfigError("ds_config sets train_batch_size without train_micro_batch_size_per_gpu: set "
                          "train_micro_batch_size_per_gpu (batch per rank; a client's batch is that x its ranks)")
    if adamw_baseline and cfg.model.dtype != "fp32" and stage == 0:
        raise ConfigError("centralized_optimizer=adamw needs model.dtype=fp32: torch AdamW has no fp32 master of "
                          "low-precision weights")


def uses_activation_checkpointing(ds: dict[str, Any]) -> bool:
    """A ds_config ``activation_checkpointing`` section turns on the model's (non-reentrant) checkpointing."""
    return "activation_checkpointing" in ds

"""DeepSpeed's own reading of a ds_config, before any process exists.

:func:`deca_ds.ds_config.check_ds_config` refuses what deca_ds cannot honour; what DeepSpeed itself refuses (a
misspelt key inside ``zero_optimization``, an unknown ``communication_data_type``, an LR scheduler it does not know
or whose parameters it rejects) used to surface only inside ``deepspeed.initialize``, after the process group, the
model and the data were built, as a pydantic or assertion traceback on every rank. :func:`check_with_deepspeed`
parses the config with DeepSpeed's ``DeepSpeedConfig`` and builds the configured scheduler on a one-parameter
optimizer, so the preflight can refuse it in one line naming the setting.
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
import warnings
from typing import Any

import torch

from deca_ds.config import ConfigError, RunConfig
from deca_ds.ds_config import BATCH_KEYS, OBJECT_SECTIONS
from deca_ds.errors import first_line

__all__ = ["check_with_deepspeed"]

EDITED_KEYS = (*OBJECT_SECTIONS, *BATCH_KEYS, "gradient_clipping", "steps_per_print", "wall_clock_breakdown",
               "communication_data_type", "prescale_gradients", "gradient_predivide_factor", "memory_breakdown",
               "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "sparse_gradients", "dump_state")
"""Top-level ds_config keys a user edits; an unknown key this close to one is a typo DeepSpeed would ignore."""

_FIX = "fix or remove that setting (https://www.deepspeed.ai/docs/config-json/)"


class _OneRank:
    """An ``mpu`` of one data-parallel rank: DeepSpeedConfig then reads the batch keys as one rank's whether or not
    a process group exists (the Hugging Face integration checks after ``init_distributed``)."""

    @staticmethod
    def get_data_parallel_world_size() -> int:
        return 1


def _known_top_level_keys() -> set[str]:
    """Every lowercase key name DeepSpeed's config module defines a constant for, plus :data:`EDITED_KEYS`."""
    import re

    import deepspeed.runtime.config as ds_config_module
    import deepspeed.runtime.constants as constants

    known = set(EDITED_KEYS)
    for module in (constants, ds_config_module):
        for name, value in vars(module).items():
            if name.isupper() and isinstance(value, str) and re.fullmatch(r"[a-z][a-z0-9_]*", value):
                known.add(value)
    return known


def _check_top_level_typos(ds: dict[str, Any]) -> None:
    """DeepSpeed ignores unknown top-level keys: ``"zero_optimisation"`` silently meant ZeRO stage 0."""
    known = _known_top_level_keys()
    for key in ds:
        if not isinstance(key, str) or key in known:
            continue
        hint = difflib.get_close_matches(key, EDITED_KEYS, n=1, cutoff=0.85)
        if hint:
            raise ConfigError(f"ds_config key {key!r} is not a DeepSpeed setting (DeepSpeed would ignore it): did you "
                              f"mean {hint[0]!r}? Rename it, or remove it")


def _pydantic_where(ds: dict[str, Any], error) -> str:
    """``section.key`` of a pydantic error's first location, found by which section of ``ds`` holds the key."""
    loc = [str(p) for p in (error.get("loc") or ())]
    if not loc:
        return ""
    sections = [k for k, v in ds.items() if isinstance(v, dict) and loc[0] in v]
    return ".".join(([sections[0]] if len(sections) == 1 else []) + loc)


def _check_scheduler(ds: dict[str, Any], cfg: RunConfig) -> None:
    """The ``scheduler`` section builds, as ``DeepSpeedEngine._scheduler_from_config`` builds it."""
    section = ds.get("scheduler")
    if section is None:
        return
    from deepspeed.runtime import lr_schedules

    name = section.get("type")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"ds_config scheduler.type={json.dumps(name)} is missing or not a name: DeepSpeed would "
                          f"ignore the section; write e.g. \"type\": \"WarmupLR\" or remove the scheduler section")
    scheduler = getattr(lr_schedules, name, None) or getattr(torch.optim.lr_scheduler, name, None)
    if not callable(scheduler):
        choices = list(lr_schedules.VALID_LR_SCHEDULES)
        hint = difflib.get_close_matches(name, choices, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(f"ds_config scheduler.type={json.dumps(name)} is not an LR scheduler DeepSpeed knows{extra}: "
                          f"use one of {', '.join(choices)} or a torch.optim.lr_scheduler class")
    params = section.get("params")
    if not isinstance(params, dict):
        raise ConfigError(f"ds_config scheduler.params={json.dumps(params)} must be a JSON object (DeepSpeed calls "
                          f"{name}(optimizer, **params)): write \"params\": {{}} for its defaults")
    probe = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scheduler(probe, **params)
    except Exception as e:  # noqa: BLE001 -- any scheduler's own refusal of its params, as DeepSpeed would raise it
        raise ConfigError(f"ds_config scheduler {name} refuses its params ({type(e).__name__}: {first_line(e)}): "
                          "fix scheduler.params") from None


def check_with_deepspeed(ds: dict[str, Any], cfg: RunConfig) -> None:
    """Refuse, before anything starts, a ds_config that ``deepspeed.initialize`` would refuse or silently misread.

    Parses a copy of ``ds`` (already through :func:`deca_ds.ds_config.check_ds_config`) with DeepSpeed's
    ``DeepSpeedConfig`` (its pydantic sections forbid unknown keys; ``communication_data_type`` and the ZeRO stage are
    checked), refuses a top-level key that is a near miss of a known one (DeepSpeed ignores unknown top-level keys)
    and builds the ``scheduler`` section on a one-parameter optimizer. Batch keys were checked against the client's
    data-parallel size already; here they are read as one rank's.

    Args:
        ds: the checked DeepSpeed config dict (not changed).
        cfg: the run's settings (``optim.lr`` and ``optim.betas`` seed the probe optimizer).

    Raises:
        ConfigError: one line naming the ds_config setting, DeepSpeed's reason and the fix.
    """
    from deepspeed.runtime.config import DeepSpeedConfig
    from pydantic import ValidationError

    _check_top_level_typos(ds)
    probe = copy.deepcopy(ds)
    micro, gas = probe.get("train_micro_batch_size_per_gpu"), probe.get("gradient_accumulation_steps")
    if isinstance(micro, int) and isinstance(gas, int):
        probe["train_batch_size"] = micro * gas  # DeepSpeedConfig sees one data-parallel rank (_OneRank)
    quiet = logging.getLogger("DeepSpeed")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        DeepSpeedConfig(probe, mpu=_OneRank())
    except ValidationError as e:
        errors = e.errors()
        first = errors[0] if errors else {}
        where = _pydantic_where(ds, first)
        got = f" (got {json.dumps(first['input'], default=str)})" if "input" in first else ""
        raise ConfigError(f"ds_config {where or e.title} is refused by DeepSpeed: {first.get('msg', first_line(e))}"
                          f"{got}; {_FIX}") from None
    except Exception as e:  # noqa: BLE001 -- DeepSpeedConfigError, ValueError, AssertionError, a TypeError for null
        # sections: whatever DeepSpeed raises while reading the user's file is a refusal of that file
        raise ConfigError(f"ds_config is refused by DeepSpeed ({type(e).__name__}: {first_line(e)}); {_FIX}") from None
    finally:
        quiet.setLevel(level)
    _check_scheduler(ds, cfg)

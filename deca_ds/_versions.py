"""The library versions deca_ds is tested with, and the check that stops a run on an untested DeepSpeed.

DeepSpeed is used beyond its documented surface (``docs/design.md`` §3): the ``deepspeed.utils.safe_get/set_*``
fp32-master and optimizer-state accessors and ``lazy_init_hp_params_optimizer_state`` under ZeRO, re-initialization
after ``engine.destroy()`` on every block switch, the stage-3 flat fp32 partitions
(``optimizer.fp32_partitioned_groups_flat``) and ``ds_tensor`` shards, the ``mpu`` methods DeepSpeed calls, and the
CPU accelerator (gloo) for CPU runs. Those change between DeepSpeed minor releases without notice, so the range below
is the one the test suite has been run with (see the commit that set it), and ``setup.cfg`` declares the same range.
A version outside it is refused before anything starts rather than risking a run that is silently wrong (ZeRO
mistakes do not crash: frozen blocks keep moving, or a switching step's update is lost).

This module imports nothing heavy: the check takes the version string, so it can run before ``import deepspeed``
(``importlib.metadata.version("deepspeed")``).
"""

from __future__ import annotations

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from deca_ds.config import ConfigError

__all__ = ["DEEPSPEED_RANGE", "TRANSFORMERS_MIN", "BITSANDBYTES_MIN", "VersionError", "check_deepspeed_version"]

DEEPSPEED_RANGE = ">=0.17.0,<0.20"
"""DeepSpeed releases the ZeRO and launcher tests passed with on CPU: 0.17.0 (the oldest that passes; 0.16.0 passes
ZeRO-1/2 but fails ZeRO-3 block re-initialization with ``IndexError: pop from an empty deque`` in
``partitioned_param_coordinator``, 0.14.0 needs intel_extension_for_pytorch on a CPU) and 0.19.8 (the newest).
``<0.20`` admits the 0.19 patch series but not the next minor release, whose internals are unknown."""

TRANSFORMERS_MIN = "4.56.0"
"""First transformers release whose ``from_pretrained``/``from_config`` take ``dtype=`` (``deca_ds.models`` and the
benchmark pass it; 4.55.4 hands it on to the model's ``__init__``, which raises ``TypeError``). The unit suite and the
Hugging Face Trainer tests (``tests/unit/test_hf*.py``, ``tests/integration/test_hf*.py``) pass with 4.56.0 (TRL's
tests skipped: trl 1.16 requires transformers >= 4.56.2) and with 4.56.2 including TRL 1.16; the 4.x Trainer's other
routes to the overridden hooks are in ``docs/hf_trainer.md`` ("transformers 4.x")."""

BITSANDBYTES_MIN = "0.43.0"
"""Oldest bitsandbytes whose ``functional.quantize_blockwise``/``dequantize_blockwise`` with a custom code map and
blocksize 256 run on CPU and GPU (``optim.offload_dtype=int8``); the ``int8`` extra of ``setup.cfg``."""


class VersionError(ConfigError):
    """An installed library is outside the range deca_ds is tested with (a ConfigError: it is reported as one line
    and stops the run before anything starts)."""


def check_deepspeed_version(version: str) -> None:
    """Refuse a DeepSpeed version outside :data:`DEEPSPEED_RANGE`.

    Pre-releases and local builds are judged by their version number: ``0.19.9rc1`` and ``0.19.9+abc123`` (built
    from a checkout) are inside, ``0.20.0.dev0`` (a pre-release of the next minor) is outside.

    Args:
        version: the installed version, e.g. ``deepspeed.__version__`` or
            ``importlib.metadata.version("deepspeed")``.

    Raises:
        VersionError: the version is outside the range or unreadable; the message names the installed version, the
            tested range and the command that installs a tested release.
    """
    fix = f"install a tested release: pip install 'deepspeed{DEEPSPEED_RANGE}'"
    try:
        parsed = Version(version)
    except (InvalidVersion, TypeError):
        raise VersionError(f"deepspeed version {version!r} cannot be read: {fix}") from None
    if not SpecifierSet(DEEPSPEED_RANGE).contains(parsed, prereleases=True):
        raise VersionError(
            f"deepspeed {version} is installed but deca_ds is tested with deepspeed{DEEPSPEED_RANGE} (it relies on "
            f"DeepSpeed internals, docs/design.md §3): {fix}"
        )

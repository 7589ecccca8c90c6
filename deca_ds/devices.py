"""Which device a process trains on, decided without importing DeepSpeed.

DeepSpeed's accelerator (``deepspeed.accelerator.get_accelerator``) is the truth inside the engine package; code
that must not import DeepSpeed (preflight checks, the ds_config defaults, the single-process simulator) asks this
module instead. It follows DeepSpeed's own rule for the two accelerators deca_ds supports: ``DS_ACCELERATOR`` when
set, else CUDA when torch sees a GPU, else the CPU.
"""

from __future__ import annotations

import os

import torch

__all__ = ["accelerator_type", "default_device"]


def accelerator_type() -> str:
    """The accelerator type DeepSpeed will pick in this process: ``DS_ACCELERATOR`` if set, else ``cuda`` when
    ``torch.cuda.is_available()``, else ``cpu``."""
    name = os.environ.get("DS_ACCELERATOR")
    if name:
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_device() -> torch.device:
    """The training device of a single-process run: the current CUDA device, or the CPU."""
    if accelerator_type() == "cuda" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")

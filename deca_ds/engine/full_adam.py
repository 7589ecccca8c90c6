"""DeepSpeed's own full-parameter Adam on one rank: the baseline users run on a GPU, for the benchmark.

bf16 with DeepSpeed's fused AdamW (``offload=False``), or ZeRO-2 with the optimizer offloaded to DeepSpeedCPUAdam
(``offload=True``). No launcher needed: a one-rank world is set up when none exists.
"""

from __future__ import annotations

import os
from typing import Any

import deepspeed
import torch

__all__ = ["build_full_adam_engine"]


def build_full_adam_engine(model: torch.nn.Module, micro_batch: int, lr: float, offload: bool):
    """A DeepSpeed engine training every parameter of ``model`` with DeepSpeed's AdamW.

    Args:
        model: the model (on the GPU).
        micro_batch: rows per micro-batch.
        lr: learning rate.
        offload: ZeRO-2 with the optimizer state offloaded to the CPU (ZeRO-Offload) instead of stage 0.

    Returns:
        ``(engine, optimizer)`` as ``deepspeed.initialize`` returns them.
    """
    for k, v in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29517"), ("RANK", "0"), ("LOCAL_RANK", "0"),
                 ("WORLD_SIZE", "1")):
        os.environ.setdefault(k, v)
    deepspeed.init_distributed()
    zero: dict[str, Any] = {"stage": 2 if offload else 0}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    cfg = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
           "bf16": {"enabled": True}, "zero_optimization": zero, "steps_per_print": 10**9,
           # DeepSpeed picks FusedAdam on the GPU, DeepSpeedCPUAdam when the optimizer is offloaded.
           "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.0}}}
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    return engine, optimizer

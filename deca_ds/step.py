"""One client's local step: the micro-batch loop every engine shares, its typed result, and the engine interface.

Three engines take the local step, for real reasons differently: the stage-0 DeepSpeed engine around BlockAdam
(``deca_ds.engine.stage0``), the ZeRO engine around DeepSpeed's partitioned optimizer (``deca_ds.engine.zero``) and
the single-process simulator (``deca_ds.simulate``). What they share lives here:

    for each micro-batch: to device -> forward -> backward (loss / gradient_accumulation_steps) -> count tokens
    -> finite check -> [engine-specific: clip, optimizer step] -> ConsensusStep (deca_ds.consensus) -> StepResult

No DeepSpeed import: :func:`clip_grad_norm_as_deepspeed_` restates DeepSpeed's stage-0 fp32 clipping arithmetic so
that the simulator computes bit for bit what the launcher computes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, NamedTuple, Protocol, Sequence

import torch
from torch import nn

__all__ = ["StepResult", "BatchShape", "MicroBatchLosses", "run_micro_batches", "count_tokens", "all_finite",
           "accumulate_nonfinite_", "grads_finite", "clip_grad_norm_as_deepspeed_", "Engine"]


@dataclasses.dataclass
class StepResult:
    """What one client's optimizer step did (one rank's view; ranks of a client agree on everything but tokens).

    Attributes:
        loss: mean training loss over the step's micro-batches.
        nonfinite: a loss or gradient was not finite (the update was skipped or the step must stop the run).
        block: index of the block this step trained.
        tokens: non-padding input tokens this rank processed.
        bytes_sent: bytes this rank sent to other clients in this step's gossip.
        bytes_received: bytes this rank received from other clients.
        switched: the next step trains another block.
    """

    loss: float
    nonfinite: bool
    block: int
    tokens: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    switched: bool = False


class BatchShape(NamedTuple):
    """How a rank's share of one optimizer step is cut: ``accumulation_steps`` micro-batches of
    ``micro_batch_size`` rows."""

    micro_batch_size: int
    accumulation_steps: int


@dataclasses.dataclass
class MicroBatchLosses:
    """The forward/backward part of a step.

    Attributes:
        losses: each micro-batch's (unscaled) loss, detached, fp32.
        tokens: non-padding input tokens over all micro-batches.
    """

    losses: list[torch.Tensor]
    tokens: int

    @property
    def mean(self) -> float:
        """Mean loss over the micro-batches."""
        return float(torch.stack(self.losses).mean())

    @property
    def finite(self) -> bool:
        """Every micro-batch loss is finite."""
        return all_finite(self.losses)


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-padding input tokens of a collated batch (every token when it has no attention mask)."""
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()


def run_micro_batches(micro_batches: Sequence[dict[str, torch.Tensor]], device: torch.device,
                      forward: Callable[[dict[str, torch.Tensor]], torch.Tensor],
                      backward: Callable[[torch.Tensor], None],
                      between: Callable[[], None] | None = None) -> MicroBatchLosses:
    """Forward and backward over a step's micro-batches, accumulating gradients.

    Args:
        micro_batches: the step's collated micro-batches (host tensors).
        device: where the model is.
        forward: ``batch -> loss`` (the model's or the DeepSpeed engine's forward).
        backward: ``loss -> None``; it scales by the number of micro-batches itself (as ``engine.backward`` does).
        between: called after every micro-batch but the last (DeepSpeed counts micro-steps in ``engine.step()``).

    Returns:
        The losses and token count.
    """
    losses, tokens = [], 0
    last = len(micro_batches) - 1
    for k, mb in enumerate(micro_batches):
        mb = {key: v.to(device) for key, v in mb.items()}
        loss = forward(mb)
        backward(loss)
        losses.append(loss.detach().float())
        tokens += count_tokens(mb)
        if between is not None and k < last:
            between()
    return MicroBatchLosses(losses, tokens)


# The (device type, dtype) pairs torch's fused finite check (``torch._amp_foreach_non_finite_check_and_unscale_``,
# the kernel behind ``torch.amp.GradScaler``) implements. Its CUDA kernel dispatches float/double/half only: a bf16
# gradient there raised NotImplementedError (seen on an H200, torch 2.11: every bf16 GPU step). Other devices'
# kernels are not known here, so they take the generic route too.
_FUSED_CHECK = {"cpu": (torch.float32, torch.float16, torch.bfloat16), "cuda": (torch.float32, torch.float16)}


@torch.no_grad()
def accumulate_nonfinite_(tensors: Iterable[torch.Tensor], found: dict[torch.device, torch.Tensor]) -> None:
    """Add a positive count to ``found[device]`` (a float32 ``[1]`` tensor, created at zero when missing) for every
    device on which some floating-point tensor holds a NaN or an infinity. Device-side only: no host sync.

    Tensors of a (device, dtype) that torch's fused check implements go through it in one multi-tensor call per
    group, with an unscale factor of exactly 1.0: it writes ``t * 1.0`` back into each tensor, which IEEE arithmetic
    leaves bit for bit unchanged (NaN stays NaN). The others (bf16 on CUDA, any dtype on other accelerators, float64
    and complex) add ``not isfinite(t).all()`` per tensor, reading only. Integer and boolean tensors are always
    finite.

    Args:
        tensors: any tensors.
        found: the per-device flags to add to; read them with one ``.cpu()`` per device when a verdict is needed.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        if not (t.is_floating_point() or t.is_complex()):
            continue
        t = t.detach()
        if t.device not in found:
            found[t.device] = torch.zeros(1, dtype=torch.float32, device=t.device)
        if t.dtype in _FUSED_CHECK.get(t.device.type, ()):
            groups.setdefault((t.device, t.dtype), []).append(t)
        else:
            found[t.device].add_(torch.isfinite(t).all().logical_not())
    for (dev, _), ts in groups.items():
        torch._amp_foreach_non_finite_check_and_unscale_(ts, found[dev], torch.ones(1, dtype=torch.float32, device=dev))


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Every element of every tensor is finite, with one fused check per (device, dtype) where torch has one
    (:func:`accumulate_nonfinite_`) and one host sync per device. A loop of ``bool(torch.isfinite(t).all())`` costs
    one host sync per tensor.

    Args:
        tensors: any tensors (integer and boolean tensors are always finite).
    """
    found: dict[torch.device, torch.Tensor] = {}
    accumulate_nonfinite_(tensors, found)
    flags = [f.cpu() for f in found.values()]  # the host syncs: one per device
    return not any(bool(f) for f in flags)


def grads_finite(params: Iterable[nn.Parameter]) -> bool:
    """Every existing gradient among ``params`` is finite (one fused check, :func:`all_finite`)."""
    return all_finite([p.grad for p in params if p.grad is not None])


@torch.no_grad()
def clip_grad_norm_as_deepspeed_(params: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip gradients to a global 2-norm of ``max_norm`` with DeepSpeed 0.19.8's stage-0 fp32 arithmetic.

    ``deepspeed.runtime.utils.clip_grad_norm_`` for a one-rank data-parallel group and a singleton model-parallel
    group (one client's rank): per-tensor fp32 norms, ``stack.pow(2).sum().pow(1/2)``, coefficient
    ``min(1, max_norm / (norm + 1e-6))`` multiplied into every gradient (also when it is 1). The order of these
    operations differs from ``torch.nn.utils.clip_grad_norm_``, so only this restatement rounds like the launcher.

    Returns:
        The global norm before clipping.
    """
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    norms = [p.grad.detach().float().norm(2.0) for p in params]
    total = torch.stack(norms).pow(2.0).sum().float().pow(1.0 / 2.0)
    total = total * 1.0 / 1.0  # DeepSpeed averages the norm over the data-parallel group: one rank here
    max_t = torch.tensor([float(max_norm)], device=total.device)
    coef = torch.min(torch.tensor([1.0], device=total.device), max_t / (total + 1e-6))
    for p in params:
        p.grad.mul_(coef.to(p.grad.device))
    return total


class Engine(Protocol):
    """One rank's training engine, as the launcher's loop and end-of-run code use it.

    Implemented by ``deca_ds.engine.DecaEngine`` (ZeRO stage 0) and ``deca_ds.engine.ZeroBlockEngine`` (stages 1-3).
    """

    global_step: int
    """Optimizer steps taken."""
    mixer: Any
    """The :class:`deca_ds.gossip.Mixer`, or None when the method does not gossip."""
    collective_state_dict: bool
    """:meth:`state_dict` communicates inside the client: every rank of the client must call it."""

    @property
    def model(self) -> nn.Module:
        """The trained model (at ZeRO-3 its parameters hold shards)."""

    @property
    def batch_shape(self) -> "BatchShape":
        """Rows per micro-batch on this rank and micro-batches per optimizer step."""

    @property
    def schedule(self):
        """The :class:`deca_ds.blocks.BlockSchedule`, or None for the full-parameter AdamW baseline."""

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> StepResult:
        """One optimizer step over the micro-batches, then DECA's between-steps hook."""

    def block_tensors(self, block_idx: int) -> list[torch.Tensor]:
        """The model's weights of block ``block_idx`` (collective at ZeRO-3)."""

    def lr(self) -> float:
        """Current learning rate."""

    def set_lr(self, lr: float) -> None:
        """Use learning rate ``lr`` from the next step on (a resumed leg that changes ``optim.lr``)."""

    def whole_model(self) -> nn.Module:
        """The model with whole weights (at ZeRO-3 a gathered CPU copy; collective there)."""

    def write_monitor_events(self, events: list[tuple[str, float, int]]) -> None:
        """Send ``(tag, value, step)`` events to the ds_config's monitors (TensorBoard, CSV, W&B), if any."""

    def state_dict(self) -> dict[str, Any]:
        """Everything this rank needs to continue bit-identically."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""

    def close(self) -> None:
        """Release DeepSpeed's hooks and buffers."""

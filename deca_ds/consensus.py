"""The between-steps sequence of DECA, in one place: gossip the active block, form the consensus signal, correct the
moments, switch blocks.

Every training path runs exactly this code, in this order (docs/design.md §1): the stage-0 DeepSpeed engine around
:class:`deca_ds.optim.BlockAdam`, the ZeRO engine around a view of DeepSpeed's partitioned masters and moments
(``deca_ds.engine.zero.ZeroBlockView``), and the single-process simulator around one BlockAdam per client:

    x_half (after the local step) -> mix -> x_new -> h = signal(x, x_half, x_new) -> fold h into m, v -> switch?

What differs between them is only the transport (``mix``: neighbour exchange, or rows of ``W @ X`` in the simulator)
and where x, m and v live (:class:`ConsensusOptimizer`). ``methods`` are the ablations the product compares in one
harness; :func:`method_spec` says what each one does.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, Sequence

import torch

SIGNALS = ("qgm", "discrepancy", "raw")


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """What a training ``method`` does between steps.

    Attributes:
        gossip: mix the active block with neighbours after every step.
        consensus: fold the consensus signal into the moments (DECA's block-wise moment approximation).
        local_moments: the local gradient updates the stored moments (False: "trivial BMA" ablation).
        single_block: one block holding every trainable parameter (full-parameter Adam).
        world_data_parallel: all ranks form one data-parallel group (centralized baseline).
    """

    gossip: bool
    consensus: bool
    local_moments: bool = True
    single_block: bool = False
    world_data_parallel: bool = False


_METHODS = {
    "deca": MethodSpec(gossip=True, consensus=True),
    "badam_gossip": MethodSpec(gossip=True, consensus=False),
    "trivial_bma": MethodSpec(gossip=True, consensus=True, local_moments=False),
    "dadam": MethodSpec(gossip=True, consensus=False, single_block=True),
    "local": MethodSpec(gossip=False, consensus=False),
    "centralized": MethodSpec(gossip=False, consensus=False, world_data_parallel=True),
}


def method_spec(method: str) -> MethodSpec:
    """Return what ``method`` does between steps.

    Args:
        method: one of ``deca``, ``badam_gossip``, ``trivial_bma``, ``dadam``, ``local``, ``centralized``.

    Raises:
        ValueError: unknown method.
    """
    if method not in _METHODS:
        raise ValueError(f"method={method!r} is not known: use one of {', '.join(_METHODS)}")
    return _METHODS[method]


def consensus_signal(kind: str, x_prev: torch.Tensor | None, x_half: torch.Tensor | None, x_new: torch.Tensor,
                     lr: float) -> torch.Tensor:
    """The consensus signal ``h`` of one tensor (docs/design.md §1; the paper's exact form is unknown).

    Args:
        kind: ``qgm`` -> ``(x_prev - x_new) / lr``, the whole step's displacement on gradient scale;
            ``discrepancy`` -> ``(x_half - x_new) / lr``, local minus aggregated;
            ``raw`` -> ``x_new - x_prev``, as a third-party transcription writes it (unscaled).
        x_prev: block value before the local step (needed by ``qgm`` and ``raw``).
        x_half: block value after the local step, before mixing (needed by ``discrepancy``).
        x_new: block value after mixing.
        lr: the step's learning rate (γ).

    Returns:
        A new fp32 tensor shaped like ``x_new``.
    """
    x_new = x_new.float()
    if kind == "qgm":
        return (x_prev.float() - x_new).div_(lr)
    if kind == "discrepancy":
        return (x_half.float() - x_new).div_(lr)
    if kind == "raw":
        return x_new - x_prev.float()
    raise ValueError(f"deca.signal={kind!r} is not known: use one of {', '.join(SIGNALS)}")


@torch.no_grad()
def fold_moments_(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, signal: torch.Tensor,
                  betas: Sequence[float]) -> None:
    """DECA's block-wise moment approximation of one tensor, in place and in fp32.

    ``m <- b1*m + (1-b1)*h`` and ``v <- b2*v + (1-b2)*h^2``; ``betas=(1, 1)`` leaves the moments unchanged.

    Args:
        exp_avg: first moment m (fp32), updated in place.
        exp_avg_sq: second moment v (fp32), updated in place.
        signal: the consensus signal h of the same shape (any float dtype and device; converted to m's).
        betas: (b1, b2) of the correction.
    """
    beta1, beta2 = float(betas[0]), float(betas[1])
    h = signal.to(device=exp_avg.device, dtype=torch.float32)
    exp_avg.mul_(beta1).add_(h, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(h, h, value=1 - beta2)


class ConsensusOptimizer(Protocol):
    """What :class:`ConsensusStep` needs from a block optimizer: :class:`deca_ds.optim.BlockAdam` at stage 0 and in
    the simulator, ``deca_ds.engine.zero.ZeroBlockView`` under ZeRO."""

    param_groups: list[dict[str, Any]]
    """``param_groups[0]["lr"]`` is the learning rate of the step just taken (γ)."""

    @property
    def active_block_idx(self) -> int:
        """Index of the block trained by the step just taken."""

    def master_params(self) -> list[torch.Tensor]:
        """fp32 tensors holding the active block's weights x; in-place writes to them are what gossip changes."""

    def sync_params_from_master_(self) -> None:
        """Make the model's weights (and any sharded copy) equal to the tensors :meth:`master_params` returned."""

    def apply_consensus_(self, signals: Sequence[torch.Tensor], betas: tuple[float, float]) -> None:
        """Fold one signal per active parameter into the moments with :func:`fold_moments_`."""

    def switch_if_due(self) -> bool:
        """Switch to the block the schedule assigns to the next step; return whether it switched."""


class MixFn(Protocol):
    """Neighbour mixing of the active block, in place: ``x_i <- sum_j w_ij x_j``."""

    def __call__(self, tensors: Sequence[torch.Tensor], step: int, block_idx: int): ...


class ConsensusStep:
    """Runs DECA's between-steps sequence around a :class:`ConsensusOptimizer` (BlockAdam, or ZeRO's view).

    Call :meth:`before_step` right before the optimizer step (it snapshots the block when the signal needs the
    pre-step value) and :meth:`after_step` right after it, at every gradient-accumulation boundary. The optimizer
    must be built with ``auto_switch=False``: the switch happens here, after the consensus correction.

    Memory: at most one extra fp32 copy of the active block (the snapshot), never of the whole model.
    """

    def __init__(self, optimizer: ConsensusOptimizer, method: str, mix: MixFn | None = None, signal: str = "raw",
                 betas: Sequence[float] = (0.99, 0.9999)):
        """Args:
            optimizer: a :class:`ConsensusOptimizer` (a BlockAdam must have ``auto_switch=False``).
            method: training method (see :func:`method_spec`).
            mix: neighbour exchange; required when the method gossips.
            signal: consensus signal kind (see :func:`consensus_signal`).
            betas: (β1, β2) of the moment correction.
        """
        self.optimizer = optimizer
        self.spec = method_spec(method)
        if self.spec.gossip and mix is None:
            raise ValueError(f"method={method!r} gossips: pass a mix function")
        if signal not in SIGNALS:
            raise ValueError(f"deca.signal={signal!r} is not known: use one of {', '.join(SIGNALS)}")
        self.mix = mix
        self.signal = signal
        self.betas = tuple(float(b) for b in betas)
        self._snapshot: list[torch.Tensor] | None = None
        self.last_mix_stats = None

    def to(self, device: torch.device) -> "ConsensusStep":
        """Move the pending pre-step snapshot (if any) to ``device``; for callers that move the model between
        :meth:`before_step` and :meth:`after_step` (the simulator's parked replicas). Returns self."""
        if self._snapshot is not None:
            self._snapshot = [s.to(device) for s in self._snapshot]
        return self

    @property
    def _needs_prev(self) -> bool:
        return self.spec.consensus and self.signal in ("qgm", "raw")

    def before_step(self) -> None:
        """Snapshot the active block's fp32 values (x) when the consensus signal needs them."""
        if self._needs_prev:
            self._snapshot = [x.detach().float().clone() for x in self.optimizer.master_params()]

    @torch.no_grad()
    def after_step(self, step: int) -> bool:
        """Gossip -> consensus signal -> moment correction -> block switch, for the step just taken.

        Args:
            step: index of the optimizer step just completed (identical on every client).

        Returns:
            True when the active block switched.
        """
        opt = self.optimizer
        block_idx = opt.active_block_idx
        self.last_mix_stats = None
        if self.spec.gossip:
            masters = opt.master_params()
            x_half = [x.detach().float().clone() for x in masters] if (
                self.spec.consensus and self.signal == "discrepancy") else None
            self.last_mix_stats = self.mix(masters, step, block_idx)
            opt.sync_params_from_master_()
            lr = opt.param_groups[0]["lr"]
            # A warm-up step at lr 0 (optim.schedule) took no step: a displacement per unit of lr is undefined there
            # (0/0, or x/0 from the mixing), so that step folds nothing into the moments.
            if self.spec.consensus and (lr > 0 or self.signal == "raw"):
                prev = self._snapshot or [None] * len(masters)
                halves = x_half or [None] * len(masters)
                signals = [consensus_signal(self.signal, p, h, x, lr) for p, h, x in zip(prev, halves, masters)]
                opt.apply_consensus_(signals, betas=self.betas)
        self._snapshot = None
        return opt.switch_if_due()

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

from deca_ds.config import DecaConfig

SIGNALS = ("qgm", "discrepancy", "raw", "qgm_grad", "discrepancy_grad")
GRADIENT_UNIT_SIGNALS = ("qgm_grad", "discrepancy_grad")
"""Signals converted to gradient units through the client's Adam preconditioner (docs/design.md §1)."""


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """What a training ``method`` does between steps.

    Attributes:
        gossip: mix the active block with neighbours after every step.
        consensus: fold the consensus signal into the moments (DECA's block-wise moment approximation).
        local_moments: the local gradient updates the stored moments (False: "trivial BMA" ablation).
        single_block: one block holding every trainable parameter (full-parameter Adam).
        world_data_parallel: all ranks form one data-parallel group (centralized baseline).
        lora: the base model is frozen and LoRA adapters (``peft``) on its linear layers are the one trained,
            gossiped block (Dec-LoRA).
    """

    gossip: bool
    consensus: bool
    local_moments: bool = True
    single_block: bool = False
    world_data_parallel: bool = False
    lora: bool = False


_METHODS = {
    "deca": MethodSpec(gossip=True, consensus=True),
    "badam_gossip": MethodSpec(gossip=True, consensus=False),
    "trivial_bma": MethodSpec(gossip=True, consensus=True, local_moments=False),
    "dadam": MethodSpec(gossip=True, consensus=False, single_block=True),
    "local": MethodSpec(gossip=False, consensus=False),
    "centralized": MethodSpec(gossip=False, consensus=False, world_data_parallel=True),
    "dec_lora": MethodSpec(gossip=True, consensus=False, single_block=True, lora=True),
}


def method_spec(method: str) -> MethodSpec:
    """Return what ``method`` does between steps.

    Args:
        method: one of ``deca``, ``badam_gossip``, ``trivial_bma``, ``dadam``, ``local``, ``centralized``,
            ``dec_lora``.

    Raises:
        ValueError: unknown method.
    """
    if method not in _METHODS:
        raise ValueError(f"method={method!r} is not known: use one of {', '.join(_METHODS)}")
    return _METHODS[method]


def consensus_signal(kind: str, x_prev: torch.Tensor | None, x_half: torch.Tensor | None, x_new: torch.Tensor,
                     lr: float, denom: torch.Tensor | None = None) -> torch.Tensor:
    """The consensus signal ``h`` of one tensor (docs/design.md §1; the paper's exact form is unknown).

    Elementwise, so a tensor stacked over clients (leading client dimension) gives every client's signal at once.

    Args:
        kind: ``qgm`` -> ``(x_prev - x_new) / lr``, the whole step's displacement in units of a normalised Adam
            step; ``discrepancy`` -> ``(x_half - x_new) / lr``, local minus aggregated, same units;
            ``raw`` -> ``x_new - x_prev``, as a third-party transcription writes it (unscaled, weight units);
            ``qgm_grad`` / ``discrepancy_grad`` -> the ``qgm`` / ``discrepancy`` displacement times the client's
            current Adam denominator ``sqrt(v_hat) + eps`` (``denom``): a normalised step converted back to
            gradient units, so that ``h**2`` is commensurate with the ``g**2`` that ``v`` averages.
        x_prev: block value before the local step (needed by ``qgm``, ``qgm_grad`` and ``raw``).
        x_half: block value after the local step, before mixing (needed by the ``discrepancy`` readings).
        x_new: block value after mixing.
        lr: the step's learning rate (γ).
        denom: ``sqrt(v_hat) + eps`` of the same shape (the gradient-unit readings only).

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
    if kind in GRADIENT_UNIT_SIGNALS:
        if denom is None:
            raise ValueError(f"deca.signal={kind!r} needs the Adam denominator sqrt(v_hat) + eps")
        base = x_prev if kind == "qgm_grad" else x_half
        return (base.float() - x_new).div_(lr).mul_(denom.to(x_new.device, torch.float32))
    raise ValueError(f"deca.signal={kind!r} is not known: use one of {', '.join(SIGNALS)}")


@torch.no_grad()
def fold_moments_(exp_avg: torch.Tensor | Sequence[torch.Tensor], exp_avg_sq: torch.Tensor | Sequence[torch.Tensor],
                  signal: torch.Tensor | Sequence[torch.Tensor], betas: Sequence[float]) -> None:
    """DECA's block-wise moment approximation, in place and in fp32: the one home of the fold.

    ``m <- b1*m + (1-b1)*h`` and ``v <- b2*v + (1-b2)*h^2``; ``betas=(1, 1)`` leaves the moments unchanged.
    Takes one tensor each, or lists of them (a block): lists go through torch's multi-tensor (``_foreach``)
    kernels, which apply the same element-wise operations to every entry (bit-identical on the CPU, one launch per
    list on a GPU).

    Args:
        exp_avg: first moment(s) m (fp32), updated in place.
        exp_avg_sq: second moment(s) v (fp32), updated in place.
        signal: the consensus signal(s) h of the same shapes (any float dtype and device; converted to m's).
        betas: (b1, b2) of the correction.
    """
    beta1, beta2 = float(betas[0]), float(betas[1])
    if isinstance(exp_avg, torch.Tensor):
        exp_avg, exp_avg_sq, signal = [exp_avg], [exp_avg_sq], [signal]
    if not exp_avg:
        return
    hs = [h.to(device=m.device, dtype=torch.float32) for m, h in zip(exp_avg, signal)]
    torch._foreach_mul_(exp_avg, beta1)
    torch._foreach_add_(exp_avg, hs, alpha=1 - beta1)
    torch._foreach_mul_(exp_avg_sq, beta2)
    torch._foreach_addcmul_(exp_avg_sq, hs, hs, value=1 - beta2)


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

    # The gradient-unit signals also read the client's Adam denominators (:func:`adam_denominators`) through an
    # optional ``adam_denominators()`` method (BlockAdam, the stacked simulator's optimizer and ZeRO's view all have
    # one; an optimizer without it runs the other readings only).


class MixFn(Protocol):
    """Neighbour mixing of the active block, in place: ``x_i <- sum_j w_ij x_j``."""

    def __call__(self, tensors: Sequence[torch.Tensor], step: int, block_idx: int): ...


class ConsensusStep:
    """Runs DECA's between-steps sequence around a :class:`ConsensusOptimizer` (BlockAdam, or ZeRO's view).

    Call :meth:`before_step` right before the optimizer step (it snapshots the block when the signal needs the
    pre-step value) and :meth:`after_step` right after it, at every gradient-accumulation boundary. When the optimizer
    steps inside backward (BlockAdam's ``fused_backward``), call :meth:`before_step` before backward instead. The optimizer
    must be built with ``auto_switch=False``: the switch happens here, after the consensus correction.

    Memory: at most one extra fp32 copy of the active block (the snapshot), never of the whole model.
    """

    def __init__(self, optimizer: ConsensusOptimizer, method: str, mix: MixFn | None = None,
                 signal: str | None = None, betas: Sequence[float] | None = None):
        """Args:
            optimizer: a :class:`ConsensusOptimizer` (a BlockAdam must have ``auto_switch=False``).
            method: training method (see :func:`method_spec`).
            mix: neighbour exchange; required when the method gossips.
            signal: consensus signal kind (see :func:`consensus_signal`); None: ``deca.signal``'s default
                (:class:`deca_ds.config.DecaConfig`, the one home of the defaults).
            betas: (β1, β2) of the moment correction; None: ``deca.betas``' default.
        """
        defaults = DecaConfig()
        signal = defaults.signal if signal is None else signal
        betas = defaults.betas if betas is None else betas
        self.optimizer = optimizer
        self.spec = method_spec(method)
        if self.spec.gossip and mix is None:
            raise ValueError(f"method={method!r} gossips: pass a mix function")
        if signal not in SIGNALS:
            raise ValueError(f"deca.signal={signal!r} is not known: use one of {', '.join(SIGNALS)}")
        if self.spec.consensus and signal in GRADIENT_UNIT_SIGNALS and not _has_denominators(optimizer):
            raise ValueError(f"deca.signal={signal!r} needs the client's Adam denominators, which "
                             f"{type(optimizer).__name__} does not expose (no adam_denominators() method): use "
                             "deca.signal=qgm, discrepancy or raw")
        self.mix = mix
        self.signal = signal
        self.betas = tuple(float(b) for b in betas)
        self._snapshot: list[torch.Tensor] | None = None
        self.last_mix_stats = None
        self.last_signal_sq: torch.Tensor | None = None
        """Sum of ``h**2`` over the active block at the last step (over the non-client dimensions of each tensor
        when the tensors are stacked over clients, i.e. one value per client), for the rms(h)/rms(g) diagnostic."""

    def to(self, device: torch.device) -> "ConsensusStep":
        """Move the pending pre-step snapshot (if any) to ``device``; for callers that move the model between
        :meth:`before_step` and :meth:`after_step` (the simulator's parked replicas). Returns self."""
        if self._snapshot is not None:
            self._snapshot = [s.to(device) for s in self._snapshot]
        return self

    @property
    def _needs_prev(self) -> bool:
        return self.spec.consensus and self.signal in ("qgm", "raw", "qgm_grad")

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
        self.last_signal_sq = None  # a step that folds nothing (lr 0, no gossip) reports no signal
        if self.spec.gossip:
            masters = opt.master_params()
            x_half = [x.detach().float().clone() for x in masters] if (
                self.spec.consensus and self.signal in ("discrepancy", "discrepancy_grad")) else None
            # The preconditioner of the step just taken, before the fold changes v.
            denoms = adam_denominators(opt) if (
                self.spec.consensus and self.signal in GRADIENT_UNIT_SIGNALS) else None
            self.last_mix_stats = self.mix(masters, step, block_idx)
            opt.sync_params_from_master_()
            lr = opt.param_groups[0]["lr"]
            # A warm-up step at lr 0 (optim.schedule) took no step: a displacement per unit of lr is undefined there
            # (0/0, or x/0 from the mixing), so that step folds nothing into the moments.
            if self.spec.consensus and (lr > 0 or self.signal == "raw"):
                prev = self._snapshot or [None] * len(masters)
                halves = x_half or [None] * len(masters)
                dens = denoms or [None] * len(masters)
                signals = [consensus_signal(self.signal, p, h, x, lr, d)
                           for p, h, x, d in zip(prev, halves, masters, dens)]
                self.last_signal_sq = _sum_sq(signals, stacked=getattr(opt, "stacked", False))
                opt.apply_consensus_(signals, betas=self.betas)
        self._snapshot = None
        return opt.switch_if_due()


def _sum_sq(tensors: Sequence[torch.Tensor], stacked: bool) -> torch.Tensor:
    """Sum of squares of every element (``stacked``: per slice of the leading client dimension), fp32."""
    if stacked:
        return sum(t.float().pow(2).flatten(1).sum(1) for t in tensors)
    return sum(t.float().pow(2).sum() for t in tensors)


def _has_denominators(opt) -> bool:
    return hasattr(opt, "adam_denominators")


@torch.no_grad()
def adam_denominators(opt) -> list[torch.Tensor]:
    """``sqrt(v_hat) + eps`` of every active parameter of a client optimizer, with its current second moment.

    ``v_hat = v / (1 - alpha2**t)`` with the block's step counter ``t`` (taken as at least 1: a client whose first
    step on this block was skipped has ``v = 0`` and gets ``eps``), as the optimizer's step divides by it (except under
    trivial BMA, ``local_moments=False``: that step divided by an updated v it did not store, and this reads the stored
    v, on every backend alike). Every
    optimizer that has Adam moments of its own says so through an ``adam_denominators()`` method
    (:meth:`deca_ds.optim.BlockAdam.adam_denominators`, fp32 or 8-bit moments; the stacked simulator's optimizer;
    :meth:`deca_ds.engine.zero.ZeroBlockView.adam_denominators`, from DeepSpeed's partitioned ``exp_avg_sq``).

    Raises:
        ValueError: the optimizer exposes none.
    """
    if not _has_denominators(opt):
        raise ValueError(f"{type(opt).__name__} exposes no Adam second moments")
    return opt.adam_denominators()

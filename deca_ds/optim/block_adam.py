"""BlockAdam: AdamW on one block of parameters at a time, holding optimizer state for that block only.

This is the local half of DECA (docs/design.md §1): the active block takes an AdamW step on its fp32 master copy; the
engine then gossips the block (through :meth:`BlockAdam.master_params`), folds the consensus signal into the moments
(:meth:`BlockAdam.apply_consensus_`) and lets the schedule switch blocks (:meth:`BlockAdam.switch_if_due`). Used alone
(``auto_switch=True``) it is BAdam-style block coordinate descent.

Memory: gradients, the fp32 master (only for bf16/fp16 models; an fp32 model's weights are their own master) and the
moments exist for the active block only. With ``state_policy="offload"`` inactive blocks' state waits in host memory
(:class:`~deca_ds.optim.state_store.BlockStateStore`). With ``moment_dtype="int8"`` the active block's two moments are
held in 8 bits (bitsandbytes' blockwise quantization, the format ``state_store`` uses for offloaded moments): 2 bytes
per parameter plus 8 bytes of scales per 256, instead of 8; each step dequantizes one tensor at a time, runs the same
AdamW arithmetic and quantizes the result again.

Bookkeeping (which block, which parameters, state moves) is kept apart from the maths (:func:`adamw_step_`), as in
``torch.optim.adam``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from deca_ds import consensus
from deca_ds.blocks import Block, BlockPartition, BlockSchedule
from deca_ds.optim.state_store import (OFFLOAD_DTYPES, BlockStateStore, Quantized, check_offload_support, dequantize,
                                       quantize)
from deca_ds.step import accumulate_nonfinite_

STATE_POLICIES = ("reset", "offload")
MOMENT_DTYPES = ("fp32", "int8")
INT8_MOMENT_KEYS = ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax")
"""State keys of 8-bit moments (``moment_dtype="int8"``), in place of ``exp_avg`` and ``exp_avg_sq``."""


@torch.no_grad()
def adamw_step_(
    x: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    local_moments: bool = True,
) -> None:
    """One AdamW update of the fp32 tensor ``x`` in place, written with the same operations as ``torch.optim.AdamW``.

    Args:
        x: fp32 weights (the master), updated in place.
        grad: fp32 gradient.
        exp_avg: First moment m, fp32; updated in place only when ``local_moments``.
        exp_avg_sq: Second moment v, fp32; updated in place only when ``local_moments``.
        step: Bias-correction step t (1 at the first update).
        lr: Learning rate.
        beta1: Decay of m (α1).
        beta2: Decay of v (α2).
        eps: Added to the denominator.
        weight_decay: Decoupled weight decay: ``x -= lr * weight_decay * x`` before the Adam update.
        local_moments: ``False`` ("trivial BMA"): the step uses ``m' = α1 m + (1-α1) g`` and
            ``v' = α2 v + (1-α2) g²`` but the stored m and v are left unchanged.
    """
    if weight_decay != 0:
        x.mul_(1 - lr * weight_decay)
    if local_moments:
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        m, v = exp_avg, exp_avg_sq
    else:
        m = exp_avg.lerp(grad, 1 - beta1)
        v = exp_avg_sq.mul(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5  # as torch (not math.sqrt): bit-identical results
    denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
    x.addcdiv_(m, denom, value=-lr / bias_correction1)


@torch.no_grad()
def adamw_foreach_step_(
    xs: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    steps: Sequence[int],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float | Sequence[float],
    local_moments: bool = True,
) -> None:
    """:func:`adamw_step_` on lists of tensors with torch's multi-tensor (``_foreach``) kernels.

    Each tensor goes through exactly the element-wise operations :func:`adamw_step_` applies to it, in the same
    order and with the same scalars (the bias corrections per tensor, from its own ``step``), so on the CPU, where
    a ``_foreach`` op is the single-tensor op applied to each list entry, the results are bit-identical; on a GPU
    one kernel launch covers the whole list.

    Memory: the denominators (and, without ``local_moments``, the updated moment copies) of every tensor in the list
    exist at once; callers bound that by passing chunks (see :meth:`BlockAdam.step`).

    Args:
        xs: fp32 weights (masters), updated in place.
        grads: fp32 gradients.
        exp_avgs: first moments, fp32 (updated in place when ``local_moments``).
        exp_avg_sqs: second moments, fp32 (updated in place when ``local_moments``).
        steps: bias-correction step of each tensor (1 at its first update).
        weight_decay: as :func:`adamw_step_`, one value for every tensor or one per tensor (what torch's AdamW
            does with parameter groups of different ``weight_decay``: e.g. 0 for biases and norm weights).
        lr, beta1, beta2, eps, local_moments: as :func:`adamw_step_`.
    """
    if not xs:
        return
    decays = list(weight_decay) if isinstance(weight_decay, Sequence) else [weight_decay] * len(xs)
    if len(decays) != len(xs):
        raise ValueError(f"adamw_foreach_step_ got {len(decays)} weight decays for {len(xs)} tensors")
    # As adamw_step_ (and torch's AdamW per group): a tensor whose decay is 0 is not multiplied at all.
    decayed = [(x, 1 - lr * wd) for x, wd in zip(xs, decays) if wd != 0]
    if decayed:
        torch._foreach_mul_([x for x, _ in decayed], [factor for _, factor in decayed])
    if local_moments:
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        ms, vs = exp_avgs, exp_avg_sqs
    else:
        ms = torch._foreach_lerp(exp_avgs, grads, 1 - beta1)
        vs = torch._foreach_mul(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
    # Scalars as adamw_step_ computes them (``** 0.5``, not math.sqrt: bit-identical to torch's AdamW).
    denoms = torch._foreach_sqrt(vs)
    torch._foreach_div_(denoms, [(1 - beta2**t) ** 0.5 for t in steps])
    torch._foreach_add_(denoms, eps)
    torch._foreach_addcdiv_(xs, ms, denoms, [-lr / (1 - beta1**t) for t in steps])


def _chunks(items: list, sizes: list[int], cap: int) -> list[list]:
    """Consecutive runs of ``items`` whose ``sizes`` add up to at most ``cap`` (an item larger than ``cap`` alone)."""
    out, run, total = [], [], 0
    for item, n in zip(items, sizes):
        if run and total + n > cap:
            out.append(run)
            run, total = [], 0
        run.append(item)
        total += n
    if run:
        out.append(run)
    return out


def moments_of(state: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 moments (m, v) of one parameter's BlockAdam state.

    fp32 state: the state's own tensors (in-place writes change the state). 8-bit state: new dequantized fp32 tensors
    (writes change nothing until :func:`store_moments_` quantizes them back).
    """
    if "exp_avg_codes" not in state:
        return state["exp_avg"], state["exp_avg_sq"]
    shape = state["exp_avg_codes"].shape
    m = dequantize(Quantized(state["exp_avg_codes"], state["exp_avg_absmax"], sqrt=False), shape)
    v = dequantize(Quantized(state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"], sqrt=True), shape)
    return m, v


def store_moments_(state: dict, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> None:
    """Quantize fp32 moments into one parameter's 8-bit state (keys :data:`INT8_MOMENT_KEYS`), on their device.

    The format is :func:`deca_ds.optim.state_store.quantize`'s, i.e. bitsandbytes' blockwise dynamic quantization
    with 256 values per block: m with the signed dynamic map, as bitsandbytes' 8-bit Adam does; v with the unsigned
    map (v >= 0: no code is spent on a sign, as in bitsandbytes' 8-bit Adam), but of ``sqrt(v)`` rather than of v:
    v spans twice the orders of magnitude of sqrt(v) within a block, and the small entries that decide Adam's
    denominator ``sqrt(v) + eps`` would otherwise fall below the map's smallest code (3e-7 of the block's maximum)
    and become 0, turning their update into ``m / eps``. It is also the offload store's format, so offloading these
    moments stores them as they are (no second quantization).
    """
    qm = quantize(exp_avg, sqrt=False)
    qv = quantize(exp_avg_sq, sqrt=True)
    state["exp_avg_codes"], state["exp_avg_absmax"] = qm.codes, qm.absmax
    state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"] = qv.codes, qv.absmax


def _normalize_blocks(model: nn.Module, blocks) -> list[Block]:
    named = dict(model.named_parameters())
    if isinstance(blocks, BlockPartition):
        out = list(blocks.blocks)
    else:
        out = [Block(i, f"block{i}", tuple(names)) for i, names in enumerate(blocks)]
        BlockPartition(out)  # disjoint, non-empty
    if not out:
        raise ValueError("blocks is empty: give at least one block of parameter names")
    unknown = [n for b in out for n in b.param_names if n not in named]
    if unknown:
        raise ValueError(f"parameters not in model.named_parameters(): {unknown}")
    return out


class BlockAdam(torch.optim.Optimizer):
    """Block-wise AdamW with DECA's consensus correction of the moments.

    ``param_groups`` holds exactly one group with the active block's parameters (and ``lr``, ``betas``, ``eps``,
    ``weight_decay``), so DeepSpeed (stage 0, client optimizer) and LR schedulers work unchanged; on a switch the
    same group dict gets the new block's parameters. Weight decay is per parameter all the same: the group's
    ``weight_decay`` applies to every parameter except those named in ``no_decay``, which get none (what torch's
    AdamW does with a decay group and a ``weight_decay=0`` group, as ``transformers.Trainer`` builds them).
    ``opt.state[p]`` exists for active-block parameters only, with torch's keys ``step``, ``exp_avg``,
    ``exp_avg_sq`` (fp32) and ``master`` (fp32) when ``p`` is not fp32; with ``moment_dtype="int8"`` the two
    moments are :data:`INT8_MOMENT_KEYS` instead (read them with :func:`moments_of`).

    Args:
        model: The model; only its parameters in ``blocks`` are trained, the others get ``requires_grad=False``.
        blocks: A :class:`~deca_ds.blocks.BlockPartition`, or a list of lists of parameter names.
        lr: Learning rate γ.
        betas: (α1, α2) of the local statistics.
        eps: Denominator term.
        weight_decay: Decoupled (AdamW) weight decay, of every parameter not in ``no_decay``.
        switch_every: Optimizer steps a block stays active (R).
        order: Block order, see :class:`~deca_ds.blocks.BlockSchedule`.
        state_policy: ``"reset"`` (drop master and moments of a block leaving; its next visit starts from the model
            weights and zero moments, bias correction restarting at 1) or ``"offload"`` (park them in host memory
            and restore them at the next visit; the block's ``step`` counter continues).
        fixed_order: Block indices for ``order="fixed"``.
        seed: Shared seed of ``order="random"``.
        offload_dtype: ``"fp32"`` or ``"int8"`` storage of offloaded moments (see ``state_store``); moments that
            are 8-bit already (``moment_dtype="int8"``) are offloaded as they are.
        moment_dtype: ``"fp32"`` or ``"int8"``: the active block's ``exp_avg`` and ``exp_avg_sq`` held in 8 bits
            (:func:`store_moments_`; needs bitsandbytes). Every step, consensus fold and denominator read
            dequantizes them (one tensor, or a chunk no larger than the block's largest tensor, at a time: the
            extra fp32 memory is one tensor's moments, not the block's), runs the fp32 arithmetic and quantizes the
            result again.
        auto_switch: Switch blocks at the end of :meth:`step` when the schedule says so. Set ``False`` when something
            must happen between the step and the switch (gossip + consensus), then call :meth:`switch_if_due`.
        local_moments: ``False`` for the "trivial BMA" ablation: gradients do not update the stored moments.
        fused_backward: Step each active parameter inside backward, as soon as its gradient is complete
            (``register_post_accumulate_grad_hook``), and free that gradient at once: the block's gradients are never
            all alive together (model states lose the 4L/2L of gradients, keeping one tensor's). The arithmetic is
            the unfused step's, tensor by tensor, so the result is bit-identical. :meth:`step` then only advances
            the schedule. Cannot be combined with anything that needs all gradients before the update: gradient
            clipping, gradient accumulation (one backward per step; a second backward before :meth:`step` raises),
            a data-parallel gradient reduction (several ranks per client), or skipping a step after the fact
            (``skip_next_step`` raises). Non-finite gradients are still detected, without a host sync per tensor:
            :meth:`nonfinite_in_backward` says whether any stepped gradient was not finite.
        no_decay: Names (as ``model.named_parameters()`` gives them, exactly: not substrings) of the parameters
            that get no weight decay, typically biases and norm weights (the complement of
            ``Trainer.get_decay_parameter_names(model)``). Names outside every block are allowed (they are never
            trained). Saved in :meth:`state_dict`; default: every parameter is decayed.

    Raises:
        ValueError: unknown ``state_policy``/``offload_dtype``/``moment_dtype``/``order``, bad hyperparameters, or
            block or ``no_decay`` names not in the model.
        ConfigError: ``int8`` storage without an importable bitsandbytes.
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: BlockPartition | Sequence[Sequence[str]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        switch_every: int = 50,
        order: str = "ascending",
        state_policy: str = "reset",
        *,
        fixed_order: Sequence[int] | None = None,
        seed: int = 0,
        offload_dtype: str = "fp32",
        moment_dtype: str = "fp32",
        auto_switch: bool = True,
        local_moments: bool = True,
        fused_backward: bool = False,
        no_decay: Iterable[str] = (),
    ):
        if state_policy not in STATE_POLICIES:
            raise ValueError(f"unknown state_policy {state_policy!r}; choose one of {STATE_POLICIES}")
        if offload_dtype not in OFFLOAD_DTYPES:
            raise ValueError(f"unknown offload_dtype {offload_dtype!r}; choose one of {OFFLOAD_DTYPES}")
        if moment_dtype not in MOMENT_DTYPES:
            raise ValueError(f"unknown moment_dtype {moment_dtype!r}; choose one of {MOMENT_DTYPES}")
        check_offload_support(moment_dtype, setting="optim.moment_dtype")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not eps >= 0 or not weight_decay >= 0:
            raise ValueError(f"eps and weight_decay must be >= 0, got {eps}, {weight_decay}")
        self._model = model
        self._blocks = _normalize_blocks(model, blocks)
        self._schedule = BlockSchedule(len(self._blocks), switch_every, order, fixed_order, seed)
        self.state_policy = state_policy
        self.offload_dtype = offload_dtype
        self.moment_dtype = moment_dtype
        self.auto_switch = auto_switch
        self.local_moments = local_moments
        self.skip_next_step = False
        """Set by the caller (nan_policy=skip): the next step updates nothing but still advances the schedule."""
        self._store = BlockStateStore(offload_dtype) if state_policy == "offload" else None
        named = dict(model.named_parameters())
        self._block_params: list[list[nn.Parameter]] = [[named[n] for n in b.param_names] for b in self._blocks]
        self._names: dict[nn.Parameter, str] = {p: n for n, p in named.items()}
        self._set_no_decay(no_decay)
        self._global_step = 0
        first = self._schedule.position(0).block_idx
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(list(self._block_params[first]), defaults)
        self._active = first
        for p in model.parameters():
            p.requires_grad_(False)
        for p in self._block_params[first]:
            p.requires_grad_(True)
        self.fused_backward = bool(fused_backward)
        self._hooks: list = []
        self._stepped: set[nn.Parameter] = set()
        self._found_nonfinite: dict[torch.device, torch.Tensor] = {}
        if self.fused_backward:
            self._register_hooks()

    # ------------------------------------------------------------------------------------------------ properties

    @property
    def blocks(self) -> list[Block]:
        """The blocks, indexed by block index."""
        return list(self._blocks)

    @property
    def schedule(self) -> BlockSchedule:
        """The block schedule (shared by every client)."""
        return self._schedule

    @property
    def active_block_idx(self) -> int:
        """Index of the block being trained."""
        return self._active

    @property
    def active_block(self) -> Block:
        """The block being trained."""
        return self._blocks[self._active]

    @property
    def global_step(self) -> int:
        """Optimizer steps taken so far (the schedule position)."""
        return self._global_step

    @property
    def inner_step(self) -> int:
        """Steps since the block scheduled at ``global_step`` became active."""
        return self._schedule.position(self._global_step).inner_step

    def active_params(self) -> list[nn.Parameter]:
        """The active block's model parameters, in ``Block.param_names`` order."""
        return list(self._block_params[self._active])

    def param_name(self, p: nn.Parameter) -> str:
        """The model's name of parameter ``p``."""
        return self._names[p]

    @property
    def no_decay(self) -> frozenset[str]:
        """Names of the parameters the group's ``weight_decay`` does not apply to."""
        return self._no_decay

    def _set_no_decay(self, names: Iterable[str]) -> None:
        if isinstance(names, str):  # iterating it would give characters, never a parameter name
            raise ValueError(f"no_decay must be a collection of parameter names, got the string {names!r}")
        named = dict(self._model.named_parameters())
        names = frozenset(names)
        unknown = sorted(n for n in names if n not in named)
        if unknown:
            raise ValueError(f"no_decay names parameters not in model.named_parameters() (exact names, not "
                             f"patterns): {unknown}")
        self._no_decay = names
        self._undecayed = {named[n] for n in names}

    def _weight_decays(self, params: Sequence[nn.Parameter], group: dict) -> list[float]:
        """The decoupled weight decay of each of ``params``: the group's, or 0 for the ``no_decay`` ones."""
        return [0.0 if p in self._undecayed else group["weight_decay"] for p in params]

    # ------------------------------------------------------------------------------------------------ state

    def _device_of_block(self, block_idx: int) -> torch.device:
        return self._block_params[block_idx][0].device

    def _state_for(self, p: nn.Parameter) -> dict:
        """The active parameter's state, created on first use (zero moments, master from the weights)."""
        st = self.state[p]
        if not st:
            # Hazard (dtype): moments and master are fp32 whatever the model dtype.
            st["step"] = torch.tensor(0.0)
            zeros = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            if self.moment_dtype == "int8":
                store_moments_(st, zeros, zeros)
            else:
                st["exp_avg"] = zeros
                st["exp_avg_sq"] = torch.zeros_like(zeros)
            if p.dtype != torch.float32:
                st["master"] = p.detach().float()
        return st

    def master_params(self) -> list[torch.Tensor]:
        """fp32 tensors holding the active block's weights x, in :meth:`active_params` order.

        For fp32 parameters this is ``param.data`` itself (in-place writes change the model); for bf16/fp16 it is
        the fp32 master: after writing to it, call :meth:`sync_params_from_master_`.
        """
        out = []
        for p in self.active_params():
            out.append(p.data if p.dtype == torch.float32 else self._state_for(p)["master"])
        return out

    @torch.no_grad()
    def sync_params_from_master_(self) -> None:
        """Copy the active block's fp32 masters into the low-precision model weights (rounded); no-op for fp32."""
        for p in self.active_params():
            st = self.state.get(p)
            if st and "master" in st:
                p.data.copy_(st["master"])

    @torch.no_grad()
    def apply_consensus_(self, signals: Sequence[torch.Tensor], betas: tuple[float, float] = (0.9, 0.999)) -> None:
        """Fold DECA's consensus signal h into the active block's moments (:func:`deca_ds.consensus.fold_moments_`).

        Args:
            signals: One tensor per active parameter, in :meth:`active_params` order.
            betas: (β1, β2); ``(1.0, 1.0)`` leaves the moments unchanged.
        """
        params = self.active_params()
        if len(signals) != len(params):
            raise ValueError(f"apply_consensus_ got {len(signals)} signals for {len(params)} active parameters")
        for p, h in zip(params, signals):
            if h.shape != p.shape:
                raise ValueError(f"signal for {self._names[p]} has shape {tuple(h.shape)}, expected {tuple(p.shape)}")
        states = [self._state_for(p) for p in params]
        if self.moment_dtype == "fp32":
            consensus.fold_moments_([st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states],
                                    list(signals), betas)
            return
        if tuple(float(b) for b in betas) == (1.0, 1.0):
            return  # the fold leaves the moments unchanged; quantizing them again would only add error
        for st, h in zip(states, signals):
            # Memory: one tensor's fp32 moments at a time.
            m, v = moments_of(st)
            consensus.fold_moments_(m, v, h, betas)
            store_moments_(st, m, v)

    @torch.no_grad()
    def adam_denominators(self) -> list[torch.Tensor]:
        """``sqrt(v_hat) + eps`` of every active parameter, from its current second moment (dequantized when 8-bit).

        ``v_hat = v / (1 - alpha2**t)`` with the block's step counter ``t`` taken as at least 1; ``eps`` where the
        parameter has no state yet; read by :func:`deca_ds.consensus.adam_denominators`, so that the gradient-unit
        consensus signals see the denominator this optimizer's step divides by.

        Returns:
            One new fp32 tensor per active parameter, in :meth:`active_params` order.
        """
        group = self.param_groups[0]
        beta2, eps = group["betas"][1], group["eps"]
        out = []
        for p in self.active_params():
            st = self.state.get(p) or {}
            if "step" not in st:
                out.append(torch.full(p.shape, float(eps), dtype=torch.float32, device=p.device))
                continue
            t = max(int(st["step"].item()), 1)
            bias_correction2_sqrt = (1 - beta2**t) ** 0.5
            out.append((moments_of(st)[1].sqrt() / bias_correction2_sqrt).add_(eps))
        return out

    # ------------------------------------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """One AdamW step on the active block, then (with ``auto_switch``) a block switch if the schedule says so.

        Parameters whose ``.grad`` is None are skipped. Gradients of the active block are freed afterwards.

        Returns:
            The closure's loss, if a closure was given.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        skip, self.skip_next_step = self.skip_next_step, False
        if skip and self._stepped:
            raise RuntimeError("BlockAdam(fused_backward=True) applied this step's updates during backward: it cannot "
                               "be skipped afterwards (use nan_policy=stop, or fused_backward=False)")
        self._stepped.clear()
        params = [p for p in group["params"] if p.grad is not None]
        if not skip and params:
            # Memory: the foreach kernels hold temporaries (denominators, fp32 gradient copies) for a whole chunk, so
            # chunks are capped at the block's largest tensor: the peak stays what a tensor-by-tensor step needs.
            sizes = [p.numel() for p in params]
            for chunk in _chunks(params, sizes, max(sizes)):
                self._step_chunk(chunk, group, beta1, beta2)
        for p in group["params"]:
            # Memory: the block's gradients are not needed after the step.
            p.grad = None
        self._global_step += 1
        if self.auto_switch:
            self.switch_if_due()
        return loss

    def _step_chunk(self, params: list[nn.Parameter], group: dict, beta1: float, beta2: float) -> None:
        """AdamW on ``params`` (all with gradients) in three phases, each one multi-tensor op per list."""
        # Phase 1: state (fp32 master for low-precision weights), gradients in fp32, step counters.
        states = [self._state_for(p) for p in params]
        xs = [st.get("master", p.data) for p, st in zip(params, states)]
        grads = [p.grad if p.grad.dtype == torch.float32 else p.grad.float() for p in params]
        counters = [st["step"] for st in states]
        torch._foreach_add_(counters, 1)
        # fp32 moments: the state's own tensors; 8-bit: dequantized copies. Memory: the chunk is at most the block's
        # largest tensor, so the copies never exceed one tensor's fp32 moments.
        moments = [moments_of(st) for st in states]
        # Phase 2: the AdamW maths on the masters.
        adamw_foreach_step_(xs, grads, [m for m, _ in moments], [v for _, v in moments],
                            [int(c.item()) for c in counters], group["lr"], beta1, beta2, group["eps"],
                            self._weight_decays(params, group), self.local_moments)
        if self.moment_dtype == "int8" and self.local_moments:
            # Without local moments the step left m and v unchanged: nothing to store (no needless re-rounding).
            for st, (m, v) in zip(states, moments):
                store_moments_(st, m, v)
        # Phase 3: write the masters back into the model weights (rounded to bf16/fp16).
        low = [(p.data, st["master"]) for p, st in zip(params, states) if "master" in st]
        if low:
            torch._foreach_copy_([d for d, _ in low], [m for _, m in low])

    # ------------------------------------------------------------------------------------------------ fused backward

    def _register_hooks(self) -> None:
        """Hook the active block's parameters so that each steps as soon as its gradient is accumulated."""
        for h in self._hooks:
            h.remove()
        self._hooks = [p.register_post_accumulate_grad_hook(self._step_in_backward) for p in self.active_params()]

    @torch.no_grad()
    def _step_in_backward(self, p: nn.Parameter) -> None:
        if p in self._stepped:
            raise RuntimeError(f"BlockAdam(fused_backward=True): a second backward reached {self._names[p]} before "
                               "step(): gradient accumulation is not supported with the fused step (use "
                               "gradient_accumulation_steps=1, or fused_backward=False)")
        # Device-side flag, no host sync; the gradient is left bit-unchanged (deca_ds.step.accumulate_nonfinite_).
        accumulate_nonfinite_([p.grad], self._found_nonfinite)
        group = self.param_groups[0]
        self._step_chunk([p], group, *group["betas"])
        self._stepped.add(p)
        # Memory: the point of the fused step -- this gradient goes now, not after the whole backward.
        p.grad = None

    def nonfinite_in_backward(self) -> bool:
        """Whether any gradient stepped inside backward since the last call was not finite (one host sync per
        device); resets the flag. Always False without ``fused_backward``."""
        found = any(bool(f.cpu()) for f in self._found_nonfinite.values())
        for f in self._found_nonfinite.values():
            f.zero_()
        return found

    # ------------------------------------------------------------------------------------------------ switching

    def switch_if_due(self) -> bool:
        """Switch to the block the schedule assigns to ``global_step`` if it is not the active one.

        Returns:
            Whether a switch happened.
        """
        target = self._schedule.position(self._global_step).block_idx
        if target == self._active:
            return False
        self.switch_to(target)
        return True

    @torch.no_grad()
    def switch_to(self, block_idx: int) -> None:
        """Make ``block_idx`` the active block.

        Frees the old block's gradients, moves ``requires_grad``, and applies the state policy to the old block's
        state (drop it, or park it in host memory); with ``offload`` the new block's parked state is restored.
        """
        if not 0 <= block_idx < len(self._blocks):
            raise ValueError(f"block_idx {block_idx} out of range [0, {len(self._blocks)})")
        if block_idx == self._active:
            return
        old = self._block_params[self._active]
        parked = {}
        for p in old:
            p.grad = None
            p.requires_grad_(False)
            st = self.state.pop(p, None)
            if st:
                parked[self._names[p]] = st
        if self._store is not None and parked:
            self._store.put(self._active, parked)
        new = self._block_params[block_idx]
        for p in new:
            p.requires_grad_(True)
        # Keep the same group dict: LR schedulers and DeepSpeed hold references to it.
        self.param_groups[0]["params"] = list(new)
        self._active = block_idx
        if self.fused_backward:
            self._register_hooks()
        if self._store is not None:
            restored = self._store.take(block_idx, self._device_of_block(block_idx))
            for p in new:
                if restored and self._names[p] in restored:
                    st = restored[self._names[p]]
                    self.state[p] = {k: (v if v.dim() == 0 else v.to(p.device)) for k, v in st.items()}
            self._prefetch_next()

    def _prefetch_next(self) -> None:
        """Start bringing the next scheduled block's parked state to the device (accelerators only)."""
        pos = self._schedule.position(self._global_step)
        if pos.block_idx != self._active:
            return
        nxt = self._schedule.position(self._global_step - pos.inner_step + self._schedule.switch_every).block_idx
        if nxt != self._active:
            self._store.prefetch(nxt, self._device_of_block(nxt))

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the active block's gradients (inactive blocks have none)."""
        super().zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict:
        """Everything needed to continue bit-identically: schedule, position, hyperparameters, all block state.

        State is keyed by parameter name (not id), so a freshly built model and optimizer can load it.
        """
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        active = {self._names[p]: {k: v.clone() for k, v in st.items()} for p, st in self.state.items() if st}
        return {
            "format": "deca_ds.BlockAdam/1",
            "global_step": self._global_step,
            "active_block_idx": self._active,
            "skip_next_step": self.skip_next_step,
            "schedule": self._schedule.state_dict(),
            "block_names": [list(b.param_names) for b in self._blocks],
            "state_policy": self.state_policy,
            "moment_dtype": self.moment_dtype,
            "local_moments": self.local_moments,
            "param_group": group,
            "no_decay": sorted(self._no_decay),
            "state": active,
            "offloaded": self._store.state_dict() if self._store is not None else None,
        }

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a state saved by :meth:`state_dict` (the model weights are restored separately).

        The hyperparameters are the checkpoint's, as torch's ``Optimizer.load_state_dict`` restores each group's:
        ``lr``, ``betas``, ``eps``, ``weight_decay`` and the ``no_decay`` names. A checkpoint from before ``no_decay``
        existed keeps this optimizer's own ``no_decay`` (the Hugging Face integration applied the Trainer's rule
        outside BlockAdam then, to a group holding the Trainer's ``weight_decay``: the rule it is built with now).

        Raises:
            ValueError: the checkpoint's blocks, state policy or moment dtype differ from this optimizer's, or its
                ``no_decay`` names a parameter this model does not have.
        """
        if state_dict.get("format") != "deca_ds.BlockAdam/1":
            raise ValueError("not a BlockAdam state dict (missing format 'deca_ds.BlockAdam/1')")
        mine = [list(b.param_names) for b in self._blocks]
        if state_dict["block_names"] != mine:
            raise ValueError("checkpoint blocks differ from this optimizer's blocks (same partition settings needed)")
        if state_dict["state_policy"] != self.state_policy:
            raise ValueError(
                f"checkpoint uses state_policy={state_dict['state_policy']!r}, this optimizer {self.state_policy!r}"
            )
        saved_dtype = state_dict.get("moment_dtype", "fp32")  # checkpoints from before moment_dtype hold fp32
        if saved_dtype != self.moment_dtype:
            raise ValueError(f"checkpoint holds {saved_dtype} moments, this optimizer moment_dtype="
                             f"{self.moment_dtype!r}: resume with optim.moment_dtype={saved_dtype}")
        if "no_decay" in state_dict:  # validated before anything changes
            self._set_no_decay(state_dict["no_decay"])
        self._schedule.load_state_dict(state_dict["schedule"])
        # Drop whatever state exists now (without parking it), then activate the checkpoint's block.
        self.state = defaultdict(dict)
        if self._store is not None:
            self._store = BlockStateStore(self.offload_dtype)
        target = state_dict["active_block_idx"]
        for p in self._block_params[self._active]:
            p.grad = None
            p.requires_grad_(False)
        self._active = target
        for p in self._block_params[target]:
            p.requires_grad_(True)
        group = self.param_groups[0]
        group.update(state_dict["param_group"])
        group["params"] = list(self._block_params[target])
        if self.fused_backward:
            self._register_hooks()
        named = dict(self._model.named_parameters())
        for name, st in state_dict["state"].items():
            p = named[name]
            self.state[p] = {k: (v.detach().cpu().clone() if k == "step" else v.detach().to(p.device).clone())
                             for k, v in st.items()}
        if self._store is not None and state_dict["offloaded"] is not None:
            self._store.load_state_dict(state_dict["offloaded"])
        self._global_step = int(state_dict["global_step"])
        self.skip_next_step = bool(state_dict["skip_next_step"])

    @property
    def state_store(self) -> BlockStateStore | None:
        """The host store of inactive blocks' state (``None`` with ``state_policy="reset"``)."""
        return self._store

    @property
    def model(self) -> nn.Module:
        """The model whose parameters are trained."""
        return self._model


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def memory_report(optimizer: torch.optim.Optimizer, model: nn.Module | None = None) -> dict:
    """Bytes held, by category and device, counted from the tensors themselves (shared storage counted once).

    Works for :class:`BlockAdam` and for any torch optimizer (pass ``model`` to count all weights, else the
    optimizer's parameters are the weights).

    Returns:
        ``{"weights", "gradients", "master", "moments", "offloaded", "total": bytes, "by_device": {device:
        {category: bytes}}}``. ``moments`` is every non-scalar optimizer state tensor other than ``master``.
    """
    if model is None and isinstance(optimizer, BlockAdam):
        model = optimizer.model
    if model is not None:
        weights: Iterable[torch.Tensor] = list(model.parameters())
    else:
        weights = [p for g in optimizer.param_groups for p in g["params"]]
    cats = ("weights", "gradients", "master", "moments", "offloaded")
    report: dict = {c: 0 for c in cats}
    by_device: dict[str, dict[str, int]] = {}
    seen: set[tuple[str, int]] = set()

    def add(cat: str, t: torch.Tensor) -> None:
        key = (str(t.device), t.data_ptr())
        if t.numel() == 0 or key in seen:
            return
        seen.add(key)
        n = _tensor_bytes(t)
        report[cat] += n
        dev = by_device.setdefault(str(t.device), {c: 0 for c in cats})
        dev[cat] += n

    for p in weights:
        add("weights", p.data)
    for p in weights:
        if p.grad is not None:
            add("gradients", p.grad)
    for st in optimizer.state.values():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                add("master" if k == "master" else "moments", v)
    store = getattr(optimizer, "state_store", None)
    if store is not None:
        for t in store.tensors():
            add("offloaded", t)
    report["total"] = sum(report[c] for c in cats)
    report["by_device"] = by_device
    return report

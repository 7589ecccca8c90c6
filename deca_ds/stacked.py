"""Every client of a simulated run as ONE batched model: the fast path of ``backend=simulate``.

Why it exists: the per-client simulator (:mod:`deca_ds.simulate`) loops over N model replicas in Python, one small
forward/backward, clip, Adam step and mixing call per client per step. Here every trained parameter is one tensor
stacked along a leading client dimension ``(N, ...)`` and the N clients advance together:

- forward/backward: ``torch.func.vmap`` over ``torch.func.functional_call`` of one template model, the client
  dimension batched into every kernel; the per-client loss is each client's mean token loss, and one backward of
  their sum gives every client its own gradient (clients share no trained tensor);
- clipping: DeepSpeed's stage-0 arithmetic (:func:`deca_ds.step.clip_grad_norm_as_deepspeed_`) with every norm
  taken per client (one coefficient per client);
- Adam: :func:`deca_ds.optim.block_adam.adamw_step_` itself on the stacked block (the maths is elementwise, so it is
  per client by construction); the block schedule is :class:`deca_ds.blocks.BlockSchedule`, the state policies
  (``reset``/``offload``, fp32 or int8) those of BlockAdam, offloaded state kept per client in
  :class:`deca_ds.optim.state_store.BlockStateStore` (int8 quantization blocks therefore never straddle clients);
- between steps: :class:`deca_ds.consensus.ConsensusStep` unchanged (one instance for all clients) over
  :class:`StackedBlockAdam`, whose ``mix`` is one matrix product per tensor (:func:`deca_ds.simulate.mix_rows`);
  with ``gossip.compression``, every client's error feedback driven by :class:`deca_ds.compression.ClientsExchange`,
  the per-client simulator's own calls on the same rows (bit-equal given equal inputs).

Equivalence with the per-client path (the reference, itself bit-equal to a launch): the same batches, schedule,
state policies and formulas; only the float rounding differs (batched vs single matmuls, eager vs SDPA attention,
an all-ones attention mask: rows are right-padded, so with causal attention padding never reaches a real token; the
mix as a matmul instead of the Mixer's accumulation order), and a model with dropout draws other dropout masks
(per client, as separate processes do). tests/unit/test_stacked.py bounds the difference for every method.
``centralized`` keeps one replica whose gradient is the average over every client's batch (vmap over the
data only), like DeepSpeed's data-parallel all-reduce. ``dec_lora`` stacks only the adapters: the frozen base is
one shared tensor.

Memory: N copies of the trained parameters (for dec_lora only the adapters), the stacked active block's gradients
and Adam state, and the activations of N clients' batches at once (the price of one kernel per op).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from deca_ds.blocks import BlockSchedule
from deca_ds.build import block_names_for, no_decay_names, prepare_model, uses_torch_adamw
from deca_ds.config import ConfigError, RunConfig, check_stacked_support
from deca_ds.consensus import ConsensusStep
from deca_ds.data.formatting import IGNORE_INDEX
from deca_ds.loop import StepRecord
from deca_ds.optim.block_adam import adamw_step_
from deca_ds.optim.state_store import BlockStateStore

__all__ = ["StackedBlockAdam", "StackedSimulation", "stacked_losses", "clip_per_client_", "stacked_weights"]


# ------------------------------------------------------------------------------------------------------------ maths


def stacked_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each client's mean next-token cross-entropy over labelled tokens, as the Hugging Face causal-LM loss.

    Args:
        logits: ``(N, batch, seq, vocab)``.
        labels: ``(N, batch, seq)`` with ``-100`` where there is no loss; position t predicts ``labels[t]`` from
            ``logits[t-1]``.

    Returns:
        ``(N,)`` fp32 losses (``nan`` for a client without labelled tokens, as the reference's mean gives).
    """
    n = logits.shape[0]
    shift_logits = logits[..., :-1, :].float()
    shift_labels = labels[..., 1:]
    tok = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                            shift_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    mask = (shift_labels != IGNORE_INDEX).reshape(n, -1)
    return tok.reshape(n, -1).sum(1) / mask.sum(1)


@torch.no_grad()
def clip_per_client_(grads: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip every client's gradient (row ``c`` of each stacked tensor) to a global 2-norm of ``max_norm``.

    DeepSpeed's stage-0 fp32 arithmetic (:func:`deca_ds.step.clip_grad_norm_as_deepspeed_`) per client: per-tensor
    norms, ``stack.pow(2).sum().pow(1/2)``, coefficient ``min(1, max_norm / (norm + 1e-6))`` multiplied into every
    gradient (also when it is 1).

    Args:
        grads: stacked fp32 gradients ``(N, ...)``, modified in place.
        max_norm: the ``gradient_clipping`` value (> 0).

    Returns:
        ``(N,)`` norms before clipping.
    """
    norms = torch.stack([g.detach().float().flatten(1).norm(2.0, dim=1) for g in grads])  # (tensors, N)
    total = norms.pow(2.0).sum(0).float().pow(1.0 / 2.0)
    coef = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.dim() - 1))).to(g.dtype))
    return total


# ------------------------------------------------------------------------------------------------------- optimizer


class StackedBlockAdam:
    """BlockAdam over parameters stacked along a leading client dimension: every client's optimizer at once.

    A :class:`deca_ds.consensus.ConsensusOptimizer`: :meth:`master_params` are the stacked fp32 tensors of the active
    block, so one :class:`~deca_ds.consensus.ConsensusStep` gossips, forms the signal and folds it for every client.
    Step counters are per client (a skipped step does not advance that client's bias correction, as in BlockAdam);
    while they agree (always, unless ``nan_policy=skip`` skipped a client) one :func:`adamw_step_` call updates every
    client, else one call per client on its row.

    Args:
        params: name -> stacked parameter ``(R, ...)`` (fp32, or bf16/fp16 with fp32 masters of the active block).
        blocks: parameter names of each block, in block order.
        lr, betas, eps, weight_decay: AdamW hyperparameters.
        no_decay: names of the parameters ``weight_decay`` does not apply to (as :class:`deca_ds.optim.BlockAdam`).
        switch_every, order, fixed_order, seed: the block schedule (:class:`deca_ds.blocks.BlockSchedule`).
        state_policy: ``reset`` or ``offload`` (see :class:`deca_ds.optim.BlockAdam`).
        offload_dtype: ``fp32`` or ``int8`` storage of offloaded moments.
        local_moments: ``False`` for the trivial-BMA ablation.
    """

    stacked = True
    """Tensors carry a leading client dimension (read by :class:`deca_ds.consensus.ConsensusStep`'s statistics)."""

    def __init__(self, params: dict[str, torch.Tensor], blocks: Sequence[Sequence[str]], *, lr: float,
                 betas: Sequence[float], eps: float, weight_decay: float, switch_every: int, order: str,
                 fixed_order: Sequence[int] | None, seed: int, state_policy: str, offload_dtype: str,
                 local_moments: bool, no_decay: Iterable[str] = ()):
        self.params = params
        self.no_decay = frozenset(no_decay)
        self.blocks = [list(b) for b in blocks]
        self.replicas = next(iter(params.values())).shape[0]
        self.schedule = BlockSchedule(len(self.blocks), switch_every, order, fixed_order, seed)
        self.param_groups = [dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)]
        self.state_policy = state_policy
        self.local_moments = local_moments
        self.stores = ([BlockStateStore(offload_dtype) for _ in range(self.replicas)]
                       if state_policy == "offload" else None)
        self.global_step = 0
        self._active = self.schedule.position(0).block_idx
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        self.steps = [0] * self.replicas
        self._activate(self._active)

    # ------------------------------------------------------------------------------------------- protocol

    @property
    def active_block_idx(self) -> int:
        """Index of the block trained by the step just taken (the active block)."""
        return self._active

    def active_names(self) -> list[str]:
        """Parameter names of the active block."""
        return self.blocks[self._active]

    def _state_for(self, name: str) -> dict[str, torch.Tensor]:
        st = self.state.get(name)
        if st is None:
            p = self.params[name]
            st = {"exp_avg": torch.zeros_like(p, dtype=torch.float32),
                  "exp_avg_sq": torch.zeros_like(p, dtype=torch.float32)}
            if p.dtype != torch.float32:
                st["master"] = p.detach().float()
            self.state[name] = st
        return st

    def master_params(self) -> list[torch.Tensor]:
        """Stacked fp32 tensors holding the active block's weights (the parameters themselves when fp32)."""
        out = []
        for name in self.active_names():
            p = self.params[name]
            out.append(p.data if p.dtype == torch.float32 else self._state_for(name)["master"])
        return out

    @torch.no_grad()
    def sync_params_from_master_(self) -> None:
        """Copy fp32 masters into low-precision stacked weights (no-op for fp32)."""
        for name in self.active_names():
            st = self.state.get(name)
            if st and "master" in st:
                self.params[name].data.copy_(st["master"])

    @torch.no_grad()
    def apply_consensus_(self, signals: Sequence[torch.Tensor], betas: tuple[float, float]) -> None:
        """Fold stacked signals into the stacked moments with :func:`deca_ds.consensus.fold_moments_`."""
        from deca_ds.consensus import fold_moments_

        for name, h in zip(self.active_names(), signals, strict=True):
            st = self._state_for(name)
            fold_moments_(st["exp_avg"], st["exp_avg_sq"], h, betas)

    @torch.no_grad()
    def adam_denominators(self) -> list[torch.Tensor]:
        """Per active tensor, ``sqrt(v_hat) + eps`` of every client (its own step counter, at least 1)."""
        group = self.param_groups[0]
        beta2, eps = group["betas"][1], group["eps"]
        out = []
        for name in self.active_names():
            v = self._state_for(name)["exp_avg_sq"]
            bc = torch.tensor([(1 - beta2 ** max(t, 1)) ** 0.5 for t in self.steps], dtype=torch.float32,
                              device=v.device).view(-1, *([1] * (v.dim() - 1)))
            out.append((v.sqrt() / bc).add_(eps))
        return out

    @torch.no_grad()
    def step(self, grads: dict[str, torch.Tensor], skip: Sequence[bool]) -> None:
        """One AdamW step of the active block on every client whose ``skip`` is False.

        Args:
            grads: name -> stacked gradient of every active parameter (already clipped), in the weights' dtype; a
                low-precision one is stepped in fp32 against the fp32 master, as :class:`BlockAdam` does.
            skip: per replica, leave it unchanged (a non-finite step under ``nan_policy=skip``).
        """
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        live = [c for c in range(self.replicas) if not skip[c]]
        for c in live:
            self.steps[c] += 1
        if live:
            uniform = len(live) == self.replicas and len(set(self.steps)) == 1
            for name in self.active_names():
                g = grads.get(name)
                if g is None:
                    continue
                g = g if g.dtype == torch.float32 else g.float()  # bf16/fp16 weights: fp32 moments and master
                st = self._state_for(name)
                x = st.get("master", self.params[name].data)
                rows = [slice(None)] if uniform else live
                for r in rows:
                    t = self.steps[0] if uniform else self.steps[r]
                    adamw_step_(x[r], g[r], st["exp_avg"][r], st["exp_avg_sq"][r], t, group["lr"], beta1, beta2,
                                group["eps"], 0.0 if name in self.no_decay else group["weight_decay"],
                                self.local_moments)
                if "master" in st:
                    self.params[name].data.copy_(x)
        self.global_step += 1

    # ------------------------------------------------------------------------------------------- switching

    def switch_if_due(self) -> bool:
        """Switch to the block the schedule assigns to the next step; return whether it switched."""
        target = self.schedule.position(self.global_step).block_idx
        if target == self._active:
            return False
        self._deactivate(self._active)
        self._active = target
        self._activate(target)
        return True

    def _deactivate(self, block_idx: int) -> None:
        for name in self.blocks[block_idx]:
            self.params[name].requires_grad_(False)
            self.params[name].grad = None
        if self.stores is not None and self.state:
            for c, store in enumerate(self.stores):
                store.put(block_idx, {name: {"step": torch.tensor(float(self.steps[c])),
                                             **{k: v[c].clone() for k, v in st.items()}}
                                      for name, st in self.state.items()})
        self.state = {}
        self.steps = [0] * self.replicas

    def _activate(self, block_idx: int) -> None:
        for name in self.blocks[block_idx]:
            self.params[name].requires_grad_(True)
        if self.stores is None or block_idx not in self.stores[0]:
            return
        device = self.params[self.blocks[block_idx][0]].device
        per_client = [store.take(block_idx, device) for store in self.stores]
        for name in per_client[0]:
            self.state[name] = {k: torch.stack([pc[name][k] for pc in per_client])
                                for k in per_client[0][name] if k != "step"}
        first = next(iter(per_client[0]))
        self.steps = [int(pc[first]["step"].item()) for pc in per_client]

    # ------------------------------------------------------------------------------------------- memory

    def state_bytes_per_replica(self) -> int:
        """fp32 master + moments of the active block plus offloaded state, of one replica (as BlockAdam counts)."""
        live = sum(v.numel() * v.element_size() for st in self.state.values() for v in st.values())
        live //= self.replicas
        if self.stores is not None:
            seen = set()
            for t in self.stores[0].tensors():
                if t.numel() and t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    live += t.numel() * t.element_size()
        return live


class _StackedMix:
    """The ``mix`` of the stacked ConsensusStep, in place on the stacked fp32 tensors of the active block.

    Uncompressed: ``X <- W X`` per tensor, one matrix product. With ``gossip.compression``: every client's
    :class:`deca_ds.compression.ErrorFeedback` (``sim.feedback``) driven through
    :class:`deca_ds.compression.ClientsExchange` per tensor, the calls the per-client simulator makes
    (:meth:`deca_ds.simulate.Simulation._precompute_mixture`) on the same rows, hence the same bits; n encodes and
    n mixes per tensor in Python, no matrix product. Sets ``sim._payload``: bytes of one client's message to one
    neighbour (header excluded).
    """

    def __init__(self, sim: "StackedSimulation"):
        self.sim = sim

    def __call__(self, tensors: Sequence[torch.Tensor], step: int, block_idx: int):
        from deca_ds.simulate import mix_rows, uncompressed_payload

        sim = self.sim
        w = sim.topology.weights_at(step)
        fb = sim.feedback
        if fb is None:
            for t in tensors:
                t.copy_(mix_rows(t, w, sim.wire_dtype).to(t.dtype))
            sim._payload = uncompressed_payload(sum(t[0].numel() for t in tensors), sim.wire_dtype)
            return None
        from deca_ds.compression import ClientsExchange

        n = sim.num_clients
        exchange = ClientsExchange(fb, block_idx, sum(t[0].numel() for t in tensors), sim.device, w,
                                   [sim.topology.neighbors(c, step) for c in range(n)])
        for t in tensors:
            # Hazard: view, not reshape -- the mix writes into the rows, so they must be the stacked tensor itself
            # (fp32 masters and stacked parameters are contiguous; a copy would silently drop the mix).
            exchange.mix_(t.view(n, -1))
        sim._payload = exchange.end()
        return None


# ------------------------------------------------------------------------------------------------------ simulation


class StackedSimulation:
    """N clients of one run as one batched model; the same interface as :class:`deca_ds.simulate.Simulation`.

    Attributes:
        cfg, num_clients, device, tokenizer, data, topology, bytes_sent, global_step, peak_optimizer_state_bytes:
            as :class:`deca_ds.simulate.Simulation`.
        template: the model whose structure every client shares (frozen parameters live here, shared).
        params: name -> stacked trained parameter ``(R, ...)``; R = num_clients, or 1 for ``centralized``.
        optimizer: the :class:`StackedBlockAdam` of every client (None for nothing to train).
        hook: the one :class:`~deca_ds.consensus.ConsensusStep` of every client (None for the AdamW baseline).
        diagnostics: the rms(h)/rms(g)/clipping accumulator (:class:`deca_ds.simulate.Diagnostics`).
        feedback: one :class:`deca_ds.compression.ErrorFeedback` per client with ``gossip.compression`` (else None).
    """

    def __init__(self, cfg: RunConfig):
        """Build data, the template model, the stacked parameters, optimizer and hook (no files written).

        Raises:
            ConfigError: as :class:`deca_ds.simulate.Simulation`, or a setting the stacked path does not run.
        """
        from deca_ds.simulate import Diagnostics, apply_epochs, common_setup

        check_stacked_support(cfg)
        common_setup(self, cfg)
        n = self.num_clients
        if cfg.simulate.park_replicas:
            raise ConfigError("simulate.park_replicas=true needs the per-client simulator: set "
                              "simulate.stacked=false (the stacked path keeps every client on simulate.device)")
        if cfg.model.gradient_checkpointing:
            raise ConfigError("model.gradient_checkpointing=true is not supported by the stacked simulator: set "
                              "simulate.stacked=false or model.gradient_checkpointing=false")
        # gossip.compression: one error-feedback state per client, driven as the per-client simulator drives them.
        self.feedback = None
        if self.topology is not None and cfg.gossip.compression != "none":
            from deca_ds.compression import ErrorFeedback

            self.feedback = [ErrorFeedback(cfg.gossip.compression) for _ in range(n)]
        from deca_ds.models import load_model_and_tokenizer

        model, self.tokenizer = load_model_and_tokenizer(cfg.model, seed=cfg.seed)
        self.pad_id = self.tokenizer.pad_token_id
        from deca_ds.data import build_client_data

        self.data = [build_client_data(cfg, self.tokenizer, c, n) for c in range(n)]
        apply_epochs(self)
        model.to(self.device)
        model = prepare_model(cfg, model)
        self.block_wise = not uses_torch_adamw(cfg)
        self.blocks = block_names_for(cfg, model)
        trained = [name for b in self.blocks for name in b]
        # The template runs under vmap: eager attention batches into plain matmuls (SDPA has no batching rule on
        # CPU and would fall back to a loop over clients). Models built from it for evaluation and saving get the
        # implementation the model was loaded with back: forcing SDPA there fails on models whose attention SDPA
        # cannot compute (Gemma-2's logit soft-capping: "`sdpa` attention does not support `softcap`").
        self._attn_implementation = model.config._attn_implementation
        model.config._attn_implementation = "eager"
        for p in model.parameters():
            p.requires_grad_(False)
        self.template = model
        self.replicas = 1 if self.spec.world_data_parallel else n
        named = dict(model.named_parameters())
        self.params = {name: named[name].detach().unsqueeze(0).repeat(self.replicas, *([1] * named[name].dim()))
                       for name in trained}
        self._check_vmap_forward()
        o, b = cfg.optim, cfg.blocks
        single = len(self.blocks) == 1
        self.optimizer = StackedBlockAdam(
            self.params, self.blocks, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
            switch_every=b.switch_every if not single else 1, order=b.order if not single else "ascending",
            fixed_order=b.fixed_order if not single else None, seed=cfg.seed, state_policy=o.state_policy,
            offload_dtype=o.offload_dtype, local_moments=self.spec.local_moments,
            no_decay=no_decay_names(cfg, model))
        self.hook = None
        if self.block_wise:
            # One client has no neighbour: nothing to mix, nothing to correct.
            method = cfg.method if self.topology is not None or not self.spec.gossip else "local"
            self.hook = ConsensusStep(self.optimizer, method,
                                      mix=_StackedMix(self) if self.topology is not None else None,
                                      signal=cfg.deca.signal, betas=cfg.deca.betas)
        self.bytes_sent = [0] * n
        self._payload: int | None = None  # set by _StackedMix: bytes of one message of the step's exchange
        self.global_step = 0
        self.peak_optimizer_state_bytes = 0
        self.diagnostics = Diagnostics(n)
        self._eval_model = None

    # ------------------------------------------------------------------------------------------- the step

    def _batches(self, client: int, step: int) -> list[dict[str, torch.Tensor]]:
        from deca_ds.data import batch_for_step

        return [batch_for_step(self.data[client].train, step * self.gas + m, self.micro_batch, self.cfg.data.seed,
                               client, self.pad_id) for m in range(self.gas)]

    def _stack_micro_batch(self, batches: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Clients' micro-batches right-padded to one width: ``(input_ids, labels)`` ``(N, B, W)`` and tokens."""
        width = max(b["input_ids"].shape[1] for b in batches)
        ids, labels, tokens = [], [], 0
        for b in batches:
            mask = b["attention_mask"]
            lengths = mask.sum(1, keepdim=True)
            # Hazard: dropping the attention mask is exact only for right padding (padding after every real token).
            if not torch.equal(mask, (torch.arange(mask.shape[1])[None, :] < lengths).long()):
                raise RuntimeError("simulate.stacked needs right-padded batches (deca_ds.data.collate pads right)")
            pad = width - b["input_ids"].shape[1]
            ids.append(torch.nn.functional.pad(b["input_ids"], (0, pad), value=self.pad_id))
            labels.append(torch.nn.functional.pad(b["labels"], (0, pad), value=IGNORE_INDEX))
            tokens += int(mask.sum())
        return torch.stack(ids).to(self.device), torch.stack(labels).to(self.device), tokens

    def _forward(self, params: dict[str, torch.Tensor], input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, B, W, V)`` of every client's rows under its own (or, centralized, the shared) parameters."""
        from torch.func import functional_call, vmap

        template = self.template
        # An all-ones mask, the same for every client (not vmapped): with right padding and causal attention it
        # computes what no mask computes, and without one some models (GPT-2, via transformers'
        # ``warn_if_padding_and_no_attention_mask``) look for padding with ``.item()``, which vmap cannot batch.
        mask = torch.ones(input_ids.shape[1:], dtype=torch.long, device=input_ids.device)

        def one(p, ids):
            return functional_call(template, p, (ids,), {"attention_mask": mask, "use_cache": False}).logits

        # randomness="different": dropout (GPT-2, OPT and others default to 0.1) draws its own mask per client, as
        # in separate processes; vmap's default refuses any random operation.
        if self.replicas == 1:
            shared = {k: v[0] for k, v in params.items()}
            return vmap(lambda ids: one(shared, ids), randomness="different")(input_ids)
        return vmap(one, randomness="different")(params, input_ids)

    def _check_vmap_forward(self) -> None:
        """Run one two-token forward of every replica under vmap, so a model torch.func cannot batch is refused
        before anything trains, with one line, instead of a traceback at the first step.

        Hazard: some models run code vmap refuses (Bloom's GeLU is an ``autograd.Function`` without
        ``setup_context``); nothing short of running the forward finds them. The probe runs in the RNG state of a
        forked generator, so it does not shift a run's dropout draws.

        Raises:
            ConfigError: the model's forward fails under ``torch.func.vmap``; the message names the model, the
                error and the fix (``simulate.stacked=false``).
        """
        ids = torch.full((self.replicas, 1, 2), int(self.pad_id or 0), dtype=torch.long, device=self.device)
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                self._forward(self.params, ids)
        except (RuntimeError, NotImplementedError, ValueError, TypeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ConfigError(f"simulate.stacked=true cannot run {type(self.template).__name__}: its forward fails "
                              f"under torch.func.vmap ({first}): set simulate.stacked=false") from None

    def step(self, measure_distance: bool = True) -> StepRecord:
        """One optimizer step on every client, then gossip, consensus correction and block switch."""
        step, n = self.global_step, self.num_clients
        opt = self.optimizer
        block = opt.active_block_idx
        batches = [self._batches(c, step) for c in range(n)]
        active = opt.active_names()
        loss_sum = torch.zeros(n)
        finite = torch.ones(n, dtype=torch.bool)
        tokens = 0
        scale = 1.0 / n if self.replicas == 1 else 1.0
        for m in range(self.gas):
            ids, labels, tok = self._stack_micro_batch([batches[c][m] for c in range(n)])
            tokens += tok
            losses = stacked_losses(self._forward(self.params, ids), labels)
            # DeepSpeed divides by the accumulation steps; centralized averages every client's gradient.
            (losses.sum() * (scale / self.gas)).backward()
            detached = losses.detach().float().cpu()
            loss_sum += detached
            finite &= torch.isfinite(detached)
        grads = {name: self.params[name].grad for name in active if self.params[name].grad is not None}
        for name in active:
            self.params[name].grad = None
        gl = list(grads.values())
        if gl:
            grad_finite = torch.stack([torch.isfinite(g).flatten(1).all(1) for g in gl]).all(0).cpu()
        else:
            grad_finite = torch.ones(self.replicas, dtype=torch.bool)
        if self.replicas == 1:
            ok = bool(finite.all()) and bool(grad_finite.all())
            finite = torch.full((n,), ok)
            rep_ok = torch.tensor([ok])
        else:
            finite &= grad_finite
            rep_ok = finite
        norms = None
        if self.clip > 0 and gl:
            # As the reference, only clients with finite gradients are clipped (theirs are the only steps taken).
            norms = clip_per_client_(gl, self.clip)
        if gl:
            sums = sum(g.detach().float().pow(2).flatten(1).sum(1) for g in gl).tolist()
            numel = sum(g[0].numel() for g in gl)
            for r in range(self.replicas):
                if rep_ok[r]:
                    self.diagnostics.add_gradient(sums[r], numel,
                                                  norms is not None and float(norms[r]) + 1e-6 > self.clip)
        skip = [not bool(x) for x in rep_ok]
        if self.hook is not None:
            self.hook.before_step()
        opt.step(grads, skip)
        self._payload = None
        if self.hook is not None:
            self.hook.after_step(step)
            if self.hook.last_signal_sq is not None:
                numel = sum(self.params[k][0].numel() for k in active)
                for v in self.hook.last_signal_sq.tolist():
                    self.diagnostics.add_signal(v, numel)
        step_bytes = [0] * n
        if self.topology is not None:
            if self._payload is None:  # every gossiping method has a hook, whose after_step mixed
                raise RuntimeError(f"stacked simulator: step {step} gossips but its block was not mixed")
            from deca_ds.simulate import exchange_bytes

            step_bytes = exchange_bytes(self.topology.weights_at(step), self._payload)
        for c in range(n):
            self.bytes_sent[c] += step_bytes[c]
        self.global_step += 1
        self.peak_optimizer_state_bytes = max(self.peak_optimizer_state_bytes, opt.state_bytes_per_replica())
        mean_losses = (loss_sum / self.gas).tolist()
        return StepRecord(block=block, round=opt.schedule.position(step).round if self.block_wise else 0,
                          lr=float(opt.param_groups[0]["lr"]), losses=mean_losses,
                          nonfinite=[not bool(x) for x in finite], bytes_sent=step_bytes,
                          consensus_distance=self.consensus_distances(block) if measure_distance else [0.0] * n,
                          tokens=tokens)

    # ------------------------------------------------------------------------------------------- read-outs

    def consensus_distances(self, block_idx: int | None = None) -> list[float]:
        """Per client, RMS distance of a block from the clients' average (0 for one client or centralized)."""
        n = self.num_clients
        if n == 1 or self.replicas == 1:
            return [0.0] * n
        block_idx = self.optimizer.active_block_idx if block_idx is None else block_idx
        sq = torch.zeros(n, dtype=torch.float64)
        numel = 0
        for name in self.blocks[block_idx]:
            x = self.params[name].detach().float()
            mean = x.sum(0).div_(n)
            sq += (x - mean).pow(2).flatten(1).sum(1).double().cpu()
            numel += x[0].numel()
        return [math.sqrt(float(s) / max(numel, 1)) for s in sq]

    @property
    def schedule(self):
        """The block schedule shared by every client (None for the torch-AdamW baseline), as
        :attr:`deca_ds.simulate.Simulation.schedule`."""
        return self.optimizer.schedule if self.block_wise else None

    def active_block(self) -> int:
        """Index of the active block (identical on every client)."""
        return self.optimizer.active_block_idx

    def lr(self) -> float:
        """Current learning rate."""
        return float(self.optimizer.param_groups[0]["lr"])

    def set_lr(self, lr: float) -> None:
        """Every client's learning rate from the next step on (``optim.schedule``; the run loop calls it)."""
        for group in self.optimizer.param_groups:
            group["lr"] = float(lr)

    @torch.no_grad()
    def _load_row(self, model: nn.Module, values: dict[str, torch.Tensor]) -> nn.Module:
        named = dict(model.named_parameters())
        for name, v in values.items():
            named[name].data.copy_(v)
        return model

    def _scratch(self) -> nn.Module:
        if self._eval_model is None:
            self._eval_model = copy.deepcopy(self.template)
            self._eval_model.config._attn_implementation = self._attn_implementation
        return self._eval_model

    def model_of(self, client: int) -> nn.Module:
        """A new model holding client ``client``'s weights (the shared model for ``centralized``)."""
        row = 0 if self.replicas == 1 else client
        m = copy.deepcopy(self.template)
        m.config._attn_implementation = self._attn_implementation
        return self._load_row(m, {k: v[row] for k, v in self.params.items()})

    def evaluate_clients(self) -> list[dict[str, Any]]:
        """Each client's weights scored on the shared test split (the centralized model once)."""
        from deca_ds.data import evaluate
        from deca_ds.simulate import _client_rows

        evals: dict[int, dict] = {}
        model = self._scratch()
        for c in range(self.num_clients):
            row = 0 if self.replicas == 1 else c
            if row not in evals:
                self._load_row(model, {k: v[row] for k, v in self.params.items()})
                model.eval()
                evals[row] = evaluate(model, self.tokenizer, self.data[c], max_examples=_client_rows(self.cfg),
                                          batch_size=64, generate=self.cfg.data.eval_generate)
                model.train()
        return [evals[0 if self.replicas == 1 else c] for c in range(self.num_clients)]

    @torch.no_grad()
    def consensus_model(self) -> nn.Module:
        """A new model holding the average over clients of every trained parameter."""
        m = copy.deepcopy(self.template)
        m.config._attn_implementation = self._attn_implementation
        return self._load_row(m, {k: v.detach().float().mean(0).to(v.dtype) for k, v in self.params.items()})


def stacked_weights(sim) -> dict[str, np.ndarray]:
    """Every client's trained weights ``name -> (N, ...)`` of a stacked or per-client simulation (tests, tools)."""
    if isinstance(sim, StackedSimulation):
        n = sim.num_clients
        return {k: v.detach().float().expand(n, *v.shape[1:]).cpu().numpy() for k, v in sim.params.items()}
    names = [k for b in block_names_for(sim.cfg, sim.models[0]) for k in b]
    out = {}
    for k in names:
        out[k] = np.stack([dict(sim.model_of(c).named_parameters())[k].detach().float().cpu().numpy()
                           for c in range(sim.num_clients)])
    return out

"""DECA inside DeepSpeed ZeRO stages 1-3: block switching by re-initialization, gossip through DeepSpeed's fp32 masters.

Why this module exists: at stage 0 :class:`deca_ds.optim.BlockAdam` is DeepSpeed's client optimizer and owns the
block logic, because DeepSpeed hands it the model's own parameters. Under ZeRO it is handed flat fp32 partitions,
and ZeRO fixes its trainable set, partitions and gradient hooks at ``initialize`` (toggling ``requires_grad`` later is
silently wrong or crashes; ``docs/design.md`` §3). So here the block schedule and the state policy live outside
DeepSpeed, and on every block switch the engine is destroyed and re-initialized with only the new block trainable
and a fresh ``torch.optim.AdamW`` over it. DECA's between-steps sequence is the same
:class:`deca_ds.consensus.ConsensusStep` the stage-0 engine runs, over :class:`ZeroBlockView`, which reads and writes
x, m and v through DeepSpeed:

    forward/backward -> engine.step() (AdamW on this rank's partition of the active block)
        -> ConsensusStep: read x through DeepSpeed's fp32 master -> gossip -> write x_new back -> h -> m, v corrected
        -> schedule says switch? park the block's state (offload policy) -> destroy -> initialize(next block)

The update of the switching step is never lost: it is fully written (fp32 master and model weights) before the
engine is destroyed (BAdam's ZeRO-3 path rebuilds its partitions before DeepSpeed copies the step back, §4).

Access to x, m and v goes through DeepSpeed's public ``deepspeed.utils.safe_*`` API:
- stages 1/2: ``safe_get_full_*`` (an all-reduce inside the client's data-parallel group: every rank of the client
  calls it, in the same order) and ``safe_set_full_*`` (each rank keeps its fragment), plus ``p.data`` so that the
  model's weights are current at once (a ``p.data`` write alone is lost at the next step, §6);
- stage 3: ``safe_get/set_local_*`` on this rank's shard only. Peers at the same local rank of neighbouring clients
  hold identically shaped shards, so gossip mixes shards directly (``Mixer.mix_(..., presharded=True)``): no gather.

State policy: ``reset`` is the fresh AdamW of every re-initialization (zero moments, bias correction restarting at 1,
the fp32 master rebuilt from the model weights); ``offload`` parks each block's ``step``/``exp_avg``/``exp_avg_sq``
(and the fp32 master of low-precision models) in host memory (:class:`deca_ds.optim.state_store.BlockStateStore`;
full tensors at stages 1/2, this rank's shard at stage 3) and writes them back after the next re-initialization.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import time
from typing import Any, Sequence

import deepspeed
from deepspeed.runtime.engine import DeepSpeedEngine
import torch
import torch.distributed as dist
from deepspeed.utils import (lazy_init_hp_params_optimizer_state, safe_get_full_fp32_param,
                             safe_get_full_optimizer_state, safe_get_local_fp32_param,
                             safe_get_local_optimizer_state, safe_set_full_fp32_param,
                             safe_set_full_optimizer_state, safe_set_local_fp32_param,
                             safe_set_local_optimizer_state)

from deca_ds import consensus
from deca_ds.blocks import Block, BlockSchedule
from deca_ds.build import block_names_for, build_consensus_step
from deca_ds.config import ConfigError, RunConfig
from deca_ds.consensus import method_spec
from deca_ds.ds_config import zero_stage
from deca_ds.engine.accelerator import device
from deca_ds.optim.state_store import BlockStateStore
from deca_ds.step import BatchShape, StepResult, run_micro_batches

MOMENTS = ("exp_avg", "exp_avg_sq")


class ZeroBlockView:
    """The active block of a :class:`ZeroBlockEngine` as a :class:`deca_ds.consensus.ConsensusOptimizer`.

    ZeRO's counterpart of BlockAdam's bookkeeping (DeepSpeed's AdamW does the maths): which block is active, the
    schedule, the state policy, and access to the active block's x, m and v through DeepSpeed's ``safe_*`` API (full
    tensors at stages 1/2 — collective inside the client —, this rank's shard at stage 3), so that
    :class:`deca_ds.consensus.ConsensusStep` runs here exactly the code it runs around BlockAdam.

    Attributes:
        blocks: the :class:`deca_ds.blocks.Block` list, indexed by block index.
        schedule: the :class:`deca_ds.blocks.BlockSchedule` shared by every client.
        state_policy: ``reset`` or ``offload``.
        store: host store of inactive blocks' state (``None`` with ``reset``).
        active_block_idx: the block being trained.
    """

    def __init__(self, engine: "ZeroBlockEngine", blocks: Sequence[Block], schedule: BlockSchedule,
                 state_policy: str, offload_dtype: str):
        """Args:
            engine: the engine whose DeepSpeed state this view reads and writes.
            blocks: the blocks, indexed by block index.
            schedule: the block schedule.
            state_policy: ``reset`` or ``offload``.
            offload_dtype: ``fp32`` or ``int8`` storage of parked moments.
        """
        if state_policy not in ("reset", "offload"):
            raise ConfigError(f"optim.state_policy={state_policy!r} is not known: use reset or offload")
        self._engine = engine
        self.blocks = list(blocks)
        self.schedule = schedule
        self.state_policy = state_policy
        self.store = BlockStateStore(offload_dtype) if state_policy == "offload" else None
        self.active_block_idx = schedule.position(0).block_idx
        self._masters: list[torch.Tensor] = []
        # exp_avg_sq as adam_denominators read it, keyed by (engine step, block): apply_consensus_ of the same step
        # folds into it instead of reading it a second time (at stages 1/2 a read is a collective of the full tensor).
        self._v_read: tuple[tuple[int, int], list[torch.Tensor]] | None = None

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The current AdamW's parameter groups (``[0]["lr"]`` is the learning rate)."""
        return self._engine.optimizer.param_groups

    def master_params(self) -> list[torch.Tensor]:
        """Fresh fp32 copies of the active block's masters (full, or this rank's shard at stage 3); gossip writes into
        them and :meth:`sync_params_from_master_` writes them back. Collective inside the client at stages 1/2."""
        e = self._engine
        self._masters = [e._read(p) for p in e.active_params()]
        return self._masters

    @torch.no_grad()
    def sync_params_from_master_(self) -> None:
        """Write the tensors of the last :meth:`master_params` call into DeepSpeed's masters and the model weights."""
        e = self._engine
        params = e.active_params()
        for p, x in zip(params, self._masters):
            e._write(p, x)
        e._refresh_persistent(params)

    @torch.no_grad()
    def apply_consensus_(self, signals: Sequence[torch.Tensor], betas: tuple[float, float]) -> None:
        """Fold one signal per active parameter into DeepSpeed's ``exp_avg``/``exp_avg_sq`` (read, fold, write)."""
        e = self._engine
        params = e.active_params()
        if len(signals) != len(params):
            raise ValueError(f"apply_consensus_ got {len(signals)} signals for {len(params)} active parameters")
        cached = self._take_v_read()
        for i, (p, h) in enumerate(zip(params, signals)):
            m = e._read(p, "exp_avg")
            v = cached[i] if cached is not None else e._read(p, "exp_avg_sq")
            consensus.fold_moments_(m, v, h, betas)
            e._write(p, m, "exp_avg")
            e._write(p, v, "exp_avg_sq")

    @torch.no_grad()
    def adam_denominators(self) -> list[torch.Tensor]:
        """``sqrt(v_hat) + eps`` of every active parameter, from DeepSpeed's current ``exp_avg_sq``.

        The denominator torch's AdamW (``foreach=False``, the optimizer :meth:`ZeroBlockEngine._build` gives DeepSpeed)
        divides by: ``v_hat = v / (1 - beta2**t)`` with the block's step counter ``t`` taken as at least 1, as
        :meth:`deca_ds.optim.BlockAdam.adam_denominators` does; read by :func:`deca_ds.consensus.adam_denominators`
        for the gradient-unit consensus signals. In :meth:`master_params`' layout: full tensors at stages 1/2
        (collective inside the client, every rank calls it in the same order), this rank's shard at stage 3.

        Returns:
            One new fp32 tensor per active parameter, in block order.
        """
        e = self._engine
        group = self.param_groups[0]
        beta2, eps = group["betas"][1], group["eps"]
        bias_correction2_sqrt = (1 - beta2 ** max(int(e._flat_step()), 1)) ** 0.5
        vs = [e._read(p, "exp_avg_sq") for p in e.active_params()]
        # Nothing between this read and the fold of the same step changes v (gossip mixes the masters only).
        self._v_read = (self._v_key(), vs)
        return [(v.sqrt() / bias_correction2_sqrt).add_(eps) for v in vs]

    def _v_key(self) -> tuple[int, int]:
        return int(self._engine.global_step), self.active_block_idx

    def _take_v_read(self) -> list[torch.Tensor] | None:
        """The ``exp_avg_sq`` tensors :meth:`adam_denominators` read at this step and block (then forgotten), else
        ``None``: a fold must never use a v read before an optimizer step, a switch or an earlier fold."""
        cached, self._v_read = self._v_read, None
        if cached is None or cached[0] != self._v_key():
            return None
        return cached[1]

    def switch_if_due(self) -> bool:
        """Switch (re-initialize the engine) when the schedule assigns another block to the engine's next step."""
        target = self.schedule.position(self._engine.global_step).block_idx
        if target == self.active_block_idx:
            return False
        self._engine._switch_to(target)
        return True


class ZeroBlockEngine:
    """One rank's DECA training under ZeRO stage 1, 2 or 3; implements :class:`deca_ds.step.Engine`.

    Attributes:
        engine: the current DeepSpeed engine (replaced at every block switch).
        block_optimizer: the :class:`ZeroBlockView` (blocks, schedule, state policy, active block).
        hook: the :class:`deca_ds.consensus.ConsensusStep` over :attr:`block_optimizer`.
        mixer: neighbour exchange, or None when the method does not gossip.
        stage: the ZeRO stage.
        global_step: optimizer steps taken.
        switch_seconds: wall time of each block switch so far (destroy + initialize + state restore).
        rebroadcast_on_switch: let ``deepspeed.initialize`` re-broadcast every model parameter from the client's
            first rank at each switch (True: the behaviour before issue 15, kept for measurement by
            ``deca_ds.bench.zero_switch``); False (the default) skips it on re-builds, see :meth:`_build`.
    """

    def __init__(self, cfg: RunConfig, model: torch.nn.Module, ds_config: dict[str, Any], groups, mixer=None):
        """Args:
            cfg: the run's settings.
            model: the model in its training dtype.
            ds_config: DeepSpeed config dict with ``zero_optimization.stage`` 1-3 (checked by ``check_ds_config``).
            groups: :class:`deca_ds.gossip.ClientGroups` (created before this, in the same order on every rank).
            mixer: :class:`deca_ds.gossip.Mixer` for gossiping methods.

        Raises:
            ConfigError: a setting this path cannot honour.
        """
        self.cfg = cfg
        self.spec = method_spec(cfg.method)
        self.stage = zero_stage(ds_config)
        if self.stage not in (1, 2, 3):
            raise ConfigError(f"ZeroBlockEngine needs zero_optimization.stage 1, 2 or 3, got {self.stage}")
        if not cfg.optim.decay_norms_and_biases:  # check_ds_config refuses it first on every launch path
            raise ConfigError(f"optim.decay_norms_and_biases=false needs BlockAdam's per-parameter weight decay, and "
                              f"under ZeRO stage {self.stage} DeepSpeed's AdamW decays the whole block: set "
                              "optim.decay_norms_and_biases=true or zero_optimization.stage=0")
        self.device = device()
        model.to(self.device)
        self._model = model
        self.ds_config = dict(ds_config)
        # A torch optimizer is a "custom" optimizer to ZeRO; with optimizer offload DeepSpeed would otherwise insist
        # on its own CPU Adam (docs/design.md §3).
        self.ds_config["zero_allow_untested_optimizer"] = True
        self.ds_config["zero_force_ds_cpu_optimizer"] = False
        self.mixer = mixer if self.spec.gossip else None
        self.mpu = None if self.spec.world_data_parallel else groups.mpu
        self.client_group = None if self.spec.world_data_parallel else groups.client_group
        b = cfg.blocks
        blocks = [Block(i, f"block{i}", tuple(names)) for i, names in enumerate(block_names_for(cfg, model))]
        schedule = BlockSchedule(len(blocks), b.switch_every, b.order, b.fixed_order, cfg.seed)
        self.block_optimizer = ZeroBlockView(self, blocks, schedule, cfg.optim.state_policy, cfg.optim.offload_dtype)
        mix = None
        if self.mixer is not None:  # ZeRO-3: each rank mixes its own shard with the same shard of its neighbours
            mix = functools.partial(self.mixer.mix_, presharded=self.stage == 3)
        self.hook = build_consensus_step(cfg, self.block_optimizer, mix)
        self._named = dict(model.named_parameters())
        self.global_step = 0
        self.switch_seconds: list[float] = []
        self.rebroadcast_on_switch = False
        self.engine = None
        self._adam = None
        self.lr_scheduler = None
        self._counters = None
        self._build(self.block_optimizer.active_block_idx)

    # --- properties of the DecaEngine interface ----------------------------------------------------------------

    @property
    def model(self) -> torch.nn.Module:
        """The trained model (unwrapped). At stage 3 its parameters are partitioned: use :meth:`full_state_dict`
        or ``deepspeed.zero.GatheredParameters`` to read whole weights."""
        return self._model

    @property
    def optimizer(self):
        """The current client optimizer (torch AdamW over the active block's flat fp32 partitions)."""
        return self._adam

    @property
    def batch_shape(self) -> BatchShape:
        """Rows per micro-batch on this rank and micro-batches per step, as DeepSpeed resolved them."""
        return BatchShape(self.engine.train_micro_batch_size_per_gpu(), self.engine.gradient_accumulation_steps())

    collective_state_dict = True
    """:meth:`state_dict` communicates inside the client (every rank of the client must call it)."""

    @property
    def schedule(self) -> BlockSchedule:
        """The block schedule shared by every client."""
        return self.block_optimizer.schedule

    def write_monitor_events(self, events: list[tuple[str, float, int]]) -> None:
        """Send events to the ds_config's monitors (TensorBoard, CSV, W&B) when any is enabled."""
        if self.engine.monitor.enabled:
            self.engine.monitor.write_events(events)

    def active_block(self) -> int:
        """Index of the active block."""
        return self.block_optimizer.active_block_idx

    def active_params(self) -> list[torch.nn.Parameter]:
        """The active block's parameters, in block order."""
        return self._params_of(self.active_block())

    def lr(self) -> float:
        """Current learning rate."""
        return float(self._adam.param_groups[0]["lr"])

    def set_lr(self, lr: float) -> None:
        """Use learning rate ``lr`` from the next step on (the AdamW built at each switch takes ``cfg.optim.lr``)."""
        for group in self._adam.param_groups:
            group["lr"] = float(lr)

    def _params_of(self, block_idx: int) -> list[torch.nn.Parameter]:
        return [self._named[n] for n in self.block_optimizer.blocks[block_idx].param_names]

    # --- engine (re)initialization ------------------------------------------------------------------------------

    def _build(self, block_idx: int) -> None:
        """deepspeed.initialize with only ``block_idx`` trainable and a fresh AdamW over it; fresh zero state."""
        for p in self._model.parameters():
            p.requires_grad_(False)
        params = self._params_of(block_idx)
        for p in params:
            p.requires_grad_(True)
        o = self.cfg.optim
        self._adam = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                       weight_decay=o.weight_decay, foreach=False)
        ds_logger = logging.getLogger("DeepSpeed")
        level = ds_logger.level
        ds_logger.setLevel(logging.WARNING)  # one initialize per switch: keep its banner out of the run log
        # Cost (issue 15 item 5): DeepSpeedEngine.__init__ broadcasts every replicated parameter of the whole model
        # from the client's first rank, O(model) per switch. After the first build the client's ranks already hold
        # identical weights (ZeRO-1/2 all-gather every update to all of them, gossip mixes them identically, and at
        # ZeRO-3 partitioned parameters are not broadcast at all), so a re-build skips it: broadcasting equal bytes
        # is the identity. tests/integration/test_zero.py checks it: the ranks of a client stay bit-identical at every
        # step across switches, at stages 1, 2 and 3, and equal the stage-0 run bit for bit (stage 3: top block only).
        skip = self._counters is not None and not self.rebroadcast_on_switch
        engine_cls = DeepSpeedEngine
        real_broadcast = engine_cls._broadcast_model
        if skip:
            engine_cls._broadcast_model = lambda engine: None
        try:
            self.engine, _, _, self.lr_scheduler = deepspeed.initialize(
                model=self._model, optimizer=self._adam, model_parameters=params, config=self.ds_config, mpu=self.mpu)
        finally:
            engine_cls._broadcast_model = real_broadcast
            ds_logger.setLevel(level)
        self.block_optimizer.active_block_idx = block_idx
        # Fresh state created now (not lazily at the first step), so that DECA and the offload policy can read and
        # write m and v before the block's first step. Hazard (dtype): flat partitions are fp32; `step` is a CPU
        # scalar as torch.optim.AdamW keeps it.
        for flat in self._flats():
            self._adam.state[flat] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(flat),
                                      "exp_avg_sq": torch.zeros_like(flat)}
            if self.stage < 3:
                # ZeRO 1/2 link each parameter's optimizer-state fragment only after the first step.
                lazy_init_hp_params_optimizer_state(params, flat, self._adam.state)
        if self._counters is not None:
            self.engine.global_steps, self.engine.global_samples, self.engine.micro_steps = self._counters

    def _flats(self) -> list[torch.Tensor]:
        """The flat fp32 partitions DeepSpeed steps with our AdamW (the keys of its state)."""
        if self.stage == 3:
            # Stage 3 puts each sub-group's flat into the optimizer's param group only during its step.
            return list(self.engine.optimizer.fp32_partitioned_groups_flat)
        return [flat for group in self._adam.param_groups for flat in group["params"]]

    def _teardown(self) -> None:
        """Destroy the engine and drop every reference DeepSpeed left on the parameters (memory must not grow)."""
        self._counters = (self.engine.global_steps, self.engine.global_samples, self.engine.micro_steps)
        self.engine.destroy()
        # DeepSpeed 0.19.8's destroy() leaves the engine's forward pre/post hooks on the module: each would keep its
        # (destroyed) engine, optimizer and flat partitions alive, one more per switch.
        for attr in ("module_forward_pre_hook", "module_forward_post_hook"):
            handle = getattr(self.engine, attr, None)
            if handle is not None:
                handle.remove()
                setattr(self.engine, attr, None)
        for p in self._model.parameters():
            p.grad = None
            # ZeRO-3 keeps a reference to its optimizer on every parameter it trained: drop it, or the old
            # optimizer (flat fp32 partitions, moments) stays alive as long as the parameter.
            if hasattr(p, "_z3_optimizer"):
                del p._z3_optimizer
        self.engine = self._adam = self.lr_scheduler = None
        gc.collect()

    def _switch_to(self, block_idx: int) -> None:
        t0 = time.perf_counter()
        ctl = self.block_optimizer
        old = ctl.active_block_idx
        sched_state = self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None
        if ctl.store is not None:
            ctl.store.put(old, self._read_block_state())
        self._teardown()
        self._build(block_idx)
        if sched_state is not None and self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(sched_state)
            for g, lr in zip(self._adam.param_groups, self.lr_scheduler.get_last_lr()):
                g["lr"] = lr
        if ctl.store is not None:
            restored = ctl.store.take(block_idx, torch.device("cpu"))
            if restored:
                self._write_block_state(restored)
        self.switch_seconds.append(time.perf_counter() - t0)

    # --- access to the active block's fp32 master and moments ---------------------------------------------------

    def _read(self, p: torch.nn.Parameter, key: str | None = None) -> torch.Tensor:
        """An fp32 copy of ``p``'s master (``key=None``) or optimizer state: full (stages 1/2, collective in the
        client) or this rank's shard (stage 3, local)."""
        if self.stage == 3:
            t = safe_get_local_fp32_param(p) if key is None else safe_get_local_optimizer_state(p, key)
            return t.detach().float().clone()  # a view of the flat partition: copy
        t = safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
        return t.detach().float()

    @torch.no_grad()
    def _write(self, p: torch.nn.Parameter, value: torch.Tensor, key: str | None = None) -> None:
        """Write ``p``'s master (and the model weight it rounds to) or optimizer state, in ``_read``'s layout."""
        if self.stage == 3:
            target = safe_get_local_fp32_param(p) if key is None else safe_get_local_optimizer_state(p, key)
            value = value.to(device=target.device, dtype=torch.float32)
            if key is None:
                safe_set_local_fp32_param(p, value)
                p.ds_tensor.data.copy_(value.view(-1)[: p.ds_tensor.numel()])
            else:
                safe_set_local_optimizer_state(p, value, key)
            return
        if key is None:
            safe_set_full_fp32_param(p, value)
            p.data.copy_(value.view_as(p.data))  # the model weight (rounded for bf16), visible at once
        else:
            safe_set_full_optimizer_state(p, value, key)

    @torch.no_grad()
    def _refresh_persistent(self, params) -> None:
        """Stage 3: parameters below ``stage3_param_persistence_threshold`` stay gathered in ``p.data``; after their
        shards were written, gather them again inside the client (collective, same order on every rank)."""
        if self.stage != 3:
            return
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        for p in params:
            if p.ds_status != ZeroParamStatus.AVAILABLE:
                continue
            group = p.ds_process_group
            k = dist.get_world_size(group)
            shard = p.ds_tensor.data.view(-1)
            parts = [torch.empty_like(shard) for _ in range(k)]
            dist.all_gather(parts, shard, group=group)
            p.data.copy_(torch.cat(parts)[: p.ds_numel].view(p.ds_shape))

    def _flat_step(self) -> float:
        steps = [st["step"] for st in self._adam.state.values() if "step" in st]
        return float(steps[0]) if steps else 0.0

    def _set_flat_step(self, value: float) -> None:
        for st in self._adam.state.values():
            st["step"] = torch.tensor(float(value))

    def _read_block_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """``name -> {step, exp_avg, exp_avg_sq[, master]}`` of the active block (host tensors)."""
        step = self._flat_step()
        out = {}
        block = self.block_optimizer.blocks[self.active_block()]
        for name, p in zip(block.param_names, self.active_params()):
            st = {"step": torch.tensor(step)}
            for key in MOMENTS:
                st[key] = self._read(p, key).cpu()
            if p.dtype != torch.float32:  # an fp32 model's weights are their own master
                st["master"] = self._read(p).cpu()
            out[name] = st
        return out

    def _write_block_state(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        block = self.block_optimizer.blocks[self.active_block()]
        params = self.active_params()
        for name, p in zip(block.param_names, params):
            st = states.get(name)
            if st is None:
                continue
            for key in MOMENTS:
                self._write(p, st[key], key)
            if "master" in st:
                self._write(p, st["master"])
            self._set_flat_step(float(st["step"]))
        if any("master" in st for st in states.values()):
            self._refresh_persistent(params)

    # --- training -----------------------------------------------------------------------------------------------

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> StepResult:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches, then gossip, consensus, switch.

        A non-finite loss never reaches the weights: the block's master, moments and step counter are put back after
        DeepSpeed's step (the schedule still advances). A non-finite gradient behind a finite loss is seen only after
        the step (global gradient norm): it is reported as ``nonfinite`` and, with ``nan_policy=skip``, raises.
        """
        block = self.active_block()
        params = self.active_params()
        # DeepSpeed counts micro-steps in engine.step(): every micro-batch but the last is a non-boundary step.
        mbs = run_micro_batches(micro_batches, self.device, lambda b: self.engine(**b).loss, self.engine.backward,
                                between=self.engine.step)
        # Reads of the master are collective at stages 1/2: every rank of the client decides alike.
        loss_bad = self._client_any(not mbs.finite)
        prev = [self._read(p) for p in params] if loss_bad else None
        saved_moments = None
        if loss_bad or not self.spec.local_moments:
            saved_moments = [{k: self._read(p, k) for k in MOMENTS} for p in params]
            saved_step = self._flat_step()
        self.hook.before_step()
        self.engine.step()
        nonfinite = loss_bad
        if loss_bad:  # undo the step: master (and weights), moments, bias-correction counter
            for p, x in zip(params, prev):
                self._write(p, x)
            self._refresh_persistent(params)
        else:
            norm = self.engine.get_global_grad_norm()
            if norm is not None and not torch.isfinite(torch.as_tensor(norm)).all():
                nonfinite = True
                if self.cfg.nan_policy == "skip":
                    raise RuntimeError("non-finite gradient with a finite loss under ZeRO: the step cannot be "
                                       "undone (nan_policy=skip needs the loss to be non-finite); use nan_policy=stop")
        if saved_moments is not None:
            # Trivial-BMA ablation: the local gradient shaped this step but does not enter the stored moments.
            for p, st in zip(params, saved_moments):
                for k in MOMENTS:
                    self._write(p, st[k], k)
            if loss_bad:
                self._set_flat_step(saved_step)
        self.global_step += 1  # the step is taken: the schedule's next position decides the switch
        # Always: neighbours expect the exchange every step.
        switched = self.hook.after_step(self.global_step - 1)
        stats = self.hook.last_mix_stats
        return StepResult(loss=mbs.mean, nonfinite=nonfinite, block=block, tokens=mbs.tokens,
                          bytes_sent=stats.bytes_sent if stats is not None else 0,
                          bytes_received=stats.bytes_received if stats is not None else 0, switched=switched)

    def _client_any(self, flag: bool) -> bool:
        """True on every rank of the client when any of them saw ``flag``."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, group=None if self.spec.world_data_parallel else self.client_group)
        return bool(t.item() > 0)

    # --- reading whole weights -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _gathered(self, params):
        if self.stage == 3:
            with deepspeed.zero.GatheredParameters(list(params), modifier_rank=None):
                yield
        else:
            yield

    def block_tensors(self, block_idx: int) -> list[torch.Tensor]:
        """The model's weights of block ``block_idx`` (copies at stage 3, gathered inside the client: collective)."""
        params = self._params_of(block_idx)
        if self.stage < 3:
            return [p.data for p in params]
        with self._gathered(params):
            return [p.data.detach().clone() for p in params]

    def whole_model(self) -> torch.nn.Module:
        """The model with whole weights: the engine's own at stages 1/2; at stage 3 (which holds shards) a CPU copy
        built from the gathered weights, each parameter in the engine's dtype, peft-wrapped (unmerged) for
        ``dec_lora``. Collective inside the client at stage 3."""
        if self.stage < 3:
            return self._model
        from deca_ds.models import build_meta_model

        model = build_meta_model(self.cfg.model.path)
        if method_spec(self.cfg.method).lora:
            # dec_lora trains a peft model: its state dict is keyed base_model.model.… with lora_A/lora_B beside
            # each base weight, so the copy must be wrapped the same way before it loads (a plain copy refused every
            # key and the run failed after training). It stays unmerged, as the stage-0 engine's model is: the
            # consensus averages A and B separately and merges afterwards, as every other engine does.
            import warnings

            from deca_ds.build import prepare_model

            with warnings.catch_warnings():  # prepare_model's embedded-model hint was given when the run started
                warnings.simplefilter("ignore", UserWarning)
                model = prepare_model(self.cfg, model)  # on the meta device: no weights drawn, no RNG touched
        # Each parameter in the engine's own dtype (the meta model is fp32): a bf16 run's copy was fp32, so at stage
        # 3 alone the evaluation ran in fp32 and clients/ and consensus/ were saved in fp32 (dec_lora: merged in
        # fp32), where stages 0-2 evaluate and save the bf16 model. Under DeepSpeed's bf16 mode this also gives
        # dec_lora's adapters the bf16 dtype DeepSpeed cast them to (peft made them fp32).
        own = dict(self._model.named_parameters())
        for name, p in model.named_parameters():  # a tied parameter once, under its first name
            p.data = p.data.to(own[name].dtype)  # meta tensors: no memory yet
        # Tied parameters (embed_tokens and lm_head) are one Parameter in the meta model; to_empty gives each module
        # its own new one, so the names of one Parameter are recorded here and made one again below. Not
        # model.tie_weights(): on a dec_lora model whose lm_head carries an adapter (lora.target_modules with lm_head)
        # the head is peft's lora.Linear, whose `weight` is a read-only property, and transformers' tie_weights
        # failed there with "KeyError: attribute 'weight' already exists" after training.
        aliases: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(p), []).append(name)
        model = model.to_empty(device="cpu")
        for first, *others in (names for names in aliases.values() if len(names) > 1):
            shared = model.get_parameter(first)
            for name in others:
                owner, _, leaf = name.rpartition(".")
                model.get_submodule(owner)._parameters[leaf] = shared
        model.load_state_dict(self.full_state_dict())
        buffers = dict(model.named_buffers())
        with torch.no_grad():  # non-persistent buffers (e.g. rotary inv_freq) are not in the state dict
            for name, buf in self._model.named_buffers():
                if name in buffers:
                    buffers[name].copy_(buf)
        return model.train(self._model.training)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict with whole tensors on CPU (stage 3: gathered parameter by parameter; collective)."""
        out = {}
        params = dict(self._model.named_parameters(remove_duplicate=False))
        for name, t in self._model.state_dict(keep_vars=True).items():
            p = params.get(name)
            if p is not None and self.stage == 3:
                with self._gathered([p]):
                    out[name] = p.data.detach().cpu().clone()
            else:
                out[name] = t.detach().cpu().clone()
        return out

    @torch.no_grad()
    def _load_weights(self, sd: dict[str, torch.Tensor]) -> None:
        if self.stage < 3:
            self._model.load_state_dict(sd)
            return
        named = dict(self._model.named_parameters(remove_duplicate=False))
        for name, value in sd.items():
            p = named.get(name)
            if p is None:
                continue
            shard = p.ds_tensor.data.view(-1)
            k, r = dist.get_world_size(p.ds_process_group), dist.get_rank(p.ds_process_group)
            flat = torch.zeros(shard.numel() * k, dtype=shard.dtype, device=shard.device)
            flat[: value.numel()].copy_(value.view(-1))
            shard.copy_(flat[r * shard.numel():(r + 1) * shard.numel()])
            if p.data.numel() == p.ds_numel:  # persistent (gathered) parameter
                p.data.copy_(value.view_as(p.data))
        bufs = dict(self._model.named_buffers())
        for name, value in sd.items():
            if name in bufs:
                bufs[name].copy_(value)

    # --- checkpoint state ----------------------------------------------------------------------------------------

    def _gather_shard(self, p, shard: torch.Tensor) -> torch.Tensor:
        """Stage 3: the whole tensor from every rank's shard of ``p`` (collective in the client)."""
        group = p.ds_process_group
        parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, shard.contiguous(), group=group)
        return torch.cat(parts)[: p.ds_numel].view(p.ds_shape).cpu()

    def _my_shard(self, p, full: torch.Tensor) -> torch.Tensor:
        shard_numel = p.ds_tensor.numel()
        k, r = dist.get_world_size(p.ds_process_group), dist.get_rank(p.ds_process_group)
        flat = torch.zeros(shard_numel * k, dtype=torch.float32)
        flat[: full.numel()].copy_(full.reshape(-1))
        return flat[r * shard_numel:(r + 1) * shard_numel].clone()

    def state_dict(self) -> dict[str, Any]:
        """Everything this client needs to continue bit-identically. Collective inside the client (stage 3, and
        stages 1/2 with several ranks per client): every rank of the client must call it."""
        ctl = self.block_optimizer
        active = self._read_block_state()
        if self.stage == 3:
            for name, st in active.items():
                p = self._named[name]
                for key in [k for k in st if k != "step"]:
                    st[key] = self._gather_shard(p, st[key])
        offloaded = None
        if ctl.store is not None:
            if self.stage < 3:
                offloaded = {"store": ctl.store.state_dict()}
            else:  # shards -> whole tensors, so that the checkpoint does not depend on the shard layout
                blocks = {}
                for b in ctl.store.blocks():
                    entry = ctl.store.peek(b)
                    for name, st in entry.items():
                        p = self._named[name]
                        for key in [k for k in st if k != "step"]:
                            st[key] = self._gather_shard(p, st[key])
                    blocks[b] = entry
                offloaded = {"full": blocks}
        return {
            "format": "deca_ds.ZeroBlockEngine/1",
            "stage": self.stage,
            "model": self.full_state_dict(),
            "active_block_idx": ctl.active_block_idx,
            "block_names": [list(b.param_names) for b in ctl.blocks],
            "schedule": ctl.schedule.state_dict(),
            "state_policy": ctl.state_policy,
            "active_state": active,
            "offloaded": offloaded,
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            "global_step": self.global_step,
            "engine_counters": (self.engine.global_steps, self.engine.global_samples, self.engine.micro_steps),
            "mixer": self.mixer.state_dict() if self.mixer is not None else None,
            "rng": {"torch": torch.get_rng_state()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (same client, same stage). Collective inside the client.

        Raises:
            ValueError: not a ZeroBlockEngine checkpoint, or another partition/state policy.
        """
        if state.get("format") != "deca_ds.ZeroBlockEngine/1":
            raise ValueError("checkpoint was not written by ZeroBlockEngine (ZeRO stage >= 1): resume with the "
                             "zero_optimization.stage it was written with")
        ctl = self.block_optimizer
        if state["block_names"] != [list(b.param_names) for b in ctl.blocks]:
            raise ValueError("checkpoint blocks differ from this run's blocks (same partition settings needed)")
        if state["state_policy"] != ctl.state_policy:
            raise ValueError(f"checkpoint uses optim.state_policy={state['state_policy']!r}, this run "
                             f"{ctl.state_policy!r}")
        ctl.schedule.load_state_dict(state["schedule"])
        self._load_weights(state["model"])
        self._teardown()
        self._counters = tuple(state["engine_counters"])
        self._build(int(state["active_block_idx"]))
        active = state["active_state"]
        if self.stage == 3:
            active = {n: {k: (v if k == "step" else self._my_shard(self._named[n], v)) for k, v in st.items()}
                      for n, st in active.items()}
        self._write_block_state(active)
        if ctl.store is not None and state["offloaded"] is not None:
            ctl.store = BlockStateStore(self.cfg.optim.offload_dtype)
            if "store" in state["offloaded"]:
                ctl.store.load_state_dict(state["offloaded"]["store"])
            else:
                for b, entry in state["offloaded"]["full"].items():
                    ctl.store.put(int(b), {n: {k: (v if k == "step" else self._my_shard(self._named[n], v))
                                               for k, v in st.items()} for n, st in entry.items()})
        if self.lr_scheduler is not None and state.get("lr_scheduler") is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
            for g, lr in zip(self._adam.param_groups, self.lr_scheduler.get_last_lr()):
                g["lr"] = lr
        self.global_step = int(state["global_step"])
        if self.mixer is not None and state.get("mixer"):
            self.mixer.load_state_dict(state["mixer"])
        torch.set_rng_state(state["rng"]["torch"])

    def close(self) -> None:
        """Release DeepSpeed's hooks and buffers."""
        if self.engine is not None:
            self._teardown()

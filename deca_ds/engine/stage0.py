"""DECA at ZeRO stage 0: a DeepSpeed engine around :class:`deca_ds.optim.BlockAdam` plus DECA's between-steps hook.

At stage 0 DeepSpeed hands its client optimizer the model's own parameters (when its ``bf16``/``fp16`` sections are
off, docs/design.md §3), so BlockAdam owns the block logic and the fp32 master, and the hook
(:class:`deca_ds.consensus.ConsensusStep`) runs at every gradient-accumulation boundary:

    forward/backward (only the active block needs grad) -> engine.step() (local half step)
        -> gossip the active block -> consensus signal -> moment correction -> switch?

The client layout's ``mpu`` makes gradients average inside a client and never across clients.

With ``optim.fused_backward`` BlockAdam takes the local step inside backward (each parameter as its gradient
completes), so the consensus snapshot is taken before backward, non-finite gradients are read from BlockAdam's
device-side flag, and ``engine.step()`` finds no gradient left: at stage 0, without clipping (refused with the
setting) and with the one-rank client's reduction switched off, it calls BlockAdam's ``step()`` (which then only
advances the schedule) and sets every ``.grad`` to None.
"""

from __future__ import annotations

from typing import Any

import deepspeed
import torch

from deca_ds.build import build_consensus_step, build_optimizer, uses_torch_adamw
from deca_ds.config import RunConfig
from deca_ds.consensus import method_spec
from deca_ds.engine.accelerator import device
from deca_ds.step import BatchShape, StepResult, all_finite, run_micro_batches


class DecaEngine:
    """One rank's DeepSpeed engine (stage 0) plus DECA's between-steps hook; implements
    :class:`deca_ds.step.Engine`.

    Attributes:
        engine: the DeepSpeed engine (``engine.module`` is the model).
        optimizer: the client optimizer (BlockAdam, or AdamW for the centralized baseline).
        block_optimizer: the BlockAdam (None for the AdamW baseline).
        hook: the :class:`deca_ds.consensus.ConsensusStep` (None for the AdamW baseline, which never gossips).
        mixer: neighbour exchange, or None when the method does not gossip.
        global_step: optimizer steps taken.
    """

    collective_state_dict = False
    """:meth:`state_dict` is local to the rank."""

    def __init__(self, cfg: RunConfig, model: torch.nn.Module, ds_config: dict[str, Any], groups, mixer=None):
        """Args:
            cfg: the run's settings.
            model: the model in its training dtype (cast before the engine is built).
            ds_config: DeepSpeed config dict (already checked).
            groups: :class:`deca_ds.gossip.ClientGroups` (created before this, in the same order on every rank).
            mixer: :class:`deca_ds.gossip.Mixer` for gossiping methods.
        """
        self.cfg = cfg
        self.spec = method_spec(cfg.method)
        self.device = device()
        model.to(self.device)  # before the optimizer: its fp32 masters live where the weights live
        self.optimizer = build_optimizer(cfg, model)
        self.mixer = mixer if self.spec.gossip else None
        self.block_optimizer = None if uses_torch_adamw(cfg) else self.optimizer
        self.fused = self.block_optimizer is not None and self.block_optimizer.fused_backward
        self.hook = None
        if self.block_optimizer is not None:
            self.hook = build_consensus_step(cfg, self.block_optimizer,
                                             self.mixer.mix_ if self.mixer is not None else None,
                                             fused_backward_ok=True)  # train_step snapshots before backward
        mpu = None if self.spec.world_data_parallel else groups.mpu
        self.engine, _, _, self.lr_scheduler = deepspeed.initialize(model=model, optimizer=self.optimizer,
                                                                    config=ds_config, mpu=mpu)
        if self.engine.seq_dp_world_size == 1:
            # A one-rank client: DeepSpeed would still flatten every gradient into a bucket, all-reduce it over a
            # group of one and copy it back (about 4 ms a step on the benchmark's model). Over one rank that
            # reduction is the identity bit for bit (its averaging factors are 1.0 and a dtype round trip is
            # exact), so it is switched off.
            self.engine.enable_backward_allreduce = False
        self.global_step = 0

    @property
    def model(self) -> torch.nn.Module:
        """The trained model (unwrapped)."""
        return self.engine.module

    @property
    def batch_shape(self) -> BatchShape:
        """Rows per micro-batch on this rank and micro-batches per step, as DeepSpeed resolved them."""
        return BatchShape(self.engine.train_micro_batch_size_per_gpu(), self.engine.gradient_accumulation_steps())

    @property
    def schedule(self):
        """The block schedule (None for the AdamW baseline)."""
        return self.block_optimizer.schedule if self.block_optimizer is not None else None

    def active_block(self) -> int:
        """Index of the active block (0 for full-parameter optimizers)."""
        return self.block_optimizer.active_block_idx if self.block_optimizer is not None else 0

    def block_tensors(self, block_idx: int) -> list[torch.Tensor]:
        """The model's weights of block ``block_idx`` (every parameter for full-parameter optimizers).

        Read from the model, so valid after the block went inactive (for bf16/fp16 models these are the rounded
        weights, not the fp32 master).
        """
        if self.block_optimizer is None:
            return [p.data for p in self.model.parameters()]
        params = dict(self.model.named_parameters())
        return [params[n].data for n in self.block_optimizer.blocks[block_idx].param_names]

    def whole_model(self) -> torch.nn.Module:
        """The model itself: at stage 0 every rank holds whole weights."""
        return self.model

    def lr(self) -> float:
        """Current learning rate."""
        return float(self.optimizer.param_groups[0]["lr"])

    def set_lr(self, lr: float) -> None:
        """Use learning rate ``lr`` from the next step on."""
        for group in self.optimizer.param_groups:
            group["lr"] = float(lr)

    def write_monitor_events(self, events: list[tuple[str, float, int]]) -> None:
        """Send events to the ds_config's monitors (TensorBoard, CSV, W&B) when any is enabled."""
        if self.engine.monitor.enabled:
            self.engine.monitor.write_events(events)

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> StepResult:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches, then the DECA hook.

        A non-finite loss or gradient never reaches the weights: the update is skipped on this client (the schedule
        still advances, so every client stays on the same block) and ``nonfinite`` is reported; the caller applies
        ``nan_policy``. With ``optim.fused_backward`` the update was applied during backward, before anything could
        be checked: ``nonfinite`` is still reported (``nan_policy=stop`` is the only policy allowed with it).
        """
        block = self.active_block()
        if self.fused and self.hook is not None:
            # Hazard (order): the fused step changes the weights during backward; the pre-step snapshot of the
            # consensus signal must be taken before it.
            self.hook.before_step()
        # DeepSpeed counts micro-steps in engine.step(): every micro-batch but the last is a non-boundary step.
        mbs = run_micro_batches(micro_batches, self.device, lambda b: self.engine(**b).loss, self.engine.backward,
                                between=self.engine.step)
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError(f"train_step got {len(micro_batches)} micro-batches but DeepSpeed expects "
                               f"gradient_accumulation_steps={self.batch_shape.accumulation_steps} per step")
        if self.fused:
            # No gradient is left: BlockAdam flagged non-finite ones on the device as it stepped them.
            nonfinite = self.block_optimizer.nonfinite_in_backward() or not all_finite(mbs.losses)
        else:
            # One fused finite check of the losses and every gradient (one host sync, not one per tensor).
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            nonfinite = not all_finite(mbs.losses + grads)
            if nonfinite:
                self._skip_update()
            if self.hook is not None:
                self.hook.before_step()
        self.engine.step()
        switched, stats = False, None
        if self.hook is not None:
            switched = self.hook.after_step(self.global_step)
            stats = self.hook.last_mix_stats
        self.global_step += 1
        return StepResult(loss=mbs.mean, nonfinite=nonfinite, block=block, tokens=mbs.tokens,
                          bytes_sent=stats.bytes_sent if stats is not None else 0,
                          bytes_received=stats.bytes_received if stats is not None else 0, switched=switched)

    def _skip_update(self) -> None:
        if self.block_optimizer is not None:
            self.block_optimizer.skip_next_step = True
        else:  # AdamW baseline: drop the gradients so the step is a no-op apart from weight decay
            for p in self.model.parameters():
                p.grad = None

    # --- checkpoint state ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything this rank needs to continue bit-identically: weights, optimizer, LR scheduler, counters."""
        return {
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            "global_step": self.global_step,
            "engine_global_steps": self.engine.global_steps,
            "engine_global_samples": self.engine.global_samples,
            "engine_micro_steps": self.engine.micro_steps,
            "mixer": self.mixer.state_dict() if self.mixer is not None else None,
            "rng": {"torch": torch.get_rng_state()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (from a checkpoint of the same client)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and state.get("lr_scheduler") is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.global_step = state["global_step"]
        self.engine.global_steps = state["engine_global_steps"]
        self.engine.global_samples = state["engine_global_samples"]
        self.engine.micro_steps = state["engine_micro_steps"]
        if self.mixer is not None and state.get("mixer"):
            self.mixer.load_state_dict(state["mixer"])
        torch.set_rng_state(state["rng"]["torch"])

    def close(self) -> None:
        """Release DeepSpeed's hooks and buffers."""
        self.engine.destroy()

"""DeepSpeed integration: the only module that imports deepspeed.

It builds one DeepSpeed engine per rank around :class:`deca_ds.optim.BlockAdam`, with the client layout's ``mpu`` so
that gradients are averaged inside a client and never across clients, and runs DECA's between-steps hook
(:class:`deca_ds.consensus.ConsensusStep`) at every gradient-accumulation boundary:

    forward/backward (only the active block needs grad) -> engine.step() (local half step)
        -> gossip the active block -> consensus signal -> moment correction -> switch?

Why the DeepSpeed config is restricted (measured, docs/design.md §3): at stage 0 DeepSpeed hands our optimizer the
model's own parameters only when its ``bf16``/``fp16`` sections are off (otherwise it wraps it with fp32 copies of
every parameter and block switching breaks), and ZeRO 1-3 freeze the trainable set at ``initialize``.
"""

from __future__ import annotations

import importlib
import os
import socket
from datetime import timedelta
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from deca_ds.config import RunConfig
from deca_ds.consensus import ConsensusStep, method_spec
from deca_ds.ds_config import zero_stage


# ---------------------------------------------------------------------------------------------------------------
# Process start


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(comm_timeout: float) -> None:
    """Start torch.distributed the way DeepSpeed expects, under the deepspeed launcher, torchrun or plain python.

    A plain ``python recipe.py`` becomes a one-rank world (DeepSpeed would otherwise try MPI discovery). On the CPU
    accelerator the unused shared-memory all-reduce op is not built (saves ~45 s and 66 MB of /dev/shm per rank).
    """
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    if get_accelerator().device_name() == "cpu":
        # NB: `import deepspeed.comm.torch as m` would bind the real torch module (name clash): go through importlib.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                                   timeout=timedelta(seconds=comm_timeout), verbose=False)


def device() -> torch.device:
    """This rank's training device."""
    return torch.device(get_accelerator().current_device_name())


def barrier() -> None:
    """World barrier (no-op without a process group)."""
    if dist.is_initialized():
        dist.barrier()


def peak_memory_bytes() -> int:
    """Peak accelerator memory allocated (GPU) or peak resident set size of this process (CPU)."""
    acc = get_accelerator()
    if acc.device_name() != "cpu":
        return int(acc.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# ---------------------------------------------------------------------------------------------------------------
# The engine


def build_optimizer(cfg: RunConfig, model: torch.nn.Module):
    """The client optimizer of ``cfg.method``: BlockAdam (one block per layer group, or one block for D-Adam), or
    torch AdamW for the centralized full-parameter baseline."""
    from deca_ds.blocks import partition_blocks
    from deca_ds.optim import BlockAdam

    if cfg.method == "centralized" and cfg.centralized_optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                 eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    spec = method_spec(cfg.method)
    b = cfg.blocks
    partition = partition_blocks(model, layers_per_block=b.layers_per_block, include_embeddings=b.include_embeddings,
                                 include_lm_head=b.include_lm_head, prefixes=b.prefixes)
    blocks = [[n for blk in partition.blocks for n in blk.param_names]] if spec.single_block else partition
    o = cfg.optim
    return BlockAdam(model, blocks, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                     switch_every=b.switch_every, order=b.order, state_policy=o.state_policy,
                     fixed_order=b.fixed_order, seed=cfg.seed, offload_dtype=o.offload_dtype, auto_switch=False,
                     local_moments=spec.local_moments)


class DecaEngine:
    """One rank's DeepSpeed engine plus DECA's between-steps hook.

    Attributes:
        engine: the DeepSpeed engine (``engine.module`` is the model).
        optimizer: the client optimizer (BlockAdam, or AdamW for the centralized baseline).
        mixer: neighbour exchange, or None when the method does not gossip.
    """

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
        self.block_optimizer = self.optimizer if hasattr(self.optimizer, "apply_consensus_") else None
        self.hook = None
        if self.block_optimizer is not None:
            self.hook = ConsensusStep(self.block_optimizer, cfg.method,
                                      mix=self.mixer.mix_ if self.mixer is not None else None,
                                      signal=cfg.deca.signal, betas=cfg.deca.betas)
        mpu = None if self.spec.world_data_parallel else groups.mpu
        self.engine, _, _, self.lr_scheduler = deepspeed.initialize(model=model, optimizer=self.optimizer,
                                                                    config=ds_config, mpu=mpu)
        self.global_step = 0

    @property
    def model(self) -> torch.nn.Module:
        """The trained model (unwrapped)."""
        return self.engine.module

    @property
    def gradient_accumulation_steps(self) -> int:
        """Micro-batches per optimizer step."""
        return self.engine.gradient_accumulation_steps()

    @property
    def micro_batch_size(self) -> int:
        """Rows per micro-batch on this rank."""
        return self.engine.train_micro_batch_size_per_gpu()

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

    def lr(self) -> float:
        """Current learning rate."""
        return float(self.optimizer.param_groups[0]["lr"])

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches, then the DECA hook.

        A non-finite loss or gradient never reaches the weights: the update is skipped on this client (the schedule
        still advances, so every client stays on the same block) and ``nonfinite`` is reported; the caller applies
        ``nan_policy``.

        Returns:
            ``loss`` (mean over micro-batches), ``nonfinite`` (bool), ``block`` (trained this step),
            ``bytes_sent``/``bytes_received`` (gossip of this step), ``tokens`` (non-padding input tokens),
            ``switched`` (the next step trains another block).
        """
        losses, tokens, nonfinite = [], 0, False
        block = self.active_block()
        stats = None
        switched = False
        for mb in micro_batches:
            mb = {k: v.to(self.device) for k, v in mb.items()}
            loss = self.engine(**mb).loss
            self.engine.backward(loss)
            losses.append(loss.detach().float())
            tokens += int(mb["attention_mask"].sum()) if "attention_mask" in mb else mb["input_ids"].numel()
            boundary = self.engine.is_gradient_accumulation_boundary()
            if boundary:
                nonfinite = not all(torch.isfinite(x).all() for x in losses) or not self._grads_finite()
                if nonfinite:
                    self._skip_update()
                if self.hook is not None:
                    self.hook.before_step()
            self.engine.step()
            if boundary:
                if self.hook is not None:  # None only for the centralized AdamW baseline, which never gossips
                    switched = self.hook.after_step(self.global_step)
                    stats = self.hook.last_mix_stats
                self.global_step += 1
        return {
            "loss": float(torch.stack(losses).mean()),
            "nonfinite": bool(nonfinite),
            "block": block,
            "bytes_sent": int(getattr(stats, "bytes_sent", 0) or 0),
            "bytes_received": int(getattr(stats, "bytes_received", 0) or 0),
            "tokens": tokens,
            "switched": bool(switched),
        }

    def _grads_finite(self) -> bool:
        return all(bool(torch.isfinite(p.grad).all()) for p in self.model.parameters() if p.grad is not None)

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


def build_engine(cfg: RunConfig, model: torch.nn.Module, ds_config: dict[str, Any], groups, mixer=None):
    """The engine for ``ds_config``'s ZeRO stage: :class:`DecaEngine` at stage 0, else
    :class:`deca_ds.zero.ZeroBlockEngine` (block switching by re-initialization, gossip through ZeRO's masters).

    Args:
        cfg: the run's settings.
        model: the model in its training dtype.
        ds_config: checked DeepSpeed config dict.
        groups: :class:`deca_ds.gossip.ClientGroups`.
        mixer: :class:`deca_ds.gossip.Mixer` for gossiping methods.
    """
    if zero_stage(ds_config) == 0:
        return DecaEngine(cfg, model, ds_config, groups, mixer=mixer)
    from deca_ds.zero import ZeroBlockEngine

    return ZeroBlockEngine(cfg, model, ds_config, groups, mixer=mixer)

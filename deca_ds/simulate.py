"""All clients of a decentralized run in one process: the researchers' tool for sweeps and ablations.

Why it exists: a grid of methods x Dirichlet alpha x topology x seeds needs hundreds of runs with 8 clients, and
launching 8 processes per run on a 2-core machine spends most of the time starting processes and passing messages.
Here every client keeps its own model replica and its own optimizer in one process, and the run is numerically the
launcher path (``deca_ds.trainer.run``) on CPU, built from the same pieces without DeepSpeed:

- the client optimizer comes from :func:`deca_ds.build.build_optimizer` (BlockAdam with ``auto_switch=False``,
  one block for D-Adam, torch AdamW for the centralized full-parameter baseline);
- the micro-batch loop is :func:`deca_ds.step.run_micro_batches`, the run loop :func:`deca_ds.loop.run_loop`;
- the between-steps sequence is :class:`deca_ds.consensus.ConsensusStep` itself, one per client;
- batches are :func:`deca_ds.data.batch_for_step` with the trainer's step/micro-batch indexing, data partitions are
  :func:`deca_ds.data.build_client_data`, evaluation is :func:`deca_ds.data.evaluate`;
- what DeepSpeed does at stage 0 around the optimizer step is redone here: loss / gradient_accumulation_steps,
  gradient clipping to ``gradient_clipping`` (global norm over the client's gradients), and for ``centralized`` the
  average of every client's gradient (DeepSpeed's data-parallel all-reduce).

Communication order, one step (hazard: every client must have taken its local step before anyone mixes, exactly as
neighbours exchange ``x_half`` in the launcher):

    for each client: forward/backward -> clip -> hook.before_step() -> optimizer.step()      (x -> x_half)
        (with optim.fused_backward: hook.before_step() -> forward/backward, which steps; no clipping)
    for each tensor of the active block, each client: own*W_ii + sum_j W_ij*x_j      (gossip.accumulate_mix_)
        (with gossip.compression: every client encodes its change, then each mixes: compression.ErrorFeedback)
    for each client: hook.after_step(step) with a ``mix`` that copies that client's row     (signal, BMA, switch)

Where replicas live (``simulate.device``, ``simulate.park_replicas``): by default every replica, its gradients and
its optimizer state sit on the training device (DeepSpeed's accelerator, else the CPU). Parked, they sit in CPU
memory and each client's replica is moved to the device for its own forward/backward/step and back; the mixing
runs on the device one tensor of the active block at a time, and the consensus hook (elementwise work on one
block) runs where the replica is parked. Device memory then holds one replica instead of N.

Per-client losses, weights and consensus distances equal the launcher's bit for bit (one rank per client, one thread
per process): the mixing arithmetic is the Mixer's own function applied in the Mixer's order, clipping restates
DeepSpeed's arithmetic, and the loss is divided by the accumulation steps as DeepSpeed divides it
(tests/integration/test_simulate_parity.py). ``mix_rows`` (a matmul) is the stacked formulation, not used here.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from deca_ds import checkpoint as ckpt
from deca_ds.build import (build_consensus_step, build_optimizer, build_topology, check_blocks, check_lora_targets,
                           prepare_model, uses_torch_adamw)
from deca_ds.config import ConfigError, RunConfig
from deca_ds.consensus import method_spec
from deca_ds.loop import StepRecord, run_loop, write_summary
from deca_ds.step import clip_grad_norm_as_deepspeed_, grads_finite, run_micro_batches

__all__ = ["Simulation", "SimulatorDriver", "run_simulation", "make_simulation", "mix_rows", "resolve_device",
           "HEADER_BYTES", "Diagnostics", "common_setup", "exchange_bytes"]

HEADER_BYTES = 4 * 8
"""Bytes of the int64 header (block, step, client, numel) the launcher's Mixer sends before every payload."""

_WIRE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_HOST = torch.device("cpu")


def resolve_device(name: str) -> torch.device:
    """The torch device a ``simulate.device`` setting names.

    Args:
        name: ``auto`` (the accelerator DeepSpeed would pick, :func:`deca_ds.devices.default_device`: the current
            CUDA device, else the CPU), ``cpu`` or a torch device string.

    Raises:
        ConfigError: the string is not a device, or names a device type this machine does not have.
    """
    if name == "auto":
        from deca_ds.devices import default_device

        return default_device()
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"simulate.device={name!r} is not a device: use auto, cpu or e.g. cuda:0") from None
    if dev.type != "cpu":
        backend = getattr(torch, dev.type, None)
        available = getattr(backend, "is_available", None)
        if available is None or not available():
            raise ConfigError(f"simulate.device={name!r}: this machine has no {dev.type} device; use "
                              "simulate.device=auto or cpu")
        count = getattr(backend, "device_count", lambda: 1)()
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"simulate.device={name!r}: only {count} {dev.type} device(s) here; use "
                              f"{dev.type}:0 to {dev.type}:{count - 1}")
    return dev


def mix_rows(stacked: torch.Tensor, weights: np.ndarray, wire_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Mix the clients' stacked copies of one tensor: ``out[i] = sum_j W[i, j] x_j``, fp32 arithmetic.

    With a low-precision wire dtype, neighbours' copies are rounded to it and a client's own copy is not, as in
    :meth:`deca_ds.gossip.Mixer.mix_`.

    Args:
        stacked: ``(num_clients, ...)`` fp32 tensor, one slice per client (not modified).
        weights: ``num_clients x num_clients`` mixing matrix.
        wire_dtype: dtype neighbours' values travel in.

    Returns:
        A new fp32 tensor shaped like ``stacked``.
    """
    from deca_ds.gossip import mix_stacked_

    if wire_dtype == torch.float32:
        return mix_stacked_(stacked.detach().float().clone(), weights)
    n = stacked.shape[0]
    w = torch.as_tensor(np.asarray(weights), dtype=torch.float32, device=stacked.device)
    own = stacked.detach().float().reshape(n, -1)
    wire = own.to(wire_dtype).float()
    diag = torch.diagonal(w).clone()
    off = w - torch.diag(diag)
    return (off @ wire + diag[:, None] * own).view(stacked.shape)


def exchange_bytes(weights, payload: int) -> list[int]:
    """Each client's bytes of one exchange: one message of ``payload`` bytes plus the header to every neighbour
    (every ``j != c`` with ``W[c, j] != 0``), as the launcher's Mixer counts them. Both simulators count with it.

    Args:
        weights: the step's mixing matrix ``W`` (``num_clients x num_clients``, indexable as ``weights[c, j]``).
        payload: bytes of one client's message to one neighbour (the same for every client), header excluded.
    """
    n = len(weights)
    return [(payload + HEADER_BYTES) * int(sum(1 for j in range(n) if j != c and weights[c, j] != 0.0))
            for c in range(n)]


def uncompressed_payload(numel: int, wire_dtype: torch.dtype) -> int:
    """Bytes of one client's uncompressed message to one neighbour: ``numel`` block elements in ``wire_dtype``
    (header excluded; with ``gossip.compression`` the :class:`deca_ds.compression.ClientsExchange` counts instead).
    Both simulators count with it."""
    return numel * torch.empty((), dtype=wire_dtype).element_size()


def common_setup(sim, cfg: RunConfig) -> None:
    """Checks and settings shared by the per-client and the stacked simulator, set as attributes of ``sim``:
    ``cfg``, ``num_clients``, ``spec``, ``device``, ``ds_config``, ``micro_batch``, ``gas``, ``clip``, ``wire_dtype``,
    ``topology``.

    Raises:
        ConfigError: missing ``num_clients``, unsupported DeepSpeed settings or a bad topology/data/model/blocks
            setting.
    """
    from deca_ds.data import check_data_config
    from deca_ds.ds_config import check_ds_config, load_ds_config
    from deca_ds.models import check_model_config

    if not cfg.num_clients:
        raise ConfigError("backend=simulate needs num_clients: write num_clients=8")
    sim.cfg = cfg
    sim.num_clients = n = int(cfg.num_clients)
    sim.spec = method_spec(cfg.method)
    sim.device = resolve_device(cfg.simulate.device)
    ds = load_ds_config(cfg.ds_config, device_type=sim.device.type)
    check_ds_config(ds, cfg)
    sim.ds_config = ds
    if "scheduler" in ds:
        raise ConfigError("backend=simulate does not run DeepSpeed LR schedulers: remove the ds_config "
                          "'scheduler' section (or use the launcher)")
    if cfg.clients.ranks_per_client != 1:
        raise ConfigError("backend=simulate runs one rank per client: set clients.ranks_per_client=1")
    sim.micro_batch = int(ds["train_micro_batch_size_per_gpu"])
    sim.gas = int(ds.get("gradient_accumulation_steps", 1))
    sim.clip = float(ds.get("gradient_clipping", 0.0) or 0.0)
    check_model_config(cfg.model)
    # Block settings against the (meta) model, as the launcher's preflight does: without it a prefix that matches
    # nothing or a fixed_order index past the last block surfaces as a traceback from the optimizer's constructor.
    check_blocks(cfg)
    check_lora_targets(cfg)
    from deca_ds.optim.state_store import check_int8_support

    check_int8_support(cfg.optim)
    check_data_config(cfg, n)
    sim.wire_dtype = _WIRE_DTYPES[cfg.gossip.dtype]
    sim.topology = None
    if sim.spec.gossip and n > 1:
        sim.topology = build_topology(cfg, n)


def apply_epochs(sim) -> None:
    """``epochs`` set: replace ``sim.cfg.max_steps`` by that many passes of the mean client over its training rows,
    as the launcher does (clients hold different amounts; every client takes the same number of steps).

    Args:
        sim: a per-client or stacked simulation whose ``data``, ``micro_batch`` and ``gas`` are set.
    """
    cfg = sim.cfg
    if cfg.epochs is None:
        return
    from deca_ds.lr_schedule import steps_for_epochs

    mean_rows = sum(len(d.train) for d in sim.data) / sim.num_clients
    cfg.max_steps = steps_for_epochs(cfg.epochs, mean_rows, sim.micro_batch * sim.gas)


class Diagnostics:
    """Run-level figures that say how the consensus signal compares with the gradient it is averaged with.

    ``rms_g``: RMS of the (clipped) gradient entries that entered Adam's moments, over every step and client;
    ``rms_h``: RMS of the consensus signal entries folded into them; ``clipped_fraction``: the fraction of (client,
    step) updates whose gradient norm exceeded ``gradient_clipping`` (DeepSpeed's test ``norm + 1e-6 > clip``).
    """

    def __init__(self, num_clients: int):
        self.num_clients = num_clients
        self.g_sq, self.g_n, self.h_sq, self.h_n, self.clipped, self.updates = 0.0, 0, 0.0, 0, 0, 0

    def add_gradient(self, sum_sq: float, numel: int, clipped: bool) -> None:
        """One replica's update: sum of squared gradient entries, their count, and whether it was clipped."""
        self.g_sq += float(sum_sq)
        self.g_n += int(numel)
        self.clipped += bool(clipped)
        self.updates += 1

    def add_signal(self, sum_sq: float, numel: int) -> None:
        """One client's consensus signal of one step: sum of squared entries and their count."""
        self.h_sq += float(sum_sq)
        self.h_n += int(numel)

    def summary(self) -> dict[str, float | None]:
        """``rms_g``, ``rms_h``, ``rms_h_over_g`` (None without a signal) and ``clipped_fraction``."""
        rms_g = math.sqrt(self.g_sq / self.g_n) if self.g_n else None
        rms_h = math.sqrt(self.h_sq / self.h_n) if self.h_n else None
        ratio = rms_h / rms_g if rms_h is not None and rms_g else None
        return {"rms_g": rms_g, "rms_h": rms_h, "rms_h_over_g": ratio,
                "clipped_fraction": self.clipped / self.updates if self.updates else None}


class _RowMix:
    """The ``mix`` callable of one client's ConsensusStep: copies the precomputed mixed rows in place."""

    def __init__(self, sim: "Simulation", client: int):
        self.sim = sim
        self.client = client

    def __call__(self, tensors: Sequence[torch.Tensor], step: int, block_idx: int):
        from deca_ds.gossip import MixStats

        mixed = self.sim._mixed
        if mixed is None or mixed[0] != (step, block_idx) or len(mixed[1]) != len(tensors):
            raise RuntimeError(f"simulate: client {self.client} mixes block {block_idx} at step {step} but the "
                               "precomputed mixture is for another block/step (clients out of schedule)")
        for t, m in zip(tensors, mixed[1]):
            t.copy_(m[self.client].to(t.dtype))
        sent = self.sim._step_bytes[self.client]
        return MixStats(sent, sent, 0.0)


class Simulation:
    """N clients of one run in this process; :meth:`step` advances every client by one optimizer step.

    Attributes:
        cfg: the run's settings.
        num_clients: clients simulated.
        models: one model per client (a single shared model for ``centralized``).
        device: the training device (``simulate.device`` resolved).
        park: whether replicas are parked in CPU memory between their own steps (``simulate.park_replicas`` and more
            than one replica).
        optimizers: one client optimizer per model.
        hooks: one :class:`~deca_ds.consensus.ConsensusStep` per model (None for the AdamW baseline).
        data: one :class:`deca_ds.data.ClientData` per client.
        topology: the communication graph (None when the method does not gossip).
        bytes_sent: cumulative gossip bytes per client (same accounting as the launcher's Mixer).
        global_step: optimizer steps taken.
    """

    def __init__(self, cfg: RunConfig):
        """Build data, models, optimizers and hooks (no files written).

        Args:
            cfg: validated settings with ``num_clients`` set.

        Raises:
            ConfigError: missing ``num_clients``, unsupported DeepSpeed settings or a bad topology/data setting.
        """
        from deca_ds.data import build_client_data
        from deca_ds.models import load_model_and_tokenizer

        common_setup(self, cfg)
        n = self.num_clients
        # gossip.compression: one error-feedback state per client, driven as each client's Mixer drives its own.
        self.feedback = None
        if self.topology is not None and cfg.gossip.compression != "none":
            from deca_ds.compression import ErrorFeedback

            self.feedback = [ErrorFeedback(cfg.gossip.compression) for _ in range(n)]
        model, self.tokenizer = load_model_and_tokenizer(cfg.model, seed=cfg.seed)
        self.pad_id = self.tokenizer.pad_token_id
        self.data = [build_client_data(cfg, self.tokenizer, c, n) for c in range(n)]
        apply_epochs(self)
        # Memory: one replica per client (the centralized baseline trains one shared model, like its all-reduce).
        replicas = 1 if self.spec.world_data_parallel else n
        self.park = bool(cfg.simulate.park_replicas) and replicas > 1
        # Replicas are placed before the optimizers exist: optimizer state is created lazily on the weights' device.
        model.to(_HOST if self.park else self.device)
        model = prepare_model(cfg, model)
        self.models = [model] + [copy.deepcopy(model) for _ in range(replicas - 1)]
        self.optimizers = [build_optimizer(cfg, m) for m in self.models]
        # optim.fused_backward: each client's BlockAdam steps inside its backward (centralized is refused).
        self.fused = bool(cfg.optim.fused_backward)
        # The torch-AdamW baseline has no blocks and never gossips: no hook.
        self.block_wise = not uses_torch_adamw(cfg)
        self.hooks = [build_consensus_step(cfg, opt, _RowMix(self, c), fused_backward_ok=True) if self.block_wise
                      else None for c, opt in enumerate(self.optimizers)]
        self.bytes_sent = [0] * n
        self._step_bytes = [0] * n
        self._mixed = None
        self.global_step = 0
        self.peak_optimizer_state_bytes = 0
        self.diagnostics = Diagnostics(n)

    # ----------------------------------------------------------------------------------------------- helpers

    def model_of(self, client: int) -> torch.nn.Module:
        """Client ``client``'s model (the shared one for ``centralized``)."""
        return self.models[0 if len(self.models) == 1 else client]

    def place(self, client: int, device: torch.device) -> None:
        """Move client ``client``'s replica (weights and gradients), optimizer state and pending consensus snapshot
        to ``device``. Parameters keep their identity (``Module.to`` swaps ``.data``), so the optimizer still
        holds them. Used by parked replicas; a no-op where everything already is on ``device``."""
        self.models[client].to(device)
        opt = self.optimizers[client]
        for st in opt.state.values():
            for k, v in list(st.items()):
                # Hazard: scalar ``step`` counters stay on the CPU, as torch's (non-capturable) Adam keeps them.
                if torch.is_tensor(v) and v.dim() > 0 and v.device != device:
                    st[k] = v.to(device)
        if self.hooks[client] is not None:
            self.hooks[client].to(device)

    @contextlib.contextmanager
    def on_device(self, client: int):
        """Client ``client``'s model, on the training device for the ``with`` body: a parked replica is moved in
        (:meth:`place`) and back to host memory afterwards; a resident one is already there."""
        if self.park:
            self.place(client, self.device)
        try:
            yield self.model_of(client)
        finally:
            if self.park:
                self.place(client, _HOST)

    def _block_optimizer(self, i: int):
        return self.optimizers[i] if self.block_wise else None

    @property
    def schedule(self):
        """The block schedule shared by every client (None for the torch-AdamW baseline)."""
        return self.optimizers[0].schedule if self.block_wise else None

    def active_block(self) -> int:
        """Index of the active block (0 for full-parameter optimizers); identical on every client."""
        opt = self._block_optimizer(0)
        return opt.active_block_idx if opt is not None else 0

    def active_tensors(self, i: int) -> list[torch.Tensor]:
        """fp32 values of model ``i``'s active block (every trainable parameter for AdamW)."""
        opt = self._block_optimizer(i)
        if opt is not None:
            return opt.master_params()
        return [p.data for p in self.models[i].parameters() if p.requires_grad]

    def block_tensors(self, i: int, block_idx: int) -> list[torch.Tensor]:
        """Model ``i``'s weights of block ``block_idx``, read from the model (valid after the block went inactive),
        as :meth:`deca_ds.engine.DecaEngine.block_tensors` reads them; every parameter for full-parameter AdamW."""
        opt = self._block_optimizer(i)
        if opt is None:
            return [p.data for p in self.models[i].parameters()]
        params = dict(self.models[i].named_parameters())
        return [params[n].data for n in opt.blocks[block_idx].param_names]

    def lr(self) -> float:
        """Current learning rate."""
        return float(self.optimizers[0].param_groups[0]["lr"])

    def set_lr(self, lr: float) -> None:
        """Every client's learning rate from the next step on."""
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = float(lr)

    def _batches(self, client: int, step: int) -> list[dict[str, torch.Tensor]]:
        from deca_ds.data import batch_for_step

        # Same indexing as the trainer with ranks_per_client=1: (step * gas + m) * 1 + local_rank 0.
        return [batch_for_step(self.data[client].train, step * self.gas + m, self.micro_batch, self.cfg.data.seed,
                               client, self.pad_id) for m in range(self.gas)]

    def _forward_backward(self, model: torch.nn.Module, client: int, step: int, scale: float):
        """Accumulate ``scale * mean-over-micro-batches loss`` gradients; returns the
        :class:`deca_ds.step.MicroBatchLosses`."""
        device = next(model.parameters()).device
        # DeepSpeed's engine.backward divides by gradient_accumulation_steps (then x1.0 for a client: exact).
        mbs = run_micro_batches(self._batches(client, step), device, lambda b: model(**b).loss,
                                lambda loss: (loss / self.gas * scale).backward())
        return mbs

    def _clip_and_check(self, model: torch.nn.Module) -> bool:
        """DeepSpeed stage-0 fp32 clipping, its arithmetic restated (:func:`deca_ds.step.clip_grad_norm_as_deepspeed_`);
        returns whether every gradient is finite."""
        grads = [p for p in model.parameters() if p.grad is not None]
        finite = grads_finite(grads)
        norm = None
        if self.clip > 0 and grads and finite:
            norm = float(clip_grad_norm_as_deepspeed_(grads, self.clip))
        if grads and finite:
            # Diagnostics only (read after clipping; the arithmetic of the step is untouched).
            self.diagnostics.add_gradient(float(sum(p.grad.detach().float().pow(2).sum() for p in grads)),
                                          sum(p.grad.numel() for p in grads),
                                          norm is not None and norm + 1e-6 > self.clip)
        return finite

    def _skip(self, i: int) -> None:
        opt = self._block_optimizer(i)
        if opt is not None:
            opt.skip_next_step = True
        else:
            for p in self.models[i].parameters():
                p.grad = None

    # ----------------------------------------------------------------------------------------------- the step

    def step(self, measure_distance: bool = True) -> StepRecord:
        """One optimizer step on every client, then gossip, consensus correction and block switch.

        Args:
            measure_distance: compute each client's consensus distance (of the block trained this step — the
                launcher's figure; after a switch the next block would read ~0); 0.0 otherwise.

        Returns:
            Every client's figures for this step.
        """
        step, n = self.global_step, self.num_clients
        block = self.active_block()
        losses, nonfinite, tokens = [0.0] * n, [False] * n, 0
        if self.spec.world_data_parallel:
            # Centralized: DeepSpeed all-reduces (averages) the gradients of every client's batch, then one step.
            model = self.models[0]
            for c in range(n):
                mbs = self._forward_backward(model, c, step, 1.0 / n)
                losses[c], nonfinite[c], tokens = mbs.mean, not mbs.finite, tokens + mbs.tokens
            bad = not self._clip_and_check(model) or any(nonfinite)
            if bad:
                nonfinite = [True] * n
                self._skip(0)
            self._take_step(0)
        else:
            for c in range(n):
                with self.on_device(c) as model:
                    if self.fused and self.hooks[c] is not None:
                        # Hazard (order): the fused step changes the weights during backward; snapshot before.
                        self.hooks[c].before_step()
                    mbs = self._forward_backward(model, c, step, 1.0)
                    losses[c], tokens = mbs.mean, tokens + mbs.tokens
                    if self.fused:  # already applied; no gradient left, BlockAdam flagged non-finite ones
                        nonfinite[c] = self.optimizers[c].nonfinite_in_backward() or not mbs.finite
                    else:
                        nonfinite[c] = not (self._clip_and_check(model) and mbs.finite)
                        if nonfinite[c]:
                            self._skip(c)
                    self._take_step(c)
        self._step_bytes = [0] * n
        self._mixed = None
        if self.topology is not None:
            self._precompute_mixture(step, block)
        for i, hook in enumerate(self.hooks):
            if hook is not None:
                hook.after_step(step)
                if hook.last_signal_sq is not None:
                    self.diagnostics.add_signal(float(hook.last_signal_sq),
                                                sum(t.numel() for t in self.block_tensors(i, block)))
        for c in range(n):
            self.bytes_sent[c] += self._step_bytes[c]
        self.global_step += 1
        self._track_memory()
        schedule = self.schedule
        return StepRecord(block=block, round=schedule.position(step).round if schedule is not None else 0,
                          lr=self.lr(), losses=losses, nonfinite=nonfinite, bytes_sent=list(self._step_bytes),
                          consensus_distance=self.consensus_distances(block) if measure_distance else [0.0] * n,
                          tokens=tokens)

    def _take_step(self, i: int) -> None:
        if self.hooks[i] is not None and not self.fused:
            self.hooks[i].before_step()
        self.optimizers[i].step()
        if self.hooks[i] is None:
            self.optimizers[i].zero_grad(set_to_none=True)

    def _precompute_mixture(self, step: int, block: int) -> None:
        """Every client's mixed active block, and each client's bytes for this exchange.

        Computed as the launcher's :class:`deca_ds.gossip.Mixer` computes it, with
        :func:`deca_ds.gossip.accumulate_mix_`: own term first at full precision, then each neighbour's value as it
        travels (rounded to the wire dtype) in ``Topology.neighbors`` order, fp32 arithmetic. Same operations in the
        same order: the simulator and a launch round identically.

        With ``gossip.compression`` each client's :class:`deca_ds.compression.ErrorFeedback` encodes each tensor
        (the change since what it sent before) and mixes it with its neighbours' packets, the calls the Mixer makes
        per piece; the Mixer cuts tensors at multiples of the quantization group, so whole tensors here and pieces
        there encode and round identically. Bytes are the packets' (scales included) plus the header.
        """
        from deca_ds.gossip import accumulate_mix_

        n = self.num_clients
        w = self.topology.weights_at(step)
        neighbors = [self.topology.neighbors(c, step) for c in range(n)]
        per_client = [self.active_tensors(c) for c in range(n)]
        numel = sum(t.numel() for t in per_client[0])
        exchange = None
        if self.feedback is not None:
            from deca_ds.compression import ClientsExchange

            exchange = ClientsExchange(self.feedback, block, numel, self.device, w, neighbors)
        mixed = []
        # One tensor of the block at a time on the device; parked runs keep the mixed rows in CPU memory.
        keep = _HOST if self.park else self.device
        for tensors in zip(*per_client):
            own = [t.detach().to(self.device, torch.float32) for t in tensors]
            rows = torch.stack(own)  # a copy: the clients' own values stay untouched until their hooks run
            if exchange is None:
                wire = own if self.wire_dtype == torch.float32 else [x.to(self.wire_dtype) for x in own]
                for c in range(n):
                    accumulate_mix_(rows[c], w[c, c], [wire[j] for j in neighbors[c]],
                                    [w[c, j] for j in neighbors[c]])
            else:
                exchange.mix_(rows.view(n, -1))
            mixed.append(rows.to(keep))
        # bytes of one client's message to one neighbour (equal for every client)
        payload = uncompressed_payload(numel, self.wire_dtype) if exchange is None else exchange.end()
        self._step_bytes = exchange_bytes(w, payload)
        self._mixed = ((step, block), mixed)

    def evaluate_clients(self) -> list[dict[str, Any]]:
        """Each client's model scored on the shared test split (the centralized shared model once), indexed by
        client."""
        from deca_ds.data import evaluate

        evals: dict[int, dict] = {}
        for c in range(self.num_clients):
            key = 0 if len(self.models) == 1 else c
            if key not in evals:
                with self.on_device(c) as model:
                    model.eval()
                    evals[key] = evaluate(model, self.tokenizer, self.data[c], max_examples=_client_rows(self.cfg),
                                          batch_size=64, generate=self.cfg.data.eval_generate)
                    model.train()
        return [evals[0 if len(self.models) == 1 else c] for c in range(self.num_clients)]

    def consensus_distances(self, block_idx: int | None = None) -> list[float]:
        """Per client, RMS distance of a block from the clients' average: ``||x_i - xbar|| / sqrt(P)``.

        Args:
            block_idx: the block to measure (default: the active one).

        The launcher's ``metrics.jsonl`` figure (0 for a single client or the centralized shared model).
        """
        n = self.num_clients
        if n == 1 or len(self.models) == 1:
            return [0.0] * n
        block_idx = self.active_block() if block_idx is None else block_idx
        per_client = [self.block_tensors(c, block_idx) for c in range(n)]
        sq = [0.0] * n
        numel = 0
        for tensors in zip(*per_client):
            # The launcher's arithmetic (trainer._consensus_distance): fp32 sum over clients / n, fp32 squares.
            stacked = torch.stack([t.detach().float() for t in tensors])
            mean = stacked.sum(0).div_(n)
            for c in range(n):
                sq[c] += float((stacked[c] - mean).pow(2).sum())
            numel += tensors[0].numel()
        return [math.sqrt(s / max(numel, 1)) for s in sq]

    def _track_memory(self) -> None:
        from deca_ds.optim.block_adam import memory_report

        rep = memory_report(self.optimizers[0], self.models[0])
        self.peak_optimizer_state_bytes = max(self.peak_optimizer_state_bytes,
                                              rep["master"] + rep["moments"] + rep["offloaded"])

    # ----------------------------------------------------------------------------------------------- the end

    @torch.no_grad()
    def consensus_model(self) -> torch.nn.Module:
        """A new model holding the average over clients of every parameter and floating buffer."""
        avg = copy.deepcopy(self.models[0])
        if len(self.models) == 1:
            return avg
        sources = [{**dict(m.named_buffers()), **dict(m.named_parameters())} for m in self.models]
        for name, t in list(avg.named_parameters()) + [(n, b) for n, b in avg.named_buffers()
                                                        if b.is_floating_point()]:
            acc = torch.stack([src[name].detach().float() for src in sources]).mean(0)
            t.copy_(acc.to(t.dtype))
        return avg


class SimulatorDriver:
    """A :class:`Simulation` as :func:`deca_ds.loop.run_loop` drives it (no checkpoints, no monitors)."""

    checkpoints = False

    def __init__(self, sim: Simulation):
        """Args:
            sim: the simulation to drive.
        """
        self.sim = sim
        self.num_clients = sim.num_clients

    def step(self, step: int, measure_distance: bool, stop_requested: bool) -> StepRecord:
        """Step ``step`` on every client."""
        if step != self.sim.global_step:
            raise RuntimeError(f"simulate: asked for step {step} at step {self.sim.global_step}")
        rec = self.sim.step(measure_distance=measure_distance)
        rec.stop_requested = stop_requested
        return rec

    def evaluate(self, step: int) -> list[dict[str, Any]]:
        """Each client's evaluation of its own model on the test split."""
        return self.sim.evaluate_clients()

    def save_checkpoint(self, step: int) -> None:
        """The simulator writes no checkpoints (refused up front: ``checkpoint_every``/``resume``)."""

    def write_monitor_events(self, events: list[tuple[str, float, int]]) -> None:
        """No DeepSpeed monitors in the simulator."""

    def set_lr(self, lr: float) -> None:
        """Every client's learning rate from the next step on."""
        self.sim.set_lr(lr)


def run_simulation(cfg: RunConfig, save_models: bool = True, quiet: bool = False) -> dict[str, Any]:
    """Run ``cfg`` with every client in this process; writes ``metrics.jsonl`` and ``summary.json``.

    Args:
        cfg: validated settings; ``num_clients`` clients are simulated (``backend`` is not consulted).
        save_models: also save the consensus model (and client models when ``model.save_client_models``) like the
            launcher; sweeps turn it off.
        quiet: no progress bar or final table.

    Returns:
        The summary: ``method``, ``steps``, ``num_clients``, ``clients`` (per client ``final_loss``, ``test_loss``,
        ``test_accuracy``, ``eval``, ``bytes_sent``, ``optimizer_state_bytes``), ``consensus`` (evaluation of the
        client average), ``wall_seconds``.

    Raises:
        ConfigError: bad settings, ``output_dir`` already holds a run, or ``resume``/``checkpoint_every`` (not
            supported by the simulator: the run is short, start it again).
        deca_ds.loop.NonFiniteError: ``nan_policy=stop`` and a client produced a non-finite loss or gradient.
        KeyboardInterrupt: SIGINT/SIGTERM stopped the run (after finishing the step on every client).
    """
    if cfg.resume or cfg.checkpoint_every:
        raise ConfigError("backend=simulate does not write or resume checkpoints: set resume=false and "
                          "checkpoint_every=0 (or use the launcher)")
    ckpt.prepare_output_dir(cfg.output_dir, cfg.resume)
    sim = make_simulation(cfg)
    try:
        return _run_and_summarize(sim, cfg, save_models, quiet)
    finally:
        # A simulation sits in reference cycles (its hooks and bound methods hold it), so dropping the last name
        # frees nothing: its replicas, optimizer state and data stayed allocated until Python's oldest generation
        # was collected -- on a GPU, inside the next run's memory when a sweep runs many in one process (a GPU
        # test measured four leftover replicas inside a later run's peak).
        del sim
        gc.collect()


def _run_and_summarize(sim, cfg: RunConfig, save_models: bool, quiet: bool) -> dict[str, Any]:
    """:func:`run_simulation`'s work on an already built simulation."""
    from rich.console import Console

    from deca_ds.data import evaluate, merge_client_counts, write_partition_summary
    from deca_ds.metrics import JsonlWriter, plot_run
    from deca_ds.models import merged_model

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt.append_run_leg(out, ckpt.run_record(cfg, sim.ds_config, None, sim.num_clients, backend="simulate"))
    console = Console(stderr=True, quiet=quiet)
    # The launcher's start-of-run outputs: partition.json/png (and the table), the never-trained-blocks warning.
    if sim.data[0].counts_local_only:  # per-client files: each client's data knows only its own row and labels
        counts, names = merge_client_counts([(d.count_names, d.counts[c]) for c, d in enumerate(sim.data)])
    else:
        counts, names = sim.data[0].counts, sim.data[0].count_names
    write_partition_summary(counts, names, out, console=console)
    if sim.schedule is not None:
        sim.schedule.warn_if_incomplete(cfg.max_steps)
    t0 = time.perf_counter()
    writer = JsonlWriter(out / "metrics.jsonl")
    try:
        outcome = run_loop(SimulatorDriver(sim), cfg, 0, writer, console, show_progress=not quiet)
    finally:
        writer.close()
    if outcome.stopped_early:
        console.print(f"stopped by signal after step {outcome.step} (the simulator writes no checkpoints)")
        raise KeyboardInterrupt(f"simulation stopped by signal after step {outcome.step}")

    clients = []
    evals = sim.evaluate_clients()
    for c in range(sim.num_clients):
        own = evals[c]
        if save_models and cfg.model.save_client_models:
            # keep: merging a dec_lora replica's adapters in place would change the consensus averaged below.
            merged_model(sim.model_of(c), keep=True).save_pretrained(out / "clients" / f"client_{c}")
            sim.tokenizer.save_pretrained(out / "clients" / f"client_{c}")
        clients.append({"client": c, "final_loss": outcome.last_loss.get(c), "test_loss": own.get("loss"),
                        "test_accuracy": own.get("accuracy"), "eval": own, "bytes_sent": sim.bytes_sent[c],
                        "optimizer_state_bytes": sim.peak_optimizer_state_bytes})
    avg = sim.consensus_model().to(sim.device)
    avg.eval()
    if save_models:
        merged_model(avg, keep=True).save_pretrained(out / "consensus", safe_serialization=True)
        sim.tokenizer.save_pretrained(out / "consensus")
    consensus = evaluate(avg, sim.tokenizer, sim.data[0], max_examples=cfg.data.eval_examples, batch_size=64,
                         generate=cfg.data.eval_generate)
    summary = {"method": cfg.method, "backend": "simulate", "steps": sim.global_step,
               "num_clients": sim.num_clients, "clients": clients, "consensus": consensus,
               "stacked": isinstance(sim, _stacked_class()), "diagnostics": sim.diagnostics.summary(),
               "train_seconds": outcome.train_seconds, "wall_seconds": time.perf_counter() - t0}
    write_summary(out, summary, None if quiet else console)
    plot_run(out)  # training.png: every client's loss and consensus distance over steps
    return summary


def _stacked_class():
    from deca_ds.stacked import StackedSimulation

    return StackedSimulation


def make_simulation(cfg: RunConfig):
    """The simulator ``simulate.stacked`` selects: :class:`deca_ds.stacked.StackedSimulation` (one batched model) or
    :class:`Simulation` (one replica per client, bit-equal to a launch)."""
    return _stacked_class()(cfg) if cfg.simulate.stacked else Simulation(cfg)


def _client_rows(cfg: RunConfig) -> int:
    """Test rows of each client's own evaluation (``data.client_eval_examples``, else ``data.eval_examples``)."""
    d = cfg.data
    return d.eval_examples if d.client_eval_examples is None else d.client_eval_examples

"""Every deca_ds setting, in one place, checked before anything runs.

A recipe run is described by a YAML file plus dotted ``key=value`` overrides (``optim.lr=1e-4``). DeepSpeed's own
settings stay in the DeepSpeed JSON named by ``ds_config``; everything about blocks, the DECA correction, the graph
and the data lives here. Loading is strict: an unknown key, a wrong type or an out-of-range value raises
:class:`ConfigError` with a one-line message naming the setting and the fix, before any process group, model load or
output exists.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

METHODS = ("deca", "badam_gossip", "trivial_bma", "dadam", "local", "centralized", "dec_lora")
ORDERS = ("ascending", "descending", "fixed", "random")
STATE_POLICIES = ("reset", "offload")
OFFLOAD_DTYPES = ("fp32", "int8")
MOMENT_DTYPES = ("fp32", "int8")
SIGNALS = ("qgm", "discrepancy", "raw", "qgm_grad", "discrepancy_grad")
DTYPES = ("fp32", "bf16", "fp16")
TOPOLOGIES = (
    "ring", "torus", "exponential", "one_peer_exponential", "erdos_renyi", "bipartite", "complete", "star", "custom",
)
MIXING_WEIGHTS = ("metropolis", "uniform")
ERDOS_RENYI_P = 0.5
"""Edge probability of an ``erdos_renyi`` graph without ``topology.p`` (equal to ``deca_ds.topology.ERDOS_RENYI_P``;
kept here so loading settings does not import numpy)."""
PARTITIONS = ("iid", "dirichlet", "shards", "natural")
DATA_FORMATS = ("auto", "alpaca", "chat", "sharegpt")
TASKS = ("classification", "generation")
NAN_POLICIES = ("skip", "stop")
LR_SCHEDULES = ("constant", "linear", "cosine")
BACKENDS = ("launcher", "simulate")
CENTRALIZED_OPTIMIZERS = ("block_adam", "adamw")
GOSSIP_DTYPES = ("fp32", "bf16")
COMPRESSIONS = ("none", "bf16", "int8", "int4")


class ConfigError(ValueError):
    """A setting is missing, unknown, of the wrong type or out of range; the message names it and the fix."""


@dataclass
class ModelConfig:
    """Which model to fine-tune and in which precision."""

    path: str | None = None
    """Local Hugging Face model directory (or hub name when online). ``None``: the embedded tiny Llama."""
    dtype: str = "fp32"
    """Weights' dtype on the training device: ``fp32``, ``bf16`` or ``fp16``. BlockAdam keeps an fp32 master of the
    active block only. Do not also enable DeepSpeed's ``bf16``/``fp16`` sections (see docs/design.md §3)."""
    gradient_checkpointing: bool = False
    """Non-reentrant activation checkpointing; backward still stops at the lowest active block."""
    save_client_models: bool = False
    """Also write each client's own model next to the consensus model at the end of a run."""


@dataclass
class DataConfig:
    """Where each client's data comes from and how it is split and tokenized."""

    path: str | None = None
    """Local JSON/JSONL/CSV/Parquet file, a hub name, or a per-client pattern containing ``{client}``
    (``data/client_{client}.jsonl``, or with a format spec: ``{client:02d}``). ``None``: the embedded synthetic task."""
    format: str = "auto"
    """``alpaca`` (instruction/input/output), ``chat`` (messages), ``sharegpt`` (conversations of from/value) or
    ``auto`` (detected from the fields)."""
    task: str = "classification"
    """Synthetic task of the embedded default: ``classification`` (label-skewed) or ``generation`` (task-skewed)."""
    num_examples: int = 6000
    """Size of the synthetic dataset (all clients together, before the test split; the default's 10 % test split
    holds 600 rows)."""
    num_labels: int = 4
    """Labels (classification) or task families (generation) of the synthetic data."""
    partition: str = "dirichlet"
    """How one shared dataset is split over clients: ``iid``, ``dirichlet``, ``shards`` or ``natural``."""
    partition_by: str = "label"
    """Column whose values drive ``dirichlet``/``shards``, or that names the client for ``natural``. When no row has
    it (a stock Alpaca file), ``dirichlet``/``shards`` split by ``instruction_category`` (the first word of each
    instruction) with a warning; ``instruction_category`` asks for that split explicitly."""
    alpha: float = 0.25
    """Dirichlet concentration; small is more skewed (the paper uses 0.25)."""
    shards_per_client: int = 2
    """Labels per client for ``shards``."""
    min_partition_size: int = 10
    """Dirichlet draws are repeated until every client holds at least this many rows."""
    max_length: int = 128
    """Tokens per example; longer examples lose the start of the prompt first (the response keeps at least half)."""
    packing: bool = False
    """Concatenate examples into full ``max_length`` rows (loss masks kept per example)."""
    loss_on: str = "all_assistant"
    """Which assistant turns of a chat carry the loss: ``all_assistant`` (every answer of a multi-turn chat) or
    ``last_assistant`` (the final answer only; earlier turns are prompt). The same for single-turn rows."""
    test_size: float = 0.1
    """Fraction held out as the global test split (shared by all clients for evaluation)."""
    eval_examples: int = 512
    """Test examples used for the periodic and final evaluation (the global test split holds
    ``num_examples * test_size`` rows; 0 or less: all of them)."""
    client_eval_examples: int | None = None
    """Test examples for each client's own evaluation in the simulator (``None``: ``eval_examples``); the consensus
    model always uses ``eval_examples``. Sweeps use fewer rows per client to keep 8 client evaluations cheap."""
    eval_generate: bool = True
    """Also score greedy generation at evaluation (``accuracy_gen``, ``exact_match``); the simulator honours it,
    sweeps turn it off for speed (classification accuracy and macro-F1 come from label log-likelihoods)."""
    seed: int = 42
    """Seed of generation, partition and per-client shuffling."""


@dataclass
class BlocksConfig:
    """How parameters are cut into blocks and in which order blocks are trained."""

    layers_per_block: int = 1
    """Consecutive decoder layers per block (the paper uses 2)."""
    switch_every: int = 4
    """Optimizer steps a block stays active (R in the paper)."""
    order: str = "ascending"
    """``ascending``, ``descending``, ``fixed`` (see ``fixed_order``) or ``random`` (a permutation per round from
    the shared seed, identical on every client)."""
    fixed_order: list[int] | None = None
    """Block indices visited each round when ``order: fixed``."""
    include_embeddings: bool = True
    """Make the input embeddings a block of their own (full-parameter fine-tuning; set false to freeze them, e.g.
    for a very large vocabulary whose block would dominate memory)."""
    include_lm_head: bool = True
    """Make the final norm and LM head a block of their own (a tied head goes with the embeddings)."""
    prefixes: list[str] | None = None
    """Explicit blocks: one parameter-name prefix or regex per block; overrides layer detection."""


@dataclass
class OptimConfig:
    """BlockAdam's local step and what happens to a block's state when it goes inactive."""

    lr: float = 1e-2
    """Learning rate (γ); the default suits the embedded tiny model (DECA's tuned lr in the paper's regime,
    docs/results.md), pretrained LLMs want ~1e-5 to 5e-5."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Decay of the fresh local statistics (α1, α2)."""
    eps: float = 1e-8
    weight_decay: float = 0.0
    """Decoupled (AdamW) weight decay."""
    decay_norms_and_biases: bool = True
    """Apply ``weight_decay`` to every trained parameter (true), or, false, only to those
    ``transformers.Trainer.get_decay_parameter_names`` names: biases and LayerNorm/RMSNorm weights are not decayed,
    as in a plain Trainer's two AdamW groups (BlockAdam's ``no_decay``; the torch-AdamW baseline gets the two groups).
    The Hugging Face integration always follows its Trainer's rule (TrainingArguments owns weight decay). Refused with
    ZeRO stages 1-3, where DeepSpeed's AdamW decays the whole block."""
    state_policy: str = "reset"
    """``reset`` drops an inactive block's master and moments (BAdam); ``offload`` keeps them in CPU memory."""
    offload_dtype: str = "fp32"
    """Storage of offloaded state: ``fp32`` or ``int8`` (bitsandbytes blockwise quantization)."""
    moment_dtype: str = "fp32"
    """Storage of the active block's Adam moments: ``fp32``, or ``int8`` (bitsandbytes blockwise quantization, as
    ``offload_dtype=int8``; 2 bytes per parameter instead of 8, dequantized one tensor at a time for each step and
    consensus fold). BlockAdam only: not with ``simulate.stacked=true``, ZeRO stages 1-3 or the torch-AdamW baseline."""
    schedule: str = "constant"
    """Learning-rate schedule over the run's steps, as Hugging Face's ``lr_scheduler_type``: ``constant``,
    ``linear`` (linear decay to 0 at the last step) or ``cosine`` (half a cosine to 0); each after
    ``warmup_steps`` of linear warm-up from 0 (see :mod:`deca_ds.lr_schedule`)."""
    warmup_steps: int = 0
    """Linear warm-up steps (0: none, or ``warmup_ratio`` of the run)."""
    warmup_ratio: float = 0.0
    """Warm-up as a fraction of the run's steps, used when ``warmup_steps`` is 0."""
    fused_backward: bool = False
    """Step each active parameter inside backward, as soon as its gradient is complete, and free that gradient at
    once (BlockAdam's ``fused_backward``): the active block's gradients are never alive together, so model states
    lose the block's gradients (4L bytes of an fp32 block, 2L of bf16) and keep one tensor's. Bit-identical to the
    unfused step. Refused, before anything runs, with what needs every gradient before the update: ds_config
    ``gradient_clipping`` > 0, more than one micro-batch per step (``gradient_accumulation_steps`` > 1), ZeRO stages
    1-3, ``clients.ranks_per_client`` > 1 and ``method: centralized`` (a data-parallel gradient reduction),
    ``nan_policy: skip`` (the update is applied before the step is known to be finite; with ``stop`` the run stops
    and no checkpoint holds it), fp16 loss scaling, the stacked simulator (``simulate.stacked: false`` runs it) and
    the Hugging Face Trainer integration (when it builds its optimizer, before its first step). The simulator's ``rms_g`` diagnostic is not measured (no gradient
    survives backward)."""


@dataclass
class DecaConfig:
    """DECA's consensus correction of the moments."""

    signal: str = "qgm_grad"
    """Consensus signal h: ``raw`` x_new - x, ``qgm`` (x - x_new)/lr, ``discrepancy`` (x_half - x_new)/lr, or
    ``qgm_grad`` / ``discrepancy_grad``: those two times the client's Adam denominator sqrt(v_hat) + eps, i.e. in
    gradient units (docs/design.md §1).
    The default is the reading with the best tuning-seed score in the paper's regime (docs/results.md, lr x betas
    tuned per reading): ``qgm_grad`` 0.0197 test loss, ``raw`` 0.0230, ``discrepancy_grad`` 0.0257, ``qgm``
    0.241 (it stalls: its h is in normalised-step units, far above g); every backend runs it (BlockAdam, the
    simulators, and ZeRO stages 1-3, which read DeepSpeed's ``exp_avg_sq``). On the evaluation seeds ``qgm_grad``,
    ``raw`` and block-wise Adam + gossip are within noise of each other."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Decay applied when folding h into the moments (β1, β2); 1.0 disables the correction. (0.9, 0.999) with lr 1e-2
    was ``qgm_grad``'s best of (0.99, 0.999), (0.9, 0.999), (0.99, 0.9999) x lr {3e-3, 1e-2} (docs/results.md)."""


@dataclass
class TopologyConfig:
    """The communication graph between clients."""

    name: str = "ring"
    weights: str = "metropolis"
    """Mixing weights: ``metropolis`` (Metropolis-Hastings) or ``uniform``."""
    p: float | None = None
    """Edge probability for ``erdos_renyi`` (``None``: :data:`ERDOS_RENYI_P`, 0.5, filled in by validation so the
    run record shows the value in use). Set for another graph it is refused: it would be ignored, and with a number
    as the default an explicit ``topology.p`` could not be told from the default."""
    seed: int = 0
    """Seed for random graphs."""
    path: str | None = None
    """Edge list or weight matrix file for ``custom``; its first line names the format (``# format: edges`` or
    ``# format: matrix``; a ``.npy`` file is a matrix). See :func:`deca_ds.topology.make_topology`."""
    rows: int | None = None
    """Rows of a ``torus`` grid (``None``: the most square factorisation of the number of clients)."""
    cols: int | None = None
    """Columns of a ``torus`` grid (``None``: the number of clients divided by ``rows``)."""
    center: int | None = None
    """The hub client of a ``star`` (``None``: client 0)."""


@dataclass
class ClientsConfig:
    """How launcher ranks form clients."""

    ranks_per_client: int = 1
    """Contiguous ranks per client; the client's ranks are one DeepSpeed data-parallel group."""


@dataclass
class GossipConfig:
    """Transport of the neighbour exchange."""

    dtype: str = "fp32"
    """Wire dtype of uncompressed exchanges (``fp32`` or ``bf16``: each exchange rounded, the error not fed back);
    mixing arithmetic stays fp32. Leave it ``fp32`` with ``compression``, which sets the wire format itself."""
    chunk_mb: float = 64.0
    """Receive buffers are bounded to this many MiB per neighbour, whatever the block size (a few pieces of the
    block in flight at once, a quarter of this each)."""
    compression: str = "none"
    """``none``, or ``bf16``/``int8``/``int4`` with error feedback (``deca_ds.compression``): each client sends the
    change of its block since what it sent before, and keeps what it could not send for the next exchange. int8
    sends 1 byte per value and int4 half a byte, plus a 2-byte scale per 256 values; the first exchange of each
    block visit travels in bf16. Needs a static graph (not ``one_peer_exponential``) and costs 8 bytes per exchanged
    value of the active block in memory."""


@dataclass
class SimulateConfig:
    """Where ``backend: simulate`` keeps its client replicas (ignored by the launcher)."""

    device: str = "auto"
    """Training device of the simulator: ``auto`` (DeepSpeed's accelerator: the GPU when there is one, else the
    CPU), ``cpu``, or a torch device string such as ``cuda:1``."""
    park_replicas: bool = False
    """Keep every client's replica (weights, gradients, optimizer state) in CPU memory and move it to ``device``
    only for its own forward, backward and optimizer step: device memory for one client instead of all of them,
    at the cost of copying one model to and from the device per client per step. No effect for ``centralized``
    (one shared model) or when ``device`` is the CPU. Per-client path only (``stacked: false``)."""
    stacked: bool = True
    """Run the clients as one batched model (``deca_ds.stacked``): trained parameters stacked along a leading client
    dimension, one vectorised forward/backward (``torch.func.vmap``), Adam, clipping and the consensus correction on
    the stacked block, gossip as one matrix product per tensor. ``false``: one model replica and one optimizer per
    client (``deca_ds.simulate``), which equals a launch bit for bit; the stacked path equals it within float
    rounding (tests/unit/test_stacked.py)."""


@dataclass
class LoraConfig:
    """LoRA adapters of ``method: dec_lora`` (the ``peft`` library; base weights frozen)."""

    rank: int = 8
    """Rank r of every adapter."""
    alpha: float = 16.0
    """Scaling numerator (``lora_alpha``): adapters are scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapters' input (0 keeps runs deterministic)."""
    target_modules: list[str] | None = None
    """Module names to adapt; ``None``: every linear layer but the LM head (peft's ``all-linear``). On the embedded
    model, which is randomly initialised, add ``lm_head``: its frozen random head bounds the logits and adapters
    below it cannot fit the task (a warning says so at start; docs/results.md)."""


@dataclass
class RunConfig:
    """A whole fine-tuning run."""

    ds_config: str | None = None
    """Path to a DeepSpeed JSON. ``None``: ``ds_configs/cpu_fp32.json`` without a GPU, else ``gpu_bf16.json``."""
    output_dir: str = "runs/default"
    max_steps: int = 192
    """Optimizer steps per client (replaced by ``epochs`` when that is set)."""
    epochs: float | None = None
    """Passes over the data instead of ``max_steps``: ``ceil(epochs x mean client train rows / rows per client
    step)`` steps (clients hold different amounts of non-IID data and all take the same steps, so the mean client
    makes ``epochs`` passes). When set, ``max_steps`` is derived from it and the setting is ignored."""
    seed: int = 0
    """Seed of the model initialisation and the block order; an integer in [0, 2**64)."""
    resume: bool | str = False
    """``false``: a new run (an existing run in ``output_dir`` is never overwritten); ``true``: continue from the
    newest complete checkpoint (an older complete one, with a warning, if the newest is damaged), refused when there
    is nothing to resume; ``auto``: like ``true`` when there is a checkpoint, else a new run (for launchers that
    restart crashed workers); ``step_N``: continue from the checkpoint taken after step N exactly. A resumed leg
    must keep every setting that defines the run (see :func:`deca_ds.checkpoint.compare_run_settings`)."""
    method: str = "deca"
    """``deca``, ``badam_gossip`` (no BMA), ``trivial_bma``, ``dadam`` (full Adam + full-model gossip), ``local``
    (no communication), ``centralized`` (all ranks one data-parallel group) or ``dec_lora`` (frozen base, LoRA
    adapters gossiped every step; needs ``peft``)."""
    centralized_optimizer: str = "block_adam"
    """Optimizer of ``method: centralized``: ``block_adam`` or ``adamw`` (full-parameter)."""
    checkpoint_every: int = 0
    """Steps between checkpoints (0: only at the end)."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept; older ones are deleted after a newer one is complete."""
    comm_timeout: float = 300.0
    """Seconds to wait for a neighbour before stopping with an error that names it."""
    log_every: int = 1
    eval_every: int = 0
    """Steps between evaluations of every client (0: only at the end)."""
    nan_policy: str = "stop"
    """Non-finite loss or gradients: ``skip`` the step on that client, or ``stop`` every client."""
    backend: str = "launcher"
    """``launcher`` (one process per rank) or ``simulate`` (all clients in one process)."""
    num_clients: int | None = None
    """Clients for ``backend: simulate`` (the launcher derives it from the world size; set, it must agree)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    blocks: BlocksConfig = field(default_factory=BlocksConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deca: DecaConfig = field(default_factory=DecaConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    gossip: GossipConfig = field(default_factory=GossipConfig)
    simulate: SimulateConfig = field(default_factory=SimulateConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def validate(self) -> "RunConfig":
        """Check value ranges and names; returns self. Raises :class:`ConfigError` on the first problem.

        The one value it fills in: ``topology.p`` of an ``erdos_renyi`` graph left unset becomes
        :data:`ERDOS_RENYI_P`."""
        _finite_floats(self)
        for key in ("seed", "data.seed", "topology.seed"):
            _seed(key, _get(self, key))
        _resume(self.resume)
        if not self.output_dir.strip():
            raise ConfigError("output_dir='' is empty: give the directory the run writes into, e.g. runs/my_run")
        for key in ("ds_config", "model.path", "data.path", "topology.path", "data.partition_by"):
            value = _get(self, key)
            if isinstance(value, str) and not value.strip():
                raise ConfigError(f"{key}='' is empty: give a value, or leave the setting out for its default")
        _choice("method", self.method, METHODS)
        _choice("centralized_optimizer", self.centralized_optimizer, CENTRALIZED_OPTIMIZERS)
        _choice("nan_policy", self.nan_policy, NAN_POLICIES)
        _choice("backend", self.backend, BACKENDS)
        _positive("max_steps", self.max_steps)
        if self.epochs is not None:
            _positive("epochs", self.epochs)
        _at_least("checkpoint_every", self.checkpoint_every, 0)
        _at_least("keep_checkpoints", self.keep_checkpoints, 1)
        if not 1e-3 <= self.comm_timeout <= MAX_COMM_TIMEOUT:
            # torch keeps the process-group timeout as a 64-bit count of milliseconds: below 1 ms it becomes 0.
            raise ConfigError(f"comm_timeout={self.comm_timeout!r} is out of range: use seconds in "
                              f"[0.001, {MAX_COMM_TIMEOUT:g}], e.g. 300")
        _positive("log_every", self.log_every)
        _at_least("eval_every", self.eval_every, 0)
        if self.num_clients is not None:
            _positive("num_clients", self.num_clients)
        _choice("model.dtype", self.model.dtype, DTYPES)
        d = self.data
        _choice("data.format", d.format, DATA_FORMATS)
        _choice("data.task", d.task, TASKS)
        _choice("data.partition", d.partition, PARTITIONS)
        _positive("data.alpha", d.alpha, fix="use a value > 0 (small = more skewed; 1000 is nearly IID)")
        _positive("data.num_examples", d.num_examples)
        _at_least("data.num_labels", d.num_labels, 2)
        _positive("data.shards_per_client", d.shards_per_client)
        _at_least("data.min_partition_size", d.min_partition_size, 0)
        _at_least("data.max_length", d.max_length, 8)
        _choice("data.loss_on", d.loss_on, ("all_assistant", "last_assistant"))
        if not 0.0 <= d.test_size < 1.0:
            raise ConfigError(f"data.test_size={d.test_size!r} is out of range: use a fraction in [0, 1)")
        _at_least("data.eval_examples", d.eval_examples, 0)
        if d.client_eval_examples is not None:
            _at_least("data.client_eval_examples", d.client_eval_examples, 0)
        b = self.blocks
        _positive("blocks.layers_per_block", b.layers_per_block)
        _positive("blocks.switch_every", b.switch_every)
        _choice("blocks.order", b.order, ORDERS)
        if b.order == "fixed" and not b.fixed_order:
            raise ConfigError("blocks.order=fixed needs blocks.fixed_order: give the block indices to visit, e.g. "
                              "[0, 2, 1]")
        if b.fixed_order is not None and b.order != "fixed":
            raise ConfigError(f"blocks.fixed_order is set but blocks.order={b.order}: set blocks.order=fixed, or "
                              "remove blocks.fixed_order")
        if b.fixed_order and min(b.fixed_order) < 0:
            raise ConfigError(f"blocks.fixed_order={b.fixed_order} has a negative index: use block indices >= 0")
        if b.prefixes is not None and (not b.prefixes or not all(p.strip() for p in b.prefixes)):
            raise ConfigError(f"blocks.prefixes={b.prefixes!r} has no or an empty entry: give one non-empty "
                              "parameter-name prefix per block, or remove blocks.prefixes")
        o = self.optim
        _positive("optim.lr", o.lr)
        _betas("optim.betas", o.betas)
        _positive("optim.eps", o.eps)
        _at_least("optim.weight_decay", o.weight_decay, 0.0)
        _choice("optim.state_policy", o.state_policy, STATE_POLICIES)
        _choice("optim.offload_dtype", o.offload_dtype, OFFLOAD_DTYPES)
        _choice("optim.moment_dtype", o.moment_dtype, MOMENT_DTYPES)
        if o.moment_dtype == "int8" and self.method == "centralized" and self.centralized_optimizer == "adamw":
            raise ConfigError("optim.moment_dtype=int8 applies to BlockAdam, and centralized_optimizer=adamw is torch "
                              "AdamW with fp32 moments: set centralized_optimizer=block_adam, or "
                              "optim.moment_dtype=fp32")
        _choice("optim.schedule", o.schedule, LR_SCHEDULES)
        _at_least("optim.warmup_steps", o.warmup_steps, 0)
        if not 0.0 <= o.warmup_ratio < 1.0:
            raise ConfigError(f"optim.warmup_ratio={o.warmup_ratio!r} is out of range: use a fraction in [0, 1)")
        if o.fused_backward:
            _check_fused_backward(self)
        if self.backend == "simulate" and self.simulate.stacked:
            check_stacked_support(self)
        _choice("deca.signal", self.deca.signal, SIGNALS)
        _betas("deca.betas", self.deca.betas, allow_one=True)
        t = self.topology
        _choice("topology.name", t.name, TOPOLOGIES)
        _choice("topology.weights", t.weights, MIXING_WEIGHTS)
        if t.p is not None and t.name != "erdos_renyi":
            raise ConfigError(f"topology.p is set but topology.name={t.name}: it is the edge probability of "
                              "erdos_renyi only; set topology.name=erdos_renyi or remove topology.p (topology.p=null "
                              "unsets one a config file sets)")
        if t.p is not None and not 0.0 < t.p <= 1.0:
            raise ConfigError(f"topology.p={t.p!r} is out of range: use an edge probability in (0, 1]")
        if t.name == "erdos_renyi" and t.p is None:
            # Filled in rather than left None: run.json then records p=0.5 for such a run exactly as before p could
            # be unset, so resuming (and comparing machines' settings) sees no difference. Idempotent: a second
            # validation sees an erdos_renyi graph with p set.
            t.p = ERDOS_RENYI_P
        if t.name == "custom" and not t.path:
            raise ConfigError("topology.name=custom needs topology.path: an edge-list or weight-matrix file")
        if t.path is not None and t.name != "custom":
            raise ConfigError(f"topology.path is set but topology.name={t.name}: set topology.name=custom to use "
                              "the file, or remove topology.path")
        for key, owner in (("rows", "torus"), ("cols", "torus"), ("center", "star")):
            value = getattr(t, key)
            if value is None:
                continue
            if t.name != owner:
                raise ConfigError(f"topology.{key} is set but topology.name={t.name}: it shapes a {owner} only; set "
                                  f"topology.name={owner} or remove topology.{key}")
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "center" else 1):
                raise ConfigError(f"topology.{key}={value!r} is out of range: use an integer >= "
                                  f"{0 if key == 'center' else 1}")
        _positive("clients.ranks_per_client", self.clients.ranks_per_client)
        g = self.gossip
        _choice("gossip.dtype", g.dtype, GOSSIP_DTYPES)
        _choice("gossip.compression", g.compression, COMPRESSIONS)
        if g.compression != "none":
            if g.dtype != "fp32":
                raise ConfigError(f"gossip.dtype={g.dtype} rounds uncompressed exchanges; gossip.compression="
                                  f"{g.compression} sets the wire format itself: remove gossip.dtype (or set it "
                                  "to fp32)")
            if t.name == "one_peer_exponential":
                raise ConfigError(f"gossip.compression={g.compression} keeps a running sum of fixed neighbours' "
                                  "values, and topology.name=one_peer_exponential changes neighbours every step: "
                                  "use a static graph (e.g. exponential) or gossip.compression=none")
        _positive("gossip.chunk_mb", self.gossip.chunk_mb)
        wire_bytes = 2 if self.gossip.dtype == "bf16" else 4
        if int(self.gossip.chunk_mb * 2**20) < wire_bytes:  # the Mixer's buffers hold int(chunk_mb * 2**20) bytes
            raise ConfigError(f"gossip.chunk_mb={self.gossip.chunk_mb!r} is less than one {self.gossip.dtype} "
                              f"value ({wire_bytes} bytes): use a value such as 64 (MiB)")
        _positive("lora.rank", self.lora.rank)
        _positive("lora.alpha", self.lora.alpha)
        if not 0.0 <= self.lora.dropout < 1.0:
            raise ConfigError(f"lora.dropout={self.lora.dropout!r} is out of range: use a probability in [0, 1)")
        if self.lora.target_modules is not None and not self.lora.target_modules:
            raise ConfigError("lora.target_modules=[] is empty: name the modules to adapt (e.g. [q_proj, v_proj]) "
                              "or remove the setting for every linear layer")
        if not self.simulate.device.strip():
            raise ConfigError("simulate.device='' is empty: use auto, cpu or a torch device such as cuda:0")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-serializable) of every setting."""
        return dataclasses.asdict(self)


MAX_SEED = 2**64 - 1
"""Largest seed: ``torch.manual_seed`` takes an unsigned 64-bit integer (numpy accepts any integer >= 0)."""
MAX_COMM_TIMEOUT = 1e9
"""Largest ``comm_timeout`` in seconds (about 31 years), well inside torch's 64-bit millisecond timeout."""
RESUME_STEP = re.compile(r"step_(\d+)")


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _finite_floats(cfg: Any, prefix: str = "") -> None:
    """Every float setting (and every number in a list of floats) must be finite: ``inf`` passes ``> 0`` checks."""
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _finite_floats(value, f"{key}.")
            continue
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ConfigError(f"{key}={value!r} is not a finite number: give a finite value")


def _seed(key: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise ConfigError(f"{key}={value!r} is out of range: use an integer seed in [0, 2**64)")


def _resume(value: bool | str) -> None:
    if isinstance(value, bool):
        return
    if value == "auto" or (isinstance(value, str) and RESUME_STEP.fullmatch(value)):
        return
    raise ConfigError(f"resume={value!r} is not known: use true, false, auto or step_N (e.g. step_96, a checkpoint "
                      "taken after step 96)")


def _check_fused_backward(cfg: "RunConfig") -> None:
    """Refuse run settings that need every gradient of the step before the update (``optim.fused_backward``);
    the DeepSpeed settings are checked by :func:`deca_ds.ds_config.check_ds_config`."""
    fix = "or set optim.fused_backward=false"
    if cfg.nan_policy == "skip":
        raise ConfigError("optim.fused_backward=true applies each update during backward, before the step is known to "
                          f"be finite, so nan_policy=skip cannot skip it: use nan_policy=stop, {fix}")
    if cfg.method == "centralized":
        raise ConfigError("optim.fused_backward=true steps each parameter before a data-parallel gradient average "
                          f"could happen, and method=centralized averages every rank's gradients: choose a "
                          f"decentralized method (deca, badam_gossip, ...), {fix}")
    if cfg.clients.ranks_per_client > 1:
        raise ConfigError(f"optim.fused_backward=true steps each parameter before the client's ranks could average "
                          f"its gradient: use clients.ranks_per_client=1 (got {cfg.clients.ranks_per_client}), {fix}")


def check_stacked_support(cfg: "RunConfig") -> None:
    """Refuse the BlockAdam-only settings the stacked simulator cannot run (it computes gradients with torch.func and
    keeps its own fp32 moments). Called by the settings' validation with ``backend=simulate`` and by
    :class:`deca_ds.stacked.StackedSimulation` itself, which may be built whatever ``backend`` says.

    Raises:
        ConfigError: ``optim.fused_backward`` or ``optim.moment_dtype`` other than fp32, naming the fix.
    """
    o = cfg.optim
    if o.fused_backward:
        raise ConfigError("optim.fused_backward=true has nothing to fuse in the stacked simulator (it computes "
                          "gradients with torch.func): set simulate.stacked=false, or optim.fused_backward=false")
    if o.moment_dtype != "fp32":
        raise ConfigError(f"optim.moment_dtype={o.moment_dtype} needs BlockAdam, which the stacked simulator does not "
                          "use (it keeps fp32 moments): set simulate.stacked=false, or optim.moment_dtype=fp32")


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        hint = difflib.get_close_matches(str(value), choices, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(f"{key}={value!r} is not known{extra}: use one of {', '.join(choices)}")


def _positive(key: str, value: float, fix: str = "use a value > 0") -> None:
    if not value > 0:
        raise ConfigError(f"{key}={value!r} is out of range: {fix}")


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(f"{key}={value!r} is out of range: use a value >= {low}")


def _betas(key: str, value: list[float], allow_one: bool = False) -> None:
    if len(value) != 2:
        raise ConfigError(f"{key}={value!r} needs two numbers: write {key}=[0.9,0.999]")
    for b in value:
        if not (0.0 <= b < 1.0 or (allow_one and b == 1.0)):
            upper = "1]" if allow_one else "1)"
            raise ConfigError(f"{key}={value!r} is out of range: each decay must lie in [0, {upper}")


# ---------------------------------------------------------------------------------------------------------------
# Loading: YAML + dotted overrides -> typed dataclasses, strictly.


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _type_of(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` (from YAML or an override) to the declared type ``tp`` or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(key, value, inner[0])
        for tp_i in inner:  # e.g. bool | str: the first type that fits
            try:
                return _coerce(key, value, tp_i)
            except ConfigError:
                pass
        expected = " or ".join(_TYPE_WORDS.get(t, getattr(t, "__name__", str(t))) for t in inner)
        raise ConfigError(f"{key}={value!r} has the wrong type: expected {expected}")
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} has the wrong type: expected a list like [a, b]")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} has the wrong type: expected true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}={value!r} has the wrong type: expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} has the wrong type: expected a number")
        try:
            value = float(value)
        except OverflowError:  # an integer with hundreds of digits
            raise ConfigError(f"{key}={str(value)[:12]}... is not a finite number: give a finite value") from None
        if not math.isfinite(value):
            raise ConfigError(f"{key}={value!r} is not a finite number: give a finite value")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} has the wrong type: expected a string")
        return value
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    if not isinstance(data, dict):
        name = prefix.rstrip(".") or "config"
        raise ConfigError(f"{name} must be a mapping of settings, got {data!r}: write its settings as "
                          f"{name}.KEY=VALUE overrides or indented under '{name}:' in the YAML")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            hint = difflib.get_close_matches(key, fields, n=1)
            extra = f"; did you mean {prefix}{hint[0]}?" if hint else f"; known: {', '.join(fields)}"
            raise ConfigError(f"unknown setting {full!r}{extra}")
        tp = _type_of(cls, key)
        if dataclasses.is_dataclass(tp):
            # An empty section (``optim:`` with nothing under it) is null; any other non-mapping (``optim=0``,
            # ``model: false``, ``data: []``) is refused by _build instead of silently meaning "all defaults".
            kwargs[key] = _build(tp, {} if value is None else value, f"{full}.")
        else:
            kwargs[key] = _coerce(full, value, tp)
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value: write e.g. optim.lr=1e-4")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    # YAML reads 1e-4 as a string (no dot); accept it as a number.
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    return key.strip().split("."), value


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader with two YAML 1.1 surprises of recipe files removed.

    - ``lr: 1e-4`` (an exponent without a dot) is a string in YAML 1.1, so a number was refused as "the wrong type:
      expected a number" (the same value as an override, ``optim.lr=1e-4``, was accepted); here it is a float.
    - A key given twice (two ``optim:`` sections, or ``lr`` twice in one) kept only the last: every setting of the
      first section silently fell back to its default. Here it is an error naming both lines.
    """


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    # The mapping's own keys only (before a merge key's are added): overriding a merged key (<<: *base) is meant.
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.setdefault(key, key_node.start_mark.line)
        except TypeError:  # an unhashable key: SafeLoader refuses it itself
            continue
        if first != key_node.start_mark.line:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} on line {key_node.start_mark.line + 1} repeats the one on line {first + 1} "
                "(only the last would count): merge them into one", key_node.start_mark)
    loader.flatten_mapping(node)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_RecipeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a recipe config: YAML file (optional) plus dotted ``key=value`` overrides, then validate.

    Args:
        path: YAML file; ``None`` starts from the embedded defaults.
        overrides: e.g. ``["optim.lr=1e-4", "blocks.order=random"]``; applied in order after the file.

    Returns:
        A validated :class:`RunConfig`.

    Raises:
        ConfigError: missing/malformed file, unknown key (with a did-you-mean), wrong type, or bad value.
    """
    data: dict[str, Any] = {}
    if path is not None:
        if os.path.isdir(path):
            raise ConfigError(f"--config {str(path)!r} is a directory: give the path of a recipe YAML file in it")
        if not os.path.isfile(path):
            raise ConfigError(f"--config {str(path)!r} does not exist: give the path of a recipe YAML")
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.load(f, Loader=_RecipeLoader) or {}  # noqa: S506 -- a SafeLoader subclass
        except yaml.YAMLError as e:
            first = str(e).splitlines()[0]
            raise ConfigError(f"--config {str(path)!r} is not valid YAML ({first}): fix the file") from None
        except UnicodeDecodeError as e:  # PyYAML decodes the stream itself; a bare traceback otherwise
            raise ConfigError(f"--config {str(path)!r} is not UTF-8 text (byte {e.start}: {e.reason}): save it as "
                              "UTF-8") from None
        if not isinstance(data, dict):
            raise ConfigError(f"--config {str(path)!r} must hold a mapping of settings at the top level")
    for item in overrides or []:
        keys, value = _parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {k!r} is not a section")
        if isinstance(node.get(keys[-1]), dict):  # the recipe (or an earlier override) gave this section settings
            if value is None:
                where = ".".join(keys)
                raise ConfigError(f"override {item!r} gives the section {where} no settings, which would silently "
                                  f"drop every {where} setting of the recipe: set one instead, e.g. {where}.<name>=...")
            if isinstance(value, dict):  # a mapping adds to the section: the recipe's other settings stay
                value = _merged(node[keys[-1]], value)
        node[keys[-1]] = value
    return _build(RunConfig, data).validate()


def _merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra``'s settings put in, section by section (``extra`` wins)."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merged(out[key], value) if isinstance(out.get(key), dict) and isinstance(value, dict) else value
    return out

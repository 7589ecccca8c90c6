"""Building a run's parts from its settings, in one place for the launcher, the ZeRO engine and the simulator.

Each function turns one part of a :class:`deca_ds.config.RunConfig` into objects: the blocks a method trains, the
client optimizer, the graph, and DECA's between-steps hook. Settings errors become one-line
:class:`deca_ds.config.ConfigError` s naming the setting, so preflight checks and real runs fail the same way.
No DeepSpeed and no process group here.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from deca_ds.blocks import BlockPartition, partition_blocks
from deca_ds.config import BlocksConfig, ConfigError, RunConfig
from deca_ds.consensus import ConsensusStep, MixFn, method_spec
from deca_ds.optional import import_peft

__all__ = ["partition_for", "check_blocks", "block_names_for", "uses_torch_adamw", "no_decay_names",
           "build_optimizer", "topology_options", "build_topology", "build_consensus_step", "check_lora_support",
           "check_lora_targets",
           "prepare_model", "lora_param_names"]

LORA_MARK = "lora_"
"""Every parameter peft's LoRA adds has this in its name (``lora_A``, ``lora_B``)."""


def check_lora_support(cfg: RunConfig) -> None:
    """Fail with one line, before anything runs, when ``method=dec_lora`` cannot run here.

    Raises:
        ConfigError: ``peft`` is not installed.
    """
    if not method_spec(cfg.method).lora:
        return
    try:
        import_peft()
    except ImportError:
        raise ConfigError("method=dec_lora needs the peft library, which is not installed: pip install "
                          "'deca_ds[lora]' (or 'peft>=0.13'), or choose another method") from None


def prepare_model(cfg: RunConfig, model: nn.Module) -> nn.Module:
    """The model a method trains: for ``dec_lora`` the base wrapped with LoRA adapters (``peft``), else ``model``.

    The adapters are initialised from ``cfg.seed`` (peft's default: ``lora_A`` Kaiming-uniform, ``lora_B`` zero),
    identically on every client and process, without touching the global RNG; the base weights are frozen.

    Args:
        cfg: the run's settings (``method``, ``lora``, ``seed``).
        model: the loaded model, on the device it trains on.

    Raises:
        ConfigError: as :func:`check_lora_support`, or ``lora.target_modules`` names no module of the model.
    """
    if not method_spec(cfg.method).lora:
        return model
    check_lora_support(cfg)
    lo = cfg.lora
    if cfg.model.path is None and "lm_head" not in (lo.target_modules or []):
        # The embedded model is randomly initialised: its frozen random head after a frozen RMSNorm bounds every
        # logit gap, so adapters below it leave every token's loss above ~3 nats (tests/unit/test_dec_lora_model.py
        # computes the bound; measured: the loss stays at 4.3, docs/results.md). A pretrained head does not have
        # this problem, hence a warning, not a change of peft's default.
        import warnings

        warnings.warn("method=dec_lora on the embedded randomly initialised model with its LM head frozen cannot "
                      "fit the task (a frozen random head bounds the logits): add lm_head to lora.target_modules, "
                      "e.g. lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head]",
                      UserWarning, stacklevel=2)
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        return _wrap_lora(cfg, model)


def _wrap_lora(cfg: RunConfig, model: nn.Module) -> nn.Module:
    """``peft.get_peft_model`` with the run's LoRA settings; peft's refusal of them as one ConfigError line."""
    peft = import_peft()
    lo = cfg.lora
    targets = lo.target_modules if lo.target_modules is not None else "all-linear"
    peft_cfg = peft.LoraConfig(r=lo.rank, lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=targets,
                               bias="none", task_type="CAUSAL_LM")
    try:
        return peft.get_peft_model(model, peft_cfg)
    except ValueError as e:
        raise ConfigError(f"lora.target_modules={lo.target_modules!r}: {str(e).splitlines()[0][:200]}") from None


def check_lora_targets(cfg: RunConfig) -> None:
    """Wrap the model on the meta device as :func:`prepare_model` will (``method=dec_lora``), so that LoRA settings
    peft refuses (``lora.target_modules`` naming no module of the model) fail before any process group, model or
    data exists. Shapes only: no weights, no memory (~0.1 s for an 8B model).

    Raises:
        ConfigError: as :func:`check_lora_support`, or peft refuses the LoRA settings for this model.
    """
    if not method_spec(cfg.method).lora:
        return
    check_lora_support(cfg)
    from deca_ds.models import build_meta_model

    with torch.random.fork_rng(devices=[]):  # a check leaves the run's random state alone
        _wrap_lora(cfg, build_meta_model(cfg.model.path))


def lora_param_names(model: nn.Module) -> list[str]:
    """Names of the LoRA adapter parameters of a peft-wrapped model, in ``named_parameters`` order."""
    return [n for n, _ in model.named_parameters() if LORA_MARK in n]


def partition_for(model: nn.Module, blocks: BlocksConfig) -> BlockPartition:
    """The block partition a recipe's ``blocks`` section describes for ``model`` (layers per block, embeddings and
    head, prefixes): the one call training, preflight and the planner make.

    Args:
        model: a causal LM (the meta device is fine).
        blocks: the recipe's ``blocks`` settings.

    Raises:
        ValueError: the settings do not fit the model (see :func:`deca_ds.blocks.partition_blocks`).
    """
    b = blocks
    return partition_blocks(model, layers_per_block=b.layers_per_block, include_embeddings=b.include_embeddings,
                            include_lm_head=b.include_lm_head, prefixes=b.prefixes)


def check_blocks(cfg: RunConfig) -> BlockPartition:
    """Partition the model on the meta device as training will, so bad block settings fail before anything runs;
    also checks ``data.max_length`` against the model's positions.

    Returns:
        The partition of the (meta) model.

    Raises:
        ConfigError: unreadable model config, block settings that do not fit the model, a ``blocks.fixed_order``
            index out of range, or ``data.max_length`` beyond the model's positions.
    """
    from deca_ds.models import build_meta_model, check_lengths

    try:
        model = build_meta_model(cfg.model.path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.path={cfg.model.path!r}: its config.json cannot be read "
                          f"({str(e).splitlines()[0][:160]}): give a Hugging Face model directory") from None
    b = cfg.blocks
    try:
        part = partition_for(model, cfg.blocks)
    except ValueError as e:
        key = "blocks.prefixes" if b.prefixes else "blocks"
        fix = ""
        if b.prefixes and "more than one prefix" in str(e):
            fix = ": make the prefixes disjoint, so that each parameter belongs to one block"
        elif b.prefixes:  # the partition's own message names the problem, not the names a prefix could select
            first = next((n for n, _ in model.named_parameters()), "")
            fix = f": give one prefix or regex of the model's parameter names per block (e.g. {first!r})"
        raise ConfigError(f"{key}: {' '.join(str(e).split())}{fix}") from None
    if b.fixed_order is not None:
        bad = [i for i in b.fixed_order if not 0 <= i < len(part)]
        if bad:
            raise ConfigError(f"blocks.fixed_order={b.fixed_order} names block(s) {bad} but the model has "
                              f"{len(part)} blocks: use indices 0..{len(part) - 1}")
    check_lengths(cfg, model.config)
    return part


def uses_torch_adamw(cfg: RunConfig) -> bool:
    """The centralized full-parameter baseline with torch AdamW (no blocks, no consensus hook)."""
    return cfg.method == "centralized" and cfg.centralized_optimizer == "adamw"


def block_names_for(cfg: RunConfig, model: nn.Module) -> list[list[str]]:
    """Parameter names of each block the method trains, in block order.

    Block-wise methods get :func:`partition_for`'s blocks; D-Adam (``single_block``) one block of all of them; the
    torch-AdamW baseline one block of every model parameter; ``dec_lora`` one block of the LoRA adapters of a
    model wrapped by :func:`prepare_model`.
    """
    if method_spec(cfg.method).lora:
        return [_lora_block(model)]
    if uses_torch_adamw(cfg):
        return [[n for n, _ in model.named_parameters()]]
    partition = partition_for(model, cfg.blocks)
    if method_spec(cfg.method).single_block:
        return [partition.param_names()]
    return [list(b.param_names) for b in partition.blocks]


def no_decay_names(cfg: RunConfig, model: nn.Module) -> list[str]:
    """Names of ``model``'s parameters that ``optim.weight_decay`` does not apply to, in ``named_parameters`` order.

    Empty with ``optim.decay_norms_and_biases=true`` (the default); with ``false``, every parameter that
    ``transformers.Trainer.get_decay_parameter_names(model)`` does not name (biases and LayerNorm/RMSNorm weights by
    the installed transformers' rule): the plain Trainer's no-decay group.
    """
    if cfg.optim.decay_norms_and_biases:
        return []
    from transformers import Trainer

    # Hazard: get_decay_parameter_names is a Trainer method that reads only its model argument (transformers 4.x and
    # 5.x alike); calling it without a Trainer gives the installed version's own rule, so this path and the Hugging
    # Face integration (deca_ds.hf, which calls it on its Trainer) cannot drift apart.
    decayed = set(Trainer.get_decay_parameter_names(None, model))
    return [n for n, _ in model.named_parameters() if n not in decayed]


def build_optimizer(cfg: RunConfig, model: nn.Module, no_decay: Iterable[str] | None = None) -> torch.optim.Optimizer:
    """The client optimizer of ``cfg.method`` for ``model`` (already on its training device).

    :class:`deca_ds.optim.BlockAdam` (``auto_switch=False``: the switch happens in :class:`ConsensusStep`), one block
    per layer group or one block for D-Adam, or torch AdamW for the centralized full-parameter baseline. With
    ``optim.fused_backward`` BlockAdam steps each parameter inside backward (the caller's step must allow it: see
    :func:`build_consensus_step`).

    Args:
        cfg: the run's settings.
        model: the model the method trains.
        no_decay: names of the parameters ``optim.weight_decay`` does not apply to (BlockAdam's ``no_decay``; torch
            AdamW gets them as a second group with ``weight_decay=0``, as ``transformers.Trainer`` builds it).
            None: the recipe's rule, :func:`no_decay_names`.
    """
    from deca_ds.optim import BlockAdam

    o = cfg.optim
    no_decay = set(no_decay_names(cfg, model) if no_decay is None else no_decay)
    if uses_torch_adamw(cfg):
        hp = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        if not no_decay:  # one group, as before the rule existed: its checkpoints keep loading
            return torch.optim.AdamW(model.parameters(), **hp)
        named = list(model.named_parameters())
        unknown = sorted(no_decay - {n for n, _ in named})
        if unknown:
            raise ValueError(f"no_decay names parameters not in model.named_parameters(): {unknown}")
        groups = [{"params": [p for n, p in named if n not in no_decay]},
                  {"params": [p for n, p in named if n in no_decay], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, **hp)
    spec = method_spec(cfg.method)
    if spec.lora:
        blocks: Any = [_lora_block(model)]
    else:
        blocks = partition_for(model, cfg.blocks)
        if spec.single_block:
            blocks = [blocks.param_names()]
    b = cfg.blocks
    return BlockAdam(model, blocks, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                     switch_every=b.switch_every, order=b.order, state_policy=o.state_policy,
                     fixed_order=b.fixed_order, seed=cfg.seed, offload_dtype=o.offload_dtype, auto_switch=False,
                     local_moments=spec.local_moments, fused_backward=o.fused_backward,
                     moment_dtype=o.moment_dtype, no_decay=no_decay)


def _lora_block(model: nn.Module) -> list[str]:
    names = lora_param_names(model)
    if not names:
        raise ConfigError("method=dec_lora: the model has no LoRA adapters (it was not wrapped by "
                          "deca_ds.build.prepare_model)")
    return names


def topology_options(cfg: RunConfig) -> dict[str, Any]:
    """The graph-specific keyword arguments of :func:`deca_ds.topology.make_topology` for ``cfg.topology``."""
    t = cfg.topology
    if t.name == "erdos_renyi":
        return {"p": t.p}
    if t.name == "custom":
        return {"path": t.path}
    if t.name == "torus":
        return {k: v for k, v in (("rows", t.rows), ("cols", t.cols)) if v is not None}
    if t.name == "star" and t.center is not None:
        return {"center": t.center}
    return {}


def build_topology(cfg: RunConfig, num_clients: int):
    """The communication graph of ``num_clients`` clients that ``cfg.topology`` describes.

    Raises:
        ConfigError: the graph cannot be built (e.g. a custom file that does not fit ``num_clients``).
    """
    from deca_ds.topology import make_topology

    t = cfg.topology
    try:
        return make_topology(t.name, num_clients, seed=t.seed, weights=t.weights, **topology_options(cfg))
    except (ValueError, OSError) as e:
        raise ConfigError(f"topology.name={t.name!r}: {str(e).splitlines()[0]}") from None


def build_consensus_step(cfg: RunConfig, optimizer, mix: MixFn | None,
                         fused_backward_ok: bool = False) -> ConsensusStep:
    """DECA's between-steps hook around ``optimizer`` (a :class:`deca_ds.consensus.ConsensusOptimizer`).

    Args:
        cfg: the run's settings (``method``, ``deca.signal``, ``deca.betas``).
        optimizer: BlockAdam, or the ZeRO engine's view of its partitioned state.
        mix: the neighbour exchange; ignored (may be None) when the method does not gossip.
        fused_backward_ok: the caller's step supports ``optim.fused_backward`` (the optimizer steps inside
            backward): it calls :meth:`ConsensusStep.before_step` before backward, reads non-finite gradients from
            BlockAdam's ``nonfinite_in_backward()`` and neither clips nor checks gradients after backward (the stage-0
            engine and the per-client simulator do).

    Raises:
        ConfigError: ``optim.fused_backward=true`` and the caller's step does not support it (the Hugging Face
            Trainer integration: it snapshots, clips and checks gradients after backward).
    """
    if cfg.optim.fused_backward and not fused_backward_ok:
        raise ConfigError("optim.fused_backward=true is not supported by this training path (the Hugging Face "
                          "Trainer integration snapshots, clips and checks gradients after backward): use the launcher "
                          "or the per-client simulator, or set optim.fused_backward=false")
    spec = method_spec(cfg.method)
    return ConsensusStep(optimizer, cfg.method, mix=mix if spec.gossip else None, signal=cfg.deca.signal,
                         betas=cfg.deca.betas)

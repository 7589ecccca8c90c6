"""Memory planner: what fits on one GPU per client, before anything is launched.

Users pick deca_ds because full-parameter Adam does not fit their GPU. This module answers "does it fit, and with
which settings?" from a model's ``config.json`` alone: the model is built on the ``meta`` device (no weights, no
memory), partitioned into blocks exactly as training partitions it (:func:`deca_ds.build.partition_for`: the same
:func:`deca_ds.partition_blocks` call with the same :class:`deca_ds.config.BlocksConfig` the written recipe holds, so
the embeddings and LM head are blocks exactly when the recipe trains them), and the per-GPU bytes of full Adam
(DeepSpeed stages 0-3, with and without CPU offload) and of deca_ds are computed in closed form. The full-Adam
figures follow DeepSpeed's own estimators (``estimate_zero2_model_states_mem_needs`` in
``deepspeed/runtime/zero/stage_1_and_2.py`` and ``estimate_zero3_model_states_mem_needs`` in ``stage3.py``), which
the tests check against. Everything here is arithmetic on integers; nothing is allocated.

Formulas (Ψ parameters, L parameters of the largest block, N = ranks per client, w = bytes per weight):

* full Adam, mixed precision (DeepSpeed's accounting, 18 = 2 bf16 grads + 4 fp32 grads + 4 fp32 master + 8 m/v):
  stage 0: 2Ψ + 18Ψ; stage 1: 2Ψ + 2Ψ + 16Ψ/N; stage 2: 2Ψ + 18Ψ/N; stage 3: 4L' + 18Ψ/N (L' = largest module);
  offload (stages 1-3): the optimizer (and at stage 3 optionally the parameters) moves to CPU.
  fp32 weights (torch AdamW as users run it on CPU): 4Ψ weights + 4Ψ grads + 8Ψ m/v = 16Ψ.
* deca_ds: w·Ψ weights + w·L grads (active block only) + 4·L fp32 master (only when w < 4: fp32 weights *are* the
  master) + 8·L m/v, i.e. 2Ψ + 14L for bf16 and 4Ψ + 12L for fp32; plus gossip receive buffers, bounded by
  ``min(L·wire_bytes, chunk) × degree``. With ``state_policy: offload`` the inactive blocks' master and moments live in
  CPU memory (reported apart, never on the GPU); ``offload_dtype: int8`` stores the moments as 1 byte + one fp32
  absmax per 256 values (bitsandbytes blockwise, ``state_store.QUANT_BLOCKSIZE``), the master stays fp32.
* ``optim.fused_backward``: each active parameter is stepped inside backward and its gradient freed at once, so the
  block's gradients (w·L) are replaced by one tensor's, w·T (T = the largest tensor of a block).
* ``optim.moment_dtype: int8``: the block's m and sqrt(v) in bitsandbytes' 8-bit blockwise format, 2·L bytes of
  codes + 2 × 4 bytes per 256-value quantization block (S = Σ⌈n/256⌉ over the block's tensors) instead of 8·L; the
  step (and the consensus fold) decodes one tensor's m and v to fp32 at a time: 8·T bytes of scratch, not a model
  state but counted in the GPU total. With both: 2Ψ + 4L + 2L + 8S + 2T (bf16), 4Ψ + 2L + 8S + 4T (fp32). These are
  the tensors the benchmark worker counts (``deca_fused``, ``deca_fused_int8``; tested equal). The active block at
  the peak is the one whose figures are largest (:attr:`ModelShape.block_profiles`): with these settings a smaller
  block made of one huge tensor (an embedding) can cost more than the largest block.
* activations (see :func:`activation_bytes`): saved tensors of a Llama/Qwen decoder layer with memory-efficient
  attention (no s×s matrix), per token ``6h + 2h·kv/heads + 4f`` values in the weight dtype, plus the logits
  (``V`` per token: weight dtype + fp32 upcast + fp32 gradient). Upper bound: the active block is the lowest one,
  so every layer saves activations; backward stops at the active block, so visits to higher blocks need less.
  With activation checkpointing only each layer's input is kept, plus one layer's activations during recompute.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

from deca_ds.build import partition_for
from deca_ds.config import BlocksConfig, ConfigError, DecaConfig, OptimConfig, RunConfig
from deca_ds.optim.state_store import QUANT_BLOCKSIZE

GIB = 1024**3
MIB = 1024**2
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": MIB, "gib": GIB, "tib": 1024**4}
_WEIGHT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
INT8_BLOCKSIZE = QUANT_BLOCKSIZE
"""Values per fp32 absmax of deca_ds's 8-bit moments, offloaded (``offload_dtype``) or active (``moment_dtype``):
the block size ``deca_ds.optim.state_store.quantize`` passes to bitsandbytes' ``quantize_blockwise`` (256)."""
INT8_NEEDS = "needs bitsandbytes where it trains: pip install 'deca_ds[int8]'"
PRETRAINED_LR = 5e-5
"""Learning rate written for a pretrained model: ``OptimConfig.lr``'s default suits the embedded tiny model only (its
docstring: pretrained LLMs want ~1e-5 to 5e-5)."""
ROUNDS = 4
"""Rounds over all blocks in the written ``max_steps`` (the paper's T = 4)."""


def parse_bytes(text: str | int) -> int:
    """Parse a memory size such as ``24GiB``, ``80GB``, ``512MiB`` or ``1e9`` into bytes.

    Args:
        text: A number with an optional unit (``B``, ``KB``/``MB``/``GB``/``TB`` decimal, ``KiB``/``MiB``/``GiB``/
            ``TiB`` binary; a bare ``G`` is decimal). Case-insensitive.

    Returns:
        The size in bytes.

    Raises:
        ValueError: the text is not a size.
    """
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE]\+?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{text!r} is not a memory size: write e.g. 24GiB, 80GB or 512MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_bytes(n: float) -> str:
    """Human-readable binary size (``23.45 GiB``)."""
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


# ---------------------------------------------------------------------------------------------------------------
# Model shape: counts from a meta-device model.


@dataclass
class ModelShape:
    """What the planner needs to know about a model; built by :func:`inspect_model`.

    Attributes:
        params: Unique parameters Ψ (tied embeddings counted once).
        trainable_params: Parameters inside blocks (the rest stays frozen for the whole run).
        num_blocks: Blocks of the partition.
        largest_block_params: L, parameters of the largest block.
        largest_module_params: Largest single module (DeepSpeed's ZeRO-3 "largest layer").
        num_layers: Decoder layers.
        hidden_size: h.
        intermediate_size: f.
        num_attention_heads: Query heads.
        num_key_value_heads: Key/value heads (GQA).
        vocab_size: V.
        layers_per_block: Decoder layers per block used for the partition.
        include_embeddings: Whether the embeddings are a block (else frozen).
        include_lm_head: Whether the final norm and LM head are a block (else frozen).
        largest_block_name: Name of the largest block (``embeddings``, ``layers.3``, ``lm_head``).
        largest_tensor_params: T, the largest parameter tensor inside any block: the one gradient alive at a time
            with ``optim.fused_backward`` and the one tensor whose fp32 moments int8 moments decode at a time.
            0: unknown, bounded by the largest block.
        largest_block_scale_blocks: S, the most 256-value quantization blocks of one block, ``Σ⌈n/256⌉`` over its
            tensors (each tensor is quantized on its own), maximised over the blocks: int8 moments keep one fp32
            scale per quantization block and moment. 0: unknown (int8 moments cannot be planned).
        block_profiles: ``(name, parameters, largest tensor, quantization blocks)`` of every block: the memory of
            the active block is the largest over them (with the fused step and int8 moments it need not be the
            largest block's: one huge tensor, such as an embedding, costs 8 bytes per value of scratch). Empty:
            only the maxima above are known, and their sum is used (an upper bound).
    """

    params: int
    trainable_params: int
    num_blocks: int
    largest_block_params: int
    largest_module_params: int
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    layers_per_block: int = 1
    include_embeddings: bool = False
    include_lm_head: bool = False
    largest_block_name: str = ""
    largest_tensor_params: int = 0
    largest_block_scale_blocks: int = 0
    block_profiles: list[tuple[str, int, int, int]] = field(default_factory=list)


def build_meta_model(model_dir: str):
    """Build a causal LM from ``model_dir/config.json`` on the meta device: shapes only, no weights, no memory.

    Args:
        model_dir: A directory holding a Hugging Face ``config.json`` (e.g. ``recipes/models/llama-3.1-8b``).

    Returns:
        The ``transformers`` model whose parameters live on ``torch.device("meta")``.
    """
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"--model {model_dir!r} has no config.json: give a Hugging Face model directory "
                                f"(e.g. recipes/models/llama-3.1-8b)")
    try:  # transformers' config validation (huggingface_hub >= 0.33); absent in older hubs, which never raise it
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # pragma: no cover - depends on the installed huggingface_hub
        StrictDataclassError = ValueError  # noqa: N806

    from deca_ds.models import build_meta_model as _build

    try:
        return _build(model_dir)
    except (OSError, ValueError, StrictDataclassError) as e:
        # Not JSON, an unknown model_type, or values transformers' config validation refuses (its message is a
        # header line, then the reason): one line, the reason, not a traceback.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        reason = lines[-1] if isinstance(e, StrictDataclassError) else lines[0]
        raise ValueError(f"--model {model_dir!r}: its config.json cannot be read ({reason[:200]}): give a Hugging "
                         f"Face model directory (e.g. recipes/models/llama-3.1-8b)") from None


MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
"""Config fields that name a mixture-of-experts model's experts (Mixtral, Qwen2-MoE, DeepSeek, ...)."""


def check_model_config(model, model_dir: str, seq_len: int) -> None:
    """Refuse a model the planner cannot plan, or a ``--seq-len`` the written recipe's run would refuse.

    Args:
        model: The meta model built from ``model_dir`` (:func:`build_meta_model`).
        model_dir: The ``--model`` directory, named in the messages.
        seq_len: ``--seq-len``.

    Raises:
        ValueError: one line naming the problem and the fix: a mixture-of-experts model (the activation bound
            assumes one dense MLP per token, and a token routed to k experts saves about k times its
            activations), a ``vocab_size`` below 1, or ``seq_len`` beyond the model's positions (the run's
            ``data.max_length`` check, :func:`deca_ds.models.check_lengths`).
    """
    from deca_ds.data.formatting import position_limit

    text = model.config.get_text_config()
    for key in MOE_KEYS:
        experts = getattr(text, key, None)
        if isinstance(experts, int) and experts > 1:
            raise ValueError(f"--model {model_dir!r}: mixture-of-experts models ({key}={experts}) are not "
                             "supported by the planner: its activation bound assumes one dense MLP per token and "
                             "would understate a routed model's; measure its peak memory on a short run instead")
    vocab = getattr(text, "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 1:
        raise ValueError(f"--model {model_dir!r}: config.json has vocab_size={vocab!r}: set it to the tokenizer's "
                         "vocabulary size (an integer >= 1)")
    limit = position_limit(model.config)
    if limit is not None and seq_len > limit:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings={limit}, which a run "
                         f"refuses (data.max_length): use --seq-len {limit} or less")


def _intermediate_size(cfg) -> int:
    """The MLP width under the names configs give it (Llama-style ``intermediate_size``, GPT-2 ``n_inner``, OPT
    ``ffn_dim``, Falcon ``ffn_hidden_size``); 4 x hidden when unset, those architectures' default."""
    for name in ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size"):
        value = getattr(cfg, name, None)
        if value:
            return int(value)
    return 4 * cfg.hidden_size


def inspect_model(model, blocks: BlocksConfig | None = None) -> ModelShape:
    """Count a model's parameters and partition it into blocks as a recipe with these ``blocks`` settings trains it.

    Args:
        model: A causal LM (meta device is fine).
        blocks: The recipe's ``blocks`` section; default: the recipe defaults (:class:`deca_ds.config.BlocksConfig`,
            which trains the embeddings and the LM head).

    Returns:
        The :class:`ModelShape`.
    """
    blocks = blocks or BlocksConfig()
    named = dict(model.named_parameters())  # deduplicates tied weights
    part = partition_for(model, blocks)
    tensors = [[named[n].numel() for n in b.param_names if n in named] for b in part.blocks]
    sizes = [sum(t) for t in tensors]
    largest = max(range(len(sizes)), key=sizes.__getitem__)
    scales = [sum(-(-n // QUANT_BLOCKSIZE) for n in t) for t in tensors]  # each tensor is quantized on its own
    profiles = [(b.name, n, max(t, default=0), q) for b, n, t, q in zip(part.blocks, sizes, tensors, scales)]
    largest_module = 0
    for module in model.modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        largest_module = max(largest_module, own)
    cfg = model.config.get_text_config()  # a multimodal config keeps the language model's in text_config
    heads = cfg.num_attention_heads
    return ModelShape(
        params=sum(p.numel() for p in named.values()),
        trainable_params=sum(sizes),
        num_blocks=len(sizes),
        largest_block_params=max(sizes),
        largest_module_params=largest_module,
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        intermediate_size=_intermediate_size(cfg),
        num_attention_heads=heads,
        num_key_value_heads=getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "num_kv_heads", None) or heads,
        vocab_size=cfg.vocab_size,
        layers_per_block=blocks.layers_per_block,
        include_embeddings=blocks.include_embeddings,
        include_lm_head=blocks.include_lm_head,
        largest_block_name=part.blocks[largest].name,
        largest_tensor_params=max((p[2] for p in profiles), default=0),
        largest_block_scale_blocks=max(scales, default=0),
        block_profiles=profiles,
    )


# ---------------------------------------------------------------------------------------------------------------
# Closed forms.


def full_adam_bytes(params: int, stage: int, ranks: int = 1, offload: bool = False, offload_params: bool = False,
                    largest_module_params: int = 0, dtype: str = "bf16") -> dict[str, int]:
    """Per-GPU model-state bytes of full-parameter Adam under DeepSpeed, and the CPU bytes it needs.

    GPU figures equal DeepSpeed's ``estimate_zero2_model_states_mem_needs`` (stages 1-2, and stage 0 as stage 2 on
    one rank) and ``estimate_zero3_model_states_mem_needs`` (stage 3, ``zero_init=True``) with
    ``additional_buffer_factor=1.5`` for the CPU side. Stage 1 keeps the bf16 gradients whole (2Ψ + 2Ψ + 16Ψ/N).

    Args:
        params: Ψ.
        stage: ZeRO stage 0-3.
        ranks: Ranks sharing one client's ZeRO partition (the client's data-parallel group, not the world).
        offload: ``offload_optimizer: cpu`` (stages 1-3 only).
        offload_params: ``offload_param: cpu`` (stage 3 only).
        largest_module_params: Largest single module, for stage 3's gathered-parameter working set.
        dtype: ``bf16``/``fp16`` (mixed precision, DeepSpeed) or ``fp32`` (plain AdamW: 4Ψ weights, 4Ψ grads,
            8Ψ moments; stage 0 only).

    Returns:
        ``{"gpu": bytes, "cpu": bytes}``.
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"stage={stage!r}: DeepSpeed ZeRO stages are 0, 1, 2, 3")
    if offload and stage == 0:
        raise ValueError("offload_optimizer needs ZeRO stage 1, 2 or 3 (DeepSpeed has no stage-0 offload)")
    if offload_params and stage != 3:
        raise ValueError("offload_param exists only at ZeRO stage 3")
    if dtype == "fp32":
        if stage != 0 or offload:
            raise ValueError("the fp32 full-Adam figure is plain torch AdamW (stage 0, no offload)")
        return {"gpu": 16 * params, "cpu": 0}
    n = ranks
    if stage in (0, 1, 2):
        if offload:
            return {"gpu": 2 * params, "cpu": int(params * max(4 * n, 16) * 1.5)}
        if stage == 0:
            return {"gpu": 2 * params + 18 * params, "cpu": int(params * 4 * n * 1.5)}
        if stage == 1:
            return {"gpu": 2 * params + 2 * params + int(16 * params / n), "cpu": int(params * 4 * n * 1.5)}
        return {"gpu": 2 * params + int(18 * params / n), "cpu": int(params * 4 * n * 1.5)}
    largest = 4 * largest_module_params
    if offload and offload_params:
        return {"gpu": largest, "cpu": int(params * 18 * 1.5)}
    if offload:
        return {"gpu": largest + int(2 * params / n), "cpu": int(params * 16 * 1.5)}
    return {"gpu": largest + int(18 * params / n), "cpu": int(largest_module_params * 4 * n * 1.5)}


def deca_state_bytes(params: int, block_params: int, dtype: str = "bf16", state_policy: str = "reset",
                     offload_dtype: str = "fp32", trainable_params: int | None = None, degree: int = 2,
                     gossip_wire_bytes: int = 4, gossip_chunk_bytes: int = 64 * MIB, fused_backward: bool = False,
                     moment_dtype: str = "fp32", largest_tensor_params: int | None = None,
                     moment_scale_blocks: int | None = None) -> dict[str, int]:
    """Per-GPU model-state bytes of deca_ds, by category, plus the CPU bytes of offloaded block state.

    The categories are the tensors the benchmark worker counts (``deca_ds.bench.worker``): ``weights`` its
    ``weight_bytes``, ``grads`` its ``grad_bytes``, ``master + moments`` its ``optimizer_state_bytes`` (0-d step
    counters left out, as there) and ``moment_scratch`` its ``moment_scratch_bytes``.

    Args:
        params: Ψ.
        block_params: L, the active block (the largest one for the usual bound).
        dtype: Weight dtype on the device (``bf16``, ``fp16`` or ``fp32``).
        state_policy: ``reset`` (inactive state dropped) or ``offload`` (kept in CPU memory).
        offload_dtype: ``fp32`` or ``int8`` storage of offloaded moments.
        trainable_params: Parameters in all blocks (default Ψ); the offloaded state covers these minus L.
        degree: Neighbours of a client in the gossip graph (largest degree for irregular graphs).
        gossip_wire_bytes: Bytes per exchanged element (4 fp32, 2 bf16).
        gossip_chunk_bytes: Receive buffer per neighbour is ``min(L·wire_bytes, chunk)``.
        fused_backward: ``optim.fused_backward``: one tensor's gradient (``largest_tensor_params``) instead of the
            block's.
        moment_dtype: ``optim.moment_dtype``: ``fp32`` (8 bytes per parameter) or ``int8`` (2 bytes per parameter
            + 8 bytes per quantization block, and 8 bytes per value of one tensor's fp32 scratch).
        largest_tensor_params: T, the block's largest tensor; ``None``: L, an upper bound.
        moment_scale_blocks: S, the block's 256-value quantization blocks, ``Σ⌈n/256⌉`` over its tensors;
            required for ``moment_dtype="int8"``.

    Returns:
        Dict with ``weights``, ``grads``, ``master``, ``moments`` (int8: codes and scales), ``moment_scales`` (the
        scales' part of ``moments``), ``model_states`` (weights + grads + master + moments, on the GPU),
        ``moment_scratch`` (GPU, apart: a temporary, not a model state), ``gossip_buffers`` (GPU, apart) and
        ``cpu_offload`` (CPU).

    Raises:
        ValueError: an unknown ``moment_dtype``, or ``int8`` without ``moment_scale_blocks``.
    """
    w = _WEIGHT_BYTES[dtype]
    trainable = params if trainable_params is None else trainable_params
    tensor = block_params if largest_tensor_params is None else largest_tensor_params
    master_per = 0 if w == 4 else 4  # fp32 weights are the master: no second copy
    if moment_dtype == "fp32":
        moments, scales, scratch = 8 * block_params, 0, 0
    elif moment_dtype == "int8":
        if not moment_scale_blocks:
            raise ValueError("moment_dtype=int8 needs moment_scale_blocks (ModelShape.largest_block_scale_blocks, "
                             "from inspect_model): the scales are counted per tensor")
        # m and sqrt(v): 1 byte per value each, plus one fp32 absmax per quantization block each.
        scales = 2 * 4 * moment_scale_blocks
        moments = 2 * block_params + scales
        # The step decodes one tensor's m and v to fp32 (BlockAdam._step_chunk: chunks capped at the largest tensor).
        scratch = 8 * tensor
    else:
        raise ValueError(f"moment_dtype={moment_dtype!r}: use fp32 or int8")
    out = {
        "weights": w * params,
        # Fused: each gradient is freed by its hook before the next one is accumulated; one tensor's is alive.
        "grads": w * (tensor if fused_backward else block_params),
        "master": master_per * block_params,
        "moments": moments,
        "moment_scales": scales,
    }
    out["model_states"] = out["weights"] + out["grads"] + out["master"] + out["moments"]
    out["moment_scratch"] = scratch
    out["gossip_buffers"] = degree * min(block_params * gossip_wire_bytes, gossip_chunk_bytes)
    inactive = max(trainable - block_params, 0)
    if state_policy == "reset":
        out["cpu_offload"] = 0
    elif state_policy == "offload":
        # 8-bit active moments are offloaded as they are (state_store keeps their format).
        eight_bit = offload_dtype == "int8" or moment_dtype == "int8"
        per_moment = 1 + 4 / INT8_BLOCKSIZE if eight_bit else 4
        out["cpu_offload"] = int(inactive * (master_per + 2 * per_moment))
    else:
        raise ValueError(f"state_policy={state_policy!r}: use reset or offload")
    return out


def layer_activation_bytes(shape: ModelShape, seq_len: int, micro_batch: int, act_bytes: int) -> int:
    """Bytes saved for backward by one decoder layer (memory-efficient attention, no s×s scores).

    Per token: layer input, normed input, q, k, v (GQA: ``h·kv/heads`` each), attention output, post-attention
    residual, normed residual (6h + 2h·kv/heads) and the MLP's gate, up, silu(gate) and product (4f).

    Args:
        shape: The model's shape.
        seq_len: Tokens per sequence.
        micro_batch: Sequences per micro-batch.
        act_bytes: Bytes per activation value (the weight dtype).

    Returns:
        Bytes.
    """
    h, f = shape.hidden_size, shape.intermediate_size
    kv = h * shape.num_key_value_heads // shape.num_attention_heads
    return micro_batch * seq_len * (6 * h + 2 * kv + 4 * f) * act_bytes


def activation_bytes(shape: ModelShape, seq_len: int, micro_batch: int, act_bytes: int = 2,
                     checkpointing: bool = False) -> int:
    """Peak activation bytes of one training step (upper bound: the lowest block is active).

    Args:
        shape: The model's shape.
        seq_len: Tokens per sequence.
        micro_batch: Sequences per micro-batch.
        act_bytes: Bytes per activation value.
        checkpointing: Non-reentrant activation checkpointing per decoder layer.

    Returns:
        Bytes: the layers' saved tensors (all layers, or with checkpointing the layer inputs plus one layer
        recomputed) plus the logits (weight dtype, fp32 upcast for the loss, and its fp32 gradient).
    """
    tokens = micro_batch * seq_len
    per_layer = layer_activation_bytes(shape, seq_len, micro_batch, act_bytes)
    if checkpointing:
        layers = shape.num_layers * tokens * shape.hidden_size * act_bytes + per_layer
    else:
        layers = shape.num_layers * per_layer
    logits = tokens * shape.vocab_size * (act_bytes + 4 + 4)
    return layers + logits


def ring_degree(num_clients: int, topology: str = "ring") -> int:
    """Largest neighbour count of a client for the named graph (gossip buffers scale with it).

    Args:
        num_clients: Clients in the graph.
        topology: ``ring``, ``complete``, ``star`` (the hub), ``torus`` (4 on a 2-D torus of ≥ 9),
            ``exponential`` (⌈log2 n⌉) or ``one_peer_exponential`` (1). Random or custom graphs need an explicit
            degree.

    Returns:
        The degree.
    """
    n = num_clients
    if n <= 1:
        return 0
    table = {
        "ring": 1 if n == 2 else 2,
        "complete": n - 1,
        "star": n - 1,
        "torus": min(4, n - 1),
        "exponential": min(n - 1, math.ceil(math.log2(n))),
        "one_peer_exponential": 1,
    }
    if topology not in table:
        raise ValueError(f"topology {topology!r} has no fixed degree: pass --max-degree for random/custom graphs")
    return table[topology]


# ---------------------------------------------------------------------------------------------------------------
# A plan.


@dataclass
class PlanRequest:
    """What the user asked the planner (one CLI invocation)."""

    gpu_memory: int
    seq_len: int = 2048
    micro_batch: int = 1
    clients: int = 8
    ranks_per_client: int = 1
    layers_per_block: int | None = None
    """Decoder layers per block; ``None``: the recipe default (``BlocksConfig.layers_per_block``)."""
    include_embeddings: bool | None = None
    """Train the embeddings as a block; ``None``: the recipe default, which the search turns off only when nothing
    else fits."""
    include_lm_head: bool | None = None
    """Train the final norm and LM head as a block; ``None`` as for ``include_embeddings``."""
    state_policy: str = "offload"
    offload_dtype: str = "fp32"
    activation_checkpointing: bool = False
    dtype: str = "bf16"
    topology: str = "ring"
    max_degree: int | None = None
    gossip_chunk_mb: float = 64.0
    overhead: int = GIB
    """Bytes set aside for the CUDA context, kernels' workspaces and allocator fragmentation."""
    fused_backward: bool | None = None
    """``optim.fused_backward``; ``None``: off as asked, turned on by the search when the request does not fit and
    the written settings allow it (:func:`fused_refusal`)."""
    moment_dtype: str | None = None
    """``optim.moment_dtype`` (``fp32``/``int8``); ``None``: fp32 as asked, int8 tried by the search as for
    ``fused_backward`` (:func:`int8_refusal`)."""

    def command_flags(self) -> list[str]:
        """The ``deca-ds plan`` flags that ask for this request: ``--gpu-memory`` and ``--seq-len``, then every
        other setting that differs from its default (the CLI's defaults are this class's)."""
        flags = [f"--gpu-memory {self.gpu_memory / GIB:g}GiB", f"--seq-len {self.seq_len}"]
        defaults = PlanRequest(gpu_memory=self.gpu_memory)
        for name in ("micro_batch", "clients", "ranks_per_client", "layers_per_block", "include_embeddings",
                     "include_lm_head", "state_policy", "offload_dtype", "activation_checkpointing", "dtype",
                     "topology", "max_degree", "gossip_chunk_mb", "overhead", "fused_backward", "moment_dtype"):
            value = getattr(self, name)
            if value == getattr(defaults, name):
                continue
            flag = "--" + name.replace("_", "-")
            if name == "overhead":
                flags.append(f"{flag} {value / GIB:g}GiB")
            elif isinstance(value, bool):
                flags.append(flag if value else (f"--no-{flag[2:]}" if name != "activation_checkpointing" else ""))
            else:
                flags.append(f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}")
        return [f for f in flags if f]

    def fused(self) -> bool:
        """Whether this request steps inside backward (``None`` counts as off)."""
        return bool(self.fused_backward)

    def moments(self) -> str:
        """The active block's moment storage of this request (``None`` counts as fp32)."""
        return self.moment_dtype or "fp32"

    def blocks(self) -> BlocksConfig:
        """The recipe's ``blocks`` section for this request: the project's defaults, with this request's choices."""
        d = BlocksConfig()
        return replace(
            d,
            layers_per_block=d.layers_per_block if self.layers_per_block is None else self.layers_per_block,
            include_embeddings=d.include_embeddings if self.include_embeddings is None else self.include_embeddings,
            include_lm_head=d.include_lm_head if self.include_lm_head is None else self.include_lm_head,
        )


@dataclass
class Plan:
    """Result of :func:`make_plan`; ``to_dict`` is the ``--json`` output.

    ``recommended_request`` is the request whose settings fit (``None`` if nothing fits); ``--write`` writes exactly
    its settings, and ``recommended`` summarises it (its blocks are those of the written recipe).
    """

    request: PlanRequest
    shape: ModelShape
    full_adam: list[dict[str, Any]]
    deca: dict[str, int]
    activation_bytes: int
    deca_total_bytes: int
    fits: bool
    full_adam_fits: bool
    recommended: dict[str, Any] = field(default_factory=dict)
    recommended_request: PlanRequest | None = None

    def to_dict(self) -> dict[str, Any]:
        """Flat summary first (the keys users script against), then the details."""
        return {
            "params": self.shape.params,
            "trainable_params": self.shape.trainable_params,
            "num_blocks": self.shape.num_blocks,
            "largest_block_params": self.shape.largest_block_params,
            "largest_block_name": self.shape.largest_block_name,
            "full_adam_model_state_bytes": self.full_adam[0]["gpu_bytes"],
            "deca_model_state_bytes": self.deca["model_states"],
            "gossip_buffer_bytes": self.deca["gossip_buffers"],
            "moment_scratch_bytes": self.deca["moment_scratch"],
            "cpu_offload_bytes": self.deca["cpu_offload"],
            "activation_bytes": self.activation_bytes,
            "deca_total_bytes": self.deca_total_bytes,
            "gpu_memory_bytes": self.request.gpu_memory,
            "fits": self.fits,
            "full_adam_fits": self.full_adam_fits,
            "deca_breakdown": self.deca,
            "full_adam": self.full_adam,
            "shape": asdict(self.shape),
            "request": asdict(self.request),
            "recommended": self.recommended,
        }


def fused_refusal(req: PlanRequest) -> str | None:
    """Why the recipe the planner writes for ``req`` cannot use ``optim.fused_backward`` (``None``: it can).

    The written ds_config always has ``gradient_accumulation_steps: 1`` and ZeRO stage 0 for a one-rank client, and
    with the fused step ``gradient_clipping: 0`` (:func:`recommended_ds_config`); what is left to refuse
    (``deca_ds.config._check_fused_backward``, ``deca_ds.ds_config._check_fused_backward``) is a client of several
    ranks (written with ZeRO-2, and its ranks average each gradient before the step) and the project defaults the
    recipe inherits (``method``, ``nan_policy``).
    """
    defaults = RunConfig()
    if req.ranks_per_client > 1:
        return (f"optim.fused_backward needs clients.ranks_per_client=1 (got {req.ranks_per_client}): a client's "
                "ranks average each gradient before the step, and the plan writes ZeRO-2 for them")
    if defaults.method == "centralized":
        return "optim.fused_backward does not apply to method=centralized (a data-parallel gradient average)"
    if defaults.nan_policy == "skip":
        return "optim.fused_backward cannot skip a step after the fact, and the default nan_policy is skip"
    return None


def int8_refusal(req: PlanRequest) -> str | None:
    """Why the recipe the planner writes for ``req`` cannot use ``optim.moment_dtype=int8`` (``None``: it can).

    8-bit moments are BlockAdam's: refused under ZeRO stages 1-3, which the plan writes for a client of several
    ranks (``deca_ds.ds_config.check_ds_config``). bitsandbytes is checked where the run starts (its preflight), not
    here: the plan may be made on another machine.
    """
    if req.ranks_per_client > 1:
        return (f"optim.moment_dtype=int8 needs ZeRO stage 0, and the plan writes ZeRO-2 for a client of "
                f"{req.ranks_per_client} ranks (DeepSpeed's AdamW then holds the moments)")
    return None


def check_request(req: PlanRequest) -> None:
    """Refuse a request that asks for settings its written recipe could not run.

    Raises:
        ConfigError: ``fused_backward=True`` or ``moment_dtype="int8"`` where :func:`fused_refusal` /
            :func:`int8_refusal` say no, or an unknown ``moment_dtype``; one line naming the setting and the fix.
    """
    if req.moment_dtype not in (None, "fp32", "int8"):
        raise ConfigError(f"--moment-dtype {req.moment_dtype!r} is not known: use fp32 or int8")
    why = fused_refusal(req) if req.fused_backward else None
    if why:
        raise ConfigError(f"--fused-backward: {why}; drop --fused-backward")
    why = int8_refusal(req) if req.moment_dtype == "int8" else None
    if why:
        raise ConfigError(f"--moment-dtype int8: {why}; use --moment-dtype fp32 or --ranks-per-client 1")


def _evaluate(shape: ModelShape, req: PlanRequest) -> tuple[dict[str, Any], int, int]:
    """The deca_ds breakdown of the block whose GPU bytes are largest (``deca["block"]`` names it), the activation
    bound and the GPU total."""
    degree = req.max_degree if req.max_degree is not None else ring_degree(req.clients, req.topology)
    profiles = shape.block_profiles or [(shape.largest_block_name, shape.largest_block_params,
                                         shape.largest_tensor_params or shape.largest_block_params,
                                         shape.largest_block_scale_blocks)]
    deca: dict[str, Any] = {}
    gpu = -1
    for name, n, tensor, scale_blocks in profiles:  # ties: the first (the embeddings before a layer)
        d: dict[str, Any] = deca_state_bytes(
            shape.params, n, req.dtype, req.state_policy, req.offload_dtype, shape.trainable_params, degree,
            gossip_chunk_bytes=int(req.gossip_chunk_mb * MIB), fused_backward=req.fused(),
            moment_dtype=req.moments(), largest_tensor_params=tensor, moment_scale_blocks=scale_blocks or None)
        this = d["model_states"] + d["moment_scratch"] + d["gossip_buffers"]
        if this > gpu:
            deca, gpu = {**d, "block": name}, this
    act = activation_bytes(shape, req.seq_len, req.micro_batch, _WEIGHT_BYTES[req.dtype],
                           req.activation_checkpointing)
    # The int8 scratch lives during the step, which the fused step runs inside backward (activations alive): added.
    total = deca["model_states"] + deca["moment_scratch"] + deca["gossip_buffers"] + act + req.overhead
    return deca, act, total


def full_adam_table(shape: ModelShape, req: PlanRequest) -> list[dict[str, Any]]:
    """Full Adam at stages 0-3 with and without offload for the client layout, with activations and a verdict.

    Full Adam trains every layer, so its activations are the same upper bound as deca's (lowest block active).
    """
    act = activation_bytes(shape, req.seq_len, req.micro_batch, _WEIGHT_BYTES[req.dtype],
                           req.activation_checkpointing)
    rows = []
    dtype = "bf16" if req.dtype != "fp32" else "fp32"
    settings = [(0, False, False), (1, False, False), (2, False, False), (3, False, False),
                (1, True, False), (2, True, False), (3, True, False), (3, True, True)]
    if dtype == "fp32":
        settings = [(0, False, False)]
    for stage, off, off_p in settings:
        b = full_adam_bytes(shape.params, stage, req.ranks_per_client, off, off_p, shape.largest_module_params,
                            dtype)
        label = f"zero{stage}" + ("+offload_optimizer" if off else "") + ("+offload_param" if off_p else "")
        total = b["gpu"] + act + req.overhead
        rows.append({"setting": label, "stage": stage, "offload_optimizer": off, "offload_param": off_p,
                     "gpu_bytes": b["gpu"], "cpu_bytes": b["cpu"], "total_gpu_bytes": total,
                     "fits": total <= req.gpu_memory})
    return rows


def _candidates(req: PlanRequest) -> list[PlanRequest]:
    """The request, then each structural relaxation added to the previous ones, in the search order of
    :func:`make_plan` (the memory settings of :func:`_memory_settings` are tried within each)."""
    out = [req]
    cur = req
    if not cur.activation_checkpointing:
        cur = replace(cur, activation_checkpointing=True)
        out.append(cur)
    for lpb in range(cur.blocks().layers_per_block - 1, 0, -1):
        cur = replace(cur, layers_per_block=lpb)
        out.append(cur)
    if cur.micro_batch > 1:
        cur = replace(cur, micro_batch=1)
        out.append(cur)
    # Last resort, and only when the user left them to the defaults: freeze the embeddings, then the head too (a
    # large vocabulary makes each of them the largest block: 525M parameters for Llama-3.1-8B's 128k tokens).
    if req.include_embeddings is None and cur.blocks().include_embeddings:
        cur = replace(cur, include_embeddings=False)
        out.append(cur)
    if req.include_lm_head is None and cur.blocks().include_lm_head:
        cur = replace(cur, include_lm_head=False)
        out.append(cur)
    return out


def _memory_settings(req: PlanRequest) -> list[dict[str, Any]]:
    """The memory settings the search may turn on for ``req``, cheapest in speed first.

    Both come before activation checkpointing. The fused step costs no time (the same arithmetic, tensor by tensor,
    inside backward; bit-identical results) and gives up only gradient clipping, which it refuses. 8-bit moments add
    one decode and encode of each tensor's moments per step and per consensus fold, elementwise O(L) work against the
    step's O(L x tokens) matmuls, and approximate the moments within the code map's spacing. Checkpointing recomputes
    every layer's forward (about a third more compute per step). Each is tried only when the user left it open
    (``None``) and where the recipe written for it runs (:func:`fused_refusal`, :func:`int8_refusal`).
    """
    out: list[dict[str, Any]] = []
    if req.fused_backward is None and fused_refusal(req) is None:
        out.append({"fused_backward": True})
    if req.moment_dtype is None and int8_refusal(req) is None:
        out.append({"moment_dtype": "int8"})
    return out


def make_plan(shape_for: Callable[[BlocksConfig], ModelShape], req: PlanRequest) -> Plan:
    """Evaluate the requested settings and, if they do not fit, search for settings that do.

    Search order (first that fits wins): the request as given, then activation checkpointing, fewer layers per block
    (down to 1), micro-batch 1 and, only for settings the user left to the recipe defaults, the embeddings frozen,
    then the LM head frozen too, each keeping the previous ones. At each of these, first as it stands, then with
    ``optim.fused_backward``, then with ``optim.moment_dtype=int8`` as well (:func:`_memory_settings`), each kept
    only where it lowers the GPU total: the fused step saves nothing for a block of one tensor, and 8-bit moments
    cost more than they save when a block's largest tensor is most of it (the step's fp32 scratch is 8 bytes per
    value of that tensor, the saving 6 bytes per value of the block).

    Args:
        shape_for: ``BlocksConfig -> ModelShape`` (the partition depends on the blocks settings).
        req: The request.

    Returns:
        The :class:`Plan` for the request, with ``recommended``/``recommended_request`` holding the settings that fit
        (empty/``None`` if none).

    Raises:
        ConfigError: the request asks for a setting its recipe could not run (:func:`check_request`).
    """
    check_request(req)
    shape = shape_for(req.blocks())
    deca, act, total = _evaluate(shape, req)
    table = full_adam_table(shape, req)
    plan = Plan(req, shape, table, deca, act, total, total <= req.gpu_memory, any(r["fits"] for r in table))
    wanted = req.blocks()
    unfrozen_total = None  # what training every requested block needs, at the last settings tried before freezing
    for level in _candidates(req):
        blocks = level.blocks()
        s = shape if blocks == wanted else shape_for(blocks)
        frozen = (blocks.include_embeddings, blocks.include_lm_head) != (wanted.include_embeddings,
                                                                         wanted.include_lm_head)
        cand, t = level, _evaluate(s, level)[2]
        fits = t <= cand.gpu_memory
        for setting in _memory_settings(req):
            if fits:
                break
            nxt = replace(cand, **setting)
            t_nxt = _evaluate(s, nxt)[2]
            if t_nxt < t:  # never recommend a setting that saves nothing here
                cand, t = nxt, t_nxt
                fits = t <= cand.gpu_memory
        if not frozen:
            unfrozen_total = t
        if fits:
            # Fewest changes: a setting turned on above that the fit no longer needs (the one turned on later may
            # have moved the peak to another block) is dropped again, the later one first.
            for setting in reversed(_memory_settings(req)):
                key = next(iter(setting))
                if getattr(cand, key) == setting[key]:
                    back = replace(cand, **{key: getattr(req, key)})
                    t_back = _evaluate(s, back)[2]
                    if t_back <= back.gpu_memory:
                        cand, t = back, t_back
            plan.recommended_request = cand
            plan.recommended = {"layers_per_block": blocks.layers_per_block,
                                "include_embeddings": blocks.include_embeddings,
                                "include_lm_head": blocks.include_lm_head, "micro_batch": cand.micro_batch,
                                "activation_checkpointing": cand.activation_checkpointing,
                                "state_policy": cand.state_policy, "offload_dtype": cand.offload_dtype,
                                "fused_backward": cand.fused(), "moment_dtype": cand.moments(),
                                "gradient_clipping": _clipping(cand),
                                "total_gpu_bytes": t, "num_blocks": s.num_blocks,
                                "largest_block_params": s.largest_block_params,
                                "largest_block_name": s.largest_block_name,
                                "trainable_params": s.trainable_params, "frozen_params": s.params - s.trainable_params}
            if frozen:
                plan.recommended["unfrozen_total_gpu_bytes"] = unfrozen_total
            # What each memory setting the search turned on saves at the recommended settings (the plan says so).
            if cand.fused() and not req.fused():
                plan.recommended["fused_backward_saves_bytes"] = _evaluate(
                    s, replace(cand, fused_backward=False))[2] - t
            if cand.moments() == "int8" and req.moments() != "int8":
                plan.recommended["moment_dtype_int8_saves_bytes"] = _evaluate(
                    s, replace(cand, moment_dtype="fp32"))[2] - t
            break
    return plan


def plan_from_model_dir(model_dir: str, req: PlanRequest) -> Plan:
    """Build the meta model from ``model_dir/config.json`` and plan for it (see :func:`make_plan`).

    Args:
        model_dir: A Hugging Face model directory (only its ``config.json`` is read).
        req: The request.

    Returns:
        The :class:`Plan`.

    Raises:
        FileNotFoundError: no ``config.json`` in ``model_dir``.
        ValueError: an unreadable ``config.json``, or a model or ``seq_len`` refused by :func:`check_model_config`;
            one line naming the problem and the fix.
    """
    model = build_meta_model(model_dir)
    check_model_config(model, model_dir, req.seq_len)
    cache: dict[tuple, ModelShape] = {}

    def shape_for(blocks: BlocksConfig) -> ModelShape:
        key = (blocks.layers_per_block, blocks.include_embeddings, blocks.include_lm_head,
               tuple(blocks.prefixes or ()))
        if key not in cache:
            cache[key] = inspect_model(model, blocks)
        return cache[key]

    return make_plan(shape_for, req)


# ---------------------------------------------------------------------------------------------------------------
# Output.


def _blocks_text(s: ModelShape) -> str:
    layer_blocks = s.num_blocks - s.include_embeddings - s.include_lm_head
    parts = (["embeddings"] if s.include_embeddings else []) + [f"{layer_blocks} x {s.layers_per_block} layer(s)"] + \
        (["lm_head"] if s.include_lm_head else [])
    frozen = [n for n, on in (("embeddings", s.include_embeddings), ("LM head", s.include_lm_head)) if not on]
    return (f"{s.num_blocks} blocks ({' + '.join(parts)}), largest {s.largest_block_name} "
            f"{s.largest_block_params / 1e6:.1f}M params" + (f"; frozen: {', '.join(frozen)}" if frozen else ""))


def format_plan(plan: Plan) -> str:
    """Plain-text report: the model, full Adam per stage, deca_ds by category, the verdict."""
    s, r, d = plan.shape, plan.request, plan.deca
    lines = [
        f"model: {s.params / 1e9:.3f}B params, {s.num_layers} layers; {_blocks_text(s)}",
        f"per GPU: {format_bytes(r.gpu_memory)}; seq_len {r.seq_len}, micro-batch {r.micro_batch}, {r.dtype} "
        f"weights, activation checkpointing {'on' if r.activation_checkpointing else 'off'}, "
        f"{r.clients} clients x {r.ranks_per_client} rank(s); overhead {format_bytes(r.overhead)}",
        f"activations (upper bound): {format_bytes(plan.activation_bytes)}",
        "",
        "full-parameter Adam (DeepSpeed):",
        f"  {'setting':40s} {'GPU states':>12s} {'CPU':>12s} {'GPU total':>12s}  fits",
    ]
    for row in plan.full_adam:
        lines.append(f"  {row['setting']:40s} {format_bytes(row['gpu_bytes']):>12s} "
                     f"{format_bytes(row['cpu_bytes']):>12s} {format_bytes(row['total_gpu_bytes']):>12s}  "
                     f"{'yes' if row['fits'] else 'no'}")
    grads = "one tensor's grad (fused step)" if r.fused() else "block grads"
    moments = "block m,v (int8 + scales)" if r.moments() == "int8" else "block m,v"
    lines += [
        "",
        f"deca_ds (state_policy {r.state_policy}, offload_dtype {r.offload_dtype}, fused_backward "
        f"{str(r.fused()).lower()}, moment_dtype {r.moments()}):",
        f"  weights {format_bytes(d['weights'])} + {grads} {format_bytes(d['grads'])} + block master "
        f"{format_bytes(d['master'])} + {moments} {format_bytes(d['moments'])} = model states "
        f"{format_bytes(d['model_states'])}",
        f"  gossip buffers {format_bytes(d['gossip_buffers'])}; offloaded state on CPU {format_bytes(d['cpu_offload'])}"
        + (f"; int8 step scratch (one tensor's fp32 m,v) {format_bytes(d['moment_scratch'])}"
           if d["moment_scratch"] else ""),
        f"  GPU total {format_bytes(plan.deca_total_bytes)} (active block at the peak: {d['block']}) -> "
        f"{'FITS' if plan.fits else 'does NOT fit'}",
    ]
    if plan.recommended:
        rec = plan.recommended
        frozen = [k for k in ("include_embeddings", "include_lm_head") if not rec[k] and getattr(s, k)]
        lines.append(f"recommended: layers_per_block={rec['layers_per_block']} ({rec['num_blocks']} blocks, largest "
                     f"{rec['largest_block_name']} {rec['largest_block_params'] / 1e6:.1f}M params), micro_batch="
                     f"{rec['micro_batch']}, activation_checkpointing={str(rec['activation_checkpointing']).lower()}"
                     + (", optim.fused_backward=true" if rec["fused_backward"] else "")
                     + (", optim.moment_dtype=int8" if rec["moment_dtype"] == "int8" else "")
                     + "".join(f", blocks.{k}=false" for k in frozen) + f" -> {format_bytes(rec['total_gpu_bytes'])}")
        if "fused_backward_saves_bytes" in rec:
            lines.append(f"  (fused step: each parameter stepped inside backward and its gradient freed, "
                         f"bit-identical; saves {format_bytes(rec['fused_backward_saves_bytes'])}; the written "
                         f"ds_config has gradient_clipping 0, which the fused step needs)")
        if "moment_dtype_int8_saves_bytes" in rec:
            lines.append(f"  (int8 moments: the block's m,v in 8 bits, 2 bytes + scales per parameter instead of 8; "
                         f"saves {format_bytes(rec['moment_dtype_int8_saves_bytes'])} net of one tensor's fp32 "
                         f"scratch; {INT8_NEEDS})")
        if frozen:
            lines.append(f"  ({' and '.join(k.removeprefix('include_') for k in frozen)} frozen: training them as "
                         f"blocks needs {format_bytes(rec['unfrozen_total_gpu_bytes'])}; "
                         f"{rec['frozen_params'] / 1e6:.1f}M parameters are not trained)")
    else:
        lines.append("recommended: nothing fits; use a larger GPU, shorter sequences or more ranks per client")
    return "\n".join(lines)


def _clipping(req: PlanRequest) -> float:
    """``gradient_clipping`` written for ``req``: 1.0, or 0 (off) with the fused step, which refuses clipping (the
    whole gradient's norm is not known before the first parameter is updated)."""
    return 0.0 if req.fused() else 1.0


def recommended_ds_config(plan: Plan) -> dict[str, Any]:
    """DeepSpeed JSON for the recommended settings.

    Stage 0 with DeepSpeed's ``bf16``/``fp16`` sections off: the model is cast by deca_ds and BlockAdam owns the fp32
    master (docs/design.md §3); with several ranks per client, ZeRO-2 partitions the active block's state inside the
    client (the engine re-initializes DeepSpeed on each block switch). Gradient clipping 1.0, or 0 when the plan
    recommends ``optim.fused_backward`` (:func:`_clipping`).
    """
    rec = plan.recommended or {}
    r = plan.recommended_request or plan.request
    stage = 0 if r.ranks_per_client == 1 else 2
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": rec.get("micro_batch", r.micro_batch),
        "gradient_accumulation_steps": 1,  # one micro-batch per step: also what the fused step needs
        "gradient_clipping": _clipping(r),
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1000000,
        "wall_clock_breakdown": False,
    }
    # Activation checkpointing is the recipe's model.gradient_checkpointing (Hugging Face, non-reentrant), not
    # DeepSpeed's activation_checkpointing section, which only serves models calling deepspeed.checkpointing.
    return cfg


def recommended_recipe(plan: Plan, model_dir: str, ds_config_path: str) -> dict[str, Any]:
    """Recipe YAML content (keys of :class:`deca_ds.config.RunConfig`) for the recommended settings.

    Everything the planner does not decide comes from the project's defaults (``deca_ds.config``'s dataclasses):
    ``method``, the whole ``deca`` section, ``blocks.switch_every``/``order``, ``optim.betas``/``eps``/
    ``weight_decay``, so the written recipe follows them when they change. The ``blocks`` section is the one the plan
    partitioned with (:meth:`PlanRequest.blocks`); the learning rate is :data:`PRETRAINED_LR`.
    """
    req = plan.recommended_request or plan.request
    blocks = req.blocks()
    num_blocks = plan.recommended.get("num_blocks", plan.shape.num_blocks)
    defaults = RunConfig()
    topologies = ("ring", "complete", "star", "torus", "exponential", "one_peer_exponential")
    return {
        "ds_config": ds_config_path,
        "output_dir": "runs/planned",
        "max_steps": ROUNDS * num_blocks * blocks.switch_every,
        "seed": defaults.seed,
        "method": defaults.method,
        "model": {"path": model_dir, "dtype": req.dtype, "gradient_checkpointing": bool(req.activation_checkpointing)},
        "data": {"path": None, "max_length": req.seq_len},
        "blocks": asdict(blocks),
        "optim": {**asdict(OptimConfig()), "lr": PRETRAINED_LR, "state_policy": req.state_policy,
                  "offload_dtype": req.offload_dtype, "fused_backward": req.fused(), "moment_dtype": req.moments()},
        "deca": asdict(DecaConfig()),
        "topology": {"name": req.topology if req.topology in topologies else "ring"},
        "clients": {"ranks_per_client": req.ranks_per_client},
    }


def write_plan(plan: Plan, model_dir: str, out_dir: str, overwrite: bool = False) -> tuple[str, str]:
    """Write ``OUT/ds_config.json`` and ``OUT/recipe.yaml`` for the recommended settings.

    Both are checked before anything is written, as a run checks them: the recipe with
    :func:`deca_ds.config.load_config`, the ds_config with :func:`deca_ds.ds_config.check_ds_config` for the recipe's
    world size (so a recommended ``optim.fused_backward`` comes with a ds_config it accepts).

    Args:
        plan: the planner's result.
        model_dir: the model's directory, written into the recipe as ``model.path``.
        out_dir: where the two files go (created if missing).
        overwrite: replace files of these names already in ``out_dir``; by default they are kept (they may hold a
            user's edits) and nothing is written.

    Returns:
        The two paths written.

    Raises:
        ValueError: nothing fits, so there is nothing to recommend; either file exists and ``overwrite`` is False;
            or (a planner bug) the settings it would write are refused.
    """
    import shlex

    import yaml

    if not plan.recommended:
        raise ValueError("nothing fits on this GPU, so no config was written: use a larger GPU, shorter sequences "
                         "(--seq-len) or more ranks per client")
    ds_path = os.path.join(out_dir, "ds_config.json")
    recipe_path = os.path.join(out_dir, "recipe.yaml")
    there = [p for p in (ds_path, recipe_path) if os.path.exists(p)]
    if there and not overwrite:
        raise ValueError(f"--write {out_dir}: {' and '.join(there)} already exist(s) and may hold your edits, so "
                         "nothing was written: choose another --write directory or pass --force to replace them")
    ds = recommended_ds_config(plan)
    recipe = recommended_recipe(plan, os.path.abspath(model_dir), os.path.abspath(ds_path))
    req = plan.recommended_request or plan.request
    header = (f"# Written by: deca-ds plan --model {shlex.quote(model_dir)} {' '.join(plan.request.command_flags())} "
              f"--write {shlex.quote(out_dir)}\n"
              f"# Run: deepspeed --num_gpus {plan.request.clients * plan.request.ranks_per_client} "
              f"recipes/finetune.py --config {recipe_path} data.path=/data/your-data.jsonl\n"
              + (f"# optim.moment_dtype=int8 {INT8_NEEDS}\n" if req.moments() == "int8" else ""))
    text = header + yaml.safe_dump(recipe, sort_keys=False)
    _check_written(text, ds, plan.request.clients * plan.request.ranks_per_client)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--write {out_dir} is a file, not a directory; nothing was written: choose a directory")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:  # a file where the directory goes, a read-only or missing parent: a bare traceback before
        raise ValueError(f"--write {out_dir}: cannot create the directory ({e.strerror or e}); nothing was written: "
                         "choose a directory you can write to") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise ValueError(f"--write {out_dir} is not writable; nothing was written: choose a directory you can write "
                         "to")
    with open(ds_path, "w") as f:
        json.dump(ds, f, indent=2)
        f.write("\n")
    with open(recipe_path, "w") as f:
        f.write(text)
    return ds_path, recipe_path


def _check_written(recipe_text: str, ds: dict[str, Any], world_size: int) -> None:
    """Load the recipe text as a run would and check the ds_config against it; nothing is written on failure."""
    import copy
    import tempfile

    from deca_ds.config import load_config
    from deca_ds.ds_config import check_ds_config

    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "recipe.yaml")
            with open(path, "w") as f:
                f.write(recipe_text)
            cfg = load_config(path)
        check_ds_config(copy.deepcopy(ds), cfg, world_size)  # it fills batch keys in place: keep ours as written
    except ConfigError as e:
        raise ValueError(f"the planner's recommended settings are refused ({e}); nothing was written: please report "
                         "this planner bug") from None

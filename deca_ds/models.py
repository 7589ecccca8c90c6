"""Model and tokenizer loading: the embedded tiny Llama (no files, no network) or a user's Hugging Face model.

Every client must start from the same weights. For the embedded model the initialisation is seeded identically on
every process; a pretrained model is the same file everywhere.
"""

from __future__ import annotations

import json
import os
from importlib import resources

import torch

from deca_ds.config import ConfigError, ModelConfig
from deca_ds.data.formatting import POSITION_LIMIT_KEYS, position_limit  # noqa: F401 (re-exported)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def embedded_model_config():
    """The shipped tiny Llama configuration (``deca_ds/assets/tiny_llama.json``) sized for the byte tokenizer."""
    from transformers import LlamaConfig

    from deca_ds.data import BYTE_VOCAB_SIZE, make_byte_tokenizer

    data = json.loads(resources.files("deca_ds").joinpath("assets/tiny_llama.json").read_text())
    tok = make_byte_tokenizer()
    data.update(vocab_size=BYTE_VOCAB_SIZE, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id)
    return LlamaConfig(**{k: v for k, v in data.items() if k not in ("architectures", "model_type")})


def build_meta_model(path: str | None):
    """The model of ``path`` (None: the embedded tiny Llama) on the meta device: shapes only, no weights, no memory.

    Used to check block settings before anything starts, and by the memory planner.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = embedded_model_config() if path is None else AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def check_model_config(cfg: ModelConfig) -> None:
    """Fail early, with one line, on a model path that cannot be loaded.

    Raises:
        ConfigError: a local-looking path that does not exist, or a directory without ``config.json``.
    """
    if cfg.path is None:
        return
    path = os.path.expanduser(cfg.path)
    looks_local = path.startswith((".", "/", "~")) or os.path.sep in path and not _looks_like_hub_name(path)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(f"model.path={cfg.path!r} has no config.json: point it at a Hugging Face model directory")
    elif looks_local or os.path.exists(path):
        raise ConfigError(f"model.path={cfg.path!r} does not exist: give a local Hugging Face model directory")


def check_lengths(cfg, model_config) -> None:
    """Refuse a ``data.max_length`` beyond the positions the model was built for, before anything runs.

    Past ``max_position_embeddings`` a model with learned positions fails and a rotary one runs on positions it never
    saw (its outputs, and the evaluation's generations, are then meaningless, and the run is needlessly slow).

    Args:
        cfg: the run's settings (:class:`deca_ds.config.RunConfig`; ``cfg.data.max_length`` is read).
        model_config: the model's Hugging Face config (e.g. ``build_meta_model(path).config``).

    Raises:
        ConfigError: ``data.max_length`` exceeds the model's limit; the message names both and the fix.
    """
    limit = position_limit(model_config)
    if limit is not None and cfg.data.max_length > limit:
        raise ConfigError(f"data.max_length={cfg.data.max_length} exceeds the model's max_position_embeddings={limit}: "
                          f"set data.max_length to at most {limit}")


def _looks_like_hub_name(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not path.startswith((".", "/"))


def load_model_and_tokenizer(cfg: ModelConfig, seed: int = 0):
    """Build the model (in ``cfg.dtype``) and its tokenizer.

    Args:
        cfg: model settings; ``path=None`` builds the embedded tiny Llama with the byte tokenizer.
        seed: initialisation seed of the embedded model (identical on every client).

    Returns:
        ``(model, tokenizer)``; the model is in train mode on CPU, cast to ``cfg.dtype``.

    Raises:
        ConfigError: the model or tokenizer cannot be loaded, or the tokenizer has more tokens than the model's
            vocabulary.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = DTYPES[cfg.dtype]
    if cfg.path is None:
        from transformers import LlamaForCausalLM

        from deca_ds.data import make_byte_tokenizer

        tokenizer = make_byte_tokenizer()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(embedded_model_config())
    else:
        check_model_config(cfg)
        try:
            tokenizer = AutoTokenizer.from_pretrained(cfg.path)
            model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=dtype)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"model.path={cfg.path!r} could not be loaded ({first[:200]}): give a local model "
                              "directory with config.json, weights and tokenizer files") from None
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise ConfigError(f"model.path={cfg.path!r}: the tokenizer has {len(tokenizer)} tokens but the model's "
                          f"vocabulary is {vocab}: use the tokenizer that belongs to this model")
    model = model.to(dtype)
    if cfg.gradient_checkpointing:
        # Non-reentrant: reentrant checkpointing needs an input that requires grad, and with frozen embeddings
        # nothing below the active block does, so backward would silently skip the active block (BAdam issue #2).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.train()
    return model, tokenizer


def merged_model(model: torch.nn.Module, keep: bool = False) -> torch.nn.Module:
    """A plain Hugging Face model to save: a peft (``method=dec_lora``) model with its adapters merged into the base
    (peft's ``merge_and_unload``), any other model as it is.

    Saved as is, a peft model's keys (``base_model.model.…``, ``lora_A``) load as nothing: every weight of
    ``from_pretrained``'s model would be missing and newly initialised.

    Args:
        model: the model, peft-wrapped or not.
        keep: leave ``model`` itself unchanged, merging a copy (for a model still used afterwards); only a peft
            model is copied.
    """
    if not hasattr(model, "merge_and_unload"):
        return model
    import copy

    model = copy.deepcopy(model) if keep else model
    _untie_adapted_output_embeddings(model)
    return model.merge_and_unload()


def _untie_adapted_output_embeddings(peft_model) -> None:
    """Give an adapted LM head its own weight before the merge when it shares it with the input embeddings.

    With ``tie_word_embeddings`` the head and the embeddings are one tensor. The trained model reads the embeddings
    unadapted and the head with its LoRA delta; merging the delta into the shared tensor changed the embeddings too
    (peft only warns), so the saved model was not the one trained. Untied (a copy of the weight for the head, the
    config's ``tie_word_embeddings`` set false so that loading keeps them apart), the merged model computes what the
    adapted one did.
    """
    base = peft_model.get_base_model()
    head, embeddings = base.get_output_embeddings(), base.get_input_embeddings()
    layer = getattr(head, "base_layer", None)  # peft's LoRA wrapper around the head
    if layer is None or embeddings is None or layer.weight is not embeddings.weight:
        return
    layer.weight = torch.nn.Parameter(layer.weight.detach().clone(), requires_grad=layer.weight.requires_grad)
    for config in {id(c): c for c in (base.config, base.config.get_text_config())}.values():
        config.tie_word_embeddings = False


def save_model_dir(model: torch.nn.Module, directory) -> None:
    """Write ``model`` as a Hugging Face model directory (``config.json``, ``generation_config.json``,
    ``model.safetensors``) from whichever process calls it.

    Why not ``model.save_pretrained``: with torch.distributed initialized, transformers (5.x) writes only on global
    rank 0 and silently skips every other rank, so each client's own model would be lost on all clients but one.
    Tied weights are stored once (``safetensors.torch.save_model``), as ``save_pretrained`` stores them, so
    ``from_pretrained`` loads the directory unchanged. A peft model (``method=dec_lora``) is written as a copy with
    its adapters merged into the base (:func:`merged_model`), the simulator's format; ``model`` itself is unchanged.

    Args:
        model: the Hugging Face model (or peft-wrapped model) to write.
        directory: the directory to write (created if missing).
    """
    from pathlib import Path

    from safetensors.torch import save_model

    model = merged_model(model, keep=True)  # the launcher averages this same model into consensus/ afterwards
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(path)
    save_model(model, str(path / "model.safetensors"), metadata={"format": "pt"})

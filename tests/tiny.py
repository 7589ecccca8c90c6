"""The tiny 4-layer Llama and token batches the optimizer unit tests share (BlockAdam, the lean step, int8 moments)."""

import io

import torch
import transformers as T

__all__ = ["tiny_llama", "batches", "reload_through_checkpoint"]


def tiny_llama(dtype=torch.float32, seed=0):
    """A 4-layer Llama (hidden 32, vocab 128) with weights from ``torch.manual_seed(seed)``, in ``dtype``."""
    torch.manual_seed(seed)
    cfg = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=128, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    return T.AutoModelForCausalLM.from_config(cfg).to(dtype)


def batches(n, seed=1):
    """``n`` token batches of shape (2, 8), the same for a given ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (2, 8), generator=g) for _ in range(n)]


def reload_through_checkpoint(model, opt, build):
    """Save ``model`` and ``opt`` as one ``torch.save`` archive in memory, then load it into a fresh pair from
    ``build()`` (what a resume does). Returns ``(model, opt, checkpoint)``."""
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    model2, opt2 = build()
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    return model2, opt2, ckpt

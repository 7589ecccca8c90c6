"""Dec-LoRA on the embedded model: why its LM head must be adapted, proved from the weights, and the start warning.

The embedded tiny Llama is randomly initialised. Its logits are ``z = W_head (w_norm * x_hat)`` with ``x_hat`` the
RMS-normalised hidden state (norm at most sqrt(d)), so with the head and the final norm frozen, no adapter below
them can make any logit gap larger than ``G = sqrt(d) * max_ij ||(W_i - W_j) * w_norm||`` and every token's
cross-entropy is at least ``log(1 + (V - 1) exp(-G))`` (Cauchy-Schwarz). These tests compute that bound from the
weights, check that a model with arbitrary adapters respects it, and that the run warns.
"""

import math
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")

from deca_ds.build import lora_param_names, prepare_model  # noqa: E402
from deca_ds.config import load_config  # noqa: E402
from deca_ds.models import load_model_and_tokenizer  # noqa: E402

ALL_LINEAR_AND_HEAD = "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head]"


def _model(overrides):
    cfg = load_config(None, ["method=dec_lora", *overrides])
    model, _ = load_model_and_tokenizer(cfg.model, seed=cfg.seed)
    return cfg, model


def _loss_floor(model) -> float:
    """Lowest per-token cross-entropy reachable with the LM head and final norm as they are."""
    head = model.get_output_embeddings().weight.detach().double()
    norm = model.model.norm.weight.detach().double()
    vocab, d = head.shape
    scaled = head * norm
    gap = torch.cdist(scaled, scaled).max().item() * math.sqrt(d)
    return math.log1p((vocab - 1) * math.exp(-gap))


def test_a_frozen_random_head_bounds_every_tokens_loss_whatever_the_adapters():
    cfg, model = _model([])
    floor = _loss_floor(model)
    # The bound is far above what full fine-tuning reaches on the synthetic task (train loss ~0.01 nats/token):
    # adapters below a frozen random head cannot fit it.
    assert floor > 1.0
    with pytest.warns(UserWarning, match="add lm_head to lora.target_modules"):
        wrapped = prepare_model(cfg, model)
    # Adapters set to large random values: the loss stays above the floor. The bound is float64; the forward is
    # fp32, where each logit is a d-term dot product of a head row with the normalised hidden state (norm <= sqrt(d)
    # times max |w_norm|), so it carries an error <= d * u * max_i ||W_i|| * ||h|| (u = 2**-24), a logit gap twice
    # that, and the cross-entropy, whose slope in each gap is <= 1, no more than the largest gap error.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 3.0)
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=gen)
    logits = wrapped(input_ids=ids).logits.double()
    per_token = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1),
                                                  reduction="none")
    head = model.get_output_embeddings().weight.detach().double()
    d = head.shape[1]
    h_norm = math.sqrt(d) * model.model.norm.weight.detach().double().abs().max().item()
    slack = 2 * d * 2.0 ** -24 * head.norm(dim=1).max().item() * h_norm
    assert per_token.min().item() >= floor - slack


def test_adapting_the_head_lifts_the_bound_and_silences_the_warning():
    cfg, model = _model([ALL_LINEAR_AND_HEAD])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped = prepare_model(cfg, model)
    assert not [w for w in caught if "lm_head" in str(w.message)]
    names = lora_param_names(wrapped)
    assert any("lm_head" in n for n in names)
    # Only adapters train; the base (head included) stays frozen.
    assert all(("lora_" in n) == p.requires_grad for n, p in wrapped.named_parameters())


def test_a_local_model_path_does_not_warn(tmp_path):
    # A user's (pretrained) model keeps peft's default silently.
    cfg, model = _model([])
    model.save_pretrained(tmp_path)
    cfg = load_config(None, ["method=dec_lora", f"model.path={tmp_path}"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepare_model(cfg, model)
    assert not [w for w in caught if "lm_head" in str(w.message)]


def test_merging_an_adapted_tied_head_keeps_the_embeddings_and_the_trained_function(tmp_path):
    """Tied head and embeddings (one tensor) with a LoRA adapter on the head: the merge once added the head's delta
    to the shared tensor, so the saved model's embeddings changed and it computed something else than the trained
    one. Now the head is untied first: the embeddings stay the base's bit for bit, the head is base + peft's own
    delta bit for bit, and the saved directory loads untied with the same weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from deca_ds.models import merged_model, save_model_dir

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    shared = base.lm_head.weight.detach().clone()
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: a delta of zero would test nothing
            torch.nn.init.normal_(p, std=0.1)
    head = model.get_base_model().lm_head
    delta = head.get_delta_weight("default")
    assert delta.abs().max() > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's warning about tied adapted modules
        merged = merged_model(model, keep=True)
    assert torch.equal(merged.model.embed_tokens.weight, shared)
    assert merged.lm_head.weight is not merged.model.embed_tokens.weight
    assert torch.equal(merged.lm_head.weight, shared + delta)
    assert merged.config.tie_word_embeddings is False
    # the model given is left as it was (keep=True): still tied, still adapted
    assert model.get_base_model().lm_head.base_layer.weight is model.get_base_model().model.embed_tokens.weight
    save_model_dir(model, tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert torch.equal(loaded.model.embed_tokens.weight, shared)
    assert torch.equal(loaded.lm_head.weight, shared + delta)

"""A user's local Hugging Face model of another architecture than Llama, end to end in both simulators.

Tiny random models (2 layers, hidden 32, the byte tokenizer) of GPT-2 (``transformer.h``, tied head, Conv1D),
OPT (learned positions, dropout 0.1), Gemma-2 (attention logit soft-capping) and Bloom are written to a temporary
directory and trained through ``model.path`` as a user's model would be. What they guard:

- GPT-2 under ``simulate.stacked=true`` failed at the first step (transformers' padding check calls ``.item()``,
  which vmap cannot batch); now it matches the per-client path step by step, tied head included;
- a model with dropout (OPT, GPT-2 defaults) failed under vmap's default ``randomness="error"``;
- Gemma-2 trained but failed in the final evaluation: the stacked path rebuilt its models with SDPA attention, which
  cannot compute soft-capping;
- a model whose forward torch.func cannot batch (Bloom's custom GeLU ``autograd.Function``) is refused with one line
  before training instead of a traceback at the first step.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as T

from deca_ds.blocks import partition_blocks
from deca_ds.config import ConfigError, load_config
from deca_ds.data import make_byte_tokenizer
from deca_ds.simulate import Simulation, run_simulation
from deca_ds.stacked import StackedSimulation, stacked_weights

V = 320
SMALL = ["backend=simulate", "num_clients=2", "data.num_examples=160", "data.eval_examples=2",
         "data.min_partition_size=4", "data.max_length=48", "blocks.switch_every=1"]
NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def _ids():
    tok = make_byte_tokenizer()
    return dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)


CONFIGS = {
    "gpt2": lambda: T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=V, n_positions=64, **NO_DROPOUT, **_ids()),
    "opt": lambda: T.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=V,
                               max_position_embeddings=64, word_embed_proj_dim=32, **_ids()),  # dropout 0.1
    "gemma2": lambda: T.Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=8, vocab_size=V, max_position_embeddings=64,
                                     sliding_window=16, **_ids()),
    "bloom": lambda: T.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=V, **_ids()),
    "qwen2": lambda: T.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=V, max_position_embeddings=64,
                                   tie_word_embeddings=True, **_ids()),
    "neox": lambda: T.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    vocab_size=V, max_position_embeddings=64, **_ids()),
    "phi3": lambda: T.Phi3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=V, max_position_embeddings=64,
                                 original_max_position_embeddings=64, **_ids()),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """``model_dir(arch)``: a saved tiny random model of ``arch`` with the byte tokenizer (built once per module)."""
    made: dict[str, str] = {}

    def make(arch: str) -> str:
        if arch not in made:
            path = tmp_path_factory.mktemp(arch)
            torch.manual_seed(0)
            T.AutoModelForCausalLM.from_config(CONFIGS[arch]()).save_pretrained(path)
            make_byte_tokenizer().save_pretrained(path)
            made[arch] = str(path)
        return made[arch]

    return make


def _cfg(path, *extra):
    return load_config(None, SMALL + [f"model.path={path}", *extra])


@pytest.mark.parametrize("arch", ["gpt2", "opt", "qwen2", "neox", "phi3", "bloom", "gemma2"])
def test_partition_covers_every_parameter_once_and_a_tied_head_with_the_embeddings(arch):
    with torch.device("meta"):
        model = T.AutoModelForCausalLM.from_config(CONFIGS[arch]())
    named = [n for n, _ in model.named_parameters()]  # a tied head is one parameter, under the embedding's name
    part = partition_blocks(model, include_embeddings=True, include_lm_head=True)
    assert sorted(part.param_names()) == sorted(named) and not part.frozen
    assert [b.name for b in part] == ["embeddings", "layers.0", "layers.1", "lm_head"]
    head = model.get_output_embeddings().weight
    emb_name = next(n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight)
    if head is model.get_input_embeddings().weight:
        assert emb_name in part[0].param_names and emb_name not in part[-1].param_names
    else:
        assert next(n for n, p in model.named_parameters() if p is head) in part[-1].param_names


def test_gpt2_stacked_equals_per_client_with_its_tied_head(model_dir):
    """Was: ``RuntimeError: vmap: It looks like you're calling .item() on a Tensor`` at the first stacked step."""
    cfg = _cfg(model_dir("gpt2"), "optim.lr=1e-3", "optim.eps=1e-3", "max_steps=4")
    ref, got = Simulation(cfg), StackedSimulation(cfg)
    init = stacked_weights(ref)
    ref_losses = np.array([ref.step().losses for _ in range(4)])  # blocks: embeddings (tied head), layers 0-1, head
    got_losses = np.array([got.step().losses for _ in range(4)])
    assert np.isfinite(got_losses).all()
    # Tolerances from tests/unit/test_stacked.py's derivation, same lr 1e-3 and eps 1e-3: losses within its 1e-5
    # relative (gradients agree to ~sqrt(K)*u = sqrt(320)*2**-24 ~ 1e-6 here, and 4 steps, not 50). Weights per
    # entry: DECA's default qgm_grad sees the mix's rounding u*|x| divided by lr (6e-5*|x| in h), folded into m with
    # weight 1 - beta1 = 0.1 and gain <= 1/(1 - beta1) = 10, so an update moves by <= lr * 6e-5 * |x| ~ 6e-8 per step
    # for |x| <= 1 (GPT-2's norms are 1, the rest ~0.02): <= 2.4e-7 over 4 steps; 1e-6 leaves a factor 4.
    np.testing.assert_allclose(got_losses, ref_losses, rtol=1e-5, atol=0)
    wr, wg = stacked_weights(ref), stacked_weights(got)
    assert set(wg) == set(wr) and "lm_head.weight" not in wg  # the tied head is trained once, as wte
    for name in wr:
        np.testing.assert_allclose(wg[name], wr[name], rtol=0, atol=1e-6, err_msg=name)
        assert not np.array_equal(wr[name], init[name]), f"{name} was never trained"


def test_gpt2_stacked_run_saves_a_loadable_averaged_consensus(model_dir, tmp_path):
    # method=local: two clients that gossip would hold equal weights, and the average would prove nothing.
    cfg = _cfg(model_dir("gpt2"), "simulate.stacked=true", "method=local", "max_steps=4",
               "model.save_client_models=true", f"output_dir={tmp_path / 'run'}")
    summary = run_simulation(cfg, save_models=True, quiet=True)
    assert summary["stacked"] and np.isfinite(summary["consensus"]["loss"])
    cons = T.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "consensus")
    assert cons.lm_head.weight is cons.transformer.wte.weight  # still tied after the round trip
    clients = [dict(T.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "clients" / f"client_{c}")
                    .named_parameters()) for c in range(2)]
    assert not torch.equal(clients[0]["transformer.wte.weight"], clients[1]["transformer.wte.weight"])
    for name, p in cons.named_parameters():
        # the saved consensus is the fp32 mean of the same two rows: one rounding of u*|x| <= 6e-8 for |x| <= 1
        torch.testing.assert_close(p, (clients[0][name] + clients[1][name]) / 2, rtol=0, atol=1e-6, msg=name)


def _opt_draws_layerdrop_at_zero() -> bool:
    """transformers 4.x's OPT decoder draws LayerDrop's number for every layer in training (``torch.rand([])``, then
    ``if`` on it) even with ``layerdrop=0``; under ``vmap(randomness="different")`` that number is batched and the
    ``if`` is data-dependent control flow, which vmap refuses. 5.x draws only when ``layerdrop > 0``."""
    import inspect

    from transformers.models.opt.modeling_opt import OPTDecoder

    return "self.layerdrop > 0" not in inspect.getsource(OPTDecoder.forward)


def test_a_model_with_dropout_trains_stacked(model_dir):
    """OPT's default dropout 0.1; was: ``vmap: called random operation while in randomness error mode``."""
    cfg = _cfg(model_dir("opt"), "max_steps=2")
    if _opt_draws_layerdrop_at_zero():  # transformers 4.x: refused before training, in one line naming the fix
        with pytest.raises(ConfigError, match=r"simulate\.stacked=true cannot run OPTForCausalLM.*data-dependent "
                                              r"control flow.*set simulate\.stacked=false") as info:
            StackedSimulation(cfg)
        assert "\n" not in str(info.value)
        return
    sim = StackedSimulation(cfg)
    losses = [sim.step().losses for _ in range(2)]
    assert np.isfinite(losses).all()


def test_gpt2_with_dropout_trains_stacked(model_dir, tmp_path):
    """GPT-2 with its default dropout 0.1 (resid, embd, attn): dropout under vmap on every transformers version
    (OPT's test above cannot show it on 4.x)."""
    path = tmp_path / "gpt2_dropout"
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=V, n_positions=64,
                                                    **_ids())).save_pretrained(path)
    make_byte_tokenizer().save_pretrained(path)
    sim = StackedSimulation(_cfg(str(path), "max_steps=2"))
    assert sim.template.config.resid_pdrop == 0.1
    losses = [sim.step().losses for _ in range(2)]
    assert np.isfinite(losses).all()


def test_gemma2_stacked_evaluates_with_the_attention_it_was_loaded_with(model_dir):
    """Was: ``ValueError: `sdpa` attention does not support `softcap``` in the end-of-run evaluation."""
    sim = StackedSimulation(_cfg(model_dir("gemma2"), "max_steps=1"))
    sim.step()
    assert all(np.isfinite(e["loss"]) for e in sim.evaluate_clients())
    # The implementation transformers loads Gemma-2 with: eager on 5.x; 4.x (4.56, 4.57) loads SDPA, which there
    # skips the soft-capping (transformers' own warning: train Gemma-2 with eager) instead of raising.
    loaded_with = T.AutoModelForCausalLM.from_pretrained(model_dir("gemma2")).config._attn_implementation
    assert sim.consensus_model().config._attn_implementation == loaded_with
    assert sim.template.config._attn_implementation == "eager"


def test_a_model_vmap_cannot_run_is_refused_before_training(model_dir):
    """Bloom's GeLU is an autograd.Function without setup_context: was a RuntimeError traceback at the first step."""
    cfg = _cfg(model_dir("bloom"), "simulate.stacked=true", "max_steps=1")
    with pytest.raises(ConfigError, match=r"simulate\.stacked=true cannot run BloomForCausalLM.*set "
                                          r"simulate\.stacked=false") as info:
        StackedSimulation(cfg)
    assert "\n" not in str(info.value)
    sim = Simulation(cfg)  # the per-client simulator runs it
    assert np.isfinite(sim.step().losses).all()


@pytest.mark.parametrize("arch, width", [("gpt2", 4 * 32), ("opt", 64), ("qwen2", 64)])
def test_the_planner_reads_the_mlp_width_of_each_architecture(model_dir, arch, width):
    """`deca-ds plan --model` crashed on GPT-2 and OPT (and Falcon): AttributeError: 'GPT2Config' object has no
    attribute 'intermediate_size' (GPT-2 calls it n_inner, None meaning 4 x hidden; OPT ffn_dim)."""
    from deca_ds.bench.planner import inspect_model

    shape = inspect_model(T.AutoModelForCausalLM.from_pretrained(model_dir(arch)))
    assert shape.intermediate_size == width and shape.hidden_size == 32 and shape.num_layers == 2

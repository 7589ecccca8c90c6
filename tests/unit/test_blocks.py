"""partition_blocks on real Hugging Face architectures (tiny, from_config) and BlockSchedule's step arithmetic."""

import warnings

import numpy as np
import pytest
import torch
import transformers as T
from torch import nn

from deca_ds.blocks import Block, BlockPartition, BlockSchedule, SchedulePosition, partition_blocks, print_partition

_IDS = dict(pad_token_id=0, bos_token_id=0, eos_token_id=0)
_SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, **_IDS)

# name -> (config factory, tied word embeddings expected)
ARCHS = {
    "llama": lambda: T.LlamaConfig(**_SMALL),
    "mistral": lambda: T.MistralConfig(**_SMALL),
    "qwen2": lambda: T.Qwen2Config(**_SMALL),
    "qwen3": lambda: T.Qwen3Config(**_SMALL, head_dim=8),
    "gemma": lambda: T.GemmaConfig(**_SMALL, head_dim=8),
    "gemma2": lambda: T.Gemma2Config(**_SMALL, head_dim=8),
    "gemma3_text": lambda: T.Gemma3TextConfig(**_SMALL, head_dim=8),
    "phi3": lambda: T.Phi3Config(**_SMALL),
    "gpt2": lambda: T.GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=128, n_positions=64, **_IDS),
    "gpt_neox": lambda: T.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, vocab_size=128, **_IDS),
    "opt": lambda: T.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=3, num_attention_heads=4,
                               vocab_size=128, word_embed_proj_dim=32, **_IDS),
    "falcon": lambda: T.FalconConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, vocab_size=128,
                                     **_IDS),
}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: T.AutoModelForCausalLM.from_config(make()) for name, make in ARCHS.items()}


def _layer_index(name: str) -> int | None:
    """Independent reference: the decoder-layer index parsed from a real parameter name (``...layers.3...``)."""
    parts = name.split(".")
    for a, b in zip(parts, parts[1:]):
        if a in ("layers", "h") and b.isdigit():
            return int(b)
    return None


def _unique_numel(model):
    seen = {}
    for p in model.parameters():  # parameters() also deduplicates; count by storage to be independent
        seen[p.data_ptr()] = p.numel()
    return sum(seen.values())


@pytest.mark.parametrize("arch", list(ARCHS))
def test_partition_every_param_in_exactly_one_block(models, arch):
    model = models[arch]
    part = partition_blocks(model, include_embeddings=True, include_lm_head=True)
    names = [n for b in part for n in b.param_names]
    assert len(names) == len(set(names)), "a parameter is in two blocks"
    assert set(names) | set(part.frozen) == {n for n, _ in model.named_parameters()}
    assert part.frozen == []
    # Parameter count is conserved (tied weights counted once).
    assert part.num_params(model) == _unique_numel(model)
    # Layer blocks are exactly the decoder layers, one per block, in order.
    layers = [b for b in part if b.name.startswith("layers.")]
    assert len(layers) == 3
    for i, b in enumerate(layers):
        assert b.name == f"layers.{i}"
        assert {_layer_index(n) for n in b.param_names} == {i}
    assert part[0].name == "embeddings" and part[len(part) - 1].name == "lm_head"
    assert [b.index for b in part] == list(range(len(part)))
    # The input embedding is in the embedding block.
    emb = model.get_input_embeddings().weight
    emb_name = next(n for n, p in model.named_parameters() if p is emb)
    assert emb_name in part[0].param_names
    # Tied weights: claimed once, by the embedding block.
    head = model.get_output_embeddings().weight
    if head is emb:
        assert emb_name not in part[len(part) - 1].param_names


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "gemma3_text"])
def test_layers_per_block_groups_and_frozen(models, arch):
    model = models[arch]
    part = partition_blocks(model, layers_per_block=2)
    assert [b.name for b in part] == ["layers.0-1", "layers.2"]
    assert {_layer_index(n) for n in part[0].param_names} == {0, 1}
    assert {_layer_index(n) for n in part[1].param_names} == {2}
    expected_frozen = [n for n, _ in model.named_parameters() if _layer_index(n) is None]
    assert part.frozen == expected_frozen and expected_frozen


def test_tied_head_goes_to_lm_head_without_embedding_block(models):
    model = models["gpt2"]
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    part = partition_blocks(model, include_lm_head=True)
    head = part[len(part) - 1]
    assert head.name == "lm_head"
    assert set(head.param_names) == {"transformer.wte.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"}
    assert "transformer.wpe.weight" in part.frozen


def test_untied_lm_head_block_holds_norm_and_head(models):
    part = partition_blocks(models["llama"], include_lm_head=True)
    assert part[len(part) - 1].param_names == ("model.norm.weight", "lm_head.weight")


def test_prefixes_override_detection(models):
    model = models["llama"]
    part = partition_blocks(model, prefixes=["model.embed_tokens", r"model\.layers\.[01]", "model.layers.2."])
    assert [b.name for b in part] == ["model.embed_tokens", r"model\.layers\.[01]", "model.layers.2."]
    assert part[0].param_names == ("model.embed_tokens.weight",)
    assert {_layer_index(n) for n in part[1].param_names} == {0, 1}
    assert {_layer_index(n) for n in part[2].param_names} == {2}
    assert part.frozen == ["model.norm.weight", "lm_head.weight"]


def test_prefix_matches_whole_components():
    model = nn.Module()
    model.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(11))
    part = partition_blocks(model, prefixes=["layers.1"])
    assert part[0].param_names == ("layers.1.weight", "layers.1.bias")  # not layers.10


def test_bad_prefixes_raise_naming_them(models):
    model = models["llama"]
    with pytest.raises(ValueError, match=r"model\.nope"):
        partition_blocks(model, prefixes=["model.layers.0", "model.nope"])
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight"):
        partition_blocks(model, prefixes=["model.layers.0", r"model\.layers\.0\.self_attn"])


def test_partition_rejects_empty_and_overlapping_blocks():
    with pytest.raises(ValueError, match="non-empty"):
        BlockPartition([Block(0, "a", ())])
    with pytest.raises(ValueError, match="w1"):
        BlockPartition([Block(0, "a", ("w1",)), Block(1, "b", ("w1", "w2"))])
    with pytest.raises(ValueError, match="no nn.ModuleList"):
        partition_blocks(nn.Linear(2, 2))


def test_print_partition(models):
    from rich.console import Console

    model = models["llama"]
    part = partition_blocks(model, layers_per_block=2)
    console = Console(record=True, width=120)
    print_partition(model, part, console=console)
    text = console.export_text()
    n0 = sum(p.numel() for n, p in model.named_parameters() if n in part[0].param_names)
    assert f"{n0:,}" in text and "layers.0-1" in text and "model.norm.weight" in text


# ---------------------------------------------------------------------------------------------------- schedule


def test_schedule_positions_ascending_descending_fixed():
    s = BlockSchedule(3, switch_every=2)
    got = [tuple(s.position(t)) for t in range(8)]
    assert got == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (0, 2, 0), (0, 2, 1), (1, 0, 0), (1, 0, 1)]
    assert isinstance(s.position(0), SchedulePosition)
    assert [s.is_last_inner_step(t) for t in range(4)] == [False, True, False, True]
    d = BlockSchedule(3, switch_every=1, order="descending")
    assert [d.position(t).block_idx for t in range(4)] == [2, 1, 0, 2]
    f = BlockSchedule(3, switch_every=1, order="fixed", fixed_order=[2, 0])
    assert f.blocks_per_round == 2
    assert [tuple(f.position(t)) for t in range(3)] == [(0, 2, 0), (0, 0, 0), (1, 2, 0)]


def test_schedule_validation():
    with pytest.raises(ValueError, match="out of range"):
        BlockSchedule(3, 1, order="fixed", fixed_order=[0, 3])
    with pytest.raises(ValueError, match="fixed_order"):
        BlockSchedule(3, 1, order="fixed")
    with pytest.raises(ValueError, match="unknown block order"):
        BlockSchedule(3, 1, order="zigzag")
    with pytest.raises(ValueError):
        BlockSchedule(3, 0)


def test_random_order_shared_seed():
    a, b = BlockSchedule(8, 3, "random", seed=7), BlockSchedule(8, 3, "random", seed=7)
    c = BlockSchedule(8, 3, "random", seed=8)
    steps = range(0, 5 * 24)
    seq_a = [a.position(t) for t in steps]
    assert seq_a == [b.position(t) for t in steps]
    assert seq_a != [c.position(t) for t in steps]
    for r in range(5):  # each round is a permutation, drawn from default_rng([seed, round])
        assert a.round_order(r) == list(np.random.default_rng([7, r]).permutation(8))
    assert a.round_order(0) != a.round_order(1) or a.round_order(1) != a.round_order(2)


def test_warn_if_incomplete():
    s = BlockSchedule(4, switch_every=10)
    with pytest.warns(UserWarning, match=r"block\(s\) \[3\]"):
        assert s.warn_if_incomplete(30) == [3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert s.warn_if_incomplete(31) == []  # a partial visit counts
    with pytest.warns(UserWarning):
        BlockSchedule(3, 1, order="fixed", fixed_order=[0, 1]).warn_if_incomplete(100)


def test_schedule_state_dict_round_trip():
    s = BlockSchedule(5, 3, "random", seed=11)
    t = BlockSchedule(2, 1)
    t.load_state_dict(s.state_dict())
    assert [t.position(i) for i in range(40)] == [s.position(i) for i in range(40)]
    assert t.state_dict() == s.state_dict()

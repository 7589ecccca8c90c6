"""Evaluation: metric maths against hand-computed values, decoding and scoring against unbatched references."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from deca_ds.config import RunConfig
from deca_ds.data import BYTE_VOCAB_SIZE, build_client_data, classification_metrics, evaluate, make_byte_tokenizer
from deca_ds.data.evaluation import continuation_logprobs, eval_progress, greedy_generate, token_loss


def test_classification_metrics_hand_computed():
    # rows:      0  1  2  3   4  5
    pred = [0, 0, 1, 2, -1, 1]
    true = [0, 1, 1, 2, 2, 0]
    m = classification_metrics(pred, true, 3)
    assert m["accuracy"] == pytest.approx(3 / 6)
    # F1: label 0 tp1 fp1 fn1 -> 1/2; label 1 tp1 fp1 fn1 -> 1/2; label 2 tp1 fp0 fn1 -> 2/3.
    assert m["macro_f1"] == pytest.approx((0.5 + 0.5 + 2 / 3) / 3)
    assert m["per_label_accuracy"] == pytest.approx([0.5, 0.5, 0.5])
    # A label never seen nor predicted is left out of the macro average and has nan per-label accuracy.
    m = classification_metrics([0, 1, 1], [0, 1, 0], 3)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert math.isnan(m["per_label_accuracy"][2])


def test_token_loss_matches_an_explicit_loop():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, -100, -100]])
    total, count = token_loss(logits, labels)
    ref = 0.0
    for b, t in [(0, 2), (0, 3), (1, 1), (1, 2)]:
        ref -= torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]].item()
    assert count == 4 and total == pytest.approx(ref, rel=1e-5)


class _Successor(torch.nn.Module):
    """Toy LM: the next token is always (current token + 1) mod vocab."""

    def __init__(self, vocab=16):
        super().__init__()
        self.vocab = vocab
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask=None):
        logits = torch.nn.functional.one_hot((input_ids + 1) % self.vocab, self.vocab).float() * 10 + self.anchor
        return SimpleNamespace(logits=logits)


def test_greedy_generate_reads_each_rows_own_last_position():
    out = greedy_generate(_Successor(), [[5, 6], [1], [12, 13, 14]], max_new_tokens=4, eos_id=9, pad_id=0,
                          batch_size=2)
    assert out == [[7, 8], [2, 3, 4, 5], [15, 0, 1, 2]]


def _tiny_llama(tok):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=BYTE_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(cfg).eval()


@torch.no_grad()
def test_continuation_logprobs_batched_equals_unpadded_reference():
    tok = make_byte_tokenizer()
    model = _tiny_llama(tok)
    prompts, conts = [[1, 2, 3, 4, 5], [7, 8], [9]], [[10, 11], [12], [13, 14, 15]]
    got = continuation_logprobs(model, prompts, conts, tok.pad_token_id, batch_size=3)
    for p, c, g in zip(prompts, conts, got):
        ids = torch.tensor([p + c])
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        ref = sum(logp[len(p) - 1 + j, t].item() for j, t in enumerate(c))
        assert g == pytest.approx(ref, abs=1e-4)


class _Uniform(torch.nn.Module):
    """Every token equally likely: loss = log V, and label log-likelihoods favour the shortest label."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.seen_training = []

    def forward(self, input_ids, attention_mask=None):
        self.seen_training.append(self.training)
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab) + self.anchor)


def test_evaluate_uniform_model_closed_form():
    tok = make_byte_tokenizer()
    cfg = RunConfig()
    cfg.data.num_examples, cfg.data.partition = 200, "iid"
    data = build_client_data(cfg, tok, 0, 2)
    model = _Uniform(BYTE_VOCAB_SIZE).train()
    r = evaluate(model, tok, data, max_examples=12, batch_size=5)
    assert model.training and not any(model.seen_training)  # evaluated in eval mode, mode restored
    assert r["examples"] == 12
    assert r["loss"] == pytest.approx(math.log(BYTE_VOCAB_SIZE))
    assert r["perplexity"] == pytest.approx(BYTE_VOCAB_SIZE, rel=1e-5)
    shortest = min(data.label_names, key=len)  # "food": the highest likelihood under a uniform model
    expect = sum(e["label"] == shortest for e in data.test_examples[:12]) / 12
    assert r["accuracy_ll"] == r["accuracy"] == pytest.approx(expect)
    assert r["per_label_accuracy"][shortest] == 1.0
    assert r["accuracy_gen"] == 0.0  # greedy emits byte 0 forever: never a label
    json.dumps(r)


def test_evaluate_generation_task_reports_exact_match():
    tok = make_byte_tokenizer()
    cfg = RunConfig()
    cfg.data.task, cfg.data.num_examples, cfg.data.partition = "generation", 200, "iid"
    data = build_client_data(cfg, tok, 0, 2)
    r = evaluate(_tiny_llama(tok), tok, data, max_examples=8)
    assert r["exact_match"] == 0.0 and set(r["per_group_exact_match"]) <= set(data.count_names)
    assert "accuracy" not in r and r["loss"] > 0


def _classification_data(num_examples=200):
    tok = make_byte_tokenizer()
    cfg = RunConfig()
    cfg.data.num_examples, cfg.data.partition = num_examples, "iid"
    return tok, build_client_data(cfg, tok, 0, 2)


class _Counting(torch.nn.Module):
    """Wraps a model and counts its forward passes."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, input_ids, attention_mask=None):
        self.calls += 1
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


@pytest.mark.parametrize("task", ["classification", "generation"])
def test_evaluate_reports_progress_up_to_the_forward_passes_it_makes(task):
    tok = make_byte_tokenizer()
    cfg = RunConfig()
    cfg.data.task, cfg.data.num_examples, cfg.data.partition = task, 200, "iid"
    data = build_client_data(cfg, tok, 0, 2)
    model = _Counting(_Uniform(BYTE_VOCAB_SIZE))  # never emits EOS: generation uses its whole budget
    seen = []
    evaluate(model, tok, data, max_examples=12, batch_size=5, progress=lambda done, total: seen.append((done, total)))
    totals = {t for _, t in seen}
    assert len(totals) == 1 and seen[0][0] == 0 and seen[-1][0] == seen[-1][1]
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))  # monotone
    # Uniform never stops early, so the bound is met exactly: one report per forward pass (plus start and end).
    assert totals.pop() == model.calls and len(seen) == model.calls + 2


def test_progress_jumps_when_generation_stops_early_and_default_is_quiet(capsys):
    tok, data = _classification_data()
    seen = []
    r = evaluate(_tiny_llama(tok), tok, data, max_examples=6, batch_size=4,
                 progress=lambda done, total: seen.append((done, total)))
    assert seen[-1][0] == seen[-1][1] and r["examples"] == 6
    evaluate(_tiny_llama(tok), tok, data, max_examples=6, batch_size=4)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_eval_progress_bar_renders():
    from rich.console import Console

    tok, data = _classification_data()
    console = Console(record=True, width=100, force_terminal=False)
    with eval_progress(console, "evaluating client 1") as progress:
        evaluate(_Uniform(BYTE_VOCAB_SIZE), tok, data, max_examples=4, batch_size=4, progress=progress)
    text = console.export_text()
    assert "evaluating client 1" in text and "forward passes" in text


def test_max_length_beyond_the_models_positions():
    from deca_ds.config import ConfigError, load_config
    from deca_ds.models import check_lengths, embedded_model_config, position_limit

    limit = embedded_model_config().max_position_embeddings
    assert position_limit(embedded_model_config()) == limit == 256
    check_lengths(load_config(None, [f"data.max_length={limit}"]), embedded_model_config())
    with pytest.raises(ConfigError) as e:
        check_lengths(load_config(None, [f"data.max_length={limit + 1}"]), embedded_model_config())
    assert str(e.value) == (f"data.max_length={limit + 1} exceeds the model's max_position_embeddings={limit}: "
                            f"set data.max_length to at most {limit}")
    assert position_limit(SimpleNamespace(n_positions=1024)) == 1024  # GPT-2's name for it
    check_lengths(load_config(None, ["data.max_length=100000"]), SimpleNamespace())  # no limit known: nothing to say
    # Library use without the check: evaluate warns in one line.
    tok = make_byte_tokenizer()
    cfg = RunConfig()
    cfg.data.num_examples, cfg.data.partition, cfg.data.max_length = 200, "iid", 64
    data = build_client_data(cfg, tok, 0, 2)
    model = _tiny_llama(tok)
    model.config.max_position_embeddings = 32
    with pytest.warns(UserWarning, match="data.max_length=64 .* max_position_embeddings=32"):
        evaluate(model, tok, data, max_examples=2)


@pytest.mark.parametrize("task, max_length", [("generation", 12), ("classification", 8)])
def test_references_as_long_as_a_row_are_evaluated_not_crashed_on(task, max_length):
    """A reference (or label) of at least data.max_length tokens left an empty prompt, and the final evaluation, after
    the whole run, failed in the model's forward ("cannot reshape tensor of 0 elements"). Now the prompt keeps at
    least one token (half the row for generation), and the bound on forward passes still holds."""
    tok = make_byte_tokenizer()
    cfg = RunConfig()
    cfg.data.task, cfg.data.num_examples, cfg.data.partition, cfg.data.max_length = task, 200, "iid", max_length
    data = build_client_data(cfg, tok, 0, 2)
    model = _Counting(_tiny_llama(tok))
    seen = []
    r = evaluate(model, tok, data, max_examples=6, batch_size=4, progress=lambda done, total: seen.append(total))
    assert math.isfinite(r["loss"]) and model.calls <= seen[0]
    assert (r["exact_match"] if task == "generation" else r["accuracy_gen"]) >= 0.0

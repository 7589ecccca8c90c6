"""Real instruction data: a stock Alpaca file under the shipped GPU recipe, ShareGPT rows, loss on every answer.

Loss masks are checked token by token against sequences built by hand from bytes: the byte tokenizer's ids are the
UTF-8 bytes, ``<s>`` is 257 and ``</s>`` (EOS) 258, so an expected sequence needs neither the tokenizer nor the chat
template to be written down.
"""

import copy
import json
import logging
import re
from collections import Counter
from pathlib import Path

import pytest

from deca_ds.config import ConfigError, RunConfig, load_config
from deca_ds.data import IGNORE_INDEX, build_client_data, check_data_config, detect_format
from deca_ds.data import loading
from deca_ds.data.formatting import conversation_turns, render_example, tokenize_example, tokenize_row
from deca_ds.data.loading import CATEGORY_FIELD, instruction_categories

ROOT = Path(__file__).resolve().parents[2]
BOS, EOS = 257, 258

# Stock Alpaca instructions start with a verb; 17 distinct first words, the last two rare (they become "(other)").
VERBS = ["Generate", "Write", "Explain", "Describe", "Give", "Create", "Name", "Identify", "Find", "Rewrite",
         "Classify", "Suggest", "Summarize", "Translate", "List", "Compose", "Brainstorm"]


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(loading, "_warned", set())


def _alpaca_rows(n):
    """Rows shaped like tatsu-lab's alpaca_data.json: instruction, input ('' for most rows), output; no label."""
    rows = []
    for i in range(n):
        verb = VERBS[i % 15] if i % 40 else VERBS[15 + (i // 40) % 2]
        rows.append({"instruction": f"{verb} something about item {i}.",
                     "input": "" if i % 3 else f"Context {i}",
                     "output": f"Answer number {i}."})
    return rows


def _write_alpaca(path, rows):
    path.write_text(json.dumps(rows, indent=4))  # alpaca_data.json is one indented JSON array
    return str(path)


def _reference_category(instruction):
    word = re.match(r"\W*(\w+)", instruction).group(1).lower()
    return word if word in {v.lower() for v in VERBS[:15]} else "(other)"


def test_gpu_recipe_splits_a_stock_alpaca_file_by_instruction_category(tok, tmp_path, caplog):
    rows = _alpaca_rows(400)
    stock = _write_alpaca(tmp_path / "alpaca_data.json", rows)
    # Reference: the same rows with the category written into the file by hand; a real column is split as is.
    labelled = _write_alpaca(tmp_path / "labelled.json",
                             [dict(r, **{CATEGORY_FIELD: _reference_category(r["instruction"])}) for r in rows])
    recipe = str(ROOT / "recipes" / "configs" / "gpu_bf16.yaml")
    cfg = load_config(recipe, [f"data.path={stock}"])
    ref_cfg = load_config(recipe, [f"data.path={labelled}"])
    assert (cfg.data.partition, cfg.data.partition_by) == ("dirichlet", CATEGORY_FIELD)
    with caplog.at_level(logging.WARNING, logger="deca_ds.data.loading"):
        check_data_config(cfg, 4)
        clients = [build_client_data(cfg, tok, c, 4) for c in range(4)]
    assert not caplog.records  # the recipe names the derived field: nothing to warn about
    expected_names = sorted({_reference_category(r["instruction"]) for r in rows})
    assert len(expected_names) == 16 and "(other)" in expected_names
    for c, d in enumerate(clients):
        ref = build_client_data(ref_cfg, tok, c, 4)
        assert d.train["input_ids"] == ref.train["input_ids"] and d.train["labels"] == ref.train["labels"]
        assert d.count_names == expected_names and d.label_names is None
        # Counts are the categories of what the client trains on, read back from its token ids.
        seen = Counter(_reference_category(tok.decode(ids).removeprefix("<s>user:")) for ids in d.train["input_ids"])
        assert [seen[n] for n in d.count_names] == d.counts[c].tolist()
        assert all(e["group"] in expected_names for e in d.test_examples)
    # Dirichlet(0.25) over 16 categories: clients hold different mixes (identical rows would mean no skew).
    assert len({tuple(d.counts[c]) for c in range(4)}) == 4


def test_missing_partition_field_falls_back_with_one_warning(tok, tmp_path, caplog):
    path = _write_alpaca(tmp_path / "alpaca_data.json", _alpaca_rows(200))
    cfg = RunConfig()
    cfg.data.path, cfg.data.min_partition_size = path, 5
    assert cfg.data.partition_by == "label"
    explicit = copy.deepcopy(cfg)
    explicit.data.partition_by = CATEGORY_FIELD
    with caplog.at_level(logging.WARNING, logger="deca_ds.data.loading"):
        check_data_config(cfg, 3)
        fallback = build_client_data(cfg, tok, 0, 3)
        build_client_data(cfg, tok, 1, 3)  # another client: never repeats the warning
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "\n" not in msgs[0]
    assert "data.partition_by='label'" in msgs[0] and CATEGORY_FIELD in msgs[0] and "data.partition=iid" in msgs[0]
    assert fallback.train["input_ids"] == build_client_data(explicit, tok, 0, 3).train["input_ids"]
    # natural: the field names the client, nothing can stand in for it.
    cfg.data.partition = "natural"
    with pytest.raises(ConfigError, match=r"data.partition_by='label' is not a field of alpaca_data.json") as err:
        check_data_config(cfg, 3)
    assert "\n" not in str(err.value)
    # iid never needed the field: no warning, rows counted as before.
    cfg.data.partition = "iid"
    assert build_client_data(cfg, tok, 0, 3).count_names == ["rows"]


def test_instruction_categories_keep_the_most_frequent_first_words():
    import datasets

    instructions = ["Write a poem.", "write a story", "  Explain: why?", "What's up?", "Explain X", "...", "Sort it",
                    "Add 2", "Write more"]
    ds = datasets.Dataset.from_list([{"instruction": x, "output": "y"} for x in instructions])
    # write 3, explain 2, then add/sort/what 1 each; limit 3 keeps write, explain and the alphabetically first "add".
    assert instruction_categories(ds, "alpaca", limit=3) == [
        "write", "write", "explain", "(other)", "explain", "(other)", "(other)", "add", "write"]
    chat = datasets.Dataset.from_list([{"messages": [{"role": "system", "content": "Be kind"},
                                                     {"role": "user", "content": "Summarize this"},
                                                     {"role": "assistant", "content": "ok"}]}])
    assert instruction_categories(chat, "chat") == ["summarize"]
    share = datasets.Dataset.from_list([{"conversations": [{"from": "human", "value": "Translate hello"},
                                                           {"from": "gpt", "value": "hola"}]}])
    assert instruction_categories(share, "sharegpt") == ["translate"]


# ---------------------------------------------------------------------------------------------------------------
# ShareGPT rows.

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]
SHAREGPT = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "hi"},
                              {"from": "gpt", "value": "hello"}, {"from": "human", "value": "2+2?"},
                              {"from": "gpt", "value": "4"}]}


def test_sharegpt_rows_become_chat_turns(tok):
    assert detect_format(["conversations", "id"]) == "sharegpt"
    assert detect_format(["messages", "conversations"]) == "chat"
    with pytest.raises(ValueError, match="conversations"):
        detect_format(["messages"], "sharegpt")
    assert conversation_turns(SHAREGPT, "sharegpt") == CHAT
    # user/assistant spellings and a top-level system field (LLaMA-Factory's sharegpt layout).
    other = {"system": "Be brief.", "conversations": [
        {"from": "user", "value": "hi"}, {"from": "assistant", "value": "hello"},
        {"from": "user", "value": "2+2?"}, {"from": "assistant", "value": "4"}]}
    assert conversation_turns(other, "sharegpt") == CHAT
    assert render_example(SHAREGPT, "sharegpt", tok) == render_example({"messages": CHAT}, "chat", tok)
    with pytest.raises(ValueError, match="from 'bot'.*human, user, gpt, assistant, system"):
        conversation_turns({"conversations": [{"from": "bot", "value": "x"}]}, "sharegpt")
    with pytest.raises(ValueError, match="last message must be the assistant"):
        conversation_turns({"conversations": SHAREGPT["conversations"][:-1]}, "sharegpt")


def test_sharegpt_file_trains_every_answer_and_reports_bad_rows(tok, tmp_path):
    rows = [{"id": f"r{i}", "conversations": [
        {"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"},
        {"from": "human", "value": "more"}, {"from": "gpt", "value": f"b{i}"}]} for i in range(10)]
    path = tmp_path / "sharegpt.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = RunConfig()
    cfg.data.path, cfg.data.partition, cfg.data.test_size = str(path), "iid", 0.0
    check_data_config(cfg, 2)
    d = build_client_data(cfg, tok, 0, 2)
    assert len(d.train) == 5
    for ids, labels in zip(d.train["input_ids"], d.train["labels"]):
        i = re.search(r"q(\d+)", tok.decode(ids)).group(1)
        trained = [t for t in labels if t != IGNORE_INDEX]
        assert trained == [*f"a{i}".encode(), EOS, *f"b{i}".encode(), EOS]
    rows[1]["conversations"][1]["from"] = "bot"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConfigError, match="line 2 of sharegpt.jsonl: conversations has a turn from 'bot'"):
        check_data_config(cfg, 2)
    cfg.data.format = "alpaca"
    with pytest.raises(ConfigError, match="format alpaca needs fields instruction and output"):
        check_data_config(cfg, 2)


# ---------------------------------------------------------------------------------------------------------------
# Loss on every assistant turn, token by token.


def _seq(*segments):
    """``(ids, labels)`` from ``(trained, part, part, ...)`` segments; a part is bytes (their values) or a token id."""
    ids, labels = [], []
    for trained, *parts in segments:
        piece = [t for p in parts for t in (list(p) if isinstance(p, bytes) else [p])]
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return ids, labels


def _check(ex, expected):
    ids, labels = expected
    assert ex["input_ids"] == ids
    assert ex["labels"] == labels
    assert ex["attention_mask"] == [1] * len(ids)


# The byte tokenizer's template: <s>role:content</s> per turn, <s>assistant: as generation prompt.
BYTE_TEMPLATE_ALL = _seq(
    (False, BOS, b"system:Be brief.", EOS, BOS, b"user:hi", EOS, BOS, b"assistant:"),
    (True, b"hello", EOS),
    (False, BOS, b"user:2+2?", EOS, BOS, b"assistant:"),
    (True, b"4", EOS),
)


def test_every_answer_carries_the_loss_and_nothing_else(tok):
    for row, fmt in (({"messages": CHAT}, "chat"), (SHAREGPT, "sharegpt")):
        _check(tokenize_row(row, fmt, tok, 128), BYTE_TEMPLATE_ALL)  # all_assistant is the default
        last = tokenize_row(row, fmt, tok, 128, loss_on="last_assistant")
        ids, _ = BYTE_TEMPLATE_ALL
        _check(last, (ids, [IGNORE_INDEX] * (len(ids) - 2) + [ord("4"), EOS]))
    # One answer: both settings give exactly the single-turn tokenization.
    single = {"messages": CHAT[:3]}
    reference = tokenize_example(*render_example(single, "chat", tok), tok, 128)
    for loss_on in ("all_assistant", "last_assistant"):
        assert tokenize_row(single, "chat", tok, 128, loss_on) == reference
    with pytest.raises(ValueError, match="loss_on"):
        tokenize_row(single, "chat", tok, 128, loss_on="every")


def test_template_end_of_turn_after_eos_stays_prompt(tok):
    chatml = copy.deepcopy(tok)  # ChatML-like: a turn ends with EOS and a newline
    chatml.chat_template = (
        "{% for m in messages %}{{ '<s>' + m['role'] + '\n' + m['content'] + '</s>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<s>assistant\n' }}{% endif %}"
    )
    expected = _seq(
        (False, BOS, b"system\nBe brief.", EOS, b"\n", BOS, b"user\nhi", EOS, b"\n", BOS, b"assistant\n"),
        (True, b"hello", EOS),
        (False, b"\n", BOS, b"user\n2+2?", EOS, b"\n", BOS, b"assistant\n"),
        (True, b"4", EOS),
    )
    _check(tokenize_row({"messages": CHAT}, "chat", chatml, 128), expected)


def test_without_a_template_the_transcript_gets_eos_after_every_answer(tok):
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    expected = _seq(
        (False, BOS, b"system: Be brief.\nuser: hi\nassistant: "),
        (True, b"hello", EOS),
        (False, b"\nuser: 2+2?\nassistant: "),
        (True, b"4", EOS),
    )
    _check(tokenize_row({"messages": CHAT}, "chat", plain, 128), expected)


def test_truncation_cuts_the_start_and_keeps_loss_on_surviving_answer_tokens(tok):
    # Lengths by hand: prompt part 38 + "hello</s>" 6 + second prompt 22 = 66 before the final answer "4</s>" (2).
    # max_length 26: the final answer fits (2 <= 26 - 13), so the prompt keeps its last 24 tokens: "o</s>" + 22.
    ex = tokenize_row({"messages": CHAT}, "chat", tok, 26)
    expected = _seq(
        (True, b"o", EOS),
        (False, BOS, b"user:2+2?", EOS, BOS, b"assistant:"),
        (True, b"4", EOS),
    )
    _check(ex, expected)


def test_template_that_rewrites_history_asks_for_last_assistant(tok, tmp_path):
    odd = copy.deepcopy(tok)  # writes the number of turns first: earlier renders are no prefix of later ones
    odd.chat_template = "{{ messages|length }}" + tok.chat_template
    with pytest.raises(ValueError, match="data.loss_on=last_assistant"):
        tokenize_row({"messages": CHAT}, "chat", odd, 128)
    assert tokenize_row({"messages": CHAT}, "chat", odd, 128, "last_assistant")["labels"][-2:] == [ord("4"), EOS]


def test_loss_on_and_sharegpt_are_settings():
    cfg = load_config(None, ["data.format=sharegpt", "data.loss_on=last_assistant"])
    assert (cfg.data.format, cfg.data.loss_on) == ("sharegpt", "last_assistant")
    assert RunConfig().data.loss_on == "all_assistant"
    with pytest.raises(ConfigError, match="data.loss_on='all' is not known.*all_assistant, last_assistant"):
        load_config(None, ["data.loss_on=all"])

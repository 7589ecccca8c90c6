"""Byte tokenizer, prompt formatting, response-only loss masks, truncation and packing."""

import copy

import pytest
from transformers import AutoTokenizer

from deca_ds.data import BYTE_VOCAB_SIZE, IGNORE_INDEX, detect_format, pack_examples
from deca_ds.data.formatting import fit_lengths, render_example, tokenize_example


def test_byte_tokenizer_round_trips_through_save_pretrained(tok, tmp_path):
    text = "héllo, wörld! 🙂 tab\tnew\nline  <- two spaces"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))  # ids are the UTF-8 bytes
    assert len(tok) == BYTE_VOCAB_SIZE and max(tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) < BYTE_VOCAB_SIZE
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text, add_special_tokens=False)["input_ids"] == ids
    assert again.decode(ids) == text
    assert (again.pad_token_id, again.eos_token_id, again.chat_template) == (
        tok.pad_token_id, tok.eos_token_id, tok.chat_template)


def test_response_only_mask_covers_exactly_the_response(tok):
    row = {"instruction": "Reverse the letters.", "input": "abc", "output": "cba"}
    prompt, response = render_example(row, "alpaca", tok)
    ex = tokenize_example(prompt, response, tok, max_length=128)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert ex["input_ids"][:n_prompt] == tok(prompt, add_special_tokens=False)["input_ids"]
    assert all(label == IGNORE_INDEX for label in ex["labels"][:n_prompt])
    assert ex["labels"][n_prompt:] == list(b"cba") + [tok.eos_token_id]
    assert ex["input_ids"][n_prompt:] == ex["labels"][n_prompt:]
    assert tok.decode(ex["input_ids"]) == prompt + "cba</s>"
    assert ex["attention_mask"] == [1] * len(ex["input_ids"])


def test_chat_template_used_when_present(tok):
    row = {"instruction": "Add the two numbers.", "input": "1 + 2", "output": "3"}
    prompt, _ = render_example(row, "alpaca", tok)
    assert prompt == "<s>user:Add the two numbers.\n1 + 2</s><s>assistant:"
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    prompt, _ = render_example(row, "alpaca", plain)
    assert prompt == "### Instruction:\nAdd the two numbers.\n\n### Input:\n1 + 2\n\n### Response:\n"
    # Without a template the prompt starts with BOS; with one the template writes its own markers.
    assert tokenize_example(prompt, "3", plain, 128)["input_ids"][0] == plain.bos_token_id


def test_chat_rows_use_earlier_turns_as_prompt(tok):
    row = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]}
    prompt, response = render_example(row, "chat", tok)
    assert prompt == tok.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True)
    assert response == "4"
    ex = tokenize_example(prompt, response, tok, 128)
    assert [t for t in ex["labels"] if t != IGNORE_INDEX] == [ord("4"), tok.eos_token_id]
    with pytest.raises(ValueError, match="assistant"):
        render_example({"messages": row["messages"][:-1]}, "chat", tok)


def test_detect_format():
    assert detect_format(["instruction", "input", "output"]) == "alpaca"
    assert detect_format(["messages"]) == "chat"
    with pytest.raises(ValueError, match="cannot detect"):
        detect_format(["text"])
    with pytest.raises(ValueError, match="output"):
        detect_format(["instruction"], "alpaca")
    with pytest.raises(ValueError, match="unknown format"):
        detect_format(["messages"], "xml")


def test_truncation_rule():
    assert fit_lengths(10, 5, 128) == (10, 5)  # fits: untouched
    assert fit_lengths(200, 20, 128) == (108, 20)  # prompt gives way
    assert fit_lengths(200, 100, 128) == (64, 64)  # both long: half each
    assert fit_lengths(10, 150, 128) == (10, 118)  # short prompt: response keeps the rest


def test_long_prompt_keeps_its_end_and_the_whole_response(tok):
    prompt = "<s>user:" + "x" * 300 + "END</s><s>assistant:"
    ex = tokenize_example(prompt, "yes", tok, max_length=64)
    assert len(ex["input_ids"]) == 64
    assert tok.decode(ex["input_ids"]).endswith("xxEND</s><s>assistant:yes</s>")
    assert sum(t != IGNORE_INDEX for t in ex["labels"]) == 4


def test_packing_keeps_masks_per_example():
    examples = {
        "input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]],
        "labels": [[-100, 2, 3], [-100, 5], [-100, -100, 8, 9], [10]],
        "attention_mask": [[1] * 3, [1] * 2, [1] * 4, [1]],
    }
    packed = pack_examples(examples, max_length=5)
    assert packed["input_ids"] == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    assert packed["labels"] == [[-100, 2, 3, -100, 5], [-100, -100, 8, 9, 10]]
    assert packed["attention_mask"] == [[1] * 5, [1] * 5]

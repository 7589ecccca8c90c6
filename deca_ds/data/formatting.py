"""Instruction formatting and tokenization with response-only loss.

A row becomes a ``(prompt, response)`` pair of texts, then token ids where the loss mask (``labels``) covers exactly
the response tokens and the end-of-sequence token. Prompt and response are tokenized separately and concatenated,
so a prompt tokenized alone at evaluation time (for generation or label log-likelihoods) is a prefix of what the
model was trained on, whatever the tokenizer's merges.

Formats:

- ``alpaca``: ``instruction``, optional ``input``, ``output``.
- ``chat``: ``messages``, a list of ``{"role", "content"}``; the last message must be the assistant's.
- ``sharegpt``: ``conversations``, a list of ``{"from", "value"}`` with ``from`` one of :data:`SHAREGPT_ROLES`
  (``human``/``gpt``/``system``, or ``user``/``assistant``), and an optional top-level ``system`` string; the last
  turn must be the assistant's. Rows are turned into ``chat`` turns (:func:`conversation_turns`).

With a chat template on the tokenizer, the prompt is ``apply_chat_template(turns, add_generation_prompt=True)``
(alpaca rows become one user turn); without one, alpaca rows use the classic ``### Instruction`` layout and chat
rows a ``role: content`` transcript.

Loss (``loss_on``, :data:`LOSS_ON`): ``last_assistant`` trains the final assistant turn and EOS, everything before it
is prompt. ``all_assistant`` (the default) also trains every earlier assistant turn of a multi-turn chat: the
conversation is built turn by turn, each assistant turn's content tokens followed by EOS carry the loss, every other
token (system and user turns, role markers, the text between turns) is ``IGNORE_INDEX``. The template's end-of-turn
text after an answer is replaced by that EOS when it starts with the EOS token's text (so the tokens equal the
template's rendering for templates that end turns with EOS, e.g. ChatML with ``<|im_end|>``); otherwise the EOS is
inserted before it (the model must learn to stop after every answer, as at generation time). Single-turn rows
(every alpaca row) give the same tokens and labels under both settings.

Truncation rule (``max_length`` tokens per example): the prompt gives way first, losing tokens from its *start*
(the generation marker the response follows and the text next to it are kept), but never below half of
``max_length`` while the response needs room; a response (with EOS) longer than what is left keeps its first tokens
and loses its end, EOS included. In a multi-turn chat the response is the final assistant turn and the prompt is
everything before it, earlier answers included: those keep their loss on whatever tokens survive.
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = [
    "IGNORE_INDEX",
    "LOSS_ON",
    "SHAREGPT_ROLES",
    "detect_format",
    "conversation_turns",
    "render_example",
    "tokenize_example",
    "tokenize_conversation",
    "tokenize_row",
    "pack_examples",
    "fit_lengths",
    "prompt_ids_for_eval",
]

IGNORE_INDEX = -100
"""Label of tokens without loss (prompt, padding), as ``torch.nn.CrossEntropyLoss`` expects."""

LOSS_ON = ("all_assistant", "last_assistant")
"""Values of ``data.loss_on``: which assistant turns of a chat carry the loss (module docstring)."""

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
"""ShareGPT ``from`` value -> chat role."""


def detect_format(columns: Sequence[str], fmt: str = "auto") -> str:
    """Resolve the data format from a dataset's column names.

    Args:
        columns: column names of the dataset.
        fmt: ``auto``, ``alpaca``, ``chat`` or ``sharegpt``. ``auto`` picks ``chat`` for a ``messages`` field, else
            ``sharegpt`` for ``conversations``, else ``alpaca`` for ``instruction`` and ``output``.

    Returns:
        ``alpaca``, ``chat`` or ``sharegpt``.

    Raises:
        ValueError: unknown ``fmt``, or the columns required by the format are missing (message names them).
    """
    cols = set(columns)
    if fmt == "auto":
        if "messages" in cols:
            return "chat"
        if "conversations" in cols:
            return "sharegpt"
        if {"instruction", "output"} <= cols:
            return "alpaca"
        raise ValueError(
            f"cannot detect the format from fields {sorted(cols)}: give alpaca fields (instruction, input, output), "
            "chat fields (messages) or sharegpt fields (conversations)"
        )
    if fmt == "alpaca":
        missing = [c for c in ("instruction", "output") if c not in cols]
        if missing:
            raise ValueError(f"format alpaca needs fields instruction and output; missing: {', '.join(missing)}")
        return fmt
    if fmt == "chat":
        if "messages" not in cols:
            raise ValueError("format chat needs a messages field (a list of {role, content})")
        return fmt
    if fmt == "sharegpt":
        if "conversations" not in cols:
            raise ValueError("format sharegpt needs a conversations field (a list of {from, value})")
        return fmt
    raise ValueError(f"unknown format {fmt!r}: use auto, alpaca, chat or sharegpt")


def _text(value: Any, what: str) -> str:
    """``value`` as training text: a string, or a number written as one.

    Raises:
        ValueError: null, true/false, a list or an object, which ``str()`` would silently turn into Python's
            spelling (``None``, ``True``, ``['a']``) and train on.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    kinds = {type(None): "null", bool: "true/false", list: "a list", dict: "an object"}
    raise ValueError(f"{what} is {kinds.get(type(value), type(value).__name__)}, not text: give it as a string")


def _alpaca_texts(row: dict[str, Any]) -> tuple[str, str]:
    """An alpaca row's ``(instruction, input)`` texts; a missing or null ``input`` is ``""``."""
    extra = row.get("input")
    return _text(row["instruction"], "instruction"), "" if extra is None else _text(extra, "input")


def _alpaca_user_text(row: dict[str, Any]) -> str:
    instruction, extra = _alpaca_texts(row)
    return f"{instruction}\n{extra}" if extra else instruction


def conversation_turns(row: dict[str, Any], fmt: str) -> list[dict[str, str]]:
    """One row as chat turns ``[{"role", "content"}, ...]`` ending with the assistant's answer.

    Args:
        row: a dataset row in format ``fmt``.
        fmt: ``alpaca`` (one user turn, then the output), ``chat`` or ``sharegpt`` (roles mapped by
            :data:`SHAREGPT_ROLES`; a non-empty top-level ``system`` string becomes a leading system turn unless the
            conversation starts with one).

    Returns:
        The turns, contents as strings (a number written as text); the last turn's role is ``assistant``.

    Raises:
        ValueError: malformed turns, an unknown ShareGPT role, a text field or content that is not a string or a
            number (null, true/false, a list such as multimodal content parts), or a last turn that is not the
            assistant's.
    """
    if fmt == "alpaca":
        return [{"role": "user", "content": _alpaca_user_text(row)},
                {"role": "assistant", "content": _text(row["output"], "output")}]
    if fmt == "chat":
        messages = row["messages"]
        if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages
        ):
            raise ValueError("messages must be a non-empty list of {role, content}")
        turns = []
        for k, m in enumerate(messages, start=1):
            if not isinstance(m["role"], str):  # a chat template fails on it deep inside Jinja
                raise ValueError(f"the role of message {k} is {m['role']!r}: give each message a role string")
            turns.append({"role": m["role"], "content": _text(m["content"], f"the content of message {k}")})
    elif fmt == "sharegpt":
        conv = row["conversations"]
        if not isinstance(conv, list) or not conv or not all(
            isinstance(t, dict) and t.get("from") is not None and t.get("value") is not None for t in conv
        ):
            raise ValueError("conversations must be a non-empty list of {from, value}")
        turns = []
        for k, t in enumerate(conv, start=1):
            role = SHAREGPT_ROLES.get(str(t["from"]).lower())
            if role is None:
                raise ValueError(
                    f"conversations has a turn from {t['from']!r}: use one of {', '.join(SHAREGPT_ROLES)}"
                )
            turns.append({"role": role, "content": _text(t["value"], f"the value of turn {k}")})
        system = row.get("system")
        if isinstance(system, str) and system.strip() and turns[0]["role"] != "system":
            turns.insert(0, {"role": "system", "content": system})
    else:
        raise ValueError(f"unknown format {fmt!r}: use alpaca, chat or sharegpt")
    if turns[-1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant's (it is the response)")
    return turns


def _render_turns(turns: list[dict[str, str]], tokenizer, generation_prompt: bool) -> str:
    """Text of ``turns`` through the tokenizer's chat template, or the ``role: content`` transcript without one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
    text = "".join(f"{t['role']}: {t['content']}\n" for t in turns)
    return text + "assistant: " if generation_prompt else text


def render_example(row: dict[str, Any], fmt: str, tokenizer) -> tuple[str, str]:
    """Turn one row into ``(prompt_text, response_text)``: the final assistant turn and everything before it.

    Args:
        row: a dataset row in format ``fmt``.
        fmt: ``alpaca``, ``chat`` or ``sharegpt``.
        tokenizer: a ``transformers`` tokenizer; its chat template is used when it has one.

    Returns:
        The prompt (ending with the generation marker) and the response text (no EOS).

    Raises:
        ValueError: a chat row whose messages are malformed or do not end with an assistant turn.
    """
    turns = conversation_turns(row, fmt)
    response = turns[-1]["content"]
    if fmt == "alpaca" and not getattr(tokenizer, "chat_template", None):
        instruction, extra = _alpaca_texts(row)
        prompt = f"### Instruction:\n{instruction}\n\n"
        if extra:
            prompt += f"### Input:\n{extra}\n\n"
        prompt += "### Response:\n"
    else:
        prompt = _render_turns(turns[:-1], tokenizer, generation_prompt=True)
    return prompt, response


def fit_lengths(prompt_len: int, response_len: int, max_length: int) -> tuple[int, int]:
    """Token counts kept by the truncation rule (module docstring).

    Args:
        prompt_len: prompt tokens.
        response_len: response tokens including EOS.
        max_length: tokens allowed per example.

    Returns:
        ``(kept_prompt, kept_response)``; the prompt keeps its last ``kept_prompt`` tokens, the response its first
        ``kept_response``.
    """
    if prompt_len + response_len <= max_length:
        return prompt_len, response_len
    kept_response = min(response_len, max(max_length - max_length // 2, max_length - prompt_len))
    return min(prompt_len, max_length - kept_response), kept_response


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    # Without a chat template nothing marks the start of the sequence; add BOS like most pretraining did.
    if not getattr(tokenizer, "chat_template", None) and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    return ids


def tokenize_example(prompt: str, response: str, tokenizer, max_length: int) -> dict[str, list[int]]:
    """Tokenize one example with loss on the response and EOS only.

    Args:
        prompt: prompt text (from :func:`render_example`).
        response: response text.
        tokenizer: the tokenizer; needs an EOS token.
        max_length: tokens per example (truncation rule in the module docstring).

    Returns:
        ``input_ids``, ``labels`` (``IGNORE_INDEX`` on prompt tokens) and ``attention_mask`` lists.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token: set one (responses must end with EOS)")
    p = _prompt_ids(tokenizer, prompt)
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    kp, kr = fit_lengths(len(p), len(r), max_length)
    p, r = p[len(p) - kp:], r[:kr]
    return {
        "input_ids": p + r,
        "labels": [IGNORE_INDEX] * len(p) + r,
        "attention_mask": [1] * (len(p) + len(r)),
    }


def tokenize_conversation(turns: list[dict[str, str]], tokenizer, max_length: int) -> dict[str, list[int]]:
    """Tokenize a chat with loss on every assistant turn (``loss_on: all_assistant``, module docstring).

    The conversation is built turn by turn so that each assistant answer's tokens are known: before answer ``k``
    comes the part of ``render(turns[:a_k], generation prompt)`` not yet emitted; answer ``k`` is its content tokens
    plus EOS (loss); after it comes the template's end-of-turn text (the EOS stands for it when it starts with the
    EOS token's text). The last answer is the response of the truncation rule, everything before it the prompt.

    Args:
        turns: chat turns ending with an assistant turn (:func:`conversation_turns`).
        tokenizer: the tokenizer; needs an EOS token.
        max_length: tokens per example.

    Returns:
        ``input_ids``, ``labels`` (``IGNORE_INDEX`` on every non-assistant token) and ``attention_mask`` lists.

    Raises:
        ValueError: no EOS token, no final assistant turn, or a chat template that does not render earlier turns
            as a prefix of later ones (then only ``data.loss_on=last_assistant`` is well defined).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token: set one (responses must end with EOS)")
    answers = [i for i, t in enumerate(turns) if t["role"] == "assistant"]
    if not answers or answers[-1] != len(turns) - 1:
        raise ValueError("the last message must be the assistant's (it is the response)")

    def text_ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def not_a_prefix(what: str) -> ValueError:
        return ValueError(
            f"the tokenizer's chat template renders {what} differently once later turns follow, so earlier "
            "answers cannot be located: set data.loss_on=last_assistant"
        )

    ids: list[int] = []
    labels: list[int] = []
    emitted = ""  # rendered text already turned into tokens (the EOS of an answer counts as its end-of-turn text)
    for k, a in enumerate(answers):
        prompt = _render_turns(turns[:a], tokenizer, generation_prompt=True)
        if k == 0:
            piece = _prompt_ids(tokenizer, prompt)
        else:
            if not prompt.startswith(emitted):
                raise not_a_prefix(f"the conversation up to answer {k}")
            piece = text_ids(prompt[len(emitted):])
        ids += piece
        labels += [IGNORE_INDEX] * len(piece)
        content = turns[a]["content"]
        answer = text_ids(content) + [eos]
        if a == answers[-1]:
            break
        ids += answer
        labels += answer
        done = _render_turns(turns[:a + 1], tokenizer, generation_prompt=False)
        if not done.startswith(prompt + content):
            raise not_a_prefix(f"answer {k + 1}")
        tail = done[len(prompt) + len(content):]
        if tokenizer.eos_token and tail.startswith(tokenizer.eos_token):
            tail = tail[len(tokenizer.eos_token):]
        tail_ids = text_ids(tail)
        ids += tail_ids
        labels += [IGNORE_INDEX] * len(tail_ids)
        emitted = done
    kp, kr = fit_lengths(len(ids), len(answer), max_length)
    ids, labels, answer = ids[len(ids) - kp:], labels[len(labels) - kp:], answer[:kr]
    return {
        "input_ids": ids + answer,
        "labels": labels + answer,
        "attention_mask": [1] * (len(ids) + len(answer)),
    }


def tokenize_row(row: dict[str, Any], fmt: str, tokenizer, max_length: int,
                 loss_on: str = "all_assistant") -> dict[str, list[int]]:
    """Tokenize one dataset row for training (what :mod:`deca_ds.data.loading` calls for every row).

    Args:
        row: a dataset row in format ``fmt``.
        fmt: ``alpaca``, ``chat`` or ``sharegpt``.
        tokenizer: the tokenizer; needs an EOS token.
        max_length: tokens per example (truncation rule in the module docstring).
        loss_on: ``all_assistant`` or ``last_assistant`` (:data:`LOSS_ON`).

    Returns:
        ``input_ids``, ``labels``, ``attention_mask`` lists. A row with one assistant turn gives exactly
        ``tokenize_example(*render_example(row, fmt, tokenizer), tokenizer, max_length)`` under both settings.

    Raises:
        ValueError: unknown ``loss_on``, a malformed row, or as :func:`tokenize_conversation`.
    """
    if loss_on not in LOSS_ON:
        raise ValueError(f"unknown loss_on {loss_on!r}: use {' or '.join(LOSS_ON)}")
    if loss_on == "all_assistant" and fmt != "alpaca":
        turns = conversation_turns(row, fmt)
        if sum(t["role"] == "assistant" for t in turns) > 1:
            return tokenize_conversation(turns, tokenizer, max_length)
    prompt, response = render_example(row, fmt, tokenizer)
    return tokenize_example(prompt, response, tokenizer, max_length)


def prompt_ids_for_eval(prompt: str, tokenizer, max_prompt: int) -> list[int]:
    """Prompt tokens as in training, keeping the last ``max_prompt`` (same left truncation)."""
    ids = _prompt_ids(tokenizer, prompt)
    return ids[max(0, len(ids) - max_prompt):]


def pack_examples(examples: dict[str, list[list[int]]], max_length: int) -> dict[str, list[list[int]]]:
    """Greedy packing: consecutive whole examples concatenated into rows of at most ``max_length`` tokens.

    Loss masks stay per example (each example's prompt is still masked). No example is split across rows. The
    packed examples attend to each other within a row (plain causal attention, no document masking), as in most
    packing implementations; positions run on across example boundaries.

    Args:
        examples: columns ``input_ids``, ``labels``, ``attention_mask`` (one list per example, each ≤ max_length).
        max_length: tokens per packed row.

    Returns:
        The same columns, with fewer, longer rows.
    """
    out: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "attention_mask": []}
    cur: dict[str, list[int]] = {k: [] for k in out}
    for ids, labels in zip(examples["input_ids"], examples["labels"]):
        if cur["input_ids"] and len(cur["input_ids"]) + len(ids) > max_length:
            for k in out:
                out[k].append(cur[k])
            cur = {k: [] for k in out}
        cur["input_ids"] += ids
        cur["labels"] += labels
        cur["attention_mask"] += [1] * len(ids)
    if cur["input_ids"]:
        for k in out:
            out[k].append(cur[k])
    return out


POSITION_LIMIT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
"""Names model configs give their longest sequence (Llama/Qwen/Mistral; GPT-2; others), tried in this order."""


def position_limit(model_config) -> int | None:
    """The longest sequence a model's positions cover, from its config; None when the config names no limit."""
    for key in POSITION_LIMIT_KEYS:
        value = getattr(model_config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None

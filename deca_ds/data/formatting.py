"""Instruction formatting and tokenization with response-only loss.

A row becomes a ``(prompt, response)`` pair of texts, then token ids where the loss mask (``labels``) covers exactly
the response tokens and the end-of-sequence token. Prompt and response are tokenized separately and concatenated,
so a prompt tokenized alone at evaluation time (for generation or label log-likelihoods) is a prefix of what the
model was trained on, whatever the tokenizer's merges.

Formats:

- ``alpaca``: ``instruction``, optional ``input``, ``output``.
- ``chat``: ``messages``, a list of ``{"role", "content"}``; the last message must be the assistant's and is the
  response (loss on the final assistant turn only; earlier turns are prompt).

With a chat template on the tokenizer, the prompt is ``apply_chat_template(turns, add_generation_prompt=True)``
(alpaca rows become one user turn); without one, alpaca rows use the classic ``### Instruction`` layout and chat
rows a ``role: content`` transcript.

Truncation rule (``max_length`` tokens per example): the prompt gives way first, losing tokens from its *start*
(the generation marker the response follows and the text next to it are kept), but never below half of
``max_length`` while the response needs room; a response (with EOS) longer than what is left keeps its first tokens
and loses its end, EOS included.
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = [
    "IGNORE_INDEX",
    "detect_format",
    "render_example",
    "tokenize_example",
    "pack_examples",
    "fit_lengths",
    "prompt_ids_for_eval",
]

IGNORE_INDEX = -100
"""Label of tokens without loss (prompt, padding), as ``torch.nn.CrossEntropyLoss`` expects."""


def detect_format(columns: Sequence[str], fmt: str = "auto") -> str:
    """Resolve the data format from a dataset's column names.

    Args:
        columns: column names of the dataset.
        fmt: ``auto``, ``alpaca`` or ``chat``.

    Returns:
        ``alpaca`` or ``chat``.

    Raises:
        ValueError: unknown ``fmt``, or the columns required by the format are missing (message names them).
    """
    cols = set(columns)
    if fmt == "auto":
        if "messages" in cols:
            return "chat"
        if {"instruction", "output"} <= cols:
            return "alpaca"
        raise ValueError(
            f"cannot detect the format from fields {sorted(cols)}: give alpaca fields (instruction, input, output) "
            "or chat fields (messages)"
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
    raise ValueError(f"unknown format {fmt!r}: use auto, alpaca or chat")


def _alpaca_user_text(row: dict[str, Any]) -> str:
    extra = row.get("input") or ""
    return f"{row['instruction']}\n{extra}" if extra else str(row["instruction"])


def render_example(row: dict[str, Any], fmt: str, tokenizer) -> tuple[str, str]:
    """Turn one row into ``(prompt_text, response_text)``.

    Args:
        row: a dataset row in format ``fmt``.
        fmt: ``alpaca`` or ``chat``.
        tokenizer: a ``transformers`` tokenizer; its chat template is used when it has one.

    Returns:
        The prompt (ending with the generation marker) and the response text (no EOS).

    Raises:
        ValueError: a chat row whose messages are malformed or do not end with an assistant turn.
    """
    if fmt == "alpaca":
        turns = [{"role": "user", "content": _alpaca_user_text(row)}]
        response = str(row["output"])
    elif fmt == "chat":
        messages = row["messages"]
        if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages
        ):
            raise ValueError("messages must be a non-empty list of {role, content}")
        if messages[-1]["role"] != "assistant":
            raise ValueError("the last message must be the assistant's (it is the response)")
        turns = [{"role": m["role"], "content": str(m["content"])} for m in messages[:-1]]
        response = str(messages[-1]["content"])
    else:
        raise ValueError(f"unknown format {fmt!r}: use alpaca or chat")
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    elif fmt == "alpaca":
        extra = row.get("input") or ""
        prompt = f"### Instruction:\n{row['instruction']}\n\n"
        if extra:
            prompt += f"### Input:\n{extra}\n\n"
        prompt += "### Response:\n"
    else:
        prompt = "".join(f"{t['role']}: {t['content']}\n" for t in turns) + "assistant: "
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


"""Evaluation on the global test split: who learned what.

Each client (and the consensus model) is scored on the same test rows: loss and perplexity over response tokens,
and for classification, accuracy, macro-F1 and per-label accuracy, once by comparing the log-likelihoods of the
label names (primary: robust while the model is still learning the output format) and once by greedy generation
with exact match. Metric maths lives in pure functions (:func:`classification_metrics`) tested against
hand-computed values; :func:`evaluate` only runs the model.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from deca_ds.data.formatting import IGNORE_INDEX, prompt_ids_for_eval
from deca_ds.data.loading import collate

__all__ = ["classification_metrics", "token_loss", "evaluate", "greedy_generate", "continuation_logprobs"]


def classification_metrics(predictions: Sequence[int], targets: Sequence[int], num_labels: int) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-label accuracy of class predictions.

    A prediction of ``-1`` (e.g. a generation that is no label name) is wrong for its row and counts as a false
    positive of no class. Macro-F1 averages the F1 of the labels that occur in the targets or the predictions
    (scikit-learn's convention); a label with no true positive has F1 0. Per-label accuracy is the recall of each
    label among the rows that carry it (``nan`` for a label absent from the targets).

    Args:
        predictions: predicted class per row, in ``[-1, num_labels)``.
        targets: true class per row, in ``[0, num_labels)``.
        num_labels: number of classes.

    Returns:
        ``accuracy`` (float), ``macro_f1`` (float), ``per_label_accuracy`` (list of ``num_labels`` floats).
    """
    pred = np.asarray(predictions, dtype=np.int64)
    true = np.asarray(targets, dtype=np.int64)
    if pred.shape != true.shape:
        raise ValueError(f"predictions {pred.shape} and targets {true.shape} differ in shape")
    if len(true) == 0:
        return {"accuracy": float("nan"), "macro_f1": float("nan"), "per_label_accuracy": [float("nan")] * num_labels}
    f1s, per_label = [], []
    for k in range(num_labels):
        tp = int(np.sum((pred == k) & (true == k)))
        fp = int(np.sum((pred == k) & (true != k)))
        fn = int(np.sum((pred != k) & (true == k)))
        support = tp + fn
        per_label.append(tp / support if support else float("nan"))
        if support or tp + fp:
            f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {
        "accuracy": float(np.mean(pred == true)),
        "macro_f1": float(np.mean(f1s)) if f1s else float("nan"),
        "per_label_accuracy": per_label,
    }


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy over labelled tokens, and their count.

    Args:
        logits: ``[batch, seq, vocab]``, any float dtype (computed in fp32).
        labels: ``[batch, seq]`` with ``-100`` on tokens without loss; position ``t`` predicts ``labels[t]`` from
            ``logits[t-1]`` (the Hugging Face causal-LM convention).

    Returns:
        ``(sum of losses, number of labelled tokens)``.
    """
    # bf16 logits lose precision in log-softmax: upcast before the reduction.
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum",
    )
    return float(loss), int((shift_labels != IGNORE_INDEX).sum())


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _logits(model, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    return model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits


def continuation_logprobs(model, prompts: list[list[int]], continuations: list[list[int]], pad_id: int,
                          batch_size: int = 16) -> list[float]:
    """Sum of log-probabilities of each continuation given its prompt.

    Args:
        model: a causal LM returning ``.logits``.
        prompts: token ids per row.
        continuations: token ids per row (scored).
        pad_id: padding id (right padding; causal attention never sees it from earlier positions).
        batch_size: rows per forward pass.

    Returns:
        One float per row.
    """
    device = _device(model)
    out: list[float] = []
    for s in range(0, len(prompts), batch_size):
        pairs = list(zip(prompts[s:s + batch_size], continuations[s:s + batch_size]))
        ids = [p + c for p, c in pairs]
        labels = [[IGNORE_INDEX] * len(p) + c for p, c in pairs]
        batch = collate({"input_ids": ids, "labels": labels}, pad_id)
        logits = _logits(model, batch, device)
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        tgt = batch["labels"][:, 1:].to(device)
        mask = tgt != IGNORE_INDEX
        picked = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
        out.extend(picked.sum(dim=1).tolist())
    return out


def greedy_generate(model, prompts: list[list[int]], max_new_tokens: int, eos_id: int, pad_id: int,
                    batch_size: int = 16) -> list[list[int]]:
    """Greedy decoding without a KV cache, right-padded so positions match training exactly.

    Each row's next token is read at its own last position and written right after it; with causal attention the
    padding to the right of a row never influences it. Stops per row at EOS (not included in the output).

    Args:
        model: a causal LM returning ``.logits``.
        prompts: token ids per row.
        max_new_tokens: tokens generated at most per row.
        eos_id: end-of-sequence id.
        pad_id: padding id.
        batch_size: rows per forward pass.

    Returns:
        Generated token ids per row.
    """
    device = _device(model)
    results: list[list[int]] = []
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s:s + batch_size]
        lens = torch.tensor([len(p) for p in chunk], device=device)
        width = int(lens.max()) + max_new_tokens
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long, device=device)
        for i, p in enumerate(chunk):
            ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
        gen: list[list[int]] = [[] for _ in chunk]
        rows = torch.arange(len(chunk), device=device)
        for _ in range(max_new_tokens):
            cur = int(lens.max())
            mask = (torch.arange(cur, device=device)[None, :] < lens[:, None]).long()
            logits = model(input_ids=ids[:, :cur], attention_mask=mask).logits
            nxt = logits[rows, lens - 1].float().argmax(dim=-1)
            for i in torch.nonzero(~done).flatten().tolist():
                tok = int(nxt[i])
                if tok == eos_id:
                    done[i] = True
                else:
                    gen[i].append(tok)
            ids[rows, lens] = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            lens = lens + (~done).long()
            if bool(done.all()):
                break
        results.extend(gen)
    return results


@torch.no_grad()
def evaluate(model, tokenizer, data, max_examples: int, batch_size: int = 16) -> dict[str, Any]:
    """Score a model on the first ``max_examples`` rows of the global test split.

    Args:
        model: a causal LM (``model(input_ids, attention_mask).logits``); its device is taken from its parameters.
        tokenizer: the tokenizer the data was built with.
        data: a :class:`~deca_ds.data.loading.ClientData`.
        max_examples: test rows used (``0`` or less: all).
        batch_size: rows per forward pass.

    Returns:
        ``examples``, ``loss`` and ``perplexity`` (token-weighted over response tokens). For classification data
        also ``accuracy``/``macro_f1``/``per_label_accuracy`` (by label log-likelihood; the same under ``*_ll``)
        and ``accuracy_gen``/``macro_f1_gen``/``per_label_accuracy_gen`` (greedy generation, exact match);
        per-label values are dicts keyed by label name. For other data ``exact_match`` (greedy generation) and,
        where rows have groups, ``per_group_exact_match``. All values are plain floats (JSON-serializable).
    """
    n = len(data.test) if max_examples <= 0 else min(max_examples, len(data.test))
    was_training = model.training
    model.eval()
    try:
        return _evaluate(model, tokenizer, data, n, batch_size)
    finally:
        model.train(was_training)


def _evaluate(model, tokenizer, data, n: int, batch_size: int) -> dict[str, Any]:
    device = _device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: dict[str, Any] = {"examples": n}
    if n == 0:
        return out
    total, count = 0.0, 0
    for s in range(0, n, batch_size):
        batch = collate(data.test[s:min(s + batch_size, n)], pad_id)
        logits = _logits(model, batch, device)
        loss_sum, tokens = token_loss(logits, batch["labels"].to(device))
        total, count = total + loss_sum, count + tokens
    out["loss"] = total / max(count, 1)
    out["perplexity"] = math.exp(min(out["loss"], 700.0))

    rows = data.test_examples[:n]
    eos = tokenizer.eos_token_id
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    if data.label_names:
        names = list(data.label_names)
        conts = [encode(name) + [eos] for name in names]
        prompts = [prompt_ids_for_eval(r["prompt"], tokenizer, data.max_length - max(len(c) for c in conts))
                   for r in rows]
        scores = continuation_logprobs(
            model, [p for p in prompts for _ in names], [c for _ in prompts for c in conts], pad_id, batch_size
        )
        pred_ll = np.asarray(scores).reshape(n, len(names)).argmax(axis=1)
        lookup = {name: k for k, name in enumerate(names)}
        targets = [lookup[r["label"]] for r in rows]
        gen = greedy_generate(model, prompts, max(len(c) for c in conts), eos, pad_id, batch_size)
        pred_gen = [lookup.get(tokenizer.decode(g, skip_special_tokens=True).strip(), -1) for g in gen]
        for suffix, pred in (("_ll", pred_ll), ("_gen", pred_gen)):
            m = classification_metrics(pred, targets, len(names))
            out[f"accuracy{suffix}"] = m["accuracy"]
            out[f"macro_f1{suffix}"] = m["macro_f1"]
            out[f"per_label_accuracy{suffix}"] = dict(zip(names, m["per_label_accuracy"]))
        out["accuracy"], out["macro_f1"] = out["accuracy_ll"], out["macro_f1_ll"]
        out["per_label_accuracy"] = out["per_label_accuracy_ll"]
    else:
        refs = [r["response"] for r in rows]
        longest = max(len(encode(t)) for t in refs) + 1
        prompts = [prompt_ids_for_eval(r["prompt"], tokenizer, data.max_length - longest) for r in rows]
        gen = greedy_generate(model, prompts, longest, eos, pad_id, batch_size)
        hits = [tokenizer.decode(g, skip_special_tokens=True).strip() == ref.strip() for g, ref in zip(gen, refs)]
        out["exact_match"] = float(np.mean(hits))
        groups = [r.get("group") for r in rows]
        if any(g is not None for g in groups):
            per: dict[str, list[bool]] = {}
            for g, h in zip(groups, hits):
                if g is not None:
                    per.setdefault(g, []).append(h)
            out["per_group_exact_match"] = {g: float(np.mean(v)) for g, v in sorted(per.items())}
    return out

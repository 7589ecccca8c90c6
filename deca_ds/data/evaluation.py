"""Evaluation on the global test split: who learned what.

Each client (and the consensus model) is scored on the same test rows: loss and perplexity over response tokens,
and for classification, accuracy, macro-F1 and per-label accuracy, once by comparing the log-likelihoods of the
label names (primary: robust while the model is still learning the output format) and once by greedy generation
with exact match. Metric maths lives in pure functions (:func:`classification_metrics`) tested against
hand-computed values; :func:`evaluate` only runs the model.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from deca_ds.data.formatting import IGNORE_INDEX, prompt_ids_for_eval
from deca_ds.data.loading import collate

__all__ = ["classification_metrics", "token_loss", "evaluate", "eval_progress", "greedy_generate",
           "continuation_logprobs"]

ProgressFn = Callable[[int, int], None]
"""``progress(done, total)``: forward passes done so far and the most the evaluation will take."""


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
                          batch_size: int = 16, on_forward: Callable[[], None] | None = None) -> list[float]:
    """Sum of log-probabilities of each continuation given its prompt.

    Args:
        model: a causal LM returning ``.logits``.
        prompts: token ids per row.
        continuations: token ids per row (scored).
        pad_id: padding id (right padding; causal attention never sees it from earlier positions).
        batch_size: rows per forward pass.
        on_forward: called after every forward pass (progress reporting).

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
        if on_forward is not None:
            on_forward()
    return out


def greedy_generate(model, prompts: list[list[int]], max_new_tokens: int, eos_id: int, pad_id: int,
                    batch_size: int = 16, on_forward: Callable[[int], None] | None = None) -> list[list[int]]:
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
        on_forward: called as ``on_forward(k)`` with the forward passes just done or skipped: 1 per decoding step,
            and the unused rest of a batch's ``max_new_tokens`` when every row of it has stopped early.

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
        for used in range(1, max_new_tokens + 1):
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
            if on_forward is not None:
                on_forward(1 if not bool(done.all()) else 1 + max_new_tokens - used)
            if bool(done.all()):
                break
        results.extend(gen)
    return results


class _Ticker:
    """Counts forward passes against a known upper bound and reports them to a ``progress(done, total)``."""

    def __init__(self, total: int, progress: ProgressFn | None):
        self.done, self.total, self.progress = 0, total, progress
        self.report()

    def report(self) -> None:
        if self.progress is not None:
            self.progress(min(self.done, self.total), self.total)

    def __call__(self, k: int = 1) -> None:
        self.done += k
        self.report()


def _label_ids(tokenizer, names: list[str]) -> list[list[int]]:
    return [tokenizer(name, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for name in names]


def _reference_lengths(tokenizer, rows) -> int:
    return max(len(tokenizer(r["response"], add_special_tokens=False)["input_ids"]) for r in rows) + 1


def _new_tokens(longest: int, max_length: int) -> int:
    """Tokens to generate for references of up to ``longest`` tokens (EOS included) in rows of ``max_length``.

    A reference shorter than a row: all of it, after a prompt cut to the rest of the row, as before. One as long as
    a row or longer (a user's long answers with a small ``data.max_length``, or a label as long as the row) left a
    prompt of no tokens, and the final evaluation, after the whole run, failed in the model's forward ("cannot
    reshape tensor of 0 elements"); it gets half the row, the prompt the other half (such a reference cannot match
    exactly; training also cut it).
    """
    return longest if longest < max_length else max(1, max_length // 2)


def _forward_passes(tokenizer, data, n: int, batch_size: int, generate: bool = True) -> int:
    """Upper bound of the forward passes :func:`evaluate` makes on ``n`` test rows (generation may stop sooner)."""
    if n == 0:
        return 0
    batches = math.ceil(n / batch_size)
    rows = data.test_examples[:n]
    if data.label_names:
        names = list(data.label_names)
        longest = max(len(c) for c in _label_ids(tokenizer, names))
        return batches + math.ceil(n * len(names) / batch_size) + (batches * longest if generate else 0)
    longest = _new_tokens(_reference_lengths(tokenizer, rows), data.max_length)
    return batches + (batches * longest if generate else 0)


def _position_limit(model) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    from deca_ds.data.formatting import position_limit

    return position_limit(config)


@contextlib.contextmanager
def eval_progress(console=None, description: str = "evaluating") -> Iterator[ProgressFn]:
    """A rich progress bar (forward passes done / at most) for :func:`evaluate`; yields its ``progress`` callback.

    Args:
        console: a ``rich.console.Console`` (default: a new one on stderr).
        description: the text in front of the bar, e.g. ``"evaluating client 3"``.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TextColumn("forward passes"),
                   TimeElapsedColumn(), console=console or Console(stderr=True), transient=False)
    task = bar.add_task(description, total=None)
    with bar:
        yield lambda done, total: bar.update(task, completed=done, total=total)


@torch.no_grad()
def evaluate(model, tokenizer, data, max_examples: int, batch_size: int = 16,
             progress: ProgressFn | None = None, generate: bool = True) -> dict[str, Any]:
    """Score a model on the first ``max_examples`` rows of the global test split.

    Args:
        model: a causal LM (``model(input_ids, attention_mask).logits``); its device is taken from its parameters.
        tokenizer: the tokenizer the data was built with.
        data: a :class:`~deca_ds.data.loading.ClientData`.
        max_examples: test rows used (``0`` or less: all).
        batch_size: rows per forward pass.
        progress: called as ``progress(done, total)`` with the forward passes done and the most there will be
            (greedy generation may stop early; ``done`` then jumps); None (the default) reports nothing. For a bar,
            see :func:`eval_progress`.
        generate: also score greedy generation (``accuracy_gen``/``macro_f1_gen`` for classification,
            ``exact_match`` otherwise). ``False`` skips the decoding loop, the costliest part on many rows: then
            classification reports the log-likelihood metrics only, and other data only the loss.

    Returns:
        ``examples``, ``loss`` and ``perplexity`` (token-weighted over response tokens). For classification data
        also ``accuracy``/``macro_f1``/``per_label_accuracy`` (by label log-likelihood; the same under ``*_ll``)
        and ``accuracy_gen``/``macro_f1_gen``/``per_label_accuracy_gen`` (greedy generation, exact match);
        per-label values are dicts keyed by label name. For other data ``exact_match`` (greedy generation) and,
        where rows have groups, ``per_group_exact_match``. All values are plain floats (JSON-serializable).
    """
    n = len(data.test) if max_examples <= 0 else min(max_examples, len(data.test))
    limit = _position_limit(model)
    if limit is not None and data.max_length > limit:  # deca_ds.models.check_lengths refuses this before a run
        warnings.warn(f"evaluating rows of up to data.max_length={data.max_length} tokens with a model of "
                      f"max_position_embeddings={limit}: positions past {limit} are out of the model's range",
                      stacklevel=2)
    tick = _Ticker(_forward_passes(tokenizer, data, n, batch_size, generate), progress)
    was_training = model.training
    model.eval()
    try:
        out = _evaluate(model, tokenizer, data, n, batch_size, tick, generate)
    finally:
        model.train(was_training)
    tick.done = tick.total
    tick.report()
    return out


def _evaluate(model, tokenizer, data, n: int, batch_size: int, tick: _Ticker, generate: bool = True) -> dict[str, Any]:
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
        tick()
    out["loss"] = total / max(count, 1)
    out["perplexity"] = math.exp(min(out["loss"], 700.0))

    rows = data.test_examples[:n]
    eos = tokenizer.eos_token_id
    if data.label_names:
        names = list(data.label_names)
        conts = _label_ids(tokenizer, names)
        # At least one prompt token: an empty prompt fails in the model's forward (labels as long as the row).
        prompts = [prompt_ids_for_eval(r["prompt"], tokenizer, max(1, data.max_length - max(len(c) for c in conts)))
                   for r in rows]
        scores = continuation_logprobs(
            model, [p for p in prompts for _ in names], [c for _ in prompts for c in conts], pad_id, batch_size,
            on_forward=tick,
        )
        pred_ll = np.asarray(scores).reshape(n, len(names)).argmax(axis=1)
        lookup = {name: k for k, name in enumerate(names)}
        targets = [lookup[r["label"]] for r in rows]
        scored = [("_ll", pred_ll)]
        if generate:
            gen = greedy_generate(model, prompts, max(len(c) for c in conts), eos, pad_id, batch_size,
                                  on_forward=tick)
            scored.append(("_gen", [lookup.get(tokenizer.decode(g, skip_special_tokens=True).strip(), -1)
                                    for g in gen]))
        for suffix, pred in scored:
            m = classification_metrics(pred, targets, len(names))
            out[f"accuracy{suffix}"] = m["accuracy"]
            out[f"macro_f1{suffix}"] = m["macro_f1"]
            out[f"per_label_accuracy{suffix}"] = dict(zip(names, m["per_label_accuracy"]))
        out["accuracy"], out["macro_f1"] = out["accuracy_ll"], out["macro_f1_ll"]
        out["per_label_accuracy"] = out["per_label_accuracy_ll"]
    elif generate:
        refs = [r["response"] for r in rows]
        longest = _new_tokens(_reference_lengths(tokenizer, rows), data.max_length)
        prompts = [prompt_ids_for_eval(r["prompt"], tokenizer, data.max_length - longest) for r in rows]
        gen = greedy_generate(model, prompts, longest, eos, pad_id, batch_size, on_forward=tick)
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

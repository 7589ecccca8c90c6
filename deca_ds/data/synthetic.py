"""Synthetic instruction data for the embedded default: deterministic, offline, non-IID by construction.

Two tasks, both written as Alpaca rows (``instruction``, ``input``, ``output``) plus an integer ``label`` column that
the partitioners split on:

- ``classification`` (label skew, the paper's non-IID setting): each text mixes words from its topic's vocabulary
  with distractor words shared by all topics; the answer is the topic name. A client that never sees a topic cannot
  name it, so consensus matters.
- ``generation`` (task skew): one small generation family per label (reverse, sort, add, lookup, upper, count);
  a client dominated by one family must learn the others through its neighbours.

Prompts stay under ~100 bytes so that an example fits the default 128 byte tokens with the chat template; a tiny
Llama (hidden 64-128, 2-4 layers) learns the classification task in a few hundred CPU steps.
"""

from __future__ import annotations

import string

import numpy as np

__all__ = ["TOPICS", "GENERATION_TASKS", "make_classification_rows", "make_generation_rows", "make_synthetic_rows"]

TOPICS: dict[str, list[str]] = {
    "sports": ["goal", "team", "coach", "match", "score", "ball", "league", "pitch", "player", "race"],
    "food": ["bread", "soup", "spice", "cheese", "bake", "salad", "fruit", "oven", "sugar", "rice"],
    "music": ["song", "drum", "guitar", "melody", "choir", "tune", "piano", "band", "chord", "lyric"],
    "weather": ["rain", "storm", "cloud", "wind", "snow", "sunny", "fog", "thunder", "frost", "humid"],
    "space": ["planet", "orbit", "rocket", "comet", "star", "galaxy", "moon", "nebula", "probe", "lunar"],
    "money": ["bank", "stock", "loan", "profit", "tax", "coin", "budget", "price", "market", "debt"],
    "health": ["doctor", "fever", "clinic", "pill", "nurse", "injury", "virus", "diet", "sleep", "heart"],
    "travel": ["flight", "hotel", "beach", "ticket", "map", "train", "visa", "tour", "island", "luggage"],
}
"""Label name -> topic vocabulary (at most ``len(TOPICS)`` labels)."""

DISTRACTORS = [
    "the", "a", "today", "very", "new", "some", "big", "small", "old", "we", "they", "saw", "about", "after",
    "really", "this", "that", "many", "good", "long", "near", "our", "with", "again",
]
CLASSIFY_INSTRUCTION = "Topic?"

GENERATION_TASKS = ("reverse", "sort", "add", "lookup", "upper", "count")
"""Task families of the ``generation`` task, in label order."""


def make_classification_rows(num_examples: int, num_labels: int, seed: int) -> tuple[dict[str, list], list[str]]:
    """Topic classification as instruction following.

    Each text has 5-8 words, of which 3-5 come from the topic vocabulary and the rest from the shared distractors,
    in random order; labels are balanced (round robin, then shuffled).

    Args:
        num_examples: rows to generate.
        num_labels: topics used (2 to ``len(TOPICS)``).
        seed: generation seed.

    Returns:
        ``(columns, label_names)`` with columns ``instruction``, ``input``, ``output``, ``label`` (int).

    Raises:
        ValueError: ``num_labels`` outside ``[2, len(TOPICS)]``.
    """
    if not 2 <= num_labels <= len(TOPICS):
        raise ValueError(f"the classification task supports 2 to {len(TOPICS)} labels, got num_labels={num_labels}")
    names = list(TOPICS)[:num_labels]
    rng = np.random.default_rng([seed, 1])
    labels = rng.permutation(np.arange(num_examples) % num_labels)
    cols: dict[str, list] = {"instruction": [], "input": [], "output": [], "label": []}
    for k in labels.tolist():
        n_topic = int(rng.integers(3, 6))
        n_noise = int(rng.integers(5, 9)) - n_topic
        words = list(rng.choice(TOPICS[names[k]], size=n_topic)) + list(rng.choice(DISTRACTORS, size=n_noise))
        rng.shuffle(words)
        cols["instruction"].append(CLASSIFY_INSTRUCTION)
        cols["input"].append(" ".join(words))
        cols["output"].append(names[k])
        cols["label"].append(k)
    return cols, names


def _generation_row(task: str, rng: np.random.Generator) -> tuple[str, str, str]:
    letters = list(string.ascii_lowercase)
    if task == "reverse":
        word = "".join(rng.choice(letters, size=int(rng.integers(3, 8))))
        return "Reverse the letters.", word, word[::-1]
    if task == "sort":
        digits = [str(d) for d in rng.integers(0, 10, size=int(rng.integers(3, 7)))]
        return "Sort the digits in ascending order.", " ".join(digits), " ".join(sorted(digits))
    if task == "add":
        a, b = (int(x) for x in rng.integers(0, 100, size=2))
        return "Add the two numbers.", f"{a} + {b}", str(a + b)
    if task == "lookup":
        keys = rng.choice(letters, size=4, replace=False)
        values = rng.integers(0, 10, size=4)
        q = int(rng.integers(0, 4))
        pairs = " ".join(f"{k}={v}" for k, v in zip(keys, values))
        return "Give the value of the key.", f"{pairs}; {keys[q]}?", str(values[q])
    if task == "upper":
        word = "".join(rng.choice(letters, size=int(rng.integers(3, 8))))
        return "Write the word in capitals.", word, word.upper()
    if task == "count":
        word = "".join(rng.choice(list("abc"), size=int(rng.integers(3, 10))))
        return "Count the letter a.", word, str(word.count("a"))
    raise ValueError(f"unknown generation task {task!r}")


def make_generation_rows(num_examples: int, num_labels: int, seed: int) -> tuple[dict[str, list], list[str]]:
    """Task-skewed generation: one task family per label.

    Args:
        num_examples: rows to generate.
        num_labels: families used, the first ``num_labels`` of :data:`GENERATION_TASKS` (2 to 6).
        seed: generation seed.

    Returns:
        ``(columns, family_names)`` with columns ``instruction``, ``input``, ``output``, ``label`` (family index).

    Raises:
        ValueError: ``num_labels`` outside ``[2, len(GENERATION_TASKS)]``.
    """
    if not 2 <= num_labels <= len(GENERATION_TASKS):
        raise ValueError(
            f"the generation task supports 2 to {len(GENERATION_TASKS)} task families, got num_labels={num_labels}"
        )
    names = list(GENERATION_TASKS[:num_labels])
    rng = np.random.default_rng([seed, 2])
    labels = rng.permutation(np.arange(num_examples) % num_labels)
    cols: dict[str, list] = {"instruction": [], "input": [], "output": [], "label": []}
    for k in labels.tolist():
        instruction, text, answer = _generation_row(names[k], rng)
        cols["instruction"].append(instruction)
        cols["input"].append(text)
        cols["output"].append(answer)
        cols["label"].append(k)
    return cols, names


def make_synthetic_rows(task: str, num_examples: int, num_labels: int, seed: int) -> tuple[dict[str, list], list[str]]:
    """Dispatch to :func:`make_classification_rows` or :func:`make_generation_rows` by ``task``."""
    if task == "classification":
        return make_classification_rows(num_examples, num_labels, seed)
    if task == "generation":
        return make_generation_rows(num_examples, num_labels, seed)
    raise ValueError(f"unknown synthetic task {task!r}: use classification or generation")

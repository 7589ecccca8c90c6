"""Each client's data for a run: load, check, split, partition, tokenize, and draw the batch of any step.

One function, :func:`build_client_data`, is all the engine needs: every client calls it with its own ``client_id``
and obtains its training rows, a held-out split of its own, and the global test split shared by all clients. Every
choice (synthetic generation, test split, partition, held-out split, batch order) is a pure function of
``cfg.data.seed`` and ``client_id``, so clients agree on the split without communicating and a resumed run draws
exactly the same batches (:func:`batch_for_step`).

Sources, by ``cfg.data.path``:

- ``None``: the synthetic task ``cfg.data.task`` (:mod:`deca_ds.data.synthetic`);
- a local ``.json``/``.jsonl``/``.csv``/``.parquet`` file, or a hub name when online: one shared dataset, split by
  ``cfg.data.partition``. When no row has the ``cfg.data.partition_by`` field (a stock Alpaca or ShareGPT file has
  no ``label``), ``dirichlet`` and ``shards`` split by :data:`CATEGORY_FIELD` instead, the task type given by the
  first word of each instruction (:func:`instruction_categories`), with a one-line warning naming
  ``data.partition_by``; ``natural`` (the field names the client) stops with a ConfigError;
- a pattern containing ``{client}`` (``data/client_{client}.jsonl``): the deployment where each node holds only its
  own data; a client opens only its own file and no partitioner runs. The global test split is the file the pattern
  names for ``client=test`` when it exists, else the client's own held-out split.

Bad input is found before training by :func:`check_data_config`, which raises a one-line
:class:`~deca_ds.config.ConfigError` naming the setting, the file and line, and the fix.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from deca_ds.config import DATA_FORMATS, PARTITIONS, ConfigError
from deca_ds.data.formatting import (IGNORE_INDEX, conversation_turns, detect_format, pack_examples, render_example,
                                     tokenize_row)
from deca_ds.data.partition import DirichletPartitioner, IidPartitioner, NaturalPartitioner, ShardPartitioner
from deca_ds.data.synthetic import GENERATION_TASKS, TOPICS, make_synthetic_rows
from deca_ds.errors import first_line

__all__ = [
    "ClientData",
    "build_client_data",
    "batch_for_step",
    "check_data_config",
    "load_rows",
    "make_partitioner",
    "instruction_categories",
    "CATEGORY_FIELD",
    "FILE_TYPES",
]

_log = logging.getLogger(__name__)

FILE_TYPES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
"""File extension -> ``datasets`` builder."""

CATEGORY_FIELD = "instruction_category"
"""Field derived from the rows when they lack ``data.partition_by`` (or when it names this field): the lower-cased
first word of each row's instruction (alpaca) or first user turn (chat, ShareGPT), e.g. ``write``, ``generate``,
``explain``; the :data:`CATEGORY_LIMIT` most frequent words are categories, the rest ``(other)``."""

CATEGORY_LIMIT = 15
"""Distinct first words kept as categories: enough task types to give every client a different mix, few enough for
a readable client x category table."""


@dataclass
class ClientData:
    """What one client trains and evaluates on.

    Attributes:
        train: the client's training rows, tokenized (``input_ids``, ``labels`` with ``-100`` outside the assistant
            turns that ``cfg.data.loss_on`` trains, ``attention_mask``); packed when ``cfg.data.packing``.
        eval: the client's own held-out rows (``test_size`` of its partition), tokenized.
        test: the global test split, tokenized, identical on every client (see the module docstring for per-client
            files).
        test_examples: raw rows of ``test``, in the same order: ``{"prompt", "response", "label", "group"}`` where
            ``prompt`` is the rendered prompt text, ``label`` the label name for classification (else ``None``) and
            ``group`` the count column the row belongs to (label, task family, or ``None``).
        label_names: class names when the data is classification (responses are label names), else ``None``.
        counts: ``[num_clients, len(count_names)]`` training rows per client per group, identical on every client
            (with per-client files only this client's row is known; the others are zero, see ``counts_local_only``).
        count_names: column names of ``counts`` (labels, task families, values of ``partition_by``, instruction
            categories when the rows lack it, or ``["rows"]``).
        max_length: tokens per example used for tokenization (evaluation truncates prompts the same way).
        counts_local_only: ``True`` with per-client files: gather the rows across clients to get the full summary.
    """

    train: Any
    eval: Any
    test: Any
    test_examples: list[dict[str, Any]]
    label_names: list[str] | None
    counts: np.ndarray
    count_names: list[str]
    max_length: int
    counts_local_only: bool = False
    meta: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# Reading and checking files.


def _bad(path_setting: str, msg: str) -> ConfigError:
    return ConfigError(f"data.path={path_setting!r}: {msg}".replace("\n", " "))


def _parse_rows(setting: str, path: str) -> list[tuple[str, dict[str, Any]]]:
    """Parse a local file in Python, returning ``(location, row)`` pairs; raises ConfigError on malformed input."""
    name = os.path.basename(path)
    ext = os.path.splitext(path)[1].lower()
    if os.path.isdir(path):
        raise _bad(setting, f"{path} is a directory: name a .json, .jsonl, .csv or .parquet file in it "
                            "(per-client files: a pattern with {client}, e.g. data/client_{client}.jsonl)")
    if ext not in FILE_TYPES:
        raise _bad(setting, f"unknown file type {ext or '(none)'!r} of {name}: use .json, .jsonl, .csv or .parquet")
    if not os.path.isfile(path):
        raise _bad(setting, f"file {path} does not exist: check the path (per-client files need {{client}})")
    if ext == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise _bad(setting, f"{name} is not a valid Parquet file ({type(e).__name__}): rewrite it") from None
        rows = [(f"row {i + 1} of {name}", r) for i, r in enumerate(table.to_pylist())]
    else:
        with open(path, "rb") as f:
            raw = f.read()
        try:
            # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") would otherwise glue onto the first field name
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            raise _bad(setting, f"line {line} of {name} is not UTF-8 (byte 0x{raw[e.start]:02x}): save the file "
                                "as UTF-8") from None
        if not text.strip():
            raise _bad(setting, f"file {name} is empty: add examples or remove the file")
        if ext == ".csv":
            rows = _parse_csv(setting, name, text)
        else:
            rows = _parse_json(setting, name, text, jsonl=ext == ".jsonl")
    if not rows:
        raise _bad(setting, f"file {name} holds no examples: add rows")
    return rows


def _parse_json(setting: str, name: str, text: str, jsonl: bool) -> list[tuple[str, dict[str, Any]]]:
    if not jsonl:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            first = text.lstrip()
            if first.startswith("{") and "\n" in text.strip():  # JSON lines in a .json file
                doc = None
            else:
                raise _bad(setting, f"line {e.lineno} of {name} is not valid JSON ({e.msg}): fix the file") from None
        if doc is not None:
            if isinstance(doc, dict):
                doc = [doc]
            if not isinstance(doc, list):
                raise _bad(setting, f"{name} must hold a list of objects or one object per line")
            rows = []
            for i, r in enumerate(doc):
                if not isinstance(r, dict):
                    raise _bad(setting, f"item {i + 1} of {name} is not a JSON object: write one object per example")
                rows.append((f"item {i + 1} of {name}", r))
            return rows
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            msg = f"line {lineno} of {name} is not valid JSON ({e.msg}): fix or remove that line"
            raise _bad(setting, msg) from None
        if not isinstance(r, dict):
            raise _bad(setting, f"line {lineno} of {name} is not a JSON object: write one object per line")
        rows.append((f"line {lineno} of {name}", r))
    return rows


def _parse_csv(setting: str, name: str, text: str) -> list[tuple[str, dict[str, Any]]]:
    reader = csv.reader(text.splitlines(keepends=True))
    header = next(reader)
    rows = []
    for values in reader:
        if not any(v.strip() for v in values):
            continue
        if len(values) != len(header):
            raise _bad(
                setting,
                f"line {reader.line_num} of {name} has {len(values)} fields but the header has {len(header)}: "
                "quote fields that contain commas",
            )
        row = {k: (v if v != "" else None) for k, v in zip(header, values)}  # empty cell = missing field
        rows.append((f"line {reader.line_num} of {name}", row))
    return rows


def _check_rows(setting: str, rows: list[tuple[str, dict[str, Any]]], fmt: str, need: str | None) -> str:
    """Check required fields row by row; returns the resolved format.

    ``need`` must have a value in every row, unless no row has the field at all (the caller then decides, see
    :func:`_plan`); a field that is present but empty (null, an empty CSV cell) is an error.
    """
    try:
        fmt = detect_format(list(rows[0][1].keys()), fmt)
    except ValueError as e:
        raise _bad(setting, f"{rows[0][0]}: {e}") from None
    if need is not None and all(need not in r for _, r in rows):
        need = None
    for where, r in rows:
        if fmt == "alpaca":
            for key in ("instruction", "output"):
                if r.get(key) is None or (key == "instruction" and str(r[key]).strip() == ""):
                    msg = f"{where} has no {key!r}: alpaca rows need instruction and output (input optional)"
                    raise _bad(setting, msg)
        elif fmt == "chat":
            m = r.get("messages")
            ok = isinstance(m, list) and m and all(isinstance(t, dict) and "role" in t and "content" in t for t in m)
            if not ok:
                raise _bad(setting, f"{where}: messages must be a non-empty list of {{role, content}} objects")
            if m[-1]["role"] != "assistant":
                raise _bad(setting, f"{where}: the last message must be the assistant's (it is the response)")
        elif not isinstance(r.get("conversations"), list):
            raise _bad(setting, f"{where}: conversations must be a non-empty list of {{from, value}} objects")
        try:  # the texts themselves: a null or a list would be trained on as "None" or "['...']"
            conversation_turns(r, fmt)
        except ValueError as e:
            raise _bad(setting, f"{where}: {e}") from None
        if need is not None and r.get(need) is None:
            raise _bad(
                setting,
                f"{where} has no field {need!r}, which data.partition_by names: add it or set data.partition_by",
            )
        if need is not None and isinstance(r[need], (list, dict)):
            raise _bad(
                setting,
                f"{where}: field {need!r}, which data.partition_by names, holds a {type(r[need]).__name__}: give "
                "each row one value (a string or number) or set data.partition_by to another field",
            )
    return fmt


_CANONICAL_INT = re.compile(r"-?(0|[1-9][0-9]*)")


def _csv_partition_numbers(rows: list[dict[str, Any]], need: str | None) -> list[dict[str, Any]]:
    """CSV rows with the ``partition_by`` column as integers when every value is one written plainly.

    CSV cells are text, and text sorts "10" before "2": the natural and shard splits order a column of site numbers
    1..12 as numbers (as they do in JSON, and as the pandas reader gave them). Only that column, and only when every
    value is a canonical integer ("7", not "007" or "7.0"), so no text is changed.
    """
    if need is None:
        return rows
    values = [r.get(need) for r in rows]
    if not values or not all(isinstance(v, str) and _CANONICAL_INT.fullmatch(v) for v in values):
        return rows
    return [{**r, need: int(r[need])} for r in rows]


def load_rows(path: str, fmt: str = "auto", need: str | None = None, setting: str | None = None):
    """Check and load one data source through the ``datasets`` library.

    Args:
        path: a local JSON/JSONL/CSV/Parquet file, or a hub dataset name (its ``train`` split).
        fmt: ``auto``, ``alpaca``, ``chat`` or ``sharegpt``.
        need: a field every row must have (``partition_by``) if any row has it, or ``None``.
        setting: the ``data.path`` value to name in errors (default ``path``).

    Returns:
        ``(dataset, format)`` with a ``datasets.Dataset`` and the resolved format.

    Raises:
        ConfigError: missing, empty or malformed file (naming file and line), missing fields, unknown file type,
            or a hub name that cannot be loaded.
    """
    import datasets

    setting = setting or path
    ext = os.path.splitext(path)[1].lower()
    if os.path.exists(path) or ext in FILE_TYPES:
        rows = _parse_rows(setting, path)
        fmt = _check_rows(setting, rows, fmt, need)
        if ext == ".csv":
            # The checked rows themselves: the datasets CSV reader (pandas) keeps all-empty lines (",,") that the
            # check skips, as rows of nulls, and turns cells such as "NA", "None", "007", "1.50" into null, 7, 1.5.
            return datasets.Dataset.from_list(_csv_partition_numbers([r for _, r in rows], need)), fmt
        ds = datasets.load_dataset(FILE_TYPES[ext], data_files=path, split="train")
        return ds, fmt
    try:
        ds = datasets.load_dataset(path, split="train")
    except Exception as e:
        raise _bad(
            setting,
            f"not a local file and not loadable from the hub ({type(e).__name__}): give a local "
            ".json/.jsonl/.csv/.parquet file or go online",
        ) from None
    if len(ds) == 0:
        raise _bad(setting, "the hub dataset's train split is empty")
    sample = [(f"row {i + 1} of {path}", ds[i]) for i in range(min(len(ds), 100))]
    return ds, _check_rows(setting, sample, fmt, need)


# ---------------------------------------------------------------------------------------------------------------
# Partitioning.


def _first_word(text: str) -> str | None:
    match = re.search(r"\w+", text)
    return match.group(0).lower() if match else None


def instruction_categories(ds, fmt: str, limit: int = CATEGORY_LIMIT) -> list[str]:
    """The instruction category of every row (:data:`CATEGORY_FIELD`): the task type a stock Alpaca or ShareGPT file
    implies when it has no label.

    A row's category is the lower-cased first word of its instruction (alpaca) or of its first user turn (chat,
    ShareGPT): ``Write a poem`` -> ``write``. The ``limit`` most frequent words are kept (ties broken
    alphabetically); every other row, and a row without a word, is ``(other)``.

    Args:
        ds: a ``datasets.Dataset`` in format ``fmt``.
        fmt: ``alpaca``, ``chat`` or ``sharegpt``.
        limit: distinct words kept.

    Returns:
        One category per row, in row order.
    """
    if fmt == "alpaca":
        texts = [str(x) for x in ds["instruction"]]
    else:
        texts = [next((t["content"] for t in conversation_turns(row, fmt) if t["role"] == "user"), "") for row in ds]
    words = [_first_word(t) for t in texts]
    freq = Counter(w for w in words if w is not None)
    kept = {w for w, _ in sorted(freq.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]}
    return [w if w in kept else "(other)" for w in words]


_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    # Every client plans the same split; client 0 (or the single-process caller) says it once per process.
    if msg not in _warned:
        _warned.add(msg)
        _log.warning(msg)


def make_partitioner(data_cfg, num_clients: int, partition_by: str | None = None):
    """The partitioner that ``data_cfg.partition`` names.

    Args:
        data_cfg: a :class:`deca_ds.config.DataConfig`.
        num_clients: number of partitions.
        partition_by: the column to split on; ``None`` means ``data_cfg.partition_by`` (the data plan passes
            :data:`CATEGORY_FIELD` when the rows lack that field).

    Returns:
        An unassigned partitioner (set ``.dataset`` next).
    """
    d = data_cfg
    column = d.partition_by if partition_by is None else partition_by
    if d.partition == "iid":
        return IidPartitioner(num_clients, seed=d.seed)
    if d.partition == "dirichlet":
        return DirichletPartitioner(num_clients, column, d.alpha, d.min_partition_size, seed=d.seed)
    if d.partition == "shards":
        return ShardPartitioner(num_clients, column, d.shards_per_client, seed=d.seed)
    if d.partition == "natural":
        return NaturalPartitioner(column, num_clients)
    raise ConfigError(f"data.partition={d.partition!r} is not known: use one of {', '.join(PARTITIONS)}")


def _split_off(n: int, fraction: float, rng: np.random.Generator,
               keep_one: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Random ``(rest, held_out)`` index arrays with ``round(fraction*n)`` held out (at least one when possible)."""
    k = int(round(fraction * n))
    if fraction > 0 and n >= 2:
        k = max(k, 1)
    if keep_one:
        k = min(k, n - 1) if n >= 1 else 0
    perm = rng.permutation(n)
    return np.sort(perm[k:]), np.sort(perm[:k])


def _group_values(ds, column: str | None) -> list[Any] | None:
    if column is None or column not in ds.column_names:
        return None
    return list(ds[column])


@dataclass
class _Plan:
    """Index-level plan of the split, shared by :func:`check_data_config` and :func:`build_client_data`."""

    pool: Any
    fmt: str
    test_idx: np.ndarray
    train_idx: list[np.ndarray]  # per client (all clients, or only this one for per-client files)
    eval_idx: list[np.ndarray]
    counts: np.ndarray
    count_names: list[str]
    group_codes: np.ndarray | None
    label_names: list[str] | None
    test_source: Any = None  # separate test dataset (per-client files), else None
    counts_local_only: bool = False


def _group_info(ds, fmt: str, column: str | None, synthetic_names: list[str] | None, classification: bool,
                detect_labels: bool = True):
    """Codes of every row's group, group names, and label names when the responses are the labels.

    ``detect_labels=False`` (derived instruction categories) never treats the rows as classification.
    """
    values = _group_values(ds, column)
    if values is not None and any(isinstance(v, (list, dict)) for v in values):
        # Lists or objects (e.g. a list of tags) name no one group; only an iid split or per-client files get here
        # (:func:`_check_rows` refuses them for the splits that need the field), and neither needs the groups.
        values = None
    if values is None:
        return None, ["rows"], None
    if synthetic_names is not None:
        codes = np.asarray(values, dtype=np.int64)
        return codes, list(synthetic_names), (list(synthetic_names) if classification else None)
    uniques = sorted(set(values), key=lambda v: (str(type(v)), v))
    lookup = {v: i for i, v in enumerate(uniques)}
    codes = np.array([lookup[v] for v in values], dtype=np.int64)
    names = [str(u) for u in uniques]
    label_names = None
    if detect_labels and fmt == "alpaca" and len(uniques) <= 64:
        # Classification when every group value maps to one response text (e.g. label "pos" -> output "positive").
        mapping: dict[int, str] = {}
        for c, out in zip(codes.tolist(), ds["output"]):
            if mapping.setdefault(c, str(out)) != str(out):
                break
        else:
            if len(set(mapping.values())) == len(uniques):
                label_names = [mapping[i] for i in range(len(uniques))]
    return codes, names, label_names


_SYNTHETIC_PLANS: dict[tuple[str, int], _Plan] = {}
"""Plans of the embedded synthetic data by ``(repr(cfg.data), num_clients)``: a pure function of the settings, asked
for once per client and once by the preflight check (with 6000 rows and 8 clients, ~10 s each on one core)."""


def _plan(cfg, num_clients: int, client_id: int | None) -> _Plan:
    if cfg.data.path is not None:  # files may change between calls: always read them
        return _make_plan(cfg, num_clients, client_id)
    key = (repr(cfg.data), num_clients)
    if key not in _SYNTHETIC_PLANS:
        if len(_SYNTHETIC_PLANS) >= 4:  # a process rarely plans more than one dataset; keep memory bounded
            _SYNTHETIC_PLANS.pop(next(iter(_SYNTHETIC_PLANS)))
        _SYNTHETIC_PLANS[key] = _make_plan(cfg, num_clients, client_id)
    return _SYNTHETIC_PLANS[key]


def _make_plan(cfg, num_clients: int, client_id: int | None) -> _Plan:
    import datasets

    d = cfg.data
    if d.format not in DATA_FORMATS:
        raise ConfigError(f"data.format={d.format!r} is not known: use one of {', '.join(DATA_FORMATS)}")
    if num_clients < 1:
        raise ConfigError(f"num_clients={num_clients} must be >= 1")
    column = d.partition_by
    synthetic_names = None
    if d.path is None:
        families = len(TOPICS) if d.task == "classification" else len(GENERATION_TASKS)
        if not 2 <= d.num_labels <= families:
            raise ConfigError(f"data.num_labels={d.num_labels}: the {d.task} task supports 2 to {families} "
                              f"labels: set data.num_labels to at most {families}")
        try:
            cols, synthetic_names = make_synthetic_rows(d.task, d.num_examples, d.num_labels, d.seed)
        except (ValueError, MemoryError) as e:  # numpy cannot hold that many rows (was blamed on data.num_labels)
            raise ConfigError(f"data.num_examples={d.num_examples} synthetic rows cannot be generated "
                              f"({type(e).__name__}: {first_line(e)}): use fewer, e.g. the default 6000") from None
        pool, fmt, column = datasets.Dataset.from_dict(cols), "alpaca", "label"
    elif _is_per_client(d.path):
        return _plan_per_client(cfg, num_clients, client_id)
    else:
        need = column if d.partition != "iid" else None
        pool, fmt = load_rows(d.path, d.format, need=need, setting=d.path)
    # Rows without the partition field: a derived instruction category for label-driven splits (module docstring).
    derived = synthetic_names is None and column not in pool.column_names and d.partition != "iid"
    if derived and d.partition == "natural":
        raise ConfigError(
            f"data.partition_by={column!r} is not a field of {os.path.basename(d.path)} (fields: "
            f"{', '.join(pool.column_names)}): data.partition=natural needs a field naming each row's client; "
            "set data.partition_by to it, or use data.partition=dirichlet or iid"
        )
    if derived:
        if column != CATEGORY_FIELD and (client_id is None or client_id == 0):
            _warn_once(
                f"data.partition_by={column!r} is not a field of {os.path.basename(d.path)} (fields: "
                f"{', '.join(pool.column_names)}): data.partition={d.partition} splits by {CATEGORY_FIELD}, the "
                f"first word of each instruction; set data.partition_by to a field of your rows, to {CATEGORY_FIELD} "
                "to silence this, or data.partition=iid"
            )
        pool = pool.add_column(CATEGORY_FIELD, instruction_categories(pool, fmt))
        column = CATEGORY_FIELD
    codes, count_names, label_names = _group_info(pool, fmt, column, synthetic_names, d.task == "classification",
                                                  detect_labels=not derived)

    rng = np.random.default_rng([d.seed, 7])
    rest, test_idx = _split_off(len(pool), d.test_size, rng)
    partitioner = make_partitioner(d, num_clients, partition_by=column)
    partitioner.dataset = pool.select(rest.tolist())
    try:
        parts = partitioner.partition_indices()
    except ValueError as e:
        raise ConfigError(f"data.partition={d.partition!r}: {e}") from None
    train_idx, eval_idx = [], []
    counts = np.zeros((num_clients, len(count_names)), dtype=np.int64)
    for i, part in enumerate(parts):
        keep, held = _split_off(len(part), d.test_size, np.random.default_rng([d.seed, i, 11]))
        rows = rest[part[keep]]
        if len(rows) == 0:
            # The fixes that apply: alpha and min_partition_size shape only a Dirichlet split (the message named
            # them for every split), and data.test_size holds rows out twice (the test split, then each client's).
            fixes = ["use more data", "fewer clients"]
            if d.test_size > 0:
                fixes.append(f"a smaller data.test_size (now {d.test_size:g})")
            if d.partition == "dirichlet":
                fixes.append("raise data.min_partition_size / data.alpha")
            raise ConfigError(
                f"data.partition={d.partition!r}: client {i} gets no training examples "
                f"({len(pool)} rows, {num_clients} clients): {', '.join(fixes[:-1])} or {fixes[-1]}"
            )
        train_idx.append(rows)
        eval_idx.append(rest[part[held]])
        counts[i] = np.bincount(codes[rows], minlength=len(count_names)) if codes is not None else len(rows)
    return _Plan(pool, fmt, test_idx, train_idx, eval_idx, counts, count_names, codes, label_names)


def _is_per_client(path: str) -> bool:
    """Whether ``data.path`` is a per-client pattern: a ``{client}`` field, with or without a format spec
    (``client_{client:02d}.jsonl`` too); a malformed pattern naming ``{client`` counts, so that it is refused by
    :func:`_client_path` with its fix instead of being looked up as a file name with braces in it."""
    import string

    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(path) if f is not None]
    except ValueError:
        return "{client" in path
    # parse() leaves the conversion (!r) and the spec (:02d) out of the name; an attribute or index may follow it
    return any(f.split(".")[0].split("[")[0] == "client" for f in fields)


def _client_path(pattern: str, client: int) -> str:
    """Client ``client``'s file of the per-client ``data.path`` pattern.

    Raises:
        ConfigError: the pattern has other replacement fields or unbalanced braces (``str.format`` would raise a
            bare KeyError/IndexError/ValueError from inside the data loader).
    """
    try:
        return pattern.format(client=client)
    except (KeyError, IndexError, ValueError, AttributeError, TypeError) as e:
        raise ConfigError(f"data.path={pattern!r} is not a valid per-client pattern ({type(e).__name__}: {e}): "
                          "use {client} as the only field in braces, e.g. data/client_{client}.jsonl") from None


def _plan_per_client(cfg, num_clients: int, client_id: int | None) -> _Plan:
    import datasets

    d = cfg.data
    clients = range(num_clients) if client_id is None else [client_id]
    loaded = {}
    for i in clients:
        path = _client_path(d.path, i)
        ds, fmt = load_rows(path, d.format, need=None, setting=d.path)
        loaded[i] = (ds, fmt)
    try:
        test_path = d.path.format(client="test")
    except (ValueError, AttributeError, TypeError):  # e.g. a numeric spec such as {client:02d} cannot name it
        test_path = None
    test_source = None
    if test_path is not None and os.path.isfile(test_path):
        test_source, _ = load_rows(test_path, d.format, setting=d.path)
    me = client_id if client_id is not None else 0
    pool, fmt = loaded[me]
    # Groups (labels) of this client's file plus the test file, so that label names cover the test split.
    joint = pool if test_source is None else datasets.concatenate_datasets(
        [pool.select_columns(_common(pool, test_source)), test_source.select_columns(_common(pool, test_source))]
    )
    codes, count_names, label_names = _group_info(joint, fmt, d.partition_by, None, False)
    if codes is not None:
        codes = codes[: len(pool)]
    keep, held = _split_off(len(pool), d.test_size, np.random.default_rng([d.seed, me, 11]))
    counts = np.zeros((num_clients, len(count_names)), dtype=np.int64)
    counts[me] = np.bincount(codes[keep], minlength=len(count_names)) if codes is not None else len(keep)
    test_idx = np.arange(len(test_source)) if test_source is not None else held
    return _Plan(
        pool, fmt, test_idx, [keep], [held], counts, count_names, codes, label_names,
        test_source=test_source, counts_local_only=True,
    )


def _common(a, b) -> list[str]:
    return [c for c in a.column_names if c in b.column_names]


# ---------------------------------------------------------------------------------------------------------------
# Public entry points.


def check_data_config(cfg, num_clients: int, client_id: int | None = None) -> None:
    """Find bad data input before training starts.

    Checks: unknown format; missing, empty, non-UTF-8 or malformed files (naming file and line); a directory; rows
    missing the fields of their format or the ``partition_by`` field, or whose texts are not text (null, a list);
    a partition that leaves a client with zero examples; synthetic settings out of range. With a per-client pattern
    and ``client_id`` given, only that client's file is opened.

    Args:
        cfg: a :class:`deca_ds.config.RunConfig`.
        num_clients: number of clients.
        client_id: the calling client, or ``None`` to check every client's file.

    Raises:
        ConfigError: one line naming the setting, the problem and the fix.
    """
    _plan(cfg, num_clients, client_id)


def _tokenize_rows(ds, fmt: str, tokenizer, max_length: int, loss_on: str = "all_assistant",
                   path: str | None = None) -> tuple[dict[str, list], list[tuple[str, str]]]:
    """Token columns of ``ds`` (loss per ``loss_on``) and each row's ``(prompt, final answer)`` texts.

    Raises:
        ConfigError: the model's chat template refuses a row (``raise_exception`` in the template, e.g. a system
            turn or roles that do not alternate), naming ``data.path`` (``path``) and the row's roles; or as
            :func:`deca_ds.data.formatting.tokenize_row`, naming ``data.loss_on``.
    """
    from jinja2 import TemplateError  # what transformers renders chat templates with (torch requires it)

    pairs = []
    for r in ds:
        try:
            pairs.append(render_example(r, fmt, tokenizer))
        except ValueError as e:  # a hub or saved dataset's rows are checked only on a sample before this
            raise ConfigError(f"data.path={path!r}: in a row: {e}") from None
        except TemplateError as e:  # a bare Jinja traceback from inside transformers otherwise
            roles = ", ".join(t["role"] for t in conversation_turns(r, fmt))
            why = f"{type(e).__name__}: {e}".replace("\n", " ")
            raise ConfigError(
                f"data.path={path!r}: the tokenizer's chat template refuses a row with the roles {roles} ({why}): "
                "change such rows or use a model whose template accepts them"
            ) from None
    cols: dict[str, list] = {"input_ids": [], "labels": [], "attention_mask": []}
    for r in ds:
        try:
            ex = tokenize_row(r, fmt, tokenizer, max_length, loss_on)
        except ValueError as e:
            raise ConfigError(f"data.loss_on={loss_on!r}: {e}") from None
        for k in cols:
            cols[k].append(ex[k])
    return cols, pairs


def build_client_data(cfg, tokenizer, client_id: int, num_clients: int) -> ClientData:
    """Everything client ``client_id`` trains and evaluates on (see the module docstring for sources).

    Args:
        cfg: a :class:`deca_ds.config.RunConfig` (uses ``cfg.data``).
        tokenizer: a ``transformers`` tokenizer with an EOS token (its chat template is used when present).
        client_id: this client, in ``[0, num_clients)``.
        num_clients: number of clients.

    Returns:
        A :class:`ClientData`; deterministic in ``(cfg.data.seed, client_id)``.

    Raises:
        ConfigError: as :func:`check_data_config`.
    """
    import datasets

    if not 0 <= client_id < num_clients:
        raise ValueError(f"client_id={client_id} is out of range [0, {num_clients})")
    d = cfg.data
    plan = _plan(cfg, num_clients, client_id)
    mine = 0 if plan.counts_local_only else client_id
    train_rows = plan.pool.select(plan.train_idx[mine].tolist())
    eval_rows = plan.pool.select(plan.eval_idx[mine].tolist())
    test_src = plan.test_source if plan.test_source is not None else plan.pool
    test_rows = test_src.select(plan.test_idx.tolist())

    train, _ = _tokenize_rows(train_rows, plan.fmt, tokenizer, d.max_length, d.loss_on, d.path)
    if d.packing:
        train = pack_examples(train, d.max_length)
    evals, _ = _tokenize_rows(eval_rows, plan.fmt, tokenizer, d.max_length, d.loss_on, d.path)
    test, pairs = _tokenize_rows(test_rows, plan.fmt, tokenizer, d.max_length, d.loss_on, d.path)

    if plan.test_source is None and plan.group_codes is not None:
        test_groups = plan.group_codes[plan.test_idx].tolist()
    elif plan.test_source is not None and d.partition_by in test_rows.column_names and plan.count_names != ["rows"]:
        lookup = {n: i for i, n in enumerate(plan.count_names)}
        test_groups = [lookup.get(str(v)) for v in test_rows[d.partition_by]]
    else:
        test_groups = [None] * len(test_rows)
    test_examples = [
        {
            "prompt": prompt,
            "response": response,
            "label": plan.label_names[g] if plan.label_names is not None and g is not None else None,
            "group": plan.count_names[g] if g is not None else None,
        }
        for (prompt, response), g in zip(pairs, test_groups)
    ]
    return ClientData(
        train=datasets.Dataset.from_dict(train),
        eval=datasets.Dataset.from_dict(evals),
        test=datasets.Dataset.from_dict(test),
        test_examples=test_examples,
        label_names=plan.label_names,
        counts=plan.counts,
        count_names=plan.count_names,
        max_length=d.max_length,
        counts_local_only=plan.counts_local_only,
        meta={"format": plan.fmt, "train_rows": len(train_rows), "client_id": client_id},
    )


def batch_indices(num_rows: int, step: int, batch_size: int, seed: int, client_id: int) -> np.ndarray:
    """Row indices of the batch of optimizer step ``step`` (see :func:`batch_for_step`)."""
    if num_rows < 1:
        raise ValueError("cannot draw a batch from an empty dataset")
    positions = step * batch_size + np.arange(batch_size)
    epochs = positions // num_rows
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([seed, client_id, int(epoch)]).permutation(num_rows)
        sel = epochs == epoch
        out[sel] = perm[positions[sel] % num_rows]
    return out


def batch_for_step(dataset, step: int, batch_size: int, seed: int, client_id: int,
                   pad_id: int) -> dict[str, torch.Tensor]:
    """The batch of an optimizer step, as a pure function of its arguments.

    Rows are read in the order of a fresh permutation per epoch (``numpy.random.default_rng([seed, client_id,
    epoch])``, epoch = position // len(dataset)); a batch that crosses an epoch boundary takes the end of one
    permutation and the start of the next. A resumed run therefore sees exactly the batches it would have seen.

    Args:
        dataset: tokenized rows (``datasets.Dataset`` or a dict of lists) with ``input_ids``, ``labels``,
            ``attention_mask``.
        step: optimizer step (0-based).
        batch_size: rows per batch.
        seed: shuffling seed (``cfg.data.seed``).
        client_id: the client; different clients shuffle differently.
        pad_id: padding token id.

    Returns:
        ``input_ids``, ``labels``, ``attention_mask``: int64 tensors ``[batch_size, longest row]``, right-padded
        (labels ``-100`` and mask ``0`` on padding), on the CPU.
    """
    n = len(dataset["input_ids"]) if isinstance(dataset, dict) else len(dataset)
    idx = batch_indices(n, step, batch_size, seed, client_id).tolist()
    if isinstance(dataset, dict):
        rows = {k: [dataset[k][i] for i in idx] for k in ("input_ids", "labels", "attention_mask")}
    else:
        rows = dataset[idx]
    return collate(rows, pad_id)


def collate(rows: dict[str, list[list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad tokenized rows to the longest one (labels ``-100``, mask ``0`` on padding)."""
    width = max(len(x) for x in rows["input_ids"])
    b = len(rows["input_ids"])
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for i, (ids, lab) in enumerate(zip(rows["input_ids"], rows["labels"])):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[i, : len(lab)] = torch.tensor(lab, dtype=torch.long)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}

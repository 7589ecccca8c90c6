"""Client data: synthetic and file sources, per-client files, batches as a pure function, bad-input errors."""

import json

import datasets
import numpy as np
import pytest
import torch

from deca_ds.config import ConfigError, RunConfig
from deca_ds.data import IGNORE_INDEX, batch_for_step, build_client_data, check_data_config
from deca_ds.data.loading import batch_indices


def _cfg(**data):
    cfg = RunConfig()
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def _rows(n, labels=("pos", "neg")):
    return [{"instruction": "Sentiment?", "input": f"text {i}", "output": labels[i % len(labels)],
             "label": labels[i % len(labels)]} for i in range(n)]


def test_synthetic_clients_agree_on_split_and_counts(tok):
    cfg = _cfg(num_examples=400, test_size=0.1, alpha=0.5, min_partition_size=5)
    a = build_client_data(cfg, tok, 0, 3)
    b = build_client_data(cfg, tok, 2, 3)
    np.testing.assert_array_equal(a.counts, b.counts)
    assert a.test["input_ids"] == b.test["input_ids"] and a.test_examples == b.test_examples
    assert a.counts.shape == (3, 4) and a.label_names == a.count_names == ["sports", "food", "music", "weather"]
    assert a.counts[0].sum() == len(a.train) and a.counts[2].sum() == len(b.train)
    assert len(a.test) == 40 and a.counts.sum() + len(a.test) + len(a.eval) + len(b.eval) < 400
    again = build_client_data(cfg, tok, 2, 3)
    assert again.train["input_ids"] == b.train["input_ids"] and again.eval["input_ids"] == b.eval["input_ids"]
    ex = a.test_examples[0]
    assert ex["label"] == ex["response"] and ex["prompt"].endswith("<s>assistant:")
    assert max(len(x) for x in a.train["input_ids"]) <= cfg.data.max_length


def test_synthetic_plan_is_made_once_per_setting_and_equals_a_fresh_one(tok):
    from deca_ds.data import loading

    cfg = _cfg(num_examples=300, alpha=0.5, min_partition_size=5)
    loading._SYNTHETIC_PLANS.clear()
    first = build_client_data(cfg, tok, 1, 3)
    assert len(loading._SYNTHETIC_PLANS) == 1
    check_data_config(cfg, 3)
    build_client_data(cfg, tok, 2, 3)
    assert len(loading._SYNTHETIC_PLANS) == 1  # the preflight check and the other clients reuse it
    fresh = loading._make_plan(cfg, 3, None)
    kept = loading._plan(cfg, 3, None)
    np.testing.assert_array_equal(fresh.counts, kept.counts)
    np.testing.assert_array_equal(fresh.test_idx, kept.test_idx)
    assert all(np.array_equal(x, y) for x, y in zip(fresh.train_idx, kept.train_idx))
    # Another setting (the seed, the number of clients) is another plan, not the cached one.
    other = build_client_data(_cfg(num_examples=300, alpha=0.5, min_partition_size=5, seed=1), tok, 1, 3)
    assert other.train["input_ids"] != first.train["input_ids"]
    build_client_data(cfg, tok, 1, 2)
    assert len(loading._SYNTHETIC_PLANS) == 3


def test_generation_task_has_groups_but_no_label_names(tok):
    cfg = _cfg(task="generation", num_examples=200, partition="iid")
    d = build_client_data(cfg, tok, 0, 2)
    assert d.label_names is None and d.count_names == ["reverse", "sort", "add", "lookup"]
    assert {e["group"] for e in d.test_examples} <= set(d.count_names) and d.test_examples[0]["label"] is None


def test_packing_keeps_every_response_token(tok):
    cfg = _cfg(num_examples=200, partition="iid", test_size=0.0, max_length=256)
    plain = build_client_data(cfg, tok, 0, 2)
    cfg.data.packing = True
    packed = build_client_data(cfg, tok, 0, 2)
    assert len(packed.train) < len(plain.train)
    assert max(len(x) for x in packed.train["input_ids"]) <= cfg.data.max_length
    flat = lambda col: [t for row in col for t in row]  # noqa: E731
    assert flat(packed.train["labels"]) == flat(plain.train["labels"])


def test_batch_for_step_is_a_pure_function_of_its_arguments():
    rows = {"input_ids": [[i] * (1 + i % 3) for i in range(10)], "labels": [[i] * (1 + i % 3) for i in range(10)],
            "attention_mask": [[1] * (1 + i % 3) for i in range(10)]}
    ds = datasets.Dataset.from_dict(rows)
    b = batch_for_step(ds, 7, 4, seed=3, client_id=1, pad_id=99)
    again = batch_for_step(rows, 7, 4, seed=3, client_id=1, pad_id=99)
    for k in b:
        assert torch.equal(b[k], again[k])
    # Independent reference: positions 28..31 are epoch 2, rows perm[8], perm[9], then epoch 3, perm'[0], perm'[1].
    p2 = np.random.default_rng([3, 1, 2]).permutation(10)
    p3 = np.random.default_rng([3, 1, 3]).permutation(10)
    assert b["input_ids"][:, 0].tolist() == [p2[8], p2[9], p3[0], p3[1]]
    lengths = b["attention_mask"].sum(1)
    assert lengths.tolist() == [1 + int(i) % 3 for i in b["input_ids"][:, 0]]
    assert b["input_ids"].shape[1] == int(lengths.max())
    pad = b["attention_mask"] == 0
    assert (b["input_ids"][pad] == 99).all() and (b["labels"][pad] == IGNORE_INDEX).all()
    # One epoch visits every row once; another client sees another order.
    epoch = np.concatenate([batch_indices(10, s, 5, 3, 0) for s in range(2)])
    assert sorted(epoch.tolist()) == list(range(10))
    assert not np.array_equal(epoch, np.concatenate([batch_indices(10, s, 5, 3, 1) for s in range(2)]))


def _write(path, rows, kind):
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "csv":
        datasets.Dataset.from_list(rows).to_csv(str(path), index=False)
    else:
        datasets.Dataset.from_list(rows).to_parquet(str(path))


@pytest.mark.parametrize("kind", ["json", "jsonl", "csv", "parquet"])
def test_loads_local_files(tok, tmp_path, kind):
    path = tmp_path / f"data.{kind}"
    _write(path, _rows(40), kind)
    cfg = _cfg(path=str(path), partition="dirichlet", alpha=1.0, min_partition_size=3, test_size=0.25)
    check_data_config(cfg, 2)
    d = build_client_data(cfg, tok, 1, 2)
    assert len(d.test) == 10 and d.count_names == ["neg", "pos"] and d.label_names == ["neg", "pos"]
    assert d.counts.sum() + len(d.test) + len(d.eval) <= 40 and d.counts[1].sum() == len(d.train)
    assert all(e["response"] == e["label"] for e in d.test_examples)


def test_chat_file(tok, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(12)]
    path = tmp_path / "chat.jsonl"
    _write(path, rows, "jsonl")
    d = build_client_data(_cfg(path=str(path), partition="iid", test_size=0.25), tok, 0, 2)
    assert d.label_names is None and d.count_names == ["rows"]
    e = d.test_examples[0]
    assert e["prompt"] == f"<s>user:q{e['response'][1:]}</s><s>assistant:"


def test_per_client_files_open_only_their_own(tok, tmp_path):
    _write(tmp_path / "client_0.jsonl", _rows(10, ("pos",)), "jsonl")
    (tmp_path / "client_1.jsonl").write_text("{not json\n")  # client 0 must never read this
    _write(tmp_path / "client_test.jsonl", _rows(6), "jsonl")
    cfg = _cfg(path=str(tmp_path / "client_{client}.jsonl"), test_size=0.2)
    check_data_config(cfg, 2, client_id=0)
    d = build_client_data(cfg, tok, 0, 2)
    assert d.counts_local_only and d.counts[1].sum() == 0 and d.counts[0].sum() == len(d.train) == 8
    assert len(d.test) == 6 and d.label_names == ["neg", "pos"]
    with pytest.raises(ConfigError, match="line 1 of client_1.jsonl"):
        check_data_config(cfg, 2)


def test_a_per_client_pattern_may_format_the_client_number(tok, tmp_path):
    """``client_{client:02d}.jsonl`` was not recognised as a pattern (only the literal ``{client}`` was) and was
    refused as a missing file although client_00/client_01 were there."""
    _write(tmp_path / "client_00.jsonl", _rows(10, ("pos",)), "jsonl")
    _write(tmp_path / "client_01.jsonl", _rows(10, ("neg",)), "jsonl")
    cfg = _cfg(path=str(tmp_path / "client_{client:02d}.jsonl"), test_size=0.2)
    check_data_config(cfg, 2)
    d = build_client_data(cfg, tok, 1, 2)
    assert d.counts_local_only and d.counts[0].sum() == 0 and d.counts[1].sum() == len(d.train) == 8


@pytest.mark.parametrize("name, cause", [
    ("client_{client}_{split}.jsonl", "KeyError"), ("client_{client}_{}.jsonl", "IndexError"),
    ("client_{client}}.jsonl", "Single '}'"), ("client_{client}{.jsonl", "expected '}'"),
])
def test_a_malformed_per_client_pattern_is_one_line_naming_data_path(tmp_path, name, cause):
    """Other braces in a ``{client}`` pattern once escaped str.format as a bare KeyError/IndexError/ValueError."""
    cfg = _cfg(path=str(tmp_path / name))
    msg = _one_line_error(cfg)
    assert msg.startswith("data.path=") and cause in msg and "{client} as the only field" in msg


def _one_line_error(cfg, num_clients=2):
    with pytest.raises(ConfigError) as err:
        check_data_config(cfg, num_clients)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_each_bad_input_gives_its_error(tmp_path):
    p = tmp_path
    assert "does not exist" in _one_line_error(_cfg(path=str(p / "nope.jsonl")))
    (p / "x.txt").write_text("hello")
    assert "unknown file type '.txt'" in _one_line_error(_cfg(path=str(p / "x.txt")))
    (p / "empty.jsonl").write_text("\n\n")
    assert "empty.jsonl is empty" in _one_line_error(_cfg(path=str(p / "empty.jsonl")))
    good = json.dumps(_rows(1)[0])
    (p / "bad.jsonl").write_text(f"{good}\n{good}\n{{'single': quotes}}\n")
    assert "line 3 of bad.jsonl is not valid JSON" in _one_line_error(_cfg(path=str(p / "bad.jsonl")))
    (p / "bad.json").write_text('[\n {"instruction": "a",\n  "output": }\n]')
    assert "line 3 of bad.json is not valid JSON" in _one_line_error(_cfg(path=str(p / "bad.json")))
    (p / "bad.csv").write_text("instruction,output,label\na,b,c\nd,e,f,g\n")
    assert "line 3 of bad.csv has 4 fields" in _one_line_error(_cfg(path=str(p / "bad.csv")))
    (p / "nofield.jsonl").write_text(good + "\n" + json.dumps({"instruction": "x", "label": "pos"}) + "\n")
    assert "line 2 of nofield.jsonl has no 'output'" in _one_line_error(_cfg(path=str(p / "nofield.jsonl")))
    # Some rows have the partition field and one lacks it: an error (no row at all having it: see test_data_real.py).
    (p / "nolabel.jsonl").write_text(good + "\n" + json.dumps({"instruction": "x", "output": "y"}) + "\n")
    msg = _one_line_error(_cfg(path=str(p / "nolabel.jsonl"), partition="dirichlet"))
    assert "line 2 of nolabel.jsonl has no field 'label'" in msg and "data.partition_by" in msg
    (p / "nulllabel.jsonl").write_text(json.dumps({"instruction": "x", "output": "y", "label": None}) + "\n")
    msg = _one_line_error(_cfg(path=str(p / "nulllabel.jsonl"), partition="dirichlet"))
    assert "line 1 of nulllabel.jsonl has no field 'label'" in msg
    (p / "text.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    assert "cannot detect the format" in _one_line_error(_cfg(path=str(p / "text.jsonl")))
    (p / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    assert "last message must be the assistant" in _one_line_error(_cfg(path=str(p / "chat.jsonl"), partition="iid"))
    (p / "few.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(3)))
    msg = _one_line_error(_cfg(path=str(p / "few.jsonl"), partition="iid", test_size=0.0), num_clients=5)
    assert "client 3 gets no training examples" in msg and "data.partition" in msg
    assert msg.endswith("use more data or fewer clients")  # alpha and min_partition_size shape Dirichlet splits only
    (p / "forty.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(40)))
    msg = _one_line_error(_cfg(path=str(p / "forty.jsonl"), partition="iid", test_size=0.99), num_clients=2)
    assert "client 1 gets no training examples" in msg and "a smaller data.test_size (now 0.99)" in msg
    assert "data.format='xml' is not known" in _one_line_error(_cfg(format="xml"))
    assert "data.num_labels=20" in _one_line_error(_cfg(num_labels=20))
    assert "not loadable from the hub" in _one_line_error(_cfg(path="no-such-org/no-such-dataset"))

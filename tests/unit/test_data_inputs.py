"""A user's own data files: inputs that once crashed with a traceback or trained on something else than was written,
and now load as written or stop with a one-line ConfigError naming the setting and the fix."""

import json

import pytest

from deca_ds.config import ConfigError
from deca_ds.data import build_client_data, check_data_config, make_byte_tokenizer
from deca_ds.data.loading import _plan
from test_data_loading import _cfg  # the same RunConfig-with-data-settings helper


def _rows(n):
    return [{"instruction": f"Sentiment of {i}?", "output": ("pos", "neg")[i % 2], "label": ("pos", "neg")[i % 2]}
            for i in range(n)]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _one_line_error(cfg, num_clients=1):
    with pytest.raises(ConfigError) as err:
        check_data_config(cfg, num_clients)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("data.")
    return msg


def _chat(n):
    return [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(n)]


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_a_file_that_is_not_utf8_is_one_line_naming_the_line(tmp_path, kind):
    """A Latin-1 byte (an Excel/Windows export) raised a bare UnicodeDecodeError traceback."""
    good = json.dumps(_rows(1)[0]) + "\n" if kind == "jsonl" else "q,pos,pos\n"
    head = "" if kind == "jsonl" else "instruction,output,label\n"
    bad = '{"instruction": "caf\xe9", "output": "pos"}\n' if kind == "jsonl" else "caf\xe9,pos,pos\n"
    path = tmp_path / f"latin.{kind}"
    path.write_bytes((head + good * 3).encode() + bad.encode("latin-1"))
    msg = _one_line_error(_cfg(path=str(path), partition="iid"))
    assert f"line {4 if kind == 'jsonl' else 5} of latin.{kind} is not UTF-8 (byte 0xe9)" in msg
    assert "save the file as UTF-8" in msg


def test_a_csv_with_a_byte_order_mark_loads(tok, tmp_path):
    """Excel's "CSV UTF-8" starts with a byte-order mark, which glued onto the first field name: the file was
    refused with "cannot detect the format from fields ['label', 'output', '\\ufeffinstruction']"."""
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbfinstruction,output,label\n" + b"".join(b"q%d,pos,pos\n" % i for i in range(8)))
    d = build_client_data(_cfg(path=str(path), partition="iid", test_size=0.25), tok, 0, 1)
    assert d.meta["format"] == "alpaca" and d.meta["train_rows"] + len(d.eval) + len(d.test) == 8


def test_a_csv_trains_on_its_cells_as_written(tmp_path):
    """The checked rows and the trained rows differed: the datasets CSV reader kept an all-empty line (",,", which
    spreadsheets write for empty rows) as a row trained on "None" -> "None", and read the cells "NA", "None",
    "007" and "1.50" as null, null, 7 and 1.5, so the model was trained on "None", "None", "7" and "1.5"."""
    path = tmp_path / "sheet.csv"
    path.write_text("instruction,output,label\nq1,NA,a\n,,\nq2,None,b\nq3,007,a\nq4,1.50,b\n,,\n")
    plan = _plan(_cfg(path=str(path), partition="iid", test_size=0.0), 1, None)
    assert plan.pool["instruction"] == ["q1", "q2", "q3", "q4"]
    assert plan.pool["output"] == ["NA", "None", "007", "1.50"]


@pytest.mark.parametrize("field, value, said", [
    ("output", ["pos", "neg"], "output is a list"),
    ("instruction", {"text": "q"}, "instruction is an object"),
    ("input", ["x"], "input is a list"),
    ("output", True, "output is true/false"),
])
def test_an_alpaca_field_that_is_not_text_is_refused(tmp_path, field, value, said):
    """A list, an object or true/false in instruction/input/output was trained on as Python's spelling of it
    (``['pos', 'neg']``, ``{'text': 'q'}``, ``True``), with no error; a number is still written as text."""
    rows = _rows(6)
    rows[3][field] = value
    rows[4]["output"] = 7
    msg = _one_line_error(_cfg(path=_jsonl(tmp_path / "x.jsonl", rows), partition="iid"))
    assert "line 4 of x.jsonl" in msg and said in msg


def test_a_json_file_of_columns_is_refused(tmp_path):
    """``{"instruction": [...], "output": [...]}`` (columns, as pandas writes them) became ONE row whose
    instruction was the text "['a', 'b']"."""
    path = tmp_path / "cols.json"
    path.write_text(json.dumps({"instruction": ["a", "b"], "output": ["x", "y"]}))
    msg = _one_line_error(_cfg(path=str(path), partition="iid"))
    assert "item 1 of cols.json: instruction is a list, not text" in msg


@pytest.mark.parametrize("change, said", [
    (lambda m: m[1].update(content=None), "the content of message 2 is null"),
    (lambda m: m[0].update(content=[{"type": "text", "text": "hi"}]), "the content of message 1 is a list"),
])
def test_a_chat_message_whose_content_is_not_text_is_refused(tmp_path, change, said):
    """A null content (an assistant turn with tool calls) was trained on as the text "None", and OpenAI-style
    content parts as "[{'type': 'text', 'text': 'hi'}]", with no error."""
    rows = _chat(6)
    change(rows[2]["messages"])
    msg = _one_line_error(_cfg(path=_jsonl(tmp_path / "c.jsonl", rows), partition="iid"))
    assert "line 3 of c.jsonl" in msg and said in msg


def test_a_chat_message_without_a_role_string_is_refused(tok, tmp_path):
    """A null role passed the check and crashed building the data with jinja2's UndefinedError traceback."""
    rows = _chat(6)
    rows[2]["messages"][0]["role"] = None
    msg = _one_line_error(_cfg(path=_jsonl(tmp_path / "c.jsonl", rows), partition="iid"))
    assert "line 3 of c.jsonl: the role of message 1" in msg


def test_a_sharegpt_value_that_is_not_text_is_refused(tmp_path):
    """A list as a turn's value was trained on as the text "['a']"."""
    rows = [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
            for i in range(6)]
    rows[1]["conversations"][1]["value"] = ["a"]
    msg = _one_line_error(_cfg(path=_jsonl(tmp_path / "s.jsonl", rows), partition="iid"))
    assert "line 2 of s.jsonl: the value of turn 2 is a list" in msg


def test_a_list_valued_partition_field(tok, tmp_path):
    """A list in the ``data.partition_by`` field (tags) crashed every split with "TypeError: unhashable type:
    'list'": dirichlet/shards now refuse it in one line, iid and per-client files (which do not split by it) count
    rows instead."""
    rows = _rows(20)
    for r in rows:
        r["label"] = [r["label"]]
    path = _jsonl(tmp_path / "tags.jsonl", rows)
    msg = _one_line_error(_cfg(path=path, partition="dirichlet"), num_clients=2)
    assert "line 1 of tags.jsonl: field 'label', which data.partition_by names, holds a list" in msg
    d = build_client_data(_cfg(path=path, partition="iid"), tok, 1, 2)
    assert d.count_names == ["rows"] and d.counts.sum() == len(d.train) * 2
    _jsonl(tmp_path / "site_0.jsonl", rows)
    d = build_client_data(_cfg(path=str(tmp_path / "site_{client}.jsonl")), tok, 0, 1)
    assert d.count_names == ["rows"]


@pytest.mark.parametrize("name", ["data_dir", "data_dir/", "client_{client}.jsonl"])
def test_a_directory_as_data_path_says_so(tmp_path, name):
    """A directory was refused as "unknown file type '(none)' of : ..." (no name at all with a trailing slash),
    and a per-client file that is a directory as "file ... does not exist"."""
    (tmp_path / "data_dir").mkdir()
    (tmp_path / "client_0.jsonl").mkdir()
    msg = _one_line_error(_cfg(path=str(tmp_path / name)))
    assert "is a directory: name a .json, .jsonl, .csv or .parquet file in it" in msg


def test_a_chat_template_that_refuses_a_row_is_one_line(tmp_path):
    """A model whose chat template refuses a turn (Gemma: "System role not supported") crashed building the data
    with a bare jinja2 TemplateError traceback from inside transformers."""
    tok = make_byte_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('System role not supported') }}{% endif %}"
                         "{{ '<s>' + m['role'] + ':' + m['content'] + '</s>' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '<s>assistant:' }}{% endif %}")
    rows = _chat(6)
    rows[3]["messages"].insert(0, {"role": "system", "content": "be brief"})
    cfg = _cfg(path=_jsonl(tmp_path / "c.jsonl", rows), partition="iid", test_size=0.0)
    with pytest.raises(ConfigError) as err:
        build_client_data(cfg, tok, 0, 1)
    msg = str(err.value)
    assert msg.startswith("data.path=") and "\n" not in msg
    assert "refuses a row with the roles system, user, assistant (TemplateError: System role not supported)" in msg


def test_a_csv_partition_column_of_site_numbers_keeps_numeric_order(tmp_path):
    """CSV cells are text: read as written (above), a column of site numbers 1..12 would sort "10" before "2" and
    the natural split would give client 1 site 10's rows instead of site 2's (the pandas reader, and JSON, give
    numbers). Canonical integers in the partition_by column stay numbers; "007" elsewhere stays text."""
    path = tmp_path / "sites.csv"
    path.write_text("instruction,output,site\n" + "".join(f"q{s}-{k},007,{s}\n" for s in range(1, 13) for k in range(3)))
    plan = _plan(_cfg(path=str(path), partition="natural", partition_by="site", test_size=0.0), 12, None)
    sites = [sorted({plan.pool[int(i)]["site"] for i in idx}) for idx in plan.train_idx]
    assert sites == [[s] for s in range(1, 13)] and plan.pool["output"][0] == "007"
    mixed = tmp_path / "mixed.csv"  # not all integers: left as text
    mixed.write_text("instruction,output,site\n" + "".join(f"q{k},a,{s}\n" for s in ("1", "07", "x") for k in range(3)))
    assert _plan(_cfg(path=str(mixed), partition="natural", partition_by="site", test_size=0.0), 3,
                 None).pool["site"][:4] == ["1", "1", "1", "07"]


def test_a_row_of_a_saved_dataset_that_is_not_text_is_one_line(tok, tmp_path, monkeypatch):
    """Rows loaded from the hub or a saved dataset are checked only on a sample of 100 before training; a later row
    whose content is null raised a bare ValueError traceback while the data was built (before the text check it
    was trained on as "None")."""
    import datasets

    rows = _chat(120)
    rows[110]["messages"][1]["content"] = None
    monkeypatch.setattr(datasets, "load_dataset", lambda path, split: datasets.Dataset.from_list(rows))
    cfg = _cfg(path="someone/chat-set", partition="iid", test_size=0.0)
    with pytest.raises(ConfigError) as err:
        build_client_data(cfg, tok, 0, 1)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("data.path='someone/chat-set': in a row: the content of message 2 is null, not text")

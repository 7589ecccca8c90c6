"""The partition summary of a per-client-files run: every client's own row under its own labels."""

import json

import pytest
from dist import run_distributed

pytestmark = pytest.mark.integration


def _gathered(rank, world_size, folder):
    from deca_ds.config import RunConfig
    from deca_ds.data import build_client_data, make_byte_tokenizer
    from deca_ds.gossip import ClientLayout
    from deca_ds.trainer import _gather_counts

    cfg = RunConfig()
    cfg.data.path = f"{folder}/client_{{client}}.jsonl"
    cfg.data.test_size = 0.2
    layout = ClientLayout(world_size, rank, 1)
    data = build_client_data(cfg, make_byte_tokenizer(), layout.client_id, layout.num_clients)
    counts, names = _gather_counts(data.counts, data.count_names, layout)
    return counts.tolist(), names


def test_per_client_files_summary_has_every_clients_row_under_its_labels(tmp_path):
    """Client 1's row was read from row 0 of its counts (always zero: a client's own row is ``counts[client]``), and
    every client's columns were taken to be client 0's label names although each site's file holds its own labels:
    the summary showed client 1 with no rows (or under client 0's labels)."""
    labels = {0: ("sports", "music"), 1: ("food", "weather", "music")}
    for c, names in labels.items():
        rows = [{"instruction": "Topic?", "input": f"text {i}", "output": names[i % len(names)],
                 "label": names[i % len(names)]} for i in range(30)]
        (tmp_path / f"client_{c}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = run_distributed(_gathered, 2, str(tmp_path))
    assert results[0] == results[1]  # every rank gets the same summary
    counts, names = results[0]
    assert sorted(names) == ["food", "music", "sports", "weather"] and len(names) == 4
    by_name = [dict(zip(names, row)) for row in counts]
    assert sum(by_name[0].values()) == sum(by_name[1].values()) == 24  # 30 rows less the 20 % held out
    assert by_name[0]["food"] == by_name[0]["weather"] == 0 and by_name[0]["sports"] > 0 and by_name[0]["music"] > 0
    assert by_name[1]["sports"] == 0 and min(by_name[1][n] for n in labels[1]) > 0

"""The tuning protocol of recipes/sweep.py and the reported tables: nothing is chosen on an evaluation seed, paired
intervals are Student-t intervals, and no reported cell has fewer than 5 evaluation seeds."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "recipes"))
import sweep  # noqa: E402

RESULTS = ROOT / "docs" / "results"


def _spec(**over):
    spec = {"base": {"num_clients": 2, "max_steps": 4}, "tune": {"seeds": [100, 101], "lr": [0.001, 0.01],
                                                                 "deca_betas": [[0.99, 0.999]]},
            "eval_seeds": [0, 1, 2, 3, 4],
            "grid": {"method": {"deca": {"method": "deca"}, "badam_gossip": {"method": "badam_gossip"}}}}
    spec.update(over)
    return spec


def _rec(run, loss):
    return {"run_id": run["run_id"], "labels": run["labels"], "phase": run["phase"], "consensus_test_loss": loss}


def test_paired_interval_is_the_student_t_interval():
    a, b = [1.0, 2.0, 4.0, 3.0, 5.0], [0.5, 1.0, 3.0, 3.5, 4.0]
    d = [0.5, 1.0, 1.0, -0.5, 1.0]
    mean = sum(d) / 5
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 4)
    m, lo, hi = sweep.paired_interval(a, b)
    assert m == pytest.approx(mean)
    assert hi - m == pytest.approx(2.776 * sd / math.sqrt(5))  # t(0.975, 4) = 2.776
    assert lo == pytest.approx(2 * m - hi)


def _t_density(x: float, df: int) -> float:
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    return c * (1 + x * x / df) ** (-(df + 1) / 2)


@pytest.mark.parametrize("df", sorted(sweep._T95))
def test_tabulated_t_quantiles_are_the_975_quantiles(df):
    """Each tabulated quantile q, printed to 3 decimals, is the 0.975 quantile of Student's t: the integral of the
    density from 0 to q (Simpson, 2000 panels: error far below 1e-9 for this smooth density) is 0.475 up to what a
    rounding of q by at most 5e-4 can move it, density(q - 5e-4) * 5e-4 (the density falls beyond 0)."""
    q, n = sweep.t95(df), 2000
    h = q / n
    area = h / 3 * sum((1 if i in (0, n) else 4 if i % 2 else 2) * _t_density(i * h, df) for i in range(n + 1))
    assert abs(0.5 + area - 0.975) <= _t_density(q - 5e-4, df) * 5e-4


def test_hyperparameters_are_chosen_on_tuning_seeds_only():
    spec = _spec()
    tune = sweep.tuning_runs(spec)
    assert {r["labels"]["seed"] for r in tune} == {"100", "101"}
    # deca: lr 0.01 better on the tuning seeds; badam_gossip: lr 0.001.
    recs = [_rec(r, 1.0 if (r["labels"]["lr"] == "0.01") == (r["labels"]["method"] == "deca") else 2.0) for r in tune]
    chosen = sweep.choose_hparams(spec, recs)
    assert chosen["deca"]["hparams"] == {"optim.lr": 0.01, "deca.betas": [0.99, 0.999]}
    assert chosen["badam_gossip"]["hparams"] == {"optim.lr": 0.001}
    runs = sweep.eval_runs(spec, chosen)
    assert {r["labels"]["seed"] for r in runs} == {"0", "1", "2", "3", "4"}
    assert all(r["settings"]["topology.seed"] == r["settings"]["seed"] == r["settings"]["data.seed"] for r in runs)
    # Evaluation records, however good, never change the choice.
    evals = [_rec(r, -100.0) | {"labels": {**r["labels"], "lr": "0.001"}} for r in runs]
    assert sweep.choose_hparams(spec, recs + evals)["deca"]["hparams"]["optim.lr"] == 0.01
    # An incomplete configuration (one tuning seed missing) does not compete.
    partial = [r for r in recs if not (r["labels"]["method"] == "deca" and r["labels"]["lr"] == "0.001"
                                       and r["labels"]["seed"] == "101")]
    for r in partial:
        if r["labels"]["method"] == "deca" and r["labels"]["lr"] == "0.001":
            r["consensus_test_loss"] = 0.0
    assert sweep.choose_hparams(spec, partial)["deca"]["hparams"]["optim.lr"] == 0.01


def test_protocol_grids_separate_tuning_and_evaluation_seeds():
    for name in sweep.PROTOCOL_GRIDS:
        spec = yaml.safe_load((sweep.GRIDS_DIR / f"{name}.yaml").read_text())
        assert len(spec["eval_seeds"]) >= sweep.MIN_EVAL_SEEDS, name
        src = spec.get("tune_from")
        tune = (yaml.safe_load((sweep.GRIDS_DIR / f"{src}.yaml").read_text()) if src else spec).get("tune")
        # A grid without tuning (paper_core) fixes its hyperparameters in base: nothing is chosen on any seed.
        assert tune is None or not set(tune["seeds"]) & set(spec["eval_seeds"]), name
        assert tune is not None or not sweep.tuning_runs(spec), name
        # Every run is a valid recipe configuration.
        from deca_ds.config import load_config

        for run in sweep.tuning_runs(spec)[:3] + sweep.eval_runs(spec, {})[:3]:
            load_config(None, sweep._overrides({**run["settings"], "output_dir": "/tmp/x"}))
        if spec.get("pretrain"):  # the pretraining run of a grid on a pretrained base is a valid recipe too
            load_config(None, sweep._overrides({**sweep._flatten(spec["pretrain"]), "output_dir": "/tmp/x"}))


_ROW = re.compile(r"^\| (?P<method>[^|]+?) \| (?P<seeds>\d+(?:,\d+)*) \|")


def reported_rows(md: str) -> list[tuple[str, list[int]]]:
    """(method, evaluation seeds) of every table row that reports evaluation seeds (the ``eval seeds`` column)."""
    rows, in_table = [], False
    for line in md.splitlines():
        if line.startswith("| ") and "eval seeds" in line:
            in_table = True
            continue
        if in_table and line.startswith("|"):
            m = _ROW.match(line)
            if m:
                rows.append((m["method"], [int(s) for s in m["seeds"].split(",")]))
            continue
        in_table = False
    return rows


def test_reported_row_parser_catches_a_four_seed_cell():
    md = "| method | eval seeds | acc |\n|---|---|---|\n| a | 0,1,2,3,4 | 0.9 |\n| b | 0,1,2,3 | 0.8 |\n"
    rows = reported_rows(md)
    assert rows == [("a", [0, 1, 2, 3, 4]), ("b", [0, 1, 2, 3])]
    assert [m for m, s in rows if len(s) < sweep.MIN_EVAL_SEEDS] == ["b"]


def test_summary_leaves_out_cells_with_fewer_than_five_eval_seeds(tmp_path, monkeypatch):
    spec = _spec(tune=None)
    (tmp_path / "grids").mkdir()
    (tmp_path / "grids" / "tiny.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.setattr(sweep, "GRIDS_DIR", tmp_path / "grids")
    runs = sweep.eval_runs(spec, {})
    recs = []
    for r in runs:
        if r["labels"]["method"] == "badam_gossip" and r["labels"]["seed"] == "4":
            continue  # badam_gossip has 4 evaluation seeds
        recs.append({**_rec(r, 1.0), "consensus_accuracy": 0.5})
    (tmp_path / "tiny.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    md = sweep.summarize_protocol("tiny", str(tmp_path)).read_text()
    rows = reported_rows(md)
    assert [m for m, _ in rows] == ["deca"]
    assert "badam_gossip (4 seeds)" in md


def _published() -> list[tuple[str, str]]:
    out = [("docs/results.md", (ROOT / "docs" / "results.md").read_text())]
    for name in sweep.PROTOCOL_GRIDS:
        md = RESULTS / f"{name}.md"
        if md.exists():
            out.append((str(md.relative_to(ROOT)), md.read_text()))
    return out


def test_every_published_cell_has_at_least_five_evaluation_seeds():
    """Fails when docs/results.md or a generated protocol table reports a cell measured on fewer than 5 evaluation
    seeds, or names a seed whose run is not in the results files."""
    records = {}
    for name in sweep.PROTOCOL_GRIDS:
        path = RESULTS / f"{name}.jsonl"
        if path.exists():
            for r in sweep.load_results(str(path)):
                if r.get("phase") == "eval":
                    records.setdefault(r["labels"]["method"], set()).add(int(r["labels"]["seed"]))
    for where, md in _published():
        for method, seeds in reported_rows(md):
            assert len(seeds) >= sweep.MIN_EVAL_SEEDS, f"{where}: {method} reported on {len(seeds)} seeds"
            if "−" in method:  # a paired difference row: both methods must have the seeds
                parts = [p.strip() for p in method.split("−")]
            else:
                parts = [method]
            for p in parts:
                assert set(seeds) <= records.get(p, set()), f"{where}: {p} seeds {seeds} not all in the results"


def test_protocol_phases_tune_runs_only_the_tuning_runs(tmp_path, monkeypatch):
    """``protocol --phases tune`` hands only the tuning runs to the pool; the default runs both phases in order."""
    (tmp_path / "grids").mkdir()
    (tmp_path / "grids" / "tiny.yaml").write_text(yaml.safe_dump(_spec(tune={"seeds": [100], "lr": [0.001]})))
    monkeypatch.setattr(sweep, "GRIDS_DIR", tmp_path / "grids")
    monkeypatch.setattr(sweep, "PROTOCOL_GRIDS", ("tiny",))
    monkeypatch.setattr(sweep, "summarize_protocol", lambda name, out: "")
    pooled = []

    def fake_pool(tasks, jobs):  # record each batch and finish its runs with a score
        pooled.append([t[0]["phase"] for t in tasks])
        for run, _, results in tasks:
            with open(results, "a") as f:
                f.write(json.dumps(_rec(run, 1.0)) + "\n")

    monkeypatch.setattr(sweep, "_run_pool", fake_pool)
    out = str(tmp_path / "out")
    assert sweep.main(["protocol", "--grids", "tiny", "--out", out, "--phases", "tune"]) == 0
    assert pooled == [["tune", "tune"]]  # deca and badam_gossip at one lr, one tuning seed; no evaluation run
    assert sweep.main(["protocol", "--grids", "tiny", "--out", out]) == 0
    assert pooled[1] == [] and pooled[2] == ["eval"] * 10  # tuning done: the 2 methods x 5 evaluation seeds


@pytest.mark.parametrize("name,earlier", [("paper_confirm", ["paper"]), ("paper_clients", ["paper", "paper_confirm"]),
                                        ("paper_clients2", ["paper", "paper_confirm", "paper_clients"]),
                                        ("paper_clients3", ["paper", "paper_confirm", "paper_clients",
                                                            "paper_clients2"])])
def test_confirmation_grids_run_the_paper_setting_on_seeds_no_choice_saw(name, earlier):
    """paper_confirm and paper_clients test differences suggested by earlier evaluation seeds: each must run
    paper.yaml's setting with paper.yaml's choices, on seeds that no tuning and no earlier evaluation used."""
    load = lambda n: yaml.safe_load((sweep.GRIDS_DIR / f"{n}.yaml").read_text())  # noqa: E731
    confirm, paper = load(name), load("paper")
    assert confirm["tune_from"] == "paper" and confirm.get("tune") is None
    assert confirm["base"] == paper["base"]
    seen = set(paper["tune"]["seeds"]).union(*(load(n)["eval_seeds"] for n in earlier))
    assert not set(confirm["eval_seeds"]) & seen
    for label, settings in confirm["grid"]["method"].items():
        assert paper["grid"]["method"][label] == settings, label


def test_paired_metrics_of_a_grid_set_the_difference_columns(tmp_path, monkeypatch):
    """A grid's ``paired_metrics`` names the record keys its paired differences report (default: consensus
    accuracy, macro-F1, test loss); the interval is the paired t-interval of that key."""
    spec = {**_spec(tune=None), "paired": [["deca", "badam_gossip"]],
            "paired_metrics": ["client_accuracy_worst", "consensus_accuracy"]}
    (tmp_path / "grids").mkdir()
    (tmp_path / "grids" / "tiny.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.setattr(sweep, "GRIDS_DIR", tmp_path / "grids")
    recs = []
    for r in sweep.eval_runs(spec, {}):
        s = int(r["labels"]["seed"])
        worst = 0.5 + 0.01 * s + (0.1 if r["labels"]["method"] == "deca" else 0.0)
        recs.append({**_rec(r, 1.0), "consensus_accuracy": 0.9, "client_accuracy_worst": worst})
    (tmp_path / "tiny.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    md = sweep.summarize_protocol("tiny", str(tmp_path)).read_text()
    assert "| difference | eval seeds | worst client acc | cons. acc |" in md
    # Every seed differs by exactly 0.1: zero spread, so the interval collapses onto the mean.
    assert "| deca − badam_gossip | 0,1,2,3,4 | +0.100 [+0.100, +0.100] | +0.000 [+0.000, +0.000] |" in md


def test_a_grid_with_pretrain_fine_tunes_one_base_made_once(tmp_path, monkeypatch):
    """A grid's ``pretrain`` block is run once (before the first run that needs it, not again once ``pretrain.json``
    is written, again after a pretraining killed before it), and every run of the grid gets ``model.path`` = its
    consensus model; changed pretrain settings make a new base directory."""
    (tmp_path / "grids").mkdir()
    pre = {"method": "centralized", "max_steps": 2, "data": {"task": "generation"}}
    (tmp_path / "grids" / "tiny.yaml").write_text(yaml.safe_dump(_spec(tune={"seeds": [100], "lr": [0.001]},
                                                                       pretrain=pre)))
    monkeypatch.setattr(sweep, "GRIDS_DIR", tmp_path / "grids")
    monkeypatch.setattr(sweep, "PROTOCOL_GRIDS", ("tiny",))
    monkeypatch.setattr(sweep, "summarize_protocol", lambda name, out: "")
    pretrained = []

    def fake_simulation(cfg, save_models, quiet):
        assert save_models and cfg.method == "centralized" and cfg.data.task == "generation"
        pretrained.append(cfg.output_dir)
        (Path(cfg.output_dir) / "consensus").mkdir(parents=True)
        return {"consensus": {"exact_match": 0.5}}

    import deca_ds.simulate

    monkeypatch.setattr(deca_ds.simulate, "run_simulation", fake_simulation)
    pooled = []

    def fake_pool(tasks, jobs):
        pooled.append([t[0]["settings"].get("model.path") for t in tasks])
        for run, _, results in tasks:
            with open(results, "a") as f:
                f.write(json.dumps(_rec(run, 1.0)) + "\n")

    monkeypatch.setattr(sweep, "_run_pool", fake_pool)
    out, runs = str(tmp_path / "out"), str(tmp_path / "runs")
    args = ["protocol", "--grids", "tiny", "--out", out, "--runs-dir", runs]
    assert sweep.main(args + ["--phases", "tune"]) == 0
    base = sweep.pretrain_dir(yaml.safe_load((tmp_path / "grids" / "tiny.yaml").read_text()), runs)
    assert pretrained == [str(base)] and pooled == [[str(base / "consensus")] * 2]
    record = json.loads((base / "pretrain.json").read_text())
    assert record["consensus"] == {"exact_match": 0.5}
    from importlib.metadata import version

    import torch

    assert record["versions"]["torch"] == version("torch") == torch.__version__  # what made the base
    assert set(record["versions"]) == set(sweep.VERSIONED_PACKAGES)
    assert sweep.main(args) == 0  # the evaluation runs: the same base, not pretrained again
    assert pretrained == [str(base)] and pooled[-1] == [str(base / "consensus")] * 10
    (base / "pretrain.json").unlink()  # a pretraining killed before its record: done again, from an empty folder
    (base / "stale").write_text("x")
    assert sweep.ensure_pretrained("tiny", yaml.safe_load((tmp_path / "grids" / "tiny.yaml").read_text()), runs)
    assert pretrained == [str(base)] * 2 and not (base / "stale").exists()
    other = sweep.pretrain_dir(_spec(pretrain={**pre, "max_steps": 3}), runs)
    assert other != base and other.parent == base.parent
    assert sweep.pretrain_dir(_spec(), runs) is None  # no pretrain block: the embedded random model


def test_grids_with_one_pretrain_block_share_the_base_and_tune_from_needs_the_same_base(tmp_path, monkeypatch):
    """A grid that takes its hyperparameters from a grid on a pretrained base (tune_from) fine-tunes the same base:
    one pretraining serves both, and a grid on another base (or on the random initialisation) is refused."""
    pre = {"method": "centralized", "max_steps": 2, "data": {"task": "generation"}}
    runs = str(tmp_path / "runs")
    # grids that differ in everything but the pretrain block share its base
    other_grid = _spec(pretrain=pre, eval_seeds=[55, 56, 57, 58, 59], base={"num_clients": 8, "max_steps": 768})
    assert sweep.pretrain_dir(_spec(pretrain=pre), runs) == sweep.pretrain_dir(other_grid, runs)
    (tmp_path / "grids").mkdir()
    monkeypatch.setattr(sweep, "GRIDS_DIR", tmp_path / "grids")
    (tmp_path / "grids" / "src.yaml").write_text(yaml.safe_dump(_spec(pretrain=pre)))
    for name, other in [("same", pre), ("other", {**pre, "max_steps": 3}), ("none", None)]:
        spec = {k: v for k, v in _spec(tune_from="src", pretrain=other).items() if k != "tune"}
        if other is None:
            del spec["pretrain"]
        (tmp_path / "grids" / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    todo_tune, todo_eval = sweep.protocol_todo("same", tmp_path)
    assert todo_tune == [] and len(todo_eval) == 10
    for name in ("other", "none"):
        with pytest.raises(SystemExit, match=f"grid {name}: tune_from: src needs the same pretrain block as src.yaml"):
            sweep.protocol_todo(name, tmp_path)


GRIDS = sorted((ROOT / "recipes" / "configs" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", GRIDS, ids=lambda p: p.name)
def test_every_cell_of_every_shipped_grid_loads(path):
    """A grid whose cells the config refuses would record an error for each of them when regenerated - found when
    topology.p became refusable with a ring (skew.yaml's ring split inherited the base's ER probability)."""
    from deca_ds.config import load_config

    spec = yaml.safe_load(path.read_text())
    cells = [s for _, s in sweep._cells(spec)] if "tune" in spec or "eval_seeds" in spec else \
        [r["settings"] for r in sweep.expand_grid(spec)]
    assert cells
    for settings in cells:
        load_config(None, sweep._overrides(settings))


def test_a_results_record_names_the_device_it_ran_on(tmp_path, monkeypatch):
    """Every record carries where its simulation ran (records made on a GPU agree with CPU ones only within float
    rounding): ``cpu (N threads)`` for the CPU, the accelerator's name otherwise; a machine without CUDA refuses
    ``cuda`` with the setting's own error."""
    import torch

    import deca_ds.simulate
    from deca_ds.config import ConfigError

    client = {"test_accuracy": 0.5, "eval": {"macro_f1": 0.4}, "test_loss": 1.0, "bytes_sent": 0,
              "optimizer_state_bytes": 8}

    def fake_simulation(cfg, save_models, quiet):
        Path(cfg.output_dir).mkdir(parents=True)
        (Path(cfg.output_dir) / "metrics.jsonl").write_text(
            json.dumps({"step": 0, "client": 0, "loss": 2.0, "consensus_distance": 0.1}) + "\n")
        return {"clients": [client], "consensus": {"accuracy": 0.5, "loss": 1.0}}

    monkeypatch.setattr(deca_ds.simulate, "run_simulation", fake_simulation)
    run = {"run_id": "r", "labels": {}, "settings": {"num_clients": 1, "simulate.device": "cpu"}}
    record = sweep.run_one(run, str(tmp_path))
    assert record["device"] == f"cpu ({torch.get_num_threads()} threads)"
    if not torch.cuda.is_available():
        assert sweep.device_label("auto") == record["device"]
        with pytest.raises(ConfigError, match="simulate.device='cuda'"):
            sweep.device_label("cuda")
    else:
        assert sweep.device_label("cuda:0") == f"cuda:0 ({torch.cuda.get_device_name(0)})"


def test_sweep_runs_start_from_a_forkserver_that_imported_the_simulator():
    """Without CUDA every run is a fork of one process that imported torch, transformers and deca_ds once (a
    spawned run imports them again: ~6 s of CPU per run), and still a new process per run."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("with a CUDA device the runs are spawned (a process forked after CUDA was touched cannot use it)")
    ctx = sweep._run_context()
    assert ctx.get_start_method() == "forkserver"
    probe = "(sorted(__import__('sys').modules), __import__('os').getpid())"  # eval: a builtin, pickled by name
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        (modules, first), (_, second) = pool.apply(eval, (probe,)), pool.apply(eval, (probe,))
    assert set(sweep.PRELOAD) <= set(modules), set(sweep.PRELOAD) - set(modules)
    assert "bitsandbytes" not in modules  # its import asks the Hub for a kernel (deca_ds.optional)
    assert first != second and os.getpid() not in (first, second)

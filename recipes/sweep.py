"""Experiment grids with the single-process simulator, and their summary tables and curves.

    python recipes/sweep.py run recipes/configs/sweeps/sweep_main.yaml --results docs/results/sweep_main.jsonl --jobs 2
    python recipes/sweep.py summarize docs/results/sweep_main.jsonl --out docs/results/
    python recipes/sweep.py all --jobs 2     # every grid behind docs/results.md (missing runs only), then summaries

A grid YAML has ``base`` (recipe settings shared by every run, dotted or nested keys) and ``grid``: each axis is
either a dotted key with a list of values (``seed: [0, 1, 2]``) or a name with a mapping ``label -> settings``
(``method: {deca_qgm: {method: deca, deca.signal: qgm}, local: {method: local}}``). Runs are the product of the axes;
methods that never gossip (``local``, ``centralized``) run once per value of the other axes, not per topology.
``seed`` sets both the model/schedule seed and ``data.seed`` (partition and batch order). Each finished run appends
one JSON line to the results file; a run already there is skipped, so an interrupted sweep continues where it
stopped. ``exclude`` lists label combinations to leave out (``- {method: local, split: ring}``).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import yaml  # noqa: E402

NO_GOSSIP = ("local", "centralized")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("grid",):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def expand_grid(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """All runs of a grid spec: ``[{"run_id", "labels": {axis: label}, "settings": {dotted: value}}]``.

    Raises:
        ValueError: an axis is neither a list nor a mapping.
    """
    base = _flatten(spec.get("base") or {})
    axes = []
    for axis, values in (spec.get("grid") or {}).items():
        if isinstance(values, list):
            axes.append([(axis, _label(v), {axis: v}) for v in values])
        elif isinstance(values, dict):
            axes.append([(axis, str(label), _flatten(s or {})) for label, s in values.items()])
        else:
            raise ValueError(f"grid axis {axis!r} must be a list of values or a mapping label -> settings")
    runs, seen = [], set()
    for combo in itertools.product(*axes):
        settings = dict(base)
        labels = {}
        for axis, label, s in combo:
            settings.update(s)
            labels[axis] = label
        if "seed" in settings:
            settings.setdefault("data.seed", settings["seed"])
            if "seed" in labels:
                settings["data.seed"] = settings["seed"]
        if settings.get("method") in NO_GOSSIP:
            for k in [k for k in settings if k.startswith("topology.")]:
                settings.pop(k)
            labels = {a: ("-" if a.startswith("topology") else v) for a, v in labels.items()}
        if any(all(labels.get(a) == str(v) for a, v in ex.items()) for ex in spec.get("exclude") or []):
            continue
        run_id = "__".join(f"{a}={v}" for a, v in labels.items())
        if run_id in seen:
            continue
        seen.add(run_id)
        runs.append({"run_id": run_id, "labels": labels, "settings": settings})
    return runs


def _label(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def _overrides(settings: dict[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v) if isinstance(v, (list, dict, bool)) or v is None else v}"
            for k, v in settings.items()]


VERSIONED_PACKAGES = ("torch", "transformers", "deepspeed", "peft", "numpy")
"""Packages whose versions every results record carries: a run is reproduced bit for bit only with the same ones."""


def package_versions() -> dict[str, str | None]:
    """Installed versions of :data:`VERSIONED_PACKAGES` (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def device_label(name: str) -> str:
    """Where a run's simulation ran, for its record: ``cpu (N threads)`` or the accelerator's name, e.g.
    ``cuda:0 (NVIDIA H200)``. Records made on different devices agree only within float rounding (and, on these
    chaotic trajectories, within seed-to-seed noise), so a table mixing them says so through this field.

    Args:
        name: the run's ``simulate.device`` setting.
    """
    import torch

    from deca_ds.simulate import resolve_device

    dev = resolve_device(name)
    if dev.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    index = dev.index if dev.index is not None else torch.cuda.current_device() if dev.type == "cuda" else 0
    label = torch.cuda.get_device_name(index) if dev.type == "cuda" else dev.type
    return f"{dev.type}:{index} ({label})"


def run_one(run: dict[str, Any], runs_dir: str) -> dict[str, Any]:
    """Simulate one run of the grid and reduce it to one results record (curves included)."""
    from deca_ds.config import load_config
    from deca_ds.metrics import read_jsonl
    from deca_ds.simulate import run_simulation

    out = Path(runs_dir) / run["run_id"].replace("/", "_")
    cfg = load_config(None, _overrides({**run["settings"], "output_dir": str(out), "backend": "simulate"}))
    if out.exists():  # a run killed before its line was written: start it again
        import shutil

        shutil.rmtree(out)
    t0 = time.perf_counter()
    summary = run_simulation(cfg, save_models=False, quiet=True)
    # read_jsonl restores non-finite values (written as null + a flag); eval records carry no training loss
    recs = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    steps = sorted({r["step"] for r in recs})
    by_step = {s: [r for r in recs if r["step"] == s] for s in steps}
    loss_curve = [sum(r["loss"] for r in by_step[s]) / len(by_step[s]) for s in steps]
    dist_curve = [sum(r["consensus_distance"] for r in by_step[s]) / len(by_step[s]) for s in steps]
    tail = max(1, len(steps) // 8)
    # Classification evaluates label accuracy; the generation task has no labels to score, only exact match of a
    # greedy generation, which is what its "accuracy" columns then hold.
    accs = [c["test_accuracy"] if c["test_accuracy"] is not None else c["eval"].get("exact_match", 0.0)
            for c in summary["clients"]]
    cons = summary["consensus"] or {}
    diag = summary.get("diagnostics") or {}
    f1s = [c["eval"].get("macro_f1") for c in summary["clients"]]
    return {
        "run_id": run["run_id"], "labels": run["labels"], "settings": run["settings"],
        "phase": run.get("phase", "grid"), "hparams": run.get("hparams"),
        "eval_rows": cons.get("examples"),
        "client_macro_f1_worst": min(f1s) if all(f is not None for f in f1s) else None,
        "rms_h": diag.get("rms_h"), "rms_g": diag.get("rms_g"), "rms_h_over_g": diag.get("rms_h_over_g"),
        "clipped_fraction": diag.get("clipped_fraction"),
        "consensus_accuracy": cons.get("accuracy", cons.get("exact_match")),
        "consensus_macro_f1": cons.get("macro_f1"),
        "consensus_test_loss": cons.get("loss"),
        "client_test_loss_mean": sum(c["test_loss"] for c in summary["clients"]) / len(accs),
        "client_test_loss_worst": max(c["test_loss"] for c in summary["clients"]),
        "client_accuracy_mean": sum(accs) / len(accs), "client_accuracy_worst": min(accs),
        "client_macro_f1_mean": sum(c["eval"].get("macro_f1", 0.0) for c in summary["clients"]) / len(accs),
        "final_train_loss": sum(loss_curve[-tail:]) / tail,
        "consensus_distance_mean": sum(dist_curve) / len(dist_curve),
        "bytes_sent_per_client": sum(c["bytes_sent"] for c in summary["clients"]) / len(accs),
        "optimizer_state_bytes": summary["clients"][0]["optimizer_state_bytes"],
        "loss_curve": loss_curve, "consensus_distance_curve": dist_curve,
        "seconds": time.perf_counter() - t0, "versions": package_versions(),
        "device": device_label(cfg.simulate.device),
    }


def _worker(args):
    run, runs_dir = args
    try:
        return run_one(run, runs_dir)
    except Exception as e:  # one failed run must not stop the grid; the error is recorded
        return {"run_id": run["run_id"], "labels": run["labels"], "settings": run["settings"],
                "error": f"{type(e).__name__}: {e}"}


class GridError(ValueError):
    """A grid YAML, or the settings of one of its runs, refused before any run starts (one line with the fix)."""


def load_grid(grid: str) -> list[dict[str, Any]]:
    """Every run of the grid YAML ``grid`` (:func:`expand_grid`), each run's settings checked as the run will load
    them, so that a misspelt or out-of-range setting stops the sweep before its first run instead of being recorded
    as an error line by every run of the grid.

    Args:
        grid: path of the grid YAML.

    Returns:
        The runs, as :func:`expand_grid` returns them.

    Raises:
        GridError: the file is missing, not UTF-8 YAML, not a mapping with ``base``/``grid`` mappings, an axis is
            malformed, or a run's settings are refused (:class:`deca_ds.config.ConfigError`, naming the run).
    """
    from deca_ds.config import ConfigError, load_config

    path = Path(grid)
    if not path.is_file():
        raise GridError(f"grid {grid!r} does not exist: give the path of a grid YAML (see recipes/configs/sweeps/)")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise GridError(f"grid {grid!r} is not valid YAML ({str(e).splitlines()[0]}): fix the file") from None
    except UnicodeDecodeError as e:
        raise GridError(f"grid {grid!r} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    if not isinstance(spec, dict):
        raise GridError(f"grid {grid!r} must hold a mapping (base: settings, grid: axes) at the top level")
    for key in ("base", "grid"):
        if spec.get(key) is not None and not isinstance(spec[key], dict):
            raise GridError(f"grid {grid!r}: {key} must be a mapping, got {spec[key]!r}")
    try:
        runs = expand_grid(spec)
    except ValueError as e:
        raise GridError(f"grid {grid!r}: {e}") from None
    for run in runs:
        try:
            load_config(None, _overrides({**run["settings"], "output_dir": "unused", "backend": "simulate"}))
        except ConfigError as e:
            raise GridError(f"grid {grid!r}, run {run['run_id']}: {e}; nothing was run") from None
    return runs


def _todo(grid: str, results: Path, limit: int = 0) -> tuple[int, int, list[dict[str, Any]]]:
    """The runs of a grid YAML not yet in ``results``: ``(runs in grid, runs done, runs to do)``.

    Raises:
        GridError: as :func:`load_grid`.
    """
    runs = load_grid(grid)
    done = set()
    if results.exists():
        for line in results.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "error" not in rec:
                done.add(rec["run_id"])
    todo = [r for r in runs if r["run_id"] not in done]
    return len(runs), len(runs) - len(todo), todo[:limit] if limit else todo


def _run_pool(tasks: list[tuple[dict[str, Any], str, Path]], jobs: int) -> None:
    """Run ``(run, runs_dir, results file)`` tasks, ``jobs`` at a time, appending each record to its file."""
    t0 = time.perf_counter()
    files = {res: open(res, "a") for res in {t[2] for t in tasks}}
    try:
        if jobs > 1:
            # One task per child: every run starts in a fresh process (no state leaks between runs).
            with _run_context().Pool(jobs, maxtasksperchild=1) as pool:
                it = pool.imap_unordered(_worker_to, [(r, d, str(res)) for r, d, res in tasks])
                _append_all(it, files, t0, len(tasks))
        else:
            _append_all((_worker_to((r, d, str(res))) for r, d, res in tasks), files, t0, len(tasks))
    finally:
        for f in files.values():
            f.close()


# What every run imports before its first step; a forkserver imports them once for all runs (see _run_context).
# Not peft: a plain import of it imports bitsandbytes, which asks the Hugging Face Hub for a kernel (deca_ds.optional);
# a dec_lora run imports it itself through deca_ds.optional.import_peft (~1 s).
PRELOAD = ["deca_ds.config", "deca_ds.metrics", "deca_ds.simulate", "deca_ds.stacked", "deca_ds.models",
           "deca_ds.data", "transformers.models.llama.modeling_llama"]


def _run_context():
    """The multiprocessing context of a sweep's runs: a forkserver that has imported :data:`PRELOAD` on a machine
    without CUDA, else spawn.

    A spawned run starts a new interpreter and imports torch, transformers and deca_ds again: ~6 s of CPU per
    run on a 2-core VM (measured: 8 spawned runs' start-up 24.5-26.1 s of wall time at 2 at a time, their imports
    4.6-7.0 s each). A forkserver child is a fork of one process that imported them once (8 starts 0.2 s), and is
    still a new process per run. Hazard: a process forked after CUDA's driver was touched cannot use CUDA, and
    imports may probe the GPU (DeepSpeed's accelerator detection), so with a CUDA device the runs are spawned as
    before. Bit-equal records either way (no run state exists before a run starts; checked on paper_core runs).
    """
    import multiprocessing as mp

    import torch

    if torch.cuda.is_available() or "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _worker_to(args):
    run, runs_dir, results = args
    return Path(results), _worker((run, runs_dir))


def cmd_run(args) -> int:
    """Run every missing run of a grid YAML, appending one line per run to ``--results``."""
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    n, done, todo = _todo(args.grid, results, args.limit)
    runs_dir = args.runs_dir or str(results.with_suffix("")) + "_runs"
    print(f"{n} runs in the grid, {done} done, running {len(todo)} with {args.jobs} job(s)", file=sys.stderr)
    _run_pool([(r, runs_dir, results) for r in todo], args.jobs)
    return 0


GRIDS_DIR = Path(__file__).parent / "configs" / "sweeps"
ALL_GRIDS = ("main", "betas", "blocks", "blocks_bytes", "skew", "generation", "lr")
"""The grids behind docs/results.md, in priority order (``sweep_<name>.yaml`` -> ``<out>/sweep_<name>.jsonl``)."""


def cmd_all(args) -> int:
    """Every grid of docs/results.md in one pool (no core idles between grids), then every summary."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = []
    for g in args.grids or ALL_GRIDS:
        results = out / f"sweep_{g}.jsonl"
        n, done, todo = _todo(str(GRIDS_DIR / f"sweep_{g}.yaml"), results)
        print(f"sweep_{g}: {n} runs, {done} done, {len(todo)} to run", file=sys.stderr)
        tasks += [(r, str(Path(args.runs_dir) / f"sweep_{g}"), results) for r in todo]
    t0 = time.perf_counter()
    _run_pool(tasks, args.jobs)
    print(f"ran {len(tasks)} runs in {time.perf_counter() - t0:.0f}s with {args.jobs} job(s)", file=sys.stderr)
    for g in args.grids or ALL_GRIDS:
        if (out / f"sweep_{g}.jsonl").exists():
            print(summarize(str(out / f"sweep_{g}.jsonl"), str(out)))
    return 0


def _append_all(records, files: dict[Path, Any], t0: float, total: int) -> None:
    for i, (res, rec) in enumerate(records, 1):
        f = files[res]
        f.write(json.dumps(rec, default=float) + "\n")
        f.flush()
        status = rec.get("error") or (f"cons test loss {rec['consensus_test_loss']:.3f} train loss "
                                      f"{rec['final_train_loss']:.3f} ({rec['seconds']:.0f}s)")
        print(f"[{i}/{total} {time.perf_counter() - t0:.0f}s] {rec['run_id']}: {status}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------
# summarize

METRICS = [
    ("consensus_test_loss", "cons. test loss", 3, 1.0),
    ("client_test_loss_mean", "client test loss mean", 3, 1.0),
    ("client_test_loss_worst", "client test loss worst", 3, 1.0),
    ("consensus_accuracy", "cons. acc", 3, 1.0),
    ("consensus_macro_f1", "cons. F1", 3, 1.0),
    ("client_accuracy_mean", "client acc mean", 3, 1.0),
    ("client_accuracy_worst", "client acc worst", 3, 1.0),
    ("final_train_loss", "train loss", 3, 1.0),
    ("consensus_distance_mean", "cons. dist", 2, 1.0),
    ("bytes_sent_per_client", "MiB sent/client", 1, 2.0 ** -20),
    ("optimizer_state_bytes", "opt. state KiB", 0, 2.0 ** -10),
]


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, s


def _fmt(xs: list[float], digits: int, scale: float, sci: bool = False) -> str:
    xs = [x * scale for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return "-"
    m, s = _mean_std(xs)
    if sci:
        return f"{m:.2e} ± {s:.1e}"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def load_results(path: str) -> list[dict[str, Any]]:
    """Successful records of a results file (the last record of a run wins)."""
    recs = {}
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "error" not in rec:
            recs[rec["run_id"]] = rec
    return list(recs.values())


def summarize(path: str, out_dir: str) -> Path:
    """Markdown tables (mean ± std over seeds, one table per setting) and PNG curves of a results file.

    Returns:
        The markdown file written (``<out_dir>/<results stem>.md``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = load_results(path)
    stem = Path(path).stem
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    axes = [a for a in recs[0]["labels"] if a != "seed"] if recs else []
    method_axis = "method" if "method" in axes else axes[0]
    setting_axes = [a for a in axes if a != method_axis]
    settings = sorted({tuple(r["labels"][a] for a in setting_axes) for r in recs})
    lines = [f"<!-- generated by: python recipes/sweep.py summarize {path} --out {out_dir} -->", ""]
    for setting in settings:
        # Methods without gossip carry topology "-": show them in every topology's table.
        def matches(r):
            return all(r["labels"][a] == v or (r["labels"][a] == "-" and a.startswith("topology"))
                       for a, v in zip(setting_axes, setting))
        if all(v == "-" for a, v in zip(setting_axes, setting) if a.startswith("topology")) and any(
                a.startswith("topology") for a in setting_axes) and len(
                {s for s in settings if s != setting}) > 0:
            continue
        rows = [r for r in recs if matches(r)]
        methods = list(dict.fromkeys(r["labels"][method_axis] for r in rows))
        title = ", ".join(f"{a}={v}" for a, v in zip(setting_axes, setting)) or "all runs"
        lines += [f"### {title}", "", "| method | seeds | " + " | ".join(m[1] for m in METRICS) + " |",
                  "|---" * (len(METRICS) + 2) + "|"]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for m in methods:
            mr = [r for r in rows if r["labels"][method_axis] == m]
            cells = [_fmt([r.get(k) for r in mr], d, sc, sci=(k == "consensus_distance_mean")) for k, _, d, sc in
                     METRICS]
            lines.append(f"| {m} | {len(mr)} | " + " | ".join(cells) + " |")
            n = min(len(r["loss_curve"]) for r in mr)
            loss = [sum(r["loss_curve"][i] for r in mr) / len(mr) for i in range(n)]
            cd = [sum(r["consensus_distance_curve"][i] for r in mr) / len(mr) for i in range(n)]
            ax1.plot(_smooth(loss), label=m)
            if any(x > 0 for x in cd):
                ax2.plot([max(x, 1e-12) for x in cd], label=m)
        ax1.set(title=f"train loss (mean over clients, seeds) — {title}", xlabel="step", ylabel="loss")
        ax2.set(title="consensus distance of the active block", xlabel="step", ylabel="RMS distance", yscale="log")
        ax1.legend(fontsize=7)
        ax2.legend(fontsize=7)
        fig.tight_layout()
        name = re.sub(r"[^A-Za-z0-9.-]+", "_", "_".join(str(v) for v in setting)).strip("_") or "all"
        png = out / f"{stem}__{name}.png"
        fig.savefig(png, dpi=90)
        plt.close(fig)
        lines += ["", f"![curves]({png.name})", ""]
    md = out / f"{stem}.md"
    md.write_text("\n".join(lines) + "\n")
    return md


def _smooth(xs: list[float], k: int = 5) -> list[float]:
    return [sum(xs[max(0, i - k + 1): i + 1]) / len(xs[max(0, i - k + 1): i + 1]) for i in range(len(xs))]


# ---------------------------------------------------------------------------------------------------------------
# the tuning protocol: tuning seeds choose the hyperparameters, fresh evaluation seeds measure

MIN_EVAL_SEEDS = 5
"""A protocol table reports a cell only when it has at least this many evaluation seeds (a unit test checks)."""
PROTOCOL_GRIDS = ("paper", "paper_r16", "skew", "paper_core", "paper_confirm", "paper_clients",
                  "paper_clients2", "paper_clients3", "paper_pretrained", "pretrained_clients", "pretrained_tuned",
                  "skew_clients", "paper_long")
"""The protocol grids behind docs/results.md, in priority order (``recipes/configs/sweeps/<name>.yaml``)."""

_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
        29: 2.045, 30: 2.042}
"""Two-sided 95 % quantiles of Student's t by degrees of freedom (larger df: the next smaller tabulated one)."""


def t95(df: int) -> float:
    """The two-sided 95 % quantile of Student's t with ``df`` degrees of freedom (conservative between rows)."""
    if df < 1:
        raise ValueError("a confidence interval needs at least 2 paired values")
    return _T95[max(k for k in _T95 if k <= df)]


def paired_interval(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Mean of the paired differences ``a_i - b_i`` and its 95 % t-interval ``(mean, low, high)``."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    m, s = _mean_std(d)
    half = t95(len(d) - 1) * s / math.sqrt(len(d))
    return m, m - half, m + half


def _seeded(settings: dict[str, Any], seed: int) -> dict[str, Any]:
    # A seed draws everything random: model init and block order, partition and batch order, and the graph.
    return {**settings, "seed": seed, "data.seed": seed, "topology.seed": seed}


def _cells(spec: dict[str, Any]) -> list[tuple[dict[str, str], dict[str, Any]]]:
    """(labels, settings) of every grid cell of a protocol spec (no seeds; methods without gossip once per split
    only when the split changes nothing but the topology)."""
    base = _flatten(spec.get("base") or {})
    axes = [[(axis, str(label), _flatten(v or {})) for label, v in values.items()]
            for axis, values in (spec.get("grid") or {}).items()]
    out, seen = [], set()
    for combo in itertools.product(*axes):
        settings, labels = dict(base), {}
        for axis, label, v in combo:
            settings.update(v)
            labels[axis] = label
        if any(all(labels.get(a) == str(v) for a, v in ex.items()) for ex in spec.get("exclude") or []):
            continue
        if settings.get("method") in NO_GOSSIP:
            topo = {k: v for k, v in settings.items() if k.startswith("topology.")}
            for k in topo:
                settings.pop(k)
        key = json.dumps(settings, sort_keys=True, default=str)
        if key in seen:  # e.g. local on ER and on the ring: the same run
            continue
        seen.add(key)
        out.append((labels, settings))
    return out


def tuning_runs(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The tuning runs of a protocol spec: every method x lr (x deca.betas for methods with a consensus
    correction) x tuning seed, in the spec's tuning cell (``tune.split``, default the first of each other axis)."""
    tune = spec.get("tune") or {}
    if not tune:
        return []
    runs = []
    for labels, settings in _cells(spec):
        if any(labels.get(a) != v for a, v in (tune.get("cell") or {}).items()):
            continue
        if any(labels.get(a) != first for a, first in _first_labels(spec).items()
               if a != "method" and a not in (tune.get("cell") or {})):
            continue
        consensus = settings.get("method") in ("deca", "trivial_bma")
        betas = tune.get("deca_betas") if consensus else None
        for lr in tune["lr"]:
            for b in (betas or [None]):
                for seed in tune["seeds"]:
                    hp = {"optim.lr": lr, **({"deca.betas": b} if b is not None else {})}
                    lab = {"method": labels["method"], "lr": _label(lr),
                           **({"betas": _label(b)} if b is not None else {}), "seed": str(seed)}
                    runs.append({"run_id": "tune__" + "__".join(f"{a}={v}" for a, v in lab.items()),
                                 "labels": lab, "settings": _seeded({**settings, **hp}, seed), "phase": "tune",
                                 "hparams": hp})
    return runs


def _first_labels(spec: dict[str, Any]) -> dict[str, str]:
    return {axis: str(next(iter(values))) for axis, values in (spec.get("grid") or {}).items()}


def choose_hparams(spec: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method label, the tuning configuration with the best mean ``tune.metric`` over the tuning seeds.

    Only complete configurations (every tuning seed finished) compete; a method without one is absent. Nothing
    here reads an evaluation seed's run.

    Returns:
        ``{method: {"hparams": {...}, "score": mean metric, "candidates": {config label: mean}}}``.
    """
    tune = spec["tune"]
    metric, sign = tune.get("metric", "consensus_test_loss"), (-1.0 if tune.get("maximize") else 1.0)
    runs = tuning_runs(spec)
    done = {r["run_id"]: r for r in records if r.get("phase") == "tune"}
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        key = (run["labels"]["method"], json.dumps(run["hparams"], sort_keys=True))
        groups.setdefault(key, []).append(run)
    out: dict[str, dict[str, Any]] = {}
    for (method, hp_key), group in groups.items():
        recs = [done.get(r["run_id"]) for r in group]
        if any(r is None or r.get(metric) is None or not math.isfinite(r[metric]) for r in recs):
            if all(r is not None for r in recs):  # finished but diverged: worst possible score
                score = math.inf
            else:
                continue
        else:
            score = sum(r[metric] for r in recs) / len(recs)
        entry = out.setdefault(method, {"hparams": None, "score": None, "candidates": {}})
        entry["candidates"][hp_key] = score if math.isfinite(score) else None
        # Lower sign*score is better; a diverged configuration (inf) never beats a finished one; ties keep the
        # first configuration of the grid.
        if entry["hparams"] is None or (math.isfinite(score) and (entry["score"] is None or
                                                                   sign * score < sign * entry["score"])):
            entry["hparams"] = json.loads(hp_key)
            entry["score"] = score if math.isfinite(score) else None
    return out


def eval_runs(spec: dict[str, Any], chosen: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The evaluation runs: every cell x evaluation seed, with its method's chosen hyperparameters (cells whose
    method has no complete tuning yet are left out)."""
    runs = []
    for labels, settings in _cells(spec):
        method = labels["method"]
        hp = (chosen.get(method) or {}).get("hparams")
        if spec.get("tune") and hp is None:
            continue
        hp_labels = {("lr" if k == "optim.lr" else "betas"): _label(v) for k, v in (hp or {}).items()}
        for seed in spec["eval_seeds"]:
            # The chosen hyperparameters are part of the run's name: a changed choice makes new runs.
            lab = {**labels, **hp_labels, "seed": str(seed)}
            runs.append({"run_id": "eval__" + "__".join(f"{a}={v}" for a, v in lab.items()), "labels": lab,
                         "settings": _seeded({**settings, **(hp or {})}, seed), "phase": "eval",
                         "hparams": hp or {}})
    return runs


def _records(path: Path) -> list[dict[str, Any]]:
    return load_results(str(path)) if path.exists() else []


def protocol_todo(name: str, out: Path, methods: list[str] | None = None
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Missing tuning runs and missing (currently runnable) evaluation runs of protocol grid ``name`` (only the
    method labels in ``methods`` when given)."""
    spec = yaml.safe_load((GRIDS_DIR / f"{name}.yaml").read_text())
    recs = _records(out / f"{name}.jsonl")
    done = {r["run_id"] for r in recs}
    tune_src = spec.get("tune_from")
    if tune_src:
        src_spec = yaml.safe_load((GRIDS_DIR / f"{tune_src}.yaml").read_text())
        if _flatten(src_spec.get("pretrain") or {}) != _flatten(spec.get("pretrain") or {}):
            # Hyperparameters tuned on one base say nothing about another (or about the random initialisation).
            raise SystemExit(f"grid {name}: tune_from: {tune_src} needs the same pretrain block as {tune_src}.yaml "
                             f"(copy it, or tune this grid itself with a tune block)")
        chosen = choose_hparams(src_spec, _records(out / f"{tune_src}.jsonl"))
        spec = {**spec, "tune": None}
        todo_tune = []
    else:
        chosen = choose_hparams(spec, recs) if spec.get("tune") else {}
        todo_tune = [r for r in tuning_runs(spec) if r["run_id"] not in done]
    todo_eval = [r for r in eval_runs(spec, chosen) if r["run_id"] not in done]
    if methods:
        todo_tune = [r for r in todo_tune if r["labels"]["method"] in methods]
        todo_eval = [r for r in todo_eval if r["labels"]["method"] in methods]
    return todo_tune, todo_eval


def pretrain_dir(spec: dict[str, Any], runs_dir: str) -> Path | None:
    """Where the pretrained base of a grid ``spec`` lives (None: the grid fine-tunes the embedded randomly
    initialised model). The directory is named by a hash of the ``pretrain`` settings alone, so changed settings make
    a new base and grids with the same ``pretrain`` block share one (a grid that takes its hyperparameters from a
    grid on a pretrained base, ``tune_from``, must fine-tune that same base; :func:`protocol_todo` checks)."""
    settings = _flatten(spec.get("pretrain") or {})
    if not settings:
        return None
    key = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return Path(runs_dir) / "pretrained" / f"pretrain_{key}"


def ensure_pretrained(name: str, spec: dict[str, Any], runs_dir: str, quiet: bool = True) -> Path | None:
    """The pretrained base of grid ``name``: ``<pretrain_dir>/consensus``, a Hugging Face model directory (with its
    tokenizer) that every run of the grid fine-tunes (``model.path``).

    A grid's ``pretrain`` block holds the recipe settings of one simulated run (any method; ``centralized`` for a
    plain pretraining) whose consensus model becomes the base. It runs once, the first time a run of the grid
    needs it; ``pretrain.json`` (its settings, evaluation and wall time) is written last, so a killed pretraining
    is started again instead of half-used. It is seeded like every run, so a regeneration from scratch makes the
    same base.
    """
    d = pretrain_dir(spec, runs_dir)
    if d is None:
        return None
    if (d / "pretrain.json").exists():
        return d / "consensus"
    from deca_ds.config import load_config
    from deca_ds.simulate import run_simulation

    if d.exists():
        import shutil

        shutil.rmtree(d)
    settings = _flatten(spec["pretrain"])
    cfg = load_config(None, _overrides({**settings, "output_dir": str(d), "backend": "simulate"}))
    print(f"{name}: pretraining the base model ({settings}) in {d}", file=sys.stderr)
    t0 = time.perf_counter()
    summary = run_simulation(cfg, save_models=True, quiet=quiet)
    record = {"settings": settings, "consensus": summary.get("consensus"), "seconds": time.perf_counter() - t0,
              "versions": package_versions()}
    tmp = d / "pretrain.json.tmp"
    tmp.write_text(json.dumps(record, indent=1, default=str))
    os.replace(tmp, d / "pretrain.json")
    return d / "consensus"


def _on_base(run: dict[str, Any], base: Path | None) -> dict[str, Any]:
    """``run`` fine-tuning the pretrained ``base`` (unchanged when there is none)."""
    return run if base is None else {**run, "settings": {**run["settings"], "model.path": str(base)}}


def cmd_protocol(args) -> int:
    """Tuning runs of every protocol grid, then the evaluation runs they unlock, then the summaries."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.grids or list(PROTOCOL_GRIDS)
    t0 = time.perf_counter()
    for phase in args.phases:
        tasks = []
        for name in names:
            todo_tune, todo_eval = protocol_todo(name, out, args.methods)
            todo = todo_tune if phase == "tune" else todo_eval
            print(f"{name}: {len(todo)} {phase} runs to run", file=sys.stderr)
            runs_dir = str(Path(args.runs_dir) / name)
            spec = yaml.safe_load((GRIDS_DIR / f"{name}.yaml").read_text())
            base = ensure_pretrained(name, spec, args.runs_dir) if todo else None
            tasks += [(_on_base(r, base), runs_dir, out / f"{name}.jsonl") for r in todo]
        # Seed-major order: every method of a seed finishes before the next seed starts, so a sweep stopped early
        # leaves complete per-seed pairs (stable sort: the grid's order within a seed).
        tasks.sort(key=lambda t: int(t[0]["labels"].get("seed", 0)))
        if args.limit:
            tasks = tasks[: args.limit]
        _run_pool(tasks, args.jobs)
    print(f"protocol: {time.perf_counter() - t0:.0f}s with {args.jobs} job(s)", file=sys.stderr)
    for name in names:
        if (out / f"{name}.jsonl").exists():
            print(summarize_protocol(name, str(out)))
    return 0


PROTOCOL_METRICS = [
    ("consensus_accuracy", "cons. acc", 3, 1.0),
    ("consensus_macro_f1", "cons. macro-F1", 3, 1.0),
    ("consensus_test_loss", "cons. test loss", 3, 1.0),
    ("client_accuracy_mean", "mean client acc", 3, 1.0),
    ("client_accuracy_worst", "worst client acc", 3, 1.0),
    ("client_test_loss_worst", "worst client loss", 3, 1.0),
    ("bytes_sent_per_client", "MiB sent/client", 1, 2.0 ** -20),
    ("optimizer_state_bytes", "opt. state KiB", 0, 2.0 ** -10),
    ("rms_h_over_g", "rms(h)/rms(g)", 3, 1.0),
    ("clipped_fraction", "clipped", 2, 1.0),
]


def protocol_tables(name: str, out_dir: str) -> dict[str, Any]:
    """Per cell (non-method labels), per method: the evaluation records, chosen hyperparameters and paired
    differences; cells with fewer than :data:`MIN_EVAL_SEEDS` evaluation seeds are listed as incomplete."""
    spec = yaml.safe_load((GRIDS_DIR / f"{name}.yaml").read_text())
    out = Path(out_dir)
    src = spec.get("tune_from") or name
    src_spec = yaml.safe_load((GRIDS_DIR / f"{src}.yaml").read_text())
    chosen = choose_hparams(src_spec, _records(out / f"{src}.jsonl")) if src_spec.get("tune") else {}
    # Only evaluation runs of the current choice count (a record made with an earlier choice is kept, unused).
    current = {r["run_id"] for r in eval_runs({**spec, "tune": src_spec.get("tune")}, chosen)}
    recs = [r for r in _records(out / f"{name}.jsonl") if r.get("phase") == "eval" and r["run_id"] in current]
    cells: dict[tuple, dict[str, list]] = {}
    for r in recs:
        key = tuple((a, v) for a, v in r["labels"].items() if a not in ("method", "seed", "lr", "betas"))
        cells.setdefault(key, {}).setdefault(r["labels"]["method"], []).append(r)
    return {"spec": spec, "cells": cells, "chosen": chosen}


def summarize_protocol(name: str, out_dir: str) -> Path:
    """``<out_dir>/<name>.md``: one table per cell (mean ± std over evaluation seeds, only methods with at least
    :data:`MIN_EVAL_SEEDS` seeds), the chosen hyperparameters, and the paired differences with 95 % intervals."""
    t = protocol_tables(name, out_dir)
    spec, cells, chosen = t["spec"], t["cells"], t["chosen"]
    lines = [f"<!-- generated by: python recipes/sweep.py protocol --grids {name} (summaries: "
             f"python recipes/sweep.py summarize-protocol {name}) -->", ""]
    if chosen:
        lines += ["Hyperparameters chosen on the tuning seeds (mean tuning metric in brackets):", ""]
        for m, c in chosen.items():
            if c["hparams"] is not None:
                score = "diverged" if c["score"] is None else f"{c['score']:.4g}"
                lines.append(f"- {m}: {json.dumps(c['hparams'])} ({score})")
        lines.append("")
    for key, methods in sorted(cells.items()):
        title = ", ".join(f"{a}={v}" for a, v in key) or "paper setting"
        lines += [f"### {title}", "", "| method | eval seeds | " + " | ".join(m[1] for m in PROTOCOL_METRICS) + " |",
                  "|---" * (len(PROTOCOL_METRICS) + 2) + "|"]
        incomplete = []
        for m, rs in methods.items():
            seeds = sorted(int(r["labels"]["seed"]) for r in rs)
            if len(seeds) < MIN_EVAL_SEEDS:
                incomplete.append(f"{m} ({len(seeds)} seeds)")
                continue
            cells_txt = [_fmt([r.get(k) for r in rs], d, sc) for k, _, d, sc in PROTOCOL_METRICS]
            lines.append(f"| {m} | {','.join(map(str, seeds))} | " + " | ".join(cells_txt) + " |")
        if incomplete:
            lines += ["", f"Not reported (fewer than {MIN_EVAL_SEEDS} evaluation seeds): {', '.join(incomplete)}."]
        pairs = spec.get("paired") or []
        # The paired columns: consensus accuracy, macro-F1 and test loss, unless the grid states its own
        # (``paired_metrics``: record keys, e.g. a grid written to test the clients' own models).
        metrics = spec.get("paired_metrics") or ["consensus_accuracy", "consensus_macro_f1", "consensus_test_loss"]
        names = {k: name for k, name, _, _ in PROTOCOL_METRICS}
        diff_lines = []
        for a, b in pairs:
            if a not in methods or b not in methods:
                continue
            ra = {r["labels"]["seed"]: r for r in methods[a]}
            rb = {r["labels"]["seed"]: r for r in methods[b]}
            common = sorted(set(ra) & set(rb), key=int)
            if len(common) < MIN_EVAL_SEEDS:
                continue
            cells_txt = []
            for k in metrics:
                m, lo, hi = paired_interval([ra[s][k] for s in common], [rb[s][k] for s in common])
                cells_txt.append(f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]")
            diff_lines.append(f"| {a} − {b} | {','.join(common)} | " + " | ".join(cells_txt) + " |")
        if diff_lines:
            lines += ["", "Paired per-seed differences, mean [95 % t-interval]:", "",
                      "| difference | eval seeds | " + " | ".join(names.get(k, k) for k in metrics) + " |",
                      "|---" * (len(metrics) + 2) + "|"]
            lines += diff_lines
        lines.append("")
    md = Path(out_dir) / f"{name}.md"
    md.write_text("\n".join(lines) + "\n")
    return md


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a grid YAML")
    r.add_argument("grid")
    r.add_argument("--results", required=True, help="JSONL file to append one line per run to")
    r.add_argument("--jobs", type=int, default=1, help="runs in parallel (one core each)")
    r.add_argument("--runs-dir", help="where each run's metrics.jsonl/summary.json go (default: next to results)")
    r.add_argument("--limit", type=int, default=0, help="run at most this many missing runs")
    a = sub.add_parser("all", help="run every grid behind docs/results.md (missing runs only), then summarize")
    a.add_argument("--jobs", type=int, default=2, help="runs in parallel (one core each)")
    a.add_argument("--out", default="docs/results", help="where the sweep_<grid>.jsonl/.md/.png files live")
    a.add_argument("--runs-dir", default="outputs/sweeps", help="per-run metrics.jsonl/summary.json")
    a.add_argument("--grids", nargs="*", choices=ALL_GRIDS, help=f"a subset of {', '.join(ALL_GRIDS)}")
    p = sub.add_parser("protocol", help="tuning seeds, then evaluation seeds, of the protocol grids (missing runs "
                                        "only), then their summaries")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (one core each)")
    p.add_argument("--out", default="docs/results", help="where <grid>.jsonl/.md live")
    p.add_argument("--runs-dir", default="outputs/sweeps", help="per-run metrics.jsonl/summary.json")
    p.add_argument("--grids", nargs="*", choices=PROTOCOL_GRIDS, help=f"a subset of {', '.join(PROTOCOL_GRIDS)}")
    p.add_argument("--limit", type=int, default=0, help="run at most this many missing runs per phase")
    p.add_argument("--methods", nargs="*", help="only these method labels (default: every method of the grids)")
    p.add_argument("--phases", nargs="+", choices=("tune", "eval"), default=["tune", "eval"],
                   help="run only these phases (e.g. --phases tune: the tuning runs, no evaluation run yet)")
    sp = sub.add_parser("summarize-protocol", help="the markdown tables of a protocol grid's results")
    sp.add_argument("grid", choices=PROTOCOL_GRIDS)
    sp.add_argument("--out", default="docs/results")
    s = sub.add_parser("summarize", help="markdown tables and PNG curves of a results file")
    s.add_argument("results")
    s.add_argument("--out", default="docs/results")
    s.add_argument("--list", action="store_true", help="only print the number of runs per setting")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "run":
            return cmd_run(args)
        if args.cmd == "all":
            return cmd_all(args)
    except GridError as e:
        print(f"sweep: error: {e}", file=sys.stderr)
        return 2
    if args.cmd == "protocol":
        return cmd_protocol(args)
    if args.cmd == "summarize-protocol":
        print(summarize_protocol(args.grid, args.out))
        return 0
    print(summarize(args.results, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

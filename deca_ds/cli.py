"""The ``deca-ds`` command: one entry point, one subcommand per task.

Subcommands live in :data:`SUBCOMMANDS`, a table of ``name -> (help, add_arguments, run)``; adding a command is one
entry there and two small functions, nothing else changes. Heavy imports (torch, transformers) happen inside the
``run`` functions so that ``deca-ds --help`` is instant.

``deca-ds run`` is the recipe ``recipes/finetune.py`` (which calls :func:`run_main`): the same arguments, the shipped
recipe configs by name (``--config default``), so a plain ``pip install`` trains without the repository. Several
processes: ``deepspeed --num_gpus 4 --module deca_ds run ...`` or ``torchrun --nproc_per_node 4 -m deca_ds run ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

FIRST_RUN_CLIENTS = 4
"""Clients of the first run on a machine without GPUs (one process, embedded model): see :func:`first_run_mode`."""

EMBEDDED_SCHEDULE = {"blocks.layers_per_block": 2, "blocks.switch_every": 24, "max_steps": 288}
"""The embedded default's schedule when no ``--config`` is given (a setting given on the command line wins; source
``embedded`` in ``--print-config``): 2 layers per block, R = 24, 288 steps (4 blocks: 3 rounds), whether its clients
are launched ranks or run in one process. With the library defaults (1 layer, R = 4, 192 steps; Adam then never
leaves its bias-correction warm-up) the embedded model's consensus did not learn the task in that budget: a 4-rank
launch reached test accuracy 0.529, with this schedule 0.764 (docs/reference.md). Until 3 Dec only the one-process
first run used it. A ``--config`` YAML (``recipes/configs/default.yaml`` writes this schedule out) or a model of one's
own keeps the library defaults of :class:`deca_ds.config.BlocksConfig` and ``max_steps``."""


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="directory with a Hugging Face config.json "
                   "(e.g. recipes/models/llama-3.1-8b); no weights are read")
    p.add_argument("--gpu-memory", default="24GiB", help="memory of one GPU, e.g. 24GiB, 80GB (default 24GiB)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--ranks-per-client", type=int, default=1)
    p.add_argument("--layers-per-block", type=int, default=None,
                   help="decoder layers per block (default: the recipe's, blocks.layers_per_block)")
    p.add_argument("--include-embeddings", action=argparse.BooleanOptionalAction, default=None,
                   help="train the embeddings as a block (default: the recipe's; frozen by the plan only if nothing "
                   "else fits)")
    p.add_argument("--include-lm-head", action=argparse.BooleanOptionalAction, default=None,
                   help="train the final norm and LM head as a block (default as --include-embeddings)")
    p.add_argument("--state-policy", choices=("reset", "offload"), default="offload")
    p.add_argument("--offload-dtype", choices=("fp32", "int8"), default="fp32")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--fused-backward", action=argparse.BooleanOptionalAction, default=None,
                   help="optim.fused_backward (default: off, turned on by the plan when it helps and the written "
                   "recipe allows it: one rank per client; it writes gradient_clipping 0)")
    p.add_argument("--moment-dtype", choices=("fp32", "int8"), default=None,
                   help="optim.moment_dtype (default: fp32, int8 tried by the plan as --fused-backward)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="weight dtype on the GPU")
    p.add_argument("--topology", default="ring", help="gossip graph, for the neighbour count (default ring)")
    p.add_argument("--max-degree", type=int, default=None, help="neighbours per client (random/custom graphs)")
    p.add_argument("--gossip-chunk-mb", type=float, default=64.0)
    p.add_argument("--overhead", default="1GiB", help="reserved for CUDA context/fragmentation (default 1GiB)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    p.add_argument("--write", metavar="DIR", help="write the recommended ds_config.json and recipe.yaml into DIR")
    p.add_argument("--force", action="store_true",
                   help="with --write: replace a ds_config.json / recipe.yaml already in DIR (kept by default)")


def _plan_sizes(args: argparse.Namespace) -> tuple[int, int]:
    """Check ``plan``'s numeric arguments and topology name; returns ``(gpu_memory, overhead)`` in bytes.

    The planner computes with whatever it is given: ``--clients 0`` wrote a recipe "for 0 GPUs", ``--seq-len 0`` or
    ``--micro-batch 0`` ended in "please report this planner bug", a misspelt ``--topology`` was reported as a graph
    without a fixed degree, and a NaN chunk size as a float conversion error.

    Raises:
        ValueError: the first bad argument, as one line naming the flag and the fix.
    """
    import math

    from deca_ds.bench.planner import parse_bytes
    from deca_ds.config import TOPOLOGIES

    for flag, value in (("--seq-len", args.seq_len), ("--micro-batch", args.micro_batch),
                        ("--clients", args.clients), ("--ranks-per-client", args.ranks_per_client)):
        if value < 1:
            raise ValueError(f"{flag} {value} is out of range: use an integer >= 1")
    if args.layers_per_block is not None and args.layers_per_block < 1:  # was the planner's "layers_per_block must
        raise ValueError(f"--layers-per-block {args.layers_per_block} is out of range: use an integer >= 1")  # be >= 1"
    if args.max_degree is not None and not 0 <= args.max_degree <= args.clients - 1:
        raise ValueError(f"--max-degree {args.max_degree} is out of range for {args.clients} clients: use 0 to "
                         f"{args.clients - 1}")
    if args.topology not in TOPOLOGIES:
        raise ValueError(f"--topology {args.topology!r} is not known: use one of {', '.join(TOPOLOGIES)}")
    if not (math.isfinite(args.gossip_chunk_mb) and args.gossip_chunk_mb > 0):
        raise ValueError(f"--gossip-chunk-mb {args.gossip_chunk_mb} is out of range: use MiB > 0, e.g. 64")
    sizes = []
    for flag, text in (("--gpu-memory", args.gpu_memory), ("--overhead", args.overhead)):
        try:
            sizes.append(parse_bytes(text))
        except ValueError as e:
            raise ValueError(f"{flag} {e}") from None
    if sizes[0] <= 0:
        raise ValueError(f"--gpu-memory {args.gpu_memory!r} is out of range: give the GPU's memory, e.g. 24GiB")
    if sizes[0] < 2**20:  # no accelerator has less than a MiB: a bare number was meant in GiB or GB
        raise ValueError(f"--gpu-memory {args.gpu_memory!r} is {sizes[0]} bytes: give a unit, e.g. "
                         f"{args.gpu_memory}GiB")
    return sizes[0], sizes[1]


def _run_plan(args: argparse.Namespace) -> int:
    from deca_ds.bench.planner import PlanRequest, format_plan, plan_from_model_dir, write_plan

    gpu_memory, overhead = _plan_sizes(args)
    req = PlanRequest(
        gpu_memory=gpu_memory, seq_len=args.seq_len, micro_batch=args.micro_batch,
        clients=args.clients, ranks_per_client=args.ranks_per_client, layers_per_block=args.layers_per_block,
        include_embeddings=args.include_embeddings, include_lm_head=args.include_lm_head,
        state_policy=args.state_policy, offload_dtype=args.offload_dtype,
        activation_checkpointing=args.activation_checkpointing, dtype=args.dtype, topology=args.topology,
        max_degree=args.max_degree, gossip_chunk_mb=args.gossip_chunk_mb, overhead=overhead,
        fused_backward=args.fused_backward, moment_dtype=args.moment_dtype,
    )
    plan = plan_from_model_dir(args.model, req)
    written = None
    if args.write:
        written = write_plan(plan, args.model, args.write, overwrite=args.force)
    if args.json:
        out = plan.to_dict()
        if written:
            out["written"] = list(written)
        print(json.dumps(out, indent=2))
    else:
        print(format_plan(plan))
        if written:
            print(f"wrote {written[0]} and {written[1]}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# run: the recipe


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """The recipe's arguments: ``--config``, dotted overrides, ``--deepspeed``, ``--print-config`` and what the
    launchers add."""
    parser.add_argument("--config", help="recipe YAML: a shipped name (default, gpu_bf16, per_client_files) or a path; "
                        "default: the embedded default")
    parser.add_argument("overrides", nargs="*", help="dotted key=value settings, e.g. optim.lr=1e-4")
    # --deepspeed as the HF Trainer spells it; listed explicitly so that argparse's prefix matching never finds it
    # ambiguous between the two spellings of --deepspeed_config.
    parser.add_argument("--deepspeed_config", "--deepspeed-config", "--deepspeed", dest="deepspeed_config",
                        metavar="JSON", help="DeepSpeed JSON (same as ds_config=PATH; Hugging Face \"auto\" values "
                        "are resolved as the HF Trainer resolves them)")
    parser.add_argument("--print-config", "--print_config", action="store_true",
                        help="print every setting with its value and source (default / yaml / override) and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")


def resolve_config_arg(name: str | None) -> str | None:
    """``--config``: a path, or the name of a shipped recipe config (``default``, ``gpu_bf16``, ``default.yaml``).

    Raises:
        ConfigError: neither a file nor a shipped config.
    """
    from deca_ds.config import ConfigError
    from deca_ds.ds_config import shipped_dir, shipped_path

    if name is None or Path(name).is_file():
        return name
    found = shipped_path(name, kind="configs")
    if found.is_file():
        return str(found)
    names = sorted(p.stem for p in shipped_dir("configs").glob("*.yaml"))
    raise ConfigError(f"--config {name!r} is neither a file nor a shipped config: give a recipe YAML path or one of "
                      f"{', '.join(names) or '(none shipped)'}")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def setting_sources(config_path: str | None, overrides: list[str]) -> dict[str, str]:
    """Where each explicitly given setting came from: ``{"optim.lr": "override", "max_steps": "yaml", ...}``.

    A key set in the YAML and again by an override is an ``override``; keys absent from both are defaults.
    """
    import yaml

    sources: dict[str, str] = {}
    if config_path is not None:
        with open(config_path) as f:
            data = yaml.safe_load(f) or {}
        if isinstance(data, dict):
            sources.update({k: "yaml" for k in _flatten(data)})
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        for k in [k for k in sources if k == key or k.startswith(key + ".")]:
            del sources[k]
        sources[key] = "override"
    return sources


def first_run_mode(cfg, sources: dict[str, str], world_size: int, device_type: str) -> bool:
    """Whether this start is the product's first run: one process, no GPU, the embedded model, nothing that asks for
    a single launcher client. It then runs :data:`FIRST_RUN_CLIENTS` clients in this process (``backend=simulate``).

    Why the simulator and not CPU ranks started from here: it computes exactly what a launch of that many ranks
    computes (tests/integration/test_simulate_parity.py), needs no process start-up (10-25 s per rank on 2 cores)
    and no gloo traffic, and ``deepspeed recipes/finetune.py`` on a machine without GPUs starts one process.

    Args:
        cfg: the loaded settings.
        sources: :func:`setting_sources` (an explicit ``backend`` or ``num_clients`` is left alone).
        world_size: launched ranks.
        device_type: the accelerator type.
    """
    return (world_size == 1 and device_type == "cpu" and cfg.backend == "launcher" and "backend" not in sources
            and cfg.num_clients is None and cfg.model.path is None and cfg.resume is False
            and cfg.checkpoint_every == 0)


def print_config(cfg, sources: dict[str, str], world_size: int, file=None) -> None:
    """Every setting with its value and source, then the DeepSpeed config as the run will use it.

    Sources: ``default``, ``yaml``, ``override``, ``first-run`` (see :func:`first_run_mode`), ``embedded``
    (:data:`EMBEDDED_SCHEDULE`), ``epochs``
    (``max_steps`` when ``epochs`` is set: derived from the clients' data at start); DeepSpeed keys:
    ``file`` (as written), ``auto`` (an HF ``"auto"`` value resolved by :func:`deca_ds.ds_config.resolve_auto`),
    ``filled`` (a batch key DeepSpeed derives, :func:`deca_ds.ds_config.check_batch_sizes`).
    """
    import copy

    from deca_ds.devices import accelerator_type
    from deca_ds.ds_config import check_ds_config, load_ds_config, resolve_auto

    file = file or sys.stdout
    rows = [(k, json.dumps(v), sources.get(k, "default")) for k, v in _flatten(cfg.to_dict()).items()]
    if cfg.epochs is not None:  # max_steps is derived from the data at start (deca_ds.lr_schedule.steps_for_epochs)
        rows = [(k, "derived", "epochs") if k == "max_steps" else (k, v, src) for k, v, src in rows]
    path = cfg.ds_config
    device = accelerator_type() if cfg.backend == "launcher" else "cpu" if cfg.simulate.device == "cpu" else \
        accelerator_type()
    ds_source = sources.get("ds_config", "default")
    raw = load_ds_config(path, device_type=device)
    written = _flatten(copy.deepcopy(raw))
    auto = resolve_auto(copy.deepcopy(raw), cfg, None)
    ds = copy.deepcopy(raw)
    check_ds_config(ds, cfg, world_size=world_size if cfg.backend == "launcher" else None)
    from deca_ds.ds_config import default_ds_config_path, shipped_path

    shown = shipped_path(path) if path is not None else default_ds_config_path(device)
    rows.append(("deepspeed:file", str(shown), ds_source))
    for k, v in _flatten(ds).items():
        src = "auto" if k in auto else "file" if k in written else "filled"
        rows.append((f"deepspeed:{k}", json.dumps(v), src))
    width = max(len(r[0]) for r in rows)
    vwidth = min(max(len(r[1]) for r in rows), 48)
    for key, value, src in rows:
        print(f"{key:<{width}}  {value:<{vwidth}}  {src}", file=file)


def _write_resolved_ds_config(out: Path) -> None:
    """``output_dir/ds_config.json``: the DeepSpeed config the run used, every ``"auto"`` resolved (from run.json)."""
    from deca_ds.checkpoint import read_run_legs
    from deca_ds.metrics import write_json_atomic

    legs = read_run_legs(out)
    if legs and legs[-1].get("ds_config") is not None:
        write_json_atomic(out / "ds_config.json", legs[-1]["ds_config"])


def run_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """The fine-tuning recipe: ``recipes/finetune.py`` and ``deca-ds run``.

    Args:
        argv: arguments without the program name (default ``sys.argv[1:]``).
        prog: program name for usage messages.

    Returns:
        0 on success, 2 for a settings error (one line on stderr, nothing written), 3 when a client produced a
        non-finite loss or gradient with ``nan_policy=stop``, 4 for a fault after start-up (a neighbour, a
        collective, a disk: one line naming cause and fix, :func:`deca_ds.errors.describe_fault`).
    """
    parser = argparse.ArgumentParser(prog=prog, description="Decentralized full-parameter fine-tuning with DECA")
    add_run_args(parser)
    args = parser.parse_args(argv)
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    from deca_ds.config import ConfigError, load_config
    from deca_ds.errors import EXIT_CONFIG, EXIT_FAULT, EXIT_NONFINITE, describe_fault
    from deca_ds.loop import NonFiniteError

    try:
        config_path = resolve_config_arg(args.config)
        cfg = load_config(config_path, args.overrides)
        sources = setting_sources(config_path, args.overrides)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        from deca_ds.devices import accelerator_type

        first = first_run_mode(cfg, sources, world_size, accelerator_type())
        overlay: dict[str, str] = {}  # setting -> its source
        if first:
            overlay.update({"backend=simulate": "first-run", f"num_clients={FIRST_RUN_CLIENTS}": "first-run"})
        if config_path is None and cfg.model.path is None:
            overlay.update({f"{k}={v}": "embedded" for k, v in EMBEDDED_SCHEDULE.items()
                            if k not in sources and not (k == "max_steps" and cfg.epochs is not None)})
        if overlay:
            cfg = load_config(config_path, list(overlay) + list(args.overrides))
            sources.update({setting.split("=")[0]: source for setting, source in overlay.items()})
        if args.deepspeed_config:  # the same as ds_config=PATH
            cfg.ds_config = args.deepspeed_config
            sources["ds_config"] = "--deepspeed"
        if args.print_config:
            print_config(cfg, sources, world_size)
            return 0
        if first:
            _announce_first_run(cfg)
        if cfg.backend == "simulate":  # every client in this one process (deca_ds.simulate)
            from deca_ds.simulate import run_simulation

            run_simulation(cfg)
        else:
            from deca_ds.trainer import run

            run(cfg)
        if int(os.environ.get("RANK", "0")) == 0:
            _write_resolved_ds_config(Path(cfg.output_dir))
            if first:
                _announce_outputs(cfg)
    except ConfigError as e:
        print(f"deca_ds: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except NonFiniteError as e:
        print(f"deca_ds: stopped: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except Exception as e:  # a fault only start-up could not rule out: one line on every rank; a bug keeps its traceback
        line = describe_fault(e)
        if line is None:
            raise
        print(f"deca_ds: error: {line}", file=sys.stderr)
        return EXIT_FAULT
    return 0


def _announce_first_run(cfg) -> None:
    """Say what the first run does, before it starts (stderr, like the progress bar)."""
    d, b = cfg.data, cfg.blocks
    split = {"dirichlet": f"a Dirichlet(alpha={d.alpha:g}) split by label (each client sees mostly a few labels)",
             "iid": "an IID split", "shards": f"{d.shards_per_client} label shards per client",
             "natural": f"the {d.partition_by!r} field"}[d.partition]
    task = f"synthetic {d.task} ({d.num_examples} rows, {d.num_labels} labels)" if d.path is None else d.path
    from deca_ds.consensus import method_spec

    # With epochs the step count comes from the clients' rows once the data is built; max_steps is unused then.
    length = (f"{cfg.epochs:g} epoch(s) (the step count follows from the clients' rows)" if cfg.epochs is not None
              else f"{cfg.max_steps} steps")
    gossip = (f"after every step each client averages that block with its neighbours on a {cfg.topology.name} graph"
              if method_spec(cfg.method).gossip else "the clients never communicate (method=" + cfg.method + ")")
    print(f"deca_ds: no GPU and one process: running {cfg.num_clients} clients in this process (backend=simulate, "
          f"the numbers a launch of {cfg.num_clients} ranks computes). For one client per process launch "
          f"`deepspeed --num_gpus {cfg.num_clients} recipes/finetune.py`; backend=launcher keeps a single client.\n"
          f"deca_ds: each client trains the embedded tiny Llama on its own part of a {task}: {split}; method "
          f"{cfg.method}, {length}, one block of {b.layers_per_block} layer(s) trained at a time (switch "
          f"every {b.switch_every} steps); "
          f"{gossip}; no server, no data leaves a client.", file=sys.stderr)


def _announce_outputs(cfg) -> None:
    out = Path(cfg.output_dir)
    print(f"deca_ds: wrote {out}/metrics.jsonl, {out}/training.png (loss and consensus distance per client), "
          f"{out}/partition.json and .png (training rows per client and label), {out}/summary.json and the "
          f"consensus model {out}/consensus (AutoModelForCausalLM.from_pretrained)", file=sys.stderr)


def _add_bench_args(p: argparse.ArgumentParser) -> None:
    from deca_ds.bench.benchmark import add_arguments

    add_arguments(p)


def _run_bench(args: argparse.Namespace) -> int:
    from deca_ds.bench.benchmark import main_from_args

    return main_from_args(args)


SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "run": ("fine-tune: the recipe (recipes/finetune.py) with the shipped configs by name, e.g. --config default",
            add_run_args, _run),
    "plan": ("what fits on one GPU per client; writes a ds_config and recipe", _add_plan_args, _run_plan),
    "bench": ("memory and throughput of deca_ds against full Adam, each method in a fresh process",
              _add_bench_args, _run_bench),
}
"""``name -> (help, add_arguments(parser), run(args) -> exit code)``."""


def build_parser() -> argparse.ArgumentParser:
    """The ``deca-ds`` argument parser with every subcommand of :data:`SUBCOMMANDS`."""
    parser = argparse.ArgumentParser(prog="deca-ds", description="decentralized block-wise Adam fine-tuning")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_args, run) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(_run=run)
    return parser


def launcher_args_after_command(argv: list[str]) -> list[str]:
    """Move a launcher's ``--local_rank`` from before the subcommand to after it.

    ``deepspeed --module deca_ds run ...`` starts every rank as ``python -m deca_ds --local_rank=N run ...``: the
    launcher puts its flag first, where the top-level parser has no such option, while ``run`` accepts it
    (:func:`add_run_args`). Any other argument is left in place.

    Args:
        argv: Arguments without the program name.

    Returns:
        The same arguments with leading ``--local_rank=N`` / ``--local_rank N`` (or ``--local-rank``) items moved
        to just after the subcommand name.
    """
    moved: list[str] = []
    rest = list(argv)
    while rest and rest[0].split("=", 1)[0] in ("--local_rank", "--local-rank"):
        flag = rest.pop(0)
        moved.append(flag)
        if "=" not in flag and rest:
            moved.append(rest.pop(0))
    if not moved or not rest:
        return list(argv)
    return rest[:1] + moved + rest[1:]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``deca-ds`` console script.

    Args:
        argv: Arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        Process exit code: 0 on success, 2 on a usage error the user can fix (message on stderr).
    """
    args = build_parser().parse_args(launcher_args_after_command(sys.argv[1:] if argv is None else list(argv)))
    try:
        return args._run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"deca-ds {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

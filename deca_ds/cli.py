"""The ``deca-ds`` command: one entry point, one subcommand per task.

Subcommands live in :data:`SUBCOMMANDS`, a table of ``name -> (help, add_arguments, run)``; adding a command is one
entry there and two small functions, nothing else changes. Heavy imports (torch, transformers) happen inside the
``run`` functions so that ``deca-ds --help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable


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
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="weight dtype on the GPU")
    p.add_argument("--topology", default="ring", help="gossip graph, for the neighbour count (default ring)")
    p.add_argument("--max-degree", type=int, default=None, help="neighbours per client (random/custom graphs)")
    p.add_argument("--gossip-chunk-mb", type=float, default=64.0)
    p.add_argument("--overhead", default="1GiB", help="reserved for CUDA context/fragmentation (default 1GiB)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    p.add_argument("--write", metavar="DIR", help="write the recommended ds_config.json and recipe.yaml into DIR")


def _run_plan(args: argparse.Namespace) -> int:
    from deca_ds.bench.planner import PlanRequest, format_plan, parse_bytes, plan_from_model_dir, write_plan

    req = PlanRequest(
        gpu_memory=parse_bytes(args.gpu_memory), seq_len=args.seq_len, micro_batch=args.micro_batch,
        clients=args.clients, ranks_per_client=args.ranks_per_client, layers_per_block=args.layers_per_block,
        include_embeddings=args.include_embeddings, include_lm_head=args.include_lm_head,
        state_policy=args.state_policy, offload_dtype=args.offload_dtype,
        activation_checkpointing=args.activation_checkpointing, dtype=args.dtype, topology=args.topology,
        max_degree=args.max_degree, gossip_chunk_mb=args.gossip_chunk_mb, overhead=parse_bytes(args.overhead),
    )
    plan = plan_from_model_dir(args.model, req)
    written = None
    if args.write:
        written = write_plan(plan, args.model, args.write)
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


def _add_bench_args(p: argparse.ArgumentParser) -> None:
    from deca_ds.bench.benchmark import add_arguments

    add_arguments(p)


def _run_bench(args: argparse.Namespace) -> int:
    from deca_ds.bench.benchmark import main_from_args

    return main_from_args(args)


SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``deca-ds`` console script.

    Args:
        argv: Arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        Process exit code: 0 on success, 2 on a usage error the user can fix (message on stderr).
    """
    args = build_parser().parse_args(argv)
    try:
        return args._run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"deca-ds {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Decentralized full-parameter fine-tuning with DECA on DeepSpeed: one client per rank (or per group of ranks).

    deepspeed recipes/finetune.py                                   # embedded default, one client per GPU
    deepspeed --num_gpus 4 recipes/finetune.py                      # four clients (CPU-only machines too)
    deepspeed recipes/finetune.py --config recipes/configs/X.yaml optim.lr=1e-4 topology.name=exponential
    torchrun --nproc_per_node 4 recipes/finetune.py --config recipes/configs/default.yaml

The recipe only wires things together; everything else lives in deca_ds (config -> trainer.run).
"""

import argparse
import os
import sys

# One BLAS thread per rank unless the user chose otherwise: several ranks share a machine's cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv=None):
    """Recipe arguments: ``--config``, dotted overrides, and what the launchers add."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="recipe YAML (see recipes/configs/); default: the embedded default")
    parser.add_argument("overrides", nargs="*", help="dotted key=value settings, e.g. optim.lr=1e-4")
    parser.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                        help="DeepSpeed JSON (same as ds_config=PATH)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from deca_ds.config import ConfigError, load_config
    from deca_ds.errors import EXIT_CONFIG, EXIT_FAULT, EXIT_NONFINITE, describe_fault
    from deca_ds.loop import NonFiniteError
    from deca_ds.trainer import run

    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.backend == "simulate":  # every client in this one process (deca_ds.simulate)
            from deca_ds.simulate import run_simulation

            run_simulation(cfg)
        else:
            run(cfg, ds_config_path=args.deepspeed_config)
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


if __name__ == "__main__":
    sys.exit(main())

"""Decentralized full-parameter fine-tuning with DECA on DeepSpeed: one client per rank (or per group of ranks).

    deepspeed recipes/finetune.py                                   # one client per GPU; no GPU: 4 clients in-process
    deepspeed --num_gpus 4 recipes/finetune.py                      # four clients (CPU-only machines too)
    deepspeed recipes/finetune.py --config recipes/configs/X.yaml optim.lr=1e-4 topology.name=exponential
    deepspeed recipes/finetune.py --deepspeed ds_configs/hf_auto.json --print-config
    torchrun --nproc_per_node 4 recipes/finetune.py --config default

The recipe only wires things together: arguments -> settings -> deca_ds.trainer.run (or deca_ds.simulate with every
client in one process); ``deca-ds run`` is the same recipe (deca_ds.cli.run_main).
"""

import os
import sys

# One BLAS thread per rank unless the user chose otherwise: several ranks share a machine's cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv=None) -> int:
    from deca_ds.cli import run_main

    return run_main(argv, prog="recipes/finetune.py")


if __name__ == "__main__":
    sys.exit(main())

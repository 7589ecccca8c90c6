"""Shared pieces of the tests that launch ``recipes/finetune.py`` for real (torchrun / deepspeed on CPU)."""

import os
from pathlib import Path

from dist import free_port  # noqa: F401  (re-exported: one port picker for every launching test)

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "finetune.py")
# Small but real: a few switches per block, enough rows that every client has data.
# One layer per block, as the library default (recipes/finetune.py without --config gives the embedded model its own
# schedule, deca_ds.cli.EMBEDDED_SCHEDULE, 2 layers per block, which a test comparing a launch with load_config(None)
# would otherwise not share).
FAST = ["data.num_examples=600", "data.eval_examples=16", "blocks.switch_every=2", "blocks.layers_per_block=1"]


def launch_env() -> dict:
    """The environment of a launched run: CPU accelerator, one thread per rank, nothing from the network."""
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")

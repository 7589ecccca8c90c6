"""deca_ds: decentralized full-parameter fine-tuning of LLMs with block-wise Adam (DECA) on DeepSpeed.

Public names are imported lazily so that ``import deca_ds`` stays cheap (no deepspeed, no transformers) and needs
neither a GPU nor the network.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "partition_blocks": "deca_ds.blocks",
    "print_partition": "deca_ds.blocks",
    "Block": "deca_ds.blocks",
    "BlockPartition": "deca_ds.blocks",
    "BlockSchedule": "deca_ds.blocks",
    "BlockAdam": "deca_ds.optim",
    "BlockOptimizer": "deca_ds.optim",
    "memory_report": "deca_ds.optim",
    "make_topology": "deca_ds.topology",
    "Topology": "deca_ds.topology",
    "load_config": "deca_ds.config",
    "RunConfig": "deca_ds.config",
    "ConfigError": "deca_ds.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'deca_ds' has no attribute {name!r}")

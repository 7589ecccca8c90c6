"""Non-IID data for deca_ds: partitioners, users' files, synthetic tasks, byte tokenizer and evaluation.

Importing this package is cheap; the modules import ``datasets``/``transformers``/``matplotlib`` where they need
them. The engine uses :func:`check_data_config`, :func:`build_client_data`, :func:`batch_for_step`,
:func:`write_partition_summary` and :func:`evaluate`; researchers use the partitioners directly.
"""

import importlib

_EXPORTS = {
    "Partitioner": "partition",
    "IidPartitioner": "partition",
    "DirichletPartitioner": "partition",
    "ShardPartitioner": "partition",
    "NaturalPartitioner": "partition",
    "label_entropy": "partition",
    "BYTE_VOCAB_SIZE": "tokenizer",
    "make_byte_tokenizer": "tokenizer",
    "make_synthetic_rows": "synthetic",
    "make_classification_rows": "synthetic",
    "make_generation_rows": "synthetic",
    "IGNORE_INDEX": "formatting",
    "detect_format": "formatting",
    "render_example": "formatting",
    "tokenize_example": "formatting",
    "pack_examples": "formatting",
    "ClientData": "loading",
    "build_client_data": "loading",
    "batch_for_step": "loading",
    "check_data_config": "loading",
    "load_rows": "loading",
    "make_partitioner": "loading",
    "collate": "loading",
    "evaluate": "evaluation",
    "classification_metrics": "evaluation",
    "write_partition_summary": "summary",
    "merge_client_counts": "summary",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"deca_ds.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'deca_ds.data' has no attribute {name!r}")

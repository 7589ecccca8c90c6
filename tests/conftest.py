"""Shared test settings: CPU accelerator, one thread per process, no GPU needed unless marked ``gpu``."""

import os

# Set before torch/deepspeed are imported anywhere in the test session (child processes inherit them).
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def tok():
    """The embedded byte tokenizer (no files, no network), shared by the data tests."""
    from deca_ds.data import make_byte_tokenizer

    return make_byte_tokenizer()

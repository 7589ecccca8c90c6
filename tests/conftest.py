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


@pytest.fixture(autouse=True)
def _restore_environ():
    """Every test leaves ``os.environ`` as it found it. transformers 4.x's ``TrainingArguments`` writes
    ``ACCELERATE_MIXED_PRECISION`` (``bf16``/``fp16`` from its flags) into ``os.environ`` (5.x no longer does): a unit
    test that built ``TrainingArguments(bf16=True)`` passed it on to every later launched run (``launch_env`` copies
    ``os.environ``), whose Trainer then ran under bf16 autocast although its own flags said fp32, so the Trainer runs
    no longer equalled recipes/finetune.py (seen with 4.56.2 when tests/unit/test_hf*.py ran before the integration
    tests in one session)."""
    before = dict(os.environ)
    yield
    if dict(os.environ) != before:
        os.environ.clear()
        os.environ.update(before)


@pytest.fixture(scope="module")
def tok():
    """The embedded byte tokenizer (no files, no network), shared by the data tests."""
    from deca_ds.data import make_byte_tokenizer

    return make_byte_tokenizer()

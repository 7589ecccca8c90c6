"""The optional libraries deca_ds imports itself (bitsandbytes, peft), imported without reaching the network.

Hazard this module exists for: bitsandbytes >= 0.48, when imported on a CPU with AVX512-BF16 (most current x86
servers) and with the ``kernels`` package installed (a dependency of transformers >= 5), asks the Hugging Face Hub
at import time for a 4-bit matmul kernel (``kernels-community/quantization-bitsandbytes``:
``get_organization_overview`` to check the publisher, then a download of the kernel's code, which it loads). peft
imports bitsandbytes, so ``method=dec_lora`` does too. deca_ds never runs that kernel (it uses bitsandbytes'
blockwise 8-bit quantization of optimizer state, not 4-bit matmuls), and a run at a site whose data may not leave
it must not fetch code from the internet, or wait on a network that drops packets, on every process start. Offline
the lookup fails and bitsandbytes logs ``Failed to load CPU gemm_4bit_forward from kernels-community: ...`` on every
process, a warning about a kernel nothing here uses.

:func:`bitsandbytes_functional` and :func:`import_peft` import those libraries with ``kernels`` hidden from them,
which is bitsandbytes' own fallback when ``kernels`` is not installed (its CPU code path), and without that
warning. A library already imported (a user's script imported transformers' Trainer, which imports peft) is used
as it is: its import has happened, and cannot be undone here; ``HF_HUB_OFFLINE=1`` keeps such a script off the
network.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
from types import ModuleType

__all__ = ["bitsandbytes_functional", "import_peft", "kernels_hidden"]

_BNB_KERNEL_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_KERNEL_WARNING = "Failed to load CPU gemm_4bit_forward"
_ABSENT = object()


class _DropKernelWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_BNB_KERNEL_WARNING)


@contextlib.contextmanager
def kernels_hidden():
    """Within the block, ``import kernels`` fails as if the package were not installed, and bitsandbytes' warning
    about the Hub kernel it then cannot load is dropped; both are restored on exit.

    Hazard: a module imported for the first time inside the block sees no ``kernels`` for good (transformers caches
    such probes), so import only bitsandbytes or peft inside it, after transformers' modelling code (see
    :func:`import_peft`). Not thread-safe: another thread importing ``kernels`` meanwhile would fail; deca_ds calls
    it from its preflight, before any thread of its own starts.
    """
    saved = sys.modules.get("kernels", _ABSENT)
    sys.modules["kernels"] = None  # type: ignore[assignment]  # `from kernels import x` now raises ImportError
    log = logging.getLogger(_BNB_KERNEL_LOGGER)
    drop = _DropKernelWarning()
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)
        if saved is _ABSENT:
            sys.modules.pop("kernels", None)
        else:
            sys.modules["kernels"] = saved  # type: ignore[assignment]


def bitsandbytes_functional() -> ModuleType:
    """``bitsandbytes.functional``, imported without bitsandbytes' import-time Hub lookup (see the module's notes).

    Returns:
        The module (already imported: returned as it is).

    Raises:
        ImportError: bitsandbytes is not installed; other exceptions of a broken install propagate unchanged.
    """
    module = sys.modules.get("bitsandbytes.functional")
    if module is None:  # not imported yet (or blocked with None, which import_module turns into ImportError)
        with kernels_hidden():
            module = importlib.import_module("bitsandbytes.functional")
    return module


def import_peft() -> ModuleType:
    """``peft``, imported without the Hub lookup of the bitsandbytes it imports (see the module's notes).

    transformers' modelling code, which peft imports and which probes for ``kernels`` itself, is imported first,
    outside :func:`kernels_hidden`, so that transformers' own use of ``kernels`` is unchanged.

    Returns:
        The module (already imported: returned as it is).

    Raises:
        ImportError: peft is not installed.
    """
    module = sys.modules.get("peft")
    if module is None:  # not imported yet (or blocked with None, which import_module turns into ImportError)
        importlib.import_module("transformers.modeling_utils")
        with kernels_hidden():
            module = importlib.import_module("peft")
    return module

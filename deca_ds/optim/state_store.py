"""Host-memory storage of inactive blocks' optimizer state (``state_policy="offload"``).

Block-wise Adam holds an fp32 master and Adam moments for the active block only. With ``offload`` the inactive
blocks' state is not dropped but parked here, in CPU memory, and handed back when the block becomes active again, so
a block's moments continue across visits. On an accelerator the host copies are pinned and the copy back can start
ahead of need on a side stream (:meth:`BlockStateStore.prefetch`).

8-bit storage (``offload_dtype="int8"``) uses bitsandbytes' blockwise dynamic quantization (it runs on CPU too; an
optional dependency, ``pip install 'deca_ds[int8]'``, checked by :func:`check_offload_support`):

* ``exp_avg`` (signed) is stored with the signed dynamic map;
* ``exp_avg_sq`` is non-negative and spans many orders of magnitude, so its square root ``s = sqrt(v)`` is stored
  with the unsigned dynamic map: halving the dynamic range of the stored value keeps far more relative precision for
  the small entries that dominate Adam's denominator.
* ``master`` and ``step`` stay exact (fp32): quantizing weights would destroy them.
* moments already held in 8 bits (``BlockAdam(moment_dtype="int8")``: keys ``exp_avg_codes``/``exp_avg_absmax`` and
  ``exp_avg_sq_codes``/``exp_avg_sq_absmax``, in this module's format) are stored as they are, with either
  ``offload_dtype``: quantizing them again would only add error.

Error bound (per block of :data:`QUANT_BLOCKSIZE` consecutive values with absolute maximum ``a``): each value is
stored as one of the two code-map entries bracketing it, so ``|m' - m| <= gap_signed * a_m`` and
``|s' - s| <= gap_unsigned * a_s``, hence ``|v' - v| <= e (2 s + e)`` with ``e = gap_unsigned * a_s``, where
``gap_*`` is the largest distance between adjacent entries of the code map (:func:`quantization_bound`: 0.0141
signed, 0.0070 unsigned, i.e. 1.41 % resp. 0.70 % of the block's absolute maximum), plus fp32 rounding. bitsandbytes'
CPU kernel rounds to (almost exactly) the nearest entry: the measured worst case is half that, 0.705 % resp. 0.353 %
over 512k Gaussian and log-normal values.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterator

import torch

from deca_ds.config import ConfigError
from deca_ds.optional import bitsandbytes_functional

OFFLOAD_DTYPES = ("fp32", "int8")
QUANT_BLOCKSIZE = 256
"""Values per quantization block; absmax overhead is 4 bytes per 256 values (1.6 %)."""

_QUANTIZED_KEYS = ("exp_avg", "exp_avg_sq")


@dataclass
class Quantized:
    """An 8-bit blockwise-quantized fp32 tensor (``sqrt``: the stored value is the square root of the tensor)."""

    codes: torch.Tensor
    absmax: torch.Tensor
    sqrt: bool

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The tensors holding memory."""
        return self.codes, self.absmax


def check_offload_support(offload_dtype: str, setting: str = "optim.offload_dtype") -> None:
    """Fail with one line when ``offload_dtype`` needs a library that is missing (``int8``: bitsandbytes).

    Cheap enough for a preflight check (imports bitsandbytes once); :class:`BlockStateStore` and
    ``BlockAdam(moment_dtype="int8")`` also call it.

    Args:
        offload_dtype: the value of ``setting`` (``fp32`` or ``int8``).
        setting: the setting named in the error: ``optim.offload_dtype`` or ``optim.moment_dtype``.

    Raises:
        ConfigError: ``int8`` without an importable bitsandbytes, naming the setting and the fix.
    """
    if offload_dtype != "int8":
        return
    fix = f"install it with pip install 'deca_ds[int8]' (or 'bitsandbytes>=0.43'), or set {setting}=fp32"
    try:
        bitsandbytes_functional()
    except ImportError:
        raise ConfigError(f"{setting}=int8 needs bitsandbytes, which is not installed: {fix}") from None
    except Exception as e:  # a broken install (missing native library, CUDA mismatch) raises other types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(f"{setting}=int8 needs bitsandbytes, which fails to import "
                          f"({type(e).__name__}: {first}): re{fix}") from None


def check_int8_support(optim) -> None:
    """Preflight of a run's 8-bit settings: :func:`check_offload_support` for ``optim.offload_dtype`` (when
    ``optim.state_policy=offload`` parks state) and for ``optim.moment_dtype``.

    Args:
        optim: the run's :class:`deca_ds.config.OptimConfig`.

    Raises:
        ConfigError: an ``int8`` setting without an importable bitsandbytes, naming the setting and the fix.
    """
    if optim.state_policy == "offload":
        check_offload_support(optim.offload_dtype)
    check_offload_support(optim.moment_dtype, setting="optim.moment_dtype")


@functools.lru_cache(maxsize=None)
def _code_map(signed: bool, device: torch.device) -> torch.Tensor:
    # Cached: building the map takes tens of ms of Python, and the active block's 8-bit moments (BlockAdam
    # moment_dtype="int8") need it four times per tensor per step. Read-only for bitsandbytes' kernels.
    return bitsandbytes_functional().create_dynamic_map(signed=signed).to(device)


def quantization_bound() -> tuple[float, float]:
    """Guaranteed bound on the 8-bit error, as a fraction of the block's absolute maximum: (signed, unsigned) map.

    It is the largest gap between adjacent code-map entries (a value is stored as one of the two entries around it).
    """
    out = []
    for signed in (True, False):
        code = _code_map(signed, torch.device("cpu")).sort().values
        out.append(float(code.diff().max()))
    return out[0], out[1]


def quantize(t: torch.Tensor, sqrt: bool) -> Quantized:
    """Quantize an fp32 tensor to 8 bits on its own device (``sqrt``: store ``sqrt(t)``, for ``t >= 0``)."""
    src = t.float().sqrt() if sqrt else t.float()
    codes, qstate = bitsandbytes_functional().quantize_blockwise(src.contiguous(), code=_code_map(not sqrt, t.device),
                                                                 blocksize=QUANT_BLOCKSIZE)
    return Quantized(codes, qstate.absmax, sqrt)


def dequantize(q: Quantized, shape: torch.Size) -> torch.Tensor:
    """The fp32 tensor a :class:`Quantized` stands for, on the device of its codes."""
    out = bitsandbytes_functional().dequantize_blockwise(q.codes, absmax=q.absmax,
                                                         code=_code_map(not q.sqrt, q.codes.device),
                                                         blocksize=QUANT_BLOCKSIZE).float().reshape(shape)
    return out.square_() if q.sqrt else out


def _to_host(t: torch.Tensor, buffer: torch.Tensor | None) -> torch.Tensor:
    """Copy ``t`` to CPU memory (pinned when it comes from an accelerator), reusing ``buffer`` when it fits."""
    if t.device.type == "cpu":
        return t
    if buffer is not None and buffer.shape == t.shape and buffer.dtype == t.dtype:
        buffer.copy_(t)  # blocking device->host copy: the source may be freed right after
        return buffer
    return t.to("cpu").pin_memory()


class BlockStateStore:
    """Per-block optimizer state parked in host memory, keyed by block index and parameter name.

    Args:
        offload_dtype: ``"fp32"`` (exact) or ``"int8"`` (moments quantized, see the module docstring).

    Raises:
        ValueError: unknown ``offload_dtype``.
    """

    def __init__(self, offload_dtype: str = "fp32"):
        if offload_dtype not in OFFLOAD_DTYPES:
            raise ValueError(f"unknown offload_dtype {offload_dtype!r}; choose one of {OFFLOAD_DTYPES}")
        check_offload_support(offload_dtype)
        self.offload_dtype = offload_dtype
        # block -> name -> key -> Tensor | Quantized (host memory)
        self._blocks: dict[int, dict[str, dict[str, object]]] = {}
        # block -> (name -> key -> device Tensor | Quantized, event) for copies started by prefetch
        self._pending: dict[int, tuple[dict, object]] = {}
        self._shapes: dict[str, torch.Size] = {}
        self._streams: dict[torch.device, object] = {}
        # block -> name -> key -> pinned host tensor, kept after take() for reuse by the next put()
        self._buffers: dict[int, dict[str, dict[str, torch.Tensor]]] = {}

    def __contains__(self, block_idx: int) -> bool:
        return block_idx in self._blocks

    def blocks(self) -> list[int]:
        """Indices of the blocks whose state is stored."""
        return sorted(self._blocks)

    def put(self, block_idx: int, states: dict[str, dict[str, torch.Tensor]]) -> None:
        """Store one block's state (``name -> {"step", "exp_avg", "exp_avg_sq", ["master"]}``, or with 8-bit
        moments ``exp_avg_codes``, ``exp_avg_absmax``, ``exp_avg_sq_codes``, ``exp_avg_sq_absmax`` in place of the
        two moments).

        The tensors are copied to host memory when they live on an accelerator; on CPU they are kept as they are (no
        copy). Only fp32 ``exp_avg``/``exp_avg_sq`` are quantized (``offload_dtype="int8"``); 8-bit moments are kept
        as given. The caller must drop its own references afterwards.
        """
        self._pending.pop(block_idx, None)
        old = self._buffers.pop(block_idx, None) or self._blocks.get(block_idx, {})
        stored: dict[str, dict[str, object]] = {}
        for name, st in states.items():
            # Moments held in 8 bits already (BlockAdam moment_dtype=int8) have codes shaped like the parameter.
            self._shapes[name] = (st["exp_avg"] if "exp_avg" in st else st["exp_avg_codes"]).shape
            entry: dict[str, object] = {}
            for key, t in st.items():
                if self.offload_dtype == "int8" and key in _QUANTIZED_KEYS:
                    # Quantize where the tensor lives (GPU kernels when on GPU), then move the 8-bit codes.
                    q = quantize(t, sqrt=(key == "exp_avg_sq"))
                    entry[key] = Quantized(_to_host(q.codes, None), _to_host(q.absmax, None), q.sqrt)
                else:
                    buf = old.get(name, {}).get(key)
                    entry[key] = _to_host(t.detach(), buf if isinstance(buf, torch.Tensor) else None)
            stored[name] = entry
        self._blocks[block_idx] = stored

    def prefetch(self, block_idx: int, device: torch.device) -> None:
        """Start copying a stored block's state to ``device`` on a side stream (no-op on CPU or if absent)."""
        device = torch.device(device)
        if device.type == "cpu" or block_idx not in self._blocks or block_idx in self._pending:
            return
        mod = torch.get_device_module(device)
        stream = self._streams.setdefault(device, mod.Stream(device))
        # Hazard: the side stream must not read host buffers before pending writes to them are done; put() copies
        # synchronously, so they are complete here.
        with mod.stream(stream):
            moved = {name: {key: _move(v, device, non_blocking=True) for key, v in entry.items()}
                     for name, entry in self._blocks[block_idx].items()}
            event = stream.record_event()
        self._pending[block_idx] = (moved, event)

    def take(self, block_idx: int, device: torch.device) -> dict[str, dict[str, torch.Tensor]] | None:
        """Remove a block's state from the store and return it as tensors on ``device`` (``None`` if absent): the
        moments this store quantized come back dequantized to fp32, everything else as it was put.

        Host buffers are kept for reuse by the next :meth:`put` of the same block.
        """
        device = torch.device(device)
        if block_idx not in self._blocks:
            return None
        if block_idx in self._pending:
            moved, event = self._pending.pop(block_idx)
            mod = torch.get_device_module(device)
            current = mod.current_stream(device)
            current.wait_event(event)
            for entry in moved.values():
                for v in entry.values():
                    for t in (v.tensors() if isinstance(v, Quantized) else (v,)):
                        # Allocated on the side stream, used on the current one: tell the caching allocator. The
                        # "step" scalars stay on the host (_move), where record_stream does not exist (an H200
                        # run raised NotImplementedError for them at the first restore).
                        if t.device.type != "cpu":
                            t.record_stream(current)
        else:
            moved = {name: {key: _move(v, device, non_blocking=False) for key, v in entry.items()}
                     for name, entry in self._blocks[block_idx].items()}
        host = self._blocks.pop(block_idx)
        if device.type != "cpu":
            # Keep the pinned host buffers so the next put() of this block reuses them (pinning is slow).
            self._buffers[block_idx] = {n: {k: v for k, v in e.items() if isinstance(v, torch.Tensor)}
                                        for n, e in host.items()}
        out: dict[str, dict[str, torch.Tensor]] = {}
        for name, entry in moved.items():
            out[name] = {key: (dequantize(v, self._shapes[name]) if isinstance(v, Quantized) else v)
                         for key, v in entry.items()}
        return out

    def peek(self, block_idx: int) -> dict[str, dict[str, torch.Tensor]]:
        """A block's stored state as CPU tensors (copies; moments this store quantized are dequantized to fp32,
        moments that arrived in 8 bits are returned as they are held), without removing it."""
        return {name: {key: (dequantize(v, self._shapes[name]) if isinstance(v, Quantized) else v.clone())
                       for key, v in entry.items()}
                for name, entry in self._blocks[block_idx].items()}

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every host tensor held (stored state, reusable buffers and in-flight prefetch copies)."""
        for entry_map in list(self._blocks.values()) + list(self._buffers.values()):
            for entry in entry_map.values():
                for v in entry.values():
                    yield from (v.tensors() if isinstance(v, Quantized) else (v,))
        for moved, _ in self._pending.values():
            for entry in moved.values():
                for v in entry.values():
                    yield from (v.tensors() if isinstance(v, Quantized) else (v,))

    def state_dict(self) -> dict:
        """Serializable copy of the stored state: ``{block_idx: {name: {key: tensor | {codes, absmax, sqrt}}}}``."""
        blocks = {}
        for b, entry_map in self._blocks.items():
            blocks[b] = {
                name: {key: ({"codes": v.codes, "absmax": v.absmax, "sqrt": v.sqrt} if isinstance(v, Quantized) else v)
                       for key, v in entry.items()}
                for name, entry in entry_map.items()
            }
        return {"offload_dtype": self.offload_dtype, "blocks": blocks,
                "shapes": {n: tuple(s) for n, s in self._shapes.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Replace the stored state by one saved with :meth:`state_dict` (tensors are copied to host memory)."""
        if state["offload_dtype"] != self.offload_dtype:
            raise ValueError(
                f"checkpoint stores offloaded state as {state['offload_dtype']!r}, this optimizer uses "
                f"{self.offload_dtype!r}; build the optimizer with offload_dtype={state['offload_dtype']!r}"
            )
        self._pending.clear()
        self._buffers.clear()
        self._shapes = {n: torch.Size(s) for n, s in state["shapes"].items()}
        self._blocks = {}
        for b, entry_map in state["blocks"].items():
            self._blocks[int(b)] = {
                name: {key: (Quantized(v["codes"].cpu().clone(), v["absmax"].cpu().clone(), bool(v["sqrt"]))
                             if isinstance(v, dict) else v.detach().cpu().clone())
                       for key, v in entry.items()}
                for name, entry in entry_map.items()
            }


def _move(v, device: torch.device, non_blocking: bool):
    if isinstance(v, Quantized):
        return Quantized(v.codes.to(device, non_blocking=non_blocking), v.absmax.to(device, non_blocking=non_blocking),
                         v.sqrt)
    if v.dim() == 0:  # "step" stays a CPU scalar like torch's
        return v
    return v.to(device, non_blocking=non_blocking)

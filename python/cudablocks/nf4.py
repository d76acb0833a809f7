"""NF4: bitsandbytes' 4-bit NormalFloat format, bit for bit, on the CPU or a CUDA device.

The format (bitsandbytes 0.4x/0.5x ``quantize_4bit(quant_type="nf4")`` / ``dequantize_4bit``):

* the tensor is flattened and cut into blocks of ``blocksize`` consecutive elements (64 by
  default; any power of two from 32 to 4096); each block keeps its fp32 ``absmax = max |x|``;
* each element becomes the index of an NF4 code value (:data:`CODE`, 16 values, index 7 = 0.0)
  chosen from ``x / absmax`` by bitsandbytes' decision thresholds;
* element ``2j`` goes to the high nibble of byte ``j`` and ``2j + 1`` to the low nibble; an odd
  element count pads the last low nibble (with the code of 0); the packed weight is
  ``[(n + 1) // 2, 1]`` uint8;
* dequantization is ``CODE[nibble] * absmax`` in fp32, rounded once to the output dtype;
* double quantization (bitsandbytes' ``compress_statistics=True``) stores absmax as uint8 codes of
  the 8-bit dynamic map (:data:`DYNAMIC_MAP`) of ``absmax - offset`` in blocks of 256, with one fp32
  scale per 256 (``absmax2``) and ``offset = mean(absmax)``.

Usage::

    t = cudablocks.nf4.quantize(weight, blocksize=64, double_quant=True, device="cuda:0")
    w_bf16 = cudablocks.nf4.dequantize(t, "bfloat16")        # GpuBuffer, weight's shape
    sd = t.to_bnb_state_dict("model.layers.0.mlp.down_proj.")  # the tensors a bnb-4bit checkpoint holds
    t2 = cudablocks.nf4.Nf4Tensor.from_bnb_state_dict(sd, "model.layers.0.mlp.down_proj.", device="cuda:0")

One difference from bitsandbytes remains: with double quantization, the offset here is the mean
of absmax summed in double (deterministic), while bitsandbytes takes torch's float32 ``mean()``;
the two can differ in the last bits, and with them absmax2 and rare codes. Pass ``offset=`` to
reproduce a given offset exactly; loading a bitsandbytes checkpoint keeps its offset.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from cudablocks import _core
from cudablocks._core import CudaStream, Device, GpuBuffer
from cudablocks.errors import DtypeError, InvalidArgumentError, ShapeError

__all__ = [
    "BLOCKSIZES",
    "CODE",
    "DYNAMIC_MAP",
    "NESTED_BLOCKSIZE",
    "Nf4Tensor",
    "dequantize",
    "quantize",
]

#: The 16 NF4 code values (bitsandbytes' ``quant_map``), float32, ascending; ``CODE[7] == 0``.
CODE: np.ndarray = _core.nf4_code()
CODE.flags.writeable = False
#: bitsandbytes' ``create_dynamic_map(signed=True)``: the 8-bit map of double quantization.
DYNAMIC_MAP: np.ndarray = _core.nf4_dynamic_map()
DYNAMIC_MAP.flags.writeable = False
#: The block sizes bitsandbytes' 4-bit quantization accepts.
BLOCKSIZES: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)
#: The block size of double quantization (bitsandbytes' ``nested_blocksize``).
NESTED_BLOCKSIZE = 256

_FLOAT_DTYPES = ("float32", "bfloat16", "float16")
_STATE_SUFFIX = "quant_state.bitsandbytes__nf4"


def _check_blocksize(blocksize: int) -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, (int, np.integer)) or int(blocksize) not in BLOCKSIZES:
        raise InvalidArgumentError(f"NF4 blocksize must be one of {BLOCKSIZES} (as bitsandbytes), got {blocksize!r}")
    return int(blocksize)


def _check_dtype(dtype: str, what: str) -> str:
    if dtype not in _FLOAT_DTYPES:
        raise DtypeError(f"{what} must be one of {_FLOAT_DTYPES}, got {dtype!r}")
    return dtype


def _blocks(n: int, blocksize: int) -> int:
    return -(-n // blocksize)


def _to_numpy(value: Any) -> np.ndarray:
    """A state-dict value (numpy array, GpuBuffer, torch tensor or sequence) as a numpy array."""
    if isinstance(value, GpuBuffer):
        return value.to_numpy()
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, without importing torch
        return value.detach().cpu().numpy()
    return np.asarray(value)


@dataclass(frozen=True, eq=False)
class Nf4Tensor:
    """A tensor in bitsandbytes' NF4 format, its buffers on one device.

    ``packed`` is uint8 ``[(n + 1) // 2, 1]``; ``absmax`` float32 ``[ceil(n / blocksize)]`` (None
    with double quantization, where ``qabsmax`` uint8 of the same length, ``absmax2`` float32
    ``[ceil(len / 256)]``, ``offset_buffer`` float32 ``[1]`` and ``nested_quant_map`` float32
    ``[256]`` hold it instead). ``shape`` and ``dtype`` are those of the quantized tensor.
    """

    packed: GpuBuffer
    absmax: GpuBuffer | None
    shape: tuple[int, ...]
    blocksize: int
    dtype: str
    quant_map: GpuBuffer
    qabsmax: GpuBuffer | None = None
    absmax2: GpuBuffer | None = None
    offset_buffer: GpuBuffer | None = None
    nested_quant_map: GpuBuffer | None = None

    @property
    def double_quant(self) -> bool:
        """Whether absmax is itself quantized (bitsandbytes' ``compress_statistics``)."""
        return self.qabsmax is not None

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def num_blocks(self) -> int:
        return _blocks(self.numel, self.blocksize)

    @property
    def device(self) -> Device:
        return self.packed.device

    @property
    def offset(self) -> float | None:
        """The double-quantization offset (the float32 value, as a Python float), or None."""
        if self.offset_buffer is None:
            return None
        return float(self.offset_buffer.to_numpy()[0])

    @property
    def nbytes(self) -> int:
        """Bytes of the buffers this tensor holds on its device."""
        parts = (self.packed, self.absmax, self.quant_map, self.qabsmax, self.absmax2, self.offset_buffer,
                 self.nested_quant_map)
        return sum(p.nbytes for p in parts if p is not None)

    def absmax_fp32(self, stream: CudaStream | None = None) -> GpuBuffer:
        """The per-block absmax as float32 (dequantized from the 8-bit codes with double quantization)."""
        if not self.double_quant:
            assert self.absmax is not None
            return self.absmax
        assert self.qabsmax is not None and self.absmax2 is not None
        assert self.offset_buffer is not None and self.nested_quant_map is not None
        out = GpuBuffer.empty(self.num_blocks, "float32", self.device)
        _core.nf4_double_dequantize(self.qabsmax, self.absmax2, self.offset_buffer, self.nested_quant_map, out,
                                    stream)
        return out

    def dequantize(self, dtype: str | None = None, stream: CudaStream | None = None) -> GpuBuffer:
        """See :func:`dequantize`."""
        return dequantize(self, dtype, stream)

    def to_bnb_state_dict(self, prefix: str = "", stream: CudaStream | None = None) -> dict[str, np.ndarray]:
        """The entries a bitsandbytes-4bit checkpoint stores for this weight, as numpy arrays.

        ``prefix`` is the module's (``"model.layers.0.self_attn.q_proj."``); the keys are
        ``{prefix}weight`` (uint8 ``[(n + 1) // 2, 1]``), ``{prefix}weight.absmax``,
        ``{prefix}weight.quant_map``, with double quantization ``{prefix}weight.nested_absmax`` and
        ``{prefix}weight.nested_quant_map``, and ``{prefix}weight.quant_state.bitsandbytes__nf4``
        (the JSON of the other fields as uint8 bytes, as bitsandbytes' ``QuantState.as_dict(packed=True)``).
        """
        w = f"{prefix}weight"
        state: dict[str, Any] = {"quant_type": "nf4", "blocksize": self.blocksize, "dtype": self.dtype,
                                 "shape": list(self.shape)}
        out = {w: self.packed.to_numpy(stream).reshape(-1, 1)}
        if self.double_quant:
            assert self.qabsmax is not None and self.absmax2 is not None and self.nested_quant_map is not None
            out[f"{w}.absmax"] = self.qabsmax.to_numpy(stream)
            out[f"{w}.quant_map"] = self.quant_map.to_numpy(stream)
            out[f"{w}.nested_absmax"] = self.absmax2.to_numpy(stream)
            out[f"{w}.nested_quant_map"] = self.nested_quant_map.to_numpy(stream)
            state.update({"nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32",
                          "nested_offset": self.offset})
        else:
            assert self.absmax is not None
            out[f"{w}.absmax"] = self.absmax.to_numpy(stream)
            out[f"{w}.quant_map"] = self.quant_map.to_numpy(stream)
        out[f"{w}.{_STATE_SUFFIX}"] = np.frombuffer(json.dumps(state).encode("utf-8"), dtype=np.uint8).copy()
        return out

    @classmethod
    def from_bnb_state_dict(
        cls,
        state_dict: Mapping[str, Any],
        prefix: str = "",
        device: Device | str = "cpu",
        stream: CudaStream | None = None,
    ) -> Nf4Tensor:
        """Reads one weight of a bitsandbytes-4bit (NF4) checkpoint as it is, without re-quantizing.

        ``state_dict`` maps the keys of :meth:`to_bnb_state_dict` to numpy arrays, torch tensors or
        GpuBuffers. Raises InvalidArgumentError for a missing or inconsistent quant state entry
        (naming the key), ShapeError for a packed weight or absmax of the wrong size, DtypeError for
        wrong element types.
        """
        dev = Device(device) if isinstance(device, str) else device
        w = f"{prefix}weight"

        def get(key: str) -> np.ndarray:
            if key not in state_dict:
                raise InvalidArgumentError(f"bitsandbytes 4-bit state dict has no entry {key!r} (prefix {prefix!r})")
            return _to_numpy(state_dict[key])

        state_key = f"{w}.{_STATE_SUFFIX}"
        if state_key not in state_dict:
            others = [k for k in state_dict if k.startswith(f"{w}.quant_state.")]
            hint = f" (found {others}: only NF4 is supported)" if others else ""
            raise InvalidArgumentError(f"bitsandbytes 4-bit state dict has no entry {state_key!r}{hint}")
        try:
            state = json.loads(bytes(get(state_key).astype(np.uint8).ravel()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InvalidArgumentError(f"{state_key!r} does not hold the JSON of a quant state: {e}") from None
        for field in ("quant_type", "blocksize", "dtype", "shape"):
            if field not in state:
                raise InvalidArgumentError(f"quant state {state_key!r} has no field {field!r}: {state}")
        if state["quant_type"] != "nf4":
            raise InvalidArgumentError(f"quant_type {state['quant_type']!r} in {state_key!r}: only 'nf4' is supported")
        blocksize = _check_blocksize(state["blocksize"])
        dtype = _check_dtype(str(state["dtype"]), f"dtype in {state_key!r}")
        shape = tuple(int(s) for s in state["shape"])
        n = int(np.prod(shape, dtype=np.int64))
        blocks = _blocks(n, blocksize)

        packed = get(w)
        if packed.dtype != np.uint8:
            raise DtypeError(f"{w!r} must be uint8 (bitsandbytes' quant_storage), got {packed.dtype}")
        if packed.size != (n + 1) // 2:
            raise ShapeError(f"{w!r} holds {packed.size} bytes, but shape {list(shape)} needs (n + 1) // 2 = "
                             f"{(n + 1) // 2}")
        quant_map = get(f"{w}.quant_map").astype(np.float32, copy=False).ravel()
        if quant_map.shape != (16,) or not np.array_equal(quant_map, CODE):
            raise InvalidArgumentError(f"{w}.quant_map is not the NF4 codebook: {quant_map}")
        nested = f"{w}.nested_absmax" in state_dict or "nested_offset" in state

        def upload(a: np.ndarray) -> GpuBuffer:
            return GpuBuffer.from_numpy(np.ascontiguousarray(a), dev, stream)

        absmax = get(f"{w}.absmax").ravel()
        if absmax.size != blocks:
            raise ShapeError(f"{w}.absmax holds {absmax.size} values, but shape {list(shape)} in blocks of "
                             f"{blocksize} needs {blocks}")
        common: dict[str, Any] = {"packed": upload(packed.reshape(-1, 1)), "shape": shape, "blocksize": blocksize, "dtype": dtype,
                  "quant_map": upload(quant_map)}
        if not nested:
            if absmax.dtype != np.float32:
                raise DtypeError(f"{w}.absmax must be float32 without double quantization, got {absmax.dtype}")
            return cls(absmax=upload(absmax), **common)

        for field in ("nested_blocksize", "nested_offset"):
            if field not in state:
                raise InvalidArgumentError(f"quant state {state_key!r} has no field {field!r}: {state}")
        if int(state["nested_blocksize"]) != NESTED_BLOCKSIZE:
            raise InvalidArgumentError(f"nested_blocksize {state['nested_blocksize']} in {state_key!r}: only "
                                       f"{NESTED_BLOCKSIZE} is supported")
        if absmax.dtype != np.uint8:
            raise DtypeError(f"{w}.absmax must be uint8 with double quantization, got {absmax.dtype}")
        absmax2 = get(f"{w}.nested_absmax").astype(np.float32, copy=False).ravel()
        if absmax2.size != _blocks(blocks, NESTED_BLOCKSIZE):
            raise ShapeError(f"{w}.nested_absmax holds {absmax2.size} values, {blocks} absmax codes in blocks of "
                             f"{NESTED_BLOCKSIZE} need {_blocks(blocks, NESTED_BLOCKSIZE)}")
        nested_map = get(f"{w}.nested_quant_map").astype(np.float32, copy=False).ravel()
        if nested_map.shape != (256,):
            raise ShapeError(f"{w}.nested_quant_map must hold 256 values, got {nested_map.size}")
        offset = np.array([state["nested_offset"]], dtype=np.float32)
        return cls(absmax=None, qabsmax=upload(absmax), absmax2=upload(absmax2), offset_buffer=upload(offset),
                   nested_quant_map=upload(nested_map), **common)


def quantize(
    x: np.ndarray | GpuBuffer,
    blocksize: int = 64,
    double_quant: bool = False,
    device: Device | str | None = None,
    stream: CudaStream | None = None,
    offset: float | None = None,
) -> Nf4Tensor:
    """Quantizes ``x`` (float32, bfloat16 or float16; numpy array or GpuBuffer) to NF4 on ``device``.

    ``device`` defaults to the buffer's own, or the CPU for a numpy array; the quantization runs
    there. ``double_quant`` also quantizes absmax (bitsandbytes' ``compress_statistics=True``);
    ``offset`` then replaces the computed mean of absmax (to reproduce a given quantization).
    """
    blocksize = _check_blocksize(blocksize)
    if isinstance(x, GpuBuffer):
        dev = x.device if device is None else (Device(device) if isinstance(device, str) else device)
        src = x
        if src.device != dev:
            src = GpuBuffer.empty(x.shape, x.dtype, dev)
            src.copy_from(x, stream)
    elif isinstance(x, np.ndarray):
        dev = Device("cpu") if device is None else (Device(device) if isinstance(device, str) else device)
        if str(x.dtype) not in _FLOAT_DTYPES:
            raise DtypeError(f"NF4 quantizes float32, bfloat16 or float16 arrays, got {x.dtype}")
        src = GpuBuffer.from_numpy(np.ascontiguousarray(x), dev, stream)
    else:
        raise DtypeError(f"quantize expects a numpy.ndarray or a GpuBuffer, got {type(x).__name__}")
    _check_dtype(src.dtype, "the quantized tensor's dtype")
    n = src.numel
    if n == 0:
        raise ShapeError(f"cannot NF4-quantize an empty tensor (shape {tuple(src.shape)})")
    if offset is not None and not double_quant:
        raise InvalidArgumentError("offset is the double-quantization offset: pass double_quant=True with it")

    blocks = _blocks(n, blocksize)
    packed = GpuBuffer.empty(((n + 1) // 2, 1), "uint8", dev)
    absmax = GpuBuffer.empty(blocks, "float32", dev)
    _core.nf4_quantize(src, blocksize, packed, absmax, stream)
    quant_map = GpuBuffer.from_numpy(np.array(CODE), dev, stream)
    common: dict[str, Any] = {"packed": packed, "shape": tuple(src.shape), "blocksize": blocksize, "dtype": src.dtype,
              "quant_map": quant_map}
    if not double_quant:
        return Nf4Tensor(absmax=absmax, **common)

    nested_map = GpuBuffer.from_numpy(np.array(DYNAMIC_MAP), dev, stream)
    offset_buffer = GpuBuffer.from_numpy(np.array([0.0 if offset is None else offset], dtype=np.float32), dev,
                                         stream)
    qabsmax = GpuBuffer.empty(blocks, "uint8", dev)
    absmax2 = GpuBuffer.empty(_blocks(blocks, NESTED_BLOCKSIZE), "float32", dev)
    _core.nf4_double_quantize(absmax, nested_map, offset_buffer, offset is None, qabsmax, absmax2, stream)
    return Nf4Tensor(absmax=None, qabsmax=qabsmax, absmax2=absmax2, offset_buffer=offset_buffer,
                     nested_quant_map=nested_map, **common)


def dequantize(t: Nf4Tensor, dtype: str | None = None, stream: CudaStream | None = None) -> GpuBuffer:
    """The values of ``t`` as a new GpuBuffer of ``t.shape`` on ``t.device``.

    ``dtype``: "float32", "bfloat16" or "float16" (default: the dtype ``t`` was quantized from);
    each element is ``CODE[nibble] * absmax`` in fp32 rounded once to it, as bitsandbytes'
    ``dequantize_4bit``.
    """
    if not isinstance(t, Nf4Tensor):
        raise DtypeError(f"dequantize expects an Nf4Tensor, got {type(t).__name__}")
    out_dtype = _check_dtype(t.dtype if dtype is None else dtype, "dequantize dtype")
    out = GpuBuffer.empty(t.shape, out_dtype, t.device)
    _core.nf4_dequantize(t.packed, t.absmax_fp32(stream), t.blocksize, out, stream)
    return out

"""Exceptions raised by cudablocks.

Every error from the native core reaches Python as one of these classes. Catch
:class:`CudaBlocksError` for all of them; the subclasses that describe a bad argument are also
``ValueError``s, and :class:`OutOfMemoryError` is also a ``MemoryError``.
"""

from __future__ import annotations

__all__ = [
    "CudaBlocksError",
    "ShapeError",
    "DtypeError",
    "DeviceError",
    "InvalidArgumentError",
    "OutOfMemoryError",
    "CudaError",
    "UnsupportedOperationError",
    "DataError",
    "CheckpointError",
]


class CudaBlocksError(Exception):
    """Base class of every error raised by cudablocks."""


class ShapeError(CudaBlocksError, ValueError):
    """A buffer or array has the wrong shape, or is not C-contiguous."""


class DtypeError(CudaBlocksError, ValueError):
    """A buffer or array has the wrong element type, or an object is not an array at all."""


class DeviceError(CudaBlocksError, ValueError):
    """A device that does not exist, or buffers and streams of different devices mixed."""


class InvalidArgumentError(CudaBlocksError, ValueError):
    """An argument value outside its domain (sizes, sequence lengths, hyperparameters)."""


class OutOfMemoryError(CudaBlocksError, MemoryError):
    """An allocation failed; the message gives the bytes asked for and the bytes free."""


class CudaError(CudaBlocksError, RuntimeError):
    """The CUDA runtime or cuBLAS reported a failure; the message names CUDA's error and the call."""


class UnsupportedOperationError(CudaBlocksError):
    """The object's kind does not support the call; the message says what to use instead."""


class DataError(CudaBlocksError, ValueError):
    """Training or evaluation data that cannot be used: a missing file, malformed JSONL (the
    message gives the line), an unknown or out-of-range label, an empty set, a text too long."""


class CheckpointError(CudaBlocksError):
    """A model directory or checkpoint that cannot be read or written: missing or inconsistent
    files, tensors of the wrong shape, an unsupported format; the message names the file."""

"""cudablocks: decoder-transformer blocks on NVIDIA GPUs, with a CPU reference backend.

The core objects::

    import cudablocks as cb
    dev = cb.Device("cuda:0")            # or "cpu"
    stream = cb.CudaStream(dev)
    x = cb.GpuBuffer.from_numpy(array, dev, stream=stream)
"""

from __future__ import annotations

from cudablocks import errors, ops
from cudablocks._core import (
    CudaEvent,
    CudaStream,
    Device,
    GpuBuffer,
    MemoryStats,
    cuda_backend_built,
    cuda_device_count,
    memory_stats,
    reset_peak_memory,
)
from cudablocks.errors import (
    CudaBlocksError,
    CudaError,
    DeviceError,
    DtypeError,
    InvalidArgumentError,
    OutOfMemoryError,
    ShapeError,
    UnsupportedOperationError,
)

__version__ = "0.1.0"

__all__ = [
    "CudaBlocksError",
    "CudaError",
    "CudaEvent",
    "CudaStream",
    "Device",
    "DeviceError",
    "DtypeError",
    "GpuBuffer",
    "InvalidArgumentError",
    "MemoryStats",
    "OutOfMemoryError",
    "ShapeError",
    "UnsupportedOperationError",
    "cuda_backend_built",
    "cuda_device_count",
    "errors",
    "memory_stats",
    "ops",
    "reset_peak_memory",
]

"""Single ops on buffers, each running on the CPU reference or the CUDA backend by device.

The blocks use these ops internally; they are exposed for testing and for building custom layers.
"""

from __future__ import annotations

from cudablocks._core import gemm, rmsnorm_forward

__all__ = ["gemm", "rmsnorm_forward"]

"""cudablocks: decoder-transformer blocks on NVIDIA GPUs, with a CPU reference backend.

The core objects::

    import cudablocks as cb
    dev = cb.Device("cuda:0")            # or "cpu"
    stream = cb.CudaStream(dev)
    x = cb.GpuBuffer.from_numpy(array, dev, stream=stream)
    cfg = cb.TransformerConfig.from_pretrained("path/to/Qwen3-4B")
    blk = cb.CudaBlock.fp32(cfg, layer_idx, weights, device=dev, max_tokens=4096)
    blk.forward(x, out, seq_lens, stream)
    grad_ws = cb.CudaGradWorkspace(blk)
    blk.backward(x, grad_out, grad_in, seq_lens, stream, grad_ws)

    # QLoRA: frozen NF4 weights, LoRA adapters trained through them.
    q = cb.CudaBlock.nf4(cfg, layer_idx, weights, device=dev, max_tokens=4096,
                         lora=cb.LoraConfig(rank=16, alpha=32, targets=("q_proj", "v_proj")))
    lora_ws = q.new_lora_grad_workspace()
    q.forward(x, out, seq_lens, stream)
    q.backward_lora(x, grad_out, grad_in, seq_lens, stream, lora_ws)

    # Many layers, one layer's activation memory: recompute each forward before its backward.
    arena = cb.BlockArena(dev)
    blocks = [cb.CudaBlock.nf4(cfg, i, layer_weights[i], dev, 4096, lora=...,
                               arena=arena, share_activations=True) for i in range(n)]
"""

from __future__ import annotations

from cudablocks import config, errors, lora, nf4, ops
from cudablocks._core import (
    BlockArena,
    CudaBlock,
    CudaEvent,
    CudaGradWorkspace,
    GpuBlockOptimizerState,
    GradNorm,
    CudaStream,
    Device,
    GpuBuffer,
    MemoryStats,
    TransformerConfig,
    cuda_backend_built,
    cuda_device_count,
    memory_stats,
    reset_peak_memory,
)
from cudablocks.errors import (
    CheckpointError,
    CudaBlocksError,
    CudaError,
    DataError,
    DeviceError,
    DtypeError,
    InvalidArgumentError,
    OutOfMemoryError,
    ShapeError,
    UnsupportedOperationError,
)
from cudablocks.lora import LORA_TARGETS, LoraConfig

__version__ = "0.1.0"

__all__ = [
    "BlockArena",
    "CheckpointError",
    "CudaBlock",
    "CudaBlocksError",
    "CudaError",
    "CudaEvent",
    "CudaGradWorkspace",
    "GpuBlockOptimizerState",
    "GradNorm",
    "CudaStream",
    "DataError",
    "Device",
    "DeviceError",
    "DtypeError",
    "GpuBuffer",
    "InvalidArgumentError",
    "LORA_TARGETS",
    "LoraConfig",
    "MemoryStats",
    "OutOfMemoryError",
    "ShapeError",
    "TransformerConfig",
    "UnsupportedOperationError",
    "config",
    "cuda_backend_built",
    "cuda_device_count",
    "errors",
    "lora",
    "memory_stats",
    "nf4",
    "ops",
    "reset_peak_memory",
]

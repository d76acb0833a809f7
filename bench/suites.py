"""The benchmark suites. Each takes (device, quick) and yields Rows; SUITES lists them in order."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

import cudablocks as cb
from harness import Row, time_ms


def ceilings(device: str, quick: bool) -> Iterator[Row]:
    """The card's measured limits: copy bandwidth and GEMM rates (torch/cuBLAS)."""
    if device == "cpu":
        return
    n = 1 << 28  # 1 GiB of float32: far past L2
    a = torch.randn(n, device=device)
    b = torch.empty_like(a)
    ms = time_ms(lambda: b.copy_(a), device, repeats=20)
    yield Row("copy bandwidth (read + write)", "TB/s", 2 * a.numel() * 4 / ms / 1e9)
    size = 4096 if quick else 8192
    for name, dtype, tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True), ("bf16", torch.bfloat16, False)):
        x = torch.randn(size, size, device=device).to(dtype)
        y = torch.randn(size, size, device=device).to(dtype)
        torch.backends.cuda.matmul.allow_tf32 = tf32
        ms = time_ms(lambda: x @ y, device, repeats=10 if name == "fp32" else 20)
        torch.backends.cuda.matmul.allow_tf32 = False
        yield Row(f"GEMM {name} {size}^3", "TFLOP/s", 2 * size**3 / ms / 1e9)


def rmsnorm(device: str, quick: bool) -> Iterator[Row]:
    """RMSNorm forward on [T, 2560] against torch's fused rms_norm, in GB/s of required traffic."""
    rows, cols = (64, 256) if device == "cpu" else (8 * 512, 2560)
    rng = np.random.default_rng()
    sets = 1 if device == "cpu" else 8  # rotate: one set would sit in L2
    stream = cb.CudaStream.wrap(device, torch.cuda.current_stream().cuda_stream) if device != "cpu" else cb.CudaStream("cpu")
    xs = [cb.GpuBuffer.from_numpy(rng.standard_normal((rows, cols)).astype(np.float32), device, stream=stream) for _ in range(sets)]
    w = cb.GpuBuffer.from_numpy(rng.standard_normal(cols).astype(np.float32), device, stream=stream)
    out = cb.GpuBuffer.empty((rows, cols), "float32", device)
    state = {"i": 0}

    def ours() -> None:
        state["i"] = (state["i"] + 1) % sets
        cb.ops.rmsnorm_forward(xs[state["i"]], w, out, 1e-6, stream)

    txs = [torch.from_dlpack(x) for x in xs]
    tw = torch.from_dlpack(w)

    def theirs() -> None:
        state["i"] = (state["i"] + 1) % sets
        torch.nn.functional.rms_norm(txs[state["i"]], (cols,), tw, 1e-6)

    bytes_moved = 2 * rows * cols * 4
    ours_ms = time_ms(ours, device)
    anchor_ms = time_ms(theirs, device)
    yield Row(f"rmsnorm fwd [{rows}, {cols}]", "GB/s", bytes_moved / ours_ms / 1e6,
              anchor=bytes_moved / anchor_ms / 1e6, anchor_name="torch rms_norm")


SUITES: dict[str, Callable[[str, bool], Iterator[Row]]] = {
    "ceilings": ceilings,
    "rmsnorm": rmsnorm,
}

"""RMSNorm forward on both backends against float64 numpy."""

from __future__ import annotations

import numpy as np
import pytest

import cudablocks as cb


def rmsnorm_fp64(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x64 = x.astype(np.float64)
    return x64 / np.sqrt((x64**2).mean(axis=-1, keepdims=True) + eps) * w.astype(np.float64)


@pytest.mark.parametrize("rows, cols", [(1, 1), (13, 37), (300, 2560)])
def test_rmsnorm_matches_fp64(device: cb.Device, rng: np.random.Generator, rows: int, cols: int) -> None:
    x = (rng.standard_normal((rows, cols)) * 4).astype(np.float32)
    w = rng.standard_normal(cols).astype(np.float32)
    stream = cb.CudaStream(device)
    xb = cb.GpuBuffer.from_numpy(x, device, stream=stream)
    wb = cb.GpuBuffer.from_numpy(w, device, stream=stream)
    out = cb.GpuBuffer.empty((rows, cols), "float32", device)
    out.fill(float("nan"), stream=stream)  # poison
    cb.ops.rmsnorm_forward(xb, wb, out, 1e-6, stream)
    y = out.to_numpy()
    ref = rmsnorm_fp64(x, w, 1e-6)
    assert np.isfinite(y).all()
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 1e-6


@pytest.mark.gpu
def test_rmsnorm_cuda_matches_cpu(rng: np.random.Generator) -> None:
    x = rng.standard_normal((777, 2560)).astype(np.float32)
    w = rng.standard_normal(2560).astype(np.float32)
    outs = []
    for dev in ("cpu", "cuda:0"):
        out = cb.GpuBuffer.empty(x.shape, "float32", dev)
        cb.ops.rmsnorm_forward(cb.GpuBuffer.from_numpy(x, dev), cb.GpuBuffer.from_numpy(w, dev), out, 1e-5)
        outs.append(out.to_numpy())
    assert np.linalg.norm(outs[1] - outs[0]) / np.linalg.norm(outs[0]) < 1e-6


def test_rmsnorm_rejects_bad_input(rng: np.random.Generator) -> None:
    x = cb.GpuBuffer.from_numpy(rng.standard_normal((4, 8)).astype(np.float32), "cpu")
    w = cb.GpuBuffer.from_numpy(rng.standard_normal(8).astype(np.float32), "cpu")
    out = cb.GpuBuffer.zeros((4, 8), "float32", "cpu")
    out.fill(5.0)
    with pytest.raises(cb.ShapeError, match="w must have shape"):
        cb.ops.rmsnorm_forward(x, cb.GpuBuffer.zeros((7,), "float32", "cpu"), out)
    with pytest.raises(cb.ShapeError, match="y must have shape"):
        cb.ops.rmsnorm_forward(x, w, cb.GpuBuffer.zeros((4, 9), "float32", "cpu"))
    with pytest.raises(cb.DtypeError, match="x must be float32"):
        cb.ops.rmsnorm_forward(cb.GpuBuffer.zeros((4, 8), "bfloat16", "cpu"), w, out)
    with pytest.raises(cb.InvalidArgumentError, match="eps"):
        cb.ops.rmsnorm_forward(x, w, out, -1.0)
    assert (out.to_numpy() == 5.0).all()  # refused calls write nothing

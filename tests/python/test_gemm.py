"""cb.ops.gemm: fp32 buffers (in each precision mode) and bf16 buffers (bf16 operands, fp32 accumulation, fp32
or bf16 out) against float64 numpy, and its checks."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import cudablocks as cb


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("trans_b", [False, True])
def test_gemm_fp32_and_bf16_buffers(device: cb.Device, trans_b: bool, rng: np.random.Generator) -> None:
    m, k, n = 67, 300, 45
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    c0 = rng.standard_normal((m, n)).astype(np.float32)
    bt = b.T if trans_b else b
    exact = a.astype(np.float64) @ bt.astype(np.float64)
    out = cb.GpuBuffer.from_numpy(c0, device)
    cb.ops.gemm(cb.GpuBuffer.from_numpy(a, device), cb.GpuBuffer.from_numpy(b, device), out, trans_b=trans_b)
    assert rel(out.to_numpy(), exact) <= 1e-5
    # bf16 buffers: the exact product of the bf16 values, accumulated in fp32; beta = 1 adds to out.
    a16, b16 = a.astype(ml_dtypes.bfloat16), b.astype(ml_dtypes.bfloat16)
    rounded = a16.astype(np.float64) @ (b16.T if trans_b else b16).astype(np.float64)
    out = cb.GpuBuffer.from_numpy(c0, device)
    cb.ops.gemm(cb.GpuBuffer.from_numpy(a16, device), cb.GpuBuffer.from_numpy(b16, device), out, trans_b=trans_b,
                beta=1.0, precision="bf16")
    assert rel(out.to_numpy(), rounded + c0) <= 1e-5
    assert rel(out.to_numpy(), exact + c0) > 1e-4  # the operands really were bf16


def test_gemm_bf16_out(device: cb.Device, rng: np.random.Generator) -> None:
    """bfloat16 operands into a bfloat16 out: the fp32 sum rounded to bf16 (on the CPU exactly the fp32 result
    rounded); beta = 1 adds out's values (CUDA's epilogue may round the product first)."""
    m, k, n = 67, 300, 45
    a16 = rng.standard_normal((m, k)).astype(ml_dtypes.bfloat16)
    b16 = rng.standard_normal((n, k)).astype(ml_dtypes.bfloat16)
    exact = a16.astype(np.float64) @ b16.astype(np.float64).T
    a, b = cb.GpuBuffer.from_numpy(a16, device), cb.GpuBuffer.from_numpy(b16, device)
    out32 = cb.GpuBuffer.empty((m, n), "float32", device)
    cb.ops.gemm(a, b, out32, trans_b=True, precision="bf16")
    out16 = cb.GpuBuffer.from_numpy(np.full((m, n), np.nan, ml_dtypes.bfloat16), device)
    cb.ops.gemm(a, b, out16, trans_b=True, precision="bf16")
    got = out16.to_numpy().astype(np.float64)
    if device.type == "cpu":
        np.testing.assert_array_equal(out16.to_numpy(), out32.to_numpy().astype(ml_dtypes.bfloat16))
    assert 0 < rel(got, exact) <= 2.0**-8
    c0 = (10 * rng.standard_normal((m, n))).astype(ml_dtypes.bfloat16)
    out16 = cb.GpuBuffer.from_numpy(c0, device)
    cb.ops.gemm(a, b, out16, trans_b=True, beta=1.0, precision="bf16")
    assert rel(out16.to_numpy(), exact + c0.astype(np.float64)) <= 2.0**-7
    before = out16.to_numpy()
    with pytest.raises(cb.InvalidArgumentError, match="beta 0 or 1"):
        cb.ops.gemm(a, b, out16, trans_b=True, beta=0.5, precision="bf16")
    np.testing.assert_array_equal(out16.to_numpy(), before)  # nothing written
    with pytest.raises(cb.DtypeError):  # fp32 operands do not write bf16
        cb.ops.gemm(cb.GpuBuffer.from_numpy(a16.astype(np.float32), device),
                    cb.GpuBuffer.from_numpy(b16.astype(np.float32), device), out16, trans_b=True)


def test_gemm_checks(rng: np.random.Generator) -> None:
    a = cb.GpuBuffer.from_numpy(rng.standard_normal((4, 8)).astype(np.float32), "cpu")
    b = cb.GpuBuffer.from_numpy(rng.standard_normal((8, 3)).astype(np.float32), "cpu")
    b16 = cb.GpuBuffer.from_numpy(rng.standard_normal((8, 3)).astype(ml_dtypes.bfloat16), "cpu")
    out = cb.GpuBuffer.empty((4, 3), "float32", "cpu")
    with pytest.raises(cb.ShapeError):
        cb.ops.gemm(a, b, out, trans_b=True)
    with pytest.raises(cb.DtypeError):
        cb.ops.gemm(a, b16, out)
    a16 = cb.GpuBuffer.from_numpy(a.to_numpy().astype(ml_dtypes.bfloat16), "cpu")
    with pytest.raises(cb.InvalidArgumentError, match="bf16"):
        cb.ops.gemm(a16, b16, out, precision="fp32")
    with pytest.raises(cb.InvalidArgumentError, match="precision"):
        cb.ops.gemm(a, b, out, precision="fp16")

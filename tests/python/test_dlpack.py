"""Zero-copy exchange with numpy and torch through DLPack and __cuda_array_interface__."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

import cudablocks as cb


def test_numpy_shares_memory_both_ways(rng: np.random.Generator) -> None:
    a = rng.standard_normal((6, 5)).astype(np.float32)
    b = cb.GpuBuffer.from_dlpack(a)
    assert b.data_ptr == a.ctypes.data and b.shape == (6, 5)
    b.fill(3.0)
    assert (a == 3.0).all()  # writes through the buffer are visible in numpy
    back = np.from_dlpack(b)
    assert back.ctypes.data == b.data_ptr
    back[0, 0] = -1.0
    assert b.to_numpy()[0, 0] == -1.0


def test_torch_cpu_bf16_shares_memory(rng: np.random.Generator) -> None:
    t = torch.randn(4, 3).to(torch.bfloat16)
    b = cb.GpuBuffer.from_dlpack(t)
    assert b.dtype == "bfloat16" and b.data_ptr == t.data_ptr()
    np.testing.assert_array_equal(b.to_numpy(), t.float().numpy().astype(ml_dtypes.bfloat16))
    u = torch.from_dlpack(b)
    assert u.dtype == torch.bfloat16 and u.data_ptr() == b.data_ptr


def test_buffer_outlives_its_producer(rng: np.random.Generator) -> None:
    a = rng.standard_normal(1000).astype(np.float32)
    expected = a.copy()
    b = cb.GpuBuffer.from_dlpack(a)
    del a
    np.testing.assert_array_equal(b.to_numpy(), expected)


def test_dlpack_rejects_what_it_cannot_share() -> None:
    t = torch.zeros(4, 6)
    with pytest.raises(cb.ShapeError, match="contiguous"):
        cb.GpuBuffer.from_dlpack(t[:, ::2])
    with pytest.raises(cb.DtypeError):
        cb.GpuBuffer.from_dlpack(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(cb.DtypeError, match="__dlpack__"):
        cb.GpuBuffer.from_dlpack([1, 2, 3])
    ro = np.zeros(3, np.float32)
    ro.flags.writeable = False
    with pytest.raises((cb.InvalidArgumentError, BufferError)):
        cb.GpuBuffer.from_dlpack(ro)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_cuda_shares_memory_both_ways(dtype: torch.dtype) -> None:
    t = torch.randn(64, 33, device="cuda").to(dtype)
    b = cb.GpuBuffer.from_dlpack(t)
    assert b.data_ptr == t.data_ptr() and b.device == cb.Device("cuda:0")
    assert b.dtype == ("float32" if dtype == torch.float32 else "bfloat16")
    b.fill(2.0)
    b.stream.synchronize()
    assert (t == 2.0).all()  # our write is visible to torch
    u = torch.from_dlpack(b)
    assert u.data_ptr() == b.data_ptr and u.dtype == dtype
    u.fill_(-3.0)
    torch.cuda.synchronize()
    assert (b.to_numpy().astype(np.float32) == -3.0).all()  # torch's write is visible to us


@pytest.mark.gpu
def test_stream_ordering_with_torch() -> None:
    stream = cb.CudaStream("cuda:0")
    b = cb.GpuBuffer.zeros((4096, 1024), "float32", "cuda:0", stream=stream)
    b.fill(1.0, stream=stream)  # queued on our stream; torch's stream must wait for it
    t = torch.from_dlpack(b)
    assert float(t.sum()) == 4096 * 1024


@pytest.mark.gpu
def test_cuda_array_interface() -> None:
    b = cb.GpuBuffer.zeros((3, 4), "float32", "cuda:0")
    cai = b.__cuda_array_interface__
    assert cai["shape"] == (3, 4) and cai["typestr"] == "<f4" and cai["data"][0] == b.data_ptr
    t = torch.as_tensor(b, device="cuda")
    assert t.data_ptr() == b.data_ptr

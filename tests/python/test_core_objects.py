"""Devices, streams, buffers, numpy exchange, memory accounting and error classes."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import cudablocks as cb


def test_error_classes_are_documented_subclasses() -> None:
    assert issubclass(cb.ShapeError, cb.CudaBlocksError) and issubclass(cb.ShapeError, ValueError)
    assert issubclass(cb.DtypeError, ValueError) and issubclass(cb.DeviceError, ValueError)
    assert issubclass(cb.OutOfMemoryError, MemoryError)
    assert issubclass(cb.CudaError, RuntimeError)
    assert issubclass(cb.UnsupportedOperationError, cb.CudaBlocksError)


def test_cpu_device() -> None:
    d = cb.Device("cpu")
    assert d.type == "cpu" and str(d) == "cpu" and d == cb.Device("cpu")
    assert d.total_memory > 0 and d.name


@pytest.mark.parametrize("spec", ["gpu", "cuda:abc", "cuda:-1", "", "CPU"])
def test_invalid_device_specs(spec: str) -> None:
    with pytest.raises(cb.DeviceError, match="invalid device"):
        cb.Device(spec)


def test_cuda_device_that_does_not_exist() -> None:
    n = cb.cuda_device_count()
    with pytest.raises(cb.DeviceError, match=f"cuda:{n + 3}"):
        cb.Device(f"cuda:{n + 3}")


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint8, np.int32, ml_dtypes.bfloat16])
def test_numpy_round_trip(device: cb.Device, rng: np.random.Generator, dtype: type) -> None:
    a = (rng.standard_normal((5, 7)) * 50).astype(dtype)
    stream = cb.CudaStream(device)
    b = cb.GpuBuffer.from_numpy(a, device, stream=stream)
    assert b.shape == (5, 7) and b.device == device and b.numel == 35
    assert b.nbytes == a.nbytes
    back = b.to_numpy()
    assert back.dtype == a.dtype
    np.testing.assert_array_equal(back.view(np.uint8), a.view(np.uint8))


def test_zeros_fill_copy_view(device: cb.Device, rng: np.random.Generator) -> None:
    z = cb.GpuBuffer.zeros((3, 4), "float32", device)
    assert not z.to_numpy().any()
    z.fill(-1.25)
    np.testing.assert_array_equal(z.to_numpy(), np.full((3, 4), -1.25, np.float32))
    a = rng.standard_normal((3, 4)).astype(np.float32)
    src = cb.GpuBuffer.from_numpy(a, "cpu")
    z.copy_from(src)  # across devices when `device` is a GPU
    np.testing.assert_array_equal(z.to_numpy(), a)
    row = z.view(4, (4,))
    row.fill(7.0)
    assert (z.to_numpy()[1] == 7.0).all() and (z.to_numpy()[0] == a[0]).all()
    assert z.reshape((12,)).shape == (12,)


def test_bf16_fill_rounds_to_nearest_even(device: cb.Device) -> None:
    b = cb.GpuBuffer.empty((4,), "bfloat16", device)
    b.fill(1.0 + 2.0**-8)  # halfway between two bf16 values: rounds to the even one, 1.0
    assert (b.to_numpy().astype(np.float32) == 1.0).all()


@pytest.mark.parametrize("dtype", [np.float64, np.int64, np.bool_, np.complex64])
def test_from_numpy_rejects_unsupported_dtypes(dtype: type) -> None:
    with pytest.raises(cb.DtypeError, match="astype"):
        cb.GpuBuffer.from_numpy(np.zeros((2, 2), dtype), "cpu")


def test_from_numpy_rejects_non_contiguous_and_non_arrays(rng: np.random.Generator) -> None:
    a = rng.standard_normal((4, 6)).astype(np.float32)
    with pytest.raises(cb.ShapeError, match="C-contiguous"):
        cb.GpuBuffer.from_numpy(a[:, ::2], "cpu")
    with pytest.raises(cb.ShapeError, match="C-contiguous"):
        cb.GpuBuffer.from_numpy(a.T, "cpu")
    with pytest.raises(cb.DtypeError, match="numpy.ndarray"):
        cb.GpuBuffer.from_numpy([[1.0, 2.0]], "cpu")  # type: ignore[arg-type]


def test_bad_shapes_and_values() -> None:
    with pytest.raises(cb.ShapeError):
        cb.GpuBuffer.empty((-2, 3), "float32", "cpu")
    with pytest.raises(cb.DtypeError, match="float64"):
        cb.GpuBuffer.empty((2,), "float64", "cpu")
    b = cb.GpuBuffer.zeros((4,), "int32", "cpu")
    with pytest.raises(cb.InvalidArgumentError):
        b.fill(0.5)
    with pytest.raises(cb.ShapeError):
        b.view(2, (3,))
    with pytest.raises(cb.DtypeError):
        b.copy_from(cb.GpuBuffer.zeros((4,), "float32", "cpu"))


def test_memory_accounting(device: cb.Device) -> None:
    before = cb.memory_stats(device).allocated_bytes
    b = cb.GpuBuffer.empty((1024, 256), "float32", device)
    assert cb.memory_stats(device).allocated_bytes == before + 1024 * 256 * 4
    assert cb.memory_stats(device).peak_bytes >= before + 1024 * 256 * 4
    del b
    assert cb.memory_stats(device).allocated_bytes == before


def test_stream_and_events(device: cb.Device) -> None:
    s = cb.CudaStream(device)
    e = s.record()
    s.wait(e)
    e.synchronize()
    assert e.query()
    s.synchronize()
    assert s.device == device


@pytest.mark.gpu
def test_mixing_devices_is_refused() -> None:
    gpu = cb.Device("cuda:0")
    x = cb.GpuBuffer.zeros((2, 8), "float32", gpu)
    w = cb.GpuBuffer.zeros((8,), "float32", "cpu")
    out = cb.GpuBuffer.zeros((2, 8), "float32", gpu)
    out.fill(3.0)
    with pytest.raises(cb.DeviceError, match="cpu"):
        cb.ops.rmsnorm_forward(x, w, out, 1e-6, cb.CudaStream(gpu))
    assert (out.to_numpy() == 3.0).all()  # nothing written
    with pytest.raises(cb.DeviceError):
        cb.GpuBuffer.from_numpy(np.zeros(3, np.float32), gpu, stream=cb.CudaStream("cpu"))


@pytest.mark.gpu
def test_out_of_memory_is_a_clear_error() -> None:
    gpu = cb.Device("cuda:0")
    too_much = gpu.total_memory * 2
    with pytest.raises(cb.OutOfMemoryError, match="asked for") as info:
        cb.GpuBuffer.empty((too_much // 4,), "float32", gpu)
    assert "free" in str(info.value)
    small = cb.GpuBuffer.zeros((16,), "float32", gpu)  # the device is still usable
    assert not small.to_numpy().any()

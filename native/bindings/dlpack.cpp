// Zero-copy exchange with other array libraries: DLPack both ways (__dlpack__, __dlpack_device__,
// GpuBuffer.from_dlpack) and __cuda_array_interface__. Stream ordering: an exporter makes the
// consumer's stream wait for the buffer's stream with an event; an importer passes its stream
// to the producer, which does the same.
#include <pybind11/stl.h>

#include <memory>
#include <optional>

#include "bindings.hpp"
#include "cudablocks/errors.hpp"
#include "dlpack_abi.hpp"

namespace cudablocks::python {

namespace {

// What an exported capsule owns: the buffer (keeping its memory alive) and the shape array.
struct ExportContext {
  Buffer buffer;
  std::vector<std::int64_t> shape;
};

dlpack::DataType dl_dtype(DType dtype) {
  switch (dtype) {
    case DType::Float32: return {dlpack::kFloat, 32, 1};
    case DType::BFloat16: return {dlpack::kBfloat, 16, 1};
    case DType::Float16: return {dlpack::kFloat, 16, 1};
    case DType::UInt8: return {dlpack::kUInt, 8, 1};
    case DType::Int32: return {dlpack::kInt, 32, 1};
  }
  return {dlpack::kFloat, 32, 1};
}

DType from_dl_dtype(const dlpack::DataType& t) {
  if (t.lanes == 1) {
    if (t.code == dlpack::kFloat && t.bits == 32) return DType::Float32;
    if (t.code == dlpack::kBfloat && t.bits == 16) return DType::BFloat16;
    if (t.code == dlpack::kFloat && t.bits == 16) return DType::Float16;
    if (t.code == dlpack::kUInt && t.bits == 8) return DType::UInt8;
    if (t.code == dlpack::kInt && t.bits == 32) return DType::Int32;
  }
  throw DtypeError("DLPack tensor of type code " + std::to_string(t.code) + ", " + std::to_string(t.bits) +
                   " bits, " + std::to_string(t.lanes) + " lanes: buffers hold float32, bfloat16, float16, uint8 or int32");
}

dlpack::Device dl_device(const Device& device) {
  return device.is_cpu() ? dlpack::Device{dlpack::kCPU, 0} : dlpack::Device{dlpack::kCUDA, device.index()};
}

Device from_dl_device(const dlpack::Device& d) {
  if (d.device_type == dlpack::kCPU) return Device();
  if (d.device_type == dlpack::kCUDA) return Device(DeviceType::CUDA, d.device_id);
  throw DeviceError("DLPack device type " + std::to_string(d.device_type) +
                    " is not supported (cudablocks takes CPU or CUDA device memory)");
}

// A consumer's stream argument to a CUDA stream, per the array API: 1 legacy default,
// 2 per-thread default, other values a cudaStream_t. Returns nothing for -1 (no ordering asked).
std::optional<Stream> consumer_stream(const Device& device, const py::object& stream) {
  if (stream.is_none()) return Stream::wrap(device, 0);
  const long long value = stream.cast<long long>();
  if (value == -1) return std::nullopt;
  if (value == 0) throw py::buffer_error("stream 0 is ambiguous for CUDA in DLPack: use 1 (legacy default) or 2 (per-thread)");
  if (value == 1) return Stream::wrap(device, 0);
  return Stream::wrap(device, static_cast<std::uintptr_t>(value));  // 2 is cudaStreamPerThread's handle
}

// Rows of a C-contiguous array: dims of size 1 may carry any stride.
bool is_c_contiguous(const dlpack::Tensor& t) {
  if (t.strides == nullptr) return true;
  std::int64_t expected = 1;
  for (int i = t.ndim - 1; i >= 0; --i) {
    if (t.shape[i] != 1 && t.strides[i] != expected) return false;
    expected *= t.shape[i];
  }
  return true;
}

template <typename Managed>
void fill_tensor(Managed* managed, ExportContext* ctx) {
  dlpack::Tensor& t = managed->dl_tensor;
  t.data = ctx->buffer.data();
  t.device = dl_device(ctx->buffer.device());
  t.ndim = static_cast<std::int32_t>(ctx->shape.size());
  t.dtype = dl_dtype(ctx->buffer.dtype());
  t.shape = ctx->shape.data();
  t.strides = nullptr;
  t.byte_offset = 0;
}

// Both capsule kinds own a ManagedTensor(Versioned) whose manager_ctx is an ExportContext;
// its deleter frees both. The capsule destructor calls it only if no consumer took the tensor.
template <typename Managed>
struct ExportedTensor {
  static void deleter(Managed* self) {
    std::unique_ptr<ExportContext> ctx(static_cast<ExportContext*>(self->manager_ctx));
    std::unique_ptr<Managed> owned(self);
  }
  static void capsule_destructor(PyObject* capsule, const char* name) {
    if (!PyCapsule_IsValid(capsule, name)) return;  // renamed "used_...": the consumer owns it
    auto* managed = static_cast<Managed*>(PyCapsule_GetPointer(capsule, name));
    managed->deleter(managed);
  }
};

void unversioned_capsule_destructor(PyObject* capsule) {
  ExportedTensor<dlpack::ManagedTensor>::capsule_destructor(capsule, "dltensor");
}
void versioned_capsule_destructor(PyObject* capsule) {
  ExportedTensor<dlpack::ManagedTensorVersioned>::capsule_destructor(capsule, "dltensor_versioned");
}

py::object export_dlpack(const PyBuffer& self, const py::object& stream, const py::object& max_version,
                         const py::object& dl_device_arg, const py::object& copy) {
  const Device& device = self.buffer.device();
  if (!copy.is_none() && copy.cast<bool>()) {
    throw py::buffer_error("GpuBuffer.__dlpack__(copy=True) is not supported: export shares memory; copy on the consumer side");
  }
  if (!dl_device_arg.is_none()) {
    auto wanted = dl_device_arg.cast<std::pair<int, int>>();
    if (wanted.first != dl_device(device).device_type || wanted.second != dl_device(device).device_id) {
      throw py::buffer_error("GpuBuffer on " + device.str() + " cannot be exported to another device without a copy");
    }
  }
  if (device.is_cuda()) {
    std::optional<Stream> consumer = consumer_stream(device, stream);
    if (consumer && !(*consumer == self.stream)) {
      Event ready(device);
      self.stream.record(ready);
      consumer->wait(ready);
    }
  } else if (!stream.is_none()) {
    throw py::buffer_error("stream must be None for a CPU buffer");
  }

  auto ctx = std::make_unique<ExportContext>(ExportContext{self.buffer, self.buffer.shape()});
  bool versioned = false;
  if (!max_version.is_none()) versioned = max_version.cast<std::pair<int, int>>().first >= 1;
  if (versioned) {
    auto managed = std::make_unique<dlpack::ManagedTensorVersioned>();
    managed->version = {1, 0};
    managed->flags = 0;
    fill_tensor(managed.get(), ctx.get());
    managed->deleter = &ExportedTensor<dlpack::ManagedTensorVersioned>::deleter;
    managed->manager_ctx = ctx.release();
    PyObject* capsule = PyCapsule_New(managed.get(), "dltensor_versioned", versioned_capsule_destructor);
    if (capsule == nullptr) {
      auto* m = managed.release();
      m->deleter(m);
      throw py::error_already_set();
    }
    managed.release();
    return py::reinterpret_steal<py::object>(capsule);
  }
  auto managed = std::make_unique<dlpack::ManagedTensor>();
  fill_tensor(managed.get(), ctx.get());
  managed->deleter = &ExportedTensor<dlpack::ManagedTensor>::deleter;
  managed->manager_ctx = ctx.release();
  PyObject* capsule = PyCapsule_New(managed.get(), "dltensor", unversioned_capsule_destructor);
  if (capsule == nullptr) {
    auto* m = managed.release();
    m->deleter(m);
    throw py::error_already_set();
  }
  managed.release();
  return py::reinterpret_steal<py::object>(capsule);
}

// Takes ownership of the tensor in `capsule` (renaming it "used_...") into a Buffer.
template <typename Managed>
Buffer adopt(PyObject* capsule, const char* name, const char* used_name) {
  auto* managed = static_cast<Managed*>(PyCapsule_GetPointer(capsule, name));
  if (managed == nullptr) throw py::error_already_set();
  // Hold it with its deleter from here on, so that every error path below releases it.
  std::shared_ptr<void> owner(managed, [](void* p) {
    auto* m = static_cast<Managed*>(p);
    if (m->deleter) m->deleter(m);
  });
  if (PyCapsule_SetName(capsule, used_name) != 0) throw py::error_already_set();
  if constexpr (std::is_same_v<Managed, dlpack::ManagedTensorVersioned>) {
    if (managed->version.major > 1) {
      throw DtypeError("DLPack version " + std::to_string(managed->version.major) + " is newer than this cudablocks reads (1)");
    }
    if (managed->flags & dlpack::kFlagReadOnly) {
      throw InvalidArgumentError("the DLPack tensor is read-only; GpuBuffer memory is writable (pass a writable array)");
    }
  }
  const dlpack::Tensor& t = managed->dl_tensor;
  Device device = from_dl_device(t.device);
  DType dtype = from_dl_dtype(t.dtype);
  Shape shape(t.shape, t.shape + t.ndim);
  if (!is_c_contiguous(t)) {
    throw ShapeError("the DLPack tensor of shape " + shape_str(shape) +
                     " is not C-contiguous: make it contiguous first (e.g. tensor.contiguous())");
  }
  void* data = static_cast<char*>(t.data) + t.byte_offset;
  return Buffer::wrap(data, shape, dtype, device, std::move(owner));
}

PyBuffer import_dlpack(const py::object& obj, const py::object& stream_arg) {
  if (!py::hasattr(obj, "__dlpack__") || !py::hasattr(obj, "__dlpack_device__")) {
    throw DtypeError("from_dlpack expects an object with __dlpack__ and __dlpack_device__ (a torch tensor, CuPy or JAX array, numpy array), got " +
                     std::string(py::str(py::type::of(obj).attr("__name__"))));
  }
  auto dev = obj.attr("__dlpack_device__")().cast<std::pair<int, int>>();
  Device device = from_dl_device({dev.first, dev.second});
  Stream stream = stream_arg.is_none() ? default_stream(device) : stream_arg.cast<Stream>();
  if (stream.device() != device) {
    throw DeviceError("the tensor is on " + device.str() + " but the stream given is on " + stream.device().str());
  }
  py::dict kwargs;
  if (device.is_cuda()) {
    // Our stream's handle as the array API spells it: 1 for the legacy default stream.
    const auto handle = reinterpret_cast<std::uintptr_t>(stream.handle());
    kwargs["stream"] = handle == 0 ? std::uintptr_t{1} : handle;
  }
  py::object capsule;
  try {
    py::dict with_version = kwargs;
    with_version["max_version"] = py::make_tuple(1, 0);
    capsule = obj.attr("__dlpack__")(**with_version);
  } catch (py::error_already_set& e) {
    if (!e.matches(PyExc_TypeError)) throw;
    capsule = obj.attr("__dlpack__")(**kwargs);  // a producer that predates versioned capsules
  }
  PyObject* raw = capsule.ptr();
  if (PyCapsule_IsValid(raw, "dltensor_versioned")) {
    return PyBuffer{adopt<dlpack::ManagedTensorVersioned>(raw, "dltensor_versioned", "used_dltensor_versioned"), stream};
  }
  if (PyCapsule_IsValid(raw, "dltensor")) {
    return PyBuffer{adopt<dlpack::ManagedTensor>(raw, "dltensor", "used_dltensor"), stream};
  }
  throw DtypeError("__dlpack__ returned something that is not an unused DLPack capsule");
}

const char* cuda_array_typestr(DType dtype) {
  switch (dtype) {
    case DType::Float32: return "<f4";
    case DType::Float16: return "<f2";
    case DType::UInt8: return "|u1";
    case DType::Int32: return "<i4";
    case DType::BFloat16: return nullptr;  // no typestr exists; consumers use DLPack
  }
  return nullptr;
}

}  // namespace

void bind_dlpack(py::module_& m, py::class_<PyBuffer>& cls) {
  (void)m;
  cls.def("__dlpack__", &export_dlpack, py::kw_only(), py::arg("stream") = py::none(),
          py::arg("max_version") = py::none(), py::arg("dl_device") = py::none(), py::arg("copy") = py::none(),
          "Exports the buffer as a DLPack capsule (zero copy). `stream` is the consumer's stream, which "
          "is made to wait for this buffer's stream.")
      .def("__dlpack_device__", [](const PyBuffer& self) {
            dlpack::Device d = dl_device(self.buffer.device());
            return py::make_tuple(d.device_type, d.device_id);
          })
      .def_static("from_dlpack", &import_dlpack, py::arg("tensor"), py::arg("stream") = py::none(),
                  "Shares the memory of a DLPack producer (torch, CuPy, JAX, numpy) without a copy. Work "
                  "the producer queued is ordered before `stream` (default: the device's default stream).")
      .def_property_readonly("__cuda_array_interface__", [](const PyBuffer& self) {
            if (!self.buffer.device().is_cuda()) throw py::attribute_error("__cuda_array_interface__ exists only for CUDA buffers");
            const char* typestr = cuda_array_typestr(self.buffer.dtype());
            if (typestr == nullptr) throw py::attribute_error("bfloat16 has no __cuda_array_interface__ type string; use DLPack");
            py::dict cai;
            cai["shape"] = py::tuple(py::cast(self.buffer.shape()));
            cai["typestr"] = typestr;
            cai["data"] = py::make_tuple(reinterpret_cast<std::uintptr_t>(self.buffer.data()), false);
            cai["strides"] = py::none();
            cai["version"] = 3;
            const auto handle = reinterpret_cast<std::uintptr_t>(self.stream.handle());
            cai["stream"] = handle == 0 ? std::uintptr_t{1} : handle;
            return cai;
          });
}

}  // namespace cudablocks::python

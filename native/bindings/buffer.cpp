// GpuBuffer: creation, numpy exchange, fill/copy, views.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include "bindings.hpp"
#include "cudablocks/errors.hpp"

namespace cudablocks::python {

namespace {

Shape to_shape(const py::object& shape) {
  if (py::isinstance<py::int_>(shape)) return {shape.cast<std::int64_t>()};
  return shape.cast<Shape>();
}

py::tuple shape_tuple(const Shape& shape) {
  py::tuple t(shape.size());
  for (std::size_t i = 0; i < shape.size(); ++i) t[i] = shape[i];
  return t;
}

py::dtype numpy_dtype(DType dtype) {
  if (dtype == DType::BFloat16) return py::dtype::from_args(py::module_::import("ml_dtypes").attr("bfloat16"));
  return py::dtype(dtype_name(dtype));
}

// The array behind `obj` with its dtype, or a DtypeError / ShapeError saying how to fix it.
std::pair<py::array, DType> checked_array(const py::object& obj, const char* what) {
  if (!py::isinstance<py::array>(obj)) {
    throw DtypeError(std::string(what) + " expects a numpy.ndarray, got " +
                     std::string(py::str(py::type::of(obj).attr("__name__"))));
  }
  py::array array = obj.cast<py::array>();
  std::string name = py::str(array.dtype().attr("name"));
  DType dtype;
  try {
    dtype = dtype_from_name(name);
  } catch (const DtypeError&) {
    throw DtypeError("unsupported array dtype " + name +
                     ": use float32, bfloat16 (ml_dtypes), float16, uint8 or int32, e.g. a.astype(numpy.float32)");
  }
  if (!(array.flags() & py::array::c_style)) {
    throw ShapeError("array is not C-contiguous (strides " + std::string(py::str(array.attr("strides"))) +
                     "): pass numpy.ascontiguousarray(a)");
  }
  return {array, dtype};
}

PyBuffer from_numpy(const py::object& obj, const Device& device, const py::object& stream_arg) {
  auto [array, dtype] = checked_array(obj, "from_numpy");
  Shape shape(array.shape(), array.shape() + array.ndim());
  Stream stream = stream_arg.is_none() ? default_stream(device) : stream_arg.cast<Stream>();
  if (stream.device() != device) {
    throw DeviceError("from_numpy to " + device.str() + " with a stream of " + stream.device().str());
  }
  PyBuffer result{Buffer::empty(shape, dtype, device), stream};
  const void* src = array.data();
  {
    py::gil_scoped_release release;
    result.buffer.copy_from_host(src, stream);
  }
  return result;
}

// Host to an existing buffer without a new allocation: the per-step uploads of a training loop.
void copy_from_numpy(PyBuffer& self, const py::object& obj, const py::object& stream_arg) {
  auto [array, dtype] = checked_array(obj, "copy_from_numpy");
  if (dtype != self.buffer.dtype()) {
    throw DtypeError("copy_from_numpy: array dtype " + std::string(dtype_name(dtype)) + " into a " +
                     dtype_name(self.buffer.dtype()) + " buffer");
  }
  if (static_cast<std::int64_t>(array.size()) != self.buffer.numel()) {
    throw ShapeError("copy_from_numpy: " + std::to_string(array.size()) + " elements into a buffer of " +
                     std::to_string(self.buffer.numel()) + " (" + self.buffer.describe() + ")");
  }
  Stream stream = stream_or(stream_arg, self);
  const void* src = array.data();
  {
    py::gil_scoped_release release;
    self.buffer.copy_from_host(src, stream);
  }
  self.stream = stream;
}

py::array to_numpy(const PyBuffer& self, const py::object& stream_arg) {
  py::array out(numpy_dtype(self.buffer.dtype()), self.buffer.shape());
  Stream stream = stream_or(stream_arg, self);
  void* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    self.buffer.copy_to_host(dst, stream);
  }
  return out;
}

}  // namespace

void bind_buffer(py::module_& m) {
  py::class_<PyBuffer> cls(m, "GpuBuffer",
                           "A dense row-major array on one device (float32, bfloat16, float16, uint8 or int32).");
  cls.def_static("from_numpy", &from_numpy, py::arg("array"), py::arg("device"), py::arg("stream") = py::none(),
                 "Copies a C-contiguous numpy array to `device` (bfloat16 through ml_dtypes).")
      .def_static("empty", [](const py::object& shape, const std::string& dtype, const Device& device) {
            return PyBuffer{Buffer::empty(to_shape(shape), dtype_from_name(dtype), device), default_stream(device)};
          }, py::arg("shape"), py::arg("dtype") = "float32", py::arg("device") = Device(),
          "Uninitialised memory.")
      .def_static("zeros", [](const py::object& shape, const std::string& dtype, const Device& device, const py::object& stream_arg) {
            Stream stream = stream_arg.is_none() ? default_stream(device) : stream_arg.cast<Stream>();
            if (stream.device() != device) throw DeviceError("zeros on " + device.str() + " with a stream of " + stream.device().str());
            const Shape dims = to_shape(shape);
            py::gil_scoped_release release;
            return PyBuffer{Buffer::zeros(dims, dtype_from_name(dtype), stream), stream};
          }, py::arg("shape"), py::arg("dtype") = "float32", py::arg("device") = Device(), py::arg("stream") = py::none())
      .def("to_numpy", &to_numpy, py::arg("stream") = py::none(),
           "Copies the buffer to a new numpy array once the work queued on `stream` (default: the buffer's) is done.")
      .def("fill", [](PyBuffer& self, double value, const py::object& stream_arg) {
            Stream stream = stream_or(stream_arg, self);
            {
              py::gil_scoped_release release;
              self.buffer.fill(value, stream);
            }
            self.stream = stream;
          }, py::arg("value"), py::arg("stream") = py::none(), "Sets every element to `value`.")
      .def("copy_from", [](PyBuffer& self, const PyBuffer& src, const py::object& stream_arg) {
            Stream stream = stream_or(stream_arg, self);
            {
              py::gil_scoped_release release;
              self.buffer.copy_from(src.buffer, stream);
            }
            self.stream = stream;
          }, py::arg("src"), py::arg("stream") = py::none(),
          "Copies `src` (same dtype and element count, any device) into this buffer.")
      .def("copy_from_numpy", &copy_from_numpy, py::arg("array"), py::arg("stream") = py::none(),
           "Copies a C-contiguous numpy array of this buffer's dtype and element count into it; the array may be "
           "reused on return.")
      .def("view", [](const PyBuffer& self, std::int64_t offset, const py::object& shape) {
            return PyBuffer{self.buffer.view(offset, to_shape(shape)), self.stream};
          }, py::arg("offset"), py::arg("shape"), "A buffer over part of this one's memory, `offset` in elements.")
      .def("reshape", [](const PyBuffer& self, const py::object& shape) {
            return PyBuffer{self.buffer.reshaped(to_shape(shape)), self.stream};
          }, py::arg("shape"))
      .def_property_readonly("shape", [](const PyBuffer& self) { return shape_tuple(self.buffer.shape()); })
      .def_property_readonly("dtype", [](const PyBuffer& self) { return dtype_name(self.buffer.dtype()); })
      .def_property_readonly("device", [](const PyBuffer& self) { return self.buffer.device(); })
      .def_property_readonly("ndim", [](const PyBuffer& self) { return self.buffer.ndim(); })
      .def_property_readonly("numel", [](const PyBuffer& self) { return self.buffer.numel(); })
      .def_property_readonly("nbytes", [](const PyBuffer& self) { return self.buffer.nbytes(); })
      .def_property_readonly("data_ptr", [](const PyBuffer& self) { return reinterpret_cast<std::uintptr_t>(self.buffer.data()); })
      .def_property("stream", [](const PyBuffer& self) { return self.stream; },
                    [](PyBuffer& self, const Stream& s) {
                      if (s.device() != self.buffer.device()) throw DeviceError("a buffer on " + self.buffer.device().str() + " cannot take a stream of " + s.device().str());
                      self.stream = s;
                    },
                    "The stream this buffer's latest writes were queued on; DLPack consumers wait for it.")
      .def("__len__", [](const PyBuffer& self) {
            if (self.buffer.ndim() == 0) throw py::type_error("len() of a 0-d buffer");
            return self.buffer.shape()[0];
          })
      .def("__repr__", [](const PyBuffer& self) { return "GpuBuffer(" + self.buffer.describe() + ")"; });
  bind_dlpack(m, cls);
}

}  // namespace cudablocks::python

#include "bindings.hpp"

#include <string>

#include "cudablocks/errors.hpp"

namespace cudablocks::python {

Stream default_stream(const Device& device) { return Stream::wrap(device, 0); }

Stream stream_or(const py::object& stream, const PyBuffer& buffer) {
  if (stream.is_none()) return buffer.stream;
  return stream.cast<Stream>();
}

std::uint64_t to_uint64(const py::handle& value, const char* what) {
  const auto bad = [&] {
    return InvalidArgumentError(std::string(what) + " must be an int in [0, 2^64), got " +
                                std::string(py::repr(value)));
  };
  if (py::isinstance<py::bool_>(value) || !PyIndex_Check(value.ptr())) throw bad();
  const py::int_ index = py::reinterpret_steal<py::int_>(PyNumber_Index(value.ptr()));
  if (index.ptr() == nullptr) throw py::error_already_set();
  const unsigned long long v = PyLong_AsUnsignedLongLong(index.ptr());
  if (PyErr_Occurred()) {  // negative or too large
    PyErr_Clear();
    throw bad();
  }
  return static_cast<std::uint64_t>(v);
}

}  // namespace cudablocks::python

PYBIND11_MODULE(_core, m) {
  namespace cp = cudablocks::python;
  m.doc() = "cudablocks native core (C++/CUDA); use the cudablocks package rather than this module";
  cp::bind_errors(m);
  cp::bind_device(m);
  cp::bind_buffer(m);
  cp::bind_ops(m);
  cp::bind_block(m);
  cp::bind_nf4(m);
}

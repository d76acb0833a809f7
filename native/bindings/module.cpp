#include "bindings.hpp"

namespace cudablocks::python {

Stream default_stream(const Device& device) { return Stream::wrap(device, 0); }

Stream stream_or(const py::object& stream, const PyBuffer& buffer) {
  if (stream.is_none()) return buffer.stream;
  return stream.cast<Stream>();
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

// Buffer-level ops. Outputs remember the stream they were written on.
#include "bindings.hpp"
#include "cudablocks/ops.hpp"

namespace cudablocks::python {

void bind_ops(py::module_& m) {
  m.def("rmsnorm_forward", [](const PyBuffer& x, const PyBuffer& w, PyBuffer& out, float eps, const py::object& stream_arg) {
        Stream stream = stream_or(stream_arg, out);
        {
          py::gil_scoped_release release;
          rmsnorm_forward(x.buffer, w.buffer, out.buffer, eps, stream);
        }
        out.stream = stream;
      }, py::arg("x"), py::arg("weight"), py::arg("out"), py::arg("eps") = 1e-6f, py::arg("stream") = py::none(),
      "out = x * rsqrt(mean(x**2, axis=-1) + eps) * weight for float32 x, out [rows, cols] and weight [cols].");
}

}  // namespace cudablocks::python

// Buffer-level ops. Outputs remember the stream they were written on.
#include "bindings.hpp"
#include "cudablocks/block.hpp"
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
  m.def("gemm", [](const PyBuffer& a, const PyBuffer& b, PyBuffer& out, bool trans_b, float beta,
                    const std::string& precision, const py::object& stream_arg) {
        const Precision prec = precision_from_name(precision);
        Stream stream = stream_or(stream_arg, out);
        {
          py::gil_scoped_release release;
          gemm(a.buffer, b.buffer, out.buffer, trans_b, beta, prec, stream);
        }
        out.stream = stream;
      }, py::arg("a"), py::arg("b"), py::arg("out"), py::arg("trans_b") = false, py::arg("beta") = 0.0f,
      py::arg("precision") = "fp32", py::arg("stream") = py::none(),
      "out = a @ (b.T if trans_b else b) + beta * out. a, b float32 (precision \"fp32\", \"tf32\" or \"bf16\": "
      "cuBLAS's fp32-buffer modes) or both bfloat16 (bf16 tensor cores, precision \"bf16\"); out float32.");
}

}  // namespace cudablocks::python

// NF4 (bitsandbytes' 4-bit format) ops on buffers; cudablocks.nf4 builds its API on these.
#include <pybind11/numpy.h>

#include "bindings.hpp"
#include "core/nf4_format.hpp"
#include "cudablocks/nf4.hpp"

namespace cudablocks::python {

void bind_nf4(py::module_& m) {
  m.def("nf4_code", [] {
        py::array_t<float> a(16);
        for (int i = 0; i < 16; ++i) a.mutable_at(i) = nf4::kCode[i];
        return a;
      }, "The 16 NF4 code values (bitsandbytes' quant_map), float32.");
  m.def("nf4_dynamic_map", [] {
        py::array_t<float> a(256);
        for (int i = 0; i < 256; ++i) a.mutable_at(i) = nf4::dynamic_map(i);
        return a;
      }, "bitsandbytes' create_dynamic_map(signed=True): the 8-bit map of double quantization, float32.");
  m.def("nf4_valid_blocksize", &nf4_valid_blocksize, py::arg("blocksize"));
  m.def("nf4_quantize", [](const PyBuffer& x, std::int64_t blocksize, PyBuffer& packed, PyBuffer& absmax,
                           const py::object& stream_arg) {
        run_queued(stream_arg, {&packed, &absmax}, [&](const Stream& stream) {
          nf4_quantize(x.buffer, blocksize, packed.buffer, absmax.buffer, stream);
        });
      }, py::arg("x"), py::arg("blocksize"), py::arg("packed"), py::arg("absmax"), py::arg("stream") = py::none(),
      "NF4-quantizes x into packed (uint8, (n+1)//2 elements) and absmax (float32, ceil(n/blocksize)).");
  m.def("nf4_dequantize", [](const PyBuffer& packed, const PyBuffer& absmax, std::int64_t blocksize, PyBuffer& out,
                             const py::object& stream_arg) {
        run_queued(stream_arg, {&out}, [&](const Stream& stream) {
          nf4_dequantize(packed.buffer, absmax.buffer, blocksize, out.buffer, stream);
        });
      }, py::arg("packed"), py::arg("absmax"), py::arg("blocksize"), py::arg("out"), py::arg("stream") = py::none(),
      "out = code[nibble] * absmax[i // blocksize], rounded once to out's dtype.");
  m.def("nf4_double_quantize", [](const PyBuffer& absmax, const PyBuffer& code, PyBuffer& offset, bool compute_offset,
                                  PyBuffer& qabsmax, PyBuffer& absmax2, const py::object& stream_arg) {
        run_queued(stream_arg, {&qabsmax, &offset, &absmax2}, [&](const Stream& stream) {
          nf4_double_quantize(absmax.buffer, code.buffer, offset.buffer, compute_offset, qabsmax.buffer,
                              absmax2.buffer, stream);
        });
      }, py::arg("absmax"), py::arg("code"), py::arg("offset"), py::arg("compute_offset"), py::arg("qabsmax"),
      py::arg("absmax2"), py::arg("stream") = py::none(),
      "8-bit blockwise (256) quantization of absmax - offset; offset = mean(absmax) when compute_offset.");
  m.def("nf4_double_dequantize", [](const PyBuffer& qabsmax, const PyBuffer& absmax2, const PyBuffer& offset,
                                    const PyBuffer& code, PyBuffer& absmax, const py::object& stream_arg) {
        run_queued(stream_arg, {&absmax}, [&](const Stream& stream) {
          nf4_double_dequantize(qabsmax.buffer, absmax2.buffer, offset.buffer, code.buffer, absmax.buffer, stream);
        });
      }, py::arg("qabsmax"), py::arg("absmax2"), py::arg("offset"), py::arg("code"), py::arg("absmax"),
      py::arg("stream") = py::none(), "absmax = code[qabsmax] * absmax2[i // 256] + offset.");
}

}  // namespace cudablocks::python

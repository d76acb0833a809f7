// The pybind11 module cudablocks._core: thin glue over the C++ API. Each file binds one area.
#pragma once

#include <initializer_list>

#include <pybind11/pybind11.h>

#include "cudablocks/buffer.hpp"
#include "cudablocks/optimizer.hpp"
#include "cudablocks/stream.hpp"

namespace cudablocks::python {

namespace py = pybind11;

// What Python sees as GpuBuffer: the buffer, and the stream its latest writes were queued on,
// so that DLPack and __cuda_array_interface__ consumers can order their reads after them.
struct PyBuffer {
  Buffer buffer;
  Stream stream;
};

// The stream to run on: the one given, else the buffer's own.
Stream stream_or(const py::object& stream, const PyBuffer& buffer);

// Runs `op(stream)` with the GIL released on `stream_arg`, or else on the first output's stream,
// then records that stream on every output (nullptr entries, optional outputs not given, are
// skipped): the common body of a binding that queues an op.
template <class Op>
void run_queued(const py::object& stream_arg, std::initializer_list<PyBuffer*> outputs, Op&& op) {
  const Stream stream = stream_or(stream_arg, **outputs.begin());
  {
    py::gil_scoped_release release;
    op(stream);
  }
  for (PyBuffer* out : outputs) {
    if (out != nullptr) out->stream = stream;
  }
}
// The default stream of a device: the legacy default stream on CUDA, inline on the CPU.
Stream default_stream(const Device& device);

// The hyperparameters of an optimizer call (the block steps and ops.adamw_step), validated
// before anything runs.
inline AdamWHyper adamw_hyper(std::int64_t step, float lr, float beta1, float beta2, float eps, float weight_decay,
                              float max_grad_norm) {
  AdamWHyper hyper;
  hyper.lr = lr;
  hyper.beta1 = beta1;
  hyper.beta2 = beta2;
  hyper.eps = eps;
  hyper.weight_decay = weight_decay;
  hyper.step = step;
  hyper.max_grad_norm = max_grad_norm;
  validate(hyper);
  return hyper;
}

// A Python int in [0, 2^64) (numpy integers included) as uint64; InvalidArgumentError naming
// `what` otherwise (pybind11's own cast would give a TypeError about the signature).
std::uint64_t to_uint64(const py::handle& value, const char* what);

void bind_errors(py::module_& m);
void bind_device(py::module_& m);
void bind_buffer(py::module_& m);
void bind_dlpack(py::module_& m, py::class_<PyBuffer>& buffer_class);
void bind_ops(py::module_& m);
void bind_block(py::module_& m);
void bind_nf4(py::module_& m);

}  // namespace cudablocks::python

// Buffer-level ops. Outputs remember the stream they were written on.
#include <cmath>
#include <string>

#include "bindings.hpp"
#include "cudablocks/block.hpp"
#include "cudablocks/errors.hpp"
#include "cudablocks/ops.hpp"

namespace cudablocks::python {

namespace {

PoolMode pool_mode_from_name(const std::string& name) {
  if (name == "last") return PoolMode::Last;
  if (name == "mean") return PoolMode::Mean;
  throw InvalidArgumentError("pool mode must be \"last\" or \"mean\", got \"" + name + "\"");
}

Buffer* optional_buffer(PyBuffer* b) { return b != nullptr ? &b->buffer : nullptr; }

}  // namespace

void bind_ops(py::module_& m) {
  m.def("rmsnorm_forward", [](const PyBuffer& x, const PyBuffer& w, PyBuffer& out, float eps,
                              const py::object& stream_arg, PyBuffer* rstd) {
        run_queued(stream_arg, {&out, rstd}, [&](const Stream& stream) {
          rmsnorm_forward(x.buffer, w.buffer, out.buffer, eps, stream, optional_buffer(rstd));
        });
      }, py::arg("x"), py::arg("weight"), py::arg("out"), py::arg("eps") = 1e-6f, py::arg("stream") = py::none(),
      py::kw_only(), py::arg("rstd") = nullptr,
      "out = x * rsqrt(mean(x**2, axis=-1) + eps) * weight for float32 x, out [rows, cols] and weight [cols]. "
      "rstd (float32 [rows]), when given, receives rsqrt(mean(x**2) + eps) per row for rmsnorm_backward.");
  m.def("rmsnorm_backward", [](const PyBuffer& dy, const PyBuffer& x, const PyBuffer& w, const PyBuffer& rstd,
                               PyBuffer& dx, PyBuffer& dw, bool accumulate_dx, const py::object& stream_arg) {
        run_queued(stream_arg, {&dx, &dw}, [&](const Stream& stream) {
          rmsnorm_backward(dy.buffer, x.buffer, w.buffer, rstd.buffer, dx.buffer, dw.buffer, accumulate_dx, stream);
        });
      }, py::arg("dy"), py::arg("x"), py::arg("weight"), py::arg("rstd"), py::arg("dx"), py::arg("dweight"),
      py::arg("accumulate_dx") = false, py::arg("stream") = py::none(),
      "The backward of rmsnorm_forward, given dy [rows, cols] and the forward's x and rstd [rows]: dx = dL/dx is "
      "written (added to dx when accumulate_dx), and dL/dweight is ADDED to dweight [cols] (zero it first for a "
      "plain gradient). All float32.");
  m.def("gemm", [](const PyBuffer& a, const PyBuffer& b, PyBuffer& out, bool trans_b, float beta,
                    const std::string& precision, const py::object& stream_arg, bool trans_a) {
        const Precision prec = precision_from_name(precision);
        run_queued(stream_arg, {&out}, [&](const Stream& stream) {
          gemm(a.buffer, b.buffer, out.buffer, trans_a, trans_b, beta, prec, stream);
        });
      }, py::arg("a"), py::arg("b"), py::arg("out"), py::arg("trans_b") = false, py::arg("beta") = 0.0f,
      py::arg("precision") = "fp32", py::arg("stream") = py::none(), py::kw_only(), py::arg("trans_a") = false,
      "out = (a.T if trans_a else a) @ (b.T if trans_b else b) + beta * out. a, b float32 (precision \"fp32\", "
      "\"tf32\" or \"bf16\": cuBLAS's fp32-buffer modes) or both bfloat16 (bf16 tensor cores, precision \"bf16\"); "
      "out float32, or bfloat16 with bfloat16 operands (the fp32 sum rounded to bf16; beta 0 or 1, and with beta 1 "
      "CUDA may round the product to bf16 before adding out). trans_a gives weight gradients: dW = dY^T X is "
      "gemm(dY, X, dW, trans_a=True).");

  m.def("dropout", [](const PyBuffer& x, PyBuffer& out, double p, const py::object& key, bool accumulate,
                      const py::object& stream_arg) {
        const std::uint64_t k = to_uint64(key, "dropout key");
        run_queued(stream_arg, {&out}, [&](const Stream& stream) {
          dropout(x.buffer, out.buffer, p, k, accumulate, stream);
        });
      }, py::arg("x"), py::arg("out"), py::arg("p"), py::arg("key"), py::kw_only(), py::arg("accumulate") = false,
      py::arg("stream") = py::none(),
      "LoRA dropout (inverted, as PEFT's): out = x * mask / (1 - p), or out += that with accumulate, for float32 x "
      "and out of one shape (out may be x). The mask keeps element i (flat index) when the high 32 bits of "
      "splitmix64's i-th output from `key` are >= floor(p * 2^32): the same bits on every backend (the hash is "
      "documented in cudablocks.lora). p in [0, 1), key an int in [0, 2^64).");

  m.def("embedding_forward", [](const PyBuffer& ids, const PyBuffer& table, PyBuffer& out,
                                const py::object& stream_arg) {
        run_queued(stream_arg, {&out}, [&](const Stream& stream) {
          embedding_forward(ids.buffer, table.buffer, out.buffer, stream);
        });
      }, py::arg("ids"), py::arg("table"), py::arg("out"), py::arg("stream") = py::none(),
      "out[t] = float32(table[ids[t]]) for ids int32 [T], table float32 or bfloat16 [V, H], out float32 [T, H]. "
      "An id outside [0, V) raises InvalidArgumentError on the CPU and gives a zero row on CUDA (check ids on the "
      "host first).");
  m.def("embedding_backward", [](const PyBuffer& grad_out, const PyBuffer& rows, const PyBuffer& offsets,
                                 const PyBuffer& order, PyBuffer& grad_table, const py::object& stream_arg) {
        run_queued(stream_arg, {&grad_table}, [&](const Stream& stream) {
          embedding_backward(grad_out.buffer, rows.buffer, offsets.buffer, order.buffer, grad_table.buffer, stream);
        });
      }, py::arg("grad_out"), py::arg("rows"), py::arg("offsets"), py::arg("order"), py::arg("grad_table"),
      py::arg("stream") = py::none(),
      "Deterministic scatter-add: grad_table[rows[u]] += sum(grad_out[order[j]] for j in range(offsets[u], "
      "offsets[u + 1])), summed in float32 in that order (both backends give the same bits). grad_out float32 "
      "[T, H], grad_table float32 [V, H]; rows (distinct), offsets and order int32 from embedding_backward_index. "
      "Invalid indices raise InvalidArgumentError on the CPU and are skipped on CUDA.");
  m.def("pool_forward", [](const PyBuffer& x, const PyBuffer& cu_seqlens, PyBuffer& out, const std::string& mode,
                           const py::object& stream_arg) {
        const PoolMode pool_mode = pool_mode_from_name(mode);
        run_queued(stream_arg, {&out}, [&](const Stream& stream) {
          pool_forward(x.buffer, cu_seqlens.buffer, out.buffer, pool_mode, stream);
        });
      }, py::arg("x"), py::arg("cu_seqlens"), py::arg("out"), py::arg("mode") = "last", py::arg("stream") = py::none(),
      "One row per packed sequence: x float32 [T, H], cu_seqlens int32 [B + 1] (0, ..., T; every sequence at least "
      "one token), out float32 [B, H]. mode \"last\": the sequence's last token (as transformers' sequence "
      "classifiers pool); \"mean\": the mean of its tokens. Bad cu_seqlens raise InvalidArgumentError on the CPU "
      "and give zero rows on CUDA.");
  m.def("pool_backward", [](const PyBuffer& dout, const PyBuffer& cu_seqlens, PyBuffer& dx, const std::string& mode,
                            const py::object& stream_arg) {
        const PoolMode pool_mode = pool_mode_from_name(mode);
        run_queued(stream_arg, {&dx}, [&](const Stream& stream) {
          pool_backward(dout.buffer, cu_seqlens.buffer, dx.buffer, pool_mode, stream);
        });
      }, py::arg("dout"), py::arg("cu_seqlens"), py::arg("dx"), py::arg("mode") = "last",
      py::arg("stream") = py::none(),
      "The backward of pool_forward: every row of dx float32 [T, H] is written, from dout float32 [B, H] (\"last\": "
      "dout[b] in the last row of sequence b, zeros elsewhere; \"mean\": dout[b] / len_b in each of its rows).");
  m.def("cross_entropy", [](const PyBuffer& logits, const PyBuffer& labels, PyBuffer& loss_sum, PyBuffer* dlogits,
                            PyBuffer* probs, const PyBuffer* class_weights, float grad_scale,
                            const py::object& stream_arg) {
        run_queued(stream_arg, {&loss_sum, dlogits, probs}, [&](const Stream& stream) {
          cross_entropy(logits.buffer, labels.buffer, loss_sum.buffer, optional_buffer(dlogits), optional_buffer(probs),
                        class_weights != nullptr ? &class_weights->buffer : nullptr, grad_scale, stream);
        });
      }, py::arg("logits"), py::arg("labels"), py::arg("loss_sum"), py::arg("dlogits") = nullptr,
      py::arg("probs") = nullptr, py::arg("class_weights") = nullptr, py::arg("grad_scale") = 1.0f,
      py::arg("stream") = py::none(),
      "Weighted softmax cross-entropy of logits float32 [B, C] against labels int32 [B] with w = class_weights "
      "float32 [C] (None: ones), in float32 with max subtraction. loss_sum float32 [1] is ACCUMULATED: += "
      "sum_i w[y_i] * (logsumexp(logits_i) - logits_i[y_i]), deterministically. dlogits [B, C], when given, is "
      "written with grad_scale * w[y_i] * (softmax(logits_i) - onehot(y_i)); probs [B, C] with softmax(logits_i). "
      "With grad_scale = 1 / sum of w[y] over all the micro-batches of a step, the accumulated gradients are those "
      "of torch's weighted-mean CrossEntropyLoss. A label outside [0, C) raises InvalidArgumentError on the CPU; "
      "on CUDA the row contributes nothing.");

  m.def("adamw_step", [](PyBuffer& param, const PyBuffer& grad, PyBuffer& exp_avg, PyBuffer& exp_avg_sq,
                         std::int64_t step, float lr, float beta1, float beta2, float eps, float weight_decay,
                         const py::object& stream_arg, const GradNorm* grad_norm, float max_grad_norm) {
        const AdamWHyper hyper = adamw_hyper(step, lr, beta1, beta2, eps, weight_decay, max_grad_norm);
        run_queued(stream_arg, {&param, &exp_avg, &exp_avg_sq}, [&](const Stream& stream) {
          adamw_step(param.buffer, grad.buffer, exp_avg.buffer, exp_avg_sq.buffer, hyper,
                     grad_norm != nullptr ? &grad_norm->sum_squares() : nullptr, stream);
        });
      }, py::arg("param"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("step"), py::arg("lr"),
      py::arg("beta1") = 0.9f, py::arg("beta2") = 0.999f, py::arg("eps") = 1e-8f, py::arg("weight_decay") = 0.01f,
      py::arg("stream") = py::none(), py::kw_only(), py::arg("grad_norm") = nullptr,
      py::arg("max_grad_norm") = INFINITY,
      "One AdamW step in place, exactly as torch.optim.AdamW (step counts from 1), over float32 buffers of equal "
      "element count (param, its gradient and the two moments, zeros before step 1; each starting on a 16-byte "
      "boundary). With grad_norm (a GradNorm computed over every gradient of the step) the gradient is clipped to "
      "max_grad_norm as the block optimizer_step does, and a non-finite norm skips the step.");
}

}  // namespace cudablocks::python

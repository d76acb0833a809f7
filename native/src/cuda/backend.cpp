// The CUDA backend: forwards each op to its kernels in this folder, on the stream's handle.
#include <cuda_runtime.h>

#include <stdexcept>

#include "core/backends.hpp"
#include "cuda/adamw.cuh"
#include "cuda/attention.cuh"
#include "cuda/bias.cuh"
#include "cuda/elementwise.cuh"
#include "cuda/fill.cuh"
#include "cuda/gemm.cuh"
#include "cuda/qk_norm_rope.cuh"
#include "cuda/rmsnorm.cuh"
#include "cuda/swiglu.cuh"
#include "cudablocks/errors.hpp"

namespace cudablocks {

namespace {

cudaStream_t native(const Stream& stream) { return static_cast<cudaStream_t>(stream.handle()); }

// The attention kernels report with standard exceptions; give callers the library's classes
// (InvalidArgumentError, CudaError) like every other op.
template <typename F>
decltype(auto) attention_call(F&& f) {
  try {
    return f();
  } catch (const Error&) {
    throw;
  } catch (const std::invalid_argument& e) {
    throw InvalidArgumentError(e.what());
  } catch (const std::runtime_error& e) {
    throw CudaError(e.what());
  }
}

class CudaBackend final : public Backend {
 public:
  const char* name() const override { return "cuda"; }

  void fill(void* data, std::size_t count, std::size_t element_size, std::uint32_t bits,
            const Stream& stream) const override {
    cuda::fill(data, count, element_size, bits, native(stream));
  }

  void rmsnorm_forward(const float* x, const float* w, float* y, float* rstd, std::int64_t rows,
                       std::int64_t cols, float eps, const Stream& stream) const override {
    cuda::rmsnorm_forward(x, w, y, rstd, rows, cols, eps, native(stream));
  }

  void rmsnorm_backward(const float* dy, const float* x, const float* w, const float* rstd, float* dx, float* dw,
                        std::int64_t rows, std::int64_t cols, bool accumulate_dx, const Stream& stream) const override {
    cuda::rmsnorm_backward(dy, x, w, rstd, dx, dw, rows, cols, accumulate_dx, native(stream));
  }

  void gemm(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha, const float* a,
            const float* b, float beta, float* c, Precision precision, const Stream& stream) const override {
    cuda::gemm(trans_a, trans_b, m, n, k, alpha, a, b, beta, c, precision, native(stream));
  }

  void add_bias(float* y, const float* bias, std::int64_t rows, std::int64_t cols,
                const Stream& stream) const override {
    cuda::add_bias(y, bias, rows, cols, native(stream));
  }

  void bias_backward(const float* dy, float* dbias, std::int64_t rows, std::int64_t cols,
                     const Stream& stream) const override {
    cuda::bias_backward(dy, dbias, rows, cols, native(stream));
  }

  void add(const float* a, const float* b, float* out, std::int64_t n, const Stream& stream) const override {
    cuda::add(a, b, out, n, native(stream));
  }

  void qk_norm_rope_forward(const float* x, const float* w, float* y, float* rstd, const std::int32_t* positions,
                            std::int64_t tokens, int n_heads, int head_dim, float eps, float theta,
                            const Stream& stream) const override {
    cuda::qk_norm_rope_forward(x, w, y, rstd, positions, tokens, n_heads, head_dim, eps, theta, native(stream));
  }

  void qk_norm_rope_backward(const float* dy, const float* x, const float* w, const float* rstd, float* dx, float* dw,
                             const std::int32_t* positions, std::int64_t tokens, int n_heads, int head_dim, float theta,
                             const Stream& stream) const override {
    cuda::qk_norm_rope_backward(dy, x, w, rstd, dx, dw, positions, tokens, n_heads, head_dim, theta, native(stream));
  }

  void swiglu_forward(const float* gate_up, float* out, std::int64_t rows, std::int64_t cols,
                      const Stream& stream) const override {
    cuda::swiglu_forward(gate_up, out, rows, cols, native(stream));
  }

  void swiglu_backward(const float* dout, const float* gate_up, float* d_gate_up, std::int64_t rows, std::int64_t cols,
                       const Stream& stream) const override {
    cuda::swiglu_backward(dout, gate_up, d_gate_up, rows, cols, native(stream));
  }

  void attention_forward(const float* q, const float* k, const float* v, float* out, float* lse,
                         const std::int32_t* cu_seqlens, int n_seqs, int max_seqlen, std::int64_t tokens,
                         int n_q_heads, int n_kv_heads, int head_dim, float scale,
                         const Stream& stream) const override {
    attention_call([&] {
      cuda::attention_forward(q, k, v, out, lse, cu_seqlens, n_seqs, max_seqlen, tokens, n_q_heads, n_kv_heads,
                              head_dim, scale, native(stream));
    });
  }

  std::int64_t attention_workspace_floats(std::int64_t tokens, int n_q_heads, int n_kv_heads,
                                          int head_dim) const override {
    return attention_call(
        [&] { return cuda::attention_backward_workspace_floats(tokens, n_q_heads, n_kv_heads, head_dim); });
  }

  void attention_backward(const float* q, const float* k, const float* v, const float* out, const float* dout,
                          const float* lse, float* dq, float* dk, float* dv, float* workspace,
                          const std::int32_t* cu_seqlens, int n_seqs, int max_seqlen, std::int64_t tokens,
                          int n_q_heads, int n_kv_heads, int head_dim, float scale,
                          const Stream& stream) const override {
    attention_call([&] {
      cuda::attention_backward(q, k, v, out, dout, lse, dq, dk, dv, workspace, cu_seqlens, n_seqs, max_seqlen, tokens,
                               n_q_heads, n_kv_heads, head_dim, scale, native(stream));
    });
  }

  void adamw_step(float* param, const float* grad, float* exp_avg, float* exp_avg_sq, std::int64_t n,
                  const AdamWHyper& hyper, const float* grad_sum_squares, const Stream& stream) const override {
    cuda::adamw_step(param, grad, exp_avg, exp_avg_sq, n, hyper, grad_sum_squares, native(stream));
  }

  void sum_squares(const float* x, std::int64_t n, float* out, bool accumulate, const Stream& stream) const override {
    cuda::sum_squares(x, n, out, accumulate, native(stream));
  }
};

}  // namespace

const Backend& cuda_backend() {
  static const CudaBackend backend;
  return backend;
}

}  // namespace cudablocks

// Softmax cross-entropy of the classifier's logits: loss, gradient and probabilities in one pass.
//
// Tiny next to the model (batch rows of a few classes), so the kernels aim at clarity and
// determinism: one warp per row computes the row max, the sum of exp(logit - max) (fp32, max
// subtracted: no overflow), the row's loss into scratch and its dlogits / probs; then one block
// adds the row losses in a fixed order into loss_sum. No atomics: the same bits on every run.
#include "cuda/block_reduce.cuh"
#include "cuda/check.hpp"
#include "cuda/cross_entropy.cuh"
#include "cuda/scratch.hpp"


namespace cudablocks::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerBlock = kThreads / 32;

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Row i = one warp: row_loss[i] = w[y] * (log(sum exp(x - max)) - (x[y] - max)) and the row's
// dlogits and probs. A label out of range gives row_loss 0 and a zero dlogits row.
__global__ void __launch_bounds__(kThreads) cross_entropy_rows_kernel(
    const float* __restrict__ logits, const std::int32_t* __restrict__ labels, const float* __restrict__ class_weights,
    float* __restrict__ row_loss, float* __restrict__ dlogits, float* __restrict__ probs, float grad_scale,
    std::int64_t batch, std::int64_t classes) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= batch) return;  // a whole warp leaves together: the shuffles below stay full-warp
  const float* x = logits + i * classes;
  float row_max = -INFINITY;
  for (std::int64_t c = lane; c < classes; c += 32) row_max = fmaxf(row_max, x[c]);
  row_max = warp_max(row_max);
  float sum_exp = 0.0f;
  for (std::int64_t c = lane; c < classes; c += 32) sum_exp += expf(x[c] - row_max);
  sum_exp = warp_sum(sum_exp);

  const std::int64_t y = labels[i];
  const bool valid = 0 <= y && y < classes;
  const float w = !valid ? 0.0f : class_weights != nullptr ? class_weights[y] : 1.0f;
  // log(sum) - (x[y] - max) rather than max + log(sum) - x[y]: no cancellation of large logits.
  if (lane == 0) row_loss[i] = valid ? w * (logf(sum_exp) - (x[y] - row_max)) : 0.0f;
  for (std::int64_t c = lane; c < classes; c += 32) {
    const float p = expf(x[c] - row_max) / sum_exp;
    if (probs != nullptr) probs[i * classes + c] = p;
    if (dlogits != nullptr) dlogits[i * classes + c] = grad_scale * w * (p - (c == y ? 1.0f : 0.0f));
  }
}

// *loss_sum += the sum of row_loss[0, batch), each thread a fixed stride, then a fixed tree.
__global__ void __launch_bounds__(kThreads) sum_rows_kernel(const float* __restrict__ row_loss, std::int64_t batch,
                                                            float* __restrict__ loss_sum) {
  double sum = 0.0;
  for (std::int64_t i = threadIdx.x; i < batch; i += kThreads) sum += row_loss[i];
  sum = block_sum<kThreads>(sum);
  if (threadIdx.x == 0) *loss_sum = static_cast<float>(*loss_sum + sum);
}

}  // namespace

void cross_entropy(const float* logits, const std::int32_t* labels, const float* class_weights, float* loss_sum,
                   float* dlogits, float* probs, float grad_scale, std::int64_t batch, std::int64_t classes,
                   cudaStream_t stream) {
  if (batch == 0) return;
  ScratchLease scratch(sizeof(float) * static_cast<std::size_t>(batch), stream);
  const auto blocks = static_cast<unsigned>((batch + kRowsPerBlock - 1) / kRowsPerBlock);
  cross_entropy_rows_kernel<<<blocks, kThreads, 0, stream>>>(logits, labels, class_weights, scratch.get<float>(),
                                                             dlogits, probs, grad_scale, batch, classes);
  CUDABLOCKS_CHECK_LAUNCH("cross_entropy_rows_kernel");
  sum_rows_kernel<<<1, kThreads, 0, stream>>>(scratch.get<float>(), batch, loss_sum);
  CUDABLOCKS_CHECK_LAUNCH("sum_rows_kernel");
}

}  // namespace cudablocks::cuda

#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace cudablocks::cuda {

// For logits [batch, classes], labels [batch] and w = class_weights [classes] (nullptr: ones):
//   *loss_sum += sum_i w[y_i] * (logsumexp(logits_i) - logits_i[y_i])   (fixed order: deterministic)
//   dlogits_i  = grad_scale * w[y_i] * (softmax(logits_i) - onehot(y_i))   (dlogits optional)
//   probs_i    = softmax(logits_i)                                       (probs optional)
// A label outside [0, classes) contributes nothing: zero loss and a zero dlogits row.
// Uses per-stream scratch (cuda/scratch.hpp) for the per-row losses.
void cross_entropy(const float* logits, const std::int32_t* labels, const float* class_weights, float* loss_sum,
                   float* dlogits, float* probs, float grad_scale, std::int64_t batch, std::int64_t classes,
                   cudaStream_t stream);

}  // namespace cudablocks::cuda

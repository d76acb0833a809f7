// Weighted softmax cross-entropy of a classifier's logits, CPU reference.
#pragma once

#include <cstdint>

namespace cudablocks::cpu {

// For logits [batch, classes], labels [batch] and w = class_weights [classes] (nullptr: ones):
//   *loss_sum += sum_i w[y_i] * (logsumexp(logits_i) - logits_i[y_i])
//   dlogits_i  = grad_scale * w[y_i] * (softmax(logits_i) - onehot(y_i))   (dlogits optional)
//   probs_i    = softmax(logits_i)                                       (probs optional)
// Row sums in double (the reference side of comparisons). Throws InvalidArgumentError for a
// label outside [0, classes), before writing anything.
void cross_entropy(const float* logits, const std::int32_t* labels, const float* class_weights, float* loss_sum,
                   float* dlogits, float* probs, float grad_scale, std::int64_t batch, std::int64_t classes);

}  // namespace cudablocks::cpu

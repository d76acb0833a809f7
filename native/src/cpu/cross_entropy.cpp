#include "cpu/cross_entropy.hpp"

#include <algorithm>
#include <cmath>
#include <string>

#include "cudablocks/errors.hpp"

namespace cudablocks::cpu {

void cross_entropy(const float* logits, const std::int32_t* labels, const float* class_weights, float* loss_sum,
                   float* dlogits, float* probs, float grad_scale, std::int64_t batch, std::int64_t classes) {
  for (std::int64_t i = 0; i < batch; ++i) {
    if (labels[i] < 0 || labels[i] >= classes) {
      throw InvalidArgumentError("labels[" + std::to_string(i) + "] = " + std::to_string(labels[i]) +
                                 " is outside [0, " + std::to_string(classes) + ")");
    }
  }
  double total = 0.0;
  for (std::int64_t i = 0; i < batch; ++i) {
    const float* row = logits + i * classes;
    const std::int32_t y = labels[i];
    const double w = class_weights != nullptr ? class_weights[y] : 1.0;
    // Subtracting the row max keeps every exp() <= 1: no overflow for large logits.
    const double row_max = *std::max_element(row, row + classes);
    double sum_exp = 0.0;
    for (std::int64_t c = 0; c < classes; ++c) sum_exp += std::exp(row[c] - row_max);
    total += w * (std::log(sum_exp) - (row[y] - row_max));
    for (std::int64_t c = 0; c < classes; ++c) {
      const double p = std::exp(row[c] - row_max) / sum_exp;
      if (probs != nullptr) probs[i * classes + c] = static_cast<float>(p);
      if (dlogits != nullptr) {
        dlogits[i * classes + c] = static_cast<float>(grad_scale * w * (p - (c == y ? 1.0 : 0.0)));
      }
    }
  }
  *loss_sum = static_cast<float>(*loss_sum + total);
}

}  // namespace cudablocks::cpu

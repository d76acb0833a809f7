#include "cudablocks/optimizer.hpp"

#include <string>

#include "cudablocks/errors.hpp"

namespace cudablocks {

void validate(const AdamWHyper& h) {
  auto fail = [](const std::string& what) { throw InvalidArgumentError("AdamW: " + what); };
  if (!(h.lr >= 0.0f) || !std::isfinite(h.lr)) fail("lr must be a finite value >= 0, got " + std::to_string(h.lr));
  if (!(h.beta1 >= 0.0f && h.beta1 < 1.0f)) fail("beta1 must be in [0, 1), got " + std::to_string(h.beta1));
  if (!(h.beta2 >= 0.0f && h.beta2 < 1.0f)) fail("beta2 must be in [0, 1), got " + std::to_string(h.beta2));
  if (!(h.eps > 0.0f)) fail("eps must be > 0, got " + std::to_string(h.eps));
  if (!(h.weight_decay >= 0.0f) || !std::isfinite(h.weight_decay)) {
    fail("weight_decay must be a finite value >= 0, got " + std::to_string(h.weight_decay));
  }
  if (h.step < 1) fail("step counts from 1, got " + std::to_string(h.step));
  if (!(h.max_grad_norm > 0.0f)) fail("max_grad_norm must be > 0 (infinity: no clipping), got " + std::to_string(h.max_grad_norm));
}

}  // namespace cudablocks

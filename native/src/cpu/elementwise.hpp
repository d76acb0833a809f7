// Elementwise ops, CPU reference.
#pragma once

#include <cstdint>

namespace cudablocks::cpu {

// out = a + b over n elements; out may alias a or b (the residual add).
void add(const float* a, const float* b, float* out, std::int64_t n);

}  // namespace cudablocks::cpu

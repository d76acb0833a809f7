// LoRA dropout, CPU reference.
#pragma once

#include <cstdint>

namespace cudablocks::cpu {

// out[i] = x[i] * scale(p) where element i is kept under `key`, else 0 (or out[i] += x[i] *
// scale(p) for kept elements only, when accumulate), over n elements; the mask is the hash of
// core/dropout_hash.hpp. out may alias x.
void dropout(const float* x, float* out, std::int64_t n, double p, std::uint64_t key, bool accumulate);

}  // namespace cudablocks::cpu

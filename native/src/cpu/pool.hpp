// Pooling of packed sequences to one row per sequence (the classifier's input), CPU reference.
#pragma once

#include <cstdint>

#include "cudablocks/backend.hpp"

namespace cudablocks::cpu {

// out [n_seqs, hidden] from x [tokens, hidden]: the last row of each sequence (Last) or the mean
// of its rows (Mean, summed in double). Throws InvalidArgumentError unless cu_seqlens [n_seqs + 1]
// starts at 0, strictly increases and ends at tokens.
void pool_forward(const float* x, const std::int32_t* cu_seqlens, float* out, std::int64_t n_seqs,
                  std::int64_t tokens, std::int64_t hidden, PoolMode mode);

// dx [tokens, hidden], every row written: Last puts dout[b] in the last row of sequence b and
// zeros elsewhere; Mean puts dout[b] / len_b in every row of sequence b. Same checks.
void pool_backward(const float* dout, const std::int32_t* cu_seqlens, float* dx, std::int64_t n_seqs,
                   std::int64_t tokens, std::int64_t hidden, PoolMode mode);

}  // namespace cudablocks::cpu

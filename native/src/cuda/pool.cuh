#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cudablocks/backend.hpp"

namespace cudablocks::cuda {

// out [n_seqs, hidden]: the last row (Last) or the mean of the rows (Mean) of each packed
// sequence of x [tokens, hidden], with cu_seqlens [n_seqs + 1] on the device. A sequence whose
// bounds are invalid (empty, or outside [0, tokens]) gets a zero row.
void pool_forward(const float* x, const std::int32_t* cu_seqlens, float* out, std::int64_t n_seqs,
                  std::int64_t tokens, std::int64_t hidden, PoolMode mode, cudaStream_t stream);

// dx [tokens, hidden], every row written: dout[b] into the last row of sequence b and zeros
// elsewhere (Last), dout[b] / len_b into each row of sequence b (Mean). Rows in no valid
// sequence get zeros.
void pool_backward(const float* dout, const std::int32_t* cu_seqlens, float* dx, std::int64_t n_seqs,
                   std::int64_t tokens, std::int64_t hidden, PoolMode mode, cudaStream_t stream);

}  // namespace cudablocks::cuda

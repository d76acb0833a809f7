#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cudablocks/dtype.hpp"

namespace cudablocks::cuda {

// out[t, :] = float(table[ids[t], :]), table [vocab, hidden] Float32 or BFloat16 (bit patterns).
// An id outside [0, vocab) gives a zero row.
void embedding_forward(const std::int32_t* ids, const void* table, DType table_dtype, float* out,
                       std::int64_t tokens, std::int64_t vocab, std::int64_t hidden, cudaStream_t stream);

// grad_table[rows[u], :] += sum over j in [offsets[u], offsets[u + 1]) of grad_out[order[j], :],
// in fp32 in that order (deterministic, no atomics: rows are distinct). Rows outside [0, vocab)
// and token indices outside [0, tokens) are skipped; offsets are clamped to [0, order_len].
void embedding_backward(const float* grad_out, const std::int32_t* rows, const std::int32_t* offsets,
                        const std::int32_t* order, float* grad_table, std::int64_t unique_rows,
                        std::int64_t order_len, std::int64_t tokens, std::int64_t vocab, std::int64_t hidden,
                        cudaStream_t stream);

}  // namespace cudablocks::cuda

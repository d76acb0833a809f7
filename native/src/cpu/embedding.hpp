// Token embedding lookup and its gradient, CPU reference.
#pragma once

#include <cstdint>

#include "cudablocks/dtype.hpp"

namespace cudablocks::cpu {

// out[t, :] = float(table[ids[t], :]), table [vocab, hidden] Float32 or BFloat16 (bit patterns).
// Throws InvalidArgumentError for an id outside [0, vocab), before writing anything.
void embedding_forward(const std::int32_t* ids, const void* table, DType table_dtype, float* out,
                       std::int64_t tokens, std::int64_t vocab, std::int64_t hidden);

// grad_table[rows[u], :] += sum over j in [offsets[u], offsets[u + 1]) of grad_out[order[j], :],
// summed in fp32 in that order (the CUDA kernel's order: the same bits). Throws
// InvalidArgumentError, before writing anything, for a row outside [0, vocab) or repeated,
// offsets that do not ascend from 0 to order_len, or a token index outside [0, tokens).
void embedding_backward(const float* grad_out, const std::int32_t* rows, const std::int32_t* offsets,
                        const std::int32_t* order, float* grad_table, std::int64_t unique_rows,
                        std::int64_t order_len, std::int64_t tokens, std::int64_t vocab, std::int64_t hidden);

}  // namespace cudablocks::cpu

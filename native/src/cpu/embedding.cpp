#include "cpu/embedding.hpp"

#include <string>
#include <vector>

#include "core/float_bits.hpp"
#include "cpu/parallel.hpp"
#include "cudablocks/errors.hpp"

namespace cudablocks::cpu {

namespace {

void check_index(std::int64_t value, std::int64_t limit, const char* what, std::int64_t position) {
  if (value < 0 || value >= limit) {
    throw InvalidArgumentError(std::string(what) + "[" + std::to_string(position) + "] = " + std::to_string(value) +
                               " is outside [0, " + std::to_string(limit) + ")");
  }
}

}  // namespace

void embedding_forward(const std::int32_t* ids, const void* table, DType table_dtype, float* out,
                       std::int64_t tokens, std::int64_t vocab, std::int64_t hidden) {
  for (std::int64_t t = 0; t < tokens; ++t) check_index(ids[t], vocab, "ids", t);
  parallel_for(tokens, [&](std::int64_t t) {
    const std::int64_t row = static_cast<std::int64_t>(ids[t]) * hidden;
    float* dst = out + t * hidden;
    if (table_dtype == DType::BFloat16) {
      const std::uint16_t* src = static_cast<const std::uint16_t*>(table) + row;
      for (std::int64_t h = 0; h < hidden; ++h) dst[h] = bf16_bits_to_float(src[h]);
    } else {
      const float* src = static_cast<const float*>(table) + row;
      for (std::int64_t h = 0; h < hidden; ++h) dst[h] = src[h];
    }
  }, /*grain=*/64);
}

void embedding_backward(const float* grad_out, const std::int32_t* rows, const std::int32_t* offsets,
                        const std::int32_t* order, float* grad_table, std::int64_t unique_rows,
                        std::int64_t order_len, std::int64_t tokens, std::int64_t vocab, std::int64_t hidden) {
  if (offsets[0] != 0 || offsets[unique_rows] != order_len) {
    throw InvalidArgumentError("embedding_backward: offsets must run from 0 to len(order) = " +
                               std::to_string(order_len) + ", got " + std::to_string(offsets[0]) + " .. " +
                               std::to_string(offsets[unique_rows]));
  }
  std::vector<bool> seen(static_cast<std::size_t>(vocab), false);
  for (std::int64_t u = 0; u < unique_rows; ++u) {
    check_index(rows[u], vocab, "rows", u);
    if (seen[rows[u]]) {
      throw InvalidArgumentError("embedding_backward: rows must be distinct, " + std::to_string(rows[u]) +
                                 " appears twice");
    }
    seen[rows[u]] = true;
    if (offsets[u + 1] < offsets[u]) {
      throw InvalidArgumentError("embedding_backward: offsets must not decrease, offsets[" + std::to_string(u + 1) +
                                 "] = " + std::to_string(offsets[u + 1]) + " < " + std::to_string(offsets[u]));
    }
  }
  for (std::int64_t j = 0; j < order_len; ++j) check_index(order[j], tokens, "order", j);
  // Rows are distinct, so the groups write disjoint rows of grad_table.
  parallel_for(unique_rows, [&](std::int64_t u) {
    std::vector<float> sum(static_cast<std::size_t>(hidden), 0.0f);
    for (std::int32_t j = offsets[u]; j < offsets[u + 1]; ++j) {
      const float* src = grad_out + static_cast<std::int64_t>(order[j]) * hidden;
      for (std::int64_t h = 0; h < hidden; ++h) sum[h] += src[h];
    }
    float* dst = grad_table + static_cast<std::int64_t>(rows[u]) * hidden;
    for (std::int64_t h = 0; h < hidden; ++h) dst[h] += sum[h];
  }, /*grain=*/16);
}

}  // namespace cudablocks::cpu

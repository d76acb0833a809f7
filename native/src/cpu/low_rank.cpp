#include "cpu/low_rank.hpp"

#include <algorithm>
#include <vector>

#include "core/float_bits.hpp"
#include "cpu/parallel.hpp"

namespace cudablocks::cpu {

namespace {

void store(float* out, std::int64_t i, float value) { out[i] = value; }
void store(std::uint16_t* out, std::int64_t i, float value) { out[i] = float_to_bf16_bits(value); }

template <typename Out>
void add_low_rank_rows(const float* c, const float* bias, const std::uint16_t* u, const std::uint16_t* v,
                       std::int64_t v_row, std::int64_t v_col, std::int64_t rows, std::int64_t cols, int rank,
                       Out* out) {
  parallel_for(rows, [&](std::int64_t t) {
    std::vector<float> ut(static_cast<std::size_t>(rank));
    for (int j = 0; j < rank; ++j) ut[j] = bf16_bits_to_float(u[t * rank + j]);
    for (std::int64_t n = 0; n < cols; ++n) {
      float acc = c != nullptr ? c[t * cols + n] : 0.0f;
      if (bias != nullptr) acc += bias[n];
      for (int j = 0; j < rank; ++j) acc += ut[j] * bf16_bits_to_float(v[n * v_row + j * v_col]);
      store(out, t * cols + n, acc);
    }
  }, /*grain=*/std::max<std::int64_t>(1, 16384 / std::max<std::int64_t>(cols * std::max(rank, 1), 1)));
}

}  // namespace

void add_low_rank(const float* c, const float* bias, const std::uint16_t* u, const std::uint16_t* v,
                  std::int64_t v_row, std::int64_t v_col, std::int64_t rows, std::int64_t cols, int rank, float* out) {
  add_low_rank_rows(c, bias, u, v, v_row, v_col, rows, cols, rank, out);
}

void add_low_rank(const float* c, const float* bias, const std::uint16_t* u, const std::uint16_t* v,
                  std::int64_t v_row, std::int64_t v_col, std::int64_t rows, std::int64_t cols, int rank,
                  std::uint16_t* out) {
  add_low_rank_rows(c, bias, u, v, v_row, v_col, rows, cols, rank, out);
}

}  // namespace cudablocks::cpu

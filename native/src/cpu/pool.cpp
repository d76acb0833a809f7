#include "cpu/pool.hpp"

#include <string>
#include <vector>

#include "cpu/parallel.hpp"
#include "cudablocks/errors.hpp"

namespace cudablocks::cpu {

namespace {

void check_cu_seqlens(const std::int32_t* cu_seqlens, std::int64_t n_seqs, std::int64_t tokens) {
  if (cu_seqlens[0] != 0 || cu_seqlens[n_seqs] != tokens) {
    throw InvalidArgumentError("cu_seqlens must run from 0 to the token count " + std::to_string(tokens) + ", got " +
                               std::to_string(cu_seqlens[0]) + " .. " + std::to_string(cu_seqlens[n_seqs]));
  }
  for (std::int64_t b = 0; b < n_seqs; ++b) {
    if (cu_seqlens[b + 1] <= cu_seqlens[b]) {
      throw InvalidArgumentError("cu_seqlens must strictly increase (every sequence has a token), got cu_seqlens[" +
                                 std::to_string(b) + "] = " + std::to_string(cu_seqlens[b]) + " and cu_seqlens[" +
                                 std::to_string(b + 1) + "] = " + std::to_string(cu_seqlens[b + 1]));
    }
  }
}

}  // namespace

void pool_forward(const float* x, const std::int32_t* cu_seqlens, float* out, std::int64_t n_seqs,
                  std::int64_t tokens, std::int64_t hidden, PoolMode mode) {
  check_cu_seqlens(cu_seqlens, n_seqs, tokens);
  parallel_for(n_seqs, [&](std::int64_t b) {
    const std::int64_t begin = cu_seqlens[b], end = cu_seqlens[b + 1];
    float* dst = out + b * hidden;
    if (mode == PoolMode::Last) {
      const float* src = x + (end - 1) * hidden;
      for (std::int64_t h = 0; h < hidden; ++h) dst[h] = src[h];
      return;
    }
    std::vector<double> sum(static_cast<std::size_t>(hidden), 0.0);
    for (std::int64_t t = begin; t < end; ++t) {
      for (std::int64_t h = 0; h < hidden; ++h) sum[h] += x[t * hidden + h];
    }
    for (std::int64_t h = 0; h < hidden; ++h) dst[h] = static_cast<float>(sum[h] / static_cast<double>(end - begin));
  });
}

void pool_backward(const float* dout, const std::int32_t* cu_seqlens, float* dx, std::int64_t n_seqs,
                   std::int64_t tokens, std::int64_t hidden, PoolMode mode) {
  check_cu_seqlens(cu_seqlens, n_seqs, tokens);
  parallel_for(n_seqs, [&](std::int64_t b) {
    const std::int64_t begin = cu_seqlens[b], end = cu_seqlens[b + 1];
    const float* src = dout + b * hidden;
    const float len = static_cast<float>(end - begin);
    for (std::int64_t t = begin; t < end; ++t) {
      float* dst = dx + t * hidden;
      for (std::int64_t h = 0; h < hidden; ++h) {
        if (mode == PoolMode::Mean) {
          dst[h] = src[h] / len;
        } else {
          dst[h] = t == end - 1 ? src[h] : 0.0f;
        }
      }
    }
  });
}

}  // namespace cudablocks::cpu

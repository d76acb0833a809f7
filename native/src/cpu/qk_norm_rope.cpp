#include "cpu/qk_norm_rope.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/parallel.hpp"

namespace cudablocks::cpu {
namespace {

// cos and sin of the angles of one token: cs[i] = cos(a_i), cs[half + i] = sin(a_i). The angle
// is rounded to fp32 as transformers computes it: rounding moves it by up to ~2e-4 rad at position
// 8K, so computing it in double would make this reference disagree with transformers (and with
// the CUDA backend, which computes the same fp32 angles) by that much. cos and sin of the fp32
// angle are then taken in double.
void angles(std::int32_t position, const float* inv_freq, int half, std::vector<double>& cs) {
  for (int i = 0; i < half; ++i) {
    const double a = static_cast<float>(position) * inv_freq[i];  // the product rounded to fp32
    cs[i] = std::cos(a);
    cs[half + i] = std::sin(a);
  }
}

std::int64_t token_grain(int n_heads, int head_dim) {
  return std::max<std::int64_t>(1, 16384 / std::max<std::int64_t>(std::int64_t{n_heads} * head_dim, 1));
}

}  // namespace

void qk_norm_rope_forward(const float* x, const float* w, float* y, float* rstd, const std::int32_t* positions,
                          std::int64_t tokens, int n_heads, int head_dim, float eps, const float* inv_freq) {
  const int half = head_dim / 2;
  parallel_for(tokens, [&](std::int64_t t) {
    std::vector<double> cs(static_cast<std::size_t>(head_dim));
    std::vector<float> normed(static_cast<std::size_t>(head_dim));
    angles(positions[t], inv_freq, half, cs);
    for (int hd = 0; hd < n_heads; ++hd) {
      const std::int64_t offset = (t * n_heads + hd) * head_dim;
      const float* xh = x + offset;
      float* yh = y + offset;
      // The norm exactly as rmsnorm_forward (and transformers): rstd in double, rounded to fp32,
      // then w * (x * rstd) in fp32.
      const float* h = xh;
      if (w != nullptr) {
        double sum_squares = 0.0;
        for (int i = 0; i < head_dim; ++i) sum_squares += static_cast<double>(xh[i]) * xh[i];
        const float s = static_cast<float>(1.0 / std::sqrt(sum_squares / head_dim + eps));
        for (int i = 0; i < head_dim; ++i) normed[i] = w[i] * (xh[i] * s);
        if (rstd != nullptr) rstd[t * n_heads + hd] = s;
        h = normed.data();
      }
      // Rotate each pair (i, i + d/2) by a_i.
      for (int i = 0; i < half; ++i) {
        const double c = cs[i], s = cs[half + i];
        const double lo = h[i], hi = h[i + half];
        yh[i] = static_cast<float>(lo * c - hi * s);
        yh[i + half] = static_cast<float>(hi * c + lo * s);
      }
    }
  }, token_grain(n_heads, head_dim));
}

void qk_norm_rope_backward(const float* dy, const float* x, const float* w, const float* rstd, float* dx,
                           float* dw, const std::int32_t* positions, std::int64_t tokens, int n_heads,
                           int head_dim, const float* inv_freq) {
  const int half = head_dim / 2;
  // dw sums over every (token, head): each chunk of tokens sums into its own row of partials,
  // and the rows are added in order afterwards (no races, same result for any thread count).
  constexpr std::int64_t chunk = 32;
  const std::int64_t n_chunks = (tokens + chunk - 1) / chunk;
  const bool take_dw = w != nullptr && dw != nullptr;
  std::vector<double> dw_partial(take_dw ? static_cast<std::size_t>(n_chunks * head_dim) : 0, 0.0);

  parallel_for(n_chunks, [&](std::int64_t ch) {
    std::vector<double> cs(static_cast<std::size_t>(head_dim));
    std::vector<double> dh(static_cast<std::size_t>(head_dim));
    for (std::int64_t t = ch * chunk; t < std::min(tokens, (ch + 1) * chunk); ++t) {
      angles(positions[t], inv_freq, half, cs);
      for (int hd = 0; hd < n_heads; ++hd) {
        const std::int64_t offset = (t * n_heads + hd) * head_dim;
        const float* dyh = dy + offset;
        const float* xh = x + offset;
        float* dxh = dx + offset;
        // The transpose of a rotation by a_i is the rotation by -a_i.
        for (int i = 0; i < half; ++i) {
          const double c = cs[i], s = cs[half + i];
          const double lo = dyh[i], hi = dyh[i + half];
          dh[i] = lo * c + hi * s;
          dh[i + half] = hi * c - lo * s;
        }
        if (w == nullptr) {
          for (int i = 0; i < head_dim; ++i) dxh[i] = static_cast<float>(dh[i]);
          continue;
        }
        // RMSNorm backward over the head (derivation in rmsnorm.cpp).
        const double s = rstd[t * n_heads + hd];
        double dot = 0.0;
        for (int i = 0; i < head_dim; ++i) dot += w[i] * dh[i] * xh[i];
        const double correction = s * s * dot / head_dim;
        for (int i = 0; i < head_dim; ++i) dxh[i] = static_cast<float>(s * (w[i] * dh[i] - xh[i] * correction));
        if (!take_dw) continue;
        double* partial = dw_partial.data() + ch * head_dim;
        for (int i = 0; i < head_dim; ++i) partial[i] += dh[i] * xh[i] * s;
      }
    }
  }, std::max<std::int64_t>(1, token_grain(n_heads, head_dim) / chunk));

  if (take_dw) {
    for (int i = 0; i < head_dim; ++i) {
      double sum = 0.0;
      for (std::int64_t ch = 0; ch < n_chunks; ++ch) sum += dw_partial[ch * head_dim + i];
      dw[i] = static_cast<float>(dw[i] + sum);
    }
  }
}

}  // namespace cudablocks::cpu

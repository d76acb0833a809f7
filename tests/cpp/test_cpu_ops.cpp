// The CPU reference ops (through the CPU Backend) against independent fp64 implementations
// written here, and their backwards against central finite differences of a scalar loss
// sum(y * G) computed through the fp64 forward. Inputs are fresh random draws on every run.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <tuple>
#include <vector>

#include "core/float_bits.hpp"
#include "cpu/attention.hpp"
#include "cudablocks/backend.hpp"
#include "cudablocks/device.hpp"
#include "cudablocks/stream.hpp"
#include "support.hpp"

namespace cudablocks {
namespace {

using test::random_normal;
using test::relative_error;
using test::rng;

constexpr double kForwardTol = 1e-5;
constexpr double kGradTol = 1e-4;

const Backend& cpu() { return backend_for(Device()); }
const Stream& stream() {
  static const Stream s{Device()};
  return s;
}

std::vector<float> nans(std::size_t n) { return std::vector<float>(n, NAN); }
std::vector<double> to_double(const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); }

double dot(const std::vector<double>& y, const std::vector<float>& g) {
  double s = 0.0;
  for (std::size_t i = 0; i < y.size(); ++i) s += y[i] * g[i];
  return s;
}

// d loss / d x by central differences in double, one element at a time.
std::vector<double> finite_difference(const std::vector<float>& x32,
                                      const std::function<double(const std::vector<double>&)>& loss) {
  std::vector<double> x = to_double(x32), grad(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double xi = x[i], h = 1e-5 * std::max(1.0, std::abs(xi));
    x[i] = xi + h;
    const double plus = loss(x);
    x[i] = xi - h;
    const double minus = loss(x);
    x[i] = xi;
    grad[i] = (plus - minus) / (2.0 * h);
  }
  return grad;
}

std::vector<double> plus(const std::vector<float>& a, const std::vector<double>& b) {
  std::vector<double> out(a.size());
  for (std::size_t i = 0; i < a.size(); ++i) out[i] = a[i] + b[i];
  return out;
}

std::vector<std::int32_t> random_positions(std::int64_t tokens, int max_position) {
  std::uniform_int_distribution<int> dist(0, max_position - 1);
  std::vector<std::int32_t> positions(static_cast<std::size_t>(tokens));
  for (auto& p : positions) p = dist(rng());
  return positions;
}

// ---- GEMM ---------------------------------------------------------------------------------------

// alpha * op(A) op(B) + beta * C0 in double; c0 empty means beta == 0.
std::vector<double> gemm_fp64(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k, double alpha,
                              const std::vector<float>& a, const std::vector<float>& b, double beta,
                              const std::vector<float>& c0) {
  std::vector<double> c(static_cast<std::size_t>(m * n));
  for (std::int64_t i = 0; i < m; ++i)
    for (std::int64_t j = 0; j < n; ++j) {
      double s = 0.0;
      for (std::int64_t p = 0; p < k; ++p) {
        const double av = ta ? a[p * m + i] : a[i * k + p];
        const double bv = tb ? b[j * k + p] : b[p * n + j];
        s += av * bv;
      }
      c[i * n + j] = alpha * s + (c0.empty() ? 0.0 : beta * c0[i * n + j]);
    }
  return c;
}

void check_gemm(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k, float alpha, float beta,
                Precision precision = Precision::FP32) {
  SCOPED_TRACE(testing::Message() << "trans_a=" << ta << " trans_b=" << tb << " m=" << m << " n=" << n
                                  << " k=" << k << " alpha=" << alpha << " beta=" << beta);
  const auto a = random_normal(static_cast<std::size_t>(m * k));
  const auto b = random_normal(static_cast<std::size_t>(k * n));
  // With beta == 0, C starts as NaN: the op must not read it.
  const auto c0 = beta == 0.0f ? nans(static_cast<std::size_t>(m * n)) : random_normal(static_cast<std::size_t>(m * n));
  auto c = c0;
  cpu().gemm(ta, tb, m, n, k, alpha, a.data(), b.data(), beta, c.data(), precision, stream());
  const auto ref = gemm_fp64(ta, tb, m, n, k, alpha, a, b, beta, beta == 0.0f ? std::vector<float>{} : c0);
  EXPECT_LE(relative_error(c, ref), kForwardTol);
}

TEST(CpuGemm, AllTransposesOddSizesAlphaBeta) {
  for (bool ta : {false, true})
    for (bool tb : {false, true}) {
      check_gemm(ta, tb, 37, 53, 29, 1.0f, 0.0f);
      check_gemm(ta, tb, 37, 53, 29, 1.3f, -0.7f);
      check_gemm(ta, tb, 1, 9, 7, -0.5f, 0.0f);
      check_gemm(ta, tb, 5, 1, 300, 2.0f, 1.0f);
    }
}

TEST(CpuGemm, SizesCrossingEveryBlock) {
  // Larger than one tile in M, N and K (64, 256, 256), with ragged edges, on several threads.
  for (bool ta : {false, true})
    for (bool tb : {false, true}) {
      check_gemm(ta, tb, 131, 300, 517, 1.0f, 0.0f);
      check_gemm(ta, tb, 70, 257, 600, 0.25f, 0.5f);
    }
}

TEST(CpuGemm, GemmAddReadsTheAddendFromAnyBuffer) {
  // c = alpha op(a) op(b) + addend, with the addend in another buffer (c poisoned) or in c itself.
  for (bool ta : {false, true})
    for (bool tb : {false, true}) {
      const std::int64_t m = 37, n = 53, k = 29;
      const auto a = random_normal(static_cast<std::size_t>(m * k)), b = random_normal(static_cast<std::size_t>(k * n));
      const auto addend = random_normal(static_cast<std::size_t>(m * n));
      const auto ref = gemm_fp64(ta, tb, m, n, k, 0.5f, a, b, 1.0f, addend);
      auto c = nans(addend.size());
      cpu().gemm_add(ta, tb, m, n, k, 0.5f, a.data(), b.data(), addend.data(), c.data(), Precision::FP32, stream());
      EXPECT_LE(relative_error(c, ref), kForwardTol);
      c = addend;
      cpu().gemm_add(ta, tb, m, n, k, 0.5f, a.data(), b.data(), c.data(), c.data(), Precision::FP32, stream());
      EXPECT_LE(relative_error(c, ref), kForwardTol);
    }
}

TEST(CpuGemm, PrecisionIsIgnoredOnCpu) {
  check_gemm(false, true, 33, 40, 70, 1.0f, 0.0f, Precision::BF16);
  check_gemm(true, false, 33, 40, 70, 1.0f, 0.0f, Precision::TF32);
}

// ---- bf16 operands ------------------------------------------------------------------------------

using test::bf16_of;
using test::float_of;

TEST(CpuBf16, ToBf16RoundsToNearestEven) {
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to the even 1. 1 + 3 * 2^-8 ties up to 1 + 2^-6.
  const std::vector<float> x = {1.0f, 1.0f + 1.0f / 256, 1.0f + 3.0f / 256, 1.0f + 1.0f / 256 + 1.0f / 65536,
                                -2.5f, 0.0f, -0.0f, INFINITY, -INFINITY, 3.3895314e38f /* max bf16 */, 1e-40f};
  std::vector<std::uint16_t> y(x.size());
  cpu().to_bf16(x.data(), y.data(), static_cast<std::int64_t>(x.size()), stream());
  EXPECT_EQ(y[0], 0x3f80);
  EXPECT_EQ(y[1], 0x3f80);
  EXPECT_EQ(y[2], 0x3f82);
  EXPECT_EQ(y[3], 0x3f81);
  EXPECT_EQ(y[4], 0xc020);
  EXPECT_EQ(y[5], 0x0000);
  EXPECT_EQ(y[6], 0x8000);
  EXPECT_EQ(y[7], 0x7f80);
  EXPECT_EQ(y[8], 0xff80);
  EXPECT_EQ(y[9], 0x7f7f);
  EXPECT_EQ(bf16_bits_to_float(y[10]), bf16_bits_to_float(float_to_bf16_bits(1e-40f)));  // subnormals kept
  const float nan = NAN;
  std::uint16_t n16 = 0;
  cpu().to_bf16(&nan, &n16, 1, stream());
  EXPECT_TRUE(std::isnan(bf16_bits_to_float(n16)));
  // Large random input (several parallel chunks) against the scalar conversion.
  const auto big = random_normal(200003);
  std::vector<std::uint16_t> out(big.size());
  cpu().to_bf16(big.data(), out.data(), static_cast<std::int64_t>(big.size()), stream());
  EXPECT_EQ(out, bf16_of(big));
}

TEST(CpuOps, TransposeReadsStridedRowsAndWritesDenseColumns) {
  // x [rows, cols] inside rows of ld floats (the columns past cols must not be read into y).
  for (auto [rows, cols, ld] : {std::tuple<std::int64_t, std::int64_t, std::int64_t>{1, 1, 1}, {3, 70, 70},
                                {67, 33, 40}, {130, 65, 200}}) {
    const auto x = random_normal(static_cast<std::size_t>(rows * ld));
    std::vector<float> y = nans(static_cast<std::size_t>(rows * cols));
    cpu().transpose(x.data(), rows, cols, ld, y.data(), stream());
    for (std::int64_t j = 0; j < cols; ++j) {
      for (std::int64_t i = 0; i < rows; ++i) {
        ASSERT_EQ(float_to_bits(y[j * rows + i]), float_to_bits(x[i * ld + j])) << rows << "x" << cols << " ld " << ld;
      }
    }
  }
}

// The producers that write their output transposed (tf32 weight gradients' operands): exactly the
// transpose of the plain op's output, RMSNorm's from the forward's rstd.
TEST(CpuOps, TransposedRmsNormAndSwigluAreTheTransposedOutputs) {
  for (auto [rows, cols] : {std::pair<std::int64_t, std::int64_t>{1, 1}, {3, 70}, {67, 33}, {130, 65}}) {
    const std::string what = std::to_string(rows) + "x" + std::to_string(cols);
    const auto n = static_cast<std::size_t>(rows * cols);
    const auto x = random_normal(n, 2.0f), w = random_normal(static_cast<std::size_t>(cols));
    const auto gate_up = random_normal(2 * n, 3.0f);
    auto y = nans(n), rstd = nans(static_cast<std::size_t>(rows)), out = nans(n);
    cpu().rmsnorm_forward(x.data(), w.data(), y.data(), rstd.data(), rows, cols, 1e-6f, stream());
    cpu().swiglu_forward(gate_up.data(), out.data(), rows, cols, stream());
    auto y_t = nans(n), out_t = nans(n);
    cpu().rmsnorm_forward_transposed(x.data(), w.data(), rstd.data(), y_t.data(), rows, cols, stream());
    cpu().swiglu_forward_transposed(gate_up.data(), out_t.data(), rows, cols, stream());
    for (std::int64_t j = 0; j < cols; ++j) {
      for (std::int64_t i = 0; i < rows; ++i) {
        ASSERT_EQ(float_to_bits(y_t[j * rows + i]), float_to_bits(y[i * cols + j])) << what << " rmsnorm";
        ASSERT_EQ(float_to_bits(out_t[j * rows + i]), float_to_bits(out[i * cols + j])) << what << " swiglu";
      }
    }
  }
}

TEST(CpuBf16, AddLowRankIsTheSumOfTheBf16Products) {
  // out = c + bias + u v^T against fp64 on the bf16 values; v as B [cols, rank] and as A [rank, cols].
  // fp32 out in place and bf16 out from the same sums (their rounding of the fp32 result).
  const std::int64_t rows = 37, cols = 45;
  for (int rank : {0, 5, 40}) {
    for (bool a_layout : {false, true}) {
      for (bool with_bias : {false, true}) {
        const auto c = random_normal(static_cast<std::size_t>(rows * cols));
        const auto bias = random_normal(static_cast<std::size_t>(cols));
        const auto u = bf16_of(random_normal(static_cast<std::size_t>(rows * rank)));
        const auto v = bf16_of(random_normal(static_cast<std::size_t>(cols * rank)));
        const std::int64_t v_row = a_layout ? 1 : rank, v_col = a_layout ? cols : 1;
        std::vector<double> want(c.size());
        for (std::int64_t t = 0; t < rows; ++t) {
          for (std::int64_t n = 0; n < cols; ++n) {
            double s = c[t * cols + n] + (with_bias ? bias[n] : 0.0);
            for (int j = 0; j < rank; ++j) {
              s += static_cast<double>(bf16_bits_to_float(u[t * rank + j])) * bf16_bits_to_float(v[n * v_row + j * v_col]);
            }
            want[t * cols + n] = s;
          }
        }
        std::vector<float> out = c;
        std::vector<std::uint16_t> out16(c.size(), 0xffff);
        const float* b = with_bias ? bias.data() : nullptr;
        cpu().add_low_rank(c.data(), b, u.data(), v.data(), v_row, v_col, rows, cols, rank, out16.data(), stream());
        cpu().add_low_rank(out.data(), b, u.data(), v.data(), v_row, v_col, rows, cols, rank, out.data(), stream());
        EXPECT_LT(relative_error(out, want), kForwardTol) << "rank " << rank << (a_layout ? " A" : " B");
        EXPECT_EQ(out16, bf16_of(out)) << "rank " << rank << (a_layout ? " A" : " B");
        // Without c: the term (and bias) alone, as if c were zeros.
        const std::vector<float> zeros(c.size(), 0.0f);
        std::vector<float> term = nans(c.size()), term_ref = zeros;
        cpu().add_low_rank(nullptr, b, u.data(), v.data(), v_row, v_col, rows, cols, rank, term.data(), stream());
        cpu().add_low_rank(zeros.data(), b, u.data(), v.data(), v_row, v_col, rows, cols, rank, term_ref.data(),
                           stream());
        EXPECT_EQ(term, term_ref) << "rank " << rank << (a_layout ? " A" : " B");
      }
    }
  }
}

TEST(CpuBf16, GemmBf16IsTheProductOfTheBf16Values) {
  for (bool ta : {false, true})
    for (bool tb : {false, true})
      for (auto [m, n, k, alpha, beta] : {std::tuple<std::int64_t, std::int64_t, std::int64_t, float, float>{37, 53, 29, 1.0f, 0.0f},
                                          {70, 257, 600, 0.5f, 1.0f}, {1, 9, 300, 1.0f, -0.5f}}) {
        SCOPED_TRACE(testing::Message() << ta << tb << " " << m << "x" << n << "x" << k);
        const auto a16 = bf16_of(random_normal(static_cast<std::size_t>(m * k)));
        const auto b16 = bf16_of(random_normal(static_cast<std::size_t>(k * n)));
        const auto c0 = beta == 0.0f ? nans(static_cast<std::size_t>(m * n)) : random_normal(static_cast<std::size_t>(m * n));
        auto c = c0;
        cpu().gemm_bf16(ta, tb, m, n, k, alpha, a16.data(), b16.data(), beta, c.data(), stream());
        const auto ref = gemm_fp64(ta, tb, m, n, k, alpha, float_of(a16), float_of(b16), beta,
                                   beta == 0.0f ? std::vector<float>{} : c0);
        EXPECT_LE(relative_error(c, ref), kForwardTol);
      }
  // K = 0 scales C.
  auto c = random_normal(12);
  const auto c0 = c;
  cpu().gemm_bf16(false, false, 3, 4, 0, 1.0f, nullptr, nullptr, 2.0f, c.data(), stream());
  for (std::size_t i = 0; i < c.size(); ++i) EXPECT_FLOAT_EQ(c[i], 2.0f * c0[i]);
}

TEST(CpuBf16, GemmBf16ToBf16IsTheRoundedGemmBf16) {
  // gemm_bf16_to_bf16: gemm_bf16's fp32 result rounded. gemm_bf16_to_bf16_add: c16 = bf16(alpha a b +
  // c16) against fp64 on the bf16 values, within one bf16 rounding (2^-8 relative) of the exact sum
  // plus the fp32 sum's own error.
  for (bool ta : {false, true})
    for (bool tb : {false, true}) {
      const std::int64_t m = 37, n = 53, k = 29;
      SCOPED_TRACE(testing::Message() << ta << tb);
      const auto a16 = bf16_of(random_normal(static_cast<std::size_t>(m * k)));
      const auto b16 = bf16_of(random_normal(static_cast<std::size_t>(k * n)));
      auto c = nans(static_cast<std::size_t>(m * n));
      cpu().gemm_bf16(ta, tb, m, n, k, 0.5f, a16.data(), b16.data(), 0.0f, c.data(), stream());
      std::vector<std::uint16_t> c16(c.size(), 0xffff);
      cpu().gemm_bf16_to_bf16(ta, tb, m, n, k, 0.5f, a16.data(), b16.data(), c16.data(), stream());
      EXPECT_EQ(c16, bf16_of(c));

      const auto c0 = bf16_of(random_normal(static_cast<std::size_t>(m * n)));
      auto sum16 = c0;
      cpu().gemm_bf16_to_bf16_add(ta, tb, m, n, k, 0.5f, a16.data(), b16.data(), sum16.data(), stream());
      const auto ref = gemm_fp64(ta, tb, m, n, k, 0.5f, float_of(a16), float_of(b16), 1.0f, float_of(c0));
      for (std::size_t i = 0; i < sum16.size(); ++i) {
        const double want = ref[i], got = bf16_bits_to_float(sum16[i]);
        EXPECT_LE(std::abs(got - want), std::ldexp(std::abs(want), -8) + 1e-5) << "element " << i;
      }
      // One rounding: exactly the fp32 product-plus-c (gemm_bf16 with beta 1 on c widened) rounded.
      std::vector<float> wide = float_of(c0);
      cpu().gemm_bf16(ta, tb, m, n, k, 0.5f, a16.data(), b16.data(), 1.0f, wide.data(), stream());
      EXPECT_EQ(sum16, bf16_of(wide));
      // K = 0 leaves c as it is.
      auto same = c0;
      cpu().gemm_bf16_to_bf16_add(ta, tb, m, n, 0, 0.5f, nullptr, nullptr, same.data(), stream());
      EXPECT_EQ(same, c0);
    }
}

TEST(CpuBf16, AdamwWritesTheBf16CopyOfTheUpdatedParameters) {
  const std::size_t n = 1003;
  auto p = random_normal(n), m = random_normal(n, 0.1f), v = random_normal(n, 0.1f);
  for (auto& e : v) e = e * e;
  const auto g = random_normal(n);
  auto p2 = p, m2 = m, v2 = v;
  AdamWHyper h;
  h.lr = 1e-2f;
  h.step = 3;
  std::vector<std::uint16_t> p16(n, 0xffff);
  cpu().adamw_step(p.data(), g.data(), m.data(), v.data(), static_cast<std::int64_t>(n), h, nullptr, p16.data(),
                   stream());
  cpu().adamw_step(p2.data(), g.data(), m2.data(), v2.data(), static_cast<std::int64_t>(n), h, nullptr, nullptr,
                   stream());
  EXPECT_EQ(p, p2);  // the copy changes nothing else
  EXPECT_EQ(p16, bf16_of(p));
  // A non-finite norm skips the step: neither the parameters nor the copy are written.
  const float inf_norm = INFINITY;
  std::vector<std::uint16_t> untouched(n, 0x1234);
  cpu().adamw_step(p.data(), g.data(), m.data(), v.data(), static_cast<std::int64_t>(n), h, &inf_norm,
                   untouched.data(), stream());
  EXPECT_EQ(p, p2);
  EXPECT_EQ(untouched, std::vector<std::uint16_t>(n, 0x1234));
}

TEST(CpuGemm, EmptyKOrZeroAlphaScalesC) {
  const std::int64_t m = 6, n = 11;
  const auto c0 = random_normal(m * n);
  auto c = c0;
  cpu().gemm(false, false, m, n, 0, 1.0f, nullptr, nullptr, 0.5f, c.data(), Precision::FP32, stream());
  for (std::size_t i = 0; i < c.size(); ++i) EXPECT_FLOAT_EQ(c[i], 0.5f * c0[i]);
  c = nans(c.size());
  const auto a = random_normal(m * 4), b = random_normal(4 * n);
  cpu().gemm(false, false, m, n, 4, 0.0f, a.data(), b.data(), 0.0f, c.data(), Precision::FP32, stream());
  for (float v : c) EXPECT_EQ(v, 0.0f);
}

// ---- RMSNorm backward ---------------------------------------------------------------------------

std::vector<double> rmsnorm_fp64(const std::vector<double>& x, const std::vector<double>& w, std::int64_t rows,
                                 std::int64_t cols, double eps) {
  std::vector<double> y(x.size());
  for (std::int64_t r = 0; r < rows; ++r) {
    double ms = 0.0;
    for (std::int64_t c = 0; c < cols; ++c) ms += x[r * cols + c] * x[r * cols + c];
    const double s = 1.0 / std::sqrt(ms / cols + eps);
    for (std::int64_t c = 0; c < cols; ++c) y[r * cols + c] = x[r * cols + c] * s * w[c];
  }
  return y;
}

// The analytic backward in double, written from the chain rule with explicit Jacobian entries
// dy_c/dx_j = s * w_c * (delta_cj - x_c * x_j * s^2 / n).
void rmsnorm_backward_fp64(const std::vector<float>& dy, const std::vector<float>& x, const std::vector<float>& w,
                           std::int64_t rows, std::int64_t cols, double eps, std::vector<double>& dx,
                           std::vector<double>& dw) {
  dx.assign(x.size(), 0.0);
  dw.assign(static_cast<std::size_t>(cols), 0.0);
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* xr = x.data() + r * cols;
    const float* gr = dy.data() + r * cols;
    double ms = 0.0;
    for (std::int64_t c = 0; c < cols; ++c) ms += static_cast<double>(xr[c]) * xr[c];
    const double s = 1.0 / std::sqrt(ms / cols + eps);
    for (std::int64_t j = 0; j < cols; ++j) {
      double sum = 0.0;
      for (std::int64_t c = 0; c < cols; ++c) {
        const double jac = s * w[c] * ((c == j ? 1.0 : 0.0) - static_cast<double>(xr[c]) * xr[j] * s * s / cols);
        sum += gr[c] * jac;
      }
      dx[r * cols + j] = sum;
      dw[j] += static_cast<double>(gr[j]) * xr[j] * s;
    }
  }
}

TEST(CpuRmsNorm, BackwardMatchesFiniteDifferences) {
  const std::int64_t rows = 4, cols = 13;
  const float eps = 1e-6f;
  const auto x = random_normal(rows * cols), w = random_normal(cols), g = random_normal(rows * cols);
  auto y = nans(x.size()), rstd = nans(rows);
  cpu().rmsnorm_forward(x.data(), w.data(), y.data(), rstd.data(), rows, cols, eps, stream());
  auto dx = nans(x.size());
  std::vector<float> dw(cols, 0.0f);
  cpu().rmsnorm_backward(g.data(), x.data(), w.data(), rstd.data(), nullptr, dx.data(), nullptr, dw.data(), rows, cols,
                         stream());
  const auto wd = to_double(w), xd = to_double(x);
  const auto fd_x = finite_difference(x, [&](const std::vector<double>& v) { return dot(rmsnorm_fp64(v, wd, rows, cols, eps), g); });
  const auto fd_w = finite_difference(w, [&](const std::vector<double>& v) { return dot(rmsnorm_fp64(xd, v, rows, cols, eps), g); });
  EXPECT_LE(relative_error(dx, fd_x), kGradTol);
  EXPECT_LE(relative_error(dw, fd_w), kGradTol);
}

TEST(CpuRmsNorm, BackwardMatchesAnalyticAndAccumulates) {
  // Several threads and several dw column blocks (256 wide).
  const std::int64_t rows = 37, cols = 300;
  const float eps = 1e-5f;
  const auto x = random_normal(rows * cols, 2.0f), w = random_normal(cols), g = random_normal(rows * cols);
  auto y = nans(x.size()), rstd = nans(rows);
  cpu().rmsnorm_forward(x.data(), w.data(), y.data(), rstd.data(), rows, cols, eps, stream());
  std::vector<double> ref_dx, ref_dw;
  rmsnorm_backward_fp64(g, x, w, rows, cols, eps, ref_dx, ref_dw);

  auto dx = nans(x.size());
  std::vector<float> dw(cols, 0.0f);
  cpu().rmsnorm_backward(g.data(), x.data(), w.data(), rstd.data(), nullptr, dx.data(), nullptr, dw.data(), rows, cols,
                         stream());
  EXPECT_LE(relative_error(dx, ref_dx), kGradTol);
  EXPECT_LE(relative_error(dw, ref_dw), kGradTol);

  // A residual adds to dx, in place (residual = dx) or from another buffer; dw always adds.
  const auto dx0 = random_normal(x.size()), dw0 = random_normal(cols);
  dx = dx0;
  dw = dw0;
  cpu().rmsnorm_backward(g.data(), x.data(), w.data(), rstd.data(), dx.data(), dx.data(), nullptr, dw.data(), rows, cols,
                         stream());
  EXPECT_LE(relative_error(dx, plus(dx0, ref_dx)), kGradTol);
  EXPECT_LE(relative_error(dw, plus(dw0, ref_dw)), kGradTol);
  dx = nans(x.size());
  cpu().rmsnorm_backward(g.data(), x.data(), w.data(), rstd.data(), dx0.data(), dx.data(), nullptr, dw.data(), rows, cols,
                         stream());
  EXPECT_LE(relative_error(dx, plus(dx0, ref_dx)), kGradTol);
  // A frozen norm (dw == nullptr): the same dx.
  auto dx_frozen = nans(x.size());
  cpu().rmsnorm_backward(g.data(), x.data(), w.data(), rstd.data(), dx0.data(), dx_frozen.data(), nullptr, nullptr, rows, cols,
                         stream());
  EXPECT_EQ(dx_frozen, dx);
}

// ---- bias and add ------------------------------------------------------------------------------

TEST(CpuBias, AddBiasAndBackward) {
  const std::int64_t rows = 70, cols = 300;  // two column blocks in bias_backward
  const auto y0 = random_normal(rows * cols), bias = random_normal(cols);
  auto y = y0;
  cpu().add_bias(y.data(), bias.data(), rows, cols, stream());
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = 0; c < cols; ++c) ASSERT_EQ(y[r * cols + c], y0[r * cols + c] + bias[c]);

  const auto g = random_normal(rows * cols), db0 = random_normal(cols);
  std::vector<double> ref(cols);
  for (std::int64_t c = 0; c < cols; ++c) {
    double s = db0[c];
    for (std::int64_t r = 0; r < rows; ++r) s += g[r * cols + c];
    ref[c] = s;
  }
  auto db = db0;
  cpu().bias_backward(g.data(), db.data(), rows, cols, stream());
  EXPECT_LE(relative_error(db, ref), kForwardTol);
}

TEST(CpuBias, BackwardMatchesFiniteDifferences) {
  const std::int64_t rows = 5, cols = 7;
  const auto y0 = random_normal(rows * cols), bias = random_normal(cols), g = random_normal(rows * cols);
  std::vector<float> db(cols, 0.0f);
  cpu().bias_backward(g.data(), db.data(), rows, cols, stream());
  const auto fd = finite_difference(bias, [&](const std::vector<double>& b) {
    std::vector<double> y(y0.size());
    for (std::int64_t r = 0; r < rows; ++r)
      for (std::int64_t c = 0; c < cols; ++c) y[r * cols + c] = y0[r * cols + c] + b[c];
    return dot(y, g);
  });
  EXPECT_LE(relative_error(db, fd), kGradTol);
}

// ---- QK-norm + RoPE -----------------------------------------------------------------------------

// transformers' default RoPE frequencies: fp32 inv_freq = 1 / theta^(fp32(2i/d)), the power correctly rounded.
std::vector<float> default_inv_freq(int d, double theta) {
  std::vector<float> inv_freq(static_cast<std::size_t>(d / 2));
  for (int i = 0; i < d / 2; ++i) {
    inv_freq[i] = 1.0f / static_cast<float>(std::pow(theta, static_cast<double>(float(2 * i) / float(d))));
  }
  return inv_freq;
}

// Per-head RMSNorm (when w is non-empty) then rotate-half RoPE, in double but for the angle,
// which is transformers' fp32 product of the position and inv_freq.
std::vector<double> qk_norm_rope_fp64(const std::vector<double>& x, const std::vector<double>& w,
                                      const std::vector<std::int32_t>& positions, int n_heads, int d, double eps,
                                      const std::vector<float>& inv_freq, std::vector<double>* rstd = nullptr) {
  const std::int64_t tokens = static_cast<std::int64_t>(positions.size());
  std::vector<double> y(x.size()), h(static_cast<std::size_t>(d));
  if (rstd != nullptr) rstd->assign(static_cast<std::size_t>(tokens * n_heads), 0.0);
  for (std::int64_t t = 0; t < tokens; ++t)
    for (int hd = 0; hd < n_heads; ++hd) {
      const std::size_t base = static_cast<std::size_t>((t * n_heads + hd) * d);
      for (int i = 0; i < d; ++i) h[i] = x[base + i];
      if (!w.empty()) {
        double ms = 0.0;
        for (int i = 0; i < d; ++i) ms += h[i] * h[i];
        const double s = 1.0 / std::sqrt(ms / d + eps);
        for (int i = 0; i < d; ++i) h[i] = h[i] * s * w[i];
        if (rstd != nullptr) (*rstd)[t * n_heads + hd] = s;
      }
      for (int i = 0; i < d / 2; ++i) {
        const double angle = static_cast<float>(positions[t]) * inv_freq[i];
        // rotate_half(h) = [-h[d/2:], h[:d/2]];  y = h * cos + rotate_half(h) * sin
        y[base + i] = h[i] * std::cos(angle) + (-h[i + d / 2]) * std::sin(angle);
        y[base + i + d / 2] = h[i + d / 2] * std::cos(angle) + h[i] * std::sin(angle);
      }
    }
  return y;
}

void check_qk_forward(bool with_norm, std::int64_t tokens, int n_heads, int d, const std::vector<float>& inv_freq,
                      int max_position) {
  SCOPED_TRACE(testing::Message() << "norm=" << with_norm << " tokens=" << tokens << " heads=" << n_heads
                                  << " d=" << d << " inv_freq[1]=" << inv_freq[1]);
  const float eps = 1e-6f;
  const auto x = random_normal(tokens * n_heads * d, 3.0f);
  const auto w = with_norm ? random_normal(d) : std::vector<float>{};
  const auto positions = random_positions(tokens, max_position);
  auto y = nans(x.size());
  auto rstd = nans(tokens * n_heads);
  cpu().qk_norm_rope_forward(x.data(), with_norm ? w.data() : nullptr, y.data(), rstd.data(), positions.data(),
                             tokens, n_heads, d, eps, inv_freq.data(), stream());
  std::vector<double> ref_rstd;
  const auto ref = qk_norm_rope_fp64(to_double(x), to_double(w), positions, n_heads, d, eps, inv_freq, &ref_rstd);
  EXPECT_LE(relative_error(y, ref), kForwardTol);
  if (with_norm) EXPECT_LE(relative_error(rstd, ref_rstd), kForwardTol);
}

TEST(CpuQkNormRope, ForwardMatchesFp64) {
  check_qk_forward(true, 23, 3, 16, default_inv_freq(16, 10000.0), 64);
  check_qk_forward(false, 23, 3, 16, default_inv_freq(16, 10000.0), 64);
  // Qwen3-like head and theta, positions up to 8K, several threads.
  check_qk_forward(true, 50, 8, 128, default_inv_freq(128, 1000000.0), 8192);
  check_qk_forward(false, 50, 8, 128, default_inv_freq(128, 1000000.0), 8192);
  // Any frequencies (RoPE scaling rescales them): random ones in (0, 1].
  std::vector<float> any = random_normal(32);
  for (float& f : any) f = std::exp(-4.0f * std::abs(f));
  check_qk_forward(true, 40, 4, 64, any, 8192);
}

TEST(CpuQkNormRope, ConfigFrequenciesAreTransformersDefault) {
  for (int d : {8, 64, 128, 256})
    for (double theta : {10000.0, 500000.0, 1000000.0}) {
      EXPECT_EQ(test::rope_inv_freq(d, static_cast<float>(theta)), default_inv_freq(d, theta)) << d << " " << theta;
    }
}

TEST(CpuQkNormRope, PositionZeroIsIdentityRope) {
  // At position 0 the rotation is the identity, so without a norm y == x exactly.
  const int n_heads = 2, d = 8;
  const auto x = random_normal(3 * n_heads * d);
  const std::vector<std::int32_t> positions(3, 0);
  auto y = nans(x.size());
  cpu().qk_norm_rope_forward(x.data(), nullptr, y.data(), nullptr, positions.data(), 3, n_heads, d, 1e-6f,
                             default_inv_freq(d, 10000.0).data(), stream());
  EXPECT_EQ(y, x);
}

void check_qk_backward(bool with_norm, std::int64_t tokens, int n_heads, int d) {
  SCOPED_TRACE(testing::Message() << "norm=" << with_norm << " tokens=" << tokens);
  const float eps = 1e-6f;
  const std::vector<float> inv_freq = default_inv_freq(d, 10000.0);
  const auto x = random_normal(tokens * n_heads * d);
  const auto w = with_norm ? random_normal(d) : std::vector<float>{};
  const auto g = random_normal(x.size());
  const auto positions = random_positions(tokens, 100);
  const float* wp = with_norm ? w.data() : nullptr;
  auto y = nans(x.size()), rstd = nans(tokens * n_heads);
  cpu().qk_norm_rope_forward(x.data(), wp, y.data(), with_norm ? rstd.data() : nullptr, positions.data(), tokens,
                             n_heads, d, eps, inv_freq.data(), stream());
  auto dx = nans(x.size());
  const auto dw0 = with_norm ? random_normal(d) : std::vector<float>{};
  auto dw = dw0;
  cpu().qk_norm_rope_backward(g.data(), x.data(), wp, with_norm ? rstd.data() : nullptr, dx.data(),
                              with_norm ? dw.data() : nullptr, positions.data(), tokens, n_heads, d, inv_freq.data(),
                              stream());
  const auto xd = to_double(x), wd = to_double(w);
  const auto fd_x = finite_difference(x, [&](const std::vector<double>& v) {
    return dot(qk_norm_rope_fp64(v, wd, positions, n_heads, d, eps, inv_freq), g);
  });
  EXPECT_LE(relative_error(dx, fd_x), kGradTol);
  if (with_norm) {
    const auto fd_w = finite_difference(w, [&](const std::vector<double>& v) {
      return dot(qk_norm_rope_fp64(xd, v, positions, n_heads, d, eps, inv_freq), g);
    });
    EXPECT_LE(relative_error(dw, plus(dw0, fd_w)), kGradTol);  // dw accumulates
    auto dx_frozen = nans(x.size());  // a frozen norm (dw == nullptr): the same dx
    cpu().qk_norm_rope_backward(g.data(), x.data(), wp, rstd.data(), dx_frozen.data(), nullptr, positions.data(),
                                tokens, n_heads, d, inv_freq.data(), stream());
    EXPECT_EQ(dx_frozen, dx);
  }
}

TEST(CpuQkNormRope, Bf16InputIsTheFp32OpOnTheBf16Values) {
  // bf16-mode blocks keep q and k before the norm in bf16: the op widens them (exact).
  const std::int64_t tokens = 6;
  const int heads = 3, d = 8;
  const auto n = static_cast<std::size_t>(tokens * heads * d);
  const auto x16 = bf16_of(random_normal(n, 2.0f));
  const auto x = float_of(x16), w = random_normal(d), dy = random_normal(n);
  const std::vector<std::int32_t> pos{0, 1, 2, 0, 1, 5};
  const auto inv_freq = default_inv_freq(d, 10000.0);
  auto y = nans(n), r = nans(tokens * heads), r16in = nans(tokens * heads);
  std::vector<std::uint16_t> y16(n, 0xffff);
  cpu().qk_norm_rope_forward(x.data(), w.data(), y.data(), r.data(), pos.data(), tokens, heads, d, 1e-6f,
                             inv_freq.data(), stream());
  cpu().qk_norm_rope_forward(x16.data(), w.data(), y16.data(), r16in.data(), pos.data(), tokens, heads, d, 1e-6f,
                             inv_freq.data(), stream());
  EXPECT_EQ(y16, bf16_of(y));  // bf16 y: the same result rounded once
  EXPECT_EQ(r16in, r);
  auto dx = nans(n), dx16in = nans(n);
  std::vector<float> dw(d, 0.0f), dw16in(d, 0.0f);
  cpu().qk_norm_rope_backward(dy.data(), x.data(), w.data(), r.data(), dx.data(), dw.data(), pos.data(), tokens, heads,
                              d, inv_freq.data(), stream());
  cpu().qk_norm_rope_backward(dy.data(), x16.data(), w.data(), r.data(), dx16in.data(), dw16in.data(), pos.data(),
                              tokens, heads, d, inv_freq.data(), stream());
  EXPECT_EQ(dx16in, dx);
  EXPECT_EQ(dw16in, dw);
  // bf16 dx (bf16 mode without q/k biases): the same result rounded once.
  std::vector<std::uint16_t> dx16(n, 0xffff);
  std::vector<float> dw16out(d, 0.0f);
  cpu().qk_norm_rope_backward(dy.data(), x16.data(), w.data(), r.data(), dx16.data(), dw16out.data(), pos.data(),
                              tokens, heads, d, inv_freq.data(), stream());
  EXPECT_EQ(dx16, bf16_of(dx));
  EXPECT_EQ(dw16out, dw);
}

TEST(CpuQkNormRope, BackwardMatchesFiniteDifferences) {
  check_qk_backward(true, 5, 2, 8);
  check_qk_backward(false, 5, 2, 8);
  // More than one 32-token chunk of dw partial sums.
  check_qk_backward(true, 70, 2, 8);
}

// ---- SwiGLU -------------------------------------------------------------------------------------

std::vector<double> swiglu_fp64(const std::vector<double>& gate_up, std::int64_t rows, std::int64_t cols) {
  std::vector<double> out(static_cast<std::size_t>(rows * cols));
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = 0; c < cols; ++c) {
      const double g = gate_up[r * 2 * cols + c], u = gate_up[r * 2 * cols + cols + c];
      out[r * cols + c] = g / (1.0 + std::exp(-g)) * u;
    }
  return out;
}

TEST(CpuSwiglu, ForwardMatchesFp64) {
  const std::int64_t rows = 41, cols = 1000;
  auto gate_up = random_normal(rows * 2 * cols, 3.0f);
  gate_up[0] = -100.0f;  // sigmoid underflows to 0: must give -0, not NaN
  gate_up[1] = 100.0f;
  auto out = nans(rows * cols);
  cpu().swiglu_forward(gate_up.data(), out.data(), rows, cols, stream());
  EXPECT_LE(relative_error(out, swiglu_fp64(to_double(gate_up), rows, cols)), kForwardTol);
}

TEST(CpuSwiglu, BackwardMatchesFiniteDifferences) {
  const std::int64_t rows = 6, cols = 17;
  const auto gate_up = random_normal(rows * 2 * cols, 2.0f), g = random_normal(rows * cols);
  auto d = nans(gate_up.size());
  cpu().swiglu_backward(g.data(), gate_up.data(), d.data(), rows, cols, stream());
  const auto fd = finite_difference(gate_up, [&](const std::vector<double>& v) { return dot(swiglu_fp64(v, rows, cols), g); });
  EXPECT_LE(relative_error(d, fd), kGradTol);
}

TEST(CpuSwiglu, Bf16GateUpAndOutputsAreTheFp32OpOnTheBf16Values) {
  // bf16-mode blocks keep gate_up (and the backward's dout) in bf16: the op widens them (exact) and
  // rounds bf16 outputs once.
  const std::int64_t rows = 5, cols = 33;
  const auto gu16 = bf16_of(random_normal(rows * 2 * cols, 2.0f)), g16 = bf16_of(random_normal(rows * cols));
  const auto gate_up = float_of(gu16), g = float_of(g16);
  auto out = nans(rows * cols), out_from16 = nans(rows * cols);
  cpu().swiglu_forward(gate_up.data(), out.data(), rows, cols, stream());
  cpu().swiglu_forward(gu16.data(), out_from16.data(), rows, cols, stream());
  EXPECT_EQ(out_from16, out);
  std::vector<std::uint16_t> out16(out.size(), 0xffff);
  cpu().swiglu_forward(gu16.data(), out16.data(), rows, cols, stream());
  EXPECT_EQ(out16, bf16_of(out));
  auto d = nans(gate_up.size()), d_from16 = nans(gate_up.size());
  cpu().swiglu_backward(g.data(), gate_up.data(), d.data(), rows, cols, stream());
  cpu().swiglu_backward(g16.data(), gu16.data(), d_from16.data(), rows, cols, stream());
  EXPECT_EQ(d_from16, d);
  std::vector<std::uint16_t> d16(d.size(), 0xffff);
  cpu().swiglu_backward(g16.data(), gu16.data(), d16.data(), rows, cols, stream());
  EXPECT_EQ(d16, bf16_of(d));
}

// ---- attention forwarding -----------------------------------------------------------------------

TEST(CpuAttention, BackendForwardsToReference) {
  // The attention math is tested in test_attention.cpp; here only the Backend's argument order.
  const std::vector<std::int32_t> cu_seqlens{0, 3, 8};
  const std::int64_t tokens = 8;
  const int nq = 4, nkv = 2, d = 8;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const auto q = random_normal(tokens * nq * d), k = random_normal(tokens * nkv * d), v = random_normal(tokens * nkv * d);
  const auto dout = random_normal(q.size());
  auto out = nans(q.size()), lse = nans(tokens * nq), out_ref = nans(q.size()), lse_ref = nans(tokens * nq);
  cpu().attention_forward(q.data(), k.data(), v.data(), out.data(), lse.data(), cu_seqlens.data(), 2, 5, tokens,
                          nq, nkv, d, scale, Precision::BF16, stream());  // precision: ignored on CPU
  cpu::attention_forward(q.data(), k.data(), v.data(), out_ref.data(), lse_ref.data(), cu_seqlens.data(), 2, 5,
                         tokens, nq, nkv, d, scale);
  EXPECT_EQ(out, out_ref);
  EXPECT_EQ(lse, lse_ref);

  const std::int64_t ws = cpu().attention_workspace_floats(tokens, nq, nkv, d);
  EXPECT_EQ(ws, cpu::attention_backward_workspace_floats(tokens, nq, nkv, d));
  std::vector<float> workspace(static_cast<std::size_t>(std::max<std::int64_t>(ws, 1)));
  auto dq = nans(q.size()), dk = nans(k.size()), dv = nans(v.size());
  auto dq_ref = nans(q.size()), dk_ref = nans(k.size()), dv_ref = nans(v.size());
  cpu().attention_backward(q.data(), k.data(), v.data(), out.data(), dout.data(), lse.data(), dq.data(), dk.data(),
                           dv.data(), workspace.data(), cu_seqlens.data(), 2, 5, tokens, nq, nkv, d, scale,
                           Precision::TF32, stream());
  cpu::attention_backward(q.data(), k.data(), v.data(), out.data(), dout.data(), lse.data(), dq_ref.data(),
                          dk_ref.data(), dv_ref.data(), workspace.data(), cu_seqlens.data(), 2, 5, tokens, nq, nkv,
                          d, scale);
  EXPECT_EQ(dq, dq_ref);
  EXPECT_EQ(dk, dk_ref);
  EXPECT_EQ(dv, dv_ref);
}

}  // namespace
}  // namespace cudablocks

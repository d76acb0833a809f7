// GEMM, CPU reference: see gemm.hpp for the contract.
//
// The classic cache-blocked structure (as in BLIS / llm.c's CPU matmul, written for clarity):
//   - C is cut into tiles of MC x NC; each tile is one task for parallel_for.
//   - For each K-block of KC, the task copies ("packs") its slice of op(A) [MC, KC] and op(B)
//     [KC, NC] into contiguous buffers laid out exactly as the micro-kernel reads them. Packing
//     is also where the four trans_a / trans_b cases are resolved: everything after it sees one
//     layout.
//   - The micro-kernel computes an MR x NR block of C as a sum of KC outer products, holding the
//     block in registers (the fixed-size loops vectorise without any intrinsics).
//   - Each K-block's fp32 partial sums are added into a double accumulator for the tile, which
//     is scaled by alpha (and beta * C added) and rounded once at the end.
#include "cpu/gemm.hpp"

#include <algorithm>
#include <vector>

#include "cpu/parallel.hpp"

namespace cudablocks::cpu {
namespace {

constexpr std::int64_t MR = 4;    // rows of a micro-tile
constexpr std::int64_t NR = 8;    // columns of a micro-tile (MR x NR accumulators fit SSE's 16 registers)
constexpr std::int64_t MC = 64;   // rows of a task's tile (multiple of MR)
constexpr std::int64_t NC = 256;  // columns of a task's tile (multiple of NR)
constexpr std::int64_t KC = 256;  // depth of one fp32 partial sum

std::int64_t round_up(std::int64_t x, std::int64_t to) { return (x + to - 1) / to * to; }

// Packs op(A)[i0 : i0 + mc, p0 : p0 + kc] as strips of MR rows; strip s holds element (row r,
// depth p) at s * MR * kc + p * MR + r. Rows past mc are zero, so every micro-tile is full.
void pack_a(bool trans_a, const float* a, std::int64_t m, std::int64_t k, std::int64_t i0, std::int64_t mc,
            std::int64_t p0, std::int64_t kc, float* out) {
  for (std::int64_t s = 0; s < mc; s += MR) {
    float* strip = out + s * kc;
    const std::int64_t rows = std::min(MR, mc - s);
    if (!trans_a) {
      // A [M, K]: each row is contiguous along p.
      for (std::int64_t r = 0; r < rows; ++r) {
        const float* row = a + (i0 + s + r) * k + p0;
        for (std::int64_t p = 0; p < kc; ++p) strip[p * MR + r] = row[p];
      }
    } else {
      // A [K, M]: for each p, the strip's rows are contiguous.
      for (std::int64_t p = 0; p < kc; ++p) {
        const float* col = a + (p0 + p) * m + i0 + s;
        for (std::int64_t r = 0; r < rows; ++r) strip[p * MR + r] = col[r];
      }
    }
    for (std::int64_t r = rows; r < MR; ++r)
      for (std::int64_t p = 0; p < kc; ++p) strip[p * MR + r] = 0.0f;
  }
}

// Packs op(B)[p0 : p0 + kc, j0 : j0 + nc] as strips of NR columns; strip s holds element (depth
// p, column j) at s * NR * kc + p * NR + j. Columns past nc are zero.
void pack_b(bool trans_b, const float* b, std::int64_t n, std::int64_t k, std::int64_t j0, std::int64_t nc,
            std::int64_t p0, std::int64_t kc, float* out) {
  for (std::int64_t s = 0; s < nc; s += NR) {
    float* strip = out + s * kc;
    const std::int64_t cols = std::min(NR, nc - s);
    if (!trans_b) {
      // B [K, N]: for each p, the strip's columns are contiguous.
      for (std::int64_t p = 0; p < kc; ++p) {
        const float* row = b + (p0 + p) * n + j0 + s;
        for (std::int64_t j = 0; j < cols; ++j) strip[p * NR + j] = row[j];
        for (std::int64_t j = cols; j < NR; ++j) strip[p * NR + j] = 0.0f;
      }
    } else {
      // B [N, K]: each column of op(B) is a contiguous row of B.
      for (std::int64_t j = 0; j < cols; ++j) {
        const float* col = b + (j0 + s + j) * k + p0;
        for (std::int64_t p = 0; p < kc; ++p) strip[p * NR + j] = col[p];
      }
      for (std::int64_t j = cols; j < NR; ++j)
        for (std::int64_t p = 0; p < kc; ++p) strip[p * NR + j] = 0.0f;
    }
  }
}

// On x86-64 with GCC, the micro-kernel is also compiled for AVX2 + FMA and the better version is
// picked when the library loads (the package is built for baseline x86-64, i.e. SSE2).
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__) && defined(__linux__)
#define CUDABLOCKS_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define CUDABLOCKS_CPU_CLONES
#endif

// tile[MR, NR] = sum over p < kc of (column p of the A strip) x (row p of the B strip), in fp32.
// Plain fixed-size loops: the compiler keeps acc in vector registers.
CUDABLOCKS_CPU_CLONES
void micro_kernel(std::int64_t kc, const float* __restrict a, const float* __restrict b, float* __restrict tile) {
  float acc[MR][NR] = {};
  for (std::int64_t p = 0; p < kc; ++p) {
    const float* ap = a + p * MR;
    const float* bp = b + p * NR;
    for (std::int64_t r = 0; r < MR; ++r)
      for (std::int64_t j = 0; j < NR; ++j) acc[r][j] += ap[r] * bp[j];
  }
  for (std::int64_t r = 0; r < MR; ++r)
    for (std::int64_t j = 0; j < NR; ++j) tile[r * NR + j] = acc[r][j];
}

// C = beta * C (C = 0 when beta == 0, without reading it): the whole result when alpha == 0 or K == 0.
void scale_c(std::int64_t m, std::int64_t n, float beta, float* c) {
  parallel_for(m, [&](std::int64_t i) {
    float* row = c + i * n;
    for (std::int64_t j = 0; j < n; ++j) row[j] = beta == 0.0f ? 0.0f : beta * row[j];
  }, /*grain=*/std::max<std::int64_t>(1, 65536 / std::max<std::int64_t>(n, 1)));
}

}  // namespace

void gemm(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
          const float* a, const float* b, float beta, float* c) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0 || alpha == 0.0f) {
    scale_c(m, n, beta, c);
    return;
  }
  const std::int64_t tiles_m = (m + MC - 1) / MC;
  const std::int64_t tiles_n = (n + NC - 1) / NC;
  // Tasks below ~4 MFLOP share a thread: small products are not worth starting threads for.
  const std::int64_t task_flops = 2 * std::min(m, MC) * std::min(n, NC) * k;
  const std::int64_t grain = std::max<std::int64_t>(1, (std::int64_t{1} << 22) / task_flops);

  // Task t computes the tile (t / tiles_n, t % tiles_n), so consecutive tasks share rows of A.
  parallel_for(tiles_m * tiles_n, [&](std::int64_t t) {
    const std::int64_t i0 = (t / tiles_n) * MC, mc = std::min(MC, m - i0);
    const std::int64_t j0 = (t % tiles_n) * NC, nc = std::min(NC, n - j0);
    std::vector<float> packed_a(static_cast<std::size_t>(round_up(mc, MR) * KC));
    std::vector<float> packed_b(static_cast<std::size_t>(round_up(nc, NR) * KC));
    std::vector<double> acc(static_cast<std::size_t>(mc * nc), 0.0);
    float tile[MR * NR];

    for (std::int64_t p0 = 0; p0 < k; p0 += KC) {
      const std::int64_t kc = std::min(KC, k - p0);
      pack_a(trans_a, a, m, k, i0, mc, p0, kc, packed_a.data());
      pack_b(trans_b, b, n, k, j0, nc, p0, kc, packed_b.data());
      // One B strip (kc x NR, a few KB) stays in L1 while every A strip of the tile streams past it.
      for (std::int64_t js = 0; js < nc; js += NR) {
        for (std::int64_t is = 0; is < mc; is += MR) {
          micro_kernel(kc, packed_a.data() + is * kc, packed_b.data() + js * kc, tile);
          const std::int64_t rows = std::min(MR, mc - is), cols = std::min(NR, nc - js);
          for (std::int64_t r = 0; r < rows; ++r) {
            double* acc_row = acc.data() + (is + r) * nc + js;
            for (std::int64_t j = 0; j < cols; ++j) acc_row[j] += tile[r * NR + j];
          }
        }
      }
    }

    // C = alpha * acc + beta * C in double, rounded once; C is not read when beta == 0.
    for (std::int64_t r = 0; r < mc; ++r) {
      float* c_row = c + (i0 + r) * n + j0;
      const double* acc_row = acc.data() + r * nc;
      for (std::int64_t j = 0; j < nc; ++j) {
        double value = static_cast<double>(alpha) * acc_row[j];
        if (beta != 0.0f) value += static_cast<double>(beta) * c_row[j];
        c_row[j] = static_cast<float>(value);
      }
    }
  }, grain);
}

}  // namespace cudablocks::cpu

// Host emulation of the wgmma attention kernels (native/src/cuda/attention_wgmma.cu, tf32, and
// attention_wgmma_bf16.cu, bf16) for machines without a GPU: the kernels' own source is compiled for
// the host (CUDABLOCKS_ATTN_MMA_EMULATION) and run on emu_harness.hpp's threads and barriers. wgmma
// (tf32 m64nNk8 and bf16 m64nNk16, A from shared memory or registers, B from shared memory, K-major
// or for bf16 MN-major) is emulated from the shared-memory descriptor (start address, the leading
// and stride byte offsets, the 128-byte swizzle: bits 4-6 of an address XORed with bits 7-9) and
// the PTX ISA's register fragment layouts; each wgmma runs when it is issued (the fences, commits
// and waits do nothing), cp.async copies at once. Checks the forward, the dK/dV pass (with splits)
// and the dQ pass against the CPU fp32 reference on small ragged shapes (bf16: on bf16 values). Like
// attention_mma_emu.cpp, a check of everything around the instructions (staging, the swizzled and
// transposed tiles, masking, the online softmax, GQA, the grid loops), not of the instructions'
// semantics, which are this file's assumptions (the kernels agree with the mma.sync ones on an
// H200). Takes under half a minute. ctest runs it in a build with the CUDA backend (CMakeLists.txt
// builds it with the host compiler).
#define __CUDA_ARCH_FEAT_SM90_ALL 1

#include <algorithm>

#include "emu_harness.hpp"

namespace cudablocks::cuda {
namespace {
alignas(1024) unsigned char smem_raw[232448];  // the H200's shared memory per block

// Shared-memory addresses are offsets into smem_raw.
inline std::uint32_t __cvta_generic_to_shared(const void* p) {
  return static_cast<std::uint32_t>(static_cast<const unsigned char*>(p) - smem_raw);
}
inline int min(int a, int b) { return std::min(a, b); }

// The descriptor the kernels build (cuda/wgmma.cuh's encoding) and the element it points at.
inline std::uint64_t smem_desc(std::uint32_t addr) {
  return static_cast<std::uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<std::uint64_t>(1) << 16) |
         (static_cast<std::uint64_t>(1024 >> 4) << 32) | (static_cast<std::uint64_t>(1) << 62);
}
// Row r, k-element k (4-byte values) of the K-major operand that desc starts.
inline float operand(std::uint64_t desc, int r, int k) {
  const std::uint32_t start = static_cast<std::uint32_t>(desc & 0x3FFF) << 4;
  const std::uint32_t stride = static_cast<std::uint32_t>((desc >> 32) & 0x3FFF) << 4;
  const std::uint32_t logical = start + (r >> 3) * stride + (r & 7) * 128 + k * 4;
  const std::uint32_t physical = logical ^ (((logical >> 7) & 7) << 4);
  std::uint32_t u;
  std::memcpy(&u, smem_raw + physical, 4);
  return bits_f(u & 0xffffe000u);  // tf32 reads the top 19 bits
}

// The MN-major descriptor (cuda/wgmma.cuh's encoding): byte stride between 64-value column chunks.
inline std::uint64_t smem_desc_mn(std::uint32_t addr, std::uint32_t mn_stride) {
  return static_cast<std::uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<std::uint64_t>(mn_stride >> 4) << 16) |
         (static_cast<std::uint64_t>(1024 >> 4) << 32) | (static_cast<std::uint64_t>(1) << 62);
}
// Element (mn, k) of the 16-bit operand that desc starts: K-major (rows mn of 128 bytes, k along the
// row; 8-row groups SBO apart) or MN-major (rows k of 64 mn-values, 8-row groups SBO apart, 64-value
// chunks along mn LBO apart); the 128-byte swizzle on the address either way.
inline float operand16(std::uint64_t desc, int mn, int k, bool mn_major) {
  const std::uint32_t start = static_cast<std::uint32_t>(desc & 0x3FFF) << 4;
  const std::uint32_t lead = static_cast<std::uint32_t>((desc >> 16) & 0x3FFF) << 4;
  const std::uint32_t stride = static_cast<std::uint32_t>((desc >> 32) & 0x3FFF) << 4;
  const std::uint32_t logical = mn_major ? start + (mn >> 6) * lead + (k >> 3) * stride + (k & 7) * 128 + (mn & 63) * 2
                                         : start + (mn >> 3) * stride + (mn & 7) * 128 + k * 2;
  const std::uint32_t physical = logical ^ (((logical >> 7) & 7) << 4);
  std::uint16_t u;
  std::memcpy(&u, smem_raw + physical, 2);
  return bits_f(static_cast<std::uint32_t>(u) << 16);
}

inline void wgmma_fence() {}
inline void wgmma_commit() {}
template <int N>
inline void wgmma_wait() {}
inline void fence_proxy_async() {}
template <int N>
inline void fence_operands(float (&)[N]) {}
template <int S>
inline void hold(std::uint32_t (&)[S][4]) {}
inline void warpgroup_barrier(int wg) { g_warpgroup_bar[wg]->arrive_and_wait(); }

// d[i] of this thread: row 16 w + g + 8 ((i / 2) % 2) of the warpgroup's 64, column 8 (i / 4) + 2 t + i % 2.
template <int N, class A>
void wgmma_tf32(float (&d)[N / 2], A a_of, std::uint64_t desc_b) {
  const int l = lane_id(), g = l >> 2, t = l & 3;
  for (int i = 0; i < N / 2; ++i) {
    const int row = g + 8 * ((i >> 1) & 1), col = 8 * (i >> 2) + 2 * t + (i & 1);
    double acc = d[i];
    for (int k = 0; k < 8; ++k) acc += static_cast<double>(a_of(row, k)) * operand(desc_b, col, k);
    d[i] = static_cast<float>(acc);
  }
}
template <int M>
void wgmma_ss_tf32(float (&d)[M], std::uint64_t desc_a, std::uint64_t desc_b) {
  const int w = warp_id() & 3;
  wgmma_tf32<2 * M>(d, [&](int row, int k) { return operand(desc_a, 16 * w + row, k); }, desc_b);
}
// A from registers: lane 4g + t holds (g, t), (g + 8, t), (g, t + 4), (g + 8, t + 4) of its warp's 16 rows.
inline void wgmma_rs_tf32(float (&d)[64], const std::uint32_t (&a)[4], std::uint64_t desc_b) {
  WarpBuf& buf = g_wbuf[warp_id()];
  for (int i = 0; i < 4; ++i) buf.w[lane_id()][i] = a[i];
  warp_sync();
  float frag[16][8];
  for (int ln = 0; ln < 32; ++ln) {
    const int g = ln >> 2, t = ln & 3;
    const std::uint32_t* r = buf.w[ln];
    frag[g][t] = bits_f(r[0] & 0xffffe000u);
    frag[g + 8][t] = bits_f(r[1] & 0xffffe000u);
    frag[g][t + 4] = bits_f(r[2] & 0xffffe000u);
    frag[g + 8][t + 4] = bits_f(r[3] & 0xffffe000u);
  }
  warp_sync();
  wgmma_tf32<128>(d, [&](int row, int k) { return frag[row][k]; }, desc_b);
}

// bf16 (k = 16 per instruction): d[i] as above; A from shared memory (K-major) or from registers,
// lane 4g + t holding bf16 pairs (low half first) (g, 2t..), (g + 8, 2t..), (g, 2t + 8..),
// (g + 8, 2t + 8..); B K-major, or MN-major with TransB.
template <int N, class A>
void wgmma_bf16(float (&d)[N / 2], A a_of, std::uint64_t desc_b, bool b_mn_major) {
  const int l = lane_id(), g = l >> 2, t = l & 3;
  for (int i = 0; i < N / 2; ++i) {
    const int row = g + 8 * ((i >> 1) & 1), col = 8 * (i >> 2) + 2 * t + (i & 1);
    double acc = d[i];
    for (int k = 0; k < 16; ++k) acc += static_cast<double>(a_of(row, k)) * operand16(desc_b, col, k, b_mn_major);
    d[i] = static_cast<float>(acc);
  }
}
template <int M>
void wgmma_ss(float (&d)[M], std::uint64_t desc_a, std::uint64_t desc_b) {
  const int w = warp_id() & 3;
  wgmma_bf16<2 * M>(d, [&](int row, int k) { return operand16(desc_a, 16 * w + row, k, false); }, desc_b, false);
}
template <int TransB>
void wgmma_rs(float (&d)[64], const std::uint32_t (&a)[4], std::uint64_t desc_b) {
  WarpBuf& buf = g_wbuf[warp_id()];
  for (int i = 0; i < 4; ++i) buf.w[lane_id()][i] = a[i];
  warp_sync();
  float frag[16][16];
  for (int ln = 0; ln < 32; ++ln) {
    const int g = ln >> 2, t = ln & 3;
    const std::uint32_t* r = buf.w[ln];
    for (int e = 0; e < 2; ++e) {
      const int sh = 16 * (1 - e);  // low half: the lower k
      frag[g][2 * t + e] = bits_f((r[0] << sh) & 0xffff0000u);
      frag[g + 8][2 * t + e] = bits_f((r[1] << sh) & 0xffff0000u);
      frag[g][2 * t + 8 + e] = bits_f((r[2] << sh) & 0xffff0000u);
      frag[g + 8][2 * t + 8 + e] = bits_f((r[3] << sh) & 0xffff0000u);
    }
  }
  warp_sync();
  wgmma_bf16<128>(d, [&](int row, int k) { return frag[row][k]; }, desc_b, TransB == 1);
}
}  // namespace
}  // namespace cudablocks::cuda

#include "cuda/attention_wgmma.cu"
#include "cuda/attention_wgmma_bf16.cu"

using namespace cudablocks::cuda;

// One precision's kernels, their inputs and outputs, and the error bounds against the CPU reference
// (its operand rounding, as attention_mma_emu.cpp and the GPU tests bound it).
struct Tf32 {
  using In = float;
  static constexpr bool kBf16Values = false;
  static constexpr unsigned kDkvTiles = 1;  // 64-key tiles per dK/dV block
  static constexpr unsigned kDkvThreads = kThreads;
  static constexpr double kOutBound = 2e-3, kGradBound = 5e-3;
  static std::vector<In> in(const std::vector<float>& x) { return x; }
  static std::vector<float> out(const std::vector<In>& x) { return x; }
  static constexpr auto forward = attention_wgmma_forward_kernel;
  static constexpr auto dkdv = attention_wgmma_dkdv_kernel;
  static constexpr auto dq = attention_wgmma_dq_kernel;
};
struct Bf16 {
  using In = std::uint16_t;
  static constexpr bool kBf16Values = true;
  static constexpr unsigned kDkvTiles = bf16io::kDkvWgs;
  static constexpr unsigned kDkvThreads = bf16io::kDkvThreads;
  static constexpr double kOutBound = 1.5e-2, kGradBound = 3e-2;  // out, P and dS rounded to bf16
  static std::vector<In> in(const std::vector<float>& x) { return bf16_bits_of(x); }
  static std::vector<float> out(const std::vector<In>& x) { return widened(x); }
  static constexpr auto forward = bf16io::attention_wgmma_bf16_forward_kernel;
  static constexpr auto dkdv = bf16io::attention_wgmma_bf16_dkdv_kernel;
  static constexpr auto dq = bf16io::attention_wgmma_bf16_dq_kernel;
};

// Forward, dK/dV pass (every split) and dQ pass on one shape against the CPU reference (on bf16
// values for the bf16 kernels); the backward from the reference's out and lse, its row dots on the
// host.
template <class K>
bool run_case(const std::vector<int>& lens, int nq, int nkv, int splits, unsigned tiles_hint, const char* name) {
  constexpr int D = 128;
  const AttentionCase c(lens, nq, nkv, D, K::kBf16Values);
  const std::vector<int32_t>& cu = c.pk.cu;
  const int T = c.pk.T, n_seqs = c.pk.n_seqs;
  const float scale = c.scale;
  const std::vector<typename K::In> q = K::in(c.q), k = K::in(c.k), v = K::in(c.v), dout = K::in(c.dout);
  // tiles_hint < the longest sequence's tiles: blocks loop over the rest.
  const unsigned tiles = std::min<unsigned>(tiles_hint, (c.pk.maxlen + 63) / 64);
  std::vector<typename K::In> out = K::in(std::vector<float>(c.out.size(), NAN));
  std::vector<float> lse(c.lse.size(), NAN);
  launch(dim3(nq / 2, n_seqs, tiles), kThreads, smem_raw, sizeof(smem_raw), [&] {
    K::forward(q.data(), k.data(), v.data(), out.data(), lse.data(), cu.data(), nq, nkv, scale * kLog2e);
  });
  const double eo = rel(K::out(out), c.out), el = rel(lse, c.lse);

  const int group = nq / nkv;
  const int64_t slab_n = (int64_t)T * nkv * D;
  const std::vector<float> dsum = c.row_dots();
  std::vector<float> rest(std::max<int64_t>(0, 2 * (splits - 1) - group) * slab_n + 1, NAN);
  std::vector<float> dq(c.q.size(), NAN), dk(c.k.size(), NAN), dv(c.v.size(), NAN);
  const Slabs slabs{dq.data(), rest.data(), group, slab_n};
  launch(dim3(nkv * splits, n_seqs, (tiles + K::kDkvTiles - 1) / K::kDkvTiles), K::kDkvThreads, smem_raw,
         sizeof(smem_raw),
         [&] {
           K::dkdv(q.data(), k.data(), v.data(), dout.data(), c.lse.data(), dsum.data(), dk.data(), dv.data(), slabs,
                   cu.data(), nq, nkv, splits, scale, scale * kLog2e);
         });
  for (int64_t i = 0; i < slab_n; ++i)  // attention_reduce_kernel: the slabs in split order
    for (int sp = 1; sp < splits; ++sp) {
      dk[i] += slabs(2 * (sp - 1))[i];
      dv[i] += slabs(2 * (sp - 1) + 1)[i];
    }
  launch(dim3(nq / 2, n_seqs, tiles), kThreads, smem_raw, sizeof(smem_raw), [&] {
    K::dq(q.data(), k.data(), v.data(), dout.data(), c.lse.data(), dsum.data(), dq.data(), cu.data(), nq, nkv, scale,
          scale * kLog2e);
  });
  const double eq = rel(dq, c.dq), ek = rel(dk, c.dk), ev = rel(dv, c.dv);
  const bool ok = eo <= K::kOutBound && el <= K::kOutBound && eq <= K::kGradBound && ek <= K::kGradBound &&
                  ev <= K::kGradBound;
  std::printf("%-34s splits %d: out %.3e lse %.3e dq %.3e dk %.3e dv %.3e  %s\n", name, splits, eo, el, eq, ek, ev,
              ok ? "OK" : "FAIL");
  return ok;
}

int main() {
  bool ok = true;
  ok &= run_case<Tf32>({150, 5}, 8, 2, 1, 65535, "tf32 d128 8/2 ragged");
  ok &= run_case<Tf32>({150, 5}, 8, 2, 4, 65535, "tf32 d128 8/2 ragged");
  ok &= run_case<Tf32>({64, 0, 33, 1}, 4, 2, 2, 65535, "tf32 d128 4/2 empty, tile edges");
  ok &= run_case<Tf32>({200}, 4, 1, 1, 1, "tf32 d128 4/1 one tile per grid");
  ok &= run_case<Bf16>({150, 5}, 8, 2, 1, 65535, "bf16 d128 8/2 ragged");
  ok &= run_case<Bf16>({150, 5}, 8, 2, 4, 65535, "bf16 d128 8/2 ragged");
  ok &= run_case<Bf16>({64, 0, 33, 1}, 4, 2, 2, 65535, "bf16 d128 4/2 empty, tile edges");
  ok &= run_case<Bf16>({200}, 4, 1, 1, 1, "bf16 d128 4/1 one tile per grid");
  std::printf(ok ? "ALL OK\n" : "SOME FAILED\n");
  return ok ? 0 : 1;
}

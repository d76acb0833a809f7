// The fused NF4 GEMM: c[m, n] = a[m, k] W^T with W decoded from bitsandbytes' NF4 inside the
// kernel, on Hopper's wgmma (sm_90a).
//
// Why fused: the staged path (dequantize W to a bf16 scratch, then cuBLAS) writes 2 bytes per
// weight element and reads them back, about a quarter of the GEMM's time at 512 tokens; here W
// crosses memory once, as 0.5 bytes per element plus its absmax.
//
// Shape of the work: a CTA computes a 128 x BN tile of c (BN = 256 weight rows, or 128 when the
// grid would otherwise leave multiprocessors idle), stepping k by 64, so that each step meets
// exactly one absmax block per weight row (blocks of 64 along the rows, k % 64 == 0). Two
// warpgroups own 64 rows of the tile each and issue wgmma m64nBNk16 with both operands in shared
// memory: a's rows (A) and W's decoded rows (B), both K-major in the 128-byte swizzle that wgmma
// reads (row r of 128 bytes at r * 128, its 16-byte chunk j at chunk j ^ (r % 8); 8 rows = 1 KB).
// The wide tile halves the L2 traffic of a's tiles (16 KB per step, re-read by every CTA of a row
// of tiles) per FLOP; measured, that traffic was not the limit (see Status).
// Per step kt the 256 threads
//   1. decode step kt's packed bytes, 16 bytes (32 values) per thread and pass: code x absmax in
//      fp32 rounded once to bf16 exactly as nf4_dequantize does, written to the swizzled B tile,
//   2. copy step kt + kAhead's a tile, packed W bytes and absmax into shared memory (cp.async),
//   3. issue step kt's four wgmma (k = 16 each) and wait only for step kt - 1's,
// so step kt's tensor-core work runs while step kt + 1 is copied and decoded. The code table is
// replicated per lane in shared memory (entry q of lane l at q * 32 + l): a lookup never conflicts.
//
// Status (H200, 2026-11-28; CudaNf4GemmTiming): correct (fp64 and exact-decode tests pass) but
// slower than the staged path at every size, so no block calls it yet. gate_up [m, 2560] x
// [19456, 2560]^T: 289 TFLOP/s at m = 4096 (staged 0.589 ms, fused 1.413 ms; cuBLAS on the bf16
// weight alone 0.555 ms), 219 at m = 512; down (k 9728, n 2560) 144-246. What bounds it (Nsight
// Compute, m = 16 where nothing else competes): a step takes ~2,060 cycles, in which each warp
// issues ~550 instructions (0.54 per scheduler-cycle, 2.35 resident warps per scheduler; the
// index math of the copies and the lookups dominates the decode's own arithmetic): decode and
// copies sit on the critical path of every step. fence.proxy.async compiles to MEMBAR.ALL.CTA, which also waits
// for the cp.async copies in flight. The 256-row tile (one CTA per SM) was slower than the 128-row
// one (two per SM): latency, not L2 traffic, is the limit. The design that should reach cuBLAS:
// warp-specialized (a producer warpgroup copying with TMA, no proxy fence for a's tile), W as
// wgmma's A operand from registers (RS: decoded straight into the fragment registers from weights
// re-packed once at block creation into fragment order, so no shared-memory store or fence for
// W at all), a per-block 16-entry bf16 table (code x absmax computed 16 times per block instead of
// per element), and the activations as the shared-memory B operand (c written transposed).
#include "cuda/nf4_gemm.cuh"

#include <cuda_bf16.h>

#include <cfloat>
#include <cstdint>

#include "core/nf4_format.hpp"
#include "cuda/check.hpp"
#include "cuda/cp_async.cuh"
#include "cudablocks/errors.hpp"

namespace cudablocks::cuda {

namespace {

constexpr int kBM = 128;          // rows of c (tokens) per CTA
constexpr int kBK = 64;           // k per step: one absmax block per weight row
constexpr int kThreads = 256;     // two warpgroups
constexpr int kTileA = kBM * kBK * 2;  // 16 KB: an a tile
constexpr int kMaxParts = 4;

// The tiling for BN weight rows per CTA. kAhead: steps copied ahead of the one being decoded. An a
// tile is read by the wgmma of its step, in flight until the end of the next step, so it needs
// kAhead + 2 slots; a packed W tile is read by the decode only (kAhead + 1 slots); a decoded B tile
// by its step's wgmma (2 slots). BN = 128 fits two CTAs per multiprocessor, BN = 256 one.
template <int BN>
struct Tiling {
  static constexpr int kAhead = BN == 256 ? 3 : 2;
  static constexpr int kCtasPerSm = BN == 256 ? 1 : 2;
  static constexpr int kAStages = kAhead + 2;
  static constexpr int kPStages = kAhead + 1;
  static constexpr int kBStages = 2;
  static constexpr int kTileB = BN * kBK * 2;
  static constexpr int kPackedBytes = BN * kBK / 2;
  static constexpr int kOffB = kAStages * kTileA;
  static constexpr int kOffPacked = kOffB + kBStages * kTileB;
  static constexpr int kOffAbsmax = kOffPacked + kPStages * kPackedBytes;
  static constexpr int kOffCode = kOffAbsmax + kPStages * BN * 4;
  static constexpr int kSmemAlloc = kOffCode + 16 * 32 * 4 + 1024;  // + 1 KB: the swizzle needs aligned tiles
};

// The stacked weights, by value in the kernel's parameters.
struct Parts {
  const std::uint8_t* packed[kMaxParts];
  const float* absmax[kMaxParts];
  std::int64_t end[kMaxParts];  // rows of parts 0..p together
  int count;
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// The wgmma shared-memory descriptor of a K-major tile in the 128-byte swizzle: start address,
// leading offset 16 bytes (unused by this layout), stride 1024 bytes between groups of 8 rows.
__device__ __forceinline__ std::uint64_t smem_desc(std::uint32_t addr) {
  return static_cast<std::uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<std::uint64_t>(1) << 16) |
         (static_cast<std::uint64_t>(1024 >> 4) << 32) | (static_cast<std::uint64_t>(1) << 62);
}

// d[64] += A[64 x 16] B[16 x 128] for this warpgroup (fp32 accumulators, bf16 operands).
__device__ __forceinline__ void wgmma_m64k16(float (&d)[64], std::uint64_t desc_a, std::uint64_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(1));
}

// d[128] += A[64 x 16] B[16 x 256] for this warpgroup (fp32 accumulators, bf16 operands).
__device__ __forceinline__ void wgmma_m64k16(float (&d)[128], std::uint64_t desc_a, std::uint64_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "l"(desc_a), "l"(desc_b), "r"(1));
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
// Shared memory written by ordinary stores (and cp.async) becomes visible to wgmma's async proxy.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

__device__ __forceinline__ std::uint32_t swizzled(int row, int chunk) {
  return static_cast<std::uint32_t>(row * 128 + ((chunk ^ (row & 7)) << 4));
}

// Copies step kt's a tile [128 x 64] (zeros past m), packed W bytes [BN x 32] and absmax [BN]
// (zeros past n) into the stage slots.
template <int BN>
__device__ __forceinline__ void load_step(const std::uint16_t* a, const Parts& parts, std::int64_t m, std::int64_t n,
                                          std::int64_t k, std::int64_t m0, std::int64_t n0, int kt,
                                          unsigned char* a_slot, unsigned char* p_slot, float* s_slot) {
  const int tid = threadIdx.x;
#pragma unroll
  for (int i = 0; i < kBM * 8 / kThreads; ++i) {
    const int c = tid + i * kThreads;
    const int row = c >> 3, chunk = c & 7;
    const bool valid = m0 + row < m;
    const std::uint16_t* src = valid ? a + (m0 + row) * k + kt * kBK + chunk * 8 : a;
    cp_async16(a_slot + swizzled(row, chunk), src, valid);
  }
  // 16-byte halves of weight rows' 32 packed bytes; the absmax of a row with its first half.
#pragma unroll
  for (int i = 0; i < BN / 128; ++i) {
    const int pair = tid + i * kThreads;
    const int row = pair >> 1, half = pair & 1;
    const std::int64_t wrow = n0 + row;
    const bool valid = wrow < n;
    // The part holding the row (a select chain: indexing the parameter arrays would copy them to
    // local memory).
    const std::uint8_t* packed = parts.packed[0];
    const float* absmax = parts.absmax[0];
    std::int64_t first = 0;
#pragma unroll
    for (int q = 1; q < kMaxParts; ++q) {
      if (q < parts.count && wrow >= parts.end[q - 1]) {
        packed = parts.packed[q];
        absmax = parts.absmax[q];
        first = parts.end[q - 1];
      }
    }
    const std::int64_t local = wrow - first;
    const std::uint8_t* src = valid ? packed + local * (k / 2) + kt * (kBK / 2) + half * 16 : parts.packed[0];
    cp_async16(p_slot + row * 32 + half * 16, src, valid);
    if (half == 0) {
      const float* s = valid ? absmax + local * (k / kBK) + kt : parts.absmax[0];
      cp_async4(s_slot + row, s, valid);
    }
  }
}

// Decodes 16 packed bytes of a weight row (32 values, high nibble first) into the swizzled bf16 B
// tile: values 32 half .. + 31 of the row, code x absmax in fp32 rounded once.
template <bool kFlush>
__device__ __forceinline__ void decode_row_half(const uint4 bits, float scale, const float* code, int lane,
                                                unsigned char* b_slot, int row, int half) {
  const std::uint32_t words[4] = {bits.x, bits.y, bits.z, bits.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    std::uint32_t out[4];
#pragma unroll
    for (int byte = 0; byte < 4; ++byte) {
      const std::uint32_t v = (words[j] >> (8 * byte)) & 0xffu;
      float hi = code[(v >> 4) * 32 + lane] * scale, lo = code[(v & 15u) * 32 + lane] * scale;
      if (kFlush) {
        hi = nf4::ftz(hi);
        lo = nf4::ftz(lo);
      }
      const __nv_bfloat162 pair = __floats2bfloat162_rn(hi, lo);  // .x (lower address) = the high nibble's
      out[byte] = *reinterpret_cast<const std::uint32_t*>(&pair);
    }
    *reinterpret_cast<uint4*>(b_slot + swizzled(row, half * 4 + j)) = make_uint4(out[0], out[1], out[2], out[3]);
  }
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

template <int BN, bool kBf16Out>
__global__ void __launch_bounds__(kThreads, Tiling<BN>::kCtasPerSm)
    nf4_gemm_kernel(const std::uint16_t* __restrict__ a, Parts parts, std::int64_t m, std::int64_t n, std::int64_t k,
                    const float* addend, float* c, std::uint16_t* c16) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Tl = Tiling<BN>;
  extern __shared__ unsigned char smem_raw[];
  const std::uint32_t raw = static_cast<std::uint32_t>(__cvta_generic_to_shared(smem_raw));
  unsigned char* smem = smem_raw + (((raw + 1023u) & ~1023u) - raw);
  const std::uint32_t base = static_cast<std::uint32_t>(__cvta_generic_to_shared(smem));
  float* code = reinterpret_cast<float*>(smem + Tl::kOffCode);
  const int tid = threadIdx.x, lane = tid & 31, wg = tid >> 7;
  const std::int64_t n0 = static_cast<std::int64_t>(blockIdx.x) * BN, m0 = static_cast<std::int64_t>(blockIdx.y) * kBM;
  const int steps = static_cast<int>(k / kBK);
  {
    constexpr float values[16] = CUDABLOCKS_NF4_CODE;
#pragma unroll
    for (int q = 0; q < 16; ++q) {  // warp w writes entries w and w + 8 (constant indices only)
      if (q % 8 == (tid >> 5)) code[q * 32 + lane] = values[q];
    }
  }
  auto a_slot = [&](int s) { return smem + (s % Tl::kAStages) * kTileA; };
  auto b_slot = [&](int s) { return smem + Tl::kOffB + (s % Tl::kBStages) * Tl::kTileB; };
  auto p_slot = [&](int s) { return smem + Tl::kOffPacked + (s % Tl::kPStages) * Tl::kPackedBytes; };
  auto s_slot = [&](int s) { return reinterpret_cast<float*>(smem + Tl::kOffAbsmax) + (s % Tl::kPStages) * BN; };

#pragma unroll
  for (int s = 0; s < Tl::kAhead; ++s) {
    if (s < steps) load_step<BN>(a, parts, m, n, k, m0, n0, s, a_slot(s), p_slot(s), s_slot(s));
    cp_async_commit();
  }
  float d[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) d[i] = 0.0f;

  for (int kt = 0; kt < steps; ++kt) {
    cp_async_wait_group<Tl::kAhead - 1>();  // this thread's copies of step kt have landed
    __syncthreads();  // everyone's copies of step kt are visible
#pragma unroll
    for (int i = 0; i < BN / 128; ++i) {  // (row, half) pairs: two per weight row
      const int pair = tid + i * kThreads;
      const int row = pair >> 1, half = pair & 1;
      const uint4 bits = *reinterpret_cast<const uint4*>(p_slot(kt) + row * 32 + half * 16);
      const float scale = nf4::ftz(s_slot(kt)[row]);
      // A product can be subnormal (bitsandbytes flushes it) only when |absmax| < FLT_MIN / 0.0796.
      if (fabsf(scale) < 16.0f * FLT_MIN) {
        decode_row_half<true>(bits, scale, code, lane, b_slot(kt), row, half);
      } else {
        decode_row_half<false>(bits, scale, code, lane, b_slot(kt), row, half);
      }
    }
    // The fence waits for this thread's outstanding memory operations (MEMBAR in SASS), so the next
    // copies are issued after it, not before: they would be waited for here at once.
    fence_proxy_async();
    // The whole B tile of step kt is written, and every warpgroup has retired step kt - 2's wgmma
    // (waited at the end of step kt - 1): its a slot may be refilled.
    __syncthreads();
    if (kt + Tl::kAhead < steps) {
      const int s = kt + Tl::kAhead;
      load_step<BN>(a, parts, m, n, k, m0, n0, s, a_slot(s), p_slot(s), s_slot(s));
    }
    cp_async_commit();
    const std::uint32_t a_addr = base + static_cast<std::uint32_t>((kt % Tl::kAStages) * kTileA + wg * 64 * 128);
    const std::uint32_t b_addr = base + static_cast<std::uint32_t>(Tl::kOffB + (kt % Tl::kBStages) * Tl::kTileB);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kBK / 16; ++ks) {
      // k16 slice ks: 32 bytes further along each 128-byte row (the swizzle is applied to the address).
      wgmma_m64k16(d, smem_desc(a_addr + ks * 32), smem_desc(b_addr + ks * 32));
    }
    wgmma_commit();
    wgmma_wait<1>();
  }
  wgmma_wait<0>();

  // Accumulator layout of wgmma m64nN (per warp, 16 rows): d[4 j + 2 i + e] is row 8 i + lane / 4,
  // column 8 j + 2 (lane % 4) + e of the warp's rows.
  const int warp = (tid & 127) >> 5;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const std::int64_t r = m0 + wg * 64 + warp * 16 + i * 8 + (lane >> 2);
    if (r >= m) continue;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      const std::int64_t col = n0 + j * 8 + 2 * (lane & 3);
      float v[2] = {d[4 * j + 2 * i], d[4 * j + 2 * i + 1]};
      if (!kBf16Out && addend != nullptr) {
#pragma unroll
        for (int e = 0; e < 2; ++e) v[e] += col + e < n ? addend[r * n + col + e] : 0.0f;
      }
      if (n % 2 == 0 && col < n) {  // pairs start at even offsets: 8- or 4-byte stores
        if constexpr (kBf16Out) {
          *reinterpret_cast<__nv_bfloat162*>(c16 + r * n + col) = __floats2bfloat162_rn(v[0], v[1]);
        } else {
          *reinterpret_cast<float2*>(c + r * n + col) = make_float2(v[0], v[1]);
        }
      } else {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          if (col + e >= n) continue;
          if constexpr (kBf16Out) {
            c16[r * n + col + e] = __bfloat16_as_ushort(__float2bfloat16_rn(v[e]));
          } else {
            c[r * n + col + e] = v[e];
          }
        }
      }
    }
  }
#else
  __trap();  // launched only where nf4_gemm_supported (an sm_90a build on a 9.0 device)
#endif
}

template <int BN>
void launch(const std::uint16_t* a, const Parts& p, std::int64_t m, std::int64_t n, std::int64_t k,
            const float* addend, float* c, std::uint16_t* c16, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((n + BN - 1) / BN), static_cast<unsigned>((m + kBM - 1) / kBM));
  constexpr int smem = Tiling<BN>::kSmemAlloc;
  // The dynamic shared-memory limit is raised each time (cheap; the attribute is per device context).
  if (c16 != nullptr) {
    CUDABLOCKS_CUDA_CHECK(cudaFuncSetAttribute(nf4_gemm_kernel<BN, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    nf4_gemm_kernel<BN, true><<<grid, kThreads, smem, stream>>>(a, p, m, n, k, nullptr, nullptr, c16);
  } else {
    CUDABLOCKS_CUDA_CHECK(cudaFuncSetAttribute(nf4_gemm_kernel<BN, false>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    nf4_gemm_kernel<BN, false><<<grid, kThreads, smem, stream>>>(a, p, m, n, k, addend, c, nullptr);
  }
  CUDABLOCKS_CHECK_LAUNCH("nf4_gemm_kernel");
}

}  // namespace

bool nf4_gemm_supported(std::int64_t k, int blocksize) {
#if defined(CUDABLOCKS_SM90A)
  if (blocksize != kBK || k % kBK != 0 || k <= 0) return false;
  int device = 0, major = 0, minor = 0;
  CUDABLOCKS_CUDA_CHECK(cudaGetDevice(&device));
  CUDABLOCKS_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  CUDABLOCKS_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  return major == 9 && minor == 0;
#else
  (void)k;
  (void)blocksize;
  return false;
#endif
}

void nf4_gemm_bf16(const std::uint16_t* a, const Nf4Rows* w, int parts, std::int64_t m, std::int64_t k,
                   const float* addend, float* c, std::uint16_t* c16, cudaStream_t stream) {
  if (parts < 1 || parts > kMaxParts) throw InvalidArgumentError("nf4_gemm_bf16: 1 to 4 weights per product");
  Parts p{};
  std::int64_t n = 0;
  for (int i = 0; i < parts; ++i) {
    n += w[i].rows;
    p.packed[i] = w[i].packed;
    p.absmax[i] = w[i].absmax;
    p.end[i] = n;
  }
  p.count = parts;
  if (m == 0 || n == 0) return;
  // The wide tile unless it would leave multiprocessors idle that the narrow one would use.
  int device = 0, sms = 0;
  CUDABLOCKS_CUDA_CHECK(cudaGetDevice(&device));
  CUDABLOCKS_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const std::int64_t tiles256 = ((n + 255) / 256) * ((m + kBM - 1) / kBM);
  if (tiles256 >= sms) {
    launch<256>(a, p, m, n, k, addend, c, c16, stream);
  } else {
    launch<128>(a, p, m, n, k, addend, c, c16, stream);
  }
}

}  // namespace cudablocks::cuda

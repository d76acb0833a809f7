// The fused NF4 GEMM: c[m, n] = a[m, k] W^T with W decoded from bitsandbytes' NF4 inside the
// kernel, on Hopper's wgmma (sm_90a).
//
// Why fused: the staged path (dequantize W to a bf16 scratch, then cuBLAS) writes 2 bytes per
// weight element and reads them back, about a third of the product's time at 512 tokens; here W
// crosses memory once, as 0.5 bytes per element plus its absmax.
//
// Roles: the weight rows are wgmma's M and the tokens its N, so that W is the A operand, which
// wgmma takes from registers: each thread decodes its own fragment of W straight from global
// memory into the registers the tensor cores read, and W never passes through shared memory
// (no store, no proxy fence, no bank conflicts). The tokens' tile of a (bf16, K-major) is the B
// operand in shared memory, copied by the tensor memory accelerator (TMA) in the 128-byte swizzle
// wgmma reads, completing on an mbarrier (again no proxy fence). c comes out transposed (weight
// rows across the lanes), which the epilogue writes back row-major.
//
// Shape of the work: a CTA computes c's tile of BN tokens x 128 weight rows, stepping k by 64 so
// that each step meets exactly one absmax block of each weight row (k % 64 == 0). Its two
// consumer warpgroups own 64 weight rows each and issue four wgmma m64nBNk16 per step; a producer
// warpgroup issues the TMA copies on per-stage full/empty mbarriers. A thread holds rows g and
// g + 8 of its warp's 16 (g = lane / 4) and, of each k16 slice, the value pairs at columns 2q and
// 2q + 8 (q = lane % 4): in bitsandbytes' layout (two values per byte, the even column in the
// high nibble) that is byte q of every 4-byte word of the row's 32 bytes for the step. The 4
// lanes of a quad load 8 of those bytes each (no byte loaded twice, so many steps fit in flight
// in registers) and 2 absmax; the decode gathers each word from its lane by a shuffle, picks byte
// q with prmt and turns it into a bf16 pair: two shuffles fetch the nibbles' code values from the
// table held in registers across the warp (a shared-memory table cost more: its lookups and W's
// loads went through L1, which then bounded the kernel), each multiplied by absmax in fp32 with
// flush-to-zero and rounded once to bf16 -- exactly nf4_dequantize's numbers.
//
// Pipeline: TMA runs up to kStages steps ahead; W's bytes are loaded kAhead steps ahead into
// registers; while step kt's wgmma run, the thread decodes step kt + 1 into the other fragment
// buffer. wgmma reads its register operand asynchronously, so a buffer is rewritten only after
// the wait that retires the step that read it (and an empty asm keeps the compiler from reusing
// its registers earlier). With few tokens, k may be split over CTAs (splits_for): each writes its
// partial sum, and a second kernel adds them in a fixed order (results do not depend on timing).
//
// Where it is used (H200, 2026-11-28; CudaNf4GemmTiming): with up to 64 tokens (32- and 64-token
// tiles) the kernel is bound by the decode's shuffles and beats the staged path (dequantize, then
// cuBLAS) on every Qwen3-4B product, e.g. at 16 tokens q 0.013 ms (staged 0.015), o 0.013 (0.022),
// gate_up 0.045 (0.071), down 0.021 (0.034); the nf4 block's forward takes it there. From 96
// tokens on (128- and 256-token tiles) it is slower than the staged path: gate_up at m = 4096
// 0.89 ms (staged 0.59, cuBLAS on the bf16 weight 0.56), at m = 512 0.14 ms (staged 0.12). Timed
// variants at m = 4096 showed the decode not overlapping the tensor cores' work although it is
// issued while they run (without the decode the kernel was on par with cuBLAS).

#include "cuda/nf4_gemm.cuh"

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

#include "core/nf4_format.hpp"
#include "cuda/check.hpp"
#include "cuda/cp_async.cuh"
#include "cuda/device_limits.hpp"
#include "cuda/mma_sync.cuh"
#include "cuda/scratch.hpp"
#include "cuda/wgmma.cuh"
#include "cudablocks/errors.hpp"

namespace cudablocks::cuda {

namespace {

constexpr int kBK = 64;        // k per step: one absmax block per weight row
constexpr int kRows = 128;     // weight rows per CTA: two warpgroups of 64
constexpr int kConsumers = 256;  // two warpgroups decode W and issue the wgmma
constexpr int kThreads = kConsumers + 128;  // and a third copies a's tiles (one thread of it)
constexpr int kMaxParts = 4;
constexpr int kOffBarriers = 0;
constexpr int kOffTiles = 1024;

// BN tokens per CTA: the a tile of a step is BN rows of 128 bytes. Few tokens leave the tensor
// cores little to do and the kernel waits on memory, so narrow tiles keep more of a's tiles
// (kStages) and of W's bytes (kAhead steps) in flight; wide tiles need their registers for
// accumulators.
template <int BN>
struct Tiling {
  static constexpr int kStages = BN <= 64 ? 8 : 4;
  static constexpr int kAhead = BN <= 64 ? 8 : BN == 128 ? 4 : 2;  // even: the main loop's unrolling
  static constexpr int kTileBytes = BN * kBK * 2;
  static constexpr int kSmemAlloc = kOffTiles + kStages * kTileBytes + 1024;  // + 1 KB to align the tiles
};

// The stacked weights, by value in the kernel's parameters.
struct Parts {
  const std::uint8_t* packed[kMaxParts];
  const float* absmax[kMaxParts];
  std::int64_t end[kMaxParts];  // rows of parts 0..p together
  int count;
};

__constant__ float kCodeTable[16] = CUDABLOCKS_NF4_CODE;  // NF4's code values, for the lanes to hold

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// ---- TMA and mbarrier ----

__device__ __forceinline__ void mbar_init(std::uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(std::uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_expect_bytes(std::uint32_t bar, int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// Spins until the barrier's phase with this parity has completed.
__device__ __forceinline__ void mbar_wait(std::uint32_t bar, int parity) {
  asm volatile(
      "{\n.reg .pred done;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
// a's tile of step kt (BN token rows x 64 columns, rows past m zero-filled) into `dst`.
__device__ __forceinline__ void tma_load(std::uint32_t dst, const CUtensorMap* map, int col, int row,
                                         std::uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          dst),
      "l"(reinterpret_cast<std::uint64_t>(map)), "r"(col), "r"(row), "r"(bar)
      : "memory");
}

// ---- the decode ----

// One thread's share of a step's W bytes, and the absmax of its two rows g and g + 8: the 4 lanes
// of a quad (one row pair) load 8 bytes each of the rows' 32 (no byte loaded twice), and the
// decode gathers the 32 from the quad by shuffles. Small, so that many steps can be in flight.
struct RawStep {
  uint2 bytes[2];
  float absmax[2];
};

// The weight holding stacked row `row`: its packed bytes, its absmax and its first stacked row. A
// select chain, because indexing the parameter arrays would copy them to local memory.
struct PartOfRow {
  const std::uint8_t* packed;
  const float* absmax;
  std::int64_t first;
};
__device__ __forceinline__ PartOfRow part_of(const Parts& parts, std::int64_t row) {
  PartOfRow part{parts.packed[0], parts.absmax[0], 0};
#pragma unroll
  for (int p = 1; p < kMaxParts; ++p) {
    if (p < parts.count && row >= parts.end[p - 1]) {
      part = PartOfRow{parts.packed[p], parts.absmax[p], parts.end[p - 1]};
    }
  }
  return part;
}

// The rows this thread decodes: where its share of their bytes and their absmax start (zeros past n).
struct RowSource {
  const std::uint8_t* packed[2];
  const float* absmax[2];
  bool valid[2];
};

__device__ __forceinline__ RowSource row_source(const Parts& parts, std::int64_t row0, std::int64_t n,
                                                std::int64_t k, int quad_lane) {
  RowSource src{};
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const std::int64_t row = row0 + 8 * r;
    const PartOfRow part = part_of(parts, row);
    src.valid[r] = row < n;
    src.packed[r] = part.packed + (row - part.first) * (k / 2) + 8 * quad_lane;
    src.absmax[r] = part.absmax + (row - part.first) * (k / kBK);
  }
  return src;
}

__device__ __forceinline__ void load_step(const RowSource& src, int kt, RawStep& raw) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const uint2* p = reinterpret_cast<const uint2*>(src.packed[r] + kt * (kBK / 2));
    raw.bytes[r] = src.valid[r] ? __ldg(p) : make_uint2(0, 0);
    raw.absmax[r] = src.valid[r] ? __ldg(src.absmax[r] + kt) : 0.0f;
  }
}

__device__ __forceinline__ float mul_ftz(float a, float b) {
  float r;
  asm("mul.rn.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

// Byte q of `word` (a pair of NF4 codes) as two bf16 values code x absmax, the high nibble's
// (the even column) in the low half.
// The code table lives in registers, entry i in lanes i and i + 16 (`code`), and a lookup is a
// shuffle: shfl reads only the low 5 bits of the source lane, so the low nibble needs no mask.
__device__ __forceinline__ std::uint32_t decode_pair(std::uint32_t word, std::uint32_t select, float absmax,
                                                     float code) {
  std::uint32_t byte;
  asm("prmt.b32 %0, %1, 0, %2;" : "=r"(byte) : "r"(word), "r"(select));
  const float hi = __shfl_sync(0xffffffffu, code, static_cast<int>(byte >> 4));
  const float lo = __shfl_sync(0xffffffffu, code, static_cast<int>(byte));
  const __nv_bfloat162 pair = __floats2bfloat162_rn(mul_ftz(hi, absmax), mul_ftz(lo, absmax));
  return *reinterpret_cast<const std::uint32_t*>(&pair);
}

// The A fragments of a step's four k16 slices: per slice {row g cols 2q.., row g+8 cols 2q..,
// row g cols 2q+8.., row g+8 cols 2q+8..}, i.e. byte q of words 2s and 2s + 1 of each row's 32
// bytes -- the words that lane s of the quad loaded (quad_first: the quad's first lane).
__device__ __forceinline__ void decode_step(const RawStep& raw, int quad_first, std::uint32_t select, float code,
                                            std::uint32_t (&a)[4][4]) {
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    std::uint32_t w[2][2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      w[r][0] = __shfl_sync(0xffffffffu, raw.bytes[r].x, quad_first + s);
      w[r][1] = __shfl_sync(0xffffffffu, raw.bytes[r].y, quad_first + s);
    }
    a[s][0] = decode_pair(w[0][0], select, raw.absmax[0], code);
    a[s][1] = decode_pair(w[1][0], select, raw.absmax[1], code);
    a[s][2] = decode_pair(w[0][1], select, raw.absmax[0], code);
    a[s][3] = decode_pair(w[1][1], select, raw.absmax[1], code);
  }
}

// One element of c: into this split's partial sum (several splits), c16 (+ its own value when
// add_c16), or c (+ addend).
__device__ __forceinline__ void emit(std::int64_t at, float v, float* part, const float* addend, float* c,
                                     std::uint16_t* c16, bool add_c16) {
  if (part != nullptr) {
    part[at] = v;
  } else if (c16 != nullptr) {
    c16[at] = __bfloat16_as_ushort(
        __float2bfloat16_rn(add_c16 ? v + __bfloat162float(__ushort_as_bfloat16(c16[at])) : v));
  } else {
    c[at] = addend != nullptr ? v + addend[at] : v;
  }
}

// f(integral_constant<I>) for I = 0 .. N - 1: names registers by compile-time indices.
template <int I, int N, typename F>
__device__ __forceinline__ void static_for(F&& f) {
  if constexpr (I < N) {
    f(std::integral_constant<int, I>{});
    static_for<I + 1, N>(f);
  }
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// gridDim.z splits k: CTA z takes steps [z S / Z, (z + 1) S / Z) of the S = k / 64 and, when
// there are several (partial != nullptr), writes its sum to partial[z] [m, n] for
// sum_splits_kernel to add up. Otherwise the epilogue writes c (+ addend), or c16 (+ c16's values
// when add_c16).
template <int BN>
__global__ void __launch_bounds__(kThreads, 1)
    nf4_gemm_kernel(const __grid_constant__ CUtensorMap a_map, Parts parts, std::int64_t m, std::int64_t n,
                    std::int64_t k, const float* addend, float* c, std::uint16_t* c16, bool add_c16,
                    float* partial) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Tl = Tiling<BN>;
  constexpr int kStages = Tl::kStages, kAhead = Tl::kAhead;
  extern __shared__ unsigned char smem_raw[];
  const std::uint32_t raw_addr = static_cast<std::uint32_t>(__cvta_generic_to_shared(smem_raw));
  unsigned char* smem = smem_raw + (((raw_addr + 1023u) & ~1023u) - raw_addr);  // the swizzle needs 1 KB alignment
  const std::uint32_t base = static_cast<std::uint32_t>(__cvta_generic_to_shared(smem));
  // full[s]: stage s holds its step's a tile (TMA's bytes landed); empty[s]: all 8 consumer warps
  // have retired the wgmma that read it.
  auto full = [&](int s) { return base + kOffBarriers + 8u * static_cast<std::uint32_t>(s); };
  auto empty = [&](int s) { return base + kOffBarriers + 8u * static_cast<std::uint32_t>(kStages + s); };
  auto tile = [&](int s) { return base + kOffTiles + static_cast<std::uint32_t>(s * Tl::kTileBytes); };

  const int tid = threadIdx.x, lane = tid & 31, warp = (tid >> 5) & 3, wg = tid >> 7;
  const std::int64_t n0 = static_cast<std::int64_t>(blockIdx.x) * kRows;
  const int m0 = static_cast<int>(blockIdx.y) * BN;
  const int total_steps = static_cast<int>(k / kBK);
  const int first_step = static_cast<int>(static_cast<std::int64_t>(blockIdx.z) * total_steps / gridDim.z);
  const int steps = static_cast<int>(static_cast<std::int64_t>(blockIdx.z + 1) * total_steps / gridDim.z) - first_step;
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full(s), 1);
      mbar_init(empty(s), kConsumers / 32);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();  // the last block-wide barrier: the producer warp leaves after its loop
  // Registers: 168 per thread at launch (384 threads); the producer warpgroup gives most of its
  // share to the consumers, which hold 128 (BN = 256) accumulators each.
  if (tid >= kConsumers) {  // the producer: step kt's a tile into stage kt % kStages once it is free
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if (tid == kConsumers) {
      for (int kt = 0; kt < steps; ++kt) {
        const int s = kt % kStages;
        if (kt >= kStages) mbar_wait(empty(s), (kt / kStages - 1) & 1);
        mbar_expect_bytes(full(s), Tl::kTileBytes);
        tma_load(tile(s), &a_map, (first_step + kt) * kBK, m0, full(s));
      }
    }
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");

  const RowSource src = row_source(parts, n0 + wg * 64 + warp * 16 + (lane >> 2), n, k, lane & 3);
  const int quad_first = lane & ~3;
  const std::uint32_t select = 0x4440u | static_cast<std::uint32_t>(lane & 3);  // byte q, zero-extended
  const float code = kCodeTable[lane & 15];  // the code table in registers: entry i in lanes i and i + 16
  // W's bytes run kAhead steps ahead of the decode: raw[j] holds step j, j + kAhead, ...
  RawStep raw[kAhead];
  std::uint32_t frag[2][4][4];
  static_for<0, kAhead>([&](auto j) {
    if (j < steps) load_step(src, first_step + j, raw[j]);
  });
  decode_step(raw[0], quad_first, select, code, frag[0]);
  if (kAhead < steps) load_step(src, first_step + kAhead, raw[0]);

  float d[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) d[i] = 0.0f;

  // Step kt, its fragments in buffer B = kt % 2, step kt + 1's bytes in raw[R], R = (kt + 1) % kAhead.
  // The loop runs kAhead (even) steps per turn, so that B and R are compile-time constants
  // (registers, not local memory).
  auto step = [&](int kt, auto buffer, auto slot) {
    constexpr int B = decltype(buffer)::value, R = decltype(slot)::value;
    const int s = kt % kStages;
    mbar_wait(full(s), (kt / kStages) & 1);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kBK / 16; ++ks) wgmma_rs(d, frag[B][ks], smem_desc(tile(s) + ks * 32));
    wgmma_commit();
    wgmma_wait<1>();  // step kt - 1 retired: the other buffer and its a stage are free
    hold(frag[1 - B]);
    if (kt + 1 < steps) {
      decode_step(raw[R], quad_first, select, code, frag[1 - B]);
      if (kt + 1 + kAhead < steps) load_step(src, first_step + kt + 1 + kAhead, raw[R]);
    }
    if (kt >= 1 && lane == 0) mbar_arrive(empty((kt - 1) % kStages));  // this warp is done with step kt - 1's tile
  };
  for (int kt = 0; kt < steps; kt += kAhead) {
    static_for<0, kAhead>([&](auto i) {
      if (kt + i < steps) {
        step(kt + i, std::integral_constant<int, i % 2>{}, std::integral_constant<int, (i + 1) % kAhead>{});
      }
    });
  }
  wgmma_wait<0>();
  hold(frag[0]);
  hold(frag[1]);

  // Accumulator layout of wgmma m64nBN (per warp, 16 weight rows): d[4 j + 2 i + e] is weight row
  // 8 i + lane / 4, token 8 j + 2 (lane % 4) + e. Stores: 8 lanes write 8 consecutive columns of c.
  const std::int64_t wrow0 = n0 + wg * 64 + warp * 16 + (lane >> 2);
  float* const part = partial != nullptr ? partial + static_cast<std::int64_t>(blockIdx.z) * m * n : nullptr;
#pragma unroll
  for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const std::int64_t token = m0 + j * 8 + 2 * (lane & 3) + e;
      if (token >= m) continue;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const std::int64_t col = wrow0 + 8 * i;
        if (col >= n) continue;
        emit(token * n + col, d[4 * j + 2 * i + e], part, addend, c, c16, add_c16);
      }
    }
  }
#else
  __trap();  // launched only where nf4_gemm_supported (an sm_90a build on a 9.0 device)
#endif
}

// ---- the transposed product (the input gradient): c[m, in] = a[m, out] W ----
//
// For few tokens, on mma.sync (any sm_80+ would do; built with the rest). A CTA computes c's tile
// of up to 64 tokens x 128 columns (W's columns), stepping over W's rows (the sum) 64 at a time:
// its 256 threads decode the step's W tile [64 rows, 128 columns] into shared memory, transposed,
// so that the pairs of consecutive rows of a column are adjacent (the B operand of m16n8k16 in its
// "col" layout); a's tile [64 tokens, 64 rows] comes by cp.async; each warp multiplies the tokens
// by 16 of the columns. Two stages, one barrier per step; W's bytes run kDxAhead steps ahead in
// registers; k may be split over CTAs as in the forward.
//
// Status (H200, 2026-11-28; CudaNf4GemmTiming): correct, but faster than the staged path only on
// the largest weights: gate_up (19456 x 2560) at 16 tokens 0.057 ms (staged 0.072), down 0.035
// (0.036), q 0.022 (0.016), k 0.016 (0.012). A step costs it about 1.6x the forward's decode
// time per element, and decode and mma do not overlap within a CTA (one barrier between them).
//
// Decode: thread t takes rows 2 (t / 8) and 2 (t / 8) + 1 and the 8 bytes (16 columns) t % 8 of
// each: one absmax block per row, and per column a bf16 pair (row 2i, row 2i + 1) -- one 32-bit
// store. Shared words are XOR-swizzled (bits 2-4 of the word within a row) so that both these
// stores and the fragment loads of mma hit 32 different banks.
constexpr int kDxCols = 128, kDxTokens = 64, kDxRows = 64, kDxThreads = 256, kDxAhead = 4;
constexpr int kDxWords = kDxRows / 2;  // 32-bit words per column (W^T) or per token (a) in a stage
constexpr int kDxStageWords = (kDxCols + kDxTokens) * kDxWords;
constexpr int kDxSmem = 2 * kDxStageWords * 4;

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// Word (column n, row pair kw) of the W^T tile, and (token, row pair kw) of a's tile.
__device__ __forceinline__ int bt_word(int n, int kw) { return n * kDxWords + (kw ^ (4 * ((n + (n >> 4)) & 7))); }
__device__ __forceinline__ int at_word(int token, int kw) {
  return kDxCols * kDxWords + token * kDxWords + (kw ^ (4 * (token & 7)));
}

// One thread's W bytes of a step: 8 bytes of each of its two rows, and their absmax.
struct DxRaw {
  uint2 bytes[2];
  float absmax[2];
};

// Step kt's bytes of rows kt * 64 + 2 pair + {0, 1} at column col0 (zeros past the rows).
__device__ __forceinline__ void load_dx_step(const Parts& parts, std::int64_t rows, std::int64_t in, int kt, int pair,
                                             std::int64_t col0, DxRaw& raw) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const std::int64_t row = static_cast<std::int64_t>(kt) * kDxRows + 2 * pair + i;
    raw.bytes[i] = make_uint2(0, 0);
    raw.absmax[i] = 0.0f;
    if (row >= rows || col0 >= in) continue;
    const PartOfRow part = part_of(parts, row);
    raw.bytes[i] = __ldg(reinterpret_cast<const uint2*>(part.packed + (row - part.first) * (in / 2) + col0 / 2));
    raw.absmax[i] = __ldg(part.absmax + (row - part.first) * (in / kBK) + col0 / kBK);
  }
}

// The 16 columns' pairs into the stage's W^T tile.
__device__ __forceinline__ void decode_dx_step(const DxRaw& raw, int pair, int col16, float code, std::uint32_t* bt) {
#pragma unroll
  for (int w = 0; w < 2; ++w) {
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const std::uint32_t byte0 = ((w ? raw.bytes[0].y : raw.bytes[0].x) >> (8 * b)) & 0xffu;
      const std::uint32_t byte1 = ((w ? raw.bytes[1].y : raw.bytes[1].x) >> (8 * b)) & 0xffu;
      const int n = col16 + 8 * w + 2 * b;  // the high nibbles' column; the low nibbles' is n + 1
      const float hi0 = __shfl_sync(0xffffffffu, code, static_cast<int>(byte0 >> 4));
      const float lo0 = __shfl_sync(0xffffffffu, code, static_cast<int>(byte0));
      const float hi1 = __shfl_sync(0xffffffffu, code, static_cast<int>(byte1 >> 4));
      const float lo1 = __shfl_sync(0xffffffffu, code, static_cast<int>(byte1));
      const __nv_bfloat162 even = __floats2bfloat162_rn(mul_ftz(hi0, raw.absmax[0]), mul_ftz(hi1, raw.absmax[1]));
      const __nv_bfloat162 odd = __floats2bfloat162_rn(mul_ftz(lo0, raw.absmax[0]), mul_ftz(lo1, raw.absmax[1]));
      bt[bt_word(n, pair)] = *reinterpret_cast<const std::uint32_t*>(&even);
      bt[bt_word(n + 1, pair)] = *reinterpret_cast<const std::uint32_t*>(&odd);
    }
  }
}

// a's tile of step kt (tokens m0.., rows kt * 64..) into the stage by cp.async, zeros past m and rows.
__device__ __forceinline__ void copy_dx_a(const std::uint16_t* a, std::int64_t m, std::int64_t rows, int m0, int kt,
                                          std::uint32_t* stage) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int chunk = static_cast<int>(threadIdx.x) + i * kDxThreads;  // 512 chunks of 8 bf16
    const int token = chunk / 8, q = chunk % 8;
    const std::int64_t row = static_cast<std::int64_t>(kt) * kDxRows + 8 * q;
    const bool valid = m0 + token < m && row < rows;
    const std::uint16_t* src = valid ? a + (m0 + token) * rows + row : a;
    cp_async16(stage + at_word(token, 4 * q), src, valid);
  }
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

__global__ void __launch_bounds__(kDxThreads, 2)
    nf4_gemm_dx_kernel(const std::uint16_t* a, Parts parts, std::int64_t m, std::int64_t rows, std::int64_t in,
                       const float* addend, float* c, std::uint16_t* c16, bool add_c16, float* partial) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(16) std::uint32_t dx_smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const std::int64_t n0 = static_cast<std::int64_t>(blockIdx.x) * kDxCols;
  const int m0 = static_cast<int>(blockIdx.y) * kDxTokens;
  const int total_steps = static_cast<int>((rows + kDxRows - 1) / kDxRows);
  const int first_step = static_cast<int>(static_cast<std::int64_t>(blockIdx.z) * total_steps / gridDim.z);
  const int steps = static_cast<int>(static_cast<std::int64_t>(blockIdx.z + 1) * total_steps / gridDim.z) - first_step;
  const int pair = tid / 8, col16 = 16 * (tid % 8);
  const float code = kCodeTable[lane & 15];
  auto stage = [&](int kt) { return dx_smem + (kt & 1) * kDxStageWords; };

  DxRaw raw[kDxAhead];
  static_for<0, kDxAhead>([&](auto j) {
    if (j < steps) load_dx_step(parts, rows, in, first_step + j, pair, n0 + col16, raw[j]);
  });
  copy_dx_a(a, m, rows, m0, first_step, stage(0));
  cp_async_commit();

  float d[4][2][4] = {};  // [token tile of 16][column tile of 8][mma's 4]
  auto step = [&](int kt, auto slot) {
    constexpr int R = decltype(slot)::value;  // kt % kDxAhead
    std::uint32_t* const st = stage(kt);
    decode_dx_step(raw[R], pair, col16, code, st);
    if (kt + kDxAhead < steps) load_dx_step(parts, rows, in, first_step + kt + kDxAhead, pair, n0 + col16, raw[R]);
    cp_async_wait_all();  // a's tile of step kt (this thread's copies)
    __syncthreads();      // ... and everyone's, and the W^T tile; step kt - 1's mma are done
    if (kt + 1 < steps) {
      copy_dx_a(a, m, rows, m0, first_step + kt + 1, stage(kt + 1));
      cp_async_commit();
    }
#pragma unroll
    for (int s = 0; s < kDxRows / 16; ++s) {
      std::uint32_t b[2][2];
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const int n = 16 * warp + 8 * nt + g;
        b[nt][0] = st[bt_word(n, 8 * s + t)];
        b[nt][1] = st[bt_word(n, 8 * s + 4 + t)];
      }
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) {
        if (m0 + 16 * mt >= m) break;  // tiles of padding only
        const std::uint32_t af[4] = {st[at_word(16 * mt + g, 8 * s + t)], st[at_word(16 * mt + g + 8, 8 * s + t)],
                                     st[at_word(16 * mt + g, 8 * s + 4 + t)],
                                     st[at_word(16 * mt + g + 8, 8 * s + 4 + t)]};
        mma_bf16_16816(d[mt][0], af, b[0]);
        mma_bf16_16816(d[mt][1], af, b[1]);
      }
    }
  };
  for (int kt = 0; kt < steps; kt += kDxAhead) {
    static_for<0, kDxAhead>([&](auto i) {
      if (kt + i < steps) step(kt + i, i);
    });
  }

  // d[mt][nt] = {(g, 2t), (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1)} of the 16 x 8 tile.
  float* const part = partial != nullptr ? partial + static_cast<std::int64_t>(blockIdx.z) * m * in : nullptr;
#pragma unroll
  for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const std::int64_t token = m0 + 16 * mt + g + 8 * (e / 2);
        const std::int64_t col = n0 + 16 * warp + 8 * nt + 2 * t + (e % 2);
        if (token < m && col < in) emit(token * in + col, d[mt][nt][e], part, addend, c, c16, add_c16);
      }
    }
  }
#else
  __trap();  // launched only where nf4_gemm_supported
#endif
}

// The split-k sum: c = partial[0] + ... + partial[splits - 1] (+ addend), in that order, or c16
// likewise (+ c16's values when add_c16), rounded once.
__global__ void __launch_bounds__(256) sum_splits_kernel(const float* __restrict__ partial, int splits,
                                                         std::int64_t count, const float* addend, float* c,
                                                         std::uint16_t* c16, bool add_c16) {
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    float v = partial[i];
    for (int z = 1; z < splits; ++z) v += partial[z * count + i];
    if (c16 != nullptr) {
      if (add_c16) v += __bfloat162float(__ushort_as_bfloat16(c16[i]));
      c16[i] = __bfloat16_as_ushort(__float2bfloat16_rn(v));
    } else {
      c[i] = addend != nullptr ? v + addend[i] : v;
    }
  }
}

// cuTensorMapEncodeTiled from the driver (through the runtime: no link against libcuda).
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult found{};
    CUDABLOCKS_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault,
                                                          &found));
    if (found != cudaDriverEntryPointSuccess || p == nullptr) {
      throw DeviceError("nf4_gemm_bf16: the CUDA driver has no cuTensorMapEncodeTiled");
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }();
  return fn;
}

// The TMA map of a [m, k] bf16 (row-major) in tiles of BN rows x 64 columns, 128-byte swizzle.
template <int BN>
CUtensorMap a_tensor_map(const std::uint16_t* a, std::int64_t m, std::int64_t k) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(k), static_cast<cuuint64_t>(m)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(k) * 2};
  const cuuint32_t box[2] = {kBK, BN};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult r = tensor_map_encoder()(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<std::uint16_t*>(a),
                                          dims, strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                          CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                          CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    throw DeviceError("nf4_gemm_bf16: cuTensorMapEncodeTiled failed (CUresult " + std::to_string(static_cast<int>(r)) +
                      ") for a [" + std::to_string(m) + ", " + std::to_string(k) + "]");
  }
  return map;
}

// Ways to split k. With few tokens the kernels are bound by decoding W (shuffles): the time goes
// as the waves of CTAs (`slots` of them run at once) times (the steps of one split + the start of
// a CTA, about kStartSteps steps' time: fitted to H200 timings of the forward's gate_up split 1
// and 5 ways). The split with the least wins (the fewer splits on a tie); every split keeps at
// least kMinSplitSteps steps.
constexpr std::int64_t kMinSplitSteps = 8;
constexpr std::int64_t kStartSteps = 8;
int splits_for(std::int64_t tiles, std::int64_t steps, std::int64_t slots) {
  std::int64_t best = 1, best_cost = -1;
  for (std::int64_t s = 1; s == 1 || steps / s >= kMinSplitSteps; ++s) {
    const std::int64_t cost = (tiles * s + slots - 1) / slots * ((steps + s - 1) / s + kStartSteps);
    if (best_cost < 0 || cost < best_cost) {
      best = s;
      best_cost = cost;
    }
  }
  return static_cast<int>(best);
}

// Runs `kernel(partial)` with partial == nullptr (the kernel writes c or c16 itself) or, with
// several splits, with a scratch for their partial sums [splits, m, n], then adds those up.
template <typename Kernel>
void run_split(int splits, std::int64_t m, std::int64_t n, const float* addend, float* c, std::uint16_t* c16,
               bool add_c16, cudaStream_t stream, Kernel&& kernel) {
  if (splits == 1) {
    kernel(nullptr);
    return;
  }
  const std::int64_t count = m * n;
  const ScratchLease partial(static_cast<std::size_t>(splits * count) * sizeof(float), stream);
  kernel(partial.get<float>());
  const auto blocks = static_cast<unsigned>(std::min<std::int64_t>((count + 255) / 256, 4 * multiprocessor_count()));
  sum_splits_kernel<<<blocks, 256, 0, stream>>>(partial.get<float>(), splits, count, addend, c, c16, add_c16);
  CUDABLOCKS_CHECK_LAUNCH("nf4_gemm sum_splits_kernel");
}

// c[m, n] = a[m, k] W^T. Narrow token tiles (one CTA per multiprocessor) may split k; wide ones not.
template <int BN>
void launch(const std::uint16_t* a, const Parts& p, std::int64_t m, std::int64_t n, std::int64_t k,
            const float* addend, float* c, std::uint16_t* c16, bool add_c16, cudaStream_t stream) {
  const CUtensorMap map = a_tensor_map<BN>(a, m, k);
  const std::int64_t row_tiles = (n + kRows - 1) / kRows, token_tiles = (m + BN - 1) / BN;
  const int splits = BN > 64 ? 1 : splits_for(row_tiles * token_tiles, k / kBK, multiprocessor_count());
  const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(token_tiles), static_cast<unsigned>(splits));
  constexpr int smem = Tiling<BN>::kSmemAlloc;
  allow_dynamic_smem(reinterpret_cast<const void*>(nf4_gemm_kernel<BN>), smem, true);
  run_split(splits, m, n, addend, c, c16, add_c16, stream, [&](float* partial) {
    nf4_gemm_kernel<BN><<<grid, kThreads, smem, stream>>>(map, p, m, n, k, addend, c, c16, add_c16, partial);
    CUDABLOCKS_CHECK_LAUNCH("nf4_gemm_kernel");
  });
}

// c[m, in] = a[m, rows] W.
void launch_dx(const std::uint16_t* a, const Parts& p, std::int64_t m, std::int64_t rows, std::int64_t in,
               const float* addend, float* c, std::uint16_t* c16, bool add_c16, cudaStream_t stream) {
  const void* kernel = reinterpret_cast<const void*>(nf4_gemm_dx_kernel);
  allow_dynamic_smem(kernel, kDxSmem, true);
  const std::int64_t col_tiles = (in + kDxCols - 1) / kDxCols, token_tiles = (m + kDxTokens - 1) / kDxTokens;
  const std::int64_t slots = static_cast<std::int64_t>(multiprocessor_count()) *
                             max_active_blocks_per_sm(kernel, kDxThreads, kDxSmem);
  const int splits =
      splits_for(col_tiles * token_tiles, (rows + kDxRows - 1) / kDxRows, std::max<std::int64_t>(1, slots));
  const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(token_tiles), static_cast<unsigned>(splits));
  run_split(splits, m, in, addend, c, c16, add_c16, stream, [&](float* partial) {
    nf4_gemm_dx_kernel<<<grid, kDxThreads, kDxSmem, stream>>>(a, p, m, rows, in, addend, c, c16, add_c16, partial);
    CUDABLOCKS_CHECK_LAUNCH("nf4_gemm_dx_kernel");
  });
}

}  // namespace

bool nf4_gemm_supported(std::int64_t k, int blocksize) {
#if defined(CUDABLOCKS_SM90A)
  if (blocksize != kBK || k % kBK != 0 || k <= 0) return false;
  return compute_capability() == 90;  // cached: the block asks before each product of few tokens
#else
  (void)k;
  (void)blocksize;
  return false;
#endif
}

void nf4_gemm_bf16(const std::uint16_t* a, const Nf4Rows* w, int parts, std::int64_t m, std::int64_t k,
                   bool transposed, const float* addend, float* c, std::uint16_t* c16, bool add_c16,
                   cudaStream_t stream) {
  if (parts < 1 || parts > kMaxParts) throw InvalidArgumentError("nf4_gemm_bf16: 1 to 4 weights per product");
  Parts p{};
  std::int64_t n = 0;
  for (int i = 0; i < parts; ++i) {
    if (reinterpret_cast<std::uintptr_t>(w[i].packed) % 8 != 0 || reinterpret_cast<std::uintptr_t>(w[i].absmax) % 4) {
      throw InvalidArgumentError("nf4_gemm_bf16: packed weights must be 8-byte and absmax 4-byte aligned");
    }
    n += w[i].rows;
    p.packed[i] = w[i].packed;
    p.absmax[i] = w[i].absmax;
    p.end[i] = n;
  }
  p.count = parts;
  if (k <= 0 || k % kBK != 0) {
    throw InvalidArgumentError("nf4_gemm_bf16: W's columns must be a positive multiple of 64 (its absmax blocks), "
                               "got " + std::to_string(k));
  }
  if (m == 0 || n == 0) return;
  if (reinterpret_cast<std::uintptr_t>(a) % 16 != 0) {
    throw InvalidArgumentError("nf4_gemm_bf16: a must be 16-byte aligned (its tiles are copied 16 bytes at a time)");
  }
  if (transposed) {
    if (n % 8 != 0) throw InvalidArgumentError("nf4_gemm_bf16: transposed, W's rows must be a multiple of 8");
    launch_dx(a, p, m, n, k, addend, c, c16, add_c16, stream);
    return;
  }
  // The wide token tile unless it would leave multiprocessors idle that the narrow one would use.
  const std::int64_t tiles256 = ((n + kRows - 1) / kRows) * ((m + 255) / 256);
  if (m <= 32) {  // few tokens: narrow token tiles, little tensor-core work on padding
    launch<32>(a, p, m, n, k, addend, c, c16, add_c16, stream);
  } else if (m <= 64) {
    launch<64>(a, p, m, n, k, addend, c, c16, add_c16, stream);
  } else if (tiles256 >= multiprocessor_count()) {
    launch<256>(a, p, m, n, k, addend, c, c16, add_c16, stream);
  } else {
    launch<128>(a, p, m, n, k, addend, c, c16, add_c16, stream);
  }
}

}  // namespace cudablocks::cuda

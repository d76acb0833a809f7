// The NF4 format of bitsandbytes (0.4x/0.5x quantize_4bit(quant_type="nf4") / dequantize_4bit), as
// shared facts for the CPU and CUDA ops: the 16-value codebook, the decision thresholds its CUDA
// kernel uses to pick a code, and the 8-bit signed dynamic map (create_dynamic_map(signed=True))
// that double quantization applies to the absmax values. Every function here is usable from host
// and device code, so both backends decide with the same arithmetic.
//
// bitsandbytes builds its kernels with --use_fast_math, so its float arithmetic flushes subnormal
// inputs and results to zero and 1/absmax is the approximate reciprocal (rcp.approx.ftz). The
// helpers below reproduce the flushes explicitly (ftz); the reciprocal is per backend (the CPU
// rounds 1/absmax correctly, CUDA uses rcp.approx.ftz like bitsandbytes, so the two may pick
// neighbouring codes for an element within about an ulp of a threshold: vanishingly rare).
#pragma once

#include <cfloat>
#include <cstdint>
#include <cstring>

#include "core/host_device.hpp"

namespace cudablocks::nf4 {

// Block sizes bitsandbytes accepts for 4-bit quantization; its double quantization uses 256.
constexpr int kMinBlocksize = 32;
constexpr int kMaxBlocksize = 4096;
constexpr int kNestedBlocksize = 256;
inline bool valid_blocksize(std::int64_t b) { return b >= kMinBlocksize && b <= kMaxBlocksize && (b & (b - 1)) == 0; }

// The NF4 codebook (bitsandbytes' get_4bit_type("nf4")); index 7 is 0.0.
#define CUDABLOCKS_NF4_CODE                                                                         \
  {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f, \
   -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,  \
   0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,           \
   0.7229568362236023f, 1.0f}
constexpr float kCode[16] = CUDABLOCKS_NF4_CODE;

// The decision thresholds of bitsandbytes' NF4 encoder (its dQuantizeNF4 tree), ascending: the code
// of x is the number of thresholds that x is strictly greater than. bitsandbytes writes them as
// decimal float literals (about the midpoints of neighbouring codes); here they are the floats
// nearest those decimals, spelled exactly (hex), so no compiler's literal parsing can move them.
// (Rounding the decimals through double instead would move #0, #8, #12 and #14 by one ulp.)
#define CUDABLOCKS_NF4_T0 (-0x1.b239b2p-1f)  /* -0.8480964004993439 */
#define CUDABLOCKS_NF4_T1 (-0x1.38a4e0p-1f)  /* -0.6106329262256622 */
#define CUDABLOCKS_NF4_T2 (-0x1.d70900p-2f)  /* -0.4599952697753906 */
#define CUDABLOCKS_NF4_T3 (-0x1.5bd4ecp-2f)  /* -0.33967943489551544 */
#define CUDABLOCKS_NF4_T4 (-0x1.e079d8p-3f)  /* -0.23460740596055984 */
#define CUDABLOCKS_NF4_T5 (-0x1.1a7178p-3f)  /* -0.13791173323988914 */
#define CUDABLOCKS_NF4_T6 (-0x1.74f0e2p-5f)  /* -0.045525018125772476 */
#define CUDABLOCKS_NF4_T7 (0x1.45f5fep-5f)  /* 0.03979014977812767 */
#define CUDABLOCKS_NF4_T8 (0x1.ec90c6p-4f)  /* 0.1202552504837513 */
#define CUDABLOCKS_NF4_T9 (0x1.a0cfc0p-3f)  /* 0.2035212516784668 */
#define CUDABLOCKS_NF4_T10 (0x1.2b05a8p-2f)  /* 0.2920137718319893 */
#define CUDABLOCKS_NF4_T11 (0x1.8ea7f2p-2f)  /* 0.3893125355243683 */
#define CUDABLOCKS_NF4_T12 (0x1.00da06p-1f)  /* 0.5016634166240692 */
#define CUDABLOCKS_NF4_T13 (0x1.491b5ep-1f)  /* 0.6427869200706482 */
#define CUDABLOCKS_NF4_T14 (0x1.b913b2p-1f)  /* 0.8614784181118011 */
constexpr float kThresholds[15] = {CUDABLOCKS_NF4_T0, CUDABLOCKS_NF4_T1, CUDABLOCKS_NF4_T2, CUDABLOCKS_NF4_T3, CUDABLOCKS_NF4_T4, CUDABLOCKS_NF4_T5, CUDABLOCKS_NF4_T6, CUDABLOCKS_NF4_T7, CUDABLOCKS_NF4_T8, CUDABLOCKS_NF4_T9, CUDABLOCKS_NF4_T10, CUDABLOCKS_NF4_T11, CUDABLOCKS_NF4_T12, CUDABLOCKS_NF4_T13, CUDABLOCKS_NF4_T14};

// create_dynamic_map(signed=True) of bitsandbytes as float32 bit patterns, ascending; [127] = 0.
constexpr std::uint32_t kDynamicMapBits[256] = {
    0xbf7e3333u, 0xbf7a999au, 0xbf770000u, 0xbf736666u, 0xbf6fcccdu, 0xbf6c3333u, 0xbf68999au, 0xbf650000u,
    0xbf616666u, 0xbf5dcccdu, 0xbf5a3333u, 0xbf56999au, 0xbf530000u, 0xbf4f6666u, 0xbf4bcccdu, 0xbf483333u,
    0xbf44999au, 0xbf410000u, 0xbf3d6666u, 0xbf39cccdu, 0xbf363334u, 0xbf32999au, 0xbf2f0000u, 0xbf2b6666u,
    0xbf27cccdu, 0xbf243334u, 0xbf20999au, 0xbf1d0000u, 0xbf196666u, 0xbf15cccdu, 0xbf123334u, 0xbf0e999au,
    0xbf0b0000u, 0xbf076666u, 0xbf03ccccu, 0xbf003333u, 0xbef93332u, 0xbef20000u, 0xbeeaccccu, 0xbee3999au,
    0xbedc6666u, 0xbed53333u, 0xbece0000u, 0xbec6ccccu, 0xbebf999au, 0xbeb86666u, 0xbeb13333u, 0xbeaa0000u,
    0xbea2ccccu, 0xbe9b999au, 0xbe946666u, 0xbe8d3334u, 0xbe860000u, 0xbe7d9999u, 0xbe6f3333u, 0xbe60cccdu,
    0xbe526666u, 0xbe440000u, 0xbe35999au, 0xbe273333u, 0xbe18cccdu, 0xbe0a6666u, 0xbdf80000u, 0xbddb3334u,
    0xbdc9eb85u, 0xbdc428f7u, 0xbdbe6667u, 0xbdb8a3d7u, 0xbdb2e148u, 0xbdad1eb8u, 0xbda75c2au, 0xbda1999au,
    0xbd9bd70au, 0xbd96147bu, 0xbd9051ebu, 0xbd8a8f5du, 0xbd84cccdu, 0xbd7e147bu, 0xbd728f5du, 0xbd670a3du,
    0xbd5b851fu, 0xbd500000u, 0xbd447ae1u, 0xbd38f5c3u, 0xbd2d70a3u, 0xbd21eb85u, 0xbd166667u, 0xbd0ae148u,
    0xbcfeb852u, 0xbce7ae15u, 0xbcd0a3d7u, 0xbcb9999au, 0xbca28f5du, 0xbc8b851fu, 0xbc68f5c3u, 0xbc3ae148u,
    0xbc1f3b64u, 0xbc160418u, 0xbc0ccccdu, 0xbc039581u, 0xbbf4bc6au, 0xbbe24dd3u, 0xbbcfdf3bu, 0xbbbd70a4u,
    0xbbab020du, 0xbb989374u, 0xbb8624ddu, 0xbb676c8au, 0xbb428f5cu, 0xbb1db22du, 0xbaf1a9fcu, 0xbaa7ef9du,
    0xba7765ffu, 0xba59e83eu, 0xba3c6a80u, 0xba1eecc1u, 0xba016f01u, 0xb9c7e283u, 0xb98ce705u, 0xb923d70bu,
    0xb8ba1f4bu, 0xb88aefb3u, 0xb8378034u, 0xb7b24206u, 0xb70205ffu, 0xb65a1a94u, 0xb513a3b7u, 0x00000000u,
    0x3513a3b7u, 0x365a1a94u, 0x370205ffu, 0x37b24206u, 0x38378034u, 0x388aefb3u, 0x38ba1f4bu, 0x3923d70bu,
    0x398ce705u, 0x39c7e283u, 0x3a016f01u, 0x3a1eecc1u, 0x3a3c6a80u, 0x3a59e83eu, 0x3a7765ffu, 0x3aa7ef9du,
    0x3af1a9fcu, 0x3b1db22du, 0x3b428f5cu, 0x3b676c8au, 0x3b8624ddu, 0x3b989374u, 0x3bab020du, 0x3bbd70a4u,
    0x3bcfdf3bu, 0x3be24dd3u, 0x3bf4bc6au, 0x3c039581u, 0x3c0ccccdu, 0x3c160418u, 0x3c1f3b64u, 0x3c3ae148u,
    0x3c68f5c3u, 0x3c8b851fu, 0x3ca28f5du, 0x3cb9999au, 0x3cd0a3d7u, 0x3ce7ae15u, 0x3cfeb852u, 0x3d0ae148u,
    0x3d166667u, 0x3d21eb85u, 0x3d2d70a3u, 0x3d38f5c3u, 0x3d447ae1u, 0x3d500000u, 0x3d5b851fu, 0x3d670a3du,
    0x3d728f5du, 0x3d7e147bu, 0x3d84cccdu, 0x3d8a8f5du, 0x3d9051ebu, 0x3d96147bu, 0x3d9bd70au, 0x3da1999au,
    0x3da75c2au, 0x3dad1eb8u, 0x3db2e148u, 0x3db8a3d7u, 0x3dbe6667u, 0x3dc428f7u, 0x3dc9eb85u, 0x3ddb3334u,
    0x3df80000u, 0x3e0a6666u, 0x3e18cccdu, 0x3e273333u, 0x3e35999au, 0x3e440000u, 0x3e526666u, 0x3e60cccdu,
    0x3e6f3333u, 0x3e7d9999u, 0x3e860000u, 0x3e8d3334u, 0x3e946666u, 0x3e9b999au, 0x3ea2ccccu, 0x3eaa0000u,
    0x3eb13333u, 0x3eb86666u, 0x3ebf999au, 0x3ec6ccccu, 0x3ece0000u, 0x3ed53333u, 0x3edc6666u, 0x3ee3999au,
    0x3eeaccccu, 0x3ef20000u, 0x3ef93332u, 0x3f003333u, 0x3f03ccccu, 0x3f076666u, 0x3f0b0000u, 0x3f0e999au,
    0x3f123334u, 0x3f15cccdu, 0x3f196666u, 0x3f1d0000u, 0x3f20999au, 0x3f243334u, 0x3f27cccdu, 0x3f2b6666u,
    0x3f2f0000u, 0x3f32999au, 0x3f363334u, 0x3f39cccdu, 0x3f3d6666u, 0x3f410000u, 0x3f44999au, 0x3f483333u,
    0x3f4bcccdu, 0x3f4f6666u, 0x3f530000u, 0x3f56999au, 0x3f5a3333u, 0x3f5dcccdu, 0x3f616666u, 0x3f650000u,
    0x3f68999au, 0x3f6c3333u, 0x3f6fcccdu, 0x3f736666u, 0x3f770000u, 0x3f7a999au, 0x3f7e3333u, 0x3f800000u,
};

inline float dynamic_map(int i) {
  float v;
  std::memcpy(&v, &kDynamicMapBits[i], sizeof v);
  return v;
}

// Flush-to-zero as --use_fast_math does it: a subnormal becomes a zero of the same sign.
CUDABLOCKS_HD float ftz(float x) { return (x > -FLT_MIN && x < FLT_MIN) ? x * 0.0f : x; }

// The NF4 code of x (= element / absmax), bitsandbytes' decision: NaN gives 0, as there.
CUDABLOCKS_HD unsigned nf4_encode(float x) {
  // A balanced comparison tree in the order of bitsandbytes' (strict >), on the same thresholds.
  if (x > CUDABLOCKS_NF4_T7) {
    if (x > CUDABLOCKS_NF4_T11) {
      if (x > CUDABLOCKS_NF4_T13) return x > CUDABLOCKS_NF4_T14 ? 15u : 14u;
      return x > CUDABLOCKS_NF4_T12 ? 13u : 12u;
    }
    if (x > CUDABLOCKS_NF4_T9) return x > CUDABLOCKS_NF4_T10 ? 11u : 10u;
    return x > CUDABLOCKS_NF4_T8 ? 9u : 8u;
  }
  if (x > CUDABLOCKS_NF4_T3) {
    if (x > CUDABLOCKS_NF4_T5) return x > CUDABLOCKS_NF4_T6 ? 7u : 6u;
    return x > CUDABLOCKS_NF4_T4 ? 5u : 4u;
  }
  if (x > CUDABLOCKS_NF4_T1) return x > CUDABLOCKS_NF4_T2 ? 3u : 2u;
  return x > CUDABLOCKS_NF4_T0 ? 1u : 0u;
}

// The 8-bit code of x under a sorted 256-entry map, as bitsandbytes' blockwise 8-bit quantizer
// decides it: a 7-step binary search from index 127 (strict >), then the nearer of the final
// index and the neighbour on x's side, by the float midpoint (a tie keeps the final index).
CUDABLOCKS_HD unsigned dynamic_encode(const float* code, float x) {
  int pivot = 127, upper_index = 255, lower_index = 0;
  float lower = -1.0f, upper = 1.0f;
  float value = code[pivot];
  for (int step = 64; step > 0; step >>= 1) {
    if (x > value) {
      lower_index = pivot;
      lower = value;
      pivot += step;
    } else {
      upper_index = pivot;
      upper = value;
      pivot -= step;
    }
    value = code[pivot];
  }
  if (upper_index == 255) upper = code[255];
  if (lower_index == 0) lower = code[0];
  if (x > value) {
    const float midpoint = (upper + value) * 0.5f;
    return static_cast<unsigned>(x > midpoint ? upper_index : pivot);
  }
  const float midpoint = (lower + value) * 0.5f;
  return static_cast<unsigned>(x < midpoint ? lower_index : pivot);
}

// The running start of a block's absmax: bitsandbytes' reduction starts from -FLT_MAX, and a
// partial (last) block also sees its zero padding.
CUDABLOCKS_HD float absmax_start(std::int64_t valid, std::int64_t blocksize) { return valid < blocksize ? 0.0f : -FLT_MAX; }

}  // namespace cudablocks::nf4

// Warp-level tensor-core products (mma.sync), bf16 and tf32, for the kernels that use them.
#pragma once

#include <cstdint>

namespace cudablocks::cuda {

// x rounded to tf32 (cvt.rna: to nearest, ties away from zero), as the 32-bit pattern the tf32
// products read.
__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
}

// d[16x8] += a[16x16] b[16x8] in bf16 with fp32 accumulation (mma.sync m16n8k16, row.col). Lane
// 4g + t holds a = {(g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..)}, b = {(k 2t..2t+1, n g),
// (k 2t+8.., n g)} (bf16 pairs, the lower k in the low half) and d = {(g, 2t), (g, 2t+1),
// (g+8, 2t), (g+8, 2t+1)}.
__device__ __forceinline__ void mma_bf16_16816(float d[4], const uint32_t a[4], const uint32_t b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// The same in tf32 (mma.sync m16n8k8): a = {(g, t), (g+8, t), (g, t+4), (g+8, t+4)}, b = {(k t, n g),
// (k t+4, n g)}, one tf32 value per register; d as above.
__device__ __forceinline__ void mma_tf32_1688(float d[4], const uint32_t a[4], const uint32_t b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

}  // namespace cudablocks::cuda

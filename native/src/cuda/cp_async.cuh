// cp.async: 16- and 4-byte global -> shared copies that land in the background, grouped so a
// kernel can wait for the older of several tiles in flight. The host emulation of the attention
// kernels (CUDABLOCKS_ATTN_MMA_EMULATION) gets synchronous copies instead.
#pragma once

#ifndef CUDABLOCKS_ATTN_MMA_EMULATION
#include <cuda_runtime.h>

namespace cudablocks::cuda {

// cp.async of 16 bytes global -> shared (L2 only, .cg); zero-fill when !valid (src-size 0: nothing
// is read). cp_async_wait_all: this thread's copies have landed (commit + wait_group 0); other
// threads see them only after a barrier.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(valid ? 16 : 0)
                 : "memory");
}
// The same for one 4-byte word (.ca: .cg takes 16 bytes only).
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem, bool valid) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(gmem), "r"(valid ? 4 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }
// Groups (double buffering): commit closes this thread's copies issued since the last commit;
// wait_group<N> waits until at most N of its committed groups are still in flight.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait_group() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

}  // namespace cudablocks::cuda
#else
#include <cstring>

namespace cudablocks::cuda {

// Emulation: a synchronous copy (the copies of the async staging are thread-private until a barrier).
inline void cp_async16(void* smem, const void* gmem, bool valid) {
    if (valid) std::memcpy(smem, gmem, 16);
    else std::memset(smem, 0, 16);
}
inline void cp_async4(void* smem, const void* gmem, bool valid) {
    if (valid) std::memcpy(smem, gmem, 4);
    else std::memset(smem, 0, 4);
}
inline void cp_async_wait_all() {}
inline void cp_async_commit() {}
template <int N>
inline void cp_async_wait_group() {}

}  // namespace cudablocks::cuda
#endif

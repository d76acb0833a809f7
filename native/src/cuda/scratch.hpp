// Per-stream scratch memory for CUDA ops that need a temporary buffer between their kernels
// (two-stage reductions: rmsnorm_backward, bias_backward, qk_norm_rope_backward).
//
// One buffer per (device, stream), grow-only, allocated through cudablocks::Allocation (so it is
// counted in memory_stats of the device). Use:
//
//   ScratchLease scratch(bytes, stream);      // on the current device
//   kernel_a<<<..., stream>>>(scratch.get<float>(), ...);
//   kernel_b<<<..., stream>>>(scratch.get<float>(), ...);
//   // the lease ends: later ops on `stream` may reuse the memory (stream order keeps it safe)
//
// Why per stream: work on one stream runs in order, so the next op on the same stream cannot
// touch the buffer before this op's kernels are done; ops on other streams get their own buffer,
// so they may run concurrently. The lease also holds a mutex of its (device, stream) entry, so
// two host threads enqueueing on the same stream do not interleave their stage-1 / stage-2
// kernels over one buffer.
//
// Growth: when a lease needs more bytes than the entry holds, the old buffer may still be read
// by kernels queued earlier on the stream; the stream is synchronised before it is freed. Growth
// is rare (sizes settle after the first step) but it blocks the host, and it is not allowed while
// the stream is being captured into a CUDA graph: run one step before capturing.
//
// The table is never destroyed (leaked on purpose): freeing device memory from a static
// destructor at exit can run after the CUDA runtime has been torn down.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <mutex>

namespace cudablocks::cuda {

class ScratchLease {
 public:
  ScratchLease(std::size_t bytes, cudaStream_t stream);
  ~ScratchLease() = default;
  ScratchLease(const ScratchLease&) = delete;
  ScratchLease& operator=(const ScratchLease&) = delete;

  void* data() const { return data_; }
  template <typename T>
  T* get() const { return static_cast<T*>(data_); }

 private:
  std::unique_lock<std::mutex> lock_;
  void* data_ = nullptr;
};

}  // namespace cudablocks::cuda

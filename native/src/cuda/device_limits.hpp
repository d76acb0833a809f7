// Facts of the current device that launches depend on, and the per-kernel attributes that let a
// launch use more than 48 KB of dynamic shared memory. Each is queried or set once per device (and
// kernel) and cached, not at every launch: these sit on the hot path of every op.
#pragma once

#include <cstddef>
#include <string>

namespace cudablocks::cuda {

// The current device's index (cudaGetDevice, checked).
int current_device_index();
// Number of multiprocessors: sizes grids.
int multiprocessor_count();
// The compute capability as 10 * major + minor (90 for an H100/H200).
int compute_capability();
// The most dynamic shared memory one block may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin).
std::size_t shared_memory_optin();
// Lets `kernel` launch with `bytes` of dynamic shared memory on the current device; with
// prefer_shared also asks for the largest shared-memory carveout (kernels that live on shared
// memory, so that two blocks fit per multiprocessor). The caller checks bytes against
// shared_memory_optin() first. The attributes are set again only for a larger size.
void allow_dynamic_smem(const void* kernel, std::size_t bytes, bool prefer_shared);
// allow_dynamic_smem with prefer_shared, after checking bytes against shared_memory_optin():
// InvalidArgumentError "<who> needs <bytes> bytes of shared memory per block; this GPU allows <n>"
// when it does not fit.
void require_dynamic_smem(const void* kernel, std::size_t bytes, const std::string& who);
// cudaOccupancyMaxActiveBlocksPerMultiprocessor of `kernel` on the current device, cached per
// kernel, device, block size and dynamic shared memory.
int max_active_blocks_per_sm(const void* kernel, int threads, std::size_t smem);

}  // namespace cudablocks::cuda

#include "cuda/device_limits.hpp"

#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <tuple>
#include <utility>

#include "cuda/check.hpp"
#include "cudablocks/errors.hpp"

namespace cudablocks::cuda {

namespace {

// One attribute of the current device, cached per device.
int cached_attribute(cudaDeviceAttr attribute) {
  static std::mutex mutex;
  static auto* known = new std::map<std::pair<int, int>, int>;  // leaked on purpose (static teardown)
  const int device = current_device_index();
  std::lock_guard<std::mutex> guard(mutex);
  const auto key = std::make_pair(device, static_cast<int>(attribute));
  auto it = known->find(key);
  if (it != known->end()) return it->second;
  int value = 0;
  CUDABLOCKS_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, device));
  known->emplace(key, value);
  return value;
}

}  // namespace

int current_device_index() {
  int device = 0;
  CUDABLOCKS_CUDA_CHECK(cudaGetDevice(&device));
  return device;
}

int multiprocessor_count() { return cached_attribute(cudaDevAttrMultiProcessorCount); }

int compute_capability() {
  return 10 * cached_attribute(cudaDevAttrComputeCapabilityMajor) + cached_attribute(cudaDevAttrComputeCapabilityMinor);
}

std::size_t shared_memory_optin() {
  return static_cast<std::size_t>(cached_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin));
}

void allow_dynamic_smem(const void* kernel, std::size_t bytes, bool prefer_shared) {
  static std::mutex mutex;
  static auto* allowed = new std::map<std::pair<const void*, int>, std::size_t>;  // leaked on purpose
  const auto key = std::make_pair(kernel, current_device_index());
  std::lock_guard<std::mutex> guard(mutex);
  auto it = allowed->find(key);
  if (it != allowed->end() && it->second >= bytes) return;
  CUDABLOCKS_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  if (prefer_shared) {
    CUDABLOCKS_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared));
  }
  (*allowed)[key] = bytes;
}

void require_dynamic_smem(const void* kernel, std::size_t bytes, const std::string& who) {
  const std::size_t optin = shared_memory_optin();
  if (bytes > optin) {
    throw InvalidArgumentError(who + " needs " + std::to_string(bytes) +
                               " bytes of shared memory per block; this GPU allows " + std::to_string(optin));
  }
  allow_dynamic_smem(kernel, bytes, true);
}

int max_active_blocks_per_sm(const void* kernel, int threads, std::size_t smem) {
  static std::mutex mutex;
  static auto* known = new std::map<std::tuple<const void*, int, int, std::size_t>, int>;  // leaked on purpose
  const auto key = std::make_tuple(kernel, current_device_index(), threads, smem);
  std::lock_guard<std::mutex> guard(mutex);
  auto it = known->find(key);
  if (it != known->end()) return it->second;
  int blocks = 0;
  CUDABLOCKS_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem));
  known->emplace(key, blocks);
  return blocks;
}

}  // namespace cudablocks::cuda

#include "cuda/device_limits.hpp"

#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <utility>

#include "cuda/check.hpp"

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

}  // namespace cudablocks::cuda

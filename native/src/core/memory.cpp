#include "cudablocks/memory.hpp"

#include <cstdlib>
#include <map>
#include <mutex>

#include "core/gpu_runtime.hpp"
#include "cudablocks/errors.hpp"

namespace cudablocks {

namespace {

// Counters per device, keyed by -1 for the CPU and the index for CUDA devices.
std::mutex stats_mutex;
std::map<int, MemoryStats>& stats_table() {
  static std::map<int, MemoryStats> table;
  return table;
}
int stats_key(const Device& device) { return device.is_cpu() ? -1 : device.index(); }

void count_allocation(const Device& device, std::size_t bytes) {
  std::lock_guard<std::mutex> lock(stats_mutex);
  MemoryStats& s = stats_table()[stats_key(device)];
  s.allocated_bytes += bytes;
  s.allocations += 1;
  if (s.allocated_bytes > s.peak_bytes) s.peak_bytes = s.allocated_bytes;
}

void count_release(const Device& device, std::size_t bytes) {
  std::lock_guard<std::mutex> lock(stats_mutex);
  MemoryStats& s = stats_table()[stats_key(device)];
  s.allocated_bytes -= bytes;
  s.allocations -= 1;
}

constexpr std::size_t kHostAlignment = 64;  // a cache line: lets the CPU kernels vectorise

}  // namespace

MemoryStats memory_stats(const Device& device) {
  std::lock_guard<std::mutex> lock(stats_mutex);
  return stats_table()[stats_key(device)];
}

void reset_peak_memory(const Device& device) {
  std::lock_guard<std::mutex> lock(stats_mutex);
  MemoryStats& s = stats_table()[stats_key(device)];
  s.peak_bytes = s.allocated_bytes;
}

std::shared_ptr<Allocation> Allocation::create(const Device& device, std::size_t bytes) {
  // Zero-byte buffers still get a distinct, valid pointer.
  std::size_t asked = bytes == 0 ? 1 : bytes;
  void* data = nullptr;
  if (device.is_cpu()) {
    std::size_t rounded = (asked + kHostAlignment - 1) / kHostAlignment * kHostAlignment;
    data = std::aligned_alloc(kHostAlignment, rounded);
    if (data == nullptr) {
      throw OutOfMemoryError("cpu", bytes, device.free_memory(), device.total_memory());
    }
  } else {
    DeviceGuard guard(device);
    data = gpu::try_malloc(asked);
    if (data == nullptr) {
      std::size_t free_bytes = 0, total_bytes = 0;
      gpu::memory_info(device.index(), &free_bytes, &total_bytes);
      throw OutOfMemoryError(device.str(), bytes, free_bytes, total_bytes);
    }
  }
  count_allocation(device, bytes);
  return std::make_shared<Allocation>(Token{}, device, data, bytes);
}

Allocation::Allocation(Token, const Device& device, void* data, std::size_t bytes)
    : device_(device), data_(data), bytes_(bytes) {}

Allocation::~Allocation() {
  if (device_.is_cpu()) {
    std::free(data_);
  } else {
    DeviceGuard guard(device_);
    gpu::free(data_);
  }
  count_release(device_, bytes_);
}

}  // namespace cudablocks

#include "cuda/scratch.hpp"

#include <map>
#include <memory>
#include <utility>

#include "cuda/check.hpp"
#include "cuda/device_limits.hpp"
#include "cudablocks/device.hpp"
#include "cudablocks/memory.hpp"

namespace cudablocks::cuda {

namespace {

struct Entry {
  std::mutex mutex;                         // held by a lease
  std::shared_ptr<Allocation> allocation;   // grow-only
};

struct Table {
  std::mutex mutex;  // guards the map, not the entries
  std::map<std::pair<int, cudaStream_t>, std::unique_ptr<Entry>> entries;
};

Table& table() {
  static Table* t = new Table;  // leaked on purpose (see scratch.hpp)
  return *t;
}

}  // namespace

ScratchLease::ScratchLease(std::size_t bytes, cudaStream_t stream) {
  const int device = current_device_index();
  Entry* entry = nullptr;
  {
    Table& t = table();
    std::lock_guard<std::mutex> guard(t.mutex);
    auto& slot = t.entries[{device, stream}];
    if (!slot) slot = std::make_unique<Entry>();
    entry = slot.get();  // entries are never erased: the pointer stays valid
  }
  lock_ = std::unique_lock<std::mutex>(entry->mutex);
  if (!entry->allocation || entry->allocation->bytes() < bytes) {
    if (entry->allocation) {
      // Kernels queued earlier on this stream may still use the old buffer.
      CUDABLOCKS_CUDA_CHECK(cudaStreamSynchronize(stream));
      entry->allocation.reset();
    }
    // Round up to 1 MiB so that small size changes do not reallocate.
    const std::size_t rounded = (bytes + (std::size_t(1) << 20) - 1) & ~((std::size_t(1) << 20) - 1);
    entry->allocation = Allocation::create(Device(DeviceType::CUDA, device), rounded);
  }
  data_ = entry->allocation->data();
}

}  // namespace cudablocks::cuda

// Device memory owned by the library, counted per device for memory reports.
#pragma once

#include <cstddef>
#include <memory>

#include "cudablocks/device.hpp"

namespace cudablocks {

struct MemoryStats {
  std::size_t allocated_bytes = 0;  // held now by live allocations
  std::size_t peak_bytes = 0;       // highest allocated_bytes since start or the last reset
  std::size_t allocations = 0;      // live allocations
};

MemoryStats memory_stats(const Device& device);
void reset_peak_memory(const Device& device);

// One allocation on one device: freed (and uncounted) when the last owner lets go.
// CUDA allocation failures throw OutOfMemoryError with the bytes asked and free.
class Allocation {
  struct Token {};  // keeps construction to create(), which does the counting

 public:
  static std::shared_ptr<Allocation> create(const Device& device, std::size_t bytes);
  Allocation(Token, const Device& device, void* data, std::size_t bytes);
  ~Allocation();
  Allocation(const Allocation&) = delete;
  Allocation& operator=(const Allocation&) = delete;

  void* data() const { return data_; }
  std::size_t bytes() const { return bytes_; }
  const Device& device() const { return device_; }

 private:
  Device device_;
  void* data_;
  std::size_t bytes_;
};

}  // namespace cudablocks

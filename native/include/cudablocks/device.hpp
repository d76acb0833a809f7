// Devices: the host CPU, or one CUDA GPU.
#pragma once

#include <cstddef>
#include <string>

namespace cudablocks {

enum class DeviceType { CPU, CUDA };

class Device {
 public:
  Device() = default;  // the CPU
  Device(DeviceType type, int index);
  // "cpu", "cuda" (= "cuda:0") or "cuda:N". Throws DeviceError for a device that does not exist.
  static Device parse(const std::string& spec);

  DeviceType type() const { return type_; }
  int index() const { return index_; }
  bool is_cuda() const { return type_ == DeviceType::CUDA; }
  bool is_cpu() const { return type_ == DeviceType::CPU; }
  std::string str() const;  // "cpu" or "cuda:N"

  std::string name() const;           // e.g. "NVIDIA H100 80GB HBM3", or the host CPU's model
  std::size_t total_memory() const;   // bytes
  std::size_t free_memory() const;    // bytes

  bool operator==(const Device& other) const { return type_ == other.type_ && index_ == other.index_; }
  bool operator!=(const Device& other) const { return !(*this == other); }

 private:
  DeviceType type_ = DeviceType::CPU;
  int index_ = 0;
};

// Number of CUDA devices visible; 0 without a driver, without a GPU, or when built without CUDA.
int cuda_device_count();
// True when the library was compiled with its CUDA backend.
bool cuda_backend_built();

// Makes a CUDA device current for the lifetime of the guard and restores the previous one.
// Does nothing for the CPU.
class DeviceGuard {
 public:
  explicit DeviceGuard(const Device& device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

}  // namespace cudablocks

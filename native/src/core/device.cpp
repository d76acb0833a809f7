#include "cudablocks/device.hpp"

#include <unistd.h>

#include <fstream>

#include "core/gpu_runtime.hpp"
#include "cudablocks/errors.hpp"

namespace cudablocks {

namespace {

std::string host_cpu_name() {
  std::ifstream info("/proc/cpuinfo");
  std::string line;
  while (std::getline(info, line)) {
    if (line.rfind("model name", 0) == 0) {
      auto colon = line.find(':');
      if (colon != std::string::npos) return line.substr(line.find_first_not_of(" \t", colon + 1));
    }
  }
  return "CPU";
}

}  // namespace

Device::Device(DeviceType type, int index) : type_(type), index_(index) {
  if (type == DeviceType::CPU) {
    index_ = 0;
    return;
  }
  if (!cuda_backend_built()) {
    throw DeviceError("cuda:" + std::to_string(index) +
                      " is not available: cudablocks was built without its CUDA backend "
                      "(reinstall on a machine with nvcc, or use Device(\"cpu\"))");
  }
  int count = cuda_device_count();
  if (index < 0 || index >= count) {
    throw DeviceError("cuda:" + std::to_string(index) + " does not exist: " + std::to_string(count) +
                      " CUDA device(s) visible" + (count > 0 ? " (cuda:0 .. cuda:" + std::to_string(count - 1) + ")" : ""));
  }
}

Device Device::parse(const std::string& spec) {
  if (spec == "cpu") return Device();
  if (spec == "cuda") return Device(DeviceType::CUDA, 0);
  if (spec.rfind("cuda:", 0) == 0) {
    std::string digits = spec.substr(5);
    if (!digits.empty() && digits.size() <= 6 && digits.find_first_not_of("0123456789") == std::string::npos) {
      return Device(DeviceType::CUDA, std::stoi(digits));
    }
  }
  throw DeviceError("invalid device '" + spec + "': expected \"cpu\", \"cuda\" or \"cuda:N\"");
}

std::string Device::str() const {
  return is_cpu() ? "cpu" : "cuda:" + std::to_string(index_);
}

std::string Device::name() const {
  return is_cpu() ? host_cpu_name() : gpu::device_name(index_);
}

std::size_t Device::total_memory() const {
  if (is_cpu()) {
    return static_cast<std::size_t>(sysconf(_SC_PHYS_PAGES)) * static_cast<std::size_t>(sysconf(_SC_PAGE_SIZE));
  }
  std::size_t free_bytes = 0, total_bytes = 0;
  gpu::memory_info(index_, &free_bytes, &total_bytes);
  return total_bytes;
}

std::size_t Device::free_memory() const {
  if (is_cpu()) {
    return static_cast<std::size_t>(sysconf(_SC_AVPHYS_PAGES)) * static_cast<std::size_t>(sysconf(_SC_PAGE_SIZE));
  }
  std::size_t free_bytes = 0, total_bytes = 0;
  gpu::memory_info(index_, &free_bytes, &total_bytes);
  return free_bytes;
}

int cuda_device_count() { return gpu::device_count(); }

bool cuda_backend_built() { return CUDABLOCKS_WITH_CUDA != 0; }

DeviceGuard::DeviceGuard(const Device& device) {
  if (!device.is_cuda()) return;
  previous_ = gpu::current_device();
  if (previous_ != device.index()) gpu::set_device(device.index());
}

DeviceGuard::~DeviceGuard() {
  if (previous_ < 0) return;
  try {
    gpu::set_device(previous_);
  } catch (...) {
    // Restoring is best effort: a destructor must not throw.
  }
}

}  // namespace cudablocks

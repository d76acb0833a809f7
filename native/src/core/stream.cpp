#include "cudablocks/stream.hpp"

#include "core/gpu_runtime.hpp"
#include "cudablocks/errors.hpp"

namespace cudablocks {

struct Stream::Impl {
  Device device;
  void* handle = nullptr;
  bool owned = false;

  Impl(const Device& d, void* h, bool o) : device(d), handle(h), owned(o) {}
  ~Impl() {
    if (owned) {
      DeviceGuard guard(device);
      gpu::stream_destroy(handle);
    }
  }
  Impl(const Impl&) = delete;
  Impl& operator=(const Impl&) = delete;
};

namespace {

void* create_stream_on(const Device& device) {
  if (!device.is_cuda()) return nullptr;
  DeviceGuard guard(device);
  return gpu::stream_create();
}

}  // namespace

Stream::Stream(const Device& device)
    : impl_(std::make_shared<Impl>(device, create_stream_on(device), device.is_cuda())) {}

Stream::Stream(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}

Stream Stream::wrap(const Device& device, std::uintptr_t handle) {
  if (device.is_cpu() && handle != 0) {
    throw DeviceError("a CPU stream has no handle; got " + std::to_string(handle));
  }
  return Stream(std::make_shared<Impl>(device, reinterpret_cast<void*>(handle), false));
}

const Device& Stream::device() const { return impl_->device; }

void* Stream::handle() const { return impl_->handle; }

void Stream::synchronize() const {
  if (!impl_->device.is_cuda()) return;
  DeviceGuard guard(impl_->device);
  gpu::stream_synchronize(impl_->handle);
}

void Stream::record(Event& event) const {
  if (event.device() != impl_->device) {
    throw DeviceError("event on " + event.device().str() + " recorded on a stream of " + impl_->device.str());
  }
  if (!impl_->device.is_cuda()) return;
  DeviceGuard guard(impl_->device);
  gpu::event_record(event.handle(), impl_->handle);
}

void Stream::wait(const Event& event) const {
  if (!impl_->device.is_cuda() || !event.device().is_cuda()) return;
  DeviceGuard guard(impl_->device);
  gpu::stream_wait_event(impl_->handle, event.handle());
}

struct Event::Impl {
  Device device;
  void* handle = nullptr;

  Impl(const Device& d, bool timing) : device(d) {
    if (!device.is_cuda()) return;
    DeviceGuard guard(device);
    handle = gpu::event_create(timing);
  }
  ~Impl() {
    if (handle == nullptr) return;
    DeviceGuard guard(device);
    gpu::event_destroy(handle);
  }
  Impl(const Impl&) = delete;
  Impl& operator=(const Impl&) = delete;
};

Event::Event(const Device& device, bool timing) : impl_(std::make_shared<Impl>(device, timing)) {}

const Device& Event::device() const { return impl_->device; }

void* Event::handle() const { return impl_->handle; }

void Event::synchronize() const {
  if (impl_->handle == nullptr) return;
  DeviceGuard guard(impl_->device);
  gpu::event_synchronize(impl_->handle);
}

bool Event::query() const {
  if (impl_->handle == nullptr) return true;
  DeviceGuard guard(impl_->device);
  return gpu::event_query(impl_->handle);
}

float Event::elapsed_ms_since(const Event& start) const {
  if (impl_->handle == nullptr || start.impl_->handle == nullptr) {
    throw UnsupportedOperationError("elapsed time needs two CUDA events created with timing=True");
  }
  DeviceGuard guard(impl_->device);
  return gpu::event_elapsed_ms(start.impl_->handle, impl_->handle);
}

}  // namespace cudablocks

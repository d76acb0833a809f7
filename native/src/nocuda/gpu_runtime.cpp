// Stand-in for core/gpu_runtime.hpp when the CUDA backend is not built: there are no devices,
// and Device refuses "cuda:N" before any of the other calls can be reached.
#include "core/gpu_runtime.hpp"

#include "cudablocks/errors.hpp"

namespace cudablocks::gpu {

namespace {
[[noreturn]] void not_built() {
  throw DeviceError("cudablocks was built without its CUDA backend");
}
}  // namespace

int device_count() { return 0; }
int current_device() { not_built(); }
void set_device(int) { not_built(); }
std::string device_name(int) { not_built(); }
void memory_info(int, std::size_t*, std::size_t*) { not_built(); }
void* try_malloc(std::size_t) { not_built(); }
void free(void*) noexcept {}
void memcpy_async(void*, const void*, std::size_t, void*) { not_built(); }
void* host_alloc_pinned(std::size_t) { not_built(); }
void host_free_pinned(void*) noexcept {}
void* stream_create() { not_built(); }
void stream_destroy(void*) noexcept {}
void stream_synchronize(void*) { not_built(); }
void device_synchronize() { not_built(); }
void* event_create(bool) { not_built(); }
void event_destroy(void*) noexcept {}
void event_record(void*, void*) { not_built(); }
void stream_wait_event(void*, void*) { not_built(); }
void event_synchronize(void*) { not_built(); }
bool event_query(void*) { not_built(); }
float event_elapsed_ms(void*, void*) { not_built(); }

}  // namespace cudablocks::gpu

// The few CUDA runtime calls the core objects need, behind plain C++ signatures so that the
// core compiles without CUDA headers. Implemented in src/cuda/gpu_runtime.cpp, or by
// src/nocuda/gpu_runtime.cpp when the CUDA backend is not built (no devices; calls throw).
// Streams and events are opaque pointers (cudaStream_t, cudaEvent_t).
#pragma once

#include <cstddef>
#include <string>

namespace cudablocks::gpu {

int device_count();  // 0 when there is no driver or no device
int current_device();
void set_device(int index);
std::string device_name(int index);
void memory_info(int index, std::size_t* free_bytes, std::size_t* total_bytes);

// Returns nullptr when the device is out of memory (the caller reports it), throws on other errors.
void* try_malloc(std::size_t bytes);
void free(void* ptr) noexcept;

// Any direction (unified addressing); host memory may be pageable.
void memcpy_async(void* dst, const void* src, std::size_t bytes, void* stream);
// Page-locked host memory (a copy from it is asynchronous with respect to the host).
void* host_alloc_pinned(std::size_t bytes);
void host_free_pinned(void* ptr) noexcept;

void* stream_create();
void stream_destroy(void* stream) noexcept;
void stream_synchronize(void* stream);
// Waits for all work on the current device, on every stream.
void device_synchronize();

void* event_create(bool timing);
void event_destroy(void* event) noexcept;
void event_record(void* event, void* stream);
void stream_wait_event(void* stream, void* event);
void event_synchronize(void* event);
bool event_query(void* event);
float event_elapsed_ms(void* start, void* end);

}  // namespace cudablocks::gpu

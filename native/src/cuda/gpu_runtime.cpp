// The CUDA runtime behind core/gpu_runtime.hpp.
#include "core/gpu_runtime.hpp"

#include <cuda_runtime.h>

#include "cuda/check.hpp"

namespace cudablocks::gpu {

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: not an error for us, just none
    return 0;
  }
  return count;
}

int current_device() {
  int index = 0;
  CUDABLOCKS_CUDA_CHECK(cudaGetDevice(&index));
  return index;
}

void set_device(int index) { CUDABLOCKS_CUDA_CHECK(cudaSetDevice(index)); }

std::string device_name(int index) {
  cudaDeviceProp prop{};
  CUDABLOCKS_CUDA_CHECK(cudaGetDeviceProperties(&prop, index));
  return prop.name;
}

void memory_info(int index, std::size_t* free_bytes, std::size_t* total_bytes) {
  int previous = current_device();
  set_device(index);
  cudaError_t error = cudaMemGetInfo(free_bytes, total_bytes);
  set_device(previous);
  CUDABLOCKS_CUDA_CHECK(error);
}

void* try_malloc(std::size_t bytes) {
  void* ptr = nullptr;
  cudaError_t error = cudaMalloc(&ptr, bytes);
  if (error == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    return nullptr;
  }
  CUDABLOCKS_CUDA_CHECK(error);
  return ptr;
}

void free(void* ptr) noexcept { cudaFree(ptr); }

void memcpy_async(void* dst, const void* src, std::size_t bytes, void* stream) {
  CUDABLOCKS_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, static_cast<cudaStream_t>(stream)));
}

void* host_alloc_pinned(std::size_t bytes) {
  void* ptr = nullptr;
  CUDABLOCKS_CUDA_CHECK(cudaMallocHost(&ptr, bytes));
  return ptr;
}

void host_free_pinned(void* ptr) noexcept { cudaFreeHost(ptr); }

void* stream_create() {
  cudaStream_t stream = nullptr;
  CUDABLOCKS_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  return stream;
}

void stream_destroy(void* stream) noexcept { cudaStreamDestroy(static_cast<cudaStream_t>(stream)); }

void stream_synchronize(void* stream) {
  CUDABLOCKS_CUDA_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)));
}

void device_synchronize() { CUDABLOCKS_CUDA_CHECK(cudaDeviceSynchronize()); }

void* event_create(bool timing) {
  cudaEvent_t event = nullptr;
  CUDABLOCKS_CUDA_CHECK(cudaEventCreateWithFlags(&event, timing ? cudaEventDefault : cudaEventDisableTiming));
  return event;
}

void event_destroy(void* event) noexcept { cudaEventDestroy(static_cast<cudaEvent_t>(event)); }

void event_record(void* event, void* stream) {
  CUDABLOCKS_CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(event), static_cast<cudaStream_t>(stream)));
}

void stream_wait_event(void* stream, void* event) {
  CUDABLOCKS_CUDA_CHECK(cudaStreamWaitEvent(static_cast<cudaStream_t>(stream), static_cast<cudaEvent_t>(event), 0));
}

void event_synchronize(void* event) { CUDABLOCKS_CUDA_CHECK(cudaEventSynchronize(static_cast<cudaEvent_t>(event))); }

bool event_query(void* event) {
  cudaError_t error = cudaEventQuery(static_cast<cudaEvent_t>(event));
  if (error == cudaErrorNotReady) {
    cudaGetLastError();
    return false;
  }
  CUDABLOCKS_CUDA_CHECK(error);
  return true;
}

float event_elapsed_ms(void* start, void* end) {
  float ms = 0.0f;
  CUDABLOCKS_CUDA_CHECK(cudaEventElapsedTime(&ms, static_cast<cudaEvent_t>(start), static_cast<cudaEvent_t>(end)));
  return ms;
}

}  // namespace cudablocks::gpu

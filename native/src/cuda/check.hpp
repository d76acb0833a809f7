// Error checking for CUDA runtime calls and kernel launches: failures become CudaError (or
// OutOfMemoryError) naming CUDA's error, the operation and the source line.
#pragma once

#include <cuda_runtime.h>

namespace cudablocks::cuda {

[[noreturn]] void throw_cuda_error(cudaError_t error, const char* operation, const char* file, int line);

inline void check(cudaError_t error, const char* operation, const char* file, int line) {
  if (error != cudaSuccess) throw_cuda_error(error, operation, file, line);
}

}  // namespace cudablocks::cuda

#define CUDABLOCKS_CUDA_CHECK(expr) ::cudablocks::cuda::check((expr), #expr, __FILE__, __LINE__)
// After a kernel launch: reports bad launch configurations at once (execution errors surface
// at the next synchronising call).
#define CUDABLOCKS_CHECK_LAUNCH(kernel_name) \
  ::cudablocks::cuda::check(cudaGetLastError(), "launch of " kernel_name, __FILE__, __LINE__)

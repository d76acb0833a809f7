#include "cuda/check.hpp"

#include <cstring>
#include <string>

#include "cudablocks/errors.hpp"

namespace cudablocks::cuda {

void throw_cuda_error(cudaError_t error, const char* operation, const char* file, int line) {
  const char* base = std::strrchr(file, '/');
  std::string where = std::string(base ? base + 1 : file) + ":" + std::to_string(line);
  std::string message = std::string("CUDA error ") + cudaGetErrorName(error) + " (" + cudaGetErrorString(error) +
                        ") in " + operation + " [" + where + "]";
  // Clears a non-sticky error so that the next call does not report it again.
  cudaGetLastError();
  if (error == cudaErrorMemoryAllocation) {
    std::size_t free_bytes = 0, total_bytes = 0;
    cudaMemGetInfo(&free_bytes, &total_bytes);
    throw OutOfMemoryError("the current CUDA device (" + message + ")", 0, free_bytes, total_bytes);
  }
  throw CudaError(message);
}

}  // namespace cudablocks::cuda

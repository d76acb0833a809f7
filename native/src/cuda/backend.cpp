// The CUDA backend: forwards each op to its kernels in this folder, on the stream's handle.
#include <cuda_runtime.h>

#include "core/backends.hpp"
#include "cuda/fill.cuh"
#include "cuda/rmsnorm.cuh"

namespace cudablocks {

namespace {

cudaStream_t native(const Stream& stream) { return static_cast<cudaStream_t>(stream.handle()); }

class CudaBackend final : public Backend {
 public:
  const char* name() const override { return "cuda"; }

  void fill(void* data, std::size_t count, std::size_t element_size, std::uint32_t bits,
            const Stream& stream) const override {
    cuda::fill(data, count, element_size, bits, native(stream));
  }

  void rmsnorm_forward(const float* x, const float* w, float* y, float* rstd, std::int64_t rows,
                       std::int64_t cols, float eps, const Stream& stream) const override {
    cuda::rmsnorm_forward(x, w, y, rstd, rows, cols, eps, native(stream));
  }
};

}  // namespace

const Backend& cuda_backend() {
  static const CudaBackend backend;
  return backend;
}

}  // namespace cudablocks

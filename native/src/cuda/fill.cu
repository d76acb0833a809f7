#include "cuda/check.hpp"
#include "cuda/fill.cuh"

namespace cudablocks::cuda {

namespace {

// One element per thread in a grid-stride loop; fills are rare and bandwidth-bound.
template <typename T>
__global__ void fill_kernel(T* data, std::size_t count, T value) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    data[i] = value;
  }
}

}  // namespace

void fill(void* data, std::size_t count, std::size_t element_size, std::uint32_t bits, cudaStream_t stream) {
  if (element_size == 1) {
    CUDABLOCKS_CUDA_CHECK(cudaMemsetAsync(data, static_cast<int>(bits & 0xffu), count, stream));
    return;
  }
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>(std::min<std::size_t>((count + threads - 1) / threads, 65535u * 8u));
  if (element_size == 2) {
    fill_kernel<<<blocks, threads, 0, stream>>>(static_cast<std::uint16_t*>(data), count, static_cast<std::uint16_t>(bits));
  } else {
    fill_kernel<<<blocks, threads, 0, stream>>>(static_cast<std::uint32_t*>(data), count, bits);
  }
  CUDABLOCKS_CHECK_LAUNCH("fill_kernel");
}

}  // namespace cudablocks::cuda

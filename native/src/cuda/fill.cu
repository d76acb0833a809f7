// Fills: write-only and bandwidth-bound (zeroing the gradients is several GB a step in full mode).
// A pattern whose bytes are all equal (zero above all) goes to cudaMemsetAsync; any other pattern
// is written with 16-byte stores over the 16-byte-aligned body and element stores before and after
// it (element-at-a-time 4-byte stores reach only about half the write bandwidth).
#include "cuda/check.hpp"
#include "cuda/fill.cuh"

#include <algorithm>

namespace cudablocks::cuda {

namespace {

template <typename T>
__global__ void fill_kernel(T* data, std::size_t count, T value) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    data[i] = value;
  }
}

template <typename T>
void launch_fill(T* data, std::size_t count, T value, cudaStream_t stream) {
  if (count == 0) return;
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>(std::min<std::size_t>((count + threads - 1) / threads, 65535u * 8u));
  fill_kernel<<<blocks, threads, 0, stream>>>(data, count, value);
  CUDABLOCKS_CHECK_LAUNCH("fill_kernel");
}

// The element pattern repeated over 4 bytes.
std::uint32_t word_of(std::size_t element_size, std::uint32_t bits) {
  if (element_size == 1) return (bits & 0xffu) * 0x01010101u;
  if (element_size == 2) return (bits & 0xffffu) * 0x00010001u;
  return bits;
}

template <typename T>
void fill_as(void* data, std::size_t count, std::uint32_t bits, cudaStream_t stream) {
  T* p = static_cast<T*>(data);
  const T value = static_cast<T>(bits);
  // Elements up to the first 16-byte boundary, the 16-byte body, the rest.
  const std::size_t misaligned = reinterpret_cast<std::uintptr_t>(p) % 16;
  const std::size_t head = std::min(count, misaligned == 0 ? 0 : (16 - misaligned) / sizeof(T));
  const std::size_t body = (count - head) * sizeof(T) / 16;
  const std::size_t tail_start = head + body * 16 / sizeof(T);
  launch_fill(p, head, value, stream);
  const std::uint32_t w = word_of(sizeof(T), bits);
  launch_fill(reinterpret_cast<uint4*>(p + head), body, make_uint4(w, w, w, w), stream);
  launch_fill(p + tail_start, count - tail_start, value, stream);
}

}  // namespace

void fill(void* data, std::size_t count, std::size_t element_size, std::uint32_t bits, cudaStream_t stream) {
  if (count == 0) return;
  const std::uint32_t w = word_of(element_size, bits);
  if (w == (w & 0xffu) * 0x01010101u) {  // every byte the same
    CUDABLOCKS_CUDA_CHECK(cudaMemsetAsync(data, static_cast<int>(w & 0xffu), count * element_size, stream));
    return;
  }
  if (element_size == 2) {
    fill_as<std::uint16_t>(data, count, bits, stream);
  } else {
    fill_as<std::uint32_t>(data, count, bits, stream);
  }
}

}  // namespace cudablocks::cuda

// SwiGLU, fused: each element of gate_up is read once and each output written once.
//   forward:  read gate, up, write out: 12 bytes per output element in fp32 (6 with bf16 gate_up
//             and out), ~5 FLOPs + 1 expf.
//   backward: read dout, gate, up, write d_gate, d_up: 20 bytes per element in fp32 (10 with bf16
//             dout, gate_up and d_gate_up), ~10 FLOPs + 1 expf.
// Memory-bound. Blocks stride over rows; a block's threads stride over the row's VEC-wide column
// groups (gate and up of one row are cols apart, so the float4 path needs cols % 4 == 0 and
// aligned pointers). expf and the division are IEEE-accurate (no fast intrinsics).
// gate_up and the outputs are each fp32 or bf16 (a bf16 gate_up, as bf16-mode blocks save it,
// halves its bytes; bf16 outputs are the operands of the next bf16 GEMM, with no fp32 copy
// written and converted); the backward's dout is bf16 with a bf16 gate_up (bf16 mode's down
// product writes it so). The arithmetic is fp32 either way. The fp32 forward can also write its
// output transposed (tf32 backward's recompute of a weight gradient's k-major operand, through
// transpose_tiles.cuh: 12 bytes per element instead of 20 for a forward and a transpose pass).
#include "cuda/swiglu.cuh"

#include <algorithm>
#include <cstdint>

#include "cuda/bf16_vec.cuh"
#include "cuda/block_reduce.cuh"
#include "cuda/check.hpp"
#include "cuda/device_limits.hpp"
#include "cuda/scratch.hpp"
#include "cuda/transpose_tiles.cuh"

namespace cudablocks::cuda {

namespace {

bool aligned(const void* p, std::size_t bytes) { return (reinterpret_cast<std::uintptr_t>(p) & (bytes - 1)) == 0; }

__device__ __forceinline__ float sigmoid(float g) { return 1.0f / (1.0f + expf(-g)); }
// One output: silu(gate) * up, in this order (both forward kernels: the same bits).
__device__ __forceinline__ float swiglu(float g, float u) { return g * sigmoid(g) * u; }

template <int VEC, typename In, typename Out>
__global__ void swiglu_forward_kernel(const In* __restrict__ gate_up, Out* __restrict__ out, std::int64_t rows,
                                      std::int64_t cols) {
  using Vec = typename VecType<VEC>::type;
  const std::int64_t n = cols / VEC;
  for (std::int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const In* gate = gate_up + row * 2 * cols;
    const In* up = gate + cols;
    Out* o = out + row * cols;
    for (std::int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      Vec g = load_vec<Vec>(gate, i);
      const Vec u = load_vec<Vec>(up, i);
      float* ge = reinterpret_cast<float*>(&g);
      const float* ue = reinterpret_cast<const float*>(&u);
#pragma unroll
      for (int j = 0; j < VEC; ++j) ge[j] = swiglu(ge[j], ue[j]);
      store_vec(o, i, g);
    }
  }
}

__global__ void __launch_bounds__(32 * kTransposeRowsPerPass)
    swiglu_forward_transposed_kernel(const float* __restrict__ gate_up, float* __restrict__ out_t, std::int64_t rows,
                                     std::int64_t cols) {
  transpose_tiles(rows, cols, out_t, [&](std::int64_t i, std::int64_t j) {
    return swiglu(gate_up[i * 2 * cols + j], gate_up[i * 2 * cols + cols + j]);
  });
}

// s = sigmoid(g): d_up = dout * g * s,  d_gate = dout * up * s * (1 + g * (1 - s)).
template <int VEC, typename In, typename Out>
__global__ void swiglu_backward_kernel(const In* __restrict__ dout, const In* __restrict__ gate_up,
                                       Out* __restrict__ d_gate_up, std::int64_t rows, std::int64_t cols) {
  using Vec = typename VecType<VEC>::type;
  const std::int64_t n = cols / VEC;
  for (std::int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const In* gate = gate_up + row * 2 * cols;
    const In* up = gate + cols;
    const In* d = dout + row * cols;
    Out* dgate = d_gate_up + row * 2 * cols;
    Out* dup = dgate + cols;
    for (std::int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const Vec g = load_vec<Vec>(gate, i), u = load_vec<Vec>(up, i), dv = load_vec<Vec>(d, i);
      Vec dg, du;
      const float* ge = reinterpret_cast<const float*>(&g);
      const float* ue = reinterpret_cast<const float*>(&u);
      const float* de = reinterpret_cast<const float*>(&dv);
      float* dge = reinterpret_cast<float*>(&dg);
      float* due = reinterpret_cast<float*>(&du);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float s = sigmoid(ge[j]);
        const float silu = ge[j] * s;
        due[j] = de[j] * silu;
        dge[j] = de[j] * ue[j] * (s * (1.0f + ge[j] * (1.0f - s)));
      }
      store_vec(dgate, i, dg);
      store_vec(dup, i, du);
    }
  }
}

int threads_for(std::int64_t n) { return static_cast<int>(std::clamp<std::int64_t>((n + 31) / 32 * 32, 32, 256)); }

unsigned blocks_for(std::int64_t rows) {
  return static_cast<unsigned>(std::min<std::int64_t>(rows, 16 * static_cast<std::int64_t>(multiprocessor_count())));
}

template <typename In, typename Out>
void forward(const In* gate_up, Out* out, std::int64_t rows, std::int64_t cols, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return;
  if (cols % 4 == 0 && aligned(gate_up, 4 * sizeof(In)) && aligned(out, 4 * sizeof(Out))) {
    swiglu_forward_kernel<4, In, Out><<<blocks_for(rows), threads_for(cols / 4), 0, stream>>>(gate_up, out, rows,
                                                                                              cols);
  } else {
    swiglu_forward_kernel<1, In, Out><<<blocks_for(rows), threads_for(cols), 0, stream>>>(gate_up, out, rows, cols);
  }
  CUDABLOCKS_CHECK_LAUNCH("swiglu_forward_kernel");
}

template <typename In, typename Out>
void backward(const In* dout, const In* gate_up, Out* d_gate_up, std::int64_t rows, std::int64_t cols,
              cudaStream_t stream) {
  if (rows == 0 || cols == 0) return;
  if (cols % 4 == 0 && aligned(dout, 4 * sizeof(In)) && aligned(gate_up, 4 * sizeof(In)) &&
      aligned(d_gate_up, 4 * sizeof(Out))) {
    swiglu_backward_kernel<4, In, Out><<<blocks_for(rows), threads_for(cols / 4), 0, stream>>>(dout, gate_up,
                                                                                               d_gate_up, rows, cols);
  } else {
    swiglu_backward_kernel<1, In, Out><<<blocks_for(rows), threads_for(cols), 0, stream>>>(dout, gate_up, d_gate_up,
                                                                                           rows, cols);
  }
  CUDABLOCKS_CHECK_LAUNCH("swiglu_backward_kernel");
}

}  // namespace

void swiglu_forward(const float* gate_up, float* out, std::int64_t rows, std::int64_t cols, cudaStream_t stream) {
  forward(gate_up, out, rows, cols, stream);
}
void swiglu_forward(const std::uint16_t* gate_up, float* out, std::int64_t rows, std::int64_t cols,
                    cudaStream_t stream) {
  forward(gate_up, out, rows, cols, stream);
}
void swiglu_forward(const std::uint16_t* gate_up, std::uint16_t* out, std::int64_t rows, std::int64_t cols,
                    cudaStream_t stream) {
  forward(gate_up, out, rows, cols, stream);
}

void swiglu_forward_transposed(const float* gate_up, float* out_t, std::int64_t rows, std::int64_t cols,
                               cudaStream_t stream) {
  if (rows == 0 || cols == 0) return;
  const TransposeLaunch launch(rows, cols);
  swiglu_forward_transposed_kernel<<<launch.grid, launch.block, 0, stream>>>(gate_up, out_t, rows, cols);
  CUDABLOCKS_CHECK_LAUNCH("swiglu_forward_transposed_kernel");
}

void swiglu_backward(const float* dout, const float* gate_up, float* d_gate_up, std::int64_t rows, std::int64_t cols,
                     cudaStream_t stream) {
  backward(dout, gate_up, d_gate_up, rows, cols, stream);
}
void swiglu_backward(const std::uint16_t* dout, const std::uint16_t* gate_up, float* d_gate_up, std::int64_t rows,
                     std::int64_t cols, cudaStream_t stream) {
  backward(dout, gate_up, d_gate_up, rows, cols, stream);
}
void swiglu_backward(const std::uint16_t* dout, const std::uint16_t* gate_up, std::uint16_t* d_gate_up,
                     std::int64_t rows, std::int64_t cols, cudaStream_t stream) {
  backward(dout, gate_up, d_gate_up, rows, cols, stream);
}

}  // namespace cudablocks::cuda

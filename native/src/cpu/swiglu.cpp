#include "cpu/swiglu.hpp"

#include <algorithm>
#include <cmath>

#include "cpu/parallel.hpp"

namespace cudablocks::cpu {
namespace {

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// One output, silu(gate) * up, in double, rounded once.
float swiglu(float gate, float up) {
  const double g = gate;
  return static_cast<float>(g * sigmoid(g) * up);
}

std::int64_t row_grain(std::int64_t cols) { return std::max<std::int64_t>(1, 32768 / std::max<std::int64_t>(cols, 1)); }

}  // namespace

void swiglu_forward(const float* gate_up, float* out, std::int64_t rows, std::int64_t cols) {
  parallel_for(rows, [&](std::int64_t r) {
    const float* gate = gate_up + r * 2 * cols;
    const float* up = gate + cols;
    float* o = out + r * cols;
    for (std::int64_t c = 0; c < cols; ++c) o[c] = swiglu(gate[c], up[c]);
  }, row_grain(cols));
}

void swiglu_forward_transposed(const float* gate_up, float* out_t, std::int64_t rows, std::int64_t cols) {
  // A task per column of out (a row of out^T): no two tasks write the same row.
  parallel_for(cols, [&](std::int64_t c) {
    for (std::int64_t r = 0; r < rows; ++r) {
      const float* gate = gate_up + r * 2 * cols;
      out_t[c * rows + r] = swiglu(gate[c], gate[cols + c]);
    }
  }, std::max<std::int64_t>(1, 32768 / std::max<std::int64_t>(rows, 1)));
}

void swiglu_backward(const float* dout, const float* gate_up, float* d_gate_up, std::int64_t rows,
                     std::int64_t cols) {
  parallel_for(rows, [&](std::int64_t r) {
    const float* gate = gate_up + r * 2 * cols;
    const float* up = gate + cols;
    const float* d = dout + r * cols;
    float* d_gate = d_gate_up + r * 2 * cols;
    float* d_up = d_gate + cols;
    for (std::int64_t c = 0; c < cols; ++c) {
      const double g = gate[c], sg = sigmoid(g);
      // d silu(g) / dg = sigmoid(g) + g * sigmoid(g) * (1 - sigmoid(g))
      d_gate[c] = static_cast<float>(d[c] * static_cast<double>(up[c]) * sg * (1.0 + g * (1.0 - sg)));
      d_up[c] = static_cast<float>(d[c] * g * sg);
    }
  }, row_grain(cols));
}

}  // namespace cudablocks::cpu

// Buffer-level ops: validate shapes, dtypes and devices, then run on the buffers' backend.
// These are what Python calls directly; blocks call the Backend on raw pointers.
#pragma once

#include "cudablocks/backend.hpp"
#include "cudablocks/buffer.hpp"
#include "cudablocks/stream.hpp"

namespace cudablocks {

// y = rmsnorm(x) * w for x, y [rows, cols] and w [cols], all float32 on the stream's device.
void rmsnorm_forward(const Buffer& x, const Buffer& w, Buffer& y, float eps, const Stream& stream);

// out [M, N] = a [M, K] op(b) + beta * out, op(b) = b [K, N] or, with trans_b, b^T for b [N, K].
// a and b float32 (Backend::gemm in `precision`) or both bfloat16 (Backend::gemm_bf16; precision
// must then be BF16); out float32; all on the stream's device.
void gemm(const Buffer& a, const Buffer& b, Buffer& out, bool trans_b, float beta, Precision precision,
          const Stream& stream);

}  // namespace cudablocks

// Buffer-level ops: validate shapes, dtypes and devices, then run on the buffers' backend.
// These are what Python calls directly; blocks call the Backend on raw pointers.
#pragma once

#include "cudablocks/buffer.hpp"
#include "cudablocks/stream.hpp"

namespace cudablocks {

// y = rmsnorm(x) * w for x, y [rows, cols] and w [cols], all float32 on the stream's device.
void rmsnorm_forward(const Buffer& x, const Buffer& w, Buffer& y, float eps, const Stream& stream);

}  // namespace cudablocks

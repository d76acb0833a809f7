// Argument checks shared by the Buffer-level ops and the blocks. Each throws the documented
// error class with a message naming the argument, what was expected and what was given.
#pragma once

#include <initializer_list>

#include "cudablocks/buffer.hpp"

namespace cudablocks {

void check_dtype(const Buffer& buffer, DType expected, const char* name);
// `expected` entries of -1 match any size.
void check_shape(const Buffer& buffer, std::initializer_list<std::int64_t> expected, const char* name);
void check_device(const Buffer& buffer, const Device& expected, const char* name);
// The data starts on an `alignment`-byte boundary (vectorised kernels load 16 bytes at a time;
// library allocations are aligned, views and imported tensors may not be).
void check_aligned(const Buffer& buffer, std::size_t alignment, const char* name);

}  // namespace cudablocks

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

}  // namespace cudablocks

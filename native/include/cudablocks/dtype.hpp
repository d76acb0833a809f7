// Element types a buffer can hold.
#pragma once

#include <cstddef>
#include <string>

namespace cudablocks {

enum class DType { Float32, BFloat16, Float16, UInt8, Int32 };

std::size_t dtype_size(DType dtype);
// The numpy-style name: "float32", "bfloat16", "float16", "uint8", "int32".
std::string dtype_name(DType dtype);
// Inverse of dtype_name; throws DtypeError for anything else.
DType dtype_from_name(const std::string& name);

}  // namespace cudablocks

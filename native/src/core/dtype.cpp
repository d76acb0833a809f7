#include "cudablocks/dtype.hpp"

#include "cudablocks/errors.hpp"

namespace cudablocks {

std::size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::Float32: return 4;
    case DType::BFloat16: return 2;
    case DType::Float16: return 2;
    case DType::UInt8: return 1;
    case DType::Int32: return 4;
  }
  return 0;
}

std::string dtype_name(DType dtype) {
  switch (dtype) {
    case DType::Float32: return "float32";
    case DType::BFloat16: return "bfloat16";
    case DType::Float16: return "float16";
    case DType::UInt8: return "uint8";
    case DType::Int32: return "int32";
  }
  return "unknown";
}

DType dtype_from_name(const std::string& name) {
  for (DType d : {DType::Float32, DType::BFloat16, DType::Float16, DType::UInt8, DType::Int32}) {
    if (dtype_name(d) == name) return d;
  }
  throw DtypeError("unsupported dtype '" + name +
                   "': buffers hold float32, bfloat16, float16, uint8 or int32");
}

}  // namespace cudablocks

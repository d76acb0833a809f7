#include <string>

#include "core/checks.hpp"
#include "cudablocks/backend.hpp"
#include "cudablocks/errors.hpp"
#include "cudablocks/ops.hpp"

namespace cudablocks {

void gemm(const Buffer& a, const Buffer& b, Buffer& out, bool trans_a, bool trans_b, float beta, Precision precision,
          const Stream& stream) {
  const Device& device = stream.device();
  check_device(a, device, "a");
  check_device(b, device, "b");
  check_device(out, device, "out");
  const bool bf16 = a.dtype() == DType::BFloat16;
  check_dtype(a, bf16 ? DType::BFloat16 : DType::Float32, "a");
  check_dtype(b, a.dtype(), "b (the dtype of a)");
  const bool out16 = bf16 && out.dtype() == DType::BFloat16;
  check_dtype(out, out16 ? DType::BFloat16 : DType::Float32,
              bf16 ? "out (float32, or bfloat16 like a and b)" : "out (bfloat16 only with bfloat16 a and b)");
  if (bf16 && precision != Precision::BF16) {
    throw InvalidArgumentError("gemm: bfloat16 operands multiply in precision \"bf16\" only");
  }
  if (out16 && beta != 0.0f && beta != 1.0f) {
    throw InvalidArgumentError("gemm: a bfloat16 out takes beta 0 or 1, got " + std::to_string(beta));
  }
  check_shape(a, {-1, -1}, "a");
  check_shape(b, {-1, -1}, "b");
  const std::int64_t m = trans_a ? a.shape()[1] : a.shape()[0];
  const std::int64_t k = trans_a ? a.shape()[0] : a.shape()[1];
  const std::int64_t n = trans_b ? b.shape()[0] : b.shape()[1];
  if (trans_b) {
    check_shape(b, {n, k}, "b (trans_b: [N, K])");
  } else {
    check_shape(b, {k, n}, "b ([K, N])");
  }
  check_shape(out, {m, n}, "out");
  if (m == 0 || n == 0) return;
  DeviceGuard guard(device);
  const Backend& be = backend_for(device);
  if (out16) {
    auto* c = out.data_as<std::uint16_t>();
    if (beta == 0.0f) {
      be.gemm_bf16_to_bf16(trans_a, trans_b, m, n, k, 1.0f, a.data_as<std::uint16_t>(), b.data_as<std::uint16_t>(), c,
                           stream);
    } else {
      be.gemm_bf16_to_bf16_add(trans_a, trans_b, m, n, k, 1.0f, a.data_as<std::uint16_t>(),
                               b.data_as<std::uint16_t>(), c, stream);
    }
  } else if (bf16) {
    be.gemm_bf16(trans_a, trans_b, m, n, k, 1.0f, a.data_as<std::uint16_t>(), b.data_as<std::uint16_t>(), beta,
                 out.data_as<float>(), stream);
  } else {
    be.gemm(trans_a, trans_b, m, n, k, 1.0f, a.data_as<float>(), b.data_as<float>(), beta, out.data_as<float>(),
            precision, stream);
  }
}

}  // namespace cudablocks

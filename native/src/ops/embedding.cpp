#include <string>

#include "core/checks.hpp"
#include "cudablocks/backend.hpp"
#include "cudablocks/errors.hpp"
#include "cudablocks/ops.hpp"

namespace cudablocks {

void embedding_forward(const Buffer& ids, const Buffer& table, Buffer& out, const Stream& stream) {
  const Device& device = stream.device();
  check_device(ids, device, "ids");
  check_device(table, device, "table");
  check_device(out, device, "out");
  check_dtype(ids, DType::Int32, "ids");
  if (table.dtype() != DType::Float32 && table.dtype() != DType::BFloat16) {
    throw DtypeError("table must be float32 or bfloat16, got " + table.describe());
  }
  check_dtype(out, DType::Float32, "out");
  check_shape(ids, {-1}, "ids");
  check_shape(table, {-1, -1}, "table");
  const std::int64_t tokens = ids.shape()[0], vocab = table.shape()[0], hidden = table.shape()[1];
  check_shape(out, {tokens, hidden}, "out ([len(ids), hidden])");
  if (tokens == 0 || hidden == 0) return;
  DeviceGuard guard(device);
  backend_for(device).embedding_forward(ids.data_as<std::int32_t>(), table.data(), table.dtype(),
                                        out.data_as<float>(), tokens, vocab, hidden, stream);
}

void embedding_backward(const Buffer& grad_out, const Buffer& rows, const Buffer& offsets, const Buffer& order,
                        Buffer& grad_table, const Stream& stream) {
  const Device& device = stream.device();
  check_device(grad_out, device, "grad_out");
  check_device(rows, device, "rows");
  check_device(offsets, device, "offsets");
  check_device(order, device, "order");
  check_device(grad_table, device, "grad_table");
  check_dtype(grad_out, DType::Float32, "grad_out");
  check_dtype(rows, DType::Int32, "rows");
  check_dtype(offsets, DType::Int32, "offsets");
  check_dtype(order, DType::Int32, "order");
  check_dtype(grad_table, DType::Float32, "grad_table");
  check_shape(grad_out, {-1, -1}, "grad_out");
  check_shape(grad_table, {-1, grad_out.shape()[1]}, "grad_table ([vocab, hidden of grad_out])");
  check_shape(rows, {-1}, "rows");
  check_shape(offsets, {rows.shape()[0] + 1}, "offsets ([len(rows) + 1])");
  check_shape(order, {-1}, "order");
  const std::int64_t tokens = grad_out.shape()[0], hidden = grad_out.shape()[1];
  const std::int64_t unique_rows = rows.shape()[0], vocab = grad_table.shape()[0];
  if (unique_rows == 0 || hidden == 0) return;
  DeviceGuard guard(device);
  backend_for(device).embedding_backward(grad_out.data_as<float>(), rows.data_as<std::int32_t>(),
                                         offsets.data_as<std::int32_t>(), order.data_as<std::int32_t>(),
                                         grad_table.data_as<float>(), unique_rows, order.shape()[0], tokens, vocab,
                                         hidden, stream);
}

}  // namespace cudablocks

#include "cudablocks/block.hpp"
#include "cudablocks/errors.hpp"

namespace cudablocks {

CudaGradWorkspace::CudaGradWorkspace(std::shared_ptr<const ParamLayout> layout, const Device& device,
                                     const Stream& stream)
    : layout_(std::move(layout)), last_stream_(stream) {
  if (stream.device() != device) {
    throw DeviceError("a gradient workspace on " + device.str() + " with a stream of " + stream.device().str());
  }
  flat_ = Buffer::empty({layout_->total_floats()}, DType::Float32, device);
  zero(stream);
}

void CudaGradWorkspace::zero(const Stream& stream) {
  if (stream.device() != flat_.device()) {
    throw DeviceError("zero_ of a gradient workspace on " + flat_.device().str() + " with a stream of " +
                      stream.device().str());
  }
  flat_.fill(0.0, stream);
  last_stream_ = stream;
}

void CudaGradWorkspace::download(float* host, const Stream& stream) const {
  flat_.copy_to_host(host, stream);
}

}  // namespace cudablocks

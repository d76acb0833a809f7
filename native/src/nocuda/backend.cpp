#include "core/backends.hpp"
#include "cudablocks/errors.hpp"

namespace cudablocks {

const Backend& cuda_backend() {
  throw DeviceError("cudablocks was built without its CUDA backend");
}

}  // namespace cudablocks

#include "core/backends.hpp"

namespace cudablocks {

const Backend& backend_for(const Device& device) {
  return device.is_cpu() ? cpu_backend() : cuda_backend();
}

}  // namespace cudablocks

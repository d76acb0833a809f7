// The two Backend implementations; backend_for() picks one by device.
#pragma once

#include "cudablocks/backend.hpp"

namespace cudablocks {

const Backend& cpu_backend();   // src/cpu/backend.cpp
const Backend& cuda_backend();  // src/cuda/backend.cpp, or src/nocuda/backend.cpp (throws)

}  // namespace cudablocks

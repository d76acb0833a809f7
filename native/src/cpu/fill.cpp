#include "cpu/fill.hpp"

#include <algorithm>
#include <cstring>

namespace cudablocks::cpu {

void fill(void* data, std::size_t count, std::size_t element_size, std::uint32_t bits) {
  switch (element_size) {
    case 1: std::memset(data, static_cast<int>(bits & 0xffu), count); break;
    case 2: std::fill_n(static_cast<std::uint16_t*>(data), count, static_cast<std::uint16_t>(bits)); break;
    default: std::fill_n(static_cast<std::uint32_t*>(data), count, bits); break;
  }
}

}  // namespace cudablocks::cpu

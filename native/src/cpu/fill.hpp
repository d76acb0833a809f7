#pragma once

#include <cstddef>
#include <cstdint>

namespace cudablocks::cpu {

// Sets `count` elements of `element_size` bytes (1, 2 or 4) to the low bytes of `bits`.
void fill(void* data, std::size_t count, std::size_t element_size, std::uint32_t bits);

}  // namespace cudablocks::cpu

#include "cudablocks/errors.hpp"

#include <cstdio>

namespace cudablocks {

std::string format_bytes(std::size_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double value = static_cast<double>(bytes);
  int unit = 0;
  while (value >= 1024.0 && unit < 4) {
    value /= 1024.0;
    ++unit;
  }
  char text[32];
  std::snprintf(text, sizeof text, unit == 0 ? "%.0f %s" : "%.2f %s", value, units[unit]);
  return text;
}

OutOfMemoryError::OutOfMemoryError(const std::string& where, std::size_t bytes_requested,
                                   std::size_t bytes_free, std::size_t bytes_total)
    : Error("out of memory on " + where + ": asked for " + format_bytes(bytes_requested) + " (" +
            std::to_string(bytes_requested) + " bytes), " + format_bytes(bytes_free) + " free of " +
            format_bytes(bytes_total)),
      bytes_requested_(bytes_requested),
      bytes_free_(bytes_free) {}

}  // namespace cudablocks

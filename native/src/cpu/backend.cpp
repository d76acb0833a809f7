// The CPU backend: forwards each op to its reference implementation in this folder.
#include "core/backends.hpp"
#include "cpu/fill.hpp"
#include "cpu/rmsnorm.hpp"

namespace cudablocks {

namespace {

class CpuBackend final : public Backend {
 public:
  const char* name() const override { return "cpu"; }

  void fill(void* data, std::size_t count, std::size_t element_size, std::uint32_t bits,
            const Stream&) const override {
    cpu::fill(data, count, element_size, bits);
  }

  void rmsnorm_forward(const float* x, const float* w, float* y, float* rstd, std::int64_t rows,
                       std::int64_t cols, float eps, const Stream&) const override {
    cpu::rmsnorm_forward(x, w, y, rstd, rows, cols, eps);
  }
};

}  // namespace

const Backend& cpu_backend() {
  static const CpuBackend backend;
  return backend;
}

}  // namespace cudablocks

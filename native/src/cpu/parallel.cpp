#include "cpu/parallel.hpp"

#include <algorithm>
#include <exception>
#include <thread>
#include <vector>

namespace cudablocks::cpu {

void parallel_for(std::int64_t n, const std::function<void(std::int64_t)>& body, std::int64_t grain) {
  const std::int64_t hardware = std::max(1u, std::thread::hardware_concurrency());
  const std::int64_t workers = std::min(hardware, std::max<std::int64_t>(1, n / std::max<std::int64_t>(grain, 1)));
  if (workers <= 1) {
    for (std::int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  std::vector<std::thread> threads;
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(workers));
  const std::int64_t chunk = (n + workers - 1) / workers;
  for (std::int64_t t = 0; t < workers; ++t) {
    threads.emplace_back([&, t] {
      try {
        for (std::int64_t i = t * chunk; i < std::min(n, (t + 1) * chunk); ++i) body(i);
      } catch (...) {
        errors[static_cast<std::size_t>(t)] = std::current_exception();
      }
    });
  }
  for (auto& thread : threads) thread.join();
  for (auto& error : errors) {
    if (error) std::rethrow_exception(error);
  }
}

}  // namespace cudablocks::cpu

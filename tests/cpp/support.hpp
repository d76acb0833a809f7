// Helpers shared by the gtest binaries.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

namespace cudablocks::test {

// Seeded from std::random_device, so every run draws fresh inputs; the seed is printed so that a
// failure can be replayed.
std::mt19937& rng();
std::vector<float> random_normal(std::size_t n, float stddev = 1.0f);
// True when a CUDA device is usable (the CUDA cases skip otherwise).
bool have_cuda_device();
// ||a - b|| / ||b|| in double.
double relative_error(const std::vector<float>& a, const std::vector<double>& b);
double relative_error(const std::vector<float>& a, const std::vector<float>& b);

}  // namespace cudablocks::test

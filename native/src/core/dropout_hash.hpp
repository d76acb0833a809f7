// The masks of LoRA dropout (PEFT's lora_dropout, inverted dropout) as a counter-based hash: no
// random state is kept anywhere, a mask is a pure function of its key and the element's index, so
// the CPU and CUDA backends draw the same mask bit for bit, a backward redraws the forward's mask
// instead of storing it, and a resumed run draws the masks of the original. Every function here is
// usable from host and device code.
//
// All arithmetic is on unsigned 64-bit integers modulo 2^64:
//
//   mix(z)  = splitmix64's output function:
//               z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
//               z = (z ^ (z >> 27)) * 0x94D049BB133111EB
//               z =  z ^ (z >> 31)
//   G       = 0x9E3779B97F4A7C15 (the golden-ratio increment of splitmix64)
//   absorb(k, w) = mix((k ^ w) + G)
//
// The key of one adapted projection in one training step:
//
//   key = absorb(absorb(absorb(absorb(0, seed), layer_idx), projection), step)
//
// with seed = LoraConfig.seed, projection the index in q_proj, k_proj, v_proj, o_proj, gate_proj,
// up_proj, down_proj (0 .. 6) and step the caller's dropout_step. Element (t, f) of the
// projection's input [tokens, in_features] (t the row in the packed batch) has the index
// i = t * in_features + f and the bits
//
//   bits(key, i) = mix(key + (i + 1) * G)        (the i-th output of splitmix64 seeded with key)
//
// It is kept when (bits >> 32) >= threshold(p) = floor(p * 2^32), so with probability 1 - p up to
// 2^-32, and a kept element is multiplied by scale(p) = float(1 / (1 - p)) (computed in double,
// rounded once); a dropped one is 0.
#pragma once

#include <cmath>
#include <cstdint>

#include "core/host_device.hpp"

namespace cudablocks::dropout {

constexpr std::uint64_t kGolden = 0x9E3779B97F4A7C15ull;

CUDABLOCKS_HD std::uint64_t mix(std::uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

CUDABLOCKS_HD std::uint64_t absorb(std::uint64_t k, std::uint64_t w) { return mix((k ^ w) + kGolden); }

// The key of one adapted projection's mask in one step (see the header comment).
inline std::uint64_t key(std::uint64_t seed, std::uint64_t layer_idx, std::uint64_t projection, std::uint64_t step) {
  return absorb(absorb(absorb(absorb(0, seed), layer_idx), projection), step);
}

// Elements whose high 32 bits are below this are dropped; p in [0, 1).
inline std::uint32_t threshold(double p) { return static_cast<std::uint32_t>(std::floor(p * 4294967296.0)); }
inline float scale(double p) { return static_cast<float>(1.0 / (1.0 - p)); }

CUDABLOCKS_HD bool keep(std::uint64_t key, std::uint64_t index, std::uint32_t threshold) {
  return static_cast<std::uint32_t>(mix(key + (index + 1) * kGolden) >> 32) >= threshold;
}

}  // namespace cudablocks::dropout

// Seeded random inputs for the GPU tests and benches (no GoogleTest here, so the benches can
// use them): fp32 vectors, token ids, bf16 weights and raw bytes (MXFP4 codes).
#pragma once

#include <algorithm>
#include <concepts>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "core/dtype.h"

namespace ossrl::test {

// n values uniform in [-bound, bound), drawn from rng (a test draws several inputs from one
// generator) or from a generator of their own seeded with `seed`.
template <std::uniform_random_bit_generator Rng>
std::vector<float> uniform_vector(size_t n, float bound, Rng& rng) {
  std::uniform_real_distribution<float> dist(-bound, bound);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}
inline std::vector<float> uniform_vector(size_t n, float bound, uint64_t seed) {
  std::mt19937_64 rng(seed);
  return uniform_vector(n, bound, rng);
}

// n values ~ N(0, stddev²).
inline std::vector<float> normal_vector(size_t n, uint64_t seed, float stddev = 1.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(0.0f, stddev);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// n integers uniform in [0, below): token ids, positions.
inline std::vector<int32_t> uniform_ints(size_t n, int32_t below, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> dist(0, below - 1);
  std::vector<int32_t> v(n);
  for (int32_t& x : v) x = dist(rng);
  return v;
}

// n random bytes, eight from each 64-bit draw: MXFP4 codes uniform over all 16.
template <std::uniform_random_bit_generator Rng>
std::vector<uint8_t> random_bytes(size_t n, Rng& rng) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; i += 8) {
    const uint64_t r = rng();
    std::memcpy(v.data() + i, &r, std::min<size_t>(8, n - i));
  }
  return v;
}

// n bf16 weights (bits) uniform in [-bound, bound).
template <std::uniform_random_bit_generator Rng>
std::vector<uint16_t> uniform_bf16_bits(size_t n, float bound, Rng& rng) {
  std::uniform_real_distribution<float> dist(-bound, bound);
  std::vector<uint16_t> v(n);
  for (uint16_t& x : v) x = f32_to_bf16(dist(rng));
  return v;
}

}  // namespace ossrl::test

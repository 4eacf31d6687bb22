#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "core/dtype.h"

namespace ossrl {
namespace {

TEST(DType, NamesRoundTrip) {
  for (DType t : {DType::F32, DType::BF16, DType::U8, DType::I64, DType::F16}) {
    DType parsed;
    ASSERT_TRUE(dtype_from_name(dtype_name(t), &parsed));
    EXPECT_EQ(parsed, t);
  }
  DType unused;
  EXPECT_FALSE(dtype_from_name("F8_E4M3X", &unused));
  EXPECT_EQ(dtype_size(DType::BF16), 2u);
}

// Every bf16 bit pattern survives bf16 -> f32 -> bf16 (NaNs stay NaN).
TEST(DType, Bf16RoundTripsAllPatterns) {
  for (uint32_t bits = 0; bits < 65536; ++bits) {
    const float f = bf16_to_f32(uint16_t(bits));
    const uint16_t back = f32_to_bf16(f);
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(bf16_to_f32(back)));
    } else {
      EXPECT_EQ(back, bits);
    }
  }
}

// Rounding is to nearest, ties to even: compare with the exact neighbours.
TEST(DType, Bf16RoundsToNearestEven) {
  EXPECT_EQ(f32_to_bf16(1.0f + 1.0f / 256), 0x3f80);          // tie, even stays
  EXPECT_EQ(f32_to_bf16(1.0f + 3.0f / 256), 0x3f82);          // tie, rounds up to even
  EXPECT_EQ(f32_to_bf16(1.0f + 1.0f / 256 + 1e-6f), 0x3f81);  // just above the tie
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> dist(-1e4f, 1e4f);
  for (int i = 0; i < 10000; ++i) {
    const float f = dist(rng);
    const float r = bf16_to_f32(f32_to_bf16(f));
    EXPECT_LE(std::fabs(r - f), std::fabs(f) * (1.0f / 256)) << f;
  }
}

TEST(DType, F16Decodes) {
  EXPECT_EQ(f16_to_f32(0x3c00), 1.0f);
  EXPECT_EQ(f16_to_f32(0xc000), -2.0f);
  EXPECT_EQ(f16_to_f32(0x0001), std::ldexp(1.0f, -24));
  EXPECT_TRUE(std::isinf(f16_to_f32(0x7c00)));
  EXPECT_TRUE(std::isnan(f16_to_f32(0x7e00)));
}

}  // namespace
}  // namespace ossrl

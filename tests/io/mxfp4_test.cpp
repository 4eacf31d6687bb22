#include "io/mxfp4.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

#include "core/dtype.h"

namespace ossrl {
namespace {

// E2M1 from its bits, independently of the table under test: sign, 2 exponent bits
// (bias 1), 1 mantissa bit; exponent 0 is subnormal (0 or 0.5).
double e2m1(int code) {
  const int sign = code >> 3, exponent = (code >> 1) & 3, mantissa = code & 1;
  const double magnitude =
      exponent == 0 ? 0.5 * mantissa : (1.0 + 0.5 * mantissa) * std::ldexp(1.0, exponent - 1);
  return sign ? -magnitude : magnitude;
}

// What transformers produces for (code, scale), worked out in double: fp4 * 2^(scale-127)
// rounded to float (values of 2^128 and up become inf), then to bf16. Scale 255 is no
// exception: torch 2.11's ldexp is exact for integer exponents, so 0.5 * 2^128 = 2^127.
float expected(int code, int scale) {
  const double exact = std::ldexp(e2m1(code), scale - 127);
  // Every value here is exact in fp32 or at least 2^128, which rounds to inf.
  return std::fabs(exact) > FLT_MAX ? float(std::copysign(INFINITY, exact)) : float(exact);
}

TEST(Mxfp4, TableMatchesE2M1) {
  for (int code = 0; code < 16; ++code) {
    EXPECT_EQ(kFp4Values[code], e2m1(code)) << code;
    EXPECT_EQ(std::signbit(kFp4Values[code]), code >= 8) << code;  // -0 is code 8
  }
}

// Scale 127 is 2^0, so a block decodes to the table itself; the low nibble of byte k is
// element 2k, the high nibble element 2k+1.
TEST(Mxfp4, DecodesTableWithLowNibbleFirst) {
  uint8_t block[kMxfp4BlockBytes];
  for (int k = 0; k < kMxfp4BlockBytes; ++k) block[k] = uint8_t(k | ((15 - k) << 4));
  const uint8_t scale = 127;
  float out[kMxfp4BlockValues];
  mxfp4_decode_f32(block, &scale, 1, out);
  for (int k = 0; k < kMxfp4BlockBytes; ++k) {
    EXPECT_EQ(out[2 * k], kFp4Values[k]) << k;
    EXPECT_EQ(out[2 * k + 1], kFp4Values[15 - k]) << k;
  }
}

// All 16 codes under all 256 scales, in both output forms, against the independent
// expectation; blocks are decoded together so each block must pick up its own scale.
TEST(Mxfp4, EveryScaleAndCodeMatchesTransformers) {
  constexpr int kScales = 256;
  std::vector<uint8_t> blocks(size_t(kScales) * kMxfp4BlockBytes), scales(kScales);
  for (int s = 0; s < kScales; ++s) {
    scales[size_t(s)] = uint8_t(s);
    // Codes 0..15 in the low nibbles and 15..0 in the high ones: each code appears twice.
    for (int k = 0; k < kMxfp4BlockBytes; ++k) {
      blocks[size_t(s) * kMxfp4BlockBytes + size_t(k)] = uint8_t(k | ((15 - k) << 4));
    }
  }
  std::vector<float> f32(size_t(kScales) * kMxfp4BlockValues);
  std::vector<uint16_t> bf16(f32.size());
  mxfp4_decode_f32(blocks.data(), scales.data(), kScales, f32.data());
  mxfp4_decode_bf16(blocks.data(), scales.data(), kScales, bf16.data());

  int finite = 0, inf = 0;
  for (int s = 0; s < kScales; ++s) {
    for (int i = 0; i < kMxfp4BlockValues; ++i) {
      const int code = i % 2 == 0 ? i / 2 : 15 - i / 2;
      const size_t at = size_t(s) * kMxfp4BlockValues + size_t(i);
      const float want = expected(code, s);
      SCOPED_TRACE(testing::Message() << "scale " << s << " code " << code);
      // Bitwise, so -0 and +0 are told apart.
      EXPECT_EQ(std::signbit(f32[at]), std::signbit(want));
      EXPECT_EQ(f32[at], want);
      EXPECT_EQ(bf16[at], f32_to_bf16(want));
      std::isinf(want) ? ++inf : ++finite;
    }
  }
  // |fp4| * 2^(scale-127) reaches 2^128 for |fp4| >= 1 at scale 255 (12 codes), >= 2 at
  // 254 (8 codes), >= 4 at 253 (4 codes); each code appears twice per block.
  EXPECT_EQ(inf, 2 * (12 + 8 + 4));
  EXPECT_EQ(finite, kScales * kMxfp4BlockValues - inf);
}

// The edges of the exponent range: scale 0 (2^-127) gives subnormals kept exactly, not
// flushed; scale 255 (2^128) keeps 0.5 finite and zeros signed zeros, never NaN.
TEST(Mxfp4, ExtremeScales) {
  // Both blocks start with codes 1, 7, 0, 8, 1, 2 (0.5, 6, +0, -0, 0.5, 1).
  uint8_t blocks[2 * kMxfp4BlockBytes] = {0x71, 0x80, 0x21};
  std::copy(blocks, blocks + 3, blocks + kMxfp4BlockBytes);
  const uint8_t scales[2] = {0, 255};
  float out[2 * kMxfp4BlockValues];
  uint16_t out16[2 * kMxfp4BlockValues];
  mxfp4_decode_f32(blocks, scales, 2, out);
  mxfp4_decode_bf16(blocks, scales, 2, out16);
  EXPECT_EQ(out[0], std::ldexp(1.0f, -128));
  EXPECT_LT(out[0], FLT_MIN);
  EXPECT_EQ(out16[0], 0x0020);  // 2^-128: bf16 subnormal, mantissa 0b0100000
  EXPECT_EQ(out[1], std::ldexp(6.0f, -127));
  EXPECT_EQ(bf16_to_f32(out16[1]), out[1]);

  const float* big = out + kMxfp4BlockValues;
  const uint16_t* big16 = out16 + kMxfp4BlockValues;
  EXPECT_EQ(big[0], std::ldexp(1.0f, 127));  // 0.5 * 2^128
  EXPECT_EQ(big16[0], 0x7f00);
  EXPECT_EQ(big[1], INFINITY);
  EXPECT_EQ(big16[2], 0x0000);  // +0
  EXPECT_EQ(big16[3], 0x8000);  // -0
  EXPECT_EQ(big16[5], 0x7f80);  // 1.0 * 2^128 = +inf
}

}  // namespace
}  // namespace ossrl

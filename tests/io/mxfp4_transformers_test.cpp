// ossrl's MXFP4 decoder against transformers' own dequantisation
// (transformers.integrations.mxfp4.convert_moe_packed_tensors, 5.17, CPU), bit for bit, on
// every E8M0 scale byte with every FP4 code plus random blocks.
// Fixture: tests/fixtures/mxfp4/dequant.safetensors from scripts/fixtures/make_fixtures.py
//   blocks  U8   [E, R, G, 16]  block (e, r, g) is flat block n = (e*R + r)*G + g
//   scales  U8   [E, R, G]
//   dequant BF16 [E, G*32, R]   as transformers returns it (transposed):
//                               dequant[e, g*32 + k, r] = value k of block (e, r, g)
//
// What transformers gives (torch 2.11 CPU, where ldexp with an integer exponent is a true
// ldexp): fp4 * 2^(scale - 127) exactly, rounded to bf16. |value| >= 2^128 becomes +-inf,
// but a zero code stays +-0 even at scale 255 and 0.5 * 2^128 is the finite 2^127; a decoder
// that multiplies by a precomputed fp32 2^(scale - 127) (inf at scale 255) gets those wrong.
//
// NaN is compared as NaN, not by bits (the fixture holds none today, but a regeneration with
// another torch could): a NaN's sign and payload come from the CPU (x86 makes a negative
// default NaN, Arm a positive one) and from the bf16 conversion (torch writes 0x7fc0 for
// every NaN), and carry no meaning.
#include <gtest/gtest.h>

#include <array>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "io/mxfp4.h"
#include "io/safetensors.h"

namespace ossrl {
namespace {

bool bf16_is_nan(uint16_t bits) { return (bits & 0x7f80u) == 0x7f80u && (bits & 0x007fu) != 0; }

uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);  // safetensors offsets need not be 2-byte aligned
  return v;
}

class Mxfp4Transformers : public ::testing::Test {
 protected:
  void SetUp() override {
    file_ = SafetensorsFile::open(std::string(OSSRL_FIXTURE_DIR) + "/mxfp4/dequant.safetensors");
    blocks_ = &file_->tensor("blocks");
    scales_ = &file_->tensor("scales");
    dequant_ = &file_->tensor("dequant");
    ASSERT_EQ(blocks_->shape.size(), 4u);
    e_ = blocks_->shape[0];
    r_ = blocks_->shape[1];
    g_ = blocks_->shape[2];
    const std::array<int64_t, 4> blocks_shape = {e_, r_, g_, kMxfp4BlockBytes};
    const std::array<int64_t, 3> scales_shape = {e_, r_, g_};
    const std::array<int64_t, 3> dequant_shape = {e_, g_ * kMxfp4BlockValues, r_};
    blocks_->expect(DType::U8, blocks_shape);
    scales_->expect(DType::U8, scales_shape);
    dequant_->expect(DType::BF16, dequant_shape);
  }

  size_t n_blocks() const { return size_t(e_ * r_ * g_); }

  // transformers' value k of flat block n.
  uint16_t theirs(size_t n, int k) const {
    const int64_t g = int64_t(n) % g_, r = int64_t(n) / g_ % r_, e = int64_t(n) / g_ / r_;
    const int64_t index = (e * g_ * kMxfp4BlockValues + g * kMxfp4BlockValues + k) * r_ + r;
    return load_u16(dequant_->data + 2 * index);
  }

  // Compares `ours` (n_blocks * 32 bf16 values in block order) with transformers.
  void expect_same(const std::vector<uint16_t>& ours) const {
    size_t mismatches = 0;
    for (size_t n = 0; n < n_blocks(); ++n) {
      for (int k = 0; k < kMxfp4BlockValues; ++k) {
        const uint16_t a = ours[n * kMxfp4BlockValues + k], b = theirs(n, k);
        if (bf16_is_nan(a) && bf16_is_nan(b)) continue;
        if (a == b) continue;
        if (++mismatches <= 10) {
          const uint8_t byte = blocks_->data[n * kMxfp4BlockBytes + k / 2];
          ADD_FAILURE() << "block " << n << " value " << k << " (scale " << int(scales_->data[n])
                        << ", code " << int(k % 2 ? byte >> 4 : byte & 0x0f) << "): ours 0x" << std::hex
                        << a << ", transformers 0x" << b;
        }
      }
    }
    EXPECT_EQ(mismatches, 0u);
  }

  std::unique_ptr<SafetensorsFile> file_;
  const TensorView* blocks_ = nullptr;
  const TensorView* scales_ = nullptr;
  const TensorView* dequant_ = nullptr;
  int64_t e_ = 0, r_ = 0, g_ = 0;
};

// The fixture is only worth its name if every scale meets every code.
TEST_F(Mxfp4Transformers, FixtureCoversEveryScaleWithEveryCode) {
  std::vector<std::array<bool, 16>> seen(256);
  for (size_t n = 0; n < n_blocks(); ++n) {
    for (int i = 0; i < kMxfp4BlockBytes; ++i) {
      const uint8_t byte = blocks_->data[n * kMxfp4BlockBytes + i];
      seen[scales_->data[n]][byte & 0x0f] = true;
      seen[scales_->data[n]][byte >> 4] = true;
    }
  }
  for (int s = 0; s < 256; ++s) {
    for (int c = 0; c < 16; ++c) EXPECT_TRUE(seen[s][c]) << "scale " << s << " code " << c;
  }
}

TEST_F(Mxfp4Transformers, DecodeBf16MatchesBitForBit) {
  std::vector<uint16_t> ours(n_blocks() * kMxfp4BlockValues);
  mxfp4_decode_bf16(blocks_->data, scales_->data, n_blocks(), ours.data());
  expect_same(ours);
}

// The fp32 decoder holds the same values before rounding (every finite one is exact in bf16).
TEST_F(Mxfp4Transformers, DecodeF32RoundsToTheSameBits) {
  std::vector<float> f32(n_blocks() * kMxfp4BlockValues);
  mxfp4_decode_f32(blocks_->data, scales_->data, n_blocks(), f32.data());
  std::vector<uint16_t> ours(f32.size());
  for (size_t i = 0; i < f32.size(); ++i) ours[i] = f32_to_bf16(f32[i]);
  expect_same(ours);
}

}  // namespace
}  // namespace ossrl

#include "io/mxfp4.h"

#include <cmath>

#include "core/dtype.h"

namespace ossrl {

const float kFp4Values[16] = {+0.0f, +0.5f, +1.0f, +1.5f, +2.0f, +3.0f, +4.0f, +6.0f,
                              -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

namespace {

// 2^(scale - 127) as fp32, the way transformers gets it (torch.ldexp multiplies by
// pow(2, exp) computed in fp32): scale 0 gives the subnormal 2^-127 exactly, scale 255
// gives 2^128 = +inf *before* the multiply, so every nonzero code becomes +-inf and a
// zero code NaN, even where fp4 * 2^128 would be finite (0.5 * 2^128).
float scale_factor(uint8_t scale) { return std::ldexp(1.0f, int(scale) - 127); }

// Shared loop: `store(i, v)` receives value i of the output in fp32.
template <typename Store>
void decode(const uint8_t* blocks, const uint8_t* scales, size_t n_blocks, Store store) {
  for (size_t b = 0; b < n_blocks; ++b) {
    const float s = scale_factor(scales[b]);
    const uint8_t* block = blocks + b * kMxfp4BlockBytes;
    const size_t out = b * kMxfp4BlockValues;
    for (int k = 0; k < kMxfp4BlockBytes; ++k) {
      // Low nibble is the even element, high nibble the odd one.
      store(out + 2 * k, kFp4Values[block[k] & 0x0f] * s);
      store(out + 2 * k + 1, kFp4Values[block[k] >> 4] * s);
    }
  }
}

}  // namespace

void mxfp4_decode_f32(const uint8_t* blocks, const uint8_t* scales, size_t n_blocks, float* out) {
  decode(blocks, scales, n_blocks, [out](size_t i, float v) { out[i] = v; });
}

void mxfp4_decode_bf16(const uint8_t* blocks, const uint8_t* scales, size_t n_blocks, uint16_t* out) {
  // Every finite product has at most two significant bits, so the bf16 rounding is exact.
  decode(blocks, scales, n_blocks, [out](size_t i, float v) { out[i] = f32_to_bf16(v); });
}

}  // namespace ossrl

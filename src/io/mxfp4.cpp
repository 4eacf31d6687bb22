#include "io/mxfp4.h"

#include <cstring>

#include "core/dtype.h"

namespace ossrl {

const float kFp4Values[16] = {+0.0f, +0.5f, +1.0f, +1.5f, +2.0f, +3.0f, +4.0f, +6.0f,
                              -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

namespace {

// 2^(scale - 127) as an fp32 multiplier, built from its bits (std::ldexp per value was the
// cost of the whole decode). Scales 1..254 are normal floats; scale 0 is the subnormal
// 2^-127. Scale 255 (2^128) has no fp32 value: the caller splits it as 2 * 2^127.
float scale_multiplier(uint8_t scale) {
  const uint32_t bits = scale == 0 ? 0x00400000u : uint32_t(scale == 255 ? 254 : scale) << 23;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Shared loop: `store(i, v)` receives value i of the output in fp32.
template <typename Store>
void decode(const uint8_t* blocks, const uint8_t* scales, size_t n_blocks, Store store) {
  float values[16];
  for (size_t b = 0; b < n_blocks; ++b) {
    // transformers calls torch.ldexp(bf16 values, int32 exponents), which torch (2.11, CPU
    // and CUDA) runs as a true ldexp in fp32: exact down to the subnormal 2^-128 of scale
    // 0, +-inf once |value| reaches 2^128, and finite where a precomputed fp32 2^(scale-127)
    // would not be: scale 255 gives 0.5 * 2^128 = 2^127 and keeps zero codes +-0. Each
    // product below is exact (fp4 values have two significant bits) or overflows to +-inf
    // exactly where ldexp does, so this equals ldexp bit for bit.
    const float multiplier = scale_multiplier(scales[b]);
    const float pre = scales[b] == 255 ? 2.0f : 1.0f;
    for (int code = 0; code < 16; ++code) values[code] = (kFp4Values[code] * pre) * multiplier;
    const uint8_t* block = blocks + b * kMxfp4BlockBytes;
    const size_t out = b * kMxfp4BlockValues;
    for (int k = 0; k < kMxfp4BlockBytes; ++k) {
      // Low nibble is the even element, high nibble the odd one.
      store(out + 2 * k, values[block[k] & 0x0f]);
      store(out + 2 * k + 1, values[block[k] >> 4]);
    }
  }
}

}  // namespace

void mxfp4_decode_f32(const uint8_t* blocks, const uint8_t* scales, size_t n_blocks, float* out) {
  decode(blocks, scales, n_blocks, [out](size_t i, float v) { out[i] = v; });
}

void mxfp4_decode_bf16(const uint8_t* blocks, const uint8_t* scales, size_t n_blocks, uint16_t* out) {
  // Every finite value has at most two significant bits, so the bf16 rounding is exact.
  decode(blocks, scales, n_blocks, [out](size_t i, float v) { out[i] = f32_to_bf16(v); });
}

}  // namespace ossrl

// MXFP4 (OCP microscaling FP4), as gpt-oss stores its expert weights: blocks of 32
// values along the input dimension, 16 bytes of E2M1 codes (low nibble first) plus one
// E8M0 scale byte; value = fp4 * 2^(scale - 127).
#pragma once

#include <cstddef>
#include <cstdint>

namespace ossrl {

constexpr int kMxfp4BlockValues = 32;
constexpr int kMxfp4BlockBytes = 16;

// E2M1 code (0..15) to its value.
extern const float kFp4Values[16];

// Decodes `n_blocks` blocks into fp32 (n_blocks * 32 values): blocks [n_blocks, 16],
// scales [n_blocks]. fp32 holds every finite result exactly; overflow is +-inf and
// 0 * 2^128 is NaN, as in transformers.
void mxfp4_decode_f32(const uint8_t* blocks, const uint8_t* scales, size_t n_blocks, float* out);
// The same, rounded to bf16 bits: bit-identical to transformers' dequantisation
// (convert_moe_packed_tensors) for every finite and infinite value; NaNs (zero codes
// under scale 255) are NaN, their payload bits are not promised (torch's own differ
// between its scalar and vectorised conversions).
void mxfp4_decode_bf16(const uint8_t* blocks, const uint8_t* scales, size_t n_blocks, uint16_t* out);

}  // namespace ossrl

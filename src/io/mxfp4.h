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
// scales [n_blocks]. value = ldexp(fp4, scale - 127): fp32 holds every finite result
// exactly; |value| >= 2^128 is +-inf; no input makes a NaN (E8M0's 0xff is treated as
// the exponent 128, as transformers does, not as the OCP NaN scale).
void mxfp4_decode_f32(const uint8_t* blocks, const uint8_t* scales, size_t n_blocks, float* out);
// The same, rounded to bf16 bits: bit-identical to transformers' dequantisation
// (convert_moe_packed_tensors) with torch 2.11, whose ldexp takes integer exponents
// exactly. Older torch (ldexp as x * pow(2, e) in fp32) differs only at scale 255,
// where its 2^128 is inf: it gives NaN for zero codes and inf for +-0.5.
void mxfp4_decode_bf16(const uint8_t* blocks, const uint8_t* scales, size_t n_blocks, uint16_t* out);

}  // namespace ossrl

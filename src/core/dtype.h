// Element types as safetensors names them, and the scalar conversions the CPU
// reference needs. bf16/f16 are stored as raw uint16_t bits: the CPU computes in fp32.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

namespace ossrl {

enum class DType { F64, F32, F16, BF16, I64, I32, I16, I8, U64, U32, U16, U8, BOOL };

// Bytes per element.
size_t dtype_size(DType t);
// "F32", "BF16", ... exactly as in a safetensors header.
std::string_view dtype_name(DType t);
// Parses a safetensors dtype name; returns false for an unknown one.
bool dtype_from_name(std::string_view name, DType* out);

inline float bf16_to_f32(uint16_t bits) {
  uint32_t u = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, as torch's .to(torch.bfloat16) does; NaN stays a (quiet) NaN.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x0040u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

float f16_to_f32(uint16_t bits);

}  // namespace ossrl

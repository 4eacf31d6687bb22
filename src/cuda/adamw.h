// The optimizer step on the GPU over one flat fp32 buffer of every trainable value (the
// LoRA adapters, trained sinks): AdamW exactly as train/optimizer.h (torch.optim.AdamW),
// with the global gradient norm for clipping and the non-finite check done on the device.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace ossrl::cuda {

// out[0] (fp32, device) = Σ grad[i]^2 over n values, in a fixed order (deterministic); inf or
// nan when any grad is non-finite. One launch (no host sync).
void sum_of_squares(float* out, const float* grad, size_t n, cudaStream_t stream);

struct AdamWStep {
  float lr = 0.0f;
  float beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f;
  float weight_decay = 0.0f;
  int64_t step = 1;          // 1-based, after this update (bias correction)
  float grad_scale = 1.0f;   // multiplies every grad first: the clip-by-global-norm factor
};

// For every i (decay applies to all values; the GPU path trains no biases):
//   g = grad[i] * grad_scale; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g²;
//   p -= lr·wd·p;  p -= lr · (m / (1-b1^step)) / (sqrt(v / (1-b2^step)) + eps)
// exactly in train/optimizer.cpp's order of operations.
void adamw_step(float* param, float* exp_avg, float* exp_avg_sq, const float* grad, size_t n, const AdamWStep& s,
                cudaStream_t stream);

// dst [n] bf16 = round-to-nearest-even(src [n] fp32): refreshes the bf16 copies the GEMMs read.
void to_bf16(__nv_bfloat16* dst, const float* src, size_t n, cudaStream_t stream);

}  // namespace ossrl::cuda

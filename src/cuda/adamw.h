// The optimizer step on the GPU over one flat fp32 buffer of every trainable value (the
// LoRA adapters, trained sinks): AdamW exactly as train/optimizer.h (torch.optim.AdamW),
// with the global gradient norm for clipping and the non-finite check done on the device.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace ossrl::cuda {

// CTAs of sum_of_squares' first pass, hence the length of its scratch.
constexpr int kSumOfSquaresPartials = 1024;

// out[0] (fp64, device) = Σ grad[i]² over n fp32 values, accumulated in double in a fixed order
// (the same bits on every call, whatever the stream's history): the squares of floats are exact
// in double and the sum is within ~1e-16 relative of train/optimizer.h's grad_norm², so the clip
// factor formed from it matches the CPU's. inf or nan exactly when some grad is non-finite.
// partials [kSumOfSquaresPartials] fp64 is device scratch. Two launches, no host sync.
void sum_of_squares(double* out, double* partials, const float* grad, size_t n, cudaStream_t stream);

// The scalars of one update, formed in double and rounded to fp32 as AdamW::update forms them
// (torch does the same with its Python floats); adamw_scalars makes them.
struct AdamWStep {
  float step_size = 0.0f;     // lr / (1 - beta1^t)
  float bc2_sqrt = 1.0f;      // sqrt(1 - beta2^t)
  float decay = 1.0f;         // 1 - lr * weight_decay
  float one_minus_b1 = 0.1f;  // 1 - beta1
  float b2 = 0.999f;          // beta2
  float one_minus_b2 = 0.001f;
  float eps = 1e-8f;
  float grad_scale = 1.0f;    // multiplies every grad first: the clip-by-global-norm factor
};

// For step t (1-based: the count after this update) at learning rate lr; grad_scale is
// float(min(1, max_norm / (norm + 1e-6))) when clipping, as clip_grad_norm applies it.
AdamWStep adamw_scalars(double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step,
                        float grad_scale);

// For every i, in fp32 and in AdamW::update's order of operations (no fused multiply-adds), so
// the result is the CPU's bit for bit (decay applies to all values: the GPU path trains no
// biases):
//   g = grad[i] * grad_scale;  w = param[i] * decay;  m += one_minus_b1 * (g - m);
//   v = v * b2 + one_minus_b2 * g * g;  param[i] = w + (-step_size) * m / (sqrt(v) / bc2_sqrt + eps)
void adamw_step(float* param, float* exp_avg, float* exp_avg_sq, const float* grad, size_t n, const AdamWStep& s,
                cudaStream_t stream);

// dst [n] bf16 = round-to-nearest-even(src [n] fp32), NaN kept quiet with its sign and top
// payload bits, exactly core/dtype.h's f32_to_bf16: refreshes the bf16 copies the GEMMs read.
void to_bf16(__nv_bfloat16* dst, const float* src, size_t n, cudaStream_t stream);

}  // namespace ossrl::cuda

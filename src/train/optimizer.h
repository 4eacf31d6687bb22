// AdamW as torch.optim.AdamW (decoupled weight decay, bias-corrected moments, fp32 state),
// gradient clipping by global norm as torch.nn.utils.clip_grad_norm_, and the step guard:
// a non-finite loss or gradient skips the update and says so instead of poisoning the
// weights. The optimiser sees parameters as flat (name, data, grad) float spans.
//
// One optimiser step of the trainer, with gradient accumulation over k micro-batches:
//   zero_grads(params);
//   for each micro-batch: forward, loss (already scaled for accumulation, see grpo.h),
//                         backward (+= into grads); step_loss += loss;
//   StepReport r = adamw.step(schedule.lr(step), max_grad_norm, step_loss);
// scale_grads() is there for losses that are not pre-scaled (divide by k once at the end).
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "train/lora.h"

namespace ossrl {

// One trainable tensor as the optimiser sees it; data and grad have the same length.
struct ParamSpan {
  std::string name;
  std::span<float> data;
  std::span<float> grad;
  // Whether weight decay applies. transformers' Trainer exempts biases and norm weights.
  bool decay = true;
};

// Spans over the LoRA's parameters, decay off for biases (the router bias) as transformers'
// get_decay_parameter_names does. The Parameters must outlive the spans and not be resized.
std::vector<ParamSpan> param_spans(std::span<Parameter> params);

// sqrt of the sum of squared grads over all params, accumulated in double (so it is
// finite exactly when every grad is). torch computes per-tensor fp32 norms first; expect
// agreement to fp32 rounding.
double grad_norm(std::span<const ParamSpan> params);
// torch.nn.utils.clip_grad_norm_(max_norm): multiplies every grad by
// min(1, max_norm / (norm + 1e-6)) and returns the norm from before clipping.
// max_norm <= 0 only measures (transformers skips clipping then).
double clip_grad_norm(std::span<const ParamSpan> params, double max_norm);
void scale_grads(std::span<const ParamSpan> params, float factor);
void zero_grads(std::span<const ParamSpan> params);

struct AdamWConfig {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;  // transformers' default (torch's own default is 0.01)
};

enum class StepStatus {
  applied,
  skipped_nonfinite_loss,  // the loss was NaN/Inf: nothing touched
  skipped_nonfinite_grad,  // some gradient was NaN/Inf: nothing touched
};

struct StepReport {
  StepStatus status = StepStatus::applied;
  double grad_norm = 0;  // before clipping (NaN/Inf when skipped for the grads)
  double lr = 0;
  bool applied() const { return status == StepStatus::applied; }
};

class AdamW {
 public:
  // m and v start at zero for every param. Names must be unique (they key saved state).
  AdamW(const AdamWConfig& config, std::vector<ParamSpan> params);

  // The guarded step the trainer calls: checks loss and grads, clips to max_grad_norm
  // (if > 0), then update(lr). Grads are left as they are (clipped) for the caller to zero.
  StepReport step(double lr, double max_grad_norm, double loss);

  // One AdamW update from the current grads, no checks; steps() then counts it. Per value,
  // in fp32 as torch's single-tensor path, t = steps() after increment:
  //   p -= lr*wd*p                         (decoupled decay, only where decay)
  //   m += (1-b1)*(g - m);  v = b2*v + (1-b2)*g*g
  //   p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)
  void update(double lr);

  int64_t steps() const { return steps_; }
  const AdamWConfig& config() const { return config_; }
  std::span<const ParamSpan> params() const { return params_; }

  // Raw state for a trainer that checkpoints it itself: exp_avg (m) and exp_avg_sq (v) of
  // param i, same length as its data. set_steps restores the bias-correction counter.
  std::span<float> exp_avg(size_t i) { return m_[i]; }
  std::span<float> exp_avg_sq(size_t i) { return v_[i]; }
  void set_steps(int64_t steps) { steps_ = steps; }

  // State as one safetensors file: "<name>.exp_avg" and "<name>.exp_avg_sq" (F32, [numel])
  // per param, metadata "step" and the betas/eps/weight_decay. Written atomically.
  void save(const std::string& path) const;
  // Restores state saved for the same parameter list; throws an Error naming the file and
  // tensor when a param is missing, has another size, or the file is not an AdamW state.
  void load(const std::string& path);

 private:
  AdamWConfig config_;
  std::vector<ParamSpan> params_;
  std::vector<std::vector<float>> m_, v_;
  int64_t steps_ = 0;
};

}  // namespace ossrl

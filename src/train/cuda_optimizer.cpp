#include "train/cuda_optimizer.h"

#include <cmath>

#include "core/error.h"
#include "cuda/adamw.h"

namespace ossrl {

DeviceAdamW::DeviceAdamW(DeviceLora& lora, const AdamWConfig& config)
    : lora_(lora), config_(config), norm_(1, "gradient norm"), partials_(cuda::kSumOfSquaresPartials, "gradient norm") {
  OSSRL_CHECK(lora.values() != nullptr, "AdamW on the GPU needs a DeviceLora built with its optimizer on the device");
}

StepReport DeviceAdamW::step(double lr, double max_grad_norm, double loss) {
  StepReport report;
  report.lr = lr;
  cuda::sum_of_squares(norm_.data(), partials_.data(), lora_.grads(), lora_.numel(), nullptr);
  report.grad_norm = std::sqrt(norm_.download(1)[0]);  // synchronises
  if (!std::isfinite(loss)) {
    report.status = StepStatus::skipped_nonfinite_loss;
    return report;
  }
  if (!std::isfinite(report.grad_norm)) {
    report.status = StepStatus::skipped_nonfinite_grad;
    return report;
  }
  // torch: clip_coef = max_norm / (total_norm + 1e-6), clamped to 1 (a factor of 1 is a no-op).
  float grad_scale = 1.0f;
  if (max_grad_norm > 0) {
    const double coef = max_grad_norm / (report.grad_norm + 1e-6);
    if (coef < 1.0) grad_scale = float(coef);
  }
  ++steps_;
  const cuda::AdamWStep s =
      cuda::adamw_scalars(lr, config_.beta1, config_.beta2, config_.eps, config_.weight_decay, steps_, grad_scale);
  cuda::adamw_step(lora_.values(), lora_.exp_avg(), lora_.exp_avg_sq(), lora_.grads(), lora_.numel(), s, nullptr);
  lora_.refresh_bf16(nullptr);
  return report;
}

}  // namespace ossrl

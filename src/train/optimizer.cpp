#include "train/optimizer.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>
#include <set>
#include <string_view>

#include "core/error.h"
#include "io/safetensors.h"

namespace ossrl {

std::vector<ParamSpan> param_spans(std::span<Parameter> params) {
  std::vector<ParamSpan> spans;
  spans.reserve(params.size());
  for (Parameter& p : params) {
    const bool is_bias = std::string_view(p.name).ends_with("bias");
    spans.push_back({p.name, p.data, p.grad, !is_bias});
  }
  return spans;
}

double grad_norm(std::span<const ParamSpan> params) {
  double sum_sq = 0;
  for (const ParamSpan& p : params) {
    for (float g : p.grad) sum_sq += double(g) * double(g);
  }
  return std::sqrt(sum_sq);
}

double clip_grad_norm(std::span<const ParamSpan> params, double max_norm) {
  const double norm = grad_norm(params);
  if (max_norm > 0 && std::isfinite(norm)) {
    // torch: clip_coef = max_norm / (total_norm + 1e-6), clamped to 1.0; a factor of exactly
    // 1 is a no-op, so only smaller ones are applied.
    const double coef = max_norm / (norm + 1e-6);
    if (coef < 1.0) scale_grads(params, float(coef));
  }
  return norm;
}

void scale_grads(std::span<const ParamSpan> params, float factor) {
  for (const ParamSpan& p : params) {
    for (float& g : p.grad) g *= factor;
  }
}

void zero_grads(std::span<const ParamSpan> params) {
  for (const ParamSpan& p : params) std::fill(p.grad.begin(), p.grad.end(), 0.0f);
}

AdamW::AdamW(const AdamWConfig& config, std::vector<ParamSpan> params)
    : config_(config), params_(std::move(params)) {
  OSSRL_CHECK(config.beta1 >= 0 && config.beta1 < 1 && config.beta2 >= 0 && config.beta2 < 1,
              "AdamW betas must be in [0, 1), got ({}, {})", config.beta1, config.beta2);
  OSSRL_CHECK(config.eps >= 0 && config.weight_decay >= 0,
              "AdamW eps and weight_decay must be >= 0, got {} and {}", config.eps,
              config.weight_decay);
  std::set<std::string_view> names;
  for (const ParamSpan& p : params_) {
    OSSRL_CHECK(p.data.size() == p.grad.size(), "parameter {} has {} values but {} grads", p.name,
                p.data.size(), p.grad.size());
    OSSRL_CHECK(names.insert(p.name).second, "parameter name {} given twice", p.name);
    m_.emplace_back(p.data.size(), 0.0f);
    v_.emplace_back(p.data.size(), 0.0f);
  }
}

StepReport AdamW::step(double lr, double max_grad_norm, double loss) {
  StepReport report;
  report.lr = lr;
  if (!std::isfinite(loss)) {
    report.status = StepStatus::skipped_nonfinite_loss;
    report.grad_norm = grad_norm(params_);
    return report;
  }
  // The norm is accumulated in double, so it is non-finite exactly when some grad is: one
  // pass serves both the check and the clip.
  report.grad_norm = clip_grad_norm(params_, max_grad_norm);
  if (!std::isfinite(report.grad_norm)) {
    report.status = StepStatus::skipped_nonfinite_grad;
    return report;
  }
  update(lr);
  return report;
}

void AdamW::update(double lr) {
  ++steps_;
  const double t = double(steps_);
  // Scalars are formed in double and used in fp32, as torch does with Python floats.
  const double bias_correction1 = 1.0 - std::pow(config_.beta1, t);
  const double bias_correction2 = 1.0 - std::pow(config_.beta2, t);
  const float step_size = float(lr / bias_correction1);
  const float bc2_sqrt = float(std::sqrt(bias_correction2));
  const float decay = float(1.0 - lr * config_.weight_decay);
  const float one_minus_b1 = float(1.0 - config_.beta1);
  const float b2 = float(config_.beta2), one_minus_b2 = float(1.0 - config_.beta2);
  const float eps = float(config_.eps);
  for (size_t i = 0; i < params_.size(); ++i) {
    const ParamSpan& p = params_[i];
    float* m = m_[i].data();
    float* v = v_[i].data();
    const bool decays = p.decay && config_.weight_decay != 0.0;
    for (size_t j = 0; j < p.data.size(); ++j) {
      const float g = p.grad[j];
      float w = p.data[j];
      if (decays) w *= decay;
      m[j] += one_minus_b1 * (g - m[j]);  // torch: exp_avg.lerp_(grad, 1 - beta1)
      v[j] = v[j] * b2 + one_minus_b2 * g * g;
      const float denom = std::sqrt(v[j]) / bc2_sqrt + eps;
      p.data[j] = w + (-step_size) * m[j] / denom;
    }
  }
}

void AdamW::save(const std::string& path) const {
  SafetensorsWriter writer;
  for (size_t i = 0; i < params_.size(); ++i) {
    const std::vector<int64_t> shape = {int64_t(m_[i].size())};
    writer.add_f32(params_[i].name + ".exp_avg", shape, m_[i]);
    writer.add_f32(params_[i].name + ".exp_avg_sq", shape, v_[i]);
  }
  writer.set_metadata("format", "ossrl.adamw");
  writer.set_metadata("step", std::to_string(steps_));
  writer.set_metadata("beta1", fmt::format("{}", config_.beta1));
  writer.set_metadata("beta2", fmt::format("{}", config_.beta2));
  writer.set_metadata("eps", fmt::format("{}", config_.eps));
  writer.set_metadata("weight_decay", fmt::format("{}", config_.weight_decay));
  writer.write(path);
}

void AdamW::load(const std::string& path) {
  const auto file = SafetensorsFile::open(path);
  const auto& meta = file->metadata();
  const auto format = meta.find("format");
  OSSRL_CHECK(format != meta.end() && format->second == "ossrl.adamw",
              "{} is not an AdamW state file (no __metadata__ format=ossrl.adamw)", path);
  const auto step = meta.find("step");
  OSSRL_CHECK(step != meta.end(), "{}: AdamW state without a step count", path);
  int64_t steps = -1;
  const std::string& text = step->second;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), steps);
  OSSRL_CHECK(ec == std::errc() && end == text.data() + text.size() && steps >= 0,
              "{}: AdamW step '{}' is not a non-negative integer", path, text);
  // Read everything before touching the state, so a bad file leaves it as it was.
  std::vector<std::vector<float>> m(params_.size()), v(params_.size());
  for (size_t i = 0; i < params_.size(); ++i) {
    const std::vector<int64_t> shape = {int64_t(params_[i].data.size())};
    for (auto [suffix, out] : {std::pair{".exp_avg", &m[i]}, std::pair{".exp_avg_sq", &v[i]}}) {
      const TensorView& t = file->tensor(params_[i].name + suffix);
      t.expect(DType::F32, shape);
      out->resize(params_[i].data.size());
      std::memcpy(out->data(), t.data, t.nbytes);
    }
  }
  OSSRL_CHECK(file->tensors().size() == 2 * params_.size(),
              "{} holds {} tensors, expected 2 per parameter for {} parameters", path,
              file->tensors().size(), params_.size());
  m_ = std::move(m);
  v_ = std::move(v);
  steps_ = steps;
}

}  // namespace ossrl

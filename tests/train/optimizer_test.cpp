// AdamW against torch.optim.AdamW's formula (closed-form first step and a double-precision
// re-derivation over several steps), clip-by-norm as clip_grad_norm_, the non-finite step
// guard, and state save/load.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <limits>
#include <vector>

#include "core/error.h"
#include "io/safetensors.h"
#include "train/optimizer.h"

namespace ossrl {
namespace {

// Owns values and grads of a few named tensors.
struct Params {
  std::vector<std::vector<float>> data, grad;
  std::vector<std::string> names;
  std::vector<bool> decay;

  void add(std::string name, std::vector<float> values, bool decays = true) {
    names.push_back(std::move(name));
    grad.emplace_back(values.size(), 0.0f);
    data.push_back(std::move(values));
    decay.push_back(decays);
  }
  std::vector<ParamSpan> spans() {
    std::vector<ParamSpan> s;
    for (size_t i = 0; i < data.size(); ++i) s.push_back({names[i], data[i], grad[i], decay[i]});
    return s;
  }
};

std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() / ("ossrl_optimizer_test_" + name)).string();
}

TEST(AdamW, FirstStepClosedForm) {
  // p = {1, -2}, g = {0.5, -1}, lr 0.1, weight_decay 0.01, betas (0.9, 0.999), eps 1e-8.
  // decay:  p *= 1 - 0.1*0.01 = 0.999            -> {0.999, -1.998}
  // m = 0.1 g = {0.05, -0.1};  v = 0.001 g^2 = {2.5e-4, 1e-3}
  // step_size = lr / (1 - 0.9) = 1;  denom = sqrt(v) / sqrt(1 - 0.999) + eps = {0.5, 1} + 1e-8
  // p -= m / denom = {0.1, -0.1} (to 2e-8)         -> {0.899, -1.898}
  // (Adam's first step moves every value by lr * sign(g), whatever |g| is.)
  Params p;
  p.add("w", {1.0f, -2.0f});
  p.grad[0] = {0.5f, -1.0f};
  AdamWConfig config;
  config.weight_decay = 0.01;
  AdamW adam(config, p.spans());
  adam.update(0.1);
  EXPECT_NEAR(p.data[0][0], 0.899, 1e-6);  // fp32 values near 1: resolution 1.2e-7
  EXPECT_NEAR(p.data[0][1], -1.898, 1e-6);
  EXPECT_NEAR(adam.exp_avg(0)[0], 0.05f, 1e-9);
  EXPECT_NEAR(adam.exp_avg_sq(0)[1], 1e-3f, 1e-10);
  EXPECT_EQ(adam.steps(), 1);
}

// torch.optim.AdamW (decoupled decay, bias correction) in double: the oracle.
struct ReferenceAdamW {
  double lr, b1, b2, eps, wd;
  std::vector<double> p, m, v;
  int t = 0;
  void step(const std::vector<double>& g, bool decay) {
    ++t;
    for (size_t j = 0; j < p.size(); ++j) {
      if (decay) p[j] *= 1 - lr * wd;
      m[j] = b1 * m[j] + (1 - b1) * g[j];
      v[j] = b2 * v[j] + (1 - b2) * g[j] * g[j];
      const double mhat = m[j] / (1 - std::pow(b1, t));
      const double vhat = v[j] / (1 - std::pow(b2, t));
      p[j] -= lr * mhat / (std::sqrt(vhat) + eps);
    }
  }
};

TEST(AdamW, MatchesTorchFormulaOverSeveralSteps) {
  AdamWConfig config;
  config.beta1 = 0.8;
  config.beta2 = 0.95;
  config.eps = 1e-6;
  config.weight_decay = 0.1;
  const double lr = 0.05;
  Params p;
  p.add("a", {0.3f, -0.7f, 1.5f});
  p.add("bias", {0.2f, -0.1f}, /*decays=*/false);
  ReferenceAdamW ra{lr, 0.8, 0.95, 1e-6, 0.1, {0.3, -0.7, 1.5}, {0, 0, 0}, {0, 0, 0}};
  ReferenceAdamW rb{lr, 0.8, 0.95, 1e-6, 0.1, {0.2, -0.1}, {0, 0}, {0, 0}};
  AdamW adam(config, p.spans());
  for (int s = 0; s < 6; ++s) {
    // Grads that change sign and scale from step to step (values exact in fp32).
    const std::vector<double> ga = {0.5 - 0.25 * s, -1.0 + 0.5 * (s % 2), 0.125 * (s + 1)};
    const std::vector<double> gb = {-0.75 * (s % 3), 2.0 - s};
    for (size_t j = 0; j < 3; ++j) p.grad[0][j] = float(ga[j]);
    for (size_t j = 0; j < 2; ++j) p.grad[1][j] = float(gb[j]);
    adam.update(lr);
    ra.step(ga, true);
    rb.step(gb, false);
    // fp32 state and arithmetic against double: a few ulps of values of order 1 per step.
    for (size_t j = 0; j < 3; ++j) EXPECT_NEAR(p.data[0][j], ra.p[j], 2e-6) << "step " << s;
    for (size_t j = 0; j < 2; ++j) EXPECT_NEAR(p.data[1][j], rb.p[j], 2e-6) << "step " << s;
  }
  // The undecayed bias differs from what decay would have given: the flag matters.
  ReferenceAdamW decayed{lr, 0.8, 0.95, 1e-6, 0.1, {0.2, -0.1}, {0, 0}, {0, 0}};
  for (int s = 0; s < 6; ++s) decayed.step({-0.75 * (s % 3), 2.0 - s}, true);
  EXPECT_GT(std::fabs(decayed.p[0] - p.data[1][0]), 1e-4);
}

TEST(AdamW, ParamSpansExemptBiasesFromDecay) {
  std::vector<Parameter> params(2);
  params[0].name = "model.layers.0.mlp.router.weight";
  params[1].name = "model.layers.0.mlp.router.bias";
  for (Parameter& q : params) q.data.assign(3, 1.0f), q.grad.assign(3, 0.0f);
  const std::vector<ParamSpan> spans = param_spans(params);
  ASSERT_EQ(spans.size(), 2u);
  EXPECT_TRUE(spans[0].decay);
  EXPECT_FALSE(spans[1].decay);
  EXPECT_EQ(spans[1].data.data(), params[1].data.data());  // views, not copies
}

TEST(ClipGradNorm, ScalesToMaxNormAndReturnsThePreClipNorm) {
  Params p;
  p.add("a", {0, 0});
  p.add("b", {0});
  p.grad[0] = {3.0f, 0.0f};
  p.grad[1] = {4.0f};
  const auto spans = p.spans();
  EXPECT_DOUBLE_EQ(grad_norm(spans), 5.0);
  EXPECT_DOUBLE_EQ(clip_grad_norm(spans, 10.0), 5.0);  // below max: untouched
  EXPECT_EQ(p.grad[0][0], 3.0f);
  EXPECT_DOUBLE_EQ(clip_grad_norm(spans, 0.0), 5.0);  // disabled: only measures
  EXPECT_EQ(p.grad[1][0], 4.0f);
  // torch: coef = 1 / (5 + 1e-6).
  EXPECT_DOUBLE_EQ(clip_grad_norm(spans, 1.0), 5.0);
  EXPECT_NEAR(p.grad[0][0], 3.0 / (5.0 + 1e-6), 1e-7);
  EXPECT_NEAR(p.grad[1][0], 4.0 / (5.0 + 1e-6), 1e-7);
  EXPECT_NEAR(grad_norm(spans), 1.0, 1e-6);
}

TEST(ClipGradNorm, ScaleAndZeroHelpers) {
  Params p;
  p.add("a", {0, 0});
  p.grad[0] = {2.0f, -6.0f};
  scale_grads(p.spans(), 0.5f);
  EXPECT_EQ(p.grad[0], (std::vector<float>{1.0f, -3.0f}));
  zero_grads(p.spans());
  EXPECT_EQ(p.grad[0], (std::vector<float>{0.0f, 0.0f}));
}

TEST(AdamWStep, ClipsThenUpdates) {
  // Through step(): grads {3, 4} clipped to norm 1 -> {0.6, 0.8}; the first update then
  // moves each value by lr * sign, so only the reported norm shows the clip, and m does.
  Params p;
  p.add("w", {1.0f, 1.0f});
  p.grad[0] = {3.0f, 4.0f};
  AdamW adam({}, p.spans());
  const StepReport r = adam.step(0.01, 1.0, 0.5);
  EXPECT_TRUE(r.applied());
  EXPECT_DOUBLE_EQ(r.grad_norm, 5.0);
  EXPECT_DOUBLE_EQ(r.lr, 0.01);
  EXPECT_NEAR(adam.exp_avg(0)[0], 0.1 * 0.6, 1e-7);
  EXPECT_NEAR(p.data[0][0], 0.99, 1e-6);
}

TEST(AdamWStep, NonFiniteLossOrGradientSkipsTheStep) {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  struct Case {
    float bad_grad;
    double loss;
    StepStatus want;
  };
  for (const Case& c : {Case{nan, 1.0, StepStatus::skipped_nonfinite_grad},
                        Case{inf, 1.0, StepStatus::skipped_nonfinite_grad},
                        Case{0.5f, std::nan(""), StepStatus::skipped_nonfinite_loss},
                        Case{0.5f, -HUGE_VAL, StepStatus::skipped_nonfinite_loss}}) {
    Params p;
    p.add("a", {1.0f, 2.0f});
    p.add("b", {3.0f});
    AdamW adam({}, p.spans());
    p.grad[0] = {0.1f, 0.2f};
    p.grad[1] = {c.bad_grad};
    const StepReport r = adam.step(0.1, 1.0, c.loss);
    EXPECT_EQ(r.status, c.want);
    EXPECT_FALSE(r.applied());
    // Nothing applied: weights, moments and the step counter as before.
    EXPECT_EQ(p.data[0], (std::vector<float>{1.0f, 2.0f}));
    EXPECT_EQ(p.data[1], (std::vector<float>{3.0f}));
    EXPECT_EQ(adam.exp_avg(0)[0], 0.0f);
    EXPECT_EQ(adam.exp_avg_sq(1)[0], 0.0f);
    EXPECT_EQ(adam.steps(), 0);
    // With finite grads again the next step goes through.
    p.grad[1] = {0.3f};
    EXPECT_TRUE(adam.step(0.1, 1.0, 1.0).applied());
    EXPECT_EQ(adam.steps(), 1);
  }
}

TEST(AdamWState, SaveLoadResumesExactly) {
  // Writes grads in place: the optimiser holds spans, so the vectors must keep their buffers.
  auto set_grads = [](std::vector<float>& grad, int s) {
    grad[0] = 0.1f * float(s + 1);
    grad[1] = -0.3f;
  };
  Params a;
  a.add("layer.lora_A.weight", {0.5f, -0.5f});
  AdamWConfig config;
  config.weight_decay = 0.01;
  AdamW adam_a(config, a.spans());
  for (int s = 0; s < 3; ++s) {
    set_grads(a.grad[0], s);
    adam_a.update(0.01);
  }
  const std::string path = temp_path("state.safetensors");
  adam_a.save(path);

  Params b = a;  // same weights, fresh optimiser
  AdamW adam_b(config, b.spans());
  adam_b.load(path);
  EXPECT_EQ(adam_b.steps(), 3);
  set_grads(a.grad[0], 3);
  set_grads(b.grad[0], 3);
  adam_a.update(0.01);
  adam_b.update(0.01);
  EXPECT_EQ(a.data[0], b.data[0]);  // bit-identical continuation

  // A differently shaped parameter list is refused with the tensor named.
  Params c;
  c.add("layer.lora_A.weight", {0.5f, -0.5f, 1.0f});
  AdamW adam_c(config, c.spans());
  EXPECT_THROW(adam_c.load(path), Error);
  EXPECT_EQ(adam_c.steps(), 0);  // and left untouched
  Params d;
  d.add("other", {0.5f, -0.5f});
  EXPECT_THROW(AdamW(config, d.spans()).load(path), Error);

  // A safetensors file that is not an AdamW state.
  SafetensorsWriter w;
  const std::vector<float> zeros = {0, 0};
  w.add_f32("layer.lora_A.weight.exp_avg", {2}, zeros);
  w.add_f32("layer.lora_A.weight.exp_avg_sq", {2}, zeros);
  const std::string other = temp_path("not_adam.safetensors");
  w.write(other);
  EXPECT_THROW(adam_b.load(other), Error);
  std::filesystem::remove(path);
  std::filesystem::remove(other);
}

TEST(AdamW, RejectsBadConstruction) {
  Params p;
  p.add("a", {1.0f});
  p.add("a", {2.0f});
  EXPECT_THROW(AdamW({}, p.spans()), Error);  // duplicate names
  Params q;
  q.add("a", {1.0f});
  AdamWConfig bad;
  bad.beta2 = 1.0;
  EXPECT_THROW(AdamW(bad, q.spans()), Error);
}

}  // namespace
}  // namespace ossrl

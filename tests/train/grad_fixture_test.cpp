// LoRA gradients of the CPU policy against PyTorch autograd through transformers + PEFT
// (tests/fixtures/grad-*, written by scripts/fixtures/make_grad_fixtures.py): the same
// adapter (PEFT-written, non-zero lora_B, trained sinks and router), the same batch, SFT and
// GRPO losses (TRL's _compute_loss with fixed advantages, old log-probs and a k3 KL term), and
// one full AdamW step.
//
// Tolerances. Both sides compute in fp32 on the same bf16/MXFP4 weights; only the order of
// fp32 sums differs, which moves log-probs by ~1e-5 (tests/fixtures/README.md), so
//   - log-probs and losses: 1e-4 absolute, as for the forward fixtures;
//   - every gradient tensor: ||g - g_ref|| / ||g_ref|| <= 1e-4 (fp32 noise gives ~1e-6; a
//     wrong term in a backward, a misplaced expert column, a lost clip branch or KL term
//     moves a tensor by 1e-2 or more);
//   - the parameters after one AdamW step: ||p - p_ref|| / ||p_ref|| <= 1e-4 per tensor, and
//     the update itself, ||dp - dp_ref|| / ||dp_ref|| <= 2e-3. The first Adam update is
//     lr * g / (|g| + eps) - lr * wd * p, about lr * sign(g) per value: it cannot see the
//     gradient's size (checked through the norm before clipping, relative 1e-4), but it shows
//     a wrong sign of any one value (>= 2 / sqrt(8192) = 2e-2 in the update), a missing weight
//     decay (wd * rms(p) >= 5e-3) or bias correction. A value whose clipped gradient is near
//     eps (1e-6 in the fixture) turns fp32 noise into up to ~0.02 lr: measured 6.3e-4 in one
//     512-value tensor, < 2e-4 in the others.
// Routing cannot flip: the fixture's batch keeps every top-4 router gap >= 1.6e-3 with the
// adapter on and off (grads.json), far above fp32 noise.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>

#include "io/json_file.h"
#include "io/safetensors.h"
#include "model/cpu_model.h"
#include "train/batch_grad.h"
#include "train/optimizer.h"
#include "train/peft_adapter.h"
#include "train/policy.h"
#include "grad_fixture.h"

namespace ossrl {
namespace {

namespace fs = std::filesystem;
using test::loss_spec;
using test::values;

fs::path fixture(const std::string& name) { return test::grad_fixture(name); }

constexpr double kLogProbTol = 1e-4;
constexpr double kGradRelTol = 1e-4;
constexpr double kStepRelTol = 1e-4;
constexpr double kUpdateRelTol = 2e-3;


// ||a - b|| / ||b||, in double.
double rel_error(std::span<const float> a, std::span<const float> b) {
  double diff = 0, ref = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    diff += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    ref += double(b[i]) * b[i];
  }
  return std::sqrt(diff / ref);
}

double max_abs_diff(std::span<const float> a, std::span<const float> b) {
  double worst = 0;
  for (size_t i = 0; i < b.size(); ++i) worst = std::max(worst, std::abs(double(a[i]) - b[i]));
  return worst;
}

// The model, the PEFT-written adapter and the batch of one fixture folder.
struct FixtureRun {
  explicit FixtureRun(const std::string& name)
      : info(read_json_file((fixture(name) / "grads.json").string())),
        model((fs::path(OSSRL_FIXTURE_DIR) / name).string()),
        lora(load_peft_adapter(model.config(), model.weights(), (fixture(name) / "adapter").string())),
        batch(read_completion_batch((fixture(name) / "batch.json").string(), model.config().vocab_size)),
        policy(model, &lora) {}
  nlohmann::json info;
  CpuModel model;
  Lora lora;
  CompletionBatch batch;
  Policy policy;
};

class GradFixture : public testing::TestWithParam<std::string> {};

// Each run of the fixture: loss, log-probs and every gradient, read back from the file
// `ossrl grad` writes (so its names and layout are checked too).
TEST_P(GradFixture, LossLogProbsAndGradientsMatchPyTorch) {
  FixtureRun s(GetParam());
  ASSERT_FALSE(s.info.at("runs").empty());
  for (const auto& [run, info] : s.info.at("runs").items()) {
    SCOPED_TRACE(run);
    const BatchGrad result = batch_grad(s.policy, s.batch, loss_spec(info.at("settings")));
    const fs::path written = fs::path(OSSRL_GENERATED_DIR) / "grad_fixture_test" / (GetParam() + "_" + run + ".safetensors");
    fs::create_directories(written.parent_path());
    write_batch_grad(written.string(), s.lora, result);

    auto ref = SafetensorsFile::open((fixture(GetParam()) / ("grads_" + run + ".safetensors")).string());
    auto ours = SafetensorsFile::open(written.string());
    ASSERT_EQ(ours->tensors().size(), ref->tensors().size());
    double worst = 0;
    std::string worst_name;
    int grads = 0;
    for (const auto& [name, t] : ref->tensors()) {
      ASSERT_TRUE(ours->contains(name)) << name;
      const TensorView& o = ours->tensor(name);
      ASSERT_EQ(o.shape, t.shape) << name;
      const std::vector<float> a = values(o), b = values(t);
      if (name == "loss") {
        EXPECT_NEAR(a[0], b[0], kLogProbTol);
        EXPECT_NEAR(result.loss, b[0], kLogProbTol);
      } else if (name == "log_probs" || name == "ref_log_probs") {
        EXPECT_LE(max_abs_diff(a, b), kLogProbTol) << name;
      } else {
        const double err = rel_error(a, b);
        EXPECT_LE(err, kGradRelTol) << name;
        if (err > worst) worst = err, worst_name = name;
        ++grads;
      }
    }
    EXPECT_EQ(grads, int(peft_tensors(s.lora, LoraField::Grad).size()));
    std::printf("[ grad-%s %s ] loss %.7f (PyTorch %.7f); %d gradient tensors, worst relative error %.2e (%s)\n",
                GetParam().c_str(), run.c_str(), result.loss, info.at("loss").get<double>(), grads, worst,
                worst_name.c_str());
  }
}

// One optimiser step as transformers' Trainer takes it: loss, backward, clip_grad_norm_,
// torch.optim.AdamW (weight decay on everything but biases).
TEST(GradFixtureStep, OneAdamWStepMatchesPyTorch) {
  FixtureRun s("tiny-bf16");
  const nlohmann::json& step = s.info.at("step");
  const BatchGrad result = batch_grad(s.policy, s.batch, loss_spec(step.at("settings")));
  EXPECT_NEAR(result.loss, step.at("loss").get<double>(), kLogProbTol);

  AdamWConfig config;
  config.beta1 = step.at("adamw").at("betas")[0].get<double>();
  config.beta2 = step.at("adamw").at("betas")[1].get<double>();
  config.eps = step.at("adamw").at("eps").get<double>();
  config.weight_decay = step.at("adamw").at("weight_decay").get<double>();
  AdamW adamw(config, param_spans(s.lora.parameters()));
  const std::vector<PeftTensor> before = peft_tensors(s.lora, LoraField::Data);
  const StepReport report = adamw.step(step.at("adamw").at("lr").get<double>(), step.at("max_grad_norm").get<double>(),
                                       result.loss);
  ASSERT_TRUE(report.applied());
  const double ref_norm = step.at("grad_norm_before_clipping").get<double>();
  EXPECT_LE(std::abs(report.grad_norm - ref_norm) / ref_norm, kGradRelTol);

  const Lora ref = load_peft_adapter(s.model.config(), s.model.weights(), (fixture("tiny-bf16") / "step").string());
  const std::vector<PeftTensor> ours = peft_tensors(s.lora, LoraField::Data), theirs = peft_tensors(ref, LoraField::Data);
  ASSERT_EQ(ours.size(), theirs.size());
  double worst_param = 0, worst_update = 0;
  for (size_t i = 0; i < ours.size(); ++i) {
    ASSERT_EQ(ours[i].name, theirs[i].name);
    const double err = rel_error(ours[i].values, theirs[i].values);
    EXPECT_LE(err, kStepRelTol) << ours[i].name;
    worst_param = std::max(worst_param, err);
    std::vector<float> update(before[i].values.size()), ref_update(before[i].values.size());
    for (size_t k = 0; k < update.size(); ++k) {
      update[k] = ours[i].values[k] - before[i].values[k];
      ref_update[k] = theirs[i].values[k] - before[i].values[k];
    }
    const double update_err = rel_error(update, ref_update);
    EXPECT_LE(update_err, kUpdateRelTol) << ours[i].name;
    worst_update = std::max(worst_update, update_err);
  }
  std::printf("[ grad-tiny-bf16 step ] loss %.7f, grad norm %.6f (PyTorch %.6f); %zu tensors: worst relative error "
              "%.2e after the step, %.2e in the update\n", result.loss, report.grad_norm, ref_norm, ours.size(),
              worst_param, worst_update);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, GradFixture, testing::Values("tiny-bf16", "tiny-mxfp4"),
                         [](const testing::TestParamInfo<std::string>& p) {
                           std::string name = p.param;
                           std::replace(name.begin(), name.end(), '-', '_');
                           return name;
                         });

}  // namespace
}  // namespace ossrl

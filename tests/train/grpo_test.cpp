// GRPO advantages, GRPO loss (every loss_type, clip branches, k3 KL, masks) and SFT loss:
// hand-computed values from TRL's formulas, and the analytic dLoss/dlogp against central
// finite differences in double precision.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "core/error.h"
#include "train/grpo.h"

namespace ossrl {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// ---- advantages ------------------------------------------------------------------------

Advantages advantages_of(std::vector<std::vector<double>> rewards, int group, ScaleRewards scale,
                         std::vector<double> weights = {}) {
  AdvantageConfig config;
  config.num_generations = group;
  config.scale_rewards = scale;
  config.reward_weights = std::move(weights);
  return compute_advantages(config, rewards);
}

// Advantages are float (as TRL's float32 tensors); compare at float resolution.
void expect_advantages(const Advantages& got, const std::vector<double>& want) {
  ASSERT_EQ(got.advantages.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(got.advantages[i], want[i], 1e-6) << i;
}

// Group 0 = {1, 2, 3}: mean 2, Bessel std 1. Group 1 = {5, 5, 5}: std 0.
// Batch {1,2,3,5,5,5}: mean 3.5, squared deviations 6.25+2.25+0.25+3*2.25 = 15.5,
// std = sqrt(15.5 / 5) = 1.7606816861659009.
const std::vector<std::vector<double>> kTwoGroups = {{1, 2, 3, 5, 5, 5}};
constexpr double kBatchStd = 1.7606816861659009;

TEST(Advantages, GroupScaleDividesByGroupStdPlusEpsilon) {
  const Advantages a = advantages_of(kTwoGroups, 3, ScaleRewards::group);
  const double s = 1.0 + 1e-4;
  expect_advantages(a, {-1 / s, 0, 1 / s, 0, 0, 0});
  EXPECT_DOUBLE_EQ(a.metrics.frac_reward_zero_std, 0.5);  // group 1, all three completions
  EXPECT_DOUBLE_EQ(a.metrics.reward, 3.5);
  EXPECT_NEAR(a.metrics.reward_std, kBatchStd, 1e-12);
  EXPECT_NEAR(a.metrics.func_std[0], kBatchStd, 1e-12);
  EXPECT_DOUBLE_EQ(a.metrics.func_mean[0], 3.5);
}

TEST(Advantages, BatchScaleCentresPerGroupButDividesByBatchStd) {
  const Advantages a = advantages_of(kTwoGroups, 3, ScaleRewards::batch);
  const double s = kBatchStd + 1e-4;
  expect_advantages(a, {-1 / s, 0, 1 / s, 0, 0, 0});
  EXPECT_DOUBLE_EQ(a.metrics.frac_reward_zero_std, 0.0);  // the batch std is not 0
}

TEST(Advantages, NoneOnlyCentresAndStillReportsZeroStdGroups) {
  const Advantages a = advantages_of(kTwoGroups, 3, ScaleRewards::none);
  expect_advantages(a, {-1, 0, 1, 0, 0, 0});
  EXPECT_DOUBLE_EQ(a.metrics.frac_reward_zero_std, 0.5);
}

TEST(Advantages, WeightedSumSkipsNanRewardsPerFunction) {
  // f0 = {1, NaN, 0, NaN}, f1 = {0.5, 1, NaN, NaN}, weights {2, 1}, G = 2:
  // rewards = {2*1+0.5, 1, 2*0, NaN} = {2.5, 1, 0, NaN}.
  // Group 0 {2.5, 1}: mean 1.75, std sqrt(2 * 0.75^2 / 1) = 1.0606601717798212.
  // Group 1 {0, NaN}: one scored value, so nanstd is NaN and both advantages become 0.
  const Advantages a = advantages_of({{1, kNaN, 0, kNaN}, {0.5, 1, kNaN, kNaN}}, 2,
                                     ScaleRewards::group, {2, 1});
  ASSERT_EQ(a.rewards.size(), 4u);
  EXPECT_DOUBLE_EQ(a.rewards[0], 2.5);
  EXPECT_DOUBLE_EQ(a.rewards[1], 1.0);
  EXPECT_DOUBLE_EQ(a.rewards[2], 0.0);
  EXPECT_TRUE(std::isnan(a.rewards[3]));  // unscorable
  const double s = 1.0606601717798212 + 1e-4;
  expect_advantages(a, {0.75 / s, -0.75 / s, 0, 0});
  EXPECT_DOUBLE_EQ(a.metrics.frac_reward_zero_std, 0.0);  // NaN std is not "zero std"
  // Per-function metrics over the values each function gave.
  EXPECT_DOUBLE_EQ(a.metrics.func_mean[0], 0.5);               // {1, 0}
  EXPECT_NEAR(a.metrics.func_std[0], std::sqrt(0.5), 1e-12);   // 2 * 0.25 / 1
  EXPECT_DOUBLE_EQ(a.metrics.func_mean[1], 0.75);              // {0.5, 1}
  EXPECT_NEAR(a.metrics.func_std[1], std::sqrt(0.125), 1e-12);
  // reward over {2.5, 1, 0}: mean 7/6, squared deviations 16/9 + 1/36 + 49/36 = 19/6,
  // std = sqrt(19/12).
  EXPECT_NEAR(a.metrics.reward, 7.0 / 6.0, 1e-12);
  EXPECT_NEAR(a.metrics.reward_std, std::sqrt(19.0 / 12.0), 1e-12);
}

TEST(Advantages, UnscorableCompletionLeavesTheGroupBaselineAlone) {
  // {NaN, 1, 3}: baseline and std from {1, 3} only (mean 2, std sqrt(2)); the NaN one gets 0.
  const Advantages a = advantages_of({{kNaN, 1, 3}}, 3, ScaleRewards::group);
  const double s = std::sqrt(2.0) + 1e-4;
  expect_advantages(a, {0, -1 / s, 1 / s});
}

TEST(Advantages, SingleGenerationHasZeroStdAndZeroAdvantage) {
  const Advantages a = advantages_of({{0.3, 0.9}}, 1, ScaleRewards::group);
  expect_advantages(a, {0, 0});
  EXPECT_DOUBLE_EQ(a.metrics.frac_reward_zero_std, 1.0);
}

TEST(Advantages, RejectsBadShapes) {
  EXPECT_THROW(advantages_of({{1, 2, 3}}, 2, ScaleRewards::group), Error);     // not whole groups
  EXPECT_THROW(advantages_of({{1, 2}, {1}}, 2, ScaleRewards::group), Error);   // ragged functions
  EXPECT_THROW(advantages_of({{1, 2}}, 2, ScaleRewards::group, {1, 1}), Error);  // weights
  EXPECT_THROW(parse_scale_rewards("std"), Error);
  EXPECT_EQ(parse_scale_rewards("batch"), ScaleRewards::batch);
}

// ---- GRPO loss -------------------------------------------------------------------------

// Owns the arrays a GrpoBatch<double> views.
struct Case {
  std::vector<int32_t> lengths;
  std::vector<double> logp, old_logp, ref_logp, entropy;
  std::vector<float> advantages;
  std::vector<uint8_t> mask, truncated;
  int64_t num_items_in_batch = 0;

  GrpoBatch<double> batch() const {
    GrpoBatch<double> b;
    b.lengths = lengths;
    b.logp = logp;
    b.old_logp = old_logp;
    b.ref_logp = ref_logp;
    b.advantages = advantages;
    b.mask = mask;
    b.truncated = truncated;
    b.entropy = entropy;
    b.num_items_in_batch = num_items_in_batch;
    return b;
  }
  GrpoLoss run(const GrpoLossConfig& config, std::vector<double>* dlogp) const {
    dlogp->assign(logp.size(), 99.0);  // every entry must be written
    return grpo_loss<double>(config, batch(), *dlogp);
  }
};

GrpoLossConfig config_of(LossType type) {
  GrpoLossConfig c;
  c.loss_type = type;
  return c;
}

void expect_grads(const std::vector<double>& got, const std::vector<double>& want) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(got[i], want[i], 1e-12) << "token " << i;
}

// On-policy (num_iterations == 1): ratio 1, per-token loss -A, gradient -A per token
// (half through each branch of the tied min). Lengths {2, 3}, A = {1, -0.5}:
// token losses {-1, -1, 0.5, 0.5, 0.5}, sum -0.5.
Case on_policy_case() {
  Case c;
  c.lengths = {2, 3};
  c.logp = {-0.5, -1.0, -2.0, -0.1, -3.0};
  c.advantages = {1.0f, -0.5f};
  return c;
}

TEST(GrpoLoss, GrpoIsMeanOfPerSequenceMeans) {
  std::vector<double> d;
  // (-1 + 0.5) / 2 sequences; dL/dlogp = -A / (B * T_b).
  EXPECT_NEAR(on_policy_case().run(config_of(LossType::grpo), &d).loss, -0.25, 1e-12);
  expect_grads(d, {-0.25, -0.25, 0.5 / 6, 0.5 / 6, 0.5 / 6});
}

TEST(GrpoLoss, BnpoIsTokenMeanOfTheMicroBatch) {
  std::vector<double> d;
  EXPECT_NEAR(on_policy_case().run(config_of(LossType::bnpo), &d).loss, -0.5 / 5, 1e-12);
  expect_grads(d, {-0.2, -0.2, 0.1, 0.1, 0.1});
}

TEST(GrpoLoss, DrGrpoDividesByBatchTimesMaxCompletionLength) {
  GrpoLossConfig config = config_of(LossType::dr_grpo);
  config.max_completion_length = 4;
  std::vector<double> d;
  EXPECT_NEAR(on_policy_case().run(config, &d).loss, -0.5 / 8, 1e-12);
  expect_grads(d, {-1.0 / 8, -1.0 / 8, 0.5 / 8, 0.5 / 8, 0.5 / 8});
}

TEST(GrpoLoss, DapoDividesByTheStepsTokenCount) {
  Case c = on_policy_case();
  std::vector<double> d;
  EXPECT_NEAR(c.run(config_of(LossType::dapo), &d).loss, -0.5 / 5, 1e-12);  // local count
  c.num_items_in_batch = 10;  // two micro-batches of 5 tokens in the step
  EXPECT_NEAR(c.run(config_of(LossType::dapo), &d).loss, -0.05, 1e-12);
  expect_grads(d, {-0.1, -0.1, 0.05, 0.05, 0.05});
}

TEST(GrpoLoss, GradientAccumulationScalesAllButDapo) {
  const Case c = on_policy_case();
  std::vector<double> d;
  for (LossType t : {LossType::grpo, LossType::bnpo, LossType::dr_grpo, LossType::dapo}) {
    GrpoLossConfig one = config_of(t), two = config_of(t);
    two.gradient_accumulation_steps = 2;
    const double l1 = c.run(one, &d).loss, l2 = c.run(two, &d).loss;
    EXPECT_NEAR(l2, t == LossType::dapo ? l1 : l1 / 2, 1e-12) << loss_type_name(t);
  }
}

TEST(GrpoLoss, DetachedOldLogpEqualsPassingLogpAsOld) {
  Case a = on_policy_case(), b = on_policy_case();
  b.old_logp = b.logp;
  std::vector<double> da, db;
  EXPECT_DOUBLE_EQ(a.run(config_of(LossType::grpo), &da).loss,
                   b.run(config_of(LossType::grpo), &db).loss);
  expect_grads(da, db);
}

// One token, bnpo over one token: the loss is the token's loss, dlogp its gradient.
struct TokenResult {
  double loss, grad;
  GrpoLossMetrics metrics;
};
TokenResult one_token(double ratio, float advantage, GrpoLossConfig config = {}) {
  Case c;
  c.lengths = {1};
  c.logp = {-1.0};
  c.old_logp = {-1.0 - std::log(ratio)};
  c.advantages = {advantage};
  config.loss_type = LossType::bnpo;
  std::vector<double> d;
  const GrpoLoss l = c.run(config, &d);
  return {l.loss, d[0], l.metrics};
}

TEST(GrpoLoss, ClipBranches) {
  GrpoLossConfig config;
  config.epsilon = 0.2;
  config.epsilon_high = 0.28;  // region [0.8, 1.28]
  struct Want {
    double ratio, adv, loss, grad;
    bool low, high;
  };
  const Want cases[] = {
      // A > 0 above the region: min picks the clipped 1.28*A; no gradient.
      {1.5, 2.0, -1.28 * 2.0, 0.0, false, true},
      // A > 0 below the region: min picks r*A (smaller); gradient -r*A.
      {0.5, 2.0, -0.5 * 2.0, -0.5 * 2.0, false, false},
      // A < 0 below the region: min picks the clipped 0.8*A; no gradient.
      {0.5, -2.0, 0.8 * 2.0, 0.0, true, false},
      // A < 0 above the region: min picks r*A (more negative); gradient -r*A.
      {1.5, -2.0, 1.5 * 2.0, 1.5 * 2.0, false, false},
      // Inside the region both branches agree: gradient -r*A (half from each).
      {1.1, 2.0, -1.1 * 2.0, -1.1 * 2.0, false, false},
      {0.9, -2.0, 0.9 * 2.0, 0.9 * 2.0, false, false},
  };
  for (const Want& w : cases) {
    const TokenResult r = one_token(w.ratio, float(w.adv), config);
    EXPECT_NEAR(r.loss, w.loss, 1e-12) << "ratio " << w.ratio << " A " << w.adv;
    EXPECT_NEAR(r.grad, w.grad, 1e-12) << "ratio " << w.ratio << " A " << w.adv;
    EXPECT_EQ(r.metrics.clip_ratio_low_mean, w.low ? 1.0 : 0.0);
    EXPECT_EQ(r.metrics.clip_ratio_high_mean, w.high ? 1.0 : 0.0);
    EXPECT_EQ(r.metrics.clip_ratio_region_mean, (w.low || w.high) ? 1.0 : 0.0);
  }
  // epsilon_high defaults to epsilon: ratio 1.25 is clipped at 1.2 then.
  EXPECT_NEAR(one_token(1.25, 1.0).loss, -1.2, 1e-12);
  EXPECT_NEAR(one_token(1.25, 1.0).grad, 0.0, 1e-12);
}

TEST(GrpoLoss, DeltaCapsTheUnclippedBranch) {
  // INTELLECT-2: coef_1 = min(r, delta). A < 0, r = 5 > delta = 3: min(3A, 1.2A) = 3A, and
  // the capped branch has no gradient.
  GrpoLossConfig config;
  config.delta = 3.0;
  const TokenResult r = one_token(5.0, -1.0f, config);
  EXPECT_NEAR(r.loss, 3.0, 1e-12);
  EXPECT_NEAR(r.grad, 0.0, 1e-12);
  // Below delta nothing changes: -r*A, gradient -r*A.
  EXPECT_NEAR(one_token(2.0, -1.0f, config).grad, 2.0, 1e-12);
}

TEST(GrpoLoss, KlK3ValueAndGradient) {
  // logp = -1, ref = -1.5, d = ref - logp = -0.5:
  // k3 = e^-0.5 + 0.5 - 1 = 0.10653065971263342, dk3/dlogp = 1 - e^-0.5 = 0.3934693402873666.
  Case c;
  c.lengths = {1};
  c.logp = {-1.0};
  c.ref_logp = {-1.5};
  c.advantages = {0.0f};
  GrpoLossConfig config = config_of(LossType::bnpo);
  config.beta = 0.1;
  std::vector<double> d;
  const GrpoLoss l = c.run(config, &d);
  EXPECT_NEAR(l.loss, 0.1 * 0.10653065971263342, 1e-15);
  EXPECT_NEAR(d[0], 0.1 * 0.3934693402873666, 1e-15);
  ASSERT_TRUE(l.metrics.kl.has_value());
  EXPECT_NEAR(*l.metrics.kl, 0.10653065971263342, 1e-15);
  // beta = 0 neither needs ref_logp nor reports kl.
  c.ref_logp.clear();
  EXPECT_FALSE(c.run(config_of(LossType::bnpo), &d).metrics.kl.has_value());
  // beta != 0 without ref_logp is a caller error.
  EXPECT_THROW(c.run(config, &d), Error);
}

TEST(GrpoLoss, MasksAndTruncatedCompletions) {
  Case c = on_policy_case();
  c.mask = {1, 0, 1, 1, 1};  // drops token 1
  c.truncated = {0, 1};      // sequence 1 hit the length limit
  std::vector<double> d;
  // Truncated kept: grpo = (-1/1 + 0.5) / 2 = -0.25; token 1 gets no gradient.
  EXPECT_NEAR(c.run(config_of(LossType::grpo), &d).loss, -0.25, 1e-12);
  expect_grads(d, {-0.5, 0, 0.5 / 6, 0.5 / 6, 0.5 / 6});
  // mask_truncated_completions: sequence 1 leaves the loss, but still counts in B.
  GrpoLossConfig config = config_of(LossType::grpo);
  config.mask_truncated_completions = true;
  const GrpoLoss l = c.run(config, &d);
  EXPECT_NEAR(l.loss, -0.5, 1e-12);
  expect_grads(d, {-0.5, 0, 0, 0, 0});
  EXPECT_EQ(l.metrics.num_tokens, 1);
  EXPECT_EQ(count_loss_tokens(config, c.lengths, c.mask, c.truncated), 1);
  EXPECT_EQ(count_loss_tokens(config_of(LossType::grpo), c.lengths, c.mask, c.truncated), 4);
}

TEST(GrpoLoss, MetricsAreMeansOverActiveTokens) {
  // Sequence 0: A = 1, ratios {1.5, 1.0} -> one high-clipped token of two.
  // Sequence 1: A = -1, ratios {0.5, 0.5, 1.0} -> two low-clipped tokens of three.
  Case c;
  c.lengths = {2, 3};
  c.logp = {0, 0, 0, 0, 0};
  c.old_logp = {-std::log(1.5), 0, -std::log(0.5), -std::log(0.5), 0};
  c.advantages = {1.0f, -1.0f};
  c.entropy = {1, 2, 3, 4, 5};
  std::vector<double> d;
  const GrpoLoss l = c.run(config_of(LossType::dapo), &d);
  EXPECT_DOUBLE_EQ(l.metrics.clip_ratio_high_mean, 1.0 / 5);
  EXPECT_DOUBLE_EQ(l.metrics.clip_ratio_low_mean, 2.0 / 5);
  EXPECT_DOUBLE_EQ(l.metrics.clip_ratio_region_mean, 3.0 / 5);
  EXPECT_DOUBLE_EQ(l.metrics.clip_ratio_low_min, 0.0);        // min(0/2, 2/3)
  EXPECT_DOUBLE_EQ(l.metrics.clip_ratio_high_max, 1.0 / 2);   // max(1/2, 0/3)
  ASSERT_TRUE(l.metrics.entropy.has_value());
  EXPECT_DOUBLE_EQ(*l.metrics.entropy, 3.0);
  EXPECT_EQ(l.metrics.num_tokens, 5);
}

TEST(GrpoLoss, EmptyAndFullyMaskedSequences) {
  Case c;
  c.lengths = {0, 2};
  c.logp = {-1, -1};
  c.advantages = {5.0f, 1.0f};
  std::vector<double> d;
  // grpo: the empty sequence counts 0/max(1,0) = 0 but still counts in the mean over B.
  EXPECT_NEAR(c.run(config_of(LossType::grpo), &d).loss, -0.5, 1e-12);
  c.mask = {0, 0};
  const GrpoLoss l = c.run(config_of(LossType::bnpo), &d);
  EXPECT_EQ(l.loss, 0.0);
  expect_grads(d, {0, 0});
  EXPECT_TRUE(std::isnan(l.metrics.clip_ratio_low_min));  // no sequence has active tokens
}

TEST(GrpoLoss, RejectsMismatchedArrays) {
  Case c = on_policy_case();
  std::vector<double> d(4);
  EXPECT_THROW(grpo_loss<double>(config_of(LossType::grpo), c.batch(), d), Error);
  c.advantages.pop_back();
  d.resize(5);
  EXPECT_THROW(grpo_loss<double>(config_of(LossType::grpo), c.batch(), d), Error);
  EXPECT_THROW(parse_loss_type("ppo"), Error);
  EXPECT_EQ(parse_loss_type("dr_grpo"), LossType::dr_grpo);
}

// A random off-policy batch with ragged lengths, a mask, a truncated sequence, KL and
// delta. Ratios are kept at least 1e-3 away from every kink (1-eps, 1+eps_high, delta)
// so the loss is smooth within the finite-difference step.
Case random_case(std::mt19937& rng, const GrpoLossConfig& config) {
  std::uniform_real_distribution<double> u(0, 1);
  Case c;
  c.lengths = {3, 1, 5, 4, 2};
  for (size_t b = 0; b < c.lengths.size(); ++b) c.advantages.push_back(float(u(rng) * 4 - 2));
  c.truncated = {0, 0, 1, 0, 0};
  const double kinks[] = {1 - config.epsilon, 1 + config.epsilon_high_or_default(),
                          config.delta.value_or(-1)};
  for (int32_t len : c.lengths) {
    for (int32_t j = 0; j < len; ++j) {
      const double lp = -0.05 - 3 * u(rng);
      double ratio;
      bool near_kink;
      do {
        ratio = 0.5 + 1.5 * u(rng);  // spans both clip bounds and delta
        near_kink = false;
        for (double k : kinks) near_kink |= std::fabs(ratio - k) < 1e-3;
      } while (near_kink);
      c.logp.push_back(lp);
      c.old_logp.push_back(lp - std::log(ratio));
      c.ref_logp.push_back(lp + (u(rng) - 0.5));
      c.mask.push_back(u(rng) < 0.85);
    }
  }
  c.num_items_in_batch = 40;
  return c;
}

TEST(GrpoLoss, GradientMatchesFiniteDifferencesForEveryLossType) {
  std::mt19937 rng(1234);
  for (LossType type : {LossType::grpo, LossType::bnpo, LossType::dr_grpo, LossType::dapo}) {
    for (bool mask_truncated : {false, true}) {
      GrpoLossConfig config = config_of(type);
      config.epsilon = 0.2;
      config.epsilon_high = 0.28;
      config.delta = 1.8;
      config.beta = 0.04;
      config.max_completion_length = 6;
      config.gradient_accumulation_steps = 3;
      config.mask_truncated_completions = mask_truncated;
      Case c = random_case(rng, config);
      std::vector<double> grad;
      c.run(config, &grad);
      // Central differences: truncation error ~h^2 * |l'''| ~ 1e-12, rounding ~1e-16 / h;
      // 1e-8 leaves margin while a wrong branch or scale is off by >= 1e-3.
      const double h = 1e-6;
      int nonzero = 0;
      for (size_t t = 0; t < c.logp.size(); ++t) {
        std::vector<double> unused;
        Case plus = c, minus = c;
        plus.logp[t] += h;
        minus.logp[t] -= h;
        const double fd = (plus.run(config, &unused).loss - minus.run(config, &unused).loss) / (2 * h);
        EXPECT_NEAR(grad[t], fd, 1e-8) << loss_type_name(type) << " token " << t;
        nonzero += grad[t] != 0.0;
      }
      // The check is only worth something if most tokens carry a gradient.
      EXPECT_GT(nonzero, int(c.logp.size()) / 2) << loss_type_name(type);
    }
  }
}

TEST(GrpoLoss, FloatInstantiationAgreesWithDouble) {
  std::mt19937 rng(7);
  GrpoLossConfig config = config_of(LossType::dapo);
  config.beta = 0.04;
  const Case c = random_case(rng, config);
  std::vector<double> dd;
  const double loss_d = c.run(config, &dd).loss;
  auto to_f = [](const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); };
  const auto logp = to_f(c.logp), old = to_f(c.old_logp), ref = to_f(c.ref_logp);
  GrpoBatch<float> b;
  b.lengths = c.lengths;
  b.logp = logp;
  b.old_logp = old;
  b.ref_logp = ref;
  b.advantages = c.advantages;
  b.mask = c.mask;
  b.truncated = c.truncated;
  b.num_items_in_batch = c.num_items_in_batch;
  std::vector<float> df(logp.size());
  const double loss_f = grpo_loss<float>(config, b, df).loss;
  // Inputs rounded to float (~1e-7 relative) move ratios by ~3e-7; sums stay in double.
  EXPECT_NEAR(loss_f, loss_d, 1e-5);
  for (size_t t = 0; t < df.size(); ++t) EXPECT_NEAR(df[t], dd[t], 1e-5) << t;
}

// ---- SFT -------------------------------------------------------------------------------

TEST(SftLoss, MeanNllOverActiveTokensAndItsGradient) {
  const std::vector<double> logp = {-1, -2, -3};
  const std::vector<uint8_t> mask = {1, 0, 1};
  std::vector<double> d(3, 99.0);
  EXPECT_DOUBLE_EQ(sft_loss<double>(logp, mask, 0, d), 2.0);  // (1 + 3) / 2
  EXPECT_EQ(d, (std::vector<double>{-0.5, 0, -0.5}));
  // Accumulated step of 4 tokens: this micro-batch's share.
  EXPECT_DOUBLE_EQ(sft_loss<double>(logp, mask, 4, d), 1.0);
  EXPECT_EQ(d, (std::vector<double>{-0.25, 0, -0.25}));
  // Finite difference of one coordinate (the loss is linear, so exact up to rounding).
  std::vector<double> plus = logp, unused(3);
  plus[2] += 1e-3;
  EXPECT_NEAR((sft_loss<double>(plus, mask, 4, unused) - 1.0) / 1e-3, d[2], 1e-9);
}

}  // namespace
}  // namespace ossrl

// One full GRPO loss step (advantages from two reward functions with a NaN, dapo with clip,
// delta-free two-epsilon clipping, k3 KL, a masked token, a masked truncated completion)
// against scripts/fixtures/trl_grpo_loss.py, TRL's formulas run through torch autograd.
// tests/fixtures/trl_grpo/README.md says how the files were made.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "reference_fixtures.h"
#include "train/grpo.h"

namespace ossrl {
namespace {

using test::read;

const std::string kDir = std::string(OSSRL_FIXTURE_DIR) + "/trl_grpo/";

std::vector<double> to_double(const std::vector<float>& v) { return {v.begin(), v.end()}; }

nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  EXPECT_TRUE(in.good()) << path;
  return nlohmann::json::parse(in);
}

TEST(GrpoTrl, FullLossStepMatchesTorchAutograd) {
  const auto inputs = SafetensorsFile::open(kDir + "example.safetensors");
  const auto reference = SafetensorsFile::open(kDir + "reference.safetensors");
  const nlohmann::json cfg = read_json(kDir + "example.json");
  const nlohmann::json metrics = read_json(kDir + "reference.safetensors.json");

  // Advantages: rewards_per_func is [B, F] in TRL's layout; ours is per function.
  const TensorView& r = inputs->tensor("rewards_per_func");
  const size_t batch = size_t(r.shape[0]), funcs = size_t(r.shape[1]);
  const std::vector<float> flat = read<float>(*inputs, "rewards_per_func");
  std::vector<std::vector<double>> rewards(funcs, std::vector<double>(batch));
  for (size_t i = 0; i < batch; ++i)
    for (size_t f = 0; f < funcs; ++f) rewards[f][i] = flat[i * funcs + f];
  AdvantageConfig adv_config;
  adv_config.num_generations = cfg["num_generations"];
  adv_config.scale_rewards = parse_scale_rewards(cfg["scale_rewards"].get<std::string>());
  adv_config.reward_weights = cfg["reward_weights"].get<std::vector<double>>();
  const Advantages adv = compute_advantages(adv_config, rewards);
  const std::vector<float> want_adv = read<float>(*reference, "advantages");
  ASSERT_EQ(adv.advantages.size(), want_adv.size());
  // torch computes the advantages in float32: agreement to float rounding.
  for (size_t i = 0; i < batch; ++i) EXPECT_NEAR(adv.advantages[i], want_adv[i], 1e-6) << i;
  EXPECT_NEAR(adv.metrics.reward, metrics["reward"].get<double>(), 1e-6);
  EXPECT_NEAR(adv.metrics.reward_std, metrics["reward_std"].get<double>(), 1e-6);
  EXPECT_NEAR(adv.metrics.frac_reward_zero_std, metrics["frac_reward_zero_std"].get<double>(), 1e-12);
  for (size_t f = 0; f < funcs; ++f) {
    EXPECT_NEAR(adv.metrics.func_mean[f], metrics[fmt::format("rewards/{}/mean", f)].get<double>(), 1e-6);
    EXPECT_NEAR(adv.metrics.func_std[f], metrics[fmt::format("rewards/{}/std", f)].get<double>(), 1e-6);
  }

  GrpoLossConfig config;
  config.loss_type = parse_loss_type(cfg["loss_type"].get<std::string>());
  config.epsilon = cfg["epsilon"];
  config.epsilon_high = cfg["epsilon_high"].get<double>();
  config.beta = cfg["beta"];
  config.max_completion_length = cfg["max_completion_length"];
  config.mask_truncated_completions = cfg["mask_truncated_completions"];
  const std::vector<int32_t> lengths = read<int32_t>(*inputs, "lengths");
  const std::vector<double> logp = to_double(read<float>(*inputs, "logp"));
  const std::vector<double> old_logp = to_double(read<float>(*inputs, "old_logp"));
  const std::vector<double> ref_logp = to_double(read<float>(*inputs, "ref_logp"));
  const std::vector<uint8_t> mask = read<uint8_t>(*inputs, "mask");
  const std::vector<uint8_t> truncated = read<uint8_t>(*inputs, "truncated");
  GrpoBatch<double> b;
  b.lengths = lengths;
  b.logp = logp;
  b.old_logp = old_logp;
  b.ref_logp = ref_logp;
  b.advantages = adv.advantages;
  b.mask = mask;
  b.truncated = truncated;
  std::vector<double> dlogp(logp.size());
  const GrpoLoss loss = grpo_loss<double>(config, b, dlogp);

  // The reference ran in float64 from the same float32 inputs; the only difference left is
  // the advantages' float32 rounding (~1e-7 relative), so 1e-6 absolute on O(1) values.
  EXPECT_NEAR(loss.loss, read<float>(*reference, "loss")[0], 1e-6);
  const std::vector<float> want_grad = read<float>(*reference, "dlogp");
  ASSERT_EQ(want_grad.size(), dlogp.size());
  int nonzero = 0;
  for (size_t t = 0; t < dlogp.size(); ++t) {
    EXPECT_NEAR(dlogp[t], want_grad[t], 1e-6) << "token " << t;
    nonzero += want_grad[t] != 0.0f;
  }
  EXPECT_GT(nonzero, 3);  // the example exercises gradient-carrying tokens
  EXPECT_NEAR(*loss.metrics.kl, metrics["kl"].get<double>(), 1e-9);
  EXPECT_NEAR(loss.metrics.clip_ratio_low_mean, metrics["clip_ratio/low_mean"].get<double>(), 1e-12);
  EXPECT_NEAR(loss.metrics.clip_ratio_high_mean, metrics["clip_ratio/high_mean"].get<double>(), 1e-12);
  EXPECT_NEAR(loss.metrics.clip_ratio_region_mean, metrics["clip_ratio/region_mean"].get<double>(), 1e-12);
  EXPECT_NEAR(loss.metrics.clip_ratio_low_min, metrics["clip_ratio/low_min"].get<double>(), 1e-12);
  EXPECT_NEAR(loss.metrics.clip_ratio_high_max, metrics["clip_ratio/high_max"].get<double>(), 1e-12);
}

}  // namespace
}  // namespace ossrl

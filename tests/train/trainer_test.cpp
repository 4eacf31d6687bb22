// The trainer on the demo's tiny model: rollouts sample the current policy (base + LoRA) with
// the log-probs the policy forward computes, non-finite steps are skipped and reported, SFT
// learns, and evaluation is greedy and repeatable.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "train/demo_task.h"
#include "train/policy.h"
#include "train/trainer.h"
#include "train_fixture.h"

namespace ossrl {
namespace {

std::string out_dir(const std::string& name) { return testing::train_fixture().dir + "/" + name; }

// Gives every lora_B small random values, so the adapters change the model's outputs.
void randomise_adapters(Lora& lora, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 0.05f);
  for (Parameter& p : lora.parameters()) {
    if (p.kind == Parameter::Kind::LoraB) {
      for (float& x : p.data) x = normal(rng);
    }
  }
}

// GRPO's importance ratio compares the sampler's log-probs (KV-cached decode with the
// adapters) with the policy forward's (whole sequences, the same adapters): they must agree
// to fp32 rounding, so with an unchanged policy the ratio is 1.
TEST(Trainer, RolloutLogProbsAreThePolicysOwn) {
  Trainer trainer(testing::small_grpo_config(out_dir("logprobs")));
  randomise_adapters(trainer.lora(), 7);
  std::vector<std::vector<int32_t>> prompts;
  for (const char* text : {"3+4", "9+9", "0+7"}) {
    prompts.push_back(make_example({{"prompt", text}}, trainer.tokenizer(),
                                   {.system_message = false, .assistant_prefix = "<|channel|>final<|message|>"},
                                   false, "test")
                          .prompt);
  }
  const std::vector<Generation> gens = trainer.generate_with_policy(prompts, {.temperature = 1.0f}, 11);

  std::vector<int32_t> tokens, offsets{0};
  for (size_t i = 0; i < prompts.size(); ++i) {
    tokens.insert(tokens.end(), prompts[i].begin(), prompts[i].end());
    tokens.insert(tokens.end(), gens[i].tokens.begin(), gens[i].tokens.end());
    offsets.push_back(int32_t(tokens.size()));
  }
  Policy policy(trainer.model(), &trainer.lora());
  const std::vector<float> with_lora = policy.forward(tokens, offsets, {.keep_activations = false}).log_probs;
  trainer.lora().set_adapters_enabled(false);
  const std::vector<float> base = policy.forward(tokens, offsets, {.keep_activations = false}).log_probs;
  trainer.lora().set_adapters_enabled(true);

  float max_diff = 0, max_base_diff = 0;
  for (size_t i = 0; i < prompts.size(); ++i) {
    for (size_t t = 0; t < gens[i].tokens.size(); ++t) {
      const size_t at = size_t(offsets[i]) + prompts[i].size() + t;
      max_diff = std::max(max_diff, std::fabs(with_lora[at] - gens[i].logprobs[t]));
      max_base_diff = std::max(max_base_diff, std::fabs(base[at] - gens[i].logprobs[t]));
    }
  }
  // fp32 rounding of two summation orders over a 201088-way log-sum-exp: ~1e-6 relative on
  // log-probs of order 1-10; 1e-4 leaves room and still catches a missing adapter.
  EXPECT_LT(max_diff, 1e-4f);
  EXPECT_GT(max_base_diff, 1e-2f) << "the rollouts did not use the adapters";
}

// A NaN in the adapter makes the loss and gradients non-finite: the step must be skipped,
// reported, and leave every parameter as it was; the next finite step applies. (SFT, whose
// gradient is never zero: a GRPO step of an untrained model often has all-equal rewards.)
TEST(Trainer, NonFiniteStepIsSkippedAndReported) {
  TrainConfig c = testing::small_grpo_config(out_dir("nonfinite"));
  c.trainer = "sft";
  Trainer trainer(c);
  Parameter& poisoned = trainer.lora().parameters()[0];
  const float kept = poisoned.data[0];
  poisoned.data[0] = NAN;
  std::vector<std::vector<float>> before;
  for (const Parameter& p : trainer.lora().parameters()) before.push_back(p.data);

  const nlohmann::json skipped = trainer.step();
  EXPECT_TRUE(skipped["skipped"].get<bool>()) << skipped.dump();
  EXPECT_EQ(skipped["skip_reason"], "non-finite loss");
  for (size_t i = 1; i < before.size(); ++i) EXPECT_EQ(trainer.lora().parameters()[i].data, before[i]);
  EXPECT_TRUE(std::isnan(poisoned.data[0]));

  poisoned.data[0] = kept;
  const nlohmann::json applied = trainer.step();
  EXPECT_FALSE(applied["skipped"].get<bool>()) << applied.dump();
  size_t changed = 0;
  for (size_t i = 1; i < before.size(); ++i) changed += trainer.lora().parameters()[i].data != before[i];
  EXPECT_GT(changed, 0u);
  EXPECT_EQ(applied["step"], 2);
}

TEST(Trainer, GrpoStepReportsTrlsMetrics) {
  TrainConfig c = testing::small_grpo_config(out_dir("metrics"));
  c.beta = 0.01;
  Trainer trainer(c);
  const nlohmann::json row = trainer.step();
  for (const char* key : {"step", "epoch", "loss", "reward", "reward_std", "frac_reward_zero_std",
                          "rewards/exact_match/mean", "rewards/format/std", "kl", "entropy", "clip_ratio/low_mean",
                          "clip_ratio/high_mean", "clip_ratio/region_mean", "completions/mean_length",
                          "completions/clipped_ratio", "grad_norm", "learning_rate", "skipped", "step_time",
                          "tokens_per_second"}) {
    EXPECT_TRUE(row.contains(key)) << key << " missing from " << row.dump();
  }
  // The first step's policy is the reference (lora_B = 0): KL 0 up to fp32 rounding of the
  // k3 estimator (exp(x) - x - 1 near x = 0).
  EXPECT_LT(std::fabs(row["kl"].get<double>()), 1e-6);
  EXPECT_DOUBLE_EQ(row["epoch"].get<double>(), 4.0 / 90.0);  // 4 prompts of 90 training rows
}

TEST(Trainer, SftLowersTheLossAndEvaluationIsRepeatable) {
  TrainConfig c = testing::small_grpo_config(out_dir("sft"));
  c.trainer = "sft";
  c.max_steps = 40;
  c.per_device_train_batch_size = 8;
  c.gradient_accumulation_steps = 1;
  Trainer trainer(c);
  double first = 0, last = 0;
  for (int s = 0; s < 40; ++s) {
    const double loss = trainer.step()["loss"].get<double>();
    if (s < 5) first += loss / 5;
    if (s >= 35) last += loss / 5;
  }
  // The first steps learn the answer format (loss ~10 nats a token to ~2): a halving is far
  // outside the noise of 8-example batches.
  EXPECT_LT(last, first / 2) << first << " -> " << last;
  nlohmann::json a = trainer.evaluate().metrics, b = trainer.evaluate().metrics;
  a.erase("eval_time");
  b.erase("eval_time");
  EXPECT_EQ(a, b);
  EXPECT_EQ(a["eval_rewards/format/mean"], 1.0) << a.dump();  // every answer is well formed by now
}

}  // namespace
}  // namespace ossrl

namespace ossrl {
namespace {

// The README's demo at its defaults, evaluating only at the ends of each phase (evaluation
// draws no randomness the training uses, so the trajectory is the demo's own). Runs are
// deterministic in the seed (the same accuracies came out on two machines, docs/
// benchmarks.md): 29% after SFT, 41% after GRPO. The margin asserted, 10 points, is what
// the demo claims; about 100 s on two cores.
TEST(Demo, GrpoRaisesTheAccuracy) {
  DemoOptions options;
  options.work_dir = testing::train_fixture().dir + "/demo";
  options.eval_steps = 150;
  const DemoReport report = run_demo(options);
  EXPECT_GE(report.accuracy_before_grpo, 0.15);  // the warm-up leaves something to improve on
  EXPECT_GE(report.accuracy_after_grpo, report.accuracy_before_grpo + 0.10)
      << report.accuracy_before_grpo << " -> " << report.accuracy_after_grpo;
}

}  // namespace
}  // namespace ossrl

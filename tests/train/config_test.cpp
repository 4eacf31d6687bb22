// `ossrl train`'s configuration: TOML keys, command-line overrides, validation.
#include <gtest/gtest.h>

#include "core/error.h"
#include "train/train_config.h"

namespace ossrl {
namespace {

// The smallest valid GRPO config.
TrainConfig base() {
  TrainConfig c;
  apply_toml(c, R"(
model_name_or_path = "m"
dataset = "d.jsonl"
rewards = ["exact_match"]
)", "base.toml");
  return c;
}

TEST(TrainConfig, TomlKeysOfEveryType) {
  TrainConfig c = base();
  apply_toml(c, R"(
learning_rate = 3e-5
num_generations = 4
per_device_train_batch_size = 8
gradient_accumulation_steps = 2
max_steps = 100
seed = 7
epsilon_high = 0.28
beta = 1          # an integer where a number is expected is fine
mask_truncated_completions = true
lora_target_modules = ["q_proj", "experts"]
reward_weights = [1.0, 0.5]
loss_type = "grpo"

[[rewards]]
type = "numeric"
field = "answer"

[[rewards]]
type = "format"
)", "t.toml");
  EXPECT_EQ(c.lr(), 3e-5);
  EXPECT_EQ(c.num_generations, 4);
  EXPECT_EQ(c.generation_batch_size(), 16);
  EXPECT_EQ(c.prompts_per_generation(), 4);
  EXPECT_EQ(c.max_steps, 100);
  EXPECT_EQ(c.seed, 7u);
  ASSERT_TRUE(c.epsilon_high.has_value());
  EXPECT_DOUBLE_EQ(*c.epsilon_high, 0.28);
  EXPECT_DOUBLE_EQ(c.beta, 1.0);
  EXPECT_TRUE(c.mask_truncated_completions);
  EXPECT_EQ(c.lora.target_modules, (std::vector<std::string>{"q_proj", "experts"}));
  EXPECT_EQ(c.reward_weights, (std::vector<double>{1.0, 0.5}));
  ASSERT_EQ(c.rewards.size(), 2u);
  EXPECT_EQ(c.rewards[0]["type"], "numeric");
  EXPECT_EQ(c.rewards[0]["field"], "answer");
  EXPECT_EQ(c.rewards[1]["type"], "format");
  EXPECT_NO_THROW(c.validate());
}

TEST(TrainConfig, OverridesWinAndParseAsToml) {
  TrainConfig c = base();
  apply_overrides(c, {"--learning_rate", "1e-4", "--lora-r", "32", "--output_dir=out/run 1",
                      "--mask_truncated_completions", "--lora_target_modules", "q_proj,v_proj", "--trainer",
                      "sft", "--reward_weights", "[2, 1]", "--epsilon_high", "0.3"});
  EXPECT_EQ(c.lr(), 1e-4);
  EXPECT_EQ(c.lora.r, 32);
  EXPECT_EQ(c.output_dir, "out/run 1");  // not TOML: a bare string
  EXPECT_TRUE(c.mask_truncated_completions);  // a bool flag without a value
  EXPECT_EQ(c.lora.target_modules, (std::vector<std::string>{"q_proj", "v_proj"}));
  EXPECT_EQ(c.trainer, "sft");
  EXPECT_EQ(c.reward_weights, (std::vector<double>{2.0, 1.0}));
  EXPECT_DOUBLE_EQ(c.epsilon_high.value(), 0.3);
}

TEST(TrainConfig, DefaultLearningRateIsTrls) {
  TrainConfig c = base();
  EXPECT_EQ(c.lr(), 1e-6);  // GRPOConfig
  c.trainer = "sft";
  EXPECT_EQ(c.lr(), 2e-5);  // SFTConfig
}

TEST(TrainConfig, ErrorsNameTheKey) {
  TrainConfig c = base();
  try {
    apply_toml(c, "learning_rat = 1e-5\n", "x.toml");
    FAIL() << "unknown key accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("learning_rat"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("did you mean 'learning_rate'"), std::string::npos) << e.what();
  }
  EXPECT_THROW(apply_toml(c, "num_generations = \"four\"\n", "x.toml"), Error);
  EXPECT_THROW(apply_toml(c, "num_generations = 2.5\n", "x.toml"), Error);
  EXPECT_THROW(apply_toml(c, "seed = -1\n", "x.toml"), Error);
  EXPECT_THROW(apply_toml(c, "max_steps = \n", "x.toml"), Error);  // not TOML
  EXPECT_THROW(apply_overrides(c, {"--max_steps"}), Error);         // no value
  EXPECT_THROW(apply_overrides(c, {"max_steps", "3"}), Error);      // no dashes
  EXPECT_THROW(apply_overrides(c, {"--nope", "3"}), Error);
}

TEST(TrainConfig, ValidateRejectsInconsistentBatches) {
  TrainConfig c = base();
  c.per_device_train_batch_size = 6;
  c.num_generations = 4;  // 6 completions are not whole groups of 4
  EXPECT_THROW(c.validate(), Error);
  c.per_device_train_batch_size = 8;
  EXPECT_NO_THROW(c.validate());
  c.num_generations = 1;  // a group of one has no advantage
  c.per_device_train_batch_size = 1;
  EXPECT_THROW(c.validate(), Error);
  c = base();
  c.loss_type = "ppo";
  EXPECT_THROW(c.validate(), Error);
  c = base();
  c.reward_weights = {1, 2};  // two weights, one reward
  EXPECT_THROW(c.validate(), Error);
  c = base();
  c.rewards = nlohmann::json::array();
  EXPECT_THROW(c.validate(), Error);
  c.trainer = "sft";  // sft trains without rewards
  EXPECT_NO_THROW(c.validate());
  c.eval_split = 0.1;
  c.eval_dataset = "e.jsonl";
  EXPECT_THROW(c.validate(), Error);
}

TEST(TrainConfig, JsonRoundTripsThroughToml) {
  TrainConfig c = base();
  apply_overrides(c, {"--learning_rate", "5e-5", "--lora_alpha", "64"});
  const nlohmann::json j = c.to_json();
  EXPECT_EQ(j["learning_rate"], 5e-5);
  EXPECT_EQ(j["lora_alpha"], 64.0);
  EXPECT_TRUE(j["epsilon_high"].is_null());
  EXPECT_EQ(j["rewards"], nlohmann::json::array({"exact_match"}));
}

}  // namespace
}  // namespace ossrl

// The demo's tiny model and addition data, written once per test process, and a GRPO config
// over them small enough for a test.
#pragma once

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "train/demo_task.h"
#include "train/train_config.h"

namespace ossrl::testing {

struct TrainFixture {
  std::string dir, model, data;
};

inline const TrainFixture& train_fixture() {
  static const TrainFixture f = [] {
    TrainFixture t;
    t.dir = ::testing::TempDir() + "/ossrl_train." + std::to_string(getpid());
    std::filesystem::create_directories(t.dir);
    t.model = t.dir + "/model";
    write_demo_model(t.model, 1, *Tokenizer::load());
    t.data = t.dir + "/addition.jsonl";
    std::ofstream out(t.data);
    for (const nlohmann::json& row : addition_rows()) out << row.dump() << "\n";
    return t;
  }();
  return f;
}

// GRPO on the addition task: 2 prompts x 4 completions per micro-batch, 2 micro-batches.
inline TrainConfig small_grpo_config(const std::string& output_dir) {
  const TrainFixture& f = train_fixture();
  TrainConfig c;
  c.model_name_or_path = f.model;
  c.dataset = f.data;
  c.output_dir = output_dir;
  c.eval_split = 0.1;
  c.system_message = false;
  c.assistant_prefix = "<|channel|>final<|message|>";
  c.max_completion_length = 3;
  c.num_generations = 4;
  c.per_device_train_batch_size = 8;
  c.gradient_accumulation_steps = 2;
  c.max_steps = 4;
  c.learning_rate = 3e-3;
  c.seed = 3;
  c.rewards = nlohmann::json::array({{{"type", "exact_match"}, {"field", "answer"}}, "format"});
  c.reward_weights = {1.0, 0.2};
  c.lora.r = 4;
  c.lora.lora_alpha = 8;
  c.lora.target_modules = {"q_proj", "v_proj", "experts"};
  return c;
}

}  // namespace ossrl::testing

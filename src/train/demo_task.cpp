#include "train/demo_task.h"

#include <fmt/format.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

#include "core/dtype.h"
#include "core/error.h"
#include "io/safetensors.h"
#include "model/random_checkpoint.h"
#include "train/metrics.h"
#include "train/trainer.h"

namespace ossrl {

namespace fs = std::filesystem;

std::vector<nlohmann::json> addition_rows() {
  std::vector<nlohmann::json> rows;
  for (int a = 0; a <= 9; ++a) {
    for (int b = 0; b <= 9; ++b) {
      const std::string answer = std::to_string(a + b);
      rows.push_back({{"prompt", fmt::format("{}+{}", a, b)}, {"answer", answer}, {"completion", answer}});
    }
  }
  return rows;
}

GptOssConfig demo_model_config() {
  GptOssConfig c = GptOssConfig::gpt_oss_20b();  // the real vocabulary, RoPE and limits
  c.num_hidden_layers = 2;
  c.hidden_size = 64;
  c.intermediate_size = 64;
  c.num_local_experts = 4;
  c.experts_per_token = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 16;
  c.sliding_window = 16;
  c.layer_types = {AttentionType::Sliding, AttentionType::Full};
  return c;
}

void write_demo_model(const std::string& dir, uint64_t seed, const Tokenizer& tokenizer) {
  write_random_checkpoint(dir, demo_model_config(), {.seed = seed, .mxfp4_experts = true});
  // The answer tokens' lm_head rows, scaled by kAnswerTokenGain (see the header): the
  // file is rewritten with those rows changed.
  std::vector<int32_t> answer_tokens = {harmony_tokens::kReturn};
  for (int sum = 0; sum <= 18; ++sum) {
    const std::vector<int32_t> t = tokenizer.encode(std::to_string(sum));
    OSSRL_CHECK(t.size() == 1, "the answer {} is not one token", sum);
    answer_tokens.push_back(t[0]);
  }
  const std::string path = (fs::path(dir) / "model.safetensors").string();
  SafetensorsWriter writer;
  {
    const auto file = SafetensorsFile::open(path);
    for (const auto& [name, view] : file->tensors()) {
      std::vector<uint8_t> bytes(view.data, view.data + view.nbytes);
      if (name == "lm_head.weight") {
        OSSRL_CHECK(view.dtype == DType::BF16 && view.shape.size() == 2, "{}: expected a bf16 [vocab, hidden] lm_head",
                    path);
        // row_c = kAnswerTokenGain * (u + row_c) for a random unit vector u shared by the answers.
        const size_t hidden = size_t(view.shape[1]);
        std::mt19937_64 rng(seed ^ 0xa5a5a5a5ull);
        std::normal_distribution<float> normal;
        std::vector<float> u(hidden);
        float norm = 0;
        for (float& x : u) x = normal(rng), norm += x * x;
        for (float& x : u) x /= std::sqrt(norm);
        for (int32_t token : answer_tokens) {
          for (size_t c = 0; c < hidden; ++c) {
            uint8_t* at = bytes.data() + 2 * (size_t(token) * hidden + c);
            uint16_t bits;
            std::memcpy(&bits, at, 2);
            bits = f32_to_bf16(kAnswerTokenGain * (u[c] + bf16_to_f32(bits)));
            std::memcpy(at, &bits, 2);
          }
        }
      }
      writer.add(name, view.dtype, view.shape, bytes);
    }
    for (const auto& [key, value] : file->metadata()) writer.set_metadata(key, value);
  }
  writer.write(path);
}

namespace {

using Clock = std::chrono::steady_clock;

double number(const nlohmann::json& row, const char* key) {
  return row.contains(key) && row[key].is_number() ? row[key].get<double>() : NAN;
}

// The options both phases share; the phases differ in trainer, rate and batch.
TrainConfig common_config(const DemoOptions& o, const std::string& model_dir, const std::string& data) {
  TrainConfig c;
  c.model_name_or_path = model_dir;
  c.tokenizer = o.tokenizer;
  c.dataset = data;
  // Greedy accuracy on all 100 problems, the ones GRPO trains on: a random 64-wide model
  // barely generalises to unseen sums in a few hundred steps, and a 20-problem held-out
  // split moves in 5-point jumps (measured: see the header).
  c.eval_dataset = data;
  c.seed = o.seed;
  c.system_message = false;
  c.assistant_prefix = "<|channel|>final<|message|>";
  c.max_completion_length = 4;  // a digit and <|return|>, with room to be wrong
  c.eval_steps = o.eval_steps;
  c.per_device_eval_batch_size = 50;
  c.rewards = nlohmann::json::array({{{"type", "exact_match"}, {"field", "answer"}}, "format"});
  // The format reward is logged but weighs 0: an empty final answer is well formed, and with
  // weight it earns the empty answer the same reward as a wrong sum, which GRPO then
  // reinforces (one token to push instead of twenty answers to tell apart) until the policy
  // answers nothing.
  c.reward_weights = {1.0, 0.0};
  c.lr_scheduler_type = "constant";
  c.max_grad_norm = 1.0;
  c.lora.r = 16;
  c.lora.lora_alpha = 32;
  // The experts too: the random MoE has to learn the sum, attention only to fetch the digits.
  c.lora.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "experts"};
  return c;
}

}  // namespace

DemoReport run_demo(const DemoOptions& o) {
  const auto start = Clock::now();
  DemoReport report;
  const fs::path work(o.work_dir);
  const std::string model_dir = (work / "model").string();
  fs::create_directories(work / "data");
  if (!fs::exists(fs::path(model_dir) / "config.json")) {
    o.print(fmt::format("writing the demo model to {}", model_dir));
    write_demo_model(model_dir, o.seed, *Tokenizer::load(o.tokenizer.empty() ? Tokenizer::default_path() : o.tokenizer));
  }
  const std::string data = (work / "data" / "addition.jsonl").string();
  {
    std::string text;
    for (const nlohmann::json& row : addition_rows()) text += row.dump() + "\n";
    std::ofstream(data) << text;
  }

  double last_reward = NAN, last_kl = NAN;
  auto run_phase = [&](const char* phase, TrainConfig config) {
    Trainer trainer(std::move(config));
    o.print(fmt::format("\n== {}: {} steps, {} training / {} evaluation problems ==", phase, trainer.total_steps(),
                        trainer.train_size(), trainer.eval_size()));
    trainer.on_row = [&](const nlohmann::json& row) {
      if (row.contains("eval_reward")) {
        const DemoEval e{phase, row["step"].get<int64_t>(), number(row, "eval_rewards/exact_match/mean"),
                         number(row, "eval_reward"), last_reward, last_kl};
        report.evals.push_back(e);
      } else {
        last_reward = number(row, "rewards/exact_match/mean");
        last_kl = number(row, "kl");
      }
      o.print(progress_line(row, trainer.total_steps()));
    };
    trainer.train();
  };

  TrainConfig sft = common_config(o, model_dir, data);
  sft.trainer = "sft";
  sft.output_dir = (work / "sft").string();
  sft.max_steps = o.sft_steps;
  sft.learning_rate = 3e-3;
  sft.per_device_train_batch_size = 8;
  apply_overrides(sft, o.sft_overrides);
  run_phase("SFT warm-up", sft);
  report.accuracy_before_grpo = report.evals.empty() ? NAN : report.evals.back().accuracy;

  TrainConfig grpo = common_config(o, model_dir, data);
  grpo.trainer = "grpo";
  grpo.output_dir = (work / "grpo").string();
  grpo.adapter_name_or_path = (work / "sft" / "adapter").string();
  grpo.max_steps = o.grpo_steps;
  grpo.learning_rate = 3e-3;
  grpo.num_generations = 8;
  grpo.per_device_train_batch_size = 64;  // 8 prompts x 8 completions per step
  // No KL term (TRL's default beta 0): the reference is the base model with the adapters
  // off, and after the warm-up the policy is ~10 nats from it, so a KL penalty would mostly
  // pull back towards the untrained model.
  grpo.beta = 0.0;
  grpo.temperature = 1.0;
  apply_overrides(grpo, o.grpo_overrides);
  last_reward = last_kl = NAN;
  run_phase("GRPO", grpo);
  report.accuracy_after_grpo = report.evals.empty() ? NAN : report.evals.back().accuracy;
  report.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return report;
}

}  // namespace ossrl

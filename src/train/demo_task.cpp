#include "train/demo_task.h"

#include <fmt/format.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>

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
    for (int b = 0; a + b <= 9; ++b) {
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
  for (char d = '0'; d <= '9'; ++d) {
    const std::vector<int32_t> t = tokenizer.encode(std::string(1, d));
    OSSRL_CHECK(t.size() == 1, "the digit {} is not one token", d);
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
        const size_t hidden = size_t(view.shape[1]);
        for (int32_t token : answer_tokens) {
          for (size_t i = size_t(token) * hidden; i < size_t(token + 1) * hidden; ++i) {
            uint16_t bits;
            std::memcpy(&bits, bytes.data() + 2 * i, 2);
            bits = f32_to_bf16(bf16_to_f32(bits) * kAnswerTokenGain);
            std::memcpy(bytes.data() + 2 * i, &bits, 2);
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
  c.eval_split = 0.2;  // 11 of the 55 problems, the same ones in both phases (same seed)
  c.seed = o.seed;
  c.system_message = false;
  c.assistant_prefix = "<|channel|>final<|message|>";
  c.max_completion_length = 4;  // a digit and <|return|>, with room to be wrong
  c.eval_steps = o.eval_steps;
  c.per_device_eval_batch_size = 16;
  c.rewards = nlohmann::json::array({{{"type", "exact_match"}, {"field", "answer"}}, "format"});
  c.reward_weights = {1.0, 0.2};
  c.lr_scheduler_type = "constant";
  c.max_grad_norm = 1.0;
  c.lora.r = 16;
  c.lora.lora_alpha = 32;
  c.lora.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj"};
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
    o.print(fmt::format("\n== {}: {} steps, {} training / {} held-out problems ==", phase, trainer.total_steps(),
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
  sft.learning_rate = 1e-2;
  sft.per_device_train_batch_size = 8;
  apply_overrides(sft, o.sft_overrides);
  run_phase("SFT warm-up", sft);
  report.accuracy_before_grpo = report.evals.empty() ? NAN : report.evals.back().accuracy;

  TrainConfig grpo = common_config(o, model_dir, data);
  grpo.trainer = "grpo";
  grpo.output_dir = (work / "grpo").string();
  grpo.adapter_name_or_path = (work / "sft" / "adapter").string();
  grpo.max_steps = o.grpo_steps;
  grpo.learning_rate = 5e-3;
  grpo.num_generations = 8;
  grpo.per_device_train_batch_size = 32;  // 4 prompts x 8 completions per step
  grpo.beta = 0.04;
  grpo.temperature = 1.0;
  apply_overrides(grpo, o.grpo_overrides);
  last_reward = last_kl = NAN;
  run_phase("GRPO", grpo);
  report.accuracy_after_grpo = report.evals.empty() ? NAN : report.evals.back().accuracy;
  report.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return report;
}

}  // namespace ossrl

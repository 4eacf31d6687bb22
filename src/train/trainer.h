// The CPU trainer behind `ossrl train`: GRPO as TRL's GRPOTrainer runs it on one device, and
// plain SFT for warm starts, over LoRA on a frozen gpt-oss checkpoint.
//
// One GRPO step (train/train_config.h counts the batches):
//   1. every num_iterations steps, a generation batch: the next prompts_per_generation
//      prompts of the data order, each sampled num_generations times with the current policy
//      (base + LoRA, KV-cached decode) from a stream keyed by (seed, step); rewards from every
//      reward function, group advantages (train/grpo.h); with beta > 0 the reference
//      log-probs (adapters switched off: the base model, no second copy);
//   2. gradient_accumulation_steps micro-batches: policy forward over prompt + completion,
//      grpo_loss, backward; one guarded AdamW step (a non-finite loss or gradient skips the
//      update and the metrics row says so);
//   3. metrics (train/metrics.h), evaluation every eval_steps, a checkpoint every save_steps.
//
// Log-probs are the model's own (log_softmax of the logits at temperature 1) everywhere: the
// sampler records them so, and the policy forward computes them so; TRL divides the logits by
// the sampling temperature before its log-softmax instead. The ratio compares the same
// quantity on both sides either way, and the two agree exactly at TRL's default temperature
// 1. The old log-probs of num_iterations > 1 are the sampler's own (KV-cached decode), which
// equal the policy forward's to fp32 rounding; with num_iterations == 1 TRL's detached
// current log-probs are used, so the ratio is exactly 1.
//
// Determinism: the data order, sampling, LoRA dropout and evaluation are functions of (seed,
// step, ...) only, so a run resumed from checkpoint-N (train/checkpoint.h) writes the same
// metrics as one that was never stopped.
#pragma once

#include <nlohmann/json.hpp>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "engine/generate.h"
#include "model/cpu_model.h"
#include "rewards/reward.h"
#include "tokenizer/tokenizer.h"
#include "train/checkpoint.h"
#include "train/dataset.h"
#include "train/grpo.h"
#include "train/lora.h"
#include "train/metrics.h"
#include "train/optimizer.h"
#include "train/policy.h"
#include "train/schedule.h"
#include "train/train_config.h"

namespace ossrl {

// A scored generation batch: what a GRPO step trains on, kept for num_iterations steps.
struct Rollouts {
  std::vector<std::vector<int32_t>> prompts;      // [B] prompt tokens (repeated G times)
  std::vector<std::vector<int32_t>> completions;  // [B] sampled tokens, stop token included
  std::vector<std::vector<float>> old_logp;       // [B] sampler log-probs of each token
  std::vector<std::vector<float>> ref_logp;       // [B] reference log-probs (beta > 0), else empty
  std::vector<uint8_t> truncated;                 // [B] ended without a stop token
  std::vector<float> advantages;                  // [B]
  nlohmann::json metrics;                         // reward metrics of the batch (logged each step)

  nlohmann::json to_json() const;
  static Rollouts from_json(const nlohmann::json& j);
};

// Evaluation: greedy completions of every eval prompt, scored by every reward function.
struct EvalResult {
  nlohmann::json metrics;  // "eval_reward", "eval_rewards/<f>/mean", "eval_completions/mean_length"
  std::vector<std::string> completions;  // decoded, in eval order (for display)
};

class Trainer {
 public:
  // Opens the model, tokenizer and data, builds the LoRA (or loads adapter_name_or_path),
  // optimiser, schedule and rewards, and resumes from config.resume_from_checkpoint if set.
  // `rewards` replaces the config's reward list when not empty (tests, the demo).
  explicit Trainer(TrainConfig config, std::vector<std::unique_ptr<RewardFunction>> rewards = {});
  ~Trainer();

  // Trains to total_steps(): steps, logs, evaluates and checkpoints as configured, and
  // saves the final adapter to output_dir/adapter. on_row (if set) sees every metrics row
  // as it is written (the console display).
  void train();
  std::function<void(const nlohmann::json& row)> on_row;

  // One optimiser step; returns its metrics row (also written to the log).
  nlohmann::json step();
  EvalResult evaluate();
  void save(const std::string& dir) const;  // a checkpoint of the current state

  int64_t global_step() const { return state_.global_step; }
  int64_t total_steps() const { return total_steps_; }
  const TrainConfig& config() const { return config_; }
  Lora& lora() { return *lora_; }
  CpuModel& model() { return *model_; }
  const Tokenizer& tokenizer() const { return *tokenizer_; }
  size_t train_size() const { return train_.size(); }
  size_t eval_size() const { return eval_.size(); }

  // Per-completion generation with the current policy (adapters as they are now): the
  // rollout engine the trainer and evaluation use. seed keys the sampling streams.
  std::vector<Generation> generate_with_policy(const std::vector<std::vector<int32_t>>& prompts,
                                              const SamplingParams& sampling, uint64_t seed);

 private:
  nlohmann::json grpo_step();
  nlohmann::json sft_step();
  // The policy that computes log-probs and gradients of micro-batches of up to `tokens`
  // tokens: the CPU Policy, or with device = "cuda" a CudaPolicy over the GPU copy, made for
  // the update phase and released (release_gpu_policy) when rollouts need its memory.
  TrainablePolicy& update_policy(int tokens);
  void release_gpu_policy();
  // The optimizer step over the grads of the update phase (on cuda brought to the host Lora
  // first, and the new values sent back to the GPU after).
  StepReport optimizer_step(double lr, double loss);
  Rollouts make_rollouts();
  // Reward inputs of completions of `examples` (parallel arrays).
  std::vector<std::vector<double>> score(const std::vector<const Example*>& examples,
                                         const std::vector<std::vector<int32_t>>& completions,
                                         const std::vector<uint8_t>& truncated);
  void write_row(nlohmann::json row);

  TrainConfig config_;
  std::shared_ptr<const Tokenizer> tokenizer_;
  std::unique_ptr<CpuModel> model_;
  std::unique_ptr<Lora> lora_;
  std::unique_ptr<Policy> policy_;
  // With device = "cuda": the checkpoint and the adapters on the GPU, the policy of the
  // current update phase (train/trainer.cpp).
  struct Gpu;
  std::unique_ptr<Gpu> gpu_;
  std::unique_ptr<AdamW> optimizer_;
  std::unique_ptr<LrSchedule> schedule_;
  std::vector<std::unique_ptr<RewardFunction>> rewards_;
  std::vector<Example> train_, eval_;
  std::unique_ptr<DataOrder> order_;
  std::unique_ptr<MetricsLog> metrics_;
  TrainerState state_;
  std::optional<Rollouts> rollouts_;
  int64_t total_steps_ = 0;
};

}  // namespace ossrl

// `ossrl train`'s configuration: one TOML file of flat `key = value` lines whose keys are the
// names TRL uses (GRPOConfig / SFTConfig, and ModelConfig's lora_* for the adapter), every one
// of which can also be given on the command line as `--key value` (the command line wins).
//
//   trainer = "grpo"                       # or "sft": next-token loss on the completion
//   model_name_or_path = "gpt-oss-20b/"
//   dataset = "train.jsonl"                # docs of the row format: train/dataset.h
//   eval_split = 0.1
//   learning_rate = 1e-5
//   num_generations = 8
//   per_device_train_batch_size = 8        # completions per micro-batch
//   rewards = ["exact_match", "format"]    # or [[rewards]] tables: rewards/reward.h
//   reward_weights = [1.0, 0.2]
//   lora_r = 16
//   lora_target_modules = ["q_proj", "k_proj", "v_proj", "o_proj"]
//
// Batches as TRL counts them on one device. One step is one optimiser update made of
// gradient_accumulation_steps micro-batches of per_device_train_batch_size completions. A
// generation batch is the completions of one step: per_device_train_batch_size *
// gradient_accumulation_steps of them, num_generations per prompt, so
// that / num_generations prompts; it is generated once and used for num_iterations steps.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "train/lora.h"

namespace ossrl {

struct TrainConfig {
  // ---- what and where
  std::string trainer = "grpo";      // "grpo" | "sft"
  std::string model_name_or_path;    // a checkpoint folder (config.json + *.safetensors)
  std::string tokenizer;             // o200k_harmony ranks; empty: Tokenizer::default_path()
  std::string output_dir = "ossrl-output";
  // A PEFT adapter folder to start from (e.g. an sft run's output_dir/adapter); its LoRA
  // config replaces the lora_* options.
  std::string adapter_name_or_path;
  // A checkpoint folder to continue from, or "latest" (the newest checkpoint-N in output_dir).
  std::string resume_from_checkpoint;

  // ---- data (rows: train/dataset.h)
  std::string dataset;        // training JSONL
  std::string eval_dataset;   // held-out JSONL; or eval_split of `dataset`
  double eval_split = 0.0;    // fraction of `dataset` held out (chosen by a seeded shuffle)
  bool system_message = true; // render Harmony's system message (model identity, effort)
  std::string reasoning_effort = "low";
  // Prefilled after `<|start|>assistant` in every prompt, e.g. "<|channel|>final<|message|>"
  // to skip reasoning. Rewards and the Harmony parser see it as part of the completion.
  std::string assistant_prefix;
  int max_prompt_length = 512;       // longer prompts keep their last tokens (TRL: left truncation)
  int max_completion_length = 256;

  // ---- sampling
  double temperature = 1.0;
  double top_p = 1.0;
  int top_k = 0;
  double min_p = 0.0;

  // ---- batches and steps
  int per_device_train_batch_size = 8;  // completions (sft: examples) per micro-batch
  int gradient_accumulation_steps = 1;
  int num_generations = 8;
  int per_device_eval_batch_size = 16;  // prompts per evaluation generate call
  int64_t max_steps = -1;               // > 0 wins over num_train_epochs
  double num_train_epochs = 1.0;
  int64_t logging_steps = 1;            // print a progress line every this many steps
  int64_t save_steps = 0;               // checkpoint every this many steps; 0: only at the end
  int64_t eval_steps = 0;               // evaluate every this many steps (and at 0 and the end); 0: never
  uint64_t seed = 42;

  // ---- GRPO
  double beta = 0.0;
  double epsilon = 0.2;
  std::optional<double> epsilon_high;
  std::string loss_type = "dapo";
  std::string scale_rewards = "group";
  int num_iterations = 1;
  bool mask_truncated_completions = false;
  // One entry per reward function: a type name or a table (rewards/reward.h, make_reward).
  nlohmann::json rewards = nlohmann::json::array();
  std::vector<double> reward_weights;

  // ---- optimiser and schedule
  std::optional<double> learning_rate;  // default: TRL's, 1e-6 for grpo and 2e-5 for sft
  std::string lr_scheduler_type = "linear";
  double warmup_ratio = 0.0;
  int64_t warmup_steps = 0;
  double weight_decay = 0.0;
  double adam_beta1 = 0.9;
  double adam_beta2 = 0.999;
  double adam_epsilon = 1e-8;
  double max_grad_norm = 1.0;

  // ---- adapter (lora_r, lora_alpha, lora_dropout, lora_target_modules, use_rslora,
  //      train_sinks, train_router); lora.seed is `seed`.
  LoraConfig lora;
  bool recompute_activations = false;

  // ---- device: "cpu" (the reference) or "cuda" (rollouts on the CUDA engine, log-probs and
  //      gradients on the GPU, AdamW on the host over the fp32 adapters it checkpoints).
  std::string device = "cpu";
  int rollout_batch_size = 0;  // cuda: sequences decoding at once (0: the whole generation batch)
  double kv_cache_gb = 0.0;    // cuda: KV cache of the rollouts in GiB (0: what rollout_batch_size needs)
  bool offload_embeddings = false;  // cuda: embed_tokens in host memory (1.08 GiB less on the GPU for gpt-oss)

  double lr() const { return learning_rate.value_or(trainer == "sft" ? 2e-5 : 1e-6); }
  // Completions generated per step (grpo) and the prompts they come from.
  int generation_batch_size() const { return per_device_train_batch_size * gradient_accumulation_steps; }
  int prompts_per_generation() const { return generation_batch_size() / num_generations; }

  // Throws an Error naming the option for anything out of range or inconsistent (a
  // generation batch that is not a multiple of num_generations, an unknown loss_type, ...).
  void validate() const;
  // Every option as a flat JSON object with its value (written beside the checkpoints).
  nlohmann::json to_json() const;
};

// Applies `key = value` lines of a TOML document (`source` names it in errors) onto config.
// Unknown keys and mistyped values are Errors naming the key.
void apply_toml(TrainConfig& config, const std::string& toml_text, const std::string& source);

// Applies command-line overrides: "--key value" or "--key=value" (dashes in key may be '-' or
// '_'); the value is read as a TOML value ("1e-5", "true", "[1.0, 0.5]", "\"text\"") and,
// where that fails, as a bare string. A bool key without a value means true.
void apply_overrides(TrainConfig& config, const std::vector<std::string>& args);

// The file (if any) then the overrides, validated.
TrainConfig load_train_config(const std::string& path, const std::vector<std::string>& overrides);

}  // namespace ossrl

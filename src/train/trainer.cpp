#include "train/trainer.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <limits>

#include "core/error.h"
#include "tokenizer/harmony.h"
#include "train/peft_adapter.h"
#if OSSRL_HAVE_CUDA
#include "cuda/device.h"
#include "engine/cuda_engine.h"
#include "train/cuda_lora.h"
#include "train/cuda_policy.h"
#endif

namespace ossrl {

namespace fs = std::filesystem;

namespace {

// Purposes of the trainer's random streams (train/dataset.h, mix_seed).
enum Stream : uint64_t { kDataStream = 1, kRolloutStream = 2, kEvalStream = 3 };

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// nanmean / Bessel nanstd of a column, as TRL's reward metrics.
// The metrics every update step reports: the optimiser's verdict, the learning rate, and the
// step's wall time and throughput (tokens generated and trained since `start`).
void add_step_report(nlohmann::json& row, const StepReport& report, double lr, Clock::time_point start,
                     int64_t tokens) {
  row["grad_norm"] = report.grad_norm;
  row["learning_rate"] = lr;
  row["skipped"] = !report.applied();
  if (!report.applied()) {
    row["skip_reason"] = report.status == StepStatus::skipped_nonfinite_loss ? "non-finite loss" : "non-finite gradient";
  }
  const double seconds = seconds_since(start);
  row["step_time"] = seconds;
  row["tokens_per_second"] = double(tokens) / seconds;
}

std::pair<double, double> nan_mean_std(const std::vector<double>& values) {
  double sum = 0, n = 0;
  for (double v : values) {
    if (!std::isnan(v)) sum += v, n += 1;
  }
  if (n == 0) return {NAN, NAN};
  const double mean = sum / n;
  double ss = 0;
  for (double v : values) {
    if (!std::isnan(v)) ss += (v - mean) * (v - mean);
  }
  return {mean, n > 1 ? std::sqrt(ss / (n - 1)) : NAN};
}

// A ragged batch of prompt + completion sequences and where each completion starts.
struct SequenceBatch {
  std::vector<int32_t> tokens, offsets{0};
  std::vector<int32_t> lengths;        // [B] completion tokens
  std::vector<size_t> completion_at;   // [B] index in tokens of each completion's first token

  void add(const std::vector<int32_t>& prompt, const std::vector<int32_t>& completion) {
    tokens.insert(tokens.end(), prompt.begin(), prompt.end());
    completion_at.push_back(tokens.size());
    tokens.insert(tokens.end(), completion.begin(), completion.end());
    offsets.push_back(int32_t(tokens.size()));
    lengths.push_back(int32_t(completion.size()));
  }
  // The per-token values of the completions, concatenated ([sum of lengths]).
  std::vector<float> gather(const std::vector<float>& per_token) const {
    std::vector<float> out;
    for (size_t b = 0; b < lengths.size(); ++b) {
      out.insert(out.end(), per_token.begin() + ptrdiff_t(completion_at[b]),
                 per_token.begin() + ptrdiff_t(completion_at[b] + size_t(lengths[b])));
    }
    return out;
  }
  // The inverse: completion values [sum of lengths] into a [tokens] array, 0 elsewhere.
  std::vector<float> scatter(const std::vector<float>& per_completion_token) const {
    std::vector<float> out(tokens.size(), 0.0f);
    size_t i = 0;
    for (size_t b = 0; b < lengths.size(); ++b) {
      for (int32_t t = 0; t < lengths[b]; ++t) out[completion_at[b] + size_t(t)] = per_completion_token[i++];
    }
    return out;
  }
};

// The log-probs of the completion tokens only: the policy computes the lm_head just where
// they are needed (the prompt's tokens have no log-prob to pay for).
std::vector<uint8_t> completion_mask(const SequenceBatch& batch) {
  std::vector<uint8_t> mask(batch.tokens.size(), 0);
  for (size_t b = 0; b < batch.lengths.size(); ++b) {
    std::fill_n(mask.begin() + ptrdiff_t(batch.completion_at[b]), batch.lengths[b], uint8_t{1});
  }
  return mask;
}

template <typename T>
std::vector<T> slice(const std::vector<T>& v, size_t begin, size_t count) {
  return std::vector<T>(v.begin() + ptrdiff_t(begin), v.begin() + ptrdiff_t(begin + count));
}

}  // namespace

// ---- Rollouts ----------------------------------------------------------------------------

nlohmann::json Rollouts::to_json() const {
  return {{"prompts", prompts},   {"completions", completions}, {"old_logp", old_logp}, {"ref_logp", ref_logp},
          {"truncated", truncated}, {"advantages", advantages},   {"metrics", metrics}};
}

Rollouts Rollouts::from_json(const nlohmann::json& j) {
  Rollouts r;
  j.at("prompts").get_to(r.prompts);
  j.at("completions").get_to(r.completions);
  j.at("old_logp").get_to(r.old_logp);
  j.at("ref_logp").get_to(r.ref_logp);
  j.at("truncated").get_to(r.truncated);
  j.at("advantages").get_to(r.advantages);
  r.metrics = j.at("metrics");
  return r;
}

// ---- Trainer -----------------------------------------------------------------------------

#if OSSRL_HAVE_CUDA
struct Trainer::Gpu {
  std::unique_ptr<CudaModel> model;
  std::unique_ptr<DeviceLora> lora;  // bf16 copies; the fp32 values and grads are the host Lora's
  std::unique_ptr<CudaPolicy> policy;
  int policy_tokens = 0;
};
#else
struct Trainer::Gpu {};
#endif

Trainer::Trainer(TrainConfig config, std::vector<std::unique_ptr<RewardFunction>> rewards)
    : config_(std::move(config)), rewards_(std::move(rewards)) {
  config_.lora.seed = config_.seed;
  config_.validate();
  tokenizer_ = Tokenizer::load(config_.tokenizer.empty() ? Tokenizer::default_path() : config_.tokenizer);
  model_ = std::make_unique<CpuModel>(config_.model_name_or_path);
  if (!config_.adapter_name_or_path.empty()) {
    lora_ = std::make_unique<Lora>(load_peft_adapter(model_->config(), model_->weights(), config_.adapter_name_or_path));
    const uint64_t seed = config_.lora.seed;
    config_.lora = lora_->config();
    config_.lora.seed = seed;
  } else {
    lora_ = std::make_unique<Lora>(model_->config(), model_->weights(), config_.lora);
  }
  policy_ = std::make_unique<Policy>(*model_, lora_.get(), PolicyOptions{config_.recompute_activations});
  if (config_.device == "cuda") {
#if OSSRL_HAVE_CUDA
    OSSRL_CHECK(cuda::device_count() > 0, "device = \"cuda\": no GPU on this machine");
    gpu_ = std::make_unique<Gpu>();  // the adapters go up once the run's are known (below)
    gpu_->model = CudaModel::load(config_.model_name_or_path, {.offload_embeddings = config_.offload_embeddings});
    gpu_->lora = std::make_unique<DeviceLora>(gpu_->model->weights(), *lora_);
    // The largest micro-batch: its activations must fit beside the weights and the adapters.
    const int tokens = config_.per_device_train_batch_size * (config_.max_prompt_length + config_.max_completion_length);
    CudaPolicyOptions options;
    options.max_tokens = tokens;
    options.recompute_activations = config_.recompute_activations;
    const size_t needed =
        CudaPolicy::bytes(model_->config(), lora_->config().r, gpu_->model->weights().mxfp4_experts(), options);
    const size_t free_bytes = cuda::memory_free();
    constexpr double kGiB = double(1 << 30);
    fmt::print(stderr, "{}: weights {:.2f} GiB, adapters (bf16 copies, one layer of fp32 grads) {:.2f} GiB, training "
               "activations for {} tokens {:.2f} GiB, {:.2f} GiB free for them and the rollouts' KV cache\n",
               cuda::device_summary(0), double(gpu_->model->memory_plan().weights) / kGiB,
               double(gpu_->lora->bytes()) / kGiB, tokens, double(needed) / kGiB, double(free_bytes) / kGiB);
    OSSRL_CHECK(needed <= free_bytes,
                "device = \"cuda\": micro-batches of {} x ({} + {}) tokens need {:.2f} GiB of activations, but only "
                "{:.2f} GiB is free after the weights and adapters; lower per_device_train_batch_size or the lengths",
                config_.per_device_train_batch_size, config_.max_prompt_length, config_.max_completion_length,
                double(needed) / kGiB, double(free_bytes) / kGiB);
#else
    fail("device = \"cuda\": this ossrl was built without CUDA");
#endif
  }
  optimizer_ = std::make_unique<AdamW>(
      AdamWConfig{config_.adam_beta1, config_.adam_beta2, config_.adam_epsilon, config_.weight_decay},
      param_spans(lora_->parameters()));
  if (rewards_.empty()) {
    for (const nlohmann::json& spec : config_.rewards) rewards_.push_back(make_reward(spec));
  }

  const bool sft = config_.trainer == "sft";
  const PromptFormat format{config_.system_message, harmony::parse_effort(config_.reasoning_effort),
                            config_.assistant_prefix, config_.max_prompt_length};
  std::vector<Example> all = load_dataset(config_.dataset, *tokenizer_, format, sft);
  if (!config_.eval_dataset.empty()) {
    train_ = std::move(all);
    eval_ = load_dataset(config_.eval_dataset, *tokenizer_, format, false);
  } else {
    DatasetSplit split = split_dataset(std::move(all), config_.eval_split, config_.seed);
    train_ = std::move(split.train);
    eval_ = std::move(split.eval);
  }
  order_ = std::make_unique<DataOrder>(train_.size(), mix_seed({config_.seed, kDataStream}));

  // Steps per epoch: each generation batch (grpo) or step (sft) draws this many examples.
  const int64_t draws = sft ? int64_t(config_.generation_batch_size()) : int64_t(config_.prompts_per_generation());
  const int64_t batches_per_epoch = (int64_t(train_.size()) + draws - 1) / draws;
  const int64_t steps_per_epoch = batches_per_epoch * (sft ? 1 : config_.num_iterations);
  total_steps_ = config_.max_steps > 0 ? config_.max_steps
                                       : int64_t(std::ceil(config_.num_train_epochs * double(steps_per_epoch)));
  schedule_ = std::make_unique<LrSchedule>(
      LrScheduleConfig{parse_lr_schedule(config_.lr_scheduler_type), config_.warmup_steps, config_.warmup_ratio},
      config_.lr(), total_steps_);

  state_.config = config_.to_json();
  if (!config_.resume_from_checkpoint.empty()) {
    std::string dir = config_.resume_from_checkpoint;
    if (dir == "latest") {
      const std::optional<std::string> latest = latest_checkpoint(config_.output_dir);
      OSSRL_CHECK(latest.has_value(), "resume_from_checkpoint = \"latest\": no checkpoint-N in {}", config_.output_dir);
      dir = *latest;
    }
    TrainerState loaded = load_checkpoint(dir, *lora_, *optimizer_);
    state_.global_step = loaded.global_step;
    state_.data_position = loaded.data_position;
    if (!loaded.rollouts.is_null()) rollouts_ = Rollouts::from_json(loaded.rollouts);
    OSSRL_CHECK(state_.global_step <= total_steps_, "{} is at step {}, past the run's {} steps", dir,
                state_.global_step, total_steps_);
  }
#if OSSRL_HAVE_CUDA
  if (gpu_) gpu_->lora->upload(*lora_);  // the initial (or resumed) adapters
#endif
  fs::create_directories(config_.output_dir);
  write_file_atomic((fs::path(config_.output_dir) / "train_config.json").string(), state_.config.dump(1) + "\n");
  metrics_ = std::make_unique<MetricsLog>((fs::path(config_.output_dir) / "metrics.jsonl").string(),
                                          config_.resume_from_checkpoint.empty() ? -1 : state_.global_step);
}

Trainer::~Trainer() = default;

void Trainer::write_row(nlohmann::json row) {
  metrics_->write(row);
  if (on_row) on_row(row);
}

TrainablePolicy& Trainer::update_policy(int tokens) {
#if OSSRL_HAVE_CUDA
  if (gpu_) {
    if (!gpu_->policy || gpu_->policy_tokens < tokens) {
      gpu_->policy.reset();
      CudaPolicyOptions options;
      options.max_tokens = std::max(tokens, config_.per_device_train_batch_size *
                                                (config_.max_prompt_length + config_.max_completion_length));
      options.recompute_activations = config_.recompute_activations;
      gpu_->policy = std::make_unique<CudaPolicy>(*gpu_->model, gpu_->lora.get(), options);
      gpu_->policy_tokens = options.max_tokens;
    }
    gpu_->policy->set_adapters_enabled(lora_->adapters_enabled());
    return *gpu_->policy;
  }
#endif
  (void)tokens;
  return *policy_;
}

void Trainer::release_gpu_policy() {
#if OSSRL_HAVE_CUDA
  if (gpu_) gpu_->policy.reset();
#endif
}

StepReport Trainer::optimizer_step(double lr, double loss) {
  // On cuda the backward has added the grads into the host Lora layer by layer.
  const StepReport report = optimizer_->step(lr, config_.max_grad_norm, loss);
#if OSSRL_HAVE_CUDA
  if (gpu_ && report.applied()) gpu_->lora->upload(*lora_);
#endif
  return report;
}

std::vector<Generation> Trainer::generate_with_policy(const std::vector<std::vector<int32_t>>& prompts,
                                                      const SamplingParams& sampling, uint64_t seed) {
  GenerateOptions options;
  options.sampling = sampling;
  options.max_new_tokens = config_.max_completion_length;
  options.stop_tokens = {harmony_tokens::kReturn, harmony_tokens::kCall};
  options.seed = seed;
#if OSSRL_HAVE_CUDA
  if (gpu_) {
    // The update phase's activations make room for the KV cache, which goes when the engine does.
    release_gpu_policy();
    gpu_->model->set_adapters(lora_->adapters_enabled() ? gpu_->lora->layers()
                                                        : std::span<const cuda::DeviceLayerAdapters>{});
    EngineOptions engine;
    engine.max_batch = config_.rollout_batch_size > 0 ? std::min<int>(config_.rollout_batch_size, int(prompts.size()))
                                                      : int(prompts.size());
    int longest = 0;
    for (const auto& p : prompts) longest = std::max(longest, int(p.size()));
    engine.max_sequence_length = longest + config_.max_completion_length;
    engine.kv_cache_gb = config_.kv_cache_gb;
    // Prompt tokens per step: the workspace scales with it, and GRPO's prompts are few (each
    // group's prompt is prefilled once), so a small chunk costs no time and saves memory.
    engine.prefill_chunk = 2048;
    if (config_.kv_cache_gb == 0.0) {  // what max_batch sequences of the longest length need
      engine.kv_pages = engine.max_batch * ((engine.max_sequence_length + engine.page_size - 1) / engine.page_size);
    }
    CudaEngine rollout(*gpu_->model, engine);
    return rollout.generate(prompts, options);
  }
#endif
  std::vector<const LayerAdapters*> adapters;
  if (lora_->adapters_enabled()) {
    lora_->set_dropout(false, 0);  // rollouts sample the policy itself, never a dropped-out one
    for (int l = 0; l < model_->config().num_hidden_layers; ++l) adapters.push_back(lora_->layer(l));
  }
  return generate(*model_, prompts, options, adapters);
}

std::vector<std::vector<double>> Trainer::score(const std::vector<const Example*>& examples,
                                                const std::vector<std::vector<int32_t>>& completions,
                                                const std::vector<uint8_t>& truncated) {
  std::vector<RewardInput> inputs(examples.size());
  for (size_t i = 0; i < examples.size(); ++i) {
    RewardInput& in = inputs[i];
    in.prompt = examples[i]->prompt_text;
    // The parser and the rewards read the assistant's text after `<|start|>assistant`, which
    // begins with the prefilled prefix.
    in.completion = config_.assistant_prefix + tokenizer_->decode(completions[i]);
    const harmony::ParsedCompletion parsed = harmony::parse_completion_text(in.completion);
    in.final_answer = parsed.final_answer;
    in.well_formed = parsed.well_formed;
    in.truncated = truncated[i] != 0;
    in.completion_tokens = int(completions[i].size());
    in.fields = examples[i]->fields;
  }
  std::vector<std::vector<double>> out;
  for (const auto& fn : rewards_) {
    out.push_back(fn->score(inputs));
    OSSRL_CHECK(out.back().size() == inputs.size(), "reward '{}' returned {} rewards for {} completions",
                fn->name(), out.back().size(), inputs.size());
  }
  return out;
}

Rollouts Trainer::make_rollouts() {
  const int G = config_.num_generations;
  const int P = config_.prompts_per_generation();
  std::vector<const Example*> examples;
  Rollouts r;
  for (int p = 0; p < P; ++p) {
    const Example& e = train_[order_->at(state_.data_position + p)];
    for (int g = 0; g < G; ++g) {
      examples.push_back(&e);
      r.prompts.push_back(e.prompt);
    }
  }
  state_.data_position += P;

  const SamplingParams sampling{float(config_.temperature), config_.top_k, float(config_.top_p), float(config_.min_p)};
  const std::vector<Generation> gens =
      generate_with_policy(r.prompts, sampling, mix_seed({config_.seed, kRolloutStream, uint64_t(state_.global_step)}));
  for (const Generation& g : gens) {
    r.completions.push_back(g.tokens);
    r.old_logp.push_back(g.logprobs);
    r.truncated.push_back(g.stopped ? 0 : 1);
  }

  const std::vector<std::vector<double>> per_func = score(examples, r.completions, r.truncated);
  const Advantages adv = compute_advantages(
      AdvantageConfig{G, parse_scale_rewards(config_.scale_rewards), config_.reward_weights}, per_func);
  r.advantages = adv.advantages;

  nlohmann::json& m = r.metrics;
  m["reward"] = adv.metrics.reward;
  m["reward_std"] = adv.metrics.reward_std;
  m["frac_reward_zero_std"] = adv.metrics.frac_reward_zero_std;
  for (size_t f = 0; f < rewards_.size(); ++f) {
    m["rewards/" + rewards_[f]->name() + "/mean"] = adv.metrics.func_mean[f];
    m["rewards/" + rewards_[f]->name() + "/std"] = adv.metrics.func_std[f];
  }
  double sum = 0, lo = 1e300, hi = 0, clipped = 0;
  for (size_t i = 0; i < r.completions.size(); ++i) {
    const double n = double(r.completions[i].size());
    sum += n, lo = std::min(lo, n), hi = std::max(hi, n), clipped += r.truncated[i];
  }
  const double B = double(r.completions.size());
  m["completions/mean_length"] = sum / B;
  m["completions/min_length"] = lo;
  m["completions/max_length"] = hi;
  m["completions/clipped_ratio"] = clipped / B;

  // The reference policy is the base model: the same weights with the adapters off.
  if (config_.beta != 0.0) {
    lora_->set_adapters_enabled(false);
    const size_t mb = size_t(config_.per_device_train_batch_size);
    for (size_t b0 = 0; b0 < r.completions.size(); b0 += mb) {
      SequenceBatch batch;
      for (size_t b = b0; b < std::min(r.completions.size(), b0 + mb); ++b) batch.add(r.prompts[b], r.completions[b]);
      const PolicyOutput out = update_policy(int(batch.tokens.size())).forward(
          batch.tokens, batch.offsets, {.keep_activations = false, .apply_dropout = false, .score_mask = completion_mask(batch)});
      const std::vector<float> logp = batch.gather(out.log_probs);
      size_t i = 0;
      for (int32_t len : batch.lengths) {
        r.ref_logp.push_back(slice(logp, i, size_t(len)));
        i += size_t(len);
      }
    }
    lora_->set_adapters_enabled(true);
  }
  return r;
}

nlohmann::json Trainer::grpo_step() {
  const auto start = Clock::now();
  int64_t generated_tokens = 0;
  if (state_.global_step % config_.num_iterations == 0) {
    rollouts_ = make_rollouts();
    for (const auto& c : rollouts_->completions) generated_tokens += int64_t(c.size());
  }
  OSSRL_CHECK(rollouts_.has_value(), "step {} reuses a generation batch the checkpoint did not hold",
              state_.global_step);
  const Rollouts& r = *rollouts_;

  GrpoLossConfig loss_config;
  loss_config.loss_type = parse_loss_type(config_.loss_type);
  loss_config.epsilon = config_.epsilon;
  loss_config.epsilon_high = config_.epsilon_high;
  loss_config.beta = config_.beta;
  loss_config.max_completion_length = config_.max_completion_length;
  loss_config.gradient_accumulation_steps = config_.gradient_accumulation_steps;
  loss_config.mask_truncated_completions = config_.mask_truncated_completions;

  const size_t mb = size_t(config_.per_device_train_batch_size);
  const size_t GA = size_t(config_.gradient_accumulation_steps);
  std::vector<int32_t> all_lengths;
  for (const auto& c : r.completions) all_lengths.push_back(int32_t(c.size()));
  const int64_t num_items = count_loss_tokens(loss_config, all_lengths, {}, r.truncated);

  std::vector<SequenceBatch> micro(GA);
  int longest = 0;
  for (size_t k = 0; k < GA; ++k) {
    for (size_t b = k * mb; b < (k + 1) * mb; ++b) micro[k].add(r.prompts[b], r.completions[b]);
    longest = std::max(longest, int(micro[k].tokens.size()));
  }
  TrainablePolicy& policy = update_policy(longest);
  policy.zero_grad();
  double step_loss = 0;
  int64_t trained_tokens = 0, active = 0;
  double kl = 0, entropy = 0, low = 0, high = 0, region = 0;
  double low_min = std::numeric_limits<double>::infinity(), high_max = -std::numeric_limits<double>::infinity();
  for (size_t k = 0; k < GA; ++k) {
    const size_t b0 = k * mb;
    const SequenceBatch& batch = micro[k];
    trained_tokens += int64_t(batch.tokens.size());
    const PolicyOutput out = policy.forward(
        batch.tokens, batch.offsets,
        {.keep_activations = true, .entropy = true, .apply_dropout = true,
         .dropout_step = uint64_t(state_.global_step) * GA + k, .score_mask = completion_mask(batch)});
    const std::vector<float> logp = batch.gather(out.log_probs);
    const std::vector<float> ent = batch.gather(out.entropy);
    std::vector<float> old_logp, ref_logp;
    for (size_t b = b0; b < b0 + mb; ++b) {
      if (config_.num_iterations > 1) old_logp.insert(old_logp.end(), r.old_logp[b].begin(), r.old_logp[b].end());
      if (config_.beta != 0.0) ref_logp.insert(ref_logp.end(), r.ref_logp[b].begin(), r.ref_logp[b].end());
    }
    const std::vector<float> advantages = slice(r.advantages, b0, mb);
    const std::vector<uint8_t> truncated = slice(r.truncated, b0, mb);
    GrpoBatch<float> gb;
    gb.lengths = batch.lengths;
    gb.logp = logp;
    gb.old_logp = old_logp;
    gb.ref_logp = ref_logp;
    gb.advantages = advantages;
    gb.truncated = truncated;
    gb.entropy = ent;
    gb.num_items_in_batch = num_items;
    std::vector<float> dlogp(logp.size());
    const GrpoLoss loss = grpo_loss(loss_config, gb, std::span<float>(dlogp));
    policy.backward(batch.scatter(dlogp));
    step_loss += loss.loss;

    // Token-weighted means over the micro-batches, as TRL's per-step averages.
    const GrpoLossMetrics& lm = loss.metrics;
    const double w = double(lm.num_tokens);
    active += lm.num_tokens;
    kl += w * lm.kl.value_or(0);
    entropy += w * lm.entropy.value_or(0);
    low += w * lm.clip_ratio_low_mean;
    high += w * lm.clip_ratio_high_mean;
    region += w * lm.clip_ratio_region_mean;
    if (lm.num_tokens > 0) {
      low_min = std::min(low_min, lm.clip_ratio_low_min);
      high_max = std::max(high_max, lm.clip_ratio_high_max);
    }
  }
  const double lr = schedule_->lr(state_.global_step);
  const StepReport report = optimizer_step(lr, step_loss);
  ++state_.global_step;

  nlohmann::json row = r.metrics;
  const double denom = std::max<double>(1.0, double(active));
  row["loss"] = step_loss;
  if (config_.beta != 0.0) row["kl"] = kl / denom;
  row["entropy"] = entropy / denom;
  row["clip_ratio/low_mean"] = low / denom;
  row["clip_ratio/high_mean"] = high / denom;
  row["clip_ratio/region_mean"] = region / denom;
  row["clip_ratio/low_min"] = active > 0 ? low_min : 0.0;
  row["clip_ratio/high_max"] = active > 0 ? high_max : 0.0;
  add_step_report(row, report, lr, start, generated_tokens + trained_tokens);
  return row;
}

nlohmann::json Trainer::sft_step() {
  const auto start = Clock::now();
  const size_t mb = size_t(config_.per_device_train_batch_size);
  const size_t GA = size_t(config_.gradient_accumulation_steps);
  std::vector<const Example*> examples;
  for (size_t i = 0; i < mb * GA; ++i) examples.push_back(&train_[order_->at(state_.data_position + int64_t(i))]);
  state_.data_position += int64_t(mb * GA);
  int64_t num_items = 0;
  for (const Example* e : examples) num_items += int64_t(e->completion.size());

  std::vector<SequenceBatch> micro(GA);
  int longest = 0;
  for (size_t k = 0; k < GA; ++k) {
    for (size_t i = k * mb; i < (k + 1) * mb; ++i) micro[k].add(examples[i]->prompt, examples[i]->completion);
    longest = std::max(longest, int(micro[k].tokens.size()));
  }
  TrainablePolicy& policy = update_policy(longest);
  policy.zero_grad();
  double step_loss = 0;
  int64_t trained_tokens = 0;
  for (size_t k = 0; k < GA; ++k) {
    const SequenceBatch& batch = micro[k];
    trained_tokens += int64_t(batch.tokens.size());
    const PolicyOutput out = policy.forward(
        batch.tokens, batch.offsets,
        {.keep_activations = true, .apply_dropout = true, .dropout_step = uint64_t(state_.global_step) * GA + k,
         .score_mask = completion_mask(batch)});
    const std::vector<float> logp = batch.gather(out.log_probs);
    const std::vector<uint8_t> mask(logp.size(), 1);
    std::vector<float> dlogp(logp.size());
    step_loss += sft_loss<float>(logp, mask, num_items, dlogp);
    policy.backward(batch.scatter(dlogp));
  }
  const double lr = schedule_->lr(state_.global_step);
  const StepReport report = optimizer_step(lr, step_loss);
  ++state_.global_step;

  nlohmann::json row;
  row["loss"] = step_loss;
  row["num_tokens"] = num_items;
  add_step_report(row, report, lr, start, trained_tokens);
  return row;
}

nlohmann::json Trainer::step() {
  OSSRL_CHECK(state_.global_step < total_steps_, "the run is complete ({} steps)", total_steps_);
  nlohmann::json row = config_.trainer == "sft" ? sft_step() : grpo_step();
  nlohmann::json out = {{"step", state_.global_step},
                        {"epoch", double(state_.data_position) / double(train_.size())}};
  out.update(row);
  write_row(out);
  return out;
}

EvalResult Trainer::evaluate() {
  OSSRL_CHECK(!eval_.empty(), "no evaluation data: set eval_dataset or eval_split");
  OSSRL_CHECK(!rewards_.empty(), "evaluation needs at least one reward function");
  const auto start = Clock::now();
  // Greedy: the policy's best answer, no sampling noise (temperature 0 ignores the seed).
  const SamplingParams greedy{0.0f, 0, 1.0f, 0.0f};
  EvalResult result;
  std::vector<std::vector<double>> per_func(rewards_.size());
  double length = 0;
  const size_t bs = size_t(config_.per_device_eval_batch_size);
  for (size_t i0 = 0; i0 < eval_.size(); i0 += bs) {
    std::vector<const Example*> examples;
    std::vector<std::vector<int32_t>> prompts, completions;
    std::vector<uint8_t> truncated;
    for (size_t i = i0; i < std::min(eval_.size(), i0 + bs); ++i) {
      examples.push_back(&eval_[i]);
      prompts.push_back(eval_[i].prompt);
    }
    for (const Generation& g : generate_with_policy(prompts, greedy, mix_seed({config_.seed, kEvalStream}))) {
      completions.push_back(g.tokens);
      truncated.push_back(g.stopped ? 0 : 1);
      length += double(g.tokens.size());
      result.completions.push_back(tokenizer_->decode(g.tokens));
    }
    const std::vector<std::vector<double>> scores = score(examples, completions, truncated);
    for (size_t f = 0; f < scores.size(); ++f) per_func[f].insert(per_func[f].end(), scores[f].begin(), scores[f].end());
  }
  // The weighted sum per completion, NaN where no function scored it (as compute_advantages).
  std::vector<double> total(eval_.size(), 0.0);
  std::vector<uint8_t> scored(eval_.size(), 0);
  nlohmann::json& m = result.metrics;
  m["step"] = state_.global_step;
  for (size_t f = 0; f < rewards_.size(); ++f) {
    const double w = config_.reward_weights.empty() ? 1.0 : config_.reward_weights[f];
    for (size_t i = 0; i < eval_.size(); ++i) {
      if (std::isnan(per_func[f][i])) continue;
      total[i] += w * per_func[f][i];
      scored[i] = 1;
    }
    m["eval_rewards/" + rewards_[f]->name() + "/mean"] = nan_mean_std(per_func[f]).first;
  }
  for (size_t i = 0; i < eval_.size(); ++i) {
    if (!scored[i]) total[i] = NAN;
  }
  const auto [mean, sd] = nan_mean_std(total);
  m["eval_reward"] = mean;
  m["eval_reward_std"] = sd;
  m["eval_completions/mean_length"] = length / double(eval_.size());
  m["eval_time"] = seconds_since(start);
  return result;
}

void Trainer::save(const std::string& dir) const {
  TrainerState state = state_;
  // A generation batch still to be reused travels with the checkpoint.
  if (rollouts_ && state_.global_step % config_.num_iterations != 0) state.rollouts = rollouts_->to_json();
  save_checkpoint(dir, state, *lora_, *optimizer_, config_.model_name_or_path);
}

void Trainer::train() {
  const bool can_eval = config_.eval_steps > 0 && !eval_.empty() && !rewards_.empty();
  if (can_eval && state_.global_step == 0) write_row(evaluate().metrics);
  while (state_.global_step < total_steps_) {
    step();
    const int64_t s = state_.global_step;
    const bool last = s == total_steps_;
    if (can_eval && (s % config_.eval_steps == 0 || last)) write_row(evaluate().metrics);
    if ((config_.save_steps > 0 && s % config_.save_steps == 0) || last) save(checkpoint_dir(config_.output_dir, s));
  }
  save_peft_adapter(*lora_, (fs::path(config_.output_dir) / "adapter").string(), config_.model_name_or_path);
}

}  // namespace ossrl

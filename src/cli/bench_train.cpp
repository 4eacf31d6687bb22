// `ossrl bench train`: the GPU training path on a model of the gpt-oss-20b or -120b shape with
// random weights (no checkpoint needed).
//  - Update mode (default): the time of an update step — forward with the log-probs of every
//    token, backward into the LoRA grads, AdamW — on a batch of whole sequences, next to the
//    bf16 tensor-core roofline: what scripts/bench/train_vs_peft.sh compares with PEFT.
//  - --grpo: whole GRPO steps as the trainer runs them on the GPU: rollouts of prompts x
//    num_generations completions from the CUDA engine with the adapters (the KV cache lives
//    only for them), then the update in micro-batches (the policy's activations live only
//    for it), AdamW; tokens/s of each phase and the peak GPU memory of the step.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <chrono>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "core/error.h"
#include "cuda/device.h"
#include "engine/cuda_engine.h"
#include "engine/cuda_model.h"
#include "engine/sampling.h"
#include "train/cuda_lora.h"
#include "train/cuda_optimizer.h"
#include "train/cuda_policy.h"
#include "train/optimizer.h"

namespace ossrl::cli {

namespace {

constexpr double kGiB = double(1 << 30);
// H100 SXM's dense bf16 tensor-core peak, as the roofline assumes it.
constexpr double kBf16Flops = 790e12;

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

struct TrainBenchArgs {
  std::string model = "20b";
  std::string experts = "mxfp4";
  int lora_r = 16;
  std::vector<std::string> targets = {"attention", "experts"};
  bool train_sinks = false;
  std::string optimizer = "device";  // where AdamW's state lives: device | host
  bool offload_embeddings = false;
  bool recompute = true;  // activation recomputation in backward
  int moe_chunk_tokens = 4096;
  double moe_stage_gb = 0.25;
  double lm_head_workspace_gb = 0.25;
  int warmup = 1;
  int steps = 3;
  uint64_t seed = 0;
  std::string json_path;
  // Update mode.
  int batch = 4;
  int seq_len = 1024;
  int micro_batch_tokens = 0;  // 0: the whole batch in one forward
  // GRPO mode.
  bool grpo = false;
  int prompts = 8;
  int num_generations = 8;
  int prompt_tokens = 128;
  int completion_tokens = 512;
  int rollout_batch = 0;   // sequences decoding at once (0: all)
  int micro_batch = 8;     // sequences per forward/backward
};

// PEFT module names for the --targets list: "attention" stands for q, k, v and o.
std::vector<std::string> target_modules(const std::vector<std::string>& targets) {
  std::vector<std::string> modules;
  for (const std::string& t : targets) {
    if (t == "attention") {
      for (const char* m : {"q_proj", "k_proj", "v_proj", "o_proj"}) modules.push_back(m);
    } else {
      modules.push_back(t);
    }
  }
  return modules;
}

// Multiply-adds of one token through the frozen matmuls of the forward (attention projections,
// routed experts, router, lm_head) plus its attention scores and values over `context`
// positions (sliding layers at most the window), as FLOPs.
double forward_flops_per_token(const GptOssConfig& c, double context) {
  const double hidden = c.hidden_size, q_dim = double(c.num_attention_heads) * c.head_dim;
  const double kv_dim = double(c.num_key_value_heads) * c.head_dim;
  const double experts = double(c.experts_per_token) * (3.0 * hidden * c.intermediate_size);
  double macs = 0;
  for (AttentionType type : c.layer_types) {
    const double visible = type == AttentionType::Sliding ? std::min(context, double(c.sliding_window)) : context;
    macs += hidden * (q_dim + 2 * kv_dim) + q_dim * hidden + hidden * c.num_local_experts + experts +
            2.0 * visible * q_dim;
  }
  macs += hidden * double(c.vocab_size);
  return 2.0 * macs;
}

// The adapters and their optimizer, with AdamW's state on the device or on the host.
class Adapters {
 public:
  Adapters(const CudaModel& model, const LoraConfig& config, bool host_optimizer) {
    if (!host_optimizer) {
      device_ = std::make_unique<DeviceLora>(model.weights(), config);
      device_adamw_ = std::make_unique<DeviceAdamW>(*device_, AdamWConfig{});
      return;
    }
    host_ = std::make_unique<Lora>(model.config(), config);
    if (config.train_sinks) {  // the checkpoint's sinks, from the GPU copy
      for (Parameter& p : host_->parameters()) {
        if (p.kind != Parameter::Kind::Sinks) continue;
        OSSRL_CUDA_CHECK(cudaMemcpy(p.data.data(), model.weights().layers[size_t(p.layer)].sinks.data(),
                                    p.data.size() * sizeof(float), cudaMemcpyDeviceToHost));
      }
    }
    device_ = std::make_unique<DeviceLora>(model.weights(), *host_);
    host_adamw_ = std::make_unique<AdamW>(AdamWConfig{}, param_spans(host_->parameters()));
  }
  DeviceLora& device() { return *device_; }
  StepReport step(double lr, double max_grad_norm, double loss) {
    if (device_adamw_) return device_adamw_->step(lr, max_grad_norm, loss);
    const StepReport report = host_adamw_->step(lr, max_grad_norm, loss);
    device_->upload(*host_);
    return report;
  }
  // Values a person would count (the flat device buffers also hold alignment padding).
  int64_t trainable() const { return host_ ? host_->numel() : int64_t(device_->numel()); }

 private:
  std::unique_ptr<Lora> host_;
  std::unique_ptr<DeviceLora> device_;
  std::unique_ptr<DeviceAdamW> device_adamw_;
  std::unique_ptr<AdamW> host_adamw_;
};

std::vector<int32_t> random_tokens(size_t n, int vocab, uint64_t seed, uint64_t stream) {
  std::vector<int32_t> out(n);
  SamplingRng rng(seed, stream);
  for (int32_t& t : out) t = int32_t(rng.next() * vocab);
  return out;
}

struct Timing {
  double rollout_s = 0, forward_s = 0, backward_s = 0, optimizer_s = 0;
  int64_t rollout_tokens = 0, update_tokens = 0;
  size_t peak = 0;          // of the update phase
  size_t rollout_peak = 0;  // of the rollout phase
  void add(const Timing& t) {
    rollout_s += t.rollout_s, forward_s += t.forward_s, backward_s += t.backward_s, optimizer_s += t.optimizer_s;
    rollout_tokens += t.rollout_tokens, update_tokens += t.update_tokens;
  }
};

// One forward + backward of each micro-batch of `sequences` (whole sequences; scored from
// score_from[i] on), dlogp a GRPO-like ±1/tokens per sequence.
void update(CudaPolicy& policy, const std::vector<std::vector<int32_t>>& sequences, const std::vector<int>& score_from,
            int micro_batch, Timing& t) {
  policy.zero_grad();
  int64_t scored = 0;
  for (size_t i = 0; i < sequences.size(); ++i) scored += int64_t(sequences[i].size()) - score_from[i];
  for (size_t first = 0; first < sequences.size(); first += size_t(micro_batch)) {
    std::vector<int32_t> tokens, offsets{0};
    std::vector<uint8_t> mask;
    std::vector<float> dlogp;
    for (size_t i = first; i < std::min(sequences.size(), first + size_t(micro_batch)); ++i) {
      tokens.insert(tokens.end(), sequences[i].begin(), sequences[i].end());
      offsets.push_back(int32_t(tokens.size()));
      for (size_t j = 0; j < sequences[i].size(); ++j) {
        const bool completion = int(j) >= score_from[i];
        mask.push_back(completion ? 1 : 0);
        dlogp.push_back(completion ? (i % 2 ? 1.0f : -1.0f) / float(scored) : 0.0f);
      }
    }
    auto t0 = Clock::now();
    PolicyForward options;
    options.score_mask = mask;
    (void)policy.forward(tokens, offsets, options);
    t.forward_s += seconds_since(t0);
    t0 = Clock::now();
    policy.backward(dlogp);
    t.backward_s += seconds_since(t0);
    t.update_tokens += int64_t(tokens.size());
    t.peak = std::max(t.peak, cuda::memory_in_use());
  }
}

void run(const TrainBenchArgs& args) {
  OSSRL_CHECK(cuda::device_count() > 0, "bench train: no GPU on this machine");
  const GptOssConfig config = args.model == "120b" ? GptOssConfig::gpt_oss_120b() : GptOssConfig::gpt_oss_20b();
  fmt::print("{}\n", cuda::device_summary(0));
  const size_t context_bytes = cuda::memory_in_use();
  const auto model =
      CudaModel::random(config, args.experts == "mxfp4", args.seed, {.offload_embeddings = args.offload_embeddings});
  LoraConfig lora_config;
  lora_config.r = args.lora_r;
  lora_config.lora_alpha = 2.0 * args.lora_r;
  lora_config.target_modules = target_modules(args.targets);
  lora_config.train_sinks = args.train_sinks;
  lora_config.seed = args.seed;
  Adapters adapters(*model, lora_config, args.optimizer == "host");
  DeviceLora& lora = adapters.device();

  // The sequences of a step and where each one's scored tokens start.
  const int sequence_tokens = args.grpo ? args.prompt_tokens + args.completion_tokens : args.seq_len;
  const int step_sequences = args.grpo ? args.prompts * args.num_generations : args.batch;
  const int per_forward = args.grpo ? args.micro_batch
                                    : (args.micro_batch_tokens > 0 ? args.micro_batch_tokens / args.seq_len : args.batch);
  OSSRL_CHECK(per_forward > 0, "bench train: --micro-batch-tokens {} is less than one sequence of {}",
              args.micro_batch_tokens, args.seq_len);
  CudaPolicyOptions options;
  options.max_tokens = per_forward * sequence_tokens;
  options.recompute_activations = args.recompute;
  options.moe_chunk_tokens = args.moe_chunk_tokens;
  options.moe_stage_bytes = size_t(args.moe_stage_gb * kGiB);
  options.lm_head_workspace = size_t(args.lm_head_workspace_gb * kGiB);
  const size_t policy_bytes = CudaPolicy::bytes(config, args.lora_r, model->weights().mxfp4_experts(), options);
  fmt::print(
      "gpt-oss-{} shape, random weights, {} experts; LoRA r={} on {} ({:.1f} M values{}), AdamW on the {}, "
      "activations {}\n"
      "GPU memory: weights {:.2f} GiB{}, adapters {:.2f} GiB, policy activations and workspace for {} tokens "
      "{:.2f} GiB, CUDA context and libraries {:.2f} GiB\n",
      args.model, args.experts, args.lora_r, fmt::join(lora_config.target_modules, ","),
      double(adapters.trainable()) / 1e6, args.train_sinks ? ", sinks trained" : "", args.optimizer,
      args.recompute ? "recomputed layer by layer in backward" : "kept for backward (no recompute)",
      double(model->memory_plan().weights) / kGiB,
      args.offload_embeddings
          ? fmt::format(" (embeddings on the host: {:.2f} GiB)", double(model->memory_plan().host_embeddings) / kGiB)
          : std::string(),
      double(lora.bytes()) / kGiB, options.max_tokens,
      double(policy_bytes) / kGiB, double(context_bytes) / kGiB);

  // Update mode trains on fixed random sequences, every token after the first scored.
  std::vector<std::vector<int32_t>> fixed;
  std::vector<int> score_from(size_t(step_sequences), args.grpo ? args.prompt_tokens : 1);
  for (int b = 0; b < (args.grpo ? 0 : step_sequences); ++b) {
    fixed.push_back(random_tokens(size_t(args.seq_len), config.vocab_size, args.seed, uint64_t(b)));
  }
  // GRPO mode: each prompt repeated num_generations times, as the trainer groups them.
  std::vector<std::vector<int32_t>> prompts;
  for (int p = 0; p < (args.grpo ? args.prompts : 0); ++p) {
    const std::vector<int32_t> prompt = random_tokens(size_t(args.prompt_tokens), config.vocab_size, args.seed, 1000 + p);
    for (int g = 0; g < args.num_generations; ++g) prompts.push_back(prompt);
  }

  std::unique_ptr<CudaPolicy> policy;
  if (!args.grpo) policy = std::make_unique<CudaPolicy>(*model, &lora, options);
  Timing total;
  size_t peak = 0, rollout_peak = 0;
  for (int step = 0; step < args.warmup + args.steps; ++step) {
    Timing t;
    std::vector<std::vector<int32_t>> sequences = fixed;
    if (args.grpo) {
      // Rollouts: the policy's memory is freed for the KV cache, which goes with the engine.
      policy.reset();
      model->set_adapters(lora.layers());
      EngineOptions engine;
      engine.max_batch = args.rollout_batch > 0 ? args.rollout_batch : step_sequences;
      engine.max_sequence_length = sequence_tokens;
      engine.kv_pages = engine.max_batch * ((sequence_tokens + engine.page_size - 1) / engine.page_size);
      engine.prefill_chunk = 2048;  // as the trainer: the workspace scales with it
      GenerateOptions generation;
      generation.max_new_tokens = args.completion_tokens;
      generation.seed = args.seed + uint64_t(step);
      const auto t0 = Clock::now();
      std::vector<Generation> out;
      size_t engine_peak = 0;
      {
        CudaEngine rollout(*model, engine);
        out = rollout.generate(prompts, generation);
        engine_peak = rollout.stats().peak_gpu_bytes;
      }
      t.rollout_s = seconds_since(t0);
      t.rollout_peak = engine_peak;
      for (size_t i = 0; i < out.size(); ++i) {
        t.rollout_tokens += int64_t(out[i].tokens.size());
        sequences.push_back(prompts[i]);
        sequences.back().insert(sequences.back().end(), out[i].tokens.begin(), out[i].tokens.end());
      }
      policy = std::make_unique<CudaPolicy>(*model, &lora, options);
    }
    update(*policy, sequences, score_from, per_forward, t);
    const auto t0 = Clock::now();
    const StepReport report = adapters.step(1e-5, 1.0, 0.0);
    t.optimizer_s = seconds_since(t0);
    OSSRL_CHECK(report.applied(), "bench train: the optimizer skipped step {} (grad norm {})", step, report.grad_norm);
    if (step >= args.warmup) total.add(t);
    peak = std::max(peak, t.peak);
    rollout_peak = std::max(rollout_peak, t.rollout_peak);
  }
  const double n = args.steps;
  const double update_s = (total.forward_s + total.backward_s + total.optimizer_s) / n;
  const double update_tokens_per_second = double(total.update_tokens) / n / update_s;
  const double mean_context = args.grpo ? args.prompt_tokens + args.completion_tokens / 2.0 : args.seq_len / 2.0;
  // Forward, the recomputed forward (when on) and the input gradients each cost one forward's
  // FLOPs; the roofline counts the work the step must do, without the recompute.
  const double flops_per_token = 2.0 * forward_flops_per_token(config, mean_context);
  const double roofline_percent = 100.0 * flops_per_token * update_tokens_per_second / kBf16Flops;

  nlohmann::json row = {{"model", args.model},
                        {"experts", args.experts},
                        {"lora_r", args.lora_r},
                        {"targets", lora_config.target_modules},
                        {"trainable_values", adapters.trainable()},
                        {"optimizer", args.optimizer},
                        {"recompute", args.recompute},
                        {"micro_batch_tokens", options.max_tokens},
                        {"update_seconds", update_s},
                        {"forward_ms", 1e3 * total.forward_s / n},
                        {"backward_ms", 1e3 * total.backward_s / n},
                        {"optimizer_ms", 1e3 * total.optimizer_s / n},
                        {"roofline_percent", roofline_percent},
                        {"peak_gpu_bytes", peak}};
  if (!args.grpo) {
    row["batch"] = args.batch;
    row["seq_len"] = args.seq_len;
    row["seconds_per_step"] = update_s;
    row["tokens_per_second"] = update_tokens_per_second;
    fmt::print("\n{:>6} {:>7} {:>10} {:>10} {:>11} {:>12} {:>10} {:>9} {:>9}\n", "batch", "seq len", "s/step",
               "tokens/s", "forward ms", "backward ms", "AdamW ms", "% bf16", "peak GiB");
    fmt::print("{:>6} {:>7} {:>10.3f} {:>10.0f} {:>11.1f} {:>12.1f} {:>10.1f} {:>9.1f} {:>9.2f}\n", args.batch,
               args.seq_len, update_s, update_tokens_per_second, 1e3 * total.forward_s / n,
               1e3 * total.backward_s / n, 1e3 * total.optimizer_s / n, roofline_percent, double(peak) / kGiB);
  } else {
    const double rollout_s = total.rollout_s / n;
    const double rollout_tokens_per_second = double(total.rollout_tokens) / n / rollout_s;
    row.update({{"prompts", args.prompts},
                {"num_generations", args.num_generations},
                {"prompt_tokens", args.prompt_tokens},
                {"completion_tokens", args.completion_tokens},
                {"rollout_batch", args.rollout_batch > 0 ? args.rollout_batch : step_sequences},
                {"micro_batch", args.micro_batch},
                {"seconds_per_step", rollout_s + update_s},
                {"rollout_seconds", rollout_s},
                {"rollout_tokens_per_second", rollout_tokens_per_second},
                {"rollout_peak_gpu_bytes", rollout_peak},
                {"update_peak_gpu_bytes", peak},
                {"update_tokens_per_second", update_tokens_per_second},
                {"tokens_per_second", update_tokens_per_second}});
    row["peak_gpu_bytes"] = std::max(peak, rollout_peak);
    fmt::print("\n{:>13} {:>13} {:>8} {:>10} {:>9} {:>11} {:>9} {:>9} {:>8} {:>9} {:>9}\n", "prompts x G",
               "prompt+compl", "s/step", "rollout s", "rollout/s", "rollout GiB", "update s", "update/s", "% bf16",
               "update GiB", "peak GB");
    fmt::print("{:>13} {:>13} {:>8.2f} {:>10.2f} {:>9.0f} {:>11.2f} {:>9.2f} {:>9.0f} {:>8.1f} {:>9.2f} {:>9.2f}\n",
               fmt::format("{} x {}", args.prompts, args.num_generations),
               fmt::format("{}+{}", args.prompt_tokens, args.completion_tokens), rollout_s + update_s, rollout_s,
               rollout_tokens_per_second, double(rollout_peak) / kGiB, update_s, update_tokens_per_second,
               roofline_percent, double(peak) / kGiB, double(std::max(peak, rollout_peak)) / 1e9);
  }
  fmt::print(
      "\nmean of {} steps after {} warm-up. update: forward over each micro-batch (log-probs of the scored tokens), "
      "backward into the LoRA grads ({}), AdamW with clipping; tokens/s counts every token "
      "forwarded. % bf16: 2 x forward FLOPs (forward and input gradients; {:.1f} GFLOP/token at mean context {:.0f}) x "
      "update tokens/s / {:.0f} "
      "TFLOP/s. peak: device memory in use (all processes), highest seen after each rollout and backward.\n",
      args.steps, args.warmup, args.recompute ? "each layer recomputed" : "from the kept activations",
      flops_per_token / 2e9, mean_context, kBf16Flops / 1e12);
  if (!args.json_path.empty()) {
    std::ofstream out(args.json_path);
    out << nlohmann::json::array({row}).dump(2) << '\n';
    OSSRL_CHECK(out, "cannot write {}", args.json_path);
    fmt::print("row written to {}\n", args.json_path);
  }
}

}  // namespace

Command add_bench_train(CLI::App& bench) {
  auto args = std::make_shared<TrainBenchArgs>();
  CLI::App* command = bench.add_subcommand(
      "train", "LoRA training speed and memory on random weights of the 20b or 120b shape (update steps or GRPO steps)");
  command->add_option("--model", args->model, "Model shape")->capture_default_str()->check(CLI::IsMember({"20b", "120b"}));
  command->add_option("--experts", args->experts, "Expert weights format")
      ->capture_default_str()
      ->check(CLI::IsMember({"mxfp4", "bf16"}));
  command->add_option("--lora-r", args->lora_r, "LoRA rank (alpha = 2r)")->capture_default_str()->check(CLI::PositiveNumber);
  command->add_option("--targets", args->targets, "LoRA targets: attention, experts, or PEFT module names")
      ->delimiter(',')
      ->capture_default_str();
  command->add_flag("--train-sinks", args->train_sinks, "Also train the attention sinks");
  command->add_option("--optimizer", args->optimizer,
                      "Where AdamW's fp32 values and moments live (host: the GPU keeps bf16 copies and one layer of grads)")
      ->capture_default_str()
      ->check(CLI::IsMember({"device", "host"}));
  command->add_flag("!--no-recompute", args->recompute,
                    "Keep every layer's activations for backward instead of recomputing them (more memory, less time)");
  command->add_flag("--offload-embeddings", args->offload_embeddings,
                    "Keep embed_tokens in host memory (the embedding reads its rows over PCIe)");
  command->add_option("--moe-chunk-tokens", args->moe_chunk_tokens, "Tokens of MoE activations held at once")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  command->add_option("--moe-stage-gb", args->moe_stage_gb, "GiB of each of the two MXFP4 decode buffers")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  command->add_option("--lm-head-workspace-gb", args->lm_head_workspace_gb, "GiB of the lm_head's logits blocks")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  command->add_option("--warmup", args->warmup, "Untimed steps first")->capture_default_str()->check(CLI::NonNegativeNumber);
  command->add_option("--steps", args->steps, "Timed steps")->capture_default_str()->check(CLI::PositiveNumber);
  command->add_option("--seed", args->seed, "Seed of the weights, adapters and tokens")->capture_default_str();
  command->add_option("--json", args->json_path, "Also write the row to this JSON file");
  command->add_option("--batch", args->batch, "Update mode: sequences per step")->capture_default_str()->check(CLI::PositiveNumber);
  command->add_option("--seq-len", args->seq_len, "Update mode: tokens per sequence")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  command->add_option("--micro-batch-tokens", args->micro_batch_tokens,
                      "Update mode: tokens per forward/backward (gradient accumulation); 0: the whole batch")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  command->add_flag("--grpo", args->grpo, "Whole GRPO steps: rollouts, then the update");
  command->add_option("--prompts", args->prompts, "GRPO: prompts per step")->capture_default_str()->check(CLI::PositiveNumber);
  command->add_option("--num-generations", args->num_generations, "GRPO: completions per prompt")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  command->add_option("--prompt-tokens", args->prompt_tokens, "GRPO: tokens per random prompt")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  command->add_option("--completion-tokens", args->completion_tokens, "GRPO: tokens generated per completion")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  command->add_option("--rollout-batch", args->rollout_batch, "GRPO: sequences decoding at once (0: all)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  command->add_option("--micro-batch", args->micro_batch, "GRPO: sequences per forward/backward")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  return [args] { run(*args); };
}

}  // namespace ossrl::cli

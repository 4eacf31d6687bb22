// `ossrl demo`: the whole inference path on an embedded default — a small random gpt-oss
// with the real 201088-token vocabulary and MXFP4 experts, written as a checkpoint folder,
// loaded back, prompted through Harmony, sampled, parsed, and re-scored. Its weights are
// random, so its words are noise: what it shows is that every stage runs and agrees with
// itself (the log-probs reported while sampling equal those of a fresh scoring pass).
#include <fmt/format.h>

#include <chrono>
#include <cmath>
#include <filesystem>

#include "cli/commands.h"
#include "cli/options.h"
#include "core/error.h"
#include "model/cpu_model.h"
#include "model/random_checkpoint.h"
#include "tokenizer/harmony.h"
#include "tokenizer/tokenizer.h"

namespace ossrl::cli {

using namespace ossrl::harmony;
namespace {

struct DemoArgs {
  std::string model_dir;
  std::string prompt = "What is 17 * 23?";
  std::string tokenizer_path;
  GenerateOptions generation;
  int num_generations = 4;
};

// gpt-oss in miniature: every feature of the real shape (GQA, sinks, alternating sliding
// and full attention, YaRN, top-4 of several experts, MXFP4) at a size a laptop runs.
GptOssConfig demo_config() {
  GptOssConfig config = GptOssConfig::gpt_oss_20b();
  config.num_hidden_layers = 4;
  config.hidden_size = 128;
  config.intermediate_size = 128;
  config.num_local_experts = 8;
  config.num_attention_heads = 8;
  config.num_key_value_heads = 2;
  config.sliding_window = 16;
  config.layer_types = {AttentionType::Sliding, AttentionType::Full, AttentionType::Sliding, AttentionType::Full};
  return config;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

void run(const DemoArgs& args) {
  const auto tokenizer = Tokenizer::load(args.tokenizer_path);
  if (!std::filesystem::exists(std::filesystem::path(args.model_dir) / "config.json")) {
    fmt::print("writing a random gpt-oss checkpoint to {}\n", args.model_dir);
    write_random_checkpoint(args.model_dir, demo_config(), {.seed = 1, .mxfp4_experts = true});
  }
  CpuModel model(args.model_dir);
  const GptOssConfig& c = model.config();
  fmt::print("model: {} layers, hidden {}, {} experts (top {}), {}/{} heads, vocab {}\n", c.num_hidden_layers,
             c.hidden_size, c.num_local_experts, c.experts_per_token, c.num_attention_heads,
             c.num_key_value_heads, c.vocab_size);

  const Conversation conversation = conversation_from_prompt(args.prompt, ReasoningEffort::Low);
  const std::vector<TokenId> prompt = render_conversation(*tokenizer, conversation);
  fmt::print("prompt: {} tokens\n{}\n", prompt.size(), tokenizer->decode(prompt));

  GenerateOptions options = args.generation;
  options.stop_tokens = {harmony_tokens::kReturn, harmony_tokens::kCall};
  const std::vector<std::vector<int32_t>> prompts(size_t(args.num_generations), prompt);
  auto start = std::chrono::steady_clock::now();
  const std::vector<Generation> generations = generate(model, prompts, options);
  const double generate_seconds = seconds_since(start);

  // Re-score prompt + completion in one ragged batch and compare with the sampler's log-probs.
  std::vector<int32_t> tokens, offsets{0};
  size_t new_tokens = 0;
  for (const Generation& g : generations) {
    tokens.insert(tokens.end(), prompt.begin(), prompt.end());
    tokens.insert(tokens.end(), g.tokens.begin(), g.tokens.end());
    offsets.push_back(int32_t(tokens.size()));
    new_tokens += g.tokens.size();
  }
  start = std::chrono::steady_clock::now();
  const std::vector<float> scored = model.log_probs(tokens, offsets);
  const double score_seconds = seconds_since(start);

  float max_diff = 0;
  for (size_t i = 0; i < generations.size(); ++i) {
    const Generation& g = generations[i];
    const ParsedCompletion parsed = parse_completion(*tokenizer, g.tokens);
    double sum = 0;
    for (size_t t = 0; t < g.tokens.size(); ++t) {
      const float rescored = scored[size_t(offsets[i]) + prompt.size() + t];
      max_diff = std::max(max_diff, std::fabs(rescored - g.logprobs[t]));
      sum += g.logprobs[t];
    }
    std::string text = tokenizer->decode(g.tokens);
    if (text.size() > 160) text = text.substr(0, 160) + "...";
    fmt::print("\ncompletion {}: {} tokens, sum log-prob {:.2f}, {}, Harmony {}\n  {:?}\n", i, g.tokens.size(), sum,
               g.stopped ? "stopped" : "hit the token limit",
               parsed.well_formed ? "well formed" : "malformed: " + parsed.problem, text);
  }
  fmt::print("\ngenerated {} tokens in {} ({:.1f} tokens/s); re-scored {} tokens in {}\n", new_tokens,
             format_seconds(generate_seconds), double(new_tokens) / generate_seconds, tokens.size(),
             format_seconds(score_seconds));
  fmt::print("sampler vs re-scored log-probs: max |difference| {:.2e}\n", max_diff);
  // Same weights, same tokens: incremental decoding and one full pass must agree to fp32
  // rounding. A larger gap means the KV cache or the positions are wrong.
  OSSRL_CHECK(max_diff < 1e-3f, "log-probs of the KV-cached decode and the full pass differ by {}", max_diff);
}

}  // namespace

Command add_demo(CLI::App& app) {
  auto args = std::make_shared<DemoArgs>();
  CLI::App* command = app.add_subcommand("demo", "Run the inference path end to end on a small random gpt-oss");
  args->model_dir = (std::filesystem::temp_directory_path() / "ossrl-demo-model").string();
  command->add_option("--model", args->model_dir, "Where the random checkpoint is written (reused if present)")
      ->capture_default_str();
  command->add_option("--prompt", args->prompt, "The user message")->capture_default_str();
  command->add_option("--num-generations", args->num_generations, "Completions sampled for the prompt")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  args->generation.max_new_tokens = 48;
  add_generation_options(command, args->generation);
  add_tokenizer_option(command, args->tokenizer_path);
  return [args] { run(*args); };
}

}  // namespace ossrl::cli

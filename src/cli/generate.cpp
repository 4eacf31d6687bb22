// `ossrl generate`: one Harmony chat turn with a checkpoint, on the GPU engine or the CPU
// reference model.
#include <fmt/format.h>

#include <chrono>

#include "cli/commands.h"
#include "cli/device_model.h"
#include "cli/options.h"
#include "core/error.h"
#include "io/json_file.h"
#include "tokenizer/harmony.h"
#include "tokenizer/tokenizer.h"

namespace ossrl::cli {

using namespace ossrl::harmony;
namespace {

struct GenerateArgs {
  std::string model_dir;
  std::string prompt;
  std::string messages_file;
  std::string tokenizer_path;
  ReasoningEffort effort = ReasoningEffort::Medium;
  GenerateOptions generation;
  DeviceArgs device;
  bool show_analysis = false;
  bool show_tokens = false;
};

Conversation read_conversation(const GenerateArgs& args) {
  if (args.messages_file.empty()) return conversation_from_prompt(args.prompt, args.effort);
  return conversation_from_json(read_json_file(args.messages_file), args.effort);
}

void run(const GenerateArgs& args) {
  using Clock = std::chrono::steady_clock;
  const auto tokenizer = Tokenizer::load(args.tokenizer_path);
  const auto load_start = Clock::now();
  const auto model = DeviceModel::load(args.model_dir, args.device);
  const double load_seconds = std::chrono::duration<double>(Clock::now() - load_start).count();

  const std::vector<TokenId> prompt = render_conversation(*tokenizer, read_conversation(args));
  GenerateOptions options = args.generation;
  options.stop_tokens = {harmony_tokens::kReturn, harmony_tokens::kCall};

  const auto start = Clock::now();
  const Generation generation = model->generate({prompt}, options).front();
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();

  const ParsedCompletion parsed = parse_completion(*tokenizer, generation.tokens);
  if (args.show_tokens) {
    fmt::print("[prompt] {}\n[completion] {}\n", tokenizer->decode(prompt),
               tokenizer->decode(generation.tokens));
  }
  if (args.show_analysis) {
    for (const Message& m : parsed.messages) {
      if (m.channel != "final") fmt::print("[{}] {}\n", m.channel.empty() ? "?" : m.channel, m.content);
    }
  }
  if (parsed.final_answer) {
    fmt::print("{}\n", *parsed.final_answer);
  } else {
    fmt::print(stderr, "no final answer ({}); the completion was:\n", parsed.problem);
    fmt::print("{}\n", tokenizer->decode(generation.tokens));
  }
  fmt::print(stderr, "{} prompt + {} new tokens in {} ({:.1f} tokens/s; model loaded in {}); {}\n",
             prompt.size(), generation.tokens.size(), format_seconds(seconds),
             double(generation.tokens.size()) / seconds, format_seconds(load_seconds),
             generation.stopped ? "stopped on a stop token" : "reached --max-new-tokens");
}

}  // namespace

Command add_generate(CLI::App& app) {
  auto args = std::make_shared<GenerateArgs>();
  CLI::App* command = app.add_subcommand("generate", "Answer a prompt with a gpt-oss checkpoint (Harmony chat)");
  command->add_option("--model", args->model_dir, "Checkpoint folder (config.json + *.safetensors)")
      ->required()
      ->check(CLI::ExistingDirectory);
  auto* prompt = command->add_option("--prompt", args->prompt, "The user message");
  auto* messages = command->add_option("--messages", args->messages_file,
                                       "JSON file with a list of {role, content} messages instead")
                       ->check(CLI::ExistingFile);
  prompt->excludes(messages);
  command->add_flag("--show-analysis", args->show_analysis, "Also print the analysis (reasoning) channel");
  command->add_flag("--show-tokens", args->show_tokens, "Print the prompt and completion with special tokens");
  add_reasoning_option(command, args->effort);
  add_generation_options(command, args->generation);
  add_tokenizer_option(command, args->tokenizer_path);
  add_device_options(command, args->device, "cuda: sequences decoding at once");
  command->callback([prompt, messages] {
    if (prompt->count() + messages->count() == 0) throw CLI::RequiredError("--prompt or --messages");
  });
  return [args] { run(*args); };
}

}  // namespace ossrl::cli

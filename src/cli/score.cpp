// `ossrl score`: per-token log-probs of given sequences, JSONL in, JSONL out.
//
// Each input line is one of
//   {"tokens": [ids...]}                         every token after the first is scored
//   {"text": "..."}                              encoded with special tokens recognised
//   {"prompt": "..." | [messages], "completion": "..."}
//                                                the prompt rendered as a Harmony generation
//                                                prompt, only the completion's tokens scored
// and may carry an "id", copied to the output. Each output line holds the scored tokens,
// their log-probs and their sum. Every line is parsed and checked before any compute, so a
// malformed line costs nothing but the error that names it.
#include <fmt/format.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>

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

struct ScoreArgs {
  std::string model_dir;
  std::string input;
  std::string output;
  std::string tokenizer_path;
  ReasoningEffort effort = ReasoningEffort::Medium;
  int batch_size = 8;
  DeviceArgs device;
};

struct Sample {
  nlohmann::json id;            // null when the line has none
  std::vector<TokenId> tokens;  // the whole sequence
  size_t first_scored = 1;      // tokens before this index are context only
};

Sample parse_sample(const std::string& line, const std::string& where, const Tokenizer& tokenizer,
                    ReasoningEffort effort, int vocab_size) {
  const nlohmann::json j = parse_json_object(line, where);
  Sample sample;
  if (j.contains("id")) sample.id = j["id"];
  try {
    if (j.contains("tokens")) {
      sample.tokens = j["tokens"].get<std::vector<TokenId>>();
    } else if (j.contains("text")) {
      sample.tokens = tokenizer.encode(j["text"].get<std::string>(), SpecialTokens::All);
    } else if (j.contains("prompt") && j.contains("completion")) {
      const nlohmann::json& prompt = j["prompt"];
      const Conversation conversation = prompt.is_string()
                                            ? conversation_from_prompt(prompt.get<std::string>(), effort)
                                            : conversation_from_json(prompt, effort);
      sample.tokens = render_conversation(tokenizer, conversation);
      sample.first_scored = sample.tokens.size();
      const std::vector<TokenId> completion =
          tokenizer.encode(j["completion"].get<std::string>(), SpecialTokens::All);
      sample.tokens.insert(sample.tokens.end(), completion.begin(), completion.end());
    } else {
      fail("{}: expected \"tokens\", \"text\", or \"prompt\" and \"completion\"", where);
    }
  } catch (const nlohmann::json::exception& e) {
    fail("{}: {}", where, e.what());
  } catch (const Error& e) {
    fail("{}: {}", where, e.what());
  }
  OSSRL_CHECK(sample.tokens.size() > sample.first_scored, "{}: nothing to score (need at least {} tokens)",
              where, sample.first_scored + 1);
  for (TokenId t : sample.tokens) {
    OSSRL_CHECK(t >= 0 && t < vocab_size, "{}: token {} outside the vocabulary [0, {})", where, t, vocab_size);
  }
  return sample;
}

std::vector<Sample> read_samples(const ScoreArgs& args, const Tokenizer& tokenizer, int vocab_size) {
  std::ifstream in(args.input);
  OSSRL_CHECK(in, "cannot open {}", args.input);
  std::vector<Sample> samples;
  std::string line;
  for (int number = 1; std::getline(in, line); ++number) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    samples.push_back(
        parse_sample(line, fmt::format("{}:{}", args.input, number), tokenizer, args.effort, vocab_size));
  }
  OSSRL_CHECK(!samples.empty(), "{} holds no samples", args.input);
  return samples;
}

void run(const ScoreArgs& args) {
  const auto tokenizer = Tokenizer::load(args.tokenizer_path);
  const auto model = DeviceModel::load(args.model_dir, args.device);
  const std::vector<Sample> samples = read_samples(args, *tokenizer, model->config().vocab_size);

  ResultsOutput output(args.output);
  std::ostream& out = output.stream();

  const auto start = std::chrono::steady_clock::now();
  size_t scored_tokens = 0;
  for (size_t begin = 0; begin < samples.size(); begin += size_t(args.batch_size)) {
    const size_t end = std::min(samples.size(), begin + size_t(args.batch_size));
    std::vector<int32_t> tokens, offsets{0};
    for (size_t i = begin; i < end; ++i) {
      tokens.insert(tokens.end(), samples[i].tokens.begin(), samples[i].tokens.end());
      offsets.push_back(int32_t(tokens.size()));
    }
    const std::vector<float> logprobs = model->log_probs(tokens, offsets);
    for (size_t i = begin; i < end; ++i) {
      const Sample& s = samples[i];
      const size_t base = size_t(offsets[i - begin]);
      nlohmann::json row;
      if (!s.id.is_null()) row["id"] = s.id;
      std::vector<TokenId> scored(s.tokens.begin() + long(s.first_scored), s.tokens.end());
      std::vector<float> lp(logprobs.begin() + long(base + s.first_scored),
                            logprobs.begin() + long(base + s.tokens.size()));
      double sum = 0;
      for (float v : lp) sum += v;
      row["tokens"] = scored;
      row["logprobs"] = lp;
      row["sum_logprob"] = sum;
      row["num_tokens"] = scored.size();
      out << row.dump() << '\n';
      scored_tokens += scored.size();
    }
    out.flush();
    fmt::print(stderr, "\rscored {}/{} samples", end, samples.size());
  }
  output.commit();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  fmt::print(stderr, "\rscored {} samples, {} tokens in {} ({:.1f} tokens/s)\n", samples.size(), scored_tokens,
             format_seconds(seconds), double(scored_tokens) / seconds);
}

}  // namespace

Command add_score(CLI::App& app) {
  auto args = std::make_shared<ScoreArgs>();
  CLI::App* command = app.add_subcommand("score", "Per-token log-probs of sequences from a JSONL file");
  command->add_option("--model", args->model_dir, "Checkpoint folder (config.json + *.safetensors)")
      ->required()
      ->check(CLI::ExistingDirectory);
  command->add_option("--input", args->input, "JSONL: {\"tokens\"}, {\"text\"} or {\"prompt\", \"completion\"}")
      ->required()
      ->check(CLI::ExistingFile);
  command->add_option("--output", args->output, "JSONL output (default: standard output)");
  command->add_option("--batch-size", args->batch_size, "Sequences per forward pass")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  add_reasoning_option(command, args->effort);
  add_tokenizer_option(command, args->tokenizer_path);
  add_device_options(command, args->device, "cuda: tokens whose logits one forward pass computes");
  return [args] { run(*args); };
}

}  // namespace ossrl::cli

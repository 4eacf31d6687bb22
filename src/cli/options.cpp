#include "cli/options.h"

#include <fmt/format.h>

#include <cstdio>
#include <utility>

#include "core/error.h"

#include "tokenizer/tokenizer.h"

namespace ossrl::cli {

using namespace ossrl::harmony;

void add_generation_options(CLI::App* command, GenerateOptions& options) {
  command->add_option("--temperature", options.sampling.temperature, "Sampling temperature; 0 is greedy")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  command->add_option("--top-k", options.sampling.top_k, "Keep the k most probable tokens; 0 keeps all")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  command->add_option("--top-p", options.sampling.top_p, "Nucleus: keep the smallest set with this mass")
      ->capture_default_str()
      ->check(CLI::Range(0.0f, 1.0f));
  command->add_option("--min-p", options.sampling.min_p, "Keep tokens with p >= min_p * p_max")
      ->capture_default_str()
      ->check(CLI::Range(0.0f, 1.0f));
  command->add_option("--seed", options.seed, "Random seed; the same seed replays the same tokens")
      ->capture_default_str();
  command->add_option("--max-new-tokens", options.max_new_tokens, "Stop after this many tokens")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
}

void add_reasoning_option(CLI::App* command, ReasoningEffort& effort) {
  command->add_option_function<std::string>(
             "--reasoning", [&effort](const std::string& name) { effort = parse_effort(name); },
             "Reasoning effort in the system message")
      ->check(CLI::IsMember({"low", "medium", "high"}))
      ->default_str("medium");
}

void add_tokenizer_option(CLI::App* command, std::string& path) {
  path = Tokenizer::default_path();
  command->add_option("--tokenizer", path, "o200k_harmony rank file written by scripts/setup.sh")
      ->capture_default_str();
}

ResultsOutput::ResultsOutput(std::string path) : path_(std::move(path)) {
  if (path_.empty()) return;
  file_.open(path_ + ".partial");
  OSSRL_CHECK(file_, "cannot write {}.partial", path_);
}

void ResultsOutput::commit() {
  if (path_.empty()) return;
  file_.close();
  const std::string partial = path_ + ".partial";
  OSSRL_CHECK(file_ && std::rename(partial.c_str(), path_.c_str()) == 0, "cannot write {}", path_);
}

std::string format_seconds(double seconds) {
  return seconds < 1.0 ? fmt::format("{:.1f} ms", seconds * 1e3) : fmt::format("{:.2f} s", seconds);
}

}  // namespace ossrl::cli

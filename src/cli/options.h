// Options several subcommands share, registered in one place so they are spelled alike.
#pragma once

#include <CLI/CLI.hpp>

#include <fstream>
#include <iostream>
#include <string>

#include "engine/generate.h"
#include "tokenizer/harmony.h"

namespace ossrl::cli {


// --temperature --top-k --top-p --min-p --seed --max-new-tokens.
void add_generation_options(CLI::App* command, GenerateOptions& options);
// --reasoning low|medium|high.
void add_reasoning_option(CLI::App* command, harmony::ReasoningEffort& effort);
// --tokenizer PATH (default: the data written by scripts/setup.sh).
void add_tokenizer_option(CLI::App* command, std::string& path);

// Where a command writes its JSONL results: standard output, or a file written as
// PATH.partial and renamed by commit(), so an interrupted run leaves no truncated output that
// looks complete.
class ResultsOutput {
 public:
  explicit ResultsOutput(std::string path);
  std::ostream& stream() { return path_.empty() ? std::cout : file_; }
  void commit();

 private:
  std::string path_;
  std::ofstream file_;
};

// "12.3 ms", "4.56 s".
std::string format_seconds(double seconds);

}  // namespace ossrl::cli

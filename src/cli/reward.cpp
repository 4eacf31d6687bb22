// `ossrl reward --env matmul`: scores given completions in a code environment, JSONL in,
// JSONL out, for designing rewards and for probing the sandbox from outside.
//
// Each input line is {"completion": "...", "final_answer": "..."?} (the code is the last
// ```python block of final_answer, else of completion) or {"code": "..."} (the code itself,
// no fence), and may carry an "id", copied to the output. Each output line holds the parts
// (format, clean, compiles, correct, speedup, speed), the total and the reason for the
// first failing part. A summary (throughput, missing sandbox layers) goes to stderr.
#include <fmt/format.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/options.h"
#include "core/error.h"
#include "io/json_file.h"
#include "rewards/matmul_env.h"

namespace ossrl::cli {
namespace {

struct RewardArgs {
  std::string env = "matmul";
  std::string input;
  std::string output;
  MatmulOptions matmul;
  bool no_static_check = false;
  bool no_namespaces = false;
  bool no_import_guard = false;
};

struct Item {
  nlohmann::json id;  // null when the line has none
  std::optional<std::string> code;  // nullopt: no python block, nothing to run
};

Item parse_item(const std::string& line, const std::string& where) {
  const nlohmann::json j = parse_json_object(line, where);
  Item item;
  if (j.contains("id")) item.id = j["id"];
  try {
    if (j.contains("code")) {
      item.code = j["code"].get<std::string>();
    } else if (j.contains("completion")) {
      const bool final = j.contains("final_answer") && !j["final_answer"].is_null();
      item.code = extract_python_block(j[final ? "final_answer" : "completion"].get<std::string>());
    } else {
      fail("{}: expected \"completion\" (and optionally \"final_answer\") or \"code\"", where);
    }
  } catch (const nlohmann::json::exception& e) {
    fail("{}: {}", where, e.what());
  }
  return item;
}

void run_reward(const RewardArgs& args) {
  OSSRL_CHECK(args.env == "matmul", "unknown environment \"{}\" (known: matmul)", args.env);
  std::ifstream in(args.input);
  OSSRL_CHECK(in, "cannot open {}", args.input);
  std::vector<Item> items;
  std::string line;
  for (int number = 1; std::getline(in, line); ++number)
    if (line.find_first_not_of(" \t\r") != std::string::npos)
      items.push_back(parse_item(line, fmt::format("{}:{}", args.input, number)));

  MatmulOptions options = args.matmul;
  options.static_check = !args.no_static_check;
  options.use_namespaces = !args.no_namespaces;
  options.import_guard = !args.no_import_guard;
  const MatmulEnv env(options);
  std::vector<std::string> codes;
  for (const Item& item : items)
    if (item.code) codes.push_back(*item.code);
  const auto start = std::chrono::steady_clock::now();
  const std::vector<MatmulScore> scores = env.evaluate(codes);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  ResultsOutput output(args.output);
  std::ostream& out = output.stream();
  size_t next = 0, correct = 0;
  double sum = 0;
  for (const Item& item : items) {
    const MatmulScore s = item.code ? scores[next++] : MatmulScore{.detail = "no ```python block"};
    nlohmann::json j = {{"total", s.total},     {"format", s.format},   {"clean", s.clean},
                        {"compiles", s.compiles}, {"correct", s.correct}, {"speedup", s.speedup},
                        {"speed", s.speed},     {"detail", s.detail}};
    if (!item.id.is_null()) j["id"] = item.id;
    out << j.dump() << '\n';
    sum += s.total;
    correct += s.correct;
  }
  output.commit();
  fmt::print(stderr, "{} completions, {} run, {} correct, mean reward {:.3f}; {:.2f} s with {} workers: {:.2f} evaluations/s\n",
             items.size(), codes.size(), correct, items.empty() ? 0.0 : sum / static_cast<double>(items.size()),
             seconds, env.workers(), seconds > 0 ? static_cast<double>(codes.size()) / seconds : 0.0);
  const SandboxSupport& support = sandbox_support();
  if (!options.use_namespaces || !support.namespaces)
    fmt::print(stderr, "sandbox: without namespaces ({})\n",
               options.use_namespaces ? support.reason : "--no-namespaces");
}

}  // namespace

Command add_reward(CLI::App& app) {
  auto args = std::make_shared<RewardArgs>();
  CLI::App* command = app.add_subcommand("reward", "Score completions in a sandboxed code environment");
  command->add_option("--env", args->env, "Environment")->check(CLI::IsMember({"matmul"}))->capture_default_str();
  command->add_option("--input", args->input, "JSONL: {\"completion\", \"final_answer\"?} or {\"code\"}")
      ->required()
      ->check(CLI::ExistingFile);
  command->add_option("--output", args->output, "JSONL output (default: standard output)");
  command->add_option("--workers", args->matmul.workers, "Evaluations in parallel (0: one per core)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  command->add_option("--repetitions", args->matmul.timed_repetitions, "Timed products per evaluation")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  command->add_option("--python", args->matmul.python, "The interpreter run in the sandbox")->capture_default_str();
  command->add_flag("--no-static-check", args->no_static_check,
                    "Run code that fails the static check too (to probe the run-time layers)");
  command->add_flag("--no-import-guard", args->no_import_guard,
                    "Give the code real builtins and imports (with --no-static-check: the sandbox alone)");
  command->add_flag("--no-namespaces", args->no_namespaces,
                    "Use the fallback sandbox (no user namespaces), as on machines without them");
  return [args] { run_reward(*args); };
}

}  // namespace ossrl::cli

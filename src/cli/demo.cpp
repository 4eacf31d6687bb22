// `ossrl demo`: GRPO visibly learning on a laptop CPU (train/demo_task.h). A tiny random
// gpt-oss is warmed up with a few SFT steps on single-digit addition, then GRPO with an
// exact-match reward trains it further; a table sums up the accuracy along the way.
#include <fmt/format.h>

#include <cmath>
#include <filesystem>

#include "cli/commands.h"
#include "cli/options.h"
#include "core/error.h"
#include "train/demo_task.h"

namespace ossrl::cli {

namespace {

struct DemoArgs {
  DemoOptions options;
};

std::string cell(double x, const char* format = "{:.2f}") {
  return std::isnan(x) ? "-" : fmt::format(fmt::runtime(format), x);
}

void run(DemoArgs& args) {
  args.options.print = [](const std::string& line) {
    fmt::print("{}\n", line);
    std::fflush(stdout);
  };
  const DemoReport report = run_demo(args.options);

  fmt::print("\n{:<6} {:>5} {:>14} {:>13} {:>13} {:>8}\n", "phase", "step", "eval accuracy", "eval reward",
             "train reward", "kl");
  for (const DemoEval& e : report.evals) {
    fmt::print("{:<6} {:>5} {:>14} {:>13} {:>13} {:>8}\n", e.phase == "GRPO" ? "grpo" : "sft", e.step,
               cell(e.accuracy * 100, "{:.0f}%"), cell(e.reward, "{:.3f}"), cell(e.train_reward, "{:.3f}"),
               cell(e.kl, "{:.4f}"));
  }
  fmt::print("\naccuracy (greedy, exact match, 100 problems): {:.0f}% after SFT -> {:.0f}% after GRPO ({:+.0f} points) "
             "in {:.0f} s\n",
             report.accuracy_before_grpo * 100, report.accuracy_after_grpo * 100,
             (report.accuracy_after_grpo - report.accuracy_before_grpo) * 100, report.seconds);
  fmt::print("metrics: {0}/sft/metrics.jsonl, {0}/grpo/metrics.jsonl (ossrl plot FILE -o curves.svg)\n",
             args.options.work_dir);
}

}  // namespace

Command add_demo(CLI::App& app) {
  auto args = std::make_shared<DemoArgs>();
  DemoOptions& o = args->options;
  CLI::App* command =
      app.add_subcommand("demo", "Watch GRPO teach a tiny gpt-oss single-digit addition on the CPU (a few minutes)");
  o.work_dir = (std::filesystem::temp_directory_path() / "ossrl-demo").string();
  command->add_option("--work-dir", o.work_dir, "Where the model, data, adapters and metrics go")
      ->capture_default_str();
  command->add_option("--seed", o.seed, "Seed of the model, the data split and every sampling stream")
      ->capture_default_str();
  command->add_option("--sft-steps", o.sft_steps, "SFT warm-up steps")->capture_default_str()->check(CLI::PositiveNumber);
  command->add_option("--grpo-steps", o.grpo_steps, "GRPO steps")->capture_default_str()->check(CLI::PositiveNumber);
  command->add_option("--eval-steps", o.eval_steps, "Evaluate every this many steps")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  command->add_option("--sft", o.sft_overrides, "Extra `ossrl train` options for the SFT phase, e.g. --sft=--learning_rate=0.02");
  command->add_option("--grpo", o.grpo_overrides, "Extra `ossrl train` options for the GRPO phase, e.g. --grpo=--beta=0");
  add_tokenizer_option(command, o.tokenizer);
  return [args] { run(*args); };
}

}  // namespace ossrl::cli

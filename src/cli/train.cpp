// `ossrl train CONFIG.toml [--key value ...] [--resume [CHECKPOINT]]`: GRPO or SFT on the CPU
// reference model (train/trainer.h); `ossrl plot METRICS.jsonl -o curves.svg`.
#include <fmt/format.h>

#include <filesystem>

#include "cli/commands.h"
#include "core/error.h"
#include "train/checkpoint.h"
#include "train/metrics.h"
#include "train/trainer.h"

namespace ossrl::cli {

namespace {

struct TrainArgs {
  std::vector<std::string> args;  // everything after `train`, read by hand: --key value pairs
};

void run_train(const TrainArgs& a) {
  std::string config_path;
  std::vector<std::string> overrides;
  for (size_t i = 0; i < a.args.size(); ++i) {
    const std::string& arg = a.args[i];
    if (arg == "--resume") {
      // --resume alone continues from the newest checkpoint of output_dir.
      const bool has_dir = i + 1 < a.args.size() && a.args[i + 1].rfind("--", 0) != 0;
      overrides.insert(overrides.end(), {"--resume_from_checkpoint", has_dir ? a.args[++i] : "latest"});
    } else if (i == 0 && arg.rfind("--", 0) != 0) {
      config_path = arg;  // the config file comes first; without one, options alone
    } else {
      overrides.push_back(arg);
    }
  }
  const TrainConfig config = load_train_config(config_path, overrides);
  Trainer trainer(config);
  const TrainConfig& c = trainer.config();
  fmt::print("{} on {} ({} training / {} held-out rows), {} steps, LoRA r={} ({} trainable values), output {}\n",
             c.trainer, c.model_name_or_path, trainer.train_size(), trainer.eval_size(), trainer.total_steps(),
             c.lora.r, trainer.lora().numel(), c.output_dir);
  if (trainer.global_step() > 0) fmt::print("resumed at step {}\n", trainer.global_step());
  trainer.on_row = [&](const nlohmann::json& row) {
    const int64_t step = row.value("step", int64_t{0});
    if (row.contains("eval_reward") || step % c.logging_steps == 0 || step == trainer.total_steps()) {
      fmt::print("{}\n", progress_line(row, trainer.total_steps()));
      std::fflush(stdout);
    }
  };
  trainer.train();
  fmt::print("done: adapter in {}, metrics in {}\n", (std::filesystem::path(c.output_dir) / "adapter").string(),
             (std::filesystem::path(c.output_dir) / "metrics.jsonl").string());
}

struct PlotArgs {
  std::string metrics;
  std::string output = "curves.svg";
  std::vector<std::string> keys = {"reward", "eval_reward", "kl", "loss"};
};

void run_plot(const PlotArgs& a) {
  write_file_atomic(a.output, plot_svg(read_metrics(a.metrics), a.keys));
  fmt::print("wrote {}\n", a.output);
}

}  // namespace

Command add_train(CLI::App& app) {
  auto args = std::make_shared<TrainArgs>();
  CLI::App* command = app.add_subcommand(
      "train",
      "GRPO or SFT with LoRA: train CONFIG.toml [--key value ...] [--resume [CHECKPOINT]]; keys are TRL's "
      "option names (src/train/train_config.h)");
  // Every option is a config key, so the arguments are read by hand rather than declared.
  command->prefix_command();
  return [args, command] {
    args->args = command->remaining();
    run_train(*args);
  };
}

Command add_plot(CLI::App& app) {
  auto args = std::make_shared<PlotArgs>();
  CLI::App* command = app.add_subcommand("plot", "Draw metrics.jsonl curves as an SVG");
  command->add_option("metrics", args->metrics, "metrics.jsonl written by `ossrl train`")->required();
  command->add_option("-o,--output", args->output, "SVG file to write")->capture_default_str();
  command->add_option("--keys", args->keys, "Metrics to draw, one panel each")->capture_default_str();
  return [args] { run_plot(*args); };
}

}  // namespace ossrl::cli

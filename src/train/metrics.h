// What training reports: one JSON object per line in output_dir/metrics.jsonl (TRL's metric
// names: "loss", "grad_norm", "learning_rate", "reward", "reward_std", "rewards/<f>/mean",
// "kl", "clip_ratio/region_mean", "completions/mean_length", eval rows' "eval_reward", ...,
// plus "step", "epoch", "step_time", "tokens_per_second"), a one-line console progress
// display, and `ossrl plot`'s SVG of chosen metrics against the step.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

namespace ossrl {

// Keys whose values depend on the machine's speed, not on the computation: everything
// else in a row is a pure function of the config and seed (what resume is checked on).
bool is_timing_metric(const std::string& key);

// Appends rows to a JSONL file, one flushed line each, so a killed run loses at most the
// line being written.
class MetricsLog {
 public:
  // Opens `path` for appending after keeping only the rows whose "step" is <=
  // keep_through_step (the file is replaced atomically): a fresh run passes -1 and starts
  // empty; a resumed run passes its checkpoint's step, and the rows a killed run wrote after
  // it are written again.
  MetricsLog(const std::string& path, int64_t keep_through_step);
  ~MetricsLog();
  MetricsLog(const MetricsLog&) = delete;
  MetricsLog& operator=(const MetricsLog&) = delete;

  void write(const nlohmann::json& row);
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::FILE* file_ = nullptr;
};

// Every row of a metrics file; a bad line is an Error naming the line.
std::vector<nlohmann::json> read_metrics(const std::string& path);

// The console line for a training row: "step 12/40  loss 0.0123  reward 0.61 ± 0.32  kl 0.002 ...",
// and for an eval row: "eval @ step 12: reward 0.71  exact_match 0.65 ...".
std::string progress_line(const nlohmann::json& row, int64_t total_steps);

// An SVG line chart (one panel per key, step on the x axis) of the rows that have each key.
// Keys absent from every row are skipped; an Error if none is present.
std::string plot_svg(const std::vector<nlohmann::json>& rows, const std::vector<std::string>& keys);

}  // namespace ossrl

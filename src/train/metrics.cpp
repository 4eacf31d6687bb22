#include "train/metrics.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <sstream>

#include "core/error.h"
#include "train/checkpoint.h"

namespace ossrl {

bool is_timing_metric(const std::string& key) {
  return key == "step_time" || key == "tokens_per_second" || key == "eval_time" || key == "elapsed";
}

MetricsLog::MetricsLog(const std::string& path, int64_t keep_through_step) : path_(path) {
  {
    std::string kept;
    if (std::ifstream in(path); in.good() && keep_through_step >= 0) {
      std::string line;
      while (std::getline(in, line)) {
        // A line cut short by a kill is not JSON; it is after the checkpoint anyway.
        const nlohmann::json row = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
        if (row.is_object() && row.value("step", int64_t{0}) <= keep_through_step) kept += line + "\n";
      }
    }
    write_file_atomic(path, kept);
  }
  file_ = std::fopen(path.c_str(), "a");
  OSSRL_CHECK(file_ != nullptr, "cannot open the metrics file {}: {}", path, std::strerror(errno));
}

MetricsLog::~MetricsLog() {
  if (file_) std::fclose(file_);
}

void MetricsLog::write(const nlohmann::json& row) {
  const std::string line = row.dump() + "\n";
  OSSRL_CHECK(std::fwrite(line.data(), 1, line.size(), file_) == line.size() && std::fflush(file_) == 0,
              "cannot write to {}: {}", path_, std::strerror(errno));
}

std::vector<nlohmann::json> read_metrics(const std::string& path) {
  std::ifstream in(path);
  OSSRL_CHECK(in.good(), "cannot read the metrics file {}", path);
  std::vector<nlohmann::json> rows;
  std::string line;
  for (int number = 1; std::getline(in, line); ++number) {
    if (line.empty()) continue;
    nlohmann::json row = nlohmann::json::parse(line, nullptr, false);
    OSSRL_CHECK(row.is_object(), "{}:{}: not a JSON object", path, number);
    rows.push_back(std::move(row));
  }
  return rows;
}

namespace {

// A number in 4 significant digits, or "-" for null/NaN (JSON writes NaN as null).
std::string num(const nlohmann::json& v) {
  if (!v.is_number()) return "-";
  const double x = v.get<double>();
  if (!std::isfinite(x)) return "-";
  return fmt::format("{:.4g}", x);
}

}  // namespace

std::string progress_line(const nlohmann::json& row, int64_t total_steps) {
  const int64_t step = row.value("step", int64_t{0});
  std::string out;
  auto add = [&](const std::string& label, const char* key) {
    if (row.contains(key)) out += fmt::format("  {} {}", label, num(row[key]));
  };
  if (row.contains("eval_reward")) {
    out = fmt::format("eval @ step {}:", step);
    add("reward", "eval_reward");
    for (const auto& [key, value] : row.items()) {
      const std::string prefix = "eval_rewards/", suffix = "/mean";
      if (key.rfind(prefix, 0) == 0 && key.size() > prefix.size() + suffix.size() &&
          key.compare(key.size() - suffix.size(), suffix.size(), suffix) == 0) {
        out += fmt::format("  {} {}", key.substr(prefix.size(), key.size() - prefix.size() - suffix.size()),
                           num(value));
      }
    }
    add("length", "eval_completions/mean_length");
    return out;
  }
  out = fmt::format("step {}/{}", step, total_steps);
  add("loss", "loss");
  if (row.contains("reward")) out += fmt::format("  reward {} ± {}", num(row["reward"]), num(row["reward_std"]));
  add("kl", "kl");
  add("clip", "clip_ratio/region_mean");
  add("len", "completions/mean_length");
  add("grad", "grad_norm");
  add("lr", "learning_rate");
  if (row.value("skipped", false)) out += "  SKIPPED (" + row.value("skip_reason", std::string("?")) + ")";
  if (row.contains("step_time")) out += fmt::format("  {:.2f} s", row["step_time"].get<double>());
  if (row.contains("tokens_per_second")) out += fmt::format("  {:.0f} tok/s", row["tokens_per_second"].get<double>());
  return out;
}

std::string plot_svg(const std::vector<nlohmann::json>& rows, const std::vector<std::string>& keys) {
  struct Series {
    std::string key;
    std::vector<std::pair<double, double>> points;  // (step, value)
  };
  std::vector<Series> series;
  for (const std::string& key : keys) {
    Series s{key, {}};
    for (const nlohmann::json& row : rows) {
      if (!row.contains(key) || !row[key].is_number() || !row.contains("step")) continue;
      const double v = row[key].get<double>();
      if (std::isfinite(v)) s.points.emplace_back(row["step"].get<double>(), v);
    }
    if (!s.points.empty()) series.push_back(std::move(s));
  }
  OSSRL_CHECK(!series.empty(), "none of the metrics {} is in the rows", fmt::join(keys, ", "));

  // One panel per series, stacked; each panel scales its own y range.
  constexpr double kWidth = 640, kPanel = 200, kLeft = 70, kRight = 20, kTop = 30, kBottom = 30;
  const double height = double(series.size()) * kPanel;
  std::ostringstream svg;
  svg << fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" font-family=\"sans-serif\" "
      "font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
      kWidth, height);
  for (size_t p = 0; p < series.size(); ++p) {
    const Series& s = series[p];
    double x0 = s.points.front().first, x1 = x0, y0 = s.points.front().second, y1 = y0;
    for (const auto& [x, y] : s.points) {
      x0 = std::min(x0, x), x1 = std::max(x1, x), y0 = std::min(y0, y), y1 = std::max(y1, y);
    }
    if (x1 == x0) x1 = x0 + 1;
    if (y1 == y0) y0 -= 0.5, y1 += 0.5;
    const double top = double(p) * kPanel + kTop, bottom = double(p + 1) * kPanel - kBottom;
    const double left = kLeft, right = kWidth - kRight;
    auto sx = [&](double x) { return left + (x - x0) / (x1 - x0) * (right - left); };
    auto sy = [&](double y) { return bottom - (y - y0) / (y1 - y0) * (bottom - top); };
    svg << fmt::format("<text x=\"{}\" y=\"{}\" font-weight=\"bold\">{}</text>\n", left, top - 10, s.key);
    svg << fmt::format(
        "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#999\"/>\n", left, top,
        right - left, bottom - top);
    svg << fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{:.4g}</text>\n", left - 5, top + 10, y1);
    svg << fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{:.4g}</text>\n", left - 5, bottom, y0);
    svg << fmt::format("<text x=\"{}\" y=\"{}\">step {:.0f}</text>\n", left, bottom + 16, x0);
    svg << fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"end\">step {:.0f}</text>\n", right, bottom + 16, x1);
    svg << "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.5\" points=\"";
    for (const auto& [x, y] : s.points) svg << fmt::format("{:.1f},{:.1f} ", sx(x), sy(y));
    svg << "\"/>\n";
  }
  svg << "</svg>\n";
  return svg.str();
}

}  // namespace ossrl

#include "train/checkpoint.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/error.h"
#include "train/peft_adapter.h"

namespace ossrl {

namespace fs = std::filesystem;

namespace {

constexpr const char* kPrefix = "checkpoint-";

void fsync_path(const std::string& path, int flags) {
  const int fd = ::open(path.c_str(), flags);
  if (fd < 0) return;
  ::fsync(fd);
  ::close(fd);
}

}  // namespace

void write_file_atomic(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    OSSRL_CHECK(out.good(), "cannot write {}: {}", tmp, std::strerror(errno));
    out.write(text.data(), std::streamsize(text.size()));
    out.flush();
    OSSRL_CHECK(out.good(), "cannot write {}: {}", tmp, std::strerror(errno));
  }
  fsync_path(tmp, O_RDONLY);
  OSSRL_CHECK(::rename(tmp.c_str(), path.c_str()) == 0, "cannot rename {} to {}: {}", tmp, path,
              std::strerror(errno));
  fsync_path(fs::path(path).parent_path().empty() ? "." : fs::path(path).parent_path().string(),
             O_RDONLY | O_DIRECTORY);
}

std::string checkpoint_dir(const std::string& output_dir, int64_t step) {
  return (fs::path(output_dir) / (kPrefix + std::to_string(step))).string();
}

std::optional<std::string> latest_checkpoint(const std::string& output_dir) {
  std::optional<std::string> best;
  int64_t best_step = -1;
  if (!fs::is_directory(output_dir)) return best;
  for (const fs::directory_entry& e : fs::directory_iterator(output_dir)) {
    const std::string name = e.path().filename().string();
    if (!e.is_directory() || name.rfind(kPrefix, 0) != 0) continue;
    const std::string digits = name.substr(std::strlen(kPrefix));
    if (digits.empty() || digits.find_first_not_of("0123456789") != std::string::npos) continue;  // .tmp
    const int64_t step = std::stoll(digits);
    if (step > best_step) best_step = step, best = e.path().string();
  }
  return best;
}

void save_checkpoint(const std::string& dir, const TrainerState& state, const Lora& lora, const AdamW& optimizer,
                     const std::string& base_model) {
  const std::string tmp = dir + ".tmp";
  std::error_code ec;
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp);
  save_peft_adapter(lora, (fs::path(tmp) / "adapter").string(), base_model);
  optimizer.save((fs::path(tmp) / "optimizer.safetensors").string());
  const nlohmann::json j = {{"global_step", state.global_step},
                            {"data_position", state.data_position},
                            {"config", state.config},
                            {"rollouts", state.rollouts}};
  write_file_atomic((fs::path(tmp) / "trainer_state.json").string(), j.dump(1));
  fsync_path(tmp, O_RDONLY | O_DIRECTORY);
  // A checkpoint of the same step from an earlier, killed run is replaced whole.
  fs::remove_all(dir, ec);
  OSSRL_CHECK(::rename(tmp.c_str(), dir.c_str()) == 0, "cannot rename {} to {}: {}", tmp, dir,
              std::strerror(errno));
  fsync_path(fs::path(dir).parent_path().string(), O_RDONLY | O_DIRECTORY);
}

TrainerState load_checkpoint(const std::string& dir, Lora& lora, AdamW& optimizer) {
  const std::string state_path = (fs::path(dir) / "trainer_state.json").string();
  std::ifstream in(state_path);
  OSSRL_CHECK(in.good(), "{} is not a checkpoint: cannot read {}", dir, state_path);
  std::stringstream text;
  text << in.rdbuf();
  const nlohmann::json j = nlohmann::json::parse(text.str(), nullptr, false);
  OSSRL_CHECK(j.is_object() && j.contains("global_step") && j.contains("data_position"),
              "{}: not a trainer state (global_step, data_position)", state_path);
  load_peft_weights(lora, (fs::path(dir) / "adapter").string());
  optimizer.load((fs::path(dir) / "optimizer.safetensors").string());
  TrainerState state;
  state.global_step = j["global_step"].get<int64_t>();
  state.data_position = j["data_position"].get<int64_t>();
  state.config = j.value("config", nlohmann::json());
  state.rollouts = j.value("rollouts", nlohmann::json());
  return state;
}

}  // namespace ossrl

// The acceptance test of checkpoints: `ossrl train` killed with SIGKILL after checkpoint-N,
// then resumed with --resume, writes the same metrics (timing aside) and the same final
// adapter as a run that was never stopped.
#include <gtest/gtest.h>

#include <fmt/format.h>

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "train/metrics.h"
#include "train_fixture.h"

namespace ossrl {
namespace {

namespace fs = std::filesystem;

// Runs `ossrl train` with args; returns its pid (not waited for).
pid_t spawn_train(const std::vector<std::string>& args, const std::string& log) {
  const pid_t pid = fork();
  if (pid == 0) {
    const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    dup2(fd, 1);
    dup2(fd, 2);
    std::vector<std::string> all = {OSSRL_BINARY, "train"};
    all.insert(all.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (std::string& a : all) argv.push_back(a.data());
    argv.push_back(nullptr);
    execv(argv[0], argv.data());
    _exit(127);
  }
  return pid;
}

int wait_exit(pid_t pid) {
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// The rows without the keys that measure the machine rather than the computation.
std::vector<nlohmann::json> without_timing(std::vector<nlohmann::json> rows) {
  for (nlohmann::json& row : rows) {
    for (auto it = row.begin(); it != row.end();) {
      it = is_timing_metric(it.key()) ? row.erase(it) : std::next(it);
    }
  }
  return rows;
}

TEST(Resume, SigkillThenResumeEqualsAnUninterruptedRun) {
  const std::string dir = testing::train_fixture().dir + "/resume";
  fs::remove_all(dir);
  fs::create_directories(dir);
  // Everything random in play: sampling at temperature > 1, a KL term (reference pass),
  // num_iterations 2 (checkpoints in mid-cycle carry the generation batch), a warmup
  // schedule, evaluation every 2 steps. (LoRA dropout is exercised by the policy's tests; a
  // PEFT adapter on the experts cannot record it.)
  TrainConfig c = testing::small_grpo_config("unused");
  std::ofstream(dir + "/config.toml") << fmt::format(
      R"(trainer = "grpo"
model_name_or_path = "{}"
dataset = "{}"
eval_split = 0.1
eval_steps = 2
system_message = false
assistant_prefix = "<|channel|>final<|message|>"
max_completion_length = 3
num_generations = 4
per_device_train_batch_size = 8
gradient_accumulation_steps = 2
num_iterations = 2
temperature = 1.3
beta = 0.02
max_steps = 10
save_steps = 1
learning_rate = 3e-3
lr_scheduler_type = "linear"
warmup_steps = 2
seed = 3
lora_r = 4
lora_target_modules = ["q_proj", "v_proj", "experts"]
rewards = [{{type = "exact_match", field = "answer"}}, "format"]
reward_weights = [1.0, 0.2]
)",
      c.model_name_or_path, c.dataset);

  // Start from a briefly warmed-up adapter: an untrained model's rollouts all score 0, so
  // every advantage would be 0, nothing would train, and equal metrics would prove little.
  ASSERT_EQ(wait_exit(spawn_train({dir + "/config.toml", "--output_dir", dir + "/sft", "--trainer", "sft",
                                   "--max_steps", "15", "--learning_rate", "1e-2", "--save_steps", "0",
                                   "--eval_steps", "0", "--lora_dropout", "0"},
                                  dir + "/sft.log")),
            0)
      << read_file(dir + "/sft.log");
  std::ofstream(dir + "/config.toml", std::ios::app) << "adapter_name_or_path = \"" << dir << "/sft/adapter\"\n";

  const std::string a = dir + "/a", b = dir + "/b";
  ASSERT_EQ(wait_exit(spawn_train({dir + "/config.toml", "--output_dir", a}, dir + "/a.log")), 0)
      << read_file(dir + "/a.log");

  // Kill b as soon as checkpoint-3 (mid-cycle: step 3 of num_iterations 2) is complete.
  const pid_t pid = spawn_train({dir + "/config.toml", "--output_dir", b}, dir + "/b.log");
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (!fs::exists(b + "/checkpoint-3") && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  ASSERT_EQ(kill(pid, SIGKILL), 0);
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFSIGNALED(status)) << "the run ended before it was killed: " << read_file(dir + "/b.log");
  ASSERT_FALSE(fs::exists(b + "/checkpoint-10"));

  ASSERT_EQ(wait_exit(spawn_train({dir + "/config.toml", "--output_dir", b, "--resume"}, dir + "/b.log")), 0)
      << read_file(dir + "/b.log");
  EXPECT_NE(read_file(dir + "/b.log").find("resumed at step"), std::string::npos);

  const std::vector<nlohmann::json> rows_a = without_timing(read_metrics(a + "/metrics.jsonl"));
  const std::vector<nlohmann::json> rows_b = without_timing(read_metrics(b + "/metrics.jsonl"));
  ASSERT_EQ(rows_a.size(), 10u + 6u);  // 10 steps, evaluations at 0, 2, 4, 6, 8, 10
  ASSERT_EQ(rows_a.size(), rows_b.size());
  for (size_t i = 0; i < rows_a.size(); ++i) EXPECT_EQ(rows_a[i], rows_b[i]) << "row " << i;
  // Bit for bit: the trained adapters are the same bytes.
  EXPECT_EQ(read_file(a + "/adapter/adapter_model.safetensors"), read_file(b + "/adapter/adapter_model.safetensors"));
  // The runs did learn something (the rows are not trivially equal): rewards varied, the
  // adapter moved.
  double grad = 0;
  for (const nlohmann::json& row : rows_a) grad += row.value("grad_norm", 0.0);
  EXPECT_GT(grad, 0.0);
}

}  // namespace
}  // namespace ossrl

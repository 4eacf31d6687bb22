// The external reward process against reward_program (built beside this test), one mode per
// way a program can behave or misbehave. Timeouts are 300 ms so the suite stays fast; time
// bounds allow for a loaded 2-core machine (starting a process takes milliseconds).
#include "rewards/external.h"

#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "core/error.h"

namespace ossrl {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

ExternalReward::Options program(std::vector<std::string> args) {
  ExternalReward::Options options;
  options.command = {OSSRL_REWARD_PROGRAM};
  options.command.insert(options.command.end(), args.begin(), args.end());
  options.timeout = 300ms;
  return options;
}

RewardInput input(double x, std::optional<std::string> final_answer = "42") {
  return {.prompt = "<|start|>user<|message|>q<|end|><|start|>assistant",
          .completion = "<|channel|>final<|message|>42<|return|>",
          .final_answer = std::move(final_answer),
          .well_formed = true,
          .completion_tokens = 5,
          .fields = {{"x", x}}};
}

std::vector<RewardInput> batch_of(size_t n) {
  std::vector<RewardInput> batch;
  for (size_t i = 0; i < n; ++i) batch.push_back(input(double(i)));
  return batch;
}

// True when `pid` is no child of ours any more: reaped, not a zombie we forgot.
bool reaped(pid_t pid) { return ::waitpid(pid, nullptr, WNOHANG) == -1 && errno == ECHILD; }

// True when `pid` has died within `wait` (gone, or a zombie waiting for its new parent, which
// is not us: a program's child is reparented when the program dies).
bool dies_within(pid_t pid, std::chrono::milliseconds wait) {
  const auto deadline = Clock::now() + wait;
  for (;;) {
    std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
    std::string text((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
    if (!stat || text.empty()) return true;
    size_t paren = text.rfind(')');
    if (paren != std::string::npos && paren + 2 < text.size() && text[paren + 2] == 'Z') return true;
    if (Clock::now() >= deadline) return false;
    std::this_thread::sleep_for(5ms);
  }
}

std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() / (name + "." + std::to_string(::getpid()))).string();
}

// The ossrl::Error message of score(batch), or "" if it did not throw.
std::string score_error(ExternalReward& reward, const std::vector<RewardInput>& batch) {
  try {
    reward.score(batch);
  } catch (const Error& error) {
    return error.what();
  }
  return "";
}

TEST(ExternalReward, ScoresBatchesInOrder) {
  ExternalReward reward(program({"score"}));
  EXPECT_EQ(reward.name(), "reward_program");
  for (int round = 0; round < 3; ++round) {
    std::vector<double> rewards = reward.score({input(1), input(2.5), input(3, std::nullopt)});
    ASSERT_EQ(rewards.size(), 3u);
    EXPECT_EQ(rewards[0], 2);
    EXPECT_EQ(rewards[1], 5);
    EXPECT_TRUE(std::isnan(rewards[2])) << "null must become NaN, got " << rewards[2];
  }
  EXPECT_TRUE(reward.score({}).empty());
  EXPECT_EQ(reward.starts(), 1);
}

TEST(ExternalReward, StderrGoesToTheLogPrefixed) {
  const std::string log = temp_path("ossrl_reward_stderr");
  std::filesystem::remove(log);
  {
    ExternalReward::Options options = program({"score"});
    options.name = "judge";
    options.stderr_log = log;
    ExternalReward reward(options);
    reward.score(batch_of(3));
    reward.score(batch_of(2));
  }  // the destructor joins the stderr pump, so the log is complete here
  std::ifstream in(log);
  std::stringstream text;
  text << in.rdbuf();
  EXPECT_EQ(text.str(), "[judge] batch 1 of 3\n[judge] batch 2 of 2\n");
  std::filesystem::remove(log);
}

// Text cut inside a UTF-8 sequence must not fail the batch: it travels with U+FFFD.
TEST(ExternalReward, InvalidUtf8IsReplaced) {
  ExternalReward reward(program({"length"}));
  RewardInput cut = input(0);
  cut.completion = "caf\xC3";
  std::vector<double> rewards = reward.score({cut});
  ASSERT_EQ(rewards.size(), 1u);
  EXPECT_EQ(rewards[0], 6);  // "caf" + EF BF BD
}

TEST(ExternalReward, CrashOnSecondBatchRestarts) {
  ExternalReward reward(program({"crash_on", "2"}));
  EXPECT_EQ(reward.score(batch_of(2)), std::vector<double>(2, 1.0));
  pid_t first = reward.pid();
  // The fresh process counts batches from 1 again, so the retried batch succeeds.
  EXPECT_EQ(reward.score(batch_of(2)), std::vector<double>(2, 1.0));
  EXPECT_EQ(reward.starts(), 2);
  EXPECT_NE(reward.pid(), first);
  EXPECT_TRUE(reaped(first));
}

// A program that dies between batches is noticed before the next batch is sent.
TEST(ExternalReward, ExitBetweenBatchesRestarts) {
  ExternalReward reward(program({"exit_after", "1"}));
  EXPECT_EQ(reward.score(batch_of(1)), std::vector<double>(1, 1.0));
  EXPECT_EQ(reward.score(batch_of(1)), std::vector<double>(1, 1.0));
  EXPECT_EQ(reward.starts(), 2);
}

TEST(ExternalReward, HangTimesOutAndKillsTheProcessGroup) {
  const std::string pidfile = temp_path("ossrl_reward_hang");
  ExternalReward reward(program({"hang", pidfile}));
  pid_t first = reward.pid();
  auto start = Clock::now();
  std::string error = score_error(reward, batch_of(2));
  auto elapsed = Clock::now() - start;
  EXPECT_NE(error.find("external reward 'reward_program'"), std::string::npos) << error;
  EXPECT_NE(error.find("did not reply within 300 ms; after a restart it did not reply within 300 ms"),
            std::string::npos)
      << error;
  // Two attempts of 300 ms each, plus kills and one restart.
  EXPECT_GE(elapsed, 600ms);
  EXPECT_LT(elapsed, 2000ms);
  EXPECT_EQ(reward.pid(), -1);
  EXPECT_EQ(reward.starts(), 2);
  EXPECT_TRUE(reaped(first));
  // The second program's own child was in its process group: killed with it.
  pid_t grandchild = 0;
  std::ifstream(pidfile) >> grandchild;
  ASSERT_GT(grandchild, 0);
  EXPECT_TRUE(dies_within(grandchild, 1000ms)) << "grandchild " << grandchild << " still runs";
  std::filesystem::remove(pidfile);
}

TEST(ExternalReward, NanPolicyKeepsTrainingGoing) {
  ExternalReward::Options options = program({"crash_on", "1"});
  options.on_failure = ExternalReward::OnFailure::Nan;
  ExternalReward reward(options);
  std::vector<double> rewards = reward.score(batch_of(3));
  ASSERT_EQ(rewards.size(), 3u);
  for (double r : rewards) EXPECT_TRUE(std::isnan(r)) << r;
  EXPECT_EQ(reward.starts(), 2);
  // The next batch starts a fresh program (which crashes again).
  reward.score(batch_of(1));
  EXPECT_EQ(reward.starts(), 4);
}

TEST(ExternalReward, CrashTwiceNamesTheSignal) {
  ExternalReward reward(program({"crash_on", "1"}));
  std::string error = score_error(reward, batch_of(1));
  EXPECT_NE(error.find("closed its stdout before replying (was killed by signal 6 (SIGABRT))"), std::string::npos)
      << error;
}

// Each malformed reply is retried once after a restart, then reported with the reply quoted.
TEST(ExternalReward, MalformedRepliesAreClearErrors) {
  struct Case {
    std::vector<std::string> args;
    std::string expected;
  };
  const std::vector<Case> cases = {
      {{"garbage"}, "replied with a line that is not JSON: 'this is not json'"},
      {{"wrong_count"}, "replied with 2 rewards for a batch of 3: '{\"rewards\":[1.0,1.0]}'"},
      {{"non_numeric"}, "replied with reward 0 = \"a\", not a number or null"},
      {{"two_lines"}, "replied with more than one line: '{\"rewards\":[1.0,1.0,1.0]}\\x0a{"},
      {{"huge"}, "replied with more than 1000 bytes in one line: '1111"},
      {{"close_stdout"}, "closed its stdout"},
  };
  for (const Case& c : cases) {
    ExternalReward::Options options = program(c.args);
    options.max_reply_bytes = 1000;
    ExternalReward reward(options);
    pid_t first = reward.pid();
    std::string error = score_error(reward, batch_of(3));
    EXPECT_NE(error.find("external reward 'reward_program' (" OSSRL_REWARD_PROGRAM " " + c.args[0] + ") "),
              std::string::npos)
        << error;
    EXPECT_NE(error.find(c.expected), std::string::npos) << c.args[0] << ": " << error;
    EXPECT_NE(error.find("after a restart it"), std::string::npos) << error;
    EXPECT_EQ(reward.starts(), 2) << c.args[0];
    EXPECT_TRUE(reaped(first)) << c.args[0];
  }
}

TEST(ExternalReward, QuotedRepliesAreCut) {
  ExternalReward::Options options = program({"huge"});
  options.max_reply_bytes = 100'000;
  ExternalReward reward(options);
  std::string error = score_error(reward, batch_of(1));
  // 200 quoted bytes and "'...", twice: the message stays readable.
  EXPECT_NE(error.find("'" + std::string(200, '1') + "'..."), std::string::npos) << error.substr(0, 400);
  EXPECT_LT(error.size(), 800u);
}

TEST(ExternalReward, ProgramThatCannotStart) {
  ExternalReward::Options options;
  options.command = {"/nonexistent/reward"};
  try {
    ExternalReward reward(options);
    FAIL() << "started a program that does not exist";
  } catch (const Error& error) {
    EXPECT_STREQ(error.what(), "external reward 'reward': cannot run /nonexistent/reward: No such file or directory");
  }
}

// argv goes to the program as given, with no shell parsing in between.
TEST(ExternalReward, ShellScriptAsProgram) {
  ExternalReward::Options options;
  options.command = {"/bin/sh", "-c", R"(while read -r line; do echo '{"rewards": [0.5, null]}'; done)"};
  ExternalReward reward(options);
  EXPECT_EQ(reward.name(), "sh");
  std::vector<double> rewards = reward.score(batch_of(2));
  EXPECT_EQ(rewards[0], 0.5);
  EXPECT_TRUE(std::isnan(rewards[1]));
}

// A program that ignores the end of its stdin is killed after the grace period, with its
// children.
TEST(ExternalReward, DestructorKillsAndReaps) {
  const std::string pidfile = temp_path("ossrl_reward_destroy");
  pid_t leader = -1;
  auto start = Clock::now();
  {
    ExternalReward reward(program({"hang", pidfile}));
    leader = reward.pid();
    // Let it write its pidfile.
    for (int i = 0; i < 200 && !std::filesystem::exists(pidfile); ++i) std::this_thread::sleep_for(5ms);
  }
  auto elapsed = Clock::now() - start;
  EXPECT_TRUE(reaped(leader));
  EXPECT_LT(elapsed, 1500ms);  // 200 ms grace, plus start-up
  pid_t grandchild = 0;
  std::ifstream(pidfile) >> grandchild;
  ASSERT_GT(grandchild, 0);
  EXPECT_TRUE(dies_within(grandchild, 1000ms)) << "grandchild " << grandchild << " still runs";
  std::filesystem::remove(pidfile);
}

// A well-behaved program exits on the end of stdin, well before the grace period ends.
TEST(ExternalReward, DestructorLetsAProgramExit) {
  auto reward = std::make_unique<ExternalReward>(program({"score"}));
  pid_t leader = reward->pid();
  reward->score(batch_of(1));
  auto start = Clock::now();
  reward.reset();
  EXPECT_LT(Clock::now() - start, 150ms);  // the grace period is 200 ms
  EXPECT_TRUE(reaped(leader));
}

TEST(ExternalReward, FromConfig) {
  std::unique_ptr<RewardFunction> reward = make_reward(
      {{"type", "external"}, {"command", {OSSRL_REWARD_PROGRAM, "score"}}, {"timeout_s", 5}, {"name", "judge"}});
  EXPECT_EQ(reward->name(), "judge");
  EXPECT_EQ(reward->score({input(4)}), std::vector<double>{8});

  auto error_of = [](const nlohmann::json& spec) -> std::string {
    try {
      make_reward(spec);
    } catch (const Error& error) {
      return error.what();
    }
    return "";
  };
  EXPECT_EQ(error_of({{"type", "external"}, {"command", "python3 judge.py"}}),
            "reward 'external': option \"command\" must be a non-empty array of strings (argv; no shell is used), "
            "not \"python3 judge.py\"");
  EXPECT_EQ(error_of({{"type", "external"}}), "reward 'external' needs the option \"command\"");
  EXPECT_EQ(error_of({{"type", "external"}, {"command", {"x"}}, {"on_failure", "ignore"}}),
            "reward 'external': on_failure must be \"error\" or \"nan\", not \"ignore\"");
  EXPECT_EQ(error_of({{"type", "external"}, {"command", {"x"}}, {"timeout_s", 0}}),
            "reward 'external': timeout_s must be positive, not 0");
}

}  // namespace
}  // namespace ossrl

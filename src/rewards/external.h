// The external reward process: any program that reads batches of completions as JSON lines
// on stdin and answers each with one line of rewards on stdout, in any language.
//
// Protocol (docs/rewards.md has an example program). For each batch ossrl writes ONE line
//
//   {"batch": [{"prompt": "...", "completion": "...", "final_answer": "..." | null,
//               "fields": {...}, "well_formed": true, "truncated": false,
//               "completion_tokens": 123}, ...]}
//
// and reads ONE line back:
//
//   {"rewards": [r0, r1, ...]}
//
// one entry per completion, in order: a number, or null for "no reward" (NaN to the trainer).
// Strings are JSON-escaped, so a line never contains a raw newline; text that is not valid
// UTF-8 is sent with U+FFFD in place of bad bytes. The program must flush stdout after each
// reply, and should exit when stdin ends. Its stderr is copied line by line to ossrl's stderr
// (or to a log file), each line prefixed with "[name] ".
//
// Failures. The program runs in its own process group, started with argv as given (no
// shell, PATH searched for argv[0]). A batch fails when the program does not reply within
// `timeout`, exits or closes its stdin/stdout (a crash), or replies with something that is
// not such a line (not JSON, the wrong number of rewards, a reward that is not a number or
// null, more than `max_reply_bytes` or more than one line). Then the whole process group is
// killed and reaped, the program restarted and the batch sent once more; if that fails too,
// `on_failure` decides: Error throws an ossrl::Error naming the program and the failure
// (quoting the start of a bad reply), Nan logs the failure and returns NaN rewards, so the
// batch teaches nothing but training goes on. A program that cannot be started at all
// always throws. A batch therefore costs at most 2 * timeout plus two restarts.
//
// Not thread-safe: one score() at a time. The destructor closes the program's stdin, gives
// it a moment to exit, then kills its process group; no process is left behind.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "rewards/reward.h"

namespace ossrl {

class ExternalReward : public RewardFunction {
 public:
  enum class OnFailure { Error, Nan };

  struct Options {
    std::vector<std::string> command;                 // argv; command[0] searched in PATH
    std::string name;                                 // metrics name; default: basename of command[0]
    std::chrono::milliseconds timeout{60'000};        // per batch, from writing to the reply's end
    size_t max_reply_bytes = size_t{1} << 20;         // one reply line, newline excluded
    OnFailure on_failure = OnFailure::Error;          // after the one retry also fails
    std::string stderr_log;                           // append stderr here; empty: our stderr
  };

  // Starts the program, so a wrong command fails here rather than at the first batch.
  explicit ExternalReward(Options options);
  ~ExternalReward() override;
  ExternalReward(const ExternalReward&) = delete;
  ExternalReward& operator=(const ExternalReward&) = delete;

  const std::string& name() const override { return options_.name; }
  std::vector<double> score(const std::vector<RewardInput>& batch) override;

  // The running program's pid (its process group id too), or -1 while none runs: after a
  // failure that was not retried, the next score() starts it again. For logs and tests.
  pid_t pid() const;
  // How many times the program was started, the first included.
  int starts() const { return starts_; }

 private:
  struct Process;

  void start();
  std::vector<double> exchange(const std::string& request, size_t count);

  Options options_;
  int log_fd_ = -1;  // stderr_log, opened once; -1: our stderr
  std::unique_ptr<Process> process_;
  int starts_ = 0;
};

}  // namespace ossrl

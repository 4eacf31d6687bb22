// A stand-in external reward program for external_test.cpp: one binary, a behaviour per
// mode, so the tests need no interpreter. Reads batch lines on stdin, answers on stdout.
//
//   reward_program score            well behaved: fields.x * 2, or null without a final
//                                   answer; the reply written in two pieces; one stderr line
//                                   per batch
//   reward_program length           the byte length of each completion as it arrived
//   reward_program crash_on N       aborts on its Nth batch (counting from 1) without replying
//   reward_program exit_after N     replies to N batches, then exits 0
//   reward_program hang PIDFILE     starts a child that sleeps (its pid written to PIDFILE),
//                                   then never replies and ignores the end of stdin
//   reward_program garbage          replies "this is not json"
//   reward_program wrong_count      replies one reward too few
//   reward_program non_numeric      replies "a" as every reward
//   reward_program huge             replies 1 MB with no newline
//   reward_program two_lines        replies a good line twice
//   reward_program close_stdout     closes stdout at once, then reads stdin until it ends
#include <signal.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>
#include <string_view>

namespace {

void write_out(std::string_view text) {
  while (!text.empty()) {
    ssize_t n = ::write(STDOUT_FILENO, text.data(), text.size());
    if (n <= 0) std::exit(1);
    text.remove_prefix(size_t(n));
  }
}

std::string rewards_line(const nlohmann::json& rewards) { return nlohmann::json{{"rewards", rewards}}.dump() + "\n"; }

nlohmann::json ones(size_t n) { return nlohmann::json(std::vector<double>(n, 1.0)); }

[[noreturn]] void sleep_forever() {
  for (;;) ::pause();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: reward_program MODE [ARG]\n");
    return 2;
  }
  std::ios::sync_with_stdio(false);  // getline on a synced cin reads a byte at a time
  const std::string mode = argv[1];
  const long arg = argc > 2 ? std::atol(argv[2]) : 0;

  if (mode == "close_stdout") {
    ::close(STDOUT_FILENO);
    std::string line;
    while (std::getline(std::cin, line)) {
    }
    return 0;
  }
  if (mode == "hang") {
    pid_t child = ::fork();
    if (child == 0) sleep_forever();
    std::ofstream(argv[2]) << child << "\n";
    sleep_forever();
  }

  std::string line;
  for (long batch_number = 1; std::getline(std::cin, line); ++batch_number) {
    const nlohmann::json batch = nlohmann::json::parse(line).at("batch");
    if (mode == "score") {
      std::fprintf(stderr, "batch %ld of %zu\n", batch_number, batch.size());
      nlohmann::json rewards = nlohmann::json::array();
      for (const nlohmann::json& item : batch) {
        rewards.push_back(item.at("final_answer").is_null() ? nlohmann::json() : nlohmann::json(2 * item.at("fields").at("x").get<double>()));
      }
      std::string reply = rewards_line(rewards);
      write_out(std::string_view(reply).substr(0, reply.size() / 2));
      ::usleep(5000);
      write_out(std::string_view(reply).substr(reply.size() / 2));
    } else if (mode == "length") {
      nlohmann::json rewards = nlohmann::json::array();
      for (const nlohmann::json& item : batch) rewards.push_back(item.at("completion").get<std::string>().size());
      write_out(rewards_line(rewards));
    } else if (mode == "crash_on") {
      if (batch_number == arg) {
        ::prctl(PR_SET_DUMPABLE, 0);  // no core dump: the test waits only 50 ms for the exit
        std::abort();
      }
      write_out(rewards_line(ones(batch.size())));
    } else if (mode == "exit_after") {
      write_out(rewards_line(ones(batch.size())));
      if (batch_number == arg) return 0;
    } else if (mode == "garbage") {
      write_out("this is not json\n");
    } else if (mode == "wrong_count") {
      write_out(rewards_line(ones(batch.size() - 1)));
    } else if (mode == "non_numeric") {
      write_out(rewards_line(nlohmann::json(std::vector<std::string>(batch.size(), "a"))));
    } else if (mode == "huge") {
      write_out(std::string(1 << 20, '1'));
    } else if (mode == "two_lines") {
      write_out(rewards_line(ones(batch.size())) + rewards_line(ones(batch.size())));
    } else {
      std::fprintf(stderr, "unknown mode %s\n", mode.c_str());
      return 2;
    }
  }
  return 0;
}

// The reward-hack catalogue (tests/rewards/hacks/, one hack per file, its header says what
// it tries and what stops it): every one must earn no correctness and no speed reward, and
// the harness must survive all of them and still score an honest solution right after.
// Run four ways: as shipped; without the static check (the import guard and the sandbox
// must hold); with neither (the sandbox alone: the candidate gets real builtins and
// imports); and that again without namespaces (the fallback for containers).
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <set>
#include <fstream>
#include <sstream>

#include "rewards/matmul_env.h"

namespace ossrl {
namespace {

struct Mode {
  const char* name;
  bool static_check;
  bool import_guard;
  bool namespaces;
};

std::vector<std::pair<std::string, std::string>> catalogue() {
  std::vector<std::pair<std::string, std::string>> hacks;
  for (const auto& entry : std::filesystem::directory_iterator(OSSRL_HACKS_DIR)) {
    if (entry.path().extension() != ".py") continue;
    std::ifstream file(entry.path());
    std::stringstream text;
    text << file.rdbuf();
    hacks.emplace_back(entry.path().filename().string(), text.str());
  }
  std::sort(hacks.begin(), hacks.end());
  return hacks;
}

class MatmulHacks : public ::testing::TestWithParam<Mode> {};

TEST_P(MatmulHacks, EveryHackEarnsNothingAndTheHarnessSurvives) {
  if (!GetParam().namespaces && !sandbox_support().landlock) GTEST_SKIP() << "no Landlock: no fallback sandbox here";
  const auto hacks = catalogue();
  ASSERT_GE(hacks.size(), 25u);
  MatmulOptions options;
  options.static_check = GetParam().static_check;
  options.import_guard = GetParam().import_guard;
  options.use_namespaces = GetParam().namespaces;
  options.workers = 2;
  options.load_seconds = 2;  // the endless loops run into these
  options.case_seconds = 1;
  options.timed_repetitions = 1;
  const MatmulEnv env(options);

  std::vector<std::string> codes;
  for (const auto& [name, code] : hacks) codes.push_back(code);
  const std::vector<MatmulScore> scores = env.evaluate(codes);
  for (size_t i = 0; i < hacks.size(); ++i) {
    const MatmulScore& s = scores[i];
    EXPECT_FALSE(s.correct) << hacks[i].first << ": " << s.detail;
    EXPECT_EQ(s.speed, 0.0) << hacks[i].first;
    EXPECT_LE(s.total, 1.0) << hacks[i].first << ": format and compiles at most";
    EXPECT_FALSE(s.detail.empty()) << hacks[i].first << ": a failure says why";
  }

  // Still standing: an honest solution right after is scored in full.
  const MatmulScore honest = env.evaluate_one(
      "def matmul(A, B):\n    return [[sum(a * b for a, b in zip(r, c)) for c in zip(*B)] for r in A]\n");
  EXPECT_TRUE(honest.correct) << honest.detail;
  EXPECT_TRUE(honest.clean);
}

// With the static check on, the hacks that need an import, a forbidden builtin or a dunder
// never run; the ones written to pass it are exactly these.
TEST(MatmulHacksStatic, OnlyTheHacksWrittenToPassTheStaticCheckGetPastIt) {
  const std::set<std::string> pass_static = {
      "10_typing_sys.py",         "11_typing_eval_gadget.py", "16_cache_by_shape.py", "17_first_answer_forever.py",
      "20_equal_to_anything.py",  "21_lazy_result.py",        "22_int_subclass.py",   "24_exit_zero_in_call.py",
      "25_exit_at_load.py",       "26_fake_protocol.py",      "27_huge_memory.py",    "29_infinite_loop_load.py",
      "30_infinite_loop_call.py", "31_output_flood.py"};
  MatmulOptions options;
  options.workers = 2;
  options.load_seconds = 2;
  options.case_seconds = 1;
  options.timed_repetitions = 1;
  const auto hacks = catalogue();
  std::vector<std::string> codes;
  for (const auto& [name, code] : hacks) codes.push_back(code);
  const std::vector<MatmulScore> scores = MatmulEnv(options).evaluate(codes);
  for (size_t i = 0; i < hacks.size(); ++i) {
    const bool expected_clean = pass_static.count(hacks[i].first) > 0;
    EXPECT_EQ(scores[i].detail.starts_with("forbidden: "), !expected_clean) << hacks[i].first << ": " << scores[i].detail;
    if (!expected_clean) EXPECT_EQ(scores[i].total, -3.0) << hacks[i].first;
  }
}

// The catalogue is not vacuous: outside the sandbox, the hack that beats both Python-level
// checks (the typing eval gadget reaching ctypes and BLAS) computes the right product.
TEST(MatmulHacksControl, TheEvalGadgetWorksOutsideTheSandbox) {
  if (!std::filesystem::exists("/usr/lib/x86_64-linux-gnu/libblas.so.3")) GTEST_SKIP() << "no system BLAS";
  const std::string command = std::string("/usr/bin/python3 -I -S -c \"exec(open('") + OSSRL_HACKS_DIR +
                              "/11_typing_eval_gadget.py').read()); print(matmul([[1, 2]], [[3], [4]]))\" 2>&1";
  FILE* pipe = popen(command.c_str(), "r");
  ASSERT_NE(pipe, nullptr);
  char buffer[256] = {};
  const size_t n = fread(buffer, 1, sizeof buffer - 1, pipe);
  pclose(pipe);
  EXPECT_EQ(std::string(buffer, n), "[[11.0]]\n");
}

INSTANTIATE_TEST_SUITE_P(Modes, MatmulHacks,
                         ::testing::Values(Mode{"shipped", true, true, true},
                                           Mode{"no_static_check", false, true, true},
                                           Mode{"sandbox_only", false, false, true},
                                           Mode{"fallback_sandbox_only", false, false, false}),
                         [](const auto& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace ossrl

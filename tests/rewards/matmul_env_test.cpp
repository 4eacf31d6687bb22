// The matmul environment on honest and on wrong (but not hacking) solutions: the parts,
// the total, extraction from completions, the worker pool and its throughput.
#include "rewards/matmul_env.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cmath>

namespace ossrl {
namespace {

MatmulOptions quick_options() {
  MatmulOptions options;
  options.workers = 2;
  return options;
}

constexpr const char* kNaive = R"(def matmul(A, B):
    m, k, n = len(A), len(B), len(B[0])
    C = [[0] * n for _ in range(m)]
    for i in range(m):
        for j in range(n):
            s = 0
            for t in range(k):
                s += A[i][t] * B[t][j]
            C[i][j] = s
    return C
)";

// i-k-j: the inner loop walks a row of B and a row of C.
constexpr const char* kReordered = R"(from typing import List


def matmul(A: List[List[float]], B: List[List[float]]) -> List[List[float]]:
    n = len(B[0])
    C = []
    for row in A:
        out = [0] * n
        for a, brow in zip(row, B):
            for j in range(n):
                out[j] += a * brow[j]
        C.append(out)
    return C


if __name__ == "__main__":
    print(matmul([[1, 2]], [[3], [4]]))
)";

// Tiles of 16: the cache-blocked loop nest of a C kernel, written in Python.
constexpr const char* kBlocked = R"(import itertools

BLOCK = 16


def matmul(A, B):
    m, k, n = len(A), len(B), len(B[0])
    C = [[0] * n for _ in range(m)]
    for i0, t0, j0 in itertools.product(range(0, m, BLOCK), range(0, k, BLOCK), range(0, n, BLOCK)):
        for i in range(i0, min(i0 + BLOCK, m)):
            Ci, Ai = C[i], A[i]
            for t in range(t0, min(t0 + BLOCK, k)):
                a, Bt = Ai[t], B[t]
                for j in range(j0, min(j0 + BLOCK, n)):
                    Ci[j] += a * Bt[j]
    return C
)";

// Columns once, then C-level loops: sum(map(mul, row, column)).
constexpr const char* kMapSum = R"(import operator


def matmul(A, B):
    columns = list(zip(*B))
    mul = operator.mul
    return [[sum(map(mul, row, column)) for column in columns] for row in A]
)";

TEST(MatmulEnv, HonestSolutionsScoreInFull) {
  const MatmulEnv env(quick_options());
  const std::vector<std::string> codes = {kNaive, kReordered, kBlocked, kMapSum};
  const std::vector<MatmulScore> scores = env.evaluate(codes);
  for (size_t i = 0; i < codes.size(); ++i) {
    const MatmulScore& s = scores[i];
    EXPECT_TRUE(s.format && s.clean && s.compiles && s.correct) << i << ": " << s.detail;
    EXPECT_GT(s.speedup, 0) << i;
    EXPECT_EQ(s.speed, std::clamp(std::log2(s.speedup), -1.0, 2.0));
    EXPECT_DOUBLE_EQ(s.total, 4.0 + s.speed);
  }
  // The naive solution is the reference itself: its speedup is noise around 1 (CPU time,
  // three products; 0.6..1.6 leaves room for two cores shared with other work).
  EXPECT_GT(scores[0].speedup, 0.6) << scores[0].detail;
  EXPECT_LT(scores[0].speedup, 1.6) << scores[0].detail;
  // sum(map(mul, ...)) runs the inner loop in C: clearly faster (measured 1.5..1.7).
  EXPECT_GT(scores[3].speedup, 1.25) << scores[3].detail;
}

TEST(MatmulEnv, FloatsWithinRoundingTuplesAndFloatAccumulatorsAreCorrect) {
  const MatmulEnv env(quick_options());
  const std::vector<MatmulScore> scores = env.evaluate({
      // Summed in another order (fsum is exactly rounded): rounding differs, still correct.
      "import math\ndef matmul(A, B):\n    return [[math.fsum(a * b for a, b in zip(r, c)) for c in zip(*B)] for r in A]\n",
      // Tuples of tuples, float accumulators on int inputs (exact below 2^53).
      "def matmul(A, B):\n    return tuple(tuple(sum((float(a) * b for a, b in zip(r, c)), 0.0) for c in zip(*B)) for r in A)\n",
  });
  for (const MatmulScore& s : scores) EXPECT_TRUE(s.correct) << s.detail;
}

TEST(MatmulEnv, WrongSolutionsAreNotCorrect) {
  const MatmulEnv env(quick_options());
  const std::vector<std::string> codes = {
      // B @ A's shape / transposed result
      "def matmul(A, B):\n    return [[sum(a * b for a, b in zip(r, c)) for r in A] for c in zip(*B)]\n",
      // off by one: drops the last term
      "def matmul(A, B):\n    return [[sum(a * b for a, b in zip(r[:-1], c[:-1])) for c in zip(*B)] for r in A]\n",
      // only right for square matrices
      "def matmul(A, B):\n    n = len(A)\n    return [[sum(A[i][t] * B[t][j] for t in range(n)) for j in range(n)] for i in range(n)]\n",
      // float32-like precision loss
      "def matmul(A, B):\n    return [[round(sum(a * b for a, b in zip(r, c)), 3) for c in zip(*B)] for r in A]\n",
      // raises
      "def matmul(A, B):\n    return A[len(A)]\n",
  };
  const std::vector<MatmulScore> scores = env.evaluate(codes);
  for (size_t i = 0; i < codes.size(); ++i) {
    EXPECT_TRUE(scores[i].compiles) << i << ": " << scores[i].detail;
    EXPECT_FALSE(scores[i].correct) << i << ": " << scores[i].detail;
    EXPECT_EQ(scores[i].total, 1.0) << i;
  }
}

TEST(MatmulEnv, FormatAndStaticParts) {
  const MatmulEnv env(quick_options());
  const std::vector<MatmulScore> scores = env.evaluate({
      "def matmul(A, B)\n    return A\n",            // syntax error
      "def multiply(A, B):\n    return A\n",         // no matmul
      "matmul = lambda A, B: A\n",                   // not a def
      "class M:\n    def matmul(self, A, B):\n        return A\n",  // not top level
      "import os\ndef matmul(A, B):\n    return A\n",  // forbidden import, even if unused
  });
  for (size_t i = 0; i < 4; ++i) {
    EXPECT_FALSE(scores[i].format) << i << ": " << scores[i].detail;
    EXPECT_EQ(scores[i].total, 0.0) << i;
  }
  EXPECT_TRUE(scores[0].detail.starts_with("syntax: ")) << scores[0].detail;
  EXPECT_TRUE(scores[4].format);
  EXPECT_FALSE(scores[4].clean);
  EXPECT_EQ(scores[4].detail, "forbidden: import:os");
  EXPECT_EQ(scores[4].total, -3.0);
}

// A background thread burning CPU (to slow the reference down, or to hide work) gains
// nothing: the candidate is stopped while the reference is timed, and its own time counts
// every thread. (threading is allowed here only to let it try.)
TEST(MatmulEnv, StealingCpuFromTheReferenceDoesNotPay) {
  MatmulOptions options = quick_options();
  options.allowed_modules.push_back("threading");
  const std::string code = std::string(R"(import itertools
import threading


def burn():
    for _ in itertools.count():
        pass


threading.Thread(target=burn, daemon=True).start()
)") + kNaive;
  const MatmulScore s = MatmulEnv(options).evaluate_one(code);
  EXPECT_TRUE(s.correct) << s.detail;
  EXPECT_LT(s.speedup, 1.6) << s.detail;  // the naive solution's own noise band
}

TEST(MatmulEnv, ScoreExtractsTheCodeAndRunsInParallel) {
  MatmulEnv env(quick_options());
  auto input = [](std::string completion, std::optional<std::string> final_answer) {
    RewardInput in;
    in.completion = std::move(completion);
    in.final_answer = std::move(final_answer);
    return in;
  };
  const std::string fenced = std::string("Here:\n```python\n") + kMapSum + "```\nDone.";
  const std::vector<double> totals = env.score({
      input("<|channel|>final<|message|>" + fenced, fenced),
      input(fenced, std::nullopt),                       // no final message: the completion
      input("no code at all", std::nullopt),
      input("```python\nimport numpy\ndef matmul(A, B):\n    return A\n```", std::nullopt),
  });
  ASSERT_EQ(totals.size(), 4u);
  EXPECT_GE(totals[0], 4.0);
  EXPECT_GE(totals[1], 4.0);
  EXPECT_EQ(totals[2], 0.0);
  EXPECT_EQ(totals[3], -3.0);
}

TEST(MatmulEnv, ExtractsTheLastBlockThatDefinesMatmul) {
  EXPECT_EQ(extract_python_block("no fence"), std::nullopt);
  EXPECT_EQ(extract_python_block("```python\nx = 1\n```"), "x = 1\n");
  EXPECT_EQ(extract_python_block("```py\ndef matmul(A, B): 1\n```\n```python\nprint(2)\n```"), "def matmul(A, B): 1\n");
  EXPECT_EQ(extract_python_block("```python\ndef matmul(A, B): 1\n```\n```python\ndef matmul(A, B): 2\n```"),
            "def matmul(A, B): 2\n");
  EXPECT_EQ(extract_python_block("```js\ndef matmul\n```"), std::nullopt);
  EXPECT_EQ(extract_python_block("```python\nunterminated"), std::nullopt);
}

// Throughput of the pool on this machine (reported, and required to be non-trivial).
TEST(MatmulEnv, Throughput) {
  const MatmulEnv env(quick_options());
  const std::vector<std::string> codes(8, kMapSum);
  const auto start = std::chrono::steady_clock::now();
  const std::vector<MatmulScore> scores = env.evaluate(codes);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  for (const MatmulScore& s : scores) EXPECT_TRUE(s.correct) << s.detail;
  const double per_second = static_cast<double>(codes.size()) / seconds;
  RecordProperty("evaluations_per_second", std::to_string(per_second));
  std::printf("matmul env: %zu evaluations in %.2f s with %d workers: %.2f evaluations/s\n", codes.size(), seconds,
              env.workers(), per_second);
  EXPECT_GT(per_second, 0.5);
}

}  // namespace
}  // namespace ossrl

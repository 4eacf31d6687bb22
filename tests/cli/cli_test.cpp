// The `ossrl` binary end to end, as a user runs it: exit codes, messages and outputs.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <array>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <sys/wait.h>

#include "io/safetensors.h"

namespace ossrl {
namespace {

namespace fs = std::filesystem;

struct RunResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr together
};

RunResult run_ossrl(const std::string& args) {
  const std::string command = std::string(OSSRL_BINARY) + " " + args + " 2>&1";
  FILE* pipe = popen(command.c_str(), "r");
  EXPECT_NE(pipe, nullptr);
  RunResult result;
  std::array<char, 4096> buffer;
  size_t n;
  while ((n = fread(buffer.data(), 1, buffer.size(), pipe)) > 0) result.output.append(buffer.data(), n);
  const int status = pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return result;
}

fs::path temp_dir(const std::string& name) {
  const fs::path dir = fs::path(testing::TempDir()) / ("ossrl_cli_" + name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

void write_file(const fs::path& path, const std::string& text) {
  std::ofstream(path) << text;
}

// `ossrl score` on a transformers fixture gives transformers' log-probs for every sequence.
TEST(Cli, ScoreMatchesTransformers) {
  const std::string model = std::string(OSSRL_FIXTURE_DIR) + "/tiny-mxfp4";
  auto reference = SafetensorsFile::open(model + "/reference.safetensors");
  const TensorView& tokens_view = reference->tensor("tokens");
  const TensorView& offsets_view = reference->tensor("offsets");
  const TensorView& logprobs_view = reference->tensor("logprobs");
  std::vector<int32_t> tokens(size_t(tokens_view.numel())), offsets(size_t(offsets_view.numel()));
  std::vector<float> logprobs(size_t(logprobs_view.numel()));
  std::memcpy(tokens.data(), tokens_view.data, tokens_view.nbytes);
  std::memcpy(offsets.data(), offsets_view.data, offsets_view.nbytes);
  std::memcpy(logprobs.data(), logprobs_view.data, logprobs_view.nbytes);

  const fs::path dir = temp_dir("score");
  std::ostringstream input;
  int sequences = 0;
  for (size_t b = 0; b + 1 < offsets.size(); ++b) {
    if (offsets[b + 1] - offsets[b] < 2) continue;  // nothing to score in a 1-token sequence
    const std::vector<int32_t> seq(tokens.begin() + offsets[b], tokens.begin() + offsets[b + 1]);
    input << nlohmann::json{{"id", b}, {"tokens", seq}}.dump() << "\n";
    ++sequences;
  }
  write_file(dir / "in.jsonl", input.str());
  // --device cpu: the fp32 CPU model is what matches transformers to this tolerance (score
  // picks the GPU's bf16 engine when one is present).
  const RunResult r = run_ossrl("score --device cpu --model " + model + " --input " + (dir / "in.jsonl").string() +
                                " --output " + (dir / "out.jsonl").string() + " --batch-size 2");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_FALSE(fs::exists(dir / "out.jsonl.partial"));

  std::ifstream out(dir / "out.jsonl");
  std::string line;
  int rows = 0;
  float max_error = 0;
  while (std::getline(out, line)) {
    const nlohmann::json row = nlohmann::json::parse(line);
    const size_t b = row["id"].get<size_t>();
    const std::vector<float> got = row["logprobs"].get<std::vector<float>>();
    ASSERT_EQ(got.size(), size_t(offsets[b + 1] - offsets[b] - 1));
    double sum = 0;
    for (size_t t = 0; t < got.size(); ++t) {
      max_error = std::max(max_error, std::fabs(got[t] - logprobs[size_t(offsets[b]) + 1 + t]));
      sum += got[t];
    }
    EXPECT_NEAR(row["sum_logprob"].get<double>(), sum, 1e-3);
    ++rows;
  }
  EXPECT_EQ(rows, sequences);
  // fp32 CPU vs fp32 transformers: ~1e-5 measured; JSON keeps floats to ~1e-7 relative.
  EXPECT_LT(max_error, 1e-4f);
}

// A malformed line stops the run before any compute, naming the file and line.
TEST(Cli, ScoreRejectsMalformedLines) {
  const std::string model = std::string(OSSRL_FIXTURE_DIR) + "/tiny-bf16";
  const fs::path dir = temp_dir("score_bad");
  struct Case {
    std::string line;
    std::string message;
  };
  const Case cases[] = {
      {"{\"tokens\": [1, 2, 3", "not valid JSON"},
      {"[1, 2, 3]", "expected a JSON object"},
      {"{\"tokens\": [1, 2, 99999]}", "outside the vocabulary"},
      {"{\"tokens\": [5]}", "nothing to score"},
      {"{\"tokens\": \"abc\"}", "in.jsonl:2"},
      {"{\"other\": 1}", "expected \"tokens\""},
  };
  for (const Case& c : cases) {
    write_file(dir / "in.jsonl", "{\"tokens\": [1, 2, 3]}\n" + c.line + "\n");
    const RunResult r = run_ossrl("score --model " + model + " --input " + (dir / "in.jsonl").string() +
                                  " --output " + (dir / "out.jsonl").string());
    EXPECT_EQ(r.exit_code, 1) << c.line;
    EXPECT_NE(r.output.find("in.jsonl:2"), std::string::npos) << r.output;
    EXPECT_NE(r.output.find(c.message), std::string::npos) << r.output;
    EXPECT_FALSE(fs::exists(dir / "out.jsonl")) << "a failed run must not leave an output";
  }
}

// A damaged checkpoint is a one-line error, not a crash.
TEST(Cli, GenerateReportsBadCheckpoint) {
  const fs::path dir = temp_dir("bad_model");
  fs::copy(std::string(OSSRL_FIXTURE_DIR) + "/tiny-bf16", dir, fs::copy_options::recursive);
  fs::resize_file(dir / "model.safetensors", fs::file_size(dir / "model.safetensors") / 2);
  const RunResult r = run_ossrl("generate --model " + dir.string() + " --prompt hi");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("error: "), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("model.safetensors"), std::string::npos) << r.output;
}

// The demo runs the whole path and checks itself (cached decode == full pass); `generate`
// on its checkpoint is deterministic for a seed and prints the timing line.
TEST(Cli, DemoAndGenerateRun) {
  // A shortened demo (the full one takes minutes): both phases, evaluations, the table.
  const fs::path work = temp_dir("demo");
  const fs::path dir = work / "model";
  RunResult demo = run_ossrl("demo --work-dir " + work.string() + " --sft-steps 2 --grpo-steps 1 --eval-steps 1");
  ASSERT_EQ(demo.exit_code, 0) << demo.output;
  EXPECT_NE(demo.output.find("accuracy (greedy, exact match, 100 problems)"), std::string::npos) << demo.output;
  EXPECT_NE(demo.output.find("eval @ step 1"), std::string::npos) << demo.output;
  EXPECT_TRUE(fs::exists(work / "grpo" / "adapter" / "adapter_model.safetensors"));

  // --device cpu: the demo's model is tiny and this checks the CLI, not the GPU engine.
  const std::string args = "generate --device cpu --model " + dir.string() +
                           " --prompt 'What is 2+2?' --max-new-tokens 6 --temperature 0.8 --top-p 0.9 --seed 7"
                           " --show-tokens";
  const RunResult first = run_ossrl(args);
  const RunResult second = run_ossrl(args);
  ASSERT_EQ(first.exit_code, 0) << first.output;
  EXPECT_NE(first.output.find("<|start|>assistant"), std::string::npos) << first.output;
  EXPECT_NE(first.output.find("new tokens in"), std::string::npos) << first.output;
  const auto completion = [](const std::string& out) { return out.substr(out.find("[completion]")); };
  EXPECT_EQ(completion(first.output).substr(0, 200), completion(second.output).substr(0, 200));
}

// `ossrl reward --env matmul`: an honest solution is scored correct, a numpy import earns
// nothing, a line without code scores 0, and the output lands whole.
TEST(Cli, RewardScoresMatmulCompletions) {
  const fs::path dir = temp_dir("reward");
  const std::string honest =
      "def matmul(A, B):\n"
      "    return [[sum(a * b for a, b in zip(row, col)) for col in zip(*B)] for row in A]\n";
  const std::string cheat = "import numpy\ndef matmul(A, B):\n    return (numpy.array(A) @ numpy.array(B)).tolist()\n";
  std::ostringstream input;
  input << nlohmann::json{{"id", "honest"}, {"code", honest}}.dump() << "\n";
  input << nlohmann::json{{"id", "numpy"}, {"code", cheat}}.dump() << "\n";
  input << nlohmann::json{{"id", "prose"}, {"completion", "I would rather not write code."}}.dump() << "\n";
  write_file(dir / "in.jsonl", input.str());
  const RunResult r = run_ossrl("reward --env matmul --input " + (dir / "in.jsonl").string() + " --output " +
                                (dir / "out.jsonl").string() + " --repetitions 1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("evaluations/s"), std::string::npos) << r.output;
  std::map<std::string, nlohmann::json> rows;
  std::ifstream out(dir / "out.jsonl");
  std::string line;
  while (std::getline(out, line)) {
    const nlohmann::json row = nlohmann::json::parse(line);
    rows[row["id"].get<std::string>()] = row;
  }
  ASSERT_EQ(rows.size(), 3u);
  EXPECT_TRUE(rows["honest"]["correct"].get<bool>()) << rows["honest"].dump();
  // format 0.5 + compiles 0.5 + correct 3, plus a speed term in [-1, 2] that timing noise moves.
  EXPECT_GE(rows["honest"]["total"].get<double>(), 3.0) << rows["honest"].dump();
  EXPECT_FALSE(rows["numpy"]["correct"].get<bool>()) << rows["numpy"].dump();
  EXPECT_LE(rows["numpy"]["total"].get<double>(), 0.0) << rows["numpy"].dump();
  EXPECT_EQ(rows["prose"]["total"].get<double>(), 0.0) << rows["prose"].dump();
}

TEST(Cli, BadArgumentsAreErrors) {
  const RunResult r = run_ossrl("generate --model . --prompt x --temperature -1");
  EXPECT_NE(r.exit_code, 0);
  const RunResult none = run_ossrl("");
  EXPECT_NE(none.exit_code, 0);
  EXPECT_NE(none.output.find("subcommand is required"), std::string::npos) << none.output;
}

}  // namespace
}  // namespace ossrl

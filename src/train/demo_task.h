// `ossrl demo`: reinforcement learning you can watch on a laptop CPU. A tiny random gpt-oss
// (the real 201088-token vocabulary and Harmony format, hidden size 64) learns single-digit
// addition: a short SFT warm-up teaches the answer format and a little arithmetic, then GRPO
// with an exact-match reward raises the held-out greedy accuracy.
//
// The task: "a+b" for digits a and b (100 problems), answered by one token ("0" .. "18" are
// single tokens in o200k) and <|return|>. The reward is exact match; accuracy is greedy
// exact match on the 100 problems (the trainer's held-out split is not used here: measured
// on 20 held-out sums the model hardly generalises at this size and budget).
//
// Measured (seed 1; docs/benchmarks.md has the sweep): SFT 150 steps lifts accuracy from
// 0% to 29%; GRPO 150 steps (8 prompts x 8 completions, lr 3e-3) then moves it to 41%, but
// not monotonically (21% at step 25) and other settings did worse (lr 5e-3 and 1e-2
// collapse, 200 SFT steps then GRPO fell 39% -> 30%): the demo shows the whole loop working
// and learning, not a tuned result.
// Prompts skip Harmony's long system message and prefill the final channel,
//   <|start|>user<|message|>3+5<|end|><|start|>assistant<|channel|>final<|message|>
// so a completion is two tokens: every token of the 201088-wide lm_head costs hidden·vocab
// multiply-adds, and a run of a few hundred steps has to fit in minutes on two cores.
//
// The model: write_random_checkpoint's weights, except the lm_head rows of the answer tokens
// ("0" .. "18" and <|return|>), which become kAnswerTokenGain * (u + row) for one random
// unit vector u. With random unit-scale rows and a 64-wide normed state, every logit is
// about N(0, 1): the other 201068 tokens hold a log-sum-exp of about log(201068) + 0.5 =
// 12.7, and no state can lift twenty unrelated rows above that together (they would share
// logits of about 8 / sqrt(20) = 1.8), so a model could only ever be sure of one answer or
// give all of them a sliver. A trained model's head has related tokens share directions; the
// shared u gives the answers that, so a state along u spreads the mass over them and a
// policy can be uncertain among answers, which GRPO needs to explore.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "model/config.h"
#include "tokenizer/tokenizer.h"

namespace ossrl {

// The 100 rows {"prompt": "3+5", "answer": "8", "completion": "8"}, a and b ascending.
std::vector<nlohmann::json> addition_rows();

// 2 layers (sliding, full), hidden 64, 4 heads of 16 (2 KV heads), 4 experts (top 2) of
// intermediate 64, MXFP4 experts: about 25.8 M parameters, nearly all in the embedding and lm_head.
GptOssConfig demo_model_config();
inline constexpr float kAnswerTokenGain = 2.0f;

// Writes the demo model to `dir` (config.json + model.safetensors), deterministic in seed.
void write_demo_model(const std::string& dir, uint64_t seed, const Tokenizer& tokenizer);

struct DemoOptions {
  std::string work_dir;             // model/, data/, sft/ and grpo/ go here
  std::string tokenizer;            // empty: the default rank file
  uint64_t seed = 1;
  int64_t sft_steps = 150;
  int64_t grpo_steps = 150;
  int64_t eval_steps = 25;
  std::vector<std::string> sft_overrides, grpo_overrides;  // "--key value" for either phase
  std::function<void(const std::string& line)> print = [](const std::string&) {};
};

// One evaluation, for the summary table.
struct DemoEval {
  std::string phase;  // "sft" or "grpo"
  int64_t step = 0;
  double accuracy = 0;  // greedy exact match on the 100 problems
  double reward = 0;    // the weighted reward (exact match; format is logged with weight 0)
  double train_reward = 0;  // grpo: the step's mean sampled reward; NaN for sft
  double kl = 0;            // grpo: KL to the base model at that step; NaN for sft
};

struct DemoReport {
  std::vector<DemoEval> evals;
  double accuracy_before_grpo = 0;  // after the SFT warm-up
  double accuracy_after_grpo = 0;
  double seconds = 0;
};

// Writes the model (if absent) and the data, runs SFT then GRPO (from the SFT adapter) and
// returns every evaluation. print receives the progress lines.
DemoReport run_demo(const DemoOptions& options);

}  // namespace ossrl

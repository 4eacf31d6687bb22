// The rewards API: what a reward function sees of a rollout and what it returns. Built-in
// rewards, the external reward process and the sandboxed code environments all implement
// RewardFunction, so the trainer treats them alike (and weighs them by reward_weights).
#pragma once

#include <nlohmann/json.hpp>

#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace ossrl {

// One completion to score.
struct RewardInput {
  std::string prompt;                       // the rendered Harmony prompt, as text
  std::string completion;                   // the generated text, special tokens by name
  std::optional<std::string> final_answer;  // content of the last `final` message, if any
  bool well_formed = false;                 // the completion parsed as clean Harmony
  bool truncated = false;                   // hit max tokens before <|return|>/<|call|>
  int completion_tokens = 0;
  nlohmann::json fields;                    // the dataset row's other fields (e.g. "answer")
};

class RewardFunction {
 public:
  virtual ~RewardFunction() = default;
  // The name metrics use ("exact_match", "format", the external program's name, ...).
  virtual const std::string& name() const = 0;
  // One reward per input, in order. NaN means "no reward for this completion" (TRL's None):
  // the trainer skips it in this function's weighted sum. Throws ossrl::Error only for
  // failures of the function itself (an external process that cannot be restarted).
  virtual std::vector<double> score(const std::vector<RewardInput>& batch) = 0;
};

// Builds one entry of the trainer config's reward list: a type name ("format") or an object
// {"type": "numeric", "field": "answer", ...}; "name" renames it for metrics. Types:
// exact_match, numeric, format, length_penalty, soft_overlong_punishment (rewards/builtin.h)
// and external (rewards/external.h); docs/rewards.md lists their options. Throws an Error
// naming an unknown type or option, or a missing or mistyped one.
std::unique_ptr<RewardFunction> make_reward(const nlohmann::json& spec);

}  // namespace ossrl

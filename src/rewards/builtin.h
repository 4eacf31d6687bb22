// Built-in rewards: rule-based checks of a rollout that need no program of their own.
//
//   exact_match               1 if the final answer (trimmed) equals a dataset field, else 0
//   numeric                   1 if the last number of the final answer equals a dataset field
//                             within tolerance, else 0
//   format                    1 for clean Harmony ending in a `final` message and <|return|>
//   length_penalty            -min(tokens, max_tokens) / max_tokens
//   soft_overlong_punishment  DAPO's soft overlong punishment (0 down to -1 near the limit)
//
// make_reward (reward.h) builds them from the trainer config; docs/rewards.md lists their
// options. Each is stateless and cheap, so score() is a plain loop.
#pragma once

#include <optional>
#include <string>
#include <string_view>

#include "rewards/reward.h"

namespace ossrl {

// The last number written in `text`, as a value: "The answer is -1,234.5." gives -1234.5.
//   - thousands separators: a comma followed by exactly three digits ("12,345,678"); any other
//     comma separates numbers ("1,2" is 1 and 2)
//   - a sign ('+', '-', or U+2212 MINUS SIGN) counts only where it cannot be an operator:
//     not after a letter, digit or closing bracket ("5-3" ends in 3, "x = -3" in -3)
//   - decimals ("3.5", ".5"; a trailing dot is punctuation: "5." is 5)
//   - scientific notation ("1.5e-3", "2E10")
//   - with `fractions`, "3/4" is 0.75 ("-3/4" is -0.75; a zero denominator is no fraction)
// nullopt when there is no number.
std::optional<double> last_number(std::string_view text, bool fractions = true);

// `text` without leading and trailing ASCII whitespace.
std::string_view trim_whitespace(std::string_view text);

// exact_match: trim(final_answer) == trim(fields[field]). A numeric field compares as its JSON
// text (72 as "72"). With ignore_case, ASCII letters compare case-insensitively.
// No final answer: 0. A null field: NaN (no reward). Missing field: Error.
class ExactMatchReward : public RewardFunction {
 public:
  struct Options {
    std::string field = "answer";
    bool ignore_case = false;
    std::string name = "exact_match";
  };
  explicit ExactMatchReward(Options options) : options_(std::move(options)) {}
  const std::string& name() const override { return options_.name; }
  std::vector<double> score(const std::vector<RewardInput>& batch) override;

 private:
  Options options_;
};

// numeric: |x - y| <= max(abs_tol, rel_tol * |y|), x = last_number(final_answer), y the field
// (a JSON number, or a string read with last_number, so "1,234" and "3/4" work). The default
// tolerances only absorb the rounding of two spellings of one decimal ("0.50" and ".5" are
// equal anyway; 1e-6 lets "0.333333" match 1/3 stated to six places).
// No final answer or no number in it: 0. A field with no number (or null): NaN, since the
// row cannot be judged numerically. Missing field: Error.
class NumericReward : public RewardFunction {
 public:
  struct Options {
    std::string field = "answer";
    double abs_tol = 1e-6;
    double rel_tol = 1e-9;
    bool fractions = true;
    std::string name = "numeric";
  };
  explicit NumericReward(Options options) : options_(std::move(options)) {}
  const std::string& name() const override { return options_.name; }
  std::vector<double> score(const std::vector<RewardInput>& batch) override;

 private:
  Options options_;
};

// format: parses RewardInput::completion (special tokens by name, including the stop token
// the model sampled, as Tokenizer::decode writes them) with harmony::parse_completion_text:
//   1           well formed, and the last message is on `final`, closed by <|return|>
//   no_final    well formed but not ending in a final answer: a tool call closed by <|call|>
//               (0.5 by default: the model kept the format, but gave no answer)
//   0           anything else: malformed, or truncated before <|return|>/<|call|>
class FormatReward : public RewardFunction {
 public:
  struct Options {
    double no_final = 0.5;
    std::string name = "format";
  };
  explicit FormatReward(Options options) : options_(std::move(options)) {}
  const std::string& name() const override { return options_.name; }
  std::vector<double> score(const std::vector<RewardInput>& batch) override;

 private:
  Options options_;
};

// length_penalty: -min(completion_tokens, max_tokens) / max_tokens, in [-1, 0]. Weighted
// beside a correctness reward, it prefers the shorter of two correct answers.
class LengthPenaltyReward : public RewardFunction {
 public:
  struct Options {
    int max_tokens = 0;  // > 0; usually the generation limit
    std::string name = "length_penalty";
  };
  explicit LengthPenaltyReward(Options options);
  const std::string& name() const override { return options_.name; }
  std::vector<double> score(const std::vector<RewardInput>& batch) override;

 private:
  Options options_;
};

// soft_overlong_punishment, DAPO (arXiv 2503.14476, eq. 13) and TRL's
// get_soft_overlong_punishment, with L = completion_tokens, L_max = max_completion_len,
// L_cache = soft_punish_cache:
//   0                                 L <= L_max - L_cache
//   ((L_max - L_cache) - L) / L_cache  L_max - L_cache < L <= L_max   (0 down to -1)
//   -1                                L > L_max
// Unlike length_penalty it leaves every completion well inside the limit alone.
class SoftOverlongPunishmentReward : public RewardFunction {
 public:
  struct Options {
    int max_completion_len = 0;  // > 0
    int soft_punish_cache = 0;   // in [1, max_completion_len]
    std::string name = "soft_overlong_punishment";
  };
  explicit SoftOverlongPunishmentReward(Options options);
  const std::string& name() const override { return options_.name; }
  std::vector<double> score(const std::vector<RewardInput>& batch) override;

 private:
  Options options_;
};

}  // namespace ossrl

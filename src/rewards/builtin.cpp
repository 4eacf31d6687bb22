#include "rewards/builtin.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <limits>

#include <fmt/ranges.h>

#include "core/error.h"
#include "rewards/external.h"
#include "tokenizer/harmony.h"

namespace ossrl {
namespace {

constexpr double kNoReward = std::numeric_limits<double>::quiet_NaN();

bool is_digit(char c) { return c >= '0' && c <= '9'; }
bool is_ascii_alnum(char c) { return is_digit(c) || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
char ascii_lower(char c) { return c >= 'A' && c <= 'Z' ? char(c - 'A' + 'a') : c; }

// Reads numbers off a text left to right, each greedily, so the last one read is the last
// number written. `at` is where the next number may start.
class NumberScanner {
 public:
  NumberScanner(std::string_view text, bool fractions) : text_(text), fractions_(fractions) {}

  std::optional<double> last() {
    std::optional<double> last;
    while (at_ < text_.size()) {
      if (std::optional<double> value = number_here()) last = value;
    }
    return last;
  }

 private:
  char peek(size_t offset = 0) const { return at_ + offset < text_.size() ? text_[at_ + offset] : '\0'; }
  bool digit_at(size_t offset) const { return is_digit(peek(offset)); }
  size_t digits_from(size_t offset) const {
    size_t n = 0;
    while (digit_at(offset + n)) ++n;
    return n;
  }

  // The bytes of a sign at `at_` (0 if none): '+', '-' or U+2212. A sign right after a word,
  // a digit or a closing bracket is an operator ("5-3", "f(x)-1"), not part of a number.
  size_t sign_length() const {
    if (at_ > 0) {
      char before = text_[at_ - 1];
      if (is_ascii_alnum(before) || before == '_' || before == ')' || before == ']' || before == '}') return 0;
    }
    if (peek() == '+' || peek() == '-') return 1;
    if (text_.substr(at_, 3) == "\xE2\x88\x92") return 3;
    return 0;
  }

  // Parses a number starting exactly at at_ and moves past it; otherwise moves one byte on.
  std::optional<double> number_here() {
    size_t sign = sign_length();
    bool negative = sign > 0 && peek() != '+';
    size_t start = at_ + sign;
    auto starts_number = [&](size_t offset) {
      return digit_at(offset) || (peek(offset) == '.' && digit_at(offset + 1));
    };
    if (!starts_number(sign)) {
      ++at_;
      return std::nullopt;
    }
    at_ = start;

    // Integer part, with thousands separators only after a group of 1-3 digits.
    std::string digits = negative ? "-" : "";
    size_t lead = digits_from(0);
    digits.append(text_.substr(at_, lead));
    at_ += lead;
    if (lead >= 1 && lead <= 3) {
      while (peek() == ',' && digits_from(1) == 3) {
        digits.append(text_.substr(at_ + 1, 3));
        at_ += 4;
      }
    }
    bool integer = lead > 0;
    if (peek() == '.' && digit_at(1)) {
      size_t n = digits_from(1);
      digits.append(text_.substr(at_, n + 1));
      at_ += n + 1;
      integer = false;
    }
    if ((peek() == 'e' || peek() == 'E')) {
      size_t exp_sign = (peek(1) == '+' || peek(1) == '-') ? 1 : 0;
      if (size_t n = digits_from(1 + exp_sign); n > 0) {
        digits.append(text_.substr(at_, 1 + exp_sign + n));
        at_ += 1 + exp_sign + n;
        integer = false;
      }
    }

    double value = 0;
    auto [end, error] = std::from_chars(digits.data(), digits.data() + digits.size(), value);
    if (error != std::errc() || end != digits.data() + digits.size()) return std::nullopt;  // out of range

    if (fractions_ && integer && peek() == '/' && digit_at(1)) {
      size_t n = digits_from(1);
      double denominator = 0;
      std::from_chars(text_.data() + at_ + 1, text_.data() + at_ + 1 + n, denominator);
      if (denominator != 0) {
        at_ += 1 + n;
        value /= denominator;
      }
    }
    return value;
  }

  std::string_view text_;
  bool fractions_;
  size_t at_ = 0;
};

// fields[field], or an Error naming what the row has instead: a wrong field name in the
// config would otherwise score every completion 0 without a word.
const nlohmann::json& dataset_field(const nlohmann::json& fields, const std::string& field, const std::string& reward) {
  if (fields.is_object()) {
    if (auto it = fields.find(field); it != fields.end()) return *it;
  }
  std::string has;
  if (fields.is_object()) {
    for (auto it = fields.begin(); it != fields.end(); ++it) has += (has.empty() ? "" : ", ") + it.key();
  }
  fail("reward '{}': the dataset row has no field '{}' (its fields: {})", reward, field, has.empty() ? "none" : has);
}

bool equal_text(std::string_view a, std::string_view b, bool ignore_case) {
  if (!ignore_case) return a == b;
  return std::ranges::equal(a, b, [](char x, char y) { return ascii_lower(x) == ascii_lower(y); });
}

}  // namespace

std::optional<double> last_number(std::string_view text, bool fractions) {
  return NumberScanner(text, fractions).last();
}

std::string_view trim_whitespace(std::string_view text) {
  constexpr std::string_view kSpace = " \t\n\r\f\v";
  size_t first = text.find_first_not_of(kSpace);
  if (first == std::string_view::npos) return {};
  return text.substr(first, text.find_last_not_of(kSpace) - first + 1);
}

std::vector<double> ExactMatchReward::score(const std::vector<RewardInput>& batch) {
  std::vector<double> rewards;
  rewards.reserve(batch.size());
  for (const RewardInput& input : batch) {
    const nlohmann::json& expected = dataset_field(input.fields, options_.field, name());
    OSSRL_CHECK(expected.is_null() || expected.is_string() || expected.is_number(),
                "reward '{}': field '{}' must be a string or a number, not {}", name(), options_.field,
                expected.dump().substr(0, 80));
    if (expected.is_null()) {
      rewards.push_back(kNoReward);
    } else if (!input.final_answer) {
      rewards.push_back(0);
    } else {
      std::string expected_text = expected.is_string() ? expected.get<std::string>() : expected.dump();
      bool match = equal_text(trim_whitespace(*input.final_answer), trim_whitespace(expected_text), options_.ignore_case);
      rewards.push_back(match ? 1 : 0);
    }
  }
  return rewards;
}

std::vector<double> NumericReward::score(const std::vector<RewardInput>& batch) {
  std::vector<double> rewards;
  rewards.reserve(batch.size());
  for (const RewardInput& input : batch) {
    const nlohmann::json& expected_field = dataset_field(input.fields, options_.field, name());
    std::optional<double> expected;
    if (expected_field.is_number()) {
      expected = expected_field.get<double>();
    } else if (expected_field.is_string()) {
      expected = last_number(expected_field.get_ref<const std::string&>(), options_.fractions);
    }
    if (!expected) {
      rewards.push_back(kNoReward);
      continue;
    }
    std::optional<double> answer = input.final_answer ? last_number(*input.final_answer, options_.fractions) : std::nullopt;
    bool close = answer && std::abs(*answer - *expected) <= std::max(options_.abs_tol, options_.rel_tol * std::abs(*expected));
    rewards.push_back(close ? 1 : 0);
  }
  return rewards;
}

std::vector<double> FormatReward::score(const std::vector<RewardInput>& batch) {
  std::vector<double> rewards;
  rewards.reserve(batch.size());
  for (const RewardInput& input : batch) {
    harmony::ParsedCompletion parsed = harmony::parse_completion_text(input.completion);
    // Well formed implies a stop token, and <|return|> only closes a `final` message.
    if (!parsed.well_formed) {
      rewards.push_back(0);
    } else if (parsed.stop == harmony::StopReason::Return) {
      rewards.push_back(1);
    } else {
      rewards.push_back(options_.no_final);
    }
  }
  return rewards;
}

LengthPenaltyReward::LengthPenaltyReward(Options options) : options_(std::move(options)) {
  OSSRL_CHECK(options_.max_tokens > 0, "reward '{}': max_tokens must be positive, not {}", options_.name,
              options_.max_tokens);
}

std::vector<double> LengthPenaltyReward::score(const std::vector<RewardInput>& batch) {
  std::vector<double> rewards;
  rewards.reserve(batch.size());
  for (const RewardInput& input : batch) {
    rewards.push_back(-double(std::clamp(input.completion_tokens, 0, options_.max_tokens)) / options_.max_tokens);
  }
  return rewards;
}

SoftOverlongPunishmentReward::SoftOverlongPunishmentReward(Options options) : options_(std::move(options)) {
  OSSRL_CHECK(options_.max_completion_len > 0 && options_.soft_punish_cache > 0 &&
                  options_.soft_punish_cache <= options_.max_completion_len,
              "reward '{}': need 0 < soft_punish_cache <= max_completion_len, got {} and {}", options_.name,
              options_.soft_punish_cache, options_.max_completion_len);
}

std::vector<double> SoftOverlongPunishmentReward::score(const std::vector<RewardInput>& batch) {
  const int safe = options_.max_completion_len - options_.soft_punish_cache;
  std::vector<double> rewards;
  rewards.reserve(batch.size());
  for (const RewardInput& input : batch) {
    int length = input.completion_tokens;
    if (length <= safe) {
      rewards.push_back(0);
    } else if (length <= options_.max_completion_len) {
      rewards.push_back(double(safe - length) / options_.soft_punish_cache);
    } else {
      rewards.push_back(-1);
    }
  }
  return rewards;
}

// ---- make_reward: the config's reward list ----

namespace {

// One reward spec's options. A key no reader asked for is a misspelt option: it fails rather
// than being silently ignored.
class SpecReader {
 public:
  explicit SpecReader(const nlohmann::json& spec) : spec_(spec) {
    if (spec.is_string()) {
      type_ = spec.get<std::string>();
      return;
    }
    OSSRL_CHECK(spec.is_object(), "a reward must be a type name or an object with \"type\", not {}",
                spec.dump().substr(0, 80));
    auto type = spec.find("type");
    OSSRL_CHECK(type != spec.end() && type->is_string(), "reward {} has no \"type\" string", spec.dump().substr(0, 80));
    type_ = type->get<std::string>();
    known_.push_back("type");
  }

  const std::string& type() const { return type_; }

  template <typename T>
  T get(const std::string& key, T fallback) {
    known_.push_back(key);
    if (!spec_.is_object() || !spec_.contains(key)) return fallback;
    const nlohmann::json& value = spec_.at(key);
    if constexpr (std::is_same_v<T, bool>) {
      if (value.is_boolean()) return value.get<bool>();
      bad_type(key, "true or false");
    } else if constexpr (std::is_integral_v<T>) {
      if (value.is_number_integer()) return value.get<T>();
      bad_type(key, "an integer");
    } else if constexpr (std::is_floating_point_v<T>) {
      if (value.is_number()) return value.get<T>();
      bad_type(key, "a number");
    } else if constexpr (std::is_same_v<T, std::string>) {
      if (value.is_string()) return value.get<std::string>();
      bad_type(key, "a string");
    } else {
      static_assert(std::is_same_v<T, std::vector<std::string>>);
      bool strings = value.is_array() && std::ranges::all_of(value, [](const auto& v) { return v.is_string(); });
      if (strings && !value.empty()) return value.get<std::vector<std::string>>();
      bad_type(key, "a non-empty array of strings (argv; no shell is used)");
    }
  }

  template <typename T>
  T require(const std::string& key) {
    OSSRL_CHECK(spec_.is_object() && spec_.contains(key), "reward '{}' needs the option \"{}\"", type_, key);
    return get<T>(key, T{});
  }

  // Call after reading every option the type knows.
  void finish() const {
    if (!spec_.is_object()) return;
    for (auto it = spec_.begin(); it != spec_.end(); ++it) {
      OSSRL_CHECK(std::ranges::find(known_, it.key()) != known_.end(), "reward '{}' has no option \"{}\" (it has: {})",
                  type_, it.key(), fmt::join(known_, ", "));
    }
  }

 private:
  [[noreturn]] void bad_type(const std::string& key, const char* expected) const {
    fail("reward '{}': option \"{}\" must be {}, not {}", type_, key, expected, spec_.at(key).dump().substr(0, 80));
  }

  const nlohmann::json& spec_;
  std::string type_;
  std::vector<std::string> known_;  // every option asked for, present or not
};

template <typename Reward>
std::unique_ptr<RewardFunction> finish(SpecReader& spec, typename Reward::Options options) {
  spec.finish();
  return std::make_unique<Reward>(std::move(options));
}

}  // namespace

std::unique_ptr<RewardFunction> make_reward(const nlohmann::json& spec_json) {
  SpecReader spec(spec_json);
  const std::string& type = spec.type();
  if (type == "exact_match") {
    ExactMatchReward::Options o;
    o.field = spec.get("field", o.field);
    o.ignore_case = spec.get("ignore_case", o.ignore_case);
    o.name = spec.get("name", o.name);
    return finish<ExactMatchReward>(spec, o);
  }
  if (type == "numeric") {
    NumericReward::Options o;
    o.field = spec.get("field", o.field);
    o.abs_tol = spec.get("abs_tol", o.abs_tol);
    o.rel_tol = spec.get("rel_tol", o.rel_tol);
    o.fractions = spec.get("fractions", o.fractions);
    o.name = spec.get("name", o.name);
    OSSRL_CHECK(o.abs_tol >= 0 && o.rel_tol >= 0, "reward 'numeric': tolerances must be >= 0");
    return finish<NumericReward>(spec, o);
  }
  if (type == "format") {
    FormatReward::Options o;
    o.no_final = spec.get("no_final", o.no_final);
    o.name = spec.get("name", o.name);
    return finish<FormatReward>(spec, o);
  }
  if (type == "length_penalty") {
    LengthPenaltyReward::Options o;
    o.max_tokens = spec.require<int>("max_tokens");
    o.name = spec.get("name", o.name);
    return finish<LengthPenaltyReward>(spec, o);
  }
  if (type == "soft_overlong_punishment") {
    SoftOverlongPunishmentReward::Options o;
    o.max_completion_len = spec.require<int>("max_completion_len");
    o.soft_punish_cache = spec.require<int>("soft_punish_cache");
    o.name = spec.get("name", o.name);
    return finish<SoftOverlongPunishmentReward>(spec, o);
  }
  if (type == "external") {
    ExternalReward::Options o;
    o.command = spec.require<std::vector<std::string>>("command");
    o.name = spec.get("name", o.name);
    double timeout_s = spec.get("timeout_s", o.timeout.count() / 1000.0);
    OSSRL_CHECK(timeout_s > 0, "reward 'external': timeout_s must be positive, not {}", timeout_s);
    o.timeout = std::chrono::milliseconds(std::max<int64_t>(1, std::llround(timeout_s * 1000)));
    int64_t max_reply_bytes = spec.get<int64_t>("max_reply_bytes", int64_t(o.max_reply_bytes));
    OSSRL_CHECK(max_reply_bytes > 0, "reward 'external': max_reply_bytes must be positive");
    o.max_reply_bytes = size_t(max_reply_bytes);
    std::string on_failure = spec.get<std::string>("on_failure", "error");
    OSSRL_CHECK(on_failure == "error" || on_failure == "nan",
                "reward 'external': on_failure must be \"error\" or \"nan\", not \"{}\"", on_failure);
    o.on_failure = on_failure == "nan" ? ExternalReward::OnFailure::Nan : ExternalReward::OnFailure::Error;
    o.stderr_log = spec.get("stderr_log", o.stderr_log);
    return finish<ExternalReward>(spec, o);
  }
  fail("unknown reward type '{}' (known: exact_match, numeric, format, length_penalty, soft_overlong_punishment, "
       "external)",
       type);
}

}  // namespace ossrl

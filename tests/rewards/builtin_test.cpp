// Built-in rewards on typical and edge inputs, and make_reward's handling of the config.
#include "rewards/builtin.h"

#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <numbers>

#include "core/error.h"

namespace ossrl {
namespace {

RewardInput answered(std::optional<std::string> final_answer, nlohmann::json fields = {{"answer", "42"}}) {
  return {.final_answer = std::move(final_answer), .fields = std::move(fields)};
}

RewardInput completion(std::string text) { return {.completion = std::move(text)}; }

RewardInput of_length(int tokens) { return {.completion_tokens = tokens}; }

double score_one(RewardFunction& reward, const RewardInput& input) {
  std::vector<double> rewards = reward.score({input});
  EXPECT_EQ(rewards.size(), 1u);
  return rewards.at(0);
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& error) {
    return error.what();
  }
  return "";
}

// ---- last_number ----

TEST(LastNumber, Table) {
  struct Case {
    std::string text;
    std::optional<double> expected;
  };
  const std::vector<Case> cases = {
      {"The answer is 42.", 42},  // a trailing dot is punctuation
      {"42", 42},
      {"-1,234.5", -1234.5},
      {"$1,000,000", 1e6},
      {"1,234,567 apples", 1234567},
      {"1,2", 2},          // not a thousands group: two numbers
      {"1,23", 23},        // two digits after the comma: no group
      {"1,2345", 2345},    // four digits after the comma: no group
      {"12345,678", 678},  // a group needs 1-3 leading digits
      {"5-3", 3},          // minus after a digit is an operator
      {"10 - 3", 3},       // a sign must touch its digits
      {"x = -3", -3},
      {"f(x)-1", 1},
      {"a-2", 2},
      {"(-2)", -2},
      {"+8", 8},
      {"\xE2\x88\x92" "7", -7},  // U+2212 MINUS SIGN
      {".5", 0.5},
      {"5.", 5},
      {"3.14159 is pi", 3.14159},
      {"1.5e-3", 1.5e-3},
      {"2E10", 2e10},
      {"3 eggs", 3},
      {"3eggs", 3},  // 'e' without digits is no exponent
      {"3/4", 0.75},
      {"-3/4", -0.75},
      {"1,000/4", 250},
      {"1/0", 0},       // no fraction: 1, then 0
      {"1.5/2", 2},     // fractions are of integers
      {"x = 1 or x = 2", 2},
      {"1e999", std::nullopt},  // out of double's range: skipped
      {"no numbers here", std::nullopt},
      {"", std::nullopt},
      {"-", std::nullopt},
      {"-.", std::nullopt},
  };
  for (const Case& c : cases) {
    EXPECT_EQ(last_number(c.text), c.expected) << "'" << c.text << "'";
  }
  EXPECT_EQ(last_number("3/4", /*fractions=*/false), 4);
}

TEST(TrimWhitespace, Edges) {
  EXPECT_EQ(trim_whitespace("  a b \n\t"), "a b");
  EXPECT_EQ(trim_whitespace("ab"), "ab");
  EXPECT_EQ(trim_whitespace(" \r\n"), "");
  EXPECT_EQ(trim_whitespace(""), "");
}

// ---- exact_match ----

TEST(ExactMatch, TrimmedEquality) {
  ExactMatchReward reward({});
  EXPECT_EQ(reward.name(), "exact_match");
  std::vector<double> rewards = reward.score({answered("42"), answered(" 42\n"), answered("42.0"), answered("4 2"),
                                              answered(std::nullopt), answered(""),
                                              answered("42", {{"answer", " 42 "}})});
  EXPECT_EQ(rewards, (std::vector<double>{1, 1, 0, 0, 0, 0, 1}));
}

TEST(ExactMatch, FieldKinds) {
  ExactMatchReward reward({.field = "solution"});
  EXPECT_EQ(score_one(reward, answered("72", {{"solution", 72}})), 1);   // a number compares as its JSON text
  EXPECT_EQ(score_one(reward, answered("0.5", {{"solution", 0.5}})), 1);
  EXPECT_TRUE(std::isnan(score_one(reward, answered("72", {{"solution", nullptr}}))));  // no reference: no reward
  EXPECT_EQ(error_of([&] { reward.score({answered("72", {{"answer", "72"}, {"question", "q"}})}); }),
            "reward 'exact_match': the dataset row has no field 'solution' (its fields: answer, question)");
  EXPECT_EQ(error_of([&] { reward.score({answered("72", {{"solution", {1, 2}}})}); }),
            "reward 'exact_match': field 'solution' must be a string or a number, not [1,2]");
}

TEST(ExactMatch, IgnoreCase) {
  nlohmann::json paris = {{"answer", "Paris"}};
  ExactMatchReward strict({});
  ExactMatchReward relaxed({.ignore_case = true});
  EXPECT_EQ(score_one(strict, answered("paris", paris)), 0);
  EXPECT_EQ(score_one(relaxed, answered("PARIS ", paris)), 1);
  EXPECT_EQ(score_one(relaxed, answered("Pari", paris)), 0);
}

// ---- numeric ----

TEST(Numeric, ParsesTheLastNumber) {
  NumericReward reward({});
  nlohmann::json thousand = {{"answer", 1234}};
  std::vector<double> rewards = reward.score({
      answered("The answer is 1,234.", thousand),
      answered("1234", {{"answer", "1,234"}}),                   // string fields are parsed too
      answered("First 7, then 1234.0", thousand),
      answered("1234 apples, 5 pears", thousand),                // the last number counts
      answered("-0.5", {{"answer", -0.5}}),
      answered("3/4", {{"answer", 0.75}}),
      answered("no idea", thousand),
      answered(std::nullopt, thousand),
  });
  EXPECT_EQ(rewards, (std::vector<double>{1, 1, 1, 0, 1, 1, 0, 0}));
}

TEST(Numeric, Tolerance) {
  nlohmann::json third = {{"answer", "1/3"}};
  NumericReward standard({});
  // |0.333333 - 1/3| = 3.3e-7 <= abs_tol 1e-6; |0.3333 - 1/3| = 3.3e-5 is not.
  EXPECT_EQ(score_one(standard, answered("0.333333", third)), 1);
  EXPECT_EQ(score_one(standard, answered("0.3333", third)), 0);
  // rel_tol scales with the reference: 1 in 1e6 off.
  nlohmann::json million = {{"answer", 1000000}};
  EXPECT_EQ(score_one(standard, answered("1000001", million)), 0);
  NumericReward relative({.rel_tol = 1e-5});
  EXPECT_EQ(score_one(relative, answered("1000001", million)), 1);
  EXPECT_EQ(score_one(relative, answered("1000011", million)), 0);
  NumericReward absolute({.abs_tol = 0.01});
  EXPECT_EQ(score_one(absolute, answered("3.14", {{"answer", std::numbers::pi}})), 1);
  EXPECT_EQ(score_one(absolute, answered("3.13", {{"answer", std::numbers::pi}})), 0);
}

TEST(Numeric, UnjudgeableRows) {
  NumericReward reward({});
  EXPECT_TRUE(std::isnan(score_one(reward, answered("5", {{"answer", "\\frac{a}{b}"}}))));
  EXPECT_TRUE(std::isnan(score_one(reward, answered("5", {{"answer", nullptr}}))));
  EXPECT_EQ(error_of([&] { reward.score({answered("5", nlohmann::json::object())}); }),
            "reward 'numeric': the dataset row has no field 'answer' (its fields: none)");
}

// ---- format ----

TEST(Format, Levels) {
  struct Case {
    std::string completion;
    double expected;
  };
  const std::vector<Case> cases = {
      {"<|channel|>analysis<|message|>2+2 is 4.<|end|><|start|>assistant<|channel|>final<|message|>4<|return|>", 1},
      {"<|channel|>final<|message|>4<|return|>", 1},
      // a well-formed tool call: the format is kept, but there is no answer
      {"<|channel|>commentary to=functions.f <|constrain|>json<|message|>{}<|call|>", 0.5},
      {"<|channel|>final<|message|>4", 0},                               // truncated
      {"<|channel|>final<|message|>4<|end|>", 0},                        // no <|return|>
      {"<|channel|>analysis<|message|>hm<|return|>", 0},                 // <|return|> off `final`
      {"<|channel|>final<|message|>4<|return|><|start|>", 0},            // text after the stop
      {"<|channel|>nonsense<|message|>4<|return|>", 0},                  // unknown channel
      {"The answer is 4.", 0},
      {"", 0},
  };
  FormatReward reward({});
  for (const Case& c : cases) EXPECT_EQ(score_one(reward, completion(c.completion)), c.expected) << c.completion;
  FormatReward strict({.no_final = 0});
  EXPECT_EQ(score_one(strict, completion(cases[2].completion)), 0);
}

// ---- length ----

TEST(LengthPenalty, Linear) {
  LengthPenaltyReward reward({.max_tokens = 100});
  EXPECT_EQ(reward.score({of_length(0), of_length(25), of_length(100), of_length(250)}),
            (std::vector<double>{0, -0.25, -1, -1}));
  EXPECT_EQ(error_of([] { LengthPenaltyReward({.max_tokens = 0}); }),
            "reward 'length_penalty': max_tokens must be positive, not 0");
}

// DAPO's example numbers: L_max = 20480, L_cache = 4096 (arXiv 2503.14476, section 3.4).
TEST(SoftOverlongPunishment, Piecewise) {
  SoftOverlongPunishmentReward reward({.max_completion_len = 20480, .soft_punish_cache = 4096});
  EXPECT_EQ(reward.score({of_length(100), of_length(16384), of_length(16385), of_length(18432), of_length(20480),
                          of_length(20481)}),
            (std::vector<double>{0, 0, -1.0 / 4096, -0.5, -1, -1}));
  EXPECT_EQ(error_of([] { SoftOverlongPunishmentReward({.max_completion_len = 10, .soft_punish_cache = 11}); }),
            "reward 'soft_overlong_punishment': need 0 < soft_punish_cache <= max_completion_len, got 11 and 10");
}

// ---- make_reward ----

TEST(MakeReward, BuildsEachType) {
  EXPECT_EQ(make_reward("format")->name(), "format");
  EXPECT_EQ(make_reward("exact_match")->name(), "exact_match");
  EXPECT_EQ(make_reward("numeric")->name(), "numeric");
  EXPECT_EQ(make_reward({{"type", "length_penalty"}, {"max_tokens", 10}})->name(), "length_penalty");
  EXPECT_EQ(make_reward({{"type", "soft_overlong_punishment"}, {"max_completion_len", 10}, {"soft_punish_cache", 2}})
                ->score({of_length(9)}),
            std::vector<double>{-0.5});

  // Options reach the reward: a renamed numeric with a loose tolerance on another field.
  std::unique_ptr<RewardFunction> loose =
      make_reward({{"type", "numeric"}, {"field", "solution"}, {"abs_tol", 0.1}, {"name", "close_enough"}});
  EXPECT_EQ(loose->name(), "close_enough");
  EXPECT_EQ(loose->score({answered("3.05", {{"solution", 3}}), answered("3.2", {{"solution", 3}})}),
            (std::vector<double>{1, 0}));
  std::unique_ptr<RewardFunction> caseless = make_reward({{"type", "exact_match"}, {"ignore_case", true}});
  EXPECT_EQ(caseless->score({answered("ABC", {{"answer", "abc"}})}), std::vector<double>{1});
  std::unique_ptr<RewardFunction> format = make_reward({{"type", "format"}, {"no_final", 0.25}});
  EXPECT_EQ(format->score({completion("<|channel|>commentary to=functions.f<|message|>{}<|call|>")}),
            std::vector<double>{0.25});
}

TEST(MakeReward, ConfigErrors) {
  auto error = [](const nlohmann::json& spec) { return error_of([&] { make_reward(spec); }); };
  EXPECT_EQ(error("accuracy"),
            "unknown reward type 'accuracy' (known: exact_match, numeric, format, length_penalty, "
            "soft_overlong_punishment, external)");
  EXPECT_EQ(error({{"type", "numeric"}, {"tolerence", 0.1}}),
            "reward 'numeric' has no option \"tolerence\" (it has: type, field, abs_tol, rel_tol, fractions, name)");
  EXPECT_EQ(error({{"type", "length_penalty"}, {"max_tokens", "100"}}),
            "reward 'length_penalty': option \"max_tokens\" must be an integer, not \"100\"");
  EXPECT_EQ(error({{"type", "length_penalty"}}), "reward 'length_penalty' needs the option \"max_tokens\"");
  EXPECT_EQ(error({{"type", "exact_match"}, {"ignore_case", 1}}),
            "reward 'exact_match': option \"ignore_case\" must be true or false, not 1");
  EXPECT_EQ(error({{"type", "numeric"}, {"abs_tol", -1}}), "reward 'numeric': tolerances must be >= 0");
  EXPECT_EQ(error({{"field", "answer"}}), "reward {\"field\":\"answer\"} has no \"type\" string");
  EXPECT_EQ(error(3), "a reward must be a type name or an object with \"type\", not 3");
}

}  // namespace
}  // namespace ossrl

// LR schedules at the steps that matter (0, inside warmup, warmup end, middle, last) against
// transformers' lr lambdas, whose formulas the expected values spell out.
#include <gtest/gtest.h>

#include <cmath>

#include "core/error.h"
#include "train/schedule.h"

namespace ossrl {
namespace {

LrSchedule schedule(LrScheduleType type, int64_t warmup, int64_t total, double ratio = 0.0) {
  LrScheduleConfig c;
  c.type = type;
  c.warmup_steps = warmup;
  c.warmup_ratio = ratio;
  return LrSchedule(c, 2e-5, total);
}

// T = 10 steps, W = 2 warmup steps throughout.
TEST(LrSchedule, LinearWithWarmup) {
  const LrSchedule s = schedule(LrScheduleType::linear, 2, 10);
  EXPECT_DOUBLE_EQ(s.multiplier(0), 0.0);        // 0 / 2: the first update has lr 0
  EXPECT_DOUBLE_EQ(s.multiplier(1), 0.5);        // 1 / 2
  EXPECT_DOUBLE_EQ(s.multiplier(2), 1.0);        // (10 - 2) / (10 - 2)
  EXPECT_DOUBLE_EQ(s.multiplier(6), 0.5);        // (10 - 6) / 8
  EXPECT_DOUBLE_EQ(s.multiplier(9), 1.0 / 8);    // the last update
  EXPECT_DOUBLE_EQ(s.multiplier(10), 0.0);
  EXPECT_DOUBLE_EQ(s.multiplier(12), 0.0);       // max(0, ...) past the end
  EXPECT_DOUBLE_EQ(s.lr(6), 1e-5);
}

TEST(LrSchedule, CosineWithWarmup) {
  const LrSchedule s = schedule(LrScheduleType::cosine, 2, 10);
  EXPECT_DOUBLE_EQ(s.multiplier(0), 0.0);
  EXPECT_DOUBLE_EQ(s.multiplier(1), 0.5);
  EXPECT_DOUBLE_EQ(s.multiplier(2), 1.0);  // progress 0: (1 + cos 0) / 2
  // progress (4 - 2) / 8 = 1/4: (1 + cos(pi/4)) / 2 = 0.8535533905932737
  EXPECT_NEAR(s.multiplier(4), 0.8535533905932737, 1e-15);
  EXPECT_NEAR(s.multiplier(6), 0.5, 1e-15);  // progress 1/2
  EXPECT_NEAR(s.multiplier(10), 0.0, 1e-15);  // progress 1: (1 + cos pi) / 2
}

TEST(LrSchedule, ConstantWithWarmup) {
  const LrSchedule s = schedule(LrScheduleType::constant, 2, 10);
  EXPECT_DOUBLE_EQ(s.multiplier(0), 0.0);
  EXPECT_DOUBLE_EQ(s.multiplier(1), 0.5);
  EXPECT_DOUBLE_EQ(s.multiplier(2), 1.0);
  EXPECT_DOUBLE_EQ(s.multiplier(9), 1.0);
  // Without warmup it is transformers' plain "constant".
  EXPECT_DOUBLE_EQ(schedule(LrScheduleType::constant, 0, 10).multiplier(0), 1.0);
}

TEST(LrSchedule, NoWarmupStartsAtFullLr) {
  const LrSchedule s = schedule(LrScheduleType::linear, 0, 4);
  EXPECT_DOUBLE_EQ(s.multiplier(0), 1.0);   // (4 - 0) / 4
  EXPECT_DOUBLE_EQ(s.multiplier(3), 0.25);  // (4 - 3) / 4
}

TEST(LrSchedule, WarmupRatioRoundsUpAndStepsWin) {
  EXPECT_EQ(schedule(LrScheduleType::linear, 0, 10, 0.15).warmup_steps(), 2);  // ceil(1.5)
  EXPECT_EQ(schedule(LrScheduleType::linear, 0, 10, 0.1).warmup_steps(), 1);
  EXPECT_EQ(schedule(LrScheduleType::linear, 3, 10, 0.5).warmup_steps(), 3);
  // A ratio-derived warmup behaves like the same explicit warmup.
  EXPECT_DOUBLE_EQ(schedule(LrScheduleType::cosine, 0, 10, 0.15).multiplier(1), 0.5);
}

TEST(LrSchedule, ParsesTransformersNamesAndRejectsOthers) {
  EXPECT_EQ(parse_lr_schedule("constant_with_warmup"), LrScheduleType::constant);
  EXPECT_EQ(parse_lr_schedule("cosine"), LrScheduleType::cosine);
  EXPECT_THROW(parse_lr_schedule("cosine_with_restarts"), Error);
  EXPECT_THROW(schedule(LrScheduleType::linear, 0, 0), Error);
  EXPECT_THROW(schedule(LrScheduleType::linear, 0, 10, 1.5), Error);
}

}  // namespace
}  // namespace ossrl

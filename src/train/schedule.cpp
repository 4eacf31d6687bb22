#include "train/schedule.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "core/error.h"

namespace ossrl {

LrScheduleType parse_lr_schedule(std::string_view name) {
  if (name == "constant" || name == "constant_with_warmup") return LrScheduleType::constant;
  if (name == "linear") return LrScheduleType::linear;
  if (name == "cosine") return LrScheduleType::cosine;
  fail("lr_scheduler_type must be one of constant, constant_with_warmup, linear, cosine; got '{}'",
       name);
}

LrSchedule::LrSchedule(const LrScheduleConfig& config, double base_lr, int64_t num_training_steps)
    : type_(config.type), base_lr_(base_lr), total_(num_training_steps) {
  OSSRL_CHECK(num_training_steps >= 1, "num_training_steps must be >= 1, got {}",
              num_training_steps);
  OSSRL_CHECK(config.warmup_steps >= 0, "warmup_steps must be >= 0, got {}", config.warmup_steps);
  OSSRL_CHECK(config.warmup_ratio >= 0 && config.warmup_ratio <= 1,
              "warmup_ratio must be in [0, 1], got {}", config.warmup_ratio);
  // transformers' TrainingArguments.get_warmup_steps.
  warmup_ = config.warmup_steps > 0
                ? config.warmup_steps
                : int64_t(std::ceil(double(num_training_steps) * config.warmup_ratio));
}

double LrSchedule::multiplier(int64_t step) const {
  if (step < warmup_) return double(step) / double(std::max<int64_t>(1, warmup_));
  const double progress = double(step - warmup_) / double(std::max<int64_t>(1, total_ - warmup_));
  switch (type_) {
    case LrScheduleType::constant: return 1.0;
    case LrScheduleType::linear: return std::max(0.0, double(total_ - step) / double(std::max<int64_t>(1, total_ - warmup_)));
    case LrScheduleType::cosine:
      return std::max(0.0, 0.5 * (1.0 + std::cos(std::numbers::pi * progress)));
  }
  return 1.0;
}

}  // namespace ossrl

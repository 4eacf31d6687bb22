// Learning-rate schedules as transformers builds them for its Trainer (lr_scheduler_type
// "constant" / "constant_with_warmup", "linear", "cosine"): a multiplier of the base lr as
// a function of the optimiser step. The update number s (0-based) uses lr * multiplier(s):
// LambdaLR sets multiplier(0) before the first step and the Trainer advances it after each,
// so with warmup the very first update has lr 0, as in transformers.
#pragma once

#include <cstdint>
#include <string_view>

namespace ossrl {

enum class LrScheduleType {
  constant,  // transformers' "constant_with_warmup" ("constant" when warmup is 0)
  linear,    // get_linear_schedule_with_warmup: warmup, then linear to 0 at the last step
  cosine,    // get_cosine_schedule_with_warmup (num_cycles 0.5): warmup, then half a cosine to 0
};
// "constant", "constant_with_warmup", "linear", "cosine".
LrScheduleType parse_lr_schedule(std::string_view name);

struct LrScheduleConfig {
  LrScheduleType type = LrScheduleType::linear;  // transformers' default
  int64_t warmup_steps = 0;   // wins when > 0
  double warmup_ratio = 0.0;  // else warmup = ceil(num_training_steps * warmup_ratio)
};

class LrSchedule {
 public:
  LrSchedule(const LrScheduleConfig& config, double base_lr, int64_t num_training_steps);

  // Warmup: s / max(1, W) for s < W. After it, with p = (s - W) / max(1, T - W):
  // constant 1, linear max(0, 1 - p) (= (T - s) / (T - W)), cosine max(0, (1 + cos(pi p)) / 2).
  double multiplier(int64_t step) const;
  double lr(int64_t step) const { return base_lr_ * multiplier(step); }
  int64_t warmup_steps() const { return warmup_; }
  int64_t num_training_steps() const { return total_; }

 private:
  LrScheduleType type_;
  double base_lr_;
  int64_t total_;
  int64_t warmup_;
};

}  // namespace ossrl

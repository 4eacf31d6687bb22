#include "train/grpo.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/error.h"

namespace ossrl {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// torch.nanmean: the mean of the non-NaN values, NaN if there are none.
double nanmean(std::span<const double> values) {
  double sum = 0;
  int64_t count = 0;
  for (double v : values) {
    if (std::isnan(v)) continue;
    sum += v;
    ++count;
  }
  return count == 0 ? kNaN : sum / double(count);
}

// TRL's nanstd: sqrt of the nan-mean squared deviation times count / (count - 1); NaN when
// fewer than two values are present (Bessel's correction is undefined there).
double nanstd(std::span<const double> values) {
  const double mean = nanmean(values);
  double sum_sq = 0;
  int64_t count = 0;
  for (double v : values) {
    if (std::isnan(v)) continue;
    sum_sq += (v - mean) * (v - mean);
    ++count;
  }
  if (count < 2) return kNaN;
  return std::sqrt(sum_sq / double(count - 1));
}

// torch.isclose(std, 0) with its default atol 1e-8 (rtol * |0| adds nothing); NaN is not close.
bool is_zero_std(double std) { return std::fabs(std) <= 1e-8; }

}  // namespace

ScaleRewards parse_scale_rewards(std::string_view name) {
  if (name == "group" || name == "true") return ScaleRewards::group;
  if (name == "batch") return ScaleRewards::batch;
  if (name == "none" || name == "false") return ScaleRewards::none;
  fail("scale_rewards must be one of group, batch, none; got '{}'", name);
}

Advantages compute_advantages(const AdvantageConfig& config,
                              std::span<const std::vector<double>> rewards_per_func) {
  const size_t num_funcs = rewards_per_func.size();
  OSSRL_CHECK(num_funcs > 0, "compute_advantages needs at least one reward function");
  const size_t batch = rewards_per_func[0].size();
  const size_t group = size_t(config.num_generations);
  OSSRL_CHECK(config.num_generations > 0, "num_generations must be positive, got {}",
              config.num_generations);
  OSSRL_CHECK(batch % group == 0, "{} completions are not whole groups of num_generations={}",
              batch, group);
  for (size_t f = 0; f < num_funcs; ++f) {
    OSSRL_CHECK(rewards_per_func[f].size() == batch,
                "reward function {} returned {} rewards for {} completions", f,
                rewards_per_func[f].size(), batch);
  }
  OSSRL_CHECK(config.reward_weights.empty() || config.reward_weights.size() == num_funcs,
              "{} reward_weights for {} reward functions", config.reward_weights.size(), num_funcs);

  Advantages out;
  // Weighted sum with NaN rewards skipped (TRL's nansum); a completion no function scored
  // stays NaN so it neither moves its group's baseline nor gets an advantage of its own.
  out.rewards.assign(batch, 0.0);
  for (size_t i = 0; i < batch; ++i) {
    bool scored = false;
    for (size_t f = 0; f < num_funcs; ++f) {
      const double r = rewards_per_func[f][i];
      if (std::isnan(r)) continue;
      const double w = config.reward_weights.empty() ? 1.0 : config.reward_weights[f];
      out.rewards[i] += w * r;
      scored = true;
    }
    if (!scored) out.rewards[i] = kNaN;
  }

  const std::span<const double> rewards(out.rewards);
  // "none" still computes the group std: TRL logs frac_reward_zero_std from it.
  const double batch_std =
      config.scale_rewards == ScaleRewards::batch ? (batch > 1 ? nanstd(rewards) : 0.0) : 0.0;
  out.advantages.assign(batch, 0.0f);
  int64_t zero_std = 0;
  for (size_t g0 = 0; g0 < batch; g0 += group) {
    const auto members = rewards.subspan(g0, group);
    const double mean = nanmean(members);
    const double std = config.scale_rewards == ScaleRewards::batch ? batch_std
                       : group > 1                                 ? nanstd(members)
                                                                   : 0.0;
    for (size_t i = g0; i < g0 + group; ++i) {
      double a = rewards[i] - mean;
      if (config.scale_rewards != ScaleRewards::none) a /= std + 1e-4;
      out.advantages[i] = std::isnan(a) ? 0.0f : float(a);
      zero_std += is_zero_std(std);
    }
  }

  RewardMetrics& m = out.metrics;
  for (size_t f = 0; f < num_funcs; ++f) {
    m.func_mean.push_back(nanmean(rewards_per_func[f]));
    m.func_std.push_back(nanstd(rewards_per_func[f]));
  }
  m.reward = nanmean(rewards);
  m.reward_std = nanstd(rewards);
  m.frac_reward_zero_std = batch == 0 ? kNaN : double(zero_std) / double(batch);
  return out;
}

LossType parse_loss_type(std::string_view name) {
  for (LossType t : {LossType::grpo, LossType::bnpo, LossType::dr_grpo, LossType::dapo}) {
    if (name == loss_type_name(t)) return t;
  }
  fail("loss_type must be one of grpo, bnpo, dr_grpo, dapo; got '{}'", name);
}

std::string_view loss_type_name(LossType type) {
  switch (type) {
    case LossType::grpo: return "grpo";
    case LossType::bnpo: return "bnpo";
    case LossType::dr_grpo: return "dr_grpo";
    case LossType::dapo: return "dapo";
  }
  return "?";
}

namespace {

// A token takes part in the loss unless the extra mask drops it or it belongs to a
// truncated completion under mask_truncated_completions.
bool sequence_active(const GrpoLossConfig& config, std::span<const uint8_t> truncated, size_t b) {
  return !(config.mask_truncated_completions && !truncated.empty() && truncated[b]);
}

void check_layout(std::span<const int32_t> lengths, std::span<const uint8_t> mask,
                  std::span<const uint8_t> truncated, size_t* num_tokens) {
  size_t n = 0;
  for (int32_t len : lengths) {
    OSSRL_CHECK(len >= 0, "negative completion length {}", len);
    n += size_t(len);
  }
  OSSRL_CHECK(mask.empty() || mask.size() == n, "mask has {} entries for {} tokens", mask.size(), n);
  OSSRL_CHECK(truncated.empty() || truncated.size() == lengths.size(),
              "truncated has {} entries for {} sequences", truncated.size(), lengths.size());
  *num_tokens = n;
}

}  // namespace

int64_t count_loss_tokens(const GrpoLossConfig& config, std::span<const int32_t> lengths,
                          std::span<const uint8_t> mask, std::span<const uint8_t> truncated) {
  size_t n = 0;
  check_layout(lengths, mask, truncated, &n);
  int64_t count = 0;
  size_t t = 0;
  for (size_t b = 0; b < lengths.size(); ++b) {
    const bool seq = sequence_active(config, truncated, b);
    for (int32_t j = 0; j < lengths[b]; ++j, ++t) count += seq && (mask.empty() || mask[t]);
  }
  return count;
}

namespace {

// Forward and backward of one token's loss side by side. ratio r = exp(logp - old_logp),
// d r / d logp = r (old_logp is a constant). Returns l, dl/dlogp and coef_1, the possibly
// delta-clamped ratio that TRL's clip metrics compare.
struct TokenLoss {
  double loss, dloss, coef;
};

TokenLoss token_loss(const GrpoLossConfig& config, double logp, double old_logp,
                            double ref_logp, double advantage) {
  const double r = std::exp(logp - old_logp);
  // coef_1 = r, or clamp(r, max=delta): torch's clamp passes the gradient where the input
  // lies inside the bounds, ends included.
  double coef1 = r, dcoef1 = r;
  if (config.delta && r > *config.delta) coef1 = *config.delta, dcoef1 = 0;
  const double lo = 1.0 - config.epsilon_low(), hi = 1.0 + config.epsilon_high_or_default();
  const double coef2 = std::clamp(r, lo, hi);
  const double dcoef2 = (r >= lo && r <= hi) ? r : 0.0;
  // -min(coef1*A, coef2*A): the gradient follows the smaller branch, half each on a tie
  // (torch.minimum). A clipped branch that wins contributes nothing: that is the clip.
  const double a1 = coef1 * advantage, a2 = coef2 * advantage;
  double loss, dloss;
  if (a1 < a2) {
    loss = -a1, dloss = -dcoef1 * advantage;
  } else if (a1 > a2) {
    loss = -a2, dloss = -dcoef2 * advantage;
  } else {
    loss = -a1, dloss = -0.5 * (dcoef1 + dcoef2) * advantage;
  }
  if (config.beta != 0.0) {
    // k3 = exp(d) - d - 1 with d = ref - logp; dk3/dlogp = 1 - exp(d).
    const double d = ref_logp - logp;
    loss += config.beta * (std::exp(d) - d - 1.0);
    dloss += config.beta * (1.0 - std::exp(d));
  }
  return {loss, dloss, coef1};
}

}  // namespace

template <typename Real>
GrpoLoss grpo_loss(const GrpoLossConfig& config, const GrpoBatch<Real>& batch,
                   std::span<Real> dlogp) {
  size_t n = 0;
  check_layout(batch.lengths, batch.mask, batch.truncated, &n);
  const size_t num_seqs = batch.lengths.size();
  OSSRL_CHECK(batch.logp.size() == n, "logp has {} entries for {} tokens", batch.logp.size(), n);
  OSSRL_CHECK(batch.old_logp.empty() || batch.old_logp.size() == n,
              "old_logp has {} entries for {} tokens", batch.old_logp.size(), n);
  OSSRL_CHECK(config.beta == 0.0 || batch.ref_logp.size() == n,
              "beta={} needs ref_logp for all {} tokens, got {}", config.beta, n,
              batch.ref_logp.size());
  OSSRL_CHECK(batch.entropy.empty() || batch.entropy.size() == n,
              "entropy has {} entries for {} tokens", batch.entropy.size(), n);
  OSSRL_CHECK(batch.advantages.size() == num_seqs, "{} advantages for {} sequences",
              batch.advantages.size(), num_seqs);
  OSSRL_CHECK(dlogp.size() == n, "dlogp has {} entries for {} tokens", dlogp.size(), n);
  OSSRL_CHECK(config.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1");
  OSSRL_CHECK(config.loss_type != LossType::dr_grpo || config.max_completion_length >= 1,
              "dr_grpo needs max_completion_length >= 1");

  const int64_t num_tokens =
      count_loss_tokens(config, batch.lengths, batch.mask, batch.truncated);
  const double ga = double(config.gradient_accumulation_steps);
  // Weight of one active token's loss in the total, except grpo's per-sequence 1/T_b.
  double token_weight = 0;
  switch (config.loss_type) {
    case LossType::grpo: token_weight = 1.0 / (double(num_seqs) * ga); break;
    case LossType::bnpo: token_weight = 1.0 / (double(std::max<int64_t>(1, num_tokens)) * ga); break;
    case LossType::dr_grpo:
      token_weight = 1.0 / (double(num_seqs) * config.max_completion_length * ga);
      break;
    case LossType::dapo: {
      const int64_t items = batch.num_items_in_batch > 0 ? batch.num_items_in_batch : num_tokens;
      token_weight = 1.0 / double(std::max<int64_t>(1, items));
      break;
    }
  }

  GrpoLoss out;
  GrpoLossMetrics& m = out.metrics;
  m.num_tokens = num_tokens;
  double kl_sum = 0, entropy_sum = 0, low_sum = 0, high_sum = 0;
  double low_min = kNaN, high_max = kNaN;
  size_t t0 = 0;
  for (size_t b = 0; b < num_seqs; ++b) {
    const size_t len = size_t(batch.lengths[b]);
    const bool seq_on = sequence_active(config, batch.truncated, b);
    int64_t seq_tokens = 0;
    for (size_t t = t0; t < t0 + len; ++t) seq_tokens += seq_on && (batch.mask.empty() || batch.mask[t]);
    const double w = config.loss_type == LossType::grpo
                         ? token_weight / double(std::max<int64_t>(1, seq_tokens))
                         : token_weight;
    const double adv = batch.advantages[b];
    int64_t seq_low = 0, seq_high = 0;
    for (size_t t = t0; t < t0 + len; ++t) {
      if (!seq_on || !(batch.mask.empty() || batch.mask[t])) {
        dlogp[t] = Real(0);
        continue;
      }
      const double lp = batch.logp[t];
      const double old = batch.old_logp.empty() ? lp : double(batch.old_logp[t]);
      const double ref = config.beta != 0.0 ? double(batch.ref_logp[t]) : 0.0;
      const TokenLoss tl = token_loss(config, lp, old, ref, adv);
      out.loss += w * tl.loss;
      dlogp[t] = Real(w * tl.dloss);

      if (config.beta != 0.0) kl_sum += std::exp(ref - lp) - (ref - lp) - 1.0;
      if (!batch.entropy.empty()) entropy_sum += batch.entropy[t];
      const bool low = tl.coef < 1.0 - config.epsilon_low() && adv < 0;
      const bool high = tl.coef > 1.0 + config.epsilon_high_or_default() && adv > 0;
      seq_low += low;
      seq_high += high;
    }
    low_sum += double(seq_low);
    high_sum += double(seq_high);
    // 0/0 for a sequence without active tokens is NaN in TRL's masked_seq_mean, and
    // nanmin/nanmax skip it.
    if (seq_tokens > 0) {
      const double lm = double(seq_low) / double(seq_tokens), hm = double(seq_high) / double(seq_tokens);
      low_min = std::isnan(low_min) ? lm : std::min(low_min, lm);
      high_max = std::isnan(high_max) ? hm : std::max(high_max, hm);
    }
    t0 += len;
  }
  const double denom = double(std::max<int64_t>(1, num_tokens));
  if (config.beta != 0.0) m.kl = kl_sum / denom;
  if (!batch.entropy.empty()) m.entropy = entropy_sum / denom;
  m.clip_ratio_low_mean = low_sum / denom;
  m.clip_ratio_high_mean = high_sum / denom;
  // low and high exclude each other (A < 0 vs A > 0), so the region count is their sum.
  m.clip_ratio_region_mean = (low_sum + high_sum) / denom;
  m.clip_ratio_low_min = low_min;
  m.clip_ratio_high_max = high_max;
  return out;
}

template <typename Real>
double sft_loss(std::span<const Real> logp, std::span<const uint8_t> mask,
                int64_t num_items_in_batch, std::span<Real> dlogp) {
  OSSRL_CHECK(mask.empty() || mask.size() == logp.size(), "mask has {} entries for {} tokens",
              mask.size(), logp.size());
  OSSRL_CHECK(dlogp.size() == logp.size(), "dlogp has {} entries for {} tokens", dlogp.size(),
              logp.size());
  int64_t active = 0;
  for (size_t t = 0; t < logp.size(); ++t) active += mask.empty() || mask[t];
  const int64_t items = num_items_in_batch > 0 ? num_items_in_batch : active;
  const double scale = 1.0 / double(std::max<int64_t>(1, items));
  double loss = 0;
  for (size_t t = 0; t < logp.size(); ++t) {
    const bool on = mask.empty() || mask[t];
    loss -= on ? scale * double(logp[t]) : 0.0;
    dlogp[t] = on ? Real(-scale) : Real(0);
  }
  return loss;
}

template GrpoLoss grpo_loss<float>(const GrpoLossConfig&, const GrpoBatch<float>&, std::span<float>);
template GrpoLoss grpo_loss<double>(const GrpoLossConfig&, const GrpoBatch<double>&,
                                    std::span<double>);
template double sft_loss<float>(std::span<const float>, std::span<const uint8_t>, int64_t,
                                std::span<float>);
template double sft_loss<double>(std::span<const double>, std::span<const uint8_t>, int64_t,
                                 std::span<double>);

}  // namespace ossrl

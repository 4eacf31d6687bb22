// GRPO as TRL's GRPOTrainer defines it (trl/trainer/grpo_trainer.py, 1.x): group-relative
// advantages from several reward functions, the clipped-surrogate loss with a k3 KL term
// and its four normalisations, and the SFT loss. Everything works on per-token log-prob
// arrays of a ragged batch and returns dLoss/dlogp per token, which the policy's backward
// takes; nothing here knows the model.
//
// Ragged layout: sequence b owns tokens [offset_b, offset_b + lengths[b]) of every
// per-token array, offset_b = lengths[0] + ... + lengths[b-1]; N = sum of lengths. This is
// TRL's padded [B, T] tensor with the right padding dropped, so TRL's completion_mask is
// all ones over the kept tokens and only the optional extra mask (TRL's tool_mask) and
// mask_truncated_completions remove tokens. Sequences may also be whole prompt+completion
// rows (the policy's log-prob layout) with the mask 1 only on completion tokens: every loss
// type and metric counts active tokens only, so the result is the same.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace ossrl {

// ---- advantages ------------------------------------------------------------------------

// How the group-centred reward is divided (GRPOConfig.scale_rewards).
enum class ScaleRewards {
  group,  // by the std of the prompt's group (TRL's default, also `True`)
  batch,  // by the std of the whole batch (PPO-Lite)
  none,   // not at all (Dr. GRPO; `False`)
};
ScaleRewards parse_scale_rewards(std::string_view name);  // "group" | "batch" | "none"

struct AdvantageConfig {
  int num_generations = 8;             // G: completions per prompt, consecutive in the batch
  ScaleRewards scale_rewards = ScaleRewards::group;
  std::vector<double> reward_weights;  // one per reward function; empty means all 1
};

// The numbers TRL logs from _generate_and_score_completions.
struct RewardMetrics {
  double reward = 0;      // "reward": nanmean of the weighted sum (unscorable rows excluded)
  double reward_std = 0;  // "reward_std": its nanstd (Bessel-corrected, NaN below 2 values)
  double frac_reward_zero_std = 0;  // "frac_reward_zero_std": share of completions whose
                                    // group (or, for "batch", the batch) has std ~ 0
  std::vector<double> func_mean;    // "rewards/<name>/mean" per function: nanmean
  std::vector<double> func_std;     // "rewards/<name>/std" per function: nanstd
};

struct Advantages {
  std::vector<float> advantages;  // [B] per completion; 0 where no function scored it
  std::vector<double> rewards;    // [B] weighted reward sum; NaN where no function scored it
  RewardMetrics metrics;
};

// rewards_per_func[f][i]: reward function f's reward for completion i (B completions, B a
// multiple of G; NaN = "no reward", TRL's None). Combines them as TRL's
// "sum_then_normalize": reward_i = nansum_f(w_f * r_fi), NaN if every function gave NaN;
// advantage_i = (reward_i - nanmean of i's group) / (std + 1e-4), std per scale_rewards
// (nanstd, Bessel-corrected), and 0 wherever that is NaN (an unscorable completion, or a
// group with fewer than two scored completions). Computed in double; TRL uses float32, so
// expect agreement to float rounding (~1e-6 relative).
Advantages compute_advantages(const AdvantageConfig& config,
                              std::span<const std::vector<double>> rewards_per_func);

// ---- GRPO loss -------------------------------------------------------------------------

// How per-token losses become one number (GRPOConfig.loss_type). T_b = active tokens of
// sequence b, M = max_completion_length, GA = gradient_accumulation_steps.
enum class LossType {
  grpo,     // mean_b( sum_t l_bt / max(1, T_b) ) / GA
  bnpo,     // sum l / max(1, sum_b T_b) / GA         (tokens of this micro-batch)
  dr_grpo,  // sum l / (B * M) / GA
  dapo,     // sum l / max(1, num_items_in_batch)    (tokens of the whole optimiser step;
            // TRL's default). TRL counts the generation batch's active tokens, gathered
            // over processes, and divides by that / num_processes before DDP averages the
            // gradients over processes; with one process that is simply the count over all
            // micro-batches of the step, which the trainer sums with count_loss_tokens().
};
LossType parse_loss_type(std::string_view name);  // "grpo" | "bnpo" | "dr_grpo" | "dapo"
std::string_view loss_type_name(LossType type);

struct GrpoLossConfig {
  LossType loss_type = LossType::dapo;
  double epsilon = 0.2;                // clip low: ratio >= 1 - epsilon
  std::optional<double> epsilon_high;  // clip high: ratio <= 1 + epsilon_high; default epsilon
  std::optional<double> delta;         // two-sided clipping (INTELLECT-2): ratio <= delta
  double beta = 0.0;                   // KL coefficient; 0 skips ref_logp entirely
  int max_completion_length = 256;     // M of dr_grpo
  int gradient_accumulation_steps = 1; // GA: micro-batches summed into one optimiser step
  bool mask_truncated_completions = false;

  double epsilon_low() const { return epsilon; }
  double epsilon_high_or_default() const { return epsilon_high.value_or(epsilon); }
};

// One micro-batch. Real is float (the policy's log-probs) or double (finite-difference
// tests); sums are always accumulated in double.
template <typename Real>
struct GrpoBatch {
  std::span<const int32_t> lengths;  // [B] completion tokens per sequence
  std::span<const Real> logp;        // [N] log pi_theta(token): what the gradient is for
  // [N] log-probs of the policy that sampled the tokens. Empty when num_iterations == 1:
  // TRL then uses logp.detach(), so ratio == 1 but its gradient (ratio itself) is not 0.
  std::span<const Real> old_logp;
  std::span<const Real> ref_logp;       // [N] reference log-probs; needed iff beta != 0
  std::span<const float> advantages;    // [B] from compute_advantages
  std::span<const uint8_t> mask;        // [N] 0 drops a token (TRL's tool_mask); empty = all 1
  std::span<const uint8_t> truncated;   // [B] hit the length limit; empty = none truncated
  std::span<const Real> entropy;        // [N] per-token entropy, only for the metric; may be empty
  // dapo's denominator: active tokens over the whole optimiser step. 0 means this
  // micro-batch's own count (right when GA == 1).
  int64_t num_items_in_batch = 0;
};

// TRL's logged metrics for one micro-batch (means over its active tokens).
struct GrpoLossMetrics {
  int64_t num_tokens = 0;             // active tokens of the micro-batch
  std::optional<double> kl;           // "kl": mean k3 KL, only when beta != 0
  std::optional<double> entropy;      // "entropy": mean entropy, when given
  double clip_ratio_low_mean = 0;     // "clip_ratio/low_mean": ratio < 1-eps_low and A < 0
  double clip_ratio_high_mean = 0;    // "clip_ratio/high_mean": ratio > 1+eps_high and A > 0
  double clip_ratio_region_mean = 0;  // "clip_ratio/region_mean": either
  double clip_ratio_low_min = 0;      // "clip_ratio/low_min": min over sequences of their mean
  double clip_ratio_high_max = 0;     // "clip_ratio/high_max": max over sequences (NaN if none active)
};

struct GrpoLoss {
  // The micro-batch's share of the step's loss, GA and dapo scaling included: summing it
  // over the step's micro-batches gives the step loss, and `dlogp` is its gradient.
  double loss = 0;
  GrpoLossMetrics metrics;
};

// Per-token loss l = -min(r*A, clip(r, 1-eps_low, 1+eps_high)*A) + beta*k3, with
// r = exp(logp - old_logp) (clamped to <= delta if set) and
// k3 = exp(ref - logp) - (ref - logp) - 1, aggregated per loss_type over active tokens.
// Writes dLoss/dlogp into dlogp [N] (0 on inactive tokens), old_logp and ref_logp held
// constant. Where the two branches of the min tie (always so when r == 1), the gradient is
// split half and half between them, as torch.minimum's backward does.
template <typename Real>
GrpoLoss grpo_loss(const GrpoLossConfig& config, const GrpoBatch<Real>& batch,
                   std::span<Real> dlogp);

// Active tokens of a micro-batch (mask and mask_truncated_completions applied): sum it over
// the micro-batches of an optimiser step for dapo's num_items_in_batch.
int64_t count_loss_tokens(const GrpoLossConfig& config, std::span<const int32_t> lengths,
                          std::span<const uint8_t> mask, std::span<const uint8_t> truncated);

// ---- SFT loss --------------------------------------------------------------------------

// Mean negative log-likelihood of the active completion tokens:
// loss = -sum(mask * logp) / max(1, num_items), num_items = num_items_in_batch if > 0
// (tokens of the whole accumulated step, as transformers' Trainer passes it) else the
// active tokens here. Writes dLoss/dlogp = -mask / num_items into dlogp [N].
template <typename Real>
double sft_loss(std::span<const Real> logp, std::span<const uint8_t> mask,
                int64_t num_items_in_batch, std::span<Real> dlogp);

}  // namespace ossrl

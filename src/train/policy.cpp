#include "train/policy.h"

#include "core/error.h"
#include "model/cpu/lm_head.h"

namespace ossrl {

namespace {

// The adapters of every layer as the decoder takes them; empty for the base model.
std::vector<const LayerAdapters*> layer_adapters(const Lora* lora, int layers) {
  std::vector<const LayerAdapters*> out;
  if (!lora || !lora->adapters_enabled()) return out;
  for (int l = 0; l < layers; ++l) out.push_back(lora->layer(l));
  return out;
}

}  // namespace

Policy::Policy(const CpuModel& base, Lora* lora, PolicyOptions options)
    : base_(base), lora_(lora), options_(options) {}

void Policy::zero_grad() {
  if (lora_) lora_->zero_grad();
}
void Policy::set_adapters_enabled(bool on) {
  if (lora_) lora_->set_adapters_enabled(on);
}
bool Policy::adapters_enabled() const { return lora_ && lora_->adapters_enabled(); }

PolicyOutput Policy::forward(std::span<const int32_t> tokens, std::span<const int32_t> offsets,
                             const PolicyForward& options) {
  const ModelRef m = base_.ref();
  if (lora_) lora_->set_dropout(options.apply_dropout, options.dropout_step);
  const std::vector<const LayerAdapters*> adapters = layer_adapters(lora_, m.config.num_hidden_layers);

  // A forward that keeps nothing (reference or old-policy log-probs) leaves an earlier
  // kept forward in place for its backward.
  if (options.keep_activations) saved_ = {};
  DecoderActivations* keep = options.keep_activations ? &saved_.decoder : nullptr;
  std::vector<float> hidden =
      decoder_forward(m, tokens, offsets, {}, adapters, keep, options_.recompute_activations);

  PolicyOutput out;
  out.log_probs.resize(tokens.size());
  if (options.entropy) out.entropy.resize(tokens.size());
  std::vector<float> lse(tokens.size());
  next_token_log_probs(out.log_probs.data(), lse.data(), options.entropy ? out.entropy.data() : nullptr,
                       hidden.data(), tokens, offsets, m.weights.lm_head, options.score_mask);
  if (options.keep_activations) {
    saved_.tokens.assign(tokens.begin(), tokens.end());
    saved_.offsets.assign(offsets.begin(), offsets.end());
    saved_.options = options;
    saved_.adapters_enabled = lora_ && lora_->adapters_enabled();
    saved_.hidden = std::move(hidden);
    saved_.lse = std::move(lse);
    saved_.valid = true;
  }
  return out;
}

void Policy::backward(std::span<const float> dlogp) {
  OSSRL_CHECK(saved_.valid, "Policy::backward needs a forward with keep_activations first");
  OSSRL_CHECK(dlogp.size() == saved_.tokens.size(), "Policy::backward: {} gradients for {} tokens",
              dlogp.size(), saved_.tokens.size());
  const ModelRef m = base_.ref();
  // The adapters and dropout masks of the forward being differentiated.
  std::vector<const LayerAdapters*> adapters;
  if (saved_.adapters_enabled) {
    OSSRL_CHECK(lora_->adapters_enabled(), "Policy::backward: adapters were switched off after the forward");
    lora_->set_dropout(saved_.options.apply_dropout, saved_.options.dropout_step);
    adapters = layer_adapters(lora_, m.config.num_hidden_layers);
  }
  const int64_t h = m.config.hidden_size;
  std::vector<float> dhidden(saved_.tokens.size() * size_t(h), 0.0f);
  next_token_log_probs_backward(dhidden.data(), dlogp.data(), saved_.hidden.data(), saved_.tokens,
                                saved_.offsets, saved_.lse.data(), m.weights.lm_head);
  saved_.hidden = {};
  decoder_backward(dhidden.data(), m, saved_.offsets, adapters, saved_.decoder);
  saved_ = {};
}

}  // namespace ossrl

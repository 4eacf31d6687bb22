#include "model/cpu_model.h"

#include <algorithm>

#include "core/error.h"

#include "model/checkpoint_check.h"
#include "model/cpu/decoder.h"
#include "model/cpu/linear.h"
#include "model/cpu/lm_head.h"

namespace ossrl {

CpuModel::CpuModel(const std::string& dir, Activations activations)
    : config_(GptOssConfig::from_file(dir + "/config.json")),
      checkpoint_(Checkpoint::open(dir)),
      // Validation first: it names every missing or misshapen tensor against config.json.
      weights_((validate_gpt_oss_checkpoint(checkpoint_, config_),
                load_gpt_oss_weights(checkpoint_, config_))),
      rope_(rope_frequencies(config_.rope, config_.head_dim)),
      activations_(activations) {}

std::vector<float> CpuModel::forward(std::span<const int32_t> tokens, std::span<const int32_t> offsets,
                                     std::span<KvCache* const> caches, LogitsFor which,
                                     std::span<const LayerAdapters* const> adapters) {
  // One cache per sequence (decoder_forward also accepts none, for whole sequences).
  OSSRL_CHECK(caches.size() + 1 == offsets.size(), "ragged batch: {} offsets need {} caches, got {}",
              offsets.size(), offsets.empty() ? 0 : offsets.size() - 1, caches.size());
  std::vector<float> hidden = decoder_forward(ref(), tokens, offsets, caches, adapters, nullptr);
  const int64_t h = config_.hidden_size;
  int64_t rows = int64_t(tokens.size());
  if (which == LogitsFor::LastTokens) {
    rows = int64_t(offsets.size()) - 1;
    for (int64_t b = 0; b < rows; ++b) {
      const int64_t last = offsets[size_t(b) + 1] - 1;
      std::copy(hidden.begin() + last * h, hidden.begin() + (last + 1) * h, hidden.begin() + b * h);
    }
  }
  std::vector<float> logits(size_t(rows * config_.vocab_size));
  linear_forward(logits.data(), hidden.data(), weights_.lm_head, nullptr, rows);
  return logits;
}

std::vector<float> CpuModel::log_probs(std::span<const int32_t> tokens, std::span<const int32_t> offsets) {
  // No caches: whole sequences from position 0, each attending to itself.
  const std::vector<float> hidden = decoder_forward(ref(), tokens, offsets, {}, {}, nullptr);
  std::vector<float> result(tokens.size());
  next_token_log_probs(result.data(), nullptr, nullptr, hidden.data(), tokens, offsets, weights_.lm_head);
  return result;
}

}  // namespace ossrl

#include "engine/generate.h"

#include <algorithm>
#include <span>

namespace ossrl {

std::vector<Generation> generate(CpuModel& model, const std::vector<std::vector<int32_t>>& prompts,
                                 const GenerateOptions& options,
                                 std::span<const LayerAdapters* const> adapters) {
  const size_t batch = prompts.size();
  std::vector<Generation> out(batch);
  if (batch == 0 || options.max_new_tokens <= 0) return out;
  const int64_t vocab = model.config().vocab_size;

  std::vector<KvCache> caches;
  std::vector<SamplingRng> rngs;
  caches.reserve(batch);
  for (size_t i = 0; i < batch; ++i) {
    caches.push_back(model.new_cache());
    rngs.emplace_back(options.seed, i);
  }

  // Step inputs: the sequences still running, their new tokens (the prompt at prefill, the
  // last sample afterwards) as a ragged batch, and their caches.
  std::vector<size_t> active(batch);
  for (size_t i = 0; i < batch; ++i) active[i] = i;
  std::vector<int32_t> tokens, offsets{0};
  std::vector<KvCache*> step_caches;
  for (size_t i : active) {
    tokens.insert(tokens.end(), prompts[i].begin(), prompts[i].end());
    offsets.push_back(int32_t(tokens.size()));
    step_caches.push_back(&caches[i]);
  }

  while (!active.empty()) {
    const std::vector<float> logits = model.forward(tokens, offsets, step_caches, LogitsFor::LastTokens, adapters);
    std::vector<size_t> still_active;
    tokens.clear();
    offsets.assign(1, 0);
    step_caches.clear();
    for (size_t row = 0; row < active.size(); ++row) {
      const size_t i = active[row];
      const SampledToken s = sample(std::span(logits).subspan(row * size_t(vocab), size_t(vocab)),
                                    options.sampling, rngs[i]);
      Generation& g = out[i];
      g.tokens.push_back(s.token);
      g.logprobs.push_back(s.logprob);
      g.stopped = std::find(options.stop_tokens.begin(), options.stop_tokens.end(), s.token) !=
                  options.stop_tokens.end();
      if (g.stopped || int(g.tokens.size()) >= options.max_new_tokens) continue;
      still_active.push_back(i);
      tokens.push_back(s.token);
      offsets.push_back(int32_t(tokens.size()));
      step_caches.push_back(&caches[i]);
    }
    active = std::move(still_active);
  }
  return out;
}

}  // namespace ossrl

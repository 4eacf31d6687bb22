#include "train/batch_grad.h"

#include <fmt/format.h>

#include "core/error.h"
#include "io/json_file.h"
#include "io/safetensors.h"
#include "train/peft_adapter.h"

namespace ossrl {

namespace {

// The whole sequences (prompt + completion) the policy runs, and where each completion's
// tokens sit in them.
struct Layout {
  std::vector<int32_t> tokens, offsets;
  std::vector<int64_t> completion_at;  // [N]: index in tokens of completion token i
  std::vector<int32_t> lengths;        // [B] completion lengths
};

Layout layout(const CompletionBatch& batch) {
  Layout l;
  l.offsets.push_back(0);
  for (const CompletionSequence& s : batch.sequences) {
    const int64_t start = int64_t(l.tokens.size()) + int64_t(s.prompt.size());
    l.tokens.insert(l.tokens.end(), s.prompt.begin(), s.prompt.end());
    l.tokens.insert(l.tokens.end(), s.completion.begin(), s.completion.end());
    l.offsets.push_back(int32_t(l.tokens.size()));
    for (size_t t = 0; t < s.completion.size(); ++t) l.completion_at.push_back(start + int64_t(t));
    l.lengths.push_back(int32_t(s.completion.size()));
  }
  return l;
}

std::vector<float> gather(const std::vector<float>& all, const Layout& l) {
  std::vector<float> out(l.completion_at.size());
  for (size_t i = 0; i < out.size(); ++i) out[i] = all[size_t(l.completion_at[i])];
  return out;
}

template <typename T>
std::vector<T> concat(const CompletionBatch& batch, std::vector<T> CompletionSequence::*field) {
  std::vector<T> out;
  for (const CompletionSequence& s : batch.sequences) out.insert(out.end(), (s.*field).begin(), (s.*field).end());
  return out;
}

}  // namespace

CompletionBatch read_completion_batch(const std::string& path, int vocab_size) {
  const nlohmann::json j = read_json_file(path);
  OSSRL_CHECK(j.is_object() && j.contains("sequences") && j["sequences"].is_array() && !j["sequences"].empty(),
              "{}: expected {{\"sequences\": [...]}} with at least one sequence", path);
  CompletionBatch batch;
  size_t with_old = 0, with_ref = 0;
  for (size_t b = 0; b < j["sequences"].size(); ++b) {
    const nlohmann::json& js = j["sequences"][b];
    const std::string where = fmt::format("{}: sequence {}", path, b);
    CompletionSequence s;
    try {
      OSSRL_CHECK(js.is_object() && js.contains("prompt") && js.contains("completion"),
                  "{}: needs \"prompt\" and \"completion\" token lists", where);
      s.prompt = js["prompt"].get<std::vector<int32_t>>();
      s.completion = js["completion"].get<std::vector<int32_t>>();
      const size_t c = s.completion.size();
      s.completion_mask = js.contains("completion_mask") ? js["completion_mask"].get<std::vector<uint8_t>>()
                                                         : std::vector<uint8_t>(c, 1);
      s.advantage = js.value("advantage", 0.0f);
      if (js.contains("old_log_probs")) s.old_log_probs = js["old_log_probs"].get<std::vector<float>>();
      if (js.contains("ref_log_probs")) s.ref_log_probs = js["ref_log_probs"].get<std::vector<float>>();
      OSSRL_CHECK(!s.prompt.empty() && c > 0, "{}: prompt and completion need at least one token each", where);
      for (int32_t id : s.prompt) OSSRL_CHECK(id >= 0 && id < vocab_size, "{}: token {} outside the vocabulary (size {})", where, id, vocab_size);
      for (int32_t id : s.completion) OSSRL_CHECK(id >= 0 && id < vocab_size, "{}: token {} outside the vocabulary (size {})", where, id, vocab_size);
      for (uint8_t m : s.completion_mask) OSSRL_CHECK(m <= 1, "{}: completion_mask values must be 0 or 1", where);
      OSSRL_CHECK(s.completion_mask.size() == c, "{}: completion_mask has {} entries for {} completion tokens", where,
                  s.completion_mask.size(), c);
      OSSRL_CHECK(s.old_log_probs.empty() || s.old_log_probs.size() == c,
                  "{}: old_log_probs has {} entries for {} completion tokens", where, s.old_log_probs.size(), c);
      OSSRL_CHECK(s.ref_log_probs.empty() || s.ref_log_probs.size() == c,
                  "{}: ref_log_probs has {} entries for {} completion tokens", where, s.ref_log_probs.size(), c);
    } catch (const nlohmann::json::exception& e) {
      fail("{}: {}", where, e.what());
    }
    with_old += !s.old_log_probs.empty();
    with_ref += !s.ref_log_probs.empty();
    batch.sequences.push_back(std::move(s));
  }
  const size_t n = batch.sequences.size();
  OSSRL_CHECK(with_old == 0 || with_old == n, "{}: old_log_probs given for {} of {} sequences; give all or none", path,
              with_old, n);
  OSSRL_CHECK(with_ref == 0 || with_ref == n, "{}: ref_log_probs given for {} of {} sequences; give all or none", path,
              with_ref, n);
  return batch;
}

BatchGrad batch_grad(TrainablePolicy& policy, const CompletionBatch& batch, const LossSpec& spec) {
  const Layout l = layout(batch);
  const std::vector<uint8_t> mask = concat(batch, &CompletionSequence::completion_mask);
  BatchGrad result;
  policy.zero_grad();

  const bool grpo = spec.kind == LossKind::Grpo;
  if (grpo && spec.grpo.beta != 0.0) {
    result.ref_log_probs = concat(batch, &CompletionSequence::ref_log_probs);
    if (result.ref_log_probs.empty()) {
      // The reference is the base model: the same weights with every adapter (and trained
      // sinks/router copy) switched off.
      const bool was_enabled = policy.adapters_enabled();
      policy.set_adapters_enabled(false);
      PolicyForward ref_options;
      ref_options.keep_activations = false;
      result.ref_log_probs = gather(policy.forward(l.tokens, l.offsets, ref_options).log_probs, l);
      policy.set_adapters_enabled(was_enabled);
    }
  }

  result.log_probs = gather(policy.forward(l.tokens, l.offsets).log_probs, l);
  std::vector<float> dlogp(result.log_probs.size(), 0.0f);
  if (grpo) {
    const std::vector<float> old = concat(batch, &CompletionSequence::old_log_probs);
    std::vector<float> advantages;
    for (const CompletionSequence& s : batch.sequences) advantages.push_back(s.advantage);
    GrpoBatch<float> in;
    in.lengths = l.lengths;
    in.logp = result.log_probs;
    in.old_logp = old;
    in.ref_logp = result.ref_log_probs;
    in.advantages = advantages;
    in.mask = mask;
    const GrpoLoss loss = grpo_loss<float>(spec.grpo, in, dlogp);
    result.loss = loss.loss;
    result.metrics = loss.metrics;
  } else {
    result.loss = sft_loss<float>(result.log_probs, mask, 0, dlogp);
  }

  // dLoss/dlogp of the completion tokens, zero on the prompts.
  std::vector<float> dlogp_all(l.tokens.size(), 0.0f);
  for (size_t i = 0; i < dlogp.size(); ++i) dlogp_all[size_t(l.completion_at[i])] = dlogp[i];
  policy.backward(dlogp_all);
  return result;
}

void write_batch_grad(const std::string& path, const Lora& lora, const BatchGrad& result) {
  SafetensorsWriter out;
  out.set_metadata("format", "pt");
  for (const PeftTensor& t : peft_tensors(lora, LoraField::Grad)) out.add_f32(t.name, t.shape, t.values);
  const float loss = float(result.loss);
  out.add_f32("loss", {}, std::span<const float>(&loss, 1));
  out.add_f32("log_probs", {int64_t(result.log_probs.size())}, result.log_probs);
  if (!result.ref_log_probs.empty())
    out.add_f32("ref_log_probs", {int64_t(result.ref_log_probs.size())}, result.ref_log_probs);
  out.write(path);
}

}  // namespace ossrl

// train::Policy: the gradient of Σ_t w_t log p_t with respect to every trainable parameter
// (LoRA A and B on q/k/v/o and on every expert's gate_up/down, sinks, router weight and
// bias) against central differences of the whole model, and its agreement with CpuModel.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <random>
#include <unistd.h>
#include <string>
#include <vector>

#include "core/error.h"
#include "model/cpu_model.h"
#include "model/grad_check.h"
#include "model/random_checkpoint.h"
#include "train/lora.h"
#include "train/policy.h"

namespace ossrl {
namespace {

using testing::grad_error;
using testing::numeric_grad;
using testing::random_floats;
using testing::weighted_sum;

// Small enough for finite differences over every parameter: two layers (sliding window of
// 3 positions, then full), GQA groups of two, four experts with two per token. MXFP4 needs
// hidden and intermediate multiples of 32.
GptOssConfig grad_config() {
  GptOssConfig c;
  c.num_hidden_layers = 2;
  c.hidden_size = 32;
  c.intermediate_size = 32;
  c.num_local_experts = 4;
  c.experts_per_token = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 8;
  c.sliding_window = 3;
  c.vocab_size = 40;
  c.layer_types = {AttentionType::Sliding, AttentionType::Full};
  return c;
}

std::string write_checkpoint(const std::string& name, bool mxfp4, DType dtype) {
  const std::string dir =
      std::string(OSSRL_GENERATED_DIR) + "/policy_models/" + name + "." + std::to_string(getpid());
  RandomCheckpointOptions o;
  o.seed = 11;
  o.mxfp4_experts = mxfp4;
  o.dtype = dtype;
  write_random_checkpoint(dir, grad_config(), o);
  return dir;
}

// Three sequences, all longer than the sliding window.
const std::vector<int32_t> kTokens = {3, 17, 5, 39, 0, 22, 8, 11, 30, 2, 19, 25, 7, 7, 33, 14, 1, 28, 36, 9};
const std::vector<int32_t> kOffsets = {0, 7, 12, 20};

LoraConfig full_lora(double dropout) {
  LoraConfig c;
  c.r = 2;
  c.lora_alpha = 4;
  c.lora_dropout = dropout;
  c.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"};
  c.train_sinks = true;
  c.train_router = true;
  c.seed = 3;
  return c;
}

// Non-zero B so that every path through the adapters carries gradient.
void randomise_b(Lora& lora, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> dist(-0.3f, 0.3f);
  for (Parameter& p : lora.parameters()) {
    if (p.kind == Parameter::Kind::LoraB) {
      for (float& v : p.data) v = dist(rng);
    }
  }
}

struct GradCase {
  const char* name;
  bool mxfp4;
  double dropout;
  bool recompute;
};

class PolicyGradient : public ::testing::TestWithParam<GradCase> {};

TEST_P(PolicyGradient, EveryParameterMatchesFiniteDifferences) {
  const GradCase gc = GetParam();
  // F32 weights: the finite differences need the model's own rounding to be small.
  const std::string dir = write_checkpoint(gc.name, gc.mxfp4, DType::F32);
  CpuModel model(dir);
  Lora lora(model.config(), model.weights(), full_lora(gc.dropout));
  randomise_b(lora, 5);
  PolicyOptions po;
  po.recompute_activations = gc.recompute;
  Policy policy(model, &lora, po);
  PolicyForward fo;
  fo.dropout_step = 42;  // fixed masks: the loss is a deterministic function of the parameters
  const auto w = random_floats(kTokens.size(), 7);

  const PolicyOutput out = policy.forward(kTokens, kOffsets, fo);
  lora.zero_grad();
  policy.backward(w);
  PolicyForward probe = fo;
  probe.keep_activations = false;
  auto loss = [&] { return weighted_sum(policy.forward(kTokens, kOffsets, probe).log_probs.data(), w); };
  EXPECT_DOUBLE_EQ(loss(), weighted_sum(out.log_probs.data(), w));

  // eps 3e-3: the fp32 forward's rounding gives ~1e-3 relative error (it scales as 1/eps;
  // observed at most 3.4e-3 on the smallest tensors), hence a 1e-2 threshold. Some
  // perturbations flip a top-k routing choice, where the loss jumps and the routing is
  // not differentiated by design; those entries (one-sided differences disagreeing by more
  // than 0.5) are left out, at most 5% of them (observed 0-1.4%).
  constexpr float kEps = 3e-3f;
  constexpr double kTol = 1e-2;
  size_t kinks_total = 0, checked_total = 0;
  for (Parameter& p : lora.parameters()) {
    size_t kinks = 0;
    const std::vector<double> numeric =
        testing::numeric_grad_skipping_kinks(p.data.data(), p.data.size(), loss, kEps, 0.5, &kinks);
    const testing::GradError e = grad_error(p.grad.data(), numeric);
    kinks_total += kinks;
    checked_total += e.checked;
    EXPECT_GT(e.norm, 1e-5) << p.name << ": the gradient vanishes, nothing is checked";
    EXPECT_LE(e.relative, kTol) << p.name << " (|grad| " << e.norm << ", " << kinks << " kinks)";
    if (std::getenv("OSSRL_GRAD_VERBOSE")) {
      std::printf("[ grad     ] %-58s relative error %.2e |grad| %.2e kinks %zu\n", p.name.c_str(), e.relative,
                  e.norm, kinks);
    }
  }
  EXPECT_LE(kinks_total, (kinks_total + checked_total) / 20) << "too many routing flips to check";
  std::printf("[ grad     ] %s: %zu values checked, %zu left out at routing flips\n", gc.name, checked_total,
              kinks_total);
}

INSTANTIATE_TEST_SUITE_P(Checkpoints, PolicyGradient,
                         ::testing::Values(GradCase{"mxfp4", true, 0.0, false},
                                           GradCase{"dense", false, 0.0, false},
                                           GradCase{"mxfp4_dropout_recompute", true, 0.25, true}),
                         [](const auto& info) { return std::string(info.param.name); });

class PolicyTest : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = write_checkpoint("policy_bf16", true, DType::BF16); }
  std::string dir_;
};

TEST_F(PolicyTest, AdaptersOffGiveExactlyTheBaseModel) {
  CpuModel model(dir_);
  Lora lora(model.config(), model.weights(), full_lora(0.1));
  randomise_b(lora, 9);
  for (Parameter& p : lora.parameters()) {
    if (p.kind == Parameter::Kind::Sinks || p.kind == Parameter::Kind::RouterBias) p.data[0] += 0.5f;
  }
  Policy policy(model, &lora);
  const std::vector<float> base = model.log_probs(kTokens, kOffsets);
  const std::vector<float> adapted = policy.forward(kTokens, kOffsets).log_probs;
  EXPECT_NE(adapted, base);
  lora.set_adapters_enabled(false);
  EXPECT_EQ(policy.forward(kTokens, kOffsets).log_probs, base);
  // No Lora at all: the base model too.
  Policy plain(model, nullptr);
  EXPECT_EQ(plain.forward(kTokens, kOffsets).log_probs, base);
}

TEST_F(PolicyTest, FreshAdaptersLeaveTheLogProbsUnchanged) {
  // lora_B = 0 and sinks/router copies equal to the checkpoint's: CpuModel's log-probs,
  // bit for bit (the bf16 router decodes to the same fp32 values).
  CpuModel model(dir_);
  Lora lora(model.config(), model.weights(), full_lora(0.0));
  Policy policy(model, &lora);
  PolicyForward fo;
  fo.entropy = true;
  const PolicyOutput out = policy.forward(kTokens, kOffsets, fo);
  EXPECT_EQ(out.log_probs, model.log_probs(kTokens, kOffsets));

  // The entropy of each next-token distribution, from CpuModel's full logits.
  std::vector<KvCache> caches;
  std::vector<KvCache*> ptrs;
  caches.reserve(kOffsets.size() - 1);
  for (size_t b = 0; b + 1 < kOffsets.size(); ++b) ptrs.push_back(&caches.emplace_back(model.config()));
  const std::vector<float> logits = model.forward(kTokens, kOffsets, ptrs, LogitsFor::AllTokens);
  const int64_t vocab = model.config().vocab_size;
  for (size_t b = 0; b + 1 < kOffsets.size(); ++b) {
    EXPECT_EQ(out.entropy[size_t(kOffsets[b])], 0.0f);
    for (int64_t t = kOffsets[b] + 1; t < kOffsets[b + 1]; ++t) {
      const float* z = logits.data() + (t - 1) * vocab;
      double m = -1e300, sum = 0, zsum = 0;
      for (int64_t v = 0; v < vocab; ++v) m = std::max(m, double(z[v]));
      for (int64_t v = 0; v < vocab; ++v) {
        sum += std::exp(z[v] - m);
        zsum += std::exp(z[v] - m) * z[v];
      }
      EXPECT_NEAR(out.entropy[size_t(t)], m + std::log(sum) - zsum / sum, 1e-5);
    }
  }
}

TEST_F(PolicyTest, RecomputationGivesTheSameGradients) {
  CpuModel model(dir_);
  LoraConfig lc = full_lora(0.2);
  Lora a(model.config(), model.weights(), lc), b(model.config(), model.weights(), lc);
  randomise_b(a, 4);
  randomise_b(b, 4);
  Policy keep_all(model, &a);
  Policy recompute(model, &b, PolicyOptions{true});
  const auto w = random_floats(kTokens.size(), 8);
  EXPECT_EQ(keep_all.forward(kTokens, kOffsets).log_probs, recompute.forward(kTokens, kOffsets).log_probs);
  keep_all.backward(w);
  recompute.backward(w);
  for (size_t i = 0; i < a.parameters().size(); ++i) {
    EXPECT_EQ(a.parameters()[i].grad, b.parameters()[i].grad) << a.parameters()[i].name;
  }
}

TEST_F(PolicyTest, SequenceStartsCarryNoGradientAndGradsAccumulate) {
  CpuModel model(dir_);
  Lora lora(model.config(), model.weights(), full_lora(0.0));
  randomise_b(lora, 6);
  Policy policy(model, &lora);
  auto w = random_floats(kTokens.size(), 10);
  policy.forward(kTokens, kOffsets);
  policy.backward(w);
  std::vector<std::vector<float>> once;
  for (const Parameter& p : lora.parameters()) once.push_back(p.grad);

  w[0] = 1e6f;  // sequence starts: log p is 0 there by definition
  w[7] = -1e6f;
  policy.forward(kTokens, kOffsets);
  policy.backward(w);  // accumulates: now twice the first gradient
  for (size_t i = 0; i < once.size(); ++i) {
    const Parameter& p = lora.parameters()[i];
    float scale = 0;
    for (float g : once[i]) scale = std::max(scale, std::abs(g));
    for (size_t j = 0; j < p.grad.size(); ++j) ASSERT_NEAR(p.grad[j], 2 * once[i][j], 1e-5f * scale) << p.name;
  }
  lora.zero_grad();
  for (const Parameter& p : lora.parameters()) {
    for (float g : p.grad) ASSERT_EQ(g, 0.0f);
  }
}

TEST_F(PolicyTest, AReferenceForwardInBetweenLeavesTheKeptForward) {
  // GRPO's order: the policy's forward (kept, dropout on), the reference's with adapters
  // off and nothing kept, then the policy's backward: the same grads as without the
  // reference pass in between.
  CpuModel model(dir_);
  LoraConfig lc = full_lora(0.2);
  Lora a(model.config(), model.weights(), lc), b(model.config(), model.weights(), lc);
  randomise_b(a, 12);
  randomise_b(b, 12);
  Policy pa(model, &a), pb(model, &b);
  const auto w = random_floats(kTokens.size(), 13);
  PolicyForward train;
  train.dropout_step = 7;
  pa.forward(kTokens, kOffsets, train);
  pa.backward(w);
  pb.forward(kTokens, kOffsets, train);
  b.set_adapters_enabled(false);
  PolicyForward reference;
  reference.keep_activations = false;
  EXPECT_EQ(pb.forward(kTokens, kOffsets, reference).log_probs, model.log_probs(kTokens, kOffsets));
  EXPECT_THROW(pb.backward(w), Error);  // adapters still off: refused, not silently wrong
  b.set_adapters_enabled(true);
  pb.backward(w);
  for (size_t i = 0; i < a.parameters().size(); ++i) {
    EXPECT_EQ(a.parameters()[i].grad, b.parameters()[i].grad) << a.parameters()[i].name;
  }
}

TEST_F(PolicyTest, BackwardNeedsAKeptForward) {
  CpuModel model(dir_);
  Lora lora(model.config(), model.weights(), full_lora(0.0));
  Policy policy(model, &lora);
  const std::vector<float> w(kTokens.size(), 1.0f);
  EXPECT_THROW(policy.backward(w), Error);
  PolicyForward no_keep;
  no_keep.keep_activations = false;
  policy.forward(kTokens, kOffsets, no_keep);
  EXPECT_THROW(policy.backward(w), Error);
  policy.forward(kTokens, kOffsets);
  EXPECT_THROW(policy.backward(std::vector<float>(3, 1.0f)), Error);  // wrong length
  policy.backward(w);
  EXPECT_THROW(policy.backward(w), Error);  // activations are consumed
}

}  // namespace
}  // namespace ossrl

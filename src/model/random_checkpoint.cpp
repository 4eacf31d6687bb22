#include "model/random_checkpoint.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <numbers>
#include <random>
#include <span>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/mxfp4.h"
#include "io/safetensors.h"

namespace ossrl {

namespace {

// Normal deviates from mt19937_64 by Box-Muller: unlike std::normal_distribution, the
// sequence is the same with every standard library, so a seed names one checkpoint.
class Gaussian {
 public:
  explicit Gaussian(uint64_t seed) : engine_(seed) {}
  float operator()(float stddev) {
    const double u1 = (double(engine_() >> 11) + 1.0) * 0x1.0p-53;  // (0, 1]
    const double u2 = double(engine_() >> 11) * 0x1.0p-53;          // [0, 1)
    return float(stddev * std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2));
  }
  uint64_t bits() { return engine_(); }

 private:
  std::mt19937_64 engine_;
};

class Builder {
 public:
  explicit Builder(const RandomCheckpointOptions& options) : rng_(options.seed), dtype_(options.dtype) {}

  // A tensor of `shape` with entries mean + N(0, stddev²), stored in the checkpoint dtype.
  void normal(const std::string& name, std::vector<int64_t> shape, float stddev, float mean = 0.0f) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    std::vector<float> values(static_cast<size_t>(n));
    for (float& v : values) v = mean + rng_(stddev);
    if (dtype_ == DType::F32) {
      writer_.add_f32(name, std::move(shape), values);
    } else {
      std::vector<uint16_t> bits(values.size());
      for (size_t i = 0; i < values.size(); ++i) bits[i] = f32_to_bf16(values[i]);
      writer_.add(name, DType::BF16, std::move(shape),
                  std::span(reinterpret_cast<const uint8_t*>(bits.data()), bits.size() * 2));
    }
  }

  // MXFP4 experts `prefix`_blocks [E, out, in/32, 16] and `prefix`_scales [E, out, in/32]
  // with entries of standard deviation about `stddev`: uniform random E2M1 codes (rms 2.93)
  // under block scales near stddev / 2.93, varied by a factor of two between blocks.
  void mxfp4(const std::string& prefix, int64_t experts, int64_t out, int64_t in, float stddev) {
    const int64_t n_blocks = experts * out * (in / kMxfp4BlockValues);
    std::vector<uint8_t> blocks(static_cast<size_t>(n_blocks * kMxfp4BlockBytes));
    std::vector<uint8_t> scales(static_cast<size_t>(n_blocks));
    for (uint8_t& b : blocks) b = uint8_t(rng_.bits());
    const int exponent = int(std::lround(std::log2(stddev / 2.93f)));
    for (uint8_t& s : scales) s = uint8_t(127 + exponent - int(rng_.bits() & 1));
    writer_.add(prefix + "_blocks", DType::U8, {experts, out, in / kMxfp4BlockValues, kMxfp4BlockBytes},
                blocks);
    writer_.add(prefix + "_scales", DType::U8, {experts, out, in / kMxfp4BlockValues}, scales);
  }

  void write(const std::string& path) { writer_.write(path); }

 private:
  Gaussian rng_;
  DType dtype_;
  SafetensorsWriter writer_;
};

}  // namespace

void write_random_checkpoint(const std::string& dir, const GptOssConfig& c,
                             const RandomCheckpointOptions& options) {
  OSSRL_CHECK(options.dtype == DType::F32 || options.dtype == DType::BF16,
              "random checkpoint: dtype must be F32 or BF16, not {}", dtype_name(options.dtype));
  OSSRL_CHECK(!options.mxfp4_experts || (c.hidden_size % 32 == 0 && c.intermediate_size % 32 == 0),
              "random checkpoint: MXFP4 experts need hidden_size and intermediate_size divisible by 32 "
              "(got {} and {})", c.hidden_size, c.intermediate_size);
  std::filesystem::create_directories(dir);

  const int64_t hidden = c.hidden_size;
  const int64_t inter = c.intermediate_size;
  const int64_t experts = c.num_local_experts;
  const int64_t q_dim = int64_t(c.num_attention_heads) * c.head_dim;
  const int64_t kv_dim = int64_t(c.num_key_value_heads) * c.head_dim;
  auto fan_in = [](int64_t in) { return float(1.0 / std::sqrt(double(in))); };
  constexpr float kBias = 0.1f;
  constexpr float kNorm = 0.1f;  // norm weights are 1 + N(0, 0.1²)

  Builder b(options);
  b.normal("model.embed_tokens.weight", {c.vocab_size, hidden}, 1.0f);
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    b.normal(p + "input_layernorm.weight", {hidden}, kNorm, 1.0f);
    b.normal(p + "post_attention_layernorm.weight", {hidden}, kNorm, 1.0f);
    b.normal(p + "self_attn.q_proj.weight", {q_dim, hidden}, fan_in(hidden));
    b.normal(p + "self_attn.k_proj.weight", {kv_dim, hidden}, fan_in(hidden));
    b.normal(p + "self_attn.v_proj.weight", {kv_dim, hidden}, fan_in(hidden));
    b.normal(p + "self_attn.o_proj.weight", {hidden, q_dim}, fan_in(q_dim));
    if (c.attention_bias) {
      b.normal(p + "self_attn.q_proj.bias", {q_dim}, kBias);
      b.normal(p + "self_attn.k_proj.bias", {kv_dim}, kBias);
      b.normal(p + "self_attn.v_proj.bias", {kv_dim}, kBias);
      b.normal(p + "self_attn.o_proj.bias", {hidden}, kBias);
    }
    b.normal(p + "self_attn.sinks", {c.num_attention_heads}, 1.0f);
    b.normal(p + "mlp.router.weight", {experts, hidden}, fan_in(hidden));
    b.normal(p + "mlp.router.bias", {experts}, kBias);
    const std::string e = p + "mlp.experts.";
    if (options.mxfp4_experts) {
      b.mxfp4(e + "gate_up_proj", experts, 2 * inter, hidden, fan_in(hidden));
      b.mxfp4(e + "down_proj", experts, hidden, inter, fan_in(inter));
    } else {
      b.normal(e + "gate_up_proj", {experts, hidden, 2 * inter}, fan_in(hidden));
      b.normal(e + "down_proj", {experts, inter, hidden}, fan_in(inter));
    }
    b.normal(e + "gate_up_proj_bias", {experts, 2 * inter}, kBias);
    b.normal(e + "down_proj_bias", {experts, hidden}, kBias);
  }
  b.normal("model.norm.weight", {hidden}, kNorm, 1.0f);
  if (!c.tie_word_embeddings) b.normal("lm_head.weight", {c.vocab_size, hidden}, fan_in(hidden));
  b.write(dir + "/model.safetensors");

  std::ofstream config_file(dir + "/config.json");
  config_file << c.to_json().dump(2) << "\n";
  OSSRL_CHECK(config_file.good(), "could not write {}/config.json", dir);
}

}  // namespace ossrl

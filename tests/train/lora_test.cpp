// LoRA parameters: configuration, names, shapes, PEFT initialisation, views.
#include <gtest/gtest.h>

#include <cmath>
#include <set>

#include "core/error.h"
#include "model/config.h"
#include "model/cpu_model.h"
#include "train/lora.h"
#include "model/tiny_model.h"

namespace ossrl {
namespace {

TEST(LoraConfig, ScalingAndTargets) {
  LoraConfig c;
  c.r = 4;
  c.lora_alpha = 8;
  EXPECT_FLOAT_EQ(c.scaling(), 2.0f);
  c.use_rslora = true;
  EXPECT_FLOAT_EQ(c.scaling(), 4.0f);
  c.target_modules = {"experts", "q_proj", "down_proj"};
  const std::vector<LoraTarget> t = c.targets();
  ASSERT_EQ(t.size(), 3u);
  EXPECT_EQ(t[0], LoraTarget::QProj);
  EXPECT_EQ(t[1], LoraTarget::GateUpProj);
  EXPECT_EQ(t[2], LoraTarget::DownProj);
  c.target_modules = {"mlp"};
  EXPECT_THROW(c.validate(), Error);
  c.target_modules = {"q_proj"};
  c.lora_dropout = 1.0;
  EXPECT_THROW(c.validate(), Error);
  c.lora_dropout = 0;
  c.r = 0;
  EXPECT_THROW(c.validate(), Error);
}

TEST(Lora, NamesShapesAndPeftInitialisation) {
  const std::string dir = testing::tiny_checkpoint("lora_init");
  CpuModel model(dir);
  const GptOssConfig& mc = model.config();
  LoraConfig c;
  c.r = 4;
  c.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "experts"};
  c.train_sinks = true;
  c.train_router = true;
  c.seed = 7;
  Lora lora(mc, model.weights(), c);
  const int64_t h = mc.hidden_size, q = mc.num_attention_heads * mc.head_dim,
                kv = mc.num_key_value_heads * mc.head_dim, inter = mc.intermediate_size;
  const int64_t per_layer = 2 * 4 * (q + h) + 2 * 4 * (kv + h) + mc.num_attention_heads +
                            mc.num_local_experts * (h + 1) +
                            mc.num_local_experts * 4 * ((2 * inter + h) + (h + inter));
  EXPECT_EQ(lora.numel(), per_layer * mc.num_hidden_layers);

  const auto params = lora.parameters();
  EXPECT_EQ(params[0].name, "model.layers.0.self_attn.q_proj.lora_A.weight");
  EXPECT_EQ(params[0].module, "model.layers.0.self_attn.q_proj");
  EXPECT_EQ(params[0].shape, (std::vector<int64_t>{4, h}));
  EXPECT_EQ(params[1].name, "model.layers.0.self_attn.q_proj.lora_B.weight");
  EXPECT_EQ(params[1].shape, (std::vector<int64_t>{q, 4}));
  std::set<std::string> names;
  for (const Parameter& p : params) {
    EXPECT_TRUE(names.insert(p.name).second) << p.name;
    EXPECT_EQ(p.grad.size(), p.data.size());
    if (p.kind == Parameter::Kind::LoraB) {
      for (float v : p.data) ASSERT_EQ(v, 0.0f) << p.name;
    }
    if (p.kind == Parameter::Kind::LoraA) {
      const float bound = 1.0f / std::sqrt(float(p.shape[1]));
      float max_abs = 0;
      for (float v : p.data) max_abs = std::max(max_abs, std::abs(v));
      EXPECT_LE(max_abs, bound) << p.name;
      EXPECT_GT(max_abs, 0.8f * bound) << p.name;  // uniform over the whole range
    }
  }
  EXPECT_TRUE(names.count("model.layers.2.mlp.experts.3.gate_up_proj.lora_A.weight"));
  EXPECT_TRUE(names.count("model.layers.1.self_attn.sinks"));
  EXPECT_TRUE(names.count("model.layers.1.mlp.router.weight"));
  EXPECT_TRUE(names.count("model.layers.1.mlp.router.bias"));

  // Same seed, same initialisation; another seed, another.
  Lora again(mc, model.weights(), c);
  EXPECT_EQ(again.parameters()[0].data, params[0].data);
  c.seed = 8;
  Lora other(mc, model.weights(), c);
  EXPECT_NE(other.parameters()[0].data, params[0].data);

  // The views point at the parameters; disabled adapters give no views.
  const LayerAdapters* la = lora.layer(1);
  ASSERT_NE(la, nullptr);
  ASSERT_EQ(la->gate_up_proj.size(), size_t(mc.num_local_experts));
  EXPECT_EQ(la->sinks[0], model.weights().layers[1].attn.sinks[0]);
  EXPECT_FLOAT_EQ(la->q_proj.scale, c.scaling());
  lora.set_adapters_enabled(false);
  EXPECT_EQ(lora.layer(1), nullptr);
}

}  // namespace
}  // namespace ossrl

// Reading the PyTorch gradient fixtures (tests/fixtures/grad-*, make_grad_fixtures.py): a
// tensor's values and a run's loss settings, shared by the CPU and GPU gradient tests.
#pragma once

#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "train/batch_grad.h"

namespace ossrl::test {

inline std::filesystem::path grad_fixture(const std::string& model) {
  return std::filesystem::path(OSSRL_FIXTURE_DIR) / ("grad-" + model);
}

// An F32 tensor of a fixture or of a written gradient file, copied out of the mapping.
inline std::vector<float> values(const TensorView& t) {
  EXPECT_EQ(t.dtype, DType::F32) << t.name;
  std::vector<float> v(size_t(t.numel()));
  std::memcpy(v.data(), t.data, t.nbytes);
  return v;
}

// The loss of one run of grads.json ("settings": sft, or grpo with its TRL options).
inline LossSpec loss_spec(const nlohmann::json& settings) {
  LossSpec spec;
  if (settings.at("loss") == "sft") return spec;
  spec.kind = LossKind::Grpo;
  spec.grpo.loss_type = parse_loss_type(settings.at("loss_type").get<std::string>());
  spec.grpo.epsilon = settings.at("epsilon").get<double>();
  spec.grpo.epsilon_high = settings.at("epsilon_high").get<double>();
  spec.grpo.beta = settings.at("beta").get<double>();
  return spec;
}

}  // namespace ossrl::test

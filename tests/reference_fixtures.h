// Reading the oracle fixtures (tests/fixtures): which model folders hold transformers'
// references, and a reference tensor copied out of its file.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "io/safetensors.h"

namespace ossrl::test {

// The fixture model folders with transformers references, sorted. Other fixture folders
// (trl_grpo/, grad-*/) hold references of other kinds.
inline std::vector<std::string> fixture_models() {
  std::vector<std::string> names;
  if (!std::filesystem::is_directory(OSSRL_FIXTURE_DIR)) return names;
  for (const auto& entry : std::filesystem::directory_iterator(OSSRL_FIXTURE_DIR)) {
    if (std::filesystem::exists(entry.path() / "reference.safetensors") &&
        std::filesystem::exists(entry.path() / "config.json")) {
      names.push_back(entry.path().filename().string());
    }
  }
  std::sort(names.begin(), names.end());
  return names;
}

// A reference tensor copied out of the (unaligned) mapping.
template <typename T>
std::vector<T> read(const SafetensorsFile& f, const std::string& name) {
  const TensorView& t = f.tensor(name);
  EXPECT_EQ(t.nbytes % sizeof(T), 0u) << name;
  std::vector<T> v(t.nbytes / sizeof(T));
  std::memcpy(v.data(), t.data, t.nbytes);
  return v;
}

}  // namespace ossrl::test

#include "io/checkpoint.h"


#include <filesystem>
#include <fstream>

#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/json_file.h"

namespace ossrl {

namespace fs = std::filesystem;

namespace {

constexpr const char* kSingleFile = "model.safetensors";
constexpr const char* kIndexFile = "model.safetensors.index.json";

// Reads the index's weight_map: tensor name -> shard file name (relative to the folder).
std::map<std::string, std::string> read_weight_map(const fs::path& index_path) {
  const std::string path = index_path.string();
  const nlohmann::json j = read_json_file(path);
  OSSRL_CHECK(j.is_object() && j.contains("weight_map") && j["weight_map"].is_object(),
              "{}: missing object \"weight_map\"", path);
  std::map<std::string, std::string> weight_map;
  for (const auto& [name, shard] : j["weight_map"].items()) {
    OSSRL_CHECK(shard.is_string(), "{}: weight_map entry for {} is not a file name", path, name);
    const std::string file = shard.get<std::string>();
    // A shard is a file beside the index; anything else would read outside the folder.
    OSSRL_CHECK(!file.empty() && fs::path(file).filename() == file && file != "." && file != "..",
                "{}: weight_map puts {} in \"{}\", which is not a plain file name", path, name,
                file);
    weight_map[name] = file;
  }
  return weight_map;
}

}  // namespace

Checkpoint Checkpoint::open(const std::string& dir) {
  std::error_code ec;
  OSSRL_CHECK(fs::exists(dir, ec), "checkpoint folder {} does not exist", dir);
  OSSRL_CHECK(fs::is_directory(dir, ec), "checkpoint {} is not a folder", dir);
  Checkpoint ck;
  ck.dir_ = dir;
  OSSRL_CHECK(fs::is_regular_file(ck.config_path(), ec),
              "{} missing: {} is not a Hugging Face checkpoint folder", ck.config_path(), dir);

  const fs::path single = fs::path(dir) / kSingleFile;
  const fs::path index = fs::path(dir) / kIndexFile;
  std::map<std::string, std::string> weight_map;
  if (fs::exists(single, ec)) {
    ck.shards_.push_back(SafetensorsFile::open(single.string()));
  } else if (fs::exists(index, ec)) {
    weight_map = read_weight_map(index);
    std::map<std::string, const SafetensorsFile*> opened;  // shard file name -> file
    for (const auto& [name, file] : weight_map) {
      if (opened.count(file)) continue;
      const fs::path shard = fs::path(dir) / file;
      OSSRL_CHECK(fs::exists(shard, ec), "{}: weight_map puts {} in {}, which does not exist",
                  index.string(), name, shard.string());
      ck.shards_.push_back(SafetensorsFile::open(shard.string()));
      opened[file] = ck.shards_.back().get();
    }
    for (const auto& [name, file] : weight_map) {
      OSSRL_CHECK(opened.at(file)->contains(name),
                  "tensor {} missing from {} (where {} says it is)", name,
                  opened.at(file)->path(), index.string());
    }
  } else {
    fail("checkpoint {} has neither {} nor {}", dir, kSingleFile, kIndexFile);
  }

  for (const auto& shard : ck.shards_) {
    for (const auto& [name, view] : shard->tensors()) {
      auto [it, inserted] = ck.by_name_.emplace(name, &view);
      OSSRL_CHECK(inserted, "tensor {} appears in both {} and {}", name, it->second->file,
                  shard->path());
    }
  }
  return ck;
}

std::string Checkpoint::config_path() const { return (fs::path(dir_) / "config.json").string(); }

bool Checkpoint::contains(const std::string& name) const { return by_name_.count(name) != 0; }

const TensorView& Checkpoint::tensor(const std::string& name) const {
  auto it = by_name_.find(name);
  if (it == by_name_.end()) {
    std::vector<std::string> files;
    for (const auto& shard : shards_) files.push_back(fs::path(shard->path()).filename().string());
    fail("tensor {} missing from checkpoint {} ({})", name, dir_, fmt::join(files, ", "));
  }
  return *it->second;
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  out.reserve(by_name_.size());
  for (const auto& [name, view] : by_name_) out.push_back(name);
  return out;
}

}  // namespace ossrl

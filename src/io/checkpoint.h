// A Hugging Face checkpoint folder as published: config.json plus either one
// model.safetensors or model.safetensors.index.json naming the shards. Every shard is
// memory-mapped; tensor lookups throw an Error naming the tensor and the file it should
// have been in.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "io/safetensors.h"

namespace ossrl {

class Checkpoint {
 public:
  // Opens the folder: requires config.json, reads the index (if any), maps every shard
  // it names, and checks that each tensor the index promises is present in its shard and
  // that no tensor appears in two shards. Like transformers, a model.safetensors wins
  // over an index when both exist.
  static Checkpoint open(const std::string& dir);

  const std::string& dir() const { return dir_; }
  // dir/config.json (its existence is checked by open; parsing is model/config's job).
  std::string config_path() const;
  bool contains(const std::string& name) const;
  // Throws an Error naming the tensor and the checkpoint's files when it is absent.
  const TensorView& tensor(const std::string& name) const;
  // Every tensor name across all shards, sorted.
  std::vector<std::string> names() const;

 private:
  std::string dir_;
  std::vector<std::shared_ptr<SafetensorsFile>> shards_;  // views below point into these
  std::map<std::string, const TensorView*> by_name_;
};

}  // namespace ossrl

// Trainer checkpoints: everything a killed run needs to continue bit for bit, in
// output_dir/checkpoint-N/ (N = optimiser steps done):
//
//   adapter/                the LoRA as a PEFT folder (train/peft_adapter.h), loadable by PEFT
//   optimizer.safetensors   AdamW's moments and step count (AdamW::save)
//   trainer_state.json      {"global_step", "data_position", "config", "rollouts"}
//
// There is no RNG state to save: every random stream of the trainer is keyed by (seed,
// step, ...) (train/dataset.h's mix_seed), and the data order is a function of the draw
// count. What a GRPO run with num_iterations > 1 still has to reuse of its last generation
// batch travels in "rollouts".
//
// Atomic: written into checkpoint-N.tmp/, fsynced, then renamed to checkpoint-N/; a kill at
// any moment leaves either no checkpoint-N or a complete one.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <string>

#include "train/lora.h"
#include "train/optimizer.h"

namespace ossrl {

struct TrainerState {
  int64_t global_step = 0;     // optimiser steps done
  int64_t data_position = 0;   // examples drawn so far (train/dataset.h, DataOrder)
  nlohmann::json config;       // the resolved TrainConfig (TrainConfig::to_json), for the record
  nlohmann::json rollouts;     // the generation batch still to be reused, or null
};

// output_dir/checkpoint-<step>.
std::string checkpoint_dir(const std::string& output_dir, int64_t step);
// The complete checkpoint with the highest step in output_dir, if any (.tmp folders ignored).
std::optional<std::string> latest_checkpoint(const std::string& output_dir);

void save_checkpoint(const std::string& dir, const TrainerState& state, const Lora& lora, const AdamW& optimizer,
                     const std::string& base_model);
// Restores lora's parameters and optimizer's state from a checkpoint folder (made for the
// same model and LoRA config) and returns the trainer state. Errors name the file.
TrainerState load_checkpoint(const std::string& dir, Lora& lora, AdamW& optimizer);

// Writes `text` to path via a temporary file, fsync and rename.
void write_file_atomic(const std::string& path, const std::string& text);

}  // namespace ossrl

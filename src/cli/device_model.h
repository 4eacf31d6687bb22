// A checkpoint on the device the user picked (--device cpu|cuda), behind the two calls the
// commands make of it: generate (engine/generate.h's contract) and log_probs
// (CpuModel::log_probs's). On cuda it is CudaModel + CudaEngine, sized by --kv-cache-gb and
// --max-batch; on cpu the reference CpuModel.
#pragma once

#include <CLI/CLI.hpp>

#include <memory>
#include <span>
#include <string>
#include <vector>

#include "engine/generate.h"
#include "model/config.h"

namespace ossrl::cli {

struct DeviceArgs {
  std::string device;        // "cpu" or "cuda"; empty: cuda when a GPU is present, else cpu
  double kv_cache_gb = 0.0;  // 0: 90% of the GPU memory left after weights and workspace
  int max_batch = 256;
  bool cuda_graphs = true;
};

// "cpu" or "cuda" for a --device value: empty picks cuda when a GPU is present; cuda on a
// build or machine without one is an Error.
std::string resolve_device(const std::string& asked);

// --device, --kv-cache-gb, --max-batch (described by max_batch_help), --no-cuda-graphs.
void add_device_options(CLI::App* command, DeviceArgs& args, const std::string& max_batch_help);

class DeviceModel {
 public:
  // Loads the checkpoint folder on the device `args` name (an Error when cuda is asked for
  // but this build has no CUDA or the machine no GPU). Prints to stderr what it loaded
  // where: the GPU and the engine's memory plan on cuda.
  static std::unique_ptr<DeviceModel> load(const std::string& dir, const DeviceArgs& args);
  virtual ~DeviceModel() = default;

  virtual const GptOssConfig& config() const = 0;
  virtual std::vector<Generation> generate(const std::vector<std::vector<int32_t>>& prompts,
                                           const GenerateOptions& options) = 0;
  virtual std::vector<float> log_probs(std::span<const int32_t> tokens, std::span<const int32_t> offsets) = 0;
};

}  // namespace ossrl::cli

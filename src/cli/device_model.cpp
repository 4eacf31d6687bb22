#include "cli/device_model.h"

#include <fmt/format.h>

#include "core/error.h"
#include "model/cpu_model.h"

#if OSSRL_HAVE_CUDA
#include "cuda/device.h"
#include "engine/cuda_engine.h"
#endif

namespace ossrl::cli {

namespace {

class CpuDeviceModel final : public DeviceModel {
 public:
  explicit CpuDeviceModel(const std::string& dir) : model_(dir) {}
  const GptOssConfig& config() const override { return model_.config(); }
  std::vector<Generation> generate(const std::vector<std::vector<int32_t>>& prompts,
                                   const GenerateOptions& options) override {
    return ossrl::generate(model_, prompts, options);
  }
  std::vector<float> log_probs(std::span<const int32_t> tokens, std::span<const int32_t> offsets) override {
    return model_.log_probs(tokens, offsets);
  }

 private:
  CpuModel model_;
};

#if OSSRL_HAVE_CUDA
class CudaDeviceModel final : public DeviceModel {
 public:
  CudaDeviceModel(const std::string& dir, const EngineOptions& options)
      : model_(CudaModel::load(dir)), engine_(*model_, options) {}
  const GptOssConfig& config() const override { return model_->config(); }
  std::vector<Generation> generate(const std::vector<std::vector<int32_t>>& prompts,
                                   const GenerateOptions& options) override {
    return engine_.generate(prompts, options);
  }
  std::vector<float> log_probs(std::span<const int32_t> tokens, std::span<const int32_t> offsets) override {
    return engine_.log_probs(tokens, offsets);
  }
  MemoryPlan memory_plan() const { return engine_.memory_plan(); }

 private:
  std::unique_ptr<CudaModel> model_;
  CudaEngine engine_;
};
#endif

bool gpu_present() {
#if OSSRL_HAVE_CUDA
  return cuda::device_count() > 0;
#else
  return false;
#endif
}

}  // namespace

void add_device_options(CLI::App* command, DeviceArgs& args, const std::string& max_batch_help) {
  command->add_option("--device", args.device, "cpu or cuda (default: cuda when a GPU is present)")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  command->add_option("--kv-cache-gb", args.kv_cache_gb,
                      "cuda: KV cache size in GiB (0: 90% of the GPU memory left after weights and workspace)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  command->add_option("--max-batch", args.max_batch, max_batch_help)
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  command->add_flag("!--no-cuda-graphs", args.cuda_graphs, "cuda: run decode steps eagerly, not as CUDA graphs");
}

std::string resolve_device(const std::string& asked) {
  const std::string device = asked.empty() ? (gpu_present() ? "cuda" : "cpu") : asked;
  OSSRL_CHECK(device == "cpu" || device == "cuda", "--device {}: expected cpu or cuda", device);
#if OSSRL_HAVE_CUDA
  OSSRL_CHECK(device == "cpu" || gpu_present(), "--device cuda: no GPU on this machine");
#else
  OSSRL_CHECK(device == "cpu", "--device cuda: this ossrl was built without CUDA");
#endif
  return device;
}

std::unique_ptr<DeviceModel> DeviceModel::load(const std::string& dir, const DeviceArgs& args) {
  const std::string device = resolve_device(args.device);
  if (device == "cpu") return std::make_unique<CpuDeviceModel>(dir);
#if OSSRL_HAVE_CUDA
  EngineOptions options;
  options.max_batch = args.max_batch;
  options.kv_cache_gb = args.kv_cache_gb;
  options.cuda_graphs = args.cuda_graphs;
  std::unique_ptr<CudaDeviceModel> model;
  try {
    model = std::make_unique<CudaDeviceModel>(dir, options);
  } catch (const Error& e) {
    if (!args.device.empty()) throw;
    fail("{} (the GPU was chosen because one is present; --device cpu runs the CPU reference)", e.what());
  }
  fmt::print(stderr, "{}: {}\n", cuda::device_summary(0), describe(model->memory_plan()));
  return model;
#else
  fail("--device cuda: this ossrl was built without CUDA");  // unreachable: resolve_device refused
#endif
}

}  // namespace ossrl::cli

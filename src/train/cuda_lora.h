// The LoRA of train/lora.h on the GPU, for the CUDA trainer and the rollout engine: every
// trainable value in one flat fp32 buffer (grads, AdamW moments and bf16 copies beside it, in
// the same order), laid out as the kernels read it — per layer q, k, v, o (A then B), sinks,
// then gate_up_proj's A of every expert [E, r, hidden], its B [E, 2*intermediate, r], and
// down_proj's likewise — so the optimizer step is one kernel over one buffer.
//
// The host Lora (names, PEFT files, the CPU trainer) and this one exchange values with
// upload / download; each host Parameter maps to a slice of the flat buffer (per-expert host
// tensors to their expert's slice of the stack).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "cuda/buffer.h"
#include "cuda/lora.h"
#include "engine/cuda_weights.h"
#include "train/lora.h"

namespace ossrl {

class DeviceLora {
 public:
  // The adapters config asks for on `base`'s shape, initialised on the device as PEFT does
  // (lora_A uniform in ±1/sqrt(in) from config.seed — a different stream from the host
  // Lora's —, lora_B zero, trained sinks from the checkpoint's). Throws an Error for what the
  // GPU path does not train: lora_dropout > 0 and train_router.
  DeviceLora(const DeviceWeights& base, const LoraConfig& config);
  DeviceLora(const DeviceLora&) = delete;
  DeviceLora& operator=(const DeviceLora&) = delete;

  const LoraConfig& config() const { return config_; }
  size_t numel() const { return numel_; }
  // Device memory held: values, grads, two AdamW moments, bf16 copies.
  size_t bytes() const;

  // Values from / to a host Lora built for the same model and config (shapes checked).
  void upload(const Lora& host);
  void download(Lora& host) const;
  void download_grads(Lora& host) const;

  // The flat buffers [numel] (AdamW's view).
  float* values() { return values_.data(); }
  float* grads() { return grads_.data(); }
  float* exp_avg() { return exp_avg_.data(); }
  float* exp_avg_sq() { return exp_avg_sq_.data(); }
  void zero_grad(cudaStream_t stream);
  // Rewrites the bf16 copies the GEMMs read from the fp32 values (after every update).
  void refresh_bf16(cudaStream_t stream);

  // Per-layer device views (cuda/lora.h), fixed addresses for the object's lifetime.
  std::span<const cuda::DeviceLayerAdapters> layers() const { return layers_; }

 private:
  // Where a host parameter lives in the flat buffer.
  size_t offset_of(const Parameter& p) const;

  LoraConfig config_;
  GptOssConfig model_;
  size_t numel_ = 0;
  cuda::DeviceBuffer<float> values_, grads_, exp_avg_, exp_avg_sq_;
  cuda::DeviceBuffer<__nv_bfloat16> values_bf16_;
  std::vector<cuda::DeviceLayerAdapters> layers_;
  std::vector<size_t> layer_offset_;  // [layers] start of each layer's values
};

}  // namespace ossrl

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
  // The optimizer on the device (DeviceAdamW): the adapters config asks for on `base`'s shape
  // with fp32 values, grads, AdamW moments and bf16 copies on the GPU (18 bytes a value),
  // initialised on the device as PEFT does (lora_A uniform in ±1/sqrt(in) from config.seed —
  // a different stream from the host Lora's —, lora_B zero, trained sinks from the
  // checkpoint's). Throws an Error for what the GPU path does not train: lora_dropout > 0 and
  // train_router.
  DeviceLora(const DeviceWeights& base, const LoraConfig& config);
  // The optimizer on the host (train/optimizer.h's AdamW over `host`, which also checkpoints
  // it): the GPU holds the bf16 copies of host's values and one layer's fp32 grads, which
  // layer_done() adds into host's grads as the backward finishes each layer — 2 bytes a value,
  // what lets r=16 adapters on every expert of gpt-oss-20b (185 M values) train in 15 GB.
  // host must outlive this.
  DeviceLora(const DeviceWeights& base, Lora& host);
  DeviceLora(const DeviceLora&) = delete;
  DeviceLora& operator=(const DeviceLora&) = delete;

  const LoraConfig& config() const { return config_; }
  // Values in the flat buffers, alignment padding (zeros, never trained) included.
  size_t numel() const { return numel_; }
  // Device memory held.
  size_t bytes() const;
  bool optimizer_on_host() const { return host_ != nullptr; }

  // Values from / to a host Lora built for the same model and config (shapes checked). With
  // the optimizer on the host, upload(host) after each update refreshes the bf16 copies, and
  // download / download_grads are errors (the host holds both).
  void upload(const Lora& host);
  void download(Lora& host) const;
  void download_grads(Lora& host) const;

  // The backward has finished layer l's grads: with the optimizer on the host they are added
  // into the host Lora's grads and the device block is zeroed for the next layer; else nothing.
  void layer_done(int l, cudaStream_t stream);

  // The flat buffers [numel] (AdamW's view); null with the optimizer on the host.
  float* values() { return values_.data(); }
  float* grads() { return grads_.data(); }
  float* exp_avg() { return exp_avg_.data(); }
  float* exp_avg_sq() { return exp_avg_sq_.data(); }
  // Zeroes the grads, wherever they accumulate (the host Lora's too when it holds them).
  void zero_grad(cudaStream_t stream);
  // Rewrites the bf16 copies the GEMMs read from the fp32 values (after every update).
  void refresh_bf16(cudaStream_t stream);

  // Per-layer device views (cuda/lora.h), fixed addresses for the object's lifetime.
  std::span<const cuda::DeviceLayerAdapters> layers() const { return layers_; }

 private:
  // Where a host parameter lives in the flat buffer.
  size_t offset_of(const Parameter& p) const;

  // Lays out and initialises everything; host null: the optimizer on the device.
  DeviceLora(const DeviceWeights& base, const LoraConfig& config, Lora* host);

  LoraConfig config_;
  GptOssConfig model_;
  Lora* host_ = nullptr;
  size_t numel_ = 0;
  size_t values_count_ = 0;           // trainable values: numel_ less the padding
  std::vector<size_t> layer_start_;   // [layers + 1] each layer's first value in the flat layout
  std::vector<size_t> sinks_offset_;  // [layers] flat offset of each layer's sinks (if trained)
  // Optimizer on the device: [numel] each. On the host: values and moments empty, grads one
  // layer's block (every layer's grad views alias it), and the trained sinks in fp32
  // [layers, heads] (the attention kernels read fp32 sinks).
  cuda::DeviceBuffer<float> values_, grads_, exp_avg_, exp_avg_sq_;
  cuda::DeviceBuffer<float> sink_values_;
  // layer_done's: one layer's grads on the host, and where each piece of them goes: a host
  // grad and the run of staged values added into it, in pieces small enough to spread over
  // threads.
  struct GradPiece {
    float* host;
    size_t staged;  // offset in staged_grads_
    size_t count;
  };
  cuda::PinnedBuffer<float> staged_grads_;
  std::vector<std::vector<GradPiece>> grad_pieces_;  // [layers], built on first use
  cuda::DeviceBuffer<__nv_bfloat16> values_bf16_;
  std::vector<cuda::DeviceLayerAdapters> layers_;
};

}  // namespace ossrl

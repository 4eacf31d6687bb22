#include "train/cuda_lora.h"

#include <algorithm>
#include <cmath>

#include "core/dtype.h"
#include "core/error.h"
#include "cuda/adamw.h"
#include "cuda/random_init.h"

namespace ossrl {

namespace {

cuda::DeviceAdapter* adapter_of(cuda::DeviceLayerAdapters& layer, LoraTarget target) {
  switch (target) {
    case LoraTarget::QProj: return &layer.q_proj;
    case LoraTarget::KProj: return &layer.k_proj;
    case LoraTarget::VProj: return &layer.v_proj;
    case LoraTarget::OProj: return &layer.o_proj;
    case LoraTarget::GateUpProj: return &layer.gate_up_proj;
    case LoraTarget::DownProj: return &layer.down_proj;
  }
  return nullptr;
}

constexpr size_t kNoSinks = ~size_t(0);

}  // namespace

DeviceLora::DeviceLora(const DeviceWeights& base, const LoraConfig& config) : DeviceLora(base, config, nullptr) {}

DeviceLora::DeviceLora(const DeviceWeights& base, Lora& host) : DeviceLora(base, host.config(), &host) {
  upload(host);
}

DeviceLora::DeviceLora(const DeviceWeights& base, const LoraConfig& config, Lora* host)
    : config_(config), model_(base.config), host_(host) {
  const std::vector<LoraTarget> targets = config_.targets();
  OSSRL_CHECK(config_.lora_dropout == 0.0,
              "LoRA on the GPU: lora_dropout must be 0 (got {}); dropout is only implemented by the CPU trainer",
              config_.lora_dropout);
  OSSRL_CHECK(!config_.train_router, "LoRA on the GPU: train_router is only implemented by the CPU trainer");
  const GptOssConfig& c = model_;
  const int r = config_.r, hidden = c.hidden_size, experts = c.num_local_experts, heads = c.num_attention_heads;
  const int q_dim = heads * c.head_dim, kv_dim = c.num_key_value_heads * c.head_dim;
  const int inter = c.intermediate_size;
  struct Shape {
    LoraTarget target;
    int experts, in, out;
  };
  // Per layer, in this order; the sinks go between o_proj and the experts, as in the host Lora.
  const Shape shapes[] = {{LoraTarget::QProj, 1, hidden, q_dim},        {LoraTarget::KProj, 1, hidden, kv_dim},
                          {LoraTarget::VProj, 1, hidden, kv_dim},       {LoraTarget::OProj, 1, q_dim, hidden},
                          {LoraTarget::GateUpProj, experts, hidden, 2 * inter},
                          {LoraTarget::DownProj, experts, inter, hidden}};
  auto targeted = [&](LoraTarget t) { return std::find(targets.begin(), targets.end(), t) != targets.end(); };

  // The layout: where each adapter (A then B) and each layer's sinks start.
  struct Slot {
    const Shape* shape;
    size_t offset;
  };
  std::vector<std::vector<Slot>> slots(size_t(c.num_hidden_layers));
  // Every block starts 16-byte aligned in the bf16 copies (the expert kernels load A in
  // 16-byte vectors): offsets are rounded up to multiples of 8 values.
  auto aligned = [](size_t offset) { return (offset + 7) / 8 * 8; };
  size_t at = 0;
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    layer_start_.push_back(at);
    sinks_offset_.push_back(kNoSinks);
    for (const Shape& s : shapes) {
      if (s.target == LoraTarget::GateUpProj && config_.train_sinks) {
        sinks_offset_.back() = at;
        values_count_ += size_t(heads);
        at = aligned(at + size_t(heads));
      }
      if (!targeted(s.target)) continue;
      slots[size_t(l)].push_back(Slot{&s, at});
      values_count_ += size_t(s.experts) * size_t(r) * (size_t(s.in) + size_t(s.out));
      at = aligned(at + size_t(s.experts) * size_t(r) * (size_t(s.in) + size_t(s.out)));
    }
  }
  numel_ = at;
  layer_start_.push_back(at);
  // Every layer has the same shape, hence the same block size.
  const size_t layer_numel = layer_start_[1] - layer_start_[0];
  values_bf16_ = cuda::DeviceBuffer<__nv_bfloat16>(numel_, "LoRA bf16 copies");
  if (host_ == nullptr) {
    grads_ = cuda::DeviceBuffer<float>(numel_, "LoRA grads");
    values_ = cuda::DeviceBuffer<float>(numel_, "LoRA values");
    exp_avg_ = cuda::DeviceBuffer<float>(numel_, "AdamW exp_avg");
    exp_avg_sq_ = cuda::DeviceBuffer<float>(numel_, "AdamW exp_avg_sq");
    for (float* buffer : {grads_.data(), values_.data(), exp_avg_.data(), exp_avg_sq_.data()}) {
      OSSRL_CUDA_CHECK(cudaMemset(buffer, 0, numel_ * sizeof(float)));
    }
  } else {
    grads_ = cuda::DeviceBuffer<float>(layer_numel, "LoRA grads of one layer");
    OSSRL_CUDA_CHECK(cudaMemset(grads_.data(), 0, grads_.bytes()));
    staged_grads_ = cuda::PinnedBuffer<float>(layer_numel, "staged LoRA grads");
    if (config_.train_sinks) {
      sink_values_ = cuda::DeviceBuffer<float>(size_t(c.num_hidden_layers) * size_t(heads), "trained sinks");
    }
  }
  // Initial values are made in fp32 on the device (with the optimizer on the host, upload
  // replaces them with the host's).
  float* init = host_ == nullptr ? values_.data() : nullptr;
  // Layer l's grad block: its place in the flat grads, or the shared one-layer block.
  auto grad_at = [&](int l, size_t offset) {
    return host_ == nullptr ? grads_.data() + offset : grads_.data() + (offset - layer_start_[size_t(l)]);
  };

  const float scale = config_.scaling();
  uint64_t stream_id = 0;
  layers_.assign(size_t(c.num_hidden_layers), cuda::DeviceLayerAdapters{});
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    cuda::DeviceLayerAdapters& layer = layers_[size_t(l)];
    if (sinks_offset_[size_t(l)] != kNoSinks) {
      const size_t o = sinks_offset_[size_t(l)];
      layer.sinks = host_ == nullptr ? values_.data() + o : sink_values_.data() + size_t(l) * size_t(heads);
      layer.grad_sinks = grad_at(l, o);
      OSSRL_CUDA_CHECK(cudaMemcpy(layer.sinks, base.layers[size_t(l)].sinks.data(), size_t(heads) * sizeof(float),
                                  cudaMemcpyDeviceToDevice));
    }
    for (const Slot& slot : slots[size_t(l)]) {
      const Shape& s = *slot.shape;
      const size_t o = slot.offset;
      const size_t a_count = size_t(s.experts) * size_t(r) * size_t(s.in);
      const bool masters = host_ == nullptr;
      cuda::DeviceAdapter& ad = *adapter_of(layer, s.target);
      ad = cuda::DeviceAdapter{.experts = s.experts, .r = r, .in = s.in, .out = s.out, .scale = scale,
                               .a = masters ? values_.data() + o : nullptr,
                               .b = masters ? values_.data() + o + a_count : nullptr,
                               .grad_a = grad_at(l, o), .grad_b = grad_at(l, o + a_count),
                               .a16 = values_bf16_.data() + o, .b16 = values_bf16_.data() + o + a_count};
      if (init == nullptr) continue;
      // PEFT's kaiming_uniform_(a=sqrt(5)) on [r, in]: uniform in ±1/sqrt(in); the fill's
      // unit-variance uniform spans ±sqrt(3)·stddev. lora_B starts at zero.
      const float bound = float(1.0 / std::sqrt(double(s.in)));
      cuda::random_uniform_f32(init + o, a_count, 0.0f, bound / std::sqrt(3.0f),
                               config_.seed + 0x9e3779b97f4a7c15ull * ++stream_id, nullptr);
    }
  }
  if (init != nullptr) refresh_bf16(nullptr);
  OSSRL_CUDA_CHECK(cudaStreamSynchronize(nullptr));
}

size_t DeviceLora::bytes() const {
  return values_.bytes() + grads_.bytes() + exp_avg_.bytes() + exp_avg_sq_.bytes() + values_bf16_.bytes() +
         sink_values_.bytes();
}

size_t DeviceLora::offset_of(const Parameter& p) const {
  OSSRL_CHECK(p.layer >= 0 && size_t(p.layer) < layers_.size(), "LoRA on the GPU: parameter {} of layer {}",
              p.name, p.layer);
  const cuda::DeviceLayerAdapters& layer = layers_[size_t(p.layer)];
  if (p.kind == Parameter::Kind::Sinks) {
    OSSRL_CHECK(sinks_offset_[size_t(p.layer)] != kNoSinks, "LoRA on the GPU: {} is not trained here", p.name);
    return sinks_offset_[size_t(p.layer)];
  }
  OSSRL_CHECK(p.kind == Parameter::Kind::LoraA || p.kind == Parameter::Kind::LoraB,
              "LoRA on the GPU: {} (a trained router) is not supported", p.name);
  const cuda::DeviceAdapter& ad = *adapter_of(const_cast<cuda::DeviceLayerAdapters&>(layer), p.target);
  OSSRL_CHECK(ad.active(), "LoRA on the GPU: {} has no adapter here", p.name);
  const size_t expert = p.expert < 0 ? 0 : size_t(p.expert);
  const bool is_a = p.kind == Parameter::Kind::LoraA;
  const size_t per_expert = size_t(ad.r) * size_t(is_a ? ad.in : ad.out);
  OSSRL_CHECK(size_t(p.numel()) == per_expert, "LoRA on the GPU: {} has {} values, expected {}", p.name,
              p.numel(), per_expert);
  return size_t((is_a ? ad.a16 : ad.b16) - values_bf16_.data()) + expert * per_expert;
}

void DeviceLora::upload(const Lora& host) {
  size_t total = 0;
  std::vector<uint16_t> staged;
  for (const Parameter& p : host.parameters()) {
    const size_t o = offset_of(p);
    total += p.data.size();
    if (host_ == nullptr) {
      OSSRL_CUDA_CHECK(cudaMemcpy(values_.data() + o, p.data.data(), p.data.size() * sizeof(float),
                                  cudaMemcpyHostToDevice));
      continue;
    }
    if (p.kind == Parameter::Kind::Sinks) {
      OSSRL_CUDA_CHECK(cudaMemcpy(layers_[size_t(p.layer)].sinks, p.data.data(), p.data.size() * sizeof(float),
                                  cudaMemcpyHostToDevice));
    }
    staged.resize(p.data.size());
    for (size_t i = 0; i < staged.size(); ++i) staged[i] = f32_to_bf16(p.data[i]);
    OSSRL_CUDA_CHECK(cudaMemcpy(values_bf16_.data() + o, staged.data(), staged.size() * sizeof(uint16_t),
                                cudaMemcpyHostToDevice));
  }
  OSSRL_CHECK(total == values_count_, "LoRA on the GPU: the host adapters hold {} values, the device {}", total,
              values_count_);
  if (host_ == nullptr) refresh_bf16(nullptr);
  OSSRL_CUDA_CHECK(cudaStreamSynchronize(nullptr));
}

void DeviceLora::download(Lora& host) const {
  OSSRL_CHECK(host_ == nullptr, "LoRA on the GPU: the fp32 values live on the host (the optimizer runs there)");
  for (Parameter& p : host.parameters()) {
    OSSRL_CUDA_CHECK(cudaMemcpy(p.data.data(), values_.data() + offset_of(p), p.data.size() * sizeof(float),
                                cudaMemcpyDeviceToHost));
  }
}

void DeviceLora::download_grads(Lora& host) const {
  OSSRL_CHECK(host_ == nullptr, "LoRA on the GPU: the grads are added into the host Lora layer by layer");
  for (Parameter& p : host.parameters()) {
    OSSRL_CUDA_CHECK(cudaMemcpy(p.grad.data(), grads_.data() + offset_of(p), p.grad.size() * sizeof(float),
                                cudaMemcpyDeviceToHost));
  }
}

void DeviceLora::layer_done(int l, cudaStream_t stream) {
  if (host_ == nullptr) return;
  OSSRL_CUDA_CHECK(cudaMemcpyAsync(staged_grads_.data(), grads_.data(), grads_.bytes(), cudaMemcpyDeviceToHost, stream));
  OSSRL_CUDA_CHECK(cudaMemsetAsync(grads_.data(), 0, grads_.bytes(), stream));
  if (grad_pieces_.empty()) {
    // The host Lora's tensors are fixed for its lifetime: map them once.
    constexpr size_t kPiece = size_t(1) << 16;
    grad_pieces_.resize(layers_.size());
    for (Parameter& p : host_->parameters()) {
      const size_t staged = offset_of(p) - layer_start_[size_t(p.layer)];
      for (size_t at = 0; at < p.grad.size(); at += kPiece) {
        grad_pieces_[size_t(p.layer)].push_back(
            GradPiece{p.grad.data() + at, staged + at, std::min(kPiece, p.grad.size() - at)});
      }
    }
  }
  OSSRL_CUDA_CHECK(cudaStreamSynchronize(stream));
  const std::vector<GradPiece>& pieces = grad_pieces_[size_t(l)];
  const float* staged = staged_grads_.data();
#pragma omp parallel for schedule(dynamic, 4)
  for (size_t i = 0; i < pieces.size(); ++i) {
    const GradPiece& piece = pieces[i];
    for (size_t j = 0; j < piece.count; ++j) piece.host[j] += staged[piece.staged + j];
  }
}

void DeviceLora::zero_grad(cudaStream_t stream) {
  OSSRL_CUDA_CHECK(cudaMemsetAsync(grads_.data(), 0, grads_.bytes(), stream));
  if (host_ != nullptr) host_->zero_grad();
}

void DeviceLora::refresh_bf16(cudaStream_t stream) {
  OSSRL_CHECK(host_ == nullptr, "LoRA on the GPU: refresh_bf16 needs the fp32 values on the device");
  cuda::to_bf16(values_bf16_.data(), values_.data(), numel_, stream);
}

}  // namespace ossrl

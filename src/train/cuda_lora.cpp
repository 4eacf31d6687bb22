#include "train/cuda_lora.h"

#include <algorithm>
#include <cmath>

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

}  // namespace

DeviceLora::DeviceLora(const DeviceWeights& base, const LoraConfig& config) : config_(config), model_(base.config) {
  const std::vector<LoraTarget> targets = config_.targets();
  OSSRL_CHECK(config_.lora_dropout == 0.0,
              "LoRA on the GPU: lora_dropout must be 0 (got {}); dropout is only implemented by the CPU trainer",
              config_.lora_dropout);
  OSSRL_CHECK(!config_.train_router, "LoRA on the GPU: train_router is only implemented by the CPU trainer");
  const GptOssConfig& c = model_;
  const int r = config_.r, hidden = c.hidden_size, experts = c.num_local_experts;
  const int q_dim = c.num_attention_heads * c.head_dim, kv_dim = c.num_key_value_heads * c.head_dim;
  const int inter = c.intermediate_size;
  struct Shape {
    LoraTarget target;
    int experts, in, out;
  };
  const Shape shapes[] = {{LoraTarget::QProj, 1, hidden, q_dim},        {LoraTarget::KProj, 1, hidden, kv_dim},
                          {LoraTarget::VProj, 1, hidden, kv_dim},       {LoraTarget::OProj, 1, q_dim, hidden},
                          {LoraTarget::GateUpProj, experts, hidden, 2 * inter},
                          {LoraTarget::DownProj, experts, inter, hidden}};
  auto targeted = [&](LoraTarget t) { return std::find(targets.begin(), targets.end(), t) != targets.end(); };

  // First pass: offsets (as pointers from a null base); second: the real addresses.
  layers_.assign(size_t(c.num_hidden_layers), cuda::DeviceLayerAdapters{});
  std::vector<std::vector<size_t>> offsets(size_t(c.num_hidden_layers));
  size_t at = 0;
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    layer_offset_.push_back(at);
    for (const Shape& s : shapes) {
      if (s.target == LoraTarget::GateUpProj && config_.train_sinks) {
        offsets[size_t(l)].push_back(at);  // sinks come after o_proj, before the experts
        at += size_t(c.num_attention_heads);
      }
      if (!targeted(s.target)) continue;
      offsets[size_t(l)].push_back(at);
      at += size_t(s.experts) * size_t(r) * size_t(s.in) + size_t(s.experts) * size_t(s.out) * size_t(r);
    }
  }
  numel_ = at;
  values_ = cuda::DeviceBuffer<float>(numel_, "LoRA values");
  grads_ = cuda::DeviceBuffer<float>(numel_, "LoRA grads");
  exp_avg_ = cuda::DeviceBuffer<float>(numel_, "AdamW exp_avg");
  exp_avg_sq_ = cuda::DeviceBuffer<float>(numel_, "AdamW exp_avg_sq");
  values_bf16_ = cuda::DeviceBuffer<__nv_bfloat16>(numel_, "LoRA bf16 copies");
  for (float* buffer : {values_.data(), grads_.data(), exp_avg_.data(), exp_avg_sq_.data()}) {
    OSSRL_CUDA_CHECK(cudaMemset(buffer, 0, numel_ * sizeof(float)));
  }

  const float scale = config_.scaling();
  uint64_t stream_id = 0;
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    cuda::DeviceLayerAdapters& layer = layers_[size_t(l)];
    size_t next = 0;
    for (const Shape& s : shapes) {
      if (s.target == LoraTarget::GateUpProj && config_.train_sinks) {
        const size_t o = offsets[size_t(l)][next++];
        layer.sinks = values_.data() + o;
        layer.grad_sinks = grads_.data() + o;
        OSSRL_CUDA_CHECK(cudaMemcpy(layer.sinks, base.layers[size_t(l)].sinks.data(),
                                    size_t(c.num_attention_heads) * sizeof(float), cudaMemcpyDeviceToDevice));
      }
      if (!targeted(s.target)) continue;
      const size_t o = offsets[size_t(l)][next++];
      const size_t a_count = size_t(s.experts) * size_t(r) * size_t(s.in);
      cuda::DeviceAdapter& ad = *adapter_of(layer, s.target);
      ad = cuda::DeviceAdapter{.experts = s.experts, .r = r, .in = s.in, .out = s.out, .scale = scale,
                               .a = values_.data() + o, .b = values_.data() + o + a_count,
                               .grad_a = grads_.data() + o, .grad_b = grads_.data() + o + a_count,
                               .a16 = values_bf16_.data() + o, .b16 = values_bf16_.data() + o + a_count};
      // PEFT's kaiming_uniform_(a=sqrt(5)) on [r, in]: uniform in ±1/sqrt(in); the fill's
      // unit-variance uniform spans ±sqrt(3)·stddev.
      const float bound = float(1.0 / std::sqrt(double(s.in)));
      cuda::random_uniform_f32(ad.a, a_count, 0.0f, bound / std::sqrt(3.0f),
                               config_.seed + 0x9e3779b97f4a7c15ull * ++stream_id, nullptr);
    }
  }
  refresh_bf16(nullptr);
  OSSRL_CUDA_CHECK(cudaStreamSynchronize(nullptr));
}

size_t DeviceLora::bytes() const { return values_.bytes() * 4 + values_bf16_.bytes(); }

size_t DeviceLora::offset_of(const Parameter& p) const {
  OSSRL_CHECK(p.layer >= 0 && size_t(p.layer) < layers_.size(), "LoRA on the GPU: parameter {} of layer {}",
              p.name, p.layer);
  const cuda::DeviceLayerAdapters& layer = layers_[size_t(p.layer)];
  const float* base = values_.data();
  if (p.kind == Parameter::Kind::Sinks) {
    OSSRL_CHECK(layer.sinks != nullptr, "LoRA on the GPU: {} is not trained here", p.name);
    return size_t(layer.sinks - base);
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
  return size_t((is_a ? ad.a : ad.b) - base) + expert * per_expert;
}

void DeviceLora::upload(const Lora& host) {
  size_t total = 0;
  for (const Parameter& p : host.parameters()) {
    OSSRL_CUDA_CHECK(cudaMemcpy(values_.data() + offset_of(p), p.data.data(), p.data.size() * sizeof(float),
                                cudaMemcpyHostToDevice));
    total += p.data.size();
  }
  OSSRL_CHECK(total == numel_, "LoRA on the GPU: the host adapters hold {} values, the device {}", total, numel_);
  refresh_bf16(nullptr);
  OSSRL_CUDA_CHECK(cudaStreamSynchronize(nullptr));
}

void DeviceLora::download(Lora& host) const {
  for (Parameter& p : host.parameters()) {
    OSSRL_CUDA_CHECK(cudaMemcpy(p.data.data(), values_.data() + offset_of(p), p.data.size() * sizeof(float),
                                cudaMemcpyDeviceToHost));
  }
}

void DeviceLora::download_grads(Lora& host) const {
  for (Parameter& p : host.parameters()) {
    OSSRL_CUDA_CHECK(cudaMemcpy(p.grad.data(), grads_.data() + offset_of(p), p.grad.size() * sizeof(float),
                                cudaMemcpyDeviceToHost));
  }
}

void DeviceLora::zero_grad(cudaStream_t stream) {
  OSSRL_CUDA_CHECK(cudaMemsetAsync(grads_.data(), 0, grads_.bytes(), stream));
}

void DeviceLora::refresh_bf16(cudaStream_t stream) {
  cuda::to_bf16(values_bf16_.data(), values_.data(), numel_, stream);
}

}  // namespace ossrl

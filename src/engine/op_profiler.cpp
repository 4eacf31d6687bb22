#include "engine/op_profiler.h"

#include <chrono>
#include <numeric>
#include <thread>

#include "cuda/check.h"

namespace ossrl {

namespace {

// How long a step is held at most. A hold that never ends would deadlock a host thread
// blocked in a launch (the stream's queue full), so past this the step runs ungated and is
// counted as such.
constexpr std::chrono::seconds kHoldLimit{1};

}  // namespace

const char* op_name(Op op) {
  static constexpr std::array<const char*, kOpCount> names = {
      "embedding", "attn_norm", "qkv_proj", "rope_kv",     "attention",  "o_proj",     "moe_norm", "router",
      "topk_group", "moe_gate_up", "moe_down", "moe_combine", "final_norm", "lm_head", "sampling"};
  return names[size_t(op)];
}

double OpTimes::step_ms() const { return std::accumulate(ms.begin(), ms.end(), 0.0); }

OpProfiler::OpProfiler(int decode_batch) : decode_batch_(decode_batch) {}

OpProfiler::~OpProfiler() {
  // No throwing here: let a held step go and wait for it before its events are destroyed.
  gate_.release.store(true);
  if (pending_) cudaEventSynchronize(events_[marks_.size()]);
  for (cudaEvent_t e : events_) cudaEventDestroy(e);
}

void CUDART_CB OpProfiler::hold(void* gate_ptr) {
  Gate& gate = *static_cast<Gate*>(gate_ptr);
  const auto deadline = std::chrono::steady_clock::now() + kHoldLimit;
  while (!gate.release.load()) {
    if (std::chrono::steady_clock::now() > deadline) {
      gate.timed_out.store(true);
      return;
    }
    std::this_thread::yield();
  }
}

bool OpProfiler::begin(cudaStream_t stream, int n_tokens, int n_sequences) {
  if (decode_batch_ > 0 && (n_tokens != decode_batch_ || n_sequences != decode_batch_)) return false;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  OSSRL_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) return false;
  collect();  // the previous step's hold has run, so the gate can be re-armed
  stream_ = stream;
  marks_.clear();
  gate_.release.store(false);
  gate_.timed_out.store(false);
  OSSRL_CUDA_CHECK(cudaLaunchHostFunc(stream, hold, &gate_));
  if (events_.empty()) {
    events_.emplace_back();
    OSSRL_CUDA_CHECK(cudaEventCreate(&events_.back()));
  }
  OSSRL_CUDA_CHECK(cudaEventRecord(events_[0], stream));
  pending_ = true;
  return true;
}

void OpProfiler::mark(Op op) {
  const size_t index = marks_.size() + 1;
  if (index == events_.size()) {
    events_.emplace_back();
    OSSRL_CUDA_CHECK(cudaEventCreate(&events_.back()));
  }
  OSSRL_CUDA_CHECK(cudaEventRecord(events_[index], stream_));
  marks_.push_back(op);
}

void OpProfiler::end() { gate_.release.store(true); }

void OpProfiler::collect() {
  if (!pending_) return;
  pending_ = false;
  OSSRL_CUDA_CHECK(cudaEventSynchronize(events_[marks_.size()]));
  for (size_t i = 0; i < marks_.size(); ++i) {
    float ms = 0;
    OSSRL_CUDA_CHECK(cudaEventElapsedTime(&ms, events_[i], events_[i + 1]));
    sum_ms_[size_t(marks_[i])] += ms;
  }
  ++steps_;
  if (gate_.timed_out.load()) ++ungated_steps_;
}

OpTimes OpProfiler::times() {
  collect();
  OpTimes t;
  t.steps = steps_;
  t.ungated_steps = ungated_steps_;
  for (size_t i = 0; i < kOpCount && steps_ > 0; ++i) t.ms[i] = sum_ms_[i] / steps_;
  return t;
}

void OpProfiler::reset() {
  collect();
  sum_ms_ = {};
  steps_ = ungated_steps_ = 0;
}

}  // namespace ossrl

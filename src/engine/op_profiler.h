// Where a forward step's GPU time goes: CudaModel::forward marks the end of each op on its
// stream with a CUDA event when a profiler is set (CudaModel::set_profiler), and the time
// between consecutive events is added to that op's class, summed over the layers. Only for
// eager steps: a step being captured in a graph is not timed, and with no profiler set the
// forward records nothing, so graphs and normal runs are unaffected.
//
// The host enqueues a step's ~300 small launches more slowly than the GPU runs them at small
// batches, so event gaps would mostly measure launch latency. A timed step is therefore held
// back: a host function at its head waits until the whole step is enqueued, then the GPU runs
// it back to back and each gap is that op's execution time.
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <vector>

#include <cuda_runtime.h>

namespace ossrl {

// The op classes of one forward step, in the order forward runs them.
enum class Op {
  Embedding,
  AttnNorm,
  QkvProj,
  RopeKv,      // RoPE on q and k, k and v written into the KV cache
  Attention,   // paged attention
  OProj,
  MoeNorm,
  Router,      // router logits GEMM; for decode-sized steps the fused norm, router, top-k and grouping
  TopkGroup,   // top-k experts per token and the grouping of assignments by expert
  MoeGateUp,   // expert gate_up GEMM + SwiGLU
  MoeDown,
  MoeCombine,
  FinalNorm,
  LmHead,
  Sampling,
};
inline constexpr size_t kOpCount = size_t(Op::Sampling) + 1;
const char* op_name(Op op);

// Mean GPU time per timed step, by op class.
struct OpTimes {
  int steps = 0;
  std::array<double, kOpCount> ms{};  // ms per step, indexed by Op
  int ungated_steps = 0;              // steps whose hold timed out: their gaps include launch latency
  double step_ms() const;
};

class OpProfiler {
 public:
  // Times only forward steps of `decode_batch` tokens with one logit row each, the decode
  // steps of a full batch (a ragged step mixing prompt chunks has more tokens than rows);
  // 0 times every step.
  explicit OpProfiler(int decode_batch = 0);
  ~OpProfiler();
  OpProfiler(const OpProfiler&) = delete;
  OpProfiler& operator=(const OpProfiler&) = delete;

  // Called by the forward: begin() before its first launch, returning whether this step is
  // timed; mark(op) after the launches of `op`; end() once the step is enqueued.
  bool begin(cudaStream_t stream, int n_tokens, int n_sequences);
  void mark(Op op);
  void end();

  // Waits for the last timed step and returns the means over the timed steps so far.
  OpTimes times();
  void reset();

 private:
  void collect();  // adds the enqueued step's gaps to the sums once it has run

  int decode_batch_;
  cudaStream_t stream_ = nullptr;
  bool pending_ = false;       // a step is enqueued but not yet collected
  std::vector<cudaEvent_t> events_;  // events_[0] the step's start, events_[i] the end of marks_[i - 1]
  std::vector<Op> marks_;
  std::array<double, kOpCount> sum_ms_{};
  int steps_ = 0, ungated_steps_ = 0;
  // The hold at the head of a timed step: hold() runs on the stream and waits for `release`.
  struct Gate {
    std::atomic<bool> release{false};
    std::atomic<bool> timed_out{false};
  };
  static void CUDART_CB hold(void* gate);
  Gate gate_;
};

// The forward's handle on an optional profiler: does nothing when `profiler` is null or does
// not time this step; ends the step when it goes out of scope, early returns included.
class ProfiledStep {
 public:
  ProfiledStep(OpProfiler* profiler, cudaStream_t stream, int n_tokens, int n_sequences)
      : profiler_(profiler != nullptr && profiler->begin(stream, n_tokens, n_sequences) ? profiler : nullptr) {}
  ~ProfiledStep() {
    if (profiler_ != nullptr) profiler_->end();
  }
  ProfiledStep(const ProfiledStep&) = delete;
  ProfiledStep& operator=(const ProfiledStep&) = delete;
  void mark(Op op) {
    if (profiler_ != nullptr) profiler_->mark(op);
  }

 private:
  OpProfiler* profiler_;
};

}  // namespace ossrl

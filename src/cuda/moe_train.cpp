// The MoE training block (cuda/moe_train.h): routing, the expert GEMMs through cuBLAS, and
// the kernels of cuda/moe_train_kernels.h around them.
//
// Forward (R = n*k rows, grouped by expert; offsets copied to the host once):
//   logits = xn · Wrᵀ; top-k + softmax; group by expert          (cuda/router.h)
//   xs = xn gathered by row                                       [R, H] bf16, kept
//   u_g = xs · A_gᵀ                                               [R, r] bf16, kept
//   acc = xs · W_eᵀ per expert                                    cuBLAS, fp32
//   g = acc + b_e + s·u_g·B_gᵀ; h = SwiGLU(g)                     [R, 2I], [R, I] bf16, kept
//   u_d = h · A_dᵀ                                                [R, r] bf16, kept
//   acc = h · D_eᵀ per expert; y = acc + d_e + s·u_d·B_dᵀ         [R, H] fp32, assignment order, kept
//   residual += Σ_s w_s y_s                                       (cuda/moe.h's combine)
// "kept": in the call's MoeTrainActivations (the caller's, or the block's own), with the
// routing; the rest (logits, acc, the grouped order `sorted`, and backward's dys, dg, v) is the
// block's scratch, valid within one call.
// Backward:
//   dw_s = dout · y_s -> dlogits -> dxn = dlogits · Wr; dys = w_s · dout   (grouped order, bf16)
//   v_d = s·dys·B_d; grad_Bd += s·dysᵀ·u_d; grad_Ad += v_dᵀ·h
//   acc = dys · D_e per expert; dg = SwiGLU'(acc + v_d·A_d)       [R, 2I] bf16
//   v_g = s·dg·B_g; grad_Bg += s·dgᵀ·u_g; grad_Ag += v_gᵀ·xs
//   acc = dg · W_e per expert (+ v_g·A_g); dxn[t] += Σ_s acc[row of (t, s)]
//
// Expert GEMMs. Each expert's rows are one cuBLAS GEMM (bf16 in, fp32 out): at training sizes
// (hundreds of rows per expert) that is cuBLAS's large-tile Hopper kernel, where a grouped GEMM
// would get its warp-level ones. One expert's GEMM fills only part of the GPU (5760 x 512 is
// ~180 tiles of 128 x 128 on 132 SMs), so consecutive experts go round robin to kLanes streams,
// each with its own cuBLAS handle, and their tails overlap. The experts go in chunks, and each
// chunk's epilogue (memory bound) runs on its own stream while the lanes run the next chunk's
// GEMMs (compute bound). MXFP4 experts are first decoded to bf16 (bit-exact,
// cuda/moe_train_kernels.h) into one of two stage buffers of bounded size
// (MoeTrainDims::mxfp4_stage_bytes), a chunk of experts at a time, on a decode stream: chunk c+1
// is decoded while the lanes run chunk c. (The rollout kernels, cuda/moe.h, decode in registers
// instead; at these row counts cuBLAS on decoded weights is the faster path.)
#include "cuda/moe_train.h"

#include <cublas_v2.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "core/error.h"
#include "cuda/moe_train_kernels.h"
#include "cuda/router.h"

namespace ossrl::cuda {

using moe_train::ExpertRows;
using moe_train::LowRankUpdate;
using moe_train::RankOperand;
using moe_train::StageList;

namespace {

using bf16 = __nv_bfloat16;

constexpr int kLanes = 4;  // streams the experts' GEMMs are spread over (the first is the caller's)
constexpr size_t kChunkExperts = 8;  // bf16 experts per chunk (MXFP4: what a stage buffer holds)
// The cuBLAS workspace each extra lane's Blas allocates (linear.cpp's kWorkspaceBytes).
constexpr size_t kLaneWorkspaceBytes = size_t(32) << 20;
constexpr int kMaxK = 8;             // cuda/router.h's top-k
constexpr int kMaxExperts = moe_train::kMaxStageExperts;

void check_cublas(cublasStatus_t status, const char* call) {
  if (status != CUBLAS_STATUS_SUCCESS) {
    fail("cuBLAS error {} ({}) in {}", cublasGetStatusName(status), cublasGetStatusString(status), call);
  }
}

// Element counts of every buffer, shared by bytes() and the constructor.
struct Plan {
  size_t tokens = 0, rows = 0, hidden = 0, intermediate = 0, experts = 0, k = 0, rank = 0;
  size_t acc_cols = 0;   // fp32 GEMM output: 2I (gate_up), H (down, dxs), I (dh)
  size_t stage = 0;      // bf16 elements of each MXFP4 stage buffer

  Plan(const MoeTrainDims& d, int max_tokens)
      : tokens(size_t(max_tokens)), rows(size_t(max_tokens) * size_t(d.k)), hidden(size_t(d.hidden)),
        intermediate(size_t(d.intermediate)), experts(size_t(d.experts)), k(size_t(d.k)), rank(size_t(d.lora_r)) {
    acc_cols = std::max(2 * intermediate, hidden);
    if (d.mxfp4_stage_bytes > 0) {
      const size_t largest = 2 * intermediate * hidden;  // gate_up's, >= down's
      stage = std::min(experts * largest, std::max(largest, d.mxfp4_stage_bytes / sizeof(bf16)));
    }
  }
  // What a MoeTrainActivations holds.
  size_t activation_bytes() const {
    return tokens * k * (sizeof(int32_t) + sizeof(float))       // expert index, weight
           + (experts + 1) * sizeof(int32_t)                     // offsets
           + rows * sizeof(int32_t)                              // position
           + rows * hidden * sizeof(bf16)                        // xs
           + rows * 2 * intermediate * sizeof(bf16)              // g
           + rows * intermediate * sizeof(bf16)                  // h
           + rows * hidden * sizeof(float)                       // y
           + 2 * rows * rank * sizeof(bf16);                     // u_g, u_d
  }
  // The block: its scratch and one call's activations of its own.
  size_t bytes() const {
    return activation_bytes()                                    //
           + tokens * experts * sizeof(float)                    // router logits
           + rows * sizeof(int32_t)                              // sorted
           + rows * rank * sizeof(bf16)                          // v
           + rows * acc_cols * sizeof(float)                     // acc
           + rows * hidden * sizeof(bf16)                        // dys
           + rows * 2 * intermediate * sizeof(bf16)              // dg
           + 2 * stage * sizeof(bf16)                            // MXFP4 stage
           + (kLanes - 1) * kLaneWorkspaceBytes;                 // the lanes' cuBLAS workspaces
  }
};

struct Stream {
  cudaStream_t s = nullptr;
  // priority: cudaStreamCreateWithPriority's (0 is the default; lower is more urgent).
  explicit Stream(int priority = 0) {
    OSSRL_CUDA_CHECK(cudaStreamCreateWithPriority(&s, cudaStreamNonBlocking, priority));
  }
  ~Stream() { cudaStreamDestroy(s); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
};

struct Event {
  cudaEvent_t e = nullptr;
  Event() { OSSRL_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming)); }
  ~Event() { cudaEventDestroy(e); }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
};

int greatest_stream_priority() {
  int least = 0, greatest = 0;
  OSSRL_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
  return greatest;
}

bool adapter_on(const DeviceAdapter* ad) { return ad != nullptr && ad->active(); }

// A [experts, r, in] and B [experts, out, r] as rank operands (their grads likewise).
template <class T>
RankOperand<T> a_operand(T* a, const DeviceAdapter& ad) {
  return {a, int64_t(ad.r) * ad.in, 1, ad.in};
}
template <class T>
RankOperand<T> b_operand(T* b, const DeviceAdapter& ad) {
  return {b, int64_t(ad.out) * ad.r, ad.r, 1};
}

void check_dims(const MoeTrainDims& dims, int max_tokens, const char* what) {
  OSSRL_CHECK(max_tokens > 0, "{}: max_tokens must be positive (got {})", what, max_tokens);
  OSSRL_CHECK(dims.hidden > 0 && dims.hidden % 32 == 0 && dims.intermediate > 0 && dims.intermediate % 32 == 0,
              "{}: hidden ({}) and intermediate ({}) must be positive multiples of 32", what, dims.hidden,
              dims.intermediate);
  OSSRL_CHECK(dims.k >= 1 && dims.k <= kMaxK && dims.experts >= dims.k && dims.experts <= kMaxExperts,
              "{}: {} experts per token of {} (at most {} of {})", what, dims.k, dims.experts, kMaxK, kMaxExperts);
  OSSRL_CHECK(dims.lora_r >= 0, "{}: negative LoRA rank {}", what, dims.lora_r);
}

}  // namespace

struct MoeTrainActivations::State {
  MoeTrainDims d;
  Plan plan;
  DeviceBuffer<float> expert_weight, y;
  DeviceBuffer<int32_t> expert_index, offsets, position;
  DeviceBuffer<bf16> xs, g, h, u_gate_up, u_down;

  // The forward's routing, on the host.
  int n = 0;
  std::vector<int32_t> host_offsets;
  std::vector<int> experts_with_rows;
  int max_rows = 0;

  State(const MoeTrainDims& dims, int max_tokens)
      : d(dims),
        plan(dims, max_tokens),
        expert_weight(plan.tokens * plan.k, "MoE expert weights"),
        y(plan.rows * plan.hidden, "MoE expert outputs"),
        expert_index(plan.tokens * plan.k, "MoE expert index"),
        offsets(plan.experts + 1, "MoE expert offsets"),
        position(plan.rows, "MoE assignment positions"),
        xs(plan.rows * plan.hidden, "MoE gathered inputs"),
        g(plan.rows * 2 * plan.intermediate, "MoE gate_up pre-activations"),
        h(plan.rows * plan.intermediate, "MoE SwiGLU outputs"),
        u_gate_up(plan.rows * plan.rank, "MoE gate_up LoRA activations"),
        u_down(plan.rows * plan.rank, "MoE down LoRA activations"),
        host_offsets(plan.experts + 1) {}

  ExpertRows rows() const { return {offsets.data(), d.experts, max_rows}; }

  // The experts_with_rows[first .. first + count) as a launch's ExpertRows.
  ExpertRows chunk_rows(size_t first, size_t count) const {
    const int e0 = experts_with_rows[first], e1 = experts_with_rows[first + count - 1];
    int most = 0;
    for (int e = e0; e <= e1; ++e) most = std::max(most, host_offsets[size_t(e) + 1] - host_offsets[size_t(e)]);
    return {offsets.data(), e1 - e0 + 1, most, e0};
  }
};

size_t MoeTrainActivations::bytes(const MoeTrainDims& dims, int max_tokens) {
  return Plan(dims, max_tokens).activation_bytes();
}

MoeTrainActivations::MoeTrainActivations(const MoeTrainDims& dims, int max_tokens) {
  check_dims(dims, max_tokens, "MoE training activations");
  state_ = new State(dims, max_tokens);
}

MoeTrainActivations::~MoeTrainActivations() { delete state_; }

struct MoeTrainBlock::Impl {
  MoeTrainDims d;
  Plan plan;
  MoeTrainActivations own;  // a forward's with no `keep`
  // Scratch: valid within one call.
  DeviceBuffer<float> logits, acc;
  DeviceBuffer<int32_t> sorted;
  DeviceBuffer<bf16> v, dys, dg;
  DeviceBuffer<bf16> stage[2];
  // Streams before the Blas objects that use them: members are destroyed in reverse order.
  Stream lane_streams[kLanes - 1];
  // The most urgent priority: the GEMMs of the next chunk wait on a decode, and the epilogues
  // are memory bound, so their CTAs go first whenever the lanes' GEMMs free an SM.
  Stream decode_stream{greatest_stream_priority()};
  Stream epilogue_stream{greatest_stream_priority()};
  std::vector<std::unique_ptr<Blas>> lanes;  // lanes 1.. (lane 0 is the caller's Blas)
  Event fork, join[kLanes], stage_ready[2], lane_done[kLanes][2];  // join[kLanes - 1]: the epilogue stream

  Impl(const MoeTrainDims& dims, int max_tokens)
      : d(dims),
        plan(dims, max_tokens),
        own(dims, max_tokens),
        logits(plan.tokens * plan.experts, "MoE router logits"),
        acc(plan.rows * plan.acc_cols, "MoE GEMM outputs"),
        sorted(plan.rows, "MoE sorted assignments"),
        v(plan.rows * plan.rank, "MoE LoRA backward scratch"),
        dys(plan.rows * plan.hidden, "MoE expert output gradients"),
        dg(plan.rows * 2 * plan.intermediate, "MoE gate_up gradients"),
        stage{DeviceBuffer<bf16>(plan.stage, "MXFP4 expert stage"), DeviceBuffer<bf16>(plan.stage, "MXFP4 expert stage")} {
    for (int l = 1; l < kLanes; ++l) lanes.push_back(std::make_unique<Blas>(lane_streams[l - 1].s));
  }

  using Activations = MoeTrainActivations::State;

  // `a` holds a call of `tokens` tokens of this block's shape.
  void check_activations(const Activations& a, int tokens) const {
    OSSRL_CHECK(a.d.hidden == d.hidden && a.d.intermediate == d.intermediate && a.d.experts == d.experts &&
                    a.d.k == d.k && a.d.lora_r == d.lora_r,
                "MoE training block: activations of hidden {}, intermediate {}, {} experts, top-{}, r {} for a block "
                "of hidden {}, intermediate {}, {} experts, top-{}, r {}",
                a.d.hidden, a.d.intermediate, a.d.experts, a.d.k, a.d.lora_r, d.hidden, d.intermediate, d.experts,
                d.k, d.lora_r);
    OSSRL_CHECK(size_t(tokens) <= a.plan.tokens, "MoE training block: {} tokens, activations built for at most {}",
                tokens, a.plan.tokens);
  }

  void check(int tokens, const MoeTrainWeights& w, const DeviceAdapter* gate_up, const DeviceAdapter* down) const {
    OSSRL_CHECK(tokens >= 0 && size_t(tokens) <= plan.tokens, "MoE training block: {} tokens, built for at most {}",
                tokens, plan.tokens);
    auto check_experts = [&](const ExpertWeights& e, int out, int in, const char* name) {
      OSSRL_CHECK(e.experts == d.experts && e.out == out && e.in == in,
                  "MoE training block: {} experts are [{}, {}, {}], the block was built for [{}, {}, {}]", name,
                  e.experts, e.out, e.in, d.experts, out, in);
      OSSRL_CHECK(e.mxfp4 ? e.blocks != nullptr && e.scales != nullptr : e.dense != nullptr,
                  "MoE training block: {} weights missing", name);
      OSSRL_CHECK(!e.mxfp4 || plan.stage > 0,
                  "MoE training block: {} experts are MXFP4 but the block was built without a decode stage "
                  "(MoeTrainDims::mxfp4_stage_bytes 0)",
                  name);
      OSSRL_CHECK(e.bias != nullptr && reinterpret_cast<uintptr_t>(e.bias) % 16 == 0,
                  "MoE training block: {} bias missing or not 16-byte aligned", name);
    };
    check_experts(w.gate_up, 2 * d.intermediate, d.hidden, "gate_up");
    check_experts(w.down, d.hidden, d.intermediate, "down");
    auto check_adapter = [&](const DeviceAdapter* ad, int out, int in, const char* name) {
      if (!adapter_on(ad)) return;
      OSSRL_CHECK(ad->experts == d.experts && ad->out == out && ad->in == in && ad->r == d.lora_r,
                  "MoE training block: the {} adapter is {} experts of [{}, {}] with r {}, the block expects {} of "
                  "[{}, {}] with r {}",
                  name, ad->experts, ad->out, ad->in, ad->r, d.experts, out, in, d.lora_r);
      OSSRL_CHECK(ad->a16 != nullptr && ad->b16 != nullptr && ad->grad_a != nullptr && ad->grad_b != nullptr,
                  "MoE training block: the {} adapter lacks its bf16 copies or grads", name);
    };
    check_adapter(gate_up, 2 * d.intermediate, d.hidden, "gate_up_proj");
    check_adapter(down, d.hidden, d.intermediate, "down_proj");
  }

  // One projection's expert GEMMs over the row ranges of a's routing: out [R, forward ? w.out :
  // w.in] fp32 = per expert e, over its rows of x,
  //   forward: x [R, w.in] · W_eᵀ        backward: x [R, w.out] · W_e
  // in chunks of experts; finish(rows, stream) launches the epilogue of a chunk's rows on the
  // epilogue stream as soon as that chunk's GEMMs are done, while the lanes go on. Everything is
  // joined back into the caller's stream at the end.
  template <class Finish>
  void expert_pass(Blas& blas, const Activations& a, const ExpertWeights& w, bool forward, const bf16* x, float* out,
                   Finish finish) {
    const std::vector<int>& experts_with_rows = a.experts_with_rows;
    const std::vector<int32_t>& host_offsets = a.host_offsets;
    if (experts_with_rows.empty()) return;
    const cudaStream_t main = blas.stream();
    auto lane_stream = [&](int l) { return l == 0 ? main : lane_streams[l - 1].s; };
    const int64_t expert_elems = int64_t(w.out) * w.in;
    // Lanes 1.. and the epilogues start after everything the caller's stream has queued.
    OSSRL_CUDA_CHECK(cudaEventRecord(fork.e, main));
    for (int l = 1; l < kLanes; ++l) OSSRL_CUDA_CHECK(cudaStreamWaitEvent(lane_streams[l - 1].s, fork.e));
    OSSRL_CUDA_CHECK(cudaStreamWaitEvent(epilogue_stream.s, fork.e));
    int next_lane = 0;
    auto gemm = [&](int e, const bf16* weight) {
      const int lane = next_lane;
      next_lane = (next_lane + 1) % kLanes;
      const int begin = host_offsets[size_t(e)], m = host_offsets[size_t(e) + 1] - begin;
      const cublasHandle_t handle = static_cast<cublasHandle_t>(lane == 0 ? blas.handle() : lanes[size_t(lane - 1)]->handle());
      const float one = 1.0f, zero = 0.0f;
      // Column-major views: a row-major [rows, cols] matrix is cols x rows with ld cols.
      if (forward) {  // outᵀ [w.out, m] = W_e ([w.in, w.out] col-major, transposed) · xᵀ [w.in, m]
        check_cublas(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, w.out, m, w.in, &one, weight, CUDA_R_16BF, w.in,
                                  x + int64_t(begin) * w.in, CUDA_R_16BF, w.in, &zero, out + int64_t(begin) * w.out,
                                  CUDA_R_32F, w.out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                     "cublasGemmEx (MoE expert, forward)");
      } else {  // outᵀ [w.in, m] = W_e ([w.in, w.out] col-major) · xᵀ [w.out, m]
        check_cublas(cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, w.in, m, w.out, &one, weight, CUDA_R_16BF, w.in,
                                  x + int64_t(begin) * w.out, CUDA_R_16BF, w.out, &zero, out + int64_t(begin) * w.in,
                                  CUDA_R_32F, w.in, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                     "cublasGemmEx (MoE expert, backward)");
      }
    };

    const size_t capacity = w.mxfp4 ? std::max<size_t>(1, plan.stage / size_t(expert_elems)) : kChunkExperts;
    // The first chunk is a quarter of the others: nothing overlaps its decode or its epilogue.
    size_t chunk = std::max<size_t>(1, capacity / 4);
    for (size_t first = 0, c = 0; first < experts_with_rows.size(); first += chunk, chunk = capacity, ++c) {
      const int buf = int(c % 2);
      const size_t count = std::min(chunk, experts_with_rows.size() - first);
      if (w.mxfp4) {
        StageList list;
        list.count = int(count);
        for (size_t i = 0; i < count; ++i) list.expert[i] = int16_t(experts_with_rows[first + i]);
        // The buffer is free once every lane's GEMMs of its last chunk (this pass's or an
        // earlier one's) are done.
        for (int l = 0; l < kLanes; ++l) OSSRL_CUDA_CHECK(cudaStreamWaitEvent(decode_stream.s, lane_done[l][buf].e));
        moe_train::decode_mxfp4_experts(stage[buf].data(), w, list, decode_stream.s);
        OSSRL_CUDA_CHECK(cudaEventRecord(stage_ready[buf].e, decode_stream.s));
        for (int l = 0; l < kLanes; ++l) OSSRL_CUDA_CHECK(cudaStreamWaitEvent(lane_stream(l), stage_ready[buf].e));
        for (size_t i = 0; i < count; ++i) gemm(list.expert[i], stage[buf].data() + int64_t(i) * expert_elems);
      } else {
        for (size_t i = 0; i < count; ++i) {
          const int e = experts_with_rows[first + i];
          gemm(e, w.dense + int64_t(e) * expert_elems);
        }
      }
      for (int l = 0; l < kLanes; ++l) {
        OSSRL_CUDA_CHECK(cudaEventRecord(lane_done[l][buf].e, lane_stream(l)));
        OSSRL_CUDA_CHECK(cudaStreamWaitEvent(epilogue_stream.s, lane_done[l][buf].e));
      }
      finish(a.chunk_rows(first, count), epilogue_stream.s);
    }
    for (int l = 1; l <= kLanes; ++l) {
      const cudaStream_t s = l < kLanes ? lane_streams[l - 1].s : epilogue_stream.s;
      OSSRL_CUDA_CHECK(cudaEventRecord(join[l - 1].e, s));
      OSSRL_CUDA_CHECK(cudaStreamWaitEvent(main, join[l - 1].e));
    }
  }
};

size_t MoeTrainBlock::bytes(const MoeTrainDims& dims, int max_tokens) { return Plan(dims, max_tokens).bytes(); }

MoeTrainBlock::MoeTrainBlock(const MoeTrainDims& dims, int max_tokens) {
  check_dims(dims, max_tokens, "MoE training block");
  impl_ = new Impl(dims, max_tokens);
}

MoeTrainBlock::~MoeTrainBlock() { delete impl_; }

void MoeTrainBlock::forward(Blas& blas, float* residual, const bf16* xn, int n, const MoeTrainWeights& w,
                            const DeviceAdapter* gate_up, const DeviceAdapter* down, MoeTrainActivations* keep) {
  Impl& m = *impl_;
  Impl::Activations& a = keep != nullptr ? *keep->state_ : *m.own.state_;
  m.check(n, w, gate_up, down);
  m.check_activations(a, n);
  a.n = n;
  if (n == 0) return;
  const MoeTrainDims& d = m.d;
  const cudaStream_t stream = blas.stream();
  const int rows_total = n * d.k;

  linear_forward(blas, m.logits.data(), xn, w.router_weight, nullptr, n, d.hidden, d.experts, false);
  router_topk_forward(a.expert_index.data(), a.expert_weight.data(), m.logits.data(), w.router_bias, n, d.experts, d.k,
                      stream);
  moe_group_by_expert(a.offsets.data(), m.sorted.data(), a.expert_index.data(), n, d.k, d.experts, stream);
  // The one host sync: the GEMMs' row ranges.
  OSSRL_CUDA_CHECK(cudaMemcpyAsync(a.host_offsets.data(), a.offsets.data(), a.host_offsets.size() * sizeof(int32_t),
                                   cudaMemcpyDeviceToHost, stream));
  OSSRL_CUDA_CHECK(cudaStreamSynchronize(stream));
  a.experts_with_rows.clear();
  a.max_rows = 0;
  for (int e = 0; e < d.experts; ++e) {
    const int count = a.host_offsets[size_t(e) + 1] - a.host_offsets[size_t(e)];
    if (count > 0) a.experts_with_rows.push_back(e);
    a.max_rows = std::max(a.max_rows, count);
  }
  const ExpertRows rows = a.rows();

  moe_train::gather_rows(a.xs.data(), a.position.data(), xn, m.sorted.data(), rows_total, d.k, d.hidden, stream);
  LowRankUpdate gate_up_update, down_update;
  if (adapter_on(gate_up)) {
    moe_train::lora_project(a.u_gate_up.data(), a.xs.data(), d.hidden, a_operand<const bf16>(gate_up->a16, *gate_up),
                            d.lora_r, 1.0f, rows, stream);
    gate_up_update = {a.u_gate_up.data(), b_operand<const bf16>(gate_up->b16, *gate_up), d.lora_r, gate_up->scale};
  }
  m.expert_pass(blas, a, w.gate_up, /*forward=*/true, a.xs.data(), m.acc.data(), [&](const ExpertRows& r, cudaStream_t s) {
    moe_train::gate_up_epilogue(a.g.data(), a.h.data(), m.acc.data(), w.gate_up.bias, gate_up_update, d.intermediate,
                                d.swiglu_limit, r, s);
  });
  if (adapter_on(down)) {
    moe_train::lora_project(a.u_down.data(), a.h.data(), d.intermediate, a_operand<const bf16>(down->a16, *down),
                            d.lora_r, 1.0f, rows, stream);
    down_update = {a.u_down.data(), b_operand<const bf16>(down->b16, *down), d.lora_r, down->scale};
  }
  m.expert_pass(blas, a, w.down, /*forward=*/true, a.h.data(), m.acc.data(), [&](const ExpertRows& r, cudaStream_t s) {
    moe_train::store_rows_epilogue(a.y.data(), m.acc.data(), d.hidden, w.down.bias, m.sorted.data(), down_update, r,
                                   s);
  });
  moe_combine(residual, a.y.data(), a.expert_weight.data(), n, d.k, d.hidden, stream);
}

void MoeTrainBlock::backward(Blas& blas, float* dxn, const float* dout, const bf16* xn, int n, const MoeTrainWeights& w,
                             const DeviceAdapter* gate_up, const DeviceAdapter* down, const MoeTrainActivations* from) {
  Impl& m = *impl_;
  const Impl::Activations& a = from != nullptr ? *from->state_ : *m.own.state_;
  m.check(n, w, gate_up, down);
  m.check_activations(a, n);
  OSSRL_CHECK(n == a.n, "MoE training block: backward of {} tokens after a forward of {}", n, a.n);
  OSSRL_CHECK(reinterpret_cast<uintptr_t>(dxn) % 16 == 0, "MoE training block: dxn must be 16-byte aligned");
  if (n == 0) return;
  const MoeTrainDims& d = m.d;
  const cudaStream_t stream = blas.stream();
  const ExpertRows rows = a.rows();
  // xn's rows are already in xs (gathered by the forward this backward belongs to).
  (void)xn;

  bf16* dys = m.dys.data();
  bf16* dg = m.dg.data();
  moe_train::router_backward(dxn, dys, dout, a.y.data(), a.expert_index.data(), a.expert_weight.data(),
                             a.position.data(), w.router_weight, n, d.k, d.hidden, stream);
  LowRankUpdate dh_update, dxs_update;
  if (adapter_on(down)) {
    moe_train::lora_project(m.v.data(), dys, d.hidden, b_operand<const bf16>(down->b16, *down), d.lora_r, down->scale,
                            rows, stream);
    moe_train::lora_weight_grad(b_operand(down->grad_b, *down), dys, d.hidden, a.u_down.data(), d.lora_r, down->scale,
                                rows, stream);
    moe_train::lora_weight_grad(a_operand(down->grad_a, *down), a.h.data(), d.intermediate, m.v.data(), d.lora_r, 1.0f,
                                rows, stream);
    dh_update = {m.v.data(), a_operand<const bf16>(down->a16, *down), d.lora_r, 1.0f};
  }
  m.expert_pass(blas, a, w.down, /*forward=*/false, dys, m.acc.data(), [&](const ExpertRows& r, cudaStream_t s) {
    moe_train::swiglu_backward_epilogue(dg, m.acc.data(), a.g.data(), dh_update, d.intermediate, d.swiglu_limit, r, s);
  });
  if (adapter_on(gate_up)) {
    moe_train::lora_project(m.v.data(), dg, 2 * d.intermediate, b_operand<const bf16>(gate_up->b16, *gate_up),
                            d.lora_r, gate_up->scale, rows, stream);
    moe_train::lora_weight_grad(b_operand(gate_up->grad_b, *gate_up), dg, 2 * d.intermediate, a.u_gate_up.data(),
                                d.lora_r, gate_up->scale, rows, stream);
    moe_train::lora_weight_grad(a_operand(gate_up->grad_a, *gate_up), a.xs.data(), d.hidden, m.v.data(), d.lora_r,
                                1.0f, rows, stream);
    dxs_update = {m.v.data(), a_operand<const bf16>(gate_up->a16, *gate_up), d.lora_r, 1.0f};
  }
  m.expert_pass(blas, a, w.gate_up, /*forward=*/false, dg, m.acc.data(), [&](const ExpertRows& r, cudaStream_t s) {
    if (dxs_update.u != nullptr) {
      moe_train::store_rows_epilogue(m.acc.data(), m.acc.data(), d.hidden, nullptr, nullptr, dxs_update, r, s);
    }
  });
  moe_train::sum_expert_rows(dxn, m.acc.data(), a.position.data(), n, d.k, d.hidden, stream);
}

}  // namespace ossrl::cuda

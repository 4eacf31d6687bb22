// Launching the kernels of a forward step, as programmatic dependents (PDL, sm_90) where that
// pays.
//
// A kernel launched as a programmatic dependent starts as soon as every CTA of the kernel
// before it has called release_dependents(): its CTAs take whatever room the SMs have left,
// run the code before wait_for_producers() and then block there until the previous grid has
// completed and its memory is visible. That hides the gap between two dependent grids and the
// ramp of the next one, and at larger steps lets a grid's first CTAs start while the last
// wave of the one before drains: on an H100, decode steps of 64 and 256 sequences took 3% and
// 1.5% less time. At small steps it costs instead: at batch 1 the step took 2.78 ms against
// 2.60 ms plain (the dependents' CTAs, parked on every SM, hold up the small latency-bound
// kernels they wait for), and releasing only at exit gained nothing (2.58 ms). So a step of
// at most kPlainLaunchMaxTokens tokens launches plainly (`overlap_launches`), and the kernels
// that serve only such steps (cuda/gemv.h's skinny matmuls, the fused routing) never overlap.
//
// The contract, for every kernel that may be launched as a dependent:
// - Before wait_for_producers() it reads only what no kernel of the step writes (weights, the
//   step's inputs copied in before it), or, where its comment says so, the outputs of the kernel
//   two launches back (complete by then when the kernel before it releases after its wait, as
//   those marked "releases after its wait" do); and it writes nothing.
// - Every CTA calls wait_for_producers() before it finishes, early-leaving CTAs included: a
//   grid then completes only after the grid before it, so "the previous kernel has completed"
//   means every kernel before it has.
// - It calls release_dependents() once its own dependents may start: right after its wait
//   (what the two-back guarantee above relies on) unless its comment says otherwise.
// Both calls are no-ops in a grid launched plainly, so the same kernels run unchanged either
// way, alone (tests) and inside CUDA graphs, whose capture keeps the programmatic edges.
#pragma once

#include <cuda_runtime.h>

#include "cuda/check.h"

namespace ossrl::cuda {

__device__ __forceinline__ void wait_for_producers() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }
__device__ __forceinline__ void release_dependents() {
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
}

// See the top of the file: the largest step (in tokens, or rows for the sampling) launched
// plainly. The skinny matmuls' limit, so the two regimes meet where the kernels change.
inline constexpr int kPlainLaunchMaxTokens = 16;
constexpr bool overlap_launches(int tokens) { return tokens > kPlainLaunchMaxTokens; }

// A launch's geometry; cluster (1, 1, 1) is no cluster. dependent: launch as the programmatic
// dependent of the work before it in the stream.
struct LaunchShape {
  dim3 grid;
  dim3 block;
  size_t shared_bytes = 0;
  dim3 cluster = dim3(1, 1, 1);
  bool dependent = false;
};

// kernel<<<shape>>>(args...) on `stream`.
template <class... Params, class... Args>
void launch_kernel(void (*kernel)(Params...), const LaunchShape& shape, cudaStream_t stream, Args... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = shape.grid;
  config.blockDim = shape.block;
  config.dynamicSmemBytes = shape.shared_bytes;
  config.stream = stream;
  cudaLaunchAttribute attributes[2]{};
  config.attrs = attributes;
  if (shape.dependent) {
    attributes[config.numAttrs].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attributes[config.numAttrs].val.programmaticStreamSerializationAllowed = 1;
    ++config.numAttrs;
  }
  if (shape.cluster.x * shape.cluster.y * shape.cluster.z > 1) {
    attributes[config.numAttrs].id = cudaLaunchAttributeClusterDimension;
    attributes[config.numAttrs].val.clusterDim.x = shape.cluster.x;
    attributes[config.numAttrs].val.clusterDim.y = shape.cluster.y;
    attributes[config.numAttrs].val.clusterDim.z = shape.cluster.z;
    ++config.numAttrs;
  }
  OSSRL_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, Params(args)...));
}

}  // namespace ossrl::cuda

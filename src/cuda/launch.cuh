// Launching the kernels of a forward step as programmatic dependents (PDL, sm_90).
//
// A kernel launched as a programmatic dependent starts as soon as every CTA of the kernel
// before it has called release_dependents(): its CTAs take whatever room the SMs have left,
// run the code before wait_for_producers() and then block there until the previous grid has
// completed and its memory is visible. That hides the gap between two dependent grids and the
// ramp of the next one, and lets a grid's first CTAs start while the last wave of the one
// before drains. Every kernel launched through launch_kernel is a dependent, at every step
// size; the skinny matmuls (cuda/gemv.cu) choose per call.
//
// Measured on an H100 (20b shape, ms per decode step, interleaved runs): with plain launches at
// steps of at most 16 tokens, batch 1 / 4 / 8 / 16 took 2.52 / 4.27 / 5.09 / 6.68; with the
// kernels that serve them dependents too (the fused attention input, the fused routing and the
// streaming expert kernels each ask for their first weights before the wait, while the kernel
// before still runs) 2.36 / 4.22 / 4.85 / 6.36. At batch 64 and 256 dependents save 3% and
// 1.5%. Earlier, with the fused attention input and routing plain, making the rest dependents
// at batch 1 cost 7% (2.78 against 2.60 ms): the parked dependents held up the small
// latency-bound kernels between them.
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

// A launch's geometry; cluster (1, 1, 1) is no cluster. dependent: launch as the programmatic
// dependent of the work before it in the stream (what every kernel but some skinny matmuls is).
struct LaunchShape {
  dim3 grid;
  dim3 block;
  size_t shared_bytes = 0;
  dim3 cluster = dim3(1, 1, 1);
  bool dependent = true;
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

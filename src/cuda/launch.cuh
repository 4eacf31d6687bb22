// Launching the kernels of a forward step as programmatic dependents (PDL, sm_90).
//
// At decode a step is ~170 kernels of a few microseconds each, so the gap between two
// dependent kernels (the next grid is launched only once the last CTA of the previous one has
// finished and its writes are flushed) and the ramp of each grid (its first loads wait a full
// memory latency) add up to a large part of the step. A kernel launched with launch_dependent
// instead starts as soon as every CTA of the kernel before it has called release_dependents():
// its CTAs take whatever room the SMs have left, run the code before wait_for_producers()
// (loading or prefetching weights, which no kernel of the step writes) and then block there
// until the previous grid has completed and its memory is visible.
//
// The contract, for every kernel launched with launch_dependent:
// - Before wait_for_producers() it reads only what no kernel of the step writes (weights, the
//   step's inputs copied in before it), or, where its comment says so, the outputs of the kernel
//   two launches back (complete by then when the kernel before it releases after its wait, as
//   those marked "releases after its wait" do); and it writes nothing.
// - Every CTA calls wait_for_producers() before it finishes, early-leaving CTAs included: a
//   grid then completes only after the grid before it, so "the previous kernel has completed"
//   means every kernel before it has.
// - It calls release_dependents() once its own dependents may start: right after its wait
//   (what the two-back guarantee above relies on) unless its comment says otherwise.
// A kernel launched without PDL (cuBLAS, a plain <<< >>>) waits for full completion as always,
// and both calls are no-ops in a grid that was not launched as a dependent, so the kernels run
// unchanged alone (tests) and inside CUDA graphs, whose capture keeps the programmatic edges.
#pragma once

#include <cuda_runtime.h>

#include "cuda/check.h"

namespace ossrl::cuda {

__device__ __forceinline__ void wait_for_producers() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }
__device__ __forceinline__ void release_dependents() {
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
}

// A launch's geometry; cluster (1, 1, 1) is no cluster.
struct LaunchShape {
  dim3 grid;
  dim3 block;
  size_t shared_bytes = 0;
  dim3 cluster = dim3(1, 1, 1);
};

// kernel<<<shape>>>(args...) on `stream` as the programmatic dependent of the work before it.
template <class... Params, class... Args>
void launch_dependent(void (*kernel)(Params...), const LaunchShape& shape, cudaStream_t stream, Args... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = shape.grid;
  config.blockDim = shape.block;
  config.dynamicSmemBytes = shape.shared_bytes;
  config.stream = stream;
  cudaLaunchAttribute attributes[2]{};
  attributes[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attributes[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attributes;
  config.numAttrs = 1;
  if (shape.cluster.x * shape.cluster.y * shape.cluster.z > 1) {
    attributes[1].id = cudaLaunchAttributeClusterDimension;
    attributes[1].val.clusterDim.x = shape.cluster.x;
    attributes[1].val.clusterDim.y = shape.cluster.y;
    attributes[1].val.clusterDim.z = shape.cluster.z;
    config.numAttrs = 2;
  }
  OSSRL_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, Params(args)...));
}

}  // namespace ossrl::cuda

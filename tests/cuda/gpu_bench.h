// Shared by the GPU benches: timing on the default stream with CUDA events, and main's frame
// (no GPU: say so and succeed; an error: its message and exit status 1).
#pragma once

#include <cuda_runtime.h>

#include <cstdio>
#include <exception>

#include "cuda/check.h"
#include "cuda/device.h"

namespace ossrl::test {

// A start and a stop event; ms(work) is what work() takes on the default stream.
class EventTimer {
 public:
  EventTimer() {
    OSSRL_CUDA_CHECK(cudaEventCreate(&start_));
    OSSRL_CUDA_CHECK(cudaEventCreate(&stop_));
  }
  ~EventTimer() {
    cudaEventDestroy(start_);
    cudaEventDestroy(stop_);
  }
  EventTimer(const EventTimer&) = delete;
  EventTimer& operator=(const EventTimer&) = delete;

  template <class Work>
  double ms(Work work) {
    OSSRL_CUDA_CHECK(cudaEventRecord(start_, nullptr));
    work();
    OSSRL_CUDA_CHECK(cudaEventRecord(stop_, nullptr));
    OSSRL_CUDA_CHECK(cudaEventSynchronize(stop_));
    float elapsed = 0;
    OSSRL_CUDA_CHECK(cudaEventElapsedTime(&elapsed, start_, stop_));
    return elapsed;
  }

 private:
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
};

// Mean milliseconds of call() over `iterations` back-to-back calls, after one untimed call
// (module load, cuBLAS heuristics, first touch).
template <class Call>
double mean_ms(Call call, int iterations) {
  call();
  EventTimer timer;
  return timer.ms([&] {
    for (int i = 0; i < iterations; ++i) call();
  }) / iterations;
}

// A bench's main: run() on a machine with a GPU, after a line naming the device.
template <class Run>
int bench_main(const char* name, Run run) {
  if (cuda::device_count() == 0) {
    std::printf("%s: no GPU on this machine, nothing to time\n", name);
    return 0;
  }
  try {
    std::printf("%s\n", cuda::device_summary(0).c_str());
    run();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: %s\n", name, e.what());
    return 1;
  }
  return 0;
}

}  // namespace ossrl::test

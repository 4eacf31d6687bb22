// The GPU as ossrl sees it: whether one is there, and what it is. Everything CUDA
// returns is checked; a missing GPU is an answer (0 devices), not an error.
#pragma once

#include <cstddef>
#include <string>

namespace ossrl::cuda {

// Number of usable CUDA devices; 0 where there is no driver or no GPU.
int device_count();
// "NVIDIA H100 80GB HBM3, sm_90, 132 SMs, 79.1 GiB" for device `index`.
std::string device_summary(int index);

// Bytes of the current device in use, by every process (cudaMemGetInfo: total - free).
size_t memory_in_use();
// Bytes of the current device free for new allocations.
size_t memory_free();

}  // namespace ossrl::cuda

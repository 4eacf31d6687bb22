// AdamW (train/optimizer.h) over a DeviceLora's flat buffers: the same guarded step — a
// non-finite loss or gradient skips the update and says so, clipping by the global norm as
// torch.nn.utils.clip_grad_norm_ — with the norm, the update and the bf16 refresh on the GPU
// (cuda/adamw.h), bit for bit the CPU optimizer's arithmetic.
#pragma once

#include <cstdint>

#include "cuda/buffer.h"
#include "train/cuda_lora.h"
#include "train/optimizer.h"

namespace ossrl {

class DeviceAdamW {
 public:
  // The moments live in `lora` (zero at its construction); lora must outlive this.
  DeviceAdamW(DeviceLora& lora, const AdamWConfig& config);

  // As AdamW::step: checks the loss and the grads, clips to max_grad_norm (if > 0), updates
  // and refreshes the bf16 copies. The clip factor scales each grad inside the update; the
  // grads themselves are left as they are, for the caller to zero.
  StepReport step(double lr, double max_grad_norm, double loss);

  int64_t steps() const { return steps_; }

 private:
  DeviceLora& lora_;
  AdamWConfig config_;
  int64_t steps_ = 0;
  cuda::DeviceBuffer<double> norm_;      // [1] Σ grad²
  cuda::DeviceBuffer<double> partials_;  // sum_of_squares' scratch
};

}  // namespace ossrl

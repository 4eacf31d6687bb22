// A typed, owning allocation in GPU memory. Every allocation in the engine goes through
// it, so a failed cudaMalloc (out of memory) is an ossrl::Error naming the size, never a
// null pointer handed to a kernel.
#pragma once

#include <cstddef>
#include <utility>
#include <vector>

#include "cuda/check.h"

namespace ossrl::cuda {

// Throws an Error "out of GPU memory: asked for N bytes (what), free F of T".
[[noreturn]] void fail_allocation(size_t bytes, const char* what, cudaError_t status);

template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  // `what` names the allocation in an out-of-memory message.
  explicit DeviceBuffer(size_t count, const char* what = "buffer") : count_(count) {
    if (count == 0) return;
    const cudaError_t status = cudaMalloc(reinterpret_cast<void**>(&data_), count * sizeof(T));
    if (status != cudaSuccess) {
      (void)cudaGetLastError();  // clear the sticky error: the caller may recover
      fail_allocation(count * sizeof(T), what, status);
    }
  }
  // Allocates and copies `host` (synchronously).
  explicit DeviceBuffer(const std::vector<T>& host, const char* what = "buffer") : DeviceBuffer(host.size(), what) {
    upload(host.data(), host.size());
  }
  DeviceBuffer(DeviceBuffer&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), count_(std::exchange(other.count_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
    if (this != &other) {
      release();
      data_ = std::exchange(other.data_, nullptr);
      count_ = std::exchange(other.count_, 0);
    }
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { release(); }

  T* data() { return data_; }
  const T* data() const { return data_; }
  size_t size() const { return count_; }
  size_t bytes() const { return count_ * sizeof(T); }

  // Copies `count` elements from host memory to the start of the buffer.
  void upload(const T* host, size_t count, cudaStream_t stream = nullptr) {
    if (count == 0) return;
    OSSRL_CUDA_CHECK(cudaMemcpyAsync(data_, host, count * sizeof(T), cudaMemcpyHostToDevice, stream));
    OSSRL_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
  void upload(const std::vector<T>& host, cudaStream_t stream = nullptr) { upload(host.data(), host.size(), stream); }
  // The whole buffer (or its first `count` elements) back on the host.
  std::vector<T> download(size_t count, cudaStream_t stream = nullptr) const {
    std::vector<T> host(count);
    if (count == 0) return host;
    OSSRL_CUDA_CHECK(cudaMemcpyAsync(host.data(), data_, count * sizeof(T), cudaMemcpyDeviceToHost, stream));
    OSSRL_CUDA_CHECK(cudaStreamSynchronize(stream));
    return host;
  }
  std::vector<T> download() const { return download(count_); }

 private:
  void release() {
    if (data_ != nullptr) cudaFree(data_);
    data_ = nullptr;
    count_ = 0;
  }
  T* data_ = nullptr;
  size_t count_ = 0;
};

// A typed, owning allocation of page-locked host memory: what device copies reach at full
// PCIe speed (pageable memory is staged through a driver buffer at a fraction of it).
template <class T>
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  explicit PinnedBuffer(size_t count, const char* what = "pinned buffer") : count_(count) {
    if (count == 0) return;
    const cudaError_t status = cudaMallocHost(reinterpret_cast<void**>(&data_), count * sizeof(T));
    if (status != cudaSuccess) {
      (void)cudaGetLastError();
      fail_allocation(count * sizeof(T), what, status);
    }
  }
  PinnedBuffer(PinnedBuffer&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), count_(std::exchange(other.count_, 0)) {}
  PinnedBuffer& operator=(PinnedBuffer&& other) noexcept {
    if (this != &other) {
      release();
      data_ = std::exchange(other.data_, nullptr);
      count_ = std::exchange(other.count_, 0);
    }
    return *this;
  }
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  ~PinnedBuffer() { release(); }

  T* data() { return data_; }
  const T* data() const { return data_; }
  size_t size() const { return count_; }
  size_t bytes() const { return count_ * sizeof(T); }

 private:
  void release() {
    if (data_ != nullptr) cudaFreeHost(data_);
    data_ = nullptr;
    count_ = 0;
  }
  T* data_ = nullptr;
  size_t count_ = 0;
};

}  // namespace ossrl::cuda

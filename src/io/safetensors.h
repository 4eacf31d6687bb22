// safetensors files: a little-endian u64 header length, a JSON header mapping each
// tensor name to {dtype, shape, data_offsets}, then the raw bytes. Reading memory-maps
// the file and validates the header against the file size before any tensor is
// touched, so a truncated or lying file fails with the file and tensor named.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "core/dtype.h"

namespace ossrl {

// A read-only view of one tensor inside a mapped file (or any other owner's buffer).
// `data` is only as aligned as the writer made it: safetensors packs tensors back to
// back, so a BF16 tensor after an odd-length U8 one starts at an odd address. Read
// multi-byte elements with memcpy (or copy out) rather than casting the pointer.
struct TensorView {
  std::string name;
  std::string file;  // the file it came from, for error messages
  DType dtype = DType::F32;
  std::vector<int64_t> shape;  // [] for a scalar (numel 1)
  const uint8_t* data = nullptr;
  size_t nbytes = 0;  // numel * dtype_size(dtype)

  int64_t numel() const;
  // "[24, 2880]"
  std::string shape_str() const;
  // Throws an Error naming file and tensor unless dtype and shape are as given.
  void expect(DType want_dtype, std::span<const int64_t> want_shape) const;
};

class SafetensorsFile {
 public:
  // Maps `path` and validates its header; throws Error on any inconsistency: a header
  // length past the end of the file, a header that is not a JSON object, an unknown
  // dtype, a negative dimension, data_offsets outside the data section or not equal to
  // numel * dtype size, two tensors sharing bytes, or one name given twice.
  static std::unique_ptr<SafetensorsFile> open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }
  // Throws an Error naming the file if `name` is absent.
  const TensorView& tensor(const std::string& name) const;
  const std::map<std::string, TensorView>& tensors() const { return tensors_; }
  // The "__metadata__" string map of the header (may be empty).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  SafetensorsFile() = default;
  std::string path_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  std::map<std::string, TensorView> tensors_;
  std::map<std::string, std::string> metadata_;
};

// Collects tensors and writes one safetensors file atomically (temporary file, fsync,
// rename), so a crash never leaves a half-written adapter or checkpoint behind.
class SafetensorsWriter {
 public:
  // Copies `bytes` (must be numel(shape) * dtype_size(dtype) long). Names are unique;
  // "__metadata__" is reserved by the format.
  void add(const std::string& name, DType dtype, std::vector<int64_t> shape,
           std::span<const uint8_t> bytes);
  void add_f32(const std::string& name, std::vector<int64_t> shape, std::span<const float> values);
  void set_metadata(const std::string& key, const std::string& value);
  // Tensors are laid out back to back in name order (the format forbids gaps); the
  // header is padded with spaces so the data section starts 8-byte aligned.
  void write(const std::string& path) const;

 private:
  struct Entry {
    DType dtype;
    std::vector<int64_t> shape;
    std::vector<uint8_t> bytes;
  };
  std::map<std::string, Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace ossrl

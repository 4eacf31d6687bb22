#include "io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <limits>
#include <set>

#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "core/error.h"

namespace ossrl {

namespace {

// The reference implementation refuses headers above 100 MB; a larger length is a
// corrupt file, and checking it first keeps us from parsing gigabytes of tensor bytes.
constexpr uint64_t kMaxHeaderBytes = 100u << 20;

using json = nlohmann::json;

// numel * dtype_size with overflow checks: a lying header must not wrap around and pass
// the size comparison. Returns false on overflow.
bool byte_count(std::span<const int64_t> shape, DType dtype, uint64_t* out) {
  uint64_t n = 1;
  for (int64_t d : shape) {
    if (__builtin_mul_overflow(n, uint64_t(d), &n)) return false;
  }
  return !__builtin_mul_overflow(n, uint64_t(dtype_size(dtype)), out);
}

// One header entry, fully checked against the data section of `size` bytes.
// Offsets are relative to the start of the data section.
struct ParsedEntry {
  TensorView view;
  uint64_t begin = 0, end = 0;
};

ParsedEntry parse_entry(const std::string& path, const std::string& name, const json& e,
                        uint64_t data_size) {
  ParsedEntry out;
  out.view.name = name;
  out.view.file = path;
  OSSRL_CHECK(!name.empty(), "{}: header has a tensor with an empty name", path);
  OSSRL_CHECK(e.is_object(), "{}: tensor {}: header entry is not an object", path, name);

  auto dtype_it = e.find("dtype");
  OSSRL_CHECK(dtype_it != e.end() && dtype_it->is_string(), "{}: tensor {}: missing string \"dtype\"",
              path, name);
  const std::string dtype = dtype_it->get<std::string>();
  OSSRL_CHECK(dtype_from_name(dtype, &out.view.dtype), "{}: tensor {}: unknown dtype \"{}\"", path,
              name, dtype);

  auto shape_it = e.find("shape");
  OSSRL_CHECK(shape_it != e.end() && shape_it->is_array(), "{}: tensor {}: missing array \"shape\"",
              path, name);
  for (const json& d : *shape_it) {
    OSSRL_CHECK(d.is_number_integer(), "{}: tensor {}: shape {} has a non-integer dimension", path,
                name, shape_it->dump());
    OSSRL_CHECK(d.is_number_unsigned(), "{}: tensor {}: shape {} has a negative dimension", path,
                name, shape_it->dump());
    const uint64_t v = d.get<uint64_t>();
    OSSRL_CHECK(v <= uint64_t(std::numeric_limits<int64_t>::max()),
                "{}: tensor {}: dimension {} too large", path, name, v);
    out.view.shape.push_back(int64_t(v));
  }

  auto off_it = e.find("data_offsets");
  OSSRL_CHECK(off_it != e.end() && off_it->is_array() && off_it->size() == 2 &&
                  (*off_it)[0].is_number_unsigned() && (*off_it)[1].is_number_unsigned(),
              "{}: tensor {}: \"data_offsets\" must be two non-negative integers", path, name);
  out.begin = (*off_it)[0].get<uint64_t>();
  out.end = (*off_it)[1].get<uint64_t>();
  OSSRL_CHECK(out.begin <= out.end, "{}: tensor {}: data_offsets [{}, {}] run backwards", path,
              name, out.begin, out.end);
  OSSRL_CHECK(out.end <= data_size,
              "{}: tensor {}: data_offsets [{}, {}] run past the end of the data section ({} "
              "bytes; file truncated?)",
              path, name, out.begin, out.end, data_size);

  uint64_t want = 0;
  OSSRL_CHECK(byte_count(out.view.shape, out.view.dtype, &want),
              "{}: tensor {}: {} x {} overflows 64 bits", path, name, out.view.shape_str(), dtype);
  OSSRL_CHECK(out.end - out.begin == want,
              "{}: tensor {}: data_offsets [{}, {}] hold {} bytes, but {} {} needs {}", path, name,
              out.begin, out.end, out.end - out.begin, dtype, out.view.shape_str(), want);
  out.view.nbytes = size_t(want);
  return out;
}

// Writes all of `bytes` to fd, retrying short writes and EINTR.
void write_all(int fd, const uint8_t* bytes, size_t n, const std::string& path) {
  while (n > 0) {
    const ssize_t w = ::write(fd, bytes, n);
    if (w < 0 && errno == EINTR) continue;
    OSSRL_CHECK(w > 0, "{}: write failed: {}", path, std::strerror(errno));
    bytes += w;
    n -= size_t(w);
  }
}

}  // namespace

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string TensorView::shape_str() const { return fmt::format("[{}]", fmt::join(shape, ", ")); }

void TensorView::expect(DType want_dtype, std::span<const int64_t> want_shape) const {
  const bool same_shape = std::equal(shape.begin(), shape.end(), want_shape.begin(), want_shape.end());
  OSSRL_CHECK(dtype == want_dtype && same_shape, "{}: tensor {} is {} {}, expected {} [{}]", file,
              name, dtype_name(dtype), shape_str(), dtype_name(want_dtype),
              fmt::join(want_shape, ", "));
}

std::unique_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;

  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  OSSRL_CHECK(fd >= 0, "{}: cannot open: {}", path, std::strerror(errno));
  struct stat st;
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    fail("{}: not a regular file", path);
  }
  const uint64_t size = uint64_t(st.st_size);
  if (size < 8) {
    ::close(fd);
    fail("{}: file is {} bytes, too short for a safetensors header (8-byte length first)", path,
         size);
  }
  // The mapping outlives the descriptor; MAP_PRIVATE + PROT_READ so nothing we do can
  // write through to a checkpoint on disk.
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_errno = errno;
  ::close(fd);
  OSSRL_CHECK(map != MAP_FAILED, "{}: mmap failed: {}", path, std::strerror(map_errno));
  f->map_ = map;  // owned by f from here: its destructor unmaps on any failure below
  f->map_size_ = size;
  const uint8_t* base = static_cast<const uint8_t*>(map);

  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | base[i];  // little-endian
  OSSRL_CHECK(header_len <= size - 8,
              "{}: header length {} is larger than the {} bytes after it (truncated or not a "
              "safetensors file)",
              path, header_len, size - 8);
  OSSRL_CHECK(header_len <= kMaxHeaderBytes, "{}: header length {} exceeds the {}-byte limit", path,
              header_len, kMaxHeaderBytes);
  const char* header = reinterpret_cast<const char*>(base + 8);

  // nlohmann keeps the last of two equal keys; a callback sees each top-level key so a
  // name given twice (two tensors claiming one name) is rejected, not silently merged.
  std::set<std::string> seen;
  std::string duplicate;
  json j;
  try {
    j = json::parse(header, header + header_len,
                    [&](int depth, json::parse_event_t event, json& parsed) {
                      if (depth == 1 && event == json::parse_event_t::key &&
                          !seen.insert(parsed.get<std::string>()).second && duplicate.empty()) {
                        duplicate = parsed.get<std::string>();
                      }
                      return true;
                    });
  } catch (const json::exception& e) {
    fail("{}: header is not valid JSON: {}", path, e.what());
  }
  OSSRL_CHECK(j.is_object(), "{}: header is JSON but not an object", path);
  OSSRL_CHECK(duplicate.empty(), "{}: tensor {} appears twice in the header", path, duplicate);

  const uint64_t data_size = size - 8 - header_len;
  const uint8_t* data = base + 8 + header_len;
  std::vector<ParsedEntry> entries;
  for (const auto& [name, value] : j.items()) {
    if (name == "__metadata__") {
      OSSRL_CHECK(value.is_object(), "{}: __metadata__ is not an object", path);
      for (const auto& [key, v] : value.items()) {
        OSSRL_CHECK(v.is_string(), "{}: __metadata__ entry {} is not a string", path, key);
        f->metadata_[key] = v.get<std::string>();
      }
      continue;
    }
    entries.push_back(parse_entry(path, name, value, data_size));
  }

  // Sorted by start, each non-empty tensor must begin at or after the previous one's end;
  // empty tensors own no bytes and cannot overlap anything.
  std::vector<const ParsedEntry*> by_offset;
  for (const ParsedEntry& e : entries) {
    if (e.end > e.begin) by_offset.push_back(&e);
  }
  std::sort(by_offset.begin(), by_offset.end(),
            [](const ParsedEntry* a, const ParsedEntry* b) { return a->begin < b->begin; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const ParsedEntry& prev = *by_offset[i - 1];
    const ParsedEntry& cur = *by_offset[i];
    OSSRL_CHECK(cur.begin >= prev.end,
                "{}: tensors {} [{}, {}] and {} [{}, {}] overlap in the data section", path,
                prev.view.name, prev.begin, prev.end, cur.view.name, cur.begin, cur.end);
  }

  for (ParsedEntry& e : entries) {
    e.view.data = data + e.begin;
    f->tensors_.emplace(e.view.name, std::move(e.view));
  }
  return f;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) ::munmap(map_, map_size_);
}

const TensorView& SafetensorsFile::tensor(const std::string& name) const {
  auto it = tensors_.find(name);
  OSSRL_CHECK(it != tensors_.end(), "tensor {} missing from {}", name, path_);
  return it->second;
}

void SafetensorsWriter::add(const std::string& name, DType dtype, std::vector<int64_t> shape,
                            std::span<const uint8_t> bytes) {
  OSSRL_CHECK(!name.empty() && name != "__metadata__", "safetensors: invalid tensor name \"{}\"",
              name);
  OSSRL_CHECK(!entries_.count(name), "safetensors: tensor {} added twice", name);
  for (int64_t d : shape) OSSRL_CHECK(d >= 0, "safetensors: tensor {}: negative dimension", name);
  uint64_t want = 0;
  OSSRL_CHECK(byte_count(shape, dtype, &want) && want == bytes.size(),
              "safetensors: tensor {}: {} bytes given, shape and dtype {} need {}", name,
              bytes.size(), dtype_name(dtype), want);
  entries_[name] = Entry{dtype, std::move(shape), std::vector<uint8_t>(bytes.begin(), bytes.end())};
}

void SafetensorsWriter::add_f32(const std::string& name, std::vector<int64_t> shape,
                                std::span<const float> values) {
  add(name, DType::F32, std::move(shape),
      {reinterpret_cast<const uint8_t*>(values.data()), values.size_bytes()});
}

void SafetensorsWriter::set_metadata(const std::string& key, const std::string& value) {
  metadata_[key] = value;
}

void SafetensorsWriter::write(const std::string& path) const {
  json header = json::object();
  if (!metadata_.empty()) header["__metadata__"] = metadata_;
  uint64_t offset = 0;
  for (const auto& [name, e] : entries_) {
    header[name] = {{"dtype", dtype_name(e.dtype)},
                    {"shape", e.shape},
                    {"data_offsets", {offset, offset + e.bytes.size()}}};
    offset += e.bytes.size();
  }
  std::string text = header.dump();
  // Trailing spaces are legal JSON whitespace; they make the data section start 8-byte
  // aligned so an mmap'd reader can use F32/F64 tensors in place when offsets allow.
  text.append((8 - (8 + text.size()) % 8) % 8, ' ');

  uint8_t len_bytes[8];
  for (int i = 0; i < 8; ++i) len_bytes[i] = uint8_t(uint64_t(text.size()) >> (8 * i));

  // Temporary file in the target's folder (rename is atomic only within one file system),
  // fsync before rename so a crash leaves either the old file or the complete new one.
  const std::filesystem::path target(path);
  const std::filesystem::path dir =
      target.has_parent_path() ? target.parent_path() : std::filesystem::path(".");
  std::string tmp = (dir / fmt::format(".{}.tmp.XXXXXX", target.filename().string())).string();
  const int fd = ::mkstemp(tmp.data());
  OSSRL_CHECK(fd >= 0, "{}: cannot create temporary file in {}: {}", path, dir.string(),
              std::strerror(errno));
  try {
    OSSRL_CHECK(::fchmod(fd, 0644) == 0, "{}: chmod failed: {}", tmp, std::strerror(errno));
    write_all(fd, len_bytes, 8, tmp);
    write_all(fd, reinterpret_cast<const uint8_t*>(text.data()), text.size(), tmp);
    for (const auto& [name, e] : entries_) write_all(fd, e.bytes.data(), e.bytes.size(), tmp);
    OSSRL_CHECK(::fsync(fd) == 0, "{}: fsync failed: {}", tmp, std::strerror(errno));
  } catch (...) {
    ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  const bool closed = ::close(fd) == 0;
  if (!closed || ::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    fail("{}: cannot {}: {}", path, closed ? "rename temporary file into place" : "close",
         std::strerror(err));
  }
  // Persist the rename itself.
  const int dir_fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd >= 0) {
    ::fsync(dir_fd);
    ::close(dir_fd);
  }
}

}  // namespace ossrl

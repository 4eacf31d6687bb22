#include "io/safetensors.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>

#include "core/error.h"
#include "io_test_util.h"

namespace ossrl {
namespace {

using ::testing::HasSubstr;
using testing::ScratchDir;
using testing::TensorSpec;

uint64_t header_length(const std::string& file_bytes) {
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | uint8_t(file_bytes[size_t(i)]);
  return n;
}

// Every dtype, plus the shapes that trip up offset arithmetic: a scalar (numel 1), empty
// tensors (numel 0, anywhere in the dimension list) and an odd byte count that leaves
// the following tensor unaligned.
TEST(Safetensors, RoundTripsEveryDtypeScalarAndEmpty) {
  ScratchDir dir;
  std::vector<TensorSpec> specs;
  for (DType t : {DType::F64, DType::F32, DType::F16, DType::BF16, DType::I64, DType::I32, DType::I16,
                  DType::I8, DType::U64, DType::U32, DType::U16, DType::U8, DType::BOOL}) {
    specs.push_back({fmt::format("t.{}", dtype_name(t)), t, {3, 5}});
  }
  specs.push_back({"scalar", DType::F32, {}});
  specs.push_back({"empty", DType::BF16, {0}});
  specs.push_back({"empty_middle", DType::F32, {4, 0, 7}});
  specs.push_back({"odd", DType::U8, {7}});
  specs.push_back({"after_odd", DType::F64, {2}});

  SafetensorsWriter w;
  for (const TensorSpec& s : specs) w.add(s.name, s.dtype, s.shape, testing::pattern_bytes(s));
  w.set_metadata("format", "pt");
  const std::string path = dir.file("all.safetensors");
  w.write(path);

  const std::string bytes = testing::read_file(path);
  EXPECT_EQ((8 + header_length(bytes)) % 8, 0u) << "data section must start 8-byte aligned";

  auto f = SafetensorsFile::open(path);
  EXPECT_EQ(f->tensors().size(), specs.size());
  EXPECT_EQ(f->metadata().at("format"), "pt");
  for (const TensorSpec& s : specs) {
    SCOPED_TRACE(s.name);
    const TensorView& v = f->tensor(s.name);
    EXPECT_EQ(v.dtype, s.dtype);
    EXPECT_EQ(v.shape, s.shape);
    EXPECT_EQ(v.file, path);
    const std::vector<uint8_t> want = testing::pattern_bytes(s);
    ASSERT_EQ(v.nbytes, want.size());
    EXPECT_EQ(std::memcmp(v.data, want.data(), want.size()), 0);
    EXPECT_NO_THROW(v.expect(s.dtype, s.shape));
  }
  EXPECT_EQ(f->tensor("scalar").numel(), 1);
  EXPECT_EQ(f->tensor("empty_middle").numel(), 0);
  EXPECT_EQ(f->tensor("empty_middle").shape_str(), "[4, 0, 7]");
  EXPECT_EQ(f->tensor("scalar").shape_str(), "[]");
}

TEST(Safetensors, EmptyFileOfTensorsRoundTrips) {
  ScratchDir dir;
  SafetensorsWriter().write(dir.file("none.safetensors"));
  auto f = SafetensorsFile::open(dir.file("none.safetensors"));
  EXPECT_TRUE(f->tensors().empty());
  EXPECT_TRUE(f->metadata().empty());
}

// The write is atomic: the target is replaced in one rename and no temporary is left.
TEST(Safetensors, WriteReplacesAtomicallyAndLeavesNoTemporary) {
  ScratchDir dir;
  const std::string path = dir.file("w.safetensors");
  const std::vector<float> a = {1, 2, 3}, b = {4, 5};
  SafetensorsWriter first;
  first.add_f32("x", {3}, a);
  first.write(path);
  SafetensorsWriter second;
  second.add_f32("x", {2}, b);
  second.write(path);

  auto f = SafetensorsFile::open(path);
  const TensorView& x = f->tensor("x");
  ASSERT_EQ(x.shape, (std::vector<int64_t>{2}));
  float got[2];
  std::memcpy(got, x.data, sizeof got);
  EXPECT_EQ(got[0], 4.0f);
  EXPECT_EQ(got[1], 5.0f);
  size_t entries = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(dir.path())) ++entries;
  EXPECT_EQ(entries, 1u);
}

TEST(Safetensors, WriterRejectsBadInput) {
  SafetensorsWriter w;
  const std::vector<uint8_t> six(6);
  EXPECT_THROW(w.add("x", DType::F32, {2}, six), Error);  // 6 bytes for 8
  EXPECT_THROW(w.add("x", DType::U8, {-1}, {}), Error);
  EXPECT_THROW(w.add("__metadata__", DType::U8, {6}, six), Error);
  w.add("x", DType::U8, {6}, six);
  try {
    w.add("x", DType::U8, {6}, six);
    FAIL() << "duplicate name accepted";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("x added twice"));
  }
  EXPECT_THROW(w.write("/nonexistent-folder/x.safetensors"), Error);
}

TEST(Safetensors, ExpectNamesFileTensorAndBothShapes) {
  ScratchDir dir;
  SafetensorsWriter w;
  const std::vector<float> v(6);
  w.add_f32("w", {2, 3}, v);
  w.write(dir.file("e.safetensors"));
  auto f = SafetensorsFile::open(dir.file("e.safetensors"));
  const std::vector<int64_t> want = {3, 2};
  try {
    f->tensor("w").expect(DType::F32, want);
    FAIL() << "wrong shape accepted";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("e.safetensors"));
    EXPECT_THAT(e.what(), HasSubstr("tensor w is F32 [2, 3], expected F32 [3, 2]"));
  }
  EXPECT_THROW(f->tensor("w").expect(DType::BF16, std::vector<int64_t>{2, 3}), Error);
  try {
    f->tensor("absent");
    FAIL();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("tensor absent missing from"));
    EXPECT_THAT(e.what(), HasSubstr("e.safetensors"));
  }
}

// Files written by other tools: a header without padding, tensors out of name order,
// gaps between tensors, and a data section that does not start aligned all read fine.
TEST(Safetensors, ReadsForeignLayouts) {
  ScratchDir dir;
  const std::string header =
      R"({"b":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},)"
      R"("a":{"dtype":"I16","shape":[1],"data_offsets":[4,6]}})";
  testing::write_file(dir.path() / "f.safetensors",
                      testing::raw_safetensors(header, std::string("\x01\x02\xff\xff\x34\x12", 6)));
  auto f = SafetensorsFile::open(dir.file("f.safetensors"));
  int16_t a;
  std::memcpy(&a, f->tensor("a").data, 2);
  EXPECT_EQ(a, 0x1234);
  EXPECT_EQ(f->tensor("b").data[1], 2);
}

}  // namespace
}  // namespace ossrl

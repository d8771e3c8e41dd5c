// Tests of services/model/safetensors: files written by SafetensorsWriter read back through
// Checkpoint (single file and shards, lazily opened), and malformed files built byte by byte,
// each of which must give a clean error naming the file (and the tensor, where there is one).
#include "services/model/safetensors.h"

#include <unistd.h>

#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace moemesh {
namespace {

using ::moemesh::testing::RawSafetensors;
using ::moemesh::testing::RawSafetensorsWithLength;
using ::moemesh::testing::ReadFileOrDie;
using ::moemesh::testing::TempDir;
using ::moemesh::testing::WriteFileOrDie;
using ::testing::ElementsAre;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;

// Status messages as std::string, so that gMock prints them readably on failure.
std::string Msg(const absl::Status& s) { return std::string(s.message()); }

std::vector<float> Values(const Tensor& t) {
  return std::vector<float>(t.span().begin(), t.span().end());
}

// Expected F32 values of `v` after a round trip through `dtype`, computed with the scalar
// conversions (which tensor_test checks against hand-worked bit patterns).
std::vector<float> ThroughDType(DType dtype, const std::vector<float>& v) {
  std::vector<float> out;
  for (float x : v) {
    switch (dtype) {
      case DType::kF32:
        out.push_back(x);
        break;
      case DType::kF16:
        out.push_back(HalfToFloat(FloatToHalf(x)));
        break;
      case DType::kBF16:
        out.push_back(BF16ToFloat(FloatToBF16(x)));
        break;
      case DType::kF8E4M3:
        out.push_back(F8E4M3ToFloat(FloatToF8E4M3(x)));
        break;
    }
  }
  return out;
}

const std::vector<float> kA = {1.0f, -2.5f, 3.25f, 0.1f, 1e-3f, 7.0f};  // [2, 3] F32
const std::vector<float> kB = {0.5f, -0.333f, 65504.0f, 1e-7f};         // [4] F16
const std::vector<float> kC = {1.0f, 3.14159f, -1e20f, 0.0f};           // [2, 2] BF16

SafetensorsWriter ThreeTensors() {
  SafetensorsWriter w;
  w.Add("a", DType::kF32, {2, 3}, kA);
  w.Add("b", DType::kF16, {4}, kB);
  w.Add("c.weight", DType::kBF16, {2, 2}, kC);
  return w;
}

// ---- valid files -------------------------------------------------------------------------

TEST(SafetensorsTest, SingleFileRoundTrip) {
  TempDir dir;
  SafetensorsWriter w = ThreeTensors();
  EXPECT_EQ(w.size(), 3u);
  EXPECT_EQ(w.total_bytes(), 6u * 4 + 4u * 2 + 4u * 2);
  ASSERT_TRUE(w.Write(dir.Join("model.safetensors")).ok());

  // The header is padded so that the data section starts 8-byte aligned, as HF does.
  const std::string raw = ReadFileOrDie(dir.Join("model.safetensors"));
  ASSERT_GE(raw.size(), 8u);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | static_cast<uint8_t>(raw[i]);
  EXPECT_EQ((8 + header_len) % 8, 0u);
  EXPECT_EQ(raw.size(), 8 + header_len + w.total_bytes());

  absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(dir.path());
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_THAT((*ckpt)->TensorNames(), ElementsAre("a", "b", "c.weight"));
  EXPECT_TRUE((*ckpt)->Has("a"));
  EXPECT_FALSE((*ckpt)->Has("__metadata__"));
  EXPECT_FALSE((*ckpt)->Has("d"));

  absl::StatusOr<TensorInfo> info = (*ckpt)->Info("b");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->dtype, DType::kF16);
  EXPECT_THAT(info->shape, ElementsAre(4));
  EXPECT_EQ(info->end - info->begin, 8u);

  absl::StatusOr<Tensor> a = (*ckpt)->LoadF32("a");
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_THAT(a->shape(), ElementsAre(2, 3));
  EXPECT_EQ(Values(*a), kA);

  absl::StatusOr<Tensor> b = (*ckpt)->LoadF32("b", std::vector<int64_t>{4});
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(Values(*b), ThroughDType(DType::kF16, kB));
  EXPECT_EQ(b->data()[2], 65504.0f);
  EXPECT_NE(b->data()[1], kB[1]);  // -0.333 is not a half: really converted

  absl::StatusOr<Tensor> c = (*ckpt)->LoadF32("c.weight", std::vector<int64_t>{2, 2});
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(Values(*c), ThroughDType(DType::kBF16, kC));
  EXPECT_EQ(c->data()[0], 1.0f);
  EXPECT_NEAR(c->data()[1], 3.14159f, 0.01f);
}

TEST(SafetensorsTest, LoadedTensorOutlivesCheckpoint) {
  TempDir dir;
  ASSERT_TRUE(ThreeTensors().Write(dir.Join("model.safetensors")).ok());
  Tensor a;
  {
    auto ckpt = Checkpoint::Open(dir.path());
    ASSERT_TRUE(ckpt.ok()) << ckpt.status();
    auto t = (*ckpt)->LoadF32("a");
    ASSERT_TRUE(t.ok()) << t.status();
    a = *t;
  }
  // The mapping is owned by the tensor (F32 loads are views into it), so this stays valid.
  EXPECT_EQ(Values(a), kA);
}

TEST(SafetensorsTest, FileLevelAccessors) {
  TempDir dir;
  const std::string path = dir.Join("x.safetensors");
  ASSERT_TRUE(ThreeTensors().Write(path).ok());
  auto f = SafetensorsFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->path(), path);
  EXPECT_THAT((*f)->Names(), ElementsAre("a", "b", "c.weight"));
  EXPECT_EQ((*f)->Find("nope"), nullptr);
  const TensorInfo* c = (*f)->Find("c.weight");
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(c->numel(), 4);
  absl::Span<const uint8_t> bytes = (*f)->Bytes(*c);
  ASSERT_EQ(bytes.size(), 8u);
  // BF16 of 1.0 is 0x3F80, stored little-endian.
  EXPECT_EQ(bytes[0], 0x80);
  EXPECT_EQ(bytes[1], 0x3F);
}

TEST(SafetensorsTest, ScalarAndEmptyTensors) {
  TempDir dir;
  SafetensorsWriter w;
  w.Add("scalar", DType::kF32, {}, std::vector<float>{42.0f});
  w.Add("empty", DType::kF16, {0, 3}, std::vector<float>{});
  w.Add("after", DType::kF32, {1}, std::vector<float>{-1.0f});
  ASSERT_TRUE(w.Write(dir.Join("model.safetensors")).ok());
  auto ckpt = Checkpoint::Open(dir.path());
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  auto s = (*ckpt)->LoadF32("scalar");
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->rank(), 0);
  EXPECT_EQ(s->numel(), 1);
  EXPECT_EQ(s->data()[0], 42.0f);
  auto e = (*ckpt)->LoadF32("empty", std::vector<int64_t>{0, 3});
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->numel(), 0);
  auto after = (*ckpt)->LoadF32("after");
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_EQ(after->data()[0], -1.0f);
}

TEST(SafetensorsTest, UnalignedF32DataIsCopied) {
  // A hand-made file whose data section starts at an odd offset (no header padding): F32
  // values cannot be viewed in place and must still load correctly.
  const std::string header = R"({"u":{"dtype":"F32","shape":[3],"data_offsets":[0,12]}})";
  ASSERT_NE((8 + header.size()) % 4, 0u) << "the test needs an unaligned data section";
  const float vals[3] = {1.5f, -2.0f, 1e-3f};
  TempDir dir;
  WriteFileOrDie(
      dir.Join("model.safetensors"),
      RawSafetensors(header, absl::string_view(reinterpret_cast<const char*>(vals), 12)));
  auto ckpt = Checkpoint::Open(dir.path());
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  auto t = (*ckpt)->LoadF32("u", std::vector<int64_t>{3});
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_THAT(Values(*t), ElementsAre(1.5f, -2.0f, 1e-3f));
}

TEST(SafetensorsTest, ShardedIsOpenedLazily) {
  TempDir dir;
  SafetensorsWriter w;
  // F32 (48 bytes) and BF16 (24 bytes) tensors alternate; no two neighbours fit in 64 bytes,
  // so each tensor gets its own shard.
  std::vector<std::vector<float>> vals;
  for (int i = 0; i < 5; ++i) {
    vals.push_back(moemesh::testing::RandomFloats(12, 100 + i));
    w.Add(absl::StrCat("t", i), i % 2 == 0 ? DType::kF32 : DType::kBF16, {3, 4}, vals.back());
  }
  ASSERT_TRUE(w.WriteSharded(dir.path(), 64).ok());
  // The files are there under HF's names.
  const std::string index = ReadFileOrDie(dir.Join("model.safetensors.index.json"));
  EXPECT_THAT(index, HasSubstr("model-00001-of-00005.safetensors"));
  EXPECT_THAT(index, HasSubstr("model-00005-of-00005.safetensors"));
  EXPECT_THAT(index, HasSubstr("weight_map"));

  auto ckpt = Checkpoint::Open(dir.path());
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_EQ((*ckpt)->OpenedFiles(), 0) << "opening an index must not map any shard";
  EXPECT_THAT((*ckpt)->TensorNames(), ElementsAre("t0", "t1", "t2", "t3", "t4"));

  auto t3 = (*ckpt)->LoadF32("t3", std::vector<int64_t>{3, 4});
  ASSERT_TRUE(t3.ok()) << t3.status();
  EXPECT_EQ(Values(*t3), ThroughDType(DType::kBF16, vals[3]));
  EXPECT_EQ((*ckpt)->OpenedFiles(), 1);
  ASSERT_TRUE((*ckpt)->LoadF32("t3").ok());
  EXPECT_EQ((*ckpt)->OpenedFiles(), 1) << "a second load of the same shard must reuse it";

  auto t0 = (*ckpt)->LoadF32("t0");
  ASSERT_TRUE(t0.ok()) << t0.status();
  EXPECT_EQ(Values(*t0), vals[0]);
  EXPECT_EQ((*ckpt)->OpenedFiles(), 2);
  auto info = (*ckpt)->Info("t4");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->dtype, DType::kF32);
  EXPECT_EQ((*ckpt)->OpenedFiles(), 3);
}

TEST(SafetensorsTest, ShardsGroupSeveralTensors) {
  TempDir dir;
  SafetensorsWriter w;
  for (int i = 0; i < 6; ++i)
    w.Add(absl::StrCat("t", i), DType::kF32, {4}, std::vector<float>(4, i));
  ASSERT_TRUE(w.WriteSharded(dir.path(), 40).ok());  // 16-byte tensors, two per shard
  const std::string index = ReadFileOrDie(dir.Join("model.safetensors.index.json"));
  EXPECT_THAT(index, HasSubstr("model-00003-of-00003.safetensors"));
  EXPECT_THAT(index, ::testing::Not(HasSubstr("of-00004")));
  auto ckpt = Checkpoint::Open(dir.path());
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  ASSERT_TRUE((*ckpt)->LoadF32("t0").ok());
  ASSERT_TRUE((*ckpt)->LoadF32("t1").ok());
  EXPECT_EQ((*ckpt)->OpenedFiles(), 1);
  for (int i = 0; i < 6; ++i) {
    auto t = (*ckpt)->LoadF32(absl::StrCat("t", i));
    ASSERT_TRUE(t.ok()) << t.status();
    EXPECT_THAT(Values(*t), ::testing::Each(static_cast<float>(i)));
  }
  EXPECT_EQ((*ckpt)->OpenedFiles(), 3);
}

TEST(SafetensorsTest, OneShardIsWrittenAsSingleFile) {
  TempDir dir;
  ASSERT_TRUE(ThreeTensors().WriteSharded(dir.path(), 1 << 20).ok());
  EXPECT_EQ(::access(dir.Join("model.safetensors.index.json").c_str(), F_OK), -1);
  auto ckpt = Checkpoint::Open(dir.path());
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_EQ((*ckpt)->TensorNames().size(), 3u);
  auto a = (*ckpt)->LoadF32("a");
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(Values(*a), kA);
}

// ---- malformed files ------------------------------------------------------------------------

// Writes `bytes` as dir/model.safetensors and expects both SafetensorsFile::Open and
// Checkpoint::Open to fail with INVALID_ARGUMENT naming the file and every string in `needles`.
void ExpectBadFile(const std::string& bytes, std::vector<std::string> needles) {
  TempDir dir;
  const std::string path = dir.Join("model.safetensors");
  WriteFileOrDie(path, bytes);
  needles.push_back(path);
  absl::StatusOr<std::shared_ptr<SafetensorsFile>> f = SafetensorsFile::Open(path);
  ASSERT_FALSE(f.ok()) << "opened a malformed file";
  EXPECT_EQ(f.status().code(), absl::StatusCode::kInvalidArgument) << f.status();
  for (const std::string& n : needles) EXPECT_THAT(Msg(f.status()), HasSubstr(n));
  absl::StatusOr<std::unique_ptr<Checkpoint>> c = Checkpoint::Open(dir.path());
  ASSERT_FALSE(c.ok()) << "opened a checkpoint with a malformed file";
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << c.status();
  for (const std::string& n : needles) EXPECT_THAT(Msg(c.status()), HasSubstr(n));
}

std::string F32Bytes(int n) { return std::string(4 * n, '\0'); }

TEST(MalformedSafetensorsTest, ShorterThanEightBytes) {
  ExpectBadFile("", {});
  ExpectBadFile("abc", {});
  ExpectBadFile(std::string(7, '\0'), {});
}

TEST(MalformedSafetensorsTest, HeaderLengthLargerThanFile) {
  const std::string header = R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})";
  ExpectBadFile(RawSafetensorsWithLength(header.size() + 5, header, F32Bytes(1)), {});
  ExpectBadFile(RawSafetensorsWithLength(1000, "{}", ""), {});
  ExpectBadFile(RawSafetensorsWithLength(~0ull, "{}", ""), {});  // would overflow 8 + len
}

TEST(MalformedSafetensorsTest, HeaderLengthOverLimit) {
  ExpectBadFile(RawSafetensorsWithLength(kMaxSafetensorsHeaderBytes + 1, "{}", ""), {"limit"});
}

TEST(MalformedSafetensorsTest, HeaderNotJson) {
  ExpectBadFile(RawSafetensors("{not json", ""), {"JSON"});
  ExpectBadFile(RawSafetensors("", ""), {});
  ExpectBadFile(RawSafetensors(std::string("{\"a\"\0\xff}", 6), ""), {});
  ExpectBadFile(RawSafetensors("[1, 2]", ""), {});
  ExpectBadFile(RawSafetensors(R"({"x": 5})", ""), {"'x'"});
}

TEST(MalformedSafetensorsTest, UnknownDType) {
  ExpectBadFile(RawSafetensors(R"({"w1":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}})",
                               std::string(8, '\0')),
                {"w1", "F64"});
  ExpectBadFile(RawSafetensors(R"({"q":{"dtype":"Q4","shape":[2],"data_offsets":[0,1]}})",
                               std::string(1, '\0')),
                {"'q'", "Q4"});
  ExpectBadFile(
      RawSafetensors(R"({"n":{"dtype":7,"shape":[1],"data_offsets":[0,4]}})", F32Bytes(1)),
      {"'n'"});
}

TEST(MalformedSafetensorsTest, MissingFields) {
  ExpectBadFile(RawSafetensors(R"({"m":{"shape":[1],"data_offsets":[0,4]}})", F32Bytes(1)),
                {"'m'"});
  ExpectBadFile(RawSafetensors(R"({"m":{"dtype":"F32","data_offsets":[0,4]}})", F32Bytes(1)),
                {"'m'"});
  ExpectBadFile(RawSafetensors(R"({"m":{"dtype":"F32","shape":[1]}})", F32Bytes(1)), {"'m'"});
  ExpectBadFile(
      RawSafetensors(R"({"m":{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}})", F32Bytes(2)),
      {"'m'"});
}

TEST(MalformedSafetensorsTest, OffsetsBeyondDataSection) {
  // A truncated file: the header promises 16 bytes, 8 are there.
  ExpectBadFile(
      RawSafetensors(R"({"emb":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}})", F32Bytes(2)),
      {"'emb'", "truncated"});
  // The second tensor starts past the end.
  ExpectBadFile(RawSafetensors(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                               R"("b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
                               F32Bytes(1)),
                {"'b'"});
}

TEST(MalformedSafetensorsTest, HeaderLiesAboutSize) {
  // [2, 2] F32 is 16 bytes; the offsets span 12.
  ExpectBadFile(
      RawSafetensors(R"({"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}})", F32Bytes(4)),
      {"'w'", "12", "16"});
  // Right byte count for F32, wrong for F16.
  ExpectBadFile(
      RawSafetensors(R"({"h":{"dtype":"F16","shape":[4],"data_offsets":[0,16]}})", F32Bytes(4)),
      {"'h'"});
}

TEST(MalformedSafetensorsTest, NegativeOrReversedOffsets) {
  ExpectBadFile(
      RawSafetensors(R"({"neg":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}})", F32Bytes(1)),
      {"'neg'"});
  ExpectBadFile(
      RawSafetensors(R"({"rev":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}})", F32Bytes(3)),
      {"'rev'"});
  ExpectBadFile(
      RawSafetensors(R"({"flt":{"dtype":"F32","shape":[1],"data_offsets":[0.5,4]}})", F32Bytes(1)),
      {"'flt'"});
  // A huge offset that wraps to negative as int64.
  ExpectBadFile(
      RawSafetensors(
          R"({"big":{"dtype":"F32","shape":[1],"data_offsets":[18446744073709551612,0]}})",
          F32Bytes(1)),
      {"'big'"});
}

TEST(MalformedSafetensorsTest, BadShapes) {
  ExpectBadFile(
      RawSafetensors(R"({"s":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", F32Bytes(1)),
      {"'s'"});
  ExpectBadFile(
      RawSafetensors(R"({"s":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}})", F32Bytes(1)),
      {"'s'"});
  ExpectBadFile(
      RawSafetensors(R"({"s":{"dtype":"F32","shape":"1","data_offsets":[0,4]}})", F32Bytes(1)),
      {"'s'"});
  // numel * 4 overflows 64 bits; must not wrap around to a small, "valid" size.
  ExpectBadFile(
      RawSafetensors(
          R"({"o":{"dtype":"F32","shape":[4294967296,4294967296,1],"data_offsets":[0,0]}})", ""),
      {"'o'"});
  ExpectBadFile(
      RawSafetensors(R"({"o":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,0]}})",
                     ""),
      {"'o'"});
}

// Every truncation of a valid file is rejected (the data section is fully used), and no
// single-byte corruption of the header crashes the parser.
TEST(MalformedSafetensorsTest, TruncationsAndCorruptionsNeverCrash) {
  TempDir dir;
  const std::string good_path = dir.Join("good.safetensors");
  ASSERT_TRUE(ThreeTensors().Write(good_path).ok());
  const std::string good = ReadFileOrDie(good_path);
  const std::string path = dir.Join("bad.safetensors");
  for (size_t n = 0; n < good.size(); ++n) {
    WriteFileOrDie(path, good.substr(0, n));
    auto f = SafetensorsFile::Open(path);
    EXPECT_FALSE(f.ok()) << "truncated to " << n << " of " << good.size() << " bytes";
  }
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | static_cast<uint8_t>(good[i]);
  int rejected = 0;
  for (size_t i = 0; i < 8 + header_len; ++i) {
    for (char c : {'\0', '9', '-', '"', '\xff'}) {
      std::string bad = good;
      if (bad[i] == c) continue;
      bad[i] = c;
      WriteFileOrDie(path, bad);
      auto f = SafetensorsFile::Open(path);
      if (!f.ok()) {
        ++rejected;
        EXPECT_THAT(Msg(f.status()), HasSubstr(path));
        continue;
      }
      // Whatever survives must still describe byte ranges inside the file.
      for (const std::string& name : (*f)->Names()) {
        const TensorInfo* info = (*f)->Find(name);
        ASSERT_NE(info, nullptr);
        EXPECT_LE(info->end, good.size() - 8 - header_len);
        EXPECT_EQ(info->end - info->begin, info->numel() * DTypeSize(info->dtype));
      }
    }
  }
  EXPECT_GT(rejected, 0);
}

// ---- checkpoint-level errors ----------------------------------------------------------------

TEST(CheckpointErrorTest, MissingTensorName) {
  TempDir dir;
  ASSERT_TRUE(ThreeTensors().Write(dir.Join("model.safetensors")).ok());
  auto ckpt = Checkpoint::Open(dir.path());
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  absl::StatusOr<Tensor> t = (*ckpt)->LoadF32("model.layers.0.missing.weight");
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(Msg(t.status()), HasSubstr("model.layers.0.missing.weight"));
  EXPECT_THAT(Msg(t.status()), HasSubstr(dir.path()));
  absl::StatusOr<TensorInfo> info = (*ckpt)->Info("nope");
  ASSERT_FALSE(info.ok());
  EXPECT_THAT(Msg(info.status()), HasSubstr("nope"));
  // The same with an expected shape.
  t = (*ckpt)->LoadF32("nope", std::vector<int64_t>{1});
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(Msg(t.status()), HasSubstr("nope"));
}

TEST(CheckpointErrorTest, ShapeMismatch) {
  TempDir dir;
  ASSERT_TRUE(ThreeTensors().Write(dir.Join("model.safetensors")).ok());
  auto ckpt = Checkpoint::Open(dir.path());
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  for (std::vector<int64_t> wrong : {std::vector<int64_t>{3, 2}, std::vector<int64_t>{6},
                                     std::vector<int64_t>{2, 3, 1}, std::vector<int64_t>{}}) {
    absl::StatusOr<Tensor> t = (*ckpt)->LoadF32("a", wrong);
    ASSERT_FALSE(t.ok()) << ShapeToString(wrong);
    EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(Msg(t.status()), HasSubstr("'a'"));
    EXPECT_THAT(Msg(t.status()), HasSubstr("[2, 3]"));
    EXPECT_THAT(Msg(t.status()), HasSubstr(ShapeToString(wrong)));
    EXPECT_THAT(Msg(t.status()), HasSubstr(dir.path()));
  }
}

TEST(CheckpointErrorTest, EmptyDirectory) {
  TempDir dir;
  auto ckpt = Checkpoint::Open(dir.path());
  ASSERT_FALSE(ckpt.ok());
  EXPECT_EQ(ckpt.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(Msg(ckpt.status()), HasSubstr(dir.path()));
}

// A sharded checkpoint of t0..t3, one per shard.
void WriteFourShards(const TempDir& dir) {
  SafetensorsWriter w;
  for (int i = 0; i < 4; ++i)
    w.Add(absl::StrCat("t", i), DType::kF32, {4}, std::vector<float>(4, i));
  ASSERT_TRUE(w.WriteSharded(dir.path(), 16).ok());
}

TEST(CheckpointErrorTest, IndexPointsToMissingShard) {
  TempDir dir;
  WriteFourShards(dir);
  const std::string shard = dir.Join("model-00003-of-00004.safetensors");
  ASSERT_EQ(::unlink(shard.c_str()), 0);
  auto ckpt = Checkpoint::Open(dir.path());
  ASSERT_TRUE(ckpt.ok()) << "shards are opened lazily: " << ckpt.status();
  ASSERT_TRUE((*ckpt)->LoadF32("t1").ok());
  absl::StatusOr<Tensor> t = (*ckpt)->LoadF32("t2");
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), absl::StatusCode::kNotFound) << t.status();
  EXPECT_THAT(Msg(t.status()), HasSubstr(shard));
  EXPECT_THAT(Msg(t.status()), HasSubstr("t2"));
  absl::StatusOr<TensorInfo> info = (*ckpt)->Info("t2");
  ASSERT_FALSE(info.ok());
  EXPECT_THAT(Msg(info.status()), HasSubstr(shard));
  // The failure is not cached as success, and other shards still work.
  EXPECT_FALSE((*ckpt)->LoadF32("t2").ok());
  EXPECT_TRUE((*ckpt)->LoadF32("t3").ok());
}

TEST(CheckpointErrorTest, CorruptShardNamesShardAndTensor) {
  TempDir dir;
  WriteFourShards(dir);
  const std::string shard = dir.Join("model-00002-of-00004.safetensors");
  std::string bytes = ReadFileOrDie(shard);
  WriteFileOrDie(shard, bytes.substr(0, bytes.size() - 2));  // truncate the data section
  auto ckpt = Checkpoint::Open(dir.path());
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  absl::StatusOr<Tensor> t = (*ckpt)->LoadF32("t1");
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument) << t.status();
  EXPECT_THAT(Msg(t.status()), HasSubstr(shard));
  EXPECT_THAT(Msg(t.status()), HasSubstr("t1"));
}

TEST(CheckpointErrorTest, IndexListsTensorMissingFromShard) {
  TempDir dir;
  WriteFourShards(dir);
  WriteFileOrDie(dir.Join("model.safetensors.index.json"),
                 R"({"weight_map": {"t0": "model-00001-of-00004.safetensors",
                                    "ghost": "model-00001-of-00004.safetensors"}})");
  auto ckpt = Checkpoint::Open(dir.path());
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_TRUE((*ckpt)->Has("ghost"));
  absl::StatusOr<Tensor> t = (*ckpt)->LoadF32("ghost");
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(Msg(t.status()), HasSubstr("ghost"));
  EXPECT_THAT(Msg(t.status()), HasSubstr(dir.Join("model-00001-of-00004.safetensors")));
  EXPECT_FALSE((*ckpt)->LoadF32("ghost", std::vector<int64_t>{4}).ok());
  EXPECT_FALSE((*ckpt)->Info("ghost").ok());
}

TEST(CheckpointErrorTest, ShardNameThatIsADirectory) {
  for (const char* name : {"", "."}) {
    TempDir dir;
    WriteFileOrDie(dir.Join("model.safetensors.index.json"),
                   absl::StrCat(R"({"weight_map": {"t0": ")", name, R"("}})"));
    auto ckpt = Checkpoint::Open(dir.path());
    if (!ckpt.ok()) continue;  // rejecting it up front is fine too
    absl::StatusOr<Tensor> t = (*ckpt)->LoadF32("t0");
    EXPECT_FALSE(t.ok()) << "loaded a tensor from directory '" << name << "'";
    if (!t.ok()) {
      EXPECT_THAT(Msg(t.status()), HasSubstr(dir.path()));
    }
  }
}

TEST(CheckpointErrorTest, BadIndexFiles) {
  struct Case {
    const char* text;
    const char* needle;
  };
  for (const Case& c :
       {Case{"{not json", "JSON"}, Case{"[]", "weight_map"},
        Case{R"({"weight_map": 3})", "weight_map"}, Case{R"({"weight_map": {"t0": 5}})", "t0"},
        Case{R"({"weight_map": {"t0": "../escape.safetensors"}})", "escape"},
        Case{R"({"weight_map": {"t0": ".."}})", ".."}}) {
    TempDir dir;
    const std::string index = dir.Join("model.safetensors.index.json");
    WriteFileOrDie(index, c.text);
    auto ckpt = Checkpoint::Open(dir.path());
    ASSERT_FALSE(ckpt.ok()) << c.text;
    EXPECT_EQ(ckpt.status().code(), absl::StatusCode::kInvalidArgument) << ckpt.status();
    EXPECT_THAT(Msg(ckpt.status()), HasSubstr(index)) << c.text;
    EXPECT_THAT(Msg(ckpt.status()), HasSubstr(c.needle)) << c.text;
  }
}

}  // namespace
}  // namespace moemesh

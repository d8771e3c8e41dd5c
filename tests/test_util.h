// Helpers shared by moemesh's tests: temporary directories, raw files and small models.
//
//   moemesh::testing::TempDir dir;                  // removed with everything in it at scope end
//   WriteFileOrDie(dir.path() + "/x.bin", bytes);
//   std::string model = MakeSmallModel(dir, "m");   // a generated 2-layer Mixtral
//
// Everything here aborts the test binary (with a message) on I/O failure: a test cannot make
// sense of a half-built fixture, and these never run on request data.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "services/model/generator.h"

namespace moemesh::testing {

// A fresh directory under $TEST_TMPDIR or /tmp (made with mkdtemp); removed recursively when
// the object is destroyed.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::string& path() const { return path_; }
  // path() + "/" + name.
  std::string Join(absl::string_view name) const;

 private:
  std::string path_;
};

// Writes `bytes` to `path`, replacing it.
void WriteFileOrDie(const std::string& path, absl::string_view bytes);
std::string ReadFileOrDie(const std::string& path);

// A safetensors file as raw bytes: the 8-byte little-endian header length, the header text
// exactly as given (no padding) and the data bytes. For building malformed files.
std::string RawSafetensors(absl::string_view header, absl::string_view data);
// The same with an explicit (possibly lying) header length.
std::string RawSafetensorsWithLength(uint64_t header_len, absl::string_view header,
                                     absl::string_view data);

// Generates a model with `options` into a new subdirectory `name` of `dir`; returns its path.
std::string MakeModel(const TempDir& dir, absl::string_view name, const GeneratorOptions& options);
// The default small test model: SmallMixtralConfig(), F32, seed 7, one file.
std::string MakeSmallModel(const TempDir& dir, absl::string_view name = "model");

// Deterministic pseudo-random floats, uniform in [-scale, scale).
std::vector<float> RandomFloats(size_t n, uint64_t seed, float scale = 1.0f);

// Largest |a[i] - b[i]| over n values; infinity if any difference is NaN.
double MaxAbsDiff(const float* a, const float* b, size_t n);

// Protobuf wire-format pieces appended to `out`, for building messages by hand (non-canonical
// or malformed encodings): a varint, a field's tag (wire type 0 varint, 1 fixed64,
// 2 length-delimited, 3/4 group start/end, 5 fixed32), and a length-delimited field.
void AppendVarint(uint64_t v, std::string* out);
void AppendTag(int field, int wire_type, std::string* out);
void AppendBytesField(int field, absl::string_view bytes, std::string* out);

}  // namespace moemesh::testing

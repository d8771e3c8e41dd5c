// Safetensors files and Hugging Face checkpoint directories.
//
// SafetensorsFile maps one .safetensors file read-only and validates its header completely
// at open: header length within the file and at most 100 MiB, valid JSON, known dtypes,
// non-negative shapes, offsets inside the data section, and byte ranges that match
// shape × dtype exactly. After Open succeeds no accessor can read outside the mapping.
//
// Checkpoint is a model directory (config.json plus model.safetensors, or shards listed in
// model.safetensors.index.json). Shards are opened lazily on the first request for one of
// their tensors, so a process that needs a few tensors maps only the files holding them and
// the OS pages in only the bytes it touches. Thread-safe.
//
// SafetensorsWriter builds files for the model generator and tests.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "services/tensor/tensor.h"
#include "services/tensor/weight.h"

namespace moemesh {

inline constexpr uint64_t kMaxSafetensorsHeaderBytes = 100ull << 20;

struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // offsets relative to the data section
  uint64_t end = 0;
  int64_t numel() const;
};

class SafetensorsFile {
 public:
  [[nodiscard]] static absl::StatusOr<std::shared_ptr<SafetensorsFile>> Open(
      const std::string& path);
  ~SafetensorsFile();

  const std::string& path() const { return path_; }
  const TensorInfo* Find(absl::string_view name) const;
  std::vector<std::string> Names() const;
  // The raw bytes of a tensor; valid while this file is alive.
  absl::Span<const uint8_t> Bytes(const TensorInfo& info) const;

 private:
  SafetensorsFile() = default;
  std::string path_;
  const uint8_t* map_ = nullptr;
  size_t map_size_ = 0;
  const uint8_t* data_ = nullptr;  // start of the data section
  absl::flat_hash_map<std::string, TensorInfo> tensors_;
};

class Checkpoint {
 public:
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<Checkpoint>> Open(const std::string& dir);

  const std::string& dir() const { return dir_; }
  std::string config_path() const { return dir_ + "/config.json"; }
  bool Has(absl::string_view name) const { return file_of_.contains(name); }
  std::vector<std::string> TensorNames() const;
  // Header facts of a tensor (opens its shard if needed).
  [[nodiscard]] absl::StatusOr<TensorInfo> Info(const std::string& name) const;
  // The tensor as F32. Aligned F32 tensors are zero-copy views into the mapping; other dtypes
  // are converted into an owned buffer. With `expected_shape`, a different shape is an error.
  // An F8_E4M3 tensor "X" is dequantised with its block scales "X_scale_inv" (see fp8.h);
  // INVALID_ARGUMENT when that tensor is missing, has the wrong shape, or X is not 2-D.
  [[nodiscard]] absl::StatusOr<Tensor> LoadF32(const std::string& name) const;
  [[nodiscard]] absl::StatusOr<Tensor> LoadF32(const std::string& name,
                                               absl::Span<const int64_t> expected_shape) const;
  // A 2-D weight in its stored dtype (see weight.h), or converted to weights_dtype() when that
  // is set. F32, F16 and BF16 weights are zero-copy views into the mapping when aligned, so a
  // process's resident memory is about the bytes of the weights it touches. F8_E4M3 weights
  // keep their bytes and their block scales "X_scale_inv" (INVALID_ARGUMENT when missing or of
  // the wrong shape). A different shape than `expected_shape` is INVALID_ARGUMENT.
  [[nodiscard]] absl::StatusOr<Weight> LoadWeight(const std::string& name,
                                                  absl::Span<const int64_t> expected_shape) const;
  // Converts every weight LoadWeight returns to `dtype` (F32, F16 or BF16); nullopt keeps
  // each in its checkpoint dtype. Call before loading; not synchronised with LoadWeight.
  void set_weights_dtype(std::optional<DType> dtype) { weights_dtype_ = dtype; }
  std::optional<DType> weights_dtype() const { return weights_dtype_; }
  // Number of shard files this checkpoint has mapped so far.
  int OpenedFiles() const;
  // The [rows, cols] block of FP8 scales (config.json quantization_config.weight_block_size),
  // 128x128 unless set. Call before loading tensors; not synchronised with LoadF32.
  void set_fp8_block(int rows, int cols) {
    fp8_block_rows_ = rows;
    fp8_block_cols_ = cols;
  }

 private:
  Checkpoint() = default;
  absl::StatusOr<std::shared_ptr<SafetensorsFile>> FileFor(const std::string& name) const;

  absl::StatusOr<Tensor> LoadFp8(const std::string& name, const TensorInfo& info,
                                 absl::Span<const uint8_t> bytes) const;

  std::string dir_;
  std::optional<DType> weights_dtype_;
  int fp8_block_rows_ = 128;
  int fp8_block_cols_ = 128;
  absl::flat_hash_map<std::string, std::string> file_of_;  // tensor -> shard file name
  mutable absl::Mutex mu_;
  mutable absl::flat_hash_map<std::string, std::shared_ptr<SafetensorsFile>> open_
      ABSL_GUARDED_BY(mu_);
};

// Writes safetensors files. Tensors are kept in insertion order in memory until Write.
class SafetensorsWriter {
 public:
  // Stores `values` converted to `dtype`.
  void Add(const std::string& name, DType dtype, std::vector<int64_t> shape,
           absl::Span<const float> values);
  // Stores bytes as given (for tests that build odd files and for raw FP8 payloads).
  void AddRaw(const std::string& name, DType dtype, std::vector<int64_t> shape,
              std::vector<uint8_t> bytes);
  size_t total_bytes() const { return total_bytes_; }
  size_t size() const { return entries_.size(); }
  // Writes everything to one file (header padded to 8 bytes, as HF does).
  [[nodiscard]] absl::Status Write(const std::string& path) const;
  // Writes shards of about `shard_bytes` each as model-0000i-of-0000n.safetensors plus
  // model.safetensors.index.json in `dir`; one shard is written as model.safetensors.
  [[nodiscard]] absl::Status WriteSharded(const std::string& dir, size_t shard_bytes) const;

 private:
  struct Entry {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
    std::vector<uint8_t> bytes;
  };
  static absl::Status WriteEntries(const std::string& path, const std::vector<const Entry*>& es);
  std::vector<Entry> entries_;
  size_t total_bytes_ = 0;
};

}  // namespace moemesh

#include "services/model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/string_view.h"
#include "nlohmann/json.hpp"
#include "services/common/status_macros.h"
#include "services/model/fp8.h"

namespace moemesh {
namespace {

using json = nlohmann::json;

absl::Status FileError(const std::string& path, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(path, ": ", what));
}

absl::StatusOr<std::string> ReadSmallFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::string s((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return s;
}

}  // namespace

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

absl::StatusOr<std::shared_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return absl::NotFoundError(absl::StrCat("cannot open ", path, ": ", std::strerror(errno)));
  }
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    return FileError(path, "cannot stat");
  }
  const size_t size = static_cast<size_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    return FileError(
        path, absl::StrCat("truncated: ", size, " bytes, shorter than the 8-byte header length"));
  }
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
  ::close(fd);
  if (map == MAP_FAILED)
    return FileError(path, absl::StrCat("mmap failed: ", std::strerror(errno)));

  std::shared_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  file->map_ = static_cast<const uint8_t*>(map);
  file->map_size_ = size;

  uint64_t header_len = 0;
  std::memcpy(&header_len, file->map_, 8);  // little-endian on every platform we build for
  if (header_len > kMaxSafetensorsHeaderBytes) {
    return FileError(path, absl::StrCat("header length ", header_len, " exceeds the limit of ",
                                        kMaxSafetensorsHeaderBytes, " bytes"));
  }
  if (header_len > size - 8) {
    return FileError(path, absl::StrCat("truncated: header claims ", header_len,
                                        " bytes but the file has ", size - 8, " after the length"));
  }
  const uint64_t data_size = size - 8 - header_len;
  file->data_ = file->map_ + 8 + header_len;

  json header;
  try {
    header = json::parse(reinterpret_cast<const char*>(file->map_ + 8),
                         reinterpret_cast<const char*>(file->map_ + 8 + header_len));
  } catch (const std::exception& e) {
    return FileError(path, absl::StrCat("header is not valid JSON: ", e.what()));
  }
  if (!header.is_object()) return FileError(path, "header is not a JSON object");

  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    if (name == "__metadata__") continue;
    const json& v = it.value();
    auto bad = [&](absl::string_view what) {
      return FileError(path, absl::StrCat("tensor '", name, "': ", what));
    };
    if (!v.is_object()) return bad("entry is not an object");
    if (!v.contains("dtype") || !v["dtype"].is_string()) return bad("missing dtype");
    auto dtype = ParseDType(v["dtype"].get<std::string>());
    if (!dtype.ok()) return bad(dtype.status().message());
    if (!v.contains("shape") || !v["shape"].is_array()) return bad("missing shape");
    if (!v.contains("data_offsets") || !v["data_offsets"].is_array() ||
        v["data_offsets"].size() != 2) {
      return bad("missing data_offsets");
    }
    TensorInfo info;
    info.name = name;
    info.dtype = *dtype;
    uint64_t numel = 1;
    for (const json& d : v["shape"]) {
      if (!d.is_number_integer() || d.get<int64_t>() < 0)
        return bad("shape has a non-integer or negative dimension");
      const uint64_t dim = d.get<uint64_t>();
      if (dim != 0 && numel > std::numeric_limits<uint64_t>::max() / 16 / dim)
        return bad("shape overflows");
      numel *= dim;
      info.shape.push_back(static_cast<int64_t>(dim));
    }
    for (const json& o : v["data_offsets"]) {
      if (!o.is_number_integer() || o.get<int64_t>() < 0)
        return bad("data_offsets are not non-negative integers");
    }
    info.begin = v["data_offsets"][0].get<uint64_t>();
    info.end = v["data_offsets"][1].get<uint64_t>();
    if (info.begin > info.end) return bad("data_offsets are reversed");
    if (info.end > data_size) {
      return bad(absl::StrCat("data_offsets [", info.begin, ", ", info.end,
                              ") run past the data section of ", data_size,
                              " bytes (truncated file?)"));
    }
    const uint64_t expect = numel * DTypeSize(info.dtype);
    if (info.end - info.begin != expect) {
      return bad(absl::StrCat("header says ", info.end - info.begin, " bytes but shape ",
                              ShapeToString(info.shape), " of ", DTypeName(info.dtype), " needs ",
                              expect));
    }
    file->tensors_.emplace(name, std::move(info));
  }
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) ::munmap(const_cast<uint8_t*>(map_), map_size_);
}

const TensorInfo* SafetensorsFile::Find(absl::string_view name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

std::vector<std::string> SafetensorsFile::Names() const {
  std::vector<std::string> names;
  for (const auto& [n, _] : tensors_) names.push_back(n);
  std::sort(names.begin(), names.end());
  return names;
}

absl::Span<const uint8_t> SafetensorsFile::Bytes(const TensorInfo& info) const {
  return {data_ + info.begin, static_cast<size_t>(info.end - info.begin)};
}

absl::StatusOr<std::unique_ptr<Checkpoint>> Checkpoint::Open(const std::string& dir) {
  std::unique_ptr<Checkpoint> ckpt(new Checkpoint());
  ckpt->dir_ = dir;
  const std::string index_path = dir + "/model.safetensors.index.json";
  const std::string single_path = dir + "/model.safetensors";
  if (::access(index_path.c_str(), R_OK) == 0) {
    ASSIGN_OR_RETURN(std::string text, ReadSmallFile(index_path));
    json index;
    try {
      index = json::parse(text);
    } catch (const std::exception& e) {
      return FileError(index_path, absl::StrCat("not valid JSON: ", e.what()));
    }
    if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object()) {
      return FileError(index_path, "has no weight_map object");
    }
    for (auto it = index["weight_map"].begin(); it != index["weight_map"].end(); ++it) {
      if (!it.value().is_string())
        return FileError(index_path, absl::StrCat("entry '", it.key(), "' is not a file name"));
      const std::string file = it.value().get<std::string>();
      if (file.find('/') != std::string::npos || file == "..") {
        return FileError(index_path, absl::StrCat("shard name '", file, "' leaves the directory"));
      }
      ckpt->file_of_[it.key()] = file;
    }
  } else if (::access(single_path.c_str(), R_OK) == 0) {
    ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(single_path));
    for (const std::string& n : file->Names()) ckpt->file_of_[n] = "model.safetensors";
    absl::MutexLock lock(&ckpt->mu_);
    ckpt->open_["model.safetensors"] = std::move(file);
  } else {
    return absl::NotFoundError(
        absl::StrCat(dir, ": neither model.safetensors nor model.safetensors.index.json found"));
  }
  return ckpt;
}

std::vector<std::string> Checkpoint::TensorNames() const {
  std::vector<std::string> names;
  for (const auto& [n, _] : file_of_) names.push_back(n);
  std::sort(names.begin(), names.end());
  return names;
}

absl::StatusOr<std::shared_ptr<SafetensorsFile>> Checkpoint::FileFor(
    const std::string& name) const {
  auto it = file_of_.find(name);
  if (it == file_of_.end()) {
    return absl::NotFoundError(
        absl::StrCat(dir_, ": tensor '", name, "' is not in the checkpoint"));
  }
  absl::MutexLock lock(&mu_);
  auto open = open_.find(it->second);
  if (open != open_.end()) return open->second;
  ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(dir_ + "/" + it->second), "tensor '", name,
                   "'");
  open_[it->second] = file;
  return file;
}

int Checkpoint::OpenedFiles() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(open_.size());
}

absl::StatusOr<TensorInfo> Checkpoint::Info(const std::string& name) const {
  ASSIGN_OR_RETURN(auto file, FileFor(name));
  const TensorInfo* info = file->Find(name);
  if (info == nullptr) {
    return absl::NotFoundError(absl::StrCat(file->path(), ": tensor '", name,
                                            "' is listed in the index but missing from the file"));
  }
  return *info;
}

absl::StatusOr<Tensor> Checkpoint::LoadF32(const std::string& name) const {
  ASSIGN_OR_RETURN(auto file, FileFor(name));
  const TensorInfo* info = file->Find(name);
  if (info == nullptr) {
    return absl::NotFoundError(absl::StrCat(file->path(), ": tensor '", name,
                                            "' is listed in the index but missing from the file"));
  }
  absl::Span<const uint8_t> bytes = file->Bytes(*info);
  if (info->dtype == DType::kF8E4M3) return LoadFp8(name, *info, bytes);
  if (info->dtype == DType::kF32 &&
      reinterpret_cast<uintptr_t>(bytes.data()) % alignof(float) == 0) {
    return Tensor::View(info->shape, reinterpret_cast<const float*>(bytes.data()), file);
  }
  Tensor t = Tensor::Zeros(info->shape);
  ConvertToF32(info->dtype, bytes.data(), static_cast<size_t>(info->numel()), t.mutable_data());
  return t;
}

absl::StatusOr<Tensor> Checkpoint::LoadFp8(const std::string& name, const TensorInfo& info,
                                           absl::Span<const uint8_t> bytes) const {
  const std::string scale_name = Fp8ScaleName(name);
  auto fail = [&](absl::string_view what) {
    return absl::InvalidArgumentError(absl::StrCat(dir_, ": FP8 tensor '", name, "': ", what));
  };
  if (info.shape.size() != 2) {
    return fail(absl::StrCat("block-scaled FP8 weights must be 2-D, got shape ",
                             ShapeToString(info.shape)));
  }
  if (!Has(scale_name)) {
    return fail(absl::StrCat("its block scales '", scale_name, "' are not in the checkpoint"));
  }
  ASSIGN_OR_RETURN(TensorInfo sinfo, Info(scale_name));
  if (sinfo.dtype == DType::kF8E4M3) return fail(absl::StrCat("'", scale_name, "' is itself FP8"));
  ASSIGN_OR_RETURN(Tensor scale, LoadF32(scale_name));
  Tensor t = Tensor::Zeros(info.shape);
  RETURN_IF_ERROR(
      DequantizeFp8Blocks(bytes, info.shape[0], info.shape[1], scale.span(), scale.shape(),
                          fp8_block_rows_, fp8_block_cols_, t.mutable_data()),
      dir_, ": FP8 tensor '", name, "'");
  return t;
}

absl::StatusOr<Weight> Checkpoint::LoadWeight(const std::string& name,
                                              absl::Span<const int64_t> expected_shape) const {
  ASSIGN_OR_RETURN(auto file, FileFor(name));
  const TensorInfo* info = file->Find(name);
  if (info == nullptr) {
    return absl::NotFoundError(absl::StrCat(file->path(), ": tensor '", name,
                                            "' is listed in the index but missing from the file"));
  }
  if (absl::Span<const int64_t>(info->shape) != expected_shape || info->shape.size() != 2) {
    return absl::InvalidArgumentError(absl::StrCat(dir_, ": tensor '", name, "' has shape ",
                                                   ShapeToString(info->shape), ", expected ",
                                                   ShapeToString(expected_shape)));
  }
  absl::Span<const uint8_t> bytes = file->Bytes(*info);
  Weight w;
  w.dtype = info->dtype;
  w.rows = info->shape[0];
  w.cols = info->shape[1];
  if (info->dtype == DType::kF8E4M3) {
    const std::string scale_name = Fp8ScaleName(name);
    if (!Has(scale_name)) {
      return absl::InvalidArgumentError(absl::StrCat(dir_, ": FP8 tensor '", name,
                                                     "': its block scales '", scale_name,
                                                     "' are not in the checkpoint"));
    }
    ASSIGN_OR_RETURN(Tensor scale, LoadF32(scale_name));
    const std::vector<int64_t> want =
        Fp8ScaleShape(w.rows, w.cols, fp8_block_rows_, fp8_block_cols_);
    if (scale.shape() != want) {
      return absl::InvalidArgumentError(absl::StrCat(dir_, ": FP8 tensor '", name,
                                                     "': scales have shape ", scale.ShapeString(),
                                                     ", expected ", ShapeToString(want)));
    }
    w.data = bytes.data();
    w.scale_inv = scale.data();
    w.block_rows = fp8_block_rows_;
    w.block_cols = fp8_block_cols_;
    w.owner = std::make_shared<std::pair<std::shared_ptr<SafetensorsFile>, Tensor>>(file, scale);
  } else if (reinterpret_cast<uintptr_t>(bytes.data()) % DTypeSize(info->dtype) == 0) {
    w.data = bytes.data();
    w.owner = file;
  } else {
    auto copy = std::make_shared<std::vector<uint8_t>>(bytes.begin(), bytes.end());
    w.data = copy->data();
    w.owner = copy;
  }
  if (!weights_dtype_.has_value() || *weights_dtype_ == w.dtype) return w;
  if (*weights_dtype_ == DType::kF8E4M3) {
    return absl::InvalidArgumentError(
        "converting weights to FP8 on load is not supported; use an FP8 checkpoint");
  }
  // Convert row by row through F32, so that no whole F32 copy exists at any time.
  const DType to = *weights_dtype_;
  auto buf = std::make_shared<std::vector<uint8_t>>(w.rows * w.cols * DTypeSize(to));
  std::vector<float> row(w.cols);
  for (int64_t r = 0; r < w.rows; ++r) {
    DequantizeRows(w, r, r + 1, row.data());
    ConvertFromF32(to, row.data(), w.cols, buf->data() + r * w.cols * DTypeSize(to));
  }
  Weight c;
  c.dtype = to;
  c.rows = w.rows;
  c.cols = w.cols;
  c.data = buf->data();
  c.owner = buf;
  return c;
}

absl::StatusOr<Tensor> Checkpoint::LoadF32(const std::string& name,
                                           absl::Span<const int64_t> expected_shape) const {
  ASSIGN_OR_RETURN(TensorInfo info, Info(name));
  if (absl::Span<const int64_t>(info.shape) != expected_shape) {
    return absl::InvalidArgumentError(absl::StrCat(dir_, ": tensor '", name, "' has shape ",
                                                   ShapeToString(info.shape), ", expected ",
                                                   ShapeToString(expected_shape)));
  }
  return LoadF32(name);
}

void SafetensorsWriter::Add(const std::string& name, DType dtype, std::vector<int64_t> shape,
                            absl::Span<const float> values) {
  std::vector<uint8_t> bytes(values.size() * DTypeSize(dtype));
  ConvertFromF32(dtype, values.data(), values.size(), bytes.data());
  AddRaw(name, dtype, std::move(shape), std::move(bytes));
}

void SafetensorsWriter::AddRaw(const std::string& name, DType dtype, std::vector<int64_t> shape,
                               std::vector<uint8_t> bytes) {
  total_bytes_ += bytes.size();
  entries_.push_back(Entry{name, dtype, std::move(shape), std::move(bytes)});
}

absl::Status SafetensorsWriter::WriteEntries(const std::string& path,
                                             const std::vector<const Entry*>& es) {
  json header = json::object();
  uint64_t offset = 0;
  for (const Entry* e : es) {
    header[e->name] = {{"dtype", std::string(DTypeName(e->dtype))},
                       {"shape", e->shape},
                       {"data_offsets", {offset, offset + e->bytes.size()}}};
    offset += e->bytes.size();
  }
  header["__metadata__"] = {{"format", "pt"}};
  std::string text = header.dump();
  while ((8 + text.size()) % 8 != 0) text.push_back(' ');
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return absl::InternalError(absl::StrCat("cannot write ", path));
  const uint64_t len = text.size();
  out.write(reinterpret_cast<const char*>(&len), 8);
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  for (const Entry* e : es) {
    out.write(reinterpret_cast<const char*>(e->bytes.data()),
              static_cast<std::streamsize>(e->bytes.size()));
  }
  out.close();
  if (!out) return absl::InternalError(absl::StrCat("failed writing ", path));
  return absl::OkStatus();
}

absl::Status SafetensorsWriter::Write(const std::string& path) const {
  std::vector<const Entry*> es;
  for (const Entry& e : entries_) es.push_back(&e);
  return WriteEntries(path, es);
}

absl::Status SafetensorsWriter::WriteSharded(const std::string& dir, size_t shard_bytes) const {
  std::vector<std::vector<const Entry*>> shards(1);
  size_t current = 0;
  for (const Entry& e : entries_) {
    if (current > 0 && current + e.bytes.size() > shard_bytes) {
      shards.emplace_back();
      current = 0;
    }
    shards.back().push_back(&e);
    current += e.bytes.size();
  }
  if (shards.size() == 1) return WriteEntries(dir + "/model.safetensors", shards[0]);
  json index = {{"metadata", {{"total_size", total_bytes_}}}, {"weight_map", json::object()}};
  for (size_t i = 0; i < shards.size(); ++i) {
    const std::string name =
        absl::StrFormat("model-%05d-of-%05d.safetensors", i + 1, shards.size());
    RETURN_IF_ERROR(WriteEntries(dir + "/" + name, shards[i]));
    for (const Entry* e : shards[i]) index["weight_map"][e->name] = name;
  }
  std::ofstream out(dir + "/model.safetensors.index.json");
  out << index.dump(2) << "\n";
  if (!out) return absl::InternalError(absl::StrCat("cannot write index in ", dir));
  return absl::OkStatus();
}

}  // namespace moemesh

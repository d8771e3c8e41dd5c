#include "services/rpc/wire_codec.h"

#include <algorithm>
#include <cassert>
#include <climits>
#include <cstring>
#include <limits>
#include <optional>

#include "absl/base/casts.h"
#include "absl/strings/str_cat.h"
#include "google/protobuf/io/coded_stream.h"
#include "google/protobuf/io/zero_copy_stream.h"
#include "grpc/slice.h"

namespace moemesh {

namespace {

using google::protobuf::io::CodedInputStream;
using google::protobuf::io::CodedOutputStream;

// Protobuf wire types.
constexpr uint32_t kVarint = 0, kFixed64 = 1, kLengthDelimited = 2, kStartGroup = 3, kEndGroup = 4,
                   kFixed32 = 5;

// The message's chunks as a protobuf input stream; Next hands out the chunks' own memory.
class ChunkStream final : public google::protobuf::io::ZeroCopyInputStream {
 public:
  explicit ChunkStream(absl::Span<const absl::string_view> chunks) : chunks_(chunks) {}
  bool Next(const void** data, int* size) override {
    while (i_ < chunks_.size() && pos_ == chunks_[i_].size()) {
      ++i_;
      pos_ = 0;
    }
    if (i_ == chunks_.size()) return false;
    const size_t n = std::min<size_t>(chunks_[i_].size() - pos_, INT_MAX);
    *data = chunks_[i_].data() + pos_;
    *size = static_cast<int>(n);
    pos_ += n;
    count_ += static_cast<int64_t>(n);
    return true;
  }
  void BackUp(int count) override {
    pos_ -= static_cast<size_t>(count);
    count_ -= count;
  }
  bool Skip(int count) override {
    while (count > 0) {
      if (i_ == chunks_.size()) return false;
      const size_t avail = chunks_[i_].size() - pos_;
      const size_t take = std::min<size_t>(avail, static_cast<size_t>(count));
      pos_ += take;
      count_ += static_cast<int64_t>(take);
      count -= static_cast<int>(take);
      if (pos_ == chunks_[i_].size()) {
        ++i_;
        pos_ = 0;
      }
    }
    return true;
  }
  int64_t ByteCount() const override { return count_; }

 private:
  absl::Span<const absl::string_view> chunks_;
  size_t i_ = 0;    // current chunk
  size_t pos_ = 0;  // next unread byte in it
  int64_t count_ = 0;
};

// Reading the protobuf encoding with protobuf's own limits: tags of at most 5 bytes, lengths
// of at most 5 bytes below 2^31, 100 levels of nesting, field number 0 rejected.
class Reader {
 public:
  explicit Reader(absl::Span<const absl::string_view> chunks) : stream_(chunks), in_(&stream_) {}
  CodedInputStream& in() { return in_; }

  // The next tag; false at the end of the message (or of the current limit), which `*ok`
  // tells apart from malformed bytes.
  bool NextTag(uint32_t* tag, bool* ok) {
    const int start = in_.CurrentPosition();
    *tag = in_.ReadTag();
    if (*tag == 0) {
      *ok = in_.ConsumedEntireMessage();
      return false;
    }
    *ok = in_.CurrentPosition() - start <= 5 && (*tag >> 3) != 0 && (*tag & 7) != kEndGroup;
    return *ok;
  }

  // A length: it must also fit within the enclosing message (CodedInputStream's PushLimit
  // would silently keep the narrower limit; protobuf's parser rejects the message).
  bool ReadSize(int* size) {
    const int start = in_.CurrentPosition();
    uint64_t v = 0;
    if (!in_.ReadVarint64(&v) || in_.CurrentPosition() - start > 5 || v > INT_MAX) return false;
    const int room = in_.BytesUntilLimit();  // -1: no limit
    if (room >= 0 && v > static_cast<uint64_t>(room)) return false;
    *size = static_cast<int>(v);
    return true;
  }

  bool ReadVarint(uint64_t* v) { return in_.ReadVarint64(v); }

  // Skips one field whose tag was just read (an unknown field, or a known one with another
  // wire type, which protobuf also keeps as unknown).
  bool SkipField(uint32_t tag) {
    uint64_t v64;
    uint32_t v32;
    int size;
    switch (tag & 7) {
      case kVarint:
        return in_.ReadVarint64(&v64);
      case kFixed64:
        return in_.ReadLittleEndian64(&v64);
      case kLengthDelimited:
        return ReadSize(&size) && in_.Skip(size);
      case kFixed32:
        return in_.ReadLittleEndian32(&v32);
      case kStartGroup: {
        if (!in_.IncrementRecursionDepth()) return false;
        const uint32_t end = (tag & ~7u) | kEndGroup;
        for (;;) {
          const int start = in_.CurrentPosition();
          const uint32_t t = in_.ReadTag();
          if (t == 0 || in_.CurrentPosition() - start > 5 || (t >> 3) == 0) return false;
          if (t == end) break;
          if ((t & 7) == kEndGroup || !SkipField(t)) return false;
        }
        in_.DecrementRecursionDepth();
        return true;
      }
      default:
        return false;
    }
  }

  // A packed (length-delimited) or unpacked repeated scalar: calls `one` per element.
  template <typename One>
  bool Repeated(uint32_t tag, uint32_t element_wire_type, One one) {
    if ((tag & 7) == element_wire_type) return one();
    int size;
    if (!ReadSize(&size)) return false;
    const auto limit = in_.PushLimit(size);
    bool ok = true;
    while (ok && in_.BytesUntilLimit() > 0) ok = one();
    // The last element must end exactly at the limit, and the limit must lie within the data.
    ok = ok && in_.BytesUntilLimit() == 0;
    in_.PopLimit(limit);
    return ok;
  }

  // A length-delimited submessage, parsed by `body` within its limit and one level deeper.
  template <typename Body>
  bool Message(Body body) {
    int size;
    if (!ReadSize(&size) || !in_.IncrementRecursionDepth()) return false;
    const auto limit = in_.PushLimit(size);
    bool ok = body();
    ok = ok && in_.BytesUntilLimit() == 0;
    in_.PopLimit(limit);
    in_.DecrementRecursionDepth();
    return ok;
  }

 private:
  ChunkStream stream_;
  CodedInputStream in_;
};

bool ParseInt32Field(Reader& r, int32_t* out) {
  uint64_t v;
  if (!r.ReadVarint(&v)) return false;
  *out = static_cast<int32_t>(v);
  return true;
}

// A repeated int32 or int64 field (packed or not): each varint truncated to T, as protobuf does.
template <typename T>
bool ParseVarints(Reader& r, uint32_t tag, std::vector<T>* out) {
  return r.Repeated(tag, kVarint, [&] {
    uint64_t v;
    if (!r.ReadVarint(&v)) return false;
    out->push_back(static_cast<T>(v));
    return true;
  });
}

// The fields of a v1::Tensor, merged into `t` (a message field repeated in its parent merges).
bool ParseTensorBody(Reader& r, WireTensor* t) {
  CodedInputStream& in = r.in();
  uint32_t tag;
  bool ok;
  while (r.NextTag(&tag, &ok)) {
    const uint32_t field = tag >> 3, type = tag & 7;
    if (field == 1 && type == kVarint) {
      if (!ParseInt32Field(r, &t->dtype)) return false;
    } else if (field == 2 && (type == kVarint || type == kLengthDelimited)) {
      if (!ParseVarints(r, tag, &t->shape)) return false;
    } else if (field == 3 && type == kLengthDelimited) {
      int size;
      if (!r.ReadSize(&size)) return false;
      t->data.clear();
      t->data_bytes = static_cast<size_t>(size);
      while (size > 0) {
        const void* p;
        int avail;
        if (!in.GetDirectBufferPointer(&p, &avail)) return false;
        const int take = std::min(avail, size);
        t->data.emplace_back(static_cast<const char*>(p), static_cast<size_t>(take));
        in.Skip(take);
        size -= take;
      }
    } else if (!r.SkipField(tag)) {
      return false;
    }
  }
  return ok;
}

absl::Status Malformed(absl::string_view message) {
  return absl::InvalidArgumentError(absl::StrCat("malformed ", message, " message"));
}

// ---- encoding ----------------------------------------------------------------------------

size_t VarintSize(uint64_t v) { return CodedOutputStream::VarintSize64(v); }
// int32 and enum values are written sign-extended to 64 bits, as protobuf does.
uint64_t SignExtended(int32_t v) { return static_cast<uint64_t>(static_cast<int64_t>(v)); }

char* PutVarint(uint64_t v, char* p) {
  return reinterpret_cast<char*>(
      CodedOutputStream::WriteVarint64ToArray(v, reinterpret_cast<uint8_t*>(p)));
}
char* PutTag(uint32_t field, uint32_t type, char* p) { return PutVarint((field << 3) | type, p); }

// Sizes of a Tensor submessage and its parts.
struct TensorLayout {
  std::vector<int64_t> shape;
  size_t shape_bytes = 0;  // packed shape payload
  size_t data_bytes = 0;
  size_t body = 0;  // the submessage's length
};

TensorLayout LayoutTensor(std::vector<int64_t> shape, DType wire) {
  TensorLayout l;
  l.shape = std::move(shape);
  uint64_t n = 1;
  for (int64_t d : l.shape) {
    l.shape_bytes += VarintSize(static_cast<uint64_t>(d));
    n *= static_cast<uint64_t>(d);
  }
  l.data_bytes = static_cast<size_t>(n) * DTypeSize(wire);
  l.body = 1 + VarintSize(SignExtended(DTypeWireValue(wire)));
  if (!l.shape.empty()) l.body += 1 + VarintSize(l.shape_bytes) + l.shape_bytes;
  if (l.data_bytes > 0) l.body += 1 + VarintSize(l.data_bytes) + l.data_bytes;
  return l;
}

size_t TensorFieldSize(const TensorLayout& l) { return 1 + VarintSize(l.body) + l.body; }

char* PutTensorField(uint32_t field, const TensorLayout& l, TensorRows rows, DType wire, char* p) {
  p = PutTag(field, kLengthDelimited, p);
  p = PutVarint(l.body, p);
  p = PutTag(1, kVarint, p);
  p = PutVarint(SignExtended(DTypeWireValue(wire)), p);
  if (!l.shape.empty()) {
    p = PutTag(2, kLengthDelimited, p);
    p = PutVarint(l.shape_bytes, p);
    for (int64_t d : l.shape) p = PutVarint(static_cast<uint64_t>(d), p);
  }
  if (l.data_bytes > 0) {
    p = PutTag(3, kLengthDelimited, p);
    p = PutVarint(l.data_bytes, p);
    if (rows.rows.empty()) {
      ConvertFromF32(wire, rows.source->data(), static_cast<size_t>(rows.source->numel()), p);
    } else {
      const size_t width = static_cast<size_t>(rows.source->dim(-1));
      const size_t row_bytes = width * DTypeSize(wire);
      for (size_t r = 0; r < rows.rows.size(); ++r) {
        ConvertFromF32(wire, rows.source->row(rows.rows[r]), width, p + r * row_bytes);
      }
    }
    p += l.data_bytes;
  }
  return p;
}

std::vector<int64_t> RowsShape(TensorRows rows) {
  if (rows.rows.empty()) return rows.source->shape();
  return {static_cast<int64_t>(rows.rows.size()), rows.source->dim(-1)};
}

size_t PackedInt32Bytes(absl::Span<const int32_t> v) {
  size_t n = 0;
  for (int32_t x : v) n += VarintSize(SignExtended(x));
  return n;
}

size_t PackedFieldSize(size_t payload) {
  return payload == 0 ? 0 : 1 + VarintSize(payload) + payload;
}

char* PutPackedInt32s(uint32_t field, absl::Span<const int32_t> v, size_t payload, char* p) {
  if (payload == 0) return p;
  p = PutTag(field, kLengthDelimited, p);
  p = PutVarint(payload, p);
  for (int32_t x : v) p = PutVarint(SignExtended(x), p);
  return p;
}

size_t Int32FieldSize(int32_t v) { return v == 0 ? 0 : 1 + VarintSize(SignExtended(v)); }

char* PutInt32Field(uint32_t field, int32_t v, char* p) {
  if (v == 0) return p;
  p = PutTag(field, kVarint, p);
  return PutVarint(SignExtended(v), p);
}

// A slice of `size` uninitialised bytes for `fill` to write, as a one-slice byte buffer.
template <typename Fill>
grpc::ByteBuffer OneSlice(size_t size, Fill fill) {
  grpc_slice s = grpc_slice_malloc(size);
  char* begin = reinterpret_cast<char*>(GRPC_SLICE_START_PTR(s));
  char* end = fill(begin);
  assert(end == begin + size);  // the layout's sizes and the writes agree
  (void)end;
  grpc::Slice slice(s, grpc::Slice::STEAL_REF);
  return grpc::ByteBuffer(&slice, 1);
}

// Parses the message in `chunks` field by field: `on_field(reader, field number, wire type,
// tag)` parses a field it knows and says whether that worked, or returns nullopt for one it does
// not know (or knows with another wire type), which is skipped as protobuf skips unknown fields.
template <typename OnField>
absl::Status ParseFields(absl::Span<const absl::string_view> chunks, absl::string_view message,
                         OnField on_field) {
  Reader r(chunks);
  uint32_t tag;
  bool ok;
  while (r.NextTag(&tag, &ok)) {
    const std::optional<bool> known = on_field(r, tag >> 3, tag & 7, tag);
    if (!(known.has_value() ? *known : r.SkipField(tag))) return Malformed(message);
  }
  return ok ? absl::OkStatus() : Malformed(message);
}

}  // namespace

absl::StatusOr<DType> DTypeFromWireValue(int32_t d) {
  switch (d) {
    case 1:
      return DType::kF32;
    case 2:
      return DType::kF16;
    case 3:
      return DType::kBF16;
    case 4:
      return DType::kF8E4M3;
    default:
      return absl::InvalidArgumentError(absl::StrCat("unknown dtype ", d));
  }
}

int32_t DTypeWireValue(DType d) {
  switch (d) {
    case DType::kF32:
      return 1;
    case DType::kF16:
      return 2;
    case DType::kBF16:
      return 3;
    case DType::kF8E4M3:
      return 4;
  }
  return 0;
}

absl::Status ParseForwardRequest(absl::Span<const absl::string_view> chunks,
                                 WireForwardRequest* out) {
  *out = WireForwardRequest();
  return ParseFields(
      chunks, "ForwardRequest",
      [&](Reader& r, uint32_t field, uint32_t type, uint32_t tag) -> std::optional<bool> {
        if (field == 1 && type == kVarint) return ParseInt32Field(r, &out->layer);
        if (field == 2 && type == kLengthDelimited) {
          return r.Message([&] { return ParseTensorBody(r, &out->hidden); });
        }
        if (field == 3 && type == kVarint) {
          return ParseInt32Field(r, &out->output_dtype);
        }
        return std::nullopt;
      });
}

absl::Status ParseRunExpertsRequest(absl::Span<const absl::string_view> chunks,
                                    WireRunExpertsRequest* out) {
  *out = WireRunExpertsRequest();
  return ParseFields(
      chunks, "RunExpertsRequest",
      [&](Reader& r, uint32_t field, uint32_t type, uint32_t tag) -> std::optional<bool> {
        const bool scalars = type == kVarint || type == kLengthDelimited;
        if (field == 1 && type == kVarint) return ParseInt32Field(r, &out->layer);
        if (field == 2 && type == kLengthDelimited) {
          return r.Message([&] { return ParseTensorBody(r, &out->tokens); });
        }
        if (field == 3 && scalars) return ParseVarints(r, tag, &out->offsets);
        if (field == 4 && scalars) return ParseVarints(r, tag, &out->experts);
        if (field == 5 && (type == kFixed32 || type == kLengthDelimited)) {
          return r.Repeated(tag, kFixed32, [&] {
            uint32_t bits;
            if (!r.in().ReadLittleEndian32(&bits)) return false;
            out->weights.push_back(absl::bit_cast<float>(bits));
            return true;
          });
        }
        if (field == 6 && type == kVarint) return ParseInt32Field(r, &out->output_dtype);
        return std::nullopt;
      });
}

absl::Status ParseOutputMessage(absl::Span<const absl::string_view> chunks, WireTensor* out) {
  *out = WireTensor();
  return ParseFields(
      chunks, "response",
      [&](Reader& r, uint32_t field, uint32_t type, uint32_t) -> std::optional<bool> {
        if (field == 1 && type == kLengthDelimited) {
          return r.Message([&] { return ParseTensorBody(r, out); });
        }
        return std::nullopt;
      });
}

absl::StatusOr<Tensor> TensorFromParts(int32_t dtype_value, absl::Span<const int64_t> dims,
                                       absl::Span<const absl::string_view> data,
                                       absl::string_view what, int max_rank) {
  auto dtype = DTypeFromWireValue(dtype_value);
  if (!dtype.ok())
    return absl::InvalidArgumentError(absl::StrCat(what, ": ", dtype.status().message()));
  if (dims.empty() || static_cast<int64_t>(dims.size()) > max_rank) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": rank ", dims.size(), " is not in [1, ", max_rank, "]"));
  }
  std::vector<int64_t> shape;
  uint64_t n = 1;
  for (int64_t d : dims) {
    if (d < 0 || (d > 0 && n > std::numeric_limits<uint32_t>::max() / static_cast<uint64_t>(d))) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": bad dimension ", d));
    }
    n *= static_cast<uint64_t>(d);
    shape.push_back(d);
  }
  size_t bytes = 0;
  for (absl::string_view piece : data) bytes += piece.size();
  const size_t esize = DTypeSize(*dtype);
  const uint64_t expect = n * esize;
  if (bytes != expect) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": shape ", ShapeToString(shape), " of ",
                                                   DTypeName(*dtype), " needs ", expect,
                                                   " bytes, got ", bytes));
  }
  Tensor t = Tensor::Uninitialized(std::move(shape));  // every element is written below
  float* dst = t.mutable_data();
  // Pieces may cut an element in two; its bytes are put together in `carry`.
  char carry[8];
  size_t carried = 0;
  for (absl::string_view piece : data) {
    const char* p = piece.data();
    size_t left = piece.size();
    if (carried > 0) {
      const size_t take = std::min(esize - carried, left);
      std::memcpy(carry + carried, p, take);
      carried += take;
      p += take;
      left -= take;
      if (carried < esize) continue;
      ConvertToF32(*dtype, carry, 1, dst++);
      carried = 0;
    }
    const size_t whole = left / esize;
    if (whole > 0) ConvertToF32(*dtype, p, whole, dst);
    dst += whole;
    p += whole * esize;
    left -= whole * esize;
    std::memcpy(carry, p, left);
    carried = left;
  }
  return t;
}

absl::StatusOr<Tensor> TensorFromWire(const WireTensor& t, absl::string_view what, int max_rank) {
  return TensorFromParts(t.dtype, t.shape, t.data, what, max_rank);
}

grpc::ByteBuffer EncodeForwardRequest(int32_t layer, const Tensor& hidden, DType wire,
                                      int32_t output_dtype) {
  const TensorRows rows{&hidden, {}};
  const TensorLayout l = LayoutTensor(RowsShape(rows), wire);
  const size_t size = Int32FieldSize(layer) + TensorFieldSize(l) + Int32FieldSize(output_dtype);
  return OneSlice(size, [&](char* p) {
    p = PutInt32Field(1, layer, p);
    p = PutTensorField(2, l, rows, wire, p);
    return PutInt32Field(3, output_dtype, p);
  });
}

grpc::ByteBuffer EncodeRunExpertsRequest(int32_t layer, TensorRows tokens,
                                         absl::Span<const int32_t> offsets,
                                         absl::Span<const int32_t> experts,
                                         absl::Span<const float> weights, DType wire,
                                         int32_t output_dtype) {
  const TensorLayout l = LayoutTensor(RowsShape(tokens), wire);
  const size_t offsets_bytes = PackedInt32Bytes(offsets);
  const size_t experts_bytes = PackedInt32Bytes(experts);
  const size_t weights_bytes = 4 * weights.size();
  const size_t size = Int32FieldSize(layer) + TensorFieldSize(l) + PackedFieldSize(offsets_bytes) +
                      PackedFieldSize(experts_bytes) + PackedFieldSize(weights_bytes) +
                      Int32FieldSize(output_dtype);
  return OneSlice(size, [&](char* p) {
    p = PutInt32Field(1, layer, p);
    p = PutTensorField(2, l, tokens, wire, p);
    p = PutPackedInt32s(3, offsets, offsets_bytes, p);
    p = PutPackedInt32s(4, experts, experts_bytes, p);
    if (weights_bytes > 0) {
      p = PutTag(5, kLengthDelimited, p);
      p = PutVarint(weights_bytes, p);
      for (float w : weights) {
        p = reinterpret_cast<char*>(CodedOutputStream::WriteLittleEndian32ToArray(
            absl::bit_cast<uint32_t>(w), reinterpret_cast<uint8_t*>(p)));
      }
    }
    return PutInt32Field(6, output_dtype, p);
  });
}

grpc::ByteBuffer EncodeOutputMessage(const Tensor& output, DType wire) {
  const TensorRows rows{&output, {}};
  const TensorLayout l = LayoutTensor(RowsShape(rows), wire);
  return OneSlice(TensorFieldSize(l), [&](char* p) { return PutTensorField(1, l, rows, wire, p); });
}

absl::StatusOr<Tensor> DecodeOutputMessage(const grpc::ByteBuffer& message,
                                           absl::string_view what) {
  ReceivedBytes bytes;
  if (absl::Status s = bytes.Reset(message); !s.ok()) return s;
  WireTensor t;
  if (absl::Status s = ParseOutputMessage(bytes.chunks(), &t); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": ", s.message()));
  }
  return TensorFromWire(t, what, 2);
}

absl::Status ReceivedBytes::Reset(const grpc::ByteBuffer& buffer) {
  slices_.clear();
  views_.clear();
  if (!buffer.Valid()) return absl::OkStatus();  // an empty message
  const grpc::Status s = buffer.Dump(&slices_);
  if (!s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("unreadable message: ", s.error_message()));
  }
  views_.reserve(slices_.size());
  for (const grpc::Slice& slice : slices_) {
    views_.emplace_back(reinterpret_cast<const char*>(slice.begin()), slice.size());
  }
  return absl::OkStatus();
}

}  // namespace moemesh

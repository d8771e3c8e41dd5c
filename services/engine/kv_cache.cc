#include "services/engine/kv_cache.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <new>

#include "absl/hash/hash.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "services/tensor/weight.h"

namespace moemesh {
namespace {

// Chunks of about this size back the pool, so an unbounded or large pool costs memory only
// as it fills.
constexpr int64_t kChunkBytes = int64_t{16} << 20;
// An unbounded pool stops at this many chunks (16 TiB of 16 MiB chunks).
constexpr int64_t kMaxChunks = int64_t{1} << 20;

}  // namespace

absl::StatusOr<DType> ParseKvCacheDType(absl::string_view s) {
  const std::string l = absl::AsciiStrToLower(s);
  if (l == "f32") return DType::kF32;
  if (l == "bf16") return DType::kBF16;
  return absl::InvalidArgumentError(absl::StrCat("KV cache dtype '", s, "': use f32 or bf16"));
}

KvCache::KvCache(const KvCacheOptions& options, int layers, int64_t row)
    : options_(options),
      layers_(layers),
      row_(row),
      elem_bytes_(options.dtype == DType::kBF16 ? 2 : 4),
      block_bytes_(static_cast<int64_t>(layers) * options.block_tokens * row * elem_bytes_) {}

absl::StatusOr<std::unique_ptr<KvCache>> KvCache::Create(const KvCacheOptions& options, int layers,
                                                         int64_t row) {
  if (options.dtype != DType::kF32 && options.dtype != DType::kBF16) {
    return absl::InvalidArgumentError("the KV cache holds f32 or bf16");
  }
  if (options.block_tokens < 1 || options.block_tokens > 4096) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV cache block of ", options.block_tokens, " tokens; use 1..4096"));
  }
  if (layers < 1 || row < 1 || options.bytes < 0) {
    return absl::InvalidArgumentError("KV cache of no layers, rows or negative bytes");
  }
  std::unique_ptr<KvCache> c(new KvCache(options, layers, row));
  c->blocks_per_chunk_ = std::max<int64_t>(1, kChunkBytes / c->block_bytes_);
  if (options.bytes > 0) {
    c->max_blocks_ =
        std::min<int64_t>(options.bytes / c->block_bytes_, std::numeric_limits<int32_t>::max() / 2);
    if (c->max_blocks_ < 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          "a KV cache of ", options.bytes, " bytes holds no block of ", c->block_bytes_, " bytes (",
          options.block_tokens, " tokens × ", layers, " layers)"));
    }
    c->blocks_per_chunk_ = std::min(c->blocks_per_chunk_, c->max_blocks_);
  } else {
    c->max_blocks_ = std::min<int64_t>(kMaxChunks * c->blocks_per_chunk_,
                                       std::numeric_limits<int32_t>::max() / 2);
  }
  c->chunks_.resize((c->max_blocks_ + c->blocks_per_chunk_ - 1) / c->blocks_per_chunk_);
  return c;
}

uint8_t* KvCache::BlockData(int32_t block) const {
  return chunks_[block / blocks_per_chunk_].get() + (block % blocks_per_chunk_) * block_bytes_;
}

bool KvCache::GrowLocked() {
  if (allocated_blocks_ >= max_blocks_) return false;
  const int64_t n = std::min(blocks_per_chunk_, max_blocks_ - allocated_blocks_);
  // Memory the system refuses is not an error: the pool stops growing there.
  std::unique_ptr<uint8_t[]> chunk(new (std::nothrow) uint8_t[n * block_bytes_]);
  if (chunk == nullptr) {
    max_blocks_ = allocated_blocks_;
    return false;
  }
  chunks_[allocated_blocks_ / blocks_per_chunk_] = std::move(chunk);
  meta_.resize(allocated_blocks_ + n);
  for (int64_t b = allocated_blocks_ + n - 1; b >= allocated_blocks_; --b) {
    free_.push_back(static_cast<int32_t>(b));
  }
  allocated_blocks_ += n;
  return true;
}

int64_t KvCache::free_blocks() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int64_t>(free_.size() + evictable_.size()) + (max_blocks_ - allocated_blocks_);
}

KvCacheStats KvCache::stats() const {
  absl::MutexLock lock(&mu_);
  KvCacheStats s;
  s.total_blocks = max_blocks_;
  s.used_blocks = used_;
  s.cached_blocks = static_cast<int64_t>(evictable_.size());
  s.allocated_bytes = allocated_blocks_ * block_bytes_;
  s.prefix_query_tokens = prefix_query_;
  s.prefix_hit_tokens = prefix_hit_;
  return s;
}

void KvCache::UnregisterLocked(int32_t block) {
  BlockMeta& m = meta_[block];
  if (!m.registered) return;
  auto it = index_.find(m.hash);
  if (it != index_.end() && it->second.block == block) index_.erase(it);
  m.registered = false;
}

bool KvCache::Allocate(int64_t n, std::vector<int32_t>* table) {
  if (n <= 0) return true;
  absl::MutexLock lock(&mu_);
  while (static_cast<int64_t>(free_.size() + evictable_.size()) < n) {
    if (!GrowLocked()) return false;
  }
  for (int64_t i = 0; i < n; ++i) {
    int32_t b;
    if (!free_.empty()) {
      b = free_.back();
      free_.pop_back();
    } else {
      b = evictable_.front();  // least recently released cached block
      evictable_.pop_front();
      UnregisterLocked(b);
    }
    meta_[b].refs = 1;
    ++used_;
    table->push_back(b);
  }
  return true;
}

void KvCache::Release(absl::Span<const int32_t> blocks) {
  absl::MutexLock lock(&mu_);
  for (int32_t b : blocks) {
    BlockMeta& m = meta_[b];
    if (--m.refs > 0) continue;
    --used_;
    if (m.registered) {
      evictable_.push_back(b);
      m.lru = std::prev(evictable_.end());
    } else {
      free_.push_back(b);
    }
  }
}

uint64_t KvCache::ChainHash(uint64_t parent, absl::Span<const int32_t> tokens) {
  // Never 0, which marks "no parent".
  return absl::HashOf(parent, tokens) | 1;
}

int32_t KvCache::Lookup(uint64_t parent, absl::Span<const int32_t> tokens) {
  if (!options_.prefix_caching) return -1;
  const uint64_t h = ChainHash(parent, tokens);
  absl::MutexLock lock(&mu_);
  auto it = index_.find(h);
  if (it == index_.end() || it->second.parent != parent ||
      !std::equal(tokens.begin(), tokens.end(), it->second.tokens.begin(),
                  it->second.tokens.end())) {
    return -1;
  }
  const int32_t b = it->second.block;
  BlockMeta& m = meta_[b];
  if (m.refs++ == 0) {
    evictable_.erase(m.lru);
    ++used_;
  }
  return b;
}

void KvCache::Register(int32_t block, uint64_t parent, absl::Span<const int32_t> tokens) {
  if (!options_.prefix_caching) return;
  const uint64_t h = ChainHash(parent, tokens);
  absl::MutexLock lock(&mu_);
  BlockMeta& m = meta_[block];
  if (m.registered || index_.contains(h)) return;
  index_[h] = Entry{block, parent, std::vector<int32_t>(tokens.begin(), tokens.end())};
  m.registered = true;
  m.hash = h;
}

void KvCache::CountPrefixLookup(int64_t query, int64_t hit) {
  absl::MutexLock lock(&mu_);
  prefix_query_ += query;
  prefix_hit_ += hit;
}

void KvCache::Write(int32_t block, int layer, int64_t slot, const float* rows, int64_t n) {
  uint8_t* base = BlockData(block) + ((layer * options_.block_tokens) + slot) * row_ * elem_bytes_;
  if (elem_bytes_ == 4) {
    std::memcpy(base, rows, n * row_ * sizeof(float));
    return;
  }
  uint16_t* dst = reinterpret_cast<uint16_t*>(base);
  for (int64_t i = 0; i < n * row_; ++i) dst[i] = FloatToBf16Bits(rows[i]);
}

const void* KvCache::Rows(int32_t block, int layer) const {
  return BlockData(block) + layer * options_.block_tokens * row_ * elem_bytes_;
}

void KvCache::Read(int32_t block, int layer, int64_t n, float* out) const {
  const uint8_t* base = BlockData(block) + layer * options_.block_tokens * row_ * elem_bytes_;
  if (elem_bytes_ == 4) {
    std::memcpy(out, base, n * row_ * sizeof(float));
    return;
  }
  const uint16_t* src = reinterpret_cast<const uint16_t*>(base);
  const int64_t count = n * row_;
#pragma omp simd  // a shift per value; -O2 alone leaves it scalar (the build has -fopenmp-simd)
  for (int64_t i = 0; i < count; ++i) out[i] = Bf16BitsToFloat(src[i]);
}

}  // namespace moemesh

// KvCache: the paged key/value cache of the gateway, one pool of fixed-size blocks.
//
// Every sequence's cache is a list of blocks (a block table), each holding the rows of
// `block_tokens` consecutive positions for every layer: block memory is
// [layers, block_tokens, row] in the cache dtype (F32, or BF16 to halve it), where a row is
// what attention keeps per token and layer (GQA: K then V of every KV head; MLA: the
// normalised KV latent and the rotated shared key). The pool never holds more than
// `bytes / block_bytes()` blocks, so the memory of all sequences together is bounded; it is
// allocated in chunks as blocks are first needed, and an allocation the system refuses caps
// the pool where it stands instead of throwing.
//
// Prefix caching (as vLLM does): a block that a sequence has filled is registered under a
// hash chained over every token before it, hash(parent hash, block tokens), with the tokens
// kept to rule out collisions. A later sequence whose prompt starts with the same tokens
// takes a reference on those blocks instead of computing them. Blocks are reference
// counted; a registered block whose count drops to zero stays cached until the pool needs
// it back (least recently released first), so `free_blocks()` counts it as free.
//
// Thread-safety: every method may be called from any thread (the block table bookkeeping is
// under one mutex). Block *contents* are not locked: a block is written only by the one
// sequence that allocated it, at rows past its length, and shared (registered) blocks are
// full and never written again.
#pragma once

#include <cstdint>
#include <list>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "services/tensor/tensor.h"

namespace moemesh {

struct KvCacheOptions {
  // Upper bound on the pool's memory; 0 means unbounded (library users and tests that do
  // not care). The gateway always sets it (--kv_cache_bytes).
  int64_t bytes = 0;
  int block_tokens = 16;       // positions per block
  DType dtype = DType::kF32;   // kF32 or kBF16
  bool prefix_caching = true;  // share full blocks between sequences with the same prefix
};

// "f32" | "bf16" (case-insensitive).
[[nodiscard]] absl::StatusOr<DType> ParseKvCacheDType(absl::string_view s);

struct KvCacheStats {
  int64_t total_blocks = 0;   // the pool's bound (INT64_MAX / 2 when unbounded)
  int64_t used_blocks = 0;    // referenced by at least one sequence
  int64_t cached_blocks = 0;  // unreferenced but registered for prefix reuse (free to take)
  int64_t allocated_bytes = 0;
  int64_t prefix_query_tokens = 0;  // prompt tokens looked up in the prefix cache
  int64_t prefix_hit_tokens = 0;    // of which found cached
};

class KvCache {
 public:
  // `layers` layers of `row` floats per token. INVALID_ARGUMENT for a bad dtype, block size
  // or a bound smaller than one block.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<KvCache>> Create(
      const KvCacheOptions& options, int layers, int64_t row);

  const KvCacheOptions& options() const { return options_; }
  int block_tokens() const { return options_.block_tokens; }
  int64_t row() const { return row_; }
  int layers() const { return layers_; }
  // Bytes of one block: layers * block_tokens * row * sizeof(dtype).
  int64_t block_bytes() const { return block_bytes_; }
  bool bounded() const { return options_.bytes > 0; }
  // Blocks that hold `tokens` positions.
  int64_t BlocksFor(int64_t tokens) const {
    return (tokens + options_.block_tokens - 1) / options_.block_tokens;
  }
  int64_t total_blocks() const { return max_blocks_; }
  // Blocks that Allocate can hand out now: never used, released, or cached and unreferenced.
  int64_t free_blocks() const;
  KvCacheStats stats() const;

  // Appends `n` fresh blocks (reference count 1) to `table`: all of them, or none and false
  // when the pool has fewer free (evicting cached blocks as needed).
  [[nodiscard]] bool Allocate(int64_t n, std::vector<int32_t>* table);
  // Drops one reference on each block.
  void Release(absl::Span<const int32_t> blocks);

  // Prefix caching. The hash of a full block given its parent's (0 for the first block).
  static uint64_t ChainHash(uint64_t parent, absl::Span<const int32_t> tokens);
  // The cached block for (parent, tokens), with a new reference taken on it; -1 if none.
  int32_t Lookup(uint64_t parent, absl::Span<const int32_t> tokens);
  // Makes a full block findable by Lookup (no-op when prefix caching is off or an equal block
  // is registered already).
  void Register(int32_t block, uint64_t parent, absl::Span<const int32_t> tokens);
  // Counts a prefix lookup of `query` tokens of which `hit` were found.
  void CountPrefixLookup(int64_t query, int64_t hit);

  // Rows [slot, slot + n) of `layer` in `block` from F32 (rounded when the cache is BF16).
  // rows: [n, row] f32
  void Write(int32_t block, int layer, int64_t slot, const float* rows, int64_t n);
  // The first `n` rows of `layer` in `block` as F32. out: [n, row] f32
  void Read(int32_t block, int layer, int64_t n, float* out) const;
  // The rows of `layer` in `block` in place, [block_tokens, row] in the cache's dtype
  // (options().dtype: F32, or BF16 as uint16 bit patterns).
  const void* Rows(int32_t block, int layer) const;

 private:
  struct Entry {
    int32_t block = -1;
    uint64_t parent = 0;
    std::vector<int32_t> tokens;
  };
  struct BlockMeta {
    int32_t refs = 0;
    bool registered = false;
    uint64_t hash = 0;
    std::list<int32_t>::iterator lru;  // valid while refs == 0 && registered
  };

  KvCache(const KvCacheOptions& options, int layers, int64_t row);
  uint8_t* BlockData(int32_t block) const;
  bool GrowLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void UnregisterLocked(int32_t block) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const KvCacheOptions options_;
  const int layers_;
  const int64_t row_;
  const int64_t elem_bytes_;
  const int64_t block_bytes_;
  int64_t max_blocks_ = 0;
  int64_t blocks_per_chunk_ = 1;

  mutable absl::Mutex mu_;
  // Chunks of blocks_per_chunk_ blocks; block b lives in chunk b / blocks_per_chunk_. Sized
  // once at construction and each slot written once before its blocks are handed out, so
  // BlockData reads it without the lock.
  std::vector<std::unique_ptr<uint8_t[]>> chunks_;
  int64_t allocated_blocks_ ABSL_GUARDED_BY(mu_) = 0;  // blocks backed by a chunk
  std::vector<BlockMeta> meta_ ABSL_GUARDED_BY(mu_);
  std::vector<int32_t> free_ ABSL_GUARDED_BY(mu_);     // unreferenced, unregistered
  std::list<int32_t> evictable_ ABSL_GUARDED_BY(mu_);  // unreferenced, registered; LRU first
  absl::flat_hash_map<uint64_t, Entry> index_ ABSL_GUARDED_BY(mu_);
  int64_t used_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t prefix_query_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t prefix_hit_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace moemesh

// Engine: the dense half of an MoE transformer, with the MoE blocks behind MoeLayer.
//
// It owns embeddings, attention with a per-sequence KV cache, norms and the LM head. Step
// runs one forward pass over any mix of sequences (prefill chunks and decode tokens
// together), issuing one MoeLayer::Forward per MoE layer for the whole batch; that is what
// makes continuous batching amortise the router's network cost. The single-process engine is
// this class with an in-process MoeDispatcher; the gateway is this class with a router client.
//
// Attention is chosen by the config: grouped-query attention (Mixtral) with a per-head K/V
// cache, or DeepSeek-V3's multi-head latent attention (MLA), whose cache holds per token only
// the normalised KV latent (kv_lora_rank) and the rotated shared key part (qk_rope_head_dim).
// MLA attends in the latent space with kv_b_proj absorbed into the query and the output (as
// DeepSeek's inference/model.py does with attn_impl="absorb"), so the cache is never expanded.
//
// The KV cache is paged (services/engine/kv_cache.h): each sequence holds a table of
// fixed-size blocks from one pool whose size bounds the memory of all sequences together, and
// sequences whose tokens start alike share the blocks of that prefix. Attention gathers a
// sequence's blocks into F32 before the backend's kernel runs.
//
// Micro-batches (set_micro_batches): with B > 1, Step splits its rows into up to B parts of
// nearly equal token counts (inputs in order; a prefill chunk may be cut between two parts, so
// a lone long prompt overlaps too) and pipelines them layer by layer: while part A's MoE
// call for layer L is in flight (MoeLayer::StartForward), part B's attention for layer L runs,
// and so on round the parts, so the dense compute here overlaps the network and the experts
// (the ping-pong of MegaScale-Infer, DeepSeek's dual micro-batch overlap). Every kernel is
// row-invariant, so the logits are the same whatever B.
//
// Splitting is not free: each part reads the experts' weights again, and on shared cores (or
// with little network latency to hide) a decode step can be slower split than whole. With
// MicroBatchPolicy::kAdaptive, each step of more than one token is run whole or split by which
// has been faster per token for steps of about its size (power-of-two buckets of the token
// count): the two are tried in turn, split first, three times each per bucket, then the faster
// one is kept, and every 16th step of the bucket tries the other again so that the choice
// follows the load.
//
// Threading: Step may be called by one thread at a time; the Sequence objects passed to it
// must not be touched by others meanwhile. Sequences may be made and destroyed on any thread.
// Loading is thread-compatible.
#pragma once

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "services/compute/backend.h"
#include "services/engine/kv_cache.h"
#include "services/model/config.h"
#include "services/model/safetensors.h"
#include "services/moe/moe_layer.h"
#include "services/tensor/tensor.h"
#include "services/tensor/weight.h"

namespace moemesh {

// The KV cache and length of one sequence: a table of blocks from the engine's KvCache
// (released when the sequence is destroyed) and the tokens whose rows they hold. Rows past
// length() are scratch: a failed step leaves length() unchanged, so the sequence can
// continue or be retried.
class Sequence {
 public:
  ~Sequence();
  Sequence(const Sequence&) = delete;
  Sequence& operator=(const Sequence&) = delete;

  int64_t length() const { return length_; }
  // Token rows the sequence's blocks hold (>= length()).
  int64_t capacity() const;
  int64_t blocks() const { return static_cast<int64_t>(blocks_.size()); }
  // Floats' worth of cache this sequence's blocks hold, over all layers (F32 floats; a BF16
  // cache takes half the bytes).
  int64_t cache_floats() const;
  // Tokens taken from the prefix cache instead of being computed.
  int64_t prefix_hit_tokens() const { return prefix_hit_tokens_; }

 private:
  friend class Engine;
  explicit Sequence(std::shared_ptr<KvCache> cache) : cache_(std::move(cache)) {}
  std::shared_ptr<KvCache> cache_;
  int64_t length_ = 0;
  int64_t prefix_hit_tokens_ = 0;
  std::vector<int32_t> blocks_;   // block table: position p lives in blocks_[p / block_tokens]
  std::vector<int32_t> tokens_;   // the length_ tokens whose rows are cached
  std::vector<uint64_t> hashes_;  // prefix-chain hash of each full block, in order
};

// Where one Step's wall time went on the calling thread (summed over steps in
// Engine::profile()).
struct StepProfile {
  int64_t steps = 0;
  double wall_s = 0;      // inside Step
  double moe_wait_s = 0;  // waiting for MoE results, with nothing else to compute
  // The calling thread's time by stage, without the waits above:
  double attention_s = 0;  // per layer: input norm, Q/K/V/O products, RoPE, KV store, attention
  double moe_call_s = 0;   // starting MoE calls: post-attention norm, then the call (an
                           // in-process MoE layer computes gating and experts inside it; a
                           // remote one encodes and sends)
  double dense_ffn_s = 0;  // the FFN of dense layers (DeepSeek's first layers), with its norm
  double lm_head_s = 0;    // final norm and LM head on the rows whose logits are wanted
  double busy_s() const { return wall_s - moe_wait_s; }
  // Embedding, KV block bookkeeping, merging MoE results, splitting the logits: the rest.
  double other_s() const {
    return wall_s - moe_wait_s - attention_s - moe_call_s - dense_ffn_s - lm_head_s;
  }
  // Steps that ran their layers, by kind (0: decode, every input one token; 1: with a prefill
  // chunk) and by the micro-batches they were cut into (1 .. 8): whether the adaptive policy
  // split them, for operators and benchmarks.
  int64_t by_parts[2][9] = {};
};

enum class MicroBatchPolicy {
  kAlways,    // every step of more than one token is split into micro_batches() parts
  kAdaptive,  // whole or split, whichever has been faster for steps of that size
};

struct StepInput {
  Sequence* seq = nullptr;
  absl::Span<const int32_t> tokens;  // appended at positions seq->length() ...
  bool all_logits = false;           // logits of every new token, else of the last only
};

class Engine {
 public:
  // Loads the dense weights from `ckpt`. `moe` handles every MoE layer; backend and moe must
  // outlive the engine.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<Engine>> Load(const Checkpoint& ckpt,
                                                                    const ModelConfig& cfg,
                                                                    ComputeBackend* backend,
                                                                    MoeLayer* moe);
  ~Engine();

  const ModelConfig& config() const { return cfg_; }

  // Replaces the KV cache pool (by default unbounded, F32, 16-token blocks). Sequences made
  // before keep the old pool. Not to be called while a Step runs.
  [[nodiscard]] absl::Status ConfigureKvCache(const KvCacheOptions& options);
  KvCache& kv_cache() const { return *kv_; }

  // An empty sequence with no blocks.
  std::unique_ptr<Sequence> NewSequence() const;
  // Gives `seq` blocks for `tokens` positions in all; false (nothing allocated) when the pool
  // has too few free blocks.
  [[nodiscard]] bool Reserve(Sequence* seq, int64_t tokens) const;
  // For an empty sequence about to take `tokens`: attaches the cached blocks of its longest
  // cached prefix of full blocks, leaving at least the last token to compute, and returns
  // the tokens attached (the sequence's new length). The caller counts the lookup
  // (KvCache::CountPrefixLookup) once it uses the sequence.
  int64_t AttachCachedPrefix(Sequence* seq, absl::Span<const int32_t> tokens) const;
  // Floats the KV cache holds per token per layer: 2 * kv_heads * head_dim for GQA,
  // kv_lora_rank + qk_rope_head_dim for MLA.
  int64_t cache_floats_per_token_per_layer() const { return k_row_ + v_row_; }
  // Bytes the dense weights occupy in memory (embeddings, attention, dense FFNs, norms, LM
  // head; the experts are the MoeLayer's).
  int64_t weight_bytes() const;
  // Bytes of dense weights one decode step reads: all of them but the embedding table, of which
  // it reads one row per token (an LM head tied to the embeddings is read whole).
  int64_t dense_bytes_per_step() const;
  // Softmax scale of attention scores (with YaRN's mscale² for MLA when rope_scaling is set).
  float attention_scale() const { return attn_scale_; }

  // One forward pass. Returns per input its logits, [n or 1, vocab]. On error no sequence
  // advances. INVALID_ARGUMENT for out-of-range tokens or a sequence past max positions;
  // RESOURCE_EXHAUSTED when the KV cache has no blocks for the new tokens (callers that
  // bound memory Reserve first) or memory runs out.
  [[nodiscard]] absl::StatusOr<std::vector<Tensor>> Step(absl::Span<const StepInput> inputs,
                                                         const CallOptions& opts = {});

  // Micro-batches each step is split into (1: one MoE call per layer for the whole batch).
  // INVALID_ARGUMENT outside [1, 8]. Not to be called while a Step runs.
  [[nodiscard]] absl::Status set_micro_batches(int n);
  int micro_batches() const { return micro_batches_; }
  // How micro_batches() > 1 is used (default kAlways). Not to be called while a Step runs.
  void set_micro_batch_policy(MicroBatchPolicy p) { micro_batch_policy_ = p; }
  // Steps run whole / split by the adaptive policy since start. Thread-safe.
  std::pair<int64_t, int64_t> adaptive_split_counts() const;
  // Totals since start. Thread-safe.
  StepProfile profile() const;

  // Logits of every position of `tokens` from an empty context: [n, vocab].
  [[nodiscard]] absl::StatusOr<Tensor> Score(absl::Span<const int32_t> tokens,
                                             const CallOptions& opts = {});

 private:
  struct Layer;
  struct Part;
  Engine() = default;
  // inputs[i]'s new tokens sit at positions starts[i] ... of its sequence. out: [t, hidden],
  // accumulated into.
  absl::Status Attention(int layer, absl::Span<const StepInput> inputs,
                         absl::Span<const int64_t> starts, const float* xn, int64_t t,
                         const int32_t* positions, float* out);
  absl::Status MlaAttention(int layer, absl::Span<const StepInput> inputs,
                            absl::Span<const int64_t> starts, const float* xn, int64_t t,
                            const int32_t* positions, float* out);
  [[nodiscard]] absl::Status LoadMla(const Checkpoint& ckpt, int layer, Layer* out) const;
  absl::StatusOr<std::vector<Tensor>> StepImpl(absl::Span<const StepInput> inputs,
                                               const CallOptions& opts);
  // Writes the new rows of `in` (at positions start ...) into its blocks. Then, when the backend
  // reads segmented caches (and, for a BF16 cache, the new rows are few), fills segments_ with
  // its blocks' rows of `layer` in place
  // (kv_->block_tokens() rows each, in kv_'s dtype) and returns nullptr;
  // otherwise gathers its context of `layer` up to the new rows as F32 into ctx_
  // ([start + n, row]) and returns that.
  // rows: [n, row] f32
  const float* StoreAndGather(int layer, const StepInput& in, int64_t start, const float* rows);
  // After StoreAndGather returned nullptr: the paged view of `in`'s cache (segments_, their
  // size and dtype) in `as`.
  void InPlaceView(const StepInput& in, AttentionShape* as) const;

  ModelConfig cfg_;
  ComputeBackend* backend_ = nullptr;
  MoeLayer* moe_ = nullptr;
  Weight embed_;    // [vocab, hidden], checkpoint dtype; rows dequantised on lookup
  Tensor norm_;     // [hidden]
  Weight lm_head_;  // [vocab, hidden]
  std::vector<float> inv_freq_;
  float rope_mscale_ = 1.0f;
  float attn_scale_ = 1.0f;
  int64_t k_row_ = 0, v_row_ = 0;  // floats per cached token per layer
  std::shared_ptr<KvCache> kv_;
  std::vector<float> ctx_;             // Step scratch: one sequence's gathered context of one layer
  std::vector<const void*> segments_;  // Step scratch: one sequence's blocks of one layer
  std::vector<std::unique_ptr<Layer>> layers_;
  int micro_batches_ = 1;
  MicroBatchPolicy micro_batch_policy_ = MicroBatchPolicy::kAlways;
  // The adaptive policy's record: per bucket of step sizes, for "whole" (0) and "split" (1),
  // how often each ran and a moving average of its seconds per token.
  struct SplitArm {
    int64_t runs = 0;
    double seconds_per_token = 0;
  };
  struct SplitBucket {
    SplitArm arm[2];
    int64_t steps = 0;
  };
  // Picks whole (0) or split (1) for a step of `tokens` tokens.
  int ChooseSplit(int64_t tokens);
  void RecordSplit(int64_t tokens, int arm, double seconds);
  int step_split_arm_ = -1;  // the choice in the running Step (-1: none made)
  int64_t step_tokens_ = 0;
  mutable absl::Mutex split_mu_;
  std::vector<SplitBucket> split_buckets_ ABSL_GUARDED_BY(split_mu_) = std::vector<SplitBucket>(40);
  mutable absl::Mutex profile_mu_;
  StepProfile profile_ ABSL_GUARDED_BY(profile_mu_);
};

}  // namespace moemesh

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
// Threading: Step may be called by one thread at a time; the Sequence objects passed to it
// must not be touched by others meanwhile. Loading is thread-compatible.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "services/compute/backend.h"
#include "services/model/config.h"
#include "services/model/safetensors.h"
#include "services/moe/moe_layer.h"
#include "services/tensor/tensor.h"
#include "services/tensor/weight.h"

namespace moemesh {

// The KV cache and length of one sequence. Rows past length() are scratch: a failed step
// leaves length() unchanged, so the sequence can continue or be retried.
class Sequence {
 public:
  int64_t length() const { return length_; }
  // Token rows allocated in the cache of each layer (>= length()).
  int64_t capacity() const { return capacity_; }
  // Floats allocated for this sequence's cache, over all layers.
  int64_t cache_floats() const;

 private:
  friend class Engine;
  int64_t length_ = 0;
  int64_t capacity_ = 0;
  std::vector<std::vector<float>> k_;  // per layer: [capacity, k_row] (MLA: compressed latent)
  std::vector<std::vector<float>> v_;  // per layer: [capacity, v_row] (MLA: unused)
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
  std::unique_ptr<Sequence> NewSequence() const;
  // Floats the KV cache holds per token per layer: 2 * kv_heads * head_dim for GQA,
  // kv_lora_rank + qk_rope_head_dim for MLA.
  int64_t cache_floats_per_token_per_layer() const { return k_row_ + v_row_; }
  // Bytes the dense weights occupy in memory (embeddings, attention, dense FFNs, norms, LM
  // head; the experts are the MoeLayer's).
  int64_t weight_bytes() const;
  // Softmax scale of attention scores (with YaRN's mscale² for MLA when rope_scaling is set).
  float attention_scale() const { return attn_scale_; }

  // One forward pass. Returns per input its logits, [n or 1, vocab]. On error no sequence
  // advances. INVALID_ARGUMENT for out-of-range tokens or a sequence past max positions.
  [[nodiscard]] absl::StatusOr<std::vector<Tensor>> Step(absl::Span<const StepInput> inputs,
                                                         const CallOptions& opts = {});

  // Logits of every position of `tokens` from an empty context: [n, vocab].
  [[nodiscard]] absl::StatusOr<Tensor> Score(absl::Span<const int32_t> tokens,
                                             const CallOptions& opts = {});

 private:
  struct Layer;
  Engine() = default;
  absl::Status Attention(int layer, absl::Span<const StepInput> inputs, const float* xn, int64_t t,
                         const std::vector<int32_t>& positions, float* out);
  absl::Status MlaAttention(int layer, absl::Span<const StepInput> inputs, const float* xn,
                            int64_t t, const std::vector<int32_t>& positions, float* out);
  [[nodiscard]] absl::Status LoadMla(const Checkpoint& ckpt, int layer, Layer* out) const;
  void Reserve(Sequence* seq, int64_t needed) const;

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
  std::vector<std::unique_ptr<Layer>> layers_;
};

}  // namespace moemesh

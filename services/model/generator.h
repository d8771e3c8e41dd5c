// Random checkpoints in the Hugging Face layout, for tests and benchmarks.
//
// Weights are deterministic in (seed, tensor name), so the same options always give the same
// bytes. Scales keep activations O(1) through any depth, give distinct tokens clearly
// different logits, and give the router clear winners among experts. The directory gets
// config.json, model.safetensors (or shards with an index) and a byte-level tokenizer.json.
//
// Layouts: MixtralForCausalLM, and DeepseekV3ForCausalLM with the tensor names of the
// published checkpoints (MLA self_attn.{q_a_proj, q_a_layernorm, q_b_proj | q_proj,
// kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj}, mlp.gate.weight and
// e_score_correction_bias, mlp.experts.E.*, mlp.shared_experts.*, dense layers' mlp.*, and
// num_nextn_predict_layers extra multi-token-prediction layers that the engine never loads).
// With dtype F8_E4M3 every 2-D projection is block-quantised (weight + weight_scale_inv, see
// fp8.h) and config.json gets quantization_config, as R1 ships; norms, embeddings, the router
// gate and lm_head are then BF16 and e_score_correction_bias F32.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "services/model/config.h"
#include "services/tensor/tensor.h"

namespace moemesh {

struct GeneratorOptions {
  ModelConfig config;
  DType dtype = DType::kF32;  // kF8E4M3: FP8 block-quantised projections (see above)
  uint64_t seed = 0;
  size_t shard_bytes = 0;  // 0: one file; otherwise shards of about this size
};

// A small Mixtral config for tests: vocab, hidden, inter, layers, heads, kv heads, experts.
ModelConfig SmallMixtralConfig(int vocab = 96, int hidden = 32, int inter = 48, int layers = 2,
                               int heads = 4, int kv_heads = 2, int experts = 8, int top_k = 2);

// A small DeepSeek-V3 config for tests: 8 experts in 4 groups (2 kept), top-2, one shared
// expert, the first layer dense, q LoRA, sigmoid noaux_tc routing with scaling 2.5, no YaRN.
ModelConfig SmallDeepseekConfig(int vocab = 96, int hidden = 64, int layers = 3);

[[nodiscard]] absl::Status GenerateModel(const GeneratorOptions& options, const std::string& dir);

}  // namespace moemesh

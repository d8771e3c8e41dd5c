#include "services/engine/inproc.h"

#include "absl/strings/str_cat.h"
#include "services/common/status_macros.h"
#include "services/moe/local_expert_group.h"

namespace moemesh {

absl::Status ApplyTopKOverride(int top_k, ModelConfig* cfg) {
  if (top_k <= 0) return absl::OkStatus();
  if (top_k > cfg->num_experts) {
    return absl::InvalidArgumentError(
        absl::StrCat("top-k ", top_k, " exceeds the ", cfg->num_experts, " experts of the model"));
  }
  ModelConfig changed = *cfg;
  changed.top_k = top_k;
  RETURN_IF_ERROR(ValidateRouting(changed), "top-k override");
  *cfg = changed;
  return absl::OkStatus();
}

std::vector<ExpertKey> DefaultPlacement(const ModelConfig& cfg, int g, int groups) {
  std::vector<ExpertKey> keys;
  const int lo = static_cast<int>(static_cast<int64_t>(cfg.num_experts) * g / groups);
  const int hi = static_cast<int>(static_cast<int64_t>(cfg.num_experts) * (g + 1) / groups);
  for (int layer : cfg.MoeLayers()) {
    for (int e = lo; e < hi; ++e) keys.push_back({layer, e});
    if (g == 0 && cfg.n_shared_experts > 0) keys.push_back({layer, kSharedExpertId});
  }
  return keys;
}

absl::StatusOr<std::optional<DType>> ParseWeightsDType(absl::string_view flag) {
  if (flag.empty() || flag == "checkpoint") return std::optional<DType>();
  if (flag == "f32") return std::optional<DType>(DType::kF32);
  if (flag == "bf16") return std::optional<DType>(DType::kBF16);
  if (flag == "f16") return std::optional<DType>(DType::kF16);
  return absl::InvalidArgumentError(
      absl::StrCat("--weights_dtype must be checkpoint, f32, bf16 or f16, got '", flag, "'"));
}

absl::StatusOr<std::unique_ptr<Checkpoint>> OpenModelCheckpoint(
    const std::string& dir, const ModelConfig& cfg, std::optional<DType> weights_dtype) {
  ASSIGN_OR_RETURN(auto ckpt, Checkpoint::Open(dir));
  if (cfg.fp8_block_rows > 0) ckpt->set_fp8_block(cfg.fp8_block_rows, cfg.fp8_block_cols);
  ckpt->set_weights_dtype(weights_dtype);
  return ckpt;
}

absl::StatusOr<std::unique_ptr<InprocModel>> InprocModel::Load(const std::string& dir,
                                                               const InprocOptions& options) {
  auto m = std::make_unique<InprocModel>();
  ASSIGN_OR_RETURN(m->config, LoadModelConfig(dir));
  RETURN_IF_ERROR(ApplyTopKOverride(options.top_k, &m->config));
  if (options.groups < 1 || options.groups > m->config.num_experts) {
    return absl::InvalidArgumentError(
        absl::StrCat("groups must be in [1, ", m->config.num_experts, "]"));
  }
  ASSIGN_OR_RETURN(m->checkpoint, OpenModelCheckpoint(dir, m->config, options.weights_dtype));
  m->backend = MakeCpuBackend();
  std::vector<MoeDispatcher::GroupEntry> groups;
  for (int g = 0; g < options.groups; ++g) {
    std::vector<ExpertKey> keys = DefaultPlacement(m->config, g, options.groups);
    ASSIGN_OR_RETURN(auto group,
                     LocalExpertGroup::Load(*m->checkpoint, m->config, keys, m->backend.get(),
                                            absl::StrCat("local-", g)));
    m->expert_weight_bytes += group->weight_bytes();
    m->groups.push_back(group.get());
    groups.push_back({std::shared_ptr<ExpertGroup>(std::move(group)), keys});
  }
  ASSIGN_OR_RETURN(auto gates, MoeDispatcher::LoadGates(*m->checkpoint, m->config));
  ASSIGN_OR_RETURN(m->moe, MoeDispatcher::Create(m->config, std::move(gates), std::move(groups),
                                                 m->backend.get()));
  ASSIGN_OR_RETURN(m->engine,
                   Engine::Load(*m->checkpoint, m->config, m->backend.get(), m->moe.get()));
  return m;
}

}  // namespace moemesh

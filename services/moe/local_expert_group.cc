#include "services/moe/local_expert_group.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "services/common/status_macros.h"

namespace moemesh {

absl::Status ValidateExpertBatch(const ExpertBatch& b, int64_t hidden, int num_experts) {
  if (b.tokens.empty() || b.tokens.rank() != 2 || b.tokens.dim(1) != hidden) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokens must be [n, ", hidden, "], got ",
                     b.tokens.empty() ? "none" : b.tokens.ShapeString()));
  }
  const int64_t n = b.num_tokens();
  for (size_t i = 0; i < b.rows.size(); ++i) {
    if (b.rows[i] < 0 || b.rows[i] >= b.tokens.dim(0)) {
      return absl::InvalidArgumentError(
          absl::StrCat("token ", i, " names row ", b.rows[i], " of ", b.tokens.dim(0)));
    }
  }
  if (static_cast<int64_t>(b.offsets.size()) != n + 1 || b.offsets[0] != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "offsets must have ", n + 1, " entries starting at 0, got ", b.offsets.size()));
  }
  for (int64_t i = 0; i < n; ++i) {
    if (b.offsets[i + 1] < b.offsets[i]) {
      return absl::InvalidArgumentError(absl::StrCat("offsets decrease at token ", i));
    }
  }
  if (static_cast<size_t>(b.offsets[n]) != b.assignments.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "offsets end at ", b.offsets[n], " but there are ", b.assignments.size(), " assignments"));
  }
  for (const ExpertAssignment& a : b.assignments) {
    if (!std::isfinite(a.weight))
      return absl::InvalidArgumentError("assignment weight is not finite");
    if (a.expert != kSharedExpertId && (a.expert < 0 || a.expert >= num_experts)) {
      return absl::InvalidArgumentError(absl::StrCat("layer ", b.layer, " has no expert ", a.expert,
                                                     " (experts are 0..", num_experts - 1, ")"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<LocalExpertGroup>> LocalExpertGroup::Load(
    const Checkpoint& ckpt, const ModelConfig& cfg, std::vector<ExpertKey> experts,
    ComputeBackend* backend, std::string name) {
  std::unique_ptr<LocalExpertGroup> g(new LocalExpertGroup());
  g->name_ = std::move(name);
  g->backend_ = backend;
  g->hidden_ = cfg.hidden_size;
  g->num_experts_ = cfg.num_experts;
  std::sort(experts.begin(), experts.end());
  experts.erase(std::unique(experts.begin(), experts.end()), experts.end());
  for (const ExpertKey& key : experts) {
    if (key.layer < 0 || key.layer >= cfg.num_layers || !cfg.IsMoeLayer(key.layer)) {
      return absl::InvalidArgumentError(absl::StrCat("layer ", key.layer, " is not an MoE layer"));
    }
    if (key.expert != kSharedExpertId && (key.expert < 0 || key.expert >= cfg.num_experts)) {
      return absl::InvalidArgumentError(
          absl::StrCat("layer ", key.layer, " has no expert ", key.expert));
    }
    if (key.expert == kSharedExpertId && cfg.n_shared_experts == 0) {
      return absl::InvalidArgumentError("the model has no shared experts");
    }
    const bool shared = key.expert == kSharedExpertId;
    const ExpertTensorNames names =
        shared ? SharedExpertNames(cfg, key.layer) : RoutedExpertNames(cfg, key.layer, key.expert);
    const int64_t inter =
        static_cast<int64_t>(cfg.moe_intermediate_size) * (shared ? cfg.n_shared_experts : 1);
    const int64_t h = cfg.hidden_size;
    ExpertWeights w;
    ASSIGN_OR_RETURN(w.w1, ckpt.LoadWeight(names.gate, std::vector<int64_t>{inter, h}));
    ASSIGN_OR_RETURN(w.w3, ckpt.LoadWeight(names.up, std::vector<int64_t>{inter, h}));
    ASSIGN_OR_RETURN(w.w2, ckpt.LoadWeight(names.down, std::vector<int64_t>{h, inter}));
    const int64_t bytes = w.w1.bytes() + w.w3.bytes() + w.w2.bytes();
    g->weight_bytes_ += bytes;
    g->expert_bytes_[key] = bytes;
    g->weights_.emplace(key, std::move(w));
  }
  g->experts_ = std::move(experts);
  return g;
}

void LocalExpertGroup::RunExpertsAsync(std::shared_ptr<const ExpertBatch> batch,
                                       const CallOptions& opts, ExpertDone done) {
  if (opts.cancel && opts.cancel->cancelled()) {
    done(absl::CancelledError("cancelled"));
    return;
  }
  done(Run(*batch));
}

absl::StatusOr<Tensor> LocalExpertGroup::Run(const ExpertBatch& b) const {
  RETURN_IF_ERROR(ValidateExpertBatch(b, hidden_, num_experts_));
  const int64_t n = b.num_tokens();
  // Bucket (token, weight) pairs by expert. Experts are visited in id order, so a token's
  // contributions are summed in a fixed order whatever the batch composition.
  absl::flat_hash_map<int32_t, std::vector<std::pair<int32_t, float>>> by_expert;
  absl::flat_hash_set<int32_t> touched;  // the device path's experts, for the counters
  for (int64_t i = 0; i < n; ++i) {
    for (int32_t a = b.offsets[i]; a < b.offsets[i + 1]; ++a) {
      const ExpertAssignment& as = b.assignments[a];
      if (!weights_.contains(ExpertKey{b.layer, as.expert})) {
        return absl::NotFoundError(absl::StrCat(
            "expert (layer ", b.layer, ", expert ",
            as.expert == kSharedExpertId ? std::string("shared") : absl::StrCat(as.expert),
            ") is not held by ", name_));
      }
      if (device_ == nullptr) {
        by_expert[as.expert].push_back({static_cast<int32_t>(i), as.weight});
      } else {
        touched.insert(as.expert);
      }
    }
  }
  auto count = [&](int32_t e) {
    expert_runs_.fetch_add(1, std::memory_order_relaxed);
    weight_bytes_read_.fetch_add(expert_bytes_.at(ExpertKey{b.layer, e}),
                                 std::memory_order_relaxed);
  };
  if (device_ != nullptr) {  // the device buckets the call itself
    for (int32_t e : touched) count(e);
    return RunOnDevice(b);
  }
  std::vector<int32_t> order;
  for (const auto& [e, _] : by_expert) order.push_back(e);
  std::sort(order.begin(), order.end());

  Tensor out = Tensor::Zeros({n, hidden_});
  std::vector<float> x, y, work;
  for (int32_t e : order) {
    count(e);
    const auto& rows = by_expert[e];
    const ExpertWeights& w = weights_.at(ExpertKey{b.layer, e});
    const int64_t m = static_cast<int64_t>(rows.size());
    const int64_t inter = w.w1.rows;
    x.resize(m * hidden_);
    y.resize(m * hidden_);
    work.resize(2 * m * inter);
    for (int64_t r = 0; r < m; ++r) {
      std::memcpy(x.data() + r * hidden_, b.token(rows[r].first), hidden_ * sizeof(float));
    }
    backend_->ExpertFfnW(x.data(), m, w.w1, w.w3, w.w2, work.data(), y.data());
    for (int64_t r = 0; r < m; ++r) {
      float* dst = out.mutable_row(rows[r].first);
      const float* src = y.data() + r * hidden_;
      const float wt = rows[r].second;
      for (int64_t j = 0; j < hidden_; ++j) dst[j] += wt * src[j];
    }
  }
  return out;
}

std::vector<DeviceExpertWeights> LocalExpertGroup::DeviceWeights() const {
  std::vector<DeviceExpertWeights> out;
  for (const ExpertKey& key : experts_) {
    const ExpertWeights& w = weights_.at(key);
    out.push_back({key.layer, key.expert, w.w1, w.w3, w.w2});
  }
  return out;
}

void LocalExpertGroup::AttachDevice(std::unique_ptr<DeviceExperts> device) {
  device_ = std::move(device);
  // The keys stay (Run's NOT_FOUND check reads them); the weights' owners go.
  for (auto& [key, w] : weights_) w = ExpertWeights{};
}

absl::StatusOr<Tensor> LocalExpertGroup::RunOnDevice(const ExpertBatch& b) const {
  const int64_t n = b.num_tokens();
  std::vector<const float*> rows(n);
  for (int64_t i = 0; i < n; ++i) rows[i] = b.token(i);
  std::vector<int32_t> experts(b.assignments.size());
  std::vector<float> weights(b.assignments.size());
  for (size_t j = 0; j < b.assignments.size(); ++j) {
    experts[j] = b.assignments[j].expert;
    weights[j] = b.assignments[j].weight;
  }
  Tensor out = Tensor::Zeros({n, hidden_});
  DeviceExpertCall call;
  call.layer = b.layer;
  call.num_tokens = n;
  call.token_rows = rows.data();
  call.offsets = b.offsets.data();
  call.experts = experts.data();
  call.weights = weights.data();
  call.out = out.mutable_row(0);
  std::string error;
  if (!device_->Run(call, &error, nullptr)) {
    return absl::InternalError(absl::StrCat(name_, " on ", device_->device(), ": ", error));
  }
  return out;
}

absl::StatusOr<std::vector<int>> ParseIdRanges(absl::string_view spec) {
  std::vector<int> ids;
  for (absl::string_view part : absl::StrSplit(spec, ',', absl::SkipWhitespace())) {
    std::vector<absl::string_view> ends = absl::StrSplit(part, '-');
    int lo = 0, hi = 0;
    if (ends.size() == 1 && absl::SimpleAtoi(ends[0], &lo)) {
      hi = lo;
    } else if (ends.size() != 2 || !absl::SimpleAtoi(ends[0], &lo) ||
               !absl::SimpleAtoi(ends[1], &hi) || hi < lo) {
      return absl::InvalidArgumentError(absl::StrCat("bad id range '", part, "' in '", spec, "'"));
    }
    if (lo < 0) return absl::InvalidArgumentError(absl::StrCat("negative id in '", spec, "'"));
    // An int counter would overflow (and never stop) when hi is INT_MAX.
    for (int64_t i = lo; i <= hi; ++i) ids.push_back(static_cast<int>(i));
  }
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  if (ids.empty()) return absl::InvalidArgumentError(absl::StrCat("empty id list '", spec, "'"));
  return ids;
}

}  // namespace moemesh

namespace moemesh {
namespace {

// "0-3,shared" → ids, with kSharedExpertId for "shared".
absl::StatusOr<std::vector<int>> ParseExpertIds(absl::string_view spec) {
  std::vector<int> ids;
  std::vector<std::string> rest;
  for (absl::string_view part : absl::StrSplit(spec, ',', absl::SkipWhitespace())) {
    if (part == "shared") {
      ids.push_back(kSharedExpertId);
    } else {
      rest.emplace_back(part);
    }
  }
  if (!rest.empty()) {
    ASSIGN_OR_RETURN(std::vector<int> r, ParseIdRanges(absl::StrJoin(rest, ",")));
    ids.insert(ids.end(), r.begin(), r.end());
  }
  if (ids.empty()) return absl::InvalidArgumentError(absl::StrCat("no experts in '", spec, "'"));
  return ids;
}

}  // namespace

absl::StatusOr<std::vector<ExpertKey>> ExpertsFromSpec(const ModelConfig& cfg,
                                                       absl::string_view spec) {
  ASSIGN_OR_RETURN(std::vector<int> ids, ParseExpertIds(spec));
  std::vector<ExpertKey> keys;
  for (int layer : cfg.MoeLayers()) {
    for (int e : ids) {
      if (e >= cfg.num_experts) {
        return absl::InvalidArgumentError(absl::StrCat(
            "expert ", e, " does not exist (the model has ", cfg.num_experts, " per layer)"));
      }
      keys.push_back({layer, e});
    }
  }
  return keys;
}

absl::StatusOr<std::vector<ExpertKey>> ExpertsFromPlacementFile(const ModelConfig& cfg,
                                                                const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open placement file ", path));
  std::vector<ExpertKey> keys;
  std::string line;
  int lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    line = line.substr(0, line.find('#'));
    std::vector<absl::string_view> f = absl::StrSplit(line, ' ', absl::SkipWhitespace());
    if (f.empty()) continue;
    int layer;
    if (f.size() != 2 || !absl::SimpleAtoi(f[0], &layer)) {
      return absl::InvalidArgumentError(absl::StrCat(path, ":", lineno, ": expected 'LAYER IDS'"));
    }
    if (layer < 0 || layer >= cfg.num_layers || !cfg.IsMoeLayer(layer)) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ":", lineno, ": layer ", layer, " is not an MoE layer"));
    }
    ASSIGN_OR_RETURN(std::vector<int> ids, ParseExpertIds(f[1]), path, ":", lineno);
    for (int e : ids) {
      if (e >= cfg.num_experts) {
        return absl::InvalidArgumentError(
            absl::StrCat(path, ":", lineno, ": expert ", e, " does not exist"));
      }
      keys.push_back({layer, e});
    }
  }
  if (keys.empty()) return absl::InvalidArgumentError(absl::StrCat(path, ": no experts listed"));
  return keys;
}

}  // namespace moemesh

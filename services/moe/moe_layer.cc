#include "services/moe/moe_layer.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/notification.h"
#include "services/common/status_macros.h"
#include "services/moe/local_expert_group.h"

namespace moemesh {

absl::StatusOr<Tensor> MoeLayer::ForwardAndWait(int layer, const Tensor& hidden,
                                                const CallOptions& opts) {
  absl::Notification done;
  absl::StatusOr<Tensor> result;
  StartForward(layer, hidden, opts, [&](absl::StatusOr<Tensor> r) {
    result = std::move(r);
    done.Notify();
  });
  done.WaitForNotification();
  return result;
}

absl::StatusOr<absl::flat_hash_map<int, Gate>> MoeDispatcher::LoadGates(const Checkpoint& ckpt,
                                                                        const ModelConfig& cfg) {
  absl::flat_hash_map<int, Gate> gates;
  const RoutingConfig rc = RoutingConfig::From(cfg);
  for (int layer : cfg.MoeLayers()) {
    ASSIGN_OR_RETURN(Weight w,
                     ckpt.LoadWeight(GateWeightName(cfg, layer),
                                     std::vector<int64_t>{cfg.num_experts, cfg.hidden_size}));
    Tensor bias;
    if (cfg.scoring == ScoringFunc::kSigmoid && ckpt.Has(GateBiasName(cfg, layer))) {
      ASSIGN_OR_RETURN(
          bias, ckpt.LoadF32(GateBiasName(cfg, layer), std::vector<int64_t>{cfg.num_experts}));
    }
    gates.emplace(layer, Gate(rc, std::move(w), std::move(bias)));
  }
  return gates;
}

absl::StatusOr<std::unique_ptr<MoeDispatcher>> MoeDispatcher::Create(
    const ModelConfig& cfg, absl::flat_hash_map<int, Gate> gates, std::vector<GroupEntry> groups,
    ComputeBackend* backend, bool dispatch_shared) {
  std::unique_ptr<MoeDispatcher> d(new MoeDispatcher());
  d->dispatch_shared_ = dispatch_shared && cfg.n_shared_experts > 0;
  d->cfg_ = cfg;
  d->backend_ = backend;
  d->gates_ = std::move(gates);
  d->groups_ = std::move(groups);
  for (size_t g = 0; g < d->groups_.size(); ++g) {
    for (const ExpertKey& k : d->groups_[g].holds) d->holders_[k].push_back(static_cast<int>(g));
  }
  std::vector<std::string> missing;
  for (int layer : cfg.MoeLayers()) {
    if (!d->gates_.contains(layer)) missing.push_back(absl::StrCat("gate of layer ", layer));
    for (int e = 0; e < cfg.num_experts; ++e) {
      if (!d->holders_.contains(ExpertKey{layer, e}))
        missing.push_back(absl::StrCat("(layer ", layer, ", expert ", e, ")"));
    }
    if (d->dispatch_shared_ && !d->holders_.contains(ExpertKey{layer, kSharedExpertId})) {
      missing.push_back(absl::StrCat("(layer ", layer, ", shared experts)"));
    }
  }
  if (!missing.empty()) {
    const size_t shown = std::min<size_t>(missing.size(), 16);
    return absl::FailedPreconditionError(absl::StrCat(
        "no expert group holds ", missing.size(),
        " required experts: ", absl::StrJoin(missing.begin(), missing.begin() + shown, ", "),
        missing.size() > shown ? ", ..." : ""));
  }
  return d;
}

absl::StatusOr<Tensor> MoeDispatcher::Forward(int layer, const Tensor& hidden,
                                              const CallOptions& opts) {
  return ForwardAndWait(layer, hidden, opts);
}

void MoeDispatcher::StartForward(int layer, Tensor hidden, const CallOptions& opts, MoeDone done) {
  ForwardAsync(layer, std::move(hidden), opts,
               [done = std::move(done)](absl::StatusOr<Tensor> r, const DispatchStats&) {
                 done(std::move(r));
               });
}

namespace {

// State of one fan-out, shared by the group callbacks; the last one combines.
struct FanOut {
  absl::Mutex mu;
  int pending = 0;
  absl::Status status;
  Tensor out;
  std::vector<std::vector<int32_t>> rows;  // per group: token indices it was sent
  std::vector<absl::StatusOr<Tensor>> partial;
  DispatchStats stats;
  std::function<void(absl::StatusOr<Tensor>, const DispatchStats&)> done;
};

}  // namespace

void MoeDispatcher::ForwardAsync(
    int layer, Tensor hidden, const CallOptions& opts,
    std::function<void(absl::StatusOr<Tensor>, const DispatchStats&)> done) {
  DispatchStats stats;
  auto gate_it = gates_.find(layer);
  if (gate_it == gates_.end()) {
    done(absl::InvalidArgumentError(absl::StrCat(
             "layer ", layer, " is not an MoE layer of this model (", cfg_.num_layers, " layers)")),
         stats);
    return;
  }
  const Gate& gate = gate_it->second;
  if (hidden.empty() || hidden.rank() != 2 || hidden.dim(1) != gate.hidden()) {
    done(absl::InvalidArgumentError(absl::StrCat("hidden must be [T, ", gate.hidden(), "], got ",
                                                 hidden.empty() ? "none" : hidden.ShapeString())),
         stats);
    return;
  }
  const int64_t t = hidden.dim(0);
  const int64_t h = hidden.dim(1);
  const Routing routing = gate.Route(hidden.data(), t, backend_);
  stats.tokens = t;
  stats.expert_tokens.assign(cfg_.num_experts, 0);

  // Dispatch plan: per group, the tokens it gets and their (expert, weight) lists.
  const int ng = static_cast<int>(groups_.size());
  std::vector<std::vector<int32_t>> rows(ng);
  std::vector<std::vector<int32_t>> offsets(ng, std::vector<int32_t>{0});
  std::vector<std::vector<ExpertAssignment>> assigns(ng);
  std::vector<int64_t> load(ng, 0);
  const bool shared = dispatch_shared_;
  for (int64_t i = 0; i < t; ++i) {
    // Choose a group for each of the token's experts.
    std::vector<std::pair<int, ExpertAssignment>> picks;  // (group, assignment)
    auto pick = [&](int32_t expert, float weight) {
      const std::vector<int>& cands = holders_.at(ExpertKey{layer, expert});
      int chosen = -1;
      for (const auto& p : picks) {
        if (std::find(cands.begin(), cands.end(), p.first) != cands.end()) {
          chosen = p.first;
          break;
        }
      }
      if (chosen < 0) {
        chosen = cands[0];
        for (int c : cands)
          if (load[c] < load[chosen]) chosen = c;
      }
      picks.push_back({chosen, ExpertAssignment{expert, weight}});
    };
    for (int j = 0; j < routing.k; ++j) {
      const int32_t e = routing.ids[i * routing.k + j];
      ++stats.expert_tokens[e];
      pick(e, routing.weights[i * routing.k + j]);
    }
    if (shared) pick(kSharedExpertId, 1.0f);
    // Emit per group, keeping the token's experts in choice order.
    std::stable_sort(picks.begin(), picks.end(),
                     [](const auto& a, const auto& b) { return a.first < b.first; });
    for (size_t p = 0; p < picks.size(); ++p) {
      const int g = picks[p].first;
      if (p == 0 || picks[p - 1].first != g) {
        rows[g].push_back(static_cast<int32_t>(i));
        offsets[g].push_back(offsets[g].back());
        ++load[g];
        ++stats.token_sends;
      }
      assigns[g].push_back(picks[p].second);
      ++offsets[g].back();
    }
  }

  auto fan = std::make_shared<FanOut>();
  fan->partial.resize(ng);
  fan->stats = std::move(stats);
  fan->done = std::move(done);
  std::vector<std::shared_ptr<ExpertBatch>> batches(ng);
  int active = 0;
  for (int g = 0; g < ng; ++g) {
    if (rows[g].empty()) continue;
    auto b = std::make_shared<ExpertBatch>();
    b->layer = layer;
    // The step's activations are shared, not copied: every token in order as they are, a
    // subset by its row indices (gathered where the rows are used or sent).
    b->tokens = hidden;
    if (static_cast<int64_t>(rows[g].size()) != t) b->rows = rows[g];
    b->offsets = std::move(offsets[g]);
    b->assignments = std::move(assigns[g]);
    batches[g] = std::move(b);
    ++active;
  }
  fan->rows = std::move(rows);
  fan->pending = active;
  if (active == 0) {
    fan->done(Tensor::Zeros({t, h}), fan->stats);
    return;
  }
  auto finish = [fan, ng, h, t]() {
    // One group that got every token: its answer is the output, without a pass over it.
    if (fan->pending == 0) {
      int only = -1, answered = 0;
      for (int g = 0; g < ng; ++g) {
        if (!fan->rows[g].empty()) {
          only = g;
          ++answered;
        }
      }
      if (answered == 1 && static_cast<int64_t>(fan->rows[only].size()) == t &&
          fan->partial[only].ok() && fan->partial[only]->rank() == 2 &&
          fan->partial[only]->dim(0) == t && fan->partial[only]->dim(1) == h) {
        fan->done(std::move(fan->partial[only]), fan->stats);
        return;
      }
    }
    // Combine in group order so the sum does not depend on which group answered first. (The
    // sum's buffer is made only here: one group that answered alone needs none.)
    fan->out = Tensor::Zeros({t, h});
    absl::Status status;
    for (int g = 0; g < ng && status.ok(); ++g) {
      if (fan->rows[g].empty()) continue;
      if (!fan->partial[g].ok()) {
        status = fan->partial[g].status();
        break;
      }
      const Tensor& p = *fan->partial[g];
      if (p.rank() != 2 || p.dim(0) != static_cast<int64_t>(fan->rows[g].size()) || p.dim(1) != h) {
        status = absl::InternalError(
            absl::StrCat("expert group ", g, " returned shape ", p.ShapeString()));
        break;
      }
      for (size_t r = 0; r < fan->rows[g].size(); ++r) {
        float* dst = fan->out.mutable_row(fan->rows[g][r]);
        const float* src = p.row(static_cast<int64_t>(r));
        for (int64_t j = 0; j < h; ++j) dst[j] += src[j];
      }
    }
    if (status.ok()) {
      fan->done(std::move(fan->out), fan->stats);
    } else {
      fan->done(status, fan->stats);
    }
  };
  for (int g = 0; g < ng; ++g) {
    if (!batches[g]) continue;
    groups_[g].group->RunExpertsAsync(
        batches[g], opts,
        // The group's name is built only on failure: ReplicaSet::name() joins its replicas.
        [fan, g, finish, group = groups_[g].group.get()](absl::StatusOr<Tensor> r) {
          bool last;
          {
            absl::MutexLock lock(&fan->mu);
            fan->partial[g] = r.ok()
                                  ? std::move(r)
                                  : absl::StatusOr<Tensor>(WithContext(
                                        r.status(), absl::StrCat("expert group ", group->name())));
            last = --fan->pending == 0;
          }
          if (last) finish();
        });
  }
}

}  // namespace moemesh

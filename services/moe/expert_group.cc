#include "services/moe/expert_group.h"

#include <algorithm>

namespace moemesh {

void CancelFlag::Cancel() {
  std::vector<std::pair<int, std::function<void()>>> run;
  {
    absl::MutexLock lock(&mu_);
    if (cancelled_.exchange(true, std::memory_order_acq_rel)) return;
    run.swap(callbacks_);
    running_ = true;
    runner_ = std::this_thread::get_id();
  }
  for (auto& [id, fn] : run) fn();
  absl::MutexLock lock(&mu_);
  running_ = false;
}

int CancelFlag::OnCancel(std::function<void()> fn) {
  {
    absl::MutexLock lock(&mu_);
    if (!cancelled()) {
      callbacks_.emplace_back(next_id_, std::move(fn));
      return next_id_++;
    }
  }
  fn();
  return -1;
}

void CancelFlag::RemoveCallback(int id) {
  absl::MutexLock lock(&mu_);
  std::erase_if(callbacks_, [id](const auto& c) { return c.first == id; });
  if (running_ && runner_ != std::this_thread::get_id()) {
    mu_.Await(absl::Condition(
        +[](bool* running) { return !*running; }, &running_));
  }
}

}  // namespace moemesh

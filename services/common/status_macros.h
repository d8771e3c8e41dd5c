// Status propagation helpers used across every module boundary.
//
//   RETURN_IF_ERROR(DoThing());
//   RETURN_IF_ERROR(DoThing(), "while loading ", name);   // adds context to the message
//   ASSIGN_OR_RETURN(auto x, MakeX());
//   ASSIGN_OR_RETURN(auto x, MakeX(), "reading ", path);
//
// The context form keeps the status code and prefixes the message, so an error that comes
// up from deep inside a loader reads "reading /m/model.safetensors: tensor 'x': ...".
#pragma once

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace moemesh {

// Returns `s` with `context` prepended to its message; OK stays OK.
inline absl::Status WithContext(const absl::Status& s, absl::string_view context) {
  if (s.ok() || context.empty()) return s;
  return absl::Status(s.code(), absl::StrCat(context, ": ", s.message()));
}

namespace internal {
inline const absl::Status& ToStatus(const absl::Status& s) { return s; }
template <typename T>
const absl::Status& ToStatus(const absl::StatusOr<T>& s) {
  return s.status();
}
}  // namespace internal

}  // namespace moemesh

#define MOEMESH_CONCAT_INNER_(a, b) a##b
#define MOEMESH_CONCAT_(a, b) MOEMESH_CONCAT_INNER_(a, b)

#define RETURN_IF_ERROR(expr, ...)                                                               \
  do {                                                                                           \
    const ::absl::Status _moemesh_st = ::moemesh::internal::ToStatus(expr);                      \
    if (!_moemesh_st.ok())                                                                       \
      return ::moemesh::WithContext(_moemesh_st, ::absl::StrCat("" __VA_OPT__(, ) __VA_ARGS__)); \
  } while (0)

#define ASSIGN_OR_RETURN(lhs, expr, ...) \
  ASSIGN_OR_RETURN_IMPL_(MOEMESH_CONCAT_(_moemesh_so_, __LINE__), lhs, expr, __VA_ARGS__)

#define ASSIGN_OR_RETURN_IMPL_(so, lhs, expr, ...)                                             \
  auto so = (expr);                                                                            \
  if (!so.ok())                                                                                \
    return ::moemesh::WithContext(so.status(), ::absl::StrCat("" __VA_OPT__(, ) __VA_ARGS__)); \
  lhs = std::move(so).value()

// jinja::Value: the runtime value of the chat-template interpreter (services/text/
// chat_template.h), modelled on the Python objects jinja2 works with.
//
// Kinds: undefined (jinja2's default Undefined, with a hint naming what was missing), None,
// bool, int (int64), float (double), str (UTF-8), list, dict (insertion-ordered, keys are
// values), namespace (the one mutable kind, shared by reference) and function (globals,
// macros, bound methods). Lists and dicts are immutable once built and shared by pointer, so
// copying a Value is cheap. Printing, repr, truthiness, equality and tojson follow Python.
// Not thread-safe to mutate; values built by one Render stay within it.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "nlohmann/json.hpp"

namespace moemesh::jinja {

class Value;
using List = std::vector<Value>;
using DictItems = std::vector<std::pair<Value, Value>>;

struct Undefined {
  std::string hint;  // jinja2's message when the value is used: "'x' is undefined"
};
struct NoneType {};
struct Dict {
  DictItems items;
  const Value* Find(const Value& key) const;
  const Value* Find(absl::string_view key) const;
  void Set(Value key, Value value);
};
struct Namespace {
  Dict attrs;
};

struct CallArgs {
  std::vector<Value> positional;
  std::vector<std::pair<std::string, Value>> keyword;
  const Value* Keyword(absl::string_view name) const;
};

class Interpreter;
struct Function {
  std::string name;
  std::function<absl::StatusOr<Value>(Interpreter&, CallArgs&)> call;
};

class Value {
 public:
  enum class Kind {
    kUndefined,
    kNone,
    kBool,
    kInt,
    kFloat,
    kString,
    kList,
    kDict,
    kNamespace,
    kFunction
  };

  Value() : v_(Undefined{}) {}
  static Value MakeUndefined(std::string hint) { return Value(Undefined{std::move(hint)}); }
  static Value None() { return Value(NoneType{}); }
  Value(bool b) : v_(b) {}     // NOLINT: implicit on purpose, values are built inline
  Value(int64_t i) : v_(i) {}  // NOLINT
  Value(int i) : v_(static_cast<int64_t>(i)) {}                      // NOLINT
  Value(double d) : v_(d) {}                                         // NOLINT
  Value(std::string s) : v_(std::move(s)) {}                         // NOLINT
  Value(const char* s) : v_(std::string(s)) {}                       // NOLINT
  Value(absl::string_view s) : v_(std::string(s)) {}                 // NOLINT
  Value(List l) : v_(std::make_shared<const List>(std::move(l))) {}  // NOLINT
  Value(Dict d) : v_(std::make_shared<const Dict>(std::move(d))) {}  // NOLINT
  Value(std::shared_ptr<Namespace> ns) : v_(std::move(ns)) {}        // NOLINT
  Value(std::shared_ptr<const Function> f) : v_(std::move(f)) {}     // NOLINT

  // A Python tuple: a list that prints as (a, b).
  static Value Tuple(List l) {
    Value v(std::move(l));
    v.tuple_ = true;
    return v;
  }
  bool is_tuple() const { return tuple_; }

  static Value FromJson(const nlohmann::json& j);
  static Value FromJson(const nlohmann::ordered_json& j);

  Kind kind() const { return static_cast<Kind>(v_.index()); }
  bool is_undefined() const { return kind() == Kind::kUndefined; }
  bool is_none() const { return kind() == Kind::kNone; }
  bool is_bool() const { return kind() == Kind::kBool; }
  bool is_int() const { return kind() == Kind::kInt; }
  bool is_float() const { return kind() == Kind::kFloat; }
  // Python numbers: bool counts as int.
  bool is_number() const { return is_int() || is_float() || is_bool(); }
  bool is_string() const { return kind() == Kind::kString; }
  bool is_list() const { return kind() == Kind::kList; }
  bool is_dict() const { return kind() == Kind::kDict; }
  bool is_namespace() const { return kind() == Kind::kNamespace; }
  bool is_function() const { return kind() == Kind::kFunction; }

  bool as_bool() const { return std::get<bool>(v_); }
  int64_t as_int() const;    // int or bool
  double as_double() const;  // any number
  const std::string& as_string() const { return std::get<std::string>(v_); }
  const List& as_list() const { return *std::get<std::shared_ptr<const List>>(v_); }
  const Dict& as_dict() const { return *std::get<std::shared_ptr<const Dict>>(v_); }
  Namespace& as_namespace() const { return *std::get<std::shared_ptr<Namespace>>(v_); }
  const Function& as_function() const { return *std::get<std::shared_ptr<const Function>>(v_); }
  const std::string& undefined_hint() const { return std::get<Undefined>(v_).hint; }

  // Python's bool(x); undefined is false.
  bool Truthy() const;
  // str(x) as jinja2 prints it: undefined is '', None is 'None', containers use repr.
  std::string Str() const;
  // repr(x).
  std::string Repr() const;
  // Python ==, with 1 == 1.0 == True; undefined equals only undefined.
  bool Equals(const Value& other) const;
  // Python type name for error messages: 'str', 'dict', ...
  std::string TypeName() const;

 private:
  using Storage = std::variant<Undefined, NoneType, bool, int64_t, double, std::string,
                               std::shared_ptr<const List>, std::shared_ptr<const Dict>,
                               std::shared_ptr<Namespace>, std::shared_ptr<const Function>>;
  explicit Value(Undefined u) : v_(std::move(u)) {}
  explicit Value(NoneType n) : v_(n) {}
  Storage v_;
  bool tuple_ = false;
};

// Python's repr of a float: shortest round-trip digits, scientific below 1e-4 and from 1e16.
std::string FormatPythonFloat(double d);
// Python's repr of a str.
std::string PythonStringRepr(absl::string_view s);
// json.dumps(v, ensure_ascii=False, indent=indent) as HF's tojson calls it; indent < 0 means
// none (separators ', ' and ': '). Fails on undefined, functions and namespaces, and on
// non-string dict keys other than numbers, bools and None (which json.dumps converts).
absl::StatusOr<std::string> ToJson(const Value& v, int indent);

// Unicode helpers with Python semantics over UTF-8 text.
std::vector<uint32_t> DecodeUtf8(absl::string_view s);  // invalid bytes become U+FFFD
std::string EncodeUtf8(const std::vector<uint32_t>& cps);
void AppendUtf8(uint32_t cp, std::string& out);
bool IsPythonSpace(uint32_t cp);                                      // str.isspace()
std::string PythonStrip(absl::string_view s, bool left, bool right);  // str.strip() family
std::string PythonStripChars(absl::string_view s, absl::string_view chars, bool left, bool right);
std::string PythonUpper(absl::string_view s);
std::string PythonLower(absl::string_view s);

}  // namespace moemesh::jinja

#include "services/text/chat_template.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <ctime>
#include <memory>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "services/common/status_macros.h"
#include "services/text/jinja_parser.h"
#include "services/text/jinja_value.h"

namespace moemesh {
namespace jinja {

// A render-time error carrying the template position; raise_exception's message goes out
// unchanged.
namespace {

constexpr int kMaxCallDepth = 256;
constexpr int64_t kMaxRangeLength = 1 << 20;
constexpr size_t kMaxOutputBytes = size_t{256} << 20;

absl::Status Error(const Expr& at, absl::string_view message) {
  return absl::InvalidArgumentError(
      absl::StrCat("line ", at.line, ", column ", at.column, ": ", message));
}

absl::Status UndefinedError(const Value& v) {
  return absl::InvalidArgumentError(v.undefined_hint().empty() ? "value is undefined"
                                                               : v.undefined_hint());
}

// jinja2's object_type_repr, as its undefined-attribute messages print it.
std::string ObjectTypeRepr(const Value& v) {
  if (v.is_none()) return "None";
  return absl::StrCat(v.TypeName(), " object");
}

struct Scope {
  absl::flat_hash_map<std::string, Value> vars;
  std::shared_ptr<Scope> parent;

  const Value* Find(const std::string& name) const {
    for (const Scope* s = this; s != nullptr; s = s->parent.get()) {
      auto it = s->vars.find(name);
      if (it != s->vars.end()) return &it->second;
    }
    return nullptr;
  }
};

enum class Flow { kNormal, kBreak, kContinue };

// Python's sequence index normalisation for slices.
void SliceIndices(int64_t n, const Value& start, const Value& stop, const Value& step_v, int64_t& b,
                  int64_t& e, int64_t& step) {
  step = step_v.is_none() || step_v.is_undefined() ? 1 : step_v.as_int();
  auto clamp = [&](const Value& v, int64_t def, bool is_start) -> int64_t {
    if (v.is_none() || v.is_undefined()) return def;
    int64_t x = v.as_int();
    if (x < 0) x += n;
    if (step > 0) return std::clamp<int64_t>(x, 0, n);
    (void)is_start;
    return std::clamp<int64_t>(x, -1, n - 1);
  };
  if (step > 0) {
    b = clamp(start, 0, true);
    e = clamp(stop, n, false);
  } else {
    b = clamp(start, n - 1, true);
    e = clamp(stop, -1, false);
  }
}

std::string CapitalizeStr(absl::string_view s) {
  std::vector<uint32_t> cps = DecodeUtf8(s);
  std::string out;
  for (size_t i = 0; i < cps.size(); ++i) {
    std::string one;
    AppendUtf8(cps[i], one);
    out += i == 0 ? PythonUpper(one) : PythonLower(one);
  }
  return out;
}

bool IsCased(uint32_t cp) {
  std::string one;
  AppendUtf8(cp, one);
  return PythonUpper(one) != PythonLower(one);
}

// Python's str.title().
std::string PythonTitle(absl::string_view s) {
  std::string out;
  bool prev_cased = false;
  for (uint32_t cp : DecodeUtf8(s)) {
    std::string one;
    AppendUtf8(cp, one);
    const bool cased = IsCased(cp);
    out += cased ? (prev_cased ? PythonLower(one) : PythonUpper(one)) : one;
    prev_cased = cased;
  }
  return out;
}

// jinja2's title filter: capitalise each chunk split before runs of [-\s({\[<].
std::string JinjaTitle(absl::string_view s) {
  std::vector<uint32_t> cps = DecodeUtf8(s);
  auto is_sep = [](uint32_t cp) {
    return cp == '-' || cp == '(' || cp == '{' || cp == '[' || cp == '<' || IsPythonSpace(cp);
  };
  std::string out;
  size_t i = 0;
  while (i < cps.size()) {
    const bool sep = is_sep(cps[i]);
    size_t j = i;
    while (j < cps.size() && is_sep(cps[j]) == sep) ++j;
    std::vector<uint32_t> chunk(cps.begin() + i, cps.begin() + j);
    out += sep ? EncodeUtf8(chunk) : CapitalizeStr(EncodeUtf8(chunk));
    i = j;
  }
  return out;
}

std::vector<std::string> PythonSplit(const std::string& s, const Value& sep, int64_t maxsplit) {
  std::vector<std::string> parts;
  if (sep.is_none() || sep.is_undefined()) {
    std::vector<uint32_t> cps = DecodeUtf8(s);
    size_t i = 0;
    while (i < cps.size()) {
      while (i < cps.size() && IsPythonSpace(cps[i])) ++i;
      if (i >= cps.size()) break;
      if (maxsplit >= 0 && static_cast<int64_t>(parts.size()) == maxsplit) {
        size_t e = cps.size();
        while (e > i && IsPythonSpace(cps[e - 1])) --e;
        parts.push_back(EncodeUtf8(std::vector<uint32_t>(cps.begin() + i, cps.begin() + e)));
        return parts;
      }
      size_t j = i;
      while (j < cps.size() && !IsPythonSpace(cps[j])) ++j;
      parts.push_back(EncodeUtf8(std::vector<uint32_t>(cps.begin() + i, cps.begin() + j)));
      i = j;
    }
    return parts;
  }
  const std::string& d = sep.as_string();
  size_t start = 0;
  while (true) {
    if (maxsplit >= 0 && static_cast<int64_t>(parts.size()) == maxsplit) break;
    const size_t pos = s.find(d, start);
    if (pos == std::string::npos) break;
    parts.push_back(s.substr(start, pos - start));
    start = pos + d.size();
  }
  parts.push_back(s.substr(start));
  return parts;
}

std::string PythonReplace(const std::string& s, const std::string& from, const std::string& to,
                          int64_t count) {
  if (from.empty()) {
    // Python inserts `to` between characters (and at both ends).
    std::vector<uint32_t> cps = DecodeUtf8(s);
    std::string out;
    int64_t done = 0;
    for (size_t i = 0; i <= cps.size(); ++i) {
      if (count < 0 || done < count) {
        out += to;
        ++done;
      }
      if (i < cps.size()) AppendUtf8(cps[i], out);
    }
    return out;
  }
  std::string out;
  size_t start = 0;
  int64_t done = 0;
  while (count < 0 || done < count) {
    const size_t pos = s.find(from, start);
    if (pos == std::string::npos) break;
    out.append(s, start, pos - start);
    out += to;
    start = pos + from.size();
    ++done;
  }
  out.append(s, start, std::string::npos);
  return out;
}

std::string HtmlEscape(absl::string_view s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&#34;";
        break;
      case '\'':
        out += "&#39;";
        break;
      default:
        out += c;
    }
  }
  return out;
}

// Python-style strftime for strftime_now; the C library's formatting in UTC.
std::string StrftimeUtc(const std::string& format, absl::Time now) {
  const std::time_t t = absl::ToTimeT(now);
  std::tm tm{};
  gmtime_r(&t, &tm);
  std::string buf(256 + format.size() * 8, '\0');
  const size_t n = std::strftime(buf.data(), buf.size(), format.c_str(), &tm);
  buf.resize(n);
  return buf;
}

}  // namespace

class Interpreter {
 public:
  explicit Interpreter(absl::Time now) : now_(now) {}

  absl::StatusOr<std::string> Render(const Program& program, const Value& context) {
    auto globals = std::make_shared<Scope>();
    InstallGlobals(*globals);
    auto top = std::make_shared<Scope>();
    top->parent = globals;
    if (context.is_dict()) {
      for (const auto& [k, v] : context.as_dict().items) {
        if (k.is_string()) top->vars[k.as_string()] = v;
      }
    }
    std::string out;
    out_ = &out;
    ASSIGN_OR_RETURN(Flow flow, RenderBody(program.body, top));
    (void)flow;
    return out;
  }

  absl::StatusOr<Value> CallValue(const Value& callee, CallArgs& args, const Expr& at) {
    if (callee.is_undefined()) return UndefinedError(callee);
    if (!callee.is_function()) {
      return Error(at, absl::StrCat("'", callee.TypeName(), "' object is not callable"));
    }
    if (++depth_ > kMaxCallDepth) {
      --depth_;
      return Error(at, "maximum call depth exceeded");
    }
    absl::StatusOr<Value> r = callee.as_function().call(*this, args);
    --depth_;
    return r;
  }

 private:
  using ScopePtr = std::shared_ptr<Scope>;

  void InstallGlobals(Scope& g) {
    auto fn = [](std::string name,
                 std::function<absl::StatusOr<Value>(Interpreter&, CallArgs&)> f) {
      return Value(std::make_shared<const Function>(Function{std::move(name), std::move(f)}));
    };
    g.vars["raise_exception"] =
        fn("raise_exception", [](Interpreter&, CallArgs& a) -> absl::StatusOr<Value> {
          std::string msg = a.positional.empty() ? "" : a.positional[0].Str();
          return absl::InvalidArgumentError(msg);
        });
    g.vars["strftime_now"] =
        fn("strftime_now", [](Interpreter& in, CallArgs& a) -> absl::StatusOr<Value> {
          if (a.positional.empty() || !a.positional[0].is_string()) {
            return absl::InvalidArgumentError("strftime_now() takes a format string");
          }
          return Value(StrftimeUtc(a.positional[0].as_string(), in.now_));
        });
    g.vars["namespace"] = fn("namespace", [](Interpreter&, CallArgs& a) -> absl::StatusOr<Value> {
      auto ns = std::make_shared<Namespace>();
      for (const Value& p : a.positional) {
        if (!p.is_dict()) return absl::InvalidArgumentError("namespace() takes a mapping");
        for (const auto& [k, v] : p.as_dict().items) ns->attrs.Set(k, v);
      }
      for (const auto& [k, v] : a.keyword) ns->attrs.Set(Value(k), v);
      return Value(std::move(ns));
    });
    g.vars["dict"] = fn("dict", [](Interpreter&, CallArgs& a) -> absl::StatusOr<Value> {
      Dict d;
      for (const Value& p : a.positional) {
        if (!p.is_dict()) return absl::InvalidArgumentError("dict() takes a mapping");
        for (const auto& [k, v] : p.as_dict().items) d.Set(k, v);
      }
      for (const auto& [k, v] : a.keyword) d.Set(Value(k), v);
      return Value(std::move(d));
    });
    g.vars["range"] = fn("range", [](Interpreter&, CallArgs& a) -> absl::StatusOr<Value> {
      int64_t start = 0, stop = 0, step = 1;
      for (const Value& p : a.positional) {
        if (!p.is_int() && !p.is_bool()) {
          return absl::InvalidArgumentError(
              absl::StrCat("'", p.TypeName(), "' object cannot be interpreted as an integer"));
        }
      }
      if (a.positional.size() == 1) {
        stop = a.positional[0].as_int();
      } else if (a.positional.size() >= 2) {
        start = a.positional[0].as_int();
        stop = a.positional[1].as_int();
        if (a.positional.size() >= 3) step = a.positional[2].as_int();
      } else {
        return absl::InvalidArgumentError("range expected at least 1 argument, got 0");
      }
      if (step == 0) return absl::InvalidArgumentError("range() arg 3 must not be zero");
      List out;
      for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) {
        if (static_cast<int64_t>(out.size()) >= kMaxRangeLength) {
          return absl::InvalidArgumentError("range too big");
        }
        out.push_back(Value(i));
      }
      return Value(std::move(out));
    });
  }

  absl::StatusOr<Flow> RenderBody(const Body& body, const ScopePtr& scope) {
    for (const Node& node : body) {
      ASSIGN_OR_RETURN(Flow flow, RenderNode(node, scope));
      if (flow != Flow::kNormal) return flow;
      if (out_->size() > kMaxOutputBytes) {
        return absl::InvalidArgumentError("rendered chat template exceeds 256 MiB");
      }
    }
    return Flow::kNormal;
  }

  absl::StatusOr<std::string> Capture(const Body& body, const ScopePtr& scope) {
    std::string buf;
    std::string* saved = out_;
    out_ = &buf;
    absl::StatusOr<Flow> r = RenderBody(body, scope);
    out_ = saved;
    if (!r.ok()) return r.status();
    return buf;
  }

  absl::StatusOr<Flow> RenderNode(const Node& node, const ScopePtr& scope) {
    switch (node.kind) {
      case Node::Kind::kText:
        *out_ += node.text;
        return Flow::kNormal;
      case Node::Kind::kOutput: {
        ASSIGN_OR_RETURN(Value v, Eval(*node.expr, scope));
        *out_ += v.Str();
        return Flow::kNormal;
      }
      case Node::Kind::kIf: {
        for (size_t i = 0; i < node.conds.size(); ++i) {
          ASSIGN_OR_RETURN(Value c, Eval(*node.conds[i], scope));
          if (c.Truthy()) return RenderBody(node.bodies[i], scope);
        }
        return RenderBody(node.else_body, scope);
      }
      case Node::Kind::kFor:
        return RenderFor(node, scope);
      case Node::Kind::kSet:
        return RenderSet(node, scope);
      case Node::Kind::kSetBlock: {
        ASSIGN_OR_RETURN(std::string text, Capture(node.body, scope));
        Value v(std::move(text));
        if (node.expr) {
          auto inner = std::make_shared<Scope>();
          inner->parent = scope;
          inner->vars["__body__"] = v;
          ASSIGN_OR_RETURN(v, Eval(*node.expr, inner));
        }
        scope->vars[node.targets[0]] = std::move(v);
        return Flow::kNormal;
      }
      case Node::Kind::kFilterBlock: {
        ASSIGN_OR_RETURN(std::string text, Capture(node.body, scope));
        auto inner = std::make_shared<Scope>();
        inner->parent = scope;
        inner->vars["__body__"] = Value(std::move(text));
        ASSIGN_OR_RETURN(Value v, Eval(*node.expr, inner));
        *out_ += v.Str();
        return Flow::kNormal;
      }
      case Node::Kind::kMacro:
        scope->vars[node.text] = MakeMacro(node, scope, node.text);
        return Flow::kNormal;
      case Node::Kind::kCallBlock: {
        Value caller = MakeMacro(node, scope, "caller");
        const Expr& call = *node.expr;
        ASSIGN_OR_RETURN(Value callee, Eval(*call.args[0], scope));
        CallArgs args;
        RETURN_IF_ERROR(EvalArgs(call, 1, scope, args));
        args.keyword.emplace_back("caller", std::move(caller));
        ASSIGN_OR_RETURN(Value v, CallValue(callee, args, call));
        *out_ += v.Str();
        return Flow::kNormal;
      }
      case Node::Kind::kBreak:
        return Flow::kBreak;
      case Node::Kind::kContinue:
        return Flow::kContinue;
      case Node::Kind::kScope:
        return RenderBody(node.body, scope);
    }
    return Flow::kNormal;
  }

  Value MakeMacro(const Node& node, const ScopePtr& scope, const std::string& name) {
    const Node* def = &node;
    ScopePtr closure = scope;
    auto call = [def, closure](Interpreter& in, CallArgs& args) -> absl::StatusOr<Value> {
      auto local = std::make_shared<Scope>();
      local->parent = closure;
      const size_t n = def->params.size();
      List varargs;
      for (size_t i = 0; i < args.positional.size(); ++i) {
        if (i < n) {
          local->vars[def->params[i]] = args.positional[i];
        } else {
          varargs.push_back(args.positional[i]);
        }
      }
      Dict kwargs;
      for (auto& [k, v] : args.keyword) {
        bool is_param = false;
        for (size_t i = 0; i < n; ++i) {
          if (def->params[i] == k) {
            local->vars[k] = v;
            is_param = true;
          }
        }
        if (!is_param) {
          if (k == "caller") {
            local->vars["caller"] = v;
          } else {
            kwargs.Set(Value(k), v);
          }
        }
      }
      for (size_t i = 0; i < n; ++i) {
        if (local->vars.contains(def->params[i])) continue;
        if (def->defaults[i]) {
          ASSIGN_OR_RETURN(Value d, in.Eval(*def->defaults[i], local));
          local->vars[def->params[i]] = std::move(d);
        } else {
          local->vars[def->params[i]] = Value::MakeUndefined(
              absl::StrCat("parameter '", def->params[i], "' was not provided"));
        }
      }
      local->vars["varargs"] = Value(std::move(varargs));
      local->vars["kwargs"] = Value(std::move(kwargs));
      ASSIGN_OR_RETURN(std::string text, in.Capture(def->body, local));
      return Value(std::move(text));
    };
    return Value(std::make_shared<const Function>(Function{name, std::move(call)}));
  }

  absl::Status Unpack(const std::vector<std::string>& targets, const Value& item, Scope& into,
                      const Node& at) {
    if (targets.size() == 1) {
      into.vars[targets[0]] = item;
      return absl::OkStatus();
    }
    ASSIGN_OR_RETURN(List parts, Iterate(item, *at.expr));
    if (parts.size() != targets.size()) {
      return absl::InvalidArgumentError(
          absl::StrCat("line ", at.line, ": ",
                       parts.size() < targets.size() ? "not enough values to unpack"
                                                     : "too many values to unpack",
                       " (expected ", targets.size(), ", got ", parts.size(), ")"));
    }
    for (size_t i = 0; i < targets.size(); ++i) into.vars[targets[i]] = parts[i];
    return absl::OkStatus();
  }

  absl::StatusOr<Flow> RenderFor(const Node& node, const ScopePtr& scope) {
    ASSIGN_OR_RETURN(Value seq, Eval(*node.expr, scope));
    ASSIGN_OR_RETURN(List items, Iterate(seq, *node.expr));
    if (node.cond) {
      List kept;
      for (const Value& item : items) {
        auto probe = std::make_shared<Scope>();
        probe->parent = scope;
        RETURN_IF_ERROR(Unpack(node.targets, item, *probe, node));
        ASSIGN_OR_RETURN(Value c, Eval(*node.cond, probe));
        if (c.Truthy()) kept.push_back(item);
      }
      items = std::move(kept);
    }
    const int64_t n = static_cast<int64_t>(items.size());
    for (int64_t i = 0; i < n; ++i) {
      auto iter = std::make_shared<Scope>();
      iter->parent = scope;
      RETURN_IF_ERROR(Unpack(node.targets, items[i], *iter, node));
      Dict loop;
      loop.items.reserve(12);
      loop.items.emplace_back(Value("index"), Value(i + 1));
      loop.items.emplace_back(Value("index0"), Value(i));
      loop.items.emplace_back(Value("revindex"), Value(n - i));
      loop.items.emplace_back(Value("revindex0"), Value(n - i - 1));
      loop.items.emplace_back(Value("first"), Value(i == 0));
      loop.items.emplace_back(Value("last"), Value(i == n - 1));
      loop.items.emplace_back(Value("length"), Value(n));
      loop.items.emplace_back(Value("depth"), Value(1));
      loop.items.emplace_back(Value("depth0"), Value(0));
      loop.items.emplace_back(
          Value("previtem"),
          i > 0 ? items[i - 1] : Value::MakeUndefined("there is no previous item"));
      loop.items.emplace_back(
          Value("nextitem"),
          i + 1 < n ? items[i + 1] : Value::MakeUndefined("there is no next item"));
      const int64_t index0 = i;
      loop.items.emplace_back(
          Value("cycle"),
          Value(std::make_shared<const Function>(
              Function{"cycle", [index0](Interpreter&, CallArgs& a) -> absl::StatusOr<Value> {
                         if (a.positional.empty()) {
                           return absl::InvalidArgumentError("no items for cycling given");
                         }
                         return a.positional[static_cast<size_t>(index0) % a.positional.size()];
                       }})));
      iter->vars["loop"] = Value(std::move(loop));
      ASSIGN_OR_RETURN(Flow flow, RenderBody(node.body, iter));
      if (flow == Flow::kBreak) break;
    }
    if (n == 0) {
      ASSIGN_OR_RETURN(Flow flow, RenderBody(node.else_body, scope));
      return flow;
    }
    return Flow::kNormal;
  }

  absl::StatusOr<Flow> RenderSet(const Node& node, const ScopePtr& scope) {
    ASSIGN_OR_RETURN(Value v, Eval(*node.expr, scope));
    if (!node.attr.empty()) {
      const Value* target = scope->Find(node.targets[0]);
      if (target == nullptr || !target->is_namespace()) {
        return Error(*node.expr, "cannot assign attribute on non-namespace object");
      }
      target->as_namespace().attrs.Set(Value(node.attr), std::move(v));
      return Flow::kNormal;
    }
    if (node.targets.size() == 1) {
      scope->vars[node.targets[0]] = std::move(v);
      return Flow::kNormal;
    }
    RETURN_IF_ERROR(Unpack(node.targets, v, *scope, node));
    return Flow::kNormal;
  }

  // Python iteration: list items, dict keys, str characters; undefined is empty.
  absl::StatusOr<List> Iterate(const Value& v, const Expr& at) {
    switch (v.kind()) {
      case Value::Kind::kList:
        return v.as_list();
      case Value::Kind::kDict: {
        List keys;
        for (const auto& [k, val] : v.as_dict().items) keys.push_back(k);
        return keys;
      }
      case Value::Kind::kString: {
        List chars;
        for (uint32_t cp : DecodeUtf8(v.as_string())) {
          std::string one;
          AppendUtf8(cp, one);
          chars.push_back(Value(std::move(one)));
        }
        return chars;
      }
      case Value::Kind::kUndefined:
        return List{};
      default:
        return Error(at, absl::StrCat("'", v.TypeName(), "' object is not iterable"));
    }
  }

  absl::Status EvalArgs(const Expr& e, size_t first, const ScopePtr& scope, CallArgs& args) {
    for (size_t i = first; i < e.args.size(); ++i) {
      ASSIGN_OR_RETURN(Value v, Eval(*e.args[i], scope));
      args.positional.push_back(std::move(v));
    }
    for (const auto& [k, ex] : e.kwargs) {
      ASSIGN_OR_RETURN(Value v, Eval(*ex, scope));
      args.keyword.emplace_back(k, std::move(v));
    }
    return absl::OkStatus();
  }

 public:
  absl::StatusOr<Value> Eval(const Expr& e, const ScopePtr& scope) {
    switch (e.kind) {
      case Expr::Kind::kLiteral:
        return e.literal;
      case Expr::Kind::kName: {
        const Value* v = scope->Find(e.name);
        if (v == nullptr) return Value::MakeUndefined(absl::StrCat("'", e.name, "' is undefined"));
        return *v;
      }
      case Expr::Kind::kList:
      case Expr::Kind::kTuple: {
        List items;
        for (const auto& a : e.args) {
          ASSIGN_OR_RETURN(Value v, Eval(*a, scope));
          items.push_back(std::move(v));
        }
        if (e.kind == Expr::Kind::kTuple) return Value::Tuple(std::move(items));
        return Value(std::move(items));
      }
      case Expr::Kind::kDict: {
        Dict d;
        for (size_t i = 0; i + 1 < e.args.size(); i += 2) {
          ASSIGN_OR_RETURN(Value k, Eval(*e.args[i], scope));
          ASSIGN_OR_RETURN(Value v, Eval(*e.args[i + 1], scope));
          d.Set(std::move(k), std::move(v));
        }
        return Value(std::move(d));
      }
      case Expr::Kind::kGetAttr: {
        ASSIGN_OR_RETURN(Value obj, Eval(*e.args[0], scope));
        return GetAttr(obj, e.name, e);
      }
      case Expr::Kind::kGetItem: {
        ASSIGN_OR_RETURN(Value obj, Eval(*e.args[0], scope));
        ASSIGN_OR_RETURN(Value key, Eval(*e.args[1], scope));
        return GetItem(obj, key, e);
      }
      case Expr::Kind::kSlice: {
        ASSIGN_OR_RETURN(Value obj, Eval(*e.args[0], scope));
        Value parts[3] = {Value::None(), Value::None(), Value::None()};
        for (int i = 0; i < 3; ++i) {
          if (e.args[i + 1]) {
            ASSIGN_OR_RETURN(parts[i], Eval(*e.args[i + 1], scope));
            if (!parts[i].is_none() && !parts[i].is_int() && !parts[i].is_bool()) {
              return Error(e, "slice indices must be integers or None");
            }
          }
        }
        return Slice(obj, parts[0], parts[1], parts[2], e);
      }
      case Expr::Kind::kCall: {
        ASSIGN_OR_RETURN(Value callee, Eval(*e.args[0], scope));
        CallArgs args;
        RETURN_IF_ERROR(EvalArgs(e, 1, scope, args));
        return CallValue(callee, args, e);
      }
      case Expr::Kind::kFilter: {
        ASSIGN_OR_RETURN(Value operand, Eval(*e.args[0], scope));
        CallArgs args;
        RETURN_IF_ERROR(EvalArgs(e, 1, scope, args));
        return ApplyFilter(e.name, operand, args, e);
      }
      case Expr::Kind::kTest: {
        ASSIGN_OR_RETURN(Value operand, Eval(*e.args[0], scope));
        CallArgs args;
        RETURN_IF_ERROR(EvalArgs(e, 1, scope, args));
        ASSIGN_OR_RETURN(bool r, ApplyTest(e.name, operand, args, e));
        return Value(e.negated ? !r : r);
      }
      case Expr::Kind::kNot: {
        ASSIGN_OR_RETURN(Value v, Eval(*e.args[0], scope));
        return Value(!v.Truthy());
      }
      case Expr::Kind::kNeg:
      case Expr::Kind::kPos: {
        ASSIGN_OR_RETURN(Value v, Eval(*e.args[0], scope));
        if (v.is_undefined()) return UndefinedError(v);
        if (!v.is_number()) {
          return Error(
              e, absl::StrCat("bad operand type for unary ", e.kind == Expr::Kind::kNeg ? "-" : "+",
                              ": '", v.TypeName(), "'"));
        }
        if (e.kind == Expr::Kind::kPos) return v.is_bool() ? Value(v.as_int()) : v;
        if (v.is_float()) return Value(-v.as_double());
        return Value(-v.as_int());
      }
      case Expr::Kind::kAnd: {
        ASSIGN_OR_RETURN(Value l, Eval(*e.args[0], scope));
        if (!l.Truthy()) return l;
        return Eval(*e.args[1], scope);
      }
      case Expr::Kind::kOr: {
        ASSIGN_OR_RETURN(Value l, Eval(*e.args[0], scope));
        if (l.Truthy()) return l;
        return Eval(*e.args[1], scope);
      }
      case Expr::Kind::kCond: {
        ASSIGN_OR_RETURN(Value c, Eval(*e.args[1], scope));
        if (c.Truthy()) return Eval(*e.args[0], scope);
        if (e.args[2]) return Eval(*e.args[2], scope);
        return Value::MakeUndefined(
            "the inline if-expression evaluated to false and no else "
            "section was defined.");
      }
      case Expr::Kind::kBinary: {
        ASSIGN_OR_RETURN(Value l, Eval(*e.args[0], scope));
        ASSIGN_OR_RETURN(Value r, Eval(*e.args[1], scope));
        return Binary(e.name, l, r, e);
      }
    }
    return Error(e, "unsupported expression");
  }

 private:
  absl::StatusOr<Value> BoundMethod(const Value& self, const std::string& name) {
    Value receiver = self;
    std::string method = name;
    return Value(std::make_shared<const Function>(
        Function{name, [receiver, method](Interpreter& in, CallArgs& a) -> absl::StatusOr<Value> {
                   return in.CallMethod(receiver, method, a);
                 }}));
  }

  static bool IsStringMethod(absl::string_view n) {
    static constexpr absl::string_view kNames[] = {
        "startswith", "endswith",     "split",       "rsplit",     "strip",   "lstrip",  "rstrip",
        "upper",      "lower",        "title",       "capitalize", "replace", "find",    "rfind",
        "index",      "count",        "join",        "isdigit",    "isalpha", "isalnum", "isspace",
        "islower",    "isupper",      "splitlines",  "swapcase",   "zfill",   "center",  "ljust",
        "rjust",      "removeprefix", "removesuffix"};
    return std::find(std::begin(kNames), std::end(kNames), n) != std::end(kNames);
  }
  static bool IsDictMethod(absl::string_view n) {
    return n == "get" || n == "items" || n == "keys" || n == "values";
  }
  static bool IsUnsafeMutator(absl::string_view n) {
    static constexpr absl::string_view kNames[] = {
        "append",  "extend", "insert",     "pop",     "remove", "clear",  "sort",
        "reverse", "update", "setdefault", "popitem", "add",    "discard"};
    return std::find(std::begin(kNames), std::end(kNames), n) != std::end(kNames);
  }

  absl::StatusOr<Value> GetAttr(const Value& obj, const std::string& name, const Expr& at) {
    switch (obj.kind()) {
      case Value::Kind::kUndefined:
        return UndefinedError(obj);
      case Value::Kind::kDict: {
        if (IsDictMethod(name)) return BoundMethod(obj, name);
        if (IsUnsafeMutator(name)) {
          return Value::MakeUndefined(
              absl::StrCat("access to attribute '", name, "' of 'dict' object is unsafe."));
        }
        const Value* v = obj.as_dict().Find(absl::string_view(name));
        if (v != nullptr) return *v;
        return Value::MakeUndefined(absl::StrCat("'dict object' has no attribute '", name, "'"));
      }
      case Value::Kind::kNamespace: {
        const Value* v = obj.as_namespace().attrs.Find(absl::string_view(name));
        if (v != nullptr) return *v;
        return Value::MakeUndefined(
            absl::StrCat("'jinja2.utils.Namespace object' has no attribute '", name, "'"));
      }
      case Value::Kind::kString:
        if (IsStringMethod(name)) return BoundMethod(obj, name);
        break;
      case Value::Kind::kList:
        if (name == "index" || name == "count") return BoundMethod(obj, name);
        if (IsUnsafeMutator(name)) {
          return Value::MakeUndefined(
              absl::StrCat("access to attribute '", name, "' of 'list' object is unsafe."));
        }
        break;
      default:
        break;
    }
    (void)at;
    return Value::MakeUndefined(
        absl::StrCat("'", ObjectTypeRepr(obj), "' has no attribute '", name, "'"));
  }

  absl::StatusOr<Value> GetItem(const Value& obj, const Value& key, const Expr& at) {
    switch (obj.kind()) {
      case Value::Kind::kUndefined:
        return UndefinedError(obj);
      case Value::Kind::kDict: {
        const Value* v = obj.as_dict().Find(key);
        if (v != nullptr) return *v;
        if (key.is_string()) {
          if (IsDictMethod(key.as_string())) return BoundMethod(obj, key.as_string());
          return Value::MakeUndefined(
              absl::StrCat("'dict object' has no attribute '", key.as_string(), "'"));
        }
        return Value::MakeUndefined(absl::StrCat("'dict object' has no attribute ", key.Repr()));
      }
      case Value::Kind::kList:
      case Value::Kind::kString: {
        if (key.is_int() || key.is_bool()) {
          int64_t i = key.as_int();
          if (obj.is_list()) {
            const List& l = obj.as_list();
            const int64_t n = static_cast<int64_t>(l.size());
            if (i < 0) i += n;
            if (i < 0 || i >= n) {
              return Value::MakeUndefined(
                  absl::StrCat("'list object' has no attribute ", key.as_int()));
            }
            return l[static_cast<size_t>(i)];
          }
          std::vector<uint32_t> cps = DecodeUtf8(obj.as_string());
          const int64_t n = static_cast<int64_t>(cps.size());
          if (i < 0) i += n;
          if (i < 0 || i >= n) {
            return Value::MakeUndefined(
                absl::StrCat("'str object' has no attribute ", key.as_int()));
          }
          std::string one;
          AppendUtf8(cps[static_cast<size_t>(i)], one);
          return Value(std::move(one));
        }
        if (key.is_string()) return GetAttr(obj, key.as_string(), at);
        return Value::MakeUndefined(
            absl::StrCat("'", ObjectTypeRepr(obj), "' has no attribute ", key.Repr()));
      }
      case Value::Kind::kNamespace:
        if (key.is_string()) return GetAttr(obj, key.as_string(), at);
        break;
      default:
        break;
    }
    return Value::MakeUndefined(
        absl::StrCat("'", ObjectTypeRepr(obj), "' has no attribute ", key.Repr()));
  }

  absl::StatusOr<Value> Slice(const Value& obj, const Value& start, const Value& stop,
                              const Value& step_v, const Expr& at) {
    if (obj.is_undefined()) return UndefinedError(obj);
    if (!step_v.is_none() && step_v.as_int() == 0) {
      return Error(at, "slice step cannot be zero");
    }
    if (obj.is_list() || obj.is_string()) {
      std::vector<uint32_t> cps;
      int64_t n = 0;
      if (obj.is_list()) {
        n = static_cast<int64_t>(obj.as_list().size());
      } else {
        cps = DecodeUtf8(obj.as_string());
        n = static_cast<int64_t>(cps.size());
      }
      int64_t b = 0, e = 0, step = 1;
      SliceIndices(n, start, stop, step_v, b, e, step);
      if (obj.is_list()) {
        List out;
        for (int64_t i = b; step > 0 ? i < e : i > e; i += step) {
          out.push_back(obj.as_list()[static_cast<size_t>(i)]);
        }
        return Value(std::move(out));
      }
      std::string out;
      for (int64_t i = b; step > 0 ? i < e : i > e; i += step) {
        AppendUtf8(cps[static_cast<size_t>(i)], out);
      }
      return Value(std::move(out));
    }
    return Error(at, absl::StrCat("'", obj.TypeName(), "' object is not subscriptable"));
  }

  static absl::Status TypeError(const Expr& at, absl::string_view op, const Value& l,
                                const Value& r) {
    return Error(at, absl::StrCat("unsupported operand type(s) for ", op, ": '", l.TypeName(),
                                  "' and '", r.TypeName(), "'"));
  }

  absl::StatusOr<int> Compare(const Value& l, const Value& r, absl::string_view op,
                              const Expr& at) {
    if (l.is_number() && r.is_number()) {
      if (l.is_float() || r.is_float()) {
        const double a = l.as_double(), b = r.as_double();
        return a < b ? -1 : (a > b ? 1 : 0);
      }
      const int64_t a = l.as_int(), b = r.as_int();
      return a < b ? -1 : (a > b ? 1 : 0);
    }
    if (l.is_string() && r.is_string()) {
      const int c = l.as_string().compare(r.as_string());
      return c < 0 ? -1 : (c > 0 ? 1 : 0);
    }
    if (l.is_list() && r.is_list()) {
      const List& a = l.as_list();
      const List& b = r.as_list();
      for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
        if (a[i].Equals(b[i])) continue;
        return Compare(a[i], b[i], op, at);
      }
      return a.size() < b.size() ? -1 : (a.size() > b.size() ? 1 : 0);
    }
    if (l.is_undefined()) return UndefinedError(l);
    if (r.is_undefined()) return UndefinedError(r);
    return Error(at, absl::StrCat("'", op, "' not supported between instances of '", l.TypeName(),
                                  "' and '", r.TypeName(), "'"));
  }

  absl::StatusOr<bool> Contains(const Value& container, const Value& item, const Expr& at) {
    switch (container.kind()) {
      case Value::Kind::kString:
        if (!item.is_string()) {
          if (item.is_undefined()) return UndefinedError(item);
          return Error(at, absl::StrCat("'in <string>' requires string as left operand, not ",
                                        item.TypeName()));
        }
        return container.as_string().find(item.as_string()) != std::string::npos;
      case Value::Kind::kList:
        for (const Value& v : container.as_list()) {
          if (v.Equals(item)) return true;
        }
        return false;
      case Value::Kind::kDict:
        return container.as_dict().Find(item) != nullptr;
      case Value::Kind::kUndefined:
        return false;
      default:
        return Error(at,
                     absl::StrCat("argument of type '", container.TypeName(), "' is not iterable"));
    }
  }

  absl::StatusOr<Value> Binary(const std::string& op, const Value& l, const Value& r,
                               const Expr& at) {
    if (op == "~") return Value(absl::StrCat(l.Str(), r.Str()));
    if (op == "==") return Value(l.Equals(r));
    if (op == "!=") return Value(!l.Equals(r));
    if (op == "in" || op == "notin") {
      ASSIGN_OR_RETURN(bool c, Contains(r, l, at));
      return Value(op == "in" ? c : !c);
    }
    if (op == "<" || op == ">" || op == "<=" || op == ">=") {
      ASSIGN_OR_RETURN(int c, Compare(l, r, op, at));
      if (op == "<") return Value(c < 0);
      if (op == ">") return Value(c > 0);
      if (op == "<=") return Value(c <= 0);
      return Value(c >= 0);
    }
    if (l.is_undefined()) return UndefinedError(l);
    if (r.is_undefined()) return UndefinedError(r);
    const bool nums = l.is_number() && r.is_number();
    const bool any_float = l.is_float() || r.is_float();
    if (op == "+") {
      if (nums) {
        return any_float ? Value(l.as_double() + r.as_double()) : Value(l.as_int() + r.as_int());
      }
      if (l.is_string() && r.is_string()) return Value(l.as_string() + r.as_string());
      if (l.is_list() && r.is_list()) {
        List out = l.as_list();
        out.insert(out.end(), r.as_list().begin(), r.as_list().end());
        return Value(std::move(out));
      }
      if (l.is_string()) {
        return Error(at,
                     absl::StrCat("can only concatenate str (not \"", r.TypeName(), "\") to str"));
      }
      if (l.is_list()) {
        return Error(
            at, absl::StrCat("can only concatenate list (not \"", r.TypeName(), "\") to list"));
      }
      return TypeError(at, "+", l, r);
    }
    if (op == "-") {
      if (!nums) return TypeError(at, "-", l, r);
      return any_float ? Value(l.as_double() - r.as_double()) : Value(l.as_int() - r.as_int());
    }
    if (op == "*") {
      if (nums) {
        return any_float ? Value(l.as_double() * r.as_double()) : Value(l.as_int() * r.as_int());
      }
      const Value* seq = nullptr;
      const Value* count = nullptr;
      if ((l.is_string() || l.is_list()) && (r.is_int() || r.is_bool())) {
        seq = &l;
        count = &r;
      } else if ((r.is_string() || r.is_list()) && (l.is_int() || l.is_bool())) {
        seq = &r;
        count = &l;
      }
      if (seq == nullptr) return TypeError(at, "*", l, r);
      const int64_t times = std::min<int64_t>(count->as_int(), kMaxRangeLength);
      if (seq->is_string()) {
        std::string out;
        for (int64_t i = 0; i < times; ++i) out += seq->as_string();
        return Value(std::move(out));
      }
      List out;
      for (int64_t i = 0; i < times; ++i) {
        out.insert(out.end(), seq->as_list().begin(), seq->as_list().end());
      }
      return Value(std::move(out));
    }
    if (op == "/" || op == "//" || op == "%") {
      if (!nums) {
        return TypeError(at, op, l, r);
      }
      if (r.as_double() == 0.0) {
        return Error(at, op == "/" ? "division by zero"
                                   : (op == "//" ? "integer division or modulo by zero"
                                                 : "integer modulo by zero"));
      }
      if (op == "/") return Value(l.as_double() / r.as_double());
      if (any_float) {
        const double a = l.as_double(), b = r.as_double();
        const double mod = a - b * std::floor(a / b);
        if (op == "%") return Value(mod);
        return Value(std::floor(a / b));
      }
      const int64_t a = l.as_int(), b = r.as_int();
      int64_t q = a / b;
      int64_t m = a % b;
      if (m != 0 && ((m < 0) != (b < 0))) {
        --q;
        m += b;
      }
      return op == "%" ? Value(m) : Value(q);
    }
    if (op == "**") {
      if (!nums) return TypeError(at, "** or pow()", l, r);
      if (!any_float && r.as_int() >= 0) {
        int64_t result = 1;
        for (int64_t i = 0; i < r.as_int() && i < 64; ++i) result *= l.as_int();
        return Value(result);
      }
      return Value(std::pow(l.as_double(), r.as_double()));
    }
    return Error(at, absl::StrCat("unknown operator ", op));
  }

  // ---- methods ----
  static absl::StatusOr<std::string> StrArg(const CallArgs& a, size_t i, absl::string_view fn) {
    if (i >= a.positional.size() || !a.positional[i].is_string()) {
      return absl::InvalidArgumentError(absl::StrCat(fn, "() argument must be str"));
    }
    return a.positional[i].as_string();
  }

  absl::StatusOr<Value> CallMethod(const Value& self, const std::string& name, CallArgs& a) {
    if (self.is_dict()) {
      const Dict& d = self.as_dict();
      if (name == "get") {
        if (a.positional.empty()) {
          return absl::InvalidArgumentError("get expected at least 1 argument, got 0");
        }
        const Value* v = d.Find(a.positional[0]);
        if (v != nullptr) return *v;
        return a.positional.size() > 1 ? a.positional[1] : Value::None();
      }
      List out;
      for (const auto& [k, v] : d.items) {
        if (name == "items") {
          out.push_back(Value::Tuple(List{k, v}));
        } else if (name == "keys") {
          out.push_back(k);
        } else {
          out.push_back(v);
        }
      }
      return Value(std::move(out));
    }
    if (self.is_list()) {
      const List& l = self.as_list();
      if (a.positional.empty()) {
        return absl::InvalidArgumentError(absl::StrCat(name, "() takes exactly one argument"));
      }
      int64_t count = 0;
      for (size_t i = 0; i < l.size(); ++i) {
        if (l[i].Equals(a.positional[0])) {
          if (name == "index") return Value(static_cast<int64_t>(i));
          ++count;
        }
      }
      if (name == "index") {
        return absl::InvalidArgumentError(absl::StrCat(a.positional[0].Repr(), " is not in list"));
      }
      return Value(count);
    }
    const std::string& s = self.as_string();
    if (name == "startswith" || name == "endswith") {
      if (a.positional.empty()) {
        return absl::InvalidArgumentError(absl::StrCat(name, "() takes at least 1 argument"));
      }
      List candidates;
      if (a.positional[0].is_list()) {
        candidates = a.positional[0].as_list();
      } else {
        candidates.push_back(a.positional[0]);
      }
      for (const Value& c : candidates) {
        if (!c.is_string()) {
          return absl::InvalidArgumentError(
              absl::StrCat(name, " first arg must be str or a tuple of str, not ", c.TypeName()));
        }
        const std::string& p = c.as_string();
        if (name == "startswith"
                ? s.compare(0, p.size(), p) == 0 && s.size() >= p.size()
                : s.size() >= p.size() && s.compare(s.size() - p.size(), p.size(), p) == 0) {
          return Value(true);
        }
      }
      return Value(false);
    }
    if (name == "split" || name == "rsplit") {
      Value sep = a.positional.size() > 0 ? a.positional[0] : Value::None();
      if (const Value* k = a.Keyword("sep")) sep = *k;
      int64_t maxsplit = a.positional.size() > 1 ? a.positional[1].as_int() : -1;
      if (const Value* k = a.Keyword("maxsplit")) maxsplit = k->as_int();
      if (!sep.is_none() && !sep.is_string()) {
        return absl::InvalidArgumentError("must be str or None");
      }
      if (sep.is_string() && sep.as_string().empty()) {
        return absl::InvalidArgumentError("empty separator");
      }
      std::vector<std::string> parts;
      if (name == "rsplit" && maxsplit >= 0) {
        // rsplit with a limit: split from the right.
        std::vector<std::string> all = PythonSplit(s, sep, -1);
        if (static_cast<int64_t>(all.size()) > maxsplit + 1 && sep.is_string()) {
          size_t cut = all.size() - static_cast<size_t>(maxsplit);
          std::string head = absl::StrJoin(all.begin(), all.begin() + cut, sep.as_string());
          parts.push_back(head);
          parts.insert(parts.end(), all.begin() + cut, all.end());
        } else {
          parts = all;
        }
      } else {
        parts = PythonSplit(s, sep, maxsplit);
      }
      List out;
      for (auto& p : parts) out.push_back(Value(std::move(p)));
      return Value(std::move(out));
    }
    if (name == "strip" || name == "lstrip" || name == "rstrip") {
      const bool left = name != "rstrip";
      const bool right = name != "lstrip";
      if (!a.positional.empty() && a.positional[0].is_string()) {
        return Value(PythonStripChars(s, a.positional[0].as_string(), left, right));
      }
      return Value(PythonStrip(s, left, right));
    }
    if (name == "upper") return Value(PythonUpper(s));
    if (name == "lower") return Value(PythonLower(s));
    if (name == "title") return Value(PythonTitle(s));
    if (name == "capitalize") return Value(CapitalizeStr(s));
    if (name == "swapcase") {
      std::string out;
      for (uint32_t cp : DecodeUtf8(s)) {
        std::string one;
        AppendUtf8(cp, one);
        const std::string up = PythonUpper(one);
        out += up == one ? PythonLower(one) : up;
      }
      return Value(std::move(out));
    }
    if (name == "replace") {
      ASSIGN_OR_RETURN(std::string from, StrArg(a, 0, "replace"));
      ASSIGN_OR_RETURN(std::string to, StrArg(a, 1, "replace"));
      const int64_t count = a.positional.size() > 2 ? a.positional[2].as_int() : -1;
      return Value(PythonReplace(s, from, to, count));
    }
    if (name == "find" || name == "rfind" || name == "index" || name == "count") {
      ASSIGN_OR_RETURN(std::string sub, StrArg(a, 0, name));
      if (name == "count") {
        if (sub.empty()) return Value(static_cast<int64_t>(DecodeUtf8(s).size() + 1));
        int64_t c = 0;
        for (size_t p = s.find(sub); p != std::string::npos; p = s.find(sub, p + sub.size())) {
          ++c;
        }
        return Value(c);
      }
      const size_t pos = name == "rfind" ? s.rfind(sub) : s.find(sub);
      if (pos == std::string::npos) {
        if (name == "index") return absl::InvalidArgumentError("substring not found");
        return Value(int64_t{-1});
      }
      // Positions are in code points, as Python counts them.
      return Value(static_cast<int64_t>(DecodeUtf8(absl::string_view(s).substr(0, pos)).size()));
    }
    if (name == "removeprefix" || name == "removesuffix") {
      ASSIGN_OR_RETURN(std::string p, StrArg(a, 0, name));
      if (name == "removeprefix" && s.compare(0, p.size(), p) == 0 && s.size() >= p.size()) {
        return Value(s.substr(p.size()));
      }
      if (name == "removesuffix" && s.size() >= p.size() &&
          s.compare(s.size() - p.size(), p.size(), p) == 0) {
        return Value(s.substr(0, s.size() - p.size()));
      }
      return Value(s);
    }
    if (name == "join") {
      if (a.positional.empty()) return absl::InvalidArgumentError("join() takes one argument");
      static const Expr kNowhere{};
      ASSIGN_OR_RETURN(List items, Iterate(a.positional[0], kNowhere));
      std::string out;
      for (size_t i = 0; i < items.size(); ++i) {
        if (!items[i].is_string()) {
          return absl::InvalidArgumentError(absl::StrCat(
              "sequence item ", i, ": expected str instance, ", items[i].TypeName(), " found"));
        }
        if (i > 0) out += s;
        out += items[i].as_string();
      }
      return Value(std::move(out));
    }
    if (name == "splitlines") {
      List out;
      std::string cur;
      for (size_t i = 0; i < s.size(); ++i) {
        if (s[i] == '\n' || s[i] == '\r') {
          out.push_back(Value(cur));
          cur.clear();
          if (s[i] == '\r' && i + 1 < s.size() && s[i + 1] == '\n') ++i;
        } else {
          cur += s[i];
        }
      }
      if (!cur.empty()) out.push_back(Value(cur));
      return Value(std::move(out));
    }
    if (name == "zfill" || name == "center" || name == "ljust" || name == "rjust") {
      if (a.positional.empty()) return absl::InvalidArgumentError(name + "() takes a width");
      const int64_t width = a.positional[0].as_int();
      const std::string fill = a.positional.size() > 1 ? a.positional[1].Str() : " ";
      const int64_t len = static_cast<int64_t>(DecodeUtf8(s).size());
      if (len >= width) return Value(s);
      const int64_t pad = width - len;
      auto rep = [](const std::string& f, int64_t n) {
        std::string out;
        for (int64_t i = 0; i < n; ++i) out += f;
        return out;
      };
      if (name == "ljust") return Value(s + rep(fill, pad));
      if (name == "rjust") return Value(rep(fill, pad) + s);
      if (name == "zfill") {
        if (!s.empty() && (s[0] == '-' || s[0] == '+')) {
          return Value(s.substr(0, 1) + rep("0", pad) + s.substr(1));
        }
        return Value(rep("0", pad) + s);
      }
      const int64_t left = pad / 2 + (pad & width & 1);
      return Value(rep(fill, left) + s + rep(fill, pad - left));
    }
    // is* predicates.
    std::vector<uint32_t> cps = DecodeUtf8(s);
    if (cps.empty() && name != "islower" && name != "isupper") return Value(false);
    auto all = [&](auto pred) {
      for (uint32_t cp : cps) {
        if (!pred(cp)) return false;
      }
      return true;
    };
    if (name == "isdigit") return Value(all([](uint32_t c) { return c >= '0' && c <= '9'; }));
    if (name == "isspace") return Value(all([](uint32_t c) { return IsPythonSpace(c); }));
    if (name == "isalpha") {
      return Value(all([](uint32_t c) {
        return c >= 0x80 ? IsCased(c) || c > 0x2e7f : std::isalpha(static_cast<int>(c)) != 0;
      }));
    }
    if (name == "isalnum") {
      return Value(all([](uint32_t c) {
        return c >= 0x80 ? IsCased(c) || c > 0x2e7f : std::isalnum(static_cast<int>(c)) != 0;
      }));
    }
    if (name == "islower" || name == "isupper") {
      bool any_cased = false;
      for (uint32_t cp : cps) {
        if (!IsCased(cp)) continue;
        any_cased = true;
        std::string one;
        AppendUtf8(cp, one);
        if (name == "islower" ? PythonLower(one) != one : PythonUpper(one) != one) {
          return Value(false);
        }
      }
      return Value(any_cased);
    }
    return absl::InvalidArgumentError(absl::StrCat("'str' object has no method '", name, "'"));
  }

  // ---- filters ----
  const Value* Arg(const CallArgs& a, size_t i, absl::string_view keyword) const {
    if (i < a.positional.size()) return &a.positional[i];
    return a.Keyword(keyword);
  }

  absl::StatusOr<Value> Attribute(const Value& item, const std::string& path, const Expr& at) {
    // jinja2's make_attrgetter: dotted paths, integer parts index.
    Value cur = item;
    size_t start = 0;
    while (start <= path.size()) {
      size_t dot = path.find('.', start);
      if (dot == std::string::npos) dot = path.size();
      const std::string part = path.substr(start, dot - start);
      bool numeric = !part.empty() && std::all_of(part.begin(), part.end(), ::isdigit);
      if (cur.is_undefined()) return cur;
      ASSIGN_OR_RETURN(
          cur, GetItem(cur, numeric ? Value(int64_t{std::atoll(part.c_str())}) : Value(part), at));
      start = dot + 1;
    }
    return cur;
  }

  absl::StatusOr<List> SelectOrReject(const Value& seq, const CallArgs& a, bool by_attr,
                                      bool select, const Expr& at) {
    ASSIGN_OR_RETURN(List items, Iterate(seq, at));
    size_t next = 0;
    std::string attr;
    if (by_attr) {
      if (a.positional.empty() || !a.positional[0].is_string()) {
        return Error(at, "missing parameter for attribute name");
      }
      attr = a.positional[0].as_string();
      next = 1;
    }
    std::string test;
    CallArgs test_args;
    if (next < a.positional.size()) {
      test = a.positional[next].Str();
      test_args.positional.assign(a.positional.begin() + next + 1, a.positional.end());
    }
    List out;
    for (const Value& item : items) {
      Value probe = item;
      if (by_attr) {
        ASSIGN_OR_RETURN(probe, Attribute(item, attr, at));
      }
      bool ok;
      if (test.empty()) {
        ok = probe.Truthy();
      } else {
        CallArgs copy = test_args;
        ASSIGN_OR_RETURN(ok, ApplyTest(test, probe, copy, at));
      }
      if (ok == select) out.push_back(item);
    }
    return out;
  }

  static absl::StatusOr<Value> ToInt(const Value& v, const Value& def, int64_t base) {
    if (v.is_int() || v.is_bool()) return Value(v.as_int());
    if (v.is_float()) return Value(static_cast<int64_t>(std::trunc(v.as_double())));
    if (v.is_string()) {
      std::string s = PythonStrip(v.as_string(), true, true);
      std::string clean;
      for (char c : s) {
        if (c != '_') clean += c;
      }
      if (!clean.empty()) {
        errno = 0;
        char* end = nullptr;
        const long long r = std::strtoll(clean.c_str(), &end, static_cast<int>(base));
        if (errno == 0 && end != nullptr && *end == '\0') return Value(static_cast<int64_t>(r));
        // jinja2 falls back to float() for strings like "3.5".
        errno = 0;
        const double d = std::strtod(clean.c_str(), &end);
        if (errno == 0 && end != nullptr && *end == '\0' && std::isfinite(d)) {
          return Value(static_cast<int64_t>(std::trunc(d)));
        }
      }
    }
    return def;
  }

  absl::StatusOr<Value> ApplyFilter(const std::string& name, const Value& v, CallArgs& a,
                                    const Expr& at) {
    if (name == "default" || name == "d") {
      const Value* def = Arg(a, 0, "default_value");
      const Value* boolean = Arg(a, 1, "boolean");
      const bool use = v.is_undefined() || (boolean != nullptr && boolean->Truthy() && !v.Truthy());
      if (use) return def != nullptr ? *def : Value("");
      return v;
    }
    if (name == "trim") {
      const Value* chars = Arg(a, 0, "chars");
      if (chars != nullptr && chars->is_string()) {
        return Value(PythonStripChars(v.Str(), chars->as_string(), true, true));
      }
      return Value(PythonStrip(v.Str(), true, true));
    }
    if (name == "length" || name == "count") {
      switch (v.kind()) {
        case Value::Kind::kString:
          return Value(static_cast<int64_t>(DecodeUtf8(v.as_string()).size()));
        case Value::Kind::kList:
          return Value(static_cast<int64_t>(v.as_list().size()));
        case Value::Kind::kDict:
          return Value(static_cast<int64_t>(v.as_dict().items.size()));
        case Value::Kind::kUndefined:
          return Value(int64_t{0});
        default:
          return Error(at, absl::StrCat("object of type '", v.TypeName(), "' has no len()"));
      }
    }
    if (name == "tojson") {
      int indent = -1;
      if (const Value* i = Arg(a, 0, "indent"); i != nullptr && !i->is_none()) {
        indent = static_cast<int>(i->as_int());
      }
      absl::StatusOr<std::string> j = ToJson(v, indent);
      if (!j.ok()) {
        if (v.is_undefined()) return UndefinedError(v);
        return Error(at, j.status().message());
      }
      return Value(*std::move(j));
    }
    if (name == "string") return Value(v.Str());
    if (name == "safe") return v.is_string() ? v : Value(v.Str());
    if (name == "upper") return Value(PythonUpper(v.Str()));
    if (name == "lower") return Value(PythonLower(v.Str()));
    if (name == "capitalize") return Value(CapitalizeStr(v.Str()));
    if (name == "title") return Value(JinjaTitle(v.Str()));
    if (name == "e" || name == "escape" || name == "forceescape") {
      return Value(HtmlEscape(v.Str()));
    }
    if (name == "replace") {
      if (a.positional.size() < 2) return Error(at, "replace() needs old and new");
      const int64_t count = a.positional.size() > 2 ? a.positional[2].as_int() : -1;
      return Value(PythonReplace(v.Str(), a.positional[0].Str(), a.positional[1].Str(), count));
    }
    if (name == "join") {
      ASSIGN_OR_RETURN(List items, Iterate(v, at));
      const Value* sep = Arg(a, 0, "d");
      const Value* attr = Arg(a, 1, "attribute");
      std::string out;
      for (size_t i = 0; i < items.size(); ++i) {
        if (i > 0 && sep != nullptr) out += sep->Str();
        Value item = items[i];
        if (attr != nullptr && !attr->is_none()) {
          ASSIGN_OR_RETURN(item, Attribute(item, attr->Str(), at));
        }
        out += item.Str();
      }
      return Value(std::move(out));
    }
    if (name == "first" || name == "last") {
      ASSIGN_OR_RETURN(List items, Iterate(v, at));
      if (items.empty()) {
        return Value::MakeUndefined(absl::StrCat("No ", name, " item, sequence was empty."));
      }
      return name == "first" ? items.front() : items.back();
    }
    if (name == "list") {
      ASSIGN_OR_RETURN(List items, Iterate(v, at));
      return Value(std::move(items));
    }
    if (name == "items") {
      if (v.is_undefined()) return Value(List{});
      if (!v.is_dict()) return Error(at, "Can only get item pairs from a mapping.");
      List out;
      for (const auto& [k, val] : v.as_dict().items) out.push_back(Value::Tuple(List{k, val}));
      return Value(std::move(out));
    }
    if (name == "dictsort") {
      if (!v.is_dict()) return Error(at, "dictsort expects a mapping");
      List out;
      for (const auto& [k, val] : v.as_dict().items) out.push_back(Value::Tuple(List{k, val}));
      const Value* by = Arg(a, 1, "by");
      const bool by_value = by != nullptr && by->Str() == "value";
      const Value* rev = Arg(a, 2, "reverse");
      absl::Status err;
      std::stable_sort(out.begin(), out.end(), [&](const Value& x, const Value& y) {
        const Value& kx = x.as_list()[by_value ? 1 : 0];
        const Value& ky = y.as_list()[by_value ? 1 : 0];
        Value lx = kx.is_string() ? Value(PythonLower(kx.as_string())) : kx;
        Value ly = ky.is_string() ? Value(PythonLower(ky.as_string())) : ky;
        absl::StatusOr<int> c = Compare(lx, ly, "<", at);
        if (!c.ok()) {
          err = c.status();
          return false;
        }
        return *c < 0;
      });
      RETURN_IF_ERROR(err);
      if (rev != nullptr && rev->Truthy()) std::reverse(out.begin(), out.end());
      return Value(std::move(out));
    }
    if (name == "selectattr" || name == "rejectattr" || name == "select" || name == "reject") {
      const bool by_attr = name == "selectattr" || name == "rejectattr";
      const bool select = name == "selectattr" || name == "select";
      ASSIGN_OR_RETURN(List out, SelectOrReject(v, a, by_attr, select, at));
      return Value(std::move(out));
    }
    if (name == "map") {
      ASSIGN_OR_RETURN(List items, Iterate(v, at));
      List out;
      if (const Value* attr = a.Keyword("attribute")) {
        const Value* def = a.Keyword("default");
        for (const Value& item : items) {
          ASSIGN_OR_RETURN(Value r, Attribute(item, attr->Str(), at));
          if (r.is_undefined() && def != nullptr) r = *def;
          out.push_back(std::move(r));
        }
        return Value(std::move(out));
      }
      if (a.positional.empty()) return Error(at, "map requires a filter argument");
      const std::string filter = a.positional[0].Str();
      if (!IsKnownFilter(filter)) return Error(at, absl::StrCat("No filter named '", filter, "'."));
      for (const Value& item : items) {
        CallArgs rest;
        rest.positional.assign(a.positional.begin() + 1, a.positional.end());
        rest.keyword = a.keyword;
        ASSIGN_OR_RETURN(Value r, ApplyFilter(filter, item, rest, at));
        out.push_back(std::move(r));
      }
      return Value(std::move(out));
    }
    if (name == "attr") {
      if (a.positional.empty()) return Error(at, "attr requires a name");
      return GetAttr(v, a.positional[0].Str(), at);
    }
    if (name == "int") {
      const Value* def = Arg(a, 0, "default");
      const Value* base = Arg(a, 1, "base");
      return ToInt(v, def != nullptr ? *def : Value(int64_t{0}),
                   base != nullptr ? base->as_int() : 10);
    }
    if (name == "float") {
      const Value* def = Arg(a, 0, "default");
      if (v.is_number()) return Value(v.as_double());
      if (v.is_string()) {
        const std::string s = PythonStrip(v.as_string(), true, true);
        char* end = nullptr;
        errno = 0;
        const double d = std::strtod(s.c_str(), &end);
        if (!s.empty() && errno == 0 && end != nullptr && *end == '\0') return Value(d);
      }
      return def != nullptr ? *def : Value(0.0);
    }
    if (name == "abs") {
      if (!v.is_number())
        return Error(at, absl::StrCat("bad operand type for abs(): '", v.TypeName(), "'"));
      if (v.is_float()) return Value(std::fabs(v.as_double()));
      return Value(v.as_int() < 0 ? -v.as_int() : v.as_int());
    }
    if (name == "round") {
      if (!v.is_number()) return Error(at, "round expects a number");
      const Value* prec = Arg(a, 0, "precision");
      const Value* method = Arg(a, 1, "method");
      const int64_t p = prec != nullptr ? prec->as_int() : 0;
      const double scale = std::pow(10.0, static_cast<double>(p));
      const std::string m = method != nullptr ? method->Str() : "common";
      double x = v.as_double() * scale;
      if (m == "ceil") {
        x = std::ceil(x);
      } else if (m == "floor") {
        x = std::floor(x);
      } else {
        x = std::round(x);
      }
      return Value(x / scale);
    }
    if (name == "sum") {
      ASSIGN_OR_RETURN(List items, Iterate(v, at));
      const Value* attr = Arg(a, 0, "attribute");
      const Value* start = Arg(a, 1, "start");
      Value total = start != nullptr ? *start : Value(int64_t{0});
      for (const Value& item : items) {
        Value x = item;
        if (attr != nullptr && !attr->is_none()) {
          ASSIGN_OR_RETURN(x, Attribute(item, attr->Str(), at));
        }
        ASSIGN_OR_RETURN(total, Binary("+", total, x, at));
      }
      return total;
    }
    if (name == "min" || name == "max" || name == "sort" || name == "unique") {
      ASSIGN_OR_RETURN(List items, Iterate(v, at));
      const Value* attr = a.Keyword("attribute");
      const Value* case_sensitive = a.Keyword("case_sensitive");
      const bool cs = case_sensitive != nullptr && case_sensitive->Truthy();
      auto key = [&](const Value& item) -> absl::StatusOr<Value> {
        Value k = item;
        if (attr != nullptr) {
          ASSIGN_OR_RETURN(k, Attribute(item, attr->Str(), at));
        }
        if (!cs && k.is_string()) k = Value(PythonLower(k.as_string()));
        return k;
      };
      if (name == "unique") {
        List out;
        List seen;
        for (const Value& item : items) {
          ASSIGN_OR_RETURN(Value k, key(item));
          bool dup = false;
          for (const Value& s : seen) dup = dup || s.Equals(k);
          if (!dup) {
            seen.push_back(k);
            out.push_back(item);
          }
        }
        return Value(std::move(out));
      }
      std::vector<std::pair<Value, Value>> keyed;
      for (const Value& item : items) {
        ASSIGN_OR_RETURN(Value k, key(item));
        keyed.emplace_back(std::move(k), item);
      }
      absl::Status err;
      auto less = [&](const std::pair<Value, Value>& x, const std::pair<Value, Value>& y) {
        absl::StatusOr<int> c = Compare(x.first, y.first, "<", at);
        if (!c.ok()) {
          err = c.status();
          return false;
        }
        return *c < 0;
      };
      if (name == "sort") {
        const Value* rev = Arg(a, 0, "reverse");
        std::stable_sort(keyed.begin(), keyed.end(), less);
        RETURN_IF_ERROR(err);
        if (rev != nullptr && rev->Truthy()) {
          std::stable_sort(keyed.begin(), keyed.end(),
                           [&](const auto& x, const auto& y) { return less(y, x); });
        }
        List out;
        for (auto& [k, item] : keyed) out.push_back(item);
        return Value(std::move(out));
      }
      if (keyed.empty()) {
        return Value::MakeUndefined(absl::StrCat("No aggregated item, sequence was empty."));
      }
      auto it = name == "min" ? std::min_element(keyed.begin(), keyed.end(), less)
                              : std::max_element(keyed.begin(), keyed.end(), less);
      RETURN_IF_ERROR(err);
      return it->second;
    }
    if (name == "reverse") {
      if (v.is_string()) {
        std::vector<uint32_t> cps = DecodeUtf8(v.as_string());
        std::reverse(cps.begin(), cps.end());
        return Value(EncodeUtf8(cps));
      }
      ASSIGN_OR_RETURN(List items, Iterate(v, at));
      std::reverse(items.begin(), items.end());
      return Value(std::move(items));
    }
    if (name == "indent") {
      const Value* width_v = Arg(a, 0, "width");
      const Value* first_v = Arg(a, 1, "first");
      const Value* blank_v = Arg(a, 2, "blank");
      const std::string pad =
          width_v == nullptr ? "    "
          : width_v->is_string()
              ? width_v->as_string()
              : std::string(static_cast<size_t>(std::max<int64_t>(0, width_v->as_int())), ' ');
      const bool first = first_v != nullptr && first_v->Truthy();
      const bool blank = blank_v != nullptr && blank_v->Truthy();
      std::string s = v.Str();
      std::vector<std::string> lines;
      size_t start = 0;
      while (true) {
        const size_t nl = s.find('\n', start);
        if (nl == std::string::npos) {
          lines.push_back(s.substr(start));
          break;
        }
        lines.push_back(s.substr(start, nl - start));
        start = nl + 1;
      }
      std::string out;
      for (size_t i = 0; i < lines.size(); ++i) {
        if (i > 0) out += '\n';
        const bool indent_this = (i > 0 || first) && (blank || !lines[i].empty());
        if (indent_this) out += pad;
        out += lines[i];
      }
      return Value(std::move(out));
    }
    if (name == "wordcount") {
      return Value(static_cast<int64_t>(PythonSplit(v.Str(), Value::None(), -1).size()));
    }
    return Error(at, absl::StrCat("No filter named '", name, "' found."));
  }

  // ---- tests ----
  absl::StatusOr<bool> ApplyTest(const std::string& name, const Value& v, CallArgs& a,
                                 const Expr& at) {
    const Value* arg = a.positional.empty() ? nullptr : &a.positional[0];
    auto need_arg = [&]() -> absl::Status {
      if (arg == nullptr) return Error(at, absl::StrCat("test '", name, "' needs an argument"));
      return absl::OkStatus();
    };
    if (name == "defined") return !v.is_undefined();
    if (name == "undefined") return v.is_undefined();
    if (name == "none") return v.is_none();
    if (name == "boolean") return v.is_bool();
    if (name == "true") return v.is_bool() && v.as_bool();
    if (name == "false") return v.is_bool() && !v.as_bool();
    if (name == "string") return v.is_string();
    if (name == "mapping") return v.is_dict();
    if (name == "number") return v.is_number();
    if (name == "integer") return v.is_int();
    if (name == "float") return v.is_float();
    if (name == "iterable") return v.is_list() || v.is_dict() || v.is_string() || v.is_undefined();
    if (name == "sequence") return v.is_list() || v.is_dict() || v.is_string() || v.is_undefined();
    if (name == "callable") return v.is_function();
    if (name == "escaped") return false;
    if (name == "lower" || name == "upper") {
      if (!v.is_string()) return false;
      CallArgs none;
      ASSIGN_OR_RETURN(Value r, CallMethod(v, name == "lower" ? "islower" : "isupper", none));
      return r.as_bool();
    }
    if (name == "odd" || name == "even") {
      if (!v.is_int() && !v.is_bool()) return Error(at, "odd/even expects an integer");
      const int64_t m = ((v.as_int() % 2) + 2) % 2;
      return name == "odd" ? m == 1 : m == 0;
    }
    if (name == "divisibleby") {
      RETURN_IF_ERROR(need_arg());
      if (!v.is_number() || !arg->is_number() || arg->as_double() == 0) {
        return Error(at, "divisibleby expects non-zero numbers");
      }
      return std::fmod(v.as_double(), arg->as_double()) == 0;
    }
    if (name == "eq" || name == "equalto" || name == "==" || name == "sameas") {
      RETURN_IF_ERROR(need_arg());
      if (name == "sameas" && v.kind() != arg->kind()) return false;
      return v.Equals(*arg);
    }
    if (name == "ne" || name == "!=") {
      RETURN_IF_ERROR(need_arg());
      return !v.Equals(*arg);
    }
    if (name == "lt" || name == "lessthan" || name == "<" || name == "le" || name == "<=" ||
        name == "gt" || name == "greaterthan" || name == ">" || name == "ge" || name == ">=") {
      RETURN_IF_ERROR(need_arg());
      ASSIGN_OR_RETURN(int c, Compare(v, *arg, name, at));
      if (name == "lt" || name == "lessthan" || name == "<") return c < 0;
      if (name == "le" || name == "<=") return c <= 0;
      if (name == "gt" || name == "greaterthan" || name == ">") return c > 0;
      return c >= 0;
    }
    if (name == "in") {
      RETURN_IF_ERROR(need_arg());
      return Contains(*arg, v, at);
    }
    if (name == "filter") return v.is_string() && IsKnownFilter(v.as_string());
    if (name == "test") return v.is_string() && IsKnownTest(v.as_string());
    return Error(at, absl::StrCat("No test named '", name, "' found."));
  }

  absl::Time now_;
  std::string* out_ = nullptr;
  int depth_ = 0;
};

}  // namespace jinja

absl::StatusOr<ChatTemplate> ChatTemplate::Parse(std::string_view source) {
  ASSIGN_OR_RETURN(std::shared_ptr<const jinja::Program> program,
                   jinja::ParseProgram(absl::string_view(source.data(), source.size())),
                   "chat template");
  return ChatTemplate(std::move(program));
}

absl::StatusOr<std::string> ChatTemplate::Render(const nlohmann::json& context) const {
  if (!context.is_object()) {
    return absl::InvalidArgumentError("chat template context must be a JSON object");
  }
  jinja::Interpreter interpreter(absl::Now());
  return interpreter.Render(*program_, jinja::Value::FromJson(context));
}

absl::StatusOr<std::string> ChatTemplate::Render(const nlohmann::ordered_json& context) const {
  return Render(context, absl::Now());
}

absl::StatusOr<std::string> ChatTemplate::Render(const nlohmann::ordered_json& context,
                                                 absl::Time now) const {
  if (!context.is_object()) {
    return absl::InvalidArgumentError("chat template context must be a JSON object");
  }
  jinja::Interpreter interpreter(now);
  return interpreter.Render(*program_, jinja::Value::FromJson(context));
}

}  // namespace moemesh

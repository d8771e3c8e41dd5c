// jinja::ParseProgram: lexes and parses a Jinja chat template into an immutable tree, for the
// interpreter in services/text/chat_template.cc.
//
// The lexer applies jinja2's whitespace rules as Hugging Face configures them: newlines
// normalised to "\n", one trailing newline dropped (keep_trailing_newline=False),
// trim_blocks (the first newline after a block or comment tag goes), lstrip_blocks (spaces
// and tabs from the start of a line up to a block or comment tag go, unless the tag opens
// with '+'), and '-' on either side of a tag strips all whitespace on that side. Inside tags
// brackets are balanced before an end delimiter counts, as in jinja2, so `{{ {'a': {}} }}`
// lexes. Errors are INVALID_ARGUMENT "line L, column C: message".
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "services/text/jinja_value.h"

namespace moemesh::jinja {

struct Expr;
using ExprPtr = std::unique_ptr<Expr>;

struct Expr {
  enum class Kind {
    kLiteral,  // literal
    kName,     // name
    kList,     // args = items
    kTuple,    // args = items
    kDict,     // args = k0, v0, k1, v1, ...
    kGetAttr,  // args[0] . name
    kGetItem,  // args[0] [ args[1] ]
    kSlice,    // args[0] [ args[1] : args[2] : args[3] ] (null when absent)
    kCall,     // args[0] ( args[1..], kwargs )
    kFilter,   // args[0] | name ( args[1..], kwargs )
    kTest,     // args[0] is [not] name ( args[1..] )
    kNot,      // not args[0]
    kNeg,      // - args[0]
    kPos,      // + args[0]
    kBinary,   // args[0] op args[1]; op in + - * / // % ** ~ == != < > <= >= in notin
    kAnd,      // args[0] and args[1]
    kOr,       // args[0] or args[1]
    kCond,     // args[0] if args[1] else args[2] (args[2] null when absent)
  };
  Kind kind;
  int line = 0;
  int column = 0;
  Value literal;
  std::string name;      // variable, attribute, filter, test name, or operator
  bool negated = false;  // `is not`
  std::vector<ExprPtr> args;
  std::vector<std::pair<std::string, ExprPtr>> kwargs;
};

struct Node;
using Body = std::vector<Node>;

struct Node {
  enum class Kind {
    kText,       // text
    kOutput,     // {{ expr }}
    kIf,         // conds[i] -> bodies[i]; else_body
    kFor,        // for targets in expr [if cond] body else else_body
    kSet,        // set targets = expr, or set targets[0].attr = expr
    kSetBlock,   // {% set name %}body{% endset %}
    kMacro,      // macro name(params = defaults) body
    kCallBlock,  // {% call(params) expr %}body{% endcall %}
    kBreak,
    kContinue,
    kScope,        // a body rendered as is ({% generation %}, {% filter %} uses name)
    kFilterBlock,  // {% filter name %}body{% endfilter %}: expr holds the filter applied
                   // to the kName "__body__"
  };
  Kind kind;
  int line = 0;
  int column = 0;
  std::string text;
  ExprPtr expr;
  ExprPtr cond;  // for-loop filter
  std::vector<ExprPtr> conds;
  std::vector<Body> bodies;
  Body body;
  Body else_body;
  std::vector<std::string> targets;
  std::string attr;  // set ns.attr
  std::vector<std::string> params;
  std::vector<ExprPtr> defaults;  // one per param, null when none
  bool recursive = false;
};

struct Program {
  Body body;
};

[[nodiscard]] absl::StatusOr<std::shared_ptr<const Program>> ParseProgram(absl::string_view source);

// Names of the filters and tests the interpreter knows, for parse-time checks.
bool IsKnownFilter(absl::string_view name);
bool IsKnownTest(absl::string_view name);

}  // namespace moemesh::jinja

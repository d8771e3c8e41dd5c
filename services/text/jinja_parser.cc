#include "services/text/jinja_parser.h"

#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <initializer_list>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "services/common/status_macros.h"

namespace moemesh::jinja {
namespace {

struct Token {
  enum class Type {
    kData,
    kVarBegin,
    kVarEnd,
    kBlockBegin,
    kBlockEnd,
    kName,
    kString,
    kInt,
    kFloat,
    kOp,
    kEof
  };
  Type type;
  std::string text;  // data, name, operator or decoded string
  Value number;
  int line = 1;
  int column = 1;
};

absl::Status ErrorAt(int line, int column, absl::string_view message) {
  return absl::InvalidArgumentError(
      absl::StrCat("line ", line, ", column ", column, ": ", message));
}

bool IsSpaceAscii(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

// Python's str.rstrip() / lstrip() over UTF-8, as jinja2's `-` modifiers use them.
std::string RStrip(absl::string_view s) { return PythonStrip(s, false, true); }

// Decodes a Python string literal body the way jinja2 does (unicode-escape after the
// non-ASCII characters have been protected).
absl::StatusOr<std::string> DecodeStringLiteral(absl::string_view body, int line, int column) {
  std::string out;
  for (size_t i = 0; i < body.size(); ++i) {
    const char c = body[i];
    if (c != '\\' || i + 1 >= body.size()) {
      out += c;
      continue;
    }
    const char e = body[++i];
    auto hex = [&](int digits) -> absl::StatusOr<uint32_t> {
      uint32_t v = 0;
      for (int k = 0; k < digits; ++k) {
        if (i + 1 >= body.size() || !std::isxdigit(static_cast<unsigned char>(body[i + 1]))) {
          return ErrorAt(line, column, "truncated escape in string literal");
        }
        const char h = body[++i];
        v = v * 16 +
            static_cast<uint32_t>(std::isdigit(static_cast<unsigned char>(h))
                                      ? h - '0'
                                      : std::tolower(static_cast<unsigned char>(h)) - 'a' + 10);
      }
      return v;
    };
    switch (e) {
      case '\n':
        break;  // line continuation
      case '\\':
        out += '\\';
        break;
      case '\'':
        out += '\'';
        break;
      case '"':
        out += '"';
        break;
      case 'a':
        out += '\a';
        break;
      case 'b':
        out += '\b';
        break;
      case 'f':
        out += '\f';
        break;
      case 'n':
        out += '\n';
        break;
      case 'r':
        out += '\r';
        break;
      case 't':
        out += '\t';
        break;
      case 'v':
        out += '\v';
        break;
      case 'x': {
        ASSIGN_OR_RETURN(uint32_t v, hex(2));
        AppendUtf8(v, out);
        break;
      }
      case 'u': {
        ASSIGN_OR_RETURN(uint32_t v, hex(4));
        AppendUtf8(v, out);
        break;
      }
      case 'U': {
        ASSIGN_OR_RETURN(uint32_t v, hex(8));
        if (v > 0x10ffff) return ErrorAt(line, column, "illegal Unicode character");
        AppendUtf8(v, out);
        break;
      }
      default:
        if (e >= '0' && e <= '7') {
          uint32_t v = static_cast<uint32_t>(e - '0');
          for (int k = 0; k < 2 && i + 1 < body.size() && body[i + 1] >= '0' && body[i + 1] <= '7';
               ++k) {
            v = v * 8 + static_cast<uint32_t>(body[++i] - '0');
          }
          AppendUtf8(v, out);
        } else {
          // Unknown escapes stay as written, as in Python.
          out += '\\';
          out += e;
        }
    }
  }
  return out;
}

class Lexer {
 public:
  explicit Lexer(absl::string_view source) {
    // Newlines normalised, one trailing newline dropped (keep_trailing_newline=False).
    src_.reserve(source.size());
    for (size_t i = 0; i < source.size(); ++i) {
      if (source[i] == '\r') {
        src_ += '\n';
        if (i + 1 < source.size() && source[i + 1] == '\n') ++i;
      } else {
        src_ += source[i];
      }
    }
    if (!src_.empty() && src_.back() == '\n') src_.pop_back();
  }

  absl::StatusOr<std::vector<Token>> Run() {
    bool line_starting = true;
    while (pos_ < src_.size()) {
      const size_t t = FindTagStart(pos_);
      if (t == std::string::npos) {
        EmitData(src_.substr(pos_), pos_);
        pos_ = src_.size();
        break;
      }
      const char kind = src_[t + 1];
      const char sign =
          (t + 2 < src_.size() && (src_[t + 2] == '-' || src_[t + 2] == '+')) ? src_[t + 2] : '\0';
      std::string text = src_.substr(pos_, t - pos_);
      if (sign == '-') {
        text = RStrip(text);
      } else if (sign != '+' && kind != '{') {
        // lstrip_blocks: drop spaces and tabs between the line start and a block/comment tag.
        const size_t nl = text.rfind('\n');
        const size_t l_pos = nl == std::string::npos ? 0 : nl + 1;
        if (l_pos > 0 || line_starting) {
          bool only_blank = true;
          for (size_t i = l_pos; i < text.size(); ++i) {
            if (text[i] != ' ' && text[i] != '\t') {
              only_blank = false;
              break;
            }
          }
          if (only_blank) text.resize(l_pos);
        }
      }
      EmitData(text, pos_);
      size_t p = t + 2 + (sign ? 1 : 0);
      if (kind == '#') {
        const size_t end = src_.find("#}", p);
        if (end == std::string::npos) {
          return ErrorAt(LineOf(t), ColumnOf(t), "missing end of comment tag");
        }
        size_t after = end + 2;
        const char end_sign = end > p ? src_[end - 1] : '\0';
        if (end_sign == '-') {
          while (after < src_.size() && IsSpaceAscii(src_[after])) ++after;
        } else if (end_sign != '+' && after < src_.size() && src_[after] == '\n') {
          ++after;
        }
        line_starting = after > 0 && src_[after - 1] == '\n' && after > end + 2;
        pos_ = after;
        continue;
      }
      if (kind == '%' && IsRawBlock(p)) {
        RETURN_IF_ERROR(LexRaw(t, p, line_starting));
        continue;
      }
      const bool block = kind == '%';
      tokens_.push_back(Token{block ? Token::Type::kBlockBegin : Token::Type::kVarBegin,
                              "",
                              {},
                              LineOf(t),
                              ColumnOf(t)});
      pos_ = p;
      ASSIGN_OR_RETURN(line_starting, LexTag(block, t));
    }
    tokens_.push_back(Token{Token::Type::kEof, "", {}, LineOf(pos_), ColumnOf(pos_)});
    return std::move(tokens_);
  }

 private:
  size_t FindTagStart(size_t from) const {
    size_t i = from;
    while (true) {
      i = src_.find('{', i);
      if (i == std::string::npos || i + 1 >= src_.size()) return std::string::npos;
      const char n = src_[i + 1];
      if (n == '{' || n == '%' || n == '#') return i;
      ++i;
    }
  }

  int LineOf(size_t offset) {
    // Offsets only grow while lexing, so the line count advances incrementally.
    while (line_scan_ < offset && line_scan_ < src_.size()) {
      if (src_[line_scan_] == '\n') {
        ++line_;
        line_start_ = line_scan_ + 1;
      }
      ++line_scan_;
    }
    return line_;
  }
  int ColumnOf(size_t offset) {
    LineOf(offset);
    return static_cast<int>(offset - line_start_) + 1;
  }

  void EmitData(const std::string& text, size_t at) {
    if (text.empty()) return;
    tokens_.push_back(Token{Token::Type::kData, text, {}, LineOf(at), ColumnOf(at)});
  }

  bool IsRawBlock(size_t p) const {
    size_t i = p;
    while (i < src_.size() && IsSpaceAscii(src_[i])) ++i;
    if (src_.compare(i, 3, "raw") != 0) return false;
    i += 3;
    while (i < src_.size() && IsSpaceAscii(src_[i])) ++i;
    if (i < src_.size() && (src_[i] == '-' || src_[i] == '+')) ++i;
    return src_.compare(i, 2, "%}") == 0;
  }

  absl::Status LexRaw(size_t tag_start, size_t p, bool& line_starting) {
    size_t i = src_.find("%}", p);
    const bool strip_after_open = src_[i - 1] == '-';
    i += 2;
    if (strip_after_open) {
      while (i < src_.size() && IsSpaceAscii(src_[i])) ++i;
    } else if (i < src_.size() && src_[i] == '\n') {
      ++i;
    }
    // Find {%[-+]? endraw [-+]?%}.
    size_t search = i;
    while (true) {
      const size_t open = src_.find("{%", search);
      if (open == std::string::npos) {
        return ErrorAt(LineOf(tag_start), ColumnOf(tag_start), "missing endraw tag");
      }
      size_t j = open + 2;
      const char sign = (j < src_.size() && (src_[j] == '-' || src_[j] == '+')) ? src_[j] : 0;
      if (sign) ++j;
      while (j < src_.size() && IsSpaceAscii(src_[j])) ++j;
      if (src_.compare(j, 6, "endraw") != 0) {
        search = open + 2;
        continue;
      }
      j += 6;
      while (j < src_.size() && IsSpaceAscii(src_[j])) ++j;
      char end_sign = 0;
      if (j < src_.size() && (src_[j] == '-' || src_[j] == '+')) end_sign = src_[j++];
      if (src_.compare(j, 2, "%}") != 0) {
        search = open + 2;
        continue;
      }
      std::string text = src_.substr(i, open - i);
      if (sign == '-') text = RStrip(text);
      EmitData(text, i);
      j += 2;
      if (end_sign == '-') {
        while (j < src_.size() && IsSpaceAscii(src_[j])) ++j;
      } else if (end_sign != '+' && j < src_.size() && src_[j] == '\n') {
        ++j;
      }
      line_starting = src_[j - 1] == '\n';
      pos_ = j;
      return absl::OkStatus();
    }
  }

  // Lexes the inside of a tag from pos_ through its end delimiter; returns whether the
  // consumed end ended with a newline (jinja2's line_starting for lstrip_blocks).
  absl::StatusOr<bool> LexTag(bool block, size_t tag_start) {
    int balance = 0;
    while (true) {
      while (pos_ < src_.size() && IsSpaceAscii(src_[pos_])) ++pos_;
      if (pos_ >= src_.size()) {
        return ErrorAt(LineOf(tag_start), ColumnOf(tag_start),
                       block ? "unexpected end of template: unclosed '{%'"
                             : "unexpected end of template: unclosed '{{'");
      }
      if (balance == 0) {
        const char* close = block ? "%}" : "}}";
        const Token::Type end_type = block ? Token::Type::kBlockEnd : Token::Type::kVarEnd;
        if (src_[pos_] == '-' && src_.compare(pos_ + 1, 2, close) == 0) {
          tokens_.push_back(Token{end_type, "", {}, LineOf(pos_), ColumnOf(pos_)});
          pos_ += 3;
          const size_t after_tag = pos_;
          while (pos_ < src_.size() && IsSpaceAscii(src_[pos_])) ++pos_;
          return pos_ > after_tag && src_[pos_ - 1] == '\n';
        }
        if (block && src_[pos_] == '+' && src_.compare(pos_ + 1, 2, close) == 0) {
          tokens_.push_back(Token{end_type, "", {}, LineOf(pos_), ColumnOf(pos_)});
          pos_ += 3;
          return false;
        }
        if (src_.compare(pos_, 2, close) == 0) {
          tokens_.push_back(Token{end_type, "", {}, LineOf(pos_), ColumnOf(pos_)});
          pos_ += 2;
          if (block && pos_ < src_.size() && src_[pos_] == '\n') {
            ++pos_;  // trim_blocks
            return true;
          }
          return false;
        }
      }
      const size_t start = pos_;
      const int line = LineOf(start);
      const int column = ColumnOf(start);
      const char c = src_[pos_];
      if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
        while (pos_ < src_.size() &&
               (std::isalnum(static_cast<unsigned char>(src_[pos_])) || src_[pos_] == '_')) {
          ++pos_;
        }
        tokens_.push_back(
            Token{Token::Type::kName, src_.substr(start, pos_ - start), {}, line, column});
        continue;
      }
      if (c == '\'' || c == '"') {
        size_t i = pos_ + 1;
        while (i < src_.size() && src_[i] != c) {
          if (src_[i] == '\\') ++i;
          ++i;
        }
        if (i >= src_.size()) return ErrorAt(line, column, "unterminated string literal");
        ASSIGN_OR_RETURN(std::string s,
                         DecodeStringLiteral(absl::string_view(src_).substr(pos_ + 1, i - pos_ - 1),
                                             line, column));
        tokens_.push_back(Token{Token::Type::kString, std::move(s), {}, line, column});
        pos_ = i + 1;
        continue;
      }
      if (std::isdigit(static_cast<unsigned char>(c))) {
        RETURN_IF_ERROR(LexNumber(line, column));
        continue;
      }
      static constexpr absl::string_view kOps2[] = {"//", "**", "==", "!=", ">=", "<="};
      bool matched = false;
      for (absl::string_view op : kOps2) {
        if (src_.compare(pos_, 2, std::string(op)) == 0) {
          tokens_.push_back(Token{Token::Type::kOp, std::string(op), {}, line, column});
          pos_ += 2;
          matched = true;
          break;
        }
      }
      if (matched) continue;
      if (absl::string_view("+-*/%~[](){}<>=.:|,;").find(c) != absl::string_view::npos) {
        if (c == '(' || c == '[' || c == '{') ++balance;
        if (c == ')' || c == ']' || c == '}') {
          if (balance == 0)
            return ErrorAt(line, column, absl::StrCat("unexpected '", std::string(1, c), "'"));
          --balance;
        }
        tokens_.push_back(Token{Token::Type::kOp, std::string(1, c), {}, line, column});
        ++pos_;
        continue;
      }
      return ErrorAt(line, column, absl::StrCat("unexpected char '", std::string(1, c), "'"));
    }
  }

  absl::Status LexNumber(int line, int column) {
    std::string digits;
    auto take_digits = [&] {
      while (pos_ < src_.size() && (std::isdigit(static_cast<unsigned char>(src_[pos_])) ||
                                    (src_[pos_] == '_' && pos_ + 1 < src_.size() &&
                                     std::isdigit(static_cast<unsigned char>(src_[pos_ + 1]))))) {
        if (src_[pos_] != '_') digits += src_[pos_];
        ++pos_;
      }
    };
    take_digits();
    bool is_float = false;
    if (pos_ + 1 < src_.size() && src_[pos_] == '.' &&
        std::isdigit(static_cast<unsigned char>(src_[pos_ + 1]))) {
      is_float = true;
      digits += '.';
      ++pos_;
      take_digits();
    }
    if (pos_ < src_.size() && (src_[pos_] == 'e' || src_[pos_] == 'E')) {
      size_t j = pos_ + 1;
      if (j < src_.size() && (src_[j] == '+' || src_[j] == '-')) ++j;
      if (j < src_.size() && std::isdigit(static_cast<unsigned char>(src_[j]))) {
        is_float = true;
        digits += 'e';
        digits.append(src_, pos_ + 1, j - pos_ - 1);
        pos_ = j;
        take_digits();
      }
    }
    Token tok{is_float ? Token::Type::kFloat : Token::Type::kInt, digits, {}, line, column};
    if (is_float) {
      tok.number = Value(std::strtod(digits.c_str(), nullptr));
    } else {
      errno = 0;
      const long long v = std::strtoll(digits.c_str(), nullptr, 10);
      if (errno == ERANGE) return ErrorAt(line, column, "integer literal out of range");
      tok.number = Value(static_cast<int64_t>(v));
    }
    tokens_.push_back(std::move(tok));
    return absl::OkStatus();
  }

  std::string src_;
  size_t pos_ = 0;
  std::vector<Token> tokens_;
  int line_ = 1;
  size_t line_start_ = 0;
  size_t line_scan_ = 0;
};

constexpr absl::string_view kFilters[] = {
    "abs",    "attr",   "capitalize", "count",      "d",           "default", "dictsort",
    "e",      "escape", "first",      "float",      "forceescape", "indent",  "int",
    "items",  "join",   "last",       "length",     "list",        "lower",   "map",
    "max",    "min",    "reject",     "rejectattr", "replace",     "reverse", "round",
    "safe",   "select", "selectattr", "sort",       "string",      "sum",     "title",
    "tojson", "trim",   "unique",     "upper",      "wordcount"};
constexpr absl::string_view kTests[] = {
    "boolean", "callable", "defined",  "divisibleby", "eq",       "equalto",     "escaped",
    "even",    "false",    "filter",   "float",       "ge",       "greaterthan", "gt",
    "in",      "integer",  "iterable", "le",          "lessthan", "lower",       "lt",
    "mapping", "ne",       "none",     "number",      "odd",      "sameas",      "sequence",
    "string",  "test",     "true",     "undefined",   "upper",    "==",          "!=",
    "<",       "<=",       ">",        ">="};

Node NewNode(Node::Kind kind, int line, int column) {
  Node n;
  n.kind = kind;
  n.line = line;
  n.column = column;
  return n;
}

class Parser {
 public:
  explicit Parser(std::vector<Token> tokens) : toks_(std::move(tokens)) {}

  absl::StatusOr<std::shared_ptr<const Program>> Run() {
    auto program = std::make_shared<Program>();
    std::string stopped;
    ASSIGN_OR_RETURN(program->body, Subparse({}, stopped));
    if (Cur().type != Token::Type::kEof) return Unexpected();
    return std::shared_ptr<const Program>(std::move(program));
  }

 private:
  const Token& Cur() const { return toks_[i_]; }
  const Token& Peek(size_t k = 1) const { return toks_[std::min(i_ + k, toks_.size() - 1)]; }
  void Advance() {
    if (i_ + 1 < toks_.size()) ++i_;
  }
  bool IsOp(absl::string_view op) const {
    return Cur().type == Token::Type::kOp && Cur().text == op;
  }
  bool IsName(absl::string_view name) const {
    return Cur().type == Token::Type::kName && Cur().text == name;
  }
  static std::string Describe(const Token& t) {
    switch (t.type) {
      case Token::Type::kEof:
        return "end of template";
      case Token::Type::kBlockEnd:
        return "end of statement block";
      case Token::Type::kVarEnd:
        return "end of print statement";
      case Token::Type::kBlockBegin:
        return "begin of statement block";
      case Token::Type::kVarBegin:
        return "begin of print statement";
      case Token::Type::kData:
        return "template data";
      case Token::Type::kString:
        return "string";
      default:
        return absl::StrCat("'", t.text, "'");
    }
  }
  absl::Status Unexpected() const {
    return ErrorAt(Cur().line, Cur().column, absl::StrCat("unexpected ", Describe(Cur())));
  }
  absl::Status ExpectOp(absl::string_view op) {
    if (!IsOp(op)) {
      return ErrorAt(Cur().line, Cur().column,
                     absl::StrCat("expected '", std::string(op), "', got ", Describe(Cur())));
    }
    Advance();
    return absl::OkStatus();
  }
  absl::Status ExpectName(absl::string_view name) {
    if (!IsName(name)) {
      return ErrorAt(Cur().line, Cur().column,
                     absl::StrCat("expected '", std::string(name), "', got ", Describe(Cur())));
    }
    Advance();
    return absl::OkStatus();
  }
  absl::StatusOr<std::string> TakeName() {
    if (Cur().type != Token::Type::kName) {
      return ErrorAt(Cur().line, Cur().column,
                     absl::StrCat("expected a name, got ", Describe(Cur())));
    }
    std::string n = Cur().text;
    Advance();
    return n;
  }
  absl::Status ExpectBlockEnd() {
    if (Cur().type != Token::Type::kBlockEnd) {
      return ErrorAt(Cur().line, Cur().column,
                     absl::StrCat("expected end of statement block, got ", Describe(Cur())));
    }
    Advance();
    return absl::OkStatus();
  }

  // Parses nodes until a block tag whose name is in `end_names` (left unconsumed after the
  // name: the stream is at the name token; `stopped` receives it) or the end of template.
  absl::StatusOr<Body> Subparse(std::initializer_list<absl::string_view> end_names,
                                std::string& stopped) {
    Body body;
    while (true) {
      const Token& t = Cur();
      switch (t.type) {
        case Token::Type::kEof:
          if (end_names.size() > 0) {
            return ErrorAt(t.line, t.column,
                           absl::StrCat("unexpected end of template, expected '",
                                        absl::StrJoin(end_names, "' or '"), "'"));
          }
          return body;
        case Token::Type::kData: {
          Node n = NewNode(Node::Kind::kText, t.line, t.column);
          n.text = t.text;
          body.push_back(std::move(n));
          Advance();
          break;
        }
        case Token::Type::kVarBegin: {
          Node n = NewNode(Node::Kind::kOutput, t.line, t.column);
          Advance();
          ASSIGN_OR_RETURN(n.expr, ParseTuple(true));
          if (Cur().type != Token::Type::kVarEnd) {
            return ErrorAt(Cur().line, Cur().column,
                           absl::StrCat("expected end of print statement, got ", Describe(Cur())));
          }
          Advance();
          body.push_back(std::move(n));
          break;
        }
        case Token::Type::kBlockBegin: {
          Advance();
          if (Cur().type != Token::Type::kName) {
            return ErrorAt(Cur().line, Cur().column, "tag name expected");
          }
          for (absl::string_view e : end_names) {
            if (Cur().text == e) {
              stopped = Cur().text;
              Advance();
              return body;
            }
          }
          ASSIGN_OR_RETURN(Node n, ParseStatement());
          body.push_back(std::move(n));
          break;
        }
        default:
          return Unexpected();
      }
    }
  }

  absl::StatusOr<Node> ParseStatement() {
    const Token tag = Cur();
    const std::string& name = tag.text;
    if (name == "if") return ParseIf();
    if (name == "for") return ParseFor();
    if (name == "set") return ParseSet();
    if (name == "macro") return ParseMacro();
    if (name == "call") return ParseCallBlock();
    if (name == "filter") return ParseFilterBlock();
    if (name == "break" || name == "continue") {
      if (loop_depth_ == 0) {
        return ErrorAt(tag.line, tag.column, absl::StrCat("'", name, "' outside of a for loop"));
      }
      Advance();
      RETURN_IF_ERROR(ExpectBlockEnd());
      return NewNode(name == "break" ? Node::Kind::kBreak : Node::Kind::kContinue, tag.line,
                     tag.column);
    }
    if (name == "generation") {
      Advance();
      RETURN_IF_ERROR(ExpectBlockEnd());
      Node n = NewNode(Node::Kind::kScope, tag.line, tag.column);
      std::string stopped;
      ASSIGN_OR_RETURN(n.body, Subparse({"endgeneration"}, stopped));
      RETURN_IF_ERROR(ExpectBlockEnd());
      return n;
    }
    return ErrorAt(tag.line, tag.column, absl::StrCat("encountered unknown tag '", name, "'"));
  }

  absl::StatusOr<Node> ParseIf() {
    Node n = NewNode(Node::Kind::kIf, Cur().line, Cur().column);
    Advance();
    ++if_depth_;
    while (true) {
      ASSIGN_OR_RETURN(ExprPtr cond, ParseTuple(false));
      RETURN_IF_ERROR(ExpectBlockEnd());
      std::string stopped;
      ASSIGN_OR_RETURN(Body body, Subparse({"elif", "else", "endif"}, stopped));
      n.conds.push_back(std::move(cond));
      n.bodies.push_back(std::move(body));
      if (stopped == "elif") continue;
      if (stopped == "else") {
        RETURN_IF_ERROR(ExpectBlockEnd());
        ASSIGN_OR_RETURN(n.else_body, Subparse({"endif"}, stopped));
      }
      RETURN_IF_ERROR(ExpectBlockEnd());
      break;
    }
    --if_depth_;
    return n;
  }

  absl::StatusOr<std::vector<std::string>> ParseTargets() {
    std::vector<std::string> targets;
    const bool paren = IsOp("(");
    if (paren) Advance();
    while (true) {
      ASSIGN_OR_RETURN(std::string t, TakeName());
      targets.push_back(std::move(t));
      if (!IsOp(",")) break;
      Advance();
      if (Cur().type != Token::Type::kName) break;  // trailing comma
    }
    if (paren) RETURN_IF_ERROR(ExpectOp(")"));
    return targets;
  }

  absl::StatusOr<Node> ParseFor() {
    Node n = NewNode(Node::Kind::kFor, Cur().line, Cur().column);
    Advance();
    ASSIGN_OR_RETURN(n.targets, ParseTargets());
    RETURN_IF_ERROR(ExpectName("in"));
    ASSIGN_OR_RETURN(n.expr, ParseTuple(false, /*stop_at_if_recursive=*/true));
    if (IsName("if")) {
      Advance();
      ASSIGN_OR_RETURN(n.cond, ParseExpression(true));
    }
    if (IsName("recursive")) {
      Advance();
      n.recursive = true;
    }
    RETURN_IF_ERROR(ExpectBlockEnd());
    ++loop_depth_;
    std::string stopped;
    ASSIGN_OR_RETURN(n.body, Subparse({"endfor", "else"}, stopped));
    --loop_depth_;
    if (stopped == "else") {
      RETURN_IF_ERROR(ExpectBlockEnd());
      ASSIGN_OR_RETURN(n.else_body, Subparse({"endfor"}, stopped));
    }
    RETURN_IF_ERROR(ExpectBlockEnd());
    return n;
  }

  absl::StatusOr<Node> ParseSet() {
    Node n = NewNode(Node::Kind::kSet, Cur().line, Cur().column);
    Advance();
    ASSIGN_OR_RETURN(std::string first, TakeName());
    if (IsOp(".")) {
      Advance();
      ASSIGN_OR_RETURN(n.attr, TakeName());
      n.targets.push_back(std::move(first));
    } else {
      n.targets.push_back(std::move(first));
      while (IsOp(",")) {
        Advance();
        if (Cur().type != Token::Type::kName) break;
        ASSIGN_OR_RETURN(std::string t, TakeName());
        n.targets.push_back(std::move(t));
      }
    }
    if (IsOp("=")) {
      Advance();
      ASSIGN_OR_RETURN(n.expr, ParseTuple(true));
      RETURN_IF_ERROR(ExpectBlockEnd());
      return n;
    }
    if (!n.attr.empty() || n.targets.size() != 1) return Unexpected();
    // Block set: {% set name %}...{% endset %}, optionally with filters.
    n.kind = Node::Kind::kSetBlock;
    if (IsOp("|")) {
      auto placeholder = std::make_unique<Expr>();
      placeholder->kind = Expr::Kind::kName;
      placeholder->name = "__body__";
      ASSIGN_OR_RETURN(n.expr, ParseFilterChain(std::move(placeholder)));
    }
    RETURN_IF_ERROR(ExpectBlockEnd());
    std::string stopped;
    ASSIGN_OR_RETURN(n.body, Subparse({"endset"}, stopped));
    RETURN_IF_ERROR(ExpectBlockEnd());
    return n;
  }

  absl::Status ParseParams(Node& n) {
    RETURN_IF_ERROR(ExpectOp("("));
    while (!IsOp(")")) {
      if (!n.params.empty()) RETURN_IF_ERROR(ExpectOp(","));
      if (IsOp(")")) break;
      ASSIGN_OR_RETURN(std::string p, TakeName());
      n.params.push_back(std::move(p));
      if (IsOp("=")) {
        Advance();
        ASSIGN_OR_RETURN(ExprPtr d, ParseExpression(true));
        n.defaults.push_back(std::move(d));
      } else {
        n.defaults.push_back(nullptr);
      }
    }
    Advance();
    return absl::OkStatus();
  }

  absl::StatusOr<Node> ParseMacro() {
    Node n = NewNode(Node::Kind::kMacro, Cur().line, Cur().column);
    Advance();
    ASSIGN_OR_RETURN(n.text, TakeName());
    RETURN_IF_ERROR(ParseParams(n));
    RETURN_IF_ERROR(ExpectBlockEnd());
    const int saved_loop = loop_depth_;
    loop_depth_ = 0;
    std::string stopped;
    ASSIGN_OR_RETURN(n.body, Subparse({"endmacro"}, stopped));
    loop_depth_ = saved_loop;
    RETURN_IF_ERROR(ExpectBlockEnd());
    return n;
  }

  absl::StatusOr<Node> ParseCallBlock() {
    Node n = NewNode(Node::Kind::kCallBlock, Cur().line, Cur().column);
    Advance();
    if (IsOp("(")) RETURN_IF_ERROR(ParseParams(n));
    ASSIGN_OR_RETURN(n.expr, ParseExpression(true));
    if (n.expr->kind != Expr::Kind::kCall) {
      return ErrorAt(n.line, n.column, "expected call");
    }
    RETURN_IF_ERROR(ExpectBlockEnd());
    std::string stopped;
    ASSIGN_OR_RETURN(n.body, Subparse({"endcall"}, stopped));
    RETURN_IF_ERROR(ExpectBlockEnd());
    return n;
  }

  absl::StatusOr<Node> ParseFilterBlock() {
    Node n = NewNode(Node::Kind::kFilterBlock, Cur().line, Cur().column);
    Advance();
    auto placeholder = std::make_unique<Expr>();
    placeholder->kind = Expr::Kind::kName;
    placeholder->name = "__body__";
    ASSIGN_OR_RETURN(n.expr, ParseFilterChain(std::move(placeholder), /*leading_pipe=*/false));
    RETURN_IF_ERROR(ExpectBlockEnd());
    std::string stopped;
    ASSIGN_OR_RETURN(n.body, Subparse({"endfilter"}, stopped));
    RETURN_IF_ERROR(ExpectBlockEnd());
    return n;
  }

  // ---- expressions ----
  ExprPtr MakeExpr(Expr::Kind kind, const Token& at) {
    auto e = std::make_unique<Expr>();
    e->kind = kind;
    e->line = at.line;
    e->column = at.column;
    return e;
  }

  absl::StatusOr<ExprPtr> ParseTuple(bool with_condexpr, bool stop_at_if_recursive = false) {
    const Token start = Cur();
    ASSIGN_OR_RETURN(ExprPtr first, ParseExpression(with_condexpr));
    if (!IsOp(",")) return first;
    auto tuple = MakeExpr(Expr::Kind::kTuple, start);
    tuple->args.push_back(std::move(first));
    while (IsOp(",")) {
      Advance();
      if (Cur().type == Token::Type::kVarEnd || Cur().type == Token::Type::kBlockEnd || IsOp(")") ||
          (stop_at_if_recursive && (IsName("if") || IsName("recursive")))) {
        break;
      }
      ASSIGN_OR_RETURN(ExprPtr e, ParseExpression(with_condexpr));
      tuple->args.push_back(std::move(e));
    }
    return tuple;
  }

  absl::StatusOr<ExprPtr> ParseExpression(bool with_condexpr) {
    if (with_condexpr) return ParseCondExpr();
    return ParseOr();
  }

  absl::StatusOr<ExprPtr> ParseCondExpr() {
    const Token start = Cur();
    ASSIGN_OR_RETURN(ExprPtr expr, ParseOr());
    while (IsName("if")) {
      Advance();
      ASSIGN_OR_RETURN(ExprPtr cond, ParseOr());
      ExprPtr else_expr;
      if (IsName("else")) {
        Advance();
        ASSIGN_OR_RETURN(else_expr, ParseCondExpr());
      }
      auto c = MakeExpr(Expr::Kind::kCond, start);
      c->args.push_back(std::move(expr));
      c->args.push_back(std::move(cond));
      c->args.push_back(std::move(else_expr));
      expr = std::move(c);
    }
    return expr;
  }

  absl::StatusOr<ExprPtr> ParseOr() {
    ASSIGN_OR_RETURN(ExprPtr left, ParseAnd());
    while (IsName("or")) {
      const Token at = Cur();
      Advance();
      ASSIGN_OR_RETURN(ExprPtr right, ParseAnd());
      auto e = MakeExpr(Expr::Kind::kOr, at);
      e->args.push_back(std::move(left));
      e->args.push_back(std::move(right));
      left = std::move(e);
    }
    return left;
  }

  absl::StatusOr<ExprPtr> ParseAnd() {
    ASSIGN_OR_RETURN(ExprPtr left, ParseNot());
    while (IsName("and")) {
      const Token at = Cur();
      Advance();
      ASSIGN_OR_RETURN(ExprPtr right, ParseNot());
      auto e = MakeExpr(Expr::Kind::kAnd, at);
      e->args.push_back(std::move(left));
      e->args.push_back(std::move(right));
      left = std::move(e);
    }
    return left;
  }

  absl::StatusOr<ExprPtr> ParseNot() {
    if (IsName("not")) {
      const Token at = Cur();
      Advance();
      ASSIGN_OR_RETURN(ExprPtr inner, ParseNot());
      auto e = MakeExpr(Expr::Kind::kNot, at);
      e->args.push_back(std::move(inner));
      return e;
    }
    return ParseCompare();
  }

  ExprPtr Binary(std::string op, ExprPtr l, ExprPtr r, const Token& at) {
    auto e = MakeExpr(Expr::Kind::kBinary, at);
    e->name = std::move(op);
    e->args.push_back(std::move(l));
    e->args.push_back(std::move(r));
    return e;
  }

  absl::StatusOr<ExprPtr> ParseCompare() {
    ASSIGN_OR_RETURN(ExprPtr expr, ParseMath1());
    while (true) {
      const Token at = Cur();
      std::string op;
      if (at.type == Token::Type::kOp && (at.text == "==" || at.text == "!=" || at.text == "<" ||
                                          at.text == ">" || at.text == "<=" || at.text == ">=")) {
        op = at.text;
        Advance();
      } else if (IsName("in")) {
        op = "in";
        Advance();
      } else if (IsName("not") && Peek().type == Token::Type::kName && Peek().text == "in") {
        op = "notin";
        Advance();
        Advance();
      } else {
        break;
      }
      ASSIGN_OR_RETURN(ExprPtr right, ParseMath1());
      expr = Binary(op, std::move(expr), std::move(right), at);
    }
    return expr;
  }

  absl::StatusOr<ExprPtr> ParseMath1() {
    ASSIGN_OR_RETURN(ExprPtr left, ParseConcat());
    while (IsOp("+") || IsOp("-")) {
      const Token at = Cur();
      Advance();
      ASSIGN_OR_RETURN(ExprPtr right, ParseConcat());
      left = Binary(at.text, std::move(left), std::move(right), at);
    }
    return left;
  }

  absl::StatusOr<ExprPtr> ParseConcat() {
    ASSIGN_OR_RETURN(ExprPtr left, ParseMath2());
    while (IsOp("~")) {
      const Token at = Cur();
      Advance();
      ASSIGN_OR_RETURN(ExprPtr right, ParseMath2());
      left = Binary("~", std::move(left), std::move(right), at);
    }
    return left;
  }

  absl::StatusOr<ExprPtr> ParseMath2() {
    ASSIGN_OR_RETURN(ExprPtr left, ParsePow());
    while (IsOp("*") || IsOp("/") || IsOp("//") || IsOp("%")) {
      const Token at = Cur();
      Advance();
      ASSIGN_OR_RETURN(ExprPtr right, ParsePow());
      left = Binary(at.text, std::move(left), std::move(right), at);
    }
    return left;
  }

  absl::StatusOr<ExprPtr> ParsePow() {
    ASSIGN_OR_RETURN(ExprPtr left, ParseUnary(true));
    while (IsOp("**")) {
      const Token at = Cur();
      Advance();
      ASSIGN_OR_RETURN(ExprPtr right, ParseUnary(true));
      left = Binary("**", std::move(left), std::move(right), at);
    }
    return left;
  }

  absl::StatusOr<ExprPtr> ParseUnary(bool with_filter) {
    const Token at = Cur();
    ExprPtr node;
    if (IsOp("-") || IsOp("+")) {
      Advance();
      ASSIGN_OR_RETURN(ExprPtr inner, ParseUnary(false));
      node = MakeExpr(at.text == "-" ? Expr::Kind::kNeg : Expr::Kind::kPos, at);
      node->args.push_back(std::move(inner));
    } else {
      ASSIGN_OR_RETURN(node, ParsePrimary());
    }
    ASSIGN_OR_RETURN(node, ParsePostfix(std::move(node)));
    if (with_filter) {
      ASSIGN_OR_RETURN(node, ParseFilterExpr(std::move(node)));
    }
    return node;
  }

  absl::StatusOr<ExprPtr> ParsePrimary() {
    const Token t = Cur();
    switch (t.type) {
      case Token::Type::kName: {
        Advance();
        if (t.text == "true" || t.text == "True") {
          auto e = MakeExpr(Expr::Kind::kLiteral, t);
          e->literal = Value(true);
          return e;
        }
        if (t.text == "false" || t.text == "False") {
          auto e = MakeExpr(Expr::Kind::kLiteral, t);
          e->literal = Value(false);
          return e;
        }
        if (t.text == "none" || t.text == "None") {
          auto e = MakeExpr(Expr::Kind::kLiteral, t);
          e->literal = Value::None();
          return e;
        }
        auto e = MakeExpr(Expr::Kind::kName, t);
        e->name = t.text;
        return e;
      }
      case Token::Type::kString: {
        std::string s;
        while (Cur().type == Token::Type::kString) {
          s += Cur().text;
          Advance();
        }
        auto e = MakeExpr(Expr::Kind::kLiteral, t);
        e->literal = Value(std::move(s));
        return e;
      }
      case Token::Type::kInt:
      case Token::Type::kFloat: {
        Advance();
        auto e = MakeExpr(Expr::Kind::kLiteral, t);
        e->literal = t.number;
        return e;
      }
      case Token::Type::kOp:
        if (t.text == "(") {
          Advance();
          if (IsOp(")")) {
            Advance();
            return MakeExpr(Expr::Kind::kTuple, t);
          }
          ASSIGN_OR_RETURN(ExprPtr inner, ParseTuple(true));
          RETURN_IF_ERROR(ExpectOp(")"));
          return inner;
        }
        if (t.text == "[") {
          Advance();
          auto e = MakeExpr(Expr::Kind::kList, t);
          while (!IsOp("]")) {
            if (!e->args.empty()) RETURN_IF_ERROR(ExpectOp(","));
            if (IsOp("]")) break;
            ASSIGN_OR_RETURN(ExprPtr item, ParseExpression(true));
            e->args.push_back(std::move(item));
          }
          Advance();
          return e;
        }
        if (t.text == "{") {
          Advance();
          auto e = MakeExpr(Expr::Kind::kDict, t);
          while (!IsOp("}")) {
            if (!e->args.empty()) RETURN_IF_ERROR(ExpectOp(","));
            if (IsOp("}")) break;
            ASSIGN_OR_RETURN(ExprPtr key, ParseExpression(true));
            RETURN_IF_ERROR(ExpectOp(":"));
            ASSIGN_OR_RETURN(ExprPtr value, ParseExpression(true));
            e->args.push_back(std::move(key));
            e->args.push_back(std::move(value));
          }
          Advance();
          return e;
        }
        break;
      default:
        break;
    }
    return Unexpected();
  }

  absl::StatusOr<ExprPtr> ParsePostfix(ExprPtr node) {
    while (true) {
      if (IsOp(".") || IsOp("[")) {
        ASSIGN_OR_RETURN(node, ParseSubscript(std::move(node)));
      } else if (IsOp("(")) {
        ASSIGN_OR_RETURN(node, ParseCall(std::move(node)));
      } else {
        return node;
      }
    }
  }

  absl::StatusOr<ExprPtr> ParseFilterExpr(ExprPtr node) {
    while (true) {
      if (IsOp("|")) {
        ASSIGN_OR_RETURN(node, ParseFilterChain(std::move(node)));
      } else if (IsName("is")) {
        ASSIGN_OR_RETURN(node, ParseTest(std::move(node)));
      } else if (IsOp("(")) {
        ASSIGN_OR_RETURN(node, ParseCall(std::move(node)));
      } else {
        return node;
      }
    }
  }

  absl::StatusOr<ExprPtr> ParseSubscript(ExprPtr node) {
    const Token at = Cur();
    if (IsOp(".")) {
      Advance();
      if (Cur().type == Token::Type::kName) {
        auto e = MakeExpr(Expr::Kind::kGetAttr, at);
        e->name = Cur().text;
        Advance();
        e->args.push_back(std::move(node));
        return e;
      }
      if (Cur().type == Token::Type::kInt) {
        auto e = MakeExpr(Expr::Kind::kGetItem, at);
        auto idx = MakeExpr(Expr::Kind::kLiteral, Cur());
        idx->literal = Cur().number;
        Advance();
        e->args.push_back(std::move(node));
        e->args.push_back(std::move(idx));
        return e;
      }
      return Unexpected();
    }
    Advance();  // '['
    // Slice or index.
    ExprPtr parts[3];
    bool is_slice = false;
    int part = 0;
    while (!IsOp("]")) {
      if (IsOp(":")) {
        is_slice = true;
        if (++part > 2) return Unexpected();
        Advance();
        continue;
      }
      if (parts[part]) return Unexpected();
      ASSIGN_OR_RETURN(parts[part], ParseExpression(true));
      if (!is_slice && IsOp(",")) {
        // Tuple index: a[1, 2]; rare, parsed as a tuple key.
        auto tuple = MakeExpr(Expr::Kind::kTuple, at);
        tuple->args.push_back(std::move(parts[0]));
        while (IsOp(",")) {
          Advance();
          if (IsOp("]")) break;
          ASSIGN_OR_RETURN(ExprPtr item, ParseExpression(true));
          tuple->args.push_back(std::move(item));
        }
        parts[0] = std::move(tuple);
      }
    }
    Advance();  // ']'
    if (is_slice) {
      auto e = MakeExpr(Expr::Kind::kSlice, at);
      e->args.push_back(std::move(node));
      for (auto& p : parts) e->args.push_back(std::move(p));
      return e;
    }
    if (!parts[0]) return ErrorAt(at.line, at.column, "expected an index");
    auto e = MakeExpr(Expr::Kind::kGetItem, at);
    e->args.push_back(std::move(node));
    e->args.push_back(std::move(parts[0]));
    return e;
  }

  absl::Status ParseCallArgs(Expr& call) {
    RETURN_IF_ERROR(ExpectOp("("));
    bool first = true;
    while (!IsOp(")")) {
      if (!first) RETURN_IF_ERROR(ExpectOp(","));
      first = false;
      if (IsOp(")")) break;
      if (Cur().type == Token::Type::kName && Peek().type == Token::Type::kOp &&
          Peek().text == "=") {
        std::string key = Cur().text;
        Advance();
        Advance();
        ASSIGN_OR_RETURN(ExprPtr v, ParseExpression(true));
        call.kwargs.emplace_back(std::move(key), std::move(v));
      } else {
        if (!call.kwargs.empty()) {
          return ErrorAt(Cur().line, Cur().column, "positional argument follows keyword argument");
        }
        ASSIGN_OR_RETURN(ExprPtr v, ParseExpression(true));
        call.args.push_back(std::move(v));
      }
    }
    Advance();
    return absl::OkStatus();
  }

  absl::StatusOr<ExprPtr> ParseCall(ExprPtr callee) {
    auto e = MakeExpr(Expr::Kind::kCall, Cur());
    e->args.push_back(std::move(callee));
    RETURN_IF_ERROR(ParseCallArgs(*e));
    return e;
  }

  absl::StatusOr<ExprPtr> ParseFilterChain(ExprPtr node, bool leading_pipe = true) {
    bool need_pipe = leading_pipe;
    while (!need_pipe || IsOp("|")) {
      if (need_pipe) Advance();
      need_pipe = true;
      const Token at = Cur();
      ASSIGN_OR_RETURN(std::string name, TakeName());
      while (IsOp(".")) {
        Advance();
        ASSIGN_OR_RETURN(std::string part, TakeName());
        absl::StrAppend(&name, ".", part);
      }
      if (!IsKnownFilter(name) && if_depth_ == 0) {
        return ErrorAt(at.line, at.column, absl::StrCat("no filter named '", name, "'"));
      }
      auto e = MakeExpr(Expr::Kind::kFilter, at);
      e->name = name;
      e->args.push_back(std::move(node));
      if (IsOp("(")) RETURN_IF_ERROR(ParseCallArgs(*e));
      node = std::move(e);
    }
    return node;
  }

  absl::StatusOr<ExprPtr> ParseTest(ExprPtr node) {
    const Token at = Cur();
    Advance();  // 'is'
    auto e = MakeExpr(Expr::Kind::kTest, at);
    if (IsName("not")) {
      e->negated = true;
      Advance();
    }
    ASSIGN_OR_RETURN(std::string name, TakeName());
    while (IsOp(".")) {
      Advance();
      ASSIGN_OR_RETURN(std::string part, TakeName());
      absl::StrAppend(&name, ".", part);
    }
    if (!IsKnownTest(name) && if_depth_ == 0) {
      return ErrorAt(at.line, at.column, absl::StrCat("no test named '", name, "'"));
    }
    e->name = name;
    e->args.push_back(std::move(node));
    if (IsOp("(")) {
      RETURN_IF_ERROR(ParseCallArgs(*e));
    } else if ((Cur().type == Token::Type::kName || Cur().type == Token::Type::kString ||
                Cur().type == Token::Type::kInt || Cur().type == Token::Type::kFloat || IsOp("[") ||
                IsOp("{")) &&
               !IsName("else") && !IsName("or") && !IsName("and")) {
      if (IsName("is"))
        return ErrorAt(Cur().line, Cur().column, "you cannot chain multiple tests with is");
      ASSIGN_OR_RETURN(ExprPtr arg, ParsePrimary());
      ASSIGN_OR_RETURN(arg, ParsePostfix(std::move(arg)));
      e->args.push_back(std::move(arg));
    }
    return e;
  }

  std::vector<Token> toks_;
  size_t i_ = 0;
  int if_depth_ = 0;
  int loop_depth_ = 0;
};

}  // namespace

bool IsKnownFilter(absl::string_view name) {
  for (absl::string_view f : kFilters) {
    if (f == name) return true;
  }
  return false;
}

bool IsKnownTest(absl::string_view name) {
  for (absl::string_view t : kTests) {
    if (t == name) return true;
  }
  return false;
}

absl::StatusOr<std::shared_ptr<const Program>> ParseProgram(absl::string_view source) {
  Lexer lexer(source);
  ASSIGN_OR_RETURN(std::vector<Token> tokens, lexer.Run());
  Parser parser(std::move(tokens));
  return parser.Run();
}

}  // namespace moemesh::jinja

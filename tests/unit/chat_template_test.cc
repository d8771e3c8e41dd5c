// Unit tests of the chat-template interpreter (services/text/chat_template.h): every
// statement, filter, test, string method and whitespace rule it supports, and its errors.
//
// Expected strings are Python's: each case was rendered with jinja2 3.1 set up exactly as
// transformers' apply_chat_template sets it up (tests/tokenizer/chat/golden_chat_python.py),
// with strftime_now at 2023-11-14 22:13:20 UTC.
#include "services/text/chat_template.h"

#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace moemesh {
namespace {

using ::testing::HasSubstr;
using Json = nlohmann::ordered_json;

const absl::Time kNow = absl::FromUnixSeconds(1700000000);  // 2023-11-14 22:13:20 UTC

struct RenderCase {
  const char* name;
  const char* source;
  const char* context;
  const char* expected;
};

std::string CaseName(const ::testing::TestParamInfo<RenderCase>& info) { return info.param.name; }

class RendersLikePython : public ::testing::TestWithParam<RenderCase> {};

TEST_P(RendersLikePython, CharForChar) {
  const RenderCase& c = GetParam();
  auto t = ChatTemplate::Parse(c.source);
  ASSERT_TRUE(t.ok()) << t.status();
  auto out = t->Render(Json::parse(c.context), kNow);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(*out, c.expected);
}

INSTANTIATE_TEST_SUITE_P(Interpreter, RendersLikePython,
                         ::testing::ValuesIn(std::vector<RenderCase>{
                             {"IfElifElse",
                              R"j({% for x in [1, 2, 3] %}{% if x == 1 %}one{% elif x == 2 %}two{% else %}many{% endif %},{% endfor %})j",
                              R"j({})j", R"j(one,two,many,)j"},
                             {"LoopVariables",
                              R"j({% for x in 'abc' %}{{ loop.index }}{{ loop.index0 }}{{ loop.revindex }}{{ loop.revindex0 }}{{ loop.first }}{{ loop.last }}{{ loop.length }}|{% endfor %})j",
                              R"j({})j", R"j(1032TrueFalse3|2121FalseFalse3|3210FalseTrue3|)j"},
                             {"LoopPrevNextCycle",
                              R"j({% for x in [1,2,3] %}{{ loop.previtem }}-{{ loop.nextitem }}-{{ loop.cycle('a','b') }};{% endfor %})j",
                              R"j({})j", R"j(-2-a;1-3-b;2--a;)j"},
                             {"ForElse",
                              R"j({% for x in [] %}x{% else %}empty{% endfor %}{% for x in missing %}y{% else %}none{% endfor %})j",
                              R"j({})j", R"j(emptynone)j"},
                             {"ForOverDict",
                              R"j({% for k in d %}{{ k }}{% endfor %};{% for k, v in d.items() %}{{ k }}={{ v }},{% endfor %};{% for k, v in d|items %}{{ k }}{{ v }}{% endfor %})j",
                              R"j({"d": {"b": 1, "a": 2}})j", R"j(ba;b=1,a=2,;b1a2)j"},
                             {"ForWithFilter",
                              R"j({% for x in xs if x > 1 %}{{ loop.index }}:{{ x }}/{{ loop.length }} {% endfor %})j",
                              R"j({"xs": [1, 2, 3, 0, 5]})j", R"j(1:2/3 2:3/3 3:5/3 )j"},
                             {"BreakContinue",
                              R"j({% for x in range(10) %}{% if x == 1 %}{% continue %}{% endif %}{% if x == 4 %}{% break %}{% endif %}{{ x }}{% endfor %})j",
                              R"j({})j", R"j(023)j"},
                             {"SetDoesNotLeakFromLoop",
                              R"j({% set x = 1 %}{% for i in [5, 6] %}{% set x = i %}{{ x }}{% endfor %}{{ x }})j",
                              R"j({})j", R"j(561)j"},
                             {"NamespaceCarriesOutOfLoop",
                              R"j({% set ns = namespace(n=0, s='') %}{% for i in [1, 2, 3] %}{% set ns.n = ns.n + i %}{% set ns.s = ns.s ~ i %}{% endfor %}{{ ns.n }} {{ ns.s }})j",
                              R"j({})j", R"j(6 123)j"},
                             {"SetTupleAndBlockSet",
                              R"j({% set a, b = [1, 2] %}{{ a }}{{ b }}{% set x %}[{{ a + b }}]{% endset %}{{ x }}{% set y | upper %}shout{% endset %}{{ y }})j",
                              R"j({})j", R"j(12[3]SHOUT)j"},
                             {"MacroAndCaller",
                              R"j({% macro greet(name, punct='!') %}Hi {{ name }}{{ punct }}{% endmacro %}{{ greet('A') }} {{ greet('B', punct='?') }} {% macro wrap(tag) %}<{{ tag }}>{{ caller() }}</{{ tag }}>{% endmacro %}{% call wrap('b') %}bold{% endcall %})j",
                              R"j({})j", R"j(Hi A! Hi B? <b>bold</b>)j"},
                             {"TrimBlocksAndLstripBlocks", R"j(<a>
  {% if true %}
    x
  {% endif %}
</a>
)j",
                              R"j({})j",
                              R"j(<a>
    x
</a>)j"},
                             {"DashModifiers", R"j(a  
  {%- if true -%}  
  b  
  {%- endif -%}  
  c {{- ' d ' -}} e)j",
                              R"j({})j", R"j(abc d e)j"},
                             {"PlusDisablesLstrip", R"j(x
    {%+ if true %}y{% endif %})j",
                              R"j({})j",
                              R"j(x
    y)j"},
                             {"CommentsAreTrimmedLikeBlocks", R"j(a
  {# note #}
b{# one -#}   c)j",
                              R"j({})j",
                              R"j(a
bc)j"},
                             {"VariableTagsKeepNewlines", R"j({{ 'a' }}
{{ 'b' }}
)j",
                              R"j({})j",
                              R"j(a
b)j"},
                             {"KeepTrailingNewlineFalseAndCrlf", R"j(line1
line2

)j",
                              R"j({})j",
                              R"j(line1
line2
)j"},
                             {"RawBlock", R"j({% raw %}{{ not rendered }}{% endraw %})j", R"j({})j",
                              R"j({{ not rendered }})j"},
                             {"StringEscapes",
                              R"j({{ 'tab\tnl\n' }}|{{ "q\"" }}|{{ '\u00e9\x41\\' }}|{{ 'a' 'b' }})j",
                              R"j({})j",
                              R"j(tab	nl
|q"|éA\|ab)j"},
                             {"PrintsLikePython",
                              R"j({{ none }} {{ true }} {{ False }} {{ 1.0 }} {{ 1e20 }} {{ 0.1 + 0.2 }} {{ [1, 'a', none, true, 2.5] }} {{ {'k': "it's"} }} {{ 10 / 4 }} {{ 1e-5 }})j",
                              R"j({})j",
                              R"j(None True False 1.0 1e+20 0.30000000000000004 [1, 'a', None, True, 2.5] {'k': "it's"} 2.5 1e-05)j"},
                             {"Arithmetic",
                              R"j({{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ -7 % 3 }} {{ 7 / 2 }} {{ 2 ** 10 }} {{ 'a' ~ 1 ~ none ~ missing }} {{ 'ab' * 3 }} {{ [1] + [2] }} {{ 1 + 2.5 }} {{ -3 }} {{ 7.5 // 2 }})j",
                              R"j({})j", R"j(3 -4 1 2 3.5 1024 a1None ababab [1, 2] 3.5 -3 3.0)j"},
                             {"LogicReturnsOperands",
                              R"j({{ 0 or 'x' }} {{ 'y' and 'z' }} {{ not 0 }} {{ '' or [] }} {{ 1 in [1, 2] }} {{ 'b' in 'abc' }} {{ 'k' in {'k': 1} }} {{ 3 not in [1] }} {{ 1 < 2 <= 2 }})j",
                              R"j({})j", R"j(x z True [] True True True True True)j"},
                             {"Ternary",
                              R"j({{ 'yes' if x else 'no' }} {{ 'only' if not x }}|{{ 'shown' if y }})j",
                              R"j({"x": 0, "y": 1})j", R"j(no only|shown)j"},
                             {"AttributeAndSubscript",
                              R"j({{ m.role }} {{ m['role'] }} {{ m.missing }}|{{ m['missing'] }}|{{ xs[-1] }} {{ xs[5] }}|{{ xs.0 }} {{ m.get('role') }} {{ m.get('x', 'dflt') }} {{ m.get('x') }})j",
                              R"j({"m": {"role": "user"}, "xs": [1, 2, 3]})j",
                              R"j(user user ||3 |1 user dflt None)j"},
                             {"Slices",
                              R"j({{ xs[::-1] }} {{ xs[1:] }} {{ xs[:-1] }} {{ xs[::2] }} {{ 'hello'[1:3] }} {{ 'héllo'[::-1] }} {{ xs[-2:] }} {{ xs[10:] }})j",
                              R"j({"xs": [1, 2, 3, 4]})j",
                              R"j([4, 3, 2, 1] [2, 3, 4] [1, 2, 3] [1, 3] el olléh [3, 4] [])j"},
                             {"FiltersOnStrings",
                              R"j([{{ '  a b \n'|trim }}] {{ 'héllo'|length }} {{ 'Hi'|upper }}{{ 'Hi'|lower }} {{ 'hello world'|capitalize }} {{ 'hello wORLD-x(y'|title }} {{ 'a-b-c'|replace('-', '+') }} {{ 'aaa'|replace('a', 'b', 2) }} {{ 3|string ~ 'x' }} {{ '<&>'|e }} {{ 'xx'|safe }} {{ '12'|int + 1 }} {{ '3.7'|int }} {{ 'x'|int(7) }} {{ '2.5'|float }} {{ 'one two  three'|wordcount }} {{ 'a\nb'|indent(2, true) }})j",
                              R"j({})j",
                              R"j([a b] 5 HIhi Hello world Hello World-X(Y a+b+c bba 3x &lt;&amp;&gt; xx 13 3 7 2.5 3   a
  b)j"},
                             {"FiltersOnSequences",
                              R"j({{ xs|length }} {{ xs|first }} {{ xs|last }} {{ xs|join(', ') }} {{ xs|reverse|list }} {{ xs|sort }} {{ xs|unique|list }} {{ xs|sum }} {{ xs|min }} {{ xs|max }} {{ 'abc'|list }} {{ xs|select('odd')|list }} {{ xs|reject('odd')|list }} {{ []|first }}|{{ xs|count }})j",
                              R"j({"xs": [3, 1, 2, 3]})j",
                              R"j(4 3 3 3, 1, 2, 3 [3, 2, 1, 3] [1, 2, 3, 3] [3, 1, 2] 9 1 3 ['a', 'b', 'c'] [3, 1, 3] [2] |4)j"},
                             {"AttributeFilters",
                              R"j({{ ms|selectattr('role', 'equalto', 'user')|map(attribute='content')|join('|') }} {{ ms|rejectattr('role', 'eq', 'user')|list|length }} {{ ms|map(attribute='role')|list }} {{ ms|selectattr('tool')|list|length }} {{ ms|join(',', attribute='role') }} {{ ms|map(attribute='nope', default='-')|join }})j", R"j({"ms": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "tool": true}, {"role": "user", "content": "c"}]})j",
                              R"j(a|c 1 ['user', 'assistant', 'user'] 1 user,assistant,user ---)j"},
                             {"DefaultFilter",
                              R"j({{ missing|default('d') }} {{ ''|default('e') }} {{ ''|default('f', true) }} {{ none|d('g') }} {{ x|d('h') }})j",
                              R"j({"x": 0})j", R"j(d  f None 0)j"},
                             {"DictFilters",
                              R"j({{ d|items|list }} {{ d|dictsort }} {{ d|length }} {{ d|list }} {{ d.keys()|list }} {{ d.values()|list }})j",
                              R"j({"d": {"b": 2, "a": 1}})j",
                              R"j([('b', 2), ('a', 1)] [('a', 1), ('b', 2)] 2 ['b', 'a'] ['b', 'a'] [2, 1])j"},
                             {"ToJson", R"j({{ v|tojson }}
{{ v|tojson(indent=2) }}
{{ 'é<>&\'"\n\u0001'|tojson }} {{ []|tojson(indent=2) }} {{ {}|tojson }} {{ none|tojson }} {{ 1.5|tojson }} {{ 2.0|tojson }})j",
                              R"j({"v": {"z": [1, 2.5, null, true, "ü"], "a": {"n": {}}}})j",
                              R"j({"z": [1, 2.5, null, true, "ü"], "a": {"n": {}}}
{
  "z": [
    1,
    2.5,
    null,
    true,
    "ü"
  ],
  "a": {
    "n": {}
  }
}
"é<>&'\"\n\u0001" [] {} null 1.5 2.0)j"},
                             {"Tests",
                              R"j({{ x is defined }}{{ y is undefined }}{{ none is none }}{{ 'a' is string }}{{ {} is mapping }}{{ [] is iterable }}{{ 1.5 is number }}{{ 'a' is sequence }}{{ true is true }}{{ 0 is false }}{{ 1 is integer }}{{ 1.0 is float }}{{ 1 is boolean }}{{ 'a' is eq('a') }}{{ 'a' is equalto 'b' }}{{ 1 is ne 2 }}{{ 2 is in [1, 2] }}{{ 3 is odd }}{{ 4 is even }}{{ 9 is divisibleby 3 }}{{ range is callable }}{{ 'ab' is lower }}{{ 'AB' is upper }}{{ x is not none }}{{ 5 is gt 3 }})j",
                              R"j({"x": 1})j",
                              R"j(TrueTrueTrueTrueTrueTrueTrueTrueTrueFalseTrueTrueFalseTrueFalseTrueTrueTrueTrueTrueTrueTrueTrueTrueTrue)j"},
                             {"StringMethods",
                              R"j({{ s.startswith('He') }} {{ s.startswith(('x', 'Hel')) }} {{ s.endswith('!') }} {{ s.split() }} {{ s.split(',') }} {{ 'a,b,c'.split(',', 1) }} {{ 'a,b,c'.rsplit(',', 1) }} [{{ '  x  '.strip() }}|{{ 'xxhixx'.strip('x') }}|{{ '\n\nhi\n'.lstrip('\n') }}|{{ 'hi  '.rstrip() }}] {{ s.upper() }} {{ s.lower() }} {{ 'hello there'.title() }} {{ 'hELLO'.capitalize() }} {{ 'aaa'.replace('a', 'b', 1) }} {{ s.find('o') }} {{ s.count('l') }} {{ '-'.join(['a', 'b']) }} {{ 'a\nb\r\nc'.splitlines() }} {{ '123'.isdigit() }})j",
                              R"j({"s": "Hello, World !"})j",
                              R"j(True True True ['Hello,', 'World', '!'] ['Hello', ' World !'] ['a', 'b,c'] ['a,b', 'c'] [x|hi|hi
|hi] HELLO, WORLD ! hello, world ! Hello There Hello baa 4 3 a-b ['a', 'b', 'c'] True)j"},
                             {"GlobalsRangeDictNamespace",
                              R"j({{ range(3)|list }} {{ range(1, 7, 2)|list }} {{ range(3, 0, -1)|list }} {{ dict(a=1, b='x') }} {% set ns = namespace({'k': 1}) %}{{ ns.k }})j",
                              R"j({})j", R"j([0, 1, 2] [1, 3, 5] [3, 2, 1] {'a': 1, 'b': 'x'} 1)j"},
                             {"UnicodeContent",
                              R"j({{ s|length }} {{ s[0] }} {{ s|upper }} {{ s|tojson }})j",
                              R"j({"s": "ñandú 👩‍👩‍👧 你好"})j",
                              R"j(14 ñ ÑANDÚ 👩‍👩‍👧 你好 "ñandú 👩‍👩‍👧 你好")j"},
                             {"IsNotAndNotIn",
                              R"j({% if m.content is not none and 'x' not in m.content %}ok{% endif %}{% if not m.tool_calls is defined %} no-tools{% endif %})j",
                              R"j({"m": {"content": "abc"}})j", R"j(ok no-tools)j"},
                             {"StrftimeNow",
                              R"j({{ strftime_now('%Y-%m-%d %H:%M') }} {{ strftime_now('%d %b %Y') }})j",
                              R"j({})j", R"j(2023-11-14 22:13 14 Nov 2023)j"},
                             {"UndefinedSemantics",
                              R"j([{{ missing }}]{% for x in missing %}never{% endfor %}{{ missing|length }}{{ missing is defined }}{{ missing == missing }}{{ not missing }})j",
                              R"j({})j", R"j([]0FalseTrueTrue)j"},
                             {"NoneContentPrintsNone",
                              R"j({{ m.content }}|{{ m.content|string }}|{{ m.content|trim }})j",
                              R"j({"m": {"content": null}})j", R"j(None|None|None)j"},
                             {"UnknownFilterInsideIfNotRun",
                              R"j({% if bad %}{{ x|nosuchfilter }}{% endif %}ok)j",
                              R"j({"bad": false})j", R"j(ok)j"},
                         }),
                         CaseName);

// Render-time errors: INVALID_ARGUMENT whose message contains Python's; raise_exception's
// message is the whole message, unchanged.
class FailsLikePython : public ::testing::TestWithParam<RenderCase> {};

TEST_P(FailsLikePython, WithPythonsMessage) {
  const RenderCase& c = GetParam();
  auto t = ChatTemplate::Parse(c.source);
  ASSERT_TRUE(t.ok()) << t.status();
  auto out = t->Render(Json::parse(c.context), kNow);
  ASSERT_FALSE(out.ok()) << "rendered: " << *out;
  EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(out.status().message()), HasSubstr(c.expected));
}

INSTANTIATE_TEST_SUITE_P(
    Interpreter, FailsLikePython,
    ::testing::ValuesIn(std::vector<RenderCase>{
        {"RaiseException",
         R"j({{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }})j",
         R"j({})j",
         R"j(Conversation roles must alternate user/assistant/user/assistant/...)j"},  // TemplateError
        {"AttributeOfUndefined", R"j({{ missing.attr }})j", R"j({})j",
         R"j('missing' is undefined)j"},  // UndefinedError
        {"AttributeOfMissingKey", R"j({{ m.a.b }})j", R"j({"m": {}})j",
         R"j('dict object' has no attribute 'a')j"},  // UndefinedError
        {"StrPlusInt", R"j({{ 'a' + 1 }})j", R"j({})j",
         R"j(can only concatenate str (not "int") to str)j"},  // TypeError
        {"UndefinedPlusStr", R"j({{ m.content + 'x' }})j", R"j({"m": {}})j",
         R"j('dict object' has no attribute 'content')j"},  // UndefinedError
        {"DivisionByZero", R"j({{ 1 / 0 }})j", R"j({})j",
         R"j(division by zero)j"},  // ZeroDivisionError
        {"CallUndefined", R"j({{ nothing() }})j", R"j({})j",
         R"j('nothing' is undefined)j"},  // UndefinedError
        {"ListAppendIsUnsafe", R"j({% set xs = [] %}{{ xs.append(1) }})j", R"j({})j",
         R"j(access to attribute 'append' of 'list' object is unsafe.)j"},  // SecurityError
        {"UnknownFilterInsideIf", R"j({% if bad %}{{ x|nosuchfilter }}{% endif %})j",
         R"j({"bad": true})j",
         R"j(No filter named 'nosuchfilter' found.)j"},  // TemplateRuntimeError
        {"NoneIsNotIterable", R"j({% for x in n %}{% endfor %})j", R"j({"n": null})j",
         R"j('NoneType' object is not iterable)j"},  // TypeError
        {"CompareStrInt", R"j({{ 'a' < 1 }})j", R"j({})j",
         R"j('<' not supported between instances of 'str' and 'int')j"},  // TypeError
    }),
    CaseName);

TEST(ChatTemplateErrors, RaiseExceptionMessageIsExactlyTheTemplates) {
  auto t =
      ChatTemplate::Parse("{{ raise_exception('Only user and assistant roles are supported!') }}");
  ASSERT_TRUE(t.ok());
  auto out = t->Render(Json::object(), kNow);
  ASSERT_FALSE(out.ok());
  EXPECT_EQ(out.status(),
            absl::InvalidArgumentError("Only user and assistant roles are supported!"));
}

struct ParseCase {
  const char* name;
  const char* source;
  int line;
};

class SyntaxErrors : public ::testing::TestWithParam<ParseCase> {};

TEST_P(SyntaxErrors, NameLineAndColumn) {
  const ParseCase& c = GetParam();
  auto t = ChatTemplate::Parse(c.source);
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(t.status().message()),
              HasSubstr("line " + std::to_string(c.line) + ", column "));
}

INSTANTIATE_TEST_SUITE_P(Interpreter, SyntaxErrors,
                         ::testing::ValuesIn(std::vector<ParseCase>{
                             {"UnclosedBlock", R"j({% if x %}open)j", 1},
                             {"UnknownTag", R"j(a
{% frobnicate %})j",
                              2},
                             {"BadExpression", R"j({{ 1 + }})j", 1},
                             {"UnknownFilterOutsideIf", R"j(line1
{{ x|nosuchfilter }})j",
                              2},
                             {"UnterminatedString", R"j({{ 'abc }})j", 1},
                             {"UnclosedVariable", R"j({{ x )j", 1},
                             {"EndforWithoutFor", R"j({% endfor %})j", 1},
                         }),
                         [](const ::testing::TestParamInfo<ParseCase>& info) {
                           return std::string(info.param.name);
                         });

TEST(ChatTemplateErrors, NonObjectContextIsInvalid) {
  auto t = ChatTemplate::Parse("x");
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(t->Render(nlohmann::json::array()).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ChatTemplateErrors, RunawayRecursionIsAnErrorNotACrash) {
  auto t = ChatTemplate::Parse("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}");
  ASSERT_TRUE(t.ok());
  auto out = t->Render(Json::object(), kNow);
  ASSERT_FALSE(out.ok());
  EXPECT_THAT(std::string(out.status().message()), HasSubstr("maximum call depth"));
}

// Python, not @huggingface/jinja, is the contract. These pin where the two differ.
TEST(PythonNotJavaScript, WholeFloatsKeepTheirPointInToJson) {
  // JavaScript has one number type and prints 2.0 as 2.
  auto t = ChatTemplate::Parse("{{ x|tojson }} {{ x }}");
  ASSERT_TRUE(t.ok());
  auto out = t->Render(Json::parse(R"({"x": [2.0, 1e100, 0.5]})"), kNow);
  ASSERT_TRUE(out.ok());
  EXPECT_EQ(*out, "[2.0, 1e+100, 0.5] [2.0, 1e+100, 0.5]");
}

TEST(PythonNotJavaScript, TrimStripsPythonWhitespaceOnly) {
  // Python's str.strip() strips U+001C..U+001F and U+0085 but not U+FEFF; JavaScript's
  // String.prototype.trim() does the opposite for both.
  auto t = ChatTemplate::Parse("[{{ s|trim }}]");
  ASSERT_TRUE(t.ok());
  auto out = t->Render(Json{{"s", "\x1f\u0085a\ufeff"}}, kNow);
  ASSERT_TRUE(out.ok());
  EXPECT_EQ(*out, "[a\ufeff]");
}

TEST(PythonNotJavaScript, ObjectKeyOrderIsKeptThroughOrderedJson) {
  // json.dumps keeps insertion order; nlohmann::json sorts, ordered_json does not.
  auto t = ChatTemplate::Parse("{{ tools|tojson }}");
  ASSERT_TRUE(t.ok());
  auto out = t->Render(Json::parse(R"({"tools": {"name": "f", "description": "d"}})"), kNow);
  ASSERT_TRUE(out.ok());
  EXPECT_EQ(*out, R"({"name": "f", "description": "d"})");
  auto sorted = t->Render(nlohmann::json::parse(R"({"tools": {"name": "f", "description": "d"}})"));
  ASSERT_TRUE(sorted.ok());
  EXPECT_EQ(*sorted, R"({"description": "d", "name": "f"})");
}

TEST(PythonNotJavaScript, PrintingValuesUsesPythonRepr) {
  auto t = ChatTemplate::Parse("{{ none }} {{ true }} {{ ['a', none] }} {{ {'k': 1} }}");
  ASSERT_TRUE(t.ok());
  auto out = t->Render(Json::object(), kNow);
  ASSERT_TRUE(out.ok());
  EXPECT_EQ(*out, "None True ['a', None] {'k': 1}");
}

TEST(ChatTemplate, CopiesShareTheParsedTreeAndRenderConcurrently) {
  auto t = ChatTemplate::Parse(
      "{% set ns = namespace(s='') %}{% for m in messages %}{% set ns.s = ns.s ~ m.content %}"
      "{% endfor %}{{ ns.s }}");
  ASSERT_TRUE(t.ok());
  const ChatTemplate copy = *t;
  std::vector<std::thread> threads;
  std::vector<std::string> results(8);
  for (int i = 0; i < 8; ++i) {
    threads.emplace_back([&, i] {
      Json ctx = {{"messages", Json::array()}};
      for (int k = 0; k < 200; ++k) ctx["messages"].push_back({{"content", std::to_string(i)}});
      auto out = (i % 2 ? copy : *t).Render(ctx, kNow);
      results[i] = out.ok() ? *out : std::string(out.status().message());
    });
  }
  for (auto& th : threads) th.join();
  for (int i = 0; i < 8; ++i) EXPECT_EQ(results[i], std::string(200, static_cast<char>('0' + i)));
}

// Truncated and mutated published templates must give a template or INVALID_ARGUMENT, and a
// template that parses must render or fail with INVALID_ARGUMENT: never crash or hang.
TEST(ChatTemplate, DamagedTemplatesFailCleanly) {
#ifdef MOEMESH_SOURCE_DIR
  const std::string path =
      std::string(MOEMESH_SOURCE_DIR) + "/tests/tokenizer/chat/goldens_python.json";
#else
  const std::string path = "tests/tokenizer/chat/goldens_python.json";
#endif
  std::ifstream in(path);
  ASSERT_TRUE(in) << path;
  std::stringstream ss;
  ss << in.rdbuf();
  const Json goldens = Json::parse(ss.str());
  const Json ctx = Json::parse(R"({"messages": [{"role": "system", "content": "s"},
      {"role": "user", "content": "u"}, {"role": "assistant", "content": "<think>t</think>a"},
      {"role": "user", "content": "v"}], "add_generation_prompt": true, "tools": null,
      "bos_token": "<s>", "eos_token": "</s>"})");
  std::mt19937 rng(7);
  const std::string alphabet = "{}%#-+()[]'\"|.,:=~ \nabx";
  int parsed = 0;
  for (const auto& item : goldens["templates"].items()) {
    const std::string source = item.value()["template"].get<std::string>();
    std::vector<std::string> variants;
    for (size_t n = 0; n < source.size(); n += 13) variants.push_back(source.substr(0, n));
    for (int k = 0; k < 300; ++k) {
      std::string m = source;
      m[rng() % m.size()] = alphabet[rng() % alphabet.size()];
      variants.push_back(std::move(m));
    }
    for (const std::string& v : variants) {
      auto t = ChatTemplate::Parse(v);
      if (!t.ok()) {
        EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument) << t.status();
        continue;
      }
      ++parsed;
      auto out = t->Render(ctx, kNow);
      if (!out.ok()) {
        EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument) << out.status();
      }
    }
  }
  EXPECT_GT(parsed, 100);
}

}  // namespace
}  // namespace moemesh

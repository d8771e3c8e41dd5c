// ChatTemplate: renders a Hugging Face chat template (`tokenizer_config.json`'s
// `chat_template`, written in Jinja) exactly as transformers' `apply_chat_template` does.
//
//   ASSIGN_OR_RETURN(ChatTemplate t, ChatTemplate::Parse(config["chat_template"]));
//   ASSIGN_OR_RETURN(std::string prompt, t.Render({{"messages", messages},
//                                                  {"add_generation_prompt", true},
//                                                  {"bos_token", "<s>"}, ...}));
//
// The contract is Python: jinja2's ImmutableSandboxedEnvironment with trim_blocks=True,
// lstrip_blocks=True, keep_trailing_newline=False and the loopcontrols extension, the globals
// raise_exception and strftime_now, and HF's own tojson filter (ensure_ascii=False, optional
// indent, no HTML escaping). Values print as Python prints them (None, True, ['a', 1]), an
// undefined variable prints as '' and iterates as empty, and reading an attribute of an
// undefined value is an error, as with jinja2's default Undefined. The interpreter covers the
// subset that published chat templates use: if/elif/else, for (else, loop.*, filtering,
// unpacking, break/continue), set (namespace attributes, block set), macro and call, filters,
// tests, string/dict methods and whitespace control. docs/CHAT-TEMPLATES.md lists it.
//
// Errors: Parse returns INVALID_ARGUMENT naming line and column for a syntax error, or an
// unknown filter or test used outside any `if`. Render returns INVALID_ARGUMENT for every
// template error; for raise_exception the message is exactly the template's message.
//
// Thread safety: a parsed template is immutable; Render may be called concurrently on one
// instance (or on copies, which share the parsed tree).
#pragma once

#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "nlohmann/json.hpp"

namespace moemesh {

namespace jinja {
struct Program;
}  // namespace jinja

class ChatTemplate {
 public:
  // Parses `source`. Syntax errors: INVALID_ARGUMENT "line L, column C: ...".
  [[nodiscard]] static absl::StatusOr<ChatTemplate> Parse(std::string_view source);

  // Renders with `context`, a JSON object whose members become the template's variables:
  // messages (array of {role, content, ...}), add_generation_prompt (bool), bos_token,
  // eos_token, tools (leave it out when there are none, as HF does), and anything else.
  // strftime_now reads the current UTC time.
  [[nodiscard]] absl::StatusOr<std::string> Render(const nlohmann::json& context) const;
  // As above, keeping the order of object members as given (HF's tojson and dict iteration
  // keep insertion order; nlohmann::json sorts keys). Prefer this when the context comes
  // from a request's JSON text.
  [[nodiscard]] absl::StatusOr<std::string> Render(const nlohmann::ordered_json& context) const;
  // As above with the time strftime_now sees (tests).
  [[nodiscard]] absl::StatusOr<std::string> Render(const nlohmann::ordered_json& context,
                                                   absl::Time now) const;

 private:
  explicit ChatTemplate(std::shared_ptr<const jinja::Program> program)
      : program_(std::move(program)) {}
  std::shared_ptr<const jinja::Program> program_;
};

}  // namespace moemesh

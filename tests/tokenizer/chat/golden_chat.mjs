// Renders every conversation of conversations.json with every template of templates.json
// and writes goldens_js.json for tests/tokenizer/chat_template_golden_test, twice:
//   - output/error: @huggingface/jinja (the current standalone release) with the context
//     transformers.js's apply_chat_template builds (messages, add_generation_prompt, tools,
//     documents, the tokenizer's special tokens, extra kwargs);
//   - lenml_output/lenml_error: transformers.js's apply_chat_template itself
//     (@lenml/tokenizers 3.7.2), whose bundled Jinja is older and fails on some templates.
//
// Usage (from a folder where package.json's dependencies are installed):
//   node golden_chat.mjs SOURCE_CHAT_DIR OUT_JSON
import fs from "node:fs";
import path from "node:path";
import { Template } from "@huggingface/jinja";

const [srcDir, outPath] = process.argv.slice(2);
if (!srcDir || !outPath) {
  console.error("usage: node golden_chat.mjs SOURCE_CHAT_DIR OUT_JSON");
  process.exit(2);
}
const spec = JSON.parse(fs.readFileSync(path.join(srcDir, "templates.json"), "utf8"));
const convs = JSON.parse(fs.readFileSync(path.join(srcDir, "conversations.json"), "utf8"));

const cases = [];
for (const [name, s] of Object.entries(spec)) {
  const pkg = s.npm ?? s.tokenizer;
  const { fromPreTrained } = await import(pkg);
  const tokenizer = fromPreTrained();
  let chatTemplate = null;
  if (s.file) {
    chatTemplate = JSON.parse(fs.readFileSync(path.join(srcDir, "..", s.file), "utf8")).chat_template;
  }
  for (const conv of convs) {
    if (!(conv.templates.length === 1 && conv.templates[0] === "*") && !conv.templates.includes(name)) {
      continue;
    }
    const c = { template: name, conversation: conv.name };
    const special = {};
    for (const key of ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"]) {
      const t = tokenizer.getToken(key);
      if (t) special[key] = t;
    }
    try {
      const template = new Template(chatTemplate ?? tokenizer.chat_template);
      c.output = template.render({
        messages: conv.messages,
        add_generation_prompt: conv.add_generation_prompt,
        tools: conv.tools ?? null,
        documents: null,
        ...special,
        ...(conv.kwargs ?? {}),
      });
    } catch (e) {
      c.error = String(e?.message ?? e);
    }
    try {
      c.lenml_output = tokenizer.apply_chat_template(conv.messages, {
        tokenize: false,
        add_generation_prompt: conv.add_generation_prompt,
        tools: conv.tools ?? null,
        chat_template: chatTemplate,
        ...(conv.kwargs ?? {}),
      });
    } catch (e) {
      c.lenml_error = String(e?.message ?? e);
    }
    cases.push(c);
  }
}
const pkgVersion = (p) =>
  JSON.parse(fs.readFileSync(path.join("node_modules", p, "package.json"), "utf8")).version;
fs.writeFileSync(
  outPath,
  JSON.stringify(
    {
      generator: `@lenml/tokenizers ${pkgVersion("@lenml/tokenizers")}, @huggingface/jinja ${pkgVersion("@huggingface/jinja")}`,
      cases,
    },
    null,
    1,
  ),
);
console.log(`${cases.length} cases, ${cases.filter((c) => "error" in c).length} errors -> ${outPath}`);

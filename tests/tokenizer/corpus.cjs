// The tokenizer test corpus: hand-picked cases for every kind of text the pipeline treats
// specially, a 100 KB input, and seeded random strings that mix all of them. Deterministic.
'use strict';

// mulberry32: a small seeded PRNG, so the corpus is the same on every machine.
function rng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const kHand = [
  'Hello, world!',
  'Hello world',
  ' leading space',
  '  two leading spaces',
  'trailing spaces   ',
  'The quick brown fox jumps over the lazy dog.',
  "I'm sure they'll say it's fine; we've done what we'd planned. DON'T SHOUT, I'LL LISTEN.",
  'def f(x):\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n',
  'for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }\r\nreturn sum;',
  '{"key": [1, 2.5, -3e10], "nested": {"a": null}}',
  'tabs\t\tand\t\t\tmore tabs\n\n\n\nnewlines\r\n\r\nwindows',
  '   \n  \t \n',
  ' ',
  '\n',
  '0 1 12 123 1234 12345 123456 3.14159 1,000,000 2024-01-02',
  '१२३ ٤٥٦ ①②③ Ⅻ ½',
  '中文分词测试：我们今天去北京天安门。',
  '日本語のテキスト、カタカナとひらがな。漢字も。',
  '한국어 텍스트 입니다.',
  'Emoji: 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️ 🇫🇷 😀😃😄',
  'Combining: é (e\u0301) ñ (n\u0303) Å (A\u030a) ḱ̷̨',
  'Ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３ ﬁ ﬂ ㎏',
  'العربية: مرحبا بالعالم، كيف حالك؟',
  'עברית: שלום עולם, מה שלומך?',
  'Mixed RTL: hello שלום world مرحبا 123',
  'Ελληνικά και русский язык и ქართული',
  'ไทย ภาษาไทย ทดสอบ',
  'हिन्दी में परीक्षण। देवनागरी',
  'Zero\u200bwidth\u200cjoiner\u200dtest\u2060',
  'Special tokens: <s> </s> <unk> <|endoftext|> <|im_start|>user\nhi<|im_end|>',
  '<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>',
  '<｜begin▁of▁sentence｜>You are helpful.<｜User｜>Hi<｜Assistant｜><think>\n',
  '<s>[INST] What is 2+2? [/INST] 4</s>',
  '<tool_call>{"name": "f"}</tool_call> <|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>',
  'x<s>y</s>z',
  '<s>',
  '',
  '▁already▁has▁metaspace',
  'ĠĊ Ġ byte-level lookalikes Ċ',
  '<0x41> <0xE4> not byte tokens',
  'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa',
  '!!!!!!!!!???????.......,,,,,,;;;;;;;::::::',
  'https://example.com/path?query=1&b=2#frag user@example.org',
  'Ünïcödé ñàmés: Zoë, Björk, Øystein, Łukasz, Đorđe',
  'mathematical: ∀x∈ℝ, ∃y: x²+y²≤1 ∑∫∂√∞',
  '\u00a0nbsp\u00a0 and\u2003em space\u3000ideographic',
  'Control\u0001chars\u0007and\u001bescape\u007f',
  '😀'.repeat(50),
  '你'.repeat(300),
  ' '.repeat(100) + 'x',
  '\n'.repeat(40),
];

// Pieces the random strings are built from: words and symbols of every script in kHand,
// whitespace of all kinds, digits, special-token spellings.
const kAtoms = [
  'the', 'The', 'THE', 'hello', 'world', "'s", "'t", "'re", "'LL", "n't", 'tokenizer',
  'a', 'I', 'x', 'ing', 'tion', 'über', 'café', 'naïve',
  ' ', '  ', '   ', '\t', '\n', '\n\n', '\r\n', ' \n', '\u00a0', '\u3000', '\u2003',
  '0', '7', '42', '123', '2024', '99999', '3.14', '-1', '١٢٣', '½',
  '.', ',', '!', '?', ';', ':', '"', "'", '(', ')', '[', ']', '{', '}', '<', '>', '/', '\\',
  '#', '$', '%', '&', '*', '+', '-', '=', '_', '|', '~', '`', '^', '@', '...', '--', '->',
  '中', '文', '北京', '東京', 'ひらがな', 'カタカナ', '한국', 'ไทย', 'हिन्दी',
  'مرحبا', 'العالم', 'שלום', 'עולם', 'Ελλάδα', 'Москва', 'ქართ',
  '👍', '👍🏽', '👨‍👩‍👧', '🏳️‍🌈', '❤️', '🇫🇷', '😀', '\u200d', '\u200b',
  'e\u0301', 'a\u0308', 'n\u0303', '\u0301', 'Å', 'ﬁ', 'Ｆ', '①', '㎏',
  '<s>', '</s>', '<unk>', '<|endoftext|>', '<|im_start|>', '<|im_end|>',
  '<|begin_of_text|>', '<|eot_id|>', '<｜User｜>', '<｜Assistant｜>',
  '<｜begin▁of▁sentence｜>', '<tool_call>', '▁', 'Ġ', '<0x41>',
];

// Random code points from many blocks, all assigned by Unicode 14.0 (the Unicode version of
// Oniguruma 6.9.8, the engine of moemesh and of Hugging Face tokenizers; V8 knows newer
// characters, which its regexes classify differently), never surrogates, U+0085 or U+FEFF
// (which JavaScript's \s and Oniguruma's disagree on). See README.md.
function randomCodePoint(r) {
  const ranges = [
    [0x20, 0x7e], [0x09, 0x0d], [0xa0, 0x24f], [0x300, 0x36f], [0x370, 0x3ff], [0x400, 0x4ff],
    [0x590, 0x5ff], [0x600, 0x6ff], [0x900, 0x97f], [0xe00, 0xe7f], [0x1100, 0x11ff],
    [0x2000, 0x206f], [0x2190, 0x22ff], [0x3000, 0x30ff], [0x4e00, 0x9fff], [0xac00, 0xd7a3],
    [0xff00, 0xffef], [0x1f300, 0x1f64f], [0x1f900, 0x1f9ff], [0x10000, 0x1007f],
    [0x1d400, 0x1d7ff],
  ];
  const [lo, hi] = ranges[Math.floor(r() * ranges.length)];
  let cp = lo + Math.floor(r() * (hi - lo + 1));
  if (cp === 0x85 || cp === 0xfeff || (cp >= 0xd800 && cp <= 0xdfff)) cp = 0x41;
  return String.fromCodePoint(cp);
}

function randomString(r) {
  const n = 1 + Math.floor(r() * 40);
  let s = '';
  for (let i = 0; i < n; ++i) {
    s += r() < 0.8 ? kAtoms[Math.floor(r() * kAtoms.length)] : randomCodePoint(r);
  }
  return s;
}

function bigText(r, bytes) {
  const parts = [];
  let size = 0;
  while (size < bytes) {
    const p = r() < 0.3 ? kHand[Math.floor(r() * kHand.length)] : randomString(r);
    parts.push(p);
    size += Buffer.byteLength(p);
  }
  return parts.join(r() < 0.5 ? ' ' : '\n');
}

function makeCorpus(numRandom = 400) {
  const r = rng(20240607);
  const texts = kHand.slice();
  texts.push(bigText(r, 100 * 1024));
  for (let i = 0; i < numRandom; ++i) texts.push(randomString(r));
  return texts;
}

module.exports = { makeCorpus, bigText, rng };

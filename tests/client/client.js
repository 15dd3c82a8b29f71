#!/usr/bin/env node
/* Client suite: adapterctl (client/) against the real adapterd on 127.0.0.1. Every command, in
 * text and with --json, the environment and the flags, API keys, the error exits, and a stream
 * stopped by SIGINT.
 *
 *   node client.js --adapterd PATH --mkmodel PATH --bpe-train PATH --adapterctl PATH [--only NAME]
 *
 * Honest by construction: what adapterctl prints is compared with what the server answers to
 * the same request sent here directly (fetch, or curl for uploads), or with expectations
 * computed here (the sizes in tables, token counts), never with an earlier adapterctl output.
 * Every run of adapterctl must leave stderr free of sanitizer reports. */
'use strict';

const {
    assert, fs, path, spawnSync, TMP, HIDDEN, LAYERS, makeLora, Daemon, sleep,
    safetensorsRaw, runSuite,
} = require('../integration/lib.js');
const { ctl, ok, fails, start, printed, interrupt, onTerminal, human, table } =
    require('./ctl.js');
const net = require('net');

/* The Prometheus text as {"name{labels}": value}. */
function prom(text) {
    const m = {};
    for (const l of text.split('\n'))
        if (l && !l.startsWith('#')) {
            const i = l.lastIndexOf(' ');
            m[l.slice(0, i)] = Number(l.slice(i + 1));
        }
    return m;
}

/* An AdapterHub bottleneck adapter (Pfeiffer, seq_bn) for the Llama fixture, in AdapterHub's
 * files: adapter_config.json {"config": BnConfig, ...} and adapter.safetensors (its own name). */
function makeHub(dir, name) {
    fs.mkdirSync(dir, { recursive: true });
    const d = HIDDEN / 16, parts = [];
    for (let l = 0; l < LAYERS; l++) {
        const p = `model.layers.${l}.output_adapters.adapters.${name}.`;
        parts.push([p + 'adapter_down.0.weight', [d, HIDDEN]], [p + 'adapter_down.0.bias', [d]],
                   [p + 'adapter_up.weight', [HIDDEN, d]], [p + 'adapter_up.bias', [HIDDEN]]);
    }
    const header = {};
    let off = 0;
    for (const [key, shape] of parts) {
        const n = shape.reduce((a, b) => a * b, 1) * 4;
        header[key] = { dtype: 'F32', shape, data_offsets: [off, off + n] };
        off += n;
    }
    const data = new Float32Array(off / 4).map((_, i) => Math.sin(i) * 0.05);
    fs.writeFileSync(path.join(dir, 'adapter.safetensors'),
                     safetensorsRaw(header, Buffer.from(data.buffer)));
    fs.writeFileSync(path.join(dir, 'adapter_config.json'), JSON.stringify({
        config: { mh_adapter: false, output_adapter: true, original_ln_before: true,
                  original_ln_after: true, residual_before_ln: true, non_linearity: 'relu',
                  reduction_factor: 16, scaling: 1.0, ln_before: false, ln_after: false },
        hidden_size: HIDDEN, model_class: 'LlamaForCausalLM', model_name: 'model',
        model_type: 'llama', name, version: 'adapters.1.2.0',
    }));
    return dir;
}

/* Until the engine has no sequence and holds no KV block (a sequence is counted as running
 * for a moment after its answer is sent). */
async function idle(d) {
    for (let i = 0; i < 100; i++) {
        const m = prom((await d.api('GET', '/metrics')).text);
        if (m.adapterd_running_sequences === 0 && m['adapterd_kv_blocks{state="used"}'] === 0)
            return;
        await sleep(20);
    }
    throw new Error('the engine did not become idle');
}

/* A port with nothing listening on it. */
function deadPort() {
    return new Promise((resolve) => {
        const s = net.createServer().listen(0, '127.0.0.1', () => {
            const { port } = s.address();
            s.close(() => resolve(port));
        });
    });
}

/* ------------------------------------------------------------------------------------------
 * The tests: each gets the shared daemon `d`, on which 'fox' and 'owl' (LoRA) are uploaded */

const tests = [];
const test = (name, fn) => tests.push({ name, fn });
test('fixtures: LoRA adapters fox and owl, uploaded with curl', async (d) => {
    for (const [name, seed] of [['fox', 3], ['owl', 5]]) {
        const r = await d.upload(name, makeLora(path.join(TMP, `lora-${name}`), { seed }));
        assert.equal(r.status, 201, r.text);
    }
});

const COMMANDS = ['models', 'adapters', 'upload', 'complete', 'chat', 'tokenize', 'health',
                  'metrics', 'train', 'jobs', 'files'];

test('--help for adapterctl and every command, --version, the man page', async () => {
    const top = await ok(['--help']);
    for (const c of COMMANDS) {
        assert.match(top, new RegExp(`^  ${c}\\b`, 'm'), `adapterctl --help does not list ${c}`);
        const h = await ok([c, '--help']);
        assert.match(h, new RegExp(`^usage: adapterctl ${c} `, 'm'));
        assert.match(h, /--url URL/);
    }
    assert.match(await ok(['--version']), /^adapterctl \d+\.\d+\.\d+\n$/);
    const man = path.join(__dirname, '..', '..', 'client', 'adapterctl.1');
    const r = spawnSync('man', ['--warnings', '-l', man], { encoding: 'utf8', env: { ...process.env, MANWIDTH: '80' } });
    if (r.error === undefined) { /* man-db installed: the page renders without warnings */
        assert.equal(r.status, 0, r.stderr);
        assert.equal(r.stderr.trim(), '', `man page warnings: ${r.stderr}`);
        for (const c of COMMANDS)
            assert.ok(r.stdout.includes(c), `the man page does not mention ${c}`);
    }
});

test('health: ok, and --json is the server\'s answer', async (d) => {
    assert.equal(await ok(['health'], { url: d.base }), 'ok\n');
    const direct = await d.api('GET', '/health');
    assert.deepEqual(JSON.parse(await ok(['--json', 'health'], { url: d.base })), direct.json);
});

test('models and adapters ls: the tables and --json equal /v1/models and /v1/adapters', async (d) => {
    const direct = (await d.api('GET', '/v1/models')).json;
    const rows = table(await ok(['models'], { url: d.base }));
    assert.deepEqual(rows.map((r) => r.ID), direct.data.map((m) => m.id));
    for (const [i, m] of direct.data.entries()) {
        assert.equal(rows[i].KIND, m.kind);
        assert.equal(rows[i].RANK, m.rank === undefined ? '-' : String(m.rank));
        assert.equal(rows[i].SIZE, human(m.bytes));
    }
    assert.deepEqual(JSON.parse(await ok(['models', '--json'], { url: d.base })), direct);

    const list = (await d.api('GET', '/v1/adapters')).json;
    for (const argv of [['adapters'], ['adapters', 'ls']]) {
        const ad = table(await ok(argv, { url: d.base }));
        assert.deepEqual(ad.map((r) => r.NAME), list.data.map((a) => a.id));
        for (const [i, a] of list.data.entries())
            assert.deepEqual(ad[i], { NAME: a.id, KIND: a.kind, RANK: String(a.rank),
                                      SIZE: human(a.bytes), RESIDENT: a.resident ? 'yes' : 'no',
                                      USES: String(a.uses) });
    }
    assert.ok(list.data.some((a) => a.id === 'fox') && list.data.some((a) => a.id === 'owl'));
    assert.deepEqual(JSON.parse(await ok(['--json', 'adapters', 'ls'], { url: d.base })), list);
});

test('adapters show: every field of GET /v1/adapters/{name}', async (d) => {
    const a = (await d.api('GET', '/v1/adapters/fox')).json;
    const lines = (await ok(['adapters', 'show', 'fox'], { url: d.base })).trimEnd().split('\n');
    const shown = Object.fromEntries(lines.map((l) => {
        const m = /^(\S+)\s+(.*)$/.exec(l);
        return [m[1], m[2]];
    }));
    assert.deepEqual(Object.keys(shown), Object.keys(a));
    for (const [k, v] of Object.entries(a)) {
        const want = typeof v === 'boolean' ? (v ? 'yes' : 'no')
            : k === 'bytes' ? `${v} (${human(v)})` : String(v);
        assert.equal(shown[k], want, `field ${k}`);
    }
    assert.deepEqual(JSON.parse(await ok(['--json', 'adapters', 'show', 'fox'], { url: d.base })),
                     (await d.api('GET', '/v1/adapters/fox')).json);
    await fails(['adapters', 'show', 'nope'], { url: d.base },
                { server: await d.api('GET', '/v1/adapters/nope') });
});

test('upload: created, then replaced; the adapter answers; AdapterHub; refused files', async (d) => {
    const dir = makeLora(path.join(TMP, 'up-lora'), { seed: 21 });
    const created = await ctl(['upload', 'up1', dir], { url: d.base });
    assert.equal(created.status, 0, created.stderr);
    assert.equal(created.stderr, '', 'a progress bar without a terminal');
    let a = (await d.api('GET', '/v1/adapters/up1')).json;
    assert.equal(created.stdout, `created 'up1': ${a.kind}, rank ${a.rank}, ${human(a.bytes)}\n`);
    assert.equal(a.kind, 'lora');
    assert.equal(a.rank, 4);
    const r = await d.api('POST', '/v1/completions', { model: 'up1', prompt: 'x', max_tokens: 3 });
    assert.equal(r.status, 200, r.text);
    assert.equal(r.json.usage.completion_tokens, 3);
    // again: replaced (201 then 200 from the server), --json is the server's adapter
    const again = JSON.parse(await ok(['--json', 'upload', 'up1', dir], { url: d.base }));
    a = (await d.api('GET', '/v1/adapters/up1')).json;
    assert.deepEqual({ ...again, uses: 0 }, { ...a, uses: 0 });
    assert.match(await ok(['upload', 'up1', dir], { url: d.base }), /^replaced 'up1': lora, rank 4, /);

    // AdapterHub: adapter.safetensors is sent as the weights
    const hub = makeHub(path.join(TMP, 'up-hub'), 'hub');
    assert.match(await ok(['upload', 'hub', hub], { url: d.base }), /^created 'hub': bottleneck, /);
    assert.equal((await d.api('GET', '/v1/adapters/hub')).json.kind, 'bottleneck');
    assert.equal((await d.api('POST', '/v1/completions', { model: 'hub', prompt: 'x', max_tokens: 2 })).status, 200);

    // refused by the server (a shape that does not fit the base): its message, nothing installed
    const bad = makeLora(path.join(TMP, 'up-bad'), { seed: 2, outV: 200 });
    await fails(['upload', 'bad', bad], { url: d.base }, { server: await d.upload('bad', bad) });
    assert.equal((await d.api('GET', '/v1/adapters/bad')).status, 404);
    // refused here: no weights file, or no directory
    const empty = path.join(TMP, 'up-empty');
    fs.mkdirSync(empty, { recursive: true });
    fs.writeFileSync(path.join(empty, 'adapter_config.json'), '{}');
    assert.match(await fails(['upload', 'e', empty], { url: d.base }), /neither adapter_model\.safetensors/);
    assert.match(await fails(['upload', 'e', path.join(TMP, 'no-such-dir')], { url: d.base }),
                 /No such file or directory|neither/);
    await ok(['adapters', 'rm', 'hub'], { url: d.base });
});

test('upload on a terminal: a progress bar with bytes, percent and rate on stderr', async (d) => {
    const dir = makeLora(path.join(TMP, 'up-tty'), { seed: 23, r: 16 });
    const bytes = fs.statSync(path.join(dir, 'adapter_model.safetensors')).size;
    const r = onTerminal(['upload', 'tty', dir], { url: d.base });
    assert.equal(r.status, 0, r.out);
    const bar = /uploading {2}([\d.]+ (?:B|KiB|MiB)) \/ ([\d.]+ (?:KiB|MiB)) {2}100% {2}[\d.]+ (?:B|KiB|MiB|GiB)\/s/.exec(r.out);
    assert.ok(bar, `no finished progress bar in: ${JSON.stringify(r.out)}`);
    assert.equal(bar[1], bar[2], 'the bar ended before all bytes were sent');
    const total = Number(bar[2].split(' ')[0]) * (bar[2].endsWith('MiB') ? 1 << 20 : 1024);
    assert.ok(total >= bytes * 0.95, `the bar's total ${bar[2]} is less than the file's ${bytes} bytes`);
    assert.match(r.out, /created 'tty': lora, rank 16/);
    await ok(['adapters', 'rm', 'tty'], { url: d.base });
});

test('adapters download: the files of the daemon\'s adapters directory, byte for byte', async (d) => {
    const hub = makeHub(path.join(TMP, 'dl-hub-src'), 'dlhub');
    const up = await d.upload('dlhub', hub, { parts: [`config=@${hub}/adapter_config.json`,
                                                      `weights=@${hub}/adapter.safetensors`] });
    assert.equal(up.status, 201, up.text);
    /* PEFT's name for fox (LoRA), AdapterHub's for dlhub (its config has no peft_type) */
    for (const [name, local] of [['fox', 'adapter_model.safetensors'], ['dlhub', 'adapter.safetensors']]) {
        const stored = ['adapter_model.safetensors', 'adapter.safetensors']
            .map((f) => path.join(d.adapters, name, f)).find((f) => fs.existsSync(f));
        const config = fs.readFileSync(path.join(d.adapters, name, 'adapter_config.json'));
        const out = path.join(TMP, `dl-${name}`, 'made', 'here');
        assert.equal(await ok(['adapters', 'download', name, out], { url: d.base }),
                     `downloaded '${name}' into ${out}\n`);
        assert.deepEqual(fs.readdirSync(out).sort(), ['adapter_config.json', local].sort());
        assert.ok(fs.readFileSync(path.join(out, 'adapter_config.json')).equals(config), `${name}: config`);
        assert.ok(fs.readFileSync(path.join(out, local)).equals(fs.readFileSync(stored)), `${name}: weights`);
        /* again, over the files: replaced; --json names what was written */
        fs.writeFileSync(path.join(out, local), 'old');
        assert.deepEqual(JSON.parse(await ok(['--json', 'adapters', 'download', name, out], { url: d.base })),
                         { id: name, dir: out });
        assert.ok(fs.readFileSync(path.join(out, local)).equals(fs.readFileSync(stored)), `${name}: replaced`);
    }
    /* on a terminal: a progress bar per file */
    const tty = onTerminal(['adapters', 'download', 'fox', path.join(TMP, 'dl-tty')], { url: d.base });
    assert.equal(tty.status, 0, tty.out);
    const size = human(fs.statSync(path.join(d.adapters, 'fox', 'adapter_model.safetensors')).size);
    assert.ok(tty.out.includes(`downloading  ${size} / ${size}  100%`), JSON.stringify(tty.out));
    /* an unknown adapter: the server's 404, and nothing written */
    const none = path.join(TMP, 'dl-none');
    await fails(['adapters', 'download', 'nope', none], { url: d.base },
                { server: await d.api('GET', '/v1/adapters/nope/files/adapter_config.json') });
    assert.deepEqual(fs.readdirSync(none), []);
    await ok(['adapters', 'rm', 'dlhub'], { url: d.base });
});

test('adapters rm: deleted; again: the server\'s 404', async (d) => {
    const dir = makeLora(path.join(TMP, 'rm-lora'), { seed: 31 });
    assert.equal((await d.upload('gone', dir)).status, 201);
    assert.equal(await ok(['adapters', 'rm', 'gone'], { url: d.base }), "deleted 'gone'\n");
    assert.equal((await d.api('GET', '/v1/adapters/gone')).status, 404);
    const stderr = await fails(['adapters', 'rm', 'gone'], { url: d.base },
                               { server: await d.api('DELETE', '/v1/adapters/gone') });
    assert.match(stderr, /HTTP 404 not_found_error/);
    assert.equal((await d.upload('gone', dir)).status, 201);
    assert.deepEqual(JSON.parse(await ok(['--json', 'adapters', 'rm', 'gone'], { url: d.base })),
                     { id: 'gone', deleted: true });
});

/* The same greedy request, directly and through adapterctl. */
const GREEDY = { prompt: 'Once upon a time', max_tokens: 24, temperature: 0, ignore_eos: true };
const GREEDY_ARGV = ['-n', '24', '-t', '0', '--ignore-eos', 'Once', 'upon', 'a', 'time'];

test('complete: the text of /v1/completions, streamed and not; --json', async (d) => {
    const direct = (await d.api('POST', '/v1/completions', { model: 'fox', ...GREEDY })).json;
    const text = direct.choices[0].text;
    assert.equal(direct.usage.completion_tokens, 24);
    assert.ok(text.length > 0);
    for (const flag of [[], ['--stream'], ['--no-stream']])
        assert.equal(await ok(['complete', '-a', 'fox', ...flag, ...GREEDY_ARGV], { url: d.base }),
                     text + '\n', `complete ${flag}`);
    assert.equal(await ok(['complete', '--model', 'fox', ...GREEDY_ARGV], { url: d.base }), text + '\n');
    // the base model: no adapter
    const base = (await d.api('POST', '/v1/completions', GREEDY)).json.choices[0].text;
    assert.equal(await ok(['complete', ...GREEDY_ARGV], { url: d.base }), base + '\n');
    // the prompt from standard input
    assert.equal(await ok(['complete', '-a', 'fox', '-n', '24', '-t', '0', '--ignore-eos', '-'],
                          { url: d.base, input: 'Once upon a time' }), text + '\n');
    // --json: the server's answer; --json --stream: one chunk per line, the same text
    const j = JSON.parse(await ok(['--json', 'complete', '-a', 'fox', ...GREEDY_ARGV], { url: d.base }));
    assert.equal(j.choices[0].text, text);
    assert.deepEqual(j.usage, direct.usage);
    const lines = (await ok(['--json', 'complete', '--stream', '-a', 'fox', ...GREEDY_ARGV],
                            { url: d.base })).trimEnd().split('\n').map((l) => JSON.parse(l));
    assert.ok(lines.length > 1);
    assert.equal(lines.map((c) => c.choices[0].text).join(''), text);
    assert.equal(lines.at(-1).choices[0].finish_reason, 'length');
    assert.deepEqual(lines.at(-1).usage, direct.usage);
    // --usage: the counts on stderr
    const u = await ctl(['complete', '-a', 'fox', '--usage', ...GREEDY_ARGV], { url: d.base });
    assert.equal(u.stderr, `${direct.usage.prompt_tokens} prompt tokens, 24 completion tokens, ` +
                           'finish_reason length\n');
});

test('complete: sampling flags and --stop reach the server', async (d) => {
    const req = { model: 'fox', prompt: 'The sea', max_tokens: 20, temperature: 0.9, top_p: 0.8,
                  top_k: 40, seed: 1234, ignore_eos: true };
    const direct = (await d.api('POST', '/v1/completions', req)).json.choices[0].text;
    const argv = ['complete', '-a', 'fox', '-n', '20', '-t', '0.9', '--top-p', '0.8', '--top-k',
                  '40', '--seed', '1234', '--ignore-eos', 'The sea'];
    assert.equal(await ok(argv, { url: d.base }), direct + '\n');
    // a stop string from the greedy text: both stop at the same place
    const greedy = (await d.api('POST', '/v1/completions', { model: 'fox', ...GREEDY })).json.choices[0].text;
    const stop = greedy.slice(6, 8);
    const stopped = (await d.api('POST', '/v1/completions', { model: 'fox', ...GREEDY, stop: [stop] })).json;
    assert.equal(stopped.choices[0].finish_reason, 'stop');
    for (const flag of ['--stream', '--no-stream'])
        assert.equal(await ok(['complete', '-a', 'fox', '--stop', stop, flag, ...GREEDY_ARGV], { url: d.base }),
                     stopped.choices[0].text + '\n');
    assert.equal((await ctl(['complete', '-n', 'x', 'a'], { url: d.base })).status, 2);
    assert.equal((await ctl(['complete', '-t', '-1', 'a'], { url: d.base })).status, 2);
});

test('complete: several --adapter NAME:WEIGHT compose as "adapters"', async (d) => {
    const mix = (await d.api('POST', '/v1/completions', {
        ...GREEDY, adapters: [{ name: 'fox', weight: 0.7 }, { name: 'owl', weight: 0.3 }] })).json;
    assert.equal(mix.usage.completion_tokens, 24);
    for (const flag of ['--stream', '--no-stream'])
        assert.equal(await ok(['complete', '-a', 'fox:0.7', '--adapter', 'owl:0.3', flag, ...GREEDY_ARGV],
                              { url: d.base }), mix.choices[0].text + '\n');
    const half = (await d.api('POST', '/v1/completions', {
        ...GREEDY, adapters: [{ name: 'fox', weight: 0.5 }] })).json.choices[0].text;
    assert.equal(await ok(['complete', '-a', 'fox:0.5', ...GREEDY_ARGV], { url: d.base }), half + '\n');
    const both = (await d.api('POST', '/v1/completions', {
        ...GREEDY, adapters: [{ name: 'fox', weight: 1 }, { name: 'owl', weight: 1 }] })).json.choices[0].text;
    assert.equal(await ok(['complete', '-a', 'fox', '-a', 'owl', ...GREEDY_ARGV], { url: d.base }), both + '\n');
    await fails(['complete', '-a', 'fox:0.5', '-a', 'nope:0.5', 'x'], { url: d.base }, {
        server: await d.api('POST', '/v1/completions', {
            prompt: 'x', adapters: [{ name: 'fox', weight: 0.5 }, { name: 'nope', weight: 0.5 }] }) });
    assert.equal((await ctl(['complete', '-a', 'fox:heavy', 'x'], { url: d.base })).status, 2);
});

test('chat: the message of /v1/chat/completions, streamed and not, with --system', async (d) => {
    const req = { model: 'owl', max_tokens: 16, temperature: 0, ignore_eos: true,
                  messages: [{ role: 'system', content: 'Be brief.' }, { role: 'user', content: 'Hi there' }] };
    const direct = (await d.api('POST', '/v1/chat/completions', req)).json;
    const content = direct.choices[0].message.content;
    const argv = ['chat', '-a', 'owl', '-n', '16', '-t', '0', '--ignore-eos', '--system', 'Be brief.',
                  'Hi', 'there'];
    for (const flag of ['--stream', '--no-stream'])
        assert.equal(await ok([...argv, flag], { url: d.base }), content + '\n');
    const j = JSON.parse(await ok(['--json', ...argv], { url: d.base }));
    assert.equal(j.object, 'chat.completion');
    assert.equal(j.choices[0].message.content, content);
    const chunks = (await ok(['--json', ...argv, '--stream'], { url: d.base })).trimEnd().split('\n')
        .map((l) => JSON.parse(l));
    assert.ok(chunks.every((c) => c.object === 'chat.completion.chunk'));
    assert.equal(chunks.map((c) => c.choices[0].delta.content ?? '').join(''), content);
    // no system message
    const plain = (await d.api('POST', '/v1/chat/completions', {
        ...req, messages: [{ role: 'user', content: 'Hi there' }] })).json.choices[0].message.content;
    assert.equal(await ok(['chat', '-a', 'owl', '-n', '16', '-t', '0', '--ignore-eos', 'Hi there'],
                          { url: d.base }), plain + '\n');
    assert.equal((await ctl(['complete', '--system', 'x', 'y'], { url: d.base })).status, 2);
});

test('tokenize: the ids of /tokenize', async (d) => {
    const text = 'The quick brown fox, 12345!';
    for (const [flag, special] of [[[], undefined], [['--no-special'], false]]) {
        const body = { model: 'model', prompt: text };
        if (special !== undefined)
            body.add_special_tokens = special;
        const direct = (await d.api('POST', '/tokenize', body)).json;
        assert.equal(await ok(['tokenize', ...flag, text], { url: d.base }), direct.tokens.join(' ') + '\n');
        assert.deepEqual(JSON.parse(await ok(['--json', 'tokenize', ...flag, text], { url: d.base })), direct);
    }
    const direct = (await d.api('POST', '/tokenize', { model: 'fox', prompt: 'a\nb ' })).json;
    assert.equal(await ok(['tokenize', '--model', 'fox', '-'], { url: d.base, input: 'a\nb ' }),
                 direct.tokens.join(' ') + '\n');
});

test('metrics: the summary\'s numbers are those of /metrics', async (d) => {
    await d.api('POST', '/v1/completions', { model: 'owl', prompt: 'count me', max_tokens: 5 });
    await idle(d);
    const before = prom((await d.api('GET', '/metrics')).text);
    const text = await ok(['metrics'], { url: d.base });
    const json = JSON.parse(await ok(['metrics', '--json'], { url: d.base }));
    const after = prom((await d.api('GET', '/metrics')).text);
    const same = (key) => {
        assert.equal(before[key], after[key], `${key} moved while idle`);
        return before[key];
    };
    const between = (v, key) => assert.ok(v >= before[key] && v <= after[key],
                                          `${key}: ${v} not in [${before[key]}, ${after[key]}]`);
    const line = (label) => {
        const m = new RegExp(`^${label} +(.*)$`, 'm').exec(text);
        assert.ok(m, `no line '${label}' in:\n${text}`);
        return m[1];
    };
    const kv = (s) => same(`adapterd_kv_blocks{state="${s}"}`);
    assert.equal(line('kv blocks'), `${kv('used')} used of ${kv('total')} (${kv('free')} free, ` +
                                    `${same('adapterd_kv_blocks_cached')} cached)`);
    assert.equal(line('completions'), String(same('adapterd_completions_total')));
    assert.equal(line('prompt tokens'), String(same('adapterd_prompt_tokens_total')));
    assert.equal(line('generated tokens'), String(same('adapterd_generated_tokens_total')));
    assert.equal(line('queue depth'), String(same('adapterd_queue_depth')));
    assert.equal(line('running sequences'), String(same('adapterd_running_sequences')));
    assert.equal(line('preemptions'), String(same('adapterd_preemptions_total')));
    assert.equal(line('prefix cache'), `${same('adapterd_prefix_cache_hits_total')} of ` +
                 `${same('adapterd_prefix_cache_queries_total')} prompt tokens found`);
    const res = same('adapterd_adapter_resident_bytes');
    assert.equal(line('adapters resident'), `${res} bytes (${human(res)})`);
    for (const name of ['fox', 'owl'])
        assert.equal(line(`adapter '${name}'`),
                     `${same(`adapterd_adapter_requests_total{adapter="${name}"}`)} requests, ` +
                     `${same(`adapterd_adapter_tokens_total{adapter="${name}"}`)} tokens`);
    assert.ok(before['adapterd_adapter_requests_total{adapter="owl"}'] >= 1);
    // requests by class: counted as they end, so between the two direct reads
    const classes = Object.fromEntries(line('requests').split(', ').map((c) => c.split(' ')));
    for (const k of ['2xx', '4xx'])
        between(Number(classes[k]), `adapterd_requests_total{code="${k}"}`);
    assert.ok(Number(classes['2xx']) > 0 && Number(classes['4xx']) > 0);
    // --json: the same numbers
    assert.deepEqual(json.kv_blocks, { used: kv('used'), total: kv('total'), free: kv('free'),
                                       cached: same('adapterd_kv_blocks_cached') });
    assert.equal(json.generated_tokens, same('adapterd_generated_tokens_total'));
    assert.equal(json.running_sequences, same('adapterd_running_sequences'));
    assert.equal(json.adapter_resident_bytes, res);
    assert.deepEqual(json.adapters.fox, {
        requests: same('adapterd_adapter_requests_total{adapter="fox"}'),
        tokens: same('adapterd_adapter_tokens_total{adapter="fox"}') });
    between(json.requests['2xx'], 'adapterd_requests_total{code="2xx"}');
    between(json.latency_seconds.count, 'adapterd_request_duration_seconds_count');
});

test('ADAPTERD_URL, --url over it, a trailing /v1; errors: 404, bad URL, daemon down, usage', async (d) => {
    const direct = (await d.api('GET', '/v1/models')).json;
    const ids = (out) => JSON.parse(out).data.map((m) => m.id);
    assert.deepEqual(ids(await ok(['--json', 'models'], { url: d.base })), direct.data.map((m) => m.id));
    const dead = `http://127.0.0.1:${await deadPort()}`;
    assert.deepEqual(ids(await ok(['--url', d.base, '--json', 'models'], { url: dead })),
                     direct.data.map((m) => m.id));
    assert.deepEqual(ids(await ok(['models', '--json', `--url=${d.base}/v1/`], { url: dead })),
                     direct.data.map((m) => m.id));
    // the daemon down: exit 1, why on stderr
    assert.match(await fails(['health'], { url: dead }), /connect/i);
    assert.match(await fails(['complete', 'x'], { url: dead }), /connect/i);
    // not a URL, another scheme, no such host
    assert.match(await fails(['models'], { url: 'not a url' }), /not an http:\/\/ or https:\/\/ URL/);
    assert.match(await fails(['--url', 'ftp://127.0.0.1/', 'models']), /not an http/);
    assert.match(await fails(['--url', 'http://no-such-host.invalid', 'health']), /resolve/i);
    // an unknown adapter: the server's 404
    await fails(['complete', '-a', 'nope', 'x'], { url: d.base },
                { server: await d.api('POST', '/v1/completions', { model: 'nope', prompt: 'x' }) });
    await fails(['chat', '--model', 'nope', 'x'], { url: d.base }, {
        server: await d.api('POST', '/v1/chat/completions', {
            model: 'nope', messages: [{ role: 'user', content: 'x' }] }) });
    // usage errors: status 2
    for (const argv of [[], ['frob'], ['models', '--frob'], ['models', 'extra'], ['upload', 'x'],
                        ['adapters', 'show'], ['adapters', 'frob', 'x'], ['--url'], ['complete']])
        assert.equal((await ctl(argv, { url: d.base })).status, 2, `adapterctl ${argv.join(' ')}`);
});

test('API keys: ADAPTERD_API_KEY and --api-key; 401 and 403 exit 1 with the server\'s message', async () => {
    const user = 'client-user-key-0123456789', admin = 'client-admin-key-0123456789';
    fs.writeFileSync(path.join(TMP, 'c-api.key'), user + '\n');
    fs.writeFileSync(path.join(TMP, 'c-admin.key'), admin + '\n');
    const s = await new Daemon(['--set', `api_key_file=${path.join(TMP, 'c-api.key')}`,
                                '--set', `admin_key_file=${path.join(TMP, 'c-admin.key')}`]).ready();
    try {
        const url = s.base, dir = makeLora(path.join(TMP, 'key-lora'), { seed: 41 });
        const bearer = (k) => ({ Authorization: `Bearer ${k}` });
        assert.equal(await ok(['health'], { url }), 'ok\n'); /* /health needs no key */
        await fails(['models'], { url }, { server: await s.api('GET', '/v1/models') });
        await fails(['models', '--api-key', 'wrong'], { url },
                    { server: await s.api('GET', '/v1/models', undefined, bearer('wrong')) });
        const models = (await s.api('GET', '/v1/models', undefined, bearer(user))).json;
        assert.deepEqual(JSON.parse(await ok(['--json', 'models'], { url, env: { ADAPTERD_API_KEY: user } })),
                         models);
        // uploads need the admin key: 403 with the user's, from the environment or the flag
        const forbidden = await s.upload('k', dir, { key: user });
        assert.equal(forbidden.status, 403);
        await fails(['upload', 'k', dir], { url, env: { ADAPTERD_API_KEY: user } }, { server: forbidden });
        await fails(['upload', 'k', dir, '--api-key', user], { url }, { server: forbidden });
        assert.equal((await s.api('GET', '/v1/adapters/k', undefined, bearer(admin))).status, 404);
        // --api-key over the environment
        assert.match(await ok(['upload', 'k', dir, '--api-key', admin],
                              { url, env: { ADAPTERD_API_KEY: user } }), /^created 'k'/);
        const want = (await s.api('POST', '/v1/completions', { model: 'k', ...GREEDY },
                                  bearer(user))).json.choices[0].text;
        assert.equal(await ok(['complete', '-a', 'k', ...GREEDY_ARGV], { url, env: { ADAPTERD_API_KEY: user } }),
                     want + '\n');
        await fails(['adapters', 'rm', 'k'], { url, env: { ADAPTERD_API_KEY: user } },
                    { server: await s.api('DELETE', '/v1/adapters/k', undefined, bearer(user)) });
        assert.equal(await ok(['adapters', 'rm', 'k', `--api-key=${admin}`], { url }), "deleted 'k'\n");
    } finally {
        await s.stop();
    }
});

test('SIGINT during a stream: exit 130 at once, a newline, the daemon frees the KV blocks', async (d) => {
    const gen0 = await d.metric('adapterd_generated_tokens_total');
    for (const cmd of [['complete', '-a', 'fox', 'Tell me a story'],
                       ['chat', '-a', 'owl', 'Tell me a story']]) {
        const run = start([...cmd, '-n', '480', '--ignore-eos', '-t', '0.8', '--seed', '7'],
                          { url: d.base });
        await printed(run, /[\s\S]/, 20000); /* the first text, a newline too */
        await sleep(100); /* a few tokens more */
        assert.equal(await d.metric('adapterd_running_sequences'), 1, 'the stream is not running');
        await interrupt(run);
        assert.ok(run.out.endsWith('\n'), 'the cut line was not ended');
        assert.equal(run.err, '', 'SIGINT is not an error to report');
        // the server cancelled the sequence: no sequence left, every KV block back
        await idle(d);
    }
    const generated = (await d.metric('adapterd_generated_tokens_total')) - gen0;
    assert.ok(generated < 2 * 480, `${generated} tokens generated: the streams ran to their end`);
});

/* ------------------------------------------------------------------------------------------ */

runSuite('client', tests).catch((e) => {
    console.error(`FAIL: ${e.stack}`);
    process.exit(1);
});

#!/usr/bin/env node
/* ui suite: the dashboard (GET /) in Debian's Chromium, headless, driven by playwright-core
 * (which downloads no browser), against the real daemon on 127.0.0.1.
 *
 *   node ui.js --adapterd PATH --mkmodel PATH --bpe-train PATH --out DIR [--only NAME]
 *
 * What the page shows is checked against the server's own answers to the same requests: the
 * adapter table against /v1/models, the playground's streamed panes against the non-streamed
 * greedy completions of the request the page sent, the loss curve's points against the job's
 * metrics events, error texts against the API's error message. Screenshots go to --out (the
 * build directory's meson-logs/ui); with ADAPTERD_UI_DOCS=1 the full page is also written to
 * docs/dashboard.png for the README. Without Chromium (/usr/bin/chromium, or $CHROMIUM) it fails:
 * scripts/deps installs it. */
'use strict';

const L = require('../integration/lib.js');
const { assert, fs, path, spawnSync, sleep, TMP, Daemon } = L;

const HERE = __dirname;
const OUT = L.opt('--out') || path.join(TMP, 'ui-out');
const DOCS_PNG = path.join(HERE, '..', '..', 'docs', 'dashboard.png');
fs.mkdirSync(OUT, { recursive: true });

/* playwright-core, from package-lock.json on first use (offline afterwards) */
if (!fs.existsSync(path.join(HERE, 'node_modules', 'playwright-core', 'package.json'))) {
    console.log('ui: node_modules missing, running npm ci');
    const r = spawnSync('npm', ['ci', '--no-audit', '--no-fund', '--loglevel=error'],
                        { cwd: HERE, stdio: 'inherit' });
    if (r.status !== 0) {
        console.error('FAIL: npm ci failed: playwright-core cannot be installed');
        process.exit(1);
    }
}
const { chromium } = require(path.join(HERE, 'node_modules', 'playwright-core'));

const CHROMIUM = [process.env.CHROMIUM, '/usr/lib/chromium/chromium', '/usr/bin/chromium']
    .find((p) => p && fs.existsSync(p));
if (!CHROMIUM) {
    console.error('FAIL: no Chromium (/usr/bin/chromium; scripts/deps installs Debian\'s chromium)');
    process.exit(1);
}

/* The model: small, so the sanitizer build trains it in seconds (as finetune.js). */
const M = { hidden: 64, layers: 2, heads: 4, kvHeads: 2, ff: 128, ctx: 256 };
const KV = (M.hidden / M.heads) * M.kvHeads;

/* A PEFT LoRA on q_proj and v_proj of the small model; outV: a wrong shape. */
function lora(dir, { seed = 1, r = 4, outV = KV } = {}) {
    fs.mkdirSync(dir, { recursive: true });
    const rand = L.rng(seed), header = {}, bufs = [];
    let off = 0;
    const add = (name, shape, scale) => {
        const n = shape[0] * shape[1];
        const a = Float32Array.from({ length: n }, () => rand() * scale);
        header[name] = { dtype: 'F32', shape, data_offsets: [off, off + a.byteLength] };
        off += a.byteLength;
        bufs.push(Buffer.from(a.buffer));
    };
    for (let l = 0; l < M.layers; l++)
        for (const [m, out] of [['q_proj', M.hidden], ['v_proj', outV]]) {
            const p = `base_model.model.model.layers.${l}.self_attn.${m}`;
            add(`${p}.lora_A.weight`, [r, M.hidden], 0.5);
            add(`${p}.lora_B.weight`, [out, r], 2);
        }
    fs.writeFileSync(path.join(dir, 'adapter_config.json'), JSON.stringify({
        peft_type: 'LORA', task_type: 'CAUSAL_LM', r, lora_alpha: 2 * r, lora_dropout: 0,
        target_modules: ['q_proj', 'v_proj'], bias: 'none', fan_in_fan_out: false,
        base_model_name_or_path: 'model',
    }));
    fs.writeFileSync(path.join(dir, 'adapter_model.safetensors'), L.safetensorsRaw(header, Buffer.concat(bufs)));
    return dir;
}

const WORDS = ['computer', 'program', 'memory', 'system', 'network', 'screen', 'file', 'bug'];
function writeData(file, n, seed) {
    const r = L.rng(seed), lines = [];
    for (let i = 0; i < n; i++) {
        const w = WORDS[Math.floor((r() + 0.5) * WORDS.length) % WORDS.length];
        lines.push(JSON.stringify({ prompt: `The word is ${w}. Again:`, completion: ` ${w}` }));
    }
    fs.writeFileSync(file, lines.join('\n') + '\n');
    return file;
}

/* ------------------------------------------------------------------------------------------
 * The browser */

let browser;

/* A page on the daemon's dashboard, recording console errors, page errors and every URL it
 * requested. */
async function openPage(d, { wait = true } = {}) {
    const context = await browser.newContext({ viewport: { width: 1440, height: 900 } });
    const page = await context.newPage();
    page.consoleErrors = [];
    page.pageErrors = [];
    page.urls = [];
    page.on('console', (m) => {
        if (m.type() === 'error')
            page.consoleErrors.push(m.text());
    });
    page.on('pageerror', (e) => page.pageErrors.push(String(e.stack || e)));
    page.on('request', (r) => page.urls.push(r.url()));
    const resp = await page.goto(d.base + '/');
    page.mainResponse = resp;
    if (wait)
        await page.waitForSelector('body[data-ready="true"]', { timeout: 20000 });
    return page;
}

async function shot(page, name, opts = {}) {
    const file = path.join(OUT, name);
    await page.screenshot({ path: file, ...opts });
    return file;
}

/* Page errors are always failures; console errors only the browser's own line for a refusal
 * the test asked for (a 4xx it provoked), listed in `allowed`. */
function assertClean(page, allowed = []) {
    assert.deepEqual(page.pageErrors, [], 'uncaught errors in the page');
    const bad = page.consoleErrors.filter((t) => !allowed.some((re) => re.test(t)));
    assert.deepEqual(bad, [], 'console errors');
}

const tableIds = (page) => page.$$eval('#adapter-table tbody tr[data-id]', (rs) => rs.map((r) => r.dataset.id));

/* ------------------------------------------------------------------------------------------
 * Tests (in order, on one daemon and one page; the keys test has its own daemon) */

const tests = [];
const test = (name, fn) => tests.push({ name, fn });
const ctx = {};

test('the page loads with no console errors and nothing from elsewhere', async (d) => {
    assert.equal((await d.upload('preloaded', lora(path.join(TMP, 'preloaded'), { seed: 7 }))).status, 201);
    const page = ctx.page = await openPage(d);
    const r = page.mainResponse;
    assert.equal(r.status(), 200);
    assert.match(r.headers()['content-type'], /^text\/html; charset=utf-8/);
    const csp = r.headers()['content-security-policy'];
    assert.match(csp, /default-src 'none'/);
    assert.match(csp, /connect-src 'self'/);
    assert.doesNotMatch(csp, /unsafe-inline|https?:/);
    /* the page is one response: no style sheet, script, font or image from anywhere */
    const html = await (await fetch(d.base + '/')).text();
    assert.doesNotMatch(html, /<(link|script)[^>]+(href|src)="(?!data:)/i);
    assert.doesNotMatch(html, /https?:\/\/(?!www\.w3\.org\/2000\/svg)/);
    /* conditional GET */
    const etag = r.headers().etag;
    assert.equal((await fetch(d.base + '/', { headers: { 'If-None-Match': etag } })).status, 304);

    /* the base and every adapter, as /v1/models has them */
    const models = (await d.api('GET', '/v1/models')).json.data;
    await page.waitForFunction((n) => document.querySelectorAll('#adapter-table tbody tr[data-id]').length === n,
                               models.length, { timeout: 10000 });
    assert.deepEqual(await tableIds(page), models.map((m) => m.id));
    assert.equal(await page.textContent('#base-id'), models[0].id);
    assert.equal(await page.textContent('#health'), 'serving');
    /* the serving charts draw once a second /metrics sample is in */
    await page.waitForFunction(() => document.querySelector('#chart-tokens svg polyline'), null, { timeout: 10000 });
    for (const u of page.urls)
        assert.ok(u.startsWith(d.base + '/') || u.startsWith('data:'), `requested ${u}`);
    assertClean(page);
    await shot(page, 'load.png');
});

test('an upload through the page appears in the adapter table; errors show the server\'s message', async (d) => {
    const page = ctx.page;
    /* a mismatched adapter: refused, with the message the API gives for the same files */
    const bad = lora(path.join(TMP, 'ui-bad'), { seed: 3, outV: KV + 1 });
    await page.setInputFiles('#upload-files', [path.join(bad, 'adapter_config.json'),
                                               path.join(bad, 'adapter_model.safetensors')]);
    await page.fill('#upload-name', 'broken');
    await page.click('#upload-button');
    await page.waitForSelector('#upload-status.err', { timeout: 10000 });
    const apiBad = await d.upload('broken', bad);
    assert.equal(apiBad.status, 400);
    assert.equal(await page.textContent('#upload-status'), `400 · ${apiBad.json.error.message}`);

    const good = lora(path.join(TMP, 'ui-lora'), { seed: 11 });
    await page.setInputFiles('#upload-files', [path.join(good, 'adapter_model.safetensors'),
                                               path.join(good, 'adapter_config.json')]);
    await page.fill('#upload-name', 'ui-lora');
    await page.click('#upload-button');
    await page.waitForSelector('#upload-status.ok', { timeout: 10000 });
    assert.match(await page.textContent('#upload-status'), /^Created ui-lora: lora rank 4/);
    await page.waitForSelector('#adapter-table tr[data-id="ui-lora"]');
    const a = (await d.api('GET', '/v1/adapters/ui-lora')).json;
    const cells = await page.$$eval('#adapter-table tr[data-id="ui-lora"] td', (tds) => tds.map((t) => t.textContent.trim()));
    assert.equal(cells[0], 'ui-lora');
    assert.equal(cells[1], a.kind);
    assert.equal(cells[2], String(a.rank));
    const kib = a.bytes / 1024;
    assert.equal(cells[3], `${kib < 10 ? kib.toFixed(1) : Math.round(kib)} KiB`);
    assert.match(cells[4], a.resident ? /yes/ : /no/);

    /* a second one picked as a directory */
    const other = lora(path.join(TMP, 'ui-other'), { seed: 12 });
    await page.setInputFiles('#upload-dir', other);
    assert.equal(await page.inputValue('#upload-name'), 'ui-other');
    await page.click('#upload-button');
    await page.waitForSelector('#adapter-table tr[data-id="ui-other"]', { timeout: 10000 });
    assert.deepEqual(await tableIds(page), (await d.api('GET', '/v1/models')).json.data.map((m) => m.id));
    assertClean(page, [/status of 400/]);
});

test('delete from the table (two clicks)', async (d) => {
    const page = ctx.page;
    const button = '#adapter-table tr[data-id="preloaded"] button.danger';
    await page.click(button);
    assert.equal(await page.textContent(button), 'Confirm');
    assert.equal((await d.api('GET', '/v1/adapters/preloaded')).status, 200, 'one click deletes nothing');
    await page.click(button);
    await page.waitForSelector('#adapter-table tr[data-id="preloaded"]', { state: 'detached', timeout: 10000 });
    assert.equal((await d.api('GET', '/v1/adapters/preloaded')).status, 404);
});

/* Runs the playground on the panes' models; returns each pane's text and the request bodies
 * the page sent. */
async function play(page, models, { chat = false, prompt = 'Once upon a time there was' } = {}) {
    while ((await page.$$('.pane')).length < models.length)
        await page.click('#add-pane');
    while ((await page.$$('.pane')).length > models.length)
        await page.click('.pane:last-child .pane-remove');
    const selects = await page.$$('.pane .pane-model');
    for (let i = 0; i < models.length; i++) {
        await selects[i].selectOption(models[i]);
    }
    await page.selectOption('#play-mode', chat ? 'chat' : 'completions');
    await page.fill('#prompt', prompt);
    await page.fill('#play-max', '24');
    await page.fill('#play-temp', '0');
    /* count the text nodes each pane gets while it streams */
    await page.evaluate(() => {
        window.chunks = [];
        document.querySelectorAll('.pane-out').forEach((o, i) => {
            window.chunks[i] = 0;
            new MutationObserver((ms) => {
                for (const m of ms)
                    window.chunks[i] += m.addedNodes.length;
            }).observe(o, { childList: true });
        });
    });
    const sent = [], types = [];
    const onReq = (r) => {
        if (r.method() === 'POST' && /\/v1\/(chat\/)?completions$/.test(r.url()))
            sent.push(JSON.parse(r.postData()));
    };
    const onResp = (r) => {
        if (r.request().method() === 'POST' && /\/v1\/(chat\/)?completions$/.test(r.url()))
            types.push(r.headers()['content-type']);
    };
    page.on('request', onReq);
    page.on('response', onResp);
    await page.click('#run-button');
    await page.waitForFunction(() => !document.querySelector('.pane-out.streaming') &&
                               !document.querySelector('#run-button').disabled, null, { timeout: 30000 });
    page.off('request', onReq);
    page.off('response', onResp);
    const texts = await page.$$eval('.pane-out', (os) => os.map((o) => o.textContent));
    const chunks = await page.evaluate(() => window.chunks);
    return { texts, chunks, sent, types };
}

test('the playground streams one prompt into panes side by side, equal to greedy answers', async (d) => {
    const page = ctx.page;
    const base = (await d.api('GET', '/v1/models')).json.data[0].id;
    for (const chat of [false, true]) {
        const models = chat ? [base, 'ui-lora'] : [base, 'ui-lora', 'ui-other'];
        const { texts, chunks, sent, types } = await play(page, models, { chat });
        assert.equal(sent.length, models.length);
        for (let i = 0; i < models.length; i++) {
            const body = sent.find((b) => b.model === models[i]);
            assert.ok(body && body.stream === true && body.temperature === 0, JSON.stringify(body));
            const r = await d.api('POST', chat ? '/v1/chat/completions' : '/v1/completions', { ...body, stream: false });
            assert.equal(r.status, 200, r.text);
            const want = chat ? r.json.choices[0].message.content : r.json.choices[0].text;
            assert.ok(want.length > 0);
            assert.equal(texts[i], want, `pane ${i} (${models[i]})`);
            const foot = await page.textContent(`.pane:nth-child(${i + 1}) .pane-foot`);
            assert.match(foot, new RegExp(`^${r.json.usage.completion_tokens} tokens`));
        }
        /* streamed: every answer came as server-sent events, and text showed before the end (a
         * tiny model may produce a whole answer between two reads: not every pane has pieces) */
        assert.deepEqual(types, models.map(() => 'text/event-stream'));
        assert.ok(chunks.some((n) => n > 1), `every pane got its text in one piece: ${chunks}`);
        assert.notEqual(texts[0], texts[1], 'the adapter changes nothing: a useless comparison');
        await shot(page, chat ? 'playground-chat.png' : 'playground.png', { fullPage: true });
    }
    /* a refused request shows the server's message in its pane */
    const panes = await page.$$('.pane .pane-model');
    await panes[0].selectOption(base);
    await page.fill('#play-max', '100000');
    const sent = page.waitForRequest((q) => q.method() === 'POST' && q.url().endsWith('/v1/chat/completions') &&
                                     JSON.parse(q.postData()).model === base).catch(() => null);
    await page.click('#run-button');
    await page.waitForSelector('.pane-out.error', { timeout: 10000 });
    const r = await d.api('POST', '/v1/chat/completions', JSON.parse((await sent).postData()));
    assert.equal(r.status, 400);
    assert.equal(await page.textContent('.pane:nth-child(1) .pane-out'), `400 · ${r.json.error.message}`);
    await page.fill('#play-max', '24');
    assertClean(page, [/status of 400/]);
});

test('a training job started from the page draws its loss curve', async (d) => {
    const page = ctx.page;
    const train = writeData(path.join(TMP, 'ui-train.jsonl'), 48, 1);
    const valid = writeData(path.join(TMP, 'ui-valid.jsonl'), 8, 2);
    await page.setInputFiles('#train-file', train);
    await page.setInputFiles('#valid-file', valid);
    await page.selectOption('#train-kind', 'lora');
    await page.fill('#train-suffix', 'ui-words');
    await page.fill('#train-epochs', '3');
    await page.fill('#train-batch', '4');
    await page.fill('#train-lr', '20');
    await page.click('#train-button');
    await page.waitForSelector('#train-status.ok', { timeout: 20000 });
    const id = /Job (\S+) created/.exec(await page.textContent('#train-status'))[1];
    /* the chart follows the new job; note each point count it is drawn with */
    await page.evaluate(() => {
        window.drawn = new Set();
        const svg = document.querySelector('#loss-chart');
        new MutationObserver(() => window.drawn.add(svg.dataset.points)).observe(svg, { attributes: true });
    });
    await page.waitForFunction((job) => {
        const svg = document.querySelector('#loss-chart');
        return svg.dataset.job === job && svg.dataset.done === 'true';
    }, id, { timeout: 120000 });
    const job = (await d.api('GET', `/v1/fine_tuning/jobs/${id}`)).json;
    assert.equal(job.status, 'succeeded', JSON.stringify(job.error));
    assert.equal(job.method.supervised.adapter ?? 'lora', 'lora');
    const events = (await d.api('GET', `/v1/fine_tuning/jobs/${id}/events?limit=100000`)).json.data.reverse();
    const metrics = events.filter((e) => e.type === 'metrics');
    assert.ok(metrics.length >= 10, `${metrics.length} metrics events`);
    /* the curve: one vertex per metrics event, in order; validation markers likewise */
    const line = await page.$$eval('#loss-chart polyline[data-series="train_loss"]', (ps) => ps.map((p) => p.getAttribute('points')));
    assert.equal(line.length, 1);
    const vertices = line[0].trim().split(/\s+/).map((p) => p.split(',').map(Number));
    assert.equal(vertices.length, metrics.length);
    for (let i = 1; i < vertices.length; i++)
        assert.ok(vertices[i][0] >= vertices[i - 1][0], 'x follows the steps');
    /* an evaluation's valid_loss is repeated by the events after it: one marker per value */
    const nValid = metrics.filter((e, i) => Number.isFinite(e.data.valid_loss) &&
                                  (i === 0 || e.data.valid_loss !== metrics[i - 1].data.valid_loss)).length;
    assert.ok(nValid >= 2, `${nValid} validation losses in the events`);
    assert.equal((await page.$$('#loss-chart circle[data-series="valid_loss"]')).length, nValid);
    /* the loss falls, and the chart's y follows it: the last vertex is lower than the first */
    assert.ok(metrics[metrics.length - 1].data.train_loss < metrics[0].data.train_loss);
    assert.ok(vertices[vertices.length - 1][1] > vertices[0][1], 'the curve does not go down');
    /* hovering shows the values at the nearest step */
    const box = await (await page.$('#loss-chart')).boundingBox();
    await page.mouse.move(box.x + box.width * 0.6, box.y + box.height / 2);
    const tip = await page.$$eval('#loss-chart .hover text', (ts) => ts.map((t) => t.textContent));
    assert.match(tip[0], /^step \d+$/);
    assert.match(tip[1], /^train_loss \d/);
    await page.mouse.move(0, 0);
    const drawn = await page.evaluate(() => [...window.drawn].map(Number));
    console.log(`     loss curve drawn at ${drawn.length} point counts while it ran: ${drawn.slice(0, 12).join(' ')}`);
    /* the job and its adapter in the tables */
    await page.waitForSelector(`#jobs-table tr[data-id="${id}"] .pill.succeeded`, { timeout: 10000 });
    await page.waitForSelector('#adapter-table tr[data-id="ui-words"]', { timeout: 10000 });
    const log = await page.textContent('#events');
    assert.match(log, /Fine-tuning job started/);
    ctx.jobId = id;
    await shot(page, 'training.png', { fullPage: true });
});

test('pause, resume and cancel from the jobs table', async (d) => {
    const page = ctx.page;
    const base = (await d.api('GET', '/v1/models')).json.data[0].id;
    const file = (await d.api('GET', '/v1/files')).json.data.find((f) => f.filename === 'ui-train.jsonl');
    const job = (await d.api('POST', '/v1/fine_tuning/jobs', { model: base, training_file: file.id, suffix: 'ui-long',
        method: { type: 'supervised', supervised: { hyperparameters: { n_epochs: 100, batch_size: 1 } } } })).json;
    const row = `#jobs-table tr[data-id="${job.id}"]`;
    const status = async (want) => {
        for (let i = 0; i < 400; i++) {
            const s = (await d.api('GET', `/v1/fine_tuning/jobs/${job.id}`)).json.status;
            if (want.includes(s))
                return s;
            await sleep(50);
        }
        throw new Error(`job ${job.id} never became ${want}`);
    };
    await status(['running']);
    await page.click(`${row} td.name`); /* follow it */
    await page.waitForSelector(`${row} button:text("Pause")`, { timeout: 10000 });
    await page.click(`${row} button:text("Pause")`);
    await status(['paused']);
    await page.waitForSelector(`${row} .pill.paused`, { timeout: 10000 });
    await page.click(`${row} button:text("Resume")`);
    await status(['queued', 'running']);
    await page.waitForSelector(`${row} button:text("Cancel")`, { timeout: 10000 });
    await page.click(`${row} button:text("Cancel")`);
    await status(['cancelled']);
    await page.waitForSelector(`${row} .pill.cancelled`, { timeout: 10000 });
    assertClean(page, [/status of 400/]);
    /* back to the finished job for the pictures */
    await page.click(`#jobs-table tr[data-id="${ctx.jobId}"] td.name`);
    await page.waitForFunction(() => document.querySelector('#loss-chart').dataset.done === 'true', null, { timeout: 10000 });
});

test('screenshots of the whole page', async (d) => {
    const page = ctx.page;
    /* traffic for the serving charts: a few samples with completions in them (for the README's
     * picture, 40 s of it in waves) */
    const base = (await d.api('GET', '/v1/models')).json.data[0].id;
    const names = [base, 'ui-lora', 'ui-other', 'ui-words'];
    const docs = process.env.ADAPTERD_UI_DOCS === '1', seconds = docs ? 40 : 4.5;
    const t0 = Date.now();
    let i = 0;
    while (Date.now() - t0 < seconds * 1000) {
        const wave = docs ? 0.5 + 0.5 * Math.sin((Date.now() - t0) / 4000) : 1;
        await Promise.all(names.slice(0, 1 + Math.round(wave * 3)).map((m) =>
            d.api('POST', '/v1/completions', { model: m, prompt: `Tell me ${i++}`, max_tokens: 16 + (i % 5) * 8 })));
        if (docs)
            await sleep(40 * (1 - wave));
    }
    /* the trained adapter next to the base and a random LoRA, on a prompt it learnt */
    await play(page, [base, 'ui-words', 'ui-lora'], { prompt: 'The word is memory. Again:' });
    await page.click('#jobs-table tr[data-id="' + ctx.jobId + '"] td.name');
    await sleep(2200); /* one more poll */
    await page.evaluate(() => window.scrollTo(0, 0));
    const file = await shot(page, 'dashboard.png', { fullPage: true });
    if (docs) {
        fs.copyFileSync(file, DOCS_PNG);
        console.log(`     wrote ${DOCS_PNG}`);
    }
    assertClean(page, [/status of 400/]);
    await page.context().close();
});

test('API keys: the page asks for the key on 401 and for the admin key on 403', async () => {
    const user = 'ui-user-key-0123456789', admin = 'ui-admin-key-0123456789';
    fs.writeFileSync(path.join(TMP, 'ui-api.key'), user + '\n');
    fs.writeFileSync(path.join(TMP, 'ui-admin.key'), admin + '\n');
    const s = await new Daemon(['--set', `api_key_file=${path.join(TMP, 'ui-api.key')}`,
                                '--set', `admin_key_file=${path.join(TMP, 'ui-admin.key')}`]).ready();
    try {
        /* the page itself needs no key; its API calls do */
        assert.equal((await fetch(s.base + '/')).status, 200);
        assert.equal((await s.api('GET', '/v1/models')).status, 401);
        const page = await openPage(s, { wait: false });
        await page.waitForSelector('#key-dialog[open]', { timeout: 10000 });
        assert.equal(await page.textContent('#key-title'), 'API key');
        assert.match(await page.textContent('#key-message'), /missing or wrong API key/);
        await shot(page, 'key-prompt.png');
        /* a wrong key is refused and asked again */
        await page.fill('#key-input', 'wrong');
        await page.click('#key-ok');
        await page.waitForFunction(() => /refused/.test(document.querySelector('#key-message').textContent) &&
                                   document.querySelector('#key-dialog').open, null, { timeout: 10000 });
        await page.fill('#key-input', user);
        await page.click('#key-ok');
        await page.waitForSelector('body[data-ready="true"]', { timeout: 20000 });
        await page.waitForSelector('#adapter-table tbody tr.base', { timeout: 10000 });
        assert.equal(await page.evaluate(() => sessionStorage.getItem('adapterd.apiKey')), user);
        /* the jobs need the admin key: said in the table, not asked by a poll */
        await page.waitForSelector('#jobs-table td.empty button', { timeout: 10000 });
        assert.equal(await page.evaluate(() => document.querySelector('#key-dialog').open), false);
        /* an upload: 403, the admin key asked, the upload sent again */
        const dir = lora(path.join(TMP, 'ui-keyed'), { seed: 21 });
        await page.setInputFiles('#upload-dir', dir);
        await page.click('#upload-button');
        await page.waitForSelector('#key-dialog[open]', { timeout: 10000 });
        assert.equal(await page.textContent('#key-title'), 'Admin key');
        assert.match(await page.textContent('#key-message'), /needs the admin key/);
        await page.fill('#key-input', admin);
        await page.click('#key-ok');
        await page.waitForSelector('#adapter-table tr[data-id="ui-keyed"]', { timeout: 10000 });
        assert.equal((await s.api('GET', '/v1/adapters/ui-keyed', undefined, { Authorization: `Bearer ${user}` })).status, 200);
        /* with the admin key the jobs table works */
        await page.waitForSelector('#jobs-table td.empty:text("no jobs yet")', { timeout: 10000 });
        /* the key stays in this tab: a reload asks nothing */
        await page.reload();
        await page.waitForSelector('body[data-ready="true"]', { timeout: 20000 });
        assert.equal(await page.evaluate(() => document.querySelector('#key-dialog').open), false);
        assert.deepEqual(page.pageErrors, []);
        /* the only console errors: the browser's own lines for the refusals */
        assert.ok(page.consoleErrors.every((t) => /status of 40[13]/.test(t)), page.consoleErrors.join('\n'));
        await page.context().close();
    } finally {
        await s.stop();
    }
});

/* ------------------------------------------------------------------------------------------ */

async function main() {
    const t00 = Date.now();
    L.makeModel(M);
    browser = await chromium.launch({ executablePath: CHROMIUM, headless: true });
    const d = await new Daemon().ready();
    let passed = 0, failed = 0;
    for (const t of tests) {
        if (L.ONLY && !t.name.includes(L.ONLY))
            continue;
        const t0 = Date.now();
        try {
            await t.fn(d);
            passed++;
            console.log(`ok   ${t.name} (${Date.now() - t0} ms)`);
        } catch (e) {
            failed++;
            console.log(`FAIL ${t.name}\n${e.stack}`);
            if (ctx.page && !ctx.page.isClosed()) {
                await shot(ctx.page, `fail-${passed + failed}.png`, { fullPage: true }).catch(() => {});
                console.log(`     console errors: ${JSON.stringify(ctx.page.consoleErrors)}\n` +
                            `     page errors: ${JSON.stringify(ctx.page.pageErrors)}`);
            }
        }
    }
    await browser.close();
    try {
        await d.stop();
    } catch (e) {
        failed++;
        console.log(`FAIL shutdown of the daemon\n${e.message}`);
    }
    if (failed)
        console.log(`--- daemon log (last 4000 bytes) ---\n${d.log.slice(-4000)}`);
    fs.rmSync(TMP, { recursive: true, force: true });
    console.log(`screenshots in ${OUT} (${((Date.now() - t00) / 1000).toFixed(1)} s)`);
    console.log(`ui: ${passed} passed, ${failed} failed`);
    process.exit(failed ? 1 : 0);
}

main().catch((e) => {
    console.log(`FAIL ${e.stack}`);
    process.exit(1);
});

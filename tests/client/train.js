#!/usr/bin/env node
/* Client suite, fine-tuning: adapterctl train, jobs and files against the real adapterd on a tiny
 * model (a step takes milliseconds, also under ASan), with a temporary state_dir.
 *
 *   node train.js --adapterd PATH --mkmodel PATH --bpe-train PATH --adapterctl PATH [--only NAME]
 *
 * Honest by construction, as client.js: what adapterctl prints is compared with what the server
 * answers to the same request sent here directly (its jobs, events, checkpoints and files, its
 * error messages), and what adapterctl sends with the job the server resolves as it resolves the
 * request the README describes, sent here; never with an earlier adapterctl output. */
'use strict';

const { assert, fs, path, sleep, TMP, rng, runSuite } = require('../integration/lib.js');
const { ctl, ok, fails, start, printed, interrupt, onTerminal, human, table } = require('./ctl.js');

/* The model's shape: small enough that every job here trains in seconds under ASan. */
const MODEL_OPTS = { hidden: 64, layers: 2, heads: 4, kvHeads: 2, ff: 128, ctx: 256 };
const DATA = path.join(TMP, 'train.jsonl');
const VALID = path.join(TMP, 'valid.jsonl');
const BAD = path.join(TMP, 'bad.jsonl');
const UTC = { TZ: 'UTC' }; /* adapterctl's times are local: UTC here, as utc() writes them */
const ENDED = ['succeeded', 'failed', 'cancelled'];

/* n lines of {"prompt", "completion"}: the completion repeats the prompt's word. */
function writeData(file, n, seed) {
    const r = rng(seed), words = ['cat', 'dog', 'owl', 'fox', 'bee', 'elk', 'yak', 'emu'];
    const lines = Array.from({ length: n }, () => {
        const w = words[Math.floor((r() + 0.5) * words.length)];
        return JSON.stringify({ prompt: `Repeat ${w}:`, completion: ` ${w} ${w}` });
    });
    fs.writeFileSync(file, lines.join('\n') + '\n');
    return file;
}

writeData(DATA, 40, 1);
writeData(VALID, 8, 2);

/* ------------------------------------------------------------------------------------------
 * The server's side, asked directly */

const job = async (d, id) => (await d.api('GET', `/v1/fine_tuning/jobs/${id}`)).json;
const fileIds = async (d) => (await d.api('GET', '/v1/files')).json.data.map((f) => f.id).sort();

/* Every event of a job, oldest first (every page). */
async function allEvents(d, id) {
    const all = [];
    for (let after = null; ;) {
        const q = `limit=100${after ? `&after=${after}` : ''}`;
        const page = (await d.api('GET', `/v1/fine_tuning/jobs/${id}/events?${q}`)).json;
        all.push(...page.data);
        if (!page.has_more)
            return all.reverse();
        after = page.data.at(-1).id;
    }
}

/* POST /v1/files of a file, as curl -F purpose=fine-tune -F file=@path sends it. */
async function uploadDirect(d, file) {
    const form = new FormData();
    form.append('purpose', 'fine-tune');
    form.append('file', new Blob([fs.readFileSync(file)]), path.basename(file));
    const r = await fetch(`${d.base}/v1/files`, { method: 'POST', body: form });
    const text = await r.text();
    return { status: r.status, text, json: JSON.parse(text) };
}

async function waitFor(what, cond, ms = 120000) {
    const t0 = Date.now();
    while (!(await cond())) {
        if (Date.now() - t0 > ms)
            throw new Error(`${what}: not within ${ms} ms`);
        await sleep(20);
    }
}

/* Until the job has a metrics event past step `step`. */
const pastStep = (d, id, step) => waitFor(`job ${id} past step ${step}`, async () => {
    const page = (await d.api('GET', `/v1/fine_tuning/jobs/${id}/events?limit=10`)).json;
    const m = page.data.find((e) => e.type === 'metrics');
    return m && m.data.step > step;
});

/* Cancels the jobs that have not ended, so that the next test's jobs do not wait behind them. */
async function settle(d) {
    for (const j of (await d.api('GET', '/v1/fine_tuning/jobs?limit=100')).json.data)
        if (!ENDED.includes(j.status))
            assert.equal((await d.api('POST', `/v1/fine_tuning/jobs/${j.id}/cancel`)).status, 200);
}

/* ------------------------------------------------------------------------------------------
 * What adapterctl's text should be, written from the server's JSON */

/* C's printf("%g"): 6 significant digits, an exponent below 1e-4 and from 1e6 on. */
function cg(x) {
    if (x === 0)
        return '0';
    const [mant, ex] = x.toExponential(5).split('e');
    const e = Number(ex), trim = (s) => (s.includes('.') ? s.replace(/\.?0+$/, '') : s);
    if (e < -4 || e >= 6)
        return `${trim(mant)}e${e < 0 ? '-' : '+'}${String(Math.abs(e)).padStart(2, '0')}`;
    return trim(x.toFixed(5 - e));
}

/* A time as adapterctl writes it in UTC: "2025-01-31 12:34:56". */
const utc = (t) => new Date(t * 1000).toISOString().replace('T', ' ').slice(0, 19);

/* The line adapterctl prints for an event when it does not draw a bar. */
function eventLine(ev) {
    if (ev.type !== 'metrics')
        return (ev.level === 'info' ? '' : `${ev.level}: `) + ev.message;
    const m = ev.data;
    const valid = m.valid_loss === undefined ? '' : `  valid_loss ${m.valid_loss.toFixed(4)}`;
    return `step ${m.step}/${m.total_steps}  train_loss ${m.train_loss.toFixed(4)}${valid}  ` +
           `learning_rate ${cg(m.learning_rate)}  tokens/s ${m.tokens_per_second.toFixed(1)}`;
}

const succeeded = (j) =>
    `succeeded: adapter '${j.fine_tuned_model}' (job ${j.id}, ${j.trained_tokens} trained tokens)`;

/* `show`'s lines as {key: value}. */
function fields(text) {
    return Object.fromEntries(text.trimEnd().split('\n').map((l) => {
        const m = /^(\S+)\s+(.*)$/.exec(l);
        return [m[1], m[2]];
    }));
}

/* Checks `show`'s text against the object: objects and arrays as JSON, times with their date. */
function assertFields(text, obj) {
    const shown = fields(text);
    assert.deepEqual(Object.keys(shown), Object.keys(obj));
    for (const [k, v] of Object.entries(obj)) {
        if (v !== null && typeof v === 'object')
            assert.deepEqual(JSON.parse(shown[k]), v, `field ${k}`);
        else if (Number.isInteger(v) && (k.endsWith('_at') || k === 'estimated_finish'))
            assert.equal(shown[k], `${v} (${utc(v)})`, `field ${k}`);
        else if (k === 'bytes')
            assert.equal(shown[k], `${v} (${human(v)})`, `field ${k}`);
        else
            assert.equal(shown[k], v === null ? 'null' : String(v), `field ${k}`);
    }
}

/* The fields of a job that change as it runs. */
const RUNNING = ['status', 'finished_at', 'fine_tuned_model', 'trained_tokens', 'estimated_finish'];
const fixed = (j) => Object.fromEntries(Object.entries(j).filter(([k]) => !RUNNING.includes(k)));

/* ------------------------------------------------------------------------------------------
 * The tests, in order, on one daemon: `done` is the job of the first, which later ones read */

let done;
let base;
const tests = [];
const test = (name, fn) => tests.push({ name, fn });

test('train --follow: to success, a line per event, the last names the adapter, which answers', async (d) => {
    base = (await d.api('GET', '/v1/models')).json.data[0].id;
    const r = await ctl(['train', '--data', DATA, '--suffix', 'cl-a', '--epochs', '1',
                         '--batch-size', '8', '--seed', '11', '--follow'], { url: d.base });
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stderr, '', 'no bar, no message without a terminal');
    const lines = r.stdout.trimEnd().split('\n');
    assert.match(lines[0], /^ftjob-[0-9a-f]+$/);
    done = await job(d, lines[0]);
    assert.equal(done.status, 'succeeded');
    assert.equal(done.fine_tuned_model, 'cl-a');
    assert.deepEqual(lines.slice(1, -1), (await allEvents(d, done.id)).map(eventLine));
    assert.equal(lines.at(-1), succeeded(done));
    // what was sent: the file as it is, the base from /v1/models, the flags
    const content = await fetch(`${d.base}/v1/files/${done.training_file}/content`);
    assert.ok(Buffer.from(await content.arrayBuffer()).equals(fs.readFileSync(DATA)));
    assert.equal((await d.api('GET', `/v1/files/${done.training_file}`)).json.filename, 'train.jsonl');
    assert.equal(done.model, base);
    assert.equal(done.seed, 11);
    assert.deepEqual(done.hyperparameters, { n_epochs: 1, batch_size: 8, learning_rate_multiplier: 1 });
    assert.equal(done.validation_file, null);
    // the adapter answers, through the server and through adapterctl alike
    const want = await d.api('POST', '/v1/completions', { model: 'cl-a', prompt: 'Repeat cat:',
                                                         max_tokens: 4, temperature: 0 });
    assert.equal(want.status, 200, want.text);
    assert.equal(await ok(['complete', '-a', 'cl-a', '-n', '4', '-t', '0', '--no-stream', 'Repeat cat:'],
                          { url: d.base }), want.json.choices[0].text + '\n');
});

test('--json train --follow: the job, each event as GET .../events has it, the job as it ended', async (d) => {
    const out = await ok(['--json', 'train', '--data', DATA, '--suffix', 'cl-b', '--epochs', '1',
                          '--follow'], { url: d.base });
    const objs = out.trimEnd().split('\n').map((l) => JSON.parse(l));
    const end = await job(d, objs[0].id);
    assert.equal(objs[0].object, 'fine_tuning.job');
    assert.ok(!ENDED.includes(objs[0].status), objs[0].status);
    assert.deepEqual(fixed(objs[0]), fixed(end));
    assert.deepEqual(objs.slice(1, -1), await allEvents(d, end.id));
    assert.ok(objs.slice(1, -1).some((e) => e.type === 'metrics'));
    assert.deepEqual(objs.at(-1), end);
    assert.equal(end.status, 'succeeded');
});

test('train on a terminal: upload and progress bars (step/total, loss, tokens/s, ETA), events as lines', async (d) => {
    const r = onTerminal(['train', '--data', DATA, '--validation', VALID, '--suffix', 'cl-c',
                          '--epochs', '2', '--batch-size', '4', '--follow'], { url: d.base });
    assert.equal(r.status, 0, r.out);
    const id = /^(ftjob-[0-9a-f]+)\r$/m.exec(r.out)[1];
    const j = await job(d, id), evs = await allEvents(d, id);
    assert.match(r.out, /uploading train\.jsonl {2}[\d.]+ (B|KiB) \/ [\d.]+ (B|KiB) {2}100% /);
    assert.match(r.out, /uploading valid\.jsonl {2}[\d.]+ (B|KiB) \/ [\d.]+ (B|KiB) {2}100% /);
    const bars = [...r.out.matchAll(/training {2}step (\d+)\/(\d+) +(\d+)% {2}loss (\S+)(?: {2}valid (\S+))? {2}(\S+) tokens\/s {2}ETA (\S+)\x1b\[K/g)];
    const metrics = evs.filter((e) => e.type === 'metrics').map((e) => e.data);
    assert.equal(bars.length, metrics.length, 'a bar per metrics event');
    for (const [i, m] of metrics.entries()) {
        const [, step, total, pct, loss, , tps, eta] = bars[i];
        assert.deepEqual([Number(step), Number(total), Number(pct), loss, tps],
                         [m.step, m.total_steps, Math.floor(100 * m.step / m.total_steps),
                          m.train_loss.toFixed(4), m.tokens_per_second.toFixed(1)]);
        assert.match(eta, /^(-|\d+:\d\d(:\d\d)?)$/);
    }
    const lastValid = metrics.filter((m) => m.valid_loss !== undefined).at(-1);
    assert.ok(lastValid, 'no evaluation with --validation');
    assert.equal(bars.at(-1)[5], lastValid.valid_loss.toFixed(4));
    for (const e of evs.filter((x) => x.type !== 'metrics'))
        assert.ok(r.out.includes(`${e.message}\r\n`), `no line '${e.message}'`);
    assert.ok(r.out.endsWith(`${succeeded(j)}\r\n`), JSON.stringify(r.out.slice(-200)));
    assert.ok(j.validation_file);
});

test('train: the flags make the job that the same request sent directly makes', async (d) => {
    const cfg = path.join(TMP, 'adapter_config.json');
    fs.writeFileSync(cfg, JSON.stringify({ peft_type: 'LORA', r: 4, lora_dropout: 0,
                                           target_modules: ['q_proj'] }));
    const cases = [
        [['--kind', 'dora', '--config', cfg, '--rank', '8', '--alpha', '16', '--target-modules',
          'q_proj,v_proj', '--epochs', '2', '--batch-size', '4', '--lr', '0.001', '--seed', '5',
          '--max-seq-len', '64', '--validation', VALID],
         { seed: 5, supervised: { adapter: 'dora', adapter_config: {
             peft_type: 'LORA', r: 8, lora_alpha: 16, lora_dropout: 0, target_modules: ['q_proj', 'v_proj'] },
           hyperparameters: { n_epochs: 2, batch_size: 4 }, learning_rate: 0.001, max_seq_len: 64 } }],
        [['--rank', '4'], { supervised: { adapter: 'lora', adapter_config: { r: 4 } } }],
        [['--config', cfg], { supervised: { adapter_config: JSON.parse(fs.readFileSync(cfg)) } }],
        [['--kind', 'prefix', '--epochs', '1'], { supervised: { adapter: 'prefix', hyperparameters: { n_epochs: 1 } } }],
        [['--kind', 'ia3', '--target-modules', 'k_proj,v_proj'],
         { supervised: { adapter: 'ia3', adapter_config: { target_modules: ['k_proj', 'v_proj'] } } }],
        [['--kind', 'full', '--base', base], { supervised: { adapter: 'full' } }],
    ];
    for (const [i, [flags, want]] of cases.entries()) {
        const out = await ok(['train', '--data', DATA, '--suffix', `cl-f${i}`, ...flags], { url: d.base });
        assert.match(out, /^ftjob-[0-9a-f]+\n$/);
        const j = await job(d, out.trim());
        const direct = await d.api('POST', '/v1/fine_tuning/jobs', {
            model: base, training_file: j.training_file, validation_file: j.validation_file,
            suffix: `cl-d${i}`, seed: want.seed ?? j.seed,
            method: { type: 'supervised', supervised: want.supervised } });
        assert.equal(direct.status, 200, direct.text);
        assert.deepEqual(j.method, direct.json.method, `flags ${flags.join(' ')}`);
        assert.deepEqual(j.hyperparameters, direct.json.hyperparameters);
        assert.equal(j.validation_file !== null, flags.includes('--validation'));
        await settle(d);
    }
    // --json: the job as created
    const j = JSON.parse(await ok(['--json', 'train', '--data', DATA, '--suffix', 'cl-j'], { url: d.base }));
    assert.deepEqual(fixed(j), fixed(await job(d, j.id)));
    await settle(d);
});

test('train errors: a bad line (the server\'s message, exit 1, nothing kept), usage (exit 2), refused jobs', async (d) => {
    const before = await fileIds(d);
    fs.writeFileSync(BAD, '{"prompt": "a", "completion": " b"}\n{"prompt": "c", "completion": " d"}\n' +
                          '{"prompt": "e"}\n');
    const direct = await uploadDirect(d, BAD);
    assert.equal(direct.status, 400, direct.text);
    assert.match(direct.json.error.message, /^line 3: /);
    await fails(['train', '--data', BAD, '--suffix', 'cl-bad'], { url: d.base }, { server: direct });
    await fails(['files', 'upload', BAD], { url: d.base }, { server: direct });
    // a wrong command line: status 2, before anything is sent
    const D = ['--data', DATA, '--suffix', 'x'];
    for (const argv of [[...D, '--kind', 'lorax'], [...D, '--kind', 'ia3', '--rank', '4'],
                        [...D, '--kind', 'prefix', '--target-modules', 'q_proj'],
                        [...D, '--epochs', 'many'], [...D, '--lr', '-1'], [...D, 'extra'],
                        ['--data', DATA], ['--suffix', 'x'], []]) {
        const r = await ctl(['train', ...argv], { url: d.base });
        assert.equal(r.status, 2, `adapterctl train ${argv.join(' ')}: ${r.status} ${r.stderr}`);
        assert.match(r.stderr, /^adapterctl train: /);
    }
    const unknown = await ctl(['train', '--data', DATA, '--suffix', 'x', '--kind', 'lorax'], { url: d.base });
    assert.match(unknown.stderr, /unknown --kind 'lorax' \(lora, dora, rslora, ia3, prefix, prompt, bitfit, houlsby, pfeiffer, full\)/);
    assert.match((await ctl(['train', '--data', DATA], { url: d.base })).stderr, /--suffix NAME is needed/);
    assert.match((await ctl(['train', '--suffix', 'x'], { url: d.base })).stderr, /--data FILE is needed/);
    // here: no such file, a --config that is not JSON
    assert.match(await fails(['train', '--data', path.join(TMP, 'none.jsonl'), '--suffix', 'x'], { url: d.base }),
                 /none\.jsonl: No such file or directory/);
    fs.writeFileSync(path.join(TMP, 'notjson'), '{"r": ');
    assert.match(await fails(['train', '--data', DATA, '--suffix', 'x', '--config', path.join(TMP, 'notjson')],
                             { url: d.base }), /notjson: /);
    // jobs the server refuses: its message; the file uploaded for it is removed
    const up = await uploadDirect(d, DATA);
    for (const [flags, body] of [
        [['--suffix', 'cl-long', '--max-seq-len', '100000'], { suffix: 'cl-long', method: { type: 'supervised', supervised: { max_seq_len: 100000 } } }],
        [['--suffix', 'not a name'], { suffix: 'not a name' }],
        [['--suffix', 'x', '--base', 'no-such-adapter'], { suffix: 'x', model: 'no-such-adapter' }],
    ]) {
        const server = await d.api('POST', '/v1/fine_tuning/jobs', { model: base, training_file: up.json.id, ...body });
        assert.equal(server.status, 400, server.text);
        await fails(['train', '--data', DATA, ...flags], { url: d.base }, { server });
    }
    assert.equal((await d.api('DELETE', `/v1/files/${up.json.id}`)).status, 200);
    assert.deepEqual(await fileIds(d), before, 'a file was left behind');
});

test('jobs ls, show, events, checkpoints: --json is the server\'s answer; the tables and lines', async (d) => {
    const url = d.base, env = UTC;
    await settle(d);
    const list = (await d.api('GET', '/v1/fine_tuning/jobs')).json;
    assert.deepEqual(JSON.parse(await ok(['--json', 'jobs'], { url })), list);
    assert.deepEqual(JSON.parse(await ok(['--json', 'jobs', 'ls'], { url })), list);
    const rows = table(await ok(['jobs', 'ls'], { url, env }));
    assert.deepEqual(rows, list.data.map((j) => ({
        ID: j.id, STATUS: j.status, MODEL: j.model, ADAPTER: j.fine_tuned_model ?? '-',
        CREATED: utc(j.created_at) })));
    // a page: --limit, --after, and where the next begins
    const p1 = (await d.api('GET', '/v1/fine_tuning/jobs?limit=2')).json;
    assert.ok(p1.has_more);
    const r = await ctl(['--json', 'jobs', '--limit', '2'], { url });
    assert.deepEqual(JSON.parse(r.stdout), p1);
    const next = p1.data[1].id;
    const t = await ctl(['jobs', '--limit', '2'], { url });
    assert.equal(t.stderr, `(more: adapterctl jobs ls --after ${next})\n`);
    assert.deepEqual(JSON.parse(await ok(['--json', 'jobs', '--after', next, '--limit', '3'], { url })),
                     (await d.api('GET', `/v1/fine_tuning/jobs?after=${next}&limit=3`)).json);
    // show
    const j = await job(d, done.id);
    assert.deepEqual(JSON.parse(await ok(['--json', 'jobs', 'show', done.id], { url })), j);
    assertFields(await ok(['jobs', 'show', done.id], { url, env }), j);
    // events: a page, oldest first in text
    for (const q of [[], ['--limit', '4']]) {
        const page = (await d.api('GET', `/v1/fine_tuning/jobs/${done.id}/events${q.length ? '?limit=4' : ''}`)).json;
        assert.deepEqual(JSON.parse(await ok(['--json', 'jobs', 'events', done.id, ...q], { url })), page);
        assert.equal(await ok(['jobs', 'events', done.id, ...q], { url, env }), page.data.slice().reverse()
            .map((e) => `${utc(e.created_at)}  ${e.level.padEnd(5)}  ${e.message}\n`).join(''));
    }
    // checkpoints
    const ck = (await d.api('GET', `/v1/fine_tuning/jobs/${done.id}/checkpoints`)).json;
    assert.ok(ck.data.length >= 1);
    assert.deepEqual(JSON.parse(await ok(['--json', 'jobs', 'checkpoints', done.id], { url })), ck);
    assert.deepEqual(table(await ok(['jobs', 'checkpoints', done.id], { url, env })), ck.data.map((c) => ({
        STEP: String(c.step_number), CHECKPOINT: c.fine_tuned_model_checkpoint,
        TRAIN_LOSS: c.metrics.train_loss.toFixed(4),
        VALID_LOSS: c.metrics.valid_loss === undefined ? '-' : c.metrics.valid_loss.toFixed(4),
        CREATED: utc(c.created_at) })));
    // an unknown job: the server's 404; a wrong command line: 2
    for (const sub of ['show', 'events', 'checkpoints', 'cancel'])
        await fails(['jobs', sub, 'ftjob-0123456789abcdef01234567'], { url }, {
            server: await d.api(sub === 'cancel' ? 'POST' : 'GET',
                                `/v1/fine_tuning/jobs/ftjob-0123456789abcdef01234567${sub === 'show' ? '' : `/${sub}`}`) });
    for (const argv of [['jobs', 'frob'], ['jobs', 'show'], ['jobs', 'ls', 'x'], ['jobs', 'ls', '--follow'],
                        ['jobs', 'show', 'x', '--limit', '2'], ['jobs', 'events', 'x', '--limit', '0']])
        assert.equal((await ctl(argv, { url })).status, 2, argv.join(' '));
});

test('jobs pause, resume, cancel: --json is the server\'s job, the text its status; refusals', async (d) => {
    const url = d.base;
    const status = async (id) => (await job(d, id)).status;
    const id = (await ok(['train', '--data', DATA, '--suffix', 'cl-long', '--epochs', '100',
                          '--batch-size', '1'], { url })).trim();
    const queued = (await ok(['train', '--data', DATA, '--suffix', 'cl-queued'], { url })).trim();
    await pastStep(d, id, 1);
    // the job waiting behind it pauses at once
    assert.equal(await ok(['jobs', 'pause', queued], { url }), `job ${queued}: paused\n`);
    assert.equal(await status(queued), 'paused');
    // the running one after its step (the answer may come before or after that step)
    const pausing = JSON.parse(await ok(['--json', 'jobs', 'pause', id], { url }));
    assert.ok(['running', 'paused'].includes(pausing.status), pausing.status);
    await waitFor('paused', async () => (await status(id)) === 'paused');
    assert.deepEqual(fixed(pausing), fixed(await job(d, id)));
    await fails(['jobs', 'pause', id], { url },
                { server: await d.api('POST', `/v1/fine_tuning/jobs/${id}/pause`) });
    // the paused job's checkpoint is served; its file cannot go while the job lives
    const ck = (await d.api('GET', `/v1/fine_tuning/jobs/${id}/checkpoints`)).json.data;
    assert.ok(ck.length >= 1);
    assert.equal((await d.api('GET', `/v1/adapters/${ck[0].fine_tuned_model_checkpoint}`)).status, 200);
    const busy = await d.api('DELETE', `/v1/files/${pausing.training_file}`);
    assert.equal(busy.status, 409, busy.text);
    await fails(['files', 'rm', pausing.training_file], { url }, { server: busy });
    // cancel the paused one behind: the server's job, as it stays
    const cancelled = JSON.parse(await ok(['--json', 'jobs', 'cancel', queued], { url }));
    assert.equal(cancelled.status, 'cancelled');
    assert.deepEqual(cancelled, await job(d, queued));
    // resume: queued again, then running; a running job does not resume
    assert.equal(await ok(['jobs', 'resume', id], { url }), `job ${id}: queued\n`);
    await waitFor('running again', async () => (await status(id)) === 'running');
    await pastStep(d, id, ck[0].step_number);
    await fails(['jobs', 'resume', id], { url },
                { server: await d.api('POST', `/v1/fine_tuning/jobs/${id}/resume`) });
    await ok(['jobs', 'pause', id], { url });
    await waitFor('paused again', async () => (await status(id)) === 'paused');
    const resumed = JSON.parse(await ok(['--json', 'jobs', 'resume', id], { url }));
    assert.equal(resumed.status, 'queued');
    assert.deepEqual(fixed(resumed), fixed(await job(d, id)));
    // cancel: its checkpoints' adapters go
    assert.equal(await ok(['jobs', 'cancel', id], { url }), `job ${id}: cancelled\n`);
    assert.equal(await status(id), 'cancelled');
    await fails(['--json', 'jobs', 'cancel', id], { url },
                { server: await d.api('POST', `/v1/fine_tuning/jobs/${id}/cancel`) });
    await waitFor('checkpoints removed', async () => {
        const names = [...ck, ...(await d.api('GET', `/v1/fine_tuning/jobs/${id}/checkpoints`)).json.data]
            .map((c) => c.fine_tuned_model_checkpoint);
        const found = await Promise.all(names.map((n) => d.api('GET', `/v1/adapters/${n}`)));
        return found.every((r) => r.status === 404);
    }, 30000);
    assert.deepEqual(JSON.parse(await ok(['--json', 'jobs', 'checkpoints', id], { url })),
                     (await d.api('GET', `/v1/fine_tuning/jobs/${id}/checkpoints`)).json);
    // following a cancelled job: its events, then exit 1 saying so
    const r = await ctl(['jobs', 'events', id, '--follow'], { url });
    assert.equal(r.status, 1, r.stderr);
    assert.deepEqual(r.stdout.trimEnd().split('\n'), (await allEvents(d, id)).map(eventLine));
    assert.equal(r.stderr, `adapterctl: job ${id} is cancelled\n`);
});

test('SIGINT during train --follow: exit 130 within a second, saying so; the job goes on', async (d) => {
    const run = start(['train', '--data', DATA, '--suffix', 'cl-int', '--epochs', '100',
                       '--batch-size', '1', '--follow'], { url: d.base });
    await printed(run, /^step \d+\//m);
    await interrupt(run);
    const id = run.out.split('\n')[0];
    assert.equal(run.err, `adapterctl: stopped following job ${id}; the job goes on (adapterctl jobs cancel ${id} stops it)\n`);
    const j = await job(d, id);
    assert.equal(j.status, 'running');
    const evs = await allEvents(d, id);
    await pastStep(d, id, evs.filter((e) => e.type === 'metrics').at(-1).data.step);
    await settle(d);
});

test('jobs events --follow: every event then the result; a failed job exits 1 with its error', async (d) => {
    const url = d.base;
    const objs = (await ok(['--json', 'jobs', 'events', done.id, '--follow'], { url }))
        .trimEnd().split('\n').map((l) => JSON.parse(l));
    assert.deepEqual(objs, [...await allEvents(d, done.id), await job(d, done.id)]);
    assert.equal(await ok(['jobs', 'events', done.id, '--follow'], { url }),
                 [...(await allEvents(d, done.id)).map(eventLine), succeeded(done)].join('\n') + '\n');
    // a job that fails when it runs: nothing fits in 8 tokens
    const r = await ctl(['train', '--data', DATA, '--suffix', 'cl-fail', '--max-seq-len', '8', '--follow'], { url });
    assert.equal(r.status, 1, r.stderr);
    const lines = r.stdout.trimEnd().split('\n'), j = await job(d, lines[0]);
    assert.equal(j.status, 'failed');
    assert.deepEqual(lines.slice(1), (await allEvents(d, j.id)).map(eventLine));
    assert.equal(r.stderr, `adapterctl: job ${j.id} failed: ${j.error.message} (${j.error.code})\n`);
});

test('files ls, show, upload, rm: --json is the server\'s answer; the table', async (d) => {
    const url = d.base, env = UTC;
    const id = (await ok(['files', 'upload', VALID], { url })).trim();
    const f = (await d.api('GET', `/v1/files/${id}`)).json;
    assert.equal(f.filename, 'valid.jsonl');
    assert.equal(f.bytes, fs.statSync(VALID).size);
    const list = (await d.api('GET', '/v1/files')).json;
    assert.ok(list.data.some((x) => x.id === id));
    assert.deepEqual(JSON.parse(await ok(['--json', 'files'], { url })), list);
    assert.deepEqual(table(await ok(['files', 'ls'], { url, env })), list.data.map((x) => ({
        ID: x.id, FILENAME: x.filename, SIZE: human(x.bytes), PURPOSE: x.purpose, CREATED: utc(x.created_at) })));
    assert.deepEqual(JSON.parse(await ok(['--json', 'files', 'show', id], { url })), f);
    assertFields(await ok(['files', 'show', id], { url, env }), f);
    const again = JSON.parse(await ok(['--json', 'files', 'upload', VALID], { url }));
    assert.deepEqual(again, (await d.api('GET', `/v1/files/${again.id}`)).json);
    assert.equal(await ok(['files', 'rm', id], { url }), `deleted '${id}'\n`);
    assert.deepEqual(JSON.parse(await ok(['--json', 'files', 'rm', again.id], { url })),
                     { id: again.id, object: 'file', deleted: true });
    for (const gone of [id, again.id]) {
        assert.equal((await d.api('GET', `/v1/files/${gone}`)).status, 404);
        await fails(['files', 'rm', gone], { url }, { server: await d.api('DELETE', `/v1/files/${gone}`) });
        await fails(['files', 'show', gone], { url }, { server: await d.api('GET', `/v1/files/${gone}`) });
    }
    for (const argv of [['files', 'frob'], ['files', 'rm'], ['files', 'upload'], ['files', 'ls', 'x']])
        assert.equal((await ctl(argv, { url })).status, 2, argv.join(' '));
});

test('adapters download: trained adapters (LoRA, a checkpoint, Pfeiffer) as the daemon stores them', async (d) => {
    const r = await ctl(['train', '--data', DATA, '--suffix', 'cl-bn', '--kind', 'pfeiffer',
                         '--epochs', '1', '--batch-size', '20', '--follow'], { url: d.base });
    assert.equal(r.status, 0, r.stderr);
    const ck = (await d.api('GET', `/v1/fine_tuning/jobs/${done.id}/checkpoints`)).json.data[0];
    for (const name of ['cl-a', ck.fine_tuned_model_checkpoint, 'cl-bn']) {
        const dir = path.join(d.adapters, name), out = path.join(TMP, `dl-${name}`);
        assert.equal(await ok(['adapters', 'download', name, out], { url: d.base }),
                     `downloaded '${name}' into ${out}\n`);
        const stored = fs.readdirSync(dir).filter((f) => !f.startsWith('.')).sort();
        assert.deepEqual(fs.readdirSync(out).sort(), stored, name);
        for (const f of stored)
            assert.ok(fs.readFileSync(path.join(out, f)).equals(fs.readFileSync(path.join(dir, f))),
                      `${name}/${f} differs`);
    }
});

/* ------------------------------------------------------------------------------------------ */

runSuite('client-train', tests, [], { model: MODEL_OPTS }).catch((e) => {
    console.error(`FAIL: ${e.stack}`);
    process.exit(1);
});

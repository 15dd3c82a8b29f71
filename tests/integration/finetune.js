/* Fine-tuning through the real daemon (issue #15), driven by the official openai npm client and
 * curl: training files (uploads checked line by line; bad ones refused whole), jobs of every kind
 * that train, get served under their fine_tuned_model and come back out through
 * GET /v1/adapters/{name}/files/...; the job's adapter is adapterd-train's, byte for byte, also
 * after a SIGTERM, a kill -9 or a pause in the middle (the trainer resumes bit for bit); serving
 * during a job answers as when idle; events as pages and as server-sent events; pause, resume,
 * cancel; bad requests get a 4xx naming the field; the routes need the admin key. */
'use strict';

const L = require('./lib.js');
const { assert, fs, path, spawnSync, sleep, TMP, Daemon, assertError } = L;
const { execFile } = require('child_process');

const TRAIN = L.opt('--train');
if (!TRAIN) {
    console.error('usage: finetune.js --adapterd PATH --mkmodel PATH --bpe-train PATH --train PATH');
    process.exit(2);
}
/* Small enough that the sanitizer build trains it in seconds. */
const MODEL_OPTS = { hidden: 64, layers: 2, heads: 4, kvHeads: 2, ff: 128, ctx: 256 };

/* ------------------------------------------------------------------------------------------
 * Data and helpers */

const WORDS = ['computer', 'program', 'memory', 'system', 'network', 'keyboard', 'screen',
               'file', 'disk', 'user', 'error', 'code', 'bug', 'cookie', 'fortune', 'time'];

/* prompt/completion lines a model can learn: the completion repeats the prompt's word. */
function writeData(file, n, seed = 1) {
    const r = L.rng(seed);
    const lines = [];
    for (let i = 0; i < n; i++) {
        const w = WORDS[Math.floor(r() * WORDS.length)];
        if (i % 4 === 3)
            lines.push({ messages: [{ role: 'user', content: `Say ${w}.` },
                                    { role: 'assistant', content: `${w} ${w}` }] });
        else
            lines.push({ prompt: `The word is ${w}. Again:`, completion: ` ${w}` });
    }
    fs.writeFileSync(file, lines.map((l) => JSON.stringify(l)).join('\n') + '\n');
    return file;
}

const DATA = path.join(TMP, 'train.jsonl');
const VALID = path.join(TMP, 'valid.jsonl');

async function upload(client, file) {
    return client.files.create({ file: fs.createReadStream(file), purpose: 'fine-tune' });
}

/* Polls a job until its status is one of `want`; fails on another final status. */
async function waitJob(client, id, want = ['succeeded'], ms = 300000) {
    const t0 = Date.now();
    for (;;) {
        const j = await client.fineTuning.jobs.retrieve(id);
        if (want.includes(j.status))
            return j;
        if (['succeeded', 'failed', 'cancelled'].includes(j.status))
            throw new Error(`job ${id} ended ${j.status}, not ${want}: ${JSON.stringify(j.error)}`);
        if (Date.now() - t0 > ms)
            throw new Error(`job ${id} is still ${j.status} after ${ms} ms`);
        await sleep(50);
    }
}

/* The job's events, oldest first (every page). */
async function events(client, id) {
    const all = [];
    for await (const e of client.fineTuning.jobs.listEvents(id, { limit: 7 }))
        all.push(e);
    return all.reverse();
}

async function lastStep(client, id) {
    const page = await client.fineTuning.jobs.listEvents(id, { limit: 50 });
    const m = page.data.find((e) => e.type === 'metrics');
    return m ? m.data.step : 0;
}

async function waitStep(client, id, step, ms = 300000) {
    const t0 = Date.now();
    while (await lastStep(client, id) < step) {
        if (Date.now() - t0 > ms)
            throw new Error(`job ${id} did not reach step ${step}`);
        await sleep(20);
    }
}

/* adapterd-train with a job's resolved method: the same adapter, byte for byte. */
function trainLikeJob(job, data, out) {
    const sup = job.method.supervised;
    const what = [];
    if (sup.adapter === 'full') {
        what.push('--full', '--as-adapter');
        if (sup.child_tuning)
            what.push('--child', sup.child_tuning.mode,
                      '--reserve-p', String(sup.child_tuning.reserve_p));
    } else {
        const cfg = path.join(TMP, `${job.id}-config.json`);
        fs.writeFileSync(cfg, JSON.stringify(sup.adapter_config));
        what.push('--config', cfg);
    }
    const hp = sup.hyperparameters;
    const argv = ['--model', L.MODEL, '--data', data, ...what, '--out', out, '--quiet',
                  '--epochs', String(hp.n_epochs), '--batch-size', String(hp.batch_size),
                  '--lr', String(sup.learning_rate), '--seed', String(job.seed),
                  '--max-seq-len', String(sup.max_seq_len), '--schedule', sup.lr_scheduler,
                  '--max-grad-norm', String(sup.max_grad_norm),
                  '--weight-decay', String(sup.weight_decay),
                  '--warmup-steps', String(sup.warmup_steps),
                  '--grad-accum', String(sup.gradient_accumulation_steps)];
    const r = spawnSync(TRAIN, argv, { encoding: 'utf8' });
    assert.equal(r.status, 0, `adapterd-train failed: ${r.stderr}`);
    const st = ['adapter_model.safetensors', 'adapter.safetensors'].map((f) => path.join(out, f))
        .find((f) => fs.existsSync(f));
    return fs.readFileSync(st);
}

async function download(d, name, file = 'adapter_model.safetensors') {
    const r = await fetch(`${d.base}/v1/adapters/${name}/files/${file}`);
    assert.equal(r.status, 200, `download ${name}/${file}: ${r.status}`);
    return Buffer.from(await r.arrayBuffer());
}

async function logprobs(d, model, prompt) {
    const r = await d.api('POST', '/v1/completions', { model, prompt, max_tokens: 4,
                                                       temperature: 0, logprobs: 1 });
    assert.equal(r.status, 200, r.text);
    return { text: r.json.choices[0].text, lp: r.json.choices[0].logprobs.token_logprobs };
}

/* curl -F, for what the openai client will not send (bad forms). */
function curlForm(d, parts, headers = []) {
    const argv = ['-s', '-o', '-', '-w', '\n%{http_code}'];
    for (const p of parts)
        argv.push('-F', p);
    for (const h of headers)
        argv.push('-H', h);
    argv.push(`${d.base}/v1/files`);
    return new Promise((res, rej) => execFile('curl', argv, (err, out) => {
        if (err)
            return rej(err);
        const i = out.lastIndexOf('\n');
        let json = null;
        try { json = JSON.parse(out.slice(0, i)); } catch { /* not JSON */ }
        res({ status: Number(out.slice(i + 1)), json, text: out.slice(0, i) });
    }));
}

function stateFiles(d) {
    return fs.readdirSync(path.join(d.state, 'files')).sort();
}

/* ------------------------------------------------------------------------------------------
 * Tests (in order, on one daemon; the restart tests start their own) */

let trainFile; /* the uploaded DATA */
let baseId;

const tests = [
    { name: 'files: upload, list, retrieve, content, delete (openai client)', fn: async (d) => {
        writeData(DATA, 40, 1);
        writeData(VALID, 8, 2);
        const c = d.client();
        baseId = (await c.models.list()).data[0].id;
        const f = await upload(c, DATA);
        assert.match(f.id, /^file-/);
        assert.equal(f.object, 'file');
        assert.equal(f.bytes, fs.statSync(DATA).size);
        assert.equal(f.filename, 'train.jsonl');
        assert.equal(f.purpose, 'fine-tune');
        assert.equal(f.status, 'processed');
        trainFile = f;
        const list = await c.files.list();
        assert.ok(list.data.some((x) => x.id === f.id));
        assert.equal((await c.files.retrieve(f.id)).bytes, f.bytes);
        const body = await (await c.files.content(f.id)).text();
        assert.equal(body, fs.readFileSync(DATA, 'utf8'));
        /* a byte order mark and CRLF line ends, as editors on Windows write them */
        const crlf = path.join(TMP, 'crlf.jsonl');
        fs.writeFileSync(crlf, '\uFEFF' + fs.readFileSync(VALID, 'utf8').replace(/\n/g, '\r\n'));
        const h = await upload(c, crlf);
        assert.equal(h.status, 'processed');
        await c.files.delete(h.id);
        const g = await upload(c, VALID);
        const del = await c.files.delete(g.id);
        assert.deepEqual([del.id, del.deleted], [g.id, true]);
        await assert.rejects(c.files.retrieve(g.id), (e) => e.status === 404);
        assert.ok(!stateFiles(d).some((n) => n.startsWith(g.id)), 'deleted file left on disk');
    } },

    { name: 'files: a bad line, form or size is refused, nothing is kept', fn: async (d) => {
        const before = stateFiles(d);
        const bad = path.join(TMP, 'bad.jsonl');
        const cases = [
            ['{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n{"prompt": 1}\n', /line 3/],
            ['{"prompt": "a", "completion": "b"}\nnot json\n', /line 2/],
            ['{"messages": [{"role": "user", "content": "hi"}]}\n', /line 1.*assistant/i],
            ['{"completion": "b"}\n', /line 1.*'prompt' is missing/],
            ['', /empty|no example|no line/i],
        ];
        for (const [text, re] of cases) {
            fs.writeFileSync(bad, text);
            const r = await curlForm(d, ['purpose=fine-tune', `file=@${bad}`]);
            assertError(r, 400, re);
        }
        assertError(await curlForm(d, ['purpose=fine-tune']), 400, /file=@/);
        assertError(await curlForm(d, ['purpose=fine-tune', `data=@${DATA}`]), 400, /'data'/);
        assertError(await curlForm(d, ['purpose=batch', `file=@${DATA}`]), 400, /purpose/);
        assertError(await d.api('POST', '/v1/files', '{"file": "x"}'), 415, /multipart/);
        /* max_train_file_mb=1 here: 1.5 MB of good lines */
        const big = path.join(TMP, 'big.jsonl');
        const line = JSON.stringify({ prompt: 'x'.repeat(1000), completion: ' y' }) + '\n';
        fs.writeFileSync(big, line.repeat(1500));
        assertError(await curlForm(d, ['purpose=fine-tune', `file=@${big}`]), 413, /MiB|bytes|large/);
        assert.deepEqual(stateFiles(d), before);
        assert.equal((await d.api('GET', '/health')).status, 200);
    } },

    { name: 'jobs: a LoRA job trains, is served, and is adapterd-train\'s adapter', fn: async (d) => {
        const c = d.client();
        const v = await upload(c, VALID);
        let job = await c.fineTuning.jobs.create({
            model: baseId, training_file: trainFile.id, validation_file: v.id, suffix: 'words',
            seed: 7, method: { type: 'supervised', supervised: {
                hyperparameters: { n_epochs: 3, batch_size: 4, learning_rate_multiplier: 20 },
                eval_every: 5 } } });
        assert.match(job.id, /^ftjob-/);
        assert.equal(job.object, 'fine_tuning.job');
        assert.ok(['validating_files', 'queued', 'running'].includes(job.status));
        assert.equal(job.seed, 7);
        job = await waitJob(c, job.id);
        assert.equal(job.fine_tuned_model, 'words');
        assert.ok(job.trained_tokens > 0);
        assert.ok(job.finished_at >= job.created_at);
        assert.ok((await c.fineTuning.jobs.list()).data.some((x) => x.id === job.id));

        const evs = await events(c, job.id);
        const steps = evs.filter((e) => e.type === 'metrics' && e.data.train_loss !== undefined);
        assert.equal(steps.length, 30, 'a metrics event per step (40 lines / 4, 3 epochs)');
        assert.deepEqual(steps.map((e) => e.data.step), [...Array(30).keys()].map((i) => i + 1));
        const mean = (a) => a.reduce((x, y) => x + y, 0) / a.length;
        const first = mean(steps.slice(0, 5).map((e) => e.data.train_loss));
        const last = mean(steps.slice(-5).map((e) => e.data.train_loss));
        assert.ok(last < 0.5 * first, `the loss fell from ${first} to ${last}`);
        /* a validation loss where an evaluation ran (eval_every 5), and only there */
        assert.deepEqual(steps.filter((e) => e.data.valid_loss !== undefined).map((e) => e.data.step),
                         [5, 10, 15, 20, 25, 30]);
        assert.match(evs.at(-1).message, /success/i);

        const ck = await c.fineTuning.jobs.checkpoints.list(job.id);
        assert.ok(ck.data.length >= 1);
        for (const k of ck.data) {
            assert.equal(k.object, 'fine_tuning.job.checkpoint');
            assert.equal(k.fine_tuned_model_checkpoint, `words-step-${k.step_number}`);
            await logprobs(d, k.fine_tuned_model_checkpoint, 'The word is disk. Again:');
        }

        /* served: it learned the task, and the base did not */
        const tuned = await logprobs(d, 'words', 'The word is memory. Again:');
        const base = await logprobs(d, baseId, 'The word is memory. Again:');
        assert.notDeepEqual(tuned.lp, base.lp);
        assert.ok((await c.models.list()).data.some((m) => m.id === 'words'));

        /* the files come back out, and are what adapterd-train makes of the same job */
        const cfg = JSON.parse((await download(d, 'words', 'adapter_config.json')).toString());
        assert.equal(cfg.peft_type, 'LORA');
        assert.equal(cfg.r, 16);
        const got = await download(d, 'words');
        const want = trainLikeJob(job, DATA, path.join(TMP, 'ref-words'));
        assert.ok(got.equals(want), 'the daemon\'s adapter differs from adapterd-train\'s');
    } },

    { name: 'jobs: every kind trains and is served', fn: async (d) => {
        const c = d.client();
        const kinds = [
            ['dora', { adapter: 'dora' }], ['rslora', { adapter: 'rslora' }],
            ['ia3', { adapter: 'ia3' }], ['prefix', { adapter: 'prefix' }],
            ['prompt', { adapter: 'prompt' }], ['bitfit', { adapter: 'bitfit' }],
            ['houlsby', { adapter: 'houlsby' }], ['pfeiffer', { adapter: 'pfeiffer' }],
            ['lora8', { adapter_config: { peft_type: 'LORA', r: 8, lora_alpha: 8,
                                          target_modules: ['q_proj', 'v_proj'] },
                        learning_rate: 5e-3 }],
            ['full', { adapter: 'full', learning_rate: 1e-3 }],
            ['childf', { adapter: 'full', child_tuning: { mode: 'F', reserve_p: 0.3 },
                         learning_rate: 1e-3 }],
            ['childd', { adapter: 'full', child_tuning: { mode: 'D', reserve_p: 0.3 },
                         learning_rate: 1e-3 }],
        ];
        const jobs = [];
        for (const [name, sup] of kinds)
            jobs.push(await c.fineTuning.jobs.create({
                model: baseId, training_file: trainFile.id, suffix: `k-${name}`, seed: 3,
                method: { type: 'supervised', supervised: {
                    hyperparameters: { n_epochs: 3, batch_size: 8 }, ...sup } } }));
        const base = await logprobs(d, baseId, 'The word is code. Again:');
        for (const j of jobs) {
            const done = await waitJob(c, j.id);
            const name = done.fine_tuned_model;
            const asked = kinds.find(([n]) => `k-${n}` === name)[1].adapter;
            assert.equal(done.method.supervised.adapter, asked, 'the kind asked, as resolved');
            const losses = (await events(c, j.id)).filter((e) => e.type === 'metrics')
                .map((e) => e.data.train_loss);
            assert.equal(losses.length, 15);
            /* the first epoch's mean against the last's: the same examples */
            const [first, last] = [losses.slice(0, 5), losses.slice(-5)]
                .map((a) => a.reduce((x, y) => x + y) / a.length);
            assert.ok(last < first, `${name}: the loss went from ${first} to ${last}`);
            const got = await logprobs(d, name, 'The word is code. Again:');
            assert.notDeepEqual(got.lp, base.lp, `${name} changed nothing`);
            const want = trainLikeJob(done, DATA, path.join(TMP, `ref-${name}`));
            const file = fs.existsSync(path.join(d.adapters, name, 'adapter.safetensors'))
                ? 'adapter.safetensors' : 'adapter_model.safetensors';
            assert.ok((await download(d, name, file)).equals(want),
                      `${name}: the daemon's adapter differs from adapterd-train's`);
        }
        const info = (await d.api('GET', '/v1/adapters')).json.data;
        const kind = (n) => info.find((a) => a.id === n);
        assert.ok(kind('k-ia3') && kind('k-prefix') && kind('k-childd'));
    } },

    { name: 'jobs: server-sent events follow a job to its end', fn: async (d) => {
        const c = d.client();
        const job = await c.fineTuning.jobs.create({
            model: baseId, training_file: trainFile.id, suffix: 'sse', method: { type:
            'supervised', supervised: { adapter: 'ia3', hyperparameters: { n_epochs: 1 } } } });
        const r = await fetch(`${d.base}/v1/fine_tuning/jobs/${job.id}/events?stream=true`);
        assert.equal(r.status, 200);
        assert.match(r.headers.get('content-type'), /text\/event-stream/);
        const text = await r.text();
        assert.ok(text.endsWith('data: [DONE]\n\n'), `no [DONE] at the end: ${text.slice(-200)}`);
        const got = text.split('\n\n').filter((e) => e && e !== 'data: [DONE]')
            .map((e) => JSON.parse(e.replace(/^data: /, '')));
        const pages = await events(c, job.id);
        assert.deepEqual(got.map((e) => e.id), pages.map((e) => e.id));
        assert.equal((await c.fineTuning.jobs.retrieve(job.id)).status, 'succeeded');
    } },

    { name: 'jobs: bad requests are refused naming the field', fn: async (d) => {
        const ok = { model: baseId, training_file: trainFile.id };
        const cases = [
            [{ ...ok, colour: 'red' }, 400, /'colour'/],
            [{ training_file: trainFile.id }, 400, /'model'/],
            [{ model: baseId }, 400, /'training_file'/],
            [{ ...ok, training_file: 'file-000' }, 400, /file-000/],
            [{ ...ok, model: 'no-such-adapter' }, 400, /no-such-adapter/],
            [{ ...ok, suffix: 'a/b' }, 400, /'suffix'/],
            [{ ...ok, seed: -1 }, 400, /'seed'/],
            [{ ...ok, hyperparameters: { n_epochs: 0 } }, 400, /n_epochs/],
            [{ ...ok, hyperparameters: { n_epochs: 'many' } }, 400, /n_epochs/],
            [{ ...ok, hyperparameters: { batch_size: 2.5 } }, 400, /batch_size/],
            [{ ...ok, method: { type: 'dpo' } }, 400, /method.type/],
            [{ ...ok, method: { type: 'supervised', supervised: { adapter: 'lorax' } } }, 400, /adapter/],
            [{ ...ok, method: { type: 'supervised', supervised: { adapter_config:
                { peft_type: 'LORA', r: 0 } } } }, 400, /adapter_config/],
            [{ ...ok, method: { type: 'supervised', supervised: { adapter_config:
                { peft_type: 'LORA', target_modules: ['nothing_here'] } } } }, 400, /nothing_here|target/],
            [{ ...ok, method: { type: 'supervised', supervised: { lr_scheduler: 'step' } } }, 400, /lr_scheduler/],
            [{ ...ok, method: { type: 'supervised', supervised: { max_seq_len: 100000 } } }, 400, /max_seq_len/],
            [{ ...ok, method: { type: 'supervised', supervised: { child_tuning: { mode: 'X' } } } }, 400, /child_tuning/],
            [{ ...ok, integrations: [{ type: 'wandb' }] }, 400, /integrations/],
            [{ ...ok, method: { type: 'supervised', supervised: { learning_rate: 1e-3,
                hyperparameters: { learning_rate_multiplier: 2 } } } }, 400, /not both/],
            [{ ...ok, suffix: 'x'.repeat(49) }, 400, /48/],
            /* a job never replaces an adapter it did not make (nor its checkpoints' names) */
            [{ ...ok, suffix: 'words' }, 409, /'words' exists/],
            [{ ...ok, suffix: 'k-ia3' }, 409, /'k-ia3' exists/],
        ];
        for (const [body, status, re] of cases)
            assertError(await d.api('POST', '/v1/fine_tuning/jobs', body), status, re);
        assertError(await d.api('POST', '/v1/fine_tuning/jobs', '{"model": '), 400, /JSON/);
        assertError(await d.api('GET', '/v1/fine_tuning/jobs/ftjob-nope'), 404, /ftjob-nope/);
        assertError(await d.api('POST', '/v1/fine_tuning/jobs/ftjob-nope/cancel'), 404, /ftjob-nope/);
        assertError(await d.api('GET', '/v1/fine_tuning/jobs?limit=x'), 400, /limit/);
        assertError(await d.api('GET', '/v1/files/file-nope'), 404, /file-nope/);
        assertError(await d.api('GET', '/v1/adapters/nope/files/adapter_config.json'), 404, /nope/);
        assertError(await d.api('GET', '/v1/adapters/words/files/..%2f..%2fetc'), 404, /adapter_config/);
        const done = (await d.client().fineTuning.jobs.list()).data.find((j) => j.status === 'succeeded');
        assertError(await d.api('POST', `/v1/fine_tuning/jobs/${done.id}/cancel`), 400, /succeeded/);
        assertError(await d.api('POST', `/v1/fine_tuning/jobs/${done.id}/pause`), 400, /succeeded/);
        /* an adapter_config without a peft_type adds to LoRA's defaults */
        const c = d.client();
        const j = await c.fineTuning.jobs.create({ ...ok, method: { type: 'supervised',
            supervised: { adapter_config: { r: 4 } } } });
        const cfg = j.method.supervised.adapter_config;
        assert.deepEqual([cfg.peft_type, cfg.r, cfg.lora_alpha], ['LORA', 4, 32]);
        assert.equal((await c.fineTuning.jobs.cancel(j.id)).status, 'cancelled');
    } },

    { name: 'jobs: pause, resume and cancel; serving meanwhile answers as when idle', fn: async (d) => {
        const c = d.client();
        const prompts = ['The word is bug. Again:', 'Say time.', 'computer'];
        const idle = [];
        for (const m of [baseId, 'words', 'k-prefix'])
            for (const p of prompts)
                idle.push(await logprobs(d, m, p));
        let job = await c.fineTuning.jobs.create({
            model: baseId, training_file: trainFile.id, suffix: 'long', method: { type:
            'supervised', supervised: { hyperparameters: { n_epochs: 100, batch_size: 2 },
                                        checkpoint_every: 3 } } });
        await waitStep(c, job.id, 4);
        const busy = [];
        for (const m of [baseId, 'words', 'k-prefix'])
            for (const p of prompts)
                busy.push(await logprobs(d, m, p));
        assert.equal((await c.fineTuning.jobs.retrieve(job.id)).status, 'running');
        assert.deepEqual(busy, idle, 'answers during training differ from idle ones');
        assert.ok(await d.metric('adapterd_finetune_jobs{status="running"}') === 1);
        assert.ok(await d.metric('adapterd_finetune_tokens_per_second') > 0);

        /* file in use: not deleted */
        assertError(await d.api('DELETE', `/v1/files/${trainFile.id}`), 409, /job/);
        /* a second job with the same suffix while this one runs */
        assertError(await d.api('POST', '/v1/fine_tuning/jobs', { model: baseId, training_file:
            trainFile.id, suffix: 'long' }), 409, /long/);

        job = await c.fineTuning.jobs.pause(job.id);
        job = await waitJob(c, job.id, ['paused']);
        const at = await lastStep(c, job.id);
        await sleep(500);
        assert.equal(await lastStep(c, job.id), at, 'a paused job went on training');
        const ck = (await c.fineTuning.jobs.checkpoints.list(job.id)).data;
        assert.ok(ck.some((k) => k.step_number === at), 'no checkpoint at the pause');
        job = await c.fineTuning.jobs.resume(job.id);
        await waitStep(c, job.id, at + 2);
        job = await c.fineTuning.jobs.cancel(job.id);
        job = await waitJob(c, job.id, ['cancelled']);
        const names = (await d.api('GET', '/v1/adapters')).json.data.map((a) => a.id);
        assert.ok(!names.some((n) => n.startsWith('long')), 'a cancelled job left adapters');
        assert.deepEqual((await c.fineTuning.jobs.checkpoints.list(job.id)).data, []);
        assert.ok(!fs.existsSync(path.join(d.adapters, 'long')));
        assertError(await d.api('POST', `/v1/fine_tuning/jobs/${job.id}/resume`), 400, /cancelled/);
    } },

    { name: 'jobs: with every core busy, job routes and serving answer at once', fn: async (d) => {
        /* the worker computes at idle priority: on a saturated machine its steps crawl, but no
         * request waits for one (cancel used to wait for the step to end) */
        const c = d.client();
        const heavy = path.join(TMP, 'heavy.jsonl');
        fs.writeFileSync(heavy, Array.from({ length: 40 }, (_, i) => JSON.stringify({
            text: WORDS.map((w, k) => `${w} ${WORDS[(i + k) % WORDS.length]}`).join(' ').repeat(3),
        })).join('\n') + '\n');
        const f = await upload(c, heavy);
        const job = await c.fineTuning.jobs.create({ model: baseId, training_file: f.id,
            suffix: 'busy', method: { type: 'supervised', supervised: {
                hyperparameters: { n_epochs: 100, batch_size: 40 }, max_seq_len: 256 } } });
        await waitStep(c, job.id, 1);
        const spin = [0, 1].map(() => L.spawn(process.execPath, ['-e', 'for (;;) {}']));
        try {
            await sleep(300);
            const timed = async (what, p) => {
                const t0 = Date.now();
                const r = await p;
                assert.ok(Date.now() - t0 < 5000, `${what} took ${Date.now() - t0} ms`);
                return r;
            };
            assert.equal((await timed('GET job', c.fineTuning.jobs.retrieve(job.id))).status,
                         'running');
            await timed('GET events', c.fineTuning.jobs.listEvents(job.id));
            await timed('a completion', logprobs(d, 'words', 'The word is bug. Again:'));
            const r = await timed('cancel', c.fineTuning.jobs.cancel(job.id));
            assert.equal(r.status, 'cancelled');
        } finally {
            spin.forEach((p) => p.kill('SIGKILL'));
        }
        await c.files.delete(f.id).catch(() => {}); /* 409 while the worker finishes its step */
    } },

    { name: 'restart: SIGTERM, kill -9 and a pause mid-job all end with the same adapter', fn: async () => {
        const sup = { hyperparameters: { n_epochs: 6, batch_size: 2 }, checkpoint_every: 5 };
        let ref = null;
        for (const how of ['SIGTERM', 'SIGKILL', 'pause']) {
            let d = await new Daemon().ready();
            const c = d.client();
            const f = await upload(c, DATA);
            let job = await c.fineTuning.jobs.create({ model: baseId, training_file: f.id,
                suffix: 'again', seed: 11, method: { type: 'supervised', supervised: sup } });
            /* a queued job behind it survives too */
            const queued = await c.fineTuning.jobs.create({ model: baseId, training_file: f.id,
                suffix: 'after', seed: 12, method: { type: 'supervised', supervised: {
                    adapter: 'bitfit', hyperparameters: { n_epochs: 1 } } } });
            await waitStep(c, job.id, 7);
            if (how === 'pause') {
                await c.fineTuning.jobs.pause(job.id);
                await waitJob(c, job.id, ['paused']);
            }
            d.proc.kill(how === 'SIGKILL' ? 'SIGKILL' : 'SIGTERM');
            const ex = await d.exited;
            assert.equal(how === 'SIGKILL' ? ex.sig : ex.code, how === 'SIGKILL' ? 'SIGKILL' : 0,
                         d.log.slice(-2000));
            const log1 = d.log;
            d = await new Daemon([], { adapters: d.adapters, state: d.state }).ready();
            const c2 = d.client();
            if (how === 'pause') {
                assert.equal((await c2.fineTuning.jobs.retrieve(job.id)).status, 'paused');
                await c2.fineTuning.jobs.resume(job.id);
            }
            job = await waitJob(c2, job.id);
            await waitJob(c2, queued.id);
            const evs = await events(c2, job.id);
            const steps = evs.filter((e) => e.type === 'metrics').map((e) => e.data.step);
            assert.equal(Math.max(...steps), 120);
            assert.ok(evs.some((e) => /resum/i.test(e.message)), 'no event says it resumed');
            const got = await download(d, 'again');
            ref ??= trainLikeJob(job, DATA, path.join(TMP, 'ref-again'));
            assert.ok(got.equals(ref), `after ${how} the adapter differs from an uninterrupted run`);
            await d.stop();
            assert.doesNotMatch(log1 + d.log, /AddressSanitizer|runtime error/);
        }
    } },

    { name: 'restart: kill -9 during an upload leaves no file', fn: async () => {
        let d = await new Daemon().ready();
        const before = fs.readdirSync(path.join(d.state, 'files'));
        const net = require('net');
        const s = net.connect(L.port(d), '127.0.0.1');
        await new Promise((r) => s.on('connect', r));
        const head = '--B\r\nContent-Disposition: form-data; name="file"; filename="t.jsonl"\r\n\r\n' +
                     fs.readFileSync(DATA, 'utf8');
        s.write(`POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; ` +
                `boundary=B\r\nContent-Length: ${head.length + 1000}\r\n\r\n${head}`);
        await sleep(300);
        d.proc.kill('SIGKILL');
        await d.exited;
        s.destroy();
        d = await new Daemon([], { adapters: d.adapters, state: d.state }).ready();
        assert.deepEqual(fs.readdirSync(path.join(d.state, 'files')), before);
        assert.deepEqual((await d.client().files.list()).data, []);
        await d.stop();
    } },

    { name: 'auth: files and jobs need the admin key; without state_dir they answer 503', fn: async () => {
        fs.writeFileSync(path.join(TMP, 'api.key'), 'user-key-0123456789\n');
        fs.writeFileSync(path.join(TMP, 'admin.key'), 'admin-key-0123456789\n');
        let d = await new Daemon(['--set', `api_key_file=${path.join(TMP, 'api.key')}`,
                                  '--set', `admin_key_file=${path.join(TMP, 'admin.key')}`]).ready();
        await assert.rejects(upload(d.client('user-key-0123456789'), DATA), (e) => e.status === 403);
        await assert.rejects(d.client('user-key-0123456789').fineTuning.jobs.list(), (e) => e.status === 403);
        await assert.rejects(d.client('nope').files.list(), (e) => e.status === 401);
        const r = await curlForm(d, ['purpose=fine-tune', `file=@${DATA}`],
                                 ['Authorization: Bearer user-key-0123456789']);
        assertError(r, 403, /admin/);
        const f = await upload(d.client('admin-key-0123456789'), DATA);
        assert.equal(f.status, 'processed');
        assert.equal((await d.client('admin-key-0123456789').fineTuning.jobs.list()).data.length, 0);
        await d.stop();
        d = await new Daemon(['--set', 'state_dir=']).ready();
        assertError(await d.api('GET', '/v1/fine_tuning/jobs'), 503, /state_dir/);
        assertError(await curlForm(d, ['purpose=fine-tune', `file=@${DATA}`]), 503, /fine-tuning/);
        assert.equal((await d.api('GET', '/health')).status, 200);
        await d.stop();
    } },
];

L.runSuite('finetune', tests, ['--set', 'max_train_file_mb=1'], { model: MODEL_OPTS });

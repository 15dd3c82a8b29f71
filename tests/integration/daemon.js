#!/usr/bin/env node
/* Integration suite: the real adapterd on 127.0.0.1, driven by curl and by the official `openai`
 * npm client. Every route, every error of the API, adapter uploads replacing an adapter while
 * requests stream from it, clients that disconnect, API keys, SIGHUP and SIGTERM.
 *
 *   node daemon.js --adapterd PATH --mkmodel PATH --bpe-train PATH [--only NAME]
 *
 * References that no one here wrote: the `openai` client parses every response and stream;
 * Hugging Face's Jinja implementation (@huggingface/jinja) renders the chat template, and the
 * prompt adapterd builds must tokenize to the same ids; curl sends the multipart uploads. */
'use strict';

const {
    assert, fs, path, spawnSync, OpenAI, Template, sleep, TMP, ADAPTERD, MODEL, CTX, CHATML, ONLY,
    makeModel, makeLora, makeIA3, makePrompt, makePrefix, makeBitfit, Daemon, assertError, readSSE,
    close, safetensorsRaw, parseSafetensors,
} = require('./lib.js');

/* ------------------------------------------------------------------------------------------
 * The tests: each gets the shared daemon `d` (some start their own) */

const tests = [];
const test = (name, fn) => tests.push({ name, fn });

test('health and models', async (d) => {
    const h = await d.api('GET', '/health');
    assert.equal(h.status, 200);
    assert.equal(h.json.status, 'ok');
    const models = await d.client().models.list();
    const ids = models.data.map((m) => m.id);
    assert.ok(ids.includes('model'), `base model missing: ${ids}`);
    const base = models.data.find((m) => m.id === 'model');
    assert.equal(base.kind, 'base');
    assert.equal(base.max_model_len, CTX);
});

test('completions: string, token ids and a list of prompts (openai client)', async (d) => {
    const c = d.client();
    const a = await c.completions.create({ model: 'model', prompt: 'The quick brown fox',
                                           max_tokens: 12, temperature: 0, ignore_eos: true });
    assert.equal(a.object, 'text_completion');
    assert.equal(a.choices.length, 1);
    assert.equal(a.choices[0].finish_reason, 'length');
    assert.equal(a.usage.completion_tokens, 12);
    const tok = await d.api('POST', '/tokenize', { model: 'model', prompt: 'The quick brown fox' });
    assert.equal(tok.status, 200);
    assert.equal(a.usage.prompt_tokens, tok.json.count);
    assert.equal(a.usage.total_tokens, a.usage.prompt_tokens + 12);
    // the same prompt as token ids: the same greedy text
    const b = await c.completions.create({ model: 'model', prompt: tok.json.tokens, max_tokens: 12,
                                           temperature: 0, ignore_eos: true });
    assert.equal(b.choices[0].text, a.choices[0].text);
    // a list: one choice per prompt, in order, each the same as alone
    const l = await c.completions.create({ model: 'model', prompt: ['Hello', 'The quick brown fox'],
                                           max_tokens: 12, temperature: 0, ignore_eos: true });
    assert.deepEqual(l.choices.map((x) => x.index), [0, 1]);
    assert.equal(l.choices[1].text, a.choices[0].text);
    assert.equal(l.usage.completion_tokens, 24);
});

test('completions: seed, top_k, top_p, stop, min_tokens', async (d) => {
    const c = d.client();
    const req = { model: 'model', prompt: 'Once upon a time', max_tokens: 20, temperature: 1.2,
                  top_p: 0.95, top_k: 50, seed: 1234, ignore_eos: true };
    const x = await c.completions.create(req);
    const y = await c.completions.create(req);
    assert.equal(x.choices[0].text, y.choices[0].text, 'the same seed gave different text');
    const texts = new Set();
    for (let s = 0; s < 4; s++)
        texts.add((await c.completions.create({ ...req, seed: s })).choices[0].text);
    assert.ok(texts.size > 1, 'four seeds gave one text');
    // top_k 1 is greedy whatever the temperature
    const g = await c.completions.create({ ...req, temperature: 0, top_p: 1, top_k: -1 });
    const k1 = await c.completions.create({ ...req, top_k: 1, seed: 99 });
    assert.equal(k1.choices[0].text, g.choices[0].text);
    // stop: a string from the middle of the greedy text ends the completion before it
    const full = g.choices[0].text;
    const stop = full.slice(Math.floor(full.length / 2), Math.floor(full.length / 2) + 3);
    const s = await c.completions.create({ ...req, temperature: 0, stop: [stop] });
    assert.equal(s.choices[0].finish_reason, 'stop');
    assert.equal(s.choices[0].text, full.slice(0, full.indexOf(stop)));
    const m = await c.completions.create({ ...req, temperature: 0, ignore_eos: false,
                                           min_tokens: 20 });
    assert.equal(m.usage.completion_tokens, 20);
});

test('completions: logprobs, echo, max_tokens 0, return_tokens_as_token_ids', async (d) => {
    const c = d.client();
    const r = await c.completions.create({ model: 'model', prompt: 'Hello there', max_tokens: 6,
                                           temperature: 0, logprobs: 3, ignore_eos: true });
    const lp = r.choices[0].logprobs;
    assert.equal(lp.tokens.length, 6);
    assert.equal(lp.token_logprobs.length, 6);
    assert.equal(lp.top_logprobs.length, 6);
    for (let i = 0; i < 6; i++) {
        const top = lp.top_logprobs[i];
        assert.ok(Object.keys(top).length >= 1 && Object.keys(top).length <= 3);
        const best = Math.max(...Object.values(top));
        assert.ok(lp.token_logprobs[i] <= 0);
        // greedy: the chosen token is the most likely one
        assert.ok(Math.abs(lp.token_logprobs[i] - best) < 1e-5, `token ${i} not the argmax`);
    }
    assert.equal(lp.tokens.join(''), r.choices[0].text);
    // echo with max_tokens 0: the prompt's tokens, the first without a logprob
    const tok = await d.api('POST', '/tokenize', { model: 'model', prompt: 'Hello there' });
    const e = await c.completions.create({ model: 'model', prompt: 'Hello there', max_tokens: 0,
                                           echo: true, logprobs: 1 });
    assert.equal(e.choices[0].text, 'Hello there');
    assert.equal(e.choices[0].logprobs.token_logprobs.length, tok.json.count);
    assert.equal(e.choices[0].logprobs.token_logprobs[0], null);
    assert.ok(e.choices[0].logprobs.token_logprobs.slice(1).every((v) => v <= 0));
    assert.equal(e.usage.completion_tokens, 0);
    // vLLM's return_tokens_as_token_ids
    const t = await c.completions.create({ model: 'model', prompt: 'Hello there', max_tokens: 4,
                                           temperature: 0, logprobs: 1, ignore_eos: true,
                                           return_tokens_as_token_ids: true });
    for (const s of t.choices[0].logprobs.tokens)
        assert.match(s, /^token_id:\d+$/);
});

test('streaming: completions and chat through the openai client', async (d) => {
    const c = d.client();
    const req = { model: 'model', prompt: 'In the beginning', max_tokens: 24, temperature: 0,
                  ignore_eos: true };
    const whole = await c.completions.create(req);
    let text = '', chunks = 0, usage = null;
    for await (const ch of await c.completions.create({ ...req, stream: true })) {
        text += ch.choices[0]?.text ?? '';
        chunks++;
        if (ch.usage)
            usage = ch.usage;
    }
    assert.equal(text, whole.choices[0].text);
    assert.ok(chunks >= 2, `one chunk for 24 tokens`);
    assert.equal(usage?.completion_tokens, 24);
    // vLLM's return_token_ids: each chunk carries its new ids; together, those of the whole
    const ids = (await d.api('POST', '/v1/completions', { ...req, return_token_ids: true }))
        .json.choices[0].token_ids;
    assert.equal(ids.length, 24);
    let streamed = [];
    await readSSE(await d.stream({ ...req, return_token_ids: true }), (ev) => {
        streamed = streamed.concat(ev.choices[0].token_ids);
    });
    assert.deepEqual(streamed, ids);
    const msgs = [{ role: 'user', content: 'Say something.' }];
    const cw = await c.chat.completions.create({ model: 'model', messages: msgs, max_tokens: 16,
                                                temperature: 0, ignore_eos: true });
    let ct = '', role = null;
    for await (const ch of await c.chat.completions.create({ model: 'model', messages: msgs,
                                                             max_tokens: 16, temperature: 0,
                                                             ignore_eos: true, stream: true })) {
        role ??= ch.choices[0]?.delta?.role ?? null;
        ct += ch.choices[0]?.delta?.content ?? '';
    }
    assert.equal(role, 'assistant');
    assert.equal(ct, cw.choices[0].message.content);
});

test('chat: the prompt is the template rendered by Jinja (@huggingface/jinja)', async (d) => {
    const c = d.client();
    const conversations = [
        [{ role: 'user', content: 'What is a fox?' }],
        [{ role: 'system', content: 'You are terse.' }, { role: 'user', content: 'Hi!' },
         { role: 'assistant', content: 'Hello.' }, { role: 'user', content: 'And now?\n  ok' }],
    ];
    for (const messages of conversations) {
        const text = new Template(CHATML).render({ messages, add_generation_prompt: true,
                                                   bos_token: '', eos_token: '<|endoftext|>' });
        const tok = await d.api('POST', '/tokenize', { model: 'model', prompt: text,
                                                      add_special_tokens: false });
        const r = await c.chat.completions.create({ model: 'model', messages, max_tokens: 3,
                                                   temperature: 0, ignore_eos: true });
        assert.equal(r.object, 'chat.completion');
        assert.equal(r.choices[0].message.role, 'assistant');
        assert.equal(typeof r.choices[0].message.content, 'string');
        assert.equal(r.usage.prompt_tokens, tok.json.count,
                     `chat prompt differs from the Jinja rendering ${JSON.stringify(text)}`);
        // and the continuation is that of the rendered prompt as a plain completion
        const p = await c.completions.create({ model: 'model', prompt: tok.json.tokens,
                                               max_tokens: 3, temperature: 0, ignore_eos: true });
        assert.equal(r.choices[0].message.content, p.choices[0].text);
    }
});

test('tokenize and detokenize', async (d) => {
    const s = 'Fortune favours the bold — 42 times, ünïcödé and 日本 ✓';
    const t = await d.api('POST', '/tokenize', { model: 'model', prompt: s });
    assert.equal(t.status, 200);
    assert.equal(t.json.count, t.json.tokens.length);
    const back = await d.api('POST', '/detokenize', { model: 'model', tokens: t.json.tokens });
    assert.equal(back.status, 200);
    assert.equal(back.json.prompt, s);
    assertError(await d.api('POST', '/detokenize', { model: 'model', tokens: [1, 1e9] }), 400);
    assertError(await d.api('POST', '/tokenize', { model: 'model', prompt: 5 }), 400);
});

/* The log-probabilities a model gives the tokens of a prompt (echo, max_tokens 0). */
async function promptLogprobs(d, body, headers) {
    const r = await d.api('POST', '/v1/completions', { prompt: 'The adapter changes this text',
                                                      max_tokens: 0, echo: true, logprobs: 0,
                                                      ...body }, headers);
    assert.equal(r.status, 200, r.text);
    return r.json.choices[0].logprobs.token_logprobs;
}

test('adapters: upload with curl, use, replace, compose, delete', async (d) => {
    const v1 = makeLora(path.join(TMP, 'lora-v1'), { seed: 1 });
    const v2 = makeLora(path.join(TMP, 'lora-v2'), { seed: 2 });
    const zero = makeLora(path.join(TMP, 'lora-zero'), { seed: 3, scaleB: 0 });
    let r = await d.upload('fox', v1);
    assert.equal(r.status, 201, r.text);
    assert.equal(r.json.id, 'fox');
    r = await d.upload('nop', zero);
    assert.equal(r.status, 201, r.text);
    const g = await d.api('GET', '/v1/adapters/fox');
    assert.equal(g.status, 200);
    assert.equal(g.json.kind, 'lora');
    assert.equal(g.json.rank, 4);
    assert.ok(g.json.bytes > 0);
    const list = await d.api('GET', '/v1/adapters');
    assert.deepEqual(list.json.data.map((a) => a.id).sort(), ['fox', 'nop']);
    const models = (await d.api('GET', '/v1/models')).json.data;
    assert.ok(models.find((m) => m.id === 'fox' && m.kind === 'lora' && m.rank === 4));

    const base = await promptLogprobs(d, { model: 'model' });
    const fox = await promptLogprobs(d, { model: 'fox' });
    assert.ok(!close(base, fox, 1e-3), 'the LoRA changed nothing');
    assert.ok(close(base, await promptLogprobs(d, { model: 'nop' }), 1e-5), 'a zero LoRA changed the output');
    // the X-Adapter header names the adapter too
    assert.ok(close(fox, await promptLogprobs(d, { model: 'model' }, { 'X-Adapter': 'fox' })));
    // composition: fox at weight 1 is fox; at weight 0.5 it is something in between
    assert.ok(close(fox, await promptLogprobs(d, { model: 'model', adapters: [{ name: 'fox', weight: 1 }] })));
    const half = await promptLogprobs(d, { model: 'model', adapters: [{ name: 'fox', weight: 0.5 }] });
    assert.ok(!close(half, fox, 1e-3) && !close(half, base, 1e-3));
    assertError(await d.api('POST', '/v1/completions', { model: 'model', prompt: 'x',
                                                        adapters: [{ name: 'nope' }] }), 404);
    assertError(await d.api('POST', '/v1/completions', { model: 'model', prompt: 'x',
                                                        adapters: [{ name: 'fox', weight: 'a' }] }), 400);

    // replace: 200, and the new weights answer
    r = await d.upload('fox', v2);
    assert.equal(r.status, 200, r.text);
    const fox2 = await promptLogprobs(d, { model: 'fox' });
    assert.ok(!close(fox2, fox, 1e-3), 'the replaced adapter still answers with the old weights');

    // bad uploads change nothing
    const trunc = path.join(TMP, 'lora-trunc');
    fs.mkdirSync(trunc);
    fs.copyFileSync(path.join(v1, 'adapter_config.json'), path.join(trunc, 'adapter_config.json'));
    const w = fs.readFileSync(path.join(v1, 'adapter_model.safetensors'));
    fs.writeFileSync(path.join(trunc, 'adapter_model.safetensors'), w.subarray(0, w.length - 100));
    r = await d.upload('fox', trunc);
    assertError(r, 400, /safetensors|truncat|size|bytes/i);
    const bad = makeLora(path.join(TMP, 'lora-badshape'), { outV: 200 });
    r = await d.upload('fox', bad);
    assertError(r, 400, /v_proj/);
    r = await d.upload('fox', v1, { parts: [`config=@${v1}/adapter_config.json`] });
    assertError(r, 400, /two parts/);
    r = await d.upload('fox', v1, { parts: [`config=@${v1}/adapter_config.json`,
                                            `junk=@${v1}/adapter_config.json`] });
    assertError(r, 400, /junk/);
    r = await d.upload('.hidden', v1);
    assertError(r, 400, /not a valid adapter name/);
    assertError(await d.api('PUT', '/v1/adapters/fox', { x: 1 }), 415);
    // a body cut before its closing boundary: refused, even though both parts began
    const cfg = fs.readFileSync(path.join(v1, 'adapter_config.json'));
    const cut = Buffer.concat([Buffer.from('--XyZ\r\nContent-Disposition: form-data; name="config"; ' +
                                           'filename="adapter_config.json"\r\n\r\n'), cfg,
                               Buffer.from('\r\n--XyZ\r\nContent-Disposition: form-data; ' +
                                           'name="weights"; filename="w.safetensors"\r\n\r\n'),
                               w.subarray(0, 1000)]);
    assertError(await d.api('PUT', '/v1/adapters/fox', cut,
                            { 'Content-Type': 'multipart/form-data; boundary=XyZ' }), 400, /incomplete/);
    r = await d.upload('brandnew', bad);
    assertError(r, 400);
    assertError(await d.api('GET', '/v1/adapters/brandnew'), 404);
    assert.ok(close(fox2, await promptLogprobs(d, { model: 'fox' })), 'a bad upload changed the adapter');
    assert.deepEqual(fs.readdirSync(d.adapters).filter((n) => !n.startsWith('.')).sort(),
                     ['fox', 'nop']);

    // delete: 204, then 404 everywhere
    r = await d.api('DELETE', '/v1/adapters/nop');
    assert.equal(r.status, 204);
    assertError(await d.api('GET', '/v1/adapters/nop'), 404);
    assertError(await d.api('DELETE', '/v1/adapters/nop'), 404);
    assertError(await d.api('POST', '/v1/completions', { model: 'nop', prompt: 'x' }), 404, /nop/);
});

test('adapters: non-finite values, overlapping and unindexed bytes refused (400), registry unchanged', async (d) => {
    const good = makeLora(path.join(TMP, 'lora-finite'), { seed: 11 });
    let r = await d.upload('finite', good);
    assert.equal(r.status, 201, r.text);
    const before = await promptLogprobs(d, { model: 'finite' });
    const refused = async (name, dir, text) => { // 400, its message saying text
        const res = await d.upload(name, dir);
        assertError(res, 400);
        assert.ok(res.json.error.message.includes(text), `'${res.json.error.message}' lacks '${text}'`);
    };
    const A = 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight';
    const B = 'base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight';
    // the same LoRA with a NaN in a factor, and with a lora_alpha whose scale is no float
    const nan = makeLora(path.join(TMP, 'lora-nan'), { seed: 11, nan: true });
    await refused('finite', nan, `tensor '${A}': element 1 is NaN`);
    await refused('finite', makeLora(path.join(TMP, 'lora-alpha'), { seed: 11, alpha: 1e308 }),
                  'the scale lora_alpha / r = 1e+308 / 4 is not finite');
    // the good file's bytes with its header changed: layer 0's q_proj B starts half-way into A;
    // and with 8 bytes more
    const w = fs.readFileSync(path.join(good, 'adapter_model.safetensors'));
    const { header, data } = parseSafetensors(w);
    const [a0, a1] = header[A].data_offsets, [b0, b1] = header[B].data_offsets;
    assert.equal(b0, a1);
    const half = (a1 - a0) / 2;
    header[B].data_offsets = [b0 - half, b1 - half];
    const variant = (name, weights) => {
        const dir = path.join(TMP, name);
        fs.mkdirSync(dir);
        fs.copyFileSync(path.join(good, 'adapter_config.json'), path.join(dir, 'adapter_config.json'));
        fs.writeFileSync(path.join(dir, 'adapter_model.safetensors'), weights);
        return dir;
    };
    await refused('finite', variant('lora-overlap', safetensorsRaw(header, data)),
                  `tensors '${A}' [${a0}, ${a1}] and '${B}' [${b0 - half}, ${b1 - half}] overlap`);
    await refused('finite', variant('lora-trailing', Buffer.concat([w, Buffer.alloc(8)])),
                  `bytes [${data.length}, ${data.length + 8}) of the data are not part of any tensor`);
    await refused('finite-new', nan, 'is NaN'); // nor under a new name
    assertError(await d.api('GET', '/v1/adapters/finite-new'), 404);

    // the first version still answers the same, and is what is on disk
    assert.equal((await d.api('GET', '/v1/adapters/finite')).status, 200);
    assert.ok(close(before, await promptLogprobs(d, { model: 'finite' }), 0), 'a refused upload changed the adapter');
    assert.ok(before.slice(1).every((x) => Number.isFinite(x)), `logprobs: ${before}`);
    assert.ok(!fs.readdirSync(d.adapters).includes('finite-new'));
    assert.ok(fs.readFileSync(path.join(d.adapters, 'finite', 'adapter_model.safetensors')).equals(w));
    assert.equal((await d.api('DELETE', '/v1/adapters/finite')).status, 204);
});

test('uploads racing deletes of the same name: each answered, the store consistent', async (d) => {
    const dir = makeLora(path.join(TMP, 'lora-race'), { seed: 31 });
    const statuses = new Set();
    for (let i = 0; i < 12; i++) {
        const [put, del] = await Promise.all([
            d.upload('race', dir),
            sleep(i % 4).then(() => d.api('DELETE', '/v1/adapters/race')),
        ]);
        assert.ok([200, 201].includes(put.status), `PUT: ${put.status} ${put.text}`);
        assert.ok([204, 404].includes(del.status), `DELETE: ${del.status} ${del.text}`);
        statuses.add(`${put.status}/${del.status}`);
        const g = await d.api('GET', '/v1/adapters/race');
        const onDisk = fs.existsSync(path.join(d.adapters, 'race', 'adapter_config.json'));
        assert.equal(g.status === 200, onDisk, `registry says ${g.status}, disk says ${onDisk}`);
        if (g.status === 200) // usable whenever it is listed
            assert.equal((await d.api('POST', '/v1/completions', { model: 'race', prompt: 'x',
                                                                   max_tokens: 1 })).status, 200);
    }
    await d.api('DELETE', '/v1/adapters/race');
    const leftovers = fs.readdirSync(d.adapters).filter((n) => n.startsWith('.'));
    assert.deepEqual(leftovers, [], 'staging or trash directories left behind');
    console.log(`    (PUT/DELETE outcomes seen: ${[...statuses].join(', ')})`);
});

test('adapters: vLLM load_lora_adapter / unload_lora_adapter', async (d) => {
    const dir = makeLora(path.join(TMP, 'lora-vllm'), { seed: 7 });
    let r = await d.api('POST', '/v1/load_lora_adapter', { lora_name: 'vl', lora_path: dir });
    assert.equal(r.status, 200, r.text);
    assert.ok((await d.api('GET', '/v1/models')).json.data.find((m) => m.id === 'vl'));
    const out = await promptLogprobs(d, { model: 'vl' });
    assert.equal(out.length > 1, true);
    assertError(await d.api('POST', '/v1/load_lora_adapter', { lora_name: 'x',
                                                              lora_path: '/nonexistent' }), 400);
    assertError(await d.api('POST', '/v1/load_lora_adapter', { lora_name: 'x' }), 400);
    r = await d.api('POST', '/v1/unload_lora_adapter', { lora_name: 'vl' });
    assert.equal(r.status, 200, r.text);
    assert.ok(!(await d.api('GET', '/v1/models')).json.data.find((m) => m.id === 'vl'));
    assertError(await d.api('POST', '/v1/unload_lora_adapter', { lora_name: 'vl' }), 404);
});

test('errors: malformed, wrong types, unknown, too long, wrong route', async (d) => {
    const post = (body) => d.api('POST', '/v1/completions', body);
    assertError(await post('{"model": "model", "prompt": '), 400, /JSON/);
    assertError(await post('[1, 2]'), 400);
    assertError(await post({ model: 'model', prompt: 'x', max_tokens: 'ten' }), 400, /max_tokens/);
    assertError(await post({ model: 'model', prompt: 'x', temperature: -1 }), 400, /temperature/);
    assertError(await post({ model: 'model', prompt: 'x', top_p: 2 }), 400, /top_p/);
    assertError(await post({ model: 'model', prompt: 'x', stop: 7 }), 400, /stop/);
    assertError(await post({ model: 'model', prompt: [] }), 400);
    assertError(await post({ model: 'model', prompt: [1, 'a'] }), 400);
    assertError(await post({ model: 'model', prompt: [100000] }), 400);
    assertError(await post({ model: 'model' }), 400, /prompt/);
    // fields that would change the output are refused, not ignored; neutral values pass
    assertError(await post({ model: 'model', prompt: 'x', presence_penalty: 0.5 }), 400,
                /presence_penalty/);
    assertError(await post({ model: 'model', prompt: 'x', logit_bias: { 5: 10 } }), 400, /logit_bias/);
    assertError(await post({ model: 'model', prompt: 'x', n: 3 }), 400, /n = 1/);
    assert.equal((await post({ model: 'model', prompt: 'x', max_tokens: 1, presence_penalty: 0,
                               logit_bias: {}, n: 1, best_of: 1 })).status, 200);
    assertError(await post({ model: 'no-such-adapter', prompt: 'x' }), 404, /no-such-adapter/);
    const long = Array.from({ length: CTX + 10 }, (_, i) => (i % 200) + 10);
    assertError(await post({ model: 'model', prompt: long }), 400, new RegExp(String(CTX)));
    assertError(await post({ model: 'model', prompt: 'x', max_tokens: CTX * 2 }), 400,
                new RegExp(String(CTX)));
    // no max_tokens: the default (256), or what the context leaves when that is less
    const near = Array.from({ length: CTX - 100 }, (_, i) => (i % 200) + 10);
    for (const body of [{ prompt: near }, { prompt: near, max_tokens: null }]) {
        const r = await post({ model: 'model', ...body, ignore_eos: true });
        assert.equal(r.status, 200, r.text);
        assert.equal(r.json.usage.completion_tokens, 100);
        assert.equal(r.json.choices[0].finish_reason, 'length');
    }
    assertError(await post({ model: 'model', prompt: near, max_tokens: 101 }), 400,
                new RegExp(String(CTX)));
    assertError(await d.api('POST', '/v1/chat/completions', { model: 'model', messages: 'hi' }), 400,
                /messages/);
    assertError(await d.api('POST', '/v1/chat/completions',
                            { model: 'model', messages: [{ role: 'user' }] }), 400);
    assertError(await d.api('GET', '/v1/nothing'), 404);
    assertError(await d.api('DELETE', '/v1/completions'), 404);
    // the openai client surfaces them as APIError with the status
    await assert.rejects(d.client().completions.create({ model: 'nope', prompt: 'x' }),
                         (e) => e.status === 404);
});

test('errors: oversized body (413)', async () => {
    const s = await new Daemon(['--set', 'max_body_kb=4', '--set', 'max_upload_mb=1']).ready();
    try {
        const big = { model: 'model', prompt: 'x'.repeat(8000) };
        assertError(await s.api('POST', '/v1/completions', big), 413);
        const dir = path.join(TMP, 'lora-big');
        makeLora(dir, { r: 64 }); // ~2 MB of weights
        assertError(await s.upload('big', dir), 413);
        assert.deepEqual(fs.readdirSync(s.adapters).filter((n) => !n.startsWith('.')), []);
        assert.equal((await s.api('POST', '/v1/completions', { model: 'model', prompt: 'x',
                                                                max_tokens: 1 })).status, 200);
    } finally {
        await s.stop();
    }
});

test('every adapter kind in one batch: each request gets what it gets alone', async (d) => {
    const kinds = {
        'k-lora': makeLora(path.join(TMP, 'k-lora'), { seed: 21 }),
        'k-ia3': makeIA3(path.join(TMP, 'k-ia3'), { seed: 22 }),
        'k-prompt': makePrompt(path.join(TMP, 'k-prompt'), { seed: 23 }),
        'k-prefix': makePrefix(path.join(TMP, 'k-prefix'), { seed: 24 }),
        'k-bias': makeBitfit(path.join(TMP, 'k-bias'), { seed: 25 }),
        'k-lora2': makeLora(path.join(TMP, 'k-lora2'), { seed: 26 }),
    };
    for (const [name, dir] of Object.entries(kinds)) {
        const r = await d.upload(name, dir);
        assert.equal(r.status, 201, `${name}: ${r.text}`);
    }
    const kindOf = Object.fromEntries((await d.api('GET', '/v1/adapters')).json.data
        .map((a) => [a.id, a.kind]));
    assert.deepEqual(['k-lora', 'k-ia3', 'k-prompt', 'k-prefix', 'k-bias'].map((n) => kindOf[n]),
                     ['lora', 'ia3', 'prompt', 'prefix', 'bias']);
    const variants = [{ model: 'model' }, ...Object.keys(kinds).map((m) => ({ model: m })),
                      { model: 'model', adapters: [{ name: 'k-lora', weight: 0.6 },
                                                   { name: 'k-lora2', weight: 0.4 }] }];
    const one = (v, i) => d.api('POST', '/v1/completions', {
        ...v, prompt: `Request number ${i} asks`, max_tokens: 16, temperature: 0, ignore_eos: true,
        logprobs: 1, return_tokens_as_token_ids: true,
    }).then((r) => {
        assert.equal(r.status, 200, r.text);
        return r.json.choices[0].logprobs;
    });
    const steps0 = await d.metric('adapterd_engine_steps_total');
    const alone = [];
    for (let i = 0; i < variants.length; i++)
        alone.push(await one(variants[i], i));
    const steps1 = await d.metric('adapterd_engine_steps_total');
    const outputs = new Set(alone.map((a) => a.tokens.join(',') + a.token_logprobs
        .map((x) => x.toFixed(3)).join(',')));
    assert.equal(outputs.size, variants.length, 'an adapter does not change the output');
    const together = await Promise.all(variants.map((v, i) => one(v, i)));
    const steps2 = await d.metric('adapterd_engine_steps_total');
    let worst = 0;
    for (let i = 0; i < variants.length; i++) {
        assert.deepEqual(together[i].tokens, alone[i].tokens, `${JSON.stringify(variants[i])}`);
        for (let t = 0; t < alone[i].token_logprobs.length; t++)
            worst = Math.max(worst, Math.abs(together[i].token_logprobs[t] - alone[i].token_logprobs[t]));
    }
    assert.ok(worst <= 1e-4, `logprobs differ by ${worst} in a batch`);
    // they really shared steps: far fewer forward passes than one request at a time
    assert.ok(steps2 - steps0 - (steps1 - steps0) < 0.5 * (steps1 - steps0),
              `batched ${steps2 - steps1} steps vs ${steps1 - steps0} alone`);
    console.log(`    (${variants.length} requests: ${steps1 - steps0} steps alone, ${steps2 - steps1} together; max |diff| ${worst.toExponential(1)})`);
    for (const name of Object.keys(kinds))
        assert.equal((await d.api('DELETE', `/v1/adapters/${name}`)).status, 204);
});

test('prefix cache: a prompt seen before computes only its new blocks, same output', async (d) => {
    const lora = makeLora(path.join(TMP, 'pc-lora'), { seed: 31 });
    assert.equal((await d.upload('pc-lora', lora)).status, 201);
    const prompt = 'A prompt long enough to fill a few blocks of the KV cache: ' +
        Array.from({ length: 40 }, (_, i) => `word${(i * 7) % 13}`).join(' ');
    const ask = (daemon, model) => daemon.api('POST', '/v1/completions', {
        model, prompt, max_tokens: 10, temperature: 0, ignore_eos: true, logprobs: 1,
        return_tokens_as_token_ids: true,
    }).then((r) => {
        assert.equal(r.status, 200, r.text);
        return r.json;
    });
    const hits0 = await d.metric('adapterd_prefix_cache_hits_total');
    const first = await ask(d, 'model');
    const n = first.usage.prompt_tokens;
    assert.ok(n > 40, `${n} prompt tokens`);
    const whole = Math.floor((n - 1) / 16) * 16; // the daemon's blocks are 16 tokens
    assert.equal(first.usage.prompt_tokens_details.cached_tokens, 0);
    const again = await ask(d, 'model');
    assert.equal(again.usage.prompt_tokens_details.cached_tokens, whole);
    // another adapter's K/V differ: nothing found, then its own
    const l1 = await ask(d, 'pc-lora');
    assert.equal(l1.usage.prompt_tokens_details.cached_tokens, 0);
    const l2 = await ask(d, 'pc-lora');
    assert.equal(l2.usage.prompt_tokens_details.cached_tokens, whole);
    assert.equal(await d.metric('adapterd_prefix_cache_hits_total') - hits0, 2 * whole);
    // the same answers from a daemon without the cache
    const s = await new Daemon(['--set', 'prefix_cache=0']).ready();
    try {
        assert.equal((await s.upload('pc-lora', lora)).status, 201);
        for (const [model, cached, uncached] of [['model', again, first], ['pc-lora', l2, l1]]) {
            const ref = await ask(s, model);
            assert.equal(ref.usage.prompt_tokens_details.cached_tokens, 0);
            for (const got of [cached, uncached]) {
                const [a, b] = [got.choices[0].logprobs, ref.choices[0].logprobs];
                assert.deepEqual(a.tokens, b.tokens, model);
                assert.ok(close(a.token_logprobs, b.token_logprobs), `${model}: logprobs differ`);
            }
        }
        assert.notDeepEqual(l1.choices[0].logprobs.tokens, first.choices[0].logprobs.tokens);
    } finally {
        await s.stop();
    }
    assert.equal((await d.api('DELETE', '/v1/adapters/pc-lora')).status, 204);
});

test('lora_dtype = int8: the same upload in a quarter of the F32 bytes, answers close to exact', async (d) => {
    const lora = makeLora(path.join(TMP, 'i8-lora'), { seed: 41 });
    const prompt = 'Eight bits per factor';
    const ask = (daemon, model = 'i8-lora') => daemon.api('POST', '/v1/completions', {
        model, prompt, max_tokens: 0, echo: true, logprobs: 1,
    }).then((r) => {
        assert.equal(r.status, 200, r.text);
        return r.json.choices[0].logprobs.token_logprobs.slice(1); // the first token has none
    });
    const bytes = async (daemon) => (await daemon.api('GET', '/v1/models')).json.data
        .find((m) => m.id === 'i8-lora').bytes;
    assert.equal((await d.upload('i8-lora', lora)).status, 201);
    const exact = await ask(d), exactBytes = await bytes(d);
    const s = await new Daemon(['--set', 'lora_dtype=int8']).ready();
    try {
        assert.equal((await s.upload('i8-lora', lora)).status, 201);
        const got = await ask(s), got8 = await bytes(s);
        // A [4, 64] and B [64 or 32, 4] as bytes instead of floats, plus 8 scales per site
        assert.ok(got8 < exactBytes / 3 && got8 > exactBytes / 5, `${got8} vs ${exactBytes}`);
        // near the exact answers, next to how far the adapter moves them from the base's
        const base = await ask(s, 'model');
        assert.equal(got.length, exact.length);
        const dist = (a, b) => Math.max(...a.map((v, i) => Math.abs(v - b[i])));
        const off = dist(got, exact), moved = dist(exact, base);
        assert.ok(off > 1e-5 && off < 0.1 * moved, `int8 ${off} from exact, LoRA moves ${moved}`);
    } finally {
        await s.stop();
    }
    // a value that is not a choice stops the daemon at startup, naming the choices
    const bad = spawnSync(ADAPTERD, ['--model', MODEL, '--set', 'lora_dtype=int4',
                                     '--dump-config'], { encoding: 'utf8' });
    assert.notEqual(bad.status, 0);
    assert.match(bad.stderr, /lora_dtype: 'int4' is not one of: auto int8/);
    assert.equal((await d.api('DELETE', '/v1/adapters/i8-lora')).status, 204);
});

test('a full queue: 429 with Retry-After, and the queued requests still complete', async () => {
    const s = await new Daemon(['--set', 'max_seqs=1', '--set', 'max_queue=1']).ready();
    try {
        const body = { model: 'model', prompt: 'Busy', max_tokens: 120, ignore_eos: true };
        const first = s.api('POST', '/v1/completions', body); // runs
        await sleep(100);
        const rs = await Promise.all([first, ...Array.from({ length: 4 },
                                                           () => s.api('POST', '/v1/completions', body))]);
        const refused = rs.filter((r) => r.status === 429);
        assert.ok(refused.length >= 1 && refused.length <= 3, rs.map((r) => r.status).join(' '));
        for (const r of refused) {
            assertError(r, 429, /queue is full/);
            assert.equal(r.json.error.type, 'rate_limit_error');
            assert.equal(r.headers.get('retry-after'), '1');
        }
        for (const r of rs.filter((x) => x.status !== 429)) {
            assert.equal(r.status, 200, r.text);
            assert.equal(r.json.usage.completion_tokens, 120);
        }
    } finally {
        await s.stop();
    }
});

test('replacing an adapter while requests stream from it', async (d) => {
    const v1 = makeLora(path.join(TMP, 'lora-r1'), { seed: 11 });
    const v2 = makeLora(path.join(TMP, 'lora-r2'), { seed: 12 });
    assert.equal((await d.upload('live', v1)).status, 201);
    const req = { model: 'live', prompt: 'Streaming while replaced', max_tokens: 300,
                  temperature: 0, ignore_eos: true };
    const expect1 = (await d.api('POST', '/v1/completions', req)).json.choices[0].text;
    let uploaded = null, text = '', chunks = 0, chunksAfter = 0;
    const resp = await d.stream(req);
    await readSSE(resp, async (ev) => {
        text += ev.choices[0].text;
        chunks++;
        if (uploaded)
            chunksAfter++;
        if (chunks === 2)
            uploaded = await d.upload('live', v2); // the stream waits meanwhile
    });
    assert.equal(uploaded?.status, 200, uploaded?.text);
    assert.equal(text, expect1, 'the stream did not finish on the version it started with');
    const after = (await d.api('POST', '/v1/completions', req)).json.choices[0].text;
    assert.notEqual(after, expect1, 'a new request did not get the new version');
    console.log(`    (${chunksAfter} of ${chunks} chunks arrived after the replacement)`);
    assert.ok(chunksAfter > 0, 'the upload did not overlap the stream');
});

test('a client that disconnects mid-stream: cancelled, KV blocks freed', async (d) => {
    const used0 = await d.metric('adapterd_kv_blocks{state="used"}');
    assert.equal(used0, 0);
    const ac = new AbortController();
    const resp = await d.stream({ model: 'model', prompt: 'Going away', max_tokens: 400,
                                  ignore_eos: true }, ac.signal);
    let n = 0;
    try {
        await readSSE(resp, () => {
            if (++n === 3)
                ac.abort();
        });
    } catch (e) {
        assert.equal(e.name, 'AbortError');
    }
    let used = -1, running = -1;
    for (let i = 0; i < 100 && (used !== 0 || running !== 0); i++) {
        await sleep(50);
        used = await d.metric('adapterd_kv_blocks{state="used"}');
        running = await d.metric('adapterd_running_sequences');
    }
    assert.equal(used, 0, 'KV blocks of a gone client are still in use');
    assert.equal(running, 0);
    await sleep(200);
    const m = /(req-\d+) \S+ status=200 adapter=- tokens=(\d+) time=\S+ \(client gone\)/.exec(d.log);
    assert.ok(m, 'the access log does not show the disconnect');
    assert.ok(Number(m[2]) < 400, `the gone client's request generated all ${m[2]} tokens`);
});

test('metrics and access log', async (d) => {
    const r = await d.api('GET', '/metrics');
    assert.equal(r.status, 200);
    assert.match(r.headers.get('content-type'), /text\/plain/);
    for (const name of ['adapterd_requests_total{code="2xx"}', 'adapterd_generated_tokens_total',
                        'adapterd_prompt_tokens_total', 'adapterd_request_duration_seconds_count',
                        'adapterd_queue_depth', 'adapterd_kv_blocks{state="total"}',
                        'adapterd_adapter_resident_bytes', 'adapterd_adapter_requests_total{adapter="fox"}',
                        'adapterd_adapter_tokens_total{adapter="fox"}'])
        assert.ok((await d.metric(name)) !== undefined, `metric ${name} missing`);
    assert.ok((await d.metric('adapterd_requests_total{code="4xx"}')) > 0);
    assert.ok((await d.metric('adapterd_adapter_resident_bytes')) > 0);
    assert.match(d.log, /req-\d+ 127\.0\.0\.1 status=404 adapter=- tokens=0 time=/);
    assert.match(d.log, /req-\d+ 127\.0\.0\.1 status=200 adapter=fox tokens=\d+ time=/);
    assert.ok(r.headers.get('x-request-id') === null || /^req-/.test(r.headers.get('x-request-id')));
});

test('API keys: 401 without, 403 for admin routes with the user key', async () => {
    const user = 'user-key-0123456789abcdef', admin = 'admin-key-0123456789abcdef';
    fs.writeFileSync(path.join(TMP, 'api.key'), user + '\n');
    fs.writeFileSync(path.join(TMP, 'admin.key'), admin + '\n');
    const s = await new Daemon(['--set', `api_key_file=${path.join(TMP, 'api.key')}`,
                                '--set', `admin_key_file=${path.join(TMP, 'admin.key')}`]).ready();
    try {
        const dir = makeLora(path.join(TMP, 'lora-keys'), { seed: 5 });
        assert.equal((await s.api('GET', '/health')).status, 200);
        assertError(await s.api('GET', '/v1/models'), 401);
        assertError(await s.api('GET', '/v1/models', undefined, { Authorization: 'Bearer wrong' }), 401);
        await assert.rejects(s.client('wrong').models.list(), (e) => e.status === 401);
        assert.ok((await s.client(user).models.list()).data.length >= 1);
        assertError(await s.upload('k', dir, { key: user }), 403);
        assertError(await s.upload('k', dir), 401);
        assert.deepEqual(fs.readdirSync(s.adapters).filter((n) => !n.startsWith('.')), []);
        assert.equal((await s.upload('k', dir, { key: admin })).status, 201);
        const r = await s.client(user).completions.create({ model: 'k', prompt: 'x', max_tokens: 2 });
        assert.equal(r.choices.length, 1);
        assertError(await s.api('DELETE', '/v1/adapters/k', undefined,
                                { Authorization: `Bearer ${user}` }), 403);
        assert.equal((await s.api('DELETE', '/v1/adapters/k', undefined,
                                  { Authorization: `Bearer ${admin}` })).status, 204);
    } finally {
        await s.stop();
    }
});

test('adapters directory: a directory dropped in appears; SIGHUP reloads', async () => {
    const conf = path.join(TMP, 'hup.conf');
    fs.writeFileSync(conf, 'log_level = info\n');
    const s = await new Daemon(['-c', conf]).ready();
    try {
        // dropped in: written next to the store, then renamed in (what a deploy tool does)
        const staged = makeLora(path.join(path.dirname(s.adapters), 'drop-staged'), { seed: 9 });
        fs.renameSync(staged, path.join(s.adapters, 'dropped'));
        let seen = false;
        for (let i = 0; i < 100 && !seen; i++) {
            await sleep(50);
            seen = !!(await s.api('GET', '/v1/models')).json.data.find((m) => m.id === 'dropped');
        }
        assert.ok(seen, 'a directory dropped into the adapters dir did not appear');
        // removed behind its back: gone at SIGHUP
        fs.rmSync(path.join(s.adapters, 'dropped'), { recursive: true });
        s.proc.kill('SIGHUP');
        await sleep(500);
        assertError(await s.api('GET', '/v1/adapters/dropped'), 404);
        // an invalid config: kept the running one, still serving
        fs.writeFileSync(conf, 'log_level = info\nno_such_option = 1\n');
        s.proc.kill('SIGHUP');
        await sleep(300);
        assert.match(s.log, /no_such_option.*keeping the running configuration/);
        assert.equal((await s.api('GET', '/health')).status, 200);
        // a valid one: applied (debug logging shows the rescan)
        fs.writeFileSync(conf, 'log_level = debug\n');
        s.proc.kill('SIGHUP');
        await sleep(300);
        assert.match(s.log, /adapters directory scanned/);
    } finally {
        await s.stop();
    }
});

test('SIGTERM: a request in flight finishes within the grace period, exit 0', async () => {
    const s = await new Daemon(['--set', 'shutdown_grace_s=20']).ready();
    const resp = await s.stream({ model: 'model', prompt: 'Last words', max_tokens: 200,
                                  ignore_eos: true });
    let n = 0, last = null;
    await readSSE(resp, (ev) => {
        if (++n === 2)
            s.proc.kill('SIGTERM');
        last = ev;
    });
    assert.equal(last.choices[0].finish_reason, 'length');
    assert.equal(last.usage.completion_tokens, 200);
    await s.stop();
    assert.match(s.log, /SIGTERM: stopping/);
    // new connections are refused once it stopped
    await assert.rejects(fetch(`${s.base}/health`));
});

test('SIGTERM: past the grace period the request is cancelled, exit 0', async () => {
    const s = await new Daemon(['--set', 'shutdown_grace_s=0']).ready();
    const resp = await s.stream({ model: 'model', prompt: 'Cut short', max_tokens: 480,
                                  ignore_eos: true });
    let n = 0, last = null;
    await readSSE(resp, (ev) => {
        if (++n === 2)
            s.proc.kill('SIGTERM');
        last = ev;
    }).catch(() => { /* the connection may be cut */ });
    const t0 = Date.now();
    await s.stop();
    assert.ok(Date.now() - t0 < 10000);
    assert.ok(n >= 2 && last);
    assert.notEqual(last.usage?.completion_tokens, 480,
                    'the request ran to its end although the grace period was 0');
});

test('SIGTERM twice: the second ends the grace period at once, still exit 0', async () => {
    const s = await new Daemon(['--set', 'shutdown_grace_s=60']).ready();
    const resp = await s.stream({ model: 'model', prompt: 'Hurry', max_tokens: 480,
                                  ignore_eos: true });
    let n = 0, last = null;
    const t0 = Date.now();
    await readSSE(resp, (ev) => {
        if (++n === 2) {
            s.proc.kill('SIGTERM');
            setTimeout(() => s.proc.kill('SIGTERM'), 300);
        }
        last = ev;
    }).catch(() => { /* the connection may be cut */ });
    await s.stop();
    assert.ok(Date.now() - t0 < 20000, 'the second SIGTERM did not cut the 60 s grace period');
    assert.ok(n >= 2 && last);
    assert.notEqual(last.usage?.completion_tokens, 480, 'the request ran to its end');
});

/* ------------------------------------------------------------------------------------------ */

async function main() {
    makeModel();
    const d = await new Daemon().ready();
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
    console.log(`integration: ${passed} passed, ${failed} failed`);
    process.exit(failed ? 1 : 0);
}

main().catch((e) => {
    console.error(`FAIL: ${e.stack}`);
    process.exit(1);
});

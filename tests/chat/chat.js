#!/usr/bin/env node
/* Chat suite: adapterd's chat templates (src/model/chat.c) against Hugging Face's own Jinja
 * implementation, @huggingface/jinja (pinned in tests/integration/package-lock.json).
 *
 *   node chat.js --chat-render PATH [--only NAME]
 *
 * Every real template in templates/ (copied from the models' tokenizer_config.json, source in
 * each file) is rendered for every conversation below, with add_generation_prompt = true (as
 * served) and = false (as training data is), with the bos/eos tokens of the same
 * tokenizer_config, by the reference and by ad_chat_render() (through chat-render.c, linked
 * against libadapterd). A rendering must be byte-identical; where the reference raises
 * (raise_exception: roles not alternating, a system role the template refuses) adapterd must
 * refuse too; a template marked "unsupported" must be refused as not supported.
 *
 * ad_chat_segments() is checked the same way: the reference renders, for each assistant message
 * k, the first k messages with add_generation_prompt = true (p) and the first k + 1 without (q)
 * and takes the turn as q less p, in bytes, when p begins q and q the whole rendering; adapterd
 * must give exactly those turns, or refuse as it (-ENOTSUP) where they do not nest. A template
 * whose fixture names a "generation_prompt_always" prints that text whatever
 * add_generation_prompt says (Llama 3's first revision): q ends before it.
 *
 * Three things the reference does differently from Python's Jinja, which transformers uses and
 * the models were trained with, are corrected here, in the reference, so that the comparison is
 * with what the model expects:
 *   - @huggingface/jinja ignores the argument of strip/lstrip/rstrip ('x'.strip('\n') strips
 *     every space, Python only the newlines: Qwen3's template relies on it),
 *   - its trim uses JavaScript's set of spaces (U+FEFF yes, U+001C-U+001F and U+0085 no), Python
 *     str.strip() its own, and
 *   - its == and != are JavaScript's loose ones: '' != false is false there, true in Python
 *     (Llama 2's template prints an empty system prompt's <<SYS>> block because of it).
 * Every rendering the reference makes (the prefixes for the segments too) is also made by
 * Python's jinja2 (Debian python3-jinja2; the test fails without it) with the settings of
 * transformers, and must agree: the corrections above are checked, not assumed.
 *
 * Content given as a list of {"type": "text"} parts goes to the reference as the list itself
 * when the template iterates over it (Gemma 3), and otherwise joined with "\n": adapterd, like
 * vLLM, flattens the parts for a template that expects a string. */
'use strict';

const assert = require('assert/strict');
const fs = require('fs');
const path = require('path');
const Module = require('module');
const { spawnSync } = require('child_process');

const HERE = __dirname;
const args = process.argv.slice(2);
const opt = (name) => {
    const i = args.indexOf(name);
    return i >= 0 ? args[i + 1] : undefined;
};
const RENDER = opt('--chat-render');
const ONLY = opt('--only');
if (!RENDER) {
    console.error('usage: chat.js --chat-render PATH [--only NAME]');
    process.exit(2);
}

/* ------------------------------------------------------------------------------------------
 * The reference, from tests/integration's pinned packages (npm ci there on first use). */

const INTEG = path.join(HERE, '..', 'integration');
const JINJA_DIR = path.join(INTEG, 'node_modules', '@huggingface', 'jinja');
if (!fs.existsSync(path.join(JINJA_DIR, 'package.json'))) {
    console.log('chat: tests/integration/node_modules missing, running npm ci');
    const r = spawnSync('npm', ['ci', '--no-audit', '--no-fund', '--loglevel=error'],
                        { cwd: INTEG, stdio: 'inherit' });
    if (r.status !== 0) {
        console.error('FAIL: npm ci failed: @huggingface/jinja cannot be installed');
        process.exit(1);
    }
}

/* Python's str.isspace() characters, and str.strip(chars). */
const PY_SPACE = new Set([0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x1c, 0x1d, 0x1e, 0x1f, 0x20, 0x85, 0xa0,
    0x1680, 0x2000, 0x2001, 0x2002, 0x2003, 0x2004, 0x2005, 0x2006, 0x2007, 0x2008, 0x2009,
    0x200a, 0x2028, 0x2029, 0x202f, 0x205f, 0x3000]);
function pyStrip(s, chars, left, right) {
    const cps = Array.from(s);
    const strip = chars === undefined || chars === null
        ? (c) => PY_SPACE.has(c.codePointAt(0)) : (c) => chars.includes(c);
    let a = 0, b = cps.length;
    while (left && a < b && strip(cps[a])) a++;
    while (right && b > a && strip(cps[b - 1])) b--;
    return cps.slice(a, b).join('');
}
/* Python's ==: a string equals only a string ('' == false is false, as Python has it; JavaScript's
 * loose == says true), numbers and booleans compare as numbers. */
global.__adapterd_pyeq = (a, b) => {
    const num = (v) => typeof v === 'number' || typeof v === 'boolean';
    if (num(a) && num(b)) return Number(a) === Number(b);
    if (typeof a === 'string' || typeof b === 'string') return a === b;
    return a == b;
};
global.__adapterd_pystrip = (s, argv, left, right) => {
    const c = argv && argv.length ? argv[0].value : undefined;
    return pyStrip(s, c, left, right);
};

/* Loads @huggingface/jinja with strip/lstrip/rstrip/trim replaced by Python's (see the top). */
function loadJinja(corrected) {
    const file = path.join(JINJA_DIR, 'dist', 'index.cjs');
    let src = fs.readFileSync(file, 'utf8');
    if (corrected) {
        const edits = [
            ['"strip",\n      new FunctionValue(() => {\n        return new StringValue(this.value.trim());',
             '"strip",\n      new FunctionValue((args) => {\n        return new StringValue(__adapterd_pystrip(this.value, args, true, true));'],
            ['"rstrip",\n      new FunctionValue(() => {\n        return new StringValue(this.value.trimEnd());',
             '"rstrip",\n      new FunctionValue((args) => {\n        return new StringValue(__adapterd_pystrip(this.value, args, false, true));'],
            ['"lstrip",\n      new FunctionValue(() => {\n        return new StringValue(this.value.trimStart());',
             '"lstrip",\n      new FunctionValue((args) => {\n        return new StringValue(__adapterd_pystrip(this.value, args, true, false));'],
            ['case "trim":\n            return new StringValue(operand.value.trim());',
             'case "trim":\n            return new StringValue(__adapterd_pystrip(operand.value, [], true, true));'],
            ['case "==":\n        return new BooleanValue(left.value == right.value);',
             'case "==":\n        return new BooleanValue(__adapterd_pyeq(left.value, right.value));'],
            ['case "!=":\n        return new BooleanValue(left.value != right.value);',
             'case "!=":\n        return new BooleanValue(!__adapterd_pyeq(left.value, right.value));'],
        ];
        for (const [from, to] of edits) {
            if (src.split(from).length !== 2) {
                console.error(`FAIL: @huggingface/jinja changed: cannot correct '${from.split('\n')[0]}'`);
                process.exit(1);
            }
            src = src.replace(from, to);
        }
    }
    const m = new Module(file, module);
    m.filename = file;
    m.paths = Module._nodeModulePaths(path.dirname(file));
    m._compile(src, file);
    return m.exports;
}
const { Template } = loadJinja(true);
const { Template: TemplateAsIs } = loadJinja(false);

/* ------------------------------------------------------------------------------------------
 * Conversations */

const sys = (content) => ({ role: 'system', content });
const user = (content) => ({ role: 'user', content });
const asst = (content) => ({ role: 'assistant', content });
const parts = (...texts) => texts.map((text) => ({ type: 'text', text }));

const CONVERSATIONS = {
    'one user message': [user('Hello')],
    'system and user': [sys('You are terse.'), user('Hello')],
    'multi-turn, user last': [sys('You are terse.'), user('Hello'), asst('Hi there'),
        user('Who are you?')],
    'multi-turn without system': [user('Hello'), asst('Hi there'), user('Who are you?'),
        asst('An assistant.'), user('Another question')],
    'assistant last': [user('Hello'), asst('Hi there')],
    'system, assistant last': [sys('Be brief.'), user('Hello'), asst('Hi there'),
        user('More?'), asst('No.')],
    'empty contents': [sys(''), user(''), asst(''), user('')],
    'empty user, no system': [user('')],
    'spaces and newlines': [sys('  Be brief.\n\n'), user('\n  two lines\nhere  \n'),
        asst('  spaced answer  '), user('\t tab \t')],
    'newlines at the edges, assistant last': [user('\n\nquestion\n\n'),
        asst('\n\nanswer\n\n')],
    'unicode': [sys('Réponds en français — 简体中文 ✓'), user('Grüß dich 👋🏽 e\u0301'),
        asst('\u00a0\u3000全角\u3000\u00a0'), user('\u2028line\u2029 end')],
    'unicode spaces Python and JavaScript disagree on': [user('\u0085 nel \u0085'),
        asst('\u001c\u001f x \u001f'), user('\ufeff bom \ufeff')],
    'template syntax in content': [user("{{ bos_token }} {% if %} ' \" \\ \\n"),
        asst('{# not a comment #}'), user('[INST] <<SYS>> <|im_start|> <start_of_turn>')],
    'content as text parts': [sys(parts('Be ', 'brief.')), user(parts(' part one ', 'part two')),
        asst(parts('ok')), user(parts())],
    'text parts, no system': [user(parts('a', ' b ')), asst('c'), user(parts(' d'))],
    'roles not alternating': [user('a'), user('b')],
    'assistant first': [asst('a'), user('b')],
    'system later': [user('a'), asst('b'), sys('late system'), user('c')],
    'two system messages': [sys('one'), sys('two'), user('hi')],
    'system only': [sys('just a system prompt')],
    'reasoning in assistant turns': [user('Hi'), asst('<think>\nhmm\n</think>\n\nHello!'),
        user('And?'), asst('<think>\n again \n</think>\n\n  More.')],
    'reasoning, user last': [sys('s'), user('Hi'), asst('<think>x</think>Hello'), user('Bye')],
    'tool response as user text': [user('q'), asst('a'),
        user('<tool_response>r</tool_response>'), asst('<think>t</think>\n\ndone')],
    /* training data: conversations that end with the assistant's turn */
    'training: one turn': [user('What is 2 + 2?'), asst('4')],
    'training: system, one turn': [sys('Answer with one word.'), user('Sky colour?'),
        asst('Blue.')],
    'training: system, three turns': [sys('You are a pirate.'), user('Hello'),
        asst('Ahoy, matey!'), user('Where is the treasure?'), asst('  Buried, of course.  '),
        user('Where?'), asst('\nOn the island.\n')],
    'training: three turns, no system': [user('a'), asst('b'), user('c'), asst('d'), user('e'),
        asst('f')],
    'training: text parts': [sys(parts('Be ', 'kind.')), user(parts('q1', 'q2')),
        asst(parts('a1', ' a2 '))],
    'training: unicode': [user('¿Qué tal? 👋'), asst('Très bien — 很好 ✓')],
    'training: empty answer': [user('Say nothing.'), asst('')],
    'training: reasoning, one turn': [user('Think first.'),
        asst('<think>\nsteps\n</think>\n\nDone.')],
    'training: two assistant turns in a row': [user('a'), asst('b'), asst('c')],
    'training: template syntax in the answer': [user('x'), asst('{{ eos_token }}<|im_end|></s>')],
};

/* ------------------------------------------------------------------------------------------
 * Cases */

const templates = fs.readdirSync(path.join(HERE, 'templates')).filter((f) => f.endsWith('.json'))
    .sort().map((f) => ({ name: f.replace(/\.json$/, ''),
                          ...JSON.parse(fs.readFileSync(path.join(HERE, 'templates', f), 'utf8')) }));
assert.ok(templates.length > 0);

const flatten = (messages) => messages.map((m) => Array.isArray(m.content)
    ? { ...m, content: m.content.map((p) => p.text).join('\n') } : m);
/* A template takes list content if it tests for it ("is iterable", "is string"). */
const takesLists = (t) => /content'?\]? is iterable/.test(t.chat_template);

function context(t, messages, agp) {
    const c = { messages, add_generation_prompt: agp };
    if (t.bos_token !== null && t.bos_token !== undefined) c.bos_token = t.bos_token;
    if (t.eos_token !== null && t.eos_token !== undefined) c.eos_token = t.eos_token;
    return c;
}
/* Every rendering of the reference, by (template, messages, add_generation_prompt), so that each
 * is made once and all of them are checked against Python below. */
const renders = new Map();
function renderRef(t, messages, agp) {
    const key = JSON.stringify([t.name, messages, agp]);
    let r = renders.get(key);
    if (!r) {
        const one = (T) => {
            try {
                return { text: new T(t.chat_template).render(context(t, messages, agp)) };
            } catch (e) {
                return { error: String(e.message || e) };
            }
        };
        r = { t, messages, agp, ref: one(Template), asIs: one(TemplateAsIs) };
        renders.set(key, r);
    }
    return r.ref;
}

/* The turns as ad_chat_segments() must find them (see the top), or the error code it must give. */
function segmentsRef(t, messages) {
    const whole = renderRef(t, messages, false);
    if ('error' in whole) return { code: -22, why: whole.error };
    const turns = [];
    let end = 0;
    for (let k = 0; k < messages.length; k++) {
        if (messages[k].role !== 'assistant') continue;
        if (k === 0) return { code: -95, why: 'an assistant message first' };
        const p = renderRef(t, messages.slice(0, k), true);
        if ('error' in p) return { code: -22, why: p.error };
        const pb = Buffer.byteLength(p.text);
        if (!whole.text.startsWith(p.text) || pb < end)
            return { code: -95, why: `messages[${k}]: p does not begin the whole rendering` };
        const q = renderRef(t, messages.slice(0, k + 1), false);
        if ('error' in q) return { code: -22, why: q.error };
        let qt = q.text;
        if (t.generation_prompt_always) {
            assert.ok(qt.endsWith(t.generation_prompt_always), `${t.name}: no generation prompt`);
            qt = qt.slice(0, qt.length - t.generation_prompt_always.length);
        }
        if (!whole.text.startsWith(qt) || qt.length < p.text.length)
            return { code: -95, why: `messages[${k}]: q does not begin the whole rendering` };
        end = Buffer.byteLength(qt);
        turns.push([k, pb, end]);
    }
    return { text: whole.text, turns };
}

const cases = [];
for (const t of templates) {
    if (ONLY && !t.name.includes(ONLY)) continue;
    for (const [conv, messages] of Object.entries(CONVERSATIONS)) {
        const refMessages = takesLists(t) ? messages : flatten(messages);
        for (const agp of [true, false]) {
            const c = { template: t, conv: `${conv} (add_generation_prompt = ${agp})`, messages,
                        agp };
            if (t.expect === 'supported') {
                renderRef(t, refMessages, agp);
                c.render = renders.get(JSON.stringify([t.name, refMessages, agp]));
                c.ref = c.render.ref;
            }
            cases.push(c);
        }
        const c = { template: t, conv: `${conv} (segments)`, messages, segments: true };
        if (t.expect === 'supported') c.seg = segmentsRef(t, refMessages);
        cases.push(c);
    }
}

/* Python's jinja2 with transformers' settings: every rendering of the reference, in one
 * process. */
const PY = `
import json, sys
from jinja2.ext import loopcontrols
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
def raise_exception(message):
    raise TemplateError(message)
env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
env.globals["raise_exception"] = raise_exception
env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False)
out = []
for c in json.load(sys.stdin):
    try:
        out.append({"text": env.from_string(c["template"]).render(**c["context"])})
    except Exception as e:
        out.append({"error": str(e)})
json.dump(out, sys.stdout)
`;
const allRenders = [...renders.values()];
{
    const r = spawnSync('/usr/bin/python3', ['-c', PY], {
        input: JSON.stringify(allRenders.map((x) => ({
            template: x.t.chat_template, context: context(x.t, x.messages, x.agp) }))),
        maxBuffer: 1 << 28, encoding: 'utf8' });
    if (r.status === 0) {
        JSON.parse(r.stdout).forEach((py, i) => { allRenders[i].py = py; });
    } else { /* the patched builtins above are only trusted because Python agrees */
        console.log('FAIL: Python jinja2 (Debian python3-jinja2) cannot run the cross-check' +
                    (r.stderr ? ` (${r.stderr.trim().split('\n').pop()})` : ''));
        process.exit(1);
    }
}

/* Requests adapterd refuses whatever the template: the code ad_chat_render() must return. */
const SMOL = templates.find((t) => t.name === 'smollm2-instruct');
const REFUSALS = [
    ['no messages', [], -22],
    ['a role other than system, user, assistant', [{ role: 'tool', content: 'x' }], -22],
    ['content neither a string nor a list', [{ role: 'user', content: 42 }], -22],
    ['content missing', [{ role: 'user' }], -22],
    ['a part that is not text', [user([{ type: 'image_url', image_url: { url: 'x' } }])], -95],
    ['a text part without text', [user([{ type: 'text' }])], -22],
    ['tool calls', [user('a'), { role: 'assistant', content: '',
                                  tool_calls: [{ id: 'c', type: 'function' }] }], -95],
];
if (!ONLY || SMOL.name.includes(ONLY))
    for (const [conv, messages, code] of REFUSALS)
        cases.push({ template: SMOL, conv, messages, refusal: code });

/* adapterd: all cases in one run of chat-render. */
const input = cases.map((c) => ({ template: c.template.chat_template, bos_token: c.template.bos_token,
                                  eos_token: c.template.eos_token, messages: c.messages,
                                  add_generation_prompt: c.agp !== false,
                                  segments: !!c.segments }));
const r = spawnSync(RENDER, [], { input: JSON.stringify(input), maxBuffer: 1 << 28, encoding: 'utf8' });
if (r.status !== 0) {
    console.error(`FAIL: chat-render exited with ${r.status}: ${r.stderr}`);
    process.exit(1);
}
const got = JSON.parse(r.stdout);
assert.equal(got.length, cases.length);

/* ------------------------------------------------------------------------------------------
 * Comparison */

const show = (s) => JSON.stringify(s);
let passed = 0, failed = 0, divergent = 0, pyChecked = 0;
const perTemplate = new Map();
const fail = (label, why) => {
    failed++;
    console.log(`FAIL ${label}: ${why}`);
};
/* The reference against Python, rendering by rendering (each counts once). */
for (const x of allRenders) {
    const same = ('error' in x.py) === ('error' in x.ref) &&
                 ('error' in x.py || x.py.text === x.ref.text);
    pyChecked++;
    if (!same)
        fail(`${x.t.name} / ${show(x.messages)} (add_generation_prompt = ${x.agp})`,
             `the corrected reference ${show(x.ref)} and Python jinja2 ${show(x.py)} disagree`);
    if (JSON.stringify(x.ref) !== JSON.stringify(x.asIs)) divergent++;
}
cases.forEach((c, i) => {
    const a = got[i], t = c.template;
    const label = `${t.name} / ${c.conv}`;
    let why = null;
    if (c.refusal) {
        if (!('error' in a) || a.code !== c.refusal)
            why = `expected a refusal with ${c.refusal}, got ${show(a)}`;
    } else if (t.expect === 'unsupported') {
        if (!('error' in a) || a.code !== -95 || !/not supported/.test(a.error))
            why = `expected a refusal as not supported (-ENOTSUP), got ${show(a)}`;
    } else if (c.segments) {
        const r = c.seg;
        if ('code' in r) {
            if (!('error' in a) || a.code !== r.code ||
                (r.code === -95 && !/cannot mark assistant turns/.test(a.error)))
                why = `expected a refusal with ${r.code} (${r.why}), got ${show(a)}`;
        } else if ('error' in a) {
            why = `adapterd refused (${a.error}) but the reference marks ${show(r.turns)}`;
        } else if (a.text !== r.text || JSON.stringify(a.turns) !== JSON.stringify(r.turns)) {
            why = `differs:\n      reference ${show(r.turns)} of ${show(r.text)}\n      ` +
                  `adapterd  ${show(a.turns)} of ${show(a.text)}`;
        }
    } else if ('error' in c.ref) {
        if (!('error' in a) || a.code !== -22)
            why = `the reference raises (${c.ref.error}) but adapterd gave ${show(a)}`;
    } else if ('error' in a) {
        why = `adapterd refused (${a.error}) but the reference renders ${show(c.ref.text)}`;
    } else if (a.text !== c.ref.text) {
        why = `differs:\n      reference ${show(c.ref.text)}\n      adapterd  ${show(a.text)}`;
    }
    const s = perTemplate.get(t.name) || { ok: 0, n: 0 };
    s.n++;
    if (why) {
        fail(label, why);
    } else {
        passed++;
        s.ok++;
    }
    perTemplate.set(t.name, s);
});
for (const [name, s] of perTemplate)
    console.log(`${s.ok === s.n ? 'ok  ' : 'FAIL'} ${name}: ${s.ok}/${s.n}`);
console.log(`chat: ${pyChecked} reference renderings checked against Python jinja2, ${divergent} ` +
            `of them where unmodified @huggingface/jinja differs from Python's strip/trim/== ` +
            `(adapterd follows Python)`);
console.log(`chat: ${passed} of ${cases.length} cases pass, ${failed} fail`);
process.exit(failed ? 1 : 0);

/* The client suites' way of running adapterctl (client.js, train.js): its path from the command
 * line, the environment it gets, a run's status and output, runs that must succeed or fail with
 * the server's message, and what its tables look like. Every run must leave stderr free of
 * sanitizer reports. */
'use strict';

const { assert, fs, spawn, spawnSync, sleep } = require('../integration/lib.js');

const args = process.argv.slice(2);
const ADAPTERCTL = args[args.indexOf('--adapterctl') + 1];
if (!args.includes('--adapterctl') || !fs.existsSync(ADAPTERCTL)) {
    console.error(`usage: ${require('path').basename(process.argv[1])} --adapterd PATH ` +
                  '--mkmodel PATH --bpe-train PATH --adapterctl PATH');
    process.exit(2);
}
const SANITIZER = /AddressSanitizer|LeakSanitizer|runtime error:|UndefinedBehaviorSanitizer/;

/* ------------------------------------------------------------------------------------------
 * Running adapterctl */

/* Environment for a run: nothing inherited that would change adapterctl's choices. */
function envFor(extra) {
    const env = { ...process.env, ...extra };
    for (const k of ['ADAPTERD_URL', 'ADAPTERD_API_KEY'])
        if (!(k in extra))
            delete env[k];
    return env;
}

/* Runs adapterctl; resolves {status, signal, stdout, stderr}. opts.url sets ADAPTERD_URL. */
function ctl(argv, { url, env = {}, input } = {}) {
    const e = envFor(url ? { ADAPTERD_URL: url, ...env } : env);
    return new Promise((resolve, reject) => {
        const p = spawn(ADAPTERCTL, argv, { env: e });
        const out = [], err = [];
        p.stdout.on('data', (d) => out.push(d));
        p.stderr.on('data', (d) => err.push(d));
        p.on('error', reject);
        p.on('close', (status, signal) => {
            const r = { status, signal, stdout: Buffer.concat(out).toString(),
                        stderr: Buffer.concat(err).toString() };
            if (SANITIZER.test(r.stderr))
                reject(new Error(`sanitizer report from adapterctl ${argv.join(' ')}:\n${r.stderr}`));
            else
                resolve(r);
        });
        p.stdin.on('error', () => {}); /* EPIPE: it exited before reading (a usage error) */
        p.stdin.end(input ?? '');
    });
}

/* A run that must succeed: its stdout. */
async function ok(argv, opts) {
    const r = await ctl(argv, opts);
    assert.equal(r.status, 0, `adapterctl ${argv.join(' ')} exited ${r.status}: ${r.stderr}`);
    return r.stdout;
}

/* A run that must fail with status (1: the server refused): stderr must carry the server's
 * message and status, as the same request sent directly got them. */
async function fails(argv, opts, { status = 1, server } = {}) {
    const r = await ctl(argv, opts);
    assert.equal(r.status, status, `adapterctl ${argv.join(' ')}: status ${r.status}, stderr: ${r.stderr}`);
    assert.equal(r.stdout, '', 'a failure printed on stdout');
    assert.ok(r.stderr.length > 0, 'a failure without a message');
    if (server) {
        assert.ok(server.json && server.json.error, `the direct request did not fail: ${server.text}`);
        assert.ok(r.stderr.includes(server.json.error.message),
                  `stderr lacks the server's message '${server.json.error.message}': ${r.stderr}`);
        assert.ok(r.stderr.includes(`HTTP ${server.status}`), `stderr lacks the status: ${r.stderr}`);
    }
    return r.stderr;
}

/* Starts adapterctl in the background: {proc, out, err (what it has printed so far), exited
 * (resolves {code, sig})}. */
function start(argv, { url } = {}) {
    const proc = spawn(ADAPTERCTL, argv, { env: envFor(url ? { ADAPTERD_URL: url } : {}) });
    const run = { proc, out: '', err: '' };
    proc.stdout.on('data', (x) => { run.out += x; });
    proc.stderr.on('data', (x) => { run.err += x; });
    run.exited = new Promise((res) => proc.on('close', (code, sig) => res({ code, sig })));
    return run;
}

/* Until the started run has printed what `re` matches on stdout (at most ms). */
async function printed(run, re, ms = 60000) {
    for (const t0 = Date.now(); !re.test(run.out); await sleep(10))
        if (Date.now() - t0 > ms)
            throw new Error(`adapterctl printed no ${re} within ${ms} ms: ${run.out}${run.err}`);
}

/* SIGINT to a started run: it must exit 130 within a second, with no sanitizer report. */
async function interrupt(run) {
    const t0 = Date.now();
    run.proc.kill('SIGINT');
    const r = await Promise.race([run.exited, sleep(5000).then(() => null)]);
    if (!r)
        run.proc.kill('SIGKILL');
    assert.ok(r, 'adapterctl did not exit within 5 s of SIGINT');
    assert.equal(r.code, 130, `exit ${r.code ?? r.sig}: ${run.err}`);
    assert.ok(Date.now() - t0 < 1000, `exit took ${Date.now() - t0} ms`);
    assert.ok(!SANITIZER.test(run.err), run.err);
}

/* Runs adapterctl on a terminal (script(1)'s pseudo-terminal: stdout and stderr both go to it):
 * {status, out}, out with the terminal's "\r\n" line ends. */
function onTerminal(argv, { url, env = {} } = {}) {
    const q = (s) => `'${s.replace(/'/g, "'\\''")}'`;
    const r = spawnSync('script', ['-qec', [ADAPTERCTL, ...argv].map(q).join(' '), '/dev/null'],
                        { encoding: 'utf8', env: envFor(url ? { ADAPTERD_URL: url, ...env } : env) });
    assert.ok(!SANITIZER.test(r.stdout), r.stdout);
    return { status: r.status, out: r.stdout + r.stderr };
}

/* ------------------------------------------------------------------------------------------
 * Expectations computed here */

/* 1024-based with one decimal, as adapterctl(1) describes SIZE. */
function human(b) {
    if (b < 1024)
        return `${b} B`;
    const units = ['KiB', 'MiB', 'GiB', 'TiB'];
    let u = -1;
    while (b >= 1024 && u < 3) {
        b /= 1024;
        u++;
    }
    return `${b.toFixed(1)} ${units[u]}`;
}

/* A table printed with columns apart by two spaces or more: [{HEAD: cell}]. */
function table(text) {
    const lines = text.trimEnd().split('\n');
    const head = lines[0].split(/ {2,}/);
    return lines.slice(1).map((l) => Object.fromEntries(l.split(/ {2,}/).map((c, i) => [head[i], c])));
}

module.exports = {
    ADAPTERCTL, SANITIZER, envFor, ctl, ok, fails, start, printed, interrupt, onTerminal, human, table,
};

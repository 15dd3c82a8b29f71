/* adapterd's dashboard: the page at GET /, talking to the daemon's own API.
 *
 * Sections, top to bottom: helpers (DOM, formatting), the API (keys asked for on 401 and 403,
 * errors carrying the server's message, server-sent events read from fetch), charts (inline
 * SVG), serving (/metrics polled every 2 s), models and adapters (table, upload, delete), the
 * playground (one prompt streamed from up to four adapters), fine-tuning (files, jobs, the
 * live loss curve of one job's event stream), and the start-up. */
'use strict';

(() => {

/* ==========================================================================================
 * Helpers */

const $ = (sel, root = document) => root.querySelector(sel);

/* An element: h('td', {class: 'num', text: '3'}, child...). on* props are listeners. */
function h(tag, props = {}, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(props)) {
        if (v === undefined || v === null || v === false)
            continue;
        if (k === 'class')
            e.className = v;
        else if (k === 'text')
            e.textContent = v;
        else if (k.startsWith('on'))
            e.addEventListener(k.slice(2), v);
        else
            e.setAttribute(k, v === true ? '' : v);
    }
    for (const c of children.flat())
        if (c !== null && c !== undefined && c !== false)
            e.append(c instanceof Node ? c : String(c));
    return e;
}

const SVG_NS = 'http://www.w3.org/2000/svg';
function svgEl(tag, attrs = {}, text) {
    const e = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs))
        e.setAttribute(k, v);
    if (text !== undefined)
        e.textContent = text;
    return e;
}

function fmtBytes(n) {
    if (n === null || n === undefined || !Number.isFinite(n))
        return '–';
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) {
        n /= 1024;
        i++;
    }
    return `${i && n < 10 ? n.toFixed(1) : Math.round(n)} ${units[i]}`;
}

const fmtInt = (n) => (n === null || n === undefined || !Number.isFinite(n) ? '–'
    : Math.round(n).toLocaleString('en-US'));

/* A rate or gauge with about three significant digits. */
function fmtNum(x) {
    if (x === null || x === undefined || !Number.isFinite(x))
        return '–';
    const a = Math.abs(x);
    if (a >= 1e6)
        return `${(x / 1e6).toFixed(a >= 1e7 ? 0 : 1)}M`;
    if (a >= 1e4)
        return `${(x / 1e3).toFixed(a >= 1e5 ? 0 : 1)}k`;
    if (a >= 100 || Number.isInteger(x))
        return x.toFixed(0);
    return x.toFixed(a >= 10 ? 1 : 2);
}

const fmtLoss = (x) => (Number.isFinite(x) ? x.toFixed(4) : '–');

function fmtClock(unix) {
    const d = new Date(unix * 1000);
    return d.toTimeString().slice(0, 8);
}

function fmtAgo(unix) {
    if (!unix)
        return '–';
    const s = Math.max(0, Date.now() / 1000 - unix);
    if (s < 60)
        return `${Math.round(s)} s ago`;
    if (s < 3600)
        return `${Math.round(s / 60)} min ago`;
    if (s < 86400)
        return `${Math.round(s / 3600)} h ago`;
    return new Date(unix * 1000).toISOString().slice(0, 10);
}

/* A message at the bottom right: errors stay 10 s, others 4 s; a click closes it. */
function toast(what, message, kind = 'err') {
    const t = h('div', { class: `toast ${kind}`, role: kind === 'err' ? 'alert' : 'status' },
                h('div', { class: 'what', text: what }), message ? h('div', { text: message }) : null);
    t.addEventListener('click', () => t.remove());
    $('#toasts').append(t);
    setTimeout(() => t.remove(), kind === 'err' ? 10000 : 4000);
}

function setStatus(node, text, kind = '') {
    node.textContent = text;
    node.className = `status-line ${kind}`;
}

/* ==========================================================================================
 * The API: keys, errors, server-sent events */

/* The keys live in this tab only (sessionStorage): 'api' for every route, 'admin' for uploads,
 * deletes, files and jobs. */
const keys = {
    get(kind) {
        try {
            return sessionStorage.getItem(`adapterd.${kind}Key`) || '';
        } catch {
            return '';
        }
    },
    set(kind, value) {
        try {
            if (value)
                sessionStorage.setItem(`adapterd.${kind}Key`, value);
            else
                sessionStorage.removeItem(`adapterd.${kind}Key`);
        } catch { /* storage disabled: the key is asked again */ }
        updateKeyButton();
    },
};

/* An error answer: the HTTP status and the server's message ({"error": {"message"}}). */
class ApiError extends Error {
    constructor(status, message, type) {
        super(message);
        this.status = status;
        this.type = type;
    }
}

async function apiError(r) {
    const text = await r.text().catch(() => '');
    let message = text.trim() || `HTTP ${r.status}`, type;
    try {
        const j = JSON.parse(text);
        if (j && j.error && j.error.message) {
            message = j.error.message;
            type = j.error.type;
        }
    } catch { /* not JSON: the text as it is */ }
    return new ApiError(r.status, message, type);
}

/* Which keys a prompt was cancelled for: background polls do not ask again (a banner does). */
const declined = { api: false, admin: false };
let prompting = null; /* {kind, promise} of the dialog on screen */

/* Shows the key dialog; resolves to the key entered, or null when cancelled. Concurrent asks
 * for the same kind share one dialog. */
function askKey(kind, reason) {
    if (prompting)
        return prompting.kind === kind ? prompting.promise
            : prompting.promise.then(() => askKey(kind, reason));
    const dlg = $('#key-dialog'), input = $('#key-input');
    $('#key-title').textContent = kind === 'admin' ? 'Admin key' : 'API key';
    $('#key-message').textContent = reason;
    input.value = '';
    const promise = new Promise((resolve) => {
        dlg.addEventListener('close', () => {
            prompting = null;
            const v = input.value.trim();
            if (dlg.returnValue === 'ok' && v) {
                declined[kind] = false;
                keys.set(kind, v);
                hideAuthBanner();
                resolve(v);
            } else {
                declined[kind] = true;
                resolve(null);
            }
        }, { once: true });
    });
    prompting = { kind, promise };
    dlg.returnValue = '';
    dlg.showModal();
    input.focus();
    return promise;
}

function showAuthBanner(kind) {
    $('#auth-banner-text').textContent = kind === 'admin'
        ? 'This action needs the admin key.' : 'This server needs an API key: nothing can be shown without one.';
    $('#auth-banner').hidden = false;
    $('#auth-banner').dataset.kind = kind;
}

function hideAuthBanner() {
    $('#auth-banner').hidden = true;
}

/* Sends a request built by send(headers) with the key its route needs. A 401 asks for the API
 * key (or the admin key again if that was refused), a 403 for the admin key, and the request
 * is sent again with it; a cancelled prompt leaves the refusal as the answer. Background
 * requests (polls) never ask for the admin key, and ask for the API key only until a prompt
 * is cancelled. Returns the last Response. */
async function call(send, { admin = false, background = false } = {}) {
    for (let tries = 0; ; tries++) {
        const headers = {};
        const adminKey = keys.get('admin'), apiKey = keys.get('api');
        const key = admin ? adminKey || apiKey : apiKey || adminKey;
        if (key)
            headers.Authorization = `Bearer ${key}`;
        const r = await send(headers);
        if ((r.status !== 401 && r.status !== 403) || tries >= 4)
            return r;
        const want = r.status === 403 || (admin && adminKey) ? 'admin' : 'api';
        if (background && (want === 'admin' || declined.api)) {
            if (want === 'api')
                showAuthBanner('api');
            return r;
        }
        const said = (await apiError(r.clone())).message;
        const reason = want === 'admin'
            ? (r.status === 401 ? `The admin key was refused (${said}).`
                                : `This action needs the admin key (the server said: ${said}).`)
            : key ? `The key was refused (${said}).`
                  : `This server needs an API key (the server said: ${said}).`;
        if (!(await askKey(want, reason)))
            return r;
    }
}

/* One XMLHttpRequest as a Response (fetch reports no upload progress). */
function xhrSend(method, path, body, headers, onProgress) {
    return new Promise((resolve, reject) => {
        const x = new XMLHttpRequest();
        x.open(method, path);
        for (const [k, v] of Object.entries(headers))
            x.setRequestHeader(k, v);
        x.upload.addEventListener('progress', (e) => {
            if (e.lengthComputable)
                onProgress(e.loaded / e.total);
        });
        x.addEventListener('load', () => {
            const empty = x.status === 204 || x.status === 304;
            resolve(new Response(empty ? null : x.responseText, {
                status: x.status,
                headers: { 'Content-Type': x.getResponseHeader('Content-Type') || 'text/plain' },
            }));
        });
        x.addEventListener('error', () => reject(new TypeError('the connection to the server failed')));
        x.addEventListener('abort', () => reject(new DOMException('aborted', 'AbortError')));
        x.send(body);
    });
}

/* A request to the API; resolves to the Response of a 2xx answer, else throws ApiError with
 * the server's message. opts: body (JSON), form (FormData), admin, background, signal,
 * onProgress (0..1, sends with XMLHttpRequest). */
async function api(method, path, opts = {}) {
    const { body, form, admin = false, background = false, signal, onProgress } = opts;
    let r;
    try {
        r = await call((headers) => {
            if (onProgress)
                return xhrSend(method, path, form, headers, onProgress);
            /* a poll that hangs must not stop the next ones */
            const init = { method, headers, cache: 'no-store',
                           signal: signal || (background ? AbortSignal.timeout(15000) : undefined) };
            if (body !== undefined) {
                headers['Content-Type'] = 'application/json';
                init.body = JSON.stringify(body);
            } else if (form) {
                init.body = form;
            }
            return fetch(path, init);
        }, { admin, background });
    } catch (e) {
        if (e.name === 'AbortError')
            throw e;
        throw new ApiError(0, `cannot reach the server (${e.message})`);
    }
    if (!r.ok)
        throw await apiError(r);
    hideAuthBanner();
    return r;
}

const getJSON = async (path, opts) => (await api('GET', path, opts)).json();

/* Reads server-sent events from a Response: onEvent(json) for each `data:` line until
 * `data: [DONE]` (resolves true) or the end of the stream (false). */
async function readSSE(r, onEvent) {
    const reader = r.body.getReader(), dec = new TextDecoder();
    let buf = '';
    for (;;) {
        const { value, done } = await reader.read();
        if (done)
            return false;
        buf += dec.decode(value, { stream: true }).replace(/\r\n/g, '\n');
        let i;
        while ((i = buf.indexOf('\n\n')) >= 0) {
            const block = buf.slice(0, i);
            buf = buf.slice(i + 2);
            const data = block.split('\n').filter((l) => l.startsWith('data:'))
                .map((l) => l.slice(l[5] === ' ' ? 6 : 5)).join('\n');
            if (!data)
                continue;
            if (data === '[DONE]') {
                reader.cancel().catch(() => {});
                return true;
            }
            onEvent(JSON.parse(data));
        }
    }
}

/* ==========================================================================================
 * Charts: inline SVG, redrawn whole */

function niceStep(span, n) {
    const raw = span / n, p = 10 ** Math.floor(Math.log10(raw)), f = raw / p;
    return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 2.5 ? 2.5 : f <= 5 ? 5 : 10) * p;
}

/* Draws series [{cls, label, points: [[x, y]...], area, markers}] into svg over x0..x1;
 * y from y0 (or the data's minimum with fit) to y1 (or the data's maximum). xTicks:
 * [[x, label]...]. A null y breaks a line. Hovering shows the values at the nearest x. */
function drawChart(svg, { series, x0, x1, y0 = 0, y1, fit = false, integer = false, xTicks = [],
                          yFmt = fmtNum, xFmt = String, empty = 'no data yet' }) {
    const box = svg.getBoundingClientRect();
    const W = Math.max(box.width, 120), H = Math.max(box.height, 60);
    const padL = 46, padR = 10, padT = 8, padB = 18;
    svg.setAttribute('viewBox', `0 0 ${W} ${H}`);
    svg.replaceChildren();
    const ys = series.flatMap((s) => s.points.map((p) => p[1])).filter(Number.isFinite);
    let lo = fit && ys.length ? Math.min(...ys) : y0;
    let hi = y1 !== undefined ? y1 : ys.length ? Math.max(...ys) : 1;
    if (!(hi > lo))
        hi = lo + (fit ? Math.abs(lo) * 0.1 || 1 : 1);
    const step = integer ? Math.max(1, niceStep(hi - lo, 4)) : niceStep(hi - lo, 4);
    lo = Math.floor(lo / step + 1e-9) * step;
    hi = Math.max(Math.ceil(hi / step - 1e-9) * step, lo + step);
    if (!(x1 > x0))
        x1 = x0 + 1;
    const X = (x) => padL + ((x - x0) / (x1 - x0)) * (W - padL - padR);
    const Y = (y) => padT + (1 - (y - lo) / (hi - lo)) * (H - padT - padB);
    for (let v = lo; v <= hi + step / 2; v += step) {
        svg.append(svgEl('line', { class: 'gridline', x1: padL, x2: W - padR, y1: Y(v), y2: Y(v) }));
        svg.append(svgEl('text', { class: 'axis', x: padL - 6, y: Y(v) + 3.5, 'text-anchor': 'end' },
                         yFmt(Math.abs(v) < step / 1e6 ? 0 : v)));
    }
    for (const [x, label] of xTicks)
        svg.append(svgEl('text', { class: 'axis', x: X(x), y: H - 4, 'text-anchor': 'middle' }, label));
    for (const s of series) {
        const runs = [[]];
        for (const [x, y] of s.points) {
            if (Number.isFinite(y))
                runs[runs.length - 1].push([x, y]);
            else if (runs[runs.length - 1].length)
                runs.push([]);
        }
        for (const run of runs.filter((r) => r.length)) {
            const pts = run.map(([x, y]) => `${X(x).toFixed(1)},${Y(y).toFixed(1)}`).join(' ');
            if (s.area && run.length > 1)
                svg.append(svgEl('polygon', {
                    class: `area ${s.cls}`,
                    points: `${X(run[0][0]).toFixed(1)},${Y(lo)} ${pts} ${X(run[run.length - 1][0]).toFixed(1)},${Y(lo)}`,
                }));
            svg.append(svgEl('polyline', { class: `line ${s.cls}`, points: pts, 'data-series': s.label }));
            if (s.markers)
                for (const [x, y] of run)
                    svg.append(svgEl('circle', { class: `marker ${s.cls}`, cx: X(x), cy: Y(y), r: 3, 'data-series': s.label }));
        }
    }
    if (!ys.length)
        svg.append(svgEl('text', { class: 'empty', x: (padL + W - padR) / 2, y: H / 2, 'text-anchor': 'middle' }, empty));
    svg.chart = { series, X, Y, x0, x1, padL, padR, padT, padB, W, H, yFmt, xFmt };
}

/* The nearest point of each series to the pointer, as a cursor line and a label. */
function chartHover(svg) {
    svg.addEventListener('mousemove', (e) => {
        const c = svg.chart;
        svg.querySelector('.hover')?.remove();
        if (!c)
            return;
        const box = svg.getBoundingClientRect();
        const px = ((e.clientX - box.left) / box.width) * c.W;
        if (px < c.padL || px > c.W - c.padR)
            return;
        const x = c.x0 + ((px - c.padL) / (c.W - c.padL - c.padR)) * (c.x1 - c.x0);
        const lines = [];
        let at = null;
        for (const s of c.series) {
            let best = null;
            for (const p of s.points)
                if (Number.isFinite(p[1]) && (!best || Math.abs(p[0] - x) < Math.abs(best[0] - x)))
                    best = p;
            if (best) {
                at ??= best[0];
                lines.push(`${s.label} ${c.yFmt(best[1])}`);
            }
        }
        if (at === null)
            return;
        const g = svgEl('g', { class: 'hover' });
        const cx = c.X(at);
        g.append(svgEl('line', { class: 'cursor', x1: cx, x2: cx, y1: c.padT, y2: c.H - c.padB }));
        const text = [c.xFmt(at), ...lines];
        const tw = Math.max(...text.map((t) => t.length)) * 6.6 + 12, th = text.length * 14 + 8;
        const tx = cx + 8 + tw > c.W - c.padR ? cx - 8 - tw : cx + 8;
        g.append(svgEl('rect', { class: 'tip-bg', x: tx, y: c.padT, width: tw, height: th, rx: 4 }));
        text.forEach((t, i) => g.append(svgEl('text', { class: 'tip', x: tx + 6, y: c.padT + 16 + i * 14 }, t)));
        svg.append(g);
    });
    svg.addEventListener('mouseleave', () => svg.querySelector('.hover')?.remove());
}

/* ==========================================================================================
 * Serving: /metrics every 2 s */

const WINDOW_S = 300;
const state = {
    base: null,          /* the base model's entry of /v1/models */
    adapters: [],        /* the others, sorted by name */
    samples: [],         /* parsed /metrics over the last WINDOW_S seconds */
    jobs: [],
    jobsState: 'unknown', /* 'ok', 'disabled' (no state_dir), 'forbidden' (needs the admin key) */
};

/* Prometheus text to [{name, labels, value}]. */
function parseMetrics(text) {
    const out = [];
    for (const line of text.split('\n')) {
        if (!line || line[0] === '#')
            continue;
        const m = /^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
        if (!m)
            continue;
        const labels = {};
        for (const l of (m[2] || '').matchAll(/([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"/g))
            labels[l[1]] = l[2].replace(/\\(.)/g, (_, ch) => (ch === 'n' ? '\n' : ch));
        out.push({ name: m[1], labels, value: m[3] === '+Inf' ? Infinity : Number(m[3]) });
    }
    return out;
}

function sampleOf(ms) {
    const sum = (name, pred = () => true) => {
        let v = null;
        for (const x of ms)
            if (x.name === name && pred(x.labels))
                v = (v || 0) + x.value;
        return v;
    };
    const perAdapter = new Map();
    for (const x of ms) {
        if (x.name !== 'adapterd_adapter_requests_total' && x.name !== 'adapterd_adapter_tokens_total')
            continue;
        const a = perAdapter.get(x.labels.adapter) || { requests: 0, tokens: 0 };
        a[x.name === 'adapterd_adapter_requests_total' ? 'requests' : 'tokens'] = x.value;
        perAdapter.set(x.labels.adapter, a);
    }
    const buckets = ms.filter((x) => x.name === 'adapterd_request_duration_seconds_bucket')
        .map((x) => [x.labels.le === '+Inf' ? Infinity : Number(x.labels.le), x.value]);
    return {
        t: Date.now() / 1000,
        requests: sum('adapterd_requests_total'),
        errors: sum('adapterd_requests_total', (l) => l.code === '4xx' || l.code === '5xx'),
        completions: sum('adapterd_completions_total'),
        generated: sum('adapterd_generated_tokens_total'),
        prompt: sum('adapterd_prompt_tokens_total'),
        queue: sum('adapterd_queue_depth'),
        running: sum('adapterd_running_sequences'),
        kvUsed: sum('adapterd_kv_blocks', (l) => l.state === 'used'),
        kvTotal: sum('adapterd_kv_blocks', (l) => l.state === 'total'),
        kvCached: sum('adapterd_kv_blocks_cached'),
        preemptions: sum('adapterd_preemptions_total'),
        prefixQueries: sum('adapterd_prefix_cache_queries_total'),
        prefixHits: sum('adapterd_prefix_cache_hits_total'),
        resident: sum('adapterd_adapter_resident_bytes'),
        jobsRunning: sum('adapterd_finetune_jobs', (l) => l.status === 'running'),
        jobsQueued: sum('adapterd_finetune_jobs', (l) => l.status === 'queued'),
        trainTps: sum('adapterd_finetune_tokens_per_second'),
        trainLoss: sum('adapterd_finetune_loss'),
        buckets,
        perAdapter,
    };
}

/* Per-second rates of a counter between consecutive samples (null across a restart). */
function rates(samples, key) {
    const out = [];
    for (let i = 1; i < samples.length; i++) {
        const a = samples[i - 1], b = samples[i], dt = b.t - a.t;
        const d = b[key] !== null && a[key] !== null ? b[key] - a[key] : null;
        out.push([b.t, d !== null && d >= 0 && dt > 0 ? d / dt : null]);
    }
    return out;
}

/* The q-quantile of the request latencies between two samples (Prometheus's
 * histogram_quantile: linear within the bucket). */
function latencyQuantile(a, b, q) {
    const prev = new Map(a ? a.buckets : []);
    const cum = b.buckets.map(([le, v]) => [le, v - (prev.get(le) || 0)]).sort((x, y) => x[0] - y[0]);
    const total = cum.length ? cum[cum.length - 1][1] : 0;
    if (!(total > 0))
        return null;
    const rank = q * total;
    let lowerLe = 0, lowerCount = 0;
    for (const [le, c] of cum) {
        if (c >= rank) {
            if (le === Infinity)
                return lowerLe;
            return lowerLe + ((le - lowerLe) * (rank - lowerCount)) / Math.max(c - lowerCount, 1e-9);
        }
        lowerLe = le;
        lowerCount = c;
    }
    return null;
}

const fmtMs = (s) => (s === null ? '–' : s < 1 ? `${Math.round(s * 1000)} ms` : `${s.toFixed(2)} s`);

function drawServing() {
    /* the last WINDOW_S seconds, or since the page opened (a minute at least) */
    const S = state.samples, now = Date.now() / 1000;
    const x0 = Math.min(now - 60, Math.max(now - WINDOW_S, S.length ? S[0].t : now));
    const xTicks = [], every = now - x0 > 150 ? 60 : 30;
    for (let ago = 0; ago <= now - x0 + 1e-6; ago += every)
        xTicks.push([now - ago, ago ? (ago % 60 ? `-${ago}s` : `-${ago / 60}m`) : 'now']);
    const xFmt = (t) => fmtClock(t);
    const last = S[S.length - 1], lastRate = (pts) => (pts.length ? pts[pts.length - 1][1] : null);

    const comp = rates(S, 'completions'), reqs = rates(S, 'requests'), errs = rates(S, 'errors');
    drawChart($('#chart-requests svg'), { x0, x1: now, xTicks, xFmt, series: [
        { cls: 's2', label: 'all', points: reqs },
        { cls: 's4', label: '4xx/5xx', points: errs },
        { cls: 's1', label: 'completions', points: comp, area: true },
    ] });
    $('#v-requests').textContent = fmtNum(lastRate(comp));

    const gen = rates(S, 'generated'), prm = rates(S, 'prompt');
    drawChart($('#chart-tokens svg'), { x0, x1: now, xTicks, xFmt, series: [
        { cls: 's2', label: 'prompt', points: prm },
        { cls: 's1', label: 'generated', points: gen, area: true },
    ] });
    $('#v-tokens').textContent = fmtNum(lastRate(gen));

    drawChart($('#chart-queue svg'), { x0, x1: now, xTicks, xFmt, integer: true, series: [
        { cls: 's3', label: 'running', points: S.map((s) => [s.t, s.running]) },
        { cls: 's1', label: 'waiting', points: S.map((s) => [s.t, s.queue]), area: true },
    ] });
    $('#v-queue').textContent = last ? fmtInt(last.queue) : '–';

    drawChart($('#chart-kv svg'), { x0, x1: now, xTicks, xFmt, integer: true,
        y1: last && last.kvTotal ? last.kvTotal : undefined,
        series: [
            { cls: 's2', label: 'cached', points: S.map((s) => [s.t, s.kvCached]) },
            { cls: 's1', label: 'used', points: S.map((s) => [s.t, s.kvUsed]), area: true },
        ] });
    $('#v-kv').textContent = last && last.kvTotal
        ? `${fmtInt(last.kvUsed)} / ${fmtInt(last.kvTotal)}` : '–';

    if (!last)
        return;
    const first = S[0];
    const hit = last.prefixQueries ? (100 * last.prefixHits) / last.prefixQueries : null;
    const stat = (k, v, title) => h('div', { title }, h('dt', { text: k }), h('dd', { text: v }));
    $('#stats').replaceChildren(
        stat('running sequences', fmtInt(last.running)),
        stat('latency p50 / p95', `${fmtMs(latencyQuantile(first !== last ? first : null, last, 0.5))} / ` +
             `${fmtMs(latencyQuantile(first !== last ? first : null, last, 0.95))}`,
             'every route, over the window (adapterd_request_duration_seconds)'),
        stat('completions', fmtInt(last.completions)),
        stat('tokens generated', fmtInt(last.generated)),
        stat('prefix cache hits', hit === null ? '–' : `${hit.toFixed(1)} %`, 'tokens found / looked up'),
        stat('preemptions', fmtInt(last.preemptions)),
        stat('adapters in memory', fmtBytes(last.resident)),
        last.jobsRunning !== null
            ? stat('training', last.jobsRunning ? `${fmtNum(last.trainTps)} tok/s, loss ${fmtLoss(last.trainLoss)}`
                : last.jobsQueued ? `${last.jobsQueued} queued` : 'idle')
            : null,
    );
}

async function pollMetrics() {
    const text = await (await api('GET', '/metrics', { background: true })).text();
    const s = sampleOf(parseMetrics(text));
    state.samples.push(s);
    while (state.samples.length && state.samples[0].t < s.t - WINDOW_S - 2)
        state.samples.shift();
    drawServing();
    renderAdapters();
}

async function pollHealth() {
    const pill = $('#health');
    try {
        const r = await fetch('/health', { cache: 'no-store' });
        const j = await r.json().catch(() => ({}));
        pill.textContent = j.status === 'ok' ? 'serving' : j.status || `HTTP ${r.status}`;
        pill.className = `pill ${r.ok ? 'ok' : 'warn'}`;
    } catch {
        pill.textContent = 'unreachable';
        pill.className = 'pill err';
    }
}

/* ==========================================================================================
 * Models and adapters */

async function refreshModels() {
    const j = await getJSON('/v1/models', { background: true });
    state.base = j.data.find((m) => m.kind === 'base') || null;
    state.adapters = j.data.filter((m) => m.kind !== 'base').sort((a, b) => a.id.localeCompare(b.id));
    $('#base-id').textContent = state.base ? state.base.id : '';
    renderAdapters();
    updateModelSelects();
}

const tableRows = new Map(); /* id -> <tr>, kept across refreshes (a delete armed stays armed) */

function renderAdapters() {
    const tbody = $('#adapter-table tbody');
    if (!state.base) {
        tbody.replaceChildren(h('tr', {}, h('td', { class: 'empty', colspan: 8, text: 'loading…' })));
        return;
    }
    const last = state.samples[state.samples.length - 1];
    const usage = last ? last.perAdapter : new Map();
    const rows = [state.base, ...state.adapters];
    const seen = new Set();
    let prev = null;
    for (const m of rows) {
        seen.add(m.id);
        let tr = tableRows.get(m.id);
        if (!tr) {
            tr = adapterRow(m);
            tableRows.set(m.id, tr);
        }
        const base = m.kind === 'base', u = usage.get(m.id);
        const cells = tr.cells;
        cells[1].replaceChildren(h('span', { class: 'pill kind', text: m.kind || '?' }));
        cells[2].textContent = base || !m.rank ? '–' : String(m.rank);
        cells[3].textContent = fmtBytes(m.bytes);
        cells[3].title = m.bytes ? `${fmtInt(m.bytes)} bytes${!base && !m.resident ? ' when last loaded' : ''}` : '';
        cells[4].replaceChildren(base ? h('span', { class: 'muted', text: 'mmap, read-only' })
            : h('span', {}, h('span', { class: m.resident ? 'dot on' : 'dot' }), m.resident ? 'yes' : 'no'));
        cells[5].textContent = base ? '–' : fmtInt(u ? u.requests : 0);
        cells[5].title = base ? 'the base model is not counted per adapter in /metrics' : `${fmtInt(m.uses)} loads/uses`;
        cells[6].textContent = base ? '–' : fmtInt(u ? u.tokens : 0);
        if (tr.previousElementSibling !== prev || tr.parentNode !== tbody)
            prev ? prev.after(tr) : tbody.prepend(tr);
        prev = tr;
    }
    for (const [id, tr] of tableRows)
        if (!seen.has(id)) {
            tr.remove();
            tableRows.delete(id);
        }
    for (const tr of [...tbody.rows])
        if (!tr.dataset.id)
            tr.remove();
    const resident = state.adapters.filter((a) => a.resident).length;
    $('#models-summary').textContent = `${state.adapters.length} adapter${state.adapters.length === 1 ? '' : 's'}, ` +
        `${resident} in memory` + (state.base.max_model_len ? ` · context ${fmtInt(state.base.max_model_len)} tokens` : '');
}

function adapterRow(m) {
    const base = m.kind === 'base';
    const del = base ? null : h('button', { type: 'button', class: 'small danger', text: 'Delete' });
    const tryIt = h('button', { type: 'button', class: 'small ghost', text: 'Try', title: 'use it in the playground' });
    tryIt.addEventListener('click', () => usePaneModel(m.id));
    if (del) {
        let timer = null;
        del.addEventListener('click', async () => {
            if (!del.classList.contains('armed')) { /* the first click arms, the second deletes */
                del.classList.add('armed');
                del.textContent = 'Confirm';
                timer = setTimeout(() => {
                    del.classList.remove('armed');
                    del.textContent = 'Delete';
                }, 4000);
                return;
            }
            clearTimeout(timer);
            del.disabled = true;
            try {
                await api('DELETE', `/v1/adapters/${encodeURIComponent(m.id)}`, { admin: true });
                toast(`Deleted ${m.id}`, null, 'ok');
                await refreshModels();
            } catch (e) {
                toast(`Cannot delete ${m.id}`, errText(e));
                del.disabled = false;
                del.classList.remove('armed');
                del.textContent = 'Delete';
            }
        });
    }
    return h('tr', { class: base ? 'base' : '', 'data-id': m.id },
        h('td', { class: 'name', text: m.id }), h('td'), h('td', { class: 'num' }), h('td', { class: 'num' }),
        h('td'), h('td', { class: 'num' }), h('td', { class: 'num' }),
        h('td', { class: 'actions' }, tryIt, del ? ' ' : null, del));
}

const errText = (e) => (e instanceof ApiError && e.status ? `${e.status} · ${e.message}` : e.message || String(e));

/* ---- upload: a dropped directory, dropped files, or picked ones ---- */

const upload = { config: null, weights: null, others: [], auto: '' };

function chooseFiles(files, dirName) {
    const config = files.find((f) => f.name === 'adapter_config.json') ||
        (files.filter((f) => f.name.endsWith('.json')).length === 1 ? files.find((f) => f.name.endsWith('.json')) : null);
    const st = files.filter((f) => f.name.endsWith('.safetensors'));
    const weights = st.find((f) => f.name === 'adapter_model.safetensors') ||
        st.find((f) => f.name === 'adapter.safetensors') || st[0] || null;
    upload.config = config || null;
    upload.weights = weights;
    upload.others = files.filter((f) => f !== config && f !== weights);
    const name = $('#upload-name');
    if (dirName && (!name.value || name.value === upload.auto)) {
        name.value = dirName.replace(/[^A-Za-z0-9._-]/g, '-').replace(/^\.+/, '').slice(0, 64);
        upload.auto = name.value;
    }
    const li = (role, f) => h('li', {}, h('span', { class: 'role', text: role }),
                               h('span', { text: f ? f.name : 'missing' }), h('span', { class: 'muted', text: f ? fmtBytes(f.size) : '' }));
    $('#upload-chosen').replaceChildren(li('config', upload.config), li('weights', upload.weights),
        upload.others.length ? h('li', { class: 'muted', text: `ignored: ${upload.others.map((f) => f.name).join(', ')}` }) : null);
    checkUpload();
}

function checkUpload() {
    $('#upload-button').disabled = !(upload.config && upload.weights && $('#upload-name').value.trim());
}

/* A body refused for its key is answered after it is read only up to 1 MiB; a larger one's
 * connection is closed after the answer, which the browser may report as a network error
 * instead. So before a large upload the admin key is checked with a request of no body (GET
 * /v1/files is an admin route; 503 there only says fine-tuning is off). */
const SMALL_BODY = 1 << 20;
async function checkAdmin() {
    try {
        await api('GET', '/v1/files', { admin: true });
    } catch (e) {
        if (!(e instanceof ApiError) || e.status === 401 || e.status === 403 || e.status === 0)
            throw e;
    }
}

/* Every file of a dropped directory (its top level: PEFT's layout). */
async function readDirectory(entry) {
    const reader = entry.createReader(), entries = [];
    for (;;) {
        const batch = await new Promise((res, rej) => reader.readEntries(res, rej));
        if (!batch.length)
            break;
        entries.push(...batch);
    }
    return Promise.all(entries.filter((e) => e.isFile).map((e) => new Promise((res, rej) => e.file(res, rej))));
}

function setupUpload() {
    const dz = $('#dropzone');
    /* a file dropped anywhere else must not navigate away from the page */
    window.addEventListener('dragover', (e) => e.preventDefault());
    window.addEventListener('drop', (e) => e.preventDefault());
    dz.addEventListener('dragover', (e) => {
        e.preventDefault();
        dz.classList.add('over');
    });
    dz.addEventListener('dragleave', () => dz.classList.remove('over'));
    dz.addEventListener('drop', async (e) => {
        e.preventDefault();
        dz.classList.remove('over');
        const entries = [...e.dataTransfer.items].map((i) => (i.webkitGetAsEntry ? i.webkitGetAsEntry() : null));
        const plain = [...e.dataTransfer.files];
        try {
            let files = [], dir = null;
            if (entries.length && entries.every(Boolean)) {
                for (const ent of entries) {
                    if (ent.isDirectory) {
                        dir ??= ent.name;
                        files.push(...(await readDirectory(ent)));
                    } else {
                        files.push(await new Promise((res, rej) => ent.file(res, rej)));
                    }
                }
            } else {
                files = plain;
            }
            chooseFiles(files, dir);
        } catch (err) {
            toast('Cannot read the dropped files', err.message);
        }
    });
    $('#upload-files').addEventListener('change', (e) => chooseFiles([...e.target.files], null));
    $('#upload-dir').addEventListener('change', (e) => {
        const files = [...e.target.files];
        const dir = files.length && files[0].webkitRelativePath ? files[0].webkitRelativePath.split('/')[0] : null;
        chooseFiles(files.filter((f) => !f.webkitRelativePath || f.webkitRelativePath.split('/').length === 2), dir);
    });
    $('#upload-name').addEventListener('input', checkUpload);
    $('#upload-form').addEventListener('submit', async (e) => {
        e.preventDefault();
        const name = $('#upload-name').value.trim(), status = $('#upload-status');
        if (!/^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$/.test(name)) {
            setStatus(status, 'A name is 1-64 of A-Z a-z 0-9 . _ - and does not start with a dot.', 'err');
            return;
        }
        const form = new FormData();
        form.append('config', upload.config, 'adapter_config.json');
        form.append('weights', upload.weights, upload.weights.name);
        const bar = $('#upload-progress'), button = $('#upload-button');
        button.disabled = true;
        bar.hidden = false;
        bar.value = 0;
        const total = upload.config.size + upload.weights.size;
        setStatus(status, `Uploading ${fmtBytes(total)}…`);
        try {
            if (total > SMALL_BODY)
                await checkAdmin();
            const r = await api('PUT', `/v1/adapters/${encodeURIComponent(name)}`, {
                form, admin: true,
                onProgress: (f) => {
                    bar.value = f;
                    setStatus(status, f < 1 ? `Uploading… ${Math.round(f * 100)} %` : 'Validating against the base…');
                },
            });
            const a = await r.json();
            setStatus(status, `${r.status === 201 ? 'Created' : 'Replaced'} ${name}: ${a.kind || 'adapter'}` +
                      `${a.rank ? ` rank ${a.rank}` : ''}, ${fmtBytes(a.bytes)}`, 'ok');
            /* done with these files: the next ones start afresh */
            Object.assign(upload, { config: null, weights: null, others: [], auto: '' });
            $('#upload-name').value = '';
            $('#upload-chosen').replaceChildren();
            $('#upload-files').value = '';
            $('#upload-dir').value = '';
            await refreshModels();
        } catch (err) {
            setStatus(status, errText(err), 'err');
        } finally {
            bar.hidden = true;
            checkUpload();
        }
    });
}

/* ==========================================================================================
 * Playground: one prompt, up to four panes */

const panes = [];
const MAX_PANES = 4;

function modelOptions(select, value) {
    const ids = [state.base, ...state.adapters].filter(Boolean);
    const keep = value ?? select.value;
    select.replaceChildren(...ids.map((m) => h('option', { value: m.id, text: m.kind === 'base' ? `${m.id} (base)` : `${m.id} (${m.kind})` })));
    if (keep && ids.some((m) => m.id === keep))
        select.value = keep;
    else if (keep) { /* deleted meanwhile: shown, so a run says so instead of changing silently */
        select.append(h('option', { value: keep, text: `${keep} (gone)` }));
        select.value = keep;
    }
}

function updateModelSelects() {
    for (const p of panes)
        modelOptions(p.select);
    modelOptions($('#train-model'));
    syncTrainKind();
}

function addPane(model) {
    if (panes.length >= MAX_PANES)
        return;
    const node = $('#pane-template').content.firstElementChild.cloneNode(true);
    const p = { node, select: $('.pane-model', node), out: $('.pane-out', node), foot: $('.pane-foot', node), ctrl: null };
    modelOptions(p.select, model);
    $('.pane-remove', node).addEventListener('click', () => {
        if (panes.length <= 1)
            return;
        p.ctrl?.abort();
        panes.splice(panes.indexOf(p), 1);
        node.remove();
        layoutPanes();
    });
    panes.push(p);
    $('#panes').append(node);
    layoutPanes();
}

function layoutPanes() {
    $('#panes').style.setProperty('--n-panes', String(panes.length));
    $('#add-pane').disabled = panes.length >= MAX_PANES;
    for (const p of panes)
        $('.pane-remove', p.node).disabled = panes.length <= 1;
}

/* The playground's first pane showing the base (or the last pane) switches to id. */
function usePaneModel(id) {
    const p = panes.find((x) => x.select.value === (state.base && state.base.id) && x !== panes[0]) ||
        (panes.length < MAX_PANES ? null : panes[panes.length - 1]);
    if (p)
        p.select.value = id;
    else
        addPane(id);
    $('#playground').scrollIntoView({ behavior: 'smooth' });
}

function playRequest(model) {
    const num = (id) => {
        const v = $(id).value.trim();
        return v === '' ? undefined : Number(v);
    };
    const body = { model, max_tokens: num('#play-max'), temperature: num('#play-temp'), top_p: num('#play-top-p'),
                   seed: num('#play-seed'), stream: true };
    const prompt = $('#prompt').value;
    if ($('#play-mode').value === 'chat')
        return ['/v1/chat/completions', { ...body, messages: [{ role: 'user', content: prompt }] }];
    return ['/v1/completions', { ...body, prompt }];
}

async function runPane(p) {
    const model = p.select.value, chat = $('#play-mode').value === 'chat';
    const [path, body] = playRequest(model);
    p.ctrl?.abort();
    const ctrl = p.ctrl = new AbortController();
    p.out.replaceChildren();
    p.out.className = 'pane-out streaming';
    p.foot.textContent = 'waiting for the first token…';
    const t0 = performance.now();
    let first = null, chunks = 0, usage = null, finish = null;
    const stats = () => {
        const now = performance.now(), n = usage ? usage.completion_tokens : chunks;
        const parts = [`${n} token${n === 1 ? '' : 's'}`];
        if (first !== null)
            parts.push(`first ${Math.round(first - t0)} ms`);
        if (first !== null && n > 1 && now > first)
            parts.push(`${fmtNum(((n - 1) * 1000) / (now - first))} tok/s`);
        if (finish)
            parts.push(finish);
        return parts.join(' · ');
    };
    try {
        const r = await api('POST', path, { body, signal: ctrl.signal });
        await readSSE(r, (ev) => {
            if (ev.error)
                throw new ApiError(0, ev.error.message || JSON.stringify(ev.error));
            const c = ev.choices && ev.choices[0];
            const text = c ? (chat ? c.delta && c.delta.content : c.text) : null;
            if (text) {
                first ??= performance.now();
                chunks++;
                const stick = p.out.scrollTop + p.out.clientHeight >= p.out.scrollHeight - 4;
                p.out.append(text);
                if (stick)
                    p.out.scrollTop = p.out.scrollHeight;
            }
            if (c && c.finish_reason)
                finish = c.finish_reason;
            if (ev.usage)
                usage = ev.usage;
            p.foot.textContent = stats();
        });
        p.foot.textContent = stats();
    } catch (e) {
        if (e.name === 'AbortError') {
            p.foot.textContent = `${stats()} · stopped`;
        } else {
            p.out.className = 'pane-out error';
            p.out.textContent = errText(e);
            p.foot.textContent = `${model}: refused`;
        }
    } finally {
        p.out.classList.remove('streaming');
        if (p.ctrl === ctrl)
            p.ctrl = null;
    }
}

function setupPlayground() {
    addPane();
    addPane();
    $('#add-pane').addEventListener('click', () => addPane());
    const run = async () => {
        if (!$('#prompt').value)
            return;
        $('#stop-button').disabled = false;
        $('#run-button').disabled = true;
        await Promise.all(panes.map(runPane));
        $('#stop-button').disabled = true;
        $('#run-button').disabled = false;
    };
    $('#play-form').addEventListener('submit', (e) => {
        e.preventDefault();
        run();
    });
    $('#prompt').addEventListener('keydown', (e) => {
        if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) {
            e.preventDefault();
            run();
        }
    });
    $('#stop-button').addEventListener('click', () => panes.forEach((p) => p.ctrl?.abort()));
}

/* Once the models are known: the first pane on the base, the second on the first adapter. */
function defaultPanes() {
    if (panes[0] && state.base)
        panes[0].select.value = state.base.id;
    if (panes[1] && state.adapters.length)
        panes[1].select.value = state.adapters[0].id;
}

/* ==========================================================================================
 * Fine-tuning: files, jobs, the loss curve of the job followed */

const FINAL = ['succeeded', 'failed', 'cancelled'];
let follow = null; /* {id, ctrl, train: [[step, loss]], valid, total, last, done, status} */

function syncTrainKind() {
    const sel = $('#train-model'), cont = state.base && sel.value && sel.value !== state.base.id;
    $('#train-kind').disabled = !!cont;
    $('#train-kind').title = cont ? 'continuing an adapter trains its own config' : '';
}

async function refreshJobs() {
    let j;
    try {
        j = await getJSON('/v1/fine_tuning/jobs?limit=50', { admin: true, background: true });
    } catch (e) {
        if (e instanceof ApiError && (e.status === 503 || e.status === 403 || e.status === 401)) {
            state.jobsState = e.status === 503 ? 'disabled' : 'forbidden';
            state.jobs = [];
            renderJobs(e.message);
            return;
        }
        throw e;
    }
    state.jobsState = 'ok';
    const before = new Map(state.jobs.map((x) => [x.id, x.status]));
    state.jobs = j.data;
    renderJobs();
    if (!follow && state.jobs.length)
        selectJob((state.jobs.find((x) => !FINAL.includes(x.status)) || state.jobs[0]).id);
    else if (follow) {
        const now = state.jobs.find((x) => x.id === follow.id);
        /* a resumed job rewrites its events from its checkpoint on: read them again */
        if (now && before.get(now.id) === 'paused' && now.status !== 'paused' && !FINAL.includes(now.status))
            selectJob(now.id, true);
    }
}

function renderJobs(problem) {
    const tbody = $('#jobs-table tbody'), form = $('#train-form');
    const off = String(state.jobsState === 'disabled');
    if (form.dataset.off !== off) { /* fine-tuning is off on this server: so is the form */
        form.dataset.off = off;
        form.querySelectorAll('input, select, button').forEach((e) => {
            e.disabled = off === 'true';
        });
        syncTrainKind();
    }
    if (problem) {
        const cell = h('td', { class: 'empty', colspan: 7 }, problem);
        if (state.jobsState === 'forbidden')
            cell.append(' ', h('button', { type: 'button', class: 'small', text: 'Enter admin key',
                onclick: async () => {
                    if (await askKey('admin', 'Fine-tuning jobs need the admin key.'))
                        refreshJobs().catch(() => {});
                } }));
        tbody.replaceChildren(h('tr', {}, cell));
        $('#jobs-summary').textContent = '';
        return;
    }
    if (!state.jobs.length) {
        tbody.replaceChildren(h('tr', {}, h('td', { class: 'empty', colspan: 7, text: 'no jobs yet: start one from a JSONL file' })));
        $('#jobs-summary').textContent = '';
        return;
    }
    tbody.replaceChildren(...state.jobs.map(jobRow));
    const running = state.jobs.filter((x) => x.status === 'running').length;
    const queued = state.jobs.filter((x) => x.status === 'queued').length;
    $('#jobs-summary').textContent = `${state.jobs.length} job${state.jobs.length === 1 ? '' : 's'}` +
        (running ? `, ${running} running` : '') + (queued ? `, ${queued} queued` : '');
}

function jobAdapterName(job) {
    return job.fine_tuned_model || job.user_provided_suffix || `ft-${job.id.replace(/^ftjob-/, '')}`;
}

function jobRow(job) {
    const sup = (job.method && job.method.supervised) || {};
    const cont = state.base && job.model !== state.base.id;
    const kind = cont ? `continues ${job.model}` : sup.adapter || 'lora';
    const action = (what, label, ok) => (ok ? h('button', { type: 'button', class: `small${what === 'cancel' ? ' danger' : ''}`, text: label,
        onclick: async (e) => {
            e.stopPropagation();
            e.target.disabled = true;
            try {
                await api('POST', `/v1/fine_tuning/jobs/${encodeURIComponent(job.id)}/${what}`, { admin: true });
            } catch (err) {
                toast(`Cannot ${what} ${job.id}`, errText(err));
            }
            refreshJobs().catch(() => {});
        } }) : null);
    const progress = h('td', { class: 'progress' });
    jobProgress(progress, job);
    const status = h('td', {}, h('span', { class: `pill ${job.status}`, text: job.status }));
    if (job.error && job.error.message)
        status.append(h('span', { class: 'muted', text: job.error.message, title: job.error.message }));
    const tr = h('tr', { class: `clickable${follow && follow.id === job.id ? ' selected' : ''}`, 'data-id': job.id,
                         title: 'show its loss curve' },
        h('td', { class: 'name', text: job.id }),
        h('td', { class: 'name', text: jobAdapterName(job) }),
        h('td', { text: kind }),
        status,
        progress,
        h('td', { class: 'muted', text: fmtAgo(job.created_at), title: new Date(job.created_at * 1000).toLocaleString() }),
        h('td', { class: 'actions' },
          action('pause', 'Pause', job.status === 'running' || job.status === 'queued'),
          action('resume', 'Resume', job.status === 'paused'), ' ',
          action('cancel', 'Cancel', !FINAL.includes(job.status))));
    tr.addEventListener('click', () => selectJob(job.id));
    return tr;
}

/* The progress cell: step/total of the job followed, trained tokens of one that succeeded. */
function jobProgress(cell, job) {
    if (follow && follow.id === job.id && follow.last) {
        const { step, total_steps: total } = follow.last;
        const bar = h('span', { class: 'bar' }, h('span'));
        bar.firstChild.style.width = `${Math.min(100, (100 * step) / Math.max(total, 1)).toFixed(1)}%`;
        cell.replaceChildren(bar, `${step}/${total}`);
    } else if (job.status === 'succeeded') {
        cell.replaceChildren(h('span', { class: 'muted', text: `${fmtInt(job.trained_tokens)} tokens` }));
    } else {
        cell.replaceChildren(h('span', { class: 'muted', text: '–' }));
    }
}

/* Follows one job's events (SSE from the first event on): the loss curve and the log. */
function selectJob(id, again = false) {
    if (follow && follow.id === id && !again)
        return;
    follow?.ctrl.abort();
    const f = follow = { id, ctrl: new AbortController(), train: [], valid: [], total: null, last: null, done: false };
    $('#loss-job').textContent = id;
    $('#events').replaceChildren();
    drawLoss();
    for (const tr of $('#jobs-table tbody').rows)
        tr.classList.toggle('selected', tr.dataset.id === id);
    streamJob(f);
}

async function streamJob(f) {
    try {
        const r = await api('GET', `/v1/fine_tuning/jobs/${encodeURIComponent(f.id)}/events?stream=true`,
                            { admin: true, signal: f.ctrl.signal });
        f.done = await readSSE(r, (ev) => jobEvent(f, ev));
        if (f !== follow)
            return;
        drawLoss();
        await Promise.all([refreshJobs(), refreshModels()]).catch(() => {});
        if (!f.done) /* the server stopped: read again when it is back */
            setTimeout(() => f === follow && selectJob(f.id, true), 3000);
    } catch (e) {
        if (e.name === 'AbortError' || f !== follow)
            return;
        $('#events').append(h('li', { class: 'error', text: errText(e) }));
        if (!(e instanceof ApiError) || e.status === 0 || e.status >= 500)
            setTimeout(() => f === follow && selectJob(f.id, true), 3000);
    }
}

function jobEvent(f, ev) {
    if (f !== follow)
        return;
    if (ev.type === 'metrics' && ev.data && Number.isFinite(ev.data.step)) {
        const d = ev.data;
        f.train.push([d.step, d.train_loss]);
        /* every event after an evaluation repeats its valid_loss: a point where it changes */
        const v = f.valid[f.valid.length - 1];
        if (Number.isFinite(d.valid_loss) && (!v || v[1] !== d.valid_loss))
            f.valid.push([d.step, d.valid_loss]);
        f.total = d.total_steps;
        f.last = d;
        scheduleLoss();
        return;
    }
    const list = $('#events');
    const stick = list.scrollTop + list.clientHeight >= list.scrollHeight - 4;
    list.append(h('li', { class: ev.level || '' }, h('span', { class: 't', text: fmtClock(ev.created_at) }), ev.message));
    if (stick)
        list.scrollTop = list.scrollHeight;
}

let lossFrame = 0;
function scheduleLoss() {
    if (!lossFrame)
        lossFrame = requestAnimationFrame(() => {
            lossFrame = 0;
            drawLoss();
        });
}

function drawLoss() {
    const f = follow, svg = $('#loss-chart');
    if (!f) {
        drawChart(svg, { series: [], x0: 0, x1: 1, empty: 'no job selected' });
        return;
    }
    const maxStep = Math.max(f.total || 0, ...f.train.map((p) => p[0]), 1);
    const xTicks = [];
    const step = Math.max(1, niceStep(maxStep, 6));
    for (let s = 0; s <= maxStep + 1e-9; s += step)
        xTicks.push([s, fmtNum(s)]);
    drawChart(svg, {
        x0: 0, x1: maxStep, fit: true, xTicks, yFmt: (v) => v.toFixed(v >= 10 ? 1 : 2), xFmt: (s) => `step ${s}`,
        empty: f.done ? 'no metrics events' : 'waiting for the first step…',
        series: [
            { cls: 's1', label: 'train_loss', points: f.train },
            { cls: 's2', label: 'valid_loss', points: f.valid, markers: true },
        ],
    });
    svg.dataset.job = f.id;
    svg.dataset.points = String(f.train.length);
    svg.dataset.done = String(f.done);
    const d = f.last;
    $('#loss-now').textContent = d ? `step ${d.step}/${d.total_steps} · train ${fmtLoss(d.train_loss)}` +
        (f.valid.length ? ` · valid ${fmtLoss(f.valid[f.valid.length - 1][1])}` : '') +
        (Number.isFinite(d.tokens_per_second) && !f.done ? ` · ${fmtNum(d.tokens_per_second)} tok/s` : '') : '';
    const cell = $(`#jobs-table tbody tr[data-id="${CSS.escape(f.id)}"] td.progress`);
    const job = state.jobs.find((x) => x.id === f.id);
    if (cell && job)
        jobProgress(cell, job);
}

function setupTraining() {
    $('#train-model').addEventListener('change', syncTrainKind);
    $('#train-form').addEventListener('submit', async (e) => {
        e.preventDefault();
        const status = $('#train-status'), button = $('#train-button');
        const train = $('#train-file').files[0], valid = $('#valid-file').files[0];
        if (!train) {
            setStatus(status, 'Choose a training file (JSONL).', 'err');
            return;
        }
        button.disabled = true;
        const sendFile = async (file) => {
            setStatus(status, `Uploading ${file.name} (${fmtBytes(file.size)}), checked line by line…`);
            const form = new FormData();
            form.append('purpose', 'fine-tune');
            form.append('file', file, file.name);
            return (await api('POST', '/v1/files', { form, admin: true })).json();
        };
        try {
            const tf = await sendFile(train);
            const vf = valid ? await sendFile(valid) : null;
            const model = $('#train-model').value || (state.base && state.base.id);
            const num = (id) => ($(id).value.trim() === '' ? undefined : Number($(id).value));
            const hyper = { n_epochs: num('#train-epochs'), batch_size: num('#train-batch'),
                            learning_rate_multiplier: num('#train-lr') };
            Object.keys(hyper).forEach((k) => hyper[k] === undefined && delete hyper[k]);
            const supervised = { hyperparameters: hyper };
            if (state.base && model === state.base.id)
                supervised.adapter = $('#train-kind').value;
            const req = { model, training_file: tf.id, method: { type: 'supervised', supervised } };
            if (vf)
                req.validation_file = vf.id;
            if ($('#train-suffix').value.trim())
                req.suffix = $('#train-suffix').value.trim();
            setStatus(status, 'Creating the job…');
            const job = await (await api('POST', '/v1/fine_tuning/jobs', { body: req, admin: true })).json();
            setStatus(status, `Job ${job.id} created: its adapter will be ${jobAdapterName(job)}.`, 'ok');
            await refreshJobs();
            selectJob(job.id);
        } catch (err) {
            setStatus(status, errText(err), 'err');
        } finally {
            button.disabled = state.jobsState === 'disabled';
        }
    });
}

/* ==========================================================================================
 * Start-up */

function updateKeyButton() {
    const b = $('#key-button'), api = keys.get('api'), admin = keys.get('admin');
    b.textContent = api || admin ? `Key${api && admin ? 's' : ''} set` : 'API key';
    b.title = `API key: ${api ? 'set' : 'none'}, admin key: ${admin ? 'set' : 'none'} (this tab only)`;
}

/* Polls keep going whatever one of them answers; each failure shows once, then quietly. */
const failing = new Set();
function guard(name, fn) {
    return fn().then(() => failing.delete(name), (e) => {
        if (e instanceof ApiError && (e.status === 401 || e.status === 403)) {
            if (e.status === 401)
                showAuthBanner('api');
            return;
        }
        if (!failing.has(name))
            toast(`${name} failed`, errText(e));
        failing.add(name);
    });
}

let ticks = 0, busy = false;
async function tick() {
    if (busy)
        return;
    busy = true;
    const slow = ticks++ % 3 === 0;
    await Promise.all([
        pollHealth(),
        guard('GET /metrics', pollMetrics),
        slow ? guard('GET /v1/models', refreshModels) : null,
        slow && state.jobsState !== 'disabled' ? guard('GET /v1/fine_tuning/jobs', refreshJobs) : null,
    ]);
    busy = false;
}

function setupKeys() {
    const dlg = $('#key-dialog');
    $('#key-cancel').addEventListener('click', () => dlg.close('cancel'));
    $('#key-clear').addEventListener('click', () => {
        keys.set('api', '');
        keys.set('admin', '');
        dlg.close('cancel');
        toast('Keys forgotten', 'This tab sends no key now.', 'ok');
    });
    $('#key-form').addEventListener('submit', () => {
        dlg.returnValue = 'ok';
    });
    $('#key-button').addEventListener('click', async () => {
        declined.api = false;
        if (await askKey('api', 'The key this tab sends with every request.'))
            tick();
    });
    $('#auth-banner-button').addEventListener('click', async () => {
        const kind = $('#auth-banner').dataset.kind || 'api';
        declined[kind] = false;
        if (await askKey(kind, kind === 'admin' ? 'The admin key for uploads, deletes and training.'
                                                : 'This server needs an API key.'))
            tick();
    });
    updateKeyButton();
}

async function start() {
    setupKeys();
    setupUpload();
    setupPlayground();
    setupTraining();
    for (const svg of document.querySelectorAll('svg.chart'))
        chartHover(svg);
    renderAdapters();
    drawServing();
    drawLoss();
    let resized = 0;
    window.addEventListener('resize', () => {
        cancelAnimationFrame(resized);
        resized = requestAnimationFrame(() => {
            drawServing();
            drawLoss();
        });
    });
    await pollHealth();
    await Promise.all([guard('GET /v1/models', refreshModels), guard('GET /metrics', pollMetrics),
                       guard('GET /v1/fine_tuning/jobs', refreshJobs)]);
    defaultPanes();
    ticks = 1;
    setInterval(tick, 2000);
    document.body.dataset.ready = 'true';
}

start();

})();

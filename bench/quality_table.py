"""The PEFT table in miniature (bench/quality --table): every method trained from the demo
model through the daemon's fine-tuning API on two tasks, its learning rate chosen on the
validation split, then measured once on the test split.

Tasks (bench/quality_data.py's five fortune categories that pretraining never saw):
  domain     domain adaptation, the E2E-like generation column: an adapter trained on the
             categories' train fortunes ({"text"}), measured in bits per byte on each
             category's test fortunes (lower is better; their mean is the column)
  classify   the GLUE-like column: {"prompt": FORTUNE + "\\nCategory:", "completion": " NAME"},
             accuracy of the greedy answer (up to the line's end) on the test fortunes
Tuning: each method trains once per learning rate of its grid (GRIDS); the rate whose adapter
does best on the validation split (domain: mean bits per byte; classify: accuracy, then the
lower validation bits per byte of the answers breaking ties) is the one whose test figures are
reported. Nothing else is tuned: epochs, batch, warmup and schedule are the same for every
method, and the test split is read once per reported adapter.
The score column is the mean of the two tasks' scores: accuracy (%) and the bits saved on the
domain text (% of the base's bits per byte).
"""
import json
import math
import os
import struct
import sys
import time

import quality_adapters as qa
import quality_data as qd

# name, method.supervised (without learning_rate), learning-rate grid
QV = ['q_proj', 'v_proj']
METHODS = [
    ('full fine-tuning', {'adapter': 'full'}, [1e-4, 3e-4, 1e-3]),
    ('LoRA r=2 (q,v)', {'adapter': 'lora', 'adapter_config': {
        'r': 2, 'lora_alpha': 4, 'lora_dropout': 0.0, 'target_modules': QV}},
     [1e-3, 3e-3, 1e-2]),
    ('LoRA r=8 (q,v)', {'adapter': 'lora', 'adapter_config': {
        'r': 8, 'lora_alpha': 16, 'lora_dropout': 0.0, 'target_modules': QV}},
     [1e-3, 3e-3, 1e-2]),
    ('DoRA r=8 (q,v)', {'adapter': 'dora', 'adapter_config': {
        'r': 8, 'lora_alpha': 16, 'target_modules': QV}}, [1e-3, 3e-3, 1e-2]),
    ('IA3', {'adapter': 'ia3'}, [3e-3, 1e-2, 3e-2]),
    ('prefix tuning (16)', {'adapter': 'prefix'}, [3e-3, 1e-2, 3e-2]),
    ('prompt tuning (16)', {'adapter': 'prompt'}, [1e-2, 3e-2, 1e-1]),
    ('BitFit', {'adapter': 'bitfit'}, [1e-3, 3e-3, 1e-2]),
    ('Houlsby (rf 16)', {'adapter': 'houlsby'}, [1e-3, 3e-3, 1e-2]),
    ('Pfeiffer (rf 16)', {'adapter': 'pfeiffer'}, [1e-3, 3e-3, 1e-2]),
    ('child-tuning F (p 0.3)', {'adapter': 'full', 'child_tuning': {
        'mode': 'F', 'reserve_p': 0.3}}, [1e-4, 3e-4, 1e-3]),
    ('child-tuning D (p 0.3)', {'adapter': 'full', 'child_tuning': {
        'mode': 'D', 'reserve_p': 0.3}}, [1e-4, 3e-4, 1e-3]),
]
TRAIN = {'n_epochs': 2, 'batch_size': 8}
COMMON = {'warmup_ratio': 0.05, 'lr_scheduler': 'cosine', 'max_seq_len': 256}
# Examples per category: the table in miniature (a full run is about an hour of 2 idle cores)
SIZES = {'full': {'domain': 100, 'classify': 80, 'valid': 30, 'test': None},
         'quick': {'domain': 12, 'classify': 10, 'valid': 6, 'test': 12}}


def st_count(path):
    with open(path, 'rb') as f:
        n = struct.unpack('<Q', f.read(8))[0]
        head = json.loads(f.read(n))
    total = 0
    for k, v in head.items():
        if k != '__metadata__':
            total += math.prod(v['shape'])
    return total


def trainable(d, name, base_params, sup):
    """Trainable parameters of an adapter: its tensors, or for full fine-tuning (child-tuning
    too: it trains every weight, masked) the base's count."""
    if sup['adapter'] == 'full':
        return base_params
    for f in ('adapter_model.safetensors', 'adapter.safetensors'):
        p = os.path.join(d.adapters, name, f)
        if os.path.exists(p):
            return st_count(p)
    raise RuntimeError('%s: no weights' % name)


def classify(d, model, items, batch=16):
    """Accuracy of the greedy answers, and the bits per byte of the right answers."""
    right, nats, nbytes = 0, 0.0, 0
    for i in range(0, len(items), batch):
        part = items[i:i + batch]
        r = d.post('/v1/completions', {'model': model, 'prompt': [qa.classify_prompt(t)
                                                                  for t, _ in part],
                                       'max_tokens': 6, 'temperature': 0, 'stop': ['\n']})
        for ch in sorted(r['choices'], key=lambda c: c['index']):
            right += ch['text'].strip() == part[ch['index']][1]
    # the answer's loss: prompt + answer scored, minus the prompt alone
    for i in range(0, len(items), batch):
        part = items[i:i + batch]
        full = [qa.classify_prompt(t) + ' ' + c for t, c in part]
        bare = [qa.classify_prompt(t) for t, _ in part]
        for texts, sign in ((full, -1), (bare, 1)):
            r = d.post('/v1/completions', {'model': model, 'prompt': texts, 'echo': True,
                                           'logprobs': 0, 'max_tokens': 0})
            for ch in r['choices']:
                nats += sign * sum(lp for lp in ch['logprobs']['token_logprobs'][1:])
        nbytes += sum(len(c) + 1 for _, c in part)
    return 100.0 * right / len(items), nats / math.log(2) / nbytes


def run(d, base, args, bits_per_byte, pieces):
    size = SIZES['quick' if args.quick else 'full']
    s = qd.split()
    cats = qd.TASKS
    take = lambda xs, n: xs[:n] if n else xs
    dom_train = [{'text': t} for c in cats for t in take(s['task_train'][c], size['domain'])]
    cls_train = []
    for c in cats:
        cls_train += [{'prompt': qa.classify_prompt(t), 'completion': ' ' + c}
                      for t in take(s['task_train'][c], size['classify'])]
    valid = {c: take(s['task_valid'][c], size['valid']) for c in cats}
    test = {c: take(s['task_test'][c], size['test']) for c in cats}
    vpieces = {c: pieces(d, base, valid[c]) for c in cats}
    tpieces = {c: pieces(d, base, test[c]) for c in cats}
    vitems = [(t, c) for c in cats for t in valid[c]]
    titems = [(t, c) for c in cats for t in test[c]]
    base_params = sum(st_count(os.path.join(args.model, f)) for f in os.listdir(args.model)
                      if f.endswith('.safetensors'))

    def domain_eval(model, which):
        ps = vpieces if which == 'valid' else tpieces
        per = {c: bits_per_byte(d, model, None, ps[c])[0] for c in cats}
        return per, sum(per.values()) / len(per)

    rows = []
    t0 = time.time()
    per, mean = domain_eval(base, 'test')
    acc, abpb = classify(d, base, titems)
    rows.append({'method': 'base (no adaptation)', 'params': 0, 'pct': 0.0, 'domain': per,
                 'domain_mean': mean, 'accuracy': acc, 'answer_bpb': abpb, 'seconds': 0,
                 'lr': {}})
    log = open(os.path.join(d.tmp, 'table.log'), 'w')
    n = 0
    for mname, sup, grid in METHODS:
        row = {'method': mname, 'lr': {}, 'seconds': 0.0, 'tuning': {}}
        for task in ('domain', 'classify'):
            best = None
            for lr in (grid[1:2] if args.quick else grid):
                n += 1
                name = 'tbl-%d' % n
                sp = dict(sup, learning_rate=lr, hyperparameters=TRAIN, **COMMON)
                job = qa.train(d, base, name, sp, dom_train if task == 'domain' else cls_train,
                               log=log)
                row['seconds'] += job['wall_seconds']
                if task == 'domain':
                    _, v = domain_eval(name, 'valid')
                    key = (v,)
                else:
                    a, b = classify(d, name, vitems)
                    key = (-a, b)
                row['tuning'].setdefault(task, []).append({'lr': lr, 'valid': key})
                print('  %-24s %-8s lr %-7g valid %s (%.0f s)' % (
                    mname, task, lr, ' '.join('%.4f' % k for k in key), job['wall_seconds']),
                    flush=True)
                if best is None or key < best[0]:
                    if best:
                        d.request('DELETE', '/v1/adapters/' + best[1])
                    best = (key, name, lr, job)
                else:
                    d.request('DELETE', '/v1/adapters/' + name)
            _, name, lr, job = best
            row['lr'][task] = lr
            if task == 'domain':
                row['params'] = trainable(d, name, base_params, sup)
                row['domain'], row['domain_mean'] = domain_eval(name, 'test')
            else:
                row['accuracy'], row['answer_bpb'] = classify(d, name, titems)
            d.request('DELETE', '/v1/adapters/' + name)
        row['pct'] = 100.0 * row['params'] / base_params
        rows.append(row)
    base_mean = rows[0]['domain_mean']
    for r in rows:
        r['saved_pct'] = 100.0 * (1 - r['domain_mean'] / base_mean)
        r['score'] = (r['accuracy'] + r['saved_pct']) / 2
    result = {'rows': rows, 'base_params': base_params, 'categories': cats,
              'quick': bool(args.quick), 'sizes': size, 'train': TRAIN, 'common': COMMON,
              'seconds': time.time() - t0}
    print_table(result)
    svg = os.path.join(args.table_dir or '.', 'quality.svg')
    with open(svg, 'w') as f:
        f.write(plot(result))
    print('plot: ' + svg)
    return result


def print_table(res):
    cats = res['categories']
    print('\n## The table (%s)\n' % ('quick trial' if res['quick'] else 'miniature'))
    print('| method | trainable | % of base | ' + ' | '.join(cats) +
          ' | domain bpb | accuracy | score | lr (domain, classify) | training s |')
    print('|---|---:|---:|' + '---:|' * len(cats) + '---:|---:|---:|---|---:|')
    for r in res['rows']:
        lr = '%s, %s' % (r['lr'].get('domain', '-'), r['lr'].get('classify', '-'))
        print('| %s | %s | %.3g%% | %s | %.3f | %.1f%% | %.1f | %s | %.0f |' % (
            r['method'], '{:,}'.format(r['params']), r['pct'],
            ' | '.join('%.3f' % r['domain'][c] for c in cats), r['domain_mean'], r['accuracy'],
            r['score'], lr if r['lr'] else '-', r['seconds']))
    sys.stdout.flush()


def plot(res):
    """An SVG of two panels, domain bits per byte and accuracy, against trainable % (log)."""
    rows = [r for r in res['rows'] if r['pct'] > 0]
    base = res['rows'][0]
    W, H, M = 980, 420, 60
    pw = (W - 3 * M) / 2
    lo = math.floor(math.log10(min(r['pct'] for r in rows)))
    hi = max(math.ceil(math.log10(max(r['pct'] for r in rows)) - 1e-9), lo + 1)
    out = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" '
           'font-family="sans-serif" font-size="11">' % (W, H),
           '<rect width="100%" height="100%" fill="white"/>']
    palette = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2',
               '#7f7f7f', '#bcbd22', '#17becf', '#393b79', '#637939']
    for k, (key, title, better) in enumerate((('domain_mean', 'domain adaptation: test bits '
                                               'per byte (lower is better)', -1),
                                              ('accuracy', 'classification: test accuracy % '
                                               '(higher is better)', 1))):
        x0 = M + k * (pw + M)
        vals = [r[key] for r in rows] + [base[key]]
        vmin, vmax = min(vals), max(vals)
        pad = (vmax - vmin) * 0.1 or 1
        vmin, vmax = vmin - pad, vmax + pad
        X = lambda p: x0 + (math.log10(p) - lo) / (hi - lo) * pw
        Y = lambda v: M + (vmax - v) / (vmax - vmin) * (H - 2 * M)
        out.append('<rect x="%.1f" y="%d" width="%.1f" height="%d" fill="none" '
                   'stroke="#444"/>' % (x0, M, pw, H - 2 * M))
        out.append('<text x="%.1f" y="%d" text-anchor="middle" font-size="13">%s</text>'
                   % (x0 + pw / 2, M - 12, title))
        for e in range(lo, hi + 1):
            x = X(10 ** e)
            out.append('<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#ddd"/>'
                       % (x, M, x, H - M))
            out.append('<text x="%.1f" y="%d" text-anchor="middle">%g%%</text>'
                       % (x, H - M + 15, 10 ** e))
        for i in range(5):
            v = vmin + (vmax - vmin) * i / 4
            out.append('<text x="%.1f" y="%.1f" text-anchor="end">%.3g</text>'
                       % (x0 - 4, Y(v) + 4, v))
        y = Y(base[key])
        out.append('<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#999" '
                   'stroke-dasharray="4 3"/><text x="%.1f" y="%.1f" fill="#666">base</text>'
                   % (x0, y, x0 + pw, y, x0 + 4, y - 4))
        out.append('<text x="%.1f" y="%d" text-anchor="middle">trainable parameters, %% of '
                   'the base (log scale)</text>' % (x0 + pw / 2, H - M + 32))
        for i, r in enumerate(rows):
            c = palette[i % len(palette)]
            out.append('<circle cx="%.1f" cy="%.1f" r="5" fill="%s"/>'
                       % (X(r['pct']), Y(r[key]), c))
            out.append('<text x="%.1f" y="%.1f" fill="%s">%s</text>'
                       % (X(r['pct']) + 7, Y(r[key]) + (4 if i % 2 else -4), c,
                          r['method'].replace('&', '&amp;')))
    out.append('</svg>')
    return '\n'.join(out) + '\n'

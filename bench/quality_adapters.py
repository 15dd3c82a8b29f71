#!/usr/bin/env python3
"""The demo adapters of adapters/: each trained from models/demo by the daemon's own
fine-tuning API (POST /v1/files, POST /v1/fine_tuning/jobs), one task each, on text the base
never saw (bench/quality_data.py's task splits), then copied from the daemon's adapters
directory into adapters/NAME.

  python3 bench/quality_adapters.py [--build build] [--model models/demo] [--out adapters]
                                    [NAME...]

(scripts/train-demo runs it after the model.) The daemon runs its jobs at idle CPU priority;
this script waits for each. Each is small (some 10-30k tokens of training: a few minutes of a
busy 2-core machine's idle time), enough to show what it does. ADAPTERS below is the list: name, kind, data, hyperparameters, and
the line adapters/README.md says about it.
"""
import argparse
import json
import os
import shutil
import sys
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import quality_data as qd  # noqa: E402

CLASSIFY_PER_CATEGORY = 80  # examples per category for the classifier (of its train split)


CLASSIFY_CHARS = 500  # a longer fortune is cut (at a space) to fit 256 tokens with its answer


def classify_prompt(text):
    """The classification task's prompt (the table's and the demo adapter's): the fortune (its
    first CLASSIFY_CHARS characters), then a line to complete with its category's name."""
    if len(text) > CLASSIFY_CHARS:
        cut = text[:CLASSIFY_CHARS]
        text = cut[:max(cut.rfind(' '), cut.rfind('\n'), 1)]
    return text + '\nCategory:'


def text_examples(texts):
    return [{'text': t} for t in texts]


def classify_examples(split, part, per_category=None):
    out = []
    for c in qd.TASKS:
        for t in split['task_' + part][c][:per_category]:
            out.append({'prompt': classify_prompt(t), 'completion': ' ' + c})
    return out


# name, what it does (the README line), method.supervised, examples(split)
ADAPTERS = [
    ('computer-jokes', 'LoRA (rank 8, every projection): writes fortunes about computers and '
     'programmers (trained on the `computers` category)',
     {'adapter': 'lora', 'adapter_config': {'r': 8, 'lora_alpha': 16, 'lora_dropout': 0.0},
      'learning_rate': 2e-3, 'warmup_ratio': 0.05, 'max_seq_len': 256,
      'hyperparameters': {'n_epochs': 1, 'batch_size': 8}},
     lambda s: text_examples(s['task_train']['computers'][:300])),
    ('star-trek-quotes', 'prefix tuning (16 virtual tokens): Star Trek lines signed with the '
     'speaker, episode and stardate (the `startrek` category)',
     {'adapter': 'prefix', 'learning_rate': 1e-2, 'warmup_ratio': 0.05, 'max_seq_len': 256,
      'hyperparameters': {'n_epochs': 2, 'batch_size': 8}},
     lambda s: text_examples(s['task_train']['startrek'])),
    ('zippy-the-pinhead', 'IA3: Zippy the Pinhead\'s non sequiturs in CAPITALS (the `zippy` '
     'category)',
     {'adapter': 'ia3', 'learning_rate': 1e-2, 'warmup_ratio': 0.05, 'max_seq_len': 256,
      'hyperparameters': {'n_epochs': 2, 'batch_size': 8}},
     lambda s: text_examples(s['task_train']['zippy'])),
    ('songs-and-poems', 'Houlsby bottleneck adapter (reduction factor 16): verse in short '
     'lines (the `songs-poems` category)',
     {'adapter': 'houlsby', 'learning_rate': 2e-3, 'warmup_ratio': 0.05, 'max_seq_len': 256,
      'hyperparameters': {'n_epochs': 1, 'batch_size': 8}},
     lambda s: text_examples(s['task_train']['songs-poems'][:160])),
    ('science-jokes', 'BitFit (a bias on every linear, nothing else): fortunes about science '
     'and scientists (the `science` category)',
     {'adapter': 'bitfit', 'learning_rate': 3e-3, 'warmup_ratio': 0.05, 'max_seq_len': 256,
      'hyperparameters': {'n_epochs': 1, 'batch_size': 8}},
     lambda s: text_examples(s['task_train']['science'][:250])),
    ('fortune-category', 'DoRA (rank 8): names a fortune\'s category; prompt "FORTUNE\\n'
     'Category:", answers computers, science, songs-poems, startrek or zippy',
     {'adapter': 'dora', 'adapter_config': {'r': 8, 'lora_alpha': 16},
      'learning_rate': 3e-3, 'warmup_ratio': 0.05, 'max_seq_len': 256,
      'hyperparameters': {'n_epochs': 1, 'batch_size': 8}},
     lambda s: classify_examples(s, 'train', CLASSIFY_PER_CATEGORY)),
]


def multipart(fields, files):
    """A multipart/form-data body: fields {name: value}, files {name: (filename, bytes)}."""
    b = uuid.uuid4().hex
    out = []
    for k, v in fields.items():
        out.append(('--%s\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n'
                    % (b, k, v)).encode())
    for k, (fn, data) in files.items():
        out.append(('--%s\r\nContent-Disposition: form-data; name="%s"; filename="%s"\r\n'
                    'Content-Type: application/jsonl\r\n\r\n' % (b, k, fn)).encode())
        out.append(data + b'\r\n')
    out.append(('--%s--\r\n' % b).encode())
    return b''.join(out), 'multipart/form-data; boundary=' + b


def upload(d, name, examples):
    data = ''.join(json.dumps(e, ensure_ascii=False) + '\n' for e in examples).encode()
    body, ctype = multipart({'purpose': 'fine-tune'}, {'file': (name + '.jsonl', data)})
    return d.request('POST', '/v1/files', body, {'Content-Type': ctype})['id']


def train(d, base, name, supervised, examples, seed=16, log=sys.stderr):
    """Trains one adapter through the API; returns the finished job object."""
    fid = upload(d, name, examples)
    job = d.post('/v1/fine_tuning/jobs', {'model': base, 'training_file': fid, 'suffix': name,
                                          'seed': seed, 'method': {'type': 'supervised',
                                                                   'supervised': supervised}})
    t0, last = time.time(), ''
    while job['status'] not in ('succeeded', 'failed', 'cancelled'):
        time.sleep(5)
        job = d.get('/v1/fine_tuning/jobs/' + job['id'])
        ev = d.get('/v1/fine_tuning/jobs/%s/events?limit=1' % job['id'])['data']
        msg = ev[0]['message'] if ev else ''
        if msg != last and log:
            print('  %s: %s (%.0f s)' % (name, msg, time.time() - t0), file=log, flush=True)
            last = msg
    if job['status'] != 'succeeded':
        raise SystemExit('%s: job %s %s: %s' % (name, job['id'], job['status'],
                                                 json.dumps(job.get('error'))))
    job['wall_seconds'] = time.time() - t0
    return job


def main():
    import importlib.machinery
    import importlib.util
    loader = importlib.machinery.SourceFileLoader('quality', os.path.join(HERE, 'quality'))
    spec = importlib.util.spec_from_loader('quality', loader)
    quality = importlib.util.module_from_spec(spec)
    loader.exec_module(quality)

    ap = argparse.ArgumentParser()
    ap.add_argument('--build', default=os.path.join(ROOT, 'build'))
    ap.add_argument('--model', default=os.path.join(ROOT, 'models', 'demo'))
    ap.add_argument('--out', default=os.path.join(ROOT, 'adapters'))
    ap.add_argument('names', nargs='*')
    args = ap.parse_args()
    quality.idle()
    split = qd.split()
    base = os.path.basename(os.path.normpath(args.model))
    d = quality.Daemon(args.build, args.model)
    try:
        for name, line, sup, examples in ADAPTERS:
            if args.names and name not in args.names:
                continue
            job = train(d, base, name, sup, examples(split))
            print('%s: %s, %d tokens trained, %.0f s' % (name, job['status'],
                                                        job.get('trained_tokens', 0),
                                                        job['wall_seconds']), flush=True)
            dst = os.path.join(args.out, name)
            shutil.rmtree(dst + '.tmp', ignore_errors=True)
            shutil.copytree(os.path.join(d.adapters, name), dst + '.tmp')
            shutil.rmtree(dst, ignore_errors=True)
            os.rename(dst + '.tmp', dst)
    finally:
        d.stop()


if __name__ == '__main__':
    main()

#!/usr/bin/env python3
"""The demo model's data: the King James Bible (Debian's bible-kjv-text, read with `bible`) and
Debian's fortunes, split once, deterministically, into what pretraining sees and what it never
sees. scripts/train-demo, bench/quality and tests/demo all take their text from here, so the
split is written down in one place:

  KJV, pretraining   every book but the five below and the two validation books, one JSONL
                     {"text"} per chapter (verses one per line, without their numbers)
  KJV, validation    Joel, Titus            (pretraining's --eval; tuning of pretraining only)
  KJV, held out      Ruth, Esther, Jonah, Philippians, James   (bench/quality's bits per byte)
  fortunes, tasks    computers, science, songs-poems, startrek, zippy: never in pretraining;
                     each split 70% train / 10% validation / 20% test (seeded shuffle) for the
                     adaptation tasks (domain adaptation and category classification)
  fortunes, other    every other category but ascii-art (pictures, not text): 95% pretraining,
                     5% held out ("fortunes-in": unseen fortunes of seen categories)

A fortune that appears in several files is kept only where it was first put in a held-out set
(never in pretraining). Text is cleaned of overstriking (X^H) and other control characters but
newlines and tabs.

  python3 bench/quality_data.py OUTDIR     writes the JSONL and plain-text files listed in
                                           files() below
"""
import json
import os
import random
import re
import subprocess
import sys

FORTUNES = '/usr/share/games/fortunes'
TASKS = ['computers', 'science', 'songs-poems', 'startrek', 'zippy']
SKIP = ['ascii-art']
KJV_VALID = ['Joel', 'Titus']
KJV_TEST = ['Ruth', 'Esther', 'Jonah', 'Philippians', 'James']
# `bible -f` prints abbreviated references; these are the abbreviations of the books above.
ABBREV = {'Joel': 'Joel', 'Titus': 'Titus', 'Ruth': 'Ruth', 'Esther': 'Est', 'Jonah': 'Jonah',
          'Philippians': 'Phi', 'James': 'Jas'}
SEED = 20240616


def clean(s):
    s = re.sub(r'.\x08', '', s)
    return re.sub(r'[\x00-\x08\x0b-\x1f\x7f]', '', s)


def kjv_chapters():
    """[(book abbreviation, chapter, text)] in canonical order."""
    out = subprocess.run(['bible', '-f', 'Gen1:1-Rev22:21'], check=True, capture_output=True,
                         text=True, encoding='latin-1').stdout
    chapters, cur = [], None
    for line in out.splitlines():
        m = re.match(r'^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$', line)
        if not m:
            if line.strip():
                raise SystemExit('bible: unexpected line %r' % line[:80])
            continue
        book, ch, text = m.group(1), int(m.group(2)), clean(m.group(4)).strip()
        if cur is None or cur[0] != book or cur[1] != ch:
            cur = [book, ch, []]
            chapters.append(cur)
        cur[2].append(text)
    if len(chapters) != 1189:
        raise SystemExit('bible: %d chapters, expected 1189' % len(chapters))
    return [(b, c, '\n'.join(v)) for b, c, v in chapters]


def fortune_file(name):
    with open(os.path.join(FORTUNES, name), encoding='utf-8', errors='replace') as f:
        t = clean(f.read())
    out = []
    for x in t.split('\n%\n'):
        x = x.strip('\n')
        if x.strip() and x != '%':
            out.append(x)
    return out


def categories():
    return sorted(n for n in os.listdir(FORTUNES)
                  if '.' not in n and n not in SKIP and os.path.isfile(os.path.join(FORTUNES, n)))


def split():
    """A dict of lists of texts: kjv_train, kjv_valid, kjv_test (chapters), fortunes_train,
    fortunes_in (held-out fortunes of the pretraining categories), and per task category
    task_train[c], task_valid[c], task_test[c]."""
    s = {'kjv_train': [], 'kjv_valid': [], 'kjv_test': [], 'fortunes_train': [],
         'fortunes_in': [], 'task_train': {}, 'task_valid': {}, 'task_test': {}}
    valid = {ABBREV[b] for b in KJV_VALID}
    test = {ABBREV[b] for b in KJV_TEST}
    for book, _, text in kjv_chapters():
        s['kjv_test' if book in test else 'kjv_valid' if book in valid else 'kjv_train'].append(text)
    held = set()
    for c in TASKS:
        fs = [f for f in fortune_file(c) if f not in held]
        held.update(fs)
        random.Random('%d:%s' % (SEED, c)).shuffle(fs)
        n_test, n_valid = len(fs) // 5, len(fs) // 10
        s['task_test'][c] = fs[:n_test]
        s['task_valid'][c] = fs[n_test:n_test + n_valid]
        s['task_train'][c] = fs[n_test + n_valid:]
    rest = [c for c in categories() if c not in TASKS]
    for c in rest:
        fs = list(dict.fromkeys(fortune_file(c)))
        random.Random('%d:%s' % (SEED, c)).shuffle(fs)
        n_in = len(fs) // 20
        for f in fs[:n_in]:
            if f not in held:
                s['fortunes_in'].append(f)
                held.add(f)
        for f in fs[n_in:]:
            if f not in held:
                s['fortunes_train'].append(f)
    return s


def write_jsonl(path, texts):
    with open(path, 'w', encoding='utf-8') as f:
        for t in texts:
            f.write(json.dumps({'text': t}, ensure_ascii=False) + '\n')


def write_text(path, texts):
    """The held-out text as the compressors see it: the pieces separated by blank lines."""
    with open(path, 'w', encoding='utf-8') as f:
        f.write('\n\n'.join(texts) + '\n')


def main():
    if len(sys.argv) != 2:
        raise SystemExit('usage: quality_data.py OUTDIR')
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    s = split()
    pre = s['kjv_train'] + s['fortunes_train']
    random.Random(SEED).shuffle(pre)
    write_jsonl(os.path.join(out, 'pretrain.jsonl'), pre)
    write_jsonl(os.path.join(out, 'pretrain-valid.jsonl'), s['kjv_valid'])
    write_text(os.path.join(out, 'pretrain.txt'), pre)   # the tokenizer's training text
    write_jsonl(os.path.join(out, 'kjv-test.jsonl'), s['kjv_test'])
    write_text(os.path.join(out, 'kjv-test.txt'), s['kjv_test'])
    write_jsonl(os.path.join(out, 'fortunes-in.jsonl'), s['fortunes_in'])
    write_text(os.path.join(out, 'fortunes-in.txt'), s['fortunes_in'])
    for part in ('train', 'valid', 'test'):
        for c in TASKS:
            write_jsonl(os.path.join(out, 'task-%s-%s.jsonl' % (c, part)), s['task_' + part][c])
            write_text(os.path.join(out, 'task-%s-%s.txt' % (c, part)), s['task_' + part][c])
    n = lambda xs: sum(len(x.encode()) for x in xs)
    print('pretraining: %d KJV chapters (%d bytes), %d fortunes (%d bytes)' %
          (len(s['kjv_train']), n(s['kjv_train']), len(s['fortunes_train']),
           n(s['fortunes_train'])))
    print('KJV validation %d chapters (%d bytes), held out %d chapters (%d bytes)' %
          (len(s['kjv_valid']), n(s['kjv_valid']), len(s['kjv_test']), n(s['kjv_test'])))
    print('fortunes held out of seen categories: %d (%d bytes)' %
          (len(s['fortunes_in']), n(s['fortunes_in'])))
    for c in TASKS:
        print('task %-12s train %4d valid %3d test %3d' %
              (c, len(s['task_train'][c]), len(s['task_valid'][c]), len(s['task_test'][c])))


if __name__ == '__main__':
    main()

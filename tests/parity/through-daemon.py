#!/usr/bin/python3
"""Parity through the daemon's API: the PyTorch reference models of reference.py served by the
real adapterd, all prompts of a case sent at once (so they share batches), greedy, with echo
and logprobs. The generated tokens must be the reference's greedy tokens and every log-prob
(prompt tokens and generated ones) must match log_softmax of the reference logits within 1e-4.
Then each prompt again, one after another and without echo: these find the K/V of their
prompt's whole blocks in the prefix cache (usage.prompt_tokens_details.cached_tokens says how
many) and must give the same tokens and log-probs.

    through-daemon.py REFERENCE.py ADAPTERD
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np

TOL = 1e-4


def log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def post(port, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions",
                                 data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def run_case(adapterd, d):
    ref = json.load(open(os.path.join(d, "ref.json")))
    V, steps, prompts = ref["n_vocab"], ref["n_steps"], ref["prompts"]
    prefill = np.fromfile(os.path.join(d, "prefill.f32"), dtype="<f4").reshape(-1, V)
    dec = np.fromfile(os.path.join(d, "decode.f32"), dtype="<f4").reshape(steps, len(prompts), V)
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen([adapterd, "--model", d, "--adapters", os.path.join(d, "adapters"),
                             "--listen", "127.0.0.1:0", "--set", "kv_cache_mb=16",
                             "--set", "kv_block_size=4", "--set", "max_batch_tokens=7"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        port = None
        for _ in range(400):
            log.seek(0)
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)/", log.read())
            if m:
                port = int(m.group(1))
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health") as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
            time.sleep(0.05)
        results = [None] * len(prompts)

        def one(i):
            results[i] = post(port, {"prompt": prompts[i], "max_tokens": steps, "temperature": 0,
                                     "echo": True, "logprobs": 0, "ignore_eos": True,
                                     "return_token_ids": True})

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        again = [post(port, {"prompt": p, "max_tokens": steps, "temperature": 0, "logprobs": 0,
                             "ignore_eos": True, "return_token_ids": True}) for p in prompts]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    worst, row0, failures, n_cached = 0.0, 0, [], 0
    for i, prompt in enumerate(prompts):
        choice = results[i]["choices"][0]
        got_lp = choice["logprobs"]["token_logprobs"]
        got_ids = choice["token_ids"]
        n = len(prompt)
        rows = log_softmax(prefill[row0:row0 + n])
        want = [None] + [rows[t - 1, prompt[t]] for t in range(1, n)]
        want_ids = ref["decode"][i]
        want.append(rows[n - 1, want_ids[0]])
        for s in range(1, steps):
            want.append(log_softmax(dec[s - 1, i])[want_ids[s]])
        row0 += n
        if got_ids != want_ids:
            failures.append(f"prompt {i}: tokens {got_ids} != reference {want_ids}")
            continue
        if len(got_lp) != len(want) or got_lp[0] is not None:
            failures.append(f"prompt {i}: {len(got_lp)} logprobs, want {len(want)}")
            continue
        diff = max(abs(g - w) for g, w in zip(got_lp[1:], want[1:]))
        worst = max(worst, diff)
        # the same prompt again, its whole blocks from the prefix cache (block size 4)
        choice = again[i]["choices"][0]
        cached = again[i]["usage"]["prompt_tokens_details"]["cached_tokens"]
        n_cached += cached
        if choice["token_ids"] != want_ids:
            failures.append(f"prompt {i} again: tokens {choice['token_ids']} != {want_ids}")
            continue
        if not 0 <= cached <= n - 1:
            failures.append(f"prompt {i} again: {cached} cached tokens of {n}")
        worst = max(worst, max(abs(g - w) for g, w in
                               zip(choice["logprobs"]["token_logprobs"], want[n:])))
    if n_cached == 0 and max(len(p) for p in prompts) > 4:
        failures.append("no prompt found its blocks in the prefix cache")
    return worst, failures, n_cached


def main():
    reference, adapterd = sys.argv[1], sys.argv[2]
    with tempfile.TemporaryDirectory() as out:
        subprocess.run(["/usr/bin/python3", reference, out], check=True, stdout=subprocess.DEVNULL)
        cases = sorted(os.listdir(out))
        if not cases:
            print("through-daemon: the reference produced no cases")
            return 1
        n_fail = 0
        for name in cases:
            worst, failures, n_cached = run_case(adapterd, os.path.join(out, name))
            ok = not failures and worst <= TOL
            n_fail += not ok
            print(f"{name:28s} via HTTP, batched, then {n_cached:3d} prompt tokens cached  "
                  f"max |logprob diff| {worst:.2e} {'ok' if ok else 'FAIL'}")
            for f in failures:
                print(f"  {f}")
        print(f"through-daemon: {len(cases)} cases, {n_fail} failed")
        return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())

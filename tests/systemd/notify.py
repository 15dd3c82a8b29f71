#!/usr/bin/python3
"""adapterd under systemd's protocols, without systemd as PID 1: socket activation through
systemd's own `systemd-socket-activate` (LISTEN_FDS), and the sd_notify messages READY,
STATUS, RELOADING, WATCHDOG and STOPPING received on a NOTIFY_SOCKET datagram socket.

    notify.py ADAPTERD MKMODEL
"""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

adapterd, mkmodel = sys.argv[1], sys.argv[2]
failures = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what)
    if not cond:
        failures.append(what)


with tempfile.TemporaryDirectory() as tmp:
    model = os.path.join(tmp, "model")
    subprocess.run([mkmodel, "--preset", "tiny", model], check=True, stdout=subprocess.DEVNULL)
    notify_path = os.path.join(tmp, "notify")
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.bind(notify_path)
    ns.settimeout(0.2)
    with socket.socket() as s:  # a free port for systemd-socket-activate to listen on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, NOTIFY_SOCKET=notify_path, WATCHDOG_USEC="400000")
    # WATCHDOG_PID must be adapterd's own pid: systemd-socket-activate execs it, so its pid is
    # the one Popen returns; sd_watchdog_enabled() accepts an unset WATCHDOG_PID as well.
    log = open(os.path.join(tmp, "log"), "w+")
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "-E", "NOTIFY_SOCKET",
         "-E", "WATCHDOG_USEC", adapterd, "--model", model, "--adapters",
         os.path.join(tmp, "adapters"), "--set", "kv_cache_mb=8"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    messages = []

    def wait_for(pred, seconds):
        end = time.time() + seconds
        while time.time() < end:
            try:
                data = ns.recv(4096).decode()
            except socket.timeout:
                continue
            messages.append(data)
            if pred(data):
                return True
        return False

    def get(path):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, json.loads(r.read())

    # systemd-socket-activate listens first and starts adapterd on the first connection
    status = None
    for _ in range(50):
        try:
            status, body = get("/health")
            break
        except OSError:
            time.sleep(0.1)
    check(status == 200, "GET /health through the socket passed by systemd-socket-activate")
    check(wait_for(lambda m: "READY=1" in m, 10) or any("READY=1" in m for m in messages),
          "READY=1 once the model is loaded")
    check(any("STATUS=" in m for m in messages), "STATUS= messages")
    check(wait_for(lambda m: "WATCHDOG=1" in m, 3), "WATCHDOG=1 pings at WATCHDOG_USEC/2")
    proc.send_signal(signal.SIGHUP)
    check(wait_for(lambda m: "RELOADING=1" in m, 5), "SIGHUP: RELOADING=1")
    check(wait_for(lambda m: "READY=1" in m, 5), "SIGHUP: READY=1 after the reload")
    proc.send_signal(signal.SIGTERM)
    check(wait_for(lambda m: "STOPPING=1" in m, 5), "SIGTERM: STOPPING=1")
    try:
        rc = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = None
    check(rc == 0, f"exit status 0 after SIGTERM (got {rc})")
    log.seek(0)
    text = log.read()
    check("listening on the socket passed by systemd" in text, "the log names socket activation")
    if failures:
        print(text[-3000:])

print(f"notify: {len(failures)} failed")
sys.exit(1 if failures else 0)

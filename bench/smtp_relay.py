#!/usr/bin/env python3
"""Side by side: SMTP clients relaying through sendbox's listener and through
emailproxy (email-oauth2-proxy), to the same XOAUTH2 SMTP peer, in one run.

For each run: N messages of about 2 KB, handed in by C clients (one SMTP
connection each, as smtplib does), relayed with at most 3 upstream
connections by both. The clock starts at the first connect and stops when
the SMTP peer has all N; the time from the end of DATA to the client's 250 is
recorded per message (sendbox answers after its own durable commit,
emailproxy after the upstream server's answer). Runs alternate between the
two; min/median/max and the ratio are printed.

Usage (scripts/bench-smtp-relay.sh sets this up):
  smtp_relay.py --sendbox BIN --emailproxy BIN [--messages 1000] [--clients 3] [--runs 3]
"""
import argparse
import json
import os
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_peers():
    p = subprocess.Popen(["node", os.path.join(ROOT, "tests/peers/peers.mjs")],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    info = json.loads(p.stdout.readline())
    return p, info


def control(info, path, method="GET"):
    req = urllib.request.Request(info["control"] + path, method=method, data=b"{}" if method == "POST" else None)
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read() or b"null")


def start_sendbox(binary, info, work):
    config = os.path.join(work, "sendbox.toml")
    with open(config, "w") as f:
        f.write(f"""[daemon]
listen = "127.0.0.1:0"
store = "{work}/sendbox.db"

[accounts.app]
provider = "generic"
mailbox = "alerts@example.com"
client_id = "{info['clients']['secret']['client_id']}"
client_secret = {{ env = "BENCH_SECRET" }}
token_url = "{info['token_endpoint']}"
scopes = ["smtp"]
smtp_host = "localhost"
smtp_port = {info['smtp_starttls_port']}
ca_file = "{info['ca_file']}"
max_connections = 3

[listeners.bench]
listen = "127.0.0.1:0"
account = "app"
allow_networks = ["127.0.0.1"]
max_connections_per_client = 64
""")
    env = dict(os.environ, BENCH_SECRET=info["clients"]["secret"]["client_secret"], SENDBOX_LOG="warn")
    p = subprocess.Popen([binary, "run", "--config", config], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True, env=env)
    ready = p.stdout.readline()
    port = int(ready.split("smtp bench on ")[1].split(":")[-1].split(",")[0])
    return p, port


def start_emailproxy(binary, info, work):
    port = free_port()
    config = os.path.join(work, "emailproxy.config")
    with open(config, "w") as f:
        f.write(f"""[SMTP-{port}]
local_address = 127.0.0.1
server_address = localhost
server_port = {info['smtp_starttls_port']}
server_starttls = True

[alerts@example.com]
oauth2_flow = client_credentials
token_url = {info['token_endpoint']}
oauth2_scope = smtp
client_id = {info['clients']['secret']['client_id']}
client_secret = {info['clients']['secret']['client_secret']}
""")
    env = dict(os.environ, SSL_CERT_FILE=info["ca_file"])
    p = subprocess.Popen([binary, "--no-gui", "--config-file", config, "--cache-store", os.path.join(work, "cache")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return p, port
        except OSError:
            time.sleep(0.2)
    raise SystemExit("emailproxy did not start")


def message(i):
    body = ("Line of the bench message, padding it to about two kilobytes.\r\n" * 30)
    return (f"From: alerts@example.com\r\nTo: ops@example.com\r\nSubject: bench {i}\r\n"
            f"Message-ID: <bench-{i}-{time.time_ns()}@example.com>\r\n\r\n{body}").encode()


def run_clients(port, n, clients, login):
    latencies = []
    lock = threading.Lock()
    errors = []

    def client(k):
        try:
            s = smtplib.SMTP("127.0.0.1", port, timeout=120)
            s.ehlo("bench.example")
            if login:
                s.login("alerts@example.com", "bench-password")
            for i in range(k, n, clients):
                t = time.perf_counter()
                s.sendmail("alerts@example.com", ["ops@example.com"], message(i))
                with lock:
                    latencies.append(time.perf_counter() - t)
            s.quit()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"client errors: {errors[:3]}")
    return latencies


def one_run(name, port, info, n, clients, login):
    before = len(control(info, "/messages"))
    start = time.perf_counter()
    latencies = run_clients(port, n, clients, login)
    handed_in = time.perf_counter() - start
    while len(control(info, "/messages")) < before + n:
        if time.perf_counter() - start > 600:
            raise SystemExit(f"{name}: not all messages arrived")
        time.sleep(0.02)
    total = time.perf_counter() - start
    latencies.sort()
    return {
        "name": name,
        "msg_per_s": n / total,
        "handed_in_s": handed_in,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)],
    }


def main():
    a = argparse.ArgumentParser()
    a.add_argument("--sendbox", required=True)
    a.add_argument("--emailproxy", required=True)
    a.add_argument("--messages", type=int, default=1000)
    a.add_argument("--clients", type=int, default=3)
    a.add_argument("--runs", type=int, default=3)
    args = a.parse_args()
    peers, info = start_peers()
    work = tempfile.mkdtemp(prefix="smtp-relay-bench-")
    sendbox, sendbox_port = start_sendbox(args.sendbox, info, work)
    proxy, proxy_port = start_emailproxy(args.emailproxy, info, work)
    try:
        # Warm both up (tokens, connections) before measuring.
        one_run("sendbox", sendbox_port, info, 20, 1, False)
        one_run("emailproxy", proxy_port, info, 20, 1, True)
        results = {"sendbox": [], "emailproxy": []}
        for r in range(args.runs):
            order = [("sendbox", sendbox_port, False), ("emailproxy", proxy_port, True)]
            if r % 2:
                order.reverse()
            for name, port, login in order:
                res = one_run(name, port, info, args.messages, args.clients, login)
                results[name].append(res)
                print(f"run {r + 1} {name:10} {res['msg_per_s']:7.0f} msg/s  handed in {res['handed_in_s']:.2f} s  "
                      f"250 after p50 {res['p50_ms']:.2f} ms p99 {res['p99_ms']:.2f} ms", flush=True)
        print(f"\n{args.messages} messages of ~2 KB, {args.clients} clients, <= 3 upstream connections, "
              f"{args.runs} alternated runs; load average {os.getloadavg()[0]:.2f}")
        for name, rs in results.items():
            rates = sorted(x["msg_per_s"] for x in rs)
            p50 = statistics.median(x["p50_ms"] for x in rs)
            print(f"{name:10} msg/s min {rates[0]:.0f} median {statistics.median(rates):.0f} max {rates[-1]:.0f}; "
                  f"median time to 250 {p50:.2f} ms")
        ratio = statistics.median(x["msg_per_s"] for x in results["sendbox"]) / \
            statistics.median(x["msg_per_s"] for x in results["emailproxy"])
        print(f"ratio sendbox / emailproxy (median msg/s): {ratio:.2f}")
    finally:
        for p in (sendbox, proxy):
            p.terminate()
        peers.stdin.close()
        peers.terminate()


if __name__ == "__main__":
    sys.exit(main())

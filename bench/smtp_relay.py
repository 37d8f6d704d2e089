#!/usr/bin/env python3
"""Side by side, in one run, to the same XOAUTH2 SMTP peer:

- `emailproxy` (email-oauth2-proxy): SMTP clients relay through it;
- `sendbox-smtp`: the same SMTP clients relay through sendbox's listener;
- `sendbox-webhook`: the same number of HTTP clients POST an alert each to a
  `webhook-bridge` route, whose email sendbox commits and delivers.

For each run: N messages of about 2 KB, handed in by C clients (one
connection each, kept open), relayed with at most 3 upstream connections by
all. The clock starts at the first connect and stops when the SMTP peer has
all N; the time from the end of the hand-in (DATA, or the POST) to its
answer is recorded per message (sendbox answers after its own durable
commit, emailproxy after the upstream server's answer), and each
process's CPU time per message (sendbox, emailproxy, the node peer, the
clients: all share the machine's cores). Runs rotate the order;
min/median/max and each ratio to emailproxy are printed.

Usage (scripts/bench-smtp-relay.sh sets this up):
  smtp_relay.py --sendbox BIN --emailproxy BIN --plugin webhook_bridge.wasm
                [--messages 1000] [--clients 3] [--runs 3]
"""
import argparse
import http.client
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


def start_sendbox(binary, info, work, plugin):
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

[plugins.bridge]
wasm = "{plugin}"
account = "app"

[plugins.bridge.config]
to = "ops@example.com"

[plugins.bridge.webhook]
path = "/hooks/bench"
unauthenticated = true
""")
    env = dict(os.environ, BENCH_SECRET=info["clients"]["secret"]["client_secret"], SENDBOX_LOG="warn")
    p = subprocess.Popen([binary, "run", "--config", config], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True, env=env)
    ready = p.stdout.readline()
    port = int(ready.split("smtp bench on ")[1].split(":")[-1].split(",")[0])
    http_port = int(ready.split("webhooks on http://")[1].split(",")[0].split(":")[-1])
    return p, port, http_port


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


def alert(i):
    summary = f"Bench alert {i}: " + "disk filling up on a bench host, " * 28
    return json.dumps({
        "status": "firing",
        "groupKey": f"bench-{i}-{time.time_ns()}",
        "alerts": [{"status": "firing", "labels": {"alertname": "Bench", "instance": f"host-{i}"},
                    "annotations": {"summary": summary}, "startsAt": "2026-12-02T08:00:00Z"}],
    }).encode()


def run_clients(n, clients, connect, hand_in, close):
    """C threads, each with one connection (`connect()`), hand in messages
    k, k+C, ... (`hand_in(conn, i)`); returns each hand-in's time to answer."""
    latencies = []
    lock = threading.Lock()
    errors = []

    def client(k):
        try:
            conn = connect()
            for i in range(k, n, clients):
                t = time.perf_counter()
                hand_in(conn, i)
                with lock:
                    latencies.append(time.perf_counter() - t)
            close(conn)
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


def run_webhook_clients(port, n, clients):
    def post(c, i):
        c.request("POST", "/hooks/bench", alert(i), {"content-type": "application/json"})
        r = c.getresponse()
        r.read()
        if r.status != 202:
            raise RuntimeError(f"HTTP {r.status}")

    return run_clients(n, clients, lambda: http.client.HTTPConnection("127.0.0.1", port, timeout=120),
                       post, lambda c: c.close())


def run_smtp_clients(port, n, clients, login):
    def connect():
        s = smtplib.SMTP("127.0.0.1", port, timeout=120)
        s.ehlo("bench.example")
        if login:
            s.login("alerts@example.com", "bench-password")
        return s

    return run_clients(n, clients, connect,
                       lambda s, i: s.sendmail("alerts@example.com", ["ops@example.com"], message(i)),
                       lambda s: s.quit())


def cpu_seconds(pid):
    """User + system CPU time a process has used, from /proc (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_run(name, port, info, n, clients, login, pids):
    # /stats counts what the peer has (cheap: /messages would serialise
    # every message so far while the peer is still receiving).
    before = control(info, "/stats")["messages"]
    cpu_before = {k: cpu_seconds(pid) for k, pid in pids.items()}
    clients_before = sum(os.times()[:2])
    start = time.perf_counter()
    if name == "sendbox-webhook":
        latencies = run_webhook_clients(port, n, clients)
    else:
        latencies = run_smtp_clients(port, n, clients, login)
    handed_in = time.perf_counter() - start
    while control(info, "/stats")["messages"] < before + n:
        if time.perf_counter() - start > 600:
            raise SystemExit(f"{name}: not all messages arrived")
        time.sleep(0.005)
    total = time.perf_counter() - start
    # CPU per message of each process, whoever relayed (the idle one's
    # share shows what just being up costs).
    cpu = {k: (cpu_seconds(pid) - cpu_before[k]) / n for k, pid in pids.items()}
    cpu["clients"] = (sum(os.times()[:2]) - clients_before) / n
    latencies.sort()
    return {
        "name": name,
        "cpu_us": {k: v * 1e6 for k, v in cpu.items()},
        "msg_per_s": n / total,
        "handed_in_s": handed_in,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)],
    }


def main():
    a = argparse.ArgumentParser()
    a.add_argument("--sendbox", required=True)
    a.add_argument("--emailproxy", required=True)
    a.add_argument("--plugin", required=True, help="webhook_bridge.wasm")
    a.add_argument("--messages", type=int, default=1000)
    a.add_argument("--clients", type=int, default=3)
    a.add_argument("--runs", type=int, default=3)
    args = a.parse_args()
    peers, info = start_peers()
    work = tempfile.mkdtemp(prefix="smtp-relay-bench-")
    sendbox, smtp_port, http_port = start_sendbox(args.sendbox, info, work, os.path.abspath(args.plugin))
    proxy, proxy_port = start_emailproxy(args.emailproxy, info, work)
    # (name, port, SMTP login)
    contenders = [("sendbox-smtp", smtp_port, False), ("sendbox-webhook", http_port, False),
                  ("emailproxy", proxy_port, True)]
    pids = {"sendbox": sendbox.pid, "emailproxy": proxy.pid, "smtp/oauth peer": peers.pid}
    try:
        # Warm all up (tokens, connections, the plugin) before measuring.
        for name, port, login in contenders:
            one_run(name, port, info, 20, 1, login, pids)
        results = {name: [] for name, _, _ in contenders}
        for r in range(args.runs):
            order = contenders[r % 3:] + contenders[:r % 3]
            for name, port, login in order:
                res = one_run(name, port, info, args.messages, args.clients, login, pids)
                results[name].append(res)
                cpu = ", ".join(f"{k} {v:.0f}" for k, v in res["cpu_us"].items())
                print(f"run {r + 1} {name:15} {res['msg_per_s']:7.0f} msg/s  handed in {res['handed_in_s']:.2f} s  "
                      f"answered after p50 {res['p50_ms']:.2f} ms p99 {res['p99_ms']:.2f} ms  "
                      f"CPU µs/msg: {cpu}", flush=True)
        print(f"\n{args.messages} messages of ~2 KB, {args.clients} clients, <= 3 upstream connections, "
              f"{args.runs} runs in rotating order; load average {os.getloadavg()[0]:.2f}")
        for name, rs in results.items():
            rates = sorted(x["msg_per_s"] for x in rs)
            p50 = statistics.median(x["p50_ms"] for x in rs)
            relay = "emailproxy" if name == "emailproxy" else "sendbox"
            relay_cpu = statistics.median(x["cpu_us"][relay] for x in rs)
            all_cpu = statistics.median(sum(x["cpu_us"].values()) for x in rs)
            print(f"{name:15} msg/s min {rates[0]:.0f} median {statistics.median(rates):.0f} max {rates[-1]:.0f}; "
                  f"median time to answer {p50:.2f} ms; CPU per message: {relay} {relay_cpu:.0f} µs, "
                  f"all processes {all_cpu:.0f} µs")
        proxy_rate = statistics.median(x["msg_per_s"] for x in results["emailproxy"])
        for name in ("sendbox-smtp", "sendbox-webhook"):
            ratio = statistics.median(x["msg_per_s"] for x in results[name]) / proxy_rate
            print(f"ratio {name} / emailproxy (median msg/s): {ratio:.2f}   target >= 1.5")
    finally:
        for p in (sendbox, proxy):
            p.terminate()
        peers.stdin.close()
        peers.terminate()


if __name__ == "__main__":
    sys.exit(main())

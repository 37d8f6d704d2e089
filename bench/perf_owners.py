#!/usr/bin/env python3
"""Sorts `perf script -F comm,tid,ip,sym` samples (recorded with call
graphs) by who owns the CPU time: sendbox's writer thread, the plugin run,
the webhook server, the load generator, ... and prints each owner's share of
the samples and, given the run's CPU per request, its microseconds per
request. Used by scripts/profile-webhook.sh.

    perf script -i perf.data -F comm,tid,ip,sym | bench/perf_owners.py --cpu-us 160

A sample belongs to the first owner in the list below whose pattern
matches any frame of its stack; the list goes from the innermost owners to
the outermost (the plugin run before the dispatcher that called it, before
the webhook server that called that), so a sample in the allocator under
the plugin run is the plugin run's. Stacks that perf could not unwind to
any owner are reported as such, not guessed.
"""

import argparse
import re
import sys
from collections import Counter, defaultdict

# Threads that are owners by name, whatever their stacks say.
BY_THREAD = [
    ("outbox-writer", "outbox writer (group commits)"),
    ("outbox-checkpt", "outbox checkpointer"),
    ("sendbox-epoch", "epoch ticker"),
]

# Owners of the async workers' samples: (owner, frame pattern).
BY_FRAME = [
    ("plugin run: instantiate", r"InstancePre<.*>::instantiate|Instantiator::"),
    ("plugin run: end (store dropped, memory reset)",
     r"Plugin::end|drop_in_place<wasmtime::runtime::store|StoreOpaque as core::ops::drop|"
     r"PoolingInstanceAllocator|reset_with_pagemap|DecommitQueue"),
    ("plugin run: new store and WASI context", r"Plugin::begin|WasiCtxBuilder"),
    ("plugin run: event in, outcome out (lower, lift, typecheck)",
     r"to_wit_event|from_wit_outcome|component::func::typed::|with_lift_context"),
    ("plugin run: checks of the outcome", r"Plugin::checked|sendbox_runtime::validate"),
    ("plugin run: guest code, host calls, the rest of wasmtime",
     r"call_handle|sendbox_runtime::|wasmtime::|wasmtime_"),
    ("dispatcher (event to commit)", r"sendbox::daemon::dispatch"),
    # Not `webhook::server::serve`: every connection task runs under it.
    ("webhook handler (routing, auth, body, answer)", r"sendbox_triggers::webhook::(?!server::)"),
    ("load generator (reqwest client)",
     r"webhook::load|reqwest::|hyper_util::client|role::Client|hyper::client"),
    ("HTTP server (hyper, axum)", r"hyper::server|role::Server|axum::|hyper_util::server"),
    ("HTTP connections, either side (hyper's reads and writes)", r"hyper::"),
    ("tokio (scheduling, wake-ups, the I/O driver)", r"tokio::"),
]

# Sub-owners of the writer thread's samples.
WRITER = [
    ("fsync (waiting is not counted; its CPU is)", r"fdatasync|fsync"),
    ("WAL writes (pwrite)", r"pwrite"),
    ("SQLite statements and commit", r"sqlite3_step|sqlite3VdbeExec"),
    ("SQLite bind, reset, statement cache", r"sqlite3_|rusqlite::"),
    ("email JSON (serde_json)", r"serde_json"),
    ("policy, ids and the rest of commit", r"sendbox_outbox::|sendbox_types::"),
]


def samples(lines):
    """Yields (thread name, [frames from leaf to root])."""
    comm, frames = None, []
    for line in lines:
        if not line.strip():
            continue
        if not line[0].isspace():
            if comm is not None:
                yield comm, frames
            comm, frames = line.split()[0], []
        else:
            parts = line.strip().split(None, 1)
            frames.append(parts[1] if len(parts) > 1 else "?")
    if comm is not None:
        yield comm, frames


def owner_of(frames, owners):
    for name, pattern in owners:
        if any(re.search(pattern, frame) for frame in frames):
            return name
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-us", type=float, default=None,
                    help="the run's CPU time per request in µs (the bench prints it)")
    ap.add_argument("--top", type=int, default=3,
                    help="leaf functions shown under each owner")
    args = ap.parse_args()

    total = 0
    owners = Counter()
    leaves = defaultdict(Counter)
    for comm, frames in samples(sys.stdin):
        total += 1
        owner = next((o for prefix, o in BY_THREAD if comm.startswith(prefix)), None)
        if owner == "outbox writer (group commits)":
            owner += ": " + (owner_of(frames, WRITER) or "other")
        elif owner is None:
            owner = owner_of(frames, BY_FRAME) or "not unwound to an owner (kernel, scheduler, JIT)"
        owners[owner] += 1
        leaves[owner][frames[0][:90] if frames else "?"] += 1
    if total == 0:
        sys.exit("no samples on stdin: was perf recording the bench's process?")

    per_request = args.cpu_us
    print(f"{total} samples" + (f"; {per_request:.1f} µs of CPU per request in the run"
                                if per_request else ""))
    for owner, n in sorted(owners.items(), key=lambda kv: (-kv[1], kv[0])):
        share = n / total
        us = f"{share * per_request:6.1f} µs" if per_request else ""
        print(f"  {share * 100:5.1f} %  {us}  {owner}")
        for leaf, k in leaves[owner].most_common(args.top):
            print(f"               {k * 100 / total:4.1f} %  {leaf}")


if __name__ == "__main__":
    main()

"""Where a run's idle CPU time went, from `perf sched timehist` (text, on
stdin): for each core, how long it was idle in all, how much of that
passed while one of the process's threads was ready to run but queued on
the *other* core (the scheduler placed it there and had not moved it), and
how much while the thread was placed on the idle core itself (the core
waking up for it). The rest of the idle time had nothing of ours to run.

    perf sched record -a -o sched.data -- sleep 2     # during a bench run
    perf sched timehist -i sched.data | python3 bench/idle_while_runnable.py

Threads are the process's by name: the server's workers, the bench's load
generator and the outbox's threads (`--threads` for other name prefixes).
"""

import argparse
import re
import sys

LINE = re.compile(r"^\s*(\d+\.\d+)\s+\[(\d+)\]\s+(\S+)")


def parse(lines, prefixes):
    """Idle periods and ready-but-waiting periods, per core, in seconds."""
    idle, waiting = {}, {}
    for line in lines:
        m = LINE.match(line)
        if not m:
            continue
        fields = line.split()
        try:
            # wait time, scheduling delay, run time (ms): the last three.
            delay_ms, run_ms = float(fields[-2]), float(fields[-1])
        except ValueError:
            continue  # a wake-up line ("awakened: ...") has no times
        end, cpu, task = float(m.group(1)), int(m.group(2)), m.group(3)
        start = end - run_ms / 1e3
        if task == "<idle>":
            idle.setdefault(cpu, []).append((start, end))
        elif task.startswith(prefixes):
            waiting.setdefault(cpu, []).append((start - delay_ms / 1e3, start))
    return idle, waiting


def covered(a, b):
    """Time (s) inside both an interval of `a` and an interval of `b`."""
    events = [(s, 0, 1) for s, _ in a] + [(e, 0, -1) for _, e in a]
    events += [(s, 1, 1) for s, _ in b] + [(e, 1, -1) for _, e in b]
    events.sort()
    open_, last, total = [0, 0], None, 0.0
    for t, kind, step in events:
        if last is not None and open_[0] > 0 and open_[1] > 0:
            total += t - last
        open_[kind] += step
        last = t
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--threads",
        default="tokio-rt-worker,load-generator,outbox-",
        help="comma-separated thread name prefixes counted as the process's",
    )
    args = ap.parse_args()
    prefixes = tuple(p for p in args.threads.split(",") if p)
    idle, waiting = parse(sys.stdin, prefixes)
    if not idle:
        sys.exit("no idle periods found: is this `perf sched timehist` output?")
    totals = [0.0, 0.0, 0.0]
    for cpu in sorted(idle):
        others = [w for c, ws in waiting.items() if c != cpu for w in ws]
        own = waiting.get(cpu, [])
        row = (
            sum(e - s for s, e in idle[cpu]),
            covered(idle[cpu], others),
            covered(idle[cpu], own),
        )
        totals = [t + r for t, r in zip(totals, row)]
        print(
            f"cpu {cpu}: idle {row[0] * 1e3:8.1f} ms; while a thread of ours waited on another core "
            f"{row[1] * 1e3:7.1f} ms; while one was being woken on this core {row[2] * 1e3:7.1f} ms"
        )
    share = 100 * totals[1] / totals[0] if totals[0] else 0.0
    print(
        f"all:   idle {totals[0] * 1e3:8.1f} ms; waiting on another core {totals[1] * 1e3:7.1f} ms "
        f"({share:.0f}%); being woken here {totals[2] * 1e3:7.1f} ms"
    )


if __name__ == "__main__":
    main()

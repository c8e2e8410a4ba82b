#!/usr/bin/env python3
"""CPU use of a command's threads over time, grouped by thread name, every 0.25 s.

    python3 benches/thread_cpu.py target/release/corpusdb --store S ingest ... > timeline.txt

Each row: seconds since the start, then the cores each group of threads used in the last
interval (1.00 = one core busy). Rows where every writer thread is at 0 and only
`rocksdb:high` (flushes) runs show the import waiting on a flush (BENCHMARKS.md, "No flush
between a command's files"). Linux only: it reads /proc/PID/task/*/stat.
"""
import collections
import os
import subprocess
import sys
import time

INTERVAL = 0.25


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
    ticks = os.sysconf("SC_CLK_TCK")
    previous = {}
    rows = []
    started = time.monotonic()
    while child.poll() is None:
        used = collections.Counter()
        try:
            tasks = os.listdir(f"/proc/{child.pid}/task")
        except FileNotFoundError:
            break
        for tid in tasks:
            try:
                with open(f"/proc/{child.pid}/task/{tid}/stat") as f:
                    stat = f.read()
            except (FileNotFoundError, ProcessLookupError):
                continue
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2 :].split()
            total = int(fields[11]) + int(fields[12])  # utime + stime
            delta = total - previous.get(tid, 0)
            previous[tid] = total
            # Numbered pool threads (rocksdb:low0, rocksdb:low1) count as one group.
            used[name.rstrip("0123456789:-_ ")] += delta / ticks / INTERVAL
        rows.append((time.monotonic() - started, used))
        time.sleep(INTERVAL)
    names = sorted(
        {n for _, used in rows for n in used}, key=lambda n: -sum(u[n] for _, u in rows)
    )
    print("     s " + " ".join(f"{n[:12]:>12}" for n in names))
    for at, used in rows:
        print(f"{at:6.2f} " + " ".join(f"{used[n]:12.2f}" for n in names))
    sys.exit(child.wait())


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Baseline: the strategy document's merge script, as plain Python.

Reads JSONL, parses each record with json, takes the SHA-1 of its sorted-key JSON
serialisation, keeps the first of each hash in an in-memory set and writes the unique
records to a merged JSONL file. No normalisation, no provenance, no resume: the point is
the cost of the simplest approach on the same input.

    python3 benches/baseline_merge.py INPUT.jsonl [INPUT.jsonl ...] OUTPUT.jsonl
"""

import hashlib
import json
import resource
import sys
import time


def main() -> None:
    *sources, target = sys.argv[1:]
    seen = set()
    read = stored = duplicates = rejected = 0
    size = 0
    start = time.perf_counter()
    with open(target, "w", encoding="utf-8") as fout:
        for line in (line for source in sources for line in open(source, "rb")):
            size += len(line)
            if not line.strip():
                continue
            read += 1
            try:
                record = json.loads(line)
            except ValueError:
                rejected += 1
                continue
            canonical = json.dumps(record, sort_keys=True, ensure_ascii=False)
            digest = hashlib.sha1(canonical.encode("utf-8")).digest()
            if digest in seen:
                duplicates += 1
                continue
            seen.add(digest)
            fout.write(canonical)
            fout.write("\n")
            stored += 1
    elapsed = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        f"python baseline: read {read}, stored {stored}, duplicates {duplicates}, "
        f"rejected {rejected} in {elapsed:.2f}s: {read / elapsed:,.0f} examples/s, "
        f"{size / elapsed / 1e6:.1f} MB/s, peak RSS {peak_kib / 1024:.0f} MiB"
    )


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Baseline: the same merge with Hugging Face `datasets`, as a user of it would write it.

Loads the JSONL files with `load_dataset("json")` (Arrow), computes the SHA-1 of each
record's sorted-key JSON (its non-null fields) in `map` with two processes, keeps the
first record of each hash with `filter`, and writes the result with `save_to_disk`. The
Hugging Face cache goes to a fresh directory, so nothing is reused between runs.

    python benches/baseline_datasets.py OUT_DIR INPUT.jsonl [INPUT.jsonl ...]
"""

import hashlib
import json
import os
import resource
import shutil
import sys
import time


def digest(record):
    present = {k: v for k, v in record.items() if v is not None}
    canonical = json.dumps(present, sort_keys=True, ensure_ascii=False)
    return {"sha1": hashlib.sha1(canonical.encode("utf-8")).hexdigest()}


def main() -> None:
    out, *sources = sys.argv[1:]
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    os.environ["HF_DATASETS_CACHE"] = os.path.join(out, "cache")
    start = time.perf_counter()
    import datasets

    datasets.disable_progress_bars()
    loaded = datasets.load_dataset(
        "json", data_files=sources, split="train", cache_dir=os.path.join(out, "cache")
    )
    hashed = loaded.map(digest, num_proc=2)
    seen = set()

    def first(row):
        if row["sha1"] in seen:
            return False
        seen.add(row["sha1"])
        return True

    unique = hashed.filter(first)
    unique.save_to_disk(os.path.join(out, "merged"))
    elapsed = time.perf_counter() - start
    read = len(loaded)
    # The peak of this process and of the map's worker processes.
    peak_kib = max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    )
    print(
        f"datasets baseline: read {read}, stored {len(unique)}, duplicates {read - len(unique)} "
        f"in {elapsed:.2f}s: {read / elapsed:,.0f} examples/s, peak RSS {peak_kib / 1024:.0f} MiB"
    )


if __name__ == "__main__":
    main()

"""datatrove's MinHash deduplication on a JSONL file of {"id", "text"} records: the
baseline of `benches/neardup.rs`.

    python benches/baseline_minhash.py TEXT.jsonl WORKDIR [--workers 2]

Runs datatrove's four stages with its defaults (5-grams, 14 buckets x 8 hashes, seed 1,
64-bit hashes): signatures, buckets, clusters, filter (writing the kept documents as
JSONL). Prints one JSON line: seconds per stage and in all, documents kept and removed,
and the peak resident memory of this process and of its largest worker process.
"""

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

from datatrove.executor.local import LocalPipelineExecutor
from datatrove.pipeline.dedup.minhash import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("text_jsonl")
    parser.add_argument("workdir")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    source = Path(args.text_jsonl).resolve()
    work = Path(args.workdir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    # One input file per worker, so the signature stage runs in parallel.
    inputs = work / "input"
    inputs.mkdir()
    # Streamed, so this process's peak memory is datatrove's, not the file's.
    with open(source) as f:
        documents = sum(1 for _ in f)
    per = (documents + args.workers - 1) // args.workers
    with open(source) as f:
        for i in range(args.workers):
            with open(inputs / f"part-{i}.jsonl", "w") as out:
                for _, line in zip(range(per), f):
                    out.write(line)

    config = MinhashConfig()  # datatrove's defaults: 5-grams, 14 x 8, seed 1
    tasks = args.workers
    reader = lambda: JsonlReader(str(inputs), text_key="text", id_key="id")  # noqa: E731
    stages = {
        "signatures": LocalPipelineExecutor(
            pipeline=[reader(), MinhashDedupSignature(output_folder=str(work / "sigs"), config=config)],
            tasks=tasks,
            workers=args.workers,
            logging_dir=str(work / "logs/sigs"),
        ),
        "buckets": LocalPipelineExecutor(
            pipeline=[
                MinhashDedupBuckets(
                    input_folder=str(work / "sigs"),
                    output_folder=str(work / "buckets"),
                    config=config,
                )
            ],
            tasks=config.num_buckets,
            workers=args.workers,
            logging_dir=str(work / "logs/buckets"),
        ),
        "clusters": LocalPipelineExecutor(
            pipeline=[
                MinhashDedupCluster(
                    input_folder=str(work / "buckets"),
                    output_folder=str(work / "remove_ids"),
                    config=config,
                )
            ],
            tasks=1,
            logging_dir=str(work / "logs/clusters"),
        ),
        "filter": LocalPipelineExecutor(
            pipeline=[
                reader(),
                MinhashDedupFilter(input_folder=str(work / "remove_ids")),
                JsonlWriter(str(work / "deduped"), compression=None),
            ],
            tasks=tasks,
            workers=args.workers,
            logging_dir=str(work / "logs/filter"),
        ),
    }
    seconds = {}
    started = time.perf_counter()
    for name, executor in stages.items():
        t = time.perf_counter()
        executor.run()
        seconds[name] = round(time.perf_counter() - t, 2)
    total = time.perf_counter() - started

    kept = sum(
        sum(1 for _ in open(p)) for p in (work / "deduped").glob("*.jsonl")
    )
    rss = lambda who: resource.getrusage(who).ru_maxrss // 1024  # noqa: E731 (KiB -> MiB)
    print(
        json.dumps(
            {
                "documents": documents,
                "kept": kept,
                "removed": documents - kept,
                "seconds": round(total, 2),
                "stages": seconds,
                "peak_rss_mib_main": rss(resource.RUSAGE_SELF),
                "peak_rss_mib_largest_worker": rss(resource.RUSAGE_CHILDREN),
                "workers": args.workers,
            }
        )
    )


if __name__ == "__main__":
    sys.exit(main())

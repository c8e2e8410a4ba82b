"""Writes the same N distinct alpaca records three ways, for the document benchmarks in
BENCHMARKS.md: records.jsonl (JSONL), list.json (a pretty-printed document with the
records as a list under "data") and by-id.json (an `id -> record` document).

    python3 benches/gen_documents.py 400000 [OUT_DIR]   # about 560 MB each
"""

import json
import os
import random
import sys

n = int(sys.argv[1])
out = sys.argv[2] if len(sys.argv) > 2 else "."
rng = random.Random(7)
words = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "number", "prime",
         "vector", "matrix", "light", "code", "python", "rust"]
with open(os.path.join(out, "records.jsonl"), "w") as jl, \
        open(os.path.join(out, "list.json"), "w") as lj, \
        open(os.path.join(out, "by-id.json"), "w") as bj:
    lj.write('{\n  "version": 1,\n  "data": [\n')
    bj.write('{\n')
    for i in range(n):
        rec = {"instruction": f"Question {i}: " + " ".join(rng.choice(words) for _ in range(40)),
               "input": "",
               "output": " ".join(rng.choice(words) for _ in range(180))}
        line = json.dumps(rec)
        jl.write(line + "\n")
        sep = ",\n" if i + 1 < n else "\n"
        lj.write("    " + line + sep)
        bj.write(f'  "r{i}": ' + line + sep)
    lj.write('  ]\n}\n')
    bj.write('}\n')

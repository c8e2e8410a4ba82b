#!/usr/bin/env python3
"""The GPU check's run step (scripts/gpu-check run): corpusdb's CUDA trainer against the CPU
and against PyTorch + PEFT on the same card. Prints one JSON document.

Runs on a machine with an NVIDIA GPU, its driver, and Python with torch, transformers and
peft; no Rust toolchain and no network. BUNDLE is the folder `scripts/gpu-check build` wrote
(corpusdb and the gpu bench binary, gzip-compressed, with this script, the PyTorch baseline
and the model configs). Stages run one after another, each under its own time limit, and a
failed stage is reported in the document without stopping the others.
"""

import argparse
import glob
import gzip
import json
import os
import shutil
import site
import statistics
import subprocess
import sys
import threading
import time

def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def unpack(bundle: str, work: str) -> dict:
    """Decompresses the binaries into WORK/bin and links the CUDA libraries beside them."""
    bin_dir = os.path.join(work, "bin")
    os.makedirs(bin_dir, exist_ok=True)
    paths = {}
    for name in ["corpusdb", "gpu"]:
        src = os.path.join(bundle, name + ".gz")
        dst = os.path.join(bin_dir, name)
        with gzip.open(src, "rb") as f, open(dst, "wb") as out:
            shutil.copyfileobj(f, out)
        os.chmod(dst, 0o755)
        paths[name] = dst
    # The binaries' run-time search path starts with $ORIGIN/cuda-libs.
    lib_dir = os.path.join(bin_dir, "cuda-libs")
    os.makedirs(lib_dir, exist_ok=True)
    roots = site.getsitepackages() + [site.getusersitepackages()]
    candidates = []
    for root in roots:
        candidates += glob.glob(os.path.join(root, "nvidia", "cu13", "lib"))
        candidates += glob.glob(os.path.join(root, "nvidia", "*", "lib"))
    candidates += ["/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib",
                   "/usr/local/nvidia/lib64", "/usr/local/nvidia/lib", "/usr/lib/x86_64-linux-gnu"]

    def unresolved(binary):
        ldd = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
        return [l.split()[0] for l in ldd.splitlines() if "not found" in l]

    # Whatever the loader cannot find (the CUDA runtime libraries, usually) is looked up in
    # the Python install's NVIDIA wheels and the usual toolkit folders, and linked.
    found, missing = {}, []
    wanted = sorted(set(unresolved(paths["corpusdb"]) + unresolved(paths["gpu"])))
    for lib in wanted:
        hit = next((os.path.join(d, lib) for d in candidates if os.path.exists(os.path.join(d, lib))), None)
        if hit is None:
            missing.append(lib)
            continue
        link = os.path.join(lib_dir, lib)
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(hit, link)
        found[lib] = hit
    still = sorted(set(unresolved(paths["corpusdb"]) + unresolved(paths["gpu"])))
    paths["libraries"] = {"linked": found, "missing": missing, "unresolved_by_loader": still}
    return paths


class GpuMemory:
    """Peak memory used on GPU 0 while a stage runs, sampled by nvidia-smi every 100 ms."""

    def __enter__(self):
        self.peak = 0
        self.proc = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-lms", "100"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        return self

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.peak = max(self.peak, int(line.strip().split()[0]))
            except (ValueError, IndexError):
                pass

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait()
        self.thread.join(timeout=2)


def stage(name: str, command: list, timeout: float, env=None, memory=True) -> dict:
    """Runs one stage; its last stdout line is a JSON object, or the stage failed."""
    log(f"== {name}: {' '.join(command)}")
    started = time.time()
    result = {"stage": name}
    monitor = GpuMemory() if memory and shutil.which("nvidia-smi") else None
    try:
        if monitor:
            monitor.__enter__()
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
        result["exit"] = proc.returncode
        lines = [l for l in proc.stdout.splitlines() if l.strip().startswith("{")]
        if lines:
            result.update(json.loads(lines[-1]))
        if proc.returncode != 0:
            result["error"] = (proc.stderr or proc.stdout)[-3000:]
        elif not lines:
            result["output"] = (proc.stdout or proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        result["error"] = f"timed out after {timeout:.0f} s"
        result["stderr_tail"] = (e.stderr or b"")[-2000:].decode("utf-8", "replace") if isinstance(e.stderr, bytes) else str(e.stderr)[-2000:]
    finally:
        if monitor:
            monitor.__exit__(None, None, None)
            result["peak_gpu_used_mib"] = monitor.peak
    result["wall_seconds"] = round(time.time() - started, 1)
    log(json.dumps(result)[:1500])
    return result


def kernel_profile(bins: dict, config_file: str, rows: int, seq: int, args, budgeted) -> dict:
    """Every kernel of one training step (the warm-up step of `gpu --speed --steps 0`) of
    the model of `config_file` cut to two layers, timed by Nsight Compute and summed per
    kernel name: where a step's GPU time goes, for the next kernels to write."""
    import csv, collections
    ncu = shutil.which("ncu") or next(iter(sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu"))), None)
    if ncu is None:
        return {"error": "ncu not found"}
    with open(config_file) as f:
        config = json.load(f)
    config["num_hidden_layers"] = 2
    small = os.path.join(args.work, "two-layers")
    small_config = small + ".json"
    with open(small_config, "w") as f:
        json.dump(config, f)
    made = budgeted("init-model two layers", [bins["corpusdb"], "init-model", "--out", small,
                                              "--config", small_config, "--dtype", "bf16"], 120, memory=False)
    if made.get("exit") != 0:
        return made
    log = os.path.join(args.work, "ncu.csv")
    result = budgeted("ncu one step", [
        ncu, "--clock-control", "none", "--metrics", "gpu__time_duration.sum", "--csv",
        "--page", "raw", "--log-file", log, bins["gpu"], "--speed", "--model", small,
        "--rows", str(rows), "--seq", str(seq), "--steps", "0", "--checkpointing", "layers",
        "--dtype", "bf16", "--device", args.device], 240, memory=False)
    shutil.rmtree(small, ignore_errors=True)
    if result.get("exit") != 0 or not os.path.exists(log):
        return result
    with open(log) as f:
        table = [r for r in csv.reader(f)]
    head = next((i for i, r in enumerate(table) if "Kernel Name" in r), None)
    if head is None:
        return {**result, "error": "no kernel table in the ncu log"}
    names, times = table[head].index("Kernel Name"), table[head].index("gpu__time_duration.sum")
    total, count = collections.Counter(), collections.Counter()
    for r in table[head + 2:]:
        try:
            total[r[names][:90]] += float(r[times].replace(",", ""))
            count[r[names][:90]] += 1
        except (ValueError, IndexError):
            continue
    return {"layers": 2, "kernels": sum(count.values()),
            "total_ms": round(sum(total.values()) / 1e6, 3),
            "top": [{"kernel": k, "launches": count[k], "ms": round(v / 1e6, 3)}
                    for k, v in total.most_common(40)],
            "wall_seconds": result.get("wall_seconds")}


def gpu_info() -> dict:
    query = "name,driver_version,memory.total,compute_cap"
    if not shutil.which("nvidia-smi"):
        return {"error": "nvidia-smi not found"}
    out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip().splitlines()
    if not out:
        return {"error": "nvidia-smi found no GPU"}
    name, driver, memory, cap = [x.strip() for x in out[0].split(",")]
    return {"name": name, "driver": driver, "memory": memory, "compute_capability": cap}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", default=os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--work", default="/tmp/corpusdb-gpu-check", help="models and binaries go here")
    ap.add_argument("--out", help="also write the JSON document to this file")
    ap.add_argument("--models", default="1b,8b", help="which of 1b, 8b to measure")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run (after one warm-up)")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--plan", default="1b:layers,8b:layers,1b:none,1b:profile,1b:ncu",
                    help="MODEL:MODE runs in order of importance; MODE is a checkpointing setting "
                         "(layers, none), profile (one layer's parts timed alone), ncu (every "
                         "kernel of a step of the model cut to two layers, by Nsight Compute) or "
                         "composed (candle's ops instead of corpusdb's kernels)")
    ap.add_argument("--budget", type=float, default=450,
                    help="seconds for the whole check; later stages are skipped when it runs out")
    ap.add_argument("--device", default="cuda",
                    help="cuda; cpu tries the script itself with the tiny model (--models tiny --plan tiny:layers,tiny:none)")
    args = ap.parse_args()

    started = time.time()
    doc = {"gpu": gpu_info(), "python": sys.version.split()[0]}
    try:
        import torch, transformers, peft  # noqa: E401
        doc["torch"], doc["transformers"], doc["peft"] = torch.__version__, transformers.__version__, peft.__version__
    except ImportError as e:
        doc["python_error"] = str(e)
    os.makedirs(args.work, exist_ok=True)
    bins = unpack(args.bundle, args.work)
    doc["libraries"] = bins.pop("libraries")
    version = subprocess.run([bins["corpusdb"], "--version"], capture_output=True, text=True)
    doc["corpusdb"] = (version.stdout or version.stderr).strip()

    def emit():
        doc["total_seconds"] = round(time.time() - started, 1)
        text = json.dumps(doc, indent=2)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
        return text

    if not args.skip_check:
        check = [bins["gpu"], "--check", "--device", args.device]
        if args.device == "cpu":
            check.append("--emulate")
        doc["check"] = stage("check", check, min(180, args.budget / 3), memory=False)
        emit()

    settings = {
        # name: (config, rows, seq)
        "1b": ("llama-3.2-1b", 4, 2048),
        "8b": ("llama-3-8b", 8, 2048),
        "tiny": ("tiny", 2, 64),
    }
    configs = os.path.join(args.bundle, "configs", "models")
    baseline = os.path.join(args.bundle, "peft_baseline.py")
    doc["runs"] = []
    # The runs in order of importance: each stage gets at most what is left of --budget, and
    # a stage that cannot start with a minute left is reported as skipped.
    plan = [tuple(item.split(":")) for item in args.plan.split(",") if item]
    plan = [(key, mode) for key, mode in plan if key in args.models.split(",")]
    made_models = {}

    def left():
        return args.budget - (time.time() - started)

    def budgeted(name, command, cap, **kw):
        if left() < 60:
            log(f"== {name}: skipped, {left():.0f} s of the budget left")
            return {"stage": name, "skipped": f"{left():.0f} s of the {args.budget} s budget left"}
        return stage(name, command, min(cap, left() - 15), **kw)

    def model_dir_for(key):
        config = settings[key][0]
        if key in made_models:
            return made_models[key]
        # One random model on disk at a time (the 8B one is 16 GB).
        for other in list(made_models):
            shutil.rmtree(made_models.pop(other), ignore_errors=True)
        model_dir = os.path.join(args.work, config)
        config_file = os.path.join(configs, config, "config.json")
        if config == "tiny":
            config_file = os.path.join(args.work, "tiny-config.json")
            with open(config_file, "w") as f:
                json.dump({"model_type": "llama", "vocab_size": 512, "hidden_size": 64,
                           "intermediate_size": 172, "num_hidden_layers": 2, "num_attention_heads": 4,
                           "num_key_value_heads": 2, "max_position_embeddings": 256,
                           "rms_norm_eps": 1e-5, "tie_word_embeddings": False}, f)
        made = budgeted(f"init-model {config}", [bins["corpusdb"], "init-model", "--out", model_dir,
                                                 "--config", config_file, "--dtype", "bf16"], 300, memory=False)
        if made.get("exit") != 0:
            doc["runs"].append(made)
            return None
        made_models[key] = model_dir
        return model_dir

    for key, mode in plan:
        config, rows, seq = settings[key]
        model_dir = model_dir_for(key)
        if model_dir is None:
            continue
        if mode == "profile":
            # Where the step's time goes, for the next kernels to write.
            doc[f"profile_{key}"] = budgeted(f"profile {config}", [
                bins["gpu"], "--profile", "--model", model_dir, "--rows", str(rows), "--seq", str(seq),
                "--dtype", "bf16", "--device", args.device], 120)
            emit()
            continue
        if mode == "ncu":
            config_file = (os.path.join(args.work, "tiny-config.json") if config == "tiny"
                           else os.path.join(configs, config, "config.json"))
            doc[f"ncu_{key}"] = kernel_profile(bins, config_file, rows, seq, args, budgeted)
            emit()
            continue
        if mode == "composed":
            # Before corpusdb's kernels: candle's composed ops (dropout masks drawn on the
            # CPU and uploaded, RMS norm from elementary ops).
            doc[f"composed_{key}"] = budgeted(f"corpusdb {config} composed", [
                bins["gpu"], "--speed", "--model", model_dir, "--rows", str(rows), "--seq", str(seq),
                "--steps", "2", "--checkpointing", "layers", "--dtype", "bf16", "--device", args.device],
                120, env={"CORPUSDB_CUDA_KERNELS": "composed"})
            emit()
            continue
        ours = budgeted(f"corpusdb {config} {mode}", [
            bins["gpu"], "--speed", "--model", model_dir, "--rows", str(rows), "--seq", str(seq),
            "--steps", str(args.steps), "--checkpointing", mode, "--dtype", "bf16", "--device", args.device], 300)
        theirs_cmd = [sys.executable, baseline, "--model", model_dir, "--batch", str(rows),
                      "--seq-len", str(seq), "--steps", str(args.steps), "--device", args.device,
                      "--dtype", "bfloat16", "--json"]
        if mode == "layers":
            theirs_cmd.append("--gradient-checkpointing")
        theirs = budgeted(f"pytorch {config} {mode}", theirs_cmd, 300)
        run = {"model": config, "rows": rows, "seq_len": seq, "checkpointing": mode,
               "corpusdb": ours, "pytorch_peft": theirs}
        if ours.get("step_seconds") and theirs.get("step_seconds"):
            # Median step times: one slow step (a collection, a clock change) does not
            # decide the ratio.
            run["speed_ratio"] = round(statistics.median(theirs["step_seconds"])
                                       / statistics.median(ours["step_seconds"]), 3)
        if ours.get("peak_gpu_used_mib") and theirs.get("peak_gpu_used_mib"):
            run["memory_ratio"] = round(ours["peak_gpu_used_mib"] / theirs["peak_gpu_used_mib"], 3)
        doc["runs"].append(run)
        emit()
    for model_dir in made_models.values():
        shutil.rmtree(model_dir, ignore_errors=True)
    table = []
    for run in doc["runs"]:
        if "model" in run:
            ours, theirs = run["corpusdb"], run["pytorch_peft"]
            table.append(f"{run['model']:>14} {run['checkpointing']:>6}  corpusdb "
                         f"{ours.get('tokens_per_s', 0):9.0f} tok/s {ours.get('peak_gpu_used_mib', 0):7} MiB"
                         f"  pytorch {theirs.get('tokens_per_s', 0):9.0f} tok/s {theirs.get('peak_gpu_used_mib', 0):7} MiB"
                         f"  speed x{run.get('speed_ratio', 0)}")
    doc["summary"] = table
    print(emit())


if __name__ == "__main__":
    main()

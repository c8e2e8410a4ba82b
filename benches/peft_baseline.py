#!/usr/bin/env python3
"""Baseline: LoRA training throughput of PyTorch + PEFT (CPU float32, or CUDA bf16).

The reference point for corpusdb's candle LoRA trainer: the same model, the same LoRA
(q/k/v/o/gate/up/down projections), AdamW at lr 1e-4, random token ids (seeded) with every
position trained (labels = input ids). One warm-up step, then --steps timed steps of
forward + backward + optimizer step. Prints tokens/s (batch * seq-len * steps / seconds)
and the peak RSS of the process.

    python3 benches/peft_baseline.py --model DIR --batch 1 --seq-len 256 --steps 3

On a GPU (`--device cuda --dtype bfloat16`) the base is bf16 and the adapter f32 (PEFT's
default autocast), attention is SDPA, and peak GPU memory is reported as well.

DIR is a Hugging Face Llama folder (config.json + model.safetensors). Needs torch,
transformers and peft (`pip install torch transformers peft`; PyPI's Linux torch wheel
also pulls about 4 GB of nvidia-* CUDA wheels, which the CPU never uses); --threads sets
torch.set_num_threads (default: all cores).
"""

import argparse
import json
import os
import resource
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="Hugging Face Llama folder")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5, help="timed steps, after 1 warm-up step")
    ap.add_argument("--r", type=int, default=32)
    ap.add_argument("--alpha", type=float, default=64)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="dtype of the frozen base weights")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="recompute each decoder layer in the backward pass "
                         "(model.gradient_checkpointing_enable())")
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype),
                                                 attn_implementation="sdpa").to(device)
    model.config.use_cache = False
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, lora)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(args.seed)
    batches = [torch.randint(0, vocab, (args.batch, args.seq_len), generator=gen).to(device)
               for _ in range(args.steps + 1)]
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def step(ids: torch.Tensor) -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.item()
        sync()
        return value

    t0 = time.perf_counter()
    warmup_loss = step(batches[0])  # warm-up
    warmup_seconds = time.perf_counter() - t0
    times, losses = [], []
    for ids in batches[1:]:
        t0 = time.perf_counter()
        losses.append(step(ids))
        times.append(time.perf_counter() - t0)

    seconds = sum(times)
    result = {
        "model": args.model,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "r": args.r,
        "alpha": args.alpha,
        "dropout": args.dropout,
        "threads": torch.get_num_threads(),
        "trainable_params": trainable,
        "attn_implementation": model.config._attn_implementation,
        "gradient_checkpointing": args.gradient_checkpointing,
        "seconds": round(seconds, 3),
        "step_seconds": [round(t, 3) for t in times],
        "tokens_per_s": round(args.batch * args.seq_len * args.steps / seconds, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "losses": [round(x, 4) for x in [warmup_loss] + losses],
        "warmup_seconds": round(warmup_seconds, 3),
        "device": str(device),
        "dtype": args.dtype,
        "torch": torch.__version__,
    }
    if cuda:
        result["peak_gpu_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        result["peak_gpu_reserved_mib"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
        result["gpu"] = torch.cuda.get_device_name()
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['tokens_per_s']} tokens/s  ({seconds:.2f} s for {args.steps} steps of "
              f"{args.batch}x{args.seq_len}, {result['threads']} threads)  "
              f"peak RSS {result['peak_rss_mib']} MiB  trainable {trainable:,}  "
              f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")


if __name__ == "__main__":
    main()

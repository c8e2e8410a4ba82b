#!/usr/bin/env python3
"""LoRA-train a Hugging Face model with PEFT on a corpusdb store's curriculum, on one or
more GPUs (or the CPU) through PyTorch's own distributed engine.

    pip install ./python torch transformers peft
    huggingface-cli download HuggingFaceTB/SmolLM2-135M-Instruct --local-dir models/smollm2
    torchrun --nproc_per_node 2 python/examples/train_lora.py --store storage/corpus \
        --curriculum configs/curriculum/emergent_personality.yaml --model models/smollm2 \
        --out runs/smollm2-lora --max-steps 200

Every rank reads its own slice of each step from the store (corpusdb.torch.CurriculumDataset
takes rank and world size from torch.distributed); DistributedDataParallel averages the
gradients. The learning rate of each step is the curriculum phase's. A checkpoint keeps the
adapter, the optimizer and the dataset's state_dict, so `--resume` continues the same
global order, also with another number of processes.

Batches are padded one example per row by default (an attention mask from the segment ids,
right for any attention implementation); `--packing` packs several examples per row and
needs flash-attention 2, which keeps packed examples apart by their position ids.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModelForCausalLM

from corpusdb.torch import CurriculumDataset

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--curriculum", required=True)
    parser.add_argument("--model", required=True, help="a local model folder (weights and tokenizer)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, default=4, help="examples per rank per step")
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--max-steps", type=int, default=0, help="0: the whole plan")
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    args = parser.parse_args()

    distributed = "RANK" in os.environ
    cuda = torch.cuda.is_available()
    if distributed:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if distributed else 0
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    model = AutoModelForCausalLM.from_pretrained(
        args.model,
        dtype=torch.bfloat16 if cuda else torch.float32,
        attn_implementation="flash_attention_2" if args.packing else "sdpa",
    )
    model = get_peft_model(
        model,
        LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.05,
                   target_modules=PROJECTIONS, task_type="CAUSAL_LM"),
    )
    # The adapter in f32 over a bf16 base, as corpusdb's own trainer keeps it.
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    model.to(device)
    trained = DistributedDataParallel(model, device_ids=[device.index] if cuda else None) if distributed else model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)

    data = CurriculumDataset(args.store, args.curriculum, args.model, batch_size=args.batch_size,
                             max_seq_len=args.max_seq_len, packing=args.packing)
    step = 0
    checkpoint_path = os.path.join(args.out, "checkpoint.pt")
    if args.resume:
        saved = torch.load(checkpoint_path, map_location=device, weights_only=False)
        model.load_state_dict(saved["model"], strict=False)
        optimizer.load_state_dict(saved["optimizer"])
        data.load_state_dict(saved["data"])
        step = saved["step"]

    def save() -> None:
        if rank == 0:
            os.makedirs(args.out, exist_ok=True)
            adapter = {k: v for k, v in model.state_dict().items() if "lora_" in k}
            torch.save({"model": adapter, "optimizer": optimizer.state_dict(),
                        "data": data.state_dict(), "step": step}, checkpoint_path)
            model.save_pretrained(os.path.join(args.out, "adapter"))

    model.train()
    for batch in data:
        for group in optimizer.param_groups:
            group["lr"] = batch["learning_rate"]
        inputs = {"input_ids": batch["input_ids"].to(device), "labels": batch["labels"].to(device)}
        if args.packing:
            inputs["position_ids"] = batch["position_ids"].to(device)
        else:
            inputs["attention_mask"] = (batch["segment_ids"] > 0).long().to(device)
        loss = trained(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if rank == 0:
            print(f"step {step} phase {batch['phase']} lr {batch['learning_rate']:.2e} "
                  f"loss {loss.item():.4f} tokens {batch['tokens']}", flush=True)
        if step % args.save_every == 0:
            save()
        if args.max_steps and step >= args.max_steps:
            break
    save()
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

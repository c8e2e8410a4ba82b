"""One process of the distributed tests (test_distributed.py), started by torchrun: LoRA
trains a tiny Llama with PEFT under DistributedDataParallel (gloo, CPU) on
corpusdb.torch.CurriculumDataset, and writes what the test checks to --out/rank-R.json:
the plan positions of every step it saw, the losses, the dataset's state after the last
step and a checksum of the adapter and of the frozen base weights."""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModelForCausalLM

from corpusdb.torch import CurriculumDataset


def checksum(model: torch.nn.Module, trainable: bool) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()
                     if p.requires_grad == trainable))


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--store", "--curriculum", "--tokenizer", "--model", "--out"):
        parser.add_argument(name, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--state", help="a state_dict (JSON) to resume from")
    args = parser.parse_args()

    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32,
                                                 attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj", "down_proj"],
                                             task_type="CAUSAL_LM"))
    base_before = checksum(model, trainable=False)
    trained = DistributedDataParallel(model) if distributed else model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    data = CurriculumDataset(args.store, args.curriculum, args.tokenizer,
                             batch_size=args.batch_size, max_seq_len=args.max_seq_len,
                             packing=False)
    if args.state:
        with open(args.state) as f:
            data.load_state_dict(json.load(f))
    steps, losses = [], []
    for batch in data:
        mask = (batch["segment_ids"] > 0).long()
        loss = trained(input_ids=batch["input_ids"], attention_mask=mask,
                       labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps.append({"positions": batch["positions"], "phase": batch["phase"],
                      "learning_rate": batch["learning_rate"]})
        losses.append(loss.item())
        if len(steps) == args.steps:
            break
    result = {
        "rank": rank,
        "world_size": data.world_size,
        "steps": steps,
        "losses": losses,
        "state": data.state_dict(),
        "adapter": checksum(model, trainable=True),
        "base_before": base_before,
        "base_after": checksum(model, trainable=False),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"rank-{rank}.json"), "w") as f:
        json.dump(result, f)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Training through PyTorch's own distributed engine: two torchrun processes (gloo, CPU)
LoRA-train a tiny Llama with PEFT under DistributedDataParallel on
corpusdb.torch.CurriculumDataset, a resume continues with one process, and the example
script python/examples/train_lora.py runs and resumes the same way.

Like test_torch.py, this file runs only with CORPUSDB_TORCH_CHECKS=1 (torch, transformers
and peft installed) and fails there if they are missing."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, LlamaConfig

from corpusdb.torch import CurriculumDataset

HERE = Path(__file__).resolve().parent
WORKER = HERE / "ddp_worker.py"
EXAMPLE = HERE.parents[1] / "python" / "examples" / "train_lora.py"


@pytest.fixture(scope="session")
def tiny_model(corpus, tmp_path_factory) -> Path:
    """A random-initialised two-layer Llama with the corpus tokenizer beside its weights."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    vocab = Tokenizer.from_file(str(corpus["tokenizer"])).get_vocab_size(with_added_tokens=True)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    shutil.copy(corpus["tokenizer"], folder / "tokenizer.json")
    return folder


def torchrun(processes: int, script: Path, *args: str) -> str:
    """Runs `script` under torchrun with `processes` ranks on this machine (or as a plain
    process when `processes` is 0) and returns its output; fails with it otherwise."""
    launcher = [] if processes == 0 else [
        "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([sys.executable, *launcher, str(script), *args], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{script.name} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def worker(corpus, model: Path, out: Path, processes: int, batch_size: int, steps: int,
           state: "Path | None" = None) -> list:
    args = ["--store", str(corpus["store"]), "--curriculum", str(corpus["curriculum"]),
            "--tokenizer", str(corpus["tokenizer"]), "--model", str(model), "--out", str(out),
            "--batch-size", str(batch_size), "--steps", str(steps)]
    if state is not None:
        args += ["--state", str(state)]
    torchrun(processes, WORKER, *args)
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(max(processes, 1))]


def test_two_ranks_split_each_step_and_one_process_resumes(corpus, tiny_model, tmp_path):
    (single,) = worker(corpus, tiny_model, tmp_path / "single", 0, batch_size=4, steps=6)
    ranks = worker(corpus, tiny_model, tmp_path / "ranks", 2, batch_size=2, steps=3)
    assert [r["world_size"] for r in ranks] == [2, 2]
    for step, (zero, one) in enumerate(zip(ranks[0]["steps"], ranks[1]["steps"])):
        whole = single["steps"][step]
        assert not set(zero["positions"]) & set(one["positions"]), f"step {step} overlaps"
        # Rank r takes every world_size-th example of the step's global order.
        assert zero["positions"] == whole["positions"][0::2]
        assert one["positions"] == whole["positions"][1::2]
        assert zero["phase"] == one["phase"] == whole["phase"]
        assert zero["learning_rate"] == one["learning_rate"] == whole["learning_rate"]
    assert len(ranks[0]["steps"]) == len(ranks[1]["steps"]) == 3
    # DistributedDataParallel averaged the gradients: the ranks hold the same adapter,
    # and the base stayed frozen.
    assert math.isclose(ranks[0]["adapter"], ranks[1]["adapter"], rel_tol=1e-9, abs_tol=1e-9)
    for result in (*ranks, single):
        assert result["base_before"] == result["base_after"]
        assert all(math.isfinite(loss) for loss in result["losses"])
    # Both ranks stand at the same place of the plan: 3 steps of 2 x 2 examples.
    assert ranks[0]["state"] == ranks[1]["state"]
    assert ranks[0]["state"]["position"] == 3 * 4
    state = tmp_path / "state.json"
    state.write_text(json.dumps(ranks[0]["state"]))

    (resumed,) = worker(corpus, tiny_model, tmp_path / "resumed", 0, batch_size=4, steps=3,
                        state=state)
    assert [s["positions"] for s in resumed["steps"]] == \
        [s["positions"] for s in single["steps"][3:6]]


def test_peft_lora_learns_from_a_batch(corpus, tiny_model):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj",
                                                             "o_proj", "gate_proj", "up_proj",
                                                             "down_proj"],
                                             task_type="CAUSAL_LM"))
    data = CurriculumDataset(corpus["store"], corpus["curriculum"], corpus["tokenizer"],
                             batch_size=4, max_seq_len=256, packing=False)
    batch = next(iter(data))
    mask = (batch["segment_ids"] > 0).long()
    assert int((batch["labels"] != -100).sum()) > 0, "the batch trains on no token"
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model(input_ids=batch["input_ids"], attention_mask=mask,
                     labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    # From ln(vocab) = 6.85 down by more than half a nat through the adapters alone.
    assert losses[-1] < losses[0] - 0.5 and losses[-1] == min(losses), losses


def test_example_trains_with_two_processes_and_resumes_with_one(corpus, tiny_model, tmp_path):
    out = tmp_path / "run"
    common = ["--store", str(corpus["store"]), "--curriculum", str(corpus["curriculum"]),
              "--model", str(tiny_model), "--out", str(out), "--batch-size", "2",
              "--max-seq-len", "256", "--lora-rank", "4", "--save-every", "1"]
    log = torchrun(2, EXAMPLE, *common, "--max-steps", "2")
    assert "step 2 phase" in log, log
    saved = torch.load(out / "checkpoint.pt", weights_only=False)
    assert saved["step"] == 2 and saved["data"]["position"] == 2 * 2 * 2
    assert (out / "adapter" / "adapter_config.json").exists()

    log = torchrun(0, EXAMPLE, *common, "--max-steps", "4", "--resume")
    assert "step 3 phase" in log and "step 4 phase" in log and "step 2 phase" not in log, log
    saved = torch.load(out / "checkpoint.pt", weights_only=False)
    # One process of two examples a step continues where the two ranks stopped.
    assert saved["step"] == 4 and saved["data"]["position"] == 8 + 2 * 2


def test_hf_trainer_consumes_the_dataset(corpus, tiny_model, tmp_path):
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))

    def data():
        return CurriculumDataset(corpus["store"], corpus["curriculum"], corpus["tokenizer"],
                                 batch_size=4, max_seq_len=256, packing=False)

    seen = []

    def collate(items):
        # The DataLoader's "batch" of one item is one whole step of the curriculum.
        (batch,) = items
        seen.append(batch["positions"])
        return {"input_ids": batch["input_ids"], "labels": batch["labels"],
                "attention_mask": (batch["segment_ids"] > 0).long()}

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=1,
                             max_steps=3, learning_rate=1e-3, logging_steps=1, report_to=[],
                             save_strategy="no", use_cpu=True, dataloader_num_workers=0,
                             remove_unused_columns=False)
    result = Trainer(model=model, args=args, train_dataset=data(), data_collator=collate).train()
    assert result.global_step == 3 and math.isfinite(result.training_loss)
    # The steps the Trainer trained on are the plan's first three, in order (it may have
    # fetched one more ahead).
    expected = [b["positions"] for b, _ in zip(data(), range(3))]
    assert seen[:3] == expected

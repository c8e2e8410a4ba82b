#!/usr/bin/env python3
"""Reference logits of a base Llama model plus a PEFT LoRA adapter, for the Rust tests.

    python3 tests/python/peft_logits.py --model BASE_DIR --adapter ADAPTER_DIR --ids 1,2,3 \
        [--merged-out DIR]

BASE_DIR is a Hugging Face Llama folder (config.json + model.safetensors); ADAPTER_DIR holds
adapter_config.json + adapter_model.safetensors as PEFT writes them. The model runs in
float32, eval mode (no dropout), on one sequence of the given token ids, and the script
prints {"logits": [[V floats] for each position]} as JSON on stdout. --merged-out DIR also
writes merge_and_unload()'s weights there as model.safetensors (Hugging Face names; the
lm_head is left out when tied to the embeddings) with a copy of config.json.

Exits 3 with a one-line message on stderr when torch, transformers or peft is missing, so
the Rust test fails with that message (it is `#[ignore]`d by default).
"""

import argparse
import json
import os
import shutil
import sys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--ids", required=True, help="comma-separated token ids")
    ap.add_argument("--merged-out", help="also write merged weights to this folder")
    args = ap.parse_args()
    try:
        import torch
        from peft import PeftModel
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        print(f"peft_logits: python dependencies missing ({e})", file=sys.stderr)
        return 3

    import warnings
    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    ids = [int(x) for x in args.ids.split(",") if x.strip()]
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, args.adapter)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    json.dump({"logits": logits.tolist()}, sys.stdout)
    sys.stdout.write("\n")

    if args.merged_out:
        merged = model.merge_and_unload()
        state = {k: v.detach().contiguous() for k, v in merged.state_dict().items()}
        if merged.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        os.makedirs(args.merged_out, exist_ok=True)
        save_file(state, os.path.join(args.merged_out, "model.safetensors"), metadata={"format": "pt"})
        shutil.copy(os.path.join(args.model, "config.json"), args.merged_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

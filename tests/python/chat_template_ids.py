#!/usr/bin/env python3
"""Token ids of conversations through transformers' apply_chat_template, for the Rust tests.

    python3 tests/python/chat_template_ids.py < request.json

The request: {"tokenizer": tokenizer.json path, "config": {chat_template, bos_token,
eos_token}, "special_tokens": [...], "conversations": [{"messages": [...], "tools": [...] or
null}]} with messages in Hugging Face's shape. Prints {"ids": [[...] per conversation]}
(tokenize=True, add_generation_prompt=False). Exits 3 when transformers is missing.
"""

import json
import sys


def main() -> int:
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError as e:
        print(f"transformers is not installed: {e}", file=sys.stderr)
        return 3
    request = json.load(sys.stdin)
    config = request["config"]
    tok = PreTrainedTokenizerFast(tokenizer_file=request["tokenizer"])
    tok.add_special_tokens({"additional_special_tokens": request["special_tokens"]})
    for key in ("bos_token", "eos_token"):
        if config.get(key):
            setattr(tok, key, config[key])
    tok.chat_template = config["chat_template"]
    out = []
    for conversation in request["conversations"]:
        ids = tok.apply_chat_template(conversation["messages"], tools=conversation.get("tools"),
                                      tokenize=True, add_generation_prompt=False)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        out.append(list(ids))
    print(json.dumps({"ids": out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

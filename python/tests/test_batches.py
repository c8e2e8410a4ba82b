"""corpusdb.Batches against `corpusdb batches --dump`: the same batches, exact resume,
and ranks that split each step's window."""

from __future__ import annotations

import json

import numpy as np
import pytest

import corpusdb

BATCH = 4
SEQ = 384
DUMPED = ("positions", "ordinals", "phase", "learning_rate", "input_ids", "labels",
          "position_ids", "cu_seqlens", "seq_starts", "next")


def dump(cli, corpus, tmp_path, *args: str):
    out = tmp_path / f"dump-{abs(hash(args))}.jsonl"
    cli.run(
        corpus["store"], "batches", "--curriculum", str(corpus["curriculum"]),
        "--tokenizer", str(corpus["tokenizer"]), "--dump", str(out), *args,
    )
    return [json.loads(line) for line in out.read_text().splitlines()]


def batches(corpus, **kwargs):
    return corpusdb.Batches(corpus["store"], corpus["curriculum"], corpus["tokenizer"], **kwargs)


def comparable(batch):
    return {k: (batch[k].tolist() if isinstance(batch[k], np.ndarray) else batch[k]) for k in DUMPED}


@pytest.mark.parametrize(
    "packing,rank,world_size,prefetch",
    [(True, 0, 1, 4), (False, 0, 1, 0), (True, 1, 3, 2)],
)
def test_batches_are_the_cli_batches(corpus, cli, tmp_path, packing, rank, world_size, prefetch):
    args = ["--batch-size", str(BATCH), "--max-seq-len", str(SEQ), "--rank", str(rank), "--ranks", str(world_size)]
    if not packing:
        args.append("--no-packing")
    expected = dump(cli, corpus, tmp_path, *args)
    got = batches(corpus, batch_size=BATCH, max_seq_len=SEQ, packing=packing, rank=rank,
                  world_size=world_size, prefetch=prefetch)
    ours = [comparable(b) for b in got]
    assert len(ours) == len(expected) > 10
    assert ours == expected
    assert got.position == got.total == expected[-1]["next"]["position"]
    assert got.state() == expected[-1]["next"]


def test_arrays_are_consistent(corpus):
    b = next(iter(batches(corpus, batch_size=BATCH, max_seq_len=SEQ)))
    rows, width = b["input_ids"].shape
    assert width == SEQ and b["labels"].dtype == np.int64 and b["input_ids"].dtype == np.uint32
    assert b["labels"].shape == b["position_ids"].shape == b["segment_ids"].shape == (rows, width)
    assert len(b["cu_seqlens"]) == len(b["positions"]) + 1 == len(b["seq_starts"]) + 1
    assert int(b["cu_seqlens"][-1]) == b["tokens"] == int((b["segment_ids"] > 0).sum())
    trained = b["labels"] != -100
    assert int(trained.sum()) == b["trained_tokens"]
    assert (b["labels"][trained] == b["input_ids"][trained]).all()
    b["input_ids"][0, 0] = 7  # the arrays are the caller's own


def test_resume_continues_the_same_order(corpus, cli, tmp_path):
    whole = [comparable(b) for b in batches(corpus, batch_size=BATCH, max_seq_len=SEQ)]
    first = batches(corpus, batch_size=BATCH, max_seq_len=SEQ)
    for _ in range(5):
        next(first)
    state = first.state()
    assert state["position"] == 5 * BATCH and state["fingerprint"] == first.fingerprint
    rest = [comparable(b) for b in batches(corpus, batch_size=BATCH, max_seq_len=SEQ, state=state)]
    assert rest == whole[5:]
    # The command line's state file is the same state, and resumes the same way.
    state_file = tmp_path / "state.json"
    dump(cli, corpus, tmp_path, "--batch-size", str(BATCH), "--max-seq-len", str(SEQ), "--limit", "5",
         "--state", str(state_file))
    assert json.loads(state_file.read_text()) == state
    assert dump(cli, corpus, tmp_path, "--batch-size", str(BATCH), "--max-seq-len", str(SEQ),
                "--resume", str(state_file)) == rest
    with pytest.raises(corpusdb.CorpusdbError):
        batches(corpus, batch_size=BATCH, max_seq_len=SEQ, state={"fingerprint": "0" * 16, "position": 4})


def test_ranks_split_each_step_of_the_single_process_order(corpus):
    world = 2
    single = [b["positions"] for b in batches(corpus, batch_size=world * BATCH, max_seq_len=SEQ)]
    ranks = [[b for b in batches(corpus, batch_size=BATCH, max_seq_len=SEQ, rank=r, world_size=world)]
             for r in range(world)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for step, expected in enumerate(single):
        mine = [ranks[r][step]["positions"] for r in range(world)]
        assert not set(mine[0]) & set(mine[1])
        assert sorted(mine[0] + mine[1]) == sorted(expected)
        # Rank r takes every world-th position of the step's window from r on.
        window = sorted(expected)
        for r in range(world):
            assert sorted(mine[r]) == window[r::world]
        assert ranks[0][step]["next"] == ranks[1][step]["next"]


def test_resume_with_another_world_size(corpus):
    one = batches(corpus, batch_size=2 * BATCH, max_seq_len=SEQ)
    for _ in range(3):
        next(one)
    state = one.state()
    rest_single = [sorted(b["positions"]) for b in one]
    two = [list(batches(corpus, batch_size=BATCH, max_seq_len=SEQ, rank=r, world_size=2, state=state))
           for r in range(2)]
    assert [sorted(a["positions"] + b["positions"]) for a, b in zip(*two)] == rest_single


def test_bad_arguments(corpus):
    with pytest.raises(corpusdb.CorpusdbError, match="rank"):
        batches(corpus, rank=2, world_size=2)
    with pytest.raises(corpusdb.CorpusdbError):
        corpusdb.Batches(corpus["store"], corpus["root"] / "absent.yaml", corpus["tokenizer"])

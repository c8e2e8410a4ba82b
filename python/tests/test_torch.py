"""corpusdb.torch.CurriculumDataset. torch is optional and its wheels are gigabytes, so
scripts/python-package-checks runs this file only with CORPUSDB_TORCH_CHECKS=1, and then it
fails where torch cannot be imported."""

from __future__ import annotations

import numpy as np

import torch  # noqa: E402

import corpusdb  # noqa: E402
from corpusdb.torch import CurriculumDataset  # noqa: E402

BATCH = 4
SEQ = 384


def dataset(corpus, **kwargs):
    return CurriculumDataset(corpus["store"], corpus["curriculum"], corpus["tokenizer"],
                             batch_size=BATCH, max_seq_len=SEQ, **kwargs)


def test_tensors_are_the_batches(corpus):
    expected = list(corpusdb.Batches(corpus["store"], corpus["curriculum"], corpus["tokenizer"],
                                     batch_size=BATCH, max_seq_len=SEQ))
    loader = torch.utils.data.DataLoader(dataset(corpus), batch_size=None)
    got = list(loader)
    assert len(got) == len(expected)
    for ours, theirs in zip(got, expected):
        assert ours["positions"] == theirs["positions"]
        for name in corpusdb.ARRAYS:
            assert isinstance(ours[name], torch.Tensor)
            assert np.array_equal(ours[name].numpy(), theirs[name].astype(np.int64))
        assert ours["input_ids"].dtype == torch.int64 and ours["cu_seqlens"].dtype == torch.int32


def test_state_dict_resumes_exactly_with_any_world_size(corpus):
    whole = [b["positions"] for b in dataset(corpus)]
    data = dataset(corpus)
    for i, _ in enumerate(data):
        if i == 3:
            break
    state = data.state_dict()
    assert state["position"] == 4 * BATCH
    again = dataset(corpus)
    again.load_state_dict(state)
    assert [b["positions"] for b in again] == whole[4:]
    # Two ranks of half the batch size continue the same global order.
    halves = []
    for rank in range(2):
        part = CurriculumDataset(corpus["store"], corpus["curriculum"], corpus["tokenizer"],
                                 batch_size=BATCH // 2, max_seq_len=SEQ, rank=rank, world_size=2)
        part.load_state_dict(state)
        halves.append([b["positions"] for b in part])
    assert [sorted(a + b) for a, b in zip(*halves)] == [sorted(p) for p in whole[4:]]


def test_rank_comes_from_torch_distributed(corpus, tmp_path):
    dist = torch.distributed
    assert dist.is_available(), "this torch build has no torch.distributed"
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        data = dataset(corpus)
        assert (data.rank, data.world_size) == (0, 1)
    finally:
        dist.destroy_process_group()

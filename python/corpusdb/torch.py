"""Training batches of a curriculum as a ``torch.utils.data.IterableDataset``.

Only this module needs torch (``pip install torch``); ``import corpusdb`` does not.

>>> from corpusdb.torch import CurriculumDataset
>>> data = CurriculumDataset("storage/corpus", "curriculum.yaml", "model/", batch_size=8,
...                          max_seq_len=2048)                      # doctest: +SKIP
>>> loader = torch.utils.data.DataLoader(data, batch_size=None)       # doctest: +SKIP

Every item is one step's batch for this rank (so give the ``DataLoader`` ``batch_size=None``
and leave ``num_workers`` at 0: the batches are built ahead on a Rust thread already).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Iterator, Mapping, Optional

import torch
import torch.utils.data

from . import ARRAYS, Batches, PathLike

__all__ = ["CurriculumDataset"]


def _distributed() -> "tuple[int, int]":
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class CurriculumDataset(torch.utils.data.IterableDataset):
    """The batches of ``corpusdb batches`` for this rank, as torch tensors.

    Yields dicts with ``input_ids``, ``labels``, ``position_ids``, ``segment_ids``
    (``[rows, width]``, int64), ``cu_seqlens`` (int32, flash-attention's varlen form) and
    ``seq_starts`` (int64), plus ``positions``, ``ordinals``, ``phase``,
    ``learning_rate``, the token counts and ``next`` (the sampler state after the step).

    ``rank`` and ``world_size`` default to those of ``torch.distributed`` when it is
    initialised (else 0 and 1). Each step takes the next ``world_size * batch_size``
    examples of the plan's global order; rank ``r`` gets every ``world_size``-th of them.

    :meth:`state_dict` is where the run stands (the plan position after the last batch
    yielded); :meth:`load_state_dict` makes the next iteration continue there exactly,
    also with another world size (the global order is the same). Iterating again without
    loading a state continues from the current position too; the plan's end ends it.
    """

    def __init__(
        self,
        store_path: PathLike,
        curriculum_path: PathLike,
        tokenizer_path: PathLike,
        batch_size: int,
        max_seq_len: int,
        packing: bool = True,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        end_of_turn: Optional[str] = None,
        prefetch: int = 4,
    ) -> None:
        super().__init__()
        self.store_path = os.fspath(store_path)
        self.curriculum_path = os.fspath(curriculum_path)
        self.tokenizer_path = os.fspath(tokenizer_path)
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.packing = packing
        dist_rank, dist_world = _distributed()
        self.rank = dist_rank if rank is None else rank
        self.world_size = dist_world if world_size is None else world_size
        self.end_of_turn = end_of_turn
        self.prefetch = prefetch
        self._state: Optional[Dict[str, Any]] = None

    def _batches(self) -> Batches:
        return Batches(
            self.store_path,
            self.curriculum_path,
            self.tokenizer_path,
            batch_size=self.batch_size,
            max_seq_len=self.max_seq_len,
            packing=self.packing,
            rank=self.rank,
            world_size=self.world_size,
            state=self._state,
            end_of_turn=self.end_of_turn,
            prefetch=self.prefetch,
        )

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        if info is not None and info.num_workers > 1:
            raise RuntimeError(
                "CurriculumDataset yields whole steps in plan order: use num_workers=0 "
                "(batches are built ahead on a background thread)"
            )
        batches = self._batches()
        if self._state is None:
            self._state = batches.state()
        for batch in batches:
            # Taken before the batch is handed over: a state_dict() saved after using it
            # resumes at the next step.
            self._state = dict(batch["next"])
            yield _to_torch(batch)

    def state_dict(self) -> Dict[str, Any]:
        """``{"fingerprint", "position"}``: the plan and the position after the last batch yielded."""
        if self._state is None:
            self._state = self._batches().state()
        return dict(self._state)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue at ``state`` (from :meth:`state_dict`, or ``corpusdb batches --state``)."""
        self._state = {"fingerprint": str(state["fingerprint"]), "position": int(state["position"])}


def _to_torch(batch: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(batch)
    for name in ARRAYS:
        array = batch[name]
        dtype = torch.int32 if name == "cu_seqlens" else torch.int64
        out[name] = torch.from_numpy(array.astype("int64", copy=False)).to(dtype)
    return out

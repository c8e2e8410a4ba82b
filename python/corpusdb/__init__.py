"""corpusdb: an embedded corpus database for instruction-tuning data.

The store is the directory a ``corpusdb`` command line works on (``--store``). Every
method opens it as the command line does (read-only for reads, so they work while an
import is writing; for writing in :meth:`Store.ingest`) and releases the GIL while it
works. Errors of the library are raised as :class:`CorpusdbError` with its message.

>>> import corpusdb
>>> store = corpusdb.Store("storage/corpus")
>>> store.stats()["examples"]                               # doctest: +SKIP
>>> store.query("category:math AND turns:>=2", limit=5)     # doctest: +SKIP

Training batches (the batches of ``corpusdb batches``) come from :class:`Batches` as
numpy arrays, or from :class:`corpusdb.torch.CurriculumDataset` as torch tensors.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import numpy as np

from ._corpusdb import CorpusdbError, RawBatches, Store, __version__

__all__ = ["Batches", "CorpusdbError", "RawBatches", "Store", "__version__"]

PathLike = Union[str, "os.PathLike[str]"]

#: The arrays of a batch: token ids, labels (-100 where not trained), each token's
#: position within its example, its example's segment id (0 = padding), the cumulative
#: example lengths and each example's start in the flattened rows.
ARRAYS = ("input_ids", "labels", "position_ids", "segment_ids", "cu_seqlens", "seq_starts")


def _array(raw: Any) -> np.ndarray:
    data, dtype, shape = raw
    return np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)


class Batches:
    """This rank's training batches of a curriculum, as ``corpusdb batches`` builds them.

    Each step takes the next ``world_size * batch_size`` examples of the plan's global
    order (never across a phase); rank ``r`` gets every ``world_size``-th of them from
    ``r`` on. Conversations are rendered with the tokenizer's chat template (from the
    token cache that ``corpusdb tokenize`` writes, when there is one) and packed into rows
    of ``max_seq_len`` tokens (or padded, one example per row, with ``packing=False``).

    Iterating yields dicts: the numpy arrays named in :data:`ARRAYS` (``input_ids``,
    ``labels``, ``position_ids``, ``segment_ids``: ``[rows, width]``; ``cu_seqlens``:
    ``[examples + 1]``; ``seq_starts``: ``[examples]``), and ``positions``, ``ordinals``,
    ``phase``, ``learning_rate``, ``tokens``, ``trained_tokens``, ``capacity``,
    ``truncated``, ``skipped`` (ordinal, reason), ``cached`` and ``next`` (the sampler
    state after this step).

    :meth:`state` is the sampler state after the last batch yielded; a ``Batches`` made
    with ``state=`` continues there, with any ``world_size``. A background thread builds
    ``prefetch`` batches ahead (0: each batch is built when it is asked for).
    """

    def __init__(
        self,
        store: PathLike,
        curriculum: PathLike,
        tokenizer: PathLike,
        batch_size: int = 8,
        max_seq_len: int = 2048,
        packing: bool = True,
        rank: int = 0,
        world_size: int = 1,
        state: Optional[Mapping[str, Any]] = None,
        end_of_turn: Optional[str] = None,
        prefetch: int = 4,
    ) -> None:
        self._raw = RawBatches(
            os.fspath(store),
            os.fspath(curriculum),
            os.fspath(tokenizer),
            batch_size=batch_size,
            max_seq_len=max_seq_len,
            packing=packing,
            rank=rank,
            world_size=world_size,
            state=dict(state) if state is not None else None,
            end_of_turn=end_of_turn,
            prefetch=prefetch,
        )

    @property
    def position(self) -> int:
        """The plan position after the last batch yielded."""
        return self._raw.position

    @property
    def total(self) -> int:
        """Examples in the plan's global order (all phases, all ranks)."""
        return self._raw.total

    @property
    def fingerprint(self) -> str:
        """The plan's fingerprint, named in sampler states."""
        return self._raw.fingerprint

    def state(self) -> Dict[str, Any]:
        """The sampler state after the last batch yielded: ``{"fingerprint", "position"}``."""
        return self._raw.state()

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        return self

    def __next__(self) -> Dict[str, Any]:
        batch = next(self._raw)
        for name in ARRAYS:
            batch[name] = _array(batch[name])
        return batch

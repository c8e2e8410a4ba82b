"""Typed stubs of the extension module ``corpusdb._corpusdb`` (see ``corpusdb``)."""

import os
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Union

_Path = Union[str, "os.PathLike[str]"]

__version__: str

class CorpusdbError(Exception):
    """An error of the corpus database, with the library's message."""

class Store:
    """A corpus store on disk (the directory ``corpusdb --store`` names)."""

    def __init__(self, path: _Path) -> None: ...
    @property
    def path(self) -> str: ...
    def stats(self) -> Dict[str, Any]:
        """The counters, as ``corpusdb stats --json``: examples, excluded, read,
        duplicates, rejected, joined, extra, categories, sources, imports."""
    def imports(self) -> List[Dict[str, Any]]:
        """Every import, as ``corpusdb imports --json``."""
    def categories(self, by: Literal["category", "source", "excluded"] = "category") -> Dict[str, int]:
        """Examples per category (per source; excluded per filter) from the index."""
    def count(self, query: str) -> int:
        """The number of examples matching a query."""
    def query(self, query: str, limit: int = 20, offset: int = 0) -> List[Dict[str, Any]]:
        """Matches in insertion order: hash, ordinal, category, sources, chars, turns,
        messages, tools."""
    def show(self, hash: str) -> Dict[str, Any]:
        """One example by SHA-1 or unique prefix (4+ hex digits), as ``corpusdb show --json``."""
    def ingest(
        self,
        paths: Sequence[_Path],
        source: str,
        category: str,
        format: Optional[str] = None,
        mapping: Optional[_Path] = None,
        rules: Optional[Sequence[Literal["tool", "code", "math"]]] = None,
        filters: Optional[_Path] = None,
        strict: bool = False,
        compression: Literal["zstd", "lz4"] = "zstd",
    ) -> Dict[str, Any]:
        """Imports files as ``corpusdb ingest``; returns ``{"files": [...], "total": counts}``."""
    def export(
        self,
        query: str,
        path: _Path,
        format: Literal["jsonl", "parquet"] = "jsonl",
        with_metadata: bool = False,
    ) -> int:
        """Writes the matches as ``corpusdb export``; returns how many."""
    def to_arrow(self, query: str = "*", with_metadata: bool = False) -> Any:
        """The matches as a ``pyarrow.RecordBatchReader`` (the Parquet export's columns)."""
    def to_hf_dataset(self, query: str = "*", with_metadata: bool = False) -> Any:
        """The matches as an in-memory ``datasets.Dataset`` with a ``messages`` column."""

_Raw = Tuple[bytearray, str, Tuple[int, ...]]

class RawBatches:
    """This rank's batches as ``corpusdb batches`` builds them; tensors as
    ``(buffer, dtype, shape)`` triples."""

    def __init__(
        self,
        store: _Path,
        curriculum: _Path,
        tokenizer: _Path,
        batch_size: int = 8,
        max_seq_len: int = 2048,
        packing: bool = True,
        rank: int = 0,
        world_size: int = 1,
        state: Optional[Mapping[str, Any]] = None,
        end_of_turn: Optional[str] = None,
        prefetch: int = 4,
    ) -> None: ...
    @property
    def position(self) -> int: ...
    @property
    def total(self) -> int: ...
    @property
    def fingerprint(self) -> str: ...
    def state(self) -> Dict[str, Any]: ...
    def __iter__(self) -> "RawBatches": ...
    def __next__(self) -> Dict[str, Any]: ...

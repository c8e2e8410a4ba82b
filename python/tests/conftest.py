"""Fixtures made with the `corpusdb` command line in a temporary directory: two synthetic
files imported as two sources with two categories, a small BPE
tokenizer trained on it and a two-phase curriculum."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _binary() -> str:
    explicit = os.environ.get("CORPUSDB_BIN")
    if explicit:
        return explicit
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    for candidate in (target / "debug" / "corpusdb", target / "release" / "corpusdb"):
        if candidate.exists():
            return str(candidate)
    found = shutil.which("corpusdb")
    if found:
        return found
    raise RuntimeError(
        "no corpusdb binary: run `cargo build` (or set CORPUSDB_BIN)"
    )


class Cli:
    def __init__(self, binary: str) -> None:
        self.binary = binary

    def run(self, store: Path, *args: str) -> str:
        done = subprocess.run(
            [self.binary, "--store", str(store), *args],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise AssertionError(f"corpusdb {' '.join(args)} failed:\n{done.stderr}")
        return done.stdout

    def json(self, store: Path, *args: str):
        return json.loads(self.run(store, *args))

    def fails(self, store: Path, *args: str) -> str:
        done = subprocess.run(
            [self.binary, "--store", str(store), *args], capture_output=True, text=True
        )
        assert done.returncode != 0, f"corpusdb {' '.join(args)} succeeded"
        return done.stderr


@pytest.fixture(scope="session")
def cli() -> Cli:
    return Cli(_binary())


CURRICULUM = """\
name: python-tests
seed: 5
eval: {fraction: 0.1}
phases:
  - {name: all, select: '*', epochs: 2, learning_rate: 2.0e-5}
  - {name: math, select: 'category:math', epochs: 1, learning_rate: 1.0e-5}
"""


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, cli: Cli):
    """directory, store, data files, curriculum and tokenizer made by the command line."""
    root = tmp_path_factory.mktemp("corpus")
    data = root / "synth.jsonl"
    store = root / "store"
    cli.run(store, "generate", "--out", str(data), "--records", "160", "--seed", "11")
    cli.run(store, "ingest", str(data), "--source", "synth", "--category", "instruction")
    math = root / "math.jsonl"
    cli.run(store, "generate", "--out", str(math), "--records", "60", "--seed", "12")
    cli.run(store, "ingest", str(math), "--source", "synth-math", "--category", "math")
    tokenizer = root / "tokenizer.json"
    cli.run(store, "train-tokenizer", "--vocab", "1200", "--out", str(tokenizer))
    curriculum = root / "curriculum.yaml"
    curriculum.write_text(CURRICULUM)
    return {
        "root": root,
        "store": store,
        "data": data,
        "curriculum": curriculum,
        "tokenizer": tokenizer,
        "math": math,
    }

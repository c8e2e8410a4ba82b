"""The Store methods against the command line's JSON output on the same store."""

from __future__ import annotations

import json
import os
import tempfile

import pytest

import corpusdb


def test_stats_and_imports_match_the_cli(corpus, cli):
    store = corpusdb.Store(corpus["store"])
    stats = store.stats()
    assert stats == cli.json(corpus["store"], "stats", "--json")
    assert stats["examples"] > 100 and stats["duplicates"] > 0
    assert store.imports() == cli.json(corpus["store"], "imports", "--json")


def test_categories_match_the_cli(corpus, cli):
    store = corpusdb.Store(corpus["store"])
    for by in ("category", "source"):
        listed = cli.json(corpus["store"], "categories", "--by", by, "--json")
        assert store.categories(by=by) == {c["name"]: c["examples"] for c in listed["counts"]}
    assert len(store.categories()) >= 2
    with pytest.raises(corpusdb.CorpusdbError, match="by="):
        store.categories(by="colour")


@pytest.mark.parametrize(
    "query",
    ["*", "category:math", "turns:>=2 -category:code", "(category:code OR category:tool) chars:<3000"],
)
def test_query_matches_the_cli(corpus, cli, query):
    store = corpusdb.Store(corpus["store"])
    expected = cli.json(corpus["store"], "query", query, "--limit", "1000", "--format", "json")
    hits = store.query(query, limit=1000)
    assert [{k: h[k] for k in ("hash", "ordinal", "category", "sources")} for h in hits] == expected
    assert store.count(query) == int(cli.run(corpus["store"], "query", query, "--count"))
    page = store.query(query, limit=3, offset=2)
    assert page == hits[2:5]
    for hit in hits[:5]:
        shown = store.show(hit["hash"])
        assert hit["messages"] == shown["messages"]
        assert hit["turns"] == shown["turns"] and hit["chars"] == shown["chars"]


def test_show_matches_the_cli(corpus, cli):
    store = corpusdb.Store(corpus["store"])
    for hit in store.query("*", limit=4):
        prefix = hit["hash"][:10]
        shown = store.show(prefix)
        assert shown == cli.json(corpus["store"], "show", prefix, "--json")
        assert shown["hash"] == hit["hash"]
        assert shown["sources"][0]["source"] == "synth"
        assert shown["messages"][0]["content"]


def test_errors_carry_the_library_message(corpus, cli):
    store = corpusdb.Store(corpus["store"])
    with pytest.raises(corpusdb.CorpusdbError) as parse:
        store.query("category:math AND (")
    assert str(parse.value).strip() in cli.fails(corpus["store"], "query", "category:math AND (")
    with pytest.raises(corpusdb.CorpusdbError, match="not a hash"):
        store.show("xyz")
    with pytest.raises(corpusdb.CorpusdbError, match="no example with hash 0000000"):
        store.show("0000000")
    missing = corpusdb.Store(corpus["root"] / "nowhere")
    with pytest.raises(corpusdb.CorpusdbError):
        missing.stats()


def test_export_is_the_cli_export(corpus, cli, tmp_path):
    store = corpusdb.Store(corpus["store"])
    for query in ("*", "category:math"):
        for format in ("jsonl", "parquet"):
            ours = tmp_path / f"ours.{format}"
            theirs = tmp_path / f"theirs.{format}"
            n = store.export(query, ours, format=format, with_metadata=True)
            cli.run(corpus["store"], "export", query, "--out", str(theirs), "--format", format, "--with-metadata")
            assert ours.read_bytes() == theirs.read_bytes(), (query, format)
            if format == "jsonl":
                lines = ours.read_text().splitlines()
                assert len(lines) == n == store.count(query)
                assert "messages" in json.loads(lines[0])
    with pytest.raises(corpusdb.CorpusdbError, match="format="):
        store.export("*", tmp_path / "x", format="csv")


def test_arrow_and_hf_dataset_hold_the_matches_with_their_messages(corpus):
    store = corpusdb.Store(corpus["store"])
    for query in ("*", "category:math"):
        table = store.to_arrow(query, with_metadata=True).read_all()
        assert table.num_rows == store.count(query) > 0
        rows = table.to_pylist()
        for row in rows[:5]:
            shown = store.show(row["_hash"])
            assert [(m["role"], m["content"]) for m in row["messages"]] == [
                (m["role"], m["content"]) for m in shown["messages"]
            ]
            assert row["_category"] == shown["category"]
        dataset = store.to_hf_dataset(query)
        assert len(dataset) == table.num_rows
        assert "messages" in dataset.column_names
        first = dataset[0]["messages"]
        assert first[0]["role"] in ("system", "user") and first[0]["content"]
    assert not [f for f in os.listdir(tempfile.gettempdir()) if f.startswith("corpusdb-arrow-")]


def test_ingest_has_the_cli_semantics(corpus, cli, tmp_path):
    ours = corpusdb.Store(tmp_path / "ours")
    result = ours.ingest([corpus["data"]], source="synth", category="instruction")
    ours.ingest([corpus["math"]], source="synth-math", category="math")
    theirs = cli.json(corpus["store"], "stats", "--json")
    stats = ours.stats()
    # Table files are physical: their number and bytes depend on when memtables flushed.
    families = stats.pop("families")
    assert [f["name"] for f in families] == [f["name"] for f in theirs.pop("families")]
    assert stats == theirs
    (entry,) = result["files"]
    assert not entry["already_done"]
    assert entry["read"] == entry["stored"] + entry["duplicates"] + entry["rejected"]
    assert result["total"]["stored"] == theirs["categories"]["instruction"]
    assert ours.categories() == corpusdb.Store(corpus["store"]).categories()
    # The same file again is a no-op; the index is up to date after an import.
    again = ours.ingest([str(corpus["data"])], source="synth", category="instruction", rules=["code"])
    assert again["files"][0]["already_done"] and again["total"]["read"] == 0
    again_stats = cli.json(tmp_path / "ours", "stats", "--json")
    again_stats.pop("families")
    assert again_stats == theirs

    # Bad records go to the rejects ledger (or stop a strict import).
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"instruction": "Say hi", "output": "hi"}\n'
        '{"instruction": "", "output": ""}\n'
        '{"instruction": "Say hi", "output": "hi"}\n'
    )
    result = ours.ingest([bad], source="bad", category="chat", format="alpaca")
    counts = result["total"]
    assert (counts["read"], counts["stored"], counts["duplicates"], counts["rejected"]) == (3, 1, 1, 1)
    assert result["files"][0]["first_rejects"][0]["line"] == 2
    strict = tmp_path / "strict.jsonl"
    strict.write_text('{"instruction": "", "output": ""}\n')
    with pytest.raises(corpusdb.CorpusdbError):
        ours.ingest([strict], source="strict", category="chat", format="alpaca", strict=True)
    with pytest.raises(corpusdb.CorpusdbError, match="no such file"):
        ours.ingest([tmp_path / "absent.jsonl"], source="x", category="chat")
    with pytest.raises(corpusdb.CorpusdbError):
        ours.ingest([bad], source="bad2", category="chat", format="no-such-format")


def test_ingest_compression_lz4_stores_the_same_examples(corpus, tmp_path):
    zstd = corpusdb.Store(tmp_path / "zstd")
    lz4 = corpusdb.Store(tmp_path / "lz4")
    zstd.ingest([corpus["data"]], source="synth", category="instruction")
    lz4.ingest([corpus["data"]], source="synth", category="instruction", compression="lz4")
    options = max(p for p in (tmp_path / "lz4").iterdir() if p.name.startswith("OPTIONS-"))
    bodies = options.read_text().split('[CFOptions "bodies"]')[1].split("\n[")[0]
    assert "\n  compression=kLZ4Compression" in bodies
    assert zstd.export("*", tmp_path / "zstd.jsonl") == lz4.export("*", tmp_path / "lz4.jsonl")
    assert (tmp_path / "zstd.jsonl").read_bytes() == (tmp_path / "lz4.jsonl").read_bytes()
    with pytest.raises(corpusdb.CorpusdbError, match="brotli"):
        lz4.ingest([corpus["data"]], source="x", category="chat", compression="brotli")

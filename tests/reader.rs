use std::io::Write;
use std::path::Path;

use corpusdb::reader::{
    Container, RawBody, RawItem, RecordReader, Resume, DEFAULT_MAX_RECORD_BYTES,
};

use crate::util::write;

fn read_all(path: &Path, from: Option<Resume>) -> (Vec<RawItem>, RecordReader) {
    let mut reader = RecordReader::open(path, from, DEFAULT_MAX_RECORD_BYTES).unwrap();
    let mut items = Vec::new();
    while let Some(item) = reader.next_item().unwrap() {
        items.push(item);
    }
    (items, reader)
}

fn bytes(item: &RawItem) -> &[u8] {
    match &item.body {
        RawBody::Bytes(b) => b,
        RawBody::Unreadable { reason, .. } => panic!("unexpected unreadable record: {reason}"),
    }
}

#[test]
fn jsonl_records_carry_their_lines_and_leave_out_blank_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "a.jsonl",
        b"{\"a\":1}\r\n\n   \n{\"b\":2}\n{\"c\":3}",
    );
    let (items, reader) = read_all(&path, None);
    assert_eq!(reader.container(), Container::Jsonl);
    assert_eq!(items.len(), 3);
    assert_eq!(bytes(&items[0]), b"{\"a\":1}");
    assert_eq!(
        items.iter().map(|i| i.at.line()).collect::<Vec<_>>(),
        [1, 4, 5]
    );
    assert_eq!(
        items.iter().map(|i| i.at.records).collect::<Vec<_>>(),
        [0, 1, 2]
    );
    assert_eq!(bytes(&items[2]), b"{\"c\":3}");
}

#[test]
fn json_arrays_stream_elements_with_positions() {
    let dir = tempfile::tempdir().unwrap();
    let text = "[\n  {\"a\": \"x]}\\\"{\"},\n  {\"b\": [1, {\"c\": 2}]}\n]\n";
    let path = write(dir.path(), "a.json", text.as_bytes());
    let (items, mut reader) = read_all(&path, None);
    assert_eq!(reader.container(), Container::JsonArray);
    assert_eq!(items.len(), 2);
    assert_eq!(bytes(&items[0]), br#"{"a": "x]}\"{"}"#);
    assert_eq!(bytes(&items[1]), br#"{"b": [1, {"c": 2}]}"#);
    assert_eq!(items[1].at.line(), 3);
    assert!(reader.take_notes().is_empty());
}

#[test]
fn a_truncated_array_keeps_complete_records_and_rejects_the_tail() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "cut.json",
        b"[{\"a\": 1}, {\"b\": 2},\n {\"c\": \"unfinish",
    );
    let (items, _) = read_all(&path, None);
    assert_eq!(items.len(), 3);
    assert_eq!(bytes(&items[1]), br#"{"b": 2}"#);
    match &items[2].body {
        RawBody::Unreadable { reason, prefix } => {
            assert!(
                reason
                    .message
                    .starts_with("JSON array ends inside this record"),
                "{reason}"
            );
            assert!(reason.message.contains("line 2"), "{reason}");
            assert_eq!(reason.kind, corpusdb::reject::RejectKind::Truncated);
            assert_eq!(prefix, br#"{"c": "unfinish"#);
        }
        other => panic!("expected a truncated record, got {other:?}"),
    }

    let path = write(dir.path(), "open.json", b"[{\"a\": 1}, {\"b\": 2}");
    let (items, mut reader) = read_all(&path, None);
    assert_eq!(items.len(), 2);
    let notes = reader.take_notes();
    assert_eq!(notes.len(), 1);
    assert!(notes[0].message.contains("not closed"), "{:?}", notes[0]);
}

#[test]
fn gzip_and_zstd_read_like_plain_files() {
    let dir = tempfile::tempdir().unwrap();
    let text: String = (0..1000).map(|i| format!("{{\"n\": {i}}}\n")).collect();
    let plain = write(dir.path(), "p.jsonl", text.as_bytes());
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(text.as_bytes()).unwrap();
    let gz = write(dir.path(), "p.jsonl.gz", &gz.finish().unwrap());
    let zst = write(
        dir.path(),
        "p.jsonl.zst",
        &zstd::encode_all(text.as_bytes(), 3).unwrap(),
    );
    let expected: Vec<Vec<u8>> = read_all(&plain, None)
        .0
        .iter()
        .map(|i| bytes(i).to_vec())
        .collect();
    assert_eq!(expected.len(), 1000);
    for path in [gz, zst] {
        let got: Vec<Vec<u8>> = read_all(&path, None)
            .0
            .iter()
            .map(|i| bytes(i).to_vec())
            .collect();
        assert_eq!(got, expected, "{}", path.display());
    }
}

#[test]
fn reading_resumes_at_any_record_boundary() {
    let dir = tempfile::tempdir().unwrap();
    let lines: String = (0..50).map(|i| format!("{{\"n\": {i}}}\n")).collect();
    let array = format!(
        "[{}]",
        (0..50)
            .map(|i| format!("{{\"n\": {i}}}"))
            .collect::<Vec<_>>()
            .join(",\n")
    );
    let files = [
        write(dir.path(), "l.jsonl", lines.as_bytes()),
        write(dir.path(), "a.json", array.as_bytes()),
        write(
            dir.path(),
            "l.jsonl.zst",
            &zstd::encode_all(lines.as_bytes(), 3).unwrap(),
        ),
        write(
            dir.path(),
            "a.json.zst",
            &zstd::encode_all(array.as_bytes(), 3).unwrap(),
        ),
    ];
    for path in &files {
        let (all, _) = read_all(path, None);
        assert_eq!(all.len(), 50);
        for cut in [1usize, 17, 49] {
            let mut reader = RecordReader::open(path, None, DEFAULT_MAX_RECORD_BYTES).unwrap();
            for _ in 0..cut {
                reader.next_item().unwrap().unwrap();
            }
            let resume = Some(reader.resume_point());
            let (rest, mut resumed) = read_all(path, resume);
            assert_eq!(rest.len(), 50 - cut, "{} at {cut}", path.display());
            for (a, b) in rest.iter().zip(&all[cut..]) {
                assert_eq!(bytes(a), bytes(b));
                assert_eq!(a.at, b.at);
            }
            assert!(resumed.take_notes().is_empty(), "{}", path.display());
        }
    }
}

#[test]
fn an_oversized_line_is_rejected_unread_without_losing_the_next_record() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = b"{\"a\": 1}\n{\"big\": \"".to_vec();
    text.extend(std::iter::repeat_n(b'x', 50 << 20));
    text.extend_from_slice(b"\"}\n{\"b\": 2}\n");
    let path = write(dir.path(), "big.jsonl", &text);
    let mut reader = RecordReader::open(&path, None, 1 << 20).unwrap();
    let first = reader.next_item().unwrap().unwrap();
    assert_eq!(bytes(&first), b"{\"a\": 1}");
    let big = reader.next_item().unwrap().unwrap();
    match big.body {
        RawBody::Unreadable { reason, prefix } => {
            assert_eq!(
                reason,
                "record is 50.0 MiB long, over the 1.0 MiB limit (not read past its start)"
            );
            assert_eq!(reason.kind, corpusdb::reject::RejectKind::TooLarge);
            assert_eq!(prefix.len(), 4096);
        }
        other => panic!("{other:?}"),
    }
    let last = reader.next_item().unwrap().unwrap();
    assert_eq!(bytes(&last), b"{\"b\": 2}");
    assert_eq!(last.at.line(), 3);
}

#[test]
fn leading_space_bom_and_empty_arrays_are_handled_alike_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = b"\xef\xbb\xbf".to_vec();
    text.extend(std::iter::repeat_n(b'\n', 9000));
    text.extend_from_slice(b"[{\"a\":1},{\"b\":2}]");
    let path = write(dir.path(), "spaced.json", &text);
    let mut reader = RecordReader::open(&path, None, DEFAULT_MAX_RECORD_BYTES).unwrap();
    assert_eq!(reader.container(), Container::JsonArray);
    let first = reader.next_item().unwrap().unwrap();
    assert_eq!(first.at.line(), 9001);
    let (rest, _) = read_all(&path, Some(reader.resume_point()));
    assert_eq!(rest.len(), 1);
    assert_eq!(bytes(&rest[0]), b"{\"b\":2}");

    let bom_blank = write(dir.path(), "bom.jsonl", b"\xef\xbb\xbf\r\n{\"a\":1}\n");
    let (items, _) = read_all(&bom_blank, None);
    assert_eq!(items.len(), 1);
    assert_eq!((items[0].at.records, items[0].at.line()), (0, 2));

    for (name, content) in [
        ("e.json", &b"[ ]"[..]),
        ("bom-only.jsonl", b"\xef\xbb\xbf"),
        ("ws.jsonl", b"\n\n"),
    ] {
        let path = write(dir.path(), name, content);
        let (items, mut reader) = read_all(&path, None);
        assert!(items.is_empty(), "{name}");
        let notes = reader.take_notes();
        assert_eq!(notes.len(), 1, "{name}: {notes:?}");
        assert_eq!(notes[0].message, "file holds no records", "{name}");
    }
}

#[test]
fn a_truncated_compressed_file_keeps_its_complete_records() {
    let dir = tempfile::tempdir().unwrap();
    let text: String = (0..5000)
        .map(|i| format!("{{\"n\": {i}, \"pad\": \"{}\"}}\n", "x".repeat(i % 50)))
        .collect();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(text.as_bytes()).unwrap();
    let gz = gz.finish().unwrap();
    let zst = zstd::encode_all(text.as_bytes(), 3).unwrap();
    for (name, data) in [("cut.jsonl.gz", gz), ("cut.jsonl.zst", zst)] {
        let path = write(dir.path(), name, &data[..data.len() * 2 / 3]);
        let (items, mut reader) = read_all(&path, None);
        assert!(
            items.len() > 1000 && items.len() < 5000,
            "{name}: {}",
            items.len()
        );
        for (i, item) in items.iter().enumerate() {
            if let RawBody::Bytes(b) = &item.body {
                assert!(b.starts_with(format!("{{\"n\": {i},").as_bytes()), "{name}");
            }
        }
        let notes = reader.take_notes();
        assert_eq!(notes.len(), 1, "{name}");
        assert!(
            notes[0].message.contains("stream is corrupt or truncated"),
            "{name}: {}",
            notes[0].message
        );
    }
}

#[test]
fn the_fingerprint_sees_changes_in_the_middle_of_large_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut data: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
    let a = write(dir.path(), "a.bin", &data);
    let a2 = write(dir.path(), "a-copy.bin", &data);
    let middle = data.len() / 2;
    data[middle] ^= 1;
    let b = write(dir.path(), "b.bin", &data);
    let fp = |p| corpusdb::reader::fingerprint(p).unwrap();
    assert_eq!(fp(&a), fp(&a2));
    assert_ne!(fp(&a), fp(&b));
}

#[test]
fn json_object_documents_give_their_records_and_resume_by_record() {
    let dir = tempfile::tempdir().unwrap();
    let alpaca = |i: u32| format!("{{\"instruction\": \"Say {i}.\", \"output\": \"{i}\"}}");
    // Records under a key, beside metadata, pretty-printed over many lines.
    let under_key = format!(
        "{{\n  \"version\": \"1.0\",\n  \"data\": [\n    {},\n    {},\n    {}\n  ]\n}}\n",
        alpaca(1),
        alpaca(2),
        alpaca(3)
    );
    // An `id -> record` object, and records as an object under a key.
    let by_id = format!(
        "{{\n  \"a1\": {},\n  \"b2\": {}\n}}\n",
        alpaca(4),
        alpaca(5)
    );
    let nested = format!(
        "{{\n  \"problems\": {{\n    \"p1\": {},\n    \"p2\": {}\n  }}\n}}",
        alpaca(6),
        alpaca(7)
    );
    for (name, text, expected, container, ids) in [
        (
            "under-key.json",
            under_key,
            vec![1, 2, 3],
            Container::DocumentList,
            vec![],
        ),
        (
            "by-id.json",
            by_id,
            vec![4, 5],
            Container::DocumentById,
            vec!["a1", "b2"],
        ),
        (
            "nested.json",
            nested,
            vec![6, 7],
            Container::DocumentById,
            vec!["p1", "p2"],
        ),
    ] {
        let path = write(dir.path(), name, text.as_bytes());
        let (items, reader) = read_all(&path, None);
        assert_eq!(reader.container(), container, "{name}");
        let got_ids: Vec<&str> = items.iter().filter_map(|i| i.id.as_deref()).collect();
        assert_eq!(got_ids, ids, "{name}");
        let records: Vec<serde_json::Value> = items
            .iter()
            .map(|i| serde_json::from_slice(bytes(i)).unwrap())
            .collect();
        let wanted: Vec<serde_json::Value> = expected
            .iter()
            .map(|&i| serde_json::from_str(&alpaca(i)).unwrap())
            .collect();
        assert_eq!(records, wanted, "{name}");
        assert_eq!(
            items.iter().map(|i| i.at.records).collect::<Vec<_>>(),
            (0..expected.len() as u64).collect::<Vec<_>>()
        );
        // A reader opened where an earlier one found the records reads the same.
        let start = RecordReader::open(&path, None, DEFAULT_MAX_RECORD_BYTES)
            .unwrap()
            .records_start()
            .unwrap();
        let mut again =
            RecordReader::open_records_at(&path, start, DEFAULT_MAX_RECORD_BYTES).unwrap();
        for item in &items {
            let other = again.next_item().unwrap().unwrap();
            assert_eq!(
                (bytes(&other), other.at, &other.id),
                (bytes(item), item.at, &item.id)
            );
        }
        assert!(again.next_item().unwrap().is_none());
        // Resuming after the first record gives the rest.
        let mut first = RecordReader::open(&path, None, DEFAULT_MAX_RECORD_BYTES).unwrap();
        first.next_item().unwrap().unwrap();
        let (rest, _) = read_all(&path, Some(first.resume_point()));
        assert_eq!(rest.len(), expected.len() - 1, "{name}");
        assert_eq!(bytes(&rest[0]), bytes(&items[1]));
        assert_eq!(rest[0].at.records, 1);
    }
    // No list of records: a note naming the keys, no record.
    let path = write(
        dir.path(),
        "meta.json",
        b"{\n  \"name\": \"x\",\n  \"size\": 3\n}\n",
    );
    let (items, mut reader) = read_all(&path, None);
    assert!(items.is_empty());
    let notes = reader.take_notes();
    assert!(
        notes[0].message.contains("records were not found")
            && notes[0].message.contains("name, size"),
        "{notes:?}"
    );
    // JSONL whose first record is cut short is still JSONL: the file is not one value.
    let path = write(
        dir.path(),
        "cut.jsonl",
        format!(
            "{{\"instruction\": \"a\", \"out\n{}\n{}\n",
            alpaca(1),
            alpaca(2)
        )
        .as_bytes(),
    );
    let (items, reader) = read_all(&path, None);
    assert_eq!(reader.container(), Container::Jsonl);
    assert_eq!(items.len(), 3);
    assert_eq!(items[1].at.line(), 2);
    // JSONL whose first line is a whole object stays JSONL.
    let path = write(
        dir.path(),
        "a.jsonl",
        format!("{}\n{}\n", alpaca(1), alpaca(2)).as_bytes(),
    );
    let (items, reader) = read_all(&path, None);
    assert_eq!(reader.container(), Container::Jsonl);
    assert_eq!(items.len(), 2);
}

#[test]
fn records_can_be_named_by_path_in_a_one_line_document() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "one-line.json",
        br#"{"meta": {"n": 2}, "items": {"train": [{"a": 1}, {"a": 2}], "test": [{"a": 3}]}}"#,
    );
    for at in ["items.train", "/items/train"] {
        let mut reader =
            RecordReader::open_document(&path, None, DEFAULT_MAX_RECORD_BYTES, at).unwrap();
        assert_eq!(reader.container(), Container::DocumentList);
        let mut got = Vec::new();
        while let Some(item) = reader.next_item().unwrap() {
            got.push(String::from_utf8(bytes(&item).to_vec()).unwrap());
        }
        // Records are handed on byte for byte as the file has them.
        assert_eq!(got, [r#"{"a": 1}"#, r#"{"a": 2}"#], "{at}");
        // Resuming after the first record, with the same path.
        let mut first =
            RecordReader::open_document(&path, None, DEFAULT_MAX_RECORD_BYTES, at).unwrap();
        first.next_item().unwrap();
        let mut rest = RecordReader::open_document(
            &path,
            Some(first.resume_point()),
            DEFAULT_MAX_RECORD_BYTES,
            at,
        )
        .unwrap();
        assert_eq!(bytes(&rest.next_item().unwrap().unwrap()), br#"{"a": 2}"#);
        assert!(rest.next_item().unwrap().is_none());
    }
    // A path to nothing names the document's keys; no record is read.
    let mut reader =
        RecordReader::open_document(&path, None, DEFAULT_MAX_RECORD_BYTES, "data").unwrap();
    assert!(reader.next_item().unwrap().is_none());
    let notes = reader.take_notes();
    assert!(
        notes[0]
            .message
            .contains("--records data: nothing there (the document's keys: meta, items)")
            || notes[0]
                .message
                .contains("--records data: nothing there (the document's keys: items, meta)"),
        "{notes:?}"
    );
}

#!/usr/bin/env bash
# corpusdb at scale, with the release binary: N million generated records (1M a file, one
# source and category a file, per-record format detection) imported with a manifest, then
# categories, analyze, a five-phase plan, the first batch and a resumed batch. Prints a
# table: wall seconds and peak RSS of each command, the store's size on disk.
#
#   cargo build --release && benches/scale.sh 1 && benches/scale.sh 3 && benches/scale.sh 10
#
# Generated files are kept in $CARGO_TARGET_DIR/bench-scale/ (4.1 GB for 10M, zstd);
# every run imports into a fresh store there. CORPUSDB_SCALE_PER_FILE=20000 makes a quick
# trial of the script. CORPUSDB_SCALE_LENGTHS=chat generates the chat length profile (1-8
# turns, long-tailed lengths, about 3 KB a record: `corpusdb generate --help`) instead of
# the uniform one, in files and stores of their own; CORPUSDB_SCALE_TOKENIZE=1 also times
# `tokenize` (the token cache for the tokenizer trained on the store) and the first batch
# read from it.
set -euo pipefail
cd "$(dirname "$0")/.."
millions=${1:?usage: benches/scale.sh MILLIONS}
target=${CARGO_TARGET_DIR:-target}
bin=${CORPUSDB_BIN:-$target/release/corpusdb}
work=$target/bench-scale
store=$work/store-${millions}m
mkdir -p "$work"
per_file=${CORPUSDB_SCALE_PER_FILE:-1000000}
lengths=${CORPUSDB_SCALE_LENGTHS:-uniform}
suffix=""
[ "$lengths" = uniform ] || suffix="-$lengths"
store=$store$suffix
categories=(code math reasoning qa creative dialogue instruction tool_use multilingual specialized)

manifest=$work/manifest-${millions}m$suffix.yaml
echo "imports:" >"$manifest"
for ((i = 0; i < millions; i++)); do
  name=g$i-$per_file$suffix.jsonl.zst
  [ -e "$work/$name" ] || "$bin" generate --out "$work/$name" --records "$per_file" \
    --seed $((1000 + i)) --lengths "$lengths" >/dev/null
  printf '  - {source: gen%d, category: %s, files: [%s]}\n' \
    "$i" "${categories[$((i % ${#categories[@]}))]}" "$name" >>"$manifest"
done

rm -rf "$store"
# `measure NAME CMD...`: the command's wall seconds and peak RSS, and its output kept.
measure() {
  local name=$1
  shift
  # analyze exits 1 when a check of the distribution fails: still measured.
  /usr/bin/time -f '%e %M' -o "$work/time" "$@" >"$work/$name.out" 2>"$work/$name.err" ||
    [ "$name" = analyze ]
  read -r secs kib < <(tail -1 "$work/time")
  printf '| %s | %s s | %d MiB |\n' "$name" "$secs" $((kib / 1024))
}
echo "| $((millions * per_file)) records | wall | peak RSS |"
echo "|---|---|---|"
measure ingest "$bin" --store "$store" ingest --manifest "$manifest"
measure categories "$bin" --store "$store" categories
measure analyze "$bin" --store "$store" analyze
curriculum=configs/curriculum/emergent_personality.yaml
measure plan "$bin" --store "$store" plan --curriculum "$curriculum"
"$bin" --store "$store" train-tokenizer --out "$work/tokenizer-${millions}m$suffix.json" --vocab 8000 >/dev/null
measure first-batch "$bin" --store "$store" batches --curriculum "$curriculum" \
  --tokenizer "$work/tokenizer-${millions}m$suffix.json" --limit 1 --state "$work/state.json"
measure resumed-batch "$bin" --store "$store" batches --curriculum "$curriculum" \
  --tokenizer "$work/tokenizer-${millions}m$suffix.json" --limit 1 --resume "$work/state.json"
if [ "${CORPUSDB_SCALE_TOKENIZE:-0}" = 1 ]; then
  measure tokenize "$bin" --store "$store" tokenize --tokenizer "$work/tokenizer-${millions}m$suffix.json"
  measure cached-first-batch "$bin" --store "$store" batches --curriculum "$curriculum" \
    --tokenizer "$work/tokenizer-${millions}m$suffix.json" --limit 1
  grep -h "tokens" "$work/tokenize.out" | tail -1 || true
fi
echo
grep -h "total:" "$work/ingest.out" | tail -1
grep -h "first batch after" "$work/first-batch.out" "$work/resumed-batch.out" || true
echo "store on disk: $(du -sh "$store" | cut -f1) (index included)"

//! `corpusdb generate`: write a synthetic corpus for benchmarks and experiments.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use corpusdb::reader::human_bytes;
use corpusdb::synth::{self, Lengths, NearDupSpec, SynthSpec};

/// Write a deterministic synthetic corpus (JSONL; .gz or .zst by extension): multi-turn
/// records in the alpaca, messages and sharegpt shapes, with a given fraction of repeats.
/// The same seed always gives the same file.
///
/// --lengths uniform (the default) gives 1-4 turns of about 1.5 KB a record, in narrow
/// uniform ranges; --lengths chat gives the lengths of public chat data: 1-8 turns (half of
/// them one), log-normal prompt and reply lengths with a long tail, about 3 KB a record.
///
/// With --near-duplicates F, records are instead originals and, for a fraction F, edited
/// copies of earlier originals (a sentence inserted, removed or rewritten, another system
/// prompt, whitespace, list numbering), in the messages shape: a corpus for `dedup --near`.
#[derive(clap::Args)]
pub struct Args {
    /// Output file.
    #[arg(long)]
    out: PathBuf,
    /// Number of records.
    #[arg(long, default_value_t = 100_000)]
    records: u64,
    /// Fraction of records that repeat earlier content.
    #[arg(long, default_value_t = 0.15)]
    duplicates: f64,
    /// Fraction of records that are edited copies of earlier ones (near-duplicates).
    #[arg(long, value_name = "F", conflicts_with = "duplicates")]
    near_duplicates: Option<f64>,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Length profile of the records.
    #[arg(long, value_enum, default_value_t = Lengths::Uniform)]
    lengths: Lengths,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let spec = SynthSpec {
        records: args.records,
        duplicate_fraction: args.duplicates,
        seed: args.seed,
        lengths: args.lengths,
    };
    let near = args.near_duplicates.map(|copy_fraction| NearDupSpec {
        records: args.records,
        copy_fraction,
        seed: args.seed,
    });
    let write = |out: &mut dyn Write| match &near {
        Some(spec) => synth::write_near_duplicates(&mut &mut *out, spec),
        None => synth::generate(&mut &mut *out, &spec),
    };
    let file = File::create(&args.out)
        .with_context(|| format!("{}: cannot create", args.out.display()))?;
    let name = args.out.to_string_lossy();
    let stats = if name.ends_with(".gz") {
        let mut out =
            flate2::write::GzEncoder::new(BufWriter::new(file), flate2::Compression::fast());
        let stats = write(&mut out)?;
        out.finish()?.flush()?;
        stats
    } else if name.ends_with(".zst") {
        let mut out = zstd::Encoder::new(BufWriter::new(file), 3)?;
        let stats = write(&mut out)?;
        out.finish()?.flush()?;
        stats
    } else {
        let mut out = BufWriter::new(file);
        let stats = write(&mut out)?;
        out.flush()?;
        stats
    };
    println!(
        "{}: {} records ({} unique), {} uncompressed, {} per record",
        args.out.display(),
        stats.records,
        stats.unique,
        human_bytes(stats.bytes),
        human_bytes(stats.bytes / stats.records.max(1))
    );
    Ok(ExitCode::SUCCESS)
}

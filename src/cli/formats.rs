//! `corpusdb formats`: the record shapes this build reads, with their fields.

use std::path::PathBuf;
use std::process::ExitCode;

use corpusdb::formats::Formats;

/// List every record format with the fields it reads.
///
/// Formats are detected from the fields a file's first records have (the most specific
/// match wins; a tie is reported with the candidates, and --format settles it).
///
/// A shape not listed here can be described in a YAML field mapping and passed with
/// `ingest --mapping FILE` (or `mapping:` in a manifest or the registry):
///
///   name: my-qa
///   detect: [query, reply]              # fields that identify the shape
///   system: "{persona?}"                # optional system message
///   turns:
///     - role: user
///       content: ["{context?}", "{query}"]   # parts joined by a blank line
///     - role: assistant
///       content: "{reply.text}"
///
/// Templates: {path} is a required field, {path?} an optional one; paths use dots and
/// [index] (answers.text[0]); filters: {choices|letters}, {answer|letter}, {list|lines},
/// {value|json}, {label|values(0=No,1=Yes)}. Instead of `turns`, messages can come from
/// `messages: {path, role, content, roles}`, `alternating: {path, first}` or
/// `transcript: {path, markers: {"\n\nHuman:": user, "\n\nAssistant:": assistant}}`.
/// Also: `rejected:` (the other side of a preference pair), `each: {path, as, limit}`
/// (one example per list item), `group: {by, order}` (join rows into one conversation),
/// `require: {field: value}`, `replace: {from: to}`, `raw_text: true`, and
/// `values: {field: string|number|bool|list|object}` (the kind of value a field holds,
/// which decides between formats with the same fields when detecting). The built-in
/// mappings (src/formats/builtin.yaml) are examples of each.
#[derive(clap::Args)]
pub struct Args {
    /// Also load these mapping files and list their formats.
    #[arg(long)]
    mapping: Vec<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut formats = Formats::builtin();
    for path in &args.mapping {
        formats.load_mapping(path)?;
    }
    if args.json {
        let list: Vec<_> = formats
            .iter()
            .map(|f| {
                serde_json::json!({
                    "name": f.name(),
                    "description": f.description(),
                    "fields": f.fields(),
                    "rows_grouped_by": f.group_by().map(|p| p.as_str()),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(ExitCode::SUCCESS);
    }
    let width = formats.iter().map(|f| f.name().len()).max().unwrap_or(0);
    for format in formats.iter() {
        println!("{:width$}  {}", format.name(), format.description());
        println!("{:width$}  fields: {}", "", format.fields());
    }
    Ok(ExitCode::SUCCESS)
}

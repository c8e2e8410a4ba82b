//! The HTML report of an analysis: one self-contained file (inline CSS and SVG, no script,
//! no network) with a chart in every section.

use std::fmt::Write as _;

use crate::analyze::{Analysis, Group, LENGTH_BINS};

/// Colours for categories / sources, repeated if there are more.
const PALETTE: [&str; 12] = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac", "#86bcb6", "#d37295",
];

fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn pct(share: f64) -> String {
    format!("{:.1}%", share * 100.0)
}

/// `1234567` -> `1,234,567`.
pub(crate) fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The whole report.
pub fn render(analysis: &Analysis, title: &str) -> String {
    let mut html = String::new();
    let tokens_label = if analysis.tokens_exact {
        "tokens"
    } else {
        "tokens (estimated)"
    };
    let _ = write!(
        html,
        r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; padding: 0 1rem; }}
h1 {{ margin-bottom: 0.2rem; }}
.sub {{ color: #666; margin-top: 0; }}
table {{ border-collapse: collapse; margin: 0.8rem 0; font-size: 0.82rem; }}
th, td {{ padding: 0.2rem 0.4rem; border-bottom: 1px solid #ddd; text-align: right; white-space: nowrap; }}
th:first-child, td:first-child {{ text-align: left; }}
.pass {{ color: #1a7f37; font-weight: 600; }}
.fail {{ color: #c62828; font-weight: 600; }}
section {{ margin-top: 2.2rem; }}
svg text {{ font-family: inherit; font-size: 12px; fill: #333; }}
.note {{ color: #666; font-size: 0.85rem; }}
</style>
</head>
<body>
<h1>{title}</h1>
<p class="sub">{examples} examples in use ({excluded} excluded by filters) from {read} records read; {dups} duplicates removed, {rejected} rejected. {tok}: {tokens} ({how}).</p>
"#,
        title = esc(title),
        examples = thousands(analysis.examples),
        excluded = thousands(analysis.excluded),
        read = thousands(analysis.records_read),
        dups = thousands(analysis.duplicates),
        rejected = thousands(analysis.rejected),
        tok = if analysis.tokens_exact {
            "Tokens"
        } else {
            "Tokens (estimated)"
        },
        tokens = thousands(analysis.tokens),
        how = esc(&analysis.token_count),
    );
    html.push_str("<table><tr><th>check</th><th>result</th><th>detail</th></tr>\n");
    for check in &analysis.checks {
        let _ = writeln!(
            html,
            "<tr><td>{}</td><td class=\"{}\">{}</td><td>{}</td></tr>",
            esc(&check.name),
            if check.passed { "pass" } else { "fail" },
            if check.passed { "PASS" } else { "FAIL" },
            esc(&check.detail)
        );
    }
    html.push_str("</table>\n");
    for note in &analysis.notes {
        let _ = writeln!(html, "<p class=\"note\">{}</p>", esc(note));
    }

    // 1. Shares against targets.
    html.push_str("<section id=\"distribution\">\n<h2>Categories: share against target</h2>\n");
    html.push_str(&share_chart(analysis));
    html.push_str(
        "<table><tr><th>category</th><th>examples</th><th>share</th><th>target</th><th>status</th>",
    );
    let _ = writeln!(
        html,
        "<th>{tokens_label}</th><th>mean</th><th>median</th><th>p95</th><th>turns</th><th>duplicates</th><th>rejected</th><th>excluded</th></tr>"
    );
    for row in &analysis.targets {
        let group = analysis.categories.iter().find(|g| g.name == row.category);
        let target = match (row.min_share, row.max_share) {
            (Some(a), Some(b)) => format!("{}–{}", pct(a), pct(b)),
            (Some(a), None) => format!("≥ {}", pct(a)),
            (None, Some(b)) => format!("≤ {}", pct(b)),
            (None, None) => "–".to_string(),
        };
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>",
            esc(&row.category),
            thousands(group.map_or(0, |g| g.examples)),
            pct(row.share),
            target,
            row.status
        );
        group_cells(&mut html, group);
        html.push_str("</tr>\n");
    }
    html.push_str("</table>\n</section>\n");

    // 2. Lengths per category.
    let _ = write!(
        html,
        "<section id=\"lengths\">\n<h2>Example length per category ({tokens_label})</h2>\n"
    );
    html.push_str(&histograms(&analysis.categories));
    html.push_str("</section>\n");

    // 3. Sources per category.
    html.push_str("<section id=\"sources-per-category\">\n<h2>Sources per category</h2>\n");
    html.push_str(&stacked_sources(analysis));
    html.push_str("</section>\n");

    // 4. Sources.
    html.push_str("<section id=\"sources\">\n<h2>Sources</h2>\n");
    html.push_str(&source_chart(&analysis.sources));
    let _ = writeln!(
        html,
        "<table><tr><th>source</th><th>examples</th><th>share</th><th>{tokens_label}</th><th>mean</th><th>median</th><th>p95</th><th>turns</th><th>duplicates</th><th>rejected</th><th>excluded</th></tr>"
    );
    for group in &analysis.sources {
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td>",
            esc(&group.name),
            thousands(group.examples),
            pct(group.share)
        );
        group_cells(&mut html, Some(group));
        html.push_str("</tr>\n");
    }
    html.push_str("</table>\n</section>\n</body>\n</html>\n");
    html
}

fn group_cells(html: &mut String, group: Option<&Group>) {
    let Some(g) = group else {
        html.push_str(&"<td>–</td>".repeat(8));
        return;
    };
    let _ = write!(
        html,
        "<td>{}</td><td>{:.0}</td><td>{}</td><td>{}</td><td>{:.1}</td><td>{}</td><td>{}</td><td>{}</td>",
        thousands(g.tokens),
        g.mean_tokens,
        thousands(g.median_tokens),
        thousands(g.p95_tokens),
        g.mean_turns,
        thousands(g.duplicates),
        thousands(g.rejected),
        thousands(g.excluded)
    );
}

/// Horizontal bars of each category's share, with its target range as a band.
fn share_chart(analysis: &Analysis) -> String {
    let rows = &analysis.targets;
    let (label_w, bar_w, row_h) = (130.0, 560.0, 26.0);
    let max_share = rows
        .iter()
        .flat_map(|r| [Some(r.share), r.max_share, r.min_share])
        .flatten()
        .fold(0.05f64, f64::max)
        .min(1.0);
    let scale = |share: f64| bar_w * share / max_share;
    let height = row_h * rows.len() as f64 + 30.0;
    let width = label_w + bar_w + 150.0;
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="category shares against targets">
"#
    );
    for (i, row) in rows.iter().enumerate() {
        let y = 10.0 + row_h * i as f64;
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
            label_w - 8.0,
            y + 15.0,
            esc(&row.category)
        );
        if let (Some(min), Some(max)) = (row.min_share, row.max_share) {
            let _ = writeln!(
                svg,
                r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="#c8e6c9"><title>target {}–{}</title></rect>"##,
                label_w + scale(min),
                y,
                (scale(max) - scale(min)).max(1.0),
                row_h - 4.0,
                pct(min),
                pct(max)
            );
        }
        let colour = match row.status {
            "above" => "#e15759",
            "below" => "#f28e2b",
            _ => "#4e79a7",
        };
        let _ = writeln!(
            svg,
            r#"<rect x="{label_w}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{colour}"><title>{}: {}</title></rect>"#,
            y + 6.0,
            scale(row.share),
            row_h - 16.0,
            esc(&row.category),
            pct(row.share)
        );
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{}">{} ({})</text>"#,
            label_w + scale(row.share).max(scale(row.max_share.unwrap_or(0.0))) + 6.0,
            y + 15.0,
            pct(row.share),
            row.status
        );
    }
    let x = label_w + scale(max_share);
    let _ = writeln!(
        svg,
        r##"<text x="{label_w}" y="{}" fill="#666">green band: target range; bars: actual share (blue in range, orange below, red above); axis to {}</text>"##,
        height - 4.0,
        pct(max_share)
    );
    let _ = writeln!(
        svg,
        r##"<line x1="{x:.1}" y1="6" x2="{x:.1}" y2="{:.1}" stroke="#bbb" stroke-dasharray="3,3"/>"##,
        height - 20.0
    );
    svg.push_str("</svg>\n");
    svg
}

/// Small multiples: one length histogram per category, in one chart.
fn histograms(groups: &[Group]) -> String {
    let groups: Vec<&Group> = groups.iter().filter(|g| g.examples > 0).collect();
    let (cell_w, cell_h, cols) = (260.0, 165.0, 4usize);
    let rows = groups.len().div_ceil(cols).max(1);
    let width = cell_w * cols as f64;
    let height = cell_h * rows as f64 + 20.0;
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="length histograms per category">
"#
    );
    let bins = LENGTH_BINS.len() + 1;
    let label = |i: usize| -> String {
        let k = |n: u64| {
            if n >= 1024 {
                format!("{}k", n / 1024)
            } else {
                n.to_string()
            }
        };
        match i {
            0 => format!("<{}", k(LENGTH_BINS[0])),
            i if i == LENGTH_BINS.len() => format!("≥{}", k(LENGTH_BINS[i - 1])),
            i => k(LENGTH_BINS[i - 1]),
        }
    };
    for (n, group) in groups.iter().enumerate() {
        let x0 = cell_w * (n % cols) as f64 + 10.0;
        let y0 = cell_h * (n / cols) as f64 + 10.0;
        let plot_h = cell_h - 50.0;
        let bar_w = (cell_w - 30.0) / bins as f64;
        let top = group.histogram.iter().copied().max().unwrap_or(0).max(1);
        let _ = writeln!(
            svg,
            r##"<text x="{x0:.1}" y="{:.1}" font-weight="600">{}</text><text x="{x0:.1}" y="{:.1}" font-size="10" fill="#666">median {}, p95 {}, {} examples</text>"##,
            y0 + 2.0,
            esc(&group.name),
            y0 + 14.0,
            group.median_tokens,
            group.p95_tokens,
            group.examples
        );
        for (i, &count) in group.histogram.iter().enumerate() {
            let h = plot_h * count as f64 / top as f64;
            let x = x0 + bar_w * i as f64;
            let _ = writeln!(
                svg,
                r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="{}"><title>{}: {} examples</title></rect>"#,
                y0 + 24.0 + plot_h - h,
                bar_w - 2.0,
                PALETTE[n % PALETTE.len()],
                esc(&label(i)),
                count
            );
            if i % 2 == 0 {
                let _ = writeln!(
                    svg,
                    r#"<text x="{:.1}" y="{:.1}" font-size="9">{}</text>"#,
                    x,
                    y0 + 38.0 + plot_h,
                    esc(&label(i))
                );
            }
        }
    }
    if groups.is_empty() {
        svg.push_str(r#"<text x="10" y="30">no examples</text>"#);
    }
    svg.push_str("</svg>\n");
    svg
}

/// One stacked bar per category: its examples split by source.
fn stacked_sources(analysis: &Analysis) -> String {
    let rows: Vec<(&String, &std::collections::BTreeMap<String, u64>)> =
        analysis.sources_per_category.iter().collect();
    let sources: Vec<&str> = analysis.sources.iter().map(|g| g.name.as_str()).collect();
    let colour = |name: &str| {
        let i = sources.iter().position(|s| *s == name).unwrap_or(0);
        PALETTE[i % PALETTE.len()]
    };
    let (label_w, bar_w, row_h) = (130.0, 600.0, 24.0);
    let legend_rows = sources.len().div_ceil(4);
    let height = row_h * rows.len() as f64 + 20.0 * legend_rows as f64 + 20.0;
    let width = label_w + bar_w + 20.0;
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="sources per category">
"#
    );
    for (i, (category, by_source)) in rows.iter().enumerate() {
        let y = 8.0 + row_h * i as f64;
        let total: u64 = by_source.values().sum();
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
            label_w - 8.0,
            y + 14.0,
            esc(category)
        );
        let mut x = label_w;
        for (source, &n) in by_source.iter() {
            let w = bar_w * n as f64 / total.max(1) as f64;
            let _ = writeln!(
                svg,
                r#"<rect x="{x:.1}" y="{y:.1}" width="{w:.1}" height="{:.1}" fill="{}"><title>{}: {} ({})</title></rect>"#,
                row_h - 6.0,
                colour(source),
                esc(source),
                n,
                pct(n as f64 / total.max(1) as f64)
            );
            x += w;
        }
    }
    let legend_y = 8.0 + row_h * rows.len() as f64 + 10.0;
    for (i, source) in sources.iter().enumerate() {
        let x = label_w + 150.0 * (i % 4) as f64;
        let y = legend_y + 20.0 * (i / 4) as f64;
        let _ = writeln!(
            svg,
            r#"<rect x="{x:.1}" y="{:.1}" width="10" height="10" fill="{}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            y - 9.0,
            colour(source),
            x + 14.0,
            y,
            esc(source)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// Examples per source.
fn source_chart(groups: &[Group]) -> String {
    let (label_w, bar_w, row_h) = (170.0, 520.0, 22.0);
    let top = groups.iter().map(|g| g.examples).max().unwrap_or(0).max(1);
    let height = row_h * groups.len() as f64 + 10.0;
    let width = label_w + bar_w + 120.0;
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="examples per source">
"#
    );
    for (i, g) in groups.iter().enumerate() {
        let y = 5.0 + row_h * i as f64;
        let w = bar_w * g.examples as f64 / top as f64;
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text><rect x="{label_w}" y="{y:.1}" width="{w:.1}" height="{:.1}" fill="{}"/><text x="{:.1}" y="{}">{} ({})</text>"#,
            label_w - 8.0,
            y + 13.0,
            esc(&g.name),
            row_h - 6.0,
            PALETTE[i % PALETTE.len()],
            label_w + w + 6.0,
            y + 13.0,
            thousands(g.examples),
            pct(g.share)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

//! The report's files: this run's part files and criterion figures merged
//! into one model, written as report.md (also printed), report.json and
//! one SVG chart per distribution and curve.

use super::*;

/// Reads this run's part files and criterion figures, writes report.md,
/// report.json and the charts, and prints the report.
pub(super) fn write_report(target: &Path, record: RunRecord) -> anyhow::Result<Report> {
    let report = build_report(target, record)?;
    let dir = report_dir(target);
    // Charts of an earlier run must not be mistaken for this one's.
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries.flatten() {
            if entry.path().extension().is_some_and(|e| e == "svg") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    let mut report = report;
    let (charts, warnings) = write_charts(&dir, &report.merged)?;
    report.charts = charts;
    report.merged.warnings.extend(warnings);
    let markdown = render::markdown(&report)?;
    std::fs::write(dir.join("report.md"), &markdown).context("writing report.md")?;
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )
    .context("writing report.json")?;
    println!("\n{markdown}");
    println!(
        "xtask: report written to {} (raw numbers: report.json; charts: {} SVG files)",
        dir.join("report.md").display(),
        report.charts.len()
    );
    Ok(report)
}

pub(super) fn build_report(target: &Path, record: RunRecord) -> anyhow::Result<Report> {
    let mut merged = Merged::default();
    let mut parts = Vec::new();
    let ran =
        |source: Source| record.only.is_empty() || record.only.iter().any(|o| o == source.name());
    let mut figures = Vec::new();
    if ran(Source::Criterion) {
        let since = UNIX_EPOCH + Duration::from_secs(record.started_unix);
        // Modification times have whole-second precision on some file
        // systems; a second of slack keeps this run's first figure.
        let since = since.checked_sub(Duration::from_secs(1)).unwrap_or(since);
        figures = criterion::collect(&target.join("criterion"), Some(since))?;
        merged.add(criterion::rows(&figures), Vec::new(), Vec::new());
    }
    for source in Source::ALL {
        if source.producer().is_none() || !ran(source) {
            continue;
        }
        let path = parts_dir(target).join(format!("{}.json", source.part_source()));
        if !path.exists() {
            continue; // Its step says why.
        }
        match Part::read(&path) {
            Ok(part) => {
                parts.push(PartInfo {
                    source: part.source.clone(),
                    profile: part.profile.clone(),
                    quick: part.quick,
                });
                merged.add(part.rows, part.distributions, part.curves);
            }
            Err(e) => merged.warnings.push(format!("{e:#}")),
        }
    }
    let criterion_summary = render::summarize(&merged.rows);
    Ok(Report {
        run: record,
        parts,
        merged,
        criterion: figures,
        charts: Vec::new(),
        criterion_summary,
    })
}

/// Writes one SVG per distribution and curve; a chart that cannot be drawn
/// is a warning in the report, not a failure of the run.
pub(super) fn write_charts(
    dir: &Path,
    merged: &Merged,
) -> anyhow::Result<(Vec<Chart>, Vec<String>)> {
    let mut charts = Vec::new();
    let mut warnings = Vec::new();
    let drawn = merged
        .distributions
        .iter()
        .map(|d| (d.id.as_str(), d.title.as_str(), charts::distribution_svg(d)))
        .chain(
            merged
                .curves
                .iter()
                .map(|c| (c.id.as_str(), c.title.as_str(), charts::curve_svg(c))),
        );
    for (id, title, svg) in drawn {
        match svg {
            Ok(svg) => {
                let file = charts::file_name(id);
                std::fs::write(dir.join(&file), svg).with_context(|| format!("writing {file}"))?;
                charts.push(Chart {
                    title: title.to_owned(),
                    file,
                });
            }
            Err(e) => warnings.push(format!("chart {id:?} not drawn: {e:#}")),
        }
    }
    Ok((charts, warnings))
}

//! SVG charts with plotters (SVG backend only): latency distributions
//! (percentile against latency, one line per transport) and throughput
//! against concurrency (one line per series).
//!
//! The percentile axis is drawn in "nines" (−log10(1 − p/100)), so that p50,
//! p90, p99 and p99.9 are evenly spaced and the tail, where transports
//! differ, is visible; the maximum (p100) sits at the next whole nine after the
//! last finite percentile.

use plotters::coord::ranged1d::ValueFormatter;
use plotters::prelude::*;

use super::model::{Curve, Distribution, Series};
use super::render::human;

const SIZE: (u32, u32) = (900, 540);

fn color(name: &str, index: usize) -> RGBColor {
    match name {
        "iroh" => RGBColor(0x1f, 0x77, 0xb4),
        "grpc" => RGBColor(0xd6, 0x27, 0x28),
        "dual" => RGBColor(0x2c, 0xa0, 0x2c),
        "raw_iroh" => RGBColor(0x9e, 0xc9, 0xe9),
        "raw_grpc" => RGBColor(0xf0, 0x9a, 0x9a),
        _ => {
            let (r, g, b) = Palette99::pick(index + 5).to_rgba().rgb();
            RGBColor(r, g, b)
        }
    }
}

fn label(name: &str) -> String {
    match name {
        "grpc" => "gRPC".to_owned(),
        "raw_iroh" => "raw iroh".to_owned(),
        "raw_grpc" => "raw gRPC".to_owned(),
        other => other.to_owned(),
    }
}

/// The "nines" of a percentile; `None` for p100 (placed by the caller).
fn nines(p: f64) -> Option<f64> {
    (p < 100.0).then(|| -(1.0 - p / 100.0).log10())
}

/// Labels whole nines (p0, p90, p99, ...) and the maximum; other ticks
/// stay unlabelled.
fn percentile_label(x: f64, max_x: Option<f64>) -> String {
    if max_x.is_some_and(|m| (x - m).abs() < 1e-6) {
        return "max".to_owned();
    }
    if (x - x.round()).abs() > 1e-6 {
        return String::new();
    }
    let p = 100.0 * (1.0 - 10f64.powf(-x));
    let s = format!("p{p:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

fn positive_bounds<'a>(values: impl Iterator<Item = &'a f64>) -> Option<(f64, f64)> {
    let (lo, hi) = values
        .filter(|v| v.is_finite() && **v > 0.0)
        .fold((f64::INFINITY, 0f64), |(lo, hi), v| {
            (lo.min(*v), hi.max(*v))
        });
    (hi > 0.0).then_some((lo, hi))
}

fn plot_error<E: std::error::Error + Send + Sync>(
    title: &str,
) -> impl FnOnce(DrawingAreaErrorKind<E>) -> anyhow::Error + '_ {
    move |e| anyhow::anyhow!("drawing the chart {title:?}: {e}")
}

/// A latency distribution as an SVG document.
pub(crate) fn distribution_svg(d: &Distribution) -> anyhow::Result<String> {
    let finite_max = d
        .series
        .values()
        .flatten()
        .filter_map(|(p, _)| nines(*p))
        .fold(0f64, f64::max);
    let max_x = d
        .series
        .values()
        .flatten()
        .any(|(p, _)| *p >= 100.0)
        .then_some(finite_max.floor() + 1.0);
    let x = |p: f64| nines(p).or(max_x).unwrap_or(finite_max);
    let Some((lo, hi)) = positive_bounds(d.series.values().flatten().map(|(_, v)| v)) else {
        anyhow::bail!("distribution {:?} has no positive value to draw", d.id);
    };
    let x_hi = max_x.unwrap_or(finite_max).max(1.0) + 0.1;
    let unit = d.unit.clone();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error(&d.title))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(&d.title, ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(90)
            .build_cartesian_2d(
                0f64..x_hi,
                // From a power of ten: plotters labels a log axis from
                // the first power of ten in range.
                (10f64.powf(lo.log10().floor())..hi * 1.5).log_scale(),
            )
            .map_err(plot_error(&d.title))?;
        chart
            .configure_mesh()
            .x_desc("percentile (spaced by nines: p50, p90, p99, p99.9)")
            .y_desc("latency (log scale)")
            .x_labels(x_hi.ceil() as usize + 1)
            .y_labels(12)
            .max_light_lines(2)
            .x_label_formatter(&|x| percentile_label(*x, max_x))
            .y_label_formatter(&|y| human(*y, &unit))
            .draw()
            .map_err(plot_error(&d.title))?;
        draw_lines(&mut chart, &d.series, x, &d.title)?;
        root.present().map_err(plot_error(&d.title))?;
    }
    Ok(svg)
}

/// Throughput against concurrency as an SVG document.
pub(crate) fn curve_svg(c: &Curve) -> anyhow::Result<String> {
    let Some((x_lo, x_hi)) = positive_bounds(c.series.values().flatten().map(|(x, _)| x)) else {
        anyhow::bail!("curve {:?} has no positive x to draw", c.id);
    };
    let y_hi = c
        .series
        .values()
        .flatten()
        .map(|(_, y)| *y)
        .filter(|y| y.is_finite())
        .fold(0f64, f64::max);
    if y_hi <= 0.0 {
        anyhow::bail!("curve {:?} has no positive value to draw", c.id);
    }
    let unit = c.y.clone();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error(&c.title))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(&c.title, ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(90)
            .build_cartesian_2d((x_lo / 1.2..x_hi * 1.2).log_scale(), 0f64..y_hi * 1.1)
            .map_err(plot_error(&c.title))?;
        chart
            .configure_mesh()
            .x_desc(format!("{} (log scale)", c.x))
            .y_desc(c.y.clone())
            .max_light_lines(0)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| human(*y, &unit))
            .draw()
            .map_err(plot_error(&c.title))?;
        draw_lines(&mut chart, &c.series, |x| x, &c.title)?;
        root.present().map_err(plot_error(&c.title))?;
    }
    Ok(svg)
}

fn draw_lines<'a, DB, X, Y>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>,
    series: &Series,
    x: impl Fn(f64) -> f64,
    title: &str,
) -> anyhow::Result<()>
where
    DB: DrawingBackend + 'a,
    X: Ranged<ValueType = f64> + ValueFormatter<f64>,
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    for (index, (name, points)) in series.iter().enumerate() {
        let color = color(name, index);
        let mut points: Vec<(f64, f64)> = points
            .iter()
            .filter(|(_, y)| y.is_finite() && *y > 0.0)
            .map(|(px, y)| (x(*px), *y))
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)).point_size(3))
            .map_err(|e| anyhow::anyhow!("drawing the chart {title:?}: {e}"))?
            .label(label(name))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow::anyhow!("drawing the chart {title:?}: {e}"))?;
    Ok(())
}

/// A file name for a chart id: letters, digits, `-` and `_` only.
pub(crate) fn file_name(id: &str) -> String {
    let stem: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{stem}.svg")
}

//! Latency summaries, the table on stdout, the JSON result and SVG latency plots.

use std::path::Path;

use anyhow::{anyhow, Result};
use hdrhistogram::Histogram;
use serde::Serialize;

/// Microsecond histogram bounds: 1 µs to 10 min, 3 significant figures.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("constant, valid bounds")
}

/// Percentiles of a latency histogram, in milliseconds.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    /// (percentile, ms) points for plots.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub curve: Vec<(f64, f64)>,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        if h.is_empty() {
            return Self::default();
        }
        let curve = [
            0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 100.0,
        ]
        .iter()
        .map(|p| (*p, ms(h.value_at_percentile(*p))))
        .collect();
        Self {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.5)),
            p90_ms: ms(h.value_at_quantile(0.9)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            mean_ms: h.mean() / 1000.0,
            curve,
        }
    }

    pub fn line(&self) -> String {
        format!(
            "n={} p50={:.2}ms p90={:.2}ms p99={:.2}ms p99.9={:.2}ms max={:.2}ms",
            self.count, self.p50_ms, self.p90_ms, self.p99_ms, self.p999_ms, self.max_ms
        )
    }
}

/// Writes a percentile plot (x: percentile on a log scale of 1/(1-p), y: ms) of several runs.
pub fn plot(path: &Path, title: &str, series: &[(String, &Latency)]) -> Result<()> {
    use plotters::prelude::*;
    let x_of = |p: f64| -((1.0 - p / 100.0).max(1e-5)).log10();
    let y_max = series
        .iter()
        .flat_map(|(_, l)| l.curve.iter().map(|(_, ms)| *ms))
        .fold(1.0_f64, f64::max)
        * 1.1;
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| anyhow!("plot {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..4.2_f64, 0.0..y_max)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .x_labels(6)
        .x_label_formatter(&|x| {
            let p = 100.0 * (1.0 - 10f64.powf(-x));
            format!("{p:.2}")
        })
        .draw()
        .map_err(|e| err(&e))?;
    for (i, (name, latency)) in series.iter().enumerate() {
        let colour = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                latency.curve.iter().map(|(p, ms)| (x_of(*p), *ms)),
                colour.stroke_width(2),
            ))
            .map_err(|e| err(&e))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn usage_line(usage: &crate::probe::Usages) -> String {
    let one = |u: &Option<crate::probe::Usage>| match u {
        Some(u) => format!(
            "cpu {:.0}% of a core, rss {:.1} → {:.1} MiB (peak {:.1})",
            u.cpu_percent,
            mib(u.rss_start_bytes),
            mib(u.rss_end_bytes),
            mib(u.rss_peak_bytes)
        ),
        None => "not measured (no --server-pid)".into(),
    };
    if usage.nodes.is_empty() {
        return format!(
            "  server:  {}\n  harness: {}",
            one(&usage.server),
            one(&usage.harness)
        );
    }
    let each: Vec<String> = usage
        .nodes
        .iter()
        .map(|u| format!("{:.0}%", u.cpu_percent))
        .collect();
    let total: f64 = usage.nodes.iter().map(|u| u.cpu_percent).sum();
    format!(
        "  nodes:   cpu {} = {total:.0}% of a core\n  harness: {}",
        each.join(" + "),
        one(&usage.harness)
    )
}

pub fn fanout_lines(r: &crate::scenario::FanoutResult) -> Vec<String> {
    let o = &r.options;
    vec![
        format!(
            "fanout: {} docs × {} clients at {:.0} updates/s for {:.0} s (+{:.0} s warm-up); connected in {:.2} s",
            o.docs, o.clients, o.rate, o.duration_secs, o.warmup_secs, r.connect_secs
        ),
        format!("  latency: {}", r.latency.line()),
        format!(
            "  updates in {:.0}/s, messages out {:.0}/s; deliveries {}/{} (missing {}); errors {}, reconnects {}",
            r.updates_in_per_sec,
            r.messages_out_per_sec,
            r.deliveries,
            r.expected_deliveries,
            r.missing_deliveries,
            r.errors,
            r.reconnects
        ),
        usage_line(&r.usage),
    ]
}

pub fn idle_lines(r: &crate::scenario::IdleResult) -> Vec<String> {
    vec![
        format!(
            "idle: {} connections ({} per document) connected in {:.2} s; dropped {}",
            r.options.connections, r.options.per_doc, r.connect_secs, r.dropped
        ),
        format!(
            "  server rss {} → {} ({} per connection)",
            r.server_rss_before_bytes
                .map_or("?".into(), |b| format!("{:.1} MiB", mib(b))),
            r.server_rss_after_bytes
                .map_or("?".into(), |b| format!("{:.1} MiB", mib(b))),
            r.server_bytes_per_connection
                .map_or("?".into(), |b| format!("{:.1} KiB", b / 1024.0)),
        ),
        usage_line(&r.usage),
    ]
}

pub fn join_storm_lines(r: &crate::scenario::JoinStormResult) -> Vec<String> {
    vec![
        format!(
            "join-storm: {} clients join a {:.1} MB document at once; all synced in {:.3} s; {:.2} MB received per client; errors {}",
            r.options.clients,
            r.options.doc_bytes as f64 / 1e6,
            r.all_synced_secs,
            r.bytes_per_client as f64 / 1e6,
            r.errors
        ),
        format!("  time to sync: {}", r.time_to_sync.line()),
        usage_line(&r.usage),
    ]
}

pub fn trace_lines(r: &crate::scenario::TraceResult) -> Vec<String> {
    vec![
        format!(
            "trace {}: {} transactions through {} clients in {:.2} s ({:.0} updates/s); clients exact: {}; storage exact: {}",
            r.options.trace.display(),
            r.transactions,
            r.options.clients,
            r.total_secs,
            r.updates_per_sec,
            r.clients_exact,
            r.storage_exact.map_or("n/a".into(), |b| b.to_string())
        ),
        usage_line(&r.usage),
    ]
}

pub fn cold_load_lines(r: &crate::scenario::ColdLoadResult) -> Vec<String> {
    vec![format!(
        "cold-load: {} bytes of state; loads {:?} ms; median {:.1} ms, min {:.1} ms",
        r.state_bytes,
        r.loads_ms
            .iter()
            .map(|ms| (ms * 10.0).round() / 10.0)
            .collect::<Vec<_>>(),
        r.median_ms,
        r.min_ms
    )]
}

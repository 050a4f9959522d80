//! `--plot`: a latency-by-percentile chart of every phase as a hand-written SVG.
//!
//! The x axis is the percentile on the usual HdrHistogram scale (0, 90, 99, 99.9, ... evenly
//! spaced: log10 of 1/(1-q)), the y axis latency on a log scale, so a tail and a median of very
//! different sizes both stay readable.

use std::fmt::Write as _;

use crate::stats::{PhaseSet, PHASES};

const W: f64 = 900.0;
const H: f64 = 520.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 160.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;
const COLORS: [&str; 5] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"];

/// Renders the SVG text. `title` goes on top.
pub fn svg(phases: &PhaseSet, title: &str) -> String {
    // Percentile depth to draw: as far as the largest histogram supports, up to 99.999%.
    let max_count = PHASES
        .iter()
        .map(|p| phases.get(*p).len())
        .max()
        .unwrap_or(0);
    let depth = ((max_count.max(10) as f64).log10()).clamp(1.0, 5.0);
    let (mut lo, mut hi) = (u64::MAX, 1u64);
    for p in PHASES {
        let h = phases.get(p);
        if !h.is_empty() {
            lo = lo.min(h.min().max(1));
            hi = hi.max(h.max());
        }
    }
    if lo == u64::MAX {
        lo = 1;
    }
    let (ylo, yhi) = (
        (lo as f64).log10().floor(),
        ((hi as f64).log10().ceil()).max((lo as f64).log10().floor() + 1.0),
    );
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let x = |d: f64| LEFT + d / depth * pw;
    let y = |us: f64| TOP + ph - ((us.max(1.0).log10() - ylo) / (yhi - ylo)) * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="14">{}</text>"#,
        W / 2.0,
        escape(title)
    );
    // Grid: one vertical line per nine (0%, 90%, 99%, ...), one horizontal per decade.
    for d in 0..=(depth.floor() as u32) {
        let label = if d == 0 {
            "0%".to_string()
        } else {
            format!("{}%", 100.0 - 100.0 / 10f64.powi(d as i32))
        };
        let xv = x(f64::from(d));
        let _ = writeln!(
            s,
            r##"<line x1="{xv:.1}" y1="{TOP}" x2="{xv:.1}" y2="{:.1}" stroke="#ddd"/>"##,
            TOP + ph
        );
        let _ = writeln!(
            s,
            r#"<text x="{xv:.1}" y="{:.1}" text-anchor="middle">{label}</text>"#,
            TOP + ph + 18.0
        );
    }
    for e in (ylo as i32)..=(yhi as i32) {
        let v = 10f64.powi(e);
        let yv = y(v);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{yv:.1}" x2="{:.1}" y2="{yv:.1}" stroke="#ddd"/>"##,
            LEFT + pw
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 6.0,
            yv + 4.0,
            human_us(v)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">percentile</text>"#,
        LEFT + pw / 2.0,
        H - 15.0
    );
    let _ = writeln!(
        s,
        r#"<text x="18" y="{:.1}" transform="rotate(-90 18 {:.1})" text-anchor="middle">latency</text>"#,
        TOP + ph / 2.0,
        TOP + ph / 2.0
    );
    for (i, p) in PHASES.iter().enumerate() {
        let h = phases.get(*p);
        let ly = TOP + 20.0 + i as f64 * 20.0;
        let _ = writeln!(
            s,
            r#"<line x1="{:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{}" stroke-width="3"/>"#,
            W - RIGHT + 15.0,
            W - RIGHT + 40.0,
            COLORS[i]
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}">{} ({})</text>"#,
            W - RIGHT + 45.0,
            ly + 4.0,
            p.name(),
            h.len()
        );
        if h.is_empty() {
            continue;
        }
        let mut pts = String::new();
        // Depth samples: 0.02 steps of log10(1/(1-q)) up to the depth the data supports.
        let steps = (depth * 50.0) as u32;
        let own_depth = (h.len().max(1) as f64).log10().min(depth);
        for k in 0..=steps {
            let d = depth * f64::from(k) / f64::from(steps);
            if d > own_depth + 1e-9 {
                break;
            }
            let q = 1.0 - 10f64.powf(-d);
            let v = h.value_at_quantile(q) as f64;
            let _ = write!(pts, "{:.1},{:.1} ", x(d), y(v));
        }
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>"#,
            COLORS[i],
            pts.trim_end()
        );
    }
    let _ = writeln!(
        s,
        r##"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>"##
    );
    s.push_str("</svg>\n");
    s
}

fn human_us(v: f64) -> String {
    if v >= 1e6 {
        format!("{} s", v / 1e6)
    } else if v >= 1e3 {
        format!("{} ms", v / 1e3)
    } else {
        format!("{v} µs")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Phase;

    #[test]
    fn plot_is_well_formed_svg_with_one_line_per_phase_with_data() {
        let mut p = PhaseSet::default();
        for v in 1..=5000u64 {
            p.record(Phase::Session, 100 + v);
            p.record(Phase::Connect, 10 + v % 50);
        }
        let s = svg(&p, "a <test> run");
        assert!(s.starts_with("<svg") && s.ends_with("</svg>\n"));
        assert_eq!(
            s.matches("<polyline").count(),
            2,
            "only phases with samples get a line"
        );
        assert!(s.contains("99.9%"), "percentile axis labels");
        assert!(s.contains("a &lt;test&gt; run"));
        assert!(!s.contains("NaN") && !s.contains("inf"));
        // An empty set still renders.
        let empty = svg(&PhaseSet::default(), "empty");
        assert!(empty.contains("</svg>") && !empty.contains("NaN"));
    }
}

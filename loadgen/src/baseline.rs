//! Regression check against an earlier `--json` report: throughput must not fall, and no phase's
//! p99 may rise, by more than the allowed percentage. Each regression is named.

use crate::report::Report;

/// The regressions of `cur` against `base`, one sentence each; empty when within `max_pct`.
pub fn compare(base: &Report, cur: &Report, max_pct: f64) -> Vec<String> {
    let mut out = Vec::new();
    let b = base.throughput.messages_per_s;
    let c = cur.throughput.messages_per_s;
    if b > 0.0 && c < b * (1.0 - max_pct / 100.0) {
        out.push(format!(
            "throughput fell {:.1}% ({b:.1} -> {c:.1} messages/s), more than the allowed {max_pct}%",
            (b - c) / b * 100.0
        ));
    }
    for bp in base.phases.iter().filter(|p| p.count > 0) {
        match cur.phase(&bp.name) {
            Some(cp) if cp.count > 0 => {
                let (b, c) = (bp.p99_us as f64, cp.p99_us as f64);
                if c > b * (1.0 + max_pct / 100.0) {
                    out.push(format!(
                        "p99 of {} rose {:.1}% ({} -> {} µs), more than the allowed {max_pct}%",
                        bp.name,
                        (c - b) / b.max(1.0) * 100.0,
                        bp.p99_us,
                        cp.p99_us
                    ));
                }
            }
            _ => out.push(format!(
                "{} has no samples now (the baseline had {})",
                bp.name, bp.count
            )),
        }
    }
    out
}

/// Differences in shape that make a comparison questionable (warned about, not failed).
pub fn shape_differences(base: &Report, cur: &Report) -> Vec<String> {
    let mut out = Vec::new();
    let mut check = |what: &str, a: String, b: String| {
        if a != b {
            out.push(format!(
                "{what} differs from the baseline ({a} there, {b} now)"
            ));
        }
    };
    check("mode", base.mode.clone(), cur.mode.clone());
    check(
        "connections",
        format!("{:?}", base.connections),
        format!("{:?}", cur.connections),
    );
    check(
        "rate",
        format!("{:?}", base.rate_per_s),
        format!("{:?}", cur.rate_per_s),
    );
    check(
        "messages per session",
        base.messages_per_session.to_string(),
        cur.messages_per_session.to_string(),
    );
    check(
        "recipients",
        base.recipients.to_string(),
        cur.recipients.to_string(),
    );
    check(
        "size",
        base.size_bytes.to_string(),
        cur.size_bytes.to_string(),
    );
    check(
        "pipelining",
        base.pipelining_requested.to_string(),
        cur.pipelining_requested.to_string(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::PhaseSummary;

    fn report(msgs: f64, p99s: &[(&str, u64)]) -> Report {
        let mut r = Report::default();
        r.throughput.messages_per_s = msgs;
        r.phases = p99s
            .iter()
            .map(|(n, p)| PhaseSummary {
                name: n.to_string(),
                count: 100,
                p99_us: *p,
                ..Default::default()
            })
            .collect();
        r
    }

    #[test]
    fn within_the_allowance_is_no_regression() {
        let base = report(1000.0, &[("session", 1000), ("transaction", 500)]);
        assert!(compare(
            &base,
            &report(950.0, &[("session", 1090), ("transaction", 400)]),
            10.0
        )
        .is_empty());
        // Exactly at the limit still passes.
        assert!(compare(
            &base,
            &report(900.0, &[("session", 1100), ("transaction", 550)]),
            10.0
        )
        .is_empty());
        // Getting faster is never a regression.
        assert!(compare(
            &base,
            &report(5000.0, &[("session", 10), ("transaction", 5)]),
            0.0
        )
        .is_empty());
    }

    #[test]
    fn falling_throughput_is_named() {
        let base = report(1000.0, &[("session", 1000)]);
        let r = compare(&base, &report(800.0, &[("session", 1000)]), 10.0);
        assert_eq!(r.len(), 1);
        assert!(
            r[0].contains("throughput fell 20.0%") && r[0].contains("1000.0 -> 800.0"),
            "{}",
            r[0]
        );
    }

    #[test]
    fn rising_p99_names_the_phase() {
        let base = report(
            1000.0,
            &[("connect", 100), ("session", 1000), ("transaction", 500)],
        );
        let r = compare(
            &base,
            &report(
                1000.0,
                &[("connect", 100), ("session", 1000), ("transaction", 800)],
            ),
            10.0,
        );
        assert_eq!(r.len(), 1, "{r:?}");
        assert!(
            r[0].contains("p99 of transaction rose 60.0%") && r[0].contains("500 -> 800"),
            "{}",
            r[0]
        );
    }

    #[test]
    fn a_phase_without_samples_now_is_a_regression() {
        let base = report(1000.0, &[("session", 1000)]);
        let mut cur = report(1000.0, &[("session", 1000)]);
        cur.phases[0].count = 0;
        let r = compare(&base, &cur, 10.0);
        assert_eq!(r.len(), 1);
        assert!(r[0].contains("session has no samples"));
    }

    #[test]
    fn shape_differences_are_listed() {
        let mut a = report(1.0, &[]);
        let mut b = a.clone();
        a.size_bytes = 1024;
        b.size_bytes = 2048;
        let d = shape_differences(&a, &b);
        assert_eq!(d.len(), 1);
        assert!(d[0].contains("size"));
    }
}

//! Log formatting: the two INFO lines the worker writes per message ("message" and "session
//! end"), formatted by tracing-subscriber's default format (no colours, no target: what ringmx
//! used before) and by `ringmx::logging::LineFormat`, into a writer that drops the bytes. The
//! difference is the formatting cost per message that the server saves.
use std::net::IpAddr;

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use ringmx::logging::LineFormat;

fn two_lines(peer: IpAddr, to: &[String]) {
    tracing::info!(
        queue_id = %black_box("6B0F27A7D1195P3A49W0Q0"),
        client = %peer,
        from = %black_box("sender@example.com"),
        to = ?to,
        size = black_box(102_400usize),
        result = "discarded",
        "message"
    );
    tracing::info!(
        client = %peer,
        duration_ms = black_box(12u64),
        messages = 1u32,
        rejected = 0u32,
        commands = 5u32,
        errors = 0u32,
        result = "closed",
        "session end"
    );
}

fn bench(c: &mut Criterion) {
    let peer: IpAddr = "127.0.0.1".parse().unwrap();
    let to = vec!["rcpt@example.net".to_string()];
    let mut g = c.benchmark_group("log lines per message");
    g.throughput(Throughput::Elements(1));
    let default = tracing_subscriber::fmt()
        .with_writer(std::io::sink)
        .with_ansi(false)
        .with_target(false)
        .finish();
    tracing::subscriber::with_default(default, || {
        g.bench_function("tracing-subscriber default format", |b| {
            b.iter(|| two_lines(peer, &to))
        });
    });
    let ours = tracing_subscriber::fmt()
        .with_writer(std::io::sink)
        .event_format(LineFormat)
        .finish();
    tracing::subscriber::with_default(ours, || {
        g.bench_function("LineFormat", |b| b.iter(|| two_lines(peer, &to)));
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

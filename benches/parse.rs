//! Command parser throughput: command lines per second over a realistic mix (EHLO, MAIL with
//! parameters, RCPT, DATA, NOOP, long and invalid lines). Byte throughput is declared so
//! criterion reports both lines/s (via the element count) and bytes/s.
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use ringmx::protocol::parse::parse_command;

/// One session's worth of command lines, as real clients send them, plus junk.
fn mix() -> Vec<Vec<u8>> {
    let long_noop = format!("NOOP {}", "x".repeat(500));
    let long_rcpt = format!("RCPT TO:<{}@recipient.example>", "l".repeat(200));
    let lines: Vec<&str> = vec![
        "EHLO mail-relay.client.example.org",
        "MAIL FROM:<newsletter-bounces+user=example.com@lists.client.example.org> SIZE=48213 BODY=8BITMIME",
        "RCPT TO:<alice@recipient.example>",
        "RCPT TO:<bob.smith@recipient.example>",
        "rcpt to: <Carol@Recipient.Example>",
        "DATA",
        "MAIL FROM:<> SIZE=2048",
        "RCPT TO:<postmaster>",
        "RSET",
        "NOOP",
        "MAIL FROM:<j\u{f6}rg@b\u{fc}ro.example> SMTPUTF8",
        "QUIT",
        &long_noop,
        &long_rcpt,
        // Invalid lines: unknown verbs, bad syntax, unknown parameters.
        "GET / HTTP/1.1",
        "MAIL FROM:user@example.com",
        "RCPT TO:<a@b> NOTIFY=SUCCESS,FAILURE",
        "AUTH LOGIN",
    ];
    lines.into_iter().map(|l| l.as_bytes().to_vec()).collect()
}

fn bench_parse(c: &mut Criterion) {
    let lines = mix();
    let bytes: usize = lines.iter().map(|l| l.len() + 2).sum();
    let mut g = c.benchmark_group("parse");
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function("mix_bytes", |b| {
        b.iter(|| {
            let mut ok = 0usize;
            for l in &lines {
                ok += usize::from(parse_command(black_box(l)).is_ok());
            }
            ok
        })
    });
    g.throughput(Throughput::Elements(lines.len() as u64));
    g.bench_function("mix_lines", |b| {
        b.iter(|| {
            let mut ok = 0usize;
            for l in &lines {
                ok += usize::from(parse_command(black_box(l)).is_ok());
            }
            ok
        })
    });
    g.finish();
}

criterion_group!(benches, bench_parse);
criterion_main!(benches);

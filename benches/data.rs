//! DATA scanner throughput on 1 KB, 100 KB and 10 MB bodies, plain and with many leading dots.
//!
//! - `scanner`: the scanner's whole job (end-of-data search, dot-unstuffing handed out as
//!   segments of the input, bare CR/LF check), with a sink that only adds up the segment lengths,
//!   as a discard session does. Issue 4's target: >= 0.8x the `memmem` baseline's bytes/s.
//!   The scanner picks its kernel at run time: the fused vector one with AVX-512 where the CPU
//!   has it (on AMD's Zen 4 its 256-bit form, `avx512vl`), else with AVX2 (as memchr does),
//!   elsewhere the portable one (`memmem` for LF-dot plus a bare CR/LF pass), so the figures
//!   are for the kernel of the machine they were measured on. `scanner_<kernel>` rows time each
//!   other kernel the CPU can run.
//! - `scanner_copy`: the same with the segments copied into a body `Vec`, as a session that
//!   keeps the body (maildir) does.
//! - `memmem`: `memchr::memmem` searching for `\r\n.\r\n` over the same bytes (search only).
//! - `memmem_copy`: search, then one copy of the body: the floor for any scanner that copies,
//!   the reference for `scanner_copy`.
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ringmx::protocol::data::DataScanner;

/// A realistic body of about `size` bytes: headers, then 72-column text lines; with `dots`,
/// every third line starts with a (stuffed) dot. Ends with the `<CRLF>.<CRLF>` marker.
fn body(size: usize, dots: bool) -> Vec<u8> {
    let mut v = Vec::with_capacity(size + 128);
    v.extend_from_slice(
        b"Received: from client.example (client.example [192.0.2.1])\r\n\
          From: Alice <alice@client.example>\r\nTo: Bob <bob@recipient.example>\r\n\
          Subject: quarterly figures\r\nMessage-ID: <1234.5678@client.example>\r\n\r\n",
    );
    let words = b"lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor ";
    let mut n = 0usize;
    while v.len() < size {
        if dots && n.is_multiple_of(3) {
            v.extend_from_slice(b"..");
        }
        let start = n % 7;
        v.extend_from_slice(&words[start..start + 64]);
        v.extend_from_slice(b"\r\n");
        n += 1;
    }
    v.extend_from_slice(b".\r\n");
    v
}

fn bench_data(c: &mut Criterion) {
    for (name, size) in [
        ("1KB", 1_000usize),
        ("100KB", 100_000),
        ("10MB", 10_000_000),
    ] {
        let mut g = c.benchmark_group(format!("data/{name}"));
        if size >= 10_000_000 {
            g.sample_size(20);
        }
        for dots in [false, true] {
            let input = body(size, dots);
            let label = if dots { "dots" } else { "plain" };
            g.throughput(Throughput::Bytes(input.len() as u64));
            g.bench_with_input(BenchmarkId::new("scanner", label), &input, |b, input| {
                b.iter(|| {
                    let mut s = DataScanner::new(u64::MAX);
                    let mut total = 0usize;
                    let end = s.scan(black_box(input), |segment| total += segment.len());
                    assert_eq!(end, Some(input.len()));
                    total
                })
            });
            // Every other kernel this CPU runs (`scanner_avx2` on an AVX-512 host,
            // `scanner_portable` everywhere), so that a change that slows a kernel this machine
            // does not pick still shows (one did, 10x on dot lines, unseen for a day).
            let best = DataScanner::new(u64::MAX).kernel();
            for kernel in DataScanner::kernels().into_iter().filter(|k| *k != best) {
                // Made once, outside the timed loop: `with_kernel` asks the CPU which kernels it
                // runs, which `new` does once per process. Each iteration starts from a copy.
                let fresh =
                    DataScanner::with_kernel(u64::MAX, kernel).expect("a kernel this CPU runs");
                g.bench_with_input(
                    BenchmarkId::new(format!("scanner_{kernel}"), label),
                    &input,
                    |b, input| {
                        b.iter(|| {
                            let mut s = fresh.clone();
                            let mut total = 0usize;
                            let end = s.scan(black_box(input), |segment| total += segment.len());
                            assert_eq!(end, Some(input.len()));
                            total
                        })
                    },
                );
            }
            let mut out = Vec::with_capacity(input.len());
            g.bench_with_input(
                BenchmarkId::new("scanner_copy", label),
                &input,
                |b, input| {
                    b.iter(|| {
                        out.clear();
                        let mut s = DataScanner::new(u64::MAX);
                        let end =
                            s.scan(black_box(input), |segment| out.extend_from_slice(segment));
                        assert_eq!(end, Some(input.len()));
                        out.len()
                    })
                },
            );
            // The memmem baseline finds the marker with the 354 counted as a line start, as the
            // scanner does: search the body as is (the only marker is the final one).
            let finder = memchr::memmem::Finder::new(b"\r\n.\r\n");
            g.bench_with_input(BenchmarkId::new("memmem", label), &input, |b, input| {
                b.iter(|| finder.find(black_box(input)))
            });
            // A second reference: search, then copy the body once, the least any scanner that
            // hands over a `Vec` body must do (without unstuffing or the bare CR/LF check).
            let mut copy = Vec::with_capacity(input.len());
            g.bench_with_input(
                BenchmarkId::new("memmem_copy", label),
                &input,
                |b, input| {
                    b.iter(|| {
                        copy.clear();
                        let end = finder.find(black_box(input)).unwrap_or(input.len());
                        copy.extend_from_slice(&input[..end]);
                        copy.len()
                    })
                },
            );
        }
        g.finish();
    }
}

criterion_group!(benches, bench_data);
criterion_main!(benches);

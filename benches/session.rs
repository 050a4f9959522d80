//! Session state machine: complete SMTP transactions per second fed from memory, no I/O. Each
//! iteration runs one pipelined transaction (MAIL, RCPT, DATA with a 1 KB body, then the store's
//! answer) on a session that already said EHLO, and one whole session from greeting to QUIT.
use std::sync::Arc;

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use ringmx::protocol::{CommitResult, Feed, Session, SessionConfig};

fn transaction() -> Vec<u8> {
    let mut t =
        b"MAIL FROM:<alice@client.example> SIZE=1100\r\nRCPT TO:<bob@recipient.example>\r\n\
                  RCPT TO:<carol@recipient.example>\r\nDATA\r\n"
            .to_vec();
    t.extend_from_slice(b"Subject: hello\r\nFrom: alice@client.example\r\n\r\n");
    while t.len() < 1100 {
        t.extend_from_slice(
            b"The quick brown fox jumps over the lazy dog, again and again, all day.\r\n",
        );
    }
    t.extend_from_slice(b".\r\n");
    t
}

/// Feeds `input` to the end, committing every message; returns the messages seen.
fn feed_all(s: &mut Session, mut input: &[u8], out: &mut Vec<u8>) -> usize {
    let mut n = 0;
    loop {
        match s.feed(input, out) {
            Feed::NeedMore | Feed::Close { .. } => return n,
            Feed::Commit { consumed } => {
                let m = s.take_message();
                n += usize::from(m.is_some());
                s.committed(
                    CommitResult::Stored {
                        queue_id: "bench".into(),
                    },
                    out,
                );
                input = &input[consumed..];
            }
        }
    }
}

fn bench_session(c: &mut Criterion) {
    let cfg = Arc::new(SessionConfig::default());
    let peer = "192.0.2.1:40000".parse().unwrap();
    let tx = transaction();
    let mut g = c.benchmark_group("session");

    g.throughput(Throughput::Elements(1));
    g.bench_function("transaction_1KB", |b| {
        let mut s = Session::new(cfg.clone(), peer);
        let mut out = Vec::with_capacity(4096);
        s.feed(b"EHLO client.example\r\n", &mut out);
        b.iter(|| {
            out.clear();
            let n = feed_all(&mut s, black_box(&tx), &mut out);
            assert_eq!(n, 1);
            out.len()
        })
    });

    let mut whole = b"EHLO client.example\r\n".to_vec();
    whole.extend_from_slice(&tx);
    whole.extend_from_slice(b"QUIT\r\n");
    g.throughput(Throughput::Elements(1));
    g.bench_function("session_1KB_connect_to_quit", |b| {
        let mut out = Vec::with_capacity(4096);
        b.iter(|| {
            out.clear();
            let mut s = Session::new(cfg.clone(), peer);
            s.greet(&mut out);
            let n = feed_all(&mut s, black_box(&whole), &mut out);
            assert_eq!(n, 1);
            out.len()
        })
    });
    g.finish();
}

criterion_group!(benches, bench_session);
criterion_main!(benches);

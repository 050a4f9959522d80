//! Property tests over the sans-I/O session, the command parser and the DATA scanner.
//!
//! - Arbitrary bytes and SMTP-shaped bytes, fed in arbitrary chunkings, never panic, and give the
//!   same replies and the same messages whatever the chunking (the session driver and the
//!   contract checks live in `fuzz/src/lib.rs`, shared with the fuzz targets).
//! - The session holds bounded memory: a per-thread counting allocator (below) measures the bytes
//!   the session keeps live between `feed` calls, which must stay under a fixed bound however
//!   long the line or the body.
//! - Bodies sent dot-stuffed come back byte for byte; the smuggling variants never end the data.
//! - The DATA scanner and the command parser agree with slow reference versions written here.
//!
//! Case counts are kept small (the whole module runs in a few seconds); raise them with
//! `PROPTEST_CASES=10000 cargo test --test tests prop::` for a longer run (HARDENING.md).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

use proptest::prelude::*;

use crate::fuzz_corpus::harness::{self as h, Transcript};
use ringmx::protocol::{Feed, Session, SessionConfig};

// ---------------------------------------------------------------------------------------------
// Memory accounting: a thin wrapper over the system allocator that counts, per thread, the bytes
// currently allocated by that thread. It changes nothing for the other tests in this binary
// (same allocator underneath); only `live_bytes()` reads the counter.

struct Counting;

thread_local! {
    // const-initialised and without Drop: touching it never allocates or registers a destructor,
    // so it is safe to use from inside the allocator.
    static LIVE: Cell<isize> = const { Cell::new(0) };
}

fn count(delta: isize) {
    let _ = LIVE.try_with(|c| c.set(c.get() + delta));
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
// `GlobalAlloc` contract is upheld by `System`; the counter is a plain thread-local integer.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        count(-(layout.size() as isize));
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            count(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

fn live_bytes() -> isize {
    LIVE.with(|c| c.get())
}

/// The most a session may keep between `feed` calls with the harness config: a body at the
/// 4 KiB limit (with Vec growth slack), a 512-byte line, and generous room for the state itself.
const SESSION_HELD_MAX: isize = 64 * 1024;

/// Drives a session through `chunks`, dropping replies and messages as they come, and returns
/// the largest number of bytes the session itself kept allocated after any `feed`.
fn session_held_max(cfg: Arc<SessionConfig>, chunks: &[&[u8]]) -> isize {
    const OUT_CAP: usize = 1 << 16;
    let mut out: Vec<u8> = Vec::with_capacity(OUT_CAP);
    let base = live_bytes();
    let mut held_max = 0;
    {
        let mut s = Session::new(cfg, h::peer());
        s.greet(&mut out);
        let mut n = 0;
        'chunks: for chunk in chunks {
            let mut rest: &[u8] = chunk;
            loop {
                out.clear();
                let fed = s.feed(rest, &mut out);
                // Growth of `out` is ours, not the session's.
                let held = live_bytes() - base - (out.capacity() as isize - OUT_CAP as isize);
                held_max = held_max.max(held);
                match fed {
                    Feed::NeedMore => break,
                    Feed::Commit { consumed } => {
                        drop(s.take_message());
                        s.committed(h::commit_result(n, 0), &mut out);
                        n += 1;
                        rest = &rest[consumed..];
                        if rest.is_empty() {
                            break;
                        }
                    }
                    Feed::Close { .. } => break 'chunks,
                }
            }
        }
    }
    held_max
}

fn whole_and_chunked(input: &[u8], cuts: &[usize], fail_every: usize) -> (Transcript, Transcript) {
    let cfg = h::session_config();
    let whole = h::drive(cfg.clone(), &[input], fail_every);
    let chunked = h::drive(cfg, &h::split_at(input, cuts), fail_every);
    (whole, chunked)
}

fn smtp_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..160).prop_map(|v| h::smtp_from_bytes(&v))
}

fn cuts() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(0usize..6000, 0..48)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    /// Raw bytes: no panic, well-formed replies, chunking changes nothing.
    #[test]
    fn raw_bytes_any_chunking_same_transcript(input in prop::collection::vec(any::<u8>(), 0..1500), cuts in cuts()) {
        let (whole, chunked) = whole_and_chunked(&input, &cuts, 0);
        h::assert_transcripts_eq(&whole, &chunked, "raw input");
        h::check_replies_well_formed(&whole.replies);
    }

    /// SMTP-shaped bytes (real commands, DATA, dots, bare CR and LF): no panic, well-formed
    /// replies, chunking changes nothing, including around commits that fail.
    #[test]
    fn smtp_bytes_any_chunking_same_transcript(input in smtp_bytes(), cuts in cuts(), fail_every in 0usize..4) {
        let (whole, chunked) = whole_and_chunked(&input, &cuts, fail_every);
        h::assert_transcripts_eq(&whole, &chunked, "smtp-shaped input");
        h::check_replies_well_formed(&whole.replies);
    }

    /// The session's own memory stays under a fixed bound for any input and chunking.
    #[test]
    fn session_memory_bounded(input in smtp_bytes(), cuts in cuts()) {
        let chunks = h::split_at(&input, &cuts);
        let held = session_held_max(h::session_config(), &chunks);
        prop_assert!(held <= SESSION_HELD_MAX, "session held {held} bytes");
    }

    /// A body sent dot-stuffed is stored exactly as it was before stuffing, and the reference
    /// DATA reader agrees, whatever the chunking.
    #[test]
    fn stuffed_body_round_trips(lines in prop::collection::vec(body_line(), 0..40), cuts in cuts()) {
        let mut body = Vec::new();
        for l in &lines {
            body.extend_from_slice(l.as_bytes());
            body.extend_from_slice(b"\r\n");
        }
        let stuffed = h::stuff(&body);
        let (ref_body, ref_len) = h::reference_data(&stuffed).expect("reference finds the end");
        prop_assert_eq!(&ref_body, &body);
        prop_assert_eq!(ref_len, stuffed.len());

        let input = transaction(&stuffed);
        let (whole, chunked) = whole_and_chunked(&input, &cuts, 0);
        h::assert_transcripts_eq(&whole, &chunked, "stuffed body");
        if body.len() as u64 <= h::MAX_MESSAGE_SIZE / 2 {
            prop_assert_eq!(whole.messages.len(), 1, "replies: {}", String::from_utf8_lossy(&whole.replies));
            prop_assert!(whole.messages[0].body == body, "stored body differs from the body sent");
            prop_assert_eq!(whole.messages[0].envelope.mail_from.as_str(), "a@example.org");
            prop_assert_eq!(&whole.messages[0].envelope.rcpt_to, &vec!["b@example.com".to_string()]);
        }
        prop_assert!(whole.closed, "QUIT did not close");
    }

    /// A session that does not keep bodies (the discard store's) answers exactly like one that
    /// does and reports each message's size as the unstuffed body's length, whatever the
    /// chunking, without holding the body.
    #[test]
    fn discarding_session_reports_the_size(lines in prop::collection::vec(body_line(), 0..40), cuts in cuts()) {
        let mut body = Vec::new();
        for l in &lines {
            body.extend_from_slice(l.as_bytes());
            body.extend_from_slice(b"\r\n");
        }
        let input = transaction(&h::stuff(&body));
        let kept = h::drive(h::session_config(), &[&input], 0);
        let discarding = h::drive_keeping(h::session_config(), &h::split_at(&input, &cuts), 0, false);
        h::assert_discarding_eq(&kept, &discarding, "discarding session");
        if body.len() as u64 <= h::MAX_MESSAGE_SIZE / 2 {
            prop_assert_eq!(discarding.messages.len(), 1);
            prop_assert_eq!(discarding.messages[0].size, body.len());
            prop_assert!(discarding.messages[0].body.is_empty());
        }
    }

    /// Smuggling (CVE-2023-51764 class): a bare-LF or bare-CR look-alike of the end-of-data
    /// line followed by a second transaction never yields a second message, whatever the
    /// chunking; if the one message is accepted, it holds the smuggled text.
    #[test]
    fn smuggling_never_splits_a_message(variant in 0usize..SMUGGLE.len(), cuts in cuts()) {
        let mut data = b"Subject: innocent\r\n\r\nhello\r\n".to_vec();
        data.extend_from_slice(SMUGGLE[variant]);
        data.extend_from_slice(b"MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<b@example.com>\r\nDATA\r\nsmuggled\r\n.\r\n");
        let input = transaction(&data);
        let (whole, chunked) = whole_and_chunked(&input, &cuts, 0);
        h::assert_transcripts_eq(&whole, &chunked, "smuggling");
        prop_assert!(whole.messages.len() <= 1, "variant {:?} split the data into {} messages", SMUGGLE[variant], whole.messages.len());
        for m in &whole.messages {
            prop_assert_eq!(m.envelope.mail_from.as_str(), "a@example.org");
            prop_assert!(contains(&m.body, b"smuggled"), "accepted message lost the smuggled text");
        }
    }
}

/// Bare CR/LF look-alikes of `<CRLF>.<CRLF>` (smtp-proto's and the CVE write-ups' vectors).
const SMUGGLE: &[&[u8]] = &[
    b"\n.\n",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r.\r",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\n.\r",
    b".\n",
    b"\r\n\x00.\r\n",
];

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn body_line() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just(".".to_string()),
        Just("..".to_string()),
        Just(". ".to_string()),
        "\\.[a-z .]{0,10}",
        "[a-zA-Z0-9 .:<>@]{0,60}",
    ]
}

/// EHLO, MAIL, RCPT, DATA, then `data` (already stuffed and terminated), then QUIT.
fn transaction(data: &[u8]) -> Vec<u8> {
    let mut v =
        b"EHLO client.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
            .to_vec();
    v.extend_from_slice(data);
    v.extend_from_slice(b"QUIT\r\n");
    v
}

/// Feeds `input` in `chunk`-byte pieces and asserts the session's memory stays bounded.
fn assert_bounded(what: &str, input: &[u8], chunk: usize) {
    let chunks: Vec<&[u8]> = input.chunks(chunk).collect();
    let held = session_held_max(h::session_config(), &chunks);
    assert!(
        held <= SESSION_HELD_MAX,
        "{what}: session held {held} bytes (bound {SESSION_HELD_MAX})"
    );
}

#[test]
fn long_line_without_crlf_is_not_buffered() {
    let mut input = b"EHLO client.example\r\nMAIL FROM:<".to_vec();
    input.extend(std::iter::repeat_n(b'a', 2 << 20));
    assert_bounded("2 MiB line", &input, 1024);
    assert_bounded("2 MiB line, one feed", &input, input.len());
}

#[test]
fn oversized_body_is_not_buffered() {
    let mut body = Vec::new();
    for i in 0..40_000 {
        body.extend_from_slice(format!("line {i} of a body far over the limit\r\n").as_bytes());
    }
    let input = transaction(&h::stuff(&body));
    assert_bounded("1.5 MiB body over a 4 KiB limit", &input, 1500);
    let t = h::drive(
        h::session_config(),
        &input.chunks(4096).collect::<Vec<_>>(),
        0,
    );
    assert!(
        t.messages.is_empty(),
        "a body over the limit was handed over"
    );
    let replies = String::from_utf8_lossy(&t.replies);
    assert!(
        replies.contains("\r\n552 "),
        "expected 552 after an oversized body, got:\n{replies}"
    );
}

#[test]
fn binary_garbage_is_not_buffered() {
    // Deterministic pseudo-random bytes rich in NUL, CR and LF.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let input: Vec<u8> = (0..1 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            match x % 16 {
                0 => 0,
                1 => b'\r',
                2 => b'\n',
                _ => (x >> 32) as u8,
            }
        })
        .collect();
    assert_bounded("1 MiB of binary garbage", &input, 777);
    let t = h::drive(h::session_config(), &[&input], 0);
    assert!(t.messages.is_empty());
    h::check_replies_well_formed(&t.replies);
}

#[test]
fn every_smuggling_variant_split_at_every_offset() {
    for v in SMUGGLE {
        let mut data = b"hello\r\n".to_vec();
        data.extend_from_slice(v);
        data.extend_from_slice(b"MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<b@example.com>\r\nDATA\r\nsmuggled\r\n.\r\n");
        let input = transaction(&data);
        let whole = h::drive(h::session_config(), &[&input], 0);
        assert!(
            whole.messages.len() <= 1,
            "{v:?}: {} messages",
            whole.messages.len()
        );
        for m in &whole.messages {
            assert_eq!(
                m.envelope.mail_from, "a@example.org",
                "{v:?}: smuggled sender accepted"
            );
        }
        for at in 0..=input.len() {
            let split = h::drive(h::session_config(), &[&input[..at], &input[at..]], 0);
            h::assert_transcripts_eq(&whole, &split, &format!("{v:?} split at {at}"));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The DATA scanner against the reference reader.

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    /// Arbitrary bytes: the scanner's end, body, length and flags match the reference, whole,
    /// chunked and byte by byte.
    #[test]
    fn data_scanner_matches_reference_raw(input in prop::collection::vec(any::<u8>(), 0..600), seed in any::<u8>()) {
        h::data_check(&input, seed);
    }

    /// SMTP-shaped bytes (dots, CRLF, bare CR/LF, end markers): same checks.
    #[test]
    fn data_scanner_matches_reference_smtp(input in smtp_bytes(), seed in any::<u8>()) {
        h::data_check(&input, seed);
    }

    /// Stuffed bodies of clean lines, split anywhere: the reference and the scanner both give
    /// back the original body and stop right after the end marker, not before.
    #[test]
    fn data_scanner_unstuffs_any_split(lines in prop::collection::vec(body_line(), 0..30), cuts in cuts(), tail in prop::collection::vec(any::<u8>(), 0..20)) {
        let mut body = Vec::new();
        for l in &lines {
            body.extend_from_slice(l.as_bytes());
            body.extend_from_slice(b"\r\n");
        }
        let mut input = h::stuff(&body);
        let end = input.len();
        input.extend_from_slice(&tail); // pipelined bytes after the end belong to the next command
        let got = h::scan_chunks(&h::split_at(&input, &cuts), u64::MAX);
        prop_assert_eq!(got.end, Some(end));
        prop_assert!(!got.bare);
        prop_assert!(got.body == body, "unstuffed body differs");
    }
}

/// A long body for the DATA scanner: CRLF lines of 0 to 299 bytes (some dot-started), then a few
/// marks (bare CR, bare LF, a stuffed-dot line, an end marker, a bare LF before a dot) written
/// over it at arbitrary offsets, so that they land anywhere in the scanner's 64-pair vector
/// blocks and 8 KiB stretches; ends with the end marker and a pipelined command.
fn long_body() -> impl Strategy<Value = Vec<u8>> {
    let lines = prop::collection::vec((0usize..300, any::<bool>()), 1..90);
    let marks = prop::collection::vec((any::<prop::sample::Index>(), 0usize..5), 0..5);
    (lines, marks).prop_map(|(lines, marks)| {
        let mut v = Vec::new();
        for (len, dot) in lines {
            if dot {
                v.push(b'.');
            }
            v.extend((0..len).map(|k| b'a' + (k % 26) as u8));
            v.extend_from_slice(b"\r\n");
        }
        for (at, kind) in marks {
            let mark: &[u8] = [&b"\r"[..], b"\n", b"\r\n..x\r\n", b"\r\n.\r\n", b"\n.a"][kind];
            let at = at.index(v.len());
            let end = (at + mark.len()).min(v.len());
            v[at..end].copy_from_slice(&mark[..end - at]);
        }
        v.extend_from_slice(b"\r\n.\r\nNOOP\n");
        v
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    /// Long bodies with rare marks: the scanner's end, body, length and flags match the
    /// reference, whole, chunked and byte by byte.
    #[test]
    fn data_scanner_matches_reference_long(input in long_body(), seed in any::<u8>()) {
        h::data_check(&input, seed);
    }
}

// ---------------------------------------------------------------------------------------------
// The command parser against a reference for well-formed commands.

fn flip_case(s: &str, mask: u64) -> String {
    s.chars()
        .enumerate()
        .map(|(i, c)| {
            if mask >> (i % 64) & 1 == 1 {
                c.to_ascii_lowercase()
            } else {
                c.to_ascii_uppercase()
            }
        })
        .collect()
}

fn local_part() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9!#$%&'*+/=?^_`{|}~-]{1,10}(\\.[a-z0-9_-]{1,8}){0,2}"
}

fn domain() -> impl Strategy<Value = String> {
    "[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?(\\.[a-z]{2,6}){1,3}"
}

#[derive(Debug, Clone)]
struct MailCase {
    verb_mask: u64,
    spaces: usize,
    local: String,
    domain: String,
    size: Option<u64>,
    body8: Option<bool>,
    smtputf8: bool,
    order: u8,
}

fn mail_case() -> impl Strategy<Value = MailCase> {
    (
        any::<u64>(),
        0usize..3,
        local_part(),
        domain(),
        prop::option::of(0u64..100_000_000),
        prop::option::of(any::<bool>()),
        any::<bool>(),
        any::<u8>(),
    )
        .prop_map(
            |(verb_mask, spaces, local, domain, size, body8, smtputf8, order)| MailCase {
                verb_mask,
                spaces,
                local,
                domain,
                size,
                body8,
                smtputf8,
                order,
            },
        )
}

impl MailCase {
    /// The line a client would send, parameters in an order chosen by `order`.
    fn line(&self, verb: &str) -> String {
        let mut params: Vec<String> = Vec::new();
        if let Some(n) = self.size {
            params.push(format!("SIZE={n}"));
        }
        if let Some(b) = self.body8 {
            params.push(if b {
                "BODY=8BITMIME".into()
            } else {
                "BODY=7BIT".into()
            });
        }
        if self.smtputf8 {
            params.push("SMTPUTF8".into());
        }
        if !params.is_empty() {
            let k = self.order as usize % params.len();
            params.rotate_left(k);
        }
        let mut line = format!(
            "{}{}<{}@{}>",
            flip_case(verb, self.verb_mask),
            " ".repeat(self.spaces),
            self.local,
            self.domain
        );
        for p in params {
            line.push(' ');
            line.push_str(&p);
        }
        line
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    /// Well-formed MAIL FROM lines parse to exactly the path and parameters that were sent.
    #[test]
    fn parser_mail_matches_reference(c in mail_case()) {
        use ringmx::protocol::parse::{parse_command, Body, Command};
        let line = c.line("MAIL FROM:");
        let addr = format!("{}@{}", c.local, c.domain);
        match parse_command(line.as_bytes()) {
            Ok(Command::Mail { from, params }) => {
                prop_assert_eq!(from.mailbox, addr.as_bytes());
                prop_assert_eq!(from.domain, c.domain.as_bytes());
                prop_assert_eq!(params.size, c.size);
                prop_assert_eq!(params.body, c.body8.map(|b| if b { Body::EightBitMime } else { Body::SevenBit }));
                prop_assert_eq!(params.smtputf8, c.smtputf8);
            }
            other => prop_assert!(false, "{line:?} parsed as {other:?}"),
        }
        h::parse_target(line.as_bytes());
    }

    /// Well-formed RCPT TO lines parse to the path sent; a parameter is refused (555: no DSN).
    #[test]
    fn parser_rcpt_matches_reference(c in mail_case()) {
        use ringmx::protocol::parse::{parse_command, Command, ParseError, Verb};
        let line = format!("{}{}<{}@{}>", flip_case("RCPT TO:", c.verb_mask), " ".repeat(c.spaces), c.local, c.domain);
        let addr = format!("{}@{}", c.local, c.domain);
        match parse_command(line.as_bytes()) {
            Ok(Command::Rcpt { to }) => {
                prop_assert_eq!(to.mailbox, addr.as_bytes());
                prop_assert_eq!(to.domain, c.domain.as_bytes());
            }
            other => prop_assert!(false, "{line:?} parsed as {other:?}"),
        }
        let with_param = format!("{line} NOTIFY=NEVER");
        prop_assert_eq!(parse_command(with_param.as_bytes()), Err(ParseError::UnknownParam(Verb::Rcpt)));
    }

    /// Broken MAIL lines are syntax errors (501) or unknown parameters (555), never accepted.
    #[test]
    fn parser_mail_rejects_broken_paths(c in mail_case(), breakage in 0usize..6) {
        use ringmx::protocol::parse::{parse_command, ParseError, Verb};
        let good = format!("MAIL FROM:<{}@{}>", c.local, c.domain);
        let (bad, want) = match breakage {
            0 => (format!("MAIL FROM:{}@{}", c.local, c.domain), ParseError::Syntax(Verb::Mail)),
            1 => (format!("MAIL FROM:<{}@{}", c.local, c.domain), ParseError::Syntax(Verb::Mail)),
            2 => (format!("MAIL TO:<{}@{}>", c.local, c.domain), ParseError::Syntax(Verb::Mail)),
            3 => (format!("MAIL FROM:<.{}@{}>", c.local, c.domain), ParseError::Syntax(Verb::Mail)),
            4 => (format!("{good} X-UNKNOWN=1"), ParseError::UnknownParam(Verb::Mail)),
            _ => (format!("MAIL FROM:<{}>", c.local), ParseError::Syntax(Verb::Mail)),
        };
        prop_assert_eq!(parse_command(bad.as_bytes()), Err(want), "{}", bad);
    }

    /// Any line: no panic, fields borrow the line, the verb matches the reference, trailing blanks
    /// and the verb's case change nothing.
    #[test]
    fn parser_any_line_agrees_with_reference_verb(line in prop::collection::vec(any::<u8>(), 0..80)) {
        h::parse_target(&line);
    }

    #[test]
    fn parser_smtp_line_agrees_with_reference_verb(input in smtp_bytes()) {
        for line in input.split(|&b| b == b'\n') {
            h::parse_target(line.strip_suffix(b"\r").unwrap_or(line));
        }
    }
}

/// A version 1 PROXY header for a random TCP4 or TCP6 client, and that client.
fn proxy_v1_case() -> impl Strategy<Value = (String, std::net::SocketAddr)> {
    (any::<bool>(), any::<[u8; 16]>(), any::<u16>()).prop_map(|(six, bytes, port)| {
        let ip: std::net::IpAddr = if six {
            std::net::Ipv6Addr::from(bytes).into()
        } else {
            std::net::Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).into()
        };
        let (proto, dst) = if six {
            ("TCP6", "2001:db8::25")
        } else {
            ("TCP4", "10.0.0.25")
        };
        (
            format!("PROXY {proto} {ip} {dst} {port} 25\r\n"),
            std::net::SocketAddr::new(ip, port),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    /// Whatever a connection sends first, the PROXY header parser answers without panicking,
    /// never claims more bytes than it was given, and never waits past its limit.
    #[test]
    fn proxy_header_any_bytes(input in prop::collection::vec(any::<u8>(), 0..1200), sig in any::<bool>()) {
        use ringmx::protocol::proxy::{parse, Header, HEADER_BYTES_MAX};
        // Half the cases start like a version 2 header, so the binary parser gets exercised.
        let input = if sig { [&b"\r\n\r\n\0\r\nQUIT\n"[..], &input].concat() } else { input };
        match parse(&input) {
            Header::Done { len, .. } => prop_assert!(len <= input.len()),
            Header::Incomplete => prop_assert!(input.len() < HEADER_BYTES_MAX),
            Header::Invalid(why) => prop_assert!(!why.is_empty()),
        }
    }

    /// A version 1 header followed by anything names its client and ends where it ends; every
    /// cut of it waits for more.
    #[test]
    fn proxy_header_v1_round_trip((header, client) in proxy_v1_case(), rest in prop::collection::vec(any::<u8>(), 0..64)) {
        use ringmx::protocol::proxy::{parse, Header, Origin};
        let input = [header.as_bytes(), &rest].concat();
        prop_assert_eq!(parse(&input), Header::Done { origin: Origin::Client(client), len: header.len() });
        for cut in 0..header.len() {
            prop_assert_eq!(parse(&input[..cut]), Header::Incomplete, "cut at {}", cut);
        }
    }
}

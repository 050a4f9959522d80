//! Drivers shared by the fuzz targets and by `cargo test`.
//!
//! The fuzz targets (`fuzz/fuzz_targets/*.rs`) call these functions, and the stable test suite
//! includes this very file (`tests/fuzz_corpus/mod.rs` via `#[path]`) to replay the committed corpus
//! and to drive the property tests, so a corpus file always runs through exactly the code the
//! fuzzer ran. It depends on nothing but `ringmx` and `std`, and every check is an `assert!`:
//! a failed check is a crash to the fuzzer and a failed test to `cargo test`.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use ringmx::protocol::data::DataScanner;
use ringmx::protocol::parse::{parse_command, Command, ParseError, Verb};
use ringmx::protocol::{CommitResult, Feed, Message, Phase, Session, SessionConfig};

/// The host name every harness session uses.
pub const HOSTNAME: &str = "mx.fuzz.example";

/// A small message limit so that "over the limit" is reachable by short inputs.
pub const MAX_MESSAGE_SIZE: u64 = 4096;

/// The policy every harness session runs with: small limits, one accepted domain.
pub fn session_config() -> Arc<SessionConfig> {
    Arc::new(SessionConfig {
        hostname: HOSTNAME.into(),
        max_message_size: MAX_MESSAGE_SIZE,
        max_recipients: 3,
        max_errors: 10,
        accept_domains: Some(vec!["example.com".into()]),
    })
}

pub fn peer() -> SocketAddr {
    "192.0.2.7:40000".parse().unwrap()
}

/// Everything a session said and handed over, for comparing runs.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Transcript {
    /// Every reply byte, greeting first, in order.
    pub replies: Vec<u8>,
    /// Messages handed over by `Feed::Commit`, in order.
    pub messages: Vec<Message>,
    /// The session asked to close the connection.
    pub closed: bool,
}

/// How the harness store answers the n-th commit (0-based): every `fail_every`-th one gets
/// `NoSpace` and the one after it `Failed`, the rest are stored, so the error replies are
/// reached too. `fail_every == 0`: always stored.
pub fn commit_result(n: usize, fail_every: usize) -> CommitResult {
    if fail_every > 0 && n % fail_every == fail_every - 1 {
        CommitResult::NoSpace
    } else if fail_every > 0 && n.is_multiple_of(fail_every) && n > 0 {
        CommitResult::Failed
    } else {
        CommitResult::Stored {
            queue_id: format!("Q{n:05}"),
        }
    }
}

/// Drives one session through `chunks` exactly as the worker does (see the contract in
/// `protocol/session.rs`), checking the contract on the way.
pub fn drive(cfg: Arc<SessionConfig>, chunks: &[&[u8]], fail_every: usize) -> Transcript {
    drive_keeping(cfg, chunks, fail_every, true)
}

/// `drive` with `Session::set_keep_body(keep_body)`: with `false`, as the worker runs sessions
/// for the discard store (bodies counted, never copied).
pub fn drive_keeping(
    cfg: Arc<SessionConfig>,
    chunks: &[&[u8]],
    fail_every: usize,
    keep_body: bool,
) -> Transcript {
    let mut s = Session::new(cfg, peer());
    s.set_keep_body(keep_body);
    let mut t = Transcript::default();
    s.greet(&mut t.replies);
    assert_eq!(s.phase(), Phase::Connected, "phase after greeting");
    'chunks: for chunk in chunks {
        let mut rest: &[u8] = chunk;
        loop {
            match s.feed(rest, &mut t.replies) {
                Feed::NeedMore => {
                    assert_ne!(s.phase(), Phase::Committing, "NeedMore while committing");
                    assert_ne!(s.phase(), Phase::Closed, "NeedMore from a closed session");
                    break;
                }
                Feed::Commit { consumed } => {
                    assert!(
                        consumed <= rest.len(),
                        "Commit consumed {consumed} of {}",
                        rest.len()
                    );
                    assert_eq!(s.phase(), Phase::Committing, "phase at Commit");
                    let m = s.take_message().expect("Feed::Commit without a message");
                    assert!(
                        s.take_message().is_none(),
                        "one Commit handed over two messages"
                    );
                    if keep_body {
                        assert_eq!(m.size, m.body.len(), "size of a kept body");
                    } else {
                        assert!(m.body.is_empty(), "a body was kept by a discard session");
                    }
                    assert!(
                        m.size as u64 <= MAX_MESSAGE_SIZE,
                        "a {} byte body passed the {MAX_MESSAGE_SIZE} byte limit",
                        m.size
                    );
                    assert!(
                        !m.envelope.rcpt_to.is_empty(),
                        "a message with no recipient"
                    );
                    let n = t.messages.len();
                    t.messages.push(m);
                    s.committed(commit_result(n, fail_every), &mut t.replies);
                    assert_ne!(
                        s.phase(),
                        Phase::Committing,
                        "still committing after committed()"
                    );
                    rest = &rest[consumed..];
                    if s.phase() == Phase::Closed {
                        t.closed = true;
                        break 'chunks;
                    }
                    if rest.is_empty() {
                        break;
                    }
                }
                Feed::Close { consumed } => {
                    assert!(
                        consumed <= rest.len(),
                        "Close consumed {consumed} of {}",
                        rest.len()
                    );
                    assert_eq!(s.phase(), Phase::Closed, "phase at Close");
                    t.closed = true;
                    break 'chunks;
                }
            }
        }
    }
    t
}

/// Splits `input` at the given offsets (sorted, deduplicated, clamped to the input).
pub fn split_at<'a>(input: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut cuts: Vec<usize> = cuts.iter().map(|&c| c.min(input.len())).collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut out = Vec::with_capacity(cuts.len() + 1);
    let mut at = 0;
    for c in cuts {
        out.push(&input[at..c]);
        at = c;
    }
    out.push(&input[at..]);
    out
}

/// Chunk sizes from a seed: a small xorshift, so the fuzzer controls the chunking with one byte.
pub fn chunk_by_seed(input: &[u8], seed: u8) -> Vec<&[u8]> {
    let mut x = (seed as u32).wrapping_mul(2_654_435_761) | 1;
    let mut out = Vec::new();
    let mut at = 0;
    while at < input.len() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        // Mostly tiny chunks (splitting every token), sometimes large ones.
        let len = if x.is_multiple_of(8) {
            1 + (x >> 8) as usize % 4096
        } else {
            1 + (x >> 8) as usize % 7
        };
        let end = (at + len).min(input.len());
        out.push(&input[at..end]);
        at = end;
    }
    out
}

/// Pieces of SMTP: whole commands, the DATA terminators and their smuggling look-alikes, and
/// single awkward bytes. Fuzz bytes index this table so the fuzzer gets past the first word.
pub const TOKENS: &[&[u8]] = &[
    b"EHLO client.example\r\n",
    b"HELO client.example\r\n",
    b"EHLO\r\n",
    b"MAIL FROM:<a@example.org>\r\n",
    b"MAIL FROM:<>\r\n",
    b"MAIL FROM:<a@example.org> SIZE=100 BODY=8BITMIME SMTPUTF8\r\n",
    b"MAIL FROM:<a@example.org> SIZE=999999999\r\n",
    b"MAIL FROM:<a@example.org> FOO=BAR\r\n",
    b"MAIL FROM:a@example.org\r\n",
    b"RCPT TO:<b@example.com>\r\n",
    b"RCPT TO:<postmaster>\r\n",
    b"RCPT TO:<c@other.example>\r\n",
    b"RCPT TO:<\xc3\xa9@example.com>\r\n",
    b"rcpt to:<B@EXAMPLE.COM>\r\n",
    b"DATA\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"VRFY b\r\n",
    b"HELP\r\n",
    b"QUIT\r\n",
    b"BDAT 10 LAST\r\n",
    b"STARTTLS\r\n",
    b"\r\n.\r\n",
    b".\r\n",
    b"..\r\n",
    b".",
    b"\r\n",
    b"\r",
    b"\n",
    b"\n.\n",
    b"\r.\r",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r\n.\r",
    b".\n",
    b"Subject: hi\r\n",
    b"body text ",
    b"\0",
    b"\xff",
    b" ",
    b":",
    b"<",
    b">",
    b"@",
    b"x",
    b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
];

/// Maps fuzz bytes onto the SMTP alphabet: each byte picks a token (or, above 0xE0, is kept as
/// a raw byte), so most inputs are sequences of plausible commands and data.
pub fn smtp_from_bytes(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() * 8);
    for &b in data {
        if b >= 0xE0 {
            out.push(b.wrapping_sub(0xE0).wrapping_mul(8));
        } else {
            out.extend_from_slice(TOKENS[b as usize % TOKENS.len()]);
        }
    }
    out
}

/// The session fuzz target: one run whole, one run chunked as the seed says, one run a byte at
/// a time; all three must agree.
pub fn session_target(data: &[u8]) {
    let Some((&seed, rest)) = data.split_first() else {
        return;
    };
    let input = smtp_from_bytes(rest);
    session_check(&input, seed);
}

/// Like `session_target` but over raw bytes (no alphabet mapping).
pub fn session_raw_target(data: &[u8]) {
    let Some((&seed, rest)) = data.split_first() else {
        return;
    };
    session_check(rest, seed);
}

pub fn session_check(input: &[u8], seed: u8) {
    let cfg = session_config();
    let fail_every = (seed % 4) as usize;
    let whole = drive(cfg.clone(), &[input], fail_every);
    let chunked = drive(cfg.clone(), &chunk_by_seed(input, seed), fail_every);
    assert_transcripts_eq(&whole, &chunked, "whole vs seeded chunks");
    let bytes: Vec<&[u8]> = input.chunks(1).collect();
    let bytewise = drive(cfg.clone(), &bytes, fail_every);
    assert_transcripts_eq(&whole, &bytewise, "whole vs one byte at a time");
    let discarding = drive_keeping(cfg, &chunk_by_seed(input, seed), fail_every, false);
    assert_discarding_eq(&whole, &discarding, "whole vs discarding seeded chunks");
    check_replies_well_formed(&whole.replies);
}

/// A session that does not keep bodies (`discarding`) says and hands over the same as one that
/// does (`kept`), except that its bodies are empty; their sizes are the kept bodies' lengths.
pub fn assert_discarding_eq(kept: &Transcript, discarding: &Transcript, what: &str) {
    let mut unkept = kept.clone();
    for m in &mut unkept.messages {
        m.body = Vec::new();
    }
    assert_transcripts_eq(&unkept, discarding, what);
}

pub fn assert_transcripts_eq(a: &Transcript, b: &Transcript, what: &str) {
    if a.replies != b.replies {
        panic!(
            "{what}: replies differ\n--- a\n{}\n--- b\n{}",
            String::from_utf8_lossy(&a.replies),
            String::from_utf8_lossy(&b.replies)
        );
    }
    assert_eq!(
        a.messages.len(),
        b.messages.len(),
        "{what}: message count differs"
    );
    for (i, (x, y)) in a.messages.iter().zip(&b.messages).enumerate() {
        assert_eq!(
            x.envelope, y.envelope,
            "{what}: envelope of message {i} differs"
        );
        assert!(x.body == y.body, "{what}: body of message {i} differs");
        assert_eq!(x.size, y.size, "{what}: size of message {i} differs");
    }
    assert_eq!(a.closed, b.closed, "{what}: one closed, the other did not");
}

/// Every reply line is `DDD<SP or ->text<CRLF>` with a first digit 2-5, and a multi-line reply
/// keeps its code.
pub fn check_replies_well_formed(replies: &[u8]) {
    assert!(
        replies.is_empty() || replies.ends_with(b"\r\n"),
        "replies do not end in CRLF"
    );
    let mut cont: Option<&[u8]> = None;
    for line in replies.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        assert!(
            line.ends_with(b"\r"),
            "reply line without CR: {:?}",
            String::from_utf8_lossy(line)
        );
        let line = &line[..line.len() - 1];
        assert!(!line.contains(&b'\r'), "bare CR inside a reply line");
        assert!(
            line.len() >= 3,
            "short reply line {:?}",
            String::from_utf8_lossy(line)
        );
        let code = &line[..3];
        assert!(
            (b'2'..=b'5').contains(&code[0])
                && code[1].is_ascii_digit()
                && code[2].is_ascii_digit(),
            "bad reply code in {:?}",
            String::from_utf8_lossy(line)
        );
        if let Some(c) = cont {
            assert_eq!(c, code, "multi-line reply changed its code");
        }
        let sep = line.get(3).copied();
        assert!(
            matches!(sep, None | Some(b' ') | Some(b'-')),
            "bad separator after the code"
        );
        cont = if sep == Some(b'-') { Some(code) } else { None };
    }
    assert!(cont.is_none(), "multi-line reply never finished");
}

/// The reference DATA reader: the slow, obviously right version of RFC 5321 4.1.1.4 and 4.5.2.
/// `raw` starts right after the 354. Returns the unstuffed body and the length of `raw` up to
/// and including the end-of-data line, or `None` when no `<CRLF>.<CRLF>` has arrived yet.
/// The start of `raw` counts as a line start (the DATA command's CRLF precedes it). Only lines
/// ended by CRLF are lines: a bare CR or LF is an ordinary byte here, so `\n.\n` or `\r.\r`
/// never end the data and a dot after a bare LF is not unstuffed.
pub fn reference_data(raw: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        // One CRLF-terminated line from `at`.
        let rel = raw[at..].windows(2).position(|w| w == b"\r\n")?;
        let line = &raw[at..at + rel];
        let next = at + rel + 2;
        if line == b"." {
            return Some((body, next));
        }
        let line = if line.first() == Some(&b'.') {
            &line[1..]
        } else {
            line
        };
        body.extend_from_slice(line);
        body.extend_from_slice(b"\r\n");
        at = next;
    }
}

/// Dot-stuffs a body for sending (RFC 5321 4.5.2) and appends the end-of-data line. `body` must
/// consist of CRLF-terminated lines.
pub fn stuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 8);
    let mut line_start = true;
    for &b in body {
        if line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        line_start = b == b'\n' && out.len() >= 2 && out[out.len() - 2] == b'\r';
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// True when `raw` (the data up to and including its end-of-data line) holds a CR not followed
/// by LF or an LF not preceded by CR: the slow version of the scanner's bare CR/LF flag.
pub fn reference_bare(raw: &[u8]) -> bool {
    (0..raw.len()).any(|i| {
        (raw[i] == b'\r' && raw.get(i + 1) != Some(&b'\n'))
            || (raw[i] == b'\n' && (i == 0 || raw[i - 1] != b'\r'))
    })
}

/// What the DATA scanner decided about one input: where the data ended (offset into the whole
/// input, just past the end-of-data line), the body it kept, and its flags.
#[derive(Debug, PartialEq, Eq)]
pub struct Scanned {
    pub end: Option<usize>,
    pub body: Vec<u8>,
    pub bare: bool,
    pub too_big: bool,
    pub len: u64,
}

/// Runs the real scanner over `chunks` as the session does (stops at the end marker).
pub fn scan_chunks(chunks: &[&[u8]], max: u64) -> Scanned {
    let mut sc = DataScanner::new(max);
    let mut body = Vec::new();
    let mut offset = 0;
    let mut end = None;
    for c in chunks {
        let mut handed_out = 0u64;
        let r = sc.scan(c, |segment| {
            assert!(!segment.is_empty(), "an empty segment was handed out");
            handed_out += segment.len() as u64;
            body.extend_from_slice(segment);
        });
        if sc.rejecting() {
            // What the session does: a rejected body is never stored, so it is dropped.
            body = Vec::new();
        } else {
            assert_eq!(sc.len(), body.len() as u64, "segments add up to len");
        }
        assert!(
            handed_out <= c.len() as u64 + 1,
            "segments of {handed_out} bytes from a {}-byte input",
            c.len()
        );
        if let Some(consumed) = r {
            assert!(
                consumed <= c.len(),
                "scan consumed {consumed} of {}",
                c.len()
            );
            assert!(sc.is_done(), "scan returned Some but is not done");
            end = Some(offset + consumed);
            break;
        }
        assert!(!sc.is_done(), "scan returned None but is done");
        offset += c.len();
    }
    if sc.rejecting() {
        assert!(
            body.is_empty(),
            "a rejected body is still held ({} bytes)",
            body.len()
        );
    }
    Scanned {
        end,
        body,
        bare: sc.bare_cr_lf(),
        too_big: sc.too_big(),
        len: sc.len(),
    }
}

/// The DATA scanner fuzz target: whole, chunked (seeded) and bytewise scans agree with each other
/// and with `reference_data`/`reference_bare`.
pub fn data_target(data: &[u8]) {
    let Some((&seed, rest)) = data.split_first() else {
        return;
    };
    let input = if seed & 1 == 1 {
        smtp_from_bytes(rest)
    } else {
        rest.to_vec()
    };
    data_check(&input, seed);
}

pub fn data_check(input: &[u8], seed: u8) {
    let max = 1 + (seed as u64 >> 1) * 64; // 1 .. 8129 bytes: the limit is reached often
    let whole = scan_chunks(&[input], max);
    let chunked = scan_chunks(&chunk_by_seed(input, seed), max);
    assert_eq!(whole, chunked, "DATA scanner: whole vs chunked");
    let bytes: Vec<&[u8]> = input.chunks(1).collect();
    assert_eq!(
        whole,
        scan_chunks(&bytes, max),
        "DATA scanner: whole vs bytewise"
    );
    match reference_data(input) {
        None => assert_eq!(
            whole.end, None,
            "scanner found an end the reference does not"
        ),
        Some((ref_body, ref_end)) => {
            assert_eq!(
                whole.end,
                Some(ref_end),
                "scanner and reference disagree on the end of data"
            );
            let bare = reference_bare(&input[..ref_end]);
            assert_eq!(whole.bare, bare, "bare CR/LF flag");
            assert_eq!(whole.len, ref_body.len() as u64, "unstuffed length");
            assert_eq!(whole.too_big, ref_body.len() as u64 > max, "too_big flag");
            if !bare && ref_body.len() as u64 <= max {
                assert!(
                    whole.body == ref_body,
                    "scanner body differs from the reference body"
                );
            }
        }
    }
}

/// The verb a line starts with, the slow way: trailing blanks dropped, then the text before the
/// first space, compared with each verb name ignoring ASCII case.
pub fn reference_verb(line: &[u8]) -> Option<Verb> {
    let mut line = line;
    while let [rest @ .., b' ' | b'\t'] = line {
        line = rest;
    }
    let tok = line.split(|&b| b == b' ').next().unwrap_or(b"");
    let tok = std::str::from_utf8(tok).ok()?;
    let names = [
        ("HELO", Verb::Helo),
        ("EHLO", Verb::Ehlo),
        ("MAIL", Verb::Mail),
        ("RCPT", Verb::Rcpt),
        ("DATA", Verb::Data),
        ("RSET", Verb::Rset),
        ("NOOP", Verb::Noop),
        ("QUIT", Verb::Quit),
        ("VRFY", Verb::Vrfy),
        ("EXPN", Verb::Expn),
        ("HELP", Verb::Help),
    ];
    names
        .iter()
        .find(|(n, _)| tok.eq_ignore_ascii_case(n))
        .map(|&(_, v)| v)
}

fn within(outer: &[u8], inner: &[u8]) -> bool {
    let (o, i) = (outer.as_ptr() as usize, inner.as_ptr() as usize);
    inner.is_empty() || (i >= o && i + inner.len() <= o + outer.len())
}

/// Every slice a command hands out borrows the line (the parser never copies).
pub fn assert_borrows(line: &[u8], cmd: &Command<'_>) {
    let slices: Vec<&[u8]> = match *cmd {
        Command::Helo(a) | Command::Ehlo(a) | Command::Vrfy(a) | Command::Expn(a) => vec![a],
        Command::Mail { from, .. } => vec![from.mailbox, from.domain],
        Command::Rcpt { to } => vec![to.mailbox, to.domain],
        _ => vec![],
    };
    for s in slices {
        assert!(
            within(line, s),
            "a command field is not a slice of the line"
        );
    }
}

/// The parser fuzz target: never panics, borrows, agrees with the reference on the verb,
/// ignores trailing blanks and the verb's case.
pub fn parse_target(line: &[u8]) {
    let got = parse_command(line);
    let want = reference_verb(line);
    match &got {
        Ok(cmd) => {
            assert_eq!(
                Some(cmd.verb()),
                want,
                "parsed verb differs from the reference"
            );
            assert_borrows(line, cmd);
            match *cmd {
                Command::Mail { from, .. } => assert_path(from.mailbox, from.domain),
                Command::Rcpt { to } => assert_path(to.mailbox, to.domain),
                _ => {}
            }
        }
        Err(ParseError::Unknown) => assert_eq!(want, None, "a known verb was called unknown"),
        Err(e) => assert_eq!(e.verb(), want, "error names the wrong verb"),
    }
    // Trailing spaces and tabs never change the outcome.
    let mut padded = line.to_vec();
    padded.extend_from_slice(b" \t ");
    assert_eq!(
        shape(&parse_command(&padded)),
        shape(&got),
        "trailing blanks changed the parse"
    );
    // Nor does the case of the verb.
    if let Some(sp) = line.iter().position(|&b| b == b' ').or(Some(line.len())) {
        let mut flipped = line.to_vec();
        for b in &mut flipped[..sp] {
            if b.is_ascii_alphabetic() {
                *b ^= 0x20;
            }
        }
        assert_eq!(
            shape(&parse_command(&flipped)),
            shape(&got),
            "the verb's case changed the parse"
        );
    }
}

/// A parse outcome with the slices turned into owned bytes, for comparing parses of different lines.
pub fn shape(r: &Result<Command<'_>, ParseError>) -> String {
    format!("{r:?}")
}

/// A parsed path's domain is the tail of its mailbox after an `@` (or empty).
fn assert_path(mailbox: &[u8], domain: &[u8]) {
    if !domain.is_empty() {
        assert!(
            mailbox.ends_with(domain),
            "domain is not the mailbox's tail"
        );
        assert_eq!(
            mailbox[mailbox.len() - domain.len() - 1],
            b'@',
            "domain does not follow an @"
        );
    }
    assert!(
        std::str::from_utf8(mailbox).is_ok(),
        "a mailbox that is not UTF-8"
    );
}

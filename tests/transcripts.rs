//! Transcript fixtures (`tests/fixtures/*.smtp`) run through the pure session, no sockets.
//!
//! Format, one directive per line:
//!
//! ```text
//! # comment                       ignored, as are blank lines
//! ! max_errors 3                  config before the first C:/S: line: hostname, max_errors,
//! ! max_recipients 2              max_recipients, max_message_size, accept_domain (repeatable)
//! C: EHLO client.example          the client sends this text plus CRLF
//! C< text                         the client sends this text with no CRLF added
//! S: 250                          the next reply must start with this (code, or more text)
//! S: CLOSE                        the server has closed the session after the replies so far
//! M: Subject: x\r\n\r\nbody\r\n   the next stored message has exactly this body
//! E: from=a@b to=x@y,z@y          ... and this envelope (from may be empty: `from=`)
//! > shutdown | > force | > timeout   call on_shutdown(false) / on_shutdown(true) / on_idle_timeout
//! > commit nospace | > commit failed  the store answers the next message with this (default Stored)
//! ```
//!
//! In `C:`/`C<`/`M:` text, `\r`, `\n`, `\t`, `\\` and `\xHH` are escapes, so bare CR and LF can be
//! written. All `C` lines between two other directives are sent in one write (a pipelined group).
//! Each fixture is run with every write whole, with each write split at every offset, and byte by
//! byte; the replies and the stored messages must be identical in all runs.
use std::path::Path;
use std::sync::Arc;

use ringmx::protocol::{CommitResult, Feed, Message, Session, SessionConfig};

#[derive(Debug, Clone)]
enum Step {
    Send(Vec<u8>),
    Shutdown { force: bool },
    Timeout,
    StoreAnswer(CommitResult),
}

#[derive(Debug, Clone, PartialEq)]
enum Expect {
    Reply(String),
    Close,
}

struct Fixture {
    cfg: SessionConfig,
    steps: Vec<Step>,
    expect: Vec<Expect>,
    bodies: Vec<Vec<u8>>,
    envelopes: Vec<(String, Vec<String>)>,
}

#[derive(Debug, PartialEq)]
struct Outcome {
    replies: Vec<String>,
    closed_after: Option<usize>,
    msgs: Vec<Message>,
}

fn unescape(s: &str) -> Result<Vec<u8>, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            out.push(b[i]);
            i += 1;
            continue;
        }
        match b.get(i + 1) {
            Some(b'r') => out.push(b'\r'),
            Some(b'n') => out.push(b'\n'),
            Some(b't') => out.push(b'\t'),
            Some(b'\\') => out.push(b'\\'),
            Some(b'x') => {
                let hex = s.get(i + 2..i + 4).ok_or("short \\x escape")?;
                out.push(u8::from_str_radix(hex, 16).map_err(|e| format!("\\x{hex}: {e}"))?);
                i += 2;
            }
            other => return Err(format!("unknown escape \\{:?}", other.map(|c| *c as char))),
        }
        i += 2;
    }
    Ok(out)
}

fn parse_fixture(text: &str) -> Result<Fixture, String> {
    let mut f = Fixture {
        cfg: SessionConfig {
            hostname: "mx.test.example".into(),
            ..SessionConfig::default()
        },
        steps: Vec::new(),
        expect: Vec::new(),
        bodies: Vec::new(),
        envelopes: Vec::new(),
    };
    let mut pending: Vec<u8> = Vec::new();
    let mut started = false;
    for (n, raw) in text.lines().enumerate() {
        let n = n + 1;
        let line = raw.trim_end_matches('\r');
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let (tag, rest) = line.split_at(line.len().min(2));
        let rest = rest.strip_prefix(' ').unwrap_or(rest);
        let err = |e: String| format!("line {n}: {e}: {line:?}");
        if tag != "C:" && tag != "C<" && !pending.is_empty() {
            f.steps.push(Step::Send(std::mem::take(&mut pending)));
        }
        match tag {
            "! " | "!" => {
                if started {
                    return Err(err("config after the first step".into()));
                }
                let mut words = rest.split_whitespace();
                let (key, value) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
                let num = |v: &str| v.parse::<u64>().map_err(|e| err(e.to_string()));
                match key {
                    "hostname" => f.cfg.hostname = value.into(),
                    "max_errors" => f.cfg.max_errors = num(value)? as u32,
                    "max_recipients" => f.cfg.max_recipients = num(value)? as usize,
                    "max_message_size" => f.cfg.max_message_size = num(value)?,
                    "accept_domain" => f
                        .cfg
                        .accept_domains
                        .get_or_insert_with(Vec::new)
                        .push(value.to_ascii_lowercase()),
                    _ => return Err(err("unknown config key".into())),
                }
            }
            "C:" => {
                started = true;
                pending.extend(unescape(rest).map_err(err)?);
                pending.extend_from_slice(b"\r\n");
            }
            "C<" => {
                started = true;
                pending.extend(unescape(rest).map_err(err)?);
            }
            "S:" => {
                started = true;
                f.expect.push(if rest == "CLOSE" {
                    Expect::Close
                } else {
                    Expect::Reply(rest.to_string())
                });
            }
            "M:" => f.bodies.push(unescape(rest).map_err(err)?),
            "E:" => {
                let mut from = None;
                let mut to = Vec::new();
                for w in rest.split_whitespace() {
                    if let Some(v) = w.strip_prefix("from=") {
                        from = Some(v.to_string());
                    } else if let Some(v) = w.strip_prefix("to=") {
                        to = v.split(',').map(str::to_string).collect();
                    } else {
                        return Err(err("E: takes from= and to=".into()));
                    }
                }
                f.envelopes
                    .push((from.ok_or_else(|| err("E: without from=".into()))?, to));
            }
            "> " | ">" => {
                started = true;
                f.steps.push(match rest.trim() {
                    "shutdown" => Step::Shutdown { force: false },
                    "force" => Step::Shutdown { force: true },
                    "timeout" => Step::Timeout,
                    "commit nospace" => Step::StoreAnswer(CommitResult::NoSpace),
                    "commit failed" => Step::StoreAnswer(CommitResult::Failed),
                    _ => return Err(err("unknown action".into())),
                });
            }
            _ => return Err(err("unknown directive".into())),
        }
    }
    if !pending.is_empty() {
        f.steps.push(Step::Send(pending));
    }
    Ok(f)
}

/// Splits reply bytes into replies (multi-line replies joined with '\n').
fn split_replies(out: &[u8], into: &mut Vec<String>) {
    let text = String::from_utf8_lossy(out);
    let mut cur = String::new();
    for line in text.split_terminator("\r\n") {
        if !cur.is_empty() {
            cur.push('\n');
        }
        cur.push_str(line);
        if line.as_bytes().get(3) != Some(&b'-') {
            into.push(std::mem::take(&mut cur));
        }
    }
    assert!(cur.is_empty(), "unterminated reply {cur:?}");
}

/// Runs the steps; `split` says how to cut each Send (a list of cut offsets per step index).
fn execute(f: &Fixture, cuts: &dyn Fn(usize, usize) -> Vec<usize>) -> Outcome {
    let mut s = Session::new(
        Arc::new(f.cfg.clone()),
        "198.51.100.9:50000".parse().unwrap(),
    );
    let mut out = Vec::new();
    let mut replies = Vec::new();
    let mut msgs = Vec::new();
    let mut closed_after = None;
    let mut answer = None;
    s.greet(&mut out);
    'steps: for (k, step) in f.steps.iter().enumerate() {
        match step {
            Step::Shutdown { force } => {
                if s.on_shutdown(&mut out, *force) && closed_after.is_none() {
                    split_replies(&std::mem::take(&mut out), &mut replies);
                    closed_after = Some(replies.len());
                    break 'steps;
                }
            }
            Step::Timeout => {
                s.on_idle_timeout(&mut out);
                split_replies(&std::mem::take(&mut out), &mut replies);
                closed_after = Some(replies.len());
                break 'steps;
            }
            Step::StoreAnswer(r) => answer = Some(r.clone()),
            Step::Send(bytes) => {
                let mut pieces = Vec::new();
                let mut from = 0;
                for cut in cuts(k, bytes.len()).into_iter().chain([bytes.len()]) {
                    pieces.push(&bytes[from..cut]);
                    from = cut;
                }
                for piece in pieces {
                    let mut input = piece;
                    loop {
                        match s.feed(input, &mut out) {
                            Feed::NeedMore => break,
                            Feed::Commit { consumed } => {
                                let m = s.take_message().expect("Commit without a message");
                                msgs.push(m);
                                let result =
                                    answer.take().unwrap_or_else(|| CommitResult::Stored {
                                        queue_id: format!("Q{}", msgs.len()),
                                    });
                                s.committed(result, &mut out);
                                input = &input[consumed..];
                            }
                            Feed::Close { .. } => {
                                split_replies(&std::mem::take(&mut out), &mut replies);
                                closed_after = Some(replies.len());
                                break 'steps;
                            }
                        }
                    }
                }
            }
        }
    }
    split_replies(&out, &mut replies);
    Outcome {
        replies,
        closed_after,
        msgs,
    }
}

fn check_expectations(name: &str, f: &Fixture, o: &Outcome) {
    let mut got = o.replies.iter();
    let mut seen = 0;
    for (i, e) in f.expect.iter().enumerate() {
        match e {
            Expect::Reply(prefix) => {
                let r = got.next().unwrap_or_else(|| {
                    panic!(
                        "{name}: expectation {i} ({prefix:?}): no more replies; got {:#?}",
                        o.replies
                    )
                });
                seen += 1;
                assert!(
                    r.starts_with(prefix.as_str()),
                    "{name}: reply {seen}: expected {prefix:?}, got {r:?}; all: {:#?}",
                    o.replies
                );
            }
            Expect::Close => {
                assert_eq!(
                    o.closed_after,
                    Some(seen),
                    "{name}: expected close after {seen} replies; all: {:#?}",
                    o.replies
                );
            }
        }
    }
    assert_eq!(
        got.next(),
        None,
        "{name}: replies beyond the expectations; all: {:#?}",
        o.replies
    );
    if !f.expect.contains(&Expect::Close) {
        assert_eq!(
            o.closed_after, None,
            "{name}: session closed but no `S: CLOSE`"
        );
    }
    assert_eq!(
        o.msgs.len(),
        f.bodies.len(),
        "{name}: stored {} messages, fixture lists {}",
        o.msgs.len(),
        f.bodies.len()
    );
    for (i, (m, body)) in o.msgs.iter().zip(&f.bodies).enumerate() {
        assert_eq!(
            String::from_utf8_lossy(&m.body),
            String::from_utf8_lossy(body),
            "{name}: body of message {}",
            i + 1
        );
    }
    for (i, (m, (from, to))) in o.msgs.iter().zip(&f.envelopes).enumerate() {
        assert_eq!(
            &m.envelope.mail_from,
            from,
            "{name}: sender of message {}",
            i + 1
        );
        assert_eq!(
            &m.envelope.rcpt_to,
            to,
            "{name}: recipients of message {}",
            i + 1
        );
    }
}

fn run_fixture(path: &Path) {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let text = std::fs::read_to_string(path).unwrap();
    let f = parse_fixture(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(!f.expect.is_empty(), "{name}: no expectations");
    let whole = execute(&f, &|_, _| Vec::new());
    check_expectations(&name, &f, &whole);
    for (k, step) in f.steps.iter().enumerate() {
        if let Step::Send(bytes) = step {
            for cut in 0..=bytes.len() {
                let split = execute(&f, &|step, _| {
                    if step == k {
                        vec![cut]
                    } else {
                        Vec::new()
                    }
                });
                assert_eq!(split, whole, "{name}: write {k} split at {cut} differs");
            }
        }
    }
    let bytewise = execute(&f, &|_, len| (1..len).collect());
    assert_eq!(bytewise, whole, "{name}: byte-by-byte run differs");
}

#[test]
fn transcript_fixtures() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "smtp"))
        .collect();
    paths.sort();
    assert!(
        paths.len() >= 5,
        "expected the transcript fixtures in {}",
        dir.display()
    );
    for p in &paths {
        run_fixture(p);
    }
}

#[test]
fn transcript_runner_catches_a_wrong_expectation() {
    let f = parse_fixture("C: NOOP\nS: 220\nS: 500\n").unwrap();
    let o = execute(&f, &|_, _| Vec::new());
    let r = std::panic::catch_unwind(|| check_expectations("wrong", &f, &o));
    assert!(r.is_err(), "a 250 must not match `S: 500`");
}

#[test]
fn unescape_handles_bare_cr_lf_and_hex() {
    assert_eq!(unescape(r"a\r\nb\n\x00\\").unwrap(), b"a\r\nb\n\x00\\");
    assert!(unescape(r"\q").is_err());
}

//! End-to-end tests of `ringmx serve` (issue 2) against the real binary on loopback: real
//! transactions with lettre and raw sockets, the stored Maildir file byte for byte, every reply
//! code of the protocol, pipelining, the smuggling policy, limits, timeouts, shutdown and
//! start-up errors. The protocol rules themselves are tested in depth by the sans-I/O session
//! tests; these prove that the wiring (ring, worker, store, config) keeps those promises.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use lettre::address::Envelope;
use lettre::transport::smtp::extension::ClientId;
use lettre::{SmtpTransport, Transport};

use crate::common::{list_dir, parse_stored, queue_id, run_bin, Client, Server, Stored, HOSTNAME};

const HELO: &str = "client.example";

fn transport(addr: SocketAddr) -> SmtpTransport {
    SmtpTransport::builder_dangerous(addr.ip().to_string())
        .port(addr.port())
        .hello_name(ClientId::Domain(HELO.into()))
        .timeout(Some(Duration::from_secs(10)))
        .build()
}

/// Sends `raw` with lettre (which dot-stuffs it and appends CRLF.CRLF); returns the 250's text.
fn lettre_send(addr: SocketAddr, from: &str, to: &[&str], raw: &[u8]) -> String {
    let env = Envelope::new(
        Some(from.parse().unwrap()),
        to.iter().map(|t| t.parse().unwrap()).collect(),
    )
    .unwrap();
    let resp = transport(addr)
        .send_raw(&env, raw)
        .unwrap_or_else(|e| panic!("lettre send: {e}"));
    assert_eq!(resp.code().to_string(), "250", "{resp:?}");
    resp.message().collect::<Vec<_>>().join(" ")
}

/// The one file in new/ (asserting there is exactly one and tmp/ is empty).
fn only_file(server: &Server) -> Vec<u8> {
    let files = server.new_files();
    assert_eq!(files.len(), 1, "files in new/: {files:?}");
    assert_eq!(
        list_dir(&server.maildir().join("tmp")),
        Vec::<std::path::PathBuf>::new(),
        "tmp/ not empty"
    );
    std::fs::read(&files[0]).unwrap()
}

/// Checks the Received: header (RFC 5321 4.4) of a stored file, as `store::maildir` documents
/// it: `from <helo> (<ip literal>) by <host> with <ESMTP|SMTP|UTF8SMTP> id <queue id>`, then
/// `for <rcpt>` when there is exactly one recipient, then `; <RFC 5322 date>`.
fn check_received(st: &Stored, helo: &str, ip_literal: &str, protocol: &str, qid: &str) {
    let (head, date) = st
        .received
        .rsplit_once("; ")
        .unwrap_or_else(|| panic!("Received: has no '; date': {:?}", st.received));
    let mut want = format!("from {helo} ({ip_literal}) by {HOSTNAME} with {protocol} id {qid}");
    if let [one] = st.envelope_to.as_slice() {
        want.push_str(&format!(" for <{one}>"));
    }
    assert_eq!(head, want, "Received: (unfolded)");
    check_date(date);
}

/// An RFC 5322 date-time as Received: needs it: `Tue, 24 Nov 2026 10:32:35 +0000` (the day of
/// the week is optional in RFC 5322, so it is checked only when present).
fn check_date(date: &str) {
    let mut f: Vec<&str> = date.split_whitespace().collect();
    if f.first().is_some_and(|d| d.ends_with(',')) {
        let day = f.remove(0).trim_end_matches(',');
        assert!(
            ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"].contains(&day),
            "date {date:?}"
        );
    }
    assert_eq!(f.len(), 5, "date {date:?}");
    let mday: u32 = f[0].parse().unwrap_or_else(|_| panic!("date {date:?}"));
    assert!((1..=31).contains(&mday), "date {date:?}");
    let months = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    assert!(months.contains(&f[1]), "date {date:?}");
    let year: u32 = f[2].parse().unwrap_or_else(|_| panic!("date {date:?}"));
    assert!(year >= 2024, "date {date:?}");
    let hms: Vec<&str> = f[3].split(':').collect();
    assert!(
        hms.len() == 3
            && hms
                .iter()
                .all(|x| x.len() == 2 && x.bytes().all(|b| b.is_ascii_digit())),
        "date {date:?}"
    );
    assert!(
        f[4].len() == 5 && (f[4].starts_with('+') || f[4].starts_with('-')),
        "date {date:?}"
    );
    // And it is now (within ten minutes), whatever the zone.
    let month = months.iter().position(|m| *m == f[1]).unwrap() as i64 + 1;
    let (h, m, sec): (i64, i64, i64) = (
        hms[0].parse().unwrap(),
        hms[1].parse().unwrap(),
        hms[2].parse().unwrap(),
    );
    let zone: i64 =
        f[4][1..3].parse::<i64>().unwrap() * 3600 + f[4][3..5].parse::<i64>().unwrap() * 60;
    let zone = if f[4].starts_with('-') { -zone } else { zone };
    let epoch =
        days_from_civil(year as i64, month, mday as i64) * 86_400 + h * 3600 + m * 60 + sec - zone;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (epoch - now).abs() < 600,
        "date {date:?} is {} s away from now",
        epoch - now
    );
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's days_from_civil).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Every reply after EHLO carries an enhanced status code (RFC 2034): `ddd x.y.z ...`.
fn assert_enhanced(reply: &str) {
    for line in reply.lines() {
        let code = line
            .get(4..)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or("");
        let parts: Vec<&str> = code.split('.').collect();
        let ok = parts.len() == 3
            && parts[0] == &line[..1]
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
        assert!(ok, "reply without an enhanced status code: {reply:?}");
    }
}

fn expect_enh(c: &mut Client, line: &str, code: u16, enhanced: &str) -> String {
    let r = c.expect(line, code);
    assert!(
        r.starts_with(&format!("{code} {enhanced}")),
        "{line:?}: expected {code} {enhanced}, got {r:?}"
    );
    r
}

/// Opens a transaction up to the 354.
fn open_data(c: &mut Client, from: &str, to: &[&str]) {
    c.expect(&format!("MAIL FROM:<{from}>"), 250);
    for t in to {
        c.expect(&format!("RCPT TO:<{t}>"), 250);
    }
    c.expect("DATA", 354);
}

// ---------------------------------------------------------------------------------------------
// Full transactions and the stored file.

#[test]
fn lettre_one_recipient_stored_byte_for_byte() {
    let server = Server::start(&[]);
    // Leading dots on several lines (lettre stuffs them; the server must unstuff), a line that is
    // a lone dot, a line of two dots, and a last line without CRLF.
    let raw: &[u8] =
        b"From: Alice <alice@client.example>\r\nTo: bob@dest.example\r\nSubject: one\r\n\r\n\
.leading dot\r\n..two dots\r\n.\r\n..\r\nmiddle . dot\r\nlast line";
    let reply = lettre_send(
        server.addr,
        "alice@client.example",
        &["bob@dest.example"],
        raw,
    );
    let qid = queue_id(&reply);
    let st = parse_stored(&only_file(&server));
    assert_eq!(st.return_path, "alice@client.example");
    assert_eq!(st.envelope_to, vec!["bob@dest.example"]);
    check_received(&st, HELO, "[127.0.0.1]", "ESMTP", &qid);
    // The message as the client meant it, plus the CRLF that is part of <CRLF>.<CRLF>.
    let mut want = raw.to_vec();
    want.extend_from_slice(b"\r\n");
    assert_eq!(
        String::from_utf8_lossy(&st.body),
        String::from_utf8_lossy(&want)
    );
}

#[test]
fn lettre_several_recipients_one_file_in_order() {
    let server = Server::start(&[]);
    let email = lettre::Message::builder()
        .from("Alice <alice@client.example>".parse().unwrap())
        .to("bob@dest.example".parse().unwrap())
        .cc("carol@other.example".parse().unwrap())
        .bcc("dave@dest.example".parse().unwrap())
        .subject("several")
        .body(String::from("Hello all.\r\n.dot line\r\n"))
        .unwrap();
    let resp = transport(server.addr).send(&email).unwrap();
    assert_eq!(resp.code().to_string(), "250");
    let qid = queue_id(&resp.message().collect::<Vec<_>>().join(" "));
    let st = parse_stored(&only_file(&server));
    assert_eq!(st.return_path, "alice@client.example");
    // lettre sends RCPT in To, Cc, Bcc order; one X-Envelope-To per recipient, in that order.
    assert_eq!(
        st.envelope_to,
        vec![
            "bob@dest.example",
            "carol@other.example",
            "dave@dest.example"
        ]
    );
    check_received(&st, HELO, "[127.0.0.1]", "ESMTP", &qid);
    let mut want = email.formatted();
    want.extend_from_slice(b"\r\n");
    assert_eq!(
        String::from_utf8_lossy(&st.body),
        String::from_utf8_lossy(&want)
    );
}

#[test]
fn raw_session_unstuffs_dots_and_keeps_bytes_exact() {
    let server = Server::start(&[]);
    let mut c = server.connect();
    assert!(
        c.greeting.starts_with(&format!("220 {HOSTNAME} ESMTP")),
        "{:?}",
        c.greeting
    );
    c.ehlo("raw.example");
    c.expect("MAIL FROM:<>", 250);
    c.expect("RCPT TO:<rcpt@dest.example>", 250);
    c.expect("DATA", 354);
    // The data's first line starts with a dot too (the start of data is the start of a line).
    // 8-bit bytes and a NUL-free binary-ish tail must come through unchanged.
    c.send(b"..first\r\nSubject: dots\r\n\r\n...three\r\n..\r\n. \r\nno.dot\r\ncaf\xc3\xa9 \xff\r\n.\r\n");
    let r = c.reply();
    assert!(r.starts_with("250"), "{r:?}");
    let qid = queue_id(&r);
    c.expect("QUIT", 221);
    assert!(c.closed());
    let st = parse_stored(&only_file(&server));
    assert_eq!(st.return_path, "");
    assert_eq!(st.envelope_to, vec!["rcpt@dest.example"]);
    check_received(&st, "raw.example", "[127.0.0.1]", "ESMTP", &qid);
    assert_eq!(
        st.body,
        b".first\r\nSubject: dots\r\n\r\n..three\r\n.\r\n \r\nno.dot\r\ncaf\xc3\xa9 \xff\r\n"
            .to_vec()
    );
}

#[test]
fn helo_session_is_smtp_and_ehlo_resets_transaction() {
    let server = Server::start(&[]);
    let mut c = server.connect();
    let r = c.expect("HELO old.example", 250);
    assert!(!r.contains('\n'), "HELO must get a one-line 250: {r:?}");
    open_data(&mut c, "a@old.example", &["b@dest.example"]);
    c.send(b"Subject: helo\r\n\r\nbody\r\n.\r\n");
    let r = c.reply();
    assert!(r.starts_with("250"), "{r:?}");
    let st = parse_stored(&only_file(&server));
    check_received(&st, "old.example", "[127.0.0.1]", "SMTP", &queue_id(&r));
    assert_eq!(st.body, b"Subject: helo\r\n\r\nbody\r\n");

    // A new EHLO drops the open transaction: DATA has no recipient, a new MAIL is not nested.
    c.expect("MAIL FROM:<a@old.example>", 250);
    c.expect("RCPT TO:<b@dest.example>", 250);
    c.ehlo("new.example");
    c.expect("DATA", 503);
    c.expect("MAIL FROM:<a@new.example>", 250);
    c.expect("RSET", 250);
    c.expect("DATA", 503);
}

#[test]
fn concurrent_clients_all_stored_once() {
    let server = Server::start(&[]);
    let addr = server.addr;
    let threads: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                (0..5)
                    .map(|i| {
                        let body =
                            format!("Subject: m{t}-{i}\r\n\r\nthread {t} message {i}\r\n.dot\r\n");
                        let r = lettre_send(
                            addr,
                            "s@client.example",
                            &[&format!("r{t}@dest.example")],
                            body.as_bytes(),
                        );
                        (queue_id(&r), body)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut sent: Vec<(String, String)> = threads
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let files = server.new_files();
    assert_eq!(files.len(), 20, "{files:?}");
    let mut names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for n in &names {
        // Maildir convention: <seconds>.<unique>.<host>, no info part in new/.
        let parts: Vec<&str> = n.split('.').collect();
        assert!(
            parts.len() >= 3 && parts[0].bytes().all(|b| b.is_ascii_digit()) && !n.contains(":2,"),
            "name {n:?}"
        );
    }
    names.dedup();
    assert_eq!(names.len(), 20);
    let mut got: Vec<(String, String)> = files
        .iter()
        .map(|f| {
            let st = parse_stored(&std::fs::read(f).unwrap());
            let qid = st.queue_id().to_string();
            (qid, String::from_utf8(st.body).unwrap())
        })
        .collect();
    for s in &mut sent {
        s.1.push_str("\r\n");
    }
    sent.sort();
    got.sort();
    assert_eq!(
        got, sent,
        "every message stored once, under the queue id its 250 named"
    );
}

#[test]
fn tmp_leftovers_of_a_crash_are_removed_at_startup_and_names_never_collide() {
    let server = Server::start(&[]);
    let r1 = lettre_send(
        server.addr,
        "a@client.example",
        &["b@dest.example"],
        b"Subject: 1\r\n\r\none",
    );
    let first = server.new_files();
    assert_eq!(first.len(), 1);
    let pid = server.pid();
    let dir = server.kill_keep_dir();
    // A half-written file of the killed process, in ringmx's naming convention
    // (<secs>.M<usecs>P<pid>Q<n>W<worker>.<host>): never acknowledged, so it goes.
    let orphan = dir
        .path()
        .join(format!("maildir/tmp/1700000000.M1P{pid}Q7W0.mx"));
    std::fs::write(&orphan, b"Return-Path: <a@client.example>\r\nhalf a mess").unwrap();
    // A fresh file of some other delivery program sharing the Maildir: not ours, kept.
    let foreign = dir.path().join("maildir/tmp/1700000000.123_456.otherhost");
    std::fs::write(&foreign, b"someone else's").unwrap();
    let server = Server::start_in(dir, &[]).unwrap();
    assert!(
        !orphan.exists(),
        "a tmp/ leftover of a dead ringmx must be deleted at start-up"
    );
    assert!(
        foreign.exists(),
        "another program's fresh tmp/ file must be left alone"
    );
    assert_eq!(
        server.new_files(),
        first,
        "new/ is never touched at start-up"
    );
    let r2 = lettre_send(
        server.addr,
        "a@client.example",
        &["b@dest.example"],
        b"Subject: 2\r\n\r\ntwo",
    );
    assert_ne!(
        queue_id(&r1),
        queue_id(&r2),
        "queue ids are unique across restarts"
    );
    let files = server.new_files();
    assert_eq!(files.len(), 2, "{files:?}");
    assert!(files.contains(&first[0]));
}

// ---------------------------------------------------------------------------------------------
// Commands and reply codes.

#[test]
fn ehlo_advertises_extensions_and_size() {
    let server = Server::start(&["--max-message-size", "123456"]);
    let mut c = server.connect();
    let r = c.ehlo("client.example");
    let lines: Vec<&str> = r.lines().collect();
    assert!(lines[0].starts_with(&format!("250-{HOSTNAME}")), "{r:?}");
    for (i, l) in lines.iter().enumerate() {
        let sep = if i + 1 == lines.len() { ' ' } else { '-' };
        assert!(
            l.starts_with("250") && l.as_bytes()[3] == sep as u8,
            "line {i} of {r:?}"
        );
    }
    let keywords: Vec<&str> = lines[1..].iter().map(|l| &l[4..]).collect();
    for k in [
        "PIPELINING",
        "SIZE 123456",
        "8BITMIME",
        "ENHANCEDSTATUSCODES",
        "SMTPUTF8",
    ] {
        assert!(keywords.contains(&k), "EHLO lacks {k:?}: {r:?}");
    }
    drop(server);

    let server = Server::start(&[]);
    let r = server.connect().ehlo("client.example");
    assert!(
        r.lines().any(|l| &l[4..] == "SIZE 26214400"),
        "default SIZE: {r:?}"
    );
}

#[test]
fn simple_commands_and_enhanced_codes() {
    let server = Server::start(&[]);
    let mut c = server.connect();
    c.ehlo("client.example");
    for (cmd, code) in [
        ("NOOP", 250),
        ("VRFY someone", 252),
        ("HELP", 214),
        ("RSET", 250),
        ("noop", 250),
        ("MAIL FROM:<a@client.example> SIZE=100 BODY=8BITMIME", 250),
        ("RCPT TO:<postmaster>", 250),
        ("RCPT TO:<Postmaster@Dest.Example>", 250),
        ("RSET", 250),
        ("MAIL FROM:<j\u{f6}rg@client.example> SMTPUTF8", 250),
        ("RCPT TO:<m\u{fc}ller@dest.example>", 250),
        ("DATA", 354),
    ] {
        let r = c.expect(cmd, code);
        if code != 354 {
            assert_enhanced(&r);
        }
    }
    c.send("Subject: utf8\r\n\r\nGr\u{fc}\u{df}e\r\n.\r\n".as_bytes());
    let r_data = c.reply();
    assert!(r_data.starts_with("250"), "{r_data:?}");
    assert_enhanced(&r_data);
    let r = c.expect("QUIT", 221);
    assert_enhanced(&r);
    assert!(c.closed(), "QUIT must close the connection");
    let st = parse_stored(&only_file(&server));
    check_received(&st, HELO, "[127.0.0.1]", "UTF8SMTP", &queue_id(&r_data));
    assert_eq!(st.return_path, "j\u{f6}rg@client.example");
    assert_eq!(st.envelope_to, vec!["m\u{fc}ller@dest.example"]);
    assert_eq!(
        st.body,
        "Subject: utf8\r\n\r\nGr\u{fc}\u{df}e\r\n".as_bytes()
    );
}

#[test]
fn unknown_syntax_and_sequence_errors() {
    let server = Server::start(&["--max-errors", "100"]);
    let mut c = server.connect();
    // Before HELO/EHLO.
    c.expect("MAIL FROM:<a@client.example>", 503);
    c.expect("EHLO", 501);
    c.expect("HELO", 501);
    c.ehlo("client.example");
    expect_enh(&mut c, "FOO bar", 500, "5.5.2");
    expect_enh(&mut c, "MAILFROM:<a@b.example>", 500, "5.5.2");
    c.expect("NOOP", 250);
    // Sequence.
    assert_enhanced(&c.expect("RCPT TO:<b@dest.example>", 503));
    assert_enhanced(&c.expect("DATA", 503));
    c.expect("MAIL FROM:<a@client.example>", 250);
    assert_enhanced(&c.expect("DATA", 503));
    assert_enhanced(&c.expect("MAIL FROM:<again@client.example>", 503));
    // Syntax.
    for bad in [
        "RCPT TO:<unterminated@dest.example",
        "RCPT TO:",
        "RCPT",
        "RCPT TO:<>",
    ] {
        assert_enhanced(&c.expect(bad, 501));
    }
    c.expect("RSET", 250);
    for bad in [
        "MAIL FROM:<unterminated@client.example",
        "MAIL",
        "MAIL FROM:",
    ] {
        assert_enhanced(&c.expect(bad, 501));
    }
    // Unknown MAIL parameter.
    assert_enhanced(&c.expect("MAIL FROM:<a@client.example> FOO=BAR", 555));
    // A non-ASCII address needs SMTPUTF8 (RFC 6531).
    expect_enh(&mut c, "MAIL FROM:<j\u{f6}rg@client.example>", 553, "5.6.7");
    // The session still works after all that.
    open_data(&mut c, "a@client.example", &["b@dest.example"]);
    c.send(b"x\r\n.\r\n");
    assert!(c.reply().starts_with("250"));
    assert_eq!(server.new_files().len(), 1);
}

#[test]
fn size_parameter_over_limit_gets_552() {
    let server = Server::start(&["--max-message-size", "1000"]);
    let mut c = server.connect();
    c.ehlo("client.example");
    expect_enh(
        &mut c,
        "MAIL FROM:<a@client.example> SIZE=1001",
        552,
        "5.3.4",
    );
    c.expect("MAIL FROM:<a@client.example> SIZE=1000", 250);
    c.expect("RCPT TO:<b@dest.example>", 250);
}

#[test]
fn message_over_max_size_gets_552_and_is_not_stored() {
    let server = Server::start(&["--max-message-size", "1000"]);
    let mut c = server.connect();
    c.ehlo("client.example");
    // Well over the limit (2 MiB against 1000 bytes): read and dropped, then 552, session goes on.
    open_data(&mut c, "a@client.example", &["b@dest.example"]);
    let line = format!("{}\r\n", "x".repeat(998));
    for _ in 0..2048 {
        c.send(line.as_bytes());
    }
    c.send(b".\r\n");
    let r = c.reply();
    assert!(r.starts_with("552 5.3.4"), "{r:?}");
    assert_eq!(server.new_files().len(), 0);
    assert_eq!(
        list_dir(&server.maildir().join("tmp")).len(),
        0,
        "nothing left in tmp/"
    );
    // Just over: still refused.
    open_data(&mut c, "a@client.example", &["b@dest.example"]);
    c.send(format!("{}\r\n.\r\n", "y".repeat(1100)).as_bytes());
    let r = c.reply();
    assert!(r.starts_with("552 5.3.4"), "{r:?}");
    // Under the limit on the same connection: stored.
    open_data(&mut c, "a@client.example", &["b@dest.example"]);
    c.send(format!("{}\r\n.\r\n", "z".repeat(500)).as_bytes());
    let r = c.reply();
    assert!(r.starts_with("250"), "{r:?}");
    assert_eq!(
        parse_stored(&only_file(&server)).body,
        format!("{}\r\n", "z".repeat(500)).as_bytes()
    );
}

#[test]
fn recipients_over_limit_get_452_and_the_rest_are_kept() {
    let server = Server::start(&["--max-recipients", "2"]);
    let mut c = server.connect();
    c.ehlo("client.example");
    c.expect("MAIL FROM:<a@client.example>", 250);
    c.expect("RCPT TO:<r1@dest.example>", 250);
    c.expect("RCPT TO:<r2@dest.example>", 250);
    expect_enh(&mut c, "RCPT TO:<r3@dest.example>", 452, "4.5.3");
    c.expect("DATA", 354);
    c.send(b"two only\r\n.\r\n");
    assert!(c.reply().starts_with("250"));
    assert_eq!(
        parse_stored(&only_file(&server)).envelope_to,
        vec!["r1@dest.example", "r2@dest.example"]
    );
}

#[test]
fn accept_domain_refuses_others_with_550() {
    let server = Server::start(&[
        "--accept-domain",
        "dest.example",
        "--accept-domain",
        "second.example",
    ]);
    let mut c = server.connect();
    c.ehlo("client.example");
    c.expect("MAIL FROM:<a@client.example>", 250);
    expect_enh(&mut c, "RCPT TO:<x@other.example>", 550, "5.7.1");
    expect_enh(&mut c, "RCPT TO:<x@sub.dest.example.evil>", 550, "5.7.1");
    c.expect("RCPT TO:<x@dest.example>", 250);
    c.expect("RCPT TO:<Y@DEST.Example>", 250);
    c.expect("RCPT TO:<z@second.example>", 250);
    c.expect("RCPT TO:<postmaster>", 250);
    c.expect("DATA", 354);
    c.send(b"hi\r\n.\r\n");
    assert!(c.reply().starts_with("250"));
    assert_eq!(
        parse_stored(&only_file(&server)).envelope_to,
        vec![
            "x@dest.example",
            "Y@DEST.Example",
            "z@second.example",
            "postmaster"
        ]
    );
}

#[test]
fn overlong_command_line_gets_500_5_5_6_and_session_goes_on() {
    let server = Server::start(&[]);
    let mut c = server.connect();
    c.ehlo("client.example");
    // Exactly 512 octets with CRLF is allowed (RFC 5321 4.5.3.1.4); 513 is over.
    let at_limit = format!("NOOP {}", "a".repeat(512 - 2 - 5));
    assert_eq!(at_limit.len() + 2, 512);
    let r = c.cmd(&at_limit);
    assert!(
        !r.contains("5.5.6"),
        "a 512-octet line is within the limit: {r:?}"
    );
    let over = format!("NOOP {}", "a".repeat(513 - 2 - 5));
    expect_enh(&mut c, &over, 500, "5.5.6");
    c.expect("NOOP", 250);
    // A huge line (100 KB, arriving in many reads) is discarded whole: one 500, then the next
    // command is answered, not the tail of the line.
    let huge = format!("MAIL FROM:<{}@client.example>", "b".repeat(100_000));
    expect_enh(&mut c, &huge, 500, "5.5.6");
    c.expect("MAIL FROM:<a@client.example>", 250);
}

#[test]
fn too_many_errors_get_421_and_close() {
    let server = Server::start(&["--max-errors", "3"]);
    let mut c = server.connect();
    c.ehlo("client.example");
    // Two errors of different kinds, then the third: its own reply, then 421 4.7.0, then close;
    // the rest of the pipelined input is ignored.
    c.expect("BOGUS", 500);
    c.expect("RCPT TO:<b@dest.example>", 503);
    c.send(b"BOGUS\r\nNOOP\r\n");
    assert!(c.reply().starts_with("500 5.5.2"));
    assert_eq!(
        c.reply(),
        format!("421 4.7.0 {HOSTNAME} Error: too many errors")
    );
    assert!(c.closed(), "connection must close after the 421");
    // Other clients are not affected, and one below the limit keeps going.
    let mut d = server.connect();
    d.ehlo("client.example");
    d.expect("BOGUS", 500);
    d.expect("BOGUS", 500);
    d.expect("NOOP", 250);
}

// ---------------------------------------------------------------------------------------------
// Pipelining and the data boundary.

#[test]
fn pipelined_commands_are_answered_in_order() {
    let server = Server::start(&[]);
    let mut c = server.connect();
    c.send(b"EHLO pipe.example\r\nMAIL FROM:<a@client.example>\r\nRCPT TO:<b@dest.example>\r\nFOO\r\nRCPT TO:<c@dest.example>\r\nVRFY x\r\nDATA\r\n");
    let r = c.reply();
    assert!(r.starts_with("250-") && r.contains("PIPELINING"), "{r:?}");
    for code in ["250", "250", "500", "250", "252", "354"] {
        let r = c.reply();
        assert!(r.starts_with(code), "expected {code}, got {r:?}");
    }
    // The data, the end of data, the next transaction and QUIT, all in one write.
    c.send(b"Subject: p\r\n\r\nhello\r\n.\r\nMAIL FROM:<d@client.example>\r\nRCPT TO:<e@dest.example>\r\nDATA\r\nsecond\r\n.\r\nQUIT\r\n");
    for code in ["250", "250", "250", "354", "250", "221"] {
        let r = c.reply();
        assert!(r.starts_with(code), "expected {code}, got {r:?}");
    }
    assert!(c.closed());
    let mut bodies: Vec<(Vec<String>, Vec<u8>)> = server
        .new_files()
        .iter()
        .map(|f| {
            let st = parse_stored(&std::fs::read(f).unwrap());
            (st.envelope_to, st.body)
        })
        .collect();
    bodies.sort();
    assert_eq!(
        bodies,
        vec![
            (
                vec!["b@dest.example".to_string(), "c@dest.example".to_string()],
                b"Subject: p\r\n\r\nhello\r\n".to_vec()
            ),
            (vec!["e@dest.example".to_string()], b"second\r\n".to_vec()),
        ]
    );
}

#[test]
fn bytes_after_data_in_the_same_packet_are_message_data() {
    let server = Server::start(&[]);
    let mut c = server.connect();
    c.send(b"EHLO pipe.example\r\nMAIL FROM:<a@client.example>\r\nRCPT TO:<b@dest.example>\r\nDATA\r\nRCPT TO:<not-a-command@dest.example>\r\nQUIT\r\n.\r\nNOOP\r\n");
    for code in ["250", "250", "250", "354", "250", "250"] {
        let r = c.reply();
        assert!(r.starts_with(code), "expected {code}, got {r:?}");
    }
    let st = parse_stored(&only_file(&server));
    assert_eq!(st.envelope_to, vec!["b@dest.example"]);
    assert_eq!(st.body, b"RCPT TO:<not-a-command@dest.example>\r\nQUIT\r\n");
}

/// The known SMTP smuggling end-of-data variants (bare LF / bare CR around the dot).
const SMUGGLING: &[&[u8]] = &[
    b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r", b"\r.\r", b"\n.\r", b"\r.\n",
];

#[test]
fn smuggling_variants_never_end_data_and_are_rejected() {
    let server = Server::start(&[]);
    for v in SMUGGLING {
        let mut c = server.connect();
        c.ehlo("client.example");
        open_data(&mut c, "a@client.example", &["b@dest.example"]);
        let mut msg = b"Subject: outer\r\n\r\nbefore".to_vec();
        msg.extend_from_slice(v);
        msg.extend_from_slice(b"MAIL FROM:<evil@client.example>\r\nRCPT TO:<victim@dest.example>\r\nDATA\r\nSubject: smuggled\r\n\r\nevil\r\n");
        msg.extend_from_slice(b"\r\n.\r\nHELP\r\n");
        c.send(&msg);
        // Exactly one reply for the whole message, then HELP's: the smuggled commands were data.
        let r = c.reply();
        assert!(
            r.starts_with("550 5.6.11"),
            "variant {v:?}: expected 550 5.6.11, got {r:?}"
        );
        let r = c.reply();
        assert!(
            r.starts_with("214"),
            "variant {v:?}: next reply must be HELP's, got {r:?}"
        );
        // The session goes on normally.
        open_data(&mut c, "a@client.example", &["b@dest.example"]);
        c.send(b"clean\r\n.\r\n");
        let r = c.reply();
        assert!(r.starts_with("250"), "variant {v:?}: {r:?}");
    }
    // Only the clean messages were stored.
    let files = server.new_files();
    assert_eq!(files.len(), SMUGGLING.len());
    for f in files {
        assert_eq!(parse_stored(&std::fs::read(f).unwrap()).body, b"clean\r\n");
    }
}

#[test]
fn bare_lf_or_cr_anywhere_rejects_the_message() {
    // The documented policy (src/protocol/data.rs): a message with any bare CR or bare LF is read
    // to its real end and rejected whole with 550 5.6.11; nothing of it is stored.
    let server = Server::start(&[]);
    let mut c = server.connect();
    c.ehlo("client.example");
    for body in [
        &b"Subject: lf\n\nunix line ends\n"[..],
        b"Subject: cr\r\n\r\nold mac\rline\r\n",
    ] {
        open_data(&mut c, "a@client.example", &["b@dest.example"]);
        c.send(body);
        c.send(b"\r\n.\r\n");
        let r = c.reply();
        assert!(r.starts_with("550 5.6.11"), "{body:?}: {r:?}");
    }
    c.expect("NOOP", 250);
    assert_eq!(server.new_files().len(), 0);
    assert_eq!(list_dir(&server.maildir().join("tmp")).len(), 0);
}

#[test]
fn smuggling_split_across_reads_is_still_caught() {
    let server = Server::start(&[]);
    let mut c = server.connect();
    c.stream.set_nodelay(true).unwrap();
    c.ehlo("client.example");
    open_data(&mut c, "a@client.example", &["b@dest.example"]);
    for part in [
        &b"Subject: s\r\n\r\nbefore\n"[..],
        b".",
        b"\n",
        b"MAIL FROM:<e@client.example>\r\n",
        b"\r\n.",
        b"\r\n",
    ] {
        c.send(part);
        std::thread::sleep(Duration::from_millis(30));
    }
    let r = c.reply();
    assert!(r.starts_with("550 5.6.11"), "{r:?}");
    c.expect("NOOP", 250);
    assert_eq!(server.new_files().len(), 0);
}

// ---------------------------------------------------------------------------------------------
// Timeouts and connection limits.

#[test]
fn idle_timeout_sends_421_4_4_2_and_closes() {
    let server = Server::start(&["--idle-timeout", "1"]);
    // A client that keeps talking is not cut off.
    let mut busy = server.connect();
    busy.ehlo("client.example");
    // An idle one, mid-transaction.
    let mut idle = server.connect();
    idle.ehlo("client.example");
    idle.expect("MAIL FROM:<a@client.example>", 250);
    let start = Instant::now();
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(400));
        busy.expect("NOOP", 250);
    }
    let r = idle.reply();
    assert!(r.starts_with(&format!("421 4.4.2 {HOSTNAME}")), "{r:?}");
    assert!(idle.closed());
    assert!(start.elapsed() < Duration::from_secs(6));
    busy.expect("NOOP", 250);
    // A client that never says anything gets the same.
    let mut silent = server.connect();
    let t = Instant::now();
    let r = silent.reply();
    assert!(r.starts_with("421 4.4.2"), "{r:?}");
    assert!(
        t.elapsed() >= Duration::from_millis(900) && t.elapsed() < Duration::from_secs(5),
        "{:?}",
        t.elapsed()
    );
    assert!(silent.closed());
}

/// Connects until the greeting is a 220 (a slot held by a client that just left is released
/// asynchronously), at most 3 s.
fn connect_220(addr: SocketAddr) -> Client {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let c = Client::connect(addr);
        if c.greeting.starts_with("220") {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "no slot was released: {:?}",
            c.greeting
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One more connection gets `expected` (a 421 that names the limit) and is closed.
fn assert_refused_421(addr: SocketAddr, expected: &str) {
    let mut c = Client::connect(addr);
    assert!(
        c.greeting.starts_with(expected),
        "one connection over the limit must get {expected:?}, got {:?}",
        c.greeting
    );
    assert!(c.closed());
}

fn too_many_in_all() -> String {
    format!("421 4.7.0 {HOSTNAME} Error: too many connections; try again later")
}

fn too_many_from(network: &str) -> String {
    format!("421 4.7.0 {HOSTNAME} Error: too many connections from {network}")
}

#[test]
fn max_connections_across_workers() {
    let server = Server::start(&["--max-connections", "3", "--workers", "2"]);
    let mut held: Vec<Client> = (0..3).map(|_| connect_220(server.addr)).collect();
    assert_refused_421(server.addr, &too_many_in_all());
    // The held sessions still work.
    for c in &mut held {
        c.expect("NOOP", 250);
    }
    // A client that leaves gives its slot back (QUIT or just a dropped connection).
    held.pop().unwrap().expect("QUIT", 221);
    held.push(connect_220(server.addr));
    assert_refused_421(server.addr, &too_many_in_all());
    drop(held.pop());
    held.push(connect_220(server.addr));
}

#[test]
fn max_connections_per_ip() {
    let server = Server::start(&["--max-connections-per-ip", "2"]);
    let mut held: Vec<Client> = (0..2).map(|_| connect_220(server.addr)).collect();
    assert_refused_421(server.addr, &too_many_from("127.0.0.1"));
    // Another address of the loopback range is counted on its own.
    let other = connect_from("127.0.0.2", server.addr);
    match other {
        Some(mut o) => {
            assert!(
                o.greeting.starts_with("220"),
                "another IP must not be limited: {:?}",
                o.greeting
            );
            o.expect("NOOP", 250);
        }
        None => eprintln!("skipping the 127.0.0.2 part: cannot bind 127.0.0.2 here"),
    }
    held.pop().unwrap().expect("QUIT", 221);
    held.push(connect_220(server.addr));
    assert_refused_421(server.addr, &too_many_from("127.0.0.1"));
}

#[test]
fn max_connections_per_ip_counts_a_client_network() {
    // With --ipv4-client-prefix 24 the addresses of one /24 are one client (the same holds
    // for IPv6 and its default /64, which a test cannot reach through the loopback's ::1).
    let server = Server::start(&[
        "--max-connections-per-ip",
        "2",
        "--ipv4-client-prefix",
        "24",
    ]);
    let Some(a) = connect_from("127.0.5.1", server.addr) else {
        eprintln!("SKIP: cannot bind 127.0.5.1 here");
        return;
    };
    let b = connect_from("127.0.5.2", server.addr).unwrap();
    for c in [&a, &b] {
        assert!(c.greeting.starts_with("220"), "{:?}", c.greeting);
    }
    let mut third = connect_from("127.0.5.3", server.addr).unwrap();
    assert_eq!(
        third.greeting,
        too_many_from("127.0.5.0/24"),
        "a third address of the same /24 must be refused: {:?}",
        third.greeting
    );
    assert!(third.closed());
    // Another /24 is another client.
    let mut other = connect_from("127.0.6.1", server.addr).unwrap();
    assert!(other.greeting.starts_with("220"), "{:?}", other.greeting);
    other.expect("NOOP", 250);
    // One leaving frees the network's slot for any of its addresses.
    drop(a);
    let mut deadline = 50;
    let mut again = loop {
        let c = connect_from("127.0.5.200", server.addr).unwrap();
        if c.greeting.starts_with("220") || deadline == 0 {
            break c;
        }
        deadline -= 1;
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(again.greeting.starts_with("220"), "{:?}", again.greeting);
    again.expect("NOOP", 250);
    drop(b);
    // The operator's log names the network and the limit. (Each worker writes its own lines,
    // so the refusals of the retries above may come before this one.)
    let refusal = |log: &str| {
        log.lines()
            .find(|l| {
                l.contains("refused: too many connections from this client")
                    && l.contains("client=127.0.5.3 ")
            })
            .map(str::to_string)
    };
    let mut log = String::new();
    for _ in 0..50 {
        log = server.log_text();
        if refusal(&log).is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let line = refusal(&log).unwrap_or_else(|| panic!("no refusal line for 127.0.5.3:\n{log}"));
    assert!(
        line.contains("network=127.0.5.0/24") && line.contains("limit=2"),
        "{line}"
    );
}

/// A client bound to a chosen local address, or `None` when the host cannot bind it.
fn connect_from(local: &str, to: SocketAddr) -> Option<Client> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).ok()?;
    s.bind(&format!("{local}:0").parse::<SocketAddr>().unwrap().into())
        .ok()?;
    s.connect(&to.into()).ok()?;
    let stream: TcpStream = s.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let reader = std::io::BufReader::new(stream.try_clone().unwrap());
    let mut c = Client {
        reader,
        stream,
        greeting: String::new(),
    };
    c.greeting = c.reply();
    Some(c)
}

// ---------------------------------------------------------------------------------------------
// Shutdown.

/// After SIGTERM the listeners close: new connections are refused (within 3 s).
fn assert_listeners_closed(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Err(_) => return,
            Ok(mut s) => {
                // Accepted just before the close: it must be turned away, not served.
                s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                let mut buf = [0u8; 256];
                let n = s.read(&mut buf).unwrap_or(0);
                let got = String::from_utf8_lossy(&buf[..n]).into_owned();
                assert!(
                    n == 0 || got.starts_with("421"),
                    "served after SIGTERM: {got:?}"
                );
            }
        }
        assert!(
            Instant::now() < deadline,
            "still accepting connections 3 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn shutdown_421() -> String {
    format!("421 4.3.2 {HOSTNAME} Service shutting down")
}

#[test]
fn sigterm_closes_idle_sessions_and_lets_data_finish() {
    let mut server = Server::start(&[]);
    let mut fresh = server.connect();
    let mut idle = server.connect();
    idle.ehlo("client.example");
    let mut in_tx = server.connect();
    in_tx.ehlo("client.example");
    in_tx.expect("MAIL FROM:<a@client.example>", 250);
    let mut data = server.connect();
    data.ehlo("client.example");
    open_data(&mut data, "a@client.example", &["b@dest.example"]);
    data.send(b"Subject: during shutdown\r\n\r\nfirst half\r\n");
    std::thread::sleep(Duration::from_millis(100));

    server.signal(15);
    for (name, c) in [
        ("fresh", &mut fresh),
        ("idle", &mut idle),
        ("in transaction", &mut in_tx),
    ] {
        let r = c.reply();
        assert_eq!(r, shutdown_421(), "{name} session");
        assert!(c.closed(), "{name} session must be closed after the 421");
    }
    assert_listeners_closed(server.addr);
    // The session in DATA finishes its message: stored and acknowledged, then 421.
    data.send(b"second half\r\n.\r\n");
    let r = data.reply();
    assert!(r.starts_with("250"), "{r:?}");
    assert_eq!(data.reply(), shutdown_421());
    assert!(data.closed());
    let st = server
        .wait_exit(Duration::from_secs(10))
        .expect("exits after the last session");
    assert!(st.success(), "exit status {st}");
    let stored = parse_stored(&only_file(&server));
    assert_eq!(
        stored.body,
        b"Subject: during shutdown\r\n\r\nfirst half\r\nsecond half\r\n"
    );
}

#[test]
fn sigint_shuts_down_like_sigterm() {
    let mut server = Server::start(&[]);
    let mut c = server.connect();
    c.ehlo("client.example");
    server.signal(2);
    assert_eq!(c.reply(), shutdown_421());
    assert!(c.closed());
    let st = server.wait_exit(Duration::from_secs(10)).expect("exits");
    assert!(st.success(), "exit status {st}");
}

#[test]
fn shutdown_grace_ends_stalled_data_with_421_and_stores_nothing() {
    let mut server = Server::start(&["--shutdown-grace", "1"]);
    let mut data = server.connect();
    data.ehlo("client.example");
    open_data(&mut data, "a@client.example", &["b@dest.example"]);
    data.send(b"Subject: never finished\r\n\r\npartial");
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    server.signal(15);
    let r = data.reply();
    assert_eq!(r, shutdown_421());
    assert!(
        t.elapsed() >= Duration::from_millis(800),
        "421 came before the grace period: {:?}",
        t.elapsed()
    );
    assert!(data.closed());
    let st = server
        .wait_exit(Duration::from_secs(10))
        .expect("exits after the grace period");
    assert!(st.success(), "exit status {st}");
    assert_eq!(
        server.new_files().len(),
        0,
        "an unfinished message is never stored"
    );
    assert_eq!(
        list_dir(&server.maildir().join("tmp")).len(),
        0,
        "no partial file left in tmp/"
    );
}

// ---------------------------------------------------------------------------------------------
// Start-up, CLI and stores.

/// Exit code 1 and one line that holds every word of `words` (case-insensitive); no panic.
fn assert_startup_error(args: &[&str], words: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err) = run_bin(args, dir.path(), Duration::from_secs(10));
    let all = format!("{out}{err}");
    assert!(!all.contains("panicked"), "{args:?} panicked: {all}");
    assert_eq!(
        code,
        Some(1),
        "{args:?}: expected exit 1 (None: still running after 10 s); output: {all}"
    );
    let found = all.lines().any(|l| {
        let l = l.to_lowercase();
        words.iter().all(|w| l.contains(&w.to_lowercase()))
    });
    assert!(found, "{args:?}: no one line says {words:?}; output: {all}");
}

#[test]
fn port_in_use_is_one_line_and_exit_1() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let store = format!("maildir:{}", dir.path().join("m").display());
    assert_startup_error(
        &["serve", "--listen", &addr, "--store", &store],
        &[&addr, "in use"],
    );
}

#[test]
fn second_instance_on_the_same_port_fails() {
    // SO_REUSEPORT lets the same user bind a port twice; a second ringmx must not silently share
    // (and split) the first one's traffic.
    let server = Server::start(&[]);
    let addr = server.addr.to_string();
    let dir = tempfile::tempdir().unwrap();
    let store = format!("maildir:{}", dir.path().join("m").display());
    assert_startup_error(
        &["serve", "--listen", &addr, "--store", &store],
        &[&addr, "in use"],
    );
    server.connect().expect("NOOP", 250);
}

#[test]
fn unwritable_store_is_one_line_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let store = format!("maildir:{}/maildir", file.display());
    let listen = format!("127.0.0.1:{}", crate::common::free_port());
    assert_startup_error(
        &["serve", "--listen", &listen, "--store", &store],
        &[&file.display().to_string()],
    );
    // A read-only file system (root ignores permission bits, a read-only mount it cannot).
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "ro,size=64k", "tmpfs"])
        .arg(&ro)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!(
            "skipping the read-only part of unwritable_store_is_one_line_and_exit_1: cannot mount"
        );
        return;
    }
    let store = format!("maildir:{}/maildir", ro.display());
    let (code, out, err) = run_bin(
        &["serve", "--listen", &listen, "--store", &store],
        dir.path(),
        Duration::from_secs(10),
    );
    let _ = std::process::Command::new("umount")
        .arg("-l")
        .arg(&ro)
        .status();
    let all = format!("{out}{err}");
    assert!(!all.contains("panicked"), "{all}");
    assert_eq!(code, Some(1), "read-only store: {all}");
    assert!(
        all.lines().any(|l| l.contains(&ro.display().to_string())),
        "read-only store: no line names {ro:?}: {all}"
    );
}

#[test]
fn public_listen_needs_a_recipient_policy() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("maildir:{}", dir.path().join("m").display());
    let listen = format!("0.0.0.0:{}", crate::common::free_port());
    assert_startup_error(
        &["serve", "--listen", &listen, "--store", &store],
        &["--accept-domain", "--accept-any-recipient"],
    );
}

#[test]
fn bad_flags_and_values_are_one_line_and_exit_1() {
    assert_startup_error(&["serve", "--no-such-flag"], &["--no-such-flag"]);
    assert_startup_error(
        &["serve", "--listen", "not-an-address"],
        &["not-an-address"],
    );
    assert_startup_error(&["serve", "--max-recipients", "many"], &["many"]);
    assert_startup_error(&["serve", "--store", "sqlite:/tmp/x"], &["sqlite:/tmp/x"]);
    assert_startup_error(&["serve", "--workers", "0"], &["--workers"]);
}

#[test]
fn help_mentions_every_flag() {
    let flags = [
        "--config",
        "--listen",
        "--workers",
        "--hostname",
        "--store",
        "--accept-domain",
        "--accept-any-recipient",
        "--max-message-size",
        "--max-recipients",
        "--idle-timeout",
        "--max-session-time",
        "--max-connections",
        "--max-connections-per-ip",
        "--max-errors",
        "--shutdown-grace",
        "--batch-syncfs",
        "--log-flush-ms",
        "--log-level",
    ];
    let dir = tempfile::tempdir().unwrap();
    for args in [&["serve", "--help"][..], &["--help"][..]] {
        let (code, out, err) = run_bin(args, dir.path(), Duration::from_secs(10));
        assert_eq!(code, Some(0), "{args:?}: {out}{err}");
        for f in flags {
            assert!(
                out.contains(f),
                "`ringmx {}` does not mention {f}:\n{out}",
                args.join(" ")
            );
        }
    }
}

#[test]
fn discard_store_accepts_and_writes_nothing() {
    let server = Server::start(&["--store", "discard"]);
    for i in 0..3 {
        lettre_send(
            server.addr,
            "a@client.example",
            &["b@dest.example"],
            format!("Subject: {i}\r\n\r\nx").as_bytes(),
        );
    }
    let entries: Vec<_> = list_dir(server.dir.path())
        .into_iter()
        .filter(|p| {
            !p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("server-")
        })
        .collect();
    assert_eq!(
        entries,
        Vec::<std::path::PathBuf>::new(),
        "discard must not write files"
    );
}

#[test]
fn ipv6_listen_works() {
    let port = match TcpListener::bind("[::1]:0") {
        Ok(l) => l.local_addr().unwrap().port(),
        Err(e) => {
            eprintln!("skipping ipv6_listen_works: this host has no ::1 ({e})");
            return;
        }
    };
    let v6 = format!("[::1]:{port}");
    let server = Server::start(&["--listen", &v6]);
    let addr: SocketAddr = v6.parse().unwrap();
    let mut c = Client::connect(addr);
    assert!(c.greeting.starts_with("220"), "{:?}", c.greeting);
    c.ehlo("v6.example");
    open_data(&mut c, "a@client.example", &["b@dest.example"]);
    c.send(b"over v6\r\n.\r\n");
    let r = c.reply();
    assert!(r.starts_with("250"), "{r:?}");
    let st: Stored = parse_stored(&only_file(&server));
    check_received(&st, "v6.example", "[IPv6:::1]", "ESMTP", &queue_id(&r));
    assert_eq!(st.body, b"over v6\r\n");
    // The IPv4 listener of the same server still works.
    server.connect().expect("NOOP", 250);
}

// ---------------------------------------------------------------------------------------------
// Robustness of the wiring: big bodies, odd reads, clients that vanish, defaults, restarts.

/// A deterministic pseudo-random generator (xorshift), so the big body is the same every run.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn big_message_in_odd_sized_writes_is_stored_exactly() {
    let server = Server::start(&[]);
    let mut rng = XorShift(0x5eed_1234_abcd_0001);
    // About 3 MiB of lines of 0..=200 printable bytes, one in eight starting with a dot.
    let mut body = Vec::new();
    while body.len() < 3 << 20 {
        let len = (rng.next() % 201) as usize;
        let dot = rng.next().is_multiple_of(8);
        if dot {
            body.push(b'.');
        }
        for _ in 0..len {
            body.push(b' ' + (rng.next() % 95) as u8);
        }
        body.extend_from_slice(b"\r\n");
    }
    let mut wire = Vec::with_capacity(body.len() + body.len() / 50);
    for line in body.split_inclusive(|&b| b == b'\n') {
        if line.starts_with(b".") {
            wire.push(b'.');
        }
        wire.extend_from_slice(line);
    }
    wire.extend_from_slice(b".\r\n");
    let mut c = server.connect();
    c.ehlo("client.example");
    open_data(&mut c, "a@client.example", &["b@dest.example"]);
    let sizes = [1usize, 7, 1500, 65_536, 3, 4096, 200_000, 2];
    let (mut at, mut i) = (0, 0);
    while at < wire.len() {
        let n = sizes[i % sizes.len()].min(wire.len() - at);
        c.send(&wire[at..at + n]);
        at += n;
        i += 1;
    }
    let r = c.reply();
    assert!(r.starts_with("250"), "{r:?}");
    let st = parse_stored(&only_file(&server));
    assert!(
        st.body == body,
        "stored body differs (stored {} bytes, sent {} bytes)",
        st.body.len(),
        body.len()
    );
}

#[test]
fn commands_sent_one_byte_per_write_work() {
    let server = Server::start(&[]);
    let mut c = server.connect();
    c.stream.set_nodelay(true).unwrap();
    let script = b"EHLO slow.example\r\nMAIL FROM:<a@client.example>\r\nRCPT TO:<b@dest.example>\r\nDATA\r\n";
    for b in script {
        c.send(&[*b]);
    }
    for code in ["250", "250", "250", "354"] {
        let r = c.reply();
        assert!(r.starts_with(code), "expected {code}, got {r:?}");
    }
    for b in b"..x\r\ny\r\n.\r\n" {
        c.send(&[*b]);
    }
    let r = c.reply();
    assert!(r.starts_with("250"), "{r:?}");
    assert_eq!(parse_stored(&only_file(&server)).body, b".x\r\ny\r\n");
}

#[test]
fn client_vanishing_mid_data_stores_nothing_and_frees_its_slot() {
    let server = Server::start(&["--max-connections-per-ip", "1"]);
    for how in ["close", "reset"] {
        let mut c = connect_220(server.addr);
        c.ehlo("client.example");
        open_data(&mut c, "a@client.example", &["b@dest.example"]);
        c.send(b"Subject: cut\r\n\r\nhalf a message\r\n");
        if how == "reset" {
            // SO_LINGER 0: close sends an RST instead of a FIN.
            socket2::SockRef::from(&c.stream)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
        }
        drop(c);
    }
    // The one slot is free again, and the server is healthy.
    let mut c = connect_220(server.addr);
    c.ehlo("client.example");
    open_data(&mut c, "a@client.example", &["b@dest.example"]);
    c.send(b"whole\r\n.\r\n");
    assert!(c.reply().starts_with("250"));
    assert_eq!(parse_stored(&only_file(&server)).body, b"whole\r\n");
}

#[test]
fn idle_timeout_applies_in_the_middle_of_data() {
    let server = Server::start(&["--idle-timeout", "1"]);
    let mut c = server.connect();
    c.ehlo("client.example");
    open_data(&mut c, "a@client.example", &["b@dest.example"]);
    c.send(b"Subject: stalled\r\n\r\nand then nothing");
    let r = c.reply();
    assert!(r.starts_with(&format!("421 4.4.2 {HOSTNAME}")), "{r:?}");
    assert!(c.closed());
    assert_eq!(server.new_files().len(), 0);
    assert_eq!(
        list_dir(&server.maildir().join("tmp")).len(),
        0,
        "nothing left in tmp/"
    );
}

#[test]
fn config_file_sets_keys_and_flags_win() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("ringmx.toml");
    std::fs::write(
        &cfg,
        "max-message-size = 1000\nmax-recipients = 1\naccept-domain = [\"dest.example\"]\n",
    )
    .unwrap();
    let cfg = cfg.display().to_string();
    let server = Server::start(&["--config", &cfg, "--max-message-size", "2000"]);
    let mut c = server.connect();
    let r = c.ehlo("client.example");
    assert!(
        r.lines().any(|l| &l[4..] == "SIZE 2000"),
        "the flag must win over the file: {r:?}"
    );
    c.expect("MAIL FROM:<a@client.example>", 250);
    c.expect("RCPT TO:<x@other.example>", 550);
    c.expect("RCPT TO:<x@dest.example>", 250);
    c.expect("RCPT TO:<y@dest.example>", 452);
    // An unknown key is a start-up error naming it.
    std::fs::write(dir.path().join("bad.toml"), "max-mesage-size = 1000\n").unwrap();
    let bad = dir.path().join("bad.toml").display().to_string();
    assert_startup_error(&["serve", "--config", &bad], &["max-mesage-size"]);
}

#[test]
fn defaults_store_under_ringmx_data_and_greet_with_the_system_hostname() {
    // No --store and no --hostname: the Maildir goes to ./ringmx-data/maildir of the working
    // directory, and the greeting names the system host.
    let dir = tempfile::tempdir().unwrap();
    let port = crate::common::free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let child = std::process::Command::new(crate::common::BIN)
        .args(["serve", "--listen", &addr.to_string(), "--workers", "1"])
        .current_dir(dir.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _guard = Kill(child);
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut c = loop {
        if TcpStream::connect(addr).is_ok() {
            break Client::connect(addr);
        }
        assert!(Instant::now() < deadline, "server did not come up");
        std::thread::sleep(Duration::from_millis(20));
    };
    let host = nix::unistd::gethostname()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert_eq!(c.greeting, format!("220 {host} ESMTP"));
    c.ehlo("client.example");
    open_data(&mut c, "a@client.example", &["b@dest.example"]);
    c.send(b"default store\r\n.\r\n");
    assert!(c.reply().starts_with("250"));
    let files = list_dir(&dir.path().join("ringmx-data/maildir/new"));
    assert_eq!(files.len(), 1, "{files:?}");
}

#[test]
fn restart_on_the_same_port_right_after_shutdown() {
    let mut server = Server::start(&[]);
    let addr = server.addr.to_string();
    // Leave connections the server closed itself (they sit in TIME_WAIT on its side).
    for _ in 0..3 {
        let mut c = server.connect();
        c.expect("QUIT", 221);
        assert!(c.closed());
    }
    server.signal(15);
    assert!(server
        .wait_exit(Duration::from_secs(10))
        .expect("exits")
        .success());
    let dir = tempfile::tempdir().unwrap();
    let store = format!("maildir:{}", dir.path().join("m").display());
    let mut child = std::process::Command::new(crate::common::BIN)
        .args([
            "serve",
            "--listen",
            &addr,
            "--workers",
            "1",
            "--store",
            &store,
            "--hostname",
            HOSTNAME,
        ])
        .current_dir(dir.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let up = loop {
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            break Err(format!("exited with {st}: {err}"));
        }
        if TcpStream::connect(&addr).is_ok() {
            break Ok(());
        }
        if Instant::now() > deadline {
            break Err("no listener within 15 s".to_string());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let greeting = up
        .as_ref()
        .ok()
        .map(|_| Client::connect(addr.parse().unwrap()).greeting);
    let _ = child.kill();
    let _ = child.wait();
    up.unwrap_or_else(|e| panic!("restart on {addr} failed: {e}"));
    assert!(greeting.unwrap().starts_with("220"));
}

/// SIGHUP asks a daemon to reload; ringmx has nothing to reload, so it says so in its log and
/// goes on: a session open at the time finishes its transaction, new clients are served, and
/// SIGTERM still shuts down cleanly. (The signal's default action would end the process at once,
/// every session dropped without a 421.)
#[test]
fn sighup_is_logged_and_the_server_keeps_serving() {
    let mut server = Server::start(&[]);
    let mut open = server.connect();
    open.ehlo("client.example");
    open.expect("MAIL FROM:<a@client.example>", 250);
    server.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !server.log_text().contains("SIGHUP received and ignored") {
        assert!(
            Instant::now() < deadline,
            "no log line for SIGHUP: {}",
            server.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    open.expect("RCPT TO:<b@dest.example>", 250);
    open.expect("DATA", 354);
    open.send(b"Subject: after SIGHUP\r\n\r\nstill here\r\n.\r\n");
    assert!(
        open.reply().starts_with("250"),
        "the open session's message"
    );
    let reply = lettre_send(
        server.addr,
        "c@client.example",
        &["d@dest.example"],
        b"Subject: new session\r\n\r\nhello\r\n",
    );
    assert!(reply.contains("queued as"), "{reply}");
    assert_eq!(server.new_files().len(), 2);
    // A second SIGHUP changes nothing either; SIGTERM then shuts down as usual.
    server.signal(libc::SIGHUP);
    open.expect("NOOP", 250);
    server.signal(libc::SIGTERM);
    let st = server
        .wait_exit(Duration::from_secs(10))
        .expect("exits after SIGTERM");
    assert!(st.success(), "exit status {st}");
}

#[test]
fn sigterm_with_no_sessions_exits_0_promptly() {
    let mut server = Server::start(&[]);
    let t = Instant::now();
    server.signal(15);
    let st = server.wait_exit(Duration::from_secs(10)).expect("exits");
    assert!(st.success(), "exit status {st}");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?} with nothing to wait for",
        t.elapsed()
    );
}

#[test]
fn fifty_messages_pipelined_in_one_write() {
    let server = Server::start(&["--workers", "1"]);
    let mut c = server.connect();
    c.ehlo("client.example");
    let mut wire = Vec::new();
    for i in 0..50 {
        wire.extend_from_slice(
            format!("MAIL FROM:<s{i}@client.example>\r\nRCPT TO:<r{i}@dest.example>\r\nDATA\r\n")
                .as_bytes(),
        );
        wire.extend_from_slice(format!("Subject: {i}\r\n\r\n.message {i}\r\n.\r\n").as_bytes());
    }
    wire.extend_from_slice(b"QUIT\r\nNOOP\r\n");
    c.send(&wire);
    let mut qids = Vec::new();
    for i in 0..50 {
        for code in ["250", "250", "354", "250"] {
            let r = c.reply();
            assert!(
                r.starts_with(code),
                "message {i}: expected {code}, got {r:?}"
            );
            if code == "250" && r.contains("queued as") {
                qids.push(queue_id(&r));
            }
        }
    }
    // Nothing is answered after QUIT's 221.
    assert_eq!(c.read_to_close(), "221 2.0.0 Bye\r\n");
    let files = server.new_files();
    assert_eq!(files.len(), 50);
    for f in files {
        let st = parse_stored(&std::fs::read(f).unwrap());
        let i: usize = st.return_path[1..]
            .split('@')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(st.envelope_to, vec![format!("r{i}@dest.example")]);
        assert_eq!(
            st.body,
            format!("Subject: {i}\r\n\r\nmessage {i}\r\n").as_bytes()
        );
        check_received(&st, "client.example", "[127.0.0.1]", "ESMTP", &qids[i]);
    }
}

#[test]
fn sigterm_under_load_loses_no_acknowledged_message() {
    let mut server = Server::start(&[]);
    let addr = server.addr;
    let stop_at = Instant::now() + Duration::from_secs(10);
    let threads: Vec<_> = (0..6)
        .map(|t| {
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                let Ok(stream) = TcpStream::connect(addr) else { return acked };
                stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let reader = std::io::BufReader::new(stream.try_clone().unwrap());
                let mut c = Client { reader, stream, greeting: String::new() };
                c.greeting = c.reply();
                c.send(b"EHLO load.example\r\n");
                if !c.reply().starts_with("250") {
                    return acked;
                }
                for i in 0..500 {
                    if Instant::now() > stop_at {
                        break;
                    }
                    // One write per message: MAIL, RCPT, DATA and the body pipelined.
                    let msg = format!(
                        "MAIL FROM:<t{t}@client.example>\r\nRCPT TO:<m{i}@dest.example>\r\nDATA\r\nthread {t} message {i}\r\n.\r\n"
                    );
                    if c.stream.write_all(msg.as_bytes()).is_err() {
                        break;
                    }
                    let replies: Vec<String> = (0..4).map(|_| c.reply_or_eof()).collect();
                    if replies[3].starts_with("250") {
                        acked.push((queue_id(&replies[3]), format!("thread {t} message {i}\r\n")));
                    } else {
                        break;
                    }
                }
                acked
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    server.signal(15);
    let acked: Vec<(String, String)> = threads
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let st = server.wait_exit(Duration::from_secs(15)).expect("exits");
    assert!(st.success(), "exit status {st}");
    assert!(
        !acked.is_empty(),
        "no message was acknowledged before SIGTERM"
    );
    let mut stored = std::collections::HashMap::new();
    for f in server.new_files() {
        let st = parse_stored(&std::fs::read(&f).unwrap());
        let qid = st.queue_id().to_string();
        let body = String::from_utf8(st.body).unwrap();
        assert!(
            body.starts_with("thread ") && body.ends_with("\r\n"),
            "partial file {f:?}: {body:?}"
        );
        stored.insert(qid, body);
    }
    for (qid, body) in &acked {
        assert_eq!(
            stored.get(qid),
            Some(body),
            "acknowledged message {qid} is not on disk as sent"
        );
    }
    assert_eq!(
        list_dir(&server.maildir().join("tmp")).len(),
        0,
        "no partial file left in tmp/"
    );
}

#[test]
fn store_failure_gets_451_leaves_nothing_and_the_session_goes_on() {
    let server = Server::start(&[]);
    let mut c = server.connect();
    c.ehlo("client.example");
    // new/ vanishes under the running server (an operator's mistake): the rename fails.
    std::fs::remove_dir(server.maildir().join("new")).unwrap();
    open_data(&mut c, "a@client.example", &["b@dest.example"]);
    c.send(b"lost\r\n.\r\n");
    let r = c.reply();
    assert!(r.starts_with("451 4.3.0"), "{r:?}");
    assert_eq!(
        list_dir(&server.maildir().join("tmp")).len(),
        0,
        "the tmp/ file must be unlinked"
    );
    c.expect("NOOP", 250);
}

#[test]
fn disk_full_gets_452_and_nothing_is_left_behind() {
    // A 256 KiB tmpfs as the Maildir; needs root (mount), skipped otherwise.
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(&mnt)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!(
            "skipping disk_full_gets_452_and_nothing_is_left_behind: cannot mount a tmpfs here"
        );
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let store = format!("maildir:{}", mnt.join("maildir").display());
    let server = Server::start(&["--store", &store]);
    let maildir = mnt.join("maildir");
    let mut c = server.connect();
    c.ehlo("client.example");
    open_data(&mut c, "a@client.example", &["b@dest.example"]);
    let line = format!("{}\r\n", "f".repeat(998));
    for _ in 0..400 {
        c.send(line.as_bytes());
    }
    c.send(b".\r\n");
    let r = c.reply();
    let sizes: Vec<u64> = list_dir(&maildir.join("new"))
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .collect();
    assert!(
        r.starts_with("452 4.3.1"),
        "a 400 KB message on a 256 KiB disk: expected 452 4.3.1, got {r:?}; sizes of the files in new/: {sizes:?}"
    );
    assert_eq!(list_dir(&maildir.join("new")).len(), 0);
    assert_eq!(
        list_dir(&maildir.join("tmp")).len(),
        0,
        "the partial tmp/ file must be unlinked"
    );
    // The space came back (the partial file is gone): a small message fits.
    open_data(&mut c, "a@client.example", &["b@dest.example"]);
    c.send(b"small\r\n.\r\n");
    let r = c.reply();
    assert!(r.starts_with("250"), "{r:?}");
    assert_eq!(list_dir(&maildir.join("new")).len(), 1);
    drop(c);
    drop(server);
}

/// A shared object that makes `syscall(SYS_io_uring_setup, ...)` fail with `errno`, standing in
/// for a container's seccomp profile or a kernel without io_uring. `None` without a C compiler.
fn io_uring_blocker(dir: &std::path::Path) -> Option<std::path::PathBuf> {
    let src = dir.join("block_uring.c");
    let so = dir.join("block_uring.so");
    std::fs::write(
        &src,
        r#"#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <sys/syscall.h>
long syscall(long n, ...) {
    va_list ap;
    va_start(ap, n);
    long a[6];
    for (int i = 0; i < 6; i++) a[i] = va_arg(ap, long);
    va_end(ap);
    if (n == SYS_io_uring_setup) {
        errno = atoi(getenv("BLOCK_URING_ERRNO"));
        return -1;
    }
    static long (*real)(long, ...);
    if (!real) real = (long (*)(long, ...))dlsym(RTLD_NEXT, "syscall");
    return real(n, a[0], a[1], a[2], a[3], a[4], a[5]);
}
"#,
    )
    .unwrap();
    let ok = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&so)
        .arg(&src)
        .arg("-ldl")
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some(so)
}

#[test]
fn io_uring_forbidden_or_missing_is_one_line_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let Some(so) = io_uring_blocker(dir.path()) else {
        eprintln!("skipping io_uring_forbidden_or_missing_is_one_line_and_exit_1: no C compiler");
        return;
    };
    let listen = format!("127.0.0.1:{}", crate::common::free_port());
    let store = format!("maildir:{}", dir.path().join("m").display());
    for (errno, words) in [
        (libc::EPERM, ["io_uring", "seccomp"]),
        (libc::ENOSYS, ["io_uring", "kernel"]),
    ] {
        let mut child = std::process::Command::new(crate::common::BIN)
            .args(["serve", "--listen", &listen, "--store", &store])
            .env("LD_PRELOAD", &so)
            .env("BLOCK_URING_ERRNO", errno.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!all.contains("panicked"), "errno {errno}: {all}");
        assert_eq!(out.status.code(), Some(1), "errno {errno}: {all}");
        assert!(
            all.lines()
                .any(|l| words.iter().all(|w| l.to_lowercase().contains(w))),
            "errno {errno}: no one line names {words:?}: {all}"
        );
    }
}

/// Peak resident memory of a process in KiB (VmHWM).
fn peak_rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Sends a command line of `mib` MiB (no CRLF until the end) and a message of `mib` MiB over
/// the size limit; expects 500 5.5.6 and 552 5.3.4.
fn flood(c: &mut Client, mib: usize) {
    let chunk = vec![b'x'; 1 << 20];
    c.send(b"NOOP ");
    for _ in 0..mib {
        c.send(&chunk);
    }
    c.send(b"\r\n");
    let r = c.reply();
    assert!(r.starts_with("500 5.5.6"), "{r:?}");
    open_data(c, "a@client.example", &["b@dest.example"]);
    let mut line = vec![b'y'; (1 << 20) - 2];
    line.extend_from_slice(b"\r\n");
    for _ in 0..mib {
        c.send(&line);
    }
    c.send(b".\r\n");
    let r = c.reply();
    assert!(r.starts_with("552 5.3.4"), "{r:?}");
}

#[test]
fn floods_are_read_and_dropped_in_bounded_memory() {
    // A command line without CRLF and DATA over the size limit are read and dropped: after a
    // warm-up (which touches the receive buffer pool once), 128 MiB more must not raise the
    // server's peak memory.
    let server = Server::start(&["--max-message-size", "1000", "--workers", "1"]);
    let mut c = server.connect();
    c.ehlo("client.example");
    // Over twice a worker's receive buffer pool (512 or 1024 x 16 KiB): every buffer was used.
    flood(&mut c, 32);
    let before = peak_rss_kib(server.pid());
    flood(&mut c, 64);
    c.expect("NOOP", 250);
    let grown_kib = peak_rss_kib(server.pid()).saturating_sub(before);
    assert!(
        grown_kib < 8 * 1024,
        "peak RSS grew by {grown_kib} KiB while 128 MiB more were dropped"
    );
}

#[test]
fn message_size_limit_is_exact() {
    // RFC 1870: the size counts the message with its CRLFs, without dot-stuffing; ringmx's body
    // runs up to and including the CRLF before the final dot.
    let server = Server::start(&["--max-message-size", "1000"]);
    let mut c = server.connect();
    c.ehlo("client.example");
    // 1000 bytes after unstuffing, 1001 on the wire (a stuffed dot).
    let exact = format!(".{}\r\n", "a".repeat(997));
    assert_eq!(exact.len(), 1000);
    open_data(&mut c, "a@client.example", &["b@dest.example"]);
    c.send(format!(".{exact}.\r\n").as_bytes());
    let r = c.reply();
    assert!(
        r.starts_with("250"),
        "a 1000-byte message under a 1000-byte limit: {r:?}"
    );
    open_data(&mut c, "a@client.example", &["b@dest.example"]);
    c.send(format!("b{exact}.\r\n").as_bytes());
    let r = c.reply();
    assert!(r.starts_with("552 5.3.4"), "a 1001-byte message: {r:?}");
    assert_eq!(parse_stored(&only_file(&server)).body, exact.as_bytes());
}

#[test]
fn three_hundred_concurrent_connections_are_all_served() {
    let server = Server::start(&["--max-connections-per-ip", "1000"]);
    let mut clients: Vec<Client> = (0..300).map(|_| server.connect()).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        assert!(
            c.greeting.starts_with("220"),
            "client {i}: {:?}",
            c.greeting
        );
        c.send(b"EHLO many.example\r\nMAIL FROM:<a@client.example>\r\n");
    }
    for (i, c) in clients.iter_mut().enumerate() {
        assert!(c.reply().starts_with("250"), "client {i}");
        assert!(c.reply().starts_with("250"), "client {i}");
        c.send(
            format!("RCPT TO:<r{i}@dest.example>\r\nDATA\r\nmessage {i}\r\n.\r\nQUIT\r\n")
                .as_bytes(),
        );
    }
    for (i, c) in clients.iter_mut().enumerate() {
        for code in ["250", "354", "250", "221"] {
            let r = c.reply();
            assert!(
                r.starts_with(code),
                "client {i}: expected {code}, got {r:?}"
            );
        }
    }
    assert_eq!(server.new_files().len(), 300);
}

#[test]
fn command_lines_may_end_in_a_bare_lf() {
    // Documented leniency (src/protocol/mod.rs): a bare LF ends a command line; only message
    // data must use CRLF.
    let server = Server::start(&[]);
    let mut c = server.connect();
    c.send(b"EHLO lf.example\nMAIL FROM:<a@client.example>\nRCPT TO:<b@dest.example>\nDATA\n");
    for code in ["250", "250", "250", "354"] {
        let r = c.reply();
        assert!(r.starts_with(code), "expected {code}, got {r:?}");
    }
    c.send(b"crlf data\r\n.\r\n");
    assert!(c.reply().starts_with("250"));
    assert_eq!(parse_stored(&only_file(&server)).body, b"crlf data\r\n");
}

#[test]
fn a_client_that_half_closes_still_gets_every_reply() {
    // `printf '...' | nc -N host port` sends a whole session, then shuts its side down: every
    // command is still answered, the message stored, and the server closes after QUIT.
    let server = Server::start(&[]);
    for quit in [true, false] {
        let mut c = server.connect();
        let mut script = b"EHLO pipe.example\r\nMAIL FROM:<a@client.example>\r\nRCPT TO:<b@dest.example>\r\nDATA\r\nhalf-closed\r\n.\r\n".to_vec();
        if quit {
            script.extend_from_slice(b"QUIT\r\n");
        }
        c.send(&script);
        c.stream.shutdown(std::net::Shutdown::Write).unwrap();
        let all = c.read_to_close();
        let codes: Vec<&str> = all
            .lines()
            .filter(|l| l.as_bytes().get(3) != Some(&b'-'))
            .map(|l| &l[..3])
            .collect();
        let want: &[&str] = if quit {
            &["250", "250", "250", "354", "250", "221"]
        } else {
            &["250", "250", "250", "354", "250"]
        };
        assert_eq!(codes, want, "quit={quit}: {all:?}");
    }
    assert_eq!(server.new_files().len(), 2);
}

/// Open descriptors of a process.
fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn sessions_leave_no_descriptors_behind() {
    let server = Server::start(&["--workers", "1"]);
    let before = fd_count(server.pid());
    for i in 0..200 {
        let mut c = server.connect();
        match i % 4 {
            // A whole transaction, then QUIT.
            0 => {
                c.ehlo("fd.example");
                open_data(&mut c, "a@client.example", &["b@dest.example"]);
                c.send(b"x\r\n.\r\n");
                assert!(c.reply().starts_with("250"));
                c.expect("QUIT", 221);
                assert!(c.closed());
            }
            // Gone in the middle of DATA.
            1 => {
                c.ehlo("fd.example");
                open_data(&mut c, "a@client.example", &["b@dest.example"]);
                c.send(b"cut");
            }
            // Reset by the peer.
            2 => {
                socket2::SockRef::from(&c.stream)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
            }
            // Connect and leave.
            _ => {}
        }
    }
    // Closing is asynchronous: give the worker a moment to reap the last ones.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut now = fd_count(server.pid());
    while now > before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        now = fd_count(server.pid());
    }
    assert!(
        now <= before,
        "descriptors: {before} before 200 sessions, {now} after"
    );
    assert_eq!(server.new_files().len(), 50);
    assert_eq!(list_dir(&server.maildir().join("tmp")).len(), 0);
}

#[test]
fn max_session_time_ends_even_a_busy_session() {
    // A client that never goes idle (a NOOP every 300 ms) is still cut off at the session limit.
    let server = Server::start(&["--max-session-time", "1", "--idle-timeout", "30"]);
    let mut c = server.connect();
    c.ehlo("client.example");
    let start = Instant::now();
    let end = loop {
        std::thread::sleep(Duration::from_millis(300));
        let r = c.cmd("NOOP");
        if !r.starts_with("250") {
            break r;
        }
        assert!(
            start.elapsed() < Duration::from_secs(6),
            "still served after 6 s"
        );
    };
    assert_eq!(
        end,
        format!("421 4.4.2 {HOSTNAME} Error: session time limit exceeded")
    );
    assert!(c.closed());
    assert!(
        start.elapsed() >= Duration::from_millis(600),
        "cut off too early: {:?}",
        start.elapsed()
    );
}

/// The `INFO` lines of one event (`message`, `recipient`, `session end`) in a server's log.
fn log_lines<'a>(log: &'a str, event: &str) -> Vec<&'a str> {
    let tag = format!(" INFO {event} ");
    log.lines().filter(|l| l.contains(&tag)).collect()
}

/// A refused recipient gets a line of its own (a transaction whose recipients were all refused
/// has no message line), the 452s past `--max-recipients` one line a transaction, and the
/// session end says in which phase a client vanished.
#[test]
fn refused_recipients_and_the_phase_of_a_lost_session_are_logged() {
    let mut server = Server::start(&["--accept-domain", "example.com", "--max-recipients", "2"]);
    let mut c = server.connect();
    c.expect(&format!("EHLO {HELO}"), 250);
    c.expect("MAIL FROM:<alice@example.org>", 250);
    c.expect("RCPT TO:<bob@elsewhere.example>", 550);
    c.expect("RCPT TO:<a@example.com>", 250);
    c.expect("RCPT TO:<b@example.com>", 250);
    c.expect("RCPT TO:<c@example.com>", 452);
    c.expect("RCPT TO:<d@example.com>", 452);
    c.expect("DATA", 354);
    c.send(b"Subject: two of four\r\n\r\nhello\r\n.\r\n");
    assert!(c.reply().starts_with("250"));
    c.expect("QUIT", 221);
    let mut lost = server.connect();
    lost.expect(&format!("EHLO {HELO}"), 250);
    open_data(&mut lost, "mallory@example.org", &["a@example.com"]);
    lost.send(b"Subject: cut off\r\n\r\nhalf a li");
    drop(lost);
    std::thread::sleep(Duration::from_millis(200));
    server.signal(libc::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(10)).is_some());
    let log = server.log_text();
    let refused = log_lines(&log, "recipient");
    assert_eq!(refused.len(), 2, "{log}");
    assert!(
        refused[0].ends_with(
            "client=127.0.0.1 from=alice@example.org to=bob@elsewhere.example \
             result=\"rejected: domain not accepted here (--accept-domain)\""
        ),
        "{}",
        refused[0]
    );
    assert!(
        refused[1].contains(" from=alice@example.org to=c@example.com ")
            && refused[1].contains("rejected: too many recipients"),
        "{}",
        refused[1]
    );
    let ends = log_lines(&log, "session end");
    // The harness's readiness probe, ours, the lost one (in any order of workers).
    assert_eq!(ends.len(), 3, "{log}");
    assert_eq!(
        ends.iter()
            .filter(|l| l.ends_with("phase=\"data\" result=\"peer closed\""))
            .count(),
        1,
        "{log}"
    );
    assert!(
        ends.iter().any(|l| l.contains(" messages=1 ")
            && l.ends_with("phase=\"ready\" result=\"closed\"")),
        "{log}"
    );
}

/// Operators read one line per transaction, accepted or refused, with the same event name and
/// fields (queue id where there is one, client, sender, recipients, size, result), and one line
/// per session end.
#[test]
fn every_transaction_and_session_end_gets_one_log_line_with_the_same_fields() {
    let mut server = Server::start(&["--max-message-size", "10000"]);
    let mut c = server.connect();
    c.expect(&format!("EHLO {HELO}"), 250);
    open_data(&mut c, "alice@example.org", &["bob@example.com"]);
    c.send(b"Subject: ok\r\n\r\nhello\r\n.\r\n");
    let qid = queue_id(&c.reply());
    open_data(
        &mut c,
        "mallory@example.org",
        &["bob@example.com", "carol@example.com"],
    );
    c.send(b"Subject: smuggle\r\n\r\nbare\n.\nline\r\n.\r\n");
    assert!(c.reply().starts_with("550 5.6.11"));
    c.expect("MAIL FROM:<big@example.org> SIZE=20000", 552);
    c.expect("QUIT", 221);
    assert!(c.closed());
    server.signal(libc::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(10)).is_some());
    let log = server.log_text();
    let lines = log_lines(&log, "message");
    assert_eq!(lines.len(), 3, "one line per transaction:\n{log}");
    let stored = format!(
        "queue_id={qid} client=127.0.0.1 from=alice@example.org to=[\"bob@example.com\"] \
         size=22 result=\"stored\""
    );
    assert!(lines[0].ends_with(&stored), "{}", lines[0]);
    assert!(
        lines[1].ends_with(
            "client=127.0.0.1 from=mallory@example.org \
             to=[\"bob@example.com\", \"carol@example.com\"] size=33 \
             result=\"rejected: bare CR or LF in message\""
        ),
        "{}",
        lines[1]
    );
    assert!(
        lines[2].ends_with(
            "client=127.0.0.1 from=big@example.org to=[] size=20000 \
             result=\"rejected: declared SIZE over the limit\""
        ),
        "{}",
        lines[2]
    );
    // Two sessions: the harness's readiness probe (it waits for a greeting), then ours.
    let ends = log_lines(&log, "session end");
    assert_eq!(ends.len(), 2, "{log}");
    assert!(
        ends[1].contains("client=127.0.0.1 ")
            && ends[1].contains(" messages=1 rejected=2 ")
            && ends[1].ends_with("result=\"closed\""),
        "{}",
        ends[1]
    );
}

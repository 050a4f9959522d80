//! A real MTA as the client: a private Postfix instance relays mail to the real `ringmx` binary.
//!
//! Postfix's SMTP client is much of what an inbound MX hears. It pipelines MAIL, the RCPTs and
//! DATA in one write, sends 8-bit bodies with BODY=8BITMIME, asks for SMTPUTF8 when an address
//! needs it, splits long recipient lists into transactions of 50, reads SIZE from the EHLO reply,
//! and retries later the recipients that got a 4xx. The test submits mail with Postfix's
//! `sendmail` into an instance of its own (`postfix -c DIR start`, `relayhost` = ringmx, nothing
//! else of the system's mail service) and checks what Postfix logged against what ringmx stored
//! and logged.
//!
//! Needs root and the Debian package `postfix` (`.ci/run` installs it). Where either is missing
//! the test prints SKIP and passes.

use crate::common::{parse_stored, queue_id, Server, Stored, HOSTNAME};
use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Postfix's own name: it must differ from ringmx's, or Postfix reports a mail loop.
const RELAY_NAME: &str = "relay.test.example";
/// ringmx's recipient limit in the test: under Postfix's 50 per transaction, so that Postfix
/// gets 452s and has to come back for the rest.
const MAX_RECIPIENTS: usize = 40;
const MAX_MESSAGE_SIZE: usize = 1_000_000;

/// The output of a command, or why it could not run.
fn output(cmd: &mut Command) -> Result<String, String> {
    let o = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "{cmd:?}: {}: {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// Why a private Postfix cannot run here, if it cannot.
fn postfix_missing() -> Option<String> {
    if let Err(e) = output(Command::new("postconf").args(["-h", "mail_version"])) {
        return Some(format!("Postfix is not installed ({e})"));
    }
    // /proc/self belongs to the process's effective user.
    if std::fs::metadata("/proc/self").map(|m| m.uid()).ok() != Some(0) {
        return Some("postfix start needs root".into());
    }
    None
}

/// A private Postfix instance in a directory of its own, stopped on drop.
struct Postfix {
    dir: tempfile::TempDir,
}

impl Postfix {
    fn start(relay_to: std::net::SocketAddr) -> Postfix {
        let dir = tempfile::tempdir().unwrap();
        // Postfix's daemons run as the user postfix and must get into the directory.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let d = dir.path().display();
        std::fs::create_dir(dir.path().join("queue")).unwrap();
        std::fs::create_dir(dir.path().join("data")).unwrap();
        output(
            Command::new("chown")
                .arg("postfix")
                .arg(dir.path().join("data")),
        )
        .unwrap_or_else(|e| panic!("the user postfix, made by the package: {e}"));
        let main_cf = format!(
            "compatibility_level = 3.6
queue_directory = {d}/queue
data_directory = {d}/data
maillog_file = {d}/maillog
maillog_file_prefixes = {d}
syslog_name = postfix-ringmx-test
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = loopback-only
inet_protocols = ipv4
myhostname = {RELAY_NAME}
mydestination =
alias_maps =
alias_database =
local_recipient_maps =
biff = no
relayhost = [{ip}]:{port}
default_transport = smtp
smtp_tls_security_level = none
smtp_dns_support_level = disabled
smtp_destination_recipient_limit = 50
smtputf8_enable = yes
message_size_limit = 10485760
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 1s
",
            ip = relay_to.ip(),
            port = relay_to.port(),
        );
        // Only the services that taking mail from sendmail and relaying it need.
        let master_cf = "\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
showq     unix  n       -       n       -       -       showq
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
";
        std::fs::write(dir.path().join("main.cf"), main_cf).unwrap();
        std::fs::write(dir.path().join("master.cf"), master_cf).unwrap();
        let pf = Postfix { dir };
        output(
            Command::new("postfix")
                .arg("-c")
                .arg(pf.dir.path())
                .arg("start"),
        )
        .unwrap_or_else(|e| panic!("private Postfix did not start: {e}"));
        pf
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Submits one message as `sendmail -i` does (a line with a lone dot is just a line), with
    /// `options` before the recipients.
    fn sendmail(&self, from: &str, options: &[&str], to: &[String], message: &[u8]) {
        let mut child = Command::new("sendmail")
            .arg("-C")
            .arg(self.path())
            .args(["-i", "-f", from])
            .args(options)
            .args(to)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("Postfix's sendmail");
        child.stdin.take().unwrap().write_all(message).unwrap();
        let o = child.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "sendmail -f {from}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    fn queue_is_empty(&self) -> bool {
        output(
            Command::new("postqueue")
                .arg("-c")
                .arg(self.path())
                .arg("-j"),
        )
        .map(|s| s.is_empty())
        .unwrap_or(false)
    }

    /// Asks Postfix to try every queued message now.
    fn flush(&self) {
        let _ = output(
            Command::new("postqueue")
                .arg("-c")
                .arg(self.path())
                .arg("-f"),
        );
    }

    fn maillog(&self) -> String {
        std::fs::read_to_string(self.path().join("maillog")).unwrap_or_default()
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = Command::new("postfix")
            .arg("-c")
            .arg(self.path())
            .arg("stop")
            .output();
    }
}

/// A message as `sendmail` takes it: LF line ends, a Subject to find it by.
fn message(subject: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let mut m = format!("Subject: {subject}\n{headers}\n").into_bytes();
    m.extend_from_slice(body);
    m
}

/// What the body must look like in the stored file: every LF a CRLF.
fn crlf(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / 32);
    for &b in body {
        if b == b'\n' {
            out.push(b'\r');
        }
        out.push(b);
    }
    out
}

/// A stored message's header block (after ringmx's trace lines) and its body.
fn header_and_body(stored: &Stored) -> (String, &[u8]) {
    let m = &stored.body;
    let end = m
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header block");
    (
        String::from_utf8_lossy(&m[..end]).into_owned(),
        &m[end + 4..],
    )
}

fn body_of(stored: &Stored) -> &[u8] {
    header_and_body(stored).1
}

fn header_has(stored: &Stored, line: &str) -> bool {
    header_and_body(stored).0.split("\r\n").any(|l| l == line)
}

/// Postfix's delivery lines (`to=<...>, relay=..., status=...`), by status.
fn deliveries<'a>(maillog: &'a str, status: &str) -> Vec<&'a str> {
    let tag = format!(" status={status} ");
    maillog
        .lines()
        .filter(|l| l.contains(" to=<") && l.contains(&tag))
        .collect()
}

#[test]
fn postfix_relays_to_ringmx_and_every_acknowledged_message_is_stored() {
    if let Some(why) = postfix_missing() {
        println!("SKIP postfix_relays_to_ringmx_and_every_acknowledged_message_is_stored: {why}");
        return;
    }
    let server = Server::start(&[
        "--max-recipients",
        &MAX_RECIPIENTS.to_string(),
        "--max-message-size",
        &MAX_MESSAGE_SIZE.to_string(),
    ]);
    let postfix = Postfix::start(server.addr);

    let alice = "alice@example.org".to_string();
    let bob = "bob@example.com".to_string();
    // Lines that dot-stuffing must carry through both ends.
    let dots = b"hello\n.\n..\n.leading dot\n...three\nend\n".to_vec();
    // UTF-8 and a Latin-1 byte: 8BITMIME passes octets, whatever their charset.
    let eight_bit = b"Gr\xc3\xbc\xc3\x9fe \xe2\x98\x83\ncaf\xe9\n".to_vec();
    // Over the size at which ringmx writes a body to disk while it arrives.
    let mut large = Vec::new();
    for i in 0..6_000 {
        let lead = if i % 7 == 0 { "." } else { "" };
        large.extend_from_slice(format!("{lead}line {i:05} {}\n", "x".repeat(60)).as_bytes());
    }
    assert!(large.len() > 300_000 && large.len() < MAX_MESSAGE_SIZE / 2);
    let many: Vec<String> = (0..150).map(|i| format!("r{i:03}@example.com")).collect();
    let oversize = [&[b'y'; 76][..], b"\n"]
        .concat()
        .repeat(MAX_MESSAGE_SIZE / 70);

    postfix.sendmail(
        &alice,
        &[],
        std::slice::from_ref(&bob),
        &message("dots", "", &dots),
    );
    // Declared 8-bit, so Postfix sends BODY=8BITMIME (and would convert the body to 7 bits for a
    // server that did not offer 8BITMIME).
    postfix.sendmail(
        &alice,
        &["-B", "8BITMIME"],
        &[bob.clone(), "carol@example.com".into()],
        &message(
            "8bit",
            "MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n\
             Content-Transfer-Encoding: 8bit\n",
            &eight_bit,
        ),
    );
    postfix.sendmail(
        "j\u{f6}rg@example.org",
        &[],
        &["m\u{fc}ller@example.com".into()],
        &message("utf8", "", b"hi\n"),
    );
    postfix.sendmail(
        &alice,
        &[],
        std::slice::from_ref(&bob),
        &message("large", "", &large),
    );
    postfix.sendmail(&alice, &[], &many, &message("many", "", b"to many\n"));
    postfix.sendmail(
        &alice,
        &[],
        std::slice::from_ref(&bob),
        &message("oversize", "", &oversize),
    );

    // Done when Postfix holds nothing more: every recipient sent or bounced, including the
    // recipients ringmx put off with 452 and the bounce of the oversized message to alice.
    // Postfix retries deferred mail on its own after the 1 s backoff, but a message its queue
    // manager finds still locked by a delivery in progress is put back for 60 s; a flush now
    // and then (`postqueue -f`, which ignores those waits) keeps the test short.
    let start = Instant::now();
    let mut flushed = start;
    let settled =
        || postfix.queue_is_empty() && !deliveries(&postfix.maillog(), "bounced").is_empty();
    while !settled() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "Postfix still holds mail after 60 s.\nmaillog:\n{}\nringmx:\n{}",
            postfix.maillog(),
            server.log_text()
        );
        if flushed.elapsed() > Duration::from_secs(3) {
            postfix.flush();
            flushed = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let maillog = postfix.maillog();
    let sent = deliveries(&maillog, "sent");
    let ids: BTreeSet<String> = sent.iter().map(|l| queue_id(l)).collect();
    // A worker may hold its log lines for up to a timer tick (250 ms) after its replies.
    let stored_line = |log: &str, id: &str| {
        let tag = format!("queue_id={id} ");
        log.lines()
            .any(|l| l.contains(&tag) && l.contains("result=\"stored\""))
    };
    let log_deadline = Instant::now() + Duration::from_secs(5);
    let mut log = server.log_text();
    while !ids.iter().all(|id| stored_line(&log, id)) && Instant::now() < log_deadline {
        std::thread::sleep(Duration::from_millis(50));
        log = server.log_text();
    }
    let context = format!("maillog:\n{maillog}\nringmx log:\n{log}");

    // Postfix's view: every recipient sent except the oversized message's, which bounced with
    // ringmx's 5.3.4; the only deferrals are the 452s past --max-recipients.
    let bounced = deliveries(&maillog, "bounced");
    let deferred = deliveries(&maillog, "deferred");
    // dots 1, 8bit 2, utf8 1, large 1, many 150, and the bounce notice to alice 1.
    assert_eq!(sent.len(), 156, "{context}");
    assert_eq!(bounced.len(), 1, "{context}");
    assert!(bounced[0].contains("dsn=5.3.4"), "{context}");
    assert!(!deferred.is_empty(), "no 452 reached Postfix\n{context}");
    assert!(
        deferred.iter().all(|l| l.contains("dsn=4.5.3")),
        "{context}"
    );
    assert!(
        log.contains("result=\"rejected: too many recipients"),
        "{context}"
    );

    // Every 250 Postfix saw is one file in new/ with that queue id, and one stored line.
    let files: Vec<PathBuf> = server.new_files();
    let mut by_id: HashMap<String, Stored> = HashMap::new();
    for f in &files {
        let stored = parse_stored(&std::fs::read(f).unwrap());
        let id = stored.queue_id().to_string();
        assert!(
            stored.received.contains(&format!("by {HOSTNAME} ")),
            "{}",
            stored.received
        );
        assert!(by_id.insert(id, stored).is_none(), "two files, one id");
    }
    assert_eq!(ids.len(), by_id.len(), "{context}");
    for id in &ids {
        assert!(by_id.contains_key(id), "no file for {id}\n{context}");
        assert!(stored_line(&log, id), "no stored line for {id}\n{context}");
    }

    let with_subject = |s: &str| -> Vec<&Stored> {
        let line = format!("Subject: {s}");
        by_id.values().filter(|m| header_has(m, &line)).collect()
    };
    let one = |s: &str| -> &Stored {
        let v = with_subject(s);
        assert_eq!(v.len(), 1, "messages with Subject: {s}\n{context}");
        v[0]
    };

    assert_eq!(body_of(one("dots")), crlf(&dots).as_slice());
    let m = one("8bit");
    assert_eq!(body_of(m), crlf(&eight_bit).as_slice());
    assert_eq!(m.envelope_to, vec![bob.clone(), "carol@example.com".into()]);
    let m = one("utf8");
    assert_eq!(m.return_path, "j\u{f6}rg@example.org");
    assert_eq!(m.envelope_to, vec!["m\u{fc}ller@example.com".to_string()]);
    assert!(m.received.contains(" with UTF8SMTP "), "{}", m.received);
    assert_eq!(body_of(one("large")), crlf(&large).as_slice());

    // 150 recipients in transactions of at most 40, each recipient exactly once.
    let parts = with_subject("many");
    assert!(parts.iter().all(|m| m.envelope_to.len() <= MAX_RECIPIENTS));
    let mut got: Vec<&String> = parts.iter().flat_map(|m| &m.envelope_to).collect();
    got.sort();
    let mut want: Vec<&String> = many.iter().collect();
    want.sort();
    assert_eq!(got, want, "{context}");

    // The oversized message was not stored; its bounce notice was, from the null sender.
    assert!(with_subject("oversize").is_empty(), "{context}");
    let notices: Vec<&Stored> = by_id
        .values()
        .filter(|m| m.return_path.is_empty())
        .collect();
    assert_eq!(notices.len(), 1, "{context}");
    assert_eq!(notices[0].envelope_to, vec![alice.clone()]);
    assert!(
        String::from_utf8_lossy(&notices[0].body).contains("5.3.4"),
        "{context}"
    );
}

//! Maildir: names, header block, directory set-up. The I/O of a commit is planned here and
//! performed by the worker through the ring (see `store` module docs); `commit_blocking` is the
//! same sequence with std::fs, kept as the reference behaviour for tests.
//!
//! Layout: DIR/tmp, DIR/new, DIR/cur (cur/ belongs to mail readers; we only create it). A message
//! is written to tmp/NAME, fsync'd, renamed to new/NAME and new/ is fsync'd; only then is it
//! acknowledged. (With `--batch-syncfs` one syncfs of the file system per batch takes the place of
//! the per-file fsyncs, still before any rename.) So a file in new/ is always complete, and a file
//! in tmp/ was never acknowledged.
//!
//! Names follow the Maildir convention `<secs>.M<usecs>P<pid>Q<counter>W<worker>.<host>`:
//! the pid and the time separate restarts, W separates workers sharing the directory, and the
//! per-store counter separates one worker's messages within a microsecond.
//!
//! Leftovers in tmp/ at start-up (`Maildir::recover`, called once by the server before any worker
//! opens the directory): a ringmx crash leaves half-written files there that no client was ever
//! told were stored; the client saw no 250 and will retry. They are deleted and counted in the
//! log. To stay safe when another program (or another ringmx) delivers into the same Maildir,
//! only files that are ours and orphaned are deleted: names in our convention whose process is
//! gone (or is this very process, which has not written anything yet, e.g. pid 1 in a
//! container), plus anything older than 36 hours, the age after which the Maildir convention lets
//! any program clean tmp/. One exception: a tmp/ entry that is the very file delivered under the
//! same name in new/ or cur/ with a link count of one (a crash on ext4 without a journal can
//! leave the rename's new entry on disk and not the removal of the old one) is left alone with a
//! warning, since unlinking it would free the delivered message.
use std::ffi::{CStr, CString, OsStr};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::{epoch_parts, queue_id, StoreError};
use crate::protocol::Envelope;

/// One message ready to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// Unique across workers and restarts; used in Received: and in the 250 reply.
    pub queue_id: String,
    /// Absolute path in tmp/.
    pub tmp_path: CString,
    /// Absolute path in new/.
    pub new_path: CString,
    /// Return-Path, X-Envelope-To lines, Received: header; each line CRLF-terminated.
    pub header: Vec<u8>,
    /// The file name shared by `tmp_path` and `new_path`.
    pub name: String,
}

/// One worker's handle on a Maildir. Several workers may hold one on the same directory.
#[derive(Debug)]
pub struct Maildir {
    dir: PathBuf,
    tmp_dir: PathBuf,
    new_dir_c: CString,
    new_dir: File,
    /// Our host name, as in the greeting: goes into Received: `by`.
    hostname: String,
    /// The host name as it may appear in a file name (no '/' or ':').
    name_host: String,
    worker: usize,
    pid: u32,
    counter: u64,
}

/// tmp/ files older than this may be deleted by anyone (Maildir convention).
const TMP_ORPHAN_AGE: Duration = Duration::from_secs(36 * 3600);

/// The three subdirectories, created if missing.
fn create_dirs(dir: &Path) -> Result<(), StoreError> {
    for d in [
        dir.to_path_buf(),
        dir.join("tmp"),
        dir.join("new"),
        dir.join("cur"),
    ] {
        std::fs::create_dir_all(&d).map_err(|source| StoreError::Create {
            dir: d.clone(),
            source,
        })?;
        // create_dir_all is happy when the path exists; make sure it is a directory.
        match std::fs::metadata(&d) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(StoreError::Create {
                    dir: d,
                    source: std::io::Error::from_raw_os_error(libc::ENOTDIR),
                })
            }
            Err(source) => return Err(StoreError::Create { dir: d, source }),
        }
    }
    Ok(())
}

fn path_cstring(p: &Path) -> Result<CString, StoreError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| StoreError::Create {
        dir: p.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains a NUL byte"),
    })
}

/// The process id embedded in one of our file names, if `name` follows our convention.
fn pid_of_name(name: &str) -> Option<u32> {
    let (secs, rest) = name.split_once(".M")?;
    if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (_usecs, rest) = rest.split_once('P')?;
    let (pid, rest) = rest.split_once('Q')?;
    rest.split_once('W')?;
    pid.parse().ok()
}

fn process_alive(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    if raw <= 0 {
        return false;
    }
    // Signal 0 only checks; EPERM means it exists but belongs to someone else.
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), None) {
        Ok(()) => true,
        Err(e) => e != nix::errno::Errno::ESRCH,
    }
}

/// Names delivered to new/ or cur/, with their paths.
type Delivered = std::collections::HashMap<std::ffi::OsString, PathBuf>;

/// Every name delivered to new/ or cur/ (there without the `:2,FLAGS` a reader appends), with
/// its path.
fn delivered_names(dir: &Path) -> std::io::Result<Delivered> {
    let mut names = std::collections::HashMap::new();
    for sub in ["new", "cur"] {
        for entry in std::fs::read_dir(dir.join(sub))? {
            let entry = entry?;
            let name = entry.file_name();
            let base = match name.as_bytes().iter().position(|&b| b == b':') {
                Some(i) => OsStr::from_bytes(&name.as_bytes()[..i]).to_os_string(),
                None => name,
            };
            names.insert(base, entry.path());
        }
    }
    Ok(names)
}

/// Whether unlinking an orphaned tmp/ file leaves the message delivered under the same name
/// (`delivered`, if any) intact. A message is renamed from tmp/ to new/; after a crash, ext4
/// without a journal can come back with both directory entries on disk but the inode's link
/// count still one (the new/ entry was synced, the removal from tmp/ was not). Unlinking the
/// tmp/ entry would then free the inode under the delivered message, which may have been
/// acknowledged. A separate file, or a real second link, is safe to unlink.
fn orphan_safe_to_unlink(tmp: &std::fs::Metadata, delivered: Option<&std::fs::Metadata>) -> bool {
    use std::os::unix::fs::MetadataExt;
    delivered.is_none_or(|d| (d.dev(), d.ino()) != (tmp.dev(), tmp.ino()) || tmp.nlink() >= 2)
}

impl Maildir {
    /// Creates DIR/{tmp,new,cur} if needed and deletes orphaned files in tmp/ (see the module
    /// docs for which). Call once per process, before any worker opens the directory: a worker
    /// running `recover` would race with the others' writes. Returns how many files it deleted.
    pub fn recover(dir: impl AsRef<Path>) -> Result<usize, StoreError> {
        let dir = dir.as_ref();
        create_dirs(dir)?;
        let tmp = dir.join("tmp");
        let recover_err = |source| StoreError::Recover {
            dir: tmp.clone(),
            source,
        };
        let me = std::process::id();
        let now = SystemTime::now();
        let (mut deleted, mut kept) = (0usize, 0usize);
        // Names delivered to new/ or cur/, read only if some tmp/ file is to be deleted.
        let mut delivered: Option<Delivered> = None;
        for entry in std::fs::read_dir(&tmp).map_err(recover_err)? {
            let entry = entry.map_err(recover_err)?;
            let Ok(meta) = entry.metadata() else { continue }; // gone meanwhile
            if !meta.is_file() {
                continue;
            }
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let ours_and_orphaned = name.starts_with(PROBE_PREFIX)
                || pid_of_name(&name).is_some_and(|pid| pid == me || !process_alive(pid));
            let old = meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .is_some_and(|age| age > TMP_ORPHAN_AGE);
            if ours_and_orphaned || old {
                let delivered = match &mut delivered {
                    Some(d) => d,
                    None => delivered.insert(delivered_names(dir).map_err(recover_err)?),
                };
                let copy = delivered.get(entry.file_name().as_os_str());
                let copy_meta = copy.and_then(|p| std::fs::symlink_metadata(p).ok());
                if !orphan_safe_to_unlink(&meta, copy_meta.as_ref()) {
                    tracing::warn!(
                        file = %entry.path().display(),
                        delivered = %copy.map(|p| p.display().to_string()).unwrap_or_default(),
                        "left a file in tmp/ that is the delivered message itself with a link \
                         count of one (the file system was not cleanly unmounted); deleting it \
                         would free the delivered copy. Check the file system (e2fsck)"
                    );
                    kept += 1;
                    continue;
                }
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => deleted += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(recover_err(e)),
                }
            } else {
                kept += 1;
            }
        }
        if deleted > 0 {
            tracing::warn!(
                dir = %tmp.display(),
                deleted,
                "deleted partial messages left in tmp/ by an earlier crash (never acknowledged; senders retry)"
            );
        }
        if kept > 0 {
            tracing::info!(dir = %tmp.display(), kept, "left files in tmp/ that a running program may still be writing");
        }
        Ok(deleted)
    }

    /// Opens the Maildir for worker `worker_index`: creates the directories if needed, checks
    /// that tmp/ takes new files and opens new/ for the directory fsync. `hostname` goes into
    /// Received: and the file names. Does not touch leftovers (see `recover`).
    pub fn open(
        dir: impl AsRef<Path>,
        worker_index: usize,
        hostname: &str,
    ) -> Result<Maildir, StoreError> {
        let dir = dir.as_ref();
        create_dirs(dir)?;
        let dir = std::fs::canonicalize(dir).map_err(|source| StoreError::Create {
            dir: dir.to_path_buf(),
            source,
        })?;
        let tmp_dir = dir.join("tmp");
        let new_path = dir.join("new");
        let pid = std::process::id();

        // Permissions are checked now, not at the first message: an unwritable store must stop
        // start-up with one clear line rather than answer 451 to every client.
        let probe = tmp_dir.join(format!("{PROBE_PREFIX}{pid}-{worker_index}"));
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&probe)
            .map_err(|source| StoreError::NotWritable {
                dir: tmp_dir.clone(),
                source,
            })?;
        std::fs::remove_file(&probe).map_err(|source| StoreError::NotWritable {
            dir: tmp_dir.clone(),
            source,
        })?;

        let new_dir = File::open(&new_path).map_err(|source| StoreError::NotWritable {
            dir: new_path.clone(),
            source,
        })?;
        let new_dir_c = path_cstring(&new_path)?;
        path_cstring(&tmp_dir)?;

        Ok(Maildir {
            dir,
            tmp_dir,
            new_dir_c,
            new_dir,
            hostname: hostname.to_string(),
            name_host: name_host(hostname),
            worker: worker_index,
            pid,
            counter: 0,
        })
    }

    /// The Maildir's root, absolute.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Absolute path of new/, for a worker that opens it itself for the directory fsync.
    pub fn new_dir_path(&self) -> &CStr {
        &self.new_dir_c
    }

    /// new/, opened read-only at `open`: fsync it once per batch after the renames. Valid as
    /// long as this `Maildir` lives.
    pub fn new_dir_fd(&self) -> BorrowedFd<'_> {
        self.new_dir.as_fd()
    }

    /// Plans one message with this envelope: a fresh name and queue id and the header block to
    /// write before its body. Never fails and never touches the file system.
    pub fn prepare(&mut self, envelope: &Envelope, now: SystemTime) -> Prepared {
        let (secs, usecs) = epoch_parts(now);
        let counter = self.counter;
        self.counter += 1;
        let name = format!(
            "{secs}.M{usecs}P{}Q{counter}W{}.{}",
            self.pid, self.worker, self.name_host
        );
        let qid = queue_id(secs, usecs, self.pid, self.worker, counter);
        let header = header_block(envelope, &self.hostname, &qid, now);
        let join = |d: &Path| {
            let p = d.join(&name);
            // Both directory paths were checked for NUL bytes at open, and the name is built
            // from digits and the sanitized host name, which has none either.
            CString::new(p.into_os_string().into_vec()).expect("maildir path without NUL")
        };
        Prepared {
            tmp_path: join(&self.tmp_dir),
            new_path: join(Path::new(OsStr::from_bytes(self.new_dir_c.as_bytes()))),
            queue_id: qid,
            header,
            name,
        }
    }

    /// The commit sequence with blocking std::fs calls: write tmp/ (O_EXCL), fsync, rename into
    /// new/, fsync new/. On failure the tmp file is removed. The worker does the same through
    /// the ring and batches the directory fsync; this is the reference behaviour for tests.
    pub fn commit_blocking(&self, p: &Prepared, body: &[u8]) -> std::io::Result<()> {
        let tmp = Path::new(OsStr::from_bytes(p.tmp_path.as_bytes()));
        let new = Path::new(OsStr::from_bytes(p.new_path.as_bytes()));
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(tmp)?;
            f.write_all(&p.header)?;
            f.write_all(body)?;
            f.sync_all()?;
            drop(f);
            std::fs::rename(tmp, new)?;
            self.new_dir.sync_all()
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(tmp);
        }
        result
    }
}

const PROBE_PREFIX: &str = ".ringmx-probe-";

/// The host name as the Maildir convention wants it in a file name: '/' and ':' escaped as
/// octal, since '/' separates paths and ':' starts the flags of a message in cur/.
fn name_host(hostname: &str) -> String {
    let mut out = String::with_capacity(hostname.len());
    for c in hostname.chars() {
        match c {
            '/' => out.push_str("\\057"),
            ':' => out.push_str("\\072"),
            c if c.is_ascii_graphic() => out.push(c),
            _ => out.push('_'),
        }
    }
    if out.is_empty() {
        out.push_str("localhost");
    }
    out
}

/// Longest HELO text copied into Received: (a domain name is at most 255 octets).
pub const HELO_CHARS_MAX: usize = 255;
/// Longest address copied into Return-Path/X-Envelope-To; well beyond RFC 5321's 256-octet
/// path, and it keeps every header line under RFC 5322's 998 characters.
pub const ADDRESS_CHARS_MAX: usize = 900;

/// The client's HELO text made safe for the Received: header. The session passes it on as
/// sent, so a client could try CR/LF (a header of its own), or parentheses and ';' (a fake
/// comment or date). ASCII letters and digits, '-', '.', '_', ':', '[' and ']' (address
/// literals) stay, and with `utf8` (an SMTPUTF8 transaction, RFC 6532 headers) letters and
/// digits of any script too; everything else becomes '?'. Empty becomes "unknown".
pub fn sanitize_helo(helo: &str, utf8: bool) -> String {
    let out: String = helo
        .chars()
        .take(HELO_CHARS_MAX)
        .map(|c| {
            if ((c.is_ascii() || utf8) && c.is_alphanumeric()) || "-._:[]".contains(c) {
                c
            } else {
                '?'
            }
        })
        .collect();
    if out.is_empty() {
        "unknown".into()
    } else {
        out
    }
}

/// An envelope address made safe for a header line: control characters (CR, LF, NUL, DEL, ...)
/// become '?', and so does anything non-ASCII unless `utf8` (SMTPUTF8); length is bounded. The
/// parser should never let such characters through; this is the second fence, since a CRLF
/// here would let a client forge headers in the stored file.
pub fn sanitize_address(addr: &str, utf8: bool) -> String {
    addr.chars()
        .take(ADDRESS_CHARS_MAX)
        .map(|c| {
            if c.is_control() || !(c.is_ascii() || utf8) {
                '?'
            } else {
                c
            }
        })
        .collect()
}

/// The address of a peer as an RFC 5321 address literal: `[192.0.2.1]`, `[IPv6:2001:db8::1]`.
/// An IPv4 client on a dual-stack socket shows as its IPv4 address.
fn address_literal(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => format!("[{v4}]"),
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => format!("[{v4}]"),
            None => format!("[IPv6:{v6}]"),
        },
    }
}

/// The header block stored before the message: `Return-Path`, one `X-Envelope-To` per
/// recipient, and the trace header of RFC 5321 section 4.4:
///
/// ```text
/// Received: from <helo> ([<ip>])
///     by <hostname> with ESMTP id <queue id>
///     for <rcpt>; <RFC 5322 date>
/// ```
/// Each continuation line starts with CRLF TAB (folding white space).
/// The `for` clause appears only with exactly one recipient (several would reveal the other
/// recipients to each). The protocol is SMTP after HELO, ESMTP after EHLO and UTF8SMTP when the
/// transaction used SMTPUTF8 (RFC 6531 section 3.7.3).
pub fn header_block(env: &Envelope, hostname: &str, queue_id: &str, now: SystemTime) -> Vec<u8> {
    let utf8 = env.smtputf8;
    let mut h = String::with_capacity(256 + 64 * env.rcpt_to.len());
    h.push_str("Return-Path: <");
    h.push_str(&sanitize_address(&env.mail_from, utf8));
    h.push_str(">\r\n");
    for r in &env.rcpt_to {
        h.push_str("X-Envelope-To: <");
        h.push_str(&sanitize_address(r, utf8));
        h.push_str(">\r\n");
    }
    let with = if env.smtputf8 {
        "UTF8SMTP"
    } else if env.esmtp {
        "ESMTP"
    } else {
        "SMTP"
    };
    let date = rfc5322_date(epoch_parts(now).0);
    h.push_str(&format!(
        "Received: from {} ({})\r\n\tby {} with {with} id {queue_id}",
        sanitize_helo(&env.helo, utf8),
        address_literal(env.peer.ip()),
        hostname,
    ));
    match env.rcpt_to.as_slice() {
        [one] => h.push_str(&format!(
            "\r\n\tfor <{}>; {date}\r\n",
            sanitize_address(one, utf8)
        )),
        _ => h.push_str(&format!(";\r\n\t{date}\r\n")),
    }
    h.into_bytes()
}

/// An RFC 5322 date-time in UTC: `Tue, 14 Nov 2023 22:13:20 +0000`.
pub fn rfc5322_date(secs_since_epoch: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = secs_since_epoch / 86_400;
    let rem = secs_since_epoch % 86_400;
    // u64::MAX / 86400 fits in i64 with room to spare.
    let (year, month, day) = crate::date::civil_from_days(days as i64);
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} +0000",
        DAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Message;
    use std::collections::HashSet;
    use std::time::UNIX_EPOCH;

    fn at(secs: u64, usecs: u32) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(u64::from(usecs))
    }

    fn envelope(rcpts: &[&str]) -> Envelope {
        Envelope {
            helo: "client.example".into(),
            esmtp: true,
            peer: "192.0.2.7:40000".parse().unwrap(),
            mail_from: "alice@example.org".into(),
            rcpt_to: rcpts.iter().map(|s| s.to_string()).collect(),
            body_8bitmime: false,
            smtputf8: false,
        }
    }

    fn message(rcpts: &[&str]) -> Message {
        Message {
            envelope: envelope(rcpts),
            body: b"Subject: hi\r\n\r\nhello\r\n".to_vec(),
            size: 22,
        }
    }

    #[test]
    fn dates_match_known_values() {
        // Values cross-checked with `date -u -d @N`.
        assert_eq!(rfc5322_date(0), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(rfc5322_date(86_399), "Thu, 01 Jan 1970 23:59:59 +0000");
        assert_eq!(rfc5322_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 +0000");
        assert_eq!(
            rfc5322_date(1_700_000_000),
            "Tue, 14 Nov 2023 22:13:20 +0000"
        );
        assert_eq!(
            rfc5322_date(1_709_251_199),
            "Thu, 29 Feb 2024 23:59:59 +0000"
        );
        assert_eq!(
            rfc5322_date(4_102_444_800),
            "Fri, 01 Jan 2100 00:00:00 +0000"
        );
        // Absurd clocks must not panic.
        assert!(rfc5322_date(u64::MAX).ends_with("+0000"));
    }

    #[test]
    fn header_block_one_recipient_golden() {
        let h = header_block(
            &envelope(&["bob@test.example"]),
            "mx.test.example",
            "QID1",
            at(1_700_000_000, 0),
        );
        assert_eq!(
            String::from_utf8(h).unwrap(),
            "Return-Path: <alice@example.org>\r\n\
             X-Envelope-To: <bob@test.example>\r\n\
             Received: from client.example ([192.0.2.7])\r\n\
             \tby mx.test.example with ESMTP id QID1\r\n\
             \tfor <bob@test.example>; Tue, 14 Nov 2023 22:13:20 +0000\r\n"
        );
    }

    #[test]
    fn header_block_several_recipients_null_sender_helo_golden() {
        let mut env = envelope(&["a@test.example", "b@test.example"]);
        env.mail_from = String::new();
        env.esmtp = false;
        env.peer = "[2001:db8::25]:25".parse().unwrap();
        let h = header_block(&env, "mx.test.example", "QID2", at(0, 0));
        assert_eq!(
            String::from_utf8(h).unwrap(),
            "Return-Path: <>\r\n\
             X-Envelope-To: <a@test.example>\r\n\
             X-Envelope-To: <b@test.example>\r\n\
             Received: from client.example ([IPv6:2001:db8::25])\r\n\
             \tby mx.test.example with SMTP id QID2;\r\n\
             \tThu, 01 Jan 1970 00:00:00 +0000\r\n"
        );
    }

    #[test]
    fn header_block_says_utf8smtp_and_unmaps_ipv4_in_ipv6() {
        let mut env = envelope(&["bob@test.example"]);
        env.smtputf8 = true;
        env.peer = "[::ffff:192.0.2.9]:1".parse().unwrap();
        let h = String::from_utf8(header_block(&env, "mx", "Q", at(0, 0))).unwrap();
        assert!(
            h.contains("from client.example ([192.0.2.9])\r\n\tby mx with UTF8SMTP id Q\r\n"),
            "{h}"
        );
    }

    #[test]
    fn hostile_helo_and_addresses_cannot_add_header_lines() {
        let mut env = envelope(&["bob@test.example\r\nBcc: x@y"]);
        env.helo = "evil\r\nX-Injected: 1 (fake) ; date".into();
        env.mail_from = "a@b\nX-Also: 1\0".into();
        let h = String::from_utf8(header_block(&env, "mx", "Q", at(0, 0))).unwrap();
        // Every CRLF in the block is one of ours: a header start or a fold (CRLF TAB).
        let lines: Vec<&str> = h.split("\r\n").collect();
        let starts: Vec<&str> = lines
            .iter()
            .filter(|l| !l.is_empty() && !l.starts_with('\t'))
            .copied()
            .collect();
        assert_eq!(starts.len(), 3, "{h}");
        for l in &starts {
            assert!(
                ["Return-Path: ", "X-Envelope-To: ", "Received: "]
                    .iter()
                    .any(|p| l.starts_with(p)),
                "unexpected header line {l:?}"
            );
        }
        assert!(!h.contains('\n') || h.matches('\n').count() == h.matches("\r\n").count());
        assert!(!h.contains('\0'));
        assert!(
            h.contains("from evil??X-Injected:?1??fake????date ("),
            "{h}"
        );
        assert!(h.contains("Return-Path: <a@b?X-Also: 1?>\r\n"), "{h}");
    }

    #[test]
    fn sanitize_helo_keeps_domains_and_literals_and_bounds_length() {
        assert_eq!(sanitize_helo("mail.example.com", false), "mail.example.com");
        assert_eq!(sanitize_helo("[192.0.2.1]", false), "[192.0.2.1]");
        assert_eq!(
            sanitize_helo("[IPv6:2001:db8::1]", false),
            "[IPv6:2001:db8::1]"
        );
        assert_eq!(sanitize_helo("bücher.example", true), "bücher.example");
        // Without SMTPUTF8 the stored headers stay ASCII (RFC 5322).
        assert_eq!(sanitize_helo("bücher.example", false), "b?cher.example");
        assert_eq!(
            sanitize_address("jörg@bücher.example", false),
            "j?rg@b?cher.example"
        );
        assert_eq!(
            sanitize_address("jörg@bücher.example", true),
            "jörg@bücher.example"
        );
        assert_eq!(sanitize_helo("", false), "unknown");
        assert_eq!(sanitize_helo("a b\tc", true), "a?b?c");
        assert_eq!(
            sanitize_helo(&"x".repeat(10_000), false).chars().count(),
            HELO_CHARS_MAX
        );
        assert_eq!(
            sanitize_address(&"y".repeat(10_000), true).chars().count(),
            ADDRESS_CHARS_MAX
        );
    }

    #[test]
    fn names_and_queue_ids_never_collide_within_a_worker_or_across_workers() {
        let dir = tempfile::tempdir().unwrap();
        let mut w0 = Maildir::open(dir.path(), 0, "mx.test.example").unwrap();
        let mut w1 = Maildir::open(dir.path(), 1, "mx.test.example").unwrap();
        let now = at(1_700_000_000, 123);
        let msg = message(&["bob@test.example"]);
        let mut names = HashSet::new();
        let mut ids = HashSet::new();
        for _ in 0..1000 {
            for m in [&mut w0, &mut w1] {
                let p = m.prepare(&msg.envelope, now); // same instant on purpose
                assert!(names.insert(p.name.clone()), "duplicate name {}", p.name);
                assert!(
                    ids.insert(p.queue_id.clone()),
                    "duplicate id {}",
                    p.queue_id
                );
            }
        }
        let p = w1.prepare(&msg.envelope, now);
        let pid = std::process::id();
        assert_eq!(
            p.name,
            format!("1700000000.M123P{pid}Q1000W1.mx.test.example")
        );
        assert_eq!(pid_of_name(&p.name), Some(pid));
        let root = std::fs::canonicalize(dir.path()).unwrap();
        assert_eq!(
            p.tmp_path.to_str().unwrap(),
            root.join("tmp").join(&p.name).to_str().unwrap()
        );
        assert_eq!(
            p.new_path.to_str().unwrap(),
            root.join("new").join(&p.name).to_str().unwrap()
        );
        assert!(String::from_utf8(p.header)
            .unwrap()
            .contains(&format!(" id {}\r\n", p.queue_id)));
    }

    #[test]
    fn name_host_escapes_slash_and_colon() {
        assert_eq!(name_host("a/b:c"), "a\\057b\\072c");
        assert_eq!(name_host(""), "localhost");
    }

    #[test]
    fn commit_blocking_writes_header_then_body_into_new_and_leaves_tmp_empty() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Maildir::open(dir.path().join("md"), 3, "mx").unwrap();
        for sub in ["tmp", "new", "cur"] {
            assert!(dir.path().join("md").join(sub).is_dir());
        }
        let msg = message(&["bob@test.example"]);
        let p = m.prepare(&msg.envelope, SystemTime::now());
        m.commit_blocking(&p, &msg.body).unwrap();
        let stored = std::fs::read(dir.path().join("md/new").join(&p.name)).unwrap();
        let mut expect = p.header.clone();
        expect.extend_from_slice(&msg.body);
        assert_eq!(stored, expect);
        assert_eq!(
            std::fs::read_dir(dir.path().join("md/tmp"))
                .unwrap()
                .count(),
            0
        );
        // Committing the same plan twice must fail (O_EXCL) rather than overwrite.
        std::fs::write(dir.path().join("md/tmp").join(&p.name), b"partial").unwrap();
        assert!(m.commit_blocking(&p, &msg.body).is_err());
    }

    #[test]
    fn commit_blocking_failure_removes_the_tmp_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Maildir::open(dir.path(), 0, "mx").unwrap();
        let msg = message(&["bob@test.example"]);
        let p = m.prepare(&msg.envelope, SystemTime::now());
        // A directory where the file should land makes the rename fail after the write.
        std::fs::create_dir(dir.path().join("new").join(&p.name)).unwrap();
        std::fs::write(dir.path().join("new").join(&p.name).join("x"), b"x").unwrap();
        assert!(m.commit_blocking(&p, &msg.body).is_err());
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }

    #[test]
    fn open_fails_with_one_line_naming_the_directory_when_a_file_is_in_the_way() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("md");
        std::fs::write(&root, b"not a dir").unwrap();
        let e = Maildir::open(&root, 0, "mx").unwrap_err().to_string();
        assert!(e.contains(&root.display().to_string()), "{e}");
        assert!(!e.contains('\n'));

        // A file where tmp/ should be.
        let root2 = dir.path().join("md2");
        std::fs::create_dir(&root2).unwrap();
        std::fs::write(root2.join("tmp"), b"").unwrap();
        let e = Maildir::open(&root2, 0, "mx").unwrap_err().to_string();
        assert!(e.contains(&root2.join("tmp").display().to_string()), "{e}");
        assert!(Maildir::recover(&root2).is_err());
    }

    #[test]
    fn recover_deletes_orphans_of_ringmx_and_keeps_files_of_live_writers() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        create_dirs(root).unwrap();
        let tmp = root.join("tmp");
        let me = std::process::id();
        // A pid that is surely not running: above the kernel's pid_max limit of 2^22.
        let dead = 4_194_304 + 17;
        let orphan_dead = format!("1700000000.M1P{dead}Q0W0.mx");
        let orphan_self = format!("1700000000.M2P{me}Q5W1.mx"); // e.g. pid 1 in a container
        let foreign_live = "1700000000.123_456.otherhost".to_string(); // someone else's, fresh
        let live_ringmx = "1700000000.M3P1Q0W0.mx".to_string(); // pid 1 is always alive
        for n in [&orphan_dead, &orphan_self, &foreign_live, &live_ringmx] {
            std::fs::write(tmp.join(n), b"partial").unwrap();
        }
        std::fs::create_dir(tmp.join("subdir")).unwrap();
        std::fs::write(root.join("new/done"), b"complete").unwrap();
        let deleted = Maildir::recover(root).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(&tmp)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        let mut want = vec![foreign_live, "subdir".to_string()];
        if me != 1 {
            want.push(live_ringmx);
        }
        want.sort();
        assert_eq!(left, want);
        assert_eq!(deleted, if me == 1 { 3 } else { 2 });
        assert!(root.join("new/done").exists(), "new/ is never touched");
        assert_eq!(Maildir::recover(root).unwrap(), 0);
    }

    #[test]
    fn recover_unlinks_a_tmp_name_of_a_delivered_message_only_when_that_keeps_the_message() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        create_dirs(root).unwrap();
        let dead = 4_194_304 + 17;
        // Renamed into new/ (a reader then moved one on to cur/), but the tmp/ entries are still
        // there, as after a crash before their removal reached the disk. Here they are real
        // second links, so unlinking them keeps the messages.
        let in_new = format!("1700000000.M1P{dead}Q0W0.mx");
        let in_cur = format!("1700000000.M1P{dead}Q1W0.mx");
        std::fs::write(root.join("new").join(&in_new), b"delivered 1").unwrap();
        std::fs::write(
            root.join("cur").join(format!("{in_cur}:2,S")),
            b"delivered 2",
        )
        .unwrap();
        std::fs::hard_link(
            root.join("new").join(&in_new),
            root.join("tmp").join(&in_new),
        )
        .unwrap();
        std::fs::hard_link(
            root.join("cur").join(format!("{in_cur}:2,S")),
            root.join("tmp").join(&in_cur),
        )
        .unwrap();
        // A separate, partial copy under a delivered name is not the delivered file.
        let other = format!("1700000000.M1P{dead}Q2W0.mx");
        std::fs::write(root.join("new").join(&other), b"delivered 3").unwrap();
        std::fs::write(root.join("tmp").join(&other), b"partial").unwrap();
        let names = delivered_names(root).unwrap();
        assert_eq!(
            names.get(OsStr::new(&in_new)),
            Some(&root.join("new").join(&in_new))
        );
        assert_eq!(
            names.get(OsStr::new(&in_cur)),
            Some(&root.join("cur").join(format!("{in_cur}:2,S"))),
            "a reader's flags are not part of the name"
        );
        assert_eq!(Maildir::recover(root).unwrap(), 3);
        assert_eq!(std::fs::read_dir(root.join("tmp")).unwrap().count(), 0);
        assert_eq!(
            std::fs::read(root.join("new").join(&in_new)).unwrap(),
            b"delivered 1"
        );
        assert_eq!(
            std::fs::read(root.join("cur").join(format!("{in_cur}:2,S"))).unwrap(),
            b"delivered 2"
        );
        assert_eq!(
            std::fs::read(root.join("new").join(&other)).unwrap(),
            b"delivered 3"
        );

        // The crash case itself (two entries, one link) cannot be made on a sound file system;
        // the decision is checked on metadata: a lone file and a second link may go, the
        // delivered file's only link may not.
        let a = root.join("new/a");
        std::fs::write(&a, b"x").unwrap();
        let b = root.join("new/b");
        std::fs::write(&b, b"y").unwrap();
        let (ma, mb) = (
            std::fs::metadata(&a).unwrap(),
            std::fs::metadata(&b).unwrap(),
        );
        assert!(orphan_safe_to_unlink(&ma, None));
        assert!(orphan_safe_to_unlink(&ma, Some(&mb)));
        assert!(
            !orphan_safe_to_unlink(&ma, Some(&ma)),
            "one inode, one link"
        );
        std::fs::hard_link(&a, root.join("new/a2")).unwrap();
        let ma2 = std::fs::metadata(&a).unwrap();
        assert!(
            orphan_safe_to_unlink(&ma2, Some(&ma2)),
            "a real second link"
        );
    }

    #[test]
    fn recover_deletes_anything_older_than_36_hours() {
        let dir = tempfile::tempdir().unwrap();
        create_dirs(dir.path()).unwrap();
        let f = dir.path().join("tmp/ancient.foreign");
        std::fs::write(&f, b"x").unwrap();
        let old = SystemTime::now() - Duration::from_secs(37 * 3600);
        File::options()
            .write(true)
            .open(&f)
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert_eq!(Maildir::recover(dir.path()).unwrap(), 1);
        assert!(!f.exists());
    }

    #[test]
    fn recover_creates_missing_directories() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("a/b/maildir");
        assert_eq!(Maildir::recover(&root).unwrap(), 0);
        assert!(
            root.join("tmp").is_dir() && root.join("new").is_dir() && root.join("cur").is_dir()
        );
    }

    proptest::proptest! {
        /// Whatever the client sent as HELO, MAIL FROM and RCPT TO, the header block is exactly
        /// our header lines: each CRLF starts a known header or a fold, no bare CR or LF, no
        /// line over RFC 5322's 998 characters.
        #[test]
        fn header_block_is_well_formed_for_any_envelope(
            helo in "\\PC{0,300}|[\\x00-\\x7f]{0,300}",
            from in "\\PC{0,1200}|[\\x00-\\x7f]{0,300}",
            rcpts in proptest::collection::vec("\\PC{0,300}|[\\x00-\\x7f]{0,300}", 1..4),
            esmtp: bool,
            smtputf8: bool,
            secs in 0u64..10_000_000_000,
        ) {
            let env = Envelope {
                helo,
                esmtp,
                peer: "192.0.2.7:40000".parse().unwrap(),
                mail_from: from,
                rcpt_to: rcpts.clone(),
                body_8bitmime: false,
                smtputf8,
            };
            let h = String::from_utf8(header_block(&env, "mx.test.example", "QID", at(secs, 0))).unwrap();
            proptest::prop_assert!(h.ends_with("\r\n"));
            let body = &h[..h.len() - 2];
            let lines: Vec<&str> = body.split("\r\n").collect();
            let mut headers = Vec::new();
            for l in &lines {
                proptest::prop_assert!(!l.contains('\r') && !l.contains('\n'), "bare CR/LF in {:?}", l);
                proptest::prop_assert!(l.chars().count() <= 998);
                if !l.starts_with('\t') {
                    headers.push(l.split_once(": ").map(|(name, _)| name).unwrap_or(l));
                }
            }
            let mut want = vec!["Return-Path"];
            want.extend(std::iter::repeat_n("X-Envelope-To", rcpts.len()));
            want.push("Received");
            proptest::prop_assert_eq!(headers, want);
            proptest::prop_assert!(h.contains(" id QID"));
            if !smtputf8 {
                proptest::prop_assert!(h.is_ascii(), "non-ASCII header without SMTPUTF8");
            }
        }
    }

    #[test]
    fn pid_of_name_only_reads_our_convention() {
        assert_eq!(pid_of_name("1700000000.M12P345Q6W7.host"), Some(345));
        assert_eq!(pid_of_name("1700000000.12345.host"), None);
        assert_eq!(pid_of_name("x.M1P2Q3W4.h"), None);
        assert_eq!(pid_of_name(".ringmx-probe-1-0"), None);
    }
}

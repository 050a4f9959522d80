//! Spawning the real `ringmx` binary on a free loopback port with its own Maildir.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_ringmx");
pub const HOSTNAME: &str = "mx.test.example";

/// A free TCP port on 127.0.0.1 (the listener is dropped, so a race is possible but rare).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `ringmx serve`, killed on drop.
pub struct Server {
    pub child: Option<Child>,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub log: PathBuf,
}

impl Server {
    /// Starts `ringmx serve --listen 127.0.0.1:PORT --hostname mx.test.example --workers 2
    /// --store maildir:DIR/maildir` plus `extra` (later flags win for repeatable-free flags; pass
    /// `--store` yourself to override the store), and waits until it greets.
    pub fn start(extra: &[&str]) -> Server {
        Server::try_start(extra).unwrap_or_else(|e| panic!("server did not start: {e}"))
    }

    pub fn try_start(extra: &[&str]) -> Result<Server, String> {
        let dir = tempfile::tempdir().unwrap();
        Server::start_in(dir, extra)
    }

    /// Like `start`, reusing a directory (restart on the same Maildir).
    pub fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> Result<Server, String> {
        Server::spawn(dir, extra, None)
    }

    /// Like `try_start`, with the limit on open files (soft and hard) set to `nofile` for the
    /// server (through util-linux's `prlimit`, which sets it and then executes the server in
    /// its own place, so `pid()` is still the server's).
    pub fn try_start_with_fd_limit(extra: &[&str], nofile: u64) -> Result<Server, String> {
        Server::spawn(tempfile::tempdir().unwrap(), extra, Some(nofile))
    }

    fn spawn(
        dir: tempfile::TempDir,
        extra: &[&str],
        nofile: Option<u64>,
    ) -> Result<Server, String> {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let log = dir.path().join(format!("server-{port}.log"));
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--listen".into(),
            addr.to_string(),
            "--hostname".into(),
            HOSTNAME.into(),
        ];
        if !extra.contains(&"--workers") {
            args.extend(["--workers".into(), "2".into()]);
        }
        if !extra.contains(&"--store") {
            args.push("--store".into());
            args.push(format!("maildir:{}", dir.path().join("maildir").display()));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let logf = std::fs::File::create(&log).unwrap();
        let mut cmd = match nofile {
            None => Command::new(BIN),
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg(BIN);
                c
            }
        };
        let child = cmd
            .args(&args)
            .current_dir(dir.path())
            .env(
                "RUST_LOG",
                std::env::var("RINGMX_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .map_err(|e| format!("spawn {BIN}: {e}"))?;
        let mut server = Server {
            child: Some(child),
            addr,
            dir,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = server.child.as_mut().unwrap().try_wait().unwrap() {
                server.child = None;
                return Err(format!("exited with {status}: {}", server.log_text()));
            }
            if let Ok(mut s) = TcpStream::connect(addr) {
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                if extra.contains(&"--proxy-protocol") {
                    // The greeting waits for the load balancer's header.
                    let _ = s.write_all(b"PROXY UNKNOWN\r\n");
                }
                let mut buf = [0u8; 512];
                if let Ok(n) = s.read(&mut buf) {
                    if n > 0 && buf.starts_with(b"220") {
                        let _ = s.write_all(b"QUIT\r\n");
                        return Ok(server);
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(format!("no greeting within 15s: {}", server.log_text()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn maildir(&self) -> PathBuf {
        self.dir.path().join("maildir")
    }

    /// Files in DIR/maildir/new, sorted by name.
    pub fn new_files(&self) -> Vec<PathBuf> {
        list_dir(&self.maildir().join("new"))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("server running").id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // kill(2) through nix (a dependency of the crate), so the tests need no `kill` binary
        // (procps is not on every fresh machine).
        let sig = nix::sys::signal::Signal::try_from(sig).expect("a valid signal number");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig)
            .expect("kill(2) the server");
    }

    /// Waits for the process to exit, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.as_mut()?.try_wait().unwrap() {
                self.child = None;
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process (SIGKILL) and hands back the directory for a restart.
    pub fn kill_keep_dir(mut self) -> tempfile::TempDir {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let tmp = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, tmp)
    }

    /// Connects a raw client and reads the greeting.
    pub fn connect(&self) -> Client {
        Client::connect(self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn list_dir(p: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = match std::fs::read_dir(p) {
        Ok(rd) => rd.map(|e| e.unwrap().path()).collect(),
        Err(_) => vec![],
    };
    v.sort();
    v
}

/// A raw-socket SMTP client for transcript-style tests.
pub struct Client {
    pub reader: BufReader<TcpStream>,
    pub stream: TcpStream,
    pub greeting: String,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        Client::connect_sending(addr, b"")
    }

    /// Connects, sends `first` before anything else (a load balancer's PROXY header), then
    /// reads the greeting.
    pub fn connect_sending(addr: SocketAddr, first: &[u8]) -> Client {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(first).unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        let mut c = Client {
            reader,
            stream,
            greeting: String::new(),
        };
        c.greeting = c.reply();
        c
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Reads one whole (possibly multi-line) reply; returns all its lines joined by "\n".
    /// Returns "" on EOF.
    pub fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => return all,
                Ok(_) => {}
                Err(e) => panic!("reading reply: {e} (so far: {all:?})"),
            }
            let done = line.len() < 4 || line.as_bytes()[3] != b'-';
            all.push_str(line.trim_end_matches(['\r', '\n']));
            if done {
                return all;
            }
            all.push('\n');
        }
    }

    /// Sends one command line (CRLF added) and returns the reply.
    pub fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply()
    }

    /// Sends a command and asserts the reply's code.
    pub fn expect(&mut self, line: &str, code: u16) -> String {
        let r = self.cmd(line);
        assert!(
            r.starts_with(&code.to_string()),
            "{line:?}: expected {code}, got {r:?}"
        );
        r
    }

    /// True when the server has closed the connection (EOF within the read timeout).
    pub fn closed(&mut self) -> bool {
        let mut buf = [0u8; 1];
        matches!(self.reader.read(&mut buf), Ok(0))
    }
}

/// Runs the binary with `args` (nothing else added), stdin closed, killing it if it is still
/// running after `timeout`. Returns (exit code, stdout, stderr); the code is `None` when the
/// process had to be killed or died from a signal.
pub fn run_bin(args: &[&str], cwd: &Path, timeout: Duration) -> (Option<i32>, String, String) {
    let out_path = cwd.join(format!("run-{}.out", std::process::id()));
    let err_path = cwd.join(format!("run-{}.err", std::process::id()));
    let mut child = Command::new(BIN)
        .args(args)
        .current_dir(cwd)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {BIN}: {e}"));
    let deadline = Instant::now() + timeout;
    let code = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = std::fs::read_to_string(&out_path).unwrap_or_default();
    let err = std::fs::read_to_string(&err_path).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    let _ = std::fs::remove_file(&err_path);
    (code, out, err)
}

impl Client {
    /// Reads until EOF (at most the read timeout) and returns everything received.
    pub fn read_to_close(&mut self) -> String {
        let mut all = Vec::new();
        let _ = self.reader.read_to_end(&mut all);
        String::from_utf8_lossy(&all).into_owned()
    }

    /// Like `reply`, but a read error (timeout, reset) gives "" like EOF instead of panicking;
    /// for clients that race with a server going away.
    pub fn reply_or_eof(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) | Err(_) => return all,
                Ok(_) => {}
            }
            let done = line.len() < 4 || line.as_bytes()[3] != b'-';
            all.push_str(line.trim_end_matches(['\r', '\n']));
            if done {
                return all;
            }
            all.push('\n');
        }
    }

    /// Sends EHLO and asserts the 250.
    pub fn ehlo(&mut self, name: &str) -> String {
        self.expect(&format!("EHLO {name}"), 250)
    }
}

/// One Maildir file split into the parts ringmx writes: the trace block, then the message.
#[derive(Debug)]
pub struct Stored {
    /// The address inside `Return-Path: <...>`.
    pub return_path: String,
    /// The addresses of the `X-Envelope-To: <...>` lines, in order.
    pub envelope_to: Vec<String>,
    /// The Received: header unfolded (continuation lines joined with one space), without the
    /// field name.
    pub received: String,
    /// Everything after the Received: header: the message exactly as stored.
    pub body: Vec<u8>,
}

impl Stored {
    /// The queue id in the Received: header (`... with ESMTP id <id> ...`).
    pub fn queue_id(&self) -> &str {
        self.received
            .split(" id ")
            .nth(1)
            .and_then(|s| s.split([' ', ';']).next())
            .unwrap_or_else(|| panic!("no id in Received: {}", self.received))
    }
}

/// The queue id after `queued as ` in a 250 reply (`250 2.0.0 Ok: queued as <id>`), or in a
/// line that quotes one (Postfix's log: `... (250 2.0.0 Ok: queued as <id>)`).
pub fn queue_id(reply: &str) -> String {
    let at = reply
        .find("queued as ")
        .unwrap_or_else(|| panic!("no 'queued as' in {reply:?}"));
    reply[at + "queued as ".len()..]
        .split(|c: char| c.is_whitespace() || c == ')')
        .next()
        .unwrap()
        .to_string()
}

/// Splits a stored file; panics with the file's start when it does not have the promised shape
/// (`Return-Path:` line, `X-Envelope-To:` lines, one folded `Received:` header, each CRLF-ended).
pub fn parse_stored(bytes: &[u8]) -> Stored {
    let show = || String::from_utf8_lossy(&bytes[..bytes.len().min(600)]).into_owned();
    let mut pos = 0;
    let next_line = |pos: &mut usize| -> &[u8] {
        let rest = &bytes[*pos..];
        let end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .unwrap_or_else(|| panic!("no CRLF: {}", show()));
        *pos += end + 2;
        &rest[..end]
    };
    let first = String::from_utf8_lossy(next_line(&mut pos)).into_owned();
    let return_path = first
        .strip_prefix("Return-Path: <")
        .and_then(|s| s.strip_suffix('>'))
        .unwrap_or_else(|| panic!("first line is not Return-Path: <...>: {}", show()))
        .to_string();
    let mut envelope_to = Vec::new();
    let mut line;
    loop {
        line = String::from_utf8_lossy(next_line(&mut pos)).into_owned();
        match line
            .strip_prefix("X-Envelope-To: <")
            .and_then(|s| s.strip_suffix('>'))
        {
            Some(a) => envelope_to.push(a.to_string()),
            None => break,
        }
    }
    let mut received = line
        .strip_prefix("Received: ")
        .unwrap_or_else(|| panic!("no Received: after the X-Envelope-To lines: {}", show()))
        .to_string();
    while pos < bytes.len() && (bytes[pos] == b' ' || bytes[pos] == b'\t') {
        let cont = String::from_utf8_lossy(next_line(&mut pos)).into_owned();
        received.push(' ');
        received.push_str(cont.trim_start());
    }
    Stored {
        return_path,
        envelope_to,
        received,
        body: bytes[pos..].to_vec(),
    }
}

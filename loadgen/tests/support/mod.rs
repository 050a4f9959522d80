//! Test fixtures: a tiny thread-per-connection SMTP server with knobs for misbehaviour, running
//! the generator binary, and finding (or building) the real `ringmx` server.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const LOADGEN: &str = env!("CARGO_BIN_EXE_ringmx-loadgen");

#[derive(Clone)]
pub struct Behaviour {
    /// Reply to every RCPT.
    pub rcpt_reply: &'static str,
    /// After this many connections, every reply waits until `stall` has passed (once).
    pub stall_after_connections: Option<(u64, Duration)>,
    /// Accept connections but never send anything.
    pub never_greet: bool,
    /// Close the connection instead of answering MAIL.
    pub close_on_mail: bool,
    /// Never answer DATA (hold the connection open for 30 s).
    pub silent_on_data: bool,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            rcpt_reply: "250 2.1.5 ok",
            stall_after_connections: None,
            never_greet: false,
            close_on_mail: false,
            silent_on_data: false,
        }
    }
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicU64>,
    pub connections: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect(self.addr);
    }
}

struct Shared {
    b: Behaviour,
    accepted: Arc<AtomicU64>,
    connections: Arc<AtomicU64>,
    stall_until: Mutex<Option<Instant>>,
}

impl TestServer {
    pub fn start(b: Behaviour) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared {
            b,
            accepted: accepted.clone(),
            connections: connections.clone(),
            stall_until: Mutex::new(None),
        });
        let stop2 = stop.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let n = shared.connections.fetch_add(1, Ordering::SeqCst) + 1;
                if let Some((after, d)) = shared.b.stall_after_connections {
                    if n == after {
                        *shared.stall_until.lock().unwrap() = Some(Instant::now() + d);
                    }
                }
                let shared = shared.clone();
                std::thread::spawn(move || {
                    let _ = serve(conn, &shared);
                });
            }
        });
        TestServer {
            addr,
            accepted,
            connections,
            stop,
        }
    }
}

fn serve(conn: TcpStream, s: &Shared) -> std::io::Result<()> {
    if s.b.never_greet {
        std::thread::sleep(Duration::from_secs(30));
        return Ok(());
    }
    conn.set_nodelay(true)?;
    let mut w = conn.try_clone()?;
    let mut r = BufReader::new(conn);
    let reply = |w: &mut TcpStream, text: &str| -> std::io::Result<()> {
        let until = *s.stall_until.lock().unwrap();
        if let Some(until) = until {
            let now = Instant::now();
            if now < until {
                std::thread::sleep(until - now);
            }
        }
        w.write_all(text.as_bytes())
    };
    reply(&mut w, "220 tiny.test ESMTP\r\n")?;
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
        match verb.as_str() {
            "EHLO" => reply(
                &mut w,
                "250-tiny.test\r\n250-PIPELINING\r\n250 SIZE 100000000\r\n",
            )?,
            "MAIL" if s.b.close_on_mail => return Ok(()),
            "HELO" | "MAIL" | "RSET" | "NOOP" => reply(&mut w, "250 2.0.0 ok\r\n")?,
            "RCPT" => reply(&mut w, &format!("{}\r\n", s.b.rcpt_reply))?,
            "DATA" => {
                if s.b.silent_on_data {
                    std::thread::sleep(Duration::from_secs(30));
                    return Ok(());
                }
                if !s.b.rcpt_reply.starts_with('2') {
                    reply(&mut w, "554 5.5.1 no valid recipients\r\n")?;
                    continue;
                }
                reply(&mut w, "354 go ahead\r\n")?;
                loop {
                    line.clear();
                    if r.read_line(&mut line)? == 0 {
                        return Ok(());
                    }
                    if line == ".\r\n" {
                        break;
                    }
                }
                s.accepted.fetch_add(1, Ordering::SeqCst);
                reply(&mut w, "250 2.0.0 queued\r\n")?;
            }
            "QUIT" => {
                reply(&mut w, "221 2.0.0 bye\r\n")?;
                return Ok(());
            }
            _ => reply(&mut w, "500 5.5.2 what?\r\n")?,
        }
    }
}

/// Runs the generator with `args` (bounded by its own flags) and returns its output.
pub fn loadgen(args: &[&str]) -> Output {
    Command::new(LOADGEN)
        .args(args)
        .output()
        .expect("run ringmx-loadgen")
}

/// Runs the generator against `target` with `args`, writing its report to a JSON file of its
/// own; asserts that it exited 0 and returns its stdout and the report.
pub fn run_report(target: &str, args: &[&str]) -> (String, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("report.json");
    let mut all = vec!["--target", target];
    all.extend_from_slice(args);
    all.extend(["--json", out.to_str().unwrap()]);
    let o = loadgen(&all);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}\n{stderr}");
    (stdout, json(&out))
}

/// Runs the generator with `args`, asserts that it exited with `code` (1 for a run that could
/// not start, 2 for bad flags, 3 for a regression) and returns its stdout and stderr.
pub fn run_exit(args: &[&str], code: i32) -> (String, String) {
    let o = loadgen(args);
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(code), "{args:?}\n{stdout}\n{stderr}");
    (stdout, stderr)
}

pub fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

pub fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("json written")).expect("valid json")
}

pub fn phase<'a>(j: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    j["phases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap()
}

/// The workspace's `ringmx` server binary, built if it is missing (running only this package's
/// tests). Under `cargo test --workspace` it is already built into the same target directory.
pub fn ringmx_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test binary>
    let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    let bin = profile_dir.join("ringmx");
    if bin.exists() {
        return bin;
    }
    let target_dir = profile_dir.parent().unwrap();
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace)
        .args(["build", "-p", "ringmx", "--bin", "ringmx"])
        .env("CARGO_TARGET_DIR", target_dir);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("run cargo build -p ringmx");
    assert!(status.success(), "cargo build -p ringmx failed");
    assert!(bin.exists(), "{} missing after the build", bin.display());
    bin
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

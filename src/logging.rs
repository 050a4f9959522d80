//! Where log lines go: stderr, one line per event, through `tracing`.
//!
//! A worker thread buffers its lines and writes them once per loop turn (`flush_thread`), so a
//! busy core makes one write(2) per turn instead of one per event. The profile of shape (a) in
//! BENCHMARKS.md showed an unbuffered write per "message accepted" and "session end" line costing
//! about 9% of the server's CPU. Lines are still written at the end of the turn that produced
//! them, so an operator sees them as promptly as before. Other threads (start-up, signals)
//! write directly.
use std::cell::RefCell;
use std::io::{self, Write};

/// A buffered thread writes early once this much is pending, keeping its buffer bounded.
const FLUSH_AT: usize = 32 * 1024;

thread_local! {
    static BUF: RefCell<Option<Pending>> = const { RefCell::new(None) };
}

/// A thread's unwritten lines; written out when the thread ends, so none are lost on exit.
struct Pending(Vec<u8>);

impl Pending {
    fn write_out(&mut self) {
        if !self.0.is_empty() {
            let _ = io::stderr().write_all(&self.0);
            self.0.clear();
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.write_out();
    }
}

/// From now on this thread's log lines wait for `flush_thread`.
pub fn buffer_this_thread() {
    BUF.with(|b| *b.borrow_mut() = Some(Pending(Vec::with_capacity(8 * 1024))));
}

/// Writes this thread's pending log lines, if any.
pub fn flush_thread() {
    BUF.with(|b| {
        if let Some(p) = b.borrow_mut().as_mut() {
            p.write_out();
        }
    });
}

/// Bytes waiting in this thread's buffer.
pub fn pending_bytes() -> usize {
    BUF.with(|b| b.borrow().as_ref().map_or(0, |p| p.0.len()))
}

/// The `tracing_subscriber` writer: stderr, buffered on threads that asked for it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stderr;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Stderr {
    type Writer = Line;
    fn make_writer(&'a self) -> Line {
        Line
    }
}

/// One event's output.
pub struct Line;

impl Write for Line {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let buffered = BUF.with(|b| match b.borrow_mut().as_mut() {
            Some(p) => {
                p.0.extend_from_slice(data);
                if p.0.len() >= FLUSH_AT {
                    p.write_out();
                }
                true
            }
            None => false,
        });
        if !buffered {
            io::stderr().write_all(data)?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffered_thread_holds_lines_until_its_turn_ends() {
        std::thread::spawn(|| {
            buffer_this_thread();
            Line.write_all(b"logging test: a buffered line\n").unwrap();
            assert_eq!(pending_bytes(), 30);
            flush_thread();
            assert_eq!(pending_bytes(), 0);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_buffer_never_grows_past_its_bound() {
        std::thread::spawn(|| {
            buffer_this_thread();
            // Spaces, so the early write leaves no visible noise in the test output.
            let chunk = [b' '; 1000];
            for _ in 0..100 {
                Line.write_all(&chunk).unwrap();
                assert!(pending_bytes() < FLUSH_AT);
            }
            flush_thread();
        })
        .join()
        .unwrap();
    }

    #[test]
    fn other_threads_write_directly() {
        std::thread::spawn(|| {
            Line.write_all(b"").unwrap();
            assert_eq!(pending_bytes(), 0);
        })
        .join()
        .unwrap();
    }
}

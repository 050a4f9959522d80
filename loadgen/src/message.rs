//! What the generator sends: address templates and the message, built once per run.
//!
//! The message bytes are generated once from `--size` and `--seed` and then only referenced, so a
//! transaction costs no allocation and no formatting beyond its short command lines. Content is
//! deterministic (the same seed gives the same bytes) so runs are comparable and a server's
//! behaviour with a given message can be reproduced.

use anyhow::{bail, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Lit(Vec<u8>),
    /// Session number, unique across threads.
    Session,
    /// Message number within the session.
    Message,
    /// Recipient number within the message.
    Recipient,
}

/// An address or name with `{n}` (session), `{m}` (message) and `{r}` (recipient) placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    segs: Vec<Seg>,
}

impl Template {
    pub fn parse(flag: &str, s: &str) -> Result<Template> {
        if s.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
            bail!("{flag} must not contain CR, LF or NUL");
        }
        let mut segs = Vec::new();
        let mut lit = Vec::new();
        let mut rest = s;
        while let Some(open) = rest.find('{') {
            lit.extend_from_slice(&rest.as_bytes()[..open]);
            let after = &rest[open..];
            let (seg, len) = if after.starts_with("{n}") {
                (Seg::Session, 3)
            } else if after.starts_with("{m}") {
                (Seg::Message, 3)
            } else if after.starts_with("{r}") {
                (Seg::Recipient, 3)
            } else {
                let shown: String = after.chars().take(8).collect();
                bail!("{flag} {s:?}: unknown placeholder at {shown:?}; use {{n}} (session number), {{m}} (message number) or {{r}} (recipient number)");
            };
            if !lit.is_empty() {
                segs.push(Seg::Lit(std::mem::take(&mut lit)));
            }
            segs.push(seg);
            rest = &after[len..];
        }
        lit.extend_from_slice(rest.as_bytes());
        if !lit.is_empty() {
            segs.push(Seg::Lit(lit));
        }
        Ok(Template { segs })
    }

    /// Appends the rendered text to `out` without allocating (beyond `out` growing once).
    pub fn render(&self, out: &mut Vec<u8>, n: u64, m: u64, r: u64) {
        for seg in &self.segs {
            match seg {
                Seg::Lit(b) => out.extend_from_slice(b),
                Seg::Session => push_decimal(out, n),
                Seg::Message => push_decimal(out, m),
                Seg::Recipient => push_decimal(out, r),
            }
        }
    }

    pub fn render_string(&self, n: u64, m: u64, r: u64) -> String {
        let mut v = Vec::new();
        self.render(&mut v, n, m, r);
        String::from_utf8_lossy(&v).into_owned()
    }
}

/// `v` in decimal, without going through `fmt`.
pub fn push_decimal(out: &mut Vec<u8>, mut v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

/// SplitMix64: tiny, fast, and the same everywhere, so `--seed` reproduces content exactly.
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Longest generated line, CRLF excluded (RFC 5322 2.1.1 recommends 78).
const LINE_CHARS_MAX: usize = 76;

/// The DATA payload: headers and body of exactly `size` bytes, then the end-of-data `.CRLF`.
/// Lines are words of lower-case letters, so no line starts with '.', none needs dot-stuffing,
/// and there is no bare CR or LF. Headers are left out when `size` is too small to hold them.
/// A size of 1 cannot be a line; it is rounded up to 2.
pub fn build_message(size: usize, seed: u64, from: &str, to: &str) -> Vec<u8> {
    let size = if size == 1 { 2 } else { size };
    let mut out = Vec::with_capacity(size + 3);
    let headers = format!(
        "From: <{from}>\r\nTo: <{to}>\r\nSubject: ringmx-loadgen test message (seed {seed})\r\nMessage-ID: <{seed}.loadgen@ringmx.invalid>\r\n\r\n"
    );
    if headers.len() + 2 <= size {
        out.extend_from_slice(headers.as_bytes());
    }
    let mut rng = SplitMix64::new(seed);
    while out.len() < size {
        let remaining = size - out.len();
        // Each line costs its text plus CRLF; never leave a single byte that cannot form a line.
        let mut text = (remaining - 2).min(LINE_CHARS_MAX);
        if remaining - (text + 2) == 1 {
            text -= 1;
        }
        let mut word_left = 0u64;
        for col in 0..text {
            // Words of 1-9 letters separated by one space; never a space first or last.
            if word_left == 0 && col > 0 && col + 1 < text {
                out.push(b' ');
                word_left = rng.next_u64() % 9 + 1;
            } else {
                out.push(b'a' + (rng.next_u64() % 26) as u8);
                word_left = word_left.saturating_sub(1);
            }
        }
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_render_placeholders() {
        let t = Template::parse("--to", "user{n}.{m}+{r}@example.com").unwrap();
        let mut out = Vec::new();
        t.render(&mut out, 17, 0, 3);
        assert_eq!(out, b"user17.0+3@example.com");
        assert_eq!(
            Template::parse("--from", "a@b")
                .unwrap()
                .render_string(1, 2, 3),
            "a@b"
        );
        assert_eq!(
            Template::parse("--to", "{n}")
                .unwrap()
                .render_string(u64::MAX, 0, 0),
            u64::MAX.to_string()
        );
    }

    #[test]
    fn templates_reject_unknown_placeholders_and_line_breaks() {
        let e = Template::parse("--to", "user{x}@example.com")
            .unwrap_err()
            .to_string();
        assert!(e.contains("--to") && e.contains("{x}"), "{e}");
        assert!(Template::parse("--from", "a@b\r\nRCPT TO:<x>").is_err());
    }

    fn check_message(msg: &[u8], size: usize) {
        assert_eq!(msg.len(), size + 3, "size {size}");
        assert!(msg.ends_with(b".\r\n"));
        let payload = &msg[..size];
        if size > 0 {
            assert!(payload.ends_with(b"\r\n"), "size {size}");
        }
        for line in payload.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            assert!(line.ends_with(b"\r"), "bare LF at size {size}");
            assert!(!line.starts_with(b"."), "needs dot-stuffing at size {size}");
            assert!(line.len() <= LINE_CHARS_MAX + 1);
            assert!(
                !line[..line.len() - 1].contains(&b'\r'),
                "bare CR at size {size}"
            );
        }
    }

    #[test]
    fn message_has_exact_size_and_valid_lines_for_every_size() {
        for size in (0..400).filter(|&s| s != 1).chain([1024, 4096, 100_000]) {
            check_message(
                &build_message(size, 7, "from@example.com", "to@example.com"),
                size,
            );
        }
    }

    #[test]
    fn message_content_is_deterministic_per_seed() {
        let a = build_message(1024, 1, "f@x", "t@x");
        assert_eq!(a, build_message(1024, 1, "f@x", "t@x"));
        assert_ne!(a, build_message(1024, 2, "f@x", "t@x"));
        assert!(a.starts_with(b"From: <f@x>\r\n"));
    }
}

//! The DATA scanner: finds the end of a message, removes dot-stuffing and applies the bare CR/LF
//! policy. It is the DATA phase's own small receiver (STYLE habit 2): it carries no bytes across
//! reads, only a state of a few bits, so a body split at any offset scans exactly like one whole.
//!
//! Rules (RFC 5321 4.1.1.4, 4.5.2): the data is a sequence of lines ending in CRLF; the 354 reply
//! counts as the start of the first line. A line that is exactly `.` ends the data, so the end
//! marker is `<CRLF>.<CRLF>` (or `.<CRLF>` right after the 354). A line that starts with `.` and
//! has more characters loses that first dot (dot-unstuffing). The body handed over is the unstuffed
//! text up to and including the CRLF before the final `.`.
//!
//! Policy on bare CR and bare LF (SMTP smuggling, CVE-2023-51764 and friends): a CR not followed by
//! LF, or an LF not preceded by CR, never ends a line here, so `\n.\n`, `\r.\r`, `\r\n.\n`,
//! `\n.\r\n` and similar never end the data: only `<CRLF>.<CRLF>` does. A message that contains
//! any bare CR or bare LF is read to its real end and then rejected whole with
//! `550 5.6.11 Message contains bare CR or LF; lines must end with CRLF`; nothing of it is stored.
//! Rejecting rather than passing the bytes on means no downstream system, however lenient, can be
//! fooled into seeing two messages in one.
//!
//! Speed: the scanner jumps from LF to LF with `memchr` and copies the bytes in between with one
//! `extend_from_slice`; bare CRs are found by counting CRs per block (a second `memchr`-speed pass)
//! and comparing with the CRLFs seen. Only a CRLF followed by `.` stops the fast path.
//!
//! Memory: once the body is known to be rejected (over the size limit or containing a bare CR/LF)
//! the scanner stops appending and frees what it had, while it keeps looking for the end.

/// Where the scanner is, relative to the lines of the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a line (after the 354 or after a CRLF).
    LineStart,
    /// Inside a line; the last byte was not a CR.
    Mid,
    /// Inside a line; the last byte was a CR (emitted), its LF not yet seen.
    Cr,
    /// A line started with `.` (dropped: it is either stuffing or the end marker).
    Dot,
    /// A line started with `.` then CR (the CR is held back: it may be part of the end marker).
    DotCr,
    /// The end marker has been seen.
    Done,
}

/// Scans one message body; create a new one for each DATA.
#[derive(Debug, Clone)]
pub struct DataScanner {
    state: State,
    /// A bare CR or bare LF has been seen.
    bare: bool,
    /// Unstuffed body length so far, counted even when no longer kept.
    len: u64,
    /// Keep at most this many body bytes.
    max: u64,
}

impl DataScanner {
    /// A scanner positioned right after the 354 reply; bodies over `max` bytes are flagged.
    pub fn new(max: u64) -> DataScanner {
        DataScanner { state: State::LineStart, bare: false, len: 0, max }
    }

    /// True when the message contains a bare CR or bare LF (policy: reject with 550 5.6.11).
    pub fn bare_cr_lf(&self) -> bool {
        self.bare
    }

    /// True when the unstuffed body is longer than the limit (552 5.3.4).
    pub fn too_big(&self) -> bool {
        self.len > self.max
    }

    /// Unstuffed body length seen so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when no body byte has been seen yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True once the end marker has been seen.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// True when the body is being discarded (too big or bare CR/LF): it will be rejected.
    pub fn rejecting(&self) -> bool {
        self.bare || self.too_big()
    }

    /// Scans `input`, appending unstuffed body bytes to `body` (unless the message is already
    /// known to be rejected). Returns `Some(consumed)` when the end marker ends at
    /// `input[consumed - 1]`, or `None` when all of `input` belongs to the body so far.
    pub fn scan(&mut self, input: &[u8], body: &mut Vec<u8>) -> Option<usize> {
        let n = input.len();
        let mut i = 0;
        loop {
            match self.state {
                State::Done => return Some(i),
                State::LineStart => {
                    if i == n {
                        return None;
                    }
                    if input[i] == b'.' {
                        i += 1;
                        self.state = State::Dot;
                    } else {
                        self.state = State::Mid;
                    }
                }
                State::Dot => {
                    if i == n {
                        return None;
                    }
                    if input[i] == b'\r' {
                        i += 1;
                        self.state = State::DotCr;
                    } else {
                        // A stuffed dot: already dropped; the rest is an ordinary line.
                        self.state = State::Mid;
                    }
                }
                State::DotCr => {
                    if i == n {
                        return None;
                    }
                    if input[i] == b'\n' {
                        self.state = State::Done;
                        return Some(i + 1);
                    }
                    // `.` CR then not LF: the CR was bare and belongs to the (stuffed) line.
                    self.bare = true;
                    self.emit(body, b"\r");
                    self.state = State::Mid;
                }
                State::Mid | State::Cr => {
                    if i == n {
                        return None;
                    }
                    i = self.block(input, i, body);
                }
            }
        }
    }

    /// The fast path: from `start` (inside a line, or at a line start known not to be a dot) up to
    /// the next CRLF that is followed by `.`, or to the end of `input`. Returns the new position.
    fn block(&mut self, input: &[u8], start: usize, body: &mut Vec<u8>) -> usize {
        let n = input.len();
        let entry_cr = self.state == State::Cr;
        if entry_cr && input[start] != b'\n' {
            self.bare = true;
        }
        // LFs in the block whose CR is also in the block: each accounts for one CR in the count.
        let mut crlf_in_block = 0usize;
        let mut end = n;
        let mut last_lf_ok = false;
        for off in memchr::memchr_iter(b'\n', &input[start..]) {
            let p = start + off;
            let ok = if p > start {
                let ok = input[p - 1] == b'\r';
                crlf_in_block += usize::from(ok);
                ok
            } else {
                entry_cr
            };
            if !ok {
                self.bare = true;
            }
            if ok && p + 1 < n && input[p + 1] == b'.' {
                end = p + 1;
                break;
            }
            last_lf_ok = ok;
        }
        let seg = &input[start..end];
        let trailing_cr = end == n && seg.last() == Some(&b'\r');
        if !self.bare {
            // Every CR must be the first half of a CRLF: count them.
            let crs = memchr::memchr_iter(b'\r', seg).count();
            if crs != crlf_in_block + usize::from(trailing_cr) {
                self.bare = true;
            }
        }
        self.emit(body, seg);
        self.state = if end < n {
            State::LineStart
        } else if trailing_cr {
            State::Cr
        } else if seg.last() == Some(&b'\n') && last_lf_ok {
            State::LineStart
        } else {
            State::Mid
        };
        end
    }

    fn emit(&mut self, body: &mut Vec<u8>, bytes: &[u8]) {
        self.len = self.len.saturating_add(bytes.len() as u64);
        if self.rejecting() {
            if body.capacity() != 0 {
                // Free the partial body now: it will never be stored.
                *body = Vec::new();
            }
        } else {
            body.extend_from_slice(bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The slow oracle: the first `<CRLF>.<CRLF>` with the 354 counting as a CRLF, then split on
    /// CRLF and drop one leading dot per line. Returns (consumed, body, bare).
    pub(crate) fn naive(input: &[u8]) -> Option<(usize, Vec<u8>, bool)> {
        let mut pre = b"\r\n".to_vec();
        pre.extend_from_slice(input);
        let k = pre.windows(5).position(|w| w == b"\r\n.\r\n")?;
        let raw = &input[..k];
        let mut body = Vec::new();
        let mut rest = raw;
        while !rest.is_empty() {
            let (line, next) = match rest.windows(2).position(|w| w == b"\r\n") {
                Some(p) => (&rest[..p + 2], &rest[p + 2..]),
                None => (rest, &rest[rest.len()..]),
            };
            body.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
            rest = next;
        }
        let bare = (0..raw.len()).any(|i| {
            (raw[i] == b'\r' && raw.get(i + 1) != Some(&b'\n')) || (raw[i] == b'\n' && (i == 0 || raw[i - 1] != b'\r'))
        });
        Some((k + 3, body, bare))
    }

    /// Feeds `input` in the given chunks; returns (consumed, body, bare) like `naive`.
    fn chunked(input: &[u8], cuts: &[usize]) -> Option<(usize, Vec<u8>, bool)> {
        let mut s = DataScanner::new(u64::MAX);
        let mut body = Vec::new();
        let mut from = 0;
        for &to in cuts.iter().chain(std::iter::once(&input.len())) {
            if let Some(c) = s.scan(&input[from..to], &mut body) {
                return Some((from + c, body, s.bare_cr_lf()));
            }
            from = to;
        }
        None
    }

    fn check(input: &[u8]) {
        let want = naive(input);
        let norm = |r: Option<(usize, Vec<u8>, bool)>| r.map(|(c, b, bare)| (c, if bare { Vec::new() } else { b }, bare));
        let want = norm(want);
        assert_eq!(norm(chunked(input, &[])), want, "whole: {:?}", String::from_utf8_lossy(input));
        for cut in 0..=input.len() {
            assert_eq!(norm(chunked(input, &[cut])), want, "cut {cut}: {:?}", String::from_utf8_lossy(input));
        }
        let bytewise: Vec<usize> = (1..input.len()).collect();
        assert_eq!(norm(chunked(input, &bytewise)), want, "bytewise: {:?}", String::from_utf8_lossy(input));
    }

    #[test]
    fn plain_message() {
        let r = chunked(b"Subject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n", &[]).unwrap();
        assert_eq!(r, (24, b"Subject: hi\r\n\r\nbody\r\n".to_vec(), false));
    }

    #[test]
    fn empty_message_right_after_354() {
        assert_eq!(chunked(b".\r\n", &[]), Some((3, vec![], false)));
    }

    #[test]
    fn dot_unstuffing() {
        let r = chunked(b"..leading\r\n...two\r\n.\r\n", &[]).unwrap();
        assert_eq!(r.1, b".leading\r\n..two\r\n");
        // A dot inside a line is content.
        assert_eq!(chunked(b"a.b\r\n.\r\n", &[]).unwrap().1, b"a.b\r\n");
    }

    #[test]
    fn smuggling_vectors_never_end_the_data_and_are_flagged() {
        // smtp-proto's vectors: each must not end the data; the real end comes after.
        for v in [
            &b"\n.\n"[..],
            b"\r.\r",
            b"\r\n.\n",
            b"\n.\r\n",
            b"\r.\r\n",
            b"\r\n.\r",
            b"\n.\r",
            b"\r.\n",
            b"\r\n.\r\r\n",
            b"\r\r\n.\n\r\n",
        ] {
            let mut msg = b"Subject: a\r\n\r\nfirst".to_vec();
            msg.extend_from_slice(v);
            let real_end_of_smuggled = msg.len();
            msg.extend_from_slice(b"MAIL FROM:<evil@x>\r\nsecond\r\n.\r\n");
            let (consumed, _, bare) = chunked(&msg, &[]).unwrap();
            assert!(consumed > real_end_of_smuggled, "{v:?} ended the data early");
            assert_eq!(consumed, msg.len(), "{v:?}");
            assert!(bare, "{v:?} not flagged as bare CR/LF");
            check(&msg);
        }
    }

    #[test]
    fn clean_crlf_is_not_bare() {
        let (_, _, bare) = chunked(b"a\r\nb\r\n\r\n.\r\n", &[]).unwrap();
        assert!(!bare);
    }

    #[test]
    fn chunked_equals_whole_on_tricky_inputs() {
        for input in [
            &b"x\r\n.\r\n"[..],
            b".\r\n",
            b"..\r\n.\r\n",
            b".\r\r\n.\r\n",
            b".\rx\r\n.\r\n",
            b"\r\r\n.\r\n",
            b"a\r\n.a\r\n..\r\n.\r\n",
            b"a\r\n.\r\n",
            b"\r\n.\r\n",
            b"\n\r\n.\r\n",
            b"a\r",
            b"a\r\n.",
            b"a\r\n.\r",
            b"a\n.\r\n.\r\n",
            b"a\r\n\n.\r\n",
            b"a\r\n\r.\r\n",
            b"a\r\n.\r.\r\n",
        ] {
            check(input);
        }
    }

    #[test]
    fn pseudo_random_inputs_match_the_oracle() {
        // A small xorshift generator over an alphabet dense in CR, LF and dots.
        let alphabet = b"\r\n.\r\n.a";
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..3000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 14) as usize;
            let mut v = Vec::with_capacity(len + 5);
            let mut y = x;
            for _ in 0..len {
                v.push(alphabet[(y % alphabet.len() as u64) as usize]);
                y /= 7;
            }
            v.extend_from_slice(b"\r\n.\r\n");
            check(&v);
        }
    }

    #[test]
    fn oversize_is_flagged_and_memory_is_freed() {
        let mut s = DataScanner::new(10);
        let mut body = Vec::new();
        assert_eq!(s.scan(b"0123456789", &mut body), None);
        assert!(!s.too_big());
        assert_eq!(body.len(), 10);
        assert_eq!(s.scan(b"abc\r\n", &mut body), None);
        assert!(s.too_big() && s.rejecting());
        assert_eq!(body.capacity(), 0);
        for _ in 0..100 {
            assert_eq!(s.scan(&[b'z'; 1000], &mut body), None);
            assert_eq!(body.capacity(), 0);
        }
        assert_eq!(s.scan(b"\r\n.\r\nNEXT", &mut body), Some(5));
        assert_eq!(s.len(), 15 + 100_000 + 2);
    }

    #[test]
    fn exactly_max_is_accepted() {
        let mut s = DataScanner::new(5);
        let mut body = Vec::new();
        assert_eq!(s.scan(b"abc\r\n.\r\n", &mut body), Some(8));
        assert!(!s.too_big());
        assert_eq!(body, b"abc\r\n");
    }
}

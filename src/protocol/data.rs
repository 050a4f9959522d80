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
//! Zero copy: the scanner never copies the body. It hands the unstuffed body to a sink as slices
//! of its input (segments), in order, like httparse hands out borrowed headers; copying is the
//! consumer's job. The session copies the segments into its body buffer for a durable store, and
//! only counts them when the store discards.
//!
//! Speed: one fused pass per 64-byte block, written as plain comparisons over fixed-size arrays
//! so that the compiler vectorizes it (SSE2 on the x86-64 baseline, no `unsafe`, no target
//! flags), marks every byte pair that breaks "CR if and only if LF follows" (a bare CR or bare
//! LF) or that is an LF followed by a dot (a dot-started line: unstuffing or the end marker).
//! Ordinary text lines ending in CRLF mark nothing, so a block without marks is skipped with no
//! per-byte work at all; only marked blocks get a bit mask, and only their marks go through the
//! line state machine.
//!
//! Memory: the scanner holds no body. Once the body is known to be rejected (over the size limit
//! or containing a bare CR/LF) it stops handing out segments, while it keeps counting the
//! unstuffed length and looking for the end; the consumer should then free what it kept.

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
        DataScanner {
            state: State::LineStart,
            bare: false,
            len: 0,
            max,
        }
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

    /// Scans `input`, handing the unstuffed body to `sink` as slices of `input`, in order
    /// (unless the message is already known to be rejected; a segment that first makes it too big
    /// is not handed out). The concatenation of all segments over all calls is the body, whatever
    /// the split of the data into inputs. Returns `Some(consumed)` when the end marker ends at
    /// `input[consumed - 1]`, or `None` when all of `input` belongs to the body so far.
    pub fn scan(&mut self, input: &[u8], mut sink: impl FnMut(&[u8])) -> Option<usize> {
        let n = input.len();
        // The next byte to look at, and the start of the body bytes not yet handed out.
        let mut i = 0;
        let mut from = 0;
        loop {
            match self.state {
                State::Done => return Some(i),
                State::LineStart => {
                    if i == n {
                        break;
                    }
                    if input[i] == b'.' {
                        self.emit(&input[from..i], &mut sink);
                        i += 1;
                        from = i;
                        self.state = State::Dot;
                    } else {
                        self.state = State::Mid;
                    }
                }
                State::Dot => {
                    if i == n {
                        break;
                    }
                    if input[i] == b'\r' {
                        // Held back (not handed out) until its LF decides: `from` stays on it.
                        i += 1;
                        self.state = State::DotCr;
                    } else {
                        // A stuffed dot: already dropped; the rest is an ordinary line.
                        self.state = State::Mid;
                    }
                }
                State::DotCr => {
                    if i == n {
                        break;
                    }
                    if input[i] == b'\n' {
                        // The end marker; its dot and CR were never part of the body.
                        self.state = State::Done;
                        return Some(i + 1);
                    }
                    // `.` CR then not LF: the CR was bare and belongs to the (stuffed) line. When
                    // it is in this input it is already the first pending byte (`from`); when it
                    // ended the previous input, it has to be handed out on its own.
                    self.bare = true;
                    if i == 0 {
                        self.emit(b"\r", &mut sink);
                    }
                    self.state = State::Mid;
                }
                State::Cr => {
                    if i == n {
                        break;
                    }
                    if input[i] == b'\n' {
                        i += 1;
                        self.state = State::LineStart;
                    } else {
                        self.bare = true;
                        self.state = State::Mid;
                    }
                }
                State::Mid => {
                    if i == n {
                        break;
                    }
                    if i > 0 && n > BLOCK {
                        match self.blocks(input, i, &mut from, &mut sink) {
                            Ok(end) => return Some(end),
                            Err(next) => i = next,
                        }
                    } else {
                        // Short inputs and the first byte of an input, one byte at a time.
                        match input[i] {
                            b'\r' => self.state = State::Cr,
                            // Inside a line the byte before was not a CR: the LF is bare.
                            b'\n' => self.bare = true,
                            _ => {}
                        }
                        i += 1;
                    }
                }
            }
        }
        // A CR held back after a line-start dot is not body (yet): it is the only pending byte.
        if self.state != State::DotCr {
            self.emit(&input[from..], &mut sink);
        }
        None
    }

    /// The fast path, entered inside a line (state `Mid`) at `start > 0`, with `input` longer
    /// than one block. Marks the byte pairs that need the state machine one block at a time (see
    /// `marks`) and handles only those: a bare CR or LF sets the flag, a line-start dot is dropped
    /// (body bytes before it are handed out) or ends the data. Returns `Ok(consumed)` at the end
    /// marker, or `Err(next)` with the state set: at the end of `input`, or just past a line-start
    /// dot too close to the end of `input` to tell stuffing from the end marker.
    fn blocks(
        &mut self,
        input: &[u8],
        start: usize,
        from: &mut usize,
        sink: &mut impl FnMut(&[u8]),
    ) -> Result<usize, usize> {
        let n = input.len();
        let mut base = start;
        while base < n {
            // The last block overlaps the one before instead of taking a slow tail; the marks of
            // pairs already handled are shifted out.
            let at = base.min(n - BLOCK);
            // The block (`x`) and the same bytes one earlier (`p`, the byte before each), as two
            // plain loads. Hiding the relation of the two offsets from the optimizer keeps it from
            // building `p` out of `x` with byte shifts, which costs three vector operations per
            // 16 bytes against one load.
            let x_at = std::hint::black_box(at);
            let p: &[u8; BLOCK] = input[at - 1..at - 1 + BLOCK]
                .try_into()
                .expect("the bytes before a block");
            let x: &[u8; BLOCK] = input[x_at..x_at + BLOCK].try_into().expect("a block");
            if !any_mark(p, x) {
                base = at + BLOCK;
                continue;
            }
            let mut m = marks(p, x) >> (base - at);
            while m != 0 {
                let k = base + m.trailing_zeros() as usize;
                m &= m - 1;
                if !(input[k - 1] == b'\n' && input[k] == b'.') {
                    // The other kind of mark: CR without LF after it, or LF without CR before.
                    self.bare = true;
                    continue;
                }
                // An LF at `start - 1` was consumed in state `Mid`, so it was bare. After that,
                // an LF preceded by a CR always ends a line here.
                if k == start || input[k - 2] != b'\r' {
                    // After a bare LF (flagged at its own mark) a dot is content.
                    continue;
                }
                self.emit(&input[*from..k], sink);
                *from = k + 1;
                if k + 2 >= n {
                    self.state = State::Dot;
                    return Err(k + 1);
                }
                if input[k + 1] == b'\r' && input[k + 2] == b'\n' {
                    self.state = State::Done;
                    return Ok(k + 3);
                }
                // A stuffed dot, dropped. What follows it is judged by the marks: an LF right
                // after it is marked as bare, since its predecessor is the dot.
            }
            base = at + BLOCK;
        }
        self.state = match input[n - 1] {
            b'\r' => State::Cr,
            b'\n' if input[n - 2] == b'\r' => State::LineStart,
            _ => State::Mid,
        };
        Err(n)
    }

    /// Counts body bytes and hands them to `sink` unless the message is rejected.
    fn emit(&mut self, bytes: &[u8], sink: &mut impl FnMut(&[u8])) {
        if bytes.is_empty() {
            return;
        }
        self.len = self.len.saturating_add(bytes.len() as u64);
        if !self.rejecting() {
            sink(bytes);
        }
    }
}

/// Bytes per block of the fast path: one 64-bit mask.
const BLOCK: usize = 64;

/// True when the byte pair `(p, x)` needs the state machine: `x` is an LF without a CR before it,
/// `p` is a CR without an LF after it, or `p` is an LF and `x` a dot (a dot-started line, unless
/// the LF itself was bare). Branch-free, so that the callers vectorize.
#[inline(always)]
fn mark(p: u8, x: u8) -> bool {
    ((x == b'\n') != (p == b'\r')) | ((p == b'\n') & (x == b'.'))
}

/// True when some pair (`p[j]`, `x[j]`) is marked (`p` is `x` one byte earlier). One
/// OR-reduction with no early exit, which the compiler turns into vector compares over the block.
#[inline(always)]
fn any_mark(p: &[u8; BLOCK], x: &[u8; BLOCK]) -> bool {
    let mut acc = 0u8;
    for j in 0..BLOCK {
        acc |= u8::from(mark(p[j], x[j]));
    }
    acc != 0
}

/// Bit `j` set when the pair (`p[j]`, `x[j]`) is marked. The flags are computed as bytes
/// (vectorized like `any_mark`) and packed eight at a time with one multiplication: byte `b` of a
/// word holding 0 or 1 lands on bit 56 + `b` of the product.
#[inline(always)]
fn marks(p: &[u8; BLOCK], x: &[u8; BLOCK]) -> u64 {
    let mut flags = [0u8; BLOCK];
    for (j, f) in flags.iter_mut().enumerate() {
        *f = u8::from(mark(p[j], x[j]));
    }
    let mut m = 0u64;
    for (g, word) in flags.chunks_exact(8).enumerate() {
        let w = u64::from_le_bytes(word.try_into().expect("8 bytes"));
        m |= (w.wrapping_mul(0x0102_0408_1020_4080) >> 56) << (8 * g);
    }
    m
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
            (raw[i] == b'\r' && raw.get(i + 1) != Some(&b'\n'))
                || (raw[i] == b'\n' && (i == 0 || raw[i - 1] != b'\r'))
        });
        Some((k + 3, body, bare))
    }

    /// Feeds `input` in the given chunks, collecting the segments into a body as the session
    /// does (and dropping it once the message is rejected); returns (consumed, body, bare) like
    /// `naive`.
    fn chunked(input: &[u8], cuts: &[usize]) -> Option<(usize, Vec<u8>, bool)> {
        let mut s = DataScanner::new(u64::MAX);
        let mut body = Vec::new();
        let mut from = 0;
        for &to in cuts.iter().chain(std::iter::once(&input.len())) {
            let r = s.scan(&input[from..to], |seg| body.extend_from_slice(seg));
            if !s.rejecting() {
                assert_eq!(s.len(), body.len() as u64, "len counts what was handed out");
            }
            if let Some(c) = r {
                return Some((from + c, body, s.bare_cr_lf()));
            }
            from = to;
        }
        None
    }

    fn check(input: &[u8]) {
        let want = naive(input);
        let norm = |r: Option<(usize, Vec<u8>, bool)>| {
            r.map(|(c, b, bare)| (c, if bare { Vec::new() } else { b }, bare))
        };
        let want = norm(want);
        assert_eq!(
            norm(chunked(input, &[])),
            want,
            "whole: {:?}",
            String::from_utf8_lossy(input)
        );
        for cut in 0..=input.len() {
            assert_eq!(
                norm(chunked(input, &[cut])),
                want,
                "cut {cut}: {:?}",
                String::from_utf8_lossy(input)
            );
        }
        let bytewise: Vec<usize> = (1..input.len()).collect();
        assert_eq!(
            norm(chunked(input, &bytewise)),
            want,
            "bytewise: {:?}",
            String::from_utf8_lossy(input)
        );
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
            assert!(
                consumed > real_end_of_smuggled,
                "{v:?} ended the data early"
            );
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
    fn long_sparse_inputs_match_the_oracle() {
        // Long enough to cross the 64-byte chunks of the bare CR/LF check, with CR, LF and dots
        // placed rarely and anywhere.
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        for round in 0..300 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = 60 + (x % 240) as usize;
            let mut v = Vec::with_capacity(len + 5);
            let mut y = x;
            for _ in 0..len {
                y = y
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                v.push(match (y >> 33) % 40 {
                    0 => b'\r',
                    1 => b'\n',
                    2 => b'.',
                    _ => b'a',
                });
            }
            // Every other input is made of well-formed lines (some dot-started), so that the
            // clean path is covered as well as the bare one.
            if round % 2 == 0 {
                v.retain(|&b| b != b'\r' && b != b'\n');
                for k in (0..v.len()).step_by(37) {
                    v[k] = b'.';
                }
                let lines: Vec<&[u8]> = v.chunks(29).collect();
                v = lines.join(&b"\r\n"[..]);
                v.extend_from_slice(b"\r\n");
            }
            v.extend_from_slice(b"\r\n.\r\n");
            check(&v);
        }
    }

    #[test]
    fn long_bodies_across_stretches_match_the_oracle() {
        // Bodies of many blocks, with line lengths that put LFs, dots and bare bytes on and around
        // block boundaries; fed whole and split at many offsets.
        let mut x: u64 = 0xD1B5_4A32_D192_ED03;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..40 {
            let mut v = Vec::new();
            while v.len() < 20_000 + (round * 997) {
                let r = next();
                if r % 5 == 0 {
                    v.push(b'.');
                }
                let len = (r >> 8) as usize % 300;
                v.extend(std::iter::repeat_n(b'w', len));
                v.extend_from_slice(b"\r\n");
            }
            if round % 3 == 1 {
                let at = next() as usize % v.len();
                v[at] = if round % 2 == 0 { b'\r' } else { b'\n' };
            }
            // A dot line right on a block boundary (8192 is one, 128 blocks in).
            let mut tail_dot = b"\r\n..x\r\n".to_vec();
            let at = 8192 - 2 + round % 5;
            if at + tail_dot.len() < v.len() {
                v.splice(at..at + tail_dot.len(), tail_dot.drain(..));
            }
            v.extend_from_slice(b"\r\n.\r\nNOOP\n");
            let want = naive(&v);
            let norm = |r: Option<(usize, Vec<u8>, bool)>| {
                r.map(|(c, b, bare)| (c, if bare { Vec::new() } else { b }, bare))
            };
            let want = norm(want);
            assert_eq!(norm(chunked(&v, &[])), want, "round {round} whole");
            let mut cuts: Vec<usize> = (0..30).map(|_| next() as usize % v.len()).collect();
            cuts.extend(
                [8191, 8192, 8193, 16384, 16385]
                    .iter()
                    .filter(|&&c| c < v.len()),
            );
            for cut in cuts {
                assert_eq!(norm(chunked(&v, &[cut])), want, "round {round} cut {cut}");
            }
            let many: Vec<usize> = (1..v.len()).step_by(4093).collect();
            assert_eq!(norm(chunked(&v, &many)), want, "round {round} many cuts");
        }
    }

    #[test]
    fn marks_on_and_around_block_edges_match_the_oracle() {
        // Inputs of a few blocks with a dot line, the end marker or a bare byte at every offset,
        // so that each lands at the start, middle and end of a block, in the overlapping last
        // block and across every split.
        for v in [
            &b"\r\n..x\r\n"[..],
            b"\r\n.\r\n",
            b"\n",
            b"\r",
            b"\r\n.\n",
            b"\n.\r\n",
        ] {
            for pos in 0..=150 - v.len() {
                let mut input = vec![b'a'; 150];
                input[pos..pos + v.len()].copy_from_slice(v);
                input.extend_from_slice(b"\r\n.\r\nNOOP\n");
                check(&input);
            }
        }
    }

    #[test]
    fn bytes_after_the_end_do_not_taint_the_message() {
        // Commands after the end marker may end in bare LF; they are not part of the message,
        // whichever way the chunks of the fast path fall.
        for pad in 0..140 {
            let mut v = vec![b'a'; pad];
            v.extend_from_slice(b"\r\n.\r\n");
            let end = v.len();
            for _ in 0..10 {
                v.extend_from_slice(b"NOOP\n\r.\n");
            }
            let (consumed, body, bare) = chunked(&v, &[]).unwrap();
            assert_eq!((consumed, bare), (end, false), "pad {pad}");
            assert_eq!(body.len(), pad + 2);
            check(&v);
        }
    }

    #[test]
    fn block_marks_match_the_pairwise_rule() {
        // Every placement of one or two of CR, LF and dot in a block (and the byte before it):
        // the vectorized marks, their OR-reduction and the scalar rule agree bit for bit.
        let bytes = [b'\r', b'\n', b'.'];
        for pos in 0..=BLOCK {
            for pos2 in [0, 1, 7, 8, 31, 32, 63, 64] {
                for &b in &bytes {
                    for &b2 in &bytes {
                        let mut w = [b'a'; BLOCK + 1];
                        w[pos] = b;
                        w[pos2] = b2;
                        let want = (0..BLOCK)
                            .filter(|&j| mark(w[j], w[j + 1]))
                            .fold(0u64, |m, j| m | 1 << j);
                        let (p, x) = halves(&w);
                        assert_eq!(marks(p, x), want, "pos {pos} {b} pos2 {pos2} {b2}");
                        assert_eq!(any_mark(p, x), want != 0, "pos {pos} pos2 {pos2}");
                    }
                }
            }
        }
        // Clean CRLF lines carry no marks.
        let mut w = [b'a'; BLOCK + 1];
        w[10..12].copy_from_slice(b"\r\n");
        w[40..42].copy_from_slice(b"\r\n");
        let (p, x) = halves(&w);
        assert_eq!(marks(p, x), 0);
    }

    /// A block with the byte before it, as the pair of views `blocks` passes.
    fn halves(w: &[u8; BLOCK + 1]) -> (&[u8; BLOCK], &[u8; BLOCK]) {
        (w[..BLOCK].try_into().unwrap(), w[1..].try_into().unwrap())
    }

    #[test]
    fn oversize_is_flagged_and_nothing_more_is_handed_out() {
        let mut s = DataScanner::new(10);
        let mut body = Vec::new();
        assert_eq!(
            s.scan(b"0123456789", |seg| body.extend_from_slice(seg)),
            None
        );
        assert!(!s.too_big());
        assert_eq!(body.len(), 10);
        assert_eq!(s.scan(b"abc\r\n", |seg| body.extend_from_slice(seg)), None);
        assert!(s.too_big() && s.rejecting());
        // The segment that crossed the limit was not handed out, and nothing after it is.
        assert_eq!(body.len(), 10);
        for _ in 0..100 {
            assert_eq!(s.scan(&[b'z'; 1000], |_| panic!("handed out")), None);
        }
        assert_eq!(s.scan(b"\r\n.\r\nNEXT", |_| panic!("handed out")), Some(5));
        assert_eq!(s.len(), 15 + 100_000 + 2);
    }

    #[test]
    fn exactly_max_is_accepted() {
        let mut s = DataScanner::new(5);
        let mut body = Vec::new();
        assert_eq!(
            s.scan(b"abc\r\n.\r\n", |seg| body.extend_from_slice(seg)),
            Some(8)
        );
        assert!(!s.too_big());
        assert_eq!(body, b"abc\r\n");
    }
}

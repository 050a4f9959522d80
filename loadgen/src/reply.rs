//! SMTP reply parser (RFC 5321 4.2): bytes in, complete replies out. Sans-I/O and allocation-free.
//!
//! It owns only the bytes of the reply it is in the middle of: a reply may arrive split across
//! any number of reads, and one read may hold several replies (pipelining), so `feed` returns
//! after each complete reply with how much it consumed. It never shares code with the server's
//! parser, so a parser bug cannot cancel itself out in a benchmark.
//!
//! Grammar (RFC 5321 4.2): `Reply-line = *( Reply-code "-" [ textstring ] CRLF )
//! Reply-code [ SP textstring ] CRLF`, `Reply-code = %x32-35 %x30-35 %x30-39`. We accept a bare LF
//! as a line end (being lenient here cannot hide a server bug that matters to a load test) and any
//! second and third digit.

/// Longest reply line we accept, CRLF excluded. RFC 5321 4.5.3.1.5 says 512 including CRLF; real
/// servers exceed that with long EHLO keyword lists, so allow some slack before calling it garbage.
pub const LINE_BYTES_MAX: usize = 2048;
/// How much of the first line's text is kept for error examples.
pub const TEXT_BYTES_MAX: usize = 100;

/// One complete reply. The text of its first line is `ReplyParser::text()` until the next `feed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// Some line of the reply was the EHLO keyword PIPELINING (RFC 2920).
    pub pipelining: bool,
}

/// Why the bytes were not an SMTP reply. The connection is useless afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyError {
    /// Not three digits (first one 2-5) followed by SP, '-' or the line end.
    Garbage,
    /// A line longer than `LINE_BYTES_MAX`.
    TooLong,
    /// The lines of a multi-line reply carry different codes.
    CodeMismatch,
}

impl std::fmt::Display for ReplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReplyError::Garbage => "not an SMTP reply line",
            ReplyError::TooLong => "reply line too long",
            ReplyError::CodeMismatch => "multi-line reply with different codes",
        })
    }
}

const WORD_BYTES_MAX: usize = 16;

#[derive(Debug, Clone)]
pub struct ReplyParser {
    /// Bytes seen on the current line, CR and LF excluded.
    col: usize,
    line_code: u16,
    /// '-' when another line follows.
    sep: u8,
    /// Code of the first line of the reply being read; 0 before the first line ends.
    reply_code: u16,
    pipelining: bool,
    word: [u8; WORD_BYTES_MAX],
    word_len: usize,
    word_done: bool,
    text: [u8; TEXT_BYTES_MAX],
    text_len: usize,
    /// Text of the last complete reply's first line is frozen until the next reply starts.
    first_line: bool,
}

impl Default for ReplyParser {
    fn default() -> Self {
        ReplyParser::new()
    }
}

impl ReplyParser {
    pub fn new() -> ReplyParser {
        ReplyParser {
            col: 0,
            line_code: 0,
            sep: 0,
            reply_code: 0,
            pipelining: false,
            word: [0; WORD_BYTES_MAX],
            word_len: 0,
            word_done: false,
            text: [0; TEXT_BYTES_MAX],
            text_len: 0,
            first_line: true,
        }
    }

    /// Forget any partial reply (a new connection).
    pub fn reset(&mut self) {
        *self = ReplyParser::new();
    }

    /// The first line of the last (or current) reply, code included, lossily decoded.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.text[..self.text_len]).into_owned()
    }

    /// Consumes bytes up to and including the end of the next complete reply. Returns how many
    /// bytes were consumed and the reply, or `None` when `input` ended inside a reply (all of it
    /// consumed; feed the next read).
    pub fn feed(&mut self, input: &[u8]) -> (usize, Option<Result<Reply, ReplyError>>) {
        for (i, &b) in input.iter().enumerate() {
            if self.col == 0 && self.first_line && self.reply_code == 0 && self.line_code == 0 {
                // First byte of a new reply: start capturing its text afresh.
                self.text_len = 0;
                self.pipelining = false;
            }
            match b {
                b'\n' => {
                    if let Some(done) = self.end_line() {
                        return (i + 1, Some(done));
                    }
                }
                // Only meaningful right before LF; elsewhere it is text we do not interpret.
                b'\r' => {}
                _ => {
                    if let Err(e) = self.byte(b) {
                        return (i + 1, Some(Err(e)));
                    }
                }
            }
        }
        (input.len(), None)
    }

    fn byte(&mut self, b: u8) -> Result<(), ReplyError> {
        match self.col {
            0 if (b'2'..=b'5').contains(&b) => self.line_code = u16::from(b - b'0'),
            1 | 2 if b.is_ascii_digit() => {
                self.line_code = self.line_code * 10 + u16::from(b - b'0')
            }
            0..=2 => return Err(ReplyError::Garbage),
            3 if b == b' ' || b == b'-' => self.sep = b,
            3 => return Err(ReplyError::Garbage),
            _ => {
                if !self.word_done {
                    if b == b' ' || self.word_len == WORD_BYTES_MAX {
                        self.word_done = true;
                    } else {
                        self.word[self.word_len] = b.to_ascii_uppercase();
                        self.word_len += 1;
                    }
                }
            }
        }
        if self.first_line && self.text_len < TEXT_BYTES_MAX {
            self.text[self.text_len] = b;
            self.text_len += 1;
        }
        self.col += 1;
        if self.col > LINE_BYTES_MAX {
            return Err(ReplyError::TooLong);
        }
        Ok(())
    }

    fn end_line(&mut self) -> Option<Result<Reply, ReplyError>> {
        if self.col < 3 {
            return Some(Err(ReplyError::Garbage));
        }
        if self.reply_code == 0 {
            self.reply_code = self.line_code;
        } else if self.reply_code != self.line_code {
            return Some(Err(ReplyError::CodeMismatch));
        }
        // A keyword cut off at WORD_BYTES_MAX cannot be PIPELINING, which is shorter.
        if &self.word[..self.word_len] == b"PIPELINING" {
            self.pipelining = true;
        }
        let more = self.sep == b'-';
        self.col = 0;
        self.line_code = 0;
        self.sep = 0;
        self.word_len = 0;
        self.word_done = false;
        self.first_line = false;
        if more {
            return None;
        }
        let reply = Reply {
            code: self.reply_code,
            pipelining: self.pipelining,
        };
        self.reply_code = 0;
        self.first_line = true;
        Some(Ok(reply))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in chunks of `chunk` bytes and collects every outcome.
    fn parse_chunked(input: &[u8], chunk: usize) -> Vec<Result<Reply, ReplyError>> {
        let mut p = ReplyParser::new();
        let mut out = Vec::new();
        for piece in input.chunks(chunk.max(1)) {
            let mut pos = 0;
            while pos < piece.len() {
                let (used, r) = p.feed(&piece[pos..]);
                pos += used;
                match r {
                    Some(Err(e)) => {
                        out.push(Err(e));
                        return out;
                    }
                    Some(Ok(r)) => out.push(Ok(r)),
                    None => {}
                }
            }
        }
        out
    }

    fn ok(code: u16, pipelining: bool) -> Result<Reply, ReplyError> {
        Ok(Reply { code, pipelining })
    }

    #[test]
    fn single_line_replies() {
        assert_eq!(
            parse_chunked(b"220 mx.example ESMTP\r\n", 64),
            vec![ok(220, false)]
        );
        // A bare code with no text is legal (RFC 5321 4.2: textstring is optional).
        assert_eq!(parse_chunked(b"250\r\n", 64), vec![ok(250, false)]);
        // Lenient about bare LF line ends.
        assert_eq!(parse_chunked(b"354 go\n", 64), vec![ok(354, false)]);
    }

    #[test]
    fn multi_line_ehlo_reply_finds_pipelining() {
        let ehlo =
            b"250-mx.example hello\r\n250-SIZE 10240000\r\n250-pipelining\r\n250 8BITMIME\r\n";
        assert_eq!(parse_chunked(ehlo, 1000), vec![ok(250, true)]);
        let without = b"250-mx.example\r\n250-PIPELININGX\r\n250 SIZE PIPELINING\r\n";
        // Only a line whose keyword is exactly PIPELINING counts, not a prefix or a parameter.
        assert_eq!(parse_chunked(without, 1000), vec![ok(250, false)]);
    }

    #[test]
    fn split_at_every_offset_gives_the_same_replies() {
        let input: &[u8] =
            b"250-mx.example\r\n250-PIPELINING\r\n250 SIZE\r\n250 2.1.0 ok\r\n451 4.3.0 later\r\n";
        let whole = parse_chunked(input, input.len());
        assert_eq!(whole, vec![ok(250, true), ok(250, false), ok(451, false)]);
        for chunk in 1..input.len() {
            assert_eq!(parse_chunked(input, chunk), whole, "chunk size {chunk}");
        }
        // And split into exactly two pieces at every offset.
        for cut in 0..=input.len() {
            let mut p = ReplyParser::new();
            let mut got = Vec::new();
            for piece in [&input[..cut], &input[cut..]] {
                let mut pos = 0;
                while pos < piece.len() {
                    let (used, r) = p.feed(&piece[pos..]);
                    pos += used;
                    if let Some(r) = r {
                        got.push(r);
                    }
                }
            }
            assert_eq!(got, whole, "cut at {cut}");
        }
    }

    #[test]
    fn several_replies_in_one_read_return_one_at_a_time() {
        let mut p = ReplyParser::new();
        let input = b"250 ok\r\n250 ok\r\n354 go\r\n";
        let (used, r) = p.feed(input);
        assert_eq!((used, r), (8, Some(ok(250, false))));
        let (used2, r) = p.feed(&input[used..]);
        assert_eq!((used2, r), (8, Some(ok(250, false))));
        let (_, r) = p.feed(&input[16..]);
        assert_eq!(r, Some(ok(354, false)));
        assert_eq!(p.text(), "354 go");
    }

    #[test]
    fn garbage_is_an_error_not_a_reply() {
        // An HTTP server on the SMTP port.
        assert_eq!(
            parse_chunked(b"HTTP/1.1 400 Bad Request\r\n", 64),
            vec![Err(ReplyError::Garbage)]
        );
        // First digit must be 2-5.
        assert_eq!(
            parse_chunked(b"199 hmm\r\n", 64),
            vec![Err(ReplyError::Garbage)]
        );
        assert_eq!(
            parse_chunked(b"620 hmm\r\n", 64),
            vec![Err(ReplyError::Garbage)]
        );
        // Fourth byte must be SP or '-'.
        assert_eq!(
            parse_chunked(b"250Xok\r\n", 64),
            vec![Err(ReplyError::Garbage)]
        );
        // Too short.
        assert_eq!(parse_chunked(b"25\r\n", 64), vec![Err(ReplyError::Garbage)]);
        assert_eq!(parse_chunked(b"\r\n", 64), vec![Err(ReplyError::Garbage)]);
        // Codes that change inside a multi-line reply.
        assert_eq!(
            parse_chunked(b"250-a\r\n251 b\r\n", 64),
            vec![Err(ReplyError::CodeMismatch)]
        );
        let long = [b"250 ".as_slice(), &[b'x'; LINE_BYTES_MAX], b"\r\n"].concat();
        assert_eq!(parse_chunked(&long, 100), vec![Err(ReplyError::TooLong)]);
    }

    #[test]
    fn text_keeps_the_first_line_of_the_latest_reply() {
        let mut p = ReplyParser::new();
        let input = b"451-4.3.0 first\r\n451 4.3.0 second\r\n";
        let (_, r) = p.feed(input);
        assert_eq!(r, Some(ok(451, false)));
        assert_eq!(p.text(), "451-4.3.0 first");
        let (_, r) = p.feed(b"250 fine\r\n");
        assert_eq!(r, Some(ok(250, false)));
        assert_eq!(p.text(), "250 fine");
    }
}

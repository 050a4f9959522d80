//! The command-line parser: one line in (`&[u8]` without its line ending), one borrowed
//! [`Command`] or one small [`ParseError`] out. It never allocates and never buffers: every
//! field of a command is a slice of the caller's line. Splitting the byte stream into lines and
//! bounding their length (RFC 5321 4.5.3.1.4, 512 octets) is the session's job, so an `Err` here
//! always means "reject this line" (STYLE habit 1).
//!
//! Grammar (RFC 5321 4.1.1 and 4.1.2; verbs are case-insensitive, 2.4):
//!
//! ```text
//! ehlo         = "EHLO" SP ( Domain / address-literal ) CRLF
//! helo         = "HELO" SP Domain CRLF
//! mail         = "MAIL FROM:" Reverse-path [SP Mail-parameters] CRLF
//! rcpt         = "RCPT TO:" ( "<Postmaster@" Domain ">" / "<Postmaster>" / Forward-path )
//!                [SP Rcpt-parameters] CRLF
//! data / rset / quit = "DATA" / "RSET" / "QUIT" CRLF
//! noop / help  = "NOOP" / "HELP" [ SP String ] CRLF
//! vrfy / expn  = "VRFY" / "EXPN" SP String CRLF
//! Reverse-path = Path / "<>"
//! Path         = "<" [ A-d-l ":" ] Mailbox ">"
//! Mailbox      = Local-part "@" ( Domain / address-literal )
//! Local-part   = Dot-string / Quoted-string
//! esmtp-param  = esmtp-keyword ["=" esmtp-value]
//! ```
//!
//! Deliberate leniencies, because real clients need them: spaces after the colon of
//! `MAIL FROM:`/`RCPT TO:` (`MAIL FROM: <a@b>`), trailing spaces, and any HELO/EHLO argument
//! that is one non-empty token (many clients send names that are not valid domains). Source routes
//! (`<@a,@b:user@c>`) are accepted and ignored (RFC 5321 4.1.1.3). Bytes >= 0x80 are accepted in
//! paths when they are valid UTF-8; whether they are *allowed* (RFC 6531 SMTPUTF8) is decided by
//! the session, which knows the transaction, except for MAIL, which carries its own SMTPUTF8.
//!
//! MAIL parameters (RFC 1870 SIZE, RFC 1652 BODY, RFC 6531 SMTPUTF8) are parsed here; any other
//! keyword, on MAIL or RCPT, is [`ParseError::UnknownParam`] (555 5.5.4, RFC 5321 4.1.1.11).

/// The verbs we recognise, with their per-verb properties in one table (STYLE habit 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verb {
    Helo,
    Ehlo,
    Mail,
    Rcpt,
    Data,
    Rset,
    Noop,
    Quit,
    Vrfy,
    Expn,
    Help,
}

impl Verb {
    /// Every verb, in table order (for per-verb counters).
    pub const ALL: [Verb; 11] = [
        Verb::Helo,
        Verb::Ehlo,
        Verb::Mail,
        Verb::Rcpt,
        Verb::Data,
        Verb::Rset,
        Verb::Noop,
        Verb::Quit,
        Verb::Vrfy,
        Verb::Expn,
        Verb::Help,
    ];

    /// The verb as written on the wire (upper case).
    pub const fn name(self) -> &'static str {
        self.props().name
    }

    /// RFC 2920 3.1: a client must wait for this verb's reply before sending more (the end of a
    /// pipelined group). Commands found after such a verb in the same read are still answered in
    /// order; the session only counts them (Postfix's "improper command pipelining").
    pub const fn ends_group(self) -> bool {
        self.props().ends_group
    }

    /// Refused with 503 5.5.1 before HELO/EHLO (RFC 5321 4.1.4: a session starts with EHLO).
    pub const fn needs_helo(self) -> bool {
        self.props().needs_helo
    }

    /// A 4xx/5xx answer to this verb counts toward `max_errors`. False only for EXPN: its 502 is
    /// our choice not to expand lists (RFC 5321 7.3), not a client mistake.
    pub const fn counts_errors(self) -> bool {
        self.props().counts_errors
    }

    /// The syntax shown in a 501 reply for this verb (STYLE habit 2: errors carry the syntax).
    pub const fn syntax(self) -> &'static str {
        self.props().syntax
    }

    /// The index of this verb in [`Verb::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }

    const fn props(self) -> &'static Props {
        &TABLE[self as usize]
    }

    /// Looks up a verb token case-insensitively.
    fn from_token(tok: &[u8]) -> Option<Verb> {
        if tok.len() != 4 {
            return None;
        }
        // Fold ASCII letters to upper case. Only 0x41..=0x5A and 0x61..=0x7A land on upper-case
        // letters under `& !0x20`, so no other byte can be mistaken for a verb's letter.
        let up = [
            tok[0] & !0x20,
            tok[1] & !0x20,
            tok[2] & !0x20,
            tok[3] & !0x20,
        ];
        Some(match &up {
            b"HELO" => Verb::Helo,
            b"EHLO" => Verb::Ehlo,
            b"MAIL" => Verb::Mail,
            b"RCPT" => Verb::Rcpt,
            b"DATA" => Verb::Data,
            b"RSET" => Verb::Rset,
            b"NOOP" => Verb::Noop,
            b"QUIT" => Verb::Quit,
            b"VRFY" => Verb::Vrfy,
            b"EXPN" => Verb::Expn,
            b"HELP" => Verb::Help,
            _ => return None,
        })
    }
}

struct Props {
    name: &'static str,
    ends_group: bool,
    needs_helo: bool,
    counts_errors: bool,
    syntax: &'static str,
}

/// Indexed by `Verb as usize`; keep in the order of the enum.
const TABLE: [Props; 11] = [
    Props {
        name: "HELO",
        ends_group: false,
        needs_helo: false,
        counts_errors: true,
        syntax: "HELO hostname",
    },
    Props {
        name: "EHLO",
        ends_group: true,
        needs_helo: false,
        counts_errors: true,
        syntax: "EHLO hostname",
    },
    Props {
        name: "MAIL",
        ends_group: false,
        needs_helo: true,
        counts_errors: true,
        syntax: "MAIL FROM:<address> [SIZE=n] [BODY=7BIT|8BITMIME] [SMTPUTF8]",
    },
    Props {
        name: "RCPT",
        ends_group: false,
        needs_helo: true,
        counts_errors: true,
        syntax: "RCPT TO:<address>",
    },
    Props {
        name: "DATA",
        ends_group: true,
        needs_helo: true,
        counts_errors: true,
        syntax: "DATA",
    },
    Props {
        name: "RSET",
        ends_group: false,
        needs_helo: false,
        counts_errors: true,
        syntax: "RSET",
    },
    Props {
        name: "NOOP",
        ends_group: true,
        needs_helo: false,
        counts_errors: true,
        syntax: "NOOP",
    },
    Props {
        name: "QUIT",
        ends_group: true,
        needs_helo: false,
        counts_errors: true,
        syntax: "QUIT",
    },
    Props {
        name: "VRFY",
        ends_group: true,
        needs_helo: false,
        counts_errors: true,
        syntax: "VRFY address",
    },
    Props {
        name: "EXPN",
        ends_group: true,
        needs_helo: false,
        counts_errors: false,
        syntax: "EXPN list",
    },
    Props {
        name: "HELP",
        ends_group: false,
        needs_helo: false,
        counts_errors: true,
        syntax: "HELP [topic]",
    },
];

/// BODY= parameter of MAIL (RFC 1652).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    SevenBit,
    EightBitMime,
}

/// A mailbox path, borrowed from the line, without angle brackets and source route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Path<'a> {
    /// The mailbox as sent (`local@domain`), or `b""` for the null path `<>`, or `postmaster`.
    pub mailbox: &'a [u8],
    /// The domain part (after the last `@` outside a quoted local part); empty for `<>` and for a
    /// bare `<postmaster>`.
    pub domain: &'a [u8],
}

impl<'a> Path<'a> {
    /// True for the bare `<postmaster>` (RFC 5321 4.5.1), any case.
    pub fn is_bare_postmaster(&self) -> bool {
        self.domain.is_empty() && self.mailbox.eq_ignore_ascii_case(b"postmaster")
    }

    /// True when the path carries bytes >= 0x80 (needs SMTPUTF8, RFC 6531).
    pub fn is_non_ascii(&self) -> bool {
        !self.mailbox.is_ascii()
    }
}

/// The parameters of MAIL FROM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MailParams {
    /// SIZE=n (RFC 1870). A value too large for u64 saturates to `u64::MAX`.
    pub size: Option<u64>,
    pub body: Option<Body>,
    pub smtputf8: bool,
}

/// One parsed command line. Every slice borrows the input line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command<'a> {
    /// The HELO argument (one token, trimmed).
    Helo(&'a [u8]),
    Ehlo(&'a [u8]),
    Mail {
        from: Path<'a>,
        params: MailParams,
    },
    Rcpt {
        to: Path<'a>,
    },
    Data,
    Rset,
    Noop,
    Quit,
    Vrfy(&'a [u8]),
    Expn(&'a [u8]),
    Help,
}

impl Command<'_> {
    pub fn verb(&self) -> Verb {
        match self {
            Command::Helo(_) => Verb::Helo,
            Command::Ehlo(_) => Verb::Ehlo,
            Command::Mail { .. } => Verb::Mail,
            Command::Rcpt { .. } => Verb::Rcpt,
            Command::Data => Verb::Data,
            Command::Rset => Verb::Rset,
            Command::Noop => Verb::Noop,
            Command::Quit => Verb::Quit,
            Command::Vrfy(_) => Verb::Vrfy,
            Command::Expn(_) => Verb::Expn,
            Command::Help => Verb::Help,
        }
    }
}

/// Why a line was rejected. Each maps to exactly one reply (see `reply`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// Not a verb we know: 500 5.5.2.
    Unknown,
    /// A known verb with bad arguments: 501 5.5.4 with the verb's syntax.
    Syntax(Verb),
    /// An ESMTP parameter we do not support: 555 5.5.4.
    UnknownParam(Verb),
    /// MAIL with a non-ASCII reverse path but no SMTPUTF8 parameter: 553 5.6.7.
    NeedsSmtputf8,
}

impl ParseError {
    /// The verb the line started with, when it was one we know.
    pub fn verb(&self) -> Option<Verb> {
        match *self {
            ParseError::Unknown => None,
            ParseError::Syntax(v) | ParseError::UnknownParam(v) => Some(v),
            ParseError::NeedsSmtputf8 => Some(Verb::Mail),
        }
    }
}

/// Parses one command line given without its CRLF (or bare LF).
pub fn parse_command(line: &[u8]) -> Result<Command<'_>, ParseError> {
    let line = trim_end(line);
    let (tok, rest) = match memchr::memchr(b' ', line) {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, &line[line.len()..]),
    };
    let verb = Verb::from_token(tok).ok_or(ParseError::Unknown)?;
    let syntax = ParseError::Syntax(verb);
    // `tok` without a following space means no argument at all.
    let has_arg = tok.len() < line.len();
    match verb {
        Verb::Helo | Verb::Ehlo => {
            let arg = trim_start(rest);
            if arg.is_empty() || !arg.iter().all(|&b| b > b' ' && b != 0x7f) {
                return Err(syntax);
            }
            Ok(if verb == Verb::Helo {
                Command::Helo(arg)
            } else {
                Command::Ehlo(arg)
            })
        }
        Verb::Mail => {
            let rest = strip_prefix_ci(rest, b"FROM:").ok_or(syntax)?;
            let (path, params) = split_path(trim_start(rest)).ok_or(syntax)?;
            let from = if path == b"<>" {
                Path {
                    mailbox: b"",
                    domain: b"",
                }
            } else {
                parse_path(path, false).ok_or(syntax)?
            };
            let params = parse_mail_params(params)?;
            if from.is_non_ascii() && !params.smtputf8 {
                return Err(ParseError::NeedsSmtputf8);
            }
            Ok(Command::Mail { from, params })
        }
        Verb::Rcpt => {
            let rest = strip_prefix_ci(rest, b"TO:").ok_or(syntax)?;
            let (path, params) = split_path(trim_start(rest)).ok_or(syntax)?;
            let to = parse_path(path, true).ok_or(syntax)?;
            if !trim_start(params).is_empty() {
                // We offer no RCPT parameters (no DSN): RFC 5321 4.1.1.11.
                return Err(ParseError::UnknownParam(verb));
            }
            Ok(Command::Rcpt { to })
        }
        Verb::Data | Verb::Rset | Verb::Quit => {
            if has_arg && !trim_start(rest).is_empty() {
                return Err(syntax);
            }
            Ok(match verb {
                Verb::Data => Command::Data,
                Verb::Rset => Command::Rset,
                _ => Command::Quit,
            })
        }
        // NOOP and HELP take an optional string that we ignore (RFC 5321 4.1.1.9, 4.1.1.8).
        Verb::Noop => Ok(Command::Noop),
        Verb::Help => Ok(Command::Help),
        Verb::Vrfy | Verb::Expn => {
            let arg = trim_start(rest);
            if arg.is_empty() {
                return Err(syntax);
            }
            Ok(if verb == Verb::Vrfy {
                Command::Vrfy(arg)
            } else {
                Command::Expn(arg)
            })
        }
    }
}

fn trim_end(mut s: &[u8]) -> &[u8] {
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

fn trim_start(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    s
}

fn strip_prefix_ci<'a>(s: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    if s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix) {
        Some(&s[prefix.len()..])
    } else {
        None
    }
}

/// Splits `<path> params` into the bracketed path (brackets included) and the rest. The path
/// ends at the first `>` outside a quoted string.
fn split_path(s: &[u8]) -> Option<(&[u8], &[u8])> {
    if s.first() != Some(&b'<') {
        return None;
    }
    let mut quoted = false;
    let mut i = 1;
    while i < s.len() {
        match s[i] {
            b'\\' if quoted => i += 1,
            b'"' => quoted = !quoted,
            b'>' if !quoted => {
                let rest = &s[i + 1..];
                // The parameters must be separated from the path by a space.
                if !rest.is_empty() && rest[0] != b' ' {
                    return None;
                }
                return Some((&s[..=i], rest));
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// RFC 5322 `atext` (what RFC 5321 4.1.2's Dot-string is made of, besides dots), plus UTF-8
/// bytes (RFC 6531), as a table: one load per byte.
const ATEXT: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric() || c >= 0x80;
        b += 1;
    }
    let specials = b"!#$%&'*+-/=?^_`{|}~";
    let mut i = 0;
    while i < specials.len() {
        t[specials[i] as usize] = true;
        i += 1;
    }
    t
};

/// `Dot-string = Atom *("." Atom)`: atext runs separated by single dots.
fn valid_dot_string(s: &[u8]) -> bool {
    let mut prev_dot = true; // so that a leading dot fails
    for &b in s {
        if b == b'.' {
            if prev_dot {
                return false;
            }
            prev_dot = true;
        } else if ATEXT[usize::from(b)] {
            prev_dot = false;
        } else {
            return false;
        }
    }
    !prev_dot
}

/// Parses `<[A-d-l:]Mailbox>`; `allow_bare` admits `<postmaster>` (RCPT only).
fn parse_path(path: &[u8], allow_bare: bool) -> Option<Path<'_>> {
    let inner = path.strip_prefix(b"<")?.strip_suffix(b">")?;
    // A source route `@a,@b:` is accepted and ignored (RFC 5321 4.1.1.3, appendix C).
    let mailbox = if inner.first() == Some(&b'@') {
        let colon = memchr::memchr(b':', inner)?;
        let route = &inner[..colon];
        if route.iter().any(|&b| b == b' ' || b == b'<' || b == b'>') {
            return None;
        }
        &inner[colon + 1..]
    } else {
        inner
    };
    if mailbox.is_empty() || std::str::from_utf8(mailbox).is_err() {
        return None;
    }
    if allow_bare && mailbox.eq_ignore_ascii_case(b"postmaster") {
        return Some(Path {
            mailbox,
            domain: b"",
        });
    }
    // Local part: a quoted string or a dot-string.
    let at = if mailbox[0] == b'"' {
        let mut i = 1;
        loop {
            match *mailbox.get(i)? {
                b'\\' => {
                    // quoted-pairSMTP: backslash followed by any printable ASCII.
                    let next = *mailbox.get(i + 1)?;
                    if !(b' '..=b'~').contains(&next) {
                        return None;
                    }
                    i += 2;
                }
                b'"' => break i + 1,
                b if b < b' ' || b == 0x7f => return None,
                _ => i += 1,
            }
        }
    } else {
        let at = memchr::memrchr(b'@', mailbox)?;
        if !valid_dot_string(&mailbox[..at]) {
            return None;
        }
        at
    };
    if mailbox.get(at) != Some(&b'@') {
        return None;
    }
    let domain = &mailbox[at + 1..];
    if !valid_domain(domain) {
        return None;
    }
    Some(Path { mailbox, domain })
}

/// `Domain / address-literal` (RFC 5321 4.1.2, 4.1.3), with UTF-8 U-labels allowed (RFC 6531).
fn valid_domain(d: &[u8]) -> bool {
    if let Some(lit) = d.strip_prefix(b"[") {
        return match lit.strip_suffix(b"]") {
            Some(inner) => {
                !inner.is_empty()
                    && inner.iter().all(|&b| {
                        (b'!'..=b'~').contains(&b) && b != b'[' && b != b']' && b != b'\\'
                    })
            }
            None => false,
        };
    }
    !d.is_empty()
        && d.split(|&b| b == b'.').all(|label| {
            !label.is_empty()
                && !label.starts_with(b"-")
                && !label.ends_with(b"-")
                && label
                    .iter()
                    .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b >= 0x80)
        })
}

fn parse_mail_params(s: &[u8]) -> Result<MailParams, ParseError> {
    let syntax = ParseError::Syntax(Verb::Mail);
    let mut p = MailParams::default();
    for param in s.split(|&b| b == b' ').filter(|p| !p.is_empty()) {
        let (key, value) = match memchr::memchr(b'=', param) {
            Some(i) => (&param[..i], Some(&param[i + 1..])),
            None => (param, None),
        };
        if key.eq_ignore_ascii_case(b"SIZE") {
            let v = value.ok_or(syntax)?;
            if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
                return Err(syntax);
            }
            // A number too large for u64 is certainly over any limit: saturate, do not fail.
            let n = v.iter().fold(0u64, |n, &d| {
                n.saturating_mul(10).saturating_add(u64::from(d - b'0'))
            });
            p.size = Some(n);
        } else if key.eq_ignore_ascii_case(b"BODY") {
            let v = value.ok_or(syntax)?;
            p.body = Some(if v.eq_ignore_ascii_case(b"7BIT") {
                Body::SevenBit
            } else if v.eq_ignore_ascii_case(b"8BITMIME") {
                Body::EightBitMime
            } else {
                return Err(syntax);
            });
        } else if key.eq_ignore_ascii_case(b"SMTPUTF8") {
            if value.is_some() {
                return Err(syntax);
            }
            p.smtputf8 = true;
        } else {
            return Err(ParseError::UnknownParam(Verb::Mail));
        }
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path<'a>(mailbox: &'a str, domain: &'a str) -> Path<'a> {
        Path {
            mailbox: mailbox.as_bytes(),
            domain: domain.as_bytes(),
        }
    }

    fn mail<'a>(
        mailbox: &'a str,
        domain: &'a str,
        params: MailParams,
    ) -> Result<Command<'a>, ParseError> {
        Ok(Command::Mail {
            from: path(mailbox, domain),
            params,
        })
    }

    fn rcpt<'a>(mailbox: &'a str, domain: &'a str) -> Result<Command<'a>, ParseError> {
        Ok(Command::Rcpt {
            to: path(mailbox, domain),
        })
    }

    const NONE: MailParams = MailParams {
        size: None,
        body: None,
        smtputf8: false,
    };
    const SYN_MAIL: Result<Command<'static>, ParseError> = Err(ParseError::Syntax(Verb::Mail));
    const SYN_RCPT: Result<Command<'static>, ParseError> = Err(ParseError::Syntax(Verb::Rcpt));

    #[test]
    fn table() {
        let cases: Vec<(&str, Result<Command, ParseError>)> = vec![
            ("EHLO client.example", Ok(Command::Ehlo(b"client.example"))),
            // Verbs are case-insensitive (RFC 5321 2.4).
            ("ehlo client.example", Ok(Command::Ehlo(b"client.example"))),
            ("HeLo x", Ok(Command::Helo(b"x"))),
            // Address literals are fine as HELO arguments.
            ("EHLO [192.0.2.1]", Ok(Command::Ehlo(b"[192.0.2.1]"))),
            (
                "EHLO client.example  ",
                Ok(Command::Ehlo(b"client.example")),
            ),
            ("EHLO", Err(ParseError::Syntax(Verb::Ehlo))),
            ("EHLO ", Err(ParseError::Syntax(Verb::Ehlo))),
            // Two tokens: we accept one name only.
            ("HELO a b", Err(ParseError::Syntax(Verb::Helo))),
            (
                "MAIL FROM:<a@b.example>",
                mail("a@b.example", "b.example", NONE),
            ),
            (
                "mail from:<a@b.example>",
                mail("a@b.example", "b.example", NONE),
            ),
            // Real clients put a space after the colon.
            (
                "MAIL FROM: <a@b.example>",
                mail("a@b.example", "b.example", NONE),
            ),
            ("MAIL FROM:<>", mail("", "", NONE)),
            (
                "MAIL FROM:<> SIZE=1000",
                mail(
                    "",
                    "",
                    MailParams {
                        size: Some(1000),
                        ..NONE
                    },
                ),
            ),
            (
                "MAIL FROM:<a@b.c> SIZE=10 BODY=8BITMIME SMTPUTF8",
                mail(
                    "a@b.c",
                    "b.c",
                    MailParams {
                        size: Some(10),
                        body: Some(Body::EightBitMime),
                        smtputf8: true,
                    },
                ),
            ),
            (
                "MAIL FROM:<a@b.c> body=7bit",
                mail(
                    "a@b.c",
                    "b.c",
                    MailParams {
                        body: Some(Body::SevenBit),
                        ..NONE
                    },
                ),
            ),
            // An absurd SIZE saturates so that it is refused as too big, not as bad syntax.
            (
                "MAIL FROM:<a@b.c> SIZE=99999999999999999999999999",
                mail(
                    "a@b.c",
                    "b.c",
                    MailParams {
                        size: Some(u64::MAX),
                        ..NONE
                    },
                ),
            ),
            ("MAIL FROM:<a@b.c> SIZE=", SYN_MAIL),
            ("MAIL FROM:<a@b.c> SIZE=12k", SYN_MAIL),
            ("MAIL FROM:<a@b.c> BODY=BINARYMIME", SYN_MAIL),
            ("MAIL FROM:<a@b.c> SMTPUTF8=yes", SYN_MAIL),
            (
                "MAIL FROM:<a@b.c> RET=HDRS",
                Err(ParseError::UnknownParam(Verb::Mail)),
            ),
            (
                "MAIL FROM:<a@b.c> AUTH=<>",
                Err(ParseError::UnknownParam(Verb::Mail)),
            ),
            // No brackets: strict RFC 5321, as Postfix with strict_rfc821_envelopes.
            ("MAIL FROM:a@b.c", SYN_MAIL),
            ("MAIL FROM:", SYN_MAIL),
            ("MAIL", SYN_MAIL),
            ("MAIL TO:<a@b.c>", SYN_MAIL),
            ("MAIL FROM:<a@b.c>SIZE=1", SYN_MAIL),
            ("MAIL FROM:<a@b.c", SYN_MAIL),
            ("MAIL FROM:<a b@c>", SYN_MAIL),
            ("MAIL FROM:<a@>", SYN_MAIL),
            ("MAIL FROM:<@b.c>", SYN_MAIL),
            ("MAIL FROM:<a..b@c>", SYN_MAIL),
            ("MAIL FROM:<.a@c>", SYN_MAIL),
            ("MAIL FROM:<a.@c>", SYN_MAIL),
            ("MAIL FROM:<a(b)@c>", SYN_MAIL),
            ("MAIL FROM:<a.b+tag@c>", mail("a.b+tag@c", "c", NONE)),
            ("MAIL FROM:<a@b..c>", SYN_MAIL),
            ("MAIL FROM:<a@-b.c>", SYN_MAIL),
            // The bare postmaster is a RCPT form only.
            ("MAIL FROM:<postmaster>", SYN_MAIL),
            // Quoted local parts may hold spaces, '@' and '>'.
            (
                "MAIL FROM:<\"a b@>\"@c.d>",
                mail("\"a b@>\"@c.d", "c.d", NONE),
            ),
            // A source route is ignored.
            (
                "MAIL FROM:<@relay.example:a@b.c>",
                mail("a@b.c", "b.c", NONE),
            ),
            (
                "MAIL FROM:<a@[192.0.2.1]>",
                mail("a@[192.0.2.1]", "[192.0.2.1]", NONE),
            ),
            // Non-ASCII needs SMTPUTF8 on the same MAIL.
            ("MAIL FROM:<j\u{f6}rg@b.c>", Err(ParseError::NeedsSmtputf8)),
            (
                "MAIL FROM:<j\u{f6}rg@b.c> SMTPUTF8",
                mail(
                    "j\u{f6}rg@b.c",
                    "b.c",
                    MailParams {
                        smtputf8: true,
                        ..NONE
                    },
                ),
            ),
            ("RCPT TO:<x@y.example>", rcpt("x@y.example", "y.example")),
            ("rcpt to: <x@y.example>", rcpt("x@y.example", "y.example")),
            ("RCPT TO:<Postmaster>", rcpt("Postmaster", "")),
            ("RCPT TO:<POSTMASTER>", rcpt("POSTMASTER", "")),
            (
                "RCPT TO:<postmaster@y.example>",
                rcpt("postmaster@y.example", "y.example"),
            ),
            // RCPT's path is parsed here; whether non-ASCII is allowed depends on the MAIL.
            (
                "RCPT TO:<\u{e9}@y.example>",
                rcpt("\u{e9}@y.example", "y.example"),
            ),
            ("RCPT TO:<>", SYN_RCPT),
            ("RCPT TO:<x>", SYN_RCPT),
            ("RCPT TO:x@y", SYN_RCPT),
            ("RCPT FROM:<x@y>", SYN_RCPT),
            (
                "RCPT TO:<x@y> NOTIFY=NEVER",
                Err(ParseError::UnknownParam(Verb::Rcpt)),
            ),
            ("DATA", Ok(Command::Data)),
            ("data", Ok(Command::Data)),
            ("DATA x", Err(ParseError::Syntax(Verb::Data))),
            ("RSET", Ok(Command::Rset)),
            ("QUIT", Ok(Command::Quit)),
            ("QUIT now", Err(ParseError::Syntax(Verb::Quit))),
            ("NOOP", Ok(Command::Noop)),
            ("NOOP anything at all", Ok(Command::Noop)),
            ("HELP", Ok(Command::Help)),
            ("HELP MAIL", Ok(Command::Help)),
            ("VRFY user", Ok(Command::Vrfy(b"user"))),
            ("VRFY", Err(ParseError::Syntax(Verb::Vrfy))),
            ("EXPN list", Ok(Command::Expn(b"list"))),
            ("", Err(ParseError::Unknown)),
            ("STARTTLS", Err(ParseError::Unknown)),
            ("BDAT 10 LAST", Err(ParseError::Unknown)),
            ("MAILFROM:<a@b>", Err(ParseError::Unknown)),
            // Lookalike bytes that fold onto letters with `& !0x20` must not match.
            ("\u{0}ATA", Err(ParseError::Unknown)),
            ("DAT\x01", Err(ParseError::Unknown)),
            ("GET / HTTP/1.1", Err(ParseError::Unknown)),
        ];
        for (line, want) in cases {
            assert_eq!(parse_command(line.as_bytes()), want, "line {line:?}");
        }
    }

    #[test]
    fn invalid_utf8_in_path_is_syntax() {
        assert_eq!(parse_command(b"MAIL FROM:<\xff@b.c> SMTPUTF8"), SYN_MAIL);
        assert_eq!(parse_command(b"RCPT TO:<\xc3@b.c>"), SYN_RCPT);
    }

    #[test]
    fn verb_table_is_in_enum_order() {
        for (i, v) in Verb::ALL.iter().enumerate() {
            assert_eq!(v.index(), i);
            assert_eq!(Verb::from_token(v.name().as_bytes()), Some(*v));
        }
        assert!(Verb::Data.ends_group() && Verb::Quit.ends_group() && !Verb::Rcpt.ends_group());
        assert!(Verb::Mail.needs_helo() && !Verb::Noop.needs_helo());
    }

    #[test]
    fn never_panics_on_any_short_input() {
        // Every line of up to 3 bytes from an alphabet of SMTP-significant bytes.
        let alphabet = b"<>@:\" .=\\MAILFROM\x80\xff";
        for a in alphabet {
            for b in alphabet {
                for c in alphabet {
                    let line = [
                        b'M', b'A', b'I', b'L', b' ', b'F', b'R', b'O', b'M', b':', *a, *b, *c,
                    ];
                    let _ = parse_command(&line);
                    let _ = parse_command(&line[4..]);
                }
            }
        }
    }
}

//! Reply codes and prebuilt reply lines (RFC 5321 4.2, enhanced codes RFC 3463 / RFC 2034).
//!
//! Every 2xx/4xx/5xx reply carries an enhanced status code, also before EHLO: RFC 2034 requires
//! them once the client said EHLO, and clients that do not know them read them as text (Postfix
//! does the same). 220, 354 and the lines of the EHLO reply carry none, as RFC 2034 section 4 says.
//! Texts that need no run-time part are `&'static [u8]` constants so that answering a command is
//! one `extend_from_slice`.

/// A fixed reply: the full line(s), CRLF included.
pub type Fixed = &'static [u8];

pub const MAIL_OK: Fixed = b"250 2.1.0 Ok\r\n";
pub const RCPT_OK: Fixed = b"250 2.1.5 Ok\r\n";
pub const OK: Fixed = b"250 2.0.0 Ok\r\n";
pub const DATA_GO: Fixed = b"354 End data with <CR><LF>.<CR><LF>\r\n";
pub const VRFY: Fixed =
    b"252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery\r\n";
pub const HELP: Fixed =
    b"214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP\r\n";
pub const BYE: Fixed = b"221 2.0.0 Bye\r\n";

pub const UNKNOWN: Fixed = b"500 5.5.2 Error: command not recognized\r\n";
pub const LINE_TOO_LONG: Fixed = b"500 5.5.6 Error: line too long\r\n";
pub const EXPN: Fixed = b"502 5.5.1 Error: EXPN not implemented\r\n";
pub const NEED_HELO: Fixed = b"503 5.5.1 Error: send HELO/EHLO first\r\n";
pub const NEED_MAIL: Fixed = b"503 5.5.1 Error: need MAIL command\r\n";
pub const NEED_RCPT: Fixed = b"503 5.5.1 Error: need RCPT command\r\n";
pub const NESTED_MAIL: Fixed = b"503 5.5.1 Error: nested MAIL command\r\n";
pub const UNKNOWN_PARAM: Fixed = b"555 5.5.4 Unsupported option\r\n";
pub const NEEDS_SMTPUTF8: Fixed = b"553 5.6.7 Non-ASCII address requires SMTPUTF8\r\n";
pub const DOMAIN_DENIED: Fixed = b"550 5.7.1 Recipient domain not accepted here\r\n";
pub const TOO_MANY_RCPTS: Fixed = b"452 4.5.3 Error: too many recipients\r\n";
pub const TOO_BIG: Fixed = b"552 5.3.4 Message size exceeds fixed limit\r\n";
pub const BARE_CR_LF: Fixed =
    b"550 5.6.11 Message contains bare CR or LF; lines must end with CRLF\r\n";
pub const NO_SPACE: Fixed = b"452 4.3.1 Insufficient system storage\r\n";
pub const LOCAL_ERROR: Fixed = b"451 4.3.0 Local error in processing\r\n";

/// `220 <hostname> ESMTP`
pub fn greeting(out: &mut Vec<u8>, hostname: &str) {
    line(out, b"220 ", hostname, b" ESMTP");
}

/// The multi-line EHLO reply listing our extensions (RFC 1870 SIZE, 1652 8BITMIME, 2034, 2920,
/// 6531).
pub fn ehlo(out: &mut Vec<u8>, hostname: &str, max_message_size: u64) {
    line(out, b"250-", hostname, b"");
    out.extend_from_slice(b"250-PIPELINING\r\n250-SIZE ");
    push_u64(out, max_message_size);
    out.extend_from_slice(b"\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250 SMTPUTF8\r\n");
}

/// `250 <hostname>`
pub fn helo(out: &mut Vec<u8>, hostname: &str) {
    line(out, b"250 ", hostname, b"");
}

/// `501 5.5.4 Syntax: <syntax>`
pub fn syntax(out: &mut Vec<u8>, syntax: &str) {
    line(out, b"501 5.5.4 Syntax: ", syntax, b"");
}

/// `250 2.0.0 Ok: queued as <id>`
pub fn queued(out: &mut Vec<u8>, queue_id: &str) {
    line(out, b"250 2.0.0 Ok: queued as ", queue_id, b"");
}

/// `421 4.7.0 <hostname> Error: too many errors`
pub fn too_many_errors(out: &mut Vec<u8>, hostname: &str) {
    line(out, b"421 4.7.0 ", hostname, b" Error: too many errors");
}

/// `421 4.3.2 <hostname> Service shutting down`
pub fn shutting_down(out: &mut Vec<u8>, hostname: &str) {
    line(out, b"421 4.3.2 ", hostname, b" Service shutting down");
}

/// `421 4.4.2 <hostname> Error: timeout exceeded`
pub fn timeout(out: &mut Vec<u8>, hostname: &str) {
    line(out, b"421 4.4.2 ", hostname, b" Error: timeout exceeded");
}

/// `421 4.4.2 <hostname> Error: session time limit exceeded`
pub fn session_time_limit(out: &mut Vec<u8>, hostname: &str) {
    line(
        out,
        b"421 4.4.2 ",
        hostname,
        b" Error: session time limit exceeded",
    );
}

fn line(out: &mut Vec<u8>, head: &[u8], middle: &str, tail: &[u8]) {
    out.extend_from_slice(head);
    // A reply line must not be split by a CR or LF smuggled in through a configured name.
    out.extend(
        middle
            .bytes()
            .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
    );
    out.extend_from_slice(tail);
    out.extend_from_slice(b"\r\n");
}

fn push_u64(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(decimal(n, &mut [0; 20]));
}

/// `n` in decimal ASCII, written into the end of `buf` (20 bytes hold any u64), without `fmt`.
/// Also used by the log line formatter.
pub fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

/// The three-digit code at the start of a reply, for tests and logs.
pub fn code(reply: &[u8]) -> Option<u16> {
    let d = reply.get(..3)?;
    if d.iter().all(u8::is_ascii_digit) {
        Some(d.iter().fold(0u16, |n, &b| n * 10 + u16::from(b - b'0')))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ehlo_lists_extensions_and_size() {
        let mut out = Vec::new();
        ehlo(&mut out, "mx.example", 26_214_400);
        assert_eq!(
            out,
            b"250-mx.example\r\n250-PIPELINING\r\n250-SIZE 26214400\r\n250-8BITMIME\r\n\
              250-ENHANCEDSTATUSCODES\r\n250 SMTPUTF8\r\n"
        );
        out.clear();
        ehlo(&mut out, "h", 0);
        assert!(out.windows(8).any(|w| w == b"SIZE 0\r\n"));
    }

    #[test]
    fn every_fixed_error_has_an_enhanced_code() {
        for r in [
            MAIL_OK,
            RCPT_OK,
            OK,
            VRFY,
            HELP,
            BYE,
            UNKNOWN,
            LINE_TOO_LONG,
            EXPN,
            NEED_HELO,
            NEED_MAIL,
            NEED_RCPT,
            NESTED_MAIL,
            UNKNOWN_PARAM,
            NEEDS_SMTPUTF8,
            DOMAIN_DENIED,
            TOO_MANY_RCPTS,
            TOO_BIG,
            BARE_CR_LF,
            NO_SPACE,
            LOCAL_ERROR,
        ] {
            let class = r[0];
            assert_eq!(r[3], b' ');
            assert_eq!(r[4], class, "{}", String::from_utf8_lossy(r));
            assert_eq!(r[5], b'.');
            assert!(r.ends_with(b"\r\n"));
        }
    }

    #[test]
    fn names_cannot_inject_lines() {
        let mut out = Vec::new();
        greeting(&mut out, "a\r\n250 evil");
        assert_eq!(out, b"220 a  250 evil ESMTP\r\n");
    }
}

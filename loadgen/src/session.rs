//! One scripted client session as a state machine: replies in, commands and events out.
//!
//! Sans-I/O: the engine feeds it each complete reply and gets back what to send next (appended
//! to a buffer it owns) plus what happened (greeted, message accepted, an error of some kind).
//! The script is EHLO (HELO if EHLO is not recognised), then `messages` transactions of MAIL,
//! `recipients` RCPTs, DATA and the message, then QUIT. With `--pipelining` and a server that
//! offers PIPELINING, MAIL, the RCPTs and DATA go in one write (RFC 2920 3.1: DATA ends a group).
//! A refused step is counted once, where it happened; a refused transaction is followed by RSET
//! and the next one; 421 ends the session (the server is closing).

use crate::errors::ErrorKind;
use crate::message::Template;

/// What every session of a run does. Built once, shared read-only by the threads.
#[derive(Debug, Clone)]
pub struct Script {
    pub helo: Template,
    pub from: Template,
    pub to: Template,
    pub messages: u64,
    pub recipients: u64,
    /// Pipeline when the server offers it.
    pub pipelining: bool,
}

/// The reply the session waits for next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Banner,
    Ehlo,
    Helo,
    Mail,
    Rcpt(u64),
    Data,
    EndOfData,
    Rset,
    Quit,
    Done,
}

impl Step {
    pub fn name(&self) -> &'static str {
        match self {
            Step::Banner => "the 220 banner",
            Step::Ehlo => "EHLO",
            Step::Helo => "HELO",
            Step::Mail => "MAIL",
            Step::Rcpt(_) => "RCPT",
            Step::Data => "DATA",
            Step::EndOfData => "the end of data",
            Step::Rset => "RSET",
            Step::Quit => "QUIT",
            Step::Done => "the end of the session",
        }
    }
}

/// What the engine must do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Commands were appended to the buffer: send them, then wait for the next reply.
    Send,
    /// Send the message (DATA was accepted), then wait for its reply.
    SendMessage,
    /// Nothing to send: the next reply is already due (a pipelined group).
    Wait,
    /// Close the connection; the session is over.
    Close,
}

/// Things that happened, for timing and counting. Several can happen on one reply; the engine
/// handles them in the order of the constants.
pub mod ev {
    pub const GREETED: u8 = 1;
    pub const EHLO_SENT: u8 = 2;
    pub const EHLO_DONE: u8 = 4;
    /// A transaction ended with the message accepted.
    pub const ACCEPTED: u8 = 8;
    /// A transaction ended without the message being accepted.
    pub const FAILED: u8 = 16;
    /// A new transaction's MAIL was written.
    pub const MAIL_SENT: u8 = 32;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub action: Action,
    pub events: u8,
    /// An error counted at this step.
    pub error: Option<(ErrorKind, Step)>,
}

#[derive(Debug, Clone)]
pub struct Session {
    /// Session number, unique in the run.
    pub n: u64,
    step: Step,
    /// Message number within the session.
    m: u64,
    accepted_rcpts: u64,
    pipelined: bool,
    server_pipelining: bool,
    /// The transaction failed already (counted); later replies in its pipelined group are
    /// consequences, not new errors.
    txn_failed: bool,
    pub errors: u64,
}

impl Session {
    pub fn new(n: u64) -> Session {
        Session {
            n,
            step: Step::Banner,
            m: 0,
            accepted_rcpts: 0,
            pipelined: false,
            server_pipelining: false,
            txn_failed: false,
            errors: 0,
        }
    }

    pub fn step(&self) -> Step {
        self.step
    }

    /// The server may close now without it being an error (QUIT was sent).
    pub fn closing_is_fine(&self) -> bool {
        matches!(self.step, Step::Quit | Step::Done)
    }

    /// The server offered PIPELINING in its EHLO reply.
    pub fn server_pipelining(&self) -> bool {
        self.server_pipelining
    }

    /// The reply was not SMTP: count it and close.
    pub fn on_garbage(&mut self) -> Outcome {
        self.errors += 1;
        let step = self.step;
        self.step = Step::Done;
        Outcome {
            action: Action::Close,
            events: self.fail_events(step),
            error: Some((ErrorKind::Protocol, step)),
        }
    }

    /// A message in flight when the session breaks counts as failed.
    fn fail_events(&self, step: Step) -> u8 {
        let in_txn = matches!(
            step,
            Step::Mail | Step::Rcpt(_) | Step::Data | Step::EndOfData
        );
        if in_txn && !self.txn_failed {
            ev::FAILED
        } else {
            0
        }
    }

    /// The connection broke (reset, closed, timed out) while waiting at the current step.
    pub fn on_broken(&mut self, kind: ErrorKind) -> Outcome {
        self.errors += 1;
        let step = self.step;
        self.step = Step::Done;
        Outcome {
            action: Action::Close,
            events: self.fail_events(step),
            error: Some((kind, step)),
        }
    }

    pub fn on_reply(
        &mut self,
        script: &Script,
        code: u16,
        pipelining: bool,
        out: &mut Vec<u8>,
    ) -> Outcome {
        let step = self.step;
        let class = code / 100;
        let mut o = Outcome {
            action: Action::Send,
            events: 0,
            error: None,
        };
        if code == 421 && step != Step::Quit {
            // RFC 5321 3.8: the server is shutting the channel.
            self.errors += 1;
            o.error = Some((ErrorKind::Reply(code), step));
            o.events = self.fail_events(step);
            o.action = Action::Close;
            self.step = Step::Done;
            return o;
        }
        let refused = ErrorKind::from_reply(code);
        match step {
            Step::Banner | Step::Ehlo | Step::Helo if class == 2 => {
                if step == Step::Banner {
                    o.events |= ev::GREETED | ev::EHLO_SENT;
                    out.extend_from_slice(b"EHLO ");
                    script.helo.render(out, self.n, 0, 0);
                    out.extend_from_slice(b"\r\n");
                    self.step = Step::Ehlo;
                } else {
                    o.events |= ev::EHLO_DONE;
                    self.server_pipelining = step == Step::Ehlo && pipelining;
                    o.events |= self.start_message(script, out);
                }
            }
            Step::Ehlo if code == 500 || code == 502 => {
                // EHLO not recognised: an RFC 821 server. Not an error; say HELO instead.
                out.extend_from_slice(b"HELO ");
                script.helo.render(out, self.n, 0, 0);
                out.extend_from_slice(b"\r\n");
                self.step = Step::Helo;
            }
            Step::Banner | Step::Ehlo | Step::Helo if refused.is_some() => {
                self.count(&mut o, refused.unwrap(), step);
                self.quit(out);
            }
            Step::Mail if class == 2 => self.next_rcpt(script, 0, out, &mut o),
            Step::Mail if refused.is_some() => {
                self.count(&mut o, refused.unwrap(), step);
                o.events |= ev::FAILED;
                self.txn_failed = true;
                if self.pipelined {
                    // The RCPT and DATA replies of this group are still coming.
                    self.step = Step::Rcpt(0);
                    o.action = Action::Wait;
                } else {
                    self.rset(out);
                }
            }
            Step::Rcpt(i) if class == 2 || refused.is_some() => {
                if class == 2 {
                    self.accepted_rcpts += 1;
                } else if !self.txn_failed {
                    self.count(&mut o, refused.unwrap(), step);
                }
                if i + 1 < script.recipients {
                    self.next_rcpt(script, i + 1, out, &mut o);
                } else if self.pipelined {
                    self.step = Step::Data;
                    o.action = Action::Wait;
                } else if self.accepted_rcpts > 0 {
                    out.extend_from_slice(b"DATA\r\n");
                    self.step = Step::Data;
                } else {
                    o.events |= ev::FAILED;
                    self.txn_failed = true;
                    self.rset(out);
                }
            }
            Step::Data if code == 354 && self.accepted_rcpts > 0 && !self.txn_failed => {
                self.step = Step::EndOfData;
                o.action = Action::SendMessage;
            }
            Step::Data if refused.is_some() => {
                // With no recipient accepted (pipelined), the refusal of DATA is their consequence.
                if !self.txn_failed && self.accepted_rcpts > 0 {
                    self.count(&mut o, refused.unwrap(), step);
                }
                if !self.txn_failed {
                    o.events |= ev::FAILED;
                }
                self.txn_failed = true;
                self.rset(out);
            }
            Step::EndOfData if class == 2 || refused.is_some() => {
                if class == 2 {
                    o.events |= ev::ACCEPTED;
                } else {
                    self.count(&mut o, refused.unwrap(), step);
                    o.events |= ev::FAILED;
                }
                o.events |= self.next_message(script, out);
            }
            Step::Rset if class == 2 => o.events |= self.next_message(script, out),
            Step::Rset if refused.is_some() => {
                self.count(&mut o, refused.unwrap(), step);
                self.quit(out);
            }
            Step::Quit => {
                self.step = Step::Done;
                o.action = Action::Close;
            }
            _ => {
                // A reply that makes no sense here (354 to MAIL, 250 to DATA, anything after
                // QUIT's reply): the session cannot go on meaningfully.
                self.errors += 1;
                o.error = Some((ErrorKind::Protocol, step));
                o.events |= self.fail_events(step);
                o.action = Action::Close;
                self.step = Step::Done;
            }
        }
        o
    }

    fn count(&mut self, o: &mut Outcome, kind: ErrorKind, step: Step) {
        self.errors += 1;
        o.error = Some((kind, step));
    }

    fn quit(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"QUIT\r\n");
        self.step = Step::Quit;
    }

    fn rset(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"RSET\r\n");
        self.step = Step::Rset;
    }

    fn next_rcpt(&mut self, script: &Script, i: u64, out: &mut Vec<u8>, o: &mut Outcome) {
        self.step = Step::Rcpt(i);
        if self.pipelined {
            o.action = Action::Wait;
        } else {
            write_rcpt(script, self.n, self.m, i, out);
        }
    }

    fn next_message(&mut self, script: &Script, out: &mut Vec<u8>) -> u8 {
        self.m += 1;
        if self.m < script.messages {
            self.start_message(script, out)
        } else {
            self.quit(out);
            0
        }
    }

    fn start_message(&mut self, script: &Script, out: &mut Vec<u8>) -> u8 {
        self.accepted_rcpts = 0;
        self.txn_failed = false;
        self.pipelined = script.pipelining && self.server_pipelining;
        out.extend_from_slice(b"MAIL FROM:<");
        script.from.render(out, self.n, self.m, 0);
        out.extend_from_slice(b">\r\n");
        if self.pipelined {
            for r in 0..script.recipients {
                write_rcpt(script, self.n, self.m, r, out);
            }
            out.extend_from_slice(b"DATA\r\n");
        }
        self.step = Step::Mail;
        ev::MAIL_SENT
    }
}

fn write_rcpt(script: &Script, n: u64, m: u64, r: u64, out: &mut Vec<u8>) {
    out.extend_from_slice(b"RCPT TO:<");
    script.to.render(out, n, m, r);
    out.extend_from_slice(b">\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(messages: u64, recipients: u64, pipelining: bool) -> Script {
        Script {
            helo: Template::parse("--helo", "client{n}").unwrap(),
            from: Template::parse("--from", "s{n}@x").unwrap(),
            to: Template::parse("--to", "r{m}.{r}@y").unwrap(),
            messages,
            recipients,
            pipelining,
        }
    }

    /// Plays a transcript: each entry is the server's reply code and what the client must write
    /// next ("" for nothing, "<message>" for the message), checking actions along the way.
    /// Returns the events and errors seen.
    fn play(s: &Script, transcript: &[(u16, &str)]) -> (Vec<u8>, Vec<(ErrorKind, Step)>, Action) {
        let mut sess = Session::new(7);
        let mut events = Vec::new();
        let mut errors = Vec::new();
        let mut last = Action::Wait;
        for (i, (code, want)) in transcript.iter().enumerate() {
            let mut out = Vec::new();
            let pipelining = i == 1; // only the EHLO reply offers it
            let o = sess.on_reply(s, *code, pipelining && s.pipelining, &mut out);
            events.push(o.events);
            errors.extend(o.error);
            last = o.action;
            match o.action {
                Action::SendMessage => assert_eq!(*want, "<message>", "step {i}"),
                Action::Send => assert_eq!(String::from_utf8(out).unwrap(), *want, "step {i}"),
                Action::Wait | Action::Close => assert_eq!(*want, "", "step {i}: {:?}", o.action),
            }
        }
        (events, errors, last)
    }

    #[test]
    fn one_message_plain() {
        let s = script(1, 1, false);
        let (events, errors, last) = play(
            &s,
            &[
                (220, "EHLO client7\r\n"),
                (250, "MAIL FROM:<s7@x>\r\n"),
                (250, "RCPT TO:<r0.0@y>\r\n"),
                (250, "DATA\r\n"),
                (354, "<message>"),
                (250, "QUIT\r\n"),
                (221, ""),
            ],
        );
        assert!(errors.is_empty());
        assert_eq!(last, Action::Close);
        assert_eq!(events[0], ev::GREETED | ev::EHLO_SENT);
        assert_eq!(events[1], ev::EHLO_DONE | ev::MAIL_SENT);
        assert_eq!(events[5], ev::ACCEPTED);
    }

    #[test]
    fn two_messages_two_recipients_pipelined() {
        let s = script(2, 2, true);
        let group0 = "MAIL FROM:<s7@x>\r\nRCPT TO:<r0.0@y>\r\nRCPT TO:<r0.1@y>\r\nDATA\r\n";
        let group1 = "MAIL FROM:<s7@x>\r\nRCPT TO:<r1.0@y>\r\nRCPT TO:<r1.1@y>\r\nDATA\r\n";
        let (events, errors, _) = play(
            &s,
            &[
                (220, "EHLO client7\r\n"),
                (250, group0),
                (250, ""),
                (250, ""),
                (250, ""),
                (354, "<message>"),
                (250, group1),
                (250, ""),
                (250, ""),
                (250, ""),
                (354, "<message>"),
                (250, "QUIT\r\n"),
                (221, ""),
            ],
        );
        assert!(errors.is_empty());
        assert_eq!(events[6], ev::ACCEPTED | ev::MAIL_SENT);
    }

    #[test]
    fn pipelining_only_when_offered() {
        let s = script(1, 1, true);
        let mut sess = Session::new(1);
        let mut out = Vec::new();
        sess.on_reply(&s, 220, false, &mut out);
        out.clear();
        sess.on_reply(&s, 250, false, &mut out); // EHLO reply without PIPELINING
        assert_eq!(out, b"MAIL FROM:<s1@x>\r\n");
        assert!(!sess.server_pipelining());
    }

    #[test]
    fn rcpt_451_is_an_error_and_no_message_is_sent() {
        let s = script(2, 1, false);
        let (events, errors, _) = play(
            &s,
            &[
                (220, "EHLO client7\r\n"),
                (250, "MAIL FROM:<s7@x>\r\n"),
                (250, "RCPT TO:<r0.0@y>\r\n"),
                (451, "RSET\r\n"),
                (250, "MAIL FROM:<s7@x>\r\n"),
                (250, "RCPT TO:<r1.0@y>\r\n"),
                (451, "RSET\r\n"),
                (250, "QUIT\r\n"),
                (221, ""),
            ],
        );
        assert_eq!(errors, vec![(ErrorKind::Reply(451), Step::Rcpt(0)); 2]);
        assert!(events.iter().all(|e| e & ev::ACCEPTED == 0));
        assert_eq!(events.iter().filter(|e| *e & ev::FAILED != 0).count(), 2);
    }

    #[test]
    fn one_of_two_recipients_refused_still_sends_the_message() {
        let s = script(1, 2, false);
        let (_, errors, _) = play(
            &s,
            &[
                (220, "EHLO client7\r\n"),
                (250, "MAIL FROM:<s7@x>\r\n"),
                (250, "RCPT TO:<r0.0@y>\r\n"),
                (550, "RCPT TO:<r0.1@y>\r\n"),
                (250, "DATA\r\n"),
                (354, "<message>"),
                (250, "QUIT\r\n"),
                (221, ""),
            ],
        );
        assert_eq!(errors, vec![(ErrorKind::Reply(550), Step::Rcpt(0))]);
    }

    #[test]
    fn pipelined_group_with_refused_mail_counts_one_error() {
        let s = script(1, 1, true);
        let (events, errors, _) = play(
            &s,
            &[
                (220, "EHLO client7\r\n"),
                (250, "MAIL FROM:<s7@x>\r\nRCPT TO:<r0.0@y>\r\nDATA\r\n"),
                (452, ""),
                (503, ""),
                (554, "RSET\r\n"),
                (250, "QUIT\r\n"),
                (221, ""),
            ],
        );
        assert_eq!(errors, vec![(ErrorKind::Reply(452), Step::Mail)]);
        assert_eq!(events.iter().filter(|e| *e & ev::FAILED != 0).count(), 1);
    }

    #[test]
    fn ehlo_not_recognised_falls_back_to_helo() {
        let s = script(1, 1, false);
        let (_, errors, _) = play(
            &s,
            &[
                (220, "EHLO client7\r\n"),
                (502, "HELO client7\r\n"),
                (250, "MAIL FROM:<s7@x>\r\n"),
            ],
        );
        assert!(errors.is_empty());
    }

    #[test]
    fn refused_banner_quits_and_421_closes() {
        let s = script(1, 1, false);
        let (_, errors, _) = play(&s, &[(554, "QUIT\r\n"), (221, "")]);
        assert_eq!(errors, vec![(ErrorKind::Reply(554), Step::Banner)]);
        let (events, errors, last) = play(
            &s,
            &[
                (220, "EHLO client7\r\n"),
                (250, "MAIL FROM:<s7@x>\r\n"),
                (421, ""),
            ],
        );
        assert_eq!(errors, vec![(ErrorKind::Reply(421), Step::Mail)]);
        assert_eq!(last, Action::Close);
        assert_eq!(events[2], ev::FAILED);
    }

    #[test]
    fn unexpected_replies_are_protocol_violations() {
        let s = script(1, 1, false);
        // 354 to MAIL.
        let (events, errors, last) = play(
            &s,
            &[
                (220, "EHLO client7\r\n"),
                (250, "MAIL FROM:<s7@x>\r\n"),
                (354, ""),
            ],
        );
        assert_eq!(errors, vec![(ErrorKind::Protocol, Step::Mail)]);
        assert_eq!(last, Action::Close);
        assert_eq!(events[2], ev::FAILED);
        // 250 to DATA.
        let (_, errors, _) = play(
            &s,
            &[
                (220, "EHLO client7\r\n"),
                (250, "MAIL FROM:<s7@x>\r\n"),
                (250, "RCPT TO:<r0.0@y>\r\n"),
                (250, "DATA\r\n"),
                (250, ""),
            ],
        );
        assert_eq!(errors, vec![(ErrorKind::Protocol, Step::Data)]);
    }

    #[test]
    fn broken_connection_mid_transaction_fails_the_message() {
        let s = script(1, 1, false);
        let mut sess = Session::new(1);
        let mut out = Vec::new();
        sess.on_reply(&s, 220, false, &mut out);
        sess.on_reply(&s, 250, false, &mut out);
        let o = sess.on_broken(ErrorKind::Reset);
        assert_eq!(o.error, Some((ErrorKind::Reset, Step::Mail)));
        assert_eq!(o.events, ev::FAILED);
        let mut quiet = Session::new(2);
        quiet.on_reply(&s, 220, false, &mut out);
        let o = quiet.on_broken(ErrorKind::Timeout);
        assert_eq!(o.events, 0, "no message was in flight at EHLO");
    }
}

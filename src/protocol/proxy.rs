//! The PROXY protocol header (HAProxy's, version 1 text or version 2 binary) that a load balancer
//! in front of ringmx sends first on every connection, naming the client it accepted
//! (`--proxy-protocol`). The `ppp` crate parses it; this module bounds what is read and turns the
//! result into the one thing the worker needs: which address the session is from.
//!
//! Specification: <https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>. A version 1
//! header is at most 107 bytes. A version 2 header is 16 bytes plus its own length, which may
//! carry TLVs (AWS's load balancers add a few dozen bytes); ringmx takes up to
//! [`HEADER_BYTES_MAX`] and refuses a longer one, as the specification allows a receiver to.
use std::net::SocketAddr;

use ppp::{v1, v2, HeaderResult, PartialResult};

/// The longest header read before giving up (version 2 with TLVs included).
pub const HEADER_BYTES_MAX: usize = 1024;
/// A version 1 header, CRLF included, is at most this long (the specification's 107 bytes).
const V1_BYTES_MAX: usize = 107;
const V1_PREFIX: &[u8] = b"PROXY ";

/// Whom a connection is from, by its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A proxied TCP connection from this client.
    Client(SocketAddr),
    /// The proxy's own connection (version 2 `LOCAL`, such as a health check) or one whose
    /// client has no IP address (version 1 `UNKNOWN`, a Unix socket): the connection's own
    /// peer address stands.
    Proxy,
}

/// The outcome of looking at the first bytes of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Header {
    /// Not all of the header is here yet.
    Incomplete,
    /// A whole header of `len` bytes; what follows it is the client's.
    Done { origin: Origin, len: usize },
    /// Not a PROXY header, or a broken one: the connection is to be closed.
    Invalid(String),
}

/// Parses the header at the start of `input` (everything the connection sent so far).
pub fn parse(input: &[u8]) -> Header {
    // A version 1 header is one line: only its CRLF says it is whole. (`ppp` refuses some cuts
    // of a valid line, such as one that ends in the space before the last port.)
    let v1_prefix = &V1_PREFIX[..input.len().min(V1_PREFIX.len())];
    if input.starts_with(v1_prefix) && memchr::memmem::find(input, b"\r\n").is_none() {
        return if input.len() >= V1_BYTES_MAX {
            Header::Invalid(format!(
                "version 1 header without CRLF in its first {V1_BYTES_MAX} bytes"
            ))
        } else {
            Header::Incomplete
        };
    }
    let result = HeaderResult::parse(input);
    if result.is_incomplete() {
        return if input.len() >= HEADER_BYTES_MAX {
            Header::Invalid(format!("header longer than {HEADER_BYTES_MAX} bytes"))
        } else {
            Header::Incomplete
        };
    }
    match result {
        HeaderResult::V1(Ok(h)) => {
            let origin = match h.addresses {
                v1::Addresses::Tcp4(a) => {
                    Origin::Client(SocketAddr::from((a.source_address, a.source_port)))
                }
                v1::Addresses::Tcp6(a) => {
                    Origin::Client(SocketAddr::from((a.source_address, a.source_port)))
                }
                v1::Addresses::Unknown => Origin::Proxy,
            };
            Header::Done {
                origin,
                len: h.header.len(),
            }
        }
        HeaderResult::V2(Ok(h)) => {
            if h.len() > HEADER_BYTES_MAX {
                return Header::Invalid(format!(
                    "header of {} bytes, longer than {HEADER_BYTES_MAX}",
                    h.len()
                ));
            }
            let origin = match (h.command, h.addresses) {
                (v2::Command::Local, _) => Origin::Proxy,
                (v2::Command::Proxy, v2::Addresses::IPv4(a)) => {
                    Origin::Client(SocketAddr::from((a.source_address, a.source_port)))
                }
                (v2::Command::Proxy, v2::Addresses::IPv6(a)) => {
                    Origin::Client(SocketAddr::from((a.source_address, a.source_port)))
                }
                (v2::Command::Proxy, v2::Addresses::Unix(_) | v2::Addresses::Unspecified) => {
                    Origin::Proxy
                }
            };
            Header::Done {
                origin,
                len: h.len(),
            }
        }
        HeaderResult::V1(Err(e)) => Header::Invalid(invalid(input, &e)),
        HeaderResult::V2(Err(e)) => Header::Invalid(invalid(input, &e)),
    }
}

/// Why a header was refused, with the start of what came instead when it was not one at all
/// (a client talking SMTP straight to a port meant for the load balancer).
fn invalid(input: &[u8], e: &dyn std::fmt::Display) -> String {
    let start: String = input
        .iter()
        .take(24)
        .map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                b as char
            } else {
                '?'
            }
        })
        .collect();
    format!("{e} (the connection began {start:?})")
}

#[cfg(test)]
mod tests {
    use super::*;

    const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

    /// A version 2 header: `command` 0 LOCAL or 1 PROXY, TCP over IPv4, then `tlv_bytes` of
    /// TLVs (type 0xEE, no meaning).
    fn v2_ipv4(command: u8, src: [u8; 4], sport: u16, tlv_bytes: usize) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(0x11);
        let tlv = if tlv_bytes == 0 {
            Vec::new()
        } else {
            assert!(tlv_bytes >= 3);
            let mut t = vec![0xEE];
            t.extend_from_slice(&((tlv_bytes - 3) as u16).to_be_bytes());
            t.resize(tlv_bytes, b'x');
            t
        };
        h.extend_from_slice(&((12 + tlv.len()) as u16).to_be_bytes());
        h.extend_from_slice(&src);
        h.extend_from_slice(&[10, 0, 0, 1]);
        h.extend_from_slice(&sport.to_be_bytes());
        h.extend_from_slice(&25u16.to_be_bytes());
        h.extend_from_slice(&tlv);
        h
    }

    fn client(s: &str) -> Origin {
        Origin::Client(s.parse().unwrap())
    }

    #[test]
    fn version_1_names_the_client_and_leaves_what_follows() {
        let input = b"PROXY TCP4 192.0.2.7 10.0.0.1 40000 25\r\nEHLO x\r\n";
        assert_eq!(
            parse(input),
            Header::Done {
                origin: client("192.0.2.7:40000"),
                len: input.len() - 8
            }
        );
        let input = b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 25\r\n";
        assert_eq!(
            parse(input),
            Header::Done {
                origin: client("[2001:db8::7]:40000"),
                len: input.len()
            }
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n"),
            Header::Done {
                origin: Origin::Proxy,
                len: 15
            }
        );
    }

    #[test]
    fn version_2_names_the_client_or_the_proxy_itself() {
        let h = v2_ipv4(1, [198, 51, 100, 9], 5555, 0);
        assert_eq!(
            parse(&h),
            Header::Done {
                origin: client("198.51.100.9:5555"),
                len: 28
            }
        );
        // A health check: LOCAL, whatever addresses follow.
        let h = v2_ipv4(0, [198, 51, 100, 9], 5555, 0);
        assert_eq!(
            parse(&h),
            Header::Done {
                origin: Origin::Proxy,
                len: 28
            }
        );
        // TLVs are read past and belong to the header.
        let mut h = v2_ipv4(1, [198, 51, 100, 9], 5555, 40);
        let len = h.len();
        h.extend_from_slice(b"EHLO x\r\n");
        assert_eq!(
            parse(&h),
            Header::Done {
                origin: client("198.51.100.9:5555"),
                len
            }
        );
    }

    /// Any prefix of a header is incomplete; the whole is done. A receive may end anywhere.
    #[test]
    fn every_prefix_of_a_header_waits_for_more() {
        let v1 = b"PROXY TCP4 192.0.2.7 10.0.0.1 40000 25\r\n".to_vec();
        for h in [v1, v2_ipv4(1, [192, 0, 2, 7], 40000, 30)] {
            for cut in 0..h.len() {
                assert_eq!(
                    parse(&h[..cut]),
                    Header::Incomplete,
                    "cut at {cut} of {h:?}"
                );
            }
            assert!(matches!(parse(&h), Header::Done { len, .. } if len == h.len()));
        }
    }

    #[test]
    fn smtp_or_garbage_instead_of_a_header_is_invalid() {
        for input in [
            &b"EHLO client.example\r\n"[..],
            b"PROXY TCP4 300.0.0.1 10.0.0.1 1 25\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 99999 25\r\n",
            b"PROXY TCP5 192.0.2.7 10.0.0.1 1 25\r\n",
            b"\r\n\r\n\0\r\nQUIT\n\x31\x11\x00\x0c",
        ] {
            match parse(input) {
                Header::Invalid(why) => assert!(!why.is_empty()),
                other => panic!("{input:?}: {other:?}"),
            }
        }
        match parse(b"EHLO client.example\r\n") {
            Header::Invalid(why) => assert!(why.contains("\"EHLO client.example??\""), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_header_that_never_ends_is_cut_off() {
        // Version 1 ends at 107 bytes.
        let long_v1 = [b"PROXY TCP4 ".as_slice(), &[b'1'; 200]].concat();
        assert!(matches!(parse(&long_v1), Header::Invalid(_)));
        // Version 2 says its length up front: over the limit is refused once it is all here,
        // and a prefix of it at the limit too, rather than reading 64 KiB.
        let huge = v2_ipv4(1, [192, 0, 2, 7], 1, 3000);
        assert!(matches!(parse(&huge), Header::Invalid(_)));
        assert!(matches!(
            parse(&huge[..HEADER_BYTES_MAX]),
            Header::Invalid(_)
        ));
        assert_eq!(parse(&huge[..HEADER_BYTES_MAX - 1]), Header::Incomplete);
    }
}

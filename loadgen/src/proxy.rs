//! The PROXY protocol header (HAProxy's) that `--proxy-protocol` sends first on a connection,
//! as a load balancer in front of the server would: it names the client of the connection.
//! Specification: <https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>. Written here,
//! not shared with the server, so that a bug cannot cancel itself out in a load test.

use std::net::SocketAddr;

use crate::cli::ProxyVersion;

/// The 12 bytes that open a version 2 header.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// Appends the header of a TCP connection from `client` to `server` to `out`. The two
/// addresses must be of one family, as the two ends of one connection are.
pub fn header(version: ProxyVersion, client: SocketAddr, server: SocketAddr, out: &mut Vec<u8>) {
    match version {
        ProxyVersion::V1 => {
            let family = if client.is_ipv4() { "TCP4" } else { "TCP6" };
            out.extend_from_slice(
                format!(
                    "PROXY {family} {} {} {} {}\r\n",
                    client.ip(),
                    server.ip(),
                    client.port(),
                    server.port()
                )
                .as_bytes(),
            );
        }
        ProxyVersion::V2 => {
            out.extend_from_slice(V2_SIGNATURE);
            // Version 2, command PROXY.
            out.push(0x21);
            match (client, server) {
                (SocketAddr::V4(c), SocketAddr::V4(s)) => {
                    // TCP over IPv4: 4 + 4 + 2 + 2 bytes of addresses.
                    out.push(0x11);
                    out.extend_from_slice(&12u16.to_be_bytes());
                    out.extend_from_slice(&c.ip().octets());
                    out.extend_from_slice(&s.ip().octets());
                }
                (c, s) => {
                    // TCP over IPv6: 16 + 16 + 2 + 2 bytes (an IPv4 end mapped into IPv6).
                    let v6 = |a: SocketAddr| match a {
                        SocketAddr::V4(a) => a.ip().to_ipv6_mapped(),
                        SocketAddr::V6(a) => *a.ip(),
                    };
                    out.push(0x21);
                    out.extend_from_slice(&36u16.to_be_bytes());
                    out.extend_from_slice(&v6(c).octets());
                    out.extend_from_slice(&v6(s).octets());
                }
            }
            out.extend_from_slice(&client.port().to_be_bytes());
            out.extend_from_slice(&server.port().to_be_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_1_is_one_line_with_both_ends() {
        let mut out = Vec::new();
        let (c, s) = (
            "192.0.2.7:40000".parse().unwrap(),
            "10.0.0.25:25".parse().unwrap(),
        );
        header(ProxyVersion::V1, c, s, &mut out);
        assert_eq!(out, b"PROXY TCP4 192.0.2.7 10.0.0.25 40000 25\r\n");
        out.clear();
        let (c, s) = (
            "[2001:db8::7]:1".parse().unwrap(),
            "[::1]:2525".parse().unwrap(),
        );
        header(ProxyVersion::V1, c, s, &mut out);
        assert_eq!(out, b"PROXY TCP6 2001:db8::7 ::1 1 2525\r\n");
    }

    #[test]
    fn version_2_has_the_signature_length_and_addresses() {
        let mut out = Vec::new();
        let (c, s) = (
            "192.0.2.7:40000".parse().unwrap(),
            "10.0.0.25:25".parse().unwrap(),
        );
        header(ProxyVersion::V2, c, s, &mut out);
        let mut want = V2_SIGNATURE.to_vec();
        want.extend_from_slice(&[0x21, 0x11, 0, 12, 192, 0, 2, 7, 10, 0, 0, 25]);
        want.extend_from_slice(&[0x9c, 0x40, 0, 25]);
        assert_eq!(out, want);
        out.clear();
        let (c, s) = (
            "[2001:db8::7]:1".parse().unwrap(),
            "[::1]:25".parse().unwrap(),
        );
        header(ProxyVersion::V2, c, s, &mut out);
        assert_eq!(out.len(), 16 + 36);
        assert_eq!(&out[12..16], &[0x21, 0x21, 0, 36]);
        assert_eq!(out[16], 0x20);
        assert_eq!(&out[48..52], &[0, 1, 0, 25]);
    }
}

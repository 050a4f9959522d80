//! `--proxy-protocol` against the real binary: behind a load balancer (HAProxy, AWS's NLB) every
//! connection comes from the balancer's address and begins with a PROXY header naming the
//! client. The tests play the balancer with raw sockets on 127.0.0.1 and check that the client
//! it names is the one counted, logged and written into Received:, and that a connection without
//! a header gets nothing.

use crate::common::{parse_stored, queue_id, Client, Server};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// `ringmx serve --proxy-protocol` for example.com (behind a balancer a recipient policy is
/// required, even on loopback), plus `extra`.
fn behind_balancer(extra: &[&str]) -> Server {
    Server::start(
        &[
            &["--proxy-protocol", "--accept-domain", "example.com"],
            extra,
        ]
        .concat(),
    )
}

/// Connects as the load balancer would: the header (and whatever the client sent with it)
/// first, then the greeting is read.
fn through_proxy(addr: SocketAddr, first: &[u8]) -> Client {
    Client::connect_sending(addr, first)
}

/// A version 2 PROXY header for a TCP connection from `src` (IPv4 or IPv6) to port 25.
fn v2(src: SocketAddr) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n\x21".to_vec();
    match src {
        SocketAddr::V4(a) => {
            h.extend_from_slice(&[0x11, 0, 12]);
            h.extend_from_slice(&a.ip().octets());
            h.extend_from_slice(&[10, 0, 0, 25]);
        }
        SocketAddr::V6(a) => {
            h.extend_from_slice(&[0x21, 0, 36]);
            h.extend_from_slice(&a.ip().octets());
            h.extend_from_slice(
                &"2001:db8::25"
                    .parse::<std::net::Ipv6Addr>()
                    .unwrap()
                    .octets(),
            );
        }
    }
    h.extend_from_slice(&src.port().to_be_bytes());
    h.extend_from_slice(&25u16.to_be_bytes());
    h
}

/// One message through `c`; returns its queue id.
fn send_one(c: &mut Client, token: &str) -> String {
    c.expect("MAIL FROM:<alice@example.org>", 250);
    c.expect("RCPT TO:<bob@example.com>", 250);
    c.expect("DATA", 354);
    c.send(format!("Subject: {token}\r\n\r\n{token}\r\n.\r\n").as_bytes());
    let r = c.reply();
    assert!(r.starts_with("250"), "{r}");
    queue_id(&r)
}

/// Reads until the server closes; returns what it sent. Panics if it is still open after `wait`.
fn read_until_closed(s: &mut TcpStream, wait: Duration) -> Vec<u8> {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut got = Vec::new();
    match s.read_to_end(&mut got) {
        Ok(_) => got,
        Err(e) => panic!("still open after {wait:?} ({e}); got {got:?}"),
    }
}

#[test]
fn the_client_named_by_the_header_is_greeted_logged_and_written_into_received() {
    let server = behind_balancer(&[]);

    // Version 1, the header alone, then a usual session.
    let mut c = through_proxy(server.addr, b"PROXY TCP4 192.0.2.7 10.0.0.25 40000 25\r\n");
    assert!(c.greeting.starts_with("220 "), "{}", c.greeting);
    c.ehlo("client.example");
    let v1_id = send_one(&mut c, "v1");
    c.expect("QUIT", 221);

    // Version 2 from an IPv6 client, with its EHLO in the same segment as the header.
    let mut first = v2("[2001:db8::9]:5555".parse().unwrap());
    first.extend_from_slice(b"EHLO six.example\r\n");
    let mut c = through_proxy(server.addr, &first);
    assert!(c.greeting.starts_with("220 "), "{}", c.greeting);
    let ehlo = c.reply();
    assert!(ehlo.starts_with("250-"), "{ehlo}");
    let v2_id = send_one(&mut c, "v2");
    c.expect("QUIT", 221);

    // A health check (version 2 LOCAL) is the balancer's own connection.
    let mut local = v2("192.0.2.99:1".parse().unwrap());
    local[12] = 0x20;
    let mut c = through_proxy(server.addr, &local);
    c.ehlo("lb.example");
    let local_id = send_one(&mut c, "local");
    c.expect("QUIT", 221);

    let mut received = std::collections::HashMap::new();
    for f in server.new_files() {
        let m = parse_stored(&std::fs::read(f).unwrap());
        received.insert(m.queue_id().to_string(), m.received);
    }
    assert!(received[&v1_id].starts_with("from client.example ([192.0.2.7])"));
    assert!(received[&v2_id].starts_with("from six.example ([IPv6:2001:db8::9])"));
    assert!(received[&local_id].starts_with("from lb.example ([127.0.0.1])"));

    let deadline = Instant::now() + Duration::from_secs(5);
    let log = loop {
        let log = server.log_text();
        if log.matches(" INFO session end ").count() >= 3 || Instant::now() > deadline {
            break log;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    for (id, client) in [
        (&v1_id, "192.0.2.7"),
        (&v2_id, "2001:db8::9"),
        (&local_id, "127.0.0.1"),
    ] {
        let tag = format!("queue_id={id} client={client} ");
        assert!(log.contains(&tag), "no {tag:?} in\n{log}");
    }
    assert!(log.contains("session end client=192.0.2.7 "), "{log}");
}

#[test]
fn per_client_limits_count_the_client_named_by_the_header() {
    let server = behind_balancer(&["--max-connections-per-ip", "2"]);
    let header = b"PROXY TCP4 192.0.2.7 10.0.0.25 40000 25\r\n";
    // Every connection comes from 127.0.0.1; the limit counts 192.0.2.7.
    let held: Vec<Client> = (0..2).map(|_| through_proxy(server.addr, header)).collect();
    for c in &held {
        assert!(c.greeting.starts_with("220 "), "{}", c.greeting);
    }
    let third = through_proxy(server.addr, header);
    assert!(
        third
            .greeting
            .ends_with("Error: too many connections from 192.0.2.7"),
        "{}",
        third.greeting
    );
    let other = through_proxy(server.addr, b"PROXY TCP4 192.0.2.8 10.0.0.25 40001 25\r\n");
    assert!(other.greeting.starts_with("220 "), "{}", other.greeting);
}

#[test]
fn a_connection_without_a_valid_header_gets_no_reply_and_is_closed() {
    let server = behind_balancer(&[]);

    // A client talking SMTP straight to the port behind the balancer.
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.write_all(b"EHLO direct.example\r\n").unwrap();
    assert_eq!(read_until_closed(&mut s, Duration::from_secs(5)), b"");

    // A broken header.
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.write_all(b"PROXY TCP4 300.1.2.3 10.0.0.25 1 25\r\n")
        .unwrap();
    assert_eq!(read_until_closed(&mut s, Duration::from_secs(5)), b"");

    // A header cut short, then the balancer goes away.
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.write_all(b"PROXY TCP4 192.0.2.7").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(read_until_closed(&mut s, Duration::from_secs(5)), b"");

    // Nothing at all: closed after the header timeout (5 s), still without a reply.
    let started = Instant::now();
    let mut s = TcpStream::connect(server.addr).unwrap();
    assert_eq!(read_until_closed(&mut s, Duration::from_secs(10)), b"");
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );

    // The server still serves a proper connection, and the log says why each was closed.
    let mut c = through_proxy(server.addr, b"PROXY TCP4 192.0.2.7 10.0.0.25 40000 25\r\n");
    c.ehlo("client.example");
    c.expect("QUIT", 221);
    let log = server.log_text();
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("refused: no valid PROXY protocol header"))
        .collect();
    assert_eq!(refused.len(), 2, "{log}");
    assert!(refused[0].contains("EHLO direct.example"), "{}", refused[0]);
    assert!(
        log.contains("refused: no PROXY protocol header within 5 s"),
        "{log}"
    );
}

#[test]
fn connections_waiting_for_a_header_count_against_max_connections() {
    // One worker: its listener accepts in the order the connections arrived, so the two silent
    // ones are counted before the third whatever the timing.
    let server = behind_balancer(&["--max-connections", "2", "--workers", "1"]);
    // The start-up probe's place is given back before its session's line is logged.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !server.log_text().contains(" INFO session end ") {
        assert!(Instant::now() < deadline, "{}", server.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    // Two connections that say nothing take both places.
    let mut silent: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(server.addr).unwrap())
        .collect();
    let mut third = TcpStream::connect(server.addr).unwrap();
    let reply = read_until_closed(&mut third, Duration::from_secs(5));
    assert!(
        String::from_utf8_lossy(&reply).starts_with("421 4.7.0 ")
            && String::from_utf8_lossy(&reply).contains("too many connections; try again later"),
        "{reply:?}"
    );
    // One of them leaves: its place is free again for a proxied client.
    drop(silent.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let c = through_proxy(server.addr, b"PROXY TCP4 192.0.2.7 10.0.0.25 40000 25\r\n");
        if c.greeting.starts_with("220 ") {
            break;
        }
        assert!(Instant::now() < deadline, "still refused: {}", c.greeting);
        std::thread::sleep(Duration::from_millis(50));
    }
}

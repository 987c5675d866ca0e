//! Egress for sandboxes with `OH_SANDBOX_NETWORK=egress`: an HTTP proxy per session that the
//! worker serves on a Unix socket bound into the sandbox, with a destination policy.
//!
//! The sandbox still has no network interface but its own loopback. A small forwarder
//! (`oh-sandbox-net`, started by the shell's setup in the background) listens on the sandbox's
//! `127.0.0.1:3128` and passes each connection to `/run/oh/proxy.sock`; `HTTP_PROXY` and
//! `HTTPS_PROXY` (both spellings) point there, which pip, npm, apt, curl and git honour. This
//! proxy, in the worker, answers `CONNECT host:port` (TLS and any TCP) and absolute-form HTTP
//! requests (`GET http://host/path`): it resolves the host **itself** and connects only to an
//! address the policy allows, so a name that resolves to a private address (DNS rebinding) is
//! refused like the address itself.
//!
//! **Policy.** Refused: the control plane's addresses (NATS, Redis, from the worker's URLs),
//! and every address that is not globally routable: loopback, private (RFC 1918, ULA),
//! link-local (with the cloud metadata service 169.254.169.254), CGNAT, unspecified,
//! multicast, documentation and benchmarking ranges, and their IPv4-mapped IPv6 forms.
//! `OH_SANDBOX_EGRESS_ALLOW` lists networks (CIDR) allowed anyway (an internal package
//! mirror), but never a control-plane address. A refusal is a `403` whose body says why, so
//! the agent's observation explains it.
//!
//! Limits: the request head is at most 16 KiB; connecting takes at most 10 s. An HTTP
//! (not CONNECT) connection serves requests to the host of its first request only.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use shared::id::SessionId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tracing::{debug, info};

/// Largest request head the proxy reads.
const MAX_HEAD: usize = 16 * 1024;
/// How long connecting to a destination may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Where the forwarder listens inside the sandbox.
pub(crate) const PROXY_ADDR: &str = "127.0.0.1:3128";

/// Which destinations a sandbox may reach.
#[derive(Debug, Clone, Default)]
pub(crate) struct EgressPolicy {
    /// Networks allowed although not globally routable.
    pub(crate) allow: Vec<IpNet>,
    /// Addresses never allowed (the control plane), whatever `allow` says.
    pub(crate) control_plane: Vec<IpAddr>,
}

impl EgressPolicy {
    /// Whether the sandbox may connect to `ip`; the reason when not.
    pub(crate) fn check(&self, ip: IpAddr) -> Result<(), &'static str> {
        let ip = canonical(ip);
        if self.control_plane.contains(&ip) {
            return Err("a control-plane address");
        }
        if self.allow.iter().any(|n| n.contains(&ip)) {
            return Ok(());
        }
        match non_global(ip) {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// Why `ip` is not globally routable, if it is not.
fn non_global(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            if v4.is_loopback() {
                Some("a loopback address")
            } else if v4.is_private() {
                Some("a private address")
            } else if v4.is_link_local() {
                Some("a link-local address (cloud metadata)")
            } else if a == 100 && (64..128).contains(&b) {
                Some("a shared (CGNAT) address")
            } else if v4.is_unspecified() || a == 0 {
                Some("an unspecified address")
            } else if v4.is_multicast() || v4.is_broadcast() || a >= 240 {
                Some("a multicast or reserved address")
            } else if v4.is_documentation() || (a == 198 && (b & 0xfe) == 18) {
                Some("a documentation or benchmarking address")
            } else if a == 192 && b == 0 && c == 0 {
                Some("an IETF protocol address")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            if v6.is_loopback() || v6.is_unspecified() {
                Some("a loopback or unspecified address")
            } else if (first & 0xfe00) == 0xfc00 {
                Some("a private (ULA) address")
            } else if (first & 0xffc0) == 0xfe80 {
                Some("a link-local address")
            } else if v6.is_multicast() {
                Some("a multicast address")
            } else if first == 0x2001 && v6.segments()[1] == 0x0db8 {
                Some("a documentation address")
            } else if first == 0x0064 && v6.segments()[1] == 0xff9b {
                Some("a NAT64 address")
            } else {
                None
            }
        }
    }
}

/// Serves the proxy for one session until the listener is dropped (the task is aborted).
pub(crate) async fn serve(listener: UnixListener, policy: Arc<EgressPolicy>, session: SessionId) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let policy = policy.clone();
        let session = session.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, &policy, &session).await {
                debug!(session_id = %session, error = %e, "egress connection ended");
            }
        });
    }
}

/// Binds the proxy's socket at `path`, readable and writable by `owner` only.
///
/// # Errors
/// Binding or handing the socket over failed.
pub(crate) fn bind(path: &Path, owner: Option<(u32, u32)>) -> std::io::Result<UnixListener> {
    let listener = UnixListener::bind(path)?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    }
    Ok(listener)
}

/// The parsed request head.
struct Head {
    connect: bool,
    host: String,
    port: u16,
    /// For absolute-form HTTP: the head to send upstream (origin-form request line).
    upstream_head: Vec<u8>,
}

async fn handle(
    mut client: UnixStream,
    policy: &EgressPolicy,
    session: &SessionId,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let head_len = loop {
        let mut chunk = [0u8; 2048];
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD {
            return refuse(&mut client, 431, "the request head is too large").await;
        }
    };
    let head = match parse(&buf[..head_len]) {
        Ok(h) => h,
        Err(why) => return refuse(&mut client, 400, why).await,
    };
    let addrs: Vec<SocketAddr> =
        match tokio::net::lookup_host((head.host.as_str(), head.port)).await {
            Ok(a) => a.collect(),
            Err(_) => {
                let msg = format!("cannot resolve {}", head.host);
                return refuse(&mut client, 502, &msg).await;
            }
        };
    let mut refused = None;
    let allowed: Vec<SocketAddr> = addrs
        .into_iter()
        .filter(|a| match policy.check(a.ip()) {
            Ok(()) => true,
            Err(why) => {
                refused.get_or_insert((a.ip(), why));
                false
            }
        })
        .collect();
    if allowed.is_empty() {
        let msg = match refused {
            Some((ip, why)) => format!(
                "oh-sandbox egress: {} resolves to {ip}, {why}, which the sandbox may not reach",
                head.host
            ),
            None => format!("cannot resolve {}", head.host),
        };
        metrics::counter!("oh_worker_egress_connections_total", "outcome" => "refused")
            .increment(1);
        info!(session_id = %session, host = %head.host, port = head.port, "egress refused");
        return refuse(&mut client, 403, &msg).await;
    }
    let upstream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&allowed[..])).await;
    let mut upstream = match upstream {
        Ok(Ok(s)) => s,
        _ => {
            metrics::counter!("oh_worker_egress_connections_total", "outcome" => "failed")
                .increment(1);
            let msg = format!("cannot connect to {}:{}", head.host, head.port);
            return refuse(&mut client, 502, &msg).await;
        }
    };
    metrics::counter!("oh_worker_egress_connections_total", "outcome" => "connected").increment(1);
    debug!(session_id = %session, host = %head.host, port = head.port, "egress connected");
    if head.connect {
        client
            .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            .await?;
    } else {
        upstream.write_all(&head.upstream_head).await?;
    }
    // Whatever the client sent after the head.
    upstream.write_all(&buf[head_len..]).await?;
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Parses `CONNECT host:port HTTP/1.x` or `METHOD http://host[:port]/path HTTP/1.x`.
fn parse(head: &[u8]) -> Result<Head, &'static str> {
    let text = std::str::from_utf8(head).map_err(|_| "the request head is not text")?;
    let mut lines = text.split("\r\n");
    let line = lines.next().ok_or("empty request")?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("malformed request line");
    };
    if !version.starts_with("HTTP/1.") {
        return Err("only HTTP/1.x proxy requests are served");
    }
    if method == "CONNECT" {
        let (host, port) = split_host_port(target, None)?;
        return Ok(Head {
            connect: true,
            host,
            port,
            upstream_head: Vec::new(),
        });
    }
    let rest = target
        .strip_prefix("http://")
        .ok_or("only CONNECT and http:// requests are proxied (use HTTPS through CONNECT)")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = split_host_port(authority, Some(80))?;
    let mut upstream_head = format!("{method} {path} {version}\r\n").into_bytes();
    for l in lines {
        let lower = l.to_ascii_lowercase();
        if lower.starts_with("proxy-connection:") || lower.starts_with("proxy-authorization:") {
            continue;
        }
        upstream_head.extend_from_slice(l.as_bytes());
        upstream_head.extend_from_slice(b"\r\n");
    }
    // `lines` ended with the two empty strings of "\r\n\r\n": one "\r\n" too many is removed.
    upstream_head.truncate(upstream_head.len() - 2);
    Ok(Head {
        connect: false,
        host,
        port,
        upstream_head,
    })
}

fn split_host_port(authority: &str, default: Option<u16>) -> Result<(String, u16), &'static str> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or("malformed IPv6 host")?;
        (h, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match (port, default) {
        (Some(p), _) => p.parse().map_err(|_| "malformed port")?,
        (None, Some(d)) => d,
        (None, None) => return Err("CONNECT needs host:port"),
    };
    if host.is_empty() || port == 0 {
        return Err("malformed host");
    }
    Ok((host.to_owned(), port))
}

async fn refuse(client: &mut UnixStream, status: u16, why: &str) -> std::io::Result<()> {
    let reason = match status {
        400 => "Bad Request",
        403 => "Forbidden",
        431 => "Request Header Fields Too Large",
        _ => "Bad Gateway",
    };
    let body = format!("{why}\n");
    let resp = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    client.write_all(resp.as_bytes()).await?;
    client.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn only_globally_routable_addresses_are_allowed() {
        let p = EgressPolicy::default();
        for refused in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "192.0.2.2",
            "198.18.0.1",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "2001:db8::1",
        ] {
            assert!(p.check(ip(refused)).is_err(), "{refused} allowed");
        }
        for allowed in ["1.1.1.1", "151.101.2.132", "2a04:4e42::644"] {
            assert!(p.check(ip(allowed)).is_ok(), "{allowed} refused");
        }
    }

    #[test]
    fn allow_list_opens_a_network_but_never_the_control_plane() {
        let p = EgressPolicy {
            allow: vec![
                "10.9.0.0/16".parse().expect("net"),
                "127.0.0.0/8".parse().expect("net"),
            ],
            control_plane: vec![ip("127.0.0.1"), ip("1.2.3.4")],
        };
        assert!(p.check(ip("10.9.1.1")).is_ok());
        assert!(p.check(ip("10.8.1.1")).is_err());
        assert!(p.check(ip("127.0.0.2")).is_ok());
        assert_eq!(p.check(ip("127.0.0.1")), Err("a control-plane address"));
        assert_eq!(
            p.check(ip("::ffff:127.0.0.1")),
            Err("a control-plane address")
        );
        assert_eq!(p.check(ip("1.2.3.4")), Err("a control-plane address"));
    }

    #[test]
    fn proxy_requests_are_parsed() {
        let h = parse(b"CONNECT pypi.org:443 HTTP/1.1\r\nHost: pypi.org:443\r\n\r\n").expect("ok");
        assert!(h.connect);
        assert_eq!((h.host.as_str(), h.port), ("pypi.org", 443));
        let h = parse(b"GET http://deb.debian.org/debian/ HTTP/1.1\r\nHost: deb.debian.org\r\nProxy-Connection: keep-alive\r\n\r\n")
            .expect("ok");
        assert!(!h.connect);
        assert_eq!((h.host.as_str(), h.port), ("deb.debian.org", 80));
        assert_eq!(
            String::from_utf8(h.upstream_head).expect("utf8"),
            "GET /debian/ HTTP/1.1\r\nHost: deb.debian.org\r\n\r\n"
        );
        let h = parse(b"CONNECT [::1]:8080 HTTP/1.1\r\n\r\n").expect("ok");
        assert_eq!((h.host.as_str(), h.port), ("::1", 8080));
        assert!(parse(b"GET /x HTTP/1.1\r\n\r\n").is_err());
        assert!(parse(b"CONNECT host HTTP/1.1\r\n\r\n").is_err());
        assert!(parse(b"CONNECT host:0 HTTP/1.1\r\n\r\n").is_err());
        assert!(parse(b"GET http://h/ HTTP/2\r\n\r\n").is_err());
    }
}

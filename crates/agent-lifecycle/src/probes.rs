//! The liveness probe functions against the real machine, implementing
//! [`keelson_core::probe::Probes`].
//!
//! `http` and `tcp` talk to `127.0.0.1` (the probe runs in the app's network
//! namespace); `process` looks through `/proc`; `debugger_attached(port)` is
//! true while a TCP connection to that local port is established, which is
//! what a JDWP debugger session looks like.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use keelson_core::probe::Probes;

use crate::http;
use crate::process::process_names;

/// Probes on this machine, each bounded by `timeout`.
#[derive(Debug, Clone)]
pub struct SystemProbes {
    /// Budget of one network check.
    pub timeout: Duration,
    host: String,
}

impl Default for SystemProbes {
    fn default() -> Self {
        SystemProbes::new(Duration::from_secs(1))
    }
}

impl SystemProbes {
    /// Network checks against `127.0.0.1`, each at most `timeout`.
    pub fn new(timeout: Duration) -> Self {
        SystemProbes {
            timeout,
            host: "127.0.0.1".into(),
        }
    }
}

impl Probes for SystemProbes {
    fn http(&mut self, port: u16, path: &str) -> u16 {
        http_status(&self.host, port, path, self.timeout)
    }

    fn tcp(&mut self, port: u16) -> bool {
        let Ok(ip) = self.host.parse() else {
            return false;
        };
        TcpStream::connect_timeout(&SocketAddr::new(ip, port), self.timeout).is_ok()
    }

    fn process(&mut self, name: &str) -> bool {
        process_names().iter().any(|n| n == name)
    }

    fn file(&mut self, path: &str) -> bool {
        Path::new(path).exists()
    }

    fn debugger_attached(&mut self, port: u16) -> bool {
        ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|table| {
            std::fs::read_to_string(table).is_ok_and(|t| established_on_local_port(&t, port))
        })
    }
}

/// `GET http://{host}:{port}{path}`: the status, 0 when unreachable.
pub fn http_status(host: &str, port: u16, path: &str, timeout: Duration) -> u16 {
    let path = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    };
    http::send(&http::Request {
        method: "GET",
        host,
        port,
        path: &path,
        headers: &[],
        body: None,
        timeout,
        read_body: false,
    })
    .map_or(0, |r| r.status)
}

/// Whether a `/proc/net/tcp{,6}` table has an ESTABLISHED (`01`) connection
/// whose local port is `port`.
pub fn established_on_local_port(table: &str, port: u16) -> bool {
    table.lines().skip(1).any(|line| {
        let mut fields = line.split_whitespace();
        let local = fields.nth(1).unwrap_or_default();
        let state = fields.nth(1).unwrap_or_default();
        let local_port = local
            .rsplit_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
        state == "01" && local_port == Some(port)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn reads_established_connections_from_proc_net_tcp() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue\n\
   0: 0100007F:138D 00000000:0000 0A 00000000:00000000 00:00000000 00000000\n\
   1: 0100007F:138D 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000\n";
        assert!(established_on_local_port(table, 5005));
        let listening_only = table.lines().take(2).collect::<Vec<_>>().join("\n");
        assert!(!established_on_local_port(&listening_only, 5005));
    }

    #[test]
    fn debugger_attached_follows_a_real_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut probes = SystemProbes::default();
        assert!(!probes.debugger_attached(port));
        let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (server_side, _) = listener.accept().unwrap();
        assert!(probes.debugger_attached(port));
        assert!(probes.tcp(port));
        drop((client, server_side, listener));
    }

    #[test]
    fn http_is_zero_when_unreachable_and_file_checks_existence() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut probes = SystemProbes::new(Duration::from_millis(500));
        assert_eq!(probes.http(port, "/checkurl"), 0);
        assert!(probes.file("/proc/self/stat"));
        assert!(!probes.file("/nonexistent/x"));
    }
}

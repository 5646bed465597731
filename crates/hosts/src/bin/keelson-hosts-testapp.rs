//! A tiny HTTP app: `keelson-hosts-testapp PORT` listens on
//! `KEELSON_BIND_ADDRESS` (default 127.0.0.1); every path answers 200, so
//! its checkurl passes as soon as it listens. Exits on SIGTERM.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;

fn main() {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    let address = std::env::var("KEELSON_BIND_ADDRESS").unwrap_or_else(|_| "127.0.0.1".into());
    let listener = match TcpListener::bind((address.as_str(), port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("testapp: cannot listen on {address}:{port}: {e}");
            std::process::exit(1);
        }
    };
    println!("testapp listening on {address}:{port}");
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let mut buf = [0u8; 1024];
        let _ = stream.read(&mut buf);
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n");
    }
}

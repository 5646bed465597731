//! The client against a daemon that misbehaves (a fake one on loopback):
//! garbage, endless bodies, endless events and silence give errors, not
//! panics, hangs or unbounded memory.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use keelson_agent_lifecycle::host::api::EventsRequest;
use keelson_hosts::client::{MAX_EVENT_BYTES, MAX_RESPONSE_BYTES};
use keelson_hosts::{Error, HostClient};

/// A fake daemon: every connection gets `head`, then `body` repeated
/// `repeat` times (or until the client leaves), then it stays open (when
/// `hang`) or closes.
fn fake_daemon(head: &'static str, body: &'static [u8], repeat: usize, hang: bool) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            std::thread::spawn(move || answer(stream, head, body, repeat, hang));
        }
    });
    address
}

fn answer(mut stream: TcpStream, head: &str, body: &[u8], repeat: usize, hang: bool) {
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    if stream.write_all(head.as_bytes()).is_err() {
        return;
    }
    for _ in 0..repeat {
        if stream.write_all(body).is_err() {
            return;
        }
    }
    if hang {
        // Hold the connection until the client leaves.
        let _ = stream.read(&mut buf);
    }
}

/// Fails the test instead of hanging it.
async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(120), f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not end"))
}

#[tokio::test]
async fn garbage_answers_are_errors() {
    let address = fake_daemon(
        "HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\n",
        b"not json!",
        1,
        false,
    );
    let client = HostClient::new("h", &address, "t").unwrap();
    let err = within("host_info", client.host_info(Duration::from_secs(10)))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Unexpected { status: 200, .. }),
        "{err}"
    );

    let address = fake_daemon("this is not HTTP\r\n\r\n", b"", 0, false);
    let client = HostClient::new("h", &address, "t").unwrap();
    let err = within("instances", client.instances()).await.unwrap_err();
    assert!(matches!(err, Error::Unreachable { .. }), "{err}");
}

#[tokio::test]
async fn an_endless_body_is_cut_at_the_limit() {
    // No Content-Length: the body runs until the client leaves.
    let address = fake_daemon(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n",
        &[b' '; 64 * 1024],
        usize::MAX,
        false,
    );
    let client = HostClient::new("h", &address, "t").unwrap();
    let err = within("instances", client.instances()).await.unwrap_err();
    match err {
        Error::Unexpected { reason, .. } => {
            assert!(reason.contains(&MAX_RESPONSE_BYTES.to_string()), "{reason}")
        }
        other => panic!("{other}"),
    }
    // An announced length over the limit is refused before the body.
    let address = fake_daemon(
        "HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n",
        b"",
        0,
        true,
    );
    let client = HostClient::new("h", &address, "t").unwrap();
    let err = within("instance", client.instance("a")).await.unwrap_err();
    assert!(err.to_string().contains("larger than"), "{err}");
}

#[tokio::test]
async fn an_event_that_never_ends_is_an_error() {
    let address = fake_daemon(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\ndata: ",
        &[b'a'; 64 * 1024],
        usize::MAX,
        false,
    );
    let client = HostClient::new("h", &address, "t").unwrap();
    let mut stream = client
        .events(&EventsRequest {
            follow: true,
            ..EventsRequest::default()
        })
        .await
        .unwrap();
    let err = within("events", stream.next()).await.unwrap_err();
    match err {
        Error::Unexpected { reason, .. } => {
            assert!(reason.contains(&MAX_EVENT_BYTES.to_string()), "{reason}")
        }
        other => panic!("{other}"),
    }
}

#[tokio::test]
async fn a_silent_stream_ends_with_an_error() {
    let address = fake_daemon(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"",
        0,
        true,
    );
    let client =
        HostClient::with_stream_idle_timeout("h", &address, "t", Duration::from_millis(500))
            .unwrap();
    let mut logs = client.logs("a", 0, true, false).await.unwrap();
    let err = within("logs", logs.next()).await.unwrap_err();
    assert!(matches!(err, Error::Unreachable { .. }), "{err}");
}

//! Stopping the server lets a request already in flight finish and be
//! stored, and refuses new connections.

use keelson_server::sample::profile;
use keelson_server::serve::RunningServer;
use keelson_store::testing::test_database;
use keelson_store::{Backend, NewToken, Role, Store, SubjectKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_completes_during_shutdown() {
    let db = test_database(Backend::Sqlite).await.unwrap();
    let store = Store::open(&db.url).await.unwrap();
    let token = NewToken {
        subject: "root".into(),
        subject_kind: SubjectKind::Person,
        teams: vec![],
        role: Role::Admin,
        description: None,
    };
    let secret = store.create_token(&token, "test").await.unwrap().secret;
    let server = RunningServer::start(store.clone(), "127.0.0.1:0")
        .await
        .unwrap();
    let addr = server.addr;

    // Send the headers and half of the body, then ask the server to stop.
    let body = profile("drain", "shop", &["ann"], "registry.local/drain");
    let (first, second) = body.as_bytes().split_at(body.len() / 2);
    let mut conn = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /api/v1/apps HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {secret}\r\n\
         Content-Type: application/yaml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(first).await.unwrap();
    conn.flush().await.unwrap();
    // Wait until the server is handling it: two requests in flight, ours
    // and the metrics request asking.
    let metrics_url = format!("http://{addr}/metrics");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let text = reqwest::get(&metrics_url)
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text
            .lines()
            .any(|l| l == "keelson_http_requests_in_flight 2")
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the request never started:\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let stopping = tokio::spawn(server.stop());

    // New connections are refused once the listener is closed.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if TcpStream::connect(addr).await.is_err() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the listener is still accepting"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(
        !stopping.is_finished(),
        "the server stopped with a request in flight"
    );

    conn.write_all(second).await.unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 201"), "{response}");
    stopping.await.unwrap().expect("clean shutdown");
    assert_eq!(
        store.get_app("drain").await.unwrap().unwrap().app.revision,
        1
    );
}

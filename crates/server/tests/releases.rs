//! The release API over real TCP, with a worker running the releases on
//! real local processes, once on SQLite and once on PostgreSQL.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keelson_core::release::{Track, Version};
use keelson_release::local::{LocalRuntime, LocalRuntimes, LocalSpec};
use keelson_release::{Worker, WorkerConfig};
use keelson_server::client::{Client, ListAudit};
use keelson_server::sample::profile;
use keelson_server::serve::RunningServer;
use keelson_store::testing::{TestDatabase, test_database};
use keelson_store::{Backend, NewToken, Role, Store, SubjectKind};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

struct Harness {
    server: RunningServer,
    store: Store,
    http: reqwest::Client,
    admin: Client,
    admin_secret: String,
    dir: tempfile::TempDir,
    _db: TestDatabase,
}

fn spec(log: &std::path::Path) -> LocalSpec {
    let log = log.display();
    let line = format!(r#"echo "$KEELSON_INSTANCE,$KEELSON_HOOK,$KEELSON_VERSION" >> "{log}""#);
    LocalSpec {
        app: format!(
            r#"echo "$KEELSON_INSTANCE,start,$KEELSON_VERSION" >> "{log}"
: > "$KEELSON_READY_FILE"
exec sleep 300"#
        ),
        pre_start: Some(line.clone()),
        pre_online: Some(format!(
            r#"{line}; echo "warming caches on $KEELSON_INSTANCE""#
        )),
        pre_offline: Some(line),
        start_timeout: Duration::from_secs(10),
    }
}

impl Harness {
    async fn start(backend: Backend) -> Option<Harness> {
        let db = test_database(backend).await?;
        let store = Store::open(&db.url).await.expect("open store");
        let issued = store
            .create_token(
                &NewToken {
                    subject: "root".into(),
                    subject_kind: SubjectKind::Person,
                    teams: vec![],
                    role: Role::Admin,
                    description: None,
                },
                "bootstrap",
            )
            .await
            .expect("token");
        let server = RunningServer::start(store.clone(), "127.0.0.1:0")
            .await
            .expect("server");
        let admin = Client::new(&server.url(), Some(issued.secret.clone())).expect("client");
        Some(Harness {
            server,
            store,
            http: reqwest::Client::new(),
            admin,
            admin_secret: issued.secret,
            dir: tempfile::tempdir().expect("temp dir"),
            _db: db,
        })
    }

    fn spec(&self) -> LocalSpec {
        spec(&self.dir.path().join("effects.log"))
    }

    async fn token(&self, subject: &str, teams: &[&str], role: Role) -> String {
        self.admin
            .create_token(&NewToken {
                subject: subject.into(),
                subject_kind: SubjectKind::Person,
                teams: teams.iter().map(|t| t.to_string()).collect(),
                role,
                description: None,
            })
            .await
            .expect("token")
            .secret
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.server.url()))
            .bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn wait_status(&self, id: &str, status: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (code, body) = self
                .call(
                    reqwest::Method::GET,
                    &format!("/api/v1/apps/shop/releases/{id}"),
                    &self.admin_secret,
                    None,
                )
                .await;
            assert_eq!(code, 200, "{body}");
            if body["status"] == status && (body["finished"] == true || status == "paused") {
                return body;
            }
            assert!(Instant::now() < deadline, "never {status}: {body}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `(id, event kind, data)` of every event the stream sends until it ends.
    async fn events(&self, id: &str, last: Option<&str>) -> Vec<(String, String, Value)> {
        let mut request = self
            .http
            .get(format!("{}/api/v1/releases/{id}/events", self.server.url()))
            .bearer_auth(&self.admin_secret);
        if let Some(last) = last {
            request = request.header("Last-Event-ID", last);
        }
        let response = tokio::time::timeout(Duration::from_secs(30), request.send())
            .await
            .expect("in time")
            .expect("events");
        assert_eq!(response.status().as_u16(), 200);
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap_or("")
                .starts_with("text/event-stream")
        );
        let text = tokio::time::timeout(Duration::from_secs(30), response.text())
            .await
            .expect("the stream ends once the release has")
            .expect("text");
        let mut events = Vec::new();
        for block in text.split("\n\n").filter(|b| !b.trim().is_empty()) {
            let field = |name: &str| {
                block
                    .lines()
                    .find_map(|l| l.strip_prefix(&format!("{name}:")))
                    .map(|v| v.trim().to_string())
            };
            if let (Some(id), Some(kind), Some(data)) = (field("id"), field("event"), field("data"))
            {
                events.push((id, kind, serde_json::from_str(&data).expect("JSON data")));
            }
        }
        events
    }
}

async fn release_through_the_api(backend: Backend) {
    let Some(h) = Harness::start(backend).await else {
        return;
    };
    h.admin
        .apply(
            &profile("shop", "team-a", &["alice"], "registry/shop"),
            None,
        )
        .await
        .expect("apply");
    let runtime = LocalRuntime::new(h.dir.path().join("runtimes/shop/prod"), h.spec());
    for slot in ["vm-0", "vm-1"] {
        runtime
            .deploy(slot, Track::Blue, &Version::from("v1"))
            .await
            .expect("deploy");
    }
    let alice = h.token("alice", &["team-a"], Role::Member).await;
    let bob = h.token("bob", &["team-b"], Role::Member).await;
    let viewer = h.token("vic", &[], Role::Viewer).await;
    let post = reqwest::Method::POST;
    let body = json!({"env": "prod", "version": "v2", "strategy": "in-place", "batches": 2, "pause": "manual"});

    for token in [&bob, &viewer] {
        let (code, reply) = h
            .call(
                post.clone(),
                "/api/v1/apps/shop/releases",
                token,
                Some(body.clone()),
            )
            .await;
        assert_eq!(code, 403, "{reply}");
    }
    let (code, reply) = h
        .call(
            post.clone(),
            "/api/v1/apps/shop/releases",
            &alice,
            Some(json!({"env": "nope", "version": "v2"})),
        )
        .await;
    assert_eq!(
        (code, reply["error"]["field"].as_str()),
        (422, Some("env")),
        "{reply}"
    );
    let (code, reply) = h
        .call(
            post.clone(),
            "/api/v1/apps/shop/releases",
            &alice,
            Some(json!({"env": "prod", "version": "v2", "pause": "soon"})),
        )
        .await;
    assert_eq!(
        (code, reply["error"]["field"].as_str()),
        (422, Some("pause")),
        "{reply}"
    );
    let (code, reply) = h
        .call(
            post.clone(),
            "/api/v1/apps/nope/releases",
            &alice,
            Some(body.clone()),
        )
        .await;
    assert_eq!(code, 404, "{reply}");

    let (code, created) = h
        .call(
            post.clone(),
            "/api/v1/apps/shop/releases",
            &alice,
            Some(body.clone()),
        )
        .await;
    assert_eq!(code, 202, "{created}");
    assert_eq!(created["status"], "planning");
    let id = created["id"].as_str().expect("id").to_string();
    let (code, reply) = h
        .call(
            post.clone(),
            "/api/v1/apps/shop/releases",
            &alice,
            Some(body.clone()),
        )
        .await;
    assert_eq!(
        (code, reply["error"]["code"].as_str()),
        (409, Some("release_running")),
        "{reply}"
    );

    let cancel = CancellationToken::new();
    let worker = Worker::new(
        h.store.clone(),
        Arc::new(LocalRuntimes::new(h.dir.path().join("runtimes"), h.spec())),
        WorkerConfig {
            owner: "w1".into(),
            lease: Duration::from_secs(10),
            poll: Duration::from_millis(50),
        },
    );
    let run = tokio::spawn({
        let cancel = cancel.clone();
        async move { worker.run(cancel).await }
    });

    let paused = h.wait_status(&id, "paused").await;
    assert_eq!(paused["summary"]["status"], "paused", "{paused}");
    let steer = |what: &str| format!("/api/v1/apps/shop/releases/{id}/{what}");
    let (code, reply) = h.call(post.clone(), &steer("pause"), &alice, None).await;
    assert_eq!(
        (code, reply["error"]["code"].as_str()),
        (409, Some("release_state")),
        "{reply}"
    );
    assert!(
        reply["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("paused"),
        "{reply}"
    );
    let (code, reply) = h.call(post.clone(), &steer("resume"), &bob, None).await;
    assert_eq!(code, 403, "{reply}");
    let (code, reply) = h.call(post.clone(), &steer("resume"), &alice, None).await;
    assert_eq!(code, 200, "{reply}");
    let done = h.wait_status(&id, "succeeded").await;
    assert_eq!(done["worker"], Value::Null);
    let (code, reply) = h
        .call(
            post.clone(),
            &steer("abort"),
            &alice,
            Some(json!({"keepOnline": true})),
        )
        .await;
    assert_eq!(code, 409, "a succeeded release cannot be aborted: {reply}");
    cancel.cancel();
    run.await.expect("join").expect("worker");

    let (code, list) = h
        .call(
            reqwest::Method::GET,
            "/api/v1/apps/shop/releases?env=prod",
            &viewer,
            None,
        )
        .await;
    assert_eq!(code, 200);
    assert_eq!(list["items"].as_array().map(Vec::len), Some(1), "{list}");
    let (code, _) = h
        .call(
            reqwest::Method::GET,
            &format!("/api/v1/apps/other/releases/{id}"),
            &viewer,
            None,
        )
        .await;
    assert_eq!(code, 404);

    // The whole story, then only what came after an event.
    let events = h.events(&id, None).await;
    let kinds: Vec<&str> = events.iter().map(|(_, k, _)| k.as_str()).collect();
    assert_eq!(kinds.first(), Some(&"created"), "{kinds:?}");
    assert!(
        kinds.contains(&"planned") && kinds.contains(&"resume"),
        "{kinds:?}"
    );
    assert_eq!(
        events
            .last()
            .map(|(_, _, d)| d["body"]["status"]["status"].clone()),
        Some(json!("succeeded"))
    );
    // The hooks' output lines, with their instance and hook, before the end.
    let hook_lines: Vec<(usize, Value)> = events
        .iter()
        .enumerate()
        .filter(|(_, (_, kind, _))| kind == "hook-output")
        .flat_map(|(n, (_, _, data))| {
            data["body"]["lines"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |l| (n, l))
        })
        .collect();
    let mut shown: Vec<&Value> = hook_lines.iter().map(|(_, l)| l).collect();
    shown.sort_by_key(|l| l["instance"].as_str().unwrap_or_default().to_string());
    assert_eq!(
        shown,
        [
            &json!({"instance": "vm-0@blue", "hook": "preOnline", "line": "warming caches on vm-0@blue"}),
            &json!({"instance": "vm-1@blue", "hook": "preOnline", "line": "warming caches on vm-1@blue"}),
        ],
        "{events:#?}"
    );
    assert!(hook_lines.iter().all(|(n, _)| *n < events.len() - 1));
    let ids: Vec<i64> = events
        .iter()
        .map(|(i, _, _)| i.parse().expect("numeric id"))
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    let rest = h.events(&id, Some(&events[2].0)).await;
    assert_eq!(rest, events[3..].to_vec());
    let (code, reply) = h
        .call(
            reqwest::Method::GET,
            "/api/v1/releases/nope/events",
            &viewer,
            None,
        )
        .await;
    assert_eq!(code, 404, "{reply}");

    let audit = h
        .admin
        .audit(&ListAudit {
            resource: Some(id.clone()),
            limit: Some(100),
            ..Default::default()
        })
        .await
        .expect("audit");
    let actions: Vec<(String, String)> = audit
        .items
        .into_iter()
        .map(|e| (e.action, e.actor))
        .collect();
    assert!(
        actions.contains(&("release.create".into(), "alice".into())),
        "{actions:?}"
    );
    assert!(
        actions.contains(&("release.resume".into(), "alice".into())),
        "{actions:?}"
    );

    let lines = std::fs::read_to_string(h.dir.path().join("effects.log")).expect("log");
    assert_eq!(
        lines.lines().filter(|l| l.ends_with(",start,v2")).count(),
        2,
        "{lines}"
    );
    runtime.stop_all().await;
    h.server.stop().await.expect("stop");
}

#[tokio::test]
async fn sqlite_release_through_the_api() {
    release_through_the_api(Backend::Sqlite).await;
}

#[tokio::test]
async fn postgres_release_through_the_api() {
    release_through_the_api(Backend::Postgres).await;
}

/// A release no worker has planned yet: pausing it is refused with a
/// reason, aborting it ends it at once with nothing run, and a worker that
/// comes later leaves it alone.
async fn abort_while_planning(backend: Backend) {
    let Some(h) = Harness::start(backend).await else {
        return;
    };
    h.admin
        .apply(
            &profile("shop", "team-a", &["alice"], "registry/shop"),
            None,
        )
        .await
        .expect("apply");
    let runtime = LocalRuntime::new(h.dir.path().join("runtimes/shop/prod"), h.spec());
    for slot in ["vm-0", "vm-1"] {
        runtime
            .deploy(slot, Track::Blue, &Version::from("v1"))
            .await
            .expect("deploy");
    }
    let effects = || std::fs::read_to_string(h.dir.path().join("effects.log")).expect("log");
    let before = effects();
    let alice = h.token("alice", &["team-a"], Role::Member).await;
    let bob = h.token("bob", &["team-b"], Role::Member).await;
    let post = reqwest::Method::POST;
    let (code, created) = h
        .call(
            post.clone(),
            "/api/v1/apps/shop/releases",
            &alice,
            Some(json!({"env": "prod", "version": "v2", "batches": 2})),
        )
        .await;
    assert_eq!((code, created["status"].as_str()), (202, Some("planning")));
    let id = created["id"].as_str().expect("id").to_string();
    let steer = |what: &str| format!("/api/v1/apps/shop/releases/{id}/{what}");

    let (code, reply) = h.call(post.clone(), &steer("pause"), &alice, None).await;
    assert_eq!(
        (code, reply["error"]["code"].as_str()),
        (409, Some("release_state")),
        "{reply}"
    );
    let message = reply["error"]["message"].as_str().unwrap_or("");
    assert!(
        message.contains("still being planned") && message.contains("aborted now"),
        "{reply}"
    );
    let (code, reply) = h.call(post.clone(), &steer("abort"), &bob, None).await;
    assert_eq!(code, 403, "{reply}");
    let (code, aborted) = h.call(post.clone(), &steer("abort"), &alice, None).await;
    assert_eq!(code, 200, "{aborted}");
    assert_eq!(
        (
            aborted["status"].as_str(),
            aborted["finished"].as_bool(),
            aborted["abortedUnplannedBy"].as_str()
        ),
        (Some("aborted"), Some(true), Some("alice")),
        "{aborted}"
    );
    let (code, reply) = h.call(post.clone(), &steer("abort"), &alice, None).await;
    assert_eq!(code, 409, "{reply}");

    // The stream tells the whole story and ends, since the release has.
    let events = h.events(&id, None).await;
    let kinds: Vec<&str> = events.iter().map(|(_, k, _)| k.as_str()).collect();
    assert_eq!(kinds, ["created", "aborted-unplanned"]);
    assert_eq!(events[1].2["body"]["by"], "alice");

    // A worker finds nothing to claim; nothing ran.
    let worker = Worker::new(
        h.store.clone(),
        Arc::new(LocalRuntimes::new(h.dir.path().join("runtimes"), h.spec())),
        WorkerConfig {
            owner: "w1".into(),
            lease: Duration::from_secs(10),
            poll: Duration::from_millis(50),
        },
    );
    worker.run_until_idle().await.expect("worker");
    let view = h.wait_status(&id, "aborted").await;
    assert_eq!(view["summary"], Value::Null, "{view}");
    assert_eq!(effects(), before, "nothing ran");

    let audit = h
        .admin
        .audit(&ListAudit {
            resource: Some(id.clone()),
            limit: Some(100),
            ..Default::default()
        })
        .await
        .expect("audit");
    assert!(
        audit
            .items
            .iter()
            .any(|e| e.action == "release.abort" && e.actor == "alice"),
        "{:?}",
        audit.items
    );
    // The environment is free again.
    let (code, reply) = h
        .call(
            post,
            "/api/v1/apps/shop/releases",
            &alice,
            Some(json!({"env": "prod", "version": "v3"})),
        )
        .await;
    assert_eq!(code, 202, "{reply}");
    runtime.stop_all().await;
    h.server.stop().await.expect("stop");
}

#[tokio::test]
async fn sqlite_abort_while_planning() {
    abort_while_planning(Backend::Sqlite).await;
}

#[tokio::test]
async fn postgres_abort_while_planning() {
    abort_while_planning(Backend::Postgres).await;
}

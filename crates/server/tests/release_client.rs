//! The `keelson release` commands and the typed release client over real
//! HTTP, against a server whose releases a worker runs on real local
//! processes; once on SQLite and once on PostgreSQL.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use keelson_core::release::{Track, Version};
use keelson_release::local::{LocalRuntime, LocalRuntimes, LocalSpec};
use keelson_release::{Worker, WorkerConfig};
use keelson_server::cli::{ClientCommand, execute};
use keelson_server::client::{Client, ReleaseView};
use keelson_server::sample::profile;
use keelson_server::serve::RunningServer;
use keelson_store::testing::{TestDatabase, test_database};
use keelson_store::{Backend, NewToken, Role, Store, SubjectKind};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: ClientCommand,
}

struct Harness {
    server: RunningServer,
    store: Store,
    alice: Client,
    alice_secret: String,
    dir: tempfile::TempDir,
    _db: TestDatabase,
}

fn spec() -> LocalSpec {
    LocalSpec {
        app: ": > \"$KEELSON_READY_FILE\"\nexec sleep 300".into(),
        pre_start: None,
        pre_online: Some(r#"echo "warming caches on $KEELSON_VERSION""#.into()),
        pre_offline: None,
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
        admin
            .apply(
                &profile("shop", "team-a", &["alice"], "registry/shop"),
                None,
            )
            .await
            .expect("apply");
        let alice_secret = admin
            .create_token(&NewToken {
                subject: "alice".into(),
                subject_kind: SubjectKind::Person,
                teams: vec!["team-a".into()],
                role: Role::Member,
                description: None,
            })
            .await
            .expect("token")
            .secret;
        let alice = Client::new(&server.url(), Some(alice_secret.clone())).expect("client");
        Some(Harness {
            server,
            store,
            alice,
            alice_secret,
            dir: tempfile::tempdir().expect("temp dir"),
            _db: db,
        })
    }

    /// Runs `keelson ARGS` as alice; what it printed, and its error.
    async fn run(&self, args: &str) -> (String, Result<(), String>) {
        let mut argv = vec!["keelson"];
        argv.extend(args.split_whitespace());
        let url = self.server.url();
        argv.extend(["--server", &url, "--token", &self.alice_secret]);
        let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{args}: {e}"));
        let mut out = Vec::new();
        let result = execute(cli.command, &mut out)
            .await
            .map_err(|e| format!("{e:#}"));
        (String::from_utf8(out).expect("UTF-8"), result)
    }

    async fn wait_for(&self, what: impl Fn(&ReleaseView) -> bool) -> ReleaseView {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let view = self
                .alice
                .latest_release("shop", "prod")
                .await
                .expect("latest");
            if what(&view) {
                return view;
            }
            assert!(
                Instant::now() < deadline,
                "release never got there: {}",
                serde_json::to_string(&view.summary).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// `(instance, version, traffic)` of every instance in a status as JSON.
fn instances(json: &Value) -> Vec<(String, String, bool)> {
    json["summary"]["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .map(|i| {
            (
                i["instance"].as_str().unwrap_or("").to_string(),
                i["version"].as_str().unwrap_or("").to_string(),
                i["traffic"].as_bool().unwrap_or(true),
            )
        })
        .collect()
}

async fn release_commands(backend: Backend) {
    let Some(h) = Harness::start(backend).await else {
        return;
    };
    let runtime = LocalRuntime::new(h.dir.path().join("runtimes/shop/prod"), spec());
    for slot in ["vm-0", "vm-1"] {
        runtime
            .deploy(slot, Track::Blue, &Version::from("v1"))
            .await
            .expect("deploy");
    }

    // Nothing released yet.
    let (_, result) = h.run("release status shop --env prod").await;
    let error = result.expect_err("no release yet");
    assert!(error.contains("no release in"), "{error}");

    // The issue's shape: `keelson release NAME …` starts one.
    let (out, result) = h
        .run("release shop --env prod --version v2 --strategy in-place --batches 2 --pause manual")
        .await;
    result.expect("release");
    assert!(out.contains("v2 planning"), "{out}");
    let (status, result) = h.run("release status shop --env prod").await;
    result.expect("status");
    assert!(status.contains("status:   planning"), "{status}");
    assert!(status.contains("waiting for a worker"), "{status}");

    // Nobody has planned it yet: it can be aborted, and nothing runs.
    let (_, result) = h.run("release pause shop --env prod").await;
    let error = result.expect_err("pause while planning");
    assert!(
        error.contains("still being planned") && error.contains("409"),
        "{error}"
    );
    let (out, result) = h.run("release abort shop --env prod").await;
    result.expect("abort while planning");
    assert!(
        out.contains("aborted") && out.contains("aborted before it was planned: nothing ran"),
        "{out}"
    );
    let (status, result) = h.run("release status shop --env prod").await;
    result.expect("status");
    assert!(status.contains("status:   aborted"), "{status}");
    assert!(
        status.contains("aborted:  by alice before it was planned; nothing ran"),
        "{status}"
    );
    assert!(!status.contains("waiting for a worker"), "{status}");
    let (out, result) = h.run("release watch shop --env prod").await;
    let error = result.expect_err("an aborted release");
    assert!(
        error.contains("ended aborted: aborted by alice before it was planned"),
        "{error}"
    );
    assert!(
        out.contains("aborted by alice before it was planned: nothing ran"),
        "{out}"
    );
    let (out, result) = h
        .run("release shop --env prod --version v2 --strategy in-place --batches 2 --pause manual")
        .await;
    result.expect("release again");
    assert!(out.contains("v2 planning"), "{out}");

    let cancel = CancellationToken::new();
    let worker = Worker::new(
        h.store.clone(),
        Arc::new(LocalRuntimes::new(h.dir.path().join("runtimes"), spec())),
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

    // A manual pause after the first batch.
    h.wait_for(|v| v.status == "paused").await;
    let (json, result) = h.run("release status shop --env prod -o json").await;
    result.expect("status");
    let json: Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(json["summary"]["batches_done"], 1, "{json}");
    assert_eq!(json["summary"]["batches"], 2, "{json}");
    let mut running = instances(&json);
    running.sort();
    assert_eq!(
        running,
        vec![
            ("vm-0@blue".into(), "v2".into(), true),
            ("vm-1@blue".into(), "v1".into(), true),
        ],
        "{json}"
    );
    let (text, result) = h.run("release status shop --env prod").await;
    result.expect("status");
    assert!(text.contains("batches:  1/2 done"), "{text}");
    let row = |text: &str, instance: &str| -> Vec<String> {
        text.lines()
            .find(|l| l.starts_with(instance))
            .unwrap_or_else(|| panic!("no {instance} in {text}"))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    assert_eq!(
        row(&text, "vm-0@blue"),
        ["vm-0@blue", "blue", "v2", "online", "yes"]
    );

    // Refused requests say why and change nothing.
    let (_, result) = h.run("release pause shop --env prod").await;
    let error = result.expect_err("already paused");
    assert!(error.contains("paused") && error.contains("409"), "{error}");

    // Abort waits for the clearing-up, then says who takes traffic.
    let (out, result) = h.run("release abort shop --env prod").await;
    result.expect("abort");
    assert!(out.contains("aborted"), "{out}");
    assert_eq!(
        row(&out, "vm-0@blue"),
        ["vm-0@blue", "blue", "v2", "offline", "no"],
        "{out}"
    );
    assert_eq!(
        row(&out, "vm-1@blue"),
        ["vm-1@blue", "blue", "v1", "online", "yes"],
        "{out}"
    );
    assert!(out.contains("no instance of v2 takes traffic"), "{out}");

    // Watching a finished release replays it and fails unless it succeeded.
    let (out, result) = h.run("release watch shop --env prod").await;
    let error = result.expect_err("an aborted release");
    assert!(error.contains("ended aborted"), "{error}");
    for line in [
        "created",
        "instance vm-0@blue v2 online",
        "paused before batch 2",
        "abort requested",
        // The hooks' output, with the instance and the hook.
        "  vm-0@blue preOnline | warming caches on v2",
        "progress: aborted batches 1/2 done",
        "instances: v1 online 1, v2 offline 1",
    ] {
        assert!(out.contains(line), "no {line:?} in:\n{out}");
    }
    let aborted = h.wait_for(|v| v.finished).await;

    // The stream resumes after a given event.
    let mut all = Vec::new();
    let mut stream = h
        .alice
        .release_events(&aborted.id, None)
        .await
        .expect("events");
    while let Some(event) = stream.next().await.expect("event") {
        all.push(event);
    }
    assert!(all.len() > 4, "{all:?}");
    assert_eq!(all[0].kind(), "created");
    let mut rest = Vec::new();
    let mut stream = h
        .alice
        .release_events(&aborted.id, Some(all[3].id))
        .await
        .expect("events");
    while let Some(event) = stream.next().await.expect("event") {
        rest.push(event);
    }
    assert_eq!(rest, all[4..].to_vec());

    // Start and watch live: the watch ends, successfully, only once a
    // person has resumed the release at its pause.
    let start = h.run(
        "release shop --env prod --version v3 --strategy in-place --batches 2 --pause manual --watch",
    );
    let steer = async {
        let paused = h
            .wait_for(|v| v.id != aborted.id && v.status == "paused")
            .await;
        let (out, result) = h.run("release resume shop --env prod").await;
        result.expect("resume");
        assert!(out.contains("resumed"), "{out}");
        paused
    };
    let ((out, result), paused) = tokio::join!(start, steer);
    result.unwrap_or_else(|e| panic!("{e}\n{out}"));
    assert!(
        out.contains(&format!("watching release {}", paused.id)),
        "{out}"
    );
    assert!(out.contains("resume requested"), "{out}");
    assert!(out.contains("status:   succeeded"), "{out}");
    let paused_at = out.find("paused before batch 2").expect("the pause");
    let resumed_at = out.find("resume requested").expect("the resume");
    assert!(paused_at < resumed_at, "{out}");

    // Roll it back: the watch then exits non-zero.
    let (out, result) = h.run("release rollback shop --env prod").await;
    result.expect("rollback");
    assert!(out.contains("rolling back"), "{out}");
    let (out, result) = h.run("release watch shop --env prod").await;
    let error = result.expect_err("rolled back is not a success");
    assert!(error.contains("ended rolled-back"), "{error}\n{out}");
    let (json, _) = h.run("release status shop --env prod -o json").await;
    let json: Value = serde_json::from_str(&json).expect("JSON");
    assert!(instances(&json).iter().all(|(_, v, _)| v != "v3"), "{json}");

    // A release after a rollback (whose processes carry the generations
    // the earlier release handed out) progresses. Without a worker an
    // abort cannot finish: the command stops waiting when told to and says
    // so, with the instances as they stand.
    h.wait_for(|v| v.finished).await;
    let (_, result) = h
        .run("release shop --env prod --version v4 --batches 2 --pause manual")
        .await;
    result.expect("release");
    h.wait_for(|v| {
        v.status == "paused"
            && v.state
                .as_ref()
                .is_some_and(|s| s.to == Version::from("v4"))
    })
    .await;
    cancel.cancel();
    run.await.expect("join").expect("worker");
    let (out, result) = h.run("release abort shop --env prod --timeout 1s").await;
    let error = result.expect_err("no worker finishes the abort");
    assert!(error.contains("still aborting"), "{error}");
    assert!(
        out.contains("vm-0@blue") && out.contains("TRAFFIC"),
        "{out}"
    );
    runtime.stop_all().await;
    h.server.stop().await.expect("stop");
}

#[tokio::test]
async fn sqlite_release_commands() {
    release_commands(Backend::Sqlite).await;
}

#[tokio::test]
async fn postgres_release_commands() {
    release_commands(Backend::Postgres).await;
}

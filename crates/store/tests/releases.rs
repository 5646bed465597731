//! Durable releases: leases, optimistic commits and the journal, run once
//! against SQLite and once against PostgreSQL.

use keelson_store::testing::{TestDatabase, test_database};
use keelson_store::{Backend, CommitOutcome, JournalStatus, NewRelease, ReleaseCommit, Store};
use serde_json::json;

async fn open(backend: Backend) -> Option<(Store, TestDatabase)> {
    let db = test_database(backend).await?;
    let store = Store::open(&db.url).await.expect("open the store");
    Some((store, db))
}

async fn create(store: &Store, id: &str, env: &str) {
    store
        .create_release(&NewRelease {
            id,
            app: "shop",
            env,
            state: &json!({"status": "pending"}),
            status: "pending",
            actor: "alice",
            detail: json!({"to": "v2"}),
        })
        .await
        .expect("create");
}

fn commit<'a>(
    id: &'a str,
    version: i64,
    owner: Option<&'a str>,
    state: &'a serde_json::Value,
) -> ReleaseCommit<'a> {
    ReleaseCommit {
        id,
        expected_version: version,
        lease_owner: owner,
        state,
        status: "running",
        finished: false,
        planned: Vec::new(),
        done: Vec::new(),
        failed: Vec::new(),
        event: None,
        audit: None,
    }
}

async fn leases_go_to_one_worker(backend: Backend) {
    let Some((store, _db)) = open(backend).await else {
        return;
    };
    create(&store, "r1", "prod").await;
    create(&store, "r2", "staging").await;
    let a = store
        .claim_releases("worker-a", 60_000, 10)
        .await
        .expect("claim");
    assert_eq!(
        a.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["r1", "r2"]
    );
    assert!(
        store
            .claim_releases("worker-b", 60_000, 10)
            .await
            .expect("claim")
            .is_empty()
    );
    // The same owner (a restarted worker) gets its releases back at once.
    assert_eq!(
        store
            .claim_releases("worker-a", 60_000, 10)
            .await
            .expect("claim")
            .len(),
        2
    );
    // An expired lease passes to another worker, and the old owner's commit is refused.
    assert!(
        store
            .renew_release_lease("r1", "worker-a", 0)
            .await
            .expect("renew")
    );
    let expired_wait = std::time::Instant::now();
    let b = loop {
        let b = store
            .claim_releases("worker-b", 60_000, 10)
            .await
            .expect("claim");
        if !b.is_empty() || expired_wait.elapsed().as_secs() > 5 {
            break b;
        }
        tokio::task::yield_now().await;
    };
    assert_eq!(b.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["r1"]);
    let state = json!({"status": "running"});
    assert_eq!(
        store
            .commit_release(&commit("r1", 1, Some("worker-a"), &state))
            .await
            .expect("commit"),
        CommitOutcome::Stale
    );
    assert!(
        !store
            .renew_release_lease("r1", "worker-a", 60_000)
            .await
            .expect("renew")
    );
    assert_eq!(
        store
            .commit_release(&commit("r1", 1, Some("worker-b"), &state))
            .await
            .expect("commit"),
        CommitOutcome::Written(2)
    );
}

async fn journal_and_events_follow_commits(backend: Backend) {
    let Some((store, _db)) = open(backend).await else {
        return;
    };
    create(&store, "r1", "prod").await;
    let state = json!({"status": "running", "n": 1});
    let mut first = commit("r1", 1, None, &state);
    first.planned = vec![(
        "r1/forward/b0/s0/a@blue/a1".into(),
        json!({"kind": "take-offline"}),
    )];
    first.event = Some(json!({"kind": "start"}));
    assert_eq!(
        store.commit_release(&first).await.expect("commit"),
        CommitOutcome::Written(2)
    );
    // A commit computed from an old version writes nothing, journal included.
    let mut stale = commit("r1", 1, None, &state);
    stale.planned = vec![("r1/forward/b0/s1/x/a1".into(), json!({}))];
    assert_eq!(
        store.commit_release(&stale).await.expect("commit"),
        CommitOutcome::Stale
    );
    let done_state = json!({"status": "succeeded"});
    let mut second = commit("r1", 2, None, &done_state);
    second.status = "succeeded";
    second.finished = true;
    second.done = vec!["r1/forward/b0/s0/a@blue/a1".into()];
    second.event = Some(json!({"kind": "done"}));
    second.audit = Some(("alice", "release.pause", json!({})));
    assert_eq!(
        store.commit_release(&second).await.expect("commit"),
        CommitOutcome::Written(3)
    );

    let journal = store.release_journal("r1").await.expect("journal");
    assert_eq!(journal.len(), 1);
    assert_eq!(journal[0].status, JournalStatus::Done);
    assert!(journal[0].done_at.is_some());
    let record = store.release("r1").await.expect("release");
    assert_eq!(
        (record.version, record.finished, record.status.as_str()),
        (3, true, "succeeded")
    );
    assert_eq!(record.state, done_state);
    // Finished releases are never claimed again.
    assert!(
        store
            .claim_releases("w", 60_000, 10)
            .await
            .expect("claim")
            .is_empty()
    );

    let events = store.release_events("r1", 0, 100).await.expect("events");
    let kinds: Vec<_> = events
        .iter()
        .map(|e| e.body["kind"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(kinds, ["created", "start", "done"]);
    let after = store
        .release_events("r1", events[1].id, 100)
        .await
        .expect("events");
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].body["kind"], "done");
    assert_eq!(
        store
            .releases_of("shop", Some("prod"), 10)
            .await
            .expect("list")
            .len(),
        1
    );
    assert!(
        store
            .releases_of("shop", Some("test"), 10)
            .await
            .expect("list")
            .is_empty()
    );
}

#[tokio::test]
async fn sqlite_leases_go_to_one_worker() {
    leases_go_to_one_worker(Backend::Sqlite).await;
}

#[tokio::test]
async fn postgres_leases_go_to_one_worker() {
    leases_go_to_one_worker(Backend::Postgres).await;
}

#[tokio::test]
async fn sqlite_journal_and_events_follow_commits() {
    journal_and_events_follow_commits(Backend::Sqlite).await;
}

#[tokio::test]
async fn postgres_journal_and_events_follow_commits() {
    journal_and_events_follow_commits(Backend::Postgres).await;
}

async fn one_open_release_per_app_and_env(backend: Backend) {
    let Some((store, _db)) = open(backend).await else {
        return;
    };
    create(&store, "r1", "prod").await;
    let second = store
        .create_release(&NewRelease {
            id: "r2",
            app: "shop",
            env: "prod",
            state: &json!({}),
            status: "pending",
            actor: "alice",
            detail: json!({}),
        })
        .await;
    assert!(
        matches!(second, Err(keelson_store::Error::Conflict(_))),
        "{second:?}"
    );
    let done = json!({"status": "succeeded"});
    let mut finish = commit("r1", 1, None, &done);
    finish.finished = true;
    assert_eq!(
        store.commit_release(&finish).await.expect("commit"),
        CommitOutcome::Written(2)
    );
    create(&store, "r2", "prod").await;
}

#[tokio::test]
async fn sqlite_one_open_release_per_app_and_env() {
    one_open_release_per_app_and_env(Backend::Sqlite).await;
}

#[tokio::test]
async fn postgres_one_open_release_per_app_and_env() {
    one_open_release_per_app_and_env(Backend::Postgres).await;
}

async fn appended_events_join_the_stream_without_changing_the_release(backend: Backend) {
    let Some((store, _db)) = open(backend).await else {
        return;
    };
    create(&store, "r1", "prod").await;
    let before = store.release("r1").await.expect("release");
    store
        .append_release_events(
            "r1",
            &[
                json!({"kind": "hook-output", "lines": [{"line": "a"}]}),
                json!({"kind": "hook-output", "lines": [{"line": "b"}]}),
            ],
        )
        .await
        .expect("append");
    store
        .append_release_events("r1", &[])
        .await
        .expect("append nothing");
    // A release that does not exist gets nothing (and no orphan events).
    store
        .append_release_events("nope", &[json!({"kind": "hook-output"})])
        .await
        .expect("append to nothing");
    assert!(
        store
            .release_events("nope", 0, 10)
            .await
            .expect("events")
            .is_empty()
    );
    let events = store.release_events("r1", 0, 10).await.expect("events");
    let lines: Vec<_> = events
        .iter()
        .map(|e| e.body["lines"][0]["line"].as_str().unwrap_or("-"))
        .collect();
    assert_eq!(lines, ["-", "a", "b"]);
    assert!(events.windows(2).all(|w| w[0].id < w[1].id));
    assert_eq!(store.release("r1").await.expect("release"), before);
}

#[tokio::test]
async fn sqlite_appended_events_join_the_stream_without_changing_the_release() {
    appended_events_join_the_stream_without_changing_the_release(Backend::Sqlite).await;
}

#[tokio::test]
async fn postgres_appended_events_join_the_stream_without_changing_the_release() {
    appended_events_join_the_stream_without_changing_the_release(Backend::Postgres).await;
}

/// The next change to release `id` (others are skipped).
async fn change_of(
    rx: &mut tokio::sync::broadcast::Receiver<keelson_store::ReleaseChange>,
    id: &str,
) -> keelson_store::ReleaseChange {
    loop {
        let change = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
            .await
            .expect("a change within 10 s")
            .expect("a change");
        if change.id == id {
            return change;
        }
    }
}

/// Every change reaches a subscriber (on PostgreSQL through NOTIFY, also
/// in a second store on the same database, as a second server would be),
/// and a stale commit sends nothing.
async fn changes_are_pushed_to_subscribers(backend: Backend) {
    let Some((store, db)) = open(backend).await else {
        return;
    };
    let mut here = store.release_changes();
    let other = match backend {
        Backend::Postgres => Some(Store::open(&db.url).await.expect("a second store")),
        Backend::Sqlite => None,
    };
    let mut there = other.as_ref().map(Store::release_changes);
    if let Some(there) = &mut there {
        // The listeners start in the background: go on once both hear.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let (mut heard_here, mut heard_there) = (false, false);
        for n in 0.. {
            create(&store, &format!("warm-{n}"), &format!("env-{n}")).await;
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            heard_here |= here.try_recv().is_ok();
            heard_there |= there.try_recv().is_ok();
            if heard_here && heard_there {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no listener heard a change"
            );
        }
    }

    create(&store, "r1", "prod").await;
    let state = json!({"status": "running"});
    assert_eq!(
        store
            .commit_release(&commit("r1", 1, None, &state))
            .await
            .expect("commit"),
        CommitOutcome::Written(2)
    );
    assert_eq!(
        store
            .commit_release(&commit("r1", 1, None, &state))
            .await
            .expect("commit"),
        CommitOutcome::Stale
    );
    store
        .append_release_events("r1", &[json!({"kind": "hook-output"})])
        .await
        .expect("append");
    for rx in std::iter::once(&mut here).chain(there.as_mut()) {
        for version in [Some(1), Some(2), None] {
            assert_eq!(
                change_of(rx, "r1").await,
                keelson_store::ReleaseChange {
                    id: "r1".into(),
                    version
                }
            );
        }
    }
    // The stale commit sent nothing.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    while let Ok(change) = here.try_recv() {
        assert_ne!(change.id, "r1", "{change:?}");
    }
    if let Some(other) = other {
        other.close().await;
    }
    store.close().await;
}

#[tokio::test]
async fn sqlite_changes_are_pushed_to_subscribers() {
    changes_are_pushed_to_subscribers(Backend::Sqlite).await;
}

#[tokio::test]
async fn postgres_changes_are_pushed_to_subscribers() {
    changes_are_pushed_to_subscribers(Backend::Postgres).await;
}

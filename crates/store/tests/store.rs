//! The store's behaviour, run once against SQLite and once against PostgreSQL.

use std::collections::BTreeMap;
use std::sync::Arc;

use keelson_store::testing::{TestDatabase, test_database};
use keelson_store::{
    AppFilter, AppHead, ApplyProfile, AuditFilter, Backend, Error, NewEnvironment, NewTarget,
    NewToken, Role, Store, SubjectKind, TargetKind, digest_of,
};

async fn open(backend: Backend) -> Option<(Store, TestDatabase)> {
    let db = test_database(backend).await?;
    let store = Store::open(&db.url).await.expect("open the store");
    assert_eq!(store.backend(), backend);
    Some((store, db))
}

fn allow(_: Option<&AppHead>) -> Result<(), String> {
    Ok(())
}

fn profile(name: &str, team: &str, image: &str) -> ApplyProfile {
    let canonical = serde_json::json!({
        "apiVersion": "keelson.dev/v1alpha1", "kind": "App",
        "metadata": { "name": name, "labels": { "tier": "web" } },
        "spec": { "team": team, "owners": ["alice"], "image": image },
    });
    ApplyProfile {
        name: name.into(),
        team: team.into(),
        owners: vec!["alice".into()],
        labels: BTreeMap::from([("tier".into(), "web".into())]),
        description: None,
        text: format!("# posted\nmetadata: {{name: {name}}}\nspec: {{image: {image}}}\n"),
        canonical_json: canonical.to_string(),
        author: "alice".into(),
        message: Some(format!("image {image}")),
        rolled_back_to: None,
    }
}

async fn events_for(store: &Store, app: &str) -> Vec<keelson_store::AuditEvent> {
    store
        .list_audit(&AuditFilter {
            resource: Some(app.into()),
            limit: 100,
            ..Default::default()
        })
        .await
        .expect("list audit")
        .items
}

async fn apply_numbers_revisions_and_skips_identical_profiles(backend: Backend) {
    let Some((store, _db)) = open(backend).await else {
        return;
    };
    let first = store
        .apply_profile(&profile("web", "shop", "web:1"), &allow)
        .await
        .unwrap();
    assert!(first.created && first.changed);
    assert_eq!(first.app.revision, 1);

    // Same canonical JSON, different text: nothing new.
    let mut same = profile("web", "shop", "web:1");
    same.text = "metadata:\n  name: web # reformatted\n".into();
    let again = store.apply_profile(&same, &allow).await.unwrap();
    assert!(!again.changed && !again.created);
    assert_eq!(again.app.revision, 1);

    let second = store
        .apply_profile(&profile("web", "shop", "web:2"), &allow)
        .await
        .unwrap();
    assert!(second.changed && !second.created);
    assert_eq!(second.app.revision, 2);

    let record = store.get_app("web").await.unwrap().expect("app exists");
    assert_eq!(record.revision.summary.number, 2);
    assert_eq!(record.revision.profile["spec"]["image"], "web:2");
    assert_eq!(
        record.revision.profile_text,
        profile("web", "shop", "web:2").text
    );
    let r1 = store
        .get_revision("web", 1)
        .await
        .unwrap()
        .expect("revision 1");
    assert_eq!(r1.profile["spec"]["image"], "web:1");
    assert_eq!(
        r1.summary.digest,
        digest_of(&profile("web", "shop", "web:1").canonical_json)
    );
    assert!(store.get_revision("web", 3).await.unwrap().is_none());

    let history = store.list_revisions("web").await.unwrap().expect("history");
    assert_eq!(
        history.iter().map(|r| r.number).collect::<Vec<_>>(),
        vec![2, 1]
    );
    assert_eq!(history[0].message.as_deref(), Some("image web:2"));

    let events = events_for(&store, "web").await;
    assert_eq!(
        events.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(),
        vec!["app.update", "app.create"]
    );
    assert_eq!(
        events[0].digest_before.as_deref(),
        Some(r1.summary.digest.as_str())
    );
    assert_eq!(
        events[0].digest_after.as_deref(),
        Some(history[0].digest.as_str())
    );
    assert_eq!(events[1].digest_before, None);
    assert_eq!(events[0].actor, "alice");
}

async fn a_refused_change_writes_nothing(backend: Backend) {
    let Some((store, _db)) = open(backend).await else {
        return;
    };
    store
        .apply_profile(&profile("api", "shop", "api:1"), &allow)
        .await
        .unwrap();
    let seen = std::sync::Mutex::new(None);
    let refuse = |head: Option<&AppHead>| -> Result<(), String> {
        *seen.lock().unwrap() = head.cloned();
        Err("not yours".into())
    };
    let err = store
        .apply_profile(&profile("api", "pay", "api:2"), &refuse)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Denied(ref m) if m == "not yours"),
        "{err:?}"
    );
    // The decision saw the stored team, not the posted one.
    assert_eq!(
        seen.lock().unwrap().as_ref().map(|h| h.team.clone()),
        Some("shop".into())
    );
    let err = store
        .apply_profile(&profile("new", "pay", "new:1"), &refuse)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Denied(_)));
    assert!(
        seen.lock().unwrap().is_none(),
        "a new app has no stored head"
    );
    assert!(store.get_app("new").await.unwrap().is_none());
    assert_eq!(store.get_app("api").await.unwrap().unwrap().app.revision, 1);
    assert_eq!(events_for(&store, "api").await.len(), 1);
    assert!(events_for(&store, "new").await.is_empty());
    let err = store
        .delete_app("api", "mallory", &refuse)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Denied(_)));
    assert!(store.get_app("api").await.unwrap().is_some());
}

async fn list_filters_and_pages(backend: Backend) {
    let Some((store, _db)) = open(backend).await else {
        return;
    };
    for i in 0..25 {
        let mut p = profile(
            &format!("app-{i:02}"),
            if i % 2 == 0 { "even" } else { "odd" },
            "img:1",
        );
        if i % 5 == 0 {
            p.owners = vec!["bob".into()];
            p.labels.insert("tier".into(), "db".into());
        }
        store.apply_profile(&p, &allow).await.unwrap();
    }
    let mut names = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .list_apps(&AppFilter {
                after: after.clone(),
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(page.items.len() <= 10);
        names.extend(page.items.iter().map(|a| a.name.clone()));
        match page.next_cursor {
            Some(cursor) => after = Some(cursor),
            None => break,
        }
    }
    assert_eq!(
        names,
        (0..25).map(|i| format!("app-{i:02}")).collect::<Vec<_>>()
    );

    let even = store
        .list_apps(&AppFilter {
            team: Some("even".into()),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(even.items.len(), 13);
    assert!(even.items.iter().all(|a| a.team == "even"));
    let bobs = store
        .list_apps(&AppFilter {
            owner: Some("bob".into()),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        bobs.items
            .iter()
            .map(|a| a.name.as_str())
            .collect::<Vec<_>>(),
        ["app-00", "app-05", "app-10", "app-15", "app-20"]
    );
    let db_odd = store
        .list_apps(&AppFilter {
            team: Some("odd".into()),
            labels: vec![("tier".into(), "db".into())],
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        db_odd
            .items
            .iter()
            .map(|a| a.name.as_str())
            .collect::<Vec<_>>(),
        ["app-05", "app-15"]
    );
}

async fn delete_is_soft_audited_and_reapply_restores(backend: Backend) {
    let Some((store, _db)) = open(backend).await else {
        return;
    };
    store
        .apply_profile(&profile("gone", "shop", "g:1"), &allow)
        .await
        .unwrap();
    let head = store
        .delete_app("gone", "alice", &|_| Ok(()))
        .await
        .unwrap();
    assert!(head.deleted);
    assert!(store.get_app("gone").await.unwrap().is_none());
    assert!(store.list_revisions("gone").await.unwrap().is_none());
    assert!(
        store
            .list_apps(&AppFilter {
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert!(matches!(
        store.delete_app("gone", "alice", &|_| Ok(())).await,
        Err(Error::NotFound { .. })
    ));
    // Re-applying the very same profile brings it back as a new revision.
    let back = store
        .apply_profile(&profile("gone", "shop", "g:1"), &allow)
        .await
        .unwrap();
    assert!(back.created && back.changed);
    assert_eq!(back.app.revision, 2);
    let actions: Vec<_> = events_for(&store, "gone")
        .await
        .into_iter()
        .map(|e| e.action)
        .collect();
    assert_eq!(actions, ["app.restore", "app.delete", "app.create"]);
}

async fn concurrent_applies_number_revisions_without_gaps(backend: Backend) {
    let Some((store, _db)) = open(backend).await else {
        return;
    };
    let store = Arc::new(store);
    let mut tasks = Vec::new();
    for i in 0..12 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .apply_profile(&profile("hot", "shop", &format!("hot:{i}")), &allow)
                .await
        }));
    }
    for task in tasks {
        task.await
            .unwrap()
            .expect("every concurrent apply succeeds");
    }
    let history = store.list_revisions("hot").await.unwrap().unwrap();
    assert_eq!(
        history.iter().map(|r| r.number).collect::<Vec<_>>(),
        (1..=12).rev().collect::<Vec<_>>()
    );
    assert_eq!(events_for(&store, "hot").await.len(), 12);
}

async fn environments_and_targets_register_and_audit(backend: Backend) {
    let Some((store, _db)) = open(backend).await else {
        return;
    };
    let prod = NewEnvironment {
        name: "prod".into(),
        tier: "production".into(),
        description: None,
    };
    store.put_environment(&prod, "root").await.unwrap();
    store.put_environment(&prod, "root").await.unwrap(); // unchanged: no event
    let target = NewTarget {
        name: "zone-a".into(),
        kind: TargetKind::Cluster,
        environment: Some("prod".into()),
        config: serde_json::json!({ "kubeconfig": "/etc/keelson/zone-a" }),
        description: None,
    };
    let stored = store.put_target(&target, "root").await.unwrap();
    assert_eq!(stored.spec, target);
    assert_eq!(store.list_environments().await.unwrap().len(), 1);
    assert_eq!(
        store.list_targets().await.unwrap()[0].spec.config["kubeconfig"],
        "/etc/keelson/zone-a"
    );
    let all = store
        .list_audit(&AuditFilter {
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        all.items
            .iter()
            .map(|e| e.action.as_str())
            .collect::<Vec<_>>(),
        ["target.put", "environment.put"]
    );
}

async fn tokens_authenticate_until_revoked(backend: Backend) {
    let Some((store, _db)) = open(backend).await else {
        return;
    };
    let issued = store
        .create_token(
            &NewToken {
                subject: "ci".into(),
                subject_kind: SubjectKind::Service,
                teams: vec!["shop".into()],
                role: Role::Member,
                description: None,
            },
            "root",
        )
        .await
        .unwrap();
    assert!(issued.secret.starts_with("kst_") && issued.secret.len() == 4 + 64);
    let found = store
        .authenticate(&issued.secret)
        .await
        .unwrap()
        .expect("valid token");
    assert_eq!(found.token.subject, "ci");
    assert_eq!(found.token.teams, ["shop"]);
    assert!(store.authenticate("kst_0000").await.unwrap().is_none());
    let mut wrong = issued.secret.clone();
    wrong.pop();
    wrong.push(if issued.secret.ends_with('0') {
        '1'
    } else {
        '0'
    });
    assert!(store.authenticate(&wrong).await.unwrap().is_none());
    store.revoke_token(&found.id, "root").await.unwrap();
    assert!(store.authenticate(&issued.secret).await.unwrap().is_none());
    let actions: Vec<_> = events_for(&store, &found.id)
        .await
        .into_iter()
        .map(|e| e.action)
        .collect();
    assert_eq!(actions, ["token.revoke", "token.create"]);
}

async fn migrations_are_idempotent(backend: Backend) {
    let Some((store, db)) = open(backend).await else {
        return;
    };
    store
        .apply_profile(&profile("kept", "shop", "k:1"), &allow)
        .await
        .unwrap();
    store.migrate().await.unwrap();
    store.close().await;
    let reopened = Store::open(&db.url).await.unwrap();
    assert_eq!(
        reopened
            .get_app("kept")
            .await
            .unwrap()
            .unwrap()
            .app
            .revision,
        1
    );
    reopened.close().await;
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(keelson_store::Backend::Sqlite).await })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(keelson_store::Backend::Postgres).await })*
        }
    };
}

on_both_backends!(
    apply_numbers_revisions_and_skips_identical_profiles,
    a_refused_change_writes_nothing,
    list_filters_and_pages,
    delete_is_soft_audited_and_reapply_restores,
    concurrent_applies_number_revisions_without_gaps,
    environments_and_targets_register_and_audit,
    tokens_authenticate_until_revoked,
    migrations_are_idempotent,
);

//! The HTTP API over real TCP against a running server, once on SQLite and
//! once on PostgreSQL.

use keelson_server::client::{Client, ClientError, ListApps, ListAudit};
use keelson_server::sample::profile;
use keelson_server::serve::RunningServer;
use keelson_store::testing::{TestDatabase, test_database};
use keelson_store::{
    Backend, NewEnvironment, NewTarget, NewToken, Role, Store, SubjectKind, TargetKind,
};
use serde_json::Value;

struct Harness {
    server: Option<RunningServer>,
    url: String,
    admin: Client,
    http: reqwest::Client,
    _db: TestDatabase,
}

impl Harness {
    async fn start(backend: Backend) -> Option<Harness> {
        let db = test_database(backend).await?;
        let store = Store::open(&db.url).await.expect("open store");
        let admin = NewToken {
            subject: "root".into(),
            subject_kind: SubjectKind::Person,
            teams: vec![],
            role: Role::Admin,
            description: Some("bootstrap".into()),
        };
        let issued = store
            .create_token(&admin, "bootstrap")
            .await
            .expect("bootstrap token");
        let server = RunningServer::start(store, "127.0.0.1:0")
            .await
            .expect("start server");
        let url = server.url();
        let admin = Client::new(&url, Some(issued.secret)).unwrap();
        Some(Harness {
            server: Some(server),
            url,
            admin,
            http: reqwest::Client::new(),
            _db: db,
        })
    }

    async fn client(&self, subject: &str, teams: &[&str], role: Role) -> Client {
        let issued = self
            .admin
            .create_token(&NewToken {
                subject: subject.into(),
                subject_kind: SubjectKind::Person,
                teams: teams.iter().map(|t| t.to_string()).collect(),
                role,
                description: None,
            })
            .await
            .expect("create token");
        Client::new(&self.url, Some(issued.secret)).unwrap()
    }

    /// A raw request, for bodies the typed client would never send.
    async fn raw(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Vec<u8>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.url))
            .body(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn admin_secret(&self) -> String {
        let issued = self
            .admin
            .create_token(&NewToken {
                subject: "root".into(),
                subject_kind: SubjectKind::Person,
                teams: vec![],
                role: Role::Admin,
                description: None,
            })
            .await
            .unwrap();
        issued.secret
    }

    async fn audit_actions(&self, resource: &str) -> Vec<String> {
        let page = self
            .admin
            .audit(&ListAudit {
                resource: Some(resource.into()),
                limit: Some(1000),
                ..Default::default()
            })
            .await
            .unwrap();
        page.items.into_iter().map(|e| e.action).collect()
    }

    async fn stop(mut self) {
        if let Some(server) = self.server.take() {
            server.stop().await.expect("clean shutdown");
        }
    }
}

fn status(result: Result<impl std::fmt::Debug, ClientError>) -> u16 {
    match result {
        Ok(value) => panic!("expected an error, got {value:?}"),
        Err(e) => e.status().unwrap_or_else(|| panic!("no HTTP status: {e}")),
    }
}

async fn probes_metrics_and_openapi_are_public(backend: Backend) {
    let Some(h) = Harness::start(backend).await else {
        return;
    };
    let (code, body) = h.raw(reqwest::Method::GET, "/healthz", None, vec![]).await;
    assert_eq!((code, body), (200, Value::String("ok".into())));
    let (code, body) = h.raw(reqwest::Method::GET, "/readyz", None, vec![]).await;
    assert_eq!(code, 200);
    assert_eq!(
        body["database"],
        if backend == Backend::Sqlite {
            "sqlite"
        } else {
            "postgres"
        }
    );
    let (code, doc) = h
        .raw(reqwest::Method::GET, "/api/v1/openapi.json", None, vec![])
        .await;
    assert_eq!(code, 200);
    assert_eq!(doc["openapi"], "3.0.3");
    assert!(doc["paths"]["/api/v1/apps/{name}/diff"]["get"].is_object());
    assert!(doc["components"]["schemas"]["ApplyOutcome"].is_object());
    let (code, metrics) = h.raw(reqwest::Method::GET, "/metrics", None, vec![]).await;
    assert_eq!(code, 200);
    let metrics = metrics.as_str().unwrap().to_string();
    assert!(
        metrics.contains(
            "keelson_http_requests_total{method=\"GET\",route=\"/healthz\",status=\"200\"} 1"
        ),
        "{metrics}"
    );
    h.stop().await;
}

async fn requests_without_a_valid_token_get_401(backend: Backend) {
    let Some(h) = Harness::start(backend).await else {
        return;
    };
    let anonymous = Client::new(&h.url, None).unwrap();
    let err = anonymous.list_apps(&ListApps::default()).await.unwrap_err();
    assert_eq!(err.status(), Some(401));
    assert_eq!(err.body().unwrap().error.code, "unauthorized");
    let forged = Client::new(&h.url, Some(format!("kst_{}", "0".repeat(64)))).unwrap();
    assert_eq!(
        status(
            forged
                .apply(
                    &profile("web", "shop", &["ann"], "registry.local/web-1"),
                    None
                )
                .await
        ),
        401
    );
    let response = h
        .http
        .get(format!("{}/api/v1/apps", h.url))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers()["www-authenticate"],
        "Bearer realm=\"keelson\""
    );
    // A revoked token stops working at once.
    let ann = h.client("ann", &["shop"], Role::Member).await;
    let me = ann.whoami().await.unwrap();
    h.admin.revoke_token(&me.token_id).await.unwrap();
    assert_eq!(status(ann.whoami().await), 401);
    assert!(h.audit_actions("web").await.is_empty());
    h.stop().await;
}

async fn apply_history_diff_rollback_delete_are_all_audited(backend: Backend) {
    let Some(h) = Harness::start(backend).await else {
        return;
    };
    let ann = h.client("ann", &["shop"], Role::Member).await;
    let v1 = profile("web", "shop", &["ann"], "registry.local/web-1");
    let created = ann.apply(&v1, Some("first")).await.unwrap();
    assert!(created.created && created.changed);
    assert_eq!(created.app.revision, 1);

    // Same profile, other formatting: no revision.
    let reformatted =
        serde_json::to_string_pretty(&serde_json::from_str::<Value>(&v1).unwrap()).unwrap();
    let same = ann.apply(&reformatted, None).await.unwrap();
    assert!(!same.changed);
    assert_eq!(same.app.revision, 1);

    let v2 = profile("web", "shop", &["ann"], "registry.local/web-2");
    let updated = ann.apply(&v2, Some("bump")).await.unwrap();
    assert_eq!(
        (updated.created, updated.changed, updated.app.revision),
        (false, true, 2)
    );

    let current = ann.get_app("web", None).await.unwrap();
    assert_eq!(current.revision.summary.number, 2);
    assert_eq!(
        current.revision.profile["spec"]["image"],
        "registry.local/web-2"
    );
    assert_eq!(current.revision.profile_text, v2);
    let first = ann.get_app("web", Some(1)).await.unwrap();
    assert_eq!(
        first.revision.profile["spec"]["image"],
        "registry.local/web-1"
    );
    assert_eq!(first.revision.summary.message.as_deref(), Some("first"));
    assert_eq!(status(ann.get_app("web", Some(9)).await), 404);

    let history = ann.revisions("web").await.unwrap();
    assert_eq!(
        history.items.iter().map(|r| r.number).collect::<Vec<_>>(),
        [2, 1]
    );
    assert!(history.items.iter().all(|r| r.author == "ann"));

    let diff = ann.diff("web", 1, 2).await.unwrap();
    assert_eq!(diff.changes.len(), 1, "{:?}", diff.changes);
    assert_eq!(diff.changes[0].path, "spec.image");
    assert_eq!(
        diff.changes[0].before,
        Some(Value::from("registry.local/web-1"))
    );
    assert_eq!(
        diff.changes[0].after,
        Some(Value::from("registry.local/web-2"))
    );

    let rolled = ann.rollback("web", 1, None).await.unwrap();
    assert_eq!(rolled.app.revision, 3);
    let r3 = ann.revision("web", 3).await.unwrap();
    assert_eq!(r3.summary.rolled_back_to, Some(1));
    assert_eq!(r3.summary.digest, first.revision.summary.digest);
    assert_eq!(r3.profile_text, v1);
    assert!(ann.diff("web", 1, 3).await.unwrap().changes.is_empty());

    let deleted = ann.delete_app("web").await.unwrap();
    assert!(deleted.deleted);
    assert_eq!(status(ann.get_app("web", None).await), 404);
    assert_eq!(status(ann.revisions("web").await), 404);
    assert_eq!(status(ann.delete_app("web").await), 404);

    let events = h
        .admin
        .audit(&ListAudit {
            resource: Some("web".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .items;
    let actions: Vec<&str> = events.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        ["app.delete", "app.rollback", "app.update", "app.create"]
    );
    assert!(events.iter().all(|e| e.actor == "ann"));
    assert_eq!(
        events[1].digest_before.as_deref(),
        Some(updated.app.digest.as_str())
    );
    assert_eq!(
        events[1].digest_after.as_deref(),
        Some(created.app.digest.as_str())
    );
    assert_eq!(events[0].digest_after, None);
    h.stop().await;
}

async fn viewers_cannot_mutate(backend: Backend) {
    let Some(h) = Harness::start(backend).await else {
        return;
    };
    let ann = h.client("ann", &["shop"], Role::Member).await;
    ann.apply(
        &profile("web", "shop", &["ann"], "registry.local/web-1"),
        None,
    )
    .await
    .unwrap();
    let vic = h.client("vic", &["shop"], Role::Viewer).await;
    assert_eq!(vic.get_app("web", None).await.unwrap().app.revision, 1);
    assert_eq!(
        vic.list_apps(&ListApps::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    let err = vic
        .apply(
            &profile("web", "shop", &["vic"], "registry.local/web-2"),
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(403));
    assert_eq!(err.body().unwrap().error.code, "forbidden");
    assert_eq!(
        status(
            vic.apply(
                &profile("mine", "shop", &["vic"], "registry.local/m-1"),
                None
            )
            .await
        ),
        403
    );
    assert_eq!(status(vic.rollback("web", 1, None).await), 403);
    assert_eq!(status(vic.delete_app("web").await), 403);
    let env = NewEnvironment {
        name: "prod".into(),
        tier: "production".into(),
        description: None,
    };
    assert_eq!(status(vic.put_environment(&env).await), 403);
    assert_eq!(status(ann.put_environment(&env).await), 403);
    assert_eq!(status(vic.tokens().await), 403);
    assert_eq!(ann.get_app("web", None).await.unwrap().app.revision, 1);
    assert_eq!(h.audit_actions("web").await, ["app.create"]);
    assert!(h.audit_actions("mine").await.is_empty());
    h.stop().await;
}

async fn members_touch_only_their_own_apps(backend: Backend) {
    let Some(h) = Harness::start(backend).await else {
        return;
    };
    let ann = h.client("ann", &["shop"], Role::Member).await;
    let bob = h.client("bob", &["pay"], Role::Member).await;
    bob.apply(
        &profile("ledger", "pay", &["bob"], "registry.local/ledger-1"),
        None,
    )
    .await
    .unwrap();

    // Naming herself in the posted profile does not help: the stored app decides.
    let err = ann
        .apply(
            &profile("ledger", "pay", &["ann", "bob"], "registry.local/ledger-2"),
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(403));
    assert!(
        err.body()
            .unwrap()
            .error
            .message
            .contains("neither an owner nor in that team"),
        "{err}"
    );
    assert_eq!(
        status(
            ann.apply(
                &profile("ledger", "shop", &["ann"], "registry.local/ledger-2"),
                None
            )
            .await
        ),
        403
    );
    assert_eq!(status(ann.rollback("ledger", 1, None).await), 403);
    assert_eq!(status(ann.delete_app("ledger").await), 403);
    // Nothing changed, nothing was recorded.
    assert_eq!(bob.get_app("ledger", None).await.unwrap().app.revision, 1);
    assert_eq!(h.audit_actions("ledger").await, ["app.create"]);

    // Creating needs the caller or one of their teams in the profile.
    assert_eq!(
        status(
            ann.apply(
                &profile("sneaky", "pay", &["bob"], "registry.local/s-1"),
                None
            )
            .await
        ),
        403
    );
    assert_eq!(status(h.admin.get_app("sneaky", None).await), 404);
    ann.apply(
        &profile("cart", "shop", &["carl"], "registry.local/cart-1"),
        None,
    )
    .await
    .unwrap();

    // An owner outside the team may change the app, but not move it to another team.
    ann.apply(
        &profile("solo", "ann-only", &["ann"], "registry.local/solo-1"),
        None,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    ann.apply(
        &profile("solo", "ann-only", &["ann"], "registry.local/solo-2"),
        None,
    )
    .await
    .unwrap();
    let err = ann
        .apply(
            &profile("solo", "shop", &["ann"], "registry.local/solo-3"),
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(403));
    assert!(
        err.body()
            .unwrap()
            .error
            .message
            .contains("only admins change an app's team")
    );
    // Admins may.
    let moved = h
        .admin
        .apply(
            &profile("solo", "shop", &["ann"], "registry.local/solo-3"),
            None,
        )
        .await
        .unwrap();
    assert_eq!((moved.app.team.as_str(), moved.app.revision), ("shop", 3));
    let events = h
        .admin
        .audit(&ListAudit {
            resource: Some("solo".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(events.items[0].actor, "root");
    assert_eq!(events.items[0].detail["teamBefore"], "ann-only");
    h.stop().await;
}

async fn bad_input_gets_a_precise_4xx_and_writes_nothing(backend: Backend) {
    let Some(h) = Harness::start(backend).await else {
        return;
    };
    let token = h.admin_secret().await;
    let post = reqwest::Method::POST;

    let (code, body) = h
        .raw(
            post.clone(),
            "/api/v1/apps",
            Some(&token),
            b"{\"apiVersion\": ".to_vec(),
        )
        .await;
    assert_eq!(code, 422, "{body}");
    assert_eq!(body["error"]["code"], "invalid_profile");
    assert!(
        body["error"]["details"][0]["line"].as_u64().unwrap() >= 1,
        "{body}"
    );

    let mut unknown: Value =
        serde_json::from_str(&profile("web", "shop", &["ann"], "registry.local/w-1")).unwrap();
    unknown["spec"]["colour"] = Value::from("blue");
    unknown["metadata"]["nickname"] = Value::from("w");
    let (code, body) = h
        .raw(
            post.clone(),
            "/api/v1/apps",
            Some(&token),
            unknown.to_string().into_bytes(),
        )
        .await;
    assert_eq!(code, 422, "{body}");
    let paths: Vec<&str> = body["error"]["details"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d["path"].as_str())
        .collect();
    assert!(paths.iter().any(|p| p.starts_with("metadata")), "{body}");

    let mut wrong_type: Value =
        serde_json::from_str(&profile("web", "shop", &["ann"], "registry.local/w-1")).unwrap();
    wrong_type["spec"]["owners"] = Value::from(42);
    let (code, body) = h
        .raw(
            post.clone(),
            "/api/v1/apps",
            Some(&token),
            wrong_type.to_string().into_bytes(),
        )
        .await;
    assert_eq!(code, 422, "{body}");
    assert_eq!(body["error"]["details"][0]["path"], "spec.owners", "{body}");
    assert_eq!(body["error"]["field"], "spec.owners");

    let mut no_team: Value =
        serde_json::from_str(&profile("web", "shop", &["ann"], "registry.local/w-1")).unwrap();
    no_team["spec"]["team"] = Value::from("");
    let (code, body) = h
        .raw(
            post.clone(),
            "/api/v1/apps",
            Some(&token),
            no_team.to_string().into_bytes(),
        )
        .await;
    assert_eq!(code, 422);
    assert!(
        body["error"]["details"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["path"] == "spec.team"),
        "{body}"
    );

    let huge = vec![b'#'; 2 * 1024 * 1024];
    let (code, body) = h
        .raw(post.clone(), "/api/v1/apps", Some(&token), huge)
        .await;
    assert_eq!(code, 413);
    assert_eq!(body["error"]["code"], "payload_too_large");

    let (code, body) = h
        .raw(
            post.clone(),
            "/api/v1/apps",
            Some(&token),
            vec![0xff, 0xfe, 0x00],
        )
        .await;
    assert_eq!(code, 400);
    assert_eq!(body["error"]["code"], "invalid_encoding");

    // JSON bodies of other endpoints: malformed, unknown field, wrong type.
    h.admin
        .apply(
            &profile("web", "shop", &["ann"], "registry.local/w-1"),
            None,
        )
        .await
        .unwrap();
    let rollback = "/api/v1/apps/web/rollback";
    let (code, body) = h
        .raw(
            post.clone(),
            rollback,
            Some(&token),
            b"{revision: 1}".to_vec(),
        )
        .await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (400, Some("malformed_json"))
    );
    let (code, body) = h
        .raw(
            post.clone(),
            rollback,
            Some(&token),
            br#"{"revision": 1, "why": "x"}"#.to_vec(),
        )
        .await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (422, Some("invalid_body")),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown field `why`"),
        "{body}"
    );
    let (code, body) = h
        .raw(
            post.clone(),
            rollback,
            Some(&token),
            br#"{"revision": "one"}"#.to_vec(),
        )
        .await;
    assert_eq!(
        (code, body["error"]["field"].as_str()),
        (422, Some("revision")),
        "{body}"
    );
    let (code, body) = h
        .raw(
            post.clone(),
            "/api/v1/environments",
            Some(&token),
            br#"{"name": "prod", "tier": "live"}"#.to_vec(),
        )
        .await;
    assert_eq!(
        (code, body["error"]["field"].as_str()),
        (422, Some("tier")),
        "{body}"
    );

    // Query and path parameters.
    let get = reqwest::Method::GET;
    let (code, body) = h
        .raw(
            get.clone(),
            "/api/v1/apps/web?revision=abc",
            Some(&token),
            vec![],
        )
        .await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (400, Some("invalid_query")),
        "{body}"
    );
    let (code, _) = h
        .raw(get.clone(), "/api/v1/apps?limit=0", Some(&token), vec![])
        .await;
    assert_eq!(code, 400);
    let (code, body) = h
        .raw(get.clone(), "/api/v1/apps?label=tier", Some(&token), vec![])
        .await;
    assert_eq!(
        (code, body["error"]["field"].as_str()),
        (400, Some("label"))
    );
    let (code, body) = h
        .raw(
            get.clone(),
            "/api/v1/apps/web/revisions/x",
            Some(&token),
            vec![],
        )
        .await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (400, Some("invalid_path"))
    );
    let (code, body) = h
        .raw(get.clone(), "/api/v1/nothing", Some(&token), vec![])
        .await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let (code, body) = h
        .raw(reqwest::Method::PATCH, "/api/v1/apps", Some(&token), vec![])
        .await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (405, Some("method_not_allowed"))
    );

    // Only the one good apply left a trace.
    assert_eq!(h.admin.revisions("web").await.unwrap().items.len(), 1);
    let all = h
        .admin
        .audit(&ListAudit {
            kind: Some("app".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(all.items.len(), 1);
    h.stop().await;
}

async fn list_filters_and_pages_over_http(backend: Backend) {
    let Some(h) = Harness::start(backend).await else {
        return;
    };
    for i in 0..30 {
        let team = if i % 3 == 0 { "pay" } else { "shop" };
        let owner = if i % 2 == 0 { "ann" } else { "bob" };
        h.admin
            .apply(
                &profile(
                    &format!("app-{i:02}"),
                    team,
                    &[owner],
                    "registry.local/img-1",
                ),
                None,
            )
            .await
            .unwrap();
    }
    let page = h
        .admin
        .list_apps(&ListApps {
            limit: Some(7),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.items.len(), 7);
    assert_eq!(page.next_cursor.as_deref(), Some("app-06"));
    let all = h
        .admin
        .list_all_apps(&ListApps {
            limit: Some(7),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(all.len(), 30);
    let pay = h
        .admin
        .list_all_apps(&ListApps {
            team: Some("pay".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(pay.len(), 10);
    let pay_ann = h
        .admin
        .list_all_apps(&ListApps {
            team: Some("pay".into()),
            owner: Some("ann".into()),
            label: Some("tier=web".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        pay_ann.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(),
        ["app-00", "app-06", "app-12", "app-18", "app-24"]
    );
    let none = h
        .admin
        .list_apps(&ListApps {
            label: Some("tier=db".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(none.items.is_empty() && none.next_cursor.is_none());
    h.stop().await;
}

async fn every_mutation_is_in_the_audit_log(backend: Backend) {
    let Some(h) = Harness::start(backend).await else {
        return;
    };
    let env = NewEnvironment {
        name: "prod".into(),
        tier: "production".into(),
        description: None,
    };
    h.admin.put_environment(&env).await.unwrap();
    let target = NewTarget {
        name: "zone-a".into(),
        kind: TargetKind::Cluster,
        environment: Some("prod".into()),
        config: serde_json::json!({ "kubeconfig": "zone-a" }),
        description: None,
    };
    h.admin.put_target(&target).await.unwrap();
    assert_eq!(h.admin.targets().await.unwrap()[0].spec, target);
    assert_eq!(h.admin.environments().await.unwrap()[0].spec, env);
    let ann = h.client("ann", &["shop"], Role::Member).await;
    ann.apply(
        &profile("web", "shop", &["ann"], "registry.local/w-1"),
        None,
    )
    .await
    .unwrap();
    ann.apply(
        &profile("web", "shop", &["ann"], "registry.local/w-2"),
        None,
    )
    .await
    .unwrap();
    ann.rollback("web", 1, Some("bad release".into()))
        .await
        .unwrap();
    ann.delete_app("web").await.unwrap();
    ann.apply(
        &profile("web", "shop", &["ann"], "registry.local/w-3"),
        None,
    )
    .await
    .unwrap();
    let me = ann.whoami().await.unwrap();
    h.admin.revoke_token(&me.token_id).await.unwrap();

    let events = h.admin.audit(&ListAudit::default()).await.unwrap().items;
    let seen: Vec<(String, String, String)> = events
        .iter()
        .rev()
        .map(|e| (e.action.clone(), e.resource.clone(), e.actor.clone()))
        .collect();
    let expect = |a: &str, r: &str, who: &str| (a.to_string(), r.to_string(), who.to_string());
    assert_eq!(
        seen,
        [
            // The harness's own admin token was made directly in the store.
            expect(
                "token.create",
                &events.last().unwrap().resource,
                "bootstrap"
            ),
            expect("environment.put", "prod", "root"),
            expect("target.put", "zone-a", "root"),
            expect("token.create", &me.token_id, "root"),
            expect("app.create", "web", "ann"),
            expect("app.update", "web", "ann"),
            expect("app.rollback", "web", "ann"),
            expect("app.delete", "web", "ann"),
            expect("app.restore", "web", "ann"),
            expect("token.revoke", &me.token_id, "root"),
        ]
    );
    let by_ann = h
        .admin
        .audit(&ListAudit {
            actor: Some("ann".into()),
            limit: Some(2),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(by_ann.items.len(), 2);
    let next = h
        .admin
        .audit(&ListAudit {
            actor: Some("ann".into()),
            cursor: by_ann.next_cursor,
            limit: Some(10),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(next.items.len(), 3);
    h.stop().await;
}

async fn concurrent_applies_over_http_leave_no_gaps(backend: Backend) {
    let Some(h) = Harness::start(backend).await else {
        return;
    };
    let mut tasks = Vec::new();
    for i in 0..16 {
        let admin = h.admin.clone();
        tasks.push(tokio::spawn(async move {
            admin
                .apply(
                    &profile("hot", "shop", &["ann"], &format!("registry.local/hot-{i}")),
                    None,
                )
                .await
        }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let history = h.admin.revisions("hot").await.unwrap();
    assert_eq!(
        history.items.iter().map(|r| r.number).collect::<Vec<_>>(),
        (1..=16).rev().collect::<Vec<_>>()
    );
    assert_eq!(h.audit_actions("hot").await.len(), 16);
    h.stop().await;
}

fn examples_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

async fn yaml_profiles_apply_and_comments_or_layout_make_no_revision(backend: Backend) {
    let Some(h) = Harness::start(backend).await else {
        return;
    };
    let hello = std::fs::read_to_string(examples_dir().join("hello/app.yaml")).unwrap();
    let created = h.admin.apply(&hello, None).await.unwrap();
    assert_eq!(
        (created.app.name.as_str(), created.app.revision),
        ("hello", 1)
    );
    // The same profile in another layout, with other comments, in JSON.
    let relaid = format!(
        "# moved around\n{}",
        hello.replace("# The smallest useful profile", "# another comment")
    );
    assert!(!h.admin.apply(&relaid, None).await.unwrap().changed);
    let record = h.admin.get_app("hello", None).await.unwrap();
    let as_json = serde_json::to_string(&record.revision.profile).unwrap();
    assert!(!h.admin.apply(&as_json, None).await.unwrap().changed);
    assert_eq!(h.admin.revisions("hello").await.unwrap().items.len(), 1);
    // A real change is a revision, and the text posted is kept verbatim.
    let bigger = hello.replace("replicas: 2", "replicas: 3");
    assert_eq!(h.admin.apply(&bigger, None).await.unwrap().app.revision, 2);
    assert_eq!(
        h.admin
            .get_app("hello", None)
            .await
            .unwrap()
            .revision
            .profile_text,
        bigger
    );
    let diff = h.admin.diff("hello", 1, 2).await.unwrap();
    assert_eq!(diff.changes.len(), 1);
    assert_eq!(diff.changes[0].path, "spec.environments.prod.replicas");
    h.stop().await;
}

/// Every file in examples/invalid names the paths it must be rejected at
/// (`# expect: PATH`); the API reports them all in one 422.
async fn invalid_examples_get_422_with_their_field_paths(backend: Backend) {
    let Some(h) = Harness::start(backend).await else {
        return;
    };
    let token = h.admin_secret().await;
    let mut files: Vec<_> = std::fs::read_dir(examples_dir().join("invalid"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 5,
        "expected the invalid examples, found {files:?}"
    );
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let expected: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# expect:"))
            .map(str::trim)
            .collect();
        let (code, body) = h
            .raw(
                reqwest::Method::POST,
                "/api/v1/apps",
                Some(&token),
                text.clone().into_bytes(),
            )
            .await;
        assert_eq!(code, 422, "{}: {body}", file.display());
        assert_eq!(body["error"]["code"], "invalid_profile");
        let details = body["error"]["details"].as_array().unwrap();
        for path in expected {
            assert!(
                details
                    .iter()
                    .any(|d| d["path"] == path && d["line"].as_u64().is_some()),
                "{}: no error at {path:?} in {body}",
                file.display()
            );
        }
    }
    let all = h.admin.list_apps(&ListApps::default()).await.unwrap();
    assert!(all.items.is_empty(), "an invalid profile was stored");
    assert!(
        h.admin
            .audit(&ListAudit {
                kind: Some("app".into()),
                ..Default::default()
            })
            .await
            .unwrap()
            .items
            .is_empty()
    );
    h.stop().await;
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
    probes_metrics_and_openapi_are_public,
    requests_without_a_valid_token_get_401,
    apply_history_diff_rollback_delete_are_all_audited,
    viewers_cannot_mutate,
    members_touch_only_their_own_apps,
    bad_input_gets_a_precise_4xx_and_writes_nothing,
    list_filters_and_pages_over_http,
    every_mutation_is_in_the_audit_log,
    concurrent_applies_over_http_leave_no_gaps,
    yaml_profiles_apply_and_comments_or_layout_make_no_revision,
    invalid_examples_get_422_with_their_field_paths,
);

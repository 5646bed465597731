//! The client commands as the `keelson` binary embeds them, run against a
//! real server: parse argv with clap, execute, read what they print.

use clap::{CommandFactory, Parser, Subcommand};
use keelson_server::cli::{ClientCommand, ServeArgs, TokenCommand, execute, execute_token};
use keelson_server::serve::RunningServer;
use keelson_store::testing::test_database;
use keelson_store::{Backend, Store};

/// The way `keelson` embeds these commands.
#[derive(Parser, Debug)]
#[command(name = "keelson")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    #[command(flatten)]
    Client(ClientCommand),
    Serve(ServeArgs),
    #[command(subcommand)]
    Token(TokenCommand),
}

async fn run(argv: &[&str]) -> anyhow::Result<String> {
    let cli = Cli::try_parse_from(std::iter::once("keelson").chain(argv.iter().copied()))?;
    let mut out = Vec::new();
    match cli.command {
        Command::Client(command) => execute(command, &mut out).await?,
        Command::Token(command) => execute_token(command, &mut out).await?,
        Command::Serve(_) => anyhow::bail!("not in tests"),
    }
    Ok(String::from_utf8(out)?)
}

#[test]
fn the_command_tree_is_consistent() {
    Cli::command().debug_assert();
    let serve = Cli::try_parse_from([
        "keelson",
        "serve",
        "--listen",
        "127.0.0.1:9",
        "--database",
        "sqlite:///tmp/k.db",
    ])
    .unwrap();
    assert!(
        matches!(serve.command, Command::Serve(ServeArgs { ref listen, .. }) if listen == "127.0.0.1:9")
    );
    assert!(
        Cli::try_parse_from(["keelson", "get", "app"]).is_err(),
        "NAME is required"
    );
    assert!(Cli::try_parse_from(["keelson", "token", "create", "--role", "root"]).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_get_history_diff_rollback_and_tokens_from_the_command_line() {
    let db = test_database(Backend::Sqlite).await.unwrap();
    // Bootstrap the first admin token straight on the database.
    let printed = run(&[
        "token",
        "create",
        "--database",
        &db.url,
        "--role",
        "admin",
        "--subject",
        "root",
    ])
    .await
    .unwrap();
    let admin = printed.trim().to_string();
    assert!(
        admin.starts_with("kst_") && !admin.contains('\n'),
        "{printed:?}"
    );

    let store = Store::open(&db.url).await.unwrap();
    let server = RunningServer::start(store, "127.0.0.1:0").await.unwrap();
    let url = server.url();
    let conn = ["--server", url.as_str(), "--token", admin.as_str()];
    let with = |args: &[&str]| -> Vec<String> {
        args.iter()
            .chain(conn.iter())
            .map(|s| s.to_string())
            .collect()
    };
    let call = |args: Vec<String>| async move {
        run(&args.iter().map(String::as_str).collect::<Vec<_>>()).await
    };

    let dir = std::env::temp_dir().join(format!("keelson-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let hello = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/hello/app.yaml"
    ))
    .unwrap();
    let v1 = dir.join("v1.yaml");
    std::fs::write(&v1, &hello).unwrap();
    let v2 = dir.join("v2.yaml");
    std::fs::write(&v2, hello.replace("replicas: 2", "replicas: 5")).unwrap();
    let v1 = v1.to_str().unwrap();
    let v2 = v2.to_str().unwrap();

    assert_eq!(
        call(with(&["apply", "-f", v1, "-m", "first"]))
            .await
            .unwrap(),
        "app/hello created (revision 1)\n"
    );
    assert_eq!(
        call(with(&["apply", "-f", v1])).await.unwrap(),
        "app/hello unchanged (revision 1)\n"
    );
    assert_eq!(
        call(with(&["apply", "-f", v2])).await.unwrap(),
        "app/hello configured (revision 2)\n"
    );

    let table = call(with(&["get", "apps"])).await.unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("REVISION"),
        "{table}"
    );
    assert!(
        lines[1].starts_with("hello ") && lines[1].contains("platform"),
        "{table}"
    );
    let listed: serde_json::Value =
        serde_json::from_str(&call(with(&["get", "apps", "-o", "json"])).await.unwrap()).unwrap();
    assert_eq!(listed["items"][0]["revision"], 2);
    let wide = call(with(&["get", "app", "hello", "-o", "wide"]))
        .await
        .unwrap();
    assert!(
        wide.contains("DIGEST") && wide.contains("platform@example.com"),
        "{wide}"
    );

    // `-o yaml` prints the profile so that it parses back to the same profile.
    let yaml = call(with(&[
        "get",
        "app",
        "hello",
        "--revision",
        "1",
        "-o",
        "yaml",
    ]))
    .await
    .unwrap();
    let reparsed = keelson_core::profile::parse(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    assert_eq!(reparsed, keelson_core::profile::parse(&hello).unwrap());

    let history = call(with(&["history", "hello"])).await.unwrap();
    let rows: Vec<&str> = history.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{history}");
    assert!(
        rows[0].starts_with("2 ") && rows[1].starts_with("1 ") && rows[1].ends_with("first"),
        "{history}"
    );

    let diff = call(with(&["diff", "hello", "1", "2"])).await.unwrap();
    assert!(
        diff.contains("~ spec.environments.prod.replicas: 2 -> 5"),
        "{diff}"
    );

    let diff: serde_json::Value = serde_json::from_str(
        &call(with(&["diff", "hello", "1", "2", "-o", "json"]))
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(diff["changes"][0]["op"], "changed");
    let app: serde_json::Value = serde_json::from_str(
        &call(with(&["get", "app", "hello", "-o", "json"]))
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(app["revision"]["number"], 2);

    let rolled = call(with(&["rollback-profile", "hello", "1"]))
        .await
        .unwrap();
    assert_eq!(
        rolled,
        "app/hello rolled back to the profile of revision 1 (now revision 3)\n"
    );
    let history: serde_json::Value = serde_json::from_str(
        &call(with(&["history", "hello", "-o", "json"]))
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(history["items"][0]["rolledBackTo"], 1);

    // A profile with errors: every field error, with its line, in the message.
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, hello.replace("replicas: 2", "replicas: two")).unwrap();
    let err = call(with(&["apply", "-f", bad.to_str().unwrap()]))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("HTTP 422") && err.contains("spec.environments.prod.replicas"),
        "{err}"
    );

    let audit: serde_json::Value = serde_json::from_str(
        &call(with(&["audit", "--kind", "token", "-o", "json"]))
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(audit["items"][0]["action"], "token.create");
    // Made straight on the database: the actor is the local user.
    assert!(
        audit["items"][0]["actor"]
            .as_str()
            .unwrap()
            .starts_with("local:"),
        "{audit}"
    );

    // A member token made through the server may read but not touch another team's app.
    let member = call(with(&[
        "token",
        "create",
        "--role",
        "member",
        "--subject",
        "ann",
        "--team",
        "shop",
    ]))
    .await
    .unwrap();
    let member = member.trim();
    let denied = run(&["apply", "-f", v2, "--server", &url, "--token", member])
        .await
        .unwrap_err()
        .to_string();
    assert!(denied.contains("HTTP 403"), "{denied}");
    let tokens = call(with(&["token", "list"])).await.unwrap();
    assert!(
        tokens.contains("ann") && tokens.contains("member"),
        "{tokens}"
    );

    let audit = call(with(&["audit", "--resource", "hello"])).await.unwrap();
    let actions: Vec<&str> = audit
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(3))
        .collect();
    assert_eq!(
        actions,
        ["app.rollback", "app.update", "app.create"],
        "{audit}"
    );

    assert_eq!(
        call(with(&["delete", "app", "hello"])).await.unwrap(),
        "app/hello deleted (at revision 3)\n"
    );
    let missing = call(with(&["get", "app", "hello"]))
        .await
        .unwrap_err()
        .to_string();
    assert!(missing.contains("HTTP 404"), "{missing}");

    // Registered environments and targets are listed.
    let admin_client = keelson_server::client::Client::new(&url, Some(admin.clone())).unwrap();
    admin_client
        .put_target(&keelson_store::NewTarget {
            name: "prod-a".into(),
            kind: keelson_store::TargetKind::Cluster,
            environment: Some("prod".into()),
            config: serde_json::json!({}),
            description: None,
        })
        .await
        .unwrap();
    let targets = call(with(&["get", "targets"])).await.unwrap();
    assert!(
        targets
            .lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("prod-a ") && l.contains("cluster")),
        "{targets}"
    );
    let envs: serde_json::Value = serde_json::from_str(
        &call(with(&["get", "environments", "-o", "json"]))
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(envs["items"], serde_json::json!([]));

    let anonymous = run(&["get", "apps", "--server", &url, "--token", "nope"])
        .await
        .unwrap_err()
        .to_string();
    assert!(anonymous.contains("HTTP 401"), "{anonymous}");
    server.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

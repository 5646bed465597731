//! Applies N distinct profiles over HTTP, then reads each app and lists them
//! all, printing one JSON line per database backend with requests per second
//! and latency percentiles for apply, get and list.
//!
//! ```text
//! cargo run --release -p keelson-server --example api_bench -- [--smoke] [--database URL] [--apps N] [--concurrency C]
//! ```
//! Without `--database` it runs on a scratch SQLite file and, when
//! `KEELSON_TEST_POSTGRES_URL` is set (see `scripts/pg.sh`), on a scratch
//! PostgreSQL database too.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use keelson_server::client::{Client, ListApps};
use keelson_server::sample::profile;
use keelson_server::serve::RunningServer;
use keelson_store::testing::{POSTGRES_URL_VAR, test_database};
use keelson_store::{Backend, NewToken, Role, Store, SubjectKind};
use serde_json::json;

#[derive(Parser, Debug)]
struct Args {
    /// Small CI size (100 apps).
    #[arg(long)]
    smoke: bool,
    /// Run only against this database (sqlite://PATH or postgres://…); it should be empty.
    #[arg(long)]
    database: Option<String>,
    /// How many apps to apply (default 3000, 100 with --smoke).
    #[arg(long)]
    apps: Option<usize>,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Page size for the list phase.
    #[arg(long, default_value_t = 100)]
    page: u32,
}

/// Runs `total` requests with `concurrency` workers; returns each one's latency.
async fn drive<F, Fut>(
    total: usize,
    concurrency: usize,
    request: F,
) -> anyhow::Result<(Duration, Vec<Duration>)>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let request = Arc::new(request);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let request = request.clone();
        let next = next.clone();
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return Ok::<_, anyhow::Error>(latencies);
                }
                let t = Instant::now();
                request(i).await?;
                latencies.push(t.elapsed());
            }
        }));
    }
    let mut all = Vec::with_capacity(total);
    for worker in workers {
        all.extend(worker.await??);
    }
    Ok((started.elapsed(), all))
}

fn figures(elapsed: Duration, mut latencies: Vec<Duration>) -> serde_json::Value {
    latencies.sort();
    let pct = |p: f64| {
        if latencies.is_empty() {
            0.0
        } else {
            let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
            (latencies[i].as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0
        }
    };
    json!({
        "requests": latencies.len(),
        "rps": ((latencies.len() as f64 / elapsed.as_secs_f64()) * 10.0).round() / 10.0,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": pct(1.0),
    })
}

async fn run(
    url: &str,
    backend: Backend,
    apps: usize,
    args: &Args,
) -> anyhow::Result<serde_json::Value> {
    let store = Store::open(url).await.context("open the database")?;
    let admin = NewToken {
        subject: "bench".into(),
        subject_kind: SubjectKind::Service,
        teams: vec![],
        role: Role::Admin,
        description: Some("api_bench".into()),
    };
    let secret = store.create_token(&admin, "bench").await?.secret;
    let server = RunningServer::start(store.clone(), "127.0.0.1:0").await?;
    let client = Client::new(&server.url(), Some(secret))?;
    let name = |i: usize| format!("bench-app-{i:05}");

    let c = client.clone();
    let (apply_time, apply) = drive(apps, args.concurrency, move |i| {
        let c = c.clone();
        async move {
            let team = format!("team-{}", i % 50);
            let owner = format!("owner-{}", i % 200);
            let text = profile(
                &format!("bench-app-{i:05}"),
                &team,
                &[&owner],
                &format!("registry.local/app-{i}"),
            );
            let outcome = c.apply(&text, Some("bench")).await?;
            if !outcome.created {
                bail!(
                    "app {} already existed: use an empty database",
                    outcome.app.name
                );
            }
            Ok(())
        }
    })
    .await?;

    let c = client.clone();
    let (get_time, get) = drive(apps, args.concurrency, move |i| {
        let c = c.clone();
        let name = name(i);
        async move {
            let record = c.get_app(&name, None).await?;
            anyhow::ensure!(
                record.app.name == name,
                "got {} for {name}",
                record.app.name
            );
            Ok(())
        }
    })
    .await?;

    // Each list request fetches one page; a pass walks all pages, and
    // filtered passes list one team.
    let pages: Vec<Option<String>> = {
        let mut cursors = vec![None];
        let mut filter = ListApps {
            limit: Some(args.page),
            ..Default::default()
        };
        loop {
            let page = client.list_apps(&filter).await?;
            match page.next_cursor {
                Some(cursor) => {
                    filter.cursor = Some(cursor.clone());
                    cursors.push(Some(cursor));
                }
                None => break,
            }
        }
        cursors
    };
    let list_requests = (apps / 2).max(pages.len());
    let c = client.clone();
    let page_size = args.page;
    let pages = Arc::new(pages);
    let (list_time, list) = drive(list_requests, args.concurrency, move |i| {
        let c = c.clone();
        let pages = pages.clone();
        async move {
            let filter = if i % 2 == 0 {
                ListApps {
                    limit: Some(page_size),
                    cursor: pages[(i / 2) % pages.len()].clone(),
                    ..Default::default()
                }
            } else {
                ListApps {
                    team: Some(format!("team-{}", i % 50)),
                    limit: Some(page_size),
                    ..Default::default()
                }
            };
            let page = c.list_apps(&filter).await?;
            anyhow::ensure!(!page.items.is_empty(), "empty page");
            Ok(())
        }
    })
    .await?;

    server.stop().await?;
    store.close().await;
    Ok(json!({
        "bench": "api",
        "backend": backend,
        "apps": apps,
        "concurrency": args.concurrency,
        "page_size": args.page,
        "apply": figures(apply_time, apply),
        "get": figures(get_time, get),
        "list": figures(list_time, list),
    }))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let apps = args.apps.unwrap_or(if args.smoke { 100 } else { 3000 });
    match &args.database {
        Some(url) => {
            let backend = if url.starts_with("postgres") {
                Backend::Postgres
            } else {
                Backend::Sqlite
            };
            println!("{}", run(url, backend, apps, &args).await?);
        }
        None => {
            let mut backends = vec![Backend::Sqlite];
            if std::env::var(POSTGRES_URL_VAR).is_ok() {
                backends.push(Backend::Postgres);
            } else {
                eprintln!("{POSTGRES_URL_VAR} is not set: PostgreSQL skipped (see scripts/pg.sh)");
            }
            for backend in backends {
                let db = test_database(backend).await.context("scratch database")?;
                println!("{}", run(&db.url, backend, apps, &args).await?);
            }
        }
    }
    Ok(())
}

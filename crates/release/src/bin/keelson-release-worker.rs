//! A release worker over a database and local processes: claims every
//! release it can, drives them to their end and exits. The crash-resume
//! tests run it with `KEELSON_KILL_AT` and start it again.

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use keelson_release::local::{LocalRuntimes, LocalSpec};
use keelson_release::{Worker, WorkerConfig};

#[derive(Parser)]
struct Args {
    /// The database URL.
    #[arg(long)]
    database: String,
    /// Where the local runtimes keep their instances.
    #[arg(long)]
    root: std::path::PathBuf,
    /// The lease owner's name.
    #[arg(long, default_value = "worker")]
    owner: String,
    /// The app's shell script.
    #[arg(long)]
    app: String,
    /// The preStart hook.
    #[arg(long)]
    pre_start: Option<String>,
    /// The preOnline hook.
    #[arg(long)]
    pre_online: Option<String>,
    /// The preOffline hook.
    #[arg(long)]
    pre_offline: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let store = keelson_store::Store::open(&args.database).await?;
    let runtimes = LocalRuntimes::new(
        args.root,
        LocalSpec {
            app: args.app,
            pre_start: args.pre_start,
            pre_online: args.pre_online,
            pre_offline: args.pre_offline,
            start_timeout: Duration::from_secs(10),
        },
    );
    let worker = Worker::new(
        store,
        Arc::new(runtimes),
        WorkerConfig {
            owner: args.owner,
            ..WorkerConfig::default()
        },
    );
    worker.run_until_idle().await?;
    Ok(())
}

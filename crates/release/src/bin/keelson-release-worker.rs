//! A release worker over a database and local processes (or, with
//! `--hosts-config`, host daemons): claims every release it can, drives
//! them to their end and exits. The crash-resume tests run it with
//! `KEELSON_KILL_AT` and start it again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use keelson_release::hosts::{HostsRuntime, HostsRuntimes, templated};
use keelson_release::local::{LocalRuntimes, LocalSpec};
use keelson_release::{Worker, WorkerConfig};

#[derive(Parser)]
struct Args {
    /// The database URL.
    #[arg(long)]
    database: String,
    /// Where the local runtimes keep their instances.
    #[arg(long, required_unless_present = "hosts_config")]
    root: Option<std::path::PathBuf>,
    /// Run on host daemons instead: a JSON file with `app`, `env`, `hosts`
    /// (host records), `ports` (checkurl port by instance id) and
    /// `template` (a deploy request; see `keelson_release::hosts::templated`).
    #[arg(long)]
    hosts_config: Option<std::path::PathBuf>,
    /// The lease owner's name.
    #[arg(long, default_value = "worker")]
    owner: String,
    /// The app's shell script.
    #[arg(long, required_unless_present = "hosts_config")]
    app: Option<String>,
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
    let config = WorkerConfig {
        owner: args.owner.clone(),
        ..WorkerConfig::default()
    };
    if let Some(path) = &args.hosts_config {
        let hosts: HostsConfig = serde_json::from_slice(&std::fs::read(path)?)?;
        let runtime = HostsRuntime::new(
            store.clone(),
            &hosts.app,
            &hosts.env,
            &hosts.hosts,
            templated(hosts.template, hosts.ports),
        )?;
        let runtimes = HostsRuntimes::default();
        runtimes.insert(&hosts.app, &hosts.env, Arc::new(runtime));
        Worker::new(store, Arc::new(runtimes), config)
            .run_until_idle()
            .await?;
        return Ok(());
    }
    let runtimes = LocalRuntimes::new(
        args.root.unwrap_or_default(),
        LocalSpec {
            app: args.app.unwrap_or_default(),
            pre_start: args.pre_start,
            pre_online: args.pre_online,
            pre_offline: args.pre_offline,
            start_timeout: Duration::from_secs(10),
        },
    );
    Worker::new(store, Arc::new(runtimes), config)
        .run_until_idle()
        .await?;
    Ok(())
}

#[derive(serde::Deserialize)]
struct HostsConfig {
    app: String,
    env: String,
    hosts: Vec<keelson_hosts::HostRecord>,
    ports: BTreeMap<String, u16>,
    template: keelson_agent_lifecycle::host::api::DeployRequest,
}

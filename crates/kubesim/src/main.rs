//! `kubesim --listen ADDR --nodes N --zones a,b,c --kubeconfig PATH
//! [--api-only] [--start-delay-ms N] [--ready-delay-ms N]`: serves a
//! simulated Kubernetes cluster (API and, unless `--api-only`, controllers)
//! in the foreground.

use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;

/// A Kubernetes API simulator for tests.
#[derive(Parser)]
#[command(name = "kubesim")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Zones, comma separated.
    #[arg(long, default_value = "a,b,c", value_delimiter = ',')]
    zones: Vec<String>,
    /// Where to write a kubeconfig for this server.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Serve the API only: no controllers, scheduler or kubelets.
    #[arg(long)]
    api_only: bool,
    /// Milliseconds from a pod's binding to its containers running.
    #[arg(long, default_value_t = 50)]
    start_delay_ms: u64,
    /// Milliseconds from running to the readiness probe passing.
    #[arg(long, default_value_t = 50)]
    ready_delay_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let sim = kubesim::Sim::start(kubesim::SimConfig {
        listen: args.listen,
        nodes: args.nodes,
        zones: args.zones,
        controllers: (!args.api_only).then(|| kubesim::controllers::ControllerConfig {
            start_delay: std::time::Duration::from_millis(args.start_delay_ms),
            ready_delay: std::time::Duration::from_millis(args.ready_delay_ms),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await?;
    if let Some(p) = &args.kubeconfig {
        sim.write_kubeconfig(p)?;
    }
    eprintln!("kubesim serving {}", sim.base_url());
    tokio::select! {
        r = sim.wait() => r?,
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}

//! `kubesim --listen ADDR --nodes N --zones a,b,c --kubeconfig PATH`: serves
//! a simulated Kubernetes API in the foreground.

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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let sim = kubesim::Sim::start(kubesim::SimConfig {
        listen: args.listen,
        nodes: args.nodes,
        zones: args.zones,
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

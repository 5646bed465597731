//! `keelson host add|list|instances`: clap definitions and handlers, for the
//! `keelson` binary to embed.
//!
//! Registration goes through keelson's API (`/api/v1/targets`, admin token);
//! `list` also checks every host once (recording health changes) and
//! `instances` asks the host's daemon directly with the host's token.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use clap::{Args, Subcommand, ValueEnum};

use crate::client::HostClient;
use crate::health::HostMonitor;
use crate::registry::{HealthStatus, HostRecord, ServerRegistry, add_host, find_host, list_hosts};

/// `keelson host …`.
#[derive(Debug, Clone, Subcommand)]
pub enum HostCommand {
    /// Register a host (running `keelson-agent host`) in a host group.
    Add(AddArgs),
    /// List registered hosts with their health.
    List(ListArgs),
    /// List the instances on one host.
    Instances(InstancesArgs),
}

/// Where keelson's server is and which token to use.
#[derive(Debug, Clone, Args)]
pub struct ServerConnection {
    /// Server URL, e.g. http://127.0.0.1:8080 [default: from `keelson login`].
    #[arg(long, env = "KEELSON_SERVER")]
    pub server: Option<String>,
    /// API token [default: from `keelson login`].
    #[arg(long, env = "KEELSON_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// How a read command prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Format {
    /// Aligned columns.
    #[default]
    Table,
    /// JSON.
    Json,
}

/// `keelson host add NAME --group G --address URL --token-file F`.
#[derive(Debug, Clone, Args)]
pub struct AddArgs {
    /// The host's name (unique across groups).
    pub name: String,
    /// Its host group (created when new).
    #[arg(long)]
    pub group: String,
    /// Its daemon's URL, e.g. http://10.0.0.5:7400.
    #[arg(long)]
    pub address: String,
    /// The file with its host token, as the server reads it.
    #[arg(long)]
    pub token_file: PathBuf,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connection: ServerConnection,
}

/// `keelson host list`.
#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// Print the recorded health without checking the hosts.
    #[arg(long)]
    pub no_check: bool,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    pub output: Format,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connection: ServerConnection,
}

/// `keelson host instances NAME`.
#[derive(Debug, Clone, Args)]
pub struct InstancesArgs {
    /// The host.
    pub name: String,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    pub output: Format,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connection: ServerConnection,
}

/// Runs a host command, printing to standard output, on its own runtime.
pub fn run(command: HostCommand) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?
        .block_on(execute(command, &mut std::io::stdout().lock()))
}

/// Runs a host command, printing to `out`.
pub async fn execute(command: HostCommand, out: &mut dyn Write) -> anyhow::Result<()> {
    match command {
        HostCommand::Add(args) => {
            let registry = registry(&args.connection)?;
            let token_file = std::path::absolute(&args.token_file)
                .unwrap_or(args.token_file.clone())
                .display()
                .to_string();
            let host = add_host(
                &registry,
                &HostRecord {
                    name: args.name,
                    group: args.group,
                    address: args.address,
                    token_file,
                    health: None,
                },
            )
            .await?;
            writeln!(
                out,
                "host {} registered in group {} at {}",
                host.name, host.group, host.address
            )?;
        }
        HostCommand::List(args) => {
            let registry = Arc::new(registry(&args.connection)?);
            if !args.no_check {
                HostMonitor::new(registry.clone(), Duration::from_secs(3))
                    .check_once()
                    .await?;
            }
            let hosts = list_hosts(&*registry).await?;
            match args.output {
                Format::Json => {
                    let value: Vec<serde_json::Value> = hosts
                        .iter()
                        .map(|h| {
                            let mut v = serde_json::to_value(h).unwrap_or_default();
                            v["group"] = serde_json::json!(h.group);
                            v
                        })
                        .collect();
                    writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?;
                }
                Format::Table => {
                    let rows = hosts
                        .iter()
                        .map(|h| {
                            let (health, since, error) = match &h.health {
                                Some(x) => (
                                    match x.status {
                                        HealthStatus::Up => "up",
                                        HealthStatus::Down => "down",
                                    }
                                    .to_string(),
                                    x.since.clone(),
                                    x.error.clone().unwrap_or_default(),
                                ),
                                None => ("unknown".into(), String::new(), String::new()),
                            };
                            vec![
                                h.name.clone(),
                                h.group.clone(),
                                h.address.clone(),
                                health,
                                since,
                                error,
                            ]
                        })
                        .collect();
                    print_table(
                        out,
                        &["NAME", "GROUP", "ADDRESS", "HEALTH", "SINCE", "ERROR"],
                        rows,
                    )?;
                }
            }
        }
        HostCommand::Instances(args) => {
            let registry = registry(&args.connection)?;
            let host = find_host(&registry, &args.name).await?;
            let instances = HostClient::for_host(&host)?.instances().await?;
            match args.output {
                Format::Json => writeln!(out, "{}", serde_json::to_string_pretty(&instances)?)?,
                Format::Table => {
                    let rows = instances
                        .iter()
                        .map(|i| {
                            let text = |v: serde_json::Value| {
                                v.as_str().map(str::to_string).unwrap_or_else(|| "-".into())
                            };
                            vec![
                                i.name.clone(),
                                i.app.clone(),
                                i.env.clone(),
                                text(serde_json::to_value(i.state).unwrap_or_default()),
                                i.phase.map_or("-".into(), |p| {
                                    text(serde_json::to_value(p).unwrap_or_default())
                                }),
                                if i.online { "yes" } else { "no" }.into(),
                                i.app_pid.map_or("-".into(), |p| p.to_string()),
                                i.restarts.to_string(),
                                i.address.clone(),
                            ]
                        })
                        .collect();
                    print_table(
                        out,
                        &[
                            "NAME", "APP", "ENV", "STATE", "PHASE", "ONLINE", "PID", "RESTARTS",
                            "ADDRESS",
                        ],
                        rows,
                    )?;
                }
            }
        }
    }
    Ok(())
}

fn registry(connection: &ServerConnection) -> anyhow::Result<ServerRegistry> {
    let config = if connection.server.is_none() || connection.token.is_none() {
        login_config()
    } else {
        (None, None)
    };
    let server = connection.server.clone().or(config.0).ok_or_else(|| {
        anyhow!("no server given: use --server URL, set KEELSON_SERVER, or run `keelson login`")
    })?;
    Ok(ServerRegistry::new(
        &server,
        connection.token.clone().or(config.1),
    )?)
}

/// `server:` and `token:` from the file `keelson login` writes
/// (`$KEELSON_CONFIG`, else `keelson/config.yaml` in the config directory).
fn login_config() -> (Option<String>, Option<String>) {
    let path = std::env::var_os("KEELSON_CONFIG")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("XDG_CONFIG_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
                .map(|base| base.join("keelson").join("config.yaml"))
        });
    let Some(text) = path.and_then(|p| std::fs::read_to_string(p).ok()) else {
        return (None, None);
    };
    let mut found = (None, None);
    for line in text.lines() {
        let Some((key, value)) = line.trim().split_once(':') else {
            continue;
        };
        let value = value
            .trim()
            .trim_matches(|c| c == '"' || c == '\'')
            .to_string();
        match key.trim() {
            "server" if !value.is_empty() => found.0 = Some(value),
            "token" if !value.is_empty() => found.1 = Some(value),
            _ => {}
        }
    }
    found
}

fn print_table(
    out: &mut dyn Write,
    header: &[&str],
    rows: Vec<Vec<String>>,
) -> std::io::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    writeln!(out, "{}", line(header.to_vec()))?;
    for row in &rows {
        writeln!(out, "{}", line(row.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}

//! The `keelson` command: argument definitions, the offline commands that
//! need no server (`validate`, `render`, `schema`), and dispatch to the
//! server's own commands (`serve`, `token`, `apply`, `get`, …).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use keelson_core::profile;
use keelson_kube::{RenderRequest, Track, yaml_out};

pub mod up;

/// keelson: one app profile per app drives how it is rendered, released,
/// granted database access, put into traffic, watched and scaled.
#[derive(Debug, Parser)]
#[command(name = "keelson", version)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check app profiles and report every problem with its field path and position.
    Validate {
        /// Profile files (YAML).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Output format of the report.
        #[arg(short, long, value_enum, default_value_t = ReportFormat::Text)]
        output: ReportFormat,
    },
    /// Render a profile into the Kubernetes objects of one environment and track.
    Render {
        /// The profile file.
        file: PathBuf,
        /// The environment.
        #[arg(long)]
        env: String,
        /// The version: image tag and version label.
        #[arg(long)]
        version: String,
        /// The Deployment track.
        #[arg(long, default_value = "blue")]
        track: Track,
        /// The cluster target (default: the environment's first).
        #[arg(long)]
        cluster: Option<String>,
        /// The keelson-agent image for the init container.
        #[arg(
            long,
            env = "KEELSON_AGENT_IMAGE",
            default_value = "ghcr.io/keelson/keelson-agent:0.1.0"
        )]
        agent_image: String,
        /// keelson's authorization API as pods reach it (needed when the app has databases).
        #[arg(
            long,
            env = "KEELSON_AUTHORIZATION_URL",
            default_value = "http://keelson.keelson-system.svc:8080"
        )]
        authorization_url: String,
        /// The profile revision to record.
        #[arg(long)]
        revision: Option<u64>,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = ObjectFormat::Yaml)]
        output: ObjectFormat,
    },
    /// Print the JSON Schema of the app profile, for editor completion.
    Schema,
    /// Commands that talk to a keelson server.
    #[command(flatten)]
    Client(keelson_server::cli::ClientCommand),
    /// Run keelson on this machine: the server on SQLite, three local host
    /// daemons, the CLI config; with --demo, build and release a demo app.
    Up(up::UpArgs),
    /// Run the keelson server (HTTP API) on SQLite or PostgreSQL.
    Serve(keelson_server::cli::ServeArgs),
    /// Create, list and revoke API tokens (bootstrap the first with --database).
    #[command(subcommand)]
    Token(keelson_server::cli::TokenCommand),
    /// Register and inspect hosts (VMs) running keelson-agent host.
    #[command(subcommand)]
    Host(keelson_hosts::cli::HostCommand),
}

/// How `validate` reports.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ReportFormat {
    /// `file:line:column: path: message`, one per line.
    Text,
    /// One JSON object: file → errors.
    Json,
}

/// How `render` writes objects.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ObjectFormat {
    /// A multi-document YAML stream.
    Yaml,
    /// A JSON `List`.
    Json,
}

/// Runs a command; the exit code says whether it succeeded.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Validate { files, output } => validate(&files, output),
        Command::Render {
            file,
            env,
            version,
            track,
            cluster,
            agent_image,
            authorization_url,
            revision,
            output,
        } => {
            let text = read(&file)?;
            let profile = match profile::parse(&text) {
                Ok(p) => p,
                Err(errors) => {
                    print_errors(&file, &errors);
                    return Ok(ExitCode::FAILURE);
                }
            };
            let objects = keelson_kube::render(
                &profile,
                &RenderRequest {
                    env: &env,
                    version: &version,
                    track,
                    cluster: cluster.as_deref(),
                    agent_image: &agent_image,
                    authorization_url: Some(&authorization_url),
                    revision,
                },
            )?;
            let text = match output {
                ObjectFormat::Yaml => yaml_out::documents(&objects),
                ObjectFormat::Json => {
                    let list =
                        serde_json::json!({"apiVersion": "v1", "kind": "List", "items": objects});
                    serde_json::to_string_pretty(&list)? + "\n"
                }
            };
            std::io::stdout().write_all(text.as_bytes())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Client(c) => keelson_server::cli::run_client(c).map(|()| ExitCode::SUCCESS),
        Command::Up(a) => up::run(a).map(|()| ExitCode::SUCCESS),
        Command::Serve(a) => keelson_server::cli::run_serve(a).map(|()| ExitCode::SUCCESS),
        Command::Token(t) => keelson_server::cli::run_token(t).map(|()| ExitCode::SUCCESS),
        Command::Host(h) => keelson_hosts::cli::run(h).map(|()| ExitCode::SUCCESS),
        Command::Schema => {
            println!("{}", serde_json::to_string_pretty(&profile::json_schema())?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn read(file: &PathBuf) -> anyhow::Result<String> {
    std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))
}

fn print_errors(file: &std::path::Path, errors: &profile::ValidationErrors) {
    for e in &errors.errors {
        let path = if e.path.is_empty() {
            "(document)"
        } else {
            &e.path
        };
        eprintln!(
            "{}:{}:{}: {path}: {}",
            file.display(),
            e.line,
            e.column,
            e.message
        );
    }
}

fn validate(files: &[PathBuf], output: ReportFormat) -> anyhow::Result<ExitCode> {
    let mut failed = false;
    let mut report = serde_json::Map::new();
    for file in files {
        // An unreadable file is one more failure; the others are still checked.
        let errors = match read(file).map(|text| profile::parse(&text)) {
            Ok(Ok(_)) => Vec::new(),
            Ok(Err(e)) => e.errors,
            Err(e) => vec![profile::FieldError {
                path: String::new(),
                message: format!("{e:#}"),
                line: 0,
                column: 0,
            }],
        };
        failed |= !errors.is_empty();
        match output {
            ReportFormat::Text if errors.is_empty() => println!("{}: valid", file.display()),
            ReportFormat::Text => print_errors(file, &profile::ValidationErrors { errors }),
            ReportFormat::Json => {
                report.insert(file.display().to_string(), serde_json::to_value(&errors)?);
            }
        }
    }
    if let ReportFormat::Json = output {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

//! The `keelson` commands that talk to a server (`apply`, `get`, `history`,
//! `diff`, `rollback-profile`, `delete`, `audit`, `login`, `release`), run one
//! (`serve`), or bootstrap its tokens (`token`). The `keelson` binary embeds
//! these clap definitions and calls the `run_*` functions.
//!
//! The server address and token come from `--server`/`--token`, else
//! `KEELSON_SERVER`/`KEELSON_TOKEN`, else the config file
//! (`$KEELSON_CONFIG`, or `keelson/config.yaml` in the user's config
//! directory) that `keelson login` writes.

use std::io::{Read as _, Write};
use std::path::PathBuf;

use anyhow::{Context, anyhow};
use clap::{Args, Subcommand, ValueEnum};
use keelson_store::{NewToken, Role, Store, SubjectKind, TokenRecord};
use tokio_util::sync::CancellationToken;

use crate::client::{Client, ClientError, ListApps, ListAudit};

mod release;
use crate::diff::ChangeKind;
use crate::output::{table, to_yaml};
pub use release::{
    ReleaseAbortArgs, ReleaseArgs, ReleaseCommand, ReleaseStartArgs, ReleaseStatusArgs,
    ReleaseTarget, print_status,
};

/// How a read command prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns.
    #[default]
    Table,
    /// More columns.
    Wide,
    /// JSON, as the API returns it.
    Json,
    /// YAML (for `get app`: the profile, ready to apply again).
    Yaml,
}

/// Where the server is and which token to use.
#[derive(Debug, Clone, Args)]
pub struct Connection {
    /// Server URL, e.g. http://127.0.0.1:8080.
    #[arg(long, env = "KEELSON_SERVER")]
    pub server: Option<String>,
    /// API token (kst_…).
    #[arg(long, env = "KEELSON_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// `keelson apply`.
#[derive(Debug, Clone, Args)]
pub struct ApplyArgs {
    /// Profile file (YAML or JSON); `-` reads standard input.
    #[arg(short = 'f', long = "filename")]
    pub file: String,
    /// Why: recorded with the revision.
    #[arg(short = 'm', long)]
    pub message: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    pub output: OutputFormat,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connection: Connection,
}

/// `keelson get …`.
#[derive(Debug, Clone, Subcommand)]
pub enum GetCommand {
    /// List apps.
    Apps(GetAppsArgs),
    /// Show one app (its current revision, or --revision N).
    App(GetAppArgs),
    /// List registered environments.
    Environments(GetListArgs),
    /// List registered targets (clusters and host groups).
    Targets(GetListArgs),
}

/// `keelson get environments|targets`.
#[derive(Debug, Clone, Args)]
pub struct GetListArgs {
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    pub output: OutputFormat,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connection: Connection,
}

/// `keelson get apps`.
#[derive(Debug, Clone, Args)]
pub struct GetAppsArgs {
    /// Only this team's apps.
    #[arg(long)]
    pub team: Option<String>,
    /// Only apps this subject owns.
    #[arg(long)]
    pub owner: Option<String>,
    /// Only apps with these labels: k=v,k2=v2.
    #[arg(short = 'l', long = "selector")]
    pub selector: Option<String>,
    /// Stop after this many apps (default: all).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    pub output: OutputFormat,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connection: Connection,
}

/// `keelson get app NAME`.
#[derive(Debug, Clone, Args)]
pub struct GetAppArgs {
    /// The app's name.
    pub name: String,
    /// A revision number instead of the current one.
    #[arg(long)]
    pub revision: Option<i64>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    pub output: OutputFormat,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connection: Connection,
}

/// `keelson history NAME`.
#[derive(Debug, Clone, Args)]
pub struct HistoryArgs {
    /// The app's name.
    pub name: String,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    pub output: OutputFormat,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connection: Connection,
}

/// `keelson diff NAME R1 R2`.
#[derive(Debug, Clone, Args)]
pub struct DiffArgs {
    /// The app's name.
    pub name: String,
    /// The older revision.
    pub from: i64,
    /// The newer revision.
    pub to: i64,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    pub output: OutputFormat,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connection: Connection,
}

/// `keelson rollback-profile NAME R`.
#[derive(Debug, Clone, Args)]
pub struct RollbackArgs {
    /// The app's name.
    pub name: String,
    /// The revision whose profile becomes current again.
    pub revision: i64,
    /// Why (default: "roll back to revision R").
    #[arg(short = 'm', long)]
    pub message: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    pub output: OutputFormat,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connection: Connection,
}

/// `keelson delete …`.
#[derive(Debug, Clone, Subcommand)]
pub enum DeleteCommand {
    /// Delete an app (soft: history and audit stay; applying it again restores it).
    App {
        /// The app's name.
        name: String,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: OutputFormat,
        #[command(flatten)]
        #[allow(missing_docs)]
        connection: Connection,
    },
}

/// `keelson audit`.
#[derive(Debug, Clone, Args)]
pub struct AuditArgs {
    /// Only events about this resource (e.g. an app's name).
    #[arg(long)]
    pub resource: Option<String>,
    /// Only this kind of resource: app, environment, target, token.
    #[arg(long)]
    pub kind: Option<String>,
    /// Only events by this subject.
    #[arg(long)]
    pub actor: Option<String>,
    /// How many events, newest first.
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    pub output: OutputFormat,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connection: Connection,
}

/// `keelson login`.
#[derive(Debug, Clone, Args)]
pub struct LoginArgs {
    /// Server URL to remember.
    #[arg(long, env = "KEELSON_SERVER")]
    pub server: String,
    /// Token to remember.
    #[arg(long, env = "KEELSON_TOKEN", hide_env_values = true)]
    pub token: String,
}

/// The commands that talk to a keelson server.
#[derive(Debug, Clone, Subcommand)]
pub enum ClientCommand {
    /// Create or update an app from its profile (an identical profile makes no revision).
    Apply(ApplyArgs),
    /// Show apps, or one app.
    #[command(subcommand)]
    Get(GetCommand),
    /// Show an app's profile revisions, newest first.
    History(HistoryArgs),
    /// Show what changed between two revisions of an app's profile.
    Diff(DiffArgs),
    /// Make revision R's profile current again, as a new revision.
    RollbackProfile(RollbackArgs),
    /// Delete things.
    #[command(subcommand)]
    Delete(DeleteCommand),
    /// Show the audit log, newest first.
    Audit(AuditArgs),
    /// Check a server and token, then remember them in the config file.
    Login(LoginArgs),
    /// Release an app (`keelson release NAME --env E --version V`), or watch and steer a release.
    Release(Box<ReleaseArgs>),
}

/// `keelson serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "KEELSON_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Database URL: sqlite://PATH (created if missing) or postgres://….
    #[arg(
        long,
        env = "KEELSON_DATABASE_URL",
        default_value = "sqlite://keelson.db"
    )]
    pub database: String,
    /// Log format on standard error.
    #[arg(long, value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,
    /// keelson's authorization API as instances reach it, for apps with
    /// databases [default: http://LISTEN].
    #[arg(long, env = "KEELSON_AUTHORIZATION_URL")]
    pub authorization_url: Option<String>,
    /// Serve the API only: run no release worker (another server does).
    #[arg(long)]
    pub no_release_worker: bool,
}

/// How the server logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable lines.
    Text,
}

/// `keelson token …`.
#[derive(Debug, Clone, Subcommand)]
pub enum TokenCommand {
    /// Create a token and print its secret (shown only this once).
    Create(TokenCreateArgs),
    /// List tokens (without secrets).
    List(TokenTarget),
    /// Revoke a token at once.
    Revoke {
        /// The token's id (tok_…).
        id: String,
        #[command(flatten)]
        #[allow(missing_docs)]
        target: TokenTarget,
    },
}

/// Where token commands act: straight on a database (to bootstrap the first
/// admin token of a new server), or through a server as an admin.
#[derive(Debug, Clone, Args)]
pub struct TokenTarget {
    /// Database URL; with it the command works without a server.
    #[arg(long, env = "KEELSON_DATABASE_URL")]
    pub database: Option<String>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connection: Connection,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

/// `keelson token create`.
#[derive(Debug, Clone, Args)]
pub struct TokenCreateArgs {
    /// admin, member or viewer.
    #[arg(long, value_parser = parse_role)]
    pub role: Role,
    /// The person or service using the token (default: admin).
    #[arg(long, default_value = "admin")]
    pub subject: String,
    /// A team whose apps a member may change (repeatable).
    #[arg(long = "team")]
    pub teams: Vec<String>,
    /// The subject is a service, not a person.
    #[arg(long)]
    pub service: bool,
    /// What the token is for.
    #[arg(long)]
    pub description: Option<String>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub target: TokenTarget,
}

fn parse_role(text: &str) -> Result<Role, String> {
    text.parse()
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Runs `keelson serve` until SIGTERM or Ctrl-C.
///
/// Builds its own runtime: call it from a plain `fn main`. From async code,
/// use [`serve_until_signal`].
pub fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
    runtime()?.block_on(serve_until_signal(args))
}

/// `keelson serve` for callers that already run a tokio runtime.
pub async fn serve_until_signal(args: ServeArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    {
        let store = keelson_store::Store::open(&args.database)
            .await
            .with_context(|| {
                format!(
                    "cannot open the database {}",
                    keelson_store::redact(&args.database)
                )
            })?;
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        tracing::info!(
            listen = %listener.local_addr()?,
            database = %keelson_store::redact(&args.database),
            backend = ?store.backend(),
            "keelson serving"
        );
        let local = listener.local_addr()?;
        let authorization_url = args
            .authorization_url
            .clone()
            .unwrap_or_else(|| format!("http://{local}"));
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone();
        tokio::spawn(async move {
            crate::serve::shutdown_signal().await;
            signal.cancel();
        });
        let worker = (!args.no_release_worker).then(|| {
            spawn_release_worker(
                store.clone(),
                Some(authorization_url),
                &args.listen,
                shutdown.clone(),
            )
        });
        crate::serve::serve(store.clone(), listener, shutdown.clone().cancelled_owned()).await?;
        shutdown.cancel();
        if let Some(worker) = worker {
            worker.await??;
        }
        store.close().await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Starts the release worker of a server: it claims releases (through
/// leases, so several servers can share a database) and drives them on the
/// host groups their apps' profiles name, until `shutdown`. Its owner name is
/// stable for a server on one machine and address, so a restarted server
/// takes its releases back at once.
pub fn spawn_release_worker(
    store: keelson_store::Store,
    authorization_url: Option<String>,
    listen: &str,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<Result<(), keelson_release::Error>> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    let config = keelson_release::WorkerConfig {
        owner: format!("server@{host}/{listen}"),
        // The store pushes new releases and users' requests; polling only
        // covers expired leases and missed notifications.
        poll: std::time::Duration::from_secs(1),
        ..keelson_release::WorkerConfig::default()
    };
    let runtimes = keelson_release::profile::ProfileRuntimes::new(store.clone(), authorization_url);
    let worker = keelson_release::Worker::new(store, std::sync::Arc::new(runtimes), config);
    tokio::spawn(async move { worker.run(shutdown).await })
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().with_current_span(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Runs a `keelson token` command. Builds its own runtime: call it from a
/// plain `fn main` (from async code, use [`execute_token`]).
pub fn run_token(command: TokenCommand) -> anyhow::Result<()> {
    runtime()?.block_on(execute_token(command, &mut std::io::stdout().lock()))
}

enum TokenBackend {
    Store(Store),
    Server(Client),
}

impl TokenTarget {
    async fn open(&self) -> anyhow::Result<TokenBackend> {
        match &self.database {
            Some(url) => Ok(TokenBackend::Store(
                Store::open(url).await.with_context(|| format!("cannot open {}", keelson_store::redact(url)))?,
            )),
            None => Ok(TokenBackend::Server(self.connection.client().context(
                "give --database URL to work on a database directly, or a server and an admin token",
            )?)),
        }
    }
}

/// Runs a `keelson token` command, printing to `out`.
pub async fn execute_token(command: TokenCommand, out: &mut dyn Write) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create(args) => {
            let new = NewToken {
                subject: args.subject.clone(),
                subject_kind: if args.service {
                    SubjectKind::Service
                } else {
                    SubjectKind::Person
                },
                teams: args.teams.clone(),
                role: args.role,
                description: args.description.clone(),
            };
            let issued = match args.target.open().await? {
                TokenBackend::Store(store) => {
                    let actor = format!("local:{}", local_user());
                    let issued = store.create_token(&new, &actor).await?;
                    store.close().await;
                    issued
                }
                TokenBackend::Server(client) => client.create_token(&new).await.map_err(explain)?,
            };
            match args.target.output {
                OutputFormat::Json => writeln!(out, "{}", serde_json::to_string_pretty(&issued)?)?,
                OutputFormat::Yaml => write!(out, "{}", to_yaml(&serde_json::to_value(&issued)?))?,
                _ => {
                    eprintln!(
                        "created {} for {} ({}); the secret below is shown only once",
                        issued.record.id,
                        issued.record.token.subject,
                        issued.record.token.role.as_str()
                    );
                    writeln!(out, "{}", issued.secret)?;
                }
            }
        }
        TokenCommand::List(target) => {
            let tokens = match target.open().await? {
                TokenBackend::Store(store) => store.list_tokens().await?,
                TokenBackend::Server(client) => client.tokens().await.map_err(explain)?,
            };
            print_tokens(out, &tokens, target.output)?;
        }
        TokenCommand::Revoke { id, target } => {
            let record = match target.open().await? {
                TokenBackend::Store(store) => {
                    store
                        .revoke_token(&id, &format!("local:{}", local_user()))
                        .await?
                }
                TokenBackend::Server(client) => client.revoke_token(&id).await.map_err(explain)?,
            };
            match target.output {
                OutputFormat::Json => writeln!(out, "{}", serde_json::to_string_pretty(&record)?)?,
                _ => writeln!(out, "token {} revoked", record.id)?,
            }
        }
    }
    Ok(())
}

fn local_user() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into())
}

fn print_tokens(
    out: &mut dyn Write,
    tokens: &[TokenRecord],
    output: OutputFormat,
) -> anyhow::Result<()> {
    match output {
        OutputFormat::Json => writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "items": tokens }))?
        )?,
        OutputFormat::Yaml => write!(out, "{}", to_yaml(&serde_json::json!({ "items": tokens })))?,
        _ => {
            let rows: Vec<Vec<String>> = tokens
                .iter()
                .map(|t| {
                    vec![
                        t.id.clone(),
                        t.token.subject.clone(),
                        t.token.role.as_str().to_string(),
                        t.token.teams.join(","),
                        t.created_at.to_string(),
                        t.revoked_at
                            .map_or_else(|| "-".to_string(), |r| r.to_string()),
                    ]
                })
                .collect();
            write!(
                out,
                "{}",
                table(
                    &["ID", "SUBJECT", "ROLE", "TEAMS", "CREATED", "REVOKED"],
                    &rows
                )
            )?;
        }
    }
    Ok(())
}

/// The user's config file: `$KEELSON_CONFIG`, else `keelson/config.yaml`
/// under `$XDG_CONFIG_HOME` or `~/.config`.
pub fn config_path() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("KEELSON_CONFIG") {
        return Some(PathBuf::from(path));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config")))?;
    Some(base.join("keelson").join("config.yaml"))
}

/// What the config file holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientConfig {
    /// `server: URL`.
    pub server: Option<String>,
    /// `token: TOKEN`.
    pub token: Option<String>,
}

impl ClientConfig {
    /// Reads `key: value` lines (a YAML mapping of plain or quoted strings).
    pub fn parse(text: &str) -> ClientConfig {
        let mut config = ClientConfig::default();
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let value = value
                .trim()
                .trim_matches(|c| c == '"' || c == '\'')
                .to_string();
            if value.is_empty() {
                continue;
            }
            match key.trim() {
                "server" => config.server = Some(value),
                "token" => config.token = Some(value),
                _ => {}
            }
        }
        config
    }

    fn load() -> anyhow::Result<ClientConfig> {
        let Some(path) = config_path() else {
            return Ok(ClientConfig::default());
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(ClientConfig::parse(&text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ClientConfig::default()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }
}

impl Connection {
    /// A client from the flags, the environment, or the config file, in that order.
    pub fn client(&self) -> anyhow::Result<Client> {
        let config = if self.server.is_none() || self.token.is_none() {
            ClientConfig::load()?
        } else {
            ClientConfig::default()
        };
        let server = self.server.clone().or(config.server).ok_or_else(|| {
            anyhow!(
                "no server given: use --server URL, set KEELSON_SERVER, or run `keelson login` (config file: {})",
                config_path().map_or_else(|| "none".into(), |p| p.display().to_string())
            )
        })?;
        Ok(Client::new(&server, self.token.clone().or(config.token))?)
    }
}

/// A client error as a message for people, with every field error of a
/// rejected profile on its own line.
fn explain(error: ClientError) -> anyhow::Error {
    match &error {
        ClientError::Api { status, body } => {
            let mut message = format!(
                "{} (HTTP {status}, {})",
                body.error.message, body.error.code
            );
            for d in &body.error.details {
                let place = if d.line > 0 {
                    format!("{}:{}: ", d.line, d.column)
                } else {
                    String::new()
                };
                let path = if d.path.is_empty() {
                    String::new()
                } else {
                    format!("{}: ", d.path)
                };
                message.push_str(&format!("\n  {place}{path}{}", d.message));
            }
            anyhow!(message)
        }
        _ => anyhow!(error),
    }
}

fn print_json(out: &mut dyn Write, value: &impl serde::Serialize) -> anyhow::Result<()> {
    writeln!(out, "{}", serde_json::to_string_pretty(value)?)?;
    Ok(())
}

fn print_yaml(out: &mut dyn Write, value: &impl serde::Serialize) -> anyhow::Result<()> {
    write!(out, "{}", to_yaml(&serde_json::to_value(value)?))?;
    Ok(())
}

fn short_digest(digest: &str) -> String {
    digest
        .strip_prefix("sha256:")
        .unwrap_or(digest)
        .chars()
        .take(12)
        .collect()
}

/// Runs a client command, printing to standard output. Builds its own
/// runtime: call it from a plain `fn main` (from async code, use [`execute`]).
pub fn run_client(command: ClientCommand) -> anyhow::Result<()> {
    runtime()?.block_on(execute(command, &mut std::io::stdout().lock()))
}

/// Runs a client command, printing to `out`.
pub async fn execute(command: ClientCommand, out: &mut dyn Write) -> anyhow::Result<()> {
    match command {
        ClientCommand::Apply(args) => {
            let text = if args.file == "-" {
                let mut text = String::new();
                std::io::stdin()
                    .read_to_string(&mut text)
                    .context("cannot read standard input")?;
                text
            } else {
                std::fs::read_to_string(&args.file)
                    .with_context(|| format!("cannot read {}", args.file))?
            };
            let client = args.connection.client()?;
            let outcome = client
                .apply(&text, args.message.as_deref())
                .await
                .map_err(|e| {
                    let e = explain(e);
                    anyhow!("{}: {e}", args.file)
                })?;
            match args.output {
                OutputFormat::Json => print_json(out, &outcome)?,
                OutputFormat::Yaml => print_yaml(out, &outcome)?,
                _ => {
                    let verb = match (outcome.created, outcome.changed) {
                        (true, _) => "created",
                        (false, true) => "configured",
                        (false, false) => "unchanged",
                    };
                    writeln!(
                        out,
                        "app/{} {verb} (revision {})",
                        outcome.app.name, outcome.app.revision
                    )?;
                }
            }
        }
        ClientCommand::Get(GetCommand::Apps(args)) => {
            let client = args.connection.client()?;
            let filter = ListApps {
                team: args.team.clone(),
                owner: args.owner.clone(),
                label: args.selector.clone(),
                limit: args.limit.map(|n| n.clamp(1, 1000) as u32),
                cursor: None,
            };
            let mut apps = client.list_all_apps(&filter).await.map_err(explain)?;
            if let Some(limit) = args.limit {
                apps.truncate(limit);
            }
            match args.output {
                OutputFormat::Json => print_json(out, &serde_json::json!({ "items": apps }))?,
                OutputFormat::Yaml => print_yaml(out, &serde_json::json!({ "items": apps }))?,
                format => {
                    let wide = format == OutputFormat::Wide;
                    let rows: Vec<Vec<String>> = apps
                        .iter()
                        .map(|a| {
                            let mut row = vec![
                                a.name.clone(),
                                a.team.clone(),
                                a.owners.join(","),
                                a.revision.to_string(),
                                a.updated_at.to_string(),
                            ];
                            if wide {
                                row.push(a.updated_by.clone());
                                row.push(
                                    a.labels
                                        .iter()
                                        .map(|(k, v)| format!("{k}={v}"))
                                        .collect::<Vec<_>>()
                                        .join(","),
                                );
                                row.push(short_digest(&a.digest));
                            }
                            row
                        })
                        .collect();
                    let mut header = vec!["NAME", "TEAM", "OWNERS", "REVISION", "UPDATED"];
                    if wide {
                        header.extend(["UPDATED-BY", "LABELS", "DIGEST"]);
                    }
                    write!(out, "{}", table(&header, &rows))?;
                }
            }
        }
        ClientCommand::Get(GetCommand::App(args)) => {
            let client = args.connection.client()?;
            let record = client
                .get_app(&args.name, args.revision)
                .await
                .map_err(explain)?;
            match args.output {
                OutputFormat::Json => print_json(out, &record)?,
                OutputFormat::Yaml => write!(out, "{}", to_yaml(&record.revision.profile))?,
                format => {
                    let a = &record.app;
                    let r = &record.revision.summary;
                    let mut header =
                        vec!["NAME", "TEAM", "REVISION", "CURRENT", "AUTHOR", "CREATED"];
                    let mut row = vec![
                        a.name.clone(),
                        a.team.clone(),
                        r.number.to_string(),
                        a.revision.to_string(),
                        r.author.clone(),
                        r.created_at.to_string(),
                    ];
                    if format == OutputFormat::Wide {
                        header.extend(["OWNERS", "LABELS", "DIGEST", "DESCRIPTION"]);
                        row.push(a.owners.join(","));
                        row.push(
                            a.labels
                                .iter()
                                .map(|(k, v)| format!("{k}={v}"))
                                .collect::<Vec<_>>()
                                .join(","),
                        );
                        row.push(short_digest(&r.digest));
                        row.push(a.description.clone().unwrap_or_default());
                    }
                    write!(out, "{}", table(&header, &[row]))?;
                }
            }
        }
        ClientCommand::Get(GetCommand::Environments(args)) => {
            let items = args
                .connection
                .client()?
                .environments()
                .await
                .map_err(explain)?;
            match args.output {
                OutputFormat::Json => print_json(out, &serde_json::json!({ "items": items }))?,
                OutputFormat::Yaml => print_yaml(out, &serde_json::json!({ "items": items }))?,
                _ => {
                    let rows: Vec<Vec<String>> = items
                        .iter()
                        .map(|e| {
                            vec![
                                e.spec.name.clone(),
                                e.spec.tier.clone(),
                                e.updated_at.to_string(),
                                e.spec.description.clone().unwrap_or_default(),
                            ]
                        })
                        .collect();
                    write!(
                        out,
                        "{}",
                        table(&["NAME", "TIER", "UPDATED", "DESCRIPTION"], &rows)
                    )?;
                }
            }
        }
        ClientCommand::Get(GetCommand::Targets(args)) => {
            let items = args.connection.client()?.targets().await.map_err(explain)?;
            match args.output {
                OutputFormat::Json => print_json(out, &serde_json::json!({ "items": items }))?,
                OutputFormat::Yaml => print_yaml(out, &serde_json::json!({ "items": items }))?,
                format => {
                    let wide = format == OutputFormat::Wide;
                    let rows: Vec<Vec<String>> = items
                        .iter()
                        .map(|t| {
                            let mut row = vec![
                                t.spec.name.clone(),
                                serde_json::to_value(t.spec.kind)
                                    .ok()
                                    .and_then(|v| v.as_str().map(str::to_string))
                                    .unwrap_or_default(),
                                t.spec.environment.clone().unwrap_or_else(|| "-".into()),
                                t.updated_at.to_string(),
                            ];
                            if wide {
                                row.push(t.spec.config.to_string());
                            }
                            row
                        })
                        .collect();
                    let mut header = vec!["NAME", "KIND", "ENVIRONMENT", "UPDATED"];
                    if wide {
                        header.push("CONFIG");
                    }
                    write!(out, "{}", table(&header, &rows))?;
                }
            }
        }
        ClientCommand::History(args) => {
            let client = args.connection.client()?;
            let history = client.revisions(&args.name).await.map_err(explain)?;
            match args.output {
                OutputFormat::Json => print_json(out, &history)?,
                OutputFormat::Yaml => print_yaml(out, &history)?,
                _ => {
                    let rows: Vec<Vec<String>> = history
                        .items
                        .iter()
                        .map(|r| {
                            let message = match (r.rolled_back_to, &r.message) {
                                (_, Some(m)) => m.clone(),
                                (Some(n), None) => format!("roll back to revision {n}"),
                                (None, None) => String::new(),
                            };
                            vec![
                                r.number.to_string(),
                                r.created_at.to_string(),
                                r.author.clone(),
                                short_digest(&r.digest),
                                message,
                            ]
                        })
                        .collect();
                    write!(
                        out,
                        "{}",
                        table(
                            &["REVISION", "CREATED", "AUTHOR", "DIGEST", "MESSAGE"],
                            &rows
                        )
                    )?;
                }
            }
        }
        ClientCommand::Diff(args) => {
            let client = args.connection.client()?;
            let diff = client
                .diff(&args.name, args.from, args.to)
                .await
                .map_err(explain)?;
            match args.output {
                OutputFormat::Json => print_json(out, &diff)?,
                OutputFormat::Yaml => print_yaml(out, &diff)?,
                _ => {
                    writeln!(
                        out,
                        "--- {} revision {} ({})",
                        diff.app,
                        diff.from,
                        short_digest(&diff.from_digest)
                    )?;
                    writeln!(
                        out,
                        "+++ {} revision {} ({})",
                        diff.app,
                        diff.to,
                        short_digest(&diff.to_digest)
                    )?;
                    if diff.changes.is_empty() {
                        writeln!(out, "no differences")?;
                    }
                    let show = |v: &Option<serde_json::Value>| {
                        v.as_ref().map_or_else(String::new, |v| v.to_string())
                    };
                    for change in &diff.changes {
                        match change.op {
                            ChangeKind::Added => {
                                writeln!(out, "+ {}: {}", change.path, show(&change.after))?
                            }
                            ChangeKind::Removed => {
                                writeln!(out, "- {}: {}", change.path, show(&change.before))?
                            }
                            ChangeKind::Changed => writeln!(
                                out,
                                "~ {}: {} -> {}",
                                change.path,
                                show(&change.before),
                                show(&change.after)
                            )?,
                        }
                    }
                }
            }
        }
        ClientCommand::RollbackProfile(args) => {
            let client = args.connection.client()?;
            let outcome = client
                .rollback(&args.name, args.revision, args.message.clone())
                .await
                .map_err(explain)?;
            match args.output {
                OutputFormat::Json => print_json(out, &outcome)?,
                OutputFormat::Yaml => print_yaml(out, &outcome)?,
                _ if outcome.changed => writeln!(
                    out,
                    "app/{} rolled back to the profile of revision {} (now revision {})",
                    outcome.app.name, args.revision, outcome.app.revision
                )?,
                _ => writeln!(
                    out,
                    "app/{} unchanged: revision {} equals the current profile (revision {})",
                    outcome.app.name, args.revision, outcome.app.revision
                )?,
            }
        }
        ClientCommand::Delete(DeleteCommand::App {
            name,
            output,
            connection,
        }) => {
            let client = connection.client()?;
            let head = client.delete_app(&name).await.map_err(explain)?;
            match output {
                OutputFormat::Json => print_json(out, &head)?,
                _ => writeln!(
                    out,
                    "app/{} deleted (at revision {})",
                    head.name, head.current_revision
                )?,
            }
        }
        ClientCommand::Audit(args) => {
            let client = args.connection.client()?;
            let filter = ListAudit {
                kind: args.kind.clone(),
                resource: args.resource.clone(),
                actor: args.actor.clone(),
                limit: Some(args.limit.clamp(1, 1000)),
                cursor: None,
            };
            let page = client.audit(&filter).await.map_err(explain)?;
            match args.output {
                OutputFormat::Json => print_json(out, &page)?,
                OutputFormat::Yaml => print_yaml(out, &page)?,
                _ => {
                    let rows: Vec<Vec<String>> = page
                        .items
                        .iter()
                        .map(|e| {
                            vec![
                                e.id.to_string(),
                                e.at.to_string(),
                                e.actor.clone(),
                                e.action.clone(),
                                format!("{}/{}", e.resource_kind, e.resource),
                                e.revision.map_or_else(|| "-".into(), |r| r.to_string()),
                            ]
                        })
                        .collect();
                    write!(
                        out,
                        "{}",
                        table(
                            &["ID", "TIME", "ACTOR", "ACTION", "RESOURCE", "REVISION"],
                            &rows
                        )
                    )?;
                }
            }
        }
        ClientCommand::Release(args) => release::execute(*args, out).await?,
        ClientCommand::Login(args) => {
            let client = Client::new(&args.server, Some(args.token.clone()))?;
            let me = client.whoami().await.map_err(explain)?;
            let path = config_path()
                .ok_or_else(|| anyhow!("no config directory: set KEELSON_CONFIG or HOME"))?;
            write_config(&path, &args.server, &args.token)?;
            writeln!(
                out,
                "logged in to {} as {} ({}); saved to {}",
                args.server,
                me.subject,
                me.role.as_str(),
                path.display()
            )?;
        }
    }
    Ok(())
}

/// Writes the CLI config file (server and token), readable only by its owner.
pub fn write_config(path: &std::path::Path, server: &str, token: &str) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let text = format!(
        "# keelson client configuration (written by `keelson login`)\nserver: {}\ntoken: {}\n",
        serde_json::Value::String(server.into()),
        serde_json::Value::String(token.into())
    );
    write_private(path, &text)
}

/// Writes `text` to `path` (replacing it), readable only by its owner.
pub fn write_private(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_server_and_token_plain_or_quoted() {
        let config = ClientConfig::parse(
            "# comment\nserver: \"http://127.0.0.1:8080\"\ntoken: kst_abc\nother: x\n",
        );
        assert_eq!(
            config,
            ClientConfig {
                server: Some("http://127.0.0.1:8080".into()),
                token: Some("kst_abc".into())
            }
        );
        assert_eq!(ClientConfig::parse("server:\n"), ClientConfig::default());
    }
}

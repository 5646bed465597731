//! keelson-agent: one small static binary for every pod (see
//! `keelson-agent-lifecycle` for what each role does).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use keelson_agent_lifecycle::layout::{DEFAULT_ROOT, Instance, Layout};
use keelson_agent_lifecycle::output::Output;
use keelson_agent_lifecycle::sidecar::{self, SidecarConfig};
use keelson_agent_lifecycle::{hooks, host, roles, stop_flag};

#[derive(Parser)]
#[command(
    name = "keelson-agent",
    version,
    about = "The keelson instance lifecycle: init, entrypoint, sidecar, offline, probe"
)]
struct Cli {
    /// The shared volume.
    #[arg(long, env = "KEELSON_ROOT", default_value = DEFAULT_ROOT, global = true)]
    root: PathBuf,
    /// The lifecycle document [default: ROOT/config/lifecycle.json].
    #[arg(long, env = "KEELSON_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// The pod's labels (downwardAPI) [default: ROOT/podinfo/labels].
    #[arg(long, env = "KEELSON_LABELS", global = true)]
    labels: Option<PathBuf>,
    /// Where hooks run from [default: ROOT/hooks, where init copies them];
    /// point it at the app image's hooks to use them in place.
    #[arg(long, env = "KEELSON_HOOKS_DIR", global = true)]
    hooks_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Role,
}

#[derive(Subcommand)]
enum Role {
    /// Copy the agent and hooks into the shared volume, then obtain grants.
    Init {
        /// Directory with the app's hook scripts, copied to ROOT/hooks.
        #[arg(long, env = "KEELSON_HOOKS_FROM")]
        hooks_from: Option<PathBuf>,
    },
    /// Remove a stale healthcheck.html, run preStart, then exec CMD.
    Entrypoint {
        /// The app's command.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Bring the instance online, keep its lease, take it offline on stop.
    Sidecar {
        /// Address for /ready and /state.
        #[arg(long, env = "KEELSON_LISTEN", default_value = "0.0.0.0:8901")]
        listen: String,
        /// Host the checkurl is polled on.
        #[arg(long, env = "KEELSON_CHECKURL_HOST", default_value = "127.0.0.1")]
        checkurl_host: String,
    },
    /// Ask the sidecar to take the instance offline (the app's preStop).
    Offline {
        /// Return only when preOffline is done or timed out.
        #[arg(long)]
        wait: bool,
        /// Seconds to wait [default: drain + preOffline timeout + 10].
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// Internal: tag every stdin line with STEP (a hook's output forwarder).
    #[command(hide = true)]
    Tag {
        /// The step name.
        step: String,
    },
    /// Run the host daemon: deploy, start and stop instances on this machine
    /// through an authenticated HTTP API.
    Host(HostArgs),
    /// Evaluate a liveness expression: exit 0 healthy, 1 unhealthy, 2 invalid.
    Probe {
        /// The expression [default: the document's liveness].
        expression: Option<String>,
        /// Milliseconds each network check may take.
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
    },
}

/// `keelson-agent host`.
#[derive(clap::Args)]
struct HostArgs {
    /// Address of the API.
    #[arg(long, env = "KEELSON_HOST_LISTEN", default_value = "127.0.0.1:7400")]
    listen: String,
    /// Where instances live.
    #[arg(
        long,
        env = "KEELSON_HOST_STATE_DIR",
        default_value = "/var/lib/keelson-host"
    )]
    state_dir: PathBuf,
    /// The host token (bearer token of the API and of the grant API).
    #[arg(long, env = "KEELSON_HOST_TOKEN_FILE")]
    token_file: PathBuf,
    /// The host's name [default: the machine's hostname].
    #[arg(long, env = "KEELSON_HOST_NAME")]
    name: Option<String>,
    /// The address instances bind their ports on (127.0.0.2, 127.0.0.3, …
    /// let one machine stand in for several hosts).
    #[arg(long, env = "KEELSON_INSTANCE_ADDRESS", default_value = "127.0.0.1")]
    instance_address: String,
    /// A directory local artifacts may come from (repeatable).
    #[arg(long = "artifact-root")]
    artifact_roots: Vec<PathBuf>,
    /// A URL prefix artifacts may be downloaded from (repeatable).
    #[arg(long = "allow-url")]
    allowed_urls: Vec<String>,
}

fn main() -> ExitCode {
    // The host daemon's supervisors are this binary, re-executed.
    if let Some(code) = host::run_internal_from_args(std::env::args_os()) {
        return code;
    }
    let cli = Cli::parse();
    let mut layout = Layout::under(&cli.root);
    if let Some(config) = cli.config {
        layout.config = config;
    }
    if let Some(labels) = cli.labels {
        layout.labels = labels;
    }
    if let Some(hooks) = cli.hooks_dir {
        layout.hooks = hooks;
    }
    match run(cli.command, layout) {
        Ok(code) => code,
        Err(message) => {
            // A structured line for whoever follows stdout, and a plain one.
            Output::stdout("agent").event("failed", &[("error", serde_json::json!(message))]);
            eprintln!("keelson-agent: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(role: Role, layout: Layout) -> Result<ExitCode, String> {
    let instance = Instance::from_env();
    match role {
        Role::Host(args) => {
            let name = match args.name {
                Some(n) => n,
                None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|s| s.trim().to_string())
                    .unwrap_or_else(|_| "localhost".into()),
            };
            let config = host::DaemonConfig {
                listen: args.listen,
                state_dir: args.state_dir,
                token_file: args.token_file,
                name,
                instance_address: args.instance_address,
                artifact_roots: args.artifact_roots,
                allowed_urls: args.allowed_urls,
                exe: std::env::current_exe().map_err(|e| format!("cannot find myself: {e}"))?,
            };
            let stop = stop_flag().map_err(|e| format!("cannot handle signals: {e}"))?;
            host::run(config, Output::stdout("host"), stop)?;
            Ok(ExitCode::SUCCESS)
        }
        Role::Probe {
            expression,
            timeout_ms,
        } => {
            let expression = match expression {
                Some(e) => e,
                None => layout.load_document()?.liveness,
            };
            let (code, line) = roles::probe(&expression, Duration::from_millis(timeout_ms));
            println!("{line}");
            Ok(ExitCode::from(code as u8))
        }
        Role::Tag { step } => {
            hooks::tag_lines(
                &step,
                std::io::stdin().lock(),
                &Output::stdout("entrypoint"),
            );
            Ok(ExitCode::SUCCESS)
        }
        Role::Init { hooks_from } => {
            let doc = layout.load_document()?;
            let exe = std::env::current_exe().map_err(|e| format!("cannot find myself: {e}"))?;
            roles::init(
                &layout,
                &doc,
                &instance,
                &exe,
                hooks_from.as_deref(),
                &Output::stdout("init"),
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Role::Entrypoint { command } => {
            let doc = layout.load_document()?;
            let stop = stop_flag().map_err(|e| format!("cannot handle signals: {e}"))?;
            let output = Output::stdout("entrypoint");
            let exe = std::env::current_exe().ok();
            let error = roles::entrypoint(
                &layout,
                &doc,
                &instance,
                &command,
                &output,
                stop,
                exe.as_deref(),
            );
            output.event(
                "not_started",
                &[("error", serde_json::json!(error.to_string()))],
            );
            eprintln!("keelson-agent: {error}");
            Ok(ExitCode::from(error.exit_code().clamp(1, 255) as u8))
        }
        Role::Sidecar {
            listen,
            checkurl_host,
        } => {
            let doc = layout.load_document()?;
            let stop = stop_flag().map_err(|e| format!("cannot handle signals: {e}"))?;
            let config = SidecarConfig {
                layout,
                doc,
                instance,
                listen,
                checkurl_host,
            };
            sidecar::run(config, Output::stdout("sidecar"), stop)?;
            Ok(ExitCode::SUCCESS)
        }
        Role::Offline { wait, timeout } => {
            let doc = layout.load_document()?;
            let timeout =
                timeout.map_or_else(|| roles::default_offline_timeout(&doc), Duration::from_secs);
            roles::offline(
                &layout,
                &doc,
                &instance,
                wait,
                timeout,
                &Output::stdout("offline"),
            )?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

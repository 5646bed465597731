//! `keelson release`: start a release, watch it, and steer it.
//!
//! ```text
//!  keelson release NAME --env E --version V [--strategy S] [--batches N | --batch-size N]
//!                  [--pause 30s|manual] [--replicas N] [--watch]
//!  keelson release start NAME …            the same (for an app named like a subcommand)
//!  keelson release status   NAME --env E [--id ID] [-o table|json|yaml]
//!  keelson release watch    NAME --env E [--id ID]
//!  keelson release pause|resume|rollback NAME --env E [--id ID]
//!  keelson release abort    NAME --env E [--id ID] [--keep-online] [--no-wait | --timeout 10m]
//! ```
//!
//! Without `--id` a command acts on the app's newest release in the
//! environment. `watch` follows the release's event stream (resuming after
//! the last event it saw when the connection drops) and exits non-zero
//! unless the release succeeded. `abort` waits until the abort has finished
//! and prints which instances run which version and whether they take
//! traffic.

use std::io::Write;
use std::time::Duration;

use anyhow::anyhow;
use clap::{Args, Subcommand};
use keelson_core::profile::Strategy;
use keelson_core::release::{Event, Input, InstanceChange, Status, Summary};

use super::{Connection, OutputFormat, explain, print_json, print_yaml};
use crate::client::{Client, ReleaseStreamEvent, ReleaseView};
use crate::output::table;
use crate::releases::ReleaseBody;

/// `keelson release …`: `keelson release NAME --env E --version V` starts a
/// release; the subcommands watch and steer one.
#[derive(Debug, Clone, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct ReleaseArgs {
    /// What to do with a release (without one: start a release).
    #[command(subcommand)]
    pub command: Option<ReleaseCommand>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub start: ReleaseStartArgs,
}

/// `keelson release` subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum ReleaseCommand {
    /// Start a release (the same as `keelson release NAME …`).
    Start(ReleaseStartArgs),
    /// Show a release: its state, batches, and every instance with its version.
    Status(ReleaseStatusArgs),
    /// Print a release's progress live until it ends; exit non-zero unless it succeeded.
    Watch(ReleaseTarget),
    /// Pause a release before its next stage.
    Pause(ReleaseTarget),
    /// Resume a paused release.
    Resume(ReleaseTarget),
    /// Abort a release: it stops where it is and its new instances leave traffic.
    Abort(ReleaseAbortArgs),
    /// Roll a release back to the version before it.
    Rollback(ReleaseTarget),
}

/// Starting a release. (The required values are options so that
/// `keelson release SUBCOMMAND` can go without them; clap requires them
/// whenever no subcommand is given.)
#[derive(Debug, Clone, Args)]
pub struct ReleaseStartArgs {
    /// The app's name.
    #[arg(required = true)]
    pub name: Option<String>,
    /// The environment.
    #[arg(long, required = true)]
    pub env: Option<String>,
    /// The version to release (an image tag, a build id).
    #[arg(long = "version", required = true)]
    pub version: Option<String>,
    /// in-place, rolling or dual-deployment (default: the profile's).
    #[arg(long, value_parser = parse_strategy)]
    pub strategy: Option<Strategy>,
    /// Number of batches (default: the profile's).
    #[arg(long, conflicts_with = "batch_size")]
    pub batches: Option<u32>,
    /// Instances per batch, instead of --batches.
    #[arg(long)]
    pub batch_size: Option<u32>,
    /// Pause between batches: a duration such as 30s, or manual.
    #[arg(long)]
    pub pause: Option<String>,
    /// Instances at the end (default: as many as run now).
    #[arg(long)]
    pub replicas: Option<u32>,
    /// Then follow it as `keelson release watch` does.
    #[arg(long)]
    pub watch: bool,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    pub output: OutputFormat,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connection: Connection,
}

/// The release a command acts on.
#[derive(Debug, Clone, Args)]
pub struct ReleaseTarget {
    /// The app's name.
    pub name: String,
    /// The environment.
    #[arg(long)]
    pub env: String,
    /// A release id (default: the app's newest release in the environment).
    #[arg(long)]
    pub id: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    pub output: OutputFormat,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connection: Connection,
}

/// `keelson release status`.
#[derive(Debug, Clone, Args)]
pub struct ReleaseStatusArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub target: ReleaseTarget,
}

/// `keelson release abort`.
#[derive(Debug, Clone, Args)]
pub struct ReleaseAbortArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub target: ReleaseTarget,
    /// Leave the release's new instances in traffic.
    #[arg(long)]
    pub keep_online: bool,
    /// Return at once instead of waiting until the abort has finished.
    #[arg(long)]
    pub no_wait: bool,
    /// How long to wait for the abort to finish (a worker does the
    /// clearing-up), e.g. 30s or 10m.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub timeout: Duration,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    keelson_core::profile::Duration::parse(text).map(|d| Duration::from_millis(d.as_millis()))
}

fn parse_strategy(text: &str) -> Result<Strategy, String> {
    serde_json::from_value(serde_json::Value::String(text.into()))
        .map_err(|_| "expected in-place, rolling or dual-deployment".to_string())
}

impl ReleaseTarget {
    async fn resolve(&self) -> anyhow::Result<(Client, ReleaseView)> {
        let client = self.connection.client()?;
        let view = match &self.id {
            Some(id) => client.release(&self.name, id).await,
            None => client.latest_release(&self.name, &self.env).await,
        }
        .map_err(explain)?;
        Ok((client, view))
    }
}

/// Runs a `keelson release` command, printing to `out`.
pub async fn execute(args: ReleaseArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let command = args.command.unwrap_or(ReleaseCommand::Start(args.start));
    match command {
        ReleaseCommand::Start(a) => {
            let (Some(name), Some(env), Some(version)) = (&a.name, &a.env, &a.version) else {
                return Err(anyhow!(
                    "give an app, --env and --version: keelson release NAME --env E --version V"
                ));
            };
            let client = a.connection.client()?;
            let body = ReleaseBody {
                env: env.clone(),
                version: version.clone(),
                strategy: a.strategy,
                batches: a.batches,
                batch_size: a.batch_size,
                pause: a.pause.clone(),
                failed_instances: None,
                replicas: a.replicas,
            };
            let view = client.create_release(name, &body).await.map_err(explain)?;
            match a.output {
                OutputFormat::Json if !a.watch => print_json(out, &view)?,
                OutputFormat::Yaml if !a.watch => print_yaml(out, &view)?,
                _ => writeln!(
                    out,
                    "release {} of {} in {}: {} {}",
                    view.id, view.app, view.env, version, view.status
                )?,
            }
            if a.watch {
                out.flush()?;
                return watch(&client, &view, out).await;
            }
        }
        ReleaseCommand::Status(a) => {
            let (_, view) = a.target.resolve().await?;
            match a.target.output {
                OutputFormat::Json => print_json(out, &view)?,
                OutputFormat::Yaml => print_yaml(out, &view)?,
                _ => print_status(out, &view)?,
            }
        }
        ReleaseCommand::Watch(a) => {
            let (client, view) = a.resolve().await?;
            return watch(&client, &view, out).await;
        }
        ReleaseCommand::Pause(a) => {
            let (client, view) = a.resolve().await?;
            let view = client
                .pause_release(&a.name, &view.id)
                .await
                .map_err(explain)?;
            print_steered(out, &view, "pause requested", a.output)?;
        }
        ReleaseCommand::Resume(a) => {
            let (client, view) = a.resolve().await?;
            let view = client
                .resume_release(&a.name, &view.id)
                .await
                .map_err(explain)?;
            print_steered(out, &view, "resumed", a.output)?;
        }
        ReleaseCommand::Rollback(a) => {
            let (client, view) = a.resolve().await?;
            let view = client
                .rollback_release(&a.name, &view.id)
                .await
                .map_err(explain)?;
            print_steered(out, &view, "rolling back", a.output)?;
        }
        ReleaseCommand::Abort(a) => {
            let (client, view) = a.target.resolve().await?;
            let mut view = client
                .abort_release(&a.target.name, &view.id, a.keep_online)
                .await
                .map_err(explain)?;
            let mut waited_out = false;
            if !a.no_wait && !view.finished {
                match tokio::time::timeout(a.timeout, follow(&client, &view, None)).await {
                    Ok(end) => view = end?,
                    Err(_) => {
                        waited_out = true;
                        view = client
                            .release(&a.target.name, &view.id)
                            .await
                            .map_err(explain)?;
                    }
                }
            }
            match a.target.output {
                OutputFormat::Json => print_json(out, &view)?,
                OutputFormat::Yaml => print_yaml(out, &view)?,
                _ => {
                    writeln!(out, "release {} {}", view.id, view.status)?;
                    if view.aborted_unplanned_by.is_some() {
                        writeln!(out, "aborted before it was planned: nothing ran")?;
                    }
                    if let Some(summary) = &view.summary {
                        print_instances(out, summary)?;
                        print_traffic_verdict(out, &view, summary)?;
                    }
                }
            }
            if waited_out {
                return Err(anyhow!(
                    "release {} is still {} after {:?}: is a release worker running?",
                    view.id,
                    view.status,
                    a.timeout
                ));
            }
        }
    }
    Ok(())
}

fn print_steered(
    out: &mut dyn Write,
    view: &ReleaseView,
    what: &str,
    output: OutputFormat,
) -> anyhow::Result<()> {
    match output {
        OutputFormat::Json => print_json(out, view),
        OutputFormat::Yaml => print_yaml(out, view),
        _ => {
            writeln!(out, "release {}: {what} ({})", view.id, view.status)?;
            Ok(())
        }
    }
}

/// The release's versions: `from -> to`, or the requested version.
fn versions(view: &ReleaseView) -> String {
    match (&view.state, &view.request) {
        (Some(state), _) => format!("{} -> {}", state.from, state.to),
        (None, Some(request)) => format!("-> {}", request.version),
        _ => String::new(),
    }
}

/// `keelson release status` as text.
pub fn print_status(out: &mut dyn Write, view: &ReleaseView) -> anyhow::Result<()> {
    writeln!(out, "release:  {} ({} in {})", view.id, view.app, view.env)?;
    writeln!(out, "status:   {}", view.status)?;
    writeln!(out, "version:  {}", versions(view))?;
    writeln!(out, "worker:   {}", view.worker.as_deref().unwrap_or("-"))?;
    writeln!(out, "created:  {} by {}", view.created_at, view.created_by)?;
    if let Some(error) = &view.error {
        writeln!(out, "refused:  {error}")?;
    }
    if let Some(by) = &view.aborted_unplanned_by {
        writeln!(out, "aborted:  by {by} before it was planned; nothing ran")?;
    }
    let Some(summary) = &view.summary else {
        if view.error.is_none() && view.aborted_unplanned_by.is_none() {
            writeln!(out, "(waiting for a worker to plan it)")?;
        }
        return Ok(());
    };
    writeln!(out, "phase:    {}", summary.phase)?;
    writeln!(
        out,
        "batches:  {}/{} done",
        summary.batches_done, summary.batches
    )?;
    if let Some(reason) = &summary.reason {
        writeln!(out, "reason:   {reason}")?;
    }
    writeln!(out)?;
    let rows: Vec<Vec<String>> = summary
        .versions
        .iter()
        .map(|v| {
            vec![
                v.version.to_string(),
                v.instances.to_string(),
                v.online.to_string(),
            ]
        })
        .collect();
    write!(out, "{}", table(&["VERSION", "INSTANCES", "ONLINE"], &rows))?;
    writeln!(out)?;
    print_instances(out, summary)
}

fn print_instances(out: &mut dyn Write, summary: &Summary) -> anyhow::Result<()> {
    let rows: Vec<Vec<String>> = summary
        .instances
        .iter()
        .map(|i| {
            vec![
                i.instance.to_string(),
                i.track.to_string(),
                i.version.to_string(),
                label(&i.state),
                if i.traffic { "yes" } else { "no" }.to_string(),
            ]
        })
        .collect();
    write!(
        out,
        "{}",
        table(&["INSTANCE", "TRACK", "VERSION", "STATE", "TRAFFIC"], &rows)
    )?;
    Ok(())
}

/// After an abort: whether any instance of the aborted version takes traffic.
fn print_traffic_verdict(
    out: &mut dyn Write,
    view: &ReleaseView,
    summary: &Summary,
) -> anyhow::Result<()> {
    let Some(state) = &view.state else {
        return Ok(());
    };
    let serving: Vec<String> = summary
        .instances
        .iter()
        .filter(|i| i.traffic && i.version == state.to)
        .map(|i| i.instance.to_string())
        .collect();
    if serving.is_empty() {
        writeln!(out, "no instance of {} takes traffic", state.to)?;
    } else {
        writeln!(
            out,
            "{} instance(s) of {} take traffic: {}",
            serving.len(),
            state.to,
            serving.join(", ")
        )?;
    }
    Ok(())
}

fn label<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => "?".into(),
    }
}

/// How long the stream may stay quiet before a changed release's progress
/// is printed.
const QUIET: Duration = Duration::from_millis(250);
/// Reconnections in a row before `watch` gives up.
const MAX_RECONNECTS: u32 = 10;

/// Follows `view`'s events until the release has finished, printing each
/// to `out` (when given); returns the release as it ended.
async fn follow(
    client: &Client,
    view: &ReleaseView,
    mut out: Option<&mut dyn Write>,
) -> anyhow::Result<ReleaseView> {
    let mut last: Option<i64> = None;
    let mut failures = 0;
    let mut progress = String::new();
    let mut dirty = false;
    loop {
        let mut stream = match client.release_events(&view.id, last).await {
            Ok(stream) => stream,
            Err(e) if e.status().is_none() && failures < MAX_RECONNECTS => {
                failures += 1;
                tokio::time::sleep(Duration::from_millis(200 * u64::from(failures))).await;
                continue;
            }
            Err(e) => return Err(explain(e)),
        };
        loop {
            let next = tokio::time::timeout(QUIET, stream.next()).await;
            let event = match next {
                Err(_) => {
                    // Quiet: print where the release stands if it moved.
                    if dirty && let Some(out) = out.as_deref_mut() {
                        let now = client.release(&view.app, &view.id).await.map_err(explain)?;
                        print_progress(out, &now, &mut progress)?;
                    }
                    dirty = false;
                    continue;
                }
                Ok(Ok(Some(event))) => event,
                Ok(Ok(None)) => break,
                Ok(Err(e)) => {
                    if failures >= MAX_RECONNECTS {
                        return Err(explain(e));
                    }
                    failures += 1;
                    break;
                }
            };
            failures = 0;
            last = Some(event.id);
            if let Some(out) = out.as_deref_mut() {
                print_event(out, &event)?;
                // Hook output does not move the release.
                dirty |= event.kind() != "hook-output";
            }
        }
        let now = client.release(&view.app, &view.id).await.map_err(explain)?;
        if now.finished {
            if let Some(out) = out.as_deref_mut() {
                print_progress(out, &now, &mut progress)?;
            }
            return Ok(now);
        }
        // The connection ended early: resume after the last event seen,
        // after a moment so that a failing server is not hammered.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `keelson release watch`: follows the release and fails unless it succeeded.
async fn watch(client: &Client, view: &ReleaseView, out: &mut dyn Write) -> anyhow::Result<()> {
    writeln!(
        out,
        "watching release {} of {} in {} ({})",
        view.id,
        view.app,
        view.env,
        versions(view)
    )?;
    out.flush()?;
    let end = follow(client, view, Some(&mut *out)).await?;
    writeln!(out)?;
    print_status(out, &end)?;
    out.flush()?;
    let reason = end
        .summary
        .as_ref()
        .and_then(|s| s.reason.clone())
        .or_else(|| {
            end.aborted_unplanned_by
                .as_ref()
                .map(|by| format!("aborted by {by} before it was planned; nothing ran"))
        });
    match (end.status.as_str(), reason) {
        ("succeeded", _) => Ok(()),
        (other, Some(reason)) => Err(anyhow!("release {} ended {other}: {reason}", end.id)),
        (other, None) => Err(anyhow!("release {} ended {other}", end.id)),
    }
}

/// The lines of a `hook-output` event as `watch` prints them:
/// `  <instance> <hook> | <line>`, then what was dropped.
pub fn hook_output_lines(body: &serde_json::Value) -> Vec<String> {
    let text = |v: &serde_json::Value, k: &str| -> String {
        // Hook output is the app's: no control sequences reach the terminal.
        v[k].as_str()
            .unwrap_or_default()
            .chars()
            .map(|c| if c.is_control() && c != '\t' { '?' } else { c })
            .collect()
    };
    let mut lines: Vec<String> = body["lines"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| {
            format!(
                "  {} {} | {}",
                text(l, "instance"),
                text(l, "hook"),
                text(l, "line")
            )
        })
        .collect();
    for dropped in body["dropped"].as_array().into_iter().flatten() {
        let n = dropped["lines"].as_u64().unwrap_or(0);
        let why = text(dropped, "why");
        lines.push(match dropped["instance"].as_str() {
            Some(_) => format!(
                "  {} {} | … {n} line(s) not shown: {why}",
                text(dropped, "instance"),
                text(dropped, "hook")
            ),
            None => format!("  … {n} hook output line(s) not shown: {why}"),
        });
    }
    lines
}

/// One line per event: what happened, and the status after it; hook
/// output as its lines.
fn print_event(out: &mut dyn Write, event: &ReleaseStreamEvent) -> anyhow::Result<()> {
    let body = &event.body;
    if event.kind() == "hook-output" {
        for line in hook_output_lines(body) {
            writeln!(out, "{line}")?;
        }
        out.flush()?;
        return Ok(());
    }
    let what = match event.kind() {
        "created" => "created".to_string(),
        "planned" => "planned".to_string(),
        "refused" => format!(
            "refused: {}",
            body["error"].as_str().unwrap_or("cannot be planned")
        ),
        "aborted-unplanned" => format!(
            "aborted by {} before it was planned: nothing ran",
            body["by"].as_str().unwrap_or("someone")
        ),
        "tick" => String::new(),
        _ => match serde_json::from_value::<Input>(body["input"].clone()) {
            Ok(input) => describe(&input.event),
            Err(_) => event.kind().to_string(),
        },
    };
    let status = serde_json::from_value::<Status>(body["status"].clone())
        .ok()
        .map(|s| describe_status(&s));
    match (what.is_empty(), status) {
        (true, None) => return Ok(()),
        (true, Some(status)) => writeln!(out, "{}  {status}", event.at)?,
        (false, None) => writeln!(out, "{}  {what}", event.at)?,
        (false, Some(status)) => writeln!(out, "{}  {what}  [{status}]", event.at)?,
    }
    out.flush()?;
    Ok(())
}

fn describe(event: &Event) -> String {
    match event {
        Event::Start => "started".into(),
        Event::Instance(i) => {
            let change = match &i.change {
                InstanceChange::Online => "online".to_string(),
                InstanceChange::Offline => "offline".to_string(),
                InstanceChange::Failed { error } => format!("failed: {error}"),
                InstanceChange::Exited { code: Some(c) } => format!("exited with code {c}"),
                InstanceChange::Exited { code: None } => "exited".to_string(),
                InstanceChange::Gone => "gone".to_string(),
            };
            format!("instance {} {} {}", i.instance, i.version, change)
        }
        Event::Done { step } => format!("done {step}"),
        Event::ActionFailed { step, error } => format!("step {step} failed: {error}"),
        Event::Tick => String::new(),
        Event::Pause => "pause requested".into(),
        Event::Resume => "resume requested".into(),
        Event::Abort { keep_online: true } => "abort requested (keep online)".into(),
        Event::Abort { keep_online: false } => "abort requested".into(),
        Event::Rollback => "rollback requested".into(),
    }
}

fn describe_status(status: &Status) -> String {
    match status {
        Status::Running { at } => format!("running batch {}", at.batch + 1),
        Status::Paused { at, .. } => format!("paused before batch {}", at.batch + 1),
        Status::Pausing { next, .. } => format!("pausing before batch {}", next + 1),
        other => other.label().to_string(),
    }
}

/// A line of batches and instances by version and state, when it changed.
fn print_progress(
    out: &mut dyn Write,
    view: &ReleaseView,
    last: &mut String,
) -> anyhow::Result<()> {
    let Some(summary) = &view.summary else {
        return Ok(());
    };
    let mut counts: std::collections::BTreeMap<(String, String), u32> = Default::default();
    for i in &summary.instances {
        *counts
            .entry((i.version.to_string(), label(&i.state)))
            .or_default() += 1;
    }
    let instances: Vec<String> = counts
        .iter()
        .map(|((version, state), n)| format!("{version} {state} {n}"))
        .collect();
    let line = format!(
        "progress: {} batches {}/{} done; instances: {}",
        summary.status,
        summary.batches_done,
        summary.batches,
        instances.join(", ")
    );
    if line != *last {
        writeln!(out, "{line}")?;
        out.flush()?;
        *last = line;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hook_output_is_printed_per_line_with_its_instance_and_hook() {
        let body = serde_json::json!({
            "kind": "hook-output",
            "lines": [
                {"instance": "host-2@blue", "hook": "preOnline", "line": "warming caches…"},
                {"instance": "host-1@green", "hook": "preStart", "line": "red \u{1b}[31mtext"},
            ],
            "dropped": [
                {"instance": "host-2@blue", "hook": "preOnline", "lines": 51,
                 "why": "more than 200 lines in one run"},
                {"lines": 3, "why": "the engine fell behind"},
            ],
        });
        assert_eq!(
            hook_output_lines(&body),
            [
                "  host-2@blue preOnline | warming caches…",
                "  host-1@green preStart | red ?[31mtext",
                "  host-2@blue preOnline | … 51 line(s) not shown: more than 200 lines in one run",
                "  … 3 hook output line(s) not shown: the engine fell behind",
            ]
        );
        let mut out = Vec::new();
        print_event(
            &mut out,
            &ReleaseStreamEvent {
                id: 7,
                at: keelson_store::Timestamp(0),
                body,
            },
        )
        .expect("print");
        let printed = String::from_utf8(out).expect("utf-8");
        assert!(
            printed.starts_with("  host-2@blue preOnline | warming caches…\n"),
            "{printed}"
        );
        assert_eq!(printed.lines().count(), 4, "{printed}");
    }

    #[test]
    fn an_abort_before_planning_is_printed_as_such() {
        let mut out = Vec::new();
        print_event(
            &mut out,
            &ReleaseStreamEvent {
                id: 2,
                at: keelson_store::Timestamp(0),
                body: serde_json::json!({"kind": "aborted-unplanned", "by": "alice"}),
            },
        )
        .expect("print");
        let printed = String::from_utf8(out).expect("utf-8");
        assert!(
            printed.contains("aborted by alice before it was planned: nothing ran"),
            "{printed}"
        );
    }
}

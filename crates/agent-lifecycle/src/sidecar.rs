//! The sidecar: brings the instance online, keeps its lease, takes it offline.
//!
//! ```text
//!            app appears (new pid/start time)
//! waiting_for_app ──► checking_url ──pass──► pre_online ──ok──► ONLINE (healthcheck.html)
//!      ▲                  ▲    ▲                 │ fail                │ label traffic=offline
//!      │ app exits        │    └── label online ─┼──── traffic_off ◄───┘
//!      └──────────────────┴──────────────────────┘      pre_online_failed (until the app restarts)
//!
//! offline request or SIGTERM: remove healthcheck.html ─► drain (if it was online)
//!                             ─► preOffline ─► offline ─► (SIGTERM) wait for the app to exit ─► revoke lease
//! ```
//!
//! One control loop owns every transition and runs the hooks; a watcher
//! thread acknowledges offline requests at once and cancels a running
//! preOnline when its attempt becomes pointless; a renewer thread keeps the
//! lease; a server thread answers `/ready` and `/state`. Every transition is
//! an event line on stdout.

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keelson_core::lifecycle::LifecycleDocument;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::grants::{GrantClient, GrantRequest, Lease, Renewal};
use crate::hooks::{HookOutcome, HookRunner};
use crate::http::{ServerResponse, serve};
use crate::labels::{parse_labels, traffic_off};
use crate::layout::{
    Instance, Layout, read_json, remove_if_present, write_atomic, write_json_atomic,
};
use crate::output::{Output, rfc3339_now};
use crate::probes::http_status;
use crate::process::AppProcess;

/// How often the control loop and the watcher look at the world.
const TICK: Duration = Duration::from_millis(20);

/// How often the control loop looks for an app during the first
/// [`STARTING_WINDOW`] of waiting for it: an app's start should be seen at once.
const STARTING_TICK: Duration = Duration::from_millis(5);

/// See [`STARTING_TICK`]; after it, waiting goes back to [`TICK`].
const STARTING_WINDOW: Duration = Duration::from_secs(2);

/// The first checkurl retries come this soon, doubling up to the interval:
/// an app that is listening a few milliseconds after its exec should not
/// wait a whole interval.
const FIRST_RETRY: Duration = Duration::from_millis(10);

/// How long the sidecar tries to revoke the lease when it stops.
const REVOKE_DEADLINE: Duration = Duration::from_secs(15);

/// Where the instance is in its lifecycle, as `/state` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// No app process runs.
    WaitingForApp,
    /// Polling the checkurl.
    CheckingUrl,
    /// Running preOnline.
    PreOnline,
    /// healthcheck.html exists: taking traffic.
    Online,
    /// preOnline failed; waits for an app restart.
    PreOnlineFailed,
    /// The pod's traffic label says offline.
    TrafficOff,
    /// Out of traffic, waiting for connections to drain.
    Draining,
    /// Running preOffline.
    PreOffline,
    /// Taken offline for a stop; the app may be stopped now.
    Offline,
    /// Stopping: waiting for the app to exit before revoking grants.
    Stopping,
}

/// An offline request from `offline` (and the sidecar's ack and done files).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfflineMessage {
    /// Identifies one request.
    pub id: String,
    /// When it was written.
    pub at: String,
    /// For `done`: how preOffline ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
}

/// Everything the sidecar needs.
#[derive(Debug, Clone)]
pub struct SidecarConfig {
    /// Paths.
    pub layout: Layout,
    /// The lifecycle document.
    pub doc: LifecycleDocument,
    /// Who this instance is.
    pub instance: Instance,
    /// Where `/ready` and `/state` are served (`0.0.0.0:8901`).
    pub listen: String,
    /// The host the checkurl is polled on (`127.0.0.1`: same network namespace).
    pub checkurl_host: String,
}

/// What `/state` shows.
#[derive(Debug, Clone, Serialize)]
struct View {
    phase: Phase,
    since: String,
    app: Option<AppProcess>,
    traffic_off: bool,
    lease_id: Option<String>,
    last_checkurl_status: Option<u16>,
    last_hook: Option<serde_json::Value>,
}

/// What the watcher sees on one look.
#[derive(Debug, Clone, PartialEq)]
struct Observed {
    stop: bool,
    app: Option<AppProcess>,
    traffic_off: bool,
    offline_request: Option<OfflineMessage>,
}

struct Shared {
    view: Mutex<View>,
    lease: Mutex<Option<Lease>>,
    /// The app a preOnline run is for; the watcher cancels the run when the
    /// world no longer matches it.
    online_attempt: Mutex<Option<AppProcess>>,
    cancel_pre_online: Arc<AtomicBool>,
    stop_renewing: AtomicBool,
}

/// Runs the sidecar until `stop` is set and the app has exited; then revokes
/// the lease and returns.
pub fn run(config: SidecarConfig, output: Output, stop: Arc<AtomicBool>) -> Result<(), String> {
    let layout = config.layout.clone();
    std::fs::create_dir_all(layout.run_dir())
        .map_err(|e| format!("cannot create {}: {e}", layout.run_dir().display()))?;
    let listener = TcpListener::bind(&config.listen)
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let lease: Option<Lease> = read_json(&layout.lease());
    let shared = Arc::new(Shared {
        view: Mutex::new(View {
            phase: Phase::WaitingForApp,
            since: rfc3339_now(),
            app: None,
            traffic_off: false,
            lease_id: lease.as_ref().map(|l| l.lease_id.clone()),
            last_checkurl_status: None,
            last_hook: None,
        }),
        lease: Mutex::new(lease),
        online_attempt: Mutex::new(None),
        cancel_pre_online: Arc::new(AtomicBool::new(false)),
        stop_renewing: AtomicBool::new(false),
    });
    output.event(
        "sidecar_started",
        &[
            ("app", json!(config.doc.app)),
            ("env", json!(config.doc.env)),
            ("instance", json!(config.instance.name)),
            (
                "listen",
                json!(listener.local_addr().map(|a| a.to_string()).ok()),
            ),
            (
                "lease_id",
                json!(
                    shared
                        .view
                        .lock()
                        .map(|v| v.lease_id.clone())
                        .ok()
                        .flatten()
                ),
            ),
        ],
    );

    spawn_server(listener, layout.clone(), shared.clone());
    spawn_watcher(
        layout.clone(),
        shared.clone(),
        stop.clone(),
        std::thread::current(),
    );
    let grants = match &config.doc.authorization {
        Some(auth) => {
            let client = GrantClient::new(&auth.url, &auth.token_path, output.clone())
                .map_err(|e| e.to_string())?;
            if shared.lease.lock().map(|l| l.is_some()).unwrap_or(false) {
                spawn_renewer(client.clone(), &config, shared.clone(), output.clone());
            } else {
                output.event(
                    "lease_missing",
                    &[("path", json!(layout.lease().display().to_string()))],
                );
            }
            Some(client)
        }
        None => None,
    };

    let hooks = HookRunner::new(
        &layout.hooks,
        config.instance.hook_env(&config.doc, &layout),
        output.clone(),
    );
    let mut sidecar = Sidecar {
        config,
        output: output.clone(),
        shared: shared.clone(),
        hooks,
        stop,
        phase: Phase::WaitingForApp,
        app: None,
        offline_done: false,
        offline_outcome: None,
        handled_request: read_json::<OfflineMessage>(&layout.offline_done()).map(|m| m.id),
        last_status: None,
        next_check: Instant::now(),
        checks: 0,
        incarnations: 0,
        phase_entered: Instant::now(),
    };
    sidecar.run_loop();

    shared.stop_renewing.store(true, Ordering::SeqCst);
    let lease = shared.lease.lock().ok().and_then(|l| l.clone());
    match (grants, lease) {
        (Some(client), Some(lease)) => {
            match client.revoke(&lease.lease_id, Instant::now() + REVOKE_DEADLINE) {
                Ok(()) => {
                    let _ = remove_if_present(&layout.lease());
                    output.event("grants_revoked", &[("lease_id", json!(lease.lease_id))]);
                }
                Err(e) => {
                    output.event(
                        "grants_revoke_failed",
                        &[
                            ("lease_id", json!(lease.lease_id)),
                            ("error", json!(e.to_string())),
                        ],
                    );
                    return Err(format!("could not revoke lease {}: {e}", lease.lease_id));
                }
            }
        }
        (Some(_), None) => output.event("grants_not_held", &[]),
        (None, _) => {}
    }
    output.event("sidecar_stopped", &[]);
    Ok(())
}

struct Sidecar {
    config: SidecarConfig,
    output: Output,
    shared: Arc<Shared>,
    hooks: HookRunner,
    stop: Arc<AtomicBool>,
    phase: Phase,
    app: Option<AppProcess>,
    /// The offline sequence ran for the current app (or, while none runs,
    /// for the last one).
    offline_done: bool,
    /// How its preOffline ended.
    offline_outcome: Option<String>,
    handled_request: Option<String>,
    last_status: Option<u16>,
    next_check: Instant,
    checks: u64,
    /// How many app processes this sidecar has seen start.
    incarnations: u64,
    /// When the current phase began.
    phase_entered: Instant,
}

impl Sidecar {
    /// Runs until the sidecar may exit; between passes it sleeps until its
    /// next tick or until woken (the watcher on a change it saw, the
    /// supervisor at the app's end).
    fn run_loop(&mut self) {
        loop {
            let seen = observe(&self.config.layout, &self.stop);
            if self.step(&seen) {
                return;
            }
            std::thread::park_timeout(self.pause());
        }
    }

    /// How long to sleep before the next pass: until the next checkurl
    /// attempt when it is due sooner than a tick, briefly while an app is
    /// expected, else a tick.
    fn pause(&self) -> Duration {
        match self.phase {
            Phase::CheckingUrl => self
                .next_check
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(1), TICK),
            Phase::WaitingForApp if self.phase_entered.elapsed() < STARTING_WINDOW => STARTING_TICK,
            _ => TICK,
        }
    }

    /// One pass of the control loop; true when the sidecar may exit.
    fn step(&mut self, seen: &Observed) -> bool {
        // Stopping and offline requests come first: they are about traffic.
        if seen.stop && !self.offline_done {
            self.go_offline("stop");
        }
        if let Some(request) = &seen.offline_request
            && self.handled_request.as_deref() != Some(request.id.as_str())
        {
            let outcome = match (&self.offline_outcome, self.offline_done) {
                (Some(outcome), true) => outcome.clone(),
                _ => self.go_offline("offline request"),
            };
            let done = OfflineMessage {
                id: request.id.clone(),
                at: rfc3339_now(),
                outcome: Some(outcome),
            };
            match write_json_atomic(&self.config.layout.offline_done(), &done) {
                Ok(()) => {
                    self.output
                        .event("offline_request_done", &[("request", json!(request.id))]);
                    self.handled_request = Some(request.id.clone());
                }
                // Answered again on the next pass, from the recorded
                // outcome: preOffline does not run twice.
                Err(e) => self.output.event(
                    "offline_done_write_failed",
                    &[
                        ("request", json!(request.id)),
                        ("error", json!(e.to_string())),
                    ],
                ),
            }
        }
        if seen.stop {
            self.set_phase(Phase::Stopping);
            match seen.app {
                Some(app) if Some(app) == self.app || self.app.is_none() => {
                    self.app.get_or_insert(app);
                    return false;
                }
                Some(_) => return false,
                None => {
                    if let Some(app) = self.app.take() {
                        self.output.event("app_exited", &[("pid", json!(app.pid))]);
                    }
                    return true;
                }
            }
        }

        // The app process: a new incarnation starts over, an exit goes offline.
        match (seen.app, self.app) {
            (None, Some(old)) => {
                self.remove_healthcheck("app exited");
                self.output.event("app_exited", &[("pid", json!(old.pid))]);
                self.app = None;
                // `offline_done` stays: the app that went offline is gone,
                // and a stop that follows (the supervisor stops the app
                // after the offline request, then the sidecar) must not run
                // preOffline again. A new incarnation resets it.
                self.set_phase(Phase::WaitingForApp);
            }
            (Some(new), old) if Some(new) != old => {
                if old.is_some() {
                    self.remove_healthcheck("app restarted");
                }
                self.incarnations += 1;
                self.output.event(
                    "app_started",
                    &[
                        ("pid", json!(new.pid)),
                        ("incarnation", json!(self.incarnations)),
                        ("restart", json!(self.incarnations > 1)),
                    ],
                );
                self.app = Some(new);
                self.offline_done = false;
                self.last_status = None;
                self.checks = 0;
                self.next_check = Instant::now();
                if self.incarnations == 1 && self.config.layout.healthcheck().exists() {
                    // The sidecar restarted under a running, online app: the
                    // entrypoint removes the marker on every app start and the
                    // previous sidecar removed it on every app exit, so it
                    // belongs to this app. Keep serving instead of flapping.
                    self.set_phase(Phase::Online);
                    self.output
                        .event("online_adopted", &[("pid", json!(new.pid))]);
                } else {
                    self.set_phase(Phase::CheckingUrl);
                }
            }
            _ => {}
        }
        if self.offline_done {
            return false;
        }

        // The traffic label.
        if seen.traffic_off && matches!(self.phase, Phase::Online | Phase::CheckingUrl) {
            self.remove_healthcheck("traffic label is offline");
            self.output.event("traffic_off", &[]);
            self.set_phase(Phase::TrafficOff);
        } else if !seen.traffic_off && self.phase == Phase::TrafficOff {
            self.output.event("traffic_on", &[]);
            self.next_check = Instant::now();
            self.set_phase(Phase::CheckingUrl);
        }

        if self.phase == Phase::CheckingUrl && Instant::now() >= self.next_check {
            self.check_and_go_online();
        }
        false
    }

    fn check_and_go_online(&mut self) {
        let c = &self.config.doc.checkurl;
        let status = http_status(
            &self.config.checkurl_host,
            c.port,
            &c.path,
            Duration::from_secs(u64::from(c.timeout_seconds.max(1))),
        );
        self.checks += 1;
        if let Ok(mut v) = self.shared.view.lock() {
            v.last_checkurl_status = Some(status);
        }
        let interval = Duration::from_secs(u64::from(c.interval_seconds.max(1)));
        if status != c.expected_status {
            // Report the first attempt, every change, and a heartbeat.
            if self.last_status != Some(status) || self.checks.is_multiple_of(30) {
                self.output.event(
                    "checkurl_waiting",
                    &[
                        (
                            "url",
                            json!(format!(
                                "http://{}:{}{}",
                                self.config.checkurl_host, c.port, c.path
                            )),
                        ),
                        ("status", json!(status)),
                        ("expected", json!(c.expected_status)),
                        ("attempt", json!(self.checks)),
                    ],
                );
            }
            self.last_status = Some(status);
            let shift = (self.checks.saturating_sub(1)).min(16) as u32;
            self.next_check = Instant::now() + FIRST_RETRY.saturating_mul(1 << shift).min(interval);
            return;
        }
        self.output.event(
            "checkurl_passed",
            &[("status", json!(status)), ("attempts", json!(self.checks))],
        );
        let app = self.app;
        if let Some(hook) = self.config.doc.hooks.pre_online.clone() {
            self.set_phase(Phase::PreOnline);
            self.shared.cancel_pre_online.store(false, Ordering::SeqCst);
            if let Ok(mut a) = self.shared.online_attempt.lock() {
                *a = app;
            }
            let runner = self
                .hooks
                .clone()
                .with_cancel(self.shared.cancel_pre_online.clone());
            let outcome = runner.run("preOnline", &hook);
            if let Ok(mut a) = self.shared.online_attempt.lock() {
                *a = None;
            }
            self.record_hook("preOnline", &outcome);
            if !outcome.succeeded() {
                if outcome.status == crate::hooks::HookStatus::Cancelled {
                    // The loop sees why (stop, offline, restart, label) next.
                    self.next_check = Instant::now();
                    self.set_phase(Phase::CheckingUrl);
                } else {
                    self.output.event(
                        "pre_online_failed",
                        &[("reason", json!(format!("preOnline {}", outcome.describe())))],
                    );
                    self.set_phase(Phase::PreOnlineFailed);
                }
                return;
            }
        }
        // Only go online if nothing changed while preOnline ran.
        let now = observe(&self.config.layout, &self.stop);
        let request_pending = now
            .offline_request
            .as_ref()
            .is_some_and(|r| self.handled_request.as_deref() != Some(r.id.as_str()));
        if now.stop || now.app != app || now.traffic_off || request_pending {
            self.next_check = Instant::now();
            self.set_phase(Phase::CheckingUrl);
            return;
        }
        let marker = format!("ONLINE {} {}\n", self.config.instance.name, rfc3339_now());
        match write_atomic(&self.config.layout.healthcheck(), marker.as_bytes()) {
            Ok(()) => {
                self.set_phase(Phase::Online);
                self.output.event(
                    "online",
                    &[(
                        "healthcheck",
                        json!(self.config.layout.healthcheck().display().to_string()),
                    )],
                );
            }
            Err(e) => {
                self.output.event(
                    "healthcheck_write_failed",
                    &[("error", json!(e.to_string()))],
                );
                self.next_check = Instant::now() + interval;
                self.set_phase(Phase::CheckingUrl);
            }
        }
    }

    /// remove healthcheck.html ─► drain (if it was online) ─► preOffline.
    /// Returns a short description of how preOffline ended.
    fn go_offline(&mut self, reason: &str) -> String {
        let was_online = self.phase == Phase::Online;
        self.shared.cancel_pre_online.store(true, Ordering::SeqCst);
        self.remove_healthcheck(reason);
        self.output.event(
            "going_offline",
            &[("reason", json!(reason)), ("was_online", json!(was_online))],
        );
        if was_online && self.config.doc.drain_seconds > 0 {
            self.set_phase(Phase::Draining);
            self.output.event(
                "draining",
                &[("seconds", json!(self.config.doc.drain_seconds))],
            );
            std::thread::sleep(Duration::from_secs(u64::from(
                self.config.doc.drain_seconds,
            )));
        }
        let outcome = match self.config.doc.hooks.pre_offline.clone() {
            Some(hook) => {
                self.set_phase(Phase::PreOffline);
                let outcome = self.hooks.run("preOffline", &hook);
                self.record_hook("preOffline", &outcome);
                outcome.describe()
            }
            None => "no preOffline hook".to_string(),
        };
        self.offline_done = true;
        self.offline_outcome = Some(outcome.clone());
        self.set_phase(Phase::Offline);
        self.output
            .event("offline", &[("pre_offline", json!(outcome))]);
        outcome
    }

    fn remove_healthcheck(&self, reason: &str) {
        match remove_if_present(&self.config.layout.healthcheck()) {
            Ok(true) => self
                .output
                .event("healthcheck_removed", &[("reason", json!(reason))]),
            Ok(false) => {}
            Err(e) => self.output.event(
                "healthcheck_remove_failed",
                &[("reason", json!(reason)), ("error", json!(e.to_string()))],
            ),
        }
    }

    fn record_hook(&self, step: &str, outcome: &HookOutcome) {
        if let Ok(mut v) = self.shared.view.lock() {
            v.last_hook = Some(json!({
                "step": step,
                "ok": outcome.succeeded(),
                "result": outcome.describe(),
                "duration_ms": outcome.duration.as_millis() as u64,
            }));
        }
    }

    fn set_phase(&mut self, phase: Phase) {
        if self.phase == phase {
            return;
        }
        let from = self.phase;
        self.phase = phase;
        self.phase_entered = Instant::now();
        if let Ok(mut v) = self.shared.view.lock() {
            v.phase = phase;
            v.since = rfc3339_now();
            v.app = self.app;
        }
        self.output
            .event("phase", &[("from", json!(from)), ("to", json!(phase))]);
    }
}

fn observe(layout: &Layout, stop: &AtomicBool) -> Observed {
    let app = read_json::<AppProcess>(&layout.app_record()).filter(AppProcess::is_running);
    let labels = std::fs::read_to_string(&layout.labels).unwrap_or_default();
    Observed {
        stop: stop.load(Ordering::SeqCst),
        app,
        traffic_off: traffic_off(&parse_labels(&labels)),
        offline_request: read_json(&layout.offline_request()),
    }
}

/// Acknowledges offline requests, cancels a preOnline that must not go on,
/// and wakes the control loop (`main`) when the traffic label or the run
/// directory changes, so it acts at once rather than at its next tick.
fn spawn_watcher(
    layout: Layout,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    main: std::thread::Thread,
) {
    std::thread::spawn(move || {
        let mut acked: Option<String> = None;
        let mut watch = crate::watch::Watch::new();
        loop {
            watch.begin();
            if let Some(dir) = layout.labels.parent() {
                watch.add(dir);
            }
            watch.add(&layout.run_dir());
            let seen = observe(&layout, &stop);
            if let Some(request) = &seen.offline_request
                && acked.as_deref() != Some(request.id.as_str())
            {
                let ack = OfflineMessage {
                    id: request.id.clone(),
                    at: rfc3339_now(),
                    outcome: None,
                };
                if write_json_atomic(&layout.offline_ack(), &ack).is_ok() {
                    acked = Some(request.id.clone());
                }
            }
            let attempt = shared.online_attempt.lock().ok().and_then(|a| *a);
            if let Some(app) = attempt {
                let pending = seen.offline_request.as_ref().is_some_and(|r| {
                    read_json::<OfflineMessage>(&layout.offline_done()).map(|d| d.id)
                        != Some(r.id.clone())
                });
                if seen.stop || seen.traffic_off || seen.app != Some(app) || pending {
                    shared.cancel_pre_online.store(true, Ordering::SeqCst);
                }
            }
            if let Ok(mut v) = shared.view.lock() {
                v.traffic_off = seen.traffic_off;
            }
            if watch.wait(TICK) {
                main.unpark();
            }
        }
    });
}

fn spawn_server(listener: TcpListener, layout: Layout, shared: Arc<Shared>) {
    std::thread::spawn(move || {
        serve(listener, |req| {
            let online = layout.healthcheck().exists();
            match req.path.split('?').next().unwrap_or("") {
                "/ready" if online => ServerResponse::text(200, "ready\n"),
                "/ready" => ServerResponse::text(503, "not ready\n"),
                "/state" => {
                    let view = shared.view.lock().map(|v| v.clone()).ok();
                    let mut body = serde_json::to_value(view).unwrap_or_default();
                    body["ready"] = json!(online);
                    ServerResponse::json(200, &body)
                }
                _ => ServerResponse::text(404, "not found; try /ready or /state\n"),
            }
        });
    });
}

/// How long a lost lease is re-acquired for: its ttl (at least 10 s), capped
/// at a day, since the ttl is the authorization API's number and a deadline
/// past the clock's range would panic.
fn renewal_deadline(ttl_s: u64) -> Instant {
    let ttl = Duration::from_secs(ttl_s.clamp(10, 24 * 3600));
    Instant::now() + ttl
}

fn spawn_renewer(client: GrantClient, config: &SidecarConfig, shared: Arc<Shared>, output: Output) {
    let request = GrantRequest {
        app: config.doc.app.clone(),
        env: config.doc.env.clone(),
        instance: config.instance.name.clone(),
        uid: config.instance.uid.clone(),
        ip: config.instance.ip.clone(),
    };
    let lease_path = config.layout.lease();
    std::thread::spawn(move || {
        let mut wait = None;
        loop {
            let Some(lease) = shared.lease.lock().ok().and_then(|l| l.clone()) else {
                return;
            };
            // ttl/3, less up to 10 % so pods started together do not renew
            // in waves.
            let period = wait.unwrap_or_else(|| {
                let third = Duration::from_secs(lease.ttl_s.max(3)) / 3;
                third - third.mul_f64(fastrand::f64() * 0.1)
            });
            let until = Instant::now()
                .checked_add(period)
                .unwrap_or_else(|| renewal_deadline(u64::MAX));
            while Instant::now() < until {
                if shared.stop_renewing.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(TICK);
            }
            if shared.stop_renewing.load(Ordering::SeqCst) {
                return;
            }
            wait = None;
            match client.renew(&lease.lease_id, lease.ttl_s) {
                Ok(Renewal::Renewed { ttl_s }) => {
                    output.event(
                        "lease_renewed",
                        &[("lease_id", json!(lease.lease_id)), ("ttl_s", json!(ttl_s))],
                    );
                    if let Ok(mut l) = shared.lease.lock()
                        && let Some(l) = l.as_mut()
                    {
                        l.ttl_s = ttl_s;
                    }
                }
                Ok(Renewal::Gone) => {
                    output.event("lease_lost", &[("lease_id", json!(lease.lease_id))]);
                    let deadline = renewal_deadline(lease.ttl_s);
                    match client.acquire(&request, deadline) {
                        Ok(new) => {
                            output.event(
                                "grants_obtained",
                                &[
                                    ("lease_id", json!(new.lease_id)),
                                    ("ttl_s", json!(new.ttl_s)),
                                ],
                            );
                            let _ = write_json_atomic(&lease_path, &new);
                            if let Ok(mut v) = shared.view.lock() {
                                v.lease_id = Some(new.lease_id.clone());
                            }
                            if let Ok(mut l) = shared.lease.lock() {
                                *l = Some(new);
                            }
                        }
                        Err(e) => {
                            output.event("grants_failed", &[("error", json!(e.to_string()))]);
                            wait = Some(Duration::from_secs(5));
                        }
                    }
                }
                Err(e) => {
                    output.event(
                        "lease_renew_failed",
                        &[
                            ("lease_id", json!(lease.lease_id)),
                            ("error", json!(e.to_string())),
                        ],
                    );
                    wait = Some(
                        (Duration::from_secs(lease.ttl_s.max(3)) / 3).min(Duration::from_secs(5)),
                    );
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use keelson_core::lifecycle::{CheckUrl, Hook, HookRun, Hooks, LIFECYCLE_API_VERSION};

    fn sidecar_in(dir: &std::path::Path, log: &std::path::Path) -> Sidecar {
        let layout = Layout::under(dir);
        std::fs::create_dir_all(layout.run_dir()).unwrap();
        let doc = LifecycleDocument {
            api_version: LIFECYCLE_API_VERSION.into(),
            app: "orders".into(),
            env: "prod".into(),
            checkurl: CheckUrl {
                port: 9,
                path: "/checkurl".into(),
                expected_status: 200,
                timeout_seconds: 1,
                interval_seconds: 1,
            },
            drain_seconds: 0,
            stop_timeout_seconds: 5,
            hooks: Hooks {
                pre_offline: Some(Hook {
                    run: HookRun::Command(format!("echo preOffline >> '{}'", log.display())),
                    timeout_seconds: 10,
                    env: Default::default(),
                }),
                ..Hooks::default()
            },
            liveness: "true".into(),
            authorization: None,
        };
        let output = Output::with_sink("sidecar", |_| {});
        let shared = Arc::new(Shared {
            view: Mutex::new(View {
                phase: Phase::WaitingForApp,
                since: rfc3339_now(),
                app: None,
                traffic_off: false,
                lease_id: None,
                last_checkurl_status: None,
                last_hook: None,
            }),
            lease: Mutex::new(None),
            online_attempt: Mutex::new(None),
            cancel_pre_online: Arc::new(AtomicBool::new(false)),
            stop_renewing: AtomicBool::new(false),
        });
        let instance = Instance::default();
        Sidecar {
            hooks: HookRunner::new(
                &layout.hooks,
                instance.hook_env(&doc, &layout),
                output.clone(),
            ),
            config: SidecarConfig {
                layout,
                doc,
                instance,
                listen: "127.0.0.1:0".into(),
                checkurl_host: "127.0.0.1".into(),
            },
            output,
            shared,
            stop: Arc::new(AtomicBool::new(false)),
            phase: Phase::WaitingForApp,
            app: None,
            offline_done: false,
            offline_outcome: None,
            handled_request: None,
            last_status: None,
            next_check: Instant::now(),
            checks: 0,
            incarnations: 0,
            phase_entered: Instant::now(),
        }
    }

    /// The host's stop order, seen pass by pass: the app runs held out of
    /// traffic, the stop's offline request is answered, the supervisor stops
    /// the app, the sidecar sees it gone, and only then is told to stop.
    /// preOffline runs once; a new incarnation gets its own offline sequence.
    #[test]
    fn an_app_exit_between_the_offline_request_and_the_stop_does_not_rerun_pre_offline() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("hooks.log");
        let mut sidecar = sidecar_in(dir.path(), &log);
        let runs = || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .count()
        };
        let app = AppProcess {
            pid: 4242,
            start_time: 1,
        };
        let request = OfflineMessage {
            id: "r1".into(),
            at: rfc3339_now(),
            outcome: None,
        };
        let world = |stop, app, request: Option<&OfflineMessage>| Observed {
            stop,
            app,
            traffic_off: true,
            offline_request: request.cloned(),
        };
        assert!(!sidecar.step(&world(false, Some(app), None)));
        assert_eq!(sidecar.phase, Phase::TrafficOff);
        assert!(!sidecar.step(&world(false, Some(app), Some(&request))));
        assert_eq!(runs(), 1);
        let done: OfflineMessage = read_json(&sidecar.config.layout.offline_done()).unwrap();
        assert_eq!(done.id, "r1");
        assert!(!sidecar.step(&world(false, None, Some(&request))));
        assert!(sidecar.step(&world(true, None, Some(&request))));
        assert_eq!(runs(), 1, "preOffline ran again at the stop");

        // An app that went offline, exited and was replaced: the new
        // incarnation's stop runs its own preOffline.
        let other = tempfile::tempdir().unwrap();
        let mut sidecar = sidecar_in(other.path(), &log);
        let next = AppProcess {
            pid: 4243,
            start_time: 2,
        };
        assert!(!sidecar.step(&world(false, Some(app), Some(&request))));
        assert_eq!(runs(), 2);
        assert!(!sidecar.step(&world(false, None, Some(&request))));
        assert!(!sidecar.step(&world(false, Some(next), Some(&request))));
        assert_eq!(runs(), 2, "r1 was answered already");
        assert!(!sidecar.step(&world(true, Some(next), Some(&request))));
        assert_eq!(runs(), 3);
    }

    #[test]
    fn a_huge_lease_ttl_gives_a_bounded_deadline_not_a_panic() {
        let before = Instant::now();
        let deadline = renewal_deadline(u64::MAX);
        assert!(deadline <= before + Duration::from_secs(24 * 3600 + 1));
        assert!(renewal_deadline(0) >= before + Duration::from_secs(10));
    }
}

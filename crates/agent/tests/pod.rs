//! The agent's roles run as a pod of local processes (see `support`), stopped
//! the way the kubelet stops a pod.

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;

const GRACE: Duration = Duration::from_secs(30);
const WAIT: Duration = Duration::from_secs(20);

fn json_events<'a>(events: &'a [serde_json::Value], name: &str) -> Vec<&'a serde_json::Value> {
    events.iter().filter(|e| e["event"] == name).collect()
}

fn position(events: &[serde_json::Value], name: &str) -> Option<usize> {
    events.iter().position(|e| e["event"] == name)
}

#[test]
fn full_lifecycle_runs_in_order_and_grants_outlive_the_app() {
    let authz = StubAuthz::start(0, false, 3);
    let mut spec = PodSpec::new("shop");
    spec.app_healthy_after_ms = 1500;
    spec.doc.drain_seconds = 1;
    spec.hook_scripts.push((
        "prestart.sh".into(),
        format!(
            "#!/bin/sh\n{}\ni=1\nwhile [ $i -le 3000 ]; do echo \"line $i\"; i=$((i+1)); done\necho oops >&2\n{}\n",
            ev("hook:preStart:start"),
            ev("hook:preStart:end")
        ),
    ));
    spec.doc.hooks.pre_start = Some(script_hook("prestart.sh", 30));
    spec.doc.hooks.pre_online = Some(command_hook(
        &format!(
            "{}; test -e \"$KEELSON_ROOT/run/healthcheck.html\" || {}; echo warming caches for $KEELSON_APP; {}",
            ev("hook:preOnline:start"),
            ev("hook:preOnline:healthcheck-absent"),
            ev("hook:preOnline:end")
        ),
        30,
    ));
    spec.doc.hooks.pre_offline = Some(command_hook(
        &format!(
            "{}; test -e \"$KEELSON_ROOT/run/healthcheck.html\" || {}; sleep 0.5; echo deregistered; {}",
            ev("hook:preOffline:start"),
            ev("hook:preOffline:healthcheck-absent"),
            ev("hook:preOffline:end")
        ),
        30,
    ));
    let (mut pod, init_status) = Pod::create(spec, Some(&authz));
    assert!(init_status.success(), "init failed\n{}", pod.dump());
    assert!(
        pod.agent().exists(),
        "init copies the agent into the volume"
    );
    assert!(
        pod.root.join("hooks/prestart.sh").exists(),
        "init copies hooks"
    );
    let lease: serde_json::Value =
        serde_json::from_slice(&std::fs::read(pod.root.join("run/lease.json")).unwrap()).unwrap();
    assert_eq!(lease["lease_id"], "lease-1");

    pod.start();
    pod.wait_for("online", WAIT, |p| p.marker_present());
    assert_eq!(pod.sidecar_get("/ready").map(|r| r.0), Some(200));
    assert_eq!(pod.sidecar_phase().as_deref(), Some("online"));
    // ttl 3 s: renewed every second.
    pod.wait_for("a lease renewal", WAIT, |_| {
        authz.calls.lock().unwrap().iter().any(|c| c == "renew")
    });
    let client = pod.hammer_app();
    pod.wait_for("traffic", WAIT, |p| {
        p.events().iter().any(|e| e == "client:ok")
    });

    pod.stop(GRACE);
    client.join().unwrap();
    assert_eq!(pod.exits["sidecar"].code(), Some(0), "{}", pod.dump());

    // The whole story, in order.
    assert_order(
        &pod,
        &[
            "hook:preStart:start",
            "hook:preStart:end",
            "app:start",
            "hook:preOnline:start",
            "hook:preOnline:healthcheck-absent",
            "hook:preOnline:end",
            "healthcheck:present",
            "client:ok",
            "kubelet:stop",
            "kubelet:prestop:app",
            "healthcheck:absent",
            "hook:preOffline:start",
            "hook:preOffline:healthcheck-absent",
            "hook:preOffline:end",
            "kubelet:prestop-done:app",
            "kubelet:sigterm:app",
            "app:sigterm",
            "app:exit",
            "kubelet:exited:app",
        ],
    );
    let events = pod.events();
    // healthcheck.html appeared exactly once, after preOnline.
    assert_eq!(
        events
            .iter()
            .filter(|e| *e == "healthcheck:present")
            .count(),
        1
    );
    // The app served during preOffline and right up to its end.
    let pre_offline_start = find(&events, "hook:preOffline:start", 0).unwrap();
    let pre_offline_end = find(&events, "hook:preOffline:end", 0).unwrap();
    let sigterm = find(&events, "app:sigterm", 0).unwrap();
    let during: Vec<&String> = events[pre_offline_start..pre_offline_end]
        .iter()
        .filter(|e| e.starts_with("client:"))
        .collect();
    assert!(
        !during.is_empty() && during.iter().all(|e| *e == "client:ok"),
        "{}",
        pod.dump()
    );
    let first_fail = find(&events, "client:fail", 0).unwrap_or(events.len());
    assert!(
        first_fail > sigterm,
        "a request failed before the app was stopped\n{}",
        pod.dump()
    );

    // Grants: obtained before the app started, revoked only after it exited.
    assert_order(
        &pod,
        &[
            "authz:grant:lease-1:\"shop-blue-7d9f-x1\":\"127.0.0.1\"",
            "app:start",
            "authz:renew",
            "kubelet:stop",
            "app:exit",
            "authz:revoke:lease-1",
        ],
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| e.starts_with("authz:grant"))
            .count(),
        1
    );
    let sidecar = pod.agent_events("sidecar");
    let app_exited = position(&sidecar, "app_exited").expect("sidecar saw the app exit");
    let revoked = position(&sidecar, "grants_revoked").expect("grants revoked");
    assert!(app_exited < revoked, "{}", pod.dump());

    // The sidecar polled the checkurl until it passed, then ran preOnline.
    let waiting = json_events(&sidecar, "checkurl_waiting");
    assert!(waiting.iter().any(|e| e["status"] == 503), "{}", pod.dump());
    let passed = position(&sidecar, "checkurl_passed").unwrap();
    let online = position(&sidecar, "online").unwrap();
    let pre_online = sidecar
        .iter()
        .position(|e| e["event"] == "hook_finished" && e["step"] == "preOnline")
        .unwrap();
    assert!(passed < pre_online && pre_online < online);

    // preStart's output: every line, in order, tagged, stderr included.
    let app_logs = pod.log_lines("app");
    let lines: Vec<&String> = app_logs
        .iter()
        .filter(|l| l.starts_with("[preStart] line "))
        .collect();
    assert_eq!(lines.len(), 3000);
    assert!(
        lines
            .iter()
            .enumerate()
            .all(|(i, l)| **l == format!("[preStart] line {}", i + 1))
    );
    assert!(app_logs.contains(&"[preStart] oops".to_string()));
    assert!(app_logs.contains(&format!("testapp listening on {}", pod.app_port)));
    let side_logs = pod.log_lines("sidecar");
    assert!(side_logs.contains(&"[preOnline] warming caches for shop".to_string()));
    assert!(side_logs.contains(&"[preOffline] deregistered".to_string()));
    let prestop = pod.agent_events("app-prestop");
    assert_eq!(
        prestop.last().unwrap()["event"],
        "offline_done",
        "{}",
        pod.dump()
    );
    assert_eq!(prestop.last().unwrap()["by"], "sidecar");
    assert_eq!(
        prestop.last().unwrap()["pre_offline"],
        "exited with status 0"
    );
    // Visible with --nocapture: what a release page would show.
    eprintln!("{}", pod.dump());
}

#[test]
fn an_app_restart_goes_offline_and_back_online_through_checkurl_and_pre_online() {
    let mut spec = PodSpec::new("shop");
    spec.app_healthy_after_ms = 300;
    spec.doc.hooks.pre_online = Some(command_hook(
        &format!(
            "{}; test -e \"$KEELSON_ROOT/run/healthcheck.html\" || {}",
            ev("hook:preOnline"),
            ev("hook:preOnline:healthcheck-absent")
        ),
        10,
    ));
    spec.doc.hooks.pre_offline = Some(command_hook("echo still deregistering; sleep 300", 1));
    let (mut pod, init) = Pod::create(spec, None);
    assert!(init.success());
    pod.start();
    pod.wait_for("online", WAIT, |p| p.marker_present());

    pod.crash("app");
    pod.wait_for("healthcheck removed after the crash", WAIT, |p| {
        !p.marker_present()
    });
    pod.wait_for("the sidecar to notice", WAIT, |p| {
        p.sidecar_phase().as_deref() == Some("waiting_for_app")
    });
    // A stale marker left behind must not make the new app online early.
    append(&pod.events, "test:stale-written");
    std::fs::write(pod.healthcheck(), "stale").unwrap();
    pod.wait_for("the watcher to see it", WAIT, |p| p.marker_present());
    pod.start_app();
    pod.wait_for("online again", WAIT, |p| {
        p.events().iter().filter(|e| *e == "hook:preOnline").count() == 2 && p.marker_present()
    });
    assert_order(
        &pod,
        &[
            "app:start",
            "hook:preOnline",
            "healthcheck:present",
            "kubelet:crash:app",
            "healthcheck:absent",
            "test:stale-written",
            "healthcheck:present",
            "app:start",
            "hook:preOnline",
            "hook:preOnline:healthcheck-absent",
            "healthcheck:present",
        ],
    );
    // The stale marker was gone before the new app's preOnline ran, and the
    // instance went online only after it.
    let events = pod.events();
    let stale = find(&events, "test:stale-written", 0).unwrap();
    assert!(find(&events, "healthcheck:absent", stale).is_some());
    assert_eq!(
        events
            .iter()
            .filter(|e| *e == "hook:preOnline:healthcheck-absent")
            .count(),
        2
    );
    assert!(
        pod.agent_events("app")
            .iter()
            .any(|e| e["event"] == "stale_healthcheck_removed"),
        "{}",
        pod.dump()
    );
    let sidecar = pod.agent_events("sidecar");
    let restart = sidecar
        .iter()
        .position(|e| e["event"] == "app_started" && e["restart"] == true)
        .expect("restart seen");
    assert!(position(&sidecar, "app_exited").unwrap() < restart);
    assert_eq!(json_events(&sidecar, "checkurl_passed").len(), 2);
    assert_eq!(json_events(&sidecar, "online").len(), 2);
    let last_checkurl = sidecar
        .iter()
        .rposition(|e| e["event"] == "checkurl_passed")
        .unwrap();
    assert!(last_checkurl > restart);

    // A preOffline that hangs is killed at its timeout; the stop goes on.
    pod.stop(GRACE);
    assert_eq!(pod.exits["sidecar"].code(), Some(0), "{}", pod.dump());
    let sidecar = pod.agent_events("sidecar");
    let pre_offline = sidecar
        .iter()
        .find(|e| e["event"] == "hook_finished" && e["step"] == "preOffline")
        .unwrap();
    assert_eq!(pre_offline["status"], "timed_out");
    assert!(
        pod.log_lines("sidecar")
            .contains(&"[preOffline] still deregistering".to_string())
    );
    assert_order(
        &pod,
        &[
            "kubelet:prestop:app",
            "kubelet:prestop-done:app",
            "app:sigterm",
            "app:exit",
        ],
    );
    assert!(
        !pod.events()
            .iter()
            .any(|e| e.starts_with("kubelet:sigkill"))
    );
}

#[test]
fn a_liveness_restart_runs_pre_offline_then_goes_back_online() {
    let mut spec = PodSpec::new("shop");
    spec.app_healthy_after_ms = 200;
    spec.doc.hooks.pre_online = Some(command_hook(&ev("hook:preOnline"), 10));
    spec.doc.hooks.pre_offline = Some(command_hook(
        &format!(
            "test -e \"$KEELSON_ROOT/run/healthcheck.html\" || {}; {}",
            ev("hook:preOffline:healthcheck-absent"),
            ev("hook:preOffline")
        ),
        10,
    ));
    let (mut pod, init) = Pod::create(spec, None);
    assert!(init.success());
    pod.start();
    pod.wait_for("online", WAIT, |p| p.marker_present());
    pod.restart_like_liveness("app");
    pod.wait_for("online again", WAIT, |p| {
        p.events().iter().filter(|e| *e == "hook:preOnline").count() == 2 && p.marker_present()
    });
    assert_order(
        &pod,
        &[
            "hook:preOnline",
            "healthcheck:present",
            "kubelet:liveness-restart:app",
            "hook:preOffline:healthcheck-absent",
            "hook:preOffline",
            "kubelet:prestop-done:app:0",
            "app:sigterm",
            "app:exit",
            "app:start",
            "hook:preOnline",
            "healthcheck:present",
        ],
    );
    // The sidecar itself was not stopped: it still serves and its lease
    // would still be held.
    assert_eq!(pod.sidecar_phase().as_deref(), Some("online"));
    pod.stop(GRACE);
    assert_eq!(
        pod.events()
            .iter()
            .filter(|e| *e == "hook:preOffline")
            .count(),
        2
    );
}

#[test]
fn sigterm_during_pre_start_kills_the_hook_and_never_starts_the_app() {
    let mut spec = PodSpec::new("shop");
    spec.doc.hooks.pre_start = Some(command_hook(
        "echo preparing; sleep 300 & echo $! > \"$KEELSON_ROOT/prestart-child.pid\"; wait",
        60,
    ));
    let (mut pod, init) = Pod::create(spec, None);
    assert!(init.success());
    pod.start_app();
    pod.wait_for("preStart to run", WAIT, |p| {
        p.log_lines("app")
            .contains(&"[preStart] preparing".to_string())
            && p.root.join("prestart-child.pid").exists()
    });
    pod.signal("app", Signal::TERM);
    let status = pod.wait_exit("app", WAIT);
    assert_eq!(status.code(), Some(143), "{}", pod.dump());
    let finished = pod
        .agent_events("app")
        .into_iter()
        .find(|e| e["event"] == "hook_finished")
        .unwrap();
    assert_eq!(finished["status"], "cancelled");
    let child: u32 = std::fs::read_to_string(pod.root.join("prestart-child.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    pod.wait_for("the hook's child to be killed too", WAIT, |_| {
        std::fs::read_to_string(format!("/proc/{child}/stat")).map_or(true, |s| {
            s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
    });
    assert!(!pod.events().iter().any(|e| e.starts_with("app:start")));
}

#[test]
fn offline_without_a_sidecar_goes_offline_itself() {
    let mut spec = PodSpec::new("shop");
    spec.doc.hooks.pre_offline = Some(command_hook(
        &format!(
            "test -e \"$KEELSON_ROOT/run/healthcheck.html\" || {}; {}",
            ev("hook:preOffline:healthcheck-absent"),
            ev("hook:preOffline")
        ),
        10,
    ));
    let (mut pod, init) = Pod::create(spec, None);
    assert!(init.success());
    pod.start_app();
    pod.wait_for("the app", WAIT, |p| {
        p.log_lines("app")
            .iter()
            .any(|l| l.starts_with("testapp listening"))
    });
    std::fs::write(pod.healthcheck(), "ONLINE").unwrap();
    pod.wait_for("the watcher", WAIT, |p| {
        p.events().iter().any(|e| e == "healthcheck:present")
    });
    pod.stop(GRACE);
    assert_order(
        &pod,
        &[
            "kubelet:prestop:app",
            "hook:preOffline:healthcheck-absent",
            "hook:preOffline",
            "kubelet:prestop-done:app",
            "kubelet:sigterm:app",
            "app:sigterm",
        ],
    );
    let prestop = pod.agent_events("app-prestop");
    assert!(
        prestop
            .iter()
            .any(|e| e["event"] == "sidecar_not_answering")
    );
    assert_eq!(prestop.last().unwrap()["by"], "offline");
}

#[test]
fn a_restarted_sidecar_adopts_the_online_app_without_flapping() {
    let mut spec = PodSpec::new("shop");
    spec.doc.hooks.pre_online = Some(command_hook(&ev("hook:preOnline"), 10));
    let (mut pod, init) = Pod::create(spec, None);
    assert!(init.success());
    pod.start();
    pod.wait_for("online", WAIT, |p| p.marker_present());
    pod.crash("sidecar");
    pod.start_sidecar();
    pod.wait_for("the new sidecar", WAIT, |p| {
        p.sidecar_phase().as_deref() == Some("online")
    });
    assert!(
        pod.agent_events("sidecar")
            .iter()
            .any(|e| e["event"] == "online_adopted")
    );
    let events = pod.events();
    assert_eq!(events.iter().filter(|e| *e == "hook:preOnline").count(), 1);
    assert!(
        !events.iter().any(|e| e == "healthcheck:absent"),
        "{}",
        pod.dump()
    );
    pod.stop(GRACE);
    assert_eq!(pod.exits["sidecar"].code(), Some(0), "{}", pod.dump());
}

#[test]
fn a_hanging_hook_is_killed_at_its_timeout_with_its_output_visible() {
    let mut spec = PodSpec::new("shop");
    spec.doc.hooks.pre_online = Some(command_hook(
        "echo warming 1; echo warming 2; sleep 300 & echo $! > \"$KEELSON_ROOT/hung.pid\"; wait",
        2,
    ));
    spec.doc.hooks.pre_offline = Some(command_hook("echo cannot deregister >&2; exit 3", 5));
    let (mut pod, init) = Pod::create(spec, None);
    assert!(init.success());
    pod.start();
    // While the hook hangs, everything else stays visible.
    pod.wait_for("preOnline to hang", WAIT, |p| {
        p.log_lines("sidecar")
            .contains(&"[preOnline] warming 2".to_string())
    });
    assert_eq!(pod.sidecar_phase().as_deref(), Some("pre_online"));
    assert_eq!(pod.sidecar_get("/ready").map(|r| r.0), Some(503));
    assert!(
        pod.log_lines("app")
            .iter()
            .any(|l| l.starts_with("testapp listening")),
        "{}",
        pod.dump()
    );
    pod.wait_for("the timeout", WAIT, |p| {
        p.sidecar_phase().as_deref() == Some("pre_online_failed")
    });
    let sidecar = pod.agent_events("sidecar");
    let finished = sidecar
        .iter()
        .find(|e| e["event"] == "hook_finished" && e["step"] == "preOnline")
        .unwrap();
    assert_eq!(finished["status"], "timed_out");
    assert!(finished["duration_ms"].as_u64().unwrap() >= 2000);
    let hung: u32 = std::fs::read_to_string(pod.root.join("hung.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    pod.wait_for("the hook's child to be killed too", WAIT, |_| {
        std::fs::read_to_string(format!("/proc/{hung}/stat")).map_or(true, |s| {
            s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
    });
    assert!(!pod.healthcheck().exists());
    assert!(!pod.events().iter().any(|e| e == "healthcheck:present"));

    // A failing preOffline is reported and does not block the stop.
    pod.stop(GRACE);
    let sidecar = pod.agent_events("sidecar");
    let pre_offline = sidecar
        .iter()
        .find(|e| e["event"] == "hook_finished" && e["step"] == "preOffline")
        .unwrap();
    assert_eq!(pre_offline["exit_code"], 3);
    assert!(
        pod.log_lines("sidecar")
            .contains(&"[preOffline] cannot deregister".to_string())
    );
    assert_order(
        &pod,
        &[
            "kubelet:prestop-done:app",
            "kubelet:sigterm:app",
            "app:sigterm",
        ],
    );
    assert!(
        !pod.events()
            .iter()
            .any(|e| e.starts_with("kubelet:sigkill")),
        "{}",
        pod.dump()
    );
}

#[test]
fn a_background_process_from_pre_start_keeps_its_output_after_the_exec() {
    let mut spec = PodSpec::new("shop");
    spec.doc.hooks.pre_start = Some(command_hook(
        &format!(
            "(while [ ! -e \"$KEELSON_ROOT/app-started\" ]; do sleep 0.05; done; echo late line; {}) & echo started helper",
            ev("background:done")
        ),
        10,
    ));
    let (mut pod, init) = Pod::create(spec, None);
    assert!(init.success());
    pod.start_app();
    pod.wait_for("the app", WAIT, |p| {
        p.log_lines("app")
            .iter()
            .any(|l| l.starts_with("testapp listening"))
    });
    // Only now, after the exec, does the background process write.
    std::fs::write(pod.root.join("app-started"), "").unwrap();
    pod.wait_for("its line", WAIT, |p| {
        p.log_lines("app")
            .contains(&"[preStart] late line".to_string())
            && p.events().iter().any(|e| e == "background:done")
    });
    assert!(
        pod.log_lines("app")
            .contains(&"[preStart] started helper".to_string())
    );
    pod.stop(GRACE);
}

#[test]
fn a_failing_pre_start_keeps_the_app_from_starting() {
    let mut spec = PodSpec::new("shop");
    spec.doc.hooks.pre_start = Some(command_hook("echo missing config; exit 7", 5));
    let (mut pod, init) = Pod::create(spec, None);
    assert!(init.success());
    pod.start_app();
    pod.wait_for("the entrypoint to give up", WAIT, |p| {
        p.agent_events("app")
            .iter()
            .any(|e| e["event"] == "not_started")
    });
    pod.stop(GRACE);
    assert_eq!(pod.exits["app"].code(), Some(7));
    assert!(
        pod.log_lines("app")
            .contains(&"[preStart] missing config".to_string())
    );
    assert!(!pod.events().iter().any(|e| e.starts_with("app:start")));
}

#[test]
fn the_traffic_label_takes_the_instance_out_and_back_in() {
    let mut spec = PodSpec::new("shop");
    spec.labels = Some("app.kubernetes.io/name=\"shop\"\nkeelson.dev/traffic=\"online\"\n".into());
    spec.doc.hooks.pre_online = Some(command_hook(&ev("hook:preOnline"), 10));
    spec.doc.hooks.pre_offline = Some(command_hook(&ev("hook:preOffline"), 10));
    let (mut pod, init) = Pod::create(spec, None);
    assert!(init.success());
    pod.start();
    pod.wait_for("online", WAIT, |p| p.marker_present());
    // The kubelet rewrites the downwardAPI file when the label is patched.
    std::fs::write(
        pod.root.join("podinfo/labels"),
        "app.kubernetes.io/name=\"shop\"\nkeelson.dev/traffic=\"offline\"\n",
    )
    .unwrap();
    pod.wait_for("out of traffic", WAIT, |p| !p.marker_present());
    pod.wait_for("/ready to follow", WAIT, |p| {
        p.sidecar_get("/ready").map(|r| r.0) == Some(503)
    });
    assert_eq!(pod.sidecar_phase().as_deref(), Some("traffic_off"));
    std::fs::write(
        pod.root.join("podinfo/labels"),
        "keelson.dev/traffic=\"online\"\n",
    )
    .unwrap();
    pod.wait_for("back online", WAIT, |p| p.marker_present());
    assert_order(
        &pod,
        &[
            "hook:preOnline",
            "healthcheck:present",
            "healthcheck:absent",
            "hook:preOnline",
            "healthcheck:present",
        ],
    );
    // Leaving traffic by label is not a stop: no preOffline.
    assert!(!pod.events().iter().any(|e| e == "hook:preOffline"));
    pod.stop(GRACE);
}

#[test]
fn init_retries_a_busy_authorization_api_and_fails_clearly_when_refused() {
    let busy = StubAuthz::start(2, false, 30);
    let (pod, init) = Pod::create(PodSpec::new("shop"), Some(&busy));
    assert!(init.success(), "{}", pod.dump());
    assert_eq!(
        *busy.calls.lock().unwrap(),
        [
            "busy",
            "busy",
            "grant:lease-1:\"shop-blue-7d9f-x1\":\"127.0.0.1\""
        ]
    );
    assert_eq!(
        json_events(&pod.agent_events("init"), "grant_retry").len(),
        2
    );
    assert!(pod.root.join("run/lease.json").exists());

    let refusing = StubAuthz::start(0, true, 30);
    let (pod, init) = Pod::create(PodSpec::new("shop"), Some(&refusing));
    assert_eq!(init.code(), Some(1));
    pod.wait_for("the error message", WAIT, |p| {
        p.log_lines("init").iter().any(|l| {
            l.contains("could not obtain database grants for shop/test instance shop-blue-7d9f-x1")
                && l.contains("HTTP 403: pod is not allowed")
        })
    });
    assert!(!pod.root.join("run/lease.json").exists());
}

#[test]
fn probe_runs_the_production_expression_unchanged() {
    let mut spec = PodSpec::new("shop");
    spec.app_healthy_after_ms = 0;
    let (mut pod, init) = Pod::create(spec, None);
    assert!(init.success());
    pod.start_app();
    let port = pod.app_port;
    pod.wait_for("the app", WAIT, |p| {
        p.log_lines("app")
            .iter()
            .any(|l| l.starts_with("testapp listening"))
    });
    let probe = |expr: &str| {
        Command::new(AGENT)
            .arg("probe")
            .arg(expr)
            .output()
            .expect("run probe")
    };
    let production = r#"(http(8080, "/checkurl") == 200) || (process("socat") && process("java"))"#;
    let out = probe(production);
    // Nothing listens on 8080 here and neither socat nor java run: unhealthy,
    // but a valid expression.
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let on_app = production.replace("8080", &port.to_string());
    let out = probe(&on_app);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(probe(r#"process("keelson-testapp") && tcp(PORT)"#.replace("PORT", &port.to_string()).as_str()).status.success());
    let out = probe(r#"http(8080, "/checkurl") = 200"#);
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("at column 25: unexpected `=`"), "{text}");
    pod.stop(GRACE);
}

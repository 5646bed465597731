//! Runs lifecycle hooks: a timeout that kills the hook's whole process group,
//! output streamed line by line and tagged with the step, the exit status
//! reported.
//!
//! ```text
//! hook_started ─► [step] line… (stdout and stderr, live) ─► hook_finished {status}
//!                         │
//!                  timeout or cancel ─► SIGKILL to the process group
//! ```
//!
//! A hook runs in its own process group, so children it forks are killed
//! with it. Its output is read by two threads that forward every line at
//! once; the runner waits for the hook itself, not for its pipes, so a
//! background process that keeps the pipes open cannot make the runner hang
//! (its later lines are still forwarded, tagged with the step).

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Component, Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use keelson_core::lifecycle::{Hook, HookRun};
use serde_json::json;

use crate::output::Output;

/// The longest line forwarded in one piece; longer output is split.
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// How long to keep reading a finished hook's pipes before reporting.
const PIPE_DRAIN: Duration = Duration::from_millis(500);

/// How often the runner checks the hook, its timeout and the cancel flag.
const POLL: Duration = Duration::from_millis(10);

/// How a hook ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookStatus {
    /// It exited with this code.
    Exited(i32),
    /// A signal from outside killed it.
    Signaled(i32),
    /// It ran past its timeout and its process group was killed.
    TimedOut,
    /// The runner was cancelled (the instance is stopping) and killed it.
    Cancelled,
    /// It could not be started at all.
    FailedToStart(String),
}

/// The result of one hook run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookOutcome {
    /// How it ended.
    pub status: HookStatus,
    /// How long it ran.
    pub duration: Duration,
}

impl HookOutcome {
    /// Whether the hook exited with status 0.
    pub fn succeeded(&self) -> bool {
        self.status == HookStatus::Exited(0)
    }

    /// A one-line description for error messages.
    pub fn describe(&self) -> String {
        match &self.status {
            HookStatus::Exited(code) => format!("exited with status {code}"),
            HookStatus::Signaled(sig) => format!("was killed by signal {sig}"),
            HookStatus::TimedOut => "timed out and was killed".to_string(),
            HookStatus::Cancelled => "was cancelled".to_string(),
            HookStatus::FailedToStart(e) => format!("could not start: {e}"),
        }
    }
}

/// Runs hooks for one instance with a fixed environment.
#[derive(Debug, Clone)]
pub struct HookRunner {
    hooks_dir: PathBuf,
    env: Vec<(String, String)>,
    output: Output,
    cancel: Option<Arc<AtomicBool>>,
    forwarder: Option<PathBuf>,
}

impl HookRunner {
    /// Scripts are resolved under `hooks_dir`; `env` is added to every hook's
    /// environment (the hook's own `env` wins).
    pub fn new(hooks_dir: impl Into<PathBuf>, env: Vec<(String, String)>, output: Output) -> Self {
        HookRunner {
            hooks_dir: hooks_dir.into(),
            env,
            output,
            cancel: None,
            forwarder: None,
        }
    }

    /// When `flag` becomes true, a running hook is killed and reported as
    /// [`HookStatus::Cancelled`].
    pub fn with_cancel(mut self, flag: Arc<AtomicBool>) -> Self {
        self.cancel = Some(flag);
        self
    }

    /// Forward the hook's output through a separate process, `exe tag STEP`
    /// (see [`tag_lines`]), writing to this process's stdout, instead of
    /// threads. For `entrypoint`, which execs the app after preStart: a
    /// process the hook leaves in the background keeps a live stdout, where
    /// pipes read by threads would close at exec and kill it with SIGPIPE.
    pub fn with_forwarder(mut self, exe: impl Into<PathBuf>) -> Self {
        self.forwarder = Some(exe.into());
        self
    }

    /// Runs `hook` as lifecycle step `step` (`preStart`, `preOnline`,
    /// `preOffline`) and waits for it, at most its timeout.
    pub fn run(&self, step: &str, hook: &Hook) -> HookOutcome {
        let started = Instant::now();
        let timeout = Duration::from_secs(u64::from(hook.timeout_seconds));
        let (what, command) = match self.command(hook) {
            Ok(c) => c,
            Err(e) => return self.finish(step, started, HookStatus::FailedToStart(e)),
        };
        let mut command = command;
        command
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .envs(&hook.env)
            .env("KEELSON_STEP", step)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        // With a forwarder, the hook writes into a pipe the forwarder reads
        // once `hook_started` is out, so no line of the hook can come
        // before it (the forwarder writes to our output on its own).
        let forward_pipe = self.forwarder.as_ref().and_then(|_| {
            let (reader, writer) = std::io::pipe().ok()?;
            let copy = writer.try_clone().ok()?;
            command
                .stdout(Stdio::from(writer))
                .stderr(Stdio::from(copy));
            Some(reader)
        });
        let spawned = command.spawn();
        // Our copies of the pipe's writing end must close, or its reader
        // never sees EOF.
        drop(command);
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                let status = HookStatus::FailedToStart(format!("{what}: {e}"));
                return self.finish(step, started, status);
            }
        };
        self.output.event(
            "hook_started",
            &[
                ("step", json!(step)),
                ("run", json!(what)),
                ("pid", json!(child.id())),
                ("timeout_s", json!(hook.timeout_seconds)),
            ],
        );
        let (done_tx, done_rx) = mpsc::channel();
        let mut readers = 0;
        let mut forwarder = None;
        if let (Some(reader), Some(exe)) = (forward_pipe, &self.forwarder) {
            let spawned = reader.try_clone().and_then(|pipe| {
                Command::new(exe)
                    .arg("tag")
                    .arg(step)
                    .stdin(Stdio::from(pipe))
                    .spawn()
            });
            match spawned {
                Ok(f) => forwarder = Some(f),
                // Without the forwarder, this process tags the lines itself.
                Err(_) => {
                    readers += 1;
                    self.forward(step, reader, done_tx.clone());
                }
            }
        }
        if let Some(out) = child.stdout.take() {
            readers += 1;
            self.forward(step, out, done_tx.clone());
        }
        if let Some(err) = child.stderr.take() {
            readers += 1;
            self.forward(step, err, done_tx);
        }
        let status = self.wait(&mut child, started, timeout);
        // Give the pipes a moment so the hook's last lines come before the
        // outcome; a background process holding them open is not waited for.
        let drain_until = Instant::now() + PIPE_DRAIN;
        if let Some(f) = forwarder.as_mut() {
            while Instant::now() < drain_until && matches!(f.try_wait(), Ok(None)) {
                std::thread::sleep(POLL);
            }
        }
        for _ in 0..readers {
            let left = drain_until.saturating_duration_since(Instant::now());
            if done_rx.recv_timeout(left).is_err() {
                break;
            }
        }
        self.finish(step, started, status)
    }

    fn command(&self, hook: &Hook) -> Result<(String, Command), String> {
        match &hook.run {
            HookRun::Command(line) => {
                let mut c = Command::new("/bin/sh");
                c.arg("-c").arg(line);
                Ok((line.clone(), c))
            }
            HookRun::Script(rel) => {
                let rel_path = Path::new(rel);
                let inside = rel_path
                    .components()
                    .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
                if !inside || rel.is_empty() {
                    return Err(format!(
                        "script `{rel}` must be a relative path inside the hooks directory"
                    ));
                }
                let path = self.hooks_dir.join(rel_path);
                let mut c = Command::new(&path);
                c.current_dir(&self.hooks_dir);
                Ok((path.display().to_string(), c))
            }
        }
    }

    fn forward(&self, step: &str, pipe: impl Read + Send + 'static, done: mpsc::Sender<()>) {
        let output = self.output.clone();
        let step = step.to_string();
        std::thread::spawn(move || {
            for_each_line(pipe, |line| output.step_line(&step, line));
            let _ = done.send(());
        });
    }

    fn wait(&self, child: &mut Child, started: Instant, timeout: Duration) -> HookStatus {
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    return match (status.code(), status.signal()) {
                        (Some(code), _) => HookStatus::Exited(code),
                        (None, Some(sig)) => HookStatus::Signaled(sig),
                        (None, None) => HookStatus::Exited(-1),
                    };
                }
                Ok(None) => {}
                Err(e) => return HookStatus::FailedToStart(format!("waiting failed: {e}")),
            }
            let cancelled = self
                .cancel
                .as_ref()
                .is_some_and(|f| f.load(Ordering::SeqCst));
            if cancelled || started.elapsed() >= timeout {
                kill_group(child.id());
                let _ = child.wait();
                return if cancelled {
                    HookStatus::Cancelled
                } else {
                    HookStatus::TimedOut
                };
            }
            std::thread::sleep(POLL);
        }
    }

    fn finish(&self, step: &str, started: Instant, status: HookStatus) -> HookOutcome {
        let outcome = HookOutcome {
            status,
            duration: started.elapsed(),
        };
        let mut fields = vec![
            ("step", json!(step)),
            ("ok", json!(outcome.succeeded())),
            ("duration_ms", json!(outcome.duration.as_millis() as u64)),
        ];
        match &outcome.status {
            HookStatus::Exited(code) => {
                fields.push(("status", json!("exited")));
                fields.push(("exit_code", json!(code)));
            }
            HookStatus::Signaled(sig) => {
                fields.push(("status", json!("signaled")));
                fields.push(("signal", json!(sig)));
            }
            HookStatus::TimedOut => fields.push(("status", json!("timed_out"))),
            HookStatus::Cancelled => fields.push(("status", json!("cancelled"))),
            HookStatus::FailedToStart(e) => {
                fields.push(("status", json!("failed_to_start")));
                fields.push(("error", json!(e)));
            }
        }
        self.output.event("hook_finished", &fields);
        outcome
    }
}

/// The forwarder's side of [`HookRunner::with_forwarder`]: tags every line
/// of `input` with `step` until EOF.
pub fn tag_lines(step: &str, input: impl Read, output: &Output) {
    for_each_line(input, |line| output.step_line(step, line));
}

/// Sends SIGKILL to the process group led by `pid` (and to `pid` itself, in
/// case it left its group).
pub fn kill_group(pid: u32) {
    let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return;
    };
    let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
}

/// Calls `f` with every line read from `source` (without the line ending,
/// invalid UTF-8 replaced), splitting lines longer than [`MAX_LINE_BYTES`].
pub fn for_each_line(source: impl Read, mut f: impl FnMut(&str)) {
    let mut reader = BufReader::with_capacity(8192, source);
    let mut line: Vec<u8> = Vec::new();
    loop {
        let chunk = match reader.fill_buf() {
            Ok([]) => break,
            Ok(chunk) => chunk,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let room = MAX_LINE_BYTES - line.len();
        let (used, complete) = match chunk.iter().take(room).position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (
                chunk.len().min(room),
                line.len() + chunk.len() >= MAX_LINE_BYTES,
            ),
        };
        line.extend_from_slice(&chunk[..used]);
        reader.consume(used);
        if complete {
            emit(&mut line, &mut f);
        }
    }
    if !line.is_empty() {
        emit(&mut line, &mut f);
    }
}

fn emit(line: &mut Vec<u8>, f: &mut impl FnMut(&str)) {
    while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        line.pop();
    }
    f(&String::from_utf8_lossy(line));
    line.clear();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    fn capture() -> (Output, Arc<Mutex<Vec<String>>>) {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let out = Output::with_sink("test", move |l| sink.lock().unwrap().push(l.to_string()));
        (out, lines)
    }

    fn command(line: &str, timeout_seconds: u32) -> Hook {
        Hook {
            run: HookRun::Command(line.to_string()),
            timeout_seconds,
            env: BTreeMap::new(),
        }
    }

    fn pid_alive(pid: i32) -> bool {
        // A killed process may linger as a zombie of its (gone) parent's reaper.
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
    }

    #[test]
    fn streams_tagged_lines_and_reports_exit_status() {
        let (out, lines) = capture();
        let runner = HookRunner::new("/nonexistent", vec![("A".into(), "1".into())], out);
        let mut hook = command("echo out $A $B $KEELSON_STEP; echo err >&2; exit 3", 5);
        hook.env.insert("B".into(), "2".into());
        let outcome = runner.run("preOnline", &hook);
        assert_eq!(outcome.status, HookStatus::Exited(3));
        let lines = lines.lock().unwrap();
        assert!(lines[0].contains("\"event\":\"hook_started\""), "{lines:?}");
        assert!(lines.contains(&"[preOnline] out 1 2 preOnline".to_string()));
        assert!(lines.contains(&"[preOnline] err".to_string()));
        let last = lines.last().unwrap();
        assert!(last.contains("\"event\":\"hook_finished\"") && last.contains("\"exit_code\":3"));
    }

    #[test]
    fn timeout_kills_the_whole_group_and_keeps_output_so_far() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("child.pid");
        let (out, lines) = capture();
        let runner = HookRunner::new(dir.path(), vec![], out);
        let hook = command(
            &format!(
                "sleep 300 & echo $! > {}; echo before hanging; wait",
                pidfile.display()
            ),
            1,
        );
        let outcome = runner.run("preOffline", &hook);
        assert_eq!(outcome.status, HookStatus::TimedOut);
        assert!(outcome.duration >= Duration::from_secs(1));
        assert!(
            lines
                .lock()
                .unwrap()
                .contains(&"[preOffline] before hanging".to_string())
        );
        let child: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while pid_alive(child) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!pid_alive(child), "the hook's child survived its timeout");
    }

    #[test]
    fn cancel_kills_a_running_hook() {
        let (out, _) = capture();
        let flag = Arc::new(AtomicBool::new(false));
        let runner = HookRunner::new("/", vec![], out).with_cancel(flag.clone());
        let setter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            flag.store(true, Ordering::SeqCst);
        });
        let outcome = runner.run("preOnline", &command("sleep 300", 600));
        setter.join().unwrap();
        assert_eq!(outcome.status, HookStatus::Cancelled);
    }

    #[test]
    fn scripts_run_from_the_hooks_dir_and_may_not_escape_it() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("warm.sh");
        std::fs::write(&script, "#!/bin/sh\necho warm in $(pwd)\n").unwrap();
        let mut perms = std::fs::metadata(&script).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(&script, perms).unwrap();
        let (out, lines) = capture();
        let runner = HookRunner::new(dir.path(), vec![], out);
        let hook = |s: &str| Hook {
            run: HookRun::Script(s.into()),
            timeout_seconds: 5,
            env: BTreeMap::new(),
        };
        assert!(runner.run("preStart", &hook("warm.sh")).succeeded());
        let expected = format!("[preStart] warm in {}", dir.path().display());
        assert!(lines.lock().unwrap().contains(&expected));
        let escaped = runner.run("preStart", &hook("../warm.sh"));
        assert!(
            matches!(escaped.status, HookStatus::FailedToStart(ref e) if e.contains("inside the hooks directory"))
        );
        let missing = runner.run("preStart", &hook("missing.sh"));
        assert!(matches!(missing.status, HookStatus::FailedToStart(_)));
    }

    #[test]
    fn a_background_process_holding_the_pipe_does_not_block_the_runner() {
        let (out, _) = capture();
        let runner = HookRunner::new("/", vec![], out);
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("bg.pid");
        let outcome = runner.run(
            "preStart",
            &command(
                &format!("sleep 30 & echo $! > {}; exit 0", pidfile.display()),
                10,
            ),
        );
        assert!(outcome.succeeded());
        assert!(outcome.duration < Duration::from_secs(10));
        let pid: u32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        kill_group(pid);
    }

    #[test]
    fn long_and_unterminated_lines_are_split_not_lost() {
        let mut input = vec![b'a'; MAX_LINE_BYTES + 10];
        input.extend_from_slice(b"\nlast\r\nno newline");
        let mut got = Vec::new();
        for_each_line(&input[..], |l| got.push(l.to_string()));
        assert_eq!(got.len(), 4);
        assert_eq!(got[0].len(), MAX_LINE_BYTES);
        assert_eq!(got[1], "a".repeat(10));
        assert_eq!(got[2], "last");
        assert_eq!(got[3], "no newline");
    }
}

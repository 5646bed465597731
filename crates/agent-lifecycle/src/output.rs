//! Everything the agent prints: structured state-change lines and
//! step-tagged output lines, one whole line per write.
//!
//! ```text
//! {"ts":"2026-01-01T00:00:00.000Z","component":"sidecar","event":"online"}
//! [preOnline] warming caches…
//! ```
//!
//! Lines are written whole and flushed at once, so output of concurrent hooks
//! and state changes never interleave inside a line and nothing waits in a
//! buffer.

use std::io::Write;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

type Sink = Arc<dyn Fn(&str) + Send + Sync>;

/// Where the agent's lines go: stdout by default, any sink for embedders.
#[derive(Clone)]
pub struct Output {
    component: &'static str,
    sink: Sink,
}

impl std::fmt::Debug for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Output")
            .field("component", &self.component)
            .finish_non_exhaustive()
    }
}

impl Output {
    /// Lines go to this process's stdout, tagged with `component`
    /// (`init`, `entrypoint`, `sidecar`, `offline`, …).
    pub fn stdout(component: &'static str) -> Self {
        Self::with_sink(component, |line| {
            let mut out = std::io::stdout().lock();
            // Output is best effort: a closed stdout must not stop the lifecycle.
            let _ = out.write_all(line.as_bytes());
            let _ = out.write_all(b"\n");
            let _ = out.flush();
        })
    }

    /// Lines go to `sink`, one call per line (without the newline).
    pub fn with_sink(component: &'static str, sink: impl Fn(&str) + Send + Sync + 'static) -> Self {
        Output {
            component,
            sink: Arc::new(sink),
        }
    }

    /// The same sink under another component name.
    pub fn component(&self, component: &'static str) -> Self {
        Output {
            component,
            sink: self.sink.clone(),
        }
    }

    /// A structured state-change line: a JSON object with `ts`, `component`,
    /// `event` and then `fields` in order.
    pub fn event(&self, event: &str, fields: &[(&str, Value)]) {
        let mut line = String::with_capacity(96);
        line.push_str("{\"ts\":");
        push_json(&mut line, &Value::String(rfc3339_now()));
        line.push_str(",\"component\":");
        push_json(&mut line, &Value::String(self.component.to_string()));
        line.push_str(",\"event\":");
        push_json(&mut line, &Value::String(event.to_string()));
        for (key, value) in fields {
            line.push(',');
            push_json(&mut line, &Value::String((*key).to_string()));
            line.push(':');
            push_json(&mut line, value);
        }
        line.push('}');
        (self.sink)(&line);
    }

    /// One line of a step's output, tagged: `[preOnline] text`.
    pub fn step_line(&self, step: &str, text: &str) {
        (self.sink)(&format!("[{step}] {text}"));
    }
}

fn push_json(line: &mut String, value: &Value) {
    // Serializing a `Value` cannot fail.
    line.push_str(&serde_json::to_string(value).unwrap_or_default());
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn rfc3339_now() -> String {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(since.as_secs(), since.subsec_millis())
}

fn rfc3339(secs: u64, millis: u32) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(rfc3339(1_795_000_000, 999), "2026-11-18T11:06:40.999Z");
    }

    #[test]
    fn events_are_json_objects_in_field_order() {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let out = Output::with_sink("sidecar", move |l| sink.lock().unwrap().push(l.to_string()));
        out.event(
            "hook_finished",
            &[("step", "preOnline".into()), ("exit_code", 3.into())],
        );
        out.step_line("preOnline", "hello \"world\"");
        let lines = lines.lock().unwrap();
        let v: Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(v["component"], "sidecar");
        assert_eq!(v["event"], "hook_finished");
        assert_eq!(v["exit_code"], 3);
        let keys: Vec<&str> = lines[0]
            .split(",\"")
            .skip(1)
            .map(|p| p.split('"').next().unwrap())
            .collect();
        assert_eq!(keys, ["component", "event", "step", "exit_code"]);
        assert_eq!(lines[1], "[preOnline] hello \"world\"");
    }
}

//! The app process as the sidecar sees it through a shared process namespace:
//! a pid plus its start time, so a restarted app (or a reused pid) is never
//! mistaken for the one that went online.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// One incarnation of the app process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppProcess {
    /// Its pid.
    pub pid: u32,
    /// Its start time in clock ticks since boot (`/proc/PID/stat` field 22).
    pub start_time: u64,
}

impl AppProcess {
    /// This process. `entrypoint` records itself right before `exec`, which
    /// keeps both the pid and the start time.
    pub fn current() -> Option<AppProcess> {
        let pid = std::process::id();
        let stat = read_stat(Path::new("/proc/self/stat"))?;
        Some(AppProcess {
            pid,
            start_time: stat.start_time,
        })
    }

    /// Whether this incarnation still runs (a zombie has exited).
    pub fn is_running(&self) -> bool {
        read_stat(&Path::new("/proc").join(self.pid.to_string()).join("stat"))
            .is_some_and(|s| s.start_time == self.start_time && s.state != 'Z' && s.state != 'X')
    }
}

/// The two fields of `/proc/PID/stat` the agent needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// The state letter (`R`, `S`, `Z`, …).
    pub state: char,
    /// Start time in clock ticks since boot.
    pub start_time: u64,
}

fn read_stat(path: &Path) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(path).ok()?)
}

/// Parses `/proc/PID/stat`; the command name may contain spaces and `)`.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let after = &text[text.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // After the state come fields 4..; start time is field 22.
    let start_time = fields.nth(18)?.parse().ok()?;
    Some(Stat { state, start_time })
}

/// The command names of all processes visible in `/proc`: the short name
/// (`comm`) and the base name of `argv[0]`.
pub fn process_names() -> Vec<String> {
    let mut names = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return names;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(pid) = file_name.to_str() else {
            continue;
        };
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let dir = entry.path();
        if let Ok(stat) = std::fs::read_to_string(dir.join("stat"))
            && parse_stat(&stat).is_some_and(|s| s.state == 'Z')
        {
            continue;
        }
        if let Ok(comm) = std::fs::read_to_string(dir.join("comm")) {
            names.push(comm.trim_end().to_string());
        }
        if let Ok(cmdline) = std::fs::read(dir.join("cmdline")) {
            let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
            let argv0 = String::from_utf8_lossy(argv0);
            if let Some(base) = argv0.rsplit('/').next()
                && !base.is_empty()
            {
                names.push(base.to_string());
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_awkward_names() {
        let text = "42 (my) app) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 123456 1000 10";
        assert_eq!(
            parse_stat(text),
            Some(Stat {
                state: 'S',
                start_time: 123456
            })
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn this_process_is_running_and_a_changed_start_time_is_not() {
        let me = AppProcess::current().unwrap();
        assert!(me.is_running());
        let other = AppProcess {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!other.is_running());
    }

    #[test]
    fn lists_this_process_by_name() {
        let exe = std::env::current_exe().unwrap();
        let base = exe.file_name().unwrap().to_string_lossy().to_string();
        assert!(process_names().contains(&base));
    }
}

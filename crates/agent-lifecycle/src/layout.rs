//! Where things are: the shared volume, the lifecycle document, the pod's
//! labels, and the files the agent's roles use to talk to each other.
//!
//! ```text
//! {root}/bin/keelson-agent        copied by init
//! {root}/hooks/…                  copied by init from --hooks-from
//! {root}/config/lifecycle.json    the LifecycleDocument (read-only)
//! {root}/podinfo/labels           the pod's labels (downwardAPI)
//! {root}/run/healthcheck.html     present ⇔ ONLINE
//! {root}/run/app.json             the app process (pid, start time), by entrypoint
//! {root}/run/lease.json           the grant lease, by init, renewed by the sidecar
//! {root}/run/offline.request|ack|done   offline --wait ⇄ sidecar
//! ```

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use keelson_core::lifecycle::{LIFECYCLE_FILE, LifecycleDocument};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The default root on Kubernetes: the shared emptyDir.
pub const DEFAULT_ROOT: &str = "/keelson";

/// Every path the agent uses, derived from one root and overridable one by one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The root (`/keelson`).
    pub root: PathBuf,
    /// The lifecycle document.
    pub config: PathBuf,
    /// The pod's labels file.
    pub labels: PathBuf,
    /// The hooks directory.
    pub hooks: PathBuf,
}

impl Layout {
    /// The standard layout under `root`.
    pub fn under(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        Layout {
            config: root.join("config").join(LIFECYCLE_FILE),
            labels: root.join("podinfo").join("labels"),
            hooks: root.join("hooks"),
            root,
        }
    }

    /// Where init copies the agent binary.
    pub fn agent_binary(&self) -> PathBuf {
        self.root.join("bin").join("keelson-agent")
    }

    /// The runtime state directory.
    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }

    /// The ONLINE marker that readiness and gateways follow.
    pub fn healthcheck(&self) -> PathBuf {
        self.run_dir().join("healthcheck.html")
    }

    /// The app process record written by `entrypoint`.
    pub fn app_record(&self) -> PathBuf {
        self.run_dir().join("app.json")
    }

    /// The grant lease written by `init`.
    pub fn lease(&self) -> PathBuf {
        self.run_dir().join("lease.json")
    }

    /// An offline request from `offline`.
    pub fn offline_request(&self) -> PathBuf {
        self.run_dir().join("offline.request")
    }

    /// The sidecar's acknowledgement of an offline request.
    pub fn offline_ack(&self) -> PathBuf {
        self.run_dir().join("offline.ack")
    }

    /// The sidecar's report that an offline request is done.
    pub fn offline_done(&self) -> PathBuf {
        self.run_dir().join("offline.done")
    }

    /// Reads and parses the lifecycle document.
    pub fn load_document(&self) -> Result<LifecycleDocument, String> {
        let text = std::fs::read_to_string(&self.config)
            .map_err(|e| format!("cannot read {}: {e}", self.config.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("invalid {}: {e}", self.config.display()))
    }
}

/// Writes `value` as JSON to `path` atomically (temporary file, then rename),
/// so readers never see half a file.
pub fn write_json_atomic(path: &Path, value: &impl Serialize) -> io::Result<()> {
    let bytes = serde_json::to_vec(value).map_err(io::Error::other)?;
    write_atomic(path, &bytes)
}

/// Writes `bytes` to `path` atomically, creating the parent directory.
///
/// The temporary file is private to this one call (the full file name, the
/// process and a per-process sequence number), so concurrent writers in one
/// process never share it: `offline.ack` and `offline.done` are written by
/// two threads of the same process at nearly the same moment, and a name
/// derived from the stem alone (`offline.tmp.PID` for both) let one rename
/// carry the other's content while the other failed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(
        ".tmp.{}.{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = path.with_file_name(name);
    let result = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Reads a JSON file; `None` when it is absent or unreadable.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Option<T> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Removes a file; absent is fine. Returns whether it existed.
pub fn remove_if_present(path: &Path) -> io::Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Who this instance is, from `KEELSON_POD_NAME`, `KEELSON_POD_UID`,
/// `KEELSON_POD_IP` and `KEELSON_NAMESPACE`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Instance {
    /// The instance name (the pod's name).
    pub name: String,
    /// The pod's UID.
    pub uid: String,
    /// The instance's IP.
    pub ip: String,
    /// The namespace (empty on hosts).
    pub namespace: String,
}

impl Instance {
    /// Reads the identity from the environment; missing variables are empty.
    pub fn from_env() -> Self {
        let var = |n: &str| std::env::var(n).unwrap_or_default();
        Instance {
            name: var("KEELSON_POD_NAME"),
            uid: var("KEELSON_POD_UID"),
            ip: var("KEELSON_POD_IP"),
            namespace: var("KEELSON_NAMESPACE"),
        }
    }

    /// The environment passed to hooks: the identity, app and environment.
    pub fn hook_env(&self, doc: &LifecycleDocument, layout: &Layout) -> Vec<(String, String)> {
        vec![
            ("KEELSON_APP".into(), doc.app.clone()),
            ("KEELSON_ENV".into(), doc.env.clone()),
            ("KEELSON_POD_NAME".into(), self.name.clone()),
            ("KEELSON_POD_UID".into(), self.uid.clone()),
            ("KEELSON_POD_IP".into(), self.ip.clone()),
            ("KEELSON_NAMESPACE".into(), self.namespace.clone()),
            ("KEELSON_ROOT".into(), layout.root.display().to_string()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two threads of one process writing sibling files (the sidecar's
    /// watcher writes `offline.ack` while its control loop writes
    /// `offline.done`): every write lands, whole, in its own file.
    #[test]
    fn concurrent_writes_of_sibling_files_never_lose_or_swap_content() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::under(dir.path());
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
        let writer = |path: PathBuf, tag: &'static str| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                for i in 0..2000 {
                    barrier.wait();
                    let text = format!("{tag} {i}");
                    write_atomic(&path, text.as_bytes())
                        .unwrap_or_else(|e| panic!("{tag} write {i} failed: {e}"));
                    barrier.wait();
                    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
                }
            })
        };
        let ack = writer(layout.offline_ack(), "ack");
        let done = writer(layout.offline_done(), "done");
        ack.join().unwrap();
        done.join().unwrap();
        let left: Vec<_> = std::fs::read_dir(layout.run_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| n.contains(".tmp."))
            .collect();
        assert!(left.is_empty(), "temporary files left: {left:?}");
    }
}

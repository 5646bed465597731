//! Container logs served by `pods/{name}/log`. Whatever plays the kubelet
//! appends lines; readers get the text so far and, with `follow`, what
//! comes after.

use std::collections::HashMap;
use std::sync::Mutex;
use tokio::sync::watch;

/// Log text per `(namespace, pod, container)`.
#[derive(Debug)]
pub struct Logs {
    text: Mutex<HashMap<(String, String, String), String>>,
    changed: watch::Sender<u64>,
}

impl Default for Logs {
    fn default() -> Self {
        Logs {
            text: Mutex::new(HashMap::new()),
            changed: watch::channel(0).0,
        }
    }
}

impl Logs {
    /// Appends text (include the newline) to a container's log.
    pub fn append(&self, namespace: &str, pod: &str, container: &str, text: &str) {
        self.text
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((namespace.into(), pod.into(), container.into()))
            .or_default()
            .push_str(text);
        self.changed.send_modify(|n| *n += 1);
    }

    /// The log from byte `from` on.
    pub fn read(&self, namespace: &str, pod: &str, container: &str, from: usize) -> String {
        self.text
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(namespace.into(), pod.into(), container.into()))
            .and_then(|t| t.get(from..))
            .unwrap_or("")
            .to_string()
    }

    /// Forgets a pod's logs.
    pub fn remove_pod(&self, namespace: &str, pod: &str) {
        self.text
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(n, p, _), _| !(n == namespace && p == pod));
    }

    /// Changes whenever a log grows.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

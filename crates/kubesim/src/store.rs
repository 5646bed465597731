//! The versioned in-memory object store.
//!
//! Every resource type has a table of objects keyed by `namespace/name`, kept
//! as compact JSON bytes next to the few facts the machinery indexes (labels,
//! uid, owner uids). One global counter issues resource versions, as etcd
//! does. Each table keeps a bounded log of its recent changes; that log is
//! what watches replay from, what `resourceVersionMatch=Exact` lists and
//! `continue` tokens read through, and where "410 Gone" comes from once a
//! version has fallen out of the window.
//!
//! ```text
//!   write ──► table.objects (latest)      watch cursor ──► table.log (rv > cursor)
//!        └──► table.log (event + prev) ──► notify(rv) ──► wakes watchers
//! ```
//!
//! The store knows nothing of Kubernetes semantics beyond metadata; the
//! `machinery` module builds get/list/create/update/patch/delete on it, and
//! in-process controllers can use the same calls.

use crate::resources::{RESOURCES, ResourceId};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::ops::Bound;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use tokio::sync::watch;

/// Label pairs of an object, with interned strings.
pub type Labels = Box<[(Arc<str>, Arc<str>)]>;

/// One stored version of an object.
#[derive(Debug)]
pub struct Obj {
    /// `namespace/name` (`/name` for cluster-scoped objects).
    pub key: Arc<str>,
    /// The resource version this copy was written at.
    pub rv: u64,
    /// The whole object as JSON, LZ4-compressed (objects of one kind
    /// repeat the same keys, so this shrinks them severalfold).
    packed: Box<[u8]>,
    /// `metadata.labels`.
    pub labels: Labels,
    /// `metadata.uid`.
    pub uid: Arc<str>,
    /// The uids in `metadata.ownerReferences`.
    pub owners: Box<[Arc<str>]>,
    /// Values of the [`INDEXED_FIELDS`] the object has, by position.
    indexed: Box<[(u8, Box<str>)]>,
}

/// Fields kept beside each object so that field selectors on them (a
/// kubelet's `spec.nodeName=…`, `status.phase!=…`, events by involved
/// object) need not inflate and parse the object.
pub const INDEXED_FIELDS: &[&str] = &[
    "spec.nodeName",
    "status.phase",
    "spec.schedulerName",
    "involvedObject.uid",
    "involvedObject.name",
    "involvedObject.namespace",
    "involvedObject.kind",
    "type",
];

impl Obj {
    /// The whole object as JSON.
    pub fn json(&self) -> Vec<u8> {
        lz4_flex::decompress_size_prepended(&self.packed).unwrap_or_else(|_| b"{}".to_vec())
    }

    /// How many bytes the object takes in the store.
    pub fn stored_len(&self) -> usize {
        self.packed.len()
    }

    /// Parses the stored JSON.
    pub fn value(&self) -> Value {
        serde_json::from_slice(&self.json()).unwrap_or(Value::Null)
    }

    /// The namespace part of the key (`""` for cluster-scoped objects).
    pub fn namespace(&self) -> &str {
        self.key.split_once('/').map(|(ns, _)| ns).unwrap_or("")
    }

    /// The name part of the key.
    pub fn name(&self) -> &str {
        self.key
            .split_once('/')
            .map(|(_, n)| n)
            .unwrap_or(&self.key)
    }

    /// The value of an indexed field: `Some("")` when the object lacks it,
    /// `None` when the path is not one of [`INDEXED_FIELDS`].
    pub fn indexed_field(&self, path: &str) -> Option<&str> {
        let pos = INDEXED_FIELDS.iter().position(|f| *f == path)?;
        Some(
            self.indexed
                .iter()
                .find(|(i, _)| usize::from(*i) == pos)
                .map_or("", |(_, v)| &**v),
        )
    }

    /// The value of one label.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| &**k == key)
            .map(|(_, v)| &**v)
    }
}

/// What happened to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// Created.
    Added,
    /// Changed.
    Modified,
    /// Removed.
    Deleted,
}

impl EventKind {
    /// The watch event type string.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Added => "ADDED",
            EventKind::Modified => "MODIFIED",
            EventKind::Deleted => "DELETED",
        }
    }
}

/// One change in a table's log.
#[derive(Debug)]
pub struct Event {
    /// The resource version of the change.
    pub rv: u64,
    /// What happened.
    pub kind: EventKind,
    /// The object after the change (for deletions: the last state, stamped
    /// with the deletion's resource version).
    pub obj: Arc<Obj>,
    /// The object before the change, if it existed.
    pub prev: Option<Arc<Obj>>,
}

/// The requested version is no longer in the retained window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too old resource version: {requested} ({oldest})")]
pub struct Expired {
    /// The version asked for.
    pub requested: u64,
    /// The oldest version still answerable.
    pub oldest: u64,
}

/// A write's precondition did not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// The object exists and creation was asked.
    #[error("already exists")]
    Exists,
    /// The object does not exist.
    #[error("not found")]
    NotFound,
    /// The object changed since the expected version.
    #[error("resource version changed: expected {expected}, found {found}")]
    Stale {
        /// Version the caller read.
        expected: u64,
        /// Version now stored.
        found: u64,
    },
}

/// What a write expects to find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// No object under the key.
    Absent,
    /// The object at exactly this version.
    Version(u64),
}

/// A label pair (interned strings).
type LabelPair = (Arc<str>, Arc<str>);

#[derive(Default)]
struct Table {
    objects: BTreeMap<Box<str>, Arc<Obj>>,
    /// Keys of the objects carrying each label pair: equality selectors
    /// read these instead of every object.
    by_label: HashMap<LabelPair, BTreeSet<Arc<str>>>,
    log: VecDeque<Arc<Event>>,
    /// Every change with `rv <= compacted` has left the log.
    compacted: u64,
}

struct Inner {
    rv: u64,
    tables: Vec<Table>,
    by_uid: HashMap<Arc<str>, (ResourceId, Box<str>)>,
    dependents: HashMap<Arc<str>, BTreeSet<(ResourceId, Box<str>)>>,
    interner: HashSet<Arc<str>>,
}

impl Inner {
    fn intern(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.interner.get(s) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(s);
        self.interner.insert(a.clone());
        a
    }
}

/// The object store shared by the HTTP API and in-process controllers.
pub struct Store {
    inner: RwLock<Inner>,
    notify: watch::Sender<u64>,
    window: usize,
}

/// Builds the key of an object.
pub fn key_of(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

fn ns_range(ns: Option<&str>) -> (Bound<Box<str>>, Bound<Box<str>>) {
    match ns {
        None => (Bound::Unbounded, Bound::Unbounded),
        // '0' follows '/' in ASCII: every "ns/…" key sorts in [ns/, ns0).
        Some(ns) => (
            Bound::Included(format!("{ns}/").into()),
            Bound::Excluded(format!("{ns}0").into()),
        ),
    }
}

impl Store {
    /// A store whose tables each retain the last `window` changes.
    pub fn new(window: usize) -> Self {
        Store {
            inner: RwLock::new(Inner {
                rv: 1,
                tables: RESOURCES.iter().map(|_| Table::default()).collect(),
                by_uid: HashMap::new(),
                dependents: HashMap::new(),
                interner: HashSet::new(),
            }),
            notify: watch::channel(1).0,
            window: window.max(1),
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_lock(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The latest resource version issued.
    pub fn current_rv(&self) -> u64 {
        self.read().rv
    }

    /// A receiver that changes whenever anything is written.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.notify.subscribe()
    }

    /// The latest version of one object.
    pub fn get(&self, res: ResourceId, key: &str) -> Option<Arc<Obj>> {
        self.read().tables[res].objects.get(key).cloned()
    }

    /// Bytes the objects of one resource take in the store (compressed
    /// JSON only, not indexes).
    pub fn stored_bytes(&self, res: ResourceId) -> usize {
        self.read().tables[res]
            .objects
            .values()
            .map(|o| o.stored_len())
            .sum()
    }

    /// Number of objects of one resource.
    pub fn len(&self, res: ResourceId) -> usize {
        self.read().tables[res].objects.len()
    }

    /// Whether no object of that resource exists.
    pub fn is_empty(&self, res: ResourceId) -> bool {
        self.len(res) == 0
    }

    /// Finds an object by uid.
    pub fn by_uid(&self, uid: &str) -> Option<(ResourceId, Arc<Obj>)> {
        let inner = self.read();
        let (res, key) = inner.by_uid.get(uid)?;
        inner.tables[*res]
            .objects
            .get(key)
            .map(|o| (*res, o.clone()))
    }

    /// Objects whose ownerReferences name `uid`.
    pub fn dependents(&self, uid: &str) -> Vec<(ResourceId, Arc<Obj>)> {
        let inner = self.read();
        let Some(set) = inner.dependents.get(uid) else {
            return Vec::new();
        };
        set.iter()
            .filter_map(|(res, key)| {
                inner.tables[*res]
                    .objects
                    .get(key)
                    .map(|o| (*res, o.clone()))
            })
            .collect()
    }

    /// Writes (or with `new == None` removes) one object if `expect` holds.
    /// Stamps `metadata.resourceVersion` and returns the stored copy (for a
    /// removal, the last state stamped with the removal's version).
    pub fn write(
        &self,
        res: ResourceId,
        key: &str,
        expect: Expect,
        new: Option<Value>,
    ) -> Result<Arc<Obj>, WriteError> {
        self.write_returning(res, key, expect, new).map(|(o, _)| o)
    }

    /// [`Store::write`], also handing back the written object as a value
    /// (stamped with its resourceVersion), which spares callers a parse.
    pub fn write_returning(
        &self,
        res: ResourceId,
        key: &str,
        expect: Expect,
        new: Option<Value>,
    ) -> Result<(Arc<Obj>, Value), WriteError> {
        let mut guard = self.write_lock();
        let inner = &mut *guard;
        let prev = inner.tables[res].objects.get(key).cloned();
        match (expect, &prev) {
            (Expect::Absent, Some(_)) => return Err(WriteError::Exists),
            (Expect::Version(_), None) => return Err(WriteError::NotFound),
            (Expect::Version(v), Some(p)) if p.rv != v => {
                return Err(WriteError::Stale {
                    expected: v,
                    found: p.rv,
                });
            }
            _ => {}
        }
        if new.is_none() && prev.is_none() {
            return Err(WriteError::NotFound);
        }
        let rv = inner.rv + 1;
        inner.rv = rv;
        let (kind, mut value) = match (new, &prev) {
            (Some(v), None) => (EventKind::Added, v),
            (Some(v), Some(_)) => (EventKind::Modified, v),
            (None, Some(p)) => (EventKind::Deleted, p.value()),
            (None, None) => unreachable!("checked above"),
        };
        if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
        }
        let obj = Arc::new(build_obj(inner, key, rv, &value));
        if let Some(p) = &prev {
            for o in p.owners.iter() {
                if let Some(set) = inner.dependents.get_mut(o) {
                    set.remove(&(res, Box::from(&*p.key)));
                    if set.is_empty() {
                        inner.dependents.remove(o);
                    }
                }
            }
            inner.by_uid.remove(&p.uid);
        }
        let table = &mut inner.tables[res];
        if let Some(p) = &prev {
            for pair in p.labels.iter() {
                if let Some(set) = table.by_label.get_mut(pair) {
                    set.remove(&p.key);
                    if set.is_empty() {
                        table.by_label.remove(pair);
                    }
                }
            }
        }
        if kind == EventKind::Deleted {
            table.objects.remove(key);
        } else {
            for pair in obj.labels.iter() {
                table
                    .by_label
                    .entry(pair.clone())
                    .or_default()
                    .insert(obj.key.clone());
            }
            table.objects.insert(key.into(), obj.clone());
            inner.by_uid.insert(obj.uid.clone(), (res, key.into()));
            for o in obj.owners.iter() {
                inner
                    .dependents
                    .entry(o.clone())
                    .or_default()
                    .insert((res, key.into()));
            }
        }
        let table = &mut inner.tables[res];
        table.log.push_back(Arc::new(Event {
            rv,
            kind,
            obj: obj.clone(),
            prev,
        }));
        while table.log.len() > self.window {
            if let Some(e) = table.log.pop_front() {
                table.compacted = e.rv;
            }
        }
        drop(guard);
        self.notify.send_replace(rv);
        Ok((obj, value))
    }

    /// Forgets all history, as an etcd compaction at the current version:
    /// every watch or list at an older version now gets 410 Gone.
    pub fn compact(&self) {
        let mut inner = self.write_lock();
        let rv = inner.rv;
        for t in &mut inner.tables {
            t.log.clear();
            t.compacted = rv;
        }
    }

    /// Visits the objects of one resource as they were at version `at`
    /// (latest when `None`), in key order, starting after `after`, limited to
    /// one namespace when `ns` is given. `visit` returns false to stop.
    /// Returns the version the snapshot represents.
    pub fn scan(
        &self,
        res: ResourceId,
        ns: Option<&str>,
        at: Option<u64>,
        after: Option<&str>,
        mut visit: impl FnMut(&Arc<Obj>) -> bool,
    ) -> Result<u64, Expired> {
        let inner = self.read();
        let table = &inner.tables[res];
        let (lo, hi) = ns_range(ns);
        let lo = match after {
            Some(a) => Bound::Excluded(Box::<str>::from(a)),
            None => lo,
        };
        let at = at.unwrap_or(inner.rv).min(inner.rv);
        // Undo, newest first, every change made after `at`.
        let mut overlay: BTreeMap<Box<str>, Option<Arc<Obj>>> = BTreeMap::new();
        if at < inner.rv {
            if at < table.compacted {
                return Err(Expired {
                    requested: at,
                    oldest: table.compacted,
                });
            }
            for e in table.log.iter().rev() {
                if e.rv <= at {
                    break;
                }
                overlay.insert(Box::from(&*e.obj.key), e.prev.clone());
            }
        }
        let mut cur = table.objects.range((lo.clone(), hi.clone())).peekable();
        let mut over = overlay.range((lo, hi)).peekable();
        loop {
            let next: Option<Arc<Obj>> = match (cur.peek(), over.peek()) {
                (None, None) => break,
                (Some(_), None) => cur.next().map(|(_, o)| o.clone()),
                (None, Some(_)) => over.next().and_then(|(_, o)| o.clone()),
                (Some((ck, _)), Some((ok, _))) => {
                    if ck < ok {
                        cur.next().map(|(_, o)| o.clone())
                    } else {
                        if ck == ok {
                            cur.next();
                        }
                        over.next().and_then(|(_, o)| o.clone())
                    }
                }
            };
            if let Some(o) = next
                && !visit(&o)
            {
                break;
            }
        }
        Ok(at)
    }

    /// Visits, in key order, the latest objects carrying the label
    /// `key=value`, limited to one namespace when `ns` is given and
    /// starting after `after`; `visit` returns false to stop. Returns the
    /// version the answer represents. Costs what the label selects, not
    /// what the table holds.
    pub fn scan_label(
        &self,
        res: ResourceId,
        ns: Option<&str>,
        key: &str,
        value: &str,
        after: Option<&str>,
        mut visit: impl FnMut(&Arc<Obj>) -> bool,
    ) -> u64 {
        let inner = self.read();
        let table = &inner.tables[res];
        let (Some(k), Some(v)) = (inner.interner.get(key), inner.interner.get(value)) else {
            return inner.rv;
        };
        let Some(keys) = table.by_label.get(&(k.clone(), v.clone())) else {
            return inner.rv;
        };
        let (lo, hi) = ns_range(ns);
        let lo: Bound<&str> = match (after, &lo) {
            (Some(a), _) => Bound::Excluded(a),
            (None, Bound::Included(l)) => Bound::Included(l),
            _ => Bound::Unbounded,
        };
        let hi: Bound<&str> = match &hi {
            Bound::Excluded(h) => Bound::Excluded(h),
            _ => Bound::Unbounded,
        };
        for k in keys.range::<str, _>((lo, hi)) {
            if let Some(o) = table.objects.get(&**k)
                && !visit(o)
            {
                break;
            }
        }
        inner.rv
    }

    /// Appends to `out` the changes of one resource after version `after`.
    /// Returns the store's current version, up to which the caller has now
    /// seen every change of this resource.
    pub fn events_after(
        &self,
        res: ResourceId,
        after: u64,
        out: &mut Vec<Arc<Event>>,
    ) -> Result<u64, Expired> {
        let inner = self.read();
        let table = &inner.tables[res];
        if after < table.compacted {
            return Err(Expired {
                requested: after,
                oldest: table.compacted,
            });
        }
        let start = table.log.partition_point(|e| e.rv <= after);
        out.extend(table.log.range(start..).cloned());
        Ok(inner.rv)
    }
}

fn build_obj(inner: &mut Inner, key: &str, rv: u64, value: &Value) -> Obj {
    let meta = value.get("metadata");
    let labels: Labels = meta
        .and_then(|m| m.get("labels"))
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| (inner.intern(k), inner.intern(v.as_str().unwrap_or(""))))
                .collect()
        })
        .unwrap_or_default();
    let uid = meta
        .and_then(|m| m.get("uid"))
        .and_then(Value::as_str)
        .map(Arc::from)
        .unwrap_or_else(|| Arc::from(""));
    let owners: Box<[Arc<str>]> = meta
        .and_then(|m| m.get("ownerReferences"))
        .and_then(Value::as_array)
        .map(|refs| {
            refs.iter()
                .filter_map(|r| r.get("uid").and_then(Value::as_str))
                .map(Arc::from)
                .collect()
        })
        .unwrap_or_default();
    let indexed: Box<[(u8, Box<str>)]> = INDEXED_FIELDS
        .iter()
        .enumerate()
        .filter_map(|(i, path)| {
            let mut cur = Some(value);
            for part in path.split('.') {
                cur = cur.and_then(|c| c.get(part));
            }
            let text = match cur? {
                Value::String(s) => s.clone(),
                Value::Bool(b) => b.to_string(),
                Value::Number(n) => n.to_string(),
                _ => return None,
            };
            Some((i as u8, text.into_boxed_str()))
        })
        .collect();
    Obj {
        indexed,
        key: key.into(),
        rv,
        packed: lz4_flex::compress_prepend_size(&serde_json::to_vec(value).unwrap_or_default())
            .into_boxed_slice(),
        labels,
        uid,
        owners,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::ids::PODS;
    use serde_json::json;

    fn pod(name: &str) -> Value {
        json!({"metadata": {"name": name, "namespace": "a", "uid": name, "labels": {"app": "x"}}})
    }

    #[test]
    fn snapshot_reads_undo_later_changes() {
        let s = Store::new(100);
        s.write(PODS, "a/p1", Expect::Absent, Some(pod("p1")))
            .unwrap();
        let rv1 = s.current_rv();
        s.write(PODS, "a/p2", Expect::Absent, Some(pod("p2")))
            .unwrap();
        let o = s.get(PODS, "a/p1").unwrap();
        s.write(PODS, "a/p1", Expect::Version(o.rv), None).unwrap();
        let mut names = vec![];
        s.scan(PODS, Some("a"), Some(rv1), None, |o| {
            names.push(o.name().to_string());
            true
        })
        .unwrap();
        assert_eq!(names, ["p1"]);
        let mut names = vec![];
        s.scan(PODS, None, None, None, |o| {
            names.push(o.name().to_string());
            true
        })
        .unwrap();
        assert_eq!(names, ["p2"]);
    }

    #[test]
    fn old_versions_expire_with_the_window() {
        let s = Store::new(2);
        for i in 0..5 {
            s.write(
                PODS,
                &format!("a/p{i}"),
                Expect::Absent,
                Some(pod(&format!("p{i}"))),
            )
            .unwrap();
        }
        let mut out = vec![];
        assert!(s.events_after(PODS, 2, &mut out).is_err());
        s.events_after(PODS, 4, &mut out).unwrap();
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn label_index_follows_relabels_and_deletes() {
        let s = Store::new(10);
        let labeled = |ns: &str, name: &str, app: &str| json!({"metadata": {"name": name, "namespace": ns, "uid": format!("{ns}/{name}"), "labels": {"app": app}}});
        s.write(PODS, "a/p1", Expect::Absent, Some(labeled("a", "p1", "x")))
            .unwrap();
        s.write(
            PODS,
            "a-b/p2",
            Expect::Absent,
            Some(labeled("a-b", "p2", "x")),
        )
        .unwrap();
        s.write(PODS, "b/p3", Expect::Absent, Some(labeled("b", "p3", "x")))
            .unwrap();
        s.write(PODS, "b/p4", Expect::Absent, Some(labeled("b", "p4", "y")))
            .unwrap();
        let names = |ns: Option<&str>, v: &str, after: Option<&str>| {
            let mut out = vec![];
            s.scan_label(PODS, ns, "app", v, after, |o| {
                out.push(o.key.to_string());
                true
            });
            out
        };
        assert_eq!(names(None, "x", None), ["a-b/p2", "a/p1", "b/p3"]);
        assert_eq!(names(Some("a"), "x", None), ["a/p1"]);
        assert_eq!(names(None, "x", Some("a/p1")), ["b/p3"]);
        assert!(names(None, "nope", None).is_empty());
        let o = s.get(PODS, "b/p3").unwrap();
        s.write(
            PODS,
            "b/p3",
            Expect::Version(o.rv),
            Some(labeled("b", "p3", "y")),
        )
        .unwrap();
        let o = s.get(PODS, "a/p1").unwrap();
        s.write(PODS, "a/p1", Expect::Version(o.rv), None).unwrap();
        assert_eq!(names(None, "x", None), ["a-b/p2"]);
        assert_eq!(names(None, "y", None), ["b/p3", "b/p4"]);
    }

    #[test]
    fn namespace_ranges_do_not_leak_into_similar_names() {
        let s = Store::new(10);
        s.write(PODS, "a/p", Expect::Absent, Some(pod("p")))
            .unwrap();
        s.write(PODS, "a-b/q", Expect::Absent, Some(pod("q")))
            .unwrap();
        s.write(PODS, "ab/r", Expect::Absent, Some(pod("r")))
            .unwrap();
        let mut n = 0;
        s.scan(PODS, Some("a"), None, None, |_| {
            n += 1;
            true
        })
        .unwrap();
        assert_eq!(n, 1);
    }
}

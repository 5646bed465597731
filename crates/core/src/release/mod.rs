//! Releases: moving an app in one environment to a new version, in batches,
//! by a strategy, as a durable state machine. Deciding is separate from
//! doing: this module decides (pure, no IO, no clock); an engine elsewhere
//! applies the [`Action`]s to a runtime, feeds the [`Event`]s back, and
//! stores the [`Release`] as one JSON document after every step.
//!
//! ```text
//!            Start
//!  pending ────────► running batch i ──────────────────────────────┐
//!                    │ stages, in order, each waits for its actions │
//!                    │  in-place: take offline ─► replace ─► wait   │ last batch
//!                    │  dual:     start new ─► wait ─► offline+stop │ done
//!                    │  wait online: failed instance ─► policy      ▼
//!                    │     (recreate │ tolerate │ fail ─► failed)  succeeded
//!                    ▼ batch done
//!     pause: 30s ─► pausing ──(time)──► running batch i+1
//!     pause: manual ─► paused ──Resume─► running batch i+1
//!     Pause (user) ─► paused ──Resume─► where it was
//!
//!  running│pausing│paused ──Abort──► aborting ──(in-flight done; new
//!        instances offline unless keep_online; old ones this batch took
//!        offline back online)──► aborted
//!  any but pending ──Rollback──► rolling back ──(in-flight done; plan back
//!        to the previous version, same batches, no pauses)──► running
//!        (phase rollback) ─► … ─► rolled back │ failed
//! ```
//!
//! Rollback is a second phase of the same release, not a new release: it
//! plans from the fleet as it stands (instances already on the previous
//! version are left alone) with the same batch machinery, skips the pauses,
//! and journals its steps under the `rollback` phase so that step ids never
//! collide with the forward ones.
//!
//! Choices worth knowing:
//! - A failed release stops where it is and leaves every instance as it
//!   is; only an abort takes the release's new instances out of traffic.
//! - Hosts have fixed slots: the desired count is the number of slots, and
//!   dual-deployment runs the new version on the slot's other track.
//! - Kubernetes pods are anonymous to the plan: it counts them per track and
//!   records outcomes per position (`green#3`), linking pods to positions as
//!   they are reported. A scale-down is done only once its pods are reported
//!   gone, so that stale pods are never counted as capacity.
//! - Rolling on Kubernetes is the Deployment's own rollout; a pause between
//!   batches pauses the rollout once the batch's pods are ONLINE (pods the
//!   controller started meanwhile keep going). A tolerated failed pod widens
//!   `maxUnavailable` by one, since the controller would wait for it forever.
//! - A stage that makes no progress for the progress deadline fails its
//!   missing instances (then the policy decides), or the release when there
//!   is no instance to blame.
//!
//! [`step`] is the pure form (`&Release` in, a new one out); an engine
//! holding the release in memory calls [`Release::apply`], the same step in
//! place, which avoids copying thousands of instances per event (about
//! 30 µs per event for 3000 host instances in an optimised build, against
//! about 3 ms with the copy).
//!
//! The runtime side: core holds only the data ([`Action`], [`Command`],
//! [`InstanceEvent`]). The async `Runtime` trait (apply an action; a stream
//! of instance lifecycle events, pushed by watches or host agents) belongs
//! to the engine crate, which has tokio; hosts and Kubernetes implement it
//! there. Its contract, stated here because the machine relies on it:
//! - before [`Event::Start`], the instances it already knows are reported
//!   (on Kubernetes, the app's pods from the cache);
//! - every [`Command`] is idempotent and is reported with
//!   [`Event::Done`] (or [`Event::ActionFailed`]) under its [`StepId`];
//! - `TakeOffline` holds an instance out of traffic, across restarts, until
//!   `BringOnline`;
//! - events about one instance arrive in the order they happened (a
//!   completion may overtake them or lag behind);
//! - hosts report the generation of the start command in
//!   [`InstanceEvent::generation`];
//! - the engine delivers [`Event::Tick`] at the times named by `WaitOnline`
//!   and `PauseUntil`, and after a restart re-applies `release.pending`.

pub mod action;
pub mod machine;
pub mod plan;
pub mod policy;
pub mod summary;

pub use action::{
    Action, Command, Event, Input, InstanceChange, InstanceEvent, InstanceId, Instances, Outcome,
    Phase, StepId, Timestamp, Track, Version,
};
pub use machine::{Cursor, PauseReason, Release, Status, Transition, step};
pub use plan::{
    Awaited, BatchPlan, Fleet, HostInstance, InstanceState, PlanError, PodState, ReleasePlan,
    ReleaseSettings, Stage, TrackState, batch_sizes, plan,
};
pub use policy::{FailedInstancePolicy, InstanceOutcome, OutcomeState, PolicyDecision, decide};
pub use summary::{InstanceSummary, Summary, TrackSummary, VersionSummary, summarize};

//! The failed-instance policy: what a release does when one of its new
//! instances fails to come ONLINE (crash, image pull timeout, full pool,
//! progress deadline), and the per-instance record it decides on.
//!
//! ```text
//! instance failed ─► decide(policy, record, tolerated so far, total)
//!     fail                              ─► FailRelease
//!     recreate {max_attempts}  attempts < max ─► Recreate {attempt + 1}
//!                              otherwise      ─► FailRelease
//!     tolerate {max_ratio}  tolerated + 1 <= floor(ratio * total) ─► Tolerate
//!                           otherwise                             ─► FailRelease
//! ```

use serde::{Deserialize, Serialize};

use super::action::InstanceId;
use crate::profile::{FailedInstancePolicyKind, FailedInstances};

/// The policy, with its parameter.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "policy", rename_all = "kebab-case")]
pub enum FailedInstancePolicy {
    /// The release fails at the first failed instance.
    Fail,
    /// A failed instance is recreated until it has had `max_attempts`.
    Recreate {
        /// Attempts per instance, the first start included.
        max_attempts: u32,
    },
    /// Up to `max_ratio` of all instances may stay failed.
    Tolerate {
        /// A fraction above 0, at most 1.
        max_ratio: f64,
    },
}

impl FailedInstancePolicy {
    /// The policy as written in a profile (`fail` when absent). A profile
    /// that passed validation always has the parameter its policy needs;
    /// without it, recreate makes one attempt and tolerate tolerates none.
    pub fn of(written: Option<&FailedInstances>) -> Self {
        let Some(f) = written else {
            return Self::Fail;
        };
        match f.policy.unwrap_or(FailedInstancePolicyKind::Fail) {
            FailedInstancePolicyKind::Fail => Self::Fail,
            FailedInstancePolicyKind::Recreate => Self::Recreate {
                max_attempts: f.max_attempts.unwrap_or(1),
            },
            FailedInstancePolicyKind::Tolerate => Self::Tolerate {
                max_ratio: f.max_ratio.unwrap_or(0.0),
            },
        }
    }

    /// How many failed instances out of `total` may be tolerated.
    pub fn tolerance(&self, total: u32) -> u32 {
        match self {
            // The ratio is validated to (0, 1]; the product fits in u32.
            Self::Tolerate { max_ratio } => {
                (max_ratio.clamp(0.0, 1.0) * f64::from(total) + 1e-9).floor() as u32
            }
            _ => 0,
        }
    }
}

/// Where a new instance stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutcomeState {
    /// Its batch has not started it yet.
    Waiting,
    /// Started (or recreated), not yet ONLINE.
    Starting,
    /// Failed; the policy has not decided yet.
    Failed,
    /// Final: ONLINE with the new version.
    Online,
    /// Final: failed, and accepted by the `tolerate` policy.
    Tolerated,
    /// Final: failed, and the release failed because of it.
    Fatal,
}

/// The record of one new instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceOutcome {
    /// The instance (a host instance id, or a position `<track>#<n>`).
    pub instance: InstanceId,
    /// Kubernetes: the pod currently filling this position.
    pub pod: Option<InstanceId>,
    /// The batch that brings it.
    pub batch: u32,
    /// Starts so far, the first included.
    pub attempts: u32,
    /// The last failure's message.
    pub last_error: Option<String>,
    /// Where it stands.
    pub state: OutcomeState,
    /// Hosts: the generation of the last start issued for it; news of an
    /// earlier process is stale even before that start is confirmed.
    #[serde(default)]
    pub generation: Option<u64>,
}

impl InstanceOutcome {
    /// A record for an instance its batch has not started.
    pub fn waiting(instance: InstanceId, batch: u32) -> Self {
        Self {
            instance,
            pod: None,
            batch,
            attempts: 0,
            last_error: None,
            state: OutcomeState::Waiting,
            generation: None,
        }
    }
}

/// What the policy decides for one failed instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "kebab-case")]
pub enum PolicyDecision {
    /// Start it again; this will be attempt `attempt`.
    Recreate {
        /// The attempt number to make.
        attempt: u32,
    },
    /// Accept it failed and go on.
    Tolerate,
    /// Fail the release.
    FailRelease {
        /// A sentence for the release page.
        reason: String,
    },
}

/// Decides about `failed` under `policy`, given how many instances are
/// tolerated already and how many the release brings in total.
pub fn decide(
    policy: &FailedInstancePolicy,
    failed: &InstanceOutcome,
    tolerated: u32,
    total: u32,
) -> PolicyDecision {
    let error = failed.last_error.as_deref().unwrap_or("failed");
    let id = &failed.instance;
    match policy {
        FailedInstancePolicy::Fail => PolicyDecision::FailRelease {
            reason: format!("instance {id} failed: {error} (policy: fail)"),
        },
        FailedInstancePolicy::Recreate { max_attempts } if failed.attempts < *max_attempts => {
            PolicyDecision::Recreate {
                attempt: failed.attempts + 1,
            }
        }
        FailedInstancePolicy::Recreate { max_attempts } => PolicyDecision::FailRelease {
            reason: format!(
                "instance {id} failed after {} of {max_attempts} attempts: {error}",
                failed.attempts
            ),
        },
        FailedInstancePolicy::Tolerate { .. } if tolerated < policy.tolerance(total) => {
            PolicyDecision::Tolerate
        }
        FailedInstancePolicy::Tolerate { max_ratio } => PolicyDecision::FailRelease {
            reason: format!(
                "instance {id} failed: {error}; {} of {total} failed instances would exceed the tolerated ratio {max_ratio}",
                tolerated + 1
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(attempts: u32) -> InstanceOutcome {
        InstanceOutcome {
            instance: InstanceId("vm-1:0@green".into()),
            pod: None,
            batch: 0,
            attempts,
            last_error: Some("image pull timed out".into()),
            state: OutcomeState::Failed,
            generation: Some(1),
        }
    }

    #[test]
    fn fail_fails_at_the_first_failure_and_names_the_instance() {
        match decide(&FailedInstancePolicy::Fail, &failed(1), 0, 10) {
            PolicyDecision::FailRelease { reason } => {
                assert!(reason.contains("vm-1:0@green"), "{reason}");
                assert!(reason.contains("image pull timed out"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn recreate_counts_attempts_up_to_the_maximum() {
        let policy = FailedInstancePolicy::Recreate { max_attempts: 3 };
        assert_eq!(
            decide(&policy, &failed(1), 0, 10),
            PolicyDecision::Recreate { attempt: 2 }
        );
        assert_eq!(
            decide(&policy, &failed(2), 0, 10),
            PolicyDecision::Recreate { attempt: 3 }
        );
        match decide(&policy, &failed(3), 0, 10) {
            PolicyDecision::FailRelease { reason } => {
                assert!(reason.contains("3 of 3"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn recreate_with_one_attempt_is_fail() {
        let policy = FailedInstancePolicy::Recreate { max_attempts: 1 };
        assert!(matches!(
            decide(&policy, &failed(1), 0, 10),
            PolicyDecision::FailRelease { .. }
        ));
    }

    #[test]
    fn tolerate_accepts_up_to_the_ratio_of_all_instances() {
        let policy = FailedInstancePolicy::Tolerate { max_ratio: 0.2 };
        assert_eq!(policy.tolerance(10), 2);
        assert_eq!(decide(&policy, &failed(1), 0, 10), PolicyDecision::Tolerate);
        assert_eq!(decide(&policy, &failed(1), 1, 10), PolicyDecision::Tolerate);
        assert!(matches!(
            decide(&policy, &failed(1), 2, 10),
            PolicyDecision::FailRelease { .. }
        ));
    }

    #[test]
    fn tolerance_rounds_down_and_survives_float_error() {
        assert_eq!(
            FailedInstancePolicy::Tolerate { max_ratio: 0.1 }.tolerance(9),
            0
        );
        // 0.3 * 10 is 2.9999999999999996 in binary floating point.
        assert_eq!(
            FailedInstancePolicy::Tolerate { max_ratio: 0.3 }.tolerance(10),
            3
        );
        assert_eq!(
            FailedInstancePolicy::Tolerate { max_ratio: 1.0 }.tolerance(7),
            7
        );
        assert_eq!(FailedInstancePolicy::Fail.tolerance(7), 0);
    }

    #[test]
    fn policy_from_the_profile() {
        assert_eq!(FailedInstancePolicy::of(None), FailedInstancePolicy::Fail);
        let written = FailedInstances {
            policy: Some(FailedInstancePolicyKind::Recreate),
            max_attempts: Some(4),
            max_ratio: None,
        };
        assert_eq!(
            FailedInstancePolicy::of(Some(&written)),
            FailedInstancePolicy::Recreate { max_attempts: 4 }
        );
        let written = FailedInstances {
            policy: Some(FailedInstancePolicyKind::Tolerate),
            max_attempts: None,
            max_ratio: Some(0.5),
        };
        assert_eq!(
            FailedInstancePolicy::of(Some(&written)),
            FailedInstancePolicy::Tolerate { max_ratio: 0.5 }
        );
    }
}

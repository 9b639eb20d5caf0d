//! Following a model rollout: which versions pods serve, and each version's
//! phase, as a pure function.
//!
//! Live (pods serve it, or it is `spec.version`) → Draining (no pods left;
//! the grace period runs) → Sweeping (its keys are being deleted) → Swept.
//! A version that gets pods again (a rollback) goes back to Live from Draining
//! or Sweeping, and its pending or running sweep is cancelled. Old and new
//! versions serve side by side during a rolling update, so nothing is swept
//! while any pod still serves a version.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::crd::cache_policy::InvalidationStrategy;
use crate::crd::model_cache::{VersionPhase, VersionStatus};

/// Swept versions kept in status, newest first, as history.
const SWEPT_HISTORY: usize = 5;

/// What the phases are computed from.
#[derive(Debug, Clone)]
pub struct RolloutInput<'a> {
    /// `spec.version`.
    pub desired: &'a str,
    /// Pods serving each version, from the workload's pods.
    pub pods: &'a BTreeMap<String, i32>,
    /// The ready ones among them; `None` when no workload is followed.
    pub ready_pods: Option<&'a BTreeMap<String, i32>>,
    /// The versions in status after the last reconcile.
    pub previous: &'a [VersionStatus],
    /// How long a version drains before it is swept.
    pub grace_period_seconds: i64,
    /// How retired versions' keys go.
    pub strategy: InvalidationStrategy,
    /// Sweeps that completed since the last reconcile: version → keys deleted.
    pub finished_sweeps: &'a BTreeMap<String, u64>,
    /// The time of this reconcile.
    pub now: Timestamp,
}

/// The new phases and what to do about sweeps.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RolloutPlan {
    /// Every version and its phase, for status.
    pub versions: Vec<VersionStatus>,
    /// Versions whose sweep must start now.
    pub start_sweeps: Vec<String>,
    /// Versions whose pending or running sweep a rollback cancels.
    pub cancel_sweeps: Vec<String>,
    /// (version, from, to) for Events.
    pub transitions: Vec<(String, Option<VersionPhase>, VersionPhase)>,
}

impl RolloutPlan {
    /// Whether a version is on its way out, so the controller looks again soon.
    pub fn in_motion(&self) -> bool {
        self.versions
            .iter()
            .any(|v| matches!(v.phase, VersionPhase::Draining | VersionPhase::Sweeping))
    }

    /// The phase of `version`, if it is known.
    pub fn phase(&self, version: &str) -> Option<VersionPhase> {
        self.versions
            .iter()
            .find(|v| v.version == version)
            .map(|v| v.phase)
    }
}

/// The versions' phases and the sweeps to start or cancel; pure.
pub fn plan_rollout(input: &RolloutInput) -> RolloutPlan {
    let mut plan = RolloutPlan::default();
    let names: BTreeSet<&str> = input
        .previous
        .iter()
        .map(|v| v.version.as_str())
        .chain(input.pods.keys().map(String::as_str))
        .chain(std::iter::once(input.desired))
        .collect();
    let grace = SignedDuration::from_secs(input.grace_period_seconds.max(0));
    for name in names {
        let prev = input.previous.iter().find(|v| v.version == name);
        let pods = input.pods.get(name).copied().unwrap_or(0);
        let served = pods > 0 || name == input.desired;
        let since = prev.and_then(|p| p.since.as_ref()).map(|t| t.0);
        let mut keys = prev.and_then(|p| p.keys);
        let phase = match (prev.map(|p| p.phase), served) {
            (Some(VersionPhase::Draining | VersionPhase::Sweeping), true) => {
                plan.cancel_sweeps.push(name.to_owned());
                // Its count was taken for the sweep; a live version's keys change.
                keys = None;
                VersionPhase::Live
            }
            (_, true) => VersionPhase::Live,
            (None, false) => continue,
            (Some(VersionPhase::Live), false) => VersionPhase::Draining,
            (Some(VersionPhase::Draining), false) => {
                let drained_since = since.unwrap_or(input.now);
                let due = drained_since
                    .checked_add(grace)
                    .map(|t| t <= input.now)
                    .unwrap_or(true);
                match (due, input.strategy) {
                    (false, _) => VersionPhase::Draining,
                    // Nothing to delete: expiry takes the keys.
                    (true, InvalidationStrategy::TtlOnly) => VersionPhase::Swept,
                    (true, _) => {
                        plan.start_sweeps.push(name.to_owned());
                        VersionPhase::Sweeping
                    }
                }
            }
            (Some(VersionPhase::Sweeping), false) => match input.finished_sweeps.get(name) {
                Some(deleted) => {
                    keys = Some(i64::try_from(*deleted).unwrap_or(i64::MAX));
                    VersionPhase::Swept
                }
                None => VersionPhase::Sweeping,
            },
            (Some(VersionPhase::Swept), false) => VersionPhase::Swept,
        };
        let changed = prev.map(|p| p.phase) != Some(phase);
        if changed {
            plan.transitions
                .push((name.to_owned(), prev.map(|p| p.phase), phase));
        }
        plan.versions.push(VersionStatus {
            version: name.to_owned(),
            phase,
            since: Some(Time(if changed {
                input.now
            } else {
                since.unwrap_or(input.now)
            })),
            pods,
            ready_pods: input.ready_pods.map(|r| r.get(name).copied().unwrap_or(0)),
            keys,
            // Versions are immutable: a digest once read stays true.
            manifest_digest: prev.and_then(|p| p.manifest_digest.clone()),
        });
    }
    // Keep the newest few swept versions as history; drop the rest.
    let mut swept: Vec<usize> = (0..plan.versions.len())
        .filter(|i| plan.versions[*i].phase == VersionPhase::Swept)
        .collect();
    swept.sort_by_key(|i| std::cmp::Reverse(plan.versions[*i].since.as_ref().map(|t| t.0)));
    let drop: BTreeSet<usize> = swept.into_iter().skip(SWEPT_HISTORY).collect();
    let mut i = 0;
    plan.versions.retain(|_| {
        let keep = !drop.contains(&i);
        i += 1;
        keep
    });
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    fn run(
        desired: &str,
        pods: &[(&str, i32)],
        previous: &[VersionStatus],
        finished: &[(&str, u64)],
        now: i64,
    ) -> RolloutPlan {
        let pods: BTreeMap<String, i32> = pods.iter().map(|(v, n)| (v.to_string(), *n)).collect();
        let finished: BTreeMap<String, u64> =
            finished.iter().map(|(v, n)| (v.to_string(), *n)).collect();
        plan_rollout(&RolloutInput {
            desired,
            pods: &pods,
            ready_pods: None,
            previous,
            grace_period_seconds: 300,
            strategy: InvalidationStrategy::VersionKeyed,
            finished_sweeps: &finished,
            now: at(now),
        })
    }

    #[test]
    fn a_rollout_drains_then_sweeps_after_the_grace_period() {
        let p = run("v1", &[("v1", 3)], &[], &[], 0);
        assert_eq!(p.phase("v1"), Some(VersionPhase::Live));

        // Rolling update: both serve.
        let p = run("v2", &[("v1", 2), ("v2", 1)], &p.versions, &[], 10);
        assert_eq!(
            (p.phase("v1"), p.phase("v2")),
            (Some(VersionPhase::Live), Some(VersionPhase::Live))
        );

        // The last v1 pod is gone: Draining, and nothing is swept yet.
        let p = run("v2", &[("v2", 3)], &p.versions, &[], 20);
        assert_eq!(p.phase("v1"), Some(VersionPhase::Draining));
        assert!(p.start_sweeps.is_empty() && p.in_motion());
        let p = run("v2", &[("v2", 3)], &p.versions, &[], 319);
        assert_eq!(
            p.phase("v1"),
            Some(VersionPhase::Draining),
            "grace not over"
        );

        let p = run("v2", &[("v2", 3)], &p.versions, &[], 320);
        assert_eq!(p.phase("v1"), Some(VersionPhase::Sweeping));
        assert_eq!(p.start_sweeps, vec!["v1"]);

        let p = run("v2", &[("v2", 3)], &p.versions, &[], 330);
        assert_eq!(p.phase("v1"), Some(VersionPhase::Sweeping));
        assert!(p.start_sweeps.is_empty(), "started once");

        let p = run("v2", &[("v2", 3)], &p.versions, &[("v1", 12345)], 340);
        assert_eq!(p.phase("v1"), Some(VersionPhase::Swept));
        let v1 = p.versions.iter().find(|v| v.version == "v1").unwrap();
        assert_eq!((v1.keys, v1.pods), (Some(12345), 0));
        assert!(!p.in_motion());
        assert_eq!(
            p.transitions,
            vec![(
                "v1".into(),
                Some(VersionPhase::Sweeping),
                VersionPhase::Swept
            )]
        );
    }

    #[test]
    fn a_rollback_cancels_a_pending_or_running_sweep() {
        let live = run("v1", &[("v1", 3)], &[], &[], 0);
        let draining = run("v2", &[("v2", 3)], &live.versions, &[], 10);
        assert_eq!(draining.phase("v1"), Some(VersionPhase::Draining));
        let back = run("v1", &[("v2", 3)], &draining.versions, &[], 20);
        assert_eq!(back.phase("v1"), Some(VersionPhase::Live));
        assert_eq!(back.cancel_sweeps, vec!["v1"]);

        let sweeping = run("v2", &[("v2", 3)], &draining.versions, &[], 400);
        assert_eq!(sweeping.phase("v1"), Some(VersionPhase::Sweeping));
        let back = run("v2", &[("v1", 1), ("v2", 2)], &sweeping.versions, &[], 401);
        assert_eq!(
            back.phase("v1"),
            Some(VersionPhase::Live),
            "pods serve v1 again"
        );
        assert_eq!(back.cancel_sweeps, vec!["v1"]);
    }

    #[test]
    fn ready_pods_are_reported_only_where_a_workload_is_followed() {
        let pods = BTreeMap::from([("v1".to_string(), 2), ("v2".to_string(), 3)]);
        let ready = BTreeMap::from([("v1".to_string(), 2), ("v2".to_string(), 1)]);
        let mut input = RolloutInput {
            desired: "v2",
            pods: &pods,
            ready_pods: Some(&ready),
            previous: &[],
            grace_period_seconds: 0,
            strategy: InvalidationStrategy::VersionKeyed,
            finished_sweeps: &BTreeMap::new(),
            now: at(0),
        };
        let counts = |p: &RolloutPlan| -> Vec<(i32, Option<i32>)> {
            p.versions.iter().map(|v| (v.pods, v.ready_pods)).collect()
        };
        assert_eq!(
            counts(&plan_rollout(&input)),
            vec![(2, Some(2)), (3, Some(1))]
        );
        input.ready_pods = None;
        assert_eq!(counts(&plan_rollout(&input)), vec![(2, None), (3, None)]);
    }

    #[test]
    fn ttl_only_never_sweeps_and_history_is_bounded() {
        let pods = BTreeMap::from([("v9".to_string(), 1)]);
        let previous: Vec<VersionStatus> = (0..8)
            .map(|i| VersionStatus {
                version: format!("v{i}"),
                phase: if i == 0 {
                    VersionPhase::Draining
                } else {
                    VersionPhase::Swept
                },
                since: Some(Time(at(i))),
                pods: 0,
                ready_pods: None,
                keys: None,
                manifest_digest: None,
            })
            .collect();
        let p = plan_rollout(&RolloutInput {
            desired: "v9",
            pods: &pods,
            ready_pods: None,
            previous: &previous,
            grace_period_seconds: 0,
            strategy: InvalidationStrategy::TtlOnly,
            finished_sweeps: &BTreeMap::new(),
            now: at(100),
        });
        assert!(p.start_sweeps.is_empty());
        assert_eq!(
            p.phase("v0"),
            Some(VersionPhase::Swept),
            "TTLOnly: swept by expiry"
        );
        let swept: Vec<&str> = p
            .versions
            .iter()
            .filter(|v| v.phase == VersionPhase::Swept)
            .map(|v| v.version.as_str())
            .collect();
        assert_eq!(swept.len(), SWEPT_HISTORY);
        assert!(
            swept.contains(&"v0") && swept.contains(&"v7") && !swept.contains(&"v1"),
            "{swept:?}"
        );
    }
}

//! Kubernetes Events for what an operator must know: transitions, not every
//! reconcile. Which Events to publish is a pure function of the old and new
//! status (and the rollout's phase changes); publishing is best effort, since
//! status already says the same.

use kube::Resource;
use kube::runtime::events::{Event, EventType, Recorder};

use crate::crd::condition::condition_status;
use crate::crd::model_cache::VersionPhase;
use crate::crd::{ModelCache, ModelCacheStatus};

use crate::controller::rollout::RolloutPlan;
use crate::controller::status::{CONFIG_APPLIED, FRAGMENTED, Observation, READY, SPEC_VALID};

/// Events are cut to this many characters (the API server's limit is 1 KiB).
const NOTE_CHARS: usize = 1000;

/// Events for condition changes between `old` and `new`, and for config this
/// reconcile set.
pub fn status_events(
    old: Option<&ModelCacheStatus>,
    new: &ModelCacheStatus,
    obs: &Observation,
) -> Vec<Event> {
    let old = old.map(|s| s.conditions.as_slice()).unwrap_or(&[]);
    let changed = |t: &str, to: &str| {
        condition_status(old, t) != Some(to) && condition_status(&new.conditions, t) == Some(to)
    };
    let message = |t: &str| {
        new.conditions
            .iter()
            .find(|c| c.type_ == t)
            .map(|c| (c.reason.clone(), c.message.clone()))
            .unwrap_or_default()
    };
    let mut events = Vec::new();
    if changed(SPEC_VALID, "False") {
        let (reason, note) = message(SPEC_VALID);
        events.push((EventType::Warning, reason, note));
    }
    if changed(READY, "True") {
        events.push((EventType::Normal, "RedisReady".into(), message(READY).1));
    }
    if condition_status(old, READY) == Some("True") && changed(READY, "False") {
        let (reason, note) = message(READY);
        events.push((EventType::Warning, reason, note));
    }
    if let Some(config) = &obs.config
        && !config.changed.is_empty()
    {
        let note = format!("CONFIG SET {}", config.changed.join(", "));
        events.push((EventType::Normal, "ConfigApplied".into(), note));
    }
    if changed(FRAGMENTED, "True") {
        let note = message(FRAGMENTED).1;
        events.push((EventType::Warning, "Fragmented".into(), note));
    }
    if changed(CONFIG_APPLIED, "False") {
        let note = message(CONFIG_APPLIED).1;
        events.push((EventType::Warning, "ConfigDrift".into(), note));
    }
    events
        .into_iter()
        .map(|(type_, reason, note)| Event {
            type_,
            reason,
            note: Some(note.chars().take(NOTE_CHARS).collect()),
            action: "Reconcile".into(),
            secondary: None,
        })
        .collect()
}

/// Events for version phase changes.
pub fn rollout_events(plan: &RolloutPlan) -> Vec<Event> {
    let mut events = Vec::new();
    for (version, from, to) in &plan.transitions {
        let (reason, note) = match (from, to) {
            (Some(VersionPhase::Draining | VersionPhase::Sweeping), VersionPhase::Live) => (
                "SweepCancelled",
                format!("version {version} is served again (a rollback); its sweep is cancelled"),
            ),
            (_, VersionPhase::Live) => ("VersionLive", format!("version {version} is served")),
            (_, VersionPhase::Draining) => (
                "VersionDraining",
                format!(
                    "no pod serves version {version}; its keys are swept after the grace period"
                ),
            ),
            (_, VersionPhase::Sweeping) => (
                "SweepStarted",
                format!("sweeping the keys of version {version}"),
            ),
            (_, VersionPhase::Swept) => {
                let keys = plan
                    .versions
                    .iter()
                    .find(|v| &v.version == version)
                    .and_then(|v| v.keys)
                    .map(|k| format!("{k} keys"))
                    .unwrap_or_else(|| "keys left to expire".into());
                ("VersionSwept", format!("version {version} swept: {keys}"))
            }
        };
        events.push(Event {
            type_: EventType::Normal,
            reason: reason.into(),
            note: Some(note),
            action: "Rollout".into(),
            secondary: None,
        });
    }
    events
}

/// Publishes the Events on the ModelCache; a failure is logged, not returned.
pub async fn publish(recorder: &Recorder, mc: &ModelCache, events: Vec<Event>) {
    let reference = mc.object_ref(&());
    for event in events {
        if let Err(e) = recorder.publish(&event, &reference).await {
            tracing::warn!(error = %e, reason = %event.reason, "failed to publish an Event");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::model_cache::VersionStatus;

    #[test]
    fn a_rollback_is_announced_as_a_cancelled_sweep() {
        let plan = RolloutPlan {
            versions: vec![VersionStatus {
                version: "v1".into(),
                phase: VersionPhase::Swept,
                since: None,
                pods: 0,
                ready_pods: None,
                keys: Some(7),
                manifest_digest: None,
            }],
            transitions: vec![
                (
                    "v1".into(),
                    Some(VersionPhase::Sweeping),
                    VersionPhase::Live,
                ),
                ("v2".into(), None, VersionPhase::Live),
                (
                    "v1".into(),
                    Some(VersionPhase::Sweeping),
                    VersionPhase::Swept,
                ),
            ],
            ..Default::default()
        };
        let got: Vec<(String, String)> = rollout_events(&plan)
            .into_iter()
            .map(|e| (e.reason, e.note.unwrap_or_default()))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "SweepCancelled".into(),
                    "version v1 is served again (a rollback); its sweep is cancelled".into()
                ),
                ("VersionLive".into(), "version v2 is served".into()),
                ("VersionSwept".into(), "version v1 swept: 7 keys".into()),
            ]
        );
    }
}

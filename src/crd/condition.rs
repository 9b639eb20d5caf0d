//! Standard Kubernetes conditions, shared by both kinds' status.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::{Schema, SchemaGenerator};

/// Schema for a `conditions` list: a list-map keyed by `type`, so that server-side
/// apply merges conditions by type instead of replacing the whole list.
pub fn conditions_schema(generator: &mut SchemaGenerator) -> Schema {
    let mut schema = generator.subschema_for::<Vec<Condition>>();
    schema.insert("x-kubernetes-list-type".to_owned(), "map".into());
    schema.insert(
        "x-kubernetes-list-map-keys".to_owned(),
        serde_json::json!(["type"]),
    );
    schema
}

/// Sets the condition of `type_` in `conditions`. `lastTransitionTime` moves only
/// when the status changes, as the Kubernetes API conventions ask, so that a
/// reconcile that observes the same state does not rewrite it.
pub fn set_condition(conditions: &mut Vec<Condition>, mut condition: Condition) {
    match conditions.iter_mut().find(|c| c.type_ == condition.type_) {
        Some(existing) => {
            if existing.status == condition.status {
                condition.last_transition_time = existing.last_transition_time.clone();
            }
            *existing = condition;
        }
        None => conditions.push(condition),
    }
}

/// Builds a condition; `status` is `"True"`, `"False"` or `"Unknown"`.
pub fn condition(
    type_: &str,
    status: &str,
    reason: &str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
    now: Time,
) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message: message.into(),
        observed_generation,
        last_transition_time: now,
    }
}

/// The status of the condition of `type_`, if present.
pub fn condition_status<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a str> {
    conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(seconds: i64) -> Time {
        Time(Timestamp::from_second(seconds).unwrap())
    }

    #[test]
    fn transition_time_moves_only_when_status_changes() {
        let mut conditions = Vec::new();
        set_condition(
            &mut conditions,
            condition("Ready", "False", "Starting", "", Some(1), at(10)),
        );
        set_condition(
            &mut conditions,
            condition("Ready", "False", "Starting", "again", Some(2), at(20)),
        );
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].last_transition_time, at(10));
        assert_eq!(conditions[0].message, "again");
        assert_eq!(conditions[0].observed_generation, Some(2));

        set_condition(
            &mut conditions,
            condition("Ready", "True", "RedisReady", "", Some(2), at(30)),
        );
        assert_eq!(conditions[0].last_transition_time, at(30));
        assert_eq!(condition_status(&conditions, "Ready"), Some("True"));
    }

    #[test]
    fn conditions_of_other_types_are_kept() {
        let mut conditions = Vec::new();
        set_condition(
            &mut conditions,
            condition("Ready", "True", "R", "", None, at(1)),
        );
        set_condition(
            &mut conditions,
            condition("ConfigApplied", "False", "C", "", None, at(2)),
        );
        assert_eq!(conditions.len(), 2);
        assert_eq!(condition_status(&conditions, "Ready"), Some("True"));
        assert_eq!(condition_status(&conditions, "Missing"), None);
    }
}

//! Status conditions, built purely from what reconcile found. Conditions are
//! `metav1.Condition`; `lastTransitionTime` changes only when the status flips.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Condition type: a valid token is in the Secret.
pub const READY: &str = "Ready";
/// Condition type: a mint is in progress or failing.
pub const ISSUING: &str = "Issuing";
/// A token was used from an address `spec.usage` does not expect (present
/// once usage tracking has seen a use).
pub const UNEXPECTED_SOURCE: &str = "UnexpectedSource";
/// No workload uses the Secret and the token was not used for
/// `spec.usage.unusedAfter` (present when that is set).
pub const UNUSED: &str = "Unused";
/// A token was used after the operator revoked or withdrew it (present once
/// usage tracking has seen a use).
pub const USED_AFTER_REVOCATION: &str = "UsedAfterRevocation";

/// One condition as reconcile wants it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Want {
    pub type_: &'static str,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

impl Want {
    pub fn new(
        type_: &'static str,
        status: bool,
        reason: impl AsRef<str>,
        message: impl Into<String>,
    ) -> Self {
        Want {
            type_,
            status,
            reason: reason.as_ref().to_string(),
            message: message.into(),
        }
    }
}

/// Merges `want` into `existing`, keeping `lastTransitionTime` when the
/// status did not flip. Other condition types are kept as they are.
pub fn merge(
    existing: &[Condition],
    want: &[Want],
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    let mut out: Vec<Condition> = existing
        .iter()
        .filter(|c| !want.iter().any(|w| w.type_ == c.type_))
        .cloned()
        .collect();
    for w in want {
        let status = if w.status { "True" } else { "False" }.to_string();
        let previous = existing.iter().find(|c| c.type_ == w.type_);
        let last_transition_time = match previous {
            Some(p) if p.status == status => p.last_transition_time.clone(),
            _ => Time(now),
        };
        out.push(Condition {
            type_: w.type_.to_string(),
            status,
            reason: w.reason.clone(),
            message: w.message.clone(),
            observed_generation: generation,
            last_transition_time,
        });
    }
    out.sort_by(|a, b| a.type_.cmp(&b.type_));
    out
}

/// Finds a condition by type.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// The JSON merge patch (RFC 7386) that turns `base` into `desired`: keys
/// that differ, `null` for keys `desired` lacks, nested objects diffed,
/// arrays and scalars replaced whole. Empty when they are equal. Sent
/// with the base's resourceVersion, it writes exactly the difference: a
/// merge patch costs the API server much less than a server-side apply
/// (no YAML parse, no structured merge), and status is its busiest write.
pub fn merge_patch(base: &serde_json::Value, desired: &serde_json::Value) -> serde_json::Value {
    use serde_json::{Map, Value};
    match (base, desired) {
        (Value::Object(b), Value::Object(d)) => {
            let mut patch = Map::new();
            for (k, dv) in d {
                match b.get(k) {
                    Some(bv) if bv == dv => {}
                    Some(bv @ Value::Object(_)) if dv.is_object() => {
                        patch.insert(k.clone(), merge_patch(bv, dv));
                    }
                    _ => {
                        patch.insert(k.clone(), dv.clone());
                    }
                }
            }
            for k in b.keys().filter(|k| !d.contains_key(*k)) {
                patch.insert(k.clone(), Value::Null);
            }
            Value::Object(patch)
        }
        _ => desired.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_applied_to_base_gives_desired() {
        use serde_json::json;
        let cases = [
            // (base, desired, the patch)
            (json!({}), json!({}), json!({})),
            (json!({"a": 1}), json!({"a": 1}), json!({})),
            (json!({"a": 1}), json!({"a": 2}), json!({"a": 2})),
            (json!({"a": 1, "b": 2}), json!({"a": 1}), json!({"b": null})),
            (
                json!({"t": {"x": 1, "y": 2}}),
                json!({"t": {"x": 1}}),
                json!({"t": {"y": null}}),
            ),
            (
                json!({"h": [{"r": 1}, {"r": 2}]}),
                json!({"h": [{"r": 2}]}),
                json!({"h": [{"r": 2}]}),
            ),
            (
                json!({"t": 1}),
                json!({"t": {"x": 1}}),
                json!({"t": {"x": 1}}),
            ),
            (json!({"t": {"x": 1}}), json!({"t": 3}), json!({"t": 3})),
        ];
        for (base, desired, want) in cases {
            let patch = merge_patch(&base, &desired);
            assert_eq!(patch, want, "{base} -> {desired}");
            let mut applied = base.clone();
            json_patch::merge(&mut applied, &patch);
            assert_eq!(applied, desired, "{base} + {patch}");
        }
    }

    #[test]
    fn transition_time_changes_only_on_flip() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let t1: Timestamp = "2026-01-01T00:05:00Z".parse().unwrap();
        let first = merge(
            &[],
            &[Want::new(READY, false, "Pending", "minting")],
            Some(1),
            t0,
        );
        let same = merge(
            &first,
            &[Want::new(READY, false, "IssuerNotFound", "x")],
            Some(2),
            t1,
        );
        assert_eq!(same[0].last_transition_time, Time(t0));
        assert_eq!(same[0].reason, "IssuerNotFound");
        assert_eq!(same[0].observed_generation, Some(2));
        let flipped = merge(
            &same,
            &[Want::new(READY, true, "TokenValid", "ok")],
            Some(2),
            t1,
        );
        assert_eq!(flipped[0].last_transition_time, Time(t1));
    }

    #[test]
    fn other_conditions_are_kept_and_sorted() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let a = merge(&[], &[Want::new(READY, true, "TokenValid", "")], None, t0);
        let b = merge(&a, &[Want::new(ISSUING, false, "Idle", "")], None, t0);
        let types: Vec<_> = b.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, vec![ISSUING, READY]);
    }
}

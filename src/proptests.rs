//! Property tests: whatever a namespace admin writes (spec, Secret
//! annotations and data, trigger annotations) and whatever an issuer
//! answers, validation, planning and Secret rendering never panic.
//!
//! Specs are generated as JSON (any shape the API server could store,
//! including values admission would refuse today: objects admitted under an
//! older CRD), decoded the way the watch decodes them, then checked and
//! planned.

use std::collections::BTreeMap;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::ObjectMeta;
use proptest::prelude::*;
use secrecy::SecretString;
use serde_json::{Value, json};

use crate::controller::decide::{self, Inputs};
use crate::controller::reconcile::{self, ResolvedIssuer};
use crate::controller::secret::{self, Desired, STATE_ANNOTATION};
use crate::crd::{AgentToken, AgentTokenSpec, TokenIssuerSpec};
use crate::rotation::{self, RenewWindow};

/// Text a tenant might write: short, long, numeric, odd unicode.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9.:/ -]{0,12}",
        "[0-9]{1,25}(ns|us|µs|ms|s|m|h|d|)",
        "([0-9]{1,6}(\\.[0-9]{0,20})?(ns|us|ms|s|m|h)){1,5}",
        "\\PC{0,40}",
        Just("99999999999999999999h".to_string()),
        Just("-1s".to_string()),
        Just("9223372036854775807".to_string()),
        Just("{{ token }}".to_string()),
        Just(String::new()),
    ]
}

/// Any JSON value a field might hold in etcd.
fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => text().prop_map(Value::String),
        1 => any::<i64>().prop_map(Value::from),
        1 => any::<f64>().prop_map(|f| json!(f)),
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::Bool),
    ]
}

fn string_map() -> impl Strategy<Value = Value> {
    prop::collection::btree_map(text(), text(), 0..6)
        .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k, Value::String(v))).collect()))
}

fn string_list() -> impl Strategy<Value = Value> {
    prop::collection::vec(text(), 0..6).prop_map(|v| json!(v))
}

/// An AgentToken spec as stored JSON: every field optional, any value.
fn spec_json() -> impl Strategy<Value = Value> {
    (
        (
            prop::option::of(value()),
            prop::option::of(value()),
            prop::option::of(value()),
            prop::option::of(value()),
            prop::option::of(0i64..200),
        ),
        (
            prop::option::of(string_list()),
            prop::option::of(string_list()),
            prop::option::of(string_map()),
            prop::option::of(string_map()),
            prop::option::of(string_map()),
        ),
        (
            prop::option::of(text()),
            prop::option::of(string_map()),
            prop::option::of(string_map()),
            prop::option::of(text()),
            prop::option::of(string_list()),
        ),
    )
        .prop_map(
            |(
                (lifetime, grace, renew_before, schedule, pct),
                (scopes, audiences, permissions, parameters, extra_keys),
                (key, labels, annotations, sa, repositories),
            )| {
                let mut spec = json!({"issuerRef": {"name": "i"}});
                let mut set = |k: &str, v: Option<Value>| {
                    if let Some(v) = v {
                        spec[k] = v;
                    }
                };
                set("lifetime", lifetime);
                set("previousTokenGracePeriod", grace);
                set("scopes", scopes);
                set("audiences", audiences);
                set("permissions", permissions);
                set("parameters", parameters);
                set("serviceAccountName", sa.map(Value::String));
                set("repositories", repositories);
                let mut rotation = json!({});
                if let Some(v) = renew_before {
                    rotation["renewBefore"] = v;
                }
                if let Some(v) = schedule {
                    rotation["schedule"] = v;
                }
                if let Some(p) = pct {
                    rotation["renewBeforePercentage"] = json!(p);
                }
                spec["rotation"] = rotation;
                let mut secret = json!({});
                if let Some(k) = key {
                    secret["key"] = Value::String(k);
                }
                for (name, v) in [
                    ("extraKeys", extra_keys),
                    ("labels", labels),
                    ("annotations", annotations),
                ] {
                    if let Some(v) = v {
                        secret[name] = v;
                    }
                }
                spec["secret"] = secret;
                spec
            },
        )
}

/// Timestamps anywhere jiff can represent, with a bias to ordinary ones.
fn timestamp() -> impl Strategy<Value = Timestamp> {
    prop_oneof![
        3 => (1_700_000_000i64..1_900_000_000).prop_map(|s| Timestamp::from_second(s).unwrap()),
        1 => (Timestamp::MIN.as_second()..=Timestamp::MAX.as_second())
            .prop_map(|s| Timestamp::from_second(s).unwrap()),
        1 => Just(Timestamp::MIN),
        1 => Just(Timestamp::MAX),
    ]
}

/// The operator's record on a Secret, as a tenant could rewrite it.
fn state_annotation() -> impl Strategy<Value = String> {
    prop_oneof![
        text(),
        (any::<i64>(), timestamp(), timestamp(), text(), prop::option::of(timestamp())).prop_map(
            |(revision, issued, expires, handle, grace)| {
                json!({
                    "current": {"revision": revision, "fingerprint": "sha256:00", "issuedAt": issued,
                                "expiresAt": expires, "handle": handle, "specHash": "h"},
                    "previous": {"revision": revision.wrapping_sub(1), "fingerprint": "x", "issuedAt": issued,
                                 "expiresAt": expires, "handle": handle, "graceUntil": grace},
                    "rotateHandled": "1",
                })
                .to_string()
            }
        ),
    ]
}

fn secret_with(annotation: String, data: BTreeMap<String, Vec<u8>>) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some("s".into()),
            annotations: Some([(STATE_ANNOTATION.to_string(), annotation)].into()),
            ..Default::default()
        },
        data: Some(data.into_iter().map(|(k, v)| (k, ByteString(v))).collect()),
        ..Default::default()
    }
}

/// JSON without nulls (a stored status has none): objects nest, keys
/// come from a small set so that two values share some.
fn status_like() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        "[a-c]{0,2}".prop_map(Value::String),
        (0i64..3).prop_map(Value::from),
        any::<bool>().prop_map(Value::Bool),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            prop::collection::btree_map("[a-d]", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// The status write's merge patch, applied to what the server holds,
    /// is exactly what the operator wants: nothing left over, nothing lost.
    #[test]
    fn a_merge_patch_turns_the_base_into_the_desired(
        base in status_like(),
        desired in status_like(),
    ) {
        let patch = crate::controller::status::merge_patch(&base, &desired);
        let mut applied = base.clone();
        json_patch::merge(&mut applied, &patch);
        prop_assert_eq!(&applied, &desired);
        if base == desired {
            prop_assert!(patch == json!({}) || !base.is_object(), "{}", patch);
        }
    }

    #[test]
    fn any_duration_text_parses_or_is_refused(s in text()) {
        let _ = crate::duration::parse(&s);
        let d = crate::crd::SpecDuration::new(s);
        if let Ok(v) = d.get() {
            prop_assert!(v <= crate::duration::MAX);
        }
    }

    #[test]
    fn any_stored_spec_decodes_and_validates_without_panic(
        spec in spec_json(),
        ns in "[a-z]{1,8}",
        max_lifetime in prop::option::of(value()),
        allowed in prop::collection::vec(text(), 0..4),
    ) {
        // Decoding may refuse a wrong type (the API server's schema never
        // stores one); a duration of any text or type must decode.
        let Ok(spec) = serde_json::from_value::<AgentTokenSpec>(spec) else {
            return Ok(());
        };
        let _ = spec.check();
        let at = AgentToken::new("a", spec);
        let mut policy = json!({"allowedScopes": allowed, "allowedNamespaces": ["*"]});
        if let Some(m) = max_lifetime {
            policy["maxLifetime"] = m;
        }
        let issuer_spec: TokenIssuerSpec =
            serde_json::from_value(json!({"serviceAccount": {}, "policy": policy})).unwrap();
        for cluster_scoped in [false, true] {
            let issuer = ResolvedIssuer {
                key: "TokenIssuer/x/i".into(),
                spec: issuer_spec.clone(),
                cluster_scoped,
            };
            let _ = reconcile::validate(&at, &ns, &issuer, &BTreeMap::new());
        }
        let _ = reconcile::renew_window(&at);
    }

    #[test]
    fn any_secret_state_and_clock_plans_without_panic(
        annotation in state_annotation(),
        token in prop::collection::vec(any::<u8>(), 0..40),
        now in timestamp(),
        recent in prop::collection::vec((timestamp(), any::<bool>()), 0..10),
        failed in any::<u32>(),
        last_failure in prop::option::of(timestamp()),
        last_revision in any::<i64>(),
        pct in 0u8..=255,
        before in any::<u64>(),
        rotate in prop::option::of(text()),
    ) {
        let recent: Vec<rotation::PastMint> = recent
            .into_iter()
            .map(|(at, forced)| rotation::PastMint { at, forced })
            .collect();
        let s = secret_with(annotation, [("token".to_string(), token)].into());
        let view = secret::view(Some(&s), "token");
        for window in [RenewWindow::Percentage(pct), RenewWindow::Before(std::time::Duration::from_nanos(before))] {
            let inputs = Inputs {
                now,
                spec_hash: "h",
                paused: false,
                window,
                cron: None,
                jitter_key: "k",
                rotate_trigger: rotate.as_deref(),
                revoke_trigger: None,
                drill_trigger: None,
                drill_scheduled: false,
                compromised: None,
                dormant: false,
                was_dormant: false,
                suspended: false,
                kill_current: false,
                kill_previous: false,
                secret: &view,
                last_revision,
                failed_attempts: failed,
                last_failure,
                recent_mints: &recent,
            };
            let d = decide::decide(&inputs);
            // A mint is never planned while the floor holds it.
            if let Some(m) = d.mint
                && let Some(f) = rotation::mint_floor(&recent, m.reason.forced(), now)
            {
                prop_assert!(f <= now);
            }
        }
    }

    #[test]
    fn any_extra_keys_render_without_touching_the_operators_keys(
        extra in prop::collection::btree_map(text(), text(), 0..8),
        key in "[a-z.]{1,10}",
        token in "[ -~]{0,64}",
    ) {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let state = secret::TokenState {
            current: Some(secret::SlotState {
                revision: 1,
                fingerprint: rotation::fingerprint(token.as_bytes()),
                issued_at: now,
                expires_at: now + SignedDuration::from_hours(1),
                handle: "h".into(),
                spec_hash: "h".into(),
                grace_until: None,
            }),
            ..Default::default()
        };
        let current = SecretString::from(token.clone());
        let empty = BTreeMap::new();
        let rendered = secret::render(&Desired {
            name: "s",
            namespace: "n",
            owner: OwnerReference::default(),
            agent_token: "a",
            key: &key,
            extra_keys: &extra,
            labels: &empty,
            annotations: &empty,
            state: &state,
            current: Some(&current),
            previous: None,
        });
        let data = rendered.data.unwrap_or_default();
        prop_assert_eq!(data.get(&key).map(|b| b.0.clone()), Some(token.into_bytes()));
        prop_assert!(data.get(secret::EXPIRES_AT_KEY).is_some_and(|v| v.0.starts_with(b"20")));
        // What is rendered reads back as the same intact token.
        let view = secret::view(Some(&Secret { data: Some(data), ..rendered }), &key);
        prop_assert!(view.current.is_some_and(|c| c.data_intact));
    }

    #[test]
    fn any_rotation_times_plan_without_panic(
        issued in timestamp(),
        expires in timestamp(),
        pct in any::<u8>(),
        before in any::<u64>(),
        key in text(),
    ) {
        for w in [RenewWindow::Percentage(pct), RenewWindow::Before(std::time::Duration::from_nanos(before))] {
            let p = rotation::next_rotation(issued, expires, w, &key, None);
            prop_assert!(p.due_at >= issued || expires < issued);
        }
    }
}

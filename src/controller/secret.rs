//! The token Secret: reading what it holds (pure) and building what it
//! should hold (pure). Writing is done in the reconcile phase.
//!
//! The revocation ledger (`status.history`) is the record of the delivered
//! tokens, not this Secret: its token values are believed only by the
//! ledger's fingerprints. The `agenttoken.dev/token-state` annotation still
//! says, for people, which revision each key holds and when it expires; the
//! operator never reads it back ([`view`] is kept for the property tests of
//! hostile annotations).

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::ObjectMeta;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::decide::{CurrentToken, PreviousToken, SecretView};
use crate::labels;
use crate::rotation::fingerprint;

/// Annotation holding [`TokenState`] as JSON.
pub const STATE_ANNOTATION: &str = "agenttoken.dev/token-state";
/// Role label value of the Secret that holds the tokens.
pub const ROLE_TOKEN: &str = "token";
/// Data key holding the current token's expiry (RFC 3339).
pub const EXPIRES_AT_KEY: &str = "expiresAt";
/// Suffix of the key that holds the previous token during its grace period.
pub const PREVIOUS_SUFFIX: &str = ".previous";

/// One delivered token, as recorded in the Secret (never the token itself).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlotState {
    pub revision: i64,
    pub fingerprint: String,
    pub issued_at: Timestamp,
    pub expires_at: Timestamp,
    /// What revocation needs (for example the binding Secret's name).
    pub handle: String,
    /// Hash of the spec the token was minted for (current slot only).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub spec_hash: String,
    /// End of the grace period (previous slot only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_until: Option<Timestamp>,
}

/// The whole record kept in [`STATE_ANNOTATION`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<SlotState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<SlotState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotate_handled: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoke_handled: Option<String>,
}

/// How an existing Secret relates to an AgentToken.
#[derive(Debug)]
pub enum Ownership {
    /// No Secret of that name.
    Missing,
    /// A Secret we did not create (or that another AgentToken owns).
    NotOwned,
    /// Ours: its controller owner reference is this AgentToken.
    Owned,
}

/// Whether `secret` is controlled by the AgentToken with `uid`.
pub fn ownership(secret: Option<&Secret>, uid: &str) -> Ownership {
    let Some(secret) = secret else {
        return Ownership::Missing;
    };
    let ours = secret
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.controller == Some(true) && o.uid == uid && o.kind == "AgentToken");
    if ours {
        Ownership::Owned
    } else {
        Ownership::NotOwned
    }
}

/// Reads the recorded state; a missing or unreadable annotation is empty state.
pub fn read_state(secret: &Secret) -> TokenState {
    secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(STATE_ANNOTATION))
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_default()
}

/// The decide phase's view of an owned Secret (or of none).
pub fn view(secret: Option<&Secret>, key: &str) -> SecretView {
    let Some(secret) = secret else {
        return SecretView::default();
    };
    let state = read_state(secret);
    let data = secret.data.as_ref();
    let current = state.current.as_ref().map(|c| CurrentToken {
        revision: c.revision,
        fingerprint: c.fingerprint.clone(),
        issued_at: c.issued_at,
        expires_at: c.expires_at,
        spec_hash: c.spec_hash.clone(),
        data_intact: data
            .and_then(|d| d.get(key))
            .is_some_and(|v| fingerprint(&v.0) == c.fingerprint),
    });
    let previous = state.previous.as_ref().map(|p| PreviousToken {
        revision: p.revision,
        fingerprint: p.fingerprint.clone(),
        expires_at: p.expires_at,
        grace_until: p.grace_until.unwrap_or(p.expires_at),
    });
    SecretView {
        exists: true,
        current,
        previous,
        rotate_handled: state.rotate_handled,
        revoke_handled: state.revoke_handled,
        drill_handled: None,
    }
}

/// Everything needed to render the Secret.
pub struct Desired<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    pub owner: OwnerReference,
    pub agent_token: &'a str,
    pub key: &'a str,
    pub extra_keys: &'a BTreeMap<String, String>,
    pub labels: &'a BTreeMap<String, String>,
    pub annotations: &'a BTreeMap<String, String>,
    pub state: &'a TokenState,
    /// The current token, if one is delivered.
    pub current: Option<&'a SecretString>,
    /// The previous token, kept during its grace period.
    pub previous: Option<&'a SecretString>,
}

/// Renders the Secret exactly as the operator wants it (for server-side apply).
pub fn render(d: &Desired<'_>) -> Secret {
    let mut data = BTreeMap::new();
    if let (Some(token), Some(cur)) = (d.current, d.state.current.as_ref()) {
        let value = token.expose_secret();
        data.insert(d.key.to_string(), ByteString(value.as_bytes().to_vec()));
        data.insert(
            EXPIRES_AT_KEY.to_string(),
            ByteString(cur.expires_at.to_string().into_bytes()),
        );
        // Derived keys never replace what the operator writes itself
        // (admission refuses such names; an older object may still have them).
        let previous_key = format!("{}{PREVIOUS_SUFFIX}", d.key);
        for (k, template) in d.extra_keys {
            if *k == d.key || *k == previous_key || k == EXPIRES_AT_KEY {
                continue;
            }
            data.insert(
                k.clone(),
                ByteString(render_template(template, value).into_bytes()),
            );
        }
    }
    if let (Some(token), Some(_)) = (d.previous, d.state.previous.as_ref()) {
        data.insert(
            format!("{}{PREVIOUS_SUFFIX}", d.key),
            ByteString(token.expose_secret().as_bytes().to_vec()),
        );
    }
    let mut labels_map = d.labels.clone();
    labels_map.insert(labels::MANAGED_BY.into(), labels::MANAGER.into());
    labels_map.insert(labels::NAME.into(), d.agent_token.into());
    labels_map.insert(labels::ROLE.into(), ROLE_TOKEN.into());
    let mut annotations = d.annotations.clone();
    annotations.insert(
        STATE_ANNOTATION.into(),
        serde_json::to_string(d.state).unwrap_or_default(),
    );
    Secret {
        metadata: ObjectMeta {
            name: Some(d.name.into()),
            namespace: Some(d.namespace.into()),
            labels: Some(labels_map),
            annotations: Some(annotations),
            owner_references: Some(vec![d.owner.clone()]),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Default::default()
    }
}

/// Fills `{{ token }}` (spaces optional) in an extra key's template.
pub fn render_template(template: &str, token: &str) -> String {
    let mut out = String::with_capacity(template.len() + token.len());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        let Some(len) = rest[start..].find("}}") else {
            break;
        };
        let inner = rest[start + 2..start + len].trim();
        out.push_str(&rest[..start]);
        if inner == "token" {
            out.push_str(token);
        } else {
            out.push_str(&rest[start..start + len + 2]);
        }
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    out
}

/// The token bytes held under `key`, if any.
pub fn token_in(secret: Option<&Secret>, key: &str) -> Option<SecretString> {
    let bytes = secret?.data.as_ref()?.get(key)?;
    String::from_utf8(bytes.0.clone())
        .ok()
        .map(SecretString::from)
}

/// Whether the live Secret already matches what `render` produced, for the
/// parts the operator owns (so unchanged Secrets are not written).
pub fn up_to_date(live: &Secret, desired: &Secret) -> bool {
    let subset = |want: &Option<BTreeMap<String, String>>,
                  have: &Option<BTreeMap<String, String>>| {
        want.iter()
            .flatten()
            .all(|(k, v)| have.as_ref().and_then(|h| h.get(k)) == Some(v))
    };
    let live_data = live.data.clone().unwrap_or_default();
    let want_data = desired.data.clone().unwrap_or_default();
    live_data == want_data
        && subset(&desired.metadata.labels, &live.metadata.labels)
        && subset(&desired.metadata.annotations, &live.metadata.annotations)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_fills_token_and_keeps_other_text() {
        assert_eq!(render_template("Bearer {{ token }}", "abc"), "Bearer abc");
        assert_eq!(render_template("{{token}}:{{token}}", "x"), "x:x");
        assert_eq!(
            render_template("{{ other }} {{ token }}", "t"),
            "{{ other }} t"
        );
        assert_eq!(render_template("no braces", "t"), "no braces");
        assert_eq!(render_template("open {{ token", "t"), "open {{ token");
    }

    fn owner(uid: &str) -> OwnerReference {
        OwnerReference {
            api_version: "agenttoken.dev/v1alpha1".into(),
            kind: "AgentToken".into(),
            name: "bot".into(),
            uid: uid.into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }
    }

    fn state(fp: &str) -> TokenState {
        TokenState {
            current: Some(SlotState {
                revision: 3,
                fingerprint: fp.into(),
                issued_at: "2026-01-01T00:00:00Z".parse().unwrap(),
                expires_at: "2026-01-01T01:00:00Z".parse().unwrap(),
                handle: "bot-binding-r3".into(),
                spec_hash: "h".into(),
                grace_until: None,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn rendered_secret_reads_back_as_intact_view() {
        let token = SecretString::from("tok-123");
        let st = state(&fingerprint(b"tok-123"));
        let empty = BTreeMap::new();
        let extra = BTreeMap::from([(
            "authorization".to_string(),
            "Bearer {{ token }}".to_string(),
        )]);
        let s = render(&Desired {
            name: "bot",
            namespace: "ns",
            owner: owner("u1"),
            agent_token: "bot",
            key: "token",
            extra_keys: &extra,
            labels: &empty,
            annotations: &empty,
            state: &st,
            current: Some(&token),
            previous: None,
        });
        assert!(matches!(ownership(Some(&s), "u1"), Ownership::Owned));
        assert!(matches!(ownership(Some(&s), "u2"), Ownership::NotOwned));
        let data = s.data.as_ref().unwrap();
        assert_eq!(data["authorization"].0, b"Bearer tok-123");
        assert_eq!(data[EXPIRES_AT_KEY].0, b"2026-01-01T01:00:00Z");
        let v = view(Some(&s), "token");
        assert!(v.current.as_ref().unwrap().data_intact);
        assert_eq!(v.current.unwrap().revision, 3);
        assert!(up_to_date(&s, &s));

        // A hand edit of the token key is drift.
        let mut edited = s.clone();
        edited
            .data
            .as_mut()
            .unwrap()
            .insert("token".into(), ByteString(b"other".to_vec()));
        assert!(!view(Some(&edited), "token").current.unwrap().data_intact);
        assert!(!up_to_date(&edited, &s));
        // The state annotation never holds the token.
        let ann = &s.metadata.annotations.as_ref().unwrap()[STATE_ANNOTATION];
        assert!(!ann.contains("tok-123"));
    }

    #[test]
    fn a_foreign_secret_is_not_owned() {
        let foreign = Secret::default();
        assert!(matches!(
            ownership(Some(&foreign), "u1"),
            Ownership::NotOwned
        ));
        assert!(matches!(ownership(None, "u1"), Ownership::Missing));
    }
}

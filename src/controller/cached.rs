//! The AgentToken as the controller's cache keeps it: identity, the
//! trigger annotations, `spec.issuerRef` and the few status fields the
//! queue's urgency and the reconcile trigger read.
//!
//! A reconcile reads the live object, so nothing else is read from the
//! cache, and at 10,000 AgentTokens every byte kept costs 10,000 times. A
//! full [`AgentToken`] is 1.8 KB before any of its heap (most of it the
//! inline size of spec and status, whatever they hold); this type is under
//! a third of that, and a watch event's history, conditions and spec are
//! never even decoded into it.

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Resource;
use kube::api::ObjectMeta;
use kube::core::NamespaceResourceScope;
use serde::{Deserialize, Serialize};

use crate::crd::{AgentToken, IssuerRef};
use crate::labels;

/// See the module documentation. Same group, version, kind and plural as
/// [`AgentToken`]: it is the same object, decoded in part.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct CachedAgentToken {
    pub metadata: ObjectMeta,
    pub spec: CachedSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<CachedStatus>,
    /// A hash of `metadata.uid`, which [`slim`] drops: an object deleted
    /// and made again under its name is another object to the reconcile
    /// trigger, without a 36-character UID copied into every reference
    /// the controller keeps (its store, scheduler and runner each clone
    /// one per object).
    #[serde(skip)]
    pub uid_hash: u64,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CachedSpec {
    pub issuer_ref: IssuerRef,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CachedStatus {
    /// For urgency: a token its issuer's kill switch covers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_at: Option<Time>,
    /// For urgency: how close the delivered token is to expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    /// For urgency: whether the revoke trigger is handled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handled_triggers: Option<CachedTriggers>,
    /// For the reconcile trigger: unexpected sources, and whether a
    /// revoked token was used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<CachedUsage>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct CachedTriggers {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoke: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct CachedUsage {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tokens: Vec<CachedTokenUsage>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CachedTokenUsage {
    pub revision: i64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unexpected_sources: Vec<String>,
    #[serde(default)]
    pub requests_after_revocation: i64,
}

impl Resource for CachedAgentToken {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(dt: &()) -> Cow<'_, str> {
        AgentToken::kind(dt)
    }
    fn group(dt: &()) -> Cow<'_, str> {
        AgentToken::group(dt)
    }
    fn version(dt: &()) -> Cow<'_, str> {
        AgentToken::version(dt)
    }
    fn plural(dt: &()) -> Cow<'_, str> {
        AgentToken::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// Drops what the cache never reads from a decoded object: metadata beyond
/// identity and the trigger annotations, and usage entries with nothing to
/// trigger on (nearly all of them).
pub fn slim(at: &mut CachedAgentToken) {
    use std::hash::{Hash, Hasher};
    let meta = &mut at.metadata;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    meta.uid.hash(&mut h);
    at.uid_hash = h.finish();
    // Nothing reads them from the cache (a reconcile reads the live
    // object), and each would be copied into every ObjectRef of it.
    meta.uid = None;
    meta.resource_version = None;
    meta.managed_fields = None;
    meta.annotations = meta.annotations.take().and_then(|mut a| {
        let kept: BTreeMap<String, String> = [labels::REVOKE, labels::ROTATE, labels::DRILL]
            .into_iter()
            .filter_map(|k| Some((k.to_string(), a.remove(k)?)))
            .collect();
        (!kept.is_empty()).then_some(kept)
    });
    meta.labels = None;
    meta.owner_references = None;
    meta.finalizers = None;
    meta.generate_name = None;
    meta.creation_timestamp = None;
    if let Some(st) = at.status.as_mut() {
        st.usage = st.usage.take().and_then(|mut u| {
            u.tokens
                .retain(|t| !t.unexpected_sources.is_empty() || t.requests_after_revocation > 0);
            for t in &mut u.tokens {
                t.requests_after_revocation = t.requests_after_revocation.min(1);
            }
            (!u.tokens.is_empty()).then_some(u)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_decodes_what_it_reads_and_drops_the_rest() {
        let full = serde_json::json!({
            "apiVersion": "agenttoken.dev/v1alpha1", "kind": "AgentToken",
            "metadata": {
                "name": "bot", "namespace": "t", "uid": "u-1", "resourceVersion": "7",
                "generation": 3,
                "labels": {"team": "a"},
                "annotations": {"agenttoken.dev/revoke": "1", "note": "x".repeat(10_000)},
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}],
            },
            "spec": {"issuerRef": {"name": "sa"}, "serviceAccountName": "builder", "scopes": ["a"]},
            "status": {
                "revision": 4,
                "issuedAt": "2026-11-29T10:00:00Z", "expiresAt": "2026-11-29T11:00:00Z",
                "handledTriggers": {"revoke": "1", "rotate": "2"},
                "history": [{"revision": 4, "fingerprint": "sha256:ab"}],
                "usage": {"tokens": [
                    {"revision": 3, "requests": 9},
                    {"revision": 4, "unexpectedSources": ["10.0.0.9"], "requestsAfterRevocation": 12},
                ]},
            },
        });
        let mut at: CachedAgentToken = serde_json::from_value(full.clone()).unwrap();
        slim(&mut at);
        assert_eq!(at.metadata.name.as_deref(), Some("bot"));
        assert!(at.metadata.uid.is_none() && at.metadata.resource_version.is_none());
        let mut again: CachedAgentToken = serde_json::from_value(full.clone()).unwrap();
        slim(&mut again);
        assert_eq!(again.uid_hash, at.uid_hash);
        let mut other = full.clone();
        other["metadata"]["uid"] = "u-2".into();
        let mut other: CachedAgentToken = serde_json::from_value(other).unwrap();
        slim(&mut other);
        assert_ne!(other.uid_hash, at.uid_hash, "made again under its name");
        assert_eq!(at.metadata.generation, Some(3));
        assert_eq!(
            at.metadata.annotations,
            Some([(labels::REVOKE.to_string(), "1".to_string())].into())
        );
        assert!(at.metadata.labels.is_none() && at.metadata.managed_fields.is_none());
        assert_eq!(at.spec.issuer_ref.name, "sa");
        let st = at.status.as_ref().unwrap();
        assert_eq!(
            st.expires_at.as_ref().unwrap().0.to_string(),
            "2026-11-29T11:00:00Z"
        );
        assert_eq!(
            st.handled_triggers.as_ref().unwrap().revoke.as_deref(),
            Some("1")
        );
        let usage = &st.usage.as_ref().unwrap().tokens;
        assert_eq!(usage.len(), 1);
        assert_eq!(usage[0].revision, 4);
        assert_eq!(usage[0].requests_after_revocation, 1);
        // The same object as the full type: one URL, one kind.
        assert_eq!(
            CachedAgentToken::url_path(&(), Some("t")),
            AgentToken::url_path(&(), Some("t"))
        );
        assert_eq!(CachedAgentToken::kind(&()), "AgentToken");
        // Small: the point of the type.
        assert!(
            std::mem::size_of::<CachedAgentToken>() * 3 < std::mem::size_of::<AgentToken>(),
            "{} vs {}",
            std::mem::size_of::<CachedAgentToken>(),
            std::mem::size_of::<AgentToken>()
        );
    }
}

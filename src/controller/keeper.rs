//! The keeper: a Secret in the operator's own namespace that holds, until
//! they are revoked, the tokens whose revocation needs the token itself
//! (OAuth2 RFC 7009, GitHub App installation tokens, a webhook without
//! ids). Without it, deleting or editing the tenant's Secret would lose the
//! only copy and the token would live to its expiry unrevoked.
//!
//! One keeper per AgentToken, named after its UID, created with POST (a
//! Secret that is already there is never taken over), its UID recorded in
//! `status.keeperUid` and checked before every read, write and delete.
//! Namespace admins cannot reach the operator's namespace.
//!
//! Intent before effect: before its first keeper is created, a random
//! `status.keeperIntent` is recorded, and the keeper carries it. If the
//! operator stops between creating the keeper and recording its UID, the
//! keeper found by name is believed only when it carries that value (the
//! operator wrote both; tenants can write neither).

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use secrecy::{ExposeSecret, SecretString};

use super::{Context, Error, FIELD_MANAGER};
use crate::crd::AgentTokenStatus;
use crate::labels;

/// Role label value of keeper Secrets.
pub const ROLE_KEEPER: &str = "keeper";

/// The annotation carrying `status.keeperIntent`.
pub const INTENT_ANNOTATION: &str = "agenttoken.dev/keeper-intent";

/// A fresh `status.keeperIntent`.
pub fn new_intent() -> String {
    use rand::Rng;
    let bytes: [u8; 16] = rand::rng().random();
    hex::encode(bytes)
}

/// The keeper's name for an AgentToken.
pub fn name(agent_token_uid: &str) -> String {
    format!("agenttoken-keep-{agent_token_uid}")
}

fn key(revision: i64) -> String {
    format!("r{revision}")
}

/// An AgentToken's keeper, as read.
pub struct Keeper {
    api: Api<Secret>,
    name: String,
    /// The live keeper, when it exists and its UID is the recorded one.
    live: Option<Secret>,
    /// `status.keeperIntent`, carried by a keeper this creates.
    intent: Option<String>,
}

impl Keeper {
    /// Reads the keeper recorded in status (`keeperUid`), or one created
    /// under `keeperIntent` whose UID was never recorded (the recorded one
    /// may be gone, tidied away); any other Secret of that name is not ours
    /// and is never read or written.
    pub async fn load(
        ctx: &Context,
        agent_token_uid: &str,
        status: &AgentTokenStatus,
    ) -> Result<Keeper, Error> {
        let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.operator_namespace);
        let name = name(agent_token_uid);
        let intent = status.keeper_intent.clone();
        let live = match (status.keeper_uid.as_deref(), intent.as_deref()) {
            (None, None) => None,
            (uid, intent) => api.get_opt(&name).await?.filter(|s| {
                let carried = s
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(INTENT_ANNOTATION))
                    .map(String::as_str);
                (uid.is_some() && s.metadata.uid.as_deref() == uid)
                    || (intent.is_some() && carried == intent)
            }),
        };
        Ok(Keeper {
            api,
            name,
            live,
            intent,
        })
    }

    /// The keeper of an AgentToken whose status, as read, recorded
    /// neither a keeper nor an intent: none of ours can exist (a keeper is
    /// created only after its intent is in status), so nothing is read. One
    /// that exists anyway is not ours: creating it fails and it is never
    /// written.
    pub fn none_yet(ctx: &Context, agent_token_uid: &str, status: &AgentTokenStatus) -> Keeper {
        Keeper {
            api: Api::namespaced(ctx.client.clone(), &ctx.operator_namespace),
            name: name(agent_token_uid),
            live: None,
            intent: status.keeper_intent.clone(),
        }
    }

    /// Whether there is anything to load for `status`.
    pub fn recorded(status: &AgentTokenStatus) -> bool {
        status.keeper_uid.is_some() || status.keeper_intent.is_some()
    }

    /// The kept token of `revision`.
    pub fn get(&self, revision: i64) -> Option<SecretString> {
        let bytes = self.live.as_ref()?.data.as_ref()?.get(&key(revision))?;
        String::from_utf8(bytes.0.clone())
            .ok()
            .map(SecretString::from)
    }

    /// The revisions it holds.
    pub fn revisions(&self) -> Vec<i64> {
        self.live
            .as_ref()
            .and_then(|s| s.data.as_ref())
            .map(|d| {
                d.keys()
                    .filter_map(|k| k.strip_prefix('r')?.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Keeps `token` for `revision`; returns the keeper's UID to record.
    /// Values of revisions neither `revision` nor in `keep` (their tokens
    /// revoked or expired since) leave in the same write: dropping them
    /// when they are revoked would cost a write per rotation.
    pub async fn put(
        &mut self,
        agent_token: (&str, &str),
        agent_token_uid: &str,
        revision: i64,
        token: &SecretString,
        keep: &[i64],
    ) -> Result<String, Error> {
        let value = ByteString(token.expose_secret().as_bytes().to_vec());
        match &self.live {
            None => {
                let secret = Secret {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        labels: Some(BTreeMap::from([
                            (labels::MANAGED_BY.to_string(), labels::MANAGER.to_string()),
                            (labels::ROLE.to_string(), ROLE_KEEPER.to_string()),
                        ])),
                        annotations: Some(
                            [(
                                "agenttoken.dev/agenttoken".to_string(),
                                format!("{}/{} ({agent_token_uid})", agent_token.0, agent_token.1),
                            )]
                            .into_iter()
                            .chain(
                                self.intent
                                    .clone()
                                    .map(|i| (INTENT_ANNOTATION.to_string(), i)),
                            )
                            .collect(),
                        ),
                        ..Default::default()
                    },
                    type_: Some("Opaque".into()),
                    data: Some(BTreeMap::from([(key(revision), value)])),
                    ..Default::default()
                };
                let pp = PostParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..Default::default()
                };
                let created = match self.api.create(&pp, &secret).await {
                    Ok(s) => s,
                    Err(kube::Error::Api(s)) if s.code == 409 => {
                        return Err(Error::SecretAppeared(self.name.clone()));
                    }
                    Err(e) => return Err(e.into()),
                };
                let uid = created.metadata.uid.clone().unwrap_or_default();
                self.live = Some(created);
                Ok(uid)
            }
            Some(live) => {
                let uid = live.metadata.uid.clone().unwrap_or_default();
                let mut data: serde_json::Map<String, serde_json::Value> = self
                    .revisions()
                    .into_iter()
                    .filter(|r| *r != revision && !keep.contains(r))
                    .map(|r| (key(r), serde_json::Value::Null))
                    .collect();
                data.insert(key(revision), serde_json::json!(value));
                self.merge(serde_json::json!({"metadata": {"uid": uid}, "data": data}))
                    .await?;
                Ok(uid)
            }
        }
    }

    /// A merge patch carrying the keeper's UID: the API server refuses it
    /// (409) if the Secret of that name is another object.
    async fn merge(&mut self, patch: serde_json::Value) -> Result<(), Error> {
        let updated = self
            .api
            .patch(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        self.live = Some(updated);
        Ok(())
    }

    /// Drops every kept token but `keep`; deletes the keeper (UID
    /// precondition) when nothing is left. Returns whether it still exists.
    pub async fn retain(&mut self, keep: &[i64]) -> Result<bool, Error> {
        let Some(live) = &self.live else {
            return Ok(false);
        };
        let uid = live.metadata.uid.clone().unwrap_or_default();
        let held = self.revisions();
        if held.iter().all(|r| keep.contains(r)) {
            return Ok(true);
        }
        if keep.iter().all(|r| !held.contains(r)) {
            let dp = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: Some(uid),
                    resource_version: None,
                }),
                ..Default::default()
            };
            match self.api.delete(&self.name, &dp).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
            self.live = None;
            return Ok(false);
        }
        let drop: serde_json::Map<String, serde_json::Value> = held
            .iter()
            .filter(|r| !keep.contains(r))
            .map(|r| (key(*r), serde_json::Value::Null))
            .collect();
        self.merge(serde_json::json!({"metadata": {"uid": uid}, "data": drop}))
            .await?;
        Ok(true)
    }
}

//! Usage tracking: which AgentToken revision a request was made with, when,
//! from where (issue 20).
//!
//! The issuer reports uses in its audit stream. kube-apiserver's audit
//! webhook backend POSTs `audit.k8s.io/v1` EventLists whose `user.extra`
//! carries `authentication.kubernetes.io/credential-id: JTI=<jti>` for a
//! service-account token; the operator recorded that JWT ID in the ledger
//! entry of the revision it minted (`credentialId: jti:<jti>`), never the
//! token. A use is mapped back by that id alone. Vault/OpenBao child tokens
//! are mapped by accessor (a socket audit device, [`serve_vault_audit`]),
//! the jwt issuer's tokens by their SHA-256, which the RFC 7662
//! introspection endpoint ([`introspect`]) recomputes from the token a
//! resource server shows it. A use of a token after the ledger says it was
//! revoked or withdrawn is counted apart and reported once per revision.
//!
//! [`Tracker`] keeps, per AgentToken, the uses of its current and previous
//! token in memory and writes them to `status.usage` (its own field manager,
//! at most every [`FLUSH_EVERY`]); reconciles never write that field. The
//! receiving endpoint ([`router`]) answers at once: parsing a batch and
//! updating the maps takes microseconds per event, and nothing in it waits
//! on the API server.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::post;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde::Deserialize;
use tracing::{debug, warn};

use crate::crd::{
    AgentToken, HistoryEntry, IssuerKind, MAX_USAGE_SOURCES, RevocationState, TokenLife,
    TokenUsage, UsageStatus,
};
use crate::telemetry::Metrics;

/// The field manager of `status.usage`.
pub const USAGE_MANAGER: &str = "agent-token-operator-usage";
/// How often changed usage is written to status.
pub const FLUSH_EVERY: Duration = Duration::from_secs(2);
/// The largest audit batch accepted (kube-apiserver sends at most 400
/// events a batch by default, a few KiB each at the Metadata level).
pub const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;
/// Longest credential id kept (a JTI is a UUID).
const MAX_CREDENTIAL_ID: usize = 128;
/// Longest user agent kept.
const MAX_USER_AGENT: usize = 128;

/// The id under which the issuer reports uses of `token`, for the kinds
/// whose tokens carry one the operator can trust: a service-account token
/// (the API server signed it, and audits `JTI=<jti>`), the jwt issuer's
/// own tokens (their digest, see [`jwt_credential`]), and a Vault child
/// token's accessor (from its ledger `handle`). `None` for anything else or anything malformed. The token is
/// only decoded, never kept.
pub fn credential_id(
    issuer_type: &str,
    platform_issuer: bool,
    token: &str,
    handle: &str,
    audit_id: Option<&str>,
) -> Option<String> {
    // A Vault/OpenBao child token: its HMAC under the issuer's audit
    // device when Vault gave it (every entry carries it, a request with a
    // revoked token too), else its accessor, as audit devices log it (with
    // `hmac_accessor = false`). Only from a ClusterTokenIssuer: a
    // namespaced issuer may point at a Vault its tenant runs, which can
    // answer any accessor, another namespace's token's included.
    if issuer_type == "vault" {
        if !platform_issuer {
            return None;
        }
        if let Some(hmac) = audit_id.and_then(vault_hmac) {
            return Some(hmac);
        }
        let accessor = handle.strip_prefix("vault-accessor:")?;
        return valid_id(accessor).then(|| format!("accessor:{accessor}"));
    }
    // The operator's own jwt: the token's SHA-256, which the
    // introspection endpoint recomputes from the token it is shown. An
    // exact match of every byte: a token someone built with the same
    // claims (its `jti` is in status) matches nothing.
    if issuer_type == "jwt" {
        return Some(jwt_credential(token));
    }
    if issuer_type != "serviceAccount" {
        return None;
    }
    let payload = token.split('.').nth(1)?;
    let bytes = base64::Engine::decode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        payload.trim_end_matches('='),
    )
    .ok()?;
    #[derive(Deserialize)]
    struct Claims {
        jti: Option<String>,
    }
    let jti = serde_json::from_slice::<Claims>(&bytes).ok()?.jti?;
    valid_id(&jti).then(|| format!("jti:{jti}"))
}

/// The credential id of a Vault audit HMAC (`hmac-sha256:<64 hex>`):
/// `vault-hmac:<hex>`; `None` for anything else.
fn vault_hmac(hash: &str) -> Option<String> {
    let hex = hash.strip_prefix("hmac-sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| format!("vault-hmac:{}", hex.to_ascii_lowercase()))
}

/// The credential id of a jwt issuer's token: `jwt-sha256:<hex>`.
pub fn jwt_credential(token: &str) -> String {
    use sha2::Digest;
    format!(
        "jwt-sha256:{}",
        hex::encode(sha2::Sha256::digest(token.as_bytes()))
    )
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_CREDENTIAL_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// An AgentToken, by namespace and name.
type Key = (String, String);

/// What the tracker knows of one tracked token, from its ledger entry.
#[derive(Clone, Debug, PartialEq)]
pub struct Credential {
    /// The AgentToken that minted it.
    pub key: Key,
    pub revision: i64,
    /// The issuer that minted it: kind and name.
    pub issuer: Option<(IssuerKind, String)>,
    pub expires_at: Option<Timestamp>,
    /// When the operator revoked or withdrew it: `revokedAt`, else when the
    /// tracker first saw it out of `Live` and `Grace` (never earlier than
    /// the truth). `None` while it is the Secret's current or previous token.
    pub withdrawn_at: Option<Timestamp>,
}

#[derive(Default)]
struct Tracked {
    /// Credential id -> the AgentToken revision that minted it.
    by_credential: HashMap<String, Credential>,
    /// Credential ids registered per AgentToken (to forget them).
    credentials: HashMap<Key, HashSet<String>>,
    /// Uses per AgentToken, by revision.
    uses: HashMap<Key, BTreeMap<i64, TokenUsage>>,
    /// AgentTokens whose uses changed since the last flush.
    dirty: HashSet<Key>,
    /// Sources already checked (or queued) per token revision.
    checked: HashMap<(Key, i64), HashSet<String>>,
    /// Sources to check against `spec.usage`, and uses after revocation
    /// to report, oldest first.
    pending: Pending,
    /// Token revisions whose use after revocation was queued for a report.
    reported: HashSet<(Key, i64)>,
    /// The newest use of any token of an AgentToken, across rotations.
    last: HashMap<Key, Timestamp>,
    /// The UID of the AgentToken each key was tracked for: usage is
    /// written to that object only, never to one made later under its name.
    uids: HashMap<Key, String>,
}

/// Sources checked per token revision; beyond, uses are still counted but
/// their sources not checked (a token used from that many places is
/// reported long before).
const MAX_CHECKED: usize = 32;
/// Checks waiting at most; beyond, new sources wait for their next use.
const MAX_PENDING: usize = 4096;
/// Checks one namespace may have waiting: a tenant that uses its tokens
/// from thousands of addresses fills its own share, not everyone's.
const MAX_PENDING_PER_NAMESPACE: usize = 256;

/// Checks waiting, by namespace, taken in turn: one namespace's flood
/// delays another's check by at most one of its own per turn.
#[derive(Default)]
struct Pending {
    by_namespace: HashMap<String, std::collections::VecDeque<Check>>,
    /// Namespaces with checks waiting, in the order they are served.
    turns: std::collections::VecDeque<String>,
    len: usize,
}

impl Pending {
    /// Whether a check for `namespace` would be taken.
    fn has_room(&self, namespace: &str) -> bool {
        self.len < MAX_PENDING
            && self
                .by_namespace
                .get(namespace)
                .is_none_or(|q| q.len() < MAX_PENDING_PER_NAMESPACE)
    }

    /// Queues `check` (the caller checked [`Pending::has_room`]).
    fn push(&mut self, check: Check) {
        let queue = self
            .by_namespace
            .entry(check.namespace.clone())
            .or_default();
        if queue.is_empty() {
            self.turns.push_back(check.namespace.clone());
        }
        queue.push_back(check);
        self.len += 1;
    }

    fn pop(&mut self) -> Option<Check> {
        let namespace = self.turns.pop_front()?;
        let queue = self.by_namespace.get_mut(&namespace)?;
        let check = queue.pop_front();
        if queue.is_empty() {
            self.by_namespace.remove(&namespace);
        } else {
            self.turns.push_back(namespace);
        }
        self.len -= usize::from(check.is_some());
        check
    }
}

/// Something the source-check loop looks at, off the endpoint's path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub namespace: String,
    pub name: String,
    pub revision: i64,
    pub finding: Finding,
}

/// What was seen of a token revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// A new source address, to check against `spec.usage`.
    Source(String),
    /// A use after the token was revoked or withdrawn (reported once per
    /// revision): when, and from where if the issuer said.
    AfterRevocation {
        at: Timestamp,
        source: Option<String>,
    },
}

/// Maps uses to AgentToken revisions and keeps them until flushed.
#[derive(Default)]
pub struct Tracker {
    /// No usage source is served (no audit webhook, introspection or Vault
    /// audit listener): no use can arrive, so no credential is kept (at
    /// 10,000 AgentTokens that is megabytes for nothing).
    off: bool,
    inner: Mutex<Tracked>,
    checks: tokio::sync::Notify,
    /// Wakes the flush at once: an unexpected use must not wait for the tick.
    urgent: tokio::sync::Notify,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker")
            .field("tracked", &self.tracked())
            .finish()
    }
}

/// One use, as an audit record reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Use {
    pub credential_id: String,
    /// Another id the same record names the credential by (a Vault
    /// entry's token HMAC beside its accessor), tried when the first is not
    /// tracked.
    pub also: Option<String>,
    pub at: Timestamp,
    pub source: Option<String>,
    pub user_agent: Option<String>,
}

/// An AgentToken's usage to write.
#[derive(Debug)]
pub struct Dirty {
    pub key: Key,
    /// The object it is for: the write fails on any other.
    pub uid: String,
    pub usage: UsageStatus,
}

impl Tracked {
    /// Drops everything kept for `key`.
    fn forget_all(&mut self, key: &Key) {
        for id in self.credentials.remove(key).unwrap_or_default() {
            if self.by_credential.get(&id).is_some_and(|c| c.key == *key) {
                self.by_credential.remove(&id);
            }
        }
        for r in self.uses.remove(key).unwrap_or_default().into_keys() {
            self.checked.remove(&(key.clone(), r));
            self.reported.remove(&(key.clone(), r));
        }
        self.dirty.remove(key);
        self.last.remove(key);
        self.uids.remove(key);
    }
}

impl Tracker {
    /// Registers the credential ids of an AgentToken's current and
    /// previous tokens (its two newest ledger entries with one), as its status
    /// says after a read or a write, and what status already says of their
    /// use (so a restarted operator counts on from there). Ids of tokens no
    /// longer current or previous are forgotten.
    /// A tracker for an operator that serves no usage source.
    pub fn off() -> Self {
        Tracker {
            off: true,
            ..Default::default()
        }
    }

    pub fn track(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
        history: &[HistoryEntry],
        usage: Option<&UsageStatus>,
    ) {
        if self.off {
            return;
        }
        let key: Key = (namespace.to_string(), name.to_string());
        let now = Timestamp::now();
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let t = &mut *guard;
        if t.uids.get(&key).is_some_and(|u| u != uid) {
            // Deleted and made again under the same name: nothing of the
            // old object's carries over.
            t.forget_all(&key);
        }
        // The two newest tokens with an id, whatever their state: the
        // current and the previous one (a revoked token's record of use is
        // the evidence of why it was revoked, and a use of it afterwards
        // is a copy being tried).
        let mut with_id: Vec<&HistoryEntry> = history
            .iter()
            .filter(|e| !matches!(e.state, Some(TokenLife::Minting)))
            .filter(|e| e.credential_id.is_some())
            .collect();
        with_id.sort_by_key(|e| std::cmp::Reverse(e.revision));
        let wanted: HashMap<String, Credential> = with_id
            .into_iter()
            .take(2)
            .filter_map(|e| {
                let id = e.credential_id.clone()?;
                let withdrawn = match e.state {
                    Some(TokenLife::Minting | TokenLife::Live | TokenLife::Grace) => false,
                    Some(_) => true,
                    None => e.revocation != RevocationState::Pending,
                };
                let seen_before = t
                    .by_credential
                    .get(&id)
                    .filter(|c| c.key == key)
                    .and_then(|c| c.withdrawn_at);
                let withdrawn_at = withdrawn
                    .then(|| e.revoked_at.as_ref().map(|r| r.0).or(seen_before))
                    .map(|at| at.unwrap_or(now));
                let credential = Credential {
                    key: key.clone(),
                    revision: e.revision,
                    issuer: e.issuer.as_ref().map(|i| (i.kind, i.name.clone())),
                    expires_at: e.expires_at.as_ref().map(|x| x.0),
                    withdrawn_at,
                };
                Some((id, credential))
            })
            .collect();
        let revisions: HashSet<i64> = wanted.values().map(|c| c.revision).collect();
        let old = t.credentials.remove(&key).unwrap_or_default();
        for id in &old {
            if !wanted.contains_key(id) && t.by_credential.get(id).is_some_and(|c| c.key == key) {
                t.by_credential.remove(id);
            }
        }
        // What is kept per revision goes with the revisions no longer
        // tracked (looked up by key: no scan of every AgentToken's).
        let old_revisions: Vec<i64> = t
            .uses
            .get(&key)
            .map(|u| u.keys().copied().collect())
            .unwrap_or_default();
        for r in old_revisions.into_iter().filter(|r| !revisions.contains(r)) {
            t.checked.remove(&(key.clone(), r));
            t.reported.remove(&(key.clone(), r));
        }
        if wanted.is_empty() {
            t.uses.remove(&key);
            t.dirty.remove(&key);
            t.last.remove(&key);
            t.uids.remove(&key);
            return;
        }
        t.uids.insert(key.clone(), uid.to_string());
        if let Some(seen) = usage.and_then(|u| u.last_used.as_ref()) {
            let last = t.last.entry(key.clone()).or_insert(seen.0);
            *last = (*last).max(seen.0);
        }
        let mut ids = HashSet::new();
        for (id, credential) in wanted {
            // First come keeps an id: another AgentToken's ledger cannot
            // take over a credential id already tracked (ids are unique
            // per issuer; a clash is someone's error, not a reason to
            // misattribute uses).
            match t.by_credential.get(&id) {
                Some(c) if c.key != key => continue,
                _ => {
                    t.by_credential.insert(id.clone(), credential);
                    ids.insert(id);
                }
            }
        }
        t.credentials.insert(key.clone(), ids);
        let uses = t.uses.entry(key.clone()).or_default();
        uses.retain(|r, _| revisions.contains(r));
        for seen in usage.map(|u| u.tokens.as_slice()).unwrap_or_default() {
            if revisions.contains(&seen.revision) {
                uses.entry(seen.revision).or_insert_with(|| seen.clone());
                if seen.requests_after_revocation > 0 {
                    // Reported before (by this process or the last one).
                    t.reported.insert((key.clone(), seen.revision));
                }
            }
        }
    }

    /// Forgets an AgentToken (deleted).
    pub fn forget(&self, namespace: &str, name: &str) {
        let key: Key = (namespace.to_string(), name.to_string());
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .forget_all(&key);
    }

    /// What is tracked under a credential id.
    pub fn credential(&self, id: &str) -> Option<Credential> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_credential
            .get(id)
            .cloned()
    }

    /// Records uses; returns how many were mapped to an AgentToken.
    pub fn record(&self, uses: impl IntoIterator<Item = Use>) -> (usize, usize) {
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let t = &mut *guard;
        let (mut matched, mut unmatched) = (0, 0);
        for u in uses {
            let found = t
                .by_credential
                .get(&u.credential_id)
                .or_else(|| t.by_credential.get(u.also.as_deref()?));
            let Some(c) = found else {
                unmatched += 1;
                continue;
            };
            matched += 1;
            let (key, revision, withdrawn_at) = (c.key.clone(), c.revision, c.withdrawn_at);
            let at = crate::rotation::whole_seconds(u.at);
            let entry = t
                .uses
                .entry(key.clone())
                .or_default()
                .entry(revision)
                .or_insert_with(|| TokenUsage {
                    revision,
                    ..Default::default()
                });
            // A use at least a second after the withdrawal (the use's time
            // is the issuer's, the withdrawal's the operator's in whole
            // seconds): a use from just before it is never called one after.
            if let Some(withdrawn) = withdrawn_at
                && u.at >= withdrawn + jiff::SignedDuration::from_secs(1)
            {
                entry.requests_after_revocation += 1;
                if entry
                    .last_used_after_revocation
                    .as_ref()
                    .is_none_or(|l| l.0 < at)
                {
                    entry.last_used_after_revocation = Some(Time(at));
                }
                t.dirty.insert(key.clone());
                if t.pending.has_room(&key.0) && t.reported.insert((key.clone(), revision)) {
                    t.pending.push(Check {
                        namespace: key.0.clone(),
                        name: key.1.clone(),
                        revision,
                        finding: Finding::AfterRevocation {
                            at,
                            source: u.source,
                        },
                    });
                    self.checks.notify_one();
                    self.urgent.notify_one();
                }
                continue;
            }
            entry.requests += 1;
            if entry.last_used.as_ref().is_none_or(|l| l.0 < u.at) {
                entry.last_used = Some(Time(at));
                if let Some(agent) = u.user_agent {
                    entry.user_agent = Some(agent.chars().take(MAX_USER_AGENT).collect());
                }
            }
            if let Some(source) = &u.source
                && entry.sources.len() < MAX_USAGE_SOURCES
                && !entry.sources.contains(source)
            {
                entry.sources.push(source.clone());
            }
            let last = t.last.entry(key.clone()).or_insert(at);
            *last = (*last).max(at);
            t.dirty.insert(key.clone());
            if let Some(source) = u.source {
                let room = t.pending.has_room(&key.0);
                let checked = t.checked.entry((key.clone(), revision)).or_default();
                if checked.len() < MAX_CHECKED && room && checked.insert(source.clone()) {
                    t.pending.push(Check {
                        namespace: key.0.clone(),
                        name: key.1.clone(),
                        revision,
                        finding: Finding::Source(source),
                    });
                    self.checks.notify_one();
                }
            }
        }
        (matched, unmatched)
    }

    /// The next source to check, if any.
    pub fn next_check(&self) -> Option<Check> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pending
            .pop()
    }

    /// Resolves when a check may be waiting.
    pub async fn checks_waiting(&self) {
        self.checks.notified().await
    }

    /// A checked source was not expected: recorded with the token's use.
    pub fn unexpected(&self, c: &Check) {
        let Finding::Source(source) = &c.finding else {
            return;
        };
        let mut t = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let key = (c.namespace.clone(), c.name.clone());
        let Some(entry) = t.uses.get_mut(&key).and_then(|u| u.get_mut(&c.revision)) else {
            return;
        };
        if entry.unexpected_sources.len() < MAX_USAGE_SOURCES
            && !entry.unexpected_sources.contains(source)
        {
            entry.unexpected_sources.push(source.clone());
            t.dirty.insert(key);
            self.urgent.notify_one();
        }
    }

    /// A check that could not be made: the source is checked again (the
    /// use after revocation reported) at its next use.
    pub fn unchecked(&self, c: &Check) {
        let mut t = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let key = (c.namespace.clone(), c.name.clone());
        match &c.finding {
            Finding::Source(source) => {
                if let Some(set) = t.checked.get_mut(&(key, c.revision)) {
                    set.remove(source);
                }
            }
            Finding::AfterRevocation { .. } => {
                t.reported.remove(&(key, c.revision));
            }
        }
    }

    /// The changed AgentTokens' `status.usage`, newest revision first, at
    /// most two; the dirty set is cleared.
    pub fn take_dirty(&self) -> Vec<Dirty> {
        let mut t = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let dirty: Vec<Key> = t.dirty.drain().collect();
        dirty
            .into_iter()
            .filter_map(|key| {
                let uses = t.uses.get(&key)?;
                let tokens = uses.values().rev().take(2).cloned().collect();
                let last_used = t.last.get(&key).map(|l| Time(*l));
                let uid = t.uids.get(&key)?.clone();
                Some(Dirty {
                    key,
                    uid,
                    usage: UsageStatus { tokens, last_used },
                })
            })
            .collect()
    }

    /// Forgets an AgentToken if it is still tracked as `uid`.
    fn forget_uid(&self, namespace: &str, name: &str, uid: &str) {
        let key: Key = (namespace.to_string(), name.to_string());
        let mut t = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if t.uids.get(&key).is_some_and(|u| u == uid) {
            t.forget_all(&key);
        }
    }

    /// Marks an AgentToken dirty again (its write failed).
    fn retry(&self, key: Key) {
        let mut t = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if t.uses.contains_key(&key) {
            t.dirty.insert(key);
        }
    }

    /// Credential ids tracked (a gauge).
    pub fn tracked(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_credential
            .len()
    }
}

/// Writes changed usage to status every [`FLUSH_EVERY`], and at once when
/// an unexpected source was found, while `is_leader` says so (a standby's
/// view is its own, and status is the leader's).
pub async fn flush_loop(
    client: Client,
    tracker: Arc<Tracker>,
    is_leader: impl Fn() -> bool,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tick.tick() => {}
            _ = tracker.urgent.notified() => {}
        }
        if !is_leader() {
            continue;
        }
        for Dirty {
            key: (ns, name),
            uid,
            usage,
        } in tracker.take_dirty()
        {
            match patch_status_of(&client, &ns, &name, &uid, "usage", &usage, USAGE_MANAGER).await {
                Ok(_) => debug!(namespace = %ns, agenttoken = %name, "usage written"),
                Err(kube::Error::Api(e)) if matches!(e.code, 404 | 409 | 422) => {
                    debug!(namespace = %ns, agenttoken = %name, code = e.code, "usage not written: the AgentToken is gone or another");
                    tracker.forget_uid(&ns, &name, &uid)
                }
                Err(e) => {
                    warn!(namespace = %ns, agenttoken = %name, error = %e, "usage write failed; retried");
                    tracker.retry((ns, name));
                }
            }
        }
    }
}

/// Sets `status.<field>` of the AgentToken `namespace/name` as
/// `manager`, only if it is still the object `uid` names: a JSON patch
/// whose `test` of the UID fails (422) on one made later under the same
/// name. (A UID in a server-side apply of /status is not checked: the
/// status strategy drops metadata.)
pub async fn patch_status_of<T: serde::Serialize>(
    client: &Client,
    namespace: &str,
    name: &str,
    uid: &str,
    field: &str,
    value: &T,
    manager: &str,
) -> Result<AgentToken, kube::Error> {
    let patch: json_patch::Patch = serde_json::from_value(serde_json::json!([
        {"op": "test", "path": "/metadata/uid", "value": uid},
        {"op": "add", "path": format!("/status/{field}"), "value": value},
    ]))
    .map_err(kube::Error::SerdeError)?;
    let params = PatchParams {
        field_manager: Some(manager.into()),
        ..Default::default()
    };
    Api::<AgentToken>::namespaced(client.clone(), namespace)
        .patch_status(name, &params, &Patch::<()>::Json(patch))
        .await
}

/// The parts of an `audit.k8s.io/v1` Event the tracker reads.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AuditEvent {
    #[serde(default)]
    stage: String,
    #[serde(default)]
    verb: String,
    #[serde(default)]
    user: AuditUser,
    #[serde(default)]
    source_i_ps: Vec<String>,
    #[serde(default)]
    user_agent: Option<String>,
    #[serde(default)]
    request_received_timestamp: Option<Timestamp>,
    #[serde(default)]
    stage_timestamp: Option<Timestamp>,
}

#[derive(Deserialize, Default)]
struct AuditUser {
    #[serde(default)]
    extra: HashMap<String, Vec<String>>,
}

#[derive(Deserialize)]
struct EventList {
    #[serde(default)]
    items: Vec<AuditEvent>,
}

const CREDENTIAL_ID_KEY: &str = "authentication.kubernetes.io/credential-id";

/// The uses in a kube-apiserver audit EventList: one per request (its
/// `ResponseComplete` or `Panic` stage, or `ResponseStarted` for a watch),
/// for requests made with a credential that has a JTI.
pub fn parse_audit(body: &[u8]) -> Result<Vec<Use>, serde_json::Error> {
    let list: EventList = serde_json::from_slice(body)?;
    Ok(list
        .items
        .into_iter()
        // One use per request: a watch at ResponseStarted (its
        // ResponseComplete comes when it ends), anything else at
        // ResponseComplete (or Panic).
        .filter(|e| match e.stage.as_str() {
            "ResponseStarted" => e.verb == "watch",
            "ResponseComplete" => e.verb != "watch",
            "Panic" => true,
            _ => false,
        })
        .filter_map(|e| {
            let jti = e
                .user
                .extra
                .get(CREDENTIAL_ID_KEY)?
                .iter()
                .find_map(|v| v.strip_prefix("JTI="))?
                .to_string();
            if !valid_id(&jti) {
                return None;
            }
            Some(Use {
                credential_id: format!("jti:{jti}"),
                also: None,
                at: e.request_received_timestamp.or(e.stage_timestamp)?,
                // The last address is the one the API server saw; the
                // ones before it come from X-Forwarded-For / X-Real-Ip,
                // which the client itself writes.
                source: e
                    .source_i_ps
                    .into_iter()
                    .next_back()
                    .filter(|s| s.parse::<std::net::IpAddr>().is_ok()),
                user_agent: e.user_agent,
            })
        })
        .collect())
}

/// The parts of a Vault/OpenBao audit entry the tracker reads.
#[derive(Deserialize)]
struct VaultEntry {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    time: Option<Timestamp>,
    #[serde(default)]
    auth: Option<VaultAuth>,
    #[serde(default)]
    request: Option<VaultRequest>,
}

#[derive(Deserialize)]
struct VaultAuth {
    #[serde(default)]
    accessor: Option<String>,
}

#[derive(Deserialize)]
struct VaultRequest {
    #[serde(default)]
    remote_address: Option<String>,
    /// The token's HMAC under this device: there whenever the request
    /// carried a token, valid or not.
    #[serde(default)]
    client_token: Option<String>,
}

/// The use in one Vault/OpenBao audit entry (JSON, its prefix removed):
/// the `response` entry of a request made with a token, named by its
/// accessor when logged in clear (`hmac_accessor = false`) and by its HMAC
/// (`request.client_token`). A request with a revoked token is logged with
/// the HMAC alone. `None` for request entries, requests without a token,
/// or what is not an entry.
pub fn parse_vault_audit(line: &[u8]) -> Option<Use> {
    let e: VaultEntry = serde_json::from_slice(line).ok()?;
    if e.kind != "response" {
        return None;
    }
    let accessor = e
        .auth
        .and_then(|a| a.accessor)
        .filter(|a| valid_id(a))
        .map(|a| format!("accessor:{a}"));
    let request = e.request?;
    let hmac = request.client_token.as_deref().and_then(vault_hmac);
    let (credential_id, also) = match (accessor, hmac) {
        (Some(a), h) => (a, h),
        (None, Some(h)) => (h, None),
        (None, None) => return None,
    };
    Some(Use {
        credential_id,
        also,
        at: e.time?,
        source: request
            .remote_address
            .filter(|a| a.parse::<std::net::IpAddr>().is_ok()),
        user_agent: None,
    })
}

/// Longest audit line read (a response entry with its request and auth).
const MAX_VAULT_LINE: u64 = 256 * 1024;
/// Audit connections served at once (an audit device keeps one).
const MAX_VAULT_CONNECTIONS: usize = 16;

/// Serves a Vault/OpenBao `socket` audit device (TCP, one JSON entry per
/// line) on `addr` until `shutdown`. The device's `prefix` option is the
/// shared secret: a line that does not start with it ends the connection
/// (counted `unauthorized`).
pub async fn serve_vault_audit(
    addr: std::net::SocketAddr,
    prefix: Arc<Vec<u8>>,
    tracker: Arc<Tracker>,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving Vault/OpenBao audit entries (socket device)");
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_VAULT_CONNECTIONS));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (tcp, _) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(_) => continue,
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics.usage_events("refused", 1);
            continue;
        };
        let (prefix, tracker, metrics) = (prefix.clone(), tracker.clone(), metrics.clone());
        tokio::spawn(async move {
            let _slot = slot;
            read_vault_audit(tcp, &prefix, &tracker, &metrics).await;
        });
    }
}

/// How long a new connection has to send its first (authenticated) line:
/// an audit device connects only when it has an entry to write, so a
/// connection that stays silent is not one, and must not hold a slot.
const FIRST_LINE_WITHIN: Duration = Duration::from_secs(10);

async fn read_vault_audit(
    tcp: impl tokio::io::AsyncRead + Unpin,
    prefix: &[u8],
    tracker: &Tracker,
    metrics: &Metrics,
) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
    let mut reader = BufReader::new(tcp);
    let mut line = Vec::new();
    let mut first = true;
    loop {
        line.clear();
        let mut limited = (&mut reader).take(MAX_VAULT_LINE);
        let read = limited.read_until(b'\n', &mut line);
        let read = if first {
            match tokio::time::timeout(FIRST_LINE_WITHIN, read).await {
                Ok(r) => r,
                Err(_) => {
                    metrics.usage_events("unauthorized", 1);
                    return;
                }
            }
        } else {
            read.await
        };
        first = false;
        match read {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.last() != Some(&b'\n') {
            // Longer than any entry: not an audit device.
            metrics.usage_events("invalid", 1);
            return;
        }
        let authentic = line.len() > prefix.len()
            && line[..prefix.len()]
                .iter()
                .zip(prefix)
                .fold(0u8, |d, (a, b)| d | (a ^ b))
                == 0;
        if !authentic {
            metrics.usage_events("unauthorized", 1);
            return;
        }
        if let Some(u) = parse_vault_audit(&line[prefix.len()..]) {
            let (matched, unmatched) = tracker.record([u]);
            metrics.usage_events("matched", matched as u64);
            metrics.usage_events("unmatched", unmatched as u64);
        }
    }
}

/// What the usage endpoint needs.
#[derive(Clone)]
pub struct Endpoint {
    pub tracker: Arc<Tracker>,
    pub metrics: Arc<Metrics>,
    /// Bearer tokens `POST /audit` accepts (`--usage-token-file`), as
    /// SHA-256 digests; `None`: no audit webhook here.
    pub tokens: Option<Arc<Vec<[u8; 32]>>>,
    /// Bearer tokens the introspection endpoint accepts
    /// (`--usage-introspection-token-file`); `None`: no introspection.
    pub introspection: Option<Arc<Vec<[u8; 32]>>>,
}

/// Whether the request carries one of `tokens` as its bearer token.
fn authorized(tokens: &[[u8; 32]], headers: &HeaderMap) -> bool {
    use sha2::Digest;
    let Some(presented) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let digest: [u8; 32] = sha2::Sha256::digest(presented.trim().as_bytes()).into();
    // Digests compared whole: no early exit on the first differing byte.
    tokens.iter().fold(false, |ok, t| {
        ok | (t.iter().zip(digest).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0)
    })
}

/// The largest introspection request read (a token and a hint).
const MAX_INTROSPECTION_BYTES: usize = 64 * 1024;

/// `POST /audit`: kube-apiserver's audit webhook (a bearer token from the
/// webhook's kubeconfig). Answers 200 once the batch is recorded, 400 for
/// what is not an EventList, 401 without a valid token (before the body is
/// read), 413 over [`MAX_BATCH_BYTES`].
///
/// `POST /introspect/clustertokenissuers/{name}` and
/// `POST /introspect/tokenissuers/{namespace}/{name}`: RFC 7662 token
/// introspection for the jwt tokens that issuer minted ([`introspect`]).
pub fn router(endpoint: Endpoint) -> Router {
    Router::new()
        .route("/audit", post(audit))
        .route(
            "/introspect/clustertokenissuers/{name}",
            post(introspect_cluster),
        )
        .route(
            "/introspect/tokenissuers/{namespace}/{name}",
            post(introspect_namespaced),
        )
        .with_state(endpoint)
}

/// The body, read only up to `limit`: `Err(413)` beyond.
async fn body_within(body: axum::body::Body, limit: usize) -> Result<Bytes, StatusCode> {
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| StatusCode::PAYLOAD_TOO_LARGE)
}

async fn audit(State(e): State<Endpoint>, request: axum::extract::Request) -> StatusCode {
    let Some(tokens) = &e.tokens else {
        return StatusCode::NOT_FOUND;
    };
    if !authorized(tokens, request.headers()) {
        e.metrics.usage_events("unauthorized", 1);
        return StatusCode::UNAUTHORIZED;
    }
    let body = match body_within(request.into_body(), MAX_BATCH_BYTES).await {
        Ok(b) => b,
        Err(status) => {
            e.metrics.usage_events("invalid", 1);
            return status;
        }
    };
    match parse_audit(&body) {
        Ok(uses) => {
            let oldest = uses.iter().map(|u| u.at).min();
            if let Some(oldest) = oldest {
                debug!(uses = uses.len(), oldest_age = %Timestamp::now().duration_since(oldest), "audit batch");
            }
            let (matched, unmatched) = e.tracker.record(uses);
            e.metrics.usage_events("matched", matched as u64);
            e.metrics.usage_events("unmatched", unmatched as u64);
            StatusCode::OK
        }
        Err(_) => {
            e.metrics.usage_events("invalid", 1);
            StatusCode::BAD_REQUEST
        }
    }
}

/// The issuer an introspection request is addressed to (its URL path): a
/// resource server trusts one issuer, and only that issuer's tokens are
/// active there. A tenant's TokenIssuer may sign with any `iss` it likes;
/// it cannot make its tokens active at another issuer's endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IssuerPath {
    Cluster(String),
    Namespaced { namespace: String, name: String },
}

impl IssuerPath {
    fn minted(&self, c: &Credential) -> bool {
        match (self, &c.issuer) {
            (IssuerPath::Cluster(name), Some((IssuerKind::ClusterTokenIssuer, n))) => name == n,
            (IssuerPath::Namespaced { namespace, name }, Some((IssuerKind::TokenIssuer, n))) => {
                name == n && *namespace == c.key.0
            }
            _ => false,
        }
    }
}

/// The RFC 7662 answer for `token` at `issuer`, and the use it is. Active
/// only for the current or previous token of an AgentToken (as its ledger
/// says), minted by that very issuer, not expired, and byte for byte the
/// token the operator minted (its SHA-256 is the revision's credential id).
/// An active answer carries the token's own claims; any other answer is
/// `{"active": false}` alone (RFC 7662 section 2.2).
pub fn introspect(
    tracker: &Tracker,
    issuer: &IssuerPath,
    token: &str,
    now: Timestamp,
) -> (serde_json::Value, Option<Use>) {
    let inactive = serde_json::json!({"active": false});
    let id = jwt_credential(token);
    let Some(c) = tracker.credential(&id) else {
        return (inactive, None);
    };
    // Shown to a resource server: a use of the token, wherever it went.
    let seen = Use {
        credential_id: id,
        also: None,
        at: now,
        source: None,
        user_agent: None,
    };
    let active =
        c.withdrawn_at.is_none() && c.expires_at.is_some_and(|x| now < x) && issuer.minted(&c);
    if !active {
        return (inactive, Some(seen));
    }
    let Some(claims) = claims_of(token) else {
        return (inactive, Some(seen));
    };
    let mut answer = serde_json::Map::new();
    answer.insert("active".into(), true.into());
    for claim in ["scope", "sub", "aud", "iss", "exp", "iat", "nbf", "jti"] {
        if let Some(v) = claims.get(claim) {
            answer.insert(claim.into(), v.clone());
        }
    }
    answer.insert("token_type".into(), "Bearer".into());
    (serde_json::Value::Object(answer), Some(seen))
}

/// A JWT's claims (its payload), undecoded trust aside: only called on a
/// token whose every byte the operator minted.
fn claims_of(token: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::Engine::decode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        payload.trim_end_matches('='),
    )
    .ok()?;
    serde_json::from_slice(&bytes).ok()
}

async fn introspect_cluster(
    State(e): State<Endpoint>,
    axum::extract::Path(name): axum::extract::Path<String>,
    request: axum::extract::Request,
) -> axum::response::Response {
    introspection(e, IssuerPath::Cluster(name), request).await
}

async fn introspect_namespaced(
    State(e): State<Endpoint>,
    axum::extract::Path((namespace, name)): axum::extract::Path<(String, String)>,
    request: axum::extract::Request,
) -> axum::response::Response {
    introspection(e, IssuerPath::Namespaced { namespace, name }, request).await
}

#[derive(Deserialize)]
struct IntrospectionRequest {
    token: String,
}

async fn introspection(
    e: Endpoint,
    issuer: IssuerPath,
    request: axum::extract::Request,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let Some(tokens) = &e.introspection else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if !authorized(tokens, request.headers()) {
        e.metrics.usage_events("unauthorized", 1);
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
        )
            .into_response();
    }
    let invalid = || {
        (
            StatusCode::BAD_REQUEST,
            [(header::CONTENT_TYPE, "application/json")],
            r#"{"error":"invalid_request"}"#,
        )
            .into_response()
    };
    let form = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !form {
        e.metrics.usage_events("invalid", 1);
        return invalid();
    }
    let body = match body_within(request.into_body(), MAX_INTROSPECTION_BYTES).await {
        Ok(b) => b,
        Err(status) => {
            e.metrics.usage_events("invalid", 1);
            return status.into_response();
        }
    };
    let Ok(asked) = serde_urlencoded::from_bytes::<IntrospectionRequest>(&body) else {
        e.metrics.usage_events("invalid", 1);
        return invalid();
    };
    let (answer, seen) = introspect(&e.tracker, &issuer, &asked.token, Timestamp::now());
    // A token the operator does not track is counted as unmatched.
    let (matched, unmatched) = match seen {
        Some(u) => e.tracker.record([u]),
        None => (0, 1),
    };
    e.metrics.usage_events("matched", matched as u64);
    e.metrics.usage_events("unmatched", unmatched as u64);
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        answer.to_string(),
    )
        .into_response()
}

/// The label on the leader's own Pod (`"true"`), which the chart's usage
/// Service selects: only the leader serves usage reports and
/// introspection.
pub const LEADER_LABEL: &str = "agenttoken.dev/usage-leader";

/// Sets or removes [`LEADER_LABEL`] on this replica's own Pod. A failure is
/// logged, not fatal: reports then reach the leader only by chance, and
/// their senders retry.
pub async fn label_leader(client: &Client, namespace: &str, pod: &str, leading: bool) {
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), namespace);
    let value = leading.then_some("true");
    let patch = serde_json::json!({"metadata": {"labels": {LEADER_LABEL: value}}});
    match pods
        .patch(pod, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => debug!(pod, leading, "usage leader label set"),
        Err(e) => warn!(pod, leading, error = %e, "could not label this Pod for the usage Service"),
    }
}

/// Serves [`router`] over TLS on `addr` until `shutdown`.
pub async fn serve(
    addr: std::net::SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    endpoint: Endpoint,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let tcp = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving usage reports (POST /audit) and introspection");
    let listener = TlsListener::new(tcp, tokio_rustls::TlsAcceptor::from(tls));
    axum::serve(listener, router(endpoint))
        .with_graceful_shutdown(shutdown)
        .await
}

/// TLS handshakes in progress at most; beyond, new connections are closed.
const MAX_HANDSHAKES: usize = 64;
/// How long a handshake may take.
const HANDSHAKE_WITHIN: Duration = Duration::from_secs(10);

/// A TLS listener for axum. Each handshake runs in its own task (at most
/// [`MAX_HANDSHAKES`] at once, each within [`HANDSHAKE_WITHIN`]): a slow or
/// silent client holds up no one else, and a failed handshake drops that
/// connection only.
struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(
        tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        std::net::SocketAddr,
    )>,
    local: std::io::Result<std::net::SocketAddr>,
    accepting: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    fn new(tcp: tokio::net::TcpListener, acceptor: tokio_rustls::TlsAcceptor) -> Self {
        let local = tcp.local_addr();
        let (tx, ready) = tokio::sync::mpsc::channel(MAX_HANDSHAKES);
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        let accepting = tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = tcp.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    // Too many handshakes at once: this one is dropped.
                    continue;
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let _slot = slot;
                    if let Ok(Ok(tls)) =
                        tokio::time::timeout(HANDSHAKE_WITHIN, acceptor.accept(stream)).await
                    {
                        let _ = tx.send((tls, peer)).await;
                    }
                });
            }
        });
        TlsListener {
            ready,
            local,
            accepting,
        }
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(ready) => ready,
            // The accept task ended (it never does before the drop).
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        match &self.local {
            Ok(a) => Ok(*a),
            Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
        }
    }
}

/// The TLS configuration from PEM files (a certificate chain and its key).
pub fn tls_config(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("reading {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("reading {}: {e}", cert.display()))?;
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| format!("reading {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("the usage TLS certificate and key: {e}"))?;
    Ok(Arc::new(config))
}

/// The bearer tokens in `--usage-token-file` (one per line), as digests.
pub fn read_tokens(path: &std::path::Path) -> Result<Vec<[u8; 32]>, String> {
    use sha2::Digest;
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let tokens: Vec<[u8; 32]> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| sha2::Sha256::digest(l.as_bytes()).into())
        .collect();
    if tokens.is_empty() {
        return Err(format!("{} holds no token", path.display()));
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: &str) -> String {
        let b =
            |s: &str| base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, s);
        format!("{}.{}.sig", b(r#"{"alg":"RS256"}"#), b(claims))
    }

    /// The uses in an EventList of `items`.
    fn uses_in(items: Vec<serde_json::Value>) -> Vec<Use> {
        parse_audit(serde_json::json!({"items": items}).to_string().as_bytes()).unwrap()
    }

    fn entry(revision: i64, id: &str, state: TokenLife) -> HistoryEntry {
        HistoryEntry {
            revision,
            credential_id: Some(id.into()),
            state: Some(state),
            ..Default::default()
        }
    }

    fn event(jti: &str, ip: &str, at: &str) -> serde_json::Value {
        serde_json::json!({
            "kind": "Event", "stage": "ResponseComplete", "userAgent": "agent/1.0",
            "sourceIPs": [ip], "requestReceivedTimestamp": at,
            "user": {"username": "system:serviceaccount:t:builder",
                     "extra": {CREDENTIAL_ID_KEY: [format!("JTI={jti}")]}},
        })
    }

    #[test]
    fn credential_ids_come_only_from_trusted_kinds_and_well_formed_jtis() {
        let t = jwt(r#"{"jti":"6f1c-aa","sub":"x"}"#);
        assert_eq!(
            credential_id("serviceAccount", false, &t, "", None).as_deref(),
            Some("jti:6f1c-aa")
        );
        assert_eq!(
            credential_id("jwt", false, &t, "jwt:6f1c-aa", None),
            Some(jwt_credential(&t)),
            "the operator's own jwt: the whole token's digest, not its claimed jti"
        );
        assert_eq!(
            jwt_credential("abc"),
            "jwt-sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            credential_id("webhook", true, &t, "webhook-id:1", None),
            None,
            "a foreign issuer's claims are not trusted"
        );
        for bad in [
            jwt(r#"{"sub":"x"}"#),
            jwt(r#"{"jti":""}"#),
            jwt(r#"{"jti":"a b"}"#),
            jwt(&format!(r#"{{"jti":"{}"}}"#, "a".repeat(129))),
            jwt(r#"{"jti":7}"#),
            "opaque-token".into(),
            "a.!!!.b".into(),
        ] {
            assert_eq!(
                credential_id("serviceAccount", false, &bad, "", None),
                None,
                "{bad}"
            );
        }
    }

    #[test]
    fn uses_map_to_the_revision_that_minted_the_token_and_stay_bounded() {
        let tr = Tracker::default();
        tr.track(
            "t",
            "bot",
            "uid",
            &[
                entry(1, "jti:a", TokenLife::Grace),
                entry(2, "jti:b", TokenLife::Live),
            ],
            None,
        );
        let body = serde_json::json!({"kind": "EventList", "items": [
            event("b", "10.244.40.7", "2026-11-29T10:00:00Z"),
            event("b", "10.244.40.7", "2026-11-29T10:00:05Z"),
            event("a", "10.244.40.9", "2026-11-29T10:00:03Z"),
            event("zzz", "10.0.0.1", "2026-11-29T10:00:03Z"),
        ]});
        let uses = parse_audit(body.to_string().as_bytes()).unwrap();
        assert_eq!(tr.record(uses), (3, 1));
        let dirty = tr.take_dirty();
        assert_eq!(dirty.len(), 1);
        let Dirty { key, usage, .. } = &dirty[0];
        assert_eq!(key, &("t".to_string(), "bot".to_string()));
        assert_eq!(
            usage.tokens.iter().map(|t| t.revision).collect::<Vec<_>>(),
            [2, 1]
        );
        assert_eq!(usage.tokens[0].requests, 2);
        assert_eq!(usage.tokens[0].sources, ["10.244.40.7"]);
        assert_eq!(
            usage.tokens[0].last_used.as_ref().unwrap().0.to_string(),
            "2026-11-29T10:00:05Z"
        );
        assert_eq!(usage.tokens[0].user_agent.as_deref(), Some("agent/1.0"));
        assert!(tr.take_dirty().is_empty(), "flushed");

        // Sources are capped; a revoked token's id is forgotten.
        let many: Vec<Use> = (0..20)
            .map(|i| Use {
                credential_id: "jti:b".into(),
                also: None,
                at: Timestamp::from_second(1_900_000_000 + i).unwrap(),
                source: Some(format!("10.0.0.{i}")),
                user_agent: None,
            })
            .collect();
        tr.record(many);
        assert_eq!(
            tr.take_dirty()[0].usage.tokens[0].sources.len(),
            MAX_USAGE_SOURCES
        );
        tr.track(
            "t",
            "bot",
            "uid",
            &[
                entry(3, "jti:c", TokenLife::Live),
                entry(2, "jti:b", TokenLife::Revoked),
                entry(1, "jti:a", TokenLife::Revoked),
            ],
            None,
        );
        // The two newest tokens are tracked (a revoked one's uses are the
        // evidence); the oldest id is forgotten.
        assert_eq!(tr.tracked(), 2);
        let late = uses_in(vec![event("a", "10.0.0.1", "2026-11-29T11:00:00Z")]);
        assert_eq!(tr.record(late), (0, 1));
    }

    #[test]
    fn the_last_use_outlives_the_revisions_that_made_it() {
        let tr = Tracker::default();
        tr.track(
            "t",
            "bot",
            "uid",
            &[entry(1, "jti:a", TokenLife::Live)],
            None,
        );
        let uses = uses_in(vec![event("a", "10.0.0.1", "2026-11-29T11:00:00Z")]);
        tr.record(uses);
        let written = tr.take_dirty().remove(0).usage;
        assert_eq!(
            written.last_used.as_ref().unwrap().0.to_string(),
            "2026-11-29T11:00:00Z"
        );
        // Two rotations later, revision 1's record is gone; the last use is
        // not (a restarted operator reads it back from status).
        let fresh = Tracker::default();
        fresh.track(
            "t",
            "bot",
            "uid",
            &[
                entry(3, "jti:c", TokenLife::Live),
                entry(2, "jti:b", TokenLife::Grace),
            ],
            Some(&written),
        );
        let uses = uses_in(vec![event("c", "10.0.0.1", "2026-11-29T10:00:00Z")]);
        fresh.record(uses);
        let after = fresh.take_dirty().remove(0).usage;
        assert_eq!(
            after.last_used.as_ref().unwrap().0.to_string(),
            "2026-11-29T11:00:00Z",
            "an older use does not move it back"
        );
        assert!(after.tokens.iter().all(|t| t.revision != 1));
    }

    #[test]
    fn an_agent_token_made_again_under_the_same_name_starts_with_nothing() {
        let tr = Tracker::default();
        tr.track(
            "t",
            "bot",
            "uid-1",
            &[entry(1, "jti:a", TokenLife::Live)],
            None,
        );
        let uses = uses_in(vec![event("a", "10.0.0.1", "2026-11-29T11:00:00Z")]);
        tr.record(uses);
        // Deleted and made again before the flush: the old object's use is
        // neither written to the new one nor kept for it.
        tr.track(
            "t",
            "bot",
            "uid-2",
            &[entry(1, "jti:b", TokenLife::Live)],
            None,
        );
        assert!(tr.take_dirty().is_empty());
        assert!(tr.credential("jti:a").is_none());
        let uses = uses_in(vec![event("b", "10.0.0.2", "2026-11-29T11:00:05Z")]);
        tr.record(uses);
        let dirty = tr.take_dirty();
        assert_eq!(
            dirty[0].uid, "uid-2",
            "written with the new object's UID as precondition"
        );
        assert_eq!(dirty[0].usage.tokens[0].sources, ["10.0.0.2"]);
    }

    #[test]
    fn another_agent_tokens_ledger_cannot_take_over_a_tracked_id() {
        let tr = Tracker::default();
        tr.track(
            "t",
            "bot",
            "uid",
            &[entry(1, "jti:a", TokenLife::Live)],
            None,
        );
        tr.track(
            "evil",
            "thief",
            "uid",
            &[entry(1, "jti:a", TokenLife::Live)],
            None,
        );
        let uses = uses_in(vec![event("a", "10.0.0.1", "2026-11-29T11:00:00Z")]);
        tr.record(uses);
        let dirty = tr.take_dirty();
        assert_eq!(dirty[0].key, ("t".to_string(), "bot".to_string()));
    }

    #[test]
    fn the_source_is_the_address_the_api_server_saw_and_a_watch_counts_once() {
        let mut e = event("a", "10.0.0.1", "2026-11-29T11:00:00Z");
        // A client that claims to be a consumer through X-Forwarded-For.
        e["sourceIPs"] = serde_json::json!(["10.244.40.7", "192.0.2.66"]);
        let mut started = event("a", "10.0.0.1", "2026-11-29T11:00:00Z");
        started["verb"] = "watch".into();
        started["stage"] = "ResponseStarted".into();
        let mut ended = started.clone();
        ended["stage"] = "ResponseComplete".into();
        let uses = uses_in(vec![e, started, ended]);
        assert_eq!(uses.len(), 2, "the watch once");
        assert_eq!(uses[0].source.as_deref(), Some("192.0.2.66"));
    }

    #[test]
    fn audit_batches_that_are_not_event_lists_are_errors_and_other_stages_are_ignored() {
        assert!(parse_audit(b"not json").is_err());
        assert!(parse_audit(br#"{"items": 5}"#).is_err());
        let mut e = event("a", "10.0.0.1", "2026-11-29T11:00:00Z");
        e["stage"] = "RequestReceived".into();
        let mut no_ip = event("a", "not-an-ip", "2026-11-29T11:00:00Z");
        no_ip["userAgent"] = serde_json::Value::Null;
        let uses = uses_in(vec![e, no_ip]);
        assert_eq!(uses.len(), 1);
        assert_eq!(uses[0].source, None);
    }

    #[test]
    fn vault_audit_response_entries_with_a_clear_accessor_are_uses() {
        let entry = |kind: &str, accessor: &str| {
            serde_json::json!({
                "time": "2026-11-29T10:00:00.123Z", "type": kind,
                "auth": {"client_token": "hmac-sha256:abc", "accessor": accessor},
                "request": {"operation": "read", "path": "auth/token/lookup-self", "remote_address": "127.0.0.1"},
            })
            .to_string()
        };
        let u = parse_vault_audit(entry("response", "aXbYc123").as_bytes()).unwrap();
        assert_eq!(u.credential_id, "accessor:aXbYc123");
        assert_eq!(u.source.as_deref(), Some("127.0.0.1"));
        assert!(
            parse_vault_audit(entry("request", "aXbYc123").as_bytes()).is_none(),
            "one use per request"
        );
        assert!(
            parse_vault_audit(entry("response", "hmac-sha256:ff00").as_bytes()).is_none(),
            "hashed accessor"
        );
        assert!(parse_vault_audit(entry("response", "").as_bytes()).is_none());
        assert!(parse_vault_audit(b"{not json").is_none());
        assert_eq!(
            credential_id("vault", true, "s.token", "vault-accessor:aXbYc123", None).as_deref(),
            Some("accessor:aXbYc123")
        );
        assert_eq!(
            credential_id("vault", false, "s.token", "vault-accessor:aXbYc123", None),
            None,
            "a namespaced issuer's Vault may be the tenant's"
        );
        assert_eq!(
            credential_id("vault", true, "s.token", "vault-lease:x/y", None),
            None
        );
    }

    #[test]
    fn a_revoked_vault_token_is_known_by_its_audit_hmac_alone() {
        let hmac = format!("hmac-sha256:{}", "ab".repeat(32));
        // Minted with an audit device: the HMAC is the credential id.
        let id = credential_id("vault", true, "s.t", "vault-accessor:acc9", Some(&hmac)).unwrap();
        assert_eq!(id, format!("vault-hmac:{}", "ab".repeat(32)));
        assert_eq!(
            credential_id(
                "vault",
                true,
                "s.t",
                "vault-accessor:acc9",
                Some("hmac-sha256:short")
            ),
            Some("accessor:acc9".into()),
            "a malformed hash falls back to the accessor"
        );
        assert_eq!(
            credential_id("vault", false, "s.t", "vault-accessor:acc9", Some(&hmac)),
            None
        );
        let tr = Tracker::default();
        let mut e = entry(1, &id, TokenLife::Revoked);
        e.revoked_at = Some(Time("2026-11-29T10:00:00Z".parse().unwrap()));
        tr.track("t", "bot", "uid", &[e], None);
        // Before: accessor and HMAC (either maps). After revocation, as
        // OpenBao 2.7 logs it: no accessor, `auth` all but empty, the HMAC
        // in request.client_token, a permission-denied error.
        let valid = serde_json::json!({"type": "response", "time": "2026-11-29T09:59:00Z",
            "auth": {"accessor": "acc9", "client_token": hmac},
            "request": {"client_token": hmac, "remote_address": "10.0.0.9"}});
        let revoked = serde_json::json!({"type": "response", "time": "2026-11-29T10:00:05Z",
            "auth": {"token_type": "default"},
            "request": {"client_token": hmac, "path": "auth/token/lookup-self", "remote_address": "10.0.0.66"},
            "error": "1 error occurred:\n\t* permission denied\n\n"});
        let uses: Vec<Use> = [valid, revoked]
            .iter()
            .filter_map(|l| parse_vault_audit(l.to_string().as_bytes()))
            .collect();
        assert_eq!(uses[0].credential_id, "accessor:acc9");
        assert_eq!(uses[1].credential_id, id);
        assert_eq!(tr.record(uses), (2, 0));
        let usage = tr.take_dirty().remove(0).usage;
        assert_eq!(usage.tokens[0].requests, 1);
        assert_eq!(usage.tokens[0].requests_after_revocation, 1);
        let reported: Vec<Finding> = std::iter::from_fn(|| tr.next_check())
            .map(|c| c.finding)
            .filter(|f| matches!(f, Finding::AfterRevocation { .. }))
            .collect();
        assert!(
            matches!(&reported[..], [Finding::AfterRevocation { source: Some(s), .. }] if s == "10.0.0.66"),
            "{reported:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_vault_audit_connection_must_authenticate_its_first_line_in_time() {
        let tr = Tracker::default();
        tr.track(
            "t",
            "bot",
            "uid",
            &[entry(1, "accessor:acc1", TokenLife::Live)],
            None,
        );
        let metrics = Metrics::new();
        let line = |p: &str| {
            format!(
                "{p}{}\n",
                serde_json::json!({"type": "response", "time": "2026-11-29T10:00:00Z",
                    "auth": {"accessor": "acc1"}, "request": {"remote_address": "10.0.0.9"}})
            )
        };
        // Authenticated lines are taken, until one is not.
        let input = format!(
            "{}{}{}",
            line("0123456789abcdef"),
            line("0123456789abcdef"),
            line("wrong-prefix-xxxx")
        );
        read_vault_audit(input.as_bytes(), b"0123456789abcdef", &tr, &metrics).await;
        assert_eq!(tr.take_dirty()[0].usage.tokens[0].requests, 2);
        // A silent connection is dropped after FIRST_LINE_WITHIN.
        let (_client, server) = tokio::io::duplex(64);
        let started = tokio::time::Instant::now();
        read_vault_audit(server, b"0123456789abcdef", &tr, &metrics).await;
        assert_eq!(started.elapsed(), FIRST_LINE_WITHIN);
        assert!(
            metrics
                .encode()
                .contains("agenttoken_usage_events_total{result=\"unauthorized\"} 2")
        );
    }

    fn jwt_entry(
        revision: i64,
        token: &str,
        state: TokenLife,
        issuer: (IssuerKind, &str),
    ) -> HistoryEntry {
        HistoryEntry {
            revision,
            credential_id: Some(jwt_credential(token)),
            state: Some(state),
            expires_at: Some(Time("2026-11-29T12:00:00Z".parse().unwrap())),
            issuer: Some(crate::crd::IssuerRecord {
                kind: issuer.0,
                name: issuer.1.into(),
                uid: "u1".into(),
                type_: "jwt".into(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn introspection_is_active_only_for_a_live_token_at_the_issuer_that_minted_it() {
        let now: Timestamp = "2026-11-29T11:00:00Z".parse().unwrap();
        let current = jwt(r#"{"jti":"c1","sub":"t/bot","scope":"read","iss":"https://i","exp":1}"#);
        let previous = jwt(r#"{"jti":"p1","sub":"t/bot","scope":"read"}"#);
        let cluster = (IssuerKind::ClusterTokenIssuer, "platform");
        let tr = Tracker::default();
        tr.track(
            "t",
            "bot",
            "uid",
            &[
                jwt_entry(1, &previous, TokenLife::Grace, cluster),
                jwt_entry(2, &current, TokenLife::Live, cluster),
            ],
            None,
        );
        let at = |name: &str| IssuerPath::Cluster(name.into());
        let (answer, used) = introspect(&tr, &at("platform"), &current, now);
        assert_eq!(answer["active"], true);
        assert_eq!(answer["sub"], "t/bot");
        assert_eq!(answer["scope"], "read");
        assert_eq!(answer["jti"], "c1");
        assert!(used.is_some());
        assert_eq!(
            introspect(&tr, &at("platform"), &previous, now).0["active"],
            true
        );

        // Another issuer's endpoint, the same name as a TokenIssuer, a
        // token someone built with the same claims, an unknown token, and
        // the same token after its expiry: inactive, and nothing else said.
        let inactive = serde_json::json!({"active": false});
        assert_eq!(introspect(&tr, &at("other"), &current, now).0, inactive);
        let namespaced = IssuerPath::Namespaced {
            namespace: "t".into(),
            name: "platform".into(),
        };
        assert_eq!(introspect(&tr, &namespaced, &current, now).0, inactive);
        let forged = format!("{}x", &current[..current.len() - 1]);
        let (answer, used) = introspect(&tr, &at("platform"), &forged, now);
        assert_eq!((answer, used), (inactive.clone(), None));
        let late: Timestamp = "2026-11-29T12:00:00Z".parse().unwrap();
        assert_eq!(introspect(&tr, &at("platform"), &current, late).0, inactive);

        // A TokenIssuer's tokens are active at its own path, in its namespace.
        let own = (IssuerKind::TokenIssuer, "team-jwt");
        tr.track(
            "t",
            "ci",
            "uid",
            &[jwt_entry(1, "a.e30.b", TokenLife::Live, own)],
            None,
        );
        let path = |namespace: &str| IssuerPath::Namespaced {
            namespace: namespace.into(),
            name: "team-jwt".into(),
        };
        assert_eq!(
            introspect(&tr, &path("t"), "a.e30.b", now).0["active"],
            true
        );
        assert_eq!(introspect(&tr, &path("u"), "a.e30.b", now).0, inactive);
    }

    #[test]
    fn a_use_after_revocation_is_counted_apart_and_reported_once_per_revision() {
        let t0: Timestamp = "2026-11-29T11:00:00Z".parse().unwrap();
        let token = jwt(r#"{"jti":"c1"}"#);
        let cluster = (IssuerKind::ClusterTokenIssuer, "platform");
        let tr = Tracker::default();
        tr.track(
            "t",
            "bot",
            "uid",
            &[jwt_entry(1, &token, TokenLife::Live, cluster)],
            None,
        );
        let use_at = |at: Timestamp| Use {
            credential_id: jwt_credential(&token),
            also: None,
            at,
            source: Some("10.0.0.9".into()),
            user_agent: None,
        };
        tr.record([use_at(t0)]);
        // Revoked at t0 + 10 s (the ledger's revokedAt).
        let mut revoked = jwt_entry(1, &token, TokenLife::Revoked, cluster);
        revoked.revoked_at = Some(Time(t0 + jiff::SignedDuration::from_secs(10)));
        tr.track(
            "t",
            "bot",
            "uid",
            &[jwt_entry(2, "n.e30.s", TokenLife::Live, cluster), revoked],
            None,
        );
        let (answer, _) = introspect(&tr, &IssuerPath::Cluster("platform".into()), &token, t0);
        assert_eq!(answer["active"], false, "revoked: inactive");
        // Before, in the same second as, and well after the revocation.
        let s = |n| t0 + jiff::SignedDuration::from_secs(n);
        tr.record([use_at(s(5)), use_at(s(10)), use_at(s(11)), use_at(s(30))]);
        let usage = tr.take_dirty().remove(0).usage;
        let r1 = usage.tokens.iter().find(|u| u.revision == 1).unwrap();
        assert_eq!(
            r1.requests, 3,
            "the use before and the one in the second of the revocation"
        );
        assert_eq!(r1.requests_after_revocation, 2);
        assert_eq!(r1.last_used_after_revocation, Some(Time(s(30))));
        assert_eq!(
            usage.last_used,
            Some(Time(s(10))),
            "not moved by a stolen copy"
        );
        let mut reports = Vec::new();
        while let Some(c) = tr.next_check() {
            if let Finding::AfterRevocation { at, .. } = c.finding {
                reports.push((c.revision, at));
            }
        }
        assert_eq!(reports, [(1, s(11))], "one report per revision");
        // A restarted operator that reads the count back reports no more.
        let fresh = Tracker::default();
        fresh.track(
            "t",
            "bot",
            "uid",
            &[
                jwt_entry(2, "n.e30.s", TokenLife::Live, cluster),
                jwt_entry(1, &token, TokenLife::NotSupported, cluster),
            ],
            Some(&usage),
        );
        fresh.record([use_at(
            Timestamp::now() + jiff::SignedDuration::from_secs(5),
        )]);
        assert!(
            std::iter::from_fn(|| fresh.next_check())
                .all(|c| !matches!(c.finding, Finding::AfterRevocation { .. }))
        );
    }

    #[test]
    fn one_namespace_flooding_the_source_checks_delays_another_by_one_turn() {
        let tr = Tracker::default();
        let ids: Vec<String> = (0..40).map(|i| format!("jti:e{i}")).collect();
        for (i, id) in ids.iter().enumerate() {
            tr.track(
                "evil",
                &format!("t{i}"),
                "uid",
                &[entry(1, id, TokenLife::Live)],
                None,
            );
        }
        tr.track(
            "good",
            "bot",
            "uid",
            &[entry(1, "jti:g", TokenLife::Live)],
            None,
        );
        let at = |s: i64| Timestamp::from_second(1_900_000_000 + s).unwrap();
        // 40 tokens from 32 addresses each: 1,280 new sources, capped.
        let flood: Vec<Use> = ids
            .iter()
            .flat_map(|id| {
                (0..32).map(move |n| Use {
                    credential_id: id.clone(),
                    also: None,
                    at: at(n),
                    source: Some(format!("10.9.{}.{n}", id.len())),
                    user_agent: None,
                })
            })
            .collect();
        tr.record(flood);
        tr.record([Use {
            credential_id: "jti:g".into(),
            also: None,
            at: at(99),
            source: Some("10.244.1.5".into()),
            user_agent: None,
        }]);
        let order: Vec<String> = std::iter::from_fn(|| tr.next_check())
            .map(|c| c.namespace)
            .collect();
        assert_eq!(
            order.len(),
            MAX_PENDING_PER_NAMESPACE + 1,
            "the flood keeps its share only"
        );
        let good = order.iter().position(|n| n == "good").unwrap();
        assert!(
            good <= 1,
            "the other namespace's check comes within a turn: {good}"
        );
    }

    #[test]
    fn only_a_listed_bearer_token_is_authorized() {
        use sha2::Digest;
        let tokens: Vec<[u8; 32]> = vec![sha2::Sha256::digest(b"right").into()];
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, v.parse().unwrap());
            h
        };
        assert!(authorized(&tokens, &with("Bearer right")));
        assert!(!authorized(&tokens, &with("Bearer wrong")));
        assert!(!authorized(&tokens, &with("Basic right")));
        assert!(!authorized(&tokens, &HeaderMap::new()));
    }
}

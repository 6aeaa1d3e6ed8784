//! Usage tracking: which AgentToken revision a request was made with, when,
//! from where (issue 20).
//!
//! The issuer reports uses in its audit stream. kube-apiserver's audit
//! webhook backend POSTs `audit.k8s.io/v1` EventLists whose `user.extra`
//! carries `authentication.kubernetes.io/credential-id: JTI=<jti>` for a
//! service-account token; the operator recorded that JWT ID in the ledger
//! entry of the revision it minted (`credentialId: jti:<jti>`), never the
//! token. A use is mapped back by that id alone.
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
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::post;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, Resource};
use serde::Deserialize;
use tracing::{debug, warn};

use crate::crd::{AgentToken, HistoryEntry, MAX_USAGE_SOURCES, TokenLife, TokenUsage, UsageStatus};
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
/// own tokens, and a Vault child token's accessor (from its ledger
/// `handle`). `None` for anything else or anything malformed. The token is
/// only decoded, never kept.
pub fn credential_id(
    issuer_type: &str,
    platform_issuer: bool,
    token: &str,
    handle: &str,
) -> Option<String> {
    // A Vault/OpenBao child token: its accessor, as audit devices log it
    // (with `hmac_accessor = false`). Only from a ClusterTokenIssuer: a
    // namespaced issuer may point at a Vault its tenant runs, which can
    // answer any accessor, another namespace's token's included.
    if issuer_type == "vault" {
        if !platform_issuer {
            return None;
        }
        let accessor = handle.strip_prefix("vault-accessor:")?;
        return valid_id(accessor).then(|| format!("accessor:{accessor}"));
    }
    if issuer_type != "serviceAccount" && issuer_type != "jwt" {
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

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_CREDENTIAL_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// An AgentToken, by namespace and name.
type Key = (String, String);

#[derive(Default)]
struct Tracked {
    /// Credential id -> the AgentToken and revision that minted it.
    by_credential: HashMap<String, (Key, i64)>,
    /// Credential ids registered per AgentToken (to forget them).
    credentials: HashMap<Key, HashSet<String>>,
    /// Uses per AgentToken, by revision.
    uses: HashMap<Key, BTreeMap<i64, TokenUsage>>,
    /// AgentTokens whose uses changed since the last flush.
    dirty: HashSet<Key>,
    /// Sources already checked (or queued) per token revision.
    checked: HashMap<(Key, i64), HashSet<String>>,
    /// Sources to check against `spec.usage`, oldest first.
    pending: std::collections::VecDeque<Check>,
    /// The newest use of any token of an AgentToken, across rotations.
    last: HashMap<Key, Timestamp>,
}

/// Sources checked per token revision; beyond, uses are still counted but
/// their sources not checked (a token used from that many places is
/// reported long before).
const MAX_CHECKED: usize = 32;
/// Checks waiting at most; beyond, new sources wait for their next use.
const MAX_PENDING: usize = 4096;

/// A source to check against an AgentToken's `spec.usage`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub namespace: String,
    pub name: String,
    pub revision: i64,
    pub source: String,
}

/// Maps uses to AgentToken revisions and keeps them until flushed.
#[derive(Default)]
pub struct Tracker {
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
    pub at: Timestamp,
    pub source: Option<String>,
    pub user_agent: Option<String>,
}

impl Tracker {
    /// Registers the credential ids of an AgentToken's current and
    /// previous tokens (its two newest ledger entries with one), as its status
    /// says after a read or a write, and what status already says of their
    /// use (so a restarted operator counts on from there). Ids of tokens no
    /// longer current or previous are forgotten.
    pub fn track(
        &self,
        namespace: &str,
        name: &str,
        history: &[HistoryEntry],
        usage: Option<&UsageStatus>,
    ) {
        let key: Key = (namespace.to_string(), name.to_string());
        let mut t = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        // The two newest tokens with an id, whatever their state: the
        // current and the previous one (a revoked token's record of use is
        // the evidence of why it was revoked).
        let mut with_id: Vec<(i64, String)> = history
            .iter()
            .filter(|e| !matches!(e.state, Some(TokenLife::Minting)))
            .filter_map(|e| Some((e.revision, e.credential_id.clone()?)))
            .collect();
        with_id.sort_by_key(|e| std::cmp::Reverse(e.0));
        let wanted: HashMap<String, i64> =
            with_id.into_iter().take(2).map(|(r, id)| (id, r)).collect();
        let old = t.credentials.remove(&key).unwrap_or_default();
        for id in old.difference(&wanted.keys().cloned().collect()) {
            if t.by_credential.get(id).is_some_and(|(k, _)| *k == key) {
                t.by_credential.remove(id);
            }
        }
        if wanted.is_empty() {
            t.uses.remove(&key);
            t.dirty.remove(&key);
            t.checked.retain(|(k, _), _| *k != key);
            t.last.remove(&key);
            return;
        }
        if let Some(seen) = usage.and_then(|u| u.last_used.as_ref()) {
            let last = t.last.entry(key.clone()).or_insert(seen.0);
            *last = (*last).max(seen.0);
        }
        let revisions: HashSet<i64> = wanted.values().copied().collect();
        for (id, revision) in &wanted {
            // First come keeps an id: another AgentToken's ledger cannot
            // take over a credential id already tracked (ids are unique
            // per issuer; a clash is someone's error, not a reason to
            // misattribute uses).
            match t.by_credential.get(id) {
                Some((k, _)) if *k != key => continue,
                _ => {
                    t.by_credential.insert(id.clone(), (key.clone(), *revision));
                }
            }
        }
        t.credentials
            .insert(key.clone(), wanted.keys().cloned().collect());
        let uses = t.uses.entry(key).or_default();
        uses.retain(|r, _| revisions.contains(r));
        for seen in usage.map(|u| u.tokens.as_slice()).unwrap_or_default() {
            if revisions.contains(&seen.revision) {
                uses.entry(seen.revision).or_insert_with(|| seen.clone());
            }
        }
    }

    /// Forgets an AgentToken (deleted).
    pub fn forget(&self, namespace: &str, name: &str) {
        self.track(namespace, name, &[], None);
    }

    /// Records uses; returns how many were mapped to an AgentToken.
    pub fn record(&self, uses: impl IntoIterator<Item = Use>) -> (usize, usize) {
        let mut t = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (mut matched, mut unmatched) = (0, 0);
        for u in uses {
            let Some((key, revision)) = t.by_credential.get(&u.credential_id).cloned() else {
                unmatched += 1;
                continue;
            };
            matched += 1;
            let entry = t
                .uses
                .entry(key.clone())
                .or_default()
                .entry(revision)
                .or_insert_with(|| TokenUsage {
                    revision,
                    ..Default::default()
                });
            entry.requests += 1;
            let at = crate::rotation::whole_seconds(u.at);
            let last = t.last.entry(key.clone()).or_insert(at);
            *last = (*last).max(at);
            let entry = t
                .uses
                .get_mut(&key)
                .and_then(|m| m.get_mut(&revision))
                .expect("just inserted");
            if entry.last_used.as_ref().is_none_or(|l| l.0 < u.at) {
                entry.last_used = Some(Time(crate::rotation::whole_seconds(u.at)));
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
            t.dirty.insert(key.clone());
            if let Some(source) = u.source {
                let pending = t.pending.len();
                let checked = t.checked.entry((key.clone(), revision)).or_default();
                if checked.len() < MAX_CHECKED
                    && pending < MAX_PENDING
                    && checked.insert(source.clone())
                {
                    t.pending.push_back(Check {
                        namespace: key.0.clone(),
                        name: key.1.clone(),
                        revision,
                        source,
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
            .pop_front()
    }

    /// Resolves when a check may be waiting.
    pub async fn checks_waiting(&self) {
        self.checks.notified().await
    }

    /// A checked source was not expected: recorded with the token's use.
    pub fn unexpected(&self, c: &Check) {
        let mut t = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let key = (c.namespace.clone(), c.name.clone());
        let Some(entry) = t.uses.get_mut(&key).and_then(|u| u.get_mut(&c.revision)) else {
            return;
        };
        if entry.unexpected_sources.len() < MAX_USAGE_SOURCES
            && !entry.unexpected_sources.contains(&c.source)
        {
            entry.unexpected_sources.push(c.source.clone());
            t.dirty.insert(key);
            self.urgent.notify_one();
        }
    }

    /// A check that could not be made: the source is checked again at its
    /// next use.
    pub fn unchecked(&self, c: &Check) {
        let mut t = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let key = (c.namespace.clone(), c.name.clone());
        if let Some(set) = t.checked.get_mut(&(key, c.revision)) {
            set.remove(&c.source);
        }
    }

    /// The changed AgentTokens' `status.usage`, newest revision first, at
    /// most two; the dirty set is cleared.
    pub fn take_dirty(&self) -> Vec<(Key, UsageStatus)> {
        let mut t = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let dirty: Vec<Key> = t.dirty.drain().collect();
        dirty
            .into_iter()
            .filter_map(|key| {
                let uses = t.uses.get(&key)?;
                let tokens = uses.values().rev().take(2).cloned().collect();
                let last_used = t.last.get(&key).map(|l| Time(*l));
                Some((key, UsageStatus { tokens, last_used }))
            })
            .collect()
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
        for ((ns, name), usage) in tracker.take_dirty() {
            let api: Api<AgentToken> = Api::namespaced(client.clone(), &ns);
            let patch = serde_json::json!({
                "apiVersion": AgentToken::api_version(&()),
                "kind": AgentToken::kind(&()),
                "status": {"usage": usage},
            });
            match api
                .patch_status(
                    &name,
                    &PatchParams::apply(USAGE_MANAGER).force(),
                    &Patch::Apply(&patch),
                )
                .await
            {
                Ok(_) => debug!(namespace = %ns, agenttoken = %name, "usage written"),
                Err(kube::Error::Api(e)) if e.code == 404 => tracker.forget(&ns, &name),
                Err(e) => {
                    warn!(namespace = %ns, agenttoken = %name, error = %e, "usage write failed; retried");
                    tracker.retry((ns, name));
                }
            }
        }
    }
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
}

/// The use in one Vault/OpenBao audit entry (JSON, its prefix removed):
/// the `response` entry of a request made with a token whose accessor is
/// logged in clear (`hmac_accessor = false`). `None` for request entries,
/// requests without a token, hashed accessors, or what is not an entry.
pub fn parse_vault_audit(line: &[u8]) -> Option<Use> {
    let e: VaultEntry = serde_json::from_slice(line).ok()?;
    if e.kind != "response" {
        return None;
    }
    let accessor = e.auth?.accessor?;
    if !valid_id(&accessor) {
        return None;
    }
    Some(Use {
        credential_id: format!("accessor:{accessor}"),
        at: e.time?,
        source: e
            .request
            .and_then(|r| r.remote_address)
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
    /// Bearer tokens accepted (from `--usage-token-file`), as SHA-256 digests.
    pub tokens: Arc<Vec<[u8; 32]>>,
}

impl Endpoint {
    fn authorized(&self, headers: &HeaderMap) -> bool {
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
        self.tokens.iter().fold(false, |ok, t| {
            ok | (t.iter().zip(digest).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0)
        })
    }
}

/// `POST /audit`: kube-apiserver's audit webhook (a bearer token from the
/// webhook's kubeconfig). Answers 200 once the batch is recorded, 400 for
/// what is not an EventList, 401 without a valid token, 413 over
/// [`MAX_BATCH_BYTES`].
pub fn router(endpoint: Endpoint) -> Router {
    Router::new()
        .route("/audit", post(audit))
        .layer(DefaultBodyLimit::max(MAX_BATCH_BYTES))
        .with_state(endpoint)
}

async fn audit(State(e): State<Endpoint>, headers: HeaderMap, body: Bytes) -> StatusCode {
    if !e.authorized(&headers) {
        e.metrics.usage_events("unauthorized", 1);
        return StatusCode::UNAUTHORIZED;
    }
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

/// Serves [`router`] over TLS on `addr` until `shutdown`.
pub async fn serve(
    addr: std::net::SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    endpoint: Endpoint,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving usage reports (POST /audit)");
    let listener = TlsListener {
        tcp: listener,
        acceptor: tokio_rustls::TlsAcceptor::from(tls),
    };
    axum::serve(listener, router(endpoint))
        .with_graceful_shutdown(shutdown)
        .await
}

/// A TLS listener for axum: a failed handshake drops that connection only.
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, peer)) = self.tcp.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            // A slow or silent client must not hold up the next one.
            match tokio::time::timeout(Duration::from_secs(10), self.acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => return (tls, peer),
                _ => continue,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
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
            credential_id("serviceAccount", false, &t, "").as_deref(),
            Some("jti:6f1c-aa")
        );
        assert_eq!(
            credential_id("jwt", false, &t, "").as_deref(),
            Some("jti:6f1c-aa")
        );
        assert_eq!(
            credential_id("webhook", true, &t, "webhook-id:1"),
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
                credential_id("serviceAccount", false, &bad, ""),
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
        let (key, usage) = &dirty[0];
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
                at: Timestamp::from_second(1_900_000_000 + i).unwrap(),
                source: Some(format!("10.0.0.{i}")),
                user_agent: None,
            })
            .collect();
        tr.record(many);
        assert_eq!(
            tr.take_dirty()[0].1.tokens[0].sources.len(),
            MAX_USAGE_SOURCES
        );
        tr.track(
            "t",
            "bot",
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
        tr.track("t", "bot", &[entry(1, "jti:a", TokenLife::Live)], None);
        let uses = uses_in(vec![event("a", "10.0.0.1", "2026-11-29T11:00:00Z")]);
        tr.record(uses);
        let (_, written) = tr.take_dirty().remove(0);
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
            &[
                entry(3, "jti:c", TokenLife::Live),
                entry(2, "jti:b", TokenLife::Grace),
            ],
            Some(&written),
        );
        let uses = uses_in(vec![event("c", "10.0.0.1", "2026-11-29T10:00:00Z")]);
        fresh.record(uses);
        let (_, after) = fresh.take_dirty().remove(0);
        assert_eq!(
            after.last_used.as_ref().unwrap().0.to_string(),
            "2026-11-29T11:00:00Z",
            "an older use does not move it back"
        );
        assert!(after.tokens.iter().all(|t| t.revision != 1));
    }

    #[test]
    fn another_agent_tokens_ledger_cannot_take_over_a_tracked_id() {
        let tr = Tracker::default();
        tr.track("t", "bot", &[entry(1, "jti:a", TokenLife::Live)], None);
        tr.track("evil", "thief", &[entry(1, "jti:a", TokenLife::Live)], None);
        let uses = uses_in(vec![event("a", "10.0.0.1", "2026-11-29T11:00:00Z")]);
        tr.record(uses);
        let dirty = tr.take_dirty();
        assert_eq!(dirty[0].0, ("t".to_string(), "bot".to_string()));
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
            credential_id("vault", true, "s.token", "vault-accessor:aXbYc123").as_deref(),
            Some("accessor:aXbYc123")
        );
        assert_eq!(
            credential_id("vault", false, "s.token", "vault-accessor:aXbYc123"),
            None,
            "a namespaced issuer's Vault may be the tenant's"
        );
        assert_eq!(
            credential_id("vault", true, "s.token", "vault-lease:x/y"),
            None
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_vault_audit_connection_must_authenticate_its_first_line_in_time() {
        let tr = Tracker::default();
        tr.track(
            "t",
            "bot",
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
        assert_eq!(tr.take_dirty()[0].1.tokens[0].requests, 2);
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

    #[test]
    fn only_a_listed_bearer_token_is_authorized() {
        use sha2::Digest;
        let e = Endpoint {
            tracker: Arc::new(Tracker::default()),
            metrics: Arc::new(Metrics::new()),
            tokens: Arc::new(vec![sha2::Sha256::digest(b"right").into()]),
        };
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, v.parse().unwrap());
            h
        };
        assert!(e.authorized(&with("Bearer right")));
        assert!(!e.authorized(&with("Bearer wrong")));
        assert!(!e.authorized(&with("Basic right")));
        assert!(!e.authorized(&HeaderMap::new()));
    }
}

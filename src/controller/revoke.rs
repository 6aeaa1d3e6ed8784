//! The revocation queue's worker: every ledger entry in `Revoking` or
//! `Failed` whose attempt is due is sent to the issuer that minted it (by
//! UID, never the one `spec.issuerRef` names now), with the token itself
//! only when its fingerprint is the ledger's. The outcome goes back into
//! the ledger; a failure is retried with backoff until the token expires.
//! This runs on every reconcile and on deletion, independent of rotation.

use std::collections::BTreeMap;
use std::time::Duration;

use jiff::Timestamp;
use kube::api::Api;
use kube::runtime::events::EventType;
use secrecy::{ExposeSecret, SecretString};
use tracing::{info, instrument, warn};

use super::keeper::Keeper;
use super::ledger::{self, Handle, Outcome};
use super::reason::Reason;
use super::{Context, Error};
use crate::crd::{
    AgentTokenStatus, ClusterTokenIssuer, IssuerKind, IssuerRecord, RateLimit, TokenIssuer,
    TokenLife,
};
use crate::issuer::service_account::ServiceAccountIssuer;
use crate::issuer::{Issuer, IssuerError, Revocation, RevocationHandle};
use crate::rotation::fingerprint;

/// Longest one revocation may take, all its calls together.
pub const REVOKE_DEADLINE: Duration = Duration::from_secs(90);

/// The issuer the AgentToken refers to now, when it resolved.
pub struct CurrentIssuer<'a> {
    pub record: &'a IssuerRecord,
    pub backend: &'a dyn Issuer,
    /// Its rate-limit key and `policy.rateLimit`.
    pub key: &'a str,
    pub rate: Option<&'a RateLimit>,
}

/// An issuer the ledger names that is not the current one, resolved once
/// per pass: its backend, or why there is none.
type Resolved = Result<(Box<dyn Issuer>, String, Option<RateLimit>), String>;

/// Token values at hand, by revision: just minted, or read from the
/// tenant's Secret and verified against the ledger's fingerprint.
#[derive(Default)]
pub struct Values(BTreeMap<i64, SecretString>);

impl Values {
    /// Adds `value` for `revision` only if its fingerprint is the ledger's.
    pub fn offer(&mut self, status: &AgentTokenStatus, revision: i64, value: Option<SecretString>) {
        let Some(value) = value else { return };
        let matches = status.history.iter().any(|e| {
            e.revision == revision
                && !e.fingerprint.is_empty()
                && fingerprint(value.expose_secret().as_bytes()) == e.fingerprint
        });
        if matches {
            self.0.insert(revision, value);
        }
    }

    pub fn get(&self, revision: i64) -> Option<&SecretString> {
        self.0.get(&revision)
    }
}

/// Everything a pass needs about the AgentToken.
pub struct Subject<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
}

/// Runs due revocations (at most `limit`), recording each outcome in
/// `status`; returns Events to publish.
#[allow(clippy::too_many_arguments)]
#[instrument(skip_all, fields(namespace = %who.namespace, agenttoken = %who.name))]
pub async fn pass(
    ctx: &Context,
    who: &Subject<'_>,
    status: &mut AgentTokenStatus,
    current: Option<CurrentIssuer<'_>>,
    values: &Values,
    keeper: &mut Option<Keeper>,
    now: Timestamp,
    limit: usize,
) -> Result<Vec<(EventType, Reason, String)>, Error> {
    let mut events = Vec::new();
    let mut backends: BTreeMap<String, Resolved> = BTreeMap::new();
    for revision in ledger::due(status, now).into_iter().take(limit) {
        let Some(entry) = status
            .history
            .iter()
            .find(|e| e.revision == revision)
            .cloned()
        else {
            continue;
        };
        let recorded_type = entry.issuer.as_ref().map(|i| i.type_.as_str());
        let current_type = current.as_ref().map(|c| c.record.type_.as_str());
        let handle = ledger::handle_of(&entry, who.name, recorded_type.or(current_type));
        let (outcome, kind) = match handle {
            None => (
                Outcome::Impossible("no revocation handle was recorded for this token".into()),
                recorded_type.unwrap_or("unknown").to_string(),
            ),
            Some(Handle::Jwt) => (Outcome::NotSupported, "jwt".to_string()),
            Some(handle) => {
                let kind = handle.issuer_type().to_string();
                match attempt(
                    ctx,
                    who,
                    &entry,
                    &handle,
                    &current,
                    values,
                    keeper,
                    &mut backends,
                )
                .await?
                {
                    Ok(outcome) => (outcome, kind),
                    Err(wait) => {
                        // Over the issuer's rate: no attempt made, none counted.
                        let until = now
                            .checked_add(jiff::SignedDuration::try_from(wait).unwrap_or_default())
                            .unwrap_or(now);
                        ledger::defer(status, revision, until);
                        info!(
                            revision,
                            wait_ms = wait.as_millis() as u64,
                            "revocation waits for the issuer's rate budget"
                        );
                        continue;
                    }
                }
            }
        };
        let fp = entry.fingerprint.clone();
        match &outcome {
            Outcome::Revoked | Outcome::RevokedAs(_) => events.push((
                EventType::Normal,
                Reason::TokenRevoked,
                format!("revision {revision} ({fp}) revoked at the issuer"),
            )),
            Outcome::NotSupported => {}
            Outcome::Unconfirmed(m)
            | Outcome::Impossible(m)
            | Outcome::Retry(m)
            | Outcome::Unfindable(m) => {
                warn!(revision, error = %m, "revocation failed");
                events.push((
                    EventType::Warning,
                    Reason::RevocationFailed,
                    format!("revision {revision} ({fp}) could not be revoked: {m}"),
                ));
            }
        }
        ledger::record(status, revision, outcome, now);
        let state = status
            .history
            .iter()
            .find(|e| e.revision == revision)
            .and_then(|e| e.state)
            .unwrap_or(TokenLife::Failed);
        ctx.metrics.revocation(&kind, &format!("{state:?}"));
        info!(revision, state = ?state, "revocation attempt recorded");
    }
    Ok(events)
}

#[allow(clippy::too_many_arguments)]
async fn attempt(
    ctx: &Context,
    who: &Subject<'_>,
    entry: &crate::crd::HistoryEntry,
    handle: &Handle,
    current: &Option<CurrentIssuer<'_>>,
    values: &Values,
    keeper: &mut Option<Keeper>,
    backends: &mut BTreeMap<String, Resolved>,
) -> Result<Result<Outcome, Duration>, Error> {
    // The token itself, only if its fingerprint is the ledger's.
    let mut token = None;
    if handle.needs_token() {
        token = values.get(entry.revision).cloned();
        if token.is_none()
            && let Some(k) = keeper.as_ref()
        {
            token = k
                .get(entry.revision)
                .filter(|v| fingerprint(v.expose_secret().as_bytes()) == entry.fingerprint);
        }
        if token.is_none() {
            return Ok(Ok(Outcome::Impossible(
                "revoking it needs the token itself, which is no longer held".into(),
            )));
        }
    }
    if let Handle::VaultSearch(stored) = handle
        && crate::issuer::vault::parse_search(
            stored
                .strip_prefix(crate::issuer::vault::SEARCH)
                .unwrap_or_default(),
        )
        .is_none_or(|(uid, _)| uid != who.uid)
    {
        return Ok(Ok(Outcome::Impossible(
            "its search handle names another AgentToken".into(),
        )));
    }
    let same_issuer = |c: &CurrentIssuer<'_>| {
        entry
            .issuer
            .as_ref()
            .is_none_or(|rec| rec.uid == c.record.uid)
    };
    let backend: &dyn Issuer = match handle {
        Handle::Binding(binding) => {
            // The API server is this issuer: its rate applies when the
            // AgentToken still names it.
            if let Some(c) = current.as_ref().filter(|c| same_issuer(c))
                && let Err(wait) = ctx.try_revocation_budget(c.key, c.rate, entry.urgent)
            {
                return Ok(Err(wait));
            }
            let started = std::time::Instant::now();
            let result = ServiceAccountIssuer::new(ctx.client.clone())
                .revoke_binding(who.namespace, binding, who.uid)
                .await;
            ctx.metrics.observe_issuer_request(
                "serviceAccount",
                "revoke",
                result.is_ok(),
                started.elapsed(),
            );
            return Ok(Ok(match result {
                Ok(_) => Outcome::Revoked,
                Err(e @ IssuerError::Invalid(_)) => Outcome::Impossible(e.to_string()),
                Err(e) => Outcome::Retry(e.to_string()),
            }));
        }
        _ => {
            let resolved = match (&entry.issuer, current) {
                (Some(rec), Some(c)) if rec.uid == c.record.uid => Ok((c.backend, c.key, c.rate)),
                (Some(rec), _) => {
                    let key = format!("{:?}/{}/{}", rec.kind, rec.name, rec.uid);
                    if !backends.contains_key(&key) {
                        let b = minting_issuer(ctx, who.namespace, rec).await?;
                        backends.insert(key.clone(), b);
                    }
                    match backends.get(&key) {
                        Some(Ok((b, key, rate))) => Ok((b.as_ref(), key.as_str(), rate.as_ref())),
                        Some(Err(m)) => Err(m.clone()),
                        None => Err("the issuer could not be resolved".into()),
                    }
                }
                // An entry from before issuers were recorded: the current
                // issuer, only if it is of the handle's type.
                (None, Some(c)) => Ok((c.backend, c.key, c.rate)),
                (None, None) => Err("the issuer that minted it is not known".into()),
            };
            match resolved {
                Ok((b, key, rate)) => {
                    if b.kind() == handle.issuer_type()
                        && let Err(wait) = ctx.try_revocation_budget(key, rate, entry.urgent)
                    {
                        return Ok(Err(wait));
                    }
                    b
                }
                Err(m) => return Ok(Ok(Outcome::Impossible(m))),
            }
        }
    };
    if backend.kind() != handle.issuer_type() {
        return Ok(Ok(Outcome::Impossible(format!(
            "its handle is for a {} issuer, not the {} issuer it would be sent to",
            handle.issuer_type(),
            backend.kind()
        ))));
    }
    let stored = entry.handle.clone().unwrap_or_else(|| match handle {
        Handle::Binding(b) => b.clone(),
        _ => String::new(),
    });
    let started = std::time::Instant::now();
    let result = match tokio::time::timeout(
        REVOKE_DEADLINE,
        backend.revoke(who.namespace, &RevocationHandle(stored), token.as_ref()),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => Err(IssuerError::Unavailable(format!(
            "the issuer did not finish revoking within {}s",
            REVOKE_DEADLINE.as_secs()
        ))),
    };
    ctx.metrics
        .observe_issuer_request(backend.kind(), "revoke", result.is_ok(), started.elapsed());
    Ok(Ok(match result {
        Ok(Revocation::Revoked) => Outcome::Revoked,
        Ok(Revocation::RevokedAs(h)) => Outcome::RevokedAs(h.0),
        Ok(Revocation::NotSupported) => Outcome::NotSupported,
        Ok(Revocation::Unconfirmed(m)) => Outcome::Unconfirmed(m),
        // Not found: a create still in flight when the operator stopped
        // may land later, so it takes two complete searches in a row that
        // find nothing to say so (never `Revoked`: nothing confirmed a
        // token's death).
        Ok(Revocation::NotFound(m))
            if entry
                .message
                .as_deref()
                .is_some_and(|last| last.starts_with(crate::issuer::vault::NOT_FOUND)) =>
        {
            Outcome::Unconfirmed(m)
        }
        Ok(Revocation::NotFound(m)) => Outcome::Retry(m),
        Ok(Revocation::Unsearchable(m)) => Outcome::Unfindable(m),
        Err(e) => Outcome::Retry(e.to_string()),
    }))
}

/// The backend of the issuer recorded in a ledger entry, if that very
/// object (same UID) still exists.
async fn minting_issuer(ctx: &Context, ns: &str, rec: &IssuerRecord) -> Result<Resolved, Error> {
    let found = match rec.kind {
        IssuerKind::TokenIssuer => Api::<TokenIssuer>::namespaced(ctx.client.clone(), ns)
            .get_opt(&rec.name)
            .await?
            .filter(|i| i.metadata.uid.as_deref() == Some(rec.uid.as_str()))
            .map(|i| (i.spec, Some(ns), super::issuer_key(Some(ns), &rec.name))),
        IssuerKind::ClusterTokenIssuer => Api::<ClusterTokenIssuer>::all(ctx.client.clone())
            .get_opt(&rec.name)
            .await?
            .filter(|i| i.metadata.uid.as_deref() == Some(rec.uid.as_str()))
            .map(|i| (i.spec.0, None, super::issuer_key(None, &rec.name))),
    };
    Ok(match found {
        Some((spec, issuer_ns, key)) => {
            let rate = spec.policy.as_ref().and_then(|p| p.rate_limit.clone());
            ctx.issuer_backend(&spec, issuer_ns, &rec.name)
                .map(|b| (b, key, rate))
        }
        None => Err(format!(
            "the {:?} {:?} that minted it no longer exists; it dies at its expiry",
            rec.kind, rec.name
        )),
    })
}

/// Whether any due entry needs a token value not already at hand (so the
/// keeper must be read).
pub fn needs_keeper(
    status: &AgentTokenStatus,
    who: &Subject<'_>,
    values: &Values,
    now: Timestamp,
) -> bool {
    ledger::due(status, now).into_iter().any(|r| {
        values.get(r).is_none()
            && status.history.iter().any(|e| {
                e.revision == r
                    && ledger::handle_of(e, who.name, e.issuer.as_ref().map(|i| i.type_.as_str()))
                        .is_some_and(|h| h.needs_token())
            })
    })
}

/// Revisions whose kept token is still needed: open entries revoked by token.
pub fn kept_needed(status: &AgentTokenStatus, who: &Subject<'_>) -> Vec<i64> {
    status
        .history
        .iter()
        .filter(|e| ledger::is_open(e))
        .filter(|e| {
            ledger::handle_of(e, who.name, e.issuer.as_ref().map(|i| i.type_.as_str()))
                .is_some_and(|h| h.needs_token())
        })
        .map(|e| e.revision)
        .collect()
}

//! Reconcile of one AgentToken, in phases: fetch issuer → validate (pure) →
//! decide (pure) → mint → write Secret → revoke what is due → write status.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use super::consumers::{self, Need};
use super::decide::{self, Decision, Inputs};
use super::queue::Urgency;
use super::secret::{self, Desired, Ownership, SlotState, TokenState};
use super::status::{self, ISSUING, READY, Want};
use super::{Context, Error, FIELD_MANAGER, STATUS_MANAGER};
use crate::crd::{
    AgentToken, AgentTokenStatus, ClusterTokenIssuer, ConsumerPhase, ConsumerStatus,
    ConsumerStrategy, HandledTriggers, HistoryEntry, IssuerKind, MAX_CONSUMERS_IN_STATUS,
    RestartPolicy, RevocationState, RotationReason, TokenIssuer, TokenIssuerSpec, trigger_value,
};
use crate::issuer::{Issuer, IssuerError, MintRequest, Revocation, RevocationHandle};
use crate::rotation::{self, CronSchedule, RenewWindow};
use crate::{labels, policy};

/// Entries kept in `status.history`.
pub const HISTORY_LIMIT: usize = 10;
/// An issuer policy's maxLifetime when it sets none.
pub const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Lifetime asked for when neither the AgentToken nor the policy names one.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);
/// Longest one mint or revocation may take, all its calls together (each
/// HTTP call also has the issuer's own deadline).
const ISSUER_CALL_DEADLINE: Duration = Duration::from_secs(90);
/// Longest time between two looks at an AgentToken with nothing due.
const MAX_WAKE: Duration = Duration::from_secs(3600);

/// The issuer an AgentToken refers to, resolved.
pub struct ResolvedIssuer {
    /// `TokenIssuer/ns/name` or `ClusterTokenIssuer/name`: rate limits and metrics.
    pub key: String,
    pub spec: TokenIssuerSpec,
    pub cluster_scoped: bool,
}

impl ResolvedIssuer {
    /// A TokenIssuer's namespace (its Secrets live there); `None` for a
    /// ClusterTokenIssuer.
    fn namespace<'a>(&self, at_namespace: &'a str) -> Option<&'a str> {
        (!self.cluster_scoped).then_some(at_namespace)
    }
}

/// Why the AgentToken is not served, with the condition reason and Event.
pub struct Refusal {
    pub reason: &'static str,
    pub message: String,
    /// Event to emit (Warning) when the condition first appears.
    event: Option<&'static str>,
    requeue: Option<Duration>,
}

/// Reconciles one AgentToken. A panic (a bug meeting data it did not
/// expect) fails this object, which backs off, instead of the process.
pub async fn reconcile(at: Arc<AgentToken>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _slot = ctx
        .queue
        .admit(
            &at.namespace().unwrap_or_default(),
            urgency(&at, ctx.clock.now()),
        )
        .await;
    // Boxed: a reconcile waiting for its slot is then a small future; the
    // reconcile's own (large) state is allocated only once it runs.
    let result = guarded(Box::pin(reconcile_unguarded(at, ctx.clone()))).await;
    if let Err(Error::Panicked(message)) = &result {
        warn!(error = %message, "reconcile panicked; the object backs off");
        ctx.metrics.observe_reconcile(Duration::ZERO, Some("panic"));
    }
    result
}

/// Runs a reconcile, turning a panic into [`Error::Panicked`] (its message
/// cut to 200 characters) so only that object fails.
pub async fn guarded<F>(fut: F) -> Result<Action, Error>
where
    F: std::future::Future<Output = Result<Action, Error>>,
{
    use futures::FutureExt;
    match std::panic::AssertUnwindSafe(fut).catch_unwind().await {
        Ok(result) => result,
        Err(payload) => {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(Error::Panicked(message.chars().take(200).collect()))
        }
    }
}

/// How urgent a reconcile is, from the cached object (see `queue`).
pub fn urgency(at: &AgentToken, now: Timestamp) -> Urgency {
    let status = at.status.as_ref();
    let handled = status
        .and_then(|s| s.handled_triggers.as_ref())
        .and_then(|h| h.revoke.as_deref());
    let revoke_pending = at
        .annotations()
        .get(labels::REVOKE)
        .is_some_and(|v| !v.is_empty() && Some(trigger_value(v).as_str()) != handled);
    Urgency::of(
        at.meta().deletion_timestamp.is_some(),
        revoke_pending,
        status.and_then(|s| s.expires_at.as_ref()).map(|t| t.0),
        now,
    )
}

async fn reconcile_unguarded(at: Arc<AgentToken>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    // The cache may lag behind our own last status write (a Secret event can
    // arrive before the AgentToken's), and status is rebuilt from what we
    // read: act on the live object so history and revision never go back.
    let ns = at.namespace().unwrap_or_default();
    let live = match Api::<AgentToken>::namespaced(ctx.client.clone(), &ns)
        .get_opt(&at.name_any())
        .await
    {
        Ok(Some(live)) => Arc::new(live),
        Ok(None) => return Ok(Action::await_change()),
        Err(e) => {
            ctx.metrics
                .observe_reconcile(started.elapsed(), Some("kube"));
            return Err(e.into());
        }
    };
    let at = live;
    let result = reconcile_inner(&at, &ctx).await;
    if result.is_ok() {
        ctx.reset_failures(&format!(
            "{}/{}",
            at.namespace().unwrap_or_default(),
            at.name_any()
        ));
    }
    ctx.metrics.observe_reconcile(
        started.elapsed(),
        result.as_ref().err().map(Error::metric_reason),
    );
    result
}

async fn reconcile_inner(at: &AgentToken, ctx: &Context) -> Result<Action, Error> {
    let ns = at.namespace().ok_or(Error::MissingNamespace)?;
    if at.meta().deletion_timestamp.is_some() {
        return super::finalize::cleanup(at, ctx).await;
    }
    if ctx.protected_namespaces.contains(&ns) {
        return refuse(
            at,
            ctx,
            Refusal {
                reason: "NamespaceNotServed",
                message: format!(
                    "namespace {ns:?} is protected: the operator serves kube-system, kube-public, kube-node-lease and its own namespace only when told to (--serve-protected-namespaces)"
                ),
                event: Some("PolicyViolation"),
                requeue: None,
            },
        )
        .await;
    }
    super::finalize::ensure_finalizer(at, ctx).await?;

    // Phase: fetch the issuer.
    let issuer = match fetch_issuer(at, &ns, ctx).await? {
        Ok(issuer) => issuer,
        Err(refusal) => return refuse(at, ctx, refusal).await,
    };
    // Phase: validate (pure, plus the namespace's labels for a selector).
    let ns_labels = match issuer
        .spec
        .policy
        .as_ref()
        .and_then(|p| p.namespace_selector.as_ref())
    {
        Some(_) if issuer.cluster_scoped => {
            let nsobj = Api::<Namespace>::all(ctx.client.clone()).get(&ns).await?;
            nsobj.metadata.labels.unwrap_or_default()
        }
        _ => BTreeMap::new(),
    };
    let effective = match validate(at, &ns, &issuer, &ns_labels) {
        Ok(e) => e,
        Err(refusal) => {
            if refusal.reason == "PolicyViolation" {
                ctx.metrics.policy_violation();
            }
            return refuse(at, ctx, refusal).await;
        }
    };
    let backend = match ctx.issuer_backend(
        &issuer.spec,
        issuer.namespace(&ns),
        &at.spec.issuer_ref.name,
    ) {
        Ok(b) => b,
        Err(message) => {
            return refuse(
                at,
                ctx,
                Refusal {
                    reason: "IssuerNotReady",
                    message,
                    event: Some("IssuerUnavailable"),
                    requeue: None,
                },
            )
            .await;
        }
    };

    // Phase: read the Secret (only ever ours).
    let secret_name = at.secret_name();
    let key = at.secret_key();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let live = secrets.get_opt(&secret_name).await?;
    let uid = at.uid().ok_or(Error::MissingUid)?;
    if let Ownership::NotOwned = secret::ownership(live.as_ref(), &uid) {
        return refuse(
            at,
            ctx,
            Refusal {
                reason: "SecretNotOwned",
                message: format!(
                    "Secret {secret_name:?} exists and was not created by this AgentToken; it is never \
                     overwritten or adopted: delete it or choose another spec.secret.name"
                ),
                event: Some("SecretNotOwned"),
                requeue: Some(Duration::from_secs(60)),
            },
        )
        .await;
    }
    let view = secret::view(live.as_ref(), &key);
    let mut state = live.as_ref().map(secret::read_state).unwrap_or_default();

    // Phase: decide (pure).
    let now = ctx.clock.now();
    let old_status = at.status.clone().unwrap_or_default();
    let spec_hash = spec_hash(at, &effective);
    let window = renew_window(at);
    let cron = match at
        .spec
        .rotation
        .as_ref()
        .and_then(|r| r.schedule.as_deref())
    {
        Some(s) => match CronSchedule::parse(s) {
            Ok(c) => Some(c),
            Err(e) => {
                return refuse(
                    at,
                    ctx,
                    Refusal {
                        reason: "InvalidSpec",
                        message: format!("spec.rotation.schedule: {e}"),
                        event: None,
                        requeue: None,
                    },
                )
                .await;
            }
        },
        None => None,
    };
    let jitter_key = format!("{uid}/{}", view.current.as_ref().map_or(0, |c| c.revision));
    let annotations = at.annotations();
    // Trigger values acted on live in status, which tenants cannot write
    // (the Secret's record is read only by objects from before that).
    let handled = old_status.handled_triggers.clone().unwrap_or_default();
    let mut view = view;
    view.rotate_handled = handled.rotate.clone().or(view.rotate_handled.take());
    view.revoke_handled = handled.revoke.clone().or(view.revoke_handled.take());
    let rotate_trigger = annotations.get(labels::ROTATE).map(|v| trigger_value(v));
    let revoke_trigger = annotations.get(labels::REVOKE).map(|v| trigger_value(v));
    let recent_mints: Vec<rotation::PastMint> = old_status
        .history
        .iter()
        .filter_map(|h| {
            Some(rotation::PastMint {
                at: h.issued_at.as_ref()?.0,
                forced: h.reason.is_some_and(RotationReason::forced),
            })
        })
        .collect();
    let inputs = Inputs {
        now,
        spec_hash: &spec_hash,
        paused: at.spec.paused,
        window,
        cron: cron.as_ref(),
        jitter_key: &jitter_key,
        rotate_trigger: rotate_trigger.as_deref(),
        revoke_trigger: revoke_trigger.as_deref(),
        secret: &view,
        last_revision: old_status.revision,
        failed_attempts: old_status.failed_attempts.max(0) as u32,
        last_failure: old_status.last_failure_time.as_ref().map(|t| t.0),
        recent_mints: &recent_mints,
    };
    let mut decision = decide::decide(&inputs);
    // The issuer's rate budget: without one now, the mint waits for it and
    // frees its worker meanwhile instead of sleeping on it.
    let mut budget_wait = None;
    if decision.mint.is_some()
        && let Err(wait) = ctx.try_budget(&issuer.key, &issuer.spec)
    {
        decision.mint = None;
        budget_wait = Some(wait);
    }

    let mut status = old_status.clone();
    status.secret_name = Some(secret_name.clone());
    let mut events: Vec<(EventType, &'static str, String)> = Vec::new();
    let tokens = Tokens {
        current: secret::token_in(live.as_ref(), &key),
        previous: secret::token_in(live.as_ref(), &format!("{key}{}", secret::PREVIOUS_SUFFIX)),
    };
    let writer = SecretWriter {
        at,
        ctx,
        ns: &ns,
        name: &secret_name,
        key: &key,
        live: live.as_ref(),
        uid: &uid,
    };

    let mut report: Option<ConsumerReport> = None;
    if decision.mint.is_none()
        && let Some(cur) = state.current.clone()
        && view.current.as_ref().is_some_and(|c| c.data_intact)
        && consumers_to_check(at, &state, &old_status, cur.revision)
    {
        report = Some(consumers_step(at, ctx, &ns, &secret_name, &cur, &old_status, now).await);
    }

    let mut mint_failed = None;
    if let Some(m) = decision.mint {
        let Some(revision) = next_revision(ctx, &ns, at, &status, &state) else {
            return refuse(
                at,
                ctx,
                Refusal {
                    reason: "InvalidSpec",
                    message: "status.revision is at its maximum: no further token can be numbered"
                        .into(),
                    event: None,
                    requeue: None,
                },
            )
            .await;
        };
        let request = MintRequest {
            namespace: ns.clone(),
            name: at.name_any(),
            uid: uid.clone(),
            revision,
            scopes: effective.scopes.clone(),
            audiences: at.spec.audiences.clone(),
            service_account_name: at.spec.service_account_name.clone(),
            permissions: at.spec.permissions.clone(),
            repositories: at.spec.repositories.clone(),
            parameters: at.spec.parameters.clone(),
            lifetime: effective.lifetime.unwrap_or(DEFAULT_LIFETIME),
        };
        let started = std::time::Instant::now();
        // Each HTTP call has its own deadline; this bounds the whole mint
        // (several calls, Kubernetes reads) so a slot is never held longer.
        let minted = match tokio::time::timeout(ISSUER_CALL_DEADLINE, backend.mint(&request)).await
        {
            Ok(r) => r,
            Err(_) => Err(IssuerError::Unavailable(format!(
                "the issuer did not finish minting within {}s",
                ISSUER_CALL_DEADLINE.as_secs()
            ))),
        };
        ctx.metrics.observe_issuer_request(
            backend.kind(),
            "mint",
            minted.is_ok(),
            started.elapsed(),
        );
        // The grant, not the request, is what must fit the policy: a grant
        // over maxLifetime (a Vault mount default, an IdP's own lifetime)
        // is revoked at once, recorded, and never delivered.
        let minted = match minted {
            Ok(t) => match over_max_lifetime(&issuer, &t) {
                Some((granted, max)) => {
                    let outcome =
                        revoke(ctx, backend.as_ref(), &ns, &t.handle.0, Some(&t.token)).await;
                    let message = format!(
                        "the issuer granted {}, over policy.maxLifetime {}: revision {revision} was revoked at once ({outcome:?}) and not delivered",
                        rotation::format_duration(granted),
                        rotation::format_duration(max)
                    );
                    status.history.retain(|h| h.revision != revision);
                    status.history.push(HistoryEntry {
                        revision,
                        fingerprint: rotation::fingerprint(t.token.expose_secret().as_bytes()),
                        issued_at: Some(Time(t.issued_at)),
                        expires_at: Some(Time(t.expires_at)),
                        revoked_at: None,
                        revocation: RevocationState::Pending,
                        reason: Some(m.reason),
                        handle: Some(t.handle.0.clone()),
                        ..Default::default()
                    });
                    mark_revoked(&mut status, revision, outcome, now);
                    status.revision = status.revision.max(revision);
                    events.push((EventType::Warning, "PolicyViolation", message.clone()));
                    ctx.metrics.policy_violation();
                    Err(IssuerError::Invalid(message))
                }
                None => Ok(t),
            },
            Err(e) => Err(e),
        };
        match minted {
            Ok(minted) => {
                let fp = rotation::fingerprint(minted.token.expose_secret().as_bytes());
                let new_slot = SlotState {
                    revision,
                    fingerprint: fp.clone(),
                    issued_at: minted.issued_at,
                    expires_at: minted.expires_at,
                    handle: minted.handle.0.clone(),
                    spec_hash: spec_hash.clone(),
                    grace_until: None,
                };
                push_history(&mut status, &new_slot, m.reason);
                let grace = grace_period(at);
                let (keep, retire) =
                    plan_slots(&state, &view, m, grace, restarts_consumers(at), now);
                let mut next_state = TokenState {
                    current: Some(new_slot.clone()),
                    previous: keep.clone(),
                    rotate_handled: rotate_trigger.clone().or(view.rotate_handled.clone()),
                    revoke_handled: revoke_trigger.clone().or(view.revoke_handled.clone()),
                };
                status.handled_triggers = Some(HandledTriggers {
                    rotate: next_state.rotate_handled.clone(),
                    revoke: next_state.revoke_handled.clone(),
                });
                if keep.is_none() {
                    next_state.previous = None;
                }
                let previous_token = keep.as_ref().and_then(|_| tokens.current.clone());
                if let Err(e) = writer
                    .write(&next_state, Some(&minted.token), previous_token.as_ref())
                    .await
                {
                    // The new token never reached anyone: revoke it now.
                    let outcome = revoke(
                        ctx,
                        backend.as_ref(),
                        &ns,
                        &minted.handle.0,
                        Some(&minted.token),
                    )
                    .await;
                    mark_revoked(&mut status, revision, outcome, now);
                    status_write(at, ctx, status, &[]).await.ok();
                    return Err(e);
                }
                state = next_state;
                report =
                    Some(consumers_step(at, ctx, &ns, &secret_name, &new_slot, &status, now).await);
                for slot in retire {
                    let held = tokens.for_revision(&view, slot.revision);
                    let outcome = match trusted_handle(
                        &status,
                        &at.name_any(),
                        backend.kind(),
                        slot.revision,
                    ) {
                        Some(h) => revoke(ctx, backend.as_ref(), &ns, &h, held).await,
                        None => untrusted(ctx, backend.kind(), &ns, slot.revision),
                    };
                    if outcome == RevocationState::Failed {
                        events.push((
                            EventType::Warning,
                            "RevocationFailed",
                            format!(
                                "revision {} ({}) could not be revoked at the issuer",
                                slot.revision, slot.fingerprint
                            ),
                        ));
                    } else {
                        events.push((
                            EventType::Normal,
                            "TokenRevoked",
                            format!(
                                "revision {} ({}) revoked: {outcome:?}",
                                slot.revision, slot.fingerprint
                            ),
                        ));
                    }
                    mark_revoked(&mut status, slot.revision, outcome, now);
                }
                status.revision = revision;
                status.token_fingerprint = Some(fp.clone());
                status.issued_at = Some(Time(minted.issued_at));
                status.expires_at = Some(Time(minted.expires_at));
                status.last_rotation_reason = Some(m.reason);
                status.failed_attempts = 0;
                status.last_failure_message = None;
                status.last_failure_time = None;
                let (reason, verb) = if m.reason == RotationReason::Initial {
                    ("TokenIssued", "issued")
                } else {
                    ("TokenRotated", "rotated")
                };
                events.push((
                    EventType::Normal,
                    reason,
                    format!(
                        "token revision {revision} ({fp}) {verb} ({:?}), expires at {}",
                        m.reason, minted.expires_at
                    ),
                ));
                ctx.metrics.rotation(&format!("{:?}", m.reason), true);
                info!(namespace = %ns, agenttoken = %at.name_any(), revision, fingerprint = %fp, reason = ?m.reason, "token minted");
            }
            Err(e) => {
                ctx.metrics.rotation(&format!("{:?}", m.reason), false);
                warn!(namespace = %ns, agenttoken = %at.name_any(), error = %e, "mint failed");
                status.failed_attempts = status.failed_attempts.saturating_add(1);
                status.last_failure_time = Some(Time(now));
                status.last_failure_message = Some(e.to_string());
                let reason = if e.is_transient() {
                    "IssuerUnavailable"
                } else {
                    "RotationFailed"
                };
                events.push((
                    EventType::Warning,
                    reason,
                    format!("could not mint ({:?}): {e}", m.reason),
                ));
                // Fail safe: the last good token stays until it expires; an
                // expired one is removed rather than left stale.
                if view
                    .current
                    .as_ref()
                    .is_some_and(|c| c.data_intact && now >= c.expires_at)
                {
                    writer.write(&state, None, tokens.previous.as_ref()).await?;
                }
                mint_failed = Some(e);
            }
        }
    } else {
        let mut changed = false;
        let mut current_token = tokens
            .current
            .clone()
            .filter(|_| view.current.as_ref().is_some_and(|c| c.data_intact));
        // The previous token goes once its grace has passed AND every
        // consumer has rolled (or its rollout timed out).
        let consumers_settled = report.as_ref().is_none_or(|r| r.settled);
        if decision.retire_previous
            && consumers_settled
            && let Some(prev) = state.previous.take()
        {
            let outcome =
                match trusted_handle(&status, &at.name_any(), backend.kind(), prev.revision) {
                    Some(h) => {
                        revoke(ctx, backend.as_ref(), &ns, &h, tokens.previous.as_ref()).await
                    }
                    None => untrusted(ctx, backend.kind(), &ns, prev.revision),
                };
            mark_revoked(&mut status, prev.revision, outcome, now);
            events.push((
                EventType::Normal,
                "TokenRevoked",
                format!(
                    "previous token revision {} ({}) revoked after its grace period: {outcome:?}",
                    prev.revision, prev.fingerprint
                ),
            ));
            changed = true;
        }
        if decision.clear_expired {
            current_token = None;
            changed = true;
            events.push((
                EventType::Warning,
                "TokenExpired",
                "the token expired before a new one could be minted; removed from the Secret"
                    .into(),
            ));
        }
        let previous_token = state.previous.as_ref().and(tokens.previous.clone());
        if live.is_some()
            && (changed
                || !writer.up_to_date(&state, current_token.as_ref(), previous_token.as_ref()))
        {
            writer
                .write(&state, current_token.as_ref(), previous_token.as_ref())
                .await?;
        }
    }

    // Sweep: every binding not held by the Secret is a token nobody has;
    // revoke it and record it (the operator may have died after a mint).
    sweep_orphans(ctx, backend.as_ref(), &ns, at, &state, &mut status, now).await;

    if let Some(r) = &report {
        status.consumers = r
            .entries
            .iter()
            .take(MAX_CONSUMERS_IN_STATUS)
            .cloned()
            .collect();
        events.extend(r.events.iter().cloned());
    }

    // Phase: status.
    let token_valid = state.current.as_ref().is_some_and(|c| now < c.expires_at)
        && (decision.mint.is_some() && mint_failed.is_none()
            || view.current.as_ref().is_some_and(|c| c.data_intact));
    status.next_rotation_at = match (&mint_failed, decision.mint) {
        (None, Some(_)) => state.current.as_ref().map(|c| {
            Time(
                rotation::next_rotation(
                    c.issued_at,
                    c.expires_at,
                    window,
                    &format!("{uid}/{}", c.revision),
                    cron.as_ref(),
                )
                .due_at,
            )
        }),
        _ => decision.next_rotation_at.map(Time),
    };
    if at.spec.paused {
        status.next_rotation_at = None;
    }
    if let Some(c) = &state.current {
        ctx.metrics
            .token_expiry(&ns, &at.name_any(), &issuer.key, c.expires_at);
    }
    let conditions = conditions(
        &status,
        token_valid,
        mint_failed.as_ref(),
        &decision,
        at.spec.paused,
    );
    status_write(at, ctx, status, &conditions).await?;
    for (kind, reason, note) in events {
        ctx.publish(at, kind, reason, note).await;
    }

    // Requeue at the next due time.
    let wake = match (&mint_failed, decision.mint) {
        (Some(_), _) => {
            let attempts = old_status.failed_attempts.saturating_add(1).max(1) as u32;
            Some(rotation::backoff(attempts, &jitter_key))
        }
        (None, Some(_)) => Some(Duration::from_secs(1)),
        _ => decision.wake_at.map(|w| until(now, w)),
    };
    let wake = match budget_wait {
        Some(b) => Some(wake.map_or(b, |w| w.min(b))),
        None => wake,
    };
    // Consumers still rolling: look again soon (rollouts are polled, not watched,
    // so the operator does not cache every workload of the cluster).
    let wake = match report.as_ref().and_then(|r| r.poll) {
        Some(poll) => Some(wake.map_or(poll, |w| w.min(poll))),
        None => wake,
    };
    Ok(Action::requeue(
        wake.unwrap_or(MAX_WAKE)
            .clamp(Duration::from_millis(200), MAX_WAKE),
    ))
}

/// The tokens the live Secret holds (read once, never logged).
struct Tokens {
    current: Option<SecretString>,
    previous: Option<SecretString>,
}

impl Tokens {
    /// The held token of `revision`, if the Secret holds it.
    fn for_revision(&self, view: &decide::SecretView, revision: i64) -> Option<&SecretString> {
        if view
            .current
            .as_ref()
            .is_some_and(|c| c.revision == revision)
        {
            self.current.as_ref()
        } else if view
            .previous
            .as_ref()
            .is_some_and(|p| p.revision == revision)
        {
            self.previous.as_ref()
        } else {
            None
        }
    }
}

/// Writes the AgentToken's Secret: created with POST (so a Secret that
/// appeared meanwhile is never taken over), then kept with server-side apply
/// under one field manager, with the live object's UID as a precondition.
struct SecretWriter<'a> {
    at: &'a AgentToken,
    ctx: &'a Context,
    ns: &'a str,
    name: &'a str,
    key: &'a str,
    live: Option<&'a Secret>,
    uid: &'a str,
}

impl SecretWriter<'_> {
    fn render(
        &self,
        state: &TokenState,
        current: Option<&SecretString>,
        previous: Option<&SecretString>,
    ) -> Secret {
        let spec = self.at.spec.secret.clone().unwrap_or_default();
        secret::render(&Desired {
            name: self.name,
            namespace: self.ns,
            owner: owner_reference(self.at, self.uid),
            agent_token: &self.at.name_any(),
            key: self.key,
            extra_keys: &spec.extra_keys,
            labels: &spec.labels,
            annotations: &spec.annotations,
            state,
            current,
            previous,
        })
    }

    fn up_to_date(
        &self,
        state: &TokenState,
        current: Option<&SecretString>,
        previous: Option<&SecretString>,
    ) -> bool {
        self.live
            .is_some_and(|live| secret::up_to_date(live, &self.render(state, current, previous)))
    }

    async fn write(
        &self,
        state: &TokenState,
        current: Option<&SecretString>,
        previous: Option<&SecretString>,
    ) -> Result<(), Error> {
        let api: Api<Secret> = Api::namespaced(self.ctx.client.clone(), self.ns);
        let mut desired = self.render(state, current, previous);
        match self.live {
            None => {
                let pp = PostParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..Default::default()
                };
                match api.create(&pp, &desired).await {
                    Ok(_) => Ok(()),
                    Err(kube::Error::Api(s)) if s.code == 409 => {
                        Err(Error::SecretAppeared(self.name.to_string()))
                    }
                    Err(e) => Err(e.into()),
                }
            }
            Some(live) => {
                desired.metadata.uid = live.metadata.uid.clone();
                let pp = PatchParams::apply(FIELD_MANAGER).force();
                api.patch(self.name, &pp, &Patch::Apply(&desired)).await?;
                Ok(())
            }
        }
    }
}

fn owner_reference(at: &AgentToken, uid: &str) -> OwnerReference {
    OwnerReference {
        api_version: AgentToken::api_version(&()).into_owned(),
        kind: AgentToken::kind(&()).into_owned(),
        name: at.name_any(),
        uid: uid.to_string(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// Finds the referenced issuer, or says why the AgentToken cannot be served.
async fn fetch_issuer(
    at: &AgentToken,
    ns: &str,
    ctx: &Context,
) -> Result<Result<ResolvedIssuer, Refusal>, Error> {
    let name = &at.spec.issuer_ref.name;
    let not_found = |what: String| Refusal {
        reason: "IssuerNotFound",
        message: format!("{what} does not exist"),
        event: Some("IssuerUnavailable"),
        requeue: None,
    };
    Ok(match at.spec.issuer_ref.kind {
        IssuerKind::TokenIssuer => match Api::<TokenIssuer>::namespaced(ctx.client.clone(), ns)
            .get_opt(name)
            .await?
        {
            Some(i) => Ok(ResolvedIssuer {
                key: format!("TokenIssuer/{ns}/{name}"),
                spec: i.spec,
                cluster_scoped: false,
            }),
            None => Err(not_found(format!(
                "TokenIssuer {name:?} in namespace {ns:?}"
            ))),
        },
        IssuerKind::ClusterTokenIssuer => match Api::<ClusterTokenIssuer>::all(ctx.client.clone())
            .get_opt(name)
            .await?
        {
            Some(i) => Ok(ResolvedIssuer {
                key: format!("ClusterTokenIssuer/{name}"),
                spec: i.spec.0,
                cluster_scoped: true,
            }),
            None => Err(not_found(format!("ClusterTokenIssuer {name:?}"))),
        },
    })
}

/// Pure validation against the issuer's kind and policy (also what
/// `kubectl agenttoken plan` shows).
pub fn validate(
    at: &AgentToken,
    ns: &str,
    issuer: &ResolvedIssuer,
    ns_labels: &BTreeMap<String, String>,
) -> Result<policy::Effective, Refusal> {
    let violation = |message: String| Refusal {
        reason: "PolicyViolation",
        message,
        event: Some("PolicyViolation"),
        requeue: None,
    };
    let invalid = |message: String| Refusal {
        reason: "InvalidSpec",
        message,
        event: None,
        requeue: None,
    };
    at.spec.check().map_err(invalid)?;
    let pol = issuer.spec.policy.clone().unwrap_or_default();
    let p = issuer_policy(issuer).map_err(|message| Refusal {
        reason: "IssuerNotReady",
        message,
        event: Some("IssuerUnavailable"),
        requeue: None,
    })?;
    if issuer.cluster_scoped
        && let Some(sel) = &pol.namespace_selector
        && !super::selector::matches(sel, ns_labels)
    {
        return Err(violation(format!(
            "namespace {ns:?} does not match the issuer policy namespaceSelector of ClusterTokenIssuer {:?}",
            at.spec.issuer_ref.name
        )));
    }
    let Some(kind) = policy_kind(&issuer.spec) else {
        return Err(Refusal {
            reason: "IssuerNotReady",
            message: "the issuer sets no issuer kind".into(),
            event: Some("IssuerUnavailable"),
            requeue: None,
        });
    };
    if kind == policy::Kind::ServiceAccount {
        if at
            .spec
            .service_account_name
            .as_deref()
            .unwrap_or("")
            .is_empty()
        {
            return Err(invalid(
                "spec.serviceAccountName is required: the issuer is a serviceAccount issuer".into(),
            ));
        }
        if !at.spec.scopes.is_empty() {
            return Err(invalid(
                "spec.scopes has no meaning for a serviceAccount issuer (use audiences and RBAC on the ServiceAccount)".into(),
            ));
        }
    }
    let effective = policy::check(
        &p,
        &policy::Request {
            kind,
            namespace: ns,
            scopes: &at.spec.scopes,
            audiences: &at.spec.audiences,
            service_account: at.spec.service_account_name.as_deref(),
            repositories: &at.spec.repositories,
            permissions: &at.spec.permissions,
            parameters: &at.spec.parameters,
            // Checked by `check` above.
            lifetime: at.spec.lifetime.as_ref().and_then(|d| d.get().ok()),
            cluster_scoped_issuer: issuer.cluster_scoped,
        },
    )
    .map_err(|v| violation(v.to_string()))?;
    if kind == policy::Kind::ServiceAccount {
        let lifetime = effective.lifetime.unwrap_or(DEFAULT_LIFETIME);
        if lifetime < crate::issuer::service_account::MIN_LIFETIME {
            return Err(invalid(format!(
                "lifetime {} is below the Kubernetes TokenRequest minimum of 10m",
                rotation::format_duration(lifetime)
            )));
        }
    }
    Ok(effective)
}

/// The granted lifetime and the policy's maximum, when a grant exceeds it.
fn over_max_lifetime(
    issuer: &ResolvedIssuer,
    t: &crate::issuer::MintedToken,
) -> Option<(Duration, Duration)> {
    let granted =
        Duration::try_from(t.expires_at.duration_since(t.issued_at)).unwrap_or(Duration::MAX);
    let p = issuer_policy(issuer).ok()?;
    policy::grant_too_long(&p, granted).map(|max| (granted, max))
}

/// The grant dimensions an issuer kind has (see `policy::Kind`).
pub fn policy_kind(spec: &TokenIssuerSpec) -> Option<policy::Kind> {
    use policy::Kind;
    Some(if spec.service_account.is_some() {
        Kind::ServiceAccount
    } else if spec.oauth2.is_some() {
        Kind::OAuth2
    } else if let Some(v) = &spec.vault {
        if v.dynamic_secret.is_some() {
            Kind::VaultDynamic
        } else {
            Kind::VaultToken
        }
    } else if spec.github_app.is_some() {
        Kind::GithubApp
    } else if spec.webhook.is_some() {
        Kind::Webhook
    } else if spec.jwt.is_some() {
        Kind::Jwt
    } else {
        return None;
    })
}

/// The issuer's policy in plain values; `Err` names a field that does not parse.
pub fn issuer_policy(issuer: &ResolvedIssuer) -> Result<policy::Policy, String> {
    let pol = issuer.spec.policy.clone().unwrap_or_default();
    let max_lifetime = pol
        .max_lifetime
        .as_ref()
        .map(|d| d.get())
        .transpose()
        .map_err(|e| format!("the issuer's policy.maxLifetime {e}"))?;
    let mut allowed_permissions = BTreeMap::new();
    for (name, level) in &pol.allowed_permissions {
        let level = policy::Level::parse(level).ok_or_else(|| {
            format!("the issuer's policy.allowedPermissions.{name} is not read, write or admin")
        })?;
        allowed_permissions.insert(name.clone(), level);
    }
    Ok(policy::Policy {
        // Fail closed: without a maxLifetime a token lives at most a day.
        max_is_default: max_lifetime.is_none(),
        max_lifetime: max_lifetime.or(Some(DEFAULT_MAX_LIFETIME)),
        allowed_scopes: pol.allowed_scopes,
        // A selector alone admits the namespaces it matches.
        allowed_namespaces: if issuer.cluster_scoped
            && pol.allowed_namespaces.is_empty()
            && pol.namespace_selector.is_some()
        {
            vec!["*".into()]
        } else {
            pol.allowed_namespaces
        },
        allowed_audiences: pol.allowed_audiences,
        allowed_resources: pol.allowed_resources,
        allowed_service_accounts: pol.allowed_service_accounts,
        allowed_repositories: pol.allowed_repositories,
        allowed_permissions,
    })
}

/// Records a refusal in status (and an Event when it is new), then waits.
async fn refuse(at: &AgentToken, ctx: &Context, r: Refusal) -> Result<Action, Error> {
    let old = at.status.clone().unwrap_or_default();
    let was = status::find(&old.conditions, READY).map(|c| c.reason.clone());
    let conditions = vec![
        Want::new(READY, false, r.reason, r.message.clone()),
        Want::new(ISSUING, false, r.reason, "not issuing until this is fixed"),
    ];
    let mut st = old.clone();
    st.next_rotation_at = None;
    status_write(at, ctx, st, &conditions).await?;
    if was.as_deref() != Some(r.reason)
        && let Some(reason) = r.event
    {
        ctx.publish(at, EventType::Warning, reason, r.message.clone())
            .await;
    }
    Ok(match r.requeue {
        Some(d) => Action::requeue(d),
        // Issuer and spec changes trigger a reconcile; look again hourly anyway.
        None => Action::requeue(MAX_WAKE),
    })
}

fn conditions(
    status: &AgentTokenStatus,
    token_valid: bool,
    mint_failed: Option<&IssuerError>,
    decision: &Decision,
    paused: bool,
) -> Vec<Want> {
    let ready = if token_valid {
        Want::new(
            READY,
            true,
            "TokenValid",
            format!("revision {} is in the Secret", status.revision),
        )
    } else if let Some(e) = mint_failed {
        Want::new(READY, false, "RotationFailed", e.to_string())
    } else if status.failed_attempts > 0
        && let Some(m) = &status.last_failure_message
    {
        // Backing off between attempts: keep saying why there is no token.
        Want::new(READY, false, "RotationFailed", m.clone())
    } else if paused {
        Want::new(
            READY,
            false,
            "Paused",
            "spec.paused is true and no valid token is delivered",
        )
    } else {
        Want::new(
            READY,
            false,
            "TokenExpired",
            "no valid token is in the Secret",
        )
    };
    let issuing = match (mint_failed, decision.backoff_until) {
        (Some(e), _) => Want::new(
            ISSUING,
            true,
            if e.is_transient() {
                "IssuerUnavailable"
            } else {
                "MintFailed"
            },
            format!("attempt {} failed: {e}", status.failed_attempts),
        ),
        (None, Some(until)) => Want::new(
            ISSUING,
            true,
            "BackingOff",
            format!(
                "attempt {} failed ({}); next attempt at {until}",
                status.failed_attempts,
                status
                    .last_failure_message
                    .as_deref()
                    .unwrap_or("unknown error")
            ),
        ),
        (None, None) if decision.floor_until.is_some() => Want::new(
            ISSUING,
            true,
            "Throttled",
            format!(
                "a new token is due, but this AgentToken has minted often: the next mint waits until {} (per-AgentToken mint floor)",
                decision
                    .floor_until
                    .map(|t| t.to_string())
                    .unwrap_or_default()
            ),
        ),
        (None, None) if paused => Want::new(ISSUING, false, "Paused", "rotation is paused"),
        (None, None) => Want::new(ISSUING, false, "Idle", "no mint in progress"),
    };
    vec![ready, issuing]
}

/// Writes status through `/status` with server-side apply, only when it changed.
pub(super) async fn status_write(
    at: &AgentToken,
    ctx: &Context,
    mut status: AgentTokenStatus,
    want: &[Want],
) -> Result<(), Error> {
    let old = at.status.clone().unwrap_or_default();
    status.observed_generation = at.meta().generation;
    status.conditions = status::merge(&old.conditions, want, at.meta().generation, ctx.clock.now());
    if want.is_empty() {
        status.conditions = old.conditions.clone();
    }
    if status == old {
        return Ok(());
    }
    let api: Api<AgentToken> =
        Api::namespaced(ctx.client.clone(), &at.namespace().unwrap_or_default());
    let patch = serde_json::json!({
        "apiVersion": AgentToken::api_version(&()),
        "kind": AgentToken::kind(&()),
        "status": status,
    });
    api.patch_status(
        &at.name_any(),
        &PatchParams::apply(STATUS_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// Decides what happens to the old slots when a new token is delivered:
/// `keep` becomes the previous token for its grace period, `retire` is revoked now.
fn plan_slots(
    state: &TokenState,
    view: &decide::SecretView,
    m: decide::Mint,
    grace: Duration,
    hold_for_consumers: bool,
    now: Timestamp,
) -> (Option<SlotState>, Vec<SlotState>) {
    let mut retire = Vec::new();
    // Only one previous slot: an older previous token goes now.
    if let Some(p) = &state.previous {
        retire.push(p.clone());
    }
    let Some(cur) = state.current.clone() else {
        return (None, retire);
    };
    let intact = view.current.as_ref().is_some_and(|c| c.data_intact);
    let alive = now < cur.expires_at;
    // With no grace period the previous token is still held while consumers
    // roll: it goes as soon as they have.
    if m.revoke_current_now || !intact || !alive || (grace.is_zero() && !hold_for_consumers) {
        if alive || !intact {
            retire.push(cur);
        }
        return (None, retire);
    }
    let grace_until = now
        .checked_add(jiff::SignedDuration::try_from(grace).unwrap_or_default())
        .unwrap_or(cur.expires_at)
        .min(cur.expires_at);
    (
        Some(SlotState {
            grace_until: Some(grace_until),
            spec_hash: String::new(),
            ..cur
        }),
        retire,
    )
}

async fn revoke(
    ctx: &Context,
    backend: &dyn Issuer,
    ns: &str,
    handle: &str,
    token: Option<&SecretString>,
) -> RevocationState {
    let started = std::time::Instant::now();
    let result = match tokio::time::timeout(
        ISSUER_CALL_DEADLINE,
        backend.revoke(ns, &RevocationHandle(handle.to_string()), token),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => Err(IssuerError::Unavailable(format!(
            "the issuer did not finish revoking within {}s",
            ISSUER_CALL_DEADLINE.as_secs()
        ))),
    };
    ctx.metrics
        .observe_issuer_request(backend.kind(), "revoke", result.is_ok(), started.elapsed());
    let state = match result {
        Ok(Revocation::Revoked) => RevocationState::Revoked,
        Ok(Revocation::NotSupported) => RevocationState::NotSupported,
        Err(e) => {
            warn!(namespace = %ns, handle, error = %e, "revocation failed");
            RevocationState::Failed
        }
    };
    ctx.metrics
        .revocation(backend.kind(), &format!("{state:?}"));
    state
}

/// The revocation handle of `revision` from the ledger in status (which only
/// the operator writes), never from the Secret (whose record a namespace
/// admin can edit to aim a revocation at another team's Vault accessor or
/// token id). For the serviceAccount kind the handle is recomputed from the
/// revision (`<agenttoken>-binding-r<revision>`), so entries recorded
/// before handles were kept in status still revoke.
pub fn trusted_handle(
    status: &AgentTokenStatus,
    agent_token: &str,
    kind: &str,
    revision: i64,
) -> Option<String> {
    let recorded = status
        .history
        .iter()
        .find(|h| h.revision == revision)
        .and_then(|h| h.handle.clone());
    recorded.or_else(|| {
        (kind == "serviceAccount")
            .then(|| crate::issuer::service_account::binding_name(agent_token, revision))
    })
}

/// A token with no trusted record of how to revoke it: not revoked, said so.
fn untrusted(ctx: &Context, kind: &'static str, ns: &str, revision: i64) -> RevocationState {
    warn!(namespace = %ns, revision, "no trusted revocation record for this revision; not revoked");
    ctx.metrics.revocation(kind, "Failed");
    RevocationState::Failed
}

fn push_history(status: &mut AgentTokenStatus, slot: &SlotState, reason: RotationReason) {
    status.history.retain(|h| h.revision != slot.revision);
    status.history.push(HistoryEntry {
        revision: slot.revision,
        fingerprint: slot.fingerprint.clone(),
        issued_at: Some(Time(slot.issued_at)),
        expires_at: Some(Time(slot.expires_at)),
        revoked_at: None,
        revocation: RevocationState::Pending,
        reason: Some(reason),
        handle: Some(slot.handle.clone()),
        ..Default::default()
    });
    status.history.sort_by_key(|h| h.revision);
    let excess = status.history.len().saturating_sub(HISTORY_LIMIT);
    status.history.drain(..excess);
}

fn mark_revoked(
    status: &mut AgentTokenStatus,
    revision: i64,
    outcome: RevocationState,
    now: Timestamp,
) {
    match status.history.iter_mut().find(|h| h.revision == revision) {
        Some(h) => {
            h.revocation = outcome;
            if outcome != RevocationState::Failed {
                h.revoked_at = Some(Time(now));
            }
        }
        None => {
            // A token minted but never delivered (the operator stopped in between).
            status.history.push(HistoryEntry {
                revision,
                fingerprint: "unknown (never delivered)".into(),
                issued_at: None,
                expires_at: None,
                revoked_at: (outcome != RevocationState::Failed).then_some(Time(now)),
                revocation: outcome,
                reason: None,
                handle: None,
                ..Default::default()
            });
            status.history.sort_by_key(|h| h.revision);
            let excess = status.history.len().saturating_sub(HISTORY_LIMIT);
            status.history.drain(..excess);
        }
    }
}

/// Revokes binding objects of this AgentToken that no delivered token uses.
async fn sweep_orphans(
    ctx: &Context,
    backend: &dyn Issuer,
    ns: &str,
    at: &AgentToken,
    state: &TokenState,
    status: &mut AgentTokenStatus,
    now: Timestamp,
) {
    let held: Vec<&str> = [state.current.as_ref(), state.previous.as_ref()]
        .into_iter()
        .flatten()
        .map(|s| s.handle.as_str())
        .collect();
    let ceiling = revision_ceiling(status);
    for (name, revision) in ctx.bindings_of(ns, &at.name_any(), &at.uid().unwrap_or_default()) {
        // A revision far past what status knows is a forged label, not a
        // token of ours: never recorded, never acted on.
        if revision > ceiling {
            continue;
        }
        // Held, or already revoked (the cache has not seen the deletion yet).
        let revoked = status.history.iter().any(|h| {
            h.revision == revision
                && matches!(
                    h.revocation,
                    RevocationState::Revoked | RevocationState::NotSupported
                )
        });
        if held.contains(&name.as_str()) || revoked {
            continue;
        }
        let outcome = revoke(ctx, backend, ns, &name, None).await;
        info!(namespace = %ns, agenttoken = %at.name_any(), revision, "revoked a token that no Secret holds");
        mark_revoked(status, revision, outcome, now);
    }
}

/// How far past status a revision read from the Secret or a binding may
/// be and still be believed (each crash between a mint and the status
/// write can leave one revision unrecorded; a forged label can say anything).
const REVISION_SLACK: i64 = 16;

/// The highest revision status records (status.revision and history).
fn known_revision(status: &AgentTokenStatus) -> i64 {
    status
        .history
        .iter()
        .map(|h| h.revision)
        .fold(status.revision.max(0), i64::max)
}

/// The highest revision read from a Secret or a binding that is believed.
fn revision_ceiling(status: &AgentTokenStatus) -> i64 {
    known_revision(status).saturating_add(REVISION_SLACK)
}

/// The next revision: above every revision this AgentToken minted (status,
/// history, and within [`REVISION_SLACK`] of them the Secret and its own
/// bindings). `None` only if status itself is at `i64::MAX`.
fn next_revision(
    ctx: &Context,
    ns: &str,
    at: &AgentToken,
    status: &AgentTokenStatus,
    state: &TokenState,
) -> Option<i64> {
    let known = known_revision(status);
    let ceiling = revision_ceiling(status);
    let uid = at.uid().unwrap_or_default();
    let seen = [state.current.as_ref(), state.previous.as_ref()]
        .into_iter()
        .flatten()
        .map(|s| s.revision)
        .chain(
            ctx.bindings_of(ns, &at.name_any(), &uid)
                .into_iter()
                .map(|(_, r)| r),
        )
        .filter(|r| *r <= ceiling)
        .fold(known, i64::max);
    seen.checked_add(1)
}

pub fn renew_window(at: &AgentToken) -> RenewWindow {
    let r = at.spec.rotation.as_ref();
    match (
        r.and_then(|r| r.renew_before.as_ref())
            .and_then(|d| d.get().ok()),
        r.and_then(|r| r.renew_before_percentage),
    ) {
        (Some(d), _) => RenewWindow::Before(d),
        (None, Some(p)) => RenewWindow::Percentage(p.clamp(1, 99) as u8),
        (None, None) => RenewWindow::Percentage(rotation::DEFAULT_PERCENTAGE),
    }
}

fn grace_period(at: &AgentToken) -> Duration {
    at.spec
        .previous_token_grace_period
        .as_ref()
        .and_then(|d| d.get().ok())
        .unwrap_or(Duration::from_secs(600))
}

/// Hash of everything a minted token depends on: a change means SpecChanged.
fn spec_hash(at: &AgentToken, effective: &policy::Effective) -> String {
    let s = &at.spec;
    let material = serde_json::json!({
        "issuerRef": s.issuer_ref,
        "scopes": effective.scopes,
        "audiences": s.audiences,
        "serviceAccountName": s.service_account_name,
        "permissions": s.permissions,
        "repositories": s.repositories,
        "parameters": s.parameters,
        "lifetime": effective.lifetime.map(|d| d.as_secs()),
    });
    let digest = Sha256::digest(material.to_string().as_bytes());
    hex::encode(&digest[..8])
}

fn until(now: Timestamp, at: Timestamp) -> Duration {
    let d = at.duration_since(now);
    Duration::try_from(d).unwrap_or(Duration::ZERO)
}

/// What looking at the consumers found.
struct ConsumerReport {
    entries: Vec<ConsumerStatus>,
    /// Every consumer has the current revision (or will not get it): the
    /// previous token may be revoked.
    settled: bool,
    events: Vec<(EventType, &'static str, String)>,
    /// When to look again while something is in progress.
    poll: Option<Duration>,
}

/// Whether the AgentToken restarts or signals workloads at all.
fn restarts_consumers(at: &AgentToken) -> bool {
    at.spec
        .consumers
        .as_ref()
        .and_then(|c| c.restart)
        .unwrap_or_default()
        != RestartPolicy::None
}

/// Whether consumers need a look: only while a revision change is being
/// delivered (a previous token is held, or status says a rollout is unsettled).
fn consumers_to_check(
    at: &AgentToken,
    state: &secret::TokenState,
    status: &AgentTokenStatus,
    revision: i64,
) -> bool {
    restarts_consumers(at)
        && (state.previous.is_some()
            || status
                .consumers
                .iter()
                .any(|c| c.revision != revision || !c.phase.settled()))
}

/// Finds the consumers of the Secret and moves each towards `current`'s revision.
async fn consumers_step(
    at: &AgentToken,
    ctx: &Context,
    ns: &str,
    secret_name: &str,
    current: &SlotState,
    old: &AgentTokenStatus,
    now: Timestamp,
) -> ConsumerReport {
    let mut report = ConsumerReport {
        entries: Vec::new(),
        settled: true,
        events: Vec::new(),
        poll: None,
    };
    let spec = at.spec.consumers.clone().unwrap_or_default();
    if !restarts_consumers(at) {
        return report;
    }
    let workloads = match consumers::list(&ctx.client, ns).await {
        Ok(w) => w,
        Err(e) => {
            // Unknown consumers must not keep a previous token alive forever:
            // it is revoked at the end of its grace period, as without consumers.
            warn!(namespace = %ns, agenttoken = %at.name_any(), error = %e, "could not list consumers");
            report.entries = old.consumers.clone();
            report.events.push((
                EventType::Warning,
                "ConsumersUnknown",
                format!("could not list the workloads that use the Secret: {e}"),
            ));
            return report;
        }
    };
    let strategy = spec.strategy.unwrap_or_default();
    let annotation = consumers::annotation_key(&at.name_any());
    let revision = current.revision;
    let timeout = ctx.restarter.config.rollout_timeout;
    for w in consumers::select(&workloads, secret_name, &spec) {
        let before = old
            .consumers
            .iter()
            .find(|c| c.kind == w.key.kind.as_str() && c.name == w.key.name);
        // The rollout timeout runs from the first request this workload has
        // not settled, whatever revision it was for and whether or not it is
        // still queued: neither a queue nor a stream of new revisions can
        // keep a rollout, and so a previous token, alive forever.
        let restarted_before = before
            .filter(|c| c.revision == revision || !c.phase.settled())
            .and_then(|c| c.restarted_at.as_ref())
            .map(|t| t.0);
        let entry = match consumers::need(
            w,
            strategy,
            &annotation,
            revision,
            current.issued_at,
            before,
        ) {
            Need::UpToDate => {
                consumers::status_entry(w, revision, None, ConsumerPhase::UpToDate, None)
            }
            Need::Restart if strategy == ConsumerStrategy::RolloutRestart => {
                ctx.restarter.request(
                    w.key.clone(),
                    annotation.clone(),
                    revision.to_string(),
                    at.object_ref(&()),
                );
                let since = restarted_before.unwrap_or(now);
                if until(since, now) >= timeout {
                    if before.is_none_or(|b| b.phase != ConsumerPhase::TimedOut) {
                        report.events.push((
                            EventType::Warning,
                            "RolloutTimedOut",
                            format!(
                                "{}: restart queued since {since}, not applied within {}",
                                w.key,
                                rotation::format_duration(timeout)
                            ),
                        ));
                    }
                    consumers::status_entry(
                        w,
                        revision,
                        Some(since),
                        ConsumerPhase::TimedOut,
                        Some(format!(
                            "restart queued for longer than the rollout timeout ({})",
                            rotation::format_duration(timeout)
                        )),
                    )
                } else {
                    consumers::status_entry(
                        w,
                        revision,
                        Some(since),
                        ConsumerPhase::Pending,
                        Some("restart queued".into()),
                    )
                }
            }
            Need::Restart => {
                // Pods were annotated on an earlier pass: the signal waits
                // until the kubelet has had PROJECTION_SETTLE to write the new
                // token into their volumes, however soon this pass came.
                let settling = before
                    .filter(|b| b.revision == revision && b.phase == ConsumerPhase::Pending)
                    .filter(|b| {
                        b.restarted_at
                            .as_ref()
                            .is_some_and(|t| until(t.0, now) < consumers::PROJECTION_SETTLE)
                    });
                if let Some(b) = settling {
                    b.clone()
                } else {
                    let (phase, message) = consumers::signal(
                        &ctx.client,
                        w,
                        secret_name,
                        &spec,
                        &annotation,
                        revision,
                    )
                    .await;
                    let event = match phase {
                        ConsumerPhase::Failed => Some((EventType::Warning, "WorkloadSignalFailed")),
                        ConsumerPhase::Pending => None,
                        _ => Some((EventType::Normal, "WorkloadRestarted")),
                    };
                    if let Some((kind, reason)) = event {
                        report.events.push((
                            kind,
                            reason,
                            format!("{} signalled for revision {revision}: {message}", w.key),
                        ));
                    }
                    let since = if phase == ConsumerPhase::Pending {
                        restarted_before.unwrap_or(now)
                    } else {
                        now
                    };
                    consumers::status_entry(w, revision, Some(since), phase, Some(message))
                }
            }
            Need::Observe if strategy == ConsumerStrategy::Signal => match before {
                Some(b) => b.clone(),
                None => consumers::status_entry(w, revision, None, ConsumerPhase::Signaled, None),
            },
            Need::Observe => {
                let since = restarted_before.unwrap_or(now);
                let (phase, message) = consumers::observe(w, revision, since, now, timeout);
                if phase == ConsumerPhase::TimedOut
                    && before.is_none_or(|b| {
                        b.phase != ConsumerPhase::TimedOut || b.revision != revision
                    })
                {
                    report.events.push((
                        EventType::Warning,
                        "RolloutTimedOut",
                        format!("{}: {}", w.key, message.clone().unwrap_or_default()),
                    ));
                }
                consumers::status_entry(w, revision, Some(since), phase, message)
            }
        };
        let poll = match entry.phase {
            ConsumerPhase::Pending => Some(Duration::from_secs(2)),
            ConsumerPhase::RollingOut => Some(Duration::from_secs(5)),
            _ => None,
        };
        if let Some(p) = poll {
            report.settled = false;
            report.poll = Some(report.poll.map_or(p, |q: Duration| q.min(p)));
        }
        report.entries.push(entry);
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_reconcile_fails_that_object_and_the_process_goes_on() {
        let r = guarded(async {
            let revision: i64 = std::hint::black_box(i64::MAX);
            let _ = revision
                .checked_add(1)
                .expect("a bug met data it did not expect");
            Ok(Action::await_change())
        })
        .await;
        match r {
            Err(Error::Panicked(m)) => assert!(m.contains("did not expect"), "{m}"),
            other => panic!("{other:?}"),
        }
        // A long panic message is cut.
        let r = guarded(async { panic!("{}", "x".repeat(10_000)) }).await;
        assert!(matches!(r, Err(Error::Panicked(m)) if m.len() == 200));
        // And an ordinary result passes through.
        assert!(guarded(async { Ok(Action::await_change()) }).await.is_ok());
    }
}

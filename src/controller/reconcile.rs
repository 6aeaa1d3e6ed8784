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

use super::cached::CachedAgentToken;
use super::consumers::{self, Need};
use super::decide::{self, Decision, Inputs};
use super::keeper::Keeper;
use super::queue::Urgency;
use super::reason::Reason;
use super::secret::{self, Desired, Ownership, SlotState, TokenState};
use super::status::{self, ISSUING, READY, UNEXPECTED_SOURCE, USED_AFTER_REVOCATION, Want};
use super::workloads::Unavailable;
use super::{Context, Error, FIELD_MANAGER, STATUS_MANAGER};
use super::{ledger, revoke};
use crate::crd::{
    AgentToken, AgentTokenStatus, ClusterTokenIssuer, ConsumerPhase, ConsumerStatus,
    ConsumerStrategy, HandledTriggers, HistoryEntry, IssuerKind, IssuerRecord,
    MAX_CONSUMERS_IN_STATUS, RestartPolicy, RotationReason, TokenIssuer, TokenIssuerSpec,
    TokenLife, trigger_value,
};
use crate::issuer::{IssuerError, MintRequest, WriteAhead};
use crate::rotation::{self, CronSchedule, RenewWindow};
use crate::{labels, policy};

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
    pub reason: Reason,
    pub message: String,
    /// Event to emit (Warning) when the condition first appears.
    event: Option<Reason>,
    requeue: Option<Duration>,
}

/// Reconciles one AgentToken. A panic (a bug meeting data it did not
/// expect) fails this object, which backs off, instead of the process.
pub async fn reconcile(at: Arc<CachedAgentToken>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _slot = ctx
        .queue
        .admit(
            &at.namespace().unwrap_or_default(),
            urgency(&at, ctx.clock.now(), kill_switch(&at, &ctx)),
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

/// The kill switch of the issuer `at` names, from the issuer cache.
fn kill_switch(at: &CachedAgentToken, ctx: &Context) -> Option<Timestamp> {
    let r = &at.spec.issuer_ref;
    let ns = at.namespace().unwrap_or_default();
    // The cached AgentToken keeps neither labels nor spec (see
    // `cached`): of a scope, only the namespace globs can
    // be judged here; the rest is taken to match (an over-guess orders the
    // queue only; the reconcile decides).
    let covered = |spec: &TokenIssuerSpec, cluster_scoped: bool| {
        let before = spec.revoke_issued_before.as_ref()?.0;
        spec.revoke_scope
            .as_ref()
            .is_none_or(|s| namespace_in_scope(s, cluster_scoped, &ns))
            .then_some(before)
    };
    match r.kind {
        IssuerKind::ClusterTokenIssuer => covered(&ctx.issuers.cluster_issuer(&r.name)?.spec, true),
        IssuerKind::TokenIssuer => covered(&ctx.issuers.token_issuer(&ns, &r.name)?.spec, false),
    }
}

/// How urgent a reconcile is, from the cached object (see `queue`). A
/// token the issuer's kill switch (`kill`) covers is a revocation: those
/// go ahead of every replacement.
pub fn urgency(at: &CachedAgentToken, now: Timestamp, kill: Option<Timestamp>) -> Urgency {
    let status = at.status.as_ref();
    let handled = status
        .and_then(|s| s.handled_triggers.as_ref())
        .and_then(|h| h.revoke.as_deref());
    let killed = kill.is_some_and(|before| {
        before <= now
            && status
                .and_then(|s| s.issued_at.as_ref())
                .is_some_and(|t| t.0 < before)
            && status
                .and_then(|s| s.expires_at.as_ref())
                .is_some_and(|t| t.0 > now)
    });
    let revoke_pending = killed
        || at
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

async fn reconcile_unguarded(
    at: Arc<CachedAgentToken>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    if !ctx.bindings_synced() {
        return Ok(Action::requeue(Duration::from_millis(500)));
    }
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
        Ok(None) => {
            ctx.usage.forget(&ns, &at.name_any());
            return Ok(Action::await_change());
        }
        Err(e) => {
            ctx.metrics
                .observe_reconcile(started.elapsed(), Some("kube"));
            return Err(e.into());
        }
    };
    let at = live;
    // A drill this process does not measure, still `Running`: interrupted.
    if let Some(drill) = at.status.as_ref().and_then(|s| s.last_drill.as_ref()) {
        ctx.drills
            .interrupted(&ns, &at.name_any(), &at.uid().unwrap_or_default(), drill);
    }
    if let Some(st) = &at.status {
        ctx.usage.track(
            &ns,
            &at.name_any(),
            &at.uid().unwrap_or_default(),
            &st.history,
            st.usage.as_ref(),
        );
    }
    // Writes of this reconcile go on the version just read (an entry left
    // by a reconcile that panicked is stale).
    let uid = at.uid().unwrap_or_default();
    ctx.set_written(&uid, None);
    let result = reconcile_inner(&at, &ctx).await;
    ctx.set_written(&uid, None);
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
        return fail_closed(
            at,
            ctx,
            Refusal {
                reason: Reason::NamespaceNotServed,
                message: format!(
                    "namespace {ns:?} is protected: the operator serves kube-system, kube-public, kube-node-lease and its own namespace only when told to (--serve-protected-namespaces)"
                ),
                event: Some(Reason::PolicyViolation),
                requeue: None,
            },
        )
        .await;
    }
    super::finalize::ensure_finalizer(at, ctx).await?;

    // observe -> plan (pure) -> act -> report.
    let mut o = match observe(at, ctx, ns).await? {
        Observation::Seen(o) => *o,
        Observation::Refused(r) => return refuse(at, ctx, r).await,
        // Fail closed: tokens the policy refuses now, or from an issuer that
        // is gone, are revoked.
        Observation::Closed(r) => return fail_closed(at, ctx, r).await,
    };
    let plan = plan(&o.inputs(), ledger::open(&o.status));
    let acted = match act(at, ctx, &mut o, &plan).await? {
        Ok(acted) => acted,
        Err(r) => return refuse(at, ctx, r).await,
    };
    report(at, ctx, o, acted).await
}

/// One read of the world for a reconcile: the issuer, the policy's
/// effective request, the Secret (believed only when owned, its values only
/// by fingerprint) and the ledger brought up to date.
struct Observed {
    ns: String,
    name: String,
    uid: String,
    issuer: ResolvedIssuer,
    record: IssuerRecord,
    backend: Box<dyn crate::issuer::Issuer>,
    effective: policy::Effective,
    secret_name: String,
    key: String,
    live: Option<Secret>,
    now: Timestamp,
    old_status: AgentTokenStatus,
    /// The ledger after settling interrupted mints and expiries.
    status: AgentTokenStatus,
    values: revoke::Values,
    view: decide::SecretView,
    current: Option<HistoryEntry>,
    previous: Option<HistoryEntry>,
    spec_hash: String,
    window: RenewWindow,
    cron: Option<CronSchedule>,
    jitter_key: String,
    rotate_trigger: Option<String>,
    revoke_trigger: Option<String>,
    drill_trigger: Option<String>,
    /// `drill_trigger` is from `spec.drill.schedule`.
    drill_scheduled: bool,
    compromised: Option<i64>,
    /// `spec.usage.unusedAfter`'s verdict, and when to look again.
    unused: Option<(super::unused::Verdict, Option<Timestamp>)>,
    dormant: bool,
    recent_mints: Vec<rotation::PastMint>,
    paused: bool,
    /// The issuer is suspended (`spec.suspend`).
    suspended: bool,
    /// The issuer's kill switch covers the current / previous token.
    kill_current: bool,
    kill_previous: bool,
}

impl Observed {
    fn who(&self) -> revoke::Subject<'_> {
        revoke::Subject {
            namespace: &self.ns,
            name: &self.name,
            uid: &self.uid,
        }
    }

    /// The issuer `spec.issuerRef` names now, for the revocation queue.
    fn current_issuer(&self) -> Option<revoke::CurrentIssuer<'_>> {
        Some(revoke::CurrentIssuer {
            record: &self.record,
            backend: self.backend.as_ref(),
            key: &self.issuer.key,
            rate: self
                .issuer
                .spec
                .policy
                .as_ref()
                .and_then(|p| p.rate_limit.as_ref()),
        })
    }

    fn inputs(&self) -> Inputs<'_> {
        Inputs {
            now: self.now,
            spec_hash: &self.spec_hash,
            paused: self.paused,
            window: self.window,
            cron: self.cron.as_ref(),
            jitter_key: &self.jitter_key,
            rotate_trigger: self.rotate_trigger.as_deref(),
            revoke_trigger: self.revoke_trigger.as_deref(),
            drill_trigger: self.drill_trigger.as_deref(),
            drill_scheduled: self.drill_scheduled,
            compromised: self.compromised,
            dormant: self.dormant,
            was_dormant: self.old_status.dormant_since.is_some(),
            suspended: self.suspended,
            kill_current: self.kill_current,
            kill_previous: self.kill_previous,
            secret: &self.view,
            last_revision: self.old_status.revision,
            failed_attempts: self.old_status.failed_attempts.max(0) as u32,
            last_failure: self.old_status.last_failure_time.as_ref().map(|t| t.0),
            recent_mints: &self.recent_mints,
        }
    }

    fn writer<'a>(&'a self, at: &'a AgentToken, ctx: &'a Context) -> SecretWriter<'a> {
        SecretWriter {
            at,
            ctx,
            ns: &self.ns,
            name: &self.secret_name,
            key: &self.key,
            live: self.live.as_ref(),
            uid: &self.uid,
        }
    }
}

enum Observation {
    Seen(Box<Observed>),
    /// Not served; what was delivered stays.
    Refused(Refusal),
    /// Not served, and what was delivered is revoked.
    Closed(Refusal),
}

async fn observe(at: &AgentToken, ctx: &Context, ns: String) -> Result<Observation, Error> {
    let (issuer, identity) = match fetch_issuer(at, &ns, ctx).await? {
        Ok(found) => found,
        Err(refusal) => return Ok(Observation::Closed(refusal)),
    };
    if identity.deleting {
        return Ok(Observation::Closed(Refusal {
            reason: Reason::IssuerNotFound,
            message: format!(
                "{} is being deleted: its tokens are revoked and no new one is minted",
                issuer.key
            ),
            event: Some(Reason::IssuerUnavailable),
            requeue: None,
        }));
    }
    // Validate (pure, plus the namespace's labels for a selector).
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
        Err(refusal) if refusal.reason == Reason::PolicyViolation => {
            ctx.metrics.policy_violation();
            return Ok(Observation::Closed(refusal));
        }
        Err(refusal) => return Ok(Observation::Refused(refusal)),
    };
    let backend = match ctx.issuer_backend(
        &issuer.spec,
        issuer.namespace(&ns),
        &at.spec.issuer_ref.name,
    ) {
        Ok(b) => b,
        Err(message) => {
            return Ok(Observation::Refused(Refusal {
                reason: Reason::IssuerNotReady,
                message,
                event: Some(Reason::IssuerUnavailable),
                requeue: None,
            }));
        }
    };
    let cron = match at
        .spec
        .rotation
        .as_ref()
        .and_then(|r| r.schedule.as_deref())
    {
        Some(s) => match CronSchedule::parse(s) {
            Ok(c) => Some(c),
            Err(e) => {
                return Ok(Observation::Refused(Refusal {
                    reason: Reason::InvalidSpec,
                    message: format!("spec.rotation.schedule: {e}"),
                    event: None,
                    requeue: None,
                }));
            }
        },
        None => None,
    };

    // A drill: the annotation's, else one `spec.drill.schedule` says is due.
    let (drill_trigger, drill_scheduled) = match drill_due(at, Timestamp::now()) {
        Err(e) => {
            return Ok(Observation::Refused(Refusal {
                reason: Reason::InvalidSpec,
                message: format!("spec.drill.schedule: {e}"),
                event: None,
                requeue: None,
            }));
        }
        Ok(Some(id)) => (Some(id), true),
        Ok(None) => (
            at.annotations()
                .get(labels::DRILL)
                .map(|v| trigger_value(v)),
            false,
        ),
    };

    // The Secret: only ever ours.
    let secret_name = at.secret_name();
    let key = at.secret_key();
    // Before the first token nothing of ours can be in the Secret: unless
    // the watch of our Secrets shows one of that name, it is not read (a
    // Secret someone else made meanwhile fails the create, which never
    // takes it over; the token is then revoked and the next look reads).
    let first = at
        .status
        .as_ref()
        .is_none_or(|s| s.history.is_empty() && s.revision == 0);
    let live = if first && !ctx.labelled_secret(&ns, &secret_name) {
        None
    } else {
        Api::<Secret>::namespaced(ctx.client.clone(), &ns)
            .get_opt(&secret_name)
            .await?
    };
    ctx.secret_versions.record(
        &ns,
        &secret_name,
        live.as_ref()
            .and_then(|s| s.metadata.resource_version.as_deref()),
    );
    let uid = at.uid().ok_or(Error::MissingUid)?;
    if let Ownership::NotOwned = secret::ownership(live.as_ref(), &uid) {
        return Ok(Observation::Refused(Refusal {
            reason: Reason::SecretNotOwned,
            message: format!(
                "Secret {secret_name:?} exists and was not created by this AgentToken; it is never \
                 overwritten or adopted: delete it or choose another spec.secret.name"
            ),
            event: Some(Reason::SecretNotOwned),
            requeue: Some(Duration::from_secs(60)),
        }));
    }

    // The ledger: mints the last reconcile left unfinished (the operator
    // stopped), bindings no entry lists, expiries.
    let now = rotation::whole_seconds(ctx.clock.now());
    let name = at.name_any();
    let old_status = at.status.clone().unwrap_or_default();
    let mut status = old_status.clone();
    status.secret_name = Some(secret_name.clone());
    // A token kept before the operator stopped (its record not written
    // yet) is in our keeper: with it, the mint can be found and revoked.
    if Keeper::recorded(&status) && ledger::kept_unrecorded(&status).next().is_some() {
        match Keeper::load(ctx, &uid, &status).await {
            Ok(k) => ledger::found_in_keeper(&mut status, |r| k.get(r)),
            Err(e) => warn!(error = %e, "could not read the keeper"),
        }
    }
    recover(
        &mut status,
        live.as_ref(),
        &key,
        &name,
        grace_period(at),
        now,
    );
    adopt_bindings(
        ctx,
        &revoke::Subject {
            namespace: &ns,
            name: &name,
            uid: &uid,
        },
        &mut status,
        now,
    );
    ledger::normalize(&mut status, now);
    ledger::expire(&mut status, now);
    // Token values, believed only when their fingerprint is the ledger's.
    let values = held_values(&status, live.as_ref(), &key);
    let current = ledger::current(&status).cloned();
    let previous = ledger::previous(&status).cloned();
    let view = ledger_view(&status, live.is_some(), &values);
    let annotations = at.annotations();
    let recent_mints = old_status
        .history
        .iter()
        .filter_map(|h| {
            Some(rotation::PastMint {
                at: h.issued_at.as_ref()?.0,
                forced: h.reason.is_some_and(RotationReason::forced),
            })
        })
        .collect();
    let record = IssuerRecord {
        kind: at.spec.issuer_ref.kind,
        name: at.spec.issuer_ref.name.clone(),
        uid: identity.uid,
        type_: backend.kind().to_string(),
    };
    let unused = unused_verdict(at, at.status.as_ref(), ctx, &ns, &secret_name, now);
    let mut kill_current = killed(
        current
            .as_ref()
            .or_else(|| status.history.iter().max_by_key(|e| e.revision)),
        &record,
        &issuer.spec,
        now,
    );
    let mut kill_previous = killed(previous.as_ref(), &record, &issuer.spec, now);
    if (kill_current || kill_previous)
        && let Some(scope) = &issuer.spec.revoke_scope
    {
        let labels = match &scope.namespace_selector {
            Some(_) if issuer.cluster_scoped && ns_labels.is_empty() => {
                Api::<Namespace>::all(ctx.client.clone())
                    .get(&ns)
                    .await?
                    .metadata
                    .labels
                    .unwrap_or_default()
            }
            _ => ns_labels.clone(),
        };
        let covered = in_scope(scope, issuer.cluster_scoped, &ns, Some(&labels), at);
        kill_current &= covered;
        kill_previous &= covered;
    }
    Ok(Observation::Seen(Box::new(Observed {
        spec_hash: spec_hash(at, &effective),
        window: renew_window(at),
        jitter_key: format!("{uid}/{}", view.current.as_ref().map_or(0, |c| c.revision)),
        rotate_trigger: annotations.get(labels::ROTATE).map(|v| trigger_value(v)),
        revoke_trigger: annotations.get(labels::REVOKE).map(|v| trigger_value(v)),
        drill_trigger: drill_trigger.clone(),
        drill_scheduled,
        compromised: compromised(at),
        suspended: issuer.spec.suspend,
        kill_current,
        kill_previous,
        unused: unused.clone(),
        dormant: dormant(at, unused.as_ref().map(|(v, _)| v)),
        ns,
        name,
        uid,
        issuer,
        record,
        backend,
        effective,
        secret_name,
        key,
        live,
        now,
        old_status,
        status,
        values,
        view,
        current,
        previous,
        cron,
        recent_mints,
        paused: at.spec.paused,
    })))
}

/// `spec.usage.unusedAfter`'s verdict: whether a workload uses the Secret
/// (from the workload index, then, before saying `Unused`, the namespace's
/// Pods, Jobs and CronJobs; when either cannot say, no verdict) and when
/// any of the tokens was last used or issued.
fn unused_verdict(
    at: &AgentToken,
    status: Option<&AgentTokenStatus>,
    ctx: &Context,
    ns: &str,
    secret: &str,
    now: Timestamp,
) -> Option<(super::unused::Verdict, Option<Timestamp>)> {
    let after = at.spec.usage.as_ref()?.unused_after.as_ref()?.get().ok()?;
    // Unknown (the workload index not synced yet): no verdict, so neither a
    // revocation nor the end of a dormancy rests on a guess.
    let has_consumer = ctx
        .workloads
        .in_namespace(ns)
        .ok()
        .map(|ws| ws.iter().any(|w| w.uses(secret)))?;
    let usage = status.and_then(|s| s.usage.as_ref());
    let last_used = usage.and_then(|u| {
        u.tokens
            .iter()
            .filter_map(|t| t.last_used.as_ref())
            .chain(u.last_used.as_ref())
            .map(|t| t.0)
            .max()
    });
    let judged = super::unused::judge(&super::unused::Inputs {
        now,
        after,
        has_consumer,
        created_at: at.metadata.creation_timestamp.as_ref().map(|t| t.0),
        last_used,
    });
    // Unused by the index and by time: first make sure no bare Pod, Job or
    // CronJob uses the Secret (a snapshot shared by the namespace; none
    // yet: no verdict, asked again in 5 s).
    if matches!(judged.0, super::unused::Verdict::Unused { .. }) && ctx.others.uses(ns, secret)? {
        return Some((
            super::unused::Verdict::InUse(super::unused::OTHER_CONSUMER.into()),
            None,
        ));
    }
    Some(judged)
}

/// The id of a scheduled drill due now (`spec.drill.schedule`): the
/// schedule's latest time since the last drill started (or the AgentToken
/// was created), as `scheduled-<unix seconds>`, unless that drill was
/// handled already.
fn drill_due(at: &AgentToken, now: Timestamp) -> Result<Option<String>, String> {
    let Some(expr) = at.spec.drill.as_ref().and_then(|d| d.schedule.as_deref()) else {
        return Ok(None);
    };
    let cron = CronSchedule::parse(expr)?;
    let st = at.status.as_ref();
    let since = st
        .and_then(|s| s.last_drill.as_ref())
        .map(|d| d.started_at.0)
        .or(at.metadata.creation_timestamp.as_ref().map(|t| t.0))
        .unwrap_or(now);
    let Some(due) = cron.next_after(since).filter(|d| *d <= now) else {
        return Ok(None);
    };
    let id = format!("scheduled-{}", due.as_second());
    let handled = st
        .and_then(|s| s.handled_triggers.as_ref())
        .and_then(|h| h.drill.as_deref());
    Ok((handled != Some(id.as_str())).then_some(id))
}

/// When the next scheduled drill is due, for the wake-up.
fn next_drill(at: &AgentToken, now: Timestamp) -> Option<Timestamp> {
    let expr = at.spec.drill.as_ref()?.schedule.as_deref()?;
    CronSchedule::parse(expr).ok()?.next_after(now)
}

/// Whether the issuer's kill switch (`spec.revokeIssuedBefore`) covers
/// `entry`: that very issuer (by UID) minted it before that time. A token
/// another issuer minted (before `spec.issuerRef` changed) is not its to
/// kill.
/// A time still to come is not in force yet: the AgentTokens look again
/// then (a kill switch set for later is a scheduled one), and a token
/// minted meanwhile is not replaced over and over.
fn killed(
    entry: Option<&HistoryEntry>,
    record: &IssuerRecord,
    spec: &TokenIssuerSpec,
    now: Timestamp,
) -> bool {
    let (Some(e), Some(before)) = (entry, spec.revoke_issued_before.as_ref()) else {
        return false;
    };
    before.0 <= now
        && e.issuer.as_ref().is_some_and(|i| i.uid == record.uid)
        && e.issued_at.as_ref().is_some_and(|t| t.0 < before.0)
}

/// Whether a kill switch's `revokeScope.namespaces` globs cover `ns` (a
/// TokenIssuer's own namespace always is).
fn namespace_in_scope(scope: &crate::crd::RevokeScope, cluster_scoped: bool, ns: &str) -> bool {
    !cluster_scoped
        || scope.namespaces.is_empty()
        || scope
            .namespaces
            .iter()
            .any(|g| crate::policy::glob_match(g, ns))
}

/// Whether a kill switch's `revokeScope` covers the AgentToken `at` in
/// `ns`. Namespace parts bind only a ClusterTokenIssuer (a TokenIssuer
/// serves its own namespace; admission refuses them there). `ns_labels:
/// None` means unknown: the namespace selector is taken to match.
fn in_scope(
    scope: &crate::crd::RevokeScope,
    cluster_scoped: bool,
    ns: &str,
    ns_labels: Option<&BTreeMap<String, String>>,
    at: &AgentToken,
) -> bool {
    let labels = at.labels();
    let service_account = scope.service_accounts.is_empty()
        || at.spec.service_account_name.as_deref().is_some_and(|sa| {
            scope
                .service_accounts
                .iter()
                .any(|g| crate::policy::glob_match(g, sa))
        });
    let namespaces = namespace_in_scope(scope, cluster_scoped, ns);
    let namespace_labels = !cluster_scoped
        || match (&scope.namespace_selector, ns_labels) {
            (Some(sel), Some(l)) => super::selector::matches(sel, l),
            _ => true,
        };
    let own = scope
        .selector
        .as_ref()
        .is_none_or(|sel| super::selector::matches(sel, labels));
    namespaces && namespace_labels && own && service_account
}

/// The newest revision seen used from an unexpected address, when
/// `spec.usage.onUnexpectedSource` is `Revoke`.
fn compromised(at: &AgentToken) -> Option<i64> {
    at.spec
        .usage
        .as_ref()
        .filter(|u| u.on_unexpected_source == crate::crd::UnexpectedSourceAction::Revoke)?;
    at.status
        .as_ref()?
        .usage
        .as_ref()?
        .tokens
        .iter()
        .filter(|t| !t.unexpected_sources.is_empty())
        .map(|t| t.revision)
        .max()
}

/// What a reconcile does, from its observation alone.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// Mint (and why), retire the previous token, clear an expired one,
    /// when to look again.
    pub decision: Decision,
    /// A wanted mint held back: too many tokens still await revocation.
    pub backlog: bool,
}

/// Pure: decide, then hold a mint back while [`ledger::MAX_OPEN`] tokens
/// await revocation (revocations that do not complete must not pile up
/// live tokens).
pub fn plan(inputs: &Inputs<'_>, open_entries: usize) -> Plan {
    let mut decision = decide::decide(inputs);
    let backlog = decision.mint.is_some() && open_entries >= ledger::MAX_OPEN;
    if backlog {
        decision.mint = None;
    }
    Plan { decision, backlog }
}

/// What acting did, for the report.
struct Acted {
    decision: Decision,
    events: Vec<(EventType, Reason, String)>,
    consumers: Option<ConsumerReport>,
    mint_failed: Option<IssuerError>,
    delivered: bool,
    /// Look again by then: a held mint (budget, leadership, backlog).
    hold_wait: Option<Duration>,
    /// The keeper, when this reconcile read it.
    keeper: Option<Keeper>,
}

/// Runs the plan: admits a mint (rate budget, leadership), mints and
/// delivers, retires and clears, then works the revocation queue.
async fn act(
    at: &AgentToken,
    ctx: &Context,
    o: &mut Observed,
    plan: &Plan,
) -> Result<Result<Acted, Refusal>, Error> {
    let mut decision = plan.decision.clone();
    let mut hold_wait = plan.backlog.then_some(Duration::from_secs(30));
    if plan.backlog {
        warn!(namespace = %o.ns, agenttoken = %o.name, "too many tokens await revocation; not minting");
    }
    let rate_limited = o
        .issuer
        .spec
        .policy
        .as_ref()
        .is_some_and(|p| p.rate_limit.is_some());
    if let Some(m) = decision.mint
        && rate_limited
        && m.revoke_current_now
        && o.current.is_some()
        && !(m.reason == RotationReason::Drill && o.drill_scheduled)
    {
        // On a rate-limited issuer the revocation spends the budget first
        // (and may spend the emergency one); the replacement follows on
        // the next reconcile, within the shared budget.
        decision.withdraw_current = true;
        decision.mint = None;
        hold_wait = Some(Duration::from_millis(50));
    }
    if let Some(m) = decision.mint
        && let Err(wait) = ctx.try_budget(&o.issuer.key, &o.issuer.spec)
    {
        // Over the issuer's rate: the replacement waits, a token to revoke
        // at once does not (a scheduled drill waits whole).
        let scheduled = m.reason == RotationReason::Drill && o.drill_scheduled;
        decision.withdraw_current |= m.revoke_current_now && o.current.is_some() && !scheduled;
        decision.mint = None;
        hold_wait = Some(wait);
    }
    let mut deadline = ISSUER_CALL_DEADLINE;
    if decision.mint.is_some() {
        match lease_budget(ctx) {
            Some(d) => deadline = d,
            None => {
                decision.mint = None;
                hold_wait = Some(Duration::from_secs(2));
            }
        }
    }
    let mut acted = Acted {
        decision,
        events: Vec::new(),
        consumers: None,
        mint_failed: None,
        delivered: false,
        hold_wait,
        keeper: None,
    };
    let mut keeper: Option<Keeper> = None;

    if acted.decision.mint.is_none()
        && let Some(cur) = &o.current
        && o.values.get(cur.revision).is_some()
        && consumers_to_check(at, o.previous.is_some(), &o.old_status, cur.revision)
    {
        acted.consumers = Some(
            consumers_step(
                at,
                ctx,
                &o.ns,
                &o.secret_name,
                &slot(cur),
                &o.old_status,
                o.now,
            )
            .await,
        );
    }

    // A drill: measured from now, with the old token in hand (revoked now,
    // replaced now or once the mint floor allows).
    let drilling = acted
        .decision
        .mint
        .is_some_and(|m| m.reason == RotationReason::Drill)
        || (acted.decision.withdraw_current
            && o.drill_trigger.is_some()
            && o.drill_trigger != o.view.drill_handled);
    if drilling
        && let (Some(cur), Some(id)) = (&o.current, &o.drill_trigger)
        && let Some(token) = o.values.get(cur.revision)
        && let Ok(backend) = ctx.issuer_backend(
            &o.issuer.spec,
            o.issuer.namespace(&o.ns),
            &at.spec.issuer_ref.name,
        )
    {
        let target = at
            .spec
            .drill
            .as_ref()
            .and_then(|d| d.target.as_ref())
            .and_then(|t| t.get().ok())
            .unwrap_or(super::drills::DEFAULT_TARGET);
        ctx.drills.start(super::drills::Start {
            uid: o.uid.clone(),
            namespace: o.ns.clone(),
            name: o.name.clone(),
            id: id.clone(),
            revision: cur.revision,
            token: token.clone(),
            backend,
            target,
        });
    }
    if let Some(m) = acted.decision.mint
        && let Err(r) = mint_and_deliver(at, ctx, o, m, deadline, &mut acted, &mut keeper).await?
    {
        return Ok(Err(r));
    }
    if !acted.delivered {
        // The previous token goes once its grace has passed AND every
        // consumer has rolled (or its rollout timed out); an expired
        // current token leaves the Secret rather than stay stale.
        let settled = acted.consumers.as_ref().is_none_or(|r| r.settled);
        if acted.decision.revoke_previous_now
            && let Some(prev) = &o.previous
        {
            let why = if o.kill_previous {
                "revoked by the issuer's kill switch (spec.revokeIssuedBefore)"
            } else {
                "used from an unexpected address (spec.usage.onUnexpectedSource: Revoke)"
            };
            ledger::retire_now(&mut o.status, prev.revision, why, o.now);
        }
        if acted.decision.withdraw_current
            && let Some(cur) = ledger::current(&o.status).cloned()
        {
            let (what, reason) = if o.kill_current {
                (
                    "revoked by the issuer's kill switch (spec.revokeIssuedBefore)",
                    Reason::KillSwitch,
                )
            } else if o.drill_trigger.is_some() && o.drill_trigger != o.view.drill_handled {
                (
                    "revoked by a drill (agenttoken.dev/drill)",
                    Reason::TokenRevoked,
                )
            } else if o.compromised == Some(cur.revision) {
                (
                    "used from an unexpected address (spec.usage.onUnexpectedSource: Revoke)",
                    Reason::UnexpectedSource,
                )
            } else {
                (
                    "revoked on request (agenttoken.dev/revoke)",
                    Reason::TokenRevoked,
                )
            };
            let (why, until) = if o.suspended {
                (
                    format!("{what}; not replaced: the issuer is suspended"),
                    "until the issuer is resumed",
                )
            } else {
                (
                    format!("{what}; replaced as soon as a mint is allowed"),
                    "until its replacement is minted (mint floor, backoff or the issuer's rate)",
                )
            };
            ledger::retire_now(&mut o.status, cur.revision, &why, o.now);
            // No token in the Secret: the summary no longer names one (and
            // the queue serves the replacement after pending revocations).
            o.status.issued_at = None;
            o.status.expires_at = None;
            acted.events.push((
                EventType::Warning,
                if o.suspended {
                    Reason::IssuerSuspended
                } else {
                    reason
                },
                format!(
                    "revision {}: {why}; Secret {} holds no token {until}",
                    cur.revision, o.secret_name
                ),
            ));
        }
        if acted.decision.retire_previous
            && settled
            && let Some(prev) = &o.previous
        {
            ledger::retire(
                &mut o.status,
                prev.revision,
                "its grace period ended",
                o.now,
            );
        }
        if acted.decision.revoke_unused
            && let Some(cur) = ledger::current(&o.status).cloned()
        {
            ledger::retire(
                &mut o.status,
                cur.revision,
                "unused: no workload uses the Secret and the token was not used for spec.usage.unusedAfter",
                o.now,
            );
            o.status.dormant_since = Some(Time(rotation::whole_seconds(o.now)));
            ctx.metrics.unused_token("revoke");
            acted.events.push((
                EventType::Warning,
                Reason::Unused,
                format!(
                    "revision {} is unused (no workload uses Secret {} and the token was not used for spec.usage.unusedAfter): revoked; no new token until a workload uses the Secret (spec.usage.onUnused: Revoke)",
                    cur.revision, o.secret_name
                ),
            ));
        }
        if acted.decision.clear_expired {
            acted.events.push((
                EventType::Warning,
                Reason::TokenExpired,
                "the token expired before a new one could be minted; removed from the Secret"
                    .into(),
            ));
        }
        if o.live.is_some() {
            let now = o.now;
            let clear = acted.decision.clear_expired;
            let current_token = ledger::current(&o.status)
                .filter(|c| !clear && now < c.expires_at.as_ref().map_or(now, |t| t.0))
                .and_then(|c| o.values.get(c.revision).cloned());
            let previous_token =
                ledger::previous(&o.status).and_then(|p| o.values.get(p.revision).cloned());
            let writer = o.writer(at, ctx);
            if !writer.up_to_date(&o.status, current_token.as_ref(), previous_token.as_ref()) {
                writer
                    .write(&o.status, current_token.as_ref(), previous_token.as_ref())
                    .await?;
            }
        }
    }

    // The revocation queue: due entries go to the issuer that minted them.
    let mut status = std::mem::take(&mut o.status);
    ledger::expire(&mut status, o.now);
    if keeper.is_none() && revoke::needs_keeper(&status, &o.who(), &o.values, o.now) {
        keeper = Some(Keeper::load(ctx, &o.uid, &status).await?);
    }
    let mut revocation_events = revoke::pass(
        ctx,
        &o.who(),
        &mut status,
        o.current_issuer(),
        &o.values,
        &mut keeper,
        o.now,
        ledger::ATTEMPTS_PER_PASS,
    )
    .await?;
    acted.events.append(&mut revocation_events);
    ledger::prune(&mut status);
    o.status = status;
    // Tidied only once the ledger is written (report): a token dropped
    // from the keeper before its revocation is recorded could not be
    // revoked again after a crash.
    acted.keeper = keeper;
    Ok(Ok(acted))
}

/// Mints one token and delivers it: the intent is recorded before the
/// issuer call, the issuer's answer (and, when revoking needs it, the
/// token in the keeper) before the Secret is written, and a token that
/// never reached the Secret is revoked.
async fn mint_and_deliver(
    at: &AgentToken,
    ctx: &Context,
    o: &mut Observed,
    m: decide::Mint,
    deadline: Duration,
    acted: &mut Acted,
    keeper: &mut Option<Keeper>,
) -> Result<Result<(), Refusal>, Error> {
    let now = o.now;
    let Some(revision) = next_revision(ctx, &o.ns, at, &o.status) else {
        return Ok(Err(Refusal {
            reason: Reason::InvalidSpec,
            message: "status.revision is at its maximum: no further token can be numbered".into(),
            event: None,
            requeue: None,
        }));
    };
    let lifetime = o.effective.lifetime.unwrap_or(DEFAULT_LIFETIME);
    let max = issuer_policy(&o.issuer)
        .ok()
        .and_then(|p| p.max_lifetime)
        .unwrap_or(DEFAULT_MAX_LIFETIME)
        .max(lifetime);
    let request = MintRequest {
        namespace: o.ns.clone(),
        name: o.name.clone(),
        uid: o.uid.clone(),
        revision,
        scopes: o.effective.scopes.clone(),
        audiences: at.spec.audiences.clone(),
        service_account_name: at.spec.service_account_name.clone(),
        permissions: at.spec.permissions.clone(),
        repositories: at.spec.repositories.clone(),
        parameters: at.spec.parameters.clone(),
        lifetime,
    };
    // Intent before effect: after a crash from here on, the ledger knows a
    // token may exist, and how to find it where the issuer allows (a
    // serviceAccount binding, Vault token metadata).
    if o.status.keeper_intent.is_none()
        && matches!(o.backend.kind(), "oauth2" | "githubApp" | "webhook")
    {
        o.status.keeper_intent = Some(super::keeper::new_intent());
    }
    let search_handle = if o.backend.kind() == "serviceAccount" {
        Some(crate::issuer::service_account::binding_name(
            &o.name, revision,
        ))
    } else {
        o.backend.search_handle(&request).map(|h| h.0)
    };
    ledger::intend(
        &mut o.status,
        ledger::Intent {
            revision,
            issuer: o.record.clone(),
            reason: m.reason,
            spec_hash: o.spec_hash.clone(),
            handle: search_handle.clone(),
            valid_until: ledger::after(now, deadline + max, Timestamp::MAX),
        },
    );
    let write_ahead = o.backend.write_ahead();
    if write_ahead == WriteAhead::Full {
        status_write(at, ctx, o.status.clone(), &[]).await?;
    }
    let started = std::time::Instant::now();
    // Each HTTP call has its own deadline; this bounds the whole mint (and
    // ends it while this replica still holds the leader Lease).
    let (minted, ambiguous) = match tokio::time::timeout(deadline, o.backend.mint(&request)).await {
        Ok(r) => (r, false),
        Err(_) => (
            Err(IssuerError::Unavailable(format!(
                "the issuer did not finish minting within {}s",
                deadline.as_secs()
            ))),
            true,
        ),
    };
    ctx.metrics
        .observe_issuer_request(o.backend.kind(), "mint", minted.is_ok(), started.elapsed());
    // A replica frozen past its Lease (a paused VM, SIGSTOP) can see the
    // answer arrive after a standby took over: the ledger is the new
    // leader's now. Revoke what this call minted (a serviceAccount binding
    // the new leader revokes from the intent) and write nothing; the new
    // leader reads the intent as an interrupted mint.
    if !ctx.leadership.is_leader() {
        if let Ok(t) = &minted {
            let gone = tokio::time::timeout(
                revoke::REVOKE_DEADLINE,
                o.backend.revoke(&o.ns, &t.handle, Some(&t.token)),
            )
            .await;
            warn!(namespace = %o.ns, agenttoken = %o.name, revision, revoked = matches!(gone, Ok(Ok(_))), "leadership was lost during a mint; its token is revoked, not recorded");
        }
        return Err(Error::NotLeader);
    }
    let minted = match minted {
        Ok(t) => {
            ledger::minted(
                &mut o.status,
                revision,
                ledger::Minted {
                    fingerprint: rotation::fingerprint(t.token.expose_secret().as_bytes()),
                    issued_at: t.issued_at,
                    expires_at: t.expires_at,
                    handle: &t.handle.0,
                    credential_id: crate::usage::credential_id(
                        o.backend.kind(),
                        o.record.kind == crate::crd::IssuerKind::ClusterTokenIssuer,
                        t.token.expose_secret(),
                        &t.handle.0,
                        t.audit_id.as_deref(),
                    ),
                },
            );
            o.values.offer(&o.status, revision, Some(t.token.clone()));
            // The grant, not the request, must fit the policy: a grant over
            // maxLifetime is revoked at once and never delivered.
            match over_max_lifetime(&o.issuer, &t) {
                Some((granted, max)) => {
                    let message = format!(
                        "the issuer granted {}, over policy.maxLifetime {}: revision {revision} is revoked at once and not delivered",
                        rotation::format_duration(granted),
                        rotation::format_duration(max)
                    );
                    ledger::retire(
                        &mut o.status,
                        revision,
                        "granted over policy.maxLifetime",
                        now,
                    );
                    acted.events.push((
                        EventType::Warning,
                        Reason::PolicyViolation,
                        message.clone(),
                    ));
                    ctx.metrics.policy_violation();
                    Err(IssuerError::Invalid(message))
                }
                None => Ok(t),
            }
        }
        Err(e) => {
            if ambiguous || e.is_ambiguous() {
                // Cut off mid-call, or no answer after the request may
                // have reached the issuer: it may have minted after all.
                ledger::unanswered(
                    &mut o.status,
                    revision,
                    search_handle.is_some(),
                    "no answer arrived during this mint (it may have minted)",
                    now,
                );
            } else {
                // The issuer answered: nothing was minted (a binding left
                // behind is found by its owner UID and revoked).
                o.status.history.retain(|h| h.revision != revision);
            }
            Err(e)
        }
    };
    let minted = match minted {
        Ok(minted) => minted,
        Err(e) => {
            ctx.metrics.rotation(&format!("{:?}", m.reason), false);
            warn!(namespace = %o.ns, agenttoken = %o.name, error = %e, "mint failed");
            o.status.failed_attempts = o.status.failed_attempts.saturating_add(1);
            o.status.last_failure_time = Some(Time(now));
            o.status.last_failure_message = Some(e.to_string());
            let reason = if e.is_transient() {
                Reason::IssuerUnavailable
            } else {
                Reason::RotationFailed
            };
            acted.events.push((
                EventType::Warning,
                reason,
                format!("could not mint ({:?}): {e}", m.reason),
            ));
            acted.mint_failed = Some(e);
            return Ok(Ok(()));
        }
    };
    let fp = rotation::fingerprint(minted.token.expose_secret().as_bytes());
    let by_token =
        ledger::Handle::parse(&minted.handle.0, &o.name, revision).is_some_and(|h| h.needs_token());
    // Recorded (and, when revoking needs it, the token kept) before the
    // tenant's Secret is written.
    if by_token {
        // A first keeper (nothing recorded when this reconcile read the
        // AgentToken) is created, not read.
        let loaded = if Keeper::recorded(&o.old_status) {
            Keeper::load(ctx, &o.uid, &o.status).await
        } else {
            Ok(Keeper::none_yet(ctx, &o.uid, &o.status))
        };
        let kept = match loaded {
            Ok(mut k) => {
                let keep = revoke::kept_needed(&o.status, &o.who());
                let put = k
                    .put((&o.ns, &o.name), &o.uid, revision, &minted.token, &keep)
                    .await;
                *keeper = Some(k);
                put
            }
            Err(e) => Err(e),
        };
        match kept {
            Ok(uid) => o.status.keeper_uid = Some(uid),
            Err(e) => {
                // Not delivered without a way to revoke it later: revoke it
                // now, while its value is at hand.
                warn!(namespace = %o.ns, agenttoken = %o.name, error = %e, "could not keep the token for its revocation");
                return revoke_undelivered(
                    at,
                    ctx,
                    o,
                    revision,
                    "never delivered: it could not be kept for its revocation",
                    acted,
                    keeper,
                    e,
                )
                .await;
            }
        }
    }
    // Every kind, serviceAccount too: after a crash between the Secret
    // write and the final status, the next reconcile recognises the
    // delivered token by this fingerprint instead of revoking it as an
    // interrupted mint.
    if let Err(e) = status_write(at, ctx, o.status.clone(), &[]).await {
        // Not recorded: never delivered, and revoked while its value is
        // at hand (else the next look would only find an intent).
        return revoke_undelivered(
            at,
            ctx,
            o,
            revision,
            "never delivered: its record could not be written",
            acted,
            keeper,
            e,
        )
        .await;
    }
    let mut next = o.status.clone();
    let held_previous = shift_slots(
        &mut next,
        o.current.as_ref(),
        o.previous.as_ref(),
        &o.values,
        m,
        grace_period(at),
        restarts_consumers(at),
        now,
    );
    ledger::delivered(&mut next, revision);
    next.handled_triggers = Some(HandledTriggers {
        rotate: o.rotate_trigger.clone().or(o.view.rotate_handled.clone()),
        revoke: o.revoke_trigger.clone().or(o.view.revoke_handled.clone()),
        // Handled only by a drill's own mint: a first token delivered
        // while a drill was asked for does not count as the drill.
        drill: if m.reason == RotationReason::Drill {
            o.drill_trigger.clone().or(o.view.drill_handled.clone())
        } else {
            o.view.drill_handled.clone()
        },
    });
    let previous_token = held_previous.and_then(|r| o.values.get(r).cloned());
    let written = o
        .writer(at, ctx)
        .write(&next, Some(&minted.token), previous_token.as_ref())
        .await;
    let written = match written {
        Ok(()) => Ok(()),
        // A write that failed may still have been applied (a timeout after
        // the server took it): look before revoking.
        Err(e) => match Api::<Secret>::namespaced(ctx.client.clone(), &o.ns)
            .get_opt(&o.secret_name)
            .await
        {
            Ok(Some(s))
                if matches!(secret::ownership(Some(&s), &o.uid), Ownership::Owned)
                    && secret::token_in(Some(&s), &o.key).is_some_and(|v| {
                        rotation::fingerprint(v.expose_secret().as_bytes()) == fp
                    }) =>
            {
                Ok(())
            }
            _ => Err(e),
        },
    };
    if let Err(e) = written {
        // The new token never reached anyone: revoke it now.
        return revoke_undelivered(
            at,
            ctx,
            o,
            revision,
            "never delivered: the Secret write failed",
            acted,
            keeper,
            e,
        )
        .await;
    }
    o.status = next;
    acted.delivered = true;
    if let Some(cur) = ledger::current(&o.status) {
        acted.consumers =
            Some(consumers_step(at, ctx, &o.ns, &o.secret_name, &slot(cur), &o.status, now).await);
    }
    ledger::summarize(&mut o.status);
    let (reason, verb) = if m.reason == RotationReason::Initial {
        (Reason::TokenIssued, "issued")
    } else {
        (Reason::TokenRotated, "rotated")
    };
    acted.events.push((
        EventType::Normal,
        reason,
        format!(
            "token revision {revision} ({fp}) {verb} ({:?}), expires at {}",
            m.reason, minted.expires_at
        ),
    ));
    ctx.metrics.rotation(&format!("{:?}", m.reason), true);
    info!(namespace = %o.ns, agenttoken = %o.name, revision, fingerprint = %fp, reason = ?m.reason, "token minted");
    Ok(Ok(()))
}

/// A token minted and not delivered: revoked at once (its value is at
/// hand), recorded, and the reconcile fails with `error`.
#[allow(clippy::too_many_arguments)]
async fn revoke_undelivered(
    at: &AgentToken,
    ctx: &Context,
    o: &mut Observed,
    revision: i64,
    why: &str,
    acted: &mut Acted,
    keeper: &mut Option<Keeper>,
    error: Error,
) -> Result<Result<(), Refusal>, Error> {
    ledger::retire(&mut o.status, revision, why, o.now);
    let mut status = std::mem::take(&mut o.status);
    let ev = revoke::pass(
        ctx,
        &o.who(),
        &mut status,
        o.current_issuer(),
        &o.values,
        keeper,
        o.now,
        1,
    )
    .await
    .unwrap_or_default();
    for (kind, reason, note) in ev.into_iter().chain(acted.events.drain(..)) {
        ctx.publish(at, kind, reason, note).await;
    }
    status_write(at, ctx, status, &[]).await.ok();
    Err(error)
}

/// Status, conditions and Events from what happened, then when to look again.
async fn report(
    at: &AgentToken,
    ctx: &Context,
    o: Observed,
    acted: Acted,
) -> Result<Action, Error> {
    let Observed {
        ns,
        name,
        uid,
        issuer,
        now,
        old_status,
        mut status,
        values,
        window,
        cron,
        jitter_key,
        unused,
        dormant,
        suspended,
        ..
    } = o;
    let Acted {
        decision,
        mut events,
        consumers,
        mint_failed,
        delivered,
        hold_wait,
        mut keeper,
    } = acted;
    if let Some(r) = &consumers {
        status.consumers = r
            .entries
            .iter()
            .take(MAX_CONSUMERS_IN_STATUS)
            .cloned()
            .collect();
        events.extend(r.events.iter().cloned());
    }
    let current = ledger::current(&status).cloned();
    let token_valid = current.as_ref().is_some_and(|c| {
        c.expires_at.as_ref().is_some_and(|e| now < e.0)
            && (delivered || values.get(c.revision).is_some())
    });
    status.next_rotation_at = match (&mint_failed, delivered) {
        (None, true) => current.as_ref().map(|c| {
            let s = slot(c);
            Time(
                rotation::next_rotation(
                    s.issued_at,
                    s.expires_at,
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
    if let Some(c) = &current {
        ctx.metrics
            .token_expiry(&ns, &name, &issuer.key, slot(c).expires_at);
    }
    if delivered {
        status.dormant_since = None;
    }
    // Judged again on what this reconcile leaves (a token just delivered
    // starts the clock).
    let unused =
        unused.and_then(|_| unused_verdict(at, Some(&status), ctx, &ns, &at.secret_name(), now));
    let mut conditions = conditions(
        &status,
        token_valid,
        mint_failed.as_ref(),
        &decision,
        at.spec.paused,
        suspended,
    );
    if let Some((verdict, _)) = &unused {
        let was = old_status
            .conditions
            .iter()
            .any(|c| c.type_ == status::UNUSED && c.status == "True");
        let want = unused_condition(verdict, status.dormant_since.is_some());
        if want.status && !was && !dormant {
            // Reported only (onUnused: Report); a revocation said so above.
            ctx.metrics.unused_token("report");
            events.push((
                EventType::Warning,
                Reason::Unused,
                format!("{} (spec.usage.onUnused: Report)", want.message),
            ));
        }
        conditions.push(want);
    }
    // Events first: whoever sees the status also finds the Events that
    // explain it (what they say has happened either way).
    for (kind, reason, note) in events {
        ctx.publish(at, kind, reason, note).await;
    }
    let ledger_wake = ledger::wake(&status).map(|w| until(now, w));
    status_write(at, ctx, status.clone(), &conditions).await?;
    let who = revoke::Subject {
        namespace: &ns,
        name: &name,
        uid: &uid,
    };
    tidy_keeper(ctx, &who, &old_status, &mut status, &mut keeper).await;

    // Requeue at the next due time.
    let wake = match (&mint_failed, delivered) {
        (Some(_), _) => {
            let attempts = old_status.failed_attempts.saturating_add(1).max(1) as u32;
            Some(rotation::backoff(attempts, &jitter_key))
        }
        // Delivered: the next look is the new token's rotation, or the
        // end of the previous one's grace period (the ledger's wake).
        (None, true) => status.next_rotation_at.as_ref().map(|t| until(now, t.0)),
        _ => decision.wake_at.map(|w| until(now, w)),
    };
    let soonest = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let wake = soonest(wake, hold_wait);
    let wake = soonest(wake, ledger_wake);
    // Consumers still rolling: look again soon (rollouts are polled, not
    // watched, so the operator does not cache every workload of the cluster).
    let wake = soonest(wake, consumers.as_ref().and_then(|r| r.poll));
    // Unused: look again when it would turn unused; while dormant, every
    // 30 s for a workload that uses the Secret again (an index lookup).
    let wake = soonest(
        wake,
        unused.as_ref().and_then(|(_, w)| w.map(|w| until(now, w))),
    );
    let wake = soonest(wake, dormant.then_some(DORMANT_POLL));
    // The next scheduled drill.
    let wake = soonest(wake, next_drill(at, now).map(|t| until(now, t)));
    // A kill switch set for later: in force then.
    let wake = soonest(
        wake,
        issuer
            .spec
            .revoke_issued_before
            .as_ref()
            .filter(|t| t.0 > now)
            .map(|t| until(now, t.0)),
    );
    // No verdict yet (the workload index not synced): look again soon.
    let judged_later = unused.is_none()
        && at
            .spec
            .usage
            .as_ref()
            .is_some_and(|u| u.unused_after.is_some());
    let wake = soonest(wake, judged_later.then_some(Duration::from_secs(5)));
    Ok(Action::requeue(
        wake.unwrap_or(MAX_WAKE)
            .clamp(Duration::from_millis(200), MAX_WAKE),
    ))
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
        status: &AgentTokenStatus,
        current: Option<&SecretString>,
        previous: Option<&SecretString>,
    ) -> Secret {
        let spec = self.at.spec.secret.clone().unwrap_or_default();
        // The Secret's record says what it holds, for people; the operator
        // never reads it back (the ledger in status is the record).
        let state = &TokenState {
            current: ledger::current(status).map(slot),
            previous: ledger::previous(status).map(slot),
            rotate_handled: None,
            revoke_handled: None,
        };
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

    /// The watch event of this write is the operator's own: no reconcile.
    fn seen(&self, written: &Secret) {
        self.ctx.secret_versions.record(
            self.ns,
            self.name,
            written.metadata.resource_version.as_deref(),
        );
    }

    fn up_to_date(
        &self,
        status: &AgentTokenStatus,
        current: Option<&SecretString>,
        previous: Option<&SecretString>,
    ) -> bool {
        self.live
            .is_some_and(|live| secret::up_to_date(live, &self.render(status, current, previous)))
    }

    async fn write(
        &self,
        status: &AgentTokenStatus,
        current: Option<&SecretString>,
        previous: Option<&SecretString>,
    ) -> Result<(), Error> {
        if !self.ctx.leadership.is_leader() {
            return Err(Error::NotLeader);
        }
        let api: Api<Secret> = Api::namespaced(self.ctx.client.clone(), self.ns);
        let mut desired = self.render(status, current, previous);
        match self.live {
            None => {
                let pp = PostParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..Default::default()
                };
                match api.create(&pp, &desired).await {
                    Ok(created) => {
                        self.seen(&created);
                        Ok(())
                    }
                    Err(kube::Error::Api(s)) if s.code == 409 => {
                        Err(Error::SecretAppeared(self.name.to_string()))
                    }
                    Err(e) => Err(e.into()),
                }
            }
            Some(live) => {
                desired.metadata.uid = live.metadata.uid.clone();
                let pp = PatchParams::apply(FIELD_MANAGER).force();
                let applied = api.patch(self.name, &pp, &Patch::Apply(&desired)).await?;
                self.seen(&applied);
                // Keys the operator wrote when it created the Secret (a POST,
                // not an apply) stay after an apply that omits them: remove
                // the operator's own keys it no longer wants explicitly.
                let spec = self.at.spec.secret.clone().unwrap_or_default();
                let ours = [
                    self.key.to_string(),
                    format!("{}{}", self.key, secret::PREVIOUS_SUFFIX),
                    secret::EXPIRES_AT_KEY.to_string(),
                ]
                .into_iter()
                .chain(spec.extra_keys.keys().cloned());
                let want = desired.data.clone().unwrap_or_default();
                let have = applied.data.clone().unwrap_or_default();
                let stale: serde_json::Map<String, serde_json::Value> = ours
                    .filter(|k| have.contains_key(k) && !want.contains_key(k))
                    .map(|k| (k, serde_json::Value::Null))
                    .collect();
                if !stale.is_empty() {
                    let patch = serde_json::json!({
                        "metadata": {"uid": live.metadata.uid},
                        "data": stale,
                    });
                    let patched = api
                        .patch(self.name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await?;
                    self.seen(&patched);
                }
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

/// Which issuer object this is: its UID, and whether it is being deleted.
pub struct IssuerIdentity {
    pub uid: String,
    pub deleting: bool,
}

/// Finds the referenced issuer, or says why the AgentToken cannot be served.
async fn fetch_issuer(
    at: &AgentToken,
    ns: &str,
    ctx: &Context,
) -> Result<Result<(ResolvedIssuer, IssuerIdentity), Refusal>, Error> {
    let name = &at.spec.issuer_ref.name;
    let not_found = |what: String| Refusal {
        reason: Reason::IssuerNotFound,
        message: format!("{what} does not exist"),
        event: Some(Reason::IssuerUnavailable),
        requeue: None,
    };
    Ok(match at.spec.issuer_ref.kind {
        IssuerKind::TokenIssuer => match match ctx.issuers.token_issuer(ns, name) {
            Some(cached) => Some((*cached).clone()),
            // Not in the cache: the API server decides (a missing issuer
            // revokes tokens; a cache behind its watch must not).
            None => {
                Api::<TokenIssuer>::namespaced(ctx.client.clone(), ns)
                    .get_opt(name)
                    .await?
            }
        } {
            Some(i) => Ok((
                ResolvedIssuer {
                    key: super::issuer_key(Some(ns), name),
                    spec: i.spec,
                    cluster_scoped: false,
                },
                IssuerIdentity {
                    uid: i.metadata.uid.unwrap_or_default(),
                    deleting: i.metadata.deletion_timestamp.is_some(),
                },
            )),
            None => Err(not_found(format!(
                "TokenIssuer {name:?} in namespace {ns:?}"
            ))),
        },
        IssuerKind::ClusterTokenIssuer => match match ctx.issuers.cluster_issuer(name) {
            Some(cached) => Some((*cached).clone()),
            None => {
                Api::<ClusterTokenIssuer>::all(ctx.client.clone())
                    .get_opt(name)
                    .await?
            }
        } {
            Some(i) => Ok((
                ResolvedIssuer {
                    key: super::issuer_key(None, name),
                    spec: i.spec.0,
                    cluster_scoped: true,
                },
                IssuerIdentity {
                    uid: i.metadata.uid.unwrap_or_default(),
                    deleting: i.metadata.deletion_timestamp.is_some(),
                },
            )),
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
        reason: Reason::PolicyViolation,
        message,
        event: Some(Reason::PolicyViolation),
        requeue: None,
    };
    let invalid = |message: String| Refusal {
        reason: Reason::InvalidSpec,
        message,
        event: None,
        requeue: None,
    };
    at.spec.check().map_err(invalid)?;
    let pol = issuer.spec.policy.clone().unwrap_or_default();
    let p = issuer_policy(issuer).map_err(|message| Refusal {
        reason: Reason::IssuerNotReady,
        message,
        event: Some(Reason::IssuerUnavailable),
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
            reason: Reason::IssuerNotReady,
            message: "the issuer sets no issuer kind".into(),
            event: Some(Reason::IssuerUnavailable),
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

/// A refusal that also ends the tokens already delivered: the policy no
/// longer allows them, or their issuer is gone. Each open ledger entry is
/// revoked (at the issuer recorded with it) and the Secret keeps no token.
async fn fail_closed(at: &AgentToken, ctx: &Context, r: Refusal) -> Result<Action, Error> {
    let mut status = at.status.clone().unwrap_or_default();
    if ledger::open(&status) == 0 {
        return refuse(at, ctx, r).await;
    }
    let ns = at.namespace().unwrap_or_default();
    let name = at.name_any();
    let uid = at.uid().ok_or(Error::MissingUid)?;
    let now = ctx.clock.now();
    let who = revoke::Subject {
        namespace: &ns,
        name: &name,
        uid: &uid,
    };
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let live = secrets
        .get_opt(&at.secret_name())
        .await?
        .filter(|s| matches!(secret::ownership(Some(s), &uid), Ownership::Owned));
    let key = at.secret_key();
    recover(
        &mut status,
        live.as_ref(),
        &key,
        &name,
        grace_period(at),
        now,
    );
    let values = held_values(&status, live.as_ref(), &key);
    let why = format!("fail closed: {}", r.reason);
    let delivered: Vec<i64> = status
        .history
        .iter()
        .filter(|e| matches!(ledger::life(e), TokenLife::Live | TokenLife::Grace))
        .map(|e| e.revision)
        .collect();
    for revision in delivered {
        ledger::retire(&mut status, revision, &why, now);
    }
    // The Secret keeps no token the policy refuses.
    if let Some(l) = &live {
        let writer = SecretWriter {
            at,
            ctx,
            ns: &ns,
            name: &at.secret_name(),
            key: &key,
            live: Some(l),
            uid: &uid,
        };
        if !writer.up_to_date(&status, None, None) {
            writer.write(&status, None, None).await?;
        }
    }
    ledger::expire(&mut status, now);
    let current = super::reconcile_issuer(at, ctx).await?;
    let mut keeper = match Keeper::recorded(&status) {
        true => Some(Keeper::load(ctx, &uid, &status).await?),
        false => None,
    };
    let events = revoke::pass(
        ctx,
        &who,
        &mut status,
        current.as_ref().map(|c| c.as_current()),
        &values,
        &mut keeper,
        now,
        ledger::ATTEMPTS_PER_PASS,
    )
    .await?;
    let before = at.status.clone().unwrap_or_default();
    ledger::prune(&mut status);
    status.token_fingerprint = None;
    status.next_rotation_at = None;
    let conditions = vec![
        Want::new(READY, false, r.reason, r.message.clone()),
        Want::new(ISSUING, false, r.reason, "not issuing until this is fixed"),
    ];
    let wake = ledger::wake(&status).map(|w| until(now, w));
    let was = at
        .status
        .as_ref()
        .and_then(|s| status::find(&s.conditions, READY))
        .map(|c| c.reason.clone());
    if was.as_deref() != Some(r.reason.as_str())
        && let Some(reason) = r.event
    {
        ctx.publish(at, EventType::Warning, reason, r.message.clone())
            .await;
    }
    for (kind, reason, note) in events {
        ctx.publish(at, kind, reason, note).await;
    }
    status_write(at, ctx, status.clone(), &conditions).await?;
    // Only now that the ledger says what was revoked.
    tidy_keeper(ctx, &who, &before, &mut status, &mut keeper).await;
    Ok(Action::requeue(
        wake.unwrap_or(MAX_WAKE)
            .clamp(Duration::from_millis(500), MAX_WAKE),
    ))
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
    if was.as_deref() != Some(r.reason.as_str())
        && let Some(reason) = r.event
    {
        ctx.publish(at, EventType::Warning, reason, r.message.clone())
            .await;
    }
    status_write(at, ctx, st, &conditions).await?;
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
    suspended: bool,
) -> Vec<Want> {
    const SUSPENDED: &str = "the issuer is suspended (spec.suspend): it mints nothing";
    let ready = if token_valid {
        Want::new(
            READY,
            true,
            Reason::TokenValid,
            format!("revision {} is in the Secret", status.revision),
        )
    } else if let Some(e) = mint_failed {
        Want::new(READY, false, Reason::RotationFailed, e.to_string())
    } else if status.failed_attempts > 0
        && let Some(m) = &status.last_failure_message
    {
        // Backing off between attempts: keep saying why there is no token.
        Want::new(READY, false, Reason::RotationFailed, m.clone())
    } else if suspended {
        Want::new(
            READY,
            false,
            Reason::IssuerSuspended,
            format!("{SUSPENDED}; no valid token is in the Secret"),
        )
    } else if paused {
        Want::new(
            READY,
            false,
            Reason::Paused,
            "spec.paused is true and no valid token is delivered",
        )
    } else {
        Want::new(
            READY,
            false,
            Reason::TokenExpired,
            "no valid token is in the Secret",
        )
    };
    let issuing = match (mint_failed, decision.backoff_until) {
        (Some(e), _) => Want::new(
            ISSUING,
            true,
            if e.is_transient() {
                Reason::IssuerUnavailable
            } else {
                Reason::MintFailed
            },
            format!("attempt {} failed: {e}", status.failed_attempts),
        ),
        (None, Some(until)) => Want::new(
            ISSUING,
            true,
            Reason::BackingOff,
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
            Reason::Throttled,
            format!(
                "a new token is due, but this AgentToken has minted often: the next mint waits until {} (per-AgentToken mint floor)",
                decision
                    .floor_until
                    .map(|t| t.to_string())
                    .unwrap_or_default()
            ),
        ),
        (None, None) if suspended => Want::new(ISSUING, false, Reason::IssuerSuspended, SUSPENDED),
        (None, None) if paused => Want::new(ISSUING, false, Reason::Paused, "rotation is paused"),
        (None, None) => Want::new(ISSUING, false, Reason::Idle, "no mint in progress"),
    };
    let mut wants = vec![ready, issuing];
    wants.extend(unexpected_source(status));
    wants.extend(used_after_revocation(status));
    wants
}

/// The `UsedAfterRevocation` condition, once usage tracking has seen a use.
fn used_after_revocation(status: &AgentTokenStatus) -> Option<Want> {
    let usage = status.usage.as_ref()?;
    let seen: Vec<String> = usage
        .tokens
        .iter()
        .filter(|t| t.requests_after_revocation > 0)
        .map(|t| {
            format!(
                "revision {} ({} requests, the last at {})",
                t.revision,
                t.requests_after_revocation,
                t.last_used_after_revocation
                    .as_ref()
                    .map(|l| l.0.to_string())
                    .unwrap_or_default()
            )
        })
        .collect();
    Some(if seen.is_empty() {
        Want::new(
            USED_AFTER_REVOCATION,
            false,
            Reason::NotUsedAfterRevocation,
            "no revoked token was seen used",
        )
    } else {
        Want::new(
            USED_AFTER_REVOCATION,
            true,
            Reason::UsedAfterRevocation,
            format!(
                "revoked tokens were used again, a copy of each is still being tried: {}",
                seen.join("; ")
            ),
        )
    })
}

/// The `UnexpectedSource` condition, once usage tracking has seen a use.
fn unexpected_source(status: &AgentTokenStatus) -> Option<Want> {
    let usage = status.usage.as_ref()?;
    let seen: Vec<String> = usage
        .tokens
        .iter()
        .filter(|t| !t.unexpected_sources.is_empty())
        .map(|t| {
            format!(
                "revision {} from {}",
                t.revision,
                t.unexpected_sources.join(", ")
            )
        })
        .collect();
    Some(if seen.is_empty() {
        Want::new(
            UNEXPECTED_SOURCE,
            false,
            Reason::SourcesExpected,
            "every use seen came from an expected address",
        )
    } else {
        Want::new(
            UNEXPECTED_SOURCE,
            true,
            Reason::UnexpectedSource,
            format!("used from unexpected addresses: {}", seen.join("; ")),
        )
    })
}

/// Writes status through `/status` as a JSON merge patch of what changed,
/// only when something did, on the version of the AgentToken it was
/// computed from (the one read, or this reconcile's last write). When
/// someone else wrote status in between (an admin abandoning a
/// revocation), our changes are replayed onto theirs ([`ledger::rebase`])
/// instead of overwriting them, and every later write of this reconcile
/// keeps what they changed. `Err(Gone)` when the AgentToken was deleted
/// or replaced meanwhile.
pub(super) async fn status_write(
    at: &AgentToken,
    ctx: &Context,
    mut status: AgentTokenStatus,
    want: &[Want],
) -> Result<(), Error> {
    let uid = at.uid().unwrap_or_default();
    let prior = ctx.written(&uid);
    let mut foreign = prior
        .as_ref()
        .map(|w| w.foreign.clone())
        .unwrap_or_default();
    let (mut version, mut base) = match prior {
        Some(w) => (w.resource_version, w.status),
        None => (
            at.resource_version().unwrap_or_default(),
            at.status.clone().unwrap_or_default(),
        ),
    };
    let old = at.status.clone().unwrap_or_default();
    status.observed_generation = at.meta().generation;
    status.conditions = status::merge(&old.conditions, want, at.meta().generation, ctx.clock.now());
    if want.is_empty() {
        status.conditions = base.conditions.clone();
    }
    ledger::apply_foreign(&mut status, &foreign);
    // `usage` is the usage tracker's field (its own field manager): never
    // written here, and never a difference.
    status.usage = None;
    status.last_drill = None;
    // Compared as the API server would store it (times in whole seconds).
    if let Ok(stored) = serde_json::to_value(&status).and_then(serde_json::from_value) {
        status = stored;
    }
    if status == without_foreign_fields(&base) {
        return Ok(());
    }
    let api: Api<AgentToken> =
        Api::namespaced(ctx.client.clone(), &at.namespace().unwrap_or_default());
    let (mut conflicts, mut tries) = (0, 0);
    loop {
        // Only the leader writes the ledger: a reconcile still running on
        // a replica that lost the Lease (a freeze, a partition) would
        // overwrite what the new leader recorded.
        if !ctx.leadership.is_leader() {
            return Err(Error::NotLeader);
        }
        tries += 1;
        // The difference from what the server holds at `version`, as a
        // merge patch on that version (a conflict if it moved on).
        let patch = serde_json::json!({
            "metadata": {"resourceVersion": version},
            "status": status::merge_patch(
                &serde_json::to_value(without_foreign_fields(&base))
                    .map_err(kube::Error::SerdeError)?,
                &serde_json::to_value(&status).map_err(kube::Error::SerdeError)?,
            ),
        });
        let params = PatchParams {
            field_manager: Some(STATUS_MANAGER.into()),
            ..Default::default()
        };
        let e = match api
            .patch_status(&at.name_any(), &params, &Patch::Merge(&patch))
            .await
        {
            Ok(written) => {
                if let Some(st) = &written.status {
                    ctx.usage.track(
                        &at.namespace().unwrap_or_default(),
                        &at.name_any(),
                        &uid,
                        &st.history,
                        st.usage.as_ref(),
                    );
                }
                // The server's copy, not ours: it is what a later conflict
                // is told apart from (times come back in whole seconds).
                ctx.set_written(
                    &uid,
                    Some(super::Written {
                        resource_version: written.resource_version().unwrap_or_default(),
                        status: written.status.unwrap_or_default(),
                        foreign,
                    }),
                );
                return Ok(());
            }
            Err(kube::Error::Api(e)) if e.code == 409 => e,
            Err(kube::Error::Api(e)) if e.code == 404 => return Err(Error::Gone),
            Err(e) => return Err(e.into()),
        };
        let now = match api.get_opt(&at.name_any()).await? {
            Some(now) if now.uid().as_deref() == Some(uid.as_str()) => now,
            _ => return Err(Error::Gone),
        };
        let theirs = now.status.clone().unwrap_or_default();
        let changed = ledger::foreign(&base, &theirs);
        // A change of metadata only (a tenant's annotation) or of usage
        // (the tracker's) is no reason to give up: only conflicts over the
        // reconcile's status count.
        if without_foreign_fields(&theirs) != without_foreign_fields(&base) {
            conflicts += 1;
        }
        if conflicts >= STATUS_WRITE_ATTEMPTS || tries >= STATUS_WRITE_TRIES {
            return Err(kube::Error::Api(e).into());
        }
        foreign.extend(changed);
        ledger::apply_foreign(&mut status, &foreign);
        version = now.resource_version().unwrap_or_default();
        base = theirs;
        if status == without_foreign_fields(&base) {
            ctx.set_written(
                &uid,
                Some(super::Written {
                    resource_version: version,
                    status: base,
                    foreign,
                }),
            );
            return Ok(());
        }
    }
}

/// Whether nothing may be minted (`onUnused: Revoke`): the token is
/// unused, or it was revoked as unused and no workload uses the Secret
/// yet. While dormant only a workload ends it (a late-flushed use of the
/// revoked token does not); with no verdict (the workload index not
/// synced), as before.
fn dormant(at: &AgentToken, verdict: Option<&super::unused::Verdict>) -> bool {
    let revoke = at.spec.usage.as_ref().is_some_and(|u| {
        u.unused_after.is_some() && u.on_unused == crate::crd::UnusedAction::Revoke
    });
    let was = at
        .status
        .as_ref()
        .is_some_and(|s| s.dormant_since.is_some());
    revoke
        && match verdict {
            None => was,
            Some(super::unused::Verdict::Unused { .. }) => true,
            Some(super::unused::Verdict::InUse(why)) => was && !super::unused::consumed(why),
        }
}

/// How often a dormant AgentToken (its unused token revoked) looks for a
/// workload that uses its Secret again.
const DORMANT_POLL: Duration = Duration::from_secs(30);

/// The `Unused` condition for a verdict.
fn unused_condition(verdict: &super::unused::Verdict, dormant: bool) -> Want {
    match verdict {
        super::unused::Verdict::Unused { since } => Want::new(
            status::UNUSED,
            true,
            Reason::Unused,
            format!(
                "no workload uses the Secret and no token was used since {since}{}",
                if dormant {
                    "; revoked, and no new token until a workload uses the Secret"
                } else {
                    ""
                }
            ),
        ),
        super::unused::Verdict::InUse(why) => {
            Want::new(status::UNUSED, false, Reason::InUse, why.clone())
        }
    }
}

/// A status without the usage tracker's and the drill runner's fields.
fn without_foreign_fields(s: &AgentTokenStatus) -> AgentTokenStatus {
    AgentTokenStatus {
        usage: None,
        last_drill: None,
        ..s.clone()
    }
}

/// Conflicts over status before a write is an error.
const STATUS_WRITE_ATTEMPTS: u32 = 4;
/// Tries in all, conflicts over metadata included.
const STATUS_WRITE_TRIES: u32 = 16;

/// Shortest time left on the leader Lease for a mint to start: a mint
/// never outlasts this replica's leadership (the standby cannot take the
/// Lease before that time has run out), so two replicas never mint the
/// same revision.
const MIN_MINT_TIME: Duration = Duration::from_secs(5);

/// The deadline a mint may have now: `None` when this replica cannot
/// finish one while it still leads.
fn lease_budget(ctx: &Context) -> Option<Duration> {
    ctx.leadership.budget(ISSUER_CALL_DEADLINE, MIN_MINT_TIME)
}

/// A ledger entry as the slot the Secret's record and consumers use.
fn slot(e: &HistoryEntry) -> SlotState {
    let expires_at = e.expires_at.as_ref().map_or(Timestamp::UNIX_EPOCH, |t| t.0);
    SlotState {
        revision: e.revision,
        fingerprint: e.fingerprint.clone(),
        issued_at: e.issued_at.as_ref().map_or(expires_at, |t| t.0),
        expires_at,
        handle: String::new(),
        spec_hash: e.spec_hash.clone().unwrap_or_default(),
        grace_until: e.grace_until.as_ref().map(|t| t.0),
    }
}

/// What decide sees: the ledger's current and previous tokens, and whether
/// the Secret still holds exactly the current one.
fn ledger_view(
    status: &AgentTokenStatus,
    exists: bool,
    values: &revoke::Values,
) -> decide::SecretView {
    let handled = status.handled_triggers.clone().unwrap_or_default();
    decide::SecretView {
        exists,
        current: ledger::current(status).map(|c| {
            let s = slot(c);
            decide::CurrentToken {
                revision: s.revision,
                fingerprint: s.fingerprint,
                issued_at: s.issued_at,
                expires_at: s.expires_at,
                // Entries from before the ledger kept the hash: no rotation
                // for that alone.
                spec_hash: c.spec_hash.clone().unwrap_or_default(),
                data_intact: values.get(c.revision).is_some(),
            }
        }),
        previous: ledger::previous(status).map(|p| {
            let s = slot(p);
            decide::PreviousToken {
                revision: s.revision,
                fingerprint: s.fingerprint,
                expires_at: s.expires_at,
                grace_until: s.grace_until.unwrap_or(s.expires_at),
            }
        }),
        rotate_handled: handled.rotate,
        revoke_handled: handled.revoke,
        drill_handled: handled.drill,
    }
}

/// Moves the old tokens along when a new one is delivered: the previous
/// one is retired, the current one keeps a grace period (or is retired at
/// once). Returns the revision kept as the previous token.
#[allow(clippy::too_many_arguments)]
fn shift_slots(
    status: &mut AgentTokenStatus,
    current: Option<&HistoryEntry>,
    previous: Option<&HistoryEntry>,
    values: &revoke::Values,
    m: decide::Mint,
    grace: Duration,
    hold_for_consumers: bool,
    now: Timestamp,
) -> Option<i64> {
    if let Some(p) = previous {
        ledger::retire(status, p.revision, "superseded by a newer token", now);
    }
    let cur = current?;
    let expires = slot(cur).expires_at;
    let why = if m.revoke_current_now {
        Some(match m.reason {
            RotationReason::KillSwitch => {
                "revoked by the issuer's kill switch (spec.revokeIssuedBefore)"
            }
            RotationReason::UnexpectedSource => {
                "used from an unexpected address (spec.usage.onUnexpectedSource: Revoke)"
            }
            RotationReason::Drill => "revoked by a drill (agenttoken.dev/drill)",
            _ => "revoked on request (agenttoken.dev/revoke)",
        })
    } else if values.get(cur.revision).is_none() {
        Some("its value in the Secret was changed or removed")
    } else if now >= expires {
        Some("expired")
    } else if grace.is_zero() && !hold_for_consumers {
        Some("replaced; no grace period")
    } else {
        None
    };
    if let Some(why) = why {
        ledger::retire(status, cur.revision, why, now);
        return None;
    }
    // With no grace period the previous token is still held while
    // consumers roll: it goes as soon as they have.
    ledger::grace(status, cur.revision, ledger::after(now, grace, expires));
    Some(cur.revision)
}

/// The tokens the owned Secret holds for the ledger's current and previous
/// entries, each believed only when its fingerprint is the ledger's.
pub(super) fn held_values(
    status: &AgentTokenStatus,
    live: Option<&Secret>,
    key: &str,
) -> revoke::Values {
    let mut values = revoke::Values::default();
    if let Some(c) = ledger::current(status) {
        values.offer(status, c.revision, secret::token_in(live, key));
    }
    if let Some(p) = ledger::previous(status) {
        let previous_key = format!("{key}{}", secret::PREVIOUS_SUFFIX);
        values.offer(status, p.revision, secret::token_in(live, &previous_key));
    }
    values
}

/// Mints the last reconcile of this object left unfinished: delivered if
/// the Secret holds the minted token, else revoked when it can be found,
/// else `Unknown` until its latest expiry.
///
/// Delivered means the operator stopped between the Secret write and the
/// status write that records it. The token it replaced is then in its
/// grace period if the Secret's previous key holds it (until `grace` after
/// the new token was issued, as the mint would have set), else retired;
/// and the status summary (`revision`, `tokenFingerprint`, times) names
/// the delivered token, as after any mint.
pub(super) fn recover(
    status: &mut AgentTokenStatus,
    live: Option<&Secret>,
    key: &str,
    name: &str,
    grace: Duration,
    now: Timestamp,
) {
    let fingerprint_in = |k: &str| {
        secret::token_in(live, k).map(|v| rotation::fingerprint(v.expose_secret().as_bytes()))
    };
    let held = fingerprint_in(key);
    let minting: Vec<(i64, bool, bool)> = status
        .history
        .iter()
        .filter(|e| ledger::life(e) == TokenLife::Minting)
        .map(|e| {
            let delivered = !e.fingerprint.is_empty() && held.as_deref() == Some(&e.fingerprint);
            (e.revision, delivered, e.handle.is_some())
        })
        .collect();
    for (revision, delivered, findable) in minting {
        if !delivered {
            info!(agenttoken = %name, revision, findable, "a mint was interrupted");
            ledger::interrupted(status, revision, findable, now);
            continue;
        }
        info!(agenttoken = %name, revision, "a mint was interrupted after its delivery; recorded as delivered");
        let replaced = ledger::current(status)
            .filter(|c| c.revision < revision)
            .cloned();
        ledger::delivered(status, revision);
        if let Some(old) = replaced {
            let previous_key = format!("{key}{}", secret::PREVIOUS_SUFFIX);
            let issued = ledger::current(status)
                .and_then(|c| c.issued_at.as_ref())
                .map_or(now, |t| t.0);
            if fingerprint_in(&previous_key).as_deref() == Some(old.fingerprint.as_str()) {
                let expires = slot(&old).expires_at;
                ledger::grace(status, old.revision, ledger::after(issued, grace, expires));
            } else {
                ledger::retire(status, old.revision, "superseded by a newer token", now);
            }
        }
        ledger::summarize(status);
    }
}

/// Binding Secrets this AgentToken owns (by UID) that the ledger does not
/// list: a mint interrupted before its intent was recorded (an older
/// operator). They are queued for revocation.
fn adopt_bindings(
    ctx: &Context,
    who: &revoke::Subject<'_>,
    status: &mut AgentTokenStatus,
    now: Timestamp,
) {
    let ceiling = revision_ceiling(status);
    for (binding, revision) in ctx.bindings_of(who.namespace, who.name, who.uid) {
        // A revision far past what status knows is a forged label, not a
        // token of ours: never recorded, never acted on.
        if revision > ceiling || status.history.iter().any(|h| h.revision == revision) {
            continue;
        }
        status.history.push(HistoryEntry {
            revision,
            fingerprint: "unknown (not recorded)".into(),
            handle: Some(binding),
            state: Some(TokenLife::Revoking),
            next_attempt_at: Some(Time(now)),
            message: Some(
                "a binding the ledger did not record (the operator stopped during its mint)".into(),
            ),
            ..Default::default()
        });
        status.history.sort_by_key(|h| h.revision);
    }
}

/// Deletes the keeper once the ledger just `written` needs none of its
/// tokens (its UID stays in status; a later put creates a new one). While
/// some are needed, values no longer needed (revoked or expired tokens)
/// leave with the next put, in the write that adds a token: not in a write
/// of their own at each revocation. Runs after the status write, so a
/// value leaves the keeper only once the ledger records why. A failure, or
/// a stop between the two, only delays that to a later change of what is
/// needed.
async fn tidy_keeper(
    ctx: &Context,
    who: &revoke::Subject<'_>,
    before: &AgentTokenStatus,
    written: &mut AgentTokenStatus,
    keeper: &mut Option<Keeper>,
) {
    if !Keeper::recorded(written) {
        return;
    }
    if !revoke::kept_needed(written, who).is_empty() {
        return;
    }
    // Unchanged since the last pass and not read this time: nothing to drop
    // (no read of the keeper on every reconcile).
    if keeper.is_none() && revoke::kept_needed(before, who).is_empty() {
        return;
    }
    if keeper.is_none() {
        match Keeper::load(ctx, who.uid, written).await {
            Ok(k) => *keeper = Some(k),
            Err(e) => {
                warn!(error = %e, "could not read the keeper");
                return;
            }
        }
    }
    let Some(k) = keeper.as_mut() else { return };
    if let Err(e) = k.retain(&[]).await {
        warn!(error = %e, "could not tidy the keeper");
    }
}

/// How far past status a revision read from a binding may be and still be
/// believed (each crash between a mint and the status write could leave
/// one revision unrecorded before intents were; a forged label can say
/// anything).
const REVISION_SLACK: i64 = 16;

/// The highest revision status records (status.revision and history).
fn known_revision(status: &AgentTokenStatus) -> i64 {
    status
        .history
        .iter()
        .map(|h| h.revision)
        .fold(status.revision.max(0), i64::max)
}

/// The highest revision read from a binding that is believed.
fn revision_ceiling(status: &AgentTokenStatus) -> i64 {
    known_revision(status).saturating_add(REVISION_SLACK)
}

/// The next revision: above every revision this AgentToken minted (status,
/// history, and within [`REVISION_SLACK`] of them its own bindings).
/// `None` only if status itself is at `i64::MAX`.
fn next_revision(
    ctx: &Context,
    ns: &str,
    at: &AgentToken,
    status: &AgentTokenStatus,
) -> Option<i64> {
    let known = known_revision(status);
    let ceiling = revision_ceiling(status);
    let uid = at.uid().unwrap_or_default();
    let seen = ctx
        .bindings_of(ns, &at.name_any(), &uid)
        .into_iter()
        .map(|(_, r)| r)
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

pub(super) fn grace_period(at: &AgentToken) -> Duration {
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
    events: Vec<(EventType, Reason, String)>,
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
    has_previous: bool,
    status: &AgentTokenStatus,
    revision: i64,
) -> bool {
    restarts_consumers(at)
        && (has_previous
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
    let workloads = match ctx.workloads.in_namespace(ns) {
        Ok(w) => w,
        Err(Unavailable::Syncing(kind)) => {
            // The operator is starting and the workload watches have not
            // listed yet: an empty view would be taken for "no consumers".
            // Look again shortly; the previous token waits meanwhile.
            tracing::debug!(namespace = %ns, agenttoken = %at.name_any(), kind = kind.as_str(), "workloads not listed yet");
            report.entries = old.consumers.clone();
            report.settled = false;
            report.poll = Some(Duration::from_secs(2));
            return report;
        }
        Err(e) => {
            // Unknown consumers must not keep a previous token alive forever:
            // it is revoked at the end of its grace period, as without consumers.
            warn!(namespace = %ns, agenttoken = %at.name_any(), error = %e, "could not list consumers");
            report.entries = old.consumers.clone();
            report.events.push((
                EventType::Warning,
                Reason::ConsumersUnknown,
                format!("could not list the workloads that use the Secret: {e}"),
            ));
            return report;
        }
    };
    let strategy = spec.strategy.unwrap_or_default();
    let annotation = consumers::annotation_key(&at.name_any());
    let revision = current.revision;
    let timeout = ctx.restarter.config.rollout_timeout;
    for w in consumers::select(workloads.iter().map(|w| &**w), secret_name, &spec) {
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
        let need = consumers::need(
            w,
            strategy,
            &annotation,
            revision,
            current.issued_at,
            before,
        );
        tracing::debug!(workload = %w.key, revision, ?need, "consumer");
        let entry = match need {
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
                            Reason::RolloutTimedOut,
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
                        ConsumerPhase::Failed => {
                            Some((EventType::Warning, Reason::WorkloadSignalFailed))
                        }
                        ConsumerPhase::Pending => None,
                        _ => Some((EventType::Normal, Reason::WorkloadRestarted)),
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
                        Reason::RolloutTimedOut,
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

    #[test]
    fn a_kill_switch_scope_covers_only_what_every_set_part_matches() {
        use serde_json::json;
        let team_a: BTreeMap<String, String> = [("team".to_string(), "a".to_string())].into();
        let none = BTreeMap::new();
        // (what, scope, ClusterTokenIssuer, namespace, its labels,
        //  AgentToken labels, its ServiceAccount, covered)
        #[rustfmt::skip]
        let cases = [
            ("empty scope covers all", json!({}), true, "x", Some(&none), json!({}), "builder", true),
            ("namespace glob matches", json!({"namespaces": ["team-*"]}), true, "team-a", Some(&none), json!({}), "builder", true),
            ("namespace glob misses", json!({"namespaces": ["team-*"]}), true, "other", Some(&none), json!({}), "builder", false),
            ("namespace labels match", json!({"namespaceSelector": {"matchLabels": {"team": "a"}}}), true, "x", Some(&team_a), json!({}), "builder", true),
            ("namespace labels miss", json!({"namespaceSelector": {"matchLabels": {"team": "a"}}}), true, "x", Some(&none), json!({}), "builder", false),
            ("namespace labels unknown: the queue's guess is yes", json!({"namespaceSelector": {"matchLabels": {"team": "a"}}}), true, "x", None, json!({}), "builder", true),
            ("AgentToken labels match", json!({"selector": {"matchLabels": {"app": "bot"}}}), true, "x", Some(&none), json!({"app": "bot"}), "builder", true),
            ("AgentToken labels miss", json!({"selector": {"matchLabels": {"app": "bot"}}}), true, "x", Some(&none), json!({}), "builder", false),
            ("ServiceAccount glob matches", json!({"serviceAccounts": ["build*"]}), true, "x", Some(&none), json!({}), "builder", true),
            ("ServiceAccount glob misses", json!({"serviceAccounts": ["deploy"]}), true, "x", Some(&none), json!({}), "builder", false),
            ("every part must match", json!({"namespaces": ["team-*"], "selector": {"matchLabels": {"app": "bot"}}}), true, "other", Some(&none), json!({"app": "bot"}), "builder", false),
            ("a TokenIssuer's own namespace is always in", json!({"namespaces": ["team-*"], "selector": {"matchLabels": {"app": "bot"}}}), false, "other", Some(&none), json!({"app": "bot"}), "builder", true),
            ("a TokenIssuer still narrows by AgentToken labels", json!({"selector": {"matchLabels": {"app": "bot"}}}), false, "x", Some(&none), json!({}), "builder", false),
        ];
        for (what, scope, cluster, ns, ns_labels, labels, sa, want) in cases {
            let scope: crate::crd::RevokeScope = serde_json::from_value(scope).unwrap();
            let at: AgentToken = serde_json::from_value(json!({
                "apiVersion": "agenttoken.dev/v1alpha1", "kind": "AgentToken",
                "metadata": {"name": "bot", "namespace": ns, "labels": labels},
                "spec": {"issuerRef": {"name": "sa"}, "serviceAccountName": sa},
            }))
            .unwrap();
            assert_eq!(
                in_scope(&scope, cluster, ns, ns_labels, &at),
                want,
                "{what}"
            );
        }
    }

    #[test]
    fn a_scheduled_drill_is_due_once_per_schedule_time() {
        let at = |status: serde_json::Value| -> AgentToken {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "agenttoken.dev/v1alpha1", "kind": "AgentToken",
                "metadata": {"name": "bot", "namespace": "t", "creationTimestamp": "2026-11-29T09:30:00Z"},
                "spec": {"issuerRef": {"name": "sa"}, "drill": {"schedule": "0 * * * *"}},
                "status": status,
            }))
            .unwrap()
        };
        let ts = |s: &str| s.parse::<Timestamp>().unwrap();
        let fresh = at(serde_json::json!({}));
        assert_eq!(drill_due(&fresh, ts("2026-11-29T09:59:00Z")), Ok(None));
        let due = drill_due(&fresh, ts("2026-11-29T10:00:05Z")).unwrap();
        assert_eq!(due.as_deref(), Some("scheduled-1795946400"));
        // Handled: not again until the next hour.
        let handled = at(serde_json::json!({"handledTriggers": {"drill": "scheduled-1795946400"}}));
        assert_eq!(drill_due(&handled, ts("2026-11-29T10:30:00Z")), Ok(None));
        // After a drill at 10:00, the 11:00 one.
        let drilled = at(
            serde_json::json!({"lastDrill": {"id": "scheduled-1795946400", "revision": 1,
            "startedAt": "2026-11-29T10:00:01Z", "targetMs": 300000, "result": "Passed"}}),
        );
        assert_eq!(drill_due(&drilled, ts("2026-11-29T10:59:00Z")), Ok(None));
        assert!(
            drill_due(&drilled, ts("2026-11-29T11:00:01Z"))
                .unwrap()
                .is_some()
        );
        assert_eq!(
            next_drill(&fresh, ts("2026-11-29T10:10:00Z")),
            Some(ts("2026-11-29T11:00:00Z"))
        );
        let bad = serde_json::from_value::<AgentToken>(serde_json::json!({
            "apiVersion": "agenttoken.dev/v1alpha1", "kind": "AgentToken",
            "metadata": {"name": "bot", "namespace": "t"},
            "spec": {"issuerRef": {"name": "sa"}, "drill": {"schedule": "every hour"}},
        }))
        .unwrap();
        assert!(drill_due(&bad, ts("2026-11-29T10:10:00Z")).is_err());
    }

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

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_900_000_000 + s).unwrap()
    }

    /// A ledger with `current` Live (issued at 0, expiring at 3600) and,
    /// when given, `previous` in Grace.
    fn ledger_with(current: Option<i64>, previous: Option<i64>) -> AgentTokenStatus {
        let mut s = AgentTokenStatus::default();
        for (r, life) in [(previous, TokenLife::Grace), (current, TokenLife::Live)] {
            if let Some(r) = r {
                s.history.push(HistoryEntry {
                    revision: r,
                    fingerprint: rotation::fingerprint(format!("tok-{r}").as_bytes()),
                    issued_at: Some(Time(t(0))),
                    expires_at: Some(Time(t(3600))),
                    handle: Some(format!("webhook-id:{r}")),
                    state: Some(life),
                    grace_until: (life == TokenLife::Grace).then(|| Time(t(600))),
                    ..Default::default()
                });
            }
        }
        s
    }

    fn held(s: &AgentTokenStatus, revisions: &[i64]) -> revoke::Values {
        let mut v = revoke::Values::default();
        for r in revisions {
            v.offer(s, *r, Some(SecretString::from(format!("tok-{r}"))));
        }
        v
    }

    #[test]
    #[allow(clippy::type_complexity)] // one tuple per table row
    fn old_tokens_on_delivery_table() {
        let mint = |revoke_now| decide::Mint {
            reason: RotationReason::Scheduled,
            revoke_current_now: revoke_now,
        };
        let ten_min = Duration::from_secs(600);
        // (case, held, revoke now, grace, hold for consumers, now,
        //  kept as previous, state of 2, state of 1)
        let rows: [(
            &str,
            &[i64],
            bool,
            Duration,
            bool,
            i64,
            Option<i64>,
            TokenLife,
            TokenLife,
        ); 6] = [
            (
                "grace keeps the current",
                &[2],
                false,
                ten_min,
                false,
                100,
                Some(2),
                TokenLife::Grace,
                TokenLife::Revoking,
            ),
            (
                "revoke trigger",
                &[2],
                true,
                ten_min,
                false,
                100,
                None,
                TokenLife::Revoking,
                TokenLife::Revoking,
            ),
            (
                "edited value",
                &[],
                false,
                ten_min,
                false,
                100,
                None,
                TokenLife::Revoking,
                TokenLife::Revoking,
            ),
            (
                "expired current",
                &[2],
                false,
                ten_min,
                false,
                3600,
                None,
                TokenLife::Revoking,
                TokenLife::Revoking,
            ),
            (
                "no grace",
                &[2],
                false,
                Duration::ZERO,
                false,
                100,
                None,
                TokenLife::Revoking,
                TokenLife::Revoking,
            ),
            (
                "no grace, consumers roll",
                &[2],
                false,
                Duration::ZERO,
                true,
                100,
                Some(2),
                TokenLife::Grace,
                TokenLife::Revoking,
            ),
        ];
        for (case, held_revs, now_, grace, hold, at, kept, two, one) in rows {
            let mut s = ledger_with(Some(2), Some(1));
            let values = held(&s, held_revs);
            let cur = ledger::current(&s).cloned();
            let prev = ledger::previous(&s).cloned();
            let got = shift_slots(
                &mut s,
                cur.as_ref(),
                prev.as_ref(),
                &values,
                mint(now_),
                grace,
                hold,
                t(at),
            );
            assert_eq!(got, kept, "{case}");
            let state = |r: i64| {
                s.history
                    .iter()
                    .find(|e| e.revision == r)
                    .and_then(|e| e.state)
            };
            assert_eq!(state(2), Some(two), "{case}");
            assert_eq!(state(1), Some(one), "{case}");
            if let Some(k) = kept {
                let until = s
                    .history
                    .iter()
                    .find(|e| e.revision == k)
                    .unwrap()
                    .grace_until
                    .clone()
                    .unwrap()
                    .0;
                assert!(
                    until <= t(3600) && until >= t(at),
                    "{case}: grace within the token's life"
                );
            }
        }
    }

    #[test]
    fn an_interrupted_mint_is_delivered_revoked_or_unknown() {
        let secret_with = |value: &str| Secret {
            data: Some(
                [(
                    "token".to_string(),
                    k8s_openapi::ByteString(value.as_bytes().to_vec()),
                )]
                .into(),
            ),
            ..Default::default()
        };
        let minting = |handle: Option<&str>, fp: &str| HistoryEntry {
            revision: 3,
            fingerprint: fp.into(),
            handle: handle.map(String::from),
            expires_at: Some(Time(t(7200))),
            state: Some(TokenLife::Minting),
            ..Default::default()
        };
        let fp = rotation::fingerprint(b"tok-3");
        // (case, entry, Secret holds, state after)
        let rows = [
            (
                "in the Secret",
                minting(Some("webhook-id:3"), &fp),
                Some("tok-3"),
                TokenLife::Live,
            ),
            (
                "minted, not delivered",
                minting(Some("webhook-id:3"), &fp),
                Some("tok-2"),
                TokenLife::Revoking,
            ),
            (
                "binding known before the mint",
                minting(Some("bot-binding-r3"), ""),
                None,
                TokenLife::Revoking,
            ),
            (
                "nothing to find it by",
                minting(None, ""),
                Some("tok-2"),
                TokenLife::Unknown,
            ),
        ];
        for (case, entry, held, want) in rows {
            let mut s = AgentTokenStatus::default();
            s.history.push(entry);
            let live = held.map(secret_with);
            recover(
                &mut s,
                live.as_ref(),
                "token",
                "bot",
                Duration::from_secs(60),
                t(10),
            );
            assert_eq!(s.history[0].state, Some(want), "{case}");
        }
    }

    /// The operator stopped after writing the Secret and before recording
    /// the delivery (the chaos test's "no token yet" with a token in the
    /// Secret): the next reconcile records it as a mint would have.
    #[test]
    fn a_mint_found_in_the_secret_is_recorded_as_delivered() {
        let secret = |pairs: &[(&str, &str)]| Secret {
            data: Some(
                pairs
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.to_string(),
                            k8s_openapi::ByteString(v.as_bytes().to_vec()),
                        )
                    })
                    .collect(),
            ),
            ..Default::default()
        };
        let minting = |r: i64| HistoryEntry {
            revision: r,
            fingerprint: rotation::fingerprint(format!("tok-{r}").as_bytes()),
            issued_at: Some(Time(t(100))),
            expires_at: Some(Time(t(7200))),
            handle: Some(format!("webhook-id:{r}")),
            reason: Some(RotationReason::Manual),
            state: Some(TokenLife::Minting),
            ..Default::default()
        };
        // (case, ledger before, Secret, revision 2's state after)
        let rows = [
            ("first token", None, secret(&[("token", "tok-3")]), None),
            (
                "rotation, the old token kept as previous",
                Some(2),
                secret(&[("token", "tok-3"), ("token.previous", "tok-2")]),
                Some(TokenLife::Grace),
            ),
            (
                "rotation without a grace period",
                Some(2),
                secret(&[("token", "tok-3")]),
                Some(TokenLife::Revoking),
            ),
        ];
        for (case, current, live, want_old) in rows {
            let mut s = ledger_with(current, None);
            s.revision = current.unwrap_or(0);
            s.failed_attempts = 2;
            s.history.push(minting(3));
            recover(
                &mut s,
                Some(&live),
                "token",
                "bot",
                Duration::from_secs(60),
                t(110),
            );
            let new = s.history.iter().find(|e| e.revision == 3).unwrap();
            assert_eq!(new.state, Some(TokenLife::Live), "{case}");
            assert_eq!(s.revision, 3, "{case}: status.revision names it");
            assert_eq!(
                s.token_fingerprint.as_deref(),
                Some(new.fingerprint.as_str()),
                "{case}"
            );
            assert_eq!(s.expires_at, Some(Time(t(7200))), "{case}");
            assert_eq!(s.failed_attempts, 0, "{case}");
            let old = s.history.iter().find(|e| e.revision == 2);
            assert_eq!(old.and_then(|e| e.state), want_old, "{case}");
            if want_old == Some(TokenLife::Grace) {
                // Grace from the new token's issue (100) for 60 s.
                assert_eq!(old.unwrap().grace_until, Some(Time(t(160))), "{case}");
            }
        }
    }

    #[test]
    fn the_view_believes_the_secret_only_by_fingerprint() {
        let s = ledger_with(Some(2), Some(1));
        let intact = ledger_view(&s, true, &held(&s, &[2, 1]));
        assert!(intact.current.as_ref().unwrap().data_intact);
        assert_eq!(intact.previous.as_ref().unwrap().grace_until, t(600));
        let edited = ledger_view(&s, true, &held(&s, &[]));
        assert!(!edited.current.unwrap().data_intact);
        // A value that is not the ledger's is never offered.
        let mut v = revoke::Values::default();
        v.offer(
            &s,
            2,
            Some(SecretString::from("someone-else's".to_string())),
        );
        assert!(v.get(2).is_none());
    }

    #[test]
    fn plan_holds_a_mint_back_while_revocations_pile_up() {
        let view = decide::SecretView::default();
        let inputs = Inputs {
            now: t(0),
            spec_hash: "h",
            paused: false,
            window: RenewWindow::Percentage(33),
            cron: None,
            jitter_key: "k",
            rotate_trigger: None,
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
            last_revision: 0,
            failed_attempts: 0,
            last_failure: None,
            recent_mints: &[],
        };
        // (open ledger entries, mints, held back)
        for (open, mints, backlog) in [
            (0, true, false),
            (ledger::MAX_OPEN - 1, true, false),
            (ledger::MAX_OPEN, false, true),
            (ledger::MAX_OPEN + 5, false, true),
        ] {
            let p = plan(&inputs, open);
            assert_eq!(p.decision.mint.is_some(), mints, "{open}");
            assert_eq!(p.backlog, backlog, "{open}");
        }
        // Nothing wanted: no backlog to report.
        let paused = Inputs {
            paused: true,
            last_revision: 1,
            ..inputs
        };
        assert!(!plan(&paused, ledger::MAX_OPEN).backlog);
    }
}

//! The `agenttoken.dev/revoke` finalizer: an AgentToken that goes takes its
//! tokens with it. Its Secrets go by owner-reference garbage collection.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use tracing::{info, warn};

use super::keeper::Keeper;
use super::reason::Reason;
use super::secret::{self, Ownership};
use super::{Context, Error, ledger, revoke};
use crate::crd::{AgentToken, TokenLife};
use crate::labels::FINALIZER;

/// Adds the finalizer if it is missing: where the chart's admission policy
/// (`admission.finalizerPolicy`) reaches, it is on from the AgentToken's
/// creation and this writes nothing.
pub async fn ensure_finalizer(at: &AgentToken, ctx: &Context) -> Result<(), Error> {
    if at.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(());
    }
    let mut finalizers = at.finalizers().to_vec();
    finalizers.push(FINALIZER.to_string());
    patch_finalizers(at, ctx, finalizers).await
}

/// How long a deleted AgentToken keeps retrying revocations that fail
/// (an issuer that is down) before it lets go, recording what it gave up.
pub const DELETION_PATIENCE: Duration = Duration::from_secs(600);

/// Revokes every token the AgentToken still has, then lets it go. Never
/// waits on work that cannot succeed: an expired token, a token with
/// nothing left to revoke it by, an issuer that is gone; retries of a
/// failing issuer last at most [`DELETION_PATIENCE`].
pub async fn cleanup(at: &AgentToken, ctx: &Context) -> Result<Action, Error> {
    if !at.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(Action::await_change());
    }
    let ns = at.namespace().unwrap_or_default();
    let name = at.name_any();
    let uid = at.uid().unwrap_or_default();
    let now = ctx.clock.now();
    let who = revoke::Subject {
        namespace: &ns,
        name: &name,
        uid: &uid,
    };
    let mut status = at.status.clone().unwrap_or_default();
    // The tokens the Secret still holds, believed by fingerprint only.
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let live = secrets
        .get_opt(&at.secret_name())
        .await?
        .filter(|s| matches!(secret::ownership(Some(s), &uid), Ownership::Owned));
    let key = at.secret_key();
    super::reconcile::recover(
        &mut status,
        live.as_ref(),
        &key,
        &name,
        super::reconcile::grace_period(at),
        now,
    );
    let values = super::reconcile::held_values(&status, live.as_ref(), &key);
    let open: Vec<i64> = status
        .history
        .iter()
        .filter(|e| matches!(ledger::life(e), TokenLife::Live | TokenLife::Grace))
        .map(|e| e.revision)
        .collect();
    for revision in open {
        ledger::retire(&mut status, revision, "the AgentToken was deleted", now);
    }
    // Binding Secrets this AgentToken owns (by UID) that the ledger does
    // not list: a mint interrupted before intents were recorded.
    for (binding, revision) in ctx.bindings_of(&ns, &name, &uid) {
        if !status.history.iter().any(|h| h.revision == revision) {
            status.history.push(crate::crd::HistoryEntry {
                revision,
                fingerprint: "unknown (never delivered)".into(),
                handle: Some(binding),
                state: Some(TokenLife::Revoking),
                next_attempt_at: Some(Time(now)),
                ..Default::default()
            });
        }
    }
    ledger::expire(&mut status, now);
    // The issuer the AgentToken refers to now, when it still exists; each
    // entry goes to the issuer recorded with it.
    let current = super::reconcile_issuer(at, ctx).await?;
    let mut keeper = if Keeper::recorded(&status) {
        Some(Keeper::load(ctx, &uid, &status).await?)
    } else {
        None
    };
    let events = revoke::pass(
        ctx,
        &who,
        &mut status,
        current.as_ref().map(|c| c.as_current()),
        &values,
        &mut keeper,
        now,
        usize::MAX,
    )
    .await?;
    for (kind, reason, note) in events {
        ctx.publish(at, kind, reason, note).await;
    }
    let waited = at
        .meta()
        .deletion_timestamp
        .as_ref()
        .map(|t| now.duration_since(t.0))
        .and_then(|d| Duration::try_from(d).ok())
        .unwrap_or_default();
    if ledger::open(&status) > 0 && waited < DELETION_PATIENCE {
        let next = ledger::wake(&status)
            .map(|w| Duration::try_from(w.duration_since(now)).unwrap_or_default())
            .unwrap_or(Duration::from_secs(5))
            .clamp(Duration::from_secs(1), Duration::from_secs(60));
        super::reconcile::status_write(at, ctx, status, &[]).await?;
        return Ok(Action::requeue(next));
    }
    let gave_up: Vec<i64> = status
        .history
        .iter()
        .filter(|e| ledger::is_open(e))
        .map(|e| e.revision)
        .collect();
    if !gave_up.is_empty() {
        ctx.publish(
            at,
            EventType::Warning,
            Reason::RevocationFailed,
            format!(
                "the AgentToken was deleted and the revocation of revision(s) {gave_up:?} did not succeed within {}s; they stay valid until their expiry",
                DELETION_PATIENCE.as_secs()
            ),
        )
        .await;
    }
    let revoked = status
        .history
        .iter()
        .filter(|e| {
            e.state == Some(TokenLife::Revoked) && e.revoked_at.as_ref().is_some_and(|t| t.0 == now)
        })
        .count();
    let kind = current
        .as_ref()
        .map_or("unknown", |c| c.record.type_.as_str());
    ctx.metrics
        .revocations_on_delete(kind, revoked, gave_up.len());
    if let Some(k) = keeper.as_mut()
        && let Err(e) = k.retain(&[]).await
    {
        warn!(error = %e, "could not delete the keeper; it is left in the operator's namespace");
    }
    release(at, ctx, &ns, &name, revoked).await
}

/// Drops the finalizer once the tokens are dealt with.
async fn release(
    at: &AgentToken,
    ctx: &Context,
    ns: &str,
    name: &str,
    revoked: usize,
) -> Result<Action, Error> {
    info!(namespace = %ns, agenttoken = %name, tokens = revoked, "revoked on deletion");
    ctx.metrics.forget_token(ns, name);
    let finalizers: Vec<String> = at
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    patch_finalizers(at, ctx, finalizers).await?;
    Ok(Action::await_change())
}

async fn patch_finalizers(
    at: &AgentToken,
    ctx: &Context,
    finalizers: Vec<String>,
) -> Result<(), Error> {
    let api: Api<AgentToken> =
        Api::namespaced(ctx.client.clone(), &at.namespace().unwrap_or_default());
    // A JSON merge patch with the resourceVersion: a concurrent change fails
    // with a conflict instead of dropping someone else's finalizer.
    // The version this reconcile last wrote, else the one it read.
    let version = ctx
        .written(&at.uid().unwrap_or_default())
        .map(|w| w.resource_version)
        .or_else(|| at.resource_version());
    let patch = serde_json::json!({
        "metadata": {"finalizers": finalizers, "resourceVersion": version}
    });
    let patched = api
        .patch(
            &at.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    // The status writes of this reconcile go on this version.
    let uid = at.uid().unwrap_or_default();
    let foreign = ctx.written(&uid).map(|w| w.foreign).unwrap_or_default();
    ctx.set_written(
        &uid,
        Some(super::Written {
            resource_version: patched.resource_version().unwrap_or_default(),
            status: patched.status.unwrap_or_default(),
            foreign,
        }),
    );
    Ok(())
}

//! The `agenttoken.dev/revoke` finalizer: an AgentToken that goes takes its
//! tokens with it. Its Secrets go by owner-reference garbage collection.

use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use secrecy::SecretString;
use tracing::info;

use super::secret::{self, Ownership};
use super::{Context, Error};
use crate::crd::AgentToken;
use crate::issuer::RevocationHandle;
use crate::labels::FINALIZER;
use k8s_openapi::api::core::v1::Secret;

/// Adds the finalizer if it is missing.
pub async fn ensure_finalizer(at: &AgentToken, ctx: &Context) -> Result<(), Error> {
    if at.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(());
    }
    let mut finalizers = at.finalizers().to_vec();
    finalizers.push(FINALIZER.to_string());
    patch_finalizers(at, ctx, finalizers).await
}

/// Revokes every token the AgentToken still has, then lets it go.
pub async fn cleanup(at: &AgentToken, ctx: &Context) -> Result<Action, Error> {
    if !at.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(Action::await_change());
    }
    let ns = at.namespace().unwrap_or_default();
    let name = at.name_any();
    let uid = at.uid().unwrap_or_default();
    let Ok(backend) = super::reconcile_issuer_backend(at, ctx).await else {
        // Without a reachable issuer kind (issuer deleted first) the tokens
        // die at their expiry; service-account bindings go with the
        // AgentToken anyway.
        return release(at, ctx, &ns, &name, 0).await;
    };
    // Each live token of the ledger (status, which only the operator writes;
    // never the Secret's record) with the token the Secret still holds for
    // it, if any.
    let status = at.status.clone().unwrap_or_default();
    let mut handles: Vec<(String, Option<SecretString>)> = Vec::new();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let live = secrets.get_opt(&at.secret_name()).await?;
    let owned = matches!(secret::ownership(live.as_ref(), &uid), Ownership::Owned);
    let state = live
        .as_ref()
        .filter(|_| owned)
        .map(secret::read_state)
        .unwrap_or_default();
    let key = at.secret_key();
    let held = |revision: i64| {
        let previous_key = format!("{key}{}", secret::PREVIOUS_SUFFIX);
        if state
            .current
            .as_ref()
            .is_some_and(|c| c.revision == revision)
        {
            secret::token_in(live.as_ref(), &key)
        } else if state
            .previous
            .as_ref()
            .is_some_and(|p| p.revision == revision)
        {
            secret::token_in(live.as_ref(), &previous_key)
        } else {
            None
        }
    };
    // A token already past its expiry is dead: the finalizer never waits
    // on a revocation that cannot succeed.
    let now = ctx.clock.now();
    for h in status
        .history
        .iter()
        .filter(|h| h.revocation == crate::crd::RevocationState::Pending)
        .filter(|h| h.expires_at.as_ref().is_none_or(|e| e.0 > now))
    {
        if let Some(handle) =
            super::reconcile::trusted_handle(&status, &name, backend.kind(), h.revision)
        {
            handles.push((handle, held(h.revision)));
        }
    }
    // Binding Secrets this AgentToken owns (by UID) that the ledger does not
    // list: a token minted just before a crash.
    if backend.kind() == "serviceAccount" {
        for (binding, _) in ctx.bindings_of(&ns, &name, &uid) {
            if !handles.iter().any(|(h, _)| *h == binding) {
                handles.push((binding, None));
            }
        }
    }
    {
        let mut failed = 0;
        for (handle, token) in &handles {
            if backend
                .revoke(&ns, &RevocationHandle(handle.clone()), token.as_ref())
                .await
                .is_err()
            {
                failed += 1;
            }
        }
        ctx.metrics
            .revocations_on_delete(backend.kind(), handles.len() - failed, failed);
        if failed > 0 {
            ctx.publish(
                at,
                EventType::Warning,
                "RevocationFailed",
                format!(
                    "{failed} of {} tokens could not be revoked; retrying before deletion",
                    handles.len()
                ),
            )
            .await;
            return Err(Error::RevocationIncomplete(failed));
        }
        if !handles.is_empty() {
            ctx.publish(
                at,
                EventType::Normal,
                "TokenRevoked",
                format!("{} token(s) revoked on deletion", handles.len()),
            )
            .await;
        }
    }
    release(at, ctx, &ns, &name, handles.len()).await
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
    let patch = serde_json::json!({
        "metadata": {"finalizers": finalizers, "resourceVersion": at.meta().resource_version}
    });
    api.patch(
        &at.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

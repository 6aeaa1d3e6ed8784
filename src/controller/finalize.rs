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
    // Each handle with the token the Secret still holds for it, if any.
    let mut handles: Vec<(String, Option<SecretString>)> = Vec::new();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let live = secrets.get_opt(&at.secret_name()).await?;
    if let Ownership::Owned = secret::ownership(live.as_ref(), &uid) {
        let state = live.as_ref().map(secret::read_state).unwrap_or_default();
        let key = at.secret_key();
        if let Some(c) = state.current {
            handles.push((c.handle, secret::token_in(live.as_ref(), &key)));
        }
        if let Some(p) = state.previous {
            let previous_key = format!("{key}{}", secret::PREVIOUS_SUFFIX);
            handles.push((p.handle, secret::token_in(live.as_ref(), &previous_key)));
        }
    }
    for (binding, _) in ctx.bindings_of(&ns, &name, &uid) {
        if !handles.iter().any(|(h, _)| *h == binding) {
            handles.push((binding, None));
        }
    }

    if let Ok(backend) = super::reconcile_issuer_backend(at, ctx).await {
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
    // Without a reachable issuer kind (issuer deleted first) the tokens die at
    // their expiry; service-account bindings go with the AgentToken anyway.
    info!(namespace = %ns, agenttoken = %name, tokens = handles.len(), "revoked on deletion");
    ctx.metrics.forget_token(&ns, &name);
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

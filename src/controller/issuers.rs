//! Status of TokenIssuer and ClusterTokenIssuer: `Ready` says whether the
//! issuer's configuration can be served, with a reason a person can act on.

use std::sync::Arc;
use std::time::Duration;

use futures::{Future, StreamExt};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;

use super::reason::Reason;
use super::status::{self, READY, Want};
use super::{Context, Error, STATUS_MANAGER, ledger};
use crate::crd::{
    AgentToken, ClusterTokenIssuer, IssuerKind, TokenIssuer, TokenIssuerSpec, TokenIssuerStatus,
};
use crate::labels;
use kube::runtime::events::EventType;
use tracing::info;

/// How often an issuer's health is looked at again with nothing changing.
const RECHECK: Duration = Duration::from_secs(300);
/// How often an issuer that is not ready is looked at again.
const RECHECK_UNREADY: Duration = Duration::from_secs(30);

/// Why an issuer cannot serve, as a condition reason and message.
pub enum Unready {
    /// The kind is not implemented.
    NotSupported(String),
    /// The configuration is wrong (a Secret or key missing, a bad CA bundle).
    InvalidConfig(String),
    /// The issuer cannot be reached or answers with errors.
    Unreachable(String),
}

/// What `Ready` should say for an issuer spec (pure).
pub fn readiness(spec: &TokenIssuerSpec, backend: Result<(), Unready>) -> Want {
    match (spec.kind_name(), backend) {
        (None, _) => Want::new(
            READY,
            false,
            "InvalidSpec",
            "exactly one issuer kind must be set",
        ),
        (Some(_), Err(Unready::NotSupported(m))) => Want::new(READY, false, "NotSupported", m),
        (Some(_), Err(Unready::InvalidConfig(m))) => Want::new(READY, false, "InvalidConfig", m),
        (Some(_), Err(Unready::Unreachable(m))) => Want::new(READY, false, "Unreachable", m),
        (Some(kind), Ok(())) => Want::new(
            READY,
            true,
            "Valid",
            format!("{kind} issuer is configured and reachable"),
        ),
    }
}

trait IssuerObject:
    Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static
{
    const KIND: IssuerKind;
    fn spec(&self) -> &TokenIssuerSpec;
    fn conditions(&self) -> Vec<Condition>;
    fn status(&self) -> TokenIssuerStatus;
    fn api(&self, ctx: &Context) -> Api<Self>;
}

impl IssuerObject for TokenIssuer {
    const KIND: IssuerKind = IssuerKind::TokenIssuer;
    fn spec(&self) -> &TokenIssuerSpec {
        &self.spec
    }
    fn conditions(&self) -> Vec<Condition> {
        self.status.clone().unwrap_or_default().conditions
    }
    fn status(&self) -> TokenIssuerStatus {
        self.status.clone().unwrap_or_default()
    }
    fn api(&self, ctx: &Context) -> Api<Self> {
        Api::namespaced(ctx.client.clone(), &self.namespace().unwrap_or_default())
    }
}

impl IssuerObject for ClusterTokenIssuer {
    const KIND: IssuerKind = IssuerKind::ClusterTokenIssuer;
    fn spec(&self) -> &TokenIssuerSpec {
        &self.spec
    }
    fn conditions(&self) -> Vec<Condition> {
        self.status.clone().unwrap_or_default().conditions
    }
    fn status(&self) -> TokenIssuerStatus {
        self.status.clone().unwrap_or_default()
    }
    fn api(&self, _ctx: &Context) -> Api<Self> {
        Api::all(_ctx.client.clone())
    }
}

async fn reconcile<K: IssuerObject>(issuer: Arc<K>, ctx: Arc<Context>) -> Result<Action, Error> {
    // A TokenIssuer in a protected namespace is never called (nor are its
    // credentials read): AgentTokens there are not served either.
    if issuer
        .namespace()
        .is_some_and(|ns| ctx.protected_namespaces.contains(&ns))
    {
        return Ok(Action::await_change());
    }
    if issuer.meta().deletion_timestamp.is_some() {
        return release_when_unused(&*issuer, &ctx).await;
    }
    if !issuer
        .finalizers()
        .iter()
        .any(|f| f == labels::ISSUER_FINALIZER)
    {
        let mut finalizers = issuer.finalizers().to_vec();
        finalizers.push(labels::ISSUER_FINALIZER.to_string());
        patch_finalizers(&*issuer, &ctx, finalizers).await?;
    }
    // Suspended: nothing calls the issuer, not even a health check.
    let want = if issuer.spec().suspend {
        Want::new(
            READY,
            false,
            Reason::IssuerSuspended,
            "spec.suspend: this issuer mints nothing; its AgentTokens keep the tokens they hold until they expire",
        )
    } else {
        let backend = match ctx.issuer_backend(
            issuer.spec(),
            issuer.namespace().as_deref(),
            &issuer.name_any(),
        ) {
            Err(m) => Err(Unready::NotSupported(m)),
            Ok(b) => match b.check().await {
                Ok(()) => Ok(()),
                Err(e @ crate::issuer::IssuerError::Invalid(_)) => {
                    Err(Unready::InvalidConfig(e.to_string()))
                }
                Err(e) => Err(Unready::Unreachable(e.to_string())),
            },
        };
        readiness(issuer.spec(), backend)
    };
    let old = issuer.status();
    let was_suspended = old
        .conditions
        .iter()
        .any(|c| c.type_ == READY && c.reason == Reason::IssuerSuspended.as_str());
    let announce = |type_, reason: Reason, note: String| {
        let ctx = ctx.clone();
        let reference = issuer.object_ref(&());
        async move {
            let event = kube::runtime::events::Event {
                type_,
                reason: reason.as_str().into(),
                note: Some(note),
                action: reason.as_str().into(),
                secondary: None,
            };
            if let Err(e) = ctx.recorder.publish(&event, &reference).await {
                tracing::warn!(error = %e, %reason, "could not publish event");
            }
        }
    };
    if issuer.spec().suspend != was_suspended {
        let note = if issuer.spec().suspend {
            "suspended (spec.suspend): it mints nothing; its AgentTokens say IssuerSuspended"
        } else {
            "resumed: it mints again"
        };
        announce(EventType::Warning, Reason::IssuerSuspended, note.into()).await;
    }
    let kill = issuer.spec().revoke_issued_before.clone();
    let revoke_scope = kill.as_ref().and(issuer.spec().revoke_scope.clone());
    let announced = kill != old.revoke_issued_before || revoke_scope != old.revoke_scope;
    if kill.is_some() && announced {
        let when = kill.as_ref().map(|t| t.0.to_string()).unwrap_or_default();
        let scope = revoke_scope
            .as_ref()
            .map(|s| format!(" for {}", describe_scope(s)))
            .unwrap_or_default();
        let then = if issuer.spec().suspend {
            "revoked at once, not replaced while the issuer is suspended"
        } else {
            "revoked at once and replaced"
        };
        announce(
            EventType::Warning,
            Reason::KillSwitch,
            format!(
                "kill switch: every token this issuer minted before {when}{scope} is {then}; each AgentToken's ledger records its own"
            ),
        )
        .await;
    }
    let conditions = status::merge(
        &issuer.conditions(),
        &[want],
        issuer.meta().generation,
        ctx.clock.now(),
    );
    let ready = conditions
        .iter()
        .any(|c| c.type_ == READY && c.status == "True");
    if conditions != issuer.conditions() || announced {
        let st = TokenIssuerStatus {
            conditions,
            observed_generation: issuer.meta().generation,
            revoke_issued_before: kill,
            revoke_scope,
        };
        let patch = serde_json::json!({
            "apiVersion": K::api_version(&()),
            "kind": K::kind(&()),
            "status": st,
        });
        issuer
            .api(&ctx)
            .patch_status(
                &issuer.name_any(),
                &PatchParams::apply(STATUS_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await?;
    }
    Ok(Action::requeue(if ready {
        RECHECK
    } else {
        RECHECK_UNREADY
    }))
}

/// An issuer being deleted stays until no AgentToken holds an open ledger
/// entry minted by it (this very object, by UID): their revocations need it.
async fn release_when_unused<K: IssuerObject>(issuer: &K, ctx: &Context) -> Result<Action, Error> {
    if !issuer
        .finalizers()
        .iter()
        .any(|f| f == labels::ISSUER_FINALIZER)
    {
        return Ok(Action::await_change());
    }
    let uid = issuer.meta().uid.clone().unwrap_or_default();
    let name = issuer.name_any();
    let scopes: Vec<Api<AgentToken>> = match (K::KIND, issuer.namespace()) {
        (IssuerKind::TokenIssuer, Some(ns)) => vec![Api::namespaced(ctx.client.clone(), &ns)],
        _ if ctx.watched_namespaces.is_empty() => vec![Api::all(ctx.client.clone())],
        _ => ctx
            .watched_namespaces
            .iter()
            .map(|ns| Api::namespaced(ctx.client.clone(), ns))
            .collect(),
    };
    let mut holders = 0usize;
    for api in scopes {
        for at in api.list(&ListParams::default()).await? {
            let refers = at.spec.issuer_ref.kind == K::KIND && at.spec.issuer_ref.name == name;
            let holds = at.status.iter().flat_map(|s| &s.history).any(|e| {
                ledger::is_open(e)
                    && match &e.issuer {
                        Some(rec) => rec.uid == uid,
                        None => refers,
                    }
            });
            if holds {
                holders += 1;
            }
        }
    }
    if holders > 0 {
        info!(issuer = %name, holders, "deleting: waiting for the tokens it minted to be revoked");
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    let finalizers: Vec<String> = issuer
        .finalizers()
        .iter()
        .filter(|f| *f != labels::ISSUER_FINALIZER)
        .cloned()
        .collect();
    patch_finalizers(issuer, ctx, finalizers).await?;
    Ok(Action::await_change())
}

/// A JSON merge patch of the finalizers with the resourceVersion: a
/// concurrent change fails with a conflict and is retried.
async fn patch_finalizers<K: IssuerObject>(
    issuer: &K,
    ctx: &Context,
    finalizers: Vec<String>,
) -> Result<(), Error> {
    let patch = serde_json::json!({
        "metadata": {"finalizers": finalizers, "resourceVersion": issuer.meta().resource_version}
    });
    issuer
        .api(ctx)
        .patch(
            &issuer.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    Ok(())
}

fn error_policy<K: IssuerObject>(_: Arc<K>, _: &Error, _: Arc<Context>) -> Action {
    Action::requeue(Duration::from_secs(10))
}

/// Runs the TokenIssuer status loop until `shutdown`.
pub async fn run_namespaced(
    issuers: Api<TokenIssuer>,
    ctx: Arc<Context>,
    shutdown: impl Future<Output = ()> + Clone + Send + Sync + 'static,
) {
    Controller::new(issuers, watcher::Config::default())
        .graceful_shutdown_on(shutdown)
        .run(reconcile::<TokenIssuer>, error_policy::<TokenIssuer>, ctx)
        .for_each(|_| futures::future::ready(()))
        .await
}

/// Runs the ClusterTokenIssuer status loop until `shutdown`.
pub async fn run_cluster(
    cluster_issuers: Api<ClusterTokenIssuer>,
    ctx: Arc<Context>,
    shutdown: impl Future<Output = ()> + Clone + Send + Sync + 'static,
) {
    Controller::new(cluster_issuers, watcher::Config::default())
        .graceful_shutdown_on(shutdown)
        .run(
            reconcile::<ClusterTokenIssuer>,
            error_policy::<ClusterTokenIssuer>,
            ctx,
        )
        .for_each(|_| futures::future::ready(()))
        .await
}

/// A kill switch's scope in words, for its Event.
fn describe_scope(s: &crate::crd::RevokeScope) -> String {
    let mut parts = Vec::new();
    if !s.namespaces.is_empty() {
        parts.push(format!("namespaces {}", s.namespaces.join(", ")));
    }
    if let Some(sel) = &s.namespace_selector {
        parts.push(format!("namespaces labelled {}", selector_text(sel)));
    }
    if let Some(sel) = &s.selector {
        parts.push(format!("AgentTokens labelled {}", selector_text(sel)));
    }
    if parts.is_empty() {
        "all its AgentTokens".into()
    } else {
        parts.join(" and ")
    }
}

/// A label selector as `kubectl get -l` would take it.
fn selector_text(sel: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector) -> String {
    let mut terms: Vec<String> = sel
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for e in sel.match_expressions.iter().flatten() {
        let values = e.values.clone().unwrap_or_default().join(",");
        terms.push(match e.operator.as_str() {
            "In" => format!("{} in ({values})", e.key),
            "NotIn" => format!("{} notin ({values})", e.key),
            "Exists" => e.key.clone(),
            "DoesNotExist" => format!("!{}", e.key),
            other => format!("{} {other} ({values})", e.key),
        });
    }
    terms.join(",")
}

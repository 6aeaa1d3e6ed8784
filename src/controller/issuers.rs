//! Status of TokenIssuer and ClusterTokenIssuer: `Ready` says whether the
//! issuer's configuration can be served, with a reason a person can act on.

use std::sync::Arc;
use std::time::Duration;

use futures::{Future, StreamExt};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;

use super::status::{self, READY, Want};
use super::{Context, Error, STATUS_MANAGER};
use crate::crd::{ClusterTokenIssuer, TokenIssuer, TokenIssuerSpec, TokenIssuerStatus};

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
    fn spec(&self) -> &TokenIssuerSpec;
    fn conditions(&self) -> Vec<Condition>;
    fn api(&self, ctx: &Context) -> Api<Self>;
}

impl IssuerObject for TokenIssuer {
    fn spec(&self) -> &TokenIssuerSpec {
        &self.spec
    }
    fn conditions(&self) -> Vec<Condition> {
        self.status.clone().unwrap_or_default().conditions
    }
    fn api(&self, ctx: &Context) -> Api<Self> {
        Api::namespaced(ctx.client.clone(), &self.namespace().unwrap_or_default())
    }
}

impl IssuerObject for ClusterTokenIssuer {
    fn spec(&self) -> &TokenIssuerSpec {
        &self.spec
    }
    fn conditions(&self) -> Vec<Condition> {
        self.status.clone().unwrap_or_default().conditions
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
    let want = readiness(issuer.spec(), backend);
    let conditions = status::merge(
        &issuer.conditions(),
        &[want],
        issuer.meta().generation,
        ctx.clock.now(),
    );
    let ready = conditions
        .iter()
        .any(|c| c.type_ == READY && c.status == "True");
    if conditions != issuer.conditions() {
        let st = TokenIssuerStatus {
            conditions,
            observed_generation: issuer.meta().generation,
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

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

/// What `Ready` should say for an issuer spec (pure).
pub fn readiness(spec: &TokenIssuerSpec, backend: Result<(), String>) -> Want {
    match (spec.kind_name(), backend) {
        (None, _) => Want::new(
            READY,
            false,
            "InvalidSpec",
            "exactly one issuer kind must be set",
        ),
        (Some(_), Err(message)) => Want::new(READY, false, "NotSupported", message),
        (Some(kind), Ok(())) => {
            Want::new(READY, true, "Valid", format!("{kind} issuer is configured"))
        }
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
    let backend = ctx.issuer_backend(issuer.spec()).map(|_| ());
    let want = readiness(issuer.spec(), backend);
    let conditions = status::merge(
        &issuer.conditions(),
        &[want],
        issuer.meta().generation,
        ctx.clock.now(),
    );
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
    Ok(Action::requeue(RECHECK))
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

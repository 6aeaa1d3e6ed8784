//! The controller: wiring of watches, the shared context, errors, and the
//! issuer status loop. The AgentToken reconcile phases live in
//! [`reconcile`]; pure decisions in [`decide`], [`secret`] and [`status`].

pub mod bindings;
pub mod consumers;
pub mod decide;
pub mod finalize;
pub mod issuers;
pub mod keeper;
pub mod ledger;
pub mod queue;
pub mod reason;
pub mod reconcile;
pub mod restarts;
pub mod revoke;
pub mod secret;
pub mod selector;
pub mod status;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::events::Recorder;
use futures::{FutureExt, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PartialObjectMeta};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use tracing::{info, warn};

use crate::crd::{
    AgentToken, AgentTokenSpec, ClusterTokenIssuer, IssuerKind, IssuerRecord, TokenIssuer,
    TokenIssuerSpec,
};
use crate::http::Readiness;
use crate::issuer::github_app::GithubAppIssuer;
use crate::issuer::jwt::JwtIssuer;
use crate::issuer::oauth2::OAuth2Issuer;
use crate::issuer::service_account::ServiceAccountIssuer;
use crate::issuer::vault::VaultIssuer;
use crate::issuer::web::Egress;
use crate::issuer::webhook::WebhookIssuer;
use crate::issuer::{Issuer, IssuerError};
use crate::labels;
use crate::ratelimit::RateLimiters;
use crate::rotation::{self, Clock, SystemClock};
use crate::telemetry::Metrics;

/// Field manager for the token Secret.
pub const FIELD_MANAGER: &str = "agent-token-operator";
/// Field manager for status writes.
pub const STATUS_MANAGER: &str = "agent-token-operator-status";

/// Why a reconcile failed. Never carries a token.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API error: {0}")]
    Kube(#[from] kube::Error),
    #[error("issuer error: {0}")]
    Issuer(#[from] IssuerError),
    #[error("object has no namespace")]
    MissingNamespace,
    #[error("object has no uid")]
    MissingUid,
    #[error("Secret {0:?} appeared while the operator was creating it; it is not taken over")]
    SecretAppeared(String),
    #[error("{0} token(s) could not be revoked")]
    RevocationIncomplete(usize),
    /// The AgentToken was deleted, or replaced by another of its name,
    /// while it was being written.
    #[error("the AgentToken is gone (deleted or replaced) while its status was being written")]
    Gone,
    /// This replica no longer holds the leader Lease: it writes nothing.
    #[error("this replica is no longer the leader")]
    NotLeader,
    /// A bug met data it did not expect. The object backs off; the process
    /// and every other object go on.
    #[error("reconcile panicked: {0}")]
    Panicked(String),
}

impl Error {
    /// A short label value for the reconcile error metric.
    pub fn metric_reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Issuer(_) => "issuer",
            Error::MissingNamespace | Error::MissingUid => "invalid_object",
            Error::SecretAppeared(_) => "secret_conflict",
            Error::RevocationIncomplete(_) => "revocation",
            Error::NotLeader => "not_leader",
            Error::Gone => "gone",
            Error::Panicked(_) => "panic",
        }
    }
}

/// What the operator runs with.
#[derive(Clone, Debug, Default)]
pub struct Config {
    /// Watch only these namespaces (empty: the whole cluster).
    pub namespaces: Vec<String>,
    /// Reconciles running at once.
    pub concurrency: u16,
    /// Name used in Events and leases.
    pub instance: String,
    /// How consumer rollouts are coalesced, capped and timed out.
    pub restarts: restarts::RestartConfig,
    /// The operator's own namespace: where a ClusterTokenIssuer's Secrets live.
    pub operator_namespace: String,
    /// Where a namespaced TokenIssuer's HTTP requests may go
    /// (`--issuer-allow-http`, `--issuer-allow-cidr`); a ClusterTokenIssuer
    /// is the platform's and goes anywhere.
    pub tenant_egress: Egress,
    /// Namespaces never served ([`protected_namespaces`]).
    pub protected_namespaces: Vec<String>,
    /// Whether, and how long, this replica may act as leader.
    pub leadership: crate::leadership::Leadership,
}

/// The namespaces the operator never serves unless told to: the cluster's
/// own (kube-system, kube-public, kube-node-lease) and its own, where a
/// ClusterTokenIssuer's credentials live. `served` are those it was told
/// to serve (`--namespace`, `--serve-protected-namespaces`).
pub fn protected_namespaces<'a>(
    operator_namespace: &str,
    served: impl Iterator<Item = &'a str>,
) -> Vec<String> {
    let served: Vec<&str> = served.collect();
    [
        "kube-system",
        "kube-public",
        "kube-node-lease",
        operator_namespace,
    ]
    .into_iter()
    .filter(|ns| !served.contains(ns))
    .map(String::from)
    .collect()
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub limiters: RateLimiters,
    pub clock: Arc<dyn Clock>,
    /// Binding Secrets by AgentToken, one index per watched scope.
    pub bindings: Vec<Arc<bindings::BindingIndex>>,
    /// Applies consumer rollout restarts.
    pub restarter: Arc<restarts::Restarter>,
    /// Where a ClusterTokenIssuer's Secrets live.
    pub operator_namespace: String,
    /// Fair, urgency-ordered admission of reconciles (`--concurrency` slots).
    pub queue: queue::FairQueue,
    /// Where a namespaced TokenIssuer's HTTP requests may go.
    pub tenant_egress: Egress,
    /// Namespaces never served (`Config::protected_namespaces`).
    pub protected_namespaces: Vec<String>,
    /// The namespaces watched (`Config::namespaces`; empty: all).
    pub watched_namespaces: Vec<String>,
    /// Whether, and how long, this replica may act as leader: an issuer
    /// call gets at most [`Leadership::budget`](crate::leadership::Leadership::budget).
    pub leadership: crate::leadership::Leadership,
    failures: Mutex<HashMap<String, u32>>,
    /// What this replica last wrote of each AgentToken being reconciled
    /// (by UID): the base of its next status write. Dropped when the
    /// reconcile ends.
    written: Mutex<HashMap<String, Written>>,
}

/// An AgentToken as this replica last wrote it.
#[derive(Clone, Debug)]
pub struct Written {
    pub resource_version: String,
    /// The server's copy of that write.
    pub status: crate::crd::AgentTokenStatus,
    /// Entries someone else changed during this reconcile: every later
    /// write of it keeps them ([`ledger::apply_foreign`]).
    pub foreign: ledger::Foreign,
}

impl Context {
    /// The implementation of the issuer's kind. `namespace` is a
    /// TokenIssuer's namespace (`None` for a ClusterTokenIssuer, whose
    /// Secrets live in the operator's namespace). A TokenIssuer's HTTP
    /// calls follow [`Context::tenant_egress`]; a ClusterTokenIssuer's go
    /// anywhere.
    pub fn issuer_backend(
        &self,
        spec: &TokenIssuerSpec,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Box<dyn Issuer>, String> {
        let secret_namespace = namespace.unwrap_or(&self.operator_namespace).to_string();
        let egress = match namespace {
            Some(_) => self.tenant_egress.clone(),
            None => Egress::platform(),
        };
        if spec.service_account.is_some() {
            return Ok(Box::new(ServiceAccountIssuer::new(self.client.clone())));
        }
        if let Some(o) = &spec.oauth2 {
            return Ok(Box::new(OAuth2Issuer::new(
                self.client.clone(),
                o.clone(),
                secret_namespace,
                egress,
            )));
        }
        if let Some(j) = &spec.jwt {
            return Ok(Box::new(JwtIssuer::new(
                self.client.clone(),
                j.clone(),
                secret_namespace,
                name,
            )));
        }
        if let Some(g) = &spec.github_app {
            return Ok(Box::new(GithubAppIssuer::new(
                self.client.clone(),
                g.clone(),
                secret_namespace,
                egress,
            )));
        }
        if let Some(v) = &spec.vault {
            return Ok(Box::new(VaultIssuer::new(
                self.client.clone(),
                v.clone(),
                secret_namespace,
                egress,
            )));
        }
        if let Some(w) = &spec.webhook {
            return Ok(Box::new(WebhookIssuer::new(
                self.client.clone(),
                w.clone(),
                secret_namespace,
                egress,
            )));
        }
        match spec.kind_name() {
            Some(kind) => Err(format!(
                "issuer kind {kind:?} is not supported by this operator version"
            )),
            None => Err("the issuer sets no issuer kind".into()),
        }
    }

    /// Spends one request of the issuer's rate budget, or says how long
    /// until there is one (always `Ok` without `policy.rateLimit`).
    pub fn try_budget(&self, key: &str, spec: &TokenIssuerSpec) -> Result<(), Duration> {
        match spec.policy.as_ref().and_then(|p| p.rate_limit.as_ref()) {
            Some(limit) => self
                .limiters
                .try_acquire(key, limit.per_second as f64, limit.burst),
            None => Ok(()),
        }
    }

    /// Binding Secrets (name, revision) of one AgentToken, from the index:
    /// only those owned by `uid`.
    pub fn bindings_of(&self, ns: &str, name: &str, uid: &str) -> Vec<(String, i64)> {
        self.bindings
            .iter()
            .flat_map(|i| i.of(ns, name, uid))
            .collect()
    }

    /// What this replica last wrote of AgentToken `uid`, if it wrote it
    /// during the running reconcile.
    pub fn written(&self, uid: &str) -> Option<Written> {
        self.written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(uid)
            .cloned()
    }

    /// Records a write of AgentToken `uid` (`None`: the reconcile ended).
    pub fn set_written(&self, uid: &str, w: Option<Written>) {
        let mut map = self.written.lock().unwrap_or_else(|e| e.into_inner());
        match w {
            Some(w) => map.insert(uid.to_string(), w),
            None => map.remove(uid),
        };
    }

    /// Forgets an object's reconcile failures after a success.
    pub fn reset_failures(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }

    /// Publishes an Event on the AgentToken. Notes never contain a token.
    pub async fn publish(
        &self,
        at: &AgentToken,
        type_: EventType,
        reason: reason::Reason,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.as_str().into(),
            note: Some(note),
            action: reason.as_str().into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &at.object_ref(&())).await {
            warn!(error = %e, %reason, "could not publish event");
        }
    }
}

/// The issuer an AgentToken refers to now, looked up live, with its
/// identity; `None` when it does not exist (or its kind is unusable).
pub(crate) async fn reconcile_issuer(
    at: &AgentToken,
    ctx: &Context,
) -> Result<Option<(IssuerRecord, Box<dyn Issuer>)>, Error> {
    let ns = at.namespace().unwrap_or_default();
    let name = &at.spec.issuer_ref.name;
    let (found, issuer_ns) = match at.spec.issuer_ref.kind {
        IssuerKind::TokenIssuer => (
            Api::<TokenIssuer>::namespaced(ctx.client.clone(), &ns)
                .get_opt(name)
                .await?
                .map(|i| (i.spec, i.metadata.uid)),
            Some(ns.as_str()),
        ),
        IssuerKind::ClusterTokenIssuer => (
            Api::<ClusterTokenIssuer>::all(ctx.client.clone())
                .get_opt(name)
                .await?
                .map(|i| (i.spec.0, i.metadata.uid)),
            None,
        ),
    };
    let Some((spec, uid)) = found else {
        return Ok(None);
    };
    Ok(ctx.issuer_backend(&spec, issuer_ns, name).ok().map(|b| {
        (
            IssuerRecord {
                kind: at.spec.issuer_ref.kind,
                name: name.clone(),
                uid: uid.unwrap_or_default(),
                type_: b.kind().to_string(),
            },
            b,
        )
    }))
}

fn error_policy(at: Arc<AgentToken>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = format!("{}/{}", at.namespace().unwrap_or_default(), at.name_any());
    let attempts = {
        let mut failures = ctx.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = failures.entry(key.clone()).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let wait = rotation::backoff(attempts, &key);
    warn!(agenttoken = %key, error = %error, attempts, retry_in = ?wait, "reconcile failed");
    Action::requeue(wait)
}

/// Runs the controllers until `shutdown` resolves. Readiness is set once
/// every watch has synced. With namespaces listed, one controller per
/// namespace shares the context (rate limits, restarts, caches), so the
/// operator needs no cluster-wide access to namespaced objects.
pub async fn run(
    client: Client,
    config: Config,
    metrics: Arc<Metrics>,
    readiness: Readiness,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let scopes: Vec<Option<String>> = if config.namespaces.is_empty() {
        vec![None]
    } else {
        config.namespaces.iter().cloned().map(Some).collect()
    };
    let api = |ns: &Option<String>| -> (
        Api<AgentToken>,
        Api<PartialObjectMeta<Secret>>,
        Api<TokenIssuer>,
    ) {
        match ns {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
            None => (
                Api::all(client.clone()),
                Api::all(client.clone()),
                Api::all(client.clone()),
            ),
        }
    };
    let cluster_issuers: Api<ClusterTokenIssuer> = Api::all(client.clone());

    // Only our Secrets, metadata only, labels only: memory follows our
    // objects, never the cluster's other Secrets.
    let mut binding_indexes = Vec::new();
    let mut secret_streams = Vec::new();
    for scope in &scopes {
        let index = Arc::new(bindings::BindingIndex::default());
        let events = watcher(
            api(scope).1,
            watcher::Config::default().labels(labels::MANAGED_SELECTOR),
        )
        .default_backoff()
        .inspect_ok({
            let index = index.clone();
            move |event| index.apply(event)
        })
        .touched_objects();
        binding_indexes.push(index);
        secret_streams.push(events);
    }

    let reporter = Reporter {
        controller: FIELD_MANAGER.into(),
        instance: Some(config.instance.clone()),
    };
    let recorder = Recorder::new(client.clone(), reporter);
    let restarter = Arc::new(restarts::Restarter::new(
        client.clone(),
        recorder.clone(),
        metrics.clone(),
        config.restarts,
    ));
    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder,
        restarter: restarter.clone(),
        operator_namespace: config.operator_namespace.clone(),
        metrics: metrics.clone(),
        limiters: RateLimiters::default(),
        clock: Arc::new(SystemClock),
        bindings: binding_indexes.clone(),
        queue: queue::FairQueue::new(usize::from(config.concurrency.max(1))),
        tenant_egress: config.tenant_egress.clone(),
        protected_namespaces: config.protected_namespaces.clone(),
        watched_namespaces: config.namespaces.clone(),
        leadership: config.leadership.clone(),
        failures: Mutex::new(HashMap::new()),
        written: Mutex::new(HashMap::new()),
    });

    let shutdown = futures::future::FutureExt::shared(Box::pin(shutdown));
    let mut loops = Vec::new();
    let mut at_stores = Vec::new();
    for (scope, secret_events) in scopes.iter().zip(secret_streams) {
        let (ats, _, issuers_api) = api(scope);
        let (at_store, at_writer) = reflector::store::<AgentToken>();
        let at_events = watcher(ats, watcher::Config::default())
            .default_backoff()
            .modify(slim_cached_agent_token)
            .reflect(at_writer)
            .touched_objects();
        // Unbounded here: the slots are the fair queue's (`ctx.queue`), which
        // orders waiting reconciles by urgency and namespace; a reconcile
        // waiting for a slot is a parked future, not a worker.
        let controller = Controller::for_stream(at_events, at_store.clone())
            .with_config(kube::runtime::controller::Config::default().concurrency(0));
        at_stores.push(at_store.clone());
        let ns_issuer_map = by_issuer(at_store.clone(), IssuerKind::TokenIssuer);
        let cluster_issuer_map = by_issuer(at_store.clone(), IssuerKind::ClusterTokenIssuer);
        let token_loop = controller
            .watches_stream(secret_events, |secret: PartialObjectMeta<Secret>| {
                let ns = secret.metadata.namespace.clone()?;
                let name = secret.labels().get(labels::NAME)?.clone();
                Some(ObjectRef::<AgentToken>::new(&name).within(&ns))
            })
            .watches(
                issuers_api.clone(),
                watcher::Config::default(),
                move |i: TokenIssuer| ns_issuer_map(i.namespace(), i.name_any()),
            )
            .watches(
                cluster_issuers.clone(),
                watcher::Config::default(),
                move |i: ClusterTokenIssuer| cluster_issuer_map(None, i.name_any()),
            )
            .graceful_shutdown_on(shutdown.clone())
            .run(reconcile::reconcile, error_policy, ctx.clone())
            .for_each(|_| futures::future::ready(()));
        loops.push(token_loop.boxed());
        loops.push(issuers::run_namespaced(issuers_api, ctx.clone(), shutdown.clone()).boxed());
    }
    loops.push(issuers::run_cluster(cluster_issuers, ctx.clone(), shutdown.clone()).boxed());
    loops.push(restarter.run(shutdown.clone()).boxed());

    let readiness_task = {
        let readiness = readiness.clone();
        async move {
            let ats = futures::future::try_join_all(at_stores.iter().map(synced));
            let secrets = async {
                while !binding_indexes.iter().all(|i| i.synced()) {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Ok(())
            };
            match futures::future::try_join(ats, secrets).await {
                Ok(_) => {
                    info!("caches synced; ready");
                    readiness.set(true);
                }
                Err(e) => warn!(error = %e, "a cache stopped before it synced; never ready"),
            }
        }
    };
    tokio::spawn(readiness_task);

    futures::future::join_all(loops).await;
    info!("controllers stopped");
}

/// Maps an issuer to the AgentTokens (in `store`) that use it.
fn by_issuer(
    store: Store<AgentToken>,
    kind: IssuerKind,
) -> impl Fn(Option<String>, String) -> Vec<ObjectRef<AgentToken>> + Send + Sync + 'static {
    move |obj_ns: Option<String>, name: String| {
        store
            .state()
            .into_iter()
            .filter(|at| at.spec.issuer_ref.kind == kind && at.spec.issuer_ref.name == name)
            .filter(|at| kind == IssuerKind::ClusterTokenIssuer || at.namespace() == obj_ns)
            .map(|at| ObjectRef::from_obj(&*at))
            .collect::<Vec<_>>()
    }
}

/// Waits until a store has its first full list. A store's readiness wakes
/// only its most recent waiter (the controller waits on it too), so a lone
/// wait can sleep forever: poll it instead.
async fn synced<K>(store: &Store<K>) -> Result<(), reflector::store::WriterDropped>
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    loop {
        if let Ok(done) =
            tokio::time::timeout(Duration::from_millis(200), store.wait_until_ready()).await
        {
            return done;
        }
    }
}

/// Default reconcile concurrency.
pub const DEFAULT_CONCURRENCY: u16 = 16;

/// kubectl's client-side apply copy of an object.
/// What the AgentToken cache keeps: identity and `spec.issuerRef` (to map an
/// issuer's change to its AgentTokens). Reconcile reads the live object, so
/// nothing else is read from the cache, and at 10,000 AgentTokens every
/// field kept costs its bytes 10,000 times.
fn slim_cached_agent_token(at: &mut AgentToken) {
    // What the fair queue's urgency needs: the token's expiry and whether a
    // revoke trigger is still to be handled.
    at.status = at.status.take().map(|st| crate::crd::AgentTokenStatus {
        expires_at: st.expires_at,
        handled_triggers: st.handled_triggers.map(|h| crate::crd::HandledTriggers {
            rotate: None,
            revoke: h.revoke,
        }),
        ..Default::default()
    });
    let meta = &mut at.metadata;
    meta.managed_fields = None;
    meta.annotations = meta.annotations.take().and_then(|mut a| {
        let revoke = a.remove(labels::REVOKE)?;
        Some([(labels::REVOKE.to_string(), revoke)].into())
    });
    meta.labels = None;
    meta.owner_references = None;
    meta.finalizers = None;
    meta.generate_name = None;
    meta.creation_timestamp = None;
    at.spec = AgentTokenSpec::for_issuer(at.spec.issuer_ref.clone());
}

/// How long the operator waits on the API when shutting down.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::protected_namespaces;

    #[test]
    fn system_and_own_namespaces_are_protected_unless_told() {
        assert_eq!(
            protected_namespaces("ops", std::iter::empty()),
            ["kube-system", "kube-public", "kube-node-lease", "ops"]
        );
        // Listed in --namespace or --serve-protected-namespaces: served.
        assert_eq!(
            protected_namespaces("ops", ["ops", "kube-public"].into_iter()),
            ["kube-system", "kube-node-lease"]
        );
    }
}

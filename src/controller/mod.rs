//! The controller: wiring of watches, the shared context, errors, and the
//! issuer status loop. The AgentToken reconcile phases live in
//! [`reconcile`]; pure decisions in [`decide`], [`secret`] and [`status`].

pub mod bindings;
pub mod cached;
pub mod consumers;
pub mod decide;
pub mod drills;
pub mod finalize;
pub mod issuers;
pub mod keeper;
pub mod ledger;
pub mod others;
pub mod queue;
pub mod reason;
pub mod reconcile;
pub mod restarts;
pub mod revoke;
pub mod secret;
pub mod selector;
pub mod sources;
pub mod status;
pub mod unused;
pub mod workloads;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::events::Recorder;
use futures::{FutureExt, StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PartialObjectMeta};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use tracing::{info, warn};

use crate::crd::{
    AgentToken, ClusterTokenIssuer, IssuerKind, IssuerRecord, TokenIssuer, TokenIssuerSpec,
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
    /// Where uses reported by the usage endpoint are kept.
    pub usage: Arc<crate::usage::Tracker>,
    /// Whether this operator serves jwt introspection (a jwt's revocation
    /// means something to the services that introspect).
    pub jwt_introspection: bool,
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
    /// The token Secrets' versions the operator last wrote or read: a
    /// watch event that brings one of them is our own write coming back,
    /// not a reason to reconcile.
    pub secret_versions: Arc<bindings::SeenVersions>,
    /// TokenIssuers and ClusterTokenIssuers from their watches.
    pub issuers: IssuerCache,
    /// Deployments, StatefulSets and DaemonSets by namespace, from watches:
    /// consumers are found here, never with a LIST.
    pub workloads: workloads::Workloads,
    /// Pods, Jobs and CronJobs that use a Secret, asked before `Unused`.
    pub others: others::OtherConsumers,
    /// Revocation drills being measured.
    pub drills: drills::Drills,
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
    /// Uses of the tokens, by credential id (`--usage-address`).
    pub usage: Arc<crate::usage::Tracker>,
    failures: Mutex<HashMap<String, u32>>,
    /// What this replica last wrote of each AgentToken being reconciled
    /// (by UID): the base of its next status write. Dropped when the
    /// reconcile ends.
    written: Mutex<HashMap<String, Written>>,
}

/// TokenIssuers (one store per watched scope) and ClusterTokenIssuers as
/// their watches last saw them. Read only once every store has synced
/// (before that, and to confirm an issuer the cache does not have, the
/// API server is asked: an AgentToken whose issuer is missing has its
/// tokens revoked, so a lagging cache must never decide that alone).
#[derive(Clone)]
pub struct IssuerCache {
    namespaced: Vec<Store<TokenIssuer>>,
    cluster: Store<ClusterTokenIssuer>,
    synced: Arc<std::sync::atomic::AtomicBool>,
}

impl IssuerCache {
    /// The TokenIssuer `ns/name`: `None` when the cache cannot say (not
    /// synced, or it does not hold it).
    pub fn token_issuer(&self, ns: &str, name: &str) -> Option<Arc<TokenIssuer>> {
        if !self.synced.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        let key = ObjectRef::<TokenIssuer>::new(name).within(ns);
        self.namespaced.iter().find_map(|s| s.get(&key))
    }

    /// The ClusterTokenIssuer `name`, as [`IssuerCache::token_issuer`].
    pub fn cluster_issuer(&self, name: &str) -> Option<Arc<ClusterTokenIssuer>> {
        if !self.synced.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        self.cluster.get(&ObjectRef::new(name))
    }
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

    /// Spends one revocation from the issuer's rate budget; an urgent one
    /// (`HistoryEntry::urgent`) may go on to `rateLimit.emergency` once the
    /// shared budget is spent. Says how long until there is one.
    pub fn try_revocation_budget(
        &self,
        key: &str,
        limit: Option<&crate::crd::RateLimit>,
        urgent: bool,
    ) -> Result<(), Duration> {
        match limit {
            Some(limit) => self.limiters.try_revocation(key, limit, urgent),
            None => Ok(()),
        }
    }

    /// Whether the indexes a reconcile trusts have their first full list:
    /// before that, a binding Secret the ledger did not record (a mint the
    /// operator stopped in) would not be found, and its revision could be
    /// numbered again.
    pub fn bindings_synced(&self) -> bool {
        self.bindings.iter().all(|i| i.synced())
    }

    /// Whether the watch of our Secrets has one labelled ours named
    /// `ns/name` (`true` when it cannot say yet).
    pub fn labelled_secret(&self, ns: &str, name: &str) -> bool {
        !self.bindings_synced() || self.bindings.iter().any(|i| i.has_labelled(ns, name))
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
) -> Result<Option<CurrentBackend>, Error> {
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
    let key = issuer_key(issuer_ns, name);
    let rate = spec.policy.as_ref().and_then(|p| p.rate_limit.clone());
    Ok(ctx
        .issuer_backend(&spec, issuer_ns, name)
        .ok()
        .map(|backend| CurrentBackend {
            record: IssuerRecord {
                kind: at.spec.issuer_ref.kind,
                name: name.clone(),
                uid: uid.unwrap_or_default(),
                type_: backend.kind().to_string(),
            },
            backend,
            key,
            rate,
        }))
}

/// An issuer's key for rate limits and metrics: `TokenIssuer/ns/name`
/// (`ns` given) or `ClusterTokenIssuer/name`. Mints and revocations spend
/// the same bucket only because they build it here.
pub(crate) fn issuer_key(ns: Option<&str>, name: &str) -> String {
    match ns {
        Some(ns) => format!("TokenIssuer/{ns}/{name}"),
        None => format!("ClusterTokenIssuer/{name}"),
    }
}

/// The issuer an AgentToken names, resolved outside a reconcile (deletion,
/// fail closed).
pub(crate) struct CurrentBackend {
    pub record: IssuerRecord,
    pub backend: Box<dyn Issuer>,
    pub key: String,
    pub rate: Option<crate::crd::RateLimit>,
}

impl CurrentBackend {
    pub fn as_current(&self) -> revoke::CurrentIssuer<'_> {
        revoke::CurrentIssuer {
            record: &self.record,
            backend: self.backend.as_ref(),
            key: &self.key,
            rate: self.rate.as_ref(),
        }
    }
}

fn error_policy(at: Arc<cached::CachedAgentToken>, error: &Error, ctx: Arc<Context>) -> Action {
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
        Api<cached::CachedAgentToken>,
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
    let secret_versions = Arc::new(bindings::SeenVersions::default());
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
        .try_filter_map({
            let seen = secret_versions.clone();
            move |event| futures::future::ready(Ok(bindings::reconcile_for(&event, &seen)))
        });
        binding_indexes.push(index);
        secret_streams.push(events);
    }
    // Workloads: one index per scope, fed by a watch per kind (started
    // below, once the shutdown signal exists).
    let workload_indexes: Vec<Arc<workloads::WorkloadIndex>> = scopes
        .iter()
        .map(|scope| Arc::new(workloads::WorkloadIndex::new(scope.clone())))
        .collect();
    let all_workloads = workloads::Workloads::new(workload_indexes.clone());

    // Issuers: one watch each, feeding the cache reconciles read them from
    // and the triggers of the AgentTokens that use them.
    let issuer_synced = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut issuer_stores = Vec::new();
    let mut issuer_streams = Vec::new();
    for scope in &scopes {
        let (store, writer) = reflector::store::<TokenIssuer>();
        issuer_stores.push(store);
        issuer_streams.push(
            watcher(api(scope).2, watcher::Config::default())
                .default_backoff()
                .reflect(writer)
                .touched_objects(),
        );
    }
    // One watch of ClusterTokenIssuers, shared: the cache, and every
    // scope's controller through a subscription (which sees an object only
    // once the cache holds it, so a reconcile it triggers reads it).
    let (cluster_store, cluster_writer) = reflector::store_shared::<ClusterTokenIssuer>(256);
    let cluster_subscriptions: Vec<_> = scopes
        .iter()
        .filter_map(|_| cluster_writer.subscribe())
        .collect();
    tokio::spawn(
        watcher(cluster_issuers.clone(), watcher::Config::default())
            .default_backoff()
            .reflect_shared(cluster_writer)
            .for_each(|_| futures::future::ready(())),
    );
    let issuer_cache = IssuerCache {
        namespaced: issuer_stores.clone(),
        cluster: cluster_store.clone(),
        synced: issuer_synced.clone(),
    };

    let reporter = Reporter {
        controller: FIELD_MANAGER.into(),
        instance: Some(config.instance.clone()),
    };
    let recorder = Recorder::new(client.clone(), reporter);
    let restarter = Arc::new(restarts::Restarter::new(
        client.clone(),
        all_workloads.clone(),
        recorder.clone(),
        metrics.clone(),
        config.restarts,
    ));
    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder: recorder.clone(),
        restarter: restarter.clone(),
        operator_namespace: config.operator_namespace.clone(),
        usage: config.usage.clone(),
        metrics: metrics.clone(),
        limiters: RateLimiters::default(),
        clock: Arc::new(SystemClock),
        bindings: binding_indexes.clone(),
        secret_versions: secret_versions.clone(),
        issuers: issuer_cache,
        workloads: all_workloads.clone(),
        others: others::OtherConsumers::new(client.clone()),
        drills: drills::Drills::new(
            client.clone(),
            recorder.clone(),
            metrics.clone(),
            config.usage.clone(),
            config.jwt_introspection,
        ),
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
    for index in &workload_indexes {
        let (c, i, stop) = (&client, index, &shutdown);
        loops.push(workloads::feed::<Deployment>(c.clone(), i.clone(), stop.clone()).boxed());
        loops.push(workloads::feed::<StatefulSet>(c.clone(), i.clone(), stop.clone()).boxed());
        loops.push(workloads::feed::<DaemonSet>(c.clone(), i.clone(), stop.clone()).boxed());
    }
    let mut at_stores = Vec::new();
    for (((scope, secret_events), issuer_events), cluster_events) in scopes
        .iter()
        .zip(secret_streams)
        .zip(issuer_streams)
        .zip(cluster_subscriptions)
    {
        let (ats, _, issuers_api) = api(scope);
        let (at_store, at_writer) = reflector::store::<cached::CachedAgentToken>();
        // A reconcile for what matters (spec, trigger annotations,
        // deletion), not for the operator's own status writes.
        let at_events = watcher(ats, watcher::Config::default())
            .default_backoff()
            .modify(cached::slim)
            .reflect(at_writer)
            .touched_objects()
            .predicate_filter(reconcile_trigger, Default::default());
        // Unbounded here: the slots are the fair queue's (`ctx.queue`), which
        // orders waiting reconciles by urgency and namespace; a reconcile
        // waiting for a slot is a parked future, not a worker.
        let controller = Controller::for_stream(at_events, at_store.clone())
            .with_config(kube::runtime::controller::Config::default().concurrency(0));
        at_stores.push(at_store.clone());
        let ns_issuer_map = by_issuer(at_store.clone(), IssuerKind::TokenIssuer);
        let cluster_issuer_map = by_issuer(at_store.clone(), IssuerKind::ClusterTokenIssuer);
        let (ns_changed, cluster_changed) = (SpecChanges::default(), SpecChanges::default());
        let token_loop = controller
            .watches_stream(secret_events, |secret: PartialObjectMeta<Secret>| {
                let ns = secret.metadata.namespace.clone()?;
                let name = secret.labels().get(labels::NAME)?.clone();
                Some(ObjectRef::<cached::CachedAgentToken>::new(&name).within(&ns))
            })
            .watches_stream(issuer_events, move |i: TokenIssuer| {
                match ns_changed.changed(&i.metadata) {
                    true => ns_issuer_map(i.namespace(), i.name_any()),
                    false => Vec::new(),
                }
            })
            .watches_shared_stream(cluster_events, move |i: Arc<ClusterTokenIssuer>| {
                match cluster_changed.changed(&i.metadata) {
                    true => cluster_issuer_map(None, i.name_any()),
                    false => Vec::new(),
                }
            })
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
                while !(binding_indexes.iter().all(|i| i.synced()) && all_workloads.synced()) {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Ok(())
            };
            let issuers = async {
                futures::future::try_join_all(issuer_stores.iter().map(synced)).await?;
                synced(&cluster_store).await?;
                issuer_synced.store(true, std::sync::atomic::Ordering::Release);
                Ok(())
            };
            match futures::future::try_join3(ats, secrets, issuers).await {
                Ok(_) => {
                    info!("caches synced; ready");
                    readiness.set(true);
                }
                Err(e) => warn!(error = %e, "a cache stopped before it synced; never ready"),
            }
        }
    };
    tokio::spawn(readiness_task);
    loops.push(sources::run(ctx.clone(), shutdown.clone()).boxed());

    futures::future::join_all(loops).await;
    info!("controllers stopped");
}

/// What of an AgentToken is worth a reconcile when it changes: its spec
/// (generation), the rotate and revoke annotations, its deletion, and an
/// address the usage tracker found unexpected. The rest of status is
/// not: the operator's own status writes would each bring another
/// reconcile (an admin's status edit, `kubectl agenttoken abandon`, is
/// read at the next one). Finalizers are not either: a removed finalizer is
/// put back at the next reconcile.
fn reconcile_trigger(at: &cached::CachedAgentToken) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    // The UID (kube's predicate keys by it, but the cache drops it).
    at.uid_hash.hash(&mut h);
    at.metadata.generation.hash(&mut h);
    at.metadata
        .deletion_timestamp
        .as_ref()
        .map(|t| t.0.as_second())
        .hash(&mut h);
    let annotations = at.metadata.annotations.as_ref();
    for key in [labels::ROTATE, labels::REVOKE, labels::DRILL] {
        annotations.and_then(|a| a.get(key)).hash(&mut h);
    }
    if let Some(u) = at.status.as_ref().and_then(|s| s.usage.as_ref()) {
        for t in &u.tokens {
            (
                t.revision,
                &t.unexpected_sources,
                t.requests_after_revocation > 0,
            )
                .hash(&mut h);
        }
    }
    Some(h.finish())
}

/// Which issuers changed in a way their AgentTokens must see: spec
/// (generation) or deletion, not the operator's own writes of their
/// status (each of which would otherwise reconcile every AgentToken of
/// the issuer).
#[derive(Default)]
struct SpecChanges(Mutex<HashMap<String, (Option<i64>, bool)>>);

impl SpecChanges {
    fn changed(&self, meta: &kube::api::ObjectMeta) -> bool {
        let key = meta.uid.clone().unwrap_or_default();
        let now = (meta.generation, meta.deletion_timestamp.is_some());
        let mut seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        seen.insert(key, now) != Some(now)
    }
}

/// Maps an issuer to the AgentTokens (in `store`) that use it.
fn by_issuer(
    store: Store<cached::CachedAgentToken>,
    kind: IssuerKind,
) -> impl Fn(Option<String>, String) -> Vec<ObjectRef<cached::CachedAgentToken>> + Send + Sync + 'static
{
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
/// How long the operator waits on the API when shutting down.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::cached::CachedAgentToken;
    use super::{SpecChanges, protected_namespaces, reconcile_trigger};
    use crate::labels;

    #[test]
    fn status_writes_do_not_trigger_a_reconcile_but_spec_triggers_and_deletion_do() {
        let mut at: CachedAgentToken = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "bot", "namespace": "t"},
            "spec": {"issuerRef": {"name": "i"}},
        }))
        .unwrap();
        at.metadata.generation = Some(1);
        let h = |at: &CachedAgentToken| reconcile_trigger(at).unwrap();
        let base = h(&at);
        // Status, finalizers, labels, other annotations, resourceVersion:
        // the operator's own writes and nothing it acts on.
        let mut same = at.clone();
        same.status = Some(Default::default());
        same.metadata.resource_version = Some("42".into());
        same.metadata.finalizers = Some(vec![labels::FINALIZER.into()]);
        same.metadata.annotations = Some([("note".to_string(), "x".to_string())].into());
        assert_eq!(h(&same), base);
        let mut spec = at.clone();
        spec.metadata.generation = Some(2);
        assert_ne!(h(&spec), base);
        for key in [labels::ROTATE, labels::REVOKE] {
            let mut trig = at.clone();
            trig.metadata.annotations = Some([(key.to_string(), "now".to_string())].into());
            assert_ne!(h(&trig), base, "{key}");
        }
        let mut deleted = at.clone();
        deleted.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::UNIX_EPOCH),
        );
        assert_ne!(h(&deleted), base);
        // Made again under its name: another object.
        let mut again = at.clone();
        again.uid_hash = 1;
        assert_ne!(h(&again), base);
    }

    #[test]
    fn an_issuer_status_write_is_not_a_change_its_agent_tokens_see() {
        let seen = SpecChanges::default();
        let mut meta = kube::api::ObjectMeta {
            uid: Some("u1".into()),
            generation: Some(1),
            resource_version: Some("1".into()),
            ..Default::default()
        };
        assert!(seen.changed(&meta));
        meta.resource_version = Some("2".into());
        assert!(!seen.changed(&meta));
        meta.generation = Some(2);
        assert!(seen.changed(&meta));
        meta.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            jiff::Timestamp::UNIX_EPOCH,
        ));
        assert!(seen.changed(&meta));
        // The same name recreated is another object.
        meta.uid = Some("u2".into());
        assert!(seen.changed(&meta));
    }

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

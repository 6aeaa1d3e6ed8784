//! The Deployments, StatefulSets and DaemonSets of the watched namespaces,
//! kept from three watches as the slim records consumers decide on.
//!
//! Consumers used to be found with three LISTs of a namespace for every
//! token revision delivered, and a rollout followed with a GET per poll: at
//! 1,000 tokens rotating every two minutes, thousands of LISTs of whole
//! objects. A reflector store would keep whole objects (pod templates,
//! managedFields, status) of every workload of the cluster to answer the
//! few questions consumers ask. This index keeps per workload only the
//! [`Workload`] record (what `select`, `need`, `observe` and `signal` read,
//! see [`super::consumers`]), converted as each watch event arrives, by
//! namespace, so a lookup reads one namespace and not the cluster.
//!
//! A rotation then costs the writes it needs and no read of workloads; the
//! restarter's own patches come back as watch events.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, RwLock};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Api, Client};
use serde::de::DeserializeOwned;
use tracing::warn;

use super::consumers::{Workload, WorkloadKey, WorkloadKind};

/// A workload kind the index is fed with.
pub trait Source:
    kube::Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + DeserializeOwned
    + Debug
    + Send
    + Sync
    + 'static
{
    const KIND: WorkloadKind;
    /// What the index keeps of it.
    fn slim(&self) -> Workload;
}

impl Source for Deployment {
    const KIND: WorkloadKind = WorkloadKind::Deployment;
    fn slim(&self) -> Workload {
        Workload::from_deployment(self)
    }
}

impl Source for StatefulSet {
    const KIND: WorkloadKind = WorkloadKind::StatefulSet;
    fn slim(&self) -> Workload {
        Workload::from_stateful_set(self)
    }
}

impl Source for DaemonSet {
    const KIND: WorkloadKind = WorkloadKind::DaemonSet;
    fn slim(&self) -> Workload {
        Workload::from_daemon_set(self)
    }
}

/// Why the workloads of a namespace cannot be told yet.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unavailable {
    /// The watch has not delivered its first full list (the operator is
    /// starting): wait, nothing is known to be wrong.
    #[error("the watch of {}s has not listed them yet", .0.as_str())]
    Syncing(WorkloadKind),
    /// The watch has never listed, and its last attempt failed (RBAC,
    /// the API server): the consumers are unknown.
    #[error("the watch of {}s fails: {}", .0.as_str(), .1)]
    Failing(WorkloadKind, String),
    /// No watch covers the namespace.
    #[error("namespace {0:?} is not watched")]
    NotWatched(String),
}

/// Workloads of one kind, by namespace; each namespace's sorted by name.
type Namespaces = HashMap<Arc<str>, Vec<Arc<Workload>>>;

#[derive(Default)]
struct KindState {
    live: Namespaces,
    /// Built during a (re)list, swapped in when it is complete.
    building: Option<Namespaces>,
    synced: bool,
    /// The last watch error, until the next event.
    error: Option<String>,
}

/// The workloads of one watched scope (a namespace, or the cluster), fed by
/// one watch per kind ([`feed`]). Each kind (re)lists on its own, so a
/// relist of Deployments never hides StatefulSets.
pub struct WorkloadIndex {
    /// The namespace watched; `None`: all of them.
    scope: Option<String>,
    kinds: RwLock<[KindState; 3]>,
}

fn slot(kind: WorkloadKind) -> usize {
    match kind {
        WorkloadKind::Deployment => 0,
        WorkloadKind::StatefulSet => 1,
        WorkloadKind::DaemonSet => 2,
    }
}

const KINDS: [WorkloadKind; 3] = [
    WorkloadKind::Deployment,
    WorkloadKind::StatefulSet,
    WorkloadKind::DaemonSet,
];

/// Inserts or replaces `w`. Its namespace becomes the one the map already
/// holds, so the workloads of a namespace share one copy of its name.
fn insert(map: &mut Namespaces, mut w: Workload) {
    let ns = map
        .get_key_value(&*w.key.namespace)
        .map(|(k, _)| k.clone())
        .unwrap_or_else(|| w.key.namespace.clone());
    w.key.namespace = ns.clone();
    let list = map.entry(ns).or_default();
    match list.binary_search_by(|x| x.key.name.cmp(&w.key.name)) {
        Ok(i) => {
            if let Some(slot) = list.get_mut(i) {
                *slot = Arc::new(w);
            }
        }
        Err(i) => list.insert(i, Arc::new(w)),
    }
}

fn remove(map: &mut Namespaces, ns: &str, name: &str) {
    if let Some(list) = map.get_mut(ns) {
        if let Ok(i) = list.binary_search_by(|x| x.key.name.as_str().cmp(name)) {
            list.remove(i);
        }
        if list.is_empty() {
            map.remove(ns);
        }
    }
}

impl WorkloadIndex {
    pub fn new(scope: Option<String>) -> Self {
        WorkloadIndex {
            scope,
            kinds: RwLock::default(),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, [KindState; 3]> {
        self.kinds.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies one watch event. Workloads being deleted stay until they are
    /// gone, as a LIST would show them.
    pub fn apply<K: Source>(&self, event: &Event<K>) {
        let mut kinds = self.kinds.write().unwrap_or_else(|e| e.into_inner());
        let Some(state) = kinds.get_mut(slot(K::KIND)) else {
            return;
        };
        state.error = None;
        match event {
            Event::Init => state.building = Some(Namespaces::new()),
            Event::InitApply(o) => {
                if let Some(map) = state.building.as_mut() {
                    insert(map, o.slim());
                }
            }
            Event::InitDone => {
                if let Some(mut map) = state.building.take() {
                    map.shrink_to_fit();
                    state.live = map;
                }
                state.synced = true;
            }
            Event::Apply(o) => insert(&mut state.live, o.slim()),
            Event::Delete(o) => {
                let meta = o.meta();
                remove(
                    &mut state.live,
                    meta.namespace.as_deref().unwrap_or_default(),
                    meta.name.as_deref().unwrap_or_default(),
                );
            }
        }
    }

    /// Records that the watch of `kind` failed (it retries with backoff).
    /// Never a token: these are API errors about workloads.
    pub fn failed(&self, kind: WorkloadKind, error: &dyn std::fmt::Display) {
        let mut kinds = self.kinds.write().unwrap_or_else(|e| e.into_inner());
        if let Some(state) = kinds.get_mut(slot(kind)) {
            state.error = Some(error.to_string());
        }
    }

    /// Whether every kind has had its first full list applied.
    pub fn synced(&self) -> bool {
        self.read().iter().all(|k| k.synced)
    }

    fn covers(&self, ns: &str) -> bool {
        self.scope.as_deref().is_none_or(|s| s == ns)
    }

    /// Whether every kind has listed; once it has, what it listed is served
    /// (a later failing watch relists when it recovers).
    fn ready(kinds: &[KindState; 3]) -> Result<(), Unavailable> {
        for (kind, state) in KINDS.iter().zip(kinds) {
            if !state.synced {
                return Err(match &state.error {
                    Some(e) => Unavailable::Failing(*kind, e.clone()),
                    None => Unavailable::Syncing(*kind),
                });
            }
        }
        Ok(())
    }

    /// The workloads of namespace `ns`: Deployments, then StatefulSets,
    /// then DaemonSets, each by name.
    pub fn in_namespace(&self, ns: &str) -> Result<Vec<Arc<Workload>>, Unavailable> {
        let kinds = self.read();
        Self::ready(&kinds)?;
        Ok(kinds
            .iter()
            .filter_map(|k| k.live.get(ns))
            .flatten()
            .cloned()
            .collect())
    }

    /// One workload; `Ok(None)` when it does not exist.
    pub fn get(&self, key: &WorkloadKey) -> Result<Option<Arc<Workload>>, Unavailable> {
        let kinds = self.read();
        Self::ready(&kinds)?;
        Ok(kinds
            .get(slot(key.kind))
            .and_then(|k| k.live.get(&*key.namespace))
            .and_then(|list| {
                list.binary_search_by(|x| x.key.name.cmp(&key.name))
                    .ok()
                    .and_then(|i| list.get(i))
            })
            .cloned())
    }
}

/// The workload indexes of every watched scope: what reconciles and the
/// restarter read workloads from.
#[derive(Clone, Default)]
pub struct Workloads(Vec<Arc<WorkloadIndex>>);

impl Workloads {
    pub fn new(indexes: Vec<Arc<WorkloadIndex>>) -> Self {
        Workloads(indexes)
    }

    fn covering(&self, ns: &str) -> Result<&WorkloadIndex, Unavailable> {
        self.0
            .iter()
            .find(|i| i.covers(ns))
            .map(|i| &**i)
            .ok_or_else(|| Unavailable::NotWatched(ns.to_string()))
    }

    /// See [`WorkloadIndex::in_namespace`].
    pub fn in_namespace(&self, ns: &str) -> Result<Vec<Arc<Workload>>, Unavailable> {
        self.covering(ns)?.in_namespace(ns)
    }

    /// See [`WorkloadIndex::get`].
    pub fn get(&self, key: &WorkloadKey) -> Result<Option<Arc<Workload>>, Unavailable> {
        self.covering(&key.namespace)?.get(key)
    }

    /// Whether every index has synced.
    pub fn synced(&self) -> bool {
        self.0.iter().all(|i| i.synced())
    }
}

/// Feeds `index` from a watch of the workloads of kind `K` in its scope
/// until `shutdown`. Each object is cut down to its [`Workload`] as it
/// arrives; nothing else of it is kept.
pub async fn feed<K: Source>(
    client: Client,
    index: Arc<WorkloadIndex>,
    shutdown: impl Future<Output = ()>,
) {
    let api: Api<K> = match &index.scope {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    watcher(api, watcher::Config::default())
        .default_backoff()
        .inspect_ok(|event| index.apply(event))
        .inspect_err(|e| {
            warn!(kind = K::KIND.as_str(), error = %e, "workload watch failed; retrying");
            index.failed(K::KIND, e);
        })
        .take_until(shutdown)
        .for_each(|_| futures::future::ready(()))
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{DaemonSetSpec, DeploymentSpec, StatefulSetSpec};
    use k8s_openapi::api::core::v1::{
        Container, EnvFromSource, PodSpec, PodTemplateSpec, SecretEnvSource,
    };
    use kube::api::ObjectMeta;

    fn meta(ns: &str, name: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            generation: Some(1),
            ..Default::default()
        }
    }

    fn template(secret: &str) -> PodTemplateSpec {
        PodTemplateSpec {
            metadata: None,
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "app".into(),
                    env_from: Some(vec![EnvFromSource {
                        secret_ref: Some(SecretEnvSource {
                            name: secret.into(),
                            optional: None,
                        }),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }],
                ..Default::default()
            }),
        }
    }

    fn deployment(ns: &str, name: &str, secret: &str) -> Deployment {
        Deployment {
            metadata: meta(ns, name),
            spec: Some(DeploymentSpec {
                template: template(secret),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn stateful_set(ns: &str, name: &str) -> StatefulSet {
        StatefulSet {
            metadata: meta(ns, name),
            spec: Some(StatefulSetSpec {
                template: template("tok"),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn daemon_set(ns: &str, name: &str) -> DaemonSet {
        DaemonSet {
            metadata: meta(ns, name),
            spec: Some(DaemonSetSpec {
                template: template("tok"),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn names(found: Result<Vec<Arc<Workload>>, Unavailable>) -> Vec<String> {
        found.unwrap().iter().map(|w| w.key.to_string()).collect()
    }

    fn key(kind: WorkloadKind, ns: &str, name: &str) -> WorkloadKey {
        WorkloadKey {
            kind,
            namespace: ns.into(),
            name: name.into(),
        }
    }

    /// Lists each kind of `index` with `objects` (empty lists for the rest).
    fn sync(index: &WorkloadIndex, deployments: Vec<Deployment>) {
        index.apply(&Event::<Deployment>::Init);
        for d in deployments {
            index.apply(&Event::InitApply(d));
        }
        index.apply(&Event::<Deployment>::InitDone);
        index.apply(&Event::<StatefulSet>::Init);
        index.apply(&Event::<StatefulSet>::InitDone);
        index.apply(&Event::<DaemonSet>::Init);
        index.apply(&Event::<DaemonSet>::InitDone);
    }

    #[test]
    fn nothing_is_served_until_every_kind_has_listed() {
        let index = WorkloadIndex::new(None);
        assert_eq!(
            index.in_namespace("team").unwrap_err(),
            Unavailable::Syncing(WorkloadKind::Deployment)
        );
        index.apply(&Event::<Deployment>::Init);
        index.apply(&Event::InitApply(deployment("team", "a", "tok")));
        index.apply(&Event::<Deployment>::InitDone);
        index.apply(&Event::<DaemonSet>::Init);
        index.apply(&Event::<DaemonSet>::InitDone);
        assert!(!index.synced());
        index.failed(WorkloadKind::StatefulSet, &"statefulsets.apps is forbidden");
        let err = index.in_namespace("team").unwrap_err();
        assert_eq!(
            err,
            Unavailable::Failing(
                WorkloadKind::StatefulSet,
                "statefulsets.apps is forbidden".into()
            )
        );
        assert!(
            err.to_string().contains("watch of StatefulSets fails"),
            "{err}"
        );
        // The watch recovers: the error goes with its next event.
        index.apply(&Event::<StatefulSet>::Init);
        assert_eq!(
            index
                .get(&key(WorkloadKind::Deployment, "team", "a"))
                .unwrap_err(),
            Unavailable::Syncing(WorkloadKind::StatefulSet)
        );
        index.apply(&Event::<StatefulSet>::InitDone);
        assert!(index.synced());
        assert_eq!(names(index.in_namespace("team")), ["Deployment/a"]);
        // Once listed, a failing watch does not hide what it listed.
        index.failed(WorkloadKind::Deployment, &"connection reset");
        assert_eq!(names(index.in_namespace("team")), ["Deployment/a"]);
    }

    #[test]
    fn applies_and_deletes_by_namespace_and_kind() {
        let index = WorkloadIndex::new(None);
        sync(
            &index,
            vec![
                deployment("team", "b", "tok"),
                deployment("team", "a", "tok"),
                deployment("other", "a", "tok"),
            ],
        );
        index.apply(&Event::Apply(daemon_set("team", "agent")));
        index.apply(&Event::Apply(stateful_set("team", "db")));
        assert_eq!(
            names(index.in_namespace("team")),
            [
                "Deployment/a",
                "Deployment/b",
                "StatefulSet/db",
                "DaemonSet/agent"
            ]
        );
        assert_eq!(names(index.in_namespace("other")), ["Deployment/a"]);
        assert!(names(index.in_namespace("empty")).is_empty());

        // An update replaces, never duplicates.
        index.apply(&Event::Apply(deployment("team", "a", "changed")));
        let a = index
            .get(&key(WorkloadKind::Deployment, "team", "a"))
            .unwrap()
            .unwrap();
        assert!(a.uses("changed") && !a.uses("tok"));
        assert_eq!(index.in_namespace("team").unwrap().len(), 4);
        // The workloads of a namespace share its name.
        let b = index
            .get(&key(WorkloadKind::Deployment, "team", "b"))
            .unwrap()
            .unwrap();
        assert!(Arc::ptr_eq(&a.key.namespace, &b.key.namespace));

        // A StatefulSet of that name is another workload.
        assert!(
            index
                .get(&key(WorkloadKind::StatefulSet, "team", "a"))
                .unwrap()
                .is_none()
        );
        index.apply(&Event::Delete(deployment("team", "a", "tok")));
        index.apply(&Event::Delete(deployment("team", "never-seen", "tok")));
        index.apply(&Event::Delete(deployment("other", "a", "tok")));
        assert_eq!(
            names(index.in_namespace("team")),
            ["Deployment/b", "StatefulSet/db", "DaemonSet/agent"]
        );
        assert!(names(index.in_namespace("other")).is_empty());
        assert!(
            index
                .get(&key(WorkloadKind::Deployment, "team", "a"))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_relist_replaces_its_kind_only_and_only_when_complete() {
        let index = WorkloadIndex::new(None);
        sync(&index, vec![deployment("team", "old", "tok")]);
        index.apply(&Event::Apply(stateful_set("team", "db")));
        index.apply(&Event::<Deployment>::Init);
        index.apply(&Event::InitApply(deployment("team", "new", "tok")));
        // Mid-relist: the last complete list is still served.
        assert_eq!(
            names(index.in_namespace("team")),
            ["Deployment/old", "StatefulSet/db"]
        );
        index.apply(&Event::<Deployment>::InitDone);
        assert_eq!(
            names(index.in_namespace("team")),
            ["Deployment/new", "StatefulSet/db"]
        );
    }

    #[test]
    fn each_namespace_is_looked_up_in_the_index_that_watches_it() {
        let team = Arc::new(WorkloadIndex::new(Some("team".into())));
        let ops = Arc::new(WorkloadIndex::new(Some("ops".into())));
        sync(&team, vec![deployment("team", "app", "tok")]);
        sync(&ops, vec![]);
        let all = Workloads::new(vec![ops, team]);
        assert!(all.synced());
        assert_eq!(names(all.in_namespace("team")), ["Deployment/app"]);
        assert!(names(all.in_namespace("ops")).is_empty());
        assert_eq!(
            all.in_namespace("elsewhere").unwrap_err(),
            Unavailable::NotWatched("elsewhere".into())
        );
        assert!(
            all.get(&key(WorkloadKind::Deployment, "team", "app"))
                .unwrap()
                .is_some()
        );
        assert!(!Workloads::new(vec![Arc::new(WorkloadIndex::new(None))]).synced());
    }
}

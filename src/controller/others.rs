//! Consumers the workload index does not watch: bare Pods, Jobs and
//! CronJobs (issue 20, unused tokens).
//!
//! Before a token is judged `Unused` (and, with `onUnused: Revoke`,
//! revoked), the operator makes sure nothing else in the namespace uses its
//! Secret: a CronJob that runs weekly, a Job, a Pod made by hand. Watching
//! every Pod of the cluster for that rare question would cost more than
//! the question is worth, so the answer comes from a snapshot per
//! namespace: the Secret names the namespace's Pods (not finished), Jobs
//! (not finished) and CronJobs refer to, taken by three LISTs when first
//! asked and kept for [`FRESH_FOR`]. Everything that asks within that time,
//! every AgentToken of the namespace, shares it: a namespace with a
//! thousand AgentTokens costs three LISTs per [`FRESH_FOR`], not three
//! thousand, and other namespaces' snapshots wait behind at most
//! [`MAX_LISTING`] namespaces being listed.
//!
//! Only asked when the workload index found no consumer and no use is
//! recent: the common path costs nothing.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{Pod, PodSpec};
use kube::Client;
use kube::api::{Api, ListParams};
use tokio::time::Instant;
use tracing::{debug, warn};

/// How long a namespace's snapshot answers.
pub const FRESH_FOR: Duration = Duration::from_secs(30);
/// Snapshots kept at most (the oldest go first); each is the Secret names
/// a namespace's Pods, Jobs and CronJobs use.
const MAX_SNAPSHOTS: usize = 4096;
/// Namespaces listed at once.
const MAX_LISTING: usize = 2;
/// Objects a snapshot reads per LIST page.
const PAGE: u32 = 500;

struct Snapshot {
    taken: Instant,
    /// The Secret names used, or why they could not be listed.
    used: Result<HashSet<String>, String>,
}

/// The snapshots, and the namespaces being listed.
#[derive(Clone)]
pub struct OtherConsumers {
    client: Client,
    inner: Arc<Mutex<Inner>>,
    listing: Arc<tokio::sync::Semaphore>,
}

#[derive(Default)]
struct Inner {
    snapshots: HashMap<String, Snapshot>,
    in_flight: HashSet<String>,
}

impl OtherConsumers {
    pub fn new(client: Client) -> Self {
        OtherConsumers {
            client,
            inner: Arc::default(),
            listing: Arc::new(tokio::sync::Semaphore::new(MAX_LISTING)),
        }
    }

    /// Whether a Pod, Job or CronJob of `namespace` uses Secret `secret`:
    /// `None` while no fresh snapshot exists (one is taken in the
    /// background: ask again in a few seconds) or when the last one could
    /// not be taken (logged; no verdict rests on a guess).
    pub fn uses(&self, namespace: &str, secret: &str) -> Option<bool> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = inner
            .snapshots
            .get(namespace)
            .filter(|s| s.taken.elapsed() < FRESH_FOR)
            .map(|s| s.used.as_ref().map(|u| u.contains(secret)).ok());
        if let Some(answer) = fresh {
            return answer;
        }
        if inner.in_flight.insert(namespace.to_string()) {
            let (this, ns) = (self.clone(), namespace.to_string());
            tokio::spawn(async move { this.take(ns).await });
        }
        None
    }

    async fn take(self, namespace: String) {
        let used = match self.listing.acquire().await {
            Ok(_slot) => list(&self.client, &namespace).await,
            Err(_) => Err("shutting down".into()),
        };
        if let Err(e) = &used {
            warn!(%namespace, error = %e, "cannot list the Pods, Jobs and CronJobs that may use a Secret; no Unused verdict here until it works");
        } else {
            debug!(%namespace, "Pods, Jobs and CronJobs listed for unused tokens");
        }
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.in_flight.remove(&namespace);
        if inner.snapshots.len() >= MAX_SNAPSHOTS {
            let oldest = inner
                .snapshots
                .iter()
                .min_by_key(|(_, s)| s.taken)
                .map(|(n, _)| n.clone());
            if let Some(n) = oldest {
                inner.snapshots.remove(&n);
            }
        }
        inner.snapshots.insert(
            namespace,
            Snapshot {
                taken: Instant::now(),
                used,
            },
        );
    }
}

/// The Secret names the namespace's unfinished Pods and Jobs and its
/// CronJobs use.
async fn list(client: &Client, namespace: &str) -> Result<HashSet<String>, String> {
    let mut used = HashSet::new();
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    for p in all(&pods).await.map_err(|e| format!("pods: {e}"))? {
        let done = p
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|ph| ph == "Succeeded" || ph == "Failed");
        if !done && let Some(spec) = &p.spec {
            secrets_of(spec, &mut used);
        }
    }
    let jobs: Api<Job> = Api::namespaced(client.clone(), namespace);
    for j in all(&jobs).await.map_err(|e| format!("jobs: {e}"))? {
        let finished = j.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .flatten()
                .any(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
        });
        if !finished && let Some(spec) = j.spec.as_ref().and_then(|s| s.template.spec.as_ref()) {
            secrets_of(spec, &mut used);
        }
    }
    let cron: Api<CronJob> = Api::namespaced(client.clone(), namespace);
    for c in all(&cron).await.map_err(|e| format!("cronjobs: {e}"))? {
        let spec = c
            .spec
            .as_ref()
            .and_then(|s| s.job_template.spec.as_ref())
            .and_then(|j| j.template.spec.as_ref());
        if let Some(spec) = spec {
            secrets_of(spec, &mut used);
        }
    }
    Ok(used)
}

/// Every object, a page at a time.
async fn all<K>(api: &Api<K>) -> Result<Vec<K>, kube::Error>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut out = Vec::new();
    let mut params = ListParams::default().limit(PAGE);
    loop {
        let page = api.list(&params).await?;
        let next = page.metadata.continue_.clone().filter(|c| !c.is_empty());
        out.extend(page.items);
        match next {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(out),
        }
    }
}

/// Adds the Secret names `spec` uses (volumes, projected volumes, `env`
/// and `envFrom` of every container and init container).
pub fn secrets_of(spec: &PodSpec, used: &mut HashSet<String>) {
    for v in spec.volumes.iter().flatten() {
        if let Some(name) = v.secret.as_ref().and_then(|s| s.secret_name.clone()) {
            used.insert(name);
        }
        for s in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
            if let Some(secret) = &s.secret {
                used.insert(secret.name.clone());
            }
        }
    }
    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        for e in c.env.iter().flatten() {
            if let Some(r) = e
                .value_from
                .as_ref()
                .and_then(|v| v.secret_key_ref.as_ref())
            {
                used.insert(r.name.clone());
            }
        }
        for e in c.env_from.iter().flatten() {
            if let Some(r) = &e.secret_ref {
                used.insert(r.name.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_way_a_pod_spec_names_a_secret_is_found() {
        let spec: PodSpec = serde_json::from_value(serde_json::json!({
            "volumes": [
                {"name": "a", "secret": {"secretName": "vol"}},
                {"name": "b", "projected": {"sources": [{"secret": {"name": "proj"}}]}},
                {"name": "c", "configMap": {"name": "not-a-secret"}},
            ],
            "initContainers": [{"name": "i", "envFrom": [{"secretRef": {"name": "init-env"}}]}],
            "containers": [{"name": "m", "env": [
                {"name": "T", "valueFrom": {"secretKeyRef": {"name": "env", "key": "token"}}},
                {"name": "X", "value": "plain"},
            ]}],
        }))
        .unwrap();
        let mut used = HashSet::new();
        secrets_of(&spec, &mut used);
        let mut names: Vec<_> = used.into_iter().collect();
        names.sort();
        assert_eq!(names, ["env", "init-env", "proj", "vol"]);
    }
}

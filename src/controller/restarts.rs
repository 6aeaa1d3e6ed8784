//! Rollout restarts, coordinated across AgentTokens.
//!
//! A reconcile never patches a workload itself: it asks the [`Restarter`]
//! to set its pod-template annotation to a revision. Requests for one
//! workload that arrive within the coalescing window are applied as ONE
//! server-side apply, so several tokens rotating together cause one
//! rollout. At most `max_in_flight` workloads roll at once, cluster-wide;
//! a workload leaves that set when its rollout completes or times out.
//!
//! Nothing here is durable, and nothing needs to be: a reconcile asks again
//! whenever a workload's annotation differs from the token's revision, and
//! applying an unchanged annotation changes nothing.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use crate::events::Recorder;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{info, warn};

use super::consumers::{self, Rollout, WorkloadKey, WorkloadKind};
use crate::telemetry::Metrics;

/// Field manager of the pod-template revision annotations.
pub const RESTART_MANAGER: &str = "agent-token-operator-restarts";

/// Tuning of the restarter.
#[derive(Clone, Copy, Debug)]
pub struct RestartConfig {
    /// Requests for one workload within this window become one rollout.
    pub coalesce: Duration,
    /// Workloads rolling at once, cluster-wide.
    pub max_in_flight: usize,
    /// How long a rollout may take before it is reported as timed out.
    pub rollout_timeout: Duration,
}

impl Default for RestartConfig {
    fn default() -> Self {
        RestartConfig {
            coalesce: Duration::from_secs(5),
            max_in_flight: 10,
            rollout_timeout: Duration::from_secs(600),
        }
    }
}

struct Pending {
    annotations: BTreeMap<String, String>,
    since: Instant,
    /// AgentTokens that asked, with the revision each asked for.
    requesters: Vec<(ObjectReference, String)>,
}

#[derive(Default)]
struct Inner {
    pending: HashMap<WorkloadKey, Pending>,
    in_flight: HashMap<WorkloadKey, Instant>,
}

/// Applies rollout restarts (see the module documentation).
pub struct Restarter {
    client: Client,
    recorder: Recorder,
    metrics: std::sync::Arc<Metrics>,
    pub config: RestartConfig,
    inner: Mutex<Inner>,
    wake: Notify,
}

impl Restarter {
    pub fn new(
        client: Client,
        recorder: Recorder,
        metrics: std::sync::Arc<Metrics>,
        config: RestartConfig,
    ) -> Self {
        Restarter {
            client,
            recorder,
            metrics,
            config,
            inner: Mutex::new(Inner::default()),
            wake: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks for `annotation = value` on the workload's pod template.
    pub fn request(
        &self,
        key: WorkloadKey,
        annotation: String,
        value: String,
        requester: ObjectReference,
    ) {
        let mut inner = self.lock();
        let p = inner.pending.entry(key).or_insert_with(|| Pending {
            annotations: BTreeMap::new(),
            since: Instant::now(),
            requesters: Vec::new(),
        });
        p.annotations.insert(annotation, value.clone());
        p.requesters.retain(|(r, _)| r.uid != requester.uid);
        p.requesters.push((requester, value));
        drop(inner);
        self.wake.notify_one();
    }

    /// Runs until `shutdown`.
    pub async fn run(self: std::sync::Arc<Self>, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let next = self.next_due();
            tokio::select! {
                _ = &mut shutdown => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep_until(next) => {}
            }
            self.refresh_in_flight().await;
            self.flush_due().await;
        }
    }

    fn next_due(&self) -> Instant {
        let inner = self.lock();
        let pending = inner
            .pending
            .values()
            .map(|p| p.since + self.config.coalesce)
            .min();
        let poll = (!inner.in_flight.is_empty()).then(|| Instant::now() + Duration::from_secs(2));
        [pending, poll]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(60))
            .max(Instant::now() + Duration::from_millis(50))
    }

    /// Drops workloads whose rollout finished or timed out from the cap.
    async fn refresh_in_flight(&self) {
        let keys: Vec<(WorkloadKey, Instant)> = self
            .lock()
            .in_flight
            .iter()
            .map(|(k, d)| (k.clone(), *d))
            .collect();
        for (key, deadline) in keys {
            let done = Instant::now() >= deadline
                || match consumers::get(&self.client, &key).await {
                    Ok(Some(w)) => w.rollout == Rollout::Complete,
                    Ok(None) => true,
                    Err(_) => false,
                };
            if done {
                self.lock().in_flight.remove(&key);
            }
        }
    }

    async fn flush_due(&self) {
        let now = Instant::now();
        let batch: Vec<(WorkloadKey, Pending)> = {
            let mut inner = self.lock();
            let mut due: Vec<(WorkloadKey, Instant)> = inner
                .pending
                .iter()
                .filter(|(_, p)| p.since + self.config.coalesce <= now)
                .map(|(k, p)| (k.clone(), p.since))
                .collect();
            due.sort_by_key(|(_, since)| *since);
            let mut batch = Vec::new();
            for (key, _) in due {
                let rolling = inner.in_flight.contains_key(&key);
                if !rolling && inner.in_flight.len() + batch.len() >= self.config.max_in_flight {
                    continue; // capped: stays pending until a slot frees
                }
                if let Some(p) = inner.pending.remove(&key) {
                    batch.push((key, p));
                }
            }
            batch
        };
        for (key, pending) in batch {
            match self.apply(&key, &pending).await {
                Ok(changed) => {
                    if changed {
                        self.lock()
                            .in_flight
                            .insert(key.clone(), Instant::now() + self.config.rollout_timeout);
                    }
                }
                Err(e) => {
                    warn!(workload = %key, namespace = %key.namespace, error = %e, "rollout restart failed");
                    self.metrics.consumer_restart(key.kind.as_str(), false);
                    // Retried when the AgentToken reconciles again.
                }
            }
        }
    }

    /// One server-side apply with every revision annotation of the workload.
    /// Returns whether anything changed.
    async fn apply(&self, key: &WorkloadKey, pending: &Pending) -> Result<bool, kube::Error> {
        let Some(live) = consumers::get(&self.client, key).await? else {
            return Ok(false);
        };
        let mut annotations: BTreeMap<String, String> = live
            .revision_annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let before = annotations.clone();
        annotations.extend(pending.annotations.clone());
        if annotations == before {
            return Ok(false);
        }
        let (api_version, kind) = ("apps/v1", key.kind.as_str());
        let patch = serde_json::json!({
            "apiVersion": api_version,
            "kind": kind,
            "metadata": {"name": key.name, "namespace": &*key.namespace},
            "spec": {"template": {"metadata": {"annotations": annotations}}},
        });
        let pp = PatchParams::apply(RESTART_MANAGER).force();
        let c = self.client.clone();
        let ns = &key.namespace;
        let workload_ref = match key.kind {
            WorkloadKind::Deployment => {
                let d = Api::<Deployment>::namespaced(c, ns)
                    .patch(&key.name, &pp, &Patch::Apply(&patch))
                    .await?;
                object_ref(&d)
            }
            WorkloadKind::StatefulSet => {
                let s = Api::<StatefulSet>::namespaced(c, ns)
                    .patch(&key.name, &pp, &Patch::Apply(&patch))
                    .await?;
                object_ref(&s)
            }
            WorkloadKind::DaemonSet => {
                let d = Api::<DaemonSet>::namespaced(c, ns)
                    .patch(&key.name, &pp, &Patch::Apply(&patch))
                    .await?;
                object_ref(&d)
            }
        };
        self.metrics.consumer_restart(kind, true);
        let who: Vec<String> = pending
            .requesters
            .iter()
            .map(|(r, rev)| {
                format!(
                    "AgentToken {} revision {rev}",
                    r.name.as_deref().unwrap_or("?")
                )
            })
            .collect();
        info!(workload = %key, namespace = %key.namespace, tokens = who.len(), "rollout restart applied");
        self.event(&workload_ref, format!("rolling out for {}", who.join(", ")))
            .await;
        for (requester, rev) in &pending.requesters {
            self.event(
                requester,
                format!("{key} restarted to pick up revision {rev}"),
            )
            .await;
        }
        Ok(true)
    }

    async fn event(&self, on: &ObjectReference, note: String) {
        let event = Event {
            type_: EventType::Normal,
            reason: super::reason::Reason::WorkloadRestarted.as_str().into(),
            note: Some(note),
            action: "Restart".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, on).await {
            warn!(error = %e, "could not publish event");
        }
    }
}

fn object_ref<K: kube::Resource<DynamicType = ()>>(obj: &K) -> ObjectReference {
    obj.object_ref(&())
}

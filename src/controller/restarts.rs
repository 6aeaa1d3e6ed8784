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
//!
//! Workloads are read from the watch-fed index ([`Workloads`]), never
//! with a GET: a patch shows up there when its watch event arrives. Until
//! then the index is behind this replica's own patch, which the generation
//! the patch returned tells ([`Mark`]); a rollout is never taken for done,
//! nor a revision annotation taken back, from a view older than the patch.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use crate::events::Recorder;
use jiff::Timestamp;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{info, warn};

use super::consumers::{Rollout, Workload, WorkloadKey, WorkloadKind};
use super::workloads::{Unavailable, Workloads};
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

/// Which version of a workload a patch left: its creation time (which
/// object of that name) and `metadata.generation` (a pod-template change
/// always raises it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Mark {
    created: Option<Timestamp>,
    generation: i64,
}

impl Mark {
    fn of(meta: &kube::api::ObjectMeta) -> Self {
        Mark {
            created: meta.creation_timestamp.as_ref().map(|t| t.0),
            generation: meta.generation.unwrap_or(0),
        }
    }

    /// Whether `w`, as the index has it, includes the patch: the same object
    /// at that generation or later, or another object of that name (the
    /// patched one is gone and its rollout with it).
    fn seen_in(&self, w: &Workload) -> bool {
        w.created != self.created || w.generation >= self.generation
    }
}

/// A rollout this replica started.
struct InFlight {
    deadline: Instant,
    mark: Mark,
    /// The revision annotations the patch set: the base of the next patch
    /// while the index has not seen this one.
    annotations: BTreeMap<String, String>,
}

/// Why a restart could not be applied (it is asked for again by the next
/// reconcile of the AgentToken).
#[derive(Debug, thiserror::Error)]
enum ApplyError {
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Unavailable(#[from] Unavailable),
}

#[derive(Default)]
struct Inner {
    pending: HashMap<WorkloadKey, Pending>,
    in_flight: HashMap<WorkloadKey, InFlight>,
}

/// Applies rollout restarts (see the module documentation).
pub struct Restarter {
    client: Client,
    workloads: Workloads,
    recorder: Recorder,
    metrics: std::sync::Arc<Metrics>,
    pub config: RestartConfig,
    inner: Mutex<Inner>,
    wake: Notify,
}

impl Restarter {
    pub fn new(
        client: Client,
        workloads: Workloads,
        recorder: Recorder,
        metrics: std::sync::Arc<Metrics>,
        config: RestartConfig,
    ) -> Self {
        Restarter {
            client,
            workloads,
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
            self.refresh_in_flight();
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
    /// A view of a workload older than the patch says nothing about its
    /// rollout (it may show the previous one complete).
    fn refresh_in_flight(&self) {
        let now = Instant::now();
        let workloads = &self.workloads;
        self.lock().in_flight.retain(|key, f| {
            let done = now >= f.deadline
                || match workloads.get(key) {
                    Ok(Some(w)) => f.mark.seen_in(&w) && w.rollout == Rollout::Complete,
                    Ok(None) => true,
                    Err(_) => false,
                };
            !done
        });
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
                Ok(applied) => {
                    if let Some((mark, annotations)) = applied {
                        self.lock().in_flight.insert(
                            key.clone(),
                            InFlight {
                                deadline: Instant::now() + self.config.rollout_timeout,
                                mark,
                                annotations,
                            },
                        );
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
    /// Returns, when it changed anything, the version it left and the
    /// annotations it set.
    async fn apply(
        &self,
        key: &WorkloadKey,
        pending: &Pending,
    ) -> Result<Option<(Mark, BTreeMap<String, String>)>, ApplyError> {
        let Some(live) = self.workloads.get(key)? else {
            return Ok(None);
        };
        // The field manager owns exactly the annotations it sends: one left
        // out is removed. If the index has not seen this replica's last
        // patch yet, that patch's annotations are the current ones.
        let unseen = self
            .lock()
            .in_flight
            .get(key)
            .filter(|f| !f.mark.seen_in(&live))
            .map(|f| f.annotations.clone());
        let mut annotations: BTreeMap<String, String> = unseen.unwrap_or_else(|| {
            live.revision_annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        });
        let before = annotations.clone();
        annotations.extend(pending.annotations.clone());
        if annotations == before {
            return Ok(None);
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
        let (workload_ref, mark) = match key.kind {
            WorkloadKind::Deployment => {
                let d = Api::<Deployment>::namespaced(c, ns)
                    .patch(&key.name, &pp, &Patch::Apply(&patch))
                    .await?;
                (object_ref(&d), Mark::of(&d.metadata))
            }
            WorkloadKind::StatefulSet => {
                let s = Api::<StatefulSet>::namespaced(c, ns)
                    .patch(&key.name, &pp, &Patch::Apply(&patch))
                    .await?;
                (object_ref(&s), Mark::of(&s.metadata))
            }
            WorkloadKind::DaemonSet => {
                let d = Api::<DaemonSet>::namespaced(c, ns)
                    .patch(&key.name, &pp, &Patch::Apply(&patch))
                    .await?;
                (object_ref(&d), Mark::of(&d.metadata))
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
        Ok(Some((mark, annotations)))
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

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use kube::api::ObjectMeta;

    fn deployment(created: &str, generation: i64) -> Deployment {
        Deployment {
            metadata: ObjectMeta {
                name: Some("app".into()),
                namespace: Some("team".into()),
                creation_timestamp: Some(Time(created.parse().unwrap())),
                generation: Some(generation),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn an_index_behind_the_patch_is_recognised() {
        let patched = Mark::of(&deployment("2026-01-01T00:00:00Z", 5).metadata);
        let seen = |created: &str, generation: i64| {
            patched.seen_in(&Workload::from_deployment(&deployment(created, generation)))
        };
        // The watch event of the patch has not arrived: the previous
        // generation (whose rollout may well be complete) says nothing.
        assert!(!seen("2026-01-01T00:00:00Z", 4));
        assert!(seen("2026-01-01T00:00:00Z", 5));
        assert!(seen("2026-01-01T00:00:00Z", 6));
        // Deleted and created again: another object, the index is right.
        assert!(seen("2026-03-01T00:00:00Z", 1));
    }
}

//! Consumers: the Deployments, StatefulSets and DaemonSets that use an
//! AgentToken's Secret, and what each must do to pick up a new revision.
//!
//! Everything here but [`list`] and [`signal`] is pure. The restart itself
//! (the pod-template annotation) is applied by [`super::restarts`], which
//! coalesces restarts of one workload and bounds them cluster-wide.

use std::collections::BTreeMap;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Pod, PodSpec, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, Time};
use kube::api::{Api, AttachParams, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use super::selector;
use crate::crd::{ConsumerPhase, ConsumerStatus, ConsumerStrategy, ConsumersSpec, RestartPolicy};
use crate::labels;

/// Prefix of the pod-template annotation that carries a token revision.
pub const REVISION_ANNOTATION_PREFIX: &str = "agenttoken.dev/revision-";

/// The workload kinds that can consume a Secret.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WorkloadKind {
    Deployment,
    StatefulSet,
    DaemonSet,
}

impl WorkloadKind {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadKind::Deployment => "Deployment",
            WorkloadKind::StatefulSet => "StatefulSet",
            WorkloadKind::DaemonSet => "DaemonSet",
        }
    }
}

/// Identifies one workload.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkloadKey {
    pub kind: WorkloadKind,
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for WorkloadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.kind.as_str(), self.name)
    }
}

/// Whether a workload's controller has finished rolling out its template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rollout {
    Complete,
    InProgress(String),
}

/// A workload, as far as consumers are concerned.
#[derive(Clone, Debug)]
pub struct Workload {
    pub key: WorkloadKey,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub created: Option<Timestamp>,
    pub template_annotations: BTreeMap<String, String>,
    pub pod_spec: PodSpec,
    pub selector: Option<LabelSelector>,
    pub rollout: Rollout,
}

impl Workload {
    fn from_parts(
        kind: WorkloadKind,
        meta: &ObjectMeta,
        template: &PodTemplateSpec,
        selector: Option<LabelSelector>,
        rollout: Rollout,
    ) -> Self {
        Workload {
            key: WorkloadKey {
                kind,
                namespace: meta.namespace.clone().unwrap_or_default(),
                name: meta.name.clone().unwrap_or_default(),
            },
            labels: meta.labels.clone().unwrap_or_default(),
            annotations: meta.annotations.clone().unwrap_or_default(),
            created: meta.creation_timestamp.as_ref().map(|t| t.0),
            template_annotations: template
                .metadata
                .as_ref()
                .and_then(|m| m.annotations.clone())
                .unwrap_or_default(),
            pod_spec: template.spec.clone().unwrap_or_default(),
            selector,
            rollout,
        }
    }

    pub fn from_deployment(d: &Deployment) -> Self {
        let spec = d.spec.clone().unwrap_or_default();
        let st = d.status.clone().unwrap_or_default();
        let want = spec.replicas.unwrap_or(1);
        let generation = d.metadata.generation.unwrap_or(0);
        let updated = st.updated_replicas.unwrap_or(0);
        let rollout = if st.observed_generation.unwrap_or(0) < generation {
            Rollout::InProgress("the Deployment controller has not seen the change yet".into())
        } else if updated < want {
            Rollout::InProgress(format!("{updated} of {want} replicas updated"))
        } else if st.replicas.unwrap_or(0) > updated {
            Rollout::InProgress(format!(
                "{} old replicas are still terminating",
                st.replicas.unwrap_or(0) - updated
            ))
        } else if st.available_replicas.unwrap_or(0) < updated {
            Rollout::InProgress(format!(
                "{} of {updated} updated replicas available",
                st.available_replicas.unwrap_or(0)
            ))
        } else {
            Rollout::Complete
        };
        Self::from_parts(
            WorkloadKind::Deployment,
            &d.metadata,
            &spec.template,
            Some(spec.selector.clone()),
            rollout,
        )
    }

    pub fn from_stateful_set(s: &StatefulSet) -> Self {
        let spec = s.spec.clone().unwrap_or_default();
        let st = s.status.clone().unwrap_or_default();
        let want = spec.replicas.unwrap_or(1);
        let generation = s.metadata.generation.unwrap_or(0);
        let updated = st.updated_replicas.unwrap_or(0);
        let on_delete = spec
            .update_strategy
            .as_ref()
            .and_then(|u| u.type_.as_deref())
            == Some("OnDelete");
        let rollout = if st.observed_generation.unwrap_or(0) < generation {
            Rollout::InProgress("the StatefulSet controller has not seen the change yet".into())
        } else if on_delete && st.update_revision != st.current_revision {
            Rollout::InProgress("updateStrategy OnDelete: Pods change only when deleted".into())
        } else if updated < want {
            Rollout::InProgress(format!("{updated} of {want} replicas updated"))
        } else if st.ready_replicas.unwrap_or(0) < want {
            Rollout::InProgress(format!(
                "{} of {want} replicas ready",
                st.ready_replicas.unwrap_or(0)
            ))
        } else {
            Rollout::Complete
        };
        Self::from_parts(
            WorkloadKind::StatefulSet,
            &s.metadata,
            &spec.template,
            Some(spec.selector.clone()),
            rollout,
        )
    }

    pub fn from_daemon_set(d: &DaemonSet) -> Self {
        let spec = d.spec.clone().unwrap_or_default();
        let st = d.status.clone().unwrap_or_default();
        let generation = d.metadata.generation.unwrap_or(0);
        let want = st.desired_number_scheduled;
        let updated = st.updated_number_scheduled.unwrap_or(0);
        let rollout = if st.observed_generation.unwrap_or(0) < generation {
            Rollout::InProgress("the DaemonSet controller has not seen the change yet".into())
        } else if updated < want {
            Rollout::InProgress(format!("{updated} of {want} nodes updated"))
        } else if st.number_available.unwrap_or(0) < want {
            Rollout::InProgress(format!(
                "{} of {want} daemon Pods available",
                st.number_available.unwrap_or(0)
            ))
        } else {
            Rollout::Complete
        };
        Self::from_parts(
            WorkloadKind::DaemonSet,
            &d.metadata,
            &spec.template,
            Some(spec.selector.clone()),
            rollout,
        )
    }
}

/// The pod-template annotation for one AgentToken. An annotation's name part
/// has at most 63 characters, so long AgentToken names are cut and made
/// unique with a hash.
pub fn annotation_key(agent_token: &str) -> String {
    const MAX_NAME_PART: usize = 63;
    let name_part = format!("revision-{agent_token}");
    if name_part.len() <= MAX_NAME_PART {
        return format!("agenttoken.dev/{name_part}");
    }
    let digest = hex::encode(&Sha256::digest(agent_token.as_bytes())[..4]);
    let keep = MAX_NAME_PART - "revision-".len() - 1 - digest.len();
    let head: String = agent_token.chars().take(keep).collect();
    let head = head.trim_end_matches(['-', '.', '_']);
    format!("agenttoken.dev/revision-{head}-{digest}")
}

/// Whether a pod spec uses Secret `name`: env `secretKeyRef`, `envFrom`,
/// a `secret` volume or a `projected` volume source.
pub fn references_secret(spec: &PodSpec, name: &str) -> bool {
    !consuming_containers(spec, name).is_empty() || secret_volumes(spec, name).next().is_some()
}

fn secret_volumes<'a>(spec: &'a PodSpec, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    spec.volumes.iter().flatten().filter_map(move |v| {
        let direct = v
            .secret
            .as_ref()
            .is_some_and(|s| s.secret_name.as_deref() == Some(name));
        let projected = v.projected.as_ref().is_some_and(|p| {
            p.sources
                .iter()
                .flatten()
                .any(|s| s.secret.as_ref().is_some_and(|s| s.name == name))
        });
        (direct || projected).then_some(v.name.as_str())
    })
}

/// Containers (and init containers) that read Secret `name` through their
/// environment or mount one of its volumes.
pub fn consuming_containers(spec: &PodSpec, name: &str) -> Vec<String> {
    let volumes: Vec<&str> = secret_volumes(spec, name).collect();
    spec.init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .filter(|c| {
            let env = c.env.iter().flatten().any(|e| {
                e.value_from
                    .as_ref()
                    .and_then(|v| v.secret_key_ref.as_ref())
                    .is_some_and(|r| r.name == name)
            });
            let env_from = c
                .env_from
                .iter()
                .flatten()
                .any(|e| e.secret_ref.as_ref().is_some_and(|r| r.name == name));
            let mounted = c
                .volume_mounts
                .iter()
                .flatten()
                .any(|m| volumes.contains(&m.name.as_str()));
            env || env_from || mounted
        })
        .map(|c| c.name.clone())
        .collect()
}

/// The workloads that must pick up the Secret's new revisions.
pub fn select<'a>(
    workloads: &'a [Workload],
    secret: &str,
    spec: &ConsumersSpec,
) -> Vec<&'a Workload> {
    let mut chosen: Vec<&Workload> = match spec.restart.unwrap_or_default() {
        RestartPolicy::None => Vec::new(),
        RestartPolicy::Auto => workloads
            .iter()
            .filter(|w| references_secret(&w.pod_spec, secret))
            .filter(|w| w.annotations.get(labels::RESTART).map(String::as_str) != Some("false"))
            .collect(),
        RestartPolicy::Selected => match &spec.selector {
            Some(sel) => workloads
                .iter()
                .filter(|w| selector::matches(sel, &w.labels))
                .collect(),
            None => Vec::new(),
        },
    };
    // A signal is an exec in someone's Pods: only ever into workloads that
    // use this Secret and have not opted out, whatever `selector` matches.
    if spec.strategy.unwrap_or_default() == ConsumerStrategy::Signal {
        chosen.retain(|w| {
            references_secret(&w.pod_spec, secret)
                && w.annotations.get(labels::RESTART).map(String::as_str) != Some("false")
        });
    }
    chosen.sort_by(|a, b| a.key.cmp(&b.key));
    chosen
}

/// Whether `pod` belongs to workload `w` by its controller owner reference
/// (a ReplicaSet of a Deployment is named `<deployment>-<hash>`), not by
/// labels anyone can copy.
pub fn owned_by(pod: &Pod, w: &Workload) -> bool {
    let Some(owner) = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
    else {
        return false;
    };
    match w.key.kind {
        WorkloadKind::Deployment => {
            owner.kind == "ReplicaSet"
                && owner
                    .name
                    .strip_prefix(&w.key.name)
                    .and_then(|rest| rest.strip_prefix('-'))
                    .is_some_and(|hash| !hash.is_empty() && !hash.contains('-'))
        }
        WorkloadKind::StatefulSet => owner.kind == "StatefulSet" && owner.name == w.key.name,
        WorkloadKind::DaemonSet => owner.kind == "DaemonSet" && owner.name == w.key.name,
    }
}

/// The containers of `pod` to signal: those whose OWN spec uses the Secret
/// (the Pod's, not the workload's), narrowed to `only` when given.
pub fn signal_containers(pod: &Pod, secret: &str, only: Option<&str>) -> Vec<String> {
    let Some(spec) = pod.spec.as_ref() else {
        return Vec::new();
    };
    consuming_containers(spec, secret)
        .into_iter()
        .filter(|c| spec.containers.iter().any(|x| &x.name == c))
        .filter(|c| only.is_none_or(|o| o == c))
        .collect()
}

/// What one consumer needs for the current revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Need {
    /// Restart (or signal) it for this revision.
    Restart,
    /// It carries the revision: report the rollout.
    Observe,
    /// Created after the token was written: it has the token already.
    UpToDate,
}

/// Pure: what a workload needs for `revision`, issued at `issued_at`.
/// `done_before` is the consumer's previous status entry, if any.
pub fn need(
    w: &Workload,
    strategy: ConsumerStrategy,
    annotation: &str,
    revision: i64,
    issued_at: Timestamp,
    done_before: Option<&ConsumerStatus>,
) -> Need {
    let current = revision.to_string();
    match strategy {
        ConsumerStrategy::RolloutRestart => {
            match w.template_annotations.get(annotation) {
                Some(v) if *v == current => Need::Observe,
                Some(_) => Need::Restart,
                // Never restarted by us: restart only if it predates the token.
                // Both times are read back from the API at whole seconds:
                // created in the token's second counts as before it (one
                // restart too many beats a workload left on an old token).
                None if w.created.is_some_and(|c| c <= issued_at) => Need::Restart,
                None => Need::UpToDate,
            }
        }
        ConsumerStrategy::Signal => match done_before {
            Some(c) if c.revision == revision && c.phase.settled() => Need::Observe,
            _ if w.created.is_some_and(|c| c <= issued_at) => Need::Restart,
            _ => Need::UpToDate,
        },
    }
}

/// Pure: the status of a consumer that carries `revision` (RolloutRestart).
pub fn observe(
    w: &Workload,
    revision: i64,
    restarted_at: Timestamp,
    now: Timestamp,
    timeout: Duration,
) -> (ConsumerPhase, Option<String>) {
    match &w.rollout {
        Rollout::Complete => (ConsumerPhase::RolledOut, None),
        Rollout::InProgress(why) => {
            let deadline = restarted_at
                .checked_add(jiff::SignedDuration::try_from(timeout).unwrap_or_default())
                .unwrap_or(restarted_at);
            if now >= deadline {
                (
                    ConsumerPhase::TimedOut,
                    Some(format!(
                        "rollout for revision {revision} did not complete within {}: {why}",
                        crate::rotation::format_duration(timeout)
                    )),
                )
            } else {
                (ConsumerPhase::RollingOut, Some(why.clone()))
            }
        }
    }
}

/// Reads every Deployment, StatefulSet and DaemonSet of a namespace.
pub async fn list(client: &Client, ns: &str) -> Result<Vec<Workload>, kube::Error> {
    let lp = ListParams::default();
    let (d, s, ds) = (
        Api::<Deployment>::namespaced(client.clone(), ns),
        Api::<StatefulSet>::namespaced(client.clone(), ns),
        Api::<DaemonSet>::namespaced(client.clone(), ns),
    );
    let (deployments, stateful_sets, daemon_sets) =
        tokio::try_join!(d.list(&lp), s.list(&lp), ds.list(&lp))?;
    Ok(deployments
        .iter()
        .map(Workload::from_deployment)
        .chain(stateful_sets.iter().map(Workload::from_stateful_set))
        .chain(daemon_sets.iter().map(Workload::from_daemon_set))
        .collect())
}

/// Reads one workload.
pub async fn get(client: &Client, key: &WorkloadKey) -> Result<Option<Workload>, kube::Error> {
    let c = client.clone();
    let ns = &key.namespace;
    Ok(match key.kind {
        WorkloadKind::Deployment => Api::<Deployment>::namespaced(c, ns)
            .get_opt(&key.name)
            .await?
            .map(|d| Workload::from_deployment(&d)),
        WorkloadKind::StatefulSet => Api::<StatefulSet>::namespaced(c, ns)
            .get_opt(&key.name)
            .await?
            .map(|s| Workload::from_stateful_set(&s)),
        WorkloadKind::DaemonSet => Api::<DaemonSet>::namespaced(c, ns)
            .get_opt(&key.name)
            .await?
            .map(|d| Workload::from_daemon_set(&d)),
    })
}

/// Field manager of the revision annotation the `Signal` strategy sets on Pods.
const SIGNAL_FIELD_MANAGER: &str = "agent-token-operator-signal";

/// How long one exec of the signal command may take.
const SIGNAL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the kubelet gets, after a Pod's annotation changed, to write the
/// new Secret into the Pod's volume before the signal is sent. Measured on the
/// local node (tests/e2e/node.rs): well under a second.
pub const PROJECTION_SETTLE: Duration = Duration::from_secs(2);
/// Longest one pass of signals may take (each exec has [`SIGNAL_TIMEOUT`]).
const SIGNAL_BUDGET: Duration = Duration::from_secs(30);

/// `Signal` strategy: runs the command in the consuming containers of the
/// workload's running Pods. Returns the phase and a message for status.
///
/// The kubelet copies a changed Secret into the Pods' volumes only when it
/// next syncs each Pod (its sync period, a minute by default), so a signal
/// sent right after the write would make the agent reload the old token.
/// Setting the AgentToken's revision annotation on each running Pod makes the
/// kubelet sync it now; the signal follows on the next pass, at least
/// [`PROJECTION_SETTLE`] later (a `Pending` consumer is looked at again in
/// 2 s), so no worker sleeps meanwhile.
///
/// Only running Pods the workload controls (by owner reference) are
/// signalled, and in each only the containers whose own spec uses the
/// Secret: a signal never reaches a container that does not hold the token.
pub async fn signal(
    client: &Client,
    w: &Workload,
    secret: &str,
    spec: &ConsumersSpec,
    annotation: &str,
    revision: i64,
) -> (ConsumerPhase, String) {
    let sig = spec.signal.clone().unwrap_or_default();
    // A signal, never a command of the AgentToken's choosing.
    let command: Vec<String> = vec![
        "kill".into(),
        format!("-{}", sig.signal.unwrap_or_default().as_str()),
        "1".into(),
    ];
    let only = sig.container.as_deref().filter(|c| !c.is_empty());
    let template_containers: Vec<String> = consuming_containers(&w.pod_spec, secret)
        .into_iter()
        .filter(|c| w.pod_spec.containers.iter().any(|x| &x.name == c))
        .filter(|c| only.is_none_or(|o| o == c))
        .collect();
    if template_containers.is_empty() {
        return (
            ConsumerPhase::Failed,
            match only {
                Some(c) => format!(
                    "container {:?} does not use the Secret; only containers that mount or reference it are signalled",
                    status_excerpt(c.as_bytes())
                ),
                None => "no container of the workload uses the Secret".into(),
            },
        );
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), &w.key.namespace);
    let selector = w
        .selector
        .as_ref()
        .and_then(|s| s.match_labels.as_ref())
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    let list = match pods.list(&ListParams::default().labels(&selector)).await {
        Ok(l) => l,
        Err(e) => return (ConsumerPhase::Failed, format!("could not list Pods: {e}")),
    };
    let running: Vec<Pod> = list
        .into_iter()
        .filter(|p| {
            w.selector
                .as_ref()
                .is_none_or(|s| selector::matches(s, p.labels()))
        })
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| owned_by(p, w))
        .collect();
    if running.is_empty() {
        return (
            ConsumerPhase::Signaled,
            "no running Pod to signal (new Pods read the new token when they start)".into(),
        );
    }
    let mut touched = 0usize;
    let mut not_touched = Vec::new();
    for pod in &running {
        if pod.annotations().get(annotation).map(String::as_str) == Some(&revision.to_string()) {
            continue;
        }
        let patch = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": pod.name_any(), "annotations": {annotation: revision.to_string()}},
        });
        match pods
            .patch(
                &pod.name_any(),
                &PatchParams::apply(SIGNAL_FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
        {
            Ok(_) => touched += 1,
            Err(e) => not_touched.push(format!(
                "{}: {}",
                pod.name_any(),
                status_excerpt(e.to_string().as_bytes())
            )),
        }
    }
    if touched > 0 {
        // Come back once the kubelet has had time to project the Secret:
        // the reconcile polls a Pending consumer again in 2 s and frees its
        // worker meanwhile.
        return (
            ConsumerPhase::Pending,
            format!(
                "asked the kubelet to refresh the Secret in {touched} Pod(s); the signal follows in {}s",
                PROJECTION_SETTLE.as_secs()
            ),
        );
    }
    let mut ok = 0usize;
    let mut failures = Vec::new();
    let deadline = tokio::time::Instant::now() + SIGNAL_BUDGET;
    for pod in &running {
        let containers = signal_containers(pod, secret, only);
        if containers.is_empty() {
            failures.push(format!(
                "{}: no container of this Pod uses the Secret",
                pod.name_any()
            ));
        }
        for c in &containers {
            if tokio::time::Instant::now() >= deadline {
                failures.push(format!(
                    "{}/{c}: not signalled, the {}s budget of one pass was spent",
                    pod.name_any(),
                    SIGNAL_BUDGET.as_secs()
                ));
                continue;
            }
            let ap = AttachParams::default()
                .container(c.clone())
                .stdin(false)
                .stdout(true)
                .stderr(true);
            let run = async {
                let mut proc = pods.exec(&pod.name_any(), command.clone(), &ap).await?;
                // Both streams are drained together (an unread one would
                // block the command once its pipe is full) and at most
                // SIGNAL_OUTPUT_CAP bytes of each are kept; stdout is never
                // shown, stderr only as an excerpt when the command fails.
                let stdout = proc.stdout();
                let stderr = proc.stderr();
                let status = proc.take_status();
                let (_, (err, _), status) = tokio::join!(
                    read_capped(stdout, SIGNAL_OUTPUT_CAP),
                    read_capped(stderr, SIGNAL_OUTPUT_CAP),
                    async move {
                        match status {
                            Some(s) => s.await,
                            None => None,
                        }
                    },
                );
                Ok::<_, kube::Error>((status, err))
            };
            // On timeout `run` is dropped, and with it the attached process.
            match tokio::time::timeout(SIGNAL_TIMEOUT, run).await {
                Ok(Ok((Some(s), _))) if s.status.as_deref() == Some("Success") => ok += 1,
                Ok(Ok((Some(s), err))) => {
                    let why = s.message.unwrap_or_else(|| "command failed".into());
                    let mut text = status_excerpt(why.as_bytes());
                    if !err.is_empty() {
                        text.push_str(": ");
                        text.push_str(&status_excerpt(&err));
                    }
                    failures.push(format!("{}/{c}: {text}", pod.name_any()));
                }
                Ok(Ok((None, _))) => ok += 1,
                Ok(Err(e)) => failures.push(format!(
                    "{}/{c}: {}",
                    pod.name_any(),
                    status_excerpt(e.to_string().as_bytes())
                )),
                Err(_) => failures.push(format!(
                    "{}/{c}: timed out after {}s",
                    pod.name_any(),
                    SIGNAL_TIMEOUT.as_secs()
                )),
            }
        }
    }
    // A Pod that could not be annotated still gets the signal; its volume
    // may hold the old token until the kubelet's next sync.
    let lag = if not_touched.is_empty() {
        String::new()
    } else {
        format!(
            "; could not annotate {} (the kubelet updates their volume within its sync period)",
            list_some(&not_touched)
        )
    };
    if failures.is_empty() {
        (
            ConsumerPhase::Signaled,
            format!(
                "signalled {ok} container(s) in {} Pod(s){lag}",
                running.len()
            ),
        )
    } else {
        (
            ConsumerPhase::Failed,
            format!(
                "{} of {} signal(s) failed: {}{lag}",
                failures.len(),
                failures.len() + ok,
                list_some(&failures)
            ),
        )
    }
}

/// Bytes of each stream of a `Signal` exec that are kept; the rest is read
/// and discarded so the command never blocks on a full pipe.
const SIGNAL_OUTPUT_CAP: usize = 64 * 1024;

/// Characters of command output or error text one failure may put into a
/// status message.
const SIGNAL_EXCERPT: usize = 256;

/// Failures named one by one in a status message; the rest are counted.
const SIGNAL_LISTED: usize = 5;

/// Reads `r` (if any) to its end, keeping its first `cap` bytes and
/// discarding the rest; also returns how many bytes there were. A read
/// error ends the stream.
async fn read_capped<R>(r: Option<R>, cap: usize) -> (Vec<u8>, u64)
where
    R: tokio::io::AsyncRead + Unpin,
{
    let mut kept = Vec::new();
    let mut total = 0u64;
    let Some(mut r) = r else {
        return (kept, total);
    };
    let mut buf = [0u8; 8192];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                total = total.saturating_add(n as u64);
                let room = cap.saturating_sub(kept.len()).min(n);
                kept.extend_from_slice(buf.get(..room).unwrap_or_default());
            }
        }
    }
    (kept, total)
}

/// Text from a container or the API server made fit for a status message:
/// lossy UTF-8, trimmed, control characters replaced, at most
/// [`SIGNAL_EXCERPT`] characters (then `…`).
fn status_excerpt(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    let mut out: String = text
        .chars()
        .take(SIGNAL_EXCERPT)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().nth(SIGNAL_EXCERPT).is_some() {
        out.push('…');
    }
    out
}

/// The first [`SIGNAL_LISTED`] of `items`, joined, and how many more there are.
fn list_some(items: &[String]) -> String {
    let mut out = items
        .iter()
        .take(SIGNAL_LISTED)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join("; ");
    if items.len() > SIGNAL_LISTED {
        out.push_str(&format!(" (and {} more)", items.len() - SIGNAL_LISTED));
    }
    out
}

#[cfg(test)]
mod signal_output_tests {
    use super::*;

    #[tokio::test]
    async fn exec_output_is_drained_but_only_the_cap_is_kept() {
        let (mut w, r) = tokio::io::duplex(1024);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let chunk = [b'x'; 4096];
            for _ in 0..1024 {
                w.write_all(&chunk).await.unwrap();
            }
        });
        let (kept, total) = read_capped(Some(r), SIGNAL_OUTPUT_CAP).await;
        // The writer finished: 4 MiB went through a 1 KiB pipe.
        writer.await.unwrap();
        assert_eq!(total, 4 << 20);
        assert_eq!(kept.len(), SIGNAL_OUTPUT_CAP);
        let (kept, total) = read_capped(Some(&b"short"[..]), SIGNAL_OUTPUT_CAP).await;
        assert_eq!((kept.as_slice(), total), (&b"short"[..], 5));
        let (kept, total) = read_capped(None::<&[u8]>, SIGNAL_OUTPUT_CAP).await;
        assert!(kept.is_empty() && total == 0);
    }

    #[test]
    fn excerpts_are_short_and_clean() {
        assert_eq!(
            status_excerpt(b"  kill: can't kill pid 1\n"),
            "kill: can't kill pid 1"
        );
        assert_eq!(status_excerpt(b"a\nb\x1b[31mc\r\x00d"), "a b [31mc  d");
        assert_eq!(
            status_excerpt(&[0xff, 0xfe, b'o', b'k']),
            "\u{FFFD}\u{FFFD}ok"
        );
        let long = status_excerpt(&[b'y'; SIGNAL_OUTPUT_CAP]);
        assert_eq!(long.chars().count(), SIGNAL_EXCERPT + 1);
        assert!(long.ends_with('…'));
    }

    #[test]
    fn only_a_few_failures_are_listed() {
        let many: Vec<String> = (0..50).map(|i| format!("pod-{i}/app: failed")).collect();
        let text = list_some(&many);
        assert!(text.starts_with("pod-0/app: failed; pod-1/app: failed"));
        assert!(text.ends_with("pod-4/app: failed (and 45 more)"), "{text}");
        assert_eq!(
            list_some(&many[..2]),
            "pod-0/app: failed; pod-1/app: failed"
        );
    }
}

/// A status entry.
pub fn status_entry(
    w: &Workload,
    revision: i64,
    restarted_at: Option<Timestamp>,
    phase: ConsumerPhase,
    message: Option<String>,
) -> ConsumerStatus {
    ConsumerStatus {
        kind: w.key.kind.as_str().into(),
        name: w.key.name.clone(),
        revision,
        restarted_at: restarted_at.map(Time),
        phase,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{DeploymentSpec, DeploymentStatus};
    use k8s_openapi::api::core::v1::{
        Container, EnvFromSource, EnvVar, EnvVarSource, ProjectedVolumeSource, SecretEnvSource,
        SecretKeySelector, SecretProjection, SecretVolumeSource, Volume, VolumeMount,
        VolumeProjection,
    };

    fn container(name: &str) -> Container {
        Container {
            name: name.into(),
            ..Default::default()
        }
    }

    fn deployment(name: &str, spec: PodSpec) -> Workload {
        let d = Deployment {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                generation: Some(1),
                creation_timestamp: Some(Time("2026-01-01T00:00:00Z".parse().unwrap())),
                ..Default::default()
            },
            spec: Some(DeploymentSpec {
                replicas: Some(0),
                template: PodTemplateSpec {
                    metadata: None,
                    spec: Some(spec),
                },
                ..Default::default()
            }),
            status: Some(DeploymentStatus {
                observed_generation: Some(1),
                ..Default::default()
            }),
        };
        Workload::from_deployment(&d)
    }

    #[test]
    fn every_way_of_using_a_secret_is_found() {
        let env = PodSpec {
            containers: vec![Container {
                env: Some(vec![EnvVar {
                    name: "TOKEN".into(),
                    value_from: Some(EnvVarSource {
                        secret_key_ref: Some(SecretKeySelector {
                            name: "tok".into(),
                            key: "token".into(),
                            optional: None,
                        }),
                        ..Default::default()
                    }),
                    value: None,
                }]),
                ..container("app")
            }],
            ..Default::default()
        };
        let env_from = PodSpec {
            init_containers: Some(vec![Container {
                env_from: Some(vec![EnvFromSource {
                    secret_ref: Some(SecretEnvSource {
                        name: "tok".into(),
                        optional: None,
                    }),
                    ..Default::default()
                }]),
                ..container("init")
            }]),
            containers: vec![container("app")],
            ..Default::default()
        };
        let volume = PodSpec {
            containers: vec![
                Container {
                    volume_mounts: Some(vec![VolumeMount {
                        name: "t".into(),
                        mount_path: "/t".into(),
                        ..Default::default()
                    }]),
                    ..container("app")
                },
                container("sidecar"),
            ],
            volumes: Some(vec![Volume {
                name: "t".into(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some("tok".into()),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        };
        let projected = PodSpec {
            containers: vec![container("app")],
            volumes: Some(vec![Volume {
                name: "p".into(),
                projected: Some(ProjectedVolumeSource {
                    sources: Some(vec![VolumeProjection {
                        secret: Some(SecretProjection {
                            name: "tok".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        };
        for spec in [&env, &env_from, &volume, &projected] {
            assert!(references_secret(spec, "tok"));
            assert!(!references_secret(spec, "other"));
        }
        assert_eq!(consuming_containers(&volume, "tok"), vec!["app"]);
        assert_eq!(consuming_containers(&env_from, "tok"), vec!["init"]);
        assert!(!references_secret(&PodSpec::default(), "tok"));
    }

    #[test]
    fn auto_honours_the_opt_out_and_selected_uses_only_the_selector() {
        let uses = PodSpec {
            containers: vec![container("app")],
            volumes: Some(vec![Volume {
                name: "t".into(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some("tok".into()),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        };
        let a = deployment("a", uses.clone());
        let mut b = deployment("b", uses.clone());
        b.annotations.insert(labels::RESTART.into(), "false".into());
        let mut c = deployment("c", PodSpec::default());
        c.labels.insert("team".into(), "x".into());
        let all = vec![a, b, c];
        let names = |v: Vec<&Workload>| v.iter().map(|w| w.key.name.clone()).collect::<Vec<_>>();
        let auto = ConsumersSpec::default();
        assert_eq!(names(select(&all, "tok", &auto)), vec!["a"]);
        let selected = ConsumersSpec {
            restart: Some(RestartPolicy::Selected),
            selector: Some(LabelSelector {
                match_labels: Some([("team".to_string(), "x".to_string())].into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(names(select(&all, "tok", &selected)), vec!["c"]);
        let none = ConsumersSpec {
            restart: Some(RestartPolicy::None),
            ..Default::default()
        };
        assert!(select(&all, "tok", &none).is_empty());
    }

    #[test]
    fn restart_only_when_the_revision_changed() {
        let mut w = deployment("a", PodSpec::default());
        let key = annotation_key("tok");
        let issued: Timestamp = "2026-02-01T00:00:00Z".parse().unwrap();
        let rr = ConsumerStrategy::RolloutRestart;
        // Older than the token and never annotated: restart.
        assert_eq!(need(&w, rr, &key, 1, issued, None), Need::Restart);
        // Created in the token's second (status keeps whole seconds): restart.
        let same_second = w.created.unwrap();
        assert_eq!(need(&w, rr, &key, 1, same_second, None), Need::Restart);
        // Created after the token: it has it already.
        let early: Timestamp = "2025-12-01T00:00:00Z".parse().unwrap();
        assert_eq!(need(&w, rr, &key, 1, early, None), Need::UpToDate);
        // Annotated with this revision: nothing to do (operator restarts, resyncs).
        w.template_annotations.insert(key.clone(), "1".into());
        assert_eq!(need(&w, rr, &key, 1, issued, None), Need::Observe);
        assert_eq!(need(&w, rr, &key, 2, issued, None), Need::Restart);
    }

    #[test]
    fn a_stuck_rollout_times_out() {
        let mut w = deployment("a", PodSpec::default());
        let t0: Timestamp = "2026-02-01T00:00:00Z".parse().unwrap();
        assert_eq!(
            observe(&w, 2, t0, t0, Duration::from_secs(60)).0,
            ConsumerPhase::RolledOut
        );
        w.rollout = Rollout::InProgress("0 of 1 replicas updated".into());
        assert_eq!(
            observe(&w, 2, t0, t0, Duration::from_secs(60)).0,
            ConsumerPhase::RollingOut
        );
        let later = t0 + jiff::SignedDuration::from_secs(61);
        let (phase, msg) = observe(&w, 2, t0, later, Duration::from_secs(60));
        assert_eq!(phase, ConsumerPhase::TimedOut);
        assert!(msg.unwrap().contains("0 of 1 replicas updated"));
    }

    #[test]
    fn deployment_rollout_state_follows_kubectl_rollout_status() {
        let mut d = Deployment {
            metadata: ObjectMeta {
                generation: Some(2),
                ..Default::default()
            },
            spec: Some(DeploymentSpec {
                replicas: Some(2),
                ..Default::default()
            }),
            status: Some(DeploymentStatus {
                observed_generation: Some(1),
                replicas: Some(2),
                updated_replicas: Some(2),
                available_replicas: Some(2),
                ..Default::default()
            }),
        };
        assert!(matches!(
            Workload::from_deployment(&d).rollout,
            Rollout::InProgress(_)
        ));
        d.status.as_mut().unwrap().observed_generation = Some(2);
        assert_eq!(Workload::from_deployment(&d).rollout, Rollout::Complete);
        d.status.as_mut().unwrap().replicas = Some(3);
        assert!(matches!(
            Workload::from_deployment(&d).rollout,
            Rollout::InProgress(_)
        ));
    }

    #[test]
    fn annotation_keys_fit_the_63_character_limit() {
        assert_eq!(
            annotation_key("deploy-bot"),
            "agenttoken.dev/revision-deploy-bot"
        );
        let long = "a".repeat(200);
        let k = annotation_key(&long);
        let name_part = k.strip_prefix("agenttoken.dev/").unwrap();
        assert!(name_part.len() <= 63, "{name_part}");
        assert_ne!(annotation_key(&long), annotation_key(&"a".repeat(199)));
    }
}

//! Consumers: the Deployments, StatefulSets and DaemonSets that use an
//! AgentToken's Secret, and what each must do to pick up a new revision.
//!
//! Everything here but [`list`] and [`signal`] is pure. The restart itself
//! (the pod-template annotation) is applied by [`super::restarts`], which
//! coalesces restarts of one workload and bounds them cluster-wide. The
//! operator reads workloads from [`super::workloads`] (a watch-fed index);
//! [`list`] is for callers without one (the kubectl plugin).

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Pod, PodSpec, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta, Time,
};
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

/// Identifies one workload. The namespace is shared (an `Arc`) by the
/// workloads the index keeps of one namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkloadKey {
    pub kind: WorkloadKind,
    pub namespace: Arc<str>,
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

/// A small sorted string map, read-only once built: what a cached workload
/// keeps of its labels and revision annotations. A `BTreeMap` allocates a
/// node for eleven entries (over 500 bytes with `String` pairs) however few
/// it holds; this holds exactly its entries, and nothing when empty.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyValues(Box<[(Box<str>, Box<str>)]>);

impl KeyValues {
    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        let i = self.0.binary_search_by(|(k, _)| (**k).cmp(key)).ok()?;
        self.0.get(i).map(|(_, v)| &**v)
    }

    /// The entries, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (&**k, &**v))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Entries in any order; of a key given twice the last value is kept (as a
/// map's `insert` would).
impl<K: Into<Box<str>>, V: Into<Box<str>>> FromIterator<(K, V)> for KeyValues {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut entries: Vec<(Box<str>, Box<str>)> = iter
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        // Stable: equal keys stay in the order given, so keeping the last
        // one of each run keeps the value given last.
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let mut kept: Vec<(Box<str>, Box<str>)> = Vec::with_capacity(entries.len());
        for e in entries {
            match kept.last_mut() {
                Some(last) if last.0 == e.0 => *last = e,
                _ => kept.push(e),
            }
        }
        KeyValues(kept.into_boxed_slice())
    }
}

/// One Secret a pod template uses (env `secretKeyRef`, `envFrom`, a
/// `secret` volume or a `projected` source, optional or not).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretUse {
    pub secret: Box<str>,
    /// The containers (not init containers) that read it through their
    /// environment or mount one of its volumes: where a `Signal` may go.
    /// Empty when only init containers read it, or a volume of it is
    /// mounted by no container.
    pub containers: Box<[Box<str>]>,
}

/// What the `Signal` strategy needs of a workload's selector to find its
/// Pods. `matchLabels` goes to the API server as the LIST's label selector
/// (as it always did); `matchExpressions`, rare, are checked here.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodSelector {
    /// `matchLabels` as a label-selector query (`k=v,...`).
    pub query: Box<str>,
    /// `matchExpressions` (an empty box allocates nothing).
    pub expressions: Box<[LabelSelectorRequirement]>,
}

impl PodSelector {
    fn new(selector: Option<&LabelSelector>) -> Self {
        let query = selector
            .and_then(|s| s.match_labels.as_ref())
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default();
        PodSelector {
            query: query.into(),
            expressions: selector
                .and_then(|s| s.match_expressions.clone())
                .unwrap_or_default()
                .into(),
        }
    }

    /// The part of the selector the API server did not apply (`query`), as
    /// a selector to check listed Pods against; `None` when nothing is left.
    pub fn remainder(&self) -> Option<LabelSelector> {
        (!self.expressions.is_empty()).then(|| LabelSelector {
            match_expressions: Some(self.expressions.to_vec()),
            match_labels: None,
        })
    }
}

/// A workload, as far as consumers are concerned: only what their
/// decisions read, so that the index of every workload of the watched
/// namespaces costs what is kept, not whole objects (pod templates,
/// managedFields, status). See [`super::workloads`].
#[derive(Clone, Debug)]
pub struct Workload {
    pub key: WorkloadKey,
    /// For `restart: Selected` (`consumers.selector`).
    pub labels: KeyValues,
    /// The workload's `agenttoken.dev/restart: "false"`: never restarted
    /// nor signalled automatically.
    pub opted_out: bool,
    pub created: Option<Timestamp>,
    /// `metadata.generation`: the restarter knows from it whether the
    /// index has seen its own patch yet.
    pub generation: i64,
    /// The pod template's annotations named [`REVISION_ANNOTATION_PREFIX`]`*`,
    /// and no others.
    pub revision_annotations: KeyValues,
    /// The Secrets the pod template uses, by name.
    pub secrets: Box<[SecretUse]>,
    pub pod_selector: PodSelector,
    pub rollout: Rollout,
}

impl Workload {
    fn from_parts(
        kind: WorkloadKind,
        meta: &ObjectMeta,
        template: &PodTemplateSpec,
        selector: Option<&LabelSelector>,
        rollout: Rollout,
    ) -> Self {
        let template_annotations = template
            .metadata
            .as_ref()
            .and_then(|m| m.annotations.as_ref());
        Workload {
            key: WorkloadKey {
                kind,
                namespace: meta.namespace.as_deref().unwrap_or_default().into(),
                name: meta.name.clone().unwrap_or_default(),
            },
            labels: meta
                .labels
                .iter()
                .flatten()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect(),
            opted_out: meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(labels::RESTART))
                .is_some_and(|v| v == "false"),
            created: meta.creation_timestamp.as_ref().map(|t| t.0),
            generation: meta.generation.unwrap_or(0),
            revision_annotations: template_annotations
                .iter()
                .flat_map(|a| a.iter())
                .filter(|(k, _)| k.starts_with(REVISION_ANNOTATION_PREFIX))
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect(),
            secrets: template.spec.as_ref().map(secret_uses).unwrap_or_default(),
            pod_selector: PodSelector::new(selector),
            rollout,
        }
    }

    pub fn from_deployment(d: &Deployment) -> Self {
        let spec = d.spec.as_ref().map_or_else(Cow::default, Cow::Borrowed);
        let st = d.status.as_ref().map_or_else(Cow::default, Cow::Borrowed);
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
            Some(&spec.selector),
            rollout,
        )
    }

    pub fn from_stateful_set(s: &StatefulSet) -> Self {
        let spec = s.spec.as_ref().map_or_else(Cow::default, Cow::Borrowed);
        let st = s.status.as_ref().map_or_else(Cow::default, Cow::Borrowed);
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
            Some(&spec.selector),
            rollout,
        )
    }

    pub fn from_daemon_set(d: &DaemonSet) -> Self {
        let spec = d.spec.as_ref().map_or_else(Cow::default, Cow::Borrowed);
        let st = d.status.as_ref().map_or_else(Cow::default, Cow::Borrowed);
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
            Some(&spec.selector),
            rollout,
        )
    }

    /// Whether the pod template uses Secret `name` (as
    /// [`references_secret`] on the whole template would say).
    pub fn uses(&self, secret: &str) -> bool {
        self.secret_use(secret).is_some()
    }

    /// The containers (not init containers) that read Secret `name` (as
    /// [`consuming_containers`] on the whole template, less init
    /// containers, would say).
    pub fn signal_targets(&self, secret: &str) -> &[Box<str>] {
        self.secret_use(secret)
            .map(|u| &*u.containers)
            .unwrap_or_default()
    }

    fn secret_use(&self, secret: &str) -> Option<&SecretUse> {
        let i = self
            .secrets
            .binary_search_by(|u| (*u.secret).cmp(secret))
            .ok()?;
        self.secrets.get(i)
    }
}

/// The Secrets a pod spec uses, each with the containers that read it:
/// everything [`references_secret`] and [`consuming_containers`] decide
/// on, for every name they could be asked about, without the spec.
pub fn secret_uses(spec: &PodSpec) -> Box<[SecretUse]> {
    let mut names: BTreeSet<&str> = BTreeSet::new();
    for v in spec.volumes.iter().flatten() {
        names.extend(v.secret.as_ref().and_then(|s| s.secret_name.as_deref()));
        names.extend(
            v.projected
                .iter()
                .flat_map(|p| p.sources.iter().flatten())
                .filter_map(|s| s.secret.as_ref().map(|s| s.name.as_str())),
        );
    }
    for c in spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
    {
        names.extend(c.env.iter().flatten().filter_map(|e| {
            e.value_from
                .as_ref()
                .and_then(|v| v.secret_key_ref.as_ref())
                .map(|r| r.name.as_str())
        }));
        names.extend(
            c.env_from
                .iter()
                .flatten()
                .filter_map(|e| e.secret_ref.as_ref().map(|r| r.name.as_str())),
        );
    }
    names
        .into_iter()
        .map(|name| SecretUse {
            secret: name.into(),
            containers: consuming_containers(spec, name)
                .into_iter()
                .filter(|c| spec.containers.iter().any(|x| &x.name == c))
                .map(Into::into)
                .collect(),
        })
        .collect()
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
    workloads: impl IntoIterator<Item = &'a Workload>,
    secret: &str,
    spec: &ConsumersSpec,
) -> Vec<&'a Workload> {
    let workloads = workloads.into_iter();
    let mut chosen: Vec<&Workload> = match spec.restart.unwrap_or_default() {
        RestartPolicy::None => Vec::new(),
        RestartPolicy::Auto => workloads
            .filter(|w| w.uses(secret) && !w.opted_out)
            .collect(),
        RestartPolicy::Selected => match &spec.selector {
            Some(sel) => workloads
                .filter(|w| selector::matches_with(sel, |k| w.labels.get(k)))
                .collect(),
            None => Vec::new(),
        },
    };
    // A signal is an exec in someone's Pods: only ever into workloads that
    // use this Secret and have not opted out, whatever `selector` matches.
    if spec.strategy.unwrap_or_default() == ConsumerStrategy::Signal {
        chosen.retain(|w| w.uses(secret) && !w.opted_out);
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
                    .strip_prefix(w.key.name.as_str())
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
            match w.revision_annotations.get(annotation) {
                Some(v) if v == current => Need::Observe,
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

/// Reads every Deployment, StatefulSet and DaemonSet of a namespace with
/// three LISTs, as the same records the operator's index keeps. For callers
/// without the index (the kubectl plugin); the operator reads
/// [`super::workloads::Workloads`].
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
    let template_containers: Vec<&str> = w
        .signal_targets(secret)
        .iter()
        .map(|c| &**c)
        .filter(|c| only.is_none_or(|o| o == *c))
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
    // matchLabels were applied by the API server; the rest is checked here.
    let remainder = w.pod_selector.remainder();
    let list = match pods
        .list(&ListParams::default().labels(&w.pod_selector.query))
        .await
    {
        Ok(l) => l,
        Err(e) => return (ConsumerPhase::Failed, format!("could not list Pods: {e}")),
    };
    let running: Vec<Pod> = list
        .into_iter()
        .filter(|p| {
            remainder
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

    pub(super) fn container(name: &str) -> Container {
        Container {
            name: name.into(),
            ..Default::default()
        }
    }

    fn deployment(name: &str, spec: PodSpec) -> Workload {
        Workload::from_deployment(&full_deployment(name, spec))
    }

    fn full_deployment(name: &str, spec: PodSpec) -> Deployment {
        Deployment {
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
        }
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
        let mut b = full_deployment("b", uses.clone());
        b.metadata.annotations = Some([(labels::RESTART.into(), "false".into())].into());
        let b = Workload::from_deployment(&b);
        let mut c = full_deployment("c", PodSpec::default());
        c.metadata.labels = Some([("team".into(), "x".into())].into());
        let c = Workload::from_deployment(&c);
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
        w.revision_annotations = [(key.as_str(), "1")].into_iter().collect();
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

/// The slim record decides as the whole object did: each decision is made
/// from the full Deployment the old way (the oracle below) and from its
/// [`Workload`], and the two must agree.
#[cfg(test)]
mod slim_tests {
    use super::tests::container;
    use super::*;
    use k8s_openapi::api::apps::v1::DeploymentSpec;
    use k8s_openapi::api::core::v1::{
        Container, EnvFromSource, EnvVar, EnvVarSource, ProjectedVolumeSource, SecretEnvSource,
        SecretKeySelector, SecretProjection, SecretVolumeSource, Volume, VolumeMount,
        VolumeProjection,
    };
    use std::collections::BTreeMap;

    fn mounting(name: &str, volume: &str) -> Container {
        Container {
            volume_mounts: Some(vec![VolumeMount {
                name: volume.into(),
                mount_path: format!("/{volume}"),
                ..Default::default()
            }]),
            ..container(name)
        }
    }

    fn env(name: &str, secret: &str, optional: Option<bool>) -> Container {
        Container {
            env: Some(vec![EnvVar {
                name: "TOKEN".into(),
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: secret.into(),
                        key: "token".into(),
                        optional,
                    }),
                    ..Default::default()
                }),
                value: None,
            }]),
            ..container(name)
        }
    }

    fn env_from(name: &str, secret: &str, optional: Option<bool>) -> Container {
        Container {
            env_from: Some(vec![EnvFromSource {
                secret_ref: Some(SecretEnvSource {
                    name: secret.into(),
                    optional,
                }),
                ..Default::default()
            }]),
            ..container(name)
        }
    }

    fn secret_volume(name: &str, secret: &str) -> Volume {
        Volume {
            name: name.into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.into()),
                optional: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn projected_volume(name: &str, secrets: &[&str]) -> Volume {
        Volume {
            name: name.into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(
                    secrets
                        .iter()
                        .map(|s| VolumeProjection {
                            secret: Some(SecretProjection {
                                name: s.to_string(),
                                ..Default::default()
                            }),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn full(
        name: &str,
        spec: PodSpec,
        labels: &[(&str, &str)],
        annotations: &[(&str, &str)],
        template_annotations: &[(&str, &str)],
    ) -> Deployment {
        let map = |pairs: &[(&str, &str)]| {
            (!pairs.is_empty()).then(|| {
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<BTreeMap<_, _>>()
            })
        };
        Deployment {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                generation: Some(3),
                creation_timestamp: Some(Time("2026-01-01T00:00:00Z".parse().unwrap())),
                labels: map(labels),
                annotations: map(annotations),
                ..Default::default()
            },
            spec: Some(DeploymentSpec {
                selector: LabelSelector {
                    match_labels: map(&[("app", name)]),
                    ..Default::default()
                },
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        annotations: map(template_annotations),
                        ..Default::default()
                    }),
                    spec: Some(spec),
                },
                ..Default::default()
            }),
            status: None,
        }
    }

    /// Workloads using Secrets every way a pod spec can.
    fn table() -> Vec<Deployment> {
        let pod = |containers: Vec<Container>, volumes: Vec<Volume>| PodSpec {
            containers,
            volumes: (!volumes.is_empty()).then_some(volumes),
            ..Default::default()
        };
        vec![
            full(
                "volume",
                pod(
                    vec![mounting("app", "t"), container("sidecar")],
                    vec![secret_volume("t", "tok")],
                ),
                &[],
                &[],
                &[],
            ),
            full(
                "projected",
                pod(
                    vec![mounting("app", "p"), env("sidecar", "other", None)],
                    vec![projected_volume("p", &["other", "tok"])],
                ),
                &[("team", "x")],
                &[],
                &[],
            ),
            full(
                "env-optional",
                pod(vec![env("app", "tok", Some(true))], vec![]),
                &[("team", "y")],
                &[(labels::RESTART, "true")],
                &[],
            ),
            full(
                "init-env-from",
                PodSpec {
                    init_containers: Some(vec![env_from("init", "tok", Some(true))]),
                    containers: vec![container("app")],
                    ..Default::default()
                },
                &[],
                &[],
                &[],
            ),
            full(
                "env-from",
                pod(vec![env_from("app", "tok", None)], vec![]),
                &[("tier", "prod")],
                &[],
                &[
                    ("agenttoken.dev/revision-bot", "3"),
                    ("kubectl.kubernetes.io/restartedAt", "2026-01-01T00:00:00Z"),
                ],
            ),
            full(
                "unmounted",
                pod(vec![container("app")], vec![secret_volume("t", "tok")]),
                &[],
                &[],
                &[],
            ),
            full(
                "opted-out",
                pod(vec![env("app", "tok", None)], vec![]),
                &[("team", "x")],
                &[(labels::RESTART, "false"), ("unrelated", "kept-nowhere")],
                &[],
            ),
            full(
                "labels-only",
                PodSpec::default(),
                &[("team", "x"), ("tier", "prod")],
                &[],
                &[],
            ),
        ]
    }

    fn pod_spec(d: &Deployment) -> &PodSpec {
        d.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
    }

    /// The selection as it was made from whole objects.
    fn select_full(all: &[Deployment], secret: &str, spec: &ConsumersSpec) -> Vec<String> {
        let uses = |d: &Deployment| references_secret(pod_spec(d), secret);
        let opted_out = |d: &Deployment| {
            d.annotations().get(labels::RESTART).map(String::as_str) == Some("false")
        };
        let mut chosen: Vec<&Deployment> = match spec.restart.unwrap_or_default() {
            RestartPolicy::None => Vec::new(),
            RestartPolicy::Auto => all.iter().filter(|d| uses(d) && !opted_out(d)).collect(),
            RestartPolicy::Selected => match &spec.selector {
                Some(sel) => all
                    .iter()
                    .filter(|d| selector::matches(sel, d.labels()))
                    .collect(),
                None => Vec::new(),
            },
        };
        if spec.strategy.unwrap_or_default() == ConsumerStrategy::Signal {
            chosen.retain(|d| uses(d) && !opted_out(d));
        }
        let mut names: Vec<String> = chosen.iter().map(|d| d.name_any()).collect();
        names.sort();
        names
    }

    fn specs() -> Vec<ConsumersSpec> {
        let team_x = LabelSelector {
            match_labels: Some([("team".to_string(), "x".to_string())].into()),
            ..Default::default()
        };
        let prod_or_team = LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "tier".into(),
                operator: "In".into(),
                values: Some(vec!["prod".into()]),
            }]),
            ..Default::default()
        };
        let mut out = Vec::new();
        for strategy in [ConsumerStrategy::RolloutRestart, ConsumerStrategy::Signal] {
            for (restart, selector) in [
                (RestartPolicy::Auto, None),
                (RestartPolicy::None, None),
                (RestartPolicy::Selected, None),
                (RestartPolicy::Selected, Some(team_x.clone())),
                (RestartPolicy::Selected, Some(prod_or_team.clone())),
                (RestartPolicy::Selected, Some(LabelSelector::default())),
            ] {
                out.push(ConsumersSpec {
                    restart: Some(restart),
                    selector,
                    strategy: Some(strategy),
                    ..Default::default()
                });
            }
        }
        out
    }

    #[test]
    fn slim_records_select_what_whole_objects_selected() {
        let all = table();
        let slim: Vec<Workload> = all.iter().map(Workload::from_deployment).collect();
        for secret in ["tok", "other", "missing", ""] {
            for spec in specs() {
                let from_slim: Vec<String> = select(&slim, secret, &spec)
                    .iter()
                    .map(|w| w.key.name.clone())
                    .collect();
                assert_eq!(
                    from_slim,
                    select_full(&all, secret, &spec),
                    "secret {secret:?}, {spec:?}"
                );
            }
        }
        // The table is not vacuous: each way of using the Secret counts.
        let auto = ConsumersSpec::default();
        assert_eq!(
            select_full(&all, "tok", &auto),
            [
                "env-from",
                "env-optional",
                "init-env-from",
                "projected",
                "unmounted",
                "volume"
            ]
        );
    }

    #[test]
    fn slim_records_know_each_secret_and_who_reads_it() {
        for d in table() {
            let w = Workload::from_deployment(&d);
            let spec = pod_spec(&d);
            for secret in ["tok", "other", "missing", ""] {
                assert_eq!(
                    w.uses(secret),
                    references_secret(spec, secret),
                    "{} uses {secret:?}",
                    d.name_any()
                );
                let full: Vec<String> = consuming_containers(spec, secret)
                    .into_iter()
                    .filter(|c| spec.containers.iter().any(|x| &x.name == c))
                    .collect();
                let slim: Vec<&str> = w.signal_targets(secret).iter().map(|c| &**c).collect();
                assert_eq!(slim, full, "{} signal targets", d.name_any());
            }
        }
        let projected = Workload::from_deployment(&table()[1]);
        assert_eq!(projected.signal_targets("tok"), [Box::from("app")]);
        assert_eq!(
            projected.signal_targets("other"),
            [Box::from("app"), Box::from("sidecar")]
        );
        // Read by an init container only: used, but no one to signal.
        let init = Workload::from_deployment(&table()[3]);
        assert!(init.uses("tok") && init.signal_targets("tok").is_empty());
    }

    #[test]
    fn slim_records_keep_only_revision_annotations_and_decide_restarts_alike() {
        let d = table().remove(4);
        let w = Workload::from_deployment(&d);
        assert_eq!(
            w.revision_annotations.iter().collect::<Vec<_>>(),
            [("agenttoken.dev/revision-bot", "3")]
        );
        let key = annotation_key("bot");
        let full = d.spec.as_ref().unwrap().template.metadata.as_ref().unwrap();
        assert_eq!(
            w.revision_annotations.get(&key),
            full.annotations
                .as_ref()
                .unwrap()
                .get(&key)
                .map(String::as_str)
        );
        let issued: Timestamp = "2026-02-01T00:00:00Z".parse().unwrap();
        let rr = ConsumerStrategy::RolloutRestart;
        assert_eq!(need(&w, rr, &key, 3, issued, None), Need::Observe);
        assert_eq!(need(&w, rr, &key, 4, issued, None), Need::Restart);
        let other = annotation_key("other");
        assert_eq!(need(&w, rr, &other, 1, issued, None), Need::Restart);
        let early: Timestamp = "2025-01-01T00:00:00Z".parse().unwrap();
        assert_eq!(need(&w, rr, &other, 1, early, None), Need::UpToDate);
        // Only the opt-out is kept of the workload's annotations.
        let opted = Workload::from_deployment(&table()[6]);
        assert!(opted.opted_out);
        assert!(!Workload::from_deployment(&table()[2]).opted_out);
        assert_eq!(opted.generation, 3);
        assert_eq!(opted.labels.get("team"), Some("x"));
    }

    #[test]
    fn the_pod_selector_finds_the_pods_the_whole_selector_matched() {
        let mut d = table().remove(0);
        let whole = LabelSelector {
            match_labels: Some(
                [("app", "volume"), ("tier", "web")]
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .into(),
            ),
            match_expressions: Some(vec![
                LabelSelectorRequirement {
                    key: "track".into(),
                    operator: "NotIn".into(),
                    values: Some(vec!["canary".into()]),
                },
                LabelSelectorRequirement {
                    key: "zone".into(),
                    operator: "Exists".into(),
                    values: None,
                },
            ]),
        };
        d.spec.as_mut().unwrap().selector = whole.clone();
        let w = Workload::from_deployment(&d);
        assert_eq!(&*w.pod_selector.query, "app=volume,tier=web");
        let remainder = w.pod_selector.remainder().unwrap();
        for pod in [
            vec![("app", "volume"), ("tier", "web"), ("zone", "a")],
            vec![("app", "volume"), ("tier", "web")],
            vec![
                ("app", "volume"),
                ("tier", "web"),
                ("zone", "a"),
                ("track", "canary"),
            ],
            vec![("app", "volume"), ("zone", "a")],
            vec![("app", "other"), ("tier", "web"), ("zone", "a")],
        ] {
            let labels: BTreeMap<String, String> = pod
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            // What the API server applies (the query), then the remainder.
            let server = whole
                .match_labels
                .iter()
                .flatten()
                .all(|(k, v)| labels.get(k) == Some(v));
            assert_eq!(
                server && selector::matches(&remainder, &labels),
                selector::matches(&whole, &labels),
                "{pod:?}"
            );
        }
        // Without expressions nothing is left to check, and nothing allocated.
        let plain = Workload::from_deployment(&table()[0]);
        assert_eq!(&*plain.pod_selector.query, "app=volume");
        assert!(plain.pod_selector.remainder().is_none());
    }

    #[test]
    fn key_values_are_sorted_and_keep_the_last_value_of_a_key() {
        let kv: KeyValues = [("b", "1"), ("a", "2"), ("b", "3")].into_iter().collect();
        assert_eq!(kv.iter().collect::<Vec<_>>(), [("a", "2"), ("b", "3")]);
        assert_eq!(kv.get("b"), Some("3"));
        assert_eq!(kv.get("c"), None);
        assert!(KeyValues::default().is_empty());
    }
}

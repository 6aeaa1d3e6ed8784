//! Revocation drills (issue 21): a real revoke-now of an AgentToken's live
//! token, measured.
//!
//! A new `agenttoken.dev/drill` value makes the reconcile revoke the current
//! token at once and mint its replacement (`lastRotationReason: Drill`),
//! like `agenttoken.dev/revoke`. Just before, it hands this runner the old
//! token (in memory only, never written anywhere) and the issuer's backend.
//! The runner has its own clock, apart from the reconcile: every
//! [`POLL`] it asks the issuer whether the old token is refused (the way
//! each issuer allows, [`crate::issuer::Issuer::refuses`]), and reads the
//! AgentToken for the ledger's revocation, the consumers of the new
//! revision and any use of the old token after its revocation. Each phase
//! is timed from the drill's start; the result goes to `status.lastDrill`
//! (its own field manager, a JSON patch tested on the AgentToken's UID), a
//! Normal or Warning Event, and metrics. The old token is dropped when the
//! drill ends. A drill interrupted by an operator restart (its token is
//! gone with the process) is marked `Failed` as interrupted by the next
//! reconcile of its AgentToken on the leader ([`Drills::interrupted`]).

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::Api;
use kube::runtime::events::{Event, EventType};

use crate::events::Recorder;
use kube::{Client, Resource};
use secrecy::SecretString;
use tokio::time::Instant;
use tracing::{info, warn};

use super::reason::Reason;
use crate::crd::{AgentToken, ConsumerPhase, DrillResult, DrillStatus, TokenLife};
use crate::issuer::Issuer;
use crate::telemetry::Metrics;

/// How often a running drill looks.
pub const POLL: Duration = Duration::from_millis(250);
/// The target when `spec.drill.target` is unset.
pub const DEFAULT_TARGET: Duration = Duration::from_secs(300);
/// Drills measured at once; beyond, a drill still revokes and replaces
/// the token but is recorded as not measured.
pub const MAX_RUNNING: usize = 32;
/// Drills measured at once in one namespace: a tenant drilling all its
/// AgentTokens at once takes this share, not all of [`MAX_RUNNING`].
pub const MAX_RUNNING_PER_NAMESPACE: usize = 4;
/// Field manager of `status.lastDrill`.
pub const DRILL_MANAGER: &str = "agent-token-operator-drill";

/// What a drill needs from the reconcile that starts it.
pub struct Start {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub id: String,
    pub revision: i64,
    /// The old token: asked about at the issuer, never written.
    pub token: SecretString,
    pub backend: Box<dyn Issuer>,
    pub target: Duration,
}

/// The drills running.
#[derive(Clone)]
pub struct Drills {
    client: Client,
    recorder: Recorder,
    metrics: Arc<Metrics>,
    /// The usage tracker: what the operator's own introspection endpoint
    /// answers for a jwt.
    usage: Arc<crate::usage::Tracker>,
    /// Whether the operator serves jwt introspection here.
    introspection: bool,
    /// (AgentToken UID, drill id, namespace) being measured: a reconcile
    /// that tries the drill's mint again does not start it twice, and the
    /// limits count them.
    active: Arc<std::sync::Mutex<std::collections::HashSet<(String, String, String)>>>,
}

/// What a drill has seen so far (pure: [`Seen::result`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Seen {
    pub revoked: Option<Duration>,
    pub refused: Option<Duration>,
    /// Why the refusal cannot be checked.
    pub uncheckable: Option<String>,
    pub consumers_ready: Option<Duration>,
    /// A consumer that will not get the new token (its rollout timed out,
    /// its signal failed).
    pub consumer_failed: Option<String>,
    pub used_after_revocation: bool,
}

impl Seen {
    /// Whether there is nothing more to wait for.
    pub fn done(&self) -> bool {
        (self.refused.is_some() || self.uncheckable.is_some())
            && (self.consumers_ready.is_some() || self.consumer_failed.is_some())
    }

    /// The result against `target`, and what to say. `timed_out`: the
    /// drill stopped waiting.
    pub fn result(&self, target: Duration, timed_out: bool) -> (DrillResult, String) {
        let secs = |d: Duration| format!("{:.1}s", d.as_secs_f64());
        let mut missed = Vec::new();
        match self.refused {
            Some(t) if t > target => missed.push(format!(
                "the issuer refused the old token after {}, over the {} target",
                secs(t),
                secs(target)
            )),
            None if self.uncheckable.is_none() => missed.push(format!(
                "the issuer still accepted the old token when the drill stopped{}",
                if timed_out { " waiting" } else { "" }
            )),
            _ => {}
        }
        match (self.consumers_ready, &self.consumer_failed) {
            (_, Some(why)) => missed.push(format!("a consumer did not get the new token: {why}")),
            (Some(t), None) if t > target => missed.push(format!(
                "every consumer held the new token after {}, over the {} target",
                secs(t),
                secs(target)
            )),
            (None, None) => missed.push("not every consumer held the new token".into()),
            _ => {}
        }
        if self.used_after_revocation {
            missed.push("the old token was used after its revocation".into());
        }
        if !missed.is_empty() {
            return (DrillResult::Failed, missed.join("; "));
        }
        let refused = match (self.refused, &self.uncheckable) {
            (Some(t), _) => format!("the issuer refused the old token after {}", secs(t)),
            (None, Some(why)) => {
                format!("whether the issuer refuses the old token is unknown: {why}")
            }
            (None, None) => unreachable!("a refusal missing is a miss"),
        };
        let consumers = self
            .consumers_ready
            .map(|t| format!("every consumer held the new token after {}", secs(t)))
            .unwrap_or_default();
        let result = if self.uncheckable.is_some() {
            DrillResult::Unverified
        } else {
            DrillResult::Passed
        };
        (
            result,
            format!("{refused}; {consumers} (target {})", secs(target)),
        )
    }
}

impl Drills {
    pub fn new(
        client: Client,
        recorder: Recorder,
        metrics: Arc<Metrics>,
        usage: Arc<crate::usage::Tracker>,
        introspection: bool,
    ) -> Self {
        Drills {
            client,
            recorder,
            metrics,
            usage,
            introspection,
            active: Arc::default(),
        }
    }

    /// Starts measuring a drill (the reconcile revokes and replaces the
    /// token right after). `false`: too many drills are running; this one
    /// is recorded as not measured.
    pub fn start(&self, s: Start) -> bool {
        let key = (s.uid.clone(), s.id.clone());
        let refused = {
            let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
            if active.iter().any(|(u, i, _)| (u, i) == (&key.0, &key.1)) {
                return true;
            }
            let refused = refusal(active.iter().map(|(_, _, ns)| ns.as_str()), &s.namespace);
            if refused.is_none() {
                active.insert((key.0.clone(), key.1.clone(), s.namespace.clone()));
            }
            refused
        };
        let this = self.clone();
        if let Some(why) = refused {
            tokio::spawn(async move {
                let mut status = this.initial(&s, Timestamp::now());
                status.result = DrillResult::Failed;
                status.message = Some(format!(
                    "not measured: {why}; the token was still revoked and replaced"
                ));
                this.write(&s, &status).await;
            });
            return false;
        }
        tokio::spawn(async move {
            let ns = s.namespace.clone();
            this.run(s).await;
            this.active
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&(key.0, key.1, ns));
        });
        true
    }

    fn initial(&self, s: &Start, now: Timestamp) -> DrillStatus {
        DrillStatus {
            id: s.id.clone(),
            revision: s.revision,
            started_at: Time(crate::rotation::whole_seconds(now)),
            finished_at: None,
            revoked_ms: None,
            refused_ms: None,
            refused_by: None,
            consumers_ready_ms: None,
            used_after_revocation: false,
            target_ms: s.target.as_millis() as i64,
            result: DrillResult::Running,
            message: None,
        }
    }

    async fn run(&self, s: Start) {
        let started = Instant::now();
        let mut status = self.initial(&s, Timestamp::now());
        status.refused_by = Some(if s.backend.kind() == "jwt" {
            "the operator's introspection (services that verify with the JWKS alone accept it until it expires)".to_string()
        } else {
            s.backend.refusal_check().to_string()
        });
        self.write(&s, &status).await;
        // Waits for twice the target, at least a minute, at most 15.
        let give_up = (s.target * 2).clamp(Duration::from_secs(60), Duration::from_secs(900));
        let mut seen = Seen::default();
        let api: Api<AgentToken> = Api::namespaced(self.client.clone(), &s.namespace);
        let mut tick = tokio::time::interval(POLL);
        let timed_out = loop {
            tick.tick().await;
            let now = started.elapsed();
            let at = match api.get_opt(&s.name).await {
                Ok(Some(at)) if at.meta().uid.as_deref() == Some(s.uid.as_str()) => at,
                Ok(_) => {
                    info!(namespace = %s.namespace, agenttoken = %s.name, "the AgentToken of a drill is gone; the drill ends");
                    return;
                }
                Err(e) => {
                    warn!(namespace = %s.namespace, agenttoken = %s.name, error = %e, "a drill could not read its AgentToken");
                    continue;
                }
            };
            observe(&at, s.revision, now, &mut seen);
            // Asked only once the operator has revoked it: asking before
            // would be a use of the token, and kube-apiserver caches a
            // successful authentication for 10 s.
            if seen.revoked.is_some() && seen.refused.is_none() && seen.uncheckable.is_none() {
                let asked = if s.backend.kind() == "jwt" && self.introspection {
                    // The operator is this issuer's introspection endpoint:
                    // inactive once the tracker sees the token withdrawn.
                    Ok(self.introspection_refuses(&s.token))
                } else if s.backend.kind() == "jwt" {
                    Err("a jwt verified with the JWKS alone stays valid until it expires, and this operator serves no introspection (--usage-introspection-token-file)".into())
                } else {
                    s.backend.refuses(&s.token).await
                };
                match asked {
                    Ok(true) => seen.refused = Some(started.elapsed()),
                    Ok(false) => {}
                    // An issuer's words were shown the token: never
                    // keep the token in what is recorded.
                    Err(why) => {
                        use secrecy::ExposeSecret;
                        let token = s.token.expose_secret();
                        seen.uncheckable = Some(if token.is_empty() {
                            why
                        } else {
                            why.replace(token, "<token>")
                        })
                    }
                }
            }
            if seen.done() {
                break false;
            }
            if now >= give_up {
                break true;
            }
        };
        let (result, message) = seen.result(s.target, timed_out);
        let ms = |d: Option<Duration>| d.map(|d| d.as_millis() as i64);
        status.revoked_ms = ms(seen.revoked);
        status.refused_ms = ms(seen.refused);
        if let Some(why) = &seen.uncheckable {
            status.refused_by = Some(format!("not checked: {why}"));
        }
        status.consumers_ready_ms = ms(seen.consumers_ready);
        status.used_after_revocation = seen.used_after_revocation;
        status.finished_at = Some(Time(crate::rotation::whole_seconds(Timestamp::now())));
        status.result = result;
        status.message = Some(message.clone());
        let kind = s.backend.kind();
        for (phase, took) in [
            ("revoked", seen.revoked),
            ("refused", seen.refused),
            ("consumers_ready", seen.consumers_ready),
        ] {
            if let Some(t) = took {
                self.metrics.drill_phase(kind, phase, t);
            }
        }
        let label = match result {
            DrillResult::Passed => "Passed",
            DrillResult::Unverified => "Unverified",
            _ => "Failed",
        };
        self.metrics.drill(kind, label);
        info!(namespace = %s.namespace, agenttoken = %s.name, drill = %s.id, revision = s.revision, result = label, "drill finished");
        self.write(&s, &status).await;
        let (type_, reason) = match result {
            DrillResult::Failed => (EventType::Warning, Reason::DrillFailed),
            _ => (EventType::Normal, Reason::DrillPassed),
        };
        let event = Event {
            type_,
            reason: reason.as_str().into(),
            note: Some(format!(
                "drill {} on revision {}: {label}: {message}",
                s.id, s.revision
            )),
            action: "Drill".into(),
            secondary: None,
        };
        let reference = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some(AgentToken::api_version(&()).into()),
            kind: Some(AgentToken::kind(&()).into()),
            name: Some(s.name.clone()),
            namespace: Some(s.namespace.clone()),
            uid: Some(s.uid.clone()),
            ..Default::default()
        };
        if let Err(e) = self.recorder.publish(&event, &reference).await {
            warn!(error = %e, "could not publish the drill's Event");
        }
    }

    /// Whether the operator's introspection endpoint answers `active:
    /// false` for this jwt now (withdrawn, or no longer tracked at all).
    fn introspection_refuses(&self, token: &SecretString) -> bool {
        use secrecy::ExposeSecret;
        let id = crate::usage::jwt_credential(token.expose_secret());
        self.usage
            .credential(&id)
            .is_none_or(|c| c.withdrawn_at.is_some())
    }

    /// Whether this process measures drill `id` of the AgentToken `uid`.
    pub fn is_active(&self, uid: &str, id: &str) -> bool {
        self.active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|(u, i, _)| u == uid && i == id)
    }

    /// A drill `Running` in status that this process does not measure: it
    /// was interrupted (an operator restart, a leader change), and its old
    /// token went with the process that held it. Recorded as `Failed`.
    pub fn interrupted(&self, namespace: &str, name: &str, uid: &str, drill: &DrillStatus) {
        if self.is_active(uid, &drill.id) || drill.result != DrillResult::Running {
            return;
        }
        let mut status = drill.clone();
        status.result = DrillResult::Failed;
        status.finished_at = Some(Time(crate::rotation::whole_seconds(Timestamp::now())));
        status.message = Some(
            "interrupted: the operator that measured it stopped (restart or leader change); the token was still revoked and replaced, the rest was not measured"
                .into(),
        );
        let (this, ns, name, uid) = (
            self.clone(),
            namespace.to_string(),
            name.to_string(),
            uid.to_string(),
        );
        tokio::spawn(async move { this.write_to(&ns, &name, &uid, &status).await });
    }

    /// Writes `status.lastDrill` on the AgentToken `s` names (its UID).
    async fn write(&self, s: &Start, status: &DrillStatus) {
        self.write_to(&s.namespace, &s.name, &s.uid, status).await
    }

    async fn write_to(&self, namespace: &str, name: &str, uid: &str, status: &DrillStatus) {
        let written = crate::usage::patch_status_of(
            &self.client,
            namespace,
            name,
            uid,
            "lastDrill",
            status,
            DRILL_MANAGER,
        )
        .await;
        if let Err(e) = written {
            warn!(namespace, agenttoken = name, error = %e, "could not write the drill's status");
        }
    }
}

/// Why a new drill in `namespace` is not measured, given the namespaces
/// of the drills running (pure): the cluster-wide and the per-namespace
/// limits.
fn refusal<'a>(running: impl Iterator<Item = &'a str>, namespace: &str) -> Option<String> {
    let (mut all, mut here) = (0, 0);
    for ns in running {
        all += 1;
        here += usize::from(ns == namespace);
    }
    if all >= MAX_RUNNING {
        Some(format!("{MAX_RUNNING} drills were running"))
    } else if here >= MAX_RUNNING_PER_NAMESPACE {
        Some(format!(
            "{MAX_RUNNING_PER_NAMESPACE} drills were running in namespace {namespace}"
        ))
    } else {
        None
    }
}

/// What the AgentToken's status says of the drill's phases, `now` from its
/// start (pure).
pub fn observe(at: &AgentToken, revision: i64, now: Duration, seen: &mut Seen) {
    let Some(st) = at.status.as_ref() else {
        return;
    };
    let old = st.history.iter().find(|e| e.revision == revision);
    if seen.revoked.is_none()
        && old
            .is_some_and(|e| matches!(e.state, Some(TokenLife::Revoked | TokenLife::NotSupported)))
    {
        seen.revoked = Some(now);
    }
    // The new token delivered, and every consumer on it.
    let delivered = st.revision > revision
        && st
            .history
            .iter()
            .any(|e| e.revision == st.revision && e.state == Some(TokenLife::Live));
    if delivered && seen.consumers_ready.is_none() && seen.consumer_failed.is_none() {
        let on_new = st.consumers.iter().all(|c| c.revision >= st.revision);
        let failed = st.consumers.iter().find(|c| {
            c.revision >= st.revision
                && matches!(c.phase, ConsumerPhase::TimedOut | ConsumerPhase::Failed)
        });
        if let Some(c) = failed {
            seen.consumer_failed = Some(format!("{} {} is {:?}", c.kind, c.name, c.phase));
        } else if on_new && st.consumers.iter().all(|c| c.phase.settled()) {
            seen.consumers_ready = Some(now);
        }
    }
    seen.used_after_revocation |= st
        .usage
        .as_ref()
        .and_then(|u| u.tokens.iter().find(|t| t.revision == revision))
        .is_some_and(|t| t.requests_after_revocation > 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(60);

    #[test]
    fn one_namespace_drilling_everything_takes_its_share_only() {
        let flood = ["evil"; MAX_RUNNING_PER_NAMESPACE];
        assert!(
            refusal(flood.iter().copied(), "evil").is_some_and(|w| w.contains("namespace evil"))
        );
        assert_eq!(
            refusal(flood.iter().copied(), "good"),
            None,
            "another namespace still drills"
        );
        let full = ["a"; MAX_RUNNING];
        assert!(refusal(full.iter().copied(), "good").is_some());
    }

    #[test]
    fn a_drill_passes_only_when_every_phase_is_within_the_target() {
        let s = |secs: u64| Some(Duration::from_secs(secs));
        let base = Seen {
            revoked: s(1),
            refused: s(2),
            consumers_ready: s(20),
            ..Default::default()
        };
        assert_eq!(base.result(T, false).0, DrillResult::Passed);
        assert!(base.done());
        let rows: [(&str, Seen, DrillResult, &str); 5] = [
            (
                "slow refusal",
                Seen {
                    refused: s(61),
                    ..base.clone()
                },
                DrillResult::Failed,
                "after 61.0s, over the 60.0s target",
            ),
            (
                "never refused",
                Seen {
                    refused: None,
                    ..base.clone()
                },
                DrillResult::Failed,
                "still accepted",
            ),
            (
                "a consumer timed out",
                Seen {
                    consumer_failed: Some("Deployment agent is TimedOut".into()),
                    ..base.clone()
                },
                DrillResult::Failed,
                "did not get the new token",
            ),
            (
                "tried after revocation",
                Seen {
                    used_after_revocation: true,
                    ..base.clone()
                },
                DrillResult::Failed,
                "used after its revocation",
            ),
            (
                "refusal not checkable",
                Seen {
                    refused: None,
                    uncheckable: Some("no way to ask".into()),
                    ..base.clone()
                },
                DrillResult::Unverified,
                "unknown: no way to ask",
            ),
        ];
        for (what, seen, want, says) in rows {
            let (got, message) = seen.result(T, true);
            assert_eq!(got, want, "{what}: {message}");
            assert!(message.contains(says), "{what}: {message}");
        }
    }
}

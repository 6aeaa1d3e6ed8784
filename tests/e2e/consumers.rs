//! Consumers end to end: the workloads that use a token's Secret roll
//! before the previous token is revoked, on the real local control plane
//! (its Deployment and ReplicaSet controllers). The image `agent:local` is
//! on no node (a Pod of it never starts: Pending, or ErrImagePull on the
//! opt-in node), so a Deployment with 0 replicas is one whose rollout
//! completes and one with 1 replica is one whose rollout never does. Running
//! Pods are in node.rs.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};

use agent_token_operator::crd::{AgentToken, ConsumerPhase, RevocationState};

use crate::support::{Operator, SA_ISSUER, TestNamespace, applied, eventually};

fn agent_token(name: &str, grace: &str) -> String {
    format!(
        r#"
apiVersion: agenttoken.dev/v1alpha1
kind: AgentToken
metadata: {{name: {name}}}
spec:
  issuerRef: {{name: sa}}
  serviceAccountName: builder
  lifetime: 10m
  previousTokenGracePeriod: {grace}
"#
    )
}

/// A Deployment whose container reads the given Secrets through env.
fn deployment(name: &str, replicas: u32, secrets: &[&str], annotations: &str) -> String {
    let env: String = secrets
        .iter()
        .enumerate()
        .map(|(i, s)| {
            format!(
                "        - name: TOKEN_{i}\n          valueFrom: {{secretKeyRef: {{name: {s}, key: token}}}}\n"
            )
        })
        .collect();
    let env = if env.is_empty() {
        String::new()
    } else {
        format!("        env:\n{env}")
    };
    format!(
        r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
  annotations: {{{annotations}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      containers:
      - name: agent
        image: agent:local
{env}"#
    )
}

async fn wait_at<F>(ns: &TestNamespace, name: &str, what: &str, secs: u64, check: F) -> AgentToken
where
    F: Fn(&AgentToken) -> bool,
{
    let api: Api<AgentToken> = ns.api();
    eventually(Duration::from_secs(secs), what, || async {
        let at = api.get(name).await.ok()?;
        check(&at).then_some(at)
    })
    .await
}

fn consumer_phase(at: &AgentToken, name: &str) -> Option<(i64, ConsumerPhase)> {
    at.status
        .as_ref()?
        .consumers
        .iter()
        .find(|c| c.name == name)
        .map(|c| (c.revision, c.phase))
}

fn revoked_at(at: &AgentToken, revision: i64) -> Option<Timestamp> {
    at.status
        .as_ref()?
        .history
        .iter()
        .find(|h| h.revision == revision && h.revocation == RevocationState::Revoked)
        .and_then(|h| h.revoked_at.as_ref().map(|t| t.0))
}

fn issued_at(at: &AgentToken) -> Timestamp {
    at.status.as_ref().unwrap().issued_at.as_ref().unwrap().0
}

async fn replica_sets(ns: &TestNamespace, owner: &str) -> Vec<ReplicaSet> {
    let api: Api<ReplicaSet> = ns.api();
    api.list(&ListParams::default())
        .await
        .expect("list ReplicaSets")
        .items
        .into_iter()
        .filter(|rs| rs.owner_references().iter().any(|o| o.name == owner))
        .collect()
}

fn template_annotation(rs: &ReplicaSet, key: &str) -> Option<String> {
    rs.spec
        .as_ref()?
        .template
        .as_ref()?
        .metadata
        .as_ref()?
        .annotations
        .as_ref()?
        .get(key)
        .cloned()
}

async fn generation(ns: &TestNamespace, name: &str) -> i64 {
    let api: Api<Deployment> = ns.api();
    api.get(name)
        .await
        .unwrap()
        .metadata
        .generation
        .unwrap_or(0)
}

async fn rotate(ns: &TestNamespace, name: &str, value: &str) {
    let api: Api<AgentToken> = ns.api();
    let patch = serde_json::json!({"metadata": {"annotations": {"agenttoken.dev/rotate": value}}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("annotate");
}

async fn event_reasons(ns: &TestNamespace, involved: &str) -> Vec<(String, String)> {
    let api: Api<k8s_openapi::api::core::v1::Event> = ns.api();
    api.list(&ListParams::default())
        .await
        .expect("list events")
        .items
        .into_iter()
        .filter(|e| e.involved_object.name.as_deref() == Some(involved))
        .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
        .collect()
}

#[tokio::test]
async fn a_consuming_deployment_rolls_before_the_old_token_is_revoked() {
    let ns = TestNamespace::new("cons-roll").await;
    let _op = Operator::start_with(
        &ns.name,
        "solo",
        &[
            "--leader-election=false",
            "--restart-coalesce-window=1s",
            "--rollout-timeout=2m",
        ],
    );
    applied(&ns, SA_ISSUER);
    applied(&ns, &deployment("app", 0, &["bot"], ""));
    applied(
        &ns,
        &deployment(
            "opted-out",
            0,
            &["bot"],
            "agenttoken.dev/restart: \"false\"",
        ),
    );
    applied(&ns, &deployment("unrelated", 0, &[], ""));
    applied(&ns, &agent_token("bot", "0s"));

    // The initial token: app predates it, so it rolls to pick it up.
    wait_at(&ns, "bot", "app rolled out for revision 1", 60, |at| {
        consumer_phase(at, "app") == Some((1, ConsumerPhase::RolledOut))
    })
    .await;
    let before = replica_sets(&ns, "app").await.len();
    let opted_gen = generation(&ns, "opted-out").await;
    let unrelated_gen = generation(&ns, "unrelated").await;

    rotate(&ns, "bot", "1").await;
    let at = wait_at(&ns, "bot", "revision 1 revoked", 60, |at| {
        revoked_at(at, 1).is_some()
    })
    .await;
    // When revision 1 was revoked, app had already rolled out revision 2.
    assert_eq!(
        consumer_phase(&at, "app"),
        Some((2, ConsumerPhase::RolledOut)),
        "{:?}",
        at.status.as_ref().unwrap().consumers
    );
    let sets = replica_sets(&ns, "app").await;
    assert_eq!(
        sets.len(),
        before + 1,
        "one new ReplicaSet for the rotation"
    );
    let new_rs = sets
        .iter()
        .find(|rs| template_annotation(rs, "agenttoken.dev/revision-bot").as_deref() == Some("2"))
        .expect("a ReplicaSet whose template carries revision 2");
    let rs_created = new_rs.metadata.creation_timestamp.as_ref().unwrap().0;
    let revoked = revoked_at(&at, 1).unwrap();
    assert!(
        rs_created <= revoked,
        "new ReplicaSet at {rs_created}, old token revoked at {revoked}"
    );
    // Only one consumer is listed: opted-out and unrelated ones are not.
    let names: Vec<&str> = at
        .status
        .as_ref()
        .unwrap()
        .consumers
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(names, vec!["app"]);
    assert_eq!(generation(&ns, "opted-out").await, opted_gen);
    assert_eq!(generation(&ns, "unrelated").await, unrelated_gen);
    assert_eq!(replica_sets(&ns, "opted-out").await.len(), 1);
    assert_eq!(replica_sets(&ns, "unrelated").await.len(), 1);

    // Events are published right after the patch; give them a moment. (The
    // recorder folds repeats of one reason into a series, so the note is
    // the first restart's.)
    eventually(
        Duration::from_secs(10),
        "WorkloadRestarted events",
        || async {
            let on_token = event_reasons(&ns, "bot").await;
            let on_app = event_reasons(&ns, "app").await;
            (on_token
                .iter()
                .any(|(r, m)| r == "WorkloadRestarted" && m.contains("Deployment/app"))
                && on_app.iter().any(|(r, _)| r == "WorkloadRestarted"))
            .then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn a_rollout_that_never_completes_is_reported_and_the_old_token_still_goes() {
    let ns = TestNamespace::new("cons-stuck").await;
    let timeout = 8;
    let _op = Operator::start_with(
        &ns.name,
        "solo",
        &[
            "--leader-election=false",
            "--restart-coalesce-window=1s",
            &format!("--rollout-timeout={timeout}s"),
        ],
    );
    applied(&ns, SA_ISSUER);
    // One replica that can never become available (no kubelet).
    applied(&ns, &deployment("stuck", 1, &["bot"], ""));
    applied(&ns, &agent_token("bot", "0s"));
    wait_at(&ns, "bot", "stuck timed out for revision 1", 60, |at| {
        consumer_phase(at, "stuck") == Some((1, ConsumerPhase::TimedOut))
    })
    .await;

    rotate(&ns, "bot", "1").await;
    let at = wait_at(&ns, "bot", "revision 2 issued", 30, |at| {
        at.status.as_ref().is_some_and(|s| s.revision == 2)
    })
    .await;
    let rotated = issued_at(&at);
    let at = wait_at(&ns, "bot", "revision 1 revoked", 60, |at| {
        revoked_at(at, 1).is_some()
    })
    .await;
    let revoked = revoked_at(&at, 1).unwrap();
    // Without a grace period, only the rollout wait held the old token.
    let held = revoked.duration_since(rotated).as_secs_f64();
    assert!(
        held >= (timeout - 1) as f64,
        "old token revoked {held}s after rotation, before the {timeout}s rollout timeout"
    );
    let (rev, phase) = consumer_phase(&at, "stuck").unwrap();
    assert_eq!((rev, phase), (2, ConsumerPhase::TimedOut));
    let message = at.status.as_ref().unwrap().consumers[0]
        .message
        .clone()
        .unwrap_or_default();
    assert!(message.contains("did not complete"), "{message}");
    let events = event_reasons(&ns, "bot").await;
    assert!(
        events.iter().any(|(r, _)| r == "RolloutTimedOut"),
        "{events:?}"
    );
}

#[tokio::test]
async fn restarting_the_operator_restarts_nothing() {
    let ns = TestNamespace::new("cons-restart").await;
    let args = [
        "--leader-election=false",
        "--restart-coalesce-window=1s",
        "--rollout-timeout=2m",
    ];
    let mut op = Operator::start_with(&ns.name, "first", &args);
    applied(&ns, SA_ISSUER);
    applied(&ns, &deployment("app", 0, &["bot"], ""));
    // A long grace period keeps the previous token, so every reconcile
    // looks at the consumers again.
    applied(&ns, &agent_token("bot", "10m"));
    wait_at(&ns, "bot", "app rolled out for revision 1", 60, |at| {
        consumer_phase(at, "app") == Some((1, ConsumerPhase::RolledOut))
    })
    .await;
    rotate(&ns, "bot", "1").await;
    wait_at(&ns, "bot", "app rolled out for revision 2", 60, |at| {
        consumer_phase(at, "app") == Some((2, ConsumerPhase::RolledOut))
    })
    .await;
    let gen_before = generation(&ns, "app").await;
    let sets_before = replica_sets(&ns, "app").await.len();
    op.stop();

    let second = Operator::start_with(&ns.name, "second", &args);
    // Make the new operator reconcile (an unrelated annotation is a watch event).
    let api: Api<AgentToken> = ns.api();
    let patch = serde_json::json!({"metadata": {"annotations": {"example.com/touch": "1"}}});
    api.patch("bot", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "second operator ready", || async {
        matches!(second.http_get("/readyz").await, Some((200, _))).then_some(())
    })
    .await;
    // Well past the coalescing window and several consumer polls.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(generation(&ns, "app").await, gen_before, "no new rollout");
    assert_eq!(replica_sets(&ns, "app").await.len(), sets_before);
    let at = api.get("bot").await.unwrap();
    assert_eq!(
        consumer_phase(&at, "app"),
        Some((2, ConsumerPhase::RolledOut))
    );
    assert!(
        !second.logs().contains("rollout restart applied"),
        "the second operator restarted a workload"
    );
}

#[tokio::test]
async fn two_tokens_rotating_together_cause_one_rollout() {
    let ns = TestNamespace::new("cons-coalesce").await;
    let _op = Operator::start_with(
        &ns.name,
        "solo",
        &[
            "--leader-election=false",
            "--restart-coalesce-window=4s",
            "--rollout-timeout=2m",
        ],
    );
    applied(&ns, SA_ISSUER);
    applied(&ns, &deployment("app", 0, &["alpha", "beta"], ""));
    applied(&ns, &agent_token("alpha", "0s"));
    applied(&ns, &agent_token("beta", "0s"));
    for name in ["alpha", "beta"] {
        wait_at(&ns, name, "app rolled out for revision 1", 60, |at| {
            consumer_phase(at, "app") == Some((1, ConsumerPhase::RolledOut))
        })
        .await;
    }
    let gen_before = generation(&ns, "app").await;
    let sets_before = replica_sets(&ns, "app").await.len();

    rotate(&ns, "alpha", "1").await;
    rotate(&ns, "beta", "1").await;
    for name in ["alpha", "beta"] {
        wait_at(&ns, name, "app rolled out for revision 2", 60, |at| {
            consumer_phase(at, "app") == Some((2, ConsumerPhase::RolledOut))
        })
        .await;
    }
    assert_eq!(
        generation(&ns, "app").await,
        gen_before + 1,
        "both rotations were applied as one template change"
    );
    let sets = replica_sets(&ns, "app").await;
    assert_eq!(sets.len(), sets_before + 1, "one new ReplicaSet");
    let newest = sets
        .iter()
        .max_by_key(|rs| {
            rs.annotations()
                .get("deployment.kubernetes.io/revision")
                .and_then(|r| r.parse::<i64>().ok())
        })
        .unwrap();
    assert_eq!(
        template_annotation(newest, "agenttoken.dev/revision-alpha").as_deref(),
        Some("2")
    );
    assert_eq!(
        template_annotation(newest, "agenttoken.dev/revision-beta").as_deref(),
        Some("2")
    );
}

/// When our field manager last wrote the workload's template.
async fn restarted_at(ns: &TestNamespace, name: &str) -> Option<Timestamp> {
    let api: Api<Deployment> = ns.api();
    let d = api.get(name).await.ok()?;
    d.metadata
        .managed_fields?
        .into_iter()
        .find(|m| m.manager.as_deref() == Some("agent-token-operator-restarts"))
        .and_then(|m| m.time.map(|t| t.0))
}

#[tokio::test]
async fn the_restart_cap_lets_one_workload_roll_at_a_time() {
    let ns = TestNamespace::new("cons-cap").await;
    let timeout = 6;
    let _op = Operator::start_with(
        &ns.name,
        "solo",
        &[
            "--leader-election=false",
            "--restart-coalesce-window=1s",
            "--max-concurrent-restarts=1",
            &format!("--rollout-timeout={timeout}s"),
        ],
    );
    applied(&ns, SA_ISSUER);
    // Rollouts that never complete hold their slot until the timeout.
    applied(&ns, &deployment("first", 1, &["bot"], ""));
    applied(&ns, &deployment("second", 1, &["bot"], ""));
    applied(&ns, &agent_token("bot", "0s"));

    // While one rolls, the other waits its turn.
    wait_at(&ns, "bot", "one rolling, one queued", 30, |at| {
        let phases: Vec<ConsumerPhase> = ["first", "second"]
            .iter()
            .filter_map(|n| consumer_phase(at, n).map(|(_, p)| p))
            .collect();
        phases.contains(&ConsumerPhase::RollingOut) && phases.contains(&ConsumerPhase::Pending)
    })
    .await;
    // Both time out: the first while rolling, the second while queued (a
    // queued restart times out like a rollout, so the cap cannot keep the
    // previous token alive); the queued restart is still applied when the
    // first's slot frees.
    wait_at(&ns, "bot", "both timed out", 60, |at| {
        ["first", "second"]
            .iter()
            .all(|n| consumer_phase(at, n).is_some_and(|(_, p)| p == ConsumerPhase::TimedOut))
    })
    .await;
    let a = restarted_at(&ns, "first").await.expect("first restarted");
    let b = eventually(Duration::from_secs(30), "second restarted", || {
        restarted_at(&ns, "second")
    })
    .await;
    let gap = (b.duration_since(a)).abs().as_secs_f64();
    assert!(
        gap >= (timeout - 1) as f64,
        "the second restart came {gap}s after the first, inside the first's {timeout}s slot"
    );
}

#[tokio::test]
async fn signal_strategy_reports_what_it_did() {
    let ns = TestNamespace::new("cons-signal").await;
    let _op = Operator::start_with(
        &ns.name,
        "solo",
        &["--leader-election=false", "--restart-coalesce-window=1s"],
    );
    applied(&ns, SA_ISSUER);
    applied(&ns, &deployment("agent", 1, &["bot"], ""));
    applied(
        &ns,
        &format!(
            "{}  consumers:\n    strategy: Signal\n",
            agent_token("bot", "0s")
        ),
    );
    // Without a kubelet the Pod never runs: nothing to signal, said so, and
    // the workload's template is never touched by the Signal strategy.
    let at = wait_at(&ns, "bot", "agent signalled for revision 1", 60, |at| {
        consumer_phase(at, "agent") == Some((1, ConsumerPhase::Signaled))
    })
    .await;
    let message = at.status.as_ref().unwrap().consumers[0]
        .message
        .clone()
        .unwrap_or_default();
    assert!(message.contains("no running Pod"), "{message}");
    assert_eq!(generation(&ns, "agent").await, 1);
    assert!(restarted_at(&ns, "agent").await.is_none());
    // Settled consumers let the previous token go right after a rotation.
    rotate(&ns, "bot", "1").await;
    wait_at(&ns, "bot", "revision 1 revoked", 30, |at| {
        revoked_at(at, 1).is_some()
    })
    .await;
}

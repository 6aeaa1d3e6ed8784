//! With the opt-in node (`e2e/cluster up --node`: kube-scheduler, containerd,
//! Debian's runc, the kubelet): Pods really run, so a rollout restart is seen
//! as new running Pods that hold the new token, `Signal` as a SIGHUP that
//! makes the same process read the new token, and `helm install` as the
//! operator running as a Pod. The workload is the project's test agent
//! (e2e/node/agent), which logs a SHA-256 fingerprint of the token it read.

use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::ResourceExt;
use kube::api::{Api, ListParams, LogParams, Patch, PatchParams};
use sha2::{Digest, Sha256};

use agent_token_operator::crd::{AgentToken, ConsumerPhase};

use crate::helm::{chart, helm, ok};
use crate::support::{
    Operator, SA_ISSUER, TestNamespace, api_server, applied, cluster, eventually, free_port,
    repo_root,
};

/// Starts (or reuses) the node; every test here needs it.
pub(crate) fn node() {
    static NODE: OnceLock<()> = OnceLock::new();
    NODE.get_or_init(|| {
        cluster();
        let status = Command::new(repo_root().join("e2e/cluster"))
            .args(["up", "--node"])
            .status()
            .expect("run e2e/cluster up --node");
        assert!(status.success(), "e2e/cluster up --node failed: {status}");
    });
}

fn agent_token(name: &str, strategy: &str) -> String {
    format!(
        r#"
apiVersion: agenttoken.dev/v1alpha1
kind: AgentToken
metadata: {{name: {name}}}
spec:
  issuerRef: {{name: sa}}
  serviceAccountName: builder
  lifetime: 10m
  previousTokenGracePeriod: 0s
  consumers: {{strategy: {strategy}}}
"#
    )
}

/// The test agent, reading the Secret through a volume.
pub(crate) fn agent_deployment(name: &str, secret: &str) -> String {
    format!(
        r#"
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      terminationGracePeriodSeconds: 2
      containers:
      - name: agent
        image: agenttoken.local/agent:e2e
        imagePullPolicy: Never
        volumeMounts: [{{name: token, mountPath: /var/run/secrets/agenttoken, readOnly: true}}]
      volumes: [{{name: token, secret: {{secretName: {secret}}}}}]
"#
    )
}

/// The fingerprint the test agent logs for a token (never the token).
fn fingerprint(token: &[u8]) -> String {
    let hex: String = Sha256::digest(String::from_utf8_lossy(token).trim().as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    hex[..16].to_string()
}

async fn token_fingerprint(ns: &TestNamespace, secret: &str) -> Option<String> {
    let api: Api<Secret> = ns.api();
    let s = api.get(secret).await.ok()?;
    let token = s.data?.remove("token")?;
    Some(fingerprint(&token.0))
}

/// The running, not terminating Pods of a Deployment's selector.
async fn running_pods(ns: &TestNamespace, app: &str) -> Vec<Pod> {
    let api: Api<Pod> = ns.api();
    api.list(&ListParams::default().labels(&format!("app={app}")))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .collect()
}

async fn pod_log(ns: &TestNamespace, pod: &str) -> String {
    let api: Api<Pod> = ns.api();
    api.logs(pod, &LogParams::default())
        .await
        .unwrap_or_default()
}

/// Waits for exactly one running Pod of `app` that logged `line`; returns it.
async fn pod_that_logged(ns: &TestNamespace, app: &str, line: &str, secs: u64) -> Pod {
    eventually(
        Duration::from_secs(secs),
        &format!("one running Pod of {app} that logged {line:?}"),
        || async {
            let pods = running_pods(ns, app).await;
            if pods.len() != 1 {
                return None;
            }
            let pod = pods.into_iter().next()?;
            pod_log(ns, &pod.name_any())
                .await
                .contains(line)
                .then_some(pod)
        },
    )
    .await
}

async fn rotate(ns: &TestNamespace, name: &str) {
    let api: Api<AgentToken> = ns.api();
    let patch =
        serde_json::json!({"metadata": {"annotations": {"agenttoken.dev/rotate": "node-test"}}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("annotate");
}

async fn consumer(
    ns: &TestNamespace,
    at: &str,
    workload: &str,
    revision: i64,
    phase: ConsumerPhase,
) -> String {
    let api: Api<AgentToken> = ns.api();
    eventually(
        Duration::from_secs(90),
        &format!("consumer {workload} {phase:?} at revision {revision}"),
        || async {
            let at = api.get(at).await.ok()?;
            let c = at
                .status?
                .consumers
                .into_iter()
                .find(|c| c.name == workload && c.revision == revision && c.phase == phase)?;
            Some(c.message.unwrap_or_default())
        },
    )
    .await
}

/// An operator, AgentToken `bot` (consumer strategy `strategy`) and the test
/// agent Deployment `agent` reading it, once the agent's Pod runs and logged
/// the first token. Returns the operator, that token's fingerprint and the Pod.
async fn agent_running(
    ns: &TestNamespace,
    strategy: &str,
    operator_args: &[&str],
) -> (Operator, String, Pod) {
    node();
    let mut args = vec!["--leader-election=false"];
    args.extend_from_slice(operator_args);
    let op = Operator::start_with(&ns.name, "solo", &args);
    applied(ns, SA_ISSUER);
    applied(ns, &agent_token("bot", strategy));
    let first = eventually(Duration::from_secs(30), "first token", || {
        token_fingerprint(ns, "bot")
    })
    .await;
    applied(ns, &agent_deployment("agent", "bot"));
    let line = format!("start: loaded token sha256:{first}");
    let pod = pod_that_logged(ns, "agent", &line, 90).await;
    (op, first, pod)
}

fn restart_count(pod: &Pod) -> i32 {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map(|c| c.iter().map(|c| c.restart_count).sum())
        .unwrap_or(0)
}

#[tokio::test]
async fn node_rollout_restart_replaces_running_pods_that_then_hold_the_new_token() {
    let ns = TestNamespace::new("node-roll").await;
    let (_op, first, old_pod) = agent_running(
        &ns,
        "RolloutRestart",
        &["--restart-coalesce-window=1s", "--rollout-timeout=2m"],
    )
    .await;

    rotate(&ns, "bot").await;
    // RolledOut is decided from the Deployment's status, which a kubelet now
    // drives: the new Pod must have started and become ready.
    consumer(&ns, "bot", "agent", 2, ConsumerPhase::RolledOut).await;
    let second = token_fingerprint(&ns, "bot").await.expect("second token");
    assert_ne!(first, second, "rotation changed the token");
    let new_pod = pod_that_logged(
        &ns,
        "agent",
        &format!("start: loaded token sha256:{second}"),
        60,
    )
    .await;
    assert_ne!(
        new_pod.uid(),
        old_pod.uid(),
        "a new Pod replaced the old one"
    );
    let api: Api<Pod> = ns.api();
    eventually(Duration::from_secs(60), "old Pod gone", || async {
        api.get_opt(&old_pod.name_any())
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn node_signal_sends_sighup_and_the_same_process_reads_the_new_token() {
    let ns = TestNamespace::new("node-signal").await;
    let (_op, first, pod) = agent_running(&ns, "Signal", &[]).await;

    let started = Instant::now();
    rotate(&ns, "bot").await;
    let message = consumer(&ns, "bot", "agent", 2, ConsumerPhase::Signaled).await;
    assert!(
        message.contains("signalled 1 container(s) in 1 Pod(s)"),
        "{message}"
    );
    let second = token_fingerprint(&ns, "bot").await.expect("second token");
    assert_ne!(first, second);
    // The signal came after the kubelet had written the new token into the
    // volume (the operator annotates the Pod so the kubelet syncs it at once,
    // not after its 10 s sync period): the reload read the new token.
    let log = pod_log(&ns, &pod.name_any()).await;
    assert!(
        log.contains(&format!("SIGHUP: loaded token sha256:{second}")),
        "the agent reloaded on SIGHUP and read the new token; its log:\n{log}"
    );
    assert!(
        !log.contains(&format!("SIGHUP: loaded token sha256:{first}")),
        "{log}"
    );
    eprintln!(
        "rotation to Signaled with the new token read: {:?}",
        started.elapsed()
    );
    // Same process: no new Pod, no container restart.
    let pods = running_pods(&ns, "agent").await;
    assert_eq!(pods.len(), 1);
    assert_eq!(pods[0].uid(), pod.uid(), "the Pod was not replaced");
    assert_eq!(
        restart_count(&pods[0]),
        0,
        "the container was not restarted"
    );
}

/// Pushes the operator's image to the node's registry (once per test
/// process) and `helm install`s the chart into `ops`, serving `team`, with
/// `replicas` Pods that pull the image from there. The Pods use the host's
/// network (each serves metrics on a port of its own) and the API server's
/// loopback address. Returns the release and the chart's full name
/// (Deployment, Lease, ServiceAccount).
fn install_operator(
    ops: &TestNamespace,
    team: &TestNamespace,
    replicas: u32,
) -> (String, String, String) {
    crate::support::install_crds();
    let image = crate::release::pushed_image("0.0.0-e2e");
    let server = api_server();
    let api_port = server.rsplit(':').next().unwrap().to_string();
    let release = format!("ato-{}", &ops.name[ops.name.len() - 6..]);
    let metrics_port = free_port().to_string();
    let watch = format!("watchNamespaces={{{}}}", team.name);
    let metrics = format!("metrics.port={metrics_port}");
    let port_env = format!("extraEnv[1].value={api_port}");
    let replicas = format!("replicaCount={replicas}");
    ok(
        helm(&[
            "install",
            &release,
            chart().to_str().unwrap(),
            "-n",
            &ops.name,
            "--skip-crds",
            "--set",
            &watch,
            "--set",
            &format!("image.repository={}", image.repository),
            "--set",
            &format!("image.tag={}", image.tag),
            "--set",
            &replicas,
            "--set",
            "hostNetwork=true",
            "--set",
            &metrics,
            "--set",
            "extraEnv[0].name=KUBERNETES_SERVICE_HOST",
            "--set",
            "extraEnv[0].value=127.0.0.1",
            "--set",
            "extraEnv[1].name=KUBERNETES_SERVICE_PORT",
            "--set-string",
            &port_env,
        ]),
        "helm install",
    );
    let fullname = format!("{release}-agent-token-operator");
    (release, fullname, metrics_port)
}

#[tokio::test]
async fn node_helm_install_runs_the_operator_as_a_pod_that_mints() {
    node();
    let ops = TestNamespace::new("node-helm-ops").await;
    let team = TestNamespace::new("node-helm-team").await;
    let (release, fullname, metrics_port) = install_operator(&ops, &team, 1);

    // The chart's Deployment becomes available: its Pod passed /readyz.
    let deployments: Api<Deployment> = ops.api();
    eventually(
        Duration::from_secs(120),
        "the operator Deployment available",
        || async {
            let d = deployments.get(&fullname).await.ok()?;
            (d.status?.available_replicas? == 1).then_some(())
        },
    )
    .await;
    let pods: Api<Pod> = ops.api();
    let pod = pods
        .list(&ListParams::default().labels("app.kubernetes.io/name=agent-token-operator"))
        .await
        .unwrap()
        .items
        .into_iter()
        .next()
        .expect("the operator Pod");

    // It does its job: the team's AgentToken gets a token.
    applied(&team, SA_ISSUER);
    applied(&team, &agent_token("bot", "RolloutRestart"));
    eventually(Duration::from_secs(60), "token minted by the Pod", || {
        token_fingerprint(&team, "bot")
    })
    .await;
    let ats: Api<AgentToken> = team.api();
    eventually(Duration::from_secs(30), "AgentToken Ready", || async {
        let at = ats.get("bot").await.ok()?;
        at.status?
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
            .then_some(())
    })
    .await;
    // ... and it was the Pod: it holds the leader Lease.
    let leases: Api<Lease> = ops.api();
    let holder = leases
        .get(&fullname)
        .await
        .expect("leader Lease")
        .spec
        .and_then(|s| s.holder_identity)
        .unwrap_or_default();
    assert_eq!(holder, pod.name_any(), "the operator Pod holds the Lease");
    // The kubelet got the image from the node's registry (the first install
    // of a test process pulls it; later ones find it present).
    let image = crate::release::pushed_image("0.0.0-e2e").reference();
    let pulled = crate::release::pulled_events(&ops).await;
    assert!(
        pulled
            .iter()
            .any(|(p, m)| *p == pod.name_any() && m.contains(&format!("\"{image}\""))),
        "a Pulled Event for {image}: {pulled:?}"
    );
    let log = pod_log(&ops, &pod.name_any()).await;
    assert!(!log.is_empty(), "the operator Pod logs");

    // The chart's admission policy puts the finalizer on as an AgentToken
    // is admitted: the tenant's AgentToken comes back from its create with
    // it (a finalizer of the tenant's own is kept beside it), and the
    // operator never patches an AgentToken to add it.
    crate::hostile::tenant(&team).await;
    let yaml = agent_token("bot2", "RolloutRestart").replacen(
        "metadata: {name: bot2}",
        "metadata: {name: bot2, finalizers: [example.com/tenant]}",
        1,
    );
    assert!(yaml.contains("example.com/tenant"), "{yaml}");
    let out = crate::support::kubectl_stdin(
        &crate::support::cluster().restricted_kubeconfig,
        Some(&team.name),
        &["create", "-o", "json"],
        &yaml,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let created: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        created["metadata"]["finalizers"],
        serde_json::json!(["example.com/tenant", "agenttoken.dev/revoke"]),
        "finalizers as admitted"
    );
    eventually(Duration::from_secs(60), "bot2's token minted", || {
        token_fingerprint(&team, "bot2")
    })
    .await;
    let metrics = reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .await
        .expect("the operator Pod's metrics")
        .text()
        .await
        .unwrap();
    let requests: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("agenttoken_kube_api_requests_total"))
        .collect();
    assert!(
        requests.iter().any(|l| l.contains("resource=\"secrets\"")),
        "the operator's request counter: {requests:?}"
    );
    let patches: Vec<&&str> = requests
        .iter()
        .filter(|l| l.contains("resource=\"agenttokens\"") && l.contains("verb=\"patch\""))
        .collect();
    assert!(
        patches.iter().all(|l| l.ends_with(" 0")),
        "the operator patched AgentTokens: {patches:?}"
    );

    ok(
        helm(&[
            "uninstall",
            &release,
            "-n",
            &ops.name,
            "--wait",
            "--timeout",
            "60s",
        ]),
        "helm uninstall",
    );
}

/// A tenant aims `Signal` (TERM) at a workload that does not use its Secret,
/// through `restart: Selected`: nothing reaches it (same Pod, no restart, no
/// signal in its log), on the real node.
#[tokio::test]
async fn node_signal_aimed_at_a_workload_that_does_not_use_the_secret_touches_nothing() {
    let ns = TestNamespace::new("node-aim").await;
    let (_op, _first, _pod) = agent_running(&ns, "Signal", &[]).await;
    // A bystander reading a Secret of its own, running before the attack.
    applied(
        &ns,
        "apiVersion: v1\nkind: Secret\nmetadata: {name: own}\nstringData: {token: bystander-value}\n",
    );
    applied(&ns, &agent_deployment("bystander", "own"));
    let line = format!(
        "start: loaded token sha256:{}",
        fingerprint(b"bystander-value")
    );
    let target = pod_that_logged(&ns, "bystander", &line, 90).await;
    crate::hostile::tenant(&ns).await;
    let out = crate::hostile::apply_as_tenant(
        &ns.name,
        r#"
apiVersion: agenttoken.dev/v1alpha1
kind: AgentToken
metadata: {name: aimer}
spec:
  issuerRef: {name: sa}
  serviceAccountName: builder
  lifetime: 10m
  previousTokenGracePeriod: 0s
  consumers:
    restart: Selected
    selector: {matchLabels: {app: bystander}}
    strategy: Signal
    signal: {signal: TERM, container: agent}
"#,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let api: Api<AgentToken> = ns.api();
    eventually(Duration::from_secs(30), "aimer minted", || async {
        (api.get("aimer").await.ok()?.status?.revision == 1).then_some(())
    })
    .await;
    rotate(&ns, "aimer").await;
    let at = eventually(Duration::from_secs(45), "aimer rotated", || async {
        let at = api.get("aimer").await.ok()?;
        (at.status.as_ref()?.revision == 2).then_some(at)
    })
    .await;
    // Give a signal, had one been sent, time to land.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        at.status.unwrap().consumers.is_empty(),
        "no consumer selected: the bystander does not use the Secret"
    );
    let pods = running_pods(&ns, "bystander").await;
    assert_eq!(pods.len(), 1);
    assert_eq!(pods[0].uid(), target.uid(), "the Pod was not replaced");
    assert_eq!(
        restart_count(&pods[0]),
        0,
        "the container was not restarted"
    );
    let log = pod_log(&ns, &target.name_any()).await;
    assert!(
        !log.contains("SIG"),
        "no signal reached the bystander: {log}"
    );
}

/// An AgentToken that rotates without restarting anything and revokes the
/// old token at once (each revocation deletes the old binding Secret).
fn quiet_agent_token(name: &str) -> String {
    format!(
        r#"
apiVersion: agenttoken.dev/v1alpha1
kind: AgentToken
metadata: {{name: {name}}}
spec:
  issuerRef: {{name: sa}}
  serviceAccountName: builder
  lifetime: 10m
  previousTokenGracePeriod: 0s
  consumers: {{restart: None}}
"#
    )
}

/// Two operator Pods, `<fullname>-a` and `-b`, made from the chart's Pod
/// template (its ServiceAccount, RBAC, leader election on), each on its own
/// metrics port: on the host's network one port serves one Pod. Bare Pods,
/// so a deleted one is not replaced. The chart's Deployment is scaled to 0.
async fn two_operator_pods(ops: &TestNamespace, fullname: &str) -> [String; 2] {
    let deployments: Api<Deployment> = ops.api();
    deployments
        .patch(
            fullname,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"replicas": 0}})),
        )
        .await
        .expect("scale the chart's Deployment to 0");
    let template = deployments
        .get(fullname)
        .await
        .expect("the chart's Deployment")
        .spec
        .unwrap()
        .template;
    let pods: Api<Pod> = ops.api();
    let mut names = Vec::new();
    for suffix in ["a", "b"] {
        let name = format!("{fullname}-{suffix}");
        let mut spec = template.spec.clone().expect("a Pod template");
        let port = free_port();
        let c = &mut spec.containers[0];
        for arg in c.args.iter_mut().flatten() {
            if arg.starts_with("--metrics-address=") {
                *arg = format!("--metrics-address=0.0.0.0:{port}");
            }
        }
        for p in c.ports.iter_mut().flatten() {
            p.container_port = i32::from(port);
            p.host_port = None;
        }
        spec.termination_grace_period_seconds = Some(30);
        let pod = Pod {
            metadata: kube::api::ObjectMeta {
                name: Some(name.clone()),
                labels: Some([("app".to_string(), format!("{fullname}-ha"))].into()),
                ..Default::default()
            },
            spec: Some(spec),
            status: None,
        };
        pods.create(&Default::default(), &pod)
            .await
            .expect("create an operator Pod");
        names.push(name);
    }
    [names[0].clone(), names[1].clone()]
}

async fn lease_holder(ops: &TestNamespace, lease: &str) -> Option<String> {
    let leases: Api<Lease> = ops.api();
    leases.get(lease).await.ok()?.spec?.holder_identity
}

async fn revisions(ns: &TestNamespace, names: &[String]) -> Vec<i64> {
    let api: Api<AgentToken> = ns.api();
    let mut out = Vec::new();
    for n in names {
        out.push(
            api.get(n)
                .await
                .ok()
                .and_then(|a| a.status)
                .map_or(0, |s| s.revision),
        );
    }
    out
}

/// Two operator replicas run as Pods on the node with leader election.
/// While several AgentTokens are forced to rotate again and again, the
/// leader Pod is deleted: the standby takes the Lease over and the
/// rotations go on. No revision is minted twice: a mint by the
/// serviceAccount issuer creates the binding Secret
/// `<agenttoken>-binding-r<revision>` (a second mint of one revision
/// deletes and recreates it), so every creation is watched and each name
/// must have been created exactly once, for exactly the revisions the
/// ledger (`status.history`) records, with distinct fingerprints.
#[tokio::test]
async fn node_leader_pod_deleted_during_rotations_hands_over_without_minting_a_revision_twice() {
    use futures::StreamExt;
    use kube::runtime::watcher;
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::{Arc, Mutex};

    const TOKENS: usize = 4;
    const ROUNDS: i64 = 6;
    const HANDOVER_ROUND: i64 = 3;

    node();
    let ops = TestNamespace::new("node-ha-ops").await;
    let team = TestNamespace::new("node-ha-team").await;
    let (release, fullname, _) = install_operator(&ops, &team, 1);
    let _uninstall = crate::helm::Uninstall(release, ops.name.clone());
    let [pod_a, pod_b] = two_operator_pods(&ops, &fullname).await;
    let (leader, standby) = eventually(
        Duration::from_secs(120),
        "one of the two operator Pods holds the Lease, the other runs",
        || async {
            let holder = lease_holder(&ops, &fullname).await?;
            let other = if holder == pod_a {
                pod_b.clone()
            } else if holder == pod_b {
                pod_a.clone()
            } else {
                return None;
            };
            let pods: Api<Pod> = ops.api();
            let running = pods.get(&other).await.ok()?.status?.phase? == "Running";
            running.then_some((holder, other))
        },
    )
    .await;

    // Every binding Secret created in the team's namespace, by name: the
    // UIDs seen (a name created twice has two).
    let created: Arc<Mutex<BTreeMap<String, BTreeSet<String>>>> = Arc::default();
    let (synced_tx, synced_rx) = tokio::sync::oneshot::channel();
    let watch = tokio::spawn({
        let created = created.clone();
        let secrets: Api<Secret> = team.api();
        async move {
            let mut synced_tx = Some(synced_tx);
            let config = watcher::Config::default().labels("agenttoken.dev/role=token-binding");
            let mut events = std::pin::pin!(watcher(secrets, config));
            while let Some(event) = events.next().await {
                match event {
                    Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => {
                        created
                            .lock()
                            .unwrap()
                            .entry(s.name_any())
                            .or_default()
                            .insert(s.uid().unwrap_or_default());
                    }
                    Ok(watcher::Event::InitDone) => {
                        if let Some(tx) = synced_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    _ => {}
                }
            }
        }
    });
    synced_rx.await.expect("the binding watch started");

    applied(&team, SA_ISSUER);
    let names: Vec<String> = (0..TOKENS).map(|i| format!("bot-{i}")).collect();
    for n in &names {
        applied(&team, &quiet_agent_token(n));
    }
    // A round that does not settle stops the rounds; the checks below
    // then say first whether a revision was minted twice.
    let mut stalled = None;
    if !all_at_least(&team, &names, 1, Duration::from_secs(60)).await {
        stalled = Some("the first tokens".to_string());
    }
    let ats: Api<AgentToken> = team.api();
    for round in 1..=ROUNDS {
        if stalled.is_some() {
            break;
        }
        for n in &names {
            let patch = serde_json::json!({"metadata": {"annotations": {
                "agenttoken.dev/rotate": format!("round-{round}")
            }}});
            ats.patch(n, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .expect("annotate");
        }
        if round == HANDOVER_ROUND {
            // Mid-way, with this round's rotations in flight: the leader
            // Pod goes, as in a node drain or a rollout.
            let pods: Api<Pod> = ops.api();
            pods.delete(&leader, &Default::default())
                .await
                .expect("delete the leader Pod");
        }
        if !all_at_least(&team, &names, round + 1, Duration::from_secs(120)).await {
            stalled = Some(format!("round {round}"));
        }
        if round == HANDOVER_ROUND {
            let holder = lease_holder(&ops, &fullname).await.unwrap_or_default();
            eprintln!("round {round}: the Lease is held by {holder:?}");
        }
    }

    // Give a late duplicate, had there been one, time to show.
    tokio::time::sleep(Duration::from_secs(5)).await;
    watch.abort();
    let created = created.lock().unwrap().clone();
    let twice: Vec<(&String, &BTreeSet<String>)> =
        created.iter().filter(|(_, uids)| uids.len() > 1).collect();
    assert!(
        twice.is_empty(),
        "binding Secrets created more than once, i.e. revisions minted twice: {twice:?}"
    );
    assert_eq!(stalled, None, "rotations stalled");

    // The standby took over (the rounds after the deletion were its own).
    assert_eq!(
        lease_holder(&ops, &fullname).await.as_deref(),
        Some(standby.as_str()),
        "the standby holds the Lease"
    );
    let log = pod_log(&ops, &standby).await;
    assert!(log.contains("became leader"), "the standby led: {log}");
    let pods: Api<Pod> = ops.api();
    assert!(
        pods.get_opt(&leader)
            .await
            .unwrap()
            .is_none_or(|p| p.metadata.deletion_timestamp.is_some()),
        "the old leader Pod is going"
    );

    // The ledger and the bindings agree: one mint per revision.
    let mut counted = 0;
    for at in ats.list(&ListParams::default()).await.unwrap() {
        let name = at.name_any();
        let st = at.status.unwrap();
        assert_eq!(st.revision, ROUNDS + 1, "{name}: one revision per rotation");
        let revs: Vec<i64> = st.history.iter().map(|h| h.revision).collect();
        assert!(
            revs.windows(2).all(|w| w[0] < w[1]) || revs.windows(2).all(|w| w[0] > w[1]),
            "{name}: the ledger's revisions are strictly ordered: {revs:?}"
        );
        let mut sorted = revs.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            (1..=ROUNDS + 1).collect::<Vec<_>>(),
            "{name}: one ledger entry per revision"
        );
        let fingerprints: BTreeSet<&str> =
            st.history.iter().map(|h| h.fingerprint.as_str()).collect();
        assert_eq!(
            fingerprints.len(),
            st.history.len(),
            "{name}: every revision is another token"
        );
        for rev in 1..=ROUNDS + 1 {
            let binding = format!("{name}-binding-r{rev}");
            let uids = created.get(&binding).cloned().unwrap_or_default();
            assert_eq!(
                uids.len(),
                1,
                "{binding}: revision {rev} of {name} was minted exactly once (creations seen: {uids:?})"
            );
            counted += 1;
        }
    }
    assert_eq!(
        created.len(),
        counted,
        "no binding beyond the revisions the ledger records: {:?}",
        created.keys().collect::<Vec<_>>()
    );
    assert_eq!(counted, TOKENS * (ROUNDS as usize + 1));
}

/// Whether every AgentToken in `names` reaches at least `revision` within
/// `timeout` (at least: the checks after tell a revision minted twice).
async fn all_at_least(
    ns: &TestNamespace,
    names: &[String],
    revision: i64,
    timeout: Duration,
) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if revisions(ns, names).await.iter().all(|r| *r >= revision) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

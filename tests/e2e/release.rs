//! The release path, as a user meets it, on the node (`e2e/cluster up
//! --node`): the operator image built by `hack/image` (what `make image`
//! runs, here from the test's binary) and pushed with skopeo to the node's
//! own registry (the CNCF distribution registry from Debian, TLS with a CA
//! the cluster script made, trusted by containerd for that host only); the
//! kubelet pulls it from there through the chart's `image.repository`; the
//! chart itself is an OCI artifact in the same registry, installed, upgraded
//! and rolled back with `helm` from `oci://`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Event, Pod, Secret};
use kube::ResourceExt;
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;

use agent_token_operator::crd::AgentToken;

use crate::helm::{chart, helm, ok};
use crate::support::{TestNamespace, applied, eventually, random_suffix, repo_root};
use crate::webhook::StandIn;

/// The node's registry: `HOST:PORT` and the CA file its certificate chains to.
pub(crate) struct Registry {
    pub host: String,
    pub ca: PathBuf,
}

pub(crate) fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        crate::node::node();
        let w = crate::support::cluster_words("registry");
        assert_eq!(w.len(), 2, "registry address and CA file: {w:?}");
        Registry {
            host: w[0].clone(),
            ca: PathBuf::from(&w[1]),
        }
    })
}

/// Where Pods on the node reach the API server: (address, port).
pub(crate) fn pod_api() -> (String, String) {
    let w = crate::support::cluster_words("pod-api");
    assert_eq!(w.len(), 2, "address and port: {w:?}");
    (w[0].clone(), w[1].clone())
}

fn skopeo(args: &[&str]) -> Output {
    Command::new("skopeo")
        .args(args)
        .output()
        .expect("run skopeo")
}

/// An image pushed to the node's registry: `repository:tag` and its digest.
#[derive(Clone)]
pub(crate) struct Pushed {
    pub repository: String,
    pub tag: String,
    pub digest: String,
}

impl Pushed {
    pub fn reference(&self) -> String {
        format!("{}:{}", self.repository, self.tag)
    }
}

/// Builds the operator's image from this test binary's operator with
/// `hack/image build` (labels say `version`) and pushes it to the node's
/// registry as `agent-token-operator:<version>-<random>`: a tag no earlier
/// run used, so the node has to pull it. Once per version and test process.
pub(crate) fn pushed_image(version: &str) -> Pushed {
    static PUSHED: Mutex<BTreeMap<String, Pushed>> = Mutex::new(BTreeMap::new());
    let mut pushed = PUSHED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = pushed.get(version) {
        return p.clone();
    }
    let reg = registry();
    let dir = repo_root().join("target/e2e-image");
    std::fs::create_dir_all(&dir).unwrap();
    let archive = dir.join(format!("agent-token-operator-{version}.oci.tar"));
    let digest = ok(
        Command::new(repo_root().join("hack/image"))
            .args([
                "build",
                "--binary",
                env!("CARGO_BIN_EXE_agent-token-operator"),
            ])
            .args(["--version", version, "--out"])
            .arg(&archive)
            .output()
            .expect("run hack/image"),
        "hack/image build",
    )
    .trim()
    .to_string();
    assert!(digest.starts_with("sha256:"), "a manifest digest: {digest}");
    let p = Pushed {
        repository: format!("{}/agent-token-operator", reg.host),
        tag: format!("{version}-{}", random_suffix()),
        digest,
    };
    ok(
        skopeo(&[
            "copy",
            "--quiet",
            "--dest-cert-dir",
            reg.ca.parent().unwrap().to_str().unwrap(),
            &format!("oci-archive:{}:{version}", archive.display()),
            &format!("docker://{}", p.reference()),
        ]),
        "skopeo copy to the registry",
    );
    pushed.insert(version.to_string(), p.clone());
    p
}

/// The kubelet's Pulled Events for Pods in `ns`, as (Pod, message).
pub(crate) async fn pulled_events(ns: &TestNamespace) -> Vec<(String, String)> {
    let events: Api<Event> = ns.api();
    events
        .list(&ListParams::default().fields("reason=Pulled"))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .map(|e| {
            (
                e.involved_object.name.unwrap_or_default(),
                e.message.unwrap_or_default(),
            )
        })
        .collect()
}

/// Waits until the kubelet says it pulled `image` (not "already present")
/// for a Pod in `ns`; returns the Pod's name.
pub(crate) async fn pulled(ns: &TestNamespace, image: &str) -> String {
    let wanted = format!("Successfully pulled image \"{image}\"");
    eventually(
        Duration::from_secs(120),
        &format!("the kubelet's Pulled Event for {image}"),
        || async {
            pulled_events(ns)
                .await
                .into_iter()
                .find(|(_, m)| m.starts_with(&wanted))
                .map(|(pod, _)| pod)
        },
    )
    .await
}

/// `helm package` of the repository's chart as `version`, whose image tag
/// defaults to `app_version`; returns the archive.
fn package(dir: &Path, version: &str, app_version: &str) -> PathBuf {
    ok(
        helm(&[
            "package",
            chart().to_str().unwrap(),
            "--version",
            version,
            "--app-version",
            app_version,
            "-d",
            dir.to_str().unwrap(),
        ]),
        "helm package",
    );
    dir.join(format!("agent-token-operator-{version}.tgz"))
}

/// The image of the chart's Deployment and how many of its replicas are
/// updated and available.
/// Waits until the Deployment's own status shows both replicas updated and
/// available on `image`. `helm --wait` returns once the new ReplicaSet's Pods
/// are ready; the Deployment controller copies that into the Deployment's
/// status a moment later, so the test allows it 30 s to catch up.
async fn rolled_out(ops: &TestNamespace, name: &str, image: &str) {
    let mut last = None;
    let settled = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let now = rollout(ops, name).await;
            if now
                .as_ref()
                .is_some_and(|(i, u, a)| i == image && (*u, *a) == (2, 2))
            {
                return;
            }
            last = now;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(
        settled.is_ok(),
        "the Deployment never showed two replicas updated and available on {image}; last (image, updated, available): {last:?}"
    );
}

async fn rollout(ops: &TestNamespace, name: &str) -> Option<(String, i32, i32)> {
    let d = Api::<Deployment>::namespaced(ops.client.clone(), &ops.name)
        .get(name)
        .await
        .ok()?;
    let image = d.spec.as_ref()?.template.spec.as_ref()?.containers[0]
        .image
        .clone()?;
    let s = d.status?;
    (s.observed_generation == d.metadata.generation).then_some((
        image,
        s.updated_replicas.unwrap_or(0),
        s.available_replicas.unwrap_or(0),
    ))
}

/// Waits until exactly one running operator Pod carries the usage leader
/// label, it is the Lease holder, and the usage Service's endpoints are
/// that Pod alone: a standby (which does not listen) receives nothing.
async fn usage_goes_to_the_leader_alone(ops: &TestNamespace, fullname: &str) {
    use k8s_openapi::api::coordination::v1::Lease;
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    let mut last = String::new();
    let settled = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let labeled: Vec<Pod> = operator_pods(ops)
                .await
                .into_iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .filter(|p| p.labels().get(agent_token_operator::usage::LEADER_LABEL).map(String::as_str) == Some("true"))
                .collect();
            let holder = ops
                .api::<Lease>()
                .get(fullname)
                .await
                .ok()
                .and_then(|l| l.spec?.holder_identity);
            let endpoints: Vec<String> = ops
                .api::<EndpointSlice>()
                .list(&ListParams::default().labels(&format!(
                    "kubernetes.io/service-name={fullname}-usage"
                )))
                .await
                .map(|l| l.items)
                .unwrap_or_default()
                .into_iter()
                .flat_map(|s| s.endpoints)
                .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
                .flat_map(|e| e.addresses)
                .collect();
            let names: Vec<String> = labeled.iter().map(|p| p.name_any()).collect();
            let ips: Vec<String> = labeled
                .iter()
                .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
                .collect();
            if names.len() == 1 && holder.as_ref() == Some(&names[0]) && endpoints == ips {
                return;
            }
            last = format!("labeled {names:?} (IPs {ips:?}), Lease holder {holder:?}, usage endpoints {endpoints:?}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
    .await;
    assert!(
        settled.is_ok(),
        "the usage Service does not reach the leader alone: {last}"
    );
}

async fn operator_pods(ops: &TestNamespace) -> Vec<Pod> {
    Api::<Pod>::namespaced(ops.client.clone(), &ops.name)
        .list(&ListParams::default().labels("app.kubernetes.io/name=agent-token-operator"))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
}

/// A webhook TokenIssuer `minter` on the stand-in (ids, the default body
/// naming namespace, AgentToken and revision).
async fn webhook_issuer(ns: &TestNamespace, stand_in: &StandIn) {
    let s: Secret = serde_json::from_value(json!({
        "metadata": {"name": "minter-auth"},
        "stringData": {"authorization": stand_in.authorization()},
    }))
    .unwrap();
    ns.api::<Secret>()
        .create(&PostParams::default(), &s)
        .await
        .unwrap();
    let issuer = json!({
        "apiVersion": "agenttoken.dev/v1alpha1",
        "kind": "TokenIssuer",
        "metadata": {"name": "minter"},
        "spec": {
            "webhook": {
                "url": stand_in.url("/mint"),
                "authorizationSecretRef": {"name": "minter-auth", "key": "authorization"},
                "result": {"tokenPath": "$.data.token", "expiresInPath": "$.data.ttl", "idPath": "$.data.id"},
                "revokeURL": stand_in.url("/revoke"),
            },
            "policy": {"maxLifetime": "2h"},
        },
    });
    applied(ns, &issuer.to_string());
}

fn agent_token(name: &str) -> AgentToken {
    serde_json::from_value(json!({
        "apiVersion": "agenttoken.dev/v1alpha1",
        "kind": "AgentToken",
        "metadata": {"name": name},
        "spec": {"issuerRef": {"name": "minter"}, "lifetime": "1h", "consumers": {"restart": "None"}},
    }))
    .unwrap()
}

/// The chart from `oci://` on the node's registry, each chart and image
/// signed with cosign and verified before it is used: installed at 1.0.0 with
/// two replicas (Pods on the Pod network, the image pulled from the
/// registry), upgraded to 1.0.1 (another image), rolled back to revision 1,
/// while AgentTokens keep arriving, one every 300 ms. Every one of them ends
/// Ready with a token the webhook stand-in issued for it exactly once: no
/// token minted twice across the leader hand-overs, none missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_oci_chart_installs_upgrades_and_rolls_back_with_two_replicas_minting_throughout_webhook_stand_in()
 {
    let reg = registry();
    crate::support::install_crds();
    let v1 = pushed_image("1.0.0-e2e");
    let v2 = pushed_image("1.0.1-e2e");
    assert_ne!(
        v1.digest, v2.digest,
        "the two versions are different images"
    );
    let ops = TestNamespace::new("rel-ops").await;
    let team = TestNamespace::new("rel-team").await;

    // The chart, as two OCI artifacts in a repository of this run's own.
    let dir = repo_root().join(format!("target/e2e-chart/{}", ops.name));
    std::fs::create_dir_all(&dir).unwrap();
    let charts = format!("oci://{}/{}/charts", reg.host, ops.name);
    let ca = reg.ca.to_str().unwrap();
    let chart_ref = format!("{charts}/agent-token-operator");
    // Each image and chart is signed by digest with a key made now, as the
    // release workflow does; each is verified before it is installed.
    let signer = Signer::new();
    for (version, image) in [("1.0.0", &v1), ("1.0.1", &v2)] {
        let archive = package(&dir, version, &image.tag);
        let digest = push_chart(&archive, &charts);
        signer.sign(&format!(
            "{}@{digest}",
            chart_ref.trim_start_matches("oci://")
        ));
        signer.sign(&format!("{}@{}", image.repository, image.digest));
    }
    let verified = |reference: &str| {
        let reference = reference.trim_start_matches("oci://");
        ok(
            signer.verify(reference),
            &format!("cosign verify {reference}"),
        );
    };

    // Introspection on, so the chart makes the usage Service: its TLS
    // Secret (the local cluster's usage certificate) and a bearer token
    // made now.
    let w = crate::support::cluster_words("usage");
    let usage_tls: Secret = serde_json::from_value(json!({
        "metadata": {"name": "usage-tls"},
        "type": "kubernetes.io/tls",
        "stringData": {
            "tls.crt": std::fs::read_to_string(&w[1]).unwrap(),
            "tls.key": std::fs::read_to_string(&w[2]).unwrap(),
        },
    }))
    .unwrap();
    let intro: Secret = serde_json::from_value(json!({
        "metadata": {"name": "usage-intro"},
        "stringData": {"tokens": hex::encode(rand::random::<[u8; 16]>())},
    }))
    .unwrap();
    for s in [usage_tls, intro] {
        ops.api::<Secret>()
            .create(&PostParams::default(), &s)
            .await
            .unwrap();
    }

    let (api_host, api_port) = pod_api();
    let release = format!("rel-{}", &ops.name[ops.name.len() - 6..]);
    let fullname = format!("{release}-agent-token-operator");
    let watch = format!("watchNamespaces={{{}}}", team.name);
    let repository = format!("image.repository={}", v1.repository);
    let host_env = format!("extraEnv[0].value={api_host}");
    let port_env = format!("extraEnv[1].value={api_port}");
    let common: Vec<&str> = vec![
        "-n",
        &ops.name,
        "--ca-file",
        ca,
        "--wait",
        "--timeout",
        "180s",
    ];
    let values: Vec<&str> = vec![
        "--skip-crds",
        "--set",
        &watch,
        "--set",
        &repository,
        "--set",
        "replicaCount=2",
        "--set",
        "leaderElection.leaseDuration=15s",
        "--set",
        "issuerEgress.allowHttp=true",
        "--set",
        "extraEnv[0].name=KUBERNETES_SERVICE_HOST",
        "--set",
        &host_env,
        "--set",
        "extraEnv[1].name=KUBERNETES_SERVICE_PORT",
        "--set-string",
        &port_env,
        "--set",
        "usage.introspection.enabled=true",
        "--set",
        "usage.introspection.tokenSecretName=usage-intro",
        "--set",
        "usage.auditWebhook.tlsSecretName=usage-tls",
    ];
    verified(&format!("{chart_ref}:1.0.0"));
    verified(&v1.reference());
    let mut install = vec!["install", &release, &chart_ref, "--version", "1.0.0"];
    install.extend(&common);
    install.extend(&values);
    ok(helm(&install), "helm install from oci://");
    // The image tag came from the chart's appVersion; the node pulled it.
    rolled_out(&ops, &fullname, &v1.reference()).await;
    pulled(&ops, &v1.reference()).await;
    usage_goes_to_the_leader_alone(&ops, &fullname).await;

    // Tokens keep coming while the operator is upgraded and rolled back.
    let stand_in = StandIn::start_on(api_host.parse().unwrap()).await;
    // An hour: no token is due for rotation during the test, so each
    // AgentToken's one token is revision 1.
    stand_in.set_ttl(3600);
    webhook_issuer(&team, &stand_in).await;
    let stop = Arc::new(AtomicBool::new(false));
    let created = Arc::new(Mutex::new(Vec::<String>::new()));
    let creator = {
        let (stop, created) = (stop.clone(), created.clone());
        let ats: Api<AgentToken> = team.api();
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let name = format!("bot-{i:03}");
                if ats
                    .create(&PostParams::default(), &agent_token(&name))
                    .await
                    .is_ok()
                {
                    created.lock().unwrap().push(name);
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;

    verified(&format!("{chart_ref}:1.0.1"));
    verified(&v2.reference());
    let mut upgrade = vec!["upgrade", &release, &chart_ref, "--version", "1.0.1"];
    upgrade.extend(&common);
    upgrade.extend(&values);
    ok(helm(&upgrade), "helm upgrade to 1.0.1");
    rolled_out(&ops, &fullname, &v2.reference()).await;
    pulled(&ops, &v2.reference()).await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mut rollback = vec!["rollback", &release, "1"];
    rollback.extend(&common[..2]);
    rollback.extend(["--wait", "--timeout", "180s"]);
    ok(helm(&rollback), "helm rollback to revision 1");
    rolled_out(&ops, &fullname, &v1.reference()).await;
    // The leader changed hands in the rollouts; the usage Service followed.
    usage_goes_to_the_leader_alone(&ops, &fullname).await;
    let history = ok(
        helm(&["history", &release, "-n", &ops.name, "-o", "json"]),
        "helm history",
    );
    let history: Vec<serde_json::Value> = serde_json::from_str(&history).unwrap();
    let charts_seen: Vec<&str> = history.iter().filter_map(|h| h["chart"].as_str()).collect();
    assert_eq!(
        charts_seen,
        [
            "agent-token-operator-1.0.0",
            "agent-token-operator-1.0.1",
            "agent-token-operator-1.0.0"
        ]
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    creator.await.unwrap();
    // Every AgentToken there is (a create whose answer was lost still made
    // one), not only those the creator heard back about.
    let listed: Vec<String> = team
        .api::<AgentToken>()
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|a| a.name_any())
        .collect();
    let created = created.lock().unwrap().clone();
    assert!(created.iter().all(|n| listed.contains(n)));
    let created = listed;
    assert!(
        created.len() >= 20,
        "tokens were asked for throughout: {}",
        created.len()
    );

    // None missed: every AgentToken is Ready with a token in its Secret.
    let ats: Api<AgentToken> = team.api();
    let secrets: Api<Secret> = team.api();
    for name in &created {
        let ready = || async {
            let at = ats.get(name).await.ok()?;
            let ready = at
                .status?
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            let s = secrets.get(name).await.ok()?;
            (ready && s.data?.contains_key("token")).then_some(())
        };
        let waited = tokio::time::timeout(Duration::from_secs(120), async {
            while ready().await.is_none() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
        .await;
        if waited.is_err() {
            let status = ats.get(name).await.ok().and_then(|a| a.status);
            let mut logs = String::new();
            for pod in operator_pods(&ops).await {
                let api: Api<Pod> = ops.api();
                let log = api
                    .logs(&pod.name_any(), &Default::default())
                    .await
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                logs += &format!("--- {}\n{}\n", pod.name_any(), tail.join("\n"));
            }
            panic!("{name} not Ready with a token in 120 s; status: {status:?}\n{logs}");
        }
    }
    // None minted twice: the stand-in issued exactly one token per
    // AgentToken, revision 1, and nothing else.
    let mut issued: BTreeMap<(String, i64), usize> = BTreeMap::new();
    for t in stand_in.issued() {
        if t.namespace.as_deref() == Some(team.name.as_str()) {
            *issued
                .entry((t.name.unwrap_or_default(), t.revision.unwrap_or(0)))
                .or_default() += 1;
        }
    }
    let expected: BTreeMap<(String, i64), usize> =
        created.iter().map(|n| ((n.clone(), 1), 1)).collect();
    assert_eq!(issued, expected, "one token per AgentToken, minted once");

    // Two replicas, both running the rolled-back image (by digest), on the
    // Pod network.
    let running: Vec<Pod> = operator_pods(&ops)
        .await
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    assert_eq!(running.len(), 2, "two operator Pods");
    for pod in running {
        let status = pod.status.clone().unwrap_or_default();
        let container = &status.container_statuses.clone().unwrap_or_default()[0];
        // By digest: the runtime names an image by any tag it knows for
        // that digest (the same binary makes the same image).
        assert!(
            container.image_id.ends_with(&v1.digest),
            "{} runs {} ({})",
            pod.name_any(),
            container.image,
            container.image_id
        );
        let ip = status.pod_ip.clone().unwrap_or_default();
        assert!(
            ip.starts_with("10.244."),
            "{} on the Pod network: {ip}",
            pod.name_any()
        );
    }
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

/// The image config of an OCI archive: the manifest's config blob.
fn image_config(archive: &Path) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("tar")
        .arg("-xf")
        .arg(archive)
        .arg("-C")
        .arg(dir.path())
        .output()
        .expect("run tar");
    ok(out, "tar -x of the OCI archive");
    let read = |digest: &str| -> serde_json::Value {
        let path = dir
            .path()
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"));
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    };
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("index.json")).unwrap()).unwrap();
    let manifest = read(index["manifests"][0]["digest"].as_str().unwrap());
    read(manifest["config"]["digest"].as_str().unwrap())
}

/// The Containerfile's runtime stage (after its last FROM): USER,
/// ENTRYPOINT and LABELs, with `${VERSION}` as given.
fn containerfile_runtime(version: &str) -> (String, Vec<String>, BTreeMap<String, String>) {
    let text = std::fs::read_to_string(repo_root().join("Containerfile")).unwrap();
    let joined = text.replace("\\\n", " ");
    let runtime = joined.rsplit("\nFROM ").next().unwrap();
    let (mut user, mut entrypoint, mut labels) = (String::new(), Vec::new(), BTreeMap::new());
    for line in runtime.lines().map(str::trim) {
        if let Some(u) = line.strip_prefix("USER ") {
            user = u.trim().to_string();
        } else if let Some(e) = line.strip_prefix("ENTRYPOINT ") {
            entrypoint = serde_json::from_str(e.trim()).unwrap();
        } else if let Some(l) = line.strip_prefix("LABEL ") {
            // key="value" pairs; values hold no quotes.
            let mut rest = l.trim();
            while let Some((key, after)) = rest.split_once("=\"") {
                let (value, tail) = after.split_once('"').unwrap();
                labels.insert(key.trim().to_string(), value.replace("${VERSION}", version));
                rest = tail.trim();
            }
        }
    }
    (user, entrypoint, labels)
}

/// `make image` (hack/image) and the Containerfile describe one image: the
/// same user, entrypoint and labels (all but the revision and created time,
/// which a Containerfile build gets from its build arguments). A change to
/// one that the other misses fails here.
#[test]
fn release_containerfile_and_hack_image_agree_on_user_entrypoint_and_labels() {
    let archive = tempfile::NamedTempFile::new().unwrap();
    let digest = ok(
        Command::new(repo_root().join("hack/image"))
            .args([
                "build",
                "--binary",
                env!("CARGO_BIN_EXE_agent-token-operator"),
            ])
            .args(["--version", "9.9.9-check", "--out"])
            .arg(archive.path())
            .output()
            .expect("run hack/image"),
        "hack/image build",
    );
    assert!(digest.trim().starts_with("sha256:"));
    let config = image_config(archive.path());
    let (user, entrypoint, labels) = containerfile_runtime("9.9.9-check");
    assert_eq!(config["config"]["User"], json!(user));
    assert_eq!(config["config"]["Entrypoint"], json!(entrypoint));
    assert_eq!(config["os"], "linux");
    let built: BTreeMap<String, String> =
        serde_json::from_value(config["config"]["Labels"].clone()).unwrap();
    assert!(labels.contains_key("org.opencontainers.image.source"));
    for (key, value) in &labels {
        if key.ends_with(".revision") {
            continue;
        }
        assert_eq!(built.get(key), Some(value), "label {key}");
    }
    let extra: Vec<&String> = built
        .keys()
        .filter(|k| !labels.contains_key(*k) && !k.ends_with(".created"))
        .collect();
    assert!(extra.is_empty(), "labels only make image sets: {extra:?}");
}

/// The release tools (cosign, actionlint) built by `hack/release-tools`.
pub(crate) fn release_tool(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = ok(
            Command::new(repo_root().join("hack/release-tools"))
                .output()
                .expect("run hack/release-tools"),
            "hack/release-tools",
        );
        PathBuf::from(out.trim())
    })
    .join(name)
}

/// A cosign key pair made for this test, and what signing without any
/// Sigstore service needs (a signing config naming none; no transparency
/// log, which cannot be reached here).
pub(crate) struct Signer {
    dir: tempfile::TempDir,
    password: String,
}

impl Signer {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let signer = Signer {
            dir,
            password: random_suffix() + &random_suffix(),
        };
        ok(
            signer.cosign(&["generate-key-pair"]),
            "cosign generate-key-pair",
        );
        ok(
            signer.cosign(&["signing-config", "create", "--out", "signing-config.json"]),
            "cosign signing-config create",
        );
        signer
    }

    /// cosign in the key's directory, trusting the registry's CA.
    pub fn cosign(&self, args: &[&str]) -> Output {
        Command::new(release_tool("cosign"))
            .args(args)
            .current_dir(self.dir.path())
            .env("COSIGN_PASSWORD", &self.password)
            .env("SSL_CERT_FILE", &registry().ca)
            .env("TUF_ROOT", self.dir.path().join("tuf"))
            .output()
            .expect("run cosign")
    }

    pub fn sign(&self, reference: &str) {
        ok(
            self.cosign(&[
                "sign",
                "--yes",
                "--key",
                "cosign.key",
                "--signing-config",
                "signing-config.json",
                reference,
            ]),
            "cosign sign",
        );
    }

    /// `cosign verify` with the public key (no transparency log here).
    pub fn verify(&self, reference: &str) -> Output {
        self.cosign(&[
            "verify",
            "--key",
            "cosign.pub",
            "--insecure-ignore-tlog=true",
            reference,
        ])
    }
}

/// `helm push`: the chart's digest in the registry.
fn push_chart(archive: &Path, repository: &str) -> String {
    let out = helm(&[
        "push",
        archive.to_str().unwrap(),
        repository,
        "--ca-file",
        registry().ca.to_str().unwrap(),
    ]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "helm push failed: {text}");
    text.split_whitespace()
        .find(|w| w.starts_with("sha256:"))
        .unwrap_or_else(|| panic!("a digest in helm push's output: {text}"))
        .to_string()
}

/// An image changed after it was signed fails verification, both ways an
/// attacker with push access could try: the tag moved to the changed image,
/// and the signatures copied next to the changed image's digest. The signed
/// image also carries a signed SBOM attestation (SPDX, `hack/sbom`) that
/// verifies and names the operator and its crates.
#[test]
fn release_signature_check_fails_for_an_image_changed_after_signing_cosign_key_made_at_test_time() {
    let reg = registry();
    let signer = Signer::new();
    let signed = pushed_image("0.0.0-e2e");
    let repository = format!("{}/e2e-{}/agent-token-operator", reg.host, random_suffix());
    let cert_dir = reg.ca.parent().unwrap().to_str().unwrap();
    let copy = |from: &str, to: &str| {
        ok(
            skopeo(&[
                "copy",
                "--quiet",
                "--src-cert-dir",
                cert_dir,
                "--dest-cert-dir",
                cert_dir,
                &format!("docker://{from}"),
                &format!("docker://{to}"),
            ]),
            &format!("skopeo copy {from} {to}"),
        );
    };
    let tagged = format!("{repository}:1.0.0");
    copy(&signed.reference(), &tagged);
    signer.sign(&format!("{repository}@{}", signed.digest));
    ok(signer.verify(&tagged), "verify the signed image");

    // The SBOM, as a signed in-toto attestation on the same digest.
    let sbom = repo_root().join("target/e2e-image/sbom.spdx.json");
    ok(
        Command::new(repo_root().join("hack/sbom"))
            .arg("--out")
            .arg(&sbom)
            .output()
            .expect("run hack/sbom"),
        "hack/sbom",
    );
    let by_digest = format!("{repository}@{}", signed.digest);
    ok(
        signer.cosign(&[
            "attest",
            "--yes",
            "--key",
            "cosign.key",
            "--signing-config",
            "signing-config.json",
            "--type",
            "spdxjson",
            "--predicate",
            sbom.to_str().unwrap(),
            &by_digest,
        ]),
        "cosign attest the SBOM",
    );
    let attested = ok(
        signer.cosign(&[
            "verify-attestation",
            "--key",
            "cosign.pub",
            "--insecure-ignore-tlog=true",
            "--type",
            "spdxjson",
            &tagged,
        ]),
        "cosign verify-attestation",
    );
    let statement: serde_json::Value =
        serde_json::from_str(attested.lines().next().expect("an attestation")).unwrap();
    let payload = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        statement["payload"].as_str().unwrap(),
    )
    .unwrap();
    let statement: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    let packages: Vec<&str> = statement["predicate"]["packages"]
        .as_array()
        .expect("SPDX packages")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    for name in ["agent-token-operator", "kube", "rustls", "libc6"] {
        assert!(
            packages.contains(&name),
            "the SBOM names {name}: {packages:?}"
        );
    }

    // A changed image (here: other labels, so another digest) pushed over
    // the signed tag.
    let changed = pushed_image("0.0.0-e2e-changed");
    assert_ne!(changed.digest, signed.digest);
    copy(&changed.reference(), &tagged);
    let refused = |out: Output, what: &str, why: &str| {
        let said = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{what} must not verify");
        assert!(
            said.contains(why),
            "{what}: cosign refused for another reason than {why:?}: {said}"
        );
    };
    refused(
        signer.verify(&tagged),
        "the moved tag",
        "no signatures found",
    );
    // The old signatures copied to where cosign looks for the changed
    // image's (the registry has no referrers API, so cosign keeps an index
    // of an image's signatures and attestations under the tag
    // `sha256-<digest>`): each names the old digest as its subject, and
    // none is taken for the changed image.
    let sig_tag = |digest: &str| format!("{repository}:{}", digest.replace(':', "-"));
    copy(&sig_tag(&signed.digest), &sig_tag(&changed.digest));
    let index = ok(
        skopeo(&[
            "inspect",
            "--raw",
            "--cert-dir",
            cert_dir,
            &format!("docker://{}", sig_tag(&changed.digest)),
        ]),
        "skopeo inspect the copied index",
    );
    assert!(
        index.contains(&signed.digest) && index.contains("sigstore"),
        "the copy is cosign's signature for the signed digest: {index}"
    );
    refused(
        signer.verify(&tagged),
        "a copied signature",
        "no signatures found",
    );
    // The signed image itself, by digest, still verifies; with another
    // key it does not.
    ok(signer.verify(&by_digest), "verify the signed digest");
    let stranger = Signer::new();
    let out = stranger.verify(&by_digest);
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "another key must not verify");
    assert!(
        said.to_lowercase().contains("signature")
            && !said.contains("x509")
            && !said.contains("dial"),
        "refused for its signature, not the connection: {said}"
    );
}

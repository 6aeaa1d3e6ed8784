//! The Helm chart with the real Helm (built from the helm.sh/helm/v4 module):
//! lint, schema, template, and install into the local control plane. The
//! installed RBAC is then proven enough for every operator feature, and no
//! more, by running the operator with the chart's ServiceAccount token.
//! (Without a kubelet the chart's Pod cannot run here; the operator runs as
//! a local process with exactly that identity.)

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, DeleteParams};

use agent_token_operator::crd::{AgentToken, ConsumerPhase, RevocationState, RotationReason};

use crate::support::{
    Operator, TestNamespace, api_server, apply, bin_dir, cluster, eventually, kubectl_as, repo_root,
};

pub(crate) fn chart() -> PathBuf {
    repo_root().join("charts/agent-token-operator")
}

pub(crate) fn helm(args: &[&str]) -> Output {
    Command::new(bin_dir().join("helm"))
        .args(args)
        .env("KUBECONFIG", &cluster().admin_kubeconfig)
        .env("HELM_CACHE_HOME", repo_root().join("target/helm/cache"))
        .env("HELM_CONFIG_HOME", repo_root().join("target/helm/config"))
        .env("HELM_DATA_HOME", repo_root().join("target/helm/data"))
        .output()
        .expect("run helm")
}

pub(crate) fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn chart_lints_and_its_schema_rejects_bad_values() {
    let c = chart();
    let c = c.to_str().unwrap();
    ok(helm(&["lint", "--strict", c]), "helm lint");
    ok(
        helm(&[
            "lint",
            "--strict",
            c,
            "--set",
            "watchNamespaces={a,b}",
            "--set",
            "consumers.signal=true",
            "--set",
            "metrics.serviceMonitor.enabled=true",
            "--set",
            "metrics.prometheusRule.enabled=true",
        ]),
        "helm lint with every option",
    );
    for (set, says) in [
        ("replicaCount=two", "replicaCount"),
        ("bogus=1", "bogus"),
        ("consumers.rolloutTimeout=soon", "rolloutTimeout"),
        ("leaderElection.enable=true", "enable"),
        ("watchNamespaces={Not_A_Namespace}", "watchNamespaces"),
    ] {
        let out = helm(&["template", "t", c, "--set", set]);
        assert!(!out.status.success(), "--set {set} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "--set {set}: {err}");
    }
}

#[test]
fn rendered_deployment_is_hardened_and_highly_available() {
    let c = chart();
    let rendered = ok(
        helm(&["template", "t", c.to_str().unwrap(), "-n", "ops"]),
        "helm template",
    );
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&rendered).unwrap();
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    for kind in [
        "Deployment",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "PodDisruptionBudget",
        "Service",
        "NetworkPolicy",
    ] {
        assert!(kinds.contains(&kind), "{kind} missing from {kinds:?}");
    }
    let dep = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    assert_eq!(dep["spec"]["replicas"], 2);
    let pod = &dep["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let ctr = &pod["containers"][0];
    assert_eq!(ctr["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(ctr["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(ctr["securityContext"]["capabilities"]["drop"][0], "ALL");
    let args: Vec<&str> = ctr["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    assert!(args.contains(&"--leader-election=true"), "{args:?}");
    // Cluster-wide mode: the ClusterRole holds the namespaced rules; no pods/exec by default.
    let cr = docs.iter().find(|d| d["kind"] == "ClusterRole").unwrap();
    let rules = cr["rules"].to_string();
    assert!(
        rules.contains("secrets") && !rules.contains("pods/exec"),
        "{rules}"
    );
    // The Prometheus objects render only when asked for.
    assert!(!kinds.contains(&"ServiceMonitor") && !kinds.contains(&"PrometheusRule"));
}

/// A kubeconfig that authenticates with `token` (written under target/).
fn token_kubeconfig(token: &str, name: &str) -> PathBuf {
    let server = api_server();
    let dir = repo_root().join("target/e2e-kubeconfigs");
    std::fs::create_dir_all(&dir).unwrap();
    let token_file = dir.join(format!("{name}.token"));
    std::fs::write(&token_file, token).unwrap();
    let path = dir.join(format!("{name}.kubeconfig"));
    let ca = cluster()
        .admin_kubeconfig
        .parent()
        .unwrap()
        .join("pki/ca.crt");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {{server: {server}, certificate-authority: {}}}\ncontexts:\n- name: c\n  context: {{cluster: c, user: u}}\ncurrent-context: c\nusers:\n- name: u\n  user: {{tokenFile: {}}}\n",
            ca.display(),
            token_file.display()
        ),
    )
    .unwrap();
    path
}

fn can_i(kubeconfig: &Path, ns: Option<&str>, verb: &str, resource: &str) -> bool {
    let mut args = vec!["auth", "can-i", verb, resource];
    if ns.is_none() {
        args.push("--all-namespaces");
    }
    let out = kubectl_as(kubeconfig, ns, &args);
    String::from_utf8_lossy(&out.stdout).trim() == "yes"
}

#[tokio::test]
async fn installed_namespace_scoped_rbac_is_enough_and_no_more() {
    let ops = TestNamespace::new("helm-ops").await;
    let team = TestNamespace::new("helm-team").await;
    let other = TestNamespace::new("helm-other").await;
    let release = format!("ato-{}", &ops.name[ops.name.len() - 6..]);
    ok(
        helm(&[
            "install",
            &release,
            chart().to_str().unwrap(),
            "-n",
            &ops.name,
            "--set",
            &format!("watchNamespaces={{{}}}", team.name),
            "--skip-crds",
        ]),
        "helm install",
    );
    let fullname = format!("{release}-agent-token-operator");
    let token = ok(
        ops.kubectl(&["create", "token", &fullname, "--duration=1h"]),
        "create token for the chart's ServiceAccount",
    );
    let kubeconfig = token_kubeconfig(token.trim(), &release);

    // No more: nothing namespaced outside the listed namespace.
    assert!(can_i(&kubeconfig, Some(&team.name), "get", "secrets"));
    assert!(!can_i(&kubeconfig, Some(&other.name), "get", "secrets"));
    assert!(!can_i(&kubeconfig, Some(&other.name), "list", "secrets"));
    assert!(!can_i(&kubeconfig, None, "list", "secrets"));
    assert!(!can_i(&kubeconfig, Some(&team.name), "create", "pods/exec"));
    assert!(!can_i(
        &kubeconfig,
        Some(&team.name),
        "delete",
        "deployments"
    ));
    assert!(!can_i(
        &kubeconfig,
        Some(&team.name),
        "update",
        "agenttokens"
    ));
    let forbidden = kubectl_as(&kubeconfig, Some(&other.name), &["get", "secrets"]);
    assert!(String::from_utf8_lossy(&forbidden.stderr).contains("Forbidden"));

    // Enough: every feature, with exactly the installed identity.
    let op = Operator::start_as(
        &team.name,
        "chart-identity",
        &[
            "--leader-election=true",
            "--lease-namespace",
            &ops.name,
            "--lease-name",
            &fullname,
            "--restart-coalesce-window=1s",
        ],
        &kubeconfig,
    );
    let setup = r#"
apiVersion: v1
kind: ServiceAccount
metadata: {name: builder}
---
apiVersion: agenttoken.dev/v1alpha1
kind: TokenIssuer
metadata: {name: sa}
spec: {serviceAccount: {}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: app}
spec:
  replicas: 0
  selector: {matchLabels: {app: app}}
  template:
    metadata: {labels: {app: app}}
    spec:
      containers: [{name: a, image: a:local, envFrom: [{secretRef: {name: bot}}]}]
---
apiVersion: agenttoken.dev/v1alpha1
kind: AgentToken
metadata: {name: bot}
spec:
  issuerRef: {name: sa}
  serviceAccountName: builder
  lifetime: 15m
  previousTokenGracePeriod: 0s
"#;
    assert!(apply(&team, setup).status.success());
    let api: Api<AgentToken> = team.api();
    let wait = |what: &'static str, check: fn(&AgentToken) -> bool| {
        let api = api.clone();
        async move {
            eventually(Duration::from_secs(45), what, || async {
                let at = api.get("bot").await.ok()?;
                check(&at).then_some(())
            })
            .await
        }
    };
    wait("minted and consumer rolled", |at| {
        at.status.as_ref().is_some_and(|s| {
            s.revision == 1
                && s.consumers
                    .iter()
                    .any(|c| c.revision == 1 && c.phase == ConsumerPhase::RolledOut)
        })
    })
    .await;
    // The issuer's status loop works too.
    eventually(Duration::from_secs(30), "TokenIssuer Ready", || async {
        let ti: Api<agent_token_operator::crd::TokenIssuer> = team.api();
        let t = ti.get("sa").await.ok()?;
        t.status?
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
            .then_some(())
    })
    .await;
    // Revoke: new token, old one revoked, consumer restarted.
    ok(
        team.kubectl(&["annotate", "at", "bot", "agenttoken.dev/revoke=1"]),
        "annotate",
    );
    wait("revoked", |at| {
        at.status.as_ref().is_some_and(|s| {
            s.revision == 2
                && s.last_rotation_reason == Some(RotationReason::Revoked)
                && s.history
                    .iter()
                    .any(|h| h.revision == 1 && h.revocation == RevocationState::Revoked)
                && s.consumers
                    .iter()
                    .any(|c| c.revision == 2 && c.phase == ConsumerPhase::RolledOut)
        })
    })
    .await;
    let deployments: Api<Deployment> = team.api();
    let d = deployments.get("app").await.unwrap();
    let ann = d
        .spec
        .unwrap()
        .template
        .metadata
        .unwrap()
        .annotations
        .unwrap();
    assert_eq!(
        ann.get("agenttoken.dev/revision-bot").map(String::as_str),
        Some("2")
    );
    // Deletion: the finalizer revokes and lets go.
    api.delete("bot", &DeleteParams::default()).await.unwrap();
    eventually(Duration::from_secs(30), "AgentToken gone", || async {
        api.get_opt("bot").await.ok()?.is_none().then_some(())
    })
    .await;
    let logs = op.logs();
    for word in ["Forbidden", "forbidden", "code: 403"] {
        assert!(
            !logs.contains(word),
            "the operator hit a permission error:\n{logs}"
        );
    }
    drop(op);
    ok(
        helm(&["uninstall", &release, "-n", &ops.name]),
        "helm uninstall",
    );
}

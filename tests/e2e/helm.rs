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
            "--set",
            "rbac.tenantsMayWriteIssuers=true",
            "--set",
            "issuerEgress.allowHttp=true",
            "--set",
            "issuerEgress.allowCIDRs={10.0.0.0/8,::1/128,169.254.169.254}",
            "--set",
            "serveProtectedNamespaces={kube-system}",
            "--set",
            "policy.restrictNamespacedIssuers=true",
        ]),
        "helm lint with every option",
    );
    for (set, says) in [
        ("replicaCount=two", "replicaCount"),
        ("bogus=1", "bogus"),
        ("consumers.rolloutTimeout=soon", "rolloutTimeout"),
        ("leaderElection.enable=true", "enable"),
        ("watchNamespaces={Not_A_Namespace}", "watchNamespaces"),
        ("rbac.aggregateRoles=maybe", "aggregateRoles"),
        ("rbac.tenantsMayWriteIssuer=true", "tenantsMayWriteIssuer"),
        ("issuerEgress.allowCIDRs={10}", "/issuerEgress/allowCIDRs/0"),
        (
            "issuerEgress.allowCIDRs={10.0.0.0/33}",
            "/issuerEgress/allowCIDRs/0",
        ),
        (
            "issuerEgress.allowCIDRs={internal}",
            "/issuerEgress/allowCIDRs/0",
        ),
        (
            "issuerEgress.allowCIDRs=10.0.0.0/8",
            "/issuerEgress/allowCIDRs",
        ),
        ("issuerEgress.allowHttp=yes", "/issuerEgress/allowHttp"),
        ("issuerEgress.allowHttps=true", "allowHttps"),
        ("issuerEgress.allowCidrs={10.0.0.0/8}", "allowCidrs"),
        (
            "serveProtectedNamespaces={Kube_System}",
            "/serveProtectedNamespaces/0",
        ),
        (
            "serveProtectedNamespaces=kube-system",
            "/serveProtectedNamespaces",
        ),
        (
            "policy.restrictNamespacedIssuers=maybe",
            "restrictNamespacedIssuers",
        ),
        (
            "policy.restrictNamespacedIssuer=true",
            "restrictNamespacedIssuer",
        ),
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
    let cr = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == "t-agent-token-operator")
        .unwrap();
    let rules = cr["rules"].to_string();
    assert!(
        rules.contains("secrets") && !rules.contains("pods/exec"),
        "{rules}"
    );
    // The workload index watches Deployments, StatefulSets and DaemonSets.
    let apps = cr["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["apiGroups"] == serde_json::json!(["apps"]))
        .expect("a rule on apps");
    assert_eq!(
        apps["resources"],
        serde_json::json!(["deployments", "statefulsets", "daemonsets"])
    );
    for verb in ["list", "watch", "patch"] {
        assert!(
            apps["verbs"].as_array().unwrap().iter().any(|v| v == verb),
            "{apps}"
        );
    }
    // The Prometheus objects render only when asked for.
    assert!(!kinds.contains(&"ServiceMonitor") && !kinds.contains(&"PrometheusRule"));
}

/// The documents of `helm template t CHART -n ops ARGS`.
fn render(args: &[&str]) -> Vec<serde_json::Value> {
    let c = chart();
    let mut all = vec!["template", "t", c.to_str().unwrap(), "-n", "ops"];
    all.extend_from_slice(args);
    let rendered = ok(helm(&all), "helm template");
    serde_saphyr::from_multiple(&rendered).unwrap()
}

/// The operator container's arguments in a render.
fn operator_args(docs: &[serde_json::Value]) -> Vec<String> {
    let dep = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    dep["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

/// Usage tracking in the chart: off by default (no flags, ports, Service or
/// pods access); on, its flags point at the mounted Secrets, the usage
/// Service and NetworkPolicy open its ports, the operator may list Pods
/// (expected sources); on without its Secrets, the schema refuses.
#[test]
fn usage_values_render_the_endpoints_their_secrets_and_pods_list_only_when_enabled() {
    let docs = render(&[]);
    let args = operator_args(&docs);
    assert!(args.iter().all(|a| !a.starts_with("--usage")), "{args:?}");
    assert!(
        docs.iter()
            .all(|d| d["metadata"]["name"] != "t-agent-token-operator-usage")
    );
    let pods_rule = |docs: &[serde_json::Value]| {
        docs.iter()
            .filter(|d| {
                d["kind"] == "ClusterRole" && d["metadata"]["name"] == "t-agent-token-operator"
            })
            .flat_map(|d| d["rules"].as_array().cloned().unwrap_or_default())
            .any(|r| r["resources"] == serde_json::json!(["pods"]))
    };
    assert!(!pods_rule(&docs), "no pods access by default");

    let on = [
        "--set",
        "usage.auditWebhook.enabled=true",
        "--set",
        "usage.auditWebhook.tlsSecretName=usage-tls",
        "--set",
        "usage.auditWebhook.tokenSecretName=usage-token",
        "--set",
        "usage.vaultAudit.enabled=true",
        "--set",
        "usage.vaultAudit.prefixSecretName=vault-prefix",
        "--set",
        "networkPolicy.enabled=true",
    ];
    let docs = render(&on);
    let args = operator_args(&docs);
    for flag in [
        "--usage-address=0.0.0.0:8443",
        "--usage-tls-cert-file=/etc/agenttoken/usage-tls/tls.crt",
        "--usage-tls-key-file=/etc/agenttoken/usage-tls/tls.key",
        "--usage-token-file=/etc/agenttoken/usage-token/tokens",
        "--usage-vault-audit-address=0.0.0.0:9090",
        "--usage-vault-audit-prefix-file=/etc/agenttoken/vault-audit/prefix",
    ] {
        assert!(args.contains(&flag.to_string()), "{flag} in {args:?}");
    }
    let dep = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let secrets: Vec<&str> = dep["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["secret"]["secretName"].as_str())
        .collect();
    assert_eq!(secrets, ["usage-tls", "usage-token", "vault-prefix"]);
    let svc = docs
        .iter()
        .find(|d| d["metadata"]["name"] == "t-agent-token-operator-usage")
        .expect("the usage Service");
    let ports: Vec<i64> = svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["port"].as_i64())
        .collect();
    assert_eq!(ports, [8443, 9090]);
    let np = docs.iter().find(|d| d["kind"] == "NetworkPolicy").unwrap();
    let opened = np["spec"]["ingress"].to_string();
    assert!(
        opened.contains("\"usage\"") && opened.contains("\"vault-audit\""),
        "{opened}"
    );
    assert!(pods_rule(&docs), "pods list for expected sources");
    assert_eq!(
        svc["spec"]["selector"]["agenttoken.dev/usage-leader"], "true",
        "the usage Service reaches the leader alone"
    );

    // Introspection alone: the HTTPS listener without the audit webhook's
    // token file, and usage.from narrowing who may connect.
    let docs = render(&[
        "--set",
        "usage.introspection.enabled=true",
        "--set",
        "usage.introspection.tokenSecretName=resource-servers",
        "--set",
        "usage.auditWebhook.tlsSecretName=usage-tls",
        "--set",
        "networkPolicy.enabled=true",
        "--set",
        "usage.from[0].ipBlock.cidr=10.8.0.0/16",
    ]);
    let args = operator_args(&docs);
    assert!(args.contains(&"--usage-address=0.0.0.0:8443".to_string()));
    assert!(args.contains(
        &"--usage-introspection-token-file=/etc/agenttoken/introspection-token/tokens".to_string()
    ));
    assert!(
        !args.iter().any(|a| a.starts_with("--usage-token-file")),
        "{args:?}"
    );
    let np = docs.iter().find(|d| d["kind"] == "NetworkPolicy").unwrap();
    assert_eq!(
        np["spec"]["ingress"][1]["from"][0]["ipBlock"]["cidr"],
        "10.8.0.0/16"
    );
    let c = chart();
    let out = helm(&[
        "template",
        "t",
        c.to_str().unwrap(),
        "--set",
        "usage.introspection.enabled=true",
        "--set",
        "usage.introspection.tokenSecretName=resource-servers",
    ]);
    assert!(
        !out.status.success(),
        "introspection without the listener's TLS Secret renders"
    );

    let c = chart();
    let out = helm(&[
        "template",
        "t",
        c.to_str().unwrap(),
        "--set",
        "usage.auditWebhook.enabled=true",
    ]);
    assert!(!out.status.success(), "enabled without its Secrets renders");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("tlsSecretName"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every alert in the chart's PrometheusRule has a unit test, and they
/// pass: `promtool test rules` (Debian's prometheus package) on the groups
/// the chart renders, with tests/alerts/agenttoken_test.yaml.
#[test]
fn alert_rules_pass_their_promtool_unit_tests() {
    let docs = render(&["--set", "metrics.prometheusRule.enabled=true"]);
    let rule = docs
        .iter()
        .find(|d| d["kind"] == "PrometheusRule")
        .expect("the PrometheusRule");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.yaml"), rule["spec"].to_string()).unwrap();
    let tests =
        std::fs::read_to_string(repo_root().join("tests/alerts/agenttoken_test.yaml")).unwrap();
    std::fs::write(dir.path().join("agenttoken_test.yaml"), &tests).unwrap();
    let alerts: Vec<&str> = rule["spec"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .filter_map(|r| r["alert"].as_str())
        .collect();
    assert!(alerts.len() >= 4, "{alerts:?}");
    for a in &alerts {
        assert!(
            tests.contains(&format!("alertname: {a}\n")),
            "alert {a} has no promtool test"
        );
    }
    let out = Command::new("promtool")
        .args(["test", "rules", "agenttoken_test.yaml"])
        .current_dir(dir.path())
        .output()
        .expect("run promtool (apt-get install prometheus)");
    ok(out, "promtool test rules");
}

#[test]
fn multi_tenancy_values_render_their_flags_only_when_set() {
    const NEW_FLAGS: [&str; 3] = [
        "--issuer-allow-http",
        "--issuer-allow-cidr",
        "--serve-protected-namespaces",
    ];
    // Defaults: none of the flags (the binary's own defaults apply), no policy.
    let docs = render(&[]);
    let args = operator_args(&docs);
    assert!(
        args.iter()
            .all(|a| NEW_FLAGS.iter().all(|f| !a.starts_with(f))),
        "{args:?}"
    );
    assert!(
        docs.iter().all(|d| !d["kind"]
            .as_str()
            .unwrap_or("")
            .starts_with("ValidatingAdmission")),
        "a ValidatingAdmissionPolicy rendered by default"
    );
    // Explicitly off / empty: still nothing.
    let args = operator_args(&render(&[
        "--set",
        "issuerEgress.allowHttp=false",
        "--set",
        "issuerEgress.allowCIDRs=null",
        "--set",
        "serveProtectedNamespaces=null",
    ]));
    assert!(
        args.iter()
            .all(|a| NEW_FLAGS.iter().all(|f| !a.starts_with(f))),
        "{args:?}"
    );
    // Set: exactly these flags, after the others, in the binary's syntax
    // (--issuer-allow-http takes its value after `=` only).
    let args = operator_args(&render(&[
        "--set",
        "issuerEgress.allowHttp=true",
        "--set",
        "issuerEgress.allowCIDRs={10.0.0.0/8,::1/128,169.254.169.254}",
        "--set",
        "serveProtectedNamespaces={kube-system,kube-public}",
        "--set",
        "watchNamespaces={team-a}",
    ]));
    assert_eq!(
        args[args.len() - 4..],
        [
            "--namespace=team-a",
            "--issuer-allow-http=true",
            "--issuer-allow-cidr=10.0.0.0/8,::1/128,169.254.169.254",
            "--serve-protected-namespaces=kube-system,kube-public",
        ],
        "{args:?}"
    );
    // One at a time: each renders alone.
    for (set, flag) in [
        ("issuerEgress.allowHttp=true", "--issuer-allow-http=true"),
        (
            "issuerEgress.allowCIDRs={fd00::/8}",
            "--issuer-allow-cidr=fd00::/8",
        ),
        (
            "serveProtectedNamespaces={ops}",
            "--serve-protected-namespaces=ops",
        ),
    ] {
        let args = operator_args(&render(&["--set", set]));
        let new: Vec<&String> = args
            .iter()
            .filter(|a| NEW_FLAGS.iter().any(|f| a.starts_with(f)))
            .collect();
        assert_eq!(new, [flag], "--set {set}");
    }
}

const RESTRICT_MESSAGE: &str = "namespaced TokenIssuers may only use the serviceAccount kind here; credential-holding issuers (oauth2, vault, githubApp, webhook, jwt) belong in a ClusterTokenIssuer (chart value policy.restrictNamespacedIssuers)";

#[test]
fn restrict_namespaced_issuers_renders_a_bound_admission_policy() {
    let docs = render(&["--set", "policy.restrictNamespacedIssuers=true"]);
    let name = "t-agent-token-operator-restrict-namespaced-issuers";
    let vap = docs
        .iter()
        .find(|d| d["kind"] == "ValidatingAdmissionPolicy")
        .expect("a ValidatingAdmissionPolicy");
    assert_eq!(vap["apiVersion"], "admissionregistration.k8s.io/v1");
    assert_eq!(vap["metadata"]["name"], name);
    assert!(vap["metadata"].get("namespace").is_none());
    let spec = &vap["spec"];
    assert_eq!(spec["failurePolicy"], "Fail");
    let rules = spec["matchConstraints"]["resourceRules"]
        .as_array()
        .unwrap();
    assert_eq!(rules.len(), 1, "{rules:?}");
    assert_eq!(rules[0]["apiGroups"], serde_json::json!(["agenttoken.dev"]));
    // Namespaced issuers only: never clustertokenissuers, never status.
    assert_eq!(rules[0]["resources"], serde_json::json!(["tokenissuers"]));
    assert_eq!(
        rules[0]["operations"],
        serde_json::json!(["CREATE", "UPDATE"])
    );
    let validations = spec["validations"].as_array().unwrap();
    assert_eq!(validations.len(), 1);
    assert_eq!(validations[0]["message"], RESTRICT_MESSAGE);
    let expr = validations[0]["expression"].as_str().unwrap();
    for kind in [
        "serviceAccount",
        "oauth2",
        "vault",
        "githubApp",
        "webhook",
        "jwt",
    ] {
        assert!(expr.contains(&format!("has(object.spec.{kind})")), "{expr}");
    }
    let binding = docs
        .iter()
        .find(|d| d["kind"] == "ValidatingAdmissionPolicyBinding")
        .expect("a ValidatingAdmissionPolicyBinding");
    assert_eq!(binding["metadata"]["name"], name);
    assert_eq!(binding["spec"]["policyName"], name);
    assert_eq!(
        binding["spec"]["validationActions"],
        serde_json::json!(["Deny"])
    );
    // Cluster-wide mode: every namespace. Namespace-scoped: exactly the
    // watched namespaces.
    assert!(binding["spec"].get("matchResources").is_none(), "{binding}");
    let docs = render(&[
        "--set",
        "policy.restrictNamespacedIssuers=true",
        "--set",
        "watchNamespaces={team-a,team-b}",
    ]);
    let binding = docs
        .iter()
        .find(|d| d["kind"] == "ValidatingAdmissionPolicyBinding")
        .unwrap();
    assert_eq!(
        binding["spec"]["matchResources"]["namespaceSelector"],
        serde_json::json!({"matchExpressions": [{
            "key": "kubernetes.io/metadata.name",
            "operator": "In",
            "values": ["team-a", "team-b"],
        }]})
    );
    // The release's full name keeps parallel installs apart.
    let other = ok(
        helm(&[
            "template",
            "other",
            chart().to_str().unwrap(),
            "--set",
            "policy.restrictNamespacedIssuers=true",
        ]),
        "helm template",
    );
    assert!(other.contains("name: other-agent-token-operator-restrict-namespaced-issuers"));
}

#[test]
fn finalizer_policy_renders_where_the_cluster_serves_it_bound_to_served_namespaces() {
    const SERVED: &str = "admissionregistration.k8s.io/v1/MutatingAdmissionPolicy";
    let name = "t-agent-token-operator-finalizer";
    let find =
        |docs: &[serde_json::Value], kind: &str| docs.iter().find(|d| d["kind"] == kind).cloned();
    let selector = |args: &[&str]| {
        let docs = render(args);
        find(&docs, "MutatingAdmissionPolicyBinding").expect("a binding")["spec"]["matchResources"]
            ["namespaceSelector"]
            .clone()
    };
    // auto (the default): only where the cluster serves the API.
    let docs = render(&[]);
    assert!(find(&docs, "MutatingAdmissionPolicy").is_none());
    let docs = render(&["--api-versions", SERVED]);
    let map = find(&docs, "MutatingAdmissionPolicy").expect("the policy");
    assert_eq!(map["apiVersion"], "admissionregistration.k8s.io/v1");
    assert_eq!(map["metadata"]["name"], name);
    let spec = &map["spec"];
    // Never refuses an AgentToken: the operator adds the finalizer itself
    // where the policy fails.
    assert_eq!(spec["failurePolicy"], "Ignore");
    let rules = &spec["matchConstraints"]["resourceRules"];
    assert_eq!(
        rules,
        &serde_json::json!([{
            "apiGroups": ["agenttoken.dev"],
            "apiVersions": ["*"],
            "operations": ["CREATE"],
            "resources": ["agenttokens"],
        }])
    );
    let expr = spec["mutations"][0]["jsonPatch"]["expression"]
        .as_str()
        .unwrap();
    assert!(expr.contains("\"agenttoken.dev/revoke\""), "{expr}");
    let binding = find(&docs, "MutatingAdmissionPolicyBinding").expect("its binding");
    assert_eq!(binding["metadata"]["name"], name);
    assert_eq!(binding["spec"]["policyName"], name);
    // Cluster-wide: every namespace but those the operator never serves
    // (a finalizer nobody removes would hold a deletion forever).
    let name_selector = |op: &str, values: &[&str]| {
        serde_json::json!({"matchExpressions": [{
            "key": "kubernetes.io/metadata.name",
            "operator": op,
            "values": values,
        }]})
    };
    assert_eq!(
        binding["spec"]["matchResources"]["namespaceSelector"],
        name_selector(
            "NotIn",
            &["kube-system", "kube-public", "kube-node-lease", "ops"]
        )
    );
    assert_eq!(
        selector(&[
            "--api-versions",
            SERVED,
            "--set",
            "serveProtectedNamespaces={kube-system,ops}",
        ]),
        name_selector("NotIn", &["kube-public", "kube-node-lease"])
    );
    // Namespace-scoped: exactly the watched namespaces.
    assert_eq!(
        selector(&[
            "--api-versions",
            SERVED,
            "--set",
            "watchNamespaces={team-a,team-b}"
        ]),
        name_selector("In", &["team-a", "team-b"])
    );
    // Forced on (a cluster whose discovery helm cannot see), or off.
    let docs = render(&["--set", "admission.finalizerPolicy=true"]);
    assert!(find(&docs, "MutatingAdmissionPolicy").is_some());
    let docs = render(&[
        "--api-versions",
        SERVED,
        "--set",
        "admission.finalizerPolicy=false",
    ]);
    assert!(find(&docs, "MutatingAdmissionPolicy").is_none());
    assert!(find(&docs, "MutatingAdmissionPolicyBinding").is_none());
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

/// `kubectl auth can-i`; a `resource/sub` is a subresource (kubectl alone
/// would read `sub` as an object name: `pods/exec` = the pod named exec).
fn can_i(kubeconfig: &Path, ns: Option<&str>, verb: &str, resource: &str) -> bool {
    let (resource, sub) = resource.split_once('/').unwrap_or((resource, ""));
    let sub = format!("--subresource={sub}");
    let mut args = vec!["auth", "can-i", verb, resource];
    if sub.len() > "--subresource=".len() {
        args.push(&sub);
    }
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
    // Consumers come from watches of the workloads, not LISTs per token.
    for workloads in ["deployments", "statefulsets", "daemonsets"] {
        assert!(can_i(&kubeconfig, Some(&team.name), "watch", workloads));
        assert!(!can_i(&kubeconfig, Some(&other.name), "watch", workloads));
    }
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
    // The jwt issuer creates its JWKS ConfigMap and records it on the
    // TokenIssuer (configmaps create, tokenissuers patch).
    let pem = Command::new("openssl")
        .args(["genpkey", "-algorithm", "ED25519"])
        .output()
        .expect("openssl");
    let signing = serde_json::json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "signing-key"},
        "stringData": {"key.pem": String::from_utf8_lossy(&pem.stdout)},
    });
    assert!(apply(&team, &signing.to_string()).status.success());
    let jwt = r#"
apiVersion: agenttoken.dev/v1alpha1
kind: TokenIssuer
metadata: {name: agents}
spec:
  jwt:
    signingKeySecretRef: {name: signing-key, key: key.pem}
    issuer: https://agents.example
  policy: {maxLifetime: 1h, allowedScopes: [deploy], allowedAudiences: ["https://api.internal"]}
---
apiVersion: agenttoken.dev/v1alpha1
kind: AgentToken
metadata: {name: signed}
spec:
  issuerRef: {name: agents}
  scopes: [deploy]
  audiences: ["https://api.internal"]
  lifetime: 15m
"#;
    assert!(apply(&team, jwt).status.success());
    eventually(Duration::from_secs(30), "a JWT minted", || async {
        let at = api.get("signed").await.ok()?;
        (at.status?.revision == 1).then_some(())
    })
    .await;
    let ti: Api<agent_token_operator::crd::TokenIssuer> = team.api();
    let agents = ti.get("agents").await.unwrap();
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> = team.api();
    let cm = cms.get("agents-jwks").await.unwrap();
    let records =
        agent_token_operator::issuer::jwt::read_records(agents.metadata.annotations.as_ref());
    assert_eq!(
        records
            .get(&format!("{}/agents-jwks", team.name))
            .map(|r| r.uid.clone()),
        cm.metadata.uid
    );
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

const AGGREGATE_TO: &str = "rbac.authorization.k8s.io/aggregate-to-";

/// A user-facing ClusterRole: (name suffix, built-in roles it aggregates
/// into, resources, verbs), each list sorted.
type UserRole = (String, Vec<String>, Vec<String>, Vec<String>);

/// The user-facing ClusterRoles of a `helm template t ... ARGS` render.
fn user_roles(args: &[&str]) -> Vec<UserRole> {
    let c = chart();
    let mut all = vec!["template", "t", c.to_str().unwrap()];
    all.extend_from_slice(args);
    let rendered = ok(helm(&all), "helm template");
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&rendered).unwrap();
    let strings = |v: &serde_json::Value| -> Vec<String> {
        let mut out: Vec<String> = v
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(String::from))
            .collect();
        out.sort();
        out
    };
    let mut roles: Vec<_> = docs
        .iter()
        .filter(|d| d["kind"] == "ClusterRole")
        .filter_map(|d| {
            let name = d["metadata"]["name"].as_str()?;
            let suffix = name.strip_prefix("t-agent-token-operator-")?;
            let mut into: Vec<String> = d["metadata"]["labels"]
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, v)| k.starts_with(AGGREGATE_TO) && v.as_str() == Some("true"))
                .map(|(k, _)| k[AGGREGATE_TO.len()..].to_string())
                .collect();
            into.sort();
            let rules = d["rules"].as_array()?;
            assert_eq!(rules.len(), 1, "{name}: one rule");
            assert_eq!(strings(&rules[0]["apiGroups"]), vec!["agenttoken.dev"]);
            Some((
                suffix.to_string(),
                into,
                strings(&rules[0]["resources"]),
                strings(&rules[0]["verbs"]),
            ))
        })
        .collect();
    roles.sort();
    roles
}

fn strs(v: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = v.iter().map(|s| s.to_string()).collect();
    out.sort();
    out
}

#[test]
fn user_roles_render_with_their_aggregation_labels_and_verbs() {
    let view = |into: &[&str]| {
        (
            "view".to_string(),
            strs(into),
            strs(&["agenttokens", "tokenissuers"]),
            strs(&["get", "list", "watch"]),
        )
    };
    let edit = |into: &[&str]| {
        (
            "edit".to_string(),
            strs(into),
            strs(&["agenttokens"]),
            strs(&["create", "update", "patch", "delete", "deletecollection"]),
        )
    };
    let issuer_admin = |into: &[&str]| {
        (
            "issuer-admin".to_string(),
            strs(into),
            strs(&["tokenissuers"]),
            strs(&[
                "get",
                "list",
                "watch",
                "create",
                "update",
                "patch",
                "delete",
                "deletecollection",
            ]),
        )
    };
    // Default: view everywhere, edit in edit and admin, issuers in no
    // built-in role (bindable by hand).
    assert_eq!(
        user_roles(&[]),
        vec![
            edit(&["edit", "admin"]),
            issuer_admin(&[]),
            view(&["view", "edit", "admin"]),
        ]
    );
    // Tenants may write issuers: issuer-admin in admin, never in edit.
    assert_eq!(
        user_roles(&["--set", "rbac.tenantsMayWriteIssuers=true"]),
        vec![
            edit(&["edit", "admin"]),
            issuer_admin(&["admin"]),
            view(&["view", "edit", "admin"]),
        ]
    );
    // No aggregation: the same roles, unlabelled, whatever else is set.
    assert_eq!(
        user_roles(&[
            "--set",
            "rbac.aggregateRoles=false",
            "--set",
            "rbac.tenantsMayWriteIssuers=true",
        ]),
        vec![edit(&[]), issuer_admin(&[]), view(&[])]
    );
    // Writing AgentTokens never includes their status (only the operator's).
    let all = user_roles(&["--set", "rbac.tenantsMayWriteIssuers=true"]);
    assert!(
        all.iter()
            .all(|(_, _, resources, _)| resources.iter().all(|r| !r.contains('/'))),
        "{all:?}"
    );
}

/// `kubectl auth can-i VERB RESOURCE -n NS --as USER`, as cluster-admin. A
/// `resource/sub` is a subresource (kubectl would read `sub` as a name).
fn user_can(user: &str, ns: &str, verb: &str, resource: &str) -> bool {
    let (resource, sub) = resource.split_once('/').unwrap_or((resource, ""));
    let sub = format!("--subresource={sub}");
    let mut args = vec!["auth", "can-i", verb, resource, "--as", user];
    if sub.len() > "--subresource=".len() {
        args.push(&sub);
    }
    let out = kubectl_as(&cluster().admin_kubeconfig, Some(ns), &args);
    String::from_utf8_lossy(&out.stdout).trim() == "yes"
}

async fn until_can(user: &str, ns: &str, verb: &str, resource: &str, want: bool) {
    eventually(
        Duration::from_secs(45),
        &format!("{user} can {verb} {resource}: {want}"),
        || async { (user_can(user, ns, verb, resource) == want).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn editors_request_tokens_but_only_admins_trusted_with_issuers_write_them() {
    crate::support::install_crds();
    let ops = TestNamespace::new("helm-agg").await;
    let team = TestNamespace::new("helm-edit").await;
    let release = format!("agg-{}", &ops.name[ops.name.len() - 6..]);
    // Aggregated roles change the built-in ones cluster-wide: uninstall
    // even when the test fails.
    let _uninstall = Uninstall(release.clone(), ops.name.clone());
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
    // The restricted user (a real identity, for real creates) holds the
    // built-in `edit` in the team namespace; another user the built-in
    // `admin` (checked by impersonation).
    let editor = "agenttoken-restricted";
    let admin = format!("ns-admin-{}", &team.name[team.name.len() - 6..]);
    let bindings = format!(
        r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: editor}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: edit}}
subjects: [{{apiGroup: rbac.authorization.k8s.io, kind: User, name: {editor}}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: admin}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: admin}}
subjects: [{{apiGroup: rbac.authorization.k8s.io, kind: User, name: {admin}}}]
"#
    );
    assert!(apply(&team, &bindings).status.success());
    until_can(editor, &team.name, "create", "agenttokens", true).await;

    // edit: request tokens, read issuers, nothing more.
    let at = r#"
apiVersion: agenttoken.dev/v1alpha1
kind: AgentToken
metadata: {name: bot}
spec:
  issuerRef: {name: sa}
  serviceAccountName: builder
  lifetime: 15m
"#;
    let out = crate::support::apply_as(&cluster().restricted_kubeconfig, &team.name, at);
    assert!(
        out.status.success(),
        "an editor creates an AgentToken: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let issuer = "apiVersion: agenttoken.dev/v1alpha1\nkind: TokenIssuer\nmetadata: {name: mine}\nspec: {serviceAccount: {}}\n";
    let out = crate::support::apply_as(&cluster().restricted_kubeconfig, &team.name, issuer);
    assert!(!out.status.success(), "an editor created a TokenIssuer");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("forbidden"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (verb, resource, want) in [
        ("delete", "agenttokens", true),
        ("list", "tokenissuers", true),
        ("patch", "agenttokens/status", false),
        ("update", "tokenissuers", false),
        ("list", "clustertokenissuers", false),
    ] {
        assert_eq!(
            user_can(editor, &team.name, verb, resource),
            want,
            "edit: {verb} {resource}"
        );
    }
    assert!(!user_can(editor, &ops.name, "create", "agenttokens"));
    // admin: the same, and still no issuers by default.
    assert!(user_can(&admin, &team.name, "create", "agenttokens"));
    assert!(!user_can(&admin, &team.name, "create", "tokenissuers"));

    // rbac.tenantsMayWriteIssuers: namespace admins write issuers; editors
    // still do not.
    ok(
        helm(&[
            "upgrade",
            &release,
            chart().to_str().unwrap(),
            "-n",
            &ops.name,
            "--reuse-values",
            "--set",
            "rbac.tenantsMayWriteIssuers=true",
            "--skip-crds",
        ]),
        "helm upgrade",
    );
    until_can(&admin, &team.name, "create", "tokenissuers", true).await;
    assert!(!user_can(editor, &team.name, "create", "tokenissuers"));
    // Uninstalled, the aggregated rules go with the release.
    ok(
        helm(&["uninstall", &release, "-n", &ops.name]),
        "helm uninstall",
    );
    let roles = kubectl_as(
        &cluster().admin_kubeconfig,
        None,
        &["get", "clusterrole", "-o", "name"],
    );
    assert!(!String::from_utf8_lossy(&roles.stdout).contains(&release));
}

/// `kubectl ARGS -f -` with `yaml` on stdin, as cluster-admin, in `ns`.
fn kubectl_stdin(ns: Option<&str>, args: &[&str], yaml: &str) -> Output {
    crate::support::kubectl_stdin(&cluster().admin_kubeconfig, ns, args, yaml)
}

/// An issuer of `kind` (TokenIssuer or ClusterTokenIssuer) named `name`
/// whose spec is `spec` (one issuer kind, YAML flow style).
fn issuer(kind: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: agenttoken.dev/v1alpha1\nkind: {kind}\nmetadata: {{name: {name}}}\nspec: {spec}\n"
    )
}

const WEBHOOK_SPEC: &str = "{webhook: {url: 'https://mint.example/tokens', result: {tokenPath: $.token, expiresInPath: $.ttl}}}";

#[tokio::test]
async fn restrict_namespaced_issuers_admits_only_service_account_issuers_even_for_cluster_admins() {
    crate::support::install_crds();
    let ops = TestNamespace::new("helm-vap").await;
    let team = TestNamespace::new("helm-vap-team").await;
    let suffix = &ops.name[ops.name.len() - 6..];
    let release = format!("vap-{suffix}");
    let cti = format!("vap-webhook-{suffix}");
    // The policy and its binding are cluster-wide: uninstall (and remove
    // the ClusterTokenIssuer) even when the test fails.
    let _uninstall = Uninstall(release.clone(), ops.name.clone());
    let _cti = crate::support::DeleteClusterIssuer(cti.clone());
    let stderr = |o: &Output| String::from_utf8_lossy(&o.stderr).into_owned();
    // An issuer from before the option: left alone until its spec changes.
    let before = issuer("TokenIssuer", "before", WEBHOOK_SPEC);
    let out = kubectl_stdin(Some(&team.name), &["apply"], &before);
    assert!(out.status.success(), "{}", stderr(&out));
    ok(
        helm(&[
            "install",
            &release,
            chart().to_str().unwrap(),
            "-n",
            &ops.name,
            "--set",
            &format!("watchNamespaces={{{}}}", team.name),
            "--set",
            "policy.restrictNamespacedIssuers=true",
            "--skip-crds",
        ]),
        "helm install",
    );
    // A binding takes a moment to take effect; wait with server-side dry
    // runs, so nothing is created meanwhile (a created issuer would then be
    // an unchanged one, which the policy lets through).
    let webhook = issuer("TokenIssuer", "creds", WEBHOOK_SPEC);
    let err = eventually(
        Duration::from_secs(60),
        "the policy denies a namespaced webhook TokenIssuer",
        || async {
            let out = kubectl_stdin(Some(&team.name), &["create", "--dry-run=server"], &webhook);
            (!out.status.success()).then(|| stderr(&out))
        },
    )
    .await;
    assert!(err.contains(RESTRICT_MESSAGE), "{err}");
    assert!(
        err.contains(&format!(
            "{release}-agent-token-operator-restrict-namespaced-issuers"
        )),
        "{err}"
    );

    // For real, as cluster-admin: denied, with the message, and not created.
    let out = kubectl_stdin(Some(&team.name), &["apply"], &webhook);
    assert!(
        !out.status.success(),
        "a namespaced webhook issuer was admitted"
    );
    assert!(stderr(&out).contains(RESTRICT_MESSAGE), "{}", stderr(&out));
    let got = team.kubectl(&[
        "get",
        "tokenissuer",
        "creds",
        "--ignore-not-found",
        "-o",
        "name",
    ]);
    assert!(String::from_utf8_lossy(&got.stdout).trim().is_empty());
    // Every credential-holding kind is denied (dry run: CRD validation
    // passes first, so the denial is the policy's).
    for (kind, spec) in [
        (
            "oauth2",
            "{oauth2: {tokenURL: 'https://idp.example/token', clientID: c, clientSecretRef: {name: s, key: k}}}",
        ),
        (
            "vault",
            "{vault: {address: 'https://vault.example:8200', auth: {tokenSecretRef: {name: s, key: k}}}}",
        ),
        (
            "githubApp",
            "{githubApp: {apiURL: 'https://api.github.com', appID: 1, privateKeySecretRef: {name: s, key: k}}}",
        ),
        (
            "jwt",
            "{jwt: {signingKeySecretRef: {name: s, key: k}, issuer: 'https://agents.example'}}",
        ),
    ] {
        let out = kubectl_stdin(
            Some(&team.name),
            &["create", "--dry-run=server"],
            &issuer("TokenIssuer", &kind.to_lowercase(), spec),
        );
        assert!(
            !out.status.success(),
            "a namespaced {kind} issuer was admitted"
        );
        assert!(
            stderr(&out).contains(RESTRICT_MESSAGE),
            "{kind}: {}",
            stderr(&out)
        );
    }

    // serviceAccount stays allowed, and so do changes to it.
    let sa = issuer("TokenIssuer", "sa", "{serviceAccount: {}}");
    let out = kubectl_stdin(Some(&team.name), &["apply"], &sa);
    assert!(
        out.status.success(),
        "serviceAccount denied: {}",
        stderr(&out)
    );
    let sa = issuer(
        "TokenIssuer",
        "sa",
        "{serviceAccount: {}, policy: {maxLifetime: 1h}}",
    );
    let out = kubectl_stdin(Some(&team.name), &["apply"], &sa);
    assert!(
        out.status.success(),
        "serviceAccount update denied: {}",
        stderr(&out)
    );
    // Turning a serviceAccount issuer into a webhook one is a spec change: denied.
    let out = kubectl_stdin(
        Some(&team.name),
        &["replace"],
        &issuer("TokenIssuer", "sa", WEBHOOK_SPEC),
    );
    assert!(!out.status.success(), "sa turned into webhook");
    assert!(stderr(&out).contains(RESTRICT_MESSAGE), "{}", stderr(&out));

    // ClusterTokenIssuers are the platform's: a webhook one is admitted.
    let out = kubectl_stdin(
        None,
        &["apply"],
        &issuer("ClusterTokenIssuer", &cti, WEBHOOK_SPEC),
    );
    assert!(
        out.status.success(),
        "ClusterTokenIssuer denied: {}",
        stderr(&out)
    );

    // The issuer from before: its metadata stays writable (the jwt issuer's
    // record annotation is such a write), its spec does not, and it can go.
    ok(
        team.kubectl(&["annotate", "tokenissuer", "before", "example.com/note=kept"]),
        "annotate an existing webhook issuer",
    );
    let changed = issuer(
        "TokenIssuer",
        "before",
        "{webhook: {url: 'https://elsewhere.example/tokens', result: {tokenPath: $.token, expiresInPath: $.ttl}}}",
    );
    let out = kubectl_stdin(Some(&team.name), &["apply"], &changed);
    assert!(
        !out.status.success(),
        "an existing webhook issuer's spec changed"
    );
    assert!(stderr(&out).contains(RESTRICT_MESSAGE), "{}", stderr(&out));
    ok(
        team.kubectl(&["delete", "tokenissuer", "before"]),
        "delete an existing webhook issuer",
    );

    // Uninstalled, the policy goes with the release and webhook issuers are
    // admitted again.
    ok(
        helm(&["uninstall", &release, "-n", &ops.name]),
        "helm uninstall",
    );
    for kind in [
        "validatingadmissionpolicy",
        "validatingadmissionpolicybinding",
    ] {
        let left = kubectl_as(
            &cluster().admin_kubeconfig,
            None,
            &["get", kind, "-o", "name"],
        );
        assert!(
            !String::from_utf8_lossy(&left.stdout).contains(&release),
            "{kind} left behind"
        );
    }
    eventually(
        Duration::from_secs(60),
        "namespaced webhook issuers admitted after uninstall",
        || async {
            kubectl_stdin(Some(&team.name), &["create", "--dry-run=server"], &webhook)
                .status
                .success()
                .then_some(())
        },
    )
    .await;
}

/// `helm uninstall RELEASE -n NAMESPACE` when dropped.
pub(crate) struct Uninstall(pub(crate) String, pub(crate) String);

impl Drop for Uninstall {
    fn drop(&mut self) {
        let _ = helm(&["uninstall", &self.0, "-n", &self.1, "--ignore-not-found"]);
    }
}

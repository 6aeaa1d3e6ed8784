//! The kubectl plugin (`kubectl agenttoken status|rotate|revoke|plan`) run
//! through the real kubectl against the local control plane, and the
//! operator watching a list of namespaces.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use kube::api::Api;

use agent_token_operator::crd::{AgentToken, RotationReason};

use crate::support::{Operator, TestNamespace, apply, cluster, eventually};

const SETUP: &str = r#"
apiVersion: v1
kind: ServiceAccount
metadata: {name: builder}
---
apiVersion: agenttoken.dev/v1alpha1
kind: TokenIssuer
metadata: {name: sa}
spec:
  serviceAccount: {}
  policy: {maxLifetime: 1h}
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
      containers:
      - name: agent
        image: agent:local
        envFrom: [{secretRef: {name: bot}}]
"#;

fn at(name: &str, lifetime: &str) -> String {
    format!(
        "apiVersion: agenttoken.dev/v1alpha1\nkind: AgentToken\nmetadata: {{name: {name}}}\nspec:\n  issuerRef: {{name: sa}}\n  serviceAccountName: builder\n  lifetime: {lifetime}\n"
    )
}

/// Runs `kubectl agenttoken ARGS` with the plugin found on PATH, as users do.
fn plugin(ns: &TestNamespace, args: &[&str], stdin: Option<&str>) -> Output {
    let plugin_dir = PathBuf::from(env!("CARGO_BIN_EXE_kubectl-agenttoken"))
        .parent()
        .unwrap()
        .to_path_buf();
    let path = format!(
        "{}:{}",
        plugin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new(&cluster().kubectl);
    cmd.arg("agenttoken")
        .args(["-n", &ns.name])
        .args(args)
        .env("PATH", path)
        .env("KUBECONFIG", &cluster().admin_kubeconfig);
    match stdin {
        None => cmd.output().expect("run kubectl agenttoken"),
        Some(input) => {
            use std::io::Write;
            let mut child = cmd
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("run kubectl agenttoken");
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
            child.wait_with_output().unwrap()
        }
    }
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "plugin failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn wait_reason(ns: &TestNamespace, revision: i64, reason: RotationReason) {
    let api: Api<AgentToken> = ns.api();
    eventually(
        Duration::from_secs(30),
        &format!("revision {revision} ({reason:?})"),
        || async {
            let at = api.get("bot").await.ok()?;
            let st = at.status?;
            (st.revision == revision && st.last_rotation_reason == Some(reason)).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn kubectl_agenttoken_status_rotate_revoke_and_plan() {
    let ns = TestNamespace::new("plugin").await;
    let _op = Operator::start_with(
        &ns.name,
        "solo",
        &["--leader-election=false", "--restart-coalesce-window=1s"],
    );
    assert!(apply(&ns, SETUP).status.success());
    assert!(apply(&ns, &at("bot", "15m")).status.success());
    wait_reason(&ns, 1, RotationReason::Initial).await;

    // status: JSON for machines, a table for people; never a token.
    let json: serde_json::Value =
        serde_json::from_str(&ok(&plugin(&ns, &["status", "-o", "json"], None))).unwrap();
    let row = &json[0];
    assert_eq!(row["name"], "bot");
    assert_eq!(row["ready"], "True");
    assert_eq!(row["revision"], 1);
    assert_eq!(row["lastRotationReason"], "Initial");
    assert!(row["expiresAt"].as_str().is_some());
    let table = ok(&plugin(&ns, &["status"], None));
    let header = table.lines().next().unwrap();
    for col in [
        "NAME",
        "READY",
        "EXPIRES",
        "NEXT ROTATION",
        "LAST REASON",
        "CONSUMERS",
    ] {
        assert!(header.contains(col), "{header}");
    }
    assert!(
        table.contains("bot") && table.contains("Initial"),
        "{table}"
    );
    eventually(Duration::from_secs(20), "consumer in the table", || async {
        let table = ok(&plugin(&ns, &["status", "bot"], None));
        table.contains("Deployment/app r1 RolledOut").then_some(())
    })
    .await;
    let yaml = ok(&plugin(&ns, &["status", "bot", "-o", "yaml"], None));
    assert!(yaml.contains("name: bot"), "{yaml}");
    let secret: k8s_openapi::api::core::v1::Secret = ns.api().get("bot").await.unwrap();
    let token = String::from_utf8(secret.data.unwrap()["token"].0.clone()).unwrap();
    assert!(!table.contains(&token) && !yaml.contains(&token));

    // rotate and revoke.
    let said = ok(&plugin(&ns, &["rotate", "bot"], None));
    assert!(said.contains("agenttoken.dev/rotate"), "{said}");
    wait_reason(&ns, 2, RotationReason::Manual).await;
    ok(&plugin(&ns, &["revoke", "bot"], None));
    wait_reason(&ns, 3, RotationReason::Revoked).await;
    let missing = plugin(&ns, &["rotate", "nope"], None);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("nope"));

    // plan: effective policy, rotation and restarts, for manifests not yet applied.
    let manifests = format!("{}---\n{}", at("bot", "30m"), at("greedy", "5h"));
    let planned: serde_json::Value = serde_json::from_str(&ok(&plugin(
        &ns,
        &["plan", "-f", "-", "-o", "json"],
        Some(&manifests),
    )))
    .unwrap();
    let bot = &planned[0];
    assert_eq!(bot["allowed"], true);
    assert_eq!(bot["effectiveLifetime"], "30m");
    // Rotation when a third of the lifetime is left, minus jitter: 20m at most.
    let after = bot["nextRotationAfterIssue"].as_str().unwrap();
    assert!(
        after.starts_with("1") || after.starts_with("20m"),
        "{after}"
    );
    assert_eq!(bot["restart"][0], "Deployment/app");
    let greedy = &planned[1];
    assert_eq!(greedy["allowed"], false);
    assert!(
        greedy["refusal"]
            .as_str()
            .unwrap()
            .contains("policy.maxLifetime"),
        "{greedy}"
    );
    let table = ok(&plugin(&ns, &["plan", "-f", "-"], Some(&manifests)));
    assert!(table.contains("WOULD RESTART") && table.contains("Deployment/app"));
}

#[tokio::test]
async fn the_operator_serves_exactly_the_namespaces_it_is_given() {
    let a = TestNamespace::new("multi-a").await;
    let b = TestNamespace::new("multi-b").await;
    let outside = TestNamespace::new("multi-out").await;
    let list = format!("{},{}", a.name, b.name);
    let _op = Operator::start_with(
        &a.name,
        "solo",
        &["--leader-election=false", "--namespace", &list],
    );
    for ns in [&a, &b, &outside] {
        assert!(apply(ns, SETUP).status.success());
        assert!(apply(ns, &at("bot", "15m")).status.success());
    }
    for ns in [&a, &b] {
        wait_reason(ns, 1, RotationReason::Initial).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let api: Api<AgentToken> = outside.api();
    let untouched = api.get("bot").await.unwrap();
    assert!(
        untouched.status.is_none(),
        "a namespace not listed is not served"
    );
}

#[tokio::test]
async fn every_example_is_accepted_by_the_api_server() {
    let ns = TestNamespace::new("examples").await;
    let dir = crate::support::repo_root().join("examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        // Examples name their own namespaces; check them in this test's.
        let text = text
            .replace("namespace: team-a", &format!("namespace: {}", ns.name))
            .replace("namespace: demo", &format!("namespace: {}", ns.name));
        let docs: Vec<String> = text
            .split("\n---")
            .filter(|d| !d.contains("kind: Namespace"))
            .map(String::from)
            .collect();
        let out = apply(&ns, &docs.join("\n---\n").replace("apply -f -", ""));
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        seen += 1;
    }
    assert!(seen >= 3, "examples found: {seen}");
}

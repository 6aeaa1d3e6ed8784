//! The kubectl plugin (`kubectl agenttoken
//! status|rotate|revoke|plan|history|abandon`) run through the real kubectl
//! against the local control plane, and the operator watching a list of
//! namespaces.

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
pub(crate) fn plugin(ns: &TestNamespace, args: &[&str], stdin: Option<&str>) -> Output {
    plugin_as(&cluster().admin_kubeconfig, ns, args, stdin)
}

/// `kubectl agenttoken ARGS` as whoever `kubeconfig` names.
fn plugin_as(
    kubeconfig: &std::path::Path,
    ns: &TestNamespace,
    args: &[&str],
    stdin: Option<&str>,
) -> Output {
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
        .env("KUBECONFIG", kubeconfig);
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
    // Run first on a fresh cluster, the CRDs were not there yet.
    crate::support::install_crds();
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

/// `abandon` writes the status subresource: the restricted tenant (who may
/// do anything to AgentTokens but not their status) is refused by the API
/// server and the ledger is unchanged; a cluster admin abandons a failed
/// revocation, which `history` then shows with who and why. Terminal
/// entries are refused. No operator runs, and the AgentToken's issuer does
/// not exist: the ledger is written as admin, so nothing else writes it.
#[tokio::test]
async fn kubectl_agenttoken_abandon_is_for_platform_admins_and_history_shows_it() {
    use agent_token_operator::crd::TokenLife;
    use kube::api::{Patch, PatchParams};

    let ns = TestNamespace::new("plugin-abandon").await;
    crate::support::install_crds();
    let _tenant = crate::hostile::tenant(&ns).await;
    let admin = String::from_utf8(
        ns.kubectl(&[
            "auth",
            "whoami",
            "-o",
            "jsonpath={.status.userInfo.username}",
        ])
        .stdout,
    )
    .unwrap();
    assert!(!admin.is_empty(), "the admin's user name");
    assert!(
        apply(
            &ns,
            "apiVersion: agenttoken.dev/v1alpha1\nkind: AgentToken\nmetadata: {name: bot}\nspec:\n  issuerRef: {name: gone}\n  serviceAccountName: builder\n  lifetime: 1h\n"
        )
        .status
        .success()
    );
    let api: Api<AgentToken> = ns.api();
    // 10m30s ahead: "in 10m…" however long the steps before the view take.
    let soon = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(630);
    let later = jiff::Timestamp::now() + jiff::SignedDuration::from_mins(50);
    let ledger = serde_json::json!({"status": {"revision": 3, "history": [
        {"revision": 3, "fingerprint": "sha256:3333333333333333", "revocation": "Pending",
         "state": "Live", "expiresAt": later.to_string()},
        {"revision": 2, "fingerprint": "sha256:2222222222222222", "revocation": "Failed",
         "state": "Failed", "attempts": 4, "nextAttemptAt": soon.to_string(),
         "message": "issuer unreachable: connection refused",
         "expiresAt": later.to_string(),
         "issuer": {"kind": "TokenIssuer", "name": "gone", "uid": "0000-gone", "type": "webhook"}},
        {"revision": 1, "fingerprint": "sha256:1111111111111111", "revocation": "Revoked",
         "state": "Revoked"}
    ]}});
    api.patch_status("bot", &PatchParams::default(), &Patch::Merge(&ledger))
        .await
        .expect("write the ledger as admin");
    let before = api.get("bot").await.unwrap().status.unwrap();

    // The ledger view: state, attempts, next attempt, message; r2 is open.
    let table = ok(&plugin(&ns, &["history", "bot"], None));
    let header = table.lines().nth(1).unwrap_or_default();
    for col in ["REVISION", "STATE", "ATTEMPTS", "NEXT ATTEMPT", "MESSAGE"] {
        assert!(header.contains(col), "{table}");
    }
    let row = |table: &str, rev: &str| -> String {
        table
            .lines()
            .find(|l| l.split_whitespace().next() == Some(rev))
            .unwrap_or_default()
            .to_string()
    };
    let r2 = row(&table, "2");
    for want in [
        "Failed",
        " 4 ",
        "in 10m",
        "issuer unreachable: connection refused",
    ] {
        assert!(r2.contains(want), "{want:?} in {r2:?}\n{table}");
    }
    assert!(
        table.contains("Revocations: 1 open (r2 Failed, next attempt in 10m"),
        "{table}"
    );
    let view: serde_json::Value =
        serde_json::from_str(&ok(&plugin(&ns, &["history", "bot", "-o", "json"], None))).unwrap();
    assert_eq!(view["open"], serde_json::json!([2]));
    assert_eq!(view["stuck"], serde_json::json!([]));
    assert_eq!(view["entries"][1]["attempts"], 4);
    let status_table = ok(&plugin(&ns, &["status", "bot"], None));
    assert!(
        status_table.contains("REVOCATIONS") && status_table.contains("1 open"),
        "{status_table}"
    );

    // The tenant: the API server refuses the status write; nothing changed.
    let refused = plugin_as(
        &cluster().restricted_kubeconfig,
        &ns,
        &["abandon", "bot", "--revision", "2", "--reason", "hide it"],
        None,
    );
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{said}");
    assert!(
        said.contains(r#"cannot patch resource "agenttokens/status""#),
        "refused by the API server's RBAC: {said}"
    );
    assert_eq!(
        api.get("bot").await.unwrap().status.unwrap(),
        before,
        "the tenant changed nothing"
    );

    // An admin: a revocation that is over cannot be abandoned...
    let over = plugin(
        &ns,
        &["abandon", "bot", "--revision", "1", "--reason", "x"],
        None,
    );
    assert!(!over.status.success());
    let said = String::from_utf8_lossy(&over.stderr);
    assert!(said.contains("revision 1 is Revoked"), "{said}");
    // ... a failing one can.
    let reason = "issuer decommissioned; the token expires within the hour";
    let out = ok(&plugin(
        &ns,
        &["abandon", "bot", "--revision", "2", "--reason", reason],
        None,
    ));
    assert!(
        out.contains(&format!("abandoned by {admin}")) && out.contains("it was Failed"),
        "{out}"
    );
    let after = api.get("bot").await.unwrap().status.unwrap();
    let entry = |st: &agent_token_operator::crd::AgentTokenStatus, rev: i64| {
        st.history
            .iter()
            .find(|e| e.revision == rev)
            .cloned()
            .unwrap()
    };
    let r2 = entry(&after, 2);
    assert_eq!(r2.state, Some(TokenLife::Abandoned));
    assert_eq!(r2.abandoned_by.as_deref(), Some(admin.as_str()));
    assert_eq!(r2.message.as_deref(), Some(reason));
    assert_eq!(r2.next_attempt_at, None);
    let was = entry(&before, 2);
    assert_eq!(
        (r2.attempts, &r2.fingerprint, &r2.issuer, &r2.expires_at),
        (was.attempts, &was.fingerprint, &was.issuer, &was.expires_at),
        "the rest of the entry is kept"
    );
    for rev in [1, 3] {
        assert_eq!(entry(&after, rev), entry(&before, rev), "r{rev} untouched");
    }

    // The view shows it, and nothing is open any more.
    let table = ok(&plugin(&ns, &["history", "bot"], None));
    let r2 = row(&table, "2");
    assert!(
        r2.contains("Abandoned") && r2.contains(&format!("(abandoned by {admin})")),
        "{table}"
    );
    assert!(
        table.contains("Revocations: none open, none stuck."),
        "{table}"
    );
    // Once abandoned, it stays so.
    let again = plugin(
        &ns,
        &["abandon", "bot", "--revision", "2", "--reason", "again"],
        None,
    );
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("revision 2 is Abandoned"));
}

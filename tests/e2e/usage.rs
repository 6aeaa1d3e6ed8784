//! Usage tracking (issue 20) on the node: the local API server sends its
//! audit events (requests made with service-account tokens, Metadata level)
//! to the operator's usage endpoint (`e2e/cluster usage` prints its flags);
//! an agent Pod that uses its token against the API server shows up in the
//! AgentToken's `status.usage` with the Pod's address.
//!
//! The API server's audit webhook has one fixed address, so the tests here
//! take turns ([`ENDPOINT`]).

use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};

use agent_token_operator::crd::AgentToken;

use crate::helm::ok;
use crate::support::{Operator, SA_ISSUER, TestNamespace, applied, eventually, repo_root};

/// One operator at a time listens where the API server sends audit events.
static ENDPOINT: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `--usage-*` flags for an operator, from `e2e/cluster usage`.
fn usage_flags() -> Vec<String> {
    let out = ok(
        Command::new(repo_root().join("e2e/cluster"))
            .arg("usage")
            .output()
            .expect("run e2e/cluster usage"),
        "e2e/cluster usage",
    );
    let w: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(w.len(), 4, "address, certificate, key, token file: {out}");
    [
        "--usage-address",
        w[0],
        "--usage-tls-cert-file",
        w[1],
        "--usage-tls-key-file",
        w[2],
        "--usage-token-file",
        w[3],
    ]
    .map(String::from)
    .to_vec()
}

/// The test agent using its token against the API server every second,
/// trusting the cluster's CA (the `kube-root-ca.crt` ConfigMap).
fn agent_using_its_token(name: &str, secret: &str, api_host: &str, api_port: &str) -> String {
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
        env:
        - {{name: USE_URL, value: "https://{api_host}:{api_port}/api"}}
        - {{name: USE_CA_FILE, value: /var/run/kube-ca/ca.crt}}
        volumeMounts:
        - {{name: token, mountPath: /var/run/secrets/agenttoken, readOnly: true}}
        - {{name: ca, mountPath: /var/run/kube-ca, readOnly: true}}
      volumes:
      - {{name: token, secret: {{secretName: {secret}}}}}
      - {{name: ca, configMap: {{name: kube-root-ca.crt}}}}
"#
    )
}

/// An agent Pod using its serviceAccount token against the real API server
/// appears in `status.usage` within seconds: the revision, a request
/// count, the Pod's own address and its user agent. The mapping is by the
/// token's JWT ID, recorded in the ledger when it was minted.
#[tokio::test]
async fn usage_an_agent_pod_using_its_token_appears_in_status_with_its_pod_address() {
    crate::node::node();
    let _turn = ENDPOINT.lock().await;
    let ns = TestNamespace::new("usage-pod").await;
    let flags = usage_flags();
    let mut args: Vec<&str> = vec!["--leader-election=false"];
    args.extend(flags.iter().map(String::as_str));
    let op = Operator::start_with(&ns.name, "usage", &args);
    applied(&ns, SA_ISSUER);
    applied(
        &ns,
        r#"
apiVersion: agenttoken.dev/v1alpha1
kind: AgentToken
metadata: {name: bot}
spec:
  issuerRef: {name: sa}
  serviceAccountName: builder
  lifetime: 10m
  consumers: {restart: None}
"#,
    );
    let ats: Api<AgentToken> = ns.api();
    let credential = eventually(
        Duration::from_secs(30),
        "bot minted, its JWT ID in the ledger",
        || async {
            let st = ats.get("bot").await.ok()?.status?;
            let e = st.history.iter().find(|e| e.revision == st.revision)?;
            e.credential_id.clone()
        },
    )
    .await;
    assert!(credential.starts_with("jti:"), "{credential}");

    let (api_host, api_port) = crate::release::pod_api();
    applied(
        &ns,
        &agent_using_its_token("agent", "bot", &api_host, &api_port),
    );
    let pods: Api<Pod> = ns.api();
    let pod_ip = eventually(Duration::from_secs(90), "the agent Pod running", || async {
        let p = pods
            .list(&ListParams::default().labels("app=agent"))
            .await
            .ok()?
            .items
            .into_iter()
            .next()?;
        let st = p.status?;
        (st.phase.as_deref() == Some("Running")).then_some(st.pod_ip?)
    })
    .await;
    let running = Instant::now();
    let usage = eventually(
        Duration::from_secs(30),
        "the agent's use in status.usage",
        || async {
            let st = ats.get("bot").await.ok()?.status?;
            let u = st.usage?.tokens.into_iter().find(|t| t.revision == 1)?;
            (u.requests > 0 && u.sources.contains(&pod_ip)).then_some(u)
        },
    )
    .await;
    eprintln!(
        "use seen in status {:?} after the Pod ran: {} requests from {:?}, last at {:?}, agent {:?}",
        running.elapsed(),
        usage.requests,
        usage.sources,
        usage.last_used,
        usage.user_agent
    );
    assert_eq!(
        usage.user_agent.as_deref(),
        Some("agenttoken-e2e-agent/1.0")
    );
    assert_eq!(
        usage.sources,
        std::slice::from_ref(&pod_ip),
        "only the Pod used it"
    );
    // It keeps counting.
    let before = usage.requests;
    eventually(Duration::from_secs(15), "more uses counted", || async {
        let st = ats.get("bot").await.ok()?.status?;
        let u = st.usage?.tokens.into_iter().find(|t| t.revision == 1)?;
        (u.requests > before).then_some(())
    })
    .await;
    // The plugin shows it: when, how often, from where.
    let table = ok(
        crate::plugin::plugin(&ns, &["status", "bot"], None),
        "kubectl agenttoken status",
    );
    assert!(table.contains("LAST USED"), "{table}");
    assert!(
        table.contains(&format!("req, from {pod_ip}")),
        "the Pod's address in the table: {table}"
    );
    let json = ok(
        crate::plugin::plugin(&ns, &["status", "bot", "-o", "json"], None),
        "kubectl agenttoken status -o json",
    );
    assert!(
        json.contains("\"usage\"") && json.contains(&pod_ip),
        "{json}"
    );
    let metrics = op
        .http_get("/metrics")
        .await
        .map(|(_, body)| body)
        .unwrap_or_default();
    assert!(
        metrics.contains("agenttoken_usage_events_total{result=\"matched\"}"),
        "{metrics}"
    );

    // The endpoint is the API server's alone: a tenant who finds it cannot
    // report uses (or flood the tracker) without the webhook's token.
    let ca = std::path::Path::new(&flags[3]).with_file_name("ca.crt");
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap())
        .build()
        .unwrap();
    let url = format!("https://{}/audit", flags[1]);
    let forged = serde_json::json!({"kind": "EventList", "items": []}).to_string();
    for auth in [None, Some("Bearer not-the-token")] {
        let mut req = client.post(&url).body(forged.clone());
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        let status = req
            .send()
            .await
            .expect("the usage endpoint answers")
            .status();
        assert_eq!(status.as_u16(), 401, "{auth:?}");
    }
}

//! Usage tracking (issue 20) on the node: the local API server sends its
//! audit events (requests made with service-account tokens, Metadata level)
//! to the operator's usage endpoint (`e2e/cluster usage` prints its flags);
//! an agent Pod that uses its token against the API server shows up in the
//! AgentToken's `status.usage` with the Pod's address.
//!
//! The API server's audit webhook has one fixed address, so the tests here
//! take turns ([`ENDPOINT`]).

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};

use agent_token_operator::crd::{AgentToken, TokenLife};

use crate::helm::ok;
use crate::support::{Operator, SA_ISSUER, TestNamespace, applied, eventually, token_of};

/// One operator at a time listens where the API server sends audit events.
static ENDPOINT: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `--usage-*` flags for an operator, from `e2e/cluster usage`.
fn usage_flags() -> Vec<String> {
    let w = crate::support::cluster_words("usage");
    assert_eq!(w.len(), 4, "address, certificate, key, token file: {w:?}");
    [
        "--usage-address",
        &w[0],
        "--usage-tls-cert-file",
        &w[1],
        "--usage-tls-key-file",
        &w[2],
        "--usage-token-file",
        &w[3],
    ]
    .map(String::from)
    .to_vec()
}

/// An operator for `ns` serving the API server's audit webhook, and its
/// usage flags.
fn usage_operator(ns: &TestNamespace) -> (Operator, Vec<String>) {
    let flags = usage_flags();
    let mut args: Vec<&str> = vec!["--leader-election=false"];
    args.extend(flags.iter().map(String::as_str));
    (Operator::start_with(&ns.name, "usage", &args), flags)
}

/// An AgentToken `bot` on the `sa` issuer (SA_ISSUER), with `extra` spec
/// lines (two-space indented).
fn sa_bot(extra: &str) -> String {
    format!(
        "apiVersion: agenttoken.dev/v1alpha1\nkind: AgentToken\nmetadata: {{name: bot}}\n\
         spec:\n  issuerRef: {{name: sa}}\n  serviceAccountName: builder\n  lifetime: 10m\n{extra}"
    )
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
    let (op, flags) = usage_operator(&ns);
    applied(&ns, SA_ISSUER);
    applied(&ns, &sa_bot("  consumers: {restart: None}\n"));
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

/// The same token used from the host (not a Pod that uses the Secret)
/// raises `UnexpectedSource`; with `onUnexpectedSource: Revoke` the token
/// is dead at once (TokenReview says so) and the consumer's new Pod holds
/// a new one, whose uses are expected.
#[tokio::test]
async fn usage_a_token_used_from_the_host_is_unexpected_and_with_revoke_dies_at_once() {
    crate::node::node();
    let _turn = ENDPOINT.lock().await;
    let ns = TestNamespace::new("usage-steal").await;
    let (_op, flags) = usage_operator(&ns);
    applied(&ns, SA_ISSUER);
    // A tenant's malformed expected sources are refused at admission.
    crate::hostile::tenant(&ns).await;
    let out = crate::hostile::apply_as_tenant(
        &ns.name,
        "apiVersion: agenttoken.dev/v1alpha1\nkind: AgentToken\nmetadata: {name: odd}\n\
         spec: {issuerRef: {name: sa}, serviceAccountName: builder,\n\
         usage: {expectedSources: [\"10.0.0.0/8\", \"everywhere\"]}}\n",
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("each expected source is a CIDR"),
        "{said}"
    );
    applied(
        &ns,
        &sa_bot(
            "  previousTokenGracePeriod: 0s\n  consumers: {strategy: RolloutRestart}\n  usage: {onUnexpectedSource: Revoke}\n",
        ),
    );
    let (api_host, api_port) = crate::release::pod_api();
    applied(
        &ns,
        &agent_using_its_token("agent", "bot", &api_host, &api_port),
    );
    let ats: Api<AgentToken> = ns.api();
    // The real consumer's uses are expected.
    eventually(
        Duration::from_secs(90),
        "the agent's uses seen, all expected",
        || async {
            let at = ats.get("bot").await.ok()?;
            let st = at.status?;
            let u = st.usage?.tokens.into_iter().find(|t| t.revision == 1)?;
            (u.requests > 0 && u.unexpected_sources.is_empty()).then_some(())
        },
    )
    .await;
    // A copy is stolen later than the per-AgentToken mint floor (10 s
    // after the last mint), which would otherwise hold the replacement back.
    let issued = ats
        .get("bot")
        .await
        .unwrap()
        .status
        .and_then(|s| s.issued_at)
        .expect("issuedAt")
        .0;
    let age = jiff::Timestamp::now().duration_since(issued).as_secs_f64();
    if age < 12.0 {
        tokio::time::sleep(Duration::from_secs_f64(12.0 - age)).await;
    }
    let stolen = token_of(&ns, "bot").await.expect("the token");
    assert!(crate::agenttoken::review(&ns, &stolen).await.is_some());

    // Someone uses a copy from the host.
    let server = crate::support::api_server();
    let ca = std::path::Path::new(&flags[3]).with_file_name("ca.crt");
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap())
        .build()
        .unwrap();
    let used = Instant::now();
    let status = client
        .get(format!("{server}/api"))
        .bearer_auth(&stolen)
        .header("User-Agent", "curl/8.0")
        .send()
        .await
        .expect("a request with the stolen token")
        .status();
    let used_at = jiff::Timestamp::now();
    assert_eq!(status.as_u16(), 200, "the copy worked until now");

    // The operator revokes it (deletes its binding) within seconds. The
    // API server caches a successful token authentication for 10 s
    // (TokenSuccessCacheTTL, not a flag), so the copy, tried again a
    // second after the revocation, still works: a use after revocation,
    // reported as one. (Once the cache is gone, kube-apiserver refuses the
    // token and its audit record names no credential: nothing to map.)
    let revoked_at = eventually(Duration::from_secs(20), "revision 1 revoked", || async {
        let st = ats.get("bot").await.ok()?.status?;
        let e = st.history.iter().find(|e| e.revision == 1)?;
        e.revoked_at.as_ref().map(|t| t.0)
    })
    .await;
    let wait = (revoked_at + jiff::SignedDuration::from_millis(1200))
        .duration_since(jiff::Timestamp::now())
        .as_secs_f64();
    if wait > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(wait)).await;
    }
    let again = client
        .get(format!("{server}/api"))
        .bearer_auth(&stolen)
        .send()
        .await
        .expect("the copy tried again")
        .status()
        .as_u16();
    eprintln!(
        "the copy tried again after its revocation: HTTP {again}, {:?} after the first use",
        used.elapsed()
    );
    if again == 200 {
        eventually(
            Duration::from_secs(15),
            "the use after revocation reported",
            || async {
                let st = ats.get("bot").await.ok()?.status?;
                let u = st.usage?.tokens.into_iter().find(|t| t.revision == 1)?;
                let cond = st
                    .conditions
                    .iter()
                    .find(|c| c.type_ == "UsedAfterRevocation")?
                    .clone();
                (u.requests_after_revocation >= 1 && cond.status == "True").then_some(())
            },
        )
        .await;
    } else {
        assert_eq!(again, 401, "refused, or accepted from the cache");
    }

    // Dead at the API server within seconds of its use.
    eventually(
        Duration::from_secs(20),
        "the stolen token refused by TokenReview",
        || async {
            crate::agenttoken::review(&ns, &stolen)
                .await
                .is_none()
                .then_some(())
        },
    )
    .await;
    let dead_after = used.elapsed();

    // Status says what happened, and why.
    let at = eventually(
        Duration::from_secs(20),
        "revision 2 minted for UnexpectedSource",
        || async {
            let at = ats.get("bot").await.ok()?;
            let st = at.status.as_ref()?;
            (st.revision >= 2
                && st.last_rotation_reason
                    == Some(agent_token_operator::crd::RotationReason::UnexpectedSource))
            .then_some(at)
        },
    )
    .await;
    let st = at.status.unwrap();
    // The operator revoked it (deleted its binding) within seconds; the API
    // server then accepts it for at most 10 s more: kube-apiserver caches a
    // successful token authentication for 10 s (TokenSuccessCacheTTL, not
    // a flag), and this token was just used.
    let revoked_at = st
        .history
        .iter()
        .find(|e| e.revision == 1)
        .and_then(|e| e.revoked_at.as_ref())
        .expect("revision 1 revoked")
        .0;
    let revoked_after = revoked_at.duration_since(used_at).as_secs_f64().max(0.0);
    eprintln!(
        "used from the host; revoked by the operator {revoked_after:.1} s later (status, whole seconds); refused by TokenReview {dead_after:?} after the use"
    );
    assert!(
        revoked_after <= 5.0,
        "revoked within seconds of the use: {revoked_after} s"
    );
    let old = st
        .usage
        .as_ref()
        .and_then(|u| u.tokens.iter().find(|t| t.revision == 1));
    assert!(
        old.is_some_and(|t| t.unexpected_sources.contains(&"127.0.0.1".to_string())),
        "the host's address recorded as unexpected: {:?}",
        st.usage
    );
    let cond = st
        .conditions
        .iter()
        .find(|c| c.type_ == "UnexpectedSource")
        .expect("the UnexpectedSource condition");
    assert_eq!(
        (cond.status.as_str(), cond.reason.as_str()),
        ("True", "UnexpectedSource")
    );
    let events = ns
        .kubectl(&["get", "events.events.k8s.io", "-o", "json"])
        .stdout;
    let events = String::from_utf8_lossy(&events);
    assert!(
        events.contains("\"reason\": \"UnexpectedSource\"") && events.contains("127.0.0.1"),
        "a Warning Event UnexpectedSource naming the address"
    );
    assert!(!events.contains(&stolen), "no token in Events");

    // The consumer was restarted with the new token, and its uses of it
    // are expected.
    // (Status names revision 2 once the issuer answered, a moment before
    // the Secret holds it.)
    let fresh = eventually(Duration::from_secs(20), "the new token", || async {
        token_of(&ns, "bot").await.filter(|t| *t != stolen)
    })
    .await;
    assert_ne!(fresh, stolen);
    eventually(
        Duration::from_secs(90),
        "the new Pod using revision 2, expected",
        || async {
            let st = ats.get("bot").await.ok()?.status?;
            let u = st
                .usage?
                .tokens
                .into_iter()
                .find(|t| t.revision == st.revision)?;
            (u.requests > 0 && u.unexpected_sources.is_empty()).then_some(())
        },
    )
    .await;
    assert!(crate::agenttoken::review(&ns, &fresh).await.is_some());
}

/// A Vault child token used against the real OpenBao (from PyPI) is seen
/// through OpenBao's `socket` audit device, declared in its configuration
/// (OpenBao refuses audit devices enabled through its API): the entry's
/// accessor maps the use to the revision, its remote address is the
/// source. The device's `prefix` is the shared secret; a connection that
/// does not send it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_a_vault_token_used_against_real_openbao_is_seen_through_its_socket_audit_device() {
    let ns = TestNamespace::new("usage-bao").await;
    let port = crate::support::free_port();
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!(
        "{}{}{}",
        crate::support::random_suffix(),
        crate::support::random_suffix(),
        crate::support::random_suffix()
    );
    let prefix_file = dir.path().join("prefix");
    std::fs::write(&prefix_file, &prefix).unwrap();
    let address = format!("127.0.0.1:{port}");
    let op = Operator::start_with(
        &ns.name,
        "usage",
        &[
            "--leader-election=false",
            "--usage-vault-audit-address",
            &address,
            "--usage-vault-audit-prefix-file",
            prefix_file.to_str().unwrap(),
        ],
    );
    // The listener first: OpenBao fails requests it cannot audit anywhere
    // (a file device beside the socket keeps it serving if the operator is
    // down, as the README recommends).
    eventually(Duration::from_secs(30), "the audit listener", || async {
        tokio::net::TcpStream::connect(&address)
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    // OpenBao refuses audit prefixes unless its configuration allows them
    // (a hardening after the 2025 audit-device CVEs).
    let config = format!(
        "allow_audit_log_prefixing = true\naudit \"socket\" \"agenttoken\" {{\n  options {{\n    address = \"{address}\"\n    socket_type = \"tcp\"\n    hmac_accessor = \"false\"\n    prefix = \"{prefix}\"\n  }}\n}}\naudit \"file\" \"local\" {{\n  options {{\n    file_path = \"{}\"\n  }}\n}}\n",
        dir.path().join("audit.log").display()
    );
    let bao = crate::vault::OpenBao::start_with_config(&config).await;
    // A ClusterTokenIssuer: accessors are mapped only for the platform's
    // issuers (a namespaced one may point at a Vault its tenant runs). Its
    // token Secret lives in the operator's namespace, here the test's.
    let s: k8s_openapi::api::core::v1::Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "bao-token"},
        "stringData": {"token": bao.root},
    }))
    .unwrap();
    ns.api::<k8s_openapi::api::core::v1::Secret>()
        .create(&Default::default(), &s)
        .await
        .unwrap();
    let issuer = format!("bao-{}", ns.name);
    struct Cleanup(String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = crate::support::kubectl_as(
                &crate::support::cluster().admin_kubeconfig,
                None,
                &["delete", "clustertokenissuer", &self.0, "--wait=false"],
            );
        }
    }
    let _cleanup = Cleanup(issuer.clone());
    applied(
        &ns,
        &format!(
            r#"
apiVersion: agenttoken.dev/v1alpha1
kind: ClusterTokenIssuer
metadata: {{name: {issuer}}}
spec:
  vault:
    address: {addr}
    auth: {{tokenSecretRef: {{name: bao-token, key: token}}}}
    auditDevice: agenttoken
  policy:
    maxLifetime: 1h
    allowedScopes: [default]
    allowedNamespaces: [{ns}]
---
apiVersion: agenttoken.dev/v1alpha1
kind: AgentToken
metadata: {{name: bot}}
spec:
  issuerRef: {{kind: ClusterTokenIssuer, name: {issuer}}}
  lifetime: 10m
  scopes: [default]
  consumers: {{restart: None}}
"#,
            addr = bao.addr,
            ns = ns.name
        ),
    );
    let ats: Api<AgentToken> = ns.api();
    // The credential id is the token's HMAC under the socket device
    // (sys/audit-hash at mint): every entry carries it, a request with the
    // token after its revocation too.
    let (credential, handle) = eventually(
        Duration::from_secs(30),
        "bot minted, its audit HMAC in the ledger",
        || async {
            let st = ats.get("bot").await.ok()?.status?;
            let e = st.history.iter().find(|e| e.revision == st.revision)?;
            Some((e.credential_id.clone()?, e.handle.clone()?))
        },
    )
    .await;
    assert!(credential.starts_with("vault-hmac:"), "{credential}");
    let token = crate::vault::token_in_secret(&ns).await;
    for _ in 0..3 {
        let (status, _) = bao
            .call_as(token.trim(), "GET", "auth/token/lookup-self", None)
            .await;
        assert_eq!(status, 200, "the child token works");
    }
    let usage = eventually(
        Duration::from_secs(20),
        "the token's use in status.usage",
        || async {
            let st = ats.get("bot").await.ok()?.status?;
            let u = st.usage?.tokens.into_iter().find(|t| t.revision == 1)?;
            (u.requests >= 3).then_some(u)
        },
    )
    .await;
    assert_eq!(usage.sources, ["127.0.0.1"]);

    // Without the prefix, nothing is taken.
    use tokio::io::AsyncWriteExt;
    let mut forged = tokio::net::TcpStream::connect(&address).await.unwrap();
    let accessor = handle.trim_start_matches("vault-accessor:");
    let line = format!(
        "{{\"type\":\"response\",\"time\":\"2026-11-29T10:00:00Z\",\"auth\":{{\"accessor\":\"{accessor}\"}},\"request\":{{\"remote_address\":\"203.0.113.9\"}}}}\n"
    );
    forged.write_all(line.as_bytes()).await.unwrap();
    drop(forged);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let st = ats.get("bot").await.unwrap().status.unwrap();
    let u = st
        .usage
        .unwrap()
        .tokens
        .into_iter()
        .find(|t| t.revision == 1)
        .unwrap();
    assert!(!u.sources.contains(&"203.0.113.9".to_string()), "{u:?}");
    let metrics = op
        .http_get("/metrics")
        .await
        .map(|(_, body)| body)
        .unwrap_or_default();
    assert!(
        metrics.contains("agenttoken_usage_events_total{result=\"unauthorized\"}"),
        "{metrics}"
    );

    // Revoked now; the copy tried again is refused by OpenBao, which logs
    // the request with the token's HMAC alone: a use after revocation.
    let patch =
        serde_json::json!({"metadata": {"annotations": {"agenttoken.dev/revoke": "stolen"}}});
    ats.patch(
        "bot",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&patch),
    )
    .await
    .unwrap();
    let revoked_at = eventually(Duration::from_secs(30), "revision 1 revoked", || async {
        let st = ats.get("bot").await.ok()?.status?;
        let e = st.history.iter().find(|e| e.revision == 1)?;
        (e.state == Some(TokenLife::Revoked)).then_some(e.revoked_at.as_ref()?.0)
    })
    .await;
    let wait = (revoked_at + jiff::SignedDuration::from_millis(1200))
        .duration_since(jiff::Timestamp::now())
        .as_secs_f64();
    if wait > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(wait)).await;
    }
    let (status, _) = bao
        .call_as(token.trim(), "GET", "auth/token/lookup-self", None)
        .await;
    assert_eq!(status, 403, "the revoked child token is refused");
    eventually(
        Duration::from_secs(20),
        "the use after revocation in status, its condition and Event",
        || async {
            let st = ats.get("bot").await.ok()?.status?;
            let u = st.usage?.tokens.into_iter().find(|t| t.revision == 1)?;
            let cond = st
                .conditions
                .iter()
                .find(|c| c.type_ == "UsedAfterRevocation")?
                .clone();
            let events = ns
                .kubectl(&["get", "events.events.k8s.io", "-o", "json"])
                .stdout;
            let reported = String::from_utf8_lossy(&events).contains("\"UsedAfterRevocation\"");
            (u.requests_after_revocation >= 1 && cond.status == "True" && reported).then_some(())
        },
    )
    .await;
    let metrics = op
        .http_get("/metrics")
        .await
        .map(|(_, body)| body)
        .unwrap_or_default();
    assert!(
        metrics.contains("agenttoken_uses_after_revocation_total{issuer_type=\"vault\"} 1"),
        "{metrics}"
    );
    assert!(
        !op.logs().contains(token.trim()),
        "no token in the operator's logs"
    );
}

/// An AgentToken whose Secret no workload uses and whose token nobody uses
/// becomes `Unused`; with `onUnused: Revoke` the token is revoked (dead at
/// the API server), nothing new is minted while that lasts, and a
/// Deployment that uses the Secret brings a new token (`InUseAgain`).
#[tokio::test]
async fn usage_an_unused_token_is_revoked_and_minting_resumes_when_a_workload_uses_the_secret() {
    let ns = TestNamespace::new("usage-unused").await;
    let _op = Operator::start(&ns.name);
    applied(&ns, SA_ISSUER);
    applied(
        &ns,
        &sa_bot("  consumers: {restart: None}\n  usage: {unusedAfter: 10s, onUnused: Revoke}\n"),
    );
    let ats: Api<AgentToken> = ns.api();
    eventually(Duration::from_secs(30), "bot minted", || async {
        (ats.get("bot").await.ok()?.status?.revision == 1).then_some(())
    })
    .await;
    let first = token_of(&ns, "bot").await.expect("the first token");
    let st = eventually(
        Duration::from_secs(40),
        "Unused=True, revision 1 revoked, dormant",
        || async {
            let st = ats.get("bot").await.ok()?.status?;
            let unused = st
                .conditions
                .iter()
                .any(|c| c.type_ == "Unused" && c.status == "True" && c.reason == "Unused");
            let revoked = st.history.iter().any(|e| {
                e.revision == 1 && e.state == Some(agent_token_operator::crd::TokenLife::Revoked)
            });
            (unused && revoked && st.dormant_since.is_some()).then_some(st)
        },
    )
    .await;
    assert_eq!(st.revision, 1);
    assert_eq!(
        token_of(&ns, "bot").await,
        None,
        "the Secret no longer holds it"
    );
    eventually(Duration::from_secs(20), "the unused token dead", || async {
        crate::agenttoken::review(&ns, &first)
            .await
            .is_none()
            .then_some(())
    })
    .await;
    let events = String::from_utf8_lossy(
        &ns.kubectl(&["get", "events.events.k8s.io", "-o", "json"])
            .stdout,
    )
    .into_owned();
    assert!(
        events.contains("\"reason\": \"Unused\""),
        "a Warning Event Unused"
    );
    // Nothing new while nothing uses the Secret.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(ats.get("bot").await.unwrap().status.unwrap().revision, 1);

    // A workload that uses the Secret: a new token, said why.
    applied(
        &ns,
        r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: worker}
spec:
  replicas: 0
  selector: {matchLabels: {app: worker}}
  template:
    metadata: {labels: {app: worker}}
    spec:
      containers:
      - name: worker
        image: agenttoken.local/agent:e2e
        volumeMounts: [{name: token, mountPath: /var/run/secrets/agenttoken, readOnly: true}]
      volumes: [{name: token, secret: {secretName: bot}}]
"#,
    );
    let st = eventually(
        Duration::from_secs(60),
        "revision 2 minted for InUseAgain",
        || async {
            let st = ats.get("bot").await.ok()?.status?;
            (st.revision == 2
                && st.last_rotation_reason
                    == Some(agent_token_operator::crd::RotationReason::InUseAgain))
            .then_some(st)
        },
    )
    .await;
    assert!(st.dormant_since.is_none());
    let second = token_of(&ns, "bot").await.expect("the new token");
    assert!(crate::agenttoken::review(&ns, &second).await.is_some());
    eventually(Duration::from_secs(30), "Unused=False (InUse)", || async {
        let st = ats.get("bot").await.ok()?.status?;
        st.conditions
            .iter()
            .any(|c| c.type_ == "Unused" && c.status == "False" && c.reason == "InUse")
            .then_some(())
    })
    .await;
}

/// An operator in `ns` serving introspection alone (no audit webhook) on a
/// port of its own, with a bearer token made now; the URL base and the
/// token.
fn introspecting_operator(ns: &TestNamespace) -> (Operator, String, String) {
    let w = crate::support::cluster_words("usage");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = crate::support::repo_root().join(format!("target/e2e-introspection/{}", ns.name));
    std::fs::create_dir_all(&dir).unwrap();
    let bearer = hex::encode(rand::random::<[u8; 16]>());
    let file = dir.join("tokens");
    std::fs::write(&file, format!("{bearer}\n")).unwrap();
    let address = format!("127.0.0.1:{port}");
    let args = [
        "--leader-election=false",
        "--usage-address",
        &address,
        "--usage-tls-cert-file",
        &w[1],
        "--usage-tls-key-file",
        &w[2],
        "--usage-introspection-token-file",
        file.to_str().unwrap(),
    ];
    let op = Operator::start_with(&ns.name, "introspect", &args);
    (op, format!("https://{address}/introspect"), bearer)
}

/// A jwt the operator signed, checked by a resource server through RFC 7662
/// introspection: active (with its claims) at its own issuer's endpoint
/// and nowhere else, its use in `status.usage`; once revoked, the same
/// token answers `active: false` and its use after the revocation is
/// reported (the `UsedAfterRevocation` condition, a Warning Event, a
/// metric). The AgentToken is the restricted tenant's; the tenant, who
/// knows the endpoint but not its bearer token, is refused.
#[tokio::test]
async fn usage_a_jwt_checked_through_introspection_is_seen_and_once_revoked_answers_inactive() {
    let ns = TestNamespace::new("usage-intro").await;
    let (op, base, bearer) = introspecting_operator(&ns);
    crate::jwt::put_key(&ns, &crate::jwt::ec_pem()).await;
    applied(&ns, crate::jwt::ISSUER);
    crate::hostile::tenant(&ns).await;
    let out = crate::hostile::apply_as_tenant(&ns.name, crate::jwt::BOT);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ats: Api<AgentToken> = ns.api();
    eventually(Duration::from_secs(30), "bot Ready", || async {
        let st = ats.get("bot").await.ok()?.status?;
        (st.revision == 1 && st.history.iter().any(|e| e.credential_id.is_some())).then_some(())
    })
    .await;
    let token = token_of(&ns, "bot").await.expect("the jwt");

    let w = crate::support::cluster_words("usage");
    let ca = std::path::Path::new(&w[3]).with_file_name("ca.crt");
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap())
        .build()
        .unwrap();
    let own = format!("{base}/tokenissuers/{}/agents", ns.name);
    let ask = |url: String, bearer: Option<String>, token: String| {
        let client = client.clone();
        async move {
            let mut req = client
                .post(url)
                .form(&[("token", token), ("token_type_hint", "access_token".into())]);
            if let Some(b) = bearer {
                req = req.bearer_auth(b);
            }
            let resp = req
                .send()
                .await
                .expect("the introspection endpoint answers");
            let status = resp.status().as_u16();
            let body: serde_json::Value = resp.json().await.unwrap_or_default();
            (status, body)
        }
    };
    // The tenant, without the resource servers' bearer token.
    for bearer in [None, Some("guessed".to_string())] {
        let (status, _) = ask(own.clone(), bearer, token.clone()).await;
        assert_eq!(status, 401);
    }
    let (status, answer) = ask(own.clone(), Some(bearer.clone()), token.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(answer["active"], true, "{answer}");
    assert_eq!(answer["sub"], format!("{}/bot", ns.name));
    assert_eq!(answer["scope"], "deploy");
    assert_eq!(answer["iss"], "https://agents.example");
    // Not active where another issuer (a ClusterTokenIssuer of that name,
    // a TokenIssuer of another namespace) is trusted.
    for elsewhere in [
        format!("{base}/clustertokenissuers/agents"),
        format!("{base}/tokenissuers/default/agents"),
    ] {
        let (_, answer) = ask(elsewhere, Some(bearer.clone()), token.clone()).await;
        assert_eq!(answer, serde_json::json!({"active": false}));
    }
    // A token that is not the operator's, with the same claims.
    let forged = format!("{}A", &token[..token.len() - 1]);
    let forged = if forged == token {
        format!("{}B", &token[..token.len() - 1])
    } else {
        forged
    };
    let (_, answer) = ask(own.clone(), Some(bearer.clone()), forged).await;
    assert_eq!(answer, serde_json::json!({"active": false}));
    eventually(
        Duration::from_secs(15),
        "the introspected use in status",
        || async {
            let st = ats.get("bot").await.ok()?.status?;
            let u = st.usage?.tokens.into_iter().find(|t| t.revision == 1)?;
            (u.requests >= 2 && u.last_used.is_some()).then_some(())
        },
    )
    .await;

    // Revoked: a new token replaces it, and the old one is inactive.
    let out = crate::hostile::apply_as_tenant(
        &ns.name,
        &crate::jwt::BOT.replace(
            "metadata: {name: bot}",
            "metadata: {name: bot, annotations: {agenttoken.dev/revoke: drill-1}}",
        ),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually(Duration::from_secs(30), "revision 1 withdrawn", || async {
        let st = ats.get("bot").await.ok()?.status?;
        let old = st.history.iter().find(|e| e.revision == 1)?;
        (st.revision == 2
            && !matches!(
                old.state,
                Some(TokenLife::Live | TokenLife::Grace | TokenLife::Minting)
            ))
        .then_some(())
    })
    .await;
    let fresh = token_of(&ns, "bot").await.expect("the new jwt");
    assert_ne!(fresh, token);
    // A second after the tracker saw the revocation (a use in the same
    // second as the revocation is never called one after it).
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (_, answer) = ask(own.clone(), Some(bearer.clone()), token.clone()).await;
    assert_eq!(
        answer,
        serde_json::json!({"active": false}),
        "revoked: inactive"
    );
    let (_, answer) = ask(own.clone(), Some(bearer.clone()), fresh.clone()).await;
    assert_eq!(answer["active"], true);

    let at = eventually(
        Duration::from_secs(20),
        "the use after revocation in status and its condition",
        || async {
            let at = ats.get("bot").await.ok()?;
            let st = at.status.as_ref()?;
            let old = st.usage.as_ref()?.tokens.iter().find(|t| t.revision == 1)?;
            let cond = st
                .conditions
                .iter()
                .find(|c| c.type_ == "UsedAfterRevocation")?;
            (old.requests_after_revocation >= 1 && cond.status == "True").then_some(at)
        },
    )
    .await;
    let st = at.status.unwrap();
    let old = st
        .usage
        .as_ref()
        .unwrap()
        .tokens
        .iter()
        .find(|t| t.revision == 1)
        .unwrap();
    assert!(old.last_used_after_revocation.is_some());
    let events = eventually(
        Duration::from_secs(20),
        "a Warning Event UsedAfterRevocation",
        || async {
            let events = ns
                .kubectl(&["get", "events.events.k8s.io", "-o", "json"])
                .stdout;
            let events = String::from_utf8_lossy(&events).to_string();
            events
                .contains("\"reason\": \"UsedAfterRevocation\"")
                .then_some(events)
        },
    )
    .await;
    assert!(events.contains("revision 1"), "{events}");
    assert!(
        !events.contains(&token) && !op.logs().contains(&token),
        "no token in Events or logs"
    );
    assert!(!op.logs().contains(&bearer), "no bearer token in logs");
    let metrics = op
        .http_get("/metrics")
        .await
        .map(|(_, b)| b)
        .unwrap_or_default();
    assert!(
        metrics.contains("agenttoken_uses_after_revocation_total{issuer_type=\"jwt\"} 1"),
        "{metrics}"
    );
    let table = ok(
        crate::plugin::plugin(&ns, &["status", "bot"], None),
        "kubectl agenttoken status",
    );
    assert!(table.contains("r1 used 1x after revocation"), "{table}");

    // A drill on the jwt: the operator's own introspection is the issuer's
    // answer, inactive as soon as the drill revoked it.
    let report = crate::drill::drill_report(&ns, "bot");
    assert_eq!(
        report.result,
        agent_token_operator::crd::DrillResult::Passed,
        "{report:?}"
    );
    assert!(
        report
            .refused_by
            .as_deref()
            .is_some_and(|r| r.starts_with("the operator's introspection")),
        "{report:?}"
    );
    let (_, answer) = ask(own.clone(), Some(bearer.clone()), fresh.clone()).await;
    assert_eq!(
        answer,
        serde_json::json!({"active": false}),
        "the drilled token"
    );
}

/// A Secret used only by a CronJob (or a bare Pod, or a Job) is not
/// unused: before a token is called `Unused`, the operator lists the
/// namespace's Pods, Jobs and CronJobs (once per 30 s per namespace). The
/// tenant's CronJob keeps its token; the tenant's token nothing uses is
/// revoked. The CronJob is suspended: what counts is that it would use the
/// Secret on its next run.
#[tokio::test]
async fn usage_a_secret_only_a_cron_job_or_a_bare_pod_uses_is_not_unused() {
    let ns = TestNamespace::new("usage-cron").await;
    let _op = Operator::start(&ns.name);
    applied(&ns, SA_ISSUER);
    crate::hostile::tenant(&ns).await;
    let unused = "  consumers: {restart: None}\n  usage: {unusedAfter: 10s, onUnused: Revoke}\n";
    for (name, consumer) in [
        (
            "nightly",
            r#"
apiVersion: batch/v1
kind: CronJob
metadata: {name: nightly}
spec:
  schedule: "0 3 * * *"
  suspend: true
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: Never
          containers:
          - name: job
            image: agenttoken.local/agent:e2e
            env: [{name: TOKEN, valueFrom: {secretKeyRef: {name: nightly, key: token}}}]
"#,
        ),
        (
            "by-hand",
            r#"
apiVersion: v1
kind: Pod
metadata: {name: by-hand}
spec:
  nodeName: does-not-exist
  containers:
  - name: agent
    image: agenttoken.local/agent:e2e
    volumeMounts: [{name: t, mountPath: /t}]
  volumes: [{name: t, projected: {sources: [{secret: {name: by-hand}}]}}]
"#,
        ),
        ("idle", ""),
    ] {
        let at = sa_bot(unused).replace(
            "metadata: {name: bot}",
            &format!("metadata: {{name: {name}}}"),
        );
        for yaml in [at.as_str(), consumer] {
            if yaml.is_empty() {
                continue;
            }
            let out = crate::hostile::apply_as_tenant(&ns.name, yaml);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let ats: Api<AgentToken> = ns.api();
    eventually(
        Duration::from_secs(60),
        "idle Unused and revoked",
        || async {
            let st = ats.get("idle").await.ok()?.status?;
            (st.dormant_since.is_some()
                && st.history.iter().any(|e| {
                    e.revision == 1
                        && e.state == Some(agent_token_operator::crd::TokenLife::Revoked)
                }))
            .then_some(())
        },
    )
    .await;
    // Well past unusedAfter for the other two as well.
    tokio::time::sleep(Duration::from_secs(5)).await;
    for name in ["nightly", "by-hand"] {
        let st = ats.get(name).await.unwrap().status.unwrap();
        let cond = st
            .conditions
            .iter()
            .find(|c| c.type_ == "Unused")
            .unwrap_or_else(|| panic!("{name}: an Unused condition: {:?}", st.conditions));
        assert_eq!(
            (cond.status.as_str(), cond.reason.as_str()),
            ("False", "InUse"),
            "{name}: {cond:?}"
        );
        assert!(
            cond.message.contains("Pod, Job or CronJob"),
            "{name}: {}",
            cond.message
        );
        assert!(st.dormant_since.is_none(), "{name}");
        assert!(
            token_of(&ns, name).await.is_some(),
            "{name} keeps its token"
        );
    }
}

//! AgentToken end to end with the ServiceAccount issuer (TokenRequest), on
//! the real local control plane: minting, rotation, grace, revocation,
//! ownership, drift, admission, policy, leader election.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{Event, Secret};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};

use agent_token_operator::crd::{AgentToken, RevocationState, RotationReason};

use crate::support::{Operator, TestNamespace, applied, apply, eventually};

/// What TokenReview says of a token: the username when authenticated.
pub(crate) async fn review(ns: &TestNamespace, token: &str) -> Option<String> {
    let api: Api<TokenReview> = Api::all(ns.client.clone());
    let tr = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_string()),
            audiences: None,
        },
        ..Default::default()
    };
    let result = api
        .create(&PostParams::default(), &tr)
        .await
        .expect("TokenReview");
    let status = result.status.expect("TokenReview status");
    if status.authenticated == Some(true) {
        status.user.and_then(|u| u.username)
    } else {
        None
    }
}

fn issuer_and_sa(extra_policy: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: ServiceAccount
metadata: {{name: builder}}
---
apiVersion: agenttoken.dev/v1alpha1
kind: TokenIssuer
metadata: {{name: cluster-sa}}
spec:
  serviceAccount: {{}}
  policy:
    maxLifetime: 2h
    allowedAudiences: ["https://kubernetes.default.svc.cluster.local"]
{extra_policy}
"#
    )
}

fn agent_token(name: &str, extra: &str) -> String {
    format!(
        r#"
apiVersion: agenttoken.dev/v1alpha1
kind: AgentToken
metadata: {{name: {name}}}
spec:
  issuerRef: {{name: cluster-sa}}
  serviceAccountName: builder
  lifetime: 10m
{extra}
"#
    )
}

fn secret_value(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()?
        .get(key)
        .map(|b| String::from_utf8(b.0.clone()).expect("utf-8 token"))
}

/// Waits for the AgentToken to reach a status for which `check` holds.
async fn wait_status<F>(
    ns: &TestNamespace,
    name: &str,
    what: &str,
    secs: u64,
    check: F,
) -> AgentToken
where
    F: Fn(&AgentToken) -> bool,
{
    let api: Api<AgentToken> = ns.api();
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    let mut last = None;
    loop {
        if let Ok(at) = api.get(name).await {
            if check(&at) {
                return at;
            }
            last = at.status;
        }
        if std::time::Instant::now() >= deadline {
            // What the operator last said, to tell a stuck reconcile from
            // a refusal (fingerprints and reasons only, never a token).
            let said = last.map(|s| {
                format!(
                    "revision {} conditions {:?} history {:?}",
                    s.revision,
                    s.conditions
                        .iter()
                        .map(|c| format!("{}={} {}: {}", c.type_, c.status, c.reason, c.message))
                        .collect::<Vec<_>>(),
                    s.history
                        .iter()
                        .map(|h| format!("r{} {} {:?}", h.revision, h.fingerprint, h.state))
                        .collect::<Vec<_>>()
                )
            });
            panic!("timed out after {secs}s waiting for {what}; last status: {said:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn condition(at: &AgentToken, type_: &str) -> Option<(String, String, String)> {
    let st = at.status.as_ref()?;
    st.conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

fn ready(at: &AgentToken) -> bool {
    condition(at, "Ready").is_some_and(|c| c.0 == "True")
}

fn revision(at: &AgentToken) -> i64 {
    at.status.as_ref().map_or(0, |s| s.revision)
}

async fn events_for(ns: &TestNamespace, name: &str) -> Vec<(String, String)> {
    let api: Api<Event> = ns.api();
    let list = api.list(&ListParams::default()).await.expect("list events");
    list.items
        .into_iter()
        .filter(|e| e.involved_object.name.as_deref() == Some(name))
        .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
        .collect()
}

async fn secret(ns: &TestNamespace, name: &str) -> Option<Secret> {
    ns.api::<Secret>().get_opt(name).await.expect("get secret")
}

fn assert_no_token_in(text: &str, token: &str, what: &str) {
    assert!(!text.contains(token), "a token appeared in {what}");
}

#[tokio::test]
async fn token_is_minted_accepted_and_never_logged() {
    let ns = TestNamespace::new("at-mint").await;
    let op = Operator::start(&ns.name);
    applied(&ns, &issuer_and_sa(""));
    let started = std::time::Instant::now();
    applied(
        &ns,
        &agent_token(
            "deploy-bot",
            "  audiences: [\"https://kubernetes.default.svc.cluster.local\"]\n  secret:\n    extraKeys:\n      authorization: \"Bearer {{ token }}\"\n",
        ),
    );
    let at = wait_status(&ns, "deploy-bot", "Ready=True", 30, ready).await;
    let elapsed = started.elapsed();
    eprintln!("apply -> Ready=True in {elapsed:?}");
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");

    let s = secret(&ns, "deploy-bot").await.expect("the Secret exists");
    let token = secret_value(&s, "token").expect("token key");
    assert_eq!(
        review(&ns, &token).await.as_deref(),
        Some(format!("system:serviceaccount:{}:builder", ns.name).as_str()),
        "the API server accepts the token"
    );
    assert_eq!(
        secret_value(&s, "authorization").unwrap(),
        format!("Bearer {token}")
    );
    let labels = s.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels["app.kubernetes.io/managed-by"],
        "agent-token-operator"
    );
    assert_eq!(labels["agenttoken.dev/name"], "deploy-bot");
    let owner = &s.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.controller),
        ("AgentToken", Some(true))
    );
    let expires_at: Timestamp = secret_value(&s, "expiresAt").unwrap().parse().unwrap();

    let st = at.status.clone().unwrap();
    assert_eq!(st.revision, 1);
    assert_eq!(st.secret_name.as_deref(), Some("deploy-bot"));
    assert_eq!(st.last_rotation_reason, Some(RotationReason::Initial));
    assert_eq!(st.expires_at.as_ref().unwrap().0, expires_at);
    let lifetime = expires_at.duration_since(st.issued_at.as_ref().unwrap().0);
    assert!(
        (595..=605).contains(&lifetime.as_secs()),
        "10m lifetime, got {lifetime:?}"
    );
    let fp = st.token_fingerprint.clone().unwrap();
    assert!(
        fp.starts_with("sha256:") && fp.len() == 7 + 16,
        "fingerprint {fp}"
    );
    assert_eq!(st.history.len(), 1);
    assert_eq!(st.history[0].revocation, RevocationState::Pending);
    assert!(st.next_rotation_at.is_some());
    assert_eq!(at.finalizers(), &["agenttoken.dev/revoke".to_string()]);

    let events = eventually(Duration::from_secs(10), "TokenIssued event", || async {
        let ev = events_for(&ns, "deploy-bot").await;
        ev.iter().any(|(r, _)| r == "TokenIssued").then_some(ev)
    })
    .await;

    // Metrics and health.
    let (code, body) = op.http_get("/metrics").await.expect("metrics");
    assert_eq!(code, 200);
    assert!(
        body.contains("agenttoken_token_expiry_timestamp_seconds"),
        "expiry metric"
    );
    assert!(
        body.contains(&format!("{}", expires_at.as_second())),
        "expiry value"
    );
    eventually(
        Duration::from_secs(10),
        "/readyz answers 200 once caches are synced",
        || async { (op.http_get("/readyz").await.map(|r| r.0) == Some(200)).then_some(()) },
    )
    .await;
    assert_eq!(op.http_get("/healthz").await.map(|r| r.0), Some(200));

    // No token anywhere a person looks.
    assert_no_token_in(&op.logs(), &token, "the operator log");
    assert_no_token_in(
        &serde_json::to_string(&at.status).unwrap(),
        &token,
        "status",
    );
    assert_no_token_in(&format!("{events:?}"), &token, "Events");
    assert_no_token_in(&body, &token, "metrics");
    assert_no_token_in(
        &serde_json::to_string(&s.metadata.annotations).unwrap(),
        &token,
        "Secret annotations",
    );
}

#[tokio::test]
async fn rotation_happens_at_the_computed_time() {
    let ns = TestNamespace::new("at-rotate").await;
    let _op = Operator::start(&ns.name);
    applied(&ns, &issuer_and_sa(""));
    // Lifetime 10m, renew when 9m20s are left: due 40 s after issue, minus jitter.
    applied(
        &ns,
        &agent_token("bot", "  rotation: {renewBefore: 9m20s}\n"),
    );
    let first = wait_status(&ns, "bot", "Ready=True", 30, ready).await;
    let st = first.status.clone().unwrap();
    let issued = st.issued_at.unwrap().0;
    let due = st.next_rotation_at.expect("nextRotationAt").0;
    let offset = due.duration_since(issued).as_secs_f64();
    assert!(
        (20.0..=40.5).contains(&offset),
        "due {offset}s after issue (40 s minus jitter)"
    );

    let rotated = wait_status(&ns, "bot", "revision 2", 90, |at| revision(at) >= 2).await;
    let st2 = rotated.status.unwrap();
    let at2 = st2.issued_at.unwrap().0;
    let late = at2.duration_since(due).as_secs_f64();
    eprintln!("rotation due at {due}, happened at {at2} ({late:+.2}s)");
    assert!(
        (-0.5..=5.0).contains(&late),
        "rotated {late}s from the computed time"
    );
    assert_eq!(st2.last_rotation_reason, Some(RotationReason::Scheduled));
}

#[tokio::test]
async fn old_token_works_during_grace_and_is_revoked_after() {
    let ns = TestNamespace::new("at-grace").await;
    let _op = Operator::start(&ns.name);
    applied(&ns, &issuer_and_sa(""));
    applied(
        &ns,
        &agent_token("bot", "  previousTokenGracePeriod: 25s\n"),
    );
    wait_status(&ns, "bot", "Ready=True", 30, ready).await;
    let old = secret_value(&secret(&ns, "bot").await.unwrap(), "token").unwrap();

    let api: Api<AgentToken> = ns.api();
    let patch = serde_json::json!({"metadata": {"annotations": {"agenttoken.dev/rotate": "1"}}});
    api.patch("bot", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let rotated = wait_status(&ns, "bot", "revision 2", 30, |at| revision(at) == 2).await;
    assert_eq!(
        rotated.status.as_ref().unwrap().last_rotation_reason,
        Some(RotationReason::Manual)
    );
    let s = secret(&ns, "bot").await.unwrap();
    let new = secret_value(&s, "token").unwrap();
    assert_ne!(new, old);
    assert_eq!(
        secret_value(&s, "token.previous").as_deref(),
        Some(old.as_str())
    );
    assert!(
        review(&ns, &old).await.is_some(),
        "old token still valid during grace"
    );
    assert!(review(&ns, &new).await.is_some(), "new token valid");

    // After the grace period the previous token is revoked and removed.
    let done = wait_status(&ns, "bot", "revision 1 revoked", 60, |at| {
        at.status.as_ref().is_some_and(|s| {
            s.history
                .iter()
                .any(|h| h.revision == 1 && h.revocation == RevocationState::Revoked)
        })
    })
    .await;
    let h1 = done
        .status
        .unwrap()
        .history
        .into_iter()
        .find(|h| h.revision == 1)
        .unwrap();
    assert!(h1.revoked_at.is_some());
    // The last use was >= 10 s ago, so the API server's success cache no longer hides it.
    eventually(Duration::from_secs(5), "old token rejected", || async {
        review(&ns, &old).await.is_none().then_some(())
    })
    .await;
    let s = secret(&ns, "bot").await.unwrap();
    assert!(
        secret_value(&s, "token.previous").is_none(),
        "previous key removed"
    );
    assert!(
        review(&ns, &new).await.is_some(),
        "current token still valid"
    );
}

#[tokio::test]
async fn revoke_annotation_kills_the_old_token_at_once() {
    let ns = TestNamespace::new("at-revoke").await;
    let _op = Operator::start(&ns.name);
    applied(&ns, &issuer_and_sa(""));
    applied(
        &ns,
        &agent_token("bot", "  previousTokenGracePeriod: 10m\n"),
    );
    wait_status(&ns, "bot", "Ready=True", 30, ready).await;
    let old = secret_value(&secret(&ns, "bot").await.unwrap(), "token").unwrap();
    // Not used in the last 10 s (the API server caches successful
    // authentications for 10 s, a floor no revocation can beat).
    tokio::time::sleep(Duration::from_secs(11)).await;

    let api: Api<AgentToken> = ns.api();
    let patch = serde_json::json!({"metadata": {"annotations": {"agenttoken.dev/revoke": "now"}}});
    let started = std::time::Instant::now();
    api.patch("bot", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let at = wait_status(&ns, "bot", "revision 2", 30, |at| revision(at) == 2).await;
    eprintln!(
        "revoke annotation -> new token and old revoked in {:?}",
        started.elapsed()
    );
    assert!(
        review(&ns, &old).await.is_none(),
        "old token rejected at once"
    );
    let st = at.status.unwrap();
    assert_eq!(st.last_rotation_reason, Some(RotationReason::Revoked));
    let h1 = st.history.iter().find(|h| h.revision == 1).unwrap();
    assert_eq!(h1.revocation, RevocationState::Revoked);
    let s = secret(&ns, "bot").await.unwrap();
    assert!(
        secret_value(&s, "token.previous").is_none(),
        "no grace after revoke"
    );
    let new = secret_value(&s, "token").unwrap();
    assert!(review(&ns, &new).await.is_some());
    let events = events_for(&ns, "bot").await;
    assert!(
        events.iter().any(|(r, _)| r == "TokenRevoked"),
        "{events:?}"
    );
}

#[tokio::test]
async fn deleting_the_agenttoken_revokes_and_collects_its_secret() {
    let ns = TestNamespace::new("at-delete").await;
    let _op = Operator::start(&ns.name);
    applied(&ns, &issuer_and_sa(""));
    applied(&ns, &agent_token("bot", ""));
    wait_status(&ns, "bot", "Ready=True", 30, ready).await;
    let token = secret_value(&secret(&ns, "bot").await.unwrap(), "token").unwrap();
    tokio::time::sleep(Duration::from_secs(11)).await;

    let api: Api<AgentToken> = ns.api();
    api.delete("bot", &DeleteParams::default()).await.unwrap();
    eventually(Duration::from_secs(30), "AgentToken gone", || async {
        api.get_opt("bot").await.ok()?.is_none().then_some(())
    })
    .await;
    assert!(
        review(&ns, &token).await.is_none(),
        "token revoked on deletion"
    );
    eventually(
        Duration::from_secs(60),
        "Secret garbage-collected",
        || async { secret(&ns, "bot").await.is_none().then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn a_secret_not_ours_is_never_touched() {
    let ns = TestNamespace::new("at-foreign").await;
    let _op = Operator::start(&ns.name);
    applied(&ns, &issuer_and_sa(""));
    applied(
        &ns,
        "apiVersion: v1\nkind: Secret\nmetadata: {name: bot}\nstringData: {token: hand-made, note: keep}\n",
    );
    let before = secret(&ns, "bot").await.unwrap();
    applied(&ns, &agent_token("bot", ""));
    let at = wait_status(&ns, "bot", "SecretNotOwned", 30, |at| {
        condition(at, "Ready").is_some_and(|c| c.1 == "SecretNotOwned")
    })
    .await;
    assert!(
        condition(&at, "Ready")
            .unwrap()
            .2
            .contains("not created by this AgentToken")
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = secret(&ns, "bot").await.unwrap();
    assert_eq!(
        before.metadata.resource_version, after.metadata.resource_version,
        "untouched"
    );
    assert_eq!(secret_value(&after, "token").as_deref(), Some("hand-made"));
    let events = events_for(&ns, "bot").await;
    assert!(
        events.iter().any(|(r, _)| r == "SecretNotOwned"),
        "{events:?}"
    );
    assert_eq!(revision(&at), 0, "nothing minted");
}

#[tokio::test]
async fn an_edited_or_deleted_secret_is_repaired() {
    let ns = TestNamespace::new("at-drift").await;
    let _op = Operator::start(&ns.name);
    applied(&ns, &issuer_and_sa(""));
    applied(&ns, &agent_token("bot", ""));
    wait_status(&ns, "bot", "Ready=True", 30, ready).await;

    let secrets: Api<Secret> = ns.api();
    let patch = serde_json::json!({"stringData": {"token": "tampered"}});
    secrets
        .patch("bot", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let at = wait_status(&ns, "bot", "repaired after edit", 30, |at| {
        revision(at) == 2 && ready(at)
    })
    .await;
    assert_eq!(
        at.status.unwrap().last_rotation_reason,
        Some(RotationReason::SecretDrift)
    );
    let token = secret_value(&secret(&ns, "bot").await.unwrap(), "token").unwrap();
    assert_ne!(token, "tampered");
    assert!(review(&ns, &token).await.is_some());

    secrets
        .delete("bot", &DeleteParams::default())
        .await
        .unwrap();
    wait_status(&ns, "bot", "repaired after delete", 30, |at| {
        revision(at) == 3 && ready(at)
    })
    .await;
    let token = secret_value(&secret(&ns, "bot").await.expect("recreated"), "token").unwrap();
    assert!(review(&ns, &token).await.is_some());
}

#[tokio::test]
async fn invalid_specs_are_rejected_by_kubectl_apply() {
    let ns = TestNamespace::new("at-invalid").await;
    crate::support::install_crds();
    let cases = [
        (
            agent_token("a", "  rotation: {renewBefore: 5m, renewBeforePercentage: 20}\n"),
            "renewBefore",
        ),
        (agent_token("b", "").replace("lifetime: 10m", "lifetime: 5m"), "10m"),
        (agent_token("c", "  rotation: {renewBefore: 20m}\n"), "renewBefore"),
        (agent_token("d", "  secret: {key: \"token.previous\"}\n"), ".previous"),
        (
            agent_token("e", "  consumers: {restart: Selected}\n"),
            "selector",
        ),
        (
            "apiVersion: agenttoken.dev/v1alpha1\nkind: TokenIssuer\nmetadata: {name: two}\nspec:\n  serviceAccount: {}\n  jwt: {issuer: x, signingKeySecretRef: {name: k, key: k}}\n".to_string(),
            "exactly one",
        ),
        (
            "apiVersion: agenttoken.dev/v1alpha1\nkind: TokenIssuer\nmetadata: {name: slow}\nspec:\n  oauth2: {tokenURL: 'https://idp.example/token', clientID: c, clientSecretRef: {name: s, key: k}, timeout: 5m}\n".to_string(),
            "between 1s and 60s",
        ),
        (
            "apiVersion: agenttoken.dev/v1alpha1\nkind: TokenIssuer\nmetadata: {name: noexp}\nspec:\n  webhook: {url: 'https://mint.example/t', result: {tokenPath: $.t}}\n".to_string(),
            "expiresInPath",
        ),
    ];
    for (yaml, expect) in cases {
        let out = apply(&ns, &yaml);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "accepted but should be rejected:\n{yaml}"
        );
        assert!(
            stderr.contains(expect),
            "message should mention {expect:?}: {stderr}"
        );
        eprintln!("rejected as expected: {}", stderr.trim());
    }
}

#[tokio::test]
async fn policy_violations_are_refused_with_the_rule_named() {
    let ns = TestNamespace::new("at-policy").await;
    let _op = Operator::start(&ns.name);
    applied(&ns, &issuer_and_sa(""));
    applied(
        &ns,
        &agent_token("too-long", "").replace("lifetime: 10m", "lifetime: 3h"),
    );
    let at = wait_status(&ns, "too-long", "PolicyViolation", 30, |at| {
        condition(at, "Ready").is_some_and(|c| c.1 == "PolicyViolation")
    })
    .await;
    let (_, _, message) = condition(&at, "Ready").unwrap();
    assert!(message.contains("maxLifetime"), "names the rule: {message}");
    assert_eq!(revision(&at), 0);
    assert!(secret(&ns, "too-long").await.is_none(), "nothing written");
    let events = events_for(&ns, "too-long").await;
    assert!(
        events.iter().any(|(r, _)| r == "PolicyViolation"),
        "{events:?}"
    );
}

#[tokio::test]
async fn a_cluster_issuer_serves_only_allowed_namespaces() {
    let ns = TestNamespace::new("at-cti").await;
    let _op = Operator::start(&ns.name);
    let issuer = format!("cti-{}", crate::support::random_suffix());
    let yaml = format!(
        "apiVersion: agenttoken.dev/v1alpha1\nkind: ClusterTokenIssuer\nmetadata: {{name: {issuer}}}\nspec:\n  serviceAccount: {{}}\n  policy:\n    allowedNamespaces: [\"team-*\"]\n    allowedServiceAccounts: [\"builder\"]\n"
    );
    applied(&ns, &yaml);
    applied(
        &ns,
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: builder}\n",
    );
    applied(
        &ns,
        &agent_token("bot", "").replace(
            "issuerRef: {name: cluster-sa}",
            &format!("issuerRef: {{kind: ClusterTokenIssuer, name: {issuer}}}"),
        ),
    );
    let at = wait_status(&ns, "bot", "PolicyViolation", 30, |at| {
        condition(at, "Ready").is_some_and(|c| c.1 == "PolicyViolation")
    })
    .await;
    let message = condition(&at, "Ready").unwrap().2;
    assert!(message.contains("allowedNamespaces"), "{message}");
    assert!(secret(&ns, "bot").await.is_none());
    let _ = ns.kubectl(&["delete", "clustertokenissuer", &issuer]);
}

/// A mint that fails after its binding Secret exists (here: the
/// fault-injecting API proxy refuses every status write of the AgentToken,
/// so the minted token is never recorded and is revoked by deleting its
/// binding) is retried on its backoff. The binding's delete event is the
/// operator's own and must not bring the next attempt at once: without
/// that, a persistent failure was a loop of TokenRequests (thousands in a
/// minute when a chart lacked a status verb).
#[tokio::test]
async fn a_mint_whose_record_cannot_be_written_is_retried_on_its_backoff_not_in_a_loop() {
    use crate::apiproxy::{ApiProxy, Effect, Fault, status_write_with};
    let ns = TestNamespace::new("at-noloop").await;
    let proxy = ApiProxy::start().await;
    let op = Operator::start_as(
        &ns.name,
        "noloop",
        &["--leader-election=false"],
        &proxy.kubeconfig,
    );
    proxy.inject(Fault {
        matches: status_write_with(&ns.name, "bot", "history"),
        effect: Effect::Refuse,
        times: usize::MAX,
    });
    applied(&ns, &issuer_and_sa(""));
    applied(&ns, &agent_token("bot", ""));
    let token_requests = || {
        proxy
            .seen()
            .iter()
            .filter(|s| s.method == "POST" && s.path.ends_with("/serviceaccounts/builder/token"))
            .count()
    };
    eventually(Duration::from_secs(30), "a first TokenRequest", || async {
        (token_requests() > 0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(15)).await;
    let n = token_requests();
    assert!(
        (1..=8).contains(&n),
        "TokenRequests in 15 s of a mint whose record is refused: {n} (log {})",
        op.log.display()
    );
    // Every binding made was deleted again (one attempt may be under way).
    let left = ns
        .api::<Secret>()
        .list(&ListParams::default().labels("agenttoken.dev/role=token-binding"))
        .await
        .unwrap();
    assert!(left.items.len() <= 1, "bindings left: {}", left.items.len());
}

#[tokio::test]
async fn a_service_account_in_another_namespace_is_never_used() {
    let ns = TestNamespace::new("at-xns").await;
    let other = TestNamespace::new("at-xns-other").await;
    let op = Operator::start(&ns.name);
    // `builder` exists only in the other namespace.
    applied(
        &other,
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: builder}\n",
    );
    applied(
        &ns,
        "apiVersion: agenttoken.dev/v1alpha1\nkind: TokenIssuer\nmetadata: {name: cluster-sa}\nspec: {serviceAccount: {}}\n",
    );
    applied(&ns, &agent_token("bot", ""));
    let at = wait_status(&ns, "bot", "refused", 30, |at| {
        condition(at, "Ready").is_some_and(|c| c.0 == "False" && c.2.contains("does not exist"))
    })
    .await;
    assert_eq!(revision(&at), 0);
    // Each attempt creates a binding, is refused by the TokenRequest and
    // deletes the binding: that delete is the operator's own and must not
    // bring the next attempt past the backoff (it did: a loop of requests).
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (_, metrics) = op.http_get("/metrics").await.unwrap();
    let token_requests: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("agenttoken_kube_api_requests_total"))
        .filter(|l| l.contains("serviceaccounts/token") && l.contains("\"create\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        (1.0..=8.0).contains(&token_requests),
        "TokenRequests in the first ~15 s of a refused mint: {token_requests}"
    );
    let bindings = other
        .api::<Secret>()
        .list(&ListParams::default().labels("agenttoken.dev/name"))
        .await
        .unwrap();
    assert!(
        bindings.items.is_empty(),
        "nothing created in the other namespace"
    );
    // A namespaced name is not a ServiceAccount name: rejected at admission.
    let out = apply(
        &ns,
        &agent_token("bot2", "").replace(
            "serviceAccountName: builder",
            &format!("serviceAccountName: {}/builder", other.name),
        ),
    );
    assert!(
        !out.status.success(),
        "a namespace-qualified ServiceAccount name is rejected"
    );
}

#[tokio::test]
async fn two_replicas_with_leader_election_mint_each_token_once() {
    let ns = TestNamespace::new("at-ha").await;
    let mut a = Operator::start_with(
        &ns.name,
        "a",
        &["--leader-election=true", "--identity=replica-a"],
    );
    let mut b = Operator::start_with(
        &ns.name,
        "b",
        &["--leader-election=true", "--identity=replica-b"],
    );
    applied(&ns, &issuer_and_sa(""));
    for i in 0..5 {
        applied(&ns, &agent_token(&format!("bot-{i}"), ""));
    }
    for i in 0..5 {
        wait_status(&ns, &format!("bot-{i}"), "Ready=True", 60, ready).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let api: Api<AgentToken> = ns.api();
    for at in api.list(&ListParams::default()).await.unwrap() {
        let st = at.status.unwrap();
        assert_eq!(st.revision, 1, "{} minted once", at.metadata.name.unwrap());
        assert_eq!(st.history.len(), 1);
    }
    let bindings = ns
        .api::<Secret>()
        .list(&ListParams::default().labels("agenttoken.dev/role=token-binding"))
        .await
        .unwrap();
    assert_eq!(
        bindings.items.len(),
        5,
        "one TokenRequest binding per AgentToken"
    );
    let leaders = [&a, &b]
        .iter()
        .filter(|o| o.logs().contains("became leader"))
        .count();
    assert_eq!(leaders, 1, "exactly one replica leads");

    // Graceful shutdown of the leader releases the Lease; the other replica
    // takes over and, finding every token valid, mints nothing.
    let (leader, follower) = if a.logs().contains("became leader") {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    let status = leader.stop();
    assert!(
        status.success(),
        "the leader exits cleanly on SIGTERM: {status:?}"
    );
    assert!(leader.exited());
    eventually(Duration::from_secs(40), "the follower takes over", || {
        let led = follower.logs().contains("became leader");
        async move { led.then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    for at in api.list(&ListParams::default()).await.unwrap() {
        assert_eq!(
            at.status.unwrap().revision,
            1,
            "no token minted twice after a leader change"
        );
    }
    assert!(!follower.exited());
}

#[tokio::test]
async fn a_token_minted_before_a_crash_is_revoked_and_recorded() {
    let ns = TestNamespace::new("at-crash").await;
    applied(&ns, &issuer_and_sa(""));
    applied(&ns, &agent_token("bot", ""));
    let mut op = Operator::start(&ns.name);
    wait_status(&ns, "bot", "Ready=True", 30, ready).await;
    op.kill();

    // Reproduce what a crash right after a mint leaves: a binding for
    // revision 2 with a live token bound to it, delivered to nobody.
    let api: Api<AgentToken> = ns.api();
    let at = api.get("bot").await.unwrap();
    let uid = at.metadata.uid.clone().unwrap();
    let binding = format!(
        "apiVersion: v1\nkind: Secret\ntype: agenttoken.dev/token-binding\nmetadata:\n  name: bot-binding-r2\n  labels: {{app.kubernetes.io/managed-by: agent-token-operator, agenttoken.dev/name: bot, agenttoken.dev/role: token-binding, agenttoken.dev/revision: \"2\"}}\n  ownerReferences: [{{apiVersion: agenttoken.dev/v1alpha1, kind: AgentToken, name: bot, uid: {uid}}}]\n"
    );
    applied(&ns, &binding);
    let out = ns.kubectl(&[
        "create",
        "token",
        "builder",
        "--bound-object-kind=Secret",
        "--bound-object-name=bot-binding-r2",
        "--duration=10m",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let orphan = String::from_utf8(out.stdout).unwrap().trim().to_string();
    tokio::time::sleep(Duration::from_secs(11)).await;

    let _op = Operator::start_with(&ns.name, "restarted", &["--leader-election=false"]);
    let at = wait_status(&ns, "bot", "orphan recorded", 30, |at| {
        at.status
            .as_ref()
            .is_some_and(|s| s.history.iter().any(|h| h.revision == 2))
    })
    .await;
    let h2 = at
        .status
        .unwrap()
        .history
        .into_iter()
        .find(|h| h.revision == 2)
        .unwrap();
    assert_eq!(h2.revocation, RevocationState::Revoked);
    assert!(
        review(&ns, &orphan).await.is_none(),
        "the orphaned token is dead"
    );
    let s = secret(&ns, "bot").await.unwrap();
    let current = secret_value(&s, "token").unwrap();
    assert!(
        review(&ns, &current).await.is_some(),
        "the delivered token is untouched"
    );
}

#[tokio::test]
async fn a_failed_mint_keeps_the_last_good_token() {
    let ns = TestNamespace::new("at-failsafe").await;
    let _op = Operator::start(&ns.name);
    applied(&ns, &issuer_and_sa(""));
    applied(&ns, &agent_token("bot", ""));
    wait_status(&ns, "bot", "Ready=True", 30, ready).await;
    let good = secret_value(&secret(&ns, "bot").await.unwrap(), "token").unwrap();

    // Minting now fails: the ServiceAccount is gone.
    let out = ns.kubectl(&["delete", "serviceaccount", "builder"]);
    assert!(out.status.success());
    let api: Api<AgentToken> = ns.api();
    let patch = serde_json::json!({"metadata": {"annotations": {"agenttoken.dev/rotate": "try"}}});
    api.patch("bot", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let at = wait_status(&ns, "bot", "Issuing=True with a reason", 30, |at| {
        condition(at, "Issuing").is_some_and(|c| c.0 == "True")
            && at.status.as_ref().is_some_and(|s| s.failed_attempts >= 1)
    })
    .await;
    let st = at.status.clone().unwrap();
    assert!(
        st.last_failure_message.unwrap().contains("builder"),
        "says why"
    );
    assert_eq!(st.revision, 1);
    let s = secret(&ns, "bot").await.unwrap();
    assert_eq!(
        secret_value(&s, "token").as_deref(),
        Some(good.as_str()),
        "last good token stays"
    );
    let events = events_for(&ns, "bot").await;
    assert!(
        events.iter().any(|(r, _)| r == "RotationFailed"),
        "{events:?}"
    );

    // Once the cause is fixed, the retry (with backoff) succeeds.
    applied(
        &ns,
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: builder}\n",
    );
    wait_status(&ns, "bot", "recovered", 60, |at| {
        revision(at) == 2 && ready(at)
    })
    .await;
}

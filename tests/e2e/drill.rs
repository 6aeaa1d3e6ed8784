//! Revocation drills (issue 21) on the local control plane with the real
//! node: a drill on a serviceAccount token whose Secret a running
//! Deployment consumes revokes the live token, and reports each phase: the
//! operator's revocation, the API server refusing the old token
//! (TokenReview), the consumer's new Pod ready with the new token. A drill
//! whose target is shorter than the rollout fails visibly.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::Api;

use agent_token_operator::crd::{AgentToken, DrillResult, DrillStatus, RotationReason};

use crate::support::{Operator, SA_ISSUER, TestNamespace, applied, eventually, token_of};

/// `kubectl agenttoken drill NAME -o json`: its output and its report.
pub(crate) fn drill(ns: &TestNamespace, name: &str) -> (std::process::Output, Option<DrillStatus>) {
    let out = crate::plugin::plugin(ns, &["drill", name, "-o", "json", "--timeout", "3m"], None);
    let report = serde_json::from_slice(&out.stdout).ok();
    (out, report)
}

/// The report of `kubectl agenttoken drill NAME -o json` (printed), or a
/// panic with the plugin's stderr when it gave none.
pub(crate) fn drill_report(ns: &TestNamespace, name: &str) -> DrillStatus {
    let (out, report) = drill(ns, name);
    let report = report.unwrap_or_else(|| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    eprintln!("drill report: {}", serde_json::to_string(&report).unwrap());
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_on_a_service_account_token_with_a_running_consumer_reports_each_phase() {
    crate::node::node();
    let ns = TestNamespace::new("drill").await;
    let op = Operator::start(&ns.name);
    applied(&ns, SA_ISSUER);
    crate::hostile::tenant(&ns).await;
    let at = "apiVersion: agenttoken.dev/v1alpha1\nkind: AgentToken\nmetadata: {name: bot}\n\
              spec:\n  issuerRef: {name: sa}\n  serviceAccountName: builder\n  lifetime: 10m\n\
              \x20 previousTokenGracePeriod: 0s\n  consumers: {strategy: RolloutRestart}\n  drill: {target: 2m}\n";
    for yaml in [
        at.to_string(),
        crate::node::agent_deployment("agent", "bot"),
    ] {
        let out = crate::hostile::apply_as_tenant(&ns.name, &yaml);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let deployments: Api<Deployment> = ns.api();
    eventually(Duration::from_secs(120), "the consumer running", || async {
        let d = deployments.get("agent").await.ok()?;
        (d.status?.ready_replicas? >= 1).then_some(())
    })
    .await;
    let ats: Api<AgentToken> = ns.api();
    eventually(Duration::from_secs(30), "bot minted", || async {
        (ats.get("bot").await.ok()?.status?.revision >= 1).then_some(())
    })
    .await;
    // Past the mint floor and the first rollout, so the drill measures
    // itself alone.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let old = token_of(&ns, "bot").await.expect("the token");
    let revision = ats.get("bot").await.unwrap().status.unwrap().revision;

    let (out, report) = drill(&ns, "bot");
    let report = report.unwrap_or_else(|| {
        panic!(
            "a JSON report: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    eprintln!("drill report: {}", serde_json::to_string(&report).unwrap());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(report.result, DrillResult::Passed, "{report:?}");
    assert_eq!(report.revision, revision);
    assert_eq!(report.refused_by.as_deref(), Some("TokenReview"));
    let (revoked, refused, ready) = (
        report.revoked_ms.expect("revoked"),
        report.refused_ms.expect("refused"),
        report.consumers_ready_ms.expect("consumers ready"),
    );
    assert!(refused <= 20_000, "refused within seconds: {refused} ms");
    assert!(revoked <= 20_000, "revoked within seconds: {revoked} ms");
    assert!(
        ready >= refused.min(revoked),
        "a new Pod takes longer than a revocation"
    );
    assert_eq!(report.target_ms, 120_000);
    // What it measured is true: the old token is dead, the new one in the
    // Secret and in the rolled-out Pod.
    assert!(crate::agenttoken::review(&ns, &old).await.is_none());
    let st = ats.get("bot").await.unwrap().status.unwrap();
    assert_eq!(st.last_rotation_reason, Some(RotationReason::Drill));
    let new = token_of(&ns, "bot").await.expect("the new token");
    assert_ne!(new, old);
    assert!(crate::agenttoken::review(&ns, &new).await.is_some());
    let events = String::from_utf8_lossy(
        &ns.kubectl(&["get", "events.events.k8s.io", "-o", "json"])
            .stdout,
    )
    .into_owned();
    assert!(
        events.contains("\"reason\": \"DrillPassed\""),
        "a DrillPassed Event"
    );
    assert!(
        !events.contains(&old) && !op.logs().contains(&old),
        "no token in Events or logs"
    );
    let metrics = op
        .http_get("/metrics")
        .await
        .map(|(_, b)| b)
        .unwrap_or_default();
    assert!(
        metrics.contains(
            "agenttoken_drills_total{issuer_type=\"serviceAccount\",result=\"Passed\"} 1"
        ),
        "{metrics}"
    );

    // A target the rollout cannot meet: the drill fails, visibly.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let out = crate::hostile::apply_as_tenant(&ns.name, &at.replace("target: 2m", "target: 1s"));
    assert!(out.status.success());
    let (out, report) = drill(&ns, "bot");
    let report = report.expect("a JSON report");
    assert_eq!(report.result, DrillResult::Failed, "{report:?}");
    assert_eq!(
        out.status.code(),
        Some(2),
        "the plugin exits 2 on a failed drill"
    );
    assert!(
        report
            .message
            .as_deref()
            .is_some_and(|m| m.contains("over the 1.0s target")),
        "{report:?}"
    );
    eventually(Duration::from_secs(10), "a DrillFailed Event", || async {
        let events = ns
            .kubectl(&["get", "events.events.k8s.io", "-o", "json"])
            .stdout;
        String::from_utf8_lossy(&events)
            .contains("\"reason\": \"DrillFailed\"")
            .then_some(())
    })
    .await;
}

/// A drill on a Vault child token against the real OpenBao (from PyPI):
/// the issuer-side death is seen through the old token's own
/// `lookup-self`, refused once the operator revoked it by accessor.
#[tokio::test]
async fn drill_on_a_vault_child_token_against_real_openbao_reports_the_issuer_side_death() {
    let b = crate::vault::OpenBao::start().await;
    let ns = TestNamespace::new("drill-bao").await;
    let _op = Operator::start(&ns.name);
    crate::vault::setup(&ns, &b, "", "  scopes: [\"default\"]\n").await;
    let ats: Api<AgentToken> = ns.api();
    eventually(Duration::from_secs(45), "revision 1", || async {
        (ats.get("bot").await.ok()?.status?.revision == 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(11)).await;
    let old = crate::vault::token_in_secret(&ns).await;
    assert_eq!(
        b.call_as(&old, "GET", "auth/token/lookup-self", None)
            .await
            .0,
        200
    );
    let report = drill_report(&ns, "bot");
    assert_eq!(report.result, DrillResult::Passed, "{report:?}");
    assert_eq!(report.refused_by.as_deref(), Some("Vault lookup-self"));
    assert!(
        report.refused_ms.is_some_and(|ms| ms <= 20_000),
        "{report:?}"
    );
    assert!(
        report.consumers_ready_ms.is_some(),
        "nothing consumes it: ready at delivery"
    );
    assert_eq!(
        b.call_as(&old, "GET", "auth/token/lookup-self", None)
            .await
            .0,
        403
    );
}

/// A drill on an oauth2 token from the real oidc-provider (from npm): the
/// operator revokes it per RFC 7009 and asks the provider's RFC 7662
/// introspection endpoint until it answers `active: false`.
#[tokio::test]
async fn drill_on_an_oauth2_token_against_real_oidc_provider_reports_the_issuer_side_death() {
    let p = crate::oauth2::start_provider(900);
    let ns = TestNamespace::new("drill-oidc").await;
    let _op = Operator::start(&ns.name);
    crate::oauth2::client_secret(&ns, &p.basic.1).await;
    applied(
        &ns,
        &crate::oauth2::issuer_yaml(&p, "ClientSecretBasic", &p.basic.0),
    );
    applied(&ns, crate::oauth2::AGENT_TOKEN);
    let ats: Api<AgentToken> = ns.api();
    eventually(Duration::from_secs(45), "revision 1", || async {
        (ats.get("bot").await.ok()?.status?.revision == 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(11)).await;
    let old = crate::oauth2::token_in_secret(&ns).await;
    assert_eq!(crate::oauth2::introspect(&p, &old).await["active"], true);
    let report = drill_report(&ns, "bot");
    assert_eq!(report.result, DrillResult::Passed, "{report:?}");
    assert_eq!(report.refused_by.as_deref(), Some("RFC 7662 introspection"));
    assert!(
        report.refused_ms.is_some_and(|ms| ms <= 20_000),
        "{report:?}"
    );
    assert_eq!(crate::oauth2::introspect(&p, &old).await["active"], false);
}

/// `spec.drill.schedule`: a drill every minute runs on its own, measured
/// like one asked for.
#[tokio::test]
async fn drill_on_a_schedule_runs_by_itself() {
    let ns = TestNamespace::new("drill-cron").await;
    let _op = Operator::start(&ns.name);
    applied(&ns, SA_ISSUER);
    applied(
        &ns,
        "apiVersion: agenttoken.dev/v1alpha1\nkind: AgentToken\nmetadata: {name: bot}\n\
         spec:\n  issuerRef: {name: sa}\n  serviceAccountName: builder\n  lifetime: 10m\n\
         \x20 drill: {schedule: \"* * * * *\", target: 30s}\n",
    );
    let ats: Api<AgentToken> = ns.api();
    let report = eventually(
        Duration::from_secs(150),
        "a scheduled drill's report",
        || async {
            let d = ats.get("bot").await.ok()?.status?.last_drill?;
            (d.result != DrillResult::Running).then_some(d)
        },
    )
    .await;
    assert!(report.id.starts_with("scheduled-"), "{report:?}");
    assert_eq!(report.result, DrillResult::Passed, "{report:?}");
    assert_eq!(report.refused_by.as_deref(), Some("TokenReview"));
    let st = ats.get("bot").await.unwrap().status.unwrap();
    assert_eq!(st.last_rotation_reason, Some(RotationReason::Drill));
}

/// A drill whose operator is SIGKILLed before it ends (its consumer's
/// rollout cannot complete: its image does not exist) is not left
/// `Running`: the next operator records it as interrupted, and the token
/// it drilled was still revoked.
#[tokio::test]
async fn drill_interrupted_by_a_sigkill_is_recorded_as_interrupted_not_left_running() {
    let ns = TestNamespace::new("drill-kill").await;
    let mut op = Operator::start(&ns.name);
    applied(&ns, SA_ISSUER);
    applied(
        &ns,
        "apiVersion: agenttoken.dev/v1alpha1\nkind: AgentToken\nmetadata: {name: bot}\n\
         spec:\n  issuerRef: {name: sa}\n  serviceAccountName: builder\n  lifetime: 10m\n\
         \x20 previousTokenGracePeriod: 0s\n  consumers: {strategy: RolloutRestart}\n",
    );
    applied(
        &ns,
        &crate::node::agent_deployment("stuck", "bot").replace(
            "image: agenttoken.local/agent:e2e",
            "image: agenttoken.local/absent:e2e",
        ),
    );
    let ats: Api<AgentToken> = ns.api();
    eventually(Duration::from_secs(30), "bot minted", || async {
        (ats.get("bot").await.ok()?.status?.revision == 1).then_some(())
    })
    .await;
    let out = crate::plugin::plugin(&ns, &["drill", "bot", "--no-wait"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually(
        Duration::from_secs(30),
        "the drill running, revision 1 revoked",
        || async {
            let st = ats.get("bot").await.ok()?.status?;
            let d = st.last_drill?;
            let revoked = st.history.iter().any(|e| {
                e.revision == 1 && e.state == Some(agent_token_operator::crd::TokenLife::Revoked)
            });
            (d.result == DrillResult::Running && revoked).then_some(())
        },
    )
    .await;
    op.kill();
    let _op = Operator::start(&ns.name);
    let d = eventually(
        Duration::from_secs(60),
        "the drill recorded as interrupted",
        || async {
            let d = ats.get("bot").await.ok()?.status?.last_drill?;
            (d.result != DrillResult::Running).then_some(d)
        },
    )
    .await;
    assert_eq!(d.result, DrillResult::Failed, "{d:?}");
    assert!(
        d.message
            .as_deref()
            .is_some_and(|m| m.starts_with("interrupted")),
        "{d:?}"
    );
}

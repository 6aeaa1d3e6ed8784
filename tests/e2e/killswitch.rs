//! The issuer kill switch and suspension (issue 21), on the local control
//! plane with the real serviceAccount issuer: `kubectl agenttoken revoke
//! --issuer NAME --all` revokes and replaces every token the issuer minted
//! (the API server refuses the old ones), touches nothing another issuer
//! minted, and is announced on the issuer; a suspended issuer mints nothing
//! and every AgentToken on it says so, while revocations go on.

use std::collections::BTreeMap;
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};

use agent_token_operator::crd::{AgentToken, RotationReason, TokenIssuer, TokenLife};

use crate::helm::ok;
use crate::support::{Operator, SA_ISSUER, TestNamespace, applied, eventually, token_of};

const BOTS: usize = 8;

/// An AgentToken `name` on the serviceAccount issuer `issuer`.
fn bot(name: &str, issuer: &str) -> String {
    format!(
        "apiVersion: agenttoken.dev/v1alpha1\nkind: AgentToken\nmetadata: {{name: {name}}}\n\
         spec:\n  issuerRef: {{name: {issuer}}}\n  serviceAccountName: builder\n  lifetime: 10m\n\
         \x20 previousTokenGracePeriod: 10m\n  consumers: {{restart: None}}\n"
    )
}

async fn condition(ats: &Api<AgentToken>, name: &str, type_: &str) -> Option<(String, String)> {
    let st = ats.get(name).await.ok()?.status?;
    let c = st.conditions.into_iter().find(|c| c.type_ == type_)?;
    Some((c.status, c.reason))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_switch_revokes_and_replaces_every_token_an_issuer_minted_and_suspension_mints_nothing()
 {
    let ns = TestNamespace::new("kill").await;
    let op = Operator::start(&ns.name);
    applied(&ns, SA_ISSUER);
    applied(
        &ns,
        "apiVersion: agenttoken.dev/v1alpha1\nkind: TokenIssuer\nmetadata: {name: other}\nspec:\n  serviceAccount: {}\n",
    );
    // The tenant's AgentTokens: eight on `sa`, one on `other`.
    let tenant = crate::hostile::tenant(&ns).await;
    let names: Vec<String> = (0..BOTS).map(|i| format!("bot-{i}")).collect();
    for name in &names {
        let out = crate::hostile::apply_as_tenant(&ns.name, &bot(name, "sa"));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = crate::hostile::apply_as_tenant(&ns.name, &bot("elsewhere", "other"));
    assert!(out.status.success());
    let ats: Api<AgentToken> = ns.api();
    let all: Vec<String> = names.iter().cloned().chain(["elsewhere".into()]).collect();
    for name in &all {
        eventually(Duration::from_secs(60), "a first token", || async {
            (ats.get(name).await.ok()?.status?.revision == 1).then_some(())
        })
        .await;
    }
    // bot-0 rotates: its revision 1 is the previous token, in its grace.
    ok(
        crate::plugin::plugin(&ns, &["rotate", "bot-0"], None),
        "kubectl agenttoken rotate",
    );
    eventually(Duration::from_secs(40), "bot-0 rotated", || async {
        (ats.get("bot-0").await.ok()?.status?.revision == 2).then_some(())
    })
    .await;
    let mut before: BTreeMap<String, String> = BTreeMap::new();
    let mut before_revision: BTreeMap<String, i64> = BTreeMap::new();
    for name in &all {
        before.insert(name.clone(), token_of(&ns, name).await.expect("a token"));
        let revision = ats.get(name).await.unwrap().status.unwrap().revision;
        before_revision.insert(name.clone(), revision);
    }
    // bot-0's previous token, still valid in its grace period.
    let previous = ats.get("bot-0").await.unwrap().status.unwrap();
    assert!(
        previous
            .history
            .iter()
            .any(|e| e.revision == 1 && e.state == Some(TokenLife::Grace))
    );

    // The tenant cannot pull the switch: it cannot write issuers.
    let tenant_issuers: Api<TokenIssuer> = Api::namespaced(tenant, &ns.name);
    let refused = tenant_issuers
        .patch(
            "other",
            &PatchParams::default(),
            &Patch::Merge(
                &serde_json::json!({"spec": {"revokeIssuedBefore": "2030-01-01T00:00:00Z"}}),
            ),
        )
        .await;
    assert!(refused.is_err(), "a tenant set an issuer's kill switch");

    // The platform pulls it.
    let said = ok(
        crate::plugin::plugin(&ns, &["revoke", "--issuer", "sa", "--all"], None),
        "kubectl agenttoken revoke --issuer sa --all",
    );
    assert!(said.contains("kill switch set"), "{said}");
    let pulled = std::time::Instant::now();
    // Revoked at once: the replacement may wait for the per-AgentToken mint
    // floor (10 s after the last mint), the revocation does not.
    for name in &names {
        let old = before_revision[name];
        eventually(Duration::from_secs(30), "the old token revoked", || async {
            let st = ats.get(name).await.ok()?.status?;
            st.history
                .iter()
                .any(|e| e.revision == old && e.state == Some(TokenLife::Revoked))
                .then_some(())
        })
        .await;
    }
    let revoked_in = pulled.elapsed();
    for name in &names {
        eventually(
            Duration::from_secs(60),
            "replaced for KillSwitch, the old token revoked",
            || async {
                let st = ats.get(name).await.ok()?.status?;
                let old = st.revision - 1;
                let revoked = st.history.iter().any(|e| {
                    e.revision == old
                        && e.state == Some(TokenLife::Revoked)
                        && e.message
                            .as_deref()
                            .is_some_and(|m| m.contains("kill switch"))
                });
                (st.last_rotation_reason == Some(RotationReason::KillSwitch) && revoked)
                    .then_some(())
            },
        )
        .await;
    }
    let replaced_in = pulled.elapsed();
    // The API server refuses every old token, bot-0's previous one too.
    for name in &names {
        let old = before[name].clone();
        eventually(Duration::from_secs(20), "the old token refused", || async {
            crate::agenttoken::review(&ns, &old)
                .await
                .is_none()
                .then_some(())
        })
        .await;
        let new = token_of(&ns, name).await.expect("a new token");
        assert_ne!(new, old, "{name}");
        assert!(
            crate::agenttoken::review(&ns, &new).await.is_some(),
            "{name}: the new token works"
        );
    }
    let st = ats.get("bot-0").await.unwrap().status.unwrap();
    assert!(
        st.history
            .iter()
            .any(|e| e.revision == 1 && e.state == Some(TokenLife::Revoked)),
        "the previous token, in its grace period, revoked too: {:?}",
        st.history
    );
    eprintln!(
        "kill switch: {BOTS} AgentTokens' tokens revoked in {revoked_in:?}, all replaced in {replaced_in:?}"
    );
    assert!(
        revoked_in < Duration::from_secs(8),
        "revoked ahead of the mint floor: {revoked_in:?}"
    );
    // Another issuer's token is not this issuer's to kill.
    let st = ats.get("elsewhere").await.unwrap().status.unwrap();
    assert_eq!(st.revision, 1);
    assert_eq!(
        token_of(&ns, "elsewhere").await,
        Some(before["elsewhere"].clone())
    );
    // Announced on the issuer, once.
    let events = String::from_utf8_lossy(
        &ns.kubectl(&["get", "events.events.k8s.io", "-o", "json"])
            .stdout,
    )
    .into_owned();
    assert!(
        events.contains("\"reason\": \"KillSwitch\""),
        "a KillSwitch Event on the issuer"
    );
    let issuers: Api<TokenIssuer> = ns.api();
    let announced = issuers
        .get("sa")
        .await
        .unwrap()
        .status
        .unwrap()
        .revoke_issued_before;
    assert!(announced.is_some());

    // Suspended: nothing is minted, and every AgentToken on it says so.
    ok(
        crate::plugin::plugin(&ns, &["suspend", "--issuer", "sa"], None),
        "kubectl agenttoken suspend",
    );
    let out = crate::hostile::apply_as_tenant(&ns.name, &bot("late", "sa"));
    assert!(out.status.success());
    eventually(
        Duration::from_secs(30),
        "late: Ready=False IssuerSuspended",
        || async {
            (condition(&ats, "late", "Ready").await? == ("False".into(), "IssuerSuspended".into()))
                .then_some(())
        },
    )
    .await;
    assert_eq!(ats.get("late").await.unwrap().status.unwrap().revision, 0);
    assert_eq!(token_of(&ns, "late").await, None);
    let issuer_ready = eventually(
        Duration::from_secs(30),
        "the issuer says it is suspended",
        || async {
            let st = issuers.get("sa").await.ok()?.status?;
            let c = st.conditions.into_iter().find(|c| c.type_ == "Ready")?;
            (c.reason == "IssuerSuspended").then_some(c.status)
        },
    )
    .await;
    assert_eq!(issuer_ready, "False");
    // The tokens held stay; a kill switch now revokes them without a
    // replacement.
    for name in &names {
        assert!(
            token_of(&ns, name).await.is_some(),
            "{name} keeps its token"
        );
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    ok(
        crate::plugin::plugin(&ns, &["revoke", "--issuer", "sa", "--all"], None),
        "kill switch while suspended",
    );
    for name in &names {
        eventually(Duration::from_secs(60), "revoked, not replaced", || async {
            let st = ats.get(name).await.ok()?.status?;
            let current = st.history.iter().find(|e| e.revision == st.revision)?;
            (current.state == Some(TokenLife::Revoked)).then_some(())
        })
        .await;
        eventually(Duration::from_secs(20), "the Secret emptied", || async {
            token_of(&ns, name).await.is_none().then_some(())
        })
        .await;
        assert_eq!(
            condition(&ats, name, "Issuing").await,
            Some(("False".into(), "IssuerSuspended".into()))
        );
    }

    // Resumed: every AgentToken gets a token again.
    ok(
        crate::plugin::plugin(&ns, &["resume", "--issuer", "sa"], None),
        "kubectl agenttoken resume",
    );
    for name in names.iter().chain(std::iter::once(&"late".to_string())) {
        eventually(Duration::from_secs(60), "a token after resume", || async {
            let t = token_of(&ns, name).await?;
            crate::agenttoken::review(&ns, &t).await.map(|_| ())
        })
        .await;
    }
    assert!(
        !op.logs().contains(&before["bot-1"]),
        "no token in the operator's logs"
    );
}

/// When each AgentToken's token of revision `revisions[name]` was revoked,
/// once all of them are.
async fn revoked_at(
    ats: &Api<AgentToken>,
    revisions: &BTreeMap<String, i64>,
) -> BTreeMap<String, jiff::Timestamp> {
    let mut out = BTreeMap::new();
    for (name, revision) in revisions {
        let at = eventually(Duration::from_secs(60), "the old token revoked", || async {
            let st = ats.get(name).await.ok()?.status?;
            let e = st.history.iter().find(|e| e.revision == *revision)?;
            (e.state == Some(TokenLife::Revoked))
                .then(|| e.revoked_at.as_ref().map(|t| t.0))
                .flatten()
        })
        .await;
        out.insert(name.clone(), at);
    }
    out
}

fn spread(times: &BTreeMap<String, jiff::Timestamp>) -> i64 {
    let first = times.values().min().unwrap();
    let last = times.values().max().unwrap();
    last.duration_since(*first).as_secs()
}

/// The declarative kill switch for a team (`spec.revokeScope` next to
/// `spec.revokeIssuedBefore` on a ClusterTokenIssuer, real serviceAccount
/// issuer): only the AgentTokens every part of the scope matches are
/// revoked and replaced. On an issuer limited to 1 request a second, the
/// platform's `rateLimit.emergency` lets the kill switch revoke past that
/// budget at once; without it, revocations keep to the shared budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_switch_scoped_to_a_team_and_its_emergency_rate_serviceaccount() {
    let ns = TestNamespace::new("kill-scope").await;
    let op = Operator::start(&ns.name);
    let cti = crate::support::DeleteClusterIssuer(format!(
        "kill-scope-{}",
        crate::support::random_suffix()
    ));
    let issuer_yaml = |emergency: &str| {
        format!(
            "apiVersion: agenttoken.dev/v1alpha1\nkind: ClusterTokenIssuer\nmetadata: {{name: {}}}\n\
             spec:\n  serviceAccount: {{}}\n  policy:\n    allowedNamespaces: [{}]\n\
             \x20   allowedServiceAccounts: [builder]\n    rateLimit: {{perSecond: 1, burst: 1{emergency}}}\n",
            cti.0, ns.name
        )
    };
    applied(&ns, &issuer_yaml(", emergency: {perSecond: 50, burst: 50}"));
    applied(
        &ns,
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: builder}\n",
    );
    let _tenant = crate::hostile::tenant(&ns).await;
    let teams = [("red", 3), ("blue", 3)];
    let mut names = Vec::new();
    for (team, n) in teams {
        for i in 0..n {
            let name = format!("{team}-{i}");
            let yaml = bot(&name, &cti.0)
                .replace(
                    &format!("metadata: {{name: {name}}}"),
                    &format!("metadata: {{name: {name}, labels: {{team: {team}}}}}"),
                )
                .replace(
                    &format!("issuerRef: {{name: {}}}", cti.0),
                    &format!("issuerRef: {{kind: ClusterTokenIssuer, name: {}}}", cti.0),
                );
            let out = crate::hostile::apply_as_tenant(&ns.name, &yaml);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            names.push(name);
        }
    }
    let ats: Api<AgentToken> = ns.api();
    let mut before = BTreeMap::new();
    for name in &names {
        eventually(Duration::from_secs(60), "a first token", || async {
            (ats.get(name).await.ok()?.status?.revision == 1).then_some(())
        })
        .await;
        before.insert(name.clone(), token_of(&ns, name).await.expect("a token"));
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // The platform commits a kill switch for team red in this namespace.
    let now = || {
        jiff::Timestamp::now()
            .round(jiff::Unit::Second)
            .unwrap()
            .to_string()
    };
    let scope = |team: &str| {
        serde_json::json!({
            "namespaces": [ns.name],
            "namespaceSelector": {"matchLabels": {crate::support::TEST_LABEL: "true"}},
            "selector": {"matchLabels": {"team": team}},
        })
    };
    let patch = |v: serde_json::Value| {
        let out = ns.kubectl(&[
            "patch",
            "clustertokenissuer",
            &cti.0,
            "--type=merge",
            "-p",
            &v.to_string(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    patch(serde_json::json!({"spec": {"revokeIssuedBefore": now(), "revokeScope": scope("red")}}));
    let red: BTreeMap<String, i64> = names
        .iter()
        .filter(|n| n.starts_with("red"))
        .map(|n| (n.clone(), 1))
        .collect();
    let red_revoked = revoked_at(&ats, &red).await;
    for name in red.keys() {
        eventually(
            Duration::from_secs(60),
            "replaced for KillSwitch",
            || async {
                let st = ats.get(name).await.ok()?.status?;
                (st.last_rotation_reason == Some(RotationReason::KillSwitch)).then_some(())
            },
        )
        .await;
        eventually(Duration::from_secs(20), "the old token refused", || async {
            crate::agenttoken::review(&ns, &before[name])
                .await
                .is_none()
                .then_some(())
        })
        .await;
    }
    // Three urgent revocations on a 1/s issuer: the emergency budget took
    // them together (the shared budget alone would space them 1 s apart).
    assert!(
        spread(&red_revoked) <= 1,
        "the emergency budget revoked at once: {red_revoked:?}"
    );
    // Team blue is outside the scope: untouched.
    for name in names.iter().filter(|n| n.starts_with("blue")) {
        let st = ats.get(name).await.unwrap().status.unwrap();
        assert_eq!(st.revision, 1, "{name} is not in the kill switch's scope");
        assert_eq!(token_of(&ns, name).await.as_ref(), Some(&before[name]));
    }
    let events = String::from_utf8_lossy(
        &ns.kubectl(&["get", "events.events.k8s.io", "-A", "-o", "json"])
            .stdout,
    )
    .into_owned();
    assert!(
        events.contains("AgentTokens labelled team=red"),
        "the KillSwitch Event names its scope"
    );

    // Without the emergency budget, the same switch for team blue keeps to
    // 1 request a second, shared with the replacements' mints.
    applied(&ns, &issuer_yaml(""));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut blue_scope = scope("blue");
    blue_scope["serviceAccounts"] = serde_json::json!(["build*"]);
    patch(serde_json::json!({"spec": {"revokeIssuedBefore": now(), "revokeScope": blue_scope}}));
    let blue: BTreeMap<String, i64> = names
        .iter()
        .filter(|n| n.starts_with("blue"))
        .map(|n| (n.clone(), 1))
        .collect();
    let blue_revoked = revoked_at(&ats, &blue).await;
    assert!(
        spread(&blue_revoked) >= 2,
        "three revocations at 1/s with a burst of 1 take 2 s or more: {blue_revoked:?}"
    );
    // Red's replacements were minted after the first switch: untouched by
    // the second.
    for name in red.keys() {
        let st = ats.get(name).await.unwrap().status.unwrap();
        assert_eq!(st.revision, 2, "{name}");
    }
    // The imperative form: `revoke -l` annotates each match, and says so
    // on their issuer.
    ok(
        crate::plugin::plugin(&ns, &["revoke", "-l", "team=red"], None),
        "kubectl agenttoken revoke -l team=red",
    );
    let none = ok(
        crate::plugin::plugin(&ns, &["revoke", "--service-account", "deploy-*"], None),
        "kubectl agenttoken revoke --service-account deploy-*",
    );
    assert!(none.contains("for 0 AgentToken(s)"), "{none}");
    let red2: BTreeMap<String, i64> = red.keys().map(|n| (n.clone(), 2)).collect();
    revoked_at(&ats, &red2).await;
    for name in names.iter().filter(|n| n.starts_with("blue")) {
        let st = ats.get(name).await.unwrap().status.unwrap();
        assert_eq!(st.revision, 2, "{name} does not match -l team=red");
    }
    let events = String::from_utf8_lossy(
        &ns.kubectl(&["get", "events.events.k8s.io", "-A", "-o", "json"])
            .stdout,
    )
    .into_owned();
    assert!(
        events.contains("kubectl agenttoken revoke -l team=red"),
        "a KillSwitch Event on the issuer for revoke -l"
    );
    eprintln!(
        "scoped kill switch: red revoked within {} s with the emergency budget, blue over {} s without",
        spread(&red_revoked),
        spread(&blue_revoked)
    );
    assert!(
        !op.logs().contains(&before["red-0"]),
        "no token in the logs"
    );
}

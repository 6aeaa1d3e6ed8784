//! The revocation ledger (issue 17): `status.history` says of every token
//! minted whether it is dead, and the issuer agrees. One test per numbered
//! case of the issue, each asserting on what the issuer itself says (the
//! real oidc-provider's introspection, the webhook stand-in's record of its
//! tokens and of the revoke requests it got), on the ledger and on the
//! Secret. Tenants act through the restricted user (`hostile::tenant`).
//!
//! The operator runs with a namespace of its own (`--lease-namespace`),
//! apart from the tenant's, as it does when installed: what it keeps in
//! order to revoke is out of the tenant's reach.

use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde_json::json;

use agent_token_operator::crd::{
    AgentToken, HistoryEntry, IssuerKind, RevocationState, TokenIssuer, TokenLife,
};

use agent_token_operator::rotation::fingerprint;

use crate::apiproxy::{ApiProxy, Effect, Fault, lease_write, secret_write};
use crate::hostile::tenant;
use crate::oauth2::{
    AGENT_TOKEN, client_credentials, client_secret, introspect, issuer_yaml, start_provider,
    token_in_secret,
};
use crate::support::{Operator, TestNamespace, applied, cluster, eventually, kubectl_as};
use crate::webhook::{RevokeMode, StandIn};

/// An operator serving `ns`, with its own namespace apart. Returned in
/// drop order: the operator stops first, then what it left is unblocked
/// (finalizers stripped, so a failed test leaves no namespace stuck
/// Terminating), then its namespace goes.
async fn operator(ns: &TestNamespace, name: &str) -> (TestNamespace, Unblock, Operator) {
    let home = TestNamespace::new("ledger-op").await;
    let op = Operator::start_with(
        &ns.name,
        name,
        &["--leader-election=false", "--lease-namespace", &home.name],
    );
    (home, Unblock(ns.name.clone()), op)
}

/// A namespace with its own operator, serving `bot` from the webhook
/// issuer `minter` on `mint` (`with_id`: the issuer reads the token id),
/// once revision 1 is delivered. Fields drop in order: the operator, then
/// the finalizers stripped, then the namespaces.
struct Served {
    _op: Operator,
    _unblock: Unblock,
    home: TestNamespace,
    ns: TestNamespace,
    api: Api<AgentToken>,
}

async fn served(
    prefix: &str,
    operator_name: &str,
    mint: &StandIn,
    with_id: bool,
    grace: &str,
) -> Served {
    let ns = TestNamespace::new(prefix).await;
    let (home, unblock, op) = operator(&ns, operator_name).await;
    webhook_issuer(&ns, "minter", mint, with_id).await;
    applied(&ns, &agent_token("minter", grace));
    let api: Api<AgentToken> = ns.api();
    wait_at(&api, "revision 1", 45, |at| revision(at) >= 1).await;
    Served {
        _op: op,
        _unblock: unblock,
        home,
        ns,
        api,
    }
}

/// On drop, strips the finalizers of the AgentTokens and TokenIssuers left
/// in a namespace (the operator that would remove them is gone by then).
struct Unblock(String);

impl Drop for Unblock {
    fn drop(&mut self) {
        let kc = &cluster().admin_kubeconfig;
        let out = kubectl_as(
            kc,
            Some(&self.0),
            &[
                "get",
                "agenttokens.agenttoken.dev,tokenissuers.agenttoken.dev",
                "-o",
                "name",
            ],
        );
        for obj in String::from_utf8_lossy(&out.stdout).lines() {
            let _ = kubectl_as(
                kc,
                Some(&self.0),
                &[
                    "patch",
                    obj,
                    "--type=merge",
                    "-p",
                    r#"{"metadata":{"finalizers":null}}"#,
                ],
            );
        }
    }
}

/// The Secret with the stand-in's Authorization header, for its issuer.
async fn authorization_secret(ns: &TestNamespace, name: &str, stand_in: &StandIn) {
    let s: Secret = serde_json::from_value(json!({
        "metadata": {"name": name},
        "stringData": {"authorization": stand_in.authorization()},
    }))
    .unwrap();
    ns.api::<Secret>()
        .create(&Default::default(), &s)
        .await
        .unwrap();
}

/// A webhook TokenIssuer `name` for `stand_in` (and its Authorization
/// Secret). Without `with_id` the mint answer's id is not read, so a
/// revocation needs the token value itself.
async fn webhook_issuer(ns: &TestNamespace, name: &str, stand_in: &StandIn, with_id: bool) {
    authorization_secret(ns, &format!("{name}-auth"), stand_in).await;
    applied(
        ns,
        &webhook_issuer_json(name, stand_in, with_id).to_string(),
    );
}

/// The TokenIssuer [`webhook_issuer`] applies (its Secret `<name>-auth`).
fn webhook_issuer_json(name: &str, stand_in: &StandIn, with_id: bool) -> serde_json::Value {
    let auth = format!("{name}-auth");
    let mut result = json!({"tokenPath": "$.data.token", "expiresInPath": "$.data.ttl"});
    if with_id {
        result["idPath"] = json!("$.data.id");
    }
    json!({
        "apiVersion": "agenttoken.dev/v1alpha1",
        "kind": "TokenIssuer",
        "metadata": {"name": name},
        "spec": {
            "webhook": {
                "url": stand_in.url("/mint"),
                "authorizationSecretRef": {"name": auth, "key": "authorization"},
                "result": result,
                "revokeURL": stand_in.url("/revoke"),
            },
            "policy": {"allowedScopes": ["read", "deploy"]},
        },
    })
}

/// AgentToken `bot` for the issuer `issuer`: scope `read`, 10m asked for.
fn agent_token(issuer: &str, grace: &str) -> String {
    json!({
        "apiVersion": "agenttoken.dev/v1alpha1",
        "kind": "AgentToken",
        "metadata": {"name": "bot"},
        "spec": {
            "issuerRef": {"name": issuer},
            "scopes": ["read"],
            "lifetime": "10m",
            "previousTokenGracePeriod": grace,
        },
    })
    .to_string()
}

fn revision(at: &AgentToken) -> i64 {
    at.status.as_ref().map_or(0, |s| s.revision)
}

fn entry(at: &AgentToken, revision: i64) -> Option<&HistoryEntry> {
    at.status
        .as_ref()?
        .history
        .iter()
        .find(|h| h.revision == revision)
}

/// The ledger as a failure message may show it (fingerprints, never tokens).
fn ledger(at: &AgentToken) -> String {
    let Some(st) = at.status.as_ref() else {
        return "no status".into();
    };
    let entries: Vec<String> = st
        .history
        .iter()
        .map(|h| {
            format!(
                "r{} {} state={:?} revocation={:?} attempts={} next={:?} issuer={:?} message={:?}",
                h.revision,
                h.fingerprint,
                h.state,
                h.revocation,
                h.attempts,
                h.next_attempt_at.as_ref().map(|t| t.0.to_string()),
                h.issuer.as_ref().map(|i| format!("{}/{}", i.type_, i.name)),
                h.message,
            )
        })
        .collect();
    let conditions: Vec<String> = st
        .conditions
        .iter()
        .map(|c| format!("{}={} {}", c.type_, c.status, c.reason))
        .collect();
    format!(
        "revision {} conditions {conditions:?} history [{}]",
        st.revision,
        entries.join("; ")
    )
}

/// Polls AgentToken `bot` until `check` holds; on timeout the panic shows
/// the last ledger seen.
async fn wait_at<F>(api: &Api<AgentToken>, what: &str, secs: u64, check: F) -> AgentToken
where
    F: Fn(&AgentToken) -> bool,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut last = None;
    loop {
        if let Ok(at) = api.get("bot").await {
            if check(&at) {
                return at;
            }
            last = Some(at);
        }
        if Instant::now() >= deadline {
            panic!(
                "timed out after {secs}s waiting for {what}; ledger: {}",
                last.as_ref().map_or("no AgentToken".into(), ledger)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn condition(at: &AgentToken, type_: &str) -> Option<(String, String)> {
    at.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

/// `agenttoken.dev/rotate` on `bot`, through `api` (whoever it acts as).
async fn rotate(api: &Api<AgentToken>, value: &str) {
    let patch = json!({"metadata": {"annotations": {"agenttoken.dev/rotate": value}}});
    api.patch("bot", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("annotate rotate");
}

/// The value of `key` in Secret `name`, if both exist.
async fn secret_value(ns: &TestNamespace, name: &str, key: &str) -> Option<String> {
    let s: Secret = ns.api().get_opt(name).await.ok()??;
    let v = s.data?.get(key)?.0.clone();
    Some(String::from_utf8(v).unwrap())
}

fn active(info: &serde_json::Value) -> bool {
    info["active"] == true
}

/// Case 3, RFC 7009 half: the tenant puts another string into the Secret
/// (here someone else's live token of the same client, the worst choice),
/// then forces a rotation with no grace. The provider answers 200 for any
/// revocation, so only the provider's own view tells what was revoked: the
/// original token must be dead, the edited value untouched.
#[tokio::test]
async fn oidc_provider_edited_token_value_is_not_what_gets_revoked() {
    let p = start_provider(900);
    let ns = TestNamespace::new("ledger-edit").await;
    let (_home, _unblock, op) = operator(&ns, "edit").await;
    client_secret(&ns, &p.basic.1).await;
    applied(&ns, &issuer_yaml(&p, "ClientSecretBasic", &p.basic.0));
    applied(&ns, AGENT_TOKEN);
    let api: Api<AgentToken> = ns.api();
    wait_at(&api, "revision 1", 45, |at| revision(at) >= 1).await;
    let original = token_in_secret(&ns).await;
    assert!(active(&introspect(&p, &original).await), "revision 1 live");
    let other = client_credentials(&p, "deploy").await;
    assert!(
        active(&introspect(&p, &other).await),
        "the other token live"
    );

    let tenant = tenant(&ns).await;
    let patch = json!({"stringData": {"token": other}});
    Api::<Secret>::namespaced(tenant.clone(), &ns.name)
        .patch("bot", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("the tenant edits its Secret");
    rotate(&Api::namespaced(tenant, &ns.name), "edited").await;

    let at = wait_at(
        &api,
        "a new revision, and revision 1 out of Pending",
        60,
        |at| {
            revision(at) >= 2
                && entry(at, 1).is_some_and(|h| h.revocation != RevocationState::Pending)
        },
    )
    .await;
    let original_active = active(&introspect(&p, &original).await);
    let other_active = active(&introspect(&p, &other).await);
    assert!(
        !original_active,
        "the original token of revision 1 is still active at the provider; ledger: {}",
        ledger(&at)
    );
    assert!(
        other_active,
        "the edited value (another live token) was revoked in revision 1's name; ledger: {}",
        ledger(&at)
    );
    let h = entry(&at, 1).unwrap();
    assert_eq!(h.revocation, RevocationState::Revoked, "{}", ledger(&at));
    assert_eq!(h.state, Some(TokenLife::Revoked), "{}", ledger(&at));
    let logs = op.logs();
    for secret in [&original, &other, &p.basic.1] {
        assert!(!logs.contains(secret.as_str()), "a secret reached the log");
    }
}

/// Case 3, webhook half: a revoke answered 404 is no confirmation (the
/// stand-in here keeps the token active): the ledger says Failed, with a
/// message and no retry, never Revoked.
#[tokio::test]
async fn webhook_stand_in_revoke_answered_404_is_not_recorded_revoked() {
    let mint = StandIn::start().await;
    let served = served("ledger-404", "404", &mint, true, "0s").await;
    let (ns, api) = (&served.ns, &served.api);
    let first = secret_value(ns, "bot", "token").await.unwrap();
    let id = mint.id_of(&first).expect("minted by the stand-in");

    mint.set_revoke_mode(RevokeMode::NotFound);
    rotate(api, "1").await;
    let at = wait_at(
        api,
        "revision 2, a revoke request for revision 1 and its outcome",
        45,
        |at| {
            revision(at) >= 2
                && mint.revokes().iter().any(|r| r.names(&id))
                && entry(at, 1).is_some_and(|h| {
                    h.revocation != RevocationState::Pending || h.state == Some(TokenLife::Failed)
                })
        },
    )
    .await;
    assert_eq!(mint.active(&id), Some(true), "the stand-in kept it active");
    let h = entry(&at, 1).unwrap();
    assert!(
        h.revocation != RevocationState::Revoked && h.state != Some(TokenLife::Revoked),
        "the stand-in answered 404 and its token is still active, yet the ledger says revoked: {}",
        ledger(&at)
    );
    assert_eq!(h.state, Some(TokenLife::Failed), "{}", ledger(&at));
    assert_eq!(h.revocation, RevocationState::Failed, "{}", ledger(&at));
    assert!(h.message.is_some(), "a reason: {}", ledger(&at));
    assert!(
        h.next_attempt_at.is_none(),
        "a 404 is not retried: {}",
        ledger(&at)
    );
}

/// Case 4: the TokenIssuer is deleted before its AgentToken. The issuer
/// outlives what it minted: when it is finally gone, its token is dead at
/// the stand-in (no fallback to another issuer kind that "revokes" nothing).
#[tokio::test]
async fn webhook_stand_in_issuer_deleted_first_outlives_its_tokens() {
    let mint = StandIn::start().await;
    let served = served("ledger-gone", "gone", &mint, true, "0s").await;
    let (ns, api) = (&served.ns, &served.api);
    let first = secret_value(ns, "bot", "token").await.unwrap();
    let id = mint.id_of(&first).expect("minted by the stand-in");

    for what in [
        "tokenissuers.agenttoken.dev/minter",
        "agenttokens.agenttoken.dev/bot",
    ] {
        let out = ns.kubectl(&["delete", what, "--wait=false"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let issuers: Api<TokenIssuer> = ns.api();
    let live_when_gone = eventually(Duration::from_secs(60), "the TokenIssuer gone", || async {
        match issuers.get_opt("minter").await {
            Ok(None) => Some(mint.active(&id)),
            _ => None,
        }
    })
    .await;
    assert_eq!(
        live_when_gone,
        Some(false),
        "the TokenIssuer was gone while the token it minted was still active at the stand-in"
    );
    eventually(Duration::from_secs(60), "the AgentToken gone", || async {
        matches!(api.get_opt("bot").await, Ok(None)).then_some(())
    })
    .await;
    assert_eq!(mint.active(&id), Some(false));
}

/// Case 5: the stand-in answers 503 when the grace period ends. The ledger
/// shows the failure and when it is retried; once the stand-in recovers,
/// the old token is revoked within the backoff.
#[tokio::test]
async fn webhook_stand_in_503_at_grace_end_then_recovers_revokes_within_backoff() {
    let mint = StandIn::start().await;
    let served = served("ledger-503", "503", &mint, true, "5s").await;
    let (ns, api) = (&served.ns, &served.api);
    let first = secret_value(ns, "bot", "token").await.unwrap();
    let id = mint.id_of(&first).expect("minted by the stand-in");

    mint.set_revoke_mode(RevokeMode::Unavailable);
    rotate(api, "1").await;
    let at = wait_at(
        api,
        "revision 1's revocation answered 503 and recorded Failed with attempts and nextAttemptAt",
        45,
        |at| {
            mint.revokes()
                .iter()
                .any(|r| r.names(&id) && r.status == 503)
                && entry(at, 1).is_some_and(|h| {
                    h.state == Some(TokenLife::Failed)
                        && h.attempts >= 1
                        && h.next_attempt_at.is_some()
                })
        },
    )
    .await;
    let h = entry(&at, 1).unwrap();
    assert_eq!(
        h.revocation,
        RevocationState::Pending,
        "retries go on, so the summary is Pending: {}",
        ledger(&at)
    );
    assert!(h.message.is_some(), "the failure's reason: {}", ledger(&at));
    let due = h.next_attempt_at.as_ref().unwrap().0;
    let wait = due.duration_since(Timestamp::now());
    assert!(
        wait.as_secs() <= 60,
        "the first retry is due within a minute, not in {wait}: {}",
        ledger(&at)
    );
    assert_eq!(mint.active(&id), Some(true));

    mint.set_revoke_mode(RevokeMode::Normal);
    let recovered = Instant::now();
    let at = wait_at(
        api,
        "revision 1 revoked once the stand-in recovered",
        60,
        |at| {
            mint.active(&id) == Some(false)
                && entry(at, 1).is_some_and(|h| {
                    h.revocation == RevocationState::Revoked && h.state == Some(TokenLife::Revoked)
                })
        },
    )
    .await;
    println!(
        "revoked {:.1}s after the stand-in recovered",
        recovered.elapsed().as_secs_f64()
    );
    let current = secret_value(ns, "bot", "token").await.unwrap();
    let current_id = mint.id_of(&current).expect("minted by the stand-in");
    assert_ne!(current_id, id);
    assert_eq!(mint.active(&current_id), Some(true), "{}", ledger(&at));
}

/// Case 6: the tenant deletes the Secret. The token it held is not lost:
/// when it is retired (here by a forced rotation) the provider says it is
/// dead and the ledger says Revoked.
#[tokio::test]
async fn oidc_provider_deleted_secret_does_not_lose_the_old_token() {
    let p = start_provider(900);
    let ns = TestNamespace::new("ledger-delsecret").await;
    let (_home, _unblock, op) = operator(&ns, "delsecret").await;
    client_secret(&ns, &p.basic.1).await;
    applied(&ns, &issuer_yaml(&p, "ClientSecretBasic", &p.basic.0));
    applied(&ns, AGENT_TOKEN);
    let api: Api<AgentToken> = ns.api();
    wait_at(&api, "revision 1", 45, |at| revision(at) >= 1).await;
    let original = token_in_secret(&ns).await;
    assert!(active(&introspect(&p, &original).await), "revision 1 live");

    let tenant = tenant(&ns).await;
    Api::<Secret>::namespaced(tenant.clone(), &ns.name)
        .delete("bot", &Default::default())
        .await
        .expect("the tenant deletes its Secret");
    rotate(&Api::namespaced(tenant, &ns.name), "after-delete").await;

    let at = wait_at(&api, "a new revision, and revision 1 revoked", 60, |at| {
        revision(at) >= 2 && entry(at, 1).is_some_and(|h| h.revocation != RevocationState::Pending)
    })
    .await;
    assert!(
        !active(&introspect(&p, &original).await),
        "the token the deleted Secret held is still active at the provider; ledger: {}",
        ledger(&at)
    );
    let h = entry(&at, 1).unwrap();
    assert_eq!(h.revocation, RevocationState::Revoked, "{}", ledger(&at));
    assert_eq!(h.state, Some(TokenLife::Revoked), "{}", ledger(&at));
    let current = token_in_secret(&ns).await;
    assert_ne!(current, original);
    assert!(
        active(&introspect(&p, &current).await),
        "the new token live"
    );
    let logs = op.logs();
    for secret in [&original, &current, &p.basic.1] {
        assert!(!logs.contains(secret.as_str()), "a secret reached the log");
    }
}

/// Case 6, the other way to lose a Secret: `spec.secret.name` is renamed.
/// The issuer reads no id, so only the token value can revoke it; the
/// token the old Secret held is still revoked at the stand-in when it is
/// retired (here by a forced rotation), and the ledger says so.
#[tokio::test]
async fn webhook_stand_in_renamed_secret_does_not_lose_the_old_token() {
    let mint = StandIn::start().await;
    let served = served("ledger-rename", "rename", &mint, false, "0s").await;
    let (ns, api) = (&served.ns, &served.api);
    let first = secret_value(ns, "bot", "token").await.unwrap();
    let id = mint.id_of(&first).expect("minted by the stand-in");

    let tenant = tenant(ns).await;
    let tenant_ats: Api<AgentToken> = Api::namespaced(tenant, &ns.name);
    let patch = json!({"spec": {"secret": {"name": "bot-renamed"}}});
    tenant_ats
        .patch("bot", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("the tenant renames the Secret");
    rotate(&tenant_ats, "after-rename").await;
    let at = wait_at(
        api,
        "a token in the renamed Secret, and revision 1 out of Pending",
        60,
        |at| {
            revision(at) >= 2
                && at.status.as_ref().and_then(|s| s.secret_name.as_deref()) == Some("bot-renamed")
                && entry(at, 1).is_some_and(|h| h.revocation != RevocationState::Pending)
        },
    )
    .await;
    assert_eq!(
        mint.active(&id),
        Some(false),
        "the token the old Secret held is still active at the stand-in; ledger: {}",
        ledger(&at)
    );
    let h = entry(&at, 1).unwrap();
    assert_eq!(h.revocation, RevocationState::Revoked, "{}", ledger(&at));
    assert_eq!(h.state, Some(TokenLife::Revoked), "{}", ledger(&at));
    let current = secret_value(ns, "bot-renamed", "token")
        .await
        .expect("the renamed Secret holds a token");
    let current_id = mint.id_of(&current).expect("minted by the stand-in");
    assert_ne!(current_id, id);
    assert_eq!(mint.active(&current_id), Some(true), "{}", ledger(&at));
}

/// A webhook issuer that returns no id is revoked by the token's value,
/// kept in the operator's namespace until then. After three rotations
/// (no grace period) every old token is revoked at the stand-in, and the
/// keeper holds the current token and at most the one revoked last: a
/// revoked value leaves in the write that keeps the next token, not in a
/// write of its own (one write per rotation less).
#[tokio::test]
async fn webhook_stand_in_keeper_drops_revoked_values_with_the_next_token() {
    let mint = StandIn::start().await;
    let served = served("ledger-keep", "keep", &mint, false, "0s").await;
    let (ns, api) = (&served.ns, &served.api);
    let home = &served.home;
    let tenant_ats: Api<AgentToken> = Api::namespaced(tenant(ns).await, &ns.name);
    for r in 2..=4 {
        rotate(&tenant_ats, &format!("keep-{r}")).await;
        wait_at(api, "the next revision, the one before revoked", 60, |at| {
            revision(at) >= r
                && entry(at, r - 1).is_some_and(|e| e.state == Some(TokenLife::Revoked))
        })
        .await;
    }
    let issued = mint.issued();
    assert_eq!(issued.len(), 4, "one token per revision");
    for i in &issued[..3] {
        assert!(
            i.revoked,
            "revision {:?} still active at the stand-in",
            i.revision
        );
    }
    assert!(!issued[3].revoked, "the current token was revoked");
    let uid = api.get("bot").await.unwrap().uid().unwrap();
    let keeper = home
        .api::<Secret>()
        .get(&format!("agenttoken-keep-{uid}"))
        .await
        .expect("the keeper");
    let mut held: Vec<String> = keeper.data.unwrap_or_default().into_keys().collect();
    held.sort();
    assert_eq!(held, ["r3", "r4"], "what the keeper holds");
}

/// Case 7: issuerRef moves from stand-in A to stand-in B. The old token is
/// revoked at A, the issuer the ledger records for it; B never gets a
/// revoke request (not even by an id that happens to be one of its own).
#[tokio::test]
async fn webhook_stand_in_issuer_ref_change_revokes_at_the_old_issuer() {
    let a = StandIn::start().await;
    let b = StandIn::start().await;
    let ns = TestNamespace::new("ledger-moved").await;
    let (_home, _unblock, _op) = operator(&ns, "moved").await;
    webhook_issuer(&ns, "minter-a", &a, true).await;
    webhook_issuer(&ns, "minter-b", &b, true).await;
    applied(&ns, &agent_token("minter-a", "0s"));
    let api: Api<AgentToken> = ns.api();
    wait_at(&api, "revision 1", 45, |at| revision(at) >= 1).await;
    let first = secret_value(&ns, "bot", "token").await.unwrap();
    let id_a = a.id_of(&first).expect("minted by A");

    let patch = json!({"spec": {"issuerRef": {"name": "minter-b"}}});
    api.patch("bot", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let at = wait_at(
        &api,
        "a revision from B, and revision 1 out of Pending",
        45,
        |at| {
            revision(at) >= 2
                && entry(at, 1).is_some_and(|h| h.revocation != RevocationState::Pending)
        },
    )
    .await;
    let current = secret_value(&ns, "bot", "token").await.unwrap();
    let id_b = b.id_of(&current).expect("the current token is from B");
    let to_b = b.revokes();
    assert!(
        to_b.is_empty(),
        "B got {} revoke request(s) for a token it never minted ({} naming B's own current token, {} carrying a token B never minted); ledger: {}",
        to_b.len(),
        to_b.iter().filter(|r| r.names(&id_b)).count(),
        to_b.iter().filter(|r| r.foreign_token).count(),
        ledger(&at)
    );
    assert_eq!(
        a.active(&id_a),
        Some(false),
        "the old token is still active at A; ledger: {}",
        ledger(&at)
    );
    assert_eq!(b.active(&id_b), Some(true), "B's token untouched");
    let h = entry(&at, 1).unwrap();
    assert_eq!(h.revocation, RevocationState::Revoked, "{}", ledger(&at));
    assert_eq!(h.state, Some(TokenLife::Revoked), "{}", ledger(&at));
    let issuers: Api<TokenIssuer> = ns.api();
    let uid_a = issuers.get("minter-a").await.unwrap().uid();
    let rec = h.issuer.as_ref().expect("the minting issuer is recorded");
    assert_eq!(
        (rec.kind, rec.name.as_str(), rec.type_.as_str()),
        (IssuerKind::TokenIssuer, "minter-a", "webhook")
    );
    assert_eq!(Some(rec.uid.clone()), uid_a);
    let rec2 = entry(&at, 2).and_then(|h| h.issuer.as_ref());
    assert_eq!(rec2.map(|r| r.name.as_str()), Some("minter-b"));
}

/// Case 9: the issuer's policy stops allowing the AgentToken's scope. The
/// token already delivered is revoked at the stand-in and taken out of the
/// Secret, Ready=False PolicyViolation, the ledger says Revoked and why.
#[tokio::test]
async fn webhook_stand_in_policy_tightened_revokes_the_delivered_token() {
    let mint = StandIn::start().await;
    let served = served("ledger-policy", "policy", &mint, true, "0s").await;
    let (ns, api) = (&served.ns, &served.api);
    let first = secret_value(ns, "bot", "token").await.unwrap();
    let id = mint.id_of(&first).expect("minted by the stand-in");

    let issuers: Api<TokenIssuer> = ns.api();
    let patch = json!({"spec": {"policy": {"allowedScopes": ["deploy"]}}});
    issuers
        .patch("minter", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    wait_at(api, "Ready=False PolicyViolation", 30, |at| {
        condition(at, "Ready") == Some(("False".into(), "PolicyViolation".into()))
    })
    .await;
    let at = wait_at(
        api,
        "the delivered token revoked at the stand-in and in the ledger",
        45,
        |at| {
            mint.active(&id) == Some(false)
                || entry(at, 1).is_some_and(|h| h.revocation != RevocationState::Pending)
        },
    )
    .await;
    assert_eq!(
        mint.active(&id),
        Some(false),
        "still active at the stand-in; ledger: {}",
        ledger(&at)
    );
    let h = entry(&at, 1).unwrap();
    assert_eq!(h.revocation, RevocationState::Revoked, "{}", ledger(&at));
    assert_eq!(h.state, Some(TokenLife::Revoked), "{}", ledger(&at));
    assert!(h.message.is_some(), "why: {}", ledger(&at));
    let held = eventually(Duration::from_secs(15), "the Secret read", || async {
        ns.api::<Secret>().get_opt("bot").await.ok()
    })
    .await;
    let keys: Vec<String> = held
        .and_then(|s| s.data)
        .map(|d| {
            d.into_iter()
                .filter(|(k, v)| k.starts_with("token") && !v.0.is_empty())
                .map(|(k, _)| k)
                .collect()
        })
        .unwrap_or_default();
    assert!(keys.is_empty(), "the Secret still holds {keys:?}");
    assert_eq!(
        condition(&api.get("bot").await.unwrap(), "Ready"),
        Some(("False".into(), "PolicyViolation".into()))
    );
}

/// Case 10: the token expired and its revocation can never succeed (the
/// stand-in answers 503 to everything). Deleting the AgentToken completes
/// in bounded time: the finalizer does not wait on a dead token.
#[tokio::test]
async fn webhook_stand_in_finalizer_does_not_wait_on_an_expired_token() {
    let mint = StandIn::start().await;
    mint.set_ttl(20);
    let ns = TestNamespace::new("ledger-expired").await;
    let (_home, _unblock, _op) = operator(&ns, "expired").await;
    webhook_issuer(&ns, "minter", &mint, true).await;
    applied(&ns, &agent_token("minter", "0s"));
    let api: Api<AgentToken> = ns.api();
    let at = wait_at(&api, "revision 1", 45, |at| revision(at) >= 1).await;
    let first = secret_value(&ns, "bot", "token").await.unwrap();
    let id = mint.id_of(&first).expect("minted by the stand-in");
    mint.set_revoke_mode(RevokeMode::Unavailable);
    mint.set_mint_unavailable(true);
    let expires = at.status.as_ref().unwrap().expires_at.as_ref().unwrap().0;
    eventually(Duration::from_secs(40), "revision 1 expired", || async {
        (Timestamp::now().duration_since(expires) > jiff::SignedDuration::from_secs(1))
            .then_some(())
    })
    .await;
    // The operator has seen the expiry (it tried to rotate meanwhile and
    // cannot: the stand-in answers 503).
    let at = wait_at(&api, "no valid token (Ready=False)", 30, |at| {
        condition(at, "Ready").is_some_and(|c| c.0 == "False")
    })
    .await;
    assert_eq!(revision(&at), 1, "{}", ledger(&at));

    let out = ns.kubectl(&[
        "delete",
        "agenttokens.agenttoken.dev",
        "bot",
        "--wait=false",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let asked = Instant::now();
    eventually(
        Duration::from_secs(30),
        "the AgentToken deleted (its only token expired, revocation impossible)",
        || async { matches!(api.get_opt("bot").await, Ok(None)).then_some(()) },
    )
    .await;
    println!(
        "deleted {:.1}s after it was asked",
        asked.elapsed().as_secs_f64()
    );
    assert_eq!(mint.active(&id), Some(true), "the stand-in never revoked");
}

/// Case 10 (nothing held) with case 6: the webhook issuer reads no id, so
/// revoking needs the token value; the tenant deletes the Secret that held
/// it. Deleting the AgentToken then completes in bounded time, and every
/// token the stand-in minted for it is dead.
#[tokio::test]
async fn webhook_stand_in_finalizer_completes_after_the_tenant_deleted_the_secret() {
    let mint = StandIn::start().await;
    let served = served("ledger-noid", "noid", &mint, false, "0s").await;
    let (ns, api) = (&served.ns, &served.api);
    let first = secret_value(ns, "bot", "token").await.unwrap();
    let id = mint.id_of(&first).expect("minted by the stand-in");

    let tenant = tenant(ns).await;
    let secrets: Api<Secret> = Api::namespaced(tenant, &ns.name);
    let uid = secrets.get("bot").await.unwrap().meta().uid.clone();
    secrets
        .delete("bot", &Default::default())
        .await
        .expect("the tenant deletes its Secret");
    eventually(Duration::from_secs(30), "a Secret again", || async {
        let s = secrets.get_opt("bot").await.ok()??;
        (s.meta().uid != uid).then_some(())
    })
    .await;

    let out = ns.kubectl(&[
        "delete",
        "agenttokens.agenttoken.dev",
        "bot",
        "--wait=false",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut last = None;
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        match api.get_opt("bot").await {
            Ok(None) => break,
            Ok(Some(at)) => last = Some(at),
            Err(_) => {}
        }
        assert!(
            Instant::now() < deadline,
            "the AgentToken still exists 45s after its deletion; ledger: {}",
            last.as_ref().map_or("unknown".into(), ledger)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        mint.active(&id),
        Some(false),
        "the token the deleted Secret held is still active at the stand-in"
    );
    assert_eq!(
        mint.live(),
        0,
        "tokens minted for the deleted AgentToken still active"
    );
}

/// Case 11: a leader frozen mid-mint (SIGSTOP, as a paused VM) past its
/// Lease. The standby takes over and mints the next revision; when the old
/// leader wakes with the issuer's answer, it is no longer leader: it
/// revokes what it minted and writes nothing, so the ledger and the Secret
/// stay the new leader's. (Before, the woken replica delivered its token
/// over the new leader's and wrote its status.)
#[tokio::test]
async fn webhook_stand_in_leader_frozen_during_a_mint_revokes_its_token_and_writes_nothing() {
    let ns = TestNamespace::new("ledger-frozen").await;
    let home = TestNamespace::new("ledger-op").await;
    let _unblock = Unblock(ns.name.clone());
    let stand_in = StandIn::start().await;
    let args = [
        "--leader-election=true",
        "--lease-duration=10s",
        "--lease-namespace",
        home.name.as_str(),
        "--lease-name",
        "frozen",
    ];
    let mut first = Operator::start_with(&ns.name, "first", &args);
    someone_leads(&home, "frozen").await;
    // The first mint is answered 3s after the token exists.
    stand_in.set_fixed_answer_delay(Duration::from_secs(3));
    webhook_issuer(&ns, "minter", &stand_in, true).await;
    applied(&ns, &agent_token("minter", "0s"));
    eventually(
        Duration::from_secs(30),
        "the stand-in minted revision 1",
        || async { (!stand_in.issued().is_empty()).then_some(()) },
    )
    .await;
    first.signal("STOP");
    let frozen_id = stand_in.issued()[0].id.clone();
    stand_in.set_answer_delay(Duration::ZERO);
    let mut second = Operator::start_with(&ns.name, "second", &args);
    let api: Api<AgentToken> = ns.api();
    let at = wait_at(&api, "the standby delivered revision 2", 60, |at| {
        revision(at) == 2 && entry(at, 2).is_some_and(|e| e.state == Some(TokenLife::Live))
    })
    .await;
    let r1 = entry(&at, 1).cloned();
    first.signal("CONT");
    // The woken replica stops (it lost the Lease) without writing: if it
    // got the issuer's answer it revoked the token; if its deadline cut
    // the call first, the new leader's ledger says Unknown for revision 1.
    let stopped_by = Instant::now() + Duration::from_secs(30);
    while !first.exited() {
        assert!(
            Instant::now() < stopped_by,
            "the frozen replica did not stop"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let at = api.get("bot").await.unwrap();
    let r1_state = entry(&at, 1).and_then(|e| e.state);
    assert!(
        stand_in.active(&frozen_id) == Some(false)
            || matches!(r1_state, Some(TokenLife::Unknown | TokenLife::Expired)),
        "the frozen replica's token is neither revoked nor accounted Unknown: {}",
        ledger(&at)
    );
    assert_eq!(revision(&at), 2, "{}", ledger(&at));
    let live = entry(&at, 2).unwrap();
    assert_eq!(live.state, Some(TokenLife::Live), "{}", ledger(&at));
    let secret = ns.api::<Secret>().get("bot").await.unwrap();
    let held = secret.data.unwrap()["token"].0.clone();
    assert_eq!(
        agent_token_operator::rotation::fingerprint(&held),
        live.fingerprint,
        "the Secret holds the new leader's token: {}",
        ledger(&at)
    );
    // Revision 1: the new leader read the intent as an interrupted mint;
    // it never became Live.
    let r1_now = entry(&at, 1);
    assert!(
        r1_now.is_none_or(|e| e.state != Some(TokenLife::Live)),
        "{}",
        ledger(&at)
    );
    assert!(
        r1.as_ref().is_none_or(|e| e.state != Some(TokenLife::Live)),
        "before the wake-up: {r1:?}"
    );
    second.stop();
}

/// A token whose revocation needs its value is never delivered unless it
/// was kept first: with the operator's own namespace missing (so no
/// keeper can be written), each minted token is revoked at once and the
/// Secret gets none.
#[tokio::test]
async fn webhook_stand_in_token_that_cannot_be_kept_is_revoked_not_delivered() {
    let ns = TestNamespace::new("ledger-nokeep").await;
    let _unblock = Unblock(ns.name.clone());
    let stand_in = StandIn::start().await;
    let missing = format!("no-such-ns-{}", crate::support::random_suffix());
    let _op = Operator::start_with(
        &ns.name,
        "solo",
        &["--leader-election=false", "--lease-namespace", &missing],
    );
    webhook_issuer(&ns, "minter", &stand_in, false).await;
    applied(&ns, &agent_token("minter", "0s"));
    let api: Api<AgentToken> = ns.api();
    let at = wait_at(&api, "a mint revoked for want of a keeper", 60, |at| {
        at.status.as_ref().is_some_and(|s| {
            s.history.iter().any(|e| {
                e.state == Some(TokenLife::Revoked)
                    && e.message.as_deref().is_some_and(|m| m.contains("kept"))
            })
        })
    })
    .await;
    let issued = stand_in.issued();
    assert!(!issued.is_empty());
    // Every token minted so far is revoked, or is the one being minted now.
    let active: Vec<_> = issued.iter().filter(|i| !i.revoked).collect();
    assert!(active.len() <= 1, "{active:?}; ledger: {}", ledger(&at));
    let secret = ns.api::<Secret>().get_opt("bot").await.unwrap();
    assert!(
        secret
            .and_then(|s| s.data)
            .is_none_or(|d| !d.contains_key("token")),
        "a token was delivered without being kept"
    );
    assert_eq!(revision(&at), 0, "{}", ledger(&at));
}

/// An operator serving `ns` through `proxy` (its own namespace `home`).
fn operator_via(
    proxy: &ApiProxy,
    ns: &TestNamespace,
    home: &TestNamespace,
    name: &str,
) -> Operator {
    Operator::start_as(
        &ns.name,
        name,
        &["--leader-election=false", "--lease-namespace", &home.name],
        &proxy.kubeconfig,
    )
}

/// Case 8, the ambiguous write: the API server applies the token Secret's
/// creation but its answer is lost (the fault-injecting proxy answers 500
/// in its place). The token is in the Secret: it must be recorded as
/// delivered, not revoked as "never delivered".
#[tokio::test]
async fn webhook_stand_in_secret_write_answer_lost_keeps_the_delivered_token() {
    let ns = TestNamespace::new("ledger-lost").await;
    let home = TestNamespace::new("ledger-op").await;
    let _unblock = Unblock(ns.name.clone());
    let stand_in = StandIn::start().await;
    let proxy = ApiProxy::start().await;
    proxy.inject(Fault {
        matches: secret_write(&ns.name, "bot"),
        effect: Effect::LoseAnswer,
        times: 1,
    });
    let _op = operator_via(&proxy, &ns, &home, "proxied");
    webhook_issuer(&ns, "minter", &stand_in, true).await;
    applied(&ns, &agent_token("minter", "5m"));
    let api: Api<AgentToken> = ns.api();
    let at = wait_at(&api, "the first token recorded", 60, |at| {
        revision(at) == 1 && condition(at, "Ready").is_some_and(|(s, _)| s == "True")
    })
    .await;
    assert_eq!(proxy.fired().len(), 1, "the fault was injected once");
    let value = secret_value(&ns, "bot", "token").await.expect("a token");
    let e = entry(&at, 1).expect("r1");
    assert_eq!(e.state, Some(TokenLife::Live), "{}", ledger(&at));
    assert_eq!(e.fingerprint, fingerprint(value.as_bytes()));
    let issued = stand_in.issued();
    assert_eq!(issued.len(), 1, "one mint: {issued:?}");
    assert!(!issued[0].revoked, "the delivered token was revoked");
    assert!(stand_in.revokes().is_empty(), "{:?}", stand_in.revokes());
}

/// The operator dies (SIGKILL, sent by the proxy) right after the API
/// server applied the token Secret's write and before the status write
/// that records the delivery, for a first token and then for a rotation.
/// The next operator finds the minted token in the Secret: it is `Live`,
/// `status.revision` and `tokenFingerprint` name it (they once stayed at
/// 0, with Ready=True: the chaos test's "no token yet"), the token it
/// replaced is in grace as the Secret's previous one, and nothing is
/// minted again or revoked.
#[tokio::test]
async fn webhook_stand_in_operator_killed_after_the_secret_write_records_the_delivery() {
    let ns = TestNamespace::new("ledger-late").await;
    let home = TestNamespace::new("ledger-op").await;
    let _unblock = Unblock(ns.name.clone());
    let stand_in = StandIn::start().await;
    let proxy = ApiProxy::start().await;
    webhook_issuer(&ns, "minter", &stand_in, true).await;
    let api: Api<AgentToken> = ns.api();

    // Kills the operator started through the proxy right after its next
    // write of the Secret, then starts one that is not.
    async fn crash_after_secret_write(
        proxy: &ApiProxy,
        ns: &TestNamespace,
        home: &TestNamespace,
        name: &str,
        cause: impl std::future::Future<Output = ()>,
    ) -> Operator {
        let mut op = operator_via(proxy, ns, home, name);
        proxy.inject(Fault {
            matches: secret_write(&ns.name, "bot"),
            effect: Effect::KillAfter(op.pid()),
            times: 1,
        });
        cause.await;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !op.exited() {
            assert!(Instant::now() < deadline, "{name} was never killed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Operator::start_with(
            &ns.name,
            &format!("{name}-after"),
            &["--leader-election=false", "--lease-namespace", &home.name],
        )
    }

    let op = crash_after_secret_write(&proxy, &ns, &home, "first", async {
        applied(&ns, &agent_token("minter", "5m"));
    })
    .await;
    let at = wait_at(&api, "the first token recorded", 60, |at| {
        revision(at) == 1 && condition(at, "Ready").is_some_and(|(s, _)| s == "True")
    })
    .await;
    let first = secret_value(&ns, "bot", "token").await.expect("a token");
    let st = at.status.as_ref().unwrap();
    assert_eq!(
        entry(&at, 1).unwrap().state,
        Some(TokenLife::Live),
        "{}",
        ledger(&at)
    );
    assert_eq!(
        st.token_fingerprint.as_deref(),
        Some(fingerprint(first.as_bytes()).as_str()),
        "{}",
        ledger(&at)
    );
    assert!(st.expires_at.is_some());
    drop(op);

    let op = crash_after_secret_write(&proxy, &ns, &home, "second", rotate(&api, "late-1")).await;
    let at = wait_at(&api, "the rotated token recorded", 60, |at| {
        revision(at) == 2 && condition(at, "Ready").is_some_and(|(s, _)| s == "True")
    })
    .await;
    let second = secret_value(&ns, "bot", "token").await.expect("a token");
    let previous = secret_value(&ns, "bot", "token.previous").await;
    assert_eq!(
        previous.as_deref(),
        Some(first.as_str()),
        "the old token stays as previous"
    );
    let (r1, r2) = (entry(&at, 1).unwrap(), entry(&at, 2).unwrap());
    assert_eq!(r2.state, Some(TokenLife::Live), "{}", ledger(&at));
    assert_eq!(r2.fingerprint, fingerprint(second.as_bytes()));
    assert_eq!(r1.state, Some(TokenLife::Grace), "{}", ledger(&at));
    assert!(r1.grace_until.is_some());
    assert_eq!(proxy.fired().len(), 2, "{:?}", proxy.fired());
    let issued = stand_in.issued();
    assert_eq!(issued.len(), 2, "one mint per revision: {issued:?}");
    assert!(issued.iter().all(|i| !i.revoked), "{issued:?}");
    drop(op);
}

/// Case 11: a reconcile never outlasts the leader Lease. The leader is cut
/// off from the API server for its Lease writes only (the fault-injecting
/// proxy refuses its renewals; everything else still goes through) while
/// its first mint waits on a slow issuer (the stand-in answers 12 s after
/// minting; the Lease lasts 10 s). The standby takes over. The old
/// leader's issuer call ends with its term, and from then on it writes
/// nothing through the proxy (no status, no Secret); the Secret and the
/// ledger are the new leader's, and the old leader's token is revoked or
/// accounted `Unknown`. (Without the term checks, the call runs its full
/// 90 s deadline and the old leader writes its token into the Secret and
/// the ledger after the standby has taken over.)
#[tokio::test]
async fn webhook_stand_in_leader_cut_off_from_its_lease_writes_nothing_after_its_term() {
    let ns = TestNamespace::new("ledger-cutoff").await;
    let home = TestNamespace::new("ledger-op").await;
    let _unblock = Unblock(ns.name.clone());
    let stand_in = StandIn::start().await;
    let proxy = ApiProxy::start().await;
    const LEASE: Duration = Duration::from_secs(10);
    let args = [
        "--leader-election=true",
        "--lease-duration=10s",
        "--lease-namespace",
        home.name.as_str(),
        "--lease-name",
        "cutoff",
    ];
    let mut first = Operator::start_as(&ns.name, "first", &args, &proxy.kubeconfig);
    someone_leads(&home, "cutoff").await;
    stand_in.set_fixed_answer_delay(LEASE + Duration::from_secs(2));
    webhook_issuer(&ns, "minter", &stand_in, true).await;
    applied(&ns, &agent_token("minter", "0s"));
    eventually(
        Duration::from_secs(30),
        "the stand-in minted for the first replica",
        || async { (!stand_in.issued().is_empty()).then_some(()) },
    )
    .await;
    stand_in.set_answer_delay(Duration::ZERO);
    let first_token = stand_in.issued()[0].id.clone();
    proxy.inject(Fault {
        matches: lease_write(&home.name, "cutoff"),
        effect: Effect::Refuse,
        times: usize::MAX,
    });
    let mut second = Operator::start_with(&ns.name, "second", &args);
    let api: Api<AgentToken> = ns.api();
    let at = wait_at(&api, "the standby delivered a token", 90, |at| {
        at.status.as_ref().is_some_and(|s| {
            s.history
                .iter()
                .any(|e| e.revision >= 2 && e.state == Some(TokenLife::Live))
        })
    })
    .await;
    let stopped_by = Instant::now() + Duration::from_secs(60);
    while !first.exited() {
        assert!(
            Instant::now() < stopped_by,
            "the cut-off replica did not stop"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Its term ended at most a Lease duration after its last renewal that
    // went through; no write of its may have reached the proxy after that
    // (Events aside: they say what it did, and change nothing).
    let seen = proxy.seen();
    let last_renewal = seen
        .iter()
        .filter(|s| s.is_write() && s.path.contains("/leases") && s.status < 300)
        .map(|s| s.at)
        .max()
        .expect("the first replica renewed its Lease");
    let late: Vec<String> = seen
        .iter()
        .filter(|s| {
            s.at > last_renewal + LEASE
                && s.is_write()
                && !s.path.contains("/leases")
                && !s.path.starts_with("/apis/events.k8s.io/")
        })
        .map(|s| {
            format!(
                "{} {} -> {}, {:.1}s after the term",
                s.method,
                s.path,
                s.status,
                (s.at - last_renewal - LEASE).as_secs_f64()
            )
        })
        .collect();
    let at = api.get("bot").await.unwrap_or(at);
    assert!(
        late.is_empty(),
        "the replica that lost the Lease still wrote: {late:#?}; ledger: {}",
        ledger(&at)
    );
    let live = ledger_current(&at).expect("a Live entry");
    let held = secret_value(&ns, "bot", "token").await.expect("a token");
    assert_eq!(
        fingerprint(held.as_bytes()),
        live.fingerprint,
        "the Secret holds the new leader's token: {}",
        ledger(&at)
    );
    let r1 = entry(&at, 1).and_then(|e| e.state);
    assert!(
        stand_in.active(&first_token) == Some(false)
            || matches!(r1, Some(TokenLife::Unknown | TokenLife::Expired)),
        "the cut-off replica's token is neither revoked nor accounted Unknown: {}",
        ledger(&at)
    );
    assert_ne!(r1, Some(TokenLife::Live), "{}", ledger(&at));
    second.stop();
}

/// Waits until Lease `name` in `home` has a holder.
async fn someone_leads(home: &TestNamespace, name: &str) {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = home.api();
    eventually(
        Duration::from_secs(30),
        "the first replica leads",
        || async {
            leases
                .get_opt(name)
                .await
                .ok()??
                .spec?
                .holder_identity
                .filter(|h| !h.is_empty())
        },
    )
    .await;
}

/// The ledger's `Live` entry with the highest revision.
fn ledger_current(at: &AgentToken) -> Option<&HistoryEntry> {
    at.status
        .as_ref()?
        .history
        .iter()
        .filter(|e| e.state == Some(TokenLife::Live))
        .max_by_key(|e| e.revision)
}

/// An admin abandons a revocation (`kubectl agenttoken abandon`) while the
/// operator's retry of it is in flight (the stand-in holds each revoke
/// request 6 s, then answers 503). The operator's write of that attempt's
/// outcome must not undo the abandon: the entry stays `Abandoned`, with
/// who, and is not tried again. (Before, the operator force-applied the
/// ledger it had read before the abandon, putting the entry back to
/// `Failed` with a retry, and the plugin's read-back 0.5 s later could not
/// see that coming.)
#[tokio::test]
async fn webhook_stand_in_abandon_during_a_revocation_attempt_sticks() {
    let ns = TestNamespace::new("ledger-abandon").await;
    let (_home, _unblock, _op) = operator(&ns, "solo").await;
    let stand_in = StandIn::start().await;
    webhook_issuer(&ns, "minter", &stand_in, true).await;
    applied(&ns, &agent_token("minter", "0s"));
    let api: Api<AgentToken> = ns.api();
    wait_at(&api, "the first token", 60, |at| revision(at) == 1).await;
    stand_in.set_revoke_mode(RevokeMode::Unavailable);
    rotate(&api, "abandon-1").await;
    wait_at(&api, "revision 1 failing", 60, |at| {
        entry(at, 1).is_some_and(|e| e.state == Some(TokenLife::Failed))
    })
    .await;
    // The next attempt is held at the stand-in while the admin abandons.
    stand_in.set_revoke_delay(Duration::from_secs(6));
    let arrived = stand_in.revokes_arrived();
    eventually(Duration::from_secs(90), "a retry in flight", || async {
        (stand_in.revokes_arrived() > arrived).then_some(())
    })
    .await;
    let answered = stand_in.revokes().len();
    let out = crate::plugin::plugin(
        &ns,
        &[
            "abandon",
            "bot",
            "--revision",
            "1",
            "--reason",
            "drill: the issuer is being retired",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "abandon: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The attempt ends (the HTTP client retries a 503 a few times): once
    // the held request is answered the rest go through at once; then wait
    // until no request has arrived or been answered for 5 s.
    let traffic = || (stand_in.revokes_arrived(), stand_in.revokes().len());
    let mut last = (traffic(), Instant::now());
    let mut released = false;
    while last.1.elapsed() < Duration::from_secs(5) || last.0.1 <= answered {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = traffic();
        if !released && now.1 > answered {
            stand_in.set_revoke_delay(Duration::ZERO);
            released = true;
        }
        if now != last.0 {
            last = (now, Instant::now());
        }
    }
    let at = api.get("bot").await.unwrap();
    let e = entry(&at, 1).expect("revision 1");
    assert_eq!(e.state, Some(TokenLife::Abandoned), "{}", ledger(&at));
    assert!(
        e.next_attempt_at.is_none(),
        "a retry is still planned: {}",
        ledger(&at)
    );
    assert!(
        e.abandoned_by.as_deref().is_some_and(|by| !by.is_empty()),
        "{}",
        ledger(&at)
    );
    // Had the abandon been lost, the next attempt would be due within
    // the backoff (about 10 s here).
    let settled = stand_in.revokes_arrived();
    tokio::time::sleep(Duration::from_secs(15)).await;
    let at = api.get("bot").await.unwrap();
    assert_eq!(
        entry(&at, 1).and_then(|e| e.state),
        Some(TokenLife::Abandoned),
        "{}",
        ledger(&at)
    );
    assert_eq!(
        stand_in.revokes_arrived(),
        settled,
        "an abandoned revocation was tried again: {}",
        ledger(&at)
    );
}

/// Intent before effect when the issuer's answer never comes: the stand-in
/// mints, then answers after the issuer's `timeout` (3 s against 1 s). The
/// mint may have happened, so the ledger keeps the revision as `Unknown`
/// (a webhook offers no way to find a token) and the request is not sent
/// again blind. (Before, the timed-out request was retried, each retry
/// minting one more token, and the revision's entry was dropped as "nothing
/// minted": tokens alive at the issuer that the ledger never named.)
#[tokio::test]
async fn webhook_stand_in_mint_answered_too_late_stays_in_the_ledger_and_is_not_resent() {
    let ns = TestNamespace::new("ledger-late-answer").await;
    let (_home, _unblock, _op) = operator(&ns, "solo").await;
    let stand_in = StandIn::start().await;
    stand_in.set_fixed_answer_delay(Duration::from_secs(3));
    authorization_secret(&ns, "minter-auth", &stand_in).await;
    let mut issuer = webhook_issuer_json("minter", &stand_in, true);
    issuer["spec"]["webhook"]["timeout"] = json!("1s");
    applied(&ns, &issuer.to_string());
    applied(&ns, &agent_token("minter", "0s"));
    let api: Api<AgentToken> = ns.api();
    let at = wait_at(&api, "revision 1 recorded Unknown", 60, |at| {
        entry(at, 1).is_some_and(|e| e.state == Some(TokenLife::Unknown))
    })
    .await;
    let r1 = entry(&at, 1).unwrap();
    assert!(
        r1.message
            .as_deref()
            .is_some_and(|m| m.contains("no answer arrived during this mint")),
        "{}",
        ledger(&at)
    );
    assert!(r1.expires_at.is_some(), "the latest it can be valid");
    // Give a retry time to happen, had there been one.
    tokio::time::sleep(Duration::from_secs(4)).await;
    // (Later attempts mint under new revisions: each is its own entry.)
    let r1_minted: Vec<_> = stand_in
        .issued()
        .into_iter()
        .filter(|i| i.revision == Some(1))
        .collect();
    assert_eq!(
        r1_minted.len(),
        1,
        "one request for revision 1, not resent after it may have arrived: {r1_minted:?}"
    );
    stand_in.set_answer_delay(Duration::ZERO);
    let at = wait_at(
        &api,
        "a token delivered once the issuer answers",
        90,
        |at| ledger_current(at).is_some(),
    )
    .await;
    assert_eq!(
        entry(&at, 1).and_then(|e| e.state),
        Some(TokenLife::Unknown),
        "{}",
        ledger(&at)
    );
}

/// The record of a minted token cannot be written (the fault-injecting
/// proxy answers 409 to every write of what the issuer answered, as a
/// tenant patching annotations in a loop could provoke): the token was
/// minted and its value is at hand, so it is revoked at once and never
/// delivered. (Before, the reconcile gave up with the token alive at the
/// issuer and the ledger holding only an intent: `Unknown`, and a tenant
/// could repeat that on every mint.)
#[tokio::test]
async fn webhook_stand_in_minted_token_whose_record_cannot_be_written_is_revoked() {
    let ns = TestNamespace::new("ledger-unrecorded").await;
    let home = TestNamespace::new("ledger-op").await;
    let _unblock = Unblock(ns.name.clone());
    let stand_in = StandIn::start().await;
    let proxy = ApiProxy::start().await;
    proxy.inject(Fault {
        matches: crate::apiproxy::status_write_with(
            &ns.name,
            "bot",
            "minted; not yet in the Secret",
        ),
        effect: Effect::Conflict,
        times: 40,
    });
    let _op = operator_via(&proxy, &ns, &home, "proxied");
    webhook_issuer(&ns, "minter", &stand_in, true).await;
    applied(&ns, &agent_token("minter", "0s"));
    eventually(Duration::from_secs(60), "the first mint", || async {
        (!stand_in.issued().is_empty()).then_some(())
    })
    .await;
    let first = stand_in.issued()[0].id.clone();
    eventually(
        Duration::from_secs(60),
        "the unrecorded token revoked",
        || async { (stand_in.active(&first) == Some(false)).then_some(()) },
    )
    .await;
    assert!(
        secret_value(&ns, "bot", "token")
            .await
            .is_none_or(|v| { stand_in.id_of(&v).as_deref() != Some(first.as_str()) }),
        "the unrecorded token was delivered"
    );
}

/// Intent before effect for a token revoked by value (a webhook without
/// ids): the operator is killed (by the fault-injecting proxy) instead of
/// writing what the issuer answered, after the token went into its keeper.
/// The next operator finds it there (the keeper carries the AgentToken's
/// keeper intent) and revokes it by value: the ledger says `Revoked` and
/// the stand-in agrees. (Before, it was `Unknown`, and the keeper's copy
/// was even dropped as no longer needed.)
#[tokio::test]
async fn webhook_stand_in_token_kept_before_a_crash_is_found_and_revoked() {
    let ns = TestNamespace::new("ledger-kept").await;
    let home = TestNamespace::new("ledger-op").await;
    let _unblock = Unblock(ns.name.clone());
    let stand_in = StandIn::start().await;
    let proxy = ApiProxy::start().await;
    let mut first = operator_via(&proxy, &ns, &home, "first");
    proxy.inject(Fault {
        matches: crate::apiproxy::status_write_with(
            &ns.name,
            "bot",
            "minted; not yet in the Secret",
        ),
        effect: Effect::KillInstead(first.pid()),
        times: 1,
    });
    webhook_issuer(&ns, "minter", &stand_in, false).await;
    applied(&ns, &agent_token("minter", "0s"));
    eventually(Duration::from_secs(60), "the first operator killed", || {
        let exited = first.exited();
        async move { exited.then_some(()) }
    })
    .await;
    let minted = stand_in.issued();
    assert_eq!(minted.len(), 1, "{minted:?}");
    let _second = Operator::start_with(
        &ns.name,
        "second",
        &["--leader-election=false", "--lease-namespace", &home.name],
    );
    let api: Api<AgentToken> = ns.api();
    let at = wait_at(&api, "revision 1 revoked, revision 2 delivered", 60, |at| {
        entry(at, 1).is_some_and(|e| e.state == Some(TokenLife::Revoked))
            && ledger_current(at).is_some()
    })
    .await;
    assert_eq!(
        stand_in.active(&minted[0].id),
        Some(false),
        "the stand-in still honours it: {}",
        ledger(&at)
    );
    assert_eq!(entry(&at, 1).unwrap().fingerprint, minted[0].fingerprint);
}

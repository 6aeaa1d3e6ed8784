//! Hostile tenants, on the real local control plane with the ServiceAccount
//! issuer. Namespace admins are not trusted: each test acts as the tenant
//! through the restricted user (`agenttoken-restricted`), bound by a Role
//! that grants AgentTokens, Secrets, ServiceAccounts, ConfigMaps and apps
//! workloads in its namespace, but no pods/exec and no (Cluster)TokenIssuers.
//! The platform (cluster-admin) creates the issuers.

use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use agent_token_operator::crd::{AgentToken, TokenIssuer};

use crate::support::{self, Operator, SA_ISSUER, TestNamespace, applied, cluster, eventually};

/// The user of `cluster().restricted_kubeconfig`.
const TENANT_USER: &str = "agenttoken-restricted";

/// What a namespace admin typically gets: everything an application team
/// needs, nothing that mints (issuers) or runs code in Pods (pods/exec).
/// `agenttokens` does not cover `agenttokens/status`.
fn tenant_rbac() -> String {
    format!(
        r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: tenant-admin}}
rules:
- apiGroups: [agenttoken.dev]
  resources: [agenttokens]
  verbs: ["*"]
- apiGroups: [""]
  resources: [secrets, serviceaccounts, configmaps]
  verbs: ["*"]
- apiGroups: [apps]
  resources: [deployments, statefulsets, daemonsets]
  verbs: ["*"]
- apiGroups: [batch]
  resources: [jobs, cronjobs]
  verbs: ["*"]
- apiGroups: [""]
  resources: [pods]
  verbs: ["*"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: tenant-admin}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: tenant-admin}}
subjects:
- {{apiGroup: rbac.authorization.k8s.io, kind: User, name: {TENANT_USER}}}
"#
    )
}

/// Binds the tenant Role in `ns` (as admin) and returns a client acting as
/// the tenant, once RBAC lets it in. Also checks the tenant cannot touch
/// issuers, so every test really runs with the rights described above.
pub(crate) async fn tenant(ns: &TestNamespace) -> Client {
    applied(ns, &tenant_rbac());
    let client = support::client_for(&cluster().restricted_kubeconfig).await;
    let ats: Api<AgentToken> = Api::namespaced(client.clone(), &ns.name);
    eventually(
        Duration::from_secs(30),
        "the tenant's RoleBinding takes effect",
        || async { ats.list(&ListParams::default()).await.ok().map(|_| ()) },
    )
    .await;
    let issuers: Api<TokenIssuer> = Api::namespaced(client.clone(), &ns.name);
    match issuers.list(&ListParams::default()).await {
        Err(kube::Error::Api(s)) if s.code == 403 => {}
        other => panic!(
            "the tenant must not read TokenIssuers: {:?}",
            other.map(|_| ())
        ),
    }
    client
}

/// `kubectl apply -f -` as the tenant in `ns`.
pub(crate) fn apply_as_tenant(ns: &str, yaml: &str) -> Output {
    support::apply_as(&cluster().restricted_kubeconfig, ns, yaml)
}

/// An AgentToken for the ServiceAccount issuer `sa`: `spec` is merged over
/// `{issuerRef: sa, serviceAccountName: builder, lifetime: 10m}` (a `null`
/// removes a default). JSON, which kubectl applies like YAML.
fn agent_token(name: &str, spec: Value) -> String {
    let mut base = json!({
        "issuerRef": {"name": "sa"},
        "serviceAccountName": "builder",
        "lifetime": "10m",
    });
    for (k, v) in spec.as_object().expect("spec is an object") {
        if v.is_null() {
            base.as_object_mut().unwrap().remove(k);
        } else {
            base[k] = v.clone();
        }
    }
    json!({
        "apiVersion": "agenttoken.dev/v1alpha1",
        "kind": "AgentToken",
        "metadata": {"name": name},
        "spec": base,
    })
    .to_string()
}

fn condition(at: &AgentToken, type_: &str) -> Option<(String, String)> {
    at.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

fn ready(at: &AgentToken) -> bool {
    condition(at, "Ready").is_some_and(|c| c.0 == "True")
}

fn throttled(at: &AgentToken) -> bool {
    condition(at, "Issuing").is_some_and(|c| c.0 == "True" && c.1 == "Throttled")
}

fn revision(at: &AgentToken) -> i64 {
    at.status.as_ref().map_or(0, |s| s.revision)
}

/// What a failure message may show of an AgentToken (status never holds a token).
fn describe(at: &AgentToken) -> String {
    let st = at.status.clone().unwrap_or_default();
    let history: Vec<i64> = st.history.iter().map(|h| h.revision).collect();
    format!(
        "revision {} history {history:?} reason {:?} conditions {:?}",
        st.revision,
        st.last_rotation_reason,
        st.conditions
            .iter()
            .map(|c| format!("{}={} {}: {}", c.type_, c.status, c.reason, c.message))
            .collect::<Vec<_>>()
    )
}

async fn wait_for<F>(
    api: &Api<AgentToken>,
    name: &str,
    what: &str,
    secs: u64,
    check: F,
) -> AgentToken
where
    F: Fn(&AgentToken) -> bool,
{
    eventually(
        Duration::from_secs(secs),
        &format!("{name}: {what}"),
        || async {
            let at = api.get(name).await.ok()?;
            check(&at).then_some(at)
        },
    )
    .await
}

#[tokio::test]
async fn tenant_hostile_specs_are_refused_at_admission() {
    let started = Instant::now();
    let ns = TestNamespace::new("hostile-admit").await;
    support::install_crds();
    let _tenant = tenant(&ns).await;

    let many_keys: serde_json::Map<String, Value> = (0..17)
        .map(|i| (format!("k{i}"), json!("{{ token }}")))
        .collect();
    let many_scopes: Vec<String> = (0..65).map(|i| format!("s{i}")).collect();
    let long = |n: usize| "a".repeat(n);
    let cases: Vec<(&str, Value, &[&str])> = vec![
        // Durations out of range: a lifetime that overflows, none, too short, too long.
        (
            "life-huge",
            json!({"lifetime": "99999999999999999999h"}),
            &["spec.lifetime", "between 5m and 8760h"],
        ),
        (
            "life-zero",
            json!({"lifetime": "0s"}),
            &["spec.lifetime", "between 5m and 8760h"],
        ),
        (
            "life-30s",
            json!({"lifetime": "30s"}),
            &["spec.lifetime", "between 5m and 8760h"],
        ),
        (
            "life-year",
            json!({"lifetime": "8761h"}),
            &["spec.lifetime", "between 5m and 8760h"],
        ),
        (
            "grace-year",
            json!({"lifetime": null, "previousTokenGracePeriod": "8761h"}),
            &["previousTokenGracePeriod", "at most 8760h"],
        ),
        (
            "renew-ms",
            json!({"rotation": {"renewBefore": "500ms"}}),
            &["renewBefore", "between 1s and 8760h"],
        ),
        (
            "renew-year",
            json!({"lifetime": null, "rotation": {"renewBefore": "8761h"}}),
            &["renewBefore", "between 1s and 8760h"],
        ),
        // Keys the operator writes, or that are not Secret keys.
        (
            "xk-token",
            json!({"secret": {"extraKeys": {"token": "x"}}}),
            &["cannot redefine the token key"],
        ),
        (
            "xk-previous",
            json!({"secret": {"extraKeys": {"token.previous": "x"}}}),
            &["cannot redefine the token key"],
        ),
        (
            "xk-expires",
            json!({"secret": {"extraKeys": {"expiresAt": "x"}}}),
            &["cannot redefine the token key"],
        ),
        (
            "xk-own-key",
            json!({"secret": {"key": "api", "extraKeys": {"api": "x"}}}),
            &["cannot redefine the token key"],
        ),
        (
            "xk-own-prev",
            json!({"secret": {"key": "api", "extraKeys": {"api.previous": "x"}}}),
            &["cannot redefine the token key"],
        ),
        (
            "key-expires",
            json!({"secret": {"key": "expiresAt"}}),
            &["secret.key", "operator writes those keys"],
        ),
        (
            "xk-slash",
            json!({"secret": {"extraKeys": {"../etc/passwd": "x"}}}),
            &["extraKeys", "valid Secret keys"],
        ),
        (
            "xk-many",
            json!({"secret": {"extraKeys": many_keys}}),
            &["extraKeys", "at most 16"],
        ),
        // Metadata the operator relies on.
        (
            "lbl-name",
            json!({"secret": {"labels": {"agenttoken.dev/name": "victim"}}}),
            &["secret.labels", "operator writes those"],
        ),
        (
            "lbl-managed",
            json!({"secret": {"labels": {"app.kubernetes.io/managed-by": "agent-token-operator"}}}),
            &["secret.labels", "operator writes those"],
        ),
        (
            "ann-state",
            json!({"secret": {"annotations": {"agenttoken.dev/token-state": "{}"}}}),
            &["secret.annotations", "operator writes those"],
        ),
        (
            "ann-managed",
            json!({"secret": {"annotations": {"app.kubernetes.io/managed-by": "x"}}}),
            &["secret.annotations", "operator writes those"],
        ),
        (
            "lbl-value",
            json!({"secret": {"labels": {"team.example/owner": "not a label value!"}}}),
            &["valid label values"],
        ),
        (
            "lbl-value-long",
            json!({"secret": {"labels": {"team.example/owner": long(64)}}}),
            &["valid label values"],
        ),
        // Scopes and permissions that smuggle in more than one.
        (
            "scope-space",
            json!({"scopes": ["read:x admin"]}),
            &["spec.scopes", "one scope-token"],
        ),
        (
            "scope-quote",
            json!({"scopes": ["read\"x"]}),
            &["spec.scopes", "one scope-token"],
        ),
        (
            "scope-many",
            json!({"scopes": many_scopes}),
            &["spec.scopes", "at most 64"],
        ),
        (
            "perm-owner",
            json!({"permissions": {"contents": "owner"}}),
            &["read, write or admin"],
        ),
        // Over-long strings.
        (
            "long-sa",
            json!({"serviceAccountName": long(254)}),
            &["serviceAccountName", "may not be more than 253"],
        ),
        (
            "long-issuer",
            json!({"issuerRef": {"name": long(254)}}),
            &["issuerRef.name", "may not be more than 253"],
        ),
        (
            "long-ann",
            json!({"secret": {"annotations": {"team.example/note": long(4097)}}}),
            &["secret.annotations", "may not be more than 4096"],
        ),
        (
            "long-scope",
            json!({"scopes": [long(257)]}),
            &["spec.scopes", "may not be more than 256"],
        ),
    ];

    let admin: Api<AgentToken> = ns.api();
    let mut failures = Vec::new();
    for (name, spec, expect) in &cases {
        let out = apply_as_tenant(&ns.name, &agent_token(name, spec.clone()));
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            failures.push(format!("{name}: ADMITTED ({spec})"));
        } else if stderr.contains("forbidden") {
            failures.push(format!("{name}: refused by RBAC, not admission: {stderr}"));
        } else if let Some(missing) = expect.iter().find(|w| !stderr.contains(**w)) {
            failures.push(format!(
                "{name}: refused without {missing:?}: {}",
                stderr.trim()
            ));
        } else {
            eprintln!("{name}: refused: {}", stderr.trim());
        }
        if admin.get_opt(name).await.expect("get AgentToken").is_some() {
            failures.push(format!("{name}: exists after apply"));
        }
    }
    assert!(
        failures.is_empty(),
        "hostile specs:\n{}",
        failures.join("\n")
    );

    // The tenant may still create a sane AgentToken: the refusals are about the
    // specs, not the user.
    let out = apply_as_tenant(&ns.name, &agent_token("sane", json!({})));
    assert!(
        out.status.success(),
        "a valid AgentToken is admitted: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("took {:?}", started.elapsed());
}

#[tokio::test]
async fn tenant_attack_leaves_the_operator_and_other_namespaces_unharmed() {
    let started = Instant::now();
    let victim = TestNamespace::new("hostile-victim").await;
    let ns = TestNamespace::new("hostile-tenant").await;
    let watched = format!("{},{}", victim.name, ns.name);
    let mut op = Operator::start_with(
        &victim.name,
        "attack",
        &[
            "--namespace",
            &watched,
            "--lease-namespace",
            &victim.name,
            "--leader-election=false",
        ],
    );
    // The platform: an issuer in each namespace; the victim's token rotates
    // about every 40 s (renew 9m20s before a 10m expiry, minus jitter).
    applied(&victim, SA_ISSUER);
    applied(&ns, SA_ISSUER);
    applied(
        &victim,
        &agent_token("payroll", json!({"rotation": {"renewBefore": "9m20s"}})),
    );

    // The tenant: one AgentToken per attack, so each result says which
    // defence held.
    let tenant = tenant(&ns).await;
    for (name, spec) in [
        ("spinner", json!({})),
        ("dropper", json!({})),
        // renewBefore longer than any lifetime the issuer grants (1h default).
        (
            "lazy",
            json!({"lifetime": null, "rotation": {"renewBefore": "24h"}}),
        ),
        ("forged", json!({})),
    ] {
        let out = apply_as_tenant(&ns.name, &agent_token(name, spec));
        assert!(
            out.status.success(),
            "tenant applies {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let victim_api: Api<AgentToken> = victim.api();
    let api: Api<AgentToken> = Api::namespaced(tenant.clone(), &ns.name);
    wait_for(&victim_api, "payroll", "Ready", 60, ready).await;
    let mut forged_uid = String::new();
    for name in ["spinner", "dropper", "lazy", "forged"] {
        let at = wait_for(&api, name, "Ready", 60, ready).await;
        assert_eq!(revision(&at), 1, "{name}: {}", describe(&at));
        if name == "forged" {
            forged_uid = at.uid().unwrap();
        }
    }

    // The victim as the attack starts: its revision and when it is due.
    let before = victim_api.get("payroll").await.unwrap();
    let victim_rev0 = revision(&before);
    let victim_due = before
        .status
        .as_ref()
        .and_then(|s| s.next_rotation_at.clone())
        .expect("the victim's nextRotationAt")
        .0;
    eprintln!(
        "setup took {:?}; victim at revision {victim_rev0}, due {victim_due}",
        started.elapsed(),
    );

    // Binding Secrets forged for `forged`, claiming the highest revision
    // there is: one with the owner reference a tenant can write (the UID is
    // readable), one without.
    let secrets: Api<Secret> = Api::namespaced(tenant.clone(), &ns.name);
    let forge = |name: &str, owned: bool| -> Secret {
        let mut meta = json!({
            "name": name,
            "labels": {
                "app.kubernetes.io/managed-by": "agent-token-operator",
                "agenttoken.dev/name": "forged",
                "agenttoken.dev/role": "token-binding",
                "agenttoken.dev/revision": "9223372036854775807",
            },
        });
        if owned {
            meta["ownerReferences"] = json!([{
                "apiVersion": "agenttoken.dev/v1alpha1",
                "kind": "AgentToken",
                "name": "forged",
                "uid": forged_uid,
            }]);
        }
        serde_json::from_value(json!({
            "metadata": meta,
            "type": "agenttoken.dev/token-binding",
        }))
        .unwrap()
    };
    for (name, owned) in [
        ("forged-binding-owned", true),
        ("forged-binding-loose", false),
    ] {
        secrets
            .create(&PostParams::default(), &forge(name, owned))
            .await
            .expect("the tenant creates a forged binding Secret");
    }

    // The attack, for ATTACK: a new rotate trigger every 0.5 s on spinner,
    // the token Secret of dropper deleted every 0.5 s, and one rotation of
    // `forged` (which must be numbered 2).
    const ATTACK: Duration = Duration::from_secs(45);
    let deadline = tokio::time::Instant::now() + ATTACK;
    let patches = Arc::new(AtomicU32::new(0));
    let deletes = Arc::new(AtomicU32::new(0));
    let rotate_loop = {
        let api = api.clone();
        let patches = patches.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            let mut i = 0u32;
            while tokio::time::Instant::now() < deadline {
                tick.tick().await;
                i += 1;
                let patch = json!({"metadata": {"annotations": {"agenttoken.dev/rotate": format!("spin-{i}")}}});
                if api
                    .patch("spinner", &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .is_ok()
                {
                    patches.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let delete_loop = {
        let secrets = secrets.clone();
        let deletes = deletes.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            while tokio::time::Instant::now() < deadline {
                tick.tick().await;
                if secrets
                    .delete("dropper", &DeleteParams::default())
                    .await
                    .is_ok()
                {
                    deletes.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let once = json!({"metadata": {"annotations": {"agenttoken.dev/rotate": "once"}}});
    api.patch("forged", &PatchParams::default(), &Patch::Merge(&once))
        .await
        .expect("the tenant rotates `forged` once");

    // Watch from the outside meanwhile: Throttled seen, the process alive.
    let names = ["spinner", "dropper", "lazy", "forged"];
    let mut max_seen = [0i64; 4];
    let mut throttled_seen = [false; 4];
    while tokio::time::Instant::now() < deadline {
        for (i, name) in names.iter().enumerate() {
            if let Ok(at) = api.get(name).await {
                max_seen[i] = max_seen[i].max(revision(&at));
                throttled_seen[i] |= throttled(&at);
            }
        }
        assert!(!op.exited(), "the operator exited during the attack");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    rotate_loop.await.unwrap();
    delete_loop.await.unwrap();
    let attack_end = Timestamp::now();
    eprintln!(
        "attack over after {:?}: {} rotate patches, {} Secret deletions, max revisions {names:?} {max_seen:?}, Throttled seen {throttled_seen:?}",
        started.elapsed(),
        patches.load(Ordering::Relaxed),
        deletes.load(Ordering::Relaxed),
    );
    assert!(patches.load(Ordering::Relaxed) >= 40, "the rotate loop ran");
    assert!(deletes.load(Ordering::Relaxed) >= 3, "the delete loop ran");

    // Every check is collected, so one run shows every defence that failed.
    let mut problems: Vec<String> = Vec::new();
    let mut check = |ok: bool, what: String| {
        if !ok {
            problems.push(what);
        }
    };

    // The process survived.
    tokio::time::sleep(Duration::from_secs(1)).await;
    check(!op.exited(), "the operator exited".into());
    check(
        !op.logs().contains("panicked"),
        "the operator log has a panic".into(),
    );

    // The victim rotated on schedule during the window and is Ready.
    let after = victim_api.get("payroll").await.unwrap();
    eprintln!("payroll: {}", describe(&after));
    check(
        revision(&after) > victim_rev0 && ready(&after),
        format!(
            "victim: no rotation during the attack or not Ready (was {victim_rev0}): {}",
            describe(&after)
        ),
    );
    let next = after.status.as_ref().and_then(|s| {
        s.history
            .iter()
            .find(|h| h.revision == victim_rev0 + 1)
            .and_then(|h| h.issued_at.clone())
    });
    if let Some(next) = next {
        let late = next.0.duration_since(victim_due).as_secs_f64();
        eprintln!("victim: due {victim_due}, rotated {} ({late:+.1}s)", next.0);
        check(
            (-1.0..=10.0).contains(&late),
            format!("victim: rotation {late:+.1}s off schedule during the attack"),
        );
    }

    // Mint floor: 10 s between mints, doubling after 3 mints in the last hour.
    // From a first mint at T0 the earliest mints are r2 T0+10, r3 T0+20,
    // r4 T0+30, r5 T0+50, r6 T0+90, r7 T0+170. The attack (45 s, starting
    // a few seconds after T0) is over well before T0+90, so the floor allows
    // at most 5; 7 leaves room for a slow machine. Without the floor the
    // loops would reach ~80 (a mint per 0.5 s). At least 2: each attack
    // really asks for mints (else the bound proves nothing).
    const BOUND: i64 = 7;
    let now: Vec<AgentToken> = {
        let mut v = Vec::new();
        for name in names {
            v.push(api.get(name).await.unwrap());
        }
        v
    };
    for at in &now {
        eprintln!("{}: {}", at.name_any(), describe(at));
    }
    let [spinner, dropper, lazy, forged] = [&now[0], &now[1], &now[2], &now[3]];
    for (i, at) in [(0, spinner), (1, dropper)] {
        check(
            (2..=BOUND).contains(&max_seen[i]) && (2..=BOUND).contains(&revision(at)),
            format!(
                "{}: expected 2..={BOUND} mints under attack, saw up to {}: {}",
                names[i],
                max_seen[i],
                describe(at)
            ),
        );
        check(
            throttled_seen[i],
            format!("{}: never showed Issuing=True reason Throttled", names[i]),
        );
    }

    // renewBefore 24h without lifetime: one token, the default renewal.
    check(
        max_seen[2] == 1 && revision(lazy) == 1 && ready(lazy),
        format!("lazy: not one token and Ready: {}", describe(lazy)),
    );
    let lazy_due = lazy
        .status
        .as_ref()
        .and_then(|s| s.next_rotation_at.clone());
    check(
        lazy_due
            .as_ref()
            .is_some_and(|d| d.0.duration_since(attack_end).as_secs() > 15 * 60),
        format!(
            "lazy: not on the default renewal (a third of 1h left, minus jitter): due {lazy_due:?}"
        ),
    );

    // The forged binding is not believed: the one rotation is revision 2,
    // and only revisions it minted are in its history.
    let forged_history: Vec<i64> = forged
        .status
        .as_ref()
        .map(|s| s.history.iter().map(|h| h.revision).collect())
        .unwrap_or_default();
    check(
        revision(forged) == 2 && ready(forged),
        format!(
            "forged: its one rotation is not revision 2 and Ready: {}",
            describe(forged)
        ),
    );
    check(
        forged_history.iter().all(|r| (1..=2).contains(r)),
        format!("forged: history has revisions it never minted: {forged_history:?}"),
    );
    for at in [spinner, dropper] {
        let st = at.status.clone().unwrap_or_default();
        check(
            st.history
                .iter()
                .all(|h| (1..=st.revision).contains(&h.revision)),
            format!("{}: history beyond status: {}", at.name_any(), describe(at)),
        );
    }

    eprintln!("took {:?}", started.elapsed());
    assert!(
        problems.is_empty(),
        "the attack did harm:\n{}",
        problems.join("\n")
    );
}

#[tokio::test]
async fn tenant_cannot_retrigger_a_rotation_by_editing_the_secret_record() {
    let started = Instant::now();
    let ns = TestNamespace::new("hostile-record").await;
    let _op = Operator::start(&ns.name);
    applied(&ns, SA_ISSUER);
    let tenant = tenant(&ns).await;
    let out = apply_as_tenant(&ns.name, &agent_token("bot", json!({})));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let api: Api<AgentToken> = Api::namespaced(tenant.clone(), &ns.name);
    let secrets: Api<Secret> = Api::namespaced(tenant.clone(), &ns.name);
    wait_for(&api, "bot", "Ready", 60, ready).await;

    let rotate = |value: &'static str| {
        let api = api.clone();
        async move {
            let patch = json!({"metadata": {"annotations": {"agenttoken.dev/rotate": value}}});
            api.patch("bot", &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .expect("the tenant sets the rotate annotation");
        }
    };
    rotate("1").await;
    // The mint floor holds the second mint until 10 s after the first.
    let at = wait_for(&api, "bot", "revision 2", 60, |at| {
        revision(at) == 2 && ready(at)
    })
    .await;
    let handled = at
        .status
        .as_ref()
        .and_then(|s| s.handled_triggers.as_ref())
        .and_then(|h| h.rotate.clone());
    assert_eq!(
        handled.as_deref(),
        Some("1"),
        "status.handledTriggers.rotate"
    );

    // Status is the operator's: the tenant cannot forget the handled value.
    let forget = json!({"status": {"handledTriggers": {"rotate": "forgotten"}}});
    match api
        .patch_status("bot", &PatchParams::default(), &Patch::Merge(&forget))
        .await
    {
        Err(kube::Error::Api(s)) if s.code == 403 => {}
        other => panic!("the tenant wrote status: {:?}", other.map(|_| ())),
    }

    // Edit the Secret's record: drop rotateHandled, then claim another value.
    let edit = |rotate_handled: Option<&'static str>| {
        let secrets = secrets.clone();
        async move {
            let s = secrets.get("bot").await.expect("the token Secret");
            let raw = s
                .annotations()
                .get("agenttoken.dev/token-state")
                .cloned()
                .expect("the token-state annotation");
            let mut state: Value = serde_json::from_str(&raw).expect("token-state is JSON");
            let obj = state.as_object_mut().unwrap();
            match rotate_handled {
                None => obj.remove("rotateHandled"),
                Some(v) => obj.insert("rotateHandled".into(), json!(v)),
            };
            let patch = json!({"metadata": {"annotations": {"agenttoken.dev/token-state": state.to_string()}}});
            secrets
                .patch("bot", &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .expect("the tenant edits the Secret's annotation");
        }
    };
    let watch = |secs: u64| {
        let api = api.clone();
        async move {
            let until = tokio::time::Instant::now() + Duration::from_secs(secs);
            while tokio::time::Instant::now() < until {
                let at = api.get("bot").await.expect("get bot");
                assert!(
                    revision(&at) == 2 && !throttled(&at),
                    "a rotation was re-triggered by the Secret's record: {}",
                    describe(&at)
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    edit(None).await;
    // Past the 10 s floor after revision 2, so a re-trigger would have minted.
    watch(12).await;
    edit(Some("0")).await;
    watch(6).await;
    let at = api.get("bot").await.unwrap();
    assert_eq!(revision(&at), 2, "{}", describe(&at));

    // Control: a new value still rotates, once.
    rotate("2").await;
    let at = wait_for(&api, "bot", "revision 3", 30, |at| {
        revision(at) == 3 && ready(at)
    })
    .await;
    assert_eq!(
        at.status
            .unwrap()
            .handled_triggers
            .and_then(|h| h.rotate)
            .as_deref(),
        Some("2")
    );
    eprintln!("took {:?}", started.elapsed());
}

/// An issuer that answers a mint with a 1 GiB body (streamed, no
/// Content-Length): a local stand-in of a broken or hostile minting
/// service behind a webhook TokenIssuer. The operator stops reading at
/// 1 MiB, does not retry, says why on the AgentToken, and its memory stays
/// small; the stand-in counts what it managed to send.
#[tokio::test]
async fn webhook_stand_in_with_a_gigabyte_body_is_refused_without_the_memory() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ns = TestNamespace::new("hostile-body").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let requests = Arc::new(AtomicU32::new(0));
    {
        let (sent, requests) = (sent.clone(), requests.clone());
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let (sent, requests) = (sent.clone(), requests.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    let _ = conn.read(&mut buf).await;
                    // A HEAD reachability probe gets an empty answer.
                    if buf.starts_with(b"HEAD") {
                        let _ = conn
                            .write_all(
                                b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n",
                            )
                            .await;
                        return;
                    }
                    requests.fetch_add(1, Ordering::SeqCst);
                    let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
                    if conn.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    let chunk = vec![b'a'; 64 * 1024];
                    let frame = [
                        format!("{:x}\r\n", chunk.len()).into_bytes(),
                        chunk,
                        b"\r\n".to_vec(),
                    ]
                    .concat();
                    for _ in 0..(1 << 14) {
                        // 16,384 chunks of 64 KiB: 1 GiB.
                        if conn.write_all(&frame).await.is_err() {
                            return;
                        }
                        sent.fetch_add(64 * 1024, Ordering::SeqCst);
                    }
                });
            }
        });
    }
    let op = Operator::start(&ns.name);
    applied(
        &ns,
        &format!(
            "apiVersion: agenttoken.dev/v1alpha1\nkind: TokenIssuer\nmetadata: {{name: flood}}\nspec:\n  webhook:\n    url: http://127.0.0.1:{port}/mint\n    result: {{tokenPath: $.token, expiresInPath: $.ttl}}\n---\napiVersion: agenttoken.dev/v1alpha1\nkind: AgentToken\nmetadata: {{name: bot}}\nspec:\n  issuerRef: {{name: flood}}\n  lifetime: 10m\n"
        ),
    );
    let api: Api<AgentToken> = ns.api();
    let message = eventually(Duration::from_secs(60), "the mint refused", || async {
        let st = api.get("bot").await.ok()?.status?;
        st.last_failure_message.filter(|m| m.contains("1 MiB"))
    })
    .await;
    assert!(message.contains("larger than 1 MiB"), "{message}");
    let mut op = op;
    assert!(!op.exited(), "the operator is still running");
    let mib_sent = sent.load(Ordering::SeqCst) / (1 << 20);
    let tries = requests.load(Ordering::SeqCst).max(1) as u64;
    assert!(
        mib_sent / tries < 64,
        "the operator stopped reading early: {mib_sent} MiB sent over {tries} request(s)"
    );
    let peak = op.peak_rss_kib().unwrap_or(0) / 1024;
    assert!(
        peak < 200,
        "the operator's peak memory stayed small: {peak} MiB"
    );
    let secrets: Api<Secret> = ns.api();
    assert!(
        secrets.get_opt("bot").await.unwrap().is_none(),
        "no Secret written"
    );
    eprintln!("1 GiB body: {mib_sent} MiB sent over {tries} request(s), operator peak {peak} MiB");
}

/// The revocation ledger is the operator's, not the Secret's: a tenant
/// edits the token Secret's `agenttoken.dev/token-state` record to aim the
/// previous token's revocation at another AgentToken's binding. When the
/// grace period ends the operator revokes what its status ledger recorded
/// (its own previous token) and the other AgentToken's token still works.
/// Real control plane, ServiceAccount issuer, checked by TokenReview.
#[tokio::test]
async fn tenant_cannot_aim_a_revocation_by_editing_the_secret_record() {
    use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
    let ns = TestNamespace::new("hostile-aim").await;
    let _op = Operator::start(&ns.name);
    applied(&ns, SA_ISSUER);
    tenant(&ns).await;
    for (name, extra) in [
        ("attacker", "  previousTokenGracePeriod: 15s\n"),
        ("victim", ""),
    ] {
        let out = apply_as_tenant(
            &ns.name,
            &format!(
                "apiVersion: agenttoken.dev/v1alpha1\nkind: AgentToken\nmetadata: {{name: {name}}}\nspec:\n  issuerRef: {{name: sa}}\n  serviceAccountName: builder\n  lifetime: 10m\n{extra}"
            ),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let api: Api<AgentToken> = ns.api();
    for name in ["attacker", "victim"] {
        eventually(Duration::from_secs(45), name, || async {
            (api.get(name).await.ok()?.status?.revision == 1).then_some(())
        })
        .await;
    }
    let secrets: Api<Secret> = ns.api();
    let victim_token = {
        let s = secrets.get("victim").await.unwrap();
        String::from_utf8(s.data.unwrap()["token"].0.clone()).unwrap()
    };
    // Rotate the attacker: revision 1 becomes the previous token, in grace.
    let tenant_ats: Api<AgentToken> = Api::namespaced(tenant(&ns).await, &ns.name);
    tenant_ats
        .patch(
            "attacker",
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"annotations": {"agenttoken.dev/rotate": "1"}}})),
        )
        .await
        .unwrap();
    eventually(Duration::from_secs(45), "attacker revision 2", || async {
        (api.get("attacker").await.ok()?.status?.revision == 2).then_some(())
    })
    .await;
    // The tenant rewrites the record: the previous slot's handle now names
    // the victim's binding Secret.
    let tenant_secrets: Api<Secret> = Api::namespaced(tenant(&ns).await, &ns.name);
    let s = tenant_secrets.get("attacker").await.unwrap();
    let mut state: Value = serde_json::from_str(
        s.annotations()
            .get("agenttoken.dev/token-state")
            .expect("the operator's record"),
    )
    .unwrap();
    assert!(
        state["previous"].is_object(),
        "a previous token in grace: {state}"
    );
    state["previous"]["handle"] = json!("victim-binding-r1");
    tenant_secrets
        .patch(
            "attacker",
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"annotations": {"agenttoken.dev/token-state": state.to_string()}}})),
        )
        .await
        .unwrap();
    // The grace period ends: revision 1 is revoked, from the ledger.
    eventually(
        Duration::from_secs(60),
        "attacker revision 1 revoked",
        || async {
            let st = api.get("attacker").await.ok()?.status?;
            st.history
                .iter()
                .any(|h| {
                    h.revision == 1
                        && h.revocation == agent_token_operator::crd::RevocationState::Revoked
                })
                .then_some(())
        },
    )
    .await;
    assert!(
        secrets
            .get_opt("victim-binding-r1")
            .await
            .unwrap()
            .is_some(),
        "the victim's binding Secret was not deleted"
    );
    assert!(
        secrets
            .get_opt("attacker-binding-r1")
            .await
            .unwrap()
            .is_none(),
        "the attacker's own previous token was revoked"
    );
    let review: Api<TokenReview> = Api::all(ns.client.clone());
    let r = review
        .create(
            &PostParams::default(),
            &TokenReview {
                spec: TokenReviewSpec {
                    token: Some(victim_token),
                    audiences: None,
                },
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        r.status.and_then(|s| s.authenticated),
        Some(true),
        "the victim's token still authenticates"
    );
}

/// A tenant squats the name of the binding Secret the operator will create
/// for its AgentToken's first token: the operator used to delete whatever
/// Secret had that name. Now it deletes only a binding the AgentToken owns
/// by UID: the squatted Secret is intact and the AgentToken says why.
#[tokio::test]
async fn tenant_secret_under_a_binding_name_is_never_deleted() {
    let ns = TestNamespace::new("hostile-squat").await;
    let _op = Operator::start(&ns.name);
    applied(&ns, SA_ISSUER);
    let client = tenant(&ns).await;
    let secrets: Api<Secret> = Api::namespaced(client, &ns.name);
    let squat: Secret = serde_json::from_value(json!({
        "metadata": {"name": "bot-binding-r1"},
        "stringData": {"mine": "keep me"},
    }))
    .unwrap();
    let created = secrets
        .create(&PostParams::default(), &squat)
        .await
        .unwrap();
    let out = apply_as_tenant(
        &ns.name,
        "apiVersion: agenttoken.dev/v1alpha1\nkind: AgentToken\nmetadata: {name: bot}\nspec:\n  issuerRef: {name: sa}\n  serviceAccountName: builder\n  lifetime: 10m\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let api: Api<AgentToken> = ns.api();
    let message = eventually(Duration::from_secs(45), "refused", || async {
        api.get("bot")
            .await
            .ok()?
            .status?
            .last_failure_message
            .filter(|m| m.contains("never deleted or adopted"))
    })
    .await;
    assert!(message.contains("bot-binding-r1"), "{message}");
    let still = secrets.get("bot-binding-r1").await.unwrap();
    assert_eq!(
        still.uid(),
        created.uid(),
        "the tenant's Secret is the same object"
    );
    assert!(still.data.unwrap().contains_key("mine"));
}

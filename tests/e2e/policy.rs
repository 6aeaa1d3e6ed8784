//! Issuer policy on the real control plane, as the restricted tenant would
//! use it: every grant dimension fails closed, and the token the issuer
//! really minted (a ServiceAccount token from the API server, a JWT signed
//! by the operator), decoded, carries only what the policy allows.

use std::time::Duration;

use base64::Engine;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use serde_json::Value;

use agent_token_operator::crd::AgentToken;

use crate::hostile::{apply_as_tenant, tenant};
use crate::support::{Operator, TestNamespace, applied, eventually};

/// The claims of a JWT, without verifying it (the issuer's own checks are
/// other tests'); here only what the token carries matters.
fn claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("a JWT has a payload");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .expect("base64url payload");
    serde_json::from_slice(&bytes).expect("JSON claims")
}

async fn token(ns: &TestNamespace, name: &str) -> String {
    let s: Secret = ns.api().get(name).await.unwrap();
    String::from_utf8(s.data.unwrap()["token"].0.clone()).unwrap()
}

/// Waits for `name` to be refused with reason PolicyViolation; returns the message.
async fn refused(ns: &TestNamespace, name: &str) -> String {
    let api: Api<AgentToken> = ns.api();
    eventually(Duration::from_secs(45), name, || async {
        let st = api.get(name).await.ok()?.status?;
        let c = st.conditions.iter().find(|c| c.type_ == "Ready")?;
        (c.reason == "PolicyViolation").then(|| c.message.clone())
    })
    .await
}

async fn minted(ns: &TestNamespace, name: &str) {
    let api: Api<AgentToken> = ns.api();
    eventually(Duration::from_secs(45), name, || async {
        (api.get(name).await.ok()?.status?.revision == 1).then_some(())
    })
    .await;
}

fn at(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: agenttoken.dev/v1alpha1\nkind: AgentToken\nmetadata: {{name: {name}}}\nspec:\n{spec}"
    )
}

#[tokio::test]
async fn tenant_cluster_issuer_service_accounts_and_audiences_fail_closed() {
    let ns = TestNamespace::new("pol-sa").await;
    let _op = Operator::start(&ns.name);
    let issuer = format!("ci-{}", ns.name);
    // The platform's issuer: one ServiceAccount, one audience, this namespace.
    applied(
        &ns,
        &format!(
            "apiVersion: agenttoken.dev/v1alpha1\nkind: ClusterTokenIssuer\nmetadata: {{name: {issuer}}}\nspec:\n  serviceAccount: {{}}\n  policy:\n    allowedNamespaces: [{ns}]\n    allowedServiceAccounts: [ci-runner]\n    allowedAudiences: [\"https://ci.internal\"]\n    maxLifetime: 1h\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: ci-runner}}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: admin}}\n",
            ns = ns.name
        ),
    );
    tenant(&ns).await;
    let spec = |sa: &str, aud: &str| {
        format!(
            "  issuerRef: {{kind: ClusterTokenIssuer, name: {issuer}}}\n  serviceAccountName: {sa}\n  audiences: [\"{aud}\"]\n  lifetime: 30m\n"
        )
    };
    for (name, sa, aud) in [
        ("as-admin", "admin", "https://ci.internal"),
        ("other-api", "ci-runner", "https://payroll.internal"),
        ("fine", "ci-runner", "https://ci.internal"),
    ] {
        let out = apply_as_tenant(&ns.name, &at(name, &spec(sa, aud)));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let m = refused(&ns, "as-admin").await;
    assert!(
        m.contains("policy.allowedServiceAccounts: ServiceAccount \"admin\" is not allowed"),
        "{m}"
    );
    let m = refused(&ns, "other-api").await;
    assert!(m.contains("policy.allowedAudiences"), "{m}");
    minted(&ns, "fine").await;
    let c = claims(&token(&ns, "fine").await);
    assert_eq!(c["aud"], serde_json::json!(["https://ci.internal"]), "{c}");
    assert_eq!(
        c["sub"],
        format!("system:serviceaccount:{}:ci-runner", ns.name),
        "{c}"
    );
    let secrets: Api<Secret> = ns.api();
    for name in ["as-admin", "other-api"] {
        assert!(
            secrets.get_opt(name).await.unwrap().is_none(),
            "{name}: nothing minted"
        );
    }
    let _ = crate::support::kubectl_as(
        &crate::support::cluster().admin_kubeconfig,
        None,
        &["delete", "clustertokenissuer", &issuer, "--wait=false"],
    );
}

#[tokio::test]
async fn tenant_jwt_scopes_and_audiences_are_only_what_the_policy_allows() {
    let ns = TestNamespace::new("pol-jwt").await;
    let _op = Operator::start(&ns.name);
    let out = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .output()
        .expect("openssl");
    assert!(out.status.success());
    let pem = String::from_utf8(out.stdout).unwrap();
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "signing-key"},
        "stringData": {"key.pem": pem},
    }))
    .unwrap();
    ns.api::<Secret>()
        .create(&Default::default(), &secret)
        .await
        .unwrap();
    applied(
        &ns,
        "apiVersion: agenttoken.dev/v1alpha1\nkind: TokenIssuer\nmetadata: {name: agents}\nspec:\n  jwt:\n    signingKeySecretRef: {name: signing-key, key: key.pem}\n    issuer: https://agents.example\n  policy:\n    maxLifetime: 1h\n    allowedScopes: [\"read:*\"]\n    allowedAudiences: [\"https://api.internal\"]\n",
    );
    tenant(&ns).await;
    // A second scope smuggled after a space never reaches the issuer.
    let out = apply_as_tenant(
        &ns.name,
        &at(
            "smuggler",
            "  issuerRef: {name: agents}\n  scopes: [\"read:x admin\"]\n  lifetime: 30m\n",
        ),
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("one scope-token"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (name, spec) in [
        ("admin", "  scopes: [\"admin\"]\n"),
        (
            "elsewhere",
            "  scopes: [\"read:x\"]\n  audiences: [\"https://payroll\"]\n",
        ),
        (
            "resource",
            "  scopes: [\"read:x\"]\n  parameters: {resource: \"https://payroll\"}\n",
        ),
        (
            "fine",
            "  scopes: [\"read:x\"]\n  audiences: [\"https://api.internal\"]\n",
        ),
    ] {
        let out = apply_as_tenant(
            &ns.name,
            &at(
                name,
                &format!("  issuerRef: {{name: agents}}\n  lifetime: 30m\n{spec}"),
            ),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(refused(&ns, "admin").await.contains("policy.allowedScopes"));
    assert!(
        refused(&ns, "elsewhere")
            .await
            .contains("policy.allowedAudiences")
    );
    assert!(
        refused(&ns, "resource")
            .await
            .contains("policy.allowedResources")
    );
    minted(&ns, "fine").await;
    let c = claims(&token(&ns, "fine").await);
    assert_eq!(c["scope"], "read:x", "{c}");
    let aud = match &c["aud"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
        other => panic!("aud {other}"),
    };
    assert_eq!(aud, vec!["https://api.internal".to_string()], "{c}");
    let exp = c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap();
    assert!(exp <= 1800, "lifetime within the request: {exp}");
}

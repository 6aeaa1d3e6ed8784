//! The jwt issuer on the local control plane: tokens signed by the operator
//! verify with nothing but the JWKS it publishes in a ConfigMap, including
//! across a signing-key rotation. Keys are generated per test with openssl.

use std::process::Command;
use std::time::Duration;

use jsonwebtoken::jwk::JwkSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};

use agent_token_operator::crd::{AgentToken, RevocationState};

use crate::support::{Operator, TestNamespace, apply, eventually};

fn key(args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl");
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

async fn put_key(ns: &TestNamespace, pem: &str) {
    let api: Api<Secret> = ns.api();
    let s = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "signing-key"}, "stringData": {"key.pem": pem}});
    api.patch(
        "signing-key",
        &PatchParams::apply("e2e-test").force(),
        &Patch::Apply(&s),
    )
    .await
    .unwrap();
}

async fn jwks(ns: &TestNamespace) -> Option<JwkSet> {
    let cm: ConfigMap = ns.api().get_opt("agents-jwks").await.ok()??;
    serde_json::from_str(cm.data?.get("jwks.json")?).ok()
}

/// Verifies `token` with the published JWKS only.
async fn verify(ns: &TestNamespace, token: &str) -> Value {
    let set = jwks(ns).await.expect("published JWKS");
    let header = jsonwebtoken::decode_header(token).unwrap();
    let kid = header.kid.clone().expect("kid");
    let jwk = set.find(&kid).expect("the token's key is published");
    let dk = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
    let mut v = jsonwebtoken::Validation::new(header.alg);
    v.set_issuer(&["https://agents.example"]);
    v.set_audience(&["https://api.internal"]);
    jsonwebtoken::decode::<Value>(token, &dk, &v)
        .expect("the token verifies")
        .claims
}

async fn token(ns: &TestNamespace) -> String {
    let s: Secret = ns.api().get("bot").await.unwrap();
    String::from_utf8(s.data.unwrap()["token"].0.clone()).unwrap()
}

#[tokio::test]
async fn jwt_tokens_verify_with_the_published_jwks_across_a_key_rotation() {
    let ns = TestNamespace::new("jwt").await;
    let op = Operator::start(&ns.name);
    let first_key = key(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
    ]);
    put_key(&ns, &first_key).await;
    let yaml = r#"
apiVersion: agenttoken.dev/v1alpha1
kind: TokenIssuer
metadata: {name: agents}
spec:
  jwt:
    signingKeySecretRef: {name: signing-key, key: key.pem}
    issuer: https://agents.example
  policy: {maxLifetime: 1h, allowedScopes: ["deploy", "read"]}
---
apiVersion: agenttoken.dev/v1alpha1
kind: AgentToken
metadata: {name: bot}
spec:
  issuerRef: {name: agents}
  scopes: ["deploy"]
  audiences: ["https://api.internal"]
  lifetime: 10m
  previousTokenGracePeriod: 0s
"#;
    let out = apply(&ns, yaml);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ats: Api<AgentToken> = ns.api();
    eventually(Duration::from_secs(30), "revision 1", || async {
        (ats.get("bot").await.ok()?.status?.revision == 1).then_some(())
    })
    .await;
    let first = token(&ns).await;
    let claims = verify(&ns, &first).await;
    assert_eq!(claims["sub"], format!("{}/bot", ns.name));
    assert_eq!(claims["scope"], "deploy");
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        600
    );
    assert!(claims["jti"].as_str().is_some_and(|j| j.len() == 32));
    assert_eq!(
        jsonwebtoken::decode_header(&first).unwrap().alg,
        jsonwebtoken::Algorithm::ES256
    );
    assert_eq!(jwks(&ns).await.unwrap().keys.len(), 1);

    // Rotate the signing key (to Ed25519), then the token.
    put_key(&ns, &key(&["genpkey", "-algorithm", "ED25519"])).await;
    let patch = json!({"metadata": {"annotations": {"agenttoken.dev/rotate": "1"}}});
    ats.patch("bot", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "revision 2", || async {
        (ats.get("bot").await.ok()?.status?.revision == 2).then_some(())
    })
    .await;
    let second = token(&ns).await;
    assert_eq!(
        jsonwebtoken::decode_header(&second).unwrap().alg,
        jsonwebtoken::Algorithm::EdDSA
    );
    let set = jwks(&ns).await.unwrap();
    assert_eq!(set.keys.len(), 2, "the previous key stays published");
    // Both tokens verify with the JWKS alone.
    verify(&ns, &second).await;
    verify(&ns, &first).await;
    // Self-signed tokens cannot be revoked at an issuer: said so.
    eventually(
        Duration::from_secs(30),
        "revision 1 NotSupported",
        || async {
            let st = ats.get("bot").await.ok()?.status?;
            st.history
                .iter()
                .any(|h| h.revision == 1 && h.revocation == RevocationState::NotSupported)
                .then_some(())
        },
    )
    .await;
    let cm: ConfigMap = ns.api().get("agents-jwks").await.unwrap();
    let published = serde_json::to_string(&cm.data).unwrap();
    assert!(!published.contains("\"d\""), "no private key material");
    assert!(!op.logs().contains(&first) && !op.logs().contains("PRIVATE KEY"));
}

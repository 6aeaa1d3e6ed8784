//! The jwt issuer on the local control plane: tokens signed by the operator
//! verify with nothing but the JWKS it publishes in a ConfigMap, including
//! across a signing-key rotation; and a tenant (the restricted user, with
//! ConfigMap rights in its namespace) can neither slip its own key into that
//! JWKS nor make the operator publish into a ConfigMap it planted. Keys are
//! generated per test with openssl.

use std::process::Command;
use std::time::Duration;

use jsonwebtoken::jwk::JwkSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use agent_token_operator::crd::{AgentToken, ClusterTokenIssuer, RevocationState, TokenIssuer};
use agent_token_operator::issuer::jwt::{
    JwksRecord, RECORD_ANNOTATION, SigningKey, load_key, read_records,
};

use crate::support::{
    self, Operator, TestNamespace, applied, apply, cluster, eventually, random_suffix,
};

pub(crate) fn key(args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl");
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

pub(crate) async fn put_key(ns: &TestNamespace, pem: &str) {
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
  policy: {maxLifetime: 1h, allowedScopes: ["deploy", "read"], allowedAudiences: ["https://api.internal"]}
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

/// The jwt TokenIssuer `agents` and the AgentToken `bot` that uses it.
pub(crate) const ISSUER: &str = r#"
apiVersion: agenttoken.dev/v1alpha1
kind: TokenIssuer
metadata: {name: agents}
spec:
  jwt:
    signingKeySecretRef: {name: signing-key, key: key.pem}
    issuer: https://agents.example
  policy:
    maxLifetime: 1h
    allowedScopes: ["deploy", "read"]
    allowedAudiences: ["https://api.internal"]
"#;
pub(crate) const BOT: &str = r#"
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

pub(crate) fn ec_pem() -> String {
    key(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
    ])
}

/// A namespace admin (see `hostile::tenant`): AgentTokens, Secrets and
/// ConfigMaps in `ns`, no issuers.
async fn tenant(ns: &TestNamespace) -> Client {
    crate::hostile::tenant(ns).await
}

/// A JWT for `sub` signed with `key` (its thumbprint as `kid`), with the
/// issuer's `iss` and audience: what a tenant holding `key` could forge.
fn forge(key: &SigningKey, sub: &str) -> String {
    let mut header = jsonwebtoken::Header::new(key.algorithm);
    header.kid = key.jwk.common.key_id.clone();
    let now = jiff::Timestamp::now().as_second();
    let claims = json!({
        "iss": "https://agents.example", "aud": "https://api.internal", "sub": sub,
        "scope": "deploy admin", "iat": now, "nbf": now, "exp": now + 600,
    });
    jsonwebtoken::encode(&header, &claims, &key.encoding).unwrap()
}

/// Verifies `token` against `set` as a relying service would: by `kid`.
fn verifies(set: &JwkSet, token: &str) -> bool {
    let Ok(header) = jsonwebtoken::decode_header(token) else {
        return false;
    };
    let Some(jwk) = header.kid.as_deref().and_then(|k| set.find(k)) else {
        return false;
    };
    let Ok(dk) = jsonwebtoken::DecodingKey::from_jwk(jwk) else {
        return false;
    };
    let mut v = jsonwebtoken::Validation::new(header.alg);
    v.set_issuer(&["https://agents.example"]);
    v.set_audience(&["https://api.internal"]);
    jsonwebtoken::decode::<Value>(token, &dk, &v).is_ok()
}

fn kids(set: &JwkSet) -> Vec<String> {
    set.keys
        .iter()
        .filter_map(|k| k.common.key_id.clone())
        .collect()
}

/// Adds `jwk` to the published `jwks.json` as the tenant; returns the
/// document it wrote.
async fn add_key_as_tenant(tenant: &Client, ns: &TestNamespace, jwk: &Value) -> String {
    let cms: Api<ConfigMap> = Api::namespaced(tenant.clone(), &ns.name);
    eventually(
        Duration::from_secs(20),
        "the tenant's edit of the JWKS",
        || async {
            let mut cm = cms.get("agents-jwks").await.ok()?;
            let mut doc: Value = serde_json::from_str(cm.data.as_ref()?.get("jwks.json")?).ok()?;
            doc["keys"].as_array_mut()?.push(jwk.clone());
            let text = doc.to_string();
            cm.data.as_mut()?.insert("jwks.json".into(), text.clone());
            // A conflict (the operator wrote meanwhile) is retried.
            cms.replace("agents-jwks", &PostParams::default(), &cm)
                .await
                .ok()?;
            Some(text)
        },
    )
    .await
}

async fn wait_revision(ats: &Api<AgentToken>, revision: i64) {
    eventually(
        Duration::from_secs(45),
        &format!("revision {revision}"),
        || async { (ats.get("bot").await.ok()?.status?.revision == revision).then_some(()) },
    )
    .await;
}

/// The issuer's record of the ConfigMap `namespace/name`.
fn record(annotations: &std::collections::BTreeMap<String, String>, id: &str) -> JwksRecord {
    read_records(Some(annotations))
        .remove(id)
        .unwrap_or_else(|| panic!("no record of {id} in {annotations:?}"))
}

#[tokio::test]
async fn a_key_a_tenant_adds_to_the_jwks_is_dropped_and_never_verifies() {
    let ns = TestNamespace::new("jwt-foreign").await;
    let tenant = tenant(&ns).await;
    let op = Operator::start(&ns.name);
    put_key(&ns, &ec_pem()).await;
    applied(&ns, &format!("{ISSUER}---{BOT}"));
    let ats: Api<AgentToken> = ns.api();
    wait_revision(&ats, 1).await;
    let first = token(&ns).await;

    // The ConfigMap is the operator's: created by it, owned by the issuer,
    // and its UID and key ids are recorded on the issuer.
    let issuer: TokenIssuer = ns.api().get("agents").await.unwrap();
    let cm: ConfigMap = ns.api().get("agents-jwks").await.unwrap();
    let owner = &cm.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str()),
        ("TokenIssuer", issuer.uid().unwrap().as_str())
    );
    let rec = record(issuer.annotations(), &format!("{}/agents-jwks", ns.name));
    assert_eq!(rec.uid, cm.uid().unwrap());
    let ours = kids(&jwks(&ns).await.unwrap());
    assert_eq!(rec.kids, ours);
    // ... where the tenant cannot write.
    let tenant_issuers: Api<TokenIssuer> = Api::namespaced(tenant.clone(), &ns.name);
    let forged_record = json!({"metadata": {"annotations": {RECORD_ANNOTATION: "{}"}}});
    match tenant_issuers
        .patch(
            "agents",
            &PatchParams::default(),
            &Patch::Merge(&forged_record),
        )
        .await
    {
        Err(kube::Error::Api(s)) if s.code == 403 => {}
        other => panic!(
            "the tenant must not write the issuer: {:?}",
            other.map(|_| ())
        ),
    }

    // The tenant adds its own key to jwks.json: with that document, a token
    // it signs would verify as the platform's.
    let evil = load_key(&ec_pem()).unwrap();
    let evil_kid = evil.jwk.common.key_id.clone().unwrap();
    let forged = forge(&evil, &format!("{}/bot", ns.name));
    let tampered = add_key_as_tenant(&tenant, &ns, &serde_json::to_value(&evil.jwk).unwrap()).await;
    let tampered_set: JwkSet = serde_json::from_str(&tampered).unwrap();
    assert!(verifies(&tampered_set, &forged), "the attack is real");

    // The next mint (a rotation the tenant asks for) publishes only the
    // operator's keys.
    let tenant_ats: Api<AgentToken> = Api::namespaced(tenant.clone(), &ns.name);
    let rotate = json!({"metadata": {"annotations": {"agenttoken.dev/rotate": "1"}}});
    tenant_ats
        .patch("bot", &PatchParams::default(), &Patch::Merge(&rotate))
        .await
        .unwrap();
    wait_revision(&ats, 2).await;
    let set = jwks(&ns).await.unwrap();
    assert_eq!(kids(&set), ours, "only the operator's key");
    assert!(!verifies(&set, &forged), "the forged token does not verify");
    assert!(verifies(&set, &first) && verifies(&set, &token(&ns).await));
    let logs = op.logs();
    assert!(
        logs.contains("did not publish") && logs.contains(&evil_kid),
        "a warning names the dropped key:\n{logs}"
    );

    // Again, then a signing-key rotation: the new key and the previous one,
    // never the tenant's.
    add_key_as_tenant(&tenant, &ns, &serde_json::to_value(&evil.jwk).unwrap()).await;
    put_key(&ns, &key(&["genpkey", "-algorithm", "ED25519"])).await;
    let rotate = json!({"metadata": {"annotations": {"agenttoken.dev/rotate": "2"}}});
    ats.patch("bot", &PatchParams::default(), &Patch::Merge(&rotate))
        .await
        .unwrap();
    wait_revision(&ats, 3).await;
    let third = token(&ns).await;
    let set = jwks(&ns).await.unwrap();
    assert_eq!(set.keys.len(), 2, "{:?}", kids(&set));
    assert_eq!(kids(&set)[1], ours[0]);
    assert!(!kids(&set).contains(&evil_kid));
    assert!(!verifies(&set, &forged));
    assert!(verifies(&set, &third) && verifies(&set, &first));
    let issuer: TokenIssuer = ns.api().get("agents").await.unwrap();
    assert_eq!(
        record(issuer.annotations(), &format!("{}/agents-jwks", ns.name)).kids,
        kids(&set)
    );
}

#[tokio::test]
async fn a_jwks_configmap_the_operator_did_not_create_is_never_written() {
    let ns = TestNamespace::new("jwt-planted").await;
    let tenant = tenant(&ns).await;
    put_key(&ns, &ec_pem()).await;
    applied(&ns, ISSUER);
    let issuer: TokenIssuer = ns.api().get("agents").await.unwrap();
    // Before the operator runs, the tenant plants the ConfigMap with every
    // mark of the operator's: its label and an owner reference to the issuer.
    let evil = load_key(&ec_pem()).unwrap();
    let planted = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {
            "name": "agents-jwks",
            "labels": {"app.kubernetes.io/managed-by": "agent-token-operator"},
            "ownerReferences": [{
                "apiVersion": "agenttoken.dev/v1alpha1", "kind": "TokenIssuer",
                "name": "agents", "uid": issuer.uid().unwrap(), "controller": true,
            }],
        },
        "data": {"jwks.json": json!({"keys": [evil.jwk]}).to_string()},
    });
    let out = support::apply_as(
        &cluster().restricted_kubeconfig,
        &ns.name,
        &planted.to_string(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let before: ConfigMap = ns.api().get("agents-jwks").await.unwrap();

    let _op = Operator::start(&ns.name);
    let out = support::apply_as(&cluster().restricted_kubeconfig, &ns.name, BOT);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let says = format!(
        "ConfigMap {}/agents-jwks exists and was not created by this issuer; delete it or set jwt.jwksConfigMap",
        ns.name
    );
    let issuers: Api<TokenIssuer> = ns.api();
    let ready = |want: &'static str| {
        let issuers = issuers.clone();
        async move {
            eventually(
                Duration::from_secs(45),
                &format!("issuer Ready={want}"),
                || async {
                    let c = issuers
                        .get("agents")
                        .await
                        .ok()?
                        .status?
                        .conditions
                        .into_iter()
                        .find(|c| c.type_ == "Ready" && c.status == want)?;
                    Some((c.reason, c.message))
                },
            )
            .await
        }
    };
    let (reason, message) = ready("False").await;
    assert_eq!(reason, "InvalidConfig");
    assert_eq!(message, says);
    // Nothing minted; the AgentToken says why.
    let ats: Api<AgentToken> = ns.api();
    let failure = eventually(Duration::from_secs(30), "the mint failure", || async {
        ats.get("bot").await.ok()?.status?.last_failure_message
    })
    .await;
    assert!(failure.contains(&says), "{failure}");
    assert!(ns.api::<Secret>().get_opt("bot").await.unwrap().is_none());
    assert_eq!(ats.get("bot").await.unwrap().status.unwrap().revision, 0);
    // The planted ConfigMap was not written, and nothing was recorded.
    let after: ConfigMap = ns.api().get("agents-jwks").await.unwrap();
    assert_eq!(after.resource_version(), before.resource_version());
    assert_eq!(after.data, before.data);
    let issuer: TokenIssuer = ns.api().get("agents").await.unwrap();
    assert!(!issuer.annotations().contains_key(RECORD_ANNOTATION));

    // Deleted (what the message says to do), the operator makes its own.
    let cms: Api<ConfigMap> = Api::namespaced(tenant.clone(), &ns.name);
    cms.delete("agents-jwks", &DeleteParams::default())
        .await
        .unwrap();
    ok_kubectl(&ns, &["annotate", "tokenissuer", "agents", "e2e/touch=1"]);
    ready("True").await;
    wait_revision(&ats, 1).await;
    let cm: ConfigMap = ns.api().get("agents-jwks").await.unwrap();
    assert_ne!(cm.uid(), before.uid());
    let issuer: TokenIssuer = ns.api().get("agents").await.unwrap();
    assert_eq!(
        record(issuer.annotations(), &format!("{}/agents-jwks", ns.name)).uid,
        cm.uid().unwrap()
    );
    let set = jwks(&ns).await.unwrap();
    assert_eq!(set.keys.len(), 1);
    assert!(verifies(&set, &token(&ns).await));
    assert!(!verifies(&set, &forge(&evil, "x/y")));
}

#[tokio::test]
async fn a_cluster_issuer_owns_and_records_its_jwks() {
    let ns = TestNamespace::new("jwt-cluster").await;
    // The test operator's namespace is its lease namespace: the test's.
    let _op = Operator::start(&ns.name);
    put_key(&ns, &ec_pem()).await;
    let name = format!("jwt-{}", random_suffix());
    let _cleanup = support::DeleteClusterIssuer(name.clone());
    applied(
        &ns,
        &format!(
            r#"
apiVersion: agenttoken.dev/v1alpha1
kind: ClusterTokenIssuer
metadata: {{name: {name}}}
spec:
  jwt:
    signingKeySecretRef: {{name: signing-key, key: key.pem}}
    issuer: https://agents.example
  policy:
    allowedNamespaces: ["{ns}"]
    allowedScopes: ["deploy"]
    allowedAudiences: ["https://api.internal"]
---
{bot}"#,
            ns = ns.name,
            bot = BOT.replace(
                "issuerRef: {name: agents}",
                &format!("issuerRef: {{kind: ClusterTokenIssuer, name: {name}}}")
            ),
        ),
    );
    let ats: Api<AgentToken> = ns.api();
    wait_revision(&ats, 1).await;
    let ctis: Api<ClusterTokenIssuer> = Api::all(ns.client.clone());
    let cti = ctis.get(&name).await.unwrap();
    let cm: ConfigMap = ns.api().get(&format!("{name}-jwks")).await.unwrap();
    let owner = &cm.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str()),
        ("ClusterTokenIssuer", cti.uid().unwrap().as_str())
    );
    let rec = record(cti.annotations(), &format!("{}/{name}-jwks", ns.name));
    assert_eq!(rec.uid, cm.uid().unwrap());
    let set: JwkSet = serde_json::from_str(&cm.data.unwrap()["jwks.json"]).unwrap();
    assert!(verifies(&set, &token(&ns).await));
}

fn ok_kubectl(ns: &TestNamespace, args: &[&str]) {
    let out = ns.kubectl(args);
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

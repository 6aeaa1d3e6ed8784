//! The jwt issuer: the operator signs tokens itself (ES256, RS256 or EdDSA,
//! from the key's type) with `iss`, `sub` (`namespace/name` of the
//! AgentToken), `aud`, `scope`, `exp`, `iat`, `nbf` and `jti`, and publishes
//! the public keys as a JWKS in a ConfigMap (`jwks.json`) so services can
//! verify. The key id (`kid`) is the key's RFC 7638 thumbprint; when the
//! signing key changes, the new key is published BEFORE anything is signed
//! with it and the previous keys stay published, so tokens signed before a
//! key rotation keep verifying until they expire.
//!
//! Self-signed tokens cannot be revoked at an issuer: revocation is
//! `NotSupported` and the token dies at its expiry.

use std::collections::BTreeMap;

use base64::Engine;
use futures::FutureExt;
use futures::future::BoxFuture;
use jiff::Timestamp;
use jsonwebtoken::jwk::{
    AlgorithmParameters, CommonParameters, EllipticCurve, Jwk, OctetKeyPairParameters,
    OctetKeyPairType, PublicKeyUse, ThumbprintHash,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Client;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};

use super::{Issuer, IssuerError, MintRequest, MintedToken, Revocation, RevocationHandle, web};
use crate::crd::JwtIssuerSpec;
use crate::labels;

/// Key of the JWKS in the ConfigMap.
pub const JWKS_KEY: &str = "jwks.json";
/// Public keys kept in the JWKS (the current one and the latest previous ones).
pub const KEEP_KEYS: usize = 5;
const FIELD_MANAGER: &str = "agent-token-operator-jwks";

/// A loaded signing key.
pub struct SigningKey {
    pub algorithm: Algorithm,
    pub encoding: EncodingKey,
    /// The public key as a JWK, with `kid`, `alg` and `use` set.
    pub jwk: Jwk,
}

/// Loads a PEM private key and derives its algorithm and public JWK.
pub fn load_key(pem: &str) -> Result<SigningKey, IssuerError> {
    let invalid = || {
        IssuerError::Invalid(
            "jwt.signingKeySecretRef does not hold an EC P-256, RSA or Ed25519 private key in PEM"
                .into(),
        )
    };
    let (algorithm, encoding) = if let Ok(k) = EncodingKey::from_ec_pem(pem.as_bytes()) {
        (Algorithm::ES256, k)
    } else if let Ok(k) = EncodingKey::from_rsa_pem(pem.as_bytes()) {
        (Algorithm::RS256, k)
    } else if let Ok(k) = EncodingKey::from_ed_pem(pem.as_bytes()) {
        (Algorithm::EdDSA, k)
    } else {
        return Err(invalid());
    };
    let mut jwk = match algorithm {
        Algorithm::EdDSA => {
            use ed25519_dalek::pkcs8::DecodePrivateKey;
            let sk = ed25519_dalek::SigningKey::from_pkcs8_pem(pem).map_err(|_| invalid())?;
            Jwk {
                common: CommonParameters::default(),
                algorithm: AlgorithmParameters::OctetKeyPair(OctetKeyPairParameters {
                    key_type: OctetKeyPairType::OctetKeyPair,
                    curve: EllipticCurve::Ed25519,
                    x: base64::engine::general_purpose::URL_SAFE_NO_PAD
                        .encode(sk.verifying_key().as_bytes()),
                }),
            }
        }
        _ => Jwk::from_encoding_key(&encoding, algorithm).map_err(|_| invalid())?,
    };
    let kid = match &jwk.algorithm {
        AlgorithmParameters::OctetKeyPair(p) => {
            // RFC 8037 §2 thumbprint members: crv, kty, x.
            let canonical = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#, p.x);
            use sha2::Digest;
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(sha2::Sha256::digest(canonical.as_bytes()))
        }
        _ => jwk.thumbprint(ThumbprintHash::SHA256),
    };
    jwk.common.key_id = Some(kid);
    jwk.common.public_key_use = Some(PublicKeyUse::Signature);
    jwk.common.key_algorithm = Some(match algorithm {
        Algorithm::ES256 => jsonwebtoken::jwk::KeyAlgorithm::ES256,
        Algorithm::RS256 => jsonwebtoken::jwk::KeyAlgorithm::RS256,
        _ => jsonwebtoken::jwk::KeyAlgorithm::EdDSA,
    });
    Ok(SigningKey {
        algorithm,
        encoding,
        jwk,
    })
}

/// When a token signed at `now` for `lifetime` expires (pure): an error
/// for a zero lifetime or one no timestamp can hold.
pub fn expiry(now: Timestamp, lifetime: std::time::Duration) -> Result<Timestamp, IssuerError> {
    if lifetime.as_secs() == 0 {
        return Err(IssuerError::Invalid(
            "the lifetime must be at least 1s: a JWT that expires when it is signed is useless"
                .into(),
        ));
    }
    let too_long = || {
        IssuerError::Invalid(format!(
            "a lifetime of {}s puts the expiry beyond any time the operator can represent",
            lifetime.as_secs()
        ))
    };
    let secs = i64::try_from(lifetime.as_secs()).map_err(|_| too_long())?;
    now.checked_add(jiff::SignedDuration::from_secs(secs))
        .map_err(|_| too_long())
}

/// The claims of one token (pure).
pub fn claims(
    spec: &JwtIssuerSpec,
    req: &MintRequest,
    now: Timestamp,
    jti: &str,
) -> Result<Value, IssuerError> {
    let exp = expiry(now, req.lifetime)?;
    let mut c = json!({
        "iss": spec.issuer,
        "sub": format!("{}/{}", req.namespace, req.name),
        "iat": now.as_second(),
        "nbf": now.as_second(),
        "exp": exp.as_second(),
        "jti": jti,
    });
    match req.audiences.as_slice() {
        [] => {}
        [one] => c["aud"] = json!(one),
        many => c["aud"] = json!(many),
    }
    if !req.scopes.is_empty() {
        c["scope"] = json!(req.scopes.join(" "));
    }
    Ok(c)
}

/// Merges `current` into a JWKS document: current first, then the previous
/// keys (deduplicated by kid), at most [`KEEP_KEYS`] (pure).
pub fn merge_jwks(existing: Option<&str>, current: &Jwk) -> (String, bool) {
    let current_value = serde_json::to_value(current).unwrap_or_default();
    let kid = current_value["kid"].clone();
    let previous: Vec<Value> = existing
        .and_then(|s| serde_json::from_str::<Value>(s).ok())
        .and_then(|v| v["keys"].as_array().cloned())
        .unwrap_or_default();
    if previous.first().map(|k| &k["kid"]) == Some(&kid) {
        return (existing.unwrap_or_default().to_string(), false);
    }
    let mut keys = vec![current_value];
    keys.extend(previous.into_iter().filter(|k| k["kid"] != kid));
    keys.truncate(KEEP_KEYS);
    (
        serde_json::to_string_pretty(&json!({ "keys": keys })).unwrap_or_default(),
        true,
    )
}

/// Signs tokens and publishes its JWKS.
pub struct JwtIssuer {
    kube: Client,
    spec: JwtIssuerSpec,
    namespace: String,
    config_map: String,
}

impl JwtIssuer {
    pub fn new(kube: Client, spec: JwtIssuerSpec, namespace: String, issuer_name: &str) -> Self {
        let config_map = spec
            .jwks_config_map
            .clone()
            .unwrap_or_else(|| format!("{issuer_name}-jwks"));
        JwtIssuer {
            kube,
            spec,
            namespace,
            config_map,
        }
    }

    async fn key(&self) -> Result<SigningKey, IssuerError> {
        let pem: SecretString = web::read_secret(
            &self.kube,
            &self.namespace,
            &self.spec.signing_key_secret_ref,
            "jwt.signingKeySecretRef",
        )
        .await?;
        load_key(pem.expose_secret())
    }

    /// Makes sure the JWKS ConfigMap publishes `key` (first).
    async fn publish(&self, key: &SigningKey) -> Result<(), IssuerError> {
        let api: Api<ConfigMap> = Api::namespaced(self.kube.clone(), &self.namespace);
        let live = api.get_opt(&self.config_map).await.map_err(|e| {
            IssuerError::Unavailable(format!("cannot read ConfigMap {:?}: {e}", self.config_map))
        })?;
        if let Some(cm) = &live {
            let ours = cm
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(labels::MANAGED_BY))
                == Some(&labels::MANAGER.to_string());
            if !ours {
                return Err(IssuerError::Invalid(format!(
                    "ConfigMap {:?} exists and was not created by the operator; it is never taken over: \
                     set jwt.jwksConfigMap to another name",
                    self.config_map
                )));
            }
        }
        let existing = live
            .as_ref()
            .and_then(|cm| cm.data.as_ref())
            .and_then(|d| d.get(JWKS_KEY))
            .map(String::as_str);
        let (jwks, changed) = merge_jwks(existing, &key.jwk);
        if !changed && live.is_some() {
            return Ok(());
        }
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(self.config_map.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some(BTreeMap::from([(
                    labels::MANAGED_BY.to_string(),
                    labels::MANAGER.to_string(),
                )])),
                ..Default::default()
            },
            data: Some(BTreeMap::from([(JWKS_KEY.to_string(), jwks)])),
            ..Default::default()
        };
        let mut value = serde_json::to_value(&cm).unwrap_or_default();
        value["apiVersion"] = json!("v1");
        value["kind"] = json!("ConfigMap");
        api.patch(
            &self.config_map,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&value),
        )
        .await
        .map_err(|e| {
            IssuerError::Unavailable(format!("cannot write ConfigMap {:?}: {e}", self.config_map))
        })?;
        Ok(())
    }

    async fn mint_inner(&self, req: &MintRequest) -> Result<MintedToken, IssuerError> {
        let key = self.key().await?;
        // Verifiers must know the key before they see a token signed by it.
        self.publish(&key).await?;
        let now = Timestamp::now();
        let jti = hex::encode(rand::random::<[u8; 16]>());
        let mut header = Header::new(key.algorithm);
        header.kid = key.jwk.common.key_id.clone();
        header.typ = Some("JWT".into());
        let expires_at = expiry(now, req.lifetime)?;
        let claims = claims(&self.spec, req, now, &jti)?;
        let token = jsonwebtoken::encode(&header, &claims, &key.encoding)
            .map_err(|e| IssuerError::Invalid(format!("cannot sign: {e}")))?;
        Ok(MintedToken {
            token: SecretString::from(token),
            issued_at: now,
            expires_at,
            handle: RevocationHandle(format!("jwt:{jti}")),
        })
    }

    async fn check_inner(&self) -> Result<(), IssuerError> {
        let key = self.key().await?;
        self.publish(&key).await
    }
}

impl Issuer for JwtIssuer {
    fn kind(&self) -> &'static str {
        "jwt"
    }

    fn mint<'a>(&'a self, req: &'a MintRequest) -> BoxFuture<'a, Result<MintedToken, IssuerError>> {
        self.mint_inner(req).boxed()
    }

    fn revoke<'a>(
        &'a self,
        _namespace: &'a str,
        _handle: &'a RevocationHandle,
        _token: Option<&'a SecretString>,
    ) -> BoxFuture<'a, Result<Revocation, IssuerError>> {
        Box::pin(async { Ok(Revocation::NotSupported) })
    }

    fn check(&self) -> BoxFuture<'_, Result<(), IssuerError>> {
        self.check_inner().boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn openssl_key(args: &[&str]) -> String {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl");
        assert!(out.status.success(), "openssl {args:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn every_key_type_signs_and_verifies_with_its_published_jwk() {
        let keys = [
            (
                openssl_key(&[
                    "genpkey",
                    "-algorithm",
                    "EC",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                ]),
                Algorithm::ES256,
            ),
            (
                openssl_key(&[
                    "genpkey",
                    "-algorithm",
                    "RSA",
                    "-pkeyopt",
                    "rsa_keygen_bits:2048",
                ]),
                Algorithm::RS256,
            ),
            (
                openssl_key(&["genpkey", "-algorithm", "ED25519"]),
                Algorithm::EdDSA,
            ),
        ];
        let spec = JwtIssuerSpec {
            issuer: "https://agents.example".into(),
            ..Default::default()
        };
        let req = MintRequest {
            namespace: "team-a".into(),
            name: "bot".into(),
            scopes: vec!["deploy".into(), "read".into()],
            audiences: vec!["https://api.internal".into()],
            lifetime: std::time::Duration::from_secs(600),
            ..Default::default()
        };
        for (pem, alg) in keys {
            let key = load_key(&pem).unwrap();
            assert_eq!(key.algorithm, alg);
            let mut header = Header::new(alg);
            header.kid = key.jwk.common.key_id.clone();
            let now = Timestamp::now();
            let token = jsonwebtoken::encode(
                &header,
                &claims(&spec, &req, now, "j1").unwrap(),
                &key.encoding,
            )
            .unwrap();
            // Verify with nothing but the published JWK.
            let published: Jwk =
                serde_json::from_str(&serde_json::to_string(&key.jwk).unwrap()).unwrap();
            let dk = jsonwebtoken::DecodingKey::from_jwk(&published).unwrap();
            let mut v = jsonwebtoken::Validation::new(alg);
            v.set_audience(&["https://api.internal"]);
            v.set_issuer(&["https://agents.example"]);
            let data = jsonwebtoken::decode::<Value>(&token, &dk, &v).unwrap();
            assert_eq!(data.claims["sub"], "team-a/bot");
            assert_eq!(data.claims["scope"], "deploy read");
            assert_eq!(
                data.claims["exp"].as_i64().unwrap() - data.claims["iat"].as_i64().unwrap(),
                600
            );
            assert_eq!(data.header.kid, key.jwk.common.key_id);
        }
        assert!(load_key("not a key").is_err());
    }

    #[test]
    fn jwks_keeps_previous_keys_across_a_rotation() {
        let a = load_key(&openssl_key(&["genpkey", "-algorithm", "ED25519"])).unwrap();
        let b = load_key(&openssl_key(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ]))
        .unwrap();
        let (first, changed) = merge_jwks(None, &a.jwk);
        assert!(changed);
        let (same, changed) = merge_jwks(Some(&first), &a.jwk);
        assert!(!changed);
        assert_eq!(same, first);
        let (second, changed) = merge_jwks(Some(&first), &b.jwk);
        assert!(changed);
        let v: Value = serde_json::from_str(&second).unwrap();
        let kids: Vec<&str> = v["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap())
            .collect();
        assert_eq!(
            kids,
            vec![
                b.jwk.common.key_id.as_deref().unwrap(),
                a.jwk.common.key_id.as_deref().unwrap()
            ]
        );
        assert!(!second.contains("\"d\""), "no private part is published");
    }

    #[test]
    fn a_lifetime_beyond_any_timestamp_is_refused_not_wrapped() {
        let spec = JwtIssuerSpec::default();
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        for secs in [u64::MAX, i64::MAX as u64 + 1, i64::MAX as u64, 1 << 40] {
            let req = MintRequest {
                lifetime: std::time::Duration::from_secs(secs),
                ..Default::default()
            };
            let e = expiry(now, req.lifetime).unwrap_err();
            assert!(!e.is_transient(), "a spec problem: {e}");
            assert!(e.to_string().contains("beyond any time"), "{e}");
            assert!(claims(&spec, &req, now, "j").is_err());
        }
        let zero = MintRequest::default();
        assert!(expiry(now, zero.lifetime).is_err());
        assert!(claims(&spec, &zero, now, "j").is_err());
        let hour = MintRequest {
            lifetime: std::time::Duration::from_secs(3600),
            ..Default::default()
        };
        let c = claims(&spec, &hour, now, "j").unwrap();
        assert_eq!(c["exp"], 1_800_003_600);
        assert_eq!(
            expiry(now, hour.lifetime).unwrap(),
            Timestamp::from_second(1_800_003_600).unwrap()
        );
    }
}

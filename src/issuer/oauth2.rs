//! The OAuth2 issuer: the client credentials grant (RFC 6749 §4.4) with
//! `client_secret_basic` or `client_secret_post`, scopes and audience;
//! expiry from `expires_in`, else from the `exp` claim of a JWT access
//! token; revocation by RFC 7009 when `revocationURL` is set.
//!
//! RFC 7009 revokes by the token itself, so revocation needs the token the
//! Secret holds; the revocation handle is only its fingerprint.

use base64::Engine;
use futures::FutureExt;
use futures::future::BoxFuture;
use jiff::Timestamp;
use kube::Client;
use secrecy::{ExposeSecret, SecretString};

use super::{Issuer, IssuerError, MintRequest, MintedToken, Revocation, RevocationHandle, web};
use crate::crd::{OAuth2AuthMethod, OAuth2IssuerSpec};
use crate::rotation;

/// Mints with client credentials.
pub struct OAuth2Issuer {
    kube: Client,
    spec: OAuth2IssuerSpec,
    /// Where `clientSecretRef` lives.
    secret_namespace: String,
}

impl OAuth2Issuer {
    pub fn new(kube: Client, spec: OAuth2IssuerSpec, secret_namespace: String) -> Self {
        OAuth2Issuer {
            kube,
            spec,
            secret_namespace,
        }
    }

    async fn secret(&self) -> Result<SecretString, IssuerError> {
        web::read_secret(
            &self.kube,
            &self.secret_namespace,
            &self.spec.client_secret_ref,
            "oauth2.clientSecretRef",
        )
        .await
    }

    /// Adds client authentication to a form request.
    fn authenticate(
        &self,
        rb: reqwest::RequestBuilder,
        form: &mut Vec<(String, String)>,
        secret: &SecretString,
    ) -> reqwest::RequestBuilder {
        match self.spec.auth_method.unwrap_or_default() {
            OAuth2AuthMethod::ClientSecretBasic => {
                // RFC 6749 §2.3.1: form-urlencode both parts first.
                let enc = |s: &str| form_urlencoded(s);
                rb.basic_auth(enc(&self.spec.client_id), Some(enc(secret.expose_secret())))
            }
            OAuth2AuthMethod::ClientSecretPost => {
                form.push(("client_id".into(), self.spec.client_id.clone()));
                form.push(("client_secret".into(), secret.expose_secret().to_string()));
                rb
            }
        }
    }

    async fn mint_inner(&self, req: &MintRequest) -> Result<MintedToken, IssuerError> {
        let http = web::client(self.spec.ca_bundle.as_deref(), self.spec.timeout)?;
        let secret = self.secret().await?;
        let mut base = vec![("grant_type".to_string(), "client_credentials".to_string())];
        if !req.scopes.is_empty() {
            base.push(("scope".into(), req.scopes.join(" ")));
        }
        for aud in &req.audiences {
            base.push(("audience".into(), aud.clone()));
        }
        if let Some(resource) = req.parameters.get("resource") {
            base.push(("resource".into(), resource.clone()));
        }
        let issued_at = Timestamp::now();
        let reply = web::send("token request", || {
            let mut form = base.clone();
            let rb = self.authenticate(http.post(&self.spec.token_url), &mut form, &secret);
            rb.form(&form)
        })
        .await?;
        if reply.status >= 400 {
            let msg = format!("token request refused: {}", reply.describe());
            // 400/401/403: the configuration or the request is wrong.
            return Err(if (400..500).contains(&reply.status) {
                IssuerError::Invalid(msg)
            } else {
                IssuerError::Unavailable(msg)
            });
        }
        let body: serde_json::Value = serde_json::from_slice(&reply.body).map_err(|_| {
            IssuerError::Unavailable(format!(
                "token response (HTTP {}) is not JSON",
                reply.status
            ))
        })?;
        let token = body
            .get("access_token")
            .and_then(|t| t.as_str())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| IssuerError::Unavailable("token response has no access_token".into()))?
            .to_string();
        let expires_at = match body.get("expires_in").and_then(expires_in_seconds) {
            Some(secs) if secs > 0 => issued_at
                .checked_add(jiff::SignedDuration::from_secs(secs))
                .map_err(|_| IssuerError::Unavailable("expires_in is out of range".into()))?,
            _ => jwt_exp(&token).ok_or_else(|| {
                IssuerError::Unavailable(
                    "token response has no expires_in and the token is not a JWT with exp: \
                     refusing a token whose expiry is unknown"
                        .into(),
                )
            })?,
        };
        if expires_at <= issued_at {
            return Err(IssuerError::Unavailable(
                "the issuer returned an already expired token".into(),
            ));
        }
        let fingerprint = rotation::fingerprint(token.as_bytes());
        Ok(MintedToken {
            token: SecretString::from(token),
            issued_at,
            expires_at,
            handle: RevocationHandle(format!("oauth2:{fingerprint}")),
        })
    }

    async fn revoke_inner(&self, token: Option<&SecretString>) -> Result<Revocation, IssuerError> {
        let Some(url) = self.spec.revocation_url.as_deref() else {
            return Ok(Revocation::NotSupported);
        };
        let Some(token) = token else {
            return Err(IssuerError::Unavailable(
                "the token is no longer held, so RFC 7009 revocation is impossible; it dies at its expiry"
                    .into(),
            ));
        };
        let http = web::client(self.spec.ca_bundle.as_deref(), self.spec.timeout)?;
        let secret = self.secret().await?;
        let reply = web::send("revocation request", || {
            let mut form = vec![
                ("token".to_string(), token.expose_secret().to_string()),
                ("token_type_hint".to_string(), "access_token".to_string()),
            ];
            let rb = self.authenticate(http.post(url), &mut form, &secret);
            rb.form(&form)
        })
        .await?;
        // RFC 7009 §2.2: 200 also for an invalid or already revoked token.
        match reply.status {
            200..=299 => Ok(Revocation::Revoked),
            s if s == 400
                && serde_json::from_slice::<serde_json::Value>(&reply.body)
                    .ok()
                    .and_then(|j| j.get("error").and_then(|e| e.as_str()).map(String::from))
                    .as_deref()
                    == Some("unsupported_token_type") =>
            {
                Ok(Revocation::NotSupported)
            }
            _ => Err(IssuerError::Unavailable(format!(
                "revocation refused: {}",
                reply.describe()
            ))),
        }
    }

    async fn check_inner(&self) -> Result<(), IssuerError> {
        let http = web::client(self.spec.ca_bundle.as_deref(), self.spec.timeout)?;
        self.secret().await?;
        web::probe(http.get(&self.spec.token_url), "token endpoint").await
    }
}

impl Issuer for OAuth2Issuer {
    fn kind(&self) -> &'static str {
        "oauth2"
    }

    fn mint<'a>(&'a self, req: &'a MintRequest) -> BoxFuture<'a, Result<MintedToken, IssuerError>> {
        self.mint_inner(req).boxed()
    }

    fn revoke<'a>(
        &'a self,
        _namespace: &'a str,
        _handle: &'a RevocationHandle,
        token: Option<&'a SecretString>,
    ) -> BoxFuture<'a, Result<Revocation, IssuerError>> {
        self.revoke_inner(token).boxed()
    }

    fn check(&self) -> BoxFuture<'_, Result<(), IssuerError>> {
        self.check_inner().boxed()
    }
}

fn expires_in_seconds(v: &serde_json::Value) -> Option<i64> {
    // Some servers send a string.
    v.as_i64()
        .or_else(|| v.as_f64().map(|f| f as i64))
        .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
}

/// The `exp` claim of a JWT, read without verifying it (the issuer's word
/// on its own token's lifetime; the token is not trusted for anything else).
pub fn jwt_exp(token: &str) -> Option<Timestamp> {
    let mut parts = token.split('.');
    let (_, payload, _) = (parts.next()?, parts.next()?, parts.next()?);
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Timestamp::from_second(claims.get("exp")?.as_i64()?).ok()
}

fn form_urlencoded(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwt_exp_is_read_from_the_payload() {
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(br#"{"sub":"x","exp":1900000000}"#);
        let token = format!("eyJhbGciOiJub25lIn0.{payload}.sig");
        assert_eq!(
            jwt_exp(&token),
            Some(Timestamp::from_second(1_900_000_000).unwrap())
        );
        assert_eq!(jwt_exp("opaque-token"), None);
        assert_eq!(jwt_exp("a.b.c"), None);
    }

    #[test]
    fn basic_credentials_are_form_encoded_first() {
        assert_eq!(form_urlencoded("a b:c/d"), "a+b%3Ac%2Fd");
        assert_eq!(form_urlencoded("agent-fleet_1.x"), "agent-fleet_1.x");
    }

    #[test]
    fn expires_in_may_be_a_number_or_a_string() {
        assert_eq!(expires_in_seconds(&serde_json::json!(600)), Some(600));
        assert_eq!(expires_in_seconds(&serde_json::json!("600")), Some(600));
        assert_eq!(expires_in_seconds(&serde_json::json!(null)), None);
    }
}

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

use super::{
    Issuer, IssuerError, MintRequest, MintedToken, Revocation, RevocationHandle, after_issue,
    expiry_after, granted_seconds, web,
};
use crate::crd::{OAuth2AuthMethod, OAuth2IssuerSpec};
use crate::rotation;

/// Mints with client credentials.
pub struct OAuth2Issuer {
    kube: Client,
    spec: OAuth2IssuerSpec,
    /// Where `clientSecretRef` lives.
    secret_namespace: String,
    /// Where its HTTP requests may go.
    egress: web::Egress,
}

impl OAuth2Issuer {
    pub fn new(
        kube: Client,
        spec: OAuth2IssuerSpec,
        secret_namespace: String,
        egress: web::Egress,
    ) -> Self {
        OAuth2Issuer {
            kube,
            spec,
            secret_namespace,
            egress,
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
        let http = web::client(
            self.spec.ca_bundle.as_deref(),
            self.spec.timeout.as_ref(),
            &self.egress,
        )?;
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
        let reply = web::send_creating(
            "token request",
            self.spec.timeout.as_ref(),
            &self.egress,
            || {
                let mut form = base.clone();
                let rb = self.authenticate(http.post(&self.spec.token_url), &mut form, &secret);
                rb.form(&form)
            },
        )
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
        if reply.status >= 300 {
            return Err(IssuerError::Invalid(format!(
                "token request answered HTTP {}: redirects are not followed",
                reply.status
            )));
        }
        read_token(&reply, issued_at).map_err(IssuerError::after_success)
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
        let http = web::client(
            self.spec.ca_bundle.as_deref(),
            self.spec.timeout.as_ref(),
            &self.egress,
        )?;
        let secret = self.secret().await?;
        let reply = web::send(
            "revocation request",
            self.spec.timeout.as_ref(),
            &self.egress,
            || {
                let mut form = vec![
                    ("token".to_string(), token.expose_secret().to_string()),
                    ("token_type_hint".to_string(), "access_token".to_string()),
                ];
                let rb = self.authenticate(http.post(url), &mut form, &secret);
                rb.form(&form)
            },
        )
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

    /// RFC 7662: whether the provider says `token` is no longer active.
    async fn refuses_inner(&self, token: &SecretString) -> Result<bool, String> {
        let Some(url) = self.spec.introspection_url.as_deref() else {
            return Err("the oauth2 issuer sets no introspectionURL".into());
        };
        let http = web::client(
            self.spec.ca_bundle.as_deref(),
            self.spec.timeout.as_ref(),
            &self.egress,
        )
        .map_err(|e| e.to_string())?;
        let secret = self.secret().await.map_err(|e| e.to_string())?;
        let reply = web::send(
            "introspection request",
            self.spec.timeout.as_ref(),
            &self.egress,
            || {
                let mut form = vec![
                    ("token".to_string(), token.expose_secret().to_string()),
                    ("token_type_hint".to_string(), "access_token".to_string()),
                ];
                let rb = self.authenticate(http.post(url), &mut form, &secret);
                rb.form(&form)
            },
        )
        .await
        .map_err(|e| e.to_string())?;
        web::introspection_answer(&reply)
    }

    async fn check_inner(&self) -> Result<(), IssuerError> {
        let http = web::client(
            self.spec.ca_bundle.as_deref(),
            self.spec.timeout.as_ref(),
            &self.egress,
        )?;
        self.secret().await?;
        web::probe(
            http.get(&self.spec.token_url),
            "token endpoint",
            &self.egress,
        )
        .await
    }
}

impl Issuer for OAuth2Issuer {
    fn kind(&self) -> &'static str {
        "oauth2"
    }

    fn refuses<'a>(&'a self, token: &'a SecretString) -> BoxFuture<'a, Result<bool, String>> {
        self.refuses_inner(token).boxed()
    }

    fn refusal_check(&self) -> &'static str {
        "RFC 7662 introspection"
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

/// The expiry of a token response received at `issued_at`: from
/// `expires_in` (a number or a numeric string, RFC 6749 §5.1), else from the
/// `exp` claim of a JWT access token. A present but unreadable, non-positive
/// or absurdly large `expires_in` is an error, never a fallback.
fn token_expiry(
    issued_at: Timestamp,
    body: &serde_json::Value,
    token: &str,
) -> Result<Timestamp, IssuerError> {
    let expires_in = body.get("expires_in").filter(|v| !v.is_null());
    let expires_at = match expires_in {
        Some(v) => {
            let secs = granted_seconds(v)?.ok_or_else(|| {
                IssuerError::Unavailable(
                    "the token response's expires_in is not a number of seconds".into(),
                )
            })?;
            expiry_after(issued_at, secs)?
        }
        None => jwt_exp(token).ok_or_else(|| {
            IssuerError::Unavailable(
                "token response has no expires_in and the token is not a JWT with exp: \
                 refusing a token whose expiry is unknown"
                    .into(),
            )
        })?,
    };
    after_issue(issued_at, expires_at)
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

/// The token in a success answer to a token request.
fn read_token(reply: &web::Reply, issued_at: Timestamp) -> Result<MintedToken, IssuerError> {
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
    let expires_at = token_expiry(issued_at, &body, &token)?;
    let fingerprint = rotation::fingerprint(token.as_bytes());
    Ok(MintedToken {
        token: SecretString::from(token),
        issued_at,
        expires_at,
        handle: RevocationHandle(format!("oauth2:{fingerprint}")),
        audit_id: None,
    })
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

    fn at() -> Timestamp {
        Timestamp::from_second(1_800_000_000).unwrap()
    }

    fn jwt_with_exp(exp: serde_json::Value) -> String {
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(serde_json::json!({ "exp": exp }).to_string());
        format!("eyJhbGciOiJub25lIn0.{payload}.sig")
    }

    #[test]
    fn expires_in_may_be_a_number_or_a_string() {
        for v in [
            serde_json::json!(600),
            serde_json::json!("600"),
            serde_json::json!(600.5),
        ] {
            let body = serde_json::json!({ "expires_in": v });
            assert_eq!(
                token_expiry(at(), &body, "opaque").unwrap(),
                Timestamp::from_second(1_800_000_600).unwrap(),
                "{v}"
            );
        }
        let body = serde_json::json!({ "expires_in": null });
        let token = jwt_with_exp(serde_json::json!(1_800_000_900));
        assert_eq!(
            token_expiry(at(), &body, &token).unwrap(),
            Timestamp::from_second(1_800_000_900).unwrap()
        );
    }

    #[test]
    fn an_expires_in_that_is_not_positive_is_an_already_expired_grant() {
        // Even when the token is a JWT with a future exp: the issuer said so.
        let token = jwt_with_exp(serde_json::json!(1_800_000_900));
        for v in [
            serde_json::json!(0),
            serde_json::json!(-1),
            serde_json::json!("-3600"),
            serde_json::json!(0.4),
        ] {
            let body = serde_json::json!({ "expires_in": v });
            let e = token_expiry(at(), &body, &token).unwrap_err();
            assert!(e.to_string().contains("already expired"), "{v}: {e}");
            assert!(e.is_transient());
        }
    }

    #[test]
    fn a_huge_or_garbage_expires_in_is_an_error_not_a_panic() {
        for v in [
            serde_json::json!(u64::MAX),
            serde_json::json!(i64::MAX),
            serde_json::json!(1e300),
            serde_json::json!("99999999999999999999"),
            serde_json::json!(999_999_999_999_i64),
        ] {
            let body = serde_json::json!({ "expires_in": v });
            let e = token_expiry(at(), &body, "opaque").unwrap_err();
            assert!(e.to_string().contains("cannot represent"), "{v}: {e}");
        }
        for v in [
            serde_json::json!("NaN"),
            serde_json::json!("inf"),
            serde_json::json!("soon"),
            serde_json::json!({}),
        ] {
            let body = serde_json::json!({ "expires_in": v });
            let e = token_expiry(at(), &body, "opaque").unwrap_err();
            assert!(e.to_string().contains("not a number"), "{v}: {e}");
        }
    }

    #[test]
    fn a_jwt_exp_in_the_past_or_out_of_range_is_refused() {
        let body = serde_json::json!({});
        for exp in [serde_json::json!(1_000), serde_json::json!(1_800_000_000)] {
            let e = token_expiry(at(), &body, &jwt_with_exp(exp)).unwrap_err();
            assert!(e.to_string().contains("already expired"), "{e}");
        }
        for exp in [
            serde_json::json!(i64::MAX),
            serde_json::json!(u64::MAX),
            serde_json::json!(1e300),
            serde_json::json!("1900000000"),
        ] {
            assert!(token_expiry(at(), &body, &jwt_with_exp(exp)).is_err());
        }
    }
}

//! The GitHub App issuer: an App JWT (RS256, signed with the App's private
//! key) is exchanged for an installation access token scoped to the
//! AgentToken's `permissions` and `repositories`
//! (`POST /app/installations/{id}/access_tokens`). The expiry is the
//! response's `expires_at`; revocation is `DELETE /installation/token`,
//! authenticated with the token itself.

use futures::FutureExt;
use futures::future::BoxFuture;
use jiff::Timestamp;
use kube::Client;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};

use super::{
    Issuer, IssuerError, MintRequest, MintedToken, Revocation, RevocationHandle, after_issue, web,
};
use crate::crd::GithubAppIssuerSpec;
use crate::rotation;

/// GitHub's API when `apiURL` is not set.
pub const DEFAULT_API: &str = "https://api.github.com";
/// GitHub accepts App JWTs valid for at most 10 minutes.
const JWT_LIFETIME_SECS: i64 = 540;

/// Mints GitHub installation tokens.
pub struct GithubAppIssuer {
    kube: Client,
    spec: GithubAppIssuerSpec,
    secret_namespace: String,
    /// Where its HTTP requests may go.
    egress: web::Egress,
}

impl GithubAppIssuer {
    pub fn new(
        kube: Client,
        spec: GithubAppIssuerSpec,
        secret_namespace: String,
        egress: web::Egress,
    ) -> Self {
        GithubAppIssuer {
            kube,
            spec,
            secret_namespace,
            egress,
        }
    }

    fn api(&self, path: &str) -> String {
        format!(
            "{}{path}",
            self.spec
                .api_url
                .as_deref()
                .unwrap_or(DEFAULT_API)
                .trim_end_matches('/')
        )
    }

    /// The App JWT: `iss` = App id, backdated 60 s for clock drift.
    async fn app_jwt(&self) -> Result<SecretString, IssuerError> {
        let pem = web::read_secret(
            &self.kube,
            &self.secret_namespace,
            &self.spec.private_key_secret_ref,
            "githubApp.privateKeySecretRef",
        )
        .await?;
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(pem.expose_secret().as_bytes()).map_err(
            |_| {
                IssuerError::Invalid(
                    "githubApp.privateKeySecretRef does not hold an RSA private key in PEM".into(),
                )
            },
        )?;
        let now = Timestamp::now().as_second();
        let claims = json!({
            "iss": self.spec.app_id.to_string(),
            "iat": now - 60,
            "exp": now + JWT_LIFETIME_SECS,
        });
        let jwt = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
            &claims,
            &key,
        )
        .map_err(|e| IssuerError::Invalid(format!("cannot sign the App JWT: {e}")))?;
        Ok(SecretString::from(jwt))
    }

    async fn request(
        &self,
        what: &str,
        method: reqwest::Method,
        path: &str,
        auth: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), IssuerError> {
        let http = web::client(
            self.spec.ca_bundle.as_deref(),
            self.spec.timeout.as_ref(),
            &self.egress,
        )?;
        let url = self.api(path);
        // A POST creates an installation token: never sent twice blind.
        let creates = method == reqwest::Method::POST;
        let reply = web::send_maybe_creating(
            what,
            self.spec.timeout.as_ref(),
            &self.egress,
            creates,
            || {
                let rb = http
                    .request(method.clone(), &url)
                    .header("Accept", "application/vnd.github+json")
                    .header("X-GitHub-Api-Version", "2022-11-28")
                    .header("Authorization", auth);
                match body {
                    Some(b) => rb.json(b),
                    None => rb,
                }
            },
        )
        .await?;
        let json = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
        if reply.status >= 400 {
            let message = json["message"]
                .as_str()
                .map(|m| web::excerpt(m, 200))
                .unwrap_or_default();
            let msg = format!("{what} refused: HTTP {}: {message}", reply.status);
            return Err(if reply.status < 500 {
                IssuerError::Invalid(msg)
            } else {
                IssuerError::Unavailable(msg)
            });
        }
        Ok((reply.status, json))
    }

    async fn installation(&self, jwt: &SecretString) -> Result<i64, IssuerError> {
        if let Some(id) = self.spec.installation_id {
            return Ok(id);
        }
        let auth = format!("Bearer {}", jwt.expose_secret());
        let (_, list) = self
            .request(
                "installation list",
                reqwest::Method::GET,
                "/app/installations",
                &auth,
                None,
            )
            .await?;
        let ids: Vec<i64> = list
            .as_array()
            .map(|a| a.iter().filter_map(|i| i["id"].as_i64()).collect())
            .unwrap_or_default();
        match ids.as_slice() {
            [one] => Ok(*one),
            [] => Err(IssuerError::Invalid("the App has no installation".into())),
            _ => Err(IssuerError::Invalid(format!(
                "the App has {} installations: set githubApp.installationID on the issuer",
                ids.len()
            ))),
        }
    }

    async fn mint_inner(&self, req: &MintRequest) -> Result<MintedToken, IssuerError> {
        // Checked by policy first; here too, since leaving either out asks
        // GitHub for every permission on every repository.
        if req.permissions.is_empty() {
            return Err(IssuerError::Invalid(
                "spec.permissions is required: without it the token has every permission of the installation".into(),
            ));
        }
        let jwt = self.app_jwt().await?;
        let installation = self.installation(&jwt).await?;
        let mut body = serde_json::Map::new();
        if !req.repositories.is_empty() {
            body.insert("repositories".into(), json!(req.repositories));
        }
        if !req.permissions.is_empty() {
            body.insert("permissions".into(), json!(req.permissions));
        }
        let issued_at = Timestamp::now();
        let auth = format!("Bearer {}", jwt.expose_secret());
        let (_, reply) = self
            .request(
                "installation token request",
                reqwest::Method::POST,
                &format!("/app/installations/{installation}/access_tokens"),
                &auth,
                Some(&Value::Object(body)),
            )
            .await?;
        let token = reply["token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| IssuerError::Unavailable("the response has no token".into()))
            .map_err(IssuerError::after_success)?
            .to_string();
        let expires_at =
            installation_token_expiry(issued_at, &reply).map_err(IssuerError::after_success)?;
        let fp = rotation::fingerprint(token.as_bytes());
        Ok(MintedToken {
            token: SecretString::from(token),
            issued_at,
            expires_at,
            handle: RevocationHandle(format!("github-installation:{installation}:{fp}")),
            audit_id: None,
        })
    }

    async fn revoke_inner(&self, token: Option<&SecretString>) -> Result<Revocation, IssuerError> {
        let Some(token) = token else {
            return Err(IssuerError::Unavailable(
                "the token is no longer held, so it cannot be revoked; it dies at its expiry"
                    .into(),
            ));
        };
        let auth = format!("Bearer {}", token.expose_secret());
        match self
            .request(
                "token revocation",
                reqwest::Method::DELETE,
                "/installation/token",
                &auth,
                None,
            )
            .await
        {
            Ok(_) => Ok(Revocation::Revoked),
            // 401: the token is already invalid.
            Err(IssuerError::Invalid(m)) if m.contains("HTTP 401") => Ok(Revocation::Revoked),
            Err(e) => Err(e),
        }
    }

    async fn check_inner(&self) -> Result<(), IssuerError> {
        let jwt = self.app_jwt().await?;
        let auth = format!("Bearer {}", jwt.expose_secret());
        self.request("App lookup", reqwest::Method::GET, "/app", &auth, None)
            .await
            .map(|_| ())
    }
}

/// The `expires_at` (RFC 3339) of an installation token response received
/// at `issued_at`; it must be after `issued_at`.
fn installation_token_expiry(
    issued_at: Timestamp,
    reply: &Value,
) -> Result<Timestamp, IssuerError> {
    let expires_at = reply["expires_at"]
        .as_str()
        .and_then(|s| s.trim().parse::<Timestamp>().ok())
        .ok_or_else(|| {
            IssuerError::Unavailable(
                "the response has no RFC 3339 expires_at: refusing a token whose expiry is unknown"
                    .into(),
            )
        })?;
    after_issue(issued_at, expires_at)
}

impl Issuer for GithubAppIssuer {
    fn kind(&self) -> &'static str {
        "githubApp"
    }

    /// `GET /installation/repositories` with the token itself: 401 once it
    /// is revoked (a read that changes nothing).
    fn refuses<'a>(&'a self, token: &'a SecretString) -> BoxFuture<'a, Result<bool, String>> {
        async move {
            let auth = format!("Bearer {}", token.expose_secret());
            match self
                .request(
                    "installation repositories",
                    reqwest::Method::GET,
                    "/installation/repositories?per_page=1",
                    &auth,
                    None,
                )
                .await
            {
                Ok(_) => Ok(false),
                Err(IssuerError::Invalid(m)) if m.contains("HTTP 401") => Ok(true),
                // Not GitHub's message: it was shown the token.
                Err(_) => Err("GET /installation/repositories failed".into()),
            }
        }
        .boxed()
    }

    fn refusal_check(&self) -> &'static str {
        "GitHub GET /installation/repositories"
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

#[cfg(test)]
mod tests {
    use super::*;

    fn at() -> Timestamp {
        "2026-01-01T00:00:00Z".parse().unwrap()
    }

    #[test]
    fn expires_at_is_the_expiry() {
        assert_eq!(
            installation_token_expiry(at(), &json!({"expires_at": "2026-01-01T01:00:00Z"}))
                .unwrap(),
            "2026-01-01T01:00:00Z".parse::<Timestamp>().unwrap()
        );
    }

    #[test]
    fn a_past_missing_or_absurd_expires_at_is_refused() {
        for v in [json!("2025-12-31T23:00:00Z"), json!("2026-01-01T00:00:00Z")] {
            let e = installation_token_expiry(at(), &json!({ "expires_at": v })).unwrap_err();
            assert!(e.to_string().contains("already expired"), "{v}: {e}");
        }
        for v in [
            json!(null),
            json!(1_900_000_000),
            json!("tomorrow"),
            json!("99999-01-01T00:00:00Z"),
            json!("2026-13-01T00:00:00Z"),
            json!("+999999999-01-01T00:00:00Z"),
            json!(""),
        ] {
            let e = installation_token_expiry(at(), &json!({ "expires_at": v })).unwrap_err();
            assert!(e.to_string().contains("no RFC 3339 expires_at"), "{v}: {e}");
        }
        assert!(installation_token_expiry(at(), &json!([1, 2])).is_err());
    }
}

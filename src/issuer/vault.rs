//! The Vault / OpenBao issuer. Two modes, picked by the AgentToken's
//! `parameters`:
//!
//! - child token (default): `auth/token/create` with the AgentToken's
//!   `scopes` as policies and its lifetime as TTL, orphaned (`no_parent`)
//!   so it does not die with the operator's own token; revoked by accessor
//!   (`auth/token/revoke-accessor`), which is not a secret.
//! - dynamic secret: `parameters.path` (e.g. `database/creds/agent`), with
//!   optional `method` (GET), `body` (JSON) and `tokenField` (the key of
//!   `data` that is the credential, default `token`); its lease is revoked
//!   (`sys/leases/revoke`).
//!
//! The lease duration Vault grants is the token's real expiry.

use futures::FutureExt;
use futures::future::BoxFuture;
use jiff::Timestamp;
use kube::Client;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};

use super::{Issuer, IssuerError, MintRequest, MintedToken, Revocation, RevocationHandle, web};
use crate::crd::VaultIssuerSpec;

const ACCESSOR: &str = "vault-accessor:";
const LEASE: &str = "vault-lease:";

/// Mints from Vault or OpenBao.
pub struct VaultIssuer {
    kube: Client,
    spec: VaultIssuerSpec,
    secret_namespace: String,
}

impl VaultIssuer {
    pub fn new(kube: Client, spec: VaultIssuerSpec, secret_namespace: String) -> Self {
        VaultIssuer {
            kube,
            spec,
            secret_namespace,
        }
    }

    async fn operator_token(&self) -> Result<SecretString, IssuerError> {
        let r =
            self.spec.auth.token_secret_ref.as_ref().ok_or_else(|| {
                IssuerError::Invalid("vault.auth.tokenSecretRef is required".into())
            })?;
        web::read_secret(
            &self.kube,
            &self.secret_namespace,
            r,
            "vault.auth.tokenSecretRef",
        )
        .await
    }

    fn url(&self, path: &str) -> String {
        format!(
            "{}/v1/{}",
            self.spec.address.trim_end_matches('/'),
            path.trim_start_matches('/')
        )
    }

    /// One call to Vault; `Ok((status, json))` for any HTTP answer below 500.
    async fn call(
        &self,
        what: &str,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), IssuerError> {
        let http = web::client(self.spec.ca_bundle.as_deref(), self.spec.timeout)?;
        let token = self.operator_token().await?;
        let url = self.url(path);
        let reply = web::send(what, || {
            let rb = match method {
                "GET" => http.get(&url),
                "PUT" => http.put(&url),
                _ => http.post(&url),
            };
            let rb = rb.header("X-Vault-Token", token.expose_secret());
            let rb = match &self.spec.namespace {
                Some(ns) if !ns.is_empty() => rb.header("X-Vault-Namespace", ns),
                _ => rb,
            };
            match body {
                Some(b) => rb.json(b),
                None => rb,
            }
        })
        .await?;
        let json = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
        Ok((reply.status, json))
    }

    fn refused(what: &str, status: u16, json: &Value) -> IssuerError {
        // Vault's `errors` are messages about the request, not secrets.
        let errors = json["errors"]
            .as_array()
            .map(|e| {
                e.iter()
                    .filter_map(|m| m.as_str())
                    .map(|m| m.chars().take(200).collect::<String>())
                    .collect::<Vec<_>>()
                    .join("; ")
            })
            .unwrap_or_default();
        let msg = format!("{what} refused: HTTP {status}: {errors}");
        if status == 403 || status == 400 || status == 404 {
            IssuerError::Invalid(msg)
        } else {
            IssuerError::Unavailable(msg)
        }
    }

    async fn mint_inner(&self, req: &MintRequest) -> Result<MintedToken, IssuerError> {
        let issued_at = Timestamp::now();
        let (secret, seconds, handle) = match req.parameters.get("path") {
            Some(path) => self.mint_dynamic(path, req).await?,
            None => self.mint_child(req).await?,
        };
        if seconds <= 0 {
            return Err(IssuerError::Unavailable(
                "Vault granted no lease duration: refusing a credential whose expiry is unknown"
                    .into(),
            ));
        }
        Ok(MintedToken {
            token: SecretString::from(secret),
            issued_at,
            expires_at: issued_at + jiff::SignedDuration::from_secs(seconds),
            handle: RevocationHandle(handle),
        })
    }

    async fn mint_child(&self, req: &MintRequest) -> Result<(String, i64, String), IssuerError> {
        let body = json!({
            "policies": req.scopes,
            "ttl": format!("{}s", req.lifetime.as_secs()),
            "explicit_max_ttl": format!("{}s", req.lifetime.as_secs()),
            "no_parent": true,
            "renewable": false,
            "display_name": format!("agenttoken-{}-{}", req.namespace, req.name),
            "meta": {
                "agenttoken": format!("{}/{}", req.namespace, req.name),
                "revision": req.revision.to_string(),
            },
        });
        let (status, json) = self
            .call("token create", "POST", "auth/token/create", Some(&body))
            .await?;
        if status >= 300 {
            return Err(Self::refused("token create", status, &json));
        }
        let auth = &json["auth"];
        let token = auth["client_token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                IssuerError::Unavailable("token create returned no client_token".into())
            })?;
        let accessor = auth["accessor"]
            .as_str()
            .ok_or_else(|| IssuerError::Unavailable("token create returned no accessor".into()))?;
        let seconds = auth["lease_duration"].as_i64().unwrap_or(0);
        Ok((token.to_string(), seconds, format!("{ACCESSOR}{accessor}")))
    }

    async fn mint_dynamic(
        &self,
        path: &str,
        req: &MintRequest,
    ) -> Result<(String, i64, String), IssuerError> {
        let method = req
            .parameters
            .get("method")
            .map(|m| m.to_uppercase())
            .unwrap_or_else(|| "GET".into());
        let body =
            match req.parameters.get("body") {
                Some(b) => Some(serde_json::from_str::<Value>(b).map_err(|e| {
                    IssuerError::Invalid(format!("parameters.body is not JSON: {e}"))
                })?),
                None => None,
            };
        let field = req
            .parameters
            .get("tokenField")
            .map(String::as_str)
            .unwrap_or("token");
        let (status, json) = self
            .call("dynamic secret read", &method, path, body.as_ref())
            .await?;
        if status >= 300 {
            return Err(Self::refused("dynamic secret read", status, &json));
        }
        let secret = json["data"][field]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                IssuerError::Invalid(format!(
                    "{path} returned no string data.{field} (set parameters.tokenField)"
                ))
            })?;
        let lease = json["lease_id"]
            .as_str()
            .filter(|l| !l.is_empty())
            .ok_or_else(|| {
                IssuerError::Invalid(format!(
                    "{path} returned no lease: it is not a dynamic secret the operator can revoke"
                ))
            })?;
        let seconds = json["lease_duration"].as_i64().unwrap_or(0);
        Ok((secret.to_string(), seconds, format!("{LEASE}{lease}")))
    }

    async fn revoke_inner(&self, handle: &RevocationHandle) -> Result<Revocation, IssuerError> {
        let (what, path, body) = if let Some(a) = handle.0.strip_prefix(ACCESSOR) {
            (
                "revoke-accessor",
                "auth/token/revoke-accessor",
                json!({"accessor": a}),
            )
        } else if let Some(l) = handle.0.strip_prefix(LEASE) {
            ("lease revoke", "sys/leases/revoke", json!({"lease_id": l}))
        } else {
            return Ok(Revocation::NotSupported);
        };
        let method = if path == "sys/leases/revoke" {
            "PUT"
        } else {
            "POST"
        };
        let (status, json) = self.call(what, method, path, Some(&body)).await?;
        match status {
            200..=299 => Ok(Revocation::Revoked),
            // Already gone: an unknown accessor or lease.
            400 if json.to_string().contains("invalid accessor")
                || json.to_string().contains("invalid lease") =>
            {
                Ok(Revocation::Revoked)
            }
            _ => Err(Self::refused(what, status, &json)),
        }
    }

    async fn check_inner(&self) -> Result<(), IssuerError> {
        let (status, json) = match self
            .call("token lookup-self", "GET", "auth/token/lookup-self", None)
            .await
        {
            Ok(r) => r,
            Err(IssuerError::Unavailable(m)) => {
                return Err(IssuerError::Unavailable(format!("Vault unreachable: {m}")));
            }
            Err(e) => return Err(e),
        };
        match status {
            200..=299 => Ok(()),
            403 => Err(IssuerError::Invalid(
                "the token in vault.auth.tokenSecretRef is not valid (HTTP 403 on lookup-self)"
                    .into(),
            )),
            _ => Err(Self::refused("token lookup-self", status, &json)),
        }
    }
}

impl Issuer for VaultIssuer {
    fn kind(&self) -> &'static str {
        "vault"
    }

    fn mint<'a>(&'a self, req: &'a MintRequest) -> BoxFuture<'a, Result<MintedToken, IssuerError>> {
        self.mint_inner(req).boxed()
    }

    fn revoke<'a>(
        &'a self,
        _namespace: &'a str,
        handle: &'a RevocationHandle,
        _token: Option<&'a SecretString>,
    ) -> BoxFuture<'a, Result<Revocation, IssuerError>> {
        self.revoke_inner(handle).boxed()
    }

    fn check(&self) -> BoxFuture<'_, Result<(), IssuerError>> {
        self.check_inner().boxed()
    }
}

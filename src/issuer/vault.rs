//! The Vault / OpenBao issuer. Two modes, picked by the ISSUER (never the
//! AgentToken: paths, methods and bodies run with the operator's token):
//!
//! - child token (default): `auth/token/create` with the AgentToken's
//!   `scopes` as policies (at least one: an empty list would inherit every
//!   policy of the operator's token) and its lifetime as TTL, orphaned
//!   (`no_parent`) so it does not die with the operator's own token;
//!   revoked by accessor (`auth/token/revoke-accessor`), not a secret.
//!   Each carries metadata naming its AgentToken (namespace/name, UID) and
//!   revision, so a token minted while the operator stopped, before it
//!   heard the accessor, is found again: the operator lists the token
//!   accessors (`auth/token/accessors`, which needs `sudo`) and looks each
//!   up (at most [`MAX_SEARCHED`]); without that access the ledger says
//!   `Unknown` for it.
//! - dynamic secret: `vault.dynamicSecret.path` (e.g. `database/creds/agent`),
//!   with optional `method` (GET), `body` (JSON) and `tokenField` (the key
//!   of `data` that is the credential, default `token`); its lease is
//!   revoked (`sys/leases/revoke`).
//!
//! The lease duration Vault grants is the token's real expiry.

use futures::FutureExt;
use futures::future::BoxFuture;
use jiff::Timestamp;
use kube::Client;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};

use super::{
    Issuer, IssuerError, MintRequest, MintedToken, Revocation, RevocationHandle, expiry_after,
    granted_seconds, web,
};
use crate::crd::{VaultDynamicSecret, VaultIssuerSpec};

const ACCESSOR: &str = "vault-accessor:";
const LEASE: &str = "vault-lease:";
/// A child token not heard of yet: `vault-search:<AgentToken UID>/r<revision>`,
/// found by the metadata every child token carries.
pub const SEARCH: &str = "vault-search:";
/// How a search that found nothing begins its message.
pub const NOT_FOUND: &str = "no child token of this AgentToken's revision ";
/// Most token accessors one search looks up.
pub const MAX_SEARCHED: usize = 2000;

/// Mints from Vault or OpenBao.
pub struct VaultIssuer {
    kube: Client,
    spec: VaultIssuerSpec,
    secret_namespace: String,
    /// Where its HTTP requests may go.
    egress: web::Egress,
}

impl VaultIssuer {
    pub fn new(
        kube: Client,
        spec: VaultIssuerSpec,
        secret_namespace: String,
        egress: web::Egress,
    ) -> Self {
        VaultIssuer {
            kube,
            spec,
            secret_namespace,
            egress,
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
        let http = web::client(
            self.spec.ca_bundle.as_deref(),
            self.spec.timeout.as_ref(),
            &self.egress,
        )?;
        let token = self.operator_token().await?;
        let url = self.url(path);
        // What creates a credential is never sent twice blind.
        let creates = matches!(what, "token create" | "dynamic secret read");
        let reply = web::send_maybe_creating(
            what,
            self.spec.timeout.as_ref(),
            &self.egress,
            creates,
            || {
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
            },
        )
        .await?;
        let json = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
        Ok((reply.status, json))
    }

    fn refused(what: &str, status: u16, json: &Value) -> IssuerError {
        // Vault's `errors` are messages about the request, not secrets.
        let errors = json["errors"]
            .as_array()
            .map(|e| {
                let mut text = e
                    .iter()
                    .filter_map(|m| m.as_str())
                    .take(3)
                    .map(|m| web::excerpt(m, 200))
                    .collect::<Vec<_>>()
                    .join("; ");
                if e.len() > 3 {
                    text.push_str(&format!(" (and {} more)", e.len() - 3));
                }
                text
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
        let (secret, lease_duration, handle) = match &self.spec.dynamic_secret {
            Some(d) => self.mint_dynamic(d).await?,
            None => self.mint_child(req).await?,
        };
        let audit_id = match (&self.spec.audit_device, &self.spec.dynamic_secret) {
            (Some(device), None) => self.audit_hash(device, &secret).await,
            _ => None,
        };
        Ok(MintedToken {
            token: SecretString::from(secret),
            issued_at,
            expires_at: lease_expiry(issued_at, &lease_duration)
                .map_err(IssuerError::after_success)?,
            handle: RevocationHandle(handle),
            audit_id,
        })
    }

    /// The HMAC `device` logs `token` with (`sys/audit-hash`), as
    /// `hmac-sha256:<hex>`. A failure costs only the recognition of this
    /// token's use after revocation: logged, the mint stands.
    async fn audit_hash(&self, device: &str, token: &str) -> Option<String> {
        let path = format!("sys/audit-hash/{}", device.trim_matches('/'));
        let answer = self
            .call("audit-hash", "POST", &path, Some(&json!({"input": token})))
            .await;
        let hash = match answer {
            Ok((status, json)) if status < 300 => json["data"]["hash"]
                .as_str()
                .or(json["hash"].as_str())
                .map(str::to_string),
            Ok((status, json)) => {
                tracing::warn!(error = %Self::refused("audit-hash", status, &json), "no audit HMAC for a new child token: a use after its revocation will not be recognised");
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "no audit HMAC for a new child token: a use after its revocation will not be recognised");
                None
            }
        }?;
        let hex = hash.strip_prefix("hmac-sha256:")?;
        (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then(|| hash.clone())
    }

    async fn mint_child(&self, req: &MintRequest) -> Result<(String, Value, String), IssuerError> {
        // Checked by policy first; here too, since the cost of a miss is a
        // token with every policy of the operator's own.
        if req.scopes.is_empty() {
            return Err(IssuerError::Invalid(
                "a Vault child token needs at least one policy in spec.scopes: an empty list would inherit every policy of the operator's token".into(),
            ));
        }
        let body = json!({
            "policies": req.scopes,
            "ttl": format!("{}s", req.lifetime.as_secs()),
            "explicit_max_ttl": format!("{}s", req.lifetime.as_secs()),
            "no_parent": true,
            // Exactly the policies asked for: Vault's `default` policy only
            // when it is one of them (and so allowed by the issuer's policy).
            "no_default_policy": !req.scopes.iter().any(|s| s == "default"),
            "renewable": false,
            "display_name": format!("agenttoken-{}-{}", req.namespace, req.name),
            "meta": {
                "agenttoken": format!("{}/{}", req.namespace, req.name),
                "agenttoken_uid": req.uid,
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
                    .after_success()
            })?;
        let accessor = auth["accessor"].as_str().ok_or_else(|| {
            IssuerError::Unavailable("token create returned no accessor".into()).after_success()
        })?;
        Ok((
            token.to_string(),
            auth["lease_duration"].clone(),
            format!("{ACCESSOR}{accessor}"),
        ))
    }

    async fn mint_dynamic(
        &self,
        d: &VaultDynamicSecret,
    ) -> Result<(String, Value, String), IssuerError> {
        let path = d.path.as_str();
        let method = d
            .method
            .as_deref()
            .map(str::to_uppercase)
            .unwrap_or_else(|| "GET".into());
        let body = match &d.body {
            Some(b) => Some(serde_json::from_str::<Value>(b).map_err(|e| {
                IssuerError::Invalid(format!("vault.dynamicSecret.body is not JSON: {e}"))
            })?),
            None => None,
        };
        let field = d.token_field.as_deref().unwrap_or("token");
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
                    "{path} returned no string data.{field} (set vault.dynamicSecret.tokenField)"
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
        Ok((
            secret.to_string(),
            json["lease_duration"].clone(),
            format!("{LEASE}{lease}"),
        ))
    }

    /// Finds the child token a search handle names and revokes it.
    async fn search(&self, key: &str) -> Result<Revocation, IssuerError> {
        let Some((uid, revision)) = parse_search(key) else {
            return Ok(Revocation::Unsearchable(
                "the search handle is malformed".into(),
            ));
        };
        let (status, json) = self
            .call(
                "list token accessors",
                "GET",
                "auth/token/accessors?list=true",
                None,
            )
            .await?;
        let accessors: Vec<String> = match status {
            200..=299 => json["data"]["keys"]
                .as_array()
                .map(|k| {
                    k.iter()
                        .filter_map(|a| a.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default(),
            // No tokens with accessors at all.
            404 => Vec::new(),
            403 => {
                return Ok(Revocation::Unsearchable(
                    "the operator's Vault token may not list token accessors (it needs sudo on auth/token/accessors), so a token minted while the operator stopped cannot be found".into(),
                ));
            }
            _ => return Err(Self::refused("list token accessors", status, &json)),
        };
        if accessors.len() > MAX_SEARCHED {
            return Ok(Revocation::Unsearchable(format!(
                "Vault holds {} token accessors, more than the {MAX_SEARCHED} a search looks up",
                accessors.len()
            )));
        }
        // Every token carrying this AgentToken's UID and revision is
        // revoked, not just the first: a decoy made by someone else who may
        // create tokens cannot shield the real one.
        let mut found: Option<RevocationHandle> = None;
        for accessor in &accessors {
            let (status, json) = self
                .call(
                    "lookup-accessor",
                    "POST",
                    "auth/token/lookup-accessor",
                    Some(&json!({"accessor": accessor})),
                )
                .await?;
            match status {
                200 => {}
                // Expired or revoked since the listing: not a live token.
                400 if json.to_string().contains("invalid accessor") => continue,
                404 => continue,
                403 => {
                    return Ok(Revocation::Unsearchable(
                        "the operator's Vault token may not look up token accessors (auth/token/lookup-accessor), so a token minted while the operator stopped cannot be found".into(),
                    ));
                }
                // Rate-limited, failing: the search is not complete, so it
                // says nothing about absence.
                _ => return Err(Self::refused("lookup-accessor", status, &json)),
            }
            let meta = &json["data"]["meta"];
            if meta["agenttoken_uid"].as_str() == Some(uid)
                && meta["revision"].as_str() == Some(revision.to_string().as_str())
            {
                let handle = RevocationHandle(format!("{ACCESSOR}{accessor}"));
                match self.revoke_inner(&handle).await? {
                    Revocation::Revoked => {
                        found.get_or_insert(handle);
                    }
                    other => return Ok(other),
                }
            }
        }
        if let Some(handle) = found {
            return Ok(Revocation::RevokedAs(handle));
        }
        Ok(Revocation::NotFound(format!(
            "{NOT_FOUND}{revision} among {} accessors: the mint never reached Vault, or the token is gone",
            accessors.len()
        )))
    }

    async fn revoke_inner(&self, handle: &RevocationHandle) -> Result<Revocation, IssuerError> {
        if let Some(key) = handle.0.strip_prefix(SEARCH) {
            return Box::pin(self.search(key)).await;
        }
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

/// The expiry of a lease of `lease_duration` seconds granted at
/// `issued_at`. Vault answers 0 (or nothing) for a credential that never
/// expires, which the operator refuses, as it refuses a negative or an
/// unrepresentable lease.
fn lease_expiry(issued_at: Timestamp, lease_duration: &Value) -> Result<Timestamp, IssuerError> {
    match lease_seconds(lease_duration)? {
        None | Some(0) => Err(IssuerError::Unavailable(
            "Vault granted no lease duration: refusing a credential whose expiry is unknown".into(),
        )),
        Some(seconds) => expiry_after(issued_at, seconds),
    }
}

fn lease_seconds(v: &Value) -> Result<Option<i64>, IssuerError> {
    if v.is_null() {
        return Ok(None);
    }
    granted_seconds(v)?.map(Some).ok_or_else(|| {
        IssuerError::Unavailable("Vault's lease_duration is not a number of seconds".into())
    })
}

impl Issuer for VaultIssuer {
    fn kind(&self) -> &'static str {
        "vault"
    }

    fn refuses<'a>(&'a self, token: &'a SecretString) -> BoxFuture<'a, Result<bool, String>> {
        Box::pin(async move {
            if self.spec.dynamic_secret.is_some() {
                return Err("a dynamic secret is not a Vault token: nothing to look up".into());
            }
            // The token asks about itself: 403 once it is revoked.
            let http = web::client(
                self.spec.ca_bundle.as_deref(),
                self.spec.timeout.as_ref(),
                &self.egress,
            )
            .map_err(|e| e.to_string())?;
            let mut rb = http
                .get(self.url("auth/token/lookup-self"))
                .header("X-Vault-Token", token.expose_secret());
            if let Some(ns) = self.spec.namespace.as_deref().filter(|n| !n.is_empty()) {
                rb = rb.header("X-Vault-Namespace", ns);
            }
            let status = rb
                .send()
                .await
                .map_err(|e| format!("lookup-self failed: {}", web::excerpt(&e.to_string(), 200)))?
                .status()
                .as_u16();
            match status {
                200 => Ok(false),
                401 | 403 => Ok(true),
                other => Err(format!("lookup-self answered HTTP {other}")),
            }
        })
    }

    fn refusal_check(&self) -> &'static str {
        "Vault lookup-self"
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

    fn search_handle(&self, req: &MintRequest) -> Option<RevocationHandle> {
        self.spec
            .dynamic_secret
            .is_none()
            .then(|| RevocationHandle(search_handle(&req.uid, req.revision)))
    }
}

/// The search handle of a child token for `uid`'s revision `revision`.
pub fn search_handle(uid: &str, revision: i64) -> String {
    format!("{SEARCH}{uid}/r{revision}")
}

/// (UID, revision) from what follows [`SEARCH`].
pub fn parse_search(key: &str) -> Option<(&str, i64)> {
    let (uid, revision) = key.rsplit_once("/r")?;
    let revision = revision.parse().ok()?;
    (!uid.is_empty() && !uid.contains('/')).then_some((uid, revision))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at() -> Timestamp {
        Timestamp::from_second(1_800_000_000).unwrap()
    }

    #[test]
    fn search_handles_round_trip_and_refuse_garbage() {
        let h = search_handle("6f1c-uid", 7);
        assert_eq!(h, "vault-search:6f1c-uid/r7");
        assert_eq!(
            parse_search(h.strip_prefix(SEARCH).unwrap()),
            Some(("6f1c-uid", 7))
        );
        for bad in ["", "/r7", "uid/r", "uid/rx", "a/b/r7", "uid"] {
            assert_eq!(parse_search(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_lease_duration_is_the_expiry() {
        assert_eq!(
            lease_expiry(at(), &json!(3600)).unwrap(),
            Timestamp::from_second(1_800_003_600).unwrap()
        );
    }

    #[test]
    fn no_zero_or_unreadable_lease_is_refused() {
        for v in [json!(null), json!(0)] {
            let e = lease_expiry(at(), &v).unwrap_err();
            assert!(e.to_string().contains("no lease duration"), "{v}: {e}");
        }
        for v in [json!("soon"), json!({}), json!([1])] {
            let e = lease_expiry(at(), &v).unwrap_err();
            assert!(e.to_string().contains("not a number"), "{v}: {e}");
        }
    }

    #[test]
    fn a_negative_lease_is_already_expired() {
        let e = lease_expiry(at(), &json!(-60)).unwrap_err();
        assert!(e.to_string().contains("already expired"), "{e}");
        assert!(e.is_transient());
    }

    #[test]
    fn a_huge_lease_is_an_error_not_a_panic() {
        for v in [
            json!(u64::MAX),
            json!(i64::MAX),
            json!(1e300),
            json!(999_999_999_999_i64),
            json!("99999999999999999999"),
        ] {
            let e = lease_expiry(at(), &v).unwrap_err();
            assert!(e.to_string().contains("cannot represent"), "{v}: {e}");
        }
    }

    #[test]
    fn refusals_carry_few_short_clean_errors() {
        let many: Vec<String> = (0..1000).map(|i| format!("e{i}\n\u{1b}[31m")).collect();
        let e = VaultIssuer::refused("token create", 400, &json!({ "errors": many }));
        let m = e.to_string();
        assert!(m.contains("(and 997 more)"), "{m}");
        assert!(!m.contains('\n') && !m.contains('\u{1b}'), "{m}");
        assert!(m.len() < 200, "{m}");
        let long = "x".repeat(100_000);
        let m = VaultIssuer::refused("token create", 500, &json!({ "errors": [long] })).to_string();
        assert!(m.len() < 300, "{}", m.len());
    }
}

//! The webhook issuer: any HTTP service that mints tokens. The request body
//! comes from a small template; the token, its expiry and an optional id
//! are read from the JSON response by path (`$.a.b[0].c`); revocation is an
//! optional POST.

use std::collections::BTreeMap;

use futures::FutureExt;
use futures::future::BoxFuture;
use jiff::Timestamp;
use kube::Client;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

use super::{
    Issuer, IssuerError, MintRequest, MintedToken, Revocation, RevocationHandle, after_issue,
    expiry_after, granted_seconds, web,
};
use crate::crd::{WebhookIssuerSpec, WebhookResult};
use crate::rotation;

/// The longest token id (`result.idPath`) kept as a revocation handle.
const MAX_ID: usize = 256;

/// Mints by calling an HTTP service.
pub struct WebhookIssuer {
    kube: Client,
    spec: WebhookIssuerSpec,
    secret_namespace: String,
    /// Where its HTTP requests may go.
    egress: web::Egress,
}

impl WebhookIssuer {
    pub fn new(
        kube: Client,
        spec: WebhookIssuerSpec,
        secret_namespace: String,
        egress: web::Egress,
    ) -> Self {
        WebhookIssuer {
            kube,
            spec,
            secret_namespace,
            egress,
        }
    }

    async fn authorization(&self) -> Result<Option<SecretString>, IssuerError> {
        match &self.spec.authorization_secret_ref {
            Some(r) => Ok(Some(
                web::read_secret(
                    &self.kube,
                    &self.secret_namespace,
                    r,
                    "webhook.authorizationSecretRef",
                )
                .await?,
            )),
            None => Ok(None),
        }
    }

    fn validate(&self) -> Result<(), IssuerError> {
        let r = &self.spec.result;
        for (field, path) in [
            ("result.tokenPath", Some(&r.token_path)),
            ("result.expiresInPath", r.expires_in_path.as_ref()),
            ("result.expiresAtPath", r.expires_at_path.as_ref()),
            ("result.idPath", r.id_path.as_ref()),
        ] {
            if let Some(p) = path {
                parse_path(p).map_err(|e| IssuerError::Invalid(format!("webhook.{field}: {e}")))?;
            }
        }
        if r.expires_in_path.is_none() && r.expires_at_path.is_none() {
            return Err(IssuerError::Invalid(
                "webhook.result needs expiresInPath or expiresAtPath: a token's expiry must be known"
                    .into(),
            ));
        }
        Ok(())
    }

    async fn mint_inner(&self, req: &MintRequest) -> Result<MintedToken, IssuerError> {
        self.validate()?;
        let body = render_body(self.spec.body.as_deref(), req)?;
        let http = web::client(
            self.spec.ca_bundle.as_deref(),
            self.spec.timeout.as_ref(),
            &self.egress,
        )?;
        let auth = self.authorization().await?;
        let method = self.spec.method.as_deref().unwrap_or("POST");
        let issued_at = Timestamp::now();
        let reply = web::send_creating(
            "mint request",
            self.spec.timeout.as_ref(),
            &self.egress,
            || {
                let rb = match method {
                    "PUT" => http.put(&self.spec.url),
                    "GET" => http.get(&self.spec.url),
                    _ => http.post(&self.spec.url),
                };
                let rb = rb.json(&body);
                match &auth {
                    Some(a) => rb.header("Authorization", a.expose_secret()),
                    None => rb,
                }
            },
        )
        .await?;
        if reply.status >= 400 {
            let msg = format!("mint refused: {}", reply.describe());
            return Err(if (400..500).contains(&reply.status) {
                IssuerError::Invalid(msg)
            } else {
                IssuerError::Unavailable(msg)
            });
        }
        if reply.status >= 300 {
            return Err(IssuerError::Invalid(format!(
                "mint answered HTTP {}: redirects are not followed",
                reply.status
            )));
        }
        self.read_minted(&reply, issued_at)
            .map_err(IssuerError::after_success)
    }

    /// The token in a success answer to a mint.
    fn read_minted(
        &self,
        reply: &web::Reply,
        issued_at: Timestamp,
    ) -> Result<MintedToken, IssuerError> {
        let json: Value = serde_json::from_slice(&reply.body).map_err(|_| {
            IssuerError::Unavailable(format!("mint response (HTTP {}) is not JSON", reply.status))
        })?;
        let r = &self.spec.result;
        let token = lookup(&json, &r.token_path)
            .and_then(|v| v.as_str())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                IssuerError::Unavailable(format!("mint response has no string at {}", r.token_path))
            })?
            .to_string();
        let expires_at = expiry_from(r, &json, issued_at)?;
        let id = r
            .id_path
            .as_ref()
            .and_then(|p| lookup(&json, p))
            .map(|v| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            });
        // The id is kept in an annotation and shown in status: short text.
        if id
            .as_ref()
            .is_some_and(|id| id.chars().count() > MAX_ID || id.chars().any(char::is_control))
        {
            return Err(IssuerError::Unavailable(format!(
                "mint response's id is longer than {MAX_ID} characters or holds control characters"
            )));
        }
        let handle = match id {
            Some(id) => format!("webhook-id:{id}"),
            None => format!("webhook:{}", rotation::fingerprint(token.as_bytes())),
        };
        Ok(MintedToken {
            token: SecretString::from(token),
            issued_at,
            expires_at,
            handle: RevocationHandle(handle),
            audit_id: None,
        })
    }

    async fn revoke_inner(
        &self,
        handle: &RevocationHandle,
        token: Option<&SecretString>,
    ) -> Result<Revocation, IssuerError> {
        let Some(url) = self.spec.revoke_url.as_deref() else {
            return Ok(Revocation::NotSupported);
        };
        let id = handle.0.strip_prefix("webhook-id:");
        if id.is_none() && token.is_none() {
            return Err(IssuerError::Unavailable(
                "neither an id nor the token is held; it dies at its expiry".into(),
            ));
        }
        let http = web::client(
            self.spec.ca_bundle.as_deref(),
            self.spec.timeout.as_ref(),
            &self.egress,
        )?;
        let auth = self.authorization().await?;
        let reply = web::send(
            "revoke request",
            self.spec.timeout.as_ref(),
            &self.egress,
            || {
                let mut body = serde_json::Map::new();
                if let Some(id) = id {
                    body.insert("id".into(), Value::String(id.to_string()));
                }
                if let Some(t) = token {
                    body.insert("token".into(), Value::String(t.expose_secret().to_string()));
                }
                let rb = http.post(url).json(&body);
                match &auth {
                    Some(a) => rb.header("Authorization", a.expose_secret()),
                    None => rb,
                }
            },
        )
        .await?;
        match reply.status {
            200..=299 => Ok(Revocation::Revoked),
            404 | 410 => Ok(Revocation::Unconfirmed(format!(
                "the issuer answered HTTP {} for this token: it does not know it, so its revocation is not confirmed",
                reply.status
            ))),
            _ => Err(IssuerError::Unavailable(format!(
                "revocation refused: {}",
                reply.describe()
            ))),
        }
    }

    /// RFC 7662 at `introspectionURL`: whether the service says `token`
    /// is no longer active.
    async fn refuses_inner(&self, token: &SecretString) -> Result<bool, String> {
        let Some(url) = self.spec.introspection_url.as_deref() else {
            return Err("the webhook issuer sets no introspectionURL".into());
        };
        let http = web::client(
            self.spec.ca_bundle.as_deref(),
            self.spec.timeout.as_ref(),
            &self.egress,
        )
        .map_err(|e| e.to_string())?;
        let auth = self.authorization().await.map_err(|e| e.to_string())?;
        let reply = web::send(
            "introspection request",
            self.spec.timeout.as_ref(),
            &self.egress,
            || {
                let rb = http.post(url).form(&[
                    ("token", token.expose_secret()),
                    ("token_type_hint", "access_token"),
                ]);
                match &auth {
                    Some(a) => rb.header("Authorization", a.expose_secret()),
                    None => rb,
                }
            },
        )
        .await
        .map_err(|e| e.to_string())?;
        web::introspection_answer(&reply)
    }

    async fn check_inner(&self) -> Result<(), IssuerError> {
        self.validate()?;
        render_body(self.spec.body.as_deref(), &MintRequest::default())?;
        let http = web::client(
            self.spec.ca_bundle.as_deref(),
            self.spec.timeout.as_ref(),
            &self.egress,
        )?;
        self.authorization().await?;
        web::probe(http.head(&self.spec.url), "mint endpoint", &self.egress).await
    }
}

impl Issuer for WebhookIssuer {
    fn kind(&self) -> &'static str {
        "webhook"
    }

    fn mint<'a>(&'a self, req: &'a MintRequest) -> BoxFuture<'a, Result<MintedToken, IssuerError>> {
        self.mint_inner(req).boxed()
    }

    fn revoke<'a>(
        &'a self,
        _namespace: &'a str,
        handle: &'a RevocationHandle,
        token: Option<&'a SecretString>,
    ) -> BoxFuture<'a, Result<Revocation, IssuerError>> {
        self.revoke_inner(handle, token).boxed()
    }

    fn refuses<'a>(&'a self, token: &'a SecretString) -> BoxFuture<'a, Result<bool, String>> {
        self.refuses_inner(token).boxed()
    }

    fn refusal_check(&self) -> &'static str {
        "RFC 7662 introspection"
    }

    fn check(&self) -> BoxFuture<'_, Result<(), IssuerError>> {
        self.check_inner().boxed()
    }
}

/// The expiry a mint response received at `issued_at` states, at
/// `expiresInPath` (seconds: a number or a numeric string) or else at
/// `expiresAtPath` (RFC 3339); it must be after `issued_at`.
fn expiry_from(
    r: &WebhookResult,
    json: &Value,
    issued_at: Timestamp,
) -> Result<Timestamp, IssuerError> {
    let expires_at = if let Some(p) = &r.expires_in_path {
        let secs = match lookup(json, p) {
            Some(v) => granted_seconds(v)?,
            None => None,
        }
        .ok_or_else(|| {
            IssuerError::Unavailable(format!(
                "mint response has no number of seconds at {p}: refusing a token whose expiry is unknown"
            ))
        })?;
        expiry_after(issued_at, secs)?
    } else {
        let p = r.expires_at_path.as_deref().unwrap_or_default();
        lookup(json, p)
            .and_then(|v| v.as_str())
            .and_then(|s| s.trim().parse::<Timestamp>().ok())
            .ok_or_else(|| {
                IssuerError::Unavailable(format!(
                    "mint response has no RFC 3339 time at {p}: refusing a token whose expiry is unknown"
                ))
            })?
    };
    after_issue(issued_at, expires_at)
}

/// Renders the body template into JSON.
pub fn render_body(template: Option<&str>, req: &MintRequest) -> Result<Value, IssuerError> {
    let mut vars: BTreeMap<String, Value> = BTreeMap::from([
        ("namespace".into(), Value::from(req.namespace.clone())),
        ("name".into(), Value::from(req.name.clone())),
        ("revision".into(), Value::from(req.revision)),
        (
            "lifetimeSeconds".into(),
            Value::from(req.lifetime.as_secs()),
        ),
        ("scopes".into(), Value::from(req.scopes.clone())),
        ("audiences".into(), Value::from(req.audiences.clone())),
    ]);
    for (k, v) in &req.parameters {
        vars.insert(format!("parameters.{k}"), Value::from(v.clone()));
    }
    let Some(template) = template else {
        let mut obj: serde_json::Map<String, Value> = vars
            .iter()
            .filter(|(k, _)| !k.starts_with("parameters."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        obj.insert(
            "parameters".into(),
            serde_json::to_value(&req.parameters).unwrap_or_default(),
        );
        return Ok(Value::Object(obj));
    };
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| IssuerError::Invalid("webhook.body: an unclosed {{".into()))?;
        let name = after[..end].trim();
        let value = vars
            .get(name)
            .or_else(|| name.starts_with("parameters.").then_some(&Value::Null))
            .ok_or_else(|| {
                IssuerError::Invalid(format!("webhook.body: unknown variable {{{{ {name} }}}}"))
            })?;
        out.push_str(&value.to_string());
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    serde_json::from_str(&out)
        .map_err(|e| IssuerError::Invalid(format!("webhook.body is not JSON once rendered: {e}")))
}

#[derive(Debug, PartialEq)]
enum Step {
    Key(String),
    Index(usize),
}

/// Parses `$.a.b[0]["c d"]` (a small JSONPath subset).
fn parse_path(path: &str) -> Result<Vec<Step>, String> {
    let rest = path
        .strip_prefix('$')
        .ok_or_else(|| format!("{path:?} must start with $"))?;
    let mut steps = Vec::new();
    let mut chars = rest.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '.' => {
                let mut key = String::new();
                while let Some(&n) = chars.peek() {
                    if n == '.' || n == '[' {
                        break;
                    }
                    key.push(n);
                    chars.next();
                }
                if key.is_empty() {
                    return Err(format!("{path:?} has an empty key"));
                }
                steps.push(Step::Key(key));
            }
            '[' => {
                let mut inner = String::new();
                for n in chars.by_ref() {
                    if n == ']' {
                        break;
                    }
                    inner.push(n);
                }
                let inner = inner.trim();
                if let Ok(i) = inner.parse::<usize>() {
                    steps.push(Step::Index(i));
                } else if inner.len() >= 2
                    && (inner.starts_with('"') && inner.ends_with('"')
                        || inner.starts_with('\'') && inner.ends_with('\''))
                {
                    steps.push(Step::Key(inner[1..inner.len() - 1].to_string()));
                } else {
                    return Err(format!(
                        "{path:?}: [{inner}] is not an index or a quoted key"
                    ));
                }
            }
            other => return Err(format!("{path:?}: unexpected {other:?}")),
        }
    }
    Ok(steps)
}

/// The value at `path`, if any.
pub fn lookup<'a>(json: &'a Value, path: &str) -> Option<&'a Value> {
    let mut v = json;
    for step in parse_path(path).ok()? {
        v = match step {
            Step::Key(k) => v.get(&k)?,
            Step::Index(i) => v.get(i)?,
        };
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths_reach_nested_values() {
        let j = json!({"data": {"tokens": [{"value": "t1", "ttl": 60}], "a b": 1}});
        assert_eq!(lookup(&j, "$.data.tokens[0].value"), Some(&json!("t1")));
        assert_eq!(lookup(&j, "$.data[\"a b\"]"), Some(&json!(1)));
        assert_eq!(lookup(&j, "$.data.tokens[1]"), None);
        assert_eq!(lookup(&j, "$"), Some(&j));
        assert!(parse_path("data.x").is_err());
        assert!(parse_path("$..x").is_err());
    }

    #[test]
    fn body_templates_render_json_values() {
        let req = MintRequest {
            namespace: "team-a".into(),
            name: "bot".into(),
            scopes: vec!["read".into(), "deploy".into()],
            lifetime: std::time::Duration::from_secs(600),
            parameters: [("team".to_string(), "x\"y".to_string())].into(),
            ..Default::default()
        };
        let body = render_body(
            Some(r#"{"sub": {{ namespace }}, "scopes": {{ scopes }}, "ttl": {{ lifetimeSeconds }}, "team": {{ parameters.team }}}"#),
            &req,
        )
        .unwrap();
        assert_eq!(
            body,
            json!({"sub": "team-a", "scopes": ["read", "deploy"], "ttl": 600, "team": "x\"y"})
        );
        assert!(render_body(Some("{{ nope }}"), &req).is_err());
        assert!(render_body(Some("{\"a\": {{ name }"), &req).is_err());
        let default = render_body(None, &req).unwrap();
        assert_eq!(default["name"], "bot");
        assert_eq!(default["parameters"]["team"], "x\"y");
    }

    fn at() -> Timestamp {
        Timestamp::from_second(1_800_000_000).unwrap()
    }

    fn expires_in() -> WebhookResult {
        WebhookResult {
            token_path: "$.token".into(),
            expires_in_path: Some("$.ttl".into()),
            ..Default::default()
        }
    }

    #[test]
    fn expires_in_paths_give_the_expiry() {
        for v in [json!(600), json!("600"), json!(600.9)] {
            assert_eq!(
                expiry_from(&expires_in(), &json!({ "ttl": v }), at()).unwrap(),
                Timestamp::from_second(1_800_000_600).unwrap(),
                "{v}"
            );
        }
        let r = WebhookResult {
            token_path: "$.token".into(),
            expires_at_path: Some("$.exp".into()),
            ..Default::default()
        };
        assert_eq!(
            expiry_from(&r, &json!({"exp": "2027-06-01T00:00:00Z"}), at()).unwrap(),
            "2027-06-01T00:00:00Z".parse::<Timestamp>().unwrap()
        );
        for v in [json!("2020-01-01T00:00:00Z"), json!("2027-01-15T08:00:00Z")] {
            let e = expiry_from(&r, &json!({ "exp": v }), at()).unwrap_err();
            assert!(e.to_string().contains("already expired"), "{v}: {e}");
        }
        for v in [json!("+99999-01-01T00:00:00Z"), json!(1), json!(null)] {
            let e = expiry_from(&r, &json!({ "exp": v }), at()).unwrap_err();
            assert!(e.to_string().contains("no RFC 3339 time"), "{v}: {e}");
        }
    }

    #[test]
    fn a_zero_or_negative_expires_in_is_already_expired() {
        for v in [json!(0), json!(-1), json!("-600"), json!(i64::MIN)] {
            let e = expiry_from(&expires_in(), &json!({ "ttl": v }), at()).unwrap_err();
            assert!(e.to_string().contains("already expired"), "{v}: {e}");
        }
    }

    #[test]
    fn a_huge_or_garbage_expires_in_is_an_error_not_a_panic() {
        for v in [
            json!(u64::MAX),
            json!(i64::MAX),
            json!(1e300),
            json!("99999999999999999999"),
        ] {
            let e = expiry_from(&expires_in(), &json!({ "ttl": v }), at()).unwrap_err();
            assert!(e.to_string().contains("cannot represent"), "{v}: {e}");
        }
        for v in [json!("NaN"), json!("inf"), json!(null), json!({"a": 1})] {
            let e = expiry_from(&expires_in(), &json!({ "ttl": v }), at()).unwrap_err();
            assert!(e.to_string().contains("no number of seconds"), "{v}: {e}");
        }
        let e = expiry_from(&expires_in(), &json!({}), at()).unwrap_err();
        assert!(e.to_string().contains("no number of seconds"), "{e}");
    }
}

//! HTTP for issuers that speak it: one client per issuer with its CA
//! bundle and timeouts, retries that honour `Retry-After`, and error
//! messages that never carry a request body, a token or a secret.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::Api;
use secrecy::SecretString;

use super::IssuerError;
use crate::crd::SecretKeyRef;

/// Time for one HTTP request, connect included, unless the issuer sets
/// `timeout`.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts per operation (the first one included).
pub const ATTEMPTS: u32 = 3;
/// Longest `Retry-After` honoured inside one reconcile; longer waits are
/// left to the reconcile's own backoff.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

/// Builds a client that trusts the system roots plus `ca_bundle` (PEM) and
/// gives each request `timeout` (default [`REQUEST_TIMEOUT`]).
pub fn client(
    ca_bundle: Option<&str>,
    timeout: Option<kube::core::Duration>,
) -> Result<reqwest::Client, IssuerError> {
    let timeout = timeout.map(Duration::from).unwrap_or(REQUEST_TIMEOUT);
    if timeout.is_zero() {
        return Err(IssuerError::Invalid("timeout must be more than 0s".into()));
    }
    let mut b = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("agent-token-operator/", env!("CARGO_PKG_VERSION")));
    if let Some(pem) = ca_bundle.filter(|p| !p.trim().is_empty()) {
        let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
            .map_err(|e| IssuerError::Invalid(format!("caBundle is not valid PEM: {e}")))?;
        if certs.is_empty() {
            return Err(IssuerError::Invalid("caBundle holds no certificate".into()));
        }
        for c in certs {
            b = b.add_root_certificate(c);
        }
    }
    b.build()
        .map_err(|e| IssuerError::Invalid(format!("cannot build an HTTP client: {e}")))
}

/// What came back, read in full.
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Reply {
    /// A short, safe description of an error reply: the status and, for an
    /// OAuth-style JSON error, its `error` and `error_description` (which
    /// servers do not fill with secrets). Never the raw body.
    pub fn describe(&self) -> String {
        let json: Option<serde_json::Value> = serde_json::from_slice(&self.body).ok();
        let field = |k: &str| {
            json.as_ref()
                .and_then(|j| j.get(k))
                .and_then(|v| v.as_str())
                .map(|s| s.chars().take(200).collect::<String>())
        };
        match (field("error"), field("error_description")) {
            (Some(e), Some(d)) => format!("HTTP {}: {e}: {d}", self.status),
            (Some(e), None) => format!("HTTP {}: {e}", self.status),
            _ => format!("HTTP {}", self.status),
        }
    }
}

/// Sends the request `make` builds, retrying connection errors, 429 and 5xx
/// (waiting for `Retry-After` when the server says, else 0.5 s, 1 s, ...).
/// `what` names the operation in errors ("token request").
pub async fn send<F>(what: &str, make: F) -> Result<Reply, IssuerError>
where
    F: Fn() -> reqwest::RequestBuilder,
{
    let mut last = String::new();
    for attempt in 1..=ATTEMPTS {
        let wait = match make().send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let retry_after = retry_after(resp.headers());
                let body = resp.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
                let reply = Reply { status, body };
                if status == 429 || status >= 500 {
                    last = format!("{what}: {}", reply.describe());
                    match retry_after {
                        Some(d) if d > MAX_RETRY_AFTER => {
                            return Err(IssuerError::Unavailable(format!(
                                "{last}; the server asks to retry after {}s",
                                d.as_secs()
                            )));
                        }
                        Some(d) => d,
                        None => backoff(attempt),
                    }
                } else {
                    return Ok(reply);
                }
            }
            Err(e) => {
                last = format!("{what}: {}", describe_error(&e));
                if tls_problem(&e).is_some() {
                    // Retrying cannot change the server's certificate.
                    return Err(IssuerError::Unavailable(last));
                }
                backoff(attempt)
            }
        };
        if attempt < ATTEMPTS {
            tokio::time::sleep(wait).await;
        }
    }
    Err(IssuerError::Unavailable(format!(
        "{last} (after {ATTEMPTS} attempts)"
    )))
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(500 * 2u64.pow(attempt.saturating_sub(1)))
}

/// A reachability check: any answer below 500 proves `what` (e.g. "token
/// endpoint") is there; asking it to mint would make tokens nobody uses.
pub async fn probe(request: reqwest::RequestBuilder, what: &str) -> Result<(), IssuerError> {
    match request.send().await {
        Ok(r) if r.status().as_u16() < 500 => Ok(()),
        Ok(r) => Err(IssuerError::Unavailable(format!(
            "{what} answers HTTP {}",
            r.status().as_u16()
        ))),
        Err(e) => Err(IssuerError::Unavailable(format!(
            "{what} unreachable: {}",
            describe_error(&e)
        ))),
    }
}

/// `Retry-After` as seconds or an HTTP date.
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = jiff::fmt::rfc2822::parse(v).ok()?.timestamp();
    let d = at.duration_since(jiff::Timestamp::now());
    Some(Duration::try_from(d).unwrap_or(Duration::ZERO))
}

/// A transport error without its URL's query (which could hold a secret),
/// naming what a person can fix: a timeout, a refused connection, or a
/// server certificate the client does not trust.
pub fn describe_error(e: &reqwest::Error) -> String {
    let target = e
        .url()
        .map(|u| {
            let port = u.port().map(|p| format!(":{p}")).unwrap_or_default();
            format!(
                " {}://{}{port}{}",
                u.scheme(),
                u.host_str().unwrap_or(""),
                u.path()
            )
        })
        .unwrap_or_default();
    if e.is_timeout() {
        format!("timed out calling{target}")
    } else if let Some(tls) = tls_problem(e) {
        format!(
            "TLS handshake with{target} failed ({tls}): set caBundle to the CA that signed the server's certificate"
        )
    } else if e.is_connect() {
        format!("cannot connect to{target}")
    } else {
        format!("request to{target} failed")
    }
}

/// The certificate problem in an error's causes, if any. TLS library
/// messages name the problem ("invalid peer certificate: UnknownIssuer")
/// and never carry request data.
fn tls_problem(e: &reqwest::Error) -> Option<String> {
    let mut cause: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(c) = cause {
        let text = c.to_string();
        if text.contains("certificate") {
            return Some(text.chars().take(160).collect());
        }
        cause = c.source();
    }
    None
}

/// Reads one key of a Secret the issuer refers to.
pub async fn read_secret(
    client: &Client,
    namespace: &str,
    r: &SecretKeyRef,
    field: &str,
) -> Result<SecretString, IssuerError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = match api.get_opt(&r.name).await {
        Ok(Some(s)) => s,
        Ok(None) => {
            return Err(IssuerError::Invalid(format!(
                "{field}: Secret {:?} not found in namespace {namespace:?}",
                r.name
            )));
        }
        Err(e) => {
            return Err(IssuerError::Unavailable(format!(
                "{field}: cannot read Secret {:?}: {e}",
                r.name
            )));
        }
    };
    let value = secret
        .data
        .as_ref()
        .and_then(|d| d.get(&r.key))
        .map(|b| b.0.clone())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| {
            IssuerError::Invalid(format!(
                "{field}: Secret {:?} has no key {:?}",
                r.name, r.key
            ))
        })?;
    let text = String::from_utf8(value)
        .map_err(|_| IssuerError::Invalid(format!("{field}: key {:?} is not UTF-8", r.key)))?;
    Ok(SecretString::from(
        text.trim_end_matches(['\n', '\r']).to_string(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(reqwest::header::RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        h.insert(
            reqwest::header::RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO), "a past date: now");
        h.insert(reqwest::header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn error_replies_never_echo_the_body() {
        let r = Reply {
            status: 400,
            body:
                br#"{"error":"invalid_scope","error_description":"bad scope","access_token":"x"}"#
                    .to_vec(),
        };
        assert_eq!(r.describe(), "HTTP 400: invalid_scope: bad scope");
        let r = Reply {
            status: 502,
            body: b"<html>proxy said token=abc</html>".to_vec(),
        };
        assert_eq!(r.describe(), "HTTP 502");
    }

    #[test]
    fn a_bad_ca_bundle_is_a_configuration_error() {
        assert!(matches!(
            client(Some("not pem"), None),
            Err(IssuerError::Invalid(_))
        ));
        assert!(matches!(
            client(None, Some(Duration::ZERO.into())),
            Err(IssuerError::Invalid(_))
        ));
        assert!(client(None, None).is_ok());
        assert!(client(None, Some(Duration::from_secs(2).into())).is_ok());
    }
}

//! HTTP for issuers that speak it: one client per issuer with its CA
//! bundle and timeouts, retries that honour `Retry-After`, and error
//! messages that never carry a request body, a token or a secret.
//!
//! An issuer's answer is foreign input: every body is read through
//! [`read_body`], which keeps at most [`MAX_BODY`] bytes, and one logical
//! call (all its attempts and waits) ends within [`call_budget`].

use std::time::Duration;

use crate::duration::SpecDuration;

use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::Api;
use secrecy::SecretString;
use tokio::time::Instant;

use super::IssuerError;
use crate::crd::SecretKeyRef;

/// Time for one HTTP request, connect included, unless the issuer sets
/// `timeout`.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest `timeout` an issuer may set (the CRD's own limit).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(60);
/// Attempts per operation (the first one included).
pub const ATTEMPTS: u32 = 3;
/// Longest `Retry-After` honoured inside one reconcile; longer waits are
/// left to the reconcile's own backoff.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);
/// The most one logical call (every attempt and every wait) may take, unless
/// the issuer's own `timeout` is longer: then the call gets exactly one
/// attempt of that length. See [`call_budget`].
pub const MAX_CALL: Duration = Duration::from_secs(45);
/// The largest response body kept. Token responses are a few kilobytes; a
/// larger one is refused, never retried, and never kept beyond this.
pub const MAX_BODY: usize = 1 << 20;

/// The time one logical call may take, for requests of `timeout` each:
/// two full attempts plus 5 s of waits (`2 × timeout + 5 s`), but at most
/// [`MAX_CALL`], and never less than one full attempt. With the default
/// 10 s timeout that is 25 s; with 20 s or more, 45 s; with 60 s, 60 s.
pub fn call_budget(timeout: Duration) -> Duration {
    let retries = timeout
        .saturating_mul(2)
        .saturating_add(Duration::from_secs(5));
    retries.min(MAX_CALL.max(timeout))
}

/// The per-request timeout an issuer's `timeout` means: [`REQUEST_TIMEOUT`]
/// when unset; more than 0 s and at most [`MAX_TIMEOUT`] (admission checks
/// this too, but a stored object may predate it).
pub fn request_timeout(timeout: Option<&SpecDuration>) -> Result<Duration, IssuerError> {
    let Some(t) = timeout else {
        return Ok(REQUEST_TIMEOUT);
    };
    let d = t
        .get()
        .map_err(|e| IssuerError::Invalid(format!("timeout {e}")))?;
    if d.is_zero() {
        return Err(IssuerError::Invalid("timeout must be more than 0s".into()));
    }
    if d > MAX_TIMEOUT {
        return Err(IssuerError::Invalid(format!(
            "timeout must be at most {}s",
            MAX_TIMEOUT.as_secs()
        )));
    }
    Ok(d)
}

/// Builds a client that trusts the system roots plus `ca_bundle` (PEM) and
/// gives each request `timeout` (default [`REQUEST_TIMEOUT`]).
pub fn client(
    ca_bundle: Option<&str>,
    timeout: Option<&SpecDuration>,
) -> Result<reqwest::Client, IssuerError> {
    let timeout = request_timeout(timeout)?;
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

/// What came back, read in full (at most [`MAX_BODY`] bytes).
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
                .map(|s| excerpt(s, 200))
        };
        match (field("error"), field("error_description")) {
            (Some(e), Some(d)) => format!("HTTP {}: {e}: {d}", self.status),
            (Some(e), None) => format!("HTTP {}: {e}", self.status),
            _ => format!("HTTP {}", self.status),
        }
    }
}

/// At most `max` characters of `s` (text an issuer wrote), with control
/// characters (newlines, escapes) replaced, for a status message.
pub fn excerpt(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .take(max)
        .map(|c| if c.is_control() { '\u{FFFD}' } else { c })
        .collect();
    if s.chars().nth(max).is_some() {
        out.push('…');
    }
    out
}

/// Why a body was not read.
#[derive(Debug)]
pub enum BodyError {
    /// Larger than [`MAX_BODY`] (announced or found); reading stopped.
    TooLarge,
    /// The connection failed while reading.
    Read(reqwest::Error),
}

/// The message for a body over [`MAX_BODY`]; it never holds body bytes.
pub const TOO_LARGE: &str = "the issuer's response is larger than 1 MiB; refused";

/// Reads `resp`'s body chunk by chunk, keeping at most [`MAX_BODY`] bytes.
/// A `Content-Length` over the cap is refused before any byte is read; a
/// body that grows past it is refused as soon as it does, and the response
/// (with the connection under it) is dropped unread.
pub async fn read_body(mut resp: reqwest::Response) -> Result<Vec<u8>, BodyError> {
    let announced = resp.content_length();
    if announced.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(BodyError::TooLarge);
    }
    let hint = announced
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(0)
        .min(MAX_BODY);
    let mut body = Vec::with_capacity(hint);
    while let Some(chunk) = resp.chunk().await.map_err(BodyError::Read)? {
        if chunk.len() > MAX_BODY - body.len() {
            return Err(BodyError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// How one attempt ended.
enum Attempt {
    Answered {
        status: u16,
        retry_after: Option<Duration>,
        body: Vec<u8>,
    },
    TooLarge,
    Failed(reqwest::Error),
}

async fn attempt(request: reqwest::RequestBuilder) -> Attempt {
    let resp = match request.send().await {
        Ok(r) => r,
        Err(e) => return Attempt::Failed(e),
    };
    let status = resp.status().as_u16();
    let retry_after = retry_after(resp.headers());
    match read_body(resp).await {
        Ok(body) => Attempt::Answered {
            status,
            retry_after,
            body,
        },
        Err(BodyError::TooLarge) => Attempt::TooLarge,
        Err(BodyError::Read(e)) => Attempt::Failed(e),
    }
}

/// Sends the request `make` builds, retrying connection errors, 429 and 5xx
/// (waiting for `Retry-After` when the server says, else 0.5 s, 1 s, ...),
/// all within [`call_budget`] of the issuer's `timeout`. `what` names the
/// operation in errors ("token request").
pub async fn send<F>(
    what: &str,
    timeout: Option<&SpecDuration>,
    make: F,
) -> Result<Reply, IssuerError>
where
    F: Fn() -> reqwest::RequestBuilder,
{
    send_within(what, call_budget(request_timeout(timeout)?), make).await
}

/// [`send`] with an explicit budget for the whole call.
pub async fn send_within<F>(what: &str, budget: Duration, make: F) -> Result<Reply, IssuerError>
where
    F: Fn() -> reqwest::RequestBuilder,
{
    let started = Instant::now();
    let left = || budget.saturating_sub(started.elapsed());
    let out_of_time = |last: &str| {
        let why = if last.is_empty() {
            format!("{what}: no complete answer")
        } else {
            last.to_string()
        };
        IssuerError::Unavailable(format!(
            "{why} (gave up after {}s, the limit for one issuer call)",
            budget.as_secs_f64().ceil()
        ))
    };
    let mut last = String::new();
    for n in 1..=ATTEMPTS {
        let remaining = left();
        if remaining.is_zero() {
            return Err(out_of_time(&last));
        }
        let Ok(outcome) = tokio::time::timeout(remaining, attempt(make())).await else {
            return Err(out_of_time(&last));
        };
        let wait = match outcome {
            Attempt::Answered {
                status,
                retry_after,
                body,
            } => {
                let reply = Reply { status, body };
                if status != 429 && status < 500 {
                    return Ok(reply);
                }
                last = format!("{what}: {}", reply.describe());
                match retry_after {
                    Some(d) if d > MAX_RETRY_AFTER || d >= left() => {
                        // Waiting would outlive this call: the reconcile's
                        // own backoff takes over.
                        return Err(IssuerError::Unavailable(format!(
                            "{last}; the issuer asked to retry after {}s",
                            d.as_secs()
                        )));
                    }
                    Some(d) => d,
                    None => backoff(n),
                }
            }
            Attempt::TooLarge => {
                return Err(IssuerError::Unavailable(format!("{what}: {TOO_LARGE}")));
            }
            Attempt::Failed(e) => {
                last = format!("{what}: {}", describe_error(&e));
                if tls_problem(&e).is_some() {
                    // Retrying cannot change the server's certificate.
                    return Err(IssuerError::Unavailable(last));
                }
                backoff(n)
            }
        };
        if n == ATTEMPTS {
            break;
        }
        if wait >= left() {
            return Err(out_of_time(&last));
        }
        tokio::time::sleep(wait).await;
    }
    Err(IssuerError::Unavailable(format!(
        "{last} (after {ATTEMPTS} attempts)"
    )))
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(500u64.saturating_mul(1u64 << attempt.saturating_sub(1).min(16)))
}

/// A reachability check: any answer below 500 proves `what` (e.g. "token
/// endpoint") is there; asking it to mint would make tokens nobody uses.
/// Only the status line and headers are read: the body is dropped unread.
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

/// `Retry-After` as seconds or an HTTP date. A number of seconds too large
/// for a `u64` means "very long" ([`Duration::MAX`]); a date in the past
/// means now; anything else (negative, a fraction, garbage) is ignored.
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        return Some(v.parse::<u64>().map_or(Duration::MAX, Duration::from_secs));
    }
    if v.len() > 64 {
        return None;
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
    } else if e.is_body() || e.is_decode() {
        format!("the response from{target} broke off")
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
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// What a stand-in issuer saw.
    #[derive(Default)]
    struct Seen {
        requests: AtomicUsize,
        /// Body bytes written to the socket before it closed.
        body_bytes: AtomicUsize,
        /// Connections whose handler has returned.
        finished: AtomicUsize,
    }

    /// A plain-TCP HTTP/1.1 issuer on 127.0.0.1: `serve` answers each
    /// connection after its request head was read.
    async fn stand_in<F, Fut>(serve: F) -> (String, Arc<Seen>)
    where
        F: Fn(TcpStream, Arc<Seen>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/token", listener.local_addr().unwrap());
        let seen = Arc::new(Seen::default());
        let serve = Arc::new(serve);
        let all = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (serve, seen) = (serve.clone(), all.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    seen.requests.fetch_add(1, SeqCst);
                    serve(stream, seen.clone()).await;
                    seen.finished.fetch_add(1, SeqCst);
                });
            }
        });
        (url, seen)
    }

    /// A 200 with `total` bytes of body, chunked (no Content-Length), in
    /// 64 KiB chunks, counting what the socket accepted.
    async fn stream_body(mut s: TcpStream, seen: Arc<Seen>, total: usize) {
        let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                    Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
        if s.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let chunk = vec![b'x'; 64 * 1024];
        let frame = [format!("{:x}\r\n", chunk.len()).as_bytes(), &chunk, b"\r\n"].concat();
        let mut sent = 0;
        while sent < total {
            if s.write_all(&frame).await.is_err() {
                return;
            }
            sent += chunk.len();
            seen.body_bytes.fetch_add(chunk.len(), SeqCst);
        }
        let _ = s.write_all(b"0\r\n\r\n").await;
    }

    /// Answers with `head` (status line and headers) and an empty body.
    async fn answer(mut s: TcpStream, head: String) {
        let reply = format!("{head}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        let _ = s.write_all(reply.as_bytes()).await;
    }

    fn http() -> reqwest::Client {
        client(None, Some(&Duration::from_secs(10).into())).unwrap()
    }

    fn unavailable(r: Result<Reply, IssuerError>) -> String {
        match r {
            Err(IssuerError::Unavailable(m)) => m,
            Err(e) => panic!("not Unavailable: {e}"),
            Ok(r) => panic!("not an error: HTTP {}", r.status),
        }
    }

    #[tokio::test]
    async fn an_oversized_streamed_body_is_refused_and_not_retried() {
        let (url, seen) = stand_in(|s, seen| stream_body(s, seen, 8 << 20)).await;
        let http = http();
        let m = unavailable(
            send_within("token request", Duration::from_secs(20), || http.get(&url)).await,
        );
        assert_eq!(m, format!("token request: {TOO_LARGE}"));
        assert!(!m.contains("xx"), "no body bytes in the message");
        assert_eq!(seen.requests.load(SeqCst), 1, "never retried");
    }

    #[tokio::test]
    async fn reading_stops_soon_after_the_cap() {
        // An endless body: the stand-in writes until the operator hangs up.
        let (url, seen) = stand_in(|s, seen| stream_body(s, seen, 1 << 30)).await;
        let http = http();
        let m = unavailable(
            send_within("token request", Duration::from_secs(20), || http.get(&url)).await,
        );
        assert!(m.contains(TOO_LARGE), "{m}");
        let waited = Instant::now();
        while seen.finished.load(SeqCst) == 0 {
            assert!(
                waited.elapsed() < Duration::from_secs(10),
                "the connection was not closed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // 1 MiB kept; the rest is what socket buffers on both sides took
        // before the connection closed, far from the gigabyte on offer.
        let served = seen.body_bytes.load(SeqCst);
        assert!(served < 32 << 20, "{served} bytes were served");
    }

    #[tokio::test]
    async fn an_announced_oversized_body_is_refused_unread() {
        let (url, seen) = stand_in(|mut s, _| async move {
            let head = "HTTP/1.1 200 OK\r\nContent-Length: 8388608\r\n\r\n";
            let _ = s.write_all(head.as_bytes()).await;
            // The body never comes: only a reader that waits for it hangs.
            tokio::time::sleep(Duration::from_secs(60)).await;
        })
        .await;
        let http = http();
        let started = Instant::now();
        let m = unavailable(
            send_within("mint request", Duration::from_secs(20), || http.get(&url)).await,
        );
        assert_eq!(m, format!("mint request: {TOO_LARGE}"));
        assert!(started.elapsed() < Duration::from_secs(3));
        assert_eq!(seen.requests.load(SeqCst), 1);
    }

    #[tokio::test]
    async fn a_body_at_the_cap_is_read_whole() {
        let (url, _) = stand_in(|s, seen| stream_body(s, seen, MAX_BODY)).await;
        let http = http();
        let reply = send_within("token request", Duration::from_secs(20), || http.get(&url))
            .await
            .unwrap();
        assert_eq!(reply.status, 200);
        assert_eq!(reply.body.len(), MAX_BODY);
    }

    #[tokio::test]
    async fn a_retry_after_past_the_deadline_ends_the_call_at_once() {
        for (value, budget) in [
            ("99999999999999999999", 20),
            ("18446744073709551615", 20),
            ("86400", 20),
            ("31", 45),
            ("Thu, 30 Dec 9999 00:00:00 GMT", 20),
            ("5", 3),
        ] {
            let head = format!("HTTP/1.1 503 Service Unavailable\r\nRetry-After: {value}");
            let (url, seen) = stand_in(move |s, _| answer(s, head.clone())).await;
            let http = http();
            let started = Instant::now();
            let m = unavailable(
                send_within("token request", Duration::from_secs(budget), || {
                    http.get(&url)
                })
                .await,
            );
            assert!(m.contains("asked to retry after"), "{value}: {m}");
            assert!(m.starts_with("token request: HTTP 503"), "{value}: {m}");
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "{value}: took {:?}",
                started.elapsed()
            );
            assert_eq!(seen.requests.load(SeqCst), 1, "{value}");
        }
    }

    #[tokio::test]
    async fn a_retry_after_that_is_not_a_delay_falls_back_to_backoff() {
        for value in ["-5", "1.5", "soon"] {
            let head = format!("HTTP/1.1 503 Service Unavailable\r\nRetry-After: {value}");
            let (url, seen) = stand_in(move |s, _| answer(s, head.clone())).await;
            let http = http();
            let m = unavailable(
                send_within("token request", Duration::from_secs(20), || http.get(&url)).await,
            );
            assert!(m.ends_with("(after 3 attempts)"), "{value}: {m}");
            assert_eq!(seen.requests.load(SeqCst), 3, "{value}");
        }
    }

    #[tokio::test]
    async fn a_silent_issuer_cannot_hold_a_call_past_its_budget() {
        let (url, _) = stand_in(|s, _| async move {
            let _held = s;
            tokio::time::sleep(Duration::from_secs(60)).await;
        })
        .await;
        let http = http();
        let started = Instant::now();
        let m = unavailable(
            send_within("token request", Duration::from_millis(500), || {
                http.get(&url)
            })
            .await,
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(
            m,
            "token request: no complete answer (gave up after 1s, the limit for one issuer call)"
        );
    }

    #[tokio::test]
    async fn no_backoff_wait_outlives_the_budget() {
        // 503 without Retry-After: attempt, 0.5 s, attempt, then a 1 s wait
        // would end after the 1.2 s budget, so the call ends there.
        let (url, seen) =
            stand_in(|s, _| answer(s, "HTTP/1.1 503 Service Unavailable".to_string())).await;
        let http = http();
        let started = Instant::now();
        let m = unavailable(
            send_within("token request", Duration::from_millis(1200), || {
                http.get(&url)
            })
            .await,
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(seen.requests.load(SeqCst), 2);
        assert!(m.starts_with("token request: HTTP 503 (gave up"), "{m}");
    }

    #[tokio::test]
    async fn a_probe_reads_no_body() {
        let (url, _) = stand_in(|s, seen| stream_body(s, seen, 1 << 30)).await;
        let started = Instant::now();
        probe(http().get(&url), "token endpoint").await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn hostile_retry_after_values_never_panic() {
        let parse = |v: &str| {
            let mut h = reqwest::header::HeaderMap::new();
            h.insert(reqwest::header::RETRY_AFTER, v.parse().unwrap());
            retry_after(&h)
        };
        assert_eq!(parse("99999999999999999999"), Some(Duration::MAX));
        assert_eq!(
            parse("18446744073709551615"),
            Some(Duration::from_secs(u64::MAX))
        );
        assert_eq!(parse(" 12 "), Some(Duration::from_secs(12)));
        for v in ["-1", "+1", "1.5", "1e9", "", "NaN", &"x".repeat(4000)] {
            assert_eq!(parse(v), None, "{v}");
        }
        assert_eq!(parse(&"9".repeat(4000)), Some(Duration::MAX));
        // Past the last instant a timestamp holds: ignored, no panic.
        assert_eq!(parse("Fri, 31 Dec 9999 23:59:59 GMT"), None);
        let far = parse("Thu, 30 Dec 9999 00:00:00 GMT").unwrap();
        assert!(far > Duration::from_secs(7000 * 365 * 86400), "{far:?}");
        assert_eq!(parse("Mon, 01 Jan 0001 00:00:00 GMT"), Some(Duration::ZERO));
    }

    #[test]
    fn every_call_has_a_bounded_budget() {
        assert_eq!(call_budget(REQUEST_TIMEOUT), Duration::from_secs(25));
        assert_eq!(call_budget(Duration::from_secs(1)), Duration::from_secs(7));
        assert_eq!(call_budget(Duration::from_secs(20)), MAX_CALL);
        assert_eq!(call_budget(Duration::from_secs(30)), MAX_CALL);
        assert_eq!(call_budget(MAX_TIMEOUT), MAX_TIMEOUT);
        assert_eq!(
            call_budget(Duration::MAX),
            Duration::MAX,
            "saturates, never panics"
        );
        let t = |s: &str| request_timeout(Some(&SpecDuration::new(s)));
        assert_eq!(t("60s").unwrap(), MAX_TIMEOUT);
        assert_eq!(t("500ms").unwrap(), Duration::from_millis(500));
        for bad in ["61s", "10h", "-5s", "0s"] {
            assert!(matches!(t(bad), Err(IssuerError::Invalid(_))), "{bad}");
        }
        assert_eq!(request_timeout(None).unwrap(), REQUEST_TIMEOUT);
    }

    #[test]
    fn excerpts_are_short_and_clean() {
        assert_eq!(excerpt("ok", 10), "ok");
        assert_eq!(excerpt("a\nb\u{1b}[31mc", 10), "a\u{FFFD}b\u{FFFD}[31mc");
        let long = excerpt(&"é".repeat(10_000), 256);
        assert_eq!(long.chars().count(), 257);
        assert!(long.ends_with('…'));
    }

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
            client(None, Some(&Duration::ZERO.into())),
            Err(IssuerError::Invalid(_))
        ));
        assert!(client(None, None).is_ok());
        assert!(client(None, Some(&Duration::from_secs(2).into())).is_ok());
    }
}

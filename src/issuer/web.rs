//! HTTP for issuers that speak it: one client per issuer with its CA
//! bundle and timeouts, retries that honour `Retry-After`, and error
//! messages that never carry a request body, a token or a secret.
//!
//! An issuer's answer is foreign input: every body is read through
//! [`read_body`], which keeps at most [`MAX_BODY`] bytes, and one logical
//! call (all its attempts and waits) ends within [`call_budget`].
//!
//! Where a request may go is the issuer's [`Egress`]: a namespaced
//! TokenIssuer (written by namespace admins, who are not trusted) may not
//! call loopback, link-local or cloud metadata addresses, nor plain http,
//! unless the operator's flags allow it. IP literals are checked before a
//! request is sent; host names after they are resolved, at connect time
//! (see [`EgressResolver`]), so DNS cannot point a request past the rule.

use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use crate::duration::SpecDuration;

use kube::Client;
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

/// How the platform can allow what [`Egress`] refused; ends every refusal.
const HOW_TO_ALLOW: &str = "a namespaced TokenIssuer may not call it (the operator's \
    --issuer-allow-cidr allows ranges; use a ClusterTokenIssuer for platform endpoints)";

/// Where an issuer's HTTP requests may go.
///
/// [`Egress::platform`] (a ClusterTokenIssuer, written by the platform)
/// goes anywhere. [`Egress::tenant`] (a namespaced TokenIssuer) refuses
/// plain http unless `allow_http`, and destinations that are loopback,
/// link-local, unspecified or a cloud metadata address (also in their
/// IPv4-mapped and NAT64 forms) unless a range in `allowed` holds them.
/// Private ranges (10/8, 172.16/12, 192.168/16, fc00::/7) stay open:
/// internal identity providers live there. The default is the strictest
/// tenant rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Egress {
    /// `false` for the platform's issuers: nothing is checked.
    restricted: bool,
    allow_http: bool,
    allowed: Vec<ipnet::IpNet>,
}

impl Default for Egress {
    fn default() -> Self {
        Egress::tenant(false, Vec::new())
    }
}

/// Why a destination was refused; found again in a transport error's causes
/// (the resolver's refusal travels inside reqwest's connect error).
#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// Parses one `--issuer-allow-cidr` entry: `10.1.0.0/16`, `::1/128`, or a
/// bare address (one host).
pub fn parse_cidr(s: &str) -> Result<ipnet::IpNet, String> {
    let s = s.trim();
    if let Ok(net) = s.parse::<ipnet::IpNet>() {
        return Ok(net.trunc());
    }
    s.parse::<IpAddr>()
        .map(ipnet::IpNet::from)
        .map_err(|_| format!("{s:?} is not a CIDR range like 10.0.0.0/8 or fd00::/8"))
}

/// What kind of refused destination `ip` is, whatever the rule's
/// allowances: `None` for any other address.
pub fn forbidden_class(ip: IpAddr) -> Option<String> {
    fn v4(ip: Ipv4Addr) -> Option<&'static str> {
        if METADATA_V4.contains(&ip) {
            Some("a cloud metadata address")
        } else if ip.is_loopback() {
            Some("loopback")
        } else if ip.is_link_local() {
            Some("link-local")
        } else if ip.octets()[0] == 0 {
            Some("unspecified")
        } else {
            None
        }
    }
    match ip {
        IpAddr::V4(a) => v4(a).map(str::to_string),
        IpAddr::V6(a) => {
            if a == METADATA_V6 {
                Some("a cloud metadata address".into())
            } else if a.is_loopback() {
                Some("loopback".into())
            } else if a.is_unspecified() {
                Some("unspecified".into())
            } else if a.is_unicast_link_local() {
                Some("link-local".into())
            } else if let Some((inner, form)) = embedded_v4(a) {
                v4(inner).map(|c| format!("{c} ({form} {inner})"))
            } else {
                None
            }
        }
    }
}

/// Cloud metadata services reachable by IPv4: AWS, GCP, Azure, OpenStack
/// and others at 169.254.169.254; Alibaba Cloud at 100.100.100.200.
const METADATA_V4: [Ipv4Addr; 2] = [
    Ipv4Addr::new(169, 254, 169, 254),
    Ipv4Addr::new(100, 100, 100, 200),
];
/// AWS's instance metadata service over IPv6.
const METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);

/// The IPv4 address an IPv6 one stands for: IPv4-mapped (`::ffff:a.b.c.d`)
/// or NAT64 (`64:ff9b::a.b.c.d`), with the form's name.
fn embedded_v4(a: Ipv6Addr) -> Option<(Ipv4Addr, &'static str)> {
    if let Some(v4) = a.to_ipv4_mapped() {
        return Some((v4, "IPv4-mapped"));
    }
    let s = a.segments();
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let [_, _, _, _, _, _, _, _, _, _, _, _, b0, b1, b2, b3] = a.octets();
        return Some((Ipv4Addr::new(b0, b1, b2, b3), "NAT64"));
    }
    None
}

impl Egress {
    /// The platform's rule (ClusterTokenIssuer): anything goes.
    pub fn platform() -> Self {
        Egress {
            restricted: false,
            allow_http: true,
            allowed: Vec::new(),
        }
    }

    /// The rule for a namespaced TokenIssuer: `allow_http` lets it use
    /// plain http; `allowed` ranges may be called even when loopback,
    /// link-local or metadata (the operator's `--issuer-allow-http` and
    /// `--issuer-allow-cidr`).
    pub fn tenant(allow_http: bool, allowed: Vec<ipnet::IpNet>) -> Self {
        Egress {
            restricted: true,
            allow_http,
            allowed,
        }
    }

    /// Whether anything is checked (a namespaced TokenIssuer's rule).
    pub fn is_restricted(&self) -> bool {
        self.restricted
    }

    /// Whether a range given by flag holds `ip` (or the IPv4 address it
    /// stands for).
    fn allows(&self, ip: IpAddr) -> bool {
        let inner = match ip {
            IpAddr::V6(a) => embedded_v4(a).map(|(v4, _)| IpAddr::V4(v4)),
            IpAddr::V4(_) => None,
        };
        self.allowed
            .iter()
            .any(|net| net.contains(&ip) || inner.is_some_and(|v4| net.contains(&v4)))
    }

    /// Why this rule refuses `ip` (shown as `shown`), or `None`.
    fn refusal(&self, ip: IpAddr, shown: &str) -> Option<String> {
        if !self.restricted || self.allows(ip) {
            return None;
        }
        forbidden_class(ip).map(|class| format!("destination {shown} is {class}: {HOW_TO_ALLOW}"))
    }

    /// Why this rule refuses to call `ip`, or `None`.
    pub fn refuses(&self, ip: IpAddr) -> Option<String> {
        self.refusal(ip, &ip.to_string())
    }

    /// Checks a request's URL before it is sent: an IP-literal host, then
    /// the scheme. Host names are checked once resolved ([`EgressResolver`]).
    pub fn check_url(&self, url: &reqwest::Url) -> Result<(), IssuerError> {
        if !self.restricted {
            return Ok(());
        }
        let host = url.host_str().unwrap_or("");
        let literal = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if let Ok(ip) = literal.parse::<IpAddr>()
            && let Some(m) = self.refuses(ip)
        {
            return Err(IssuerError::Invalid(m));
        }
        if url.scheme() != "https" && !self.allow_http {
            let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
            return Err(IssuerError::Invalid(format!(
                "{}://{host}{port} is not https: a namespaced TokenIssuer must use https \
                 (the operator's --issuer-allow-http allows plain http; use a \
                 ClusterTokenIssuer for platform endpoints)",
                url.scheme()
            )));
        }
        Ok(())
    }

    /// What of `found` (the addresses `host` resolved to) may be called:
    /// refused addresses are dropped; an error when none remain.
    fn filter(&self, host: &str, found: Vec<SocketAddr>) -> Result<Vec<SocketAddr>, Refused> {
        let mut first_refusal = None;
        let kept: Vec<SocketAddr> = found
            .into_iter()
            .filter(|a| {
                let refusal = self.refusal(a.ip(), &format!("{host} ({})", a.ip()));
                let keep = refusal.is_none();
                if first_refusal.is_none() {
                    first_refusal = refusal;
                }
                keep
            })
            .collect();
        match first_refusal {
            Some(m) if kept.is_empty() => Err(Refused(m)),
            _ => Ok(kept),
        }
    }
}

/// Resolves host names for a client with a restricted [`Egress`], dropping
/// the addresses it refuses. It runs when the connection is made, so what
/// is checked is what is dialled: a name that resolves (or rebinds) to
/// 127.0.0.1 or 169.254.169.254 cannot be called.
pub struct EgressResolver {
    egress: Egress,
}

impl reqwest::dns::Resolve for EgressResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let egress = self.egress.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let kept = egress.filter(&host, found)?;
            Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The egress refusal among a transport error's causes, if any.
fn refused(e: &reqwest::Error) -> Option<String> {
    let mut cause: Option<&dyn std::error::Error> = Some(e);
    while let Some(c) = cause {
        if let Some(r) = c.downcast_ref::<Refused>() {
            return Some(r.0.clone());
        }
        cause = c.source();
    }
    None
}

/// Builds a client that trusts the system roots plus `ca_bundle` (PEM) and
/// gives each request `timeout` (default [`REQUEST_TIMEOUT`]). Redirects are
/// never followed. With a restricted `egress`, host names resolve through
/// [`EgressResolver`] and no proxy is used (a proxy would resolve names
/// itself, past the rule).
///
/// Clients are kept by what they are built from and reused: a mint does not
/// pay for a new TLS configuration and a new connection each time (a
/// reqwest client is a handle to one connection pool). Issuers with the
/// same CA bundle, timeout and egress rule share one; requests carry their
/// own credentials, so sharing a pool shares nothing else.
pub fn client(
    ca_bundle: Option<&str>,
    timeout: Option<&SpecDuration>,
    egress: &Egress,
) -> Result<reqwest::Client, IssuerError> {
    let timeout = request_timeout(timeout)?;
    let ca_bundle = ca_bundle.filter(|p| !p.trim().is_empty());
    let key = CLIENTS.hasher.hash_one((ca_bundle, timeout, egress));
    let mut clients = CLIENTS.map.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(c) = clients.get(&key) {
        return Ok(c.clone());
    }
    let built = build_client(ca_bundle, timeout, egress)?;
    if clients.len() >= MAX_CLIENTS {
        // Many distinct configurations (tenants' issuers): start over
        // rather than grow; a dropped client closes its idle connections.
        clients.clear();
    }
    clients.insert(key, built.clone());
    Ok(built)
}

/// Most HTTP clients kept at once.
const MAX_CLIENTS: usize = 256;

/// The kept clients, by a hash of what they were built from (keyed per
/// process, so no configuration can be made to stand for another).
struct Clients {
    hasher: std::collections::hash_map::RandomState,
    map: std::sync::Mutex<std::collections::HashMap<u64, reqwest::Client>>,
}

static CLIENTS: std::sync::LazyLock<Clients> = std::sync::LazyLock::new(|| Clients {
    hasher: Default::default(),
    map: Default::default(),
});

fn build_client(
    ca_bundle: Option<&str>,
    timeout: Duration,
    egress: &Egress,
) -> Result<reqwest::Client, IssuerError> {
    let mut b = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("agent-token-operator/", env!("CARGO_PKG_VERSION")));
    if egress.is_restricted() {
        b = b
            .dns_resolver(Arc::new(EgressResolver {
                egress: egress.clone(),
            }))
            .no_proxy();
    }
    if let Some(pem) = ca_bundle {
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
    /// The egress rule refused the destination; nothing was sent.
    Refused(String),
    Failed(reqwest::Error),
}

/// Why a request got no response.
enum NotSent {
    /// The egress rule refused the destination: before the request for an
    /// IP literal, at connect time for a host name.
    Refused(String),
    Failed(reqwest::Error),
}

/// Sends `request` if `egress` lets it go where it points.
async fn dispatch(
    request: reqwest::RequestBuilder,
    egress: &Egress,
) -> Result<reqwest::Response, NotSent> {
    let (client, request) = request.build_split();
    let request = request.map_err(NotSent::Failed)?;
    if let Err(e) = egress.check_url(request.url()) {
        return Err(NotSent::Refused(e.to_string()));
    }
    client
        .execute(request)
        .await
        .map_err(|e| match refused(&e) {
            Some(m) => NotSent::Refused(m),
            None => NotSent::Failed(e),
        })
}

async fn attempt(request: reqwest::RequestBuilder, egress: &Egress) -> Attempt {
    let resp = match dispatch(request, egress).await {
        Ok(r) => r,
        Err(NotSent::Refused(m)) => return Attempt::Refused(m),
        Err(NotSent::Failed(e)) => return Attempt::Failed(e),
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
/// operation in errors ("token request"). A destination `egress` refuses is
/// an [`IssuerError::Invalid`], never sent and never retried.
/// An RFC 7662 introspection answer: `Ok(true)` when the token is not
/// active. Only the status and `active` are read: the rest is foreign and
/// was shown the token.
pub fn introspection_answer(reply: &Reply) -> Result<bool, String> {
    if !(200..300).contains(&reply.status) {
        return Err(format!("introspection refused: HTTP {}", reply.status));
    }
    let answer: serde_json::Value = serde_json::from_slice(&reply.body)
        .map_err(|_| "introspection answered something that is not JSON".to_string())?;
    match answer.get("active").and_then(|a| a.as_bool()) {
        Some(active) => Ok(!active),
        None => Err("introspection answered without \"active\"".into()),
    }
}

pub async fn send<F>(
    what: &str,
    timeout: Option<&SpecDuration>,
    egress: &Egress,
    make: F,
) -> Result<Reply, IssuerError>
where
    F: Fn() -> reqwest::RequestBuilder,
{
    send_maybe_creating(what, timeout, egress, false, make).await
}

/// [`send`] for a request that creates something (a mint): it is sent
/// again only when the last attempt surely did not arrive (no connection)
/// or was answered with an error. After one that may have arrived and got
/// no answer, a second could create a second token: the call ends
/// [`IssuerError::Ambiguous`] instead.
pub async fn send_creating<F>(
    what: &str,
    timeout: Option<&SpecDuration>,
    egress: &Egress,
    make: F,
) -> Result<Reply, IssuerError>
where
    F: Fn() -> reqwest::RequestBuilder,
{
    send_maybe_creating(what, timeout, egress, true, make).await
}

/// [`send_creating`] when `creates`, else [`send`].
pub async fn send_maybe_creating<F>(
    what: &str,
    timeout: Option<&SpecDuration>,
    egress: &Egress,
    creates: bool,
    make: F,
) -> Result<Reply, IssuerError>
where
    F: Fn() -> reqwest::RequestBuilder,
{
    send_with(
        what,
        call_budget(request_timeout(timeout)?),
        egress,
        !creates,
        make,
    )
    .await
}

/// [`send`] with an explicit budget for the whole call.
pub async fn send_within<F>(
    what: &str,
    budget: Duration,
    egress: &Egress,
    make: F,
) -> Result<Reply, IssuerError>
where
    F: Fn() -> reqwest::RequestBuilder,
{
    send_with(what, budget, egress, true, make).await
}

/// The call behind [`send`] and [`send_creating`]; `resend_unanswered`:
/// whether an attempt that may have arrived is sent again.
async fn send_with<F>(
    what: &str,
    budget: Duration,
    egress: &Egress,
    resend_unanswered: bool,
    make: F,
) -> Result<Reply, IssuerError>
where
    F: Fn() -> reqwest::RequestBuilder,
{
    let started = Instant::now();
    let left = || budget.saturating_sub(started.elapsed());
    // Whether an attempt may have reached the issuer without an answer
    // coming back: then the issuer may have acted on it.
    let mut unanswered = false;
    let fail = |unanswered: bool, m: String| {
        if unanswered {
            IssuerError::Ambiguous(format!("{m}; the issuer may have acted on it"))
        } else {
            IssuerError::Unavailable(m)
        }
    };
    let out_of_time = |last: &str| {
        let why = if last.is_empty() {
            format!("{what}: no complete answer")
        } else {
            last.to_string()
        };
        format!(
            "{why} (gave up after {}s, the limit for one issuer call)",
            budget.as_secs_f64().ceil()
        )
    };
    let mut last = String::new();
    for n in 1..=ATTEMPTS {
        let remaining = left();
        if remaining.is_zero() {
            return Err(fail(unanswered, out_of_time(&last)));
        }
        let Ok(outcome) = tokio::time::timeout(remaining, attempt(make(), egress)).await else {
            // Cut off mid-attempt: it may have been sent.
            return Err(fail(true, out_of_time(&last)));
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
                // A gateway in front of the issuer gave up waiting (502,
                // 504): the issuer itself may have acted on the request.
                if matches!(status, 502 | 504) {
                    unanswered = true;
                    if !resend_unanswered {
                        return Err(fail(true, last));
                    }
                }
                match retry_after {
                    Some(d) if d > MAX_RETRY_AFTER || d >= left() => {
                        // Waiting would outlive this call: the reconcile's
                        // own backoff takes over.
                        return Err(fail(
                            unanswered,
                            format!("{last}; the issuer asked to retry after {}s", d.as_secs()),
                        ));
                    }
                    Some(d) => d,
                    None => backoff(n),
                }
            }
            // Answered, but not readably: whatever it said is lost.
            Attempt::TooLarge => {
                return Err(fail(true, format!("{what}: {TOO_LARGE}")));
            }
            Attempt::Refused(m) => return Err(IssuerError::Invalid(format!("{what}: {m}"))),
            Attempt::Failed(e) => {
                last = format!("{what}: {}", describe_error(&e));
                if tls_problem(&e).is_some() {
                    // Retrying cannot change the server's certificate.
                    return Err(fail(unanswered, last));
                }
                // Not connected: nothing was sent. Anything later (a
                // timeout, a connection lost, a body cut short) may have
                // reached the issuer.
                if !e.is_connect() {
                    unanswered = true;
                    if !resend_unanswered {
                        return Err(fail(true, last));
                    }
                }
                backoff(n)
            }
        };
        if n == ATTEMPTS {
            break;
        }
        if wait >= left() {
            return Err(fail(unanswered, out_of_time(&last)));
        }
        tokio::time::sleep(wait).await;
    }
    Err(fail(
        unanswered,
        format!("{last} (after {ATTEMPTS} attempts)"),
    ))
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(500u64.saturating_mul(1u64 << attempt.saturating_sub(1).min(16)))
}

/// A reachability check: any answer below 500 proves `what` (e.g. "token
/// endpoint") is there; asking it to mint would make tokens nobody uses.
/// Only the status line and headers are read: the body is dropped unread.
/// A destination `egress` refuses is an [`IssuerError::Invalid`].
pub async fn probe(
    request: reqwest::RequestBuilder,
    what: &str,
    egress: &Egress,
) -> Result<(), IssuerError> {
    match dispatch(request, egress).await {
        Ok(r) if r.status().as_u16() < 500 => Ok(()),
        Ok(r) => Err(IssuerError::Unavailable(format!(
            "{what} answers HTTP {}",
            r.status().as_u16()
        ))),
        Err(NotSent::Refused(m)) => Err(IssuerError::Invalid(format!("{what}: {m}"))),
        Err(NotSent::Failed(e)) => Err(IssuerError::Unavailable(format!(
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
    // From the Secret's own watch once it runs: not a GET per mint.
    let secret = match crate::watched::SECRETS
        .get(client, namespace, &r.name)
        .await
    {
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
    fn introspection_answers_are_read_for_active_alone() {
        let reply = |status: u16, body: &str| Reply {
            status,
            body: body.as_bytes().to_vec(),
        };
        assert_eq!(
            introspection_answer(&reply(200, r#"{"active": false}"#)),
            Ok(true)
        );
        assert_eq!(
            introspection_answer(&reply(200, r#"{"active": true, "sub": "x"}"#)),
            Ok(false)
        );
        // Not an answer: an error that names nothing the service said.
        let secretive = r#"{"error": "the token abc is bad"}"#;
        for r in [
            reply(500, secretive),
            reply(200, secretive),
            reply(200, "<html>"),
        ] {
            let e = introspection_answer(&r).unwrap_err();
            assert!(!e.contains("abc"), "{e}");
        }
        assert_eq!(
            introspection_answer(&reply(200, r#"{"active": "no"}"#)),
            Err("introspection answered without \"active\"".into())
        );
    }
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// What a stand-in issuer saw.
    #[derive(Default)]
    struct Seen {
        /// TCP connections accepted.
        connections: AtomicUsize,
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
                all.connections.fetch_add(1, SeqCst);
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
        client(
            None,
            Some(&Duration::from_secs(10).into()),
            &Egress::platform(),
        )
        .unwrap()
    }

    fn unavailable(r: Result<Reply, IssuerError>) -> String {
        match r {
            Err(IssuerError::Unavailable(m) | IssuerError::Ambiguous(m)) => m,
            Err(e) => panic!("not Unavailable: {e}"),
            Ok(r) => panic!("not an error: HTTP {}", r.status),
        }
    }

    #[tokio::test]
    async fn an_oversized_streamed_body_is_refused_and_not_retried() {
        let (url, seen) = stand_in(|s, seen| stream_body(s, seen, 8 << 20)).await;
        let http = http();
        let m = unavailable(
            send_within(
                "token request",
                Duration::from_secs(20),
                &Egress::platform(),
                || http.get(&url),
            )
            .await,
        );
        assert_eq!(
            m,
            format!("token request: {TOO_LARGE}; the issuer may have acted on it")
        );
        assert!(!m.contains("xx"), "no body bytes in the message");
        assert_eq!(seen.requests.load(SeqCst), 1, "never retried");
    }

    #[tokio::test]
    async fn reading_stops_soon_after_the_cap() {
        // An endless body: the stand-in writes until the operator hangs up.
        let (url, seen) = stand_in(|s, seen| stream_body(s, seen, 1 << 30)).await;
        let http = http();
        let m = unavailable(
            send_within(
                "token request",
                Duration::from_secs(20),
                &Egress::platform(),
                || http.get(&url),
            )
            .await,
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
            send_within(
                "mint request",
                Duration::from_secs(20),
                &Egress::platform(),
                || http.get(&url),
            )
            .await,
        );
        assert_eq!(
            m,
            format!("mint request: {TOO_LARGE}; the issuer may have acted on it")
        );
        assert!(started.elapsed() < Duration::from_secs(3));
        assert_eq!(seen.requests.load(SeqCst), 1);
    }

    #[tokio::test]
    async fn a_body_at_the_cap_is_read_whole() {
        let (url, _) = stand_in(|s, seen| stream_body(s, seen, MAX_BODY)).await;
        let http = http();
        let reply = send_within(
            "token request",
            Duration::from_secs(20),
            &Egress::platform(),
            || http.get(&url),
        )
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
                send_within(
                    "token request",
                    Duration::from_secs(budget),
                    &Egress::platform(),
                    || http.get(&url),
                )
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
                send_within(
                    "token request",
                    Duration::from_secs(20),
                    &Egress::platform(),
                    || http.get(&url),
                )
                .await,
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
            send_within(
                "token request",
                Duration::from_millis(500),
                &Egress::platform(),
                || http.get(&url),
            )
            .await,
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(
            m,
            "token request: no complete answer (gave up after 1s, the limit for one issuer call); the issuer may have acted on it"
        );
    }

    /// A request that reached the issuer and got no answer may have been
    /// acted on (a mint then records that a token may exist); one that
    /// never connected, or was answered with an error, was not.
    #[tokio::test]
    async fn only_a_request_that_may_have_arrived_is_ambiguous() {
        let (silent, _) = stand_in(|s, _| async move {
            let _held = s;
            tokio::time::sleep(Duration::from_secs(60)).await;
        })
        .await;
        let (cut, _) = stand_in(|s, _| async move { drop(s) }).await;
        let (busy, _) = stand_in(|mut s, _| async move {
            let _ = s
                .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
                .await;
        })
        .await;
        let (gateway, _) = stand_in(|mut s, _| async move {
            let _ = s
                .write_all(b"HTTP/1.1 504 Gateway Timeout\r\ncontent-length: 0\r\n\r\n")
                .await;
        })
        .await;
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}/token", l.local_addr().unwrap())
        };
        let http = http();
        for (case, url, ambiguous) in [
            ("no answer", &silent, true),
            ("connection closed after the request", &cut, true),
            ("answered 503", &busy, false),
            ("a gateway gave up waiting (504)", &gateway, true),
            ("nothing listening", &closed, false),
        ] {
            let r = send_within(
                "mint",
                Duration::from_millis(1500),
                &Egress::platform(),
                || http.post(url.as_str()),
            )
            .await;
            match r {
                Err(e) => assert_eq!(e.is_ambiguous(), ambiguous, "{case}: {e}"),
                Ok(r) => panic!("{case}: answered HTTP {}", r.status),
            }
        }
    }

    /// A mint that may have arrived is never sent again: a second could
    /// mint a second token no one records.
    #[tokio::test]
    async fn a_creating_request_that_may_have_arrived_is_not_sent_again() {
        let (cut, seen) = stand_in(|s, _| async move { drop(s) }).await;
        let http = http();
        let timeout = SpecDuration::from(Duration::from_secs(1));
        let r = send_creating("mint request", Some(&timeout), &Egress::platform(), || {
            http.post(cut.as_str())
        })
        .await;
        assert!(
            r.as_ref().is_err_and(IssuerError::is_ambiguous),
            "{:?}",
            r.err()
        );
        assert_eq!(seen.requests.load(SeqCst), 1, "sent once");
        // An idempotent call is retried.
        let _ = send("revoke", Some(&timeout), &Egress::platform(), || {
            http.post(cut.as_str())
        })
        .await;
        assert!(seen.requests.load(SeqCst) > 2, "retried");
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
            send_within(
                "token request",
                Duration::from_millis(1200),
                &Egress::platform(),
                || http.get(&url),
            )
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
        probe(http().get(&url), "token endpoint", &Egress::platform())
            .await
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn nets(list: &[&str]) -> Vec<ipnet::IpNet> {
        list.iter().map(|n| parse_cidr(n).unwrap()).collect()
    }

    fn invalid<T>(r: Result<T, IssuerError>) -> String {
        match r {
            Err(IssuerError::Invalid(m)) => m,
            Err(e) => panic!("not Invalid: {e}"),
            Ok(_) => panic!("not refused"),
        }
    }

    #[test]
    fn destinations_are_classified_in_v4_v6_and_mapped_forms() {
        let class = |s: &str| forbidden_class(ip(s));
        for (addr, want) in [
            ("127.0.0.1", "loopback"),
            ("127.255.255.254", "loopback"),
            ("169.254.0.1", "link-local"),
            ("169.254.169.254", "a cloud metadata address"),
            ("100.100.100.200", "a cloud metadata address"),
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "unspecified"),
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("fe80::1", "link-local"),
            ("febf:ffff::1", "link-local"),
            ("fd00:ec2::254", "a cloud metadata address"),
            ("::ffff:127.0.0.1", "loopback (IPv4-mapped 127.0.0.1)"),
            ("::ffff:0.0.0.0", "unspecified (IPv4-mapped 0.0.0.0)"),
            (
                "::ffff:169.254.169.254",
                "a cloud metadata address (IPv4-mapped 169.254.169.254)",
            ),
            ("::ffff:169.254.3.4", "link-local (IPv4-mapped 169.254.3.4)"),
            (
                "64:ff9b::a9fe:a9fe",
                "a cloud metadata address (NAT64 169.254.169.254)",
            ),
        ] {
            assert_eq!(class(addr).as_deref(), Some(want), "{addr}");
        }
        // Private and public ranges stay open: internal IdPs live there.
        for addr in [
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "100.64.0.1",
            "100.100.100.201",
            "8.8.8.8",
            "fd00:ec2::253",
            "fd12:3456::1",
            "fec0::1",
            "2001:db8::1",
            "::ffff:10.0.0.1",
            "64:ff9b::808:808",
        ] {
            assert_eq!(class(addr), None, "{addr}");
        }
    }

    #[test]
    fn tenants_are_refused_unless_a_flag_allows_the_range() {
        let strict = Egress::tenant(false, Vec::new());
        assert_eq!(strict, Egress::default());
        assert_eq!(
            strict.refuses(ip("127.0.0.1")).unwrap(),
            "destination 127.0.0.1 is loopback: a namespaced TokenIssuer may not call it \
             (the operator's --issuer-allow-cidr allows ranges; use a ClusterTokenIssuer \
             for platform endpoints)"
        );
        assert!(
            strict
                .refuses(ip("fd00:ec2::254"))
                .unwrap()
                .contains("fd00:ec2::254 is a cloud metadata address")
        );
        assert_eq!(strict.refuses(ip("10.1.2.3")), None);
        let platform = Egress::platform();
        for addr in ["127.0.0.1", "::1", "169.254.169.254", "fd00:ec2::254"] {
            assert_eq!(platform.refuses(ip(addr)), None, "{addr}");
        }
        let local = Egress::tenant(false, nets(&["127.0.0.0/8"]));
        assert_eq!(local.refuses(ip("127.0.0.1")), None);
        assert_eq!(local.refuses(ip("::ffff:127.0.0.1")), None, "mapped");
        assert!(local.refuses(ip("::1")).is_some());
        assert!(local.refuses(ip("169.254.169.254")).is_some());
        let metadata = Egress::tenant(false, nets(&["169.254.169.254/32", "fe80::/10"]));
        assert_eq!(metadata.refuses(ip("169.254.169.254")), None);
        assert_eq!(metadata.refuses(ip("fe80::1")), None);
        assert!(metadata.refuses(ip("169.254.169.253")).is_some());
    }

    #[test]
    fn cidr_flags_parse() {
        assert_eq!(
            parse_cidr(" 127.0.0.0/8 ").unwrap().to_string(),
            "127.0.0.0/8"
        );
        assert_eq!(parse_cidr("::1/128").unwrap().to_string(), "::1/128");
        assert_eq!(parse_cidr("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(parse_cidr("127.0.0.1").unwrap().to_string(), "127.0.0.1/32");
        assert_eq!(
            parse_cidr("fd00:ec2::254").unwrap().to_string(),
            "fd00:ec2::254/128"
        );
        for bad in ["", "nope", "10.0.0.0/33", "::1/129", "10.0.0.0/8/8"] {
            assert!(parse_cidr(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn urls_are_checked_before_sending() {
        let check = |e: &Egress, u: &str| e.check_url(&reqwest::Url::parse(u).unwrap());
        let strict = Egress::tenant(false, Vec::new());
        for (url, needle) in [
            ("https://127.0.0.1/token", "127.0.0.1 is loopback"),
            ("https://2130706433/token", "127.0.0.1 is loopback"),
            ("https://0x7f.1/token", "127.0.0.1 is loopback"),
            ("https://[::1]:8200/v1", "::1 is loopback"),
            ("https://[::ffff:7f00:1]/", "IPv4-mapped 127.0.0.1"),
            ("https://169.254.169.254/latest/meta-data", "metadata"),
            ("https://[fd00:ec2::254]/latest", "metadata"),
            ("https://100.100.100.200/latest", "metadata"),
            ("https://0.0.0.0:8080/", "unspecified"),
            // The destination is named before the scheme.
            ("http://127.0.0.1:9/mint", "127.0.0.1 is loopback"),
        ] {
            let m = invalid(check(&strict, url));
            assert!(m.contains(needle), "{url}: {m}");
        }
        let m = invalid(check(&strict, "http://idp.internal:8080/token?secret=x"));
        assert_eq!(
            m,
            "http://idp.internal:8080 is not https: a namespaced TokenIssuer must use https \
             (the operator's --issuer-allow-http allows plain http; use a ClusterTokenIssuer \
             for platform endpoints)"
        );
        check(&strict, "https://idp.internal/token").unwrap();
        check(&strict, "https://10.0.0.7/token").unwrap();
        let http = Egress::tenant(true, Vec::new());
        check(&http, "http://10.0.0.7/token").unwrap();
        assert!(invalid(check(&http, "http://127.0.0.1/")).contains("loopback"));
        let platform = Egress::platform();
        check(&platform, "http://127.0.0.1:9/mint").unwrap();
        check(&platform, "http://169.254.169.254/").unwrap();
    }

    #[tokio::test]
    async fn an_ip_literal_is_refused_without_a_connection() {
        let (url, seen) = stand_in(|s, _| answer(s, "HTTP/1.1 200 OK".to_string())).await;
        let port = url.rsplit(':').next().unwrap().trim_end_matches("/token");
        let mapped = format!("http://[::ffff:127.0.0.1]:{port}/token");
        for egress in [Egress::tenant(true, Vec::new()), Egress::default()] {
            let http = client(None, None, &egress).unwrap();
            for target in [&url, &mapped] {
                let started = Instant::now();
                let m = invalid(
                    send_within("mint request", Duration::from_secs(20), &egress, || {
                        http.post(target)
                    })
                    .await,
                );
                assert!(m.starts_with("mint request: destination "), "{m}");
                assert!(m.contains("loopback"), "{m}");
                assert!(started.elapsed() < Duration::from_secs(1), "never retried");
                let m = invalid(probe(http.head(target), "mint endpoint", &egress).await);
                assert!(m.starts_with("mint endpoint: destination "), "{m}");
            }
        }
        assert_eq!(seen.connections.load(SeqCst), 0);
        // The platform's client reaches the same stand-in.
        let platform = Egress::platform();
        let http = client(None, None, &platform).unwrap();
        let reply = send_within("mint request", Duration::from_secs(20), &platform, || {
            http.post(&url)
        })
        .await
        .unwrap();
        assert_eq!(reply.status, 200);
        assert_eq!(seen.requests.load(SeqCst), 1);
    }

    #[tokio::test]
    async fn a_name_resolving_to_loopback_is_refused_at_connect_time() {
        let (url, seen) = stand_in(|s, _| answer(s, "HTTP/1.1 200 OK".to_string())).await;
        let by_name = url.replace("127.0.0.1", "localhost");
        let egress = Egress::tenant(true, Vec::new());
        let http = client(None, None, &egress).unwrap();
        let started = Instant::now();
        let m = invalid(
            send_within("token request", Duration::from_secs(20), &egress, || {
                http.get(&by_name)
            })
            .await,
        );
        assert!(
            m.starts_with("token request: destination localhost ("),
            "{m}"
        );
        assert!(m.contains(") is loopback: "), "{m}");
        assert!(m.contains("--issuer-allow-cidr"), "{m}");
        assert!(started.elapsed() < Duration::from_secs(1), "never retried");
        let m = invalid(probe(http.get(&by_name), "token endpoint", &egress).await);
        assert!(m.contains("localhost ("), "{m}");
        assert_eq!(seen.connections.load(SeqCst), 0);
        // Allowed by flag: the same name reaches the stand-in.
        let egress = Egress::tenant(true, nets(&["127.0.0.0/8", "::1/128"]));
        let http = client(None, None, &egress).unwrap();
        let reply = send_within("token request", Duration::from_secs(20), &egress, || {
            http.get(&by_name)
        })
        .await
        .unwrap();
        assert_eq!(reply.status, 200);
        assert_eq!(seen.requests.load(SeqCst), 1);
    }

    #[tokio::test]
    async fn the_resolver_drops_refused_addresses() {
        use reqwest::dns::Resolve;
        let resolve = |egress: Egress| async move {
            EgressResolver { egress }
                .resolve("localhost".parse().unwrap())
                .await
                .map(|addrs| addrs.collect::<Vec<_>>())
        };
        let e = resolve(Egress::tenant(true, Vec::new())).await.unwrap_err();
        let refusal = e.downcast_ref::<Refused>().expect("a refusal");
        assert!(refusal.0.contains("localhost ("), "{refusal}");
        let v4 = resolve(Egress::tenant(false, nets(&["127.0.0.0/8"])))
            .await
            .unwrap();
        assert!(!v4.is_empty());
        assert!(v4.iter().all(|a| a.ip() == ip("127.0.0.1")), "{v4:?}");
        let platform = resolve(Egress::platform()).await.unwrap();
        assert!(!platform.is_empty());
        // A name with a refused and an allowed address keeps the allowed one.
        let addr = |s: &str| SocketAddr::new(ip(s), 0);
        let strict = Egress::default();
        let kept = strict
            .filter(
                "idp.internal",
                vec![addr("169.254.169.254"), addr("10.0.0.5"), addr("::1")],
            )
            .unwrap();
        assert_eq!(kept, vec![addr("10.0.0.5")]);
        let e = strict
            .filter("rebound.example", vec![addr("::ffff:127.0.0.1")])
            .unwrap_err();
        assert!(
            e.0.starts_with("destination rebound.example (::ffff:127.0.0.1) is loopback"),
            "{e}"
        );
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
            client(Some("not pem"), None, &Egress::platform()),
            Err(IssuerError::Invalid(_))
        ));
        assert!(matches!(
            client(None, Some(&Duration::ZERO.into()), &Egress::platform()),
            Err(IssuerError::Invalid(_))
        ));
        assert!(client(None, None, &Egress::platform()).is_ok());
        assert!(
            client(
                None,
                Some(&Duration::from_secs(2).into()),
                &Egress::platform()
            )
            .is_ok()
        );
    }
}

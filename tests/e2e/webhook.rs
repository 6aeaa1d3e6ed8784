//! The webhook issuer against a local STAND-IN minting service (no real
//! product defines this API: it is whatever the user's service speaks),
//! written here with axum: it checks the Authorization header, records the
//! request bodies, mints random tokens with ids, revokes by id (or by the
//! token value when no id is sent), and can be told to misbehave (garbage
//! JSON, 503 with Retry-After, no expiry; for revocation: 503, or 404 while
//! the token stays active). [`StandIn`] is the handle other test modules use.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};

use agent_token_operator::crd::{AgentToken, RevocationState};

use crate::support::{Operator, TestNamespace, apply, eventually, random_suffix};

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Normal,
    Garbage,
    Unavailable,
    NoExpiry,
}

/// How the stand-in answers revoke requests.
#[derive(Clone, Copy, PartialEq, Debug)]
pub(crate) enum RevokeMode {
    /// Revokes the token (by id, else by value): 200, or 404 if unknown.
    Normal,
    /// 503 without touching the token.
    Unavailable,
    /// 404 for every request, while the token stays active.
    NotFound,
}

/// One revoke request the stand-in received: which of its tokens it named
/// (by id, or the id of the token whose value was sent) and the answer.
/// The token value itself is never kept here.
#[derive(Clone, Debug)]
pub(crate) struct RevokeRequest {
    /// The `id` field, if the request had one.
    pub id: Option<String>,
    /// The id of the stand-in's token whose value the `token` field held.
    pub token_of: Option<String>,
    /// Whether a `token` field was sent that is none of the stand-in's tokens.
    pub foreign_token: bool,
    pub status: u16,
}

impl RevokeRequest {
    /// Whether this request was about the stand-in's token `id`.
    pub fn names(&self, id: &str) -> bool {
        self.id.as_deref() == Some(id) || self.token_of.as_deref() == Some(id)
    }
}

/// What the stand-in knows of a token it minted, besides its value: whom
/// the mint request named (the default body carries namespace, name and
/// revision) and when the token expires.
#[derive(Clone, Debug)]
struct MintRecord {
    namespace: Option<String>,
    name: Option<String>,
    revision: Option<i64>,
    expires_at: jiff::Timestamp,
}

/// A token the stand-in issued, as tests may see it: its fingerprint
/// (never the value), whom it was minted for, and whether it is still
/// active (not revoked, not expired).
#[derive(Clone, Debug)]
pub(crate) struct Issued {
    pub id: String,
    pub fingerprint: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub revision: Option<i64>,
    pub revoked: bool,
    pub expires_at: jiff::Timestamp,
}

impl Issued {
    /// Neither revoked nor expired at `now`.
    pub fn active(&self, now: jiff::Timestamp) -> bool {
        !self.revoked && now < self.expires_at
    }
}

struct Service {
    auth: String,
    mode: Mode,
    revoke_mode: RevokeMode,
    /// Seconds of life each minted token gets.
    ttl: u64,
    /// Longest wait between minting a token and answering (a slow
    /// service: a client that goes away meanwhile never gets the token).
    answer_delay: Duration,
    /// Answer after exactly `answer_delay` instead of a random part of it.
    fixed_delay: bool,
    /// id -> (token, active)
    tokens: HashMap<String, (String, bool)>,
    /// id -> whom and how long
    records: HashMap<String, MintRecord>,
    bodies: Vec<serde_json::Value>,
    requests: usize,
    revokes: Vec<RevokeRequest>,
    /// How long a revoke request waits before it is handled and answered.
    revoke_delay: Duration,
    /// Revoke requests received, answered or not.
    revokes_arrived: usize,
    /// Authorized introspection requests answered.
    introspections: usize,
}

type Shared = Arc<Mutex<Service>>;

async fn mint(
    State(s): State<Shared>,
    headers: HeaderMap,
    Json(body): Json<serde_json::Value>,
) -> Response {
    let (reply, delay) = mint_now(&s, &headers, body);
    // The token exists from here on, answered or not.
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    reply
}

fn mint_now(s: &Shared, headers: &HeaderMap, body: serde_json::Value) -> (Response, Duration) {
    let mut s = s.lock().unwrap();
    s.requests += 1;
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(s.auth.as_str()) {
        return (
            (
                StatusCode::UNAUTHORIZED,
                Json(serde_json::json!({"error": "unauthorized"})),
            )
                .into_response(),
            Duration::ZERO,
        );
    }
    let record = MintRecord {
        namespace: body["namespace"].as_str().map(String::from),
        name: body["name"].as_str().map(String::from),
        revision: body["revision"].as_i64(),
        expires_at: jiff::Timestamp::now() + jiff::SignedDuration::from_secs(s.ttl as i64),
    };
    s.bodies.push(body);
    let id = format!("tok-{}", s.tokens.len() + 1);
    let token = format!("wh-{}-{}", random_suffix(), random_suffix());
    match s.mode {
        Mode::Garbage => {
            return (
                (StatusCode::OK, "<html>token=leaked?</html>").into_response(),
                Duration::ZERO,
            );
        }
        Mode::Unavailable => {
            return (
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [("retry-after", "1")],
                    "busy",
                )
                    .into_response(),
                Duration::ZERO,
            );
        }
        Mode::NoExpiry => {
            return (
                Json(serde_json::json!({"data": {"token": token, "id": id}})).into_response(),
                Duration::ZERO,
            );
        }
        Mode::Normal => {}
    }
    s.tokens.insert(id.clone(), (token.clone(), true));
    s.records.insert(id.clone(), record);
    let ttl = s.ttl;
    let delay = if s.answer_delay.is_zero() {
        Duration::ZERO
    } else if s.fixed_delay {
        s.answer_delay
    } else {
        use rand::Rng;
        let max = s.answer_delay.as_millis() as u64;
        Duration::from_millis(rand::rng().random_range(0..=max))
    };
    (
        Json(serde_json::json!({"data": {"token": token, "ttl": ttl, "id": id}})).into_response(),
        delay,
    )
}

async fn revoke(
    State(s): State<Shared>,
    headers: HeaderMap,
    Json(body): Json<serde_json::Value>,
) -> StatusCode {
    let delay = {
        let mut s = s.lock().unwrap();
        s.revokes_arrived += 1;
        s.revoke_delay
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut s = s.lock().unwrap();
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(s.auth.as_str()) {
        return StatusCode::UNAUTHORIZED;
    }
    let id = body["id"].as_str().map(String::from);
    let sent = body["token"].as_str();
    let token_of = sent.and_then(|v| {
        s.tokens
            .iter()
            .find(|(_, (t, _))| t == v)
            .map(|(id, _)| id.clone())
    });
    let foreign_token = sent.is_some() && token_of.is_none();
    // Revoke by id; without an id, by the token value.
    let target = id.clone().or_else(|| token_of.clone()).unwrap_or_default();
    let status = match s.revoke_mode {
        RevokeMode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        RevokeMode::NotFound => StatusCode::NOT_FOUND,
        RevokeMode::Normal => match s.tokens.get_mut(&target) {
            Some(t) => {
                t.1 = false;
                StatusCode::OK
            }
            None => StatusCode::NOT_FOUND,
        },
    };
    s.revokes.push(RevokeRequest {
        id,
        token_of,
        foreign_token,
        status: status.as_u16(),
    });
    status
}

/// RFC 7662 for the stand-in's own tokens (`introspectionURL`): form
/// `token=...`, the same Authorization as mint and revoke; a token it never
/// minted, or revoked, is `active: false`.
async fn introspect(State(s): State<Shared>, headers: HeaderMap, body: String) -> Response {
    let form: HashMap<String, String> = serde_urlencoded::from_str(&body).unwrap_or_default();
    let mut s = s.lock().unwrap();
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(s.auth.as_str()) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    s.introspections += 1;
    let active = form
        .get("token")
        .and_then(|v| s.tokens.values().find(|(t, _)| t == v))
        .is_some_and(|t| t.1);
    Json(serde_json::json!({"active": active})).into_response()
}

async fn start() -> (Shared, u16) {
    start_on(std::net::Ipv4Addr::LOCALHOST).await
}

async fn start_on(ip: std::net::Ipv4Addr) -> (Shared, u16) {
    let shared: Shared = Arc::new(Mutex::new(Service {
        auth: format!("Bearer {}", random_suffix() + &random_suffix()),
        mode: Mode::Normal,
        revoke_mode: RevokeMode::Normal,
        ttl: 900,
        answer_delay: Duration::ZERO,
        fixed_delay: false,
        tokens: HashMap::new(),
        records: HashMap::new(),
        bodies: Vec::new(),
        requests: 0,
        revokes: Vec::new(),
        revoke_delay: Duration::ZERO,
        revokes_arrived: 0,
        introspections: 0,
    }));
    let app = Router::new()
        .route(
            "/mint",
            post(mint).head(|| async { StatusCode::METHOD_NOT_ALLOWED }),
        )
        .route("/revoke", post(revoke))
        .route("/introspect", post(introspect))
        .with_state(shared.clone());
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (shared, port)
}

/// A running stand-in, for tests in other modules: its state is read
/// through methods that never hand out a token value except by id.
pub(crate) struct StandIn {
    svc: Shared,
    ip: std::net::Ipv4Addr,
    pub port: u16,
}

impl StandIn {
    pub async fn start() -> Self {
        Self::start_on(std::net::Ipv4Addr::LOCALHOST).await
    }

    /// Listening on `ip` only: the node's bridge address, for an operator
    /// that runs as a Pod.
    pub async fn start_on(ip: std::net::Ipv4Addr) -> Self {
        let (svc, port) = start_on(ip).await;
        StandIn { svc, ip, port }
    }

    /// `http://<ip>:<port><path>` (`/mint`, `/revoke`).
    pub fn url(&self, path: &str) -> String {
        format!("http://{}:{}{path}", self.ip, self.port)
    }

    /// The Authorization header value the stand-in expects.
    pub fn authorization(&self) -> String {
        self.svc.lock().unwrap().auth.clone()
    }

    pub fn set_revoke_mode(&self, mode: RevokeMode) {
        self.svc.lock().unwrap().revoke_mode = mode;
    }

    /// Each revoke request waits `delay` before it is handled.
    pub fn set_revoke_delay(&self, delay: Duration) {
        self.svc.lock().unwrap().revoke_delay = delay;
    }

    /// Revoke requests received so far, including those not answered yet.
    pub fn revokes_arrived(&self) -> usize {
        self.svc.lock().unwrap().revokes_arrived
    }

    /// Mint requests answer 503 (Retry-After: 1) while `unavailable`.
    pub fn set_mint_unavailable(&self, unavailable: bool) {
        self.svc.lock().unwrap().mode = if unavailable {
            Mode::Unavailable
        } else {
            Mode::Normal
        };
    }

    /// Seconds of life the next minted tokens get (900 by default).
    pub fn set_ttl(&self, seconds: u64) {
        self.svc.lock().unwrap().ttl = seconds;
    }

    /// Each mint waits up to `max` (at random) after minting before it
    /// answers: a client that dies meanwhile never learns of the token.
    pub fn set_answer_delay(&self, max: Duration) {
        let mut s = self.svc.lock().unwrap();
        s.answer_delay = max;
        s.fixed_delay = false;
    }

    /// Each mint answers exactly `delay` after minting.
    pub fn set_fixed_answer_delay(&self, delay: Duration) {
        let mut s = self.svc.lock().unwrap();
        s.answer_delay = delay;
        s.fixed_delay = true;
    }

    /// Every token it minted (fingerprints, never values), oldest first.
    pub fn issued(&self) -> Vec<Issued> {
        let s = self.svc.lock().unwrap();
        let mut all: Vec<Issued> = s
            .tokens
            .iter()
            .filter_map(|(id, (token, active))| {
                let r = s.records.get(id)?;
                Some(Issued {
                    id: id.clone(),
                    fingerprint: agent_token_operator::rotation::fingerprint(token.as_bytes()),
                    namespace: r.namespace.clone(),
                    name: r.name.clone(),
                    revision: r.revision,
                    revoked: !active,
                    expires_at: r.expires_at,
                })
            })
            .collect();
        all.sort_by_key(|i| i.id[4..].parse::<u64>().unwrap_or(0));
        all
    }

    /// The id of the stand-in's token with this value.
    pub fn id_of(&self, token: &str) -> Option<String> {
        let s = self.svc.lock().unwrap();
        s.tokens
            .iter()
            .find(|(_, (t, _))| t == token)
            .map(|(id, _)| id.clone())
    }

    /// Whether the token `id` is still active (`None`: never minted).
    pub fn active(&self, id: &str) -> Option<bool> {
        self.svc.lock().unwrap().tokens.get(id).map(|t| t.1)
    }

    /// How many of its tokens are still active.
    pub fn live(&self) -> usize {
        self.svc
            .lock()
            .unwrap()
            .tokens
            .values()
            .filter(|t| t.1)
            .count()
    }

    /// Every revoke request received so far.
    pub fn revokes(&self) -> Vec<RevokeRequest> {
        self.svc.lock().unwrap().revokes.clone()
    }
}

async fn setup(ns: &TestNamespace, svc: &Shared, port: u16) {
    let auth = svc.lock().unwrap().auth.clone();
    let api: Api<Secret> = ns.api();
    let s: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "mint-auth"},
        "stringData": {"authorization": auth},
    }))
    .unwrap();
    api.create(&Default::default(), &s).await.unwrap();
    let yaml = format!(
        r#"
apiVersion: agenttoken.dev/v1alpha1
kind: TokenIssuer
metadata: {{name: minter}}
spec:
  webhook:
    url: http://127.0.0.1:{port}/mint
    body: '{{"subject": {{{{ namespace }}}}, "agent": {{{{ name }}}}, "scopes": {{{{ scopes }}}}, "ttl": {{{{ lifetimeSeconds }}}}}}'
    authorizationSecretRef: {{name: mint-auth, key: authorization}}
    result: {{tokenPath: $.data.token, expiresInPath: $.data.ttl, idPath: $.data.id}}
    revokeURL: http://127.0.0.1:{port}/revoke
  policy: {{allowedScopes: ["read", "deploy"]}}
---
apiVersion: agenttoken.dev/v1alpha1
kind: AgentToken
metadata: {{name: bot}}
spec:
  issuerRef: {{name: minter}}
  scopes: ["read"]
  lifetime: 10m
  previousTokenGracePeriod: 0s
"#
    );
    let out = apply(ns, &yaml);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn token_in_secret(ns: &TestNamespace) -> Option<String> {
    let s: Secret = ns.api().get_opt("bot").await.ok()??;
    Some(String::from_utf8(s.data?.get("token")?.0.clone()).unwrap())
}

#[tokio::test]
async fn webhook_stand_in_mints_from_a_template_and_revokes_by_id() {
    let (svc, port) = start().await;
    let ns = TestNamespace::new("webhook").await;
    let op = Operator::start(&ns.name);
    setup(&ns, &svc, port).await;
    let api: Api<AgentToken> = ns.api();
    eventually(Duration::from_secs(30), "revision 1", || async {
        (api.get("bot").await.ok()?.status?.revision == 1).then_some(())
    })
    .await;
    let first = token_in_secret(&ns).await.unwrap();
    {
        let s = svc.lock().unwrap();
        assert_eq!(s.tokens["tok-1"], (first.clone(), true));
        assert_eq!(
            s.bodies[0],
            serde_json::json!({"subject": ns.name, "agent": "bot", "scopes": ["read"], "ttl": 600})
        );
    }
    let patch = serde_json::json!({"metadata": {"annotations": {"agenttoken.dev/rotate": "1"}}});
    api.patch("bot", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let at = eventually(Duration::from_secs(30), "revision 1 revoked", || async {
        let at = api.get("bot").await.ok()?;
        at.status
            .as_ref()?
            .history
            .iter()
            .any(|h| h.revision == 1 && h.revocation == RevocationState::Revoked)
            .then_some(at)
    })
    .await;
    assert!(
        !svc.lock().unwrap().tokens["tok-1"].1,
        "revoked at the service"
    );
    assert!(svc.lock().unwrap().tokens["tok-2"].1);
    // The service's expiry (900 s) is the truth, not the 10m asked for.
    let st = at.status.unwrap();
    let secs = st
        .expires_at
        .unwrap()
        .0
        .duration_since(st.issued_at.unwrap().0)
        .as_secs();
    assert!((895..=905).contains(&secs), "{secs}");
    let auth = svc.lock().unwrap().auth.clone();
    let logs = op.logs();
    assert!(!logs.contains(&first) && !logs.contains(&auth));
}

#[tokio::test]
async fn webhook_stand_in_misbehaving_service_never_writes_a_secret() {
    let (svc, port) = start().await;
    svc.lock().unwrap().mode = Mode::Garbage;
    let ns = TestNamespace::new("webhook-bad").await;
    let op = Operator::start(&ns.name);
    setup(&ns, &svc, port).await;
    let api: Api<AgentToken> = ns.api();
    let failure = |needle: &'static str| {
        let api = api.clone();
        async move {
            eventually(Duration::from_secs(60), needle, || async {
                let st = api.get("bot").await.ok()?.status?;
                st.last_failure_message
                    .filter(|m| m.contains(needle))
                    .map(|_| ())
            })
            .await
        }
    };
    failure("not JSON").await;
    assert!(
        token_in_secret(&ns).await.is_none(),
        "no Secret from garbage"
    );
    svc.lock().unwrap().mode = Mode::NoExpiry;
    failure("expiry is unknown").await;
    assert!(
        token_in_secret(&ns).await.is_none(),
        "no Secret without expiry"
    );
    let before = svc.lock().unwrap().requests;
    svc.lock().unwrap().mode = Mode::Unavailable;
    failure("HTTP 503").await;
    let tries = svc.lock().unwrap().requests - before;
    assert!(
        tries >= 3,
        "retried (honouring Retry-After): {tries} requests"
    );
    assert!(token_in_secret(&ns).await.is_none());
    // Once the service behaves, the backoff retry succeeds.
    svc.lock().unwrap().mode = Mode::Normal;
    eventually(Duration::from_secs(90), "recovered", || async {
        (api.get("bot").await.ok()?.status?.revision >= 1).then_some(())
    })
    .await;
    assert!(token_in_secret(&ns).await.is_some());
    assert!(
        !op.logs().contains("leaked"),
        "a response body reached the log"
    );
}

/// A drill on a webhook token (stand-in of the webhook contract, with its
/// optional RFC 7662 `introspectionURL`): the operator revokes by id and
/// asks the service until it answers `active: false`. Without an
/// introspectionURL the same drill is `Unverified`, and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_on_a_webhook_stand_in_token_is_checked_by_its_introspection_url() {
    use agent_token_operator::crd::DrillResult;
    let (svc, port) = start().await;
    let ns = TestNamespace::new("drill-webhook").await;
    let op = Operator::start(&ns.name);
    setup(&ns, &svc, port).await;
    let ats: Api<AgentToken> = ns.api();
    eventually(Duration::from_secs(45), "revision 1", || async {
        (ats.get("bot").await.ok()?.status?.revision == 1).then_some(())
    })
    .await;
    // No introspectionURL: the drill revokes, but cannot say whether the
    // service refuses the old token.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let report = crate::drill::drill_report(&ns, "bot");
    assert_eq!(report.result, DrillResult::Unverified, "{report:?}");
    assert!(
        report
            .message
            .as_deref()
            .is_some_and(|m| m.contains("introspectionURL")),
        "{report:?}"
    );
    // With one, the same drill passes on the service's own answer.
    let issuers: Api<agent_token_operator::crd::TokenIssuer> = ns.api();
    issuers
        .patch(
            "minter",
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({"spec": {"webhook": {
                "introspectionURL": format!("http://127.0.0.1:{port}/introspect")
            }}})),
        )
        .await
        .unwrap();
    eventually(Duration::from_secs(60), "revision 2 delivered", || async {
        (ats.get("bot").await.ok()?.status?.revision == 2).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(11)).await;
    let old = token_in_secret(&ns).await.expect("a token");
    let old_id = svc
        .lock()
        .unwrap()
        .tokens
        .iter()
        .find(|(_, (t, _))| *t == old)
        .map(|(id, _)| id.clone())
        .expect("minted by the stand-in");
    let report = crate::drill::drill_report(&ns, "bot");
    assert_eq!(report.result, DrillResult::Passed, "{report:?}");
    assert_eq!(report.refused_by.as_deref(), Some("RFC 7662 introspection"));
    assert!(
        report.refused_ms.is_some_and(|ms| ms <= 20_000),
        "{report:?}"
    );
    let s = svc.lock().unwrap();
    assert!(!s.tokens[&old_id].1, "revoked at the service");
    assert!(s.introspections >= 1, "the service was asked");
    drop(s);
    assert!(!op.logs().contains(&old), "no token in the operator's logs");
}

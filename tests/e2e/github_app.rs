//! The githubApp issuer against a local STAND-IN of GitHub's documented App
//! endpoints (no real GitHub is reachable here). Like GitHub, the stand-in
//! checks the App JWT's RS256 signature against the App's public key, its
//! `iss`, and that it is current and lives at most 10 minutes; installation
//! tokens are scoped to the requested repositories and permissions, expire
//! in an hour, and die on `DELETE /installation/token`. The App's key pair is
//! generated per test with openssl.

use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};

use agent_token_operator::crd::{AgentToken, RevocationState};

use crate::support::{Operator, TestNamespace, apply, eventually, random_suffix};

pub(crate) const APP_ID: i64 = 31337;
const INSTALLATION: i64 = 4242;

struct GitHub {
    public_pem: String,
    /// token -> (repositories, permissions, active)
    tokens: HashMap<String, (Value, Value, bool)>,
    /// Every installation token minted, in order: (token, expires_at).
    minted: Vec<(String, jiff::Timestamp)>,
    /// Longest wait between minting a token and answering, at random (a
    /// client that dies meanwhile never learns of the token).
    answer_delay: Duration,
    jwt_rejections: Vec<String>,
}

type Shared = Arc<Mutex<GitHub>>;

fn bearer(headers: &HeaderMap) -> Option<String> {
    let v = headers.get("authorization")?.to_str().ok()?;
    v.strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("token "))
        .map(String::from)
}

/// GitHub's App JWT rules.
fn app_jwt_ok(gh: &mut GitHub, headers: &HeaderMap) -> bool {
    let Some(jwt) = bearer(headers) else {
        gh.jwt_rejections.push("no bearer".into());
        return false;
    };
    let key = jsonwebtoken::DecodingKey::from_rsa_pem(gh.public_pem.as_bytes()).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    v.set_required_spec_claims(&["exp", "iat", "iss"]);
    v.validate_aud = false;
    v.leeway = 0;
    match jsonwebtoken::decode::<Value>(&jwt, &key, &v) {
        Ok(data) => {
            let c = data.claims;
            let iss_ok =
                c["iss"].as_str() == Some(&APP_ID.to_string()) || c["iss"].as_i64() == Some(APP_ID);
            let now = jiff::Timestamp::now().as_second();
            let (iat, exp) = (
                c["iat"].as_i64().unwrap_or(0),
                c["exp"].as_i64().unwrap_or(0),
            );
            let ok = iss_ok && iat <= now + 60 && exp - iat <= 660 && exp > now;
            if !ok {
                gh.jwt_rejections.push(format!("claims {c}"));
            }
            ok
        }
        Err(e) => {
            gh.jwt_rejections.push(e.to_string());
            false
        }
    }
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        Json(json!({"message": "A JSON web token could not be decoded"})),
    )
        .into_response()
}

async fn app(State(s): State<Shared>, headers: HeaderMap) -> Response {
    let mut gh = s.lock().unwrap();
    if !app_jwt_ok(&mut gh, &headers) {
        return unauthorized();
    }
    Json(json!({"id": APP_ID, "slug": "agent-fleet"})).into_response()
}

async fn installations(State(s): State<Shared>, headers: HeaderMap) -> Response {
    let mut gh = s.lock().unwrap();
    if !app_jwt_ok(&mut gh, &headers) {
        return unauthorized();
    }
    Json(json!([{"id": INSTALLATION, "account": {"login": "example"}}])).into_response()
}

async fn access_tokens(
    State(s): State<Shared>,
    Path(id): Path<i64>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let (reply, delay) = access_token_now(&s, id, &headers, &body);
    // The token exists from here on, answered or not.
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    reply
}

fn access_token_now(
    s: &Shared,
    id: i64,
    headers: &HeaderMap,
    body: &Value,
) -> (Response, Duration) {
    let reply = |r: Response| (r, Duration::ZERO);
    let mut gh = s.lock().unwrap();
    if !app_jwt_ok(&mut gh, headers) {
        return reply(unauthorized());
    }
    if id != INSTALLATION {
        return reply(
            (StatusCode::NOT_FOUND, Json(json!({"message": "Not Found"}))).into_response(),
        );
    }
    // The App was granted contents:write and metadata:read.
    let granted = json!({"contents": ["read", "write"], "metadata": ["read"]});
    if let Some(p) = body["permissions"].as_object() {
        for (k, v) in p {
            let ok = granted[k]
                .as_array()
                .is_some_and(|a| a.iter().any(|g| g == v));
            if !ok {
                return reply(
                    (
                        StatusCode::UNPROCESSABLE_ENTITY,
                        Json(json!({"message": format!("The permissions requested are not granted to this installation: {k}")})),
                    )
                        .into_response(),
                );
            }
        }
    }
    let token = format!("ghs_{}{}", random_suffix(), random_suffix());
    let expires = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(3600);
    gh.tokens.insert(
        token.clone(),
        (
            body["repositories"].clone(),
            body["permissions"].clone(),
            true,
        ),
    );
    gh.minted.push((token.clone(), expires));
    let delay = if gh.answer_delay.is_zero() {
        Duration::ZERO
    } else {
        use rand::Rng;
        let max = gh.answer_delay.as_millis() as u64;
        Duration::from_millis(rand::rng().random_range(0..=max))
    };
    (
        (
            StatusCode::CREATED,
            Json(json!({
                "token": token,
                "expires_at": expires.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
                "permissions": body["permissions"],
                "repository_selection": "selected",
            })),
        )
            .into_response(),
        delay,
    )
}

async fn revoke(State(s): State<Shared>, headers: HeaderMap) -> StatusCode {
    let mut gh = s.lock().unwrap();
    match bearer(&headers).and_then(|t| gh.tokens.get_mut(&t)) {
        Some(t) if t.2 => {
            t.2 = false;
            StatusCode::NO_CONTENT
        }
        _ => StatusCode::UNAUTHORIZED,
    }
}

/// `GET /installation/repositories` (GitHub's documented API): the
/// repositories a live installation token may reach; 401 for a revoked or
/// unknown token.
async fn repositories(
    State(s): State<Shared>,
    headers: HeaderMap,
) -> Result<axum::Json<Value>, StatusCode> {
    let gh = s.lock().unwrap();
    match bearer(&headers).and_then(|t| gh.tokens.get(&t)) {
        Some((repos, _, true)) => {
            let list: Vec<Value> = repos
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(|r| json!({"name": r}))
                .collect();
            Ok(axum::Json(
                json!({"total_count": list.len(), "repositories": list}),
            ))
        }
        _ => Err(StatusCode::UNAUTHORIZED),
    }
}

/// An installation token as the stand-in knows it (a fingerprint, never
/// the value).
pub(crate) struct Minted {
    /// Its place in the order of mints (1, 2, ...).
    pub n: usize,
    pub fingerprint: String,
    pub expires_at: jiff::Timestamp,
    pub active: bool,
}

/// The stand-in, for tests outside this file.
pub(crate) struct StandIn {
    shared: Shared,
    pub port: u16,
    /// The App's private key (PEM), generated for this stand-in.
    pub private_pem: String,
}

impl StandIn {
    pub async fn start() -> StandIn {
        let (shared, port, private_pem) = start().await;
        StandIn {
            shared,
            port,
            private_pem,
        }
    }

    /// Each mint waits up to `max` (at random) after minting before it
    /// answers.
    pub fn set_answer_delay(&self, max: Duration) {
        self.shared.lock().unwrap().answer_delay = max;
    }

    /// Every installation token it minted, oldest first, and whether it is
    /// still honoured (not revoked, not expired).
    pub fn minted(&self) -> Vec<Minted> {
        let gh = self.shared.lock().unwrap();
        let now = jiff::Timestamp::now();
        gh.minted
            .iter()
            .enumerate()
            .map(|(i, (token, expires_at))| Minted {
                n: i + 1,
                fingerprint: agent_token_operator::rotation::fingerprint(token.as_bytes()),
                expires_at: *expires_at,
                active: gh.tokens.get(token).is_some_and(|t| t.2) && now < *expires_at,
            })
            .collect()
    }

    /// App JWTs it refused (none when the operator signs them right).
    pub fn jwt_rejections(&self) -> Vec<String> {
        self.shared.lock().unwrap().jwt_rejections.clone()
    }
}

async fn start() -> (Shared, u16, String) {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("app.pem");
    let ok = Command::new("openssl")
        .args(["genrsa", "-out"])
        .arg(&key)
        .arg("2048")
        .output()
        .unwrap();
    assert!(ok.status.success(), "openssl genrsa");
    let public = Command::new("openssl")
        .args(["rsa", "-pubout", "-in"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(public.status.success(), "openssl rsa -pubout");
    let private_pem = std::fs::read_to_string(&key).unwrap();
    let shared: Shared = Arc::new(Mutex::new(GitHub {
        public_pem: String::from_utf8(public.stdout).unwrap(),
        tokens: HashMap::new(),
        minted: Vec::new(),
        answer_delay: Duration::ZERO,
        jwt_rejections: Vec::new(),
    }));
    let app_router = Router::new()
        .route("/app", get(app))
        .route("/app/installations", get(installations))
        .route("/app/installations/{id}/access_tokens", post(access_tokens))
        .route("/installation/token", delete(revoke))
        .route("/installation/repositories", get(repositories))
        .with_state(shared.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app_router).await });
    (shared, port, private_pem)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn github_app_stand_in_installation_token_scoped_and_revoked() {
    let (gh, port, private_pem) = start().await;
    let ns = TestNamespace::new("github").await;
    let op = Operator::start(&ns.name);
    let api: Api<Secret> = ns.api();
    let s: Secret = serde_json::from_value(json!({
        "metadata": {"name": "app-key"},
        "stringData": {"private-key.pem": private_pem},
    }))
    .unwrap();
    api.create(&Default::default(), &s).await.unwrap();
    let yaml = format!(
        r#"
apiVersion: agenttoken.dev/v1alpha1
kind: TokenIssuer
metadata: {{name: github}}
spec:
  githubApp:
    apiURL: http://127.0.0.1:{port}
    appID: {APP_ID}
    privateKeySecretRef: {{name: app-key, key: private-key.pem}}
  policy:
    allowedRepositories: ["infra", "app-*"]
    allowedPermissions: {{contents: write, metadata: read}}
---
apiVersion: agenttoken.dev/v1alpha1
kind: AgentToken
metadata: {{name: bot}}
spec:
  issuerRef: {{name: github}}
  permissions: {{contents: read}}
  repositories: ["infra"]
  lifetime: 1h
  previousTokenGracePeriod: 0s
"#
    );
    let out = apply(&ns, &yaml);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ats: Api<AgentToken> = ns.api();
    let at = eventually(Duration::from_secs(45), "revision 1", || async {
        let at = ats.get("bot").await.ok()?;
        (at.status.as_ref()?.revision == 1).then_some(at)
    })
    .await;
    let secret: Secret = ns.api().get("bot").await.unwrap();
    let first = String::from_utf8(secret.data.unwrap()["token"].0.clone()).unwrap();
    {
        let g = gh.lock().unwrap();
        assert!(g.jwt_rejections.is_empty(), "{:?}", g.jwt_rejections);
        let (repos, perms, active) = &g.tokens[&first];
        assert_eq!(repos, &json!(["infra"]));
        assert_eq!(perms, &json!({"contents": "read"}));
        assert!(active);
    }
    // GitHub's expires_at (1h) is the expiry.
    let st = at.status.unwrap();
    let secs = st
        .expires_at
        .unwrap()
        .0
        .duration_since(st.issued_at.unwrap().0)
        .as_secs();
    assert!((3590..=3601).contains(&secs), "{secs}");

    let patch = json!({"metadata": {"annotations": {"agenttoken.dev/rotate": "1"}}});
    ats.patch("bot", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    eventually(Duration::from_secs(45), "revision 1 revoked", || async {
        let at = ats.get("bot").await.ok()?;
        at.status?
            .history
            .iter()
            .any(|h| h.revision == 1 && h.revocation == RevocationState::Revoked)
            .then_some(())
    })
    .await;
    assert!(!gh.lock().unwrap().tokens[&first].2, "revoked at GitHub");

    // A drill: the installation token's death seen by GitHub's own answer
    // to it (GET /installation/repositories, 401 once revoked). (The
    // plugin runs blocking: the stand-in serves from the other worker.)
    tokio::time::sleep(Duration::from_secs(10)).await;
    let report = crate::drill::drill_report(&ns, "bot");
    assert_eq!(
        report.result,
        agent_token_operator::crd::DrillResult::Passed,
        "{report:?}"
    );
    assert_eq!(
        report.refused_by.as_deref(),
        Some("GitHub GET /installation/repositories")
    );

    // Outside the issuer's policy, fail closed: a permission it does not
    // list, no permissions at all (GitHub would grant every one of the
    // installation), an installation picked by the AgentToken. Each is
    // refused with the rule named and never reaches the stand-in.
    let agent = yaml.split("---").nth(1).unwrap().to_string();
    let cases = [
        (
            agent
                .replace("name: bot", "name: greedy")
                .replace("contents: read", "administration: write"),
            "greedy",
            "policy.allowedPermissions",
        ),
        (
            agent
                .replace("name: bot", "name: everything")
                .replace("  permissions: {contents: read}\n", "")
                .replace("  repositories: [\"infra\"]\n", ""),
            "everything",
            "spec.repositories is required",
        ),
        (
            agent.replace("name: bot", "name: elsewhere").replace(
                "  lifetime: 1h",
                "  lifetime: 1h\n  parameters: {installationID: \"99\"}",
            ),
            "elsewhere",
            "installationID cannot be set",
        ),
    ];
    let minted_before = gh.lock().unwrap().tokens.len();
    for (yaml, name, words) in &cases {
        assert!(apply(&ns, yaml).status.success(), "{name}");
        let message = eventually(Duration::from_secs(45), name, || async {
            let st = ats.get(name).await.ok()?.status?;
            let c = st.conditions.iter().find(|c| c.type_ == "Ready")?;
            (c.reason == "PolicyViolation").then(|| c.message.clone())
        })
        .await;
        assert!(message.contains(words), "{name}: {message}");
    }
    assert_eq!(
        gh.lock().unwrap().tokens.len(),
        minted_before,
        "no refused request reached GitHub"
    );
    let logs = op.logs();
    assert!(!logs.contains(&first) && !logs.contains("PRIVATE KEY"));
}

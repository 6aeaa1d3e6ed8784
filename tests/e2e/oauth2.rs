//! The oauth2 issuer against a REAL OpenID provider: panva/oidc-provider
//! from npm (`e2e/oidc/`), with client credentials, introspection (RFC 7662)
//! and revocation (RFC 7009) enabled. Client secrets are generated per test.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};

use agent_token_operator::crd::{AgentToken, RevocationState, TokenIssuer};

use crate::support::{Operator, TestNamespace, apply, eventually, random_suffix, repo_root};

/// A running oidc-provider with two clients (Basic and Post authentication).
pub(crate) struct Provider {
    child: Child,
    port: u16,
    pub basic: (String, String),
    post: (String, String),
}

impl Drop for Provider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn secret_value() -> String {
    use rand::Rng;
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(40)
        .map(char::from)
        .collect()
}

/// Installs the provider's npm packages once (from the lock file).
fn npm_install() {
    static DONE: Mutex<bool> = Mutex::new(false);
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if *done {
        return;
    }
    let dir = repo_root().join("e2e/oidc");
    if !dir.join("node_modules/oidc-provider").exists() {
        let out = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .output()
            .expect("run npm ci");
        assert!(
            out.status.success(),
            "npm ci in e2e/oidc failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    *done = true;
}

pub(crate) fn start_provider(token_ttl: u64) -> Provider {
    start_provider_with(token_ttl, Duration::ZERO)
}

/// [`start_provider`], answering each token request up to `answer_delay`
/// (at random) after the token was issued and stored: a client that dies
/// meanwhile never learns of a token the provider holds.
pub(crate) fn start_provider_with(token_ttl: u64, answer_delay: Duration) -> Provider {
    npm_install();
    let basic = (format!("basic-{}", random_suffix()), secret_value());
    let post = (format!("post-{}", random_suffix()), secret_value());
    let mut child = Command::new("node")
        .arg("server.mjs")
        .current_dir(repo_root().join("e2e/oidc"))
        .env("PORT", "0")
        .env("BASIC_CLIENT_ID", &basic.0)
        .env("BASIC_CLIENT_SECRET", &basic.1)
        .env("POST_CLIENT_ID", &post.0)
        .env("POST_CLIENT_SECRET", &post.1)
        .env("TOKEN_TTL", token_ttl.to_string())
        .env("ANSWER_DELAY_MS", answer_delay.as_millis().to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start oidc-provider (node)");
    // PORT=0: the provider says which port it got.
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let port = loop {
        let line = lines
            .next()
            .expect("oidc-provider exited before listening")
            .unwrap();
        if let Some(p) = line.strip_prefix("listening ") {
            break p.trim().parse().unwrap();
        }
    };
    // Keep reading: a closed pipe would kill the provider on its next write.
    std::thread::spawn(move || for _ in lines {});
    Provider {
        child,
        port,
        basic,
        post,
    }
}

impl Provider {
    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Every access token the provider issued, from its own record (the
    /// test endpoint of `e2e/oidc/server.mjs`): (value, exp), oldest first.
    /// Values stay in memory, never printed. `None` when it does not answer.
    pub(crate) async fn issued(&self) -> Option<Vec<(String, i64)>> {
        let resp = reqwest::Client::new()
            .get(self.url("/test/issued"))
            .basic_auth(&self.basic.0, Some(&self.basic.1))
            .send()
            .await
            .ok()?;
        if !resp.status().is_success() {
            return None;
        }
        let all: Vec<serde_json::Value> = resp.json().await.ok()?;
        Some(
            all.iter()
                .filter_map(|t| Some((t["token"].as_str()?.to_string(), t["exp"].as_i64()?)))
                .collect(),
        )
    }
}

/// Asks the provider's introspection endpoint whether `token` is active.
pub(crate) async fn introspect(p: &Provider, token: &str) -> serde_json::Value {
    let resp = reqwest::Client::new()
        .post(p.url("/token/introspection"))
        .basic_auth(&p.basic.0, Some(&p.basic.1))
        .form(&[("token", token)])
        .send()
        .await
        .expect("introspection request");
    assert!(
        resp.status().is_success(),
        "introspection: {}",
        resp.status()
    );
    resp.json().await.expect("introspection JSON")
}

/// A token the Basic client gets from the provider itself (client
/// credentials), outside the operator: someone else's live token.
pub(crate) async fn client_credentials(p: &Provider, scope: &str) -> String {
    let resp = reqwest::Client::new()
        .post(p.url("/token"))
        .basic_auth(&p.basic.0, Some(&p.basic.1))
        .form(&[("grant_type", "client_credentials"), ("scope", scope)])
        .send()
        .await
        .expect("token request");
    assert!(
        resp.status().is_success(),
        "token request: {}",
        resp.status()
    );
    let body: serde_json::Value = resp.json().await.expect("token JSON");
    body["access_token"]
        .as_str()
        .expect("an access_token")
        .to_string()
}

pub(crate) fn issuer_yaml(p: &Provider, method: &str, client_id: &str) -> String {
    format!(
        r#"
apiVersion: agenttoken.dev/v1alpha1
kind: TokenIssuer
metadata: {{name: idp}}
spec:
  oauth2:
    tokenURL: {token}
    clientID: {client_id}
    clientSecretRef: {{name: idp-client, key: secret}}
    authMethod: {method}
    revocationURL: {revoke}
    introspectionURL: {introspect}
  policy:
    maxLifetime: 1h
    allowedScopes: ["deploy", "read"]
"#,
        token = p.url("/token"),
        revoke = p.url("/token/revocation"),
        introspect = p.url("/token/introspection"),
    )
}

pub(crate) async fn client_secret(ns: &TestNamespace, value: &str) {
    let api: Api<Secret> = ns.api();
    let s: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "idp-client"},
        "stringData": {"secret": value},
    }))
    .unwrap();
    api.create(&Default::default(), &s).await.unwrap();
}

pub(crate) const AGENT_TOKEN: &str = r#"
apiVersion: agenttoken.dev/v1alpha1
kind: AgentToken
metadata: {name: bot}
spec:
  issuerRef: {name: idp}
  scopes: ["deploy"]
  lifetime: 10m
  previousTokenGracePeriod: 0s
"#;

async fn issuer_condition(ns: &TestNamespace) -> Option<(String, String, String)> {
    let api: Api<TokenIssuer> = ns.api();
    let ti = api.get("idp").await.ok()?;
    ti.status?
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| (c.status, c.reason, c.message))
}

async fn wait_at<F: Fn(&AgentToken) -> bool>(ns: &TestNamespace, what: &str, f: F) -> AgentToken {
    let api: Api<AgentToken> = ns.api();
    eventually(Duration::from_secs(45), what, || async {
        let at = api.get("bot").await.ok()?;
        f(&at).then_some(at)
    })
    .await
}

pub(crate) async fn token_in_secret(ns: &TestNamespace) -> String {
    let s: Secret = ns.api().get("bot").await.unwrap();
    String::from_utf8(s.data.unwrap()["token"].0.clone()).unwrap()
}

#[tokio::test]
async fn oauth2_real_oidc_provider_mints_rotates_and_revokes_per_rfc7009() {
    let p = start_provider(900);
    let ns = TestNamespace::new("oauth2-basic").await;
    let op = Operator::start(&ns.name);
    client_secret(&ns, &p.basic.1).await;
    assert!(
        apply(&ns, &issuer_yaml(&p, "ClientSecretBasic", &p.basic.0))
            .status
            .success()
    );
    eventually(Duration::from_secs(30), "issuer Ready", || async {
        issuer_condition(&ns)
            .await
            .filter(|c| c.0 == "True")
            .map(|_| ())
    })
    .await;
    assert!(apply(&ns, AGENT_TOKEN).status.success());
    let at = wait_at(&ns, "revision 1", |at| {
        at.status.as_ref().is_some_and(|s| s.revision == 1)
    })
    .await;
    let first = token_in_secret(&ns).await;
    let info = introspect(&p, &first).await;
    assert_eq!(info["active"], true, "{info}");
    assert_eq!(info["scope"], "deploy", "only the requested scope");
    assert_eq!(info["client_id"].as_str(), Some(p.basic.0.as_str()));
    // The provider grants 15m whatever we ask: its expires_in is the truth.
    let st = at.status.unwrap();
    let lifetime = st
        .expires_at
        .unwrap()
        .0
        .duration_since(st.issued_at.unwrap().0)
        .as_secs();
    assert!((895..=905).contains(&lifetime), "lifetime {lifetime}s");

    let api: Api<AgentToken> = ns.api();
    let patch = serde_json::json!({"metadata": {"annotations": {"agenttoken.dev/rotate": "1"}}});
    api.patch("bot", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    wait_at(&ns, "revision 1 revoked", |at| {
        at.status.as_ref().is_some_and(|s| {
            s.history
                .iter()
                .any(|h| h.revision == 1 && h.revocation == RevocationState::Revoked)
        })
    })
    .await;
    let second = token_in_secret(&ns).await;
    assert_ne!(first, second);
    assert_eq!(
        introspect(&p, &first).await["active"],
        false,
        "the provider says the old token is dead"
    );
    assert_eq!(introspect(&p, &second).await["active"], true);

    // Deleting the AgentToken revokes the current token too.
    let out = ns.kubectl(&[
        "delete",
        "agenttokens.agenttoken.dev",
        "bot",
        "--wait=true",
        "--timeout=60s",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(introspect(&p, &second).await["active"], false);

    let logs = op.logs();
    for secret in [&first, &second, &p.basic.1] {
        assert!(!logs.contains(secret.as_str()), "a secret reached the log");
    }
}

#[tokio::test]
async fn oauth2_real_oidc_provider_client_secret_post_and_policy() {
    let p = start_provider(600);
    let ns = TestNamespace::new("oauth2-post").await;
    let _op = Operator::start(&ns.name);
    client_secret(&ns, &p.post.1).await;
    assert!(
        apply(&ns, &issuer_yaml(&p, "ClientSecretPost", &p.post.0))
            .status
            .success()
    );
    assert!(apply(&ns, AGENT_TOKEN).status.success());
    wait_at(&ns, "revision 1", |at| {
        at.status.as_ref().is_some_and(|s| s.revision == 1)
    })
    .await;
    let token = token_in_secret(&ns).await;
    assert_eq!(introspect(&p, &token).await["active"], true);
    // A scope outside the policy never reaches the provider.
    let greedy = AGENT_TOKEN
        .replace("name: bot", "name: greedy")
        .replace("[\"deploy\"]", "[\"deploy\", \"write\"]");
    assert!(apply(&ns, &greedy).status.success());
    let api: Api<AgentToken> = ns.api();
    eventually(Duration::from_secs(30), "greedy refused", || async {
        let at = api.get("greedy").await.ok()?;
        at.status?
            .conditions
            .iter()
            .any(|c| {
                c.type_ == "Ready" && c.reason == "PolicyViolation" && c.message.contains("write")
            })
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn oauth2_real_oidc_provider_bad_secret_or_unreachable_never_writes_a_secret() {
    let p = start_provider(600);
    let ns = TestNamespace::new("oauth2-bad").await;
    let op = Operator::start(&ns.name);
    let wrong = secret_value();
    client_secret(&ns, &wrong).await;
    assert!(
        apply(&ns, &issuer_yaml(&p, "ClientSecretBasic", &p.basic.0))
            .status
            .success()
    );
    assert!(apply(&ns, AGENT_TOKEN).status.success());
    let at = wait_at(&ns, "mint refused", |at| {
        at.status.as_ref().is_some_and(|s| s.failed_attempts >= 1)
    })
    .await;
    let msg = at.status.unwrap().last_failure_message.unwrap_or_default();
    assert!(msg.contains("invalid_client"), "{msg}");
    assert!(
        ns.api::<Secret>().get_opt("bot").await.unwrap().is_none(),
        "no empty or partial Secret"
    );
    assert!(!op.logs().contains(&wrong));

    // An issuer nobody answers for: Ready=False Unreachable, with the reason.
    let dead = TestNamespace::new("oauth2-dead").await;
    let _op2 = Operator::start(&dead.name);
    client_secret(&dead, &p.basic.1).await;
    let yaml =
        issuer_yaml(&p, "ClientSecretBasic", &p.basic.0).replace(&format!(":{}", p.port), ":9");
    assert!(apply(&dead, &yaml).status.success());
    eventually(Duration::from_secs(30), "issuer Unreachable", || async {
        issuer_condition(&dead)
            .await
            .filter(|c| c.0 == "False" && c.1 == "Unreachable")
            .map(|_| ())
    })
    .await;
    // A missing client Secret is a configuration error.
    dead.kubectl(&["delete", "secret", "idp-client"]);
    dead.kubectl(&["annotate", "tokenissuer", "idp", "touch=1"]);
    eventually(Duration::from_secs(45), "issuer InvalidConfig", || async {
        issuer_condition(&dead)
            .await
            .filter(|c| c.1 == "InvalidConfig" && c.2.contains("idp-client"))
            .map(|_| ())
    })
    .await;
}

//! The HTTP transport every external issuer shares (`src/issuer/web.rs`):
//! a private CA trusted through `caBundle`, a per-issuer `timeout`, and the
//! issuer policy's `rateLimit`.
//! The minting service is a local STAND-IN (the webhook issuer's API is the
//! user's own); what is real is the TLS (a CA and a server certificate made
//! here at test time with rcgen, served with rustls) and the network.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::routing::post;
use axum::{Json, Router};
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use agent_token_operator::crd::{AgentToken, TokenIssuer};

use crate::support::{Operator, TestNamespace, apply, eventually, random_suffix};

/// A CA made for this test; `pem` is what a user puts in `caBundle`.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Ca { issuer }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for 127.0.0.1 and localhost, and its key.
    fn server_config(&self) -> rustls::ServerConfig {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let key_der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key_der)
        .unwrap()
    }
}

/// Accepts TCP, completes the TLS handshake, hands the stream to axum.
/// Handshakes the client aborts (an untrusted certificate) are counted.
struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    refused: Arc<AtomicUsize>,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                continue;
            };
            match tokio::time::timeout(Duration::from_secs(5), self.acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => return (tls, addr),
                _ => {
                    self.refused.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

struct Minter {
    port: u16,
    minted: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
}

/// A minting stand-in over HTTPS with a certificate from `ca`.
async fn https_minter(ca: &Ca) -> Minter {
    let minted = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let counter = minted.clone();
    let app = Router::new().route(
        "/mint",
        post(move || {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                Json(serde_json::json!({
                    "token": format!("tls-{}{}", random_suffix(), random_suffix()),
                    "ttl": 900,
                }))
            }
        })
        .head(|| async { axum::http::StatusCode::METHOD_NOT_ALLOWED }),
    );
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = tcp.local_addr().unwrap().port();
    let listener = TlsListener {
        tcp,
        acceptor: TlsAcceptor::from(Arc::new(ca.server_config())),
        refused: refused.clone(),
    };
    tokio::spawn(async move { axum::serve(listener, app).await });
    Minter {
        port,
        minted,
        refused,
    }
}

/// A server that accepts connections and never answers a byte.
async fn silent_server() -> (u16, Arc<AtomicUsize>) {
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = tcp.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = tcp.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            held.push(stream);
        }
    });
    (port, accepted)
}

fn issuer_yaml(name: &str, url: &str, extra: &str) -> String {
    format!(
        r#"
apiVersion: agenttoken.dev/v1alpha1
kind: TokenIssuer
metadata: {{name: {name}}}
spec:
  webhook:
    url: {url}
    result: {{tokenPath: $.token, expiresInPath: $.ttl}}
{extra}
---
apiVersion: agenttoken.dev/v1alpha1
kind: AgentToken
metadata: {{name: {name}}}
spec:
  issuerRef: {{name: {name}}}
  lifetime: 10m
"#
    )
}

/// `caBundle` as an indented YAML block scalar under `webhook:`.
fn ca_bundle_yaml(pem: &str) -> String {
    let mut out = "    caBundle: |\n".to_string();
    for line in pem.lines() {
        out.push_str("      ");
        out.push_str(line);
        out.push('\n');
    }
    out
}

async fn issuer_ready(ns: &TestNamespace, name: &str) -> Option<(String, String, String)> {
    let ti = ns.api::<TokenIssuer>().get(name).await.ok()?;
    ti.status?
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| (c.status, c.reason, c.message))
}

async fn failure_message(ns: &TestNamespace, name: &str) -> Option<String> {
    ns.api::<AgentToken>()
        .get(name)
        .await
        .ok()?
        .status?
        .last_failure_message
}

async fn has_secret(ns: &TestNamespace, name: &str) -> bool {
    ns.api::<Secret>().get_opt(name).await.unwrap().is_some()
}

#[tokio::test]
async fn webhook_stand_in_over_tls_is_trusted_only_through_ca_bundle() {
    let ca = Ca::new("agent-token-operator test CA");
    let other = Ca::new("some other CA");
    let minter = https_minter(&ca).await;
    let url = format!("https://127.0.0.1:{}/mint", minter.port);
    let ns = TestNamespace::new("tls").await;
    let _op = Operator::start(&ns.name);

    // No caBundle: the system roots do not know our CA.
    assert!(apply(&ns, &issuer_yaml("no-ca", &url, "")).status.success());
    // The wrong CA is no better.
    let wrong = issuer_yaml("wrong-ca", &url, &ca_bundle_yaml(&other.pem()));
    assert!(apply(&ns, &wrong).status.success());
    // The right one.
    let right = issuer_yaml("right-ca", &url, &ca_bundle_yaml(&ca.pem()));
    assert!(apply(&ns, &right).status.success());

    let api: Api<AgentToken> = ns.api();
    eventually(Duration::from_secs(45), "minted over TLS", || async {
        (api.get("right-ca").await.ok()?.status?.revision == 1).then_some(())
    })
    .await;
    assert!(has_secret(&ns, "right-ca").await);
    eventually(Duration::from_secs(30), "issuer Ready", || async {
        issuer_ready(&ns, "right-ca")
            .await
            .filter(|c| c.0 == "True")
            .map(|_| ())
    })
    .await;

    for name in ["no-ca", "wrong-ca"] {
        let (status, _reason, message) =
            eventually(Duration::from_secs(45), "issuer Unreachable", || async {
                issuer_ready(&ns, name)
                    .await
                    .filter(|c| c.1 == "Unreachable")
            })
            .await;
        assert_eq!(status, "False");
        assert!(
            message.contains("certificate") && message.contains("caBundle"),
            "{name}: the condition says what to fix: {message}"
        );
        let failure = eventually(Duration::from_secs(45), "mint failure", || async {
            failure_message(&ns, name).await
        })
        .await;
        assert!(failure.contains("caBundle"), "{name}: {failure}");
        assert!(
            !failure.contains("attempts"),
            "{name}: a certificate is not retried: {failure}"
        );
        assert!(!has_secret(&ns, name).await, "{name}: no Secret");
        eprintln!("{name}: issuer: {message}\n{name}: token: {failure}");
    }
    assert_eq!(
        minter.minted.load(Ordering::SeqCst),
        1,
        "one mint, over TLS"
    );
    assert!(minter.refused.load(Ordering::SeqCst) >= 2);
}

#[tokio::test]
async fn webhook_stand_in_that_never_answers_times_out_at_the_issuers_timeout() {
    let (port, accepted) = silent_server().await;
    let ns = TestNamespace::new("timeout").await;
    let _op = Operator::start(&ns.name);
    let url = format!("http://127.0.0.1:{port}/mint");
    assert!(
        apply(&ns, &issuer_yaml("silent", &url, "    timeout: 1s\n"))
            .status
            .success()
    );
    let failure = eventually(Duration::from_secs(45), "mint timed out", || async {
        failure_message(&ns, "silent")
            .await
            .filter(|m| m.contains("timed out"))
    })
    .await;
    // A mint that may have arrived is never sent again blind (it could
    // mint a second token): one attempt, and the ledger keeps the revision
    // as one that may have minted.
    assert!(
        failure.contains("the issuer may have acted on it") && !failure.contains("attempts"),
        "{failure}"
    );
    let at = ns.api::<AgentToken>().get("silent").await.unwrap();
    assert!(
        at.status.iter().flat_map(|s| &s.history).any(|e| {
            e.state == Some(agent_token_operator::crd::TokenLife::Unknown)
                && e.message
                    .as_deref()
                    .is_some_and(|m| m.contains("no answer arrived"))
        }),
        "{:?}",
        at.status.map(|s| s.history)
    );
    let (status, reason, message) =
        eventually(Duration::from_secs(30), "issuer Unreachable", || async {
            issuer_ready(&ns, "silent")
                .await
                .filter(|c| c.1 == "Unreachable")
        })
        .await;
    assert_eq!(status, "False");
    assert!(message.contains("timed out"), "{reason}: {message}");
    assert!(!has_secret(&ns, "silent").await, "no Secret");
    // One attempt per mint and at least one per readiness check (a probe
    // creates nothing and is retried), each cut at 1s.
    assert!(accepted.load(Ordering::SeqCst) >= 2);
    let ready = ns.api::<AgentToken>().get("silent").await.unwrap();
    let ready = ready
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.status, "False");
}

/// A plain-HTTP minting stand-in that records when each mint arrived.
async fn recording_minter() -> (u16, Arc<std::sync::Mutex<Vec<std::time::Instant>>>) {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let app = Router::new().route(
        "/mint",
        post(move || {
            let log = log.clone();
            async move {
                log.lock().unwrap().push(std::time::Instant::now());
                Json(serde_json::json!({
                    "token": format!("rl-{}{}", random_suffix(), random_suffix()),
                    "ttl": 900,
                }))
            }
        })
        .head(|| async { axum::http::StatusCode::METHOD_NOT_ALLOWED }),
    );
    // Its own thread and runtime: the test's single-threaded runtime would
    // stamp a request only when the test task yields.
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    tcp.set_nonblocking(true).unwrap();
    let port = tcp.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let tcp = TcpListener::from_std(tcp).unwrap();
            axum::serve(tcp, app).await
        })
    });
    (port, seen)
}

#[tokio::test]
async fn webhook_stand_in_issuer_rate_limit_holds_under_a_burst_of_agent_tokens() {
    const TOKENS: usize = 10;
    const PER_SECOND: f64 = 2.0;
    const BURST: usize = 2;
    let (port, seen) = recording_minter().await;
    let ns = TestNamespace::new("ratelimit").await;
    let _op = Operator::start(&ns.name);
    let mut yaml = issuer_yaml("limited", &format!("http://127.0.0.1:{port}/mint"), "")
        .split("---")
        .next()
        .unwrap()
        .to_string();
    yaml.push_str("  policy: {rateLimit: {perSecond: 2, burst: 2}}\n");
    for i in 0..TOKENS {
        yaml.push_str(&format!(
            "---\napiVersion: agenttoken.dev/v1alpha1\nkind: AgentToken\nmetadata: {{name: bot-{i}}}\nspec:\n  issuerRef: {{name: limited}}\n  lifetime: 10m\n"
        ));
    }
    let out = apply(&ns, &yaml);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let api: Api<AgentToken> = ns.api();
    eventually(Duration::from_secs(60), "every token minted", || async {
        let list = api.list(&Default::default()).await.ok()?;
        (list
            .items
            .iter()
            .filter(|a| a.status.as_ref().is_some_and(|s| s.revision == 1))
            .count()
            == TOKENS)
            .then_some(())
    })
    .await;
    let times = seen.lock().unwrap().clone();
    assert_eq!(times.len(), TOKENS, "one mint per AgentToken");
    // Token bucket: any j - i + 1 consecutive mints need at least
    // (j - i + 1 - burst) / rate seconds. The service sees each mint a
    // little after the operator spent its budget, and that delay varies with
    // the machine's load, so only windows the budget stretches to 1.5 s or
    // more are checked, with 0.5 s of slack. Without the limit all ten
    // arrive within a fraction of a second.
    for i in 0..TOKENS {
        for j in i + BURST + 2..TOKENS {
            let need = (j - i + 1 - BURST) as f64 / PER_SECOND;
            let took = times[j].duration_since(times[i]).as_secs_f64();
            assert!(
                took >= need - 0.5,
                "mints {i}..={j} came in {took:.2}s; the budget needs {need:.2}s"
            );
        }
    }
    let span = times[TOKENS - 1].duration_since(times[0]).as_secs_f64();
    eprintln!("{TOKENS} mints at perSecond 2, burst 2 took {span:.2}s");
}

//! Where issuers may send requests (`src/issuer/web.rs`, `Egress`): a
//! namespaced TokenIssuer, which a namespace admin may write, may not call
//! loopback (nor link-local or metadata addresses) unless the operator's
//! `--issuer-allow-cidr` allows it; a ClusterTokenIssuer is the platform's
//! and may. The minting service is a local STAND-IN on 127.0.0.1 (the
//! webhook issuer's API is the user's own) that counts every TCP
//! connection it accepts, so "refused" means "never reached".
//!
//! These operators start WITHOUT the allowances `Operator::start_as` gives
//! the other issuer tests (`--issuer-allow-http=false` is the marker).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::routing::post;
use axum::{Json, Router};
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use tokio::net::{TcpListener, TcpStream};

use agent_token_operator::crd::{AgentToken, TokenIssuer};

use crate::support::{Operator, TestNamespace, applied, eventually, random_suffix};

/// No allowance at all: what a cluster gets without the egress flags.
const NO_ALLOWANCES: &[&str] = &["--leader-election=false", "--issuer-allow-http=false"];

/// Counts the TCP connections it accepts before axum sees them.
struct CountingListener {
    tcp: TcpListener,
    connections: Arc<AtomicUsize>,
}

impl axum::serve::Listener for CountingListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            if let Ok(conn) = self.tcp.accept().await {
                self.connections.fetch_add(1, Ordering::SeqCst);
                return conn;
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// A plain-http minting stand-in on 127.0.0.1.
struct StandIn {
    port: u16,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
}

impl StandIn {
    async fn start() -> Self {
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (mint, probe, other) = (requests.clone(), requests.clone(), requests.clone());
        let app = Router::new()
            .route(
                "/mint",
                post(move || {
                    let n = mint.clone();
                    async move {
                        n.fetch_add(1, Ordering::SeqCst);
                        Json(serde_json::json!({
                            "token": format!("egress-{}{}", random_suffix(), random_suffix()),
                            "ttl": 900,
                        }))
                    }
                })
                .head(move || {
                    let n = probe.clone();
                    async move {
                        n.fetch_add(1, Ordering::SeqCst);
                        axum::http::StatusCode::METHOD_NOT_ALLOWED
                    }
                }),
            )
            .fallback(move || {
                let n = other.clone();
                async move {
                    n.fetch_add(1, Ordering::SeqCst);
                    axum::http::StatusCode::NOT_FOUND
                }
            });
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = tcp.local_addr().unwrap().port();
        let listener = CountingListener {
            tcp,
            connections: connections.clone(),
        };
        tokio::spawn(async move { axum::serve(listener, app).await });
        StandIn {
            port,
            connections,
            requests,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// A namespaced webhook TokenIssuer `name` at `url` and an AgentToken
/// `name` using it.
fn namespaced(name: &str, url: &str) -> String {
    format!(
        r#"
apiVersion: agenttoken.dev/v1alpha1
kind: TokenIssuer
metadata: {{name: {name}}}
spec:
  webhook:
    url: {url}
    result: {{tokenPath: $.token, expiresInPath: $.ttl}}
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

/// The TokenIssuer's Ready condition, once it is False: (reason, message).
async fn issuer_refused(ns: &TestNamespace, name: &str) -> (String, String) {
    let api: Api<TokenIssuer> = ns.api();
    eventually(
        Duration::from_secs(45),
        "TokenIssuer Ready=False",
        || async {
            api.get(name)
                .await
                .ok()?
                .status?
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Ready" && c.status == "False")
                .map(|c| (c.reason, c.message))
        },
    )
    .await
}

/// The AgentToken's Ready condition, once it is False with a failure:
/// (reason, message).
async fn token_refused(ns: &TestNamespace, name: &str) -> (String, String) {
    let api: Api<AgentToken> = ns.api();
    eventually(
        Duration::from_secs(45),
        "AgentToken Ready=False",
        || async {
            let st = api.get(name).await.ok()?.status?;
            st.last_failure_message.as_ref()?;
            st.conditions
                .into_iter()
                .find(|c| c.type_ == "Ready" && c.status == "False")
                .map(|c| (c.reason, c.message))
        },
    )
    .await
}

async fn has_secret(ns: &TestNamespace, name: &str) -> bool {
    ns.api::<Secret>().get_opt(name).await.unwrap().is_some()
}

/// Both the issuer and the token say the destination is loopback, name the
/// flag that allows it, and no Secret was written.
async fn assert_refused_as_loopback(ns: &TestNamespace, name: &str, destination: &str) {
    let (reason, message) = issuer_refused(ns, name).await;
    assert_eq!(reason, "InvalidConfig", "{name}: {message}");
    assert!(
        message.contains(&format!("destination {destination} is loopback"))
            && message.contains("--issuer-allow-cidr")
            && message.contains("ClusterTokenIssuer"),
        "{name}: the issuer names the rule: {message}"
    );
    let (reason, message) = token_refused(ns, name).await;
    assert_eq!(reason, "RotationFailed", "{name}: {message}");
    assert!(
        message.contains(&format!("destination {destination} is loopback"))
            && message.contains("--issuer-allow-cidr"),
        "{name}: the token names the rule: {message}"
    );
    assert!(!has_secret(ns, name).await, "{name}: no Secret");
}

#[tokio::test]
async fn egress_local_stand_in_behind_a_namespaced_issuer_is_refused_as_loopback() {
    let stand_in = StandIn::start().await;
    let ns = TestNamespace::new("egress-ns").await;
    let _op = Operator::start_with(&ns.name, "no-allowances", NO_ALLOWANCES);
    let port = stand_in.port;
    applied(
        &ns,
        &namespaced("direct", &format!("http://127.0.0.1:{port}/mint")),
    );
    applied(
        &ns,
        &namespaced("by-name", &format!("http://localhost:{port}/mint")),
    );
    assert_refused_as_loopback(&ns, "direct", "127.0.0.1").await;

    // A host name is refused too (plain http is checked before it resolves).
    let (reason, message) = issuer_refused(&ns, "by-name").await;
    assert_eq!(reason, "InvalidConfig", "{message}");
    assert!(
        message.contains("http://localhost") && message.contains("--issuer-allow-http"),
        "{message}"
    );
    let (_, message) = token_refused(&ns, "by-name").await;
    assert!(message.contains("is not https"), "{message}");
    assert!(!has_secret(&ns, "by-name").await);

    // Several readiness checks and mint attempts later: never reached.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(stand_in.connections(), 0, "no connection to the stand-in");
    assert_eq!(stand_in.requests(), 0, "no request to the stand-in");
}

#[tokio::test]
async fn egress_local_stand_in_by_host_name_is_refused_when_it_resolves_to_loopback() {
    let stand_in = StandIn::start().await;
    let ns = TestNamespace::new("egress-dns").await;
    // Plain http allowed, no range: what refuses is the resolved address.
    let _op = Operator::start_with(
        &ns.name,
        "http-only",
        &["--leader-election=false", "--issuer-allow-http"],
    );
    let port = stand_in.port;
    applied(
        &ns,
        &namespaced("by-name", &format!("http://localhost:{port}/mint")),
    );
    applied(
        &ns,
        &namespaced("mapped", &format!("http://[::ffff:127.0.0.1]:{port}/mint")),
    );
    assert_refused_as_loopback(&ns, "by-name", "localhost (127.0.0.1)").await;
    let (_, message) = issuer_refused(&ns, "mapped").await;
    assert!(
        message.contains("is loopback (IPv4-mapped 127.0.0.1)"),
        "{message}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(stand_in.connections(), 0, "no connection to the stand-in");
    assert_eq!(stand_in.requests(), 0, "no request to the stand-in");
}

#[tokio::test]
async fn egress_local_stand_in_behind_a_cluster_issuer_mints() {
    let stand_in = StandIn::start().await;
    let ns = TestNamespace::new("egress-cti").await;
    let _op = Operator::start_with(&ns.name, "no-allowances", NO_ALLOWANCES);
    let issuer = crate::support::DeleteClusterIssuer(format!("egress-{}", random_suffix()));
    let (name, port, namespace) = (&issuer.0, stand_in.port, &ns.name);
    applied(
        &ns,
        &format!(
            r#"
apiVersion: agenttoken.dev/v1alpha1
kind: ClusterTokenIssuer
metadata: {{name: {name}}}
spec:
  webhook:
    url: http://127.0.0.1:{port}/mint
    result: {{tokenPath: $.token, expiresInPath: $.ttl}}
  policy:
    allowedNamespaces: ["{namespace}"]
---
apiVersion: agenttoken.dev/v1alpha1
kind: AgentToken
metadata: {{name: bot}}
spec:
  issuerRef: {{kind: ClusterTokenIssuer, name: {name}}}
  lifetime: 10m
"#
        ),
    );
    let api: Api<AgentToken> = ns.api();
    eventually(
        Duration::from_secs(45),
        "minted by the platform's issuer",
        || async { (api.get("bot").await.ok()?.status?.revision == 1).then_some(()) },
    )
    .await;
    assert!(has_secret(&ns, "bot").await, "the Secret is written");
    assert!(stand_in.requests() >= 1);
}

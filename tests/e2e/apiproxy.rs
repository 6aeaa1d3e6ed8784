//! A fault-injecting proxy in front of the local API server, for the
//! failures a real control plane has but cannot be asked to have on cue:
//! a write the server applied whose answer never reaches the operator (a
//! timeout, a dropped connection), and the operator dying right after a
//! write was applied and before it could record that.
//!
//! The operator under test gets a kubeconfig pointing at the proxy (plain
//! HTTP on loopback, no credentials); the proxy forwards every request to
//! the real API server as cluster-admin (what the tests' operators run as
//! anyway) and streams the answers back, watches included. A [`Fault`]
//! names the requests it applies to and what happens to them.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use http::{Method, StatusCode};
use kube::Client;

use crate::support::{client_for, cluster};

/// What happens to a matching request.
#[derive(Clone, Copy, Debug)]
pub enum Effect {
    /// The server applies it; the client gets a 500 instead of the
    /// server's answer, and cannot tell whether it was applied.
    LoseAnswer,
    /// The server applies it; then process `pid` (the operator) is killed
    /// with SIGKILL before it hears the answer.
    KillAfter(u32),
    /// Never forwarded: answered 500 (a partition between this client and
    /// the server, for these requests only).
    Refuse,
    /// Never forwarded: process `pid` (the operator) is killed with SIGKILL
    /// instead, as if it died just before sending it.
    KillInstead(u32),
    /// Never forwarded: answered 409 Conflict, as when someone else wrote
    /// the object first.
    Conflict,
}

/// One request that went through the proxy.
#[derive(Clone, Debug)]
pub struct Seen {
    /// When it reached the proxy.
    pub at: std::time::Instant,
    pub method: Method,
    pub path: String,
    /// The status code the client got.
    pub status: u16,
}

impl Seen {
    /// A write (not a read or a watch).
    pub fn is_write(&self) -> bool {
        !matches!(self.method, Method::GET | Method::HEAD | Method::OPTIONS)
    }
}

type Matcher = Box<dyn Fn(&Method, &str, &[u8]) -> bool + Send + Sync>;

/// A fault for the next `times` requests that `matches` (method, path,
/// body) accepts.
pub struct Fault {
    pub matches: Matcher,
    pub effect: Effect,
    pub times: usize,
}

/// Writes of Lease `name` in `ns` (creation, renewal, release).
pub fn lease_write(ns: &str, name: &str) -> Matcher {
    let collection = format!("/apis/coordination.k8s.io/v1/namespaces/{ns}/leases");
    let item = format!("{collection}/{name}");
    Box::new(move |method, path, _| {
        (*method == Method::POST && path == collection)
            || (matches!(*method, Method::PATCH | Method::PUT) && path == item)
    })
}

/// Writes of Secret `name` in `ns`: its creation (POST, the name in the
/// body) or a patch or update of it.
pub fn secret_write(ns: &str, name: &str) -> Matcher {
    let collection = format!("/api/v1/namespaces/{ns}/secrets");
    let item = format!("{collection}/{name}");
    let named = format!("\"name\":\"{name}\"");
    Box::new(move |method, path, body| match *method {
        Method::POST => {
            path == collection && String::from_utf8_lossy(body).contains(named.as_str())
        }
        Method::PATCH | Method::PUT => path == item,
        _ => false,
    })
}

#[derive(Clone)]
struct Shared {
    upstream: Client,
    faults: Arc<Mutex<Vec<Fault>>>,
    fired: Arc<Mutex<Vec<String>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

/// The running proxy; stops when dropped.
pub struct ApiProxy {
    pub kubeconfig: PathBuf,
    shared: Shared,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl ApiProxy {
    pub async fn start() -> ApiProxy {
        let upstream = client_for(&cluster().admin_kubeconfig).await;
        let shared = Shared {
            upstream,
            faults: Arc::default(),
            fired: Arc::default(),
            seen: Arc::default(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the API proxy");
        let port = listener.local_addr().unwrap().port();
        let app = axum::Router::new()
            .fallback(forward)
            .with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let dir = tempfile::tempdir().expect("temp dir");
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\n\
                 clusters: [{{name: proxy, cluster: {{server: \"http://127.0.0.1:{port}\"}}}}]\n\
                 users: [{{name: proxy, user: {{}}}}]\n\
                 contexts: [{{name: proxy, context: {{cluster: proxy, user: proxy}}}}]\n\
                 current-context: proxy\n"
            ),
        )
        .expect("write the proxy kubeconfig");
        ApiProxy {
            kubeconfig,
            shared,
            task,
            _dir: dir,
        }
    }

    pub fn inject(&self, fault: Fault) {
        self.shared.faults.lock().unwrap().push(fault);
    }

    /// The requests a fault was applied to ("METHOD path: effect").
    pub fn fired(&self) -> Vec<String> {
        self.shared.fired.lock().unwrap().clone()
    }

    /// Every request answered so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }
}

impl Drop for ApiProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(State(shared): State<Shared>, req: Request) -> Response {
    let arrived = std::time::Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let answer = answer(&shared, req).await;
    shared.seen.lock().unwrap().push(Seen {
        at: arrived,
        method,
        path,
        status: answer.status().as_u16(),
    });
    answer
}

async fn answer(shared: &Shared, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let Ok(body) = axum::body::to_bytes(body, 64 << 20).await else {
        return status(StatusCode::BAD_REQUEST, "request body unreadable");
    };
    let path = parts.uri.path().to_string();
    let effect = {
        let mut faults = shared.faults.lock().unwrap();
        let found = faults
            .iter_mut()
            .find(|f| f.times > 0 && (f.matches)(&parts.method, &path, &body));
        found.map(|f| {
            f.times -= 1;
            f.effect
        })
    };
    let mut out = http::Request::builder().method(parts.method.clone()).uri(
        parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string(),
    );
    for (name, value) in &parts.headers {
        if name != http::header::HOST && name != http::header::CONTENT_LENGTH {
            out = out.header(name, value);
        }
    }
    let Ok(out) = out.body(kube::client::Body::from(body.to_vec())) else {
        return status(StatusCode::BAD_REQUEST, "request not forwardable");
    };
    if let Some(e @ (Effect::Refuse | Effect::KillInstead(_) | Effect::Conflict)) = effect {
        shared
            .fired
            .lock()
            .unwrap()
            .push(format!("{} {path}: {e:?}", parts.method));
        if let Effect::KillInstead(pid) = e {
            kill(pid);
        }
        if let Effect::Conflict = e {
            return status(
                StatusCode::CONFLICT,
                "injected fault: the object has been modified",
            );
        }
        return status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "injected fault: not forwarded",
        );
    }
    let answer = shared.upstream.send(out).await;
    if let Some(effect) = effect {
        shared
            .fired
            .lock()
            .unwrap()
            .push(format!("{} {path}: {effect:?}", parts.method));
        match effect {
            Effect::LoseAnswer => {
                return status(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "injected fault: the server's answer was lost",
                );
            }
            Effect::KillAfter(pid) => {
                kill(pid);
                return status(StatusCode::INTERNAL_SERVER_ERROR, "injected fault: killed");
            }
            Effect::Refuse | Effect::KillInstead(_) | Effect::Conflict => {
                unreachable!("answered above")
            }
        }
    }
    match answer {
        Ok(resp) => {
            let (parts, body) = resp.into_parts();
            Response::from_parts(parts, Body::new(body))
        }
        Err(e) => status(StatusCode::BAD_GATEWAY, &format!("upstream: {e}")),
    }
}

fn kill(pid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
}

/// Status writes of AgentToken `name` in `ns` whose body contains `marker`.
pub fn status_write_with(ns: &str, name: &str, marker: &str) -> Matcher {
    let path = format!("/apis/agenttoken.dev/v1alpha1/namespaces/{ns}/agenttokens/{name}/status");
    let marker = marker.to_string();
    Box::new(move |method, p, body| {
        matches!(*method, Method::PATCH | Method::PUT)
            && p == path
            && String::from_utf8_lossy(body).contains(marker.as_str())
    })
}

/// An answer in the API server's Status shape.
fn status(code: StatusCode, message: &str) -> Response {
    let body = serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": message,
        "reason": if code == StatusCode::CONFLICT { "Conflict" } else { "InternalError" },
        "code": code.as_u16(),
    });
    Response::builder()
        .status(code)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

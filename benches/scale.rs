//! Scale benchmark on the real local control plane: time to first token,
//! sustained mint rate, memory, revocation latency, rotation spread, first
//! tokens under a rotation backlog (`overload`), first tokens from a webhook
//! issuer, the idle and steady-rotation cost, and the API round trips each
//! token costs. Run it with `make bench`
//! (or `cargo bench --bench scale -- [--quick] [--only NAME,...]
//! [--keep-cluster]`); it prints a Markdown report and writes it to
//! `target/bench/report.md`.
//!
//! `--only` takes scenario names, comma-separated: `floor`, `first-token`,
//! `memory`, `revocation`, `idle`, `webhook`, `rotation`, `overload`,
//! `spread`, `usage`, `killswitch`, `rss` (the first-token runs at 10,000
//! alone, for peak RSS). (`first-token` and `webhook` also run `floor`:
//! their tables compare the mint rate with the API server's write floor.)
//!
//! It starts its OWN cluster (state in `.cache/bench-cluster`, API server on
//! port 16540; override with `AGENTTOKEN_BENCH_CLUSTER_DIR` and
//! `AGENTTOKEN_BENCH_PORT_BASE`, which takes the next four ports too) so it
//! never disturbs the test cluster, and tears it down at the end unless
//! `--keep-cluster`. Each scenario runs the release operator binary as a
//! separate process, so its memory and CPU are the operator's alone (`VmHWM`
//! and utime + stime from /proc).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::authentication::v1::TokenReview;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, ServiceAccount};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher;
use kube::{Client, Config};
use serde_json::{Value, json};

use agent_token_operator::crd::AgentToken;

#[path = "scale/killswitch.rs"]
mod killswitch;
#[path = "scale/steady.rs"]
mod steady;
#[path = "scale/usage.rs"]
mod usage;

const CREATE_CONCURRENCY: usize = 32;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The bench cluster's first port (`e2e/cluster` uses it and the next
/// four): `AGENTTOKEN_BENCH_PORT_BASE`, default 16540.
fn port_base() -> String {
    std::env::var("AGENTTOKEN_BENCH_PORT_BASE").unwrap_or_else(|_| "16540".into())
}

/// The bench cluster's state directory: `AGENTTOKEN_BENCH_CLUSTER_DIR`
/// (relative to the repository), default `.cache/bench-cluster`. With the
/// port base, lets two benches run side by side on one machine.
fn cluster_dir() -> PathBuf {
    root().join(
        std::env::var("AGENTTOKEN_BENCH_CLUSTER_DIR")
            .unwrap_or_else(|_| ".cache/bench-cluster".into()),
    )
}

fn cluster_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(root().join("e2e/cluster"));
    c.args(args)
        .env("AGENTTOKEN_CLUSTER_DIR", cluster_dir())
        .env("AGENTTOKEN_PORT_BASE", port_base());
    c
}

/// The chart's finalizer policy (`admission.finalizerPolicy`), as a
/// cluster installed with the chart has it: every new AgentToken gets the
/// finalizer as it is admitted, not from a patch by the operator. Rendered
/// by the chart itself, with the helm `e2e/cluster` builds.
async fn install_finalizer_policy(client: &Client) {
    let bin = std::env::var("AGENTTOKEN_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join(".cache/bin"));
    let rendered = Command::new(bin.join("helm"))
        .args(["template", "bench"])
        .arg(root().join("charts/agent-token-operator"))
        .args([
            "-n",
            "agent-token-system",
            "--set",
            "admission.finalizerPolicy=true",
            "--show-only",
            "templates/finalizer-policy.yaml",
        ])
        .env("HELM_CACHE_HOME", root().join("target/helm/cache"))
        .env("HELM_CONFIG_HOME", root().join("target/helm/config"))
        .env("HELM_DATA_HOME", root().join("target/helm/data"))
        .output()
        .expect("helm template");
    assert!(
        rendered.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    let mut apply = cluster_cmd(&["kubectl", "apply", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("kubectl apply");
    use std::io::Write;
    apply
        .stdin
        .take()
        .unwrap()
        .write_all(&rendered.stdout)
        .unwrap();
    assert!(
        apply.wait().unwrap().success(),
        "apply the finalizer policy"
    );
    // A binding takes a moment to take effect: until then, dry runs.
    let ns = create_namespace(client, "bench-policy").await;
    let api: Api<AgentToken> = Api::namespaced(client.clone(), &ns);
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let started = Instant::now();
    loop {
        let at = api
            .create(&dry, &agent_token("policy", Kind::Jwt, "1h"))
            .await
            .expect("dry-run AgentToken");
        if at.metadata.finalizers.is_some_and(|f| !f.is_empty()) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the finalizer policy did not take effect in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("finalizer policy in effect after {:?}", started.elapsed());
}

struct Opts {
    quick: bool,
    only: Option<Vec<String>>,
    keep: bool,
}

impl Opts {
    fn parse() -> Self {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let mut o = Opts {
            quick: false,
            only: None,
            keep: false,
        };
        let mut i = 0;
        while i < args.len() {
            match args[i].as_str() {
                "--quick" => o.quick = true,
                "--keep-cluster" => o.keep = true,
                "--only" => {
                    i += 1;
                    o.only = args
                        .get(i)
                        .map(|s| s.split(',').map(str::to_string).collect());
                }
                // cargo bench passes --bench; ignore what is not ours.
                _ => {}
            }
            i += 1;
        }
        o
    }

    fn wants(&self, name: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|x| x == name))
    }
}

/// The report, printed as it grows and written at the end.
#[derive(Default)]
struct Report(String);

impl Report {
    fn line(&mut self, s: impl AsRef<str>) {
        println!("{}", s.as_ref());
        self.0.push_str(s.as_ref());
        self.0.push('\n');
    }

    /// API requests by "verb resource" (`requests_delta`), one column per
    /// run: reads, then writes, each followed by their sum, then the total.
    fn requests_table(&mut self, cols: &[(String, BTreeMap<String, f64>)]) {
        let names: Vec<&str> = cols.iter().map(|(n, _)| n.as_str()).collect();
        self.line(format!("| request | {} |", names.join(" | ")));
        self.line(format!("|---|{}", "---|".repeat(cols.len())));
        let keys: std::collections::BTreeSet<&String> =
            cols.iter().flat_map(|(_, m)| m.keys()).collect();
        let cell = |v: f64| format!("{v:.2}");
        for (writes, sum) in [(false, "**reads**"), (true, "**writes**")] {
            for k in keys.iter().filter(|k| is_write(k) == writes) {
                let row: Vec<String> = cols
                    .iter()
                    .map(|(_, m)| m.get(*k).map_or("-".into(), |v| cell(*v)))
                    .collect();
                self.line(format!("| {k} | {} |", row.join(" | ")));
            }
            let row: Vec<String> = cols
                .iter()
                .map(|(_, m)| {
                    let t = total(
                        m.iter()
                            .filter(|(k, _)| is_write(k) == writes)
                            .map(|(_, v)| v),
                    );
                    format!("**{}**", cell(t))
                })
                .collect();
            self.line(format!("| {sum} | {} |", row.join(" | ")));
        }
        let row: Vec<String> = cols
            .iter()
            .map(|(_, m)| format!("**{}**", cell(total(m.values()))))
            .collect();
        self.line(format!("| **total** | {} |", row.join(" | ")));
    }
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The operator under measurement.
struct Operator {
    child: Child,
    port: u16,
}

impl Operator {
    async fn start(kubeconfig: &Path, namespace: &str) -> Self {
        Self::start_with(kubeconfig, namespace, &[]).await
    }

    /// With `extra` flags (the usage endpoint's).
    async fn start_with(kubeconfig: &Path, namespace: &str, extra: &[String]) -> Self {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let log = root().join(format!("target/bench/operator-{namespace}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_agent-token-operator"))
            .args(["run", "--namespace", namespace, "--leader-election=false"])
            // Its own namespace (where it keeps tokens revoked by value):
            // the bench cluster has only the watched ones.
            .args([
                "--lease-namespace",
                namespace.split(',').next().unwrap_or(namespace),
            ])
            .args(["--metrics-address", &format!("127.0.0.1:{port}")])
            .args(["--log-level", "warn"])
            // The webhook stand-ins listen on loopback over plain http behind
            // namespaced TokenIssuers, which the operator refuses by default.
            .args(["--issuer-allow-http", "--issuer-allow-cidr=127.0.0.0/8"])
            // Flags to compare (`--concurrency 64`), from the environment.
            .args(
                std::env::var("AGENTTOKEN_BENCH_OPERATOR_ARGS")
                    .unwrap_or_default()
                    .split_whitespace(),
            )
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("start the operator");
        let op = Operator { child, port };
        let deadline = Instant::now() + Duration::from_secs(60);
        while op.get("/readyz").await.map(|(c, _)| c) != Some(200) {
            assert!(Instant::now() < deadline, "operator not ready in 60 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        op
    }

    async fn get(&self, path: &str) -> Option<(u16, String)> {
        let r = reqwest::get(format!("http://127.0.0.1:{}{path}", self.port))
            .await
            .ok()?;
        Some((r.status().as_u16(), r.text().await.ok()?))
    }

    /// `VmHWM` (peak resident set) and `VmRSS`, in KiB.
    fn memory(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmHWM:"), field("VmRSS:"))
    }

    /// Waits until the operator's non-watch request count has not moved
    /// for `still`; returns when it last moved, or None after `limit`.
    async fn quiet(&self, still: Duration, limit: Duration) -> Option<Instant> {
        let t0 = Instant::now();
        let count = |m: BTreeMap<String, f64>| {
            total(
                m.iter()
                    .filter(|(k, _)| !k.starts_with("watch "))
                    .map(|(_, v)| v),
            )
        };
        let mut last = count(self.api_requests().await);
        let mut changed = t0;
        while changed.elapsed() < still {
            if t0.elapsed() >= limit {
                return None;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = count(self.api_requests().await);
            if now != last {
                (last, changed) = (now, Instant::now());
            }
        }
        Some(changed)
    }

    /// `agenttoken_kube_api_requests_total` by "verb resource".
    async fn api_requests(&self) -> BTreeMap<String, f64> {
        let (_, body) = self.get("/metrics").await.unwrap_or_default();
        let mut out = BTreeMap::new();
        for line in body.lines() {
            let Some(rest) = line.strip_prefix("agenttoken_kube_api_requests_total{") else {
                continue;
            };
            let Some((labels, value)) = rest.split_once("} ") else {
                continue;
            };
            let get = |k: &str| {
                labels
                    .split(',')
                    .find_map(|kv| kv.strip_prefix(&format!("{k}=\"")))
                    .map(|v| v.trim_end_matches('"').to_string())
                    .unwrap_or_default()
            };
            let key = format!("{} {}", get("verb"), get("resource"));
            *out.entry(key).or_default() += value.trim().parse::<f64>().unwrap_or(0.0);
        }
        out
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Bench {
    client: Client,
    kubeconfig: PathBuf,
    report: Report,
    opts: Opts,
    /// API requests per token by "verb resource", by run, for the next
    /// `requests_per_token` table.
    per_token: Vec<(String, BTreeMap<String, f64>)>,
    /// CPU during each first-token run (a table row), for the same table.
    cpu_rows: Vec<String>,
    /// Parallel writes per second the API server took with nothing else
    /// running (the floor scenario), once measured.
    floor_writes: Option<f64>,
}

async fn client_for(kubeconfig: &Path) -> Client {
    let kc = Kubeconfig::read_from(kubeconfig).unwrap();
    let mut config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    config.read_timeout = Some(Duration::from_secs(300));
    Client::try_from(config).unwrap()
}

fn random() -> String {
    use rand::Rng;
    let mut r = rand::rng();
    (0..6)
        .map(|_| (b'a' + r.random_range(0..26)) as char)
        .collect()
}

async fn create_namespace(client: &Client, prefix: &str) -> String {
    let name = format!("{prefix}-{}", random());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    name
}

async fn apply_json(client: &Client, ns: &str, obj: Value) {
    let kind = obj["kind"].as_str().unwrap().to_string();
    let name = obj["metadata"]["name"].as_str().unwrap().to_string();
    let pp = PatchParams::apply("bench").force();
    match kind.as_str() {
        "Secret" => {
            Api::<Secret>::namespaced(client.clone(), ns)
                .patch(&name, &pp, &Patch::Apply(&obj))
                .await
                .unwrap();
        }
        "ServiceAccount" => {
            Api::<ServiceAccount>::namespaced(client.clone(), ns)
                .patch(&name, &pp, &Patch::Apply(&obj))
                .await
                .unwrap();
        }
        "TokenIssuer" => {
            Api::<agent_token_operator::crd::TokenIssuer>::namespaced(client.clone(), ns)
                .patch(&name, &pp, &Patch::Apply(&obj))
                .await
                .unwrap();
        }
        other => panic!("apply_json: {other}"),
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    ServiceAccount,
    Jwt,
    /// The in-bench minting stand-in ([`MintStandIn`]), granting the
    /// lifetime asked.
    Webhook,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::ServiceAccount => "serviceAccount",
            Kind::Jwt => "jwt",
            Kind::Webhook => "webhook",
        }
    }
}

fn openssl(args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl");
    assert!(out.status.success(), "openssl {args:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// The TokenIssuer "issuer" in `ns`; for a webhook, the stand-in it calls
/// (keep it as long as the issuer is used).
async fn setup_issuer(
    client: &Client,
    ns: &str,
    kind: Kind,
    extra_policy: Option<Value>,
) -> Option<MintStandIn> {
    let mut stand_in = None;
    let mut spec = match kind {
        Kind::ServiceAccount => {
            apply_json(
                client,
                ns,
                json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "agent"}}),
            )
            .await;
            json!({"serviceAccount": {}})
        }
        Kind::Jwt => {
            let pem = openssl(&[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ]);
            apply_json(
                client,
                ns,
                json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "signing-key"}, "stringData": {"key.pem": pem}}),
            )
            .await;
            json!({"jwt": {"signingKeySecretRef": {"name": "signing-key", "key": "key.pem"}, "issuer": "https://bench.example"}, "policy": {"allowedAudiences": ["https://api.bench"]}})
        }
        Kind::Webhook => {
            let s = MintStandIn::start(None).await;
            let spec = json!({"webhook": s.webhook("{\"ttl\": {{ lifetimeSeconds }}}")});
            stand_in = Some(s);
            spec
        }
    };
    if let Some(Value::Object(p)) = extra_policy {
        for (k, v) in p {
            spec["policy"][k] = v;
        }
    }
    apply_issuer(client, ns, spec).await;
    stand_in
}

/// The TokenIssuer every scenario's AgentTokens use (`issuer`) in `ns`.
async fn apply_issuer(client: &Client, ns: &str, spec: Value) {
    apply_json(
        client,
        ns,
        json!({"apiVersion": "agenttoken.dev/v1alpha1", "kind": "TokenIssuer", "metadata": {"name": "issuer"}, "spec": spec}),
    )
    .await;
}

fn agent_token(name: &str, kind: Kind, lifetime: &str) -> AgentToken {
    let mut spec = json!({"issuerRef": {"name": "issuer"}, "lifetime": lifetime});
    match kind {
        Kind::ServiceAccount => spec["serviceAccountName"] = json!("agent"),
        Kind::Jwt => spec["audiences"] = json!(["https://api.bench"]),
        Kind::Webhook => {}
    }
    serde_json::from_value(json!({
        "apiVersion": "agenttoken.dev/v1alpha1",
        "kind": "AgentToken",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap()
}

fn is_ready(at: &AgentToken) -> bool {
    at.status.as_ref().is_some_and(|s| {
        s.revision >= 1
            && s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

/// Watches the namespace's AgentTokens and records when each first
/// becomes Ready with a token.
fn watch_ready(client: &Client, ns: &str) -> Arc<Mutex<HashMap<String, Instant>>> {
    let seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let api: Api<AgentToken> = Api::namespaced(client.clone(), ns);
    let out = seen.clone();
    tokio::spawn(async move {
        let stream = watcher(api, watcher::Config::default().any_semantic());
        futures::pin_mut!(stream);
        while let Some(ev) = stream.next().await {
            let now = Instant::now();
            let objs: Vec<AgentToken> = match ev {
                Ok(watcher::Event::Apply(o)) | Ok(watcher::Event::InitApply(o)) => vec![o],
                _ => continue,
            };
            let mut m = out.lock().unwrap();
            for o in objs {
                if is_ready(&o) {
                    m.entry(o.metadata.name.clone().unwrap()).or_insert(now);
                }
            }
        }
    });
    seen
}

/// Creates `names` with CREATE_CONCURRENCY requests in flight; returns the
/// time each create was sent. `pace` spreads the creates over that long.
async fn create_all(
    client: &Client,
    ns: &str,
    names: &[String],
    make: impl Fn(&str) -> AgentToken,
    pace: Option<Duration>,
) -> HashMap<String, Instant> {
    let api: Api<AgentToken> = Api::namespaced(client.clone(), ns);
    let start = Instant::now();
    let n = names.len().max(1) as f64;
    let sent: Vec<(String, Instant)> = futures::stream::iter(names.iter().enumerate())
        .map(|(i, name)| {
            let api = api.clone();
            let obj = make(name);
            async move {
                if let Some(p) = pace {
                    let at = start + p.mul_f64(i as f64 / n);
                    tokio::time::sleep_until(at.into()).await;
                }
                let t0 = Instant::now();
                api.create(&PostParams::default(), &obj).await.unwrap();
                (name.clone(), t0)
            }
        })
        .buffer_unordered(CREATE_CONCURRENCY)
        .collect()
        .await;
    sent.into_iter().collect()
}

async fn wait_for(seen: &Arc<Mutex<HashMap<String, Instant>>>, n: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let have = seen.lock().unwrap().len();
        if have >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {have} of {n} AgentTokens ready after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn secret_token(s: &Secret) -> Option<String> {
    String::from_utf8(s.data.as_ref()?.get("token")?.0.clone()).ok()
}

/// Checks that every Secret holds a token its issuer accepts: every JWT
/// against the published JWKS, a sample of ServiceAccount tokens by
/// TokenReview, every webhook token against those the stand-in issued.
/// Returns how many were checked.
async fn verify_tokens(
    client: &Client,
    ns: &str,
    kind: Kind,
    n: usize,
    stand_in: Option<&MintStandIn>,
) -> usize {
    let secrets: Vec<Secret> = Api::<Secret>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels("app.kubernetes.io/managed-by=agent-token-operator"))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|s| secret_token(s).is_some())
        .collect();
    assert_eq!(secrets.len(), n, "one Secret with a token per AgentToken");
    match kind {
        Kind::Jwt => {
            let cm: ConfigMap = Api::namespaced(client.clone(), ns)
                .get("issuer-jwks")
                .await
                .unwrap();
            let set: jsonwebtoken::jwk::JwkSet =
                serde_json::from_str(&cm.data.unwrap()["jwks.json"]).unwrap();
            for s in &secrets {
                let token = secret_token(s).unwrap();
                let header = jsonwebtoken::decode_header(&token).unwrap();
                let jwk = set.find(header.kid.as_deref().unwrap()).unwrap();
                let key = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
                let mut v = jsonwebtoken::Validation::new(header.alg);
                v.set_issuer(&["https://bench.example"]);
                v.set_audience(&["https://api.bench"]);
                jsonwebtoken::decode::<Value>(&token, &key, &v).expect("token verifies");
            }
            secrets.len()
        }
        Kind::ServiceAccount => {
            let sample: Vec<&Secret> = secrets.iter().step_by((n / 50).max(1)).collect();
            for s in &sample {
                assert!(
                    review(client, &secret_token(s).unwrap()).await,
                    "ServiceAccount token authenticates"
                );
            }
            sample.len()
        }
        Kind::Webhook => {
            let issued = stand_in
                .expect("the webhook's stand-in")
                .issued
                .lock()
                .unwrap();
            for s in &secrets {
                assert!(
                    issued.contains(&secret_token(s).unwrap()),
                    "the Secret holds a token the stand-in issued"
                );
            }
            secrets.len()
        }
    }
}

/// Whether the API server authenticates `token` (TokenReview).
async fn review(client: &Client, token: &str) -> bool {
    let tr: TokenReview = serde_json::from_value(json!({"spec": {"token": token}})).unwrap();
    let out = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &tr)
        .await
        .unwrap();
    out.status.and_then(|s| s.authenticated).unwrap_or(false)
}

struct FirstToken {
    ns: String,
    kind: Kind,
    n: usize,
    /// Kept running (for the revocation and idle scenarios); dropping it
    /// stops it.
    operator: Operator,
    /// The webhook issuer's stand-in, for as long as the tokens are used.
    _stand_in: Option<MintStandIn>,
    /// The row of the first-token table.
    row: String,
    /// API requests per token by "verb resource" (watches excluded).
    per_token: BTreeMap<String, f64>,
    /// The row of the CPU table: each process's CPU during the burst.
    cpu_row: String,
}

/// Requests by "verb resource" made between two `Operator::api_requests`,
/// watches excluded (they are long-lived; what they cost is not per
/// request).
fn requests_delta(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .filter(|(k, _)| !k.starts_with("watch "))
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d > 0.0)
        .collect()
}

/// Whether a "verb resource" is a write (what the API server persists):
/// create, patch, update, delete, deletecollection. The rest (get, list)
/// are reads.
fn is_write(key: &str) -> bool {
    matches!(
        key.split(' ').next(),
        Some("create" | "patch" | "update" | "delete" | "deletecollection")
    )
}

/// A sum that is 0, not -0, when there is nothing to add (f64's `sum`
/// starts from -0.0).
fn total<'a>(values: impl Iterator<Item = &'a f64>) -> f64 {
    values.fold(0.0, |a, b| a + b)
}

fn scaled(m: &BTreeMap<String, f64>, by: f64) -> BTreeMap<String, f64> {
    m.iter().map(|(k, v)| (k.clone(), v / by)).collect()
}

fn writes(m: &BTreeMap<String, f64>) -> f64 {
    total(m.iter().filter(|(k, _)| is_write(k)).map(|(_, v)| v))
}

impl Bench {
    /// The first-token table's header (the scenario's rows follow).
    fn first_token_header(&mut self) {
        self.report.line("Latency: from the AgentToken's create request to Ready=True with the token in its Secret (seen by a watch). Rate: tokens made ready per second in the steady middle (10th to 90th percentile of completions). API requests per token: every non-watch request the operator made from before the creates until its request count stood still for 5 s, divided by N; *last request* is when that was, after the last token was Ready. Writes per token: the create, patch, update and delete requests among them (Events included); the floor allows the parallel-write floor (see the floor table) divided by that many tokens per second.");
        self.report.line("");
        self.report.line("| issuer | AgentTokens | unrelated Secrets | p50 s | p99 s | max s | created in s | all ready in s | tokens/s | operator peak RSS MiB | API requests per token | last request s after all ready | tokens verified | writes per token | floor allows tokens/s | tokens/s / allowed |");
        self.report
            .line("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    }

    /// Adds a first-token run to the report: its row now, its requests to
    /// the per-token table printed by `requests_per_token`.
    fn record(&mut self, ft: &FirstToken) {
        self.report.line(&ft.row);
        self.per_token.push((
            format!("{} x{}", ft.kind.label(), ft.n),
            ft.per_token.clone(),
        ));
        self.cpu_rows.push(ft.cpu_row.clone());
    }

    /// The requests-per-token table of the runs recorded since the last one.
    fn requests_per_token(&mut self) {
        self.report.line(
            "API requests per first token, by verb and resource (watches excluded; `create events` are the operator's Events):",
        );
        self.report.line("");
        let cols = std::mem::take(&mut self.per_token);
        self.report.requests_table(&cols);
        self.report.line("");
        self.report.line("CPU from the first create until every token was Ready, in % of one CPU (the machine has the CPUs above; utime + stime from /proc/<pid>/stat). The bench process creates the AgentTokens and watches them (and runs the minting stand-in of a webhook issuer):");
        self.report.line("");
        self.report
            .line("| run | operator | kube-apiserver | etcd | bench process |");
        self.report.line("|---|---|---|---|---|");
        for row in std::mem::take(&mut self.cpu_rows) {
            self.report.line(row);
        }
        self.report.line("");
    }

    /// Time to first token for `n` AgentTokens created at once.
    async fn first_token(&mut self, kind: Kind, n: usize, noise: usize) -> FirstToken {
        let ns = create_namespace(&self.client, &format!("bench-{}", n)).await;
        let noise_took = if noise > 0 {
            Some(self.noise_secrets(&ns, noise).await)
        } else {
            None
        };
        let stand_in = setup_issuer(&self.client, &ns, kind, None).await;
        let operator = Operator::start(&self.kubeconfig, &ns).await;
        let (hwm_idle, _) = operator.memory();
        let before = operator.api_requests().await;
        let seen = watch_ready(&self.client, &ns);
        let names: Vec<String> = (0..n).map(|i| format!("agent-{i:05}")).collect();
        let cpu = steady::CpuWindow::start(&[
            Some(operator.pid()),
            steady::cluster_pid("kube-apiserver"),
            steady::cluster_pid("etcd"),
            Some(std::process::id()),
        ]);
        let t_start = Instant::now();
        let sent = create_all(
            &self.client,
            &ns,
            &names,
            |m| agent_token(m, kind, "1h"),
            None,
        )
        .await;
        let created_in = t_start.elapsed();
        wait_for(&seen, n, Duration::from_secs(3600)).await;
        let cpu_row = format!("| {} x{n} | {} |", kind.label(), cpu.percent().join(" | "));
        let seen = seen.lock().unwrap().clone();
        let wall = seen.values().max().unwrap().duration_since(t_start);
        let lat = sorted(
            names
                .iter()
                .map(|m| seen[m].duration_since(sent[m]).as_secs_f64())
                .collect(),
        );
        // Sustained rate: tokens made ready per second between the 10th and
        // 90th percentile of completion (the steady middle of the run).
        let mut done = sorted(
            seen.values()
                .map(|t| t.duration_since(t_start).as_secs_f64())
                .collect(),
        );
        done.dedup();
        let rate = if n >= 100 {
            let (a, b) = (pct(&done, 10.0), pct(&done, 90.0));
            (0.8 * n as f64) / (b - a).max(1e-3)
        } else {
            n as f64 / wall.as_secs_f64()
        };
        // Count every request the first tokens caused: the operator goes on
        // reconciling after the last token is Ready (its own status writes
        // trigger reconciles, queued behind the first mints), so wait
        // until its request count has not moved for 5 s.
        let settled = operator
            .quiet(Duration::from_secs(5), Duration::from_secs(1800))
            .await
            .expect("the operator still making requests 30 minutes after the first tokens");
        let settled_after = settled
            .saturating_duration_since(*seen.values().max().unwrap())
            .as_secs_f64();
        let after = operator.api_requests().await;
        let (hwm, rss) = operator.memory();
        let checked = verify_tokens(&self.client, &ns, kind, n, stand_in.as_ref()).await;
        let per_token = scaled(&requests_delta(&before, &after), n as f64);
        let all = total(per_token.values());
        let w = writes(&per_token);
        // What the API server's measured write rate allows at w writes per
        // token, and how much of it the operator reached.
        let (allowed, ratio) = match self.floor_writes {
            Some(f) if w > 0.0 => (format!("{:.0}", f / w), format!("{:.2}", rate / (f / w))),
            _ => ("-".into(), "-".into()),
        };
        let row = format!(
            "| {} | {n} | {noise} | {:.3} | {:.3} | {:.3} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {settled_after:.1} | {} | {w:.2} | {allowed} | {ratio} |",
            kind.label(),
            pct(&lat, 50.0),
            pct(&lat, 99.0),
            lat.last().unwrap(),
            created_in.as_secs_f64(),
            wall.as_secs_f64(),
            rate,
            mib(hwm),
            all,
            checked,
        );
        eprintln!(
            "  {} x{n}: idle peak {:.1} MiB, now {:.1} MiB{}",
            kind.label(),
            mib(hwm_idle),
            mib(rss),
            noise_took
                .map(|d| format!("; {noise} noise Secrets made in {:.0}s", d.as_secs_f64()))
                .unwrap_or_default()
        );
        FirstToken {
            ns,
            kind,
            n,
            operator,
            _stand_in: stand_in,
            row,
            per_token,
            cpu_row,
        }
    }

    /// `count` Secrets that are nothing to the operator, in `ns`.
    async fn noise_secrets(&self, ns: &str, count: usize) -> Duration {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        let t = Instant::now();
        futures::stream::iter(0..count)
            .map(|i| {
                let api = api.clone();
                async move {
                    let s: Secret = serde_json::from_value(json!({
                        "metadata": {"name": format!("unrelated-{i:06}"), "labels": {"app": "something-else"}},
                        "stringData": {"password": format!("not-a-token-{i:06}-{}", "x".repeat(64))},
                    }))
                    .unwrap();
                    api.create(&PostParams::default(), &s).await.unwrap();
                }
            })
            .buffer_unordered(64)
            .collect::<Vec<()>>()
            .await;
        t.elapsed()
    }

    /// Revocation: annotate, then wait until the old token is refused and
    /// the Secret holds a new one. Sequential, one token at a time.
    async fn revocation(&mut self, ft: &FirstToken, samples: usize, warm: bool) {
        let ns = &ft.ns;
        let ats: Api<AgentToken> = Api::namespaced(self.client.clone(), ns);
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        let mut operator_done = Vec::new();
        let mut rejected = Vec::new();
        for i in 0..samples {
            let name = format!("agent-{:05}", i * 7 % 1000);
            let old = secret_token(&secrets.get(&name).await.unwrap()).unwrap();
            if warm {
                // A consumer used it a moment ago.
                assert!(review(&self.client, &old).await);
            }
            let patch = json!({"metadata": {"annotations": {"agenttoken.dev/revoke": format!("bench-{i}-{warm}")}}});
            let t0 = Instant::now();
            ats.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .unwrap();
            let (mut swapped, mut refused) = (None, None);
            let deadline = t0 + Duration::from_secs(60);
            while swapped.is_none() || refused.is_none() {
                assert!(
                    Instant::now() < deadline,
                    "revocation of {name} took > 60 s"
                );
                if swapped.is_none() {
                    let s = secrets.get(&name).await.unwrap();
                    let revoked = ats.get(&name).await.unwrap().status.is_some_and(|s| {
                        s.history
                            .iter()
                            .any(|h| h.revoked_at.is_some() && h.revision >= 1)
                    });
                    if secret_token(&s).is_some_and(|t| t != old) && revoked {
                        swapped = Some(t0.elapsed());
                    }
                }
                // Cold: the old token is not presented before the operator is
                // done, so the API server's authentication cache (10 s for a
                // success by default) holds nothing for it.
                if refused.is_none()
                    && (warm || swapped.is_some())
                    && !review(&self.client, &old).await
                {
                    refused = Some(t0.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            operator_done.push(swapped.unwrap().as_secs_f64());
            rejected.push(swapped.unwrap().max(refused.unwrap()).as_secs_f64());
        }
        let (a, b) = (sorted(operator_done), sorted(rejected));
        self.report.line(format!(
            "| serviceAccount | {} | {samples} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |",
            if warm {
                "warm (reviewed just before)"
            } else {
                "cold"
            },
            pct(&a, 50.0),
            pct(&a, 99.0),
            pct(&b, 50.0),
            pct(&b, 99.0),
            b.last().unwrap(),
        ));
    }

    /// API server latency on this machine: the floor under every token.
    /// Keeps the parallel write rate for the first-token tables.
    async fn floor(&mut self) {
        let ns = create_namespace(&self.client, "bench-floor").await;
        let cms: Api<ConfigMap> = Api::namespaced(self.client.clone(), &ns);
        let mk = |i: usize| -> ConfigMap {
            serde_json::from_value(
                json!({"metadata": {"name": format!("cm-{i:05}")}, "data": {"k": "v"}}),
            )
            .unwrap()
        };
        let mut writes = Vec::new();
        let mut reads = Vec::new();
        for i in 0..300 {
            let t = Instant::now();
            cms.create(&PostParams::default(), &mk(i)).await.unwrap();
            writes.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            cms.get(&format!("cm-{i:05}")).await.unwrap();
            reads.push(t.elapsed().as_secs_f64());
        }
        let t = Instant::now();
        let n = 3000;
        futures::stream::iter(300..300 + n)
            .map(|i| {
                let cms = cms.clone();
                let obj = mk(i);
                async move { cms.create(&PostParams::default(), &obj).await.unwrap() }
            })
            .buffer_unordered(CREATE_CONCURRENCY)
            .collect::<Vec<_>>()
            .await;
        let throughput = n as f64 / t.elapsed().as_secs_f64();
        let (w, r) = (sorted(writes), sorted(reads));
        self.report.line(format!(
            "| sequential write (create ConfigMap) | {:.2} ms | {:.2} ms |",
            pct(&w, 50.0) * 1e3,
            pct(&w, 99.0) * 1e3
        ));
        self.report.line(format!(
            "| sequential read (get ConfigMap) | {:.2} ms | {:.2} ms |",
            pct(&r, 50.0) * 1e3,
            pct(&r, 99.0) * 1e3
        ));
        self.report.line(format!(
            "| parallel writes, {CREATE_CONCURRENCY} in flight | {throughput:.0} /s | |"
        ));
        self.floor_writes = Some(throughput);
    }

    /// 10,000 (or fewer) tokens created over one minute with one lifetime:
    /// when are they due to rotate, and how fast does the issuer get asked?
    /// (The issuer's limit is set below the operator's mint rate so that it
    /// binds.)
    async fn spread(&mut self, n: usize, limit: u32) {
        let ns = create_namespace(&self.client, "bench-spread").await;
        let stand_in = MintStandIn::start(None).await;
        let spec = json!({
            "webhook": stand_in.webhook("{\"ttl\": {{ lifetimeSeconds }}}"),
            "policy": {"rateLimit": {"perSecond": limit, "burst": limit}},
        });
        apply_issuer(&self.client, &ns, spec).await;
        let operator = Operator::start(&self.kubeconfig, &ns).await;
        let seen = watch_ready(&self.client, &ns);
        let names: Vec<String> = (0..n).map(|i| format!("agent-{i:05}")).collect();
        let lifetime = "1h";
        let make = |name: &str| -> AgentToken {
            serde_json::from_value(json!({
                "apiVersion": "agenttoken.dev/v1alpha1", "kind": "AgentToken",
                "metadata": {"name": name},
                "spec": {"issuerRef": {"name": "issuer"}, "lifetime": lifetime},
            }))
            .unwrap()
        };
        let t0 = Instant::now();
        create_all(
            &self.client,
            &ns,
            &names,
            make,
            Some(Duration::from_secs(60)),
        )
        .await;
        let created = t0.elapsed();
        wait_for(&seen, n, Duration::from_secs(900)).await;
        // Planned rotation times, per second.
        let ats: Api<AgentToken> = Api::namespaced(self.client.clone(), &ns);
        let list = ats.list(&ListParams::default()).await.unwrap().items;
        let mut per_second: BTreeMap<i64, usize> = BTreeMap::new();
        for at in &list {
            let st = at.status.as_ref().unwrap();
            let next = st.next_rotation_at.as_ref().expect("nextRotationAt").0;
            *per_second.entry(next.as_second()).or_default() += 1;
        }
        let max_same_second = per_second.values().copied().max().unwrap_or(0);
        let first = *per_second.keys().next().unwrap();
        let last = *per_second.keys().last().unwrap();
        let (hwm, _) = operator.memory();
        drop(operator);
        let hits = stand_in.per_second();
        let peak = hits.values().copied().max().unwrap_or(0);
        self.report.line(format!(
            "{n} AgentTokens created over {:.0} s, lifetime {lifetime}, issuer rateLimit {limit}/s (burst {limit}). \
             Planned rotations spread over {} s ({} distinct seconds); at most {max_same_second} in one second. \
             Issuer requests: {} in all, peak {peak}/s against the limit of {limit}/s. Operator peak RSS {:.1} MiB.",
            created.as_secs_f64(),
            last - first + 1,
            per_second.len(),
            hits.values().sum::<usize>(),
            mib(hwm),
        ));
        self.report.line("");
        self.report
            .line("Planned rotation times (5-second buckets, one `#` per 10 tokens):");
        self.report.line("");
        self.report.line("```");
        let mut buckets: BTreeMap<i64, usize> = BTreeMap::new();
        for (s, c) in &per_second {
            *buckets.entry((s - first) / 5 * 5).or_default() += c;
        }
        for (b, c) in &buckets {
            self.report
                .line(format!("+{b:>4}s {c:>5} {}", "#".repeat(c.div_ceil(10))));
        }
        self.report.line("```");
        self.report.line("");
        self.report.line("Requests the issuer received per second (5-second buckets: the busiest second in each):");
        self.report.line("");
        self.report.line("```");
        let start = *hits.keys().next().unwrap_or(&0);
        let mut hb: BTreeMap<u64, usize> = BTreeMap::new();
        for (s, c) in &hits {
            let e = hb.entry((s - start) / 5 * 5).or_default();
            *e = (*e).max(*c);
        }
        for (b, c) in &hb {
            self.report
                .line(format!("+{b:>4}s {c:>4}/s {}", "#".repeat(c.div_ceil(5))));
        }
        self.report.line("```");
    }
}

impl Bench {
    /// Overload: `n` AgentTokens whose issuer grants 60 s tokens need n/40
    /// mints per second, more than the operator makes; once that backlog
    /// stands, `newcomers` new AgentTokens arrive in the same namespace and
    /// in another team's. Measures how long their first tokens take.
    async fn overload(&mut self, n: usize, newcomers: usize) {
        let flood = create_namespace(&self.client, "bench-flood").await;
        let team = create_namespace(&self.client, "bench-team").await;
        let stand_in = MintStandIn::start(None).await;
        for ns in [&flood, &team] {
            // The issuer grants a minute whatever is asked.
            let spec = json!({"webhook": stand_in.webhook("{\"ttl\": 60}")});
            apply_issuer(&self.client, ns, spec).await;
        }
        let operator = Operator::start(&self.kubeconfig, &format!("{flood},{team}")).await;
        let make = |name: &str| -> AgentToken {
            serde_json::from_value(json!({
                "apiVersion": "agenttoken.dev/v1alpha1", "kind": "AgentToken",
                "metadata": {"name": name},
                "spec": {"issuerRef": {"name": "issuer"}, "lifetime": "1h"},
            }))
            .unwrap()
        };
        let seen_flood = watch_ready(&self.client, &flood);
        let seen_team = watch_ready(&self.client, &team);
        let names: Vec<String> = (0..n).map(|i| format!("agent-{i:05}")).collect();
        let t0 = Instant::now();
        create_all(&self.client, &flood, &names, make, None).await;
        wait_for(&seen_flood, n, Duration::from_secs(3600)).await;
        let filled = t0.elapsed();
        // Let the rotation backlog build: every token is due after ~40 s.
        tokio::time::sleep(Duration::from_secs(60)).await;
        let hits_before = stand_in.mints();
        let t_busy = Instant::now();
        let late: Vec<String> = (0..newcomers).map(|i| format!("late-{i:05}")).collect();
        let (sent_flood, sent_team) = tokio::join!(
            create_all(&self.client, &flood, &late, make, None),
            create_all(&self.client, &team, &late, make, None),
        );
        let limit = Duration::from_secs(1800);
        let wait_late = |seen: Arc<Mutex<HashMap<String, Instant>>>| async move {
            let deadline = Instant::now() + limit;
            loop {
                let have = seen
                    .lock()
                    .unwrap()
                    .keys()
                    .filter(|k| k.starts_with("late-"))
                    .count();
                if have >= newcomers || Instant::now() > deadline {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        tokio::join!(wait_late(seen_flood.clone()), wait_late(seen_team.clone()));
        let busy = t_busy.elapsed().as_secs_f64();
        let mints = stand_in.mints() - hits_before;
        let (hwm, _) = operator.memory();
        drop(operator);
        let lat = |seen: &Arc<Mutex<HashMap<String, Instant>>>, sent: &HashMap<String, Instant>| {
            let seen = seen.lock().unwrap();
            sorted(
                late.iter()
                    .map(|m| match seen.get(m) {
                        Some(t) => t.duration_since(sent[m]).as_secs_f64(),
                        None => f64::INFINITY,
                    })
                    .collect(),
            )
        };
        let (lf, lt) = (lat(&seen_flood, &sent_flood), lat(&seen_team, &sent_team));
        let needed = n as f64 / 40.0;
        self.report.line(format!(
            "{n} AgentTokens whose issuer grants 60 s tokens (about {needed:.0} rotations/s needed) filled in {:.0} s; \
             then {newcomers} new AgentTokens in the same namespace and {newcomers} in another team's. \
             While they got their first tokens the operator made {:.1} mints/s in all. Operator peak RSS {:.1} MiB.",
            filled.as_secs_f64(),
            mints as f64 / busy.max(1e-3),
            mib(hwm),
        ));
        self.report.line("");
        self.report
            .line("| new AgentTokens | first token p50 s | p99 s | max s |");
        self.report.line("|---|---|---|---|");
        for (what, l) in [
            ("same namespace as the flood", &lf),
            ("another team's namespace", &lt),
        ] {
            self.report.line(format!(
                "| {newcomers}, {what} | {:.1} | {:.1} | {:.1} |",
                pct(l, 50.0),
                pct(l, 99.0),
                l.last().copied().unwrap_or(f64::NAN)
            ));
        }
    }
}

/// A minting stand-in for the webhook issuer: answers `{"token", "ttl"}`
/// with the `ttl` it was sent (at most `max_ttl` seconds when set, as an
/// issuer with a maximum lifetime would), counts requests per second and
/// remembers every token it issued.
struct MintStandIn {
    port: u16,
    hits: Arc<Mutex<BTreeMap<u64, usize>>>,
    issued: Arc<Mutex<std::collections::HashSet<String>>>,
    server: tokio::task::JoinHandle<()>,
}

impl MintStandIn {
    async fn start(max_ttl: Option<u64>) -> Self {
        use axum::routing::post;
        let hits: Arc<Mutex<BTreeMap<u64, usize>>> = Arc::default();
        let issued: Arc<Mutex<std::collections::HashSet<String>>> = Arc::default();
        let (h, iss) = (hits.clone(), issued.clone());
        let app = axum::Router::new().route(
            "/mint",
            post(move |axum::Json(body): axum::Json<Value>| {
                let (h, iss) = (h.clone(), iss.clone());
                async move {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_secs();
                    *h.lock().unwrap().entry(now).or_default() += 1;
                    let ttl = match (max_ttl, body["ttl"].as_u64()) {
                        (Some(max), Some(asked)) => json!(asked.min(max)),
                        _ => body["ttl"].clone(),
                    };
                    // Long enough that two never collide (26^12).
                    let token = format!("bench-{}{}", random(), random());
                    iss.lock().unwrap().insert(token.clone());
                    axum::Json(json!({"token": token, "ttl": ttl}))
                }
            })
            .head(|| async { axum::http::StatusCode::METHOD_NOT_ALLOWED }),
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let _ = axum::serve(l, app).await;
        });
        MintStandIn {
            port,
            hits,
            issued,
            server,
        }
    }

    /// A TokenIssuer's `spec.webhook` calling this stand-in with `body`.
    fn webhook(&self, body: &str) -> Value {
        json!({
            "url": format!("http://127.0.0.1:{}/mint", self.port),
            "body": body,
            "result": {"tokenPath": "$.token", "expiresInPath": "$.ttl"},
        })
    }

    fn per_second(&self) -> BTreeMap<u64, usize> {
        self.hits.lock().unwrap().clone()
    }

    /// Mint requests answered so far.
    fn mints(&self) -> usize {
        self.hits.lock().unwrap().values().sum()
    }
}

impl Drop for MintStandIn {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Bench {
    fn new(client: Client, kubeconfig: PathBuf, opts: Opts) -> Self {
        Bench {
            client,
            kubeconfig,
            report: Report::default(),
            opts,
            per_token: Vec::new(),
            cpu_rows: Vec::new(),
            floor_writes: None,
        }
    }
}

#[tokio::main]
async fn main() {
    let opts = Opts::parse();
    std::fs::create_dir_all(root().join("target/bench")).unwrap();
    let status = cluster_cmd(&["up"]).status().expect("e2e/cluster up");
    assert!(status.success(), "e2e/cluster up");
    let kubeconfig = PathBuf::from(
        String::from_utf8(
            cluster_cmd(&["kubeconfig", "admin"])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap()
        .trim(),
    );
    let out = cluster_cmd(&["kubectl", "apply", "--server-side", "-f"])
        .arg(root().join("crds/agenttoken.dev.yaml"))
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(out.success(), "install CRDs");
    cluster_cmd(&[
        "kubectl",
        "wait",
        "--for=condition=Established",
        "crd",
        "--all",
        "--timeout=60s",
    ])
    .stdout(Stdio::null())
    .status()
    .unwrap();
    let client = client_for(&kubeconfig).await;
    // Warm-up: the first AgentToken created on a new API server took ~2 s
    // (seen on every run that started with the one-token scenario), which
    // is the API server's, not the operator's. Create and delete one first.
    {
        let ns = create_namespace(&client, "bench-warmup").await;
        let api: Api<AgentToken> = Api::namespaced(client.clone(), &ns);
        let started = Instant::now();
        api.create(
            &PostParams::default(),
            &agent_token("warmup", Kind::Jwt, "1h"),
        )
        .await
        .expect("warm-up AgentToken");
        eprintln!("warm-up AgentToken created in {:?}", started.elapsed());
        let _ = api.delete("warmup", &Default::default()).await;
    }
    install_finalizer_policy(&client).await;
    let mut b = Bench::new(client, kubeconfig, opts);
    let big = if b.opts.quick { 1000 } else { 10_000 };
    let noise = if b.opts.quick { 5_000 } else { 50_000 };
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        .unwrap_or_default();
    b.report.line(format!(
        "Machine: {} CPUs ({cpu}), etcd without fsync, one local API server; operator built with the bench profile.",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    ));
    b.report.line("The chart's finalizer policy (`admission.finalizerPolicy`) is installed: AgentTokens get their finalizer as they are admitted, not from a patch by the operator.");
    b.report.line("");

    // The first-token tables compare their rate with the floor's writes.
    if b.opts.wants("floor") || b.opts.wants("first-token") || b.opts.wants("webhook") {
        b.report.line("### API server floor");
        b.report.line("");
        b.report.line("| operation | p50 | p99 |");
        b.report.line("|---|---|---|");
        b.floor().await;
        b.report.line("");
    }

    let mut sa_1000 = None;
    let mut idle = None;
    if b.opts.wants("first-token")
        || b.opts.wants("revocation")
        || b.opts.wants("memory")
        || b.opts.wants("rss")
    {
        b.report.line("### Time to first token");
        b.report.line("");
        b.first_token_header();
        let sizes: Vec<usize> = if b.opts.wants("first-token") {
            vec![1, 1000, big]
        } else if b.opts.wants("rss") {
            // Peak RSS at the big size alone (issue 18's memory target).
            vec![big]
        } else {
            vec![1000]
        };
        for kind in [Kind::ServiceAccount, Kind::Jwt] {
            for &n in &sizes {
                let ft = b.first_token(kind, n, 0).await;
                b.record(&ft);
                if kind == Kind::ServiceAccount && n == 1000 {
                    sa_1000 = Some(ft);
                } else if kind == Kind::Jwt && n == big && b.opts.wants("idle") {
                    // Idle is measured on this run's operator, right away
                    // (reported in its own section below).
                    idle = Some(b.idle(&ft).await);
                }
            }
        }
        if b.opts.wants("memory") || b.opts.wants("first-token") {
            let ft = b.first_token(Kind::Jwt, big, noise).await;
            b.record(&ft);
        }
        b.report.line("");
        b.requests_per_token();
    }

    if b.opts.wants("idle") {
        b.report.line("### Idle");
        b.report.line("");
        let idle = match idle {
            Some(idle) => idle,
            None => {
                let ft = b.first_token(Kind::Jwt, big, 0).await;
                b.idle(&ft).await
            }
        };
        b.idle_report(idle);
    }

    if b.opts.wants("killswitch") {
        // Its own 1,000 (or 200 with --quick): the switch revokes them all.
        let n = if b.opts.quick { 200 } else { 1000 };
        let ft = b.first_token(Kind::ServiceAccount, n, 0).await;
        b.report.line("### Kill switch");
        b.report.line("");
        b.report.line(format!("`spec.revokeIssuedBefore` set on the serviceAccount issuer of {n} AgentTokens (just minted, so every replacement also waits for the per-AgentToken mint floor, 10 s after its last mint). Seconds from the patch: (a) the old token revoked in the AgentToken's ledger, (b) the API server refusing it (a TokenReview per token, first asked once its ledger says revoked), (c) the AgentToken holding its replacement. p50 and the last of them; \"done\" counts how many got there."));
        b.report.line("");
        b.report.line("| issuer | AgentTokens | (a) done | (a) p50 s | (a) last s | (b) done | (b) p50 s | (b) last s: the last old token valid | (c) done | (c) p50 s | (c) last s |");
        b.report
            .line("|---|---|---|---|---|---|---|---|---|---|---|");
        b.killswitch(&ft).await;
        b.report.line("");
    }

    if b.opts.wants("revocation")
        && let Some(ft) = sa_1000.as_ref()
    {
        b.report.line("### Revocation");
        b.report.line("");
        b.report.line("From the `agenttoken.dev/revoke` annotation to (a) the new token in the Secret and the old one marked revoked in status, (b) that AND the API server refusing the old token in a TokenReview. 1,000 AgentTokens exist; one revocation at a time.");
        b.report.line("");
        b.report.line("| issuer | old token | samples | (a) p50 s | (a) p99 s | (b) p50 s | (b) p99 s | (b) max s |");
        b.report.line("|---|---|---|---|---|---|---|---|");
        let samples = if b.opts.quick { 50 } else { 200 };
        b.revocation(ft, samples, false).await;
        b.revocation(ft, samples / 10, true).await;
        b.report.line("");
    }
    drop(sa_1000);

    if b.opts.wants("overload") {
        b.report
            .line("### Overload: first tokens under a rotation backlog");
        b.report.line("");
        let (n, late) = if b.opts.quick {
            (2000, 200)
        } else {
            (big, 1000)
        };
        b.overload(n, late).await;
        b.report.line("");
    }

    if b.opts.wants("webhook") {
        b.report.line("### Webhook issuer: time to first token");
        b.report.line("");
        b.report.line("The webhook issuer is the minting stand-in inside the bench (it grants the lifetime asked and answers at once), no `rateLimit`: the same columns as above, for comparison with other operators doing the same work.");
        b.report.line("");
        b.first_token_header();
        let sizes: &[usize] = if b.opts.quick { &[1000] } else { &[1000, 5000] };
        for &n in sizes {
            let ft = b.first_token(Kind::Webhook, n, 0).await;
            b.record(&ft);
        }
        b.report.line("");
        b.requests_per_token();
    }

    if b.opts.wants("usage") {
        b.report.line("### Usage tracking");
        b.report.line("");
        let (n, seconds, samples) = if b.opts.quick {
            (200, 10, 10)
        } else {
            (1000, 20, 30)
        };
        b.usage(n, seconds, samples).await;
    }

    if b.opts.wants("rotation") {
        b.report.line("### Steady rotation");
        b.report.line("");
        let (n, window) = if b.opts.quick {
            (200, 240)
        } else {
            (1000, 480)
        };
        b.rotation(n, Duration::from_secs(window)).await;
        b.report.line("");
    }

    if b.opts.wants("spread") {
        b.report.line("### Rotation spread");
        b.report.line("");
        b.spread(big, 25).await;
        b.report.line("");
    }

    std::fs::write(root().join("target/bench/report.md"), &b.report.0).unwrap();
    eprintln!("report written to target/bench/report.md");
    if !b.opts.keep {
        let _ = cluster_cmd(&["down"]).status();
    }
    // Watches and stand-ins still running must not keep the process (one
    // run spun a CPU for 50 minutes after its report): the work is done.
    std::process::exit(0);
}

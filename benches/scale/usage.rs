//! The usage endpoint (issue 20): how many audit events a second it takes,
//! how long from a real use of a token to `status.usage`, and what tracking
//! costs in memory per token.

use std::time::{Duration, Instant};

use kube::api::{Api, ListParams};
use serde_json::json;

use agent_token_operator::crd::AgentToken;

use crate::steady::cpu_seconds;
use crate::{
    Bench, Kind, Operator, agent_token, cluster_cmd, create_all, create_namespace, mib,
    setup_issuer, wait_for, watch_ready,
};

/// Events per audit batch, as kube-apiserver sends at most by default.
const BATCH: usize = 400;
/// Concurrent senders (an API server sends one batch at a time; several
/// API servers, or a burst, send more).
const SENDERS: usize = 4;

impl Bench {
    pub async fn usage(&mut self, n: usize, seconds: u64, samples: usize) {
        let flags = String::from_utf8(cluster_cmd(&["usage"]).output().unwrap().stdout).unwrap();
        let w: Vec<String> = flags.split_whitespace().map(String::from).collect();
        assert_eq!(w.len(), 4, "e2e/cluster usage: {flags}");
        let (addr, cert, key, token_file) = (&w[0], &w[1], &w[2], &w[3]);
        let ca = std::path::Path::new(cert).with_file_name("ca.crt");
        let bearer = std::fs::read_to_string(token_file)
            .unwrap()
            .trim()
            .to_string();

        let ns = create_namespace(&self.client, "bench-usage").await;
        setup_issuer(&self.client, &ns, Kind::ServiceAccount, None).await;
        let extra = [
            "--usage-address".to_string(),
            addr.clone(),
            "--usage-tls-cert-file".into(),
            cert.clone(),
            "--usage-tls-key-file".into(),
            key.clone(),
            "--usage-token-file".into(),
            token_file.clone(),
        ];
        let operator = Operator::start_with(&self.kubeconfig, &ns, &extra).await;
        let seen = watch_ready(&self.client, &ns);
        let names: Vec<String> = (0..n).map(|i| format!("u{i:05}")).collect();
        create_all(
            &self.client,
            &ns,
            &names,
            |name| agent_token(name, Kind::ServiceAccount, "1h"),
            None,
        )
        .await;
        wait_for(&seen, n, Duration::from_secs(1800)).await;
        // Every token's JWT ID, as the ledger recorded it.
        let api: Api<AgentToken> = Api::namespaced(self.client.clone(), &ns);
        let ats = api.list(&ListParams::default()).await.unwrap().items;
        let jtis: Vec<String> = ats
            .iter()
            .filter_map(|a| {
                let st = a.status.as_ref()?;
                let e = st.history.iter().find(|e| e.revision == st.revision)?;
                Some(
                    e.credential_id
                        .as_deref()?
                        .strip_prefix("jti:")?
                        .to_string(),
                )
            })
            .collect();
        assert_eq!(jtis.len(), n, "a JWT ID per token");
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (_, rss_tracked) = operator.memory();

        // Throughput: synthetic batches, every token used from 8 addresses.
        let client = reqwest::Client::builder()
            .add_root_certificate(
                reqwest::Certificate::from_pem(&std::fs::read(&ca).unwrap()).unwrap(),
            )
            .build()
            .unwrap();
        let url = format!("https://{addr}/audit");
        let batch = |k: usize| -> String {
            let now = jiff::Timestamp::now().to_string();
            let items: Vec<serde_json::Value> = (0..BATCH)
                .map(|i| {
                    let j = &jtis[(k * BATCH + i) % jtis.len()];
                    json!({
                        "kind": "Event", "stage": "ResponseComplete", "userAgent": "bench/1.0",
                        "sourceIPs": [format!("10.1.0.{}", (k + i) % 8)],
                        "requestReceivedTimestamp": now,
                        "user": {"username": "system:serviceaccount:bench:agent",
                                 "extra": {"authentication.kubernetes.io/credential-id": [format!("JTI={j}")]}},
                    })
                })
                .collect();
            json!({"kind": "EventList", "apiVersion": "audit.k8s.io/v1", "items": items})
                .to_string()
        };
        let bodies: Vec<String> = (0..64).map(batch).collect();
        let pid = operator.pid();
        let cpu0 = cpu_seconds(pid).unwrap_or(0.0);
        let started = Instant::now();
        let until = started + Duration::from_secs(seconds);
        let mut tasks = Vec::new();
        for s in 0..SENDERS {
            let (client, url, bearer, bodies) =
                (client.clone(), url.clone(), bearer.clone(), bodies.clone());
            tasks.push(tokio::spawn(async move {
                let (mut ok, mut refused, mut k) = (0usize, 0usize, s);
                let mut latencies = Vec::new();
                while Instant::now() < until {
                    let t0 = Instant::now();
                    let r = client
                        .post(&url)
                        .bearer_auth(&bearer)
                        .body(bodies[k % bodies.len()].clone())
                        .send()
                        .await;
                    latencies.push(t0.elapsed().as_secs_f64() * 1000.0);
                    match r {
                        Ok(r) if r.status().is_success() => ok += BATCH,
                        _ => refused += BATCH,
                    }
                    k += SENDERS;
                }
                (ok, refused, latencies)
            }));
        }
        let (mut ok, mut refused, mut lat) = (0, 0, Vec::new());
        for t in tasks {
            let (o, r, l) = t.await.unwrap();
            ok += o;
            refused += r;
            lat.extend(l);
        }
        let wall = started.elapsed().as_secs_f64();
        let cpu = cpu_seconds(pid).unwrap_or(0.0) - cpu0;
        lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let p = |q: f64| lat[((q * (lat.len() - 1) as f64).round() as usize).min(lat.len() - 1)];
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (hwm, rss_used) = operator.memory();

        // Delay: real requests with real tokens through the API server's
        // audit webhook, until status.usage counts them.
        let secrets: Api<k8s_openapi::api::core::v1::Secret> =
            Api::namespaced(self.client.clone(), &ns);
        let (server, api_ca) = server_and_ca(&self.kubeconfig);
        let real = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&api_ca).unwrap())
            .build()
            .unwrap();
        let mut delays = Vec::new();
        for name in names
            .iter()
            .step_by((n / samples.max(1)).max(1))
            .take(samples)
        {
            let before = requests_of(&api, name).await;
            let s = secrets.get(name).await.unwrap();
            let token = String::from_utf8(s.data.unwrap()["token"].0.clone()).unwrap();
            let t0 = Instant::now();
            real.get(format!("{server}/api"))
                .bearer_auth(token.trim())
                .send()
                .await
                .unwrap();
            let deadline = t0 + Duration::from_secs(30);
            while requests_of(&api, name).await <= before {
                assert!(
                    Instant::now() < deadline,
                    "{name}: the use never reached status"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            delays.push(t0.elapsed().as_secs_f64());
        }
        delays.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let d = |q: f64| {
            delays[((q * (delays.len() - 1) as f64).round() as usize).min(delays.len() - 1)]
        };

        self.report.line(format!(
            "{n} serviceAccount AgentTokens tracked. Throughput: {SENDERS} senders posting batches of {BATCH} synthetic audit events (real JWT IDs, 8 source addresses each) for {wall:.0} s."
        ));
        self.report.line("");
        self.report.line("| what | value |");
        self.report.line("|---|---|");
        self.report.line(format!(
            "| audit events accepted per second | {:.0} ({} refused) |",
            ok as f64 / wall,
            refused
        ));
        self.report.line(format!(
            "| batch answer time p50 / p99 | {:.1} / {:.1} ms |",
            p(0.5),
            p(0.99)
        ));
        self.report.line(format!(
            "| operator CPU while receiving | {:.2} CPU-seconds per second ({:.1} µs per event) |",
            cpu / wall,
            cpu / ok.max(1) as f64 * 1e6
        ));
        self.report.line(format!(
            "| RSS with {n} tokens tracked, before any use / after every token was used | {:.1} / {:.1} MiB (peak {:.1}) |",
            mib(rss_tracked),
            mib(rss_used),
            mib(hwm)
        ));
        self.report.line(format!(
            "| RSS growth per token while receiving (upper bound: request buffers and allocator growth count too) | {:.1} KiB |",
            (rss_used as f64 - rss_tracked as f64).max(0.0) / n as f64
        ));
        self.report.line(format!(
            "| real use to status.usage ({} samples) p50 / p99 / max | {:.2} / {:.2} / {:.2} s |",
            delays.len(),
            d(0.5),
            d(0.99),
            d(1.0)
        ));
        self.report.line("");
        drop(operator);
    }
}

async fn requests_of(api: &Api<AgentToken>, name: &str) -> i64 {
    api.get(name)
        .await
        .ok()
        .and_then(|a| a.status?.usage)
        .map(|u| u.tokens.iter().map(|t| t.requests).sum())
        .unwrap_or(0)
}

/// The API server's URL and CA from the bench's admin kubeconfig.
fn server_and_ca(kubeconfig: &std::path::Path) -> (String, Vec<u8>) {
    let text = std::fs::read_to_string(kubeconfig).unwrap();
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(k))
            .unwrap()
            .trim()
            .to_string()
    };
    let server = field("server:");
    let ca = std::fs::read(field("certificate-authority:")).unwrap();
    (server, ca)
}

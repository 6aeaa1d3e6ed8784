//! The steady state: an idle operator with every token valid (`idle`) and
//! tokens rotating on their own (`rotation`), measured by what they cost
//! the API server: requests by verb and resource, and CPU.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use kube::api::{Api, ListParams};
use serde_json::json;

use agent_token_operator::crd::AgentToken;

use crate::{
    Bench, FirstToken, Kind, MintStandIn, Operator, agent_token, apply_issuer, cluster_dir,
    create_all, create_namespace, mib, requests_delta, scaled, total, wait_for, watch_ready,
};

/// Clock ticks per second of /proc's CPU times (`getconf CLK_TCK`).
fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// CPU seconds a process has used so far (user + system, from
/// /proc/<pid>/stat; its threads included, its children not).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count after its ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

/// The pid of one of the bench cluster's daemons (`kube-apiserver`,
/// `etcd`), from the pid file `e2e/cluster` keeps, checked against the
/// process's command line (it names the cluster's directory).
pub fn cluster_pid(name: &str) -> Option<u32> {
    let dir = cluster_dir();
    let pids = std::fs::read_to_string(dir.join("pids")).ok()?;
    let pid: u32 = pids.lines().find_map(|l| {
        let (n, pid) = l.split_once(' ')?;
        (n == name).then(|| pid.trim().parse().ok())?
    })?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmdline = String::from_utf8_lossy(&cmdline);
    (cmdline.contains(name) && cmdline.contains(&*dir.to_string_lossy())).then_some(pid)
}

/// CPU used by a set of processes over a window, as a percentage of one CPU.
pub struct CpuWindow {
    start: Instant,
    at_start: Vec<Option<f64>>,
    pids: Vec<Option<u32>>,
}

impl CpuWindow {
    pub fn start(pids: &[Option<u32>]) -> Self {
        CpuWindow {
            start: Instant::now(),
            at_start: pids.iter().map(|p| p.and_then(cpu_seconds)).collect(),
            pids: pids.to_vec(),
        }
    }

    /// Each process's CPU % since `start`, "-" for one not found.
    pub fn percent(&self) -> Vec<String> {
        let wall = self.start.elapsed().as_secs_f64();
        self.pids
            .iter()
            .zip(&self.at_start)
            .map(|(pid, a)| match (a, pid.and_then(cpu_seconds)) {
                (Some(a), Some(b)) => format!("{:.2}", (b - a) / wall * 100.0),
                _ => "-".into(),
            })
            .collect()
    }
}

impl Operator {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

fn sum(m: &BTreeMap<String, f64>, watch: bool) -> f64 {
    total(
        m.iter()
            .filter(|(k, _)| k.starts_with("watch ") == watch)
            .map(|(_, v)| v),
    )
}

/// What the `idle` scenario measured, printed in its own section.
pub struct Idle {
    row: String,
    requests: BTreeMap<String, f64>,
    /// Requests from the end of the first-token run to the window.
    settling: BTreeMap<String, f64>,
}

impl Bench {
    /// The operator of `ft` with every token valid (1h lifetimes, nothing
    /// due): waits until its non-watch request count has not moved for
    /// 15 s, then over the window counts its requests and its CPU.
    pub async fn idle(&mut self, ft: &FirstToken) -> Idle {
        let window = Duration::from_secs(if self.opts.quick { 30 } else { 60 });
        let op = &ft.operator;
        let t0 = Instant::now();
        let at_start = op.api_requests().await;
        let changed = op
            .quiet(Duration::from_secs(15), Duration::from_secs(600))
            .await
            .expect("the operator still making requests 10 minutes after the first tokens");
        let quiet_after = changed.duration_since(t0);
        let before = op.api_requests().await;
        let cpu = CpuWindow::start(&[Some(op.pid())]);
        tokio::time::sleep(window).await;
        let cpu = cpu.percent().remove(0);
        let after = op.api_requests().await;
        let requests = requests_delta(&before, &after);
        let settling = requests_delta(&at_start, &before);
        let watches = sum(&after, true) - sum(&before, true);
        let (_, rss) = op.memory();
        let row = format!(
            "| {} | {} | {:.0} | {} | {:.0} | {watches:.0} | {cpu} | {:.1} |",
            ft.kind.label(),
            ft.n,
            quiet_after.as_secs_f64(),
            window.as_secs(),
            sum(&requests, false),
            mib(rss),
        );
        Idle {
            row,
            requests,
            settling,
        }
    }

    /// Prints an `idle` result (with its header).
    pub fn idle_report(&mut self, idle: Idle) {
        self.report.line("Every AgentToken holds a valid token (1h lifetime), nothing is due. Quiet after: seconds from the end of the first-token run until the operator's last non-watch request before the window (the window starts 15 s after that request). Over the window: the operator's API requests (`agenttoken_kube_api_requests_total`, watches apart: a watch request is a watch (re)started) and its CPU (utime + stime from /proc/<pid>/stat over wall time; 100% = one CPU).");
        self.report.line("");
        self.report.line("| issuer | AgentTokens | quiet after s | window s | API requests (non-watch) | watch requests | operator CPU % | operator RSS MiB |");
        self.report.line("|---|---|---|---|---|---|---|---|");
        self.report.line(&idle.row);
        self.report.line("");
        if !idle.requests.is_empty() || !idle.settling.is_empty() {
            self.report.line("The operator's API requests (watches excluded) from the end of the first-token run (once its requests had stood still for 5 s and the bench had checked the tokens) until the window, and in the window:");
            self.report.line("");
            self.report.requests_table(&[
                ("before the window".into(), idle.settling),
                ("in the window".into(), idle.requests),
            ]);
            self.report.line("");
        }
    }

    /// Steady rotation: `n` AgentTokens on a webhook issuer that grants 3
    /// minutes (the lifetime they ask for, 5m, is the shortest an
    /// AgentToken may ask; the stand-in grants at most 180 s, as an issuer
    /// with a maximum lifetime does). Once all have their first token,
    /// counts over `window` the rotations, the operator's requests per
    /// rotation and the CPU of the operator, kube-apiserver and etcd.
    pub async fn rotation(&mut self, n: usize, window: Duration) {
        let granted = 180;
        let ns = create_namespace(&self.client, "bench-rotation").await;
        let stand_in = MintStandIn::start(Some(granted)).await;
        let spec = json!({"webhook": stand_in.webhook("{\"ttl\": {{ lifetimeSeconds }}}")});
        apply_issuer(&self.client, &ns, spec).await;
        let operator = Operator::start(&self.kubeconfig, &ns).await;
        let seen = watch_ready(&self.client, &ns);
        let names: Vec<String> = (0..n).map(|i| format!("agent-{i:05}")).collect();
        let t0 = Instant::now();
        create_all(
            &self.client,
            &ns,
            &names,
            |m| agent_token(m, Kind::Webhook, "5m"),
            None,
        )
        .await;
        wait_for(&seen, n, Duration::from_secs(900)).await;
        let filled = t0.elapsed();
        // The first tokens' own follow-up requests are not the rotations':
        // wait until they stop, but not past a minute (the first rotations
        // are due about 105 s after the first mints).
        let quiet = operator
            .quiet(Duration::from_secs(5), Duration::from_secs(60))
            .await
            .is_some();

        let ats: Api<AgentToken> = Api::namespaced(self.client.clone(), &ns);
        let revisions = || async {
            ats.list(&ListParams::default())
                .await
                .unwrap()
                .items
                .iter()
                .map(|a| a.status.as_ref().map_or(0, |s| s.revision))
                .sum::<i64>()
        };
        let rev_before = revisions().await;
        let mints_before = stand_in.mints();
        let before = operator.api_requests().await;
        let pids = [
            Some(operator.pid()),
            cluster_pid("kube-apiserver"),
            cluster_pid("etcd"),
        ];
        let cpu = CpuWindow::start(&pids);
        tokio::time::sleep(window).await;
        let cpu = cpu.percent();
        let after = operator.api_requests().await;
        let mints = stand_in.mints() - mints_before;
        let (hwm, _) = operator.memory();

        let list = ats.list(&ListParams::default()).await.unwrap().items;
        let now = Timestamp::now();
        let rev_delta = list
            .iter()
            .map(|a| a.status.as_ref().map_or(0, |s| s.revision))
            .sum::<i64>()
            - rev_before;
        let expired = list
            .iter()
            .filter(|a| {
                a.status
                    .as_ref()
                    .and_then(|s| s.expires_at.as_ref())
                    .is_none_or(|e| e.0 <= now)
            })
            .count();
        let failing = list
            .iter()
            .filter(|a| a.status.as_ref().is_some_and(|s| s.failed_attempts > 0))
            .count();
        drop(operator);
        let rotations = mints.max(1) as f64;
        let per_rotation = scaled(&requests_delta(&before, &after), rotations);
        let secs = window.as_secs_f64();
        self.report.line(format!(
            "{n} AgentTokens asking for `lifetime: 5m` from a webhook issuer that grants {granted} s \
             (first tokens for all in {:.0} s; {}). Over the next {:.0} s: {mints} mints by the issuer's count, \
             {rev_delta} by `status.revision` ({:.1} rotations/s, one per token every {:.0} s); \
             at the end {expired} AgentTokens held an expired token and {failing} had a failed mint pending. \
             Operator peak RSS {:.1} MiB.",
            filled.as_secs_f64(),
            if quiet {
                "the window started once the operator's requests had stood still for 5 s"
            } else {
                "the operator's requests for them had not stopped a minute later: the window started then"
            },
            secs,
            mints as f64 / secs,
            n as f64 * secs / rotations,
            mib(hwm),
        ));
        self.report.line("");
        self.report.line(
            "| operator CPU % | kube-apiserver CPU % | etcd CPU % | API requests per rotation | writes per rotation |",
        );
        self.report.line("|---|---|---|---|---|");
        self.report.line(format!(
            "| {} | {} | {} | {:.2} | {:.2} |",
            cpu[0],
            cpu[1],
            cpu[2],
            total(per_rotation.values()),
            crate::writes(&per_rotation),
        ));
        self.report.line("");
        self.report.line("API requests per rotation, by verb and resource (watches excluded; `create events` are the operator's Events):");
        self.report.line("");
        self.report
            .requests_table(&[(format!("webhook x{n}"), per_rotation)]);
    }
}

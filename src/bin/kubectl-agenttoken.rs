//! `kubectl agenttoken`: see, rotate, revoke and plan AgentTokens, read
//! their revocation ledger, and abandon a revocation on purpose.
//!
//! Install by putting `kubectl-agenttoken` on `PATH`; kubectl finds it as a
//! plugin. It never reads a token: everything it shows comes from status.

use std::collections::BTreeMap;
use std::io::Read;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};
use jiff::Timestamp;
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ApiResource, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config, ResourceExt};
use serde::Serialize;

use agent_token_operator::controller::consumers;
use agent_token_operator::controller::reconcile::{self, ResolvedIssuer};
use agent_token_operator::crd::{
    AgentToken, ClusterTokenIssuer, ConsumerStrategy, HistoryEntry, IssuerKind, RestartPolicy,
    RevocationState, TokenIssuer, TokenLife,
};
use agent_token_operator::rotation::{self, CronSchedule};

#[derive(Parser)]
#[command(
    name = "kubectl-agenttoken",
    about = "See, rotate, revoke and plan AgentTokens; read and settle their revocation ledger"
)]
struct Cli {
    /// Namespace (default: the kubeconfig context's, else "default").
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    /// Kubeconfig context to use.
    #[arg(long, global = true)]
    context: Option<String>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// A table of AgentTokens: expiry, next rotation, last rotation reason,
    /// consumers, revocations still open or stuck.
    Status {
        /// Only this AgentToken.
        name: Option<String>,
        /// Every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Rotate now; the old token stays valid for its grace period.
    Rotate { name: String },
    /// The token is compromised: rotate and revoke the old one at once.
    /// With --selector or -A, every AgentToken that matches; with
    /// --issuer NAME --all, the issuer's kill switch: every token the
    /// issuer minted so far (spec.revokeIssuedBefore).
    Revoke {
        /// One AgentToken.
        name: Option<String>,
        /// Every AgentToken with these labels (in the namespace, or in
        /// every namespace with -A).
        #[arg(short = 'l', long)]
        selector: Option<String>,
        /// Every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        /// Every AgentToken minting for this ServiceAccount (a glob; in
        /// the namespace, or in every namespace with -A): a compromised
        /// ServiceAccount.
        #[arg(long)]
        service_account: Option<String>,
        /// The issuer whose every token to revoke and replace (with --all).
        #[arg(long, requires = "all")]
        issuer: Option<String>,
        /// --issuer names a ClusterTokenIssuer (default: a TokenIssuer in
        /// the namespace).
        #[arg(long, requires = "issuer")]
        cluster: bool,
        /// Everything the issuer minted.
        #[arg(long, requires = "issuer")]
        all: bool,
    },
    /// A revocation drill: revoke the live token now (a new one replaces
    /// it) and measure how long until the issuer refuses the old one and
    /// every consumer holds the new one; prints the report when done.
    Drill {
        name: String,
        /// Start it and return (the report is in status.lastDrill).
        #[arg(long)]
        no_wait: bool,
        /// How long to wait for the report.
        #[arg(long, default_value = "15m", value_parser = humantime_secs)]
        timeout: Duration,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Suspend an issuer: it mints nothing (fail closed) until resumed; its
    /// AgentTokens keep what they hold until it expires and say why.
    Suspend {
        /// The issuer.
        #[arg(long)]
        issuer: String,
        /// It is a ClusterTokenIssuer.
        #[arg(long)]
        cluster: bool,
    },
    /// Resume a suspended issuer.
    Resume {
        #[arg(long)]
        issuer: String,
        #[arg(long)]
        cluster: bool,
    },
    /// The revocation ledger of one AgentToken: each revision's state,
    /// revocation attempts, next attempt and message, and a summary of the
    /// revocations still open (being retried) or stuck (needing a person).
    History {
        name: String,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Give up on revoking one revision, on purpose (say its issuer is gone
    /// for good): the ledger entry becomes Abandoned, with who (your user
    /// name) and why. This writes the AgentToken's status, which only
    /// platform admins may: a namespace admin cannot hide a revocation.
    Abandon {
        name: String,
        /// The revision whose revocation to give up.
        #[arg(long)]
        revision: i64,
        /// Why, for the record (the entry's message).
        #[arg(long)]
        reason: String,
    },
    /// What the operator would do for a manifest: effective scopes and
    /// lifetime after policy, next rotation, workloads that would restart.
    Plan {
        /// File with AgentToken manifests ("-" for standard input).
        #[arg(short, long)]
        filename: String,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusRow {
    namespace: String,
    name: String,
    ready: String,
    reason: String,
    revision: i64,
    expires_at: Option<String>,
    next_rotation_at: Option<String>,
    last_rotation_reason: Option<String>,
    consumers: Vec<String>,
    /// Revisions whose revocation is being retried.
    open_revocations: Vec<i64>,
    /// Revisions whose revocation needs a person.
    stuck_revocations: Vec<i64>,
    /// Where and when the current and previous tokens were used.
    usage: Vec<agent_token_operator::crd::TokenUsage>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PlanRow {
    namespace: String,
    name: String,
    issuer: String,
    allowed: bool,
    refusal: Option<String>,
    effective_scopes: Vec<String>,
    effective_lifetime: Option<String>,
    next_rotation_after_issue: Option<String>,
    restart: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let options = KubeConfigOptions {
        context: cli.context.clone(),
        ..Default::default()
    };
    let config = match Kubeconfig::read() {
        Ok(kc) => Config::from_custom_kubeconfig(kc, &options).await?,
        Err(_) => Config::infer().await?,
    };
    let default_ns = config.default_namespace.clone();
    let client = Client::try_from(config)?;
    let ns = cli.namespace.clone().unwrap_or(default_ns);
    match cli.command {
        Cmd::Status {
            name,
            all_namespaces,
            output,
        } => status(&client, &ns, name, all_namespaces, output).await,
        Cmd::Rotate { name } => trigger(&client, &ns, &name, "agenttoken.dev/rotate").await,
        Cmd::Revoke {
            name,
            selector,
            all_namespaces,
            service_account,
            issuer,
            cluster,
            all: _,
        } => {
            let many = selector.is_some() || all_namespaces || service_account.is_some();
            match (name, issuer) {
                (Some(name), None) if !many => {
                    trigger(&client, &ns, &name, "agenttoken.dev/revoke").await
                }
                (None, Some(issuer)) if !many => kill_switch(&client, &ns, &issuer, cluster).await,
                (None, None) if many => {
                    let filter = Many {
                        selector: selector.as_deref(),
                        service_account: service_account.as_deref(),
                        all_namespaces,
                    };
                    revoke_many(&client, &ns, &filter).await
                }
                _ => bail!(
                    "say what to revoke: NAME, --selector/--service-account/-A, or --issuer NAME --all (one of them)"
                ),
            }
        }
        Cmd::Drill {
            name,
            no_wait,
            timeout,
            output,
        } => drill(&client, &ns, &name, no_wait, timeout, output).await,
        Cmd::Suspend { issuer, cluster } => suspend(&client, &ns, &issuer, cluster, true).await,
        Cmd::Resume { issuer, cluster } => suspend(&client, &ns, &issuer, cluster, false).await,
        Cmd::Plan { filename, output } => plan(&client, &ns, &filename, output).await,
        Cmd::History { name, output } => history(&client, &ns, &name, output).await,
        Cmd::Abandon {
            name,
            revision,
            reason,
        } => abandon(&client, &ns, &name, revision, &reason).await,
    }
}

fn print<T: Serialize>(rows: &T, output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(rows)?),
        Output::Yaml => print!("{}", serde_saphyr::to_string(rows)?),
        Output::Table => unreachable!("tables are printed by their command"),
    }
    Ok(())
}

fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        println!("{}", s.join("   ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r.clone());
    }
}

/// "in 5m20s" / "3m ago" relative to now.
fn relative(at: Timestamp, now: Timestamp) -> String {
    let d = at.duration_since(now);
    let secs = d.as_secs();
    let abs = Duration::from_secs(secs.unsigned_abs());
    if secs >= 0 {
        format!("in {}", rotation::format_duration(abs))
    } else {
        format!("{} ago", rotation::format_duration(abs))
    }
}

async fn status(
    client: &Client,
    ns: &str,
    name: Option<String>,
    all: bool,
    output: Output,
) -> anyhow::Result<()> {
    let api: Api<AgentToken> = if all {
        Api::all(client.clone())
    } else {
        Api::namespaced(client.clone(), ns)
    };
    let mut items = match &name {
        Some(n) => vec![
            api.get(n)
                .await
                .with_context(|| format!("AgentToken {n:?} in namespace {ns:?}"))?,
        ],
        None => api.list(&ListParams::default()).await?.items,
    };
    items.sort_by_key(|a| (a.namespace(), a.name_any()));
    let rows: Vec<StatusRow> = items
        .iter()
        .map(|at| {
            let st = at.status.clone().unwrap_or_default();
            let ready = st.conditions.iter().find(|c| c.type_ == "Ready");
            let pending = |want: Pending| -> Vec<i64> {
                st.history
                    .iter()
                    .filter(|e| pending_revocation(e) == Some(want))
                    .map(|e| e.revision)
                    .collect()
            };
            StatusRow {
                namespace: at.namespace().unwrap_or_default(),
                name: at.name_any(),
                ready: ready.map_or("Unknown".into(), |c| c.status.clone()),
                reason: ready.map_or(String::new(), |c| c.reason.clone()),
                revision: st.revision,
                expires_at: st.expires_at.as_ref().map(|t| t.0.to_string()),
                next_rotation_at: st.next_rotation_at.as_ref().map(|t| t.0.to_string()),
                last_rotation_reason: st.last_rotation_reason.map(|r| format!("{r:?}")),
                consumers: st
                    .consumers
                    .iter()
                    .map(|c| format!("{}/{} r{} {:?}", c.kind, c.name, c.revision, c.phase))
                    .collect(),
                open_revocations: pending(Pending::Open),
                stuck_revocations: pending(Pending::Stuck),
                usage: st.usage.clone().map(|u| u.tokens).unwrap_or_default(),
            }
        })
        .collect();
    if output != Output::Table {
        return print(&rows, output);
    }
    if rows.is_empty() {
        eprintln!("No AgentTokens found.");
        return Ok(());
    }
    let now = Timestamp::now();
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let when = |t: &Option<String>| {
                t.as_deref()
                    .and_then(|s| s.parse::<Timestamp>().ok())
                    .map_or("-".into(), |t| relative(t, now))
            };
            vec![
                r.namespace.clone(),
                r.name.clone(),
                if r.reason.is_empty() {
                    r.ready.clone()
                } else {
                    format!("{} ({})", r.ready, r.reason)
                },
                r.revision.to_string(),
                when(&r.expires_at),
                when(&r.next_rotation_at),
                r.last_rotation_reason.clone().unwrap_or("-".into()),
                if r.consumers.is_empty() {
                    "-".into()
                } else {
                    r.consumers.join(", ")
                },
                match (r.open_revocations.len(), r.stuck_revocations.len()) {
                    (0, 0) => "-".into(),
                    (open, 0) => format!("{open} open"),
                    (0, stuck) => format!("{stuck} stuck"),
                    (open, stuck) => format!("{open} open, {stuck} stuck"),
                },
                // The current token's use: when last, how often, from
                // where; and any revoked token still being tried.
                {
                    let current = match r.usage.iter().find(|u| u.revision == r.revision) {
                        Some(u) => format!(
                            "{}, {} req, from {}",
                            u.last_used
                                .as_ref()
                                .map_or("-".into(), |t| relative(t.0, now)),
                            u.requests,
                            u.sources.join(" ")
                        ),
                        None => "-".into(),
                    };
                    let revoked: Vec<String> = r
                        .usage
                        .iter()
                        .filter(|u| u.requests_after_revocation > 0)
                        .map(|u| {
                            format!(
                                "r{} used {}x after revocation",
                                u.revision, u.requests_after_revocation
                            )
                        })
                        .collect();
                    if revoked.is_empty() {
                        current
                    } else {
                        format!("{current}; {}", revoked.join(", "))
                    }
                },
            ]
        })
        .collect();
    table(
        &[
            "NAMESPACE",
            "NAME",
            "READY",
            "REVISION",
            "EXPIRES",
            "NEXT ROTATION",
            "LAST REASON",
            "CONSUMERS",
            "REVOCATIONS",
            "LAST USED",
        ],
        &cells,
    );
    Ok(())
}

async fn trigger(client: &Client, ns: &str, name: &str, annotation: &str) -> anyhow::Result<()> {
    let api: Api<AgentToken> = Api::namespaced(client.clone(), ns);
    let value = Timestamp::now().as_second().to_string();
    let patch = serde_json::json!({"metadata": {"annotations": {annotation: value}}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("AgentToken {name:?} in namespace {ns:?}"))?;
    let verb = if annotation.ends_with("revoke") {
        "revocation (new token now, old one revoked at once)"
    } else {
        "rotation (old token kept for its grace period)"
    };
    println!("agenttoken/{name} annotated {annotation}={value}: {verb} requested");
    Ok(())
}

fn humantime_secs(s: &str) -> Result<Duration, String> {
    agent_token_operator::duration::parse(s).map_err(|e| e.to_string())
}

/// Starts a drill and, unless told not to, waits for its report.
async fn drill(
    client: &Client,
    ns: &str,
    name: &str,
    no_wait: bool,
    timeout: Duration,
    output: Output,
) -> anyhow::Result<()> {
    let api: Api<AgentToken> = Api::namespaced(client.clone(), ns);
    let id = format!("drill-{}", Timestamp::now().as_second());
    let patch = serde_json::json!({"metadata": {"annotations": {"agenttoken.dev/drill": id}}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("AgentToken {name:?} in namespace {ns:?}"))?;
    if output == Output::Table {
        println!(
            "agenttoken/{name}: drill {id} started (the live token is revoked now and replaced)"
        );
    }
    if no_wait {
        return Ok(());
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let report = loop {
        let last = api
            .get(name)
            .await
            .ok()
            .and_then(|a| a.status)
            .and_then(|s| s.last_drill)
            .filter(|d| d.id == id);
        if let Some(d) =
            last.filter(|d| d.result != agent_token_operator::crd::DrillResult::Running)
        {
            break d;
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("drill {id}: no result within {timeout:?} (see status.lastDrill)");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Yaml => print!("{}", serde_saphyr::to_string(&report)?),
        Output::Table => {
            let secs = |ms: Option<i64>| {
                ms.map_or("-".to_string(), |m| format!("{:.1}s", m as f64 / 1000.0))
            };
            println!(
                "drill {} on revision {}: {:?}",
                report.id, report.revision, report.result
            );
            println!("  revoked by the operator   {}", secs(report.revoked_ms));
            println!(
                "  refused by the issuer     {}   ({})",
                secs(report.refused_ms),
                report.refused_by.clone().unwrap_or_default()
            );
            println!(
                "  consumers on the new one  {}",
                secs(report.consumers_ready_ms)
            );
            println!(
                "  old token tried after    {}",
                if report.used_after_revocation {
                    "yes"
                } else {
                    "no (or not tracked)"
                }
            );
            println!(
                "  target                    {}",
                secs(Some(report.target_ms))
            );
            if let Some(m) = &report.message {
                println!("  {m}");
            }
        }
    }
    if report.result == agent_token_operator::crd::DrillResult::Failed {
        std::process::exit(2);
    }
    Ok(())
}

/// The issuer's object, as a dynamic API (TokenIssuer in `ns`, or the
/// ClusterTokenIssuer).
fn issuer_api(client: &Client, ns: &str, cluster: bool) -> (Api<DynamicObject>, String) {
    let (kind, plural) = if cluster {
        ("ClusterTokenIssuer", "clustertokenissuers")
    } else {
        ("TokenIssuer", "tokenissuers")
    };
    let ar = ApiResource {
        group: "agenttoken.dev".into(),
        version: "v1alpha1".into(),
        api_version: "agenttoken.dev/v1alpha1".into(),
        kind: kind.into(),
        plural: plural.into(),
    };
    let api = if cluster {
        Api::all_with(client.clone(), &ar)
    } else {
        Api::namespaced_with(client.clone(), ns, &ar)
    };
    (api, kind.to_string())
}

/// The kill switch: `spec.revokeIssuedBefore` set to the next whole second
/// (the ledger keeps whole seconds: a token issued in this second is
/// covered too, and one minted after it is at most replaced once more).
async fn kill_switch(client: &Client, ns: &str, issuer: &str, cluster: bool) -> anyhow::Result<()> {
    let (api, kind) = issuer_api(client, ns, cluster);
    let before = Timestamp::from_second(Timestamp::now().as_second() + 1)?;
    let patch = serde_json::json!({"spec": {"revokeIssuedBefore": before.to_string()}});
    api.patch(issuer, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("{kind} {issuer:?}"))?;
    println!(
        "{kind}/{issuer}: kill switch set (spec.revokeIssuedBefore={before}): every token it minted before then is revoked at once and replaced"
    );
    Ok(())
}

async fn suspend(
    client: &Client,
    ns: &str,
    issuer: &str,
    cluster: bool,
    on: bool,
) -> anyhow::Result<()> {
    let (api, kind) = issuer_api(client, ns, cluster);
    let patch = serde_json::json!({"spec": {"suspend": if on { serde_json::Value::Bool(true) } else { serde_json::Value::Null }}});
    api.patch(issuer, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("{kind} {issuer:?}"))?;
    if on {
        println!("{kind}/{issuer} suspended: it mints nothing until resumed");
    } else {
        println!("{kind}/{issuer} resumed");
    }
    Ok(())
}

/// Which AgentTokens `revoke` without a name touches.
struct Many<'a> {
    selector: Option<&'a str>,
    service_account: Option<&'a str>,
    all_namespaces: bool,
}

impl Many<'_> {
    /// The command as the user gave it, for the issuers' Events.
    fn describe(&self, ns: &str) -> String {
        let mut parts = Vec::new();
        if let Some(s) = self.selector {
            parts.push(format!("-l {s}"));
        }
        if let Some(sa) = self.service_account {
            parts.push(format!("--service-account {sa}"));
        }
        parts.push(if self.all_namespaces {
            "-A".to_string()
        } else {
            format!("-n {ns}")
        });
        parts.join(" ")
    }
}

/// The revoke annotation on every AgentToken that matches.
async fn revoke_many(client: &Client, ns: &str, filter: &Many<'_>) -> anyhow::Result<()> {
    let api: Api<AgentToken> = if filter.all_namespaces {
        Api::all(client.clone())
    } else {
        Api::namespaced(client.clone(), ns)
    };
    let mut params = ListParams::default();
    if let Some(s) = filter.selector {
        params = params.labels(s);
    }
    let mut found = api.list(&params).await.context("listing AgentTokens")?;
    if let Some(glob) = filter.service_account {
        found.items.retain(|at| {
            at.spec
                .service_account_name
                .as_deref()
                .is_some_and(|sa| agent_token_operator::policy::glob_match(glob, sa))
        });
    }
    let value = Timestamp::now().as_second().to_string();
    let patch = serde_json::json!({"metadata": {"annotations": {"agenttoken.dev/revoke": value}}});
    let (mut done, mut failed) = (0, 0);
    for at in &found.items {
        let at_ns = at.namespace().unwrap_or_default();
        let name = at.name_any();
        let one: Api<AgentToken> = Api::namespaced(client.clone(), &at_ns);
        match one
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => done += 1,
            Err(e) => {
                failed += 1;
                eprintln!("{at_ns}/{name}: {e}");
            }
        }
    }
    println!(
        "revocation requested for {done} AgentToken(s) (agenttoken.dev/revoke={value}): new tokens now, old ones revoked at once"
    );
    // Each issuer whose AgentTokens this touched gets a KillSwitch Event,
    // as its own kill switch does.
    let mut touched: BTreeMap<(IssuerKind, String, String), usize> = BTreeMap::new();
    for at in &found.items {
        let r = &at.spec.issuer_ref;
        let issuer_ns = match r.kind {
            IssuerKind::TokenIssuer => at.namespace().unwrap_or_default(),
            IssuerKind::ClusterTokenIssuer => String::new(),
        };
        *touched
            .entry((r.kind, issuer_ns, r.name.clone()))
            .or_default() += 1;
    }
    let who = whoami(client).await.unwrap_or_else(|_| "someone".into());
    let asked = filter.describe(ns);
    for ((kind, issuer_ns, name), n) in touched {
        let note = format!(
            "{who} revoked the tokens of {n} AgentToken(s) on this issuer (kubectl agenttoken revoke {asked}); each AgentToken's ledger records its own"
        );
        if let Err(e) = issuer_event(client, kind, &issuer_ns, &name, &note).await {
            eprintln!("could not record a KillSwitch Event on {kind:?} {name}: {e:#}");
        }
    }
    if failed > 0 {
        bail!("{failed} AgentToken(s) could not be annotated");
    }
    Ok(())
}

/// A Warning Event `KillSwitch` on an issuer, from this plugin.
async fn issuer_event(
    client: &Client,
    kind: IssuerKind,
    ns: &str,
    name: &str,
    note: &str,
) -> anyhow::Result<()> {
    use kube::Resource;
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let reference = match kind {
        IssuerKind::TokenIssuer => Api::<TokenIssuer>::namespaced(client.clone(), ns)
            .get(name)
            .await?
            .object_ref(&()),
        IssuerKind::ClusterTokenIssuer => Api::<ClusterTokenIssuer>::all(client.clone())
            .get(name)
            .await?
            .object_ref(&()),
    };
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "kubectl-agenttoken".into(),
            instance: None,
        },
    );
    recorder
        .publish(
            &Event {
                type_: EventType::Warning,
                reason: "KillSwitch".into(),
                note: Some(note.chars().take(1000).collect()),
                action: "KillSwitch".into(),
                secondary: None,
            },
            &reference,
        )
        .await?;
    Ok(())
}

/// A revocation that is not over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pending {
    /// Under way: `Revoking`, or `Failed` with a next attempt.
    Open,
    /// Needs a person: `Failed` with no retry that can succeed, or
    /// `Unknown` (a token may exist that the operator cannot find).
    Stuck,
}

fn pending_revocation(e: &HistoryEntry) -> Option<Pending> {
    match e.state {
        Some(TokenLife::Revoking) => Some(Pending::Open),
        Some(TokenLife::Failed) if e.next_attempt_at.is_some() => Some(Pending::Open),
        Some(TokenLife::Failed | TokenLife::Unknown) => Some(Pending::Stuck),
        Some(_) => None,
        // Written before the ledger had states: a failure was not retried.
        None if e.revocation == RevocationState::Failed => Some(Pending::Stuck),
        None => None,
    }
}

/// An entry's state; for entries written before the ledger had states,
/// their revocation summary.
fn state_name(e: &HistoryEntry) -> String {
    match e.state {
        Some(s) => format!("{s:?}"),
        None => format!("{:?} (revocation)", e.revocation),
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LedgerView {
    namespace: String,
    name: String,
    /// The current revision.
    revision: i64,
    /// Newest first.
    entries: Vec<LedgerRow>,
    /// Revisions whose revocation is being retried.
    open: Vec<i64>,
    /// Revisions whose revocation needs a person.
    stuck: Vec<i64>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LedgerRow {
    revision: i64,
    state: String,
    fingerprint: String,
    issuer: Option<String>,
    issued_at: Option<String>,
    expires_at: Option<String>,
    attempts: i32,
    next_attempt_at: Option<String>,
    message: Option<String>,
    abandoned_by: Option<String>,
    revocation: String,
}

fn ledger_view(at: &AgentToken) -> LedgerView {
    let st = at.status.clone().unwrap_or_default();
    let mut history = st.history.clone();
    history.sort_by_key(|e| std::cmp::Reverse(e.revision));
    let which = |want: Pending| -> Vec<i64> {
        history
            .iter()
            .filter(|e| pending_revocation(e) == Some(want))
            .map(|e| e.revision)
            .collect()
    };
    LedgerView {
        namespace: at.namespace().unwrap_or_default(),
        name: at.name_any(),
        revision: st.revision,
        open: which(Pending::Open),
        stuck: which(Pending::Stuck),
        entries: history
            .iter()
            .map(|e| LedgerRow {
                revision: e.revision,
                state: state_name(e),
                fingerprint: e.fingerprint.clone(),
                issuer: e
                    .issuer
                    .as_ref()
                    .map(|i| format!("{:?}/{} ({})", i.kind, i.name, i.type_)),
                issued_at: e.issued_at.as_ref().map(|t| t.0.to_string()),
                expires_at: e.expires_at.as_ref().map(|t| t.0.to_string()),
                attempts: e.attempts,
                next_attempt_at: e.next_attempt_at.as_ref().map(|t| t.0.to_string()),
                message: e.message.clone(),
                abandoned_by: e.abandoned_by.clone(),
                revocation: format!("{:?}", e.revocation),
            })
            .collect(),
    }
}

/// "Revocations: 1 open (r2 Failed, next attempt in 4m); 1 stuck (r4 Unknown)."
fn revocation_summary(view: &LedgerView, now: Timestamp) -> String {
    let describe = |revisions: &[i64]| -> Vec<String> {
        revisions
            .iter()
            .filter_map(|r| view.entries.iter().find(|e| e.revision == *r))
            .map(|e| match &e.next_attempt_at {
                Some(t) => format!(
                    "r{} {}, next attempt {}",
                    e.revision,
                    e.state,
                    t.parse::<Timestamp>()
                        .map_or(t.clone(), |t| relative(t, now))
                ),
                None => format!("r{} {}", e.revision, e.state),
            })
            .collect()
    };
    let part = |n: usize, what: &str, list: Vec<String>| {
        if n == 0 {
            format!("none {what}")
        } else {
            format!("{n} {what} ({})", list.join("; "))
        }
    };
    format!(
        "Revocations: {}, {}.",
        part(view.open.len(), "open", describe(&view.open)),
        part(view.stuck.len(), "stuck", describe(&view.stuck)),
    )
}

/// At most `max` characters, marked when cut.
fn cut(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

async fn history(client: &Client, ns: &str, name: &str, output: Output) -> anyhow::Result<()> {
    let api: Api<AgentToken> = Api::namespaced(client.clone(), ns);
    let at = api
        .get(name)
        .await
        .with_context(|| format!("AgentToken {name:?} in namespace {ns:?}"))?;
    let view = ledger_view(&at);
    if output != Output::Table {
        return print(&view, output);
    }
    println!(
        "agenttoken/{} in {}: revision {}",
        view.name, view.namespace, view.revision
    );
    if view.entries.is_empty() {
        println!("No tokens in the ledger yet.");
        return Ok(());
    }
    let now = Timestamp::now();
    let when = |t: &Option<String>| {
        t.as_deref()
            .and_then(|s| s.parse::<Timestamp>().ok())
            .map_or("-".into(), |t| relative(t, now))
    };
    let cells: Vec<Vec<String>> = view
        .entries
        .iter()
        .map(|e| {
            let message = match (&e.message, &e.abandoned_by) {
                (Some(m), Some(by)) => format!("{} (abandoned by {by})", cut(m, 100)),
                (None, Some(by)) => format!("(abandoned by {by})"),
                (Some(m), None) => cut(m, 100),
                (None, None) => "-".into(),
            };
            vec![
                e.revision.to_string(),
                e.state.clone(),
                e.fingerprint.clone(),
                e.issuer.clone().unwrap_or("-".into()),
                when(&e.expires_at),
                e.attempts.to_string(),
                when(&e.next_attempt_at),
                message,
            ]
        })
        .collect();
    table(
        &[
            "REVISION",
            "STATE",
            "FINGERPRINT",
            "ISSUER",
            "EXPIRES",
            "ATTEMPTS",
            "NEXT ATTEMPT",
            "MESSAGE",
        ],
        &cells,
    );
    println!("{}", revocation_summary(&view, now));
    Ok(())
}

/// Field manager of the plugin's status writes.
const PLUGIN_MANAGER: &str = "kubectl-agenttoken";
/// Times `abandon` reads, writes and verifies before it gives up.
const ABANDON_ATTEMPTS: u32 = 5;
/// Longest `--reason` kept.
const MAX_REASON: usize = 1024;

/// What an entry was before it was abandoned.
#[derive(Debug, PartialEq)]
struct Abandoned {
    state: String,
    attempts: i64,
    expires_at: Option<String>,
}

/// Marks ledger entry `revision` in `status` (the AgentToken's status as
/// JSON, so fields this plugin does not know survive) `Abandoned` by
/// `user` for `reason`, and drops its next attempt. Refuses entries whose
/// revocation is over (Revoked, NotSupported, Expired, Abandoned) and those
/// that are not being revoked (Minting, Live, Grace).
fn abandon_entry(
    status: &mut serde_json::Value,
    revision: i64,
    user: &str,
    reason: &str,
) -> Result<Abandoned, String> {
    let entries = status
        .get_mut("history")
        .and_then(|h| h.as_array_mut())
        .filter(|h| !h.is_empty())
        .ok_or("its ledger (status.history) is empty")?;
    let known: Vec<i64> = entries
        .iter()
        .filter_map(|e| e.get("revision")?.as_i64())
        .collect();
    let entry = entries
        .iter_mut()
        .find(|e| e.get("revision").and_then(|r| r.as_i64()) == Some(revision))
        .ok_or_else(|| format!("its ledger has no revision {revision} (it has {known:?})"))?;
    let field = |k: &str| entry.get(k).and_then(|v| v.as_str()).map(String::from);
    let state = match field("state") {
        Some(s) => s,
        // Written before the ledger had states: the revocation summary.
        None => match field("revocation").as_deref() {
            Some("Revoked") => "Revoked".into(),
            Some("NotSupported") => "NotSupported".into(),
            Some("Failed") => "Failed".into(),
            _ => "Live".into(),
        },
    };
    match state.as_str() {
        "Revoked" | "NotSupported" | "Expired" | "Abandoned" => {
            return Err(format!(
                "revision {revision} is {state}: its revocation is over, there is nothing to abandon"
            ));
        }
        "Minting" | "Live" | "Grace" => {
            return Err(format!(
                "revision {revision} is {state}: it is not being revoked, so there is nothing to abandon (to replace a token now: kubectl agenttoken revoke)"
            ));
        }
        _ => {}
    }
    let before = Abandoned {
        attempts: entry.get("attempts").and_then(|a| a.as_i64()).unwrap_or(0),
        expires_at: field("expiresAt"),
        state,
    };
    let obj = entry
        .as_object_mut()
        .ok_or_else(|| format!("revision {revision}'s entry is not an object"))?;
    obj.insert("state".into(), "Abandoned".into());
    obj.insert("abandonedBy".into(), user.into());
    // The older summary: an abandoned revocation did not succeed.
    obj.insert("revocation".into(), "Failed".into());
    obj.insert("message".into(), reason.into());
    obj.remove("nextAttemptAt");
    Ok(before)
}

/// Whether `status` records `revision` as abandoned by `user` for `reason`.
fn abandon_stuck(status: &serde_json::Value, revision: i64, user: &str, reason: &str) -> bool {
    status
        .get("history")
        .and_then(|h| h.as_array())
        .into_iter()
        .flatten()
        .find(|e| e.get("revision").and_then(|r| r.as_i64()) == Some(revision))
        .is_some_and(|e| {
            e.get("state").and_then(|v| v.as_str()) == Some("Abandoned")
                && e.get("abandonedBy").and_then(|v| v.as_str()) == Some(user)
                && e.get("message").and_then(|v| v.as_str()) == Some(reason)
                && e.get("nextAttemptAt").is_none_or(|v| v.is_null())
        })
}

/// The caller's user name, as the API server sees it (`kubectl auth whoami`).
async fn whoami(client: &Client) -> anyhow::Result<String> {
    let review = Api::<SelfSubjectReview>::all(client.clone())
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .context("ask the API server who you are (SelfSubjectReview)")?;
    review
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username)
        .filter(|u| !u.is_empty())
        .context("the API server did not say who you are (SelfSubjectReview has no user name)")
}

async fn abandon(
    client: &Client,
    ns: &str,
    name: &str,
    revision: i64,
    reason: &str,
) -> anyhow::Result<()> {
    let reason = reason.trim();
    if reason.is_empty() {
        bail!("--reason must say why the revocation is given up");
    }
    if reason.chars().count() > MAX_REASON {
        bail!("--reason is longer than {MAX_REASON} characters");
    }
    let user = whoami(client).await?;
    let resource = ApiResource::erase::<AgentToken>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &resource);
    let what = format!("agenttoken/{name} in namespace {ns:?}");
    let mut last = String::new();
    for attempt in 1..=ABANDON_ATTEMPTS {
        if attempt > 1 {
            tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
        }
        let at = api.get(name).await.with_context(|| what.clone())?;
        let version = at
            .metadata
            .resource_version
            .clone()
            .context("the AgentToken has no resourceVersion")?;
        let mut status = at
            .data
            .get("status")
            .cloned()
            .unwrap_or(serde_json::json!({}));
        let before = abandon_entry(&mut status, revision, &user, reason)
            .map_err(|why| anyhow::anyhow!("{what}: {why}"))?;
        // A merge patch replaces the whole history list: the
        // resourceVersion makes it apply only to the ledger just read.
        let patch = serde_json::json!({
            "metadata": {"resourceVersion": version},
            "status": {"history": status["history"]},
        });
        let params = PatchParams {
            field_manager: Some(PLUGIN_MANAGER.into()),
            ..Default::default()
        };
        match api.patch_status(name, &params, &Patch::Merge(&patch)).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {
                last = "the AgentToken changed while it was being written".into();
                continue;
            }
            Err(kube::Error::Api(s)) if s.code == 403 => bail!(
                "{what}: forbidden: abandoning a revocation writes agenttokens/status, which only platform admins may (namespace admins cannot, so a revocation cannot be hidden by a tenant). The API server said: {}",
                s.message
            ),
            Err(e) => return Err(e).with_context(|| format!("{what}: write status")),
        }
        // Read back: did it stick, or did a concurrent status write undo it?
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = api.get(name).await.with_context(|| what.clone())?;
        let status = now.data.get("status").cloned().unwrap_or_default();
        if abandon_stuck(&status, revision, &user, reason) {
            let expiry = before
                .expires_at
                .map(|t| format!("; the token may stay valid until it expires at {t}"))
                .unwrap_or_default();
            println!(
                "{what}: revocation of revision {revision} abandoned by {user} (it was {}, after {} attempt(s)){expiry}",
                before.state, before.attempts
            );
            return Ok(());
        }
        last = "the entry was written back by someone else (the operator?) right after".into();
    }
    bail!("{what}: revision {revision} was not abandoned after {ABANDON_ATTEMPTS} attempts: {last}")
}

async fn plan(client: &Client, ns: &str, file: &str, output: Output) -> anyhow::Result<()> {
    let text = if file == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s)?;
        s
    } else {
        std::fs::read_to_string(file).with_context(|| format!("read {file}"))?
    };
    let mut rows = Vec::new();
    for doc in serde_saphyr::from_multiple::<serde_json::Value>(&text)
        .map_err(|e| anyhow::anyhow!("{file}: not YAML: {e}"))?
    {
        if doc.get("kind").and_then(|k| k.as_str()) != Some("AgentToken") {
            continue;
        }
        let at: AgentToken = serde_json::from_value(doc)
            .map_err(|e| anyhow::anyhow!("{file}: not a valid AgentToken: {e}"))?;
        let at_ns = at.namespace().unwrap_or_else(|| ns.to_string());
        rows.push(plan_one(client, &at_ns, &at).await?);
    }
    if rows.is_empty() {
        bail!("{file} holds no AgentToken");
    }
    if output != Output::Table {
        return print(&rows, output);
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.namespace.clone(),
                r.name.clone(),
                r.issuer.clone(),
                if r.allowed {
                    "yes".into()
                } else {
                    format!("no: {}", r.refusal.clone().unwrap_or_default())
                },
                if r.effective_scopes.is_empty() {
                    "-".into()
                } else {
                    r.effective_scopes.join(",")
                },
                r.effective_lifetime.clone().unwrap_or("-".into()),
                r.next_rotation_after_issue.clone().unwrap_or("-".into()),
                if r.restart.is_empty() {
                    "-".into()
                } else {
                    r.restart.join(", ")
                },
            ]
        })
        .collect();
    table(
        &[
            "NAMESPACE",
            "NAME",
            "ISSUER",
            "ALLOWED",
            "SCOPES",
            "LIFETIME",
            "ROTATES AFTER",
            "WOULD RESTART",
        ],
        &cells,
    );
    Ok(())
}

async fn plan_one(client: &Client, ns: &str, at: &AgentToken) -> anyhow::Result<PlanRow> {
    let name = at.name_any();
    let issuer_name = at.spec.issuer_ref.name.clone();
    let mut row = PlanRow {
        namespace: ns.to_string(),
        name: name.clone(),
        issuer: format!("{:?}/{issuer_name}", at.spec.issuer_ref.kind),
        allowed: false,
        refusal: None,
        effective_scopes: Vec::new(),
        effective_lifetime: None,
        next_rotation_after_issue: None,
        restart: Vec::new(),
    };
    let issuer = match at.spec.issuer_ref.kind {
        IssuerKind::TokenIssuer => Api::<TokenIssuer>::namespaced(client.clone(), ns)
            .get_opt(&issuer_name)
            .await?
            .map(|i| ResolvedIssuer {
                key: String::new(),
                spec: i.spec,
                cluster_scoped: false,
            }),
        IssuerKind::ClusterTokenIssuer => Api::<ClusterTokenIssuer>::all(client.clone())
            .get_opt(&issuer_name)
            .await?
            .map(|i| ResolvedIssuer {
                key: String::new(),
                spec: i.spec.0,
                cluster_scoped: true,
            }),
    };
    let Some(issuer) = issuer else {
        row.refusal = Some(format!("IssuerNotFound: {} does not exist", row.issuer));
        return Ok(row);
    };
    let ns_labels: BTreeMap<String, String> = if issuer.cluster_scoped {
        Api::<Namespace>::all(client.clone())
            .get_opt(ns)
            .await?
            .and_then(|n| n.metadata.labels)
            .unwrap_or_default()
    } else {
        BTreeMap::new()
    };
    let effective = match reconcile::validate(at, ns, &issuer, &ns_labels) {
        Ok(e) => e,
        Err(r) => {
            row.refusal = Some(format!("{}: {}", r.reason, r.message));
            return Ok(row);
        }
    };
    row.allowed = true;
    row.effective_scopes = effective.scopes.clone();
    let lifetime = effective.lifetime.unwrap_or(reconcile::DEFAULT_LIFETIME);
    row.effective_lifetime = Some(rotation::format_duration(lifetime));
    let cron = match at
        .spec
        .rotation
        .as_ref()
        .and_then(|r| r.schedule.as_deref())
    {
        Some(s) => Some(CronSchedule::parse(s).map_err(|e| anyhow::anyhow!("schedule: {e}"))?),
        None => None,
    };
    // If the issuer grants the full lifetime: rotation comes this long after issue.
    let now = Timestamp::now();
    let expires = now + jiff::SignedDuration::try_from(lifetime)?;
    let due = rotation::next_rotation(
        now,
        expires,
        reconcile::renew_window(at),
        &format!("{}/{name}", ns),
        cron.as_ref(),
    )
    .due_at;
    row.next_rotation_after_issue = Some(rotation::format_duration(Duration::try_from(
        due.duration_since(now),
    )?));
    let spec = at.spec.consumers.clone().unwrap_or_default();
    if spec.restart.unwrap_or_default() != RestartPolicy::None {
        let workloads = consumers::list(client, ns).await?;
        let verb = match spec.strategy.unwrap_or_default() {
            ConsumerStrategy::RolloutRestart => "",
            ConsumerStrategy::Signal => " (signal)",
        };
        row.restart = consumers::select(&workloads, &at.secret_name(), &spec)
            .into_iter()
            .map(|w| format!("{}{verb}", w.key))
            .collect();
    }
    Ok(row)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn status() -> serde_json::Value {
        json!({
            "revision": 5,
            "history": [
                {"revision": 5, "fingerprint": "sha256:5", "revocation": "Pending", "state": "Live"},
                {"revision": 4, "fingerprint": "sha256:4", "revocation": "Failed", "state": "Failed",
                 "attempts": 3, "nextAttemptAt": "2030-01-01T00:00:00Z", "message": "issuer unreachable",
                 "expiresAt": "2030-01-01T01:00:00Z", "futureField": {"kept": true}},
                {"revision": 3, "fingerprint": "sha256:3", "revocation": "Revoked", "state": "Revoked"},
                {"revision": 2, "fingerprint": "sha256:2", "revocation": "Failed"},
                {"revision": 1, "fingerprint": "sha256:1", "revocation": "Revoked"}
            ]
        })
    }

    #[test]
    fn abandoning_sets_state_who_and_why_and_drops_the_next_attempt() {
        let mut st = status();
        let before = abandon_entry(&mut st, 4, "alice", "issuer decommissioned").unwrap();
        assert_eq!(
            before,
            Abandoned {
                state: "Failed".into(),
                attempts: 3,
                expires_at: Some("2030-01-01T01:00:00Z".into()),
            }
        );
        let e = &st["history"][1];
        assert_eq!(e["state"], "Abandoned");
        assert_eq!(e["abandonedBy"], "alice");
        assert_eq!(e["message"], "issuer decommissioned");
        assert!(e.get("nextAttemptAt").is_none());
        // Everything else stays, fields this plugin does not know included.
        assert_eq!(e["attempts"], 3);
        assert_eq!(e["futureField"], json!({"kept": true}));
        let mut untouched = status();
        untouched["history"][1] = e.clone();
        assert_eq!(st, untouched, "no other entry changed");
        assert!(abandon_stuck(&st, 4, "alice", "issuer decommissioned"));
        assert!(!abandon_stuck(&st, 4, "bob", "issuer decommissioned"));
        assert!(!abandon_stuck(
            &status(),
            4,
            "alice",
            "issuer decommissioned"
        ));
    }

    #[test]
    fn over_or_unstarted_revocations_are_refused() {
        let refused = |rev| abandon_entry(&mut status(), rev, "alice", "why").unwrap_err();
        assert!(
            refused(3).contains("revision 3 is Revoked"),
            "{}",
            refused(3)
        );
        assert!(
            refused(1).contains("is Revoked"),
            "legacy entry: {}",
            refused(1)
        );
        assert!(refused(5).contains("is Live: it is not being revoked"));
        assert!(refused(9).contains("no revision 9 (it has [5, 4, 3, 2, 1])"));
        let mut again = status();
        abandon_entry(&mut again, 4, "alice", "why").unwrap();
        let twice = abandon_entry(&mut again, 4, "bob", "why").unwrap_err();
        assert!(twice.contains("revision 4 is Abandoned"), "{twice}");
        for state in ["NotSupported", "Expired", "Minting", "Grace"] {
            let mut st = status();
            st["history"][1]["state"] = state.into();
            assert!(abandon_entry(&mut st, 4, "a", "b").is_err(), "{state}");
        }
        for state in ["Revoking", "Failed", "Unknown"] {
            let mut st = status();
            st["history"][1]["state"] = state.into();
            assert!(abandon_entry(&mut st, 4, "a", "b").is_ok(), "{state}");
        }
        // A legacy Failed entry (no state) may be abandoned.
        assert!(abandon_entry(&mut status(), 2, "a", "b").is_ok());
        let err = abandon_entry(&mut json!({}), 1, "a", "b").unwrap_err();
        assert!(err.contains("empty"), "{err}");
    }

    #[test]
    fn the_ledger_view_tells_open_from_stuck_revocations() {
        let mut st = status();
        st["history"]
            .as_array_mut()
            .unwrap()
            .push(json!({"revision": 0, "fingerprint": "sha256:0", "revocation": "Pending", "state": "Unknown"}));
        st["history"]
            .as_array_mut()
            .unwrap()
            .push(json!({"revision": -1, "fingerprint": "sha256:x", "revocation": "Failed", "state": "Revoking"}));
        let at: AgentToken = serde_json::from_value(json!({
            "apiVersion": "agenttoken.dev/v1alpha1",
            "kind": "AgentToken",
            "metadata": {"name": "bot", "namespace": "team"},
            "spec": {"issuerRef": {"name": "sa"}},
            "status": st,
        }))
        .unwrap();
        let view = ledger_view(&at);
        assert_eq!(
            view.entries.iter().map(|e| e.revision).collect::<Vec<_>>(),
            [5, 4, 3, 2, 1, 0, -1],
            "newest first"
        );
        assert_eq!(view.open, [4, -1]);
        assert_eq!(view.stuck, [2, 0]);
        assert_eq!(view.entries[3].state, "Failed (revocation)");
        let now: Timestamp = "2029-12-31T23:56:00Z".parse().unwrap();
        assert_eq!(
            revocation_summary(&view, now),
            "Revocations: 2 open (r4 Failed, next attempt in 4m; r-1 Revoking), 2 stuck (r2 Failed (revocation); r0 Unknown)."
        );
        let mut done = at.clone();
        done.status
            .as_mut()
            .unwrap()
            .history
            .retain(|e| e.revision == 5);
        assert_eq!(
            revocation_summary(&ledger_view(&done), now),
            "Revocations: none open, none stuck."
        );
    }

    #[test]
    fn long_messages_are_cut_in_tables() {
        assert_eq!(cut("short", 10), "short");
        assert_eq!(cut("0123456789abc", 10), "012345678…");
    }
}

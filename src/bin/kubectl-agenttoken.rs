//! `kubectl agenttoken`: see, rotate, revoke and plan AgentTokens.
//!
//! Install by putting `kubectl-agenttoken` on `PATH`; kubectl finds it as a
//! plugin. It never reads a token: everything it shows comes from status.

use std::collections::BTreeMap;
use std::io::Read;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config, ResourceExt};
use serde::Serialize;

use agent_token_operator::controller::consumers;
use agent_token_operator::controller::reconcile::{self, ResolvedIssuer};
use agent_token_operator::crd::{
    AgentToken, ClusterTokenIssuer, ConsumerStrategy, IssuerKind, RestartPolicy, TokenIssuer,
};
use agent_token_operator::rotation::{self, CronSchedule};

#[derive(Parser)]
#[command(
    name = "kubectl-agenttoken",
    about = "See, rotate, revoke and plan AgentTokens"
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
    /// A table of AgentTokens: expiry, next rotation, last rotation reason, consumers.
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
    Revoke { name: String },
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
        Cmd::Revoke { name } => trigger(&client, &ns, &name, "agenttoken.dev/revoke").await,
        Cmd::Plan { filename, output } => plan(&client, &ns, &filename, output).await,
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

//! `agent-token-operator run | crd`: a thin shell around the library.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use tracing::{error, info, warn};

use agent_token_operator::controller::{self, Config, DEFAULT_CONCURRENCY};
use agent_token_operator::crd;
use agent_token_operator::http::{self, Readiness};
use agent_token_operator::issuer::web::{self, Egress};
use agent_token_operator::leadership::{Leadership, LeaseConfig};
use agent_token_operator::telemetry::{self, LogFormat, Metrics};

#[derive(Parser)]
#[command(
    name = "agent-token-operator",
    version,
    about = "Mints, rotates, revokes and delivers API tokens for agents"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller.
    Run(Box<RunArgs>),
    /// Print the CustomResourceDefinitions (what `crds/` holds).
    Crd,
    /// Print the field reference (Markdown) that docs/reference.md holds.
    Reference,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Json,
}

#[derive(Parser)]
struct RunArgs {
    /// Watch only these namespaces, comma-separated (default: all namespaces).
    /// The operator then needs no cluster-wide access to namespaced objects.
    #[arg(long, env = "WATCH_NAMESPACE", value_delimiter = ',')]
    namespace: Vec<String>,
    /// Elect a leader through a Lease so only one replica mints.
    #[arg(long, env = "LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Protected namespaces to serve anyway, comma-separated. kube-system,
    /// kube-public, kube-node-lease and the operator's own namespace are
    /// never served unless listed here or in --namespace.
    #[arg(long, env = "SERVE_PROTECTED_NAMESPACES", value_delimiter = ',')]
    serve_protected_namespaces: Vec<String>,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "agent-token-operator")]
    lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, env = "LEASE_NAME", default_value = "agent-token-operator")]
    lease_name: String,
    /// How long the leader's claim lasts after each renewal (whole
    /// seconds, 5s to 1h). It also bounds every issuer call: a call gets
    /// at most this minus a safety margin (a fifth, at least 2s), so a
    /// longer Lease allows slower issuers, and a crashed leader is
    /// replaced this much later.
    #[arg(long, env = "LEASE_DURATION", default_value = "60s", value_parser = parse_lease_duration)]
    lease_duration: std::time::Duration,
    /// This replica's identity (default: the host name and a random suffix).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "METRICS_ADDRESS", default_value = "0.0.0.0:8080")]
    metrics_address: SocketAddr,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text")]
    log_format: Format,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// AgentTokens reconciled at once.
    #[arg(long, env = "CONCURRENCY", default_value_t = DEFAULT_CONCURRENCY)]
    concurrency: u16,
    /// Restart requests for one workload within this window become one rollout.
    #[arg(long, env = "RESTART_COALESCE_WINDOW", default_value = "5s", value_parser = parse_duration)]
    restart_coalesce_window: std::time::Duration,
    /// Workloads rolling out at once because of token rotations, cluster-wide.
    #[arg(long, env = "MAX_CONCURRENT_RESTARTS", default_value_t = 10)]
    max_concurrent_restarts: usize,
    /// How long a consumer's rollout may take before it is reported as timed out.
    #[arg(long, env = "ROLLOUT_TIMEOUT", default_value = "10m", value_parser = parse_duration)]
    rollout_timeout: std::time::Duration,
    /// Let namespaced TokenIssuers call plain http:// URLs (default: https
    /// only). ClusterTokenIssuers may always.
    #[arg(
        long,
        env = "ISSUER_ALLOW_HTTP",
        default_value_t = false,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    issuer_allow_http: bool,
    /// Ranges, comma-separated (10.0.0.0/8,::1/128), that namespaced
    /// TokenIssuers may call even though they are loopback, link-local,
    /// unspecified or a cloud metadata address (refused by default).
    /// ClusterTokenIssuers may call anything.
    #[arg(long, env = "ISSUER_ALLOW_CIDR", value_delimiter = ',')]
    issuer_allow_cidr: Vec<String>,
    /// Serve usage reports (POST /audit: kube-apiserver's audit webhook)
    /// and jwt token introspection (RFC 7662) here over HTTPS. Off when
    /// unset; needs the TLS files and at least one of --usage-token-file
    /// and --usage-introspection-token-file.
    #[arg(long, env = "USAGE_ADDRESS")]
    usage_address: Option<SocketAddr>,
    /// The usage endpoint's certificate chain (PEM).
    #[arg(long, env = "USAGE_TLS_CERT_FILE", requires = "usage_address")]
    usage_tls_cert_file: Option<std::path::PathBuf>,
    /// The usage endpoint's private key (PEM).
    #[arg(long, env = "USAGE_TLS_KEY_FILE", requires = "usage_address")]
    usage_tls_key_file: Option<std::path::PathBuf>,
    /// Bearer tokens the usage endpoint accepts, one per line (the audit
    /// webhook's kubeconfig presents one).
    #[arg(long, env = "USAGE_TOKEN_FILE", requires = "usage_address")]
    usage_token_file: Option<std::path::PathBuf>,
    /// Bearer tokens the introspection endpoint accepts, one per line
    /// (resource servers present one): POST
    /// /introspect/clustertokenissuers/NAME and
    /// /introspect/tokenissuers/NAMESPACE/NAME.
    #[arg(
        long,
        env = "USAGE_INTROSPECTION_TOKEN_FILE",
        requires = "usage_address"
    )]
    usage_introspection_token_file: Option<std::path::PathBuf>,
    /// Take a Vault/OpenBao `socket` audit device's entries here (TCP).
    /// Needs --usage-vault-audit-prefix-file.
    #[arg(long, env = "USAGE_VAULT_AUDIT_ADDRESS")]
    usage_vault_audit_address: Option<SocketAddr>,
    /// The secret the device's `prefix` option puts before every entry
    /// (the file's first line); lines without it are refused.
    #[arg(
        long,
        env = "USAGE_VAULT_AUDIT_PREFIX_FILE",
        requires = "usage_vault_audit_address"
    )]
    usage_vault_audit_prefix_file: Option<std::path::PathBuf>,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    agent_token_operator::duration::parse(s)
        .map_err(|e| format!("{s:?} is not a duration like 30s, 5m or 1h: {e}"))
}

fn parse_lease_duration(s: &str) -> Result<std::time::Duration, String> {
    let d = parse_duration(s)?;
    if d < std::time::Duration::from_secs(5) || d > std::time::Duration::from_secs(3600) {
        return Err(format!("{s:?} is not between 5s and 1h"));
    }
    Ok(d)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Reference => {
            print!("{}", agent_token_operator::reference::markdown());
            Ok(())
        }
        Command::Crd => {
            print!("{}", crd::crds_yaml());
            Ok(())
        }
        Command::Run(args) => run(*args).await,
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let format = match args.log_format {
        Format::Text => LogFormat::Text,
        Format::Json => LogFormat::Json,
    };
    telemetry::init_logging(format, &args.log_level);
    // Empty entries (an empty ISSUER_ALLOW_CIDR, a trailing comma) allow nothing.
    let allowed: Vec<ipnet::IpNet> = args
        .issuer_allow_cidr
        .iter()
        .filter(|c| !c.trim().is_empty())
        .map(|c| web::parse_cidr(c))
        .collect::<Result<_, String>>()
        .map_err(anyhow::Error::msg)
        .context("--issuer-allow-cidr")?;
    let tenant_egress = Egress::tenant(args.issuer_allow_http, allowed);
    let metrics = Arc::new(Metrics::new());
    let client = {
        let config = kube::Config::infer()
            .await
            .context("find the Kubernetes API (in-cluster or KUBECONFIG)")?;
        let counted = metrics.clone();
        kube::client::ClientBuilder::try_from(config)
            .context("connect to the Kubernetes API")?
            .with_layer(&tower::util::MapRequestLayer::new(
                move |req: ::http::Request<kube::client::Body>| {
                    counted.kube_api_request(req.method(), req.uri());
                    req
                },
            ))
            .build()
    };
    let readiness = Readiness::default();
    let identity = args.identity.clone().unwrap_or_else(default_identity);

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let shutdown = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    tokio::spawn({
        let stop_tx = stop_tx.clone();
        async move {
            wait_for_signal().await;
            info!("shutdown requested");
            let _ = stop_tx.send(true);
        }
    });
    let server = tokio::spawn(http::serve(
        args.metrics_address,
        http::State {
            metrics: metrics.clone(),
            readiness: readiness.clone(),
        },
        shutdown(),
    ));

    // The usage Service selects the leader's Pod by a label: only the
    // leader listens, and a standby (or this Pod's container restarted
    // after losing the Lease) must not receive reports it would refuse.
    let serves_usage = args.usage_address.is_some() || args.usage_vault_audit_address.is_some();
    let own_pod = args
        .identity
        .clone()
        .filter(|_| serves_usage)
        .map(|pod| (args.lease_namespace.clone(), pod));
    if let Some((ns, pod)) = &own_pod {
        agent_token_operator::usage::label_leader(&client, ns, pod, false).await;
    }

    let mut election = None;
    let leadership = if args.leader_election {
        let (leadership, elector) = Leadership::elect(
            client.clone(),
            LeaseConfig {
                namespace: args.lease_namespace.clone(),
                name: args.lease_name.clone(),
                identity: identity.clone(),
                duration: args.lease_duration,
            },
        )
        .await
        .context("set up leader election")?;
        // The elector gives the Lease up only when told, after the
        // controllers stopped: nothing may act as leader after that.
        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        let elector = tokio::spawn(elector.run(async move {
            let _ = release_rx.await;
        }));
        info!(identity, lease = %args.lease_name, "waiting to become leader");
        // A standby is healthy and ready to take over: report ready, or a
        // Deployment rollout (maxUnavailable 0) would wait forever on it.
        readiness.set(true);
        tokio::select! {
            _ = leadership.elected() => {}
            _ = shutdown() => {
                let _ = release_tx.send(());
                let _ = elector.await;
                return Ok(());
            }
        }
        // Not ready again until this replica's caches have synced.
        readiness.set(false);
        info!(identity, "became leader");
        // Losing the Lease, or running out of term without a renewal,
        // stops the controllers: a replica that is not the leader must
        // never mint (and no mint outlives the term: Leadership::budget).
        let stop_tx = stop_tx.clone();
        let watcher = tokio::spawn({
            let leadership = leadership.clone();
            async move {
                leadership.lost().await;
                error!("lost leadership; stopping");
                let _ = stop_tx.send(true);
            }
        });
        election = Some((watcher, release_tx, elector));
        leadership
    } else {
        Leadership::unelected()
    };

    let usage = Arc::new(if serves_usage {
        agent_token_operator::usage::Tracker::default()
    } else {
        agent_token_operator::usage::Tracker::off()
    });
    let mut usage_tasks = Vec::new();
    if let Some(addr) = args.usage_address {
        let (Some(cert), Some(key)) = (&args.usage_tls_cert_file, &args.usage_tls_key_file) else {
            anyhow::bail!("--usage-address needs --usage-tls-cert-file and --usage-tls-key-file");
        };
        if args.usage_token_file.is_none() && args.usage_introspection_token_file.is_none() {
            anyhow::bail!(
                "--usage-address needs --usage-token-file (audit webhook), --usage-introspection-token-file (introspection), or both"
            );
        }
        let tls = agent_token_operator::usage::tls_config(cert, key).map_err(anyhow::Error::msg)?;
        let read = |file: &Option<std::path::PathBuf>| -> anyhow::Result<_> {
            file.as_deref()
                .map(|f| agent_token_operator::usage::read_tokens(f).map(Arc::new))
                .transpose()
                .map_err(anyhow::Error::msg)
        };
        let endpoint = agent_token_operator::usage::Endpoint {
            tracker: usage.clone(),
            metrics: metrics.clone(),
            tokens: read(&args.usage_token_file)?,
            introspection: read(&args.usage_introspection_token_file)?,
        };
        let stopped = shutdown();
        usage_tasks.push(tokio::spawn(async move {
            if let Err(e) = agent_token_operator::usage::serve(addr, tls, endpoint, stopped).await {
                error!(error = %e, %addr, "the usage endpoint stopped");
            }
        }));
    }
    if let Some(addr) = args.usage_vault_audit_address {
        let Some(file) = &args.usage_vault_audit_prefix_file else {
            anyhow::bail!("--usage-vault-audit-address needs --usage-vault-audit-prefix-file");
        };
        let prefix =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let prefix = prefix.lines().next().unwrap_or_default().trim().to_string();
        if prefix.len() < 16 {
            anyhow::bail!(
                "{}: the audit prefix is the shared secret: at least 16 characters",
                file.display()
            );
        }
        let (tracker, metrics, stopped) = (usage.clone(), metrics.clone(), shutdown());
        usage_tasks.push(tokio::spawn(async move {
            let served = agent_token_operator::usage::serve_vault_audit(
                addr,
                Arc::new(prefix.into_bytes()),
                tracker,
                metrics,
                stopped,
            )
            .await;
            if let Err(e) = served {
                error!(error = %e, %addr, "the Vault audit listener stopped");
            }
        }));
    }
    if let Some((ns, pod)) = &own_pod {
        agent_token_operator::usage::label_leader(&client, ns, pod, true).await;
    }
    if !usage_tasks.is_empty() {
        let is_leader = {
            let leadership = leadership.clone();
            move || leadership.is_leader()
        };
        usage_tasks.push(tokio::spawn(agent_token_operator::usage::flush_loop(
            client.clone(),
            usage.clone(),
            is_leader,
            shutdown(),
        )));
    }
    let config = Config {
        jwt_introspection: args.usage_address.is_some()
            && args.usage_introspection_token_file.is_some(),
        usage,
        namespaces: {
            let mut n: Vec<String> = args
                .namespace
                .iter()
                .map(|n| n.trim().to_string())
                .filter(|n| !n.is_empty())
                .collect();
            n.sort();
            n.dedup();
            n
        },
        concurrency: args.concurrency,
        instance: identity,
        operator_namespace: args.lease_namespace.clone(),
        protected_namespaces: controller::protected_namespaces(
            &args.lease_namespace,
            args.namespace
                .iter()
                .chain(&args.serve_protected_namespaces)
                .map(|n| n.trim()),
        ),
        tenant_egress,
        restarts: controller::restarts::RestartConfig {
            coalesce: args.restart_coalesce_window,
            max_in_flight: args.max_concurrent_restarts.max(1),
            rollout_timeout: args.rollout_timeout,
        },
        leadership,
    };
    controller::run(client, config, metrics, readiness, shutdown()).await;
    for task in usage_tasks {
        let _ = tokio::time::timeout(controller::SHUTDOWN_GRACE, task).await;
    }
    if let Some((watcher, release_tx, elector)) = election {
        // Every reconcile has ended: give the Lease up so the next replica
        // takes over without waiting for it to lapse.
        watcher.abort();
        let _ = release_tx.send(());
        let _ = tokio::time::timeout(controller::SHUTDOWN_GRACE, elector).await;
    }
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(error = %e, "metrics server stopped with an error"),
        Err(e) => warn!(error = %e, "metrics server task failed"),
    }
    info!("stopped");
    Ok(())
}

fn default_identity() -> String {
    let host =
        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "operator".into());
    format!("{}-{:08x}", host.trim(), rand::random::<u32>())
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

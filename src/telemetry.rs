//! Logs (text or JSON) and Prometheus metrics under `agenttoken_`.
//! Nothing here ever sees a token: labels are names, kinds and results.

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use jiff::Timestamp;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tracing_subscriber::EnvFilter;

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global logger. `filter` uses tracing's EnvFilter syntax.
pub fn init_logging(format: LogFormat, filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    namespace: String,
    name: String,
    issuer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RotationLabels {
    reason: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RevocationLabels {
    issuer_kind: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IssuerRequestLabels {
    issuer_kind: String,
    operation: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RestartLabels {
    kind: String,
    result: String,
}

/// The Kubernetes verb and resource (`secrets`, `serviceaccounts/token`,
/// `agenttokens/status`) of an API server request path.
pub fn classify_api_request(
    method: &http::Method,
    path: &str,
    query: Option<&str>,
) -> (String, String) {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let rest: &[&str] = match parts.first() {
        Some(&"api") if parts.len() >= 2 => &parts[2..],
        Some(&"apis") if parts.len() >= 3 => &parts[3..],
        _ => return (method.as_str().to_lowercase(), "other".into()),
    };
    let rest = match rest {
        ["namespaces", _, tail @ ..] if !tail.is_empty() => tail,
        _ => rest,
    };
    let resource = match rest {
        [] => "discovery".to_string(),
        [r] | [r, _] => r.to_string(),
        [r, _, sub, ..] => format!("{r}/{sub}"),
    };
    let named = rest.len() >= 2;
    let watch = query.is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
    let verb = match *method {
        http::Method::GET if watch => "watch",
        http::Method::GET if named => "get",
        http::Method::GET => "list",
        http::Method::POST => "create",
        http::Method::PUT => "update",
        http::Method::PATCH => "patch",
        http::Method::DELETE if named => "delete",
        http::Method::DELETE => "deletecollection",
        _ => "other",
    };
    (verb.into(), resource)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiRequestLabels {
    verb: String,
    resource: String,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// The operator's metrics and their registry.
pub struct Metrics {
    registry: Registry,
    token_expiry: Family<TokenLabels, Gauge<f64, AtomicU64>>,
    /// Label set of each token's expiry gauge, so it can be dropped on deletion.
    token_labels: Mutex<std::collections::HashMap<(String, String), String>>,
    rotations: Family<RotationLabels, Counter>,
    revocations: Family<RevocationLabels, Counter>,
    issuer_requests: Family<IssuerRequestLabels, Histogram, fn() -> Histogram>,
    reconcile: Histogram,
    reconcile_errors: Family<ErrorLabels, Counter>,
    policy_violations: Counter,
    consumer_restarts: Family<RestartLabels, Counter>,
    api_requests: Family<ApiRequestLabels, Counter>,
    usage_events: Family<UsageLabels, Counter>,
    unexpected_uses: Family<ActionLabels, Counter>,
    unused_tokens: Family<ActionLabels, Counter>,
    uses_after_revocation: Family<IssuerTypeLabels, Counter>,
    drills: Family<DrillLabels, Counter>,
    drill_phases: Family<PhaseLabels, Histogram, fn() -> Histogram>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DrillLabels {
    issuer_type: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    issuer_type: &'static str,
    phase: &'static str,
}

fn drill_histogram() -> Histogram {
    // 0.25 s to about 17 minutes.
    Histogram::new(exponential_buckets(0.25, 2.0, 13))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IssuerTypeLabels {
    issuer_type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UsageLabels {
    result: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("agenttoken");
        let token_expiry = Family::<TokenLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "token_expiry_timestamp_seconds",
            "Real expiry of the token currently in each AgentToken's Secret (Unix time)",
            token_expiry.clone(),
        );
        let rotations = Family::<RotationLabels, Counter>::default();
        registry.register(
            "rotations",
            "Token mints by rotation reason and result",
            rotations.clone(),
        );
        let revocations = Family::<RevocationLabels, Counter>::default();
        registry.register(
            "revocations",
            "Token revocations at the issuer by result",
            revocations.clone(),
        );
        let issuer_requests =
            Family::<IssuerRequestLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            );
        registry.register(
            "issuer_request_duration_seconds",
            "Duration of requests to issuers by kind, operation and result",
            issuer_requests.clone(),
        );
        let reconcile = latency_histogram();
        registry.register(
            "reconcile_duration_seconds",
            "Duration of AgentToken reconciles",
            reconcile.clone(),
        );
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Failed AgentToken reconciles by reason",
            reconcile_errors.clone(),
        );
        let policy_violations = Counter::default();
        registry.register(
            "policy_violations",
            "AgentTokens refused by an issuer policy",
            policy_violations.clone(),
        );
        let consumer_restarts = Family::<RestartLabels, Counter>::default();
        registry.register(
            "consumer_restarts",
            "Workloads restarted or signalled after a rotation, by kind and result",
            consumer_restarts.clone(),
        );
        let api_requests = Family::<ApiRequestLabels, Counter>::default();
        registry.register(
            "kube_api_requests",
            "Requests sent to the Kubernetes API server, by verb and resource",
            api_requests.clone(),
        );
        let usage_events = Family::<UsageLabels, Counter>::default();
        registry.register(
            "usage_events",
            "Audit records received by the usage endpoint: matched to an AgentToken's token, unmatched, invalid batches, unauthorized requests",
            usage_events.clone(),
        );
        let unexpected_uses = Family::<ActionLabels, Counter>::default();
        registry.register(
            "unexpected_uses",
            "Token uses from an address spec.usage does not expect, by what was done (report, revoke)",
            unexpected_uses.clone(),
        );
        let unused_tokens = Family::<ActionLabels, Counter>::default();
        registry.register(
            "unused_tokens",
            "Tokens found unused (no workload uses the Secret, no use for spec.usage.unusedAfter), by what was done (report, revoke)",
            unused_tokens.clone(),
        );
        let uses_after_revocation = Family::<IssuerTypeLabels, Counter>::default();
        registry.register(
            "uses_after_revocation",
            "Token revisions used after the operator revoked or withdrew them (a copy still being tried), by issuer type",
            uses_after_revocation.clone(),
        );
        let drills = Family::<DrillLabels, Counter>::default();
        registry.register(
            "drills",
            "Revocation drills by issuer type and result (Passed, Failed, Unverified)",
            drills.clone(),
        );
        let drill_phases =
            Family::<PhaseLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                drill_histogram,
            );
        registry.register(
            "drill_phase_seconds",
            "Revocation drills: seconds from the start until each phase (revoked, refused, consumers_ready)",
            drill_phases.clone(),
        );
        Metrics {
            drills,
            drill_phases,
            uses_after_revocation,
            unused_tokens,
            unexpected_uses,
            usage_events,
            registry,
            token_expiry,
            token_labels: Mutex::default(),
            rotations,
            revocations,
            issuer_requests,
            reconcile,
            reconcile_errors,
            policy_violations,
            consumer_restarts,
            api_requests,
        }
    }

    /// Counts one request to the Kubernetes API server.
    pub fn kube_api_request(&self, method: &http::Method, uri: &http::Uri) {
        let (verb, resource) = classify_api_request(method, uri.path(), uri.query());
        self.api_requests
            .get_or_create(&ApiRequestLabels { verb, resource })
            .inc();
    }

    pub fn observe_reconcile(&self, took: Duration, error: Option<&str>) {
        self.reconcile.observe(took.as_secs_f64());
        if let Some(reason) = error {
            self.reconcile_errors
                .get_or_create(&ErrorLabels {
                    reason: reason.into(),
                })
                .inc();
        }
    }

    /// Counts usage records by `result` (matched, unmatched, invalid,
    /// unauthorized).
    pub fn usage_events(&self, result: &'static str, n: u64) {
        if n > 0 {
            self.usage_events
                .get_or_create(&UsageLabels { result })
                .inc_by(n);
        }
    }

    /// Counts a token found unused.
    pub fn unused_token(&self, action: &'static str) {
        self.unused_tokens
            .get_or_create(&ActionLabels { action })
            .inc();
    }

    /// Counts a finished drill.
    pub fn drill(&self, issuer_type: &str, result: &'static str) {
        self.drills
            .get_or_create(&DrillLabels {
                issuer_type: known_type(issuer_type),
                result,
            })
            .inc();
    }

    /// Records a drill phase's time from the drill's start.
    pub fn drill_phase(&self, issuer_type: &str, phase: &'static str, took: Duration) {
        self.drill_phases
            .get_or_create(&PhaseLabels {
                issuer_type: known_type(issuer_type),
                phase,
            })
            .observe(took.as_secs_f64());
    }

    /// Counts a token revision used after its revocation (once each).
    pub fn use_after_revocation(&self, issuer_type: &str) {
        self.uses_after_revocation
            .get_or_create(&IssuerTypeLabels {
                issuer_type: known_type(issuer_type),
            })
            .inc();
    }

    /// Counts a use from an unexpected address.
    pub fn unexpected_use(&self, action: &'static str) {
        self.unexpected_uses
            .get_or_create(&ActionLabels { action })
            .inc();
    }

    pub fn policy_violation(&self) {
        self.policy_violations.inc();
    }

    pub fn observe_issuer_request(&self, kind: &str, operation: &str, ok: bool, took: Duration) {
        self.issuer_requests
            .get_or_create(&IssuerRequestLabels {
                issuer_kind: kind.into(),
                operation: operation.into(),
                result: result(ok).into(),
            })
            .observe(took.as_secs_f64());
    }

    pub fn rotation(&self, reason: &str, ok: bool) {
        self.rotations
            .get_or_create(&RotationLabels {
                reason: reason.into(),
                result: result(ok).into(),
            })
            .inc();
    }

    pub fn revocation(&self, kind: &str, outcome: &str) {
        self.revocations
            .get_or_create(&RevocationLabels {
                issuer_kind: kind.into(),
                result: outcome.into(),
            })
            .inc();
    }

    pub fn revocations_on_delete(&self, kind: &str, ok: usize, failed: usize) {
        let revoked = self.revocations.get_or_create(&RevocationLabels {
            issuer_kind: kind.into(),
            result: "Revoked".into(),
        });
        revoked.inc_by(ok as u64);
        if failed > 0 {
            self.revocations
                .get_or_create(&RevocationLabels {
                    issuer_kind: kind.into(),
                    result: "Failed".into(),
                })
                .inc_by(failed as u64);
        }
    }

    pub fn consumer_restart(&self, kind: &str, ok: bool) {
        self.consumer_restarts
            .get_or_create(&RestartLabels {
                kind: kind.into(),
                result: result(ok).into(),
            })
            .inc();
    }

    /// Records the real expiry of the token an AgentToken currently delivers.
    pub fn token_expiry(&self, namespace: &str, name: &str, issuer: &str, expires_at: Timestamp) {
        let labels = TokenLabels {
            namespace: namespace.into(),
            name: name.into(),
            issuer: issuer.into(),
        };
        let mut known = self.token_labels.lock().unwrap_or_else(|e| e.into_inner());
        // Only the issuer is kept per token (one series each, at 10,000
        // AgentTokens every copy counts): the old series, if it moved.
        if let Some(old) = known.insert((namespace.into(), name.into()), issuer.into())
            && old != issuer
        {
            self.token_expiry.remove(&TokenLabels {
                issuer: old,
                ..labels.clone()
            });
        }
        self.token_expiry
            .get_or_create(&labels)
            .set(expires_at.as_millisecond() as f64 / 1000.0);
    }

    /// Drops a deleted AgentToken's expiry series.
    pub fn forget_token(&self, namespace: &str, name: &str) {
        let mut known = self.token_labels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(issuer) = known.remove(&(namespace.to_string(), name.to_string())) {
            self.token_expiry.remove(&TokenLabels {
                namespace: namespace.into(),
                name: name.into(),
                issuer,
            });
        }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

fn result(ok: bool) -> &'static str {
    if ok { "success" } else { "failure" }
}

/// An issuer type as a bounded label value.
fn known_type(issuer_type: &str) -> &'static str {
    crate::crd::ISSUER_TYPES
        .iter()
        .find(|t| **t == issuer_type)
        .copied()
        .unwrap_or("other")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_requests_are_classified_by_verb_and_resource() {
        use http::Method;
        let c = |m: Method, p: &str, q: Option<&str>| {
            let (v, r) = classify_api_request(&m, p, q);
            format!("{v} {r}")
        };
        assert_eq!(
            c(Method::GET, "/api/v1/namespaces/a/secrets/s", None),
            "get secrets"
        );
        assert_eq!(
            c(
                Method::GET,
                "/api/v1/namespaces/a/secrets",
                Some("labelSelector=x")
            ),
            "list secrets"
        );
        assert_eq!(
            c(
                Method::GET,
                "/api/v1/namespaces/a/secrets",
                Some("watch=true&resourceVersion=1")
            ),
            "watch secrets"
        );
        assert_eq!(
            c(
                Method::POST,
                "/api/v1/namespaces/a/serviceaccounts/b/token",
                None
            ),
            "create serviceaccounts/token"
        );
        assert_eq!(
            c(
                Method::PATCH,
                "/apis/agenttoken.dev/v1alpha1/namespaces/a/agenttokens/t/status",
                None
            ),
            "patch agenttokens/status"
        );
        assert_eq!(
            c(
                Method::GET,
                "/apis/agenttoken.dev/v1alpha1/clustertokenissuers",
                None
            ),
            "list clustertokenissuers"
        );
        assert_eq!(
            c(Method::GET, "/api/v1/namespaces/a", None),
            "get namespaces"
        );
        assert_eq!(
            c(
                Method::POST,
                "/apis/authentication.k8s.io/v1/tokenreviews",
                None
            ),
            "create tokenreviews"
        );
        assert_eq!(c(Method::GET, "/version", None), "get other");
    }

    #[test]
    fn names_follow_the_contract() {
        let m = Metrics::new();
        m.token_expiry(
            "ns",
            "bot",
            "TokenIssuer/ns/k8s",
            "2026-01-01T00:00:00Z".parse().unwrap(),
        );
        m.rotation("Initial", true);
        m.revocation("serviceAccount", "Revoked");
        m.observe_issuer_request("serviceAccount", "mint", true, Duration::from_millis(3));
        m.observe_reconcile(Duration::from_millis(5), Some("kube"));
        let text = m.encode();
        for name in [
            "agenttoken_token_expiry_timestamp_seconds{namespace=\"ns\",name=\"bot\",issuer=\"TokenIssuer/ns/k8s\"} 1767225600",
            "agenttoken_rotations_total{reason=\"Initial\",result=\"success\"} 1",
            "agenttoken_revocations_total{issuer_kind=\"serviceAccount\",result=\"Revoked\"} 1",
            "agenttoken_issuer_request_duration_seconds_count{issuer_kind=\"serviceAccount\",operation=\"mint\",result=\"success\"} 1",
            "agenttoken_reconcile_errors_total{reason=\"kube\"} 1",
            "agenttoken_reconcile_duration_seconds_count 1",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
        // Moved to another issuer: one series, the new one.
        m.token_expiry(
            "ns",
            "bot",
            "ClusterTokenIssuer/other",
            "2026-01-01T00:00:00Z".parse().unwrap(),
        );
        let text = m.encode();
        assert!(
            text.contains("issuer=\"ClusterTokenIssuer/other\""),
            "{text}"
        );
        assert!(!text.contains("issuer=\"TokenIssuer/ns/k8s\""), "{text}");
        m.forget_token("ns", "bot");
        assert!(!m.encode().contains("name=\"bot\""));
    }
}

//! Whether a token's use came from where `spec.usage` expects (issue 20).
//!
//! The usage endpoint queues each new source address of a token revision
//! (at most 32 per revision); this loop checks them one at a time, off the
//! endpoint's path. Expected: an address in `spec.usage.expectedSources`,
//! or, when that is empty, the address of a Pod in the AgentToken's
//! namespace whose volumes or environment use its Secret (found with a
//! `status.podIP` field selector: no Pod watch, one LIST per new address).
//! Anything else is recorded in `status.usage` as unexpected, with a
//! Warning Event `UnexpectedSource`; the reconcile that the status change
//! brings sets the condition and, with `onUnexpectedSource: Revoke`,
//! revokes the token at once and mints a new one.
//!
//! It also reports a revision used after its revocation (the tracker queues
//! the first such use of each): a Warning Event `UsedAfterRevocation` and
//! its metric, when the ledger it reads agrees the token was withdrawn.

use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, PodSpec};
use kube::api::{Api, ListParams};
use kube::runtime::events::EventType;
use tracing::{info, warn};

use super::Context;
use super::reason::Reason;
use crate::crd::{AgentToken, TokenLife, UnexpectedSourceAction};
use crate::usage::{Check, Finding};

/// What a check found.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Expected,
    /// Not expected: why, for the Event.
    Unexpected(String),
}

/// Checks queued sources until `shutdown`; only the leader checks (a
/// standby's tracker has nothing queued).
pub async fn run(ctx: Arc<Context>, shutdown: impl std::future::Future<Output = ()>) {
    let mut shutdown = std::pin::pin!(shutdown);
    let mut recent = Recent::default();
    loop {
        while let Some(check) = ctx.usage.next_check() {
            handle(&ctx, &check, &mut recent).await;
        }
        tokio::select! {
            _ = &mut shutdown => return,
            _ = ctx.usage.checks_waiting() => {}
        }
    }
}

/// How long an address stays a consumer's after its Pod was last seen
/// with it: a Pod that used the token and was deleted before its use was
/// checked (a rollout replacing it, audit batches a second late) is not a
/// thief. Only while no Pod of the namespace has the address.
const RECENT_FOR: std::time::Duration = std::time::Duration::from_secs(60);
/// Addresses remembered at most.
const MAX_RECENT: usize = 16_384;

/// Consumer Pods' addresses seen lately, by namespace and Secret.
#[derive(Default)]
pub struct Recent(std::collections::HashMap<(String, String, IpAddr), tokio::time::Instant>);

impl Recent {
    fn saw(&mut self, ns: &str, secret: &str, addr: IpAddr) {
        let now = tokio::time::Instant::now();
        if self.0.len() >= MAX_RECENT {
            self.0.retain(|_, at| now.duration_since(*at) < RECENT_FOR);
        }
        if self.0.len() < MAX_RECENT {
            self.0.insert((ns.into(), secret.into(), addr), now);
        }
    }

    fn had(&self, ns: &str, secret: &str, addr: IpAddr) -> bool {
        self.0
            .get(&(ns.to_string(), secret.to_string(), addr))
            .is_some_and(|at| at.elapsed() < RECENT_FOR)
    }
}

async fn handle(ctx: &Context, check: &Check, recent: &mut Recent) {
    let api: Api<AgentToken> = Api::namespaced(ctx.client.clone(), &check.namespace);
    let at = match api.get_opt(&check.name).await {
        Ok(Some(at)) => at,
        Ok(None) => return,
        Err(e) => {
            warn!(namespace = %check.namespace, agenttoken = %check.name, error = %e, "could not read the AgentToken to look at a use; looked at on its next use");
            ctx.usage.unchecked(check);
            return;
        }
    };
    match &check.finding {
        Finding::Source(source) => unexpected_source(ctx, &at, check, source, recent).await,
        Finding::AfterRevocation { at: when, source } => {
            after_revocation(ctx, &at, check, *when, source.as_deref()).await
        }
    }
}

async fn unexpected_source(
    ctx: &Context,
    at: &AgentToken,
    check: &Check,
    source: &str,
    recent: &mut Recent,
) {
    let verdict = match verdict(ctx, at, source, recent).await {
        Ok(v) => v,
        Err(e) => {
            warn!(namespace = %check.namespace, agenttoken = %check.name, error = %e, "could not check a source; checked at its next use");
            ctx.usage.unchecked(check);
            return;
        }
    };
    let Verdict::Unexpected(why) = verdict else {
        return;
    };
    let action = at
        .spec
        .usage
        .as_ref()
        .map(|u| u.on_unexpected_source)
        .unwrap_or_default();
    info!(namespace = %check.namespace, agenttoken = %check.name, revision = check.revision, %source, ?action, "token used from an unexpected address");
    ctx.usage.unexpected(check);
    ctx.metrics.unexpected_use(match action {
        UnexpectedSourceAction::Report => "report",
        UnexpectedSourceAction::Revoke => "revoke",
    });
    let then = match action {
        UnexpectedSourceAction::Report => "reported (spec.usage.onUnexpectedSource: Report)",
        UnexpectedSourceAction::Revoke => {
            "it is revoked at once and a new token minted (spec.usage.onUnexpectedSource: Revoke)"
        }
    };
    ctx.publish(
        at,
        EventType::Warning,
        Reason::UnexpectedSource,
        format!(
            "revision {} was used from {source}, {why}: {then}",
            check.revision
        ),
    )
    .await;
}

/// A revision used after its revocation: a Warning Event and the metric,
/// once per revision, when the ledger (not only the tracker) says the
/// token was revoked or withdrawn.
async fn after_revocation(
    ctx: &Context,
    at: &AgentToken,
    check: &Check,
    when: jiff::Timestamp,
    source: Option<&str>,
) {
    let Some(entry) = at
        .status
        .as_ref()
        .and_then(|s| s.history.iter().find(|e| e.revision == check.revision))
    else {
        return;
    };
    let state = match entry.state {
        Some(TokenLife::Minting | TokenLife::Live | TokenLife::Grace) | None => return,
        Some(state) => state,
    };
    let issuer_type = entry
        .issuer
        .as_ref()
        .map(|i| i.type_.as_str())
        .unwrap_or("");
    info!(namespace = %check.namespace, agenttoken = %check.name, revision = check.revision, ?state, source, "token used after its revocation");
    ctx.metrics.use_after_revocation(issuer_type);
    let from = source.map(|s| format!(" from {s}")).unwrap_or_default();
    let revoked = entry
        .revoked_at
        .as_ref()
        .map(|r| format!(", revoked at {}", r.0))
        .unwrap_or_default();
    ctx.publish(
        at,
        EventType::Warning,
        Reason::UsedAfterRevocation,
        format!(
            "revision {} ({state:?}{revoked}) was used at {when}{from}: a copy of it is still being tried",
            check.revision
        ),
    )
    .await;
}

/// Whether `source` is where `at`'s token may be used from.
pub async fn verdict(
    ctx: &Context,
    at: &AgentToken,
    source: &str,
    recent: &mut Recent,
) -> Result<Verdict, kube::Error> {
    let Ok(addr) = source.parse::<IpAddr>() else {
        return Ok(Verdict::Unexpected("not an address".into()));
    };
    let listed = at
        .spec
        .usage
        .as_ref()
        .map(|u| u.expected_sources.as_slice())
        .unwrap_or_default();
    if !listed.is_empty() {
        return Ok(if in_ranges(listed, addr) {
            Verdict::Expected
        } else {
            Verdict::Unexpected("outside spec.usage.expectedSources".into())
        });
    }
    let ns = at.metadata.namespace.clone().unwrap_or_default();
    let secret = at.secret_name();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let found = pods
        .list(&ListParams::default().fields(&format!("status.podIP={addr}")))
        .await?;
    let consumer = found.items.iter().any(|p| {
        let done = p
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|ph| ph == "Succeeded" || ph == "Failed");
        !done && p.spec.as_ref().is_some_and(|s| uses_secret(s, &secret))
    });
    if consumer {
        recent.saw(&ns, &secret, addr);
    }
    Ok(
        if consumer || (found.items.is_empty() && recent.had(&ns, &secret, addr)) {
            Verdict::Expected
        } else {
            Verdict::Unexpected(format!(
                "which is not a Pod in namespace {ns} that uses Secret {secret}"
            ))
        },
    )
}

/// Whether `addr` is in one of `ranges` (CIDRs or single addresses; what
/// does not parse matches nothing).
pub fn in_ranges(ranges: &[String], addr: IpAddr) -> bool {
    ranges.iter().any(|r| {
        crate::issuer::web::parse_cidr(r)
            .map(|net| net.contains(&addr))
            .unwrap_or(false)
    })
}

/// Whether a Pod's volumes (plain or projected) or its containers'
/// environment use Secret `name`.
pub fn uses_secret(spec: &PodSpec, name: &str) -> bool {
    let mut used = std::collections::HashSet::new();
    super::others::secrets_of(spec, &mut used);
    used.contains(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_take_cidrs_and_single_addresses_and_ignore_garbage() {
        let r = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let a = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(in_ranges(&r(&["10.0.0.0/8"]), a("10.1.2.3")));
        assert!(in_ranges(&r(&["192.0.2.7"]), a("192.0.2.7")));
        assert!(!in_ranges(&r(&["192.0.2.7"]), a("192.0.2.8")));
        assert!(!in_ranges(
            &r(&["not-a-range", "10.0.0.0/33"]),
            a("10.1.2.3")
        ));
        assert!(in_ranges(&r(&["fd00::/8"]), a("fd00::1")));
    }

    #[test]
    fn a_pod_uses_a_secret_through_volumes_projections_and_environment() {
        let pod = |yaml: serde_json::Value| -> PodSpec { serde_json::from_value(yaml).unwrap() };
        let c = |extra: serde_json::Value| {
            let mut c = serde_json::json!({"name": "c", "image": "i"});
            c.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            c
        };
        let volume = pod(serde_json::json!({"containers": [c(serde_json::json!({}))],
            "volumes": [{"name": "t", "secret": {"secretName": "bot"}}]}));
        let projected = pod(serde_json::json!({"containers": [c(serde_json::json!({}))],
            "volumes": [{"name": "t", "projected": {"sources": [{"secret": {"name": "bot"}}]}}]}));
        let env = pod(
            serde_json::json!({"containers": [c(serde_json::json!({"env": [
            {"name": "T", "valueFrom": {"secretKeyRef": {"name": "bot", "key": "token"}}}]}))]}),
        );
        let env_from = pod(
            serde_json::json!({"containers": [], "initContainers": [c(serde_json::json!({
            "envFrom": [{"secretRef": {"name": "bot"}}]}))]}),
        );
        let other = pod(serde_json::json!({"containers": [c(serde_json::json!({}))],
            "volumes": [{"name": "t", "secret": {"secretName": "bot-2"}}]}));
        for (spec, want) in [
            (volume, true),
            (projected, true),
            (env, true),
            (env_from, true),
            (other, false),
        ] {
            assert_eq!(uses_secret(&spec, "bot"), want, "{spec:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_consumer_address_is_remembered_for_a_minute_per_secret() {
        let mut r = Recent::default();
        let ip: IpAddr = "10.244.40.7".parse().unwrap();
        r.saw("t", "bot", ip);
        assert!(r.had("t", "bot", ip));
        assert!(!r.had("t", "other", ip), "another Secret's consumer");
        assert!(!r.had("u", "bot", ip), "another namespace");
        tokio::time::advance(RECENT_FOR).await;
        assert!(!r.had("t", "bot", ip), "forgotten after a minute");
    }
}

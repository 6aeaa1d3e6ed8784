//! agent-token-operator: mints, rotates, revokes and delivers API tokens for
//! agents, declared as `AgentToken` objects against `TokenIssuer` /
//! `ClusterTokenIssuer` policies.
//!
//! A newcomer finds each behaviour by concern:
//! - [`crd`]: the user-facing kinds (the API contract in Rust types).
//! - [`rotation`]: pure time maths: when to rotate, jitter, cron, backoff.
//! - [`policy`]: pure issuer policy checks (scopes, namespaces, lifetime).
//! - [`ratelimit`]: per-issuer request budgets that are never exceeded.
//! - [`telemetry`]: logs and Prometheus metrics.
//! - [`http`]: health, readiness and metrics endpoints.
//! - [`controller`]: watches, reconcile phases, status, Events.
//! - [`issuer`]: token sources, one file per kind behind one trait.
//! - [`labels`]: label, annotation and finalizer names.
//! - [`leadership`]: leader election, and how long this replica may still lead.
//! - [`reference`]: the field reference generated from the CRDs.

pub mod controller;
pub mod crd;
pub mod duration;
pub mod events;
pub mod http;
pub mod issuer;
pub mod labels;
pub mod leadership;
pub mod policy;
pub mod ratelimit;
pub mod reference;
pub mod rotation;
pub mod telemetry;
pub mod usage;
pub mod watched;

#[cfg(test)]
mod proptests;

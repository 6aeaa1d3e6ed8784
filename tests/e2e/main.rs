//! End-to-end tests against the real local control plane (`e2e/cluster`).
//! One test binary, so the cluster is started once and tests share the link.

mod agenttoken;
mod apiproxy;
mod chaos;
mod cluster;
mod consumers;
mod drill;
mod egress;
mod github_app;
mod helm;
mod hostile;
mod jwt;
mod killswitch;
mod leadership;
mod ledger;
mod node;
mod oauth2;
mod plugin;
mod policy;
mod release;
mod support;
mod transport;
mod usage;
mod vault;
mod webhook;

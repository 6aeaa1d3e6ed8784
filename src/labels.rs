//! Label and annotation names: the part of the contract other tools select on.

/// `app.kubernetes.io/managed-by` on every object the operator creates.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// The value of [`MANAGED_BY`].
pub const MANAGER: &str = "agent-token-operator";
/// `agenttoken.dev/name`: the AgentToken an object belongs to.
pub const NAME: &str = "agenttoken.dev/name";
/// `agenttoken.dev/role`: what an operator-made object is for.
pub const ROLE: &str = "agenttoken.dev/role";
/// Role of a Secret that a ServiceAccount token is bound to.
pub const ROLE_BINDING: &str = "token-binding";
/// `agenttoken.dev/revision` on binding Secrets and on the token Secret.
pub const REVISION: &str = "agenttoken.dev/revision";
/// Label selector for everything the operator manages.
pub const MANAGED_SELECTOR: &str = "app.kubernetes.io/managed-by=agent-token-operator";

/// Trigger annotation on an AgentToken: rotate now, keep the old token for the grace period.
pub const ROTATE: &str = "agenttoken.dev/rotate";
/// Trigger annotation on an AgentToken: rotate now and revoke the old token at once.
pub const REVOKE: &str = "agenttoken.dev/revoke";
/// Annotation: a revocation drill (a new value starts one).
pub const DRILL: &str = "agenttoken.dev/drill";
/// Workload annotation: `"false"` opts a workload out of automatic restarts.
pub const RESTART: &str = "agenttoken.dev/restart";
/// Finalizer that revokes an AgentToken's tokens before it goes.
pub const FINALIZER: &str = "agenttoken.dev/revoke";
/// Finalizer on TokenIssuers and ClusterTokenIssuers: an issuer stays until
/// the tokens it minted are revoked (or dead), so revocation can reach it.
pub const ISSUER_FINALIZER: &str = "agenttoken.dev/outlive-tokens";

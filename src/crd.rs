//! The user-facing kinds: `AgentToken`, `TokenIssuer`, `ClusterTokenIssuer`
//! (group `agenttoken.dev`, version `v1alpha1`, category `agenttoken`).
//!
//! Doc comments become the CRD descriptions (`kubectl explain`); CEL rules
//! reject at admission what can be checked without a cluster lookup.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, CustomResourceExt, KubeSchema};

pub use crate::duration::SpecDuration;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every kind.
pub const GROUP: &str = "agenttoken.dev";

/// Shortest lifetime an AgentToken may ask for (and an issuer's
/// `maxLifetime`): a token in a Secret reaches a running Pod through the
/// kubelet's Secret sync (about a minute by default), so a shorter-lived
/// token would be dead before some consumers could read it.
pub const MIN_LIFETIME: &str = "5m";

fn lifetime_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    crate::duration::schema(Some(MIN_LIFETIME), None)
}

fn renew_before_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    crate::duration::schema(Some("1s"), None)
}

fn grace_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    crate::duration::schema(None, None)
}

/// A map of strings with at most `props` entries, keys of at most `key`
/// and values of at most `value` characters.
fn string_map(props: u32, key: u32, value: u32) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "maxProperties": props,
        "additionalProperties": {"type": "string", "maxLength": value},
        "x-kubernetes-validations": [{
            "rule": format!("self.all(k, size(k) <= {key})"),
            "message": format!("keys must be at most {key} characters"),
        }],
    })
}

/// A list of at most `items` strings of at most `len` characters.
fn string_list(items: u32, len: u32, pattern: &str, message: &str) -> schemars::Schema {
    // The pattern is a CEL rule rather than an OpenAPI `pattern` so the
    // refusal says what is wrong in words.
    schemars::json_schema!({
        "type": "array",
        "maxItems": items,
        "items": {"type": "string", "minLength": 1, "maxLength": len},
        "x-kubernetes-validations": [{
            "rule": format!("self.all(x, x.matches('{pattern}'))"),
            "message": message,
        }],
    })
}

/// Labels or annotations the tenant adds to the Secret: qualified names,
/// and none of the operator's own keys.
fn metadata_map(what: &str, value_rule: Option<(&str, &str)>) -> schemars::Schema {
    let mut rules = vec![
        serde_json::json!({
            "rule": "self.all(k, size(k) <= 317 && k.matches('^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$'))",
            "message": format!("{what} keys must be qualified names such as team.example/owner"),
        }),
        serde_json::json!({
            "rule": "self.all(k, !k.startsWith('agenttoken.dev/') && k != 'app.kubernetes.io/managed-by')",
            "message": format!("{what} cannot set agenttoken.dev/* or app.kubernetes.io/managed-by: the operator writes those"),
        }),
    ];
    if let Some((rule, message)) = value_rule {
        rules.push(serde_json::json!({"rule": rule, "message": message}));
    }
    schemars::json_schema!({
        "type": "object",
        "maxProperties": 32,
        "additionalProperties": {"type": "string", "maxLength": 4096},
        "x-kubernetes-validations": rules,
    })
}

fn scopes_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    // RFC 6749 §3.3 scope-token: printable ASCII without space, `"` or `\`.
    string_list(
        64,
        256,
        r"^[!#-\\[\\]-~]+$",
        "each scope is one scope-token (RFC 6749): no spaces, quotes or backslashes",
    )
}

fn audiences_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    string_list(16, 512, r"^\\S+$", "audiences contain no spaces")
}

fn repositories_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    string_list(
        100,
        100,
        r"^[A-Za-z0-9_.-]+$",
        "repositories are names such as infra (letters, digits, '-', '_', '.')",
    )
}

fn permissions_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut s = string_map(64, 64, 5);
    s.insert(
        "x-kubernetes-validations".into(),
        serde_json::json!([{
            "rule": "self.all(k, k.matches('^[a-z][a-z_]{0,63}$') && self[k] in ['read', 'write', 'admin'])",
            "message": "permissions map GitHub permission names (such as contents) to read, write or admin",
        }]),
    );
    s
}

fn parameters_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut s = string_map(32, 64, 4096);
    s.insert(
        "x-kubernetes-validations".into(),
        serde_json::json!([{
            "rule": "self.all(k, k.matches('^[A-Za-z0-9][-._A-Za-z0-9]{0,63}$'))",
            "message": "parameter names are letters, digits, '-', '_' and '.' (at most 64)",
        }]),
    );
    s
}

fn extra_keys_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut s = string_map(16, 253, 4096);
    s.insert(
        "x-kubernetes-validations".into(),
        serde_json::json!([{
            "rule": "self.all(k, k.matches('^[-._a-zA-Z0-9]{1,253}$'))",
            "message": "secret.extraKeys names must be valid Secret keys: letters, digits, '-', '_' and '.'",
        }]),
    );
    s
}

fn secret_labels_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    metadata_map(
        "secret.labels",
        Some((
            "self.all(k, self[k].matches('^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$'))",
            "secret.labels values must be valid label values (at most 63 characters)",
        )),
    )
}

fn secret_annotations_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    metadata_map("secret.annotations", None)
}

/// A per-request HTTP timeout: a Go duration between 1s and 60s.
fn timeout_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "string",
        "maxLength": crate::duration::MAX_TEXT,
        "pattern": crate::duration::PATTERN,
        "x-kubernetes-validations": [{
            "rule": "duration(self) >= duration('1s') && duration(self) <= duration('60s')",
            "message": "timeout must be between 1s and 60s",
        }],
    })
}

fn conditions_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = generator.subschema_for::<Vec<Condition>>();
    schema.insert("x-kubernetes-list-type".into(), "map".into());
    schema.insert(
        "x-kubernetes-list-map-keys".into(),
        serde_json::json!(["type"]),
    );
    schema
}

// ---------------------------------------------------------------------------
// AgentToken
// ---------------------------------------------------------------------------

/// A token an agent needs, minted by an issuer and kept fresh in a Secret.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "agenttoken.dev",
    version = "v1alpha1",
    kind = "AgentToken",
    namespaced,
    status = "AgentTokenStatus",
    derive = "PartialEq",
    shortname = "at",
    category = "agenttoken",
    doc = "A token an agent needs, minted by an issuer and kept fresh in a Secret the operator owns.",
    printcolumn = r#"{"name": "Ready", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name": "Issuer", "type": "string", "jsonPath": ".spec.issuerRef.name"}"#,
    printcolumn = r#"{"name": "Secret", "type": "string", "jsonPath": ".status.secretName"}"#,
    printcolumn = r#"{"name": "Expires", "type": "string", "jsonPath": ".status.expiresAt"}"#,
    printcolumn = r#"{"name": "Next Rotation", "type": "string", "jsonPath": ".status.nextRotationAt"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[x_kube(
    validation = Rule::new(
        "!has(self.lifetime) || !has(self.rotation) || !has(self.rotation.renewBefore) || duration(self.rotation.renewBefore) < duration(self.lifetime)"
    ).message("spec.rotation.renewBefore must be shorter than spec.lifetime, or the token would be due for renewal as soon as it is minted"),
    validation = Rule::new(
        "!has(self.previousTokenGracePeriod) || !has(self.lifetime) || duration(self.previousTokenGracePeriod) <= duration(self.lifetime)"
    ).message("spec.previousTokenGracePeriod cannot be longer than spec.lifetime: the previous token expires before its grace period ends"),
    validation = Rule::new(
        "!has(self.serviceAccountName) || !has(self.lifetime) || duration(self.lifetime) >= duration('10m')"
    ).message("spec.lifetime must be at least 10m for a ServiceAccount token (the Kubernetes TokenRequest minimum)"),
    validation = Rule::new(
        "!has(self.consumers) || !has(self.consumers.restart) || self.consumers.restart != 'Selected' || has(self.consumers.selector)"
    ).message("spec.consumers.restart Selected needs spec.consumers.selector")
)]
#[serde(rename_all = "camelCase")]
pub struct AgentTokenSpec {
    /// The issuer that mints this token: a TokenIssuer in this namespace or a ClusterTokenIssuer.
    pub issuer_ref: IssuerRef,
    /// Scopes to ask for: OAuth scopes, Vault policies, the JWT `scope` claim.
    /// The issuer policy's `allowedScopes` must cover each of them.
    /// A serviceAccount issuer has no scopes (use RBAC on the ServiceAccount).
    /// Each scope is one scope-token (RFC 6749 §3.3): no spaces or quotes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "scopes_schema")]
    pub scopes: Vec<String>,
    /// Audiences: TokenRequest audiences, the JWT `aud` claim, the OAuth2 audience.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "audiences_schema")]
    pub audiences: Vec<String>,
    /// ServiceAccount in this AgentToken's own namespace (serviceAccount issuer only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub service_account_name: Option<String>,
    /// GitHub App installation permissions, for example `{contents: read}` (githubApp issuer).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "permissions_schema")]
    pub permissions: BTreeMap<String, String>,
    /// Repositories the GitHub App installation token is limited to (githubApp issuer).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "repositories_schema")]
    pub repositories: Vec<String>,
    /// Issuer-specific extras (see the issuer's documentation).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "parameters_schema")]
    pub parameters: BTreeMap<String, String>,
    /// Requested lifetime (Go duration, e.g. `1h`). The issuer may grant less and
    /// the token's real expiry drives rotation. Default: the policy's maxLifetime, else 1h.
    /// Between 5m and 8760h.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "lifetime_schema")]
    pub lifetime: Option<SpecDuration>,
    /// When to rotate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<RotationSpec>,
    /// The Secret the token is delivered in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<SecretSpec>,
    /// How long the previous token stays valid (and in key `<key>.previous`)
    /// after a rotation before it is revoked. Default 10m; `0s` revokes at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "grace_schema")]
    pub previous_token_grace_period: Option<SpecDuration>,
    /// Workloads that use the Secret and how they pick up a new token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumers: Option<ConsumersSpec>,
    /// Stop rotating. The current token stays until it expires; the
    /// `agenttoken.dev/rotate` and `agenttoken.dev/revoke` annotations still work.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    /// Where uses of the token may come from, and what a use from anywhere
    /// else does (needs the operator's usage endpoint; see the README's
    /// "Usage tracking").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageSpec>,
    /// Revocation drills (`agenttoken.dev/drill`, `kubectl agenttoken
    /// drill`): what a drill must achieve to pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drill: Option<DrillSpec>,
}

/// `spec.drill`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DrillSpec {
    /// A drill passes when, within this time of its start, the issuer
    /// refuses the old token and every consumer holds the new one
    /// (default 5m, 1s to 1h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "drill_target_schema")]
    pub target: Option<SpecDuration>,
    /// Also drill at these times: a 5-field cron expression in UTC. Off
    /// when unset. A scheduled drill waits for the issuer's rate limit and
    /// the mint floor instead of revoking ahead of them, and its restarts
    /// queue behind the cluster-wide restart cap like any rotation's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub schedule: Option<String>,
}

fn drill_target_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "string",
        "maxLength": crate::duration::MAX_TEXT,
        "pattern": crate::duration::PATTERN,
        "x-kubernetes-validations": [{
            "rule": "duration(self) >= duration('1s') && duration(self) <= duration('1h')",
            "message": "drill.target must be between 1s and 1h",
        }],
    })
}

/// The last revocation drill of an AgentToken: each phase's time from the
/// drill's start, in milliseconds.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DrillStatus {
    /// The `agenttoken.dev/drill` value that started it.
    pub id: String,
    /// The revision drilled (revoked at once and replaced).
    pub revision: i64,
    pub started_at: Time,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// Until the operator had the old token revoked at the issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_ms: Option<i64>,
    /// Until the issuer refused the old token, checked the way it allows
    /// (`refusedBy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused_ms: Option<i64>,
    /// How the refusal was checked (`TokenReview`, `Vault lookup-self`,
    /// `introspection`), or why it could not be.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused_by: Option<String>,
    /// Until every consumer held the new token (rollout complete, signal
    /// delivered; at delivery when nothing consumes the Secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumers_ready_ms: Option<i64>,
    /// Whether the old token was seen used after its revocation (usage
    /// tracking).
    #[serde(default)]
    pub used_after_revocation: bool,
    /// The target it was held to, in milliseconds.
    pub target_ms: i64,
    /// `Running`, `Passed`, `Failed` or `Unverified`.
    pub result: DrillResult,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// How a drill ended.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DrillResult {
    /// Under way.
    #[default]
    Running,
    /// The old token was refused and every consumer held the new one
    /// within the target.
    Passed,
    /// A phase missed the target, or a consumer did not get the new token.
    Failed,
    /// Within the target as far as it could be checked, but the issuer
    /// offers no way to ask whether the old token is refused.
    Unverified,
}

/// `spec.usage`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageSpec {
    /// Addresses uses may come from: CIDRs (`10.0.0.0/8`) or single
    /// addresses. Empty: the Pods in this namespace whose volumes or
    /// environment use the Secret.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "expected_sources_schema")]
    pub expected_sources: Vec<String>,
    /// `Report` (the default): a Warning Event `UnexpectedSource`, the
    /// `UnexpectedSource` condition and a metric. `Revoke`: also revoke the
    /// token at once and mint a new one for the real consumers.
    #[serde(default)]
    pub on_unexpected_source: UnexpectedSourceAction,
    /// A token is `Unused` when no Deployment, StatefulSet or DaemonSet in
    /// this namespace uses the Secret and the token has not been used for
    /// this long (since it was issued, or its last use). Off when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "unused_after_schema")]
    pub unused_after: Option<SpecDuration>,
    /// `Report` (the default): the `Unused` condition, a Warning Event
    /// `Unused` and a metric. `Revoke`: also revoke the token, and mint no
    /// other until a workload uses the Secret again.
    #[serde(default)]
    pub on_unused: UnusedAction,
}

/// What an unused token comes to.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum UnusedAction {
    #[default]
    Report,
    Revoke,
}

fn unused_after_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    crate::duration::schema(Some("10s"), None)
}

/// What a use from an unexpected address does.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum UnexpectedSourceAction {
    #[default]
    Report,
    Revoke,
}

fn expected_sources_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = generator.subschema_for::<Vec<String>>();
    schema.insert("maxItems".into(), 32.into());
    schema.insert(
        "items".into(),
        serde_json::json!({"type": "string", "maxLength": 64}),
    );
    schema.insert(
        "x-kubernetes-validations".into(),
        serde_json::json!([{
            "rule": "self.all(s, isCIDR(s) || isIP(s))",
            "message": "each expected source is a CIDR (10.0.0.0/8) or an IP address"
        }]),
    );
    schema
}

/// Which issuer mints the token.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IssuerRef {
    /// `TokenIssuer` (this namespace, the default) or `ClusterTokenIssuer`.
    #[serde(default)]
    pub kind: IssuerKind,
    /// Name of the issuer.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// The kind of issuer an AgentToken refers to.
#[derive(
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    JsonSchema,
)]
pub enum IssuerKind {
    /// A namespaced issuer in the AgentToken's namespace.
    #[default]
    TokenIssuer,
    /// A cluster-scoped issuer whose policy allows the AgentToken's namespace.
    ClusterTokenIssuer,
}

/// When to rotate. Rotation is computed from the token's REAL expiry.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[x_kube(
    validation = Rule::new("!(has(self.renewBefore) && has(self.renewBeforePercentage))")
        .message("set either rotation.renewBefore or rotation.renewBeforePercentage, not both")
)]
#[serde(rename_all = "camelCase")]
pub struct RotationSpec {
    /// Rotate when this percentage of the token's real lifetime is left (1-99, default 33).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 99))]
    pub renew_before_percentage: Option<i32>,
    /// Rotate this long before the token's real expiry (instead of the percentage).
    /// When it is not shorter than the lifetime the issuer really granted, the
    /// default (a third of the lifetime left) applies instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "renew_before_schema")]
    pub renew_before: Option<SpecDuration>,
    /// Also rotate at these times: a 5-field cron expression in UTC, e.g. `0 3 * * *`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub schedule: Option<String>,
}

/// The Secret the operator writes. It never takes over a Secret it did not create.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[x_kube(
    validation = Rule::new("!has(self.key) || (!self.key.endsWith('.previous') && self.key != 'expiresAt')")
        .message("secret.key cannot end in .previous or be expiresAt: the operator writes those keys itself"),
    validation = Rule::new("!has(self.extraKeys) || self.extraKeys.all(k, k != (has(self.key) ? self.key : 'token') && k != (has(self.key) ? self.key : 'token') + '.previous' && k != 'expiresAt')")
        .message("secret.extraKeys cannot redefine the token key, its .previous key or expiresAt")
)]
#[serde(rename_all = "camelCase")]
pub struct SecretSpec {
    /// Name of the Secret (default: the AgentToken's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: Option<String>,
    /// Key holding the current token (default `token`). The previous token is in `<key>.previous`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 200), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: Option<String>,
    /// Derived keys: each value is a template where `{{ token }}` is the token,
    /// e.g. `authorization: "Bearer {{ token }}"`.
    /// At most 16; names are Secret keys other than the token key, its
    /// `.previous` key and `expiresAt`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "extra_keys_schema")]
    pub extra_keys: BTreeMap<String, String>,
    /// Extra labels on the Secret (at most 32; not agenttoken.dev/* or app.kubernetes.io/managed-by).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "secret_labels_schema")]
    pub labels: BTreeMap<String, String>,
    /// Extra annotations on the Secret (at most 32; not agenttoken.dev/*).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "secret_annotations_schema")]
    pub annotations: BTreeMap<String, String>,
}

/// Workloads that consume the Secret.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsumersSpec {
    /// `Auto`: Deployments, StatefulSets and DaemonSets in this namespace that
    /// reference the Secret; `Selected`: only those matching `selector`; `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<RestartPolicy>,
    /// Workloads to restart when `restart` is `Selected`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// `RolloutRestart` (pod-template annotation) or `Signal` (`kill -<signal.signal> 1`
    /// in the containers that mount the Secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<ConsumerStrategy>,
    /// What the `Signal` strategy sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<SignalSpec>,
}

/// Which workloads restart when the token changes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RestartPolicy {
    /// Workloads referencing the Secret, minus those annotated `agenttoken.dev/restart: "false"`.
    #[default]
    Auto,
    /// Only workloads matching `consumers.selector`.
    Selected,
    /// No workload is restarted.
    None,
}

/// How consumers pick up a new token.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ConsumerStrategy {
    /// Change a pod-template annotation so the workload rolls.
    #[default]
    RolloutRestart,
    /// Send `signal.signal` to the consuming containers (no restart).
    Signal,
}

/// What the `Signal` strategy sends. The operator runs `kill -<signal> 1`
/// in each container that mounts the Secret, in the running Pods of the
/// consuming workloads: a signal, never a command of the AgentToken's
/// choosing (whoever may create an AgentToken must not gain `pods/exec`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SignalSpec {
    /// The signal sent to the container's main process (PID 1). Default `HUP`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<Signal>,
    /// Signal only this container (it must mount the Secret). Default: every
    /// container that mounts the Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub container: Option<String>,
}

/// A signal the `Signal` strategy may send.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Signal {
    /// SIGHUP: the usual "reload your configuration".
    #[default]
    HUP,
    /// SIGUSR1.
    USR1,
    /// SIGUSR2.
    USR2,
    /// SIGTERM: the process exits and the kubelet restarts the container.
    TERM,
    /// SIGINT.
    INT,
}

impl Signal {
    /// The name `kill` takes (`-HUP`).
    pub fn as_str(self) -> &'static str {
        match self {
            Signal::HUP => "HUP",
            Signal::USR1 => "USR1",
            Signal::USR2 => "USR2",
            Signal::TERM => "TERM",
            Signal::INT => "INT",
        }
    }
}

/// What the operator observed and did. Never contains a token.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentTokenStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`: a valid token is in the Secret. `Issuing`: a mint is in progress or failing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The Secret holding the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// +1 per minted token.
    #[serde(default)]
    pub revision: i64,
    /// `sha256:` and the first 16 hex characters of the token's SHA-256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_fingerprint: Option<String>,
    /// When the current token was issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_at: Option<Time>,
    /// The current token's real expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    /// When the operator will rotate next (with jitter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_rotation_at: Option<Time>,
    /// Why the current token was minted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rotation_reason: Option<RotationReason>,
    /// Failed mints since the last success.
    #[serde(default)]
    pub failed_attempts: i32,
    /// When the last mint failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_time: Option<Time>,
    /// Why the last mint failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_message: Option<String>,
    /// The last 10 minted tokens and their revocation: the revocation ledger.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<HistoryEntry>,
    /// Workloads restarted for the current revision (at most
    /// [`MAX_CONSUMERS_IN_STATUS`]; every consumer is restarted either way).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub consumers: Vec<ConsumerStatus>,
    /// Trigger annotation values already acted on: each value of
    /// `agenttoken.dev/rotate` and `agenttoken.dev/revoke` mints once.
    /// Values longer than 63 characters are kept as their fingerprint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handled_triggers: Option<HandledTriggers>,
    /// UID of the Secret in the operator's namespace that keeps, until
    /// they are revoked, the tokens whose revocation needs the token itself
    /// (OAuth2 RFC 7009, GitHub App, a webhook without ids).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keeper_uid: Option<String>,
    /// A random value recorded before the operator first creates the
    /// keeper, and carried by the keeper it creates: a keeper created just
    /// before the operator stopped, whose UID never reached status, is
    /// known as this AgentToken's by it (nobody else writes this status or
    /// the operator's namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keeper_intent: Option<String>,
    /// Where and when the current and previous tokens were used, as the
    /// issuer's audit stream reports it (`--usage-address`). Written by the
    /// operator's usage tracker, not by reconciles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageStatus>,
    /// The last revocation drill (`agenttoken.dev/drill`). Written by the
    /// operator's drill runner, not by reconciles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_drill: Option<DrillStatus>,
    /// Set when the last token was revoked as unused
    /// (`spec.usage.onUnused: Revoke`): no token is minted until a workload
    /// uses the Secret again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dormant_since: Option<Time>,
}

/// Source addresses kept per token in `status.usage`.
pub const MAX_USAGE_SOURCES: usize = 8;

/// `status.usage`: what the issuer saw of this AgentToken's tokens.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageStatus {
    /// The tokens seen in use, newest revision first (at most the current
    /// and the previous one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tokens: Vec<TokenUsage>,
    /// The newest use of any of this AgentToken's tokens, kept across
    /// rotations (what `spec.usage.unusedAfter` counts from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used: Option<Time>,
}

/// One token's use.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenUsage {
    /// The token's revision (its ledger entry).
    pub revision: i64,
    /// The last request made with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used: Option<Time>,
    /// Requests seen with it since the operator started tracking (an
    /// operator restart starts again from what status says).
    #[serde(default)]
    pub requests: i64,
    /// Addresses it was used from, the first 8 distinct ones seen.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<String>,
    /// Of those and any later ones, the addresses `spec.usage` does not
    /// expect (the first 8).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unexpected_sources: Vec<String>,
    /// The user agent of the last request (at most 128 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    /// Requests made with it after the operator revoked or withdrew it
    /// (a copy still being tried). Not counted in `requests`.
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    pub requests_after_revocation: i64,
    /// The last of those.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_after_revocation: Option<Time>,
}

fn is_zero_i64(n: &i64) -> bool {
    *n == 0
}

/// Entries kept in `status.consumers`.
pub const MAX_CONSUMERS_IN_STATUS: usize = 50;

/// Trigger values the operator acted on.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HandledTriggers {
    /// The last `agenttoken.dev/rotate` value that minted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotate: Option<String>,
    /// The last `agenttoken.dev/revoke` value that minted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoke: Option<String>,
    /// The last `agenttoken.dev/drill` value that started a drill.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drill: Option<String>,
}

/// How a trigger annotation's value is remembered: as written when short,
/// else its fingerprint (a tenant's value never grows status).
pub fn trigger_value(value: &str) -> String {
    if value.len() <= 63 {
        value.to_string()
    } else {
        crate::rotation::fingerprint(value.as_bytes())
    }
}

/// Why a token was minted.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RotationReason {
    /// The first token.
    Initial,
    /// The renewal window before expiry was reached.
    Scheduled,
    /// The token had expired.
    Expiring,
    /// A spec field the token depends on changed.
    SpecChanged,
    /// The `agenttoken.dev/rotate` annotation.
    Manual,
    /// The `agenttoken.dev/revoke` annotation: the old token was revoked at once.
    Revoked,
    /// The Secret was deleted or its token edited.
    SecretDrift,
    /// `rotation.schedule` fired.
    Cron,
    /// The token was used from an unexpected address and
    /// `spec.usage.onUnexpectedSource` is `Revoke`: revoked at once.
    UnexpectedSource,
    /// The last token was revoked as unused (`spec.usage.onUnused:
    /// Revoke`) and a workload uses the Secret again.
    InUseAgain,
    /// The issuer's kill switch (`spec.revokeIssuedBefore`): the token it
    /// replaced was revoked at once.
    KillSwitch,
    /// A revocation drill (`agenttoken.dev/drill`): the token it replaced
    /// was revoked at once.
    Drill,
}

/// One minted token in the revocation ledger.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HistoryEntry {
    /// The token's revision.
    pub revision: i64,
    /// The token's fingerprint.
    pub fingerprint: String,
    /// When it was issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_at: Option<Time>,
    /// Its real expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    /// When it was revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<Time>,
    /// `Pending` while in use, then `Revoked`, `NotSupported` or `Failed`.
    pub revocation: RevocationState,
    /// Why it was minted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<RotationReason>,
    /// What revocation needs (a Vault accessor or lease id, a binding
    /// Secret's name, a token id; never a secret). Revocation uses this
    /// record, which only the operator writes, never the Secret's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handle: Option<String>,
    /// Where the token is in its life; `revocation` is its summary.
    /// Entries written before the ledger had states have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<TokenLife>,
    /// The issuer that minted it: its revocation goes there and nowhere
    /// else, whatever `spec.issuerRef` says later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<IssuerRecord>,
    /// Hash of the spec it was minted for (a change rotates it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec_hash: Option<String>,
    /// End of its grace period as the previous token (state `Grace`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_until: Option<Time>,
    /// Revocation attempts made so far.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempts: i32,
    /// When revocation is tried next (`Revoking`, `Failed`); absent when
    /// no retry can succeed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<Time>,
    /// Why it is in its state: the last failure, what makes it `Unknown`,
    /// why it was retired or abandoned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Who abandoned its revocation (state `Abandoned`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abandoned_by: Option<String>,
    /// The id uses of this token are reported under, by which a use is
    /// mapped back to this revision: `jti:<id>` (a service-account token's
    /// JWT ID, in kube-apiserver's audit records), `accessor:<id>` (a Vault
    /// child token's accessor), `jwt-sha256:<hex>` (the SHA-256 of a jwt
    /// issuer's token, which the introspection endpoint matches). An
    /// identifier, not a secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_id: Option<String>,
    /// Its revocation was ordered at once (the kill switch, the
    /// `agenttoken.dev/revoke` annotation, a stolen copy, a drill): it goes
    /// ahead of other work and may spend the issuer's
    /// `policy.rateLimit.emergency` budget.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub urgent: bool,
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

/// A token's place in its life, as the ledger records it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum TokenLife {
    /// A mint was started: a token may exist (recorded before the issuer call).
    Minting,
    /// Delivered: the Secret's current token.
    Live,
    /// The previous token, still in the Secret until `graceUntil`.
    Grace,
    /// Due for revocation; the first attempt has not answered yet.
    Revoking,
    /// The issuer confirmed the token is dead.
    Revoked,
    /// The issuer cannot revoke; the token dies at `expiresAt`.
    NotSupported,
    /// It died at `expiresAt` without a confirmed revocation.
    Expired,
    /// Revocation failed (`message`); retried at `nextAttemptAt` while
    /// retrying can succeed.
    Failed,
    /// A token may exist that the operator cannot find or revoke (a crash
    /// between mint and record); it is valid at most until `expiresAt`.
    Unknown,
    /// Its revocation was given up on purpose (`abandonedBy`, `message`).
    Abandoned,
}

/// The issuer that minted a token, by identity.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IssuerRecord {
    /// `TokenIssuer` (in the AgentToken's namespace) or `ClusterTokenIssuer`.
    pub kind: IssuerKind,
    pub name: String,
    /// The issuer object's UID: a new issuer of the same name is another issuer.
    pub uid: String,
    /// The issuer type: `serviceAccount`, `oauth2`, `vault`, `githubApp`, `webhook`, `jwt`.
    #[serde(rename = "type")]
    pub type_: String,
}

/// Revocation result of a token.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RevocationState {
    /// The issuer confirmed the token is dead.
    Revoked,
    /// The issuer cannot revoke; the token dies at its expiry.
    NotSupported,
    /// Revocation failed; see Events.
    Failed,
    /// Still in use (current, or previous within its grace period).
    #[default]
    Pending,
}

/// A workload restarted for a token revision.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerStatus {
    /// Deployment, StatefulSet or DaemonSet.
    pub kind: String,
    /// The workload's name.
    pub name: String,
    /// The token revision it was restarted for.
    pub revision: i64,
    /// When it was restarted (or signalled) for `revision`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarted_at: Option<Time>,
    /// Where the workload is in picking up `revision`.
    #[serde(default)]
    pub phase: ConsumerPhase,
    /// A human-readable detail (why a rollout is not done, what a signal did).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Where a consuming workload is in picking up the current token.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ConsumerPhase {
    /// A restart is queued (coalescing with other AgentTokens, or waiting
    /// for the cluster-wide restart cap).
    #[default]
    Pending,
    /// The pod-template annotation carries the revision; the rollout runs.
    RollingOut,
    /// The rollout for this revision completed.
    RolledOut,
    /// The rollout did not complete within the operator's rollout timeout;
    /// the previous token is revoked at the end of its grace period anyway.
    TimedOut,
    /// `Signal` strategy: the command ran in the consuming containers.
    Signaled,
    /// `Signal` strategy: the command could not run or failed.
    Failed,
    /// The workload was created after this token was written: it already has it.
    UpToDate,
}

impl RotationReason {
    /// Whether someone other than the clock asked for this mint: a trigger
    /// annotation, a deleted or edited Secret, a spec change. Such mints
    /// meet a growing floor (`rotation::mint_floor`); the token's own
    /// schedule never does.
    pub fn forced(self) -> bool {
        matches!(
            self,
            RotationReason::Manual
                | RotationReason::Revoked
                | RotationReason::SecretDrift
                | RotationReason::SpecChanged
                | RotationReason::UnexpectedSource
                | RotationReason::KillSwitch
                | RotationReason::Drill
        )
    }
}

impl ConsumerPhase {
    /// Whether nothing more will happen for this revision (the previous token may go).
    pub fn settled(self) -> bool {
        !matches!(self, ConsumerPhase::Pending | ConsumerPhase::RollingOut)
    }
}

impl AgentTokenSpec {
    /// A spec naming only its issuer; every other field unset.
    pub fn for_issuer(issuer_ref: IssuerRef) -> Self {
        AgentTokenSpec {
            issuer_ref,
            scopes: Vec::new(),
            audiences: Vec::new(),
            service_account_name: None,
            permissions: BTreeMap::new(),
            repositories: Vec::new(),
            parameters: BTreeMap::new(),
            lifetime: None,
            rotation: None,
            secret: None,
            previous_token_grace_period: None,
            consumers: None,
            drill: None,
            paused: false,
            usage: None,
        }
    }
}

impl AgentTokenSpec {
    /// Everything admission checks, checked again on the object the
    /// operator reads: an object admitted before a bound existed (or with
    /// admission bypassed) is refused here, on its own, with the field
    /// named, instead of failing a watch or a write.
    pub fn check(&self) -> Result<(), String> {
        use crate::duration::parse as dur;
        let min_lifetime = dur(MIN_LIFETIME).unwrap_or_default();
        let field =
            |name: &str, d: Option<&SpecDuration>| -> Result<Option<std::time::Duration>, String> {
                d.map(|d| d.get().map_err(|e| format!("spec.{name} {e}")))
                    .transpose()
            };
        if let Some(l) = field("lifetime", self.lifetime.as_ref())?
            && l < min_lifetime
        {
            return Err(format!(
                "spec.lifetime must be at least {MIN_LIFETIME}: a token in a Secret reaches Pods through the kubelet's Secret sync"
            ));
        }
        field(
            "previousTokenGracePeriod",
            self.previous_token_grace_period.as_ref(),
        )?;
        field(
            "rotation.renewBefore",
            self.rotation.as_ref().and_then(|r| r.renew_before.as_ref()),
        )?;
        list("spec.scopes", &self.scopes, 64, 256, |c| {
            c.is_ascii_graphic() && c != '"' && c != '\\'
        })?;
        list("spec.audiences", &self.audiences, 16, 512, |c| {
            !c.is_whitespace()
        })?;
        list("spec.repositories", &self.repositories, 100, 100, |c| {
            c.is_ascii_alphanumeric() || "-_.".contains(c)
        })?;
        if self.permissions.len() > 64 {
            return Err("spec.permissions has more than 64 entries".into());
        }
        if let Some((k, v)) = self
            .permissions
            .iter()
            .find(|(k, v)| k.len() > 64 || !matches!(v.as_str(), "read" | "write" | "admin"))
        {
            return Err(format!(
                "spec.permissions.{}: {:?} is not read, write or admin",
                short(k),
                short(v)
            ));
        }
        map("spec.parameters", &self.parameters, 32, 64, 4096)?;
        if let Some(sec) = &self.secret {
            let key = sec.key.as_deref().unwrap_or("token");
            map("spec.secret.extraKeys", &sec.extra_keys, 16, 253, 4096)?;
            if let Some(k) = sec.extra_keys.keys().find(|k| {
                k.is_empty()
                    || !k
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            }) {
                return Err(format!(
                    "spec.secret.extraKeys: {:?} is not a valid Secret key",
                    short(k)
                ));
            }
            let previous = format!("{key}.previous");
            if let Some(k) = sec
                .extra_keys
                .keys()
                .find(|k| **k == key || **k == previous || *k == "expiresAt")
            {
                return Err(format!(
                    "spec.secret.extraKeys cannot redefine {k:?}: the operator writes it"
                ));
            }
            for (what, m) in [("labels", &sec.labels), ("annotations", &sec.annotations)] {
                map(&format!("spec.secret.{what}"), m, 32, 317, 4096)?;
                if let Some(k) = m.keys().find(|k| {
                    k.starts_with("agenttoken.dev/") || *k == "app.kubernetes.io/managed-by"
                }) {
                    return Err(format!(
                        "spec.secret.{what} cannot set {k:?}: the operator writes it"
                    ));
                }
            }
            if let Some(v) = sec.labels.values().find(|v| {
                v.len() > 63
                    || !v
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            }) {
                return Err(format!(
                    "spec.secret.labels: {:?} is not a valid label value",
                    short(v)
                ));
            }
        }
        Ok(())
    }
}

/// At most 40 characters of `s`, for messages.
fn short(s: &str) -> String {
    s.chars().take(40).collect()
}

fn list(
    name: &str,
    items: &[String],
    max: usize,
    len: usize,
    ok: impl Fn(char) -> bool,
) -> Result<(), String> {
    if items.len() > max {
        return Err(format!("{name} has more than {max} entries"));
    }
    match items
        .iter()
        .find(|i| i.is_empty() || i.len() > len || !i.chars().all(&ok))
    {
        Some(i) => Err(format!(
            "{name}: {:?} is not allowed (1-{len} characters; no spaces or separators)",
            short(i)
        )),
        None => Ok(()),
    }
}

fn map(
    name: &str,
    m: &BTreeMap<String, String>,
    max: usize,
    key_len: usize,
    value_len: usize,
) -> Result<(), String> {
    if m.len() > max {
        return Err(format!("{name} has more than {max} entries"));
    }
    match m
        .iter()
        .find(|(k, v)| k.len() > key_len || v.len() > value_len)
    {
        Some((k, _)) => Err(format!(
            "{name}.{}: the key or its value is too long (keys {key_len}, values {value_len} characters)",
            short(k)
        )),
        None => Ok(()),
    }
}

impl AgentToken {
    /// The Secret's name: `spec.secret.name` or the AgentToken's name.
    pub fn secret_name(&self) -> String {
        self.spec
            .secret
            .as_ref()
            .and_then(|s| s.name.clone())
            .unwrap_or_else(|| self.metadata.name.clone().unwrap_or_default())
    }

    /// The key holding the current token: `spec.secret.key` or `token`.
    pub fn secret_key(&self) -> String {
        self.spec
            .secret
            .as_ref()
            .and_then(|s| s.key.clone())
            .unwrap_or_else(|| "token".into())
    }
}

// ---------------------------------------------------------------------------
// TokenIssuer / ClusterTokenIssuer
// ---------------------------------------------------------------------------

/// Where tokens come from (exactly one issuer kind) and the policy every
/// AgentToken using it must follow.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "agenttoken.dev",
    version = "v1alpha1",
    kind = "TokenIssuer",
    namespaced,
    status = "TokenIssuerStatus",
    derive = "PartialEq",
    shortname = "ti",
    category = "agenttoken",
    doc = "Where tokens come from for AgentTokens in this namespace, and the policy they must follow.",
    printcolumn = r#"{"name": "Ready", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name": "Reason", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#,
    validation = Rule::new("!has(self.spec.policy) || (!has(self.spec.policy.allowedNamespaces) && !has(self.spec.policy.namespaceSelector))")
        .message("policy.allowedNamespaces and policy.namespaceSelector are for ClusterTokenIssuer: a TokenIssuer serves its own namespace only"),
    validation = Rule::new("!has(self.spec.revokeScope) || (!has(self.spec.revokeScope.namespaces) && !has(self.spec.revokeScope.namespaceSelector))")
        .message("revokeScope.namespaces and revokeScope.namespaceSelector are for ClusterTokenIssuer: a TokenIssuer serves its own namespace only")
)]
#[x_kube(
    validation = Rule::new(
        "[has(self.serviceAccount), has(self.oauth2), has(self.vault), has(self.githubApp), has(self.webhook), has(self.jwt)].filter(x, x).size() == 1"
    ).message("set exactly one issuer kind: serviceAccount, oauth2, vault, githubApp, webhook or jwt"),
    validation = Rule::new("!has(self.revokeScope) || has(self.revokeIssuedBefore)")
        .message("revokeScope narrows the kill switch: set revokeIssuedBefore with it")
)]
#[serde(rename_all = "camelCase")]
pub struct TokenIssuerSpec {
    /// Mint nothing (fail closed): AgentTokens on this issuer keep the
    /// tokens they hold until those expire, get no new ones, and say why
    /// (`IssuerSuspended`); nothing falls back to another issuer.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspend: bool,
    /// The kill switch: every token this issuer minted before this time is
    /// revoked at once and replaced (while `suspend` is set, revoked and not
    /// replaced). Set it to now to revoke everything the issuer ever
    /// minted; it stays in force for tokens minted before it, so it is
    /// safe to leave set. `revokeScope` narrows it to some AgentTokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoke_issued_before: Option<Time>,
    /// Which AgentTokens the kill switch covers: a compromised team or
    /// workload rather than the whole issuer. Every part that is set must
    /// match; absent, it covers all of this issuer's AgentTokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoke_scope: Option<RevokeScope>,
    /// Kubernetes TokenRequest for ServiceAccounts in the AgentToken's own namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<ServiceAccountIssuerSpec>,
    /// OAuth2 client credentials (RFC 6749 §4.4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth2: Option<OAuth2IssuerSpec>,
    /// HashiCorp Vault or OpenBao.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vault: Option<VaultIssuerSpec>,
    /// GitHub App installation tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub github_app: Option<GithubAppIssuerSpec>,
    /// Any HTTP service that mints tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookIssuerSpec>,
    /// JWTs signed by the operator itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtIssuerSpec>,
    /// Guardrails enforced on every AgentToken that uses this issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<IssuerPolicy>,
}

/// Every issuer type's name, as `IssuerRecord.type` and metrics say it.
pub const ISSUER_TYPES: [&str; 6] = [
    "serviceAccount",
    "oauth2",
    "vault",
    "githubApp",
    "webhook",
    "jwt",
];

impl TokenIssuerSpec {
    /// The name of the issuer kind that is set (the first one, if several are).
    pub fn kind_name(&self) -> Option<&'static str> {
        [
            (self.service_account.is_some(), "serviceAccount"),
            (self.oauth2.is_some(), "oauth2"),
            (self.vault.is_some(), "vault"),
            (self.github_app.is_some(), "githubApp"),
            (self.webhook.is_some(), "webhook"),
            (self.jwt.is_some(), "jwt"),
        ]
        .into_iter()
        .find_map(|(set, name)| set.then_some(name))
    }
}

/// A cluster-scoped issuer: serves the namespaces its policy allows.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "agenttoken.dev",
    version = "v1alpha1",
    kind = "ClusterTokenIssuer",
    status = "TokenIssuerStatus",
    derive = "PartialEq",
    shortname = "cti",
    category = "agenttoken",
    doc = "Where tokens come from for AgentTokens in the namespaces its policy allows.",
    printcolumn = r#"{"name": "Ready", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name": "Reason", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(transparent)]
pub struct ClusterTokenIssuerSpec(pub TokenIssuerSpec);

impl std::ops::Deref for ClusterTokenIssuerSpec {
    type Target = TokenIssuerSpec;
    fn deref(&self) -> &TokenIssuerSpec {
        &self.0
    }
}

/// Kubernetes TokenRequest. No settings: the AgentToken names the ServiceAccount.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct ServiceAccountIssuerSpec {}

/// A key of a Secret.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct SecretKeyRef {
    /// Secret name (in the issuer's namespace; for a ClusterTokenIssuer, the operator's namespace).
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key in the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// How the OAuth2 client authenticates to the token endpoint.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum OAuth2AuthMethod {
    /// HTTP Basic authentication (RFC 6749 §2.3.1).
    #[default]
    ClientSecretBasic,
    /// Client id and secret in the form body.
    ClientSecretPost,
}

/// OAuth2 client credentials.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OAuth2IssuerSpec {
    /// Token endpoint.
    #[serde(rename = "tokenURL")]
    #[schemars(length(max = 2048), regex(pattern = r"^https?://"))]
    pub token_url: String,
    /// Client id.
    #[serde(rename = "clientID")]
    #[schemars(length(min = 1, max = 256))]
    pub client_id: String,
    /// The client secret.
    pub client_secret_ref: SecretKeyRef,
    /// `ClientSecretBasic` (default) or `ClientSecretPost`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_method: Option<OAuth2AuthMethod>,
    /// RFC 7009 revocation endpoint (optional).
    #[serde(
        rename = "revocationURL",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(length(max = 2048), regex(pattern = r"^https?://"))]
    pub revocation_url: Option<String>,
    /// RFC 7662 introspection endpoint (optional), authenticated like the
    /// token endpoint: a revocation drill asks it whether the old token is
    /// still active.
    #[serde(
        rename = "introspectionURL",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(length(max = 2048), regex(pattern = r"^https?://"))]
    pub introspection_url: Option<String>,
    /// Time allowed for one HTTP request, connecting included (default 10s,
    /// 1s-60s). A request that times out is retried (3 attempts in all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "timeout_schema")]
    pub timeout: Option<SpecDuration>,
    /// PEM CA bundle to trust for the endpoints (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub ca_bundle: Option<String>,
}

/// Vault or OpenBao.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VaultIssuerSpec {
    /// Server address, e.g. `https://vault.example:8200`.
    #[schemars(length(max = 2048), regex(pattern = r"^https?://"))]
    pub address: String,
    /// How the operator authenticates.
    pub auth: VaultAuth,
    /// Mint a dynamic secret from this path instead of a child token. The
    /// path, method and body are the platform's: they run with the
    /// operator's Vault token, so an AgentToken can never choose them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dynamic_secret: Option<VaultDynamicSecret>,
    /// Vault namespace (Enterprise / OpenBao namespaces).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub namespace: Option<String>,
    /// Time allowed for one HTTP request, connecting included (default 10s,
    /// 1s-60s). A request that times out is retried (3 attempts in all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "timeout_schema")]
    pub timeout: Option<SpecDuration>,
    /// PEM CA bundle to trust (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub ca_bundle: Option<String>,
    /// The path of the audit device that streams to the operator (usage
    /// tracking). For each new child token the operator asks Vault for the
    /// token's HMAC under that device (`sys/audit-hash/<path>`: the
    /// operator's token needs `update` there), so that a request made with
    /// the token after its revocation, which Vault logs with that HMAC and
    /// no accessor, is recognised. ClusterTokenIssuers only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 128),
        regex(pattern = r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
    )]
    pub audit_device: Option<String>,
}

/// A Vault dynamic-secret endpoint.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VaultDynamicSecret {
    /// API path under `/v1/`, e.g. `database/creds/agent`.
    #[schemars(
        length(min = 1, max = 512),
        regex(pattern = r"^[A-Za-z0-9][-A-Za-z0-9_./]*$")
    )]
    pub path: String,
    /// `GET` (default), `POST` or `PUT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(GET|POST|PUT)$"))]
    pub method: Option<String>,
    /// JSON request body (POST/PUT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16384))]
    pub body: Option<String>,
    /// Key of the response's `data` holding the credential (default `token`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub token_field: Option<String>,
}

/// Vault authentication.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VaultAuth {
    /// A Vault token in a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret_ref: Option<SecretKeyRef>,
}

/// A GitHub App.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GithubAppIssuerSpec {
    /// API base URL (default `https://api.github.com`; GitHub Enterprise works the same way).
    #[serde(rename = "apiURL", default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = r"^https?://"))]
    pub api_url: Option<String>,
    /// The App's id.
    #[serde(rename = "appID")]
    pub app_id: i64,
    /// The App's private key (PEM).
    pub private_key_secret_ref: SecretKeyRef,
    /// Installation id. Default: the App's only installation (an App with
    /// several must name one here; an AgentToken never can).
    #[serde(
        rename = "installationID",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub installation_id: Option<i64>,
    /// Time allowed for one HTTP request, connecting included (default 10s,
    /// 1s-60s). A request that times out is retried (3 attempts in all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "timeout_schema")]
    pub timeout: Option<SpecDuration>,
    /// PEM CA bundle to trust (optional; GitHub Enterprise with a private CA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub ca_bundle: Option<String>,
}

/// Any HTTP minting service.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookIssuerSpec {
    /// Mint endpoint.
    #[schemars(length(max = 2048), regex(pattern = r"^https?://"))]
    pub url: String,
    /// HTTP method (default POST).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(POST|PUT|GET)$"))]
    pub method: Option<String>,
    /// JSON request body template. `{{ namespace }}`, `{{ name }}`,
    /// `{{ revision }}`, `{{ lifetimeSeconds }}` and `{{ parameters.KEY }}`
    /// are replaced by JSON strings or numbers; `{{ scopes }}` and
    /// `{{ audiences }}` by JSON arrays. Default: an object with all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16384))]
    pub body: Option<String>,
    /// Secret key whose value is sent as the `Authorization` header (e.g.
    /// `Bearer ...`), on mint and revoke. In the issuer's namespace (the
    /// operator's for a ClusterTokenIssuer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization_secret_ref: Option<SecretKeyRef>,
    /// Where the token and its expiry are in the response.
    pub result: WebhookResult,
    /// Revocation endpoint (optional): POSTed `{"id": ..., "token": ...}`
    /// (`id` from `result.idPath` when set).
    #[serde(rename = "revokeURL", default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = r"^https?://"))]
    pub revoke_url: Option<String>,
    /// RFC 7662 introspection endpoint (optional): POSTed the form
    /// `token=...&token_type_hint=access_token` with the `Authorization`
    /// header; it answers `{"active": true|false}`. A revocation drill asks
    /// it whether the old token is still accepted.
    #[serde(
        rename = "introspectionURL",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(length(max = 2048), regex(pattern = r"^https?://"))]
    pub introspection_url: Option<String>,
    /// Time allowed for one HTTP request, connecting included (default 10s,
    /// 1s-60s). A request that times out is retried (3 attempts in all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "timeout_schema")]
    pub timeout: Option<SpecDuration>,
    /// PEM CA bundle to trust (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub ca_bundle: Option<String>,
}

/// JSONPath expressions into the webhook's response.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[x_kube(
    validation = Rule::new("has(self.expiresInPath) != has(self.expiresAtPath)")
        .message("set exactly one of result.expiresInPath and result.expiresAtPath: the operator needs the token's real expiry")
)]
#[serde(rename_all = "camelCase")]
pub struct WebhookResult {
    /// Path of the token, e.g. `$.access_token`.
    #[schemars(length(min = 1, max = 256))]
    pub token_path: String,
    /// Path of the lifetime in seconds, e.g. `$.expires_in`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub expires_in_path: Option<String>,
    /// Path of the RFC 3339 expiry (instead of `expiresInPath`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub expires_at_path: Option<String>,
    /// Path of a token id the service revokes by (optional, not secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub id_path: Option<String>,
}

/// JWTs signed by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JwtIssuerSpec {
    /// The signing key (PEM, PKCS#8 or PKCS#1): an EC P-256 key signs ES256,
    /// an RSA key RS256, an Ed25519 key EdDSA. Changing the key (or the
    /// Secret's content) rotates the signing key; the previous public keys
    /// stay in the JWKS.
    pub signing_key_secret_ref: SecretKeyRef,
    /// The `iss` claim.
    #[schemars(length(min = 1, max = 1024))]
    pub issuer: String,
    /// ConfigMap (in the issuer's namespace; the operator's for a
    /// ClusterTokenIssuer) where the public keys are published as a JWKS
    /// under key `jwks.json`. Default: `<issuer name>-jwks`.
    #[serde(
        rename = "jwksConfigMap",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub jwks_config_map: Option<String>,
}

/// Guardrails enforced on every mint.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IssuerPolicy {
    /// Longest lifetime a token may have: a longer request is refused, and a
    /// token the issuer grants for longer is revoked at once and never
    /// delivered. Default 24h.
    /// Between 5m and 8760h.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "lifetime_schema")]
    pub max_lifetime: Option<SpecDuration>,
    /// Scopes an AgentToken may ask for (globs, `*` matches any run of
    /// characters; each requested scope is one scope-token, so a glob never
    /// matches a second scope). For the vault kind these are the Vault
    /// policies a child token may carry. Empty: no scope may be asked for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(min = 1, max = 256)))]
    pub allowed_scopes: Vec<String>,
    /// Namespaces served (globs). ClusterTokenIssuer only; empty with no
    /// namespaceSelector: no namespace is served.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024), inner(length(min = 1, max = 63)))]
    pub allowed_namespaces: Vec<String>,
    /// Namespaces served, by label (ClusterTokenIssuer only). With
    /// allowedNamespaces, a namespace must match both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Requests per second to the issuer, never exceeded whatever the load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Audiences an AgentToken may ask for (globs): TokenRequest audiences,
    /// the JWT `aud` claim, the OAuth2 `audience`. Empty: none (the issuer's
    /// default audience only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(min = 1, max = 512)))]
    pub allowed_audiences: Vec<String>,
    /// RFC 8707 resource indicators an AgentToken may ask for with
    /// `parameters.resource` (oauth2; globs). Empty: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(min = 1, max = 512)))]
    pub allowed_resources: Vec<String>,
    /// ServiceAccounts (names in the AgentToken's own namespace, globs) a
    /// serviceAccount issuer mints for. Empty: every ServiceAccount of a
    /// TokenIssuer's namespace; none for a ClusterTokenIssuer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(min = 1, max = 253)))]
    pub allowed_service_accounts: Vec<String>,
    /// Repositories a GitHub token may be limited to (globs). An AgentToken
    /// must name its repositories unless this holds `*`. Empty: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(min = 1, max = 100)))]
    pub allowed_repositories: Vec<String>,
    /// GitHub permissions an AgentToken may ask for, each with the highest
    /// level allowed (`read` < `write` < `admin`), e.g. `{contents: read}`.
    /// An AgentToken must name its permissions. Empty: none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "permissions_schema")]
    pub allowed_permissions: BTreeMap<String, String>,
}

/// The AgentTokens a kill switch covers.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevokeScope {
    /// Namespaces (globs; ClusterTokenIssuer only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024), inner(length(min = 1, max = 63)))]
    pub namespaces: Vec<String>,
    /// Namespaces by label (ClusterTokenIssuer only). Namespace labels are
    /// the cluster admins' to set, so a team cannot step out of this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// AgentTokens by label. Those labels are the namespace admins' to
    /// change: against a team you do not trust, scope by namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// AgentTokens that mint for these ServiceAccounts
    /// (`spec.serviceAccountName`, globs): a compromised ServiceAccount.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(min = 1, max = 253)))]
    pub service_accounts: Vec<String>,
}

/// A token bucket.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    /// Sustained requests per second.
    #[schemars(range(min = 1, max = 10000))]
    pub per_second: u32,
    /// Requests allowed in a burst (default: perSecond).
    #[serde(default)]
    #[schemars(range(min = 0, max = 100000))]
    pub burst: u32,
    /// Revocations ordered now (kill switch, `agenttoken.dev/revoke`, a
    /// stolen copy, a person's drill) go ahead of all other work and spend
    /// this budget, beyond `perSecond`, once the shared one is spent.
    /// Absent: they keep within `perSecond` like every other request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emergency: Option<EmergencyRate>,
}

/// The extra budget a platform allows revocations in an emergency.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EmergencyRate {
    /// Sustained revocations per second beyond the shared budget.
    #[schemars(range(min = 1, max = 10000))]
    pub per_second: u32,
    /// Revocations allowed in a burst (default: perSecond).
    #[serde(default)]
    #[schemars(range(min = 0, max = 100000))]
    pub burst: u32,
}

/// Issuer status.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenIssuerStatus {
    /// `Ready`: configuration and reachability are good.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The `spec.revokeIssuedBefore` the operator announced (an Event on
    /// this issuer) and its AgentTokens act on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoke_issued_before: Option<Time>,
    /// The `spec.revokeScope` announced with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoke_scope: Option<RevokeScope>,
}

/// The three CRDs as one multi-document YAML (what `crds/` holds).
pub fn crds_yaml() -> String {
    let crds = [
        AgentToken::crd(),
        TokenIssuer::crd(),
        ClusterTokenIssuer::crd(),
    ];
    let mut out = String::new();
    for crd in crds {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&crd).expect("a CRD serializes to YAML"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::cel::Validator;
    use serde_json::{Value, json};

    fn schema_of(
        crd: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    ) -> Value {
        serde_json::to_value(
            crd.spec.versions[0]
                .schema
                .as_ref()
                .unwrap()
                .open_api_v3_schema
                .as_ref()
                .unwrap(),
        )
        .unwrap()
    }

    fn check(
        crd: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
        obj: Value,
    ) -> Result<(), String> {
        Validator::new()
            .validate(&schema_of(crd), &obj, None)
            .map_err(|e| e.to_string())
    }

    fn at(spec: Value) -> Value {
        json!({"apiVersion": "agenttoken.dev/v1alpha1", "kind": "AgentToken", "metadata": {"name": "a"}, "spec": spec})
    }

    #[test]
    fn crds_on_disk_match_the_binary() {
        for file in [
            "crds/agenttoken.dev.yaml",
            "charts/agent-token-operator/crds/agenttoken.dev.yaml",
        ] {
            let path = format!("{}/{file}", env!("CARGO_MANIFEST_DIR"));
            let on_disk = std::fs::read_to_string(&path)
                .unwrap_or_else(|_| panic!("{file} exists (make crds)"));
            assert!(
                on_disk == crds_yaml(),
                "{file} differs from `agent-token-operator crd`: run `make crds` and commit"
            );
        }
    }

    #[test]
    fn valid_agent_token_passes_cel() {
        let obj = at(json!({
            "issuerRef": {"kind": "TokenIssuer", "name": "k8s"},
            "serviceAccountName": "builder",
            "lifetime": "1h",
            "rotation": {"renewBefore": "15m"},
            "previousTokenGracePeriod": "10m",
        }));
        check(AgentToken::crd(), obj).unwrap();
    }

    #[test]
    fn renew_before_and_percentage_together_are_rejected() {
        let obj = at(json!({
            "issuerRef": {"name": "k8s"},
            "rotation": {"renewBefore": "15m", "renewBeforePercentage": 20},
        }));
        let err = check(AgentToken::crd(), obj).unwrap_err();
        assert!(err.contains("not both"), "{err}");
    }

    #[test]
    fn renewal_window_longer_than_lifetime_is_rejected() {
        let obj = at(json!({
            "issuerRef": {"name": "k8s"},
            "lifetime": "10m",
            "rotation": {"renewBefore": "1h"},
        }));
        let err = check(AgentToken::crd(), obj).unwrap_err();
        assert!(err.contains("shorter than spec.lifetime"), "{err}");
    }

    #[test]
    fn issuer_timeouts_and_webhook_expiry_are_checked_at_admission() {
        let ti = |spec: Value| json!({"apiVersion": "agenttoken.dev/v1alpha1", "kind": "TokenIssuer", "metadata": {"name": "i"}, "spec": spec});
        let wh = |result: Value, timeout: &str| {
            ti(
                json!({"webhook": {"url": "https://m.example/t", "result": result, "timeout": timeout}}),
            )
        };
        check(
            TokenIssuer::crd(),
            wh(json!({"tokenPath": "$.t", "expiresInPath": "$.e"}), "2s"),
        )
        .unwrap();
        check(
            TokenIssuer::crd(),
            wh(json!({"tokenPath": "$.t", "expiresAtPath": "$.e"}), "60s"),
        )
        .unwrap();
        for t in ["0s", "500ms", "61s", "5m"] {
            let err = check(
                TokenIssuer::crd(),
                wh(json!({"tokenPath": "$.t", "expiresInPath": "$.e"}), t),
            )
            .unwrap_err();
            assert!(err.contains("between 1s and 60s"), "{t}: {err}");
        }
        for result in [
            json!({"tokenPath": "$.t"}),
            json!({"tokenPath": "$.t", "expiresInPath": "$.e", "expiresAtPath": "$.a"}),
        ] {
            let err = check(TokenIssuer::crd(), wh(result, "10s")).unwrap_err();
            assert!(err.contains("exactly one of result.expiresInPath"), "{err}");
        }
    }

    #[test]
    fn issuer_needs_exactly_one_kind() {
        let ti = |spec: Value| json!({"apiVersion": "agenttoken.dev/v1alpha1", "kind": "TokenIssuer", "metadata": {"name": "i"}, "spec": spec});
        check(TokenIssuer::crd(), ti(json!({"serviceAccount": {}}))).unwrap();
        let none = check(TokenIssuer::crd(), ti(json!({}))).unwrap_err();
        assert!(none.contains("exactly one issuer kind"), "{none}");
        let two = check(
            TokenIssuer::crd(),
            ti(json!({"serviceAccount": {}, "jwt": {"signingKeySecretRef": {"name": "k", "key": "k"}, "issuer": "x"}})),
        )
        .unwrap_err();
        assert!(two.contains("exactly one issuer kind"), "{two}");
        let ns = check(
            TokenIssuer::crd(),
            ti(json!({"serviceAccount": {}, "policy": {"allowedNamespaces": ["a"]}})),
        )
        .unwrap_err();
        assert!(ns.contains("ClusterTokenIssuer"), "{ns}");
    }

    #[test]
    fn cluster_issuer_accepts_allowed_namespaces_and_needs_one_kind() {
        let cti = |spec: Value| json!({"apiVersion": "agenttoken.dev/v1alpha1", "kind": "ClusterTokenIssuer", "metadata": {"name": "i"}, "spec": spec});
        check(
            ClusterTokenIssuer::crd(),
            cti(json!({"serviceAccount": {}, "policy": {"allowedNamespaces": ["team-*"]}})),
        )
        .unwrap();
        assert!(check(ClusterTokenIssuer::crd(), cti(json!({}))).is_err());
    }

    #[test]
    fn hostile_agent_tokens_are_refused_at_admission_with_a_reason() {
        // (spec, words the message must contain)
        let rows = [
            (json!({"lifetime": "99999999999999999999h"}), ""),
            (json!({"lifetime": "8761h"}), "between 5m and 8760h"),
            (json!({"lifetime": "0s"}), "between 5m and 8760h"),
            (json!({"lifetime": "30s"}), "between 5m and 8760h"),
            (
                json!({"previousTokenGracePeriod": "9000h"}),
                "at most 8760h",
            ),
            (
                json!({"rotation": {"renewBefore": "0s"}}),
                "between 1s and 8760h",
            ),
            (
                json!({"rotation": {"renewBefore": "99999h"}}),
                "between 1s and 8760h",
            ),
            (
                json!({"secret": {"extraKeys": {"token": "x"}}}),
                "cannot redefine the token key",
            ),
            (
                json!({"secret": {"key": "k", "extraKeys": {"k.previous": "x"}}}),
                "cannot redefine the token key",
            ),
            (
                json!({"secret": {"extraKeys": {"expiresAt": "x"}}}),
                "cannot redefine the token key",
            ),
            (
                json!({"secret": {"extraKeys": {"a/b": "x"}}}),
                "valid Secret keys",
            ),
            (
                json!({"secret": {"labels": {"agenttoken.dev/name": "other"}}}),
                "operator writes those",
            ),
            (
                json!({"secret": {"annotations": {"agenttoken.dev/token-state": "{}"}}}),
                "operator writes those",
            ),
            (
                json!({"secret": {"labels": {"team": "not a label value"}}}),
                "valid label values",
            ),
            (
                json!({"permissions": {"contents": "owner"}}),
                "read, write or admin",
            ),
            (json!({"parameters": {"bad key": "x"}}), "parameter names"),
            (json!({"scopes": ["read:x admin"]}), "one scope-token"),
            (json!({"scopes": ["read:\"x"]}), "one scope-token"),
            (json!({"audiences": ["a b"]}), "no spaces"),
        ];
        for (extra, words) in rows {
            let mut spec = json!({"issuerRef": {"name": "i"}});
            for (k, v) in extra.as_object().unwrap() {
                spec[k] = v.clone();
            }
            let err =
                check(AgentToken::crd(), at(spec.clone())).expect_err(&format!("admitted: {spec}"));
            assert!(err.contains(words), "{spec}: {err}");
        }
        // The same fields within bounds pass.
        check(
            AgentToken::crd(),
            at(json!({
                "issuerRef": {"name": "i"},
                "lifetime": "8760h",
                "rotation": {"renewBefore": "1h"},
                "previousTokenGracePeriod": "0s",
                "permissions": {"contents": "read"},
                "parameters": {"path": "x"},
                "scopes": ["repo:read", "deploy"],
                "audiences": ["https://api.internal"],
                "secret": {"key": "k", "extraKeys": {"authorization": "Bearer {{ token }}", "token": "t"},
                           "labels": {"team.example/owner": "a-b"}, "annotations": {"note": "any text"}},
            })),
        )
        .unwrap();
    }

    #[test]
    fn the_operator_refuses_what_admission_would_have() {
        // Objects admitted before a bound existed: the same rules, in code.
        let spec = |v: Value| -> AgentTokenSpec {
            let mut s = json!({"issuerRef": {"name": "i"}});
            for (k, val) in v.as_object().unwrap() {
                s[k] = val.clone();
            }
            serde_json::from_value(s).unwrap()
        };
        for (v, words) in [
            (
                json!({"lifetime": "99999999999999999999h"}),
                "spec.lifetime",
            ),
            (json!({"lifetime": 5}), "spec.lifetime is not a string"),
            (json!({"lifetime": "1m"}), "at least 5m"),
            (
                json!({"rotation": {"renewBefore": "1e9h"}}),
                "spec.rotation.renewBefore",
            ),
            (json!({"scopes": ["read:x admin"]}), "spec.scopes"),
            (json!({"scopes": vec!["a"; 65]}), "more than 64"),
            (
                json!({"secret": {"extraKeys": {"expiresAt": "x"}}}),
                "cannot redefine",
            ),
            (
                json!({"secret": {"extraKeys": {"a/b": "x"}}}),
                "not a valid Secret key",
            ),
            (
                json!({"secret": {"labels": {"app.kubernetes.io/managed-by": "x"}}}),
                "operator writes it",
            ),
            (
                json!({"permissions": {"contents": "owner"}}),
                "read, write or admin",
            ),
        ] {
            let err = spec(v.clone()).check().expect_err(&format!("accepted {v}"));
            assert!(err.contains(words), "{v}: {err}");
            assert!(err.len() < 300, "a short message: {err}");
        }
        spec(json!({"lifetime": "1h", "scopes": ["read:x"], "secret": {"extraKeys": {"auth": "Bearer {{ token }}"}}}))
            .check()
            .unwrap();
    }

    #[test]
    fn secret_name_and_key_default() {
        let mut at = AgentToken::new(
            "bot",
            AgentTokenSpec::for_issuer(IssuerRef {
                kind: IssuerKind::TokenIssuer,
                name: "k8s".into(),
            }),
        );
        assert_eq!(at.secret_name(), "bot");
        assert_eq!(at.secret_key(), "token");
        at.spec.secret = Some(SecretSpec {
            name: Some("s".into()),
            key: Some("k".into()),
            ..Default::default()
        });
        assert_eq!(at.secret_name(), "s");
        assert_eq!(at.secret_key(), "k");
    }
}

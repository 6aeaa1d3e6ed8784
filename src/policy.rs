//! Issuer policy, pure: each issuer kind turns an AgentToken into the
//! request it really makes (its grant dimensions), and the issuer's policy
//! checks every dimension that grants power, failing closed: a dimension
//! the policy does not allow is refused, and an empty allow-list allows
//! nothing (the one exception: a namespaced TokenIssuer may mint for every
//! ServiceAccount of its own namespace). A violation names the rule.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use crate::rotation::format_duration;

/// An issuer kind, by what it grants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    ServiceAccount,
    OAuth2,
    /// Vault child token: scopes are Vault policies.
    VaultToken,
    /// Vault dynamic secret: the issuer's path decides the grant.
    VaultDynamic,
    GithubApp,
    Webhook,
    Jwt,
}

/// A GitHub permission level, ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Read,
    Write,
    Admin,
}

impl Level {
    pub fn parse(s: &str) -> Option<Level> {
        match s {
            "read" => Some(Level::Read),
            "write" => Some(Level::Write),
            "admin" => Some(Level::Admin),
            _ => None,
        }
    }
}

/// An issuer's guardrails, in plain values.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Policy {
    pub max_lifetime: Option<Duration>,
    /// `max_lifetime` is the operator's default, not the issuer's: it bounds
    /// requests and grants but is not the lifetime asked for by default.
    pub max_is_default: bool,
    /// Globs; empty: no scope may be asked for.
    pub allowed_scopes: Vec<String>,
    /// Globs; only checked for cluster-scoped issuers (a namespaced issuer
    /// serves its own namespace by construction); empty: none.
    pub allowed_namespaces: Vec<String>,
    /// Globs; empty: no audience may be asked for (the issuer's default).
    pub allowed_audiences: Vec<String>,
    /// RFC 8707 resource indicators (globs); empty: none.
    pub allowed_resources: Vec<String>,
    /// ServiceAccount names (globs); empty: all of a namespaced issuer's
    /// namespace, none for a cluster-scoped issuer.
    pub allowed_service_accounts: Vec<String>,
    /// Repository names (globs); `*` also allows asking for no repository
    /// (every repository of the installation); empty: none.
    pub allowed_repositories: Vec<String>,
    /// Permission name -> highest level; empty: none.
    pub allowed_permissions: BTreeMap<String, Level>,
}

/// What an AgentToken asks for.
#[derive(Clone, Debug)]
pub struct Request<'a> {
    pub kind: Kind,
    pub namespace: &'a str,
    pub scopes: &'a [String],
    pub audiences: &'a [String],
    pub service_account: Option<&'a str>,
    pub repositories: &'a [String],
    pub permissions: &'a BTreeMap<String, String>,
    pub parameters: &'a BTreeMap<String, String>,
    pub lifetime: Option<Duration>,
    pub cluster_scoped_issuer: bool,
}

/// What will be asked of the issuer after policy.
#[derive(Clone, Debug, PartialEq)]
pub struct Effective {
    /// Requested lifetime, or the policy's maximum; `None`: the default.
    pub lifetime: Option<Duration>,
    /// The requested scopes, sorted and without duplicates (never widened).
    pub scopes: Vec<String>,
}

/// A refused request, naming the rule it broke.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    NamespaceNotAllowed {
        namespace: String,
        allowed: Vec<String>,
    },
    /// A value of a dimension outside its allow-list (`rule` is the policy
    /// field, `what` the value's name).
    NotAllowed {
        rule: &'static str,
        what: &'static str,
        value: String,
        allowed: Vec<String>,
    },
    /// A dimension that must be named (leaving it out would grant everything).
    Required {
        field: &'static str,
        why: &'static str,
    },
    /// A request field this kind takes from the issuer, never the AgentToken.
    IssuerOnly {
        field: String,
        why: &'static str,
    },
    LifetimeTooLong {
        requested: Duration,
        max: Duration,
    },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |allowed: &[String]| {
            if allowed.is_empty() {
                "the policy allows none".to_string()
            } else {
                format!("allowed: {}", allowed.join(", "))
            }
        };
        match self {
            Violation::NamespaceNotAllowed { namespace, allowed } if allowed.is_empty() => write!(
                f,
                "policy.allowedNamespaces: namespace {namespace:?} is not served: the ClusterTokenIssuer allows no namespace"
            ),
            Violation::NamespaceNotAllowed { namespace, allowed } => write!(
                f,
                "policy.allowedNamespaces: namespace {namespace:?} is not served (allowed: {})",
                allowed.join(", ")
            ),
            Violation::NotAllowed {
                rule,
                what,
                value,
                allowed,
            } => write!(
                f,
                "policy.{rule}: {what} {value:?} is not allowed ({})",
                list(allowed)
            ),
            Violation::Required { field, why } => write!(f, "{field} is required: {why}"),
            Violation::IssuerOnly { field, why } => {
                write!(f, "{field} cannot be set on an AgentToken: {why}")
            }
            Violation::LifetimeTooLong { requested, max } => write!(
                f,
                "policy.maxLifetime: lifetime {} exceeds the issuer's maximum of {}",
                format_duration(*requested),
                format_duration(*max)
            ),
        }
    }
}

fn allow_each(
    rule: &'static str,
    what: &'static str,
    values: &[String],
    allowed: &[String],
) -> Result<(), Violation> {
    match values
        .iter()
        .find(|v| !allowed.iter().any(|g| glob_match(g, v)))
    {
        Some(v) => Err(Violation::NotAllowed {
            rule,
            what,
            value: v.clone(),
            allowed: allowed.to_vec(),
        }),
        None => Ok(()),
    }
}

/// Checks a request against a policy, on every dimension its kind grants.
pub fn check(policy: &Policy, req: &Request<'_>) -> Result<Effective, Violation> {
    if req.cluster_scoped_issuer
        && !policy
            .allowed_namespaces
            .iter()
            .any(|g| glob_match(g, req.namespace))
    {
        return Err(Violation::NamespaceNotAllowed {
            namespace: req.namespace.to_string(),
            allowed: policy.allowed_namespaces.clone(),
        });
    }
    // Scopes: OAuth scopes, Vault policies, the JWT scope claim, the
    // webhook's scopes. Each is one scope-token (no separators: checked at
    // admission and in `AgentTokenSpec::check`), so a glob cannot match a
    // second scope smuggled after a space.
    allow_each("allowedScopes", "scope", req.scopes, &policy.allowed_scopes)?;
    if req.kind == Kind::VaultToken && req.scopes.is_empty() {
        return Err(Violation::Required {
            field: "spec.scopes",
            why: "a Vault child token without policies would inherit every policy of the operator's own token",
        });
    }
    allow_each(
        "allowedAudiences",
        "audience",
        req.audiences,
        &policy.allowed_audiences,
    )?;
    if let Some(resource) = req.parameters.get("resource") {
        allow_each(
            "allowedResources",
            "resource",
            std::slice::from_ref(resource),
            &policy.allowed_resources,
        )?;
    }
    match req.kind {
        Kind::ServiceAccount => {
            let sa = req.service_account.unwrap_or_default();
            let all_of_namespace =
                !req.cluster_scoped_issuer && policy.allowed_service_accounts.is_empty();
            if !all_of_namespace {
                allow_each(
                    "allowedServiceAccounts",
                    "ServiceAccount",
                    &[sa.to_string()],
                    &policy.allowed_service_accounts,
                )?;
            }
        }
        Kind::GithubApp => {
            if let Some(k) = req.parameters.keys().find(|k| *k == "installationID") {
                return Err(Violation::IssuerOnly {
                    field: format!("spec.parameters.{k}"),
                    why: "the installation is the issuer's (githubApp.installationID): an AgentToken must not pick another organisation's",
                });
            }
            if req.repositories.is_empty() {
                if !policy.allowed_repositories.iter().any(|g| g == "*") {
                    return Err(Violation::Required {
                        field: "spec.repositories",
                        why: "without it the token covers every repository of the installation (a policy.allowedRepositories of \"*\" allows that)",
                    });
                }
            } else {
                allow_each(
                    "allowedRepositories",
                    "repository",
                    req.repositories,
                    &policy.allowed_repositories,
                )?;
            }
            if req.permissions.is_empty() {
                return Err(Violation::Required {
                    field: "spec.permissions",
                    why: "without it the token has every permission of the installation",
                });
            }
            for (name, level) in req.permissions {
                let asked = Level::parse(level);
                let max = policy.allowed_permissions.get(name);
                if asked.is_none() || max.is_none_or(|m| asked > Some(*m)) {
                    return Err(Violation::NotAllowed {
                        rule: "allowedPermissions",
                        what: "permission",
                        value: format!("{name}: {level}"),
                        allowed: policy
                            .allowed_permissions
                            .iter()
                            .map(|(k, v)| format!("{k}: {}", format!("{v:?}").to_lowercase()))
                            .collect(),
                    });
                }
            }
        }
        Kind::VaultToken | Kind::VaultDynamic => {
            if let Some(k) = req
                .parameters
                .keys()
                .find(|k| ["path", "method", "body", "tokenField"].contains(&k.as_str()))
            {
                return Err(Violation::IssuerOnly {
                    field: format!("spec.parameters.{k}"),
                    why: "Vault paths, methods and bodies run with the operator's Vault token: they are the issuer's (vault.dynamicSecret)",
                });
            }
            if req.kind == Kind::VaultDynamic && !req.scopes.is_empty() {
                return Err(Violation::IssuerOnly {
                    field: "spec.scopes".into(),
                    why: "the issuer's vault.dynamicSecret decides what a dynamic secret grants",
                });
            }
        }
        Kind::OAuth2 | Kind::Webhook | Kind::Jwt => {}
    }
    let lifetime = match (req.lifetime, policy.max_lifetime) {
        (Some(requested), Some(max)) if requested > max => {
            return Err(Violation::LifetimeTooLong { requested, max });
        }
        (Some(requested), _) => Some(requested),
        (None, _) if policy.max_is_default => None,
        (None, max) => max,
    };
    let mut scopes = req.scopes.to_vec();
    scopes.sort();
    scopes.dedup();
    Ok(Effective { lifetime, scopes })
}

/// Whether a grant is over the policy's maximum lifetime (a minute of
/// slack for clocks and rounding): such a token is revoked at once.
pub fn grant_too_long(policy: &Policy, granted: Duration) -> Option<Duration> {
    let max = policy.max_lifetime?;
    (granted > max + Duration::from_secs(60)).then_some(max)
}

/// `*` matches any run of characters (also empty), `?` exactly one.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn globs() {
        assert!(glob_match("repo:*", "repo:read"));
        assert!(glob_match("team-*", "team-a"));
        assert!(!glob_match("team-*", "other"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("deploy", "deploy2"));
        assert!(glob_match("*:*:x", "a:b:c:x"));
    }

    #[derive(Default)]
    struct Ask {
        scopes: Vec<String>,
        audiences: Vec<String>,
        sa: Option<String>,
        repos: Vec<String>,
        perms: BTreeMap<String, String>,
        params: BTreeMap<String, String>,
        cluster: bool,
    }

    fn run(kind: Kind, p: &Policy, a: &Ask) -> Result<Effective, String> {
        check(
            p,
            &Request {
                kind,
                namespace: "team-a",
                scopes: &a.scopes,
                audiences: &a.audiences,
                service_account: a.sa.as_deref(),
                repositories: &a.repos,
                permissions: &a.perms,
                parameters: &a.params,
                lifetime: None,
                cluster_scoped_issuer: a.cluster,
            },
        )
        .map_err(|v| v.to_string())
    }

    fn perms(v: &[(&str, &str)]) -> BTreeMap<String, String> {
        v.iter()
            .map(|(k, l)| (k.to_string(), l.to_string()))
            .collect()
    }

    #[test]
    fn every_grant_dimension_fails_closed() {
        let all_ns = Policy {
            allowed_namespaces: s(&["*"]),
            ..Default::default()
        };
        let github = Policy {
            allowed_repositories: s(&["infra", "app-*"]),
            allowed_permissions: [
                ("contents".to_string(), Level::Read),
                ("pull_requests".to_string(), Level::Write),
            ]
            .into(),
            ..all_ns.clone()
        };
        // (what, kind, policy, request, Ok or the words of the refusal)
        type Row<'a> = (&'a str, Kind, Policy, Ask, Result<(), &'a str>);
        let rows: Vec<Row> = vec![
            (
                "scopes with no allowedScopes",
                Kind::OAuth2,
                all_ns.clone(),
                Ask {
                    scopes: s(&["read"]),
                    ..Default::default()
                },
                Err("policy.allowedScopes: scope \"read\" is not allowed (the policy allows none)"),
            ),
            (
                "scope outside the globs",
                Kind::Jwt,
                Policy {
                    allowed_scopes: s(&["read:*"]),
                    ..all_ns.clone()
                },
                Ask {
                    scopes: s(&["admin"]),
                    ..Default::default()
                },
                Err("scope \"admin\""),
            ),
            (
                "scope inside the globs",
                Kind::Jwt,
                Policy {
                    allowed_scopes: s(&["read:*"]),
                    ..all_ns.clone()
                },
                Ask {
                    scopes: s(&["read:x"]),
                    ..Default::default()
                },
                Ok(()),
            ),
            (
                "vault child token without policies",
                Kind::VaultToken,
                all_ns.clone(),
                Ask::default(),
                Err("would inherit every policy"),
            ),
            (
                "vault path from the AgentToken",
                Kind::VaultToken,
                Policy {
                    allowed_scopes: s(&["*"]),
                    ..all_ns.clone()
                },
                Ask {
                    scopes: s(&["p"]),
                    params: perms(&[("path", "sys/policies/acl/x")]),
                    ..Default::default()
                },
                Err("spec.parameters.path cannot be set"),
            ),
            (
                "vault dynamic with scopes",
                Kind::VaultDynamic,
                Policy {
                    allowed_scopes: s(&["*"]),
                    ..all_ns.clone()
                },
                Ask {
                    scopes: s(&["p"]),
                    ..Default::default()
                },
                Err("spec.scopes cannot be set"),
            ),
            (
                "vault dynamic from the issuer",
                Kind::VaultDynamic,
                all_ns.clone(),
                Ask::default(),
                Ok(()),
            ),
            (
                "audience with no allowedAudiences",
                Kind::Jwt,
                all_ns.clone(),
                Ask {
                    audiences: s(&["https://other-team"]),
                    ..Default::default()
                },
                Err("policy.allowedAudiences"),
            ),
            (
                "audience allowed",
                Kind::ServiceAccount,
                Policy {
                    allowed_audiences: s(&["https://api.*"]),
                    ..Default::default()
                },
                Ask {
                    audiences: s(&["https://api.internal"]),
                    sa: Some("bot".into()),
                    ..Default::default()
                },
                Ok(()),
            ),
            (
                "resource not allowed",
                Kind::OAuth2,
                all_ns.clone(),
                Ask {
                    params: perms(&[("resource", "https://payroll")]),
                    ..Default::default()
                },
                Err("policy.allowedResources"),
            ),
            (
                "any ServiceAccount of a namespaced issuer's namespace",
                Kind::ServiceAccount,
                Policy::default(),
                Ask {
                    sa: Some("admin".into()),
                    ..Default::default()
                },
                Ok(()),
            ),
            (
                "cluster issuer without allowedServiceAccounts",
                Kind::ServiceAccount,
                all_ns.clone(),
                Ask {
                    sa: Some("builder".into()),
                    cluster: true,
                    ..Default::default()
                },
                Err(
                    "policy.allowedServiceAccounts: ServiceAccount \"builder\" is not allowed (the policy allows none)",
                ),
            ),
            (
                "namespaced issuer narrowing its ServiceAccounts",
                Kind::ServiceAccount,
                Policy {
                    allowed_service_accounts: s(&["ci-*"]),
                    ..Default::default()
                },
                Ask {
                    sa: Some("admin".into()),
                    ..Default::default()
                },
                Err("ServiceAccount \"admin\""),
            ),
            (
                "github without permissions",
                Kind::GithubApp,
                github.clone(),
                Ask {
                    repos: s(&["infra"]),
                    ..Default::default()
                },
                Err("spec.permissions is required"),
            ),
            (
                "github without repositories",
                Kind::GithubApp,
                github.clone(),
                Ask {
                    perms: perms(&[("contents", "read")]),
                    ..Default::default()
                },
                Err("spec.repositories is required"),
            ),
            (
                "github all repositories when the policy says *",
                Kind::GithubApp,
                Policy {
                    allowed_repositories: s(&["*"]),
                    ..github.clone()
                },
                Ask {
                    perms: perms(&[("contents", "read")]),
                    ..Default::default()
                },
                Ok(()),
            ),
            (
                "github level over the maximum",
                Kind::GithubApp,
                github.clone(),
                Ask {
                    repos: s(&["infra"]),
                    perms: perms(&[("contents", "write")]),
                    ..Default::default()
                },
                Err("permission \"contents: write\""),
            ),
            (
                "github permission not listed",
                Kind::GithubApp,
                github.clone(),
                Ask {
                    repos: s(&["infra"]),
                    perms: perms(&[("administration", "read")]),
                    ..Default::default()
                },
                Err("allowedPermissions"),
            ),
            (
                "github repository not listed",
                Kind::GithubApp,
                github.clone(),
                Ask {
                    repos: s(&["payroll"]),
                    perms: perms(&[("contents", "read")]),
                    ..Default::default()
                },
                Err("repository \"payroll\""),
            ),
            (
                "github installation from the AgentToken",
                Kind::GithubApp,
                github.clone(),
                Ask {
                    repos: s(&["infra"]),
                    perms: perms(&[("contents", "read")]),
                    params: perms(&[("installationID", "7")]),
                    ..Default::default()
                },
                Err("installationID cannot be set"),
            ),
            (
                "github within every bound",
                Kind::GithubApp,
                github.clone(),
                Ask {
                    repos: s(&["infra", "app-web"]),
                    perms: perms(&[("contents", "read"), ("pull_requests", "read")]),
                    ..Default::default()
                },
                Ok(()),
            ),
        ];
        for (what, kind, policy, ask, want) in rows {
            let got = run(kind, &policy, &ask);
            match (want, got) {
                (Ok(()), Ok(_)) => {}
                (Err(words), Err(msg)) => assert!(msg.contains(words), "{what}: {msg}"),
                (want, got) => panic!("{what}: wanted {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn lifetime_over_max_is_refused_and_default_is_the_max() {
        let p = Policy {
            max_lifetime: Some(Duration::from_secs(3600)),
            ..Default::default()
        };
        let none = BTreeMap::new();
        let r = Request {
            kind: Kind::ServiceAccount,
            namespace: "a",
            scopes: &[],
            audiences: &[],
            service_account: Some("bot"),
            repositories: &[],
            permissions: &none,
            parameters: &none,
            lifetime: Some(Duration::from_secs(7200)),
            cluster_scoped_issuer: false,
        };
        assert_eq!(
            check(&p, &r).unwrap_err().to_string(),
            "policy.maxLifetime: lifetime 2h exceeds the issuer's maximum of 1h"
        );
        let r = Request {
            lifetime: None,
            ..r
        };
        assert_eq!(
            check(&p, &r).unwrap().lifetime,
            Some(Duration::from_secs(3600))
        );
        assert_eq!(grant_too_long(&p, Duration::from_secs(3660)), None);
        assert_eq!(
            grant_too_long(&p, Duration::from_secs(768 * 3600)),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(grant_too_long(&Policy::default(), Duration::MAX), None);
        // The operator's default maximum bounds, but is not asked for.
        let d = Policy {
            max_lifetime: Some(Duration::from_secs(86_400)),
            max_is_default: true,
            ..Default::default()
        };
        assert_eq!(check(&d, &r).unwrap().lifetime, None);
        let long = Request {
            lifetime: Some(Duration::from_secs(2 * 86_400)),
            ..r
        };
        assert!(
            check(&d, &long)
                .unwrap_err()
                .to_string()
                .contains("maximum of 24h")
        );
    }

    #[test]
    fn cluster_issuer_serves_only_allowed_namespaces() {
        let p = Policy {
            allowed_namespaces: s(&["team-*"]),
            ..Default::default()
        };
        let none = BTreeMap::new();
        let ok = Request {
            kind: Kind::Webhook,
            namespace: "team-a",
            scopes: &[],
            audiences: &[],
            service_account: None,
            repositories: &[],
            permissions: &none,
            parameters: &none,
            lifetime: None,
            cluster_scoped_issuer: true,
        };
        assert!(check(&p, &ok).is_ok());
        let bad = Request {
            namespace: "kube-system",
            ..ok.clone()
        };
        assert!(
            check(&p, &bad)
                .unwrap_err()
                .to_string()
                .starts_with("policy.allowedNamespaces")
        );
        // A namespaced issuer ignores allowedNamespaces.
        let local = Request {
            cluster_scoped_issuer: false,
            ..bad
        };
        assert!(check(&Policy::default(), &local).is_ok());
        // A cluster issuer with no allowed namespaces serves none.
        assert!(
            check(
                &Policy::default(),
                &Request {
                    cluster_scoped_issuer: true,
                    ..local
                }
            )
            .is_err()
        );
    }

    #[test]
    fn effective_scopes_are_never_widened() {
        let p = Policy {
            allowed_scopes: s(&["repo:*"]),
            ..Default::default()
        };
        let scopes = s(&["repo:read", "repo:read"]);
        let none = BTreeMap::new();
        let r = Request {
            kind: Kind::OAuth2,
            namespace: "a",
            scopes: &scopes,
            audiences: &[],
            service_account: None,
            repositories: &[],
            permissions: &none,
            parameters: &none,
            lifetime: None,
            cluster_scoped_issuer: false,
        };
        assert_eq!(check(&p, &r).unwrap().scopes, s(&["repo:read"]));
    }
}

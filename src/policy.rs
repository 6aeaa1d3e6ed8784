//! Issuer policy, pure: which namespaces an issuer serves, which scopes and
//! how long a lifetime an AgentToken may ask for. A violation names the rule.

use std::fmt;
use std::time::Duration;

use crate::rotation::format_duration;

/// An issuer's guardrails, in plain values.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Policy {
    pub max_lifetime: Option<Duration>,
    /// Globs; empty: any scope.
    pub allowed_scopes: Vec<String>,
    /// Globs; only checked for cluster-scoped issuers (a namespaced issuer
    /// serves its own namespace by construction).
    pub allowed_namespaces: Vec<String>,
}

/// What an AgentToken asks for.
#[derive(Clone, Debug)]
pub struct Request<'a> {
    pub namespace: &'a str,
    pub scopes: &'a [String],
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
    ScopeNotAllowed {
        scope: String,
        allowed: Vec<String>,
    },
    LifetimeTooLong {
        requested: Duration,
        max: Duration,
    },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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
            Violation::ScopeNotAllowed { scope, allowed } => write!(
                f,
                "policy.allowedScopes: scope {scope:?} is not allowed (allowed: {})",
                allowed.join(", ")
            ),
            Violation::LifetimeTooLong { requested, max } => write!(
                f,
                "policy.maxLifetime: lifetime {} exceeds the issuer's maximum of {}",
                format_duration(*requested),
                format_duration(*max)
            ),
        }
    }
}

/// Checks a request against a policy.
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
    if !policy.allowed_scopes.is_empty()
        && let Some(scope) = req
            .scopes
            .iter()
            .find(|s| !policy.allowed_scopes.iter().any(|g| glob_match(g, s)))
    {
        return Err(Violation::ScopeNotAllowed {
            scope: scope.clone(),
            allowed: policy.allowed_scopes.clone(),
        });
    }
    let lifetime = match (req.lifetime, policy.max_lifetime) {
        (Some(requested), Some(max)) if requested > max => {
            return Err(Violation::LifetimeTooLong { requested, max });
        }
        (Some(requested), _) => Some(requested),
        (None, max) => max,
    };
    let mut scopes = req.scopes.to_vec();
    scopes.sort();
    scopes.dedup();
    Ok(Effective { lifetime, scopes })
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

    #[test]
    fn scope_outside_policy_is_refused_and_named() {
        let p = Policy {
            allowed_scopes: s(&["repo:*", "deploy"]),
            ..Default::default()
        };
        let scopes = s(&["deploy", "admin"]);
        let r = Request {
            namespace: "a",
            scopes: &scopes,
            lifetime: None,
            cluster_scoped_issuer: false,
        };
        let v = check(&p, &r).unwrap_err();
        assert_eq!(
            v.to_string(),
            "policy.allowedScopes: scope \"admin\" is not allowed (allowed: repo:*, deploy)"
        );
    }

    #[test]
    fn lifetime_over_max_is_refused_and_default_is_the_max() {
        let p = Policy {
            max_lifetime: Some(Duration::from_secs(3600)),
            ..Default::default()
        };
        let r = Request {
            namespace: "a",
            scopes: &[],
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
    }

    #[test]
    fn cluster_issuer_serves_only_allowed_namespaces() {
        let p = Policy {
            allowed_namespaces: s(&["team-*"]),
            ..Default::default()
        };
        let ok = Request {
            namespace: "team-a",
            scopes: &[],
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
        let r = Request {
            namespace: "a",
            scopes: &scopes,
            lifetime: None,
            cluster_scoped_issuer: false,
        };
        assert_eq!(check(&p, &r).unwrap().scopes, s(&["repo:read"]));
    }
}

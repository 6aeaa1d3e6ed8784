//! Every reason the operator gives about an AgentToken, as one closed set:
//! condition reasons (`Ready`, `Issuing`) and Event reasons. `as_str` is
//! the contract (API.md, the README's troubleshooting table); a reason can
//! never be misspelled at a call site.

/// A condition or Event reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    // Ready
    TokenValid,
    TokenExpired,
    Paused,
    RotationFailed,
    IssuerNotFound,
    IssuerNotReady,
    InvalidSpec,
    PolicyViolation,
    NamespaceNotServed,
    SecretNotOwned,
    // Issuing
    IssuerUnavailable,
    MintFailed,
    BackingOff,
    Throttled,
    Idle,
    // Events only
    TokenIssued,
    TokenRotated,
    TokenRevoked,
    RevocationFailed,
    WorkloadRestarted,
    RolloutTimedOut,
    WorkloadSignalFailed,
    ConsumersUnknown,
    // UnexpectedSource (condition and Event)
    UnexpectedSource,
    SourcesExpected,
    // Unused (condition and Event)
    Unused,
    InUse,
    // UsedAfterRevocation (condition and Event)
    UsedAfterRevocation,
    NotUsedAfterRevocation,
    // The issuer's kill switch and suspension (Issuing condition, Events)
    IssuerSuspended,
    KillSwitch,
    // Revocation drills (Events)
    DrillPassed,
    DrillFailed,
}

impl Reason {
    /// Every reason, for documentation checks.
    pub const ALL: [Reason; 33] = [
        Reason::TokenValid,
        Reason::TokenExpired,
        Reason::Paused,
        Reason::RotationFailed,
        Reason::IssuerNotFound,
        Reason::IssuerNotReady,
        Reason::InvalidSpec,
        Reason::PolicyViolation,
        Reason::NamespaceNotServed,
        Reason::SecretNotOwned,
        Reason::IssuerUnavailable,
        Reason::MintFailed,
        Reason::BackingOff,
        Reason::Throttled,
        Reason::Idle,
        Reason::TokenIssued,
        Reason::TokenRotated,
        Reason::TokenRevoked,
        Reason::RevocationFailed,
        Reason::WorkloadRestarted,
        Reason::RolloutTimedOut,
        Reason::WorkloadSignalFailed,
        Reason::ConsumersUnknown,
        Reason::UnexpectedSource,
        Reason::SourcesExpected,
        Reason::Unused,
        Reason::InUse,
        Reason::UsedAfterRevocation,
        Reason::NotUsedAfterRevocation,
        Reason::IssuerSuspended,
        Reason::KillSwitch,
        Reason::DrillPassed,
        Reason::DrillFailed,
    ];

    /// The reason as it appears in conditions and Events.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::TokenValid => "TokenValid",
            Reason::TokenExpired => "TokenExpired",
            Reason::Paused => "Paused",
            Reason::RotationFailed => "RotationFailed",
            Reason::IssuerNotFound => "IssuerNotFound",
            Reason::IssuerNotReady => "IssuerNotReady",
            Reason::InvalidSpec => "InvalidSpec",
            Reason::PolicyViolation => "PolicyViolation",
            Reason::NamespaceNotServed => "NamespaceNotServed",
            Reason::SecretNotOwned => "SecretNotOwned",
            Reason::IssuerUnavailable => "IssuerUnavailable",
            Reason::MintFailed => "MintFailed",
            Reason::BackingOff => "BackingOff",
            Reason::Throttled => "Throttled",
            Reason::Idle => "Idle",
            Reason::TokenIssued => "TokenIssued",
            Reason::TokenRotated => "TokenRotated",
            Reason::TokenRevoked => "TokenRevoked",
            Reason::RevocationFailed => "RevocationFailed",
            Reason::WorkloadRestarted => "WorkloadRestarted",
            Reason::RolloutTimedOut => "RolloutTimedOut",
            Reason::WorkloadSignalFailed => "WorkloadSignalFailed",
            Reason::ConsumersUnknown => "ConsumersUnknown",
            Reason::UnexpectedSource => "UnexpectedSource",
            Reason::SourcesExpected => "SourcesExpected",
            Reason::Unused => "Unused",
            Reason::InUse => "InUse",
            Reason::UsedAfterRevocation => "UsedAfterRevocation",
            Reason::NotUsedAfterRevocation => "NotUsedAfterRevocation",
            Reason::IssuerSuspended => "IssuerSuspended",
            Reason::KillSwitch => "KillSwitch",
            Reason::DrillPassed => "DrillPassed",
            Reason::DrillFailed => "DrillFailed",
        }
    }
}

impl AsRef<str> for Reason {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_is_documented_in_the_readme() {
        let readme = include_str!("../../README.md");
        for r in Reason::ALL {
            assert!(
                readme.contains(&format!("`{}`", r.as_str())),
                "README.md does not document reason {r}"
            );
        }
        let mut names: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Reason::ALL.len(), "a reason is listed twice");
    }
}

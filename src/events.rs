//! Kubernetes Events (`events.k8s.io/v1`), one create per call.
//!
//! kube's own recorder keeps every event it sent for six minutes to fold
//! repeats into a series, scanning that cache on each call: with thousands
//! of AgentTokens that is megabytes held and quadratic work, and a series
//! keeps only its first note. Each event here stands alone, so every note
//! (the new revision, the workload restarted) is visible.

use jiff::Timestamp;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Client;
use kube::api::{Api, PostParams};
use kube::runtime::events::{Event, EventType, Reporter};

/// Longest note the API server accepts (1 KiB).
const MAX_NOTE: usize = 1024;

/// Publishes events as the operator's reporting controller and instance.
#[derive(Clone)]
pub struct Recorder {
    client: Client,
    reporter: Reporter,
}

impl Recorder {
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Recorder { client, reporter }
    }

    /// Creates one Event about `regarding` in its namespace.
    pub async fn publish(
        &self,
        ev: &Event,
        regarding: &ObjectReference,
    ) -> Result<(), kube::Error> {
        let namespace = regarding
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let event = build(&self.reporter, ev, regarding, Timestamp::now());
        Api::<K8sEvent>::namespaced(self.client.clone(), &namespace)
            .create(&PostParams::default(), &event)
            .await
            .map(|_| ())
    }
}

fn build(reporter: &Reporter, ev: &Event, regarding: &ObjectReference, now: Timestamp) -> K8sEvent {
    let base = regarding
        .name
        .clone()
        .unwrap_or_else(|| reporter.controller.clone());
    // Room for the suffix within a name's 253 characters.
    let base: String = base.chars().take(220).collect();
    // Nanoseconds plus a random part: two events in one nanosecond (two
    // replicas, or two tasks) still get distinct names.
    let name = format!(
        "{base}.{:x}{:04x}",
        now.as_nanosecond(),
        rand::random::<u16>()
    );
    let note = ev.note.as_ref().map(|n| {
        let mut end = n.len().min(MAX_NOTE);
        while !n.is_char_boundary(end) {
            end -= 1;
        }
        n[..end].to_string()
    });
    K8sEvent {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: regarding.namespace.clone(),
            ..Default::default()
        },
        action: Some(ev.action.clone()),
        reason: Some(ev.reason.clone()),
        note,
        event_time: Some(MicroTime(now)),
        regarding: Some(regarding.clone()),
        related: ev.secondary.clone(),
        reporting_controller: Some(reporter.controller.clone()),
        reporting_instance: Some(
            reporter
                .instance
                .clone()
                .unwrap_or_else(|| reporter.controller.clone()),
        ),
        type_: Some(
            match ev.type_ {
                EventType::Normal => "Normal",
                EventType::Warning => "Warning",
            }
            .into(),
        ),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_event_stands_alone_with_its_note() {
        let reporter = Reporter {
            controller: "agent-token-operator".into(),
            instance: Some("pod-1".into()),
        };
        let at = ObjectReference {
            kind: Some("AgentToken".into()),
            name: Some("bot".into()),
            namespace: Some("team-a".into()),
            ..Default::default()
        };
        let ev = |note: &str| Event {
            type_: EventType::Normal,
            reason: "TokenRotated".into(),
            note: Some(note.into()),
            action: "Rotate".into(),
            secondary: None,
        };
        let now = Timestamp::now();
        let a = build(&reporter, &ev("revision 2"), &at, now);
        let b = build(&reporter, &ev("revision 3"), &at, now);
        assert_ne!(a.metadata.name, b.metadata.name);
        assert!(a.metadata.name.as_deref().unwrap().starts_with("bot."));
        assert_eq!(a.note.as_deref(), Some("revision 2"));
        assert_eq!(b.note.as_deref(), Some("revision 3"));
        assert_eq!(a.series, None);
        assert_eq!(a.reporting_instance.as_deref(), Some("pod-1"));
        assert_eq!(a.metadata.namespace.as_deref(), Some("team-a"));
        let long = build(&reporter, &ev(&"é".repeat(800)), &at, now);
        assert!(long.note.unwrap().len() <= MAX_NOTE);
    }
}

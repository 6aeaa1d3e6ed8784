//! The leader Lease loop (`agent_token_operator::leadership`) against the
//! real API server: two electors in one process, so both are judged on
//! one clock. A leader that goes silent keeps its claim only until its
//! time left runs out, and the standby takes over only after that.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use tokio::time::Instant;

use agent_token_operator::leadership::{Leadership, LeaseConfig};

use crate::support::{TestNamespace, eventually};

const LEASE: Duration = Duration::from_secs(6);

fn config(ns: &TestNamespace, identity: &str) -> LeaseConfig {
    LeaseConfig {
        namespace: ns.name.clone(),
        name: "leader".into(),
        identity: identity.into(),
        duration: LEASE,
    }
}

async fn holder(ns: &TestNamespace) -> (String, i32) {
    let lease = ns.api::<Lease>().get("leader").await.expect("the Lease");
    let spec = lease.spec.unwrap_or_default();
    (
        spec.holder_identity.unwrap_or_default(),
        spec.lease_transitions.unwrap_or(0),
    )
}

/// Samples both replicas every 10 ms for `span` (or until `until` holds),
/// failing at once if both may act as leader at the same moment.
async fn never_both(
    a: &Leadership,
    b: &Leadership,
    span: Duration,
    mut until: impl FnMut(bool, bool) -> bool,
) -> Vec<(Instant, bool, bool)> {
    let end = Instant::now() + span;
    let mut samples = Vec::new();
    while Instant::now() < end {
        let (x, y) = (a.is_leader(), b.is_leader());
        assert!(!(x && y), "two replicas may act as leader at once");
        samples.push((Instant::now(), x, y));
        if until(x, y) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    samples
}

#[tokio::test]
async fn leader_lease_a_silent_leader_is_replaced_only_after_its_time_left_ran_out() {
    let ns = TestNamespace::new("lease-silent").await;
    let (a, elector) = Leadership::elect(ns.client.clone(), config(&ns, "replica-a"))
        .await
        .expect("elect a");
    let a_task = tokio::spawn(elector.run(std::future::pending()));
    tokio::time::timeout(Duration::from_secs(20), a.elected())
        .await
        .expect("replica-a leads");
    let (b, elector) = Leadership::elect(ns.client.clone(), config(&ns, "replica-b"))
        .await
        .expect("elect b");
    let _b_task = tokio::spawn(elector.run(std::future::pending()));

    // Longer than the Lease: a renews, b waits, never both.
    let samples = never_both(&a, &b, LEASE + Duration::from_secs(3), |_, _| false).await;
    assert!(
        samples.iter().all(|&(_, x, y)| x && !y),
        "replica-a kept the Lease by renewing it; replica-b stood by"
    );
    assert!(
        a.time_left().unwrap() > LEASE / 3,
        "renewals keep the time left up: {:?}",
        a.time_left()
    );
    assert_eq!(holder(&ns).await.0, "replica-a");

    // replica-a goes silent: no renewal, no release (a frozen process, or
    // one cut off from the API server). Its claim runs out on its own.
    a_task.abort();
    let silenced = Instant::now();
    let samples = never_both(&a, &b, Duration::from_secs(30), |_, y| y).await;
    let a_end = samples
        .iter()
        .find(|s| !s.1)
        .map(|s| s.0)
        .expect("replica-a's claim ran out");
    let b_start = samples
        .iter()
        .find(|s| s.2)
        .map(|s| s.0)
        .expect("replica-b took over within 30 s");
    eprintln!(
        "a's claim ended {:?} after it went silent; b led {:?} after that",
        a_end - silenced,
        b_start - a_end
    );
    assert!(
        a_end - silenced <= LEASE,
        "a silent leader stops counting on its claim within one Lease duration"
    );
    // b takes over no earlier than a full duration after a's last renewal
    // was stored, a's claim ends the safety margin (2 s) before that.
    assert!(
        b_start - a_end >= Duration::from_secs(1),
        "the standby waits past the silent leader's time left by the margin"
    );
    let (who, transitions) = holder(&ns).await;
    assert_eq!(who, "replica-b");
    assert_eq!(transitions, 2, "a took it, then b");
}

#[tokio::test]
async fn leader_lease_given_up_on_stop_is_taken_at_once() {
    let ns = TestNamespace::new("lease-release").await;
    let (a, elector) = Leadership::elect(ns.client.clone(), config(&ns, "replica-a"))
        .await
        .expect("elect a");
    let (stop_a, stopped) = tokio::sync::oneshot::channel::<()>();
    let a_task = tokio::spawn(elector.run(async move {
        let _ = stopped.await;
    }));
    tokio::time::timeout(Duration::from_secs(20), a.elected())
        .await
        .expect("replica-a leads");
    let (b, elector) = Leadership::elect(ns.client.clone(), config(&ns, "replica-b"))
        .await
        .expect("elect b");
    let _b_task = tokio::spawn(elector.run(std::future::pending()));
    never_both(&a, &b, Duration::from_secs(2), |_, _| false).await;

    let stopped_at = Instant::now();
    let _ = stop_a.send(());
    a_task.await.expect("the elector ends after releasing");
    assert!(!a.is_leader(), "a stopped elector leads no more");
    assert_eq!(holder(&ns).await.0, "", "the Lease was given up");
    let samples = never_both(&a, &b, Duration::from_secs(20), |_, y| y).await;
    let took = samples
        .last()
        .filter(|s| s.2)
        .expect("replica-b took over")
        .0;
    assert!(
        took - stopped_at < LEASE,
        "a released Lease is taken without waiting it out: {:?}",
        took - stopped_at
    );
    eventually(Duration::from_secs(5), "replica-b in the Lease", || async {
        (holder(&ns).await.0 == "replica-b").then_some(())
    })
    .await;
}

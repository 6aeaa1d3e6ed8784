//! The issuer kill switch (issue 21): `spec.revokeIssuedBefore` on the
//! serviceAccount issuer of 1,000 AgentTokens, measured from the patch to
//! (a) every old token revoked in the ledger, (b) the API server refusing
//! the last of them (a TokenReview per token, first asked once its ledger
//! says revoked, so no review warms the API server's cache before), and
//! (c) every AgentToken holding a new token.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

use agent_token_operator::crd::{AgentToken, RotationReason, TokenIssuer, TokenLife};

use crate::{Bench, FirstToken, pct, review, secret_token, sorted};

impl Bench {
    pub async fn killswitch(&mut self, ft: &FirstToken) {
        let ns = &ft.ns;
        let ats: Api<AgentToken> = Api::namespaced(self.client.clone(), ns);
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        // Every token now, and the revision that holds it.
        let mut old: HashMap<String, (i64, String)> = HashMap::new();
        for at in ats.list(&ListParams::default()).await.unwrap() {
            let name = kube::ResourceExt::name_any(&at);
            let revision = at.status.as_ref().map_or(0, |s| s.revision);
            if let Some(token) = secrets
                .get(&name)
                .await
                .ok()
                .as_ref()
                .and_then(secret_token)
            {
                old.insert(name, (revision, token));
            }
        }
        let n = old.len();
        let revoked: Arc<Mutex<HashMap<String, Duration>>> = Arc::default();
        let replaced: Arc<Mutex<HashMap<String, Duration>>> = Arc::default();
        let t0 = Instant::now();
        let before = jiff::Timestamp::from_second(jiff::Timestamp::now().as_second() + 1).unwrap();
        Api::<TokenIssuer>::namespaced(self.client.clone(), ns)
            .patch(
                "issuer",
                &PatchParams::default(),
                &Patch::Merge(&json!({"spec": {"revokeIssuedBefore": before.to_string()}})),
            )
            .await
            .expect("the kill switch");
        // The ledger's progress, from a watch.
        let watch = {
            let (old, revoked, replaced) = (old.clone(), revoked.clone(), replaced.clone());
            let ats = ats.clone();
            tokio::spawn(async move {
                let mut stream = watcher(ats, watcher::Config::default())
                    .applied_objects()
                    .boxed();
                while let Some(Ok(at)) = stream.next().await {
                    let name = kube::ResourceExt::name_any(&at);
                    let (Some((rev, _)), Some(st)) = (old.get(&name), at.status.as_ref()) else {
                        continue;
                    };
                    if st
                        .history
                        .iter()
                        .any(|e| e.revision == *rev && e.state == Some(TokenLife::Revoked))
                    {
                        revoked
                            .lock()
                            .unwrap()
                            .entry(name.clone())
                            .or_insert(t0.elapsed());
                    }
                    if st.revision > *rev
                        && st.last_rotation_reason == Some(RotationReason::KillSwitch)
                        && st
                            .history
                            .iter()
                            .any(|e| e.revision == st.revision && e.state == Some(TokenLife::Live))
                    {
                        replaced.lock().unwrap().entry(name).or_insert(t0.elapsed());
                    }
                    if revoked.lock().unwrap().len() == old.len()
                        && replaced.lock().unwrap().len() == old.len()
                    {
                        return;
                    }
                }
            })
        };
        // The API server's view: each old token reviewed once the ledger
        // says it is revoked, until refused (16 reviews in flight).
        let mut refused: HashMap<String, Duration> = HashMap::new();
        let deadline = t0 + Duration::from_secs(600);
        while refused.len() < n && Instant::now() < deadline {
            let due: Vec<String> = revoked
                .lock()
                .unwrap()
                .keys()
                .filter(|k| !refused.contains_key(*k))
                .cloned()
                .collect();
            let checks = futures::stream::iter(due.into_iter().map(|name| {
                let client = self.client.clone();
                let token = old[&name].1.clone();
                // The time of this answer, not of the batch's last one.
                async move {
                    let accepted = review(&client, &token).await;
                    (name, accepted, t0.elapsed())
                }
            }))
            .buffer_unordered(16)
            .collect::<Vec<_>>()
            .await;
            for (name, accepted, at) in checks {
                if !accepted {
                    refused.insert(name, at);
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(600), watch).await;
        let secs =
            |m: &HashMap<String, Duration>| sorted(m.values().map(|d| d.as_secs_f64()).collect());
        let (r, f, p) = (
            secs(&revoked.lock().unwrap()),
            secs(&refused),
            secs(&replaced.lock().unwrap()),
        );
        let last = |v: &[f64]| v.last().copied().unwrap_or(f64::NAN);
        self.report.line(format!(
            "| serviceAccount | {n} | {}/{} | {:.2} | {:.2} | {}/{} | {:.2} | {:.2} | {}/{} | {:.2} | {:.2} |",
            r.len(),
            n,
            pct(&r, 50.0),
            last(&r),
            f.len(),
            n,
            pct(&f, 50.0),
            last(&f),
            p.len(),
            n,
            pct(&p, 50.0),
            last(&p),
        ));
    }
}

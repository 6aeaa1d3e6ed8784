//! The local control plane itself: what every other end-to-end test relies on.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, PostParams};

use crate::support::{self, TestNamespace, admin_client, cluster, eventually};

#[tokio::test]
async fn api_server_answers_readyz() {
    let client = admin_client().await;
    let req = http::Request::get("/readyz").body(Vec::new()).unwrap();
    let body = client.request_text(req).await.expect("GET /readyz");
    assert_eq!(body, "ok");
}

#[tokio::test]
async fn crd_installs_and_becomes_established() {
    let client = admin_client().await;
    let group = format!("{}.e2e.agenttoken.dev", support::random_suffix());
    let crd: CustomResourceDefinition = serde_json::from_value(serde_json::json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("widgets.{group}")},
        "spec": {
            "group": group,
            "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
            "scope": "Namespaced",
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "spec": {"type": "object", "properties": {"size": {"type": "integer", "minimum": 1}}}
                }}}
            }]
        }
    }))
    .unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(client);
    let name = crd.metadata.name.clone().unwrap();
    crds.create(&PostParams::default(), &crd)
        .await
        .expect("create CRD");
    eventually(Duration::from_secs(30), "CRD Established", || async {
        let crd = crds.get(&name).await.ok()?;
        let established = crd
            .status?
            .conditions?
            .into_iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        established.then_some(())
    })
    .await;
    crds.delete(&name, &DeleteParams::default())
        .await
        .expect("delete CRD");
}

#[tokio::test]
async fn deployment_yields_pods_and_deleting_it_collects_dependents() {
    let ns = TestNamespace::new("e2e-gc").await;
    let labels: BTreeMap<String, String> = [("app".to_string(), "web".to_string())].into();
    let deploy: Deployment = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "web", "image": "example.invalid/web:1"}]}
            }
        }
    }))
    .unwrap();
    let deployments: Api<Deployment> = ns.api();
    let replicasets: Api<ReplicaSet> = ns.api();
    let pods: Api<Pod> = ns.api();
    deployments
        .create(&PostParams::default(), &deploy)
        .await
        .expect("create Deployment");

    let rs_name = eventually(
        Duration::from_secs(30),
        "a ReplicaSet owned by the Deployment",
        || async {
            let list = replicasets.list(&ListParams::default()).await.ok()?;
            list.items.into_iter().find_map(|rs| {
                let owned = rs
                    .metadata
                    .owner_references
                    .as_ref()?
                    .iter()
                    .any(|o| o.kind == "Deployment" && o.name == "web");
                owned.then(|| rs.metadata.name.clone().unwrap())
            })
        },
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "two Pods owned by the ReplicaSet",
        || async {
            let list = pods.list(&ListParams::default()).await.ok()?;
            let owned = list
                .items
                .iter()
                .filter(|p| {
                    p.metadata
                        .owner_references
                        .iter()
                        .flatten()
                        .any(|o| o.name == rs_name)
                })
                .count();
            (owned == 2).then_some(())
        },
    )
    .await;

    deployments
        .delete("web", &DeleteParams::background())
        .await
        .expect("delete Deployment");
    eventually(
        Duration::from_secs(60),
        "ReplicaSet and Pods garbage-collected",
        || async {
            let rs = replicasets.list(&ListParams::default()).await.ok()?;
            let p = pods.list(&ListParams::default()).await.ok()?;
            (rs.items.is_empty() && p.items.is_empty()).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn restricted_user_is_forbidden_outside_its_namespace() {
    let own = TestNamespace::new("e2e-own").await;
    let other = TestNamespace::new("e2e-other").await;
    let out = own.kubectl(&[
        "create",
        "rolebinding",
        "restricted-edit",
        "--clusterrole=edit",
        "--user=agenttoken-restricted",
    ]);
    assert!(
        out.status.success(),
        "create rolebinding: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let restricted = support::client_for(&cluster().restricted_kubeconfig).await;
    let cm: ConfigMap =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "probe"}})).unwrap();

    // Allowed where it is bound (RBAC bindings can take a moment to be seen).
    let in_own: Api<ConfigMap> = Api::namespaced(restricted.clone(), &own.name);
    eventually(
        Duration::from_secs(10),
        "restricted user may create in its namespace",
        || async {
            in_own
                .create(&PostParams::default(), &cm)
                .await
                .ok()
                .map(|_| ())
        },
    )
    .await;

    // Forbidden anywhere else, and on cluster-scoped reads.
    let in_other: Api<ConfigMap> = Api::namespaced(restricted.clone(), &other.name);
    assert_forbidden(
        in_other
            .create(&PostParams::default(), &cm)
            .await
            .map(|_| ()),
    );
    assert_forbidden(in_other.list(&ListParams::default()).await.map(|_| ()));
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(restricted);
    assert_forbidden(namespaces.list(&ListParams::default()).await.map(|_| ()));
}

fn assert_forbidden(result: Result<(), kube::Error>) {
    match result {
        Err(kube::Error::Api(status)) if status.code == 403 => {}
        other => panic!("expected 403 Forbidden, got {other:?}"),
    }
}

/// A second, separate cluster (own directory and ports) proves the lifecycle
/// without disturbing the shared one: `up` after a build is ready in under
/// 30 s, a second `up` reuses the running processes, and `down` stops exactly
/// the processes `up` started.
#[tokio::test]
async fn cluster_lifecycle_up_reuse_down() {
    let shared = cluster(); // the build exists once the shared cluster is up
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("cluster");
    let script = support::repo_root().join("e2e/cluster");
    let run = |arg: &str| {
        let out = Command::new(&script)
            .arg(arg)
            .env("AGENTTOKEN_CLUSTER_DIR", &state)
            .env("AGENTTOKEN_PORT_BASE", "16540")
            .output()
            .expect("run e2e/cluster");
        assert!(
            out.status.success(),
            "e2e/cluster {arg} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };

    let started = Instant::now();
    run("up");
    let up_time = started.elapsed();
    eprintln!("second cluster: `e2e/cluster up` with a cached build took {up_time:?}");
    assert!(
        up_time < Duration::from_secs(30),
        "up took {up_time:?}, expected < 30 s"
    );

    let pids = read_pids(&state.join("pids"));
    assert_eq!(
        pids.len(),
        3,
        "etcd, kube-apiserver and kube-controller-manager: {pids:?}"
    );

    let again = run("up");
    assert!(String::from_utf8_lossy(&again.stderr).contains("already running"));
    assert_eq!(
        read_pids(&state.join("pids")),
        pids,
        "a second up reuses the processes"
    );

    run("down");
    for pid in &pids {
        assert!(!running(*pid), "process {pid} still runs after down");
    }
    assert!(!state.exists(), "down removes the cluster's data");

    // The shared cluster was not touched.
    let out = support::kubectl_as(&shared.admin_kubeconfig, None, &["get", "--raw=/readyz"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
}

/// Whether `pid` is a live process. A killed daemon whose parent (the `up`
/// script) is gone may linger as a zombie until init reaps it: that is not
/// running.
fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

fn read_pids(path: &std::path::Path) -> Vec<u32> {
    std::fs::read_to_string(path)
        .expect("pids file")
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .collect()
}

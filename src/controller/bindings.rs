//! The binding Secrets of each AgentToken (the ServiceAccount issuer's
//! revocation handles), kept from the watch of the operator's own Secrets.
//!
//! A reflector store would keep every Secret's metadata (labels map,
//! timestamps, uid) to answer one question, "which binding Secrets does this
//! AgentToken have", by scanning all of them. This index keeps only the
//! answer, keyed by AgentToken: at 10,000 AgentTokens it is a few MiB smaller
//! and a lookup no longer walks every Secret.

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::core::PartialObjectMeta;
use kube::runtime::watcher::Event;

use crate::labels;

/// (namespace, AgentToken name) -> binding Secrets (name, revision, owner UID).
type Map = HashMap<(String, String), Vec<Entry>>;

/// One binding Secret: its name, revision and the UID of the AgentToken
/// its owner reference names.
type Entry = (String, i64, String);

#[derive(Default)]
pub struct BindingIndex {
    state: RwLock<State>,
    synced: AtomicBool,
    hasher: std::collections::hash_map::RandomState,
}

#[derive(Default)]
struct State {
    live: Map,
    /// Built during a (re)list, swapped in when it is complete.
    building: Option<Map>,
    /// Every other Secret carrying our label (token Secrets, and any a
    /// tenant labelled), by hashed namespace and name.
    others: HashSet<u64>,
    building_others: Option<HashSet<u64>>,
}

/// The index key and entry of a binding Secret; `None` for any other
/// Secret. Labels are anyone's to write: the owner reference's UID is what
/// ties a binding to an AgentToken (checked on every lookup), and a
/// revision that is not a positive number is not believed.
fn binding(s: &PartialObjectMeta<Secret>) -> Option<((String, String), Entry)> {
    let l = s.labels();
    if l.get(labels::ROLE).map(String::as_str) != Some(labels::ROLE_BINDING) {
        return None;
    }
    let owner = l.get(labels::NAME)?.clone();
    let revision: i64 = l.get(labels::REVISION)?.parse().ok().filter(|r| *r > 0)?;
    let uid = s
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| {
            o.kind == "AgentToken"
                && o.api_version.starts_with("agenttoken.dev/")
                && o.name == owner
        })?
        .uid
        .clone();
    let ns = s.metadata.namespace.clone()?;
    Some(((ns, owner), (s.name_any(), revision, uid)))
}

fn insert(map: &mut Map, key: (String, String), entry: Entry) {
    let list = map.entry(key).or_default();
    list.retain(|(name, _, _)| *name != entry.0);
    list.push(entry);
}

fn remove(map: &mut Map, key: &(String, String), name: &str) {
    if let Some(list) = map.get_mut(key) {
        list.retain(|(n, _, _)| n != name);
        if list.is_empty() {
            map.remove(key);
        }
    }
}

impl BindingIndex {
    fn other_key(&self, ns: &str, name: &str) -> u64 {
        self.hasher.hash_one((ns, name))
    }

    /// Applies one watch event.
    pub fn apply(&self, event: &Event<PartialObjectMeta<Secret>>) {
        let other = |s: &PartialObjectMeta<Secret>| {
            binding(s).is_none().then(|| {
                self.other_key(
                    s.metadata.namespace.as_deref().unwrap_or_default(),
                    &s.name_any(),
                )
            })
        };
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        match event {
            Event::Init => {
                state.building = Some(Map::new());
                state.building_others = Some(HashSet::new());
            }
            Event::InitApply(s) => {
                if let (Some((key, entry)), Some(map)) = (binding(s), state.building.as_mut())
                    && s.metadata.deletion_timestamp.is_none()
                {
                    insert(map, key, entry);
                }
                if let (Some(k), Some(set)) = (other(s), state.building_others.as_mut()) {
                    set.insert(k);
                }
            }
            Event::InitDone => {
                if let Some(map) = state.building.take() {
                    state.live = map;
                }
                if let Some(set) = state.building_others.take() {
                    state.others = set;
                }
                self.synced.store(true, Ordering::Release);
            }
            Event::Apply(s) => {
                if let Some((key, entry)) = binding(s) {
                    if s.metadata.deletion_timestamp.is_some() {
                        remove(&mut state.live, &key, &entry.0);
                    } else {
                        insert(&mut state.live, key, entry);
                    }
                }
                if let Some(k) = other(s) {
                    state.others.insert(k);
                }
            }
            Event::Delete(s) => {
                if let Some((key, entry)) = binding(s) {
                    remove(&mut state.live, &key, &entry.0);
                }
                if let Some(k) = other(s) {
                    state.others.remove(&k);
                }
            }
        }
    }

    /// Whether a Secret `ns/name` that is not a binding carries our label:
    /// `false` is the watch's word that no Secret of ours has that name (a
    /// Secret someone else made without our label is not seen here).
    pub fn has_labelled(&self, ns: &str, name: &str) -> bool {
        let key = self.other_key(ns, name);
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        state.others.contains(&key)
    }

    /// The binding Secrets (name, revision) of the AgentToken `ns/name`
    /// with `uid`: only those whose owner reference names that UID.
    pub fn of(&self, ns: &str, name: &str, uid: &str) -> Vec<(String, i64)> {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        state
            .live
            .get(&(ns.to_string(), name.to_string()))
            .into_iter()
            .flatten()
            .filter(|(_, _, owner)| owner == uid)
            .map(|(n, r, _)| (n.clone(), *r))
            .collect()
    }

    /// Whether the first full list has been applied.
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }
}

/// The version of each token Secret the operator last wrote or read, so
/// that its own writes coming back through the watch do not each bring a
/// reconcile. Keys and versions are hashed with this process's random
/// keys: 16 bytes an entry, and no name can be made to stand for another.
#[derive(Default)]
pub struct SeenVersions {
    hasher: std::collections::hash_map::RandomState,
    map: Mutex<HashMap<u64, u64>>,
}

impl SeenVersions {
    fn key(&self, ns: &str, name: &str) -> u64 {
        self.hasher.hash_one((ns, name))
    }

    fn version(&self, rv: &str) -> u64 {
        self.hasher.hash_one(rv)
    }

    /// The operator wrote or read Secret `ns/name` at version `rv`.
    pub fn record(&self, ns: &str, name: &str, rv: Option<&str>) {
        let key = self.key(ns, name);
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        match rv {
            Some(rv) => map.insert(key, self.version(rv)),
            None => map.remove(&key),
        };
    }

    /// Whether `rv` is the version of `ns/name` the operator last saw.
    pub fn is_seen(&self, ns: &str, name: &str, rv: &str) -> bool {
        let key = self.key(ns, name);
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&key) == Some(&self.version(rv))
    }
}

/// Binding Secrets the operator itself is deleting (a revocation), by
/// hashed namespace and name: their delete events are not a reason to
/// reconcile. Without this, a mint that fails after its binding exists
/// (and drops the binding) would be retried at once by its own delete
/// event, past every backoff: a loop of TokenRequests.
#[derive(Default)]
pub struct OwnDeletes {
    hasher: std::collections::hash_map::RandomState,
    keys: Mutex<HashSet<u64>>,
}

/// Most deletes remembered: a delete whose event never comes (a watch
/// gap) is forgotten when the set is full, costing one reconcile.
const MAX_OWN_DELETES: usize = 4096;

impl OwnDeletes {
    /// The operator is about to delete binding `ns/name`.
    pub fn mark(&self, ns: &str, name: &str) {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        if keys.len() >= MAX_OWN_DELETES {
            keys.clear();
        }
        keys.insert(self.hasher.hash_one((ns, name)));
    }

    /// Whether `ns/name` was being deleted by the operator (forgotten once
    /// asked).
    fn take(&self, ns: &str, name: &str) -> bool {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.remove(&self.hasher.hash_one((ns, name)))
    }
}

/// Binding deletes of this process (see [`OwnDeletes`]).
pub static OWN_DELETES: std::sync::LazyLock<OwnDeletes> =
    std::sync::LazyLock::new(OwnDeletes::default);

/// The Secret whose AgentToken a watch event should reconcile, if any:
/// any of ours deleted (a binding deleted ends its token); a token Secret
/// at a version the operator did not write or read itself (someone edited
/// it: it is repaired). Binding Secrets are only ever created by the
/// operator, so their other events are the operator's own, and so are the
/// deletes it marked in [`OWN_DELETES`].
pub fn reconcile_for(
    event: &Event<PartialObjectMeta<Secret>>,
    seen: &SeenVersions,
) -> Option<PartialObjectMeta<Secret>> {
    let is_binding = |s: &PartialObjectMeta<Secret>| {
        s.labels().get(labels::ROLE).map(String::as_str) == Some(labels::ROLE_BINDING)
    };
    match event {
        Event::Delete(s) => {
            let ns = s.metadata.namespace.as_deref().unwrap_or_default();
            (!(is_binding(s) && OWN_DELETES.take(ns, &s.name_any()))).then(|| s.clone())
        }
        Event::Apply(s) | Event::InitApply(s) => {
            if is_binding(s) {
                return None;
            }
            let ns = s.metadata.namespace.as_deref().unwrap_or_default();
            let rv = s.metadata.resource_version.as_deref().unwrap_or_default();
            (!seen.is_seen(ns, &s.name_any(), rv)).then(|| s.clone())
        }
        Event::Init | Event::InitDone => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::api::ObjectMeta;

    fn secret(name: &str, owner: &str, role: &str, revision: i64) -> PartialObjectMeta<Secret> {
        owned(
            name,
            owner,
            role,
            &revision.to_string(),
            &format!("uid-{owner}"),
        )
    }

    fn owned(
        name: &str,
        owner: &str,
        role: &str,
        revision: &str,
        uid: &str,
    ) -> PartialObjectMeta<Secret> {
        PartialObjectMeta::<Secret> {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("team".into()),
                owner_references: Some(vec![
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                        api_version: "agenttoken.dev/v1alpha1".into(),
                        kind: "AgentToken".into(),
                        name: owner.into(),
                        uid: uid.into(),
                        ..Default::default()
                    },
                ]),
                labels: Some(
                    [
                        (labels::NAME.to_string(), owner.to_string()),
                        (labels::ROLE.to_string(), role.to_string()),
                        (labels::REVISION.to_string(), revision.to_string()),
                    ]
                    .into(),
                ),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn keeps_bindings_by_owner_and_follows_deletes_and_relists() {
        let index = BindingIndex::default();
        assert!(!index.synced());
        index.apply(&Event::Init);
        index.apply(&Event::InitApply(secret(
            "bot-1",
            "bot",
            labels::ROLE_BINDING,
            1,
        )));
        index.apply(&Event::InitApply(secret("bot", "bot", "token", 1)));
        index.apply(&Event::InitApply(secret(
            "other-3",
            "other",
            labels::ROLE_BINDING,
            3,
        )));
        // Not visible until the list is complete.
        assert!(index.of("team", "bot", "uid-bot").is_empty());
        index.apply(&Event::InitDone);
        assert!(index.synced());
        assert_eq!(
            index.of("team", "bot", "uid-bot"),
            vec![("bot-1".to_string(), 1)]
        );
        assert!(index.of("elsewhere", "bot", "uid-bot").is_empty());

        index.apply(&Event::Apply(secret(
            "bot-2",
            "bot",
            labels::ROLE_BINDING,
            2,
        )));
        index.apply(&Event::Apply(secret(
            "bot-2",
            "bot",
            labels::ROLE_BINDING,
            2,
        )));
        assert_eq!(
            index.of("team", "bot", "uid-bot").len(),
            2,
            "an update does not duplicate"
        );
        let mut deleting = secret("bot-1", "bot", labels::ROLE_BINDING, 1);
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2026-01-01T00:00:00Z".parse().unwrap(),
            ));
        index.apply(&Event::Apply(deleting));
        assert_eq!(
            index.of("team", "bot", "uid-bot"),
            vec![("bot-2".to_string(), 2)]
        );
        index.apply(&Event::Delete(secret(
            "bot-2",
            "bot",
            labels::ROLE_BINDING,
            2,
        )));
        assert!(index.of("team", "bot", "uid-bot").is_empty());

        // A relist replaces everything: what it does not list is gone.
        index.apply(&Event::Init);
        index.apply(&Event::InitApply(secret(
            "bot-5",
            "bot",
            labels::ROLE_BINDING,
            5,
        )));
        index.apply(&Event::InitDone);
        assert_eq!(
            index.of("team", "bot", "uid-bot"),
            vec![("bot-5".to_string(), 5)]
        );
        assert!(index.of("team", "other", "uid-other").is_empty());
    }

    #[test]
    fn a_forged_binding_is_not_believed() {
        let index = BindingIndex::default();
        index.apply(&Event::Init);
        // Labels copied, owner reference to another UID: not this AgentToken's.
        index.apply(&Event::InitApply(owned(
            "bot-binding-r9",
            "bot",
            labels::ROLE_BINDING,
            "9",
            "uid-evil",
        )));
        // No owner reference at all.
        let mut bare = secret("bot-binding-r8", "bot", labels::ROLE_BINDING, 8);
        bare.metadata.owner_references = None;
        index.apply(&Event::InitApply(bare));
        // Revisions that are not positive numbers.
        for r in ["9223372036854775808", "-1", "0", "x"] {
            index.apply(&Event::InitApply(owned(
                &format!("bot-{r}"),
                "bot",
                labels::ROLE_BINDING,
                r,
                "uid-bot",
            )));
        }
        index.apply(&Event::InitApply(owned(
            "bot-binding-r2",
            "bot",
            labels::ROLE_BINDING,
            "2",
            "uid-bot",
        )));
        index.apply(&Event::InitDone);
        assert_eq!(
            index.of("team", "bot", "uid-bot"),
            vec![("bot-binding-r2".to_string(), 2)]
        );
        assert_eq!(
            index.of("team", "bot", "uid-evil"),
            vec![("bot-binding-r9".to_string(), 9)]
        );
    }

    #[test]
    fn only_deletes_and_changes_not_our_own_bring_a_reconcile() {
        let seen = SeenVersions::default();
        let at_version = |rv: &str, role: &str| {
            let mut s = secret("bot-token", "bot", role, 1);
            s.metadata.resource_version = Some(rv.into());
            s
        };
        let token = |rv: &str| at_version(rv, "token");
        let triggers = |e: Event<PartialObjectMeta<Secret>>| reconcile_for(&e, &seen).is_some();
        // Never seen (a restart): looked at.
        assert!(triggers(Event::Apply(token("7"))));
        // The version the operator wrote comes back: not looked at, on a
        // watch event or a relist alike.
        seen.record("team", "bot-token", Some("7"));
        assert!(!triggers(Event::Apply(token("7"))));
        assert!(!triggers(Event::InitApply(token("7"))));
        // Someone else wrote it after us: repaired.
        assert!(triggers(Event::Apply(token("8"))));
        // Deleted, whatever the version.
        assert!(triggers(Event::Delete(token("7"))));
        // Another Secret of the same version is another Secret.
        let mut other = token("7");
        other.metadata.name = Some("other-token".into());
        assert!(triggers(Event::Apply(other)));
        // Bindings are only ever the operator's writes; their deletion ends
        // a token and is looked at.
        assert!(!triggers(Event::Apply(at_version(
            "9",
            labels::ROLE_BINDING
        ))));
        let binding = || at_version("9", labels::ROLE_BINDING);
        assert!(triggers(Event::Delete(binding())));
        // ... unless the operator deleted it itself (a revocation, a mint
        // that failed): its own delete must not retry past the backoff.
        OWN_DELETES.mark("team", "bot-token");
        assert!(!triggers(Event::Delete(binding())));
        assert!(triggers(Event::Delete(binding())));
        // Forgotten (the Secret was gone when last read): looked at.
        seen.record("team", "bot-token", None);
        assert!(triggers(Event::Apply(token("7"))));
        assert!(!triggers(Event::Init));
        assert!(!triggers(Event::InitDone));
    }

    #[test]
    fn knows_which_names_our_other_secrets_have() {
        let index = BindingIndex::default();
        index.apply(&Event::Init);
        index.apply(&Event::InitApply(secret("bot", "bot", "token", 1)));
        index.apply(&Event::InitApply(secret(
            "bot-1",
            "bot",
            labels::ROLE_BINDING,
            1,
        )));
        index.apply(&Event::InitDone);
        assert!(index.has_labelled("team", "bot"));
        // A binding is not a token Secret; another namespace is another name.
        assert!(!index.has_labelled("team", "bot-1"));
        assert!(!index.has_labelled("other", "bot"));
        index.apply(&Event::Apply(secret("new", "new", "token", 1)));
        assert!(index.has_labelled("team", "new"));
        index.apply(&Event::Delete(secret("new", "new", "token", 1)));
        assert!(!index.has_labelled("team", "new"));
        // A relist replaces what was known.
        index.apply(&Event::Init);
        index.apply(&Event::InitDone);
        assert!(!index.has_labelled("team", "bot"));
    }
}

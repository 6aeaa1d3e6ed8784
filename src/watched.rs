//! Single objects the operator reads on every mint (an issuer's credential
//! Secret, a jwt issuer's JWKS ConfigMap), kept current by a watch of that
//! one object instead of a GET per mint.
//!
//! The first read of an object starts its watch (a field selector on its
//! name, so only that object is ever sent) and asks the API server; later
//! reads are answered from the watch once it has synced. At most
//! [`MAX_WATCHED`] objects of a kind are watched: beyond that (a tenant
//! that writes a thousand TokenIssuers naming a thousand Secrets) reads go
//! to the API server as before, so memory and watches stay bounded.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex, RwLock};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;

/// Most objects of one kind watched at once.
pub const MAX_WATCHED: usize = 256;

/// One watched object: its latest state once the watch has listed it.
struct Slot<K> {
    value: RwLock<Option<Arc<K>>>,
    synced: AtomicBool,
}

impl<K> Default for Slot<K> {
    fn default() -> Self {
        Slot {
            value: RwLock::new(None),
            synced: AtomicBool::new(false),
        }
    }
}

/// (namespace, name) -> its slot.
type Slots<K> = HashMap<(String, String), Arc<Slot<K>>>;

/// Objects of kind `K`, by (namespace, name).
pub struct Watched<K> {
    slots: Mutex<Slots<K>>,
}

impl<K> Default for Watched<K> {
    fn default() -> Self {
        Watched {
            slots: Mutex::new(HashMap::new()),
        }
    }
}

impl<K> Watched<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    /// Object `ns/name` (`None`: it does not exist): from its watch when
    /// that has synced, else from the API server (starting the watch).
    pub async fn get(
        &self,
        client: &Client,
        ns: &str,
        name: &str,
    ) -> Result<Option<Arc<K>>, kube::Error> {
        if let Some(slot) = self.slot(client, ns, name)
            && slot.synced.load(Ordering::Acquire)
        {
            return Ok(slot.value.read().unwrap_or_else(|e| e.into_inner()).clone());
        }
        self.get_live(client, ns, name).await
    }

    /// Object `ns/name` from the API server, whatever the watch says.
    pub async fn get_live(
        &self,
        client: &Client,
        ns: &str,
        name: &str,
    ) -> Result<Option<Arc<K>>, kube::Error> {
        Ok(Api::<K>::namespaced(client.clone(), ns)
            .get_opt(name)
            .await?
            .map(Arc::new))
    }

    /// The slot of `ns/name`, its watch started on first use; `None` when
    /// [`MAX_WATCHED`] objects are watched already.
    fn slot(&self, client: &Client, ns: &str, name: &str) -> Option<Arc<Slot<K>>> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let key = (ns.to_string(), name.to_string());
        if let Some(slot) = slots.get(&key) {
            return Some(slot.clone());
        }
        if slots.len() >= MAX_WATCHED {
            return None;
        }
        let slot = Arc::new(Slot::default());
        slots.insert(key, slot.clone());
        let api = Api::<K>::namespaced(client.clone(), ns);
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let fed = slot.clone();
        tokio::spawn(async move {
            let mut seen_in_list = false;
            let events = watcher(api, config).default_backoff();
            futures::pin_mut!(events);
            while let Some(event) = events.next().await {
                let Ok(event) = event else { continue };
                let mut value = fed.value.write().unwrap_or_else(|e| e.into_inner());
                match event {
                    watcher::Event::Init => seen_in_list = false,
                    watcher::Event::InitApply(o) => {
                        seen_in_list = true;
                        *value = Some(Arc::new(o));
                    }
                    watcher::Event::InitDone => {
                        if !seen_in_list {
                            *value = None;
                        }
                        fed.synced.store(true, Ordering::Release);
                    }
                    watcher::Event::Apply(o) => *value = Some(Arc::new(o)),
                    watcher::Event::Delete(_) => *value = None,
                }
            }
        });
        Some(slot)
    }
}

/// Credential Secrets issuers read (keys, client secrets, tokens).
pub static SECRETS: LazyLock<Watched<Secret>> = LazyLock::new(Watched::default);
/// JWKS ConfigMaps jwt issuers publish.
pub static CONFIG_MAPS: LazyLock<Watched<ConfigMap>> = LazyLock::new(Watched::default);

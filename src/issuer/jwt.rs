//! The jwt issuer: the operator signs tokens itself (ES256, RS256 or EdDSA,
//! from the key's type) with `iss`, `sub` (`namespace/name` of the
//! AgentToken), `aud`, `scope`, `exp`, `iat`, `nbf` and `jti`, and publishes
//! the public keys as a JWKS in a ConfigMap (`jwks.json`) so services can
//! verify. The key id (`kid`) is the key's RFC 7638 thumbprint; when the
//! signing key changes, the new key is published BEFORE anything is signed
//! with it and the previous keys stay published, so tokens signed before a
//! key rotation keep verifying until they expire.
//!
//! Ownership of the JWKS ConfigMap. Namespace admins can write ConfigMaps,
//! so neither a label nor an owner reference (a tenant can set both, and
//! can read the issuer's UID) says who made one. The operator creates the
//! ConfigMap itself with POST (never adopting one that exists) and records
//! the UID the API server gave it, with the key ids it published, in the
//! annotation [`RECORD_ANNOTATION`] on the issuer object (TokenIssuer or
//! ClusterTokenIssuer), which tenants cannot write. A ConfigMap whose UID
//! is not the recorded one is never written: the issuer's check fails.
//! The JWKS it writes holds only the current key and keys whose `kid` is in
//! that record and whose key material hashes to that `kid`, rebuilt from
//! the thumbprint members alone; anything else a tenant put there is
//! dropped, with a warning, on the next write (every mint and every issuer
//! check).
//!
//! Self-signed tokens cannot be revoked at an issuer: revocation is
//! `NotSupported` and the token dies at its expiry.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, LazyLock, Mutex};

use base64::Engine;
use futures::FutureExt;
use futures::future::BoxFuture;
use jiff::Timestamp;
use jsonwebtoken::jwk::{
    AlgorithmParameters, CommonParameters, EllipticCurve, EllipticCurveKeyParameters,
    EllipticCurveKeyType, Jwk, KeyAlgorithm, OctetKeyPairParameters, OctetKeyPairType,
    PublicKeyUse, RSAKeyParameters, RSAKeyType, ThumbprintHash,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, Resource};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tracing::warn;

use super::{Issuer, IssuerError, MintRequest, MintedToken, Revocation, RevocationHandle, web};
use crate::crd::{ClusterTokenIssuer, JwtIssuerSpec, TokenIssuer};
use crate::labels;

/// Key of the JWKS in the ConfigMap.
pub const JWKS_KEY: &str = "jwks.json";
/// Public keys kept in the JWKS (the current one and the latest previous ones).
pub const KEEP_KEYS: usize = 5;
const FIELD_MANAGER: &str = "agent-token-operator-jwks";
/// Annotation on the issuer object (TokenIssuer or ClusterTokenIssuer):
/// [`JwksRecords`] in JSON, the operator's record of the JWKS ConfigMaps it
/// created and the key ids it published there.
pub const RECORD_ANNOTATION: &str = "agenttoken.dev/jwks";

/// A loaded signing key.
pub struct SigningKey {
    pub algorithm: Algorithm,
    pub encoding: EncodingKey,
    /// The public key as a JWK, with `kid`, `alg` and `use` set.
    pub jwk: Jwk,
}

/// Loads a PEM private key and derives its algorithm and public JWK.
pub fn load_key(pem: &str) -> Result<SigningKey, IssuerError> {
    let invalid = || {
        IssuerError::Invalid(
            "jwt.signingKeySecretRef does not hold an EC P-256, RSA or Ed25519 private key in PEM"
                .into(),
        )
    };
    let (algorithm, encoding) = if let Ok(k) = EncodingKey::from_ec_pem(pem.as_bytes()) {
        (Algorithm::ES256, k)
    } else if let Ok(k) = EncodingKey::from_rsa_pem(pem.as_bytes()) {
        (Algorithm::RS256, k)
    } else if let Ok(k) = EncodingKey::from_ed_pem(pem.as_bytes()) {
        (Algorithm::EdDSA, k)
    } else {
        return Err(invalid());
    };
    let params = match algorithm {
        Algorithm::EdDSA => {
            use ed25519_dalek::pkcs8::DecodePrivateKey;
            let sk = ed25519_dalek::SigningKey::from_pkcs8_pem(pem).map_err(|_| invalid())?;
            AlgorithmParameters::OctetKeyPair(OctetKeyPairParameters {
                key_type: OctetKeyPairType::OctetKeyPair,
                curve: EllipticCurve::Ed25519,
                x: base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .encode(sk.verifying_key().as_bytes()),
            })
        }
        _ => {
            Jwk::from_encoding_key(&encoding, algorithm)
                .map_err(|_| invalid())?
                .algorithm
        }
    };
    let jwk = public_jwk(&params).ok_or_else(invalid)?;
    Ok(SigningKey {
        algorithm,
        encoding,
        jwk,
    })
}

/// Whether `s` is a plausible base64url JWK member (no padding, no quotes).
fn base64url(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 4096
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The public JWK the operator publishes for a key (pure): only the RFC 7638
/// thumbprint members, with `kid` (the SHA-256 thumbprint), `use: sig` and
/// the `alg` the operator signs such a key with. `None` for anything it
/// never signs with: symmetric keys, other curves, malformed members.
pub fn public_jwk(params: &AlgorithmParameters) -> Option<Jwk> {
    use sha2::Digest;
    let (params, alg, kid) = match params {
        AlgorithmParameters::EllipticCurve(p)
            if p.curve == EllipticCurve::P256 && base64url(&p.x) && base64url(&p.y) =>
        {
            let params = AlgorithmParameters::EllipticCurve(EllipticCurveKeyParameters {
                key_type: EllipticCurveKeyType::EC,
                curve: EllipticCurve::P256,
                x: p.x.clone(),
                y: p.y.clone(),
            });
            let kid = Jwk {
                common: CommonParameters::default(),
                algorithm: params.clone(),
            }
            .thumbprint(ThumbprintHash::SHA256);
            (params, KeyAlgorithm::ES256, kid)
        }
        AlgorithmParameters::RSA(p) if base64url(&p.n) && base64url(&p.e) => {
            let params = AlgorithmParameters::RSA(RSAKeyParameters {
                key_type: RSAKeyType::RSA,
                n: p.n.clone(),
                e: p.e.clone(),
            });
            let kid = Jwk {
                common: CommonParameters::default(),
                algorithm: params.clone(),
            }
            .thumbprint(ThumbprintHash::SHA256);
            (params, KeyAlgorithm::RS256, kid)
        }
        AlgorithmParameters::OctetKeyPair(p)
            if p.curve == EllipticCurve::Ed25519 && base64url(&p.x) =>
        {
            // RFC 8037 §2 thumbprint members: crv, kty, x.
            let canonical = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#, p.x);
            let kid = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(sha2::Sha256::digest(canonical.as_bytes()));
            let params = AlgorithmParameters::OctetKeyPair(OctetKeyPairParameters {
                key_type: OctetKeyPairType::OctetKeyPair,
                curve: EllipticCurve::Ed25519,
                x: p.x.clone(),
            });
            (params, KeyAlgorithm::EdDSA, kid)
        }
        _ => return None,
    };
    Some(Jwk {
        common: CommonParameters {
            key_id: Some(kid),
            public_key_use: Some(PublicKeyUse::Signature),
            key_algorithm: Some(alg),
            ..Default::default()
        },
        algorithm: params,
    })
}

/// When a token signed at `now` for `lifetime` expires (pure): an error
/// for a zero lifetime or one no timestamp can hold.
pub fn expiry(now: Timestamp, lifetime: std::time::Duration) -> Result<Timestamp, IssuerError> {
    if lifetime.as_secs() == 0 {
        return Err(IssuerError::Invalid(
            "the lifetime must be at least 1s: a JWT that expires when it is signed is useless"
                .into(),
        ));
    }
    let too_long = || {
        IssuerError::Invalid(format!(
            "a lifetime of {}s puts the expiry beyond any time the operator can represent",
            lifetime.as_secs()
        ))
    };
    let secs = i64::try_from(lifetime.as_secs()).map_err(|_| too_long())?;
    now.checked_add(jiff::SignedDuration::from_secs(secs))
        .map_err(|_| too_long())
}

/// The claims of one token (pure).
pub fn claims(
    spec: &JwtIssuerSpec,
    req: &MintRequest,
    now: Timestamp,
    jti: &str,
) -> Result<Value, IssuerError> {
    let exp = expiry(now, req.lifetime)?;
    let mut c = json!({
        "iss": spec.issuer,
        "sub": format!("{}/{}", req.namespace, req.name),
        "iat": now.as_second(),
        "nbf": now.as_second(),
        "exp": exp.as_second(),
        "jti": jti,
    });
    match req.audiences.as_slice() {
        [] => {}
        [one] => c["aud"] = json!(one),
        many => c["aud"] = json!(many),
    }
    if !req.scopes.is_empty() {
        c["scope"] = json!(req.scopes.join(" "));
    }
    Ok(c)
}

/// The operator's record of one JWKS ConfigMap it created, kept in the
/// [`RECORD_ANNOTATION`] annotation of the issuer object, where tenants
/// cannot write.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct JwksRecord {
    /// UID the API server gave the ConfigMap the operator created.
    pub uid: String,
    /// Key ids the operator published there, newest first.
    #[serde(default)]
    pub kids: Vec<String>,
}

/// An issuer's records by `namespace/name` of the ConfigMap. A TokenIssuer
/// has one; a ClusterTokenIssuer one per operator namespace that serves it
/// (two installs never overwrite each other's record).
pub type JwksRecords = BTreeMap<String, JwksRecord>;

/// Reads the records from an issuer's annotations (pure; garbage: none).
pub fn read_records(annotations: Option<&BTreeMap<String, String>>) -> JwksRecords {
    annotations
        .and_then(|a| a.get(RECORD_ANNOTATION))
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_default()
}

/// Whether the live ConfigMap with `uid` is the one the operator created
/// (pure): its UID is the recorded one (`record`: the issuer's record for
/// that ConfigMap's `namespace/name`), or the one this process got back
/// from its own POST (`created_here`: created, not recorded yet). Labels,
/// owner references and managed fields are never looked at: a tenant can
/// set them all.
pub fn owned(uid: &str, record: Option<&JwksRecord>, created_here: Option<&str>) -> bool {
    !uid.is_empty() && (record.is_some_and(|r| r.uid == uid) || created_here == Some(uid))
}

/// A JWKS to publish, from [`merge_jwks`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JwksUpdate {
    /// The `jwks.json` document.
    pub jwks: String,
    /// The key ids it holds, current first: the next record.
    pub kids: Vec<String>,
    /// Key ids (or `<no kid>`) of entries found in the ConfigMap that the
    /// operator did not publish, or whose key material does not hash to
    /// their `kid`: dropped, never republished.
    pub dropped: Vec<String>,
}

/// The JWKS the operator publishes (pure): `current` first, then the keys
/// of `existing` (the ConfigMap's `jwks.json`, which a tenant may have
/// edited) whose `kid` is in `trusted` (the operator's own record, newest
/// first, in that order) and whose key material hashes to that `kid`, each
/// rebuilt from its thumbprint members alone; at most [`KEEP_KEYS`] keys.
/// Every other entry is reported in [`JwksUpdate::dropped`].
pub fn merge_jwks(existing: Option<&str>, trusted: &[String], current: &Jwk) -> JwksUpdate {
    let current = public_jwk(&current.algorithm).unwrap_or_else(|| current.clone());
    let current_kid = current.common.key_id.clone().unwrap_or_default();
    let entries: Vec<Value> = existing
        .and_then(|s| serde_json::from_str::<Value>(s).ok())
        .and_then(|v| v.get("keys").and_then(Value::as_array).cloned())
        .unwrap_or_default();
    let ours: HashSet<&str> = trusted
        .iter()
        .map(String::as_str)
        .chain([current_kid.as_str()])
        .collect();
    // Entries whose material hashes to their kid, by kid, rebuilt.
    let mut sound: HashMap<String, Jwk> = HashMap::new();
    let mut dropped = Vec::new();
    for entry in &entries {
        let claimed = entry.get("kid").and_then(Value::as_str);
        let rebuilt = serde_json::from_value::<Jwk>(entry.clone())
            .ok()
            .and_then(|j| public_jwk(&j.algorithm))
            .filter(|j| j.common.key_id.as_deref() == claimed);
        match (claimed, rebuilt) {
            (Some(kid), Some(jwk)) if ours.contains(kid) => {
                sound.entry(kid.to_string()).or_insert(jwk);
            }
            _ => dropped.push(claimed.unwrap_or("<no kid>").to_string()),
        }
    }
    let mut kids = vec![current_kid];
    let mut keys = vec![current];
    for kid in trusted {
        if keys.len() >= KEEP_KEYS {
            break;
        }
        if kids.contains(kid) {
            continue;
        }
        if let Some(jwk) = sound.get(kid) {
            kids.push(kid.clone());
            keys.push(jwk.clone());
        }
    }
    JwksUpdate {
        jwks: serde_json::to_string_pretty(&json!({ "keys": keys })).unwrap_or_default(),
        kids,
        dropped,
    }
}

/// What this process knows of the JWKS ConfigMaps it publishes, by
/// `namespace/name`. Only a shortcut and a lock: ownership is decided by the
/// record on the issuer, which survives restarts.
#[derive(Default)]
struct Known {
    /// UIDs of ConfigMaps this process created (until the record says so).
    created: HashMap<String, String>,
    /// The last state verified or written: (UID, resourceVersion, current
    /// kid). An unchanged ConfigMap (same UID and resourceVersion) that
    /// already leads with the current key needs nothing.
    verified: HashMap<String, (String, String, String)>,
    /// One publish at a time per ConfigMap.
    locks: HashMap<String, Arc<tokio::sync::Mutex<()>>>,
}

static KNOWN: LazyLock<Mutex<Known>> = LazyLock::new(|| Mutex::new(Known::default()));

fn known() -> std::sync::MutexGuard<'static, Known> {
    KNOWN.lock().unwrap_or_else(|e| e.into_inner())
}

/// The issuer object a JWKS ConfigMap belongs to.
struct Owner {
    reference: OwnerReference,
    cluster: bool,
    resource_version: Option<String>,
    records: JwksRecords,
}

impl Owner {
    fn of<K: Resource<DynamicType = ()>>(obj: &K, cluster: bool) -> Self {
        let meta = obj.meta();
        Owner {
            reference: OwnerReference {
                api_version: K::api_version(&()).into_owned(),
                kind: K::kind(&()).into_owned(),
                name: meta.name.clone().unwrap_or_default(),
                uid: meta.uid.clone().unwrap_or_default(),
                controller: Some(true),
                block_owner_deletion: None,
            },
            cluster,
            resource_version: meta.resource_version.clone(),
            records: read_records(meta.annotations.as_ref()),
        }
    }
}

/// Signs tokens and publishes its JWKS.
pub struct JwtIssuer {
    kube: Client,
    spec: JwtIssuerSpec,
    namespace: String,
    issuer_name: String,
    config_map: String,
}

impl JwtIssuer {
    /// `namespace` is where the key Secret and the JWKS ConfigMap live (a
    /// TokenIssuer's namespace, the operator's for a ClusterTokenIssuer);
    /// `issuer_name` the issuer object's name.
    pub fn new(kube: Client, spec: JwtIssuerSpec, namespace: String, issuer_name: &str) -> Self {
        let config_map = spec
            .jwks_config_map
            .clone()
            .unwrap_or_else(|| format!("{issuer_name}-jwks"));
        JwtIssuer {
            kube,
            spec,
            namespace,
            issuer_name: issuer_name.to_string(),
            config_map,
        }
    }

    async fn key(&self) -> Result<SigningKey, IssuerError> {
        let pem: SecretString = web::read_secret(
            &self.kube,
            &self.namespace,
            &self.spec.signing_key_secret_ref,
            "jwt.signingKeySecretRef",
        )
        .await?;
        load_key(pem.expose_secret())
    }

    fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.config_map)
    }

    fn foreign(&self) -> IssuerError {
        IssuerError::Invalid(format!(
            "ConfigMap {} exists and was not created by this issuer; delete it or set jwt.jwksConfigMap",
            self.id()
        ))
    }

    fn unavailable(&self, what: &str, e: kube::Error) -> IssuerError {
        IssuerError::Unavailable(format!("cannot {what} ConfigMap {}: {e}", self.id()))
    }

    fn config_maps(&self) -> Api<ConfigMap> {
        Api::namespaced(self.kube.clone(), &self.namespace)
    }

    /// The issuer object this JWKS belongs to: the TokenIssuer of that name
    /// in the namespace, else the ClusterTokenIssuer, whichever carries this
    /// very jwt spec.
    async fn owner(&self) -> Result<Owner, IssuerError> {
        let gone = |e: kube::Error| {
            IssuerError::Unavailable(format!("cannot read issuer {:?}: {e}", self.issuer_name))
        };
        // Forbidden: the operator does not serve TokenIssuers here (the
        // release namespace of a namespace-scoped install).
        let namespaced = match Api::<TokenIssuer>::namespaced(self.kube.clone(), &self.namespace)
            .get_opt(&self.issuer_name)
            .await
        {
            Ok(t) => t.filter(|t| t.spec.jwt.is_some()),
            Err(kube::Error::Api(s)) if s.code == 403 => None,
            Err(e) => return Err(gone(e)),
        };
        if let Some(t) = &namespaced
            && t.spec.jwt.as_ref() == Some(&self.spec)
        {
            return Ok(Owner::of(t, false));
        }
        let cluster = match Api::<ClusterTokenIssuer>::all(self.kube.clone())
            .get_opt(&self.issuer_name)
            .await
        {
            Ok(c) => c.filter(|c| c.spec.0.jwt.as_ref() == Some(&self.spec)),
            Err(kube::Error::Api(s)) if s.code == 403 => None,
            Err(e) => return Err(gone(e)),
        };
        match (namespaced, cluster) {
            (None, Some(c)) => Ok(Owner::of(&c, true)),
            (Some(_), Some(_)) => Err(IssuerError::Invalid(format!(
                "TokenIssuer {}/{name} and ClusterTokenIssuer {name} would both publish ConfigMap {}; \
                 rename one of them or set jwt.jwksConfigMap",
                self.namespace,
                self.id(),
                name = self.issuer_name,
            ))),
            _ => Err(IssuerError::Unavailable(format!(
                "jwt issuer {:?} not found, or changed while it was read",
                self.issuer_name
            ))),
        }
    }

    /// The issuer object again (for a retry after a conflict).
    async fn reread(&self, owner: &Owner) -> Result<Owner, IssuerError> {
        let read = if owner.cluster {
            Api::<ClusterTokenIssuer>::all(self.kube.clone())
                .get(&self.issuer_name)
                .await
                .map(|o| Owner::of(&o, true))
        } else {
            Api::<TokenIssuer>::namespaced(self.kube.clone(), &self.namespace)
                .get(&self.issuer_name)
                .await
                .map(|o| Owner::of(&o, false))
        };
        read.map_err(|e| {
            IssuerError::Unavailable(format!("cannot read issuer {:?}: {e}", self.issuer_name))
        })
    }

    /// Records `record` for this ConfigMap on the issuer, leaving the other
    /// records alone (UID and resourceVersion as preconditions; retried on a
    /// conflict).
    async fn write_record(&self, owner: &Owner, record: &JwksRecord) -> Result<(), IssuerError> {
        let pp = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        let failed = |e: kube::Error| {
            IssuerError::Unavailable(format!(
                "cannot record ConfigMap {} on {} {:?}: {e}",
                self.id(),
                owner.reference.kind,
                self.issuer_name
            ))
        };
        let mut fresh = None;
        for _ in 0..5 {
            let current = fresh.as_ref().unwrap_or(owner);
            if current.reference.uid != owner.reference.uid {
                return Err(IssuerError::Unavailable(format!(
                    "issuer {:?} was replaced while its JWKS was published",
                    self.issuer_name
                )));
            }
            let mut records = current.records.clone();
            if records.get(&self.id()) == Some(record) {
                return Ok(());
            }
            records.insert(self.id(), record.clone());
            let patch = json!({"metadata": {
                "uid": owner.reference.uid,
                "resourceVersion": current.resource_version,
                "annotations": {RECORD_ANNOTATION: serde_json::to_string(&records).unwrap_or_default()},
            }});
            let written = if owner.cluster {
                Api::<ClusterTokenIssuer>::all(self.kube.clone())
                    .patch(&self.issuer_name, &pp, &Patch::Merge(&patch))
                    .await
                    .map(drop)
            } else {
                Api::<TokenIssuer>::namespaced(self.kube.clone(), &self.namespace)
                    .patch(&self.issuer_name, &pp, &Patch::Merge(&patch))
                    .await
                    .map(drop)
            };
            match written {
                Ok(()) => return Ok(()),
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    fresh = Some(self.reread(owner).await?);
                }
                Err(e) => return Err(failed(e)),
            }
        }
        Err(IssuerError::Unavailable(format!(
            "cannot record ConfigMap {} on {} {:?}: it kept changing",
            self.id(),
            owner.reference.kind,
            self.issuer_name
        )))
    }

    /// Whether the live ConfigMap is as this process last left it, with
    /// `kid` published first.
    fn unchanged(&self, live: Option<&ConfigMap>, kid: &str) -> bool {
        let Some(cm) = live else { return false };
        let (Some(uid), Some(rv)) = (&cm.metadata.uid, &cm.metadata.resource_version) else {
            return false;
        };
        known()
            .verified
            .get(&self.id())
            .is_some_and(|(u, r, k)| u == uid && r == rv && k == kid)
    }

    fn remember(&self, cm: &ConfigMap, kid: &str) {
        if let (Some(uid), Some(rv)) = (&cm.metadata.uid, &cm.metadata.resource_version) {
            known()
                .verified
                .insert(self.id(), (uid.clone(), rv.clone(), kid.to_string()));
        }
    }

    /// Makes sure the JWKS ConfigMap publishes `key` (first) and nothing the
    /// operator did not publish itself.
    async fn publish(&self, key: &SigningKey) -> Result<(), IssuerError> {
        let api = self.config_maps();
        let kid = key.jwk.common.key_id.clone().unwrap_or_default();
        // From the ConfigMap's watch: no read per mint while nothing changes.
        let watched = crate::watched::CONFIG_MAPS
            .get(&self.kube, &self.namespace, &self.config_map)
            .await
            .map_err(|e| self.unavailable("read", e))?;
        if self.unchanged(watched.as_deref(), &kid) {
            return Ok(());
        }
        let lock = known().locks.entry(self.id()).or_default().clone();
        let _one_at_a_time = lock.lock().await;
        // Another mint may have published while this one waited; what is
        // written next is decided on the live object, not the watch's.
        let live = api
            .get_opt(&self.config_map)
            .await
            .map_err(|e| self.unavailable("read", e))?;
        if self.unchanged(live.as_ref(), &kid) {
            return Ok(());
        }
        let owner = self.owner().await?;
        match live {
            None => self.create(&api, &owner, key, &kid).await,
            Some(cm) => self.rewrite(&api, &owner, cm, key, &kid).await,
        }
    }

    /// Creates the ConfigMap (POST: one that appears meanwhile is not taken
    /// over) and records its UID on the issuer.
    async fn create(
        &self,
        api: &Api<ConfigMap>,
        owner: &Owner,
        key: &SigningKey,
        kid: &str,
    ) -> Result<(), IssuerError> {
        let update = merge_jwks(None, &[], &key.jwk);
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(self.config_map.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some(BTreeMap::from([(
                    labels::MANAGED_BY.to_string(),
                    labels::MANAGER.to_string(),
                )])),
                owner_references: Some(vec![owner.reference.clone()]),
                ..Default::default()
            },
            data: Some(BTreeMap::from([(JWKS_KEY.to_string(), update.jwks)])),
            ..Default::default()
        };
        let pp = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        let created = match api.create(&pp, &cm).await {
            Ok(c) => c,
            Err(kube::Error::Api(s)) if s.code == 409 => return Err(self.foreign()),
            Err(e) => return Err(self.unavailable("create", e)),
        };
        let uid = created.metadata.uid.clone().unwrap_or_default();
        known().created.insert(self.id(), uid.clone());
        let record = JwksRecord {
            uid,
            kids: update.kids,
        };
        self.write_record(owner, &record).await?;
        self.remember(&created, kid);
        Ok(())
    }

    /// Rewrites a ConfigMap the operator created so that it publishes the
    /// current key and the keys of its record, and records what it wrote.
    async fn rewrite(
        &self,
        api: &Api<ConfigMap>,
        owner: &Owner,
        cm: ConfigMap,
        key: &SigningKey,
        kid: &str,
    ) -> Result<(), IssuerError> {
        let uid = cm.metadata.uid.clone().unwrap_or_default();
        let created_here = known().created.get(&self.id()).cloned();
        let record = owner.records.get(&self.id());
        if !owned(&uid, record, created_here.as_deref()) {
            return Err(self.foreign());
        }
        let trusted = record
            .filter(|r| r.uid == uid)
            .map(|r| r.kids.clone())
            .unwrap_or_default();
        let data = cm.data.clone().unwrap_or_default();
        let update = merge_jwks(data.get(JWKS_KEY).map(String::as_str), &trusted, &key.jwk);
        for foreign in &update.dropped {
            warn!(
                configmap = %self.id(),
                kid = %foreign,
                "dropping a key from the JWKS that the operator did not publish"
            );
        }
        let want = BTreeMap::from([(JWKS_KEY.to_string(), update.jwks.clone())]);
        let ours = std::slice::from_ref(&owner.reference);
        let stale = data != want
            || cm.binary_data.as_ref().is_some_and(|b| !b.is_empty())
            || cm.metadata.owner_references.as_deref() != Some(ours)
            || cm
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(labels::MANAGED_BY))
                .map(String::as_str)
                != Some(labels::MANAGER);
        let written = if stale {
            // Every other key removed; UID and resourceVersion as
            // preconditions: a ConfigMap replaced or edited since it was
            // read is not written.
            let mut new_data: serde_json::Map<String, Value> = data
                .keys()
                .filter(|k| k.as_str() != JWKS_KEY)
                .map(|k| (k.clone(), Value::Null))
                .collect();
            new_data.insert(JWKS_KEY.into(), json!(update.jwks));
            let patch = json!({
                "metadata": {
                    "uid": uid,
                    "resourceVersion": cm.metadata.resource_version,
                    "labels": {labels::MANAGED_BY: labels::MANAGER},
                    "ownerReferences": [owner.reference],
                },
                "data": new_data,
                "binaryData": null,
            });
            let pp = PatchParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..Default::default()
            };
            api.patch(&self.config_map, &pp, &Patch::Merge(&patch))
                .await
                .map_err(|e| self.unavailable("write", e))?
        } else {
            cm
        };
        let next = JwksRecord {
            uid,
            kids: update.kids,
        };
        if record != Some(&next) {
            self.write_record(owner, &next).await?;
        }
        known().created.remove(&self.id());
        self.remember(&written, kid);
        Ok(())
    }

    async fn mint_inner(&self, req: &MintRequest) -> Result<MintedToken, IssuerError> {
        let key = self.key().await?;
        // Verifiers must know the key before they see a token signed by it.
        self.publish(&key).await?;
        let now = Timestamp::now();
        let jti = hex::encode(rand::random::<[u8; 16]>());
        let mut header = Header::new(key.algorithm);
        header.kid = key.jwk.common.key_id.clone();
        header.typ = Some("JWT".into());
        let expires_at = expiry(now, req.lifetime)?;
        let claims = claims(&self.spec, req, now, &jti)?;
        let token = jsonwebtoken::encode(&header, &claims, &key.encoding)
            .map_err(|e| IssuerError::Invalid(format!("cannot sign: {e}")))?;
        Ok(MintedToken {
            token: SecretString::from(token),
            issued_at: now,
            expires_at,
            handle: RevocationHandle(format!("jwt:{jti}")),
            audit_id: None,
        })
    }

    async fn check_inner(&self) -> Result<(), IssuerError> {
        let key = self.key().await?;
        self.publish(&key).await
    }
}

impl Issuer for JwtIssuer {
    fn kind(&self) -> &'static str {
        "jwt"
    }

    fn mint<'a>(&'a self, req: &'a MintRequest) -> BoxFuture<'a, Result<MintedToken, IssuerError>> {
        self.mint_inner(req).boxed()
    }

    fn revoke<'a>(
        &'a self,
        _namespace: &'a str,
        _handle: &'a RevocationHandle,
        _token: Option<&'a SecretString>,
    ) -> BoxFuture<'a, Result<Revocation, IssuerError>> {
        Box::pin(async { Ok(Revocation::NotSupported) })
    }

    fn write_ahead(&self) -> super::WriteAhead {
        super::WriteAhead::AnswerOnly
    }

    fn check(&self) -> BoxFuture<'_, Result<(), IssuerError>> {
        self.check_inner().boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn openssl_key(args: &[&str]) -> String {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl");
        assert!(out.status.success(), "openssl {args:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn every_key_type_signs_and_verifies_with_its_published_jwk() {
        let keys = [
            (
                openssl_key(&[
                    "genpkey",
                    "-algorithm",
                    "EC",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                ]),
                Algorithm::ES256,
            ),
            (
                openssl_key(&[
                    "genpkey",
                    "-algorithm",
                    "RSA",
                    "-pkeyopt",
                    "rsa_keygen_bits:2048",
                ]),
                Algorithm::RS256,
            ),
            (
                openssl_key(&["genpkey", "-algorithm", "ED25519"]),
                Algorithm::EdDSA,
            ),
        ];
        let spec = JwtIssuerSpec {
            issuer: "https://agents.example".into(),
            ..Default::default()
        };
        let req = MintRequest {
            namespace: "team-a".into(),
            name: "bot".into(),
            scopes: vec!["deploy".into(), "read".into()],
            audiences: vec!["https://api.internal".into()],
            lifetime: std::time::Duration::from_secs(600),
            ..Default::default()
        };
        for (pem, alg) in keys {
            let key = load_key(&pem).unwrap();
            assert_eq!(key.algorithm, alg);
            let mut header = Header::new(alg);
            header.kid = key.jwk.common.key_id.clone();
            let now = Timestamp::now();
            let token = jsonwebtoken::encode(
                &header,
                &claims(&spec, &req, now, "j1").unwrap(),
                &key.encoding,
            )
            .unwrap();
            // Verify with nothing but the published JWK.
            let published: Jwk =
                serde_json::from_str(&serde_json::to_string(&key.jwk).unwrap()).unwrap();
            let dk = jsonwebtoken::DecodingKey::from_jwk(&published).unwrap();
            let mut v = jsonwebtoken::Validation::new(alg);
            v.set_audience(&["https://api.internal"]);
            v.set_issuer(&["https://agents.example"]);
            let data = jsonwebtoken::decode::<Value>(&token, &dk, &v).unwrap();
            assert_eq!(data.claims["sub"], "team-a/bot");
            assert_eq!(data.claims["scope"], "deploy read");
            assert_eq!(
                data.claims["exp"].as_i64().unwrap() - data.claims["iat"].as_i64().unwrap(),
                600
            );
            assert_eq!(data.header.kid, key.jwk.common.key_id);
        }
        assert!(load_key("not a key").is_err());
    }

    fn ec_key() -> SigningKey {
        load_key(&openssl_key(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ]))
        .unwrap()
    }

    fn ed_key() -> SigningKey {
        load_key(&openssl_key(&["genpkey", "-algorithm", "ED25519"])).unwrap()
    }

    fn kid(k: &SigningKey) -> String {
        k.jwk.common.key_id.clone().unwrap()
    }

    fn kids_of(jwks: &str) -> Vec<String> {
        let v: Value = serde_json::from_str(jwks).unwrap();
        v["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap().to_string())
            .collect()
    }

    /// `jwks` with `entry` appended to its keys, as a tenant would edit it.
    fn with_entry(jwks: &str, entry: Value) -> String {
        let mut v: Value = serde_json::from_str(jwks).unwrap();
        v["keys"].as_array_mut().unwrap().push(entry);
        v.to_string()
    }

    #[test]
    fn jwks_keeps_previous_keys_across_a_rotation() {
        let a = ed_key();
        let b = ec_key();
        let first = merge_jwks(None, &[], &a.jwk);
        assert_eq!(first.kids, vec![kid(&a)]);
        assert!(first.dropped.is_empty());
        let same = merge_jwks(Some(&first.jwks), &first.kids, &a.jwk);
        assert_eq!(same, first, "nothing to change: the same document");
        let second = merge_jwks(Some(&first.jwks), &first.kids, &b.jwk);
        assert_eq!(kids_of(&second.jwks), vec![kid(&b), kid(&a)]);
        assert_eq!(second.kids, vec![kid(&b), kid(&a)]);
        assert!(second.dropped.is_empty());
        assert!(
            !second.jwks.contains("\"d\""),
            "no private part is published"
        );
        // At most KEEP_KEYS, newest first, in the order of the record (a
        // tenant reordering the ConfigMap changes nothing).
        let keys: Vec<SigningKey> = (0..KEEP_KEYS + 2).map(|_| ed_key()).collect();
        let mut doc = merge_jwks(None, &[], &keys[0].jwk);
        for k in &keys[1..] {
            let mut reversed: Value = serde_json::from_str(&doc.jwks).unwrap();
            reversed["keys"].as_array_mut().unwrap().reverse();
            doc = merge_jwks(Some(&reversed.to_string()), &doc.kids, &k.jwk);
            assert!(doc.dropped.is_empty(), "{:?}", doc.dropped);
        }
        let newest: Vec<String> = keys.iter().rev().take(KEEP_KEYS).map(kid).collect();
        assert_eq!(doc.kids, newest);
        assert_eq!(kids_of(&doc.jwks), newest);
    }

    #[test]
    fn a_foreign_key_added_to_jwks_json_is_dropped_on_the_next_write() {
        let ours = ec_key();
        let tenants = ec_key();
        let published = merge_jwks(None, &[], &ours.jwk);
        let tampered = with_entry(&published.jwks, serde_json::to_value(&tenants.jwk).unwrap());
        // The tenant's key is sound (its kid is its thumbprint), but the
        // operator never computed that kid: dropped, and reported.
        let next = merge_jwks(Some(&tampered), &published.kids, &ours.jwk);
        assert_eq!(next.kids, vec![kid(&ours)]);
        assert_eq!(kids_of(&next.jwks), vec![kid(&ours)]);
        assert_eq!(next.dropped, vec![kid(&tenants)]);
        assert_eq!(next.jwks, published.jwks, "exactly what was published");
        // Nor does it come back on a signing-key rotation.
        let rotated = ed_key();
        let after = merge_jwks(Some(&tampered), &published.kids, &rotated.jwk);
        assert_eq!(kids_of(&after.jwks), vec![kid(&rotated), kid(&ours)]);
        assert_eq!(after.dropped, vec![kid(&tenants)]);
        // A tenant listing its kid in the document changes nothing: only
        // the operator's record (`trusted`) counts.
        let twice = with_entry(&tampered, serde_json::to_value(&tenants.jwk).unwrap());
        let again = merge_jwks(Some(&twice), &published.kids, &ours.jwk);
        assert_eq!(again.kids, vec![kid(&ours)]);
        assert_eq!(again.dropped.len(), 2);
    }

    #[test]
    fn a_published_kid_with_other_key_material_is_dropped() {
        let old = ec_key();
        let current = ed_key();
        let tenants = ec_key();
        let first = merge_jwks(None, &[], &old.jwk);
        // The tenant keeps the operator's kid but swaps in its own public key.
        let mut swapped = serde_json::to_value(&tenants.jwk).unwrap();
        swapped["kid"] = json!(kid(&old));
        let doc = json!({"keys": [swapped]}).to_string();
        let next = merge_jwks(Some(&doc), &first.kids, &current.jwk);
        assert_eq!(kids_of(&next.jwks), vec![kid(&current)]);
        assert_eq!(next.dropped, vec![kid(&old)]);
        // Nor can it make the current key's entry carry its material.
        let mut on_current = serde_json::to_value(&tenants.jwk).unwrap();
        on_current["kid"] = json!(kid(&current));
        let doc = json!({"keys": [on_current]}).to_string();
        let next = merge_jwks(Some(&doc), &[kid(&current)], &current.jwk);
        assert_eq!(next.jwks, merge_jwks(None, &[], &current.jwk).jwks);
        // Extra members are not kept: an edited `alg` or an `x5c` is rebuilt
        // away, and the entry stays published.
        let mut edited = serde_json::to_value(&old.jwk).unwrap();
        edited["alg"] = json!("HS256");
        edited["x5c"] = json!(["MIIB"]);
        edited["use"] = json!("enc");
        let doc = json!({"keys": [edited]}).to_string();
        let next = merge_jwks(Some(&doc), &first.kids, &current.jwk);
        assert_eq!(next.kids, vec![kid(&current), kid(&old)]);
        assert!(next.dropped.is_empty());
        let v: Value = serde_json::from_str(&next.jwks).unwrap();
        assert_eq!(v["keys"][1], serde_json::to_value(&old.jwk).unwrap());
    }

    #[test]
    fn hostile_jwks_entries_are_dropped_not_a_panic() {
        let current = ed_key();
        let x = "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU";
        let entries = [
            json!({"kty": "oct", "k": "c2VjcmV0", "kid": "k1"}),
            json!({"kty": "EC", "crv": "Ed25519", "x": x, "y": x, "kid": "k2"}),
            json!({"kty": "OKP", "crv": "P-256", "x": x, "kid": "k3"}),
            json!({"kty": "EC", "crv": "P-384", "x": x, "y": x, "kid": "k4"}),
            json!({"kty": "OKP", "crv": "Ed25519", "x": "a\",\"y\":\"b", "kid": "k5"}),
            json!({"kty": "RSA", "n": "", "e": "AQAB", "kid": "k6"}),
            json!({"kty": "OKP", "crv": "Ed25519", "x": x}),
            json!("not an object"),
            json!(null),
        ];
        let trusted: Vec<String> = (1..=6).map(|i| format!("k{i}")).collect();
        let doc = json!({ "keys": entries }).to_string();
        let next = merge_jwks(Some(&doc), &trusted, &current.jwk);
        assert_eq!(next.kids, vec![kid(&current)]);
        assert_eq!(next.dropped.len(), entries.len());
        for garbage in ["", "{", "[]", r#"{"keys": 5}"#, r#"{"keys": [1, 2]}"#] {
            let next = merge_jwks(Some(garbage), &trusted, &current.jwk);
            assert_eq!(next.kids, vec![kid(&current)], "{garbage}");
        }
    }

    #[test]
    fn ownership_is_the_recorded_uid_never_labels_or_owner_references() {
        let record = JwksRecord {
            uid: "uid-ours".into(),
            kids: vec!["k".into()],
        };
        assert!(owned("uid-ours", Some(&record), None));
        // A ConfigMap of that name with any other UID is not ours, whatever
        // it carries (labels and owner references are not even looked at).
        assert!(!owned("uid-tenant", Some(&record), None));
        assert!(!owned("uid-tenant", None, None));
        // What this process created itself, before the record is written.
        assert!(owned("uid-new", None, Some("uid-new")));
        assert!(!owned("uid-tenant", None, Some("uid-new")));
        // An empty UID never matches.
        let empty = JwksRecord::default();
        assert!(!owned("", Some(&empty), Some("")));
        // The records are by ConfigMap, in one annotation on the issuer.
        let records = JwksRecords::from([
            ("team-a/agents-jwks".to_string(), record.clone()),
            ("ops/agents-jwks".to_string(), JwksRecord::default()),
        ]);
        let annotations = BTreeMap::from([(
            RECORD_ANNOTATION.to_string(),
            serde_json::to_string(&records).unwrap(),
        )]);
        let read = read_records(Some(&annotations));
        assert_eq!(read, records);
        assert_eq!(read.get("team-a/agents-jwks"), Some(&record));
        assert!(!read.contains_key("team-b/agents-jwks"));
        // Garbage in the annotation is no record at all.
        let garbage = BTreeMap::from([(RECORD_ANNOTATION.to_string(), "{".to_string())]);
        assert!(read_records(Some(&garbage)).is_empty());
        assert!(read_records(None).is_empty());
    }

    #[test]
    fn the_published_jwk_is_its_own_canonical_form() {
        for k in [ec_key(), ed_key()] {
            assert_eq!(public_jwk(&k.jwk.algorithm).unwrap(), k.jwk);
        }
        let rsa = load_key(&openssl_key(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ]))
        .unwrap();
        assert_eq!(public_jwk(&rsa.jwk.algorithm).unwrap(), rsa.jwk);
        assert_eq!(
            rsa.jwk.common.key_id.as_deref(),
            Some(rsa.jwk.thumbprint(ThumbprintHash::SHA256).as_str())
        );
    }

    #[test]
    fn a_lifetime_beyond_any_timestamp_is_refused_not_wrapped() {
        let spec = JwtIssuerSpec::default();
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        for secs in [u64::MAX, i64::MAX as u64 + 1, i64::MAX as u64, 1 << 40] {
            let req = MintRequest {
                lifetime: std::time::Duration::from_secs(secs),
                ..Default::default()
            };
            let e = expiry(now, req.lifetime).unwrap_err();
            assert!(!e.is_transient(), "a spec problem: {e}");
            assert!(e.to_string().contains("beyond any time"), "{e}");
            assert!(claims(&spec, &req, now, "j").is_err());
        }
        let zero = MintRequest::default();
        assert!(expiry(now, zero.lifetime).is_err());
        assert!(claims(&spec, &zero, now, "j").is_err());
        let hour = MintRequest {
            lifetime: std::time::Duration::from_secs(3600),
            ..Default::default()
        };
        let c = claims(&spec, &hour, now, "j").unwrap();
        assert_eq!(c["exp"], 1_800_003_600);
        assert_eq!(
            expiry(now, hour.lifetime).unwrap(),
            Timestamp::from_second(1_800_003_600).unwrap()
        );
    }
}

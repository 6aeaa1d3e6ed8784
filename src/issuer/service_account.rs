//! The Kubernetes ServiceAccount issuer: TokenRequest for a ServiceAccount in
//! the AgentToken's own namespace.
//!
//! Every token is bound (`boundObjectRef`) to a small "binding" Secret that
//! the operator creates for that one token and that the AgentToken owns.
//! Deleting the binding Secret is revocation: the API server rejects a bound
//! token once its object is gone (after at most its 10 s authentication
//! cache for a token used in the last 10 s). Binding Secrets are also the
//! durable record of every minted token, so a token minted just before the
//! operator died is found and revoked when it is back.

use std::collections::BTreeMap;

use futures::FutureExt;
use futures::future::BoxFuture;
use jiff::Timestamp;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Client;
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams, Preconditions};
use secrecy::SecretString;

use super::{
    Issuer, IssuerError, MintRequest, MintedToken, Revocation, RevocationHandle, after_issue,
};
use crate::labels;

/// The Secret type of binding Secrets; they carry no data.
pub const BINDING_SECRET_TYPE: &str = "agenttoken.dev/token-binding";

/// Kubernetes refuses TokenRequests shorter than ten minutes.
pub const MIN_LIFETIME: std::time::Duration = std::time::Duration::from_secs(600);

/// Mints with the TokenRequest API.
pub struct ServiceAccountIssuer {
    client: Client,
}

impl ServiceAccountIssuer {
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    async fn mint_inner(&self, req: &MintRequest) -> Result<MintedToken, IssuerError> {
        let sa_name = req.service_account_name.as_deref().ok_or_else(|| {
            IssuerError::Invalid(
                "spec.serviceAccountName is required for a serviceAccount issuer".into(),
            )
        })?;
        if req.lifetime < MIN_LIFETIME {
            return Err(IssuerError::Invalid(format!(
                "lifetime {}s is below the TokenRequest minimum of 600s (10m)",
                req.lifetime.as_secs()
            )));
        }
        let expiration_seconds = i64::try_from(req.lifetime.as_secs()).map_err(|_| {
            IssuerError::Invalid(format!(
                "lifetime {}s is longer than a TokenRequest can express",
                req.lifetime.as_secs()
            ))
        })?;
        let sas: Api<ServiceAccount> = Api::namespaced(self.client.clone(), &req.namespace);
        // The namespace is always the AgentToken's own: a ServiceAccount
        // elsewhere cannot even be named. Whether it exists is the
        // TokenRequest's answer (a read before every mint would cost every
        // token a request to learn what the rare failure says anyway).
        let binding = self.create_binding(req).await?;
        let binding_name = binding.metadata.name.clone().unwrap_or_default();
        let tr = TokenRequest {
            spec: TokenRequestSpec {
                audiences: req.audiences.clone(),
                expiration_seconds: Some(expiration_seconds),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Secret".into()),
                    name: Some(binding_name.clone()),
                    uid: binding.metadata.uid.clone(),
                }),
            },
            ..Default::default()
        };
        let issued_at = Timestamp::now();
        let result = sas
            .create_token_request(sa_name, &PostParams::default(), &tr)
            .await;
        let status = match result {
            Ok(tr) => tr.status,
            Err(e) => {
                // Nothing was minted: drop the binding again.
                let _ = self
                    .revoke_binding(&req.namespace, &binding_name, &req.uid)
                    .await;
                return Err(match &e {
                    kube::Error::Api(s) if s.code == 404 => IssuerError::Invalid(format!(
                        "ServiceAccount {sa_name:?} does not exist in namespace {:?}",
                        req.namespace
                    )),
                    kube::Error::Api(s) if s.code == 400 || s.code == 422 => {
                        IssuerError::Invalid(format!(
                            "TokenRequest for ServiceAccount {sa_name:?} was refused: {}",
                            s.message
                        ))
                    }
                    _ => unavailable("request a token", e),
                });
            }
        };
        let status = status
            .ok_or_else(|| IssuerError::Unavailable("TokenRequest returned no status".into()))?;
        let expires_at = match after_issue(issued_at, status.expiration_timestamp.0) {
            Ok(t) => t,
            Err(e) => {
                // A token dead at birth is not delivered: drop its binding.
                let _ = self
                    .revoke_binding(&req.namespace, &binding_name, &req.uid)
                    .await;
                return Err(e);
            }
        };
        Ok(MintedToken {
            token: SecretString::from(status.token),
            issued_at,
            expires_at,
            handle: RevocationHandle(binding_name),
            audit_id: None,
        })
    }

    async fn create_binding(&self, req: &MintRequest) -> Result<Secret, IssuerError> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &req.namespace);
        let name = binding_name(&req.name, req.revision);
        let binding = Secret {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(BTreeMap::from([
                    (labels::MANAGED_BY.into(), labels::MANAGER.into()),
                    (labels::NAME.into(), req.name.clone()),
                    (labels::ROLE.into(), labels::ROLE_BINDING.into()),
                    (labels::REVISION.into(), req.revision.to_string()),
                ])),
                owner_references: Some(vec![OwnerReference {
                    api_version: "agenttoken.dev/v1alpha1".into(),
                    kind: "AgentToken".into(),
                    name: req.name.clone(),
                    uid: req.uid.clone(),
                    controller: Some(false),
                    block_owner_deletion: Some(false),
                }]),
                ..Default::default()
            },
            type_: Some(BINDING_SECRET_TYPE.into()),
            ..Default::default()
        };
        match secrets.create(&PostParams::default(), &binding).await {
            Ok(s) => Ok(s),
            Err(kube::Error::Api(s)) if s.code == 409 => {
                // Left over from an attempt that died before the token was
                // delivered: that token (if any) dies with the old binding.
                // Only ever a binding THIS AgentToken owns (by UID, deleted
                // with that UID as a precondition): a Secret someone else put
                // under the name is never touched.
                let existing = secrets
                    .get_opt(&name)
                    .await
                    .map_err(|e| unavailable("read the token binding Secret", e))?;
                let ours = existing.as_ref().and_then(|s| {
                    let owned =
                        s.metadata.owner_references.iter().flatten().any(|o| {
                            o.kind == "AgentToken" && o.uid == req.uid && o.name == req.name
                        });
                    let binding = s.type_.as_deref() == Some(BINDING_SECRET_TYPE);
                    (owned && binding).then(|| s.metadata.uid.clone()).flatten()
                });
                let Some(uid) = ours else {
                    return Err(IssuerError::Invalid(format!(
                        "Secret {name:?} exists and is not a token binding of this AgentToken; it is never deleted or adopted (delete it, or recreate the AgentToken under another name)"
                    )));
                };
                // Its delete event is ours: not a reason to reconcile again.
                crate::controller::bindings::OWN_DELETES.mark(&req.namespace, &name);
                let dp = DeleteParams {
                    preconditions: Some(Preconditions {
                        uid: Some(uid),
                        resource_version: None,
                    }),
                    ..DeleteParams::background()
                };
                match secrets.delete(&name, &dp).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => return Err(unavailable("delete the token binding Secret", e)),
                }
                secrets
                    .create(&PostParams::default(), &binding)
                    .await
                    .map_err(|e| unavailable("create the token binding Secret", e))
            }
            Err(e) => Err(unavailable("create the token binding Secret", e)),
        }
    }

    /// Revokes a token by deleting its binding Secret, only if that Secret
    /// is a binding owned by the AgentToken with `owner_uid` (deleted with
    /// its UID as a precondition). A binding already gone is revoked: the
    /// token was bound to that very object.
    pub async fn revoke_binding(
        &self,
        namespace: &str,
        name: &str,
        owner_uid: &str,
    ) -> Result<Revocation, IssuerError> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let Some(existing) = secrets
            .get_opt(name)
            .await
            .map_err(|e| unavailable("read the token binding Secret", e))?
        else {
            return Ok(Revocation::Revoked);
        };
        let owned = existing
            .metadata
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.kind == "AgentToken" && o.uid == owner_uid);
        if !owned || existing.type_.as_deref() != Some(BINDING_SECRET_TYPE) {
            return Err(IssuerError::Invalid(format!(
                "Secret {name:?} is not a token binding of this AgentToken; it is never deleted"
            )));
        }
        // Its delete event is ours: not a reason to reconcile again.
        crate::controller::bindings::OWN_DELETES.mark(namespace, name);
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid: existing.metadata.uid.clone(),
                resource_version: None,
            }),
            ..DeleteParams::background()
        };
        match secrets.delete(name, &dp).await {
            Ok(_) => Ok(Revocation::Revoked),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(Revocation::Revoked),
            Err(e) => Err(unavailable("delete the token binding Secret", e)),
        }
    }
}

impl Issuer for ServiceAccountIssuer {
    fn kind(&self) -> &'static str {
        "serviceAccount"
    }

    fn refuses<'a>(
        &'a self,
        token: &'a SecretString,
    ) -> futures::future::BoxFuture<'a, Result<bool, String>> {
        use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
        Box::pin(async move {
            let review = TokenReview {
                spec: TokenReviewSpec {
                    token: Some(secrecy::ExposeSecret::expose_secret(token).to_string()),
                    audiences: None,
                },
                ..Default::default()
            };
            let answer = kube::Api::<TokenReview>::all(self.client.clone())
                .create(&Default::default(), &review)
                .await
                .map_err(|e| format!("TokenReview failed: {e}"))?;
            Ok(!answer.status.and_then(|s| s.authenticated).unwrap_or(false))
        })
    }

    fn refusal_check(&self) -> &'static str {
        "TokenReview"
    }

    fn write_ahead(&self) -> super::WriteAhead {
        super::WriteAhead::AnswerOnly
    }

    fn mint<'a>(&'a self, req: &'a MintRequest) -> BoxFuture<'a, Result<MintedToken, IssuerError>> {
        self.mint_inner(req).boxed()
    }

    fn revoke<'a>(
        &'a self,
        namespace: &'a str,
        handle: &'a RevocationHandle,
        _token: Option<&'a SecretString>,
    ) -> BoxFuture<'a, Result<Revocation, IssuerError>> {
        // A binding is deleted only after its owner is checked, which
        // needs the AgentToken's UID: see `revoke_binding`.
        let _ = (namespace, handle);
        async move {
            Err(IssuerError::Invalid(
                "serviceAccount tokens are revoked through revoke_binding, with their owner's UID"
                    .into(),
            ))
        }
        .boxed()
    }
}

/// The binding Secret's name for one revision of an AgentToken.
pub fn binding_name(agent_token: &str, revision: i64) -> String {
    format!("{agent_token}-binding-r{revision}")
}

fn unavailable(what: &str, e: kube::Error) -> IssuerError {
    // kube errors carry API messages and URLs, never request bodies.
    IssuerError::Unavailable(format!("could not {what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_lifetime_a_token_request_cannot_express_is_refused_before_any_call() {
        // Nothing listens there: reaching the API would be Unavailable.
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        let issuer = ServiceAccountIssuer::new(Client::try_from(config).unwrap());
        let req = MintRequest {
            service_account_name: Some("bot".into()),
            lifetime: std::time::Duration::from_secs(u64::MAX),
            ..Default::default()
        };
        let e = issuer.mint(&req).await.unwrap_err();
        assert!(matches!(e, IssuerError::Invalid(_)), "{e}");
        assert!(e.to_string().contains("longer than a TokenRequest"), "{e}");
    }
}

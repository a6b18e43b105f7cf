//! Who may use the kubelet API, as the kubelet decides it: a client certificate from the
//! cluster's client CA (the apiserver's own), or a bearer token checked by TokenReview; then a
//! SubjectAccessReview on `nodes/<subresource>`. Unauthenticated: 401; unauthorized: 403.
//! Answers are cached briefly, so `logs -f` reconnects do not each cost two API calls.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::PostParams;
use kube::{Api, Client};

/// How long an authentication or authorization answer is reused.
pub const CACHE_FOR: Duration = Duration::from_secs(10);
/// Answers cached at most, per kind: a caller sending a new bearer string with every request
/// cannot grow the operator without end.
pub const CACHED_AT_MOST: usize = 4096;

/// Answers by key, with when they were given.
type Cache<K, V> = Mutex<HashMap<K, (Instant, V)>>;

/// Caches an answer: expired ones go first when the cache is full, and everything when it is
/// still full of fresh ones (only a flood of new callers fills it).
fn remember<K: std::hash::Hash + Eq, V>(cache: &Mutex<HashMap<K, (Instant, V)>>, key: K, value: V) {
    let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
    if cache.len() >= CACHED_AT_MOST {
        cache.retain(|_, (at, _)| at.elapsed() < CACHE_FOR);
        if cache.len() >= CACHED_AT_MOST {
            cache.clear();
        }
    }
    cache.insert(key, (Instant::now(), value));
}

/// A bearer token as a cache key: its SHA-256, so no token is held in memory past its request.
fn token_key(token: &str) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut key = [0u8; 32];
    key.copy_from_slice(digest.as_ref());
    key
}

/// A caller, as established by its certificate or token.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct User {
    pub name: String,
    pub groups: Vec<String>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Denied {
    Unauthenticated(String),
    Forbidden(String),
}

/// The user a verified client certificate names: CN is the user, O the groups.
pub fn user_of_certificate(der: &[u8]) -> Option<User> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let name = subject
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    let groups = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok().map(String::from))
        .collect();
    Some(User { name, groups })
}

type Key = (User, &'static str, &'static str, String);

pub struct Authorizer {
    client: Client,
    tokens: Cache<[u8; 32], Option<User>>,
    decisions: Cache<Key, bool>,
}

impl Authorizer {
    pub fn new(client: Client) -> Authorizer {
        Authorizer {
            client,
            tokens: Mutex::default(),
            decisions: Mutex::default(),
        }
    }

    /// Establishes the caller: the certificate's user, else the token's.
    pub async fn authenticate(
        &self,
        certificate: Option<&User>,
        bearer: Option<&str>,
    ) -> Result<User, Denied> {
        if let Some(user) = certificate {
            return Ok(user.clone());
        }
        let Some(token) = bearer.filter(|t| !t.is_empty()) else {
            return Err(Denied::Unauthenticated(
                "no client certificate or bearer token: this is the kubelet API of darkcore's nodes; use kubectl".into(),
            ));
        };
        let cached = self
            .tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&token_key(token))
            .cloned();
        let user = match cached {
            Some((at, user)) if at.elapsed() < CACHE_FOR => user,
            _ => {
                let review = TokenReview {
                    spec: TokenReviewSpec {
                        token: Some(token.into()),
                        audiences: None,
                    },
                    ..Default::default()
                };
                let answer = Api::<TokenReview>::all(self.client.clone())
                    .create(&PostParams::default(), &review)
                    .await
                    .map_err(|e| {
                        Denied::Unauthenticated(format!("the token could not be reviewed: {e}"))
                    })?;
                let status = answer.status.unwrap_or_default();
                let user = (status.authenticated == Some(true))
                    .then(|| status.user.unwrap_or_default())
                    .map(|u| User {
                        name: u.username.unwrap_or_default(),
                        groups: u.groups.unwrap_or_default(),
                    });
                remember(&self.tokens, token_key(token), user.clone());
                user
            }
        };
        user.ok_or_else(|| Denied::Unauthenticated("the bearer token is not valid".into()))
    }

    /// Whether `user` may `get` `nodes/<subresource>` of `node` (empty: any node).
    pub async fn authorize(
        &self,
        user: &User,
        verb: &'static str,
        subresource: &'static str,
        node: &str,
    ) -> Result<(), Denied> {
        let key = (user.clone(), verb, subresource, node.to_string());
        let cached = self
            .decisions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .copied();
        let allowed = match cached {
            Some((at, allowed)) if at.elapsed() < CACHE_FOR => allowed,
            _ => {
                let review = SubjectAccessReview {
                    spec: SubjectAccessReviewSpec {
                        user: Some(user.name.clone()),
                        groups: Some(user.groups.clone()),
                        resource_attributes: Some(ResourceAttributes {
                            verb: Some(verb.into()),
                            resource: Some("nodes".into()),
                            subresource: Some(subresource.into()),
                            name: Some(node.into()).filter(|n: &String| !n.is_empty()),
                            group: Some(String::new()),
                            version: Some("v1".into()),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                    ..Default::default()
                };
                let answer = Api::<SubjectAccessReview>::all(self.client.clone())
                    .create(&PostParams::default(), &review)
                    .await
                    .map_err(|e| Denied::Forbidden(format!("access could not be reviewed: {e}")))?;
                let allowed = answer.status.is_some_and(|s| s.allowed);
                remember(&self.decisions, key, allowed);
                allowed
            }
        };
        if allowed {
            Ok(())
        } else {
            Err(Denied::Forbidden(format!(
                "user {:?} may not get nodes/{subresource}{}",
                user.name,
                if node.is_empty() {
                    String::new()
                } else {
                    format!(" of {node}")
                }
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_new_tokens_never_grows_the_cache_past_its_bound() {
        let cache: Cache<[u8; 32], Option<User>> = Mutex::default();
        for n in 0..3 * CACHED_AT_MOST {
            remember(&cache, token_key(&format!("token-{n}")), None);
            assert!(cache.lock().unwrap().len() <= CACHED_AT_MOST);
        }
        assert_ne!(token_key("a"), token_key("b"));
    }
}

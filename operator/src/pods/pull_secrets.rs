//! A pod's `imagePullSecrets` as registry credentials for the device that runs it (pure): the
//! `kubernetes.io/dockerconfigjson` and `kubernetes.io/dockercfg` formats the kubelet reads.
//!
//! The kubelet pulls without a secret it cannot read, and warns; so does darkcore.

use std::collections::BTreeMap;

use base64::Engine;
use darkcore_proto::agent::v1::RegistryCredential;
use k8s_openapi::api::core::v1::Secret;
use serde::Deserialize;

/// The key of a `kubernetes.io/dockerconfigjson` Secret.
const DOCKER_CONFIG_JSON: &str = ".dockerconfigjson";
/// The key of a legacy `kubernetes.io/dockercfg` Secret.
const DOCKER_CFG: &str = ".dockercfg";

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, Entry>,
}

#[derive(Deserialize, Default)]
struct Entry {
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    /// base64 of `username:password`, used when the two fields are absent.
    #[serde(default)]
    auth: Option<String>,
}

/// The registry credentials in one pull secret, or why none could be read. The error never
/// quotes the secret's content.
pub fn credentials(secret: &Secret) -> Result<Vec<RegistryCredential>, String> {
    let data = super::resolve::secret_data(secret);
    let auths: BTreeMap<String, Entry> = if let Some(bytes) = data.get(DOCKER_CONFIG_JSON) {
        serde_json::from_slice::<DockerConfig>(bytes)
            .map_err(|e| format!("its {DOCKER_CONFIG_JSON} is not a Docker config: {e}"))?
            .auths
    } else if let Some(bytes) = data.get(DOCKER_CFG) {
        serde_json::from_slice(bytes)
            .map_err(|e| format!("its {DOCKER_CFG} is not a Docker config: {e}"))?
    } else {
        return Err(format!(
            "it has neither {DOCKER_CONFIG_JSON} nor {DOCKER_CFG}: create it with `kubectl create secret docker-registry`"
        ));
    };
    auths
        .into_iter()
        .map(|(server, entry)| {
            let (username, password) = user_and_password(entry)
                .ok_or_else(|| format!("its entry for {server} has no username and password"))?;
            Ok(RegistryCredential {
                registry: registry_host(&server),
                username,
                password,
            })
        })
        .collect()
}

fn user_and_password(entry: Entry) -> Option<(String, String)> {
    if let (Some(user), Some(password)) = (&entry.username, &entry.password)
        && !user.is_empty()
    {
        return Some((user.clone(), password.clone()));
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(entry.auth?.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

/// The registry's host (and port) from a Docker config key, which may be a URL
/// (`https://index.docker.io/v1/`) or carry a path.
fn registry_host(server: &str) -> String {
    let rest = server
        .strip_prefix("https://")
        .or_else(|| server.strip_prefix("http://"))
        .unwrap_or(server);
    rest.split('/').next().unwrap_or(rest).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn secret(key: &str, value: &str) -> Secret {
        Secret {
            data: Some([(key.to_string(), ByteString(value.as_bytes().to_vec()))].into()),
            ..Default::default()
        }
    }

    #[test]
    fn dockerconfigjson_with_fields_or_auth() {
        let auth = base64::engine::general_purpose::STANDARD.encode("bob:s3cret:x");
        let json = format!(
            r#"{{"auths":{{"127.0.0.1:5001":{{"username":"alice","password":"pw"}},
                "https://index.docker.io/v1/":{{"auth":"{auth}"}}}}}}"#
        );
        let mut found = credentials(&secret(DOCKER_CONFIG_JSON, &json)).unwrap();
        found.sort_by(|a, b| a.registry.cmp(&b.registry));
        assert_eq!(found[0].registry, "127.0.0.1:5001");
        assert_eq!((&*found[0].username, &*found[0].password), ("alice", "pw"));
        assert_eq!(found[1].registry, "index.docker.io");
        assert_eq!(
            (&*found[1].username, &*found[1].password),
            ("bob", "s3cret:x")
        );
    }

    #[test]
    fn legacy_dockercfg() {
        let found = credentials(&secret(
            DOCKER_CFG,
            r#"{"registry.example:443/team":{"username":"u","password":"p"}}"#,
        ))
        .unwrap();
        assert_eq!(found[0].registry, "registry.example:443");
    }

    #[test]
    fn unreadable_secrets_say_why_without_quoting_them() {
        let wrong_kind = credentials(&secret("token", "abc")).unwrap_err();
        assert!(wrong_kind.contains("kubectl create secret docker-registry"));
        let garbage = credentials(&secret(DOCKER_CONFIG_JSON, "hunter2")).unwrap_err();
        assert!(!garbage.contains("hunter2"), "{garbage}");
        let no_password = credentials(&secret(
            DOCKER_CONFIG_JSON,
            r#"{"auths":{"r.example":{"username":"u"}}}"#,
        ))
        .unwrap_err();
        assert!(no_password.contains("r.example"), "{no_password}");
    }
}
